"""The corpus pipeline: subsets of sources -> one .bin/.idx per shard (a file, a byte range of
one, a run of parquet row groups, a stream shard), written by parallel worker processes or by
the tasks of a Slurm array, resumable, merged per subset in a fixed order, with a manifest."""

# Layout of an output directory:
#   OUT/shards/SUBSET/SHARD.{bin,idx,meta.json}   one per input shard; .idx renamed in last
#   OUT/SUBSET.{bin,idx}                          the subset's shards merged in shard-name order
#   OUT/manifest.json                             tokenizer, options, per-subset and per-shard counts
#   OUT/plan.json                                 the split size and options the shards share
# Each shard depends only on its input, and the merge order is fixed, so the bytes do not depend
# on the number of workers, the split size, or on which run or task wrote a shard.

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, replace
from multiprocessing import Value, get_context
from pathlib import Path

from tqdm import tqdm

from . import indexed
from .sources import SPLITTABLE, Shard, ShardReader, expand_sources, split_shard
from .tokenizer import load_tokenizer
from .writer import (DataPrepError, DocumentStats, WriteOptions, bin_path, count_tokens, idx_path,
                     is_prepared, meta_path, usable_texts, write_documents)

MIB = 1 << 20
PROBE_BYTES = 8 * MIB   # input read per subset to estimate its tokens (--max-tokens)
PROBE_SHARDS = 8        # ... spread over this many of its shards
RANGES_PER_WORKER = 16  # default split: the last ranges (running alone at the end) are short
_WORKER = {}   # what a forked worker inherits: its tokenizer, options and progress counters


class Interrupted(DataPrepError):
    """Ctrl-C (or SIGTERM) during a run: finished shards are kept."""


class Counters:
    """Documents, tokens and input bytes done, in shared memory that forked workers inherit."""

    def __init__(self) -> None:
        self.documents, self.tokens, self.consumed = Value("q", 0), Value("q", 0), Value("q", 0)

    def add(self, documents: int, tokens: int, consumed: int) -> None:
        for counter, amount in ((self.documents, documents), (self.tokens, tokens),
                                (self.consumed, consumed)):
            with counter.get_lock():
                counter.value += amount


def tokenize_shard(shard: Shard, prefix: str, options: WriteOptions, tokenizer,
                   counters: Counters | None = None) -> dict:
    """One shard -> prefix.bin/.idx/.meta.json; returns the shard's counts. counters, if given,
    advance after every document batch."""
    stats, reader = DocumentStats(), ShardReader(shard, options.text_key)
    last = [0]

    def progress(documents: int, tokens: int) -> None:
        counters.add(documents, tokens, reader.consumed - last[0])
        last[0] = reader.consumed

    write_documents(usable_texts(reader, stats, options.sample), prefix, tokenizer, stats, options,
                    sidecar={"shard": asdict(shard)}, allow_empty=True,
                    progress=progress if counters is not None else None)
    if counters is not None:
        counters.add(0, 0, shard.size - last[0])   # the input's tail, or a stream's whole size
    return stats.as_dict()


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() ends a worker


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt   # SIGTERM (Slurm's preemption, scancel) stops a run like Ctrl-C


def _worker_task(task: tuple) -> tuple:
    subset, shard, prefix = task
    try:
        return prefix, tokenize_shard(shard, prefix, _WORKER["options"], _WORKER["tokenizer"],
                                      _WORKER["counters"]), None
    except DataPrepError as err:
        return prefix, None, f"  {subset}/{shard.name}: {err}"


def shard_prefix(out_dir: Path, subset: str, shard: Shard) -> str:
    return str(out_dir / "shards" / subset / shard.name)


def _merge(out_dir: Path, subset: str, prefixes: list[str]) -> None:
    """OUT/SUBSET.bin/.idx from the shards in order, renamed into place."""
    target = str(out_dir / subset)
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        indexed.merge(prefixes, bin_path(tmp), idx_path(tmp))
        idx_path(target).unlink(missing_ok=True)
        os.replace(bin_path(tmp), bin_path(target))
        os.replace(idx_path(tmp), idx_path(target))
    finally:
        bin_path(tmp).unlink(missing_ok=True)
        idx_path(tmp).unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_writable(out_dir: Path) -> None:
    """The tool's error, before any work, when OUT cannot be created or written."""
    probe = out_dir / "shards" / f".probe{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataPrepError(f"output directory {out_dir}: cannot be written "
                            f"({err.strerror or err})") from None


def default_split(plain_bytes: int, workers: int) -> int:
    """The byte size plain JSON-lines files are cut at unless asked: about RANGES_PER_WORKER
    ranges per worker, between 1 and 256 MiB."""
    return min(256, max(1, plain_bytes // (RANGES_PER_WORKER * workers * MIB))) * MIB


def estimate_tokens(shards: list[Shard], tokenizer, options: WriteOptions) -> float:
    """A subset's tokens without sampling, estimated from up to PROBE_SHARDS of its shards
    (evenly spaced), each read for its share of PROBE_BYTES: tokens per input byte read, times
    the subset's input bytes."""
    if any(shard.hf_shard is not None for shard in shards):
        raise DataPrepError(f"{shards[0].path}: a stream has no size to sample --max-tokens "
                            "from; give --sample RATE instead")
    step = max(1, len(shards) // PROBE_SHARDS)
    tokens = consumed = 0
    for shard in shards[::step][:PROBE_SHARDS]:
        reader, texts, stats = ShardReader(shard, options.text_key), [], DocumentStats()
        for text in usable_texts(reader, stats):
            texts.append(text)
            if reader.consumed >= PROBE_BYTES // PROBE_SHARDS:
                break
        tokens += count_tokens(texts, tokenizer)
        consumed += reader.consumed or shard.size
    return tokens / max(consumed, 1) * sum(shard.size for shard in shards)


def plan_run(out_dir: Path, split_bytes: int | None, fallback_split: int, options: WriteOptions,
             max_tokens: int | None, plan_sample) -> tuple[int, WriteOptions]:
    """The split size and options of OUT's shards. The first run records them in OUT/plan.json;
    a rerun or another task of a Slurm array reads them back (so it finds the finished shards),
    and one that asks for other options is refused: its shards would not fit the finished ones.
    The split size is as asked, else as planned, else fallback_split. With max_tokens,
    plan_sample() chooses the sample rate (recorded with it)."""
    path = out_dir / "plan.json"
    planned = json.loads(path.read_text()) if path.is_file() else {}
    if "options" in planned:
        wanted = replace(options, sample=planned["options"]["sample"]) if max_tokens else options
        if planned.get("max_tokens") != max_tokens or asdict(wanted) != planned["options"]:
            asked = {**asdict(options), "max_tokens": max_tokens}
            raise DataPrepError(
                f"{out_dir} was planned with options {planned['options']} (max_tokens "
                f"{planned.get('max_tokens')}), not {asked}: its finished shards would not fit. "
                f"Use another output directory, or delete {path} and {out_dir}/shards")
        options = wanted
    elif max_tokens:
        options = replace(options, sample=plan_sample())
    split = split_bytes or planned.get("split_bytes") or fallback_split
    record = {"split_bytes": split, "options": asdict(options), "max_tokens": max_tokens}
    if record != planned:
        _write_json(path, record)
    return split, options


def run_pipeline(subsets: dict[str, list[str]], out_dir: str | Path, tokenizer, *,
                 workers: int = 1, options: WriteOptions = WriteOptions(), merge: bool = True,
                 progress: bool = True, split_bytes: int | None = None,
                 max_tokens: int | None = None, task: tuple[int, int] = (0, 1),
                 merge_only: bool = False) -> dict | None:
    """Tokenize every subset's sources (globs or hf: specs) into OUT; returns the manifest.

    tokenizer: an HFTokenizer (forked workers inherit it) or a name/path. Large plain JSON-lines
    files are cut into byte ranges of split_bytes (see split_size), parquet files into row-group
    runs, so that workers share one file. options.sample keeps that fraction of the documents
    (writer.in_sample); max_tokens chooses the fraction that gives about that many tokens.
    Finished shards are kept and skipped on a rerun (one run per OUT at a time: a run deletes
    the temporary files it finds there). Shards that fail (a corrupt file, say) are reported
    together in one DataPrepError after the others finished, so a rerun redoes only them.
    task=(i, n) runs only shards i, i + n, ... and returns None (a Slurm array task);
    merge_only tokenizes nothing and merges what n tasks wrote, naming the tasks to rerun when
    shards are missing.
    """
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    files = {subset: expand_sources(sources) for subset, sources in subsets.items()}
    plain = sum(shard.size for shards in files.values() for shard in shards
                if shard.path.endswith(SPLITTABLE))

    def plan_for(split: int) -> dict[str, list[Shard]]:
        return {subset: [part for shard in shards for part in split_shard(shard, split)]
                for subset, shards in files.items()}

    def sample_for_max_tokens() -> float:
        parts = plan_for(default_split(plain, 1))
        total = sum(estimate_tokens(shards, tokenizer, options) for shards in parts.values())
        return min(1.0, max_tokens / max(total, 1.0))

    split, options = plan_run(out_dir, split_bytes, default_split(plain, max(workers, task[1])),
                              options, max_tokens, sample_for_max_tokens)
    plan = plan_for(split)
    tasks = [(subset, shard, shard_prefix(out_dir, subset, shard))
             for subset, shards in plan.items() for shard in shards]
    if merge_only:
        missing = sorted({i % task[1] for i, t in enumerate(tasks) if not is_prepared(t[2])})
        if missing:
            raise DataPrepError(
                f"the shards of task(s) {', '.join(map(str, missing))} of {task[1]} are not "
                f"written yet (failed, cancelled or still running); rerun those tasks (e.g. "
                f"--task-index {missing[0]} --task-count {task[1]}, or a Slurm array "
                f"--array={','.join(map(str, missing))}), then merge again")
    pending = [] if merge_only else [t for t in tasks[task[0]::task[1]] if not is_prepared(t[2])]
    if task[1] == 1:
        for stale in (out_dir / "shards").glob("*/*.tmp*"):   # left by a killed run
            stale.unlink()
    results: dict = {}
    failures = _run_tasks(pending, tokenizer, workers, options, results, progress)
    if failures:
        raise DataPrepError(f"{len(failures)} of {len(tasks)} shards failed (the others are kept; "
                            "a rerun redoes only these):\n" + "\n".join(failures))
    if task[1] > 1 and not merge_only:
        return None
    for subset, shard, prefix in tasks:
        if prefix not in results:
            results[prefix] = json.loads(meta_path(prefix).read_text())
    manifest = _manifest(out_dir, plan, results, tokenizer, options)
    manifest["max_tokens"] = max_tokens
    empty = [name for name in plan if manifest["subsets"][name]["documents"] == 0]
    if empty:
        raise DataPrepError(f"subset(s) {', '.join(empty)}: no usable document in any shard; "
                            f"see {out_dir}/shards/*/*.meta.json for what was skipped")
    if merge:
        for subset, shards in plan.items():
            prefixes = [shard_prefix(out_dir, subset, shard) for shard in shards
                        if results[shard_prefix(out_dir, subset, shard)]["documents"]]
            if pending or merge_only or not is_prepared(str(out_dir / subset)):
                _merge(out_dir, subset, prefixes)
    _write_json(out_dir / "manifest.json", manifest)
    return manifest


def _run_tasks(pending: list, tokenizer, workers: int, options: WriteOptions, results: dict,
               progress: bool) -> list[str]:
    """Tokenize the pending shards, in this process or in `workers` forked processes; fills
    results. The bar advances per document batch. Ctrl-C or SIGTERM stops the workers at once
    (finished shards stay; a rerun does the rest)."""
    counters = Counters()
    total = sum(shard.size for _, shard, _ in pending)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress or not pending,
               desc="tokenize", smoothing=0.1)
    start, failures = time.perf_counter(), []

    def refresh() -> None:
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.update(counters.consumed.value - bar.n)
        bar.set_postfix(shards=f"{len(results) + len(failures)}/{len(pending)}",
                        docs_per_s=f"{counters.documents.value / elapsed:.0f}",
                        tokens_per_s=f"{counters.tokens.value / elapsed:.0f}", refresh=False)

    def record(outcome: tuple) -> None:
        prefix, counts, failure = outcome
        if failure:
            failures.append(failure)
        else:
            results[prefix] = counts

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        if workers <= 1:
            _WORKER.update(tokenizer=tokenizer, options=options, counters=counters)
            for task in pending:
                record(_worker_task(task))
                refresh()
        elif pending:
            _run_forked(pending, tokenizer, workers, options, counters, record, refresh)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"interrupted: {len(results)} of {len(pending)} shards finished and "
                            "kept; rerun the same command to do the rest") from None
    finally:
        _WORKER.clear()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    refresh()
    bar.close()
    return sorted(failures)


def longest_first(pending: list) -> list:
    """The pool's order: largest input first (ties in plan order), so what runs last, while the
    other workers are done, is short. The output does not depend on it (merged in plan order)."""
    return sorted(pending, key=lambda task: task[1].size, reverse=True)


def _run_forked(pending: list, tokenizer, workers: int, options: WriteOptions,
                counters: Counters, record, refresh) -> None:
    # fork: workers inherit the loaded tokenizer (nothing to import or load again); RAYON=1 keeps
    # each worker on one core
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tokenizer=tokenizer, options=options, counters=counters)
    context = get_context("fork")   # POSIX; workers read _WORKER from the parent
    pool = context.Pool(workers, initializer=_worker_init)
    try:
        outcomes = pool.imap_unordered(_worker_task, longest_first(pending))
        for _ in pending:
            while True:
                try:
                    record(outcomes.next(timeout=0.5))
                    break
                except context.TimeoutError:
                    refresh()
            refresh()
        pool.close()
    finally:
        pool.terminate()   # at once: on Ctrl-C nothing queued runs, a shard mid-way is dropped
        pool.join()


def _manifest(out_dir: Path, plan: dict, results: dict, tokenizer, options: WriteOptions) -> dict:
    """This run's subsets (with their shards' counts) merged into OUT/manifest.json's."""
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"subsets": {}}
    if manifest.get("tokenizer_fingerprint", tokenizer.fingerprint) != tokenizer.fingerprint:
        raise DataPrepError(f"{out_dir} holds data tokenized with {manifest.get('tokenizer')!r}, "
                            f"not {tokenizer.name_or_path!r}; use another output directory")
    manifest.update(tokenizer=tokenizer.name_or_path, tokenizer_fingerprint=tokenizer.fingerprint,
                    options=asdict(options))
    for subset, shards in plan.items():
        total, rows = DocumentStats(), []
        for shard in shards:
            counts = results[shard_prefix(out_dir, subset, shard)]
            shard_stats = DocumentStats(**{k: counts.get(k, 0) for k in (
                "documents", "tokens", "bytes", "split_documents", "unsampled", "skipped")})
            total.add(shard_stats)
            rows.append({"name": shard.name, "source": shard.path, **shard_stats.as_dict()})
        manifest["subsets"][subset] = {**total.as_dict(), "prefix": str(out_dir / subset),
                                       "shards": rows}
    manifest["subsets"] = dict(sorted(manifest["subsets"].items()))
    return manifest


def describe(manifest: dict) -> str:
    """A few lines for the console: per subset, documents, tokens, bytes, skips; the sample."""
    lines, subsets = [], manifest["subsets"]
    for name, entry in subsets.items():
        skipped = ", ".join(f"{n} {r}" for r, n in entry["skipped"].items()) or "none"
        lines.append(f"{name}: {entry['documents']} documents, {entry['tokens']} tokens, "
                     f"{entry['bytes'] / 1e6:.1f} MB of text from {len(entry['shards'])} shard(s); "
                     f"{entry['split_documents']} split; skipped: {skipped}")
    rate = manifest["options"].get("sample", 1.0)
    if rate < 1.0:
        kept = sum(entry["documents"] for entry in subsets.values())
        left = sum(entry.get("unsampled", 0) for entry in subsets.values())
        tokens = sum(entry["tokens"] for entry in subsets.values())
        target = manifest.get("max_tokens")
        lines.append(f"sample: rate {rate:.6g} kept {kept} of {kept + left} usable documents, "
                     f"{tokens} tokens" + (f" (--max-tokens {target})" if target else ""))
    return "\n".join(lines)
