"""Train a model: `python train.py --config configs/tiny.yaml [section.key=value ...]`."""

import argparse
import os
import sys

from ultramem_megatron.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML file (see docs/configs.md)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from ultramem_megatron.data.prepare import DataPrepError  # heavy imports after validation
    from ultramem_megatron.data.tokenizer import TokenizerError
    from ultramem_megatron.training.checkpoint import CheckpointError
    from ultramem_megatron.training.loop import Trainer
    from ultramem_megatron.training.preemption import (StopRequest, exit_for_lost_rank,
                                                       is_lost_rank_error)

    stop = StopRequest().install()   # SIGTERM / SIGUSR1 from here on: checkpoint and stop
    trainer = None
    try:
        trainer = Trainer(run)
        final = trainer.run(stop)
    except (ConfigError, DataPrepError, TokenizerError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a peer that died or froze: say so, leave within the bound
        if is_lost_rank_error(err):
            exit_for_lost_rank(err, trainer.state.step if trainer is not None else None)
        raise
    if os.environ.get("RANK", "0") != "0":
        return 0
    if final.get("stopped_by"):
        print(f"stopped by {final['stopped_by']} at step {final['step']} with a checkpoint in "
              f"{run.train.run_dir}; launch again to resume", flush=True)
    elif not final:
        print(f"nothing to do: {run.train.run_dir} is already at train.max_steps "
              f"({run.train.max_steps}); raise it to continue", flush=True)
    elif final.get("val_loss") is not None:
        print(f"final validation loss {final['val_loss']:.4f} at step {final['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
