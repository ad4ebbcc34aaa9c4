"""What the console reads from ControlAdmin: ListRuns' flags and trends, the audit
(ListAuditEvents), a candidate policy replayed over recorded runs (ReplayPolicy) and
the caller (WhoAmI), on a real server (port 0) with a real SQLite store."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from control_server.auth import Role
from control_server.domain import InvalidArgument, RunFilter
from control_server.policy.document import parse_policy_yaml
from control_server.tokens import create_token
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report, make_record
from tests.integration.test_admin import DEFAULT_VERSION, Trainer, rpc_error
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

#: Spends its one intervention at epoch 2 of a flat loss; the next plateau (epoch 4)
#: finds the budget spent.
THRIFTY = (
    "name: thrifty\nplateau: {patience: 1, cooldown: 0, warmup_epochs: 2}\n"
    "interventions: {max_interventions: 1}\n"
)
#: Fires after one bad epoch where the default waits three, from epoch 2 on.
EAGER = "name: eager\nplateau: {patience: 1, cooldown: 0, warmup_epochs: 2}\n"
EAGER_VERSION = parse_policy_yaml(EAGER).version
FLAG_NAMES = {number: name for name, number in pb.RunFlag.items()}


def flags_by_run(stubs: Stubs) -> dict[str, list[str]]:
    runs = stubs.admin.ListRuns(pb.ListRunsRequest()).runs
    return {r.run_id: [FLAG_NAMES[f] for f in r.flags] for r in runs}


def report(stubs: Stubs, run_id: str, epoch: int, **fields: float) -> pb.Decision:
    decision: pb.Decision = stubs.control.ReportEpoch(epoch_report(run_id, epoch, **fields))
    return decision


# --- ListRuns: flags ----------------------------------------------------------------------


def test_each_flag_says_why_a_run_needs_a_look(server: ServerThread, stubs: Stubs) -> None:
    Trainer("run-clean").run(stubs, range(3))

    # Rolled back: the default policy's first intervention (epoch 5 of a flat loss),
    # undone by an operator at the next report.
    rolled = Trainer("run-rolled")
    rolled.run(stubs, range(6))
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-rolled", action=pb.ROLLBACK, reason="worse")
    )
    [rollback] = rolled.run(stubs, [6])
    assert rollback.action == pb.ROLLBACK

    # Non-finite: a NaN train loss stops the run (SAFETY); an infinite val loss at the
    # epoch an operator stops the run is decided by the override, and still flagged.
    nan = report(stubs, "run-nan", 0, train_loss=math.nan)
    assert (nan.action, nan.source) == (pb.STOP, pb.SAFETY)
    report(stubs, "run-inf", 0)
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-inf", action=pb.STOP))
    inf = report(stubs, "run-inf", 1, val_loss=math.inf)
    assert (inf.action, inf.source) == (pb.STOP, pb.OVERRIDE)

    # Budget spent: a policy of one intervention, pinned to this run's dataset.
    thrifty = stubs.admin.PutPolicy(pb.PutPolicyRequest(yaml=THRIFTY)).policy.version
    budget_labels = pb.RunLabels(dataset="Dataset777_Budget", configuration="2d", fold="0")
    stubs.admin.PinPolicy(
        pb.PinPolicyRequest(version=thrifty, selector=pb.RunSelector(dataset="Dataset777_Budget"))
    )
    spent = Trainer("run-spent", labels=budget_labels).run(stubs, range(5))
    assert [d.action for d in spent] == [pb.NONE, pb.NONE, pb.INTERVENE, pb.NONE, pb.NONE]
    assert "the budget of 1 interventions is spent" in spent[4].reason

    # An override in force (until cleared).
    Trainer("run-held").run(stubs, range(2))
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-held", hold_interventions=True, reason="ablation")
    )

    # Stale: a run whose only epoch was decided long ago (the store's clock is the
    # record's; waiting 30 minutes is not a test).
    server.running.store.record_decisions(
        [make_record("run-stale", 0, policy_version=DEFAULT_VERSION)]
    )

    assert flags_by_run(stubs) == {
        "run-clean": [],
        "run-rolled": ["FLAG_ROLLED_BACK"],
        "run-nan": ["FLAG_NON_FINITE"],
        "run-inf": ["FLAG_NON_FINITE"],
        "run-spent": ["FLAG_BUDGET_SPENT"],
        "run-held": ["FLAG_OVERRIDE"],
        "run-stale": ["FLAG_STALE"],
    }
    rolled_run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-rolled")).run
    assert list(rolled_run.flags) == [pb.FLAG_ROLLED_BACK]  # GetRun's summary too
    assert rolled_run.monitored == "val_loss" and not rolled_run.trend
    stale = stubs.admin.ListRuns(pb.ListRunsRequest(status=pb.STALE)).runs
    assert [(r.run_id, list(r.flags)) for r in stale] == [("run-stale", [pb.FLAG_STALE])]

    # Flags come in the enum's order, and go when their cause does.
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-rolled", lr=0.002))
    assert flags_by_run(stubs)["run-rolled"] == ["FLAG_ROLLED_BACK", "FLAG_OVERRIDE"]
    stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-held"))
    assert flags_by_run(stubs)["run-held"] == []


def test_list_runs_names_what_the_policy_of_the_last_decision_monitors(stubs: Stubs) -> None:
    Trainer("run-loss").run(stubs, range(2))
    dice = "name: dice\nplateau: {monitor: pseudo_dice, mode: max}\n"
    version = stubs.admin.PutPolicy(pb.PutPolicyRequest(yaml=dice)).policy.version
    dice_labels = pb.RunLabels(dataset="Dataset888_Dice", configuration="2d", fold="0")
    stubs.admin.PinPolicy(
        pb.PinPolicyRequest(version=version, selector=pb.RunSelector(dataset="Dataset888_Dice"))
    )
    Trainer("run-dice", labels=dice_labels).run(stubs, range(2))

    runs = {r.run_id: r for r in stubs.admin.ListRuns(pb.ListRunsRequest()).runs}
    assert (runs["run-loss"].monitored, runs["run-loss"].monitored_mode) == ("val_loss", "min")
    assert (runs["run-dice"].monitored, runs["run-dice"].monitored_mode) == ("pseudo_dice", "max")
    assert not runs["run-loss"].trend  # not asked for


# --- ListRuns: trends ---------------------------------------------------------------------


def test_the_trend_is_the_monitored_value_per_epoch_thinned_to_the_points_asked(
    server: ServerThread, stubs: Stubs
) -> None:
    # A short run: every epoch, the val loss, the train loss where it has none (as the
    # policy falls back), and no point for the NaN epoch.
    report(stubs, "run-short", 0, train_loss=0.9, val_loss=0.8)
    report(stubs, "run-short", 1, train_loss=0.7, val_loss=0.6)
    stubs.control.ReportEpoch(
        pb.EpochReport(
            run_id="run-short", epoch=2, train_loss=0.55, current_lr=0.01, initial_lr=0.01
        )
    )
    # A long one: val loss falling by 0.001 an epoch over 300 epochs.
    for epoch in range(300):
        report(stubs, "run-long", epoch, val_loss=1.0 - epoch / 1000)

    admin = server.running.admin
    runs = {r.run_id: r for r in admin.list_runs(RunFilter(trend_points=40))}
    assert runs["run-short"].trend == pytest.approx((0.8, 0.6, 0.55))
    long = runs["run-long"].trend
    assert len(long) == 40
    assert long[0] == pytest.approx(1.0) and long[-1] == pytest.approx(1.0 - 299 / 1000)
    epochs = [round((1.0 - v) * 1000) for v in long]
    assert epochs == sorted(set(epochs))  # each a different epoch, in order
    gaps = {b - a for a, b in itertools.pairwise(epochs)}
    assert gaps <= {7, 8}  # evenly: 299 epochs in 39 steps

    nan_first = report(stubs, "run-nan", 0, val_loss=math.nan)
    assert nan_first.source == pb.SAFETY
    [nan_run] = [r for r in admin.list_runs(RunFilter(trend_points=40)) if r.run_id == "run-nan"]
    assert nan_run.trend == () and nan_run.monitored == "val_loss"
    assert [r.trend for r in admin.list_runs(RunFilter(trend_points=0))] == [()] * 3


def test_list_runs_sends_the_trend_asked_for_and_refuses_too_many_points(stubs: Stubs) -> None:
    for epoch in range(10):
        report(stubs, "run-a", epoch, val_loss=1.0 - epoch / 10)

    def make(points: int) -> pb.ListRunsRequest:
        return pb.ListRunsRequest(trend_points=points)

    [run] = stubs.admin.ListRuns(make(5)).runs
    assert list(run.trend) == pytest.approx([1.0, 0.7, 0.5, 0.3, 0.1])  # epochs 0, 3, 5, 7, 9
    for points in (501, -1):
        err = rpc_error(lambda p=points: stubs.admin.ListRuns(make(p)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "trend_points" in (err.details() or "")


def test_trend_points_beyond_the_bound_are_refused_naming_them(server: ServerThread) -> None:
    for points in (501, -1):
        with pytest.raises(InvalidArgument, match="trend_points"):
            server.running.admin.list_runs(RunFilter(trend_points=points))


def test_flags_and_trends_of_a_thousand_runs_come_in_a_few_queries(
    server: ServerThread,
) -> None:
    """The console's fleet page: 1,000 runs of 100 epochs, 40 points each."""
    store = server.running.store
    for first in range(0, 1000, 100):
        store.record_decisions(
            [
                make_record(f"run-{n:04d}", epoch, policy_version=DEFAULT_VERSION)
                for n in range(first, first + 100)
                for epoch in range(100)
            ]
        )
    admin = server.running.admin
    began = time.monotonic()
    runs = admin.list_runs(RunFilter(limit=1000, trend_points=40))
    elapsed = time.monotonic() - began
    assert len(runs) == 1000 and {len(r.trend) for r in runs} == {40}
    assert elapsed < 5, f"ListRuns of 1,000 runs with trends took {elapsed:.1f} s"


# --- ListAuditEvents ----------------------------------------------------------------------


def at(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_list_audit_events_filters_newest_first(stubs: Stubs) -> None:
    Trainer("run-x").run(stubs, range(2))
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-x", lr=0.002, reason="first"))
    between = datetime.now(UTC)
    time.sleep(0.01)
    stubs.admin.SetOverride(pb.SetOverrideRequest(run_id="run-x", lr=0.003, reason="second"))
    stubs.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-x"))
    rpc_error(lambda: stubs.admin.GetRun(pb.GetRunRequest(run_id="run-nope")))

    def events(**fields: object) -> list[pb.AuditEvent]:
        request = pb.ListAuditEventsRequest(**fields)  # type: ignore[arg-type]
        return list(stubs.admin.ListAuditEvents(request).events)

    # An aborted call's status may reach its client before the call's record is queued.
    deadline = time.monotonic() + 10
    while not events(action="GetRun"):
        assert time.monotonic() < deadline, "the refused GetRun was never recorded"
        time.sleep(0.01)
    everything = [e for e in events() if e.action != "ListAuditEvents"]
    assert [(e.action, e.target, e.result) for e in everything[:4]] == [
        ("GetRun", "run-nope", "NOT_FOUND"),
        ("ClearOverride", "run-x", "OK"),
        ("SetOverride", "run-x", "OK"),
        ("SetOverride", "run-x", "OK"),
    ]
    assert {e.actor for e in everything[:4]} == {"anonymous"}
    stamps = [e.at.ToDatetime() for e in everything]
    assert stamps == sorted(stamps, reverse=True)
    newest_set = everything[2]
    assert newest_set.details["request"]["reason"] == "second"
    assert newest_set.details["request"]["lr"] == 0.003
    assert newest_set.details["duration_ms"] >= 0
    assert everything[0].details["message"] == "run 'run-nope' is not recorded"

    assert [e.action for e in events(target="run-x")] == [
        "ClearOverride",
        "SetOverride",
        "SetOverride",
    ]

    def reasons(**fields: object) -> list[str]:
        return [e.details["request"]["reason"] for e in events(action="SetOverride", **fields)]

    assert reasons() == ["second", "first"]
    assert reasons(since=at(between)) == ["second"]
    assert reasons(until=at(between)) == ["first"]
    assert events(actor="someone-else") == []
    assert reasons(limit=1) == ["second"]
    # The reads are audited too: the call before this one is the newest.
    assert events(limit=1)[0].action == "ListAuditEvents"

    for limit in (5001, -1):
        err = rpc_error(lambda n=limit: events(limit=n))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit" in (err.details() or "")


def test_list_audit_events_holds_two_hundred_unless_asked(stubs: Stubs) -> None:
    for _ in range(205):
        stubs.admin.ListOverrides(pb.ListOverridesRequest())
    assert len(stubs.admin.ListAuditEvents(pb.ListAuditEventsRequest()).events) == 200
    more = stubs.admin.ListAuditEvents(pb.ListAuditEventsRequest(limit=1000)).events
    assert len(more) > 205


# --- with tokens: the audit and WhoAmI ----------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_an_operator_reads_the_audit_and_whoami_names_each_token(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    operator, _ = create_token(path, "alice", Role.OPERATOR)
    admin, _ = create_token(path, "root", Role.ADMIN)
    trainer, _ = create_token(path, "gpu-7", Role.TRAINER)
    server = make_server(auth_file=path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControlAdminStub(channel)
        me = stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(operator))
        assert (me.name, me.role) == ("alice", "operator")
        root = stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(admin))
        assert (root.name, root.role) == ("root", "admin")

        stub.ListOverrides(pb.ListOverridesRequest(), metadata=bearer(operator))
        rpc_error(
            lambda: stub.ActivatePolicy(
                pb.ActivatePolicyRequest(version="v1"), metadata=bearer(operator)
            )
        )
        mine = stub.ListAuditEvents(
            pb.ListAuditEventsRequest(actor="alice"), metadata=bearer(operator)
        ).events
        assert [(e.action, e.result) for e in mine] == [
            ("ListOverrides", "OK"),
            ("WhoAmI", "OK"),
        ]  # the refusal is counted, and written at the interval's end

        def refused() -> list[pb.AuditEvent]:
            server.call(server.running.audit.flush())
            request = pb.ListAuditEventsRequest(actor="alice", action="ActivatePolicy")
            return list(stub.ListAuditEvents(request, metadata=bearer(operator)).events)

        deadline = time.monotonic() + 10
        while not refused():  # its status may reach the client before it is counted
            assert time.monotonic() < deadline, "the refusal was never recorded"
            time.sleep(0.01)
        [denial] = refused()
        assert (denial.result, denial.details["count"]) == ("PERMISSION_DENIED", 1)

        denied = rpc_error(
            lambda: stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=bearer(trainer))
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


def test_whoami_without_tokens_is_the_anonymous_admin(stubs: Stubs) -> None:
    me = stubs.admin.WhoAmI(pb.WhoAmIRequest())
    assert (me.name, me.role) == ("anonymous", "admin")


# --- ReplayPolicy -------------------------------------------------------------------------


def policies(stubs: Stubs) -> list[str]:
    return [p.version for p in stubs.admin.ListPolicies(pb.ListPoliciesRequest()).policies]


def test_a_candidate_document_is_replayed_over_the_recorded_runs_and_not_stored(
    stubs: Stubs,
) -> None:
    for run_id in ("run-1", "run-2"):
        Trainer(run_id).run(stubs, range(5))
    other = pb.RunLabels(dataset="Dataset999_Other", configuration="2d", fold="0")
    Trainer("run-other", labels=other).run(stubs, range(5))
    before = policies(stubs)

    replay = stubs.admin.ReplayPolicy(
        pb.ReplayPolicyRequest(yaml=EAGER, selector=pb.RunSelector(dataset="Dataset042_Disc"))
    )
    assert (replay.version, replay.name) == (EAGER_VERSION, "eager")
    assert (replay.runs, replay.decisions) == (2, 10)
    # Where the default waits out its patience of 3, eager intervenes at epoch 2.
    assert (replay.differing, replay.runs_differing) >= (2, 2)
    assert dict(replay.by_transition)["NONE->INTERVENE"] >= 2
    assert sum(replay.by_transition.values()) == replay.differing
    first = replay.differences[0]
    assert (first.run_id, first.epoch) == ("run-1", 2)
    assert (first.recorded.action, first.recorded.policy_version) == (pb.NONE, DEFAULT_VERSION)
    assert first.recorded.decision_id
    candidate = first.candidate
    assert (candidate.action, candidate.source) == (pb.INTERVENE, pb.POLICY)
    assert (candidate.run_id, candidate.epoch, candidate.policy_version) == (
        "run-1",
        2,
        EAGER_VERSION,
    )
    assert candidate.HasField("lr") and candidate.intervention_index == 1
    assert candidate.reason.startswith("Plateau:") and not candidate.decision_id
    keys = [(d.run_id, d.epoch) for d in replay.differences]
    assert keys == sorted(keys)
    assert policies(stubs) == before  # a candidate document is not stored

    one = stubs.admin.ReplayPolicy(pb.ReplayPolicyRequest(yaml=EAGER, limit=1, max_differences=1))
    assert one.runs == 1 and len(one.differences) == 1 and one.differing >= 1
    assert one.differences[0].run_id == "run-other"  # the most recently active


def test_the_recorded_policy_replays_identically(stubs: Stubs) -> None:
    Trainer("run-1").run(stubs, range(8))
    replay = stubs.admin.ReplayPolicy(pb.ReplayPolicyRequest(version=DEFAULT_VERSION))
    assert (replay.runs, replay.decisions, replay.differing) == (1, 8, 0)
    assert not replay.differences and not replay.by_transition
    assert replay.name == "default"


@pytest.mark.parametrize(
    ("request_fields", "code", "named"),
    [
        ({"version": "0123456789ab"}, grpc.StatusCode.NOT_FOUND, "'0123456789ab'"),
        (
            {"yaml": "plateau: {patience: -1}\n"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "plateau.patience",
        ),
        ({"yaml": "plateau: [unclosed\n"}, grpc.StatusCode.INVALID_ARGUMENT, "not valid YAML"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "candidate"),
        ({"version": DEFAULT_VERSION, "limit": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (
            {"version": DEFAULT_VERSION, "max_differences": -1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_differences",
        ),
    ],
)
def test_a_bad_candidate_is_refused_naming_what_is_wrong_and_nothing_is_stored(
    stubs: Stubs, request_fields: dict[str, object], code: grpc.StatusCode, named: str
) -> None:
    Trainer("run-1").run(stubs, range(3))
    before = policies(stubs)
    request = pb.ReplayPolicyRequest(**request_fields)  # type: ignore[arg-type]
    err = rpc_error(lambda: stubs.admin.ReplayPolicy(request))
    assert err.code() == code
    assert named in (err.details() or "")
    assert policies(stubs) == before
