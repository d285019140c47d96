"""Building megatron layers: specs (local / Transformer Engine), FFNs, norms, checkpoint key names."""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from .cpu import _check_cpu_config, _define_missing_te_gemm

def build_moe_layer(config: TransformerConfig, num_experts: int, topk: int) -> torch.nn.Module:
    """megatron-core MoELayer from the local (non-TE) GPT spec, SequentialMLP experts.

    config is copied with num_moe_experts / moe_router_topk set; its dispatcher type, expert
    width (moe_ffn_hidden_size) and the rest are used as given. forward: [s, b, D] -> (out, bias).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = dataclasses.replace(config, num_moe_experts=num_experts, moe_router_topk=topk)
    _check_cpu_config(config, moe=True)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False).submodules.mlp
    return build_ffn(spec, config)


def build_dense_mlp(config: TransformerConfig) -> torch.nn.Module:
    """megatron-core dense MLP (ffn_hidden_size wide) from the local GPT spec.

    forward: [s, b, D] -> (out, bias).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config.num_moe_experts is not None:
        config = dataclasses.replace(config, num_moe_experts=None, moe_ffn_hidden_size=None)
    _check_cpu_config(config, moe=False)
    spec = get_gpt_layer_local_spec().submodules.mlp
    return build_ffn(spec, config)


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports; a half-installed TE raises more than ImportError."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def fused_rope_available() -> bool:
    """True when megatron found TE's fused RoPE kernel (what apply_rope_fusion needs)."""
    from megatron.core.models.common.embeddings import rope_utils

    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


def unfuse_pre_mlp_norm(layer_spec) -> None:
    """Make a layer's pre-FFN norm a module of its own (in place), so the FFN's input is the normed
    hidden state. The Transformer Engine spec fuses it into fc1 (TELayerNormColumnParallelLinear);
    the local spec already has it separate, and is left as is. The checkpoint keys stay those of
    the fused layer (canonical_norm_keys)."""
    from megatron.core.transformer.identity_op import IdentityOp

    submodules = layer_spec.submodules
    if submodules.pre_mlp_layernorm is not IdentityOp:
        return
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm

    submodules.pre_mlp_layernorm = TENorm
    _spec_submodules(submodules.mlp).linear_fc1 = TEColumnParallelLinear


# One checkpoint format whatever the spec: megatron's Transformer Engine names. TE fuses the
# input norm into linear_qkv and a dense FFN's pre-FFN norm into linear_fc1 (keys
# '...linear_qkv.layer_norm_weight', 'mlp.linear_fc1.layer_norm_weight'); before an MoE layer the
# norm is a TENorm of its own ('pre_mlp_layernorm.weight'). megatron's local spec maps both norms
# to the fused names for every layer, MoE included, so local and TE MoE checkpoints differed.
_INPUT_NORM_KEYS = ("input_layernorm.", "self_attention.linear_qkv.layer_norm_")


_PRE_MLP_NORM_KEYS = ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")


def canonical_norm_keys(layer_spec, moe: bool) -> None:
    """Set a layer spec's checkpoint-key map (in place) so its norms save under the TE names:
    separate norms are mapped onto the fused names, except an MoE layer's pre-FFN norm."""
    from megatron.core.transformer.identity_op import IdentityOp

    submodules = layer_spec.submodules
    keys = {k: v for k, v in submodules.sharded_state_dict_keys_map.items()
            if k not in (_INPUT_NORM_KEYS[0], _PRE_MLP_NORM_KEYS[0])}
    if submodules.input_layernorm is not IdentityOp:
        keys[_INPUT_NORM_KEYS[0]] = _INPUT_NORM_KEYS[1]
    if submodules.pre_mlp_layernorm is not IdentityOp and not moe:
        keys[_PRE_MLP_NORM_KEYS[0]] = _PRE_MLP_NORM_KEYS[1]
    submodules.sharded_state_dict_keys_map = keys


class SequenceParallelTorchNorm:
    """megatron's WrappedTorchNorm (torch LayerNorm / RMSNorm, the local spec's norm) without its
    refusal of sequence parallelism: the parameters are marked `sequence_parallel`, so
    finalize_model_grads sums their gradients over the TP group, as Transformer Engine's norms do."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm_class = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_class(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def use_sequence_parallel_norms(spec) -> None:
    """Swap the local spec's torch norms for SequenceParallelTorchNorm, in place, everywhere in a
    spec: a decoder block's layers (with their nested submodules) and its final norm."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if isinstance(spec, list):
        for item in spec:
            use_sequence_parallel_norms(item)
        return
    if isinstance(spec, functools.partial):
        spec = spec.keywords.get("submodules")
    submodules = spec.submodules if isinstance(spec, ModuleSpec) else spec
    if not dataclasses.is_dataclass(submodules):
        return
    for field in dataclasses.fields(submodules):
        value = getattr(submodules, field.name)
        if value is WrappedTorchNorm:
            setattr(submodules, field.name, SequenceParallelTorchNorm)
        elif isinstance(value, ModuleSpec) and value.module is WrappedTorchNorm:
            value.module = SequenceParallelTorchNorm
        else:
            use_sequence_parallel_norms(value)


def _spec_submodules(spec):
    """The submodules of an FFN spec: a ModuleSpec's field, or (megatron-core >= 0.18) the
    `submodules=` keyword of the functools.partial builders its GPT specs return."""
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def _drop_unknown_mlp_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unknown MLP type")


# megatron-core 0.16/0.17 log "Unknown MLP type ... Using default kwargs" for every block whose FFN
# SkipMemoryMLP wraps; expected (build_ffn passes the kwargs itself), so not shown.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_drop_unknown_mlp_warning)


def _layer_calls_mlp_builder() -> bool:
    """megatron-core >= 0.18 (checked on 0.18.0 and 0.19.2): TransformerLayer builds its FFN as
    `submodules.mlp(config=, pg_collection=, is_mtp_layer=, name=)`, and the GPT specs give the FFN
    as a builder (`functools.partial(MLP.as_mlp_submodule, submodules=...)`,
    `functools.partial(MoELayer, submodules=...)`) instead of a ModuleSpec. Up to 0.17 it calls
    `build_module(spec, config=, tp_group= | pg_collection=)`, choosing by the spec's class, and
    passes only `config` to a module it does not know (logging "Unknown MLP type")."""
    from megatron.core.transformer.mlp import MLP

    return hasattr(MLP, "as_mlp_submodule")


def build_ffn(spec, config: TransformerConfig, pg_collection=None, is_mtp_layer: bool = False,
              name: str | None = None) -> torch.nn.Module:
    """Build a block's FFN (MLP or MoELayer) from its spec the way TransformerLayer would have.

    pg_collection / is_mtp_layer / name: what TransformerLayer passes its `mlp` (megatron-core
    >= 0.18 passes them to our wrapper too; forward them). Without pg_collection, the global
    (mpu) process groups are used, which is what TransformerLayer uses by default."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    _define_missing_te_gemm()  # a missing-TE bug, not a CPU one: needed on GPUs without TE too
    if _layer_calls_mlp_builder():
        # megatron-core >= 0.18. A ModuleSpec(MLP / TEFusedMLP) is rewrapped exactly as
        # TransformerLayer does (MLP itself takes tp_group, not pg_collection).
        if isinstance(spec, ModuleSpec) and hasattr(_module_class(spec), "as_mlp_submodule"):
            spec = functools.partial(_module_class(spec).as_mlp_submodule,
                                     submodules=spec.submodules, **spec.params)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        return spec(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                    name=name)
    # megatron-core 0.16 / 0.17: ModuleSpecs, extra kwargs chosen by module class.
    module = _module_class(spec)
    if module is MoELayer:
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        return build_module(spec, config=config, pg_collection=pg_collection)
    if module is MLP:
        tp_group = pg_collection.tp if pg_collection is not None \
            else parallel_state.get_tensor_model_parallel_group()
        return build_module(spec, config=config, tp_group=tp_group)
    return build_module(spec, config=config)


def _module_class(spec):
    """The class a ModuleSpec (or a bare class) builds."""
    from megatron.core.transformer.spec_utils import get_module

    return get_module(spec)


def standard_param_group_overrides(config) -> dict:
    """megatron's default param-group overrides (no weight decay on biases and 1-D parameters);
    passing our own overrides replaces them, so we start from these."""
    from megatron.core import optimizer as mcore_optimizer

    return dict(mcore_optimizer.get_standard_config_overrides(config) or {})


def param_key(**kwargs):
    from megatron.core.optimizer.optimizer_config import ParamKey

    return ParamKey(**kwargs)
