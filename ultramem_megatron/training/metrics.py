"""Metrics sinks: metrics.jsonl, a console progress bar with ETA, TensorBoard and wandb."""

import json
import math
import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ..config import RunConfig, to_dict


class MetricsLogger:
    """One record per logged step to every enabled sink. Only rank 0 writes (construct it there)."""

    def __init__(self, run: RunConfig, start_step: int):
        self.run_dir = Path(run.train.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.progress = tqdm(total=run.train.max_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, mininterval=1.0, desc=run.model.family)
        self.tensorboard = None
        if run.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.wandb = None
        if run.train.wandb:
            import wandb  # honours WANDB_MODE (offline, disabled) and WANDB_DIR
            self.wandb = wandb.init(project=run.train.wandb_project, config=to_dict(run),
                                    dir=os.environ.get("WANDB_DIR", str(self.run_dir)),
                                    name=self.run_dir.name, resume="allow")

    def advance(self, steps: int = 1) -> None:
        self.progress.update(steps)

    def log(self, record: dict) -> None:
        """record: {'step': int, name: float | None, ...}; None values are kept in the jsonl as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        shown = {k: v for k, v in clean.items() if k != "step" and v is not None}
        self.progress.write(f"step {clean['step']:>6} | {_format(shown)}")
        step = clean["step"]
        for name, value in shown.items():
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(shown, step=step)

    def close(self) -> None:
        self.progress.close()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _format(values: dict) -> str:
    parts = []
    for name, value in values.items():
        if isinstance(value, float):
            parts.append(f"{name} {value:.4g}")
        else:
            parts.append(f"{name} {value}")
    return " | ".join(parts)


def peak_flops_per_second(device_name: Optional[str], threads: int) -> float:
    """Dense bf16 peak of known GPUs; on CPU a nominal 32 fp32 FLOP/cycle/core at 2.5 GHz
    (AVX2 FMA), so the CPU 'MFU' is only a rough utilisation figure."""
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
    for key, peak in table.items():
        if device_name and key in device_name:
            return peak
    return max(1, threads) * 32 * 2.5e9
