"""Exact resume: straight runs against interrupted ones, including a kill during a save."""

import sys

import pytest

from .conftest import losses, train

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, f"train.max_steps={STEPS}")
    return losses(run_dir)


def test_stop_and_resume_gives_bitwise_identical_losses(tmp_path, straight):
    train(tmp_path, f"train.max_steps={STEPS}", f"train.exit_after_steps={STEPS // 2}")
    assert sorted(losses(tmp_path)) == list(range(1, STEPS // 2 + 1))
    resumed = train(tmp_path, f"train.max_steps={STEPS}")
    assert f"at step {STEPS // 2}" in resumed.stdout
    assert losses(tmp_path) == straight  # floats compared exactly


# Runs train.py with dist_checkpointing.save replaced: the save of step 4 writes its files, then
# the process is SIGKILLed before the checkpoint is renamed into place and marked latest. A file
# with a __main__ guard, because the checkpoint writer's spawned helpers re-import the main module.
KILL_DURING_SAVE = """
import os, signal, sys, runpy
if __name__ == "__main__":
    from megatron.core import dist_checkpointing
    original = dist_checkpointing.save
    def save(state, directory, **kwargs):
        original(state, directory, **kwargs)
        if "step_0000004" in str(directory):
            os.kill(os.getpid(), signal.SIGKILL)
    dist_checkpointing.save = save
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path, straight):
    wrapper = tmp_path / "kill_during_save.py"
    wrapper.write_text(KILL_DURING_SAVE)
    run_dir = tmp_path / "run"
    killed = train(run_dir, f"train.max_steps={STEPS}", "train.save_interval=2", check=False,
                   python=[sys.executable, str(wrapper)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002"
    assert (checkpoints / "step_0000004.tmp").is_dir()
    resumed = train(run_dir, f"train.max_steps={STEPS}", "train.save_interval=2")
    assert "at step 2" in resumed.stdout
    assert not (checkpoints / "step_0000004.tmp").exists()
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:07d}"
    kept = sorted(p.name for p in checkpoints.glob("step_*"))
    assert kept == ["step_0000004", "step_0000006"]  # keep_last = 2
    assert losses(run_dir) == straight
