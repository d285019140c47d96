"""Export to Hugging Face format (safetensors + shipped modeling code) and import back."""

__all__ = ["ConversionError", "export_checkpoint", "export_model", "import_hf"]

_LAZY = {"export_checkpoint": ".checkpoints", "export_model": ".checkpoints",
         "import_hf": ".checkpoints", "ConversionError": ".convert"}


def __getattr__(name: str):
    """The megatron side loads on first use, so `--help` and argument errors stay fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
