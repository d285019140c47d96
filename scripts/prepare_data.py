"""Tokenize sources into Megatron .bin/.idx: a corpus of subsets (parallel, resumable, with a
manifest), a single prefix, or whatever a config's blend lacks.

    # a corpus: one shard per input file, N worker processes, merged per subset, manifest.json
    .venv/bin/python scripts/prepare_data.py --subset 'books=data/raw/corpus/books/*.jsonl.gz' \
        --subset 'docs=data/raw/corpus/docs/*.jsonl.gz' --output-dir data/built/corpus --workers 2
    # Hugging Face datasets stream as hf:NAME[:CONFIG[:SPLIT]], e.g. one RedPajama subset:
    #   --subset 'arxiv=hf:togethercomputer/RedPajama-Data-1T:arxiv'
    # RedPajama-Data-1T as downloaded (a folder per subset), a 10B-token proportional sample:
    .venv/bin/python scripts/prepare_data.py --redpajama /data/redpajama-1T \
        --output-dir /data/built/rp-10b --max-tokens 10e9 --workers 64
    # the same on a Slurm cluster: launch/prepare_data.sbatch (docs/data.md)
    .venv/bin/python scripts/prepare_data.py --input 'data/fixture/*.jsonl' \
        --output-prefix data/built/fixture
    .venv/bin/python scripts/prepare_data.py --config configs/tiny.yaml [data.tokenizer=...]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# torch / megatron-core / transformers load only for --config (about 5 s of start-up otherwise)
from ultramem_megatron.data.pipeline import Interrupted, describe, run_pipeline
from ultramem_megatron.data.sources import DataPrepError, layout_subsets
from ultramem_megatron.data.tokenizer import TokenizerError, load_tokenizer
from ultramem_megatron.data.writer import WriteOptions

DEFAULT_TOKENIZER = "data/tokenizers/gpt-neox-20b"   # config.DataConfig.tokenizer's default


def parse_subsets(items: list[str]) -> dict[str, list[str]]:
    subsets: dict[str, list[str]] = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise DataPrepError(f"--subset {item!r}: expected NAME=GLOB or NAME=hf:DATASET[:CONFIG]")
        subsets.setdefault(name, []).append(pattern)
    return subsets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", action="append", default=[], metavar="NAME=SOURCE",
                        help="a subset's files (glob) or hf: dataset; repeatable")
    parser.add_argument("--redpajama", metavar="DIR",
                        help="every subset folder of a RedPajama-Data-1T download (one subset "
                             "per folder, *.jsonl / *.jsonl.zst at any depth)")
    parser.add_argument("--output-dir", help="where --subset / --redpajama output goes")
    parser.add_argument("--workers", type=int,
                        default=int(os.environ.get("SLURM_CPUS_PER_TASK", 1)),
                        help="worker processes (default $SLURM_CPUS_PER_TASK or 1)")
    parser.add_argument("--sample", type=float, metavar="RATE",
                        help="keep this fraction of every subset's documents (chosen by a hash "
                             "of the text: the same for any split, worker or task count)")
    parser.add_argument("--max-tokens", type=float, metavar="N",
                        help="a proportional sample of about N tokens: the --sample rate is "
                             "estimated from a probe of each subset (recorded in plan.json)")
    parser.add_argument("--no-merge", action="store_true", help="keep per-shard files only")
    parser.add_argument("--split-size", type=float, metavar="MIB",
                        help="cut plain JSON-lines files into byte ranges of this many MiB (and "
                             "parquet into row-group runs); default: as this output directory "
                             "was planned, else about 16 ranges per worker, 1-256 MiB")
    parser.add_argument("--task-index", type=int, default=int(os.environ.get(
                            "SLURM_ARRAY_TASK_ID", 0)),
                        help="run shards i, i+n, ... only (default $SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--task-count", type=int, default=1,
                        help="n tasks share the shards (a Slurm array); no merge, no manifest")
    parser.add_argument("--merge-only", action="store_true",
                        help="tokenize nothing: merge the shards the tasks wrote, write the manifest")
    parser.add_argument("--check-arguments", action="store_true",
                        help="check the arguments and exit (launch/prepare_data.sbatch)")
    parser.add_argument("--input", nargs="+", help="file(s) or glob pattern(s) for one prefix")
    parser.add_argument("--output-prefix", help="the prefix to write (PREFIX.bin, PREFIX.idx)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="HF tokenizer name or local path (default: %(default)s)")
    parser.add_argument("--text-key", default="text", help="the record field holding the text")
    parser.add_argument("--max-document-tokens", type=int, default=0,
                        help="split or drop longer documents (EOD included; 0 = no limit)")
    parser.add_argument("--long-documents", choices=["split", "drop"], default="split")
    parser.add_argument("--config", help="a run config: prepare its missing data.blend entries")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.tokenizer=X")
    args = parser.parse_args()
    if args.overrides and not args.config:
        parser.error("config overrides need --config")
    if args.max_document_tokens < 0 or args.workers < 1:
        parser.error("--max-document-tokens must be >= 0 and --workers >= 1")
    if args.task_count < 1 or not 0 <= args.task_index < args.task_count:
        parser.error(f"--task-index {args.task_index} must be in [0, --task-count "
                     f"{args.task_count})")
    if args.split_size is not None and args.split_size <= 0:
        parser.error("--split-size must be > 0 MiB")
    if "SLURM_ARRAY_TASK_ID" in os.environ and args.task_count == 1 and not args.merge_only:
        parser.error(f"running as Slurm array task {os.environ['SLURM_ARRAY_TASK_ID']} without "
                     "--task-count: give the array's size (the same in every task)")
    if args.sample is not None and args.max_tokens is not None:
        parser.error("give --sample or --max-tokens, not both")
    if args.sample is not None and not 0 < args.sample <= 1:
        parser.error(f"--sample {args.sample}: must be in (0, 1]")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens}: must be >= 1")
    if args.sample is not None or args.max_tokens is not None:
        if not (args.subset or args.redpajama):
            parser.error("--sample / --max-tokens apply to --subset / --redpajama runs")
    if not (args.config or (args.subset or args.redpajama) and args.output_dir
            or args.input and args.output_prefix):
        parser.error("give --subset / --redpajama and --output-dir, --input and "
                     "--output-prefix, or --config")
    if args.check_arguments:
        return 0
    options = WriteOptions(args.text_key, args.max_document_tokens, args.long_documents,
                           args.sample or 1.0)
    try:
        if args.config:
            from ultramem_megatron.config import ConfigError, load_config
            from ultramem_megatron.data.prepare import ensure_prepared

            try:
                config = load_config(args.config, args.overrides)
            except ConfigError as err:
                raise DataPrepError(str(err)) from None
            prepared = ensure_prepared(config.data, load_tokenizer(config.data.tokenizer))
            if not prepared:
                print("every data.blend prefix is already prepared")
        elif (args.subset or args.redpajama) and args.output_dir:
            subsets = parse_subsets(args.subset)
            if args.redpajama:
                found, ignored = layout_subsets(args.redpajama)
                overlap = sorted(set(found) & set(subsets))
                if overlap:
                    raise DataPrepError(f"subset(s) {', '.join(overlap)} given by both --subset "
                                        f"and --redpajama {args.redpajama}")
                subsets.update(found)
                if ignored:
                    print(f"--redpajama: {len(ignored)} file(s) of other formats left out, "
                          f"e.g. {ignored[0]}", file=sys.stderr)
            split = None if args.split_size is None else int(args.split_size * 2**20)
            max_tokens = None if args.max_tokens is None else int(args.max_tokens)
            manifest = run_pipeline(subsets, args.output_dir,
                                    load_tokenizer(args.tokenizer), workers=args.workers,
                                    options=options, merge=not args.no_merge, split_bytes=split,
                                    max_tokens=max_tokens, task=(args.task_index, args.task_count),
                                    merge_only=args.merge_only)
            print(describe(manifest) if manifest else
                  f"task {args.task_index} of {args.task_count}: its shards are written")
        elif args.input and args.output_prefix:
            from ultramem_megatron.data.prepare import prepare_jsonl

            stats = prepare_jsonl(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                                  options=options)
            print(stats.summary())
    except Interrupted as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 130
    except (DataPrepError, TokenizerError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
