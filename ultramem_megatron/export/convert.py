"""Name and shape mapping between a megatron model's state dict and the Hugging Face export's."""

# One Rule per megatron tensor: the HF tensor(s) it becomes, how to split it into them and how to
# join them back. Export applies split, import applies join on the same rules, so the two
# directions cannot drift apart. Keys are those of the single-process (TP = 1) model, which any
# checkpoint loads into whatever layout it was saved with.

import re
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig, RunConfig, build, validate

Tensor = torch.Tensor

AUTO_MAP = {
    "AutoConfig": "configuration_ultramem.UltraMemConfig",
    "AutoModel": "modeling_ultramem.UltraMemModel",
    "AutoModelForCausalLM": "modeling_ultramem.UltraMemForCausalLM",
}


class ConversionError(ValueError):
    """Tensors or a config that do not fit the model they should describe; the message says which."""


@dataclass(frozen=True)
class Rule:
    hf_keys: tuple[str, ...]
    split: Callable[[Tensor], list[Tensor]]
    join: Callable[[list[Tensor]], Tensor]


def _same(hf_key: str) -> Rule:
    return Rule((hf_key,), lambda t: [t], lambda ts: ts[0])


def _halves(first: str, second: str) -> Rule:
    """fc1 of a SwiGLU MLP [2F, D]: the first half is silu-gated (gate), the second is up."""
    return Rule((first, second), lambda t: list(t.chunk(2, dim=0)), lambda ts: torch.cat(ts, 0))


def _qkv(prefix: str, heads: int) -> Rule:
    """megatron's linear_qkv [3D, D] holds, per head, its q, k and v rows in turn."""
    def split(t: Tensor) -> list[Tensor]:
        per_head = t.view(heads, 3, -1, t.shape[-1])                  # [h, 3, d, D]
        return [per_head[:, i].reshape(-1, t.shape[-1]).clone() for i in range(3)]

    def join(ts: list[Tensor]) -> Tensor:
        return torch.stack([t.view(heads, -1, t.shape[-1]) for t in ts], 1).reshape(-1, ts[0].shape[-1])

    return Rule(tuple(f"{prefix}.{p}_proj.weight" for p in "qkv"), split, join)


def _flat_projection(hf_key: str, expansion: int) -> Rule:
    """UltraMem's projection [D, E, D_v] <-> an nn.Linear weight [D, E * D_v]."""
    return Rule((hf_key,), lambda t: [t.flatten(1)],
                lambda ts: ts[0].unflatten(1, (expansion, -1)))


def _mlp_rules(source: str, target: str, swiglu: bool) -> dict[str, Rule]:
    fc1 = (_halves(f"{target}.gate_proj.weight", f"{target}.up_proj.weight") if swiglu
           else _same(f"{target}.up_proj.weight"))
    return {f"{source}.linear_fc1.weight": fc1, f"{source}.linear_fc2.weight":
            _same(f"{target}.down_proj.weight")}


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)")


def rule_for(key: str, model: ModelConfig) -> Rule:
    """The rule of one megatron state-dict key (see the key list in docs/export.md)."""
    top = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "embedding.position_embeddings.weight": "model.embed_positions.weight",
           "output_layer.weight": "lm_head.weight",
           # the table(s) every UltraMemV2 / Memory+ memory reads, held once by the model
           "memory_tables.values": "model.memory_tables.values",
           "memory_tables.pre_values": "model.memory_tables.pre_values"}
    if key in top:
        return _same(top[key])
    if key.startswith("decoder.final_layernorm."):
        return _same("model.norm." + key.rsplit(".", 1)[1])
    match = _LAYER.fullmatch(key)
    if match is None:
        raise ConversionError(f"no export rule for megatron tensor {key!r}")
    layer, rest = int(match.group(1)), match.group(2)
    hf = f"model.layers.{layer}"
    if rest.startswith("input_layernorm."):
        return _same(f"{hf}.{rest}")
    if rest.startswith("pre_mlp_layernorm."):
        return _same(f"{hf}.post_attention_layernorm.{rest.split('.', 1)[1]}")
    if rest == "self_attention.linear_qkv.weight":
        return _qkv(f"{hf}.self_attn", model.num_attention_heads)
    if rest == "self_attention.linear_proj.weight":
        return _same(f"{hf}.self_attn.o_proj.weight")
    rest = rest.replace("mlp.ffn.", "mlp.", 1)
    if rest.startswith("mlp.memory."):
        return _memory_rule(rest[len("mlp.memory."):], layer, model)
    if rest == "mlp.router.weight":
        return _same(f"{hf}.mlp.router.weight")
    expert = _EXPERT.fullmatch(rest[len("mlp."):])
    if expert:
        number, name = expert.groups()
        return _mlp_rules("expert", f"{hf}.mlp.experts.{number}", model.swiglu)[f"expert.{name}"]
    mlp = _mlp_rules("mlp", f"{hf}.mlp", model.swiglu)
    if rest in mlp:
        return mlp[rest]
    raise ConversionError(f"no export rule for megatron tensor {key!r}")


def _memory_rule(name: str, layer: int, model: ModelConfig) -> Rule:
    starts = {start: k for k, (start, _) in enumerate(model.active_spans())}
    if layer not in starts:
        raise ConversionError(f"memory tensor in block {layer}, which starts no memory span "
                              f"(model.memory_spans={model.memory_spans!r})")
    hf = f"model.memories.{starts[layer]}"
    if model.family == "pkm":
        return _same(f"{hf}.{name}")
    if name == "values.out_proj.weight":
        return _flat_projection(f"{hf}.out_proj.weight", _projected_groups(model))
    for prefix in ("retrieval.", "values."):
        if name.startswith(prefix):
            return _same(f"{hf}.{name[len(prefix):]}")
    return _same(f"{hf}.{name}")   # query_conv.weight; Memory+'s keys, query_proj, norms


def _projected_groups(model: ModelConfig) -> int:
    """E of the [D, E, D_v] value projection: UltraMemV2 sums its groups first (one) unless
    value_projection is per_group; Memory+ has one."""
    memory = model.memory
    if model.family == "memory_plus" or (model.family == "ultramem_v2"
                                         and memory.value_projection == "single"):
        return 1
    return memory.expansion


def exported_keys(megatron_keys) -> list[str]:
    """The megatron keys that carry tensors (megatron's _extra_state entries hold none)."""
    return [key for key in megatron_keys if not key.endswith("._extra_state")]


def to_hf(state_dict: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """megatron (TP = 1) state dict -> HF state dict (contiguous tensors, safetensors-ready)."""
    out: dict[str, Tensor] = {}
    for key in exported_keys(state_dict):
        rule = rule_for(key, model)
        for hf_key, tensor in zip(rule.hf_keys, rule.split(state_dict[key])):
            out[hf_key] = tensor.detach().contiguous()
    return out


def from_hf(hf_state: dict[str, Tensor], template: dict[str, Tensor], model: ModelConfig
            ) -> dict[str, Tensor]:
    """HF state dict -> megatron state dict for the keys of `template` (a freshly built model's
    state dict). Every HF tensor must be used and every shape must match."""
    out, used = {}, set()
    for key in exported_keys(template):
        rule = rule_for(key, model)
        missing = [k for k in rule.hf_keys if k not in hf_state]
        if missing:
            raise ConversionError(f"the Hugging Face weights lack {', '.join(missing)} "
                                  f"(needed for megatron tensor {key})")
        expected = [tuple(t.shape) for t in rule.split(template[key])]
        for hf_key, shape in zip(rule.hf_keys, expected):
            if tuple(hf_state[hf_key].shape) != shape:
                raise ConversionError(f"{hf_key}: shape {tuple(hf_state[hf_key].shape)}, but the "
                                      f"model config gives {shape}")
        out[key] = rule.join([hf_state[k] for k in rule.hf_keys])
        used.update(rule.hf_keys)
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ConversionError(f"Hugging Face tensors not part of this model: {', '.join(unused[:8])}"
                              + (" ..." if len(unused) > 8 else ""))
    return out


# ------------------------------------------------------------------------------ configs

def hf_config(model: ModelConfig) -> dict:
    """The fields of configuration_ultramem.UltraMemConfig for a training model config."""
    fields = {
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "intermediate_size": model.ffn_size, "max_position_embeddings": model.seq_length,
        "normalization": model.normalization, "norm_eps": 1e-5,
        "position_embedding": model.position_embedding, "rotary_base": 10000.0,
        "hidden_act": "swiglu" if model.swiglu else "gelu", "family": model.family,
        "memory_spans": [list(span) for span in model.active_spans()],
        "ultramem": None, "ultramem_v2": None, "pkm": None, "memory_plus": None, "moe": None,
        "megatron_model_config": asdict(model),
    }
    memory, hidden = model.memory, model.hidden_size
    if model.family in ("ultramem", "ultramem_v2", "memory_plus"):
        fields[model.family] = {**asdict(memory), "value_dim": memory.resolved_value_dim(hidden)}
    if model.family == "ultramem_v2":   # memory_layers is set by model.memory from the spans
        fields["ultramem_v2"].update(pre_value_dim=memory.resolved_pre_value_dim(hidden),
                                     table_rows=memory.table_rows, window_keys=memory.window_keys,
                                     window_offsets=[memory.window_offset(layer) for layer
                                                     in range(memory.memory_layers)])
    if model.family == "pkm":
        fields["pkm"] = asdict(model.pkm)
    elif model.family == "moe":
        moe = model.moe
        fields["moe"] = {"num_experts": moe.num_experts, "topk": moe.topk,
                         "expert_intermediate_size": moe.expert_ffn_hidden_size or model.ffn_size,
                         "router_pre_softmax": moe.topk == 1}
    return fields


def model_config_from_hf(config: dict) -> ModelConfig:
    """The training model config stored in an export's config.json, checked against the
    export's own fields (an edited config.json that no longer describes the weights is refused)."""
    stored = config.get("megatron_model_config")
    if not isinstance(stored, dict):
        raise ConversionError("config.json has no megatron_model_config: only exports written by "
                              "ultramem-megatron convert back")
    try:
        run = build(RunConfig, {"model": stored, "data": {"blend": [{"prefix": "unused"}]}})
        validate(run)
    except ConfigError as err:
        raise ConversionError(f"config.json megatron_model_config: {err}") from None
    model = run.model
    expected = hf_config(model)
    changed = [name for name, value in expected.items()
               if name != "megatron_model_config" and config.get(name) != value]
    if changed:
        raise ConversionError(f"config.json fields {', '.join(changed)} disagree with its "
                              "megatron_model_config; the export was edited after it was written")
    return model
