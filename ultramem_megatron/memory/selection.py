"""Which memory slots a token reads: TDQKR's two-phase top-m and PKM's product-key top-k.

Plain torch, no package imports: the exported Hugging Face model ships this file next to its
modeling code (as memory_selection.py), so inference selects exactly what training selected.
Selection runs in fp32 whatever the parameter dtype (float64 stays float64): bf16 rounding of
the query, the key scores and the cores flips near-tied top-k choices (megatron's MoE router is
kept in fp32 for the same reason). The inputs are cast here, so callers may pass bf16 tensors.
"""

# Axis legend
#   t  tokens (flattened)      h  retrieval heads, sharing one query
#   a, b  row / column key index                  n  keys per axis
#   r, s  Tucker rank          c  Tucker cores (multi-core scoring)
#   w  phase-1 candidates per axis                m  values kept per head (final top-m)
#   k  query / key width D_k     q  PKM half-query width

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def selection_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype retrieval math runs in: fp32 for bf16 / fp16 / fp32 parameters, else float64."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(selection_dtype(x.dtype))


def normed(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An nn.RMSNorm / nn.LayerNorm applied in x's dtype, its affine parameters cast to it."""
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    if isinstance(norm, nn.LayerNorm):
        bias = None if norm.bias is None else norm.bias.to(x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, weight, norm.eps)


def tucker_query(x: torch.Tensor, proj_weight: torch.Tensor, norm: nn.Module,
                 centring: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ranks: int = 1) -> torch.Tensor:
    """x [t, D] -> normed row / column query [t, 2, k] in fp32 (proj_weight [2k, D], no bias),
    or with `ranks` = r > 1 one query per Tucker rank (UltraMemV2): [t, 2, r, k] from
    proj_weight [2rk, D], rows ordered (axis, rank, k). `centring` ([t, c] -> [t, c], e.g.
    batch_normed with a BatchNorm1d over the c channels) standardises each channel over the
    tokens before the per-token norm, as PKM's BatchNorm."""
    x = upcast(x)
    query = F.linear(x, proj_weight.to(x.dtype))  # [t, 2rk]
    if centring is not None:
        query = centring(query)
    shape = (2, -1) if ranks == 1 else (2, ranks, -1)
    return normed(norm, query.unflatten(-1, shape))


def tucker_keys(keys: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """keys [h, 2, n, k, r] -> normed over k, in fp32, as [h, 2, n, r, k]."""
    return normed(norm, upcast(keys.transpose(-1, -2)))


def tucker_key_scores(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [t, 2, k] (normed row / column query), or [t, 2, r, k] (one per Tucker rank);
    keys [h, 2, n, r, k] (normed over k) -> row and column scores [t, h, n, r], in fp32 (or
    float64): S[t, h, a, i] = <query(axis, i), keys[h, axis, a, i]>."""
    query = upcast(query)
    keys = keys.to(query.dtype)
    tokens, heads, n, r, k = query.shape[0], keys.shape[0], keys.shape[2], keys.shape[3], keys.shape[4]
    if query.dim() == 4:  # per rank: one [t, k] x [k, h*n] product per (axis, rank)
        scores = [torch.stack([query[:, axis, i] @ keys[:, axis, :, i].reshape(heads * n, k).t()
                               for i in range(r)], dim=-1).view(tokens, heads, n, r)
                  for axis in (0, 1)]
        return scores[0], scores[1]
    s_row = query[:, 0] @ keys[:, 0].reshape(heads * n * r, k).t()
    s_col = query[:, 1] @ keys[:, 1].reshape(heads * n * r, k).t()
    return s_row.view(tokens, heads, n, r), s_col.view(tokens, heads, n, r)


def rank1_scores(scores: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """The rank-1 filter's key scores sum_r scores[..., r] vec[h, r]: scores [t, h, n, r], vec
    [h, r] -> [t, h, n], in scores' dtype. A loop over the (small) Tucker rank: 3x faster on
    CPU than the einsum, which permutes scores into a batched matmul of inner width r."""
    vec = vec.to(scores.dtype).unsqueeze(-2)  # [h, 1, r]
    out = scores[..., 0] * vec[..., 0]
    for i in range(1, scores.shape[-1]):
        out = out + scores[..., i] * vec[..., i]
    return out


def two_phase_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor,
                   u: torch.Tensor, t: torch.Tensor, width: int, topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 filter, then exact multi-core re-scoring of the width x width candidates.

    s_row, s_col [t, h, n, r]; cores [c, h, r, s]; u, t [h, r] (the rank-1 filter of sum_c C_c).
    Returns virtual indices a * n + b [t, h, m] and per-core raw scores [t, h, m, c] (no softmax),
    computed in fp32 (float64 for float64 inputs) whatever the inputs' dtype.
    Indices are chosen without gradient; gradients reach s_row, s_col and the cores only through
    the scores of the finally selected (a, b) pairs.
    """
    num_keys, rank = s_row.shape[2], s_row.shape[3]
    s_row, s_col = upcast(s_row), upcast(s_col)
    cores = cores.to(s_row.dtype)
    with torch.no_grad():  # phase 1: selection only
        row_idx = rank1_scores(s_row, u).topk(width, -1).indices  # [t, h, w]
        col_idx = rank1_scores(s_col, t).topk(width, -1).indices
    row_cand = s_row.gather(2, row_idx.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, w, r]
    col_cand = s_col.gather(2, col_idx.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, w, r]
    with torch.no_grad():  # phase 2 ranking: sum_c S_c = S_row^T (sum_c C_c) S_col
        grid = torch.einsum("thar,hrs,thbs->thab", row_cand, cores.sum(0), col_cand)
        best = grid.flatten(2).topk(topk, -1).indices  # [t, h, m]
        best_row, best_col = best // width, best % width
    sel_row = row_cand.gather(2, best_row.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, m, r]
    sel_col = col_cand.gather(2, best_col.unsqueeze(-1).expand(-1, -1, -1, rank))  # [t, h, m, s]
    core_scores = torch.einsum("thmr,chrs,thms->thmc", sel_row, cores, sel_col)
    virtual_idx = row_idx.gather(2, best_row) * num_keys + col_idx.gather(2, best_col)
    return virtual_idx, core_scores


def updates_running_stats(norm: nn.BatchNorm1d) -> bool:
    """A training forward that builds the autograd graph moves the running statistics; one
    without it does not: megatron's full recompute runs a block first without the graph, then
    again in the backward, and the statistics must move once."""
    return norm.training and norm.track_running_stats and torch.is_grad_enabled()


def batch_normed(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An nn.BatchNorm1d (or nn.Identity) applied in x's dtype: its parameters and running
    statistics cast to it; in training the statistics are updated as nn.BatchNorm1d does."""
    if not isinstance(norm, nn.BatchNorm1d):
        return norm(x)
    cast = [None if v is None else v.to(x.dtype)
            for v in (norm.running_mean, norm.running_var, norm.weight, norm.bias)]
    use_batch = norm.training or norm.running_mean is None
    momentum = norm.momentum or 0.0
    if use_batch and not updates_running_stats(norm):
        cast[0] = cast[1] = None   # batch statistics, running ones left alone
    if updates_running_stats(norm):
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative average, as nn.BatchNorm1d
            momentum = 1.0 / float(norm.num_batches_tracked)
    out = F.batch_norm(x, cast[0], cast[1], cast[2], cast[3], use_batch, momentum, norm.eps)
    if updates_running_stats(norm) and cast[0] is not norm.running_mean:
        with torch.no_grad():  # batch_norm updated the upcast copies: store them back
            norm.running_mean.copy_(cast[0])
            norm.running_var.copy_(cast[1])
    return out


def product_key_scores(query: torch.Tensor, keys: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """query [t, h, 2, q] (two halves per head); keys [h, 2, n, q] -> the halves' scores
    s_first, s_second [t, h, n], in fp32 (or float64)."""
    query = upcast(query)
    keys = keys.to(query.dtype)
    s_first = torch.einsum("thq,hnq->thn", query[:, :, 0], keys[:, 0])
    s_second = torch.einsum("thq,hnq->thn", query[:, :, 1], keys[:, 1])
    return s_first, s_second


def product_key_topk(s_first: torch.Tensor, s_second: torch.Tensor, topk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of s_first[a] + s_second[b] over the n x n grid.

    s_first, s_second [t, h, n] -> (value rows a * n + b [t, h, k], scores [t, h, k] in fp32).
    Exact because the k best sums only use each half's k best entries.
    """
    num_keys = s_first.shape[-1]
    s_first, s_second = upcast(s_first), upcast(s_second)
    first, second = s_first.topk(topk, -1), s_second.topk(topk, -1)
    grid = first.values.unsqueeze(-1) + second.values.unsqueeze(-2)  # [t, h, k, k]
    scores, best = grid.flatten(2).topk(topk, -1)
    rows = (first.indices.gather(-1, best // topk) * num_keys
            + second.indices.gather(-1, best % topk))
    return rows, scores
