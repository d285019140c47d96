"""Shared fixtures: deterministic seeds and small megatron TransformerConfigs."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a function is decorated with @jit, and megatron imports triton: set
    # it first, so the memory kernels (tests/kernels) run under the interpreter on a CPU machine.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def transformer_config(hidden_size: int = 64, num_layers: int = 4,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=hidden_size,
                             num_attention_heads=4, params_dtype=dtype)


def subprocess_env(**extra: str) -> dict:
    """This process's environment for a child run, without the rendezvous variables an
    in-process test may have set (their port is still held here)."""
    rendezvous = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}
