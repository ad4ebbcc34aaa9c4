"""Properties over random policies and report sequences (hypothesis)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from control_server.domain import Action, Override, Report, Source, Verdict, frozen_map
from control_server.policy import (
    INITIAL_STATE,
    PolicyDoc,
    PolicyState,
    last_verdict,
    parse_policy,
    step,
)

VERSION = "v-prop"
SETTINGS = settings(max_examples=200, deadline=None, database=None)
MIXES = [{"dice": 1.0, "ce": 1.0}, {"dice": 0.6, "focal": 0.4}, {"dice": 0.5, "variance": 0.5}]
# A few repeated values make plateaus (and therefore interventions) common.
PLATEAU_VALUES = [0.3, 0.3222, 0.31, 0.6455, -0.4, -0.41, math.inf]


@st.composite
def policies(draw: st.DrawFn) -> PolicyDoc:
    edges = sorted(
        draw(st.sets(st.floats(0.0, 2.0, allow_subnormal=False), min_size=3, max_size=3))
    )
    return parse_policy(
        {
            "plateau": {
                "monitor": draw(st.sampled_from(["val_loss", "train_loss"])),
                "mode": draw(st.sampled_from(["min", "max"])),
                "patience": draw(st.integers(0, 4)),
                "cooldown": draw(st.integers(0, 3)),
                "min_delta": draw(st.sampled_from([0.0, 0.001, 0.01, 0.1])),
                "threshold_mode": draw(st.sampled_from(["rel", "abs"])),
                "warmup_epochs": draw(st.integers(0, 6)),
                "ema_alpha": draw(st.none() | st.floats(0.05, 1.0)),
            },
            "interventions": {
                "max_interventions": draw(st.integers(0, 4)),
                "grad_norm_edges": edges,
                "lr_scales": draw(st.lists(st.floats(0.1, 20.0), min_size=4, max_size=4)),
                "missing_grad_norm": draw(st.floats(0.0, 1.0)),
                "damping": draw(st.lists(st.floats(0.1, 2.0), min_size=1, max_size=4)),
                "max_lr": draw(st.none() | st.floats(1e-5, 0.1)),
                "stop_when_exhausted": draw(st.booleans()),
            },
            "guard": {
                "guard_epochs": draw(st.integers(0, 3)),
                "rollback_tolerance": draw(st.floats(0.0, 1.0)),
                "on_nonfinite": draw(st.sampled_from(["stop", "none"])),
            },
        }
    )


# Mostly values that repeat (plateaus, hence interventions), some random, 1 in 16 not finite.
losses = st.sampled_from([*PLATEAU_VALUES, math.nan]) | st.floats(-2.0, 2.0, allow_subnormal=False)


@dataclass(frozen=True)
class Epoch:
    """What a simulated trainer produces in one epoch (its bookkeeping comes from the verdicts)."""

    gap: int
    train: float
    val: float | None
    grad: float | None
    lr: float
    initial_lr: float
    applies: bool  # whether the client gets and applies an INTERVENE (fail-open otherwise)
    override: Override | None


overrides = st.none() | st.builds(
    Override,
    run_id=st.just("run-p"),
    actor=st.sampled_from(["alice", "bob"]),
    reason=st.sampled_from(["", "manual check."]),
    lr=st.none() | st.floats(0.0, 1.0),
    loss_weights=st.sampled_from([{}, *MIXES]).map(frozen_map),
    hold_interventions=st.booleans(),
)

epochs = st.builds(
    Epoch,
    gap=st.integers(1, 2),
    train=losses,
    val=st.none() | losses,
    grad=st.none() | st.floats(0.0, 2.0),
    # 0.01 for both often: an LR at its cap, where an intervention may change nothing.
    lr=st.just(0.01) | st.floats(0.0, 0.05),
    initial_lr=st.just(0.01) | st.floats(1e-4, 0.05),
    applies=st.sampled_from([True, True, True, True, False]),
    override=st.none() | st.none() | st.none() | overrides,
)


def simulate(
    doc: PolicyDoc, run: list[Epoch], *, with_overrides: bool, via_json: bool
) -> tuple[list[Report], list[Verdict]]:
    """Fold step() over a run whose client applies what it is told."""
    state: PolicyState = INITIAL_STATE
    reports: list[Report] = []
    verdicts: list[Verdict] = []
    epoch, count, weights = 0, 0, frozen_map(MIXES[0])
    for item in run:
        report = Report(
            run_id="run-p",
            epoch=epoch,
            train_loss=item.train,
            val_loss=item.val,
            avg_gradient_norm=item.grad,
            current_lr=item.lr,
            initial_lr=item.initial_lr,
            intervention_count=count,
            loss_weights=weights,
        )
        verdict, state = step(
            doc, VERSION, state, report, item.override if with_overrides else None
        )
        if via_json:
            text = state.to_json()
            parsed = PolicyState.from_json(text)
            assert parsed == state
            assert parsed.to_json() == text
            state = parsed
        if verdict.action in (Action.INTERVENE, Action.ROLLBACK) and item.applies:
            count += verdict.intervention_index > 0
            weights = verdict.loss_weights or weights
        reports.append(report)
        verdicts.append(verdict)
        epoch += item.gap
    return reports, verdicts


runs = st.lists(epochs, min_size=1, max_size=25)


@given(doc=policies(), run=runs)
@SETTINGS
def test_lr_bounds_and_json_state_round_trip(doc: PolicyDoc, run: list[Epoch]) -> None:
    """One set of runs checks both (hypothesis' data generation is the slow part)."""
    reports, verdicts = simulate(doc, run, with_overrides=True, via_json=False)
    for report, verdict in zip(reports, verdicts, strict=True):
        if verdict.lr is not None:
            assert verdict.lr >= 0
        if verdict.action is Action.INTERVENE and verdict.source is Source.POLICY:
            cap = doc.interventions.max_lr or report.initial_lr
            assert verdict.lr is not None
            assert verdict.lr <= cap
            assert verdict.intervention_index == report.intervention_count + 1
            assert 1 <= verdict.intervention_index <= doc.interventions.max_interventions
            # An automatic intervention always changes something the trainer would notice.
            assert not math.isclose(verdict.lr, report.current_lr, rel_tol=1e-9) or dict(
                verdict.loss_weights
            ) != dict(report.loss_weights)
        if verdict.action is Action.ROLLBACK:
            assert verdict.source is Source.SAFETY
            assert verdict.lr is not None
        if not report.losses_finite:
            assert verdict.source is Source.SAFETY
        assert verdict.reason.endswith(".")
    # What the server does: the state lives in the store as JSON between reports.
    assert simulate(doc, run, with_overrides=True, via_json=True) == (reports, verdicts)


@given(doc=policies(), run=runs, last_override=overrides, data=st.data())
@SETTINGS
def test_last_verdict_is_deterministic_and_equals_the_fold(
    doc: PolicyDoc, run: list[Epoch], last_override: Override | None, data: st.DataObject
) -> None:
    reports, verdicts = simulate(doc, run, with_overrides=False, via_json=False)
    n = data.draw(st.integers(1, len(reports)), label="prefix")
    assert last_verdict(doc, VERSION, reports[:n]) == verdicts[n - 1]
    assert last_verdict(doc, VERSION, reports) == verdicts[-1]
    first = last_verdict(doc, VERSION, reports, last_override)
    assert last_verdict(doc, VERSION, list(reports), last_override) == first
