"""Triton two-phase top-m: memory/selection.py's two_phase_topk with the selection in one kernel."""

# Axis legend
#   t  tokens (flattened)      h  retrieval heads
#   a, b  row / column key index                  n  keys per axis
#   r, s  Tucker rank          c  Tucker cores
#   i, j  phase-1 candidate slots (row / column)  w  phase-1 candidates per axis
#   m  values kept per head (final top-m)
#
# One program per (token, head) does the whole selection in registers:
#   phase 1  f_row[a] = sum_r s_row[a, r] u[r] and f_col[b] = sum_s s_col[b, s] t[s]; top-w of each
#   phase 2  grid[i, j] = s_row[a_i]^T (sum_c C_c) s_col[b_j] over the w x w candidate pairs; top-m
# Each top-k takes the maximum k times, retiring the chosen entry each time.
# Tie rule, at all three top-k's: among equal scores the lower index wins, i.e. the lower key index
# a (or b) in phase 1 and the lower virtual index a * n + b in phase 2. Outputs come in descending
# summed score, ties in ascending virtual index. torch.topk on CPU has no simple tie order (on
# equal scores it returns neither the lowest indices nor them in order), so on ties the reference
# may select differently. NaN scores rank as +inf, as NaN ranks first in torch.topk.
# Selection runs in the reference's dtype (fp32, or float64 for float64 inputs); it has no gradient.
# The per-core scores of the chosen pairs are then computed in torch by the reference's own gathers
# and einsum, so their gradients w.r.t. s_row, s_col and the cores are the reference's.

import torch
import triton
import triton.language as tl

from ..memory.selection import upcast


@triton.jit
def _top_slot(score, live, index, big):
    """The lowest index among the live entries of maximal score (score, live, index of one shape;
    big exceeds every index)."""
    score = tl.where(score != score, float("inf"), score)  # NaN ranks first, as in torch.topk
    best = tl.max(tl.where(live, score, float("-inf")))
    return tl.min(tl.where(live & (score == best), index, big))


@triton.jit
def _phase1(scores, vec, base, num_keys, rank, width,
            BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    """Top-w keys of f[a] = sum_r scores[base + a * rank + r] vec[r] -> (key index [BW], their
    score rows [BW, BR]); slots >= width hold index 0 and zero rows."""
    keys = tl.arange(0, BLOCK_N)                                                    # [BN]
    ranks = tl.arange(0, BLOCK_R)                                                   # [BR]
    slots = tl.arange(0, BLOCK_W)                                                   # [BW]
    rank_ok = ranks < rank
    ok = (keys < num_keys)[:, None] & rank_ok[None, :]                              # [BN, BR]
    s = tl.load(scores + base + keys[:, None] * rank + ranks[None, :], mask=ok, other=0.0)
    v = tl.load(vec + ranks, mask=rank_ok, other=0.0)                               # [BR]
    f = tl.sum(s * v[None, :], axis=1)                                              # [BN]
    live = keys < num_keys
    chosen = tl.zeros([BLOCK_W], dtype=tl.int32)                                    # [BW]
    for i in range(width):
        pick = _top_slot(f, live, keys, BLOCK_N)
        chosen = tl.where(slots == i, pick, chosen)
        live = live & (keys != pick)
    cand_ok = (slots < width)[:, None] & rank_ok[None, :]                           # [BW, BR]
    cand = tl.load(scores + base + chosen[:, None] * rank + ranks[None, :], mask=cand_ok, other=0.0)
    return chosen, cand


@triton.jit
def _two_phase_kernel(s_row, s_col, cores, u, t, rows_out, cols_out, heads, num_keys, rank,
                      num_cores, width, topk, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """s_row, s_col [t, h, n, r]; cores [c, h, r, s]; u, t [h, r] -> the chosen pairs' row and
    column key indices rows_out, cols_out [t, h, m]; one program per (token, head)."""
    pid = tl.program_id(0).to(tl.int64)                                     # token * h + head
    head = pid % heads
    base = pid * num_keys * rank
    row_idx, row_cand = _phase1(s_row, u + head * rank, base, num_keys, rank, width,
                                BLOCK_N, BLOCK_W, BLOCK_R)                          # [BW], [BW, BR]
    col_idx, col_cand = _phase1(s_col, t + head * rank, base, num_keys, rank, width,
                                BLOCK_N, BLOCK_W, BLOCK_R)                          # [BW], [BW, BS]
    ranks = tl.arange(0, BLOCK_R)
    core_ok = (ranks < rank)[:, None] & (ranks < rank)[None, :]                     # [BR, BS]
    core_sum = tl.zeros([BLOCK_R, BLOCK_R], dtype=row_cand.dtype)
    for c in range(num_cores):
        offset = (c * heads + head) * rank * rank
        core_sum += tl.load(cores + offset + ranks[:, None] * rank + ranks[None, :], mask=core_ok,
                            other=0.0)
    row_proj = tl.sum(row_cand[:, :, None] * core_sum[None, :, :], axis=1)          # [BW, BS]
    grid = tl.sum(row_proj[:, None, :] * col_cand[None, :, :], axis=2)              # [BW, BW]
    slots = tl.arange(0, BLOCK_W)
    live = (slots < width)[:, None] & (slots < width)[None, :]                      # [BW, BW]
    virtual = row_idx.to(tl.int64)[:, None] * num_keys + col_idx[None, :]           # [BW, BW]
    for j in range(topk):
        pick = _top_slot(grid, live, virtual, num_keys * num_keys)
        tl.store(rows_out + pid * topk + j, pick // num_keys)
        tl.store(cols_out + pid * topk + j, pick % num_keys)
        live = live & (virtual != pick)


@torch.library.custom_op("ultramem::two_phase_select", mutates_args=())
def two_phase_select(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor,
                     u: torch.Tensor, t: torch.Tensor, width: int, topk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-dtype s_row, s_col [t, h, n, r], cores [c, h, r, s], u, t [h, r] -> the top-m pairs'
    row and column key indices [t, h, m] (int64), in descending summed score."""
    s_row, s_col, cores, u, t = (x.contiguous() for x in (s_row, s_col, cores, u, t))
    tokens, heads, num_keys, rank = s_row.shape
    rows = s_row.new_empty(tokens, heads, topk, dtype=torch.int64)
    cols = torch.empty_like(rows)
    if rows.numel():
        _two_phase_kernel[(tokens * heads,)](
            s_row, s_col, cores, u, t, rows, cols, heads, num_keys, rank, cores.shape[0], width,
            topk, BLOCK_N=triton.next_power_of_2(num_keys),
            BLOCK_W=triton.next_power_of_2(width), BLOCK_R=triton.next_power_of_2(rank))
    return rows, cols


@two_phase_select.register_fake
def _(s_row, s_col, cores, u, t, width, topk):
    rows = s_row.new_empty(*s_row.shape[:2], topk, dtype=torch.int64)
    return rows, torch.empty_like(rows)


def triton_two_phase_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor,
                          u: torch.Tensor, t: torch.Tensor, width: int, topk: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """memory.selection.two_phase_topk with the selection on a Triton kernel: same arguments,
    outputs (virtual indices [t, h, m], per-core scores [t, h, m, c]) and gradients; ties follow
    the rule in this module's header."""
    num_keys, rank = s_row.shape[2], s_row.shape[3]
    if not 1 <= width <= num_keys or not 1 <= topk <= width * width:
        raise ValueError(f"need 1 <= width <= {num_keys} keys and 1 <= topk <= width^2, "
                         f"got width {width}, topk {topk}")
    s_row, s_col = upcast(s_row), upcast(s_col)
    cores = cores.to(s_row.dtype)
    rows, cols = two_phase_select(s_row.detach(), s_col.detach(), cores.detach(),
                                  u.detach().to(s_row.dtype), t.detach().to(s_row.dtype),
                                  width, topk)                                      # [t, h, m]
    sel_row = s_row.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, rank))          # [t, h, m, r]
    sel_col = s_col.gather(2, cols.unsqueeze(-1).expand(-1, -1, -1, rank))          # [t, h, m, s]
    core_scores = torch.einsum("thmr,chrs,thms->thmc", sel_row, cores, sel_col)
    return rows * num_keys + cols, core_scores
