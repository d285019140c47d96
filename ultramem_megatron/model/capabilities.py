"""Which fast paths this machine has, and the one place that turns them into megatron fusion flags."""

# A fusion is switched on only when the kernel it calls can be imported and megatron's
# TransformerConfig accepts it for this model, never because CUDA is merely present: a CUDA
# machine without apex has no fused softmax kernels, and megatron refuses the bias-GELU fusion for
# a model without biases. tests/model/test_capabilities.py builds every shipped config under every
# combination of these flags (CUDA simulated on CPU) and on the meta device.

import importlib
from dataclasses import dataclass, fields
from typing import Optional

import torch

from .. import megatron_compat
from ..config import ModelConfig


def _imports(*modules: str) -> bool:
    """True when every module imports (a broken CUDA extension raises more than ImportError)."""
    try:
        for module in modules:
            importlib.import_module(module)
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@dataclass(frozen=True)
class Capabilities:
    """What can run here. Detected once per process; tests construct other combinations."""

    cuda: bool = False
    transformer_engine: bool = False   # TE spec: fused norm+linear, TE attention (flash / cuDNN)
    triton: bool = False               # torch.compile's GPU code generator (megatron's jit fusions)
    softmax_kernels: bool = False      # apex / megatron scaled_*masked_softmax_cuda
    grad_accum_kernel: bool = False    # apex fused_weight_gradient_mlp_cuda
    rope_kernel: bool = False          # TE's fused RoPE, as megatron binds it
    flash_attention: bool = False      # flash_attn, which TE's attention may dispatch to

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            transformer_engine=megatron_compat.transformer_engine_available(),
            triton=cuda and _triton_available(),
            softmax_kernels=cuda and _imports("scaled_masked_softmax_cuda",
                                              "scaled_upper_triang_masked_softmax_cuda",
                                              "scaled_softmax_cuda"),
            grad_accum_kernel=cuda and _imports("fused_weight_gradient_mlp_cuda"),
            rope_kernel=cuda and megatron_compat.fused_rope_available(),
            flash_attention=cuda and _imports("flash_attn"))

    def describe(self) -> str:
        return ", ".join(f"{f.name}={'yes' if getattr(self, f.name) else 'no'}"
                         for f in fields(self))


def _triton_available() -> bool:
    """torch's own check (Triton importable and a GPU it can compile for). It reads the device's
    properties, so it raises where CUDA is only simulated: no Triton then."""
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # noqa: BLE001 - any failure of the probe means no usable Triton
        return False


@dataclass(frozen=True)
class FusionChoice:
    """The TransformerConfig fields this module decides, and the spec family."""

    use_transformer_engine: bool
    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    masked_softmax_fusion: bool
    apply_rope_fusion: bool
    gradient_accumulation_fusion: bool
    moe_grouped_gemm: bool            # TE's grouped GEMM over a rank's local experts
    attention_backend: str            # megatron AttnBackend member name

    def config_fields(self) -> dict:
        from megatron.core.transformer.enums import AttnBackend

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        del values["use_transformer_engine"]
        values["attention_backend"] = AttnBackend[self.attention_backend]
        return values


def choose_fusions(model: ModelConfig, caps: Optional[Capabilities] = None) -> FusionChoice:
    """Every fusion whose kernel is here and that megatron accepts for this model.

    - bias + activation: megatron fuses SwiGLU without biases, but refuses bias-GELU without a
      bias (we never use biases), so only SwiGLU models fuse; compiled by torch.compile (Triton).
    - bias + dropout + add: torch.compile'd (Triton); fine without a bias.
    - masked softmax: the local spec's attention calls apex's CUDA kernels; TE brings its own.
    - RoPE: TE's fused kernel, through megatron.
    - gradient accumulation into main_grad: apex's kernel (the output layer is megatron's own
      linear even under the TE spec, so TE alone is not enough).
    - MoE experts: TE's grouped GEMM (TEGroupedMLP) under the TE spec, one GEMM per rank's
      local experts; megatron's SequentialMLP (a loop over experts) otherwise.
    """
    caps = caps if caps is not None else Capabilities.detect()
    compiled = caps.cuda and caps.triton
    return FusionChoice(
        use_transformer_engine=caps.transformer_engine,
        bias_activation_fusion=compiled and model.swiglu,
        bias_dropout_fusion=compiled,
        masked_softmax_fusion=caps.cuda and caps.softmax_kernels,
        apply_rope_fusion=(caps.cuda and caps.transformer_engine and caps.rope_kernel
                           and model.position_embedding == "rope"),
        gradient_accumulation_fusion=caps.cuda and caps.grad_accum_kernel,
        moe_grouped_gemm=caps.transformer_engine and model.family == "moe",
        attention_backend="auto" if caps.transformer_engine else "local")
