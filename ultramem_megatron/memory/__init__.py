"""Single-device memory-layer math in plain PyTorch: UltraMem (TDQKR, MCS, IVE) and PKM."""

from .config import MemoryConfigError, PKMConfig, UltraMemConfig
from .layer import UltraMemLayer
from .lookup import lookup_pool
from .pkm import ProductKeyMemory
from .value_lr import is_value_param, mark_value_param, value_lr_multiplier

__all__ = [
    "MemoryConfigError", "PKMConfig", "UltraMemConfig", "UltraMemLayer", "ProductKeyMemory",
    "lookup_pool", "is_value_param", "mark_value_param", "value_lr_multiplier",
]
