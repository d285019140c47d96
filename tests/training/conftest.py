"""Helpers to run train.py in a subprocess on a very small model."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.log_interval=1", "train.eval_interval=1000", "train.save_interval=1000",
         "train.threads=1",
         # the committed fixture, not the default corpus `make data` fetches
         "data.corpus=null", "data.subset_weights={}",
         'data.blend=[{prefix: data/built/fixture, source: "data/fixture/*.jsonl"}]']


def train(run_dir: Path, *overrides: str, check: bool = True, python: list[str] | None = None,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py (or the given python command) from the repo root in its own session, the
    way a scheduler runs a job: output goes to files, and whatever the run leaves behind (the
    checkpoint writer's helper processes outlive a SIGKILLed parent) is killed with the session."""
    command = (python or [sys.executable, "train.py"]) + [
        "--config", "configs/tiny.yaml", *SMALL, f"train.run_dir={run_dir}", *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = run_dir / "stdout.log", run_dir / "stderr.log"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err,
                                   env=subprocess_env(**(env or {})),
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=600)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = subprocess.CompletedProcess(command, returncode, out_path.read_text(),
                                         err_path.read_text())
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last record of a step wins)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def torchrun(processes: int) -> list[str]:
    """train.py under torchrun with this many local processes (pass as train(python=...))."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(processes), "train.py"]


def grad_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records}


def resume_from(source: Path, target: Path, step: int) -> None:
    """A run directory holding only `source`'s checkpoint at `step`."""
    name = f"step_{step:07d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / "latest").write_text(name)
