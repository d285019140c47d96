"""Train a model: `python train.py --config configs/tiny.yaml [section.key=value ...]`."""

import argparse
import os
import sys

from ultramem_megatron.config import ConfigError, load_config


def unprepared_data_error(run, config: str, overrides: list[str]):
    """Why a job of several ranks cannot start on this data (None when it can): its ranks would
    otherwise wait on one rank's tokenizing up to train.collective_timeout_s."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None   # a world of one prepares what is missing itself
    from ultramem_megatron.data.prepare import missing_data, prepare_command

    missing = missing_data(run.data)
    if not missing:
        return None
    return (f"data not prepared ({'; '.join(missing)}), and a job of {world_size} ranks does not "
            f"tokenize. Prepare it first, from the repository root: "
            f"{prepare_command(run.data, config, overrides)} "
            f"(or run with one process, or submit with launch/submit.py --prepare-data)")


def report(run, final: dict) -> None:
    """Rank 0's last line: why the run ended."""
    if os.environ.get("RANK", "0") != "0":
        return
    if final.get("stopped_by"):
        print(f"stopped by {final['stopped_by']} at step {final['step']} with a checkpoint in "
              f"{run.train.run_dir}; launch again to resume", flush=True)
    elif not final:
        print(f"nothing to do: {run.train.run_dir} is already at train.max_steps "
              f"({run.train.max_steps}); raise it to continue", flush=True)
    elif final.get("val_loss") is not None:
        print(f"final validation loss {final['val_loss']:.4f} at step {final['step']}", flush=True)


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
    problem = unprepared_data_error(run, args.config, args.overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from ultramem_megatron import megatron_compat  # heavy imports after validation
    from ultramem_megatron.data.prepare import DataPrepError
    from ultramem_megatron.data.tokenizer import TokenizerError
    from ultramem_megatron.training.checkpoint import CheckpointError
    from ultramem_megatron.training.loop import Trainer
    from ultramem_megatron.training.preemption import (StopRequest, exit_for_lost_rank,
                                                       is_lost_rank_error)

    stop = StopRequest().install()   # SIGTERM / SIGUSR1 from here on: checkpoint and stop
    trainer, final, code = None, {}, 0
    try:
        trainer = Trainer(run)
        final = trainer.run(stop)
    except (ConfigError, DataPrepError, TokenizerError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # a peer that died or froze: say so, leave within the bound
        if is_lost_rank_error(err):   # os._exit: no cleanup that could wait on the lost peer
            exit_for_lost_rank(err, trainer.state.step if trainer is not None else None)
        raise
    megatron_compat.destroy_distributed()   # every orderly exit, errors after init included
    if code == 0:
        report(run, final)
    return code


if __name__ == "__main__":
    sys.exit(main())
