"""Single-device memory math in plain PyTorch: UltraMem (TDQKR, MCS, IVE), UltraMemV2, Memory+, PKM."""

from .config import MemoryConfigError, MemoryPlusConfig, PKMConfig, UltraMemConfig, UltraMemV2Config
from .value_lr import is_value_param, mark_value_param, value_lr_multiplier

__all__ = [
    "MemoryConfigError", "PKMConfig", "UltraMemConfig", "UltraMemV2Config", "MemoryPlusConfig",
    "UltraMemLayer", "MemoryPlusLayer", "ProductKeyMemory", "lookup_pool", "is_value_param",
    "mark_value_param", "value_lr_multiplier",
]

_LAZY = {"UltraMemLayer": ".layer", "MemoryPlusLayer": ".memory_plus",
         "ProductKeyMemory": ".pkm", "lookup_pool": ".lookup"}


def __getattr__(name: str):
    """The layers import megatron-core (seconds): loaded on first use, so reading and validating
    a config (which needs only .config) stays fast and fails fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
