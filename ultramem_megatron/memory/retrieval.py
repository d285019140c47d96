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
from .selection import tucker_key_scores, two_phase_topk


def make_norm(kind: str, width: int, dtype: torch.dtype, device=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width, dtype=dtype, device=device)
    return nn.RMSNorm(width, eps=1e-6, dtype=dtype, device=device)


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
        query = self.query_norm(self.query_proj(x).unflatten(-1, (2, -1)))  # [t, 2, k]
        return tucker_key_scores(query, self.key_norm(self.keys.transpose(-1, -2)))

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
