"""The Triton kernels compile for the GPUs our users have (sm_80, sm_90) with the exact argument
types and block sizes the wrappers launch them with: captured from real calls at this repo's
shapes (tiny and the 151M recipe, fp32 and bf16 tables), compiled to cubin by triton's own
compiler and ptxas, no GPU needed. The interpreter tests check the math; this checks that the
same source is valid compiled Triton (types, constexpr shapes, loops with runtime bounds)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import subprocess_env
from tests.training.conftest import ROOT
from ultramem_megatron.kernels import lookup_pool, topm

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    assert isinstance(value, int), value
    return "i32" if -2**31 <= value < 2**31 else "i64"


def captured_launches(monkeypatch, module, names: tuple[str, ...], call) -> list[dict]:
    """Launch specs of the kernels module.<names> as `call()` launches them; the kernels are not
    run (their outputs stay uninitialised)."""
    specs = []
    for name in names:
        kernel = getattr(module, name)
        code = kernel.fn.__code__
        params = list(code.co_varnames[:code.co_argcount])

        class Recorder:
            def __getitem__(self, grid, name=name, params=params):
                def launch(*args, **constexprs):
                    specs.append({"module": module.__name__, "kernel": name,
                                  "signature": {p: arg_type(a) for p, a in zip(params, args)},
                                  "constexprs": constexprs})
                return launch

        monkeypatch.setattr(module, name, Recorder())
    call()
    monkeypatch.undo()
    return specs


def lookup_specs(monkeypatch, width: int, value_dim: int, cores: int,
                 dtype: torch.dtype) -> list[dict]:
    """Forward and backward (table gradient, score gradient) of pool_bags at this width."""
    table, grad = torch.zeros(64, width, dtype=dtype), torch.zeros(4, width, dtype=dtype)
    items, scores = torch.zeros(8, dtype=torch.int64), torch.zeros(8, cores)
    kernels = ("_segment_pool_kernel", "_score_grad_kernel")
    return captured_launches(monkeypatch, lookup_pool, kernels, lambda: (
        lookup_pool.pool_bags_fwd(table, items, items, scores, 4, 0, value_dim),
        lookup_pool.pool_bags_bwd(grad, table, items, items, scores, 0, value_dim)))


def topm_specs(monkeypatch, keys: int, rank: int, cores: int, width: int, topk: int):
    s = torch.zeros(2, 2, keys, rank)
    args = (s, s, torch.zeros(cores, 2, rank, rank), torch.zeros(2, rank), torch.zeros(2, rank),
            width, topk)
    return captured_launches(monkeypatch, topm, ("_two_phase_kernel",),
                             lambda: topm.two_phase_select(*args))


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper(monkeypatch):
    specs = []
    for dtype in (torch.float32, torch.bfloat16):
        specs += lookup_specs(monkeypatch, 64, 64, 2, dtype)      # configs/tiny.yaml (D_v 64)
        specs += lookup_specs(monkeypatch, 512, 512, 2, dtype)    # the 151M recipe (D_v 512)
        specs += lookup_specs(monkeypatch, 128, 512, 2, dtype)    # its slice at TP 4
    specs += topm_specs(monkeypatch, 64, 2, 2, 16, 16)                    # tiny
    specs += topm_specs(monkeypatch, 1904, 2, 2, 80, 80)                  # 151M: 2 x 952 keys
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests/kernels/compile_worker.py")],
                            input=json.dumps(specs), capture_output=True, text=True, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(specs) == 3 * 2 * 3 + 2 and len(compiled) == 2 * len(specs), result.stdout
