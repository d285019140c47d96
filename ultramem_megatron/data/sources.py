"""Document sources: JSON lines (plain, .gz, .zst), parquet, Hugging Face datasets, cut into shards
(plain JSON lines by byte ranges, parquet by row groups) that workers read independently; every
record either yields its text or is counted under a skip reason."""

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
                "missing_text", "non_string_text", "empty_text", "lone_surrogate", "too_long")
SPLITTABLE = (".jsonl", ".json")   # plain text: any byte range can be read on its own
BOM = b"\xef\xbb\xbf"
FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")
HF_PREFIX = "hf:"   # hf:NAME[:CONFIG[:SPLIT]], streamed through `datasets`


class DataPrepError(ValueError):
    """Data that cannot be prepared; the message names the file, prefix or blend entry."""


class SourceError(DataPrepError):
    """A source that cannot be read (missing, unknown format, truncated or corrupt)."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file, a part of one, or one shard of a Hugging Face dataset's stream.

    A part of a plain JSON-lines file holds the lines that *start* in bytes [start, end); a part
    of a parquet file the row groups [start, end). The parts of a file, in order, hold each of
    its records once and in order, so their outputs concatenate to the whole file's.
    """

    name: str                        # stable, filesystem-safe: names the output shard
    path: str                        # file path, or "hf:NAME:CONFIG:SPLIT"
    hf_shard: Optional[int] = None   # index among the stream's n_shards (hf sources only)
    hf_shards: Optional[int] = None
    start: int = 0                   # a part: first byte / row group
    end: Optional[int] = None        # a part: end byte / row group (None: to the end)
    size: int = 0                    # input bytes it reads (0 when unknown): progress only


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def expand_sources(sources: str | Sequence[str], split_bytes: int = 0) -> list[Shard]:
    """The shards of glob patterns and hf: specs, in a fixed order; SourceError if a pattern
    matches no file, names an unknown format or a file that cannot be read. With split_bytes,
    plain JSON-lines files larger than that are cut into byte ranges of about that size and
    parquet files into runs of row groups (compressed files stay whole: a stream has no
    seekable line starts)."""
    patterns = [sources] if isinstance(sources, str) else list(sources)
    shards = []
    for pattern in patterns:
        if pattern.startswith(HF_PREFIX):
            shards += _hf_shards(pattern)
            continue
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if Path(p).is_file())
        if not matched:
            raise SourceError(f"no file matches {pattern!r}")
        for path in matched:
            if not path.endswith(FILE_SUFFIXES):
                raise SourceError(f"{path}: unknown format (expected one of {FILE_SUFFIXES})")
            _open(path).close()   # unreadable files are refused before any work
            tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
            shards.append(Shard(f"{_safe_name(Path(path).name)}-{tag}", path,
                                size=os.path.getsize(path)))
    return [part for shard in shards for part in split_shard(shard, split_bytes)]


def layout_subsets(root: str) -> tuple[dict[str, list[str]], list[str]]:
    """A corpus laid out as RedPajama-Data-1T is (`wget -x` of its urls.txt): one folder per
    subset (arxiv, book, c4, common_crawl/DUMP, github, stackexchange, wikipedia) holding
    *.jsonl and *.jsonl.zst files at any depth. Returns subset -> glob patterns (one per file
    suffix present) and the files it leaves out (other names: checksums, listings)."""
    top = Path(os.path.expanduser(root))
    if not top.is_dir():
        raise SourceError(f"{root}: not a directory (expected one folder per subset)")
    subsets, ignored = {}, []
    for folder in sorted(p for p in top.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        suffixes = sorted({next(s for s in FILE_SUFFIXES if p.name.endswith(s)) for p in files
                           if p.name.endswith(FILE_SUFFIXES)})
        ignored += [str(p) for p in files if not p.name.endswith(FILE_SUFFIXES)]
        if suffixes:
            subsets[_safe_name(folder.name)] = [f"{folder}/**/*{suffix}" for suffix in suffixes]
    ignored += [str(p) for p in top.iterdir() if p.is_file()]
    if not subsets:
        raise SourceError(f"{root}: no subset folder holds {', '.join(FILE_SUFFIXES)} files")
    return subsets, sorted(ignored)


def split_shard(shard: Shard, split_bytes: int) -> list[Shard]:
    """A whole file's shard as its parts of about split_bytes (itself when it needs no cut)."""
    name, path, size = shard.name, shard.path, shard.size
    if not split_bytes or shard.hf_shard is not None:
        return [shard]
    if path.endswith(SPLITTABLE) and size > split_bytes:
        count = -(-size // split_bytes)
        bounds = [size * i // count for i in range(count + 1)]
        return [Shard(f"{name}.b{a:013d}-{b:013d}", path, start=a, end=b, size=b - a)
                for a, b in zip(bounds, bounds[1:])]
    if path.endswith(".parquet"):
        return _row_group_parts(shard, split_bytes)
    return [shard]


def _row_group_parts(shard: Shard, split_bytes: int) -> list[Shard]:
    """Consecutive row groups of about split_bytes (their uncompressed size) per part."""
    name, path = shard.name, shard.path
    metadata = _parquet_file(path).metadata
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    if len(sizes) <= 1 or sum(sizes) <= split_bytes:
        return [shard]
    parts, start, total = [], 0, 0
    for group, group_size in enumerate(sizes):
        total += group_size
        if total >= split_bytes or group == len(sizes) - 1:
            parts.append(Shard(f"{name}.g{start:06d}-{group + 1:06d}", path, start=start,
                               end=group + 1, size=total))
            start, total = group + 1, 0
    return parts


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

def _open(path: str):
    """The file opened for reading; SourceError naming the problem (not "corrupt") when the
    file cannot be opened at all."""
    try:
        return open(path, "rb")
    except OSError as err:
        raise SourceError(f"{path}: cannot be read ({err.strerror or err})") from err


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on bad files
        raise SourceError(f"{path}: not a readable parquet file ({err})") from err


class ShardReader:
    """Iterates a shard's records as (skip reason, None) or (None, text), in order; `consumed`
    is how many input bytes (compressed, for compressed files) it has read so far."""

    def __init__(self, shard: Shard, text_key: str = "text") -> None:
        self.shard, self.text_key, self.consumed = shard, text_key, 0

    def __iter__(self) -> Iterator[tuple[Optional[str], Optional[str]]]:
        shard = self.shard
        if shard.hf_shard is not None:
            return _hf_records(shard, self.text_key)
        if shard.path.endswith(".parquet"):
            return self._parquet_records()
        return self._json_records()

    # JSON lines ----------------------------------------------------------------------------
    def _plain_lines(self, handle) -> Iterator[bytes]:
        """The lines that start in [start, end): the line running into `start` belongs to the
        part before, the one running past `end` to this part."""
        start, end = self.shard.start, self.shard.end
        if start:
            handle.seek(start - 1)
            handle.readline()   # up to and including the newline at or after start - 1
        position = handle.tell()
        while end is None or position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            self.consumed = position - start
            yield line

    def _gzip_lines(self, handle) -> Iterator[bytes]:
        with gzip.open(handle) as lines:
            for line in lines:
                self.consumed = handle.tell()
                yield line

    def _zstd_lines(self, handle) -> Iterator[bytes]:
        """Lines of a .zst file of any number of frames; EOFError if it ends inside a frame
        (zstandard's stream reader would just stop there, silently)."""
        import zstandard

        def chunks() -> Iterator[bytes]:
            decompressor, ended = zstandard.ZstdDecompressor(), True
            frame = decompressor.decompressobj()
            while chunk := handle.read(1 << 20):
                self.consumed = handle.tell()
                while chunk:
                    yield frame.decompress(chunk)
                    ended, chunk = frame.eof, frame.unused_data if frame.eof else b""
                    if ended:
                        frame = decompressor.decompressobj()
            if not ended:
                raise EOFError("the file ends inside a zstd frame")

        pending = b""
        for chunk in chunks():
            *lines, pending = (pending + chunk).split(b"\n")
            yield from lines
        if pending:
            yield pending

    def _lines(self) -> Iterator[bytes]:
        """Raw lines, a UTF-8 byte-order mark removed from the file's first; SourceError on a
        truncated or corrupt file."""
        path = self.shard.path
        corrupt: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
        if path.endswith(".zst"):
            import zstandard

            corrupt += (zstandard.ZstdError,)
        reader = (self._zstd_lines if path.endswith(".zst") else
                  self._gzip_lines if path.endswith(".gz") else self._plain_lines)
        number = 0
        with _open(path) as handle:
            try:
                for number, line in enumerate(reader(handle), 1):
                    if number == 1 and self.shard.start == 0 and line.startswith(BOM):
                        line = line[len(BOM):]
                    yield line
            except corrupt as err:
                raise SourceError(f"{path}: truncated or corrupt after {number} lines ({err}); "
                                  "the file must be repaired or removed from the sources") from err

    def _json_records(self) -> Iterator[tuple[Optional[str], Optional[str]]]:
        for raw in self._lines():
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
            yield classify(record, self.text_key)

    # parquet -------------------------------------------------------------------------------
    def _parquet_records(self) -> Iterator[tuple[Optional[str], Optional[str]]]:
        table, key = _parquet_file(self.shard.path), self.text_key
        metadata = table.metadata
        groups = range(self.shard.start, metadata.num_row_groups if self.shard.end is None
                       else self.shard.end)
        if key not in table.schema_arrow.names:
            for _ in range(sum(metadata.row_group(i).num_rows for i in groups)):
                yield "missing_text", None
            return
        for group in groups:
            for batch in table.iter_batches(row_groups=[group], columns=[key]):
                for text in batch.column(0).to_pylist():
                    yield classify({key: text}, key) if text is not None else ("missing_text", None)
            self.consumed += metadata.row_group(group).total_byte_size


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
    return iter(ShardReader(shard, text_key))
