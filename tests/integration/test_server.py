"""The control server end to end: a real aio server on port 0, a real SQLite store."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_server.policy_files import default_policy
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc


def plateau_run(
    stubs: Stubs, run_id: str, epochs: int, lr: float = 0.01, **fields: object
) -> list[pb.Decision]:
    """Report a run whose loss stops improving after epoch 3, applying decisions."""
    decisions = []
    count, weights = 0, {"dice": 1.0, "ce": 1.0}
    for epoch in range(epochs):
        loss = max(0.3, 0.6 - 0.1 * epoch)
        decision = stubs.control.ReportEpoch(
            epoch_report(
                run_id,
                epoch,
                val_loss=loss,
                current_lr=lr,
                intervention_count=count,
                loss_weights=weights,
                **fields,
            )
        )
        if decision.action == pb.INTERVENE:
            lr = decision.lr if decision.HasField("lr") else lr
            weights = dict(decision.loss_weights) or weights
            count = max(count, decision.intervention_index)
        decisions.append(decision)
    return decisions


def test_a_report_gets_a_recorded_decision_of_the_active_policy(stubs: Stubs) -> None:
    decision = stubs.control.ReportEpoch(epoch_report("run-a", 0))
    assert decision.run_id == "run-a" and decision.epoch == 0
    assert decision.action == pb.NONE and decision.source == pb.POLICY
    assert decision.policy_version == default_policy().version
    assert decision.decision_id and decision.reason
    assert decision.decided_at.seconds > 0


def test_a_plateau_is_met_with_a_gradient_aware_lr_boost(stubs: Stubs) -> None:
    decisions = plateau_run(stubs, "run-p", 12, lr=0.001, avg_gradient_norm=0.04)
    interventions = [d for d in decisions if d.action == pb.INTERVENE]
    assert interventions, [d.reason for d in decisions]
    first = interventions[0]
    # Best at epoch 3; bad epochs 4, 5, 6, 7: the count exceeds patience 3 at epoch 7.
    assert first.epoch == 7
    assert first.intervention_index == 1 and first.source == pb.POLICY
    # g = 0.04 -> 10x, damping 1.0 for k = 1: 0.001 -> 0.01, within max_lr = initial_lr.
    assert first.lr == pytest.approx(0.01)
    assert dict(first.loss_weights) == {"dice": 1.0, "ce": 1.0}
    assert "0.04" in first.reason


def test_a_retried_report_gets_the_same_decision_and_no_second_row(stubs: Stubs) -> None:
    first = stubs.control.ReportEpoch(epoch_report("run-r", 0))
    again = stubs.control.ReportEpoch(epoch_report("run-r", 0))
    assert again == first
    with pytest.raises(grpc.RpcError) as refused:
        stubs.control.ReportEpoch(epoch_report("run-r", 0, val_loss=9.0, train_loss=1.5))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different train_loss, val_loss" in refused.value.details()
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-r"))
    assert [e.decision.decision_id for e in run.epochs] == [first.decision_id]
    assert run.epochs[0].report.val_loss == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"run_id": ""}, "run_id"),
        ({"run_id": "x" * 300}, "run_id"),
        ({"epoch": -1}, "epoch"),
        ({"current_lr": -0.1}, "current_lr"),
        ({"current_lr": math.nan}, "current_lr"),
        ({"current_lr": 0.0}, "current_lr: must be a finite number > 0, but got 0.0"),
        ({"current_lr": math.inf}, "current_lr"),
        ({"initial_lr": 0.0}, "initial_lr"),
        ({"initial_lr": -0.01}, "initial_lr"),
        ({"initial_lr": math.nan}, "initial_lr"),
        ({"initial_lr": math.inf}, "initial_lr"),
        ({"avg_gradient_norm": -1.0}, "avg_gradient_norm"),
        ({"intervention_count": -2}, "intervention_count"),
        ({"loss_weights": {"dice": 1.0, "tversky": 1.0}}, "loss_weights['tversky']"),
        ({"loss_weights": {"dice": -0.5}}, "loss_weights['dice']"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(
    stubs: Stubs, fields: dict[str, object], named: str
) -> None:
    bad = epoch_report("run-bad", 3)
    for key, value in fields.items():
        if key == "loss_weights":
            bad.loss_weights.clear()
            bad.loss_weights.update(value)  # type: ignore[arg-type]
        else:
            setattr(bad, key, value)
    with pytest.raises(grpc.RpcError) as err:
        stubs.control.ReportEpoch(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()
    # The server keeps serving, and the bad report left no trace.
    assert stubs.control.ReportEpoch(epoch_report("run-ok", 0)).action == pb.NONE
    runs = stubs.admin.ListRuns(pb.ListRunsRequest())
    assert [r.run_id for r in runs.runs] == ["run-ok"]


def test_a_message_over_the_size_limit_is_refused(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_message_bytes=64 * 1024)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportEpoch(epoch_report("r", 0, labels=pb.RunLabels(host="h" * 100_000)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ReportEpoch(epoch_report("r", 0)).action == pb.NONE


def test_a_non_finite_loss_is_a_training_event_not_bad_input(stubs: Stubs) -> None:
    decision = stubs.control.ReportEpoch(epoch_report("run-nan", 7, val_loss=math.nan))
    assert decision.action == pb.STOP and decision.source == pb.SAFETY
    assert "finite" in decision.reason


def test_decisions_are_durable_and_survive_a_restart(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        first = pb_grpc.TrainingControlStub(channel).ReportEpoch(epoch_report("run-d", 4))
    server.stop()
    # What the client was told is in the file before any shutdown bookkeeping.
    with sqlite3.connect(tmp_path / "control.db") as db:
        rows = db.execute("SELECT decision_id FROM decisions WHERE run_id = 'run-d'").fetchall()
    db.close()
    assert rows == [(first.decision_id,)]
    again = make_server()
    with grpc.insecure_channel(again.target) as channel:
        retried = pb_grpc.TrainingControlStub(channel).ReportEpoch(epoch_report("run-d", 4))
    assert retried.decision_id == first.decision_id


def test_concurrent_reports_are_group_committed(server: ServerThread, stubs: Stubs) -> None:
    def one_run(i: int) -> list[str]:
        return [
            stubs.control.ReportEpoch(epoch_report(f"run-{i}", e)).decision_id for e in range(5)
        ]

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = [d for run in pool.map(one_run, range(32)) for d in run]
    assert len(set(ids)) == 32 * 5
    decider = server.running.decider
    assert decider.rows == 32 * 5
    assert decider.batches < decider.rows


def test_runs_are_listed_and_shown_in_epoch_order(stubs: Stubs) -> None:
    plateau_run(stubs, "run-1", 4)
    stubs.control.ReportEpoch(
        epoch_report("run-2", 0, labels=pb.RunLabels(dataset="Other", fold="1"))
    )
    listed = stubs.admin.ListRuns(pb.ListRunsRequest())
    assert [r.run_id for r in listed.runs] == ["run-2", "run-1"]
    only = stubs.admin.ListRuns(pb.ListRunsRequest(dataset="Other"))
    assert [r.run_id for r in only.runs] == ["run-2"]
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-1"))
    assert run.run.report_count == 4 and run.run.last_epoch == 3
    assert [e.report.epoch for e in run.epochs] == [0, 1, 2, 3]
    assert [e.decision.epoch for e in run.epochs] == [0, 1, 2, 3]
    with pytest.raises(grpc.RpcError) as err:
        stubs.admin.GetRun(pb.GetRunRequest(run_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_are_served(stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "trainingcontrol.v1.TrainingControl", "trainingcontrol.v1.ControlAdmin"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "trainingcontrol.v1.TrainingControl",
        "trainingcontrol.v1.ControlAdmin",
        "grpc.health.v1.Health",
    } <= names
