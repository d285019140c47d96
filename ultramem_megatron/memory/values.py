"""Implicit value expansion: E*N virtual addresses over N physical rows, pooled per group, one projection."""

# Axis legend
#   t  tokens        k  retrieved items per token (H*m)      c  Tucker cores (h)
#   n  physical rows (N)                 v  virtual addresses (E*N)
#   e  expansion groups (E)              d  value width (D_v)        D  hidden size
#   w  value columns held by this module (d unless a parallel wrapper holds a slice)

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.choice import pool_bags_for
from .lookup import lookup_pool


def virtual_permutation(num_virtual: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of the virtual addresses; the same seed gives the same
    permutation on every rank and every run. int32 halves the buffer (E*N entries per layer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_virtual, generator=generator, device="cpu").to(torch.int32)


@dataclass(frozen=True)
class TableSlice:
    """The part of the [N, D_v] value table and of the projection's D_v axis a module holds."""

    row_start: int
    rows: int
    col_start: int
    cols: int
    proj_col_start: int   # the projection's D_v columns held here
    proj_cols: int

    @classmethod
    def whole(cls, num_values: int, value_dim: int) -> "TableSlice":
        return cls(0, num_values, 0, value_dim, 0, value_dim)


class ExpansionProjection(nn.Module):
    """The E projectors W_p as one weight [D, e, w]: pooled [t, e, w] -> [t, D]."""

    def __init__(self, hidden_size: int, expansion: int, width: int, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, expansion, width, dtype=dtype,
                                               device=device))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled.flatten(1), self.weight.flatten(1))


class ImplicitValueExpansion(nn.Module):
    """values [n, d] seen as E reparameterized tables; output = sum_p W_p^T (pooled group p).

    Single-device: holds the whole table. A parallel wrapper subclasses it with a TableSlice and
    overrides dispatch(); everything else (permutation, init) is shared.
    """

    def __init__(self, num_values: int, value_dim: int, expansion: int, hidden_size: int,
                 shuffle_seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, table_slice: TableSlice | None = None,
                 kernel: str = "auto"):
        super().__init__()
        self.num_values, self.value_dim = num_values, value_dim
        self.expansion = expansion
        self.shuffle_seed = shuffle_seed
        self.kernel = kernel  # model.ultramem.kernel (kernels/choice.py)
        self.table_slice = table_slice or TableSlice.whole(num_values, value_dim)
        part = self.table_slice
        self.values = nn.Parameter(torch.empty(part.rows, part.cols, dtype=dtype, device=device))
        self.out_proj = ExpansionProjection(hidden_size, expansion, part.proj_cols, dtype, device)
        # virtual address -> slot; slot = group * N + physical row.
        self.register_buffer("virtual_to_slot", torch.empty(expansion * num_values,
                                                            dtype=torch.int32, device=device))
        self.reset_permutation()

    @torch.no_grad()
    def reset_permutation(self) -> None:
        """Rebuild the permutation from the seed (skipped on the meta device)."""
        if not self.virtual_to_slot.is_meta:
            self.virtual_to_slot.copy_(virtual_permutation(self.virtual_to_slot.numel(),
                                                           self.shuffle_seed))

    def locate(self, virtual_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """virtual_idx [t, k] -> (physical row [t, k], group [t, k])."""
        slot = self.virtual_to_slot[virtual_idx].long()
        return slot % self.num_values, slot // self.num_values

    def dispatch(self, virtual_idx: torch.Tensor, scores: torch.Tensor
                 ) -> Callable[[], torch.Tensor]:
        """virtual_idx [t, k]; per-core scores [t, k, c] -> a function returning [t, D].

        Split in two so a parallel wrapper can start its communication here and finish it when
        the output is needed (blocks later); on one device the work is all done here."""
        rows, groups = self.locate(virtual_idx)
        out = self.out_proj(lookup_pool(self.values, rows, groups, scores, self.expansion,
                                        pool=self.pool_fn()))
        return lambda: out

    def pool_fn(self) -> Callable[..., torch.Tensor]:
        """lookup.pool_bags or its Triton kernel, as model.ultramem.kernel chooses here."""
        return pool_bags_for(self.kernel, self.values)

    def forward(self, virtual_idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """virtual_idx [t, k]; per-core scores [t, k, c] -> [t, D]."""
        return self.dispatch(virtual_idx, scores)()
