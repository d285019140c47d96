"""Exact resume: straight runs against interrupted ones, including a kill during a save; saves
written asynchronously (the default) and synchronously give the same run."""

import sys

import pytest

from .conftest import losses, train

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference, saving synchronously (train.async_save=false)."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, f"train.max_steps={STEPS}", "train.async_save=false")
    return losses(run_dir)


def assert_latest_is_complete(checkpoints, name: str) -> None:
    assert (checkpoints / "latest").read_text() == name
    files = {path.name for path in (checkpoints / name).iterdir()}
    assert {"metadata.json", ".metadata", "run_config.yaml"} <= files, files
    assert any(file.endswith(".distcp") for file in files), files
    assert not list(checkpoints.glob("*.tmp"))


def test_stop_and_resume_gives_bitwise_identical_losses(tmp_path, straight):
    train(tmp_path, f"train.max_steps={STEPS}", f"train.exit_after_steps={STEPS // 2}")
    assert sorted(losses(tmp_path)) == list(range(1, STEPS // 2 + 1))
    assert_latest_is_complete(tmp_path / "checkpoints", f"step_{STEPS // 2:07d}")  # async save
    resumed = train(tmp_path, f"train.max_steps={STEPS}")
    assert f"at step {STEPS // 2}" in resumed.stdout
    assert losses(tmp_path) == straight  # floats compared exactly
    assert_latest_is_complete(tmp_path / "checkpoints", f"step_{STEPS:07d}")


# Runs train.py with the checkpoint's commit replaced: the async save of step 4 has written every
# file (step_0000004.tmp is complete), and the process is SIGKILLed in the save's finalize step,
# before the directory is renamed into place and marked latest. A file with a __main__ guard,
# because the checkpoint writer's spawned helpers re-import the main module.
KILL_DURING_SAVE = """
import os, signal, sys, runpy
if __name__ == "__main__":
    from ultramem_megatron.training.checkpoint import Checkpointer
    original = Checkpointer._commit
    def commit(self, name):
        if name == "step_0000004":
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, name)
    Checkpointer._commit = commit
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
    assert 5 in losses(run_dir)   # step 5 trained while step 4's files were being written
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002"
    assert (checkpoints / "step_0000004.tmp" / "metadata.json").is_file()   # written, uncommitted
    assert not (checkpoints / "step_0000004").exists()
    resumed = train(run_dir, f"train.max_steps={STEPS}", "train.save_interval=2")
    assert "at step 2" in resumed.stdout
    assert not (checkpoints / "step_0000004.tmp").exists()
    assert_latest_is_complete(checkpoints, f"step_{STEPS:07d}")
    kept = sorted(p.name for p in checkpoints.glob("step_*"))
    assert kept == ["step_0000004", "step_0000006"]  # keep_last = 2
    assert losses(run_dir) == straight
