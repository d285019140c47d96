"""GPU acceptance: bf16 steps of every family (Transformer Engine and local layers) and an HF export
of a GPU-trained checkpoint with logits parity; prints markdown tables for docs/benchmarks.md.

    python scripts/gpu_train_check.py --out /tmp/gpu_train [--steps 20] [--impls auto,local]

Run by scripts/gpu_check.sh on a lent GPU; it also runs on CPU (slowly, fp32 unless --precision).
Exit status 1 when a run fails, a loss is not finite or does not fall, or parity is off.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus"]
PLACEMENT = {"ultramem_v2": ["model.memory_spans=all"]}   # a memory in every block
# The tiny config on the committed fixture (no corpus download on a machine without network).
RUN = ["model.seq_length=256", "train.micro_batch_size=8", "train.global_batch_size=16",
       "train.log_interval=1", "data.corpus=null", "data.subset_weights={}",
       'data.blend=[{prefix: data/built/fixture, source: "data/fixture/*.jsonl"}]']
PARITY_TOLERANCE = 1e-4


def te_available() -> bool:
    sys.path.insert(0, str(ROOT))
    from ultramem_megatron.megatron_compat import transformer_engine_available

    return transformer_engine_available()


def train(run_dir: Path, family: str, impl: str, steps: int, precision: str) -> dict:
    """One train.py run; -> a table row (or the failure)."""
    command = [sys.executable, "train.py", "--config", "configs/tiny.yaml", *RUN,
               f"model.family={family}", *PLACEMENT.get(family, []),
               f"train.transformer_impl={impl}",
               f"train.precision={precision}", f"train.max_steps={steps}",
               f"train.eval_interval={steps}", f"train.save_interval={steps}",
               f"train.run_dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    row = {"family": family, "impl": impl, "rc": result.returncode}
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["?"]
        row["error"] = next((line for line in reversed(lines) if "rror" in line), lines[-1])
        return row
    header = [line for line in result.stdout.splitlines() if " model, " in line]
    row["setup"] = header[0] if header else ""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    late = records[len(records) // 2:]
    row.update(first=records[0]["loss"], last=records[-1]["loss"],
               val=records[-1].get("val_loss"),
               tokens_per_s=sorted(r["tokens_per_s"] for r in late)[len(late) // 2],
               step_time_s=sorted(r.get("step_time_s") or math.nan for r in late)[len(late) // 2],
               max_memory_gib=(records[-1].get("max_memory_gib")),
               mfu=records[-1].get("mfu"))
    row["ok"] = all(math.isfinite(r["loss"]) for r in records) and row["last"] < row["first"]
    return row


PARITY = r"""
import sys, torch
from ultramem_megatron.export.checkpoints import single_process_model
from ultramem_megatron.training.checkpoint import load_model_weights, read_run_config, resolve_checkpoint
from transformers import AutoModelForCausalLM
path = resolve_checkpoint(sys.argv[1])
model = single_process_model(read_run_config(path))
load_model_weights(path, model)
model.eval()
hf = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True, local_files_only=True).eval()
torch.manual_seed(1)
tokens = torch.randint(0, 50000, (2, 64))
with torch.no_grad():
    reference = model(tokens, torch.arange(64).expand(2, -1), None)
    logits = hf(tokens, use_cache=False).logits
print((logits - reference).abs().max().item())
"""


def parity(run_dir: Path, export_dir: Path) -> float:
    """Export the GPU-trained checkpoint and compare HF logits with megatron's, both on the CPU
    in fp32 (where exports are usually made; the CPU path is the reference)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "scripts/export_hf.py", "--checkpoint", str(run_dir),
                    "--out", str(export_dir)], cwd=ROOT, env=env, check=True, timeout=300,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-c", PARITY, str(run_dir), str(export_dir)],
                            cwd=ROOT, env=env, check=True, timeout=300, capture_output=True,
                            text=True)
    return float(result.stdout.strip().splitlines()[-1])


def _cell(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--impls", default="auto,local",
                        help="train.transformer_impl values (auto = TE where it imports)")
    args = parser.parse_args()
    impls = args.impls.split(",")
    if not te_available():
        impls = [impl for impl in impls if impl != "auto"] or ["local"]
        print("Transformer Engine does not import: local layers only")
    rows = [train(args.out / f"{family}-{impl}", family, impl, args.steps, args.precision)
            for impl in impls for family in FAMILIES]
    print(f"\n{args.steps} steps, {args.precision}, tiny config (seq 256, 16 sequences a step)\n")
    print("| family | layers | first loss | last loss | val loss | tokens/s | step s | "
          "max mem GiB | MFU | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for row in rows:
        if row["rc"] != 0:
            failed = True
            print(f"| {row['family']} | {row['impl']} | failed: {row['error'][:80]} |")
            continue
        failed |= not row["ok"]
        print(f"| {row['family']} | {row['impl']} | {_cell(row['first'])} | {_cell(row['last'])} "
              f"| {_cell(row['val'])} | {_cell(row['tokens_per_s'], 5)} | "
              f"{_cell(row['step_time_s'], 3)} | {_cell(row['max_memory_gib'], 3)} | "
              f"{_cell(row['mfu'], 3)} | {'yes' if row['ok'] else 'NO'} |")
    for row in rows:
        if row.get("setup"):
            print(f"  {row['family']}/{row['impl']}: {row['setup']}")
    ultramem = next((r for r in rows if r["family"] == "ultramem" and r["rc"] == 0), None)
    if ultramem is not None:
        run_dir = args.out / f"ultramem-{ultramem['impl']}"
        try:
            diff = parity(run_dir, args.out / "ultramem-hf")
        except subprocess.CalledProcessError as err:
            print(f"\nexport / parity failed: {(err.stderr or '')[-2000:]}")
            return 1
        print(f"\nHF export of the {ultramem['impl']}-layer UltraMem checkpoint: max |logits - "
              f"megatron| = {diff:.3g} (CPU fp32; tolerance {PARITY_TOLERANCE})")
        failed |= not diff < PARITY_TOLERANCE
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
