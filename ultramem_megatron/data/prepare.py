"""JSON-lines text -> one Megatron .bin/.idx prefix, written atomically; fill in a blend's gaps."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from .tokenizer import HFTokenizer

SKIP_REASONS = ("blank_line", "malformed_json", "not_an_object", "missing_text",
                "non_string_text", "empty_text")
BATCH_DOCUMENTS = 512   # documents tokenized per call (the fast tokenizers run a batch in parallel)


class DataPrepError(ValueError):
    """Data that cannot be prepared; the message names the file, prefix or blend entry."""


@dataclass
class PrepareStats:
    """What prepare_jsonl wrote and what it skipped (reason -> count, see SKIP_REASONS)."""

    prefix: str
    files: list[str]
    documents: int = 0
    tokens: int = 0                                   # including one eod per document
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.prefix}: {self.documents} documents, {self.tokens} tokens from "
                f"{len(self.files)} file(s); skipped: {skipped}")


def bin_path(prefix: str) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str) -> Path:
    return Path(f"{prefix}.idx")


def meta_path(prefix: str) -> Path:
    return Path(f"{prefix}.meta.json")


def is_prepared(prefix: str) -> bool:
    """Both files exist. The .idx is always renamed into place last, so this means complete."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def expand_sources(sources: str | Sequence[str]) -> list[Path]:
    """Files matching each glob pattern, sorted per pattern; DataPrepError if one matches none."""
    patterns = [sources] if isinstance(sources, str) else list(sources)
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise DataPrepError(f"no JSON-lines file matches {pattern!r}")
        files += [Path(m) for m in matched if Path(m).is_file()]
    return files


def _skip_reason(line: str, text_key: str) -> tuple[str | None, str | None]:
    """(None, text) for a usable document, else (reason, None)."""
    if not line.strip():
        return "blank_line", None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json", None
    if not isinstance(record, dict):
        return "not_an_object", None
    if text_key not in record:
        return "missing_text", None
    text = record[text_key]
    if not isinstance(text, str):
        return "non_string_text", None
    if not text.strip():
        return "empty_text", None
    return None, text


def iter_documents(files: Iterable[Path], skipped: dict[str, int],
                   text_key: str = "text") -> Iterator[str]:
    """The text of each usable JSON line; unusable lines are counted in skipped by reason."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                reason, text = _skip_reason(line, text_key)
                if reason is None:
                    yield text
                else:
                    skipped[reason] = skipped.get(reason, 0) + 1


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch


def prepare_jsonl(sources: str | Sequence[str], prefix: str, tokenizer: HFTokenizer,
                  text_key: str = "text") -> PrepareStats:
    """Tokenize every document of the JSON-lines file(s) into prefix.bin/.idx (+ .meta.json).

    One document per line, its text under text_key; tokenizer.eod is appended to each. Token dtype:
    uint16 when the vocab fits, else int32. Files are written under a temporary name and renamed,
    the .idx last, so an interrupted run never leaves a prefix that looks complete.
    """
    files = expand_sources(sources)
    stats = PrepareStats(prefix=str(prefix), files=[str(f) for f in files])
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(str(bin_path(tmp)),
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    try:
        for texts in _batches(iter_documents(files, stats.skipped, text_key), BATCH_DOCUMENTS):
            for ids in tokenizer.tokenize_batch(texts):
                document = numpy.asarray([*ids, tokenizer.eod])       # [n + 1]
                builder.add_document(document, [document.size])
                stats.documents += 1
                stats.tokens += document.size
        builder.finalize(str(idx_path(tmp)))
        if stats.documents == 0:
            raise DataPrepError(f"{stats.summary()}: no usable document, nothing to train on")
        idx_path(prefix).unlink(missing_ok=True)   # an old .idx must not pair with the new .bin
        meta = {**asdict(stats), "tokenizer": tokenizer.name_or_path,
                "tokenizer_fingerprint": tokenizer.fingerprint, "text_key": text_key}
        meta_path(prefix).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(bin_path(tmp), bin_path(prefix))
        os.replace(idx_path(tmp), idx_path(prefix))
    finally:
        bin_path(tmp).unlink(missing_ok=True)
        idx_path(tmp).unlink(missing_ok=True)
    return stats


def _check_tokenizer(prefix: str, tokenizer: HFTokenizer, where: str) -> None:
    """A prefix we prepared records its tokenizer; refuse one built with a different vocab."""
    if not meta_path(prefix).is_file():
        return   # prepared elsewhere: nothing recorded to check
    meta = json.loads(meta_path(prefix).read_text())
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise DataPrepError(f"{where}: {prefix} was tokenized with {meta.get('tokenizer')!r}, "
                            f"not with {tokenizer.name_or_path!r} (different vocab); delete "
                            f"{prefix}.bin/.idx to rebuild it")


def ensure_prepared(data_cfg, tokenizer: HFTokenizer) -> list[PrepareStats]:
    """Prepare every data.blend entry whose prefix .bin/.idx is missing, from its source.

    data_cfg is a config.DataConfig. Every entry is checked before anything is built. Not
    rank-aware: under torch.distributed call it on rank 0 only, then barrier. Returns the stats
    of what was prepared (empty when nothing was missing).
    """
    missing = []
    for i, entry in enumerate(data_cfg.blend):
        where = f"data.blend[{i}]"
        if is_prepared(entry.prefix):
            _check_tokenizer(entry.prefix, tokenizer, where)
            continue
        if not entry.source:
            raise DataPrepError(f"{where}: {entry.prefix}.bin/.idx do not exist and the entry has "
                                "no source to prepare them from")
        try:
            expand_sources(entry.source)
        except DataPrepError as err:
            raise DataPrepError(f"{where}: {entry.prefix}.bin/.idx do not exist, and "
                                f"{err}") from None
        missing.append(entry)
    prepared = []
    for entry in missing:
        stats = prepare_jsonl(entry.source, entry.prefix, tokenizer)
        print(f"prepared {stats.summary()}", flush=True)
        prepared.append(stats)
    return prepared
