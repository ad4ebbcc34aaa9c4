"""Intervention effects end to end: a run with automatic interventions, a guard rollback,
an operator's override and an operator's ROLLBACK is recorded on a real server; GetRun's
effects, GetEffectSummary's groups and `controlctl run` / `controlctl effects` are checked
against values computed by hand.

The run (policy "eager": patience 1, cooldown 0, warmup 2, min_delta 1% rel, mode
min, guard_epochs 2, tolerance 50%; default horizon 2 + 1 = 3), by epoch:

    epoch  val_loss  grad  decision
    0, 1   1.00 0.90                     (best 0.90)
    2, 3   0.95 0.95       3: INTERVENE #1 (two epochs without a 1% gain > patience 1)
    4, 5   0.85 0.84                     (new bests; the guard sees no divergence)
    6, 7   0.86 0.86  7:0.3  7: INTERVENE #2 (random mix)
    8      1.40            ROLLBACK by the guard: 1.40 > 0.86 * 1.5 (undoes #2)
    9      0.83
    10     0.82            INTERVENE by the operator's `once` override (LR 0.005)
    11     0.81
    12     0.815  0.8      ROLLBACK by the operator (its override names epoch 10)
    13..15 0.80 0.79 0.79
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from control_server.ctl.render import weights_text
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report
from tests.integration.test_admin import EAGER_VERSION, Trainer, put_eager, rpc_error
from tests.integration.test_ctl import Ctl, run_ctl  # noqa: F401  (a fixture)
from tests.integration.test_experiments import ARMS, SELECTOR
from tests.integration.test_run_attempts import start
from trainer_client.api import control_pb2 as pb

VAL = [1.00, 0.90, 0.95, 0.95, 0.85, 0.84, 0.86, 0.86, 1.40, 0.83, 0.82, 0.81, 0.815]
VAL += [0.80, 0.79, 0.79]
GRAD = {7: 0.3, 12: 0.8}


@dataclass
class Run(Trainer):
    """The trainer of test_admin, reporting these val losses and gradient norms."""

    def report(self, epoch: int, val_loss: float = 0.5) -> pb.EpochReport:
        msg = super().report(epoch, VAL[epoch])
        msg.avg_gradient_norm = GRAD.get(epoch, 0.05)
        return msg


def record_the_run(stubs: Stubs) -> list[pb.Decision]:
    stubs.admin.ActivatePolicy(pb.ActivatePolicyRequest(version=put_eager(stubs)))
    run = Run("run-a")
    decisions = run.run(stubs, range(10))
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-a", lr=0.005, once=True, reason="try lower")
    )
    decisions += run.run(stubs, range(10, 12))
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-a", action=pb.ROLLBACK, reason="undo it")
    )
    decisions += run.run(stubs, range(12, 16))
    # Another dataset's run without interventions: counted in the runs, not the effects.
    for epoch in range(3):
        labels = pb.RunLabels(dataset="Dataset007_Other", configuration="2d", fold="0")
        stubs.control.ReportEpoch(epoch_report("run-b", epoch, labels=labels))
    return decisions


@pytest.fixture
def recorded(stubs: Stubs) -> list[pb.Decision]:
    decisions = record_the_run(stubs)
    steered = {
        e: (pb.Action.Name(d.action), pb.Source.Name(d.source), d.intervention_index)
        for e, d in enumerate(decisions)
        if d.action != pb.NONE
    }
    assert steered == {
        3: ("INTERVENE", "POLICY", 1),
        7: ("INTERVENE", "POLICY", 2),
        8: ("ROLLBACK", "SAFETY", 0),
        10: ("INTERVENE", "OVERRIDE", 0),
        12: ("ROLLBACK", "OVERRIDE", 0),
    }
    return decisions


def effect_fields(effect: pb.InterventionEffect) -> dict[str, Any]:
    fields = ("kind", "value_at_decision", "best_before", "best_after", "relative_change")
    more = ("new_best", "epochs_to_new_best", "rolled_back", "rolled_back_at_epoch")
    more += ("horizon", "epochs_observed", "grad_norm_bucket", "loss_mix")
    got = {f: getattr(effect, f) for f in (*fields, *more)}
    for name in ("best_after", "relative_change", "epochs_to_new_best", "rolled_back_at_epoch"):
        if not effect.HasField(name):
            got[name] = None
    return got


def test_get_run_shows_each_effect(stubs: Stubs, recorded: list[pb.Decision]) -> None:
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-a"))
    effects = {e.report.epoch: e.effect for e in run.epochs if e.HasField("effect")}
    assert sorted(effects) == [3, 7, 8, 10, 12]
    assert {e.metric for e in effects.values()} == {"val_loss"}
    assert {e.mode for e in effects.values()} == {"min"}
    mix2 = weights_text(recorded[7].loss_weights)
    approx = pytest.approx
    assert {e: effect_fields(effect) for e, effect in effects.items()} == {
        # best before: 0.90 (epoch 1); epochs 4..6: .85 .84 .86 -> 0.84, below 0.90 at 4.
        3: {
            "kind": "1",
            "value_at_decision": 0.95,
            "best_before": 0.90,
            "best_after": 0.84,
            "relative_change": approx(0.06 / 0.90),  # +6.67%
            "new_best": True,
            "epochs_to_new_best": 1,
            "rolled_back": False,
            "rolled_back_at_epoch": None,
            "horizon": 3,
            "epochs_observed": 3,
            "grad_norm_bucket": "0.01<=g<0.1",
            "loss_mix": "ce=1,dice=1",  # intervention 1 keeps the weights
        },
        # best before 0.84 (epoch 5); epochs 8..10: 1.40 .83 .82 -> 0.82; 0.83 at 9.
        7: {
            "kind": "2",
            "value_at_decision": 0.86,
            "best_before": 0.84,
            "best_after": 0.82,
            "relative_change": approx(0.02 / 0.84),  # +2.38%
            "new_best": True,
            "epochs_to_new_best": 2,
            "rolled_back": True,  # by the guard at 8
            "rolled_back_at_epoch": 8,
            "horizon": 3,
            "epochs_observed": 3,
            "grad_norm_bucket": "0.1<=g<=0.5",
            "loss_mix": mix2,
        },
        # epochs 9..11: .83 .82 .81 -> 0.81; 0.83 < 0.84 at 9. Restores epoch 7's weights.
        8: {
            "kind": "rollback",
            "value_at_decision": 1.40,
            "best_before": 0.84,
            "best_after": 0.81,
            "relative_change": approx(0.03 / 0.84),  # +3.57%
            "new_best": True,
            "epochs_to_new_best": 1,
            "rolled_back": False,
            "rolled_back_at_epoch": None,
            "horizon": 3,
            "epochs_observed": 3,
            "grad_norm_bucket": "0.01<=g<0.1",
            "loss_mix": "ce=1,dice=1",
        },
        # best before: 0.82, its own epoch; epochs 11..13: .81 .815 .80 -> 0.80.
        10: {
            "kind": "override",
            "value_at_decision": 0.82,
            "best_before": 0.82,
            "best_after": 0.80,
            "relative_change": approx(0.02 / 0.82),  # +2.44%
            "new_best": True,
            "epochs_to_new_best": 1,
            "rolled_back": True,  # the operator's ROLLBACK at 12 names epoch 10
            "rolled_back_at_epoch": 12,
            "horizon": 3,
            "epochs_observed": 3,
            "grad_norm_bucket": "0.01<=g<0.1",
            "loss_mix": "unchanged",  # the override set the LR only
        },
        # best before 0.81 (epoch 11); epochs 13..15: .80 .79 .79 -> 0.79.
        12: {
            "kind": "rollback",
            "value_at_decision": 0.815,
            "best_before": 0.81,
            "best_after": 0.79,
            "relative_change": approx(0.02 / 0.81),  # +2.47%
            "new_best": True,
            "epochs_to_new_best": 1,
            "rolled_back": False,
            "rolled_back_at_epoch": None,
            "horizon": 3,
            "epochs_observed": 3,
            "grad_norm_bucket": "g>0.5",
            "loss_mix": "ce=1,dice=1",  # epoch 10's weights
        },
    }


def test_a_page_judges_effects_over_the_whole_run_and_the_horizon_can_be_set(
    stubs: Stubs, recorded: list[pb.Decision]
) -> None:
    # Epochs 5..9: the rollback at 8 is judged over 9..11, beyond the page.
    page = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-a", from_epoch=5, page_size=5))
    effects = {e.report.epoch: e.effect for e in page.epochs if e.HasField("effect")}
    assert sorted(effects) == [7, 8]
    assert (effects[8].best_after, effects[8].epochs_observed) == (0.81, 3)
    # A horizon of 1: #2 (epoch 7) sees only epoch 8's 1.40.
    one = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-a", effect_horizon=1))
    e7 = next(e.effect for e in one.epochs if e.report.epoch == 7)
    assert (e7.horizon, e7.epochs_observed, e7.best_after) == (1, 1, 1.40)
    assert e7.relative_change == pytest.approx((0.84 - 1.40) / 0.84)  # -66.7%
    assert (e7.new_best, e7.HasField("epochs_to_new_best")) == (False, False)
    for request in (
        pb.GetRunRequest(run_id="run-a", effect_horizon=-1),
        pb.GetRunRequest(run_id="run-a", effect_horizon=10_001),
    ):
        err = rpc_error(lambda r=request: stubs.admin.GetRun(r))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "effect_horizon" in (err.details() or "")


def test_get_effect_summary_sums_the_effects(stubs: Stubs, recorded: list[pb.Decision]) -> None:
    summary = stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest())
    assert (summary.runs, summary.decisions) == (2, 5)
    # Relative changes .0666667 .0238095 .0357143 .0243902 .0246914 (epochs 3, 7, 8, 10,
    # 12): mean 0.1752721 / 5, median 0.02 / 0.81; epochs to a new best 1 2 1 1 1 -> 6 / 5.
    changes = [0.06 / 0.90, 0.02 / 0.84, 0.03 / 0.84, 0.02 / 0.82, 0.02 / 0.81]
    (policy,) = summary.by_policy
    assert (policy.key, policy.count, policy.complete) == (EAGER_VERSION, 5, 5)
    assert (policy.new_best, policy.rolled_back) == (5, 2)
    assert policy.mean_relative_change == pytest.approx(sum(changes) / 5)  # 0.0350544
    assert policy.median_relative_change == pytest.approx(0.02 / 0.81)
    assert policy.mean_epochs_to_new_best == pytest.approx(1.2)
    kinds = {g.key: (g.count, g.new_best, g.rolled_back) for g in summary.by_kind}
    assert kinds == {"1": (1, 1, 0), "2": (1, 1, 1), "override": (1, 1, 1), "rollback": (2, 2, 0)}
    rollback = summary.by_kind[-1]
    assert rollback.mean_relative_change == pytest.approx((0.03 / 0.84 + 0.02 / 0.81) / 2)
    buckets = {g.key: g.count for g in summary.by_grad_norm_bucket}
    assert buckets == {"0.01<=g<0.1": 3, "0.1<=g<=0.5": 1, "g>0.5": 1}
    mix2 = weights_text(recorded[7].loss_weights)
    mixes = {g.key: g.count for g in summary.by_loss_mix}
    assert mixes == {"ce=1,dice=1": 3, mix2: 1, "unchanged": 1}

    other = stubs.admin.GetEffectSummary(
        pb.GetEffectSummaryRequest(selector=pb.RunSelector(dataset="Dataset007_Other"))
    )
    assert (other.runs, other.decisions, list(other.by_kind)) == (1, 0, [])
    assert (
        stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest(policy_version="nope")).decisions
        == 0
    )
    # A horizon of 1 for all: #1 sees .85 (new best), #2 1.40, the guard's rollback .83,
    # the override .81, the operator's rollback .80: all but #2 a new best at once.
    short = stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest(horizon=1))
    (policy,) = short.by_policy
    assert (policy.new_best, policy.mean_epochs_to_new_best) == (4, 1.0)
    err = rpc_error(
        lambda: stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest(horizon=10_001))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "horizon" in (err.details() or "")
    err = rpc_error(
        lambda: stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest(experiment="nope"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_an_experiments_summary_counts_only_its_runs(
    stubs: Stubs, recorded: list[pb.Decision]
) -> None:
    # run-a and run-b reported before the experiment: never assigned, never counted.
    stubs.admin.StartExperiment(
        pb.StartExperimentRequest(name="lr-boost", selector=SELECTOR, arms=ARMS)
    )
    steered = 0
    for run_id in ("run-x", "run-y", "run-z", "run-w"):
        start(stubs, run_id)
        decisions = Trainer(run_id).run(stubs, range(8))  # val_loss 0.5 throughout
        steered += sum(d.action != pb.NONE for d in decisions)
    arms = {r.arm for r in stubs.admin.ListRuns(pb.ListRunsRequest(experiment="lr-boost")).runs}
    assert arms == {"observe", "eager"} and steered > 0
    summary = stubs.admin.GetEffectSummary(pb.GetEffectSummaryRequest(experiment="lr-boost"))
    assert (summary.runs, summary.decisions) == (4, steered)
    # A flat loss: every best after equals the best before (0.5): no change, no new best.
    (policy,) = summary.by_policy
    assert (policy.key, policy.count, policy.new_best) == (EAGER_VERSION, steered, 0)
    assert (policy.mean_relative_change, policy.median_relative_change) == (0.0, 0.0)
    assert not policy.HasField("mean_epochs_to_new_best")


def test_controlctl_shows_effects(
    server: ServerThread,
    recorded: list[pb.Decision],
    run_ctl: Ctl,  # noqa: F811
) -> None:
    target = server.target
    shown = run_ctl(target, "run", "run-a")
    assert shown.code == 0
    lines = shown.out.splitlines()
    header = next(line for line in lines if line.startswith("EPOCH"))
    assert "EFFECT" in header
    rows = {int(line.split()[0]): line for line in lines[lines.index(header) + 1 :][:16]}
    assert "+6.7% new best in 1" in rows[3]
    assert "+2.4% new best in 2, rolled back @8" in rows[7]
    assert "+2.4% new best in 1, rolled back @12" in rows[10]
    assert "+3.6% new best in 1" in rows[8]

    effects = run_ctl(target, "effects")
    assert effects.code == 0, effects.err
    out = effects.out
    assert out.startswith("5 interventions, overrides and rollbacks in 2 runs")
    tables = out.split("\n\n")
    assert [t.split()[0] for t in tables[1:]] == ["POLICY", "KIND", "GRAD", "LOSS"]
    kind_rows = {line.split()[0]: line.split()[1:] for line in tables[2].splitlines()[1:]}
    # rollback: count 2, complete 2, new best 2, rolled back 0, mean and median +3.0%
    # ((3.571% + 2.469%) / 2), 1 epoch to a new best.
    assert kind_rows["rollback"] == ["2", "2", "2", "0", "+3.0%", "+3.0%", "1"]
    assert kind_rows["2"] == ["1", "1", "1", "1", "+2.4%", "+2.4%", "2"]
    got = json.loads(run_ctl(target, "effects", "--horizon", "1", "--json").out)
    assert got["decisions"] == 5 and got["by_policy"][0]["new_best"] == 4
    only = run_ctl(target, "effects", "--dataset", "Dataset007_Other")
    assert only.out.startswith("0 interventions, overrides and rollbacks in 1 runs")
    missing = run_ctl(target, "effects", "--experiment", "nope")
    assert missing.code == 2 and "NOT_FOUND" in missing.err
