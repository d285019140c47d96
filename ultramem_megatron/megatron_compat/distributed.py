"""Process groups, megatron's parallel state, devices, and the DDP / Float16Module wrappers."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from .cpu import apply_cpu_patches, enter_cpu_device_mode

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


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def initialize_distributed(tensor_parallel_size: int, seed: int, memory_parallel_size: int = 1,
                           timeout_s: float = 600.0, pipeline_parallel_size: int = 1,
                           virtual_pipeline_size: int = 1, context_parallel_size: int = 1,
                           expert_parallel_size: int = 1) -> None:
    """Process group from torchrun's environment (or a world of one), megatron parallel state,
    seeds; on CPU also the CUDA-as-CPU shims. Data parallelism takes the ranks left after
    TP x PP x CP. megatron's expert-parallel group (carved from data-parallel ranks with the same
    TP rank) is the MoE family's EP group, or UltraMem's memory-parallel group, whose value
    shards are then reduced over the expert-data-parallel group (a model has one or the other).
    Every group's collectives give up after timeout_s (a dead or frozen peer)."""
    apply_cpu_patches()
    enter_cpu_device_mode()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
    _init_process_group(timeout_s)
    model_parallel = tensor_parallel_size * pipeline_parallel_size * context_parallel_size
    expert_parallel = max(memory_parallel_size, expert_parallel_size)
    if dist.get_world_size() % (model_parallel * expert_parallel):
        raise ValueError(f"world size {dist.get_world_size()} is not a multiple of TP x PP x CP "
                         f"({model_parallel}) x the memory- / expert-parallel size "
                         f"({expert_parallel})")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=(virtual_pipeline_size
                                                  if virtual_pipeline_size > 1 else None),
            context_parallel_size=context_parallel_size,
            expert_model_parallel_size=expert_parallel,
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


def wrap_model_chunks(chunks: list, use_distributed_optimizer: bool,
                      overlap_grad_reduce: bool = False,
                      overlap_param_gather: bool = False) -> list:
    """megatron DistributedDataParallel (contiguous grad buffers, fp32 grad reduction) around each
    model chunk (inside Float16Module in bf16), and the config hooks megatron's schedules use to
    delay and finish the grad reduction, as megatron-LM's training.py sets them
    (pipeline.set_chunk_sync_funcs). The chunks share one TransformerConfig.

    overlap_grad_reduce: each bucket's reduce-scatter (all-reduce without the distributed
    optimizer) starts asynchronously in the last micro-batch's backward, once the bucket's
    gradients are all there. overlap_param_gather (distributed optimizer only): the optimizer
    step no longer gathers the updated parameters; the next forward does, bucket by bucket, in
    forward pre-hooks. Until then the model's parameters are stale: see sync_params."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from .pipeline import set_chunk_sync_funcs

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer)
    wrapped = []
    for index, model in enumerate(chunks):
        model.to(device())
        module = wrap_float16(model) if model.config.bf16 else model
        # megatron-LM's bucketing: a chunk after the first is one bucket.
        wrapped.append(DistributedDataParallel(
            config=model.config, ddp_config=ddp_config, module=module,
            disable_bucketing=index > 0))
    set_chunk_sync_funcs(chunks[0].config, wrapped, overlap_grad_reduce)
    return wrapped


def overlaps_param_gather(ddp_model: torch.nn.Module) -> bool:
    """Whether this DDP model gathers the distributed optimizer's parameters in forward
    pre-hooks (so they are stale between the optimizer step and the next forward)."""
    config = ddp_model.ddp_config
    return bool(config.use_distributed_optimizer and config.overlap_param_gather)


def sync_params(ddp_model: torch.nn.Module) -> None:
    """Make every parameter current after an optimizer step whose gather is deferred (waits for
    gathers in flight, runs the others synchronously): before anything reads parameters outside
    a forward (rank-1 refresh, metrics, evaluation's first module, checkpoints). A no-op
    without overlap_param_gather, where the optimizer step already gathered them. The next
    forward's pre-hooks then find every bucket gathered and do nothing."""
    if not overlaps_param_gather(ddp_model):
        return
    for group in ddp_model.bucket_groups + ddp_model.expert_parallel_bucket_groups:
        if not group.param_gather_dispatched or group.param_gather_handle is not None:
            group.start_param_sync(force_sync=True)


def params_synced(ddp_model: torch.nn.Module) -> bool:
    """True when no bucket's parameter gather is pending (always without overlap_param_gather)."""
    if not overlaps_param_gather(ddp_model):
        return True
    return all(group.param_gather_dispatched and group.param_gather_handle is None
               for group in ddp_model.bucket_groups + ddp_model.expert_parallel_bucket_groups)


def wait_param_gather(ddp_model: torch.nn.Module, module: torch.nn.Module) -> None:
    """Wait for the deferred gather of `module`'s parameters (all of them, recursively), exactly as
    DDP's own forward pre-hook does for each submodule's parameters (dispatching the next
    bucket's gather when one finishes): for a hook that must read a module's parameters before
    its submodules' pre-hooks run. A no-op without overlap_param_gather or with the hooks off."""
    if not overlaps_param_gather(ddp_model) or not ddp_model.remove_forward_pre_hook_handles:
        return
    config = ddp_model.ddp_config
    skip_next = bool(getattr(config, "align_param_gather", False)
                     or getattr(ddp_model, "overlap_param_gather_with_optimizer_step", False))
    for param in module.parameters():
        group = ddp_model.param_to_bucket_group.get(param)
        if group is not None:
            group.finish_param_sync(skip_next_bucket_dispatch=skip_next)


def set_param_gather_hooks(ddp_model: torch.nn.Module, enabled: bool) -> None:
    """megatron-LM's enable/disable_forward_pre_hook around training: off (without a gather) until
    the first optimizer step, so the first forward does not gather parameters every rank already
    has; on from then on. A no-op without overlap_param_gather."""
    if not overlaps_param_gather(ddp_model):
        return
    hooks_on = bool(ddp_model.remove_forward_pre_hook_handles)
    if enabled and not hooks_on:
        ddp_model.enable_forward_pre_hook()
    elif not enabled and hooks_on:
        ddp_model.disable_forward_pre_hook(param_sync=False)
