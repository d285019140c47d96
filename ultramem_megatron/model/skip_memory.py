"""Skip-layer memory: block i's pre-FFN normed input feeds memory k, whose output joins block j."""

# A transformer layer calls its MLP with the pre-FFN normed hidden state and adds the MLP output
# to the residual stream (megatron's bias-dropout-add). SkipMemoryMLP wraps a layer's FFN (dense
# MLP or MoE): in block i it also runs memory k on that same input and parks the result; in block
# j it adds the parked result to the FFN output, so it reaches the residual stream at the end of
# block j. The memory starts in block i and finishes in block j (UltraMemLayer.start), so a sharded
# value table's communication is in flight while blocks i+1..j compute.

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat


class AuxLossGradient(torch.autograd.Function):
    """Identity on a block's output whose backward also starts the backward of a memory aux loss
    with d(training loss) / d(aux loss) = scale, as if the aux loss had been added to the loss
    (megatron's MoEAuxLossAutoScaler pattern). The aux loss's gradient thus follows the block
    wherever its backward runs: on any pipeline stage, and in a full recompute's re-run of it
    (the first, graph-free run of a recomputed block has no backward to start)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.scale = aux_loss.shape, aux_loss.dtype, scale
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class MemoryBus:
    """Per-forward hand-off between a span's first and last block, plus the aux losses' values.

    A span lies inside one forward of one model chunk (config validation: inside a pipeline
    stage and a full-recompute group), so nothing in `pending` outlives the forward; several
    micro-batches in flight never share an entry. aux_losses collects the aux losses' values of
    the training forwards since the last take_aux_loss (once per forward, also under full
    recompute: counted like the usage statistics). aux_loss_scale is what each aux loss's
    gradient is scaled by (1 / micro-batches per step in training, as megatron scales the main
    loss)."""

    def __init__(self) -> None:
        # span -> (the memory's finishing call, its usage tracker)
        self.pending: dict[int, tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], Any]] = {}
        self.aux_losses: list[torch.Tensor] = []   # detached values, for logging
        self.aux_loss_scale = 1.0

    def take_aux_loss(self) -> Optional[torch.Tensor]:
        """The summed aux losses of the training forwards since the last call (None if none)."""
        total = torch.stack(self.aux_losses).sum() if self.aux_losses else None
        self.aux_losses.clear()
        return total


@dataclass
class SkipMemorySubmodules:
    ffn: ModuleSpec                      # the block's own FFN: megatron MLP or MoELayer
    memory: Optional[ModuleSpec] = None  # UltraMemLayer / ProductKeyMemory, in a span's first block


class SkipMemoryMLP(MegatronModule):
    """FFN of one block, plus the start or the end of a memory span."""

    def __init__(self, config: TransformerConfig, submodules: SkipMemorySubmodules, bus: MemoryBus,
                 starts_span: Optional[int] = None, ends_span: Optional[int] = None,
                 pg_collection=None, is_mtp_layer: bool = False, name: Optional[str] = None):
        # pg_collection / is_mtp_layer / name: what TransformerLayer passes its mlp on
        # megatron-core >= 0.18 (0.16/0.17 pass only config); handed on to the wrapped FFN.
        super().__init__(config)
        self.ffn = megatron_compat.build_ffn(submodules.ffn, config, pg_collection=pg_collection,
                                             is_mtp_layer=is_mtp_layer,
                                             name=f"{name}.ffn" if name is not None else None)
        self.memory = build_module(submodules.memory, config=config) if submodules.memory else None
        self.bus = bus
        self.starts_span, self.ends_span = starts_span, ends_span

    def set_layer_number(self, layer_number: int) -> None:
        """TransformerLayer numbers its mlp when it can; pass it on (MoE logs per layer)."""
        if hasattr(self.ffn, "set_layer_number"):
            self.ffn.set_layer_number(layer_number)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """The FFN under the checkpoint keys it has without the wrapper ('mlp.linear_fc1...'),
        the memory under 'mlp.memory.'."""
        sharded = self.ffn.sharded_state_dict(f"{prefix}ffn.", sharded_offsets, metadata)
        megatron_compat.rename_sharded_keys(sharded, f"{prefix}ffn.", prefix)
        if self.memory is not None:
            sharded.update(self.memory.sharded_state_dict(f"{prefix}memory.", sharded_offsets,
                                                          metadata))
        return sharded

    def forward(self, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden [s, b, D] (pre-FFN normed) -> (FFN output [+ memory output], bias)."""
        out, bias = self.ffn(hidden, **kwargs)
        if self.memory is not None:
            self.bus.pending[self.starts_span] = (self.memory.start(hidden), self.memory.usage)
        if self.ends_span is not None:
            finish, usage = self.bus.pending.pop(self.ends_span)
            memory_out, aux_loss = finish()
            if self.training and torch.is_grad_enabled():   # once per forward (see MemoryBus)
                self.bus.aux_losses.append(aux_loss.detach())
            usage.add_rms(0, memory_out)
            usage.add_rms(1, out)
            out = out + memory_out
            if torch.is_grad_enabled() and aux_loss.requires_grad:
                out = AuxLossGradient.apply(out, aux_loss, self.bus.aux_loss_scale)
        return out, bias
