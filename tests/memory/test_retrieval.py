"""TDQKR against brute force over the full key grid, the rank-1 filter, and the Tucker aux loss
(direct and as cached by the layer)."""

import pytest
import torch

from ultramem_megatron.memory import UltraMemConfig
from ultramem_megatron.memory import retrieval as retrieval_module
from ultramem_megatron.memory.retrieval import TuckerRetrieval, rank1_filter, tucker_aux_loss
from ultramem_megatron.memory.selection import two_phase_topk

TOKENS, HEADS, KEYS, RANK, CORES = 6, 2, 24, 2, 2


def full_grid(s_row, s_col, cores):
    """Exact per-core scores of every (a, b) cell: [t, h, n*n, c]."""
    grid = torch.einsum("thar,chrs,thbs->thabc", s_row, cores, s_col)
    return grid.flatten(2, 3)


def rank1_cores(u, t, strengths):
    """cores [c, h, r, s] with C_c = strength_c * u t^T, so sum_c C_c is exactly rank 1."""
    outer = torch.einsum("hr,hs->hrs", u, t)
    return torch.stack([s * outer for s in strengths])


def unit(shape):
    v = torch.randn(shape, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def shift_filter_positive(scores, direction):
    """Add a multiple of the filter direction so every filter score u^T s is positive."""
    filt = torch.einsum("thar,hr->tha", scores, direction)
    shift = (-filt.amin(dim=(0, 2)) + 0.1).clamp(min=0)  # per head
    return scores + shift[None, :, None, None] * direction[None, :, None, :]


@pytest.mark.parametrize("topk", [1, 5, 12])
def test_rank1_core_two_phase_equals_exact_grid_topk(topk):
    u, t = unit((HEADS, RANK)), unit((HEADS, RANK))
    cores = rank1_cores(u, t, [0.7, 1.3])
    s_row = shift_filter_positive(torch.randn(TOKENS, HEADS, KEYS, RANK, dtype=torch.float64), u)
    s_col = shift_filter_positive(torch.randn(TOKENS, HEADS, KEYS, RANK, dtype=torch.float64), t)
    idx, scores = two_phase_topk(s_row, s_col, cores, u, t, width=topk, topk=topk)

    exact = full_grid(s_row, s_col, cores)  # [t, h, n*n, c]
    exact_idx = exact.sum(-1).topk(topk, -1).indices
    assert torch.equal(idx.sort(-1).values, exact_idx.sort(-1).values)
    expected = exact.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, CORES))
    torch.testing.assert_close(scores, expected)


def naive_phase2(s_row, s_col, cores, u, t, width, topk):
    """Loops over the width x width candidates of each token and head."""
    idx = torch.empty(TOKENS, HEADS, topk, dtype=torch.long)
    scores = torch.empty(TOKENS, HEADS, topk, cores.shape[0], dtype=s_row.dtype)
    for tok in range(TOKENS):
        for h in range(HEADS):
            rows = (s_row[tok, h] @ u[h]).topk(width).indices.tolist()
            cols = (s_col[tok, h] @ t[h]).topk(width).indices.tolist()
            cands = []
            for a in rows:
                for b in cols:
                    per_core = [s_row[tok, h, a] @ cores[c, h] @ s_col[tok, h, b]
                                for c in range(cores.shape[0])]
                    cands.append((sum(per_core).item(), a * KEYS + b, per_core))
            cands.sort(key=lambda item: -item[0])
            for j, (_, vid, per_core) in enumerate(cands[:topk]):
                idx[tok, h, j] = vid
                scores[tok, h, j] = torch.stack(per_core)
    return idx, scores


@pytest.mark.parametrize("width,topk", [(4, 4), (6, 10), (8, 3)])
def test_general_core_phase2_equals_naive_rescoring(width, topk):
    cores = torch.randn(CORES, HEADS, RANK, RANK, dtype=torch.float64)
    u, t = rank1_filter(cores, torch.zeros(HEADS, RANK), torch.zeros(HEADS, RANK))
    u, t = u.double(), t.double()
    s_row = torch.randn(TOKENS, HEADS, KEYS, RANK, dtype=torch.float64)
    s_col = torch.randn(TOKENS, HEADS, KEYS, RANK, dtype=torch.float64)
    idx, scores = two_phase_topk(s_row, s_col, cores, u, t, width, topk)
    ref_idx, ref_scores = naive_phase2(s_row, s_col, cores, u, t, width, topk)
    assert torch.equal(idx, ref_idx)  # same order: both sorted by the summed score
    torch.testing.assert_close(scores, ref_scores)


def recall_against_exact(second_singular, filter_aligned, topk=8, width=8, tokens=64):
    """Fraction of the exact grid top-m that the two-phase retrieval finds."""
    u, t = unit((HEADS, RANK)), unit((HEADS, RANK))
    u_perp = torch.stack([-u[:, 1], u[:, 0]], -1)
    t_perp = torch.stack([-t[:, 1], t[:, 0]], -1)
    core_sum = torch.einsum("hr,hs->hrs", u, t) + second_singular * torch.einsum(
        "hr,hs->hrs", u_perp, t_perp)
    cores = torch.stack([0.5 * core_sum, 0.5 * core_sum])
    s_row = torch.randn(tokens, HEADS, KEYS, RANK, dtype=torch.float64)
    s_col = torch.randn(tokens, HEADS, KEYS, RANK, dtype=torch.float64)
    if filter_aligned:
        s_row, s_col = shift_filter_positive(s_row, u), shift_filter_positive(s_col, t)
    idx, _ = two_phase_topk(s_row, s_col, cores, u, t, width, topk)
    exact_idx = full_grid(s_row, s_col, cores).sum(-1).topk(topk, -1).indices
    hits = (idx.unsqueeze(-1) == exact_idx.unsqueeze(-2)).any(-1).double()
    return hits.mean().item()


def test_recall_against_exact_grid_is_measured():
    """Recall of the rank-1 filter: near 1 for a near-rank-1 core on filter-aligned scores, lower
    as lambda_2 grows, and about one half on sign-symmetric scores, where the grid's best cells
    are split between (+,+) and (-,-) filter pairs and phase 1 keeps only the positive half."""
    aligned = {lam: recall_against_exact(lam, True) for lam in (0.0, 0.15, 1.0)}
    symmetric = recall_against_exact(0.0, False)
    print(f"\nrecall vs exact grid top-m: aligned {aligned}, sign-symmetric {symmetric:.3f}")
    assert aligned[0.0] == 1.0
    assert aligned[0.15] > 0.9
    assert aligned[1.0] < aligned[0.15]
    assert 0.3 < symmetric < 0.8


def test_rank1_filter_is_leading_singular_pair_with_aligned_signs():
    cores = torch.rand(CORES, HEADS, RANK, RANK)
    u, t = rank1_filter(cores, torch.zeros(HEADS, RANK), torch.zeros(HEADS, RANK))
    core_sum = cores.sum(0)
    lam = torch.linalg.svdvals(core_sum)[:, 0]
    torch.testing.assert_close(torch.einsum("hr,hrs,hs->h", u, core_sum, t), lam)
    # Whatever sign the SVD returns, the result follows the previous (u, t).
    u2, t2 = rank1_filter(cores + 1e-3 * torch.randn_like(cores), -u, -t)
    assert (torch.einsum("hr,hr->h", u2, -u) > 0.99).all()
    assert (torch.einsum("hr,hr->h", t2, -t) > 0.99).all()
    u3, t3 = rank1_filter(cores, u, t)
    torch.testing.assert_close(u3, u)
    torch.testing.assert_close(t3, t)


def cores_with_singular_values(singular, heads=HEADS, num_cores=CORES):
    rank = len(singular)
    left = torch.linalg.qr(torch.randn(heads, rank, rank, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(heads, rank, rank, dtype=torch.float64)).Q
    core_sum = left @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ right.transpose(-1, -2)
    return (core_sum / num_cores).expand(num_cores, -1, -1, -1).clone(), left, right


def test_aux_loss_zero_when_non_leading_singular_values_below_margin():
    cores, _, _ = cores_with_singular_values([2.0, 0.1, 0.05])
    cores.requires_grad_(True)
    loss = tucker_aux_loss(cores, weight=0.001, margin=0.15)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(cores.grad) == 0


@pytest.mark.parametrize("singular", [[2.0, 0.5], [3.0, 0.9, 0.4]])
def test_aux_loss_value_and_gradient_above_margin(singular):
    alpha, tau = 0.001, 0.15
    rank = len(singular)
    cores, left, right = cores_with_singular_values(singular)
    cores.requires_grad_(True)
    loss = tucker_aux_loss(cores, weight=alpha, margin=tau)
    loss.backward()
    expected = alpha / (rank - 1) * sum(max(0.0, s - tau) ** 2 for s in singular[1:])
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # d loss / d C_sum = sum_i 2 alpha/(r-1) relu(lambda_i - tau) u_i v_i^T, averaged over heads;
    # every core receives the gradient of the sum.
    coef = torch.tensor([0.0] + [2 * alpha / (rank - 1) * max(0.0, s - tau) for s in singular[1:]],
                        dtype=torch.float64)
    expected_grad = left @ torch.diag(coef) @ right.transpose(-1, -2) / HEADS
    for c in range(CORES):
        torch.testing.assert_close(cores.grad[c], expected_grad)


def direct_aux_loss(cores, alpha, tau):
    """The aux loss by autograd through a float64 svdvals: the independent reference."""
    singular = torch.linalg.svdvals(cores.sum(0))
    return alpha / (cores.shape[-1] - 1) * (singular[:, 1:] - tau).clamp(min=0).pow(2).sum(-1).mean()


def test_cached_aux_loss_equals_direct_svd_after_parameter_changes(monkeypatch):
    """The layer's aux loss is a surrogate of the penalty cached at refresh_rank1(): its value
    and gradient equal the direct formula's after optimizer steps (refreshed), after an in-place
    change without a refresh, and after load_state_dict (both recomputed lazily); the forward
    computes no SVD when the cache is fresh."""
    alpha, tau = 0.5, 0.15
    cfg = UltraMemConfig(num_keys=4, key_dim=8, topk=2, tucker_rank=3, num_heads=2,
                         num_cores=3, aux_loss_weight=alpha, aux_loss_margin=tau)
    retrieval = TuckerRetrieval(cfg, hidden_size=8, dtype=torch.float64)
    with torch.no_grad():
        retrieval.cores.copy_(torch.randn_like(retrieval.cores))
    svd_calls = []
    original = retrieval_module.core_sum_svd
    monkeypatch.setattr(retrieval_module, "core_sum_svd",
                        lambda cores: svd_calls.append(1) or original(cores))
    optimizer = torch.optim.SGD([retrieval.cores], lr=0.3)

    def check(expected_svds):
        svd_calls.clear()
        retrieval.cores.grad = None
        loss = retrieval.aux_loss()
        loss.backward()
        assert len(svd_calls) == expected_svds
        reference_cores = retrieval.cores.detach().clone().requires_grad_(True)
        reference = direct_aux_loss(reference_cores, alpha, tau)
        reference.backward()
        assert reference.item() > 1e-3  # the penalty is active
        assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
        torch.testing.assert_close(retrieval.cores.grad, reference_cores.grad, rtol=1e-10,
                                   atol=1e-14)

    check(expected_svds=1)  # never cached: computed on first use
    check(expected_svds=0)
    for _ in range(3):  # training: step, refresh, forward without an SVD
        optimizer.step()
        retrieval.refresh_rank1()
        check(expected_svds=0)
    optimizer.step()  # in-place change, no refresh: the version counter sees it
    check(expected_svds=1)
    state = {k: v + 0.1 * torch.randn_like(v) if k == "cores" else v
             for k, v in retrieval.state_dict().items()}
    retrieval.load_state_dict(state)
    check(expected_svds=1)


def test_inference_keeps_normed_keys_until_they_change():
    """Without autograd the normed keys are computed once and reused; an optimizer step (an
    in-place update the version counter sees), a `.data` write followed by refresh_rank1() (what
    megatron's optimizers do), an in-place change of the key norm and load_state_dict each make the next forward recompute them.
    With autograd they are always computed fresh (and the cache is neither read nor written)."""
    cfg = UltraMemConfig(num_keys=6, key_dim=8, topk=3, num_heads=2, qk_norm="layernorm")
    retrieval = TuckerRetrieval(cfg, hidden_size=16).eval()
    with torch.no_grad():
        retrieval.keys.normal_()
        retrieval.cores.uniform_()  # the layer's init; torch.empty leaves garbage (once NaN)
        retrieval.key_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 16)

    def fresh_scores():
        from ultramem_megatron.memory.selection import tucker_keys
        with torch.no_grad():
            original, retrieval.normed_keys = retrieval.normed_keys, lambda: tucker_keys(
                retrieval.keys, retrieval.key_norm)
            try:
                return retrieval.key_scores(x)
            finally:
                retrieval.normed_keys = original

    def check_current():
        with torch.no_grad():
            cached = retrieval.key_scores(x)
        for got, want in zip(cached, fresh_scores()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    check_current()
    with torch.no_grad():
        first = retrieval.normed_keys()
        assert retrieval.normed_keys() is first  # reused
    optimizer = torch.optim.SGD(retrieval.parameters(), lr=0.5)
    retrieval.train()
    retrieval.key_scores(x)[0].sum().backward()   # autograd: computed fresh, cache untouched
    assert retrieval._keys_cache[1] is first
    optimizer.step()
    retrieval.eval()
    check_current()
    with torch.no_grad():
        retrieval.keys.data.mul_(-1.5)             # unseen by the key: stale until a refresh
        assert retrieval.normed_keys() is not None
        retrieval.refresh_rank1()
    check_current()
    with torch.no_grad():
        retrieval.key_norm.weight.mul_(2.0)        # the norm alone changes (in place)
    check_current()
    state = {k: torch.randn_like(v) if k == "keys" else v
             for k, v in retrieval.state_dict().items()}
    retrieval.load_state_dict(state)
    check_current()
