"""Per-GPU memory of a config under a layout: `plan_memory.py CONFIG --layout tp=2,pp=2,dp=4`."""

# Analytic (ultramem_megatron/training/memory_plan.py has the formulas): parameters (bf16), fp32
# main grads, Adam state (divided over DP with the distributed optimizer), activations of the
# micro-batches in flight on the first pipeline stage for each recompute granularity, and the
# total against --gpu-memory-gib. The layout comes from --layout, not from the config's parallel
# section (config loading still refuses PP / CP / EP > 1); --layout keys: tp pp cp mp ep dp vpp
# (missing keys are 1; mp is P, the memory-parallel size). Exit status 1 when the total does not
# fit, 2 on a bad config or layout.

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")

from ultramem_megatron.config import ConfigError, load_config  # noqa: E402
from ultramem_megatron.training.memory_plan import (  # noqa: E402
    RECOMPUTE, LayoutError, format_plan, parse_layout, plan_memory)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", help="YAML run config, e.g. configs/ultramem_1.6b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=16")
    p.add_argument("--layout", required=True, help="e.g. tp=2,pp=2,cp=1,mp=2,ep=1,dp=4")
    p.add_argument("--recompute", choices=RECOMPUTE,
                   help="default: the config's parallel.recompute_granularity")
    p.add_argument("--micro-batch", type=int, help="default: the config's train.micro_batch_size")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="activations split over TP (default: the config's "
                        "parallel.sequence_parallel)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        layout = parse_layout(args.layout)
        run = load_config(args.config, args.overrides)
        plan = plan_memory(
            run.model, layout,
            micro_batch=args.micro_batch or run.train.micro_batch_size,
            recompute=args.recompute or run.parallel.recompute_granularity,
            sequence_parallel=args.sequence_parallel or run.parallel.sequence_parallel,
            distributed_optimizer=run.parallel.use_distributed_optimizer,
            global_batch=run.train.global_batch_size, gpu_memory_gib=args.gpu_memory_gib)
    except (ConfigError, LayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: {run.model.family}, {run.model.num_layers} layers, "
          f"D={run.model.hidden_size}, seq {run.model.seq_length}")
    print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
