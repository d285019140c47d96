"""Analytic parameter counts and FLOPs per token for every model family (dense, MoE, PKM, UltraMem,
UltraMemV2, Memory+), exact for the model `build_model` builds (tests/model/test_stats.py checks
them against it).

Parameters
  total_params      sum(p.numel()) of the built model (world size 1): embeddings, learned position
                    table, every block (attention, norms, FFN / all experts + router), memory
                    layers (all value rows), final norm, output layer (embeddings are not tied).
                    UltraMemV2's value and pre-value tables and Memory+'s value table are shared by
                    every memory layer: counted once for the model. Buffers (UltraMem permutation
                    and rank-1 filter, BatchNorm running stats) are not parameters.
  activated_params  parameters one token's forward pass reads: every dense weight (attention, norms,
                    the FFN, or the router plus the top-k experts), in each memory layer its query
                    projection (and bias) / conv / norms, the *whole* key table and the Tucker cores
                    (each token scores against every key), UltraMemV2's pre-value projection W_pre,
                    the output projection and Memory+'s gate W_s, plus the value rows it retrieves:
                    H*m rows of D_v per UltraMem layer (and H*m pre-value rows of D_p per UltraMemV2
                    layer), heads*k rows of D per PKM layer and of D_v per Memory+ layer (a row
                    counted once per retrieval, so an upper bound when rows repeat); one embedding
                    row (and one position row); the whole output layer.
  embedding_params / activated_embedding_params: the embedding part of each of the two counts
                    (input embedding + learned positions + output layer / one row + one row +
                    output layer). The paper's counts exclude embeddings (Dense-151M is 12*D^2*L
                    = 0.151B), so compare with `non_embedding_params` / `..._activated_params`.

FLOPs: forward FLOPs per token, 2 per multiply-accumulate.
  matmul_flops      what torch.utils.flop_counter.FlopCounterMode counts on the CPU path
                    (mm / addmm / bmm / baddbmm / convolution; einsum lowers to bmm, contracted
                    left to right as torch does without opt_einsum): every linear layer (QKV,
                    attention projection, FFN or the top-k experts and the router, output layer),
                    the attention scores and the weighted sum over the full seq_length x
                    seq_length square, as megatron's unfused DotProductAttention computes them
                    (the causal mask is applied after the product, so the masked half is counted;
                    a flash / fused kernel does about half of that), and in memory layers the
                    query projection, the causal depthwise query conv, key scoring (sqrt(E)n' keys
                    per axis, x r for the Tucker families), the phase-2 candidate grid and per-core
                    re-scoring (UltraMem, UltraMemV2) or the sub-key scores (PKM, Memory+),
                    UltraMemV2's W_pre x, the output projection and Memory+'s gate W_s x.
  attention_flops   the attention-score part of matmul_flops (4 * seq * D per layer per token).
  other_flops       value pooling, an embedding_bag FlopCounterMode does not count: 2*H*m*D_v per
                    UltraMem(V2) layer, 2*heads*k*D per PKM layer, 2*heads*k*D_v per Memory+
                    layer; UltraMem's phase-1 rank-1 filter, elementwise multiply-adds over the
                    Tucker rank (selection.rank1_scores): 2 * 2*H*sqrt(E)n*r per layer; and
                    UltraMemV2's pre-value scores <P[row], W_pre x>, elementwise: 2*H*m*D_p.
  Not counted: norms, activations (Memory+'s SiLU gate product included), softmax, top-k,
  embedding lookups, the loss, the key-table norm (once per batch, not per token).
  flops_per_token   training FLOPs per token = 3 x forward (backward = 2 x forward).
  mfu_flops_per_token  model FLOPs per token for MFU: flops_per_token with the attention square
                    counted causally (half of attention_flops), as megatron-LM's
                    num_floating_point_operations does; the numerator of `mfu` in metrics.jsonl.
  paper_flops       2 x non-embedding activated params: the convention of the paper's FLOPs column
                    (Dense-151M 0.151B params -> 0.30G; ablation 173.01M -> 346.06M), which leaves
                    out attention scores and the output layer.
"""

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..memory.config import UltraMemV2Config


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    activated_params: int      # parameters a token's forward pass reads
    matmul_flops: int          # forward FLOPs per token that FlopCounterMode counts (2 per MAC)
    other_flops: int           # forward FLOPs per token outside them (value pooling)
    embedding_params: int = 0            # part of total_params: embeddings, positions, output layer
    activated_embedding_params: int = 0  # part of activated_params: one row (+1), output layer
    attention_flops: int = 0             # part of matmul_flops: scores and weighted sum

    @property
    def forward_flops(self) -> int:
        return self.matmul_flops + self.other_flops

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token: forward plus a backward of twice its cost."""
        return 3 * self.forward_flops

    @property
    def mfu_flops_per_token(self) -> int:
        """Training FLOPs per token with causal attention: only the unmasked half of the
        seq x seq square is model work (megatron-LM's convention for MFU)."""
        return 3 * (self.forward_flops - self.attention_flops // 2)

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def non_embedding_activated_params(self) -> int:
        return self.activated_params - self.activated_embedding_params

    @property
    def paper_flops(self) -> int:
        """2 x non-embedding activated params (the paper's FLOPs convention)."""
        return 2 * self.non_embedding_activated_params


@dataclass(frozen=True)
class _Part:
    total: int = 0       # parameters
    activated: int = 0   # parameters one token reads
    matmul: int = 0      # MACs per token counted by FlopCounterMode
    other: int = 0       # MACs per token outside it (embedding_bag pooling, rank-1 filter)


def _norm_params(normalization: str, width: int) -> int:
    """LayerNorm: weight and bias; RMSNorm: weight (megatron's and torch's alike)."""
    return width * (2 if normalization.lower() == "layernorm" else 1)


def _ffn_params(model: ModelConfig, width: int) -> int:
    """fc1 (2 x width wide with SwiGLU) and fc2, no biases."""
    return model.hidden_size * width * (3 if model.swiglu else 2)


def _tucker(model: ModelConfig) -> tuple[_Part, int]:
    """One UltraMemLayer (ultramem_megatron/memory/layer.py), UltraMem's or UltraMemV2's, and the
    parameters of the tables all layers share (UltraMemV2's value and pre-value tables; 0 for
    UltraMem, whose table is the layer's own)."""
    mem, hidden = model.memory, model.hidden_size   # UltraMemV2: memory_layers from the spans
    v2 = isinstance(mem, UltraMemV2Config)
    heads, rank, cores = mem.num_heads, mem.tucker_rank, mem.num_cores
    keys_per_axis, key_dim = mem.keys_per_axis, mem.key_dim          # UltraMemV2: e n'
    width, topk = mem.candidates_per_axis, mem.topk
    value_dim = mem.resolved_value_dim(hidden)
    pre_dim = mem.resolved_pre_value_dim(hidden) if v2 else 0
    query_ranks = rank if v2 and mem.query_per_rank else 1
    groups = 1 if v2 and mem.value_projection == "single" else mem.expansion

    conv = hidden * mem.query_conv_kernel                            # depthwise [D, 1, kernel]
    query = hidden * 2 * query_ranks * key_dim                        # row and column (per rank)
    norms = 2 * _norm_params(mem.qk_norm, key_dim)                    # query norm, key norm
    keys = heads * 2 * keys_per_axis * key_dim * rank                 # [H, 2, sqrt(E) n, D_k, r]
    core_params = cores * heads * rank * rank                         # [h, H, r, r]
    pre_proj = pre_dim * hidden                                       # W_pre [D_p, D]
    out_proj = groups * value_dim * hidden                            # [D, E or 1, D_v]
    table = (mem.table_rows if v2 else mem.num_values) * (value_dim + pre_dim)
    dense = conv + query + norms + keys + core_params + pre_proj + out_proj
    read = heads * topk * (value_dim + pre_dim)                       # H*m rows of D_v (+ D_p)

    matmul = (
        conv + query
        + 2 * heads * keys_per_axis * rank * key_dim                  # row + column key scores
        + heads * width * rank * rank                                 # grid: S_row^T (sum_c C_c)
        + heads * width * width * rank                                #   ... S_col, w x w cells
        + heads * topk * cores * rank * rank                          # re-score: S_row^T C_c
        + heads * topk * cores * rank                                 #   ... S_col, m cells
        + pre_proj + out_proj)
    rank1_filter = 2 * heads * keys_per_axis * rank                   # phase 1: S u and S t
    other = heads * topk * value_dim + heads * topk * pre_dim + rank1_filter  # pool, pre-scores
    if v2:
        return _Part(total=dense, activated=dense + read, matmul=matmul, other=other), table
    return _Part(total=dense + table, activated=dense + read, matmul=matmul, other=other), 0


def _pkm(model: ModelConfig) -> tuple[_Part, int]:
    """One ProductKeyMemory (ultramem_megatron/memory/pkm.py); no shared table."""
    pkm, hidden = model.pkm, model.hidden_size
    query = hidden * pkm.num_heads * pkm.key_dim
    batchnorm = 2 * pkm.num_heads * pkm.key_dim if pkm.query_batchnorm else 0  # weight, bias
    keys = pkm.num_heads * 2 * pkm.num_keys * (pkm.key_dim // 2)
    values = pkm.num_values * hidden
    read = pkm.num_heads * pkm.topk * hidden
    dense = query + batchnorm + keys
    return _Part(total=dense + values, activated=dense + read, matmul=query + keys, other=read), 0


def _memory_plus(model: ModelConfig) -> tuple[_Part, int]:
    """One MemoryPlusLayer (ultramem_megatron/memory/memory_plus.py) and the [n^2, D_v] value
    table every layer shares."""
    mem, hidden = model.memory_plus, model.hidden_size
    value_dim, half = mem.resolved_value_dim(hidden), mem.key_dim // 2
    query = hidden * mem.num_heads * mem.key_dim                      # W_q [H key_dim, D]
    bias = mem.num_heads * mem.key_dim if mem.query_bias else 0
    norms = half * ((mem.qk_norm in ("both", "query")) + (mem.qk_norm == "both"))  # RMSNorm gains
    keys = mem.num_heads * 2 * mem.num_keys * half                    # [H, 2, n, key_dim / 2]
    out_proj = hidden * value_dim                                     # W_o [D, 1, D_v]
    gate = value_dim * hidden                                         # W_s [D_v, D]
    read = mem.num_heads * mem.topk * value_dim                       # H*k rows of D_v
    dense = query + bias + norms + keys + out_proj + gate
    return (_Part(total=dense, activated=dense + read, matmul=query + keys + out_proj + gate,
                  other=read), mem.num_values * value_dim)


MEMORY_LAYERS = {"pkm": _pkm, "ultramem": _tucker, "ultramem_v2": _tucker,
                 "memory_plus": _memory_plus}


def model_stats(model: ModelConfig) -> ModelStats:
    hidden, layers, seq, vocab = model.hidden_size, model.num_layers, model.seq_length, model.vocab_size
    learned = model.position_embedding == "learned_absolute"
    norm = _norm_params(model.normalization, hidden)

    # Blocks: input norm, QKV + projection (no biases, no GQA), pre-FFN norm, FFN or MoE.
    attention = 4 * hidden * hidden
    if model.family == "moe":
        moe = model.moe
        expert = _ffn_params(model, moe.expert_ffn_hidden_size or model.ffn_size)
        router = hidden * moe.num_experts
        ffn_total, ffn_active = router + moe.num_experts * expert, router + moe.topk * expert
    else:
        ffn_total = ffn_active = _ffn_params(model, model.ffn_size)
    blocks = _Part(total=layers * (2 * norm + attention + ffn_total),
                   activated=layers * (2 * norm + attention + ffn_active),
                   matmul=layers * (attention + ffn_active))
    attention_macs = layers * 2 * seq * hidden  # Q K^T and probs V over the full seq x seq square

    embedding_total = 2 * vocab * hidden + (seq * hidden if learned else 0)
    embedding_active = vocab * hidden + hidden * (2 if learned else 1)

    memory = _Part()
    spans = model.active_spans()
    if model.family in MEMORY_LAYERS and spans:
        one, shared = MEMORY_LAYERS[model.family](model)   # a shared table counts once
        memory = _Part(len(spans) * one.total + shared,
                       *(len(spans) * x for x in (one.activated, one.matmul, one.other)))

    return ModelStats(
        total_params=embedding_total + blocks.total + norm + memory.total,
        activated_params=embedding_active + blocks.activated + norm + memory.activated,
        matmul_flops=2 * (blocks.matmul + attention_macs + hidden * vocab + memory.matmul),
        other_flops=2 * memory.other,
        embedding_params=embedding_total,
        activated_embedding_params=embedding_active,
        attention_flops=2 * attention_macs,
    )


def built_param_counts(model) -> tuple[int, int]:
    """(total, embedding) parameter counts of a built MemoryGPT (any device, meta included):
    embedding = the input embedding, the learned position table and the output layer."""
    total = embedding = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if name.startswith(("embedding.", "output_layer.")):
            embedding += param.numel()
    return total, embedding


def fmt(n: float) -> str:
    """1234567 -> '1.235M'."""
    exponent = min(int(math.log10(max(abs(n), 1)) // 3), 7)
    return f"{n / 10 ** (3 * exponent):.3f}{' KMGTPEZ'[exponent].strip()}"
