"""Memory+ against float64 brute force: product-key selection over the full n x n grid, softmax
weights, the SiLU-gated output, gradients, and the one table every layer shares."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import transformer_config
from tests.memory.brute_force import assert_layer_matches
from ultramem_megatron.memory import MemoryConfigError, is_value_param
from ultramem_megatron.memory.config import MemoryPlusConfig
from ultramem_megatron.memory.memory_plus import MemoryPlusLayer, memory_plus_tables

HIDDEN, TOKENS = 8, 5


def plus_config(**overrides) -> MemoryPlusConfig:
    fields = dict(num_keys=5, key_dim=6, topk=4, num_heads=2, value_dim=6)
    fields.update(overrides)
    return MemoryPlusConfig(**fields)


def build(memory: MemoryPlusConfig, tables=None) -> MemoryPlusLayer:
    layer = MemoryPlusLayer(transformer_config(hidden_size=HIDDEN, dtype=torch.float64), memory,
                            tables=tables)
    with torch.no_grad():
        for norm in (layer.query_norm, layer.key_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
        if layer.query_proj.bias is not None:
            layer.query_proj.bias.normal_()
    return layer


def brute_force(layer: MemoryPlusLayer, x: torch.Tensor) -> torch.Tensor:
    memory, values = layer.memory, layer.values
    n, half = memory.num_keys, memory.key_dim // 2

    def norm(module, t):
        if module is None:
            return t
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight

    keys = norm(layer.key_norm, layer.keys)   # [h, 2, n, half]
    outputs = []
    for token in x:
        query = layer.query_proj.weight @ token
        if layer.query_proj.bias is not None:
            query = query + layer.query_proj.bias
        query = norm(layer.query_norm, query.view(memory.num_heads, 2, half))
        pooled = torch.zeros(values.value_dim, dtype=x.dtype)
        for h in range(memory.num_heads):
            first, second = keys[h, 0] @ query[h, 0], keys[h, 1] @ query[h, 1]
            grid = {(a, b): (first[a] + second[b]).item() for a in range(n) for b in range(n)}
            best = sorted(grid, key=grid.get, reverse=True)[:memory.topk]
            weights = torch.softmax(torch.stack([first[a] + second[b] for a, b in best]), 0)
            for w, (a, b) in zip(weights, best):
                pooled = pooled + w * values.values[a * n + b]
        gate = F.silu(values.gate_proj.weight @ token)
        outputs.append(values.out_proj.weight.flatten(1) @ (pooled * gate))
    return torch.stack(outputs)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": "query", "query_bias": True},
                                       {"qk_norm": "none"}], ids=["paper", "bd", "meta"])
def test_layer_equals_brute_force_with_gradients(overrides):
    layer = build(plus_config(**overrides))
    aux = assert_layer_matches(layer, brute_force, TOKENS, HIDDEN)
    assert aux == 0
    assert is_value_param(layer.values.values) and not is_value_param(layer.keys)


def test_layers_read_one_table():
    memory = plus_config()
    config = transformer_config(hidden_size=HIDDEN, dtype=torch.float64)
    tables = memory_plus_tables(memory, config, seed=2)
    first, second = build(memory, tables), build(memory, tables)
    assert first.values.values is second.values.values is tables.values
    assert not any(p is tables.values for p in first.parameters())   # the model holds it
    assert first.values.virtual_to_slot is None   # rows are the product-key indices
    # Meta's init: the shared table N(0, 1/D_v)
    big = memory_plus_tables(plus_config(num_keys=64), config, seed=2)
    assert big.values.std().item() == pytest.approx(6 ** -0.5, rel=0.03)


def test_config_errors_name_the_field():
    with pytest.raises(MemoryConfigError, match="qk_norm"):
        plus_config(qk_norm="keys")
    with pytest.raises(MemoryConfigError, match="key_dim"):
        plus_config(key_dim=5)
    with pytest.raises(MemoryConfigError, match="topk"):
        plus_config(topk=6)
