"""Tokenization throughput, side by side: megatron-core's per-document loop vs our pipeline.

    .venv/bin/python scripts/bench_tokenize.py              # fixture x4, workers 1..cpu_count
    .venv/bin/python scripts/bench_tokenize.py --quick      # fixture x1, workers 1..2
    .venv/bin/python scripts/bench_tokenize.py --input 'data/raw/corpus/*/*.jsonl.gz' --repeat 1

Every row reads the same files: --repeat copies of each --input file, written to a temp dir (the
pipeline makes one shard per file, so copies give several workers something to share).
- baseline: what megatron's preprocess_data does per document, from megatron-core's own pieces:
  its text tokenizer wrapper (MegatronTokenizer, library "huggingface") tokenizes one document
  at a time, EOD is appended, IndexedDatasetBuilder writes one .bin/.idx.
- pipeline: run_pipeline at workers = 1..--max-workers, each into a fresh temp output dir.
Times are wall clock end to end, tokenizers loaded beforehand; the pipeline's rows with 2+
workers include starting the worker processes (each imports megatron-core and loads the
tokenizer) and every pipeline row includes merging the shards. RAYON_NUM_THREADS defaults to 1
here so that one worker is one core. Exits 1 if the merged .bin differs across worker counts.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")   # before tokenizers loads: one core per worker
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizer
from transformers.utils import logging as transformers_logging

from ultramem_megatron.data.pipeline import run_pipeline
from ultramem_megatron.data.tokenizer import load_tokenizer

SUBSET = "bench"


@dataclass
class Row:
    name: str
    workers: int
    seconds: float
    documents: int
    tokens: int
    bin_sha256: str


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_inputs(patterns: list[str], repeat: int, into: Path) -> list[str]:
    """repeat copies of every file the patterns match, into `into`, in a fixed order."""
    files = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if not files:
        sys.exit(f"no file matches {patterns}")
    for copy in range(repeat):
        for number, path in enumerate(files):
            shutil.copyfile(path, into / f"{copy:02d}-{number:03d}-{Path(path).name}")
    return sorted(str(path) for path in into.iterdir())


def megatron_texts(path: str):
    """The texts of a JSON-lines file (.gz too); blank lines and records without a non-blank
    "text" string are skipped, as the pipeline skips them (malformed JSON raises here)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line) if line.strip() else None
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text


def baseline_row(files: list[str], tokenizer) -> Row:
    """One process, one document at a time through megatron-core's tokenizer and builder."""
    with tempfile.TemporaryDirectory() as out:
        prefix = f"{out}/{SUBSET}"
        start = time.perf_counter()
        builder = IndexedDatasetBuilder(f"{prefix}.bin",
                                        dtype=DType.optimal_dtype(tokenizer.vocab_size))
        documents = tokens = 0
        for path in files:
            for text in megatron_texts(path):
                ids = tokenizer.tokenize(text) + [tokenizer.eod]
                builder.add_document(ids, [len(ids)])
                documents, tokens = documents + 1, tokens + len(ids)
        builder.finalize(f"{prefix}.idx")
        seconds = time.perf_counter() - start
        return Row("megatron-core loop", 1, seconds, documents, tokens,
                   sha256(Path(f"{prefix}.bin")))


def pipeline_row(input_dir: Path, tokenizer, workers: int) -> Row:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = run_pipeline({SUBSET: [str(input_dir / "*")]}, out, tokenizer,
                                workers=workers, progress=False)
        seconds = time.perf_counter() - start
        counts = manifest["subsets"][SUBSET]
        return Row("pipeline", workers, seconds, counts["documents"], counts["tokens"],
                   sha256(Path(out) / f"{SUBSET}.bin"))


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    print(f"{'row':<20}{'workers':>8}{'seconds':>9}{'tokens':>11}{'tokens/s':>11}"
          f"{'tok/s/worker':>13}{'vs baseline':>12}  .bin sha256")
    for row in rows:
        rate = row.tokens / row.seconds
        print(f"{row.name:<20}{row.workers:>8}{row.seconds:>9.2f}{row.tokens:>11,}{rate:>11,.0f}"
              f"{rate / row.workers:>13,.0f}{base.seconds / row.seconds:>11.2f}x  "
              f"{row.bin_sha256[:16]}")


def check(rows: list[Row]) -> bool:
    """Prints the consistency checks; True when the pipeline's .bin is the same at every count."""
    base, pipeline = rows[0], rows[1:]
    same = len({row.bin_sha256 for row in pipeline}) == 1
    print(f"pipeline merged .bin byte-identical across worker counts (sha256): "
          f"{'yes' if same else 'NO'}")
    print(f"megatron-core loop .bin identical to the pipeline's: "
          f"{'yes' if base.bin_sha256 == pipeline[0].bin_sha256 else 'no'}")
    if {(row.documents, row.tokens) for row in rows} != {(base.documents, base.tokens)}:
        print("WARNING: documents/tokens differ between rows: "
              + ", ".join(f"{r.name}@{r.workers}: {r.documents}/{r.tokens}" for r in rows))
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", default=["data/fixture/*.jsonl"],
                        help="JSON-lines glob(s), .gz allowed (default data/fixture/*.jsonl)")
    parser.add_argument("--repeat", type=int, help="copies of each input file (default 4)")
    parser.add_argument("--max-workers", type=int, help="pipeline rows for 1..N workers "
                        f"(default os.cpu_count(), here {os.cpu_count()})")
    parser.add_argument("--tokenizer", default="data/tokenizers/gpt-neox-20b")
    parser.add_argument("--quick", action="store_true", help="1 repeat, max 2 workers")
    args = parser.parse_args()
    repeat = args.repeat if args.repeat is not None else 1 if args.quick else 4
    max_workers = (args.max_workers if args.max_workers is not None
                   else 2 if args.quick else os.cpu_count() or 1)
    if repeat < 1 or max_workers < 1:
        parser.error("--repeat and --max-workers must be >= 1")
    # library "huggingface": megatron-core's HuggingFaceTokenizer (AutoTokenizer underneath),
    # loaded from the local directory, so offline; its tokenize() is one document per call.
    transformers_logging.set_verbosity_error()   # documents over model_max_length are fine here
    megatron_tokenizer = MegatronTokenizer.from_pretrained(
        args.tokenizer, metadata_path={"library": "huggingface", "model_type": "gpt"})
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as inputs:
        files = copy_inputs(args.input, repeat, Path(inputs))
        size = sum(os.path.getsize(path) for path in files)
        print(f"input: {len(files)} files ({repeat} x {args.input}), {size / 1e6:.1f} MB on disk")
        print(f"tokenizer: {args.tokenizer}; baseline through megatron-core's "
              f"{type(megatron_tokenizer).__name__} (library huggingface); "
              f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}; {os.cpu_count()} CPUs")
        rows = [baseline_row(files, megatron_tokenizer)]
        rows += [pipeline_row(Path(inputs), tokenizer, workers)
                 for workers in range(1, max_workers + 1)]
    print(f"documents: {rows[0].documents:,}")
    print_table(rows)
    return 0 if check(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
