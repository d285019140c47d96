"""Launch set-up on real clusters: each rank's GPU, the clean-up at every orderly exit of
train.py (never after a lost rank), and a multi-rank job refusing data it would have to
tokenize."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import train
from tests.conftest import subprocess_env
from tests.parallel.test_parallel_training import torchrun
from tests.training.conftest import ROOT, SMALL
from ultramem_megatron import megatron_compat
from ultramem_megatron.config import ConfigError
from ultramem_megatron.data.prepare import DataPrepError
from ultramem_megatron.training import loop, preemption


@pytest.mark.parametrize("visible, local_rank, device", [(8, 5, 5), (1, 5, 0), (4, 6, 2)])
def test_rank_takes_local_rank_modulo_the_gpus_it_sees(monkeypatch, visible, local_rank, device):
    """Simulated CUDA: torchrun / --gpus-per-node (every GPU visible) and Slurm binding one GPU
    per task (device_count() == 1 while LOCAL_RANK goes up to 7)."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kwargs: calls.setdefault("backend", backend))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_PORT", "29500")
    megatron_compat._init_process_group(timeout_s=60)
    assert calls == {"device": device, "backend": "nccl"}


class FakeTrainer:
    """Stands in for Trainer: run() returns or raises `outcome`."""

    outcome = None

    def __init__(self, run):
        self.state = SimpleNamespace(step=3)

    def run(self, stop):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.fixture
def fake_training(monkeypatch):
    destroyed = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(loop, "Trainer", FakeTrainer)
    monkeypatch.setattr(megatron_compat, "destroy_distributed", lambda: destroyed.append(True))
    monkeypatch.setattr(preemption.StopRequest, "install", lambda self: self)
    monkeypatch.setattr(preemption, "exit_for_lost_rank",
                        lambda err, step: (_ for _ in ()).throw(SystemExit(3)))
    return destroyed


@pytest.mark.parametrize("outcome, code, says", [
    ({"step": 6, "val_loss": 2.5}, 0, "final validation loss 2.5000 at step 6"),
    ({}, 0, "nothing to do"),
    ({"step": 3, "stopped_by": "SIGTERM"}, 0, "stopped by SIGTERM at step 3"),
    (ConfigError("train.global_batch_size (6) must be a multiple"), 2, "error: train.global"),
    (DataPrepError("data.blend[0]: no source"), 2, "error: data.blend[0]: no source"),
])
def test_every_orderly_exit_destroys_the_process_group(fake_training, capsys, outcome, code,
                                                       says):
    FakeTrainer.outcome = outcome
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml")]) == code
    assert fake_training == [True]
    assert says in capsys.readouterr()[0 if code == 0 else 1]


def test_lost_rank_exits_at_once_without_clean_up(fake_training):
    FakeTrainer.outcome = RuntimeError("[gloo] Connection reset by peer")
    with pytest.raises(SystemExit) as exited:
        train.main(["--config", str(ROOT / "configs" / "tiny.yaml")])
    assert exited.value.code == 3 and fake_training == []


CHECK_DESTROYED = """
import sys
import torch.distributed as dist
from megatron.core import parallel_state
import train
code = train.main(sys.argv[1:])
print("left initialized" if dist.is_initialized() or parallel_state.model_parallel_is_initialized()
      else "destroyed", code)
"""


@pytest.mark.slow
def test_error_after_init_really_destroys_the_process_group(tmp_path):
    """A real Trainer: the data error comes after the process group and megatron's groups exist."""
    blend = f'data.blend=[{{prefix: {tmp_path / "none"}}}]'   # no .bin/.idx and no source
    result = subprocess.run([sys.executable, "-c", CHECK_DESTROYED, "--config",
                             "configs/tiny.yaml", *SMALL, blend, f"train.run_dir={tmp_path}"],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert "has no source to prepare them from" in result.stderr, result.stderr[-2000:]
    assert result.stdout.strip().endswith("destroyed 2"), result.stdout[-2000:]


@pytest.mark.slow
def test_two_ranks_refuse_unprepared_data_before_starting(tmp_path):
    prefix = tmp_path / "fixture"
    blend = f'data.blend=[{{prefix: {prefix}, source: "data/fixture/*.jsonl"}}]'
    start = time.monotonic()
    result = subprocess.run(torchrun(2) + ["--config", "configs/tiny.yaml", *SMALL, blend,
                                           f"train.run_dir={tmp_path / 'run'}"],
                            cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 2" in output, output[-3000:]
    assert f"error: data not prepared (data.blend[0]: {prefix}), and a job of 2 ranks" in output
    assert "scripts/prepare_data.py --config configs/tiny.yaml" in output
    assert not prefix.with_suffix(".bin").exists() and not (tmp_path / "run").exists()
    assert elapsed < 60, elapsed
