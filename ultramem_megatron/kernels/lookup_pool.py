"""Triton lookup-and-pool: memory/lookup.py's pool_bags as fused gather-scale-sum kernels."""

# Axis legend
#   i  items in any order (one row read each)   b  bags (output rows; a bag sums some items)
#   n  value rows held here                     c  Tucker cores (value chunk c scaled by core c)
#   w  the columns held here (of value_dim)     j  positions in the items sorted by a key
#   s  segments: the keys the items are sorted by (bags forward, rows for the table gradient)
#
# The forward and the table gradient are one segment reduction: sort the items by a key (stable
# argsort), find each key's run with searchsorted (CSR offsets, no host sync), and let one program
# per (key, column block) sum score * source row over its run in fp32:
#   forward   out[b, col]     = sum over i of bag b: scores[i, core(col)] * table[rows[i], col]
#   backward  d_table[r, col] = sum over i of row r: scores[i, core(col)] * grad[bags[i], col]
# Backward choice: this sorted segment reduction rather than fp32 atomics into a zeroed buffer. It
# needs no [n, w] fp32 buffer and no cast pass, writes every row of the dense gradient once (rows no
# item touched get zeros from their empty run), and sums each row's items in one fixed order, so the
# gradients are bitwise reproducible run to run (atomics add in arrival order; resume tests compare
# bitwise). The price is one argsort of the items by row per backward.
# The score gradient is one program per (item block, core) over that core's held columns.
# Scores are used in their own precision (the reference rounds them to the table dtype first).

import torch
import triton
import triton.language as tl

from ..memory.lookup import core_pieces

BLOCK_ITEMS = 16


def _block_cols(width: int) -> int:
    return min(128, triton.next_power_of_2(width))


@triton.jit
def _segment_pool_kernel(source, index, scores, order, offsets, out, width, chunk, col_start,
                         cores, BLOCK_I: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[s, col] = sum over j in [offsets[s], offsets[s+1]) of scores[order[j], core(col)] *
    source[index[order[j]], col]; one program per (s, column block)."""
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)                      # [BW]
    col_ok = cols < width
    core = (col_start + cols) // chunk                                              # [BW]
    start = tl.load(offsets + segment)
    end = tl.load(offsets + segment + 1)
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_I):
        j = j0 + tl.arange(0, BLOCK_I)                                              # [BI]
        item_ok = j < end
        item = tl.load(order + j, mask=item_ok, other=0)                            # [BI]
        src_row = tl.load(index + item, mask=item_ok, other=0).to(tl.int64)         # [BI]
        ok = item_ok[:, None] & col_ok[None, :]                                     # [BI, BW]
        value = tl.load(source + src_row[:, None] * width + cols[None, :], mask=ok, other=0.0)
        score = tl.load(scores + item[:, None] * cores + core[None, :], mask=ok, other=0.0)
        acc += tl.sum(value.to(tl.float32) * score.to(tl.float32), axis=0)
    tl.store(out + segment * width + cols, acc.to(out.dtype.element_ty), mask=col_ok)


@triton.jit
def _score_grad_kernel(grad, table, rows, bags, d_scores, items, width, chunk, col_start, cores,
                       BLOCK_I: tl.constexpr, BLOCK_W: tl.constexpr):
    """d_scores[i, c] = sum over the held columns of core c of
    grad[bags[i], col] * table[rows[i], col]; one program per (item block, core)."""
    core = tl.program_id(1)
    item = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)          # [BI]
    item_ok = item < items
    row = tl.load(rows + item, mask=item_ok, other=0).to(tl.int64)
    bag = tl.load(bags + item, mask=item_ok, other=0).to(tl.int64)
    # core c's chunk is columns [c*chunk, (c+1)*chunk) of the full table; clip it to the held slice
    lo = tl.maximum(core * chunk - col_start, 0)
    hi = tl.minimum(core * chunk + chunk - col_start, width)
    acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)                                           # [BW]
        ok = item_ok[:, None] & (cols < hi)[None, :]                                # [BI, BW]
        g = tl.load(grad + bag[:, None] * width + cols[None, :], mask=ok, other=0.0)
        value = tl.load(table + row[:, None] * width + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(g.to(tl.float32) * value.to(tl.float32), axis=1)
    tl.store(d_scores + item * cores + core, acc.to(d_scores.dtype.element_ty), mask=item_ok)


def _sorted_segments(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [i] -> (order [i]: items sorted by key, stably; offsets [count+1]: key s's run is
    order[offsets[s]:offsets[s+1]])."""
    sorted_keys, order = keys.sort(stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(count + 1, device=keys.device,
                                                           dtype=keys.dtype))
    return order, offsets


def _segment_pool(source: torch.Tensor, index: torch.Tensor, scores: torch.Tensor,
                  keys: torch.Tensor, count: int, dtype: torch.dtype, col_start: int,
                  chunk: int) -> torch.Tensor:
    """source [*, w], index [i], scores [i, c], keys [i] -> [count, w] in dtype (see the legend)."""
    width = source.shape[1]
    out = torch.empty(count, width, dtype=dtype, device=source.device)
    if out.numel():
        order, offsets = _sorted_segments(keys, count)
        block_w = _block_cols(width)
        _segment_pool_kernel[(count, triton.cdiv(width, block_w))](
            source, index, scores, order, offsets, out, width, chunk, col_start, scores.shape[1],
            BLOCK_I=BLOCK_ITEMS, BLOCK_W=block_w)
    return out


@torch.library.custom_op("ultramem::pool_bags_fwd", mutates_args=())
def pool_bags_fwd(table: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor,
                  scores: torch.Tensor, num_bags: int, col_start: int, value_dim: int
                  ) -> torch.Tensor:
    """table [n, w], rows, bags [i], scores [i, c] -> out [num_bags, w] in the table's dtype."""
    return _segment_pool(table.contiguous(), rows.contiguous(), scores.contiguous(), bags,
                         num_bags, table.dtype, col_start, value_dim // scores.shape[1])


@pool_bags_fwd.register_fake
def _(table, rows, bags, scores, num_bags, col_start, value_dim):
    return table.new_empty(num_bags, table.shape[1])


@torch.library.custom_op("ultramem::pool_bags_bwd", mutates_args=())
def pool_bags_bwd(grad: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                  bags: torch.Tensor, scores: torch.Tensor, col_start: int, value_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [b, w] of out -> (d_table [n, w] in the table's dtype, d_scores [i, c] in theirs)."""
    grad, table, scores = grad.contiguous(), table.contiguous(), scores.contiguous()
    rows, bags = rows.contiguous(), bags.contiguous()
    items, cores = scores.shape
    chunk = value_dim // cores
    d_table = _segment_pool(grad, bags, scores, rows, table.shape[0], table.dtype, col_start,
                            chunk)
    d_scores = torch.empty_like(scores)
    if items:
        block_w = _block_cols(table.shape[1])
        _score_grad_kernel[(triton.cdiv(items, BLOCK_ITEMS), cores)](
            grad, table, rows, bags, d_scores, items, table.shape[1], chunk, col_start, cores,
            BLOCK_I=BLOCK_ITEMS, BLOCK_W=block_w)
    return d_table, d_scores


@pool_bags_bwd.register_fake
def _(grad, table, rows, bags, scores, col_start, value_dim):
    return torch.empty_like(table), torch.empty_like(scores)


def _setup_context(ctx, inputs, output):
    table, rows, bags, scores, _, ctx.col_start, ctx.value_dim = inputs
    ctx.save_for_backward(table, rows, bags, scores)


def _backward(ctx, grad):
    table, rows, bags, scores = ctx.saved_tensors
    d_table, d_scores = pool_bags_bwd(grad, table, rows, bags, scores, ctx.col_start,
                                      ctx.value_dim)
    return d_table, None, None, d_scores, None, None, None


pool_bags_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_pool_bags(table: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor,
                     scores: torch.Tensor, num_bags: int, col_start: int = 0,
                     value_dim: int | None = None) -> torch.Tensor:
    """memory.lookup.pool_bags on Triton kernels: same arguments, output and gradients (table and
    scores). Accumulates in fp32 for any table dtype; gradients are bitwise reproducible."""
    value_dim = value_dim or table.shape[1]
    core_pieces(value_dim, scores.shape[-1], col_start, table.shape[1])  # raises on a bad slice
    return pool_bags_fwd(table, rows, bags, scores, num_bags, col_start, value_dim)
