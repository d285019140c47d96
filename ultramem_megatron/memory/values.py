"""Implicit value expansion: E*N virtual addresses over N physical rows, pooled per group, one projection."""

# Axis legend
#   t  tokens        k  retrieved items per token (H*m)      c  Tucker cores (h)
#   n  physical rows (N)                 v  virtual addresses (E*N)
#   e  expansion groups (E)              d  value width (D_v)        D  hidden size

import torch
from torch import nn

from .lookup import lookup_pool


def virtual_permutation(num_virtual: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of the virtual addresses; the same seed gives the same
    permutation on every rank and every run. int32 halves the buffer (E*N entries per layer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_virtual, generator=generator, device="cpu").to(torch.int32)


class ImplicitValueExpansion(nn.Module):
    """values [n, d] seen as E reparameterized tables; output = sum_p W_p^T (pooled group p)."""

    def __init__(self, num_values: int, value_dim: int, expansion: int, hidden_size: int,
                 shuffle_seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None):
        super().__init__()
        self.num_values = num_values
        self.expansion = expansion
        self.shuffle_seed = shuffle_seed
        self.values = nn.Parameter(torch.empty(num_values, value_dim, dtype=dtype, device=device))
        # One Linear(E*d -> D): block p of its input columns is the projector W_p.
        self.out_proj = nn.Linear(expansion * value_dim, hidden_size, bias=False,
                                  dtype=dtype, device=device)
        # virtual address -> slot; slot = group * N + physical row.
        self.register_buffer("virtual_to_slot", torch.empty(expansion * num_values,
                                                            dtype=torch.int32, device=device))
        # Rows read since the last take_rows_hit() (training only); a metric, never saved.
        self.register_buffer("rows_hit", torch.zeros(num_values, dtype=torch.bool, device=device),
                             persistent=False)
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

    def forward(self, virtual_idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """virtual_idx [t, k]; per-core scores [t, k, c] -> [t, D]."""
        rows, groups = self.locate(virtual_idx)
        if self.training:
            self.rows_hit[rows.flatten()] = True
        pooled = lookup_pool(self.values, rows, groups, scores, self.expansion)  # [t, e, d]
        return self.out_proj(pooled.flatten(1))
