"""Export a megatron checkpoint (any parallel layout, any family) to a Hugging Face directory,
or import such a directory back into a megatron checkpoint.

    # checkpoint -> HF: config.json (auto_map), modeling code, safetensors, tokenizer
    .venv/bin/python scripts/export_hf.py --checkpoint runs/tiny --out exports/tiny
    # HF -> a model-only megatron checkpoint; continue training with train.init_from=DIR
    .venv/bin/python scripts/export_hf.py --import-hf exports/tiny --out runs/tiny-init

--checkpoint takes a step directory, a run directory or its checkpoints/ (the newest step).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from ultramem_megatron.export.convert import ConversionError  # noqa: E402 (light: no megatron)
from ultramem_megatron.export.hf_dir import DTYPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="megatron checkpoint to export")
    source.add_argument("--import-hf", metavar="HF_DIR", help="export directory to import back")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--tokenizer", help="tokenizer to ship (default: the run's "
                                            "data.tokenizer); '' ships none")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the exported floating tensors (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="safetensors shard size, e.g. 5GB or 500MB (default: %(default)s)")
    args = parser.parse_args(argv)

    from ultramem_megatron.export import export_checkpoint, import_hf
    from ultramem_megatron.training.checkpoint import CheckpointError

    try:
        if args.import_hf:
            out = import_hf(args.import_hf, args.out)
            print(f"wrote {out}: start a run from it with train.init_from={out}")
        else:
            out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer,
                                    dtype=args.dtype, max_shard_size=args.max_shard_size)
            files = sorted(p.name for p in Path(out).iterdir())
            print(f"wrote {out}: {', '.join(files)}")
    except (ConversionError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
