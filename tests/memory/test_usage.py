"""Utilisation metrics: known lookups in -> exact statistics out, for the tracker, both memory
layers (retrieval replaced by a fixed choice) and a whole model's per-span output RMS."""

import math

import pytest
import torch

from tests.conftest import transformer_config
from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.memory import PKMConfig, ProductKeyMemory, UltraMemConfig, UltraMemLayer
from ultramem_megatron.memory.usage import UsageTracker, row_usage_stats
from ultramem_megatron.model import build_model


def test_row_usage_stats_exact():
    counts = torch.zeros(100, dtype=torch.int64)
    counts[[7, 3, 50, 99]] = torch.tensor([6, 2, 1, 1])
    stats = row_usage_stats(counts)
    entropy = -(0.6 * math.log2(0.6) + 0.2 * math.log2(0.2) + 2 * 0.1 * math.log2(0.1))
    assert stats["rows_hit"] == pytest.approx(0.04)
    assert stats["top1pct_share"] == pytest.approx(0.6)          # ceil(1 % of 100) = 1 row
    assert stats["entropy_bits"] == pytest.approx(entropy)
    assert stats["kl_uniform_bits"] == pytest.approx(math.log2(100) - entropy)


def test_even_use_is_uniform_and_no_use_is_empty():
    even = row_usage_stats(torch.full((300,), 5))
    assert even["rows_hit"] == 1 and even["top1pct_share"] == pytest.approx(3 / 300)
    assert even["kl_uniform_bits"] == pytest.approx(0, abs=1e-12)
    assert row_usage_stats(torch.zeros(8, dtype=torch.int64)) == {
        "rows_hit": 0.0, "top1pct_share": None, "entropy_bits": None, "kl_uniform_bits": None}


def test_tracker_counts_rms_and_scores_only_in_training():
    tracker = UsageTracker(10, (1, 2, 4))
    a, b = torch.full((3, 4), 2.0), torch.full((5,), 4.0)
    tracker.add_rms(0, a)
    tracker.add_rms(0, b)                                    # mean squares 4 and 16
    tracker.add_top_score(torch.tensor([[[1.0, 3.0]], [[5.0, 2.0]]]))   # maxima 3, 5
    tracker.count_keys(torch.tensor([[[0, 5, 15]]]), keys_per_axis=4)  # (0,0) (1,1) (3,3)
    tracker.eval()
    tracker.add_rms(0, torch.full((2,), 100.0))
    tracker.count_rows(torch.tensor([1, 2]))
    stats = tracker.summary(tracker.packed(), ranks=1)
    assert stats["out_rms"] == pytest.approx(math.sqrt(10.0))
    assert stats["ffn_rms"] is None and stats["resid_rms"] is None
    assert stats["top_score"] == pytest.approx(4.0)
    assert stats["keys_hit"] == pytest.approx(6 / 8)
    assert stats["rows_hit"] == 0
    tracker.reset()
    assert tracker.packed().abs().sum() == 0 and tracker.rms_forwards == [0, 0, 0]


def _brute_force_counts(rows: list[int], num_rows: int) -> torch.Tensor:
    counts = torch.zeros(num_rows, dtype=torch.int64)
    for row in rows:
        counts[row] += 1
    return counts


def test_ultramem_layer_counts_the_rows_and_keys_it_reads(monkeypatch):
    memory = UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=8,
                            num_heads=2)
    layer = UltraMemLayer(transformer_config(hidden_size=16), memory)
    n_axis = memory.keys_per_axis                               # 8 keys per axis, 64 virtual
    tokens, chosen = 6, torch.randint(0, n_axis * n_axis, (6, 2 * 3))
    cores = torch.rand(tokens, 6, memory.num_cores)
    monkeypatch.setattr(layer.retrieval, "forward", lambda x: (chosen, cores))
    layer.train()
    layer(torch.randn(3, 2, 16))
    permutation = layer.values.virtual_to_slot.tolist()
    rows = [permutation[v] % memory.num_values for v in chosen.flatten().tolist()]
    stats = layer.usage.summary(layer.usage.packed(), ranks=1)
    assert stats == {**stats, **row_usage_stats(_brute_force_counts(rows, memory.num_values))}
    keys = {(h, 0, v // n_axis) for t in range(tokens) for h in range(2)
            for v in chosen[t, 3 * h:3 * h + 3].tolist()}
    keys |= {(h, 1, v % n_axis) for t in range(tokens) for h in range(2)
             for v in chosen[t, 3 * h:3 * h + 3].tolist()}
    assert stats["keys_hit"] == pytest.approx(len(keys) / (2 * 2 * n_axis))
    best = cores.sum(-1).view(tokens, 2, 3).amax(-1).mean()
    assert stats["top_score"] == pytest.approx(best.item())
    layer.eval()                                                 # evaluation is not counted
    layer(torch.randn(3, 2, 16))
    assert layer.usage.summary(layer.usage.packed(), ranks=1) == stats


def test_pkm_counts_the_rows_it_reads():
    pkm = ProductKeyMemory(transformer_config(hidden_size=16),
                           PKMConfig(num_keys=5, key_dim=8, topk=3, num_heads=2))
    pkm.train()
    captured = {}
    original = torch.nn.functional.embedding_bag

    def spy(rows, *args, **kwargs):
        captured["rows"] = rows.clone()
        return original(rows, *args, **kwargs)

    torch.nn.functional.embedding_bag, saved = spy, original
    try:
        pkm(torch.randn(4, 2, 16))
    finally:
        torch.nn.functional.embedding_bag = saved
    rows = captured["rows"].flatten().tolist()
    stats = pkm.usage.summary(pkm.usage.packed(), ranks=1)
    assert stats["rows_hit"] == pytest.approx(len(set(rows)) / 25)
    expected = row_usage_stats(_brute_force_counts(rows, 25))
    assert stats["entropy_bits"] == pytest.approx(expected["entropy_bits"])


@pytest.fixture(scope="module")
def single_process():
    megatron_compat.initialize_single_process(0)
    megatron_compat.enter_cpu_device_mode()


def test_model_reports_output_rms_per_span(single_process):
    run = load_config(None, ["model.family=ultramem", "model.num_layers=4", "model.hidden_size=32",
                             "model.num_attention_heads=4", "model.seq_length=8",
                             "model.vocab_size=64", "model.memory_spans=0:1/2:3",
                             "model.ultramem={num_keys: 4, key_dim: 8, topk: 3}"])
    model = build_model(run.model, run.parallel)
    seen = {"memory": [], "residual": {}}
    layers = model.memory_layers()
    for index, layer in enumerate(layers):
        start = layer.start
        layer.start = (lambda start: lambda hidden: _spy_finish(start(hidden), seen))(start)
    for block, span in ((1, 0), (3, 2)):
        model.decoder.layers[block].register_forward_hook(
            lambda module, args, out, span=span: seen["residual"].update({span: out[0]}))
    model.train()
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, torch.arange(8).expand(2, 8), None)
    record = model.memory_usage()
    for index, span in enumerate((0, 2)):
        rms = lambda x: x.detach().double().pow(2).mean().sqrt().item()   # noqa: E731
        assert record[f"mem{index}/out_rms"] == pytest.approx(rms(seen["memory"][index]))
        assert record[f"mem{index}/resid_rms"] == pytest.approx(rms(seen["residual"][span]))
        assert 0 < record[f"mem{index}/ffn_rms"]
        values = layers[index].values.values.detach().double()
        assert record[f"mem{index}/value_rms"] == pytest.approx(values.pow(2).mean().sqrt().item())
    assert record["value_rows_hit"] == pytest.approx(
        (record["mem0/rows_hit"] + record["mem1/rows_hit"]) / 2)
    assert model.memory_usage()["mem0/out_rms"] is None          # counters reset by the call


def _spy_finish(finish, seen):
    def wrapped():
        out, aux = finish()
        seen["memory"].append(out)
        return out, aux
    return wrapped


def _balance_by_hand(scores, filter_vec, width):
    """n * sum_a p_a f_a for one axis, averaged over heads, with Python loops (float64)."""
    tokens, heads, n, _ = scores.shape
    total = 0.0
    for h in range(heads):
        f = [[sum(scores[t, h, a, r].item() * filter_vec[h, r].item()
                  for r in range(scores.shape[3])) for a in range(n)] for t in range(tokens)]
        prob = [0.0] * n
        share = [0] * n
        for t in range(tokens):
            exp = [math.exp(v) for v in f[t]]
            for a in range(n):
                prob[a] += exp[a] / sum(exp) / tokens
            for a in sorted(range(n), key=lambda a: -f[t][a])[:width]:
                share[a] += 1
        total += n * sum(p * s / (tokens * width) for p, s in zip(prob, share))
    return total / heads


def test_key_balance_loss_against_loops_and_its_bounds():
    from ultramem_megatron.memory.retrieval import key_balance_loss
    torch.manual_seed(0)
    s_row, s_col = torch.randn(7, 2, 6, 2, dtype=torch.float64), torch.randn(7, 2, 6, 2,
                                                                            dtype=torch.float64)
    u, t = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    expected = _balance_by_hand(s_row, u, 3) + _balance_by_hand(s_col, t, 3)
    assert key_balance_loss(s_row, s_col, u, t, 3).item() == pytest.approx(expected, rel=1e-12)
    # every token on the same key with near-certain softmax: n per axis; flat scores: 1 per axis
    peaked = torch.zeros(5, 1, 8, 1, dtype=torch.float64)
    peaked[:, :, 2] = 50.0
    one = torch.ones(1, 1, dtype=torch.float64)
    assert key_balance_loss(peaked, peaked, one, one, 1).item() == pytest.approx(16.0)
    flat = torch.zeros(5, 1, 8, 1, dtype=torch.float64)
    assert key_balance_loss(flat, flat, one, one, 8).item() == pytest.approx(2.0)


def test_key_balance_joins_the_aux_loss_in_training_only():
    memory = dict(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=8, num_heads=2)
    plain = UltraMemLayer(transformer_config(hidden_size=16), UltraMemConfig(**memory))
    balanced = UltraMemLayer(transformer_config(hidden_size=16),
                             UltraMemConfig(**memory, key_balance_weight=0.5))
    balanced.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, 16)
    (_, aux_plain), (_, aux_balanced) = plain(x), balanced(x)
    retrieval = balanced.retrieval
    s_row, s_col = retrieval.key_scores(x.reshape(10, 16))
    from ultramem_megatron.memory.retrieval import key_balance_loss
    expected = 0.5 * key_balance_loss(s_row, s_col, retrieval.rank1_row, retrieval.rank1_col, 4)
    assert (aux_balanced - aux_plain).item() == pytest.approx(expected.item(), rel=1e-5)
    aux_balanced.backward()
    assert retrieval.query_proj.weight.grad.abs().sum() > 0 and retrieval.keys.grad.abs().sum() > 0
    balanced.eval()
    assert balanced(x)[1].item() == pytest.approx(plain(x)[1].item())


def test_query_batchnorm_centres_the_query_over_tokens():
    memory = UltraMemConfig(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=8,
                            num_heads=2, query_batchnorm=True)
    layer = UltraMemLayer(transformer_config(hidden_size=16), memory)
    retrieval = layer.retrieval
    x = torch.randn(64, 16) + 5.0                  # a large shared component
    raw = x @ retrieval.query_proj.weight.t()
    centred = (raw - raw.mean(0)) / (raw.var(0, unbiased=False) + retrieval.query_bn.eps).sqrt()
    expected = torch.nn.functional.rms_norm(centred.view(64, 2, 8), (8,),
                                            retrieval.query_norm.weight, 1e-6)
    from ultramem_megatron.memory.selection import tucker_query
    got = tucker_query(x, retrieval.query_proj.weight, retrieval.query_norm, retrieval.query_bn)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert retrieval.query_bn.running_mean.abs().sum() > 0          # statistics were updated
    assert not any("query_bn" in name for name, _ in layer.named_parameters())   # no affine
