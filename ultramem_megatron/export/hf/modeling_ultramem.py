"""Hugging Face modeling code of an ultramem-megatron model: pure PyTorch, KV cache, every family."""

# Shipped inside every export next to configuration_ultramem.py, memory_selection.py and
# memory_lookup.py (the last two are the training code's own files, copied verbatim), so the
# memory layers select and pool exactly as in training. Mirrors megatron-core's local GPT spec:
# pre-norm blocks, fused-free attention with rotate-half RoPE, no biases, untied output layer.
#
# Axis legend
#   b  batch        s  new positions        p  key positions (cached + new)
#   D  hidden       h  attention heads      d  head width
#   t  tokens (b*s) k  items read per token e  expansion groups      c  Tucker cores

import dataclasses
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ultramem import UltraMemConfig
from .memory_lookup import lookup_pool
from .memory_selection import (batch_normed, product_key_scores, product_key_topk,
                               tucker_key_scores, tucker_keys, tucker_query, two_phase_topk,
                               upcast)

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


class UltraMemMemory(nn.Module):
    """TDQKR retrieval, multi-core scoring, implicit value expansion: [b, s, D] -> [b, s, D]."""

    def __init__(self, config: UltraMemConfig):
        super().__init__()
        mem, width = config.ultramem, config.hidden_size
        heads, rank, key_dim = mem["num_heads"], mem["tucker_rank"], mem["key_dim"]
        keys_per_axis = math.isqrt(mem["expansion"]) * mem["num_keys"]
        self.num_values, self.expansion = mem["num_keys"] ** 2, mem["expansion"]
        self.width = mem["phase1_topk"] or mem["topk"]
        self.topk, self.kernel = mem["topk"], mem["query_conv_kernel"]
        value_dim = mem["value_dim"]
        if self.kernel > 0:
            self.query_conv = nn.Conv1d(width, width, self.kernel, groups=width, bias=False)
        self.query_proj = nn.Linear(width, 2 * key_dim, bias=False)
        norm = (lambda: nn.LayerNorm(key_dim)) if mem["qk_norm"] == "layernorm" else \
            (lambda: nn.RMSNorm(key_dim, eps=1e-6))
        self.query_norm, self.key_norm = norm(), norm()
        self.query_bn = (nn.BatchNorm1d(2 * key_dim, affine=False)
                         if mem.get("query_batchnorm", False) else None)
        self.keys = nn.Parameter(torch.empty(heads, 2, keys_per_axis, key_dim, rank))
        self.cores = nn.Parameter(torch.empty(mem["num_cores"], heads, rank, rank))
        self.register_buffer("rank1_row", torch.zeros(heads, rank))
        self.register_buffer("rank1_col", torch.zeros(heads, rank))
        self.values = nn.Parameter(torch.empty(self.num_values, value_dim))
        self.register_buffer("virtual_to_slot",
                             torch.zeros(self.expansion * self.num_values, dtype=torch.int32))
        self.out_proj = nn.Linear(self.expansion * value_dim, width, bias=False)

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor]) -> torch.Tensor:
        """x [b, s, D]; history [b, <kernel, D]: earlier inputs, for the causal query conv.
        The query side (conv, projection, norms, scores, top-k) runs in fp32 whatever the
        weights' dtype, as in training, so a bf16 export selects what training selects."""
        batch, seq, width = x.shape
        query_in = x
        if self.kernel > 0:
            past = x.new_zeros(batch, self.kernel - 1, width)
            if history is not None and history.shape[1]:
                past = torch.cat((past, history), dim=1)[:, -(self.kernel - 1):]
            window = upcast(torch.cat((past, x), dim=1).transpose(1, 2))           # [b, D, s+K-1]
            query_in = F.conv1d(window, self.query_conv.weight.to(window.dtype),
                                groups=width).transpose(1, 2)
        tokens = query_in.reshape(batch * seq, width)
        centring = partial(batch_normed, self.query_bn) if self.query_bn is not None else None
        query = tucker_query(tokens, self.query_proj.weight, self.query_norm, centring)  # [t, 2, k]
        s_row, s_col = tucker_key_scores(query, tucker_keys(self.keys, self.key_norm))
        virtual_idx, scores = two_phase_topk(s_row, s_col, self.cores, self.rank1_row,
                                             self.rank1_col, self.width, self.topk)
        slot = self.virtual_to_slot[virtual_idx.view(batch * seq, -1)].long()        # [t, k]
        pooled = lookup_pool(self.values, slot % self.num_values, slot // self.num_values,
                             scores.reshape(batch * seq, -1, self.cores.shape[0]),
                             self.expansion)                          # [t, e, w], values' dtype
        return self.out_proj(pooled.flatten(1)).view(batch, seq, -1)


class ProductKeyMemory(nn.Module):
    """PKM (Lample et al. 2019): BatchNorm query, product-key top-k, softmax-weighted values."""

    def __init__(self, config: UltraMemConfig):
        super().__init__()
        pkm, width = config.pkm, config.hidden_size
        self.heads, self.topk, self.half = pkm["num_heads"], pkm["topk"], pkm["key_dim"] // 2
        self.query_proj = nn.Linear(width, pkm["num_heads"] * pkm["key_dim"], bias=False)
        self.query_bn = (nn.BatchNorm1d(pkm["num_heads"] * pkm["key_dim"])
                         if pkm["query_batchnorm"] else nn.Identity())
        self.keys = nn.Parameter(torch.empty(pkm["num_heads"], 2, pkm["num_keys"], self.half))
        self.values = nn.Parameter(torch.empty(pkm["num_keys"] ** 2, width))

    def forward(self, x: torch.Tensor, history: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq, width = x.shape
        flat = upcast(x.reshape(batch * seq, width))                              # fp32 query
        query = batch_normed(self.query_bn, F.linear(flat, self.query_proj.weight.to(flat.dtype)))
        s_first, s_second = product_key_scores(query.view(batch * seq, self.heads, 2, self.half),
                                               self.keys)
        rows, scores = product_key_topk(s_first, s_second, self.topk)             # [t, h, k]
        weights = F.softmax(scores, dim=-1).to(self.values.dtype)
        out = F.embedding_bag(rows.view(batch * seq, -1), self.values, mode="sum",
                              per_sample_weights=weights.view(batch * seq, -1))
        return out.view(batch, seq, width)


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
                memory_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block output [b, s, D], the FFN's normed input [b, s, D], which a memory may read)."""
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        ffn_input = self.post_attention_layernorm(x)
        out = self.mlp(ffn_input)
        if memory_out is not None:
            out = out + memory_out
        return x + out, ffn_input


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
        memory = {"ultramem": UltraMemMemory, "pkm": ProductKeyMemory}.get(config.family)
        spans = config.memory_spans if memory is not None else []
        self.memories = nn.ModuleList(memory(config) for _ in spans)
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
        for index, layer in enumerate(self.layers):
            end = self.span_ends.get(index)
            x, ffn_input = layer(x, rotary, mask, cache,
                                 pending.pop(end) if end is not None else None)
            start = self.span_starts.get(index)
            if start is not None:
                history = self._memory_history(cache, start, ffn_input)
                pending[start] = self.memories[start](ffn_input, history)
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
