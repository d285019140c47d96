"""Megatron checkpoint <-> Hugging Face directory, in one process on CPU, any saved layout."""

# Both directions go through the single-process (TP = 1, no memory parallelism) model: a
# checkpoint saved at any parallel layout loads into it (dist_checkpointing reshards), and its
# plain state dict is what convert.py maps. Memory: the whole model, once in fp32, plus its copy.

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .. import megatron_compat
from ..config import ParallelConfig, RunConfig, build, validate
from ..model import build_model
from ..model.capabilities import Capabilities
from ..training.checkpoint import (load_model_weights, read_run_config, resolve_checkpoint,
                                   save_model_weights)
from .convert import from_hf, model_config_from_hf, to_hf
from .hf_dir import read_hf_dir, write_hf_dir


def single_process_model(run: RunConfig):
    """The run's model at TP = 1 with megatron's local spec, in fp32 (a world of one when no
    process group exists). A checkpoint written under the Transformer Engine spec loads into it:
    both specs save the same keys (megatron_compat.canonical_norm_keys)."""
    megatron_compat.initialize_distributed(1, run.train.seed)
    return build_model(run.model, ParallelConfig(), torch.float32, Capabilities())


def export_model(model, run: RunConfig, out: str | Path, tokenizer: Optional[str] = None,
                 dtype: str = "float32", max_shard_size: str | int = "5GB") -> Path:
    """An in-memory single-process megatron model -> HF directory `out`. tokenizer: a path or
    hub name (default: the run's data.tokenizer); "" skips the tokenizer files."""
    tokenizer = run.data.tokenizer if tokenizer is None else tokenizer
    return write_hf_dir(Path(out), run.model, to_hf(model.state_dict(), run.model),
                        tokenizer or None, dtype, max_shard_size)


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer: Optional[str] = None,
                      dtype: str = "float32", max_shard_size: str | int = "5GB") -> Path:
    """A training (or model-only) checkpoint -> HF directory. checkpoint: a step directory, a
    run directory or its checkpoints/ (the newest step). The model config comes from the
    checkpoint's run_config.yaml."""
    path = resolve_checkpoint(checkpoint)
    run = read_run_config(path)
    model = single_process_model(run)
    load_model_weights(path, model)
    return export_model(model, run, out, tokenizer, dtype, max_shard_size)


def import_hf(hf_dir: str | Path, out: str | Path, run: Optional[RunConfig] = None) -> Path:
    """An export -> a model-only megatron checkpoint `out` that train.init_from starts from.

    Its run_config.yaml has the export's model section and, unless `run` gives them, the
    export directory as tokenizer and default everything else.
    """
    hf_dir = Path(hf_dir)
    config, hf_state = read_hf_dir(hf_dir)
    model_config = model_config_from_hf(config)
    if run is None:
        run = build(RunConfig, {"data": {"tokenizer": str(hf_dir.resolve())}})
    run = replace(run, model=model_config)
    validate(run)
    model = single_process_model(run)
    template = model.state_dict()
    # from_hf fills every tensor-carrying key; only megatron's (empty) _extra_state keys remain
    model.load_state_dict(from_hf(hf_state, template, model_config), strict=False)
    out = Path(out)
    save_model_weights(out, model, run)
    return out
