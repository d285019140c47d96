"""Sources -> one Megatron .bin/.idx prefix, written atomically; fill in a config blend's gaps."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .sources import SourceError, expand_sources, read_shard
from .tokenizer import HFTokenizer
from .writer import (DataPrepError, DocumentStats, WriteOptions, is_prepared, meta_path,
                     usable_texts, write_documents)

__all__ = ["DataPrepError", "PrepareStats", "prepare_jsonl", "ensure_prepared", "is_prepared",
           "missing_data", "prepare_command"]


@dataclass
class PrepareStats(DocumentStats):
    """What prepare_jsonl wrote from which files, and what it skipped by reason."""

    prefix: str = ""
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.prefix}: {self.documents} documents, {self.tokens} tokens from "
                f"{len(self.files)} file(s); skipped: {skipped}")


def prepare_jsonl(sources: str | Sequence[str], prefix: str, tokenizer: HFTokenizer,
                  options: WriteOptions = WriteOptions()) -> PrepareStats:
    """Tokenize every document of the source file(s) into one prefix.bin/.idx (+ .meta.json).

    Any format sources.py reads (JSON lines, .gz, .zst, parquet, hf:); one document per record,
    its text under options.text_key; tokenizer.eod is appended to each. For many files on many cores use
    pipeline.run_pipeline (one shard per file, in parallel, resumable).
    """
    shards = expand_sources(sources)
    stats = PrepareStats(prefix=str(prefix), files=[shard.path for shard in shards])
    records = (record for shard in shards for record in read_shard(shard, options.text_key))
    try:
        write_documents(usable_texts(records, stats, options.sample), str(prefix), tokenizer, stats, options,
                        sidecar={"prefix": str(prefix), "files": stats.files,
                                 "tokenizer": tokenizer.name_or_path,
                                 "tokenizer_fingerprint": tokenizer.fingerprint,
                                 "text_key": options.text_key})
    except SourceError:
        raise
    except DataPrepError as err:   # no usable document: say what was skipped
        raise DataPrepError(f"{stats.summary()}: {err}") from None
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


def _check_corpus(data_cfg, tokenizer: HFTokenizer) -> None:
    """data.corpus is built by scripts/prepare_data.py (`make data`): check it, build nothing."""
    manifest_path = Path(data_cfg.corpus) / "manifest.json"
    if not manifest_path.is_file():
        raise DataPrepError(f"data.corpus {data_cfg.corpus}: no manifest.json; build the corpus "
                            "first (`make data`, or scripts/prepare_data.py --output-dir)")
    manifest = json.loads(manifest_path.read_text())
    for entry, subset in zip(data_cfg.entries(), data_cfg.subset_weights):
        if subset not in manifest["subsets"] or not is_prepared(entry.prefix):
            raise DataPrepError(f"data.subset_weights.{subset}: no such subset in "
                                f"{data_cfg.corpus} (it has {sorted(manifest['subsets'])})")
    if manifest.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise DataPrepError(f"data.corpus {data_cfg.corpus} was tokenized with "
                            f"{manifest.get('tokenizer')!r}, not {tokenizer.name_or_path!r}")


def missing_data(data_cfg) -> list[str]:
    """What a run would have to tokenize or build first, one `field: path` each: data.blend
    prefixes without .bin/.idx, or data.corpus without its manifest or a subset. Looks at file
    names only (no tokenizer), so a launcher can ask before anything expensive."""
    if data_cfg.corpus is None:
        return [f"data.blend[{i}]: {entry.prefix}" for i, entry in enumerate(data_cfg.blend)
                if not is_prepared(entry.prefix)]
    if not (Path(data_cfg.corpus) / "manifest.json").is_file():
        return [f"data.corpus: {data_cfg.corpus} (no manifest.json)"]
    return [f"data.subset_weights.{subset}: {entry.prefix}"
            for entry, subset in zip(data_cfg.entries(), data_cfg.subset_weights)
            if not is_prepared(entry.prefix)]


def prepare_command(data_cfg, config: str, overrides: Sequence[str] = ()) -> str:
    """The command, run from the repository root, that prepares what missing_data lists."""
    if data_cfg.corpus is not None:
        return (f"`make data` for the default corpus, else {sys.executable} "
                f"scripts/prepare_data.py --subset NAME=SOURCE ... --output-dir {data_cfg.corpus}")
    return shlex.join([sys.executable, "scripts/prepare_data.py", "--config", config, *overrides])


def ensure_prepared(data_cfg, tokenizer: HFTokenizer, build: bool = True) -> list[PrepareStats]:
    """Prepare every data.blend entry whose prefix .bin/.idx is missing, from its source.

    data_cfg is a config.DataConfig. Every entry is checked before anything is built. Not
    rank-aware: under torch.distributed build only in a world of one, and pass build=False on
    every rank of a larger one (a missing prefix then raises on each). Returns the stats of what
    was prepared (empty when nothing was missing).
    """
    if data_cfg.corpus is not None:
        _check_corpus(data_cfg, tokenizer)
        return []
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
        except SourceError as err:
            raise DataPrepError(f"{where}: {entry.prefix}.bin/.idx do not exist, and "
                                f"{err}") from None
        missing.append(entry)
    if missing and not build:
        raise DataPrepError(f"{', '.join(entry.prefix for entry in missing)}: not prepared, and "
                            "a job of several ranks does not tokenize; prepare it first on one "
                            "process (scripts/prepare_data.py --config CONFIG [overrides])")
    prepared = []
    for entry in missing:
        stats = prepare_jsonl(entry.source, entry.prefix, tokenizer)
        print(f"prepared {stats.summary()}", flush=True)
        prepared.append(stats)
    return prepared
