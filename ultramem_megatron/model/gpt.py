"""The GPT model of every family: megatron-core GPTModel with skip-layer memory and its aux losses."""

from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import megatron_compat
from ..config import ModelConfig, ParallelConfig
from .capabilities import Capabilities, FusionChoice, choose_fusions
from .chunks import memory_usage
from .skip_memory import MemoryBus, SkipMemoryMLP
from .specs import decoder_block_spec, shared_tables


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
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type="p2p" if parallel.context_parallel_size > 1 else None,   # megatron-LM's
        **pipeline_fields(parallel, dtype),
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
        # Experts split over the EP group (their grads then reduce over expert-data-parallel
        # ranks only). UltraMem's value tables use the same group, flagged by our own modules.
        expert_model_parallel_size=parallel.expert_model_parallel_size if moe else 1,
        **recompute_fields(parallel),
    )


def pipeline_fields(parallel: ParallelConfig, dtype: torch.dtype) -> dict:
    """megatron's pipeline fields: the stages, the interleaved schedule's virtual stages, and the
    dtype of the activations sent between stages."""
    if parallel.pipeline_model_parallel_size == 1:
        return {}
    virtual = parallel.virtual_pipeline_model_parallel_size
    fields = {"pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
              "pipeline_dtype": dtype}
    if virtual > 1:
        # megatron-LM's interleaved default: overlapped, unbatched p2p, whose two directions use
        # two communicators at PP = 2. Batched, a stage's send to and receive from its one peer
        # share a tag and match in the wrong order (measured on gloo: wrong losses).
        fields.update(virtual_pipeline_model_parallel_size=virtual, overlap_p2p_comm=True,
                      batch_p2p_comm=False)
    return fields


def recompute_fields(parallel: ParallelConfig) -> dict:
    """megatron's activation-recompute fields for parallel.recompute_*: full recomputes whole
    blocks in groups (model/skip_memory.py: a span's ends are recomputed together, which
    config validation guarantees), selective the listed submodules of every block."""
    granularity = parallel.recompute_granularity
    if granularity == "none":
        return {}
    if granularity == "selective":
        return {"recompute_granularity": "selective",
                "recompute_modules": list(parallel.recompute_modules)}
    return {"recompute_granularity": "full", "recompute_method": parallel.recompute_method,
            "recompute_num_layers": parallel.recompute_num_layers}


class MemoryGPT(GPTModel):
    """GPTModel (one pipeline model chunk of it: the whole model by default) whose decoder may
    hold skip-layer memories; forward is GPTModel's. Every block draws its initial weights from
    a seed made of init_seed and its global index (model/specs.py), so a chunk holds the weights
    the whole model would."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, config: TransformerConfig,
                 use_transformer_engine: bool = False,
                 stage: Optional[megatron_compat.Stage] = None, init_seed: int = 0):
        stage = stage or megatron_compat.single_stage()
        self.memory_bus = MemoryBus()  # plain attribute, shared with the wrapped FFNs
        # UltraMemV2 / Memory+: one table all memory layers read, registered here once.
        chunk = (stage.vp_stage or 0) * config.pipeline_model_parallel_size + stage.pp_rank
        tables = shared_tables(model, parallel, config, (init_seed << 16) + 0xFFFF, chunk)
        spec = decoder_block_spec(model, parallel, config, self.memory_bus,
                                  use_transformer_engine, stage, init_seed, tables)
        # The embedding is drawn first, the output layer after the last block (seeded by its
        # index): the same draws on whichever stage builds them.
        torch.default_generator.manual_seed(init_seed)
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            position_embedding_type=model.position_embedding,
            share_embeddings_and_output_weights=False,
            parallel_output=True,
            pre_process=stage.pre_process,
            post_process=stage.post_process,
            **({"vp_stage": stage.vp_stage} if stage.vp_stage is not None else {}),
        )
        if tables is not None:
            self.memory_tables = tables
        if config.tensor_model_parallel_size > 1:
            self._sync_tp_replicated_memory_params()
        self._track_residual_after_spans()

    def _track_residual_after_spans(self) -> None:
        """The residual stream after each span's last block feeds its memory's usage tracker."""
        mlps = [layer.mlp for layer in self.decoder.layers if isinstance(layer.mlp, SkipMemoryMLP)]
        trackers = {mlp.starts_span: mlp.memory.usage for mlp in mlps if mlp.memory is not None}
        for layer in self.decoder.layers:
            span = getattr(layer.mlp, "ends_span", None)
            if span is not None:
                layer.register_forward_hook(partial(_record_residual, trackers[span]))

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
        self.memory_bus.pending.clear()
        return super().forward(*args, **kwargs)

    def memories(self) -> list[tuple[int, torch.nn.Module]]:
        """(span index, memory layer) for the spans of this chunk, in span order."""
        return [(layer.mlp.starts_span, layer.mlp.memory) for layer in self.decoder.layers
                if isinstance(layer.mlp, SkipMemoryMLP) and layer.mlp.memory is not None]

    def memory_layers(self) -> list:
        return [layer for _, layer in self.memories()]

    def set_aux_loss_scale(self, scale: float) -> None:
        """d(loss) / d(each memory aux loss) in the coming backwards: 1 / micro-batches per step
        in training (megatron divides the loss by it), 1 by default."""
        self.memory_bus.aux_loss_scale = scale

    @torch.no_grad()
    def memory_usage(self, groups: Sequence = ()) -> dict[str, Optional[float]]:
        """Utilisation since the last call (model/chunks.py: memory_usage). Resets the counters."""
        return memory_usage(self.memories(), groups)

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Refresh every UltraMem layer's rank-1 filter; call once per optimizer step."""
        for layer in self.memory_layers():
            layer.refresh_rank1()


def _record_residual(usage, module, inputs, output) -> None:
    """Forward hook on a span's last block: its output is the residual stream [s, b, D]."""
    usage.add_rms(2, output[0] if isinstance(output, tuple) else output)


def build_model(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                capabilities: Optional[Capabilities] = None,
                init_seed: Optional[int] = None) -> MemoryGPT:
    """The whole model, as a run builds it on this machine (or on one with the given
    capabilities): the TE spec where Transformer Engine imports, the local spec otherwise."""
    return build_model_chunks(model, parallel, dtype, capabilities, init_seed,
                              [megatron_compat.single_stage()])[0]


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig,
                       dtype: torch.dtype = torch.float32,
                       capabilities: Optional[Capabilities] = None,
                       init_seed: Optional[int] = None,
                       stages: Optional[list] = None) -> list[MemoryGPT]:
    """This rank's model chunks (one per virtual pipeline stage; megatron's parallel state
    says which), sharing one TransformerConfig as megatron's schedules expect. init_seed:
    the weights' seed (default: torch's current seed)."""
    init_seed = torch.initial_seed() if init_seed is None else init_seed
    fusions = choose_fusions(model, capabilities)
    config = transformer_config(model, parallel, dtype, fusions)
    stages = stages or megatron_compat.local_stages(parallel.virtual_pipeline_model_parallel_size)
    return [MemoryGPT(model, parallel, config, fusions.use_transformer_engine, stage, init_seed)
            for stage in stages]
