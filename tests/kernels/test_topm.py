"""The Triton two-phase top-m against memory.selection.two_phase_topk and brute force over keys.

Inputs are drawn on the CPU; the kernel gets them on DEVICE (CUDA when there is one, else the CPU
under the Triton interpreter) and its outputs and gradients are compared back on the CPU."""

import pytest
import torch

from tests.kernels.conftest import DEVICE
from ultramem_megatron.kernels.topm import triton_two_phase_topk, two_phase_select
from ultramem_megatron.memory.selection import two_phase_topk


def inputs(tokens: int, heads: int, num_keys: int, rank: int, cores: int,
           dtype: torch.dtype = torch.float32, integer: bool = False) -> list[torch.Tensor]:
    """s_row, s_col [t, h, n, r], cores [c, h, r, r], u, t [h, r]: Gaussian, or small integers
    (exact in fp32, so scores tie often at every phase)."""
    shapes = ([(tokens, heads, num_keys, rank)] * 2 + [(cores, heads, rank, rank)]
              + [(heads, rank)] * 2)
    if integer:
        return [torch.randint(-1, 2, shape).to(dtype) for shape in shapes]
    return [torch.randn(shape, dtype=dtype) for shape in shapes]


def on_device(tensors):
    """The tensors as the kernel gets them: on DEVICE."""
    return [x.to(DEVICE) for x in tensors]


def rule_reference(s_row, s_col, cores, u, t, width, topk):
    """The documented tie rule, one (token, head) at a time: phase-1 top-w by (score desc, key
    index asc), then top-m of the candidate pairs by (summed score desc, virtual index asc)."""
    tokens, heads, num_keys, _ = s_row.shape
    out = torch.empty(tokens, heads, topk, dtype=torch.int64)
    for tok in range(tokens):
        for head in range(heads):
            rows = (s_row[tok, head] @ u[head]).argsort(descending=True, stable=True)[:width]
            cols = (s_col[tok, head] @ t[head]).argsort(descending=True, stable=True)[:width]
            virtual = (rows[:, None] * num_keys + cols[None, :]).flatten().sort().values  # [w*w]
            a, b = virtual // num_keys, virtual % num_keys
            score = torch.einsum("pr,rs,ps->p", s_row[tok, head, a], cores[:, head].sum(0),
                                 s_col[tok, head, b])
            out[tok, head] = virtual[score.argsort(descending=True, stable=True)[:topk]]
    return out


@pytest.mark.parametrize("heads,num_keys,rank,cores,width,topk", [
    (1, 13, 1, 1, 4, 5),     # n not a power of two, rank 1, one core, one head
    (2, 37, 3, 2, 6, 10),
    (2, 20, 2, 2, 1, 1),     # w = 1
    (2, 11, 2, 1, 11, 20),   # w = n
    (1, 9, 3, 2, 5, 25),     # m = w * w
    (2, 64, 2, 2, 16, 16),   # power-of-two blocks without padding
])
def test_matches_reference(heads, num_keys, rank, cores, width, topk):
    s_row, s_col, core, u, t = inputs(4, heads, num_keys, rank, cores)
    leaves = [x.requires_grad_() for x in (s_row, s_col, core)]
    device_leaves = [x.to(DEVICE).detach().requires_grad_() for x in leaves]
    idx, scores = triton_two_phase_topk(*device_leaves, *on_device((u, t)), width, topk)
    ref_idx, ref_scores = two_phase_topk(s_row, s_col, core, u, t, width, topk)
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(scores.cpu(), ref_scores)
    weight = torch.randn(ref_scores.shape, dtype=ref_scores.dtype)  # on the CPU, as randn_like was
    grads = torch.autograd.grad((scores * weight.to(DEVICE)).sum(), device_leaves)
    ref_grads = torch.autograd.grad((ref_scores * weight).sum(), leaves)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.cpu(), ref_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_as_reference(dtype):
    """float64 selects in float64, bf16 is upcast to fp32: both as the reference."""
    args = inputs(3, 2, 19, 2, 2, dtype)
    idx, scores = triton_two_phase_topk(*on_device(args), 5, 7)
    idx, scores = idx.cpu(), scores.cpu()
    ref_idx, ref_scores = two_phase_topk(*args, 5, 7)
    assert torch.equal(idx, ref_idx) and scores.dtype == ref_scores.dtype
    torch.testing.assert_close(scores, ref_scores)


def test_full_width_is_exact_top_m_of_key_grid():
    """With w = n phase 1 keeps every key: the result is the top-m of the whole n x n grid."""
    s_row, s_col, cores, u, t = inputs(3, 2, 23, 3, 2)
    idx, scores = triton_two_phase_topk(*on_device((s_row, s_col, cores, u, t)), 23, 12)
    idx, scores = idx.cpu(), scores.cpu()
    grid = torch.einsum("thar,hrs,thbs->thab", s_row, cores.sum(0), s_col).flatten(2)  # [t, h, n*n]
    best = grid.topk(12, -1)
    assert torch.equal(idx, best.indices)
    torch.testing.assert_close(scores.sum(-1), best.values)


@pytest.mark.parametrize("heads,num_keys,rank,cores,width,topk", [
    (2, 10, 2, 2, 4, 9),
    (1, 7, 1, 1, 7, 49),     # rank 1, w = n, m = w * w: every pair, in tie order
    (2, 12, 3, 2, 1, 1),
])
def test_ties_follow_the_documented_rule(heads, num_keys, rank, cores, width, topk):
    args = inputs(3, heads, num_keys, rank, cores, integer=True)
    idx, scores = triton_two_phase_topk(*on_device(args), width, topk)
    idx, scores = idx.cpu(), scores.cpu()
    assert torch.equal(idx, rule_reference(*args, width, topk))
    s_row, s_col, core, _, _ = args
    a, b = idx // num_keys, idx % num_keys
    pick = lambda s, i: s.gather(2, i.unsqueeze(-1).expand(-1, -1, -1, rank))  # noqa: E731
    assert torch.equal(scores, torch.einsum("thmr,chrs,thms->thmc", pick(s_row, a), core,
                                            pick(s_col, b)))


def test_custom_op_and_fake():
    s_row, s_col, cores, u, t = on_device(inputs(2, 2, 9, 2, 2))
    torch.library.opcheck(two_phase_select, (s_row, s_col, cores, u, t, 3, 4))


def test_rejects_bad_sizes():
    args = on_device(inputs(1, 1, 5, 2, 1))
    with pytest.raises(ValueError):
        triton_two_phase_topk(*args, 6, 1)
    with pytest.raises(ValueError):
        triton_two_phase_topk(*args, 2, 5)
