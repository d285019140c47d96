"""launch/submit.py refuses job shapes the config cannot run and data the job would have to
tokenize (or prepares it first), and builds the sbatch command; slurm.sbatch's environment."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env
from tests.training.conftest import ROOT, SMALL

DATA = [item for item in SMALL if item.startswith("data.")]   # the prepared fixture


def submit(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/submit.py", "--config", "configs/tiny.yaml",
                           *args], cwd=ROOT, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=300)


def unprepared(prefix: Path) -> str:
    return f'data.blend=[{{prefix: {prefix}, source: "data/fixture/*.jsonl"}}]'


def test_dry_run_prints_the_job_shape(tmp_path):
    result = submit("--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account",
                    "proj", "--time", "04:00:00", "--cpus-per-task", "6", "--dry-run",
                    f"train.run_dir={tmp_path / 'r'}", "parallel.tensor_model_parallel_size=2",
                    *DATA)
    assert result.returncode == 0, result.stderr
    command = result.stdout
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                   "--account=proj", "--time=04:00:00", "--signal=B:USR1@300", "--requeue",
                   "--cpus-per-task=6", f"--output={tmp_path / 'r' / 'logs' / '%x-%j.out'}",
                   "launch/slurm.sbatch"):
        assert option in command, option
    assert not (tmp_path / "r").exists()   # a dry run writes nothing


def test_refuses_shapes_and_configs_before_queueing(tmp_path):
    wrong_world = submit("--tasks-per-node", "3", "parallel.tensor_model_parallel_size=2",
                         "--dry-run")
    assert wrong_world.returncode == 2
    assert "world size (3) must be a multiple" in wrong_world.stderr
    wrong_tasks = submit("--gpus-per-node", "8", "--tasks-per-node", "4", "--dry-run")
    assert wrong_tasks.returncode == 2 and "one rank per GPU" in wrong_tasks.stderr
    bad_config = submit("model.hidden_size=-1", "--dry-run")
    assert bad_config.returncode == 2 and "model.hidden_size must be >= 1" in bad_config.stderr


def test_unprepared_data_is_refused_with_the_command_or_prepared_before_sbatch(tmp_path):
    prefix = tmp_path / "data" / "fixture"
    overrides = [f"train.run_dir={tmp_path / 'r'}", *DATA[:-1], unprepared(prefix)]
    refused = submit("--tasks-per-node", "2", "--dry-run", *overrides)
    assert refused.returncode == 2
    assert f"data not prepared (data.blend[0]: {prefix})" in refused.stderr
    assert "scripts/prepare_data.py --config configs/tiny.yaml" in refused.stderr
    assert "--prepare-data" in refused.stderr
    planned = submit("--tasks-per-node", "2", "--dry-run", "--prepare-data", *overrides)
    assert planned.returncode == 0, planned.stderr
    assert f"would prepare: data.blend[0]: {prefix}" in planned.stdout
    assert not prefix.parent.exists() and not (tmp_path / "r").exists()

    bin_dir = tmp_path / "bin"   # an sbatch that only says it queued the job
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 42\n")
    (bin_dir / "sbatch").chmod(0o755)
    submitted = submit("--tasks-per-node", "2", "--prepare-data", *overrides,
                       PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert submitted.returncode == 0, submitted.stderr
    assert f"prepared {prefix}: " in submitted.stdout
    assert "Submitted batch job 42" in submitted.stdout
    assert Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def test_sbatch_script_passes_cpus_per_task_to_srun(tmp_path):
    """slurm.sbatch with stand-ins for scontrol and srun: what srun would be started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK '
                                  'OMP_NUM_THREADS=$OMP_NUM_THREADS $*"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = subprocess_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7",
                         SLURM_JOB_NODELIST="node1", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="3",
                         SLURM_SUBMIT_DIR=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(["bash", "launch/slurm.sbatch", "configs/tiny.yaml"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "srun SRUN_CPUS_PER_TASK=3 OMP_NUM_THREADS=3 --kill-on-bad-exit=1" in result.stdout
    assert "cpus per task 3" in result.stdout
