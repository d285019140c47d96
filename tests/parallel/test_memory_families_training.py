"""UltraMemV2 and Memory+ under train.py: a stopped and resumed run repeats the straight one
bit for bit; TP = 2 with sequence parallelism, P = 2 row shards and pipeline stages (each with a
copy of the shared table) reproduce the one-process loss trace; their checkpoints resume at one
process on it."""

import pytest

from tests.training.conftest import grad_norms, losses, resume_from, torchrun, train

pytestmark = pytest.mark.slow

FAMILIES = {  # UltraMemV2 in every block; Memory+ beside the FFN of two blocks (i:i spans)
    "ultramem_v2": ["model.family=ultramem_v2", "model.memory_spans=all"],
    "memory_plus": ["model.family=memory_plus", "model.memory_spans=1:1/3:3"],
}
STEPS = ["train.max_steps=6", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.save_interval=3", "train.eval_interval=1000"]
TORCHRUN = {"env": {"OMP_NUM_THREADS": "1"}}


def layout(tp: int, mp: int, mode: str, sequence_parallel: bool) -> list[str]:
    return [f"parallel.tensor_model_parallel_size={tp}", f"parallel.memory_parallel_size={mp}",
            f"parallel.memory_parallel_mode={mode}",
            f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def straight(request, tmp_path_factory):
    """(family, its one-process run directory, six steps never interrupted)."""
    run_dir = tmp_path_factory.mktemp(request.param)
    train(run_dir, *FAMILIES[request.param], *STEPS)
    return request.param, run_dir


def assert_same_trace(run_dir, reference_dir, steps: list[int], rel: float = 1e-5,
                      norm_rel: float = 1e-3, norm_steps: int = 99) -> None:
    """Losses at `steps` within rel; grad norms within norm_rel at those up to norm_steps."""
    got, want = losses(run_dir), losses(reference_dir)
    assert set(steps) <= set(got), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rel, abs=rel), (step, got, want)
        if step <= norm_steps:
            assert grad_norms(run_dir)[step] == pytest.approx(grad_norms(reference_dir)[step],
                                                              rel=norm_rel), step


# Memory+'s grad norm from step 4 on moves with the last bits of earlier gradients (see the
# row-shard note below): measured in CI, step 4's norm differed from one process by 1.5e-3 under
# TP = 2 + SP and by 2.5e-5 under PP = 2 while every loss of steps 1-4 stayed within tolerance.
# Its grad norms are compared up to step 3; its losses at every step.
NORM_STEPS = {"ultramem_v2": 99, "memory_plus": 3}


def test_stop_and_resume_is_bitwise(straight, tmp_path):
    family, reference = straight
    train(tmp_path, *FAMILIES[family], *STEPS, "train.exit_after_steps=3")
    resumed = train(tmp_path, *FAMILIES[family], *STEPS)
    assert "at step 3" in resumed.stdout
    assert losses(tmp_path) == losses(reference)   # floats compared exactly


def test_tensor_parallel_with_sequence_parallel(straight, tmp_path):
    family, reference = straight
    train(tmp_path, *FAMILIES[family], *STEPS, "train.exit_after_steps=4",
          *layout(2, 1, "value_dim", True), python=torchrun(2), **TORCHRUN)
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert_same_trace(tmp_path, reference, [1, 2, 3, 4], norm_steps=NORM_STEPS[family])


# Memory+ with row shards: steps 1 and 2 agree within 3e-8 and the grad norms of steps 1-2
# within 2e-5, then the trace drifts (losses: 3e-5 relative at step 3, 2e-4 at step 5; grad
# norms: 1.3e-3 at step 3, 5 % at step 4). A gradient that differs in its last bits moves a
# weight by up to the whole learning rate in Adam's first steps when it is near Adam's eps:
# after step 1 the weights of one process and of P = 2 differ by up to 1.7e-5 with value_dim
# shards and 9e-5 with row shards (measured from the two step-1 checkpoints), and Memory+'s
# softmax over qk-normed product-key scores amplifies that most. The same row-mode layers'
# gradients equal one device's within 1e-6 relative (tests/parallel/layer_worker.py; also
# checked for two layers on the one shared table), so the drift is summation order, not a wrong
# reduction: a wrong one shows at step 2, which is checked tightly.
ROW_TOLERANCE = {"ultramem_v2": (1e-5, 1e-3), "memory_plus": (1e-3, None)}


def test_row_shards_and_resharded_resume(straight, tmp_path):
    family, reference = straight
    rel, norm_rel = ROW_TOLERANCE[family]
    sharded = tmp_path / "p2-row"
    train(sharded, *FAMILIES[family], *STEPS, "train.exit_after_steps=4",
          *layout(1, 2, "row", False), python=torchrun(2), **TORCHRUN)
    assert sorted(losses(sharded)) == [1, 2, 3, 4]
    assert_same_trace(sharded, reference, [1, 2], rel=1e-6, norm_rel=1e-4)
    for step in (3, 4):
        assert_same_trace(sharded, reference, [step], rel, norm_rel or float("inf"))
    single = tmp_path / "resumed-1x1"
    resume_from(sharded, single, 3)
    result = train(single, *FAMILIES[family], *STEPS)
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    assert sorted(losses(single)) == [4, 5, 6]
    # The step-3 weights, resharded from P = 2 rows to one process, give the sharded run's loss.
    assert losses(single)[4] == pytest.approx(losses(sharded)[4], rel=1e-6)
    assert_same_trace(single, reference, [4, 5, 6], rel, norm_rel or float("inf"))


PIPELINE = {  # each stage (each model chunk) holds a copy of the shared table
    "ultramem_v2": ["parallel.pipeline_model_parallel_size=2",
                    "parallel.virtual_pipeline_model_parallel_size=2"],   # 4 chunks of 1 block
    "memory_plus": ["parallel.pipeline_model_parallel_size=2"],           # a memory per stage
}


def test_pipeline_copies_of_the_table_and_resume_at_one_process(straight, tmp_path):
    """The chunks' copies of the shared table take the summed gradient and one optimizer step
    (the grad norm counts the table once); the copy saved by the first chunk loads everywhere."""
    family, reference = straight
    staged = tmp_path / "pp2"
    train(staged, *FAMILIES[family], *STEPS, "train.exit_after_steps=4", *PIPELINE[family],
          python=torchrun(2), **TORCHRUN)
    assert sorted(losses(staged)) == [1, 2, 3, 4]
    assert_same_trace(staged, reference, [1, 2, 3, 4], rel=1e-6, norm_rel=1e-5,
                      norm_steps=NORM_STEPS[family])
    single = tmp_path / "resumed-1x1"
    resume_from(staged, single, 3)
    train(single, *FAMILIES[family], *STEPS)
    assert sorted(losses(single)) == [4, 5, 6]
    # Memory+'s grad norm at step 5: 1.7e-5 relative (see the row-shard note above)
    assert_same_trace(single, reference, [4, 5, 6], rel=1e-6, norm_rel=1e-4)
