"""Run attempts and a run's lifecycle, through a real server on a real store:
StartRun opens attempts (resume or a clean start), ReportEpoch is idempotent per
(run, attempt, epoch) and refuses what contradicts the record, late reports fill
holes without being decided, FinishRun ends a run, and GetRun pages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from control_server.app import activate_startup_policy
from control_server.domain import FinalMetrics, RunAttempt, RunFilter, RunLabels, RunStatus
from control_server.replay import replay_store
from control_server.report_epoch import PolicyCache, ReportEpoch
from control_server.runs import RunLifecycle
from control_server.store import open_store
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report, make_report
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

LABELS = pb.RunLabels(dataset="Dataset042_Disc", configuration="2d", fold="0")


def start(stubs: Stubs, run_id: str, **fields: object) -> pb.StartRunResponse:
    labels = fields.pop("labels", LABELS)
    request = pb.StartRunRequest(
        run_id=run_id,
        labels=labels,  # type: ignore[arg-type]
        initial_lr=0.01,
        loss_weights={"dice": 1.0, "ce": 1.0},
        trainer_name="nnUNetTrainerControlled",
        trainer_version="test",
        **fields,  # type: ignore[arg-type]
    )
    response: pb.StartRunResponse = stubs.control.StartRun(request)
    return response


def plateau(stubs: Stubs, run_id: str, epochs: range, attempt: int = 0) -> list[pb.Decision]:
    """Reports whose val_loss never improves, at an LR below its cap: the default policy
    intervenes on them."""
    return [
        stubs.control.ReportEpoch(
            epoch_report(run_id, e, val_loss=0.6, current_lr=0.001, attempt=attempt)
        )
        for e in epochs
    ]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_new_run_gets_attempt_one_and_the_policy_that_steers_it(stubs: Stubs) -> None:
    started = start(stubs, "run-new")
    active = stubs.admin.ListPolicies(pb.ListPoliciesRequest()).active_version
    assert (started.attempt, started.policy_version, started.history_reset) == (1, active, False)
    assert "a new run" in started.message
    decision = stubs.control.ReportEpoch(epoch_report("run-new", 0, attempt=1))
    assert decision.attempt == 1
    [run] = stubs.admin.ListRuns(pb.ListRunsRequest()).runs
    assert (run.attempt, run.status, run.last_epoch) == (1, pb.ACTIVE, 0)


def test_a_start_from_scratch_on_a_known_run_id_begins_a_clean_history(
    stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    start(stubs, "run-x")
    first = plateau(stubs, "run-x", range(8), attempt=1)
    assert any(d.action == pb.INTERVENE for d in first)

    with caplog.at_level(logging.INFO, logger="control_server.runs"):
        again = start(stubs, "run-x")
    assert (again.attempt, again.history_reset, again.superseded_epochs) == (2, True, 8)
    assert "from scratch" in again.message and "8 epochs" in again.message
    assert any(
        r.levelno == logging.WARNING and "from scratch" in r.getMessage() for r in caplog.records
    )

    # The new history starts afresh: no decision of attempt 1 comes back for epoch 0,
    # and the policy's state starts over (its first intervention is index 1 again).
    fresh = stubs.control.ReportEpoch(epoch_report("run-x", 0, train_loss=0.9, attempt=2))
    assert fresh.decision_id != first[0].decision_id and fresh.attempt == 2
    later = plateau(stubs, "run-x", range(1, 8), attempt=2)
    assert [d.intervention_index for d in later if d.action == pb.INTERVENE][:1] == [1]

    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-x"))
    assert [e.decision.attempt for e in run.epochs] == [2] * 8
    assert run.epochs[0].report.train_loss == pytest.approx(0.9)
    assert sorted({e.decision.attempt for e in run.superseded}) == [1]
    assert [e.decision.decision_id for e in run.superseded] == [d.decision_id for d in first]
    assert [(a.attempt, a.history_reset) for a in run.attempts] == [(1, False), (2, True)]
    assert run.run.attempt == 2 and run.run.report_count == 8


def test_a_resume_continues_the_policy_state_of_its_checkpoint(stubs: Stubs) -> None:
    start(stubs, "run-r")
    first = plateau(stubs, "run-r", range(10), attempt=1)
    resumed = start(stubs, "run-r", resume_from_epoch=5)
    assert (resumed.attempt, resumed.history_reset, resumed.superseded_epochs) == (2, False, 4)
    assert "continues from epoch 5" in resumed.message

    # Epoch 6 is decided afresh, continuing from the state recorded after epoch 5.
    redo = stubs.control.ReportEpoch(
        epoch_report("run-r", 6, val_loss=0.6, current_lr=0.001, attempt=2)
    )
    assert redo.attempt == 2 and redo.decision_id != first[6].decision_id
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-r"))
    assert [(e.report.epoch, e.decision.attempt) for e in run.epochs] == [
        *[(e, 1) for e in range(6)],
        (6, 2),
    ]
    assert [(e.report.epoch, e.decision.attempt) for e in run.superseded] == [
        (e, 1) for e in range(6, 10)
    ]
    # What the first attempt decided for its kept epochs is answered to a retry.
    retry = epoch_report("run-r", 3, val_loss=0.6, current_lr=0.001, attempt=2)
    assert stubs.control.ReportEpoch(retry) == first[3]


def test_reports_of_another_attempt_are_refused(stubs: Stubs) -> None:
    start(stubs, "run-a")
    start(stubs, "run-a")
    old = refused(lambda: stubs.control.ReportEpoch(epoch_report("run-a", 0, attempt=1)))
    assert old.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "attempt 1 of run 'run-a' was superseded by attempt 2" in old.details()
    unknown = refused(lambda: stubs.control.ReportEpoch(epoch_report("run-a", 0, attempt=7)))
    assert unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no attempt 7" in unknown.details()
    # A report naming no attempt (an older client, grpcurl) goes to the latest one.
    assert stubs.control.ReportEpoch(epoch_report("run-a", 0)).attempt == 2


def test_a_first_report_without_start_run_opens_attempt_one(stubs: Stubs) -> None:
    assert stubs.control.ReportEpoch(epoch_report("run-legacy", 0)).attempt == 1
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-legacy"))
    assert [a.attempt for a in run.attempts] == [1]
    # Its next StartRun is attempt 2, and a resume keeps what it reported.
    assert start(stubs, "run-legacy", resume_from_epoch=0).attempt == 2


def test_epochs_going_backwards_are_refused_not_counted_as_new_firsts(stubs: Stubs) -> None:
    """A training restarted under the same id without StartRun reports 20, then 10, 6."""
    stubs.control.ReportEpoch(epoch_report("run-b", 20))
    for epoch in (10, 6):
        late = refused(lambda e=epoch: stubs.control.ReportEpoch(epoch_report("run-b", e)))
        assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"epoch {epoch} of run 'run-b' is older than epoch 20" in late.details()
        assert "StartRun" in late.details()
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-b"))
    assert [e.report.epoch for e in run.epochs] == [20]


def test_a_retry_with_a_different_payload_names_the_fields(stubs: Stubs) -> None:
    first = stubs.control.ReportEpoch(epoch_report("run-p", 0))
    assert stubs.control.ReportEpoch(epoch_report("run-p", 0)) == first
    changed = refused(
        lambda: stubs.control.ReportEpoch(
            epoch_report("run-p", 0, current_lr=0.02, loss_weights={"dice": 1.0})
        )
    )
    assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different current_lr, loss_weights" in changed.details()


def test_late_reports_are_recorded_not_decided(stubs: Stubs) -> None:
    start(stubs, "run-l")
    plateau(stubs, "run-l", range(2), attempt=1)
    # Epochs 2..6 were held by the client during an outage: delivered late, in order.
    held = [
        stubs.control.ReportEpoch(
            epoch_report("run-l", e, val_loss=0.6, current_lr=0.001, attempt=1, late=True)
        )
        for e in range(2, 7)
    ]
    assert all(d.action == pb.NONE and d.late for d in held)
    assert all("late report" in d.reason for d in held)
    live = stubs.control.ReportEpoch(epoch_report("run-l", 7, val_loss=0.6, attempt=1))
    assert not live.late and "late" not in live.reason
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-l"))
    assert [e.report.epoch for e in run.epochs] == list(range(8))  # no holes
    assert [e.report.late for e in run.epochs] == [False] * 2 + [True] * 5 + [False]
    assert run.run.intervention_count == 0


def test_finish_run_records_how_it_ended_and_runs_filter_by_status(stubs: Stubs) -> None:
    for run_id in ("run-done", "run-broke", "run-going"):
        start(stubs, run_id)
        plateau(stubs, run_id, range(3), attempt=1)
    metrics = pb.FinalMetrics(
        mean_dice=0.81, dice_per_class={"1": 0.9, "2": 0.72}, best_ema_pseudo_dice=0.83
    )
    metrics.best_ema_epoch = 2
    done = stubs.control.FinishRun(
        pb.FinishRunRequest(run_id="run-done", status=pb.COMPLETED, metrics=metrics)
    )
    assert done.status == pb.COMPLETED
    stubs.control.FinishRun(
        pb.FinishRunRequest(
            run_id="run-broke", attempt=1, status=pb.FAILED, error="CUDA out of memory"
        )
    )
    no_error = refused(
        lambda: stubs.control.FinishRun(pb.FinishRunRequest(run_id="run-going", status=pb.FAILED))
    )
    assert no_error.code() == grpc.StatusCode.INVALID_ARGUMENT and "error" in no_error.details()
    bad_status = refused(
        lambda: stubs.control.FinishRun(pb.FinishRunRequest(run_id="run-going", status=pb.STALE))
    )
    assert "COMPLETED, STOPPED or FAILED" in bad_status.details()
    unknown = refused(
        lambda: stubs.control.FinishRun(pb.FinishRunRequest(run_id="nope", status=pb.COMPLETED))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    def ids(status: int) -> list[str]:
        request = pb.ListRunsRequest(status=status)  # type: ignore[arg-type]
        return sorted(r.run_id for r in stubs.admin.ListRuns(request).runs)

    assert ids(pb.COMPLETED) == ["run-done"]
    assert ids(pb.FAILED) == ["run-broke"]
    assert ids(pb.ACTIVE) == ["run-going"]
    assert ids(pb.RUN_STATUS_UNSPECIFIED) == ["run-broke", "run-done", "run-going"]
    run = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-done")).run
    assert run.final_metrics.mean_dice == pytest.approx(0.81)
    assert dict(run.final_metrics.dice_per_class) == pytest.approx({"1": 0.9, "2": 0.72})
    assert run.final_metrics.best_ema_epoch == 2 and run.HasField("finished_at")
    broke = stubs.admin.GetRun(pb.GetRunRequest(run_id="run-broke")).run
    assert (broke.status, broke.error) == (pb.FAILED, "CUDA out of memory")


def test_a_run_that_stops_reporting_turns_stale_after_its_own_epoch_times(
    tmp_path: Path,
) -> None:
    """The clock is the only fake here (waiting minutes is not a test): a real store."""
    store = open_store(f"sqlite:///{tmp_path}/control.db")
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    lifecycle = RunLifecycle(store, clock=lambda: now[0], stale_factor=5)
    try:
        activate_startup_policy(store, None)
        use_case = ReportEpoch(store, clock=lambda: now[0])
        lifecycle.start(
            RunAttempt(run_id="run-s", attempt=0, started_at=now[0], initial_lr=0.01),
            RunLabels(),
            "test",
        )
        for epoch in range(5):  # an epoch every 120 s
            now[0] += timedelta(seconds=120)
            use_case.decide_batch([make_report("run-s", epoch, attempt=1)])

        def status() -> RunStatus:
            [run] = lifecycle.with_status(store.list_runs(RunFilter()))
            return run.status

        now[0] += timedelta(seconds=599)  # under 5 x the median of 120 s
        assert status() is RunStatus.ACTIVE
        now[0] += timedelta(seconds=2)
        assert status() is RunStatus.STALE
        lifecycle.finish("run-s", 0, RunStatus.STOPPED, "", FinalMetrics())
        assert status() is RunStatus.STOPPED  # finished runs are never stale
    finally:
        store.close()


def test_get_run_pages_a_run_larger_than_one_message(
    make_server: Callable[..., ServerThread],
) -> None:
    # A small message limit stands in for a 6,000-epoch run against the 4 MB default.
    server = make_server(max_message_bytes=64 * 1024)
    with grpc.insecure_channel(server.target) as channel:
        control = pb_grpc.TrainingControlStub(channel)
        admin = pb_grpc.ControlAdminStub(channel)
        for epoch in range(600):
            control.ReportEpoch(epoch_report("run-big", epoch))

        whole = refused(lambda: admin.GetRun(pb.GetRunRequest(run_id="run-big")))
        assert whole.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "page_size" in whole.details()

        epochs: list[int] = []
        token, pages = "", 0
        while True:
            page = admin.GetRun(pb.GetRunRequest(run_id="run-big", page_size=100, page_token=token))
            epochs += [e.report.epoch for e in page.epochs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert epochs == list(range(600)) and pages == 6
        ranged = admin.GetRun(pb.GetRunRequest(run_id="run-big", from_epoch=590, page_size=100))
        assert [e.report.epoch for e in ranged.epochs] == list(range(590, 600))
        assert not ranged.next_page_token
        too_big = refused(
            lambda: admin.GetRun(pb.GetRunRequest(run_id="run-big", page_size=50_000))
        )
        assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
        forged = refused(
            lambda: admin.GetRun(pb.GetRunRequest(run_id="run-big", page_token="other@3"))
        )
        assert forged.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The whole read that could not be sent is never audited as OK.
    audited = [e for e in server.running.store.admin_events() if e["action"] == "GetRun"]
    assert len(audited) >= 6
    assert all(e["result"] != "OK" for e in audited if "page_size" not in e["details"]["request"])


def test_late_reports_leave_a_once_override_for_the_live_epoch_and_replay_agrees(
    stubs: Stubs, server: ServerThread
) -> None:
    start(stubs, "run-o")
    plateau(stubs, "run-o", range(2), attempt=1)
    stubs.admin.SetOverride(
        pb.SetOverrideRequest(run_id="run-o", lr=0.005, once=True, reason="probe")
    )
    late = stubs.control.ReportEpoch(
        epoch_report("run-o", 2, current_lr=0.001, attempt=1, late=True)
    )
    assert late.action == pb.NONE and late.late
    live = stubs.control.ReportEpoch(epoch_report("run-o", 3, current_lr=0.001, attempt=1))
    assert (live.action, live.source, live.lr) == (pb.INTERVENE, pb.OVERRIDE, 0.005)

    cache = PolicyCache(server.running.store)
    runs, decisions, differences = replay_store(
        server.running.store,
        None,
        lambda recorded: (cache.get(recorded.policy_version), recorded.policy_version),
    )
    assert (runs, decisions, differences) == (1, 4, [])
