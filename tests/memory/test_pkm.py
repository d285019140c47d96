"""PKM baseline against a naive implementation that scores every one of the n^2 product keys."""

import pytest
import torch

from tests.conftest import transformer_config
from ultramem_megatron.memory import PKMConfig, ProductKeyMemory


def naive_pkm(pkm, hidden):
    """Score all n*n values per head (s_first[a] + s_second[b]), exact top-k, softmax, sum."""
    cfg = pkm.pkm
    seq, batch, width = hidden.shape
    tokens, half = seq * batch, cfg.key_dim // 2
    query = pkm.query_bn(pkm.query_proj(hidden.reshape(tokens, width))).view(
        tokens, cfg.num_heads, 2, half)
    out = torch.zeros(tokens, width, dtype=hidden.dtype)
    for head in range(cfg.num_heads):
        first = query[:, head, 0] @ pkm.keys[head, 0].t()   # [t, n]
        second = query[:, head, 1] @ pkm.keys[head, 1].t()  # [t, n]
        every = (first[:, :, None] + second[:, None, :]).reshape(tokens, -1)  # [t, n*n]
        scores, rows = every.topk(cfg.topk, -1)
        weights = torch.softmax(scores, -1)
        out += torch.einsum("tk,tkd->td", weights, pkm.values[rows])
    return out.view(seq, batch, width)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_pkm_matches_naive_full_scoring(batchnorm):
    config = transformer_config(hidden_size=12, dtype=torch.float64)
    pkm = ProductKeyMemory(config, PKMConfig(num_keys=9, key_dim=8, topk=5, num_heads=3,
                                             query_batchnorm=batchnorm))
    hidden = torch.randn(7, 2, 12, dtype=torch.float64)
    pkm.train()
    pkm(hidden)  # one step of BatchNorm statistics, then compare in eval mode
    pkm.eval()
    out, aux = pkm(hidden)
    torch.testing.assert_close(out, naive_pkm(pkm, hidden))
    assert aux.item() == 0.0


def test_pkm_gradients_reach_query_keys_and_values():
    pkm = ProductKeyMemory(transformer_config(hidden_size=12), PKMConfig(num_keys=6, key_dim=8, topk=3))
    out, _ = pkm(torch.randn(5, 2, 12))
    out.square().sum().backward()
    for name, param in pkm.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
