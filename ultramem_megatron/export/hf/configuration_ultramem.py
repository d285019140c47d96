"""Hugging Face configuration of an ultramem-megatron model, every family (dense to Memory+)."""

# Shipped inside every export (scripts/export_hf.py) next to modeling_ultramem.py; it imports
# nothing from ultramem_megatron, so an export loads wherever transformers is installed.

from transformers import PretrainedConfig

FAMILIES = ("dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus")


class UltraMemConfig(PretrainedConfig):
    """The architecture of a megatron-core GPT trained by ultramem-megatron.

    memory_spans [[i, j], ...]: memory k reads block i's pre-FFN normed input and its output is
    added to block j's FFN output (i = j: the same block's). `ultramem` / `ultramem_v2` / `pkm` /
    `memory_plus` / `moe` hold the family's settings (the training config's sections, with the
    derived widths and table sizes the model code needs); `megatron_model_config` is the whole
    training model config, kept so that an export converts back to a megatron checkpoint
    losslessly.
    """

    model_type = "ultramem_megatron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 50432, hidden_size: int = 128,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4,
                 intermediate_size: int = 512, max_position_embeddings: int = 256,
                 normalization: str = "LayerNorm", norm_eps: float = 1e-5,
                 position_embedding: str = "rope", rotary_base: float = 10000.0,
                 hidden_act: str = "gelu", family: str = "dense", memory_spans=(),
                 ultramem: dict | None = None, pkm: dict | None = None, moe: dict | None = None,
                 ultramem_v2: dict | None = None, memory_plus: dict | None = None,
                 megatron_model_config: dict | None = None, use_cache: bool = True,
                 tie_word_embeddings: bool = False,
                 **kwargs):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if hidden_act not in ("gelu", "swiglu"):
            raise ValueError(f"hidden_act must be 'gelu' or 'swiglu', got {hidden_act!r}")
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization must be 'LayerNorm' or 'RMSNorm', got {normalization!r}")
        if position_embedding not in ("rope", "learned_absolute"):
            raise ValueError("position_embedding must be 'rope' or 'learned_absolute', got "
                             f"{position_embedding!r}")
        needs = {"ultramem": ultramem, "pkm": pkm, "moe": moe, "ultramem_v2": ultramem_v2,
                 "memory_plus": memory_plus}.get(family, {})
        if needs is None:
            raise ValueError(f"family {family!r} needs its {family!r} section")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.position_embedding = position_embedding
        self.rotary_base = rotary_base
        self.hidden_act = hidden_act
        self.family = family
        self.memory_spans = [list(span) for span in memory_spans]
        self.ultramem = ultramem
        self.pkm = pkm
        self.moe = moe
        self.ultramem_v2 = ultramem_v2
        self.memory_plus = memory_plus
        self.megatron_model_config = megatron_model_config
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
