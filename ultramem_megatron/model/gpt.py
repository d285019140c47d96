"""The GPT model of every family: megatron-core GPTModel with skip-layer memory and its aux losses."""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from ..memory import ProductKeyMemory, UltraMemLayer
from .capabilities import Capabilities, FusionChoice, choose_fusions
from .skip_memory import MemoryBus
from .specs import decoder_block_spec


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       dtype: torch.dtype = torch.float32,
                       fusions: Optional[FusionChoice] = None) -> TransformerConfig:
    """megatron TransformerConfig for a model config. Fusions are what this machine's kernels
    allow (model/capabilities.py; none on CPU); biases are off for every family (MoE needs it,
    and the comparison stays fair)."""
    fusions = fusions if fusions is not None else choose_fusions(model)
    moe = model.moe if model.family == "moe" else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_size,
        normalization=model.normalization,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=True,   # the same weights whatever the parallel layout
        **fusions.config_fields(),
        num_moe_experts=moe.num_experts if moe else None,
        moe_router_topk=moe.topk if moe else 2,
        moe_ffn_hidden_size=(moe.expert_ffn_hidden_size or model.ffn_size) if moe else None,
        moe_aux_loss_coeff=moe.aux_loss_coeff if moe else 0.0,
        moe_router_load_balancing_type="aux_loss" if moe else "none",
        moe_token_dispatcher_type=moe.dispatcher if moe else "allgather",
        moe_router_pre_softmax=bool(moe) and moe.topk == 1,   # megatron requires it for top-1
        moe_router_dtype="fp32" if moe else None,             # routing in fp32 under bf16
    )


class MemoryGPT(GPTModel):
    """GPTModel whose decoder may hold skip-layer memories; forward is GPTModel's."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                 use_transformer_engine: bool = False):
        self.memory_bus = MemoryBus()  # plain attribute, shared with the wrapped FFNs
        super().__init__(
            config=config,
            transformer_layer_spec=decoder_block_spec(model, parallel, config, self.memory_bus,
                                                      use_transformer_engine),
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            position_embedding_type=model.position_embedding,
            share_embeddings_and_output_weights=False,
            parallel_output=True,
        )
        if config.tensor_model_parallel_size > 1:
            self._sync_tp_replicated_memory_params()

    def _sync_tp_replicated_memory_params(self) -> None:
        """Memory parameters every TP rank holds whole (retrieval, PKM; not the TP-split value
        shards and projection, not those sequence parallelism already sums) get their gradients
        averaged over TP, so every TP rank keeps selecting the same value rows."""
        for layer in self.memory_layers():
            for param in layer.parameters():
                if not (getattr(param, "tensor_model_parallel", False)
                        or getattr(param, "sequence_parallel", False)):
                    megatron_compat.average_grads_over_tp(param)

    def forward(self, *args, **kwargs):
        self.memory_bus.reset()
        return super().forward(*args, **kwargs)

    def memory_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, (UltraMemLayer, ProductKeyMemory))]

    def memory_aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the memory layers' aux losses from the last forward (None without memory)."""
        return self.memory_bus.aux_loss()

    @torch.no_grad()
    def rows_hit_fraction(self, group=None) -> Optional[float]:
        """Fraction of value rows read since the last call, over all memory layers (the union over
        the ranks of `group`, e.g. data-parallel); resets the counters. None without memory."""
        layers = self.memory_layers()
        if not layers:
            return None
        masks = torch.cat([layer.rows_hit().to(torch.uint8) for layer in layers])
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(masks, op=torch.distributed.ReduceOp.MAX, group=group)
        for layer in layers:
            layer.reset_rows_hit()
        return masks.float().mean().item()

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Refresh every UltraMem layer's rank-1 filter; call once per optimizer step."""
        for layer in self.memory_layers():
            layer.refresh_rank1()


def build_model(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                capabilities: Optional[Capabilities] = None) -> MemoryGPT:
    """The model a run builds on this machine (or on one with the given capabilities): the TE
    spec where Transformer Engine imports, the local spec otherwise."""
    fusions = choose_fusions(model, capabilities)
    return MemoryGPT(model, parallel, transformer_config(model, parallel, dtype, fusions),
                     fusions.use_transformer_engine)
