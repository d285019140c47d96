"""Tokenize sources into Megatron .bin/.idx: a corpus of subsets (parallel, resumable, with a
manifest), a single prefix, or whatever a config's blend lacks.

    # a corpus: one shard per input file, N worker processes, merged per subset, manifest.json
    .venv/bin/python scripts/prepare_data.py --subset 'books=data/raw/corpus/books/*.jsonl.gz' \
        --subset 'docs=data/raw/corpus/docs/*.jsonl.gz' --output-dir data/built/corpus --workers 2
    # Hugging Face datasets stream as hf:NAME[:CONFIG[:SPLIT]], e.g. one RedPajama subset:
    #   --subset 'arxiv=hf:togethercomputer/RedPajama-Data-1T:arxiv'
    .venv/bin/python scripts/prepare_data.py --input 'data/fixture/*.jsonl' \
        --output-prefix data/built/fixture
    .venv/bin/python scripts/prepare_data.py --config configs/tiny.yaml [data.tokenizer=...]
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from ultramem_megatron.config import ConfigError, DataConfig, load_config
from ultramem_megatron.data.pipeline import describe, run_pipeline
from ultramem_megatron.data.prepare import DataPrepError, ensure_prepared, prepare_jsonl
from ultramem_megatron.data.tokenizer import TokenizerError, load_tokenizer
from ultramem_megatron.data.writer import WriteOptions


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
    parser.add_argument("--output-dir", help="where --subset output goes")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-merge", action="store_true", help="keep per-shard files only")
    parser.add_argument("--input", nargs="+", help="file(s) or glob pattern(s) for one prefix")
    parser.add_argument("--output-prefix", help="the prefix to write (PREFIX.bin, PREFIX.idx)")
    parser.add_argument("--tokenizer", default=DataConfig.tokenizer,
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
    options = WriteOptions(args.text_key, args.max_document_tokens, args.long_documents)
    try:
        if args.config:
            config = load_config(args.config, args.overrides)
            prepared = ensure_prepared(config.data, load_tokenizer(config.data.tokenizer))
            if not prepared:
                print("every data.blend prefix is already prepared")
        elif args.subset and args.output_dir:
            manifest = run_pipeline(parse_subsets(args.subset), args.output_dir,
                                    load_tokenizer(args.tokenizer), workers=args.workers,
                                    options=options, merge=not args.no_merge)
            print(describe(manifest))
        elif args.input and args.output_prefix:
            stats = prepare_jsonl(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                                  options=options)
            print(stats.summary())
        else:
            parser.error("give --subset and --output-dir, --input and --output-prefix, or --config")
    except (ConfigError, DataPrepError, TokenizerError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
