"""The storage contract, run against every backend.

A backend joins by adding its name to BACKENDS and a branch to `_store_url`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from control_server.domain import (
    Action,
    Decision,
    DecisionRecord,
    NotFound,
    PolicyVersion,
    Report,
    RunFilter,
    RunLabels,
    Source,
    StoreUnavailable,
    frozen_map,
)
from control_server.store import Store, open_store

BACKENDS = ["sqlite"]

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
LABELS = RunLabels(
    dataset="Dataset042_Disc",
    configuration="2d",
    fold="0",
    trainer="nnUNetTrainerControlled",
    plans="nnUNetPlans",
    host="gpu-7",
)
_ids = count()


def _store_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/contract/control.db"
    raise AssertionError(f"no URL for backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = open_store(_store_url(request.param, tmp_path))
    yield opened
    opened.close()


def make_report(run_id: str = "run-a", epoch: int = 0, **fields: Any) -> Report:
    values: dict[str, Any] = {
        "train_loss": 0.5 - epoch / 100,
        "current_lr": 0.01,
        "initial_lr": 0.01,
        "val_loss": 0.6 - epoch / 100,
        "pseudo_dice": 0.7,
        "avg_gradient_norm": 0.04,
        "intervention_count": 0,
        "loss_weights": frozen_map({"dice": 1.0, "ce": 1.0}),
        "labels": LABELS,
    }
    values.update(fields)
    return Report(run_id=run_id, epoch=epoch, **values)


def make_decision(run_id: str = "run-a", epoch: int = 0, **fields: Any) -> Decision:
    values: dict[str, Any] = {
        "decision_id": f"d-{next(_ids)}",
        "action": Action.NONE,
        "source": Source.POLICY,
        "reason": f"no plateau at epoch {epoch}",
        "policy_version": "abc123def456",
        "decided_at": T0 + timedelta(seconds=epoch),
    }
    values.update(fields)
    return Decision(run_id=run_id, epoch=epoch, **values)


def make_record(
    run_id: str = "run-a",
    epoch: int = 0,
    *,
    state: str | None = None,
    report: Report | None = None,
    **decision_fields: Any,
) -> DecisionRecord:
    return DecisionRecord(
        report=report or make_report(run_id, epoch),
        decision=make_decision(run_id, epoch, **decision_fields),
        state=state if state is not None else f'{{"run": "{run_id}", "epoch": {epoch}}}',
    )


def make_policy(version: str = "v1", name: str = "default", **doc: Any) -> PolicyVersion:
    return PolicyVersion(
        version=version,
        name=name,
        document={"name": name, "plateau": {"patience": 3}, **doc},
        created_at=T0,
    )


# --- decisions ----------------------------------------------------------------------


def test_round_trip_keeps_every_field(store: Store) -> None:
    report = make_report(
        "run-a",
        15,
        train_loss=0.3222,
        val_loss=0.31,
        pseudo_dice=0.81,
        avg_gradient_norm=0.04,
        intervention_count=2,
        current_lr=0.005,
        initial_lr=0.01,
        loss_weights=frozen_map({"dice": 0.6, "focal": 0.4}),
    )
    decision = make_decision(
        "run-a",
        15,
        action=Action.INTERVENE,
        source=Source.POLICY,
        reason="plateau: 3 bad epochs; g=0.04 -> 10x, k=3 damping 0.5, capped at 0.01",
        lr=0.01,
        loss_weights=frozen_map({"dice": 0.6, "focal": 0.4}),
        intervention_index=3,
        decided_at=datetime(2025, 3, 4, 7, 6, 7, 1, tzinfo=timezone(timedelta(hours=2))),
    )
    record = DecisionRecord(report, decision, '{"bad_epochs": 0}')

    assert store.record_decisions([record]) == [decision]

    context = store.load_context("run-a", 15)
    assert context.existing == decision
    assert context.existing.decided_at.utcoffset() == timedelta(0)
    assert dict(context.existing.loss_weights) == {"dice": 0.6, "focal": 0.4}
    run = store.get_run("run-a")
    assert run is not None
    assert run[1] == [(report, decision)]


def test_round_trip_keeps_absent_optionals(store: Store) -> None:
    report = make_report(
        "run-b",
        0,
        val_loss=None,
        pseudo_dice=None,
        avg_gradient_norm=None,
        loss_weights=frozen_map(),
        labels=RunLabels(),
    )
    decision = make_decision("run-b", 0, lr=None, loss_weights=frozen_map())
    store.record_decisions([DecisionRecord(report, decision, "{}")])

    run = store.get_run("run-b")
    assert run is not None
    [(stored_report, stored_decision)] = run[1]
    assert stored_report == report
    assert stored_report.val_loss is None and stored_report.avg_gradient_norm is None
    assert stored_decision == decision
    assert stored_decision.lr is None and dict(stored_decision.loss_weights) == {}


def test_non_finite_losses_are_recorded_as_sent(store: Store) -> None:
    report = make_report(
        "run-nan", 4, train_loss=math.nan, val_loss=math.inf, avg_gradient_norm=-math.inf
    )
    decision = make_decision(
        "run-nan",
        4,
        action=Action.STOP,
        source=Source.SAFETY,
        reason="loss is not finite (train_loss=nan)",
    )
    store.record_decisions([DecisionRecord(report, decision, "{}")])

    run = store.get_run("run-nan")
    assert run is not None
    [(stored, _)] = run[1]
    assert math.isnan(stored.train_loss)
    assert stored.val_loss == math.inf
    assert stored.avg_gradient_norm == -math.inf


def test_empty_batch_is_a_no_op(store: Store) -> None:
    assert store.record_decisions([]) == []
    assert store.run_ids() == []


def test_a_retried_report_gets_the_first_decision(store: Store) -> None:
    first = make_record("run-a", 3, reason="first")
    retry = make_record(
        "run-a",
        3,
        reason="second",
        action=Action.INTERVENE,
        lr=0.05,
        report=make_report("run-a", 3, train_loss=9.0),
    )

    assert store.record_decisions([first]) == [first.decision]
    assert store.record_decisions([retry]) == [first.decision]

    run = store.get_run("run-a")
    assert run is not None
    summary, pairs = run
    assert pairs == [(first.report, first.decision)]
    assert summary.report_count == 1
    assert store.load_context("run-a", 3).previous_state is None


def test_duplicates_within_one_batch_resolve_to_the_first(store: Store) -> None:
    a = make_record("run-a", 0)
    b = make_record("run-b", 0)
    a_again = make_record("run-a", 0, reason="duplicate")
    a_third = make_record("run-a", 0, reason="triplicate")

    result = store.record_decisions([a, b, a_again, a_third])

    assert result == [a.decision, b.decision, a.decision, a.decision]
    run = store.get_run("run-a")
    assert run is not None
    assert run[0].report_count == 1
    assert [d.decision_id for _, d in run[1]] == [a.decision.decision_id]


def test_load_context_reads_the_latest_state_before_the_epoch(store: Store) -> None:
    store.record_decisions([make_record("run-a", e, state=f"s{e}") for e in (0, 1, 3)])
    store.record_decisions([make_record("run-b", 2, state="other run")])

    at2 = store.load_context("run-a", 2)
    assert at2.existing is None
    assert at2.previous_state == "s1"

    at3 = store.load_context("run-a", 3)
    assert at3.existing is not None and at3.existing.epoch == 3
    assert at3.previous_state == "s1"

    assert store.load_context("run-a", 0).previous_state is None
    assert store.load_context("run-a", 10).previous_state == "s3"
    assert store.load_context("run-c", 5).previous_state is None


def test_load_context_on_an_empty_store(store: Store) -> None:
    context = store.load_context("nobody", 0)
    assert (context.existing, context.previous_state, context.active_policy, context.override) == (
        None,
        None,
        None,
        None,
    )


# --- runs ---------------------------------------------------------------------------


def test_run_summary_follows_the_newest_epoch(store: Store) -> None:
    labels_later = replace(LABELS, host="gpu-9")
    store.record_decisions([make_record("run-a", 0), make_record("run-a", 1)])
    newest = make_record(
        "run-a",
        5,
        report=make_report("run-a", 5, intervention_count=1, current_lr=0.02, labels=labels_later),
    )
    store.record_decisions([newest])
    # A late report of an older epoch counts but does not roll the summary back.
    store.record_decisions(
        [
            make_record(
                "run-a", 3, report=make_report("run-a", 3, intervention_count=0, current_lr=0.001)
            )
        ]
    )

    [summary] = store.list_runs(RunFilter())
    assert summary.run_id == "run-a"
    assert summary.last_epoch == 5
    assert summary.report_count == 4
    assert summary.intervention_count == 1
    assert summary.current_lr == 0.02
    assert summary.labels == labels_later
    assert summary.last_decision == newest.decision
    assert summary.first_seen == T0
    assert summary.last_seen == T0 + timedelta(seconds=5)
    assert summary.first_seen.tzinfo is not None


def test_list_runs_filters_orders_and_limits(store: Store) -> None:
    def run(run_id: str, dataset: str, configuration: str, fold: str, at: int) -> DecisionRecord:
        labels = RunLabels(dataset=dataset, configuration=configuration, fold=fold)
        return make_record(
            run_id,
            0,
            report=make_report(run_id, 0, labels=labels),
            decided_at=T0 + timedelta(minutes=at),
        )

    store.record_decisions(
        [
            run("r1", "D1", "2d", "0", 1),
            run("r2", "D1", "3d_fullres", "0", 4),
            run("r3", "D2", "2d", "1", 3),
            run("r4", "D1", "2d", "1", 2),
        ]
    )

    def ids(**kwargs: Any) -> list[str]:
        return [s.run_id for s in store.list_runs(RunFilter(**kwargs))]

    assert ids() == ["r2", "r3", "r4", "r1"]
    assert ids(dataset="D1") == ["r2", "r4", "r1"]
    assert ids(dataset="D1", configuration="2d") == ["r4", "r1"]
    assert ids(fold="1") == ["r3", "r4"]
    assert ids(dataset="D1", configuration="2d", fold="0") == ["r1"]
    assert ids(dataset="D9") == []
    assert ids(limit=2) == ["r2", "r3"]
    assert ids(dataset="D1", limit=1) == ["r2"]


def test_get_run_returns_pairs_in_epoch_order(store: Store) -> None:
    records = [make_record("run-a", e) for e in (4, 0, 2)]
    store.record_decisions(records[:1])
    store.record_decisions(records[1:])
    store.record_decisions([make_record("run-b", 1)])

    run = store.get_run("run-a")
    assert run is not None
    summary, pairs = run
    assert [r.epoch for r, _ in pairs] == [0, 2, 4]
    assert [d.epoch for _, d in pairs] == [0, 2, 4]
    by_epoch = {r.report.epoch: r for r in records}
    assert all(by_epoch[r.epoch].report == r and by_epoch[r.epoch].decision == d for r, d in pairs)
    assert summary.report_count == 3
    assert store.get_run("nobody") is None


def test_run_ids_lists_every_run(store: Store) -> None:
    store.record_decisions([make_record(r, 0) for r in ("b", "a", "c")])
    store.record_decisions([make_record("a", 1)])
    assert sorted(store.run_ids()) == ["a", "b", "c"]


# --- policies -----------------------------------------------------------------------


def test_put_policy_is_idempotent_and_immutable(store: Store) -> None:
    first = make_policy("v1")
    assert store.put_policy(first) == first
    again = replace(
        first, name="renamed", created_at=T0 + timedelta(days=1), document={"name": "renamed"}
    )
    assert store.put_policy(again) == first
    assert store.get_policy("v1") == first
    assert store.get_policy("nope") is None
    assert store.list_policies() == [first]


def test_policy_document_round_trips_nested_data(store: Store) -> None:
    policy = make_policy(
        "v2",
        interventions={
            "damping": [1.0, 0.7, 0.5],
            "max_lr": None,
            "random_mixes": [{"dice": 0.6, "focal": 0.4}],
        },
        guard={"on_nonfinite": "stop", "guard_epochs": 2},
    )
    store.put_policy(policy)
    stored = store.get_policy("v2")
    assert stored is not None
    assert stored.document == policy.document
    assert stored.created_at == T0


def test_list_policies_oldest_first(store: Store) -> None:
    later = replace(make_policy("later"), created_at=T0 + timedelta(hours=1))
    earlier = make_policy("earlier")
    store.put_policy(later)
    store.put_policy(earlier)
    assert [p.version for p in store.list_policies()] == ["earlier", "later"]


def test_activate_policy(store: Store) -> None:
    assert store.active_policy() is None
    store.put_policy(make_policy("v1"))
    store.put_policy(make_policy("v2", name="other"))

    store.activate_policy("v1", actor="alice")
    assert store.active_policy() == "v1"
    assert store.load_context("run-a", 0).active_policy == "v1"
    store.activate_policy("v2", actor="bob")
    assert store.active_policy() == "v2"

    with pytest.raises(NotFound, match="v9"):
        store.activate_policy("v9", actor="mallory")
    assert store.active_policy() == "v2"

    events = store.admin_events()
    assert [(e["actor"], e["action"], e["target"], e["result"]) for e in events] == [
        ("alice", "ActivatePolicy", "v1", "OK"),
        ("bob", "ActivatePolicy", "v2", "OK"),
    ]
    assert events[1]["details"] == {"previous": "v1"}


# --- audit and maintenance ----------------------------------------------------------


def test_admin_events_are_appended_in_order(store: Store) -> None:
    before = datetime.now(UTC)
    store.record_admin_event(
        "alice",
        "SetOverride",
        "run-a",
        {"lr": 0.01, "loss_weights": {"dice": 1.0}, "once": True},
        "OK",
    )
    store.record_admin_event("bob", "ClearOverride", "run-a", {}, "NOT_FOUND")

    events = store.admin_events()
    assert [set(e) for e in events] == [
        {"at", "actor", "action", "target", "details", "result"}
    ] * 2
    assert events[0]["details"] == {"lr": 0.01, "loss_weights": {"dice": 1.0}, "once": True}
    assert [(e["actor"], e["action"], e["result"]) for e in events] == [
        ("alice", "SetOverride", "OK"),
        ("bob", "ClearOverride", "NOT_FOUND"),
    ]
    assert before - timedelta(seconds=1) <= events[0]["at"] <= events[1]["at"]
    assert events[0]["at"].tzinfo is not None


def test_schema_version_and_integrity(store: Store) -> None:
    assert store.schema_version() >= 1
    store.record_decisions([make_record("run-a", e) for e in range(3)])
    store.check_integrity()


def test_a_closed_store_is_unavailable(store: Store) -> None:
    store.close()
    with pytest.raises(StoreUnavailable):
        store.load_context("run-a", 0)
    store.close()  # closing twice is harmless
