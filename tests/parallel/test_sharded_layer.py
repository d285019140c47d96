"""Sharded UltraMem, UltraMemV2 and Memory+ layers under torchrun (gloo, 2 and 4 processes) equal
the single-device layer:
outputs, input and parameter gradients within 1e-5, the same initial weights, and 1/(TP*P) of
the value table per rank. The comparison runs inside layer_worker.py, once per layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

from .layer_worker import LAYOUTS, TOL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layer_matches_single_device(world, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), "tests/parallel/layer_worker.py", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [tuple(r["layout"]) for r in report] == LAYOUTS[world]
        for record in report:
            assert record["value_fraction"] == record["expected_fraction"]
            assert len(record["errors"]) >= 11  # output, input grad, init, every parameter
            assert max(record["errors"].values()) <= TOL, record
