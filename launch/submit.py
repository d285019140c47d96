"""Submit a training run to Slurm: validate the config, snapshot code and config into the run
directory, then `sbatch launch/slurm.sbatch` with the job's shape.

    .venv/bin/python launch/submit.py --config configs/ultramem_151m.yaml --nodes 4 \\
        --gpus-per-node 8 --time 24:00:00 --partition gpu --account myproj [section.key=value ...]
    .venv/bin/python launch/submit.py --config configs/tiny.yaml --tasks-per-node 2 --dry-run

The job runs the snapshot (RUN_DIR/submissions/TIMESTAMP/code), so editing the checkout later
cannot change a queued or requeued job; relative data paths resolve from the directory you submit
from. Logs: RUN_DIR/logs/JOBNAME-JOBID.out (requeued runs append to the same file).

The job never tokenizes: data the config lacks is refused with the command that prepares it, or
prepared here, before sbatch, with --prepare-data.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ultramem_megatron.config import ConfigError, load_config, to_dict  # noqa: E402

CODE = ["train.py", "pyproject.toml", "launch", "ultramem_megatron", "configs"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks (gloo)")
    parser.add_argument("--tasks-per-node", type=int,
                        help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, help="also sets OMP_NUM_THREADS")
    parser.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--job-name", help="default: the run directory's name")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="warn the job this long before the time limit (checkpoint + requeue)")
    parser.add_argument("--sbatch-arg", action="append", default=[],
                        help="extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter on the compute nodes (default: this one)")
    parser.add_argument("--prepare-data", action="store_true",
                        help="tokenize the config's missing data here before submitting "
                             "(default: refuse, printing the command that does it)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="warn when the planned per-GPU memory exceeds this (default 80)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command only")
    args = parser.parse_args(argv)
    for name in ("nodes", "signal_seconds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpus_per_node < 0:
        parser.error("--gpus-per-node must be >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1
    if args.tasks_per_node < 1:
        parser.error("--tasks-per-node must be >= 1")
    return args


def check_layout(run, world_size: int, gpus_per_node: int, tasks_per_node: int) -> None:
    """Refuse a job shape the config cannot run on, before anything is queued."""
    error = run.parallel.world_size_error(world_size)
    if error:
        raise ConfigError(f"{error} (nodes x tasks per node)")
    if gpus_per_node and tasks_per_node != gpus_per_node:
        raise ConfigError(f"--tasks-per-node ({tasks_per_node}) must equal --gpus-per-node "
                          f"({gpus_per_node}): one rank per GPU")


def warn_memory(run, world_size: int, gpu_memory_gib: float) -> None:
    """Print a WARNING to stderr when scripts/plan_memory.py's per-GPU total for this job's layout
    exceeds gpu_memory_gib (a warning only: the plan is an estimate)."""
    from ultramem_megatron.training.memory_plan import (GIB, LayoutError, format_plan,
                                                        layout_from_parallel, plan_memory)
    parallel = run.parallel
    try:
        plan = plan_memory(run.model, layout_from_parallel(parallel, world_size),
                           micro_batch=run.train.micro_batch_size,
                           recompute=parallel.recompute_granularity,
                           sequence_parallel=parallel.sequence_parallel,
                           distributed_optimizer=parallel.use_distributed_optimizer,
                           global_batch=run.train.global_batch_size,
                           gpu_memory_gib=gpu_memory_gib)
    except LayoutError as err:
        print(f"WARNING: no memory plan for this layout: {err}", file=sys.stderr)
        return
    if not plan.fits:
        print(f"WARNING: planned per-GPU memory {plan.total_bytes / GIB:.1f} GiB exceeds "
              f"--gpu-memory-gib {gpu_memory_gib:g} (scripts/plan_memory.py):\n"
              f"{format_plan(plan)}", file=sys.stderr)


def check_data(run, args) -> None:
    """Refuse data the job would have to tokenize, or (--prepare-data) tokenize it here; a dry
    run only says what it would prepare."""
    from ultramem_megatron.data.prepare import ensure_prepared, missing_data, prepare_command
    from ultramem_megatron.data.tokenizer import load_tokenizer

    missing = missing_data(run.data)
    if not missing:
        return
    if not args.prepare_data:
        raise ConfigError(f"data not prepared ({'; '.join(missing)}); a Slurm job does not "
                          f"tokenize. Prepare it first, from the repository root: "
                          f"{prepare_command(run.data, args.config, args.overrides)} "
                          f"(or pass --prepare-data to do it here before submitting)")
    if args.dry_run:
        print(f"would prepare: {'; '.join(missing)}")
        return
    ensure_prepared(run.data, load_tokenizer(run.data.tokenizer))


def sbatch_command(args, run_dir: Path, job_name: str, config: Path, code: Path) -> list[str]:
    command = ["sbatch", f"--job-name={job_name}", f"--nodes={args.nodes}",
               f"--ntasks-per-node={args.tasks_per_node}", f"--time={args.time}",
               f"--signal=B:USR1@{args.signal_seconds}", "--requeue", "--open-mode=append",
               f"--output={run_dir / 'logs' / '%x-%j.out'}", f"--chdir={Path.cwd()}",
               f"--export=ALL,ULTRAMEM_ROOT={code},ULTRAMEM_PYTHON={args.python}"]
    if args.gpus_per_node:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        command.append(f"--cpus-per-task={args.cpus_per_task}")
    for option in ("partition", "account", "qos"):
        if getattr(args, option):
            command.append(f"--{option}={getattr(args, option)}")
    return command + args.sbatch_arg + [str(code / "launch" / "slurm.sbatch"), str(config)]


def snapshot(destination: Path) -> Path:
    """Copy the code the job runs (not data, runs or the venv) into destination/code."""
    code = destination / "code"
    for name in CODE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, code / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            code.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, code / name)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
        check_layout(run, args.nodes * args.tasks_per_node, args.gpus_per_node,
                     args.tasks_per_node)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.gpus_per_node:
        warn_memory(run, args.nodes * args.tasks_per_node, args.gpu_memory_gib)
    if not args.dry_run and shutil.which("sbatch") is None:
        print("error: sbatch not found: run this on a Slurm login node", file=sys.stderr)
        return 2
    from ultramem_megatron.data.prepare import DataPrepError
    from ultramem_megatron.data.tokenizer import TokenizerError
    try:
        check_data(run, args)
    except (ConfigError, DataPrepError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(run.train.run_dir).resolve()
    job_name = args.job_name or run_dir.name
    submission = run_dir / "submissions" / time.strftime("%Y%m%d-%H%M%S")
    config = submission / "config.yaml"
    code = submission / "code"
    command = sbatch_command(args, run_dir, job_name, config, code)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    snapshot(submission)
    # The resolved config, overrides included, with run_dir absolute: what the job runs.
    resolved = to_dict(run)
    resolved["train"]["run_dir"] = str(run_dir)
    config.write_text(yaml.safe_dump(resolved, sort_keys=False))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode == 0:
        print(f"code and config: {submission}\nlog: {run_dir / 'logs'}/{job_name}-JOBID.out")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
