"""An operator's STOP and ROLLBACK overrides in the engine: they win over everything."""

from __future__ import annotations

import math
from typing import Any

from control_server.domain import Action, Override, Source, frozen_map
from control_server.policy import InterventionMark, PolicyState, parse_policy, step
from tests.factories import policy_report

VERSION = "v-test"
DEFAULT = parse_policy({})
WEIGHTS = frozen_map({"dice": 1.0, "ce": 1.0})
#: A plateau due now, an automatic intervention at epoch 13 still watched by the guard.
MARK = InterventionMark(epoch=13, k=1, value=0.30, lr_before=0.004, weights_before=WEIGHTS)
DUE = PolicyState(best=0.30, num_bad_epochs=3, last_epoch=14, mark=MARK)


def operator(action: Action, **fields: Any) -> Override:
    return Override(
        run_id="run-a", actor="alice", reason="the labels are wrong.", action=action, **fields
    )


def test_a_stop_wins_over_a_due_plateau_and_leaves_the_counters() -> None:
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(), operator(Action.STOP))
    assert (verdict.action, verdict.source) == (Action.STOP, Source.OVERRIDE)
    assert verdict.reason == "Override by alice (the labels are wrong): stopping the run."
    assert (verdict.lr, dict(verdict.loss_weights), verdict.intervention_index) == (None, {}, 0)
    assert (state.best, state.num_bad_epochs, state.last_epoch) == (0.30, 3, 15)


def test_a_stop_wins_over_the_guard_and_a_non_finite_loss() -> None:
    diverged = policy_report(epoch=14, value=math.nan, intervention_count=1)
    verdict, _ = step(DEFAULT, VERSION, DUE, diverged, operator(Action.STOP))
    assert (verdict.action, verdict.source) == (Action.STOP, Source.OVERRIDE)


def test_a_rollback_restores_what_the_override_names_and_clears_the_mark() -> None:
    rollback = operator(Action.ROLLBACK, lr=0.004, loss_weights=WEIGHTS, rollback_epoch=13)
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(epoch=14), rollback)
    assert (verdict.action, verdict.source) == (Action.ROLLBACK, Source.OVERRIDE)
    assert (verdict.lr, verdict.loss_weights, verdict.intervention_index) == (0.004, WEIGHTS, 0)
    assert verdict.reason == (
        "Override by alice (the labels are wrong): rolling back the intervention of epoch 13 "
        "to LR 0.004 and weights ce 1, dice 1."
    )
    # As the guard's rollback: best stays, the counters reset with a cooldown, no mark.
    assert (state.best, state.num_bad_epochs, state.mark) == (0.30, 0, None)
    assert state.cooldown_left == DEFAULT.plateau.cooldown


def test_a_rollback_of_an_epoch_with_no_weights_says_so() -> None:
    rollback = operator(Action.ROLLBACK, lr=0.004, rollback_epoch=13)
    verdict, _ = step(DEFAULT, VERSION, DUE, policy_report(epoch=14), rollback)
    assert verdict.reason.endswith("to LR 0.004 (weights were not reported).")
    assert dict(verdict.loss_weights) == {}
