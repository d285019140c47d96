"""Under torchrun (launch/torchrun.sh; no Slurm): a stop signal to one rank checkpoints every rank at the same step and
the relaunch ends as an uninterrupted run; a killed or frozen rank makes the others exit with a
clear message within the bound."""

import os
import signal
import sys
import time

import psutil
import pytest

from tests.launch.processes import launched, rank_pids, wait_for_step
from tests.parallel.test_parallel_training import torchrun
from tests.training.conftest import SMALL, losses, train

pytestmark = pytest.mark.slow
# Async saves every 2 steps: the stop comes with a periodic save in flight or just committed.
STEPS = ["train.max_steps=14", "train.save_interval=2"]
ENV = {"OMP_NUM_THREADS": "1"}


def test_stop_signal_to_one_rank_checkpoints_all_and_resume_matches(tmp_path):
    reference = tmp_path / "reference"
    train(reference, *STEPS, python=torchrun(2), env=ENV)

    interrupted = tmp_path / "interrupted"
    command = ["bash", "launch/torchrun.sh", "2", "configs/tiny.yaml", *SMALL, *STEPS,
               f"train.run_dir={interrupted}"]
    interrupted.mkdir()
    with launched(command, interrupted / "first.log", PYTHON=sys.executable, **ENV) as process:
        wait_for_step(interrupted, 3, process)
        os.kill(rank_pids(process.pid)[1], signal.SIGUSR1)   # rank 1 only
        assert process.wait(timeout=120) == 0
    output = (interrupted / "first.log").read_text()
    assert "stopped by SIGUSR1 at step" in output
    stopped_at = int(output.split("stopped by SIGUSR1 at step ")[1].split()[0])
    assert 3 <= stopped_at < 14
    assert (interrupted / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    # every pending save finished before exit: the stop's checkpoint is marked, none half-written
    assert (interrupted / "checkpoints" / "latest").read_text() == f"step_{stopped_at:07d}"
    assert not list((interrupted / "checkpoints").glob("*.tmp"))

    resumed = train(interrupted, *STEPS, python=torchrun(2), env=ENV)
    assert f"resumed from {interrupted / 'checkpoints' / f'step_{stopped_at:07d}'}" in resumed.stdout
    want, got = losses(reference), losses(interrupted)
    assert sorted(got) == list(range(1, 15))
    assert all(got[step] == want[step] for step in got), (got, want)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_lost_rank_makes_the_others_exit_within_the_bound(tmp_path, how):
    timeout_s = 10
    run_dir = tmp_path / how
    run_dir.mkdir()
    command = torchrun(2) + ["--config", "configs/tiny.yaml", *SMALL, "train.max_steps=10000",
                             f"train.collective_timeout_s={timeout_s}", f"train.run_dir={run_dir}"]
    with launched(command, run_dir / "out.log", **ENV) as process:
        wait_for_step(run_dir, 2, process)
        survivor, victim = rank_pids(process.pid)
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        while psutil.pid_exists(survivor) and psutil.Process(survivor).status() != "zombie" \
                and time.monotonic() - start < 120:
            time.sleep(0.2)
        waited = time.monotonic() - start
        if how == "frozen":
            os.kill(victim, signal.SIGKILL)   # else torchrun waits 30 s before it does so
        process.wait(timeout=120)
    output = (run_dir / "out.log").read_text(errors="replace")
    # A dead peer is noticed at once (its sockets close); a frozen one after the timeout.
    bound = 15 if how == "killed" else timeout_s + 15
    assert waited < bound, (waited, output[-3000:])
    assert "error: rank 0 lost contact with another rank during step" in output
    assert process.returncode != 0
