"""The one place that reaches into megatron-core internals, including its CPU compatibility shims."""

# megatron-core hard-codes torch.cuda in many places: cpu.py makes the parts we use run on a
# CPU-only machine (a no-op when CUDA is available). distributed.py sets up process groups and
# wraps models, pipeline.py places blocks on pipeline stages, layers.py builds megatron layers
# from specs, moe.py seeds experts and reads the aux-loss tracker, checkpoints.py holds
# everything dist_checkpointing needs. The rest of the package imports from here only. Tested on
# megatron-core 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); attributes that differ between
# versions are looked up with hasattr/getattr, and each version-specific branch says which
# versions take it.

from .checkpoints import (async_save_queue, drop_extra_state, load_model_state,
                          model_sharded_state_dict, optimizer_load_state_dict,
                          optimizer_sharded_state_dict, rename_sharded_keys, rng_tracker_states,
                          set_rng_tracker_states, start_async_save)
from .cpu import apply_cpu_patches, enter_cpu_device_mode
from .distributed import (_init_process_group, average_grads_over_tp, destroy_distributed, device,
                          initialize_distributed, initialize_single_process, local_device_index,
                          overlaps_param_gather, params_synced, set_param_gather_hooks,
                          sync_params, wait_param_gather, wrap_float16, wrap_model_chunks)
from .moe import moe_aux_losses, seed_experts
from .pipeline import (Stage, block_spec_for_stage, context_parallel_part, from_last_stage,
                       gather_over_stages, local_stages, seed_layer, single_stage,
                       sum_over_stages)
from .layers import (build_dense_mlp, build_ffn, build_moe_layer, canonical_norm_keys,
                     fused_rope_available, param_key, standard_param_group_overrides,
                     transformer_engine_available, unfuse_pre_mlp_norm,
                     use_sequence_parallel_norms)

__all__ = [
    "apply_cpu_patches", "async_save_queue", "average_grads_over_tp", "build_dense_mlp",
    "build_ffn", "build_moe_layer", "canonical_norm_keys", "destroy_distributed", "device",
    "drop_extra_state", "enter_cpu_device_mode", "fused_rope_available", "initialize_distributed",
    "initialize_single_process", "load_model_state", "local_device_index", "moe_aux_losses",
    "model_sharded_state_dict", "optimizer_load_state_dict", "optimizer_sharded_state_dict",
    "overlaps_param_gather", "param_key", "params_synced", "set_param_gather_hooks", "sync_params",
    "wait_param_gather", "rename_sharded_keys", "rng_tracker_states", "set_rng_tracker_states",
    "standard_param_group_overrides", "start_async_save", "transformer_engine_available",
    "unfuse_pre_mlp_norm", "use_sequence_parallel_norms", "wrap_model_chunks", "wrap_float16",
    "Stage", "block_spec_for_stage", "context_parallel_part", "from_last_stage",
    "gather_over_stages", "local_stages",
    "seed_experts", "seed_layer", "single_stage", "sum_over_stages",
    "_init_process_group",
]
