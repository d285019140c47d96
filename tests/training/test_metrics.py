"""metrics.jsonl fields, and the TensorBoard and (offline) wandb sinks when enabled."""

import json

import pytest

from .conftest import train

pytestmark = pytest.mark.slow


def test_metrics_jsonl_tensorboard_and_offline_wandb(tmp_path):
    result = train(tmp_path, "train.max_steps=4", "train.log_interval=2", "train.eval_interval=4",
                   "train.tensorboard=true", "train.wandb=true",
                   env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    expected = {"step", "loss", "aux_loss", "grad_norm", "lr", "value_lr", "tokens_per_s", "mfu",
                "value_rows_hit"}
    assert expected <= set(records[0]) and "val_loss" not in records[0]
    assert expected | {"val_loss"} <= set(records[1])
    first, last = records
    assert first["value_lr"] > first["lr"] > 0        # mid-run the value-LR multiplier is > 1
    assert last["value_lr"] == last["lr"]             # and 1 at the end of its decay
    assert 0 < last["value_rows_hit"] <= 1 and last["tokens_per_s"] > 0 and last["mfu"] > 0
    assert "step      4 | loss" in result.stdout
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
