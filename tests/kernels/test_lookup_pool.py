"""The Triton lookup-and-pool kernels against memory.lookup.pool_bags and a float64 loop.

Inputs are drawn on the CPU; the kernels get them on DEVICE (CUDA when there is one, else the CPU
under the Triton interpreter) and their outputs and gradients are compared back on the CPU."""

import pytest
import torch

from tests.kernels.conftest import DEVICE
from ultramem_megatron.kernels.lookup_pool import pool_bags_bwd, pool_bags_fwd, triton_pool_bags
from ultramem_megatron.memory.lookup import pool_bags


def lookup_items(tokens: int, items: int, groups: int, num_rows: int, cores: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Items as memory.lookup.lookup_pool makes them (bag = token * groups + group), shuffled, with
    the last token's items dropped (its bags are empty), few rows (duplicates within and across
    bags) and token 0's first two items on the same row and bag -> rows, bags [i], scores [i, c],
    num_bags."""
    rows = torch.randint(0, num_rows, (tokens, items), generator=generator)
    group = torch.randint(0, groups, (tokens, items), generator=generator)
    rows[0, 1], group[0, 1] = rows[0, 0], group[0, 0]
    bags = torch.arange(tokens).unsqueeze(-1) * groups + group
    keep = torch.randperm((tokens - 1) * items, generator=generator)  # random bag order
    scores = torch.randn((tokens - 1) * items, cores, generator=generator)
    return rows[:-1].flatten()[keep], bags[:-1].flatten()[keep], scores, tokens * groups


def loop_reference(table, rows, bags, scores, num_bags, col_start=0, value_dim=None):
    """The definition, one item at a time (differentiable; called on float64 copies)."""
    width, cores = table.shape[1], scores.shape[1]
    core = (col_start + torch.arange(width)) // ((value_dim or width) // cores)  # [w]
    out = table.new_zeros(num_bags, width)
    for i in range(len(rows)):
        out[bags[i]] += scores[i, core] * table[rows[i]]
    return out


def labelled(name: str):
    return lambda message: f"{name}: {message}"


def outputs_and_grads(fn, table, rows, bags, scores, *args, grad_seed=1,
                      device=torch.device("cpu")):
    """fn's output and its (table, scores) gradients for a fixed random output gradient (bf16
    values, so it is the same in every dtype), returned on the CPU. fn gets table, rows, bags and
    scores on `device` (DEVICE for the kernels, the CPU for the references), the gradient leaves
    made there."""
    table = table.to(device).detach().requires_grad_()
    scores = scores.to(device).detach().requires_grad_()
    out = fn(table, rows.to(device), bags.to(device), scores, *args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).bfloat16()
    grads = torch.autograd.grad(out, (table, scores), grad.to(out.device, out.dtype))
    return tuple(x.cpu() for x in (out, *grads))


@pytest.mark.parametrize("width", [24, 200])
@pytest.mark.parametrize("groups", [1, 4, 9])
@pytest.mark.parametrize("cores", [1, 2, 4])
def test_fp32_matches_reference_and_float64_loop(cores, groups, width):
    gen = torch.Generator().manual_seed(cores * 100 + groups * 10 + width)
    rows, bags, scores, num_bags = lookup_items(4, 20, groups, 7, cores, gen)
    table = torch.randn(7, width, generator=gen)
    got = outputs_and_grads(triton_pool_bags, table, rows, bags, scores, num_bags, device=DEVICE)
    ref = outputs_and_grads(pool_bags, table, rows, bags, scores, num_bags)
    exact = outputs_and_grads(loop_reference, table.double(), rows, bags, scores.double(),
                              num_bags)
    for name, g, r, e in zip(["out", "d_table", "d_scores"], got, ref, exact):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=labelled(name))
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=labelled(name))
    assert got[0][-groups:].abs().sum() == 0  # the last token's bags are empty


@pytest.mark.parametrize("col_start,width,value_dim,cores", [
    (5, 21, 48, 4),     # starts and ends inside chunks of 12
    (10, 30, 40, 2),    # half of core 0's chunk, all of core 1's
    (0, 7, 16, 2),      # inside core 0's chunk: core 1 gets no columns and a zero gradient
    (3, 150, 160, 4),   # more than one column block, cut at both ends
])
def test_column_slice_cuts_core_chunks(col_start, width, value_dim, cores):
    gen = torch.Generator().manual_seed(col_start + width)
    rows, bags, scores, num_bags = lookup_items(3, 12, 4, 9, cores, gen)
    table = torch.randn(9, width, generator=gen)
    args = (table, rows.int(), bags, scores, num_bags, col_start, value_dim)
    got = outputs_and_grads(triton_pool_bags, *args, device=DEVICE)
    ref = outputs_and_grads(pool_bags, *args)
    exact = outputs_and_grads(loop_reference, table.double(), rows.int(), bags, scores.double(),
                              *args[4:])
    for name, g, r, e in zip(["out", "d_table", "d_scores"], got, ref, exact):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=labelled(name))
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=labelled(name))
    if width == 7:
        assert got[2][:, 1].abs().sum() == 0


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cores", [1, 4])
def test_bf16_table_accumulates_in_fp32(cores, score_dtype):
    """Outputs in the inputs' dtypes, within one final rounding of the exact float64 result on
    the same bf16 inputs: one bf16 ulp (the interpreter truncates to bf16; GPUs round to nearest,
    half that). pool_bags' bf16 table gradient on CPU, a bf16 running sum, is off by >100 ulps."""
    gen = torch.Generator().manual_seed(cores)
    rows, bags, scores, num_bags = lookup_items(3, 40, 1, 5, cores, gen)
    table = torch.randn(5, 72, generator=gen).bfloat16()
    scores = scores.to(score_dtype)
    got = outputs_and_grads(triton_pool_bags, table, rows, bags, scores, num_bags, device=DEVICE)
    exact = outputs_and_grads(loop_reference, table.double(), rows, bags, scores.double(),
                              num_bags)
    for name, g, e, dtype in zip(["out", "d_table", "d_scores"], got, exact,
                                 [torch.bfloat16, torch.bfloat16, score_dtype]):
        assert g.dtype == dtype, name
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
        error = (g.double() - e).abs()
        assert (error <= ulp * e.abs() + 1e-4).all(), (name, (error / e.abs()).max())


def test_backward_is_bitwise_reproducible():
    gen = torch.Generator().manual_seed(3)
    rows, bags, scores, num_bags = lookup_items(4, 30, 2, 3, 2, gen)  # 3 rows: long row runs
    table = torch.randn(3, 40, generator=gen).bfloat16()
    first = outputs_and_grads(triton_pool_bags, table, rows, bags, scores, num_bags,
                              device=DEVICE)
    second = outputs_and_grads(triton_pool_bags, table, rows, bags, scores, num_bags,
                               device=DEVICE)
    for name, a, b in zip(["out", "d_table", "d_scores"], first, second):
        assert torch.equal(a, b), name


def test_no_items_gives_zeros():
    table = torch.randn(4, 8)
    rows = bags = torch.zeros(0, dtype=torch.long)
    out, d_table, d_scores = outputs_and_grads(triton_pool_bags, table, rows, bags,
                                               torch.zeros(0, 2), 3, device=DEVICE)
    assert out.shape == (3, 8) and not out.any() and not d_table.any() and d_scores.shape == (0, 2)


def test_rejects_width_not_divisible_by_cores():
    table, rows, bags, scores = (x.to(DEVICE) for x in (
        torch.randn(4, 10), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
        torch.randn(2, 3)))
    with pytest.raises(ValueError, match="not divisible"):
        triton_pool_bags(table, rows, bags, scores, 1)


def test_custom_ops_pass_opcheck():
    """Schema, fake tensors (register_fake) and the autograd registration as torch checks them."""
    gen = torch.Generator().manual_seed(5)
    rows, bags, scores, num_bags = lookup_items(2, 6, 2, 4, 2, gen)
    table = torch.randn(4, 12, generator=gen).to(DEVICE).requires_grad_()
    rows, bags, scores = rows.to(DEVICE), bags.to(DEVICE), scores.to(DEVICE)
    torch.library.opcheck(pool_bags_fwd, (table, rows, bags, scores.requires_grad_(), num_bags,
                                          2, 16))
    torch.library.opcheck(pool_bags_bwd, (torch.randn(num_bags, 12).to(DEVICE), table.detach(),
                                          rows, bags, scores.detach(), 2, 16))


def test_composes_with_torch_compile():
    gen = torch.Generator().manual_seed(6)
    rows, bags, scores, num_bags = lookup_items(2, 6, 2, 4, 2, gen)
    table = torch.randn(4, 12, generator=gen)

    def loss(table, rows, bags, scores):
        return triton_pool_bags(table, rows, bags, scores, num_bags).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(lambda *a: compiled(*a), table, rows, bags, scores, device=DEVICE)
    ref = outputs_and_grads(lambda *a: loss(*a), table, rows, bags, scores, device=DEVICE)
    for name, g, r in zip(["loss", "d_table", "d_scores"], got, ref):
        assert torch.equal(g, r), name
