"""The lookup-and-pool op: gather value rows, scale each core's chunk by its score, sum into bags."""

# Axis legend
#   t  tokens (flattened sequence x batch)     k  retrieved items per token (H*m)
#   i  items in any order (one row read each)  b  bags (output rows; a bag sums some items)
#   n  value rows held here                    e  virtual-expansion groups (E)
#   c  Tucker cores (h); value chunk c (of width d/c) is scaled by core c's score
#   d  full value width D_v                    w  the columns held here (a slice of d)
#   q  pieces: the held columns cut where a core's chunk ends, so each piece has one core

import math

import torch
import torch.nn.functional as F


def core_pieces(value_dim: int, num_cores: int, col_start: int, width: int) -> tuple[int, int]:
    """Cut columns [col_start, col_start + width) of a value_dim-wide table into equal pieces
    that each lie inside one core's chunk -> (piece width, number of pieces)."""
    if value_dim % num_cores:
        raise ValueError(f"value width {value_dim} is not divisible by the number of cores "
                         f"{num_cores}")
    chunk = value_dim // num_cores
    if not (0 <= col_start and width >= 1 and col_start + width <= value_dim):
        raise ValueError(f"columns [{col_start}, {col_start + width}) are not inside a "
                         f"{value_dim}-wide value table")
    piece = math.gcd(width, chunk, col_start)
    return piece, width // piece


def pool_bags(table: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor, scores: torch.Tensor,
              num_bags: int, col_start: int = 0, value_dim: int | None = None) -> torch.Tensor:
    """out[b, col] = sum over items i with bags[i] == b of scores[i, core(col)] * table[rows[i], col].

    table [n, w] holds columns [col_start, col_start + w) of a [*, value_dim] value table (all of
    it by default); rows, bags [i] (integer); scores [i, c] -> out [num_bags, w] in the table's
    dtype; empty bags are 0.

    Reference path: one ``embedding_bag`` over the table seen as [n*q, w/q], one bag per
    (bag, piece). It never materializes the [i, w] gathered rows; autograd gives the dense table
    gradient and the score gradient. The table is read in its own dtype (never upcast: it is the
    largest tensor of the model) with the scores rounded to it; embedding_bag's sum accumulates in
    fp32 for a bf16 table on CUDA and on CPU (measured: the error of a 4096-item bf16 bag is the
    final rounding alone). Its dense table gradient accumulates in fp32 on CUDA but in bf16 on CPU.
    No host synchronisation: bag offsets come from searchsorted on the sorted bag ids (bincount
    reads its max() to the host on CUDA), the pieces' cores from arange (no list copied in).
    """
    num_rows, width = table.shape
    piece, pieces = core_pieces(value_dim or width, scores.shape[-1], col_start, width)
    chunk = (value_dim or width) // scores.shape[-1]
    piece_index = torch.arange(pieces, device=rows.device)
    piece_core = (col_start + piece_index * piece) // chunk                          # [q]
    table_row = (rows.long().unsqueeze(-1) * pieces + piece_index).flatten()       # [i*q]
    bag_piece = (bags.long().unsqueeze(-1) * pieces + piece_index).flatten()       # [i*q]
    weight = scores[:, piece_core].flatten().to(table.dtype)                         # [i*q]
    # Bags must be contiguous in embedding_bag's input: sort the (item, piece) pairs by bag.
    sorted_bag, order = bag_piece.sort(stable=True)
    offsets = torch.searchsorted(sorted_bag, torch.arange(num_bags * pieces, device=rows.device))
    pooled = F.embedding_bag(table_row[order], table.reshape(num_rows * pieces, piece), offsets,
                             mode="sum", per_sample_weights=weight[order])
    return pooled.view(num_bags, width)


def lookup_pool(values: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor,
                scores: torch.Tensor, num_groups: int, col_start: int = 0,
                value_dim: int | None = None, pool=pool_bags) -> torch.Tensor:
    """pooled[t, g, col] = sum over items k of token t with groups[t, k] == g of
    scores[t, k, core(col)] * values[rows[t, k], col].

    values [n, w] (columns [col_start, col_start + w) of the table, all of it by default);
    rows, groups [t, k] (integer); scores [t, k, c] -> pooled [t, e, w]. `pool` is pool_bags or
    a kernel with its signature.
    """
    tokens, items, cores = scores.shape
    bags = torch.arange(tokens, device=rows.device).unsqueeze(-1) * num_groups + groups.long()
    pooled = pool(values, rows.reshape(-1), bags.reshape(-1), scores.reshape(-1, cores),
                  tokens * num_groups, col_start, value_dim)
    return pooled.view(tokens, num_groups, values.shape[1])  # [t, e, w]
