"""Named experiment suites: families at matched activated compute and total parameters, ablations."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import RunConfig, load_config
from ..model.stats import model_stats


ROOT = Path(__file__).resolve().parents[2]
CPU_SMALL = "configs/cpu_small.yaml"


@dataclass(frozen=True)
class Run:
    """One training run of a suite: `label` groups seeds of the same model in the report."""

    name: str
    label: str
    seed: int
    config: str                       # YAML, relative to the repository root
    overrides: tuple[str, ...]

    def run_config(self) -> RunConfig:
        return load_config(ROOT / self.config, list(self.overrides))


@dataclass(frozen=True)
class Suite:
    name: str
    runs: tuple[Run, ...]
    description: str
    notes: tuple[str, ...] = field(default_factory=tuple)   # lines for the report (matching)
    ladder: bool = False              # labels in order, each adding one change to the previous


def _stats(config_path, overrides: list[str]):
    return model_stats(load_config(config_path, overrides).model)


def _solve_width(config_path, overrides: list[str], field_name: str, target: int,
                 low: int = 16, high: int = 8192, step: int = 8) -> int:
    """The multiple of `step` for field_name (an FFN width) whose paper FLOPs (2 x non-embedding
    activated params, increasing in the width) are closest to target."""
    def flops(width: int) -> int:
        return _stats(config_path, overrides + [f"{field_name}={width}"]).paper_flops
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if flops(mid) < target else (low, mid)
    return min((low, high), key=lambda w: abs(flops(w) - target))


def _solve_count(config_path, overrides: list[str], field_name: str, target: int,
                 low: int = 1, high: int = 4096) -> int:
    """The integer field_name (experts, keys per half) whose total parameters are closest to target."""
    def params(count: int) -> int:
        return _stats(config_path, overrides + [f"{field_name}={count}"]).non_embedding_params
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if params(mid) < target else (low, mid)
    return min((low, high), key=lambda c: abs(params(c) - target))


def matched_families(config_path, reference: list[str], moe_topk: int = 2
                     ) -> tuple[dict[str, list[str]], list[str]]:
    """Overrides of dense, MoE, PKM and UltraMem (`reference`) with UltraMem's activated compute
    (paper FLOPs within a few %, by each family's FFN / expert width) and, for MoE and PKM, its
    total non-embedding parameters (by the number of experts / product keys). Returns the
    overrides per family and a description of the matching for the report."""
    target = _stats(config_path, reference)
    dense = ["model.family=dense"]
    dense.append(f"model.ffn_hidden_size="
                 f"{_solve_width(config_path, dense, 'model.ffn_hidden_size', target.paper_flops)}")
    moe = ["model.family=moe", f"model.moe.topk={moe_topk}", "model.moe.num_experts=8"]
    pkm = ["model.family=pkm", "model.pkm.num_keys=64"]
    for _ in range(3):   # width sets the activated compute, the count the total parameters
        moe_width = _solve_width(config_path, moe, "model.moe.expert_ffn_hidden_size",
                                 target.paper_flops)
        moe = moe[:3] + [f"model.moe.expert_ffn_hidden_size={moe_width}"]
        experts = _solve_count(config_path, moe, "model.moe.num_experts",
                               target.non_embedding_params)
        moe = [moe[0], moe[1], f"model.moe.num_experts={experts}", moe[3]]
        pkm_width = _solve_width(config_path, pkm, "model.ffn_hidden_size", target.paper_flops)
        pkm = pkm[:2] + [f"model.ffn_hidden_size={pkm_width}"]
        keys = _solve_count(config_path, pkm, "model.pkm.num_keys", target.non_embedding_params)
        pkm = [pkm[0], f"model.pkm.num_keys={keys}", pkm[2]]
    families = {"dense": dense, "moe": moe, "pkm": pkm, "ultramem": list(reference)}
    notes = []
    for family, overrides in families.items():
        stats = _stats(config_path, overrides)
        notes.append(f"{family}: {' '.join(overrides)} -> activated {stats.paper_flops / 1e6:.3f} "
                     f"MFLOPs/token ({stats.paper_flops / target.paper_flops - 1:+.1%}), "
                     f"{stats.non_embedding_params / 1e6:.2f}M non-embedding params")
    return families, notes


CPU_SMALL_MEMORY = ["model.family=ultramem"]


# UltraMem with the paper's retrieval (no query BatchNorm, no key-balance loss), as a control.
PAPER_RETRIEVAL = ["model.ultramem.query_batchnorm=false", "model.ultramem.key_balance_weight=0"]


def cpu_small(seeds=(1234, 42)) -> Suite:
    families, notes = matched_families(ROOT / CPU_SMALL, CPU_SMALL_MEMORY)
    runs = [Run(f"{family}-s{seed}", family, seed, CPU_SMALL, (*overrides, f"train.seed={seed}"))
            for family, overrides in families.items() for seed in seeds]
    runs.append(Run(f"ultramem-paper-s{seeds[0]}", "ultramem-paper", seeds[0], CPU_SMALL,
                    (*CPU_SMALL_MEMORY, *PAPER_RETRIEVAL, f"train.seed={seeds[0]}")))
    runs.append(Run(f"ultramem-span-1-2-s{seeds[0]}", "ultramem-span-1:2", seeds[0], CPU_SMALL,
                    (*CPU_SMALL_MEMORY, "model.memory_spans=1:2", f"train.seed={seeds[0]}")))
    return Suite("cpu-small", tuple(runs),
                 "Every family at UltraMem's activated compute; MoE and PKM also at its total "
                 "parameters; two seeds (the seed sets the weights and the training data order; "
                 "every run is scored on the same held-out set). Controls at one seed: "
                 "`ultramem-paper`, the same UltraMem with the paper's retrieval (no query "
                 "BatchNorm, no key-balance loss), and `ultramem-span-1:2`, the memory between "
                 "blocks 1 and 2 instead of 0 and 3 (the same activated compute).", notes)


# The paper's ablation ladder (Table 2, the steps this framework implements): a PKM, then UltraMem
# with one Tucker core, no expansion and a constant value LR, then each component added back.
LADDER = [
    ("pkm", ["model.family=pkm"]),
    ("+tdqkr", ["model.ultramem.num_cores=1", "model.ultramem.expansion=1",
                "model.ultramem.value_lr_start_mult=1"]),
    ("+mcs", ["model.ultramem.num_cores=2", "model.ultramem.expansion=1",
              "model.ultramem.value_lr_start_mult=1"]),
    ("+ive", ["model.ultramem.num_cores=2", "model.ultramem.expansion=4",
              "model.ultramem.value_lr_start_mult=1"]),
    ("+value-lr", ["model.ultramem.num_cores=2", "model.ultramem.expansion=4",
                   "model.ultramem.value_lr_start_mult=10"]),
]


def ablation_ladder(seeds=(1234, 42), steps: int = 200) -> Suite:
    families, _ = matched_families(ROOT / CPU_SMALL, CPU_SMALL_MEMORY)
    runs = []
    for seed in seeds:
        for name, overrides in LADDER:
            base = families["pkm"] if name == "pkm" else CPU_SMALL_MEMORY
            runs.append(Run(f"{name.lstrip('+')}-s{seed}", name, seed, CPU_SMALL,
                            (*base, *(o for o in overrides if o not in base),
                             f"train.seed={seed}", f"train.max_steps={steps}")))
    return Suite("ablation", tuple(runs),
                 "The paper's ladder on the cpu-small trunk: PKM (at UltraMem's compute and "
                 "parameters), then UltraMem without multi-core scoring, expansion and value-LR "
                 f"schedule, adding each back; {len(seeds)} seeds, {steps} steps.", ladder=True)


# Run-level ablations of the memory collapse: the paper's UltraMem (PAPER_RETRIEVAL) with one
# knob changed per run, then the two changes this project adopted, alone and together.
COLLAPSE = [
    ("paper", []),
    ("value-lr-1x", ["model.ultramem.value_lr_start_mult=1"]),
    ("value-lr-4x", ["model.ultramem.value_lr_start_mult=4"]),
    ("lr-1e-3", ["train.lr=1e-3"]),
    ("no-tucker-aux", ["model.ultramem.aux_loss_weight=0"]),
    ("layernorm-qk", ["model.ultramem.qk_norm=layernorm"]),
    ("official-init", ["model.ultramem.init=official"]),
    ("topm-32", ["model.ultramem.topk=32"]),
    ("expansion-1", ["model.ultramem.expansion=1"]),
    ("span-0-3", ["model.memory_spans=0:3"]),
    ("query-batchnorm", ["model.ultramem.query_batchnorm=true"]),
    ("key-balance-0.1", ["model.ultramem.key_balance_weight=0.1"]),
    ("batchnorm+balance-0.1", ["model.ultramem.query_batchnorm=true",
                               "model.ultramem.key_balance_weight=0.1"]),
    ("batchnorm+balance-0.3", ["model.ultramem.query_batchnorm=true",
                               "model.ultramem.key_balance_weight=0.3"]),
    ("batchnorm+balance-1", ["model.ultramem.query_batchnorm=true",
                             "model.ultramem.key_balance_weight=1"]),
]


# The trunk the collapse suite was measured on: the memory between blocks 1 and 2 (cpu-small now
# spans blocks 0 to 3, the finding of this suite's span-0-3 run), 8 validation batches.
COLLAPSE_TRUNK = ["model.memory_spans=1:2", "train.eval_iters=8"]


def collapse(seed: int = 1234, steps: int = 60) -> Suite:
    runs = tuple(Run(f"{name}-s{seed}", name, seed, CPU_SMALL,
                     (*CPU_SMALL_MEMORY, *COLLAPSE_TRUNK, *PAPER_RETRIEVAL, *overrides,
                      f"train.seed={seed}", f"train.max_steps={steps}", "train.eval_interval=30"))
                 for name, overrides in COLLAPSE)
    return Suite("collapse", runs,
                 f"Short ({steps}-step) UltraMem runs on the cpu-small trunk (memory span 1:2) "
                 "from the paper's settings, one knob changed per run: which knobs move memory "
                 "utilisation (and the loss) in the first steps, where the collapse happens. "
                 "One seed.")


def gpu_151m(seeds=(1234,)) -> Suite:
    """The 151M recipes (configs/*_151m.yaml); for GPUs, not run on this CPU."""
    runs = tuple(Run(f"{family}-151m-s{seed}", family, seed, f"configs/{family}_151m.yaml",
                     (f"train.seed={seed}",))
                 for seed in seeds
                 for family in ("dense", "moe", "ultramem", "ultramem_v2", "memory_plus"))
    return Suite("gpu-151m", runs,
                 "Dense-151M, MoE-151M-2in32 and UltraMem-151M-x12 with the paper's recipes, and "
                 "UltraMemV2 and Memory+ on the same trunk at the activated compute and "
                 "parameters of the last two (configs/*_151m.yaml); needs GPUs.")


SUITES: dict[str, Callable[[], Suite]] = {
    "cpu-small": cpu_small,
    "ablation": ablation_ladder,
    "collapse": collapse,
    "gpu-151m": gpu_151m,
}
