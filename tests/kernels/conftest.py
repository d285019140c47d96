"""Kernel tests: without CUDA they run under the Triton interpreter; without triton they skip.

The same tests run compiled on a GPU machine: inputs are drawn on the CPU (seeded, so the values
are the same everywhere), the tensors a kernel receives are moved to DEVICE, references are
computed on the CPU and kernel outputs and gradients come back with .cpu() before comparing."""

import pytest
import torch

from ultramem_megatron.kernels import triton_available

# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA, before anything imports
# triton, so these kernels run under the interpreter there; with CUDA they run compiled, and
# Triton cannot launch on CPU tensors then.
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

NO_TRITON = None if triton_available() else (
    "triton does not import; the kernel tests need it (pip install -e '.[triton]')")


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(NO_TRITON)


def pytest_pycollect_makemodule(module_path, parent):
    """Without triton every test module here is reported skipped instead of failing to import."""
    if NO_TRITON:
        return _SkippedModule.from_parent(parent, path=module_path)
