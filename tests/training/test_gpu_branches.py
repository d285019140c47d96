"""The training code's CUDA-only branches, executed on CPU with CUDA simulated."""

from pathlib import Path
from unittest import mock

import pytest
import torch

from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.training import checkpoint
from ultramem_megatron.training.loop import training_dtype

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cuda, precision, dtype", [
    (True, "auto", torch.bfloat16), (False, "auto", torch.float32),
    (True, "fp32", torch.float32), (False, "bf16", torch.bfloat16)])
def test_training_dtype(cuda, precision, dtype):
    run = load_config(ROOT / "configs/tiny.yaml", [f"train.precision={precision}"])
    with mock.patch("torch.cuda.is_available", return_value=cuda):
        assert training_dtype(run) == dtype


def test_cuda_rng_state_saved_and_restored():
    """A GPU checkpoint carries the CUDA generator's state and a resume puts it back."""
    megatron_compat.initialize_single_process()
    saved_cuda = torch.arange(16, dtype=torch.uint8)
    restored = []
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_rng_state", return_value=saved_cuda), \
            mock.patch("torch.cuda.set_rng_state", side_effect=restored.append):
        state = checkpoint._rng_state()
        before = torch.rand(3)
        checkpoint._set_rng_state(state)
        after = torch.rand(3)
    assert torch.equal(state["cuda"], saved_cuda)
    assert len(restored) == 1 and torch.equal(restored[0], saved_cuda)
    assert torch.equal(before, after)   # the CPU generator came back too


def test_device_is_the_current_cuda_device():
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.current_device", return_value=3):
        assert megatron_compat.device() == torch.device("cuda", 3)
