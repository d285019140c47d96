"""Every shipped config builds the TransformerConfig and model a run would use, CUDA simulated or not."""

import itertools
from dataclasses import fields, replace
from pathlib import Path
from unittest import mock

import pytest
import torch

from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.model.capabilities import Capabilities, choose_fusions
from ultramem_megatron.model.gpt import build_model, transformer_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
TE = megatron_compat.transformer_engine_available()
# A CUDA machine with a CUDA build of torch (Triton ships with it) and neither apex nor TE: the
# most common first contact, and the one that failed before fusions were chosen by capability.
PLAIN_GPU = Capabilities(cuda=True, triton=True, transformer_engine=TE)


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    megatron_compat.initialize_single_process()


def _run(name: str):
    return load_config(ROOT / "configs" / name)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_config_and_meta_model_build(name, cuda, dtype):
    """The capabilities detected on this machine with CUDA simulated (what a GPU run's process
    sees: torch.cuda.is_available() is True, no apex kernels), and a plain GPU with Triton.
    In bf16 the model is what training wraps: megatron's Float16Module, every parameter bf16."""
    run = _run(name)
    with mock.patch("torch.cuda.is_available", return_value=cuda):
        detected = Capabilities.detect()
        assert detected.cuda is cuda
        for caps in {detected, replace(PLAIN_GPU, cuda=cuda, triton=cuda)}:
            with torch.device("meta"):
                model = build_model(run.model, run.parallel, dtype, caps)
                trained = megatron_compat.wrap_float16(model) if dtype == torch.bfloat16 else model
            params = list(trained.parameters())
            assert params and all(p.is_meta and p.dtype == dtype for p in params)
            uses_te = any("transformer_engine" in type(m).__module__ for m in model.modules())
            assert uses_te is TE


def _softmax_modules(model):
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    return [m for m in model.modules() if isinstance(m, FusedScaleMaskSoftmax)]


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_never_calls_missing_softmax_kernels(name):
    """With CUDA and bf16 but no apex kernels, megatron's attention must take the torch softmax:
    its is_kernel_available() would otherwise import scaled_masked_softmax_cuda and fail."""
    run = _run(name)
    with mock.patch("torch.cuda.is_available", return_value=True), torch.device("meta"):
        model = build_model(run.model, run.parallel, torch.bfloat16, Capabilities.detect())
    softmaxes = _softmax_modules(model)
    assert len(softmaxes) == (0 if TE else run.model.num_layers)
    heads, seq = run.model.num_attention_heads, run.model.seq_length
    for softmax in softmaxes:
        assert softmax.input_in_float16
        assert not softmax.is_kernel_available(None, 8, heads, seq, seq)


def _all_capabilities():
    """Every combination of the flags that can occur: the fused RoPE kernel only exists with TE
    (megatron refuses apply_rope_fusion otherwise)."""
    names = [f.name for f in fields(Capabilities)]
    for values in itertools.product([False, True], repeat=len(names)):
        caps = Capabilities(**dict(zip(names, values)))
        if caps.rope_kernel and not megatron_compat.fused_rope_available():
            continue
        yield caps


@pytest.mark.parametrize("name", CONFIGS)
def test_megatron_accepts_every_capability_combination(name):
    """megatron's TransformerConfig validation (the bias-GELU rule, the RoPE-kernel rule, ...)
    passes for every machine our fusion choice can meet, in both dtypes and with SwiGLU on/off."""
    run = _run(name)
    checked = 0
    for swiglu in (False, True):
        model = replace(run.model, swiglu=swiglu)
        for caps in _all_capabilities():
            fusions = choose_fusions(model, caps)
            for dtype in (torch.float32, torch.bfloat16):
                config = transformer_config(model, run.parallel, dtype, fusions)
                assert config.bias_activation_fusion <= (caps.cuda and caps.triton)
                assert config.masked_softmax_fusion <= caps.softmax_kernels
                assert config.gradient_accumulation_fusion <= caps.grad_accum_kernel
                assert config.moe_grouped_gemm == (caps.transformer_engine
                                                   and model.family == "moe")
                checked += 1
    assert checked >= 2 * 2 * 64


@pytest.mark.parametrize("impl", ["auto", "local", "transformer_engine"])
def test_transformer_impl_narrows_the_capabilities(impl):
    """train.transformer_impl: local never uses TE; transformer_engine is refused where TE does
    not import (before any model is built), and otherwise is what auto does."""
    from ultramem_megatron.config import ConfigError
    from ultramem_megatron.training.loop import machine_capabilities

    run = load_config(ROOT / "configs/tiny.yaml", [f"train.transformer_impl={impl}"])
    if impl == "transformer_engine" and not TE:
        with pytest.raises(ConfigError, match="transformer_impl"):
            machine_capabilities(run)
        return
    assert machine_capabilities(run).transformer_engine is (TE and impl != "local")


def test_detect_finds_kernels_that_import(monkeypatch):
    """The detection's found-it branches: with CUDA simulated and stand-in modules for apex's
    kernels, flash-attn and torch's Triton check, every capability they gate is reported (and
    none of them without CUDA)."""
    import sys
    import types

    import torch.utils._triton

    for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                 "scaled_softmax_cuda", "fused_weight_gradient_mlp_cuda", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    for cuda in (True, False):
        with mock.patch("torch.cuda.is_available", return_value=cuda):
            caps = Capabilities.detect()
        assert (caps.triton, caps.softmax_kernels, caps.grad_accum_kernel,
                caps.flash_attention) == (cuda,) * 4
    fusions = choose_fusions(load_config(ROOT / "configs/tiny.yaml").model, caps)
    assert not fusions.masked_softmax_fusion   # the last caps: no CUDA
    with mock.patch("torch.cuda.is_available", return_value=True):
        fusions = choose_fusions(load_config(ROOT / "configs/tiny.yaml").model)
    assert fusions.masked_softmax_fusion and fusions.gradient_accumulation_fusion
    assert fusions.bias_dropout_fusion


def test_a_failing_triton_probe_means_no_triton(monkeypatch):
    import torch.utils._triton

    def broken():
        raise TypeError("list indices must be integers")   # as torch raises under fake CUDA

    monkeypatch.setattr(torch.utils._triton, "has_triton", broken)
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert not Capabilities.detect().triton
