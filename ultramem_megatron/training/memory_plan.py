"""Analytic per-GPU memory of a model config under a parallel layout (scripts/plan_memory.py)."""

# Everything is computed from the ModelConfig and a Layout given here, never from validate(): the
# planner must also answer for layouts (PP / CP / EP > 1) that config loading still refuses.
#
# Per GPU, for the first pipeline stage (it holds the input embedding, its L / PP blocks, the
# memory layers whose span starts in it, and keeps the most micro-batches in flight under 1F1B):
#   parameters   bf16, 2 bytes each. Attention, FFN, embedding / output layer and the memory
#                layer's projections from and to the value width (output projection,
#                UltraMemV2's W_pre, Memory+'s W_s) are split over TP; norms, routers, memory
#                queries, key tables and Tucker cores are counted whole on every TP rank (an
#                upper bound). MoE experts: num_experts / EP per rank, each split over TP.
#                Value tables: N x D_v / (TP x P) per rank in both modes (value_dim: all N rows
#                x D_v / (TP P) columns; row: N / P rows x D_v / TP columns). UltraMem has one
#                per memory layer; UltraMemV2 one [N_all, D_v] value and one [N_all, D_p]
#                pre-value table, Memory+ one [n^2, D_v] table, shared by all its memory layers
#                and counted once (whole on the stage when any of its layers is there).
#   main grads   fp32, 4 bytes per parameter (megatron DDP with grad_reduce_in_fp32).
#   optimizer    Adam: fp32 master weights + 2 fp32 moments = 12 bytes per parameter; with the
#                distributed optimizer divided over the parameter's data-parallel group: DP x CP
#                for dense weights, DP x CP / EP for experts, DP x CP / P for value shards (the
#                expert-data-parallel group of the value tables).
#   activations  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
#                Transformer Models"), bytes per transformer layer per micro-batch in 16-bit:
#                  none       s b h (34 + 5 a s / h)   [no TP; with TP:
#                             s b h (10 + 24/t + 5as/(ht)); sequence parallel: that / t]
#                  selective  the same without the attention-score term 5 a s / h
#                  full       2 s b h (only each block's input; / t with sequence parallel)
#                s = seq / CP, b = micro-batch, h = hidden, a = heads. The formula assumes a 4h
#                FFN; its 19 s b h FFN part is rescaled to the real FFN width (and to top-k
#                routed copies of expert width for MoE). Times the micro-batches in flight on the
#                first stage: min(PP, micro-batches per step) under 1F1B, x (1 + (PP-1)/(PP VPP))
#                when interleaved. Memory layers add their own tensors (shapes of
#                model/stats.py): query, phase-1 row / column scores (sub-key scores for Memory+),
#                the candidate grid, top-m scores (bf16) and indices (int64), UltraMemV2's W_pre x
#                and pre-value scores, the pooled E D_v output (one group when UltraMemV2 sums
#                them; Memory+'s pooled, gate and gated product) and the D-wide output held until
#                the span's end; not split over TP (every TP rank scores the same tokens). Full
#                recompute keeps only the held output. With PP = 1 the stage is also the last:
#                logits s b V / t in bf16 plus their fp32 copy for the loss.
#   Not counted: CUDA context / NCCL buffers / allocator fragmentation (keep several GiB spare),
#   the temporary of the backward, communication buffers of memory parallelism.

from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelConfig, ParallelConfig

GIB = 1024 ** 3
SHARDED_TABLES = ("ultramem", "ultramem_v2", "memory_plus")   # families P shards the tables of
LAYOUT_KEYS = ("tp", "pp", "cp", "mp", "ep", "dp", "vpp")
RECOMPUTE = ("none", "selective", "full")


class LayoutError(ValueError):
    """A --layout string (or a layout) that cannot be planned."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1    # tensor parallel
    pp: int = 1    # pipeline stages
    cp: int = 1    # context parallel
    mp: int = 1    # P: memory-parallel size (value-table shards over DP ranks)
    ep: int = 1    # expert parallel (MoE)
    dp: int = 1    # data parallel (world = tp * pp * cp * dp)
    vpp: int = 1   # virtual pipeline chunks per stage

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def parse_layout(text: str) -> Layout:
    """'tp=2,pp=2,dp=4' -> Layout (missing keys are 1); LayoutError names a bad key or value."""
    values: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise LayoutError(f"--layout: {item!r} is not key=value "
                              f"(keys: {', '.join(LAYOUT_KEYS)})")
        if key not in LAYOUT_KEYS:
            raise LayoutError(f"--layout: unknown key {key!r} (keys: {', '.join(LAYOUT_KEYS)})")
        if key in values:
            raise LayoutError(f"--layout: key {key!r} given twice")
        try:
            number = int(value)
        except ValueError:
            raise LayoutError(f"--layout: {key}={value.strip()!r} is not an integer") from None
        if number < 1:
            raise LayoutError(f"--layout: {key} must be >= 1, got {number}")
        values[key] = number
    return Layout(**values)


def layout_from_parallel(parallel: ParallelConfig, world_size: int) -> Layout:
    """The layout a job of world_size ranks runs with a config's parallel section."""
    model_parallel = parallel.model_parallel_size
    if world_size % model_parallel:
        raise LayoutError(f"world size {world_size} is not a multiple of TP x PP x CP = "
                          f"{model_parallel}")
    return Layout(tp=parallel.tensor_model_parallel_size,
                  pp=parallel.pipeline_model_parallel_size,
                  cp=parallel.context_parallel_size, mp=parallel.memory_parallel_size,
                  ep=parallel.expert_model_parallel_size, dp=world_size // model_parallel,
                  vpp=parallel.virtual_pipeline_model_parallel_size)


def layout_problem(model: ModelConfig, layout: Layout) -> Optional[str]:
    """Why the planner cannot split this model this way (None when it can)."""
    if model.num_layers % (layout.pp * layout.vpp):
        return f"pp x vpp = {layout.pp * layout.vpp} must divide num_layers ({model.num_layers})"
    if model.num_attention_heads % layout.tp:
        return f"tp ({layout.tp}) must divide num_attention_heads ({model.num_attention_heads})"
    if model.seq_length % layout.cp:
        return f"cp ({layout.cp}) must divide seq_length ({model.seq_length})"
    if layout.dp % layout.mp:
        return f"mp ({layout.mp}) must divide dp ({layout.dp})"
    if layout.dp * layout.cp % layout.ep:
        return f"ep ({layout.ep}) must divide dp x cp ({layout.dp * layout.cp})"
    if model.family == "moe" and model.moe.num_experts % layout.ep:
        return f"ep ({layout.ep}) must divide moe.num_experts ({model.moe.num_experts})"
    if model.family not in SHARDED_TABLES and layout.mp > 1:
        return "mp > 1 shards UltraMem, UltraMemV2 and Memory+ value tables; this model has none"
    if model.family != "moe" and layout.ep > 1:
        return "ep > 1 splits MoE experts; this model has none"
    return None


@dataclass
class MemoryPlan:
    """Per-GPU bytes on the first pipeline stage; activations for each recompute granularity."""

    layout: Layout
    recompute: str
    micro_batch: int
    in_flight: float                 # micro-batches whose activations the first stage holds
    params: int                      # parameter count on this GPU (value shards included)
    value_params: int                # of which value-shard elements (UltraMem(V2), Memory+, PKM)
    param_bytes: int                 # bf16
    grad_bytes: int                  # fp32 main grads
    optimizer_bytes: float           # fp32 master + 2 moments, over DP when distributed
    value_bytes: float               # value shards: bf16 + fp32 grad + their optimizer share
    activation_bytes: dict = field(default_factory=dict)   # granularity -> bytes (all in flight)
    gpu_memory_gib: float = 80.0

    @property
    def activations(self) -> float:
        return self.activation_bytes[self.recompute]

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activations

    def total_with(self, recompute: str) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + \
            self.activation_bytes[recompute]

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_gib * GIB


def _tucker_shape(model: ModelConfig) -> tuple[int, int, int]:
    """(D_p, queries per axis, projected groups) of an UltraMemV2 layer; (0, 1, E) for UltraMem."""
    mem = model.memory
    if model.family != "ultramem_v2":
        return 0, 1, mem.expansion
    return (mem.resolved_pre_value_dim(model.hidden_size),
            mem.tucker_rank if mem.query_per_rank else 1,
            1 if mem.value_projection == "single" else mem.expansion)


def _memory_params(model: ModelConfig, layers: int) -> tuple[int, int, int]:
    """(TP-split, replicated, whole value-table elements) of `layers` memory layers of an UltraMem,
    UltraMemV2 or Memory+ model; a table its layers share counted once."""
    mem, h = model.memory, model.hidden_size
    value_dim = mem.resolved_value_dim(h)
    if model.family == "memory_plus":
        norms = mem.key_dim // 2 * ((mem.qk_norm in ("both", "query")) + (mem.qk_norm == "both"))
        # W_q [H key_dim, D] (+ bias), keys [H, 2, n, key_dim / 2], RMSNorm gains
        replicated = mem.num_heads * mem.key_dim * (h + mem.query_bias + mem.num_keys) + norms
        return layers * 2 * value_dim * h, layers * replicated, mem.num_values * value_dim
    pre, ranks, groups = _tucker_shape(model)
    replicated = (h * mem.query_conv_kernel + h * 2 * ranks * mem.key_dim
                  + 2 * mem.key_dim * (2 if mem.qk_norm == "layernorm" else 1)
                  + mem.num_heads * 2 * mem.keys_per_axis * mem.key_dim * mem.tucker_rank
                  + mem.num_cores * mem.num_heads * mem.tucker_rank ** 2)
    table = (mem.table_rows * (value_dim + pre) if model.family == "ultramem_v2"
             else layers * mem.num_values * value_dim)
    return layers * (groups * value_dim + pre) * h, layers * replicated, table


def _memory_layer_activation_bytes(model: ModelConfig, tokens: int) -> int:
    """One UltraMem, UltraMemV2 or Memory+ layer's saved tensors for `tokens` tokens (bf16;
    int64 indices)."""
    mem, h = model.memory, model.hidden_size
    value_dim = mem.resolved_value_dim(h)
    if model.family == "memory_plus":
        elements = (mem.num_heads * mem.key_dim                       # query, both halves
                    + mem.num_heads * 2 * mem.num_keys                # sub-key scores
                    + mem.num_heads * mem.topk * mem.topk             # k x k candidate sums
                    + 2 * mem.num_heads * mem.topk                    # top-k scores, softmax
                    + 3 * value_dim                                   # pooled, gate, product
                    + h)                                              # output held to span end
        return tokens * (2 * elements + 8 * mem.num_heads * mem.topk)
    pre, ranks, groups = _tucker_shape(model)
    width = mem.candidates_per_axis
    elements = (2 * ranks * mem.key_dim                               # row / column query
                + mem.num_heads * 2 * mem.keys_per_axis * mem.tucker_rank   # phase-1 scores
                + mem.num_heads * width * width                       # phase-2 candidate grid
                + mem.num_heads * mem.topk * mem.num_cores            # top-m core scores
                + (pre + mem.num_heads * mem.topk if pre else 0)      # W_pre x, pre-scores
                + groups * value_dim                                  # pooled E (or 1) D_v
                + h)                                                  # output held to span end
    return tokens * (2 * elements + 8 * mem.num_heads * mem.topk)     # + int64 indices


def plan_memory(model: ModelConfig, layout: Layout, micro_batch: int = 1,
                recompute: str = "none", sequence_parallel: bool = False,
                distributed_optimizer: bool = True, global_batch: Optional[int] = None,
                gpu_memory_gib: float = 80.0) -> MemoryPlan:
    """Per-GPU memory plan of `model` under `layout` (see the module comment for the formulas)."""
    if recompute not in RECOMPUTE:
        raise LayoutError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    problem = layout_problem(model, layout)
    if problem:
        raise LayoutError(problem)
    t, h, a = layout.tp, model.hidden_size, model.num_attention_heads
    norm = h * (2 if model.normalization.lower() == "layernorm" else 1)
    blocks = model.num_layers // layout.pp      # blocks on the first stage (all its chunks)
    per_chunk = model.num_layers // (layout.pp * layout.vpp)
    stage_blocks = [i for i in range(model.num_layers) if (i // per_chunk) % layout.pp == 0]

    # Parameters on this GPU: split over TP / replicated / experts / value shards.
    ffn_w = 3 if model.swiglu else 2
    split = blocks * 4 * h * h + model.vocab_size * h             # attention, input embedding
    replicated = blocks * 2 * norm
    expert_params = 0
    if model.family == "moe":
        moe = model.moe
        width = moe.expert_ffn_hidden_size or model.ffn_size
        replicated += blocks * h * moe.num_experts                 # router
        expert_params = blocks * (moe.num_experts // layout.ep) * ffn_w * h * width // t
    else:
        split += blocks * ffn_w * h * model.ffn_size
    if layout.pp == 1:
        split += model.vocab_size * h                              # output layer
        replicated += norm                                          # final norm
    spans = [s for s in model.active_spans() if s[0] in stage_blocks]
    value_params = 0
    if model.family in SHARDED_TABLES and spans:
        memory_split, memory_replicated, table = _memory_params(model, len(spans))
        split += memory_split
        replicated += memory_replicated
        value_params = table // (t * layout.mp)
    elif model.family == "pkm" and spans:
        value_params = len(spans) * model.pkm.num_values * h        # PKM values: not sharded
    dense = split // t + replicated
    params = dense + expert_params + value_params

    data_parallel = layout.dp * layout.cp
    if distributed_optimizer:
        optimizer = 12 * (dense / data_parallel + expert_params / (data_parallel / layout.ep)
                          + value_params / (data_parallel / layout.mp))
        value_optimizer = 12 * value_params / (data_parallel / layout.mp)
    else:
        optimizer = 12 * params
        value_optimizer = 12 * value_params

    # Activations of one micro-batch on this stage, per granularity (Korthikanti et al. 2022).
    s, b = model.seq_length // layout.cp, micro_batch
    sbh = s * b * h
    scores = 5 * a * s / h
    if model.family == "moe":
        moe = model.moe
        width = moe.expert_ffn_hidden_size or model.ffn_size
        ffn = 1 + moe.topk * (2 + 16 * width / (4 * h))   # dropout mask + routed copies
    else:
        ffn = 3 + 16 * model.ffn_size / (4 * h)           # 19 at ffn = 4h
    rest = 34 - 19 + ffn                                   # the formula's non-FFN 15 + FFN part
    if sequence_parallel:
        none = sbh * (rest + scores) / t
        selective = sbh * rest / t
        full = 2 * sbh / t
    else:
        tp_part = rest - 10                                # the 24 of 10 + 24/t, FFN-rescaled
        none = sbh * (10 + tp_part / t + scores / t)
        selective = sbh * (10 + tp_part / t)
        full = 2 * sbh
    memory_full = memory_kept = 0
    if model.family in SHARDED_TABLES and spans:
        memory_kept = len(spans) * _memory_layer_activation_bytes(model, s * b)
        memory_full = len(spans) * 2 * sbh                 # only the held output
    logits = 6 * s * b * model.vocab_size / t if layout.pp == 1 else 0
    per_micro = {"none": blocks * none + memory_kept + logits,
                 "selective": blocks * selective + memory_kept + logits,
                 "full": blocks * full + memory_full + logits}

    in_flight = float(layout.pp)
    if global_batch is not None:
        in_flight = float(min(layout.pp, max(1, global_batch // (micro_batch * layout.dp))))
    if layout.vpp > 1:
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    activations = {k: v * in_flight for k, v in per_micro.items()}

    return MemoryPlan(layout=layout, recompute=recompute, micro_batch=micro_batch,
                      in_flight=in_flight, params=params, value_params=value_params,
                      param_bytes=2 * params, grad_bytes=4 * params, optimizer_bytes=optimizer,
                      value_bytes=6 * value_params + value_optimizer,
                      activation_bytes=activations, gpu_memory_gib=gpu_memory_gib)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a GiB table, the chosen recompute marked."""
    lay = plan.layout
    gib = lambda n: f"{n / GIB:9.2f}"  # noqa: E731
    lines = [f"layout tp={lay.tp} pp={lay.pp} cp={lay.cp} mp={lay.mp} ep={lay.ep} dp={lay.dp}"
             f" vpp={lay.vpp} (world {lay.world_size}); micro-batch {plan.micro_batch}, "
             f"{plan.in_flight:g} in flight on the first stage",
             f"per-GPU memory, GiB (first pipeline stage; {plan.params:,} parameters on it)",
             f"  {'parameters (bf16)':<42}{gib(plan.param_bytes)}",
             f"  {'main grads (fp32)':<42}{gib(plan.grad_bytes)}",
             f"  {'optimizer (fp32 master + 2 moments)':<42}{gib(plan.optimizer_bytes)}"]
    if plan.value_params:
        lines.append(f"  {'  of these three: value shards':<42}{gib(plan.value_bytes)}"
                     f"   ({plan.value_params:,} elements)")
    for name in RECOMPUTE:
        mark = "  <-" if name == plan.recompute else ""
        lines.append(f"  {'activations, recompute ' + name:<42}"
                     f"{gib(plan.activation_bytes[name])}{mark}")
    lines.append(f"  {'total (recompute ' + plan.recompute + ')':<42}{gib(plan.total_bytes)}"
                 f"   of {plan.gpu_memory_gib:g} GiB: " + ("fits" if plan.fits else "OVER"))
    return "\n".join(lines)

