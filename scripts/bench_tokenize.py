"""Tokenization end to end, side by side: our prepare_data.py vs Megatron-LM's preprocess_data.py
vs the tokenizer's floor, at 1..N workers, on one file and on the same text in many files.

    .venv/bin/python scripts/bench_tokenize.py --input 'data/raw/corpus/*/*.jsonl.gz' \
        --megatron-lm /path/to/Megatron-LM --runs 3
    .venv/bin/python scripts/bench_tokenize.py --quick          # the fixture, 1 run, no baseline

The input's records are written once as plain JSON lines: one file, and --files files that
together hold the same records in the same order. Every row is a fresh process timed wall clock
(start-up, tokenizer load and merge included), into a fresh output directory:
- ours: scripts/prepare_data.py --workers N (one file is cut into byte ranges);
- megatron-lm (with --megatron-lm PATH): PATH/tools/preprocess_data.py --workers N
  --tokenizer-type HuggingFaceTokenizer --append-eod, once per file for many files;
- floor: the texts already in memory, `tokenizers` encode_batch with N threads, the encode only
  (the issue's floor: what a transformers fast tokenizer's batch call runs);
- fast-floor: the same with encode_batch_fast (ids without offsets, which is what we call; the
  stricter floor; encode_batch on tokenizers versions without it).
N workers get N cores: a 1-worker row runs with RAYON_NUM_THREADS=1 (our single process would
otherwise encode its batches on every core; Megatron-LM encodes one document at a time), and
with N > 1 each of our workers takes one thread.
The rows take turns run by run, and a ratio is the median of the runs' ratios, so a drift in
the machine's speed falls on both sides of it. Prints median and spread (min-max) per row, the
ratios of ours to the others, our start-up (a one-record run), and whether every .bin and .idx is
byte-identical. Exits 1 if they differ.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = """
import json, os, sys, time
from tokenizers import Tokenizer
texts = [json.loads(line)["text"] for path in sys.argv[3:] for line in open(path)]
tokenizer = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
encode = getattr(tokenizer, sys.argv[2], tokenizer.encode_batch)
start = time.perf_counter()
encode(texts, add_special_tokens=False)
print(time.perf_counter() - start)
"""


def read_records(patterns: list[str]) -> list[str]:
    """JSON lines with a non-blank "text" (the rows differ on what they skip otherwise)."""
    lines = []
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern)}):
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as src:
            for line in src:
                record = json.loads(line) if line.strip() else None
                if isinstance(record, dict) and isinstance(record.get("text"), str) \
                        and record["text"].strip():
                    lines.append(json.dumps({"text": record["text"]}) + "\n")
    if not lines:
        sys.exit(f"no usable record in {patterns}")
    return lines


def digest(prefix: str) -> str:
    return "".join(hashlib.sha256(Path(prefix + s).read_bytes()).hexdigest()[:12]
                   for s in (".bin", ".idx"))


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return seconds


def ours(files: list[str], workers: int, out: str, tokenizer: str, env: dict) -> tuple[float, str]:
    if workers == 1:
        env = {**env, "RAYON_NUM_THREADS": "1"}
    seconds = timed([sys.executable, str(REPO / "scripts/prepare_data.py"), "--tokenizer",
                     tokenizer, "--workers", str(workers), "--output-dir", out,
                     *[f"--subset=all={path}" for path in files]], env)
    return seconds, digest(f"{out}/all")


def megatron(files: list[str], workers: int, out: str, tokenizer: str, root: str,
             env: dict) -> tuple[float, str]:
    seconds, prefixes = 0.0, []
    for number, path in enumerate(files):
        prefix = f"{out}/f{number:03d}"
        seconds += timed([sys.executable, f"{root}/tools/preprocess_data.py", "--input", path,
                          "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", tokenizer, "--append-eod", "--json-keys", "text",
                          "--workers", str(workers)], {**env, "PYTHONPATH": root})
        prefixes.append(f"{prefix}_text_document")
    if len(prefixes) == 1:
        return seconds, digest(prefixes[0])
    sys.path.insert(0, str(REPO))
    from ultramem_megatron.data.indexed import merge

    merge(prefixes, f"{out}/all.bin", f"{out}/all.idx")   # not timed: a byte check only
    return seconds, digest(f"{out}/all")


def floor(files: list[str], threads: int, tokenizer: str, env: dict,
          method: str) -> tuple[float, str]:
    result = subprocess.run([sys.executable, "-c", FLOOR, tokenizer, method, *files],
                            capture_output=True, text=True, check=True,
                            env={**env, "RAYON_NUM_THREADS": str(threads)})
    return float(result.stdout), ""


def paired_ratio(ours_times: list[float], other_times: list[float]) -> float:
    """The median over runs of ours / other, each run's pair timed back to back."""
    return statistics.median(a / b for a, b in zip(ours_times, other_times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", default=["data/fixture/*.jsonl"])
    parser.add_argument("--files", type=int, default=8, help="files of the many-file layout")
    parser.add_argument("--workers", type=int, nargs="+",
                        help="worker counts to run (default: 1 to the number of CPUs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megatron-lm", help="a Megatron-LM source tree (tools/preprocess_data.py)")
    parser.add_argument("--tokenizer", default=str(REPO / "data/tokenizers/gpt-neox-20b"))
    parser.add_argument("--quick", action="store_true", help="1 run, up to 2 workers")
    args = parser.parse_args()
    counts = args.workers or list(range(1, (os.cpu_count() or 1) + 1))
    runs, counts = (1, [n for n in counts if n <= 2]) if args.quick else (args.runs, counts)
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    lines = read_records(args.input)
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {"one file": [f"{tmp}/one.jsonl"],
                   f"{args.files} files": [f"{tmp}/many{i:03d}.jsonl" for i in range(args.files)]}
        Path(layouts["one file"][0]).write_text("".join(lines))
        bounds = [len(lines) * i // args.files for i in range(args.files + 1)]
        for number, path in enumerate(layouts[f"{args.files} files"]):   # the one file, cut
            Path(path).write_text("".join(lines[bounds[number]:bounds[number + 1]]))
        Path(f"{tmp}/tiny.jsonl").write_text(lines[0])
        startup = [ours([f"{tmp}/tiny.jsonl"], 1, f"{tmp}/s{i}", args.tokenizer, env)[0]
                   for i in range(runs)]
        size = sum(len(line.encode()) for line in lines)
        print(f"input: {len(lines):,} records, {size / 1e6:.1f} MB of JSON lines; "
              f"{os.cpu_count()} CPUs; {runs} run(s) per row, median [min-max] seconds")
        print(f"our start-up (a one-record run, end to end): {statistics.median(startup):.2f} s "
              f"[{min(startup):.2f}-{max(startup):.2f}]")
        digests, counter = set(), 0
        for layout, files in layouts.items():
            for workers in counts:
                rows = {"ours": lambda out: ours(files, workers, out, args.tokenizer, env),
                        "floor": lambda out: floor(files, workers, args.tokenizer, env,
                                                   "encode_batch"),
                        "fast-floor": lambda out: floor(files, workers, args.tokenizer, env,
                                                        "encode_batch_fast")}
                if args.megatron_lm:
                    rows["megatron-lm"] = lambda out: megatron(files, workers, out,
                                                               args.tokenizer, args.megatron_lm, env)
                times: dict[str, list[float]] = {name: [] for name in rows}
                for _ in range(runs):   # the rows take turns, so drift in the machine's speed
                    for name, run in rows.items():   # falls on each of them alike
                        counter += 1
                        out = f"{tmp}/out{counter}"
                        os.makedirs(out)
                        seconds, bytes_digest = run(out)
                        times[name].append(seconds)
                        if bytes_digest:
                            digests.add(bytes_digest)
                for name in rows:
                    print(f"{layout:>9} | {name:<11} | {workers} worker(s) | "
                          f"{statistics.median(times[name]):7.2f} s "
                          f"[{min(times[name]):.2f}-{max(times[name]):.2f}]")
                print(f"{layout:>9} | {workers} worker(s): " + ", ".join(
                    f"ours/{name} {paired_ratio(times['ours'], times[name]):.2f}x"
                    for name in rows if name != "ours"))
    same = len(digests) == 1
    print(f"every .bin and .idx byte-identical (ours at every layout and worker count"
          f"{', megatron-lm' if args.megatron_lm else ''}): {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
