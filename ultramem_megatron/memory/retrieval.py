"""TDQKR: Tucker-decomposed query-key retrieval with multi-core scoring and a two-phase top-m."""

# Axis legend
#   t  tokens (flattened)            D  hidden size
#   h  retrieval heads (H), sharing one query
#   a, b  row / column key index     n  keys per axis (sqrt(E) * num_keys)
#   r, s  Tucker rank (r)            c  Tucker cores (multi-core scoring)
#   w  phase-1 candidates per axis   m  values kept per head (final top-m)
#   k  query / key width D_k

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import UltraMemConfig
from ..kernels.choice import two_phase_topk_for
from .selection import (batch_normed, rank1_scores, selection_dtype, tucker_key_scores,
                        tucker_keys, tucker_query, updates_running_stats, upcast)


def make_norm(kind: str, width: int, dtype: torch.dtype, device=None) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width, dtype=dtype, device=device)
    return nn.RMSNorm(width, eps=1e-6, dtype=dtype, device=device)


def core_sum_svd(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of sum_c C_c per head on the host, in fp32 (float64 stays float64): the r x r
    matrices are tiny and a device SVD synchronises anyway, so this is one device->host copy.
    -> left [h, r, r], singular [h, r] (descending), right_t [h, s, s]."""
    core_sum = cores.detach().to("cpu", selection_dtype(cores.dtype)).sum(0)  # [h, r, s]
    return torch.linalg.svd(core_sum)


def rank1_filter(cores: torch.Tensor, prev_u: torch.Tensor, prev_t: torch.Tensor,
                 svd: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors (u, t) [h, r] of sum_c C_c (fp32, on the host), signs
    aligned with the previous (u, t): the pair is flipped when -(u, t) is closer in L1, so the
    filter never swaps halves. `svd` is core_sum_svd(cores), when the caller has it already."""
    left, _, right_t = svd if svd is not None else core_sum_svd(cores)
    u, t = left[..., 0].float(), right_t[..., 0, :].float()
    prev_u, prev_t = prev_u.detach().float().cpu(), prev_t.detach().float().cpu()
    keep = (u - prev_u).abs().sum(-1) + (t - prev_t).abs().sum(-1)
    flip = (u + prev_u).abs().sum(-1) + (t + prev_t).abs().sum(-1)
    sign = torch.where(flip < keep, -1.0, 1.0).unsqueeze(-1)
    return u * sign, t * sign


def tucker_penalty(svd: tuple[torch.Tensor, ...], weight: float, margin: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """From the SVD of sum_c C_c: the penalty P = alpha/(r-1) * mean_h sum_{i>=2}
    relu(sigma_i - tau)^2 [] and its gradient dP/d(sum_c C_c) [h, r, s] =
    alpha/(r-1) * mean_h sum_{i>=2} 2 relu(sigma_i - tau) u_i v_i^T (d sigma_i = u_i^T dC v_i)."""
    left, singular, right_t = svd
    heads, rank = singular.shape
    excess = F.relu(singular[:, 1:] - margin)  # [h, r-1]
    scale = weight / (rank - 1)
    penalty = scale * excess.pow(2).sum(-1).mean()
    grad = torch.einsum("hri,hi,his->hrs", left[:, :, 1:], 2 * scale / heads * excess,
                        right_t[:, 1:, :])
    return penalty, grad


def surrogate_aux_loss(cores: torch.Tensor, penalty: torch.Tensor, grad: torch.Tensor
                       ) -> torch.Tensor:
    """A scalar whose value is `penalty` and whose gradient w.r.t. every core C_c is `grad`
    [h, r, s] (fp32): penalty + <sum_c C_c, G> - <sum_c C_c, G> with the second term detached.
    No SVD here, so no host synchronisation in the forward or the backward."""
    core_sum = upcast(cores).sum(0)  # [h, r, s]
    grad = grad.to(core_sum.dtype)
    linear = (core_sum * grad).sum() - (core_sum.detach() * grad).sum()  # exactly 0
    return penalty.to(core_sum.dtype) + linear


def tucker_aux_loss(cores: torch.Tensor, weight: float, margin: float) -> torch.Tensor:
    """alpha/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 on sum_c C_c, averaged over heads, with its
    exact gradient (fp32; float64 cores give float64). Computes the SVD now: a layer uses the
    penalty cached at refresh_rank1() instead (TuckerRetrieval.aux_loss)."""
    if cores.shape[-1] < 2 or weight == 0:
        return cores.new_zeros((), dtype=selection_dtype(cores.dtype))
    penalty, grad = tucker_penalty(core_sum_svd(cores), weight, margin)
    return surrogate_aux_loss(cores, penalty.to(cores.device), grad.to(cores.device))


# A differentiable sum over the ranks that split the tokens (sequence parallelism), whose
# backward sums the ranks' gradients too; None on one device (model/specs.py supplies it).
TokenSum = Optional[Callable[[torch.Tensor], torch.Tensor]]


def token_batch_normed(norm: nn.BatchNorm1d, x: torch.Tensor, token_sum: TokenSum = None
                       ) -> torch.Tensor:
    """selection.batch_normed, with the training statistics taken over the tokens of every rank
    token_sum spans (one collective), so a sequence-parallel run normalises as one device does.
    x [t, c] -> [t, c]; running statistics updated as nn.BatchNorm1d does (unbiased variance)."""
    if token_sum is None or not norm.training:
        return batch_normed(norm, x)
    width = x.shape[1]
    stats = token_sum(torch.cat([x.sum(0), x.pow(2).sum(0), x.new_full((1,), x.shape[0])]))
    count = stats[-1]
    mean = stats[:width] / count
    var = (stats[width:2 * width] / count - mean.pow(2)).clamp_min(0)
    if updates_running_stats(norm):
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else \
                1.0 / float(norm.num_batches_tracked)
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
            norm.running_var.lerp_((var * count / (count - 1)).to(norm.running_var.dtype),
                                   momentum)
    out = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.to(x.dtype) + norm.bias.to(x.dtype)
    return out


def key_balance_loss(s_row: torch.Tensor, s_col: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                     width: int, token_sum: TokenSum = None) -> torch.Tensor:
    """UltraMemV2's key balance, a Switch-style load-balancing loss on each axis's keys:
    n * sum_a p_a f_a, with p the tokens' mean softmax of the rank-1 filter scores f = S u and
    f_a the share of phase-1 selections key a got. 1 when both are uniform; averaged over heads
    and summed over the row and column axes. s_row, s_col [t, h, n, r]; u, t [h, r] -> [] fp32.
    With token_sum, p and f are over the tokens of every rank it spans (one collective)."""
    total = s_row.new_zeros(())
    for scores, filter_vec in ((s_row, u), (s_col, t)):
        tokens, heads, num_keys = scores.shape[:3]
        f = rank1_scores(scores, filter_vec)  # [t, h, n]
        prob_sum = f.softmax(-1).sum(0)  # [h, n]
        with torch.no_grad():
            chosen = f.topk(width, -1).indices.transpose(0, 1).reshape(heads, -1)  # [h, t*w]
            counts = torch.zeros_like(prob_sum).scatter_add_(
                1, chosen, torch.ones_like(chosen, dtype=prob_sum.dtype))
        stats = torch.cat([prob_sum.flatten(), counts.flatten(), prob_sum.new_full((1,), tokens)])
        if token_sum is not None:
            stats = token_sum(stats)
        cells, all_tokens = heads * num_keys, stats[-1]
        prob = stats[:cells].view(heads, num_keys) / all_tokens
        share = stats[cells:2 * cells].view(heads, num_keys) / (all_tokens * width)
        total = total + num_keys * (prob * share).sum(-1).mean()
    return total


class TuckerRetrieval(nn.Module):
    """x [t, D] -> (virtual indices [t, h*m], per-core scores [t, h*m, c]).

    Query, keys, scores and both top-k run in fp32 whatever the parameter dtype (selection.py).
    The cores change only at optimizer steps, so refresh_rank1() computes the one SVD of
    sum_c C_c a step needs (on the host) for the rank-1 filter and the Tucker aux loss; the
    forward then uses the cached penalty and gradient and never synchronises with the host.
    The cache is keyed by the cores' version counter and storage: a change the key sees (init,
    load_state_dict, an in-place optimizer update) recomputes it at the next forward (correct,
    one host sync); writes through `.data`, as megatron's optimizers make, are not seen, which
    is why refresh_rank1() must follow every optimizer step (as it must for (u, t)).
    """

    def __init__(self, cfg: UltraMemConfig, hidden_size: int, dtype: torch.dtype = torch.float32,
                 device=None, token_sum: TokenSum = None):
        super().__init__()
        self.cfg = cfg
        self.token_sum = token_sum  # query BatchNorm and key balance see every rank's tokens
        heads, n, k, r = cfg.num_heads, cfg.keys_per_axis, cfg.key_dim, cfg.tucker_rank
        # One row / column query, or (UltraMemV2) one per Tucker rank.
        self.query_ranks = r if getattr(cfg, "query_per_rank", False) else 1
        width = 2 * self.query_ranks * k
        self.query_proj = nn.Linear(hidden_size, width, bias=False, dtype=dtype, device=device)
        # Optional standardisation of the query channels over the tokens (no affine: a learnt
        # bias would bring back the shared component it removes); fp32 statistics.
        self.query_bn = (nn.BatchNorm1d(width, affine=False, device=device)
                         if cfg.query_batchnorm else None)
        self.query_norm = make_norm(cfg.qk_norm, k, dtype, device)  # shared by row and column
        self.key_norm = make_norm(cfg.qk_norm, k, dtype, device)
        self.keys = nn.Parameter(torch.empty(heads, 2, n, k, r, dtype=dtype, device=device))
        self.cores = nn.Parameter(torch.empty(cfg.num_cores, heads, r, r, dtype=dtype, device=device))
        # Rank-1 filter of sum_c C_c: non-trainable, refreshed by refresh_rank1() once per step.
        self.register_buffer("rank1_row", torch.zeros(heads, r, device=device))
        self.register_buffer("rank1_col", torch.zeros(heads, r, device=device))
        self._aux_cache: tuple | None = None  # (cores key, penalty [], gradient [h, r, s])
        self._keys_cache: tuple | None = None  # (keys key, normed keys), inference only
        self._balance: torch.Tensor | None = None  # the last training forward's key balance

    def key_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [t, D] -> row and column scores [t, h, n, r] in fp32 (one query for all heads)."""
        centring = (partial(token_batch_normed, self.query_bn, token_sum=self.token_sum)
                    if self.query_bn is not None else None)
        query = tucker_query(x, self.query_proj.weight, self.query_norm, centring,
                             self.query_ranks)  # [t, 2, k] or [t, 2, r, k]
        return tucker_key_scores(query, self.normed_keys())

    def normed_keys(self) -> torch.Tensor:
        """The keys normed over k, fp32 [h, 2, n, r, k]. Without autograd (inference, evaluation)
        they are computed once and kept, laid out so each axis's [h*n*r, k] matrix is a view,
        until the keys or their norm change; refresh_rank1() drops them after every optimizer
        step (megatron's optimizers write through `.data`, which the key does not see)."""
        if torch.is_grad_enabled():
            return tucker_keys(self.keys, self.key_norm)
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype)
                    for p in (self.keys, *self.key_norm.parameters()))
        if self._keys_cache is None or self._keys_cache[0] != key:
            normed = tucker_keys(self.keys, self.key_norm)
            self._keys_cache = (key, normed.transpose(0, 1).contiguous().transpose(0, 1))
        return self._keys_cache[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_row, s_col = self.key_scores(x)
        self._balance = None
        if self.training and self.cfg.key_balance_weight > 0:
            self._balance = self.cfg.key_balance_weight * key_balance_loss(
                s_row, s_col, self.rank1_row, self.rank1_col, self.cfg.candidates_per_axis,
                self.token_sum)
        select = two_phase_topk_for(self.cfg.kernel, s_row)  # torch or Triton (kernels/)
        virtual_idx, core_scores = select(
            s_row, s_col, self.cores, self.rank1_row, self.rank1_col,
            self.cfg.candidates_per_axis, self.cfg.topk)
        tokens = x.shape[0]
        return virtual_idx.view(tokens, -1), core_scores.reshape(tokens, -1, self.cores.shape[0])

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute (u, t) and the aux-loss cache from the current cores; call once per
        optimizer step. One device->host copy of sum_c C_c and one host->device copy back."""
        self._keys_cache = None
        svd = core_sum_svd(self.cores)
        u, t = rank1_filter(self.cores, self.rank1_row, self.rank1_col, svd)
        self.rank1_row.copy_(u)
        self.rank1_col.copy_(t)
        self._cache_penalty(svd)

    def _cores_key(self) -> tuple:
        cores = self.cores
        return cores._version, cores.data_ptr(), cores.device, cores.dtype

    def _has_aux(self) -> bool:
        return self.cfg.tucker_rank >= 2 and self.cfg.aux_loss_weight != 0

    def _cache_penalty(self, svd: tuple[torch.Tensor, ...]) -> None:
        if self._has_aux():
            penalty, grad = tucker_penalty(svd, self.cfg.aux_loss_weight, self.cfg.aux_loss_margin)
            device = self.cores.device
            self._aux_cache = (self._cores_key(), penalty.to(device), grad.to(device))

    def aux_loss(self) -> torch.Tensor:
        """The Tucker aux loss (fp32) from the cache, recomputed first if the cores changed,
        plus the last training forward's key-balance loss when key_balance_weight > 0."""
        balance = self._balance
        if not self._has_aux():
            zero = self.cores.new_zeros((), dtype=selection_dtype(self.cores.dtype))
            return zero if balance is None else zero + balance
        if self._aux_cache is None or self._aux_cache[0] != self._cores_key():
            self._cache_penalty(core_sum_svd(self.cores))  # stale: one host sync
        tucker = surrogate_aux_loss(self.cores, *self._aux_cache[1:])
        return tucker if balance is None else tucker + balance
