"""Finding the ranks of a launched job and waiting for its training progress."""

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from tests.conftest import subprocess_env
from tests.training.conftest import ROOT


def _rank(process: psutil.Process):
    """The RANK of a train.py process (None for anything else, torchrun included)."""
    if not any(part.endswith("train.py") for part in process.cmdline()):
        return None
    return process.environ().get("RANK")


def rank_pids(launcher_pid: int, world_size: int = 2, timeout: float = 60) -> list[int]:
    """PIDs of the train.py processes below launcher_pid, ordered by their RANK variable. Not
    their forked checkpoint writers, which have the same command line and environment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                rank = _rank(child)
                if rank is not None and _rank(child.parent()) is None:
                    ranks[int(rank)] = child.pid
            except psutil.Error:
                continue
        if len(ranks) == world_size:
            return [ranks[r] for r in range(world_size)]
        time.sleep(0.2)
    raise AssertionError(f"no {world_size} ranks below pid {launcher_pid}")


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for_step(run_dir: Path, step: int, process=None, timeout: float = 300,
                  ended=None, describe=None) -> None:
    """Until run_dir/metrics.jsonl has `step`. Fails early if `process` ended or `ended()` says
    why the run cannot get there; `describe()` adds the run's state to any failure."""
    deadline = time.monotonic() + timeout
    reason = None
    while time.monotonic() < deadline:
        if last_step(run_dir) >= step:
            return
        if process is not None and process.poll() is not None:
            reason = f"the run ended ({process.returncode}) before step {step}"
        elif ended is not None:
            reason = ended()
        if reason:
            break
        time.sleep(0.2)
    reason = reason or f"{run_dir} did not reach step {step} in {timeout} s"
    raise AssertionError(f"{reason} (last step {last_step(run_dir)})"
                         + (f"\n{describe()}" if describe is not None else ""))


@contextmanager
def launched(command: list[str], log: Path, **env: str):
    """Popen in its own session from the repo root, output to log; the whole session is killed
    on the way out (whatever the run left behind)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=subprocess_env(**env), start_new_session=True)
        try:
            yield process
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
