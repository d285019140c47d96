"""megatron-core optimizer and LR schedule, with the memory-value LR multiplier on its own group."""

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .. import megatron_compat
from ..config import RunConfig
from ..memory import value_lr_multiplier
from ..memory.value_lr import VALUE_PARAM_ATTR

# The value tables' param group carries lr_mult = the multiplier's start value. lr_mult is one of
# the keys megatron's distributed optimizer uses to match saved param groups to live ones, so the
# group keeps its identity through checkpoints (a key of our own would be mixed up on load); a
# resume with another start value re-marks the saved groups first (mark_saved_value_groups).
# ValueLRScheduler sets every group's lr itself and reads lr_mult only as this marker.
VALUE_GROUP_KEY = "lr_mult"


def is_value_group(param_group: dict) -> bool:
    return param_group.get(VALUE_GROUP_KEY, 1.0) != 1.0


# Param-group keys megatron's get_lr / get_wd read. Loading the optimizer brings back the saved
# groups with the saved run's values; the scheduler puts this run's back (the config wins).
_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


class ValueLRScheduler(OptimizerParamScheduler):
    """megatron's warmup + cosine schedule; the value group gets it times the value-LR multiplier
    (start_mult decaying linearly to 1), the released code's rule.

    On resume only the step counter comes from the checkpoint: LR, weight decay and the value-LR
    multiplier follow the config this scheduler was built from (megatron's load_state_dict would
    restore the saved horizons, warmup and peak)."""

    def __init__(self, optimizer, *args, total_steps: int, start_mult: float,
                 decay_fraction: float, **kwargs):
        self.total_steps, self.start_mult, self.decay_fraction = total_steps, start_mult, decay_fraction
        self.group_schedules = [{k: group[k] for k in _GROUP_SCHEDULE_KEYS if k in group}
                                for group in optimizer.param_groups]
        super().__init__(optimizer, *args, **kwargs)

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

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "value_lr": {"total_steps": self.total_steps, "start_mult": self.start_mult,
                             "decay_fraction": self.decay_fraction, "num_steps": self.num_steps}}

    def mark_saved_value_groups(self, optimizer_state: dict) -> None:
        """Call before the optimizer loads `optimizer_state` (a checkpoint's): its value-table
        groups get this run's mark, so they match the live groups even when
        model.ultramem.value_lr_start_mult changed (the config wins)."""
        for group in _saved_param_groups(optimizer_state):
            if is_value_group(group):
                group[VALUE_GROUP_KEY] = self.start_mult

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes the step from a checkpoint; everything else stays as configured. Call it after
        the optimizer's load_state_dict, whose saved param groups it overrides."""
        changes = schedule_changes(state_dict, self.state_dict())
        if changes and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"resume: the schedule follows this run's config ({', '.join(changes)})",
                  flush=True)
        for group, schedule in zip(self.optimizer.param_groups, self.group_schedules):
            group.update(schedule)
        self.num_steps = 0
        self.step(increment=state_dict["num_steps"])


def _saved_param_groups(state) -> Iterator[dict]:
    """Every param group in an optimizer state dict, however megatron nests it (chained
    optimizers, distributed or not)."""
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                yield from value
            else:
                yield from _saved_param_groups(value)


def schedule_changes(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for each scheduler setting the launched config changes."""
    def flat(state: dict) -> dict:
        items = {k: v for k, v in state.items() if k not in ("num_steps", "value_lr")}
        items.update({f"value_lr.{k}": v for k, v in state.get("value_lr", {}).items()
                      if k != "num_steps"})
        return items

    old, new = flat(saved), flat(current)
    return [f"{name}: {old[name]} -> {new[name]}" for name in sorted(new)
            if name in old and old[name] != new[name]]


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
    start_mult, _ = value_lr_settings(run)
    overrides = megatron_compat.standard_param_group_overrides(config)
    if start_mult != 1.0:
        overrides[megatron_compat.param_key(attr=VALUE_PARAM_ATTR)] = {VALUE_GROUP_KEY: start_mult}
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    return optimizer, build_scheduler(run, optimizer)


def value_lr_settings(run: RunConfig) -> tuple[float, float]:
    """(start multiplier, decay fraction) of the value-LR schedule of the family's value (and
    pre-value) tables; (1, 1) for the families without one (dense, MoE, PKM)."""
    memory = run.model.memory
    if not hasattr(memory, "value_lr_start_mult"):
        return 1.0, 1.0
    return memory.value_lr_start_mult, memory.value_lr_decay_fraction


def build_scheduler(run: RunConfig, optimizer) -> ValueLRScheduler:
    """Warmup + cosine over train.max_steps, constant weight decay, the value-LR multiplier."""
    train, steps = run.train, run.train.max_steps
    start_mult, decay_fraction = value_lr_settings(run)
    return ValueLRScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.lr * train.min_lr_ratio,
        lr_warmup_steps=int(train.warmup_fraction * steps), lr_decay_steps=steps,
        lr_decay_style="cosine", start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        total_steps=steps, start_mult=start_mult, decay_fraction=decay_fraction)
