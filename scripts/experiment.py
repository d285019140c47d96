#!/usr/bin/env python
"""Run a named experiment suite (resumable) and write its table and plot into docs/quality.md.

    python scripts/experiment.py cpu-small                 # all families, 2 seeds (~60 min, 2 cores)
    python scripts/experiment.py ablation --jobs 2         # the paper's ablation ladder
    python scripts/experiment.py cpu-small --report-only   # re-read the runs, rewrite the doc
    python scripts/experiment.py gpu-151m --dry-run        # print the commands (GPU recipes)
    python scripts/experiment.py cpu-small --downstream 200  # + lm-eval on the exported models

A run whose metrics.jsonl reaches train.max_steps with a validation loss is done and skipped; an
interrupted one resumes from its last checkpoint (train.py resumes by itself). Runs go to
RUNS_DIR/SUITE/RUN; extra `key=value` overrides apply to every run (e.g. train.max_steps=50).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ultramem_megatron.config import ConfigError  # noqa: E402
from ultramem_megatron.experiments.downstream import (continuation_docs,  # noqa: E402
                                                      export, heldout_sequences, lm_eval,
                                                      write_task)
from ultramem_megatron.experiments.reference import memory_shape, run_reference  # noqa: E402
from ultramem_megatron.experiments.report import (load_results, plot,  # noqa: E402
                                                  read_metrics, section, write_section)
from ultramem_megatron.experiments.suites import SUITES, Run  # noqa: E402


def command(run: Run, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--config", run.config, *run.overrides, *extra,
            f"train.run_dir={run_dir}"]


def claim(run_dir: Path) -> bool:
    """Take RUN/.lock for this process, unless a live process holds it (another experiment.py
    on the same suite): two launches share the work instead of training one run twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    try:
        holder = int(lock.read_text())
        os.kill(holder, 0)
        if holder != os.getpid():
            return False
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    lock.write_text(str(os.getpid()))
    return True


def run_all(pending: list[tuple[Run, list[str], Path]], jobs: int) -> list[str]:
    """Run the commands, `jobs` at a time; returns the names of the runs that failed. A run
    another launch holds, or finished meanwhile, is skipped."""
    queue, active, failed = list(pending), [], []
    while queue or active:
        while queue and len(active) < jobs:
            run, cmd, log = queue.pop(0)
            metrics = read_metrics(log.parent / "metrics.jsonl")
            max_steps = run.run_config().train.max_steps
            if any(r["step"] == max_steps and r.get("val_loss") is not None for r in metrics) \
                    or not claim(log.parent):
                print(f"[skip] {run.name}: finished or running elsewhere", flush=True)
                continue
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[start] {run.name}: {shlex.join(cmd[1:])}", flush=True)
            handle = open(log, "a")
            active.append((run, subprocess.Popen(cmd, cwd=ROOT, stdout=handle,
                                                 stderr=subprocess.STDOUT), handle, time.time(),
                           log))
        time.sleep(2)
        for item in list(active):
            run, process, handle, start, log = item
            if process.poll() is None:
                continue
            handle.close()
            (log.parent / ".lock").unlink(missing_ok=True)
            active.remove(item)
            status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
            print(f"[{status}] {run.name} in {time.time() - start:.0f} s", flush=True)
            if process.returncode != 0:
                failed.append(run.name)
    return failed


def run_downstream(results, runs_dir: Path, examples: int) -> None:
    """Export every finished run and score it on one held-out continuation task (cached in
    RUN/downstream.json, so a rerun only scores what is new)."""
    done = [r for r in results if r.done]
    if not done:
        return
    sequences, tokenizer = heldout_sequences(done[0].run.run_config(), 4 * examples)
    tasks = write_task(continuation_docs(sequences, tokenizer.detokenize, examples),
                       runs_dir / "downstream_task")
    for result in done:
        run_dir = runs_dir / result.run.name
        scores = run_dir / "downstream.json"
        if scores.is_file() and json.loads(scores.read_text()).get("examples") == examples:
            continue
        export(run_dir, run_dir / "hf", ROOT)
        metrics = lm_eval(run_dir / "hf", tasks, run_dir / "lm_eval", ROOT)
        scores.write_text(json.dumps({"examples": examples, **metrics}))
        print(f"[downstream] {result.run.name}: acc {metrics['acc']:.3f}", flush=True)


def references(results, runs_dir: Path) -> dict:
    """family -> ((rows, lookups per token), {order: stats}) of the n-gram-keyed references,
    from the first run of each memory family (cached in RUNS_DIR/SUITE/reference.json)."""
    cache_path = runs_dir / "reference.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    found = {}
    for result in results:
        run = result.run.run_config()
        family, shape = run.model.family, memory_shape(run.model)
        if shape is None or family in found:
            continue
        key = f"{family}:{shape}:{run.train.seed}:{run.train.max_steps}:{run.train.log_interval}"
        if key not in cache:
            cache[key] = run_reference(run)
        found[family] = (shape, cache[key])
    if found:
        runs_dir.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "experiments")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "quality.md")
    parser.add_argument("--only", default="", help="run only runs whose name contains this")
    parser.add_argument("--report-only", action="store_true", help="do not train; rewrite the doc")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--downstream", type=int, default=0, metavar="N",
                        help="export each finished run and score it with lm-eval on N held-out "
                             "continuation items (docs/quality.md)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key.sub=value: {bad}")

    try:
        suite = SUITES[args.suite]()
        runs = [r for r in suite.runs if args.only in r.name]
        for run in runs:   # every config is valid before anything trains
            Run(run.name, run.label, run.seed, run.config,
                (*run.overrides, *args.overrides)).run_config()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.overrides:
        suite = type(suite)(suite.name, tuple(
            Run(r.name, r.label, r.seed, r.config, (*r.overrides, *args.overrides))
            for r in suite.runs), suite.description, suite.notes)
        runs = [r for r in suite.runs if args.only in r.name]
    runs_dir = args.runs_dir / args.suite
    results = {r.run.name: r for r in load_results(suite, runs_dir)}
    pending = [(run, command(run, runs_dir / run.name, []), runs_dir / run.name / "train.log")
               for run in runs if not results[run.name].done]
    if args.dry_run:
        for run, cmd, _ in pending:
            print(shlex.join(cmd[1:]))
        return 0
    failed = [] if args.report_only else run_all(pending, args.jobs)

    results = load_results(suite, runs_dir)
    if args.downstream:
        run_downstream(results, runs_dir, args.downstream)
    image = args.doc.parent / "img" / f"quality-{args.suite}.png"
    plot(results, image, f"{args.suite}: validation loss")
    invocation = shlex.join(["python", "scripts/experiment.py", args.suite, *args.overrides]
                            + (["--downstream", str(args.downstream)] if args.downstream else []))
    write_section(args.doc, args.suite,
                  section(suite, results, str(image.relative_to(args.doc.parent)), invocation,
                          runs_dir, references(results, runs_dir)))
    print(f"wrote {args.doc} and {image}")
    if failed:
        print(f"failed runs (logs in {runs_dir}/<run>/train.log): {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
