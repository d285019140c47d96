"""megatron-core ModuleSpecs for every model family: dense, MoE and the memory families (skip-layer)."""

import copy
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from ..memory import ProductKeyMemory, UltraMemLayer
from ..memory.layer import v2_tables_shape
from ..memory.memory_plus import MemoryPlusLayer, memory_plus_tables_shape
from ..memory.tables import MemoryTables
from ..parallel.comm import token_sum_over
from ..parallel.layout import MemoryParallelLayout
from ..parallel.sharded_values import ShardedMemoryTables, ShardedValueExpansion
from .skip_memory import MemoryBus, SkipMemoryMLP, SkipMemorySubmodules


def shared_tables(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                  seed: int, chunk: int = 0) -> Optional[ShardedMemoryTables]:
    """The value (and pre-value) table every memory layer of an UltraMemV2 or Memory+ model
    reads, this rank's slice of it, drawn from `seed` whatever the layout; model chunk `chunk`
    (global index: vp_stage x PP + pp_rank) holds a copy. None for the other families."""
    if not model.shares_tables:
        return None
    shape = (memory_plus_tables_shape if model.family == "memory_plus" else v2_tables_shape)(
        model.memory, config)
    layout = MemoryParallelLayout.from_parallel_state(parallel.memory_parallel_mode,
                                                      config.sequence_parallel)
    tables = ShardedMemoryTables(layout, chunk, shape.rows, shape.value_dim, shape.pre_value_dim,
                                 config.params_dtype)
    tables.reset_parameters(shape.stds, seed)
    return tables


def memory_spec(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                tables: Optional[MemoryTables] = None, layer_index: int = 0) -> ModuleSpec:
    """The family's memory layer (the layer_index-th of the model), its value table sharded by
    the parallel layout (one shard when there is no TP or memory parallelism): UltraMem,
    UltraMemV2 and Memory+ (the last two reading the model's shared `tables`), or PKM
    (replicated)."""
    if model.family == "pkm":
        return ModuleSpec(module=ProductKeyMemory, params={"pkm": model.pkm})
    values = ModuleSpec(module=ShardedValueExpansion, params={
        "mode": parallel.memory_parallel_mode, "overlap": parallel.overlap_memory_comm,
        "sequence_parallel": config.sequence_parallel})
    shared = {"tables": tables, "layer_index": layer_index} if model.shares_tables else {}
    if model.family == "memory_plus":
        return ModuleSpec(module=MemoryPlusLayer, params={"memory": model.memory,
                                                          "values": values, **shared})
    token_sum = token_sum_over(
        config.sequence_parallel and config.tensor_model_parallel_size > 1,
        config.context_parallel_size > 1)
    return ModuleSpec(module=UltraMemLayer, params={"memory": model.memory, "values": values,
                                                    "token_sum": token_sum, **shared})


def decoder_block_spec(model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                       bus: MemoryBus, use_te: bool = False,
                       stage: Optional[megatron_compat.Stage] = None,
                       init_seed: int = 0, tables: Optional[MemoryTables] = None
                       ) -> TransformerBlockSubmodules:
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
                    memory=(memory_spec(model, parallel, config, tables, starts[index])
                            if index in starts else None)),
                params={"bus": bus, "starts_span": starts.get(index), "ends_span": ends.get(index)})
        layer_specs.append(layer)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=block.layer_norm)
