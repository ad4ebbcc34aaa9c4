"""The divergence guard and the non-finite-loss rule."""

from __future__ import annotations

import math
from typing import Any

from control_server.domain import Action, Report, Source, frozen_map
from control_server.policy import InterventionMark, PolicyState, parse_policy, step
from tests.factories import policy_report

VERSION = "v-test"
DEFAULT = parse_policy({})
WEIGHTS = frozen_map({"dice": 1.0, "ce": 1.0})
DUE = PolicyState(best=0.30, num_bad_epochs=3, last_epoch=14)


def report(epoch: int, value: float, **fields: Any) -> Report:
    """The val loss at `value`, the train loss steady at 0.2, two interventions behind."""
    return policy_report(epoch, value, **{"train_loss": 0.2, "intervention_count": 2, **fields})


def intervened() -> PolicyState:
    """The state right after intervention 3 at epoch 15 (the seed's collapse)."""
    verdict, state = step(DEFAULT, VERSION, DUE, report(15, 0.3222))
    assert verdict.action is Action.INTERVENE
    assert verdict.intervention_index == 3
    return state


APPLIED = {
    "intervention_count": 3,
    "current_lr": 0.01,
    "loss_weights": frozen_map({"dice": 0.6, "focal": 0.4}),
}


def test_the_seeds_collapse_is_rolled_back() -> None:
    verdict, state = step(DEFAULT, VERSION, intervened(), report(16, 0.6455, **APPLIED))
    assert (verdict.action, verdict.source) == (Action.ROLLBACK, Source.SAFETY)
    assert verdict.lr == 0.005
    assert dict(verdict.loss_weights) == {"ce": 1.0, "dice": 1.0}
    assert verdict.intervention_index == 0
    assert verdict.reason == (
        "Divergence guard: val_loss 0.6455 is 100.3% worse than 0.3222 at intervention 3 "
        "(epoch 15), beyond the 50% tolerance; rolling back to LR 0.005 and weights ce 1, dice 1."
    )
    # Mark cleared, cooldown restarted, count reset, best kept.
    assert state.mark is None
    assert (state.cooldown_left, state.num_bad_epochs, state.best) == (2, 0, 0.30)


def test_within_tolerance_is_not_rolled_back() -> None:
    # 0.3222 * 1.5 = 0.4833: just under the threshold is tolerated.
    verdict, state = step(DEFAULT, VERSION, intervened(), report(16, 0.48, **APPLIED))
    assert verdict.action is Action.NONE
    assert state.mark is not None  # still watched next epoch


def test_second_epoch_of_the_window_is_watched_then_the_mark_clears() -> None:
    _, state = step(DEFAULT, VERSION, intervened(), report(16, 0.33, **APPLIED))
    verdict, _ = step(DEFAULT, VERSION, state, report(17, 0.50, **APPLIED))
    assert verdict.action is Action.ROLLBACK
    verdict, after = step(DEFAULT, VERSION, state, report(17, 0.34, **APPLIED))
    assert verdict.action is Action.NONE
    assert after.mark is None


def test_guard_window_expiry() -> None:
    _, state = step(DEFAULT, VERSION, intervened(), report(16, 0.33, **APPLIED))
    _, state = step(DEFAULT, VERSION, state, report(17, 0.33, **APPLIED))
    verdict, state = step(DEFAULT, VERSION, state, report(18, 5.0, **APPLIED))
    assert verdict.action is Action.NONE  # epoch 18 is beyond guard_epochs 2
    assert state.mark is None


def test_a_report_skipping_past_the_window_drops_the_mark() -> None:
    verdict, state = step(DEFAULT, VERSION, intervened(), report(19, 5.0, **APPLIED))
    assert verdict.action is Action.NONE
    assert state.mark is None


def test_guard_not_armed_when_the_client_did_not_apply_the_intervention() -> None:
    # The client failed open and never saw the decision: intervention_count stayed 2.
    verdict, state = step(DEFAULT, VERSION, intervened(), report(16, 0.6455))
    assert verdict.action is not Action.ROLLBACK
    assert state.mark is None


def test_non_finite_loss_within_the_window_rolls_back() -> None:
    verdict, state = step(DEFAULT, VERSION, intervened(), report(16, math.nan, **APPLIED))
    assert (verdict.action, verdict.source, verdict.lr) == (Action.ROLLBACK, Source.SAFETY, 0.005)
    assert verdict.reason == (
        "Divergence guard: the losses are not finite (train_loss 0.2, val_loss nan) 1 epoch "
        "after intervention 3 (epoch 15); rolling back to LR 0.005 and weights ce 1, dice 1."
    )
    assert state.mark is None


def test_non_finite_train_loss_counts_too() -> None:
    verdict, _ = step(
        DEFAULT, VERSION, intervened(), report(16, 0.3, train_loss=math.inf, **APPLIED)
    )
    assert verdict.action is Action.ROLLBACK


def test_non_finite_loss_without_an_intervention_stops() -> None:
    verdict, state = step(DEFAULT, VERSION, DUE, report(15, math.nan))
    assert (verdict.action, verdict.source, verdict.lr) == (Action.STOP, Source.SAFETY, None)
    assert verdict.reason == (
        "Non-finite loss (train_loss 0.2, val_loss nan) with no intervention to undo; "
        "stopping the run."
    )
    # Nothing non-finite reaches the counters.
    assert state == PolicyState(best=0.30, num_bad_epochs=3, last_epoch=15)


def test_non_finite_loss_outside_the_window_stops() -> None:
    _, state = step(DEFAULT, VERSION, intervened(), report(16, 0.33, **APPLIED))
    _, state = step(DEFAULT, VERSION, state, report(17, 0.33, **APPLIED))
    verdict, _ = step(DEFAULT, VERSION, state, report(18, math.nan, **APPLIED))
    assert (verdict.action, verdict.source) == (Action.STOP, Source.SAFETY)


def test_non_finite_loss_decides_none_when_configured() -> None:
    policy = parse_policy({"guard": {"on_nonfinite": "none"}})
    verdict, state = step(policy, VERSION, DUE, report(15, math.inf))
    assert (verdict.action, verdict.source) == (Action.NONE, Source.SAFETY)
    assert "guard.on_nonfinite is none" in verdict.reason
    assert state.best == 0.30 and state.ema is None


def test_non_finite_loss_is_not_fed_into_the_ema() -> None:
    policy = parse_policy({"plateau": {"ema_alpha": 0.5}})
    _, state = step(policy, VERSION, PolicyState(), report(0, 0.4))
    _, after = step(policy, VERSION, state, report(1, math.nan))
    assert (after.ema, after.best, after.num_bad_epochs) == (0.4, 0.4, 0)


def test_mode_max_guard_is_mirrored() -> None:
    policy = parse_policy({"plateau": {"mode": "max"}})
    mark = InterventionMark(epoch=15, k=1, value=0.8, lr_before=0.005, weights_before=WEIGHTS)
    state = PolicyState(best=0.9, mark=mark)
    low, _ = step(policy, VERSION, state, report(16, 0.39, intervention_count=1))
    ok, _ = step(policy, VERSION, state, report(16, 0.41, intervention_count=1))
    assert (low.action, ok.action) == (Action.ROLLBACK, Action.NONE)


def test_guard_compares_raw_values_even_with_ema() -> None:
    policy = parse_policy({"plateau": {"ema_alpha": 0.1}})
    mark = InterventionMark(epoch=15, k=1, value=0.3, lr_before=0.005, weights_before=WEIGHTS)
    state = PolicyState(best=0.3, ema=0.3, mark=mark)
    verdict, _ = step(policy, VERSION, state, report(16, 0.5, intervention_count=1))
    assert verdict.action is Action.ROLLBACK
    assert "val_loss 0.5 is 66.67% worse than 0.3" in verdict.reason


def test_zero_guard_epochs_disables_the_guard() -> None:
    policy = parse_policy({"guard": {"guard_epochs": 0}})
    _, state = step(policy, VERSION, DUE, report(15, 0.3222))
    verdict, state = step(policy, VERSION, state, report(16, 0.6455, **APPLIED))
    assert verdict.action is Action.NONE
    assert state.mark is None


def test_rollback_without_reported_weights_says_so() -> None:
    mark = InterventionMark(epoch=15, k=1, value=0.3, lr_before=0.005)
    verdict, _ = step(
        DEFAULT, VERSION, PolicyState(best=0.3, mark=mark), report(16, 0.9, intervention_count=1)
    )
    assert verdict.action is Action.ROLLBACK
    assert dict(verdict.loss_weights) == {}
    assert verdict.reason.endswith("rolling back to LR 0.005 (weights were not reported).")
