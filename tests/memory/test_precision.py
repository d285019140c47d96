"""bf16 parameters select what float64 arithmetic selects on the same (bf16-rounded) weights and input."""

# Axis legend: s sequence, b batch, t = s*b tokens, D hidden, K = H*m items per token (h*k for PKM)

import pytest
import torch

from tests.conftest import transformer_config
from ultramem_megatron.memory import PKMConfig, ProductKeyMemory, UltraMemConfig, UltraMemLayer
from ultramem_megatron.memory import pkm as pkm_module
from ultramem_megatron.memory.config import MemoryPlusConfig, UltraMemV2Config
from ultramem_megatron.memory.memory_plus import MemoryPlusLayer

SEQ, BATCH, HIDDEN = 64, 8, 128
MEMORY = UltraMemConfig(num_keys=32, key_dim=64, topk=16, phase1_topk=16, num_heads=2,
                        num_cores=2, query_conv_kernel=3)
PKM = PKMConfig(num_keys=32, key_dim=64, topk=16, num_heads=2)


def twins(build) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A bf16 module and a float64 one holding the same (bf16-rounded) weights and buffers."""
    torch.manual_seed(3)
    low = build(torch.bfloat16)
    high = build(torch.float64)
    high.load_state_dict(low.state_dict())  # copy_ upcasts exactly
    return low, high


def selected_sets(module, submodule, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run module on hidden [s, b, D]; the sorted indices submodule's output 0 names [t, K]
    (captured by a hook, so it is what the layer really used), and the output."""
    captured = []
    handle = submodule.register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        out = module(hidden)[0]
    handle.remove()
    indices = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    return indices.reshape(SEQ * BATCH, -1).sort(-1).values, out


def agreement(low_idx: torch.Tensor, high_idx: torch.Tensor) -> float:
    """Fraction of tokens whose whole selected set is the same."""
    return (low_idx == high_idx).all(-1).double().mean().item()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_ultramem_bf16_selects_what_float64_selects():
    low, high = twins(lambda dtype: UltraMemLayer(transformer_config(HIDDEN, dtype=dtype), MEMORY))
    with torch.no_grad():  # a query conv that is not the identity, so it matters too
        for layer in (low, high):
            layer.query_conv.weight.copy_(torch.linspace(-0.5, 1.0, 3).expand(HIDDEN, 1, 3))
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(5))
    hidden = hidden.bfloat16()
    low_idx, low_out = selected_sets(low, low.retrieval, hidden)
    high_idx, high_out = selected_sets(high, high.retrieval, hidden.double())
    same, error = agreement(low_idx, high_idx), relative_error(low_out, high_out)
    print(f"\nUltraMem bf16 vs float64: same selection {same:.4f} of tokens, output error {error:.4f}")
    assert low_out.dtype == torch.bfloat16
    assert same >= 0.99  # measured 1.0 (0.74 when retrieval ran in bf16)
    assert error < 0.02  # measured 0.003 (0.10 when retrieval ran in bf16)


@pytest.mark.parametrize("training", [False, True])
def test_pkm_bf16_selects_what_float64_selects(training, monkeypatch):
    low, high = twins(lambda dtype: ProductKeyMemory(transformer_config(HIDDEN, dtype=dtype), PKM))
    low.train(training), high.train(training)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(5))
    hidden = hidden.bfloat16()
    low_rows, low_out = pkm_rows(low, hidden, monkeypatch)
    high_rows, high_out = pkm_rows(high, hidden.double(), monkeypatch)
    same, error = agreement(low_rows, high_rows), relative_error(low_out, high_out)
    print(f"\nPKM bf16 vs float64 (training={training}): same selection {same:.4f}, "
          f"output error {error:.4f}")
    assert same >= 0.99  # measured 1.0 (0.73 when scores ran in bf16)
    assert error < 0.02  # measured 0.002 (0.10 when scores ran in bf16)
    if training:  # the BatchNorm statistics were updated alike
        torch.testing.assert_close(low.query_bn.running_mean.double(), high.query_bn.running_mean,
                                   rtol=0.02, atol=1e-3)


def pkm_rows(module: ProductKeyMemory, hidden: torch.Tensor, monkeypatch
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run PKM on hidden; the sorted value rows it read [t, h*k] (from product_key_topk) and
    the output."""
    captured = []
    original = pkm_module.product_key_topk

    def spy(*args):
        captured.append(original(*args))
        return captured[-1]

    monkeypatch.setattr(pkm_module, "product_key_topk", spy)
    with torch.no_grad():
        out = module(hidden)[0]
    return captured[0][0].reshape(SEQ * BATCH, -1).sort(-1).values, out


def test_ultramem_v2_bf16_selects_what_float64_selects():
    """Per-rank queries, pre-values (fp32 dot products) and the shared table in bf16."""
    memory = UltraMemV2Config(num_keys=16, key_dim=64, topk=16, phase1_topk=16, value_dim=64,
                              pre_value_dim=32, memory_layers=4, share_ratio=0.5)
    low, high = twins(lambda dtype: UltraMemLayer(transformer_config(HIDDEN, dtype=dtype), memory,
                                                  layer_index=2))
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(5))
    hidden = hidden.bfloat16()
    low_idx, low_out = selected_sets(low, low.retrieval, hidden)
    high_idx, high_out = selected_sets(high, high.retrieval, hidden.double())
    assert_agrees("UltraMemV2", low_idx, high_idx, low_out, high_out)  # measured 1.0, 0.003


def test_memory_plus_bf16_selects_what_float64_selects():
    memory = MemoryPlusConfig(num_keys=32, key_dim=64, topk=16, num_heads=2)
    low, high = twins(lambda dtype: MemoryPlusLayer(transformer_config(HIDDEN, dtype=dtype),
                                                    memory))
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(5))
    hidden = hidden.bfloat16()
    with torch.no_grad():
        low_rows = low.select(hidden.view(SEQ * BATCH, HIDDEN))[0].sort(-1).values
        high_rows = high.select(hidden.double().view(SEQ * BATCH, HIDDEN))[0].sort(-1).values
        low_out, high_out = low(hidden)[0], high(hidden.double())[0]
    assert_agrees("Memory+", low_rows, high_rows, low_out, high_out)  # measured 1.0, 0.004


def assert_agrees(name: str, low_idx, high_idx, low_out, high_out) -> None:
    """bf16 output; at least 99 % of tokens select the float64 set; output error under 2 %."""
    same, error = agreement(low_idx, high_idx), relative_error(low_out, high_out)
    print(f"\n{name} bf16 vs float64: same selection {same:.4f}, output error {error:.4f}")
    assert low_out.dtype == torch.bfloat16
    assert same >= 0.99
    assert error < 0.02
