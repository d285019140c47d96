"""Resume semantics: the schedules follow the launched run's config, only the step comes from
the checkpoint (a raised max_steps stretches the LR, weight-decay and value-LR horizons)."""

import json
import math

import pytest
import torch

from ultramem_megatron.config import load_config
from ultramem_megatron.memory import value_lr_multiplier
from ultramem_megatron.training.optim import VALUE_GROUP_KEY, build_scheduler, is_value_group

from .conftest import train

FRESH, FIRST = 8, 4


def _records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_raised_max_steps_on_resume_gives_the_fresh_runs_schedule(tmp_path):
    """4 steps, then resumed with max_steps=8 and another value-LR start and decay fraction."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    launched = [f"train.max_steps={FRESH}", "model.ultramem.value_lr_start_mult=4.0",
                "model.ultramem.value_lr_decay_fraction=0.5"]
    train(fresh, *launched)
    train(resumed, f"train.max_steps={FIRST}")
    result = train(resumed, *launched)
    assert f"at step {FIRST}" in result.stdout
    expected, got = _records(fresh), _records(resumed)
    assert sorted(got) == list(range(1, FRESH + 1))
    for step in range(FIRST + 1, FRESH + 1):
        for key in ("lr", "value_lr"):
            assert got[step][key] == expected[step][key], (step, key)   # exactly
    # independent of the fresh run: tiny.yaml's lr 3e-3 on a cosine to 0.1 x over 8 steps, no warmup
    def lr(step):
        return 3e-4 + 0.5 * (1 + math.cos(math.pi * step / FRESH)) * 2.7e-3

    for step in range(FIRST + 1, FRESH + 1):
        assert got[step]["lr"] == pytest.approx(lr(step), rel=1e-12)
        multiplier = value_lr_multiplier(step, FRESH, start_mult=4.0, decay_fraction=0.5)
        assert got[step]["value_lr"] == pytest.approx(lr(step) * multiplier, rel=1e-12)


# ------------------------------------------------------------------------ without subprocesses

def _optimizer(run) -> torch.optim.Optimizer:
    """Two groups shaped as build_optimizer makes them: the default one and the value tables'."""
    lr, min_lr = run.train.lr, run.train.lr * run.train.min_lr_ratio
    start_mult = run.model.ultramem.value_lr_start_mult
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "default_config": True},
              {"params": [torch.nn.Parameter(torch.zeros(2))], VALUE_GROUP_KEY: start_mult}]
    for group in groups:
        group.update(max_lr=lr, min_lr=min_lr, wd_mult=1.0)
    return torch.optim.AdamW(groups, lr=lr)


def _schedule(scheduler, steps: int) -> list[tuple[float, float, float]]:
    """(lr, value-group lr, weight decay) after each of `steps` steps."""
    out = []
    for _ in range(steps):
        scheduler.step(increment=1)
        default, value = scheduler.optimizer.param_groups
        assert is_value_group(value) and not is_value_group(default)
        out.append((default["lr"], value["lr"], default["weight_decay"]))
    return out


def _config(**changes):
    """A small UltraMem config; value_lr_* go to model.ultramem, the rest to train."""
    return load_config(None, ["model.ultramem={num_keys: 4, key_dim: 8, topk: 4}",
                              "model.memory_spans=1:2", *(
                                  f"{'model.ultramem' if k.startswith('value_lr') else 'train'}.{k}={v}"
                                  for k, v in changes.items())])


def _identity(group: dict) -> tuple:
    return group["wd_mult"], group.get(VALUE_GROUP_KEY, 1.0)


def _resume(saved_state: dict, run, saved_groups: list[dict]):
    """What Checkpointer.load does: the saved param groups (nested as megatron's chained
    optimizer saves them) are re-marked, come back matched by their identity keys as megatron's
    distributed optimizer matches them (with the old run's max_lr / min_lr), then the scheduler's
    state is loaded."""
    optimizer = _optimizer(run)
    scheduler = build_scheduler(run, optimizer)
    saved = {0: {"optimizer": {"param_groups": [
        {k: v for k, v in group.items() if k != "params"} for group in saved_groups]}}}
    scheduler.mark_saved_value_groups(saved)
    by_identity = {_identity(group): group for group in saved[0]["optimizer"]["param_groups"]}
    for group in optimizer.param_groups:
        group.update(by_identity[_identity(group)])   # KeyError: megatron's load would fail
    scheduler.load_state_dict(saved_state)
    return scheduler


@pytest.mark.parametrize("changed", [
    {"max_steps": 8},
    {"max_steps": 8, "lr": 1e-3, "min_lr_ratio": 0.2, "weight_decay": 0.05, "warmup_fraction": 0.25},
    {"max_steps": 8, "value_lr_start_mult": 4.0, "value_lr_decay_fraction": 0.5},
])
def test_scheduler_state_keeps_only_the_step(changed):
    first = _config(max_steps=4, warmup_fraction=0.5)
    scheduler = build_scheduler(first, _optimizer(first))
    _schedule(scheduler, FIRST)
    state = scheduler.state_dict()
    assert state["num_steps"] == FIRST
    assert state["value_lr"] == {"total_steps": 4, "start_mult": 10.0, "decay_fraction": 1.0,
                                 "num_steps": FIRST}

    launched = _config(**{"warmup_fraction": 0.5, **changed})
    resumed = _resume(state, launched, scheduler.optimizer.param_groups)
    assert resumed.num_steps == FIRST
    fresh = build_scheduler(launched, _optimizer(launched))
    reference = _schedule(fresh, 8)
    assert _schedule(resumed, 4) == reference[FIRST:]   # exactly
    assert resumed.state_dict()["value_lr"]["total_steps"] == 8


def test_value_lr_state_from_the_checkpoint_loses_to_the_config():
    run = _config(max_steps=6)
    saved = build_scheduler(run, _optimizer(run)).state_dict()
    saved["value_lr"] = {"total_steps": 100, "start_mult": 3.0, "decay_fraction": 0.5,
                         "num_steps": 2}
    saved["num_steps"] = 2
    resumed = _resume(saved, run, _optimizer(run).param_groups)
    assert resumed.value_multiplier() == value_lr_multiplier(2, 6, 10.0, 1.0)
