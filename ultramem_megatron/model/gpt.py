"""The GPT model of every family: megatron-core GPTModel with skip-layer memory and its aux losses."""

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from ..memory import ProductKeyMemory, UltraMemLayer
from .capabilities import Capabilities, FusionChoice, choose_fusions
from .skip_memory import MemoryBus, SkipMemoryMLP
from .specs import decoder_block_spec


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       dtype: torch.dtype = torch.float32,
                       fusions: Optional[FusionChoice] = None) -> TransformerConfig:
    """megatron TransformerConfig for a model config. Fusions are what this machine's kernels
    allow (model/capabilities.py; none on CPU); biases are off for every family (MoE needs it,
    and the comparison stays fair)."""
    fusions = fusions if fusions is not None else choose_fusions(model)
    moe = model.moe if model.family == "moe" else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_size,
        normalization=model.normalization,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=True,   # the same weights whatever the parallel layout
        **fusions.config_fields(),
        num_moe_experts=moe.num_experts if moe else None,
        moe_router_topk=moe.topk if moe else 2,
        moe_ffn_hidden_size=(moe.expert_ffn_hidden_size or model.ffn_size) if moe else None,
        moe_aux_loss_coeff=moe.aux_loss_coeff if moe else 0.0,
        moe_router_load_balancing_type="aux_loss" if moe else "none",
        moe_token_dispatcher_type=moe.dispatcher if moe else "allgather",
        moe_router_pre_softmax=bool(moe) and moe.topk == 1,   # megatron requires it for top-1
        moe_router_dtype="fp32" if moe else None,             # routing in fp32 under bf16
        **recompute_fields(parallel),
    )


def recompute_fields(parallel: ParallelConfig) -> dict:
    """megatron's activation-recompute fields for parallel.recompute_*: full recomputes whole
    blocks in groups (model/skip_memory.py: a span's ends are recomputed together, which
    config validation guarantees), selective the listed submodules of every block."""
    granularity = parallel.recompute_granularity
    if granularity == "none":
        return {}
    if granularity == "selective":
        return {"recompute_granularity": "selective",
                "recompute_modules": list(parallel.recompute_modules)}
    return {"recompute_granularity": "full", "recompute_method": parallel.recompute_method,
            "recompute_num_layers": parallel.recompute_num_layers}


class MemoryGPT(GPTModel):
    """GPTModel whose decoder may hold skip-layer memories; forward is GPTModel's."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                 use_transformer_engine: bool = False):
        self.memory_bus = MemoryBus()  # plain attribute, shared with the wrapped FFNs
        super().__init__(
            config=config,
            transformer_layer_spec=decoder_block_spec(model, parallel, config, self.memory_bus,
                                                      use_transformer_engine),
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            position_embedding_type=model.position_embedding,
            share_embeddings_and_output_weights=False,
            parallel_output=True,
        )
        if config.tensor_model_parallel_size > 1:
            self._sync_tp_replicated_memory_params()
        self._track_residual_after_spans()

    def _track_residual_after_spans(self) -> None:
        """The residual stream after each span's last block feeds its memory's usage tracker."""
        mlps = [layer.mlp for layer in self.decoder.layers if isinstance(layer.mlp, SkipMemoryMLP)]
        trackers = {mlp.starts_span: mlp.memory.usage for mlp in mlps if mlp.memory is not None}
        for layer in self.decoder.layers:
            span = getattr(layer.mlp, "ends_span", None)
            if span is not None:
                layer.register_forward_hook(partial(_record_residual, trackers[span]))

    def _sync_tp_replicated_memory_params(self) -> None:
        """Memory parameters every TP rank holds whole (retrieval, PKM; not the TP-split value
        shards and projection, not those sequence parallelism already sums) get their gradients
        averaged over TP, so every TP rank keeps selecting the same value rows."""
        for layer in self.memory_layers():
            for param in layer.parameters():
                if not (getattr(param, "tensor_model_parallel", False)
                        or getattr(param, "sequence_parallel", False)):
                    megatron_compat.average_grads_over_tp(param)

    def forward(self, *args, **kwargs):
        self.memory_bus.reset()
        return super().forward(*args, **kwargs)

    def memory_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, (UltraMemLayer, ProductKeyMemory))]

    def memory_aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the memory layers' aux losses from the last forward, detached: the backward of
        any loss computed from the output already includes their gradients, scaled by
        set_aux_loss_scale (None without memory)."""
        return self.memory_bus.aux_loss()

    def set_aux_loss_scale(self, scale: float) -> None:
        """d(loss) / d(each memory aux loss) in the coming backwards: 1 / micro-batches per step
        in training (megatron divides the loss by it), 1 by default."""
        self.memory_bus.aux_loss_scale = scale

    @torch.no_grad()
    def memory_usage(self, groups: Sequence = ()) -> dict[str, Optional[float]]:
        """Utilisation since the last call, per memory layer ('mem{i}/{stat}', see memory/usage.py)
        and over all layers ('value_rows_hit'); counts are summed over the ranks of each of
        `groups` (the data-parallel group, and the TP group under sequence parallelism). Resets
        the counters. Empty without memory. One all-reduce per group, on log steps only."""
        layers = self.memory_layers()
        if not layers:
            return {}
        packed = [layer.usage.packed() for layer in layers]
        norms = [layer.weight_norms() for layer in layers]
        flat = torch.cat(packed)
        ranks = 1
        for group in groups:
            if group is not None and torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(flat, group=group)
                ranks *= torch.distributed.get_world_size(group)
        # Each rank holds an equal slice of each table (a grid of replicas): the mean over all
        # ranks of the slices' mean squares is the whole table's.
        value_ms = torch.stack([n["value_ms"] for n in norms]).double()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(value_ms)
            value_ms /= torch.distributed.get_world_size()
        record, offset, rows_hit, rows = {}, 0, 0.0, 0
        for index, (layer, part) in enumerate(zip(layers, packed)):
            stats = layer.usage.summary(flat[offset:offset + part.numel()], ranks)
            offset += part.numel()
            stats["value_rms"] = value_ms[index].sqrt().item()
            stats["key_norm"] = norms[index]["key_norm"].item()
            record.update({f"mem{index}/{name}": value for name, value in stats.items()})
            num_rows = layer.usage.row_counts.numel()
            rows_hit += stats["rows_hit"] * num_rows
            rows += num_rows
            layer.usage.reset()
        record["value_rows_hit"] = rows_hit / rows
        return record

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Refresh every UltraMem layer's rank-1 filter; call once per optimizer step."""
        for layer in self.memory_layers():
            layer.refresh_rank1()


def _record_residual(usage, module, inputs, output) -> None:
    """Forward hook on a span's last block: its output is the residual stream [s, b, D]."""
    usage.add_rms(2, output[0] if isinstance(output, tuple) else output)


def build_model(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                capabilities: Optional[Capabilities] = None) -> MemoryGPT:
    """The model a run builds on this machine (or on one with the given capabilities): the TE
    spec where Transformer Engine imports, the local spec otherwise."""
    fusions = choose_fusions(model, capabilities)
    return MemoryGPT(model, parallel, transformer_config(model, parallel, dtype, fusions),
                     fusions.use_transformer_engine)
