"""Hugging Face modeling code of an ultramem-megatron model: pure PyTorch, KV cache, every family."""

# Shipped inside every export next to configuration_ultramem.py, modeling_memories.py (the memory
# layers), memory_selection.py and memory_lookup.py (the last two are the training code's own
# files, copied verbatim), so the memory layers select and pool exactly as in training. Mirrors
# megatron-core's local GPT spec: pre-norm blocks, fused-free attention with rotate-half RoPE, no
# biases, untied output layer.
#
# Axis legend
#   b  batch        s  new positions        p  key positions (cached + new)
#   D  hidden       h  attention heads      d  head width
#   t  tokens (b*s)

import dataclasses
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ultramem import UltraMemConfig
from .modeling_memories import MEMORIES, shared_tables

# transformers 5.2x calls the KV cache `cache`; earlier releases call it `past_key_values`.
CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
               else "past_key_values")


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    return nn.LayerNorm(width, eps=eps) if kind == "LayerNorm" else nn.RMSNorm(width, eps=eps)


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [b, s] -> cos, sin [b, 1, s, d] (megatron's rotary embedding, fp32 angles)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=positions.device) / dim))
    angles = positions.float().unsqueeze(-1) * inv_freq   # [b, s, d/2]
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention; q, k, v [b, h, s, d] with RoPE on q and k."""

    def __init__(self, config: UltraMemConfig, layer_idx: int):
        super().__init__()
        width = config.hidden_size
        self.heads, self.head_dim, self.layer_idx = (config.num_attention_heads,
                                                     width // config.num_attention_heads, layer_idx)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]],
                mask: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        """x [b, s, D]; mask [b, 1, s, p] additive -> [b, s, D]."""
        batch, seq, width = x.shape
        q, k, v = (proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rotary is not None:
            cos, sin = rotary
            q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
            k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)   # [b, h, p, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """megatron's MLP: fc1 -> gelu, or SwiGLU (silu(gate) * up) -> fc2."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False) if act == "swiglu" else None
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., D] -> [..., D]; scale [..., 1] (an MoE routing weight) multiplies the
        activation before fc2, where megatron's experts apply it."""
        up = self.up_proj(x)
        hidden = F.silu(self.gate_proj(x)) * up if self.gate_proj is not None else F.gelu(up)
        return self.down_proj(hidden if scale is None else hidden * scale)


class MoE(nn.Module):
    """megatron-core MoE: fp32 router logits, top-k then softmax (softmax then top-1 for k = 1)."""

    def __init__(self, config: UltraMemConfig):
        super().__init__()
        moe = config.moe
        self.topk, self.pre_softmax = moe["topk"], moe["router_pre_softmax"]
        self.router = nn.Linear(config.hidden_size, moe["num_experts"], bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, moe["expert_intermediate_size"], config.hidden_act)
            for _ in range(moe["num_experts"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                                       # [t, D]
        logits = F.linear(flat.float(), self.router.weight.float())             # [t, E]
        if self.pre_softmax:
            probs, expert = logits.softmax(-1).topk(self.topk, dim=-1)
        else:
            top, expert = logits.topk(self.topk, dim=-1)
            probs = top.softmax(-1)
        probs = probs.to(x.dtype)                                               # [t, topk]
        out = torch.zeros_like(flat)
        for index, mlp in enumerate(self.experts):
            token, slot = (expert == index).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, mlp(flat[token], probs[token, slot].unsqueeze(-1)))
        return out.view_as(x)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.)) [+ a memory output ending here]."""

    def __init__(self, config: UltraMemConfig, layer_idx: int):
        super().__init__()
        width, kind, eps = config.hidden_size, config.normalization, config.norm_eps
        self.input_layernorm = make_norm(kind, width, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(kind, width, eps)
        self.mlp = (MoE(config) if config.family == "moe"
                    else MLP(width, config.intermediate_size, config.hidden_act))

    def forward(self, x: torch.Tensor, rotary, mask: torch.Tensor, cache: Optional[Cache],
                memories: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> torch.Tensor:
        """-> block output [b, s, D]. memories: the FFN's normed input [b, s, D] -> the output
        of a memory span ending here (None if none), after starting the one that starts here
        (a span i:i does both)."""
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        ffn_input = self.post_attention_layernorm(x)
        out = self.mlp(ffn_input)
        memory_out = memories(ffn_input)
        if memory_out is not None:
            out = out + memory_out
        return x + out


class UltraMemPreTrainedModel(PreTrainedModel):
    config_class = UltraMemConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only for a model built from a config rather than loaded: small normal weights."""
        for name, param in module.named_parameters(recurse=False):
            if name == "cores":
                param.uniform_(0.0, 1.0)
            elif param.dim() > 1:
                param.normal_(0.0, 0.02)
            elif "norm" in type(module).__name__.lower() or isinstance(module, nn.BatchNorm1d):
                param.fill_(1.0 if name == "weight" else 0.0)


class UltraMemModel(UltraMemPreTrainedModel):
    """Embeddings, decoder blocks with skip-layer memories, final norm: tokens -> hidden states."""

    def __init__(self, config: UltraMemConfig):
        super().__init__(config)
        width = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, width)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, width)
                                if config.position_embedding == "learned_absolute" else None)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        memory = MEMORIES.get(config.family)
        spans = config.memory_spans if memory is not None else []
        self.memories = nn.ModuleList(memory(config, k) for k in range(len(spans)))
        # UltraMemV2 / Memory+: the one table every memory reads (None for the other families)
        self.memory_tables = shared_tables(config.family, getattr(config, config.family, None))
        self.span_starts = {start: k for k, (start, _) in enumerate(spans)}
        self.span_ends = {end: k for k, (_, end) in enumerate(spans)}
        self.norm = make_norm(config.normalization, width, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _memory_history(self, cache: Optional[Cache], k: int, x: torch.Tensor
                        ) -> Optional[torch.Tensor]:
        """Memory k's earlier inputs [b, <=p, D] from the cache, then x [b, s, D] appended.
        Kept as extra cache layers after the attention layers, so beam search reorders them."""
        memory = self.memories[k]
        if cache is None or getattr(memory, "kernel", 0) == 0:
            return None
        index = self.config.num_hidden_layers + k
        while len(cache.layers) <= index:
            cache.layers.append(DynamicLayer())
        layer = cache.layers[index]
        past = layer.keys[:, 0] if layer.is_initialized else None
        layer.update(x.unsqueeze(1), x[..., :0].unsqueeze(1))
        return past

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                past_key_values: Optional[Cache] = None, **kwargs) -> BaseModelOutputWithPast:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [b, s, D]
        batch, seq, _ = x.shape
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=x.device).expand(batch, -1)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        rotary = (rotary_cos_sin(position_ids, self.config.hidden_size //
                                 self.config.num_attention_heads, self.config.rotary_base)
                  if self.embed_positions is None else None)
        mask = self._causal_mask(attention_mask, batch, seq, past, x)
        pending: dict[int, torch.Tensor] = {}

        def memories(index: int, ffn_input: torch.Tensor) -> Optional[torch.Tensor]:
            start, end = self.span_starts.get(index), self.span_ends.get(index)
            if start is not None:
                history = self._memory_history(cache, start, ffn_input)
                pending[start] = self.memories[start](ffn_input, history, self.memory_tables)
            return pending.pop(end) if end is not None else None

        for index, layer in enumerate(self.layers):
            x = layer(x, rotary, mask, cache, partial(memories, index))
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_FIELD: cache})

    @staticmethod
    def _causal_mask(attention_mask: Optional[torch.Tensor], batch: int, seq: int, past: int,
                     x: torch.Tensor) -> torch.Tensor:
        """Additive mask [b, 1, s, p]: causal, and padding where attention_mask [b, p] is 0. A
        large negative number rather than -inf, so an all-padding row gives no NaN."""
        key_pos = torch.arange(past + seq, device=x.device)
        query_pos = torch.arange(past, past + seq, device=x.device)
        allowed = (key_pos[None, :] <= query_pos[:, None]).expand(batch, -1, -1)   # [b, s, p]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, -(past + seq):].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        return mask.masked_fill(~allowed, torch.finfo(x.dtype).min).unsqueeze(1)


class UltraMemForCausalLM(UltraMemPreTrainedModel, GenerationMixin):
    """UltraMemModel + untied output layer; loss = next-token cross-entropy when labels are given."""

    def __init__(self, config: UltraMemConfig):
        super().__init__(config)
        self.model = UltraMemModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, past_key_values: Optional[Cache] = None,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
