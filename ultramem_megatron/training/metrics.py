"""Metrics sinks (metrics.jsonl, progress bar, TensorBoard, wandb); tokens/s, step time, MFU, memory."""

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
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


# Dense bf16 tensor-core peaks (no structured sparsity), TFLOP/s per device, keyed by the exact
# name torch.cuda.get_device_name() reports. From the vendors' datasheets; NVIDIA quotes Ampere
# and later with 2:4 sparsity (marked *), halved here:
#   A100 datasheet: BF16 312 / 624* (SXM4 and PCIe, 40 and 80 GB); A30: 165 / 330*;
#   A10: 125 / 250*; A40: 149.7 / 299.4*; L40S: 362.05 / 733*; L40: 181.05 / 362.1*;
#   L4: 121 / 242*.
#   H100 datasheet: SXM 1,979*, PCIe 1,513*, NVL 1,671*. H200 datasheet: SXM 1,979*, NVL 1,671*.
#   H800 (same tensor cores as H100): SXM 1,979*, PCIe 1,513*. H20: 148 / 296*.
#   GH200 datasheet: 1,979* (its H100). HGX B200 datasheet: 36 PFLOPS* for 8 GPUs -> 2,250 each;
#   GB200 NVL72 datasheet: 360 PFLOPS* for 72 GPUs -> 2,500 each.
#   AMD Instinct datasheets (dense figures): MI300X and MI325X 1,307.4; MI300A 980.6; MI250X
#   383 per module of two GCDs, which torch sees as two devices -> 191.5 each.
PEAK_BF16_TFLOPS = {
    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A30": 165.0, "NVIDIA A10": 125.0, "NVIDIA A40": 149.7,
    "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05, "NVIDIA L4": 121.0,
    "NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.5, "NVIDIA H200 NVL": 835.5,
    "NVIDIA H800": 989.5, "NVIDIA H800 80GB HBM3": 989.5, "NVIDIA H800 PCIe": 756.5,
    "NVIDIA H20": 148.0, "NVIDIA GH200 480GB": 989.5,
    "NVIDIA B200": 2250.0, "NVIDIA GB200": 2500.0,
    "AMD Instinct MI250X": 191.5, "AMD Instinct MI300X": 1307.4,
    "AMD Instinct MI300X VF": 1307.4, "AMD Instinct MI325X": 1307.4,
    "AMD Instinct MI300A": 980.6,
}


def device_name() -> Optional[str]:
    """The GPU's name as torch reports it; None on CPU."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_flops_per_second(device: Optional[str], override_tflops: float = 0.0) -> Optional[float]:
    """override_tflops (train.peak_tflops) when set, else the device's dense bf16 peak. None (no
    MFU) on CPU, and for a GPU not in the table, with a warning."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device is None:
        return None
    peak = PEAK_BF16_TFLOPS.get(device.strip())
    if peak is None:
        warnings.warn(f"no peak FLOP/s known for the GPU {device!r}: MFU is not logged; set "
                      "train.peak_tflops to the device's dense bf16 peak to get it", stacklevel=2)
        return None
    return peak * 1e12


def max_memory_gib() -> Optional[float]:
    """Peak memory allocated by tensors on this process's GPU since it started; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class Throughput:
    """tokens/s, mean step time, MFU and peak GPU memory over a logging window."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_flops: Optional[float],
                 num_devices: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.num_devices = peak_flops, num_devices
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def record(self) -> dict:
        """Since restart(): {'tokens_per_s', 'step_time_s', 'mfu', 'max_memory_gib'} (None: n/a)."""
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.tokens_per_step * self.steps / elapsed
        mfu = None
        if self.peak_flops is not None:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.num_devices)
        return {"tokens_per_s": tokens_per_s, "step_time_s": elapsed / self.steps, "mfu": mfu,
                "max_memory_gib": max_memory_gib()}
