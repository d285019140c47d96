"""Run configuration: typed dataclasses, YAML files, dotted CLI overrides, validation with clear errors."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .memory.config import (MemoryConfigError, MemoryPlusConfig, PKMConfig, UltraMemConfig,
                            UltraMemV2Config)

# Families with memory layers placed by model.memory_spans, and their config sections.
MEMORY_SECTIONS = {"pkm": "pkm", "ultramem": "ultramem", "ultramem_v2": "ultramem_v2",
                   "memory_plus": "memory_plus"}


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the dotted field."""


@dataclass(frozen=True)
class MoEConfig:
    """megatron-core MoE layer in place of every block's FFN (the MoE baseline)."""

    num_experts: int = 8
    topk: int = 2
    expert_ffn_hidden_size: Optional[int] = None  # default: model.ffn_hidden_size
    aux_loss_coeff: float = 0.01
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus"] = "ultramem"
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None      # default 4 * hidden_size
    seq_length: int = 256
    vocab_size: int = 50432                    # padded vocabulary (GPT-NeoX 50277 -> 50432)
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    swiglu: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    memory_spans: str = ""                     # "i:j/i:j": block i's FFN input -> after block j
    ultramem: Optional[UltraMemConfig] = None  # ("all": i:i in every block)
    ultramem_v2: Optional[UltraMemV2Config] = None
    memory_plus: Optional[MemoryPlusConfig] = None
    pkm: Optional[PKMConfig] = None
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def active_spans(self) -> list[tuple[int, int]]:
        """The memory spans this family uses: memory_spans for pkm / ultramem, none otherwise
        (so one file can hold every family's sections and model.family picks)."""
        if self.family not in MEMORY_SECTIONS:
            return []
        return parse_spans(self.memory_spans, self.num_layers)

    @property
    def memory(self):
        """The family's memory-layer config (None for dense and MoE); UltraMemV2's with
        memory_layers set to the number of spans (its shared table has one n^2 block each)."""
        section = MEMORY_SECTIONS.get(self.family)
        memory = getattr(self, section) if section else None
        if self.family == "ultramem_v2" and memory is not None:
            memory = dataclasses.replace(memory, memory_layers=max(1, len(self.active_spans())))
        return memory

    @property
    def shares_tables(self) -> bool:
        """One value table for every memory layer (UltraMemV2, Memory+)."""
        return self.family in ("ultramem_v2", "memory_plus")


@dataclass(frozen=True)
class BlendEntry:
    """One dataset of the blend: a Megatron .bin/.idx prefix, built from `source` when missing."""

    prefix: str
    weight: float = 1.0
    source: Optional[str] = None        # JSON-lines file(s) (glob) that prepare_data turns into prefix


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str = "data/tokenizers/gpt-neox-20b"   # HF name or local path
    blend: list[BlendEntry] = field(default_factory=lambda: [
        BlendEntry(prefix="data/built/fixture", source="data/fixture/*.jsonl")])
    split: str = "95,5,0"                             # train, valid, test weights
    # Orders the validation samples, independently of train.seed: runs of any seed are scored on
    # one held-out set (null: train.seed, megatron's one-seed behaviour).
    valid_seed: Optional[int] = 1234
    cache_dir: str = "data/built/cache"               # megatron's dataset index cache
    corpus: Optional[str] = None                      # a prepare_data.py --output-dir; replaces blend
    subset_weights: dict[str, float] = field(default_factory=dict)   # corpus subset -> weight

    def entries(self) -> list[BlendEntry]:
        """What to train on: the corpus's subsets by subset_weights, or the blend."""
        if self.corpus is None:
            return list(self.blend)
        return [BlendEntry(prefix=f"{self.corpus.rstrip('/')}/{subset}", weight=weight)
                for subset, weight in self.subset_weights.items()]


@dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism takes the ranks left after TP x PP x CP (and, for UltraMem, P divides
    it; for MoE, EP does). docs/parallelism.md."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1       # PP: stages, 1F1B schedule when > 1
    virtual_pipeline_model_parallel_size: int = 1   # model chunks per stage (interleaved 1F1B)
    context_parallel_size: int = 1              # CP: ranks splitting each sequence
    expert_model_parallel_size: int = 1         # EP: ranks splitting the MoE family's experts
    # Activation recompute (megatron's): selective = the recompute_modules of every block;
    # full = whole blocks, grouped per recompute_method / recompute_num_layers.
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    memory_parallel_size: int = 1         # P: data-parallel ranks that shard each value table
    memory_parallel_mode: Literal["value_dim", "row"] = "value_dim"
    overlap_memory_comm: bool = True      # leave the last exchange in flight until the span's end
    # megatron DDP: reduce each gradient bucket asynchronously as soon as the last micro-batch's
    # backward has produced it (instead of all of them after the backward), and gather the
    # distributed optimizer's updated parameters bucket by bucket during the next forward
    # (needs use_distributed_optimizer and overlap_grad_reduce). docs/parallelism.md.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the model: TP x PP x CP."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def world_size_error(self, world_size: int) -> Optional[str]:
        """Why this layout cannot run on world_size processes (None when it can)."""
        names = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size")
        if world_size % self.model_parallel_size:
            return (f"the world size ({world_size}) must be a multiple of "
                    f"parallel.{' x '.join(names)} ({self.tensor_model_parallel_size} x "
                    f"{self.pipeline_model_parallel_size} x {self.context_parallel_size})")
        data_parallel = world_size // self.model_parallel_size
        for name in ("memory_parallel_size", "expert_model_parallel_size"):
            size = getattr(self, name)
            if data_parallel % size:
                return (f"parallel.{name} ({size}) must divide the data-parallel size "
                        f"({data_parallel} = world size {world_size} / TP x PP x CP)")
        return None


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 1234
    micro_batch_size: int = 8
    global_batch_size: int = 8
    max_steps: int = 200                  # length of the run (the LR schedule's horizon)
    exit_after_steps: int = 0             # stop this launch after N steps, with a checkpoint
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    # megatron's layer implementation: auto = Transformer Engine where it imports, else local
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 4
    save_interval: int = 100
    keep_last: int = 2
    async_save: bool = True               # checkpoint writes overlap training (forked writers)
    resume: bool = True
    init_from: Optional[str] = None       # model-only start (e.g. an HF import) when run_dir has none
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ultramem-megatron"
    threads: int = 0                                       # torch CPU threads; 0 = leave as is
    collective_timeout_s: float = 600.0   # a rank waiting longer on a peer exits (dead-rank bound)
    peak_tflops: float = 0.0              # MFU's peak per device; 0 = look the GPU up


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ------------------------------------------------------------------------------ building

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers: `memory_spans: 1:2` stays a string (1.1 reads base 60)
    and `lr: 3e-3` is a float (1.1 wants a dot)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check value against the annotation tp, converting YAML forms (int -> float, dict ->
    dataclass); raise ConfigError naming path otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        if item_type is Any:
            return value
        return [_coerce(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, item_type = typing.get_args(tp)
        return {_coerce(k, key_type, path): _coerce(v, item_type, f"{path}.{k}")
                for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass cls from a mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "top level"
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(value, hints[name], f"{path}.{name}" if path else name)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except MemoryConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def apply_override(data: dict, override: str) -> None:
    """'train.max_steps=100' -> data['train']['max_steps'] = 100 (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = parse_yaml(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    config = build(RunConfig, data)
    validate(config)
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


# Model fields that only shape training (losses, init, regularization): a run may start from
# weights trained with other values of these. Everything else must match the weights.
TRAINING_ONLY_FIELDS = {
    "dropout", "init_std", "moe.aux_loss_coeff", "moe.dispatcher",
    *(f"{section}.{name}" for section in ("ultramem", "ultramem_v2")
      for name in ("aux_loss_weight", "aux_loss_margin", "init", "value_lr_start_mult",
                   "value_lr_decay_fraction", "key_balance_weight", "kernel")),
    "memory_plus.value_lr_start_mult", "memory_plus.value_lr_decay_fraction", "memory_plus.kernel",
}


def architecture_differences(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    """'field: ours vs theirs' for each model field that changes what the weights mean."""
    def flat(model: ModelConfig) -> dict:
        items = {}
        for name, value in to_dict(model).items():
            if isinstance(value, dict):
                items.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                items[name] = value
        return items

    mine, other = flat(ours), flat(theirs)
    irrelevant = {section for section in ("moe", *MEMORY_SECTIONS.values())
                  if section != ours.family}
    if ours.position_embedding == "rope":
        irrelevant.add("seq_length")   # RoPE has no table sized by the sequence length
    return [f"model.{name}: {mine.get(name)!r} vs {other.get(name)!r}"
            for name in sorted(set(mine) | set(other))
            if name not in TRAINING_ONLY_FIELDS and name.split(".")[0] not in irrelevant
            and mine.get(name) != other.get(name)]


# ------------------------------------------------------------------------------ validation

def parse_spans(spans: str, num_layers: int) -> list[tuple[int, int]]:
    """'2:5/6:9' -> [(2, 5), (6, 9)]: 0-based blocks, i <= j, in range, non-overlapping
    ('4:4': block 4's FFN input, added after block 4). 'all': i:i in every block."""
    if not spans.strip():
        return []
    if spans.strip() == "all":
        return [(i, i) for i in range(num_layers)]
    parsed = []
    for item in spans.split("/"):
        try:
            start, end = (int(x) for x in item.split(":"))
        except ValueError:
            raise ConfigError(f"model.memory_spans: {item!r} is not 'i:j' with integers") from None
        if not 0 <= start <= end < num_layers:
            raise ConfigError(f"model.memory_spans: {item!r} needs 0 <= i <= j < num_layers "
                              f"({num_layers})")
        parsed.append((start, end))
    parsed.sort()
    for (_, end), (start, _) in zip(parsed, parsed[1:]):
        if start <= end:
            raise ConfigError(f"model.memory_spans: spans {spans!r} overlap; a block may end one "
                              "span and the next may start only after it")
    return parsed


def _validate_memory_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    from .parallel.layout import layout_error  # the sharding rule lives with the sharded module

    memory, hidden = model.memory, model.hidden_size
    rows = memory.table_rows if isinstance(memory, UltraMemV2Config) else memory.num_values
    widths = {"D_v": memory.resolved_value_dim(hidden)}
    if isinstance(memory, UltraMemV2Config) and memory.resolved_pre_value_dim(hidden):
        widths["D_p"] = memory.resolved_pre_value_dim(hidden)
    for name, width in widths.items():
        error = layout_error(parallel.memory_parallel_mode, rows, width,
                             parallel.tensor_model_parallel_size, parallel.memory_parallel_size,
                             name)
        if error:
            raise ConfigError(f"parallel.memory_parallel_mode / memory_parallel_size / "
                              f"tensor_model_parallel_size: {error}")
    if isinstance(memory, MemoryPlusConfig):
        return
    if parallel.sequence_parallel and memory.query_conv_kernel > 0:
        raise ConfigError("model.ultramem.query_conv_kernel > 0 with parallel.sequence_parallel: "
                          "the causal convolution would need the previous rank's tokens")
    if parallel.context_parallel_size > 1 and memory.query_conv_kernel > 0:
        raise ConfigError("model.ultramem.query_conv_kernel > 0 with "
                          "parallel.context_parallel_size > 1: each context rank holds two "
                          "non-adjacent chunks of every sequence, so the causal convolution "
                          "would need tokens of other ranks; set query_conv_kernel=0")


# megatron's selective recompute modules that are tested here. Not "mlp" / "moe" / "layernorm":
# they checkpoint the FFN (and its input) that hosts a memory span's ends.
RECOMPUTE_MODULES = ("core_attn",)


def _validate_pipeline_and_recompute(model: ModelConfig, parallel: ParallelConfig,
                                     train: TrainConfig) -> None:
    from .parallel.stages import span_problem

    pipeline, virtual = (parallel.pipeline_model_parallel_size,
                         parallel.virtual_pipeline_model_parallel_size)
    if model.num_layers % (pipeline * virtual):
        raise ConfigError(f"model.num_layers ({model.num_layers}) must be divisible by "
                          f"parallel.pipeline_model_parallel_size x "
                          f"virtual_pipeline_model_parallel_size ({pipeline} x {virtual})")
    if virtual > 1 and pipeline < 2:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size > 1 needs "
                          "parallel.pipeline_model_parallel_size >= 2 (interleaved 1F1B)")
    if virtual > 1 and (train.global_batch_size // train.micro_batch_size) % pipeline:
        raise ConfigError(f"the interleaved schedule needs the number of micro-batches per "
                          f"step a multiple of parallel.pipeline_model_parallel_size "
                          f"({pipeline})")
    if parallel.recompute_granularity == "full" and not (
            1 <= parallel.recompute_num_layers <= model.num_layers // (pipeline * virtual)):
        raise ConfigError(f"parallel.recompute_num_layers ({parallel.recompute_num_layers}) must "
                          f"be in [1, blocks per model chunk = "
                          f"{model.num_layers // (pipeline * virtual)}] for full recompute")
    if parallel.recompute_granularity == "selective" and not parallel.recompute_modules:
        raise ConfigError("parallel.recompute_granularity=selective needs recompute_modules")
    unknown = sorted(set(parallel.recompute_modules) - set(RECOMPUTE_MODULES))
    if unknown:
        raise ConfigError(f"parallel.recompute_modules: {unknown} are not among "
                          f"{list(RECOMPUTE_MODULES)}")
    for span in model.active_spans():
        problem = span_problem(span, model.num_layers, pipeline, virtual,
                               parallel.recompute_granularity, parallel.recompute_method,
                               parallel.recompute_num_layers)
        if problem:
            raise ConfigError(f"model.memory_spans / parallel: {problem}")


def validate(config: RunConfig) -> None:
    """Cross-field checks, run before anything is built."""
    model, train, parallel = config.model, config.train, config.parallel
    positive = {"model.num_layers": model.num_layers, "model.hidden_size": model.hidden_size,
                "model.num_attention_heads": model.num_attention_heads,
                "model.seq_length": model.seq_length, "model.vocab_size": model.vocab_size,
                "train.micro_batch_size": train.micro_batch_size,
                "train.global_batch_size": train.global_batch_size,
                "train.max_steps": train.max_steps, "train.log_interval": train.log_interval,
                "train.eval_interval": train.eval_interval, "train.eval_iters": train.eval_iters,
                "train.save_interval": train.save_interval, "train.keep_last": train.keep_last,
                "parallel.tensor_model_parallel_size": parallel.tensor_model_parallel_size,
                "parallel.memory_parallel_size": parallel.memory_parallel_size,
                "parallel.pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
                "parallel.virtual_pipeline_model_parallel_size":
                    parallel.virtual_pipeline_model_parallel_size,
                "parallel.context_parallel_size": parallel.context_parallel_size,
                "parallel.expert_model_parallel_size": parallel.expert_model_parallel_size,
                "parallel.recompute_num_layers": parallel.recompute_num_layers}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"model.hidden_size ({model.hidden_size}) must be divisible by "
                          f"model.num_attention_heads ({model.num_attention_heads})")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {model.dropout}")
    if train.global_batch_size % train.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be a "
                          f"multiple of train.micro_batch_size ({train.micro_batch_size})")
    if not train.collective_timeout_s > 0:
        raise ConfigError(f"train.collective_timeout_s must be positive, got "
                          f"{train.collective_timeout_s}")
    if train.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops must be >= 0 (0 = look up), got {train.peak_tflops}")
    if train.exit_after_steps < 0:
        raise ConfigError(f"train.exit_after_steps must be >= 0, got {train.exit_after_steps}")
    if not 0.0 <= train.warmup_fraction < 1.0:
        raise ConfigError("train.warmup_fraction must be in [0, 1)")
    spans = parse_spans(model.memory_spans, model.num_layers)  # validated whatever the family
    needs = MEMORY_SECTIONS.get(model.family)
    if needs and getattr(model, needs) is None:
        raise ConfigError(f"model.family is {model.family!r} but the model.{needs} section is missing")
    if needs and not spans:
        raise ConfigError(f"model.family {model.family!r} needs model.memory_spans, e.g. '1:2' "
                          f"('all' puts a memory in every block)")
    try:
        model.memory   # UltraMemV2's checks that need the number of memory layers
    except MemoryConfigError as err:
        raise ConfigError(f"model.{needs}: {err}") from None
    if model.shares_tables and parallel.pipeline_model_parallel_size > 1 and \
            parallel.overlap_grad_reduce:
        raise ConfigError(f"parallel.overlap_grad_reduce with pipeline parallelism and "
                          f"model.family {model.family!r}: every stage holds a copy of the shared "
                          f"value table, whose gradients are summed over the stages before the "
                          f"data-parallel reduction, so that reduction cannot start early")
    if (model.shares_tables and parallel.recompute_granularity == "full"
            and parallel.overlap_grad_reduce):
        raise ConfigError(f"parallel.recompute_granularity=full with overlap_grad_reduce and "
                          f"model.family {model.family!r}: each recomputed block would hand "
                          f"megatron's gradient hook the shared value table again")
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs parallel.use_distributed_optimizer "
                          "(only the distributed optimizer gathers parameters after its step)")
    if parallel.overlap_param_gather and not parallel.overlap_grad_reduce:
        raise ConfigError("parallel.overlap_param_gather needs parallel.overlap_grad_reduce "
                          "(megatron overlaps the parameter gather only together with the "
                          "gradient reduce-scatter, as megatron-LM's arguments require)")
    _validate_pipeline_and_recompute(model, parallel, train)
    spans = model.active_spans()
    if model.family in ("ultramem", "ultramem_v2", "memory_plus"):
        _validate_memory_parallel(model, parallel)
    elif parallel.memory_parallel_size > 1:
        raise ConfigError(f"parallel.memory_parallel_size > 1 shards UltraMem, UltraMemV2 and "
                          f"Memory+ value tables; model.family is {model.family!r}")
    if parallel.expert_model_parallel_size > 1 and model.family != "moe":
        raise ConfigError(f"parallel.expert_model_parallel_size > 1 splits the MoE family's "
                          f"experts; model.family is {model.family!r} (UltraMem shards its "
                          f"values with parallel.memory_parallel_size)")
    context = parallel.context_parallel_size
    if context > 1 and model.seq_length % (2 * context):
        raise ConfigError(f"model.seq_length ({model.seq_length}) must be divisible by 2 x "
                          f"parallel.context_parallel_size ({2 * context}): megatron gives each "
                          f"context rank two chunks of every sequence (causal load balance)")
    if context > 1 and model.family == "pkm":
        raise ConfigError("parallel.context_parallel_size > 1 is not supported with the pkm "
                          "family: its BatchNorm query needs every token of the sequence")
    if model.family == "pkm" and parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel is not supported with the pkm family: its "
                          "BatchNorm query needs every token of the sequence")
    if model.family == "moe" and not 1 <= model.moe.topk <= model.moe.num_experts:
        raise ConfigError("model.moe.topk must be in [1, model.moe.num_experts]")
    if len(config.data.split.split(",")) != 3:
        raise ConfigError(f"data.split must be 'train,valid,test' weights, got {config.data.split!r}")
    data = config.data
    if data.corpus is not None and data.blend:
        raise ConfigError("data.corpus and data.blend are both set: train on one (data.blend=[] "
                          "to use the corpus, data.corpus=null to use the blend)")
    if data.corpus is not None and not data.subset_weights:
        raise ConfigError("data.corpus needs data.subset_weights, e.g. {books: 1.0, docs: 1.0}")
    for subset, weight in data.subset_weights.items():
        if not weight > 0:
            raise ConfigError(f"data.subset_weights.{subset} must be positive, got {weight}")
    if data.corpus is None and not data.blend:
        raise ConfigError("data.blend is empty: list at least one {prefix, weight, source}, "
                          "or set data.corpus and data.subset_weights")
    for i, entry in enumerate(config.data.blend):
        if entry.weight <= 0:
            raise ConfigError(f"data.blend[{i}].weight must be positive, got {entry.weight}")
