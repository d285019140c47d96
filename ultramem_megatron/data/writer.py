"""Texts -> one Megatron .bin/.idx through megatron-core's builder: EOD per document, long
documents split or dropped, counts of everything, files renamed into place only when complete."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from .sources import DataPrepError

BATCH_DOCUMENTS = 512   # documents tokenized per call (the fast tokenizers run a batch in parallel)


@dataclass(frozen=True)
class WriteOptions:
    text_key: str = "text"
    max_document_tokens: int = 0                          # 0: no limit (EOD included)
    long_documents: Literal["split", "drop"] = "split"    # what to do over the limit


@dataclass
class DocumentStats:
    """What was written and what was skipped (reason -> count, see sources.SKIP_REASONS)."""

    documents: int = 0                 # source documents kept
    tokens: int = 0                    # including one EOD per document
    bytes: int = 0                     # UTF-8 bytes of the kept texts
    split_documents: int = 0           # kept documents cut into pieces at max_document_tokens
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, other: "DocumentStats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.split_documents += other.split_documents
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


def usable_texts(records: Iterable[tuple[Optional[str], Optional[str]]],
                 stats: DocumentStats) -> Iterator[str]:
    """The texts of (reason, text) records; the others are counted in stats by reason."""
    for reason, text in records:
        if reason is None:
            yield text
        else:
            stats.skip(reason)


def _pieces(ids: list[int], eod: int, limit: int, long_documents: str
            ) -> Optional[list[numpy.ndarray]]:
    """A document as one or more .idx documents (EOD after the last), or None to drop it."""
    document = numpy.asarray([*ids, eod])
    if not limit or document.size <= limit:
        return [document]
    if long_documents == "drop":
        return None
    return [document[start:start + limit] for start in range(0, document.size, limit)]


def write_documents(texts: Iterable[str], prefix: str, tokenizer, stats: DocumentStats,
                    options: WriteOptions = WriteOptions(),
                    sidecar: Optional[dict] = None, allow_empty: bool = False) -> None:
    """Tokenize texts into prefix.bin/.idx (uint16 when the vocab fits, else int32).

    Written under a temporary name; `sidecar` (if given), with the final stats added, is written
    as prefix.meta.json; then .bin, sidecar and .idx are renamed into place, the .idx last, so a
    killed run never leaves a prefix that looks complete. DataPrepError when no document is usable,
    unless allow_empty (a pipeline shard whose records were all skipped).
    """
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    sidecar_path, sidecar_tmp = meta_path(prefix), meta_path(tmp)
    builder = IndexedDatasetBuilder(str(bin_path(tmp)),
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    texts = iter(texts)
    try:
        while batch := list(islice(texts, BATCH_DOCUMENTS)):
            for text, ids in zip(batch, tokenizer.tokenize_batch(batch)):
                pieces = _pieces(ids, tokenizer.eod, options.max_document_tokens,
                                 options.long_documents)
                if pieces is None:
                    stats.skip("too_long")
                    continue
                for piece in pieces:
                    builder.add_document(piece, [piece.size])
                stats.documents += 1
                stats.split_documents += len(pieces) > 1
                stats.tokens += sum(piece.size for piece in pieces)
                stats.bytes += len(text.encode("utf-8"))
        builder.finalize(str(idx_path(tmp)))
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
        for leftover in (bin_path(tmp), idx_path(tmp), sidecar_tmp):
            leftover.unlink(missing_ok=True)
