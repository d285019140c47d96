"""GPT models of every family built from megatron-core specs, with skip-layer memory."""

from .gpt import MemoryGPT, build_model, build_model_chunks, transformer_config

__all__ = ["MemoryGPT", "build_model", "build_model_chunks", "transformer_config"]
