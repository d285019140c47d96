"""model.ultramem.kernel: which implementation runs where, and the refusals before any work."""

import pytest
import torch

from ultramem_megatron.config import ConfigError, load_config
from ultramem_megatron.kernels import choice
from ultramem_megatron.memory.lookup import pool_bags
from ultramem_megatron.memory.selection import two_phase_topk
from ultramem_megatron.model.capabilities import Capabilities
from ultramem_megatron.training.loop import machine_capabilities, memory_kernels

from tests.training.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def fresh_choice(monkeypatch):
    """uses_triton is cached per (choice, device type): start and end each test empty."""
    choice.uses_triton.cache_clear()
    yield monkeypatch
    choice.uses_triton.cache_clear()


def test_auto_and_torch_never_pick_triton_on_cpu(fresh_choice):
    fresh_choice.setattr(choice, "triton_available", lambda: True)
    fresh_choice.setenv("TRITON_INTERPRET", "1")
    for kernel in ("auto", "torch"):
        assert not choice.uses_triton(kernel, "cpu")
    assert not choice.uses_triton("torch", "cuda")


@pytest.mark.parametrize("has_triton", [True, False])
def test_auto_on_cuda_follows_triton(fresh_choice, has_triton):
    fresh_choice.setattr(choice, "triton_available", lambda: has_triton)
    assert choice.uses_triton("auto", "cuda") is has_triton


def test_triton_refused_where_it_cannot_run(fresh_choice):
    fresh_choice.setattr(choice, "triton_available", lambda: True)
    fresh_choice.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA device.*TRITON_INTERPRET=1"):
        choice.check_kernel_choice("triton", "cpu")
    choice.check_kernel_choice("triton", "cuda")
    fresh_choice.setattr(choice, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton does not import"):
        choice.check_kernel_choice("triton", "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        choice.check_kernel_choice("cuda", "cuda")


def test_float64_and_cpu_auto_run_the_reference(fresh_choice):
    fresh_choice.setattr(choice, "triton_available", lambda: True)
    fresh_choice.setenv("TRITON_INTERPRET", "1")
    table64, table32 = torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2)
    assert choice.pool_bags_for("triton", table64) is pool_bags
    assert choice.two_phase_topk_for("triton", table64) is two_phase_topk
    assert choice.pool_bags_for("auto", table32) is pool_bags
    assert choice.two_phase_topk_for("torch", table32) is two_phase_topk


def test_train_refuses_triton_on_this_cpu(fresh_choice):
    """train.py's Trainer checks the choice first (before process groups, data or model):
    kernel=triton on a CPU run without the interpreter is a config error naming the field."""
    fresh_choice.delenv("TRITON_INTERPRET", raising=False)
    run = load_config(TINY, ["model.ultramem.kernel=triton"])
    with pytest.raises(ConfigError, match="model.ultramem.kernel=triton"):
        machine_capabilities(run)
    machine_capabilities(load_config(TINY, ["model.ultramem.kernel=auto"]))
    with pytest.raises(ConfigError, match="kernel"):
        load_config(TINY, ["model.ultramem.kernel=cuda"])


@pytest.mark.parametrize("has_triton", [True, False])
def test_gpu_run_picks_and_reports_the_kernels(fresh_choice, has_triton):
    """CUDA simulated: what train.py checks and prints on a GPU. auto follows triton's presence;
    kernel=triton without triton is refused before any work."""
    fresh_choice.setattr(choice, "triton_available", lambda: has_triton)
    fresh_choice.setattr(Capabilities, "detect", classmethod(lambda cls: Capabilities(cuda=True)))
    caps = machine_capabilities(load_config(TINY, ["model.ultramem.kernel=auto"]))
    assert caps.cuda
    run = load_config(TINY, [])
    assert memory_kernels(run, caps) == (", Triton memory kernels" if has_triton
                                         else ", torch memory ops")
    assert memory_kernels(load_config(TINY, ["model.family=dense"]), caps) == ""
    triton_run = load_config(TINY, ["model.ultramem.kernel=triton"])
    if has_triton:
        machine_capabilities(triton_run)
    else:
        with pytest.raises(ConfigError, match="triton does not import"):
            machine_capabilities(triton_run)
