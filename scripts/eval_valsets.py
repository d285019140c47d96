#!/usr/bin/env python
"""Score a finished run's last checkpoint on several validation sets (one per data.valid_seed):
how much of a validation loss is the choice of held-out samples rather than the model.

    python scripts/eval_valsets.py runs/experiments/cpu-small/dense-s42
    python scripts/eval_valsets.py RUN_DIR --valid-seeds 1234 42 7 --eval-iters 8 16

The run's config comes from its checkpoint (run_config.yaml); nothing is written to the run.
Prints one line per eval_iters: the losses, their range and standard deviation.
"""

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ultramem_megatron.training.checkpoint import (CheckpointError, read_run_config,  # noqa: E402
                                                   resolve_checkpoint)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--valid-seeds", type=int, nargs="+", default=[1234, 42, 7, 99, 2024])
    parser.add_argument("--eval-iters", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    if len(args.valid_seeds) < 2 or min(args.eval_iters) < 1:
        parser.error("give at least two --valid-seeds and positive --eval-iters")
    try:
        run = read_run_config(resolve_checkpoint(args.run_dir))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from ultramem_megatron.training.loop import Trainer
    train = replace(run.train, run_dir=str(args.run_dir), resume=True, async_save=False)
    print(f"{args.run_dir}: {run.model.family}, train.seed {run.train.seed}")
    for iters in args.eval_iters:
        losses = []
        for seed in args.valid_seeds:
            config = replace(run, data=replace(run.data, valid_seed=seed),
                             train=replace(train, eval_iters=iters))
            losses.append(Trainer(config).evaluate())
        print(f"eval_iters {iters}: " + " ".join(f"{x:.4f}" for x in losses)
              + f" | range {max(losses) - min(losses):.4f} std {statistics.stdev(losses):.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
