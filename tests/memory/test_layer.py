"""The UltraMem layer end to end: gradients, the rank-1 buffers, gradcheck, init targets, config."""

import math

import pytest
import torch
from torch.func import functional_call

from tests.conftest import transformer_config
from ultramem_megatron.memory import MemoryConfigError, UltraMemConfig, UltraMemLayer, is_value_param
from ultramem_megatron.memory.selection import two_phase_topk


def tiny_layer(dtype=torch.float32, **overrides):
    fields = dict(num_keys=4, key_dim=8, topk=3, phase1_topk=4, value_dim=8, num_heads=2)
    fields.update(overrides)
    return UltraMemLayer(transformer_config(hidden_size=16, dtype=dtype), UltraMemConfig(**fields))


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_gradients_reach_every_parameter(qk_norm):
    layer = tiny_layer(qk_norm=qk_norm, query_conv_kernel=3)
    out, aux = layer(torch.randn(5, 2, 16))
    (out.square().sum() + aux).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert is_value_param(layer.values.values)
    assert not is_value_param(layer.retrieval.keys)


def test_no_gradient_through_phase1_selection():
    """The layer's score gradients equal those of re-scoring its own chosen cells with the
    selection held fixed: phase-1 filter scores must not reach the output."""
    layer = tiny_layer(torch.float64)
    retrieval = layer.retrieval
    x = torch.randn(6, 16, dtype=torch.float64)
    s_row, s_col = (s.detach().requires_grad_(True) for s in retrieval.key_scores(x))
    idx, scores = two_phase_topk(s_row, s_col, retrieval.cores, retrieval.rank1_row,
                                 retrieval.rank1_col, width=4, topk=3)
    probe = torch.randn_like(scores)
    grads = torch.autograd.grad((scores * probe).sum(), [s_row, s_col, retrieval.cores])

    num_keys, rank = s_row.shape[2], s_row.shape[3]
    fixed_row = (idx // num_keys).unsqueeze(-1).expand(-1, -1, -1, rank)
    fixed_col = (idx % num_keys).unsqueeze(-1).expand(-1, -1, -1, rank)
    rescored = torch.einsum("thmr,chrs,thms->thmc", s_row.gather(2, fixed_row),
                            retrieval.cores, s_col.gather(2, fixed_col))
    ref = torch.autograd.grad((rescored * probe).sum(), [s_row, s_col, retrieval.cores])
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)
    untouched = torch.ones_like(s_row, dtype=torch.bool).scatter(2, fixed_row, False)
    assert torch.count_nonzero(grads[0][untouched]) == 0


def test_backward_and_step_leave_rank1_buffers_until_refresh():
    layer = tiny_layer()
    u, t = layer.retrieval.rank1_row.clone(), layer.retrieval.rank1_col.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    out, aux = layer(torch.randn(5, 2, 16))
    (out.square().sum() + aux).backward()
    optimizer.step()
    assert torch.equal(layer.retrieval.rank1_row, u) and torch.equal(layer.retrieval.rank1_col, t)
    assert "retrieval.rank1_row" in layer.state_dict()
    assert all(b.grad_fn is None and not b.requires_grad for b in layer.buffers())
    layer.refresh_rank1()
    core_sum = layer.retrieval.cores.detach().sum(0)
    leading = torch.linalg.svdvals(core_sum)[:, 0]
    new_u, new_t = layer.retrieval.rank1_row, layer.retrieval.rank1_col
    assert not torch.equal(new_u, u)
    torch.testing.assert_close(torch.einsum("hr,hrs,hs->h", new_u, core_sum, new_t), leading)


@pytest.mark.parametrize("qk_norm,conv", [("rmsnorm", 0), ("layernorm", 2)])
def test_float64_gradcheck(qk_norm, conv):
    layer = tiny_layer(torch.float64, qk_norm=qk_norm, query_conv_kernel=conv)
    names = ["values.values", "values.out_proj.weight", "retrieval.cores", "retrieval.keys",
             "retrieval.query_proj.weight", "retrieval.query_norm.weight"]
    params = dict(layer.named_parameters())
    x = torch.randn(3, 2, 16, dtype=torch.float64, requires_grad=True)

    def run(x, *tensors):
        # gradcheck perturbs the cores through .data, which the aux-loss cache cannot see (as
        # after a megatron optimizer step without refresh_rank1()): drop it so aux is exact.
        layer.retrieval._aux_cache = None
        out, aux = functional_call(layer, {**params, **dict(zip(names, tensors))}, (x,))
        return out, aux

    inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_query_conv_is_causal():
    layer = tiny_layer(query_conv_kernel=3)
    torch.nn.init.normal_(layer.query_conv.weight)
    x = torch.randn(8, 2, 16)
    changed = x.clone()
    changed[5:] = torch.randn(3, 2, 16)
    out, _ = layer(x)
    out_changed, _ = layer(changed)
    torch.testing.assert_close(out[:5], out_changed[:5])
    assert not torch.allclose(out[5:], out_changed[5:])


def test_paper_init_hits_score_and_output_variance_targets():
    """Selected per-core scores average ~1 and the output variance is ~1/(2L), the GPT residual
    target, for inputs of unit variance (the block's normed FFN input)."""
    num_layers, hidden = 12, 256
    memory = UltraMemConfig(num_keys=32, key_dim=64, topk=16, num_heads=2)
    layer = UltraMemLayer(transformer_config(hidden, num_layers), memory)
    x = torch.randn(512, 2, hidden)
    with torch.no_grad():
        _, scores = layer.retrieval(x.view(-1, hidden))
        out, _ = layer(x)
    assert scores.mean().item() == pytest.approx(1.0, rel=0.15)
    assert out.var().item() == pytest.approx(1 / (2 * num_layers), rel=0.3)
    values_std = layer.values.values.std().item()
    assert values_std == pytest.approx(math.sqrt(4 / (2 * 16 * 2 * num_layers)), rel=0.05)
    torch.testing.assert_close(layer.retrieval.key_norm.weight,
                               torch.full((64,), 64 ** -0.5))


def test_meta_device_build_then_materialize_equals_direct_build():
    config = transformer_config(hidden_size=16)
    memory = UltraMemConfig(num_keys=4, key_dim=8, topk=3)
    with torch.device("meta"):
        lazy = UltraMemLayer(config, memory)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.reset_parameters(torch.Generator().manual_seed(7))
    direct = UltraMemLayer(config, memory)
    direct.reset_parameters(torch.Generator().manual_seed(7))
    for (name, got), want in zip(lazy.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(got, want), name


def test_official_init_option():
    layer = tiny_layer(init="official")
    torch.testing.assert_close(layer.retrieval.query_norm.weight, torch.full((8,), 8 ** -0.33))
    assert layer.values.values.std().item() == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize("fields,message", [
    (dict(expansion=8), "perfect square"),
    (dict(topk=17, phase1_topk=4), "phase1_topk"),
    (dict(phase1_topk=100), "phase1_topk"),
    (dict(value_dim=9, num_cores=2), "value_dim"),
    (dict(qk_norm="batchnorm"), "qk_norm"),
    (dict(value_lr_start_mult=0.5), "value_lr_start_mult"),
])
def test_bad_config_is_refused_with_the_field_name(fields, message):
    with pytest.raises(MemoryConfigError, match=message):
        UltraMemConfig(**{"num_keys": 4, "key_dim": 8, "topk": 2, **fields})


def test_default_value_dim_is_half_hidden_and_must_split_over_cores():
    assert tiny_layer(value_dim=None).values.values.shape == (16, 8)
    with pytest.raises(MemoryConfigError, match="value_dim"):
        UltraMemConfig(num_keys=4, key_dim=8, topk=2, num_cores=3).resolved_value_dim(16)


def test_aux_loss_cache_is_fresh_after_init_and_reset(monkeypatch):
    """init and reset_parameters end with refresh_rank1(), so the first forward computes no SVD
    and returns the direct aux loss of the new cores."""
    from ultramem_megatron.memory import retrieval as retrieval_module

    layer = tiny_layer(torch.float64, aux_loss_weight=1.0, aux_loss_margin=0.0)
    calls = []
    original = retrieval_module.core_sum_svd
    monkeypatch.setattr(retrieval_module, "core_sum_svd",
                        lambda cores: calls.append(1) or original(cores))
    for generator in (None, torch.Generator().manual_seed(3)):
        if generator is not None:
            layer.reset_parameters(generator)
            calls.clear()
        _, aux = layer(torch.randn(3, 2, 16, dtype=torch.float64))
        assert calls == []
        direct = retrieval_module.tucker_aux_loss(layer.retrieval.cores, 1.0, 0.0)
        assert aux.item() == pytest.approx(direct.item(), rel=1e-12) and direct.item() > 0
