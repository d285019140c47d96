"""launch/submit.py + launch/slurm.sbatch on a real single-node Slurm: 2 CPU ranks (gloo) train
the tiny config; then a run warned before its time limit (USR1) and one preempted (SIGTERM) both
requeue, resume and end with the uninterrupted run's losses."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.launch.processes import last_step, wait_for_step
from tests.launch.slurm_cluster import SlurmCluster
from tests.training.conftest import ROOT, SMALL, losses

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=24", "train.save_interval=1000"]


def submit(slurm: SlurmCluster, run_dir: Path, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "launch/submit.py", "--config", "configs/tiny.yaml",
         "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:30:00", *SMALL, *STEPS,
         f"train.run_dir={run_dir}", *extra],
        cwd=ROOT, env=subprocess_env(SLURM_CONF=str(slurm.conf), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("Submitted batch job ")[1].split()[0]


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"{run_dir.name}-{job_id}.out").read_text(errors="replace")


def job_state(slurm: SlurmCluster, run_dir: Path, job_id: str) -> str:
    """What a failure message needs: the job, the node, and the tails of the job's log and
    slurmd's."""
    node = slurm.run("sinfo", "-h", "-N", "-o", "%N %t %E", check=False).stdout.strip()
    log = run_dir / "logs" / f"{run_dir.name}-{job_id}.out"
    slurmd = slurm.root / "slurmd.log"
    return (f"job: {slurm.job(job_id)}\nnode: {node}\n"
            f"--- job log ---\n{log.read_text(errors='replace')[-3000:] if log.is_file() else ''}"
            f"\n--- slurmd.log ---\n{slurmd.read_text(errors='replace')[-2000:]}")


def wait_for_job_step(slurm: SlurmCluster, run_dir: Path, job_id: str, step: int) -> None:
    """Until the job's run logged `step`; fails at once if the job ended on the way."""
    def ended():
        state = slurm.job(job_id).get("JobState")
        return f"job {job_id} is {state}" if state not in {"RUNNING", "PENDING"} else None
    wait_for_step(run_dir, step, ended=ended, describe=lambda: job_state(slurm, run_dir, job_id))


def requeued_and_released(slurm: SlurmCluster, run_dir: Path, job_id: str,
                          restarts: int) -> None:
    """Wait until the job is back in the queue and its previous start has ended on the node,
    then let it start: Slurm holds a requeued job about two minutes (BeginTime) before it may run
    again, which this test cannot afford. The hold also keeps away a race that releasing at once
    ran into in CI: slurmd refused the new start 0.7 s after the previous one ended ("Job 2
    already killed, do not launch batch job", in the same second; slurmd remembers killed jobs by
    time) and the job FAILED. So: the previous start's batch step done in slurmd.log, then two
    seconds, then release."""
    info = slurm.wait_for(job_id, {"PENDING"}, timeout=120)
    assert info["Restarts"] == str(restarts), job_state(slurm, run_dir, job_id)
    done = f"[{job_id}.batch] done with job"
    deadline = time.monotonic() + 60
    while (slurm.root / "slurmd.log").read_text(errors="replace").count(done) < restarts:
        assert time.monotonic() < deadline, job_state(slurm, run_dir, job_id)
        time.sleep(0.2)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm_runs") / "straight"
    job_id = submit(slurm, run_dir)
    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    assert info["JobState"] == "COMPLETED", job_log(run_dir, job_id)[-3000:]
    return run_dir, job_id


def test_two_ranks_train_under_slurm(uninterrupted):
    run_dir, job_id = uninterrupted
    log = job_log(run_dir, job_id)
    assert "2 ranks on" in log and f"job {job_id} restart 0" in log
    assert "cpus per task 1," in log   # SRUN_CPUS_PER_TASK, from --cpus-per-task
    assert "0: final validation loss" in log and "at step 24" in log
    assert sorted(losses(run_dir)) == list(range(1, 25))
    assert (run_dir / "checkpoints" / "step_0000024").is_dir()
    (submission,) = (run_dir / "submissions").iterdir()   # the job ran the snapshot
    assert f"code {submission / 'code'}" in log
    assert (submission / "code" / "train.py").is_file() and (submission / "config.yaml").is_file()


def test_time_limit_warning_and_preemption_requeue_and_resume(slurm, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    run_dir = tmp_path / "interrupted"
    job_id = submit(slurm, run_dir)

    # 1. The time-limit warning (what --signal=B:USR1@300 sends the batch script).
    wait_for_job_step(slurm, run_dir, job_id, 3)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    requeued_and_released(slurm, run_dir, job_id, restarts=1)
    first_stop = last_step(run_dir)
    assert 3 <= first_stop < 21

    # 2. Preemption: Slurm sends SIGTERM to every process of the job and requeues it.
    wait_for_job_step(slurm, run_dir, job_id, first_stop + 3)
    slurm.run("scontrol", "requeue", job_id)
    requeued_and_released(slurm, run_dir, job_id, restarts=2)

    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert log.count("0: stopped by SIGUSR1 at step") == 1
    assert log.count("0: stopped by SIGTERM at step") == 1
    assert "ranks checkpointed; requeueing job" in log
    assert log.count("0: resumed from") == 2
    ports = re.findall(r"restart (\d+): .* rendezvous [^:]+:(\d+),", log)
    assert [r for r, _ in ports] == ["0", "1", "2"], ports
    assert len({port for _, port in ports}) == 3, ports   # each start rendezvous on a new port
    want, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, 25))
    assert all(got[step] == want[step] for step in got), (got, want)
