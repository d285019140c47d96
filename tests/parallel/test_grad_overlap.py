"""Gradient traffic: megatron's overlapped gradient reduce-scatter and parameter gather give the
losses of the blocking ones (2 gloo ranks, ultramem at P = 1 and P = 2 value_dim); the analytic
bytes of scripts/bench_grad_traffic.py obey their exact rules and equal the bytes counted on the
collectives; the config refuses the combinations megatron cannot run."""

import importlib.util

import pytest

from tests.training.conftest import ROOT, losses, torchrun, train
from ultramem_megatron.config import ConfigError, load_config

_spec = importlib.util.spec_from_file_location("bench_grad_traffic",
                                               ROOT / "scripts" / "bench_grad_traffic.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
# Two micro-batches per rank and step (no_sync on the first), a log record, an evaluation and a
# checkpoint at step 3 (the paths that read parameters after a deferred gather).
STEPS = ["train.max_steps=3", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.log_interval=2", "train.eval_interval=3", "train.eval_iters=1",
         "train.save_interval=3", "model.ultramem.key_balance_weight=0"]


# ---------------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, message", [
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
      "parallel.use_distributed_optimizer=false"], "use_distributed_optimizer"),
    (["parallel.overlap_param_gather=true"], "overlap_grad_reduce"),
])
def test_invalid_overlap_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_valid_overlap_combinations_load():
    for overrides in ([], ["parallel.overlap_grad_reduce=true"], OVERLAP,
                      ["parallel.overlap_grad_reduce=true",
                       "parallel.use_distributed_optimizer=false"]):
        load_config(ROOT / "configs/tiny.yaml", overrides)


# ---------------------------------------------------------------------------------- analytic

@pytest.fixture(scope="module")
def recipe():
    run = load_config(ROOT / "configs/ultramem_151m.yaml")
    return run, bench.param_inventory(run)


def test_one_owner_per_slice_means_no_value_gradient_traffic(recipe):
    run, params = recipe
    for world, tp in ((8, 1), (32, 2), (128, 1)):
        layout = bench.Layout(world, tp, world // tp)
        assert layout.expert_dp == 1
        value = bench.grad_traffic(params, layout, 2)["value"]
        assert value["grad"] == 0 and value["gather"] == 0


def test_value_gradient_bytes_follow_the_ring_rule(recipe):
    """Per rank, per step: RS (n-1)/n x 4 B x shard, AG passes x (n-1)/n x 2 B x shard, with
    shard = N D_v L / (t P) (+ megatron's padding, at most lcm(n, 128) + 64 elements a table)
    and n = DP / P: doubling P halves the shard, and changes n."""
    run, params = recipe
    values = sum(p.numel for p in params if p.value)
    tables = sum(p.value for p in params)
    for world, tp, mp in ((8, 1, 1), (32, 1, 2), (32, 2, 4), (128, 1, 8), (128, 2, 8)):
        layout = bench.Layout(world, tp, mp)
        n, shard = layout.expert_dp, values // (tp * mp)
        value = bench.grad_traffic(params, layout, 2)["value"]
        assert shard <= value["buffer_numel"] <= shard + tables * (64 + 128 * n)
        assert value["grad"] == pytest.approx(4 * value["buffer_numel"] * (n - 1) / n, rel=1e-12)
        assert value["gather"] == pytest.approx(2 * (2 / 4) * value["grad"], rel=1e-12)  # 2 passes
        overlapped = bench.grad_traffic(
            params, bench.Layout(world, tp, mp, overlap_param_gather=True), 2)["value"]
        assert overlapped["gather"] == pytest.approx(value["gather"] / 2, rel=1e-12)
    # Doubling P at a fixed expert-DP size halves the value bytes (up to padding).
    a = bench.grad_traffic(params, bench.Layout(32, 1, 2), 2)["value"]
    b = bench.grad_traffic(params, bench.Layout(64, 1, 4), 2)["value"]
    assert b["grad"] == pytest.approx(a["grad"] / 2, rel=1e-4)


def test_exchange_is_zero_at_p1_and_value_dim_formula(recipe):
    run, _ = recipe
    memory, hidden = run.model.ultramem, run.model.hidden_size
    assert bench.exchange_per_token(memory, hidden, bench.Layout(8, 1, 1), 2) == (0.0, 0.0)
    k, c, e, dv = memory.num_heads * memory.topk, memory.num_cores, memory.expansion, 512
    fwd, bwd = bench.exchange_per_token(memory, hidden, bench.Layout(8, 1, 8), 2)
    assert fwd == k * (16 + 4 * c) * 7 + 2 * e * dv * 7 / 8
    assert bwd == k * 4 * c * 7 + 2 * e * dv * 7 / 8


# ---------------------------------------------------------------------------------- 2 ranks

@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.memory_parallel_size=1"],
    ["parallel.memory_parallel_size=2", "parallel.memory_parallel_mode=value_dim"],
], ids=["p1", "p2-value"])
def test_overlap_gives_the_blocking_losses(tmp_path, layout):
    runs = {}
    for name, extra in (("blocking", []), ("overlap", OVERLAP)):
        run_dir = tmp_path / name
        train(run_dir, *STEPS, *layout, *extra, python=torchrun(2),
              env={"OMP_NUM_THREADS": "1"})
        runs[name] = losses(run_dir)
    assert sorted(runs["overlap"]) == sorted(runs["blocking"]) == [2, 3]   # log_interval 2
    for step, loss in runs["blocking"].items():
        assert runs["overlap"][step] == pytest.approx(loss, rel=1e-6, abs=1e-6), (step, runs)
    assert (tmp_path / "overlap" / "checkpoints" / "latest").read_text().strip() == "step_0000003"


@pytest.mark.slow
def test_counted_bytes_equal_the_formula():
    """4 ranks, P = 2 value_dim (expert-DP 2: the value shards are reduced and gathered too),
    overlap on: every phase's counted bytes are the analytic ones, the parameter gather once per
    step (in the forward pre-hooks: the value tables too, whose module is never called)."""
    (row,) = bench.counted_check(
        [(4, ["parallel.memory_parallel_size=2", "parallel.memory_parallel_mode=value_dim"])],
        extra=OVERLAP)
    sent, want = row["counted"]["sent"], row["analytic"]
    assert row["counted"]["buffers"] == want["buffers"]
    for phase in bench.PHASES:
        assert sent.get(phase, 0.0) == pytest.approx(want[phase], rel=1e-12, abs=0), phase
    for phase in ("grad:value", "gather:value", "gather:other", "exchange:forward"):
        assert want[phase] > 0, phase
