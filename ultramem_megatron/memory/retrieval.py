"""TDQKR: Tucker-decomposed query-key retrieval with multi-core scoring and a two-phase top-m."""

# Axis legend
#   t  tokens (flattened)            D  hidden size
#   h  retrieval heads (H), sharing one query
#   a, b  row / column key index     n  keys per axis (sqrt(E) * num_keys)
#   r, s  Tucker rank (r)            c  Tucker cores (multi-core scoring)
#   w  phase-1 candidates per axis   m  values kept per head (final top-m)
#   k  query / key width D_k

import torch
import torch.nn.functional as F
from torch import nn

from .config import UltraMemConfig


def make_norm(kind: str, width: int, dtype: torch.dtype, device=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width, dtype=dtype, device=device)
    return nn.RMSNorm(width, eps=1e-6, dtype=dtype, device=device)


def two_phase_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor,
                   u: torch.Tensor, t: torch.Tensor, width: int, topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 filter, then exact multi-core re-scoring of the width x width candidates.

    s_row, s_col [t, h, n, r]; cores [c, h, r, s]; u, t [h, r] (the rank-1 filter of sum_c C_c).
    Returns virtual indices a * n + b [t, h, m] and per-core raw scores [t, h, m, c] (no softmax).
    Indices are chosen without gradient; gradients reach s_row, s_col and the cores only through
    the scores of the finally selected (a, b) pairs.
    """
    num_keys, rank = s_row.shape[2], s_row.shape[3]
    with torch.no_grad():  # phase 1: selection only
        row_idx = torch.einsum("thar,hr->tha", s_row, u.to(s_row.dtype)).topk(width, -1).indices
        col_idx = torch.einsum("thbr,hr->thb", s_col, t.to(s_col.dtype)).topk(width, -1).indices
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


def rank1_filter(cores: torch.Tensor, prev_u: torch.Tensor, prev_t: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors (u, t) [h, r] of sum_c C_c (fp32), signs aligned with the previous
    (u, t): the pair is flipped when -(u, t) is closer in L1, so the filter never swaps halves."""
    core_sum = cores.detach().float().sum(0)  # [h, r, s]
    left, _, right_t = torch.linalg.svd(core_sum)
    u, t = left[..., 0], right_t[..., 0, :]
    prev_u, prev_t = prev_u.float(), prev_t.float()
    keep = (u - prev_u).abs().sum(-1) + (t - prev_t).abs().sum(-1)
    flip = (u + prev_u).abs().sum(-1) + (t + prev_t).abs().sum(-1)
    sign = torch.where(flip < keep, -1.0, 1.0).unsqueeze(-1)
    return u * sign, t * sign


def tucker_aux_loss(cores: torch.Tensor, weight: float, margin: float) -> torch.Tensor:
    """alpha/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 on sum_c C_c, averaged over heads."""
    rank = cores.shape[-1]
    if rank < 2 or weight == 0:
        return cores.new_zeros(())
    compute_dtype = torch.promote_types(cores.dtype, torch.float32)
    singular = torch.linalg.svdvals(cores.to(compute_dtype).sum(0))  # [h, r], descending
    penalty = F.relu(singular[:, 1:] - margin).pow(2).sum(-1).mean()
    return (weight / (rank - 1) * penalty).to(cores.dtype)


class TuckerRetrieval(nn.Module):
    """x [t, D] -> (virtual indices [t, h*m], per-core scores [t, h*m, c])."""

    def __init__(self, cfg: UltraMemConfig, hidden_size: int, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.cfg = cfg
        heads, n, k, r = cfg.num_heads, cfg.keys_per_axis, cfg.key_dim, cfg.tucker_rank
        self.query_proj = nn.Linear(hidden_size, 2 * k, bias=False, dtype=dtype, device=device)
        self.query_norm = make_norm(cfg.qk_norm, k, dtype, device)  # shared by row and column
        self.key_norm = make_norm(cfg.qk_norm, k, dtype, device)
        self.keys = nn.Parameter(torch.empty(heads, 2, n, k, r, dtype=dtype, device=device))
        self.cores = nn.Parameter(torch.empty(cfg.num_cores, heads, r, r, dtype=dtype, device=device))
        # Rank-1 filter of sum_c C_c: non-trainable, refreshed by refresh_rank1() once per step.
        self.register_buffer("rank1_row", torch.zeros(heads, r, device=device))
        self.register_buffer("rank1_col", torch.zeros(heads, r, device=device))

    def key_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [t, D] -> row and column scores [t, h, n, r] (one query shared by all heads)."""
        tokens = x.shape[0]
        heads, n, k, r = self.keys.shape[0], self.keys.shape[2], self.keys.shape[3], self.keys.shape[4]
        query = self.query_norm(self.query_proj(x).view(tokens, 2, k))  # [t, 2, k]
        keys = self.key_norm(self.keys.transpose(-1, -2))  # [h, 2, n, r, k], normed over k
        s_row = query[:, 0] @ keys[:, 0].reshape(heads * n * r, k).t()
        s_col = query[:, 1] @ keys[:, 1].reshape(heads * n * r, k).t()
        return s_row.view(tokens, heads, n, r), s_col.view(tokens, heads, n, r)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_row, s_col = self.key_scores(x)
        virtual_idx, core_scores = two_phase_topk(
            s_row, s_col, self.cores, self.rank1_row, self.rank1_col,
            self.cfg.candidates_per_axis, self.cfg.topk)
        tokens = x.shape[0]
        return virtual_idx.view(tokens, -1), core_scores.reshape(tokens, -1, self.cores.shape[0])

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute (u, t) from the current cores; call once per optimizer step."""
        u, t = rank1_filter(self.cores, self.rank1_row, self.rank1_col)
        self.rank1_row.copy_(u)
        self.rank1_col.copy_(t)

    def aux_loss(self) -> torch.Tensor:
        return tucker_aux_loss(self.cores, self.cfg.aux_loss_weight, self.cfg.aux_loss_margin)
