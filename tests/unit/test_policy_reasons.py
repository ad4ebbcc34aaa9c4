"""Decision reasons say what the numbers say: worse, equal, better but under the
threshold (in the threshold's own unit), or a new best; and a patience that the
count does not seem to contradict. Each expected text is computed by hand."""

from __future__ import annotations

from typing import Any

import pytest

from control_server.domain import Action
from control_server.policy import PolicyState, parse_policy, step
from tests.factories import policy_report

VERSION = "v-test"
PATIENCE_3 = "(patience: 3 epochs without improvement allowed)"


def reason(best: float, value: float, *, bad: int = 0, **plateau: Any) -> str:
    """The reason for one report of `value` after `bad` bad epochs behind `best`."""
    doc = parse_policy({"plateau": {"warmup_epochs": 0, **plateau}})
    state = PolicyState(best=best, num_bad_epochs=bad, last_epoch=14)
    verdict, _ = step(doc, VERSION, state, policy_report(15, value, current_lr=0.001))
    return verdict.reason


def test_the_issues_example_lower_but_not_by_the_threshold() -> None:
    # -0.9506 is lower than -0.9352 (better, mode min) by 0.0154 = 1.647% of 0.9352:
    # an improvement, just under the 2% threshold. The count fires at 3 > patience 2.
    text = reason(-0.9352, -0.9506, bad=2, min_delta=0.02, patience=2)
    assert text.startswith(
        "Plateau: val_loss -0.9506 improved on the best -0.9352 by 1.647%, less than the 2% "
        "threshold; no improvement beyond the threshold for 3 epochs "
        "(patience: 2 epochs without improvement allowed); intervention 1 of 3:"
    )
    assert "did not improve" not in text and "has not improved" not in text


@pytest.mark.parametrize(
    ("plateau", "best", "value", "said"),
    [
        # mode min, rel: (0.42 - 0.412) / 0.42 = 1.905%.
        (
            {"min_delta": 0.02},
            0.42,
            0.412,
            "val_loss 0.412 improved on the best 0.42 by 1.905%, less than the 2% threshold",
        ),
        # mode min, abs: 0.42 - 0.412 = 0.008, in the loss's own unit.
        (
            {"min_delta": 0.01, "threshold_mode": "abs"},
            0.42,
            0.412,
            "val_loss 0.412 improved on the best 0.42 by 0.008, less than the 0.01 threshold",
        ),
        # mode max, rel: (0.81 - 0.8) / 0.8 = 1.25%.
        (
            {"mode": "max", "min_delta": 0.02},
            0.8,
            0.81,
            "val_loss 0.81 improved on the best 0.8 by 1.25%, less than the 2% threshold",
        ),
        # mode max, abs: 0.805 - 0.8 = 0.005.
        (
            {"mode": "max", "min_delta": 0.01, "threshold_mode": "abs"},
            0.8,
            0.805,
            "val_loss 0.805 improved on the best 0.8 by 0.005, less than the 0.01 threshold",
        ),
        # Worse is worse, whatever the mode and the threshold.
        ({}, 0.42, 0.43, "val_loss 0.43 is worse than the best 0.42"),
        ({"threshold_mode": "abs"}, 0.42, 0.43, "val_loss 0.43 is worse than the best 0.42"),
        ({"mode": "max"}, 0.8, 0.79, "val_loss 0.79 is worse than the best 0.8"),
        (
            {"mode": "max", "threshold_mode": "abs"},
            -0.4,
            -0.41,
            "val_loss -0.41 is worse than the best -0.4",
        ),
        # Four digits would print both as 0.5: more digits, so worse reads worse.
        ({}, 0.5, 0.50001, "val_loss 0.50001 is worse than the best 0.5"),
        # (0.5 - 0.49999) / 0.5 = 0.002%, far under 1%.
        ({}, 0.5, 0.49999, "val_loss 0.49999 improved on the best 0.5 by 0.002%, less than"),
        # Exactly the threshold is not more than it (the comparison is strict).
        (
            {"min_delta": 0.5, "threshold_mode": "abs"},
            1.0,
            0.5,
            "val_loss 0.5 improved on the best 1 by 0.5, not more than the 0.5 threshold",
        ),
        ({"min_delta": 0.0}, 0.5, 0.5, "val_loss 0.5 equals the best 0.5"),
    ],
)
def test_a_value_short_of_the_best_is_said_as_it_is(
    plateau: dict[str, Any], best: float, value: float, said: str
) -> None:
    text = reason(best, value, **plateau)
    assert text.startswith(said)
    counted = (
        "no improvement"
        if plateau.get("min_delta") == 0.0
        else ("no improvement beyond the threshold")
    )
    assert text.endswith(f"; {counted} for 1 epoch {PATIENCE_3}.")


@pytest.mark.parametrize(
    ("plateau", "best", "value", "said"),
    [
        ({}, 0.5, 0.4, "val_loss 0.4 improved on the best 0.5 by 20%, a new best."),
        (
            {"threshold_mode": "abs"},
            0.5,
            0.4,
            "val_loss 0.4 improved on the best 0.5 by 0.1, a new best.",
        ),
        ({"mode": "max"}, 0.8, 0.9, "val_loss 0.9 improved on the best 0.8 by 12.5%, a new best."),
        # rel of a best of 0 has no percentage: the difference instead.
        (
            {"min_delta": 0.0},
            0.0,
            -0.25,
            "val_loss -0.25 improved on the best 0 by 0.25, a new best.",
        ),
    ],
)
def test_a_new_best_says_by_how_much(
    plateau: dict[str, Any], best: float, value: float, said: str
) -> None:
    assert reason(best, value, bad=2, **plateau) == said


def test_the_patience_phrase_does_not_contradict_the_count() -> None:
    # Patience 2 allows 2 bad epochs; the third fires.
    assert reason(0.5, 0.6, bad=1, patience=2).endswith(
        "for 2 epochs (patience: 2 epochs without improvement allowed)."
    )
    fired = reason(0.5, 0.6, bad=2, patience=2)
    assert "for 3 epochs (patience: 2 epochs without improvement allowed); intervention 1" in fired
    assert "epoch without improvement allowed); intervention 1" in reason(
        0.5, 0.6, bad=1, patience=1
    )
    # No threshold: "beyond the threshold" would name something that is not there.
    assert "; no improvement for 1 epoch" in reason(0.5, 0.6, min_delta=0.0)


def test_the_ema_is_named_as_the_compared_value() -> None:
    # EMA 0.5 * 0.45 + 0.5 * 0.5 = 0.475: 5% under the best 0.5, beyond 1%.
    doc = parse_policy({"plateau": {"warmup_epochs": 0, "ema_alpha": 0.5}})
    state = PolicyState(best=0.5, ema=0.5, last_epoch=14)
    verdict, _ = step(doc, VERSION, state, policy_report(15, 0.45))
    assert verdict.action is Action.NONE
    assert verdict.reason == "val_loss EMA 0.475 improved on the best 0.5 by 5%, a new best."
