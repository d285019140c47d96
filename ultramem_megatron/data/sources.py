"""Document sources: JSON lines (plain, .gz, .zst), parquet, Hugging Face datasets; every record
either yields its text or is counted under a skip reason."""

from __future__ import annotations

import glob
import hashlib
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

SKIP_REASONS = ("blank_line", "malformed_json", "undecodable_bytes", "not_an_object",
                "missing_text", "non_string_text", "empty_text", "too_long")
FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")
HF_PREFIX = "hf:"   # hf:NAME[:CONFIG[:SPLIT]], streamed through `datasets`


class DataPrepError(ValueError):
    """Data that cannot be prepared; the message names the file, prefix or blend entry."""


class SourceError(DataPrepError):
    """A source that cannot be read (missing, unknown format, truncated or corrupt)."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file, or one shard of a Hugging Face dataset's stream."""

    name: str                        # stable, filesystem-safe: names the output shard
    path: str                        # file path, or "hf:NAME:CONFIG:SPLIT"
    hf_shard: Optional[int] = None   # index among the stream's n_shards (hf sources only)
    hf_shards: Optional[int] = None


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def expand_sources(sources: str | Sequence[str]) -> list[Shard]:
    """The shards of glob patterns and hf: specs, in a fixed order; SourceError if a pattern
    matches no file or names an unknown format."""
    patterns = [sources] if isinstance(sources, str) else list(sources)
    shards = []
    for pattern in patterns:
        if pattern.startswith(HF_PREFIX):
            shards += _hf_shards(pattern)
            continue
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())
        if not matched:
            raise SourceError(f"no file matches {pattern!r}")
        for path in matched:
            if not path.endswith(FILE_SUFFIXES):
                raise SourceError(f"{path}: unknown format (expected one of {FILE_SUFFIXES})")
            tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
            shards.append(Shard(f"{_safe_name(Path(path).name)}-{tag}", path))
    return shards


def _hf_spec(spec: str) -> tuple[str, Optional[str], str]:
    parts = spec[len(HF_PREFIX):].split(":")
    name, config = parts[0], parts[1] if len(parts) > 1 and parts[1] else None
    return name, config, parts[2] if len(parts) > 2 else "train"


def _hf_stream(spec: str):
    import datasets

    name, config, split = _hf_spec(spec)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (hub, builder, file errors)
        raise SourceError(f"{spec}: the dataset could not be opened: {err}") from err


def _hf_shards(spec: str) -> list[Shard]:
    count = max(1, _hf_stream(spec).num_shards)
    return [Shard(_safe_name(f"{spec}-{i:05d}-of-{count:05d}"), spec, i, count)
            for i in range(count)]


# ------------------------------------------------------------------------------------- reading

def _zstd_bytes(path: str) -> Iterator[bytes]:
    """Decompressed chunks of a .zst file (any number of frames); SourceError if it ends inside a
    frame (zstandard's stream reader would just stop there, silently)."""
    import zstandard

    decompressor, ended = zstandard.ZstdDecompressor(), True
    with open(path, "rb") as handle:
        frame = decompressor.decompressobj()
        while chunk := handle.read(1 << 20):
            while chunk:
                yield frame.decompress(chunk)
                ended, chunk = frame.eof, frame.unused_data if frame.eof else b""
                if ended:
                    frame = decompressor.decompressobj()
    if not ended:
        raise EOFError("the file ends inside a zstd frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending


def _file_lines(path: str) -> Iterator[bytes]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as handle:
        yield from handle


def _lines(path: str) -> Iterator[bytes]:
    """Raw lines of a (compressed) JSON-lines file; SourceError on a truncated or corrupt one."""
    corrupt: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if path.endswith(".zst"):
        import zstandard

        corrupt += (zstandard.ZstdError,)
        lines = _split_lines(_zstd_bytes(path))
    else:
        lines = _file_lines(path)
    number = 0
    try:
        for number, line in enumerate(lines, 1):
            yield line
    except corrupt as err:
        raise SourceError(f"{path}: truncated or corrupt after {number} lines ({err}); the file "
                          "must be repaired or removed from the sources") from err


def classify(record: object, text_key: str) -> tuple[Optional[str], Optional[str]]:
    """(None, text) for a usable record, else (skip reason, None)."""
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


def _json_records(path: str, text_key: str) -> Iterator[tuple[Optional[str], Optional[str]]]:
    for raw in _lines(path):
        if not raw.strip():
            yield "blank_line", None
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield "undecodable_bytes", None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield "malformed_json", None
            continue
        yield classify(record, text_key)


def _parquet_records(path: str, text_key: str) -> Iterator[tuple[Optional[str], Optional[str]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on bad files
        raise SourceError(f"{path}: not a readable parquet file ({err})") from err
    if text_key not in table.schema_arrow.names:
        for _ in range(table.metadata.num_rows):
            yield "missing_text", None
        return
    for batch in table.iter_batches(columns=[text_key]):
        for text in batch.column(0).to_pylist():
            yield classify({text_key: text}, text_key) if text is not None else ("missing_text", None)


def _hf_records(shard: Shard, text_key: str) -> Iterator[tuple[Optional[str], Optional[str]]]:
    stream = _hf_stream(shard.path)
    if shard.hf_shards and shard.hf_shards > 1:
        stream = stream.shard(num_shards=shard.hf_shards, index=shard.hf_shard)
    try:
        for record in stream:
            yield classify(record, text_key)
    except Exception as err:  # datasets' cast / generation errors have no common base class
        raise SourceError(f"{shard.path} (stream shard {shard.hf_shard}): reading failed: {err}. "
                          "Files whose `meta` schemas differ cannot share one stream: give each "
                          "subset its own hf:NAME:SUBSET, or list local files as a glob") from err


def read_shard(shard: Shard, text_key: str = "text") -> Iterator[tuple[Optional[str], Optional[str]]]:
    """(skip reason, None) or (None, text) for every record of the shard, in order."""
    if shard.hf_shard is not None:
        return _hf_records(shard, text_key)
    if shard.path.endswith(".parquet"):
        return _parquet_records(shard.path, text_key)
    return _json_records(shard.path, text_key)
