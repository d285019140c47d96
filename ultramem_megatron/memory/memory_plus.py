"""Memory+ (Berges et al. 2024): product keys, softmax over the top-k, one shared table, gated output."""

# Axis legend
#   s  sequence    b  micro-batch    t = s*b tokens    D  hidden size
#   h  heads       n  sub-keys per half    k  top-k    q  half query width (key_dim / 2)
#   d  value width (D_v)
#
# q = W_q x [t, h, 2, q] (RMS-normed per half: memory_plus.qk_norm) -> product-key top-k of
# s1[a] + s2[b] per head -> softmax over the k in fp32 -> pooled = sum softmax * V[a*n + b]
# (V [n^2, D_v] shared by every Memory+ layer) -> out = W_o (pooled * SiLU(W_s x)).

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from .config import MemoryPlusConfig
from .init import draw_slice
from .selection import normed, product_key_scores, product_key_topk, upcast
from .tables import MemoryTables, TablesShape
from .usage import UsageTracker
from .values import ImplicitValueExpansion, Readout

READOUT = Readout(gate=True, shuffle=False)   # row = product-key index; one group; gated output


def memory_plus_tables_shape(memory: MemoryPlusConfig, config: TransformerConfig) -> TablesShape:
    """The one value table every Memory+ layer reads: n^2 rows of D_v, N(0, 1/D_v) (Meta's)."""
    width = memory.resolved_value_dim(config.hidden_size)
    return TablesShape(memory.num_values, width, 0, (width ** -0.5, 0.0))


def memory_plus_tables(memory: MemoryPlusConfig, config: TransformerConfig, seed: int, **slices
                       ) -> MemoryTables:
    """The table every Memory+ layer reads, drawn from `seed`."""
    return MemoryTables.build(memory_plus_tables_shape(memory, config), seed,
                              config.params_dtype, **slices)


class MemoryPlusLayer(MegatronModule):
    """x [s, b, D] (the pre-FFN normed hidden state) -> (Memory+ output [s, b, D], zero aux loss).

    `values` is the value module's spec (ImplicitValueExpansion on one device, the sharded one in
    a parallel model); `tables` the model's shared table (one of its own when built alone).
    Under sequence parallelism the query side runs on this rank's tokens, so its parameters are
    marked `sequence_parallel`."""

    def __init__(self, config: TransformerConfig, memory: MemoryPlusConfig,
                 values: Optional[ModuleSpec] = None, tables: Optional[MemoryTables] = None,
                 layer_index: int = 0):
        super().__init__(config)
        hidden, dtype = config.hidden_size, config.params_dtype
        self.memory, half = memory, memory.key_dim // 2
        self.query_proj = nn.Linear(hidden, memory.num_heads * memory.key_dim,
                                    bias=memory.query_bias, dtype=dtype)
        self.query_norm = (nn.RMSNorm(half, eps=1e-6, dtype=dtype)
                           if memory.qk_norm in ("both", "query") else None)
        self.key_norm = (nn.RMSNorm(half, eps=1e-6, dtype=dtype)
                         if memory.qk_norm == "both" else None)
        self.keys = nn.Parameter(torch.empty(memory.num_heads, 2, memory.num_keys, half,
                                             dtype=dtype))
        if config.sequence_parallel:
            for param in self.parameters():
                param.sequence_parallel = True
        if tables is None:   # built alone: a table of its own, registered here
            self.own_tables = tables = memory_plus_tables(memory, config,
                                                          int(torch.randint(0, 2 ** 40, ())))
        value_args = (memory.num_values, tables.value_dim, 1, hidden, 0, dtype)
        value_kwargs = {"kernel": memory.kernel, "tables": tables, "readout": READOUT}
        self.values = (build_module(values, *value_args, **value_kwargs) if values is not None
                       else ImplicitValueExpansion(*value_args, **value_kwargs))
        self.usage = UsageTracker(memory.num_values, (memory.num_heads, 2, memory.num_keys))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Meta's init: W_q Xavier-uniform (bias 0), keys U(+-1/sqrt(key_dim)), W_o and W_s
        N(0, 1/D), norm gains 1; full tensors drawn, then this rank's slices kept."""
        hidden, part = self.config.hidden_size, self.values.table_slice
        width = self.values.value_dim
        bound = math.sqrt(6 / (hidden + self.query_proj.out_features))
        self.query_proj.weight.copy_((torch.rand(self.query_proj.weight.shape, generator=generator)
                                      * 2 - 1) * bound)
        if self.query_proj.bias is not None:
            self.query_proj.bias.zero_()
        key_bound = self.memory.key_dim ** -0.5
        self.keys.copy_((torch.rand(self.keys.shape, generator=generator) * 2 - 1) * key_bound)
        draw_slice(self.values.out_proj.weight, (hidden, 1, width), hidden ** -0.5, 2,
                   part.proj_col_start, generator)
        draw_slice(self.values.gate_proj.weight, (width, hidden), hidden ** -0.5, 0,
                   part.proj_col_start, generator)
        for norm in (self.query_norm, self.key_norm):
            if norm is not None:
                norm.weight.fill_(1.0)

    def refresh_rank1(self) -> None:
        """Memory+ has no rank-1 filter; present so every memory layer has one interface."""

    @torch.no_grad()
    def weight_norms(self) -> dict[str, torch.Tensor]:
        """Mean square of this rank's value slice and mean L2 norm of the sub-keys."""
        return {"value_ms": self.values.values.detach().float().pow(2).mean(),
                "key_norm": self.keys.detach().float().norm(dim=-1).mean()}

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [t, D] -> (table rows [t, h*k], softmax weights [t, h*k, 1]), all in fp32."""
        tokens, heads, half = x.shape[0], self.memory.num_heads, self.keys.shape[-1]
        x = upcast(x)
        bias = self.query_proj.bias
        query = F.linear(x, self.query_proj.weight.to(x.dtype),
                         None if bias is None else bias.to(x.dtype)).view(tokens, heads, 2, half)
        keys = upcast(self.keys)
        if self.query_norm is not None:
            query = normed(self.query_norm, query)
        if self.key_norm is not None:
            keys = normed(self.key_norm, keys)
        s_first, s_second = product_key_scores(query, keys)
        rows, scores = product_key_topk(s_first, s_second, self.memory.topk)  # [t, h, k]
        self.usage.count_rows(rows)
        self.usage.count_keys(rows, self.memory.num_keys)
        self.usage.add_top_score(scores)
        weights = F.softmax(scores, dim=-1)
        return rows.view(tokens, -1), weights.view(tokens, -1, 1)

    def start(self, hidden: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """hidden [s, b, D] -> a function returning (output [s, b, D], zero aux loss); a sharded
        value module may leave its communication in flight until the call."""
        seq, batch, width = hidden.shape
        flat = hidden.reshape(seq * batch, width)
        rows, weights = self.select(flat)
        pending = self.values.dispatch(rows, weights, flat)
        zero = hidden.new_zeros((), dtype=torch.float32)
        return lambda: (pending().view(seq, batch, width), zero)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.start(hidden)()
