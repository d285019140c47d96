"""Which implementation of the memory ops a layer runs: the torch reference or a Triton kernel."""

# model.ultramem.kernel:
#   auto    Triton on CUDA (when triton imports), torch elsewhere
#   torch   the pure-PyTorch reference (memory/lookup.py, memory/selection.py) everywhere
#   triton  the Triton kernels; on CPU only under TRITON_INTERPRET=1 (the tests' interpreter)
# float64 always runs the reference: the kernels accumulate in fp32.

import os
from functools import lru_cache
from typing import Callable

import torch

from ..memory.lookup import pool_bags
from ..memory.selection import two_phase_topk
from . import triton_available

KERNEL_CHOICES = ("auto", "torch", "triton")


def triton_problem(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on this device type here (None when they can)."""
    if not triton_available():
        return "triton does not import here (pip install triton, or use kernel=torch/auto)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the Triton kernels need a CUDA device; on CPU they run only interpreted "
                "(TRITON_INTERPRET=1, for tests), so use kernel=torch or auto")
    return None


def check_kernel_choice(choice: str, device_type: str) -> None:
    """Refuse, before any work, a choice this machine cannot run (ValueError naming the field)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.ultramem.kernel must be one of {KERNEL_CHOICES}, got {choice!r}")
    problem = triton_problem(device_type) if choice == "triton" else None
    if problem:
        raise ValueError(f"model.ultramem.kernel=triton: {problem}")


@lru_cache(maxsize=None)
def uses_triton(choice: str, device_type: str) -> bool:
    """Whether `choice` runs the Triton kernels on this device type (refuses what cannot run)."""
    if choice == "torch" or (choice == "auto" and device_type != "cuda"):
        return False
    check_kernel_choice(choice, device_type)
    return choice == "triton" or triton_problem(device_type) is None


def _wants_triton(choice: str, tensor: torch.Tensor) -> bool:
    return tensor.dtype != torch.float64 and uses_triton(choice, tensor.device.type)


def pool_bags_for(choice: str, table: torch.Tensor) -> Callable[..., torch.Tensor]:
    """memory.lookup.pool_bags, or its Triton kernel (same signature) for this table."""
    if _wants_triton(choice, table):
        from .lookup_pool import triton_pool_bags
        return triton_pool_bags
    return pool_bags


def two_phase_topk_for(choice: str, scores: torch.Tensor) -> Callable[..., tuple]:
    """memory.selection.two_phase_topk, or its Triton kernel (same signature) for these scores."""
    if _wants_triton(choice, scores):
        from .topm import triton_two_phase_topk
        return triton_two_phase_topk
    return two_phase_topk
