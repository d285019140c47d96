"""model.ultramem.kernel=triton end to end (compiled on CUDA, interpreted on the CPU): the layer
and training through train.py give what the torch path gives."""

import copy

import pytest
import torch

from tests.conftest import transformer_config
from tests.kernels.conftest import DEVICE
from tests.training.conftest import losses, train
from ultramem_megatron.memory import UltraMemConfig, UltraMemLayer
from ultramem_megatron.memory.config import MemoryPlusConfig, UltraMemV2Config
from ultramem_megatron.memory.memory_plus import MemoryPlusLayer


def layer_pair(**overrides):
    fields = dict(num_keys=5, key_dim=8, topk=6, phase1_topk=5, value_dim=12, num_heads=2,
                  expansion=4, num_cores=2, query_batchnorm=True, key_balance_weight=0.1)
    fields.update(overrides)
    torch.manual_seed(3)
    reference = UltraMemLayer(transformer_config(hidden_size=16),
                              UltraMemConfig(**fields, kernel="torch"))
    kernels = UltraMemLayer(transformer_config(hidden_size=16),
                            UltraMemConfig(**fields, kernel="triton"))
    kernels.load_state_dict(copy.deepcopy(reference.state_dict()))
    return reference, kernels.to(DEVICE)


@pytest.mark.parametrize("overrides", [{}, {"expansion": 9, "num_cores": 3, "value_dim": 9},
                                       {"expansion": 1, "num_cores": 1, "tucker_rank": 1}],
                         ids=["E4-c2", "E9-c3", "E1-c1"])
def test_layer_forward_and_gradients_match_torch(overrides):
    assert_same_layer(*layer_pair(**overrides))


@pytest.mark.parametrize("family", ["ultramem_v2", "memory_plus"])
def test_new_families_match_torch(family):
    """UltraMemV2 (pre-value-weighted scores, summed groups) and Memory+ (one core: softmax
    weights) through the kernels."""
    def build(kernel: str):
        torch.manual_seed(3)
        if family == "memory_plus":
            memory = MemoryPlusConfig(num_keys=6, key_dim=8, topk=5, num_heads=2, kernel=kernel)
            return MemoryPlusLayer(transformer_config(hidden_size=16), memory)
        memory = UltraMemV2Config(num_keys=4, key_dim=8, topk=6, phase1_topk=5, value_dim=12,
                                  pre_value_dim=6, pre_value_activation="gelu", expansion=4,
                                  memory_layers=2, share_ratio=0.5, kernel=kernel)
        return UltraMemLayer(transformer_config(hidden_size=16), memory, layer_index=1)

    reference, kernels = build("torch"), build("triton")
    kernels.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert_same_layer(reference, kernels.to(DEVICE))


def assert_same_layer(reference, kernels) -> None:
    x = torch.randn(7, 2, 16)
    probe = torch.randn(7, 2, 16)
    results = []
    for layer in (reference, kernels):   # the torch reference on the CPU, the kernels on DEVICE
        device = layer.values.values.device
        layer.refresh_rank1()
        out, aux = layer(x.to(device))
        ((out * probe.to(device)).sum() + aux).backward()
        results.append((out.detach().cpu(), aux.detach().cpu(),
                        {name: p.grad.cpu() for name, p in layer.named_parameters()}))
    (out_ref, aux_ref, grads_ref), (out_ker, aux_ker, grads_ker) = results
    torch.testing.assert_close(out_ker, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_ker, aux_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_ker[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_the_layer_runs_the_kernels(monkeypatch):
    """kernel=triton really dispatches to both kernels (counted), kernel=torch to neither."""
    from ultramem_megatron.kernels import lookup_pool, topm
    calls = []
    for module, name in ((lookup_pool, "_segment_pool"), (topm, "two_phase_select")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    reference, kernels = layer_pair()
    with torch.no_grad():
        reference.eval()(torch.randn(3, 1, 16))
        assert calls == []
        kernels.eval()(torch.randn(3, 1, 16, device=DEVICE))
    assert sorted(calls) == ["_segment_pool", "two_phase_select"]


@pytest.mark.slow
def test_training_with_kernels_matches_torch(tmp_path):
    """2 steps of a small UltraMem model (BatchNorm + key balance) through train.py: the Triton
    kernels (interpreted, so the model is small) reproduce the torch path's losses, the second
    after an optimizer step and a rank-1 refresh."""
    steps = ["train.max_steps=2", "train.eval_iters=1", "model.seq_length=16",
             "train.micro_batch_size=1", "train.global_batch_size=2",
             "model.ultramem.num_keys=4", "model.ultramem.topk=4"]
    reference = tmp_path / "torch"
    kernels = tmp_path / "triton"
    train(reference, *steps, "model.ultramem.kernel=torch")
    log = train(kernels, *steps, "model.ultramem.kernel=triton").stdout
    assert "Triton memory kernels" in log
    want, got = losses(reference), losses(kernels)
    assert sorted(got) == [1, 2]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got, want)
