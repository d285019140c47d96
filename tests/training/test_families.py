"""Every model family builds from its config and trains a few steps on the fixture."""

import math

import pytest

from .conftest import losses, train

pytestmark = pytest.mark.slow

FAMILIES = {
    "dense": ["model.family=dense", "model.memory_spans="],
    "moe": ["model.family=moe", "model.memory_spans=", "model.moe={num_experts: 4, topk: 2}"],
    "pkm": ["model.family=pkm", "model.pkm={num_keys: 16, key_dim: 32, topk: 8, num_heads: 2}"],
    "ultramem": ["model.family=ultramem"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_checkpoints(tmp_path, family):
    result = train(tmp_path, "train.max_steps=4", "train.eval_interval=4", "train.lr=1e-2",
                   *FAMILIES[family])
    trace = losses(tmp_path)
    assert sorted(trace) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in trace.values())
    assert trace[4] < trace[1], trace
    assert "final validation loss" in result.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000004"
