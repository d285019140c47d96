"""Memory parameters replicated over TP stay bitwise identical across TP ranks (TP = 2, gloo)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env
from tests.training.conftest import ROOT, SMALL
from ultramem_megatron.config import load_config
from ultramem_megatron.data.prepare import ensure_prepared
from ultramem_megatron.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


def _run(out: Path, family: str, sync: bool) -> tuple[dict, dict]:
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "tests/parallel/tp_sync_worker.py", str(out), family,
               "sync" if sync else "nosync"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


@pytest.mark.parametrize("family", ["ultramem", "pkm"])
def test_tp_replicated_memory_params_stay_identical(family, tmp_path):
    data = load_config(ROOT / "configs/tiny.yaml", SMALL).data
    ensure_prepared(data, load_tokenizer(data.tokenizer))   # one process prepares; ranks read
    first, second = _run(tmp_path / "sync", family, sync=True)
    assert len(first) >= 3 and first.keys() == second.keys()   # query proj, keys, norms, ...
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # Control: without the average the same perturbation makes the replicas drift apart.
    first, second = _run(tmp_path / "nosync", family, sync=False)
    assert any(not torch.equal(first[name], second[name]) for name in first)
