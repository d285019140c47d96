"""Two data-parallel processes under torchrun (gloo) train like one process with the same
global batch."""

import sys

import pytest

from .conftest import losses, train

pytestmark = pytest.mark.slow


def test_two_data_parallel_ranks_match_one_process(tmp_path):
    steps = ["train.max_steps=4", "train.eval_interval=4"]
    train(tmp_path / "one", *steps)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "train.py"]
    result = train(tmp_path / "two", *steps, python=torchrun, env={"OMP_NUM_THREADS": "1"})
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:  # gradient accumulation vs all-reduce: equal up to float reordering
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (step, one, two)
    assert "final validation loss" in result.stdout
