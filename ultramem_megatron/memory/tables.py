"""The value (and pre-value) table that every memory layer of a model reads, as one set of parameters."""

# Axis legend
#   N  rows of the shared table (N_all)      d  value width (D_v)      p  pre-value width (D_p)
#
# UltraMemV2 keeps one [N_all, D_v] value table (and a [N_all, D_p] pre-value table) for all its
# layers, each reading a ring window of it; Memory+ keeps one [n^2, D_v] table all its layers read.
# MemoryTables holds this rank's slice of them. The model registers it once (`memory_tables`), so
# the optimizer, DDP, bf16 casts and checkpoints see one tensor, which autograd accumulates into
# from every layer; the layers' value modules read it without registering it. A layer built on
# its own registers tables of its own.

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .value_lr import mark_value_param

INIT_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class TableSlice:
    """The part of a [N, D_v] table and of the projection's D_v axis a module holds."""

    row_start: int
    rows: int
    col_start: int
    cols: int
    proj_col_start: int   # the projection's D_v columns held here
    proj_cols: int

    @classmethod
    def whole(cls, num_values: int, value_dim: int) -> "TableSlice":
        return cls(0, num_values, 0, value_dim, 0, value_dim)


@torch.no_grad()
def fill_table(table: torch.Tensor, part: TableSlice, total_rows: int, total_cols: int,
               std: float, seed: int) -> None:
    """N(0, std^2) entries that depend only on (seed, row, column), never on how the table is
    sliced: row block j of the full [total_rows, total_cols] table comes from its own generator
    seeded seed + j, and `table` (the slice `part`) keeps the part of each block it overlaps
    (memory: one block at a time). Nothing to fill on the meta device."""
    if table.is_meta:
        return
    rows = range(part.row_start, part.row_start + part.rows)
    for block in range(rows.start // INIT_BLOCK_ROWS, -(-rows.stop // INIT_BLOCK_ROWS)):
        first = block * INIT_BLOCK_ROWS
        last = min(first + INIT_BLOCK_ROWS, total_rows)
        generator = torch.Generator().manual_seed(seed + block)
        full = torch.randn(last - first, total_cols, generator=generator) * std
        lo, hi = max(first, rows.start), min(last, rows.stop)
        table[lo - rows.start:hi - rows.start].copy_(
            full[lo - first:hi - first, part.col_start:part.col_start + part.cols])


@dataclass(frozen=True)
class TablesShape:
    """What a family's shared tables are: rows, widths (pre_value_dim 0: none), init stds."""

    rows: int
    value_dim: int
    pre_value_dim: int
    stds: tuple[float, float]


class MemoryTables(nn.Module):
    """This rank's slices of the shared value table [rows, value_dim] and pre-value table
    [rows, pre_value_dim] (none when pre_value_dim is 0), drawn once from `seed` (build)."""

    def __init__(self, rows: int, value_dim: int, pre_value_dim: int, value_slice: TableSlice,
                 pre_slice: Optional[TableSlice], dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.rows, self.value_dim, self.pre_value_dim = rows, value_dim, pre_value_dim
        self.value_slice, self.pre_slice = value_slice, pre_slice if pre_value_dim else None
        self.values = _table(value_slice, dtype, device)
        self.pre_values = _table(pre_slice, dtype, device) if pre_value_dim else None

    @classmethod
    def build(cls, shape: TablesShape, seed: int, dtype: torch.dtype = torch.float32,
              device=None, value_slice: Optional[TableSlice] = None,
              pre_slice: Optional[TableSlice] = None) -> "MemoryTables":
        """The tables (whole by default), values N(0, stds[0]^2) and pre-values N(0, stds[1]^2)."""
        value_slice = value_slice or TableSlice.whole(shape.rows, shape.value_dim)
        if shape.pre_value_dim and pre_slice is None:
            pre_slice = TableSlice.whole(shape.rows, shape.pre_value_dim)
        tables = cls(shape.rows, shape.value_dim, shape.pre_value_dim, value_slice, pre_slice,
                     dtype, device)
        tables.reset_parameters(shape.stds, seed)
        return tables

    @torch.no_grad()
    def reset_parameters(self, stds: tuple[float, float], seed: int) -> None:
        fill_table(self.values, self.value_slice, self.rows, self.value_dim, stds[0], seed)
        if self.pre_values is not None:
            fill_table(self.pre_values, self.pre_slice, self.rows, self.pre_value_dim, stds[1],
                       seed + (1 << 40))


def _table(part: TableSlice, dtype: torch.dtype, device) -> nn.Parameter:
    return mark_value_param(nn.Parameter(torch.empty(part.rows, part.cols, dtype=dtype,
                                                     device=device)))
