"""Train a model: `python train.py --config configs/tiny.yaml [section.key=value ...]`."""

import argparse
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

    try:
        final = Trainer(run).run()
    except (ConfigError, DataPrepError, TokenizerError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not final:
        print(f"nothing to do: {run.train.run_dir} is already at train.max_steps "
              f"({run.train.max_steps}); raise it to continue", flush=True)
    elif final.get("val_loss") is not None:
        print(f"final validation loss {final['val_loss']:.4f} at step {final['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
