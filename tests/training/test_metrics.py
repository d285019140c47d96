"""Metrics: the peak FLOP/s table, the throughput / MFU / memory figures (the GPU branch with a
simulated GPU), and metrics.jsonl, TensorBoard and (offline) wandb from a real run."""

import json
import warnings

import pytest
import torch

from ultramem_megatron.config import load_config
from ultramem_megatron.model.stats import model_stats
from ultramem_megatron.training import metrics
from ultramem_megatron.training.metrics import Throughput, device_name, peak_flops_per_second

from .conftest import ROOT, SMALL, train


def _peak(name, override=0.0):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peak = peak_flops_per_second(name, override)
    return peak, [str(w.message) for w in caught]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5),     # SXM5
    ("NVIDIA H100 PCIe", 756.5),          # not the SXM figure
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),
    ("AMD Instinct MI300X", 1307.4), ("AMD Instinct MI250X", 191.5),
])
def test_peak_by_exact_device_name(name, tflops):
    assert _peak(name) == (tflops * 1e12, [])


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA GeForce RTX 4090", "H200"])
def test_unknown_device_has_no_peak_and_one_warning(name):
    peak, caught = _peak(name)
    assert peak is None and len(caught) == 1
    assert name in caught[0] and "train.peak_tflops" in caught[0]


def test_override_wins_everywhere():
    assert _peak("NVIDIA H100 PCIe", 400.0) == (400e12, [])
    assert _peak("NVIDIA GeForce RTX 4090", 165.0) == (165e12, [])
    assert _peak(None, 2.0) == (2e12, [])


def test_cpu_has_no_peak_memory_or_mfu_and_no_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_name() is None and _peak(device_name()) == (None, [])
    throughput = Throughput(100, 10, None, 1)
    throughput.step()
    record = throughput.record()
    assert record["mfu"] is None and record["max_memory_gib"] is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as the loop sees it on one H100 PCIe that has peaked at 3.5 GiB."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3.5 * 2**30)


def test_gpu_branch_throughput_mfu_and_memory(fake_gpu, monkeypatch):
    clock = iter([100.0, 104.0])   # restart() at 100 s, record() at 104 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    peak = peak_flops_per_second(device_name(), 0.0)
    assert peak == 756.5e12
    throughput = Throughput(tokens_per_step=2048, flops_per_token=6_000_000_000, peak_flops=peak,
                            num_devices=8)
    for _ in range(5):
        throughput.step()
    record = throughput.record()
    tokens_per_s = 5 * 2048 / 4.0
    assert record == {"tokens_per_s": tokens_per_s, "step_time_s": 0.8,
                      "mfu": pytest.approx(6e9 * tokens_per_s / (756.5e12 * 8), rel=1e-15),
                      "max_memory_gib": 3.5}


@pytest.mark.slow
def test_metrics_jsonl_tensorboard_and_offline_wandb(tmp_path):
    result = train(tmp_path, "train.max_steps=4", "train.log_interval=2", "train.eval_interval=4",
                   "train.tensorboard=true", "train.wandb=true", "train.peak_tflops=0.001",
                   env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    expected = {"step", "loss", "aux_loss", "grad_norm", "lr", "value_lr", "tokens_per_s",
                "step_time_s", "mfu", "max_memory_gib", "value_rows_hit"}
    assert expected <= set(records[0]) and "val_loss" not in records[0]
    assert expected | {"val_loss"} <= set(records[1])
    first, last = records
    assert first["value_lr"] > first["lr"] > 0        # mid-run the value-LR multiplier is > 1
    assert last["value_lr"] == last["lr"]             # and 1 at the end of its decay
    assert 0 < last["value_rows_hit"] <= 1 and last["tokens_per_s"] > 0
    run = load_config(ROOT / "configs" / "tiny.yaml", SMALL)   # what train() ran
    tokens_per_step = run.train.global_batch_size * run.model.seq_length
    flops = model_stats(run.model).mfu_flops_per_token
    for record in records:
        assert record["tokens_per_s"] * record["step_time_s"] == pytest.approx(tokens_per_step)
        assert record["mfu"] == pytest.approx(flops * record["tokens_per_s"] / 1e9, rel=1e-9)
        assert record["max_memory_gib"] is None       # CPU: no peak memory (documented)
    assert "no peak FLOP/s" not in result.stderr
    assert "step      4 | loss" in result.stdout
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
