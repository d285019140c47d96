"""The memory aux losses' gradients join the backward inside the model (AuxLossGradient), scaled
as if the aux losses had been added to the loss: the trainer no longer adds them, so a pipeline
stage or a recomputed block that holds a memory still gets their gradients."""

from pathlib import Path

import pytest
import torch

from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.model.capabilities import Capabilities
from ultramem_megatron.model.gpt import build_model

ROOT = Path(__file__).resolve().parents[2]


def grads_after(model, tokens, scale: float, extra_aux: float) -> dict[str, torch.Tensor]:
    """Gradients of mean(LM loss) + extra_aux * (the memory layers' aux losses, taken from the
    layers themselves with their graph) with the model's own aux-loss scale set to `scale`."""
    model.zero_grad(set_to_none=True)
    model.set_aux_loss_scale(scale)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    if extra_aux:
        loss = loss + extra_aux * sum(layer.retrieval.aux_loss() for layer in model.memory_layers())
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("key_balance", [0.0, 0.01])
def test_scaled_aux_gradient_equals_adding_the_aux_loss(key_balance):
    megatron_compat.initialize_distributed(1, seed=1234)   # what train.py runs (CPU device mode)
    run = load_config(ROOT / "configs/tiny.yaml", [
        "model.family=ultramem", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.seq_length=16", f"model.ultramem.key_balance_weight={key_balance}",
        "model.ultramem.aux_loss_weight=1.0", "model.ultramem.aux_loss_margin=0.0"])
    model = build_model(run.model, run.parallel, torch.float32, Capabilities())
    model.train()
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inside = grads_after(model, tokens, scale=0.5, extra_aux=0.0)
    added = grads_after(model, tokens, scale=0.0, extra_aux=0.5)
    without = grads_after(model, tokens, scale=0.0, extra_aux=0.0)
    cores = [n for n in inside if n.endswith("retrieval.cores")]
    assert cores and not torch.allclose(inside[cores[0]], without[cores[0]])  # the aux matters
    assert inside.keys() == added.keys()
    for name in inside:
        torch.testing.assert_close(inside[name], added[name], rtol=1e-5, atol=1e-7, msg=name)
