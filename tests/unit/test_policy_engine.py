"""Overrides, the state's JSON form, last_verdict() and the package's exports."""

from __future__ import annotations

import math
from typing import Any

import pytest

import control_server.policy as policy_pkg
from control_server.domain import Action, Override, Source, frozen_map
from control_server.policy import (
    INITIAL_STATE,
    InterventionMark,
    PolicyState,
    last_verdict,
    parse_policy,
    step,
)
from tests.factories import policy_report

VERSION = "v-test"
DEFAULT = parse_policy({})
WEIGHTS = frozen_map({"dice": 1.0, "ce": 1.0})
DUE = PolicyState(best=0.30, num_bad_epochs=3, last_epoch=14)
CALM = PolicyState(best=0.30, last_epoch=14)


def override(**fields: Any) -> Override:
    return Override(run_id="run-a", actor="alice", reason="testing a lower LR.", **fields)


# --- overrides --------------------------------------------------------------


def test_override_sets_the_lr() -> None:
    verdict, state = step(DEFAULT, VERSION, CALM, policy_report(), override(lr=0.001))
    assert (verdict.action, verdict.source) == (Action.INTERVENE, Source.OVERRIDE)
    assert (verdict.lr, dict(verdict.loss_weights), verdict.intervention_index) == (0.001, {}, 0)
    assert verdict.reason == "Override by alice (testing a lower LR): LR 0.005 -> 0.001."
    # Plateau state goes on as usual; overrides set no guard mark.
    assert (state.num_bad_epochs, state.mark) == (1, None)


def test_override_is_not_capped() -> None:
    verdict, _ = step(DEFAULT, VERSION, CALM, policy_report(), override(lr=0.5))
    assert verdict.lr == 0.5


def test_override_sets_the_weights() -> None:
    weights = frozen_map({"dice": 1.0, "focal": 0.5})
    verdict, _ = step(DEFAULT, VERSION, CALM, policy_report(), override(loss_weights=weights))
    assert (verdict.action, verdict.source, verdict.lr) == (Action.INTERVENE, Source.OVERRIDE, None)
    assert dict(verdict.loss_weights) == {"dice": 1.0, "focal": 0.5}
    assert verdict.reason.endswith(": weights dice 1, focal 0.5.")


def test_override_at_a_plateau_takes_its_place_without_using_the_budget() -> None:
    verdict, state = step(
        DEFAULT, VERSION, DUE, policy_report(), override(lr=0.001, loss_weights=WEIGHTS)
    )
    assert (verdict.source, verdict.intervention_index) == (Source.OVERRIDE, 0)
    assert verdict.reason == (
        "Override by alice (testing a lower LR): LR 0.005 -> 0.001 and weights ce 1, dice 1, "
        "in place of the automatic intervention due now."
    )
    assert (state.num_bad_epochs, state.cooldown_left, state.mark) == (0, 2, None)


def test_hold_turns_a_plateau_into_none() -> None:
    hold = Override(run_id="run-a", actor="bob", reason="investigating", hold_interventions=True)
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(), hold)
    assert (verdict.action, verdict.source, verdict.lr) == (Action.NONE, Source.OVERRIDE, None)
    assert verdict.reason.startswith("Plateau: val_loss 0.3222 is worse than the best 0.3;")
    assert verdict.reason.endswith("but automatic interventions are held by bob: investigating.")
    assert (state.num_bad_epochs, state.cooldown_left, state.mark) == (0, 2, None)


def test_hold_without_a_plateau_is_the_plain_policy() -> None:
    hold = Override(run_id="run-a", actor="bob", reason="", hold_interventions=True)
    held, held_state = step(DEFAULT, VERSION, CALM, policy_report(), hold)
    plain, plain_state = step(DEFAULT, VERSION, CALM, policy_report())
    assert (held, held_state) == (plain, plain_state)
    assert held.source is Source.POLICY


def test_hold_beats_a_spent_budget_stop() -> None:
    policy = parse_policy({"interventions": {"stop_when_exhausted": True}})
    hold = Override(run_id="run-a", actor="bob", reason="", hold_interventions=True)
    verdict, _ = step(policy, VERSION, DUE, policy_report(intervention_count=3), hold)
    assert (verdict.action, verdict.source) == (Action.NONE, Source.OVERRIDE)
    assert verdict.reason.endswith("held by bob.")


def test_safety_beats_overrides() -> None:
    verdict, _ = step(DEFAULT, VERSION, CALM, policy_report(value=math.nan), override(lr=0.001))
    assert (verdict.action, verdict.source) == (Action.STOP, Source.SAFETY)
    mark = InterventionMark(epoch=14, k=1, value=0.3, lr_before=0.002, weights_before=WEIGHTS)
    armed = PolicyState(best=0.3, mark=mark)
    verdict, _ = step(
        DEFAULT, VERSION, armed, policy_report(value=0.9, intervention_count=1), override(lr=0.001)
    )
    assert (verdict.action, verdict.source, verdict.lr) == (Action.ROLLBACK, Source.SAFETY, 0.002)


# --- state ------------------------------------------------------------------


STATES = [
    INITIAL_STATE,
    PolicyState(best=-0.4123, num_bad_epochs=2, cooldown_left=1, ema=-0.41, last_epoch=7),
    PolicyState(
        best=0.1 + 0.2,
        last_epoch=0,
        mark=InterventionMark(epoch=15, k=3, value=0.3222, lr_before=0.005, weights_before=WEIGHTS),
    ),
    PolicyState(best=1e-300, mark=InterventionMark(epoch=0, k=1, value=-0.0, lr_before=0.0)),
]


@pytest.mark.parametrize("state", STATES)
def test_state_json_round_trip(state: PolicyState) -> None:
    text = state.to_json()
    assert PolicyState.from_json(text) == state
    assert PolicyState.from_json(text).to_json() == text
    assert " " not in text


def test_state_json_is_deterministic_and_compact() -> None:
    assert INITIAL_STATE.to_json() == (
        '{"best":null,"cooldown_left":0,"ema":null,"last_epoch":null,"mark":null,'
        '"num_bad_epochs":0,"v":1}'
    )
    weights_a = frozen_map({"dice": 1.0, "ce": 1.0})
    weights_b = frozen_map({"ce": 1.0, "dice": 1.0})
    a = PolicyState(mark=InterventionMark(1, 1, 0.3, 0.01, weights_a))
    b = PolicyState(mark=InterventionMark(1, 1, 0.3, 0.01, weights_b))
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("not json", "not valid JSON"),
        ("[]", "state.state must be an object"),
        ('{"v": 2}', "state.v"),
        ('{"v": 1, "num_bad_epochs": 1.5}', "state.num_bad_epochs"),
        ('{"v": 1, "best": "x"}', "state.best"),
        ('{"v": 1, "mark": {"epoch": 1, "k": 1, "value": 0.1}}', "state.mark.lr_before"),
    ],
)
def test_state_from_bad_json_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyState.from_json(text)


# --- last_verdict -----------------------------------------------------------------


def test_last_verdict_folds_the_reports_and_applies_the_override_last() -> None:
    reports = [policy_report(e, v) for e, v in enumerate([0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3])]
    verdict = last_verdict(DEFAULT, VERSION, reports)
    assert (verdict.action, verdict.intervention_index) == (Action.INTERVENE, 1)
    # An override passed to last_verdict() applies to the last report only.
    assert last_verdict(DEFAULT, VERSION, reports, override(lr=0.001)).source is Source.OVERRIDE
    assert last_verdict(DEFAULT, VERSION, reports[:-1], override(lr=0.001)).lr == 0.001
    assert last_verdict(DEFAULT, VERSION, reports[:-1]).action is Action.NONE


def test_last_verdict_needs_a_report() -> None:
    with pytest.raises(ValueError, match="at least one report"):
        last_verdict(DEFAULT, VERSION, [])


def test_first_report_sets_the_best() -> None:
    verdict, state = step(DEFAULT, VERSION, INITIAL_STATE, policy_report(0, 0.7))
    assert (verdict.action, verdict.source) == (Action.NONE, Source.POLICY)
    assert verdict.reason == "val_loss 0.7 sets the first best; warmup until epoch 5."
    assert (state.best, state.last_epoch) == (0.7, 0)


# --- exports ----------------------------------------------------------------


def test_all_is_honest() -> None:
    public = {name for name in vars(policy_pkg) if not name.startswith("_")}
    modules = {"document", "engine", "guard", "plateau", "scaling", "state", "weights"}
    assert set(policy_pkg.__all__) == public - modules
    for name in policy_pkg.__all__:
        assert getattr(policy_pkg, name) is not None
