"""Implicit value expansion and the lookup-and-pool op against explicit float64 formulas."""

import pytest
import torch

from ultramem_megatron.memory.lookup import lookup_pool
from ultramem_megatron.memory.values import ImplicitValueExpansion, virtual_permutation

N, VALUE_DIM, HIDDEN, CORES = 10, 8, 6, 2


def make_ive(expansion, seed=3):
    ive = ImplicitValueExpansion(N, VALUE_DIM, expansion, HIDDEN, seed, dtype=torch.float64)
    torch.nn.init.normal_(ive.values)
    torch.nn.init.normal_(ive.out_proj.weight)
    return ive


def explicit_output(ive, virtual_idx, scores):
    """Materialize the projected virtual table, then sum score-weighted rows.

    virtual row v, core c: W_p[:, chunk c] @ V[phys, chunk c] with (phys, p) from the permutation;
    out[t] = sum_k sum_c scores[t, k, c] * table[virtual_idx[t, k], c].
    """
    expansion, cores = ive.expansion, scores.shape[-1]
    chunk = VALUE_DIM // cores
    slot = ive.virtual_to_slot.long()
    phys, group = slot % N, slot // N  # [E*N]
    weight = ive.out_proj.weight.view(HIDDEN, expansion, cores, chunk)
    values = ive.values.view(N, cores, chunk)
    table = torch.einsum("dvcj,vcj->vcd", weight[:, group], values[phys])  # [E*N, c, D]
    return torch.einsum("tkc,tkcd->td", scores, table[virtual_idx])


@pytest.mark.parametrize("expansion", [1, 4, 9])
def test_value_expansion_equals_materialized_virtual_table(expansion):
    ive = make_ive(expansion)
    tokens, items = 5, 3 * expansion + 4  # more items than groups: collisions are certain
    virtual_idx = torch.randint(0, expansion * N, (tokens, items))
    virtual_idx[0, 1] = virtual_idx[0, 0]  # the same virtual address twice adds twice
    scores = torch.randn(tokens, items, CORES, dtype=torch.float64)
    torch.testing.assert_close(ive(virtual_idx, scores), explicit_output(ive, virtual_idx, scores))


def test_lookup_pool_gradients_match_explicit_formula():
    ive = make_ive(4)
    virtual_idx = torch.randint(0, 4 * N, (4, 12))
    scores = torch.randn(4, 12, CORES, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, HIDDEN, dtype=torch.float64)
    grads = torch.autograd.grad((ive(virtual_idx, scores) * probe).sum(),
                                [scores, ive.values, ive.out_proj.weight])
    ref = torch.autograd.grad((explicit_output(ive, virtual_idx, scores) * probe).sum(),
                              [scores, ive.values, ive.out_proj.weight])
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("expansion", [1, 4, 16])
def test_every_physical_value_appears_exactly_expansion_times(expansion):
    slot = virtual_permutation(expansion * N, seed=11).long()
    assert torch.equal(slot.sort().values, torch.arange(expansion * N))  # a bijection
    assert torch.equal(torch.bincount(slot % N, minlength=N), torch.full((N,), expansion))
    assert torch.equal(torch.bincount(slot // N, minlength=expansion), torch.full((expansion,), N))


def test_permutation_is_reproducible_and_saved_with_the_model():
    assert torch.equal(virtual_permutation(4000, 5), virtual_permutation(4000, 5))
    assert not torch.equal(virtual_permutation(4000, 5), virtual_permutation(4000, 6))
    saved = make_ive(4, seed=1)
    assert "virtual_to_slot" in saved.state_dict()
    other = make_ive(4, seed=2)
    other.load_state_dict(saved.state_dict())
    assert torch.equal(other.virtual_to_slot, saved.virtual_to_slot)


def test_each_core_scales_only_its_own_chunk():
    values = torch.randn(N, VALUE_DIM, dtype=torch.float64)
    rows = torch.randint(0, N, (3, 7))
    groups = torch.randint(0, 4, (3, 7))
    scores = torch.randn(3, 7, CORES, dtype=torch.float64)
    half = VALUE_DIM // CORES
    base = lookup_pool(values, rows, groups, scores, 4)
    only_core1 = lookup_pool(values, rows, groups, scores * torch.tensor([0.0, 1.0]), 4)
    doubled_core1 = lookup_pool(values, rows, groups, scores * torch.tensor([1.0, 2.0]), 4)
    assert torch.count_nonzero(only_core1[..., :half]) == 0
    torch.testing.assert_close(only_core1[..., half:], base[..., half:])
    torch.testing.assert_close(doubled_core1[..., :half], base[..., :half])
    torch.testing.assert_close(doubled_core1[..., half:], 2 * base[..., half:])


def test_lookup_pool_rejects_value_width_not_divisible_by_cores():
    with pytest.raises(ValueError, match="not divisible"):
        lookup_pool(torch.randn(N, 7), torch.zeros(1, 2, dtype=torch.long),
                    torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2), 1)


@pytest.mark.parametrize("col_start, width", [(0, 24), (0, 12), (12, 12), (6, 6), (4, 8), (18, 6),
                                              (2, 2)])
def test_pooling_a_column_slice_equals_that_slice_of_the_whole(col_start, width):
    """What a value-dimension shard computes: 3 cores of 8 columns; slices cross chunk edges."""
    values = torch.randn(N, 24, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, N, (5, 9))
    groups = torch.randint(0, 4, (5, 9))
    scores = torch.randn(5, 9, 3, dtype=torch.float64)
    whole = lookup_pool(values, rows, groups, scores, 4)
    cols = slice(col_start, col_start + width)
    part = lookup_pool(values[:, cols], rows, groups, scores, 4, col_start=col_start, value_dim=24)
    torch.testing.assert_close(part, whole[..., cols])
