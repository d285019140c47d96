"""CPU shims: megatron-core's hard-coded torch.cuda calls made to run on a CPU-only machine."""

# apply_cpu_patches() and enter_cpu_device_mode() are no-ops when CUDA is available; nothing
# outside megatron_compat should know these patches exist.

from __future__ import annotations

import logging

import torch
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

    # MoE with TP and expert parallelism gathers and reduce-scatters token blocks of unequal
    # sizes over the TP group; gloo's all_gather needs equal sizes and it has no list
    # reduce_scatter: "invalid tensor size at index 1 (expected (33, 64), got (29, 64))".
    _uneven_collectives_on_gloo()
    applied.append("uneven all-gather / reduce-scatter on gloo")

    _applied = tuple(applied)
    return _applied


def _uneven_collectives_on_gloo() -> None:
    """megatron's first-dim gather / reduce-scatter with split sizes, by a padded all_gather and
    an all_reduce (same results; CPU only)."""
    from megatron.core.tensor_parallel import mappings

    gather = mappings._gather_along_first_dim
    reduce_scatter = mappings._reduce_scatter_along_first_dim
    if getattr(gather, "_cpu_compat", False):
        return

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or torch.distributed.get_world_size(group) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded, group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or torch.distributed.get_world_size(group) == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        rank = torch.distributed.get_rank(group)
        start = sum(input_split_sizes[:rank])
        return total[start:start + input_split_sizes[rank]].contiguous()

    gather_along_first_dim._cpu_compat = True
    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _define_missing_te_gemm() -> None:
    """None is the value the router already handles ("no TE": plain torch.mm)."""
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


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
    _recompute_in_cpu_mode()


def _recompute_in_cpu_mode() -> None:
    """torch runs an autograd Function's backward without the caller's function modes, so the
    block a recompute re-runs there (megatron's CheckpointFunction: full and selective
    recompute) would meet device='cuda' again (the causal mask): "Torch not compiled with CUDA
    enabled". Its backward runs inside the mode too."""
    function = mcore_random.CheckpointFunction
    original = function.backward
    if getattr(original, "_cpu_compat", False):
        return

    def backward(ctx, *grads):
        with _CudaAsCpuMode():
            return original(ctx, *grads)

    backward._cpu_compat = True
    function.backward = staticmethod(backward)
