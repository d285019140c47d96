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
