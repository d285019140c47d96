"""Initialization rules for UltraMem: the paper's (default) and the released code's."""

import math

import torch
from torch import nn

from .retrieval import TuckerRetrieval, rank1_filter
from .selection import two_phase_topk
from .values import ImplicitValueExpansion


@torch.no_grad()
def mean_selected_score(cores: torch.Tensor, keys_per_axis: int, width: int, topk: int,
                        trials: int = 64, seed: int = 0) -> float:
    """Monte-Carlo mean of the per-core scores the retrieval selects when every row and column
    score is a standard normal (what unit query gain and key gain 1/sqrt(D_k) give at init).

    This is the paper's "mean of the top-m of n standard normals", taken through the real
    two-phase top-m and Tucker cores instead of a single list of normals.
    """
    generator = torch.Generator().manual_seed(seed)
    cores = cores.detach().float().cpu()
    heads, rank = cores.shape[1], cores.shape[2]
    u, t = rank1_filter(cores, torch.zeros(heads, rank), torch.zeros(heads, rank))
    shape = (trials, heads, keys_per_axis, rank)
    s_row = torch.randn(shape, generator=generator)
    s_col = torch.randn(shape, generator=generator)
    _, scores = two_phase_topk(s_row, s_col, cores, u, t, width, topk)
    mean = scores.mean().item()
    if not mean > 0:
        raise ValueError(f"mean selected score at init is {mean}; the paper init needs it positive")
    return mean


@torch.no_grad()
def _set_norm_gain(norm: nn.Module, gain: float) -> None:
    norm.weight.fill_(gain)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


VALUE_INIT_BLOCK_ROWS = 4096


@torch.no_grad()
def fill_value_table(values: ImplicitValueExpansion, std: float, seed: int) -> None:
    """N(0, std^2) values that depend only on (seed, row, column), never on how the table is
    sliced: row block j of the full [N, D_v] table comes from its own generator seeded seed + j,
    and each module keeps its TableSlice of the blocks it overlaps (memory: one block at a time)."""
    part, table = values.table_slice, values.values
    rows = range(part.row_start, part.row_start + part.rows)
    for block in range(rows.start // VALUE_INIT_BLOCK_ROWS, -(-rows.stop // VALUE_INIT_BLOCK_ROWS)):
        first = block * VALUE_INIT_BLOCK_ROWS
        last = min(first + VALUE_INIT_BLOCK_ROWS, values.num_values)
        generator = torch.Generator().manual_seed(seed + block)
        full = torch.randn(last - first, values.value_dim, generator=generator) * std
        lo, hi = max(first, rows.start), min(last, rows.stop)
        table[lo - rows.start:hi - rows.start].copy_(
            full[lo - first:hi - first, part.col_start:part.col_start + part.cols])


@torch.no_grad()
def init_ultramem(retrieval: TuckerRetrieval, values: ImplicitValueExpansion, num_layers: int,
                  rule: str = "paper", generator: torch.Generator | None = None) -> None:
    """Initialize every parameter of one UltraMem layer in place, then its rank-1 filter.

    paper:    values N(0, E/(2 m H L)); output projection N(0, 1/(E D_v)), so the layer's output
              variance is about 1/(2L) like a GPT residual branch; key-norm gain 1/sqrt(D_k);
              query-norm gain 1/sqrt(mean selected score at unit gain), so selected scores ~ 1.
    official: the released code: norm gains D_k^-0.33, W_q and keys N(0, 1/D_k), values N(0, 0.02^2),
              output projection N(0, 1/(E D_v)).
    Tucker cores are U(0, 1) under both rules (the paper gives no rule; this is the code's).
    Random numbers are drawn in the same order and amount whatever slice of the table and the
    projection `values` holds, so every parallel layout starts from the same weights.
    On the meta device there is nothing to fill: materialize, then call this again.
    """
    if retrieval.cores.is_meta:
        return
    cfg = retrieval.cfg
    key_dim, hidden = cfg.key_dim, retrieval.query_proj.in_features
    expansion, value_dim, part = values.expansion, values.value_dim, values.table_slice

    def normal_(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std)

    retrieval.cores.copy_(torch.rand(retrieval.cores.shape, generator=generator,
                                     dtype=retrieval.cores.dtype))
    normal_(retrieval.keys, key_dim ** -0.5)
    projection = values.out_proj.weight
    full_projection = torch.randn((projection.shape[0], expansion, value_dim), generator=generator,
                                  dtype=projection.dtype) * (expansion * value_dim) ** -0.5
    projection.copy_(full_projection[..., part.proj_col_start:part.proj_col_start + part.proj_cols])
    value_seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    if rule == "paper":
        normal_(retrieval.query_proj.weight, hidden ** -0.5)
        value_var = expansion / (2 * cfg.topk * cfg.num_heads * num_layers)
        fill_value_table(values, math.sqrt(value_var), value_seed)
        mean_score = mean_selected_score(retrieval.cores, cfg.keys_per_axis,
                                         cfg.candidates_per_axis, cfg.topk)
        _set_norm_gain(retrieval.key_norm, key_dim ** -0.5)
        _set_norm_gain(retrieval.query_norm, 1.0 / math.sqrt(mean_score))
    elif rule == "official":
        normal_(retrieval.query_proj.weight, key_dim ** -0.5)
        fill_value_table(values, 0.02, value_seed)
        _set_norm_gain(retrieval.key_norm, key_dim ** -0.33)
        _set_norm_gain(retrieval.query_norm, key_dim ** -0.33)
    else:
        raise ValueError(f"unknown init rule {rule!r}: expected 'paper' or 'official'")
    values.reset_permutation()
    retrieval.rank1_row.zero_()
    retrieval.rank1_col.zero_()
    retrieval.refresh_rank1()
