"""The value learning-rate multiplier: start_mult decaying linearly to 1, never below 1."""

import pytest

from ultramem_megatron.memory import value_lr_multiplier


def test_linear_decay_from_start_to_one():
    assert value_lr_multiplier(0, 1000) == 10.0
    assert value_lr_multiplier(500, 1000) == pytest.approx(5.5)
    assert value_lr_multiplier(1000, 1000) == 1.0
    assert value_lr_multiplier(5000, 1000) == 1.0
    assert value_lr_multiplier(250, 1000, start_mult=4.0, decay_fraction=0.5) == pytest.approx(2.5)
    assert value_lr_multiplier(600, 1000, start_mult=4.0, decay_fraction=0.5) == 1.0


def test_monotone_and_never_below_one():
    mults = [value_lr_multiplier(step, 300, 10.0, 0.7) for step in range(400)]
    assert all(a >= b for a, b in zip(mults, mults[1:]))
    assert min(mults) == 1.0


def test_rejects_non_positive_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        value_lr_multiplier(0, 0)
