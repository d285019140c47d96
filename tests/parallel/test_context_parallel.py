"""Context parallelism: what runs on CPU. megatron's local attention runs one context rank only,
so a CP run needs Transformer Engine's attention (refused before any work without it); the
memory layer's statistics over the context ranks and each rank's part of the batch are checked
under torchrun (context_worker.py); layouts the memory cannot run are refused at load."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from ultramem_megatron.config import ConfigError, load_config
from ultramem_megatron.model.capabilities import Capabilities
from ultramem_megatron.model.gpt import transformer_config
from ultramem_megatron.training import loop

from .context_worker import TOL

ROOT = Path(__file__).resolve().parents[2]
CP2 = ["parallel.context_parallel_size=2"]


@pytest.mark.slow
def test_memory_statistics_span_the_context_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "tests/parallel/context_worker.py", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {"batch_part", "output", "aux_loss", "input_grad", "bn_running_mean",
                "retrieval.query_proj.weight_grad"} <= errors.keys()
        assert all(value <= TOL for value in errors.values()), errors


@pytest.mark.parametrize("overrides, message", [
    (["model.seq_length=30"], r"model.seq_length \(30\) must be divisible by 2 x "
                              r"parallel.context_parallel_size \(4\)"),
    (["model.family=pkm"], "not supported with the pkm family"),
    (["model.ultramem.query_conv_kernel=4"], "query_conv_kernel > 0 with "
                                              "parallel.context_parallel_size > 1"),
])
def test_context_layouts_the_model_cannot_run_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", [*CP2, *overrides])


@pytest.mark.parametrize("caps, impl, refused", [
    (Capabilities(), "auto", "Transformer Engine does not import here"),
    (Capabilities(cuda=True, transformer_engine=True), "local", "train.transformer_impl=local"),
    (Capabilities(cuda=True, transformer_engine=True), "auto", None),
])
def test_context_parallel_needs_transformer_engine_attention(monkeypatch, caps, impl, refused):
    """The GPU run's check with capabilities simulated: refused before any work without TE's
    attention, and a TE run gets megatron's CP fields."""
    monkeypatch.setattr(Capabilities, "detect", classmethod(lambda cls: caps))
    run = load_config(ROOT / "configs/tiny.yaml", [*CP2, f"train.transformer_impl={impl}"])
    if refused:
        with pytest.raises(ConfigError, match=refused):
            loop.machine_capabilities(run)
        return
    assert loop.machine_capabilities(run).transformer_engine
    config = transformer_config(replace(run.model), run.parallel)
    assert config.context_parallel_size == 2 and config.cp_comm_type == "p2p"
