"""Implicit value expansion: E*N virtual addresses over N physical rows, pooled per group, one projection."""

# Axis legend
#   t  tokens        k  retrieved items per token (H*m)      c  Tucker cores (h)
#   n  rows a layer addresses (N; its window of a shared table)   v  virtual addresses (E*N)
#   e  expansion groups (E; 1 when summed)   d  value width (D_v)   D  hidden size
#   w  value columns held by this module (d unless a parallel wrapper holds a slice)
#   p  pre-value columns held here (D_p, or a slice of it)
#
# UltraMem:    out = sum_g W_g^T sum_{items k in group g} sigma_k (x) V[row_k]
# UltraMemV2:  a ring window of a table shared by every layer (row = (slot mod N + offset) mod
#              N_all), items weighted by a_k = <P[row_k], W_pre x> (pre-values), groups summed
#              before one projection W_v.
# Memory+:     rows are the product-key indices, one table shared by every layer,
#              out = W_o (pooled * SiLU(W_s x)).

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.choice import pool_bags_for
from .lookup import lookup_pool
from .selection import upcast
from .tables import MemoryTables, TableSlice


def virtual_permutation(num_virtual: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of the virtual addresses; the same seed gives the same
    permutation on every rank and every run. int32 halves the buffer (E*N entries per layer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_virtual, generator=generator, device="cpu").to(torch.int32)


@dataclass(frozen=True)
class Readout:
    """How a layer turns its selected items into an output, beyond UltraMem's (the default)."""

    offset: int = 0                 # first table row of the layer's window (UltraMemV2 ring)
    pre_value_dim: int = 0          # D_p: weight items by <P[row], W_pre x> (UltraMemV2)
    pre_activation: Literal["none", "gelu"] = "none"
    sum_groups: bool = False        # sum the E groups before one projection (UltraMemV2)
    gate: bool = False              # out = W_o (pooled * SiLU(W_s x)) (Memory+)
    shuffle: bool = True            # permute the virtual addresses (not Memory+'s)


class ExpansionProjection(nn.Module):
    """The E projectors W_p as one weight [D, e, w]: pooled [t, e, w] -> [t, D]."""

    def __init__(self, hidden_size: int, expansion: int, width: int, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, expansion, width, dtype=dtype,
                                               device=device))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled.flatten(1), self.weight.flatten(1))


class InitLaterLinear(nn.Linear):
    """nn.Linear without its default init (which would draw a number of random values that
    depends on the slice a rank holds): the layer's init rule fills the weight."""

    def reset_parameters(self) -> None:
        pass


class ImplicitValueExpansion(nn.Module):
    """values [n, d] seen as E reparameterized tables; output = sum_p W_p^T (pooled group p).

    Single-device: holds the whole table, or reads the model's shared `tables`. A parallel
    wrapper subclasses it with a TableSlice and overrides dispatch(); everything else
    (addressing, pre-values, projection, permutation) is shared.
    """

    def __init__(self, num_values: int, value_dim: int, expansion: int, hidden_size: int,
                 shuffle_seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, table_slice: TableSlice | None = None,
                 kernel: str = "auto", tables: Optional[MemoryTables] = None,
                 readout: Readout = Readout()):
        super().__init__()
        self.num_values, self.value_dim = num_values, value_dim
        self.expansion = expansion
        self.shuffle_seed = shuffle_seed
        self.kernel = kernel  # model.ultramem.kernel (kernels/choice.py)
        self.readout = readout
        self.pooled_groups = 1 if readout.sum_groups else expansion
        if tables is None:  # a table of its own
            self.table_slice = table_slice or TableSlice.whole(num_values, value_dim)
            self.table_rows = num_values
            self.values = nn.Parameter(torch.empty(self.table_slice.rows, self.table_slice.cols,
                                                   dtype=dtype, device=device))
            self.pre_values = None
        else:  # shared tables: read, not registered (their owner holds them once)
            self.table_slice, self.table_rows = tables.value_slice, tables.rows
            self._shared = (tables,)
        part = self.table_slice
        self.out_proj = ExpansionProjection(hidden_size, self.pooled_groups, part.proj_cols,
                                            dtype, device)
        self.pre_slice = tables.pre_slice if self.pre_values is not None else None
        self.pre_value_dim = tables.pre_value_dim if self.pre_values is not None else 0
        self.pre_proj = (InitLaterLinear(hidden_size, self.pre_slice.proj_cols, bias=False,
                                         dtype=dtype, device=device)
                         if self.pre_slice is not None else None)
        self.gate_proj = (InitLaterLinear(hidden_size, part.proj_cols, bias=False, dtype=dtype,
                                          device=device) if readout.gate else None)
        # virtual address -> slot; slot = group * N + row of the window.
        self.register_buffer("virtual_to_slot", torch.empty(expansion * num_values,
                                                            dtype=torch.int32, device=device)
                             if readout.shuffle else None)
        self.reset_permutation()

    def __getattr__(self, name: str):
        """`values` / `pre_values`: the shared tables' when this module reads shared ones."""
        shared = self.__dict__.get("_shared")
        if shared is not None and name in ("values", "pre_values"):
            return getattr(shared[0], name)
        return super().__getattr__(name)

    @property
    def shares_tables(self) -> bool:
        return "_shared" in self.__dict__

    @torch.no_grad()
    def reset_permutation(self) -> None:
        """Rebuild the permutation from the seed (skipped on the meta device)."""
        if self.virtual_to_slot is not None and not self.virtual_to_slot.is_meta:
            self.virtual_to_slot.copy_(virtual_permutation(self.virtual_to_slot.numel(),
                                                           self.shuffle_seed))

    def window_position(self, virtual_idx: torch.Tensor) -> torch.Tensor:
        """virtual_idx [t, k] -> the row of the layer's window [t, k] (what usage counts)."""
        slot = self.virtual_to_slot[virtual_idx].long() if self.readout.shuffle \
            else virtual_idx.long()
        return slot % self.num_values

    def locate(self, virtual_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """virtual_idx [t, k] -> (table row [t, k], the bag group it is pooled into [t, k])."""
        slot = self.virtual_to_slot[virtual_idx].long() if self.readout.shuffle \
            else virtual_idx.long()
        rows = slot % self.num_values
        if self.table_rows != self.num_values or self.readout.offset:
            rows = (rows + self.readout.offset) % self.table_rows
        groups = slot // self.num_values
        return rows, (groups * 0 if self.readout.sum_groups else groups)

    def pre_query(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """hidden [t, D] -> W_pre x [t, p] in fp32 (float64 stays; None without pre-values)."""
        if self.pre_proj is None:
            return None
        hidden = upcast(hidden)
        return F.linear(hidden, self.pre_proj.weight.to(hidden.dtype))

    def pre_weighted(self, scores: torch.Tensor, rows: torch.Tensor, pre: torch.Tensor,
                     reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                     ) -> torch.Tensor:
        """scores [..., c] times act(a) with a = <P[rows], pre> [...]: rows [...] index the
        pre-values held here, pre [..., p] the matching columns of W_pre x; `reduce` sums the
        partial dot products over the ranks holding the other columns."""
        dot = reduce((upcast(self.pre_values[rows]) * upcast(pre)).sum(-1))  # fp32 or float64
        if self.readout.pre_activation == "gelu":
            dot = F.gelu(dot)
        return scores * dot.unsqueeze(-1).to(scores.dtype)

    def project(self, pooled: torch.Tensor, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """pooled [t, e, w] -> [t, D]: the projection, after Memory+'s SiLU gate."""
        if self.gate_proj is not None:
            gate = F.silu(F.linear(hidden.to(pooled.dtype), self.gate_proj.weight.to(pooled.dtype)))
            pooled = pooled * gate.unsqueeze(1)
        return self.out_proj(pooled)

    def dispatch(self, virtual_idx: torch.Tensor, scores: torch.Tensor,
                 hidden: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """virtual_idx [t, k]; per-core scores [t, k, c]; the layer input hidden [t, D] (read by
        pre-values and the gate) -> a function returning [t, D].

        Split in two so a parallel wrapper can start its communication here and finish it when
        the output is needed (blocks later); on one device the work is all done here."""
        rows, groups = self.locate(virtual_idx)
        if self.pre_values is not None:
            scores = self.pre_weighted(scores, rows, self.pre_query(hidden).unsqueeze(1))
        out = self.project(lookup_pool(self.values, rows, groups, scores, self.pooled_groups,
                                       pool=self.pool_fn()), hidden)
        return lambda: out

    def pool_fn(self) -> Callable[..., torch.Tensor]:
        """lookup.pool_bags or its Triton kernel, as model.ultramem.kernel chooses here."""
        return pool_bags_for(self.kernel, self.values)

    def forward(self, virtual_idx: torch.Tensor, scores: torch.Tensor,
                hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """virtual_idx [t, k]; per-core scores [t, k, c] -> [t, D]."""
        return self.dispatch(virtual_idx, scores, hidden)()
