"""megatron-core ModuleSpecs for every model family: dense, MoE, PKM and UltraMem (skip-layer)."""

import copy
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from ..memory import ProductKeyMemory, UltraMemLayer
from ..parallel.comm import token_sum_over
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
        token_sum = token_sum_over(
            config.sequence_parallel and config.tensor_model_parallel_size > 1,
            config.context_parallel_size > 1)
        return ModuleSpec(module=UltraMemLayer, params={"memory": model.ultramem, "values": values,
                                                        "token_sum": token_sum})
    return ModuleSpec(module=ProductKeyMemory, params={"pkm": model.pkm})


def decoder_block_spec(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                       bus: MemoryBus, use_te: bool = False,
                       stage: Optional[megatron_compat.Stage] = None,
                       init_seed: int = 0) -> TransformerBlockSubmodules:
    """megatron's own GPT block spec (local, or Transformer Engine; MoE layers when
    config.num_moe_experts is set) for the blocks of one model chunk (the whole model by
    default), each block seeded by its global index, with the FFN of each span's first and last
    block wrapped (spans never cross a chunk: config validation)."""
    block, offset = megatron_compat.block_spec_for_stage(
        config, use_te, stage or megatron_compat.single_stage())
    if config.sequence_parallel and not use_te:
        megatron_compat.use_sequence_parallel_norms(block)
    starts = {start: k for k, (start, _) in enumerate(model.active_spans())}
    ends = {end: k for k, (_, end) in enumerate(model.active_spans())}
    layer_specs = []
    for index, layer in enumerate(block.layer_specs, start=offset):
        layer = copy.deepcopy(layer)
        megatron_compat.canonical_norm_keys(layer, moe=config.num_moe_experts is not None)
        seed = (init_seed << 16) + 1 + index   # never the embedding's (init_seed)
        megatron_compat.seed_layer(layer, seed)
        if config.num_moe_experts is not None:
            megatron_compat.seed_experts(layer, seed)
        if index in starts:
            # The memory reads the pre-FFN norm's output; TE fuses that norm into fc1.
            megatron_compat.unfuse_pre_mlp_norm(layer)
            megatron_compat.canonical_norm_keys(layer, moe=False)
        if index in starts or index in ends:
            layer.submodules.mlp = ModuleSpec(
                module=SkipMemoryMLP,
                submodules=SkipMemorySubmodules(
                    ffn=layer.submodules.mlp,
                    memory=memory_spec(model, parallel, config) if index in starts else None),
                params={"bus": bus, "starts_span": starts.get(index), "ends_span": ends.get(index)})
        layer_specs.append(layer)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=block.layer_norm)
