"""Plateau detection: ReduceLROnPlateau's counting, warmup, EMA, modes and thresholds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_server.domain import Action, Report, Source, Verdict
from control_server.policy import INITIAL_STATE, PolicyDoc, parse_policy, step
from control_server.policy.plateau import is_better
from tests.factories import policy_report

VERSION = "v-test"


class TorchPlateau:
    """PyTorch's ReduceLROnPlateau.step, by hand (torch is not a dependency)."""

    def __init__(
        self, mode: str, patience: int, cooldown: int, threshold: float, threshold_mode: str
    ) -> None:
        self.mode, self.patience, self.cooldown = mode, patience, cooldown
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, current: float) -> bool:
        """True when this epoch reduces the LR (our plateau fires)."""
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
            return True
        return False


def doc(**plateau: Any) -> PolicyDoc:
    # A huge budget and no guard: only the plateau counting is under test.
    return parse_policy(
        {
            "plateau": {"warmup_epochs": 0, **plateau},
            "interventions": {"max_interventions": 1000},
            "guard": {"guard_epochs": 0},
        }
    )


def report(epoch: int, value: float, **fields: Any) -> Report:
    """Both losses at `value`, the LR at 0.001 and the gradient norm at 0.2."""
    return policy_report(epoch, value, **{"current_lr": 0.001, "avg_gradient_norm": 0.2, **fields})


def run(policy: PolicyDoc, values: Sequence[float], **fields: Any) -> list[Verdict]:
    """Fold the policy over a curve with a client that applies every intervention."""
    state, count, verdicts = INITIAL_STATE, 0, []
    for epoch, value in enumerate(values):
        verdict, state = step(
            policy, VERSION, state, report(epoch, value, intervention_count=count, **fields)
        )
        count += verdict.action is Action.INTERVENE
        verdicts.append(verdict)
    return verdicts


def fired(verdicts: Sequence[Verdict]) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v.action is Action.INTERVENE]


def torch_fired(
    values: Sequence[float],
    mode: str = "min",
    patience: int = 3,
    cooldown: int = 2,
    threshold: float = 0.01,
    threshold_mode: str = "rel",
) -> list[int]:
    ref = TorchPlateau(mode, patience, cooldown, threshold, threshold_mode)
    return [i for i, v in enumerate(values) if ref.step(v)]


def curve(text: str) -> list[float]:
    return [float(v) for v in text.split()]


CURVES = {
    "flat": [0.5] * 12,
    "slow_then_flat": curve("1 0.9 0.8 0.79 0.795 0.792 0.791 0.7905 0.7 0.71 0.72 0.73 0.74 0.75"),
    "improve_within_1pct": curve("1 0.995 0.991 0.989 0.985 0.98 0.5 0.5 0.5 0.5 0.5"),
    "noisy": curve("0.9 0.7 0.75 0.72 0.69 0.71 0.72 0.73 0.74 0.6 0.61 0.62 0.63 0.64 0.65 0.66"),
    "exact_threshold": curve("1 0.99 0.99 0.9801 0.97 0.97 0.97 0.97"),
}


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize(("patience", "cooldown"), [(3, 2), (0, 0), (1, 3), (2, 0)])
def test_fires_on_the_same_epochs_as_reduce_lr_on_plateau(
    name: str, patience: int, cooldown: int
) -> None:
    values = CURVES[name]
    verdicts = run(doc(patience=patience, cooldown=cooldown), values)
    assert fired(verdicts) == torch_fired(values, patience=patience, cooldown=cooldown)


@given(
    values=st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=1, max_size=30),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5]),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
)
@settings(max_examples=200, deadline=None, database=None)
def test_agrees_with_reduce_lr_on_plateau_on_positive_values(
    values: list[float],
    mode: str,
    threshold_mode: str,
    threshold: float,
    patience: int,
    cooldown: int,
) -> None:
    policy = doc(
        mode=mode,
        threshold_mode=threshold_mode,
        min_delta=threshold,
        patience=patience,
        cooldown=cooldown,
    )
    assert fired(run(policy, values)) == torch_fired(
        values, mode, patience, cooldown, threshold, threshold_mode
    )


def test_default_fires_on_the_epoch_the_count_exceeds_patience() -> None:
    verdicts = run(doc(), [0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    assert fired(verdicts) == [4]
    assert verdicts[3].reason == (
        "val_loss 0.6 is worse than the best 0.5; no improvement beyond the threshold "
        "for 3 epochs (patience: 3 epochs without improvement allowed)."
    )
    assert verdicts[4].reason.startswith(
        "Plateau: val_loss 0.6 is worse than the best 0.5; no improvement beyond the threshold "
        "for 4 epochs (patience: 3 epochs without improvement allowed); intervention 1 of 1000:"
    )


def test_rel_threshold_is_relative_to_abs_best_on_negative_losses() -> None:
    # Each epoch gains less than 1% of |best|: a plateau. PyTorch's best * (1 - t)
    # would call every one of them (and even small regressions) an improvement.
    values = [-0.40, -0.401, -0.402, -0.403, -0.4035, -0.404]
    assert torch_fired(values) == []
    verdicts = run(doc(), values)
    assert fired(verdicts) == [4]
    # Lower (better) by 0.0035 = 0.875% of |best|: said so, and that it is under 1%.
    assert verdicts[4].reason.startswith(
        "Plateau: val_loss -0.4035 improved on the best -0.4 by 0.875%, less than the 1% "
        "threshold; no improvement beyond the threshold for 4 epochs"
    )
    # A gain of more than 1% of |best| is an improvement.
    assert run(doc(), [-0.40, -0.405])[1].reason == (
        "val_loss -0.405 improved on the best -0.4 by 1.25%, a new best."
    )


def test_rel_and_abs_thresholds_differ() -> None:
    # Every gain is under 1% of 10 (rel: a plateau) but most beat 0.01 (abs: progress).
    values = [10.0, 9.95, 9.92, 9.94, 9.93, 9.91]
    assert fired(run(doc(), values)) == [4]
    assert fired(run(doc(threshold_mode="abs"), values)) == []
    assert is_better(doc(threshold_mode="abs").plateau, 9.98, 10.0)
    assert not is_better(doc().plateau, 9.98, 10.0)


def test_mode_max_is_mirrored() -> None:
    policy = doc(mode="max")
    assert fired(run(policy, [0.5, 0.6, 0.7, 0.8, 0.9])) == []
    assert fired(run(policy, [0.5, 0.5, 0.4, 0.5, 0.504])) == [4]
    assert is_better(policy.plateau, -0.39, -0.4)  # 2.5% of |best| up
    assert not is_better(policy.plateau, -0.399, -0.4)


def test_cooldown_discards_bad_epochs_after_an_intervention() -> None:
    verdicts = run(doc(patience=1, cooldown=2), [0.5] * 9)
    # Fires at 2 (2 bad > 1), then 2 cooldown epochs count nothing, then 2 bad epochs.
    assert fired(verdicts) == [2, 6]
    assert (
        verdicts[3].reason
        == "val_loss 0.5 equals the best 0.5; not counted (cooldown, 1 epoch left)."
    )
    assert verdicts[4].reason.endswith("not counted (cooldown, 0 epochs left).")
    assert verdicts[5].reason == (
        "val_loss 0.5 equals the best 0.5; no improvement beyond the threshold for 1 epoch "
        "(patience: 1 epoch without improvement allowed)."
    )


def test_warmup_defers_the_firing_to_the_first_allowed_epoch() -> None:
    values = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.4]
    # Without warmup: fires at 4. With warmup 7 the count goes on and fires at 7.
    assert fired(run(doc(), values)) == [4]
    verdicts = run(doc(warmup_epochs=7), values)
    assert fired(verdicts) == [7]
    assert verdicts[1].reason == (
        "val_loss 0.6 is worse than the best 0.5; no improvement beyond the threshold for 1 epoch "
        "(patience: 3 epochs without improvement allowed); warmup until epoch 7."
    )
    assert verdicts[5].reason.endswith(
        "for 5 epochs (patience: 3 epochs without improvement allowed), "
        "but no intervention before warmup ends at epoch 7."
    )
    assert "for 7 epochs (patience: 3 epochs without improvement allowed)" in verdicts[7].reason


def test_warmup_with_improvement_after_the_deferred_count_does_not_fire() -> None:
    assert fired(run(doc(warmup_epochs=6), [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.3])) == []


def test_ema_smooths_the_monitored_value() -> None:
    # Raw values oscillate around 0.5: every low value is a raw "improvement"...
    values = [1.0, 0.5, 0.6, 0.45, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5]
    # ...while the EMA (alpha 0.5) keeps improving for a while, then flattens out.
    verdicts = run(doc(ema_alpha=0.5), values)
    assert verdicts[0].reason == "val_loss EMA 1 sets the first best."
    assert verdicts[1].reason == "val_loss EMA 0.75 improved on the best 1 by 25%, a new best."
    ema = 1.0
    for v in values[1:3]:
        ema = 0.5 * v + 0.5 * ema
    assert (
        verdicts[2].reason
        == f"val_loss EMA {ema:.4g} improved on the best 0.75 by 10%, a new best."
    )
    assert fired(verdicts) != fired(run(doc(), values))


def test_ema_firing_matches_reference_on_the_smoothed_curve() -> None:
    values = [1.0, 0.8, 0.82, 0.79, 0.81, 0.8, 0.81, 0.8, 0.82, 0.79]
    smoothed, ema = [], None
    for v in values:
        ema = v if ema is None else 0.3 * v + 0.7 * ema
        smoothed.append(ema)
    assert fired(run(doc(ema_alpha=0.3), values)) == torch_fired(smoothed)


def test_train_loss_is_monitored_when_val_loss_is_missing() -> None:
    verdicts = run(doc(), [0.5, 0.4], val_loss=None)
    assert verdicts[1].reason == "train_loss 0.4 improved on the best 0.5 by 20%, a new best."
    assert verdicts[1].source is Source.POLICY
