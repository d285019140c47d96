"""Turn JSON-lines text into a Megatron .bin/.idx prefix, or prepare what a config's blend lacks.

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
from ultramem_megatron.data.prepare import DataPrepError, ensure_prepared, prepare_jsonl
from ultramem_megatron.data.tokenizer import TokenizerError, load_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", help="JSON-lines file(s) or glob pattern(s)")
    parser.add_argument("--output-prefix", help="the prefix to write (PREFIX.bin, PREFIX.idx)")
    parser.add_argument("--tokenizer", default=DataConfig.tokenizer,
                        help="HF tokenizer name or local path (default: %(default)s)")
    parser.add_argument("--text-key", default="text", help="JSON field holding the document text")
    parser.add_argument("--config", help="a run config: prepare its missing data.blend entries")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.tokenizer=X")
    args = parser.parse_args()
    if args.overrides and not args.config:
        parser.error("config overrides need --config")
    try:
        if args.config:
            config = load_config(args.config, args.overrides)
            prepared = ensure_prepared(config.data, load_tokenizer(config.data.tokenizer))
            if not prepared:
                print("every data.blend prefix is already prepared")
        elif args.input and args.output_prefix:
            stats = prepare_jsonl(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                                  text_key=args.text_key)
            print(stats.summary())
        else:
            parser.error("give --input and --output-prefix, or --config")
    except (ConfigError, DataPrepError, TokenizerError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
