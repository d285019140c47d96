"""Texts -> one Megatron .bin/.idx (indexed.py's writer): EOD per document, long documents split
or dropped, texts the tokenizer cannot take skipped, counts of everything, files renamed into
place only when complete."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import numpy

from .indexed import IndexedWriter, token_dtype
from .sources import DataPrepError

BATCH_DOCUMENTS = 512    # documents per tokenizer call ...
BATCH_CHARS = 1 << 23    # ... or fewer, when their texts reach this many characters


@dataclass(frozen=True)
class WriteOptions:
    text_key: str = "text"
    max_document_tokens: int = 0                          # 0: no limit (EOD included)
    long_documents: Literal["split", "drop"] = "split"    # what to do over the limit
    sample: float = 1.0                                   # keep this fraction of documents


@dataclass
class DocumentStats:
    """What was written and what was skipped (reason -> count, see sources.SKIP_REASONS)."""

    documents: int = 0                 # source documents kept
    tokens: int = 0                    # including one EOD per document
    bytes: int = 0                     # UTF-8 bytes of the kept texts
    split_documents: int = 0           # kept documents cut into pieces at max_document_tokens
    unsampled: int = 0                 # usable documents left out of a sample (WriteOptions.sample)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, other: "DocumentStats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.split_documents += other.split_documents
        self.unsampled += other.unsampled
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def as_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(sorted(self.skipped.items()))}


def bin_path(prefix: str) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str) -> Path:
    return Path(f"{prefix}.idx")


def meta_path(prefix: str) -> Path:
    return Path(f"{prefix}.meta.json")


def is_prepared(prefix: str) -> bool:
    """Both files exist. The .idx is always renamed into place last, so this means complete."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def in_sample(text: str, rate: float) -> bool:
    """Whether a document belongs to a sample of `rate`: its text's hash, read as a number in
    [0, 1), is below rate. Depends on the text alone, so a sample is the same for any split,
    worker count or file format, and a smaller rate's sample lies inside a larger one's."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def usable_texts(records: Iterable[tuple[Optional[str], Optional[str]]],
                 stats: DocumentStats, sample: float = 1.0) -> Iterator[str]:
    """The texts of (reason, text) records in the sample; the others are counted in stats (by
    skip reason, or as unsampled)."""
    for reason, text in records:
        if reason is not None:
            stats.skip(reason)
        elif in_sample(text, sample):
            yield text
        else:
            stats.unsampled += 1


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encodable(batch: list[str], stats: DocumentStats) -> tuple[list[str], list[int]]:
    """The texts the tokenizer can take and their UTF-8 sizes. A lone surrogate (a JSON escape
    such as "\\ud800", common in web dumps) has no UTF-8 form: such a text is counted as
    `lone_surrogate` and skipped (the Rust tokenizers raise TypeError and end the run)."""
    texts, sizes = [], []
    for text in batch:
        try:
            sizes.append(len(text.encode("utf-8")))
        except UnicodeEncodeError:
            stats.skip("lone_surrogate")
            continue
        texts.append(text)
    return texts, sizes


def count_tokens(texts: list[str], tokenizer) -> int:
    """The tokens texts would be written as (one EOD each), texts the tokenizer cannot take left
    out."""
    tokens = 0
    for batch in _batches(iter(texts)):
        batch, _ = _encodable(batch, DocumentStats())
        tokens += sum(len(ids) + 1 for ids in tokenizer.tokenize_batch(batch))
    return tokens


def _pieces(ids: list[int], eod: int, limit: int, long_documents: str) -> Optional[list[int]]:
    """A document's .idx lengths (EOD after the last piece), or None to drop it."""
    size = len(ids) + 1
    if not limit or size <= limit:
        return [size]
    if long_documents == "drop":
        return None
    return [min(limit, size - start) for start in range(0, size, limit)]


def write_documents(texts: Iterable[str], prefix: str, tokenizer, stats: DocumentStats,
                    options: WriteOptions = WriteOptions(),
                    sidecar: Optional[dict] = None, allow_empty: bool = False,
                    progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Tokenize texts into prefix.bin/.idx (uint16 when the vocab fits, else int32).

    Written under a temporary name; `sidecar` (if given), with the final stats added, is written
    as prefix.meta.json; then .bin, sidecar and .idx are renamed into place, the .idx last, so a
    killed run never leaves a prefix that looks complete. DataPrepError when no document is usable,
    unless allow_empty (a pipeline shard whose records were all skipped). progress, if given,
    is called after each batch with its numbers of documents and tokens.
    """
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    sidecar_path, sidecar_tmp = meta_path(prefix), meta_path(tmp)
    writer = IndexedWriter(bin_path(tmp), token_dtype(tokenizer.vocab_size))
    try:
        for batch in _batches(iter(texts)):
            batch, sizes = _encodable(batch, stats)
            tokens, lengths = [], []
            for ids, size in zip(tokenizer.tokenize_batch(batch), sizes):
                pieces = _pieces(ids, tokenizer.eod, options.max_document_tokens,
                                 options.long_documents)
                if pieces is None:
                    stats.skip("too_long")
                    continue
                ids.append(tokenizer.eod)
                tokens.append(ids)
                lengths += pieces
                stats.documents += 1
                stats.split_documents += len(pieces) > 1
                stats.tokens += len(ids)
                stats.bytes += size
            if tokens:
                writer.add(numpy.fromiter(chain.from_iterable(tokens), writer.dtype,
                                          sum(lengths)), numpy.asarray(lengths))
            if progress is not None:
                progress(len(batch), sum(lengths))
        writer.finalize(idx_path(tmp))
        if stats.documents == 0 and not allow_empty:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(stats.skipped.items())) or "none"
            raise DataPrepError(f"{prefix}: no usable document (skipped: {skipped}), nothing "
                                "to train on")
        idx_path(prefix).unlink(missing_ok=True)   # an old .idx must not pair with the new .bin
        if sidecar is not None:
            sidecar_tmp.write_text(json.dumps({**sidecar, **stats.as_dict()}, indent=2) + "\n")
        os.replace(bin_path(tmp), bin_path(prefix))
        if sidecar is not None:
            os.replace(sidecar_tmp, sidecar_path)
        os.replace(idx_path(tmp), idx_path(prefix))
    finally:
        writer.close()
        for leftover in (bin_path(tmp), idx_path(tmp), sidecar_tmp):
            leftover.unlink(missing_ok=True)
