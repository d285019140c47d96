"""Parameters and FLOPs per token of a run config: `python scripts/model_stats.py CONFIG [key=value ...] [--check]`."""

# Prints the analytic counts of ultramem_megatron/model/stats.py (what "activated" and the FLOPs
# columns mean is in its docstring). --check also builds the model and prints the built parameter
# counts beside the analytic ones: on the meta device (no memory, seconds) when the model is over
# --meta-above parameters, otherwise on the CPU, where it also counts one forward pass
# ([1, seq_length] tokens) with torch's FlopCounterMode beside the analytic matmul FLOPs.
# With a paper model (--paper NAME, or the recipe's file name in PAPER_RECIPES) --check also
# compares the non-embedding parameters and the paper-convention FLOPs (2 x non-embedding
# activated) with the UltraMem v1 paper's Table 1 (../shared/docs/ultramem-spec.md section 5).
# The families no paper reports at a recipe's size (UltraMemV2 and Memory+ at 151M) are matched to
# other recipes instead: with --match RECIPE (or the recipe's file name in MATCHED_RECIPES) --check
# compares the non-embedding parameters, the paper-convention FLOPs and the forward FLOPs per
# token with those of configs/RECIPE, computed by the same formulas.
# Exit status 1 when a check disagrees (built counts differ, a paper count is off by > 1 %, or a
# matched count by > 2 %).

import argparse
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from ultramem_megatron.config import ConfigError, load_config  # noqa: E402
from ultramem_megatron.model.stats import built_param_counts, fmt, model_stats  # noqa: E402


# UltraMem v1 paper, Table 1: name -> (params B, GFLOPs per token); embeddings excluded.
PAPER = {
    "Dense-1.6B": (1.61e9, 3.21e9),
    "MoE-1.6B-2in34": (21.36e9, 3.52e9),
    "UltraMem-1.6B-x12": (21.41e9, 3.50e9),
    "Dense-6.5B": (6.44e9, 12.88e9),
}
PAPER_RECIPES = {  # recipe file name -> its paper model
    "dense_1.6b.yaml": "Dense-1.6B",
    "moe_1.6b.yaml": "MoE-1.6B-2in34",
    "ultramem_1.6b.yaml": "UltraMem-1.6B-x12",
    "dense_6.5b.yaml": "Dense-6.5B",
}
PAPER_TOLERANCE = 0.01  # relative

# Recipes no paper has numbers for, matched to the activated compute and total parameters of
# the recipes that have them: recipe file name -> its references in configs/.
MATCHED_RECIPES = {
    "ultramem_v2_151m.yaml": ("ultramem_151m.yaml", "moe_151m.yaml"),
    "memory_plus_151m.yaml": ("ultramem_151m.yaml", "moe_151m.yaml"),
}
MATCHED_TOLERANCE = 0.02  # relative
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config", help="YAML run config, e.g. configs/ultramem_151m.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=6")
    p.add_argument("--check", action="store_true",
                   help="build the model and compare its parameter count (and FLOPs on CPU)")
    p.add_argument("--meta-above", type=float, default=5e7, metavar="PARAMS",
                   help="with --check, build on the meta device above this many parameters "
                        "(default 5e7)")
    p.add_argument("--paper", choices=sorted(PAPER),
                   help="with --check, compare with this paper model's Table 1 counts (default: "
                        "the recipe's, for the files in PAPER_RECIPES)")
    p.add_argument("--match", action="append", metavar="RECIPE",
                   help="with --check, compare with the activated compute and parameters of "
                        "configs/RECIPE (repeatable; default: the recipe's references in "
                        "MATCHED_RECIPES)")
    return p.parse_args(argv)


def paper_check(name: str, stats) -> bool:
    """Non-embedding params and 2 x non-embedding activated vs the paper's Table 1, within 1 %."""
    print(f"\npaper check: {name} (UltraMem v1 Table 1, embeddings excluded, tolerance "
          f"{PAPER_TOLERANCE:.0%})")
    ok = compare((("params", stats.non_embedding_params, PAPER[name][0]),
                  ("GFLOPs (2 x activated)", stats.paper_flops, PAPER[name][1])),
                 PAPER_TOLERANCE, "paper", "  ")
    print("  OK" if ok else "  MISMATCH")
    return ok


def compare(rows, tolerance: float, source: str, indent: str) -> bool:
    """Print (label, ours, theirs) rows with the relative difference; True if all are within."""
    ok = True
    for label, ours, theirs in rows:
        off = ours / theirs - 1
        good = abs(off) <= tolerance
        ok = ok and good
        print(f"{indent}{label:<24} ours {fmt(ours):>10}  {source} {fmt(theirs):>10}  "
              f"{off:+.2%}  {'ok' if good else 'OFF'}")
    return ok


def matched_check(references, stats) -> bool:
    """Non-embedding params, 2 x non-embedding activated and forward FLOPs per token vs each
    reference recipe's (the same formulas), within MATCHED_TOLERANCE."""
    ok = True
    print(f"\nmatched-compute check (no paper numbers for this model; tolerance "
          f"{MATCHED_TOLERANCE:.0%})")
    for name in references:
        ref = model_stats(load_config(CONFIGS / name).model)
        print(f"  vs {name}")
        ok = compare((("params", stats.non_embedding_params, ref.non_embedding_params),
                      ("GFLOPs (2 x activated)", stats.paper_flops, ref.paper_flops),
                      ("forward FLOPs/token", stats.forward_flops, ref.forward_flops)),
                     MATCHED_TOLERANCE, "recipe", "    ") and ok
    print("  OK" if ok else "  MISMATCH")
    return ok


def row(label: str, value: float, exact: bool = True) -> str:
    return f"  {label:<44} {fmt(value):>10}" + (f"   ({int(value):,})" if exact else "")


def check(run, stats, meta_above: float) -> bool:
    import torch

    from ultramem_megatron import megatron_compat
    from ultramem_megatron.model import build_model

    megatron_compat.initialize_single_process(run.train.seed)
    on_meta = stats.total_params > meta_above
    if on_meta:
        with torch.device("meta"):
            model = build_model(run.model, run.parallel)
    else:
        model = build_model(run.model, run.parallel)
    total, embedding = built_param_counts(model)
    where = "meta device" if on_meta else "CPU"
    ok = total == stats.total_params and embedding == stats.embedding_params
    print(f"\ncheck: built on the {where}")
    print(f"  {'':<24} {'analytic':>16} {'built':>16}")
    print(f"  {'total params':<24} {stats.total_params:>16,} {total:>16,}")
    print(f"  {'non-embedding params':<24} {stats.non_embedding_params:>16,} {total - embedding:>16,}")
    if not on_meta:
        from torch.utils.flop_counter import FlopCounterMode

        megatron_compat.enter_cpu_device_mode()
        seq = run.model.seq_length
        tokens = torch.randint(0, run.model.vocab_size, (1, seq))
        positions = torch.arange(seq).unsqueeze(0)
        counter = FlopCounterMode(display=False)
        with counter:  # not under no_grad: FlopCounterMode's module tracker then fails on the
            model(tokens, positions, None)  # key-norm input (a parameter view without grad_fn)
        counted = counter.get_total_flops() // seq
        ok = ok and counted == stats.matmul_flops
        print(f"  {'matmul FLOPs/token':<24} {stats.matmul_flops:>16,} {counted:>16,}"
              "   (FlopCounterMode, one forward)")
    print("  OK" if ok else "  MISMATCH")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    model = run.model
    stats = model_stats(model)
    print(f"{args.config}: {model.family}, {model.num_layers} layers, D={model.hidden_size}, "
          f"seq {model.seq_length}, vocab {model.vocab_size}"
          + (f", memory spans {model.memory_spans}" if model.memory_spans else ""))
    print("parameters")
    print(row("total", stats.total_params))
    print(row("activated per token", stats.activated_params))
    print(row("non-embedding total (the paper's count)", stats.non_embedding_params))
    print(row("non-embedding activated", stats.non_embedding_activated_params))
    print("forward FLOPs per token (2 per multiply-add)")
    print(row("matmul (what FlopCounterMode counts)", stats.matmul_flops))
    print(row("  of which attention (full seq x seq)", stats.attention_flops))
    print(row("other (value pooling)", stats.other_flops))
    print(row("forward total", stats.forward_flops))
    print(row("training (3 x forward)", stats.flops_per_token))
    print(row("paper convention (2 x non-emb. activated)", stats.paper_flops))
    tokens = run.train.global_batch_size * model.seq_length
    print(f"per step ({run.train.global_batch_size} x {model.seq_length} tokens): training FLOPs "
          f"{fmt(stats.flops_per_token * tokens)}; whole run ({run.train.max_steps} steps): "
          f"{fmt(stats.flops_per_token * tokens * run.train.max_steps)}")
    if args.check:
        ok = check(run, stats, args.meta_above)
        paper = args.paper or PAPER_RECIPES.get(os.path.basename(args.config))
        if paper:
            ok = paper_check(paper, stats) and ok
        references = args.match or MATCHED_RECIPES.get(os.path.basename(args.config))
        if references:
            ok = matched_check(references, stats) and ok
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
