"""launch/prepare_data.sbatch on a real single-node Slurm: an array of 3 tasks and the dependent
merge write the local run's .bin/.idx byte for byte; after a lost task the merge fails naming
it, and rerunning just that task completes the same output."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.launch.slurm_cluster import SlurmCluster
from tests.training.conftest import ROOT

pytestmark = pytest.mark.slow
FIXTURE = ROOT / "data" / "fixture"
SUBSETS = [f"--subset=bible={FIXTURE}/kjv.jsonl", f"--subset=plays={FIXTURE}/shakespeare.jsonl"]
SPLIT = ["--split-size", "0.05"]   # MiB: about 20 byte ranges over the two files
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def sbatch(slurm: SlurmCluster, cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                            env=subprocess_env(SLURM_CONF=str(slurm.conf), CPUS_PER_TASK="1",
                                               ULTRAMEM_ROOT=str(ROOT),
                                               ULTRAMEM_PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr
    return result.stdout


def prepared(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin")) + sorted(out.glob("*.idx"))}


def merge_log(cwd: Path, job_id: str) -> str:
    return (cwd / f"slurm-prepare-data-{job_id}.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepare_local") / "out"
    subprocess.run([sys.executable, "scripts/prepare_data.py", *SUBSETS, "--output-dir",
                    str(out)], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    return out


def test_array_and_merge_equal_the_local_run(slurm, local, tmp_path):
    out = tmp_path / "out"
    printed = sbatch(slurm, tmp_path, str(ROOT / "launch" / "prepare_data.sbatch"), "3",
                     *SUBSETS, "--output-dir", str(out), *SPLIT)
    array, merge = re.search(r"array job (\d+) \(3 tasks\) and merge job (\d+)", printed).groups()
    info = slurm.wait_for(merge, ENDED, timeout=300)
    assert info["JobState"] == "COMPLETED", merge_log(tmp_path, merge)
    assert prepared(out) == prepared(local) and len(prepared(out)) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(len(entry["shards"]) for entry in manifest["subsets"].values()) > 6
    task_logs = sorted(tmp_path.glob("slurm-prepare-data-*.out"))
    assert len(task_logs) == 4   # 3 tasks and the merge, each its own job id
    assert sum("task 2 of 3: its shards are written" in p.read_text() for p in task_logs) == 1


def test_a_lost_task_is_named_by_the_merge_and_rerun_alone(slurm, local, tmp_path):
    out, script = tmp_path / "out", str(ROOT / "launch" / "prepare_data.sbatch")
    args = ["--task-count", "3", *SUBSETS, "--output-dir", str(out), *SPLIT]
    array = sbatch(slurm, tmp_path, "sbatch", "--parsable", "--array=0,2", script, *args)
    merge = sbatch(slurm, tmp_path, "sbatch", "--parsable",
                   f"--dependency=afterany:{array.strip()}", script, *args).strip()
    assert slurm.wait_for(merge, ENDED, timeout=300)["JobState"] == "FAILED"
    assert "task(s) 1 of 3 are not written yet" in merge_log(tmp_path, merge)
    rerun = sbatch(slurm, tmp_path, "sbatch", "--parsable", "--array=1", script, *args)
    merge = sbatch(slurm, tmp_path, "sbatch", "--parsable",
                   f"--dependency=afterok:{rerun.strip()}", script, *args).strip()
    info = slurm.wait_for(merge, ENDED, timeout=300)
    assert info["JobState"] == "COMPLETED", merge_log(tmp_path, merge)
    assert prepared(out) == prepared(local)
