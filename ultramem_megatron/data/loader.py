"""Train/valid GPTDatasets from a DataConfig (megatron-core's builder) and resumable batches."""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from .writer import DataPrepError, idx_path, is_prepared
from .tokenizer import HFTokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def dataset_sizes(train_cfg) -> tuple[int, int]:
    """(train, valid) samples a run needs: every step's global batch, and one fixed validation
    set of eval_iters global batches (the same set at every evaluation). train_cfg: TrainConfig."""
    return (train_cfg.max_steps * train_cfg.global_batch_size,
            train_cfg.eval_iters * train_cfg.global_batch_size)


def _cache_dir(cache_dir: str, prefixes: list[str]) -> str:
    """cache_dir/<hash of the .idx files>: megatron keys its index cache on the prefix path, not
    its content, so a re-prepared prefix must not reuse the indices built for the old one."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(idx_path(prefix).read_bytes())
    return str(Path(cache_dir) / digest.hexdigest()[:16])


def build_datasets(data_cfg, tokenizer: HFTokenizer, *, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int, valid_seed: int | None = None):
    """(train, valid) datasets of the data.blend prefixes, split by document per data.split.

    data_cfg: config.DataConfig, whose prefixes must be prepared (prepare.ensure_prepared). Each is
    a GPTDataset, or a BlendedDataset mixing them by weight, with at least the requested number of
    samples; train is shuffled by `seed`, valid by `valid_seed` (default `seed`), so runs of
    different seeds can be scored on one held-out set. Sample i is a dict of [seq_length]
    tensors. valid is None when valid_samples is 0 and data.split gives it no documents. Needs
    torch.distributed initialized (megatron_compat.initialize_single_process for one process)
    and is called on all ranks; every rank builds the same datasets.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_datasets needs torch.distributed initialized (one process: "
                           "megatron_compat.initialize_single_process(seed))")
    entries = data_cfg.entries()
    prefixes = [entry.prefix for entry in entries]
    for i, prefix in enumerate(prefixes):
        if not is_prepared(prefix):
            where = (f"data.blend[{i}]" if data_cfg.corpus is None
                     else f"data.corpus {data_cfg.corpus}")
            raise DataPrepError(f"{where}: {prefix}.bin/.idx do not exist; run "
                                "scripts/prepare_data.py or prepare.ensure_prepared first")
    # one prefix: a plain GPTDataset (megatron would wrap a weighted one in a BlendedDataset)
    weights = [entry.weight for entry in entries] if len(prefixes) > 1 else None

    def build(split_seed: int, sizes: list[int]) -> list:
        config = GPTDatasetConfig(
            random_seed=split_seed, sequence_length=seq_length,
            blend=(prefixes, weights), split=data_cfg.split,
            path_to_cache=_cache_dir(data_cfg.cache_dir, prefixes), tokenizer=tokenizer,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False)
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    valid_seed = seed if valid_seed is None else valid_seed
    if valid_seed == seed:
        train, valid, _ = build(seed, [train_samples, valid_samples, 0])
    else:
        train = build(seed, [train_samples, 0, 0])[0]
        valid = build(valid_seed, [0, valid_samples, 0])[1]
    for name, dataset, wanted in (("train", train, train_samples), ("valid", valid, valid_samples)):
        if wanted and (dataset is None or len(dataset) < wanted):
            raise DataPrepError(f"data.split {data_cfg.split!r} leaves the {name} split too few "
                                f"documents for {wanted} samples of {seq_length} tokens")
    return train, valid


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}


def iterate_batches(dataset, micro_batch_size: int, consumed_samples: int = 0, *,
                    dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches in dataset order, starting after consumed_samples (summed over all ranks).

    Each step takes the next micro_batch_size * dp_size samples and this rank keeps its slice, so
    resuming at consumed_samples=K yields exactly what an uninterrupted run yields after K samples.
    Stops when fewer than a full step remain. Batch: tokens, labels, position_ids [b, s] int64;
    loss_mask [b, s] float32.
    """
    step = micro_batch_size * dp_size
    if consumed_samples % step:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of "
                         f"micro_batch_size * dp_size = {step}")
    for first in range(consumed_samples, len(dataset) - step + 1, step):
        start = first + dp_rank * micro_batch_size
        yield _collate([dataset[i] for i in range(start, start + micro_batch_size)])


def validation_batches(dataset, micro_batch_size: int, num_micro_batches: int, *,
                       dp_rank: int = 0, dp_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The fixed held-out set: the first num_micro_batches of this rank, same at every call."""
    batches = list(islice(iterate_batches(dataset, micro_batch_size, 0, dp_rank=dp_rank,
                                          dp_size=dp_size), num_micro_batches))
    if len(batches) < num_micro_batches:
        raise DataPrepError(f"the validation set has {len(dataset)} samples: too few for "
                            f"{num_micro_batches} micro-batches of {micro_batch_size} x {dp_size}")
    return batches
