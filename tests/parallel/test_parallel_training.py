"""train.py under torchrun at several (TP, P, mode) layouts reproduces the single-process loss
trace, and a checkpoint saved at (TP, P) = (2, 2) resumes at (1, 1) and at (1, 4) on the trace of
a run that never changed layout."""

import json
from pathlib import Path

import pytest

from tests.training.conftest import grad_norms, losses, resume_from, torchrun, train

pytestmark = pytest.mark.slow

# Four ranks at most: one micro-batch of one sequence per rank and step at data-parallel size 4
# (so the query BatchNorm and the key balance see one sequence at every layout). The key balance
# is off in the full traces: with it on, TP's reordered sums flip one near-tied top-m choice at
# step 4 (measured at TP=2: 2.3e-5 relative at step 4, 1.0e-6 at step 5, the same rows hit; with it
# off all five steps agree within 5e-8). test_key_balance_reproduces_first_steps keeps it covered.
STEPS = ["train.max_steps=6", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.save_interval=3", "train.eval_interval=1000", "model.ultramem.key_balance_weight=0"]
BALANCE = "model.ultramem.key_balance_weight=0.1"


def parallel(tp: int, mp: int, mode: str, sequence_parallel: bool = False) -> list[str]:
    return [f"parallel.tensor_model_parallel_size={tp}", f"parallel.memory_parallel_size={mp}",
            f"parallel.memory_parallel_mode={mode}",
            f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]


def assert_same_trace(got: dict, want: dict, steps: list[int], run_dir: Path) -> None:
    assert sorted(got) == steps, got
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got, want)
        # Each shard counted once in the clipping norm (TP itself reorders sums: ~1e-5 relative).
        assert grad_norms(run_dir)[step] == pytest.approx(grad_norms(REFERENCE[0])[step],
                                                          rel=1e-3), step


REFERENCE: list[Path] = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """One process, six steps, never interrupted."""
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir, *STEPS)
    REFERENCE[:] = [run_dir]
    return losses(run_dir)


@pytest.mark.parametrize("processes, layout", [
    (2, (2, 1, "value_dim", False)),    # tensor-style
    (2, (2, 1, "value_dim", True)),     # tensor-style, with sequence parallelism
    (2, (1, 2, "value_dim", False)),    # expert-style, value-dimension shards
    (2, (1, 2, "row", False)),          # expert-style, row shards
    (4, (2, 2, "row", True)),
], ids=["tp2", "tp2-sp", "p2-value", "p2-row", "tp2-p2-row-sp"])
def test_layout_reproduces_single_process_trace(reference, tmp_path, processes, layout):
    train(tmp_path, *STEPS, "train.exit_after_steps=5", *parallel(*layout),
          python=torchrun(processes), env={"OMP_NUM_THREADS": "1"})
    assert_same_trace(losses(tmp_path), reference, [1, 2, 3, 4, 5], tmp_path)


@pytest.fixture(scope="module")
def balanced_reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    run_dir = tmp_path_factory.mktemp("single-balance")
    train(run_dir, *STEPS, BALANCE, "train.exit_after_steps=3")
    return run_dir, losses(run_dir)


def test_key_balance_reproduces_first_steps(balanced_reference, tmp_path):
    """Query BatchNorm and key balance over the whole sequence under TP=2 with sequence
    parallelism (one collective of statistics): the forward and two updates as one device."""
    reference_dir, reference = balanced_reference
    train(tmp_path, *STEPS, BALANCE, "train.exit_after_steps=3", *parallel(2, 1, "value_dim", True),
          python=torchrun(2), env={"OMP_NUM_THREADS": "1"})
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(reference[step], rel=1e-6), (step, got, reference)
        assert grad_norms(tmp_path)[step] == pytest.approx(grad_norms(reference_dir)[step],
                                                           rel=1e-4), step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0.1 for r in records)   # the balance term is in the loss


def test_checkpoint_reshards_across_layouts(reference, tmp_path):
    saved = tmp_path / "tp2-p2"
    train(saved, *STEPS, "train.exit_after_steps=5", *parallel(2, 2, "value_dim"),
          python=torchrun(4), env={"OMP_NUM_THREADS": "1"})
    assert_same_trace(losses(saved), reference, [1, 2, 3, 4, 5], saved)

    single = tmp_path / "resumed-1x1"
    resume_from(saved, single, 3)
    result = train(single, *STEPS)
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    assert_same_trace(losses(single), reference, [4, 5, 6], single)

    wide = tmp_path / "resumed-1x4-row"
    resume_from(saved, wide, 3)
    train(wide, *STEPS, *parallel(1, 4, "row"), python=torchrun(4), env={"OMP_NUM_THREADS": "1"})
    assert_same_trace(losses(wide), reference, [4, 5, 6], wide)
