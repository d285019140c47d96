"""Value parameters are marked so the optimizer can give them the value-LR multiplier schedule."""

from torch import nn

VALUE_PARAM_ATTR = "is_memory_value"


def mark_value_param(param: nn.Parameter) -> nn.Parameter:
    setattr(param, VALUE_PARAM_ATTR, True)
    return param


def is_value_param(param: nn.Parameter) -> bool:
    return getattr(param, VALUE_PARAM_ATTR, False)


def value_lr_multiplier(step: int, total_steps: int, start_mult: float = 10.0,
                        decay_fraction: float = 1.0) -> float:
    """start_mult at step 0, decaying linearly to 1 at decay_fraction * total_steps, then 1.

    Applied on top of the base schedule (the released code's rule,
    mult = 1 + (start - 1) * max(0, 1 - step / (T * fraction))); never below 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    decay_steps = max(1.0, decay_fraction * total_steps)
    remaining = max(0.0, 1.0 - step / decay_steps)
    return 1.0 + (start_mult - 1.0) * remaining
