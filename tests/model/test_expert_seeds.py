"""Per-expert seeds (megatron_compat.seed_experts) on megatron's own MoE layer specs: SequentialMLP
experts get them, so expert e starts from the same weights at every expert-parallel size;
grouped-GEMM experts (the Transformer Engine path, one weight over a rank's local experts) are
left as megatron builds them."""

import copy
import functools

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.experts import SequentialMLP

from ultramem_megatron import megatron_compat


def experts_of(layer_spec):
    """(class, keyword / params dict) of a layer spec's experts, ModuleSpec or partial form."""
    mlp = layer_spec.submodules.mlp
    moe = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    experts = moe.experts
    if isinstance(experts, functools.partial):
        return experts.func, experts.keywords
    return experts.module, experts.params


def test_sequential_experts_get_their_seed():
    layer = copy.deepcopy(get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False))
    megatron_compat.seed_experts(layer, 1234)
    cls, params = experts_of(layer)
    assert issubclass(cls, SequentialMLP) and cls is not SequentialMLP
    assert params["init_seed"] == 1234


def test_grouped_experts_are_left_alone():
    layer = copy.deepcopy(get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=True))
    before = experts_of(layer)
    if issubclass(before[0], SequentialMLP):   # megatron-core 0.19: no local grouped experts
        pytest.skip("this megatron-core's local spec has no grouped-GEMM experts")
    megatron_compat.seed_experts(layer, 1234)
    cls, params = experts_of(layer)
    assert cls is before[0] and not issubclass(cls, SequentialMLP)
    assert "init_seed" not in params
