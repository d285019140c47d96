"""Shared fixtures: deterministic seeds and small megatron TransformerConfigs."""

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def transformer_config(hidden_size: int = 64, num_layers: int = 4,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=hidden_size,
                             num_attention_heads=4, params_dtype=dtype)
