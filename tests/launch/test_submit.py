"""launch/submit.py refuses job shapes the config cannot run, and builds the sbatch command."""

import subprocess
import sys

from tests.conftest import subprocess_env
from tests.training.conftest import ROOT


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/submit.py", "--config", "configs/tiny.yaml",
                           *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_the_job_shape(tmp_path):
    result = submit("--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account",
                    "proj", "--time", "04:00:00", "--dry-run", f"train.run_dir={tmp_path / 'r'}",
                    "parallel.tensor_model_parallel_size=2")
    assert result.returncode == 0, result.stderr
    command = result.stdout
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                   "--account=proj", "--time=04:00:00", "--signal=B:USR1@300", "--requeue",
                   f"--output={tmp_path / 'r' / 'logs' / '%x-%j.out'}", "launch/slurm.sbatch"):
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
