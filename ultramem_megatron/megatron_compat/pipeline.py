"""Pipeline stages and context ranks: which blocks a model chunk builds, its seeded layers, the
stage groups, and each context rank's part of a sequence."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class Stage:
    """One model chunk of this rank: virtual stage vp_stage (None without interleaving) of
    pipeline rank pp_rank; it embeds tokens (pre_process) and/or computes the loss
    (post_process)."""
    pp_rank: int
    vp_stage: Optional[int]
    pre_process: bool
    post_process: bool


def local_stages(virtual_size: int) -> list[Stage]:
    """This rank's model chunks, in the order megatron's interleaved schedule expects them."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if virtual_size == 1:
        return [Stage(pp_rank, None, pp_rank == 0, pp_rank == pp_size - 1)]
    return [Stage(pp_rank, v, pp_rank == 0 and v == 0,
                  pp_rank == pp_size - 1 and v == virtual_size - 1)
            for v in range(virtual_size)]


def single_stage() -> Stage:
    """The whole model in one chunk (export, tests, world of one)."""
    return Stage(0, None, True, True)


def block_spec_for_stage(config, use_te: bool, stage: Stage):
    """megatron's GPT block spec holding only this chunk's blocks, and the global index of its
    first block."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                       normalization=config.normalization,
                                       vp_stage=stage.vp_stage, pp_rank=stage.pp_rank)
    return block, get_transformer_layer_offset(config, vp_stage=stage.vp_stage,
                                               pp_rank=stage.pp_rank)


@functools.cache
def _seeded(layer_class: type) -> type:
    class Seeded(layer_class):
        def __init__(self, *args, init_seed: int, **kwargs):
            # CPU generator only: the CUDA generators (dropout) keep megatron's seeding.
            torch.default_generator.manual_seed(init_seed)
            super().__init__(*args, **kwargs)

    Seeded.__name__ = Seeded.__qualname__ = f"Seeded{layer_class.__name__}"
    return Seeded


def seed_layer(layer_spec, init_seed: int) -> None:
    """Draw this layer's initial weights from its own seed (in place): the same weights whichever
    pipeline stage builds it (the layer specs already use CPU initialization, so TP slices one
    full matrix)."""
    layer_spec.module = _seeded(layer_spec.module)
    layer_spec.params = {**layer_spec.params, "init_seed": init_seed & 0xFFFF_FFFF_FFFF_FFFF}


def _pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size() \
        if parallel_state.model_parallel_is_initialized() else 1


def from_last_stage(values: list[float], device) -> list[float]:
    """Values only the last pipeline stage computed (the loss), on every stage."""
    if _pipeline_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return tensor.tolist()


def sum_over_stages(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the pipeline group, in place (each stage holds its own blocks' part)."""
    if _pipeline_size() > 1:
        dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def gather_over_stages(record: dict) -> list[dict]:
    """Every pipeline stage's record (a small dict), in stage order; [record] without pipelining."""
    if _pipeline_size() == 1:
        return [record]
    records: list = [None] * _pipeline_size()
    dist.all_gather_object(records, record, group=parallel_state.get_pipeline_model_parallel_group())
    return records


def context_parallel_part(batch: dict) -> dict:
    """This context rank's part of a batch of [b, s] tensors: megatron's causal load balance
    (the sequence cut into 2 x CP chunks, rank r keeping chunks r and 2 x CP - 1 - r), the
    layout its context-parallel attention expects. The batch itself without CP."""
    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False)   # >= 0.19
    return get_batch_on_this_cp_rank(dict(batch))


def set_chunk_sync_funcs(config, ddp_chunks: list, overlap_grad_reduce: bool) -> None:
    """megatron-LM's schedule hooks for one or several model chunks: no_sync (accumulate
    without communication until the last micro-batch), grad_sync (several chunks with
    overlapped reduction: each chunk starts its reduction once its last backward is done,
    aligned over the pipeline stages), finalize (wait for / run the reductions, the TP sums)."""
    from megatron.core.distributed import finalize_model_grads

    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    if overlap_grad_reduce and _pipeline_size() > 1:
        grad_sync = [chunk.start_grad_sync for chunk in ddp_chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    config.param_sync_func = None

    def finalize(model_chunks, *args, **kwargs):
        sum_shared_table_grads(model_chunks)
        return finalize_model_grads(model_chunks, *args, **kwargs)

    config.finalize_model_grads_func = finalize


def sum_shared_table_grads(model_chunks: list) -> None:
    """Every model chunk (on every pipeline stage) holds a copy of a shared memory table
    (UltraMemV2, Memory+; parameters marked `shared_memory_table`): give each copy the sum of
    all copies' gradients before megatron's data-parallel reduction, as megatron does for tied
    embeddings, so the copies take the same optimizer steps. Needs the reduction not started yet
    (config validation refuses overlap_grad_reduce here). Nothing to do with one copy."""
    copies: dict[str, list] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if getattr(param, "shared_memory_table", False):
                copies.setdefault(name.rpartition(".")[2], []).append(param)
    if not copies or (_pipeline_size() == 1 and all(len(c) == 1 for c in copies.values())):
        return
    for params in copies.values():   # the same names, in the same order, on every stage
        grads = [param.main_grad for param in params]
        total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0].clone()
        if _pipeline_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        for grad in grads:
            grad.copy_(total)
