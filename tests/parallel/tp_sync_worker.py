"""torchrun worker (TP = 2): train steps with a gradient perturbed differently on each TP rank,
then write every rank's memory parameters to OUT/rank{R}.pt for tests/parallel/test_tp_sync.py."""

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from tests.training.conftest import ROOT, SMALL
from ultramem_megatron.config import load_config
from ultramem_megatron.data.loader import iterate_batches
from ultramem_megatron.training.loop import Trainer

STEPS = 3


def main(out: Path, family: str, sync: bool) -> None:
    run = load_config(ROOT / "configs/tiny.yaml", [
        *SMALL, f"model.family={family}", "parallel.tensor_model_parallel_size=2",
        f"train.run_dir={out / 'run'}", f"train.max_steps={STEPS}"])
    trainer = Trainer(run)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    memory = [(name, param) for layer in trainer.model.memory_layers()
              for name, param in layer.named_parameters()]
    for _, param in memory:
        if not sync:   # the control: what happens without the TP average
            param.__dict__.pop("average_gradients_across_tp_domain", None)
        if not getattr(param, "tensor_model_parallel", False):
            # What non-deterministic GPU reductions do: the replicas' gradients differ a little.
            param.register_hook(lambda grad, rank=tp_rank: grad * (1 + 1e-3 * rank))
    data = iterate_batches(trainer.train_data, run.train.micro_batch_size, 0, dp_rank=0, dp_size=1)
    for _ in range(STEPS):
        trainer.train_step([data])
    torch.save({name: param.detach().clone() for name, param in memory
                if not getattr(param, "tensor_model_parallel", False)},
               out / f"rank{tp_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "sync")
