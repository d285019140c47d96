"""Hugging Face memory layers of an ultramem-megatron export: UltraMem(V2), PKM and Memory+."""

# Shipped inside every export next to modeling_ultramem.py, which builds these layers and calls
# memory(x, history, tables) on block i's pre-FFN normed input. Selection and pooling are the
# training code's own functions (memory_selection.py, memory_lookup.py), applied in the same
# order and dtypes as in training, so the export computes what the megatron model computes.
#
# Axis legend
#   b  batch        s  new positions        D  hidden size       t  tokens (b*s)
#   k  items read per token                 e  expansion groups (1 when summed)
#   c  Tucker cores                         N  rows of a table shared by every memory layer
#   h  heads        q  half query width (Memory+)               d  value width D_v
#   p  pre-value width D_p

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .memory_lookup import lookup_pool
from .memory_selection import (batch_normed, normed, product_key_scores, product_key_topk,
                               tucker_key_scores, tucker_keys, tucker_query, two_phase_topk,
                               upcast)


class MemoryTables(nn.Module):
    """The one value table [N, D_v] (and UltraMemV2's pre-value table [N, D_p]) that every
    memory layer of an UltraMemV2 or Memory+ model reads; stored once, as `model.memory_tables`."""

    def __init__(self, rows: int, value_dim: int, pre_value_dim: int = 0):
        super().__init__()
        self.values = nn.Parameter(torch.empty(rows, value_dim))
        self.pre_values = (nn.Parameter(torch.empty(rows, pre_value_dim))
                           if pre_value_dim else None)


def shared_tables(family: str, memory: dict) -> Optional[MemoryTables]:
    """The family's shared tables, from its config section (None for families without)."""
    if family == "ultramem_v2":
        return MemoryTables(memory["table_rows"], memory["value_dim"], memory["pre_value_dim"])
    if family == "memory_plus":
        return MemoryTables(memory["num_keys"] ** 2, memory["value_dim"])
    return None


class TuckerMemory(nn.Module):
    """The retrieval of UltraMem and UltraMemV2: optional causal query conv, TDQKR two-phase
    top-m with multi-core scoring, the virtual-address permutation."""

    def __init__(self, mem: dict, width: int, window_keys: Optional[int] = None,
                 query_ranks: int = 1):
        """window_keys: keys per axis before expansion, n (UltraMemV2: n', its window's);
        query_ranks: row / column queries per axis (UltraMemV2: one per Tucker rank)."""
        super().__init__()
        heads, rank, key_dim = mem["num_heads"], mem["tucker_rank"], mem["key_dim"]
        window_keys = window_keys or mem["num_keys"]
        keys_per_axis = math.isqrt(mem["expansion"]) * window_keys
        self.num_values, self.expansion = window_keys ** 2, mem["expansion"]
        self.width = mem["phase1_topk"] or mem["topk"]
        self.topk, self.kernel = mem["topk"], mem["query_conv_kernel"]
        self.query_ranks = query_ranks
        if self.kernel > 0:
            self.query_conv = nn.Conv1d(width, width, self.kernel, groups=width, bias=False)
        query_width = 2 * query_ranks * key_dim
        self.query_proj = nn.Linear(width, query_width, bias=False)
        norm = (lambda: nn.LayerNorm(key_dim)) if mem["qk_norm"] == "layernorm" else \
            (lambda: nn.RMSNorm(key_dim, eps=1e-6))
        self.query_norm, self.key_norm = norm(), norm()
        self.query_bn = (nn.BatchNorm1d(query_width, affine=False)
                         if mem.get("query_batchnorm", False) else None)
        self.keys = nn.Parameter(torch.empty(heads, 2, keys_per_axis, key_dim, rank))
        self.cores = nn.Parameter(torch.empty(mem["num_cores"], heads, rank, rank))
        self.register_buffer("rank1_row", torch.zeros(heads, rank))
        self.register_buffer("rank1_col", torch.zeros(heads, rank))
        self.register_buffer("virtual_to_slot",
                             torch.zeros(self.expansion * self.num_values, dtype=torch.int32))

    def select(self, x: torch.Tensor, history: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, s, D]; history [b, <kernel, D]: earlier inputs, for the causal query conv ->
        (slots [t, k], per-core scores [t, k, c]). The query side (conv, projection, norms,
        scores, top-k) runs in fp32 whatever the weights' dtype, as in training, so a bf16
        export selects what training selects."""
        batch, seq, width = x.shape
        query_in = x
        if self.kernel > 0:
            past = x.new_zeros(batch, self.kernel - 1, width)
            if history is not None and history.shape[1]:
                past = torch.cat((past, history), dim=1)[:, -(self.kernel - 1):]
            window = upcast(torch.cat((past, x), dim=1).transpose(1, 2))           # [b, D, s+K-1]
            query_in = F.conv1d(window, self.query_conv.weight.to(window.dtype),
                                groups=width).transpose(1, 2)
        tokens = query_in.reshape(batch * seq, width)
        centring = partial(batch_normed, self.query_bn) if self.query_bn is not None else None
        query = tucker_query(tokens, self.query_proj.weight, self.query_norm, centring,
                             self.query_ranks)                        # [t, 2, k] or [t, 2, r, k]
        s_row, s_col = tucker_key_scores(query, tucker_keys(self.keys, self.key_norm))
        virtual_idx, scores = two_phase_topk(s_row, s_col, self.cores, self.rank1_row,
                                             self.rank1_col, self.width, self.topk)
        slot = self.virtual_to_slot[virtual_idx.view(batch * seq, -1)].long()        # [t, k]
        return slot, scores.reshape(batch * seq, -1, self.cores.shape[0])


class UltraMemMemory(TuckerMemory):
    """UltraMem: TDQKR retrieval, implicit value expansion over a value table of its own
    [n^2, D_v], the E projections as one [D, E * D_v]: [b, s, D] -> [b, s, D]."""

    def __init__(self, config, index: int):
        super().__init__(config.ultramem, config.hidden_size)
        value_dim = config.ultramem["value_dim"]
        self.values = nn.Parameter(torch.empty(self.num_values, value_dim))
        self.out_proj = nn.Linear(self.expansion * value_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor],
                tables: Optional[MemoryTables] = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        slot, scores = self.select(x, history)
        pooled = lookup_pool(self.values, slot % self.num_values, slot // self.num_values,
                             scores, self.expansion)                  # [t, e, w], values' dtype
        return self.out_proj(pooled.flatten(1)).view(batch, seq, -1)


class UltraMemV2Memory(TuckerMemory):
    """UltraMemV2: UltraMem's retrieval (one query per Tucker rank by default) over the index-th
    ring window of the shared table: row = (slot mod n'^2 + window_offsets[index]) mod N (the
    window centred on, or starting at, the layer's own n^2 rows); each item's core
    scores times act(<P[row], W_pre x>); the E groups summed before one projection (or not)."""

    def __init__(self, config, index: int):
        mem = config.ultramem_v2
        super().__init__(mem, config.hidden_size, mem["window_keys"],
                         mem["tucker_rank"] if mem["query_per_rank"] else 1)
        self.offset, self.table_rows = mem["window_offsets"][index], mem["table_rows"]
        self.pooled_groups = 1 if mem["value_projection"] == "single" else self.expansion
        self.gelu = mem["pre_value_activation"] == "gelu"
        self.pre_proj = (nn.Linear(config.hidden_size, mem["pre_value_dim"], bias=False)
                         if mem["pre_value_dim"] else None)
        self.out_proj = nn.Linear(self.pooled_groups * mem["value_dim"], config.hidden_size,
                                  bias=False)

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor],
                tables: MemoryTables) -> torch.Tensor:
        batch, seq, width = x.shape
        slot, scores = self.select(x, history)                        # [t, k], [t, k, c]
        rows = slot % self.num_values
        if self.table_rows != self.num_values or self.offset:
            rows = (rows + self.offset) % self.table_rows
        groups = slot // self.num_values if self.pooled_groups > 1 else slot * 0
        if self.pre_proj is not None:   # fp32 dot products, as training's pre_weighted
            hidden = upcast(x.reshape(batch * seq, width))
            pre = F.linear(hidden, self.pre_proj.weight.to(hidden.dtype)).unsqueeze(1)  # [t, 1, p]
            dot = (upcast(tables.pre_values[rows]) * upcast(pre)).sum(-1)          # [t, k]
            if self.gelu:
                dot = F.gelu(dot)
            scores = scores * dot.unsqueeze(-1).to(scores.dtype)
        pooled = lookup_pool(tables.values, rows, groups, scores, self.pooled_groups)  # [t, e, d]
        return self.out_proj(pooled.flatten(1)).view(batch, seq, -1)


class ProductKeyMemory(nn.Module):
    """PKM (Lample et al. 2019): BatchNorm query, product-key top-k, softmax-weighted values."""

    def __init__(self, config, index: int):
        super().__init__()
        pkm, width = config.pkm, config.hidden_size
        self.heads, self.topk, self.half = pkm["num_heads"], pkm["topk"], pkm["key_dim"] // 2
        self.query_proj = nn.Linear(width, pkm["num_heads"] * pkm["key_dim"], bias=False)
        self.query_bn = (nn.BatchNorm1d(pkm["num_heads"] * pkm["key_dim"])
                         if pkm["query_batchnorm"] else nn.Identity())
        self.keys = nn.Parameter(torch.empty(pkm["num_heads"], 2, pkm["num_keys"], self.half))
        self.values = nn.Parameter(torch.empty(pkm["num_keys"] ** 2, width))

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor] = None,
                tables: Optional[MemoryTables] = None) -> torch.Tensor:
        batch, seq, width = x.shape
        flat = upcast(x.reshape(batch * seq, width))                              # fp32 query
        query = batch_normed(self.query_bn, F.linear(flat, self.query_proj.weight.to(flat.dtype)))
        s_first, s_second = product_key_scores(query.view(batch * seq, self.heads, 2, self.half),
                                               self.keys)
        rows, scores = product_key_topk(s_first, s_second, self.topk)             # [t, h, k]
        weights = F.softmax(scores, dim=-1).to(self.values.dtype)
        out = F.embedding_bag(rows.view(batch * seq, -1), self.values, mode="sum",
                              per_sample_weights=weights.view(batch * seq, -1))
        return out.view(batch, seq, width)


class MemoryPlusMemory(nn.Module):
    """Memory+ (Berges et al. 2024): q = W_q x [t, h, 2, q] RMS-normed per half, product-key
    top-k per head, softmax in fp32, pooled rows a*n+b of the shared table, W_o (pooled *
    SiLU(W_s x))."""

    def __init__(self, config, index: int):
        super().__init__()
        mem, width = config.memory_plus, config.hidden_size
        self.heads, self.topk, self.half = mem["num_heads"], mem["topk"], mem["key_dim"] // 2
        self.query_proj = nn.Linear(width, mem["num_heads"] * mem["key_dim"],
                                    bias=mem["query_bias"])
        self.query_norm = (nn.RMSNorm(self.half, eps=1e-6)
                           if mem["qk_norm"] in ("both", "query") else None)
        self.key_norm = nn.RMSNorm(self.half, eps=1e-6) if mem["qk_norm"] == "both" else None
        self.keys = nn.Parameter(torch.empty(mem["num_heads"], 2, mem["num_keys"], self.half))
        self.gate_proj = nn.Linear(width, mem["value_dim"], bias=False)
        self.out_proj = nn.Linear(mem["value_dim"], width, bias=False)

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor],
                tables: MemoryTables) -> torch.Tensor:
        batch, seq, width = x.shape
        hidden = x.reshape(batch * seq, width)
        flat = upcast(hidden)                                                      # fp32 query
        bias = self.query_proj.bias
        query = F.linear(flat, self.query_proj.weight.to(flat.dtype),
                         None if bias is None else bias.to(flat.dtype))
        query = query.view(batch * seq, self.heads, 2, self.half)
        keys = upcast(self.keys)
        if self.query_norm is not None:
            query = normed(self.query_norm, query)
        if self.key_norm is not None:
            keys = normed(self.key_norm, keys)
        rows, scores = product_key_topk(*product_key_scores(query, keys), self.topk)  # [t, h, k]
        weights = F.softmax(scores, dim=-1).view(batch * seq, -1, 1)
        rows = rows.view(batch * seq, -1)
        pooled = lookup_pool(tables.values, rows, rows * 0, weights, 1)             # [t, 1, d]
        gate = F.silu(F.linear(hidden.to(pooled.dtype), self.gate_proj.weight.to(pooled.dtype)))
        return self.out_proj((pooled * gate.unsqueeze(1)).flatten(1)).view(batch, seq, -1)


MEMORIES = {"ultramem": UltraMemMemory, "ultramem_v2": UltraMemV2Memory,
            "pkm": ProductKeyMemory, "memory_plus": MemoryPlusMemory}
