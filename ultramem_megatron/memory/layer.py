"""UltraMemLayer: the paper's memory layer as a megatron-core module, [s, b, D] in and out."""

# Axis legend
#   s  sequence    b  micro-batch    t = s*b tokens    D  hidden size
#   k  retrieved items per token (H*m)                 c  Tucker cores

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from .config import UltraMemConfig, UltraMemV2Config
from .init import init_ultramem, init_ultramem_v2, v2_table_stds
from .retrieval import TokenSum, TuckerRetrieval
from .selection import upcast
from .usage import UsageTracker
from .value_lr import mark_value_param
from .tables import MemoryTables, TablesShape
from .values import ImplicitValueExpansion, Readout


class CausalDepthwiseConv(nn.Module):
    """Depthwise convolution over the sequence axis that sees only the past; identity at init.
    It feeds the query alone, so it runs in fp32 like the rest of the retrieval."""

    def __init__(self, channels: int, kernel: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.kernel = kernel
        weight = torch.zeros(channels, 1, kernel, dtype=dtype, device=device)
        weight[:, 0, -1] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, D] -> [s, b, D] in fp32 (float64 stays float64)."""
        x = upcast(x)
        y = F.conv1d(F.pad(x.permute(1, 2, 0), (self.kernel - 1, 0)), self.weight.to(x.dtype),
                     groups=x.shape[-1])  # [b, D, s]
        return y.permute(2, 0, 1)


def v2_readout(memory: UltraMemV2Config, hidden: int, layer_index: int) -> Readout:
    """UltraMemV2's read of its items: the layer_index-th ring window of the shared table
    (memory.window_offset); pre-values; the E groups summed before one projection (or E)."""
    return Readout(offset=memory.window_offset(layer_index),
                   pre_value_dim=memory.resolved_pre_value_dim(hidden),
                   pre_activation=memory.pre_value_activation,
                   sum_groups=memory.value_projection == "single")


def v2_tables_shape(memory: UltraMemV2Config, config: TransformerConfig) -> TablesShape:
    """UltraMemV2's shared value and pre-value tables: N_all rows, D_v, D_p, the rule's stds."""
    hidden = config.hidden_size
    stds = v2_table_stds(memory, hidden, config.ffn_hidden_size, config.num_layers, memory.init)
    return TablesShape(memory.table_rows, memory.resolved_value_dim(hidden),
                       memory.resolved_pre_value_dim(hidden), stds)


def v2_tables(memory: UltraMemV2Config, config: TransformerConfig, seed: int, **slices
              ) -> MemoryTables:
    """The value and pre-value tables UltraMemV2's layers share, drawn from `seed`."""
    return MemoryTables.build(v2_tables_shape(memory, config), seed, config.params_dtype,
                              **slices)


def own_v2_tables(memory: UltraMemV2Config, config: TransformerConfig) -> MemoryTables:
    """Tables for a layer built on its own (a model passes the shared ones), seeded by torch."""
    return v2_tables(memory, config, int(torch.randint(0, 2 ** 40, ())))


class UltraMemLayer(MegatronModule):
    """Block i's pre-FFN normed input [s, b, D] -> (memory output [s, b, D], Tucker aux loss).

    query (optional causal conv) -> TDQKR two-phase top-m -> implicit value expansion -> Linear.
    With an UltraMemV2Config: one query per Tucker rank, items weighted by pre-values, read from
    the layer_index-th ring window of `tables` (shared by the model's layers; a table of its own
    when built alone), the E groups summed before one projection.
    The caller adds the output to the residual stream after block j (skip-layer) and the aux loss
    to the training loss, and calls refresh_rank1() once per optimizer step.

    `values` is the value module's spec: the single-device ImplicitValueExpansion by default, a
    sharded one (ultramem_megatron.parallel) in a parallel model. Under sequence parallelism the
    query side runs on this rank's tokens only, so its parameters are marked `sequence_parallel`
    (megatron sums their gradients over the tensor-parallel group), and `token_sum` (a
    differentiable sum over the TP group) gives the query BatchNorm and the key balance the
    statistics of the whole sequence.
    """

    def __init__(self, config: TransformerConfig, memory: UltraMemConfig,
                 values: Optional[ModuleSpec] = None, token_sum: TokenSum = None,
                 tables: Optional[MemoryTables] = None, layer_index: int = 0):
        super().__init__(config)
        hidden, dtype = config.hidden_size, config.params_dtype
        self.memory = memory
        self.query_conv = (CausalDepthwiseConv(hidden, memory.query_conv_kernel, dtype)
                           if memory.query_conv_kernel > 0 else None)
        self.retrieval = TuckerRetrieval(memory, hidden, dtype, token_sum=token_sum)
        if config.sequence_parallel:
            for param in self.parameters():
                param.sequence_parallel = True
        value_args = (memory.num_values, memory.resolved_value_dim(hidden), memory.expansion,
                      hidden, memory.shuffle_seed, dtype)
        value_kwargs = {"kernel": memory.kernel}
        if isinstance(memory, UltraMemV2Config):  # layer_index-th window of the shared table
            if tables is None:   # built alone: tables of its own, registered here
                self.own_tables = tables = own_v2_tables(memory, config)
            value_kwargs.update(tables=tables, readout=v2_readout(memory, hidden, layer_index))
        self.values = (build_module(values, *value_args, **value_kwargs) if values is not None
                       else ImplicitValueExpansion(*value_args, **value_kwargs))
        mark_value_param(self.values.values)
        self.usage = UsageTracker(memory.num_values,
                                  (memory.num_heads, 2, memory.keys_per_axis))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """This layer's parameters (a shared table is drawn by its MemoryTables)."""
        if isinstance(self.memory, UltraMemV2Config):
            init_ultramem_v2(self.retrieval, self.values, self.config.hidden_size,
                             self.memory.init, generator)
        else:
            init_ultramem(self.retrieval, self.values, self.config.num_layers, self.memory.init,
                          generator)

    def refresh_rank1(self) -> None:
        self.retrieval.refresh_rank1()

    @torch.no_grad()
    def weight_norms(self) -> dict[str, torch.Tensor]:
        """Mean square of this rank's value slice and mean L2 norm of the raw key vectors."""
        keys = self.retrieval.keys.detach().float()
        return {"value_ms": self.values.values.detach().float().pow(2).mean(),
                "key_norm": keys.norm(dim=-2).mean()}  # keys [h, 2, n, k, r]: norm over k

    def start(self, hidden: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """hidden [s, b, D] -> a function returning (output [s, b, D], aux loss). Retrieval runs
        now; a sharded value module may leave its communication in flight until the call."""
        seq, batch, width = hidden.shape
        query_input = self.query_conv(hidden) if self.query_conv is not None else hidden
        virtual_idx, core_scores = self.retrieval(query_input.reshape(seq * batch, width))
        self._count_usage(virtual_idx, core_scores)
        pending = self.values.dispatch(virtual_idx, core_scores,
                                       hidden.reshape(seq * batch, width))  # -> [t, D]
        aux_loss = self.retrieval.aux_loss()
        if self.config.sequence_parallel:
            # The aux loss depends on the cores alone, so every TP rank has its full gradient;
            # megatron sums sequence-parallel gradients over TP: send 1/TP of it from each rank.
            tp = self.config.tensor_model_parallel_size
            aux_loss = aux_loss.detach() + (aux_loss - aux_loss.detach()) / tp
        return lambda: (pending().view(seq, batch, width), aux_loss)

    def _count_usage(self, virtual_idx: torch.Tensor, core_scores: torch.Tensor) -> None:
        """virtual_idx [t, h*m]; core_scores [t, h*m, c] -> the usage tracker (training only)."""
        if not self.training:
            return
        tokens, heads = virtual_idx.shape[0], self.memory.num_heads
        self.usage.count_rows(self.values.window_position(virtual_idx))
        self.usage.count_keys(virtual_idx.view(tokens, heads, -1), self.memory.keys_per_axis)
        self.usage.add_top_score(core_scores.detach().sum(-1).view(tokens, heads, -1))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.start(hidden)()
