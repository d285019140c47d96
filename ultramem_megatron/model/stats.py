"""Analytic parameter counts and FLOPs per token for every model family (checked against the built
model by the tests)."""

import math
from dataclasses import dataclass

from ..config import ModelConfig, parse_spans


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    activated_params: int      # parameters a token's forward pass reads
    matmul_flops: int          # forward FLOPs per token in matrix products (2 per multiply-add)
    other_flops: int           # forward FLOPs per token outside matmuls (value pooling)

    @property
    def forward_flops(self) -> int:
        return self.matmul_flops + self.other_flops

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token: forward plus a backward of twice its cost."""
        return 3 * self.forward_flops


def _norm_params(model: ModelConfig, width: int) -> int:
    return width * (2 if model.normalization == "LayerNorm" else 1)


def _ffn_params(model: ModelConfig, width: int) -> int:
    return model.hidden_size * width * (3 if model.swiglu else 2)


def _ultramem(model: ModelConfig) -> tuple[int, int, int, int]:
    """(total params, activated params, matmul flops, pooling flops) of one UltraMem layer."""
    mem, hidden = model.ultramem, model.hidden_size
    value_dim = mem.resolved_value_dim(hidden)
    keys_per_axis, rank = mem.keys_per_axis, mem.tucker_rank
    norm = mem.key_dim * (2 if mem.qk_norm == "layernorm" else 1)
    query = hidden * 2 * mem.key_dim + 2 * norm  # query_proj, query_norm, key_norm
    keys = mem.num_heads * 2 * keys_per_axis * mem.key_dim * rank
    cores = mem.num_cores * mem.num_heads * rank * rank
    values = mem.num_values * value_dim
    out_proj = mem.expansion * value_dim * hidden
    conv = hidden * mem.query_conv_kernel
    dense = query + keys + cores + out_proj + conv
    total = dense + values
    read = mem.num_heads * mem.topk
    activated = dense + read * value_dim
    width = mem.candidates_per_axis
    matmul = 2 * (hidden * 2 * mem.key_dim                       # query projection
                  + 2 * mem.num_heads * keys_per_axis * rank * mem.key_dim  # row + column scores
                  + out_proj)
    pooling = 2 * read * value_dim + 2 * hidden * mem.query_conv_kernel
    return total, activated, matmul, pooling


def _pkm(model: ModelConfig) -> tuple[int, int, int, int]:
    pkm, hidden = model.pkm, model.hidden_size
    query = hidden * pkm.num_heads * pkm.key_dim
    batchnorm = 2 * pkm.num_heads * pkm.key_dim if pkm.query_batchnorm else 0
    keys = pkm.num_heads * pkm.num_keys * pkm.key_dim  # two halves of key_dim / 2
    values = pkm.num_values * hidden
    read = pkm.num_heads * pkm.topk
    total = query + batchnorm + keys + values
    activated = query + batchnorm + keys + read * hidden
    matmul = 2 * (query + keys)
    return total, activated, matmul, 2 * read * hidden


def model_stats(model: ModelConfig) -> ModelStats:
    hidden, layers, seq = model.hidden_size, model.num_layers, model.seq_length
    embedding = model.vocab_size * hidden
    positions = seq * hidden if model.position_embedding == "learned_absolute" else 0
    attention = 4 * hidden * hidden + _norm_params(model, hidden)
    pre_ffn_norm = _norm_params(model, hidden)
    if model.family == "moe":
        moe = model.moe
        expert = _ffn_params(model, moe.expert_ffn_hidden_size or model.ffn_size)
        router = hidden * moe.num_experts
        ffn_total, ffn_active = router + moe.num_experts * expert, router + moe.topk * expert
    else:
        ffn_total = ffn_active = _ffn_params(model, model.ffn_size)
    block_total = attention + pre_ffn_norm + ffn_total
    block_active = attention + pre_ffn_norm + ffn_active
    output = hidden * model.vocab_size + _norm_params(model, hidden)  # final norm + output layer

    total = embedding + positions + layers * block_total + output
    activated = hidden + positions // seq if positions else hidden  # one embedding row (+ position)
    activated += layers * block_active + output
    # Forward matmul FLOPs per token: every activated weight matrix once (the router included),
    # plus attention scores and the weighted sum over the full computed sequence.
    matmul = (2 * (layers * (4 * hidden * hidden + ffn_active) + hidden * model.vocab_size)
              + layers * 2 * 2 * seq * hidden)
    other = 0
    spans = parse_spans(model.memory_spans, layers)
    if model.family in ("ultramem", "pkm") and spans:
        mem_total, mem_active, mem_matmul, mem_other = (
            _ultramem(model) if model.family == "ultramem" else _pkm(model))
        total += len(spans) * mem_total
        activated += len(spans) * mem_active
        matmul += len(spans) * mem_matmul
        other += len(spans) * mem_other
    return ModelStats(total_params=total, activated_params=activated, matmul_flops=matmul,
                      other_flops=other)


def describe(stats: ModelStats) -> str:
    def fmt(n: float) -> str:
        exponent = min(int(math.log10(max(n, 1)) // 3), 4)
        return f"{n / 10 ** (3 * exponent):.3f}{' KMGT'[exponent].strip()}"

    return (f"total params {fmt(stats.total_params)} | activated params "
            f"{fmt(stats.activated_params)} | forward FLOPs/token {fmt(stats.forward_flops)} "
            f"(matmul {fmt(stats.matmul_flops)}) | training FLOPs/token {fmt(stats.flops_per_token)}")
