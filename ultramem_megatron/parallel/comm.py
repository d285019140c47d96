"""Differentiable collectives over the memory-parallel and TP groups, with optional async completion."""

# The TP-group collectives are megatron's (tensor_parallel.mappings); these are the ones megatron
# has no autograd form of for an arbitrary group: a first-axis all-gather whose backward is a
# reduce-scatter, and an all-to-all (even or uneven splits) that may finish later.

from typing import Optional

import torch
import torch.distributed as dist


class _AllGatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllToAllFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, out_splits: Optional[list[int]],
                in_splits: Optional[list[int]], pending: Optional[list]) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        rows = sum(out_splits) if out_splits is not None else x.shape[0]
        out = x.new_empty((rows, *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows = sum(ctx.in_splits) if ctx.in_splits is not None else grad.shape[0]
        out = grad.new_empty((rows, *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits,
                               group=ctx.group)
        return out, None, None, None, None


def all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] on each of the group's P ranks -> [P*n, ...] in rank order; backward sums the
    P ranks' gradients and returns each rank its own block (reduce-scatter)."""
    return _AllGatherFirstDim.apply(x, group)


def all_to_all_first_dim(x: torch.Tensor, group, out_splits: Optional[list[int]] = None,
                         in_splits: Optional[list[int]] = None,
                         pending: Optional[list] = None) -> torch.Tensor:
    """Block j of x's first axis (in_splits[j] rows, equal blocks by default) goes to rank j;
    the result stacks what each rank sent here (out_splits rows). With `pending`, the exchange
    is left in flight and its work handle appended: wait on it before reading the result.
    The backward is the reverse exchange (synchronous)."""
    return _AllToAllFirstDim.apply(x, group, out_splits, in_splits, pending)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over `group` whose backward sums the ranks' gradients too: for a result each
    rank uses in its own way (unlike megatron's reduce_from_tensor_model_parallel_region)."""
    return _AllReduceSum.apply(x, group)


def sum_over_sequence_parallel_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the TP group, whose ranks hold different tokens under sequence parallelism;
    the backward sums the ranks' gradients too (each rank's result feeds its own tokens), unlike
    megatron's reduce_from_tensor_model_parallel_region (identity backward, replicated use)."""
    from megatron.core import parallel_state
    return _AllReduceSum.apply(x, parallel_state.get_tensor_model_parallel_group())


def sum_over_context_parallel_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the CP group, whose ranks hold different chunks of each sequence (backward
    as sum_over_sequence_parallel_ranks)."""
    from megatron.core import parallel_state
    return _AllReduceSum.apply(x, parallel_state.get_context_parallel_group())


def token_sum_over(sequence_parallel: bool, context_parallel: bool):
    """The sum over every rank holding other tokens of the same sequences (TP under sequence
    parallelism, CP), for statistics over all of them; None when each rank holds them all."""
    sums = ([sum_over_sequence_parallel_ranks] if sequence_parallel else []) + \
        ([sum_over_context_parallel_ranks] if context_parallel else [])
    if not sums:
        return None
    if len(sums) == 1:
        return sums[0]

    def token_sum(x: torch.Tensor) -> torch.Tensor:
        for total in sums:
            x = total(x)
        return x

    return token_sum
