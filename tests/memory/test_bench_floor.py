"""scripts/bench_layer.py's floor: the layer's own mm and top-k calls, recorded and replayed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import transformer_config
from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_layer", ROOT / "scripts" / "bench_layer.py")
bench_layer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_layer)

MM, TOPK = torch.ops.aten.mm.default, torch.ops.aten.topk.default


def test_floor_replays_the_layers_own_gemms_and_topk_calls():
    """Recorded once per input: W_q, two key-score GEMMs, W_out and three top-k calls, with the
    layer's real tensors (the replayed phase-2 top-m gives the layer's own choice)."""
    torch.manual_seed(0)
    layer = UltraMemLayer(transformer_config(), UltraMemConfig(num_keys=8, key_dim=16, topk=4,
                                                         value_dim=32, num_heads=2)).eval()
    floor = bench_layer.ReplayedOps(layer, (MM, TOPK))
    x = torch.randn(5, 1, layer.config.hidden_size)
    assert floor(x) == (None, None)
    calls = floor._recorded[1]
    assert [op for op, _, _ in calls].count(MM) == 4
    assert [op for op, _, _ in calls].count(TOPK) == 3
    topm_input, m = [args for op, args, _ in calls if op == TOPK][-1][:2]
    assert topm_input.shape == (5, 2, layer.memory.candidates_per_axis ** 2) and m == 4
    first = calls[0]
    floor(x)
    assert floor._recorded[1][0] is first           # same input: nothing recorded again
    floor(torch.randn(3, 1, layer.config.hidden_size))
    assert floor._recorded[1][0] is not first       # a new input is recorded afresh


def test_floor_refuses_ops_the_layer_never_calls():
    layer = UltraMemLayer(transformer_config(), UltraMemConfig(num_keys=8, key_dim=16, topk=4,
                                                         value_dim=32)).eval()
    with pytest.raises(RuntimeError, match="none of the calls"):
        bench_layer.ReplayedOps(layer, (torch.ops.aten.cholesky.default,))(
            torch.randn(2, 1, layer.config.hidden_size))
