"""megatron-core ModuleSpecs for every model family: dense, MoE, PKM and UltraMem (skip-layer)."""

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from ..memory import ProductKeyMemory, UltraMemLayer
from ..parallel.comm import sum_over_sequence_parallel_ranks
from ..parallel.sharded_values import ShardedValueExpansion
from .skip_memory import MemoryBus, SkipMemoryMLP, SkipMemorySubmodules


def memory_spec(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig
                ) -> ModuleSpec:
    """UltraMem with its value table sharded by the parallel layout (one shard when there is no
    TP or memory parallelism), or PKM (replicated)."""
    if model.family == "ultramem":
        values = ModuleSpec(module=ShardedValueExpansion, params={
            "mode": parallel.memory_parallel_mode, "overlap": parallel.overlap_memory_comm,
            "sequence_parallel": config.sequence_parallel})
        token_sum = (sum_over_sequence_parallel_ranks
                     if config.sequence_parallel and config.tensor_model_parallel_size > 1 else None)
        return ModuleSpec(module=UltraMemLayer, params={"memory": model.ultramem, "values": values,
                                                        "token_sum": token_sum})
    return ModuleSpec(module=ProductKeyMemory, params={"pkm": model.pkm})


def decoder_block_spec(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                       bus: MemoryBus, use_te: bool = False) -> TransformerBlockSubmodules:
    """megatron's own GPT block spec (local, or Transformer Engine; MoE layers when
    config.num_moe_experts is set), with the FFN of each span's first and last block wrapped."""
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                       normalization=config.normalization)
    if config.sequence_parallel and not use_te:
        megatron_compat.use_sequence_parallel_norms(block)
    for layer in block.layer_specs:
        megatron_compat.canonical_norm_keys(layer, moe=config.num_moe_experts is not None)
    spans = model.active_spans()
    if not spans:
        return block
    starts = {start: k for k, (start, _) in enumerate(spans)}
    ends = {end: k for k, (_, end) in enumerate(spans)}
    layer_specs = []
    for index, layer in enumerate(block.layer_specs):
        if index in starts or index in ends:
            layer = copy.deepcopy(layer)
            if index in starts:
                # The memory reads the pre-FFN norm's output; TE fuses that norm into fc1.
                megatron_compat.unfuse_pre_mlp_norm(layer)
                megatron_compat.canonical_norm_keys(layer, moe=False)
            layer.submodules.mlp = ModuleSpec(
                module=SkipMemoryMLP,
                submodules=SkipMemorySubmodules(
                    ffn=layer.submodules.mlp,
                    memory=memory_spec(model, parallel, config) if index in starts else None),
                params={"bus": bus, "starts_span": starts.get(index), "ends_span": ends.get(index)})
        layer_specs.append(layer)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=block.layer_norm)
