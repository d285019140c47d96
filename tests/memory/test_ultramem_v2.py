"""UltraMemV2 against float64 brute force: per-rank query scores, full-grid selection, the ring
window of the shared table, pre-value weighting, the summed groups' one projection, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import transformer_config
from tests.memory.brute_force import assert_layer_matches
from ultramem_megatron.config import ConfigError, ModelConfig, RunConfig, validate
from ultramem_megatron.memory import MemoryConfigError, UltraMemLayer, is_value_param
from ultramem_megatron.memory.config import UltraMemV2Config
from ultramem_megatron.memory.layer import v2_tables

HIDDEN, TOKENS = 8, 6


def v2_config(**overrides) -> UltraMemV2Config:
    # K = 2 x 3 = 6 keys per axis, every candidate kept in phase 1 (so the selection is exact)
    fields = dict(num_keys=3, key_dim=4, topk=5, phase1_topk=6, value_dim=6, pre_value_dim=4,
                  expansion=4, num_heads=2, num_cores=2, tucker_rank=2, memory_layers=3,
                  share_ratio=0.5)
    fields.update(overrides)
    return UltraMemV2Config(**fields)


def build(memory: UltraMemV2Config, layer_index: int = 1, tables=None) -> UltraMemLayer:
    config = transformer_config(hidden_size=HIDDEN, dtype=torch.float64)
    layer = UltraMemLayer(config, memory, tables=tables, layer_index=layer_index)
    with torch.no_grad():   # break the init's symmetries: random gains and cores
        layer.retrieval.query_norm.weight.uniform_(0.5, 1.5)
        layer.retrieval.key_norm.weight.uniform_(0.5, 1.5)
        layer.retrieval.cores.normal_()
    layer.refresh_rank1()
    return layer


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def brute_force(layer: UltraMemLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output token by token, from its parameters, with every (row key, column key)
    pair of the K x K grid scored exactly (float64, differentiable in the parameters)."""
    memory, retrieval, values = layer.memory, layer.retrieval, layer.values
    heads, rank, k = memory.num_heads, memory.tucker_rank, memory.key_dim
    keys_per_axis, window = memory.keys_per_axis, memory.num_values
    eps = retrieval.query_norm.eps
    chunk = values.value_dim // memory.num_cores
    outputs = []
    for token in x:
        if memory.query_per_rank:
            query = (retrieval.query_proj.weight @ token).view(2, rank, k)
        else:  # one query per axis, used by every rank
            query = (retrieval.query_proj.weight @ token).view(2, 1, k).expand(2, rank, k)
        query = rms(query, retrieval.query_norm.weight, eps)
        keys = rms(retrieval.keys.transpose(-1, -2), retrieval.key_norm.weight, eps)  # [h,2,K,r,k]
        pre = values.pre_proj.weight @ token if values.pre_proj is not None else None
        pooled = torch.zeros(values.pooled_groups, values.value_dim, dtype=x.dtype)
        for h in range(heads):
            s_row = torch.stack([keys[h, 0, :, i] @ query[0, i] for i in range(rank)], -1)
            s_col = torch.stack([keys[h, 1, :, i] @ query[1, i] for i in range(rank)], -1)
            core_sum = retrieval.cores[:, h].sum(0)
            grid = {(a, b): (s_row[a] @ core_sum @ s_col[b]).item()
                    for a in range(keys_per_axis) for b in range(keys_per_axis)}
            for a, b in sorted(grid, key=grid.get, reverse=True)[:memory.topk]:
                slot = int(values.virtual_to_slot[a * keys_per_axis + b])
                group, position = divmod(slot, window)
                row = (position + values.readout.offset) % memory.table_rows
                weight = torch.ones((), dtype=x.dtype)
                if pre is not None:
                    weight = values.pre_values[row] @ pre
                    if memory.pre_value_activation == "gelu":
                        weight = F.gelu(weight)
                target = 0 if memory.value_projection == "single" else group
                for c in range(memory.num_cores):
                    sigma = s_row[a] @ retrieval.cores[c, h] @ s_col[b]
                    cols = slice(c * chunk, (c + 1) * chunk)
                    pooled[target, cols] = pooled[target, cols] + weight * sigma * \
                        values.values[row, cols]
        outputs.append(values.out_proj.weight.flatten(1) @ pooled.flatten())
    return torch.stack(outputs)


@pytest.mark.parametrize("overrides", [
    {},
    {"query_per_rank": False},
    {"pre_value_activation": "gelu", "value_projection": "per_group"},
    {"pre_value_dim": 0, "expansion": 1, "phase1_topk": 3},
], ids=["paper", "code-query", "gelu-per-group", "no-pre-values"])
def test_layer_equals_brute_force_with_gradients(overrides):
    layer = build(v2_config(**overrides))
    aux = assert_layer_matches(layer, brute_force, TOKENS, HIDDEN)
    assert aux == 0   # the paper's V2 has no Tucker penalty


@pytest.mark.parametrize("anchor", ["centre", "start"])
@pytest.mark.parametrize("memory_layers, share_ratio", [(3, 1 / 3), (3, 0.5), (4, 1.0), (5, 0.3)])
def test_ring_windows_address_every_slot_once(memory_layers, share_ratio, anchor):
    """Every virtual address of layer l maps to one (group, window row), each pair once; the
    window is N' = floor(sqrt(rho N_all))^2 consecutive rows (mod N_all) centred on layer l's
    own n^2 rows (the paper) or starting at l n^2 (the code), so with rho = 1/L the layers'
    windows tile the table."""
    memory = v2_config(memory_layers=memory_layers, share_ratio=share_ratio, window_anchor=anchor,
                       value_projection="per_group")   # locate() keeps the groups apart
    n2, table = memory.num_keys ** 2, memory.table_rows
    window = math.isqrt(int(share_ratio * table + 1e-9)) ** 2
    assert memory.num_values == window
    tables = v2_tables(memory, transformer_config(hidden_size=HIDDEN), seed=3)
    read = []
    for index in range(memory_layers):
        layer = UltraMemLayer(transformer_config(hidden_size=HIDDEN), memory, tables=tables,
                              layer_index=index)
        virtual = torch.arange(memory.expansion * window).view(1, -1)
        rows, groups = layer.values.locate(virtual)
        pairs = set(zip(groups.flatten().tolist(), rows.flatten().tolist()))
        assert len(pairs) == virtual.numel()
        first = index * n2 + ((n2 - window) // 2 if anchor == "centre" else 0)
        expected_rows = {(first + i) % table for i in range(window)}
        assert set(rows.flatten().tolist()) == expected_rows
        assert set(groups.flatten().tolist()) == set(range(memory.expansion))
        read.append(expected_rows)
    if memory_layers * window == table and share_ratio * memory_layers == pytest.approx(1):
        assert set().union(*read) == set(range(table))
        assert sum(len(r) for r in read) == table


def test_layers_share_one_table_and_its_gradient():
    """Two layers built on one MemoryTables read the same Parameters without registering them
    (the model holds them once); the table's gradient is the sum of both layers' (autograd
    accumulates). A layer built alone registers tables of its own."""
    memory = v2_config()
    tables = v2_tables(memory, transformer_config(hidden_size=HIDDEN, dtype=torch.float64), seed=5)
    first, second = build(memory, 0, tables), build(memory, 1, tables)
    assert first.values.values is second.values.values is tables.values
    assert first.values.pre_values is tables.pre_values
    assert not any(p is tables.values for p in first.parameters())
    assert is_value_param(tables.values) and is_value_param(tables.pre_values)
    alone = build(memory, 0)
    assert alone.values.values is alone.own_tables.values
    assert "own_tables.values" in dict(alone.named_parameters())
    x = torch.randn(TOKENS, 1, HIDDEN, dtype=torch.float64)
    first(x)[0].sum().backward()
    grad_first = tables.values.grad.clone()
    tables.values.grad = None
    second(x)[0].sum().backward()
    grad_second = tables.values.grad.clone()
    tables.values.grad = None
    (first(x)[0].sum() + second(x)[0].sum()).backward()
    torch.testing.assert_close(tables.values.grad, grad_first + grad_second)


def test_paper_table_init_balances_the_ffn():
    """App. A with sigma_s = 0: sigma_V^4 = 0.2 k_inner D / (m H D_p D_v L); the README model
    (D 768, L 20, FFN 4992, m 32, H 1, D_p = D_v = 192) gets 0.081."""
    from ultramem_megatron.memory.init import v2_table_stds
    readme = UltraMemV2Config(num_keys=360, key_dim=192, topk=32, value_dim=192, pre_value_dim=192,
                              memory_layers=20)
    std, pre_std = v2_table_stds(readme, 768, 4992, 20, "paper")
    assert std == pre_std == pytest.approx(0.0807, abs=1e-4)
    assert v2_table_stds(readme, 768, 4992, 20, "official") == (0.02, 0.02)
    memory = v2_config(memory_layers=2, num_keys=40, share_ratio=0.5)
    tables = v2_tables(memory, transformer_config(hidden_size=HIDDEN), seed=1)
    want, _ = v2_table_stds(memory, HIDDEN, 4 * HIDDEN, 4, "paper")
    assert tables.values.std().item() == pytest.approx(want, rel=0.05)


def test_config_errors_name_the_field():
    with pytest.raises(MemoryConfigError, match="share_ratio"):
        v2_config(share_ratio=1.5)
    with pytest.raises(MemoryConfigError, match="pre_value_dim"):
        v2_config(pre_value_dim=-1)
    with pytest.raises(MemoryConfigError, match="phase1_topk"):   # window of 3^2 rows: K = 6
        v2_config(memory_layers=1, share_ratio=1.0, phase1_topk=7)
    model = ModelConfig(family="ultramem_v2", memory_spans="all", num_layers=2,
                        ultramem_v2=v2_config(memory_layers=None, phase1_topk=20))
    with pytest.raises(ConfigError, match="model.ultramem_v2: .*phase1_topk"):
        validate(RunConfig(model=model))
