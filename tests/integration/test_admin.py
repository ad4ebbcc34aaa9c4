"""ControlAdmin end to end: overrides, policy rollout (pins, shadow), audit queries and
the live tail, against a real aio server on port 0 with a real SQLite store."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_server.policy.document import parse_policy
from control_server.policy_files import default_policy
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report
from tests.integration.test_cli import cli
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

LABELS = pb.RunLabels(dataset="Dataset042_Disc", configuration="2d", fold="0")
EAGER = {"name": "eager", "plateau": {"patience": 1, "cooldown": 0, "warmup_epochs": 2}}
EAGER_VERSION = parse_policy(EAGER).version
DEFAULT_VERSION = default_policy().version
#: Seconds a streaming read may wait in these tests.
STREAM_DEADLINE = 10.0


@dataclass
class Trainer:
    """A simulated run with a flat loss that applies what it is told, as the client does."""

    run_id: str
    labels: pb.RunLabels = field(default_factory=lambda: LABELS)
    lr: float = 0.001
    count: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {"dice": 1.0, "ce": 1.0})

    def report(self, epoch: int, val_loss: float = 0.5) -> pb.EpochReport:
        return epoch_report(
            self.run_id,
            epoch,
            train_loss=val_loss,
            val_loss=val_loss,
            intervention_count=self.count,
            current_lr=self.lr,
            loss_weights=self.weights,
            labels=self.labels,
        )

    def apply(self, decision: pb.Decision) -> pb.Decision:
        if decision.action in (pb.INTERVENE, pb.ROLLBACK):
            if decision.HasField("lr"):
                self.lr = decision.lr
            if decision.loss_weights:
                self.weights = dict(decision.loss_weights)
        self.count = max(self.count, decision.intervention_index)
        return decision

    def run(self, stubs: Stubs, epochs: Iterable[int]) -> list[pb.Decision]:
        return [self.apply(stubs.control.ReportEpoch(self.report(e))) for e in epochs]


def struct(data: dict[str, Any]) -> Struct:
    document = Struct()
    document.update(data)
    return document


def put_eager(stubs: Stubs) -> str:
    put = stubs.admin.PutPolicy(pb.PutPolicyRequest(document=struct(EAGER)))
    assert put.policy.version == EAGER_VERSION
    return str(put.policy.version)


def admin_events(server: ServerThread, action: str) -> list[dict[str, Any]]:
    """The server's audit records of `action` calls, refusals written out first."""
    server.call(server.running.audit.flush())
    return [e for e in server.running.store.admin_events() if e["action"] == action]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# --- overrides ------------------------------------------------------------------------


def test_a_once_override_reaches_the_next_report_exactly_once(stubs: Stubs) -> None:
    run = Trainer("run-once")
    run.run(stubs, range(2))
    override = stubs.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-once", lr=0.02, once=True, exceed_lr_cap=True, reason="warm restart"
        )
    )
    assert override.override_id > 0
    assert override.actor == "anonymous" and override.reason == "warm restart"
    assert override.HasField("created_at") and not override.HasField("cleared_at")

    sent = run.report(2)
    applied = run.apply(stubs.control.ReportEpoch(sent))
    assert (applied.action, applied.source) == (pb.INTERVENE, pb.OVERRIDE)
    assert applied.lr == pytest.approx(0.02)
    assert applied.intervention_index == 0
    assert applied.override_id == override.override_id
    assert "anonymous" in applied.reason and "warm restart" in applied.reason

    retried = stubs.control.ReportEpoch(sent)  # a retry repeats the report it retries
    assert retried == applied
    after = stubs.control.ReportEpoch(run.report(3))
    assert (after.source, after.override_id) == (pb.POLICY, 0)

    assert stubs.admin.ListOverrides(pb.ListOverridesRequest(run_id="run-once")).overrides == []
    [consumed] = stubs.admin.ListOverrides(
        pb.ListOverridesRequest(run_id="run-once", include_cleared=True)
    ).overrides
    assert consumed.cleared_by == "consumed by epoch 2"
    assert consumed.cleared_at == applied.decided_at


def test_a_once_override_applies_once_under_concurrent_retries(stubs: Stubs) -> None:
    run = Trainer("run-race")
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-race", lr=0.03, once=True, allow_unknown_run=True)
    )

    def report(epoch: int) -> pb.Decision:
        return stubs.control.ReportEpoch(run.report(epoch))

    with ThreadPoolExecutor(max_workers=8) as pool:
        decisions = list(pool.map(report, [0] * 8 + [1] * 8))
    by_epoch = {
        d.epoch: {x.decision_id for x in decisions if x.epoch == d.epoch} for d in decisions
    }
    assert all(len(ids) == 1 for ids in by_epoch.values())
    sources = {d.epoch: d.source for d in decisions}
    # Exactly one of the two epochs (whichever was stored first) used the override.
    assert sorted(sources.values()) == sorted([pb.OVERRIDE, pb.POLICY])


def test_a_once_override_applies_exactly_once_under_concurrent_reports(stubs: Stubs) -> None:
    once = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-race", lr=0.02, once=True, allow_unknown_run=True)
    )
    run = Trainer("run-race")
    # Every epoch sent four times at once (retries racing their original): the
    # context is read, decided on and written in one transaction, so exactly one
    # decision takes the override, and each epoch gets one decision.
    decisions: list[pb.Decision] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for epoch in range(8):
            decisions += pool.map(stubs.control.ReportEpoch, [run.report(epoch)] * 4)
    by_epoch = {d.epoch: d.decision_id for d in decisions}
    assert sorted(by_epoch) == list(range(8))
    assert {d.decision_id for d in decisions} == set(by_epoch.values())
    used = {d.decision_id for d in decisions if d.override_id == once.override_id}
    assert len(used) == 1


def test_a_held_override_applies_until_cleared(stubs: Stubs) -> None:
    run = Trainer("run-held")
    override = stubs.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-held",
            loss_weights={"dice": 0.5, "focal": 0.5},
            reason="try focal",
            allow_unknown_run=True,
        )
    )
    held = run.run(stubs, range(3))
    assert [(d.action, d.source) for d in held] == [(pb.INTERVENE, pb.OVERRIDE)] * 3
    assert all(dict(d.loss_weights) == {"dice": 0.5, "focal": 0.5} for d in held)
    assert all(not d.HasField("lr") and d.override_id == override.override_id for d in held)

    assert stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-held")).cleared
    assert not stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-held")).cleared
    [after] = run.run(stubs, [3])
    assert (after.action, after.source, after.override_id) == (pb.NONE, pb.POLICY, 0)
    [cleared] = stubs.admin.ListOverrides(
        pb.ListOverridesRequest(run_id="run-held", include_cleared=True)
    ).overrides
    assert cleared.cleared_by == "anonymous"


def test_hold_interventions_suppresses_automatic_ones_without_using_the_budget(
    stubs: Stubs,
) -> None:
    run = Trainer("run-hold")
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-hold", hold_interventions=True, reason="ablation", allow_unknown_run=True
        )
    )
    held = run.run(stubs, range(8))
    # The default policy would intervene at epoch 5 on this flat loss.
    assert all(d.action == pb.NONE for d in held)
    assert (held[5].source, held[4].source) == (pb.OVERRIDE, pb.POLICY)
    assert "held by anonymous" in held[5].reason and "ablation" in held[5].reason

    stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-hold"))
    later = run.run(stubs, range(8, 20))
    first = next(d for d in later if d.action == pb.INTERVENE)
    assert (first.source, first.intervention_index) == (pb.POLICY, 1)


def test_overrides_do_not_consume_the_budget(stubs: Stubs) -> None:
    run = Trainer("run-budget")
    run.run(stubs, range(2))
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-budget", lr=0.004, once=True))
    [manual] = run.run(stubs, [2])
    assert (manual.source, manual.intervention_index) == (pb.OVERRIDE, 0)
    automatic = [d for d in run.run(stubs, range(3, 12)) if d.action == pb.INTERVENE]
    assert automatic and automatic[0].source == pb.POLICY
    assert automatic[0].intervention_index == 1


def test_every_override_is_recorded_with_who_and_why(stubs: Stubs) -> None:
    run = Trainer("run-audit")
    first = stubs.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-audit", lr=0.005, reason="first try", allow_unknown_run=True
        )
    )
    [under_first] = run.run(stubs, [0])
    second = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-audit", hold_interventions=True, reason="hold it")
    )
    [under_second] = run.run(stubs, [1])
    stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-audit"))

    detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-audit"))
    assert [(o.override_id, o.actor, o.reason) for o in detail.overrides] == [
        (first.override_id, "anonymous", "first try"),
        (second.override_id, "anonymous", "hold it"),
    ]
    assert detail.overrides[0].cleared_by == f"replaced by override {second.override_id}"
    assert detail.overrides[1].cleared_by == "anonymous"
    assert all(o.HasField("cleared_at") for o in detail.overrides)
    assert [e.decision.override_id for e in detail.epochs] == [
        first.override_id,
        second.override_id,
    ]
    assert [e.decision for e in detail.epochs] == [under_first, under_second]
    everyone = stubs.admin.ListOverrides(pb.ListOverridesRequest(include_cleared=True))
    assert [o.override_id for o in everyone.overrides] == [first.override_id, second.override_id]


def test_an_override_on_a_run_never_seen_is_refused_unless_allowed(
    server: ServerThread, stubs: Stubs
) -> None:
    """A run id the server has never seen is most likely a typo: refused, naming the run
    and the way to set it anyway; allowed, it waits for the run's first report."""
    typo = rpc_error(
        lambda: stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-latr", lr=0.002, reason="lower it")
        )
    )
    assert typo.code() == grpc.StatusCode.NOT_FOUND
    assert "'run-latr'" in (typo.details() or "")
    assert "allow_unknown_run" in (typo.details() or "")
    assert stubs.admin.ListOverrides(pb.ListOverridesRequest(include_cleared=True)).overrides == []

    early = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-later", lr=0.002, allow_unknown_run=True)
    )
    [decision] = Trainer("run-later").run(stubs, [0])
    assert (decision.source, decision.override_id) == (pb.OVERRIDE, early.override_id)
    # The audit records both calls, the refusal with its reason.
    events = admin_events(server, "SetOverride")
    assert [(e["target"], e["result"]) for e in events] == [
        ("run-latr", "NOT_FOUND"),
        ("run-later", "OK"),
    ]
    assert "never reported" in events[0]["details"]["message"]
    assert events[1]["details"]["request"]["allow_unknown_run"] is True


def test_an_override_that_replaces_an_active_one_names_it(stubs: Stubs) -> None:
    Trainer("run-swap").run(stubs, [0])
    first = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-swap", hold_interventions=True, reason="ablation")
    )
    assert first.replaced_override_id == 0
    second = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-swap", lr=0.005, reason="lower")
    )
    assert second.replaced_override_id == first.override_id
    old, new = stubs.admin.ListOverrides(
        pb.ListOverridesRequest(run_id="run-swap", include_cleared=True)
    ).overrides
    assert old.cleared_by == f"replaced by override {second.override_id}"
    assert new.replaced_override_id == first.override_id  # also as read back
    stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-swap"))
    third = stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-swap", lr=0.004))
    assert third.replaced_override_id == 0  # nothing was active


CAPPED = {"name": "capped", "interventions": {"max_lr": 0.1}}


def test_an_override_lr_above_the_policy_cap_needs_exceed_lr_cap_and_a_reason(
    server: ServerThread, stubs: Stubs
) -> None:
    run = Trainer("run-cap")  # initial_lr 0.01; the default policy caps at it
    run.run(stubs, [0])
    huge = rpc_error(
        lambda: stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-cap", lr=1e308))
    )
    assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = huge.details() or ""
    assert details.startswith("lr: must be at most 0.01, the run's initial_lr")
    assert "but got 1e+308" in details and "exceed_lr_cap" in details
    unexplained = rpc_error(
        lambda: stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-cap", lr=0.05, exceed_lr_cap=True)
        )
    )
    assert unexplained.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (unexplained.details() or "").startswith("reason: must say why")
    assert stubs.admin.ListOverrides(pb.ListOverridesRequest(include_cleared=True)).overrides == []

    raised = stubs.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-cap", lr=0.05, once=True, exceed_lr_cap=True, reason="warm restart"
        )
    )
    assert raised.exceed_lr_cap and raised.reason == "warm restart"
    [applied] = run.run(stubs, [1])
    assert (applied.source, applied.lr) == (pb.OVERRIDE, pytest.approx(0.05))
    [event] = [e for e in admin_events(server, "SetOverride") if e["result"] == "OK"]
    assert event["details"]["request"]["exceed_lr_cap"] is True

    # A pinned policy's max_lr is the cap of the runs it steers.
    capped = stubs.admin.PutPolicy(pb.PutPolicyRequest(document=struct(CAPPED))).policy.version
    stubs.admin.PinPolicy(
        pb.PinPolicyRequest(version=capped, selector=pb.RunSelector(dataset="Dataset042_Disc"))
    )
    within = stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-cap", lr=0.08))
    assert within.lr == pytest.approx(0.08)
    above = rpc_error(
        lambda: stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-cap", lr=0.2))
    )
    assert above.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the interventions.max_lr of policy capped@{capped}" in (above.details() or "")


def test_an_operator_stop_stops_the_run_at_its_next_report_once(
    server: ServerThread, stubs: Stubs
) -> None:
    run = Trainer("run-stop")
    run.run(stubs, range(2))
    stop = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-stop", action=pb.STOP, reason="the labels are wrong.")
    )
    assert (stop.action, stop.once) == (pb.STOP, True)
    [stopped] = run.run(stubs, [2])
    assert (stopped.action, stopped.source) == (pb.STOP, pb.OVERRIDE)
    assert stopped.override_id == stop.override_id
    assert stopped.reason == "Override by anonymous (the labels are wrong): stopping the run."
    assert stubs.control.ReportEpoch(run.report(2)) == stopped  # a retry: the same answer
    [after] = run.run(stubs, [3])
    assert (after.action, after.source) == (pb.NONE, pb.POLICY)  # consumed
    [consumed] = stubs.admin.ListOverrides(
        pb.ListOverridesRequest(run_id="run-stop", include_cleared=True)
    ).overrides
    assert consumed.cleared_by == "consumed by epoch 2"
    [event] = admin_events(server, "SetOverride")
    assert event["details"]["request"]["action"] == "STOP"


def test_an_operator_rollback_undoes_the_last_intervention_at_the_next_report(
    stubs: Stubs,
) -> None:
    run = Trainer("run-rb")
    run.run(stubs, range(5))
    nothing = rpc_error(
        lambda: stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-rb", action=pb.ROLLBACK, reason="undo")
        )
    )
    assert nothing.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'run-rb' has no intervention to roll back" in (nothing.details() or "")

    [intervened] = run.run(stubs, [5])  # the default policy's first, on this flat loss
    assert (intervened.action, intervened.source) == (pb.INTERVENE, pb.POLICY)
    assert run.lr != pytest.approx(0.001)
    rollback = stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-rb", action=pb.ROLLBACK, reason="it got worse")
    )
    assert (rollback.action, rollback.once) == (pb.ROLLBACK, True)
    assert rollback.lr == pytest.approx(0.001)  # what it restores: the LR of epoch 5
    assert rollback.rollback_epoch == 5
    [rolled] = run.run(stubs, [6])
    assert (rolled.action, rolled.source) == (pb.ROLLBACK, pb.OVERRIDE)
    assert rolled.lr == pytest.approx(0.001)
    assert dict(rolled.loss_weights) == {"dice": 1.0, "ce": 1.0}
    assert rolled.reason == (
        "Override by anonymous (it got worse): rolling back the intervention of epoch 5 "
        "to LR 0.001 and weights ce 1, dice 1."
    )
    assert run.lr == pytest.approx(0.001)
    again = rpc_error(
        lambda: stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-rb", action=pb.ROLLBACK, reason="undo")
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already rolled back at epoch 6" in (again.details() or "")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"run_id": "", "lr": 0.01}, "run_id"),
        ({"lr": -0.01}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"loss_weights": {"dice": 1.0, "tversky": 1.0}}, "loss_weights['tversky']"),
        ({"loss_weights": {"dice": -0.5, "ce": 1.0}}, "loss_weights['dice']"),
        ({"loss_weights": {"dice": 0.0, "ce": 0.0}}, "loss_weights"),
        ({"once": True, "reason": "nothing to do"}, "lr, loss_weights and hold_interventions"),
        ({"lr": 0.01, "reason": "x" * 5000}, "reason"),
        ({"lr": 0.01, "exceed_lr_cap": True}, "reason"),
        ({"hold_interventions": True, "exceed_lr_cap": True, "reason": "x"}, "exceed_lr_cap"),
        ({"action": pb.INTERVENE}, "action: must be STOP or ROLLBACK, but got INTERVENE"),
        ({"action": 42}, "action"),
        ({"action": pb.STOP, "lr": 0.01}, "lr: must not be set with action STOP"),
        ({"action": pb.ROLLBACK, "loss_weights": {"dice": 1.0}}, "loss_weights"),
        ({"action": pb.STOP, "hold_interventions": True}, "hold_interventions"),
    ],
)
def test_a_bad_override_is_refused_naming_the_field(
    stubs: Stubs, fields: dict[str, Any], named: str
) -> None:
    request = pb.SetOverrideRequest(**{"run_id": "run-bad", **fields})
    err = rpc_error(lambda: stubs.admin.SetOverride(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (err.details() or "")
    everything = stubs.admin.ListOverrides(pb.ListOverridesRequest(include_cleared=True))
    assert everything.overrides == []


# --- policies -------------------------------------------------------------------------


def test_put_policy_stores_an_immutable_version_from_a_struct_or_yaml(stubs: Stubs) -> None:
    # Struct numbers are doubles: an integral patience must still count as an integer.
    put = stubs.admin.PutPolicy(pb.PutPolicyRequest(document=struct(EAGER)))
    assert put.created and put.policy.version == EAGER_VERSION
    assert put.policy.name == "eager" and not put.policy.active
    assert put.policy.document["plateau"]["patience"] == 1
    assert put.policy.document["plateau"]["monitor"] == "val_loss"  # stored in full

    text = "name: eager\nplateau: {patience: 1, cooldown: 0, warmup_epochs: 2}\n"
    again = stubs.admin.PutPolicy(pb.PutPolicyRequest(yaml=text))
    assert not again.created and again.policy.version == EAGER_VERSION
    assert again.policy.created_at == put.policy.created_at
    as_json = stubs.admin.PutPolicy(
        pb.PutPolicyRequest(yaml='{"name": "eager", "plateau": {"patience": 2}}')
    )
    assert as_json.created

    listed = stubs.admin.ListPolicies(pb.ListPoliciesRequest())
    assert [p.version for p in listed.policies] == [
        DEFAULT_VERSION,
        EAGER_VERSION,
        as_json.policy.version,
    ]
    assert listed.active_version == DEFAULT_VERSION and listed.shadow_version == ""
    assert [p.active for p in listed.policies] == [True, False, False]

    assert stubs.admin.GetPolicy(pb.GetPolicyRequest()).version == DEFAULT_VERSION
    got = stubs.admin.GetPolicy(pb.GetPolicyRequest(version=EAGER_VERSION))
    assert got.document == put.policy.document
    missing = rpc_error(lambda: stubs.admin.GetPolicy(pb.GetPolicyRequest(version="nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"document": {"plateau": {"patience": -3}}}, "plateau.patience"),
        ({"document": {"plateau": {"patience": 2.5}}}, "plateau.patience"),
        ({"document": {"plateau": {"patiense": 3}}}, "plateau.patiense"),
        ({"document": {"plateau": {"min_delta": math.inf}}}, "plateau.min_delta"),
        ({"document": {"guard": {"rollback_tolerance": math.nan}}}, "guard.rollback_tolerance"),
        ({"document": {"interventions": {"final_mix": {"tversky": 1}}}}, "final_mix.tversky"),
        ({"document": {"guard": {"on_nonfinite": "explode"}}}, "guard.on_nonfinite"),
        ({"yaml": "plateau: {cooldown: -1}\n"}, "plateau.cooldown"),
        ({"yaml": "plateau: [unclosed\n"}, "not valid YAML"),
        ({"yaml": "a: &x [1]\nplateau: {patience: *x}\n"}, "aliases"),
        ({}, "document"),
    ],
)
def test_an_invalid_policy_is_refused_and_the_active_one_stays(
    stubs: Stubs, request_fields: dict[str, Any], named: str
) -> None:
    if "document" in request_fields:
        request = pb.PutPolicyRequest(document=struct(request_fields["document"]))
    else:
        request = pb.PutPolicyRequest(**request_fields)
    err = rpc_error(lambda: stubs.admin.PutPolicy(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (err.details() or "")
    listed = stubs.admin.ListPolicies(pb.ListPoliciesRequest())
    assert [p.version for p in listed.policies] == [DEFAULT_VERSION]
    decision = stubs.control.ReportEpoch(Trainer("run-after").report(0))
    assert decision.policy_version == DEFAULT_VERSION


def test_activate_policy_switches_new_decisions(server: ServerThread, stubs: Stubs) -> None:
    run = Trainer("run-switch")
    [before] = run.run(stubs, [0])
    eager = put_eager(stubs)
    activated = stubs.admin.ActivatePolicy(pb.ActivatePolicyRequest(version=eager))
    assert activated.active and activated.version == eager
    [after] = run.run(stubs, [1])
    assert (before.policy_version, after.policy_version) == (DEFAULT_VERSION, eager)
    assert stubs.admin.ListPolicies(pb.ListPoliciesRequest()).active_version == eager

    err = rpc_error(lambda: stubs.admin.ActivatePolicy(pb.ActivatePolicyRequest(version="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    empty = rpc_error(lambda: stubs.admin.ActivatePolicy(pb.ActivatePolicyRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stubs.control.ReportEpoch(run.report(2)).policy_version == eager
    # The audit: each call, and the one activation with the version it replaced.
    events = [
        (e["action"], e["target"], e["result"], e["details"].get("previous"))
        for e in server.running.store.admin_events()
        if e["actor"] != "control-server" and "Policy" in e["action"]
    ]
    assert events == [
        ("PutPolicy", "", "OK", None),
        ("PolicyActivated", eager, "OK", DEFAULT_VERSION),
        ("ActivatePolicy", eager, "OK", None),
        ("ActivatePolicy", "nope", "NOT_FOUND", None),
        ("ActivatePolicy", "", "INVALID_ARGUMENT", None),
    ]


def test_pinned_runs_get_the_pinned_version_and_others_the_active_one(stubs: Stubs) -> None:
    eager = put_eager(stubs)
    pinned = stubs.admin.PinPolicy(
        pb.PinPolicyRequest(version=eager, selector=pb.RunSelector(dataset="Dataset042_Disc"))
    )
    assert [p.dataset for p in pinned.pins] == ["Dataset042_Disc"]
    assert not pinned.active

    matching = Trainer("run-pinned")
    other = Trainer("run-other", labels=pb.RunLabels(dataset="Dataset007_Lung", fold="0"))
    flat = matching.run(stubs, range(4))
    assert {d.policy_version for d in flat} == {eager}
    assert flat[2].action == pb.INTERVENE  # the eager policy's timing, not the default's
    assert {d.policy_version for d in other.run(stubs, range(4))} == {DEFAULT_VERSION}

    # A more specific pin for the other dataset's fold wins over nothing; unpinning restores.
    unpinned = stubs.admin.UnpinPolicy(
        pb.UnpinPolicyRequest(selector=pb.RunSelector(dataset="Dataset042_Disc"))
    )
    assert unpinned.unpinned
    [after] = matching.run(stubs, [4])
    assert after.policy_version == DEFAULT_VERSION
    assert not stubs.admin.UnpinPolicy(
        pb.UnpinPolicyRequest(selector=pb.RunSelector(dataset="Dataset042_Disc"))
    ).unpinned

    empty = rpc_error(
        lambda: stubs.admin.PinPolicy(pb.PinPolicyRequest(version=eager, selector=pb.RunSelector()))
    )
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "selector" in (
        empty.details() or ""
    )
    unknown = rpc_error(
        lambda: stubs.admin.PinPolicy(
            pb.PinPolicyRequest(version="nope", selector=pb.RunSelector(fold="1"))
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def test_a_shadow_policy_is_recorded_beside_and_never_applied(stubs: Stubs) -> None:
    eager = put_eager(stubs)
    listed = stubs.admin.SetShadowPolicy(pb.SetShadowPolicyRequest(version=eager))
    assert listed.shadow_version == eager
    assert [p.shadow for p in listed.policies] == [False, True]

    run = Trainer("run-shadow")
    real = run.run(stubs, range(5))
    assert [d.action for d in real] == [pb.NONE] * 5
    assert {d.policy_version for d in real} == {DEFAULT_VERSION}

    detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-shadow"))
    assert [e.decision for e in detail.epochs] == real
    shadows = [e.shadow for e in detail.epochs]
    assert all(s.policy_version == eager and s.epoch == e for e, s in enumerate(shadows))
    assert [s.action for s in shadows] == [pb.NONE, pb.NONE, pb.INTERVENE, pb.NONE, pb.INTERVENE]
    # The trainer applied none of them, so the shadow's budget is untouched too.
    assert [s.intervention_index for s in shadows if s.action == pb.INTERVENE] == [1, 1]

    summary = stubs.admin.GetShadowSummary(pb.GetShadowSummaryRequest())
    assert (summary.version, summary.evaluated, summary.differed) == (eager, 5, 2)
    assert dict(summary.by_transition) == {"NONE->INTERVENE": 2}

    stubs.admin.SetShadowPolicy(pb.SetShadowPolicyRequest())
    [unshadowed] = run.run(stubs, [5])
    detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-shadow"))
    assert not detail.epochs[5].HasField("shadow")
    assert detail.epochs[5].decision == unshadowed
    none_set = rpc_error(lambda: stubs.admin.GetShadowSummary(pb.GetShadowSummaryRequest()))
    assert none_set.code() == grpc.StatusCode.NOT_FOUND
    by_version = stubs.admin.GetShadowSummary(pb.GetShadowSummaryRequest(version=eager))
    assert by_version.evaluated == 5
    unknown = rpc_error(lambda: stubs.admin.SetShadowPolicy(pb.SetShadowPolicyRequest(version="x")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def test_a_shadow_started_mid_run_catches_up_on_the_run_first(stubs: Stubs) -> None:
    eager = put_eager(stubs)
    late = Trainer("run-late")
    late.run(stubs, range(4))
    stubs.admin.SetShadowPolicy(pb.SetShadowPolicyRequest(version=eager))
    early = Trainer("run-early")
    early.run(stubs, range(8))
    late.run(stubs, range(4, 8))

    def shadows(run_id: str) -> list[tuple[int, int, float, str]]:
        detail = stubs.admin.GetRun(pb.GetRunRequest(run_id=run_id))
        # The seeded weight mix depends on the run id; everything else must agree.
        return [
            (e.shadow.epoch, e.shadow.action, e.shadow.lr, e.shadow.reason.split("; weights")[0])
            for e in detail.epochs
            if e.HasField("shadow")
        ]

    assert [s[0] for s in shadows("run-late")] == [4, 5, 6, 7]
    assert shadows("run-late") == shadows("run-early")[4:]


def test_the_shadow_is_skipped_where_it_is_the_real_version(stubs: Stubs) -> None:
    eager = put_eager(stubs)
    stubs.admin.PinPolicy(
        pb.PinPolicyRequest(version=eager, selector=pb.RunSelector(configuration="2d"))
    )
    stubs.admin.SetShadowPolicy(pb.SetShadowPolicyRequest(version=eager))
    Trainer("run-same").run(stubs, range(2))
    detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-same"))
    assert not any(e.HasField("shadow") for e in detail.epochs)


# --- audit ----------------------------------------------------------------------------


def test_list_decisions_filters(stubs: Stubs) -> None:
    plain = Trainer("run-plain").run(stubs, range(7))
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-manual", lr=0.002, once=True, allow_unknown_run=True)
    )
    manual = Trainer("run-manual").run(stubs, range(2))

    def ids(**fields: Any) -> list[str]:
        found = stubs.admin.ListDecisions(pb.ListDecisionsRequest(**fields))
        return [d.decision_id for d in found.decisions]

    assert ids() == [d.decision_id for d in plain + manual]
    assert ids(run_id="run-manual") == [d.decision_id for d in manual]
    assert ids(action=pb.INTERVENE, source=pb.POLICY) == [plain[5].decision_id]
    assert ids(source=pb.OVERRIDE) == [manual[0].decision_id]
    assert ids(limit=3) == [d.decision_id for d in plain[:3]]
    since, until = plain[2].decided_at, plain[4].decided_at
    assert ids(since=since, until=until) == [plain[2].decision_id, plain[3].decision_id]
    full = stubs.admin.ListDecisions(pb.ListDecisionsRequest(run_id="run-manual"))
    assert list(full.decisions) == manual

    for bad, named in (({"limit": -1}, "limit"), ({"action": 99}, "action")):
        err = rpc_error(lambda bad=bad: stubs.admin.ListDecisions(pb.ListDecisionsRequest(**bad)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and named in (err.details() or "")


def test_get_run_lists_everything_in_order(stubs: Stubs) -> None:
    run = Trainer("run-order")
    stubs.control.ReportEpoch(run.report(0))
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-order", lr=0.003, once=True))
    stubs.control.ReportEpoch(run.report(1))
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-order", hold_interventions=True))
    stubs.control.ReportEpoch(run.report(2))

    detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-order"))
    assert [e.report.epoch for e in detail.epochs] == [0, 1, 2]
    assert [e.decision.epoch for e in detail.epochs] == [0, 1, 2]
    assert [o.once for o in detail.overrides] == [True, False]
    assert detail.overrides[0].override_id < detail.overrides[1].override_id
    assert detail.run.report_count == 3 and detail.run.last_epoch == 2
    err = rpc_error(lambda: stubs.admin.GetRun(pb.GetRunRequest(run_id="")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- the live tail --------------------------------------------------------------------


def test_watch_sees_decisions_made_after_it_subscribed(stubs: Stubs) -> None:
    run = Trainer("run-watched")
    [old] = run.run(stubs, [0])
    call = stubs.admin.WatchDecisions(
        pb.WatchDecisionsRequest(run_id="run-watched"), timeout=STREAM_DEADLINE
    )
    try:
        call.initial_metadata()  # the server sends headers once the watch is live
        Trainer("run-unwatched").run(stubs, [0])
        [new] = run.run(stubs, [1])
        seen = next(call)
        assert seen == new and seen.decision_id != old.decision_id
        stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-watched", lr=0.004, once=True))
        [manual] = run.run(stubs, [2])
        assert next(call) == manual
    finally:
        call.cancel()


def test_watch_filters_by_action_and_source(stubs: Stubs) -> None:
    call = stubs.admin.WatchDecisions(
        pb.WatchDecisionsRequest(action=pb.INTERVENE, source=pb.POLICY), timeout=STREAM_DEADLINE
    )
    try:
        call.initial_metadata()
        decisions = Trainer("run-flat").run(stubs, range(7))
        assert next(call) == decisions[5]
    finally:
        call.cancel()


def test_watch_sees_decisions_of_another_replica(
    server: ServerThread, stubs: Stubs, make_server: Callable[..., ServerThread]
) -> None:
    other = make_server()  # the same SQLite file
    call = stubs.admin.WatchDecisions(pb.WatchDecisionsRequest(), timeout=STREAM_DEADLINE)
    try:
        call.initial_metadata()
        with grpc.insecure_channel(other.target) as channel:
            decision = pb_grpc.TrainingControlStub(channel).ReportEpoch(
                Trainer("run-elsewhere").report(0)
            )
        assert next(call) == decision
    finally:
        call.cancel()


def test_a_cancelled_watch_is_released(server: ServerThread, stubs: Stubs) -> None:
    call = stubs.admin.WatchDecisions(pb.WatchDecisionsRequest(), timeout=STREAM_DEADLINE)
    call.initial_metadata()
    assert server.running.watches.count == 1
    call.cancel()
    deadline = time.monotonic() + 5
    while server.running.watches.count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.running.watches.count == 0


def test_stopping_the_server_ends_open_watches_at_once(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(grace_s=30.0)
    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.ControlAdminStub(channel).WatchDecisions(
            pb.WatchDecisionsRequest(), timeout=STREAM_DEADLINE
        )
        call.initial_metadata()
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert list(call) == []
        assert call.code() == grpc.StatusCode.OK


# --- replay ---------------------------------------------------------------------------


def test_decisions_made_under_overrides_replay_identically(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(
            channel, pb_grpc.TrainingControlStub(channel), pb_grpc.ControlAdminStub(channel)
        )
        run = Trainer("run-replayed")
        run.run(stubs, range(2))
        stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-replayed", lr=0.004, once=True, reason="kick")
        )
        run.run(stubs, range(2, 4))
        stubs.admin.SetOverride(
            pb.SetOverrideRequest(
                run_id="run-replayed", hold_interventions=True, loss_weights={"dice": 1.0}
            )
        )
        run.run(stubs, range(4, 7))
        stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-replayed", hold_interventions=True, reason="hold")
        )
        run.run(stubs, range(7, 14))
        stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-replayed"))
        decisions = run.run(stubs, range(14, 24))
        detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-replayed"))
    server.stop()
    sources = [e.decision.source for e in detail.epochs]
    assert sources.count(pb.OVERRIDE) >= 5  # once, held weights, held plateau
    assert any(d.source == pb.POLICY and d.action == pb.INTERVENE for d in decisions)

    store = f"sqlite:///{tmp_path}/control.db"
    result = cli("replay", "--store", store, "--run", "run-replayed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 runs, 24 decisions, 0 differ" in result.stdout


def test_operator_stops_and_rollbacks_replay_identically(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(
            channel, pb_grpc.TrainingControlStub(channel), pb_grpc.ControlAdminStub(channel)
        )
        run = Trainer("run-operated")
        run.run(stubs, range(6))  # the policy intervenes at epoch 5
        stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-operated", action=pb.ROLLBACK, reason="worse")
        )
        run.run(stubs, range(6, 9))
        stubs.admin.SetOverride(
            pb.SetOverrideRequest(run_id="run-operated", action=pb.STOP, reason="enough")
        )
        decisions = run.run(stubs, range(9, 11))
        detail = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-operated"))
    server.stop()
    operated = [
        (e.decision.epoch, e.decision.action) for e in detail.epochs if e.decision.override_id
    ]
    assert operated == [(6, pb.ROLLBACK), (9, pb.STOP)]
    assert decisions[0].action == pb.STOP

    store = f"sqlite:///{tmp_path}/control.db"
    result = cli("replay", "--store", store, "--run", "run-operated", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 runs, 11 decisions, 0 differ" in result.stdout


def test_reports_out_of_order_are_refused_and_the_record_replays(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    """Epochs going backwards are refused (FAILED_PRECONDITION), so the recorded
    history is in order and replays exactly; skipped epochs are fine."""
    server = make_server()
    losses = [0.5, 0.4, 0.45, 0.3, 0.31, 0.32, -0.0, 0.33, 0.34, 0.35, 0.36, 0.37]
    order = [0, 1, 5, 2, 3, 7, 4, 6, 11, 8, 9, 10]
    refused = []
    with grpc.insecure_channel(server.target) as channel:
        control = pb_grpc.TrainingControlStub(channel)
        run = Trainer("run-shuffled")
        for epoch in order:
            try:
                control.ReportEpoch(run.report(epoch, val_loss=losses[epoch]))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                refused.append(epoch)
    server.stop()
    assert refused == [2, 3, 4, 6, 8, 9, 10]
    store = f"sqlite:///{tmp_path}/control.db"
    result = cli("replay", "--store", store, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 runs, 5 decisions, 0 differ" in result.stdout


def test_the_server_stays_live_while_an_admin_write_waits_for_the_store(
    stubs: Stubs, tmp_path: Path
) -> None:
    """Admin calls do their store work (and its audit record) off the event loop: while
    one waits for a write lock held elsewhere, health checks are answered (a liveness
    probe must not find the server dead), and the write goes through once it can."""
    Trainer("run-busy").run(stubs, [0])
    health = health_pb2_grpc.HealthStub(stubs.channel)
    # Another process holds the store's write lock (as a long transaction would).
    holder = sqlite3.connect(tmp_path / "control.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                stubs.admin.SetOverride,
                pb.SetOverrideRequest(run_id="run-busy", lr=0.002, reason="waits for the lock"),
                timeout=30,
            )
            time.sleep(0.5)  # it reaches the store and waits there (busy timeout: 5 s)
            for _ in range(3):
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert not waiting.done()
            holder.execute("ROLLBACK")
            stored = waiting.result(timeout=30)
    finally:
        holder.close()
    assert stored.run_id == "run-busy" and stored.lr == 0.002
    overrides = stubs.admin.ListOverrides(pb.ListOverridesRequest(run_id="run-busy"))
    assert [o.override_id for o in overrides.overrides] == [stored.override_id]


def test_the_server_stays_live_while_an_ended_watch_waits_to_be_recorded(
    server: ServerThread, stubs: Stubs, tmp_path: Path
) -> None:
    """A watch's audit record is written when the stream ends, off the event loop too:
    while it waits for the store, health checks are answered; it is stored later."""
    health = health_pb2_grpc.HealthStub(stubs.channel)
    call = stubs.admin.WatchDecisions(pb.WatchDecisionsRequest(), timeout=STREAM_DEADLINE)
    call.initial_metadata()
    holder = sqlite3.connect(tmp_path / "control.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        call.cancel()
        deadline = time.monotonic() + 5
        while server.running.watches.count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.running.watches.count == 0
        for _ in range(3):
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [e for e in server.running.store.admin_events() if e["action"] == "WatchDecisions"]
        if events:
            break
        time.sleep(0.05)
    assert [e["result"] for e in events] == ["CANCELLED"]
