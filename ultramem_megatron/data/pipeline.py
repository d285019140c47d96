"""The corpus pipeline: subsets of sources -> one .bin/.idx per input shard, written by parallel
worker processes, resumable, merged per subset in a fixed order, with a JSON manifest."""

# Layout of an output directory:
#   OUT/shards/SUBSET/SHARD.{bin,idx,meta.json}   one per input shard; .idx renamed in last
#   OUT/SUBSET.{bin,idx}                          the subset's shards merged in shard-name order
#   OUT/manifest.json                             tokenizer, options, per-subset and per-shard counts
# Each shard depends only on its input, and the merge order is fixed, so the bytes do not depend
# on the number of workers or on which run (first or resumed) wrote a shard.

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from .sources import Shard, expand_sources, read_shard
from .tokenizer import load_tokenizer
from .writer import (DataPrepError, DocumentStats, WriteOptions, bin_path, idx_path, is_prepared,
                     meta_path, usable_texts, write_documents)

_WORKER_TOKENIZER = None   # each worker process loads its own


def _init_worker(tokenizer_spec: str) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("RAYON_NUM_THREADS", "1")   # one core per worker, before tokenizers loads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_spec)


def tokenize_shard(shard: Shard, prefix: str, options: WriteOptions, tokenizer=None) -> dict:
    """One shard -> prefix.bin/.idx/.meta.json; returns the shard's counts."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    stats = DocumentStats()
    write_documents(usable_texts(read_shard(shard, options.text_key), stats), prefix, tokenizer,
                    stats, options, sidecar={"shard": asdict(shard)}, allow_empty=True)
    return stats.as_dict()


def shard_prefix(out_dir: Path, subset: str, shard: Shard) -> str:
    return str(out_dir / "shards" / subset / shard.name)


def _merge(out_dir: Path, subset: str, prefixes: list[str]) -> None:
    """OUT/SUBSET.bin/.idx from the shards in order (megatron's builder), renamed into place."""
    target = str(out_dir / subset)
    tmp = f"{target}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(str(bin_path(tmp)),
                                    dtype=IndexedDataset(prefixes[0]).index.dtype)
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(str(idx_path(tmp)))
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


def run_pipeline(subsets: dict[str, list[str]], out_dir: str | Path, tokenizer, *,
                 workers: int = 1, options: WriteOptions = WriteOptions(), merge: bool = True,
                 progress: bool = True) -> dict:
    """Tokenize every subset's sources (globs or hf: specs) into OUT; returns the manifest.

    tokenizer: an HFTokenizer (its name_or_path is what worker processes load) or a name/path.
    Finished shards are kept and skipped on a rerun (one run per OUT at a time: a run deletes the
    temporary files it finds there). Shards that fail (a corrupt file, say) are
    reported together in one DataPrepError after the others finished, so a rerun redoes only them.
    """
    out_dir = Path(out_dir)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    plan = {subset: expand_sources(sources) for subset, sources in subsets.items()}
    for stale in (out_dir / "shards").glob("*/*.tmp*"):   # left by a killed run
        stale.unlink()
    tasks = [(subset, shard, shard_prefix(out_dir, subset, shard))
             for subset, shards in plan.items() for shard in shards]
    pending = [task for task in tasks if not is_prepared(task[2])]
    results = {task[2]: json.loads(meta_path(task[2]).read_text()) for task in tasks
               if task not in pending}
    failures = _run_tasks(pending, tokenizer, workers, options, results, progress)
    if failures:
        raise DataPrepError(f"{len(failures)} of {len(tasks)} shards failed (the others are kept; "
                            "a rerun redoes only these):\n" + "\n".join(failures))
    manifest = _manifest(out_dir, plan, results, tokenizer, options)
    empty = [name for name in plan if manifest["subsets"][name]["documents"] == 0]
    if empty:
        raise DataPrepError(f"subset(s) {', '.join(empty)}: no usable document in any shard; "
                            f"see {out_dir}/shards/*/*.meta.json for what was skipped")
    if merge:
        for subset, shards in plan.items():
            prefixes = [shard_prefix(out_dir, subset, shard) for shard in shards
                        if results[shard_prefix(out_dir, subset, shard)]["documents"]]
            if pending or not is_prepared(str(out_dir / subset)):
                _merge(out_dir, subset, prefixes)
    _write_json(out_dir / "manifest.json", manifest)
    return manifest


def _run_tasks(pending: list, tokenizer, workers: int, options: WriteOptions, results: dict,
               progress: bool) -> list[str]:
    """Tokenize the pending shards (in this process, or in `workers` processes); fills results."""
    failures = []
    bar = tqdm(total=len(pending), unit="shard", disable=not progress or not pending,
               desc="tokenize")
    start, documents, tokens = time.perf_counter(), 0, 0

    def done(prefix: str, counts: dict) -> None:
        nonlocal documents, tokens
        results[prefix] = counts
        documents, tokens = documents + counts["documents"], tokens + counts["tokens"]
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(docs_per_s=f"{documents / elapsed:.0f}", tokens_per_s=f"{tokens / elapsed:.0f}")
        bar.update()

    if workers <= 1:
        for subset, shard, prefix in pending:
            try:
                done(prefix, tokenize_shard(shard, prefix, options, tokenizer))
            except DataPrepError as err:
                failures.append(f"  {subset}/{shard.name}: {err}")
    else:
        # fork: a spawned worker would re-import megatron-core and transformers (~10 s each)
        context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(tokenizer.name_or_path,)) as pool:
            futures = {pool.submit(tokenize_shard, shard, prefix, options): (subset, shard, prefix)
                       for subset, shard, prefix in pending}
            for future in as_completed(futures):
                subset, shard, prefix = futures[future]
                try:
                    done(prefix, future.result())
                except DataPrepError as err:
                    failures.append(f"  {subset}/{shard.name}: {err}")
    bar.close()
    return sorted(failures)


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
            shard_stats = DocumentStats(**{k: counts[k] for k in ("documents", "tokens", "bytes",
                                                                  "split_documents", "skipped")})
            total.add(shard_stats)
            rows.append({"name": shard.name, "source": shard.path, **shard_stats.as_dict()})
        manifest["subsets"][subset] = {**total.as_dict(), "prefix": str(out_dir / subset),
                                       "shards": rows}
    manifest["subsets"] = dict(sorted(manifest["subsets"].items()))
    return manifest


def describe(manifest: dict) -> str:
    """A few lines for the console: per subset, documents, tokens, bytes, skips."""
    lines = []
    for name, entry in manifest["subsets"].items():
        skipped = ", ".join(f"{n} {r}" for r, n in entry["skipped"].items()) or "none"
        lines.append(f"{name}: {entry['documents']} documents, {entry['tokens']} tokens, "
                     f"{entry['bytes'] / 1e6:.1f} MB of text from {len(entry['shards'])} shard(s); "
                     f"{entry['split_documents']} split; skipped: {skipped}")
    return "\n".join(lines)
