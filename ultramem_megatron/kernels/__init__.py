"""Triton kernels for the memory layer; import a kernel module lazily, only where triton is wanted."""


def triton_available() -> bool:
    """True if triton imports (its kernels also run on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
