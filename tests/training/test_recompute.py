"""Activation recompute (megatron's selective and full) with memory spans: the same training as
without it, and the memory's statistics and BatchNorm moved once per forward."""

import json

import pytest

from tests.training.conftest import train
from ultramem_megatron.config import ConfigError, load_config

from .conftest import ROOT

# 4 steps, an evaluation at steps 2 and 4 (it reads the query BatchNorm's running statistics,
# which a recompute must move once per forward), the query BatchNorm on.
STEPS = ["train.max_steps=4", "train.eval_interval=2", "train.eval_iters=1",
         "model.ultramem.query_batchnorm=true"]
LAYOUTS = {
    "selective": ["parallel.recompute_granularity=selective"],
    # tiny.yaml: 4 blocks, span 1:2; one uniform group holds blocks 0-3
    "full_uniform": ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
                     "parallel.recompute_num_layers=4"],
    # blocks 0 and 1 recomputed one by one, the span 2:3 not at all
    "full_block": ["parallel.recompute_granularity=full", "parallel.recompute_method=block",
                   "parallel.recompute_num_layers=2", "model.memory_spans=2:3"],
}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> dict:
    """The runs without recompute, one per span layout, trained when first asked for."""
    runs = {}

    def run(spans: tuple) -> list[dict]:
        if spans not in runs:
            run_dir = tmp_path_factory.mktemp("plain")
            train(run_dir, *STEPS, *spans)
            runs[spans] = records(run_dir)
        return runs[spans]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_recompute_trains_as_without_it(plain_runs, tmp_path, layout):
    overrides = LAYOUTS[layout]
    spans = tuple(o for o in overrides if o.startswith("model.memory_spans"))
    train(tmp_path / layout, *STEPS, *overrides)
    reference, recomputed = plain_runs(spans), records(tmp_path / layout)
    assert [r["step"] for r in recomputed] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for ref, got in zip(reference, recomputed):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
        if "val_loss" in ref:
            assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5)
        for key in ref:   # lookups counted once per forward, the residual RMS and aux loss too
            if key.startswith("mem0/") or key == "aux_loss":
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("overrides, message", [
    (["parallel.recompute_granularity=full", "parallel.recompute_num_layers=2"],
     "memory span 1:2 crosses a full-recompute group"),
    (["parallel.recompute_granularity=full", "parallel.recompute_method=block",
      "parallel.recompute_num_layers=2"], "memory span 1:2 crosses a full-recompute group"),
    (["parallel.recompute_granularity=full", "parallel.recompute_num_layers=5"],
     r"recompute_num_layers \(5\) must be in \[1, blocks per model chunk = 4\]"),
    (["parallel.recompute_granularity=selective", "parallel.recompute_modules=[mlp]"],
     r"parallel.recompute_modules: \['mlp'\] are not among"),
])
def test_recompute_layouts_that_would_break_a_span_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", overrides)
