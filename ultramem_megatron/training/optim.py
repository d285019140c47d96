"""megatron-core optimizer and LR schedule, with the memory-value LR multiplier on its own group."""

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .. import megatron_compat
from ..config import RunConfig
from ..memory import value_lr_multiplier
from ..memory.value_lr import VALUE_PARAM_ATTR

# The value tables' param group carries lr_mult = the multiplier's start value. lr_mult is one of
# the keys megatron's distributed optimizer uses to match saved param groups to live ones, so the
# group keeps its identity through checkpoints (a key of our own would be mixed up on load).
# ValueLRScheduler sets every group's lr itself and reads lr_mult only as this marker.
VALUE_GROUP_KEY = "lr_mult"


def is_value_group(param_group: dict) -> bool:
    return param_group.get(VALUE_GROUP_KEY, 1.0) != 1.0


class ValueLRScheduler(OptimizerParamScheduler):
    """megatron's warmup + cosine schedule; the value group gets it times the value-LR multiplier
    (start_mult decaying linearly to 1), the released code's rule."""

    def __init__(self, *args, total_steps: int, start_mult: float, decay_fraction: float, **kwargs):
        self.total_steps, self.start_mult, self.decay_fraction = total_steps, start_mult, decay_fraction
        super().__init__(*args, **kwargs)

    def value_multiplier(self) -> float:
        return value_lr_multiplier(self.num_steps, self.total_steps, self.start_mult,
                                   self.decay_fraction)

    def get_lr(self, param_group: dict) -> float:
        lr = super().get_lr(param_group)
        return lr * self.value_multiplier() if is_value_group(param_group) else lr

    def step(self, increment: int) -> None:
        """As megatron's, but lr is exactly get_lr() in every version (no lr_mult scaling)."""
        self.num_steps += increment
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.get_lr(param_group)
            param_group["weight_decay"] = self.get_wd(param_group) * param_group.get("wd_mult", 1.0)


def optimizer_config(run: RunConfig, dtype: torch.dtype) -> OptimizerConfig:
    train = run.train
    return OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.lr * train.min_lr_ratio,
        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        adam_eps=1e-8, clip_grad=train.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=run.parallel.use_distributed_optimizer)


def build_optimizer(run: RunConfig, model_chunks: list, dtype: torch.dtype):
    """-> (megatron optimizer, ValueLRScheduler). Value tables get their own param group (weight
    decay as everything else, as in the released code); norms and biases get no weight decay."""
    config = optimizer_config(run, dtype)
    memory = run.model.ultramem if run.model.family == "ultramem" else None
    start_mult = memory.value_lr_start_mult if memory else 1.0
    overrides = megatron_compat.standard_param_group_overrides(config)
    if start_mult != 1.0:
        overrides[megatron_compat.param_key(attr=VALUE_PARAM_ATTR)] = {VALUE_GROUP_KEY: start_mult}
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    train, steps = run.train, run.train.max_steps
    scheduler = ValueLRScheduler(
        optimizer, init_lr=0.0, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=int(train.warmup_fraction * steps), lr_decay_steps=steps,
        lr_decay_style="cosine", start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        total_steps=steps, start_mult=start_mult,
        decay_fraction=memory.value_lr_decay_fraction if memory else 1.0)
    return optimizer, scheduler
