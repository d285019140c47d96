"""Kernel tests: without CUDA they run under the Triton interpreter; without triton they skip."""

import pytest

from ultramem_megatron.kernels import triton_available

# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA, before anything imports
# triton, so these kernels run under the interpreter there.

NO_TRITON = None if triton_available() else (
    "triton does not import; the kernel tests need it (pip install -e '.[triton]')")


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(NO_TRITON)


def pytest_pycollect_makemodule(module_path, parent):
    """Without triton every test module here is reported skipped instead of failing to import."""
    if NO_TRITON:
        return _SkippedModule.from_parent(parent, path=module_path)
