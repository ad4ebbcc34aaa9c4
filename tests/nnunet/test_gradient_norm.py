"""The epoch's gradient norm: the mean of the finite per-step norms, read once."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_client.nnunet import mean_finite


def test_non_finite_steps_are_left_out_of_the_mean() -> None:
    norms = [torch.tensor(v) for v in (1.0, math.inf, 3.0, math.nan, 5.0)]
    assert mean_finite(norms) == pytest.approx(3.0)


def test_an_epoch_without_a_finite_step_has_no_norm() -> None:
    assert mean_finite([torch.tensor(math.nan), torch.tensor(math.inf)]) is None
    assert mean_finite([]) is None


def test_it_is_the_norm_clip_grad_norm_returns_before_clipping() -> None:
    layer = torch.nn.Linear(4, 1)
    layer.weight.grad = torch.full_like(layer.weight, 30.0)
    layer.bias.grad = torch.full_like(layer.bias, 40.0)
    norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), 12)
    assert mean_finite([norm]) == pytest.approx(math.sqrt(4 * 30.0**2 + 40.0**2))
