"""Write and read a Hugging Face model directory: code, config.json, safetensors shards, tokenizer."""

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from .convert import AUTO_MAP, ConversionError, hf_config

PACKAGE = Path(__file__).resolve().parent.parent
# file in the export -> its source in this package (the memory math ships verbatim)
SHIPPED_CODE = {
    "configuration_ultramem.py": PACKAGE / "export" / "hf" / "configuration_ultramem.py",
    "modeling_ultramem.py": PACKAGE / "export" / "hf" / "modeling_ultramem.py",
    "modeling_memories.py": PACKAGE / "export" / "hf" / "modeling_memories.py",
    "memory_selection.py": PACKAGE / "memory" / "selection.py",
    "memory_lookup.py": PACKAGE / "memory" / "lookup.py",
}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _configuration_class():
    """UltraMemConfig from the file that ships (so config.json is written by the loading code)."""
    spec = importlib.util.spec_from_file_location("configuration_ultramem",
                                                  SHIPPED_CODE["configuration_ultramem.py"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UltraMemConfig


def write_hf_dir(out: Path, model: ModelConfig, state: dict[str, torch.Tensor],
                 tokenizer: str | None, dtype: str = "float32",
                 max_shard_size: str | int = "5GB") -> Path:
    """state: the HF state dict (convert.to_hf). Floating tensors are cast to `dtype`; integer
    buffers (the virtual-address permutation, BatchNorm's counter) keep theirs."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf_tokenizer = _load_tokenizer(tokenizer) if tokenizer else None   # fail before writing
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / WEIGHTS_INDEX]:
        stale.unlink(missing_ok=True)
    for name, source in SHIPPED_CODE.items():
        shutil.copyfile(source, out / name)
    special = {}
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(out)
        special = {"bos_token_id": hf_tokenizer.bos_token_id,
                   "eos_token_id": hf_tokenizer.eos_token_id,
                   "pad_token_id": hf_tokenizer.pad_token_id}
    config = _configuration_class()(**hf_config(model), **special)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["UltraMemForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(out)
    _write_generation_config(out, special)
    cast = {key: tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor
            for key, tensor in state.items()}
    _write_safetensors(out, cast, max_shard_size)
    return out


def _load_tokenizer(name_or_path: str):
    """The transformers tokenizer a run trained with (a local directory or a hub name)."""
    from ..data.tokenizer import HFTokenizer, TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(name_or_path)
    except TokenizerError as err:
        raise ConversionError(str(err)) from err
    if not isinstance(tokenizer, HFTokenizer):
        raise ConversionError(f"tokenizer {name_or_path!r} is a bare sentencepiece model; export "
                              "with --tokenizer pointing to a Hugging Face tokenizer directory")
    return tokenizer.transformers_tokenizer


def _write_generation_config(out: Path, special: dict) -> None:
    from transformers import GenerationConfig

    eos = special.get("eos_token_id")
    pad = special.get("pad_token_id")
    GenerationConfig(bos_token_id=special.get("bos_token_id"), eos_token_id=eos,
                     pad_token_id=pad if pad is not None else eos).save_pretrained(out)


def _write_safetensors(out: Path, state: dict[str, torch.Tensor], max_shard_size) -> None:
    """One model.safetensors, or shards plus model.safetensors.index.json (the layout
    transformers' save_pretrained writes), split by huggingface_hub."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state[key] for key in keys}, str(out / filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_hf_dir(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor) of an export; safetensors only, never unpickled."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    if (hf_dir / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((hf_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        pickled = [name for name in PICKLED_WEIGHTS if (hf_dir / name).exists()]
        raise ConversionError(
            f"{hf_dir} has no {WEIGHTS}" + (f" (it has {', '.join(pickled)}: pickled weights are "
                                            "never loaded, convert them to safetensors first)"
                                            if pickled else ""))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ConversionError(f"{hf_dir / WEIGHTS_INDEX} names {name}, which is missing")
        state.update(load_file(str(hf_dir / name)))
    return config, state
