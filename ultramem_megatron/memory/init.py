"""Initialization rules for UltraMem: the paper's (default) and the released code's."""

import math

import torch
from torch import nn

from .retrieval import TuckerRetrieval, rank1_filter
from .selection import two_phase_topk
from .tables import fill_table
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
        fill_table(values.values, part, values.num_values, value_dim, math.sqrt(value_var),
                   value_seed)
    elif rule == "official":
        normal_(retrieval.query_proj.weight, key_dim ** -0.5)
        fill_table(values.values, part, values.num_values, value_dim, 0.02, value_seed)
    _set_gains_and_refresh(retrieval, values, rule, official_gain_power=-0.33)


def _set_gains_and_refresh(retrieval: TuckerRetrieval, values: ImplicitValueExpansion,
                           rule: str, official_gain_power: float) -> None:
    """The query / key norm gains of a rule, then the permutation and the rank-1 filter.
    paper: key gain 1/sqrt(D_k), query gain 1/sqrt(mean selected score at unit gain), so the
    selected scores are ~ 1; official: both D_k^official_gain_power."""
    cfg = retrieval.cfg
    if rule == "paper":
        mean_score = mean_selected_score(retrieval.cores, cfg.keys_per_axis,
                                         cfg.candidates_per_axis, cfg.topk)
        _set_norm_gain(retrieval.key_norm, cfg.key_dim ** -0.5)
        _set_norm_gain(retrieval.query_norm, 1.0 / math.sqrt(mean_score))
    elif rule == "official":
        _set_norm_gain(retrieval.key_norm, cfg.key_dim ** official_gain_power)
        _set_norm_gain(retrieval.query_norm, cfg.key_dim ** official_gain_power)
    else:
        raise ValueError(f"unknown init rule {rule!r}: expected 'paper' or 'official'")
    values.reset_permutation()
    retrieval.rank1_row.zero_()
    retrieval.rank1_col.zero_()
    retrieval.refresh_rank1()


def v2_table_stds(cfg, hidden: int, ffn_hidden: int, num_layers: int, rule: str
                  ) -> tuple[float, float]:
    """(value, pre-value) table stds of UltraMemV2 (ultramem-v2-spec.md 1.5).

    official: N(0, 0.02^2) for both. paper (App. A): the memory's output variance
    0.16 sigma_V^4 D_p m H D_v / D equals a GPT FFN's 0.064 k_inner / (2L), k_inner = FFN / D, so
    sigma_V^4 = 0.2 k_inner D / (m H D_p D_v L) for both tables (the fourth-power reading of
    eq. 26, with sigma_s = 0; the README model gets sigma_V = 0.081). Without pre-values the same
    balance gives sigma_V^2 = 0.08 k_inner D / (m H D_v L) (our derivation, same steps)."""
    if rule == "official":
        return 0.02, 0.02
    value_dim, pre_dim = cfg.resolved_value_dim(hidden), cfg.resolved_pre_value_dim(hidden)
    k_inner, spread = ffn_hidden / hidden, cfg.topk * cfg.num_heads * num_layers
    if pre_dim:
        std = (0.2 * k_inner * hidden / (spread * pre_dim * value_dim)) ** 0.25
        return std, std
    return math.sqrt(0.08 * k_inner * hidden / (spread * value_dim)), 0.0


@torch.no_grad()
def draw_slice(param: torch.Tensor, full_shape: tuple[int, ...], std: float, dim: int, start: int,
               generator: torch.Generator | None) -> None:
    """Fill param with its slice [start, start + param.shape[dim]) along `dim` of a full
    N(0, std^2) tensor drawn whole, so every parallel layout draws the same numbers."""
    full = torch.randn(full_shape, generator=generator, dtype=param.dtype) * std
    param.copy_(full.narrow(dim, start, param.shape[dim]))


@torch.no_grad()
def init_ultramem_v2(retrieval: TuckerRetrieval, values: ImplicitValueExpansion, hidden: int,
                     rule: str = "paper", generator: torch.Generator | None = None) -> None:
    """Initialize one UltraMemV2 layer's own parameters in place (the shared tables are drawn
    once by the model: v2_table_stds), then its rank-1 filter.

    paper:    W_q, W_pre and W_v N(0, 2/(5D)) (App. A); key-norm gain 1/sqrt(D_k) and query-norm
              gain 1/sqrt(mean selected score), so selected scores ~ 1 (as UltraMem's paper rule).
    official: W_q N(0, 1/D_k), W_pre N(0, 1/D), W_v N(0, 1/fan_in), norm gains D_k^-0.4.
    Both: keys N(0, 1/D_k), Tucker cores U(0, 1). Every draw is of the full tensor, sliced."""
    if retrieval.cores.is_meta:
        return
    cfg = retrieval.cfg
    key_dim, part = cfg.key_dim, values.table_slice
    retrieval.cores.copy_(torch.rand(retrieval.cores.shape, generator=generator,
                                     dtype=retrieval.cores.dtype))
    draw_slice(retrieval.keys, retrieval.keys.shape, key_dim ** -0.5, 0, 0, generator)
    projection = values.out_proj.weight  # [D, e, w]
    fan_in = projection.shape[1] * values.value_dim
    paper_std = math.sqrt(2 / (5 * hidden))
    draw_slice(retrieval.query_proj.weight, retrieval.query_proj.weight.shape,
               paper_std if rule == "paper" else key_dim ** -0.5, 0, 0, generator)
    draw_slice(projection, (hidden, projection.shape[1], values.value_dim),
               paper_std if rule == "paper" else fan_in ** -0.5, 2, part.proj_col_start, generator)
    if values.pre_proj is not None:
        pre = values.pre_slice
        draw_slice(values.pre_proj.weight, (values.pre_value_dim, hidden),
                   paper_std if rule == "paper" else hidden ** -0.5, 0, pre.proj_col_start,
                   generator)
    _set_gains_and_refresh(retrieval, values, rule, official_gain_power=-0.4)
