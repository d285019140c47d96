"""The one place that reaches into megatron-core internals, including its CPU compatibility shims."""

# megatron-core hard-codes torch.cuda in many places. apply_cpu_patches() makes the parts we use
# run on a CPU-only machine and is a no-op when CUDA is available; nothing else in the package
# should know these patches exist. Tested on megatron-core 0.16.1 (Python 3.11) and 0.19.2
# (Python 3.12); attributes that differ between versions are looked up with hasattr/getattr, and
# each version-specific branch says which versions take it.

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import random
import socket
from datetime import timedelta

import numpy as np

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.transformer_config import TransformerConfig

_applied: tuple[str, ...] | None = None  # names of the patches applied; None until the first call


class _InertStream:
    """Stands in for torch.cuda.Stream on CPU: one in-order 'stream', so every sync is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def record_event(self, event=None) -> "_InertStream":
        return self  # stands in for the event too: its synchronize() / wait() are no-ops

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _InertStream()


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _drop_cpu_rng_warning(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply_cpu_patches() -> tuple[str, ...]:
    """Patch megatron-core (and the torch.cuda calls it makes) to run on CPU; idempotent.

    Returns the names of the patches applied: empty when CUDA is available (nothing is touched).
    """
    global _applied
    if _applied is not None:
        return _applied
    if torch.cuda.is_available():
        _applied = ()
        return _applied
    applied = []

    # Layers, the router and the TP mappings pass device=torch.cuda.current_device();
    # without this: "Torch not compiled with CUDA enabled".
    torch.cuda.current_device = lambda: "cpu"
    applied.append("torch.cuda.current_device")

    # RNG tracker (model_parallel_cuda_manual_seed, fork() around expert init and dropout): route
    # the "cuda" generator to the CPU default generator, the one CPU dropout/init actually draw from.
    # Without this, get_rng_state raises, and _set_cuda_rng_state silently queues a lazy call that
    # never runs, so fork() would not switch streams at all.
    torch.cuda.get_rng_state = _cpu_get_rng_state   # used by CudaRNGStatesTracker.add
    torch.cuda.manual_seed = torch.manual_seed      # otherwise queued and never applied
    for name, replacement in (("_get_cuda_rng_state", _cpu_get_rng_state),
                              ("_set_cuda_rng_state", _cpu_set_rng_state)):
        if hasattr(mcore_random, name):  # the tracker's fork() and checkpointed RNG states
            setattr(mcore_random, name, replacement)
    # fork() warns "CPU RNG state changed within GPU RNG context" whenever the forked code draws
    # random numbers; on CPU that is the point of forking, so drop exactly that message.
    logging.getLogger(mcore_random.__name__).addFilter(_drop_cpu_rng_warning)
    applied.append("rng_tracker->cpu_generator")

    # MoE alltoall dispatcher builds a torch.cuda.Stream for its device-to-host copies and syncs on
    # it with current_stream() / record_event(); without this: "torch.cuda.Stream requires CUDA".
    torch.cuda.Stream = _InertStream
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    applied.append("torch.cuda.Stream/current_stream")

    # MoE router: moe_utils references te_general_gemm, which 0.16.1 binds only when Transformer
    # Engine imports; without TE every router forward raises "NameError: te_general_gemm".
    _define_missing_te_gemm()
    applied.append("moe_utils.te_general_gemm=None")

    # The alltoall dispatcher converts its split sizes to numpy only for CUDA tensors; with expert
    # parallelism (EP >= 2, where the all-to-all actually runs) CPU tensors reach gloo's
    # all_to_all_single: "all_to_all_single(): incompatible function arguments".
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    original = getattr(moe_utils, "maybe_move_tensor_to_cpu", None)
    if original is not None and not getattr(original, "_cpu_compat", False):
        def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

        maybe_move_tensor_to_cpu._cpu_compat = True
        moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
        if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):  # imported by name there
            token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
        applied.append("moe split sizes as numpy")

    _applied = tuple(applied)
    return _applied


def _define_missing_te_gemm() -> None:
    """None is the value the router already handles ("no TE": plain torch.mm)."""
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_device_index() -> int:
    """This rank's GPU: LOCAL_RANK modulo the GPUs it sees. Slurm binding one GPU per task
    (--gpus-per-task=1, --gpu-bind) leaves device_count() == 1 with LOCAL_RANK up to 7; torchrun
    and plain --gpus-per-node show every task all the node's GPUs."""
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def _init_process_group(timeout_s: float = 600.0) -> None:
    """torchrun's rendezvous when its variables are set, else a world of one on a free local port
    (gloo on CPU, nccl with CUDA). The port goes in init_method, not os.environ: environment
    variables would leak into child processes (train.py run by a test), whose own world-of-one
    init would then try to bind the port this process still holds (EADDRINUSE)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index())
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_PORT" in os.environ:
        # env:// with RANK and WORLD_SIZE from the launcher
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout)


def initialize_single_process(seed: int = 1234) -> None:
    """World-size-1 process group, megatron model-parallel state (all sizes 1) and RNG tracker.

    gloo on CPU (nccl when CUDA is available). Safe to call again: existing groups are kept and
    the seeds are reset.
    """
    apply_cpu_patches()
    _init_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    mcore_random.model_parallel_cuda_manual_seed(seed)  # resets the tracker's states


def _check_cpu_config(config: TransformerConfig, moe: bool) -> None:
    """Refuse settings known to fail on a CPU-only machine, naming the field."""
    if torch.cuda.is_available():
        return
    problems = []
    if config.gradient_accumulation_fusion:
        problems.append("gradient_accumulation_fusion=True needs a CUDA extension")
    if moe and config.add_bias_linear:
        problems.append("add_bias_linear=True: MoE expert bias fails with an in-place-on-view error")
    if problems:
        raise ValueError("TransformerConfig cannot run on CPU: " + "; ".join(problems))


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


# ------------------------------------------------------------------------------ model building

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


def drop_extra_state(sharded_state_dict: dict) -> dict:
    """Without the `_extra_state` entries TE modules add (FP8 scaling metadata, unused in bf16
    training), so TE and local checkpoints hold the same keys; in place, returned."""
    for key in [k for k in sharded_state_dict if k.endswith("_extra_state")]:
        del sharded_state_dict[key]
    return sharded_state_dict


def load_model_state(model, state_dict: dict) -> None:
    """model.load_state_dict, strict except for the TE `_extra_state` entries checkpoints leave
    out (drop_extra_state): any other missing or unexpected key is an error."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")


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


# ------------------------------------------------------------------------------ optimizer

def standard_param_group_overrides(config) -> dict:
    """megatron's default param-group overrides (no weight decay on biases and 1-D parameters);
    passing our own overrides replaces them, so we start from these."""
    from megatron.core import optimizer as mcore_optimizer

    return dict(mcore_optimizer.get_standard_config_overrides(config) or {})


def param_key(**kwargs):
    from megatron.core.optimizer.optimizer_config import ParamKey

    return ParamKey(**kwargs)


# ------------------------------------------------------------------------------ cuda -> cpu mode

def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index means cuda:N


class _CudaAsCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites the CUDA devices megatron-core names literally (device='cuda' in the causal mask,
    the optimizer, clip_grads, the grad scaler; .cuda() on reload) to the CPU, and reports CPU float
    tensors' type() as torch.cuda.* for its `param.type() == 'torch.cuda.FloatTensor'` checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and result.startswith("torch."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


_CPU_MODE = _CudaAsCpuMode()


def enter_cpu_device_mode() -> None:
    """Push the CUDA-as-CPU mode for the rest of the process (CPU-only machines; idempotent)."""
    if torch.cuda.is_available() or getattr(_CPU_MODE, "_entered", False):
        return
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    _CPU_MODE.__enter__()
    _CPU_MODE._entered = True


# ------------------------------------------------------------------------------ training setup

def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def initialize_distributed(tensor_parallel_size: int, seed: int, memory_parallel_size: int = 1,
                           timeout_s: float = 600.0) -> None:
    """Process group from torchrun's environment (or a world of one), megatron parallel state,
    seeds; on CPU also the CUDA-as-CPU shims. Data parallelism takes the remaining ranks; the
    memory-parallel group is megatron's expert-parallel group (carved from data-parallel ranks
    with the same TP rank), so its value shards are reduced over the expert-data-parallel group.
    Every group's collectives give up after timeout_s (a dead or frozen peer)."""
    apply_cpu_patches()
    enter_cpu_device_mode()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
    _init_process_group(timeout_s)
    if dist.get_world_size() % (tensor_parallel_size * memory_parallel_size):
        raise ValueError(f"world size {dist.get_world_size()} is not a multiple of TP x memory-"
                         f"parallel size ({tensor_parallel_size} x {memory_parallel_size})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                                 expert_model_parallel_size=memory_parallel_size,
                                                 distributed_timeout_minutes=timeout_s / 60)
    random_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(random_seed)
    np.random.seed(random_seed)
    torch.manual_seed(random_seed)
    mcore_random.model_parallel_cuda_manual_seed(random_seed)


def destroy_distributed() -> None:
    """Undo initialize_distributed (megatron's groups, then the default group): every orderly
    exit calls it, since NCCL warns about and may leak a process group never destroyed. A no-op
    when nothing was set up."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def average_grads_over_tp(param: torch.nn.Parameter) -> None:
    """Mark a parameter replicated over the TP group whose gradient megatron's
    finalize_model_grads averages over that group before the optimizer step, so the replicas
    stay bitwise identical even when their local gradients differ in the last bits (GPU atomics)."""
    param.average_gradients_across_tp_domain = True


def wrap_float16(model: torch.nn.Module) -> torch.nn.Module:
    """megatron's Float16Module around a bf16 model, as megatron's own training does: every
    parameter in bf16 (the local spec builds its torch norms in fp32, and the distributed
    optimizer mis-indexes a param group that mixes dtypes), logits returned in fp32. Floating
    buffers keep the dtype they were built with (the memory's fp32 rank-1 filter, BatchNorm
    statistics); Float16Module would round them to bf16."""
    from megatron.core.transformer.module import Float16Module

    kept = {name: buf.dtype for name, buf in model.named_buffers() if buf.is_floating_point()}
    wrapped = Float16Module(model.config, model)
    for name, dtype in kept.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = owner._buffers[attr].to(dtype)
    return wrapped


def wrap_data_parallel(model: torch.nn.Module, use_distributed_optimizer: bool) -> torch.nn.Module:
    """megatron DistributedDataParallel (contiguous grad buffers, fp32 grad reduction) around the
    model (inside Float16Module in bf16), and the config hooks megatron's schedule uses to delay
    and finish the grad all-reduce."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    model.to(device())
    module = wrap_float16(model) if model.config.bf16 else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer)
    wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=module)
    model.config.no_sync_func = wrapped.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


# ------------------------------------------------------------------------------ checkpoints

def model_sharded_state_dict(model) -> dict:
    """Per-layer checkpoint keys ('decoder.layers.3.mlp...'): memory spans make the layers differ,
    so megatron's stacked layout (one tensor over all layers) does not apply. TE's FP8 metadata
    is left out (drop_extra_state)."""
    return drop_extra_state(model.sharded_state_dict(metadata={"non_homogeneous_layers": True}))


def rename_sharded_keys(sharded_state_dict: dict, old_prefix: str, new_prefix: str) -> None:
    """Change the checkpoint keys (not the local names) of a sharded state dict, in place."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    replace_prefix_for_sharding(sharded_state_dict, old_prefix, new_prefix)


_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _torch_adam_path() -> bool:
    """True when megatron's optimizers wrap torch.optim.Adam (no apex / TE fused Adam), whose
    per-parameter 'step' tensors megatron's distributed optimizer mishandles on load."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _inner_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _patch_set_main_param_states() -> None:
    """Loading copies every key of a parameter's Adam state from the checkpoint's tensors, which
    never carry 'step' (it travels in the param groups): KeyError without this."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_skips_step", False):
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        if "step" in self.optimizer.state.get(main_param, {}) and "step" not in tensors:
            tensors = {**tensors, "step": self.optimizer.state[main_param]["step"]}
        return original(self, model_param, tensors)

    set_states._skips_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _ensure_adam_state(optimizer) -> None:
    """Create empty Adam state (step 0, zero moments: what Adam's first step would create) so the
    distributed optimizer's state_dict() finds one 'step' before any step was taken."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: dict,
                                 is_loading: bool = False) -> dict:
    """fully_reshardable optimizer state, so a checkpoint loads at another parallel layout."""
    if _torch_adam_path():
        _ensure_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                        metadata=_OPTIMIZER_METADATA)


def optimizer_load_state_dict(optimizer, state_dict: dict) -> None:
    if _torch_adam_path():
        _patch_set_main_param_states()
    optimizer.load_state_dict(state_dict)
    if not _torch_adam_path():
        return
    # load_state_dict gives every parameter the same 'step' tensor; Adam increments it in place
    # once per parameter, so the resumed run would silently diverge. One tensor each.
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def rng_tracker_states() -> dict:
    return {name: state.clone() for name, state in mcore_random.get_cuda_rng_tracker().get_states().items()}


def set_rng_tracker_states(states: dict) -> None:
    mcore_random.get_cuda_rng_tracker().set_states(states)


# ------------------------------------------------------------------------------ async checkpoint saves

def async_save_queue():
    """megatron's queue of checkpoint writes in flight, with one forked writer per save. Explicitly
    persistent=False (the default of 0.16.1 and 0.19.2; later code defaults to a spawned persistent
    worker, which calls torch.cuda.set_device(rank % device_count()) and fails without CUDA). The
    forked writer inherits the signal mask of the saving thread (preemption.signals_deferred)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def start_async_save(sharded_state_dict: dict, directory: str):
    """dist_checkpointing.save's async form with megatron's own writer, whose request goes on
    async_save_queue(). 0.19.x defaults to async_strategy="nvrx", which needs the
    nvidia-resiliency-ext package and its own queue (and logs once that "mcore" is deprecated);
    0.16.1 has no such argument."""
    from megatron.core import dist_checkpointing

    kwargs = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, directory, **kwargs)
