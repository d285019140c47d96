"""Compare a memory layer with a token-by-token float64 reference: output and every gradient."""

from typing import Callable

import torch


def assert_layer_matches(layer: torch.nn.Module, reference: Callable, tokens: int, hidden: int
                         ) -> torch.Tensor:
    """layer [s, 1, D] -> (out, aux) against reference(layer, x [t, D]) -> [t, D], built from the
    layer's own parameters: outputs within 1e-10, each parameter's gradient under a random probe
    within 1e-9. Returns the layer's aux loss."""
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    out, aux = layer(x.view(tokens, 1, hidden))
    probe = torch.randn(tokens, hidden, dtype=torch.float64)
    (out.view(tokens, hidden) * probe).sum().backward()
    got = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    want = reference(layer, x)
    torch.testing.assert_close(out.view(tokens, hidden), want, rtol=1e-10, atol=1e-10)
    (want * probe).sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(got[name], param.grad, rtol=1e-9, atol=1e-10, msg=name)
    return aux
