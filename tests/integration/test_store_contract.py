"""The storage contract, run against every backend.

A backend joins by adding its name to BACKENDS and a branch to `_store_url`.
PostgreSQL runs on the system server (tests/pg.py), in a database of this
module that each test gets emptied; without the server the PostgreSQL half
skips, or fails with CI=true.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from control_server.domain import (
    Action,
    AuditFilter,
    Decision,
    DecisionFilter,
    DecisionRecord,
    InvalidArgument,
    NotFound,
    Override,
    PolicyPin,
    Report,
    RunContext,
    RunFilter,
    RunLabels,
    RunSelector,
    Source,
    StoreUnavailable,
    frozen_map,
)
from control_server.store import Store, open_store
from tests.factories import (
    LABELS,
    T0,
    make_decision,
    make_override,
    make_policy,
    make_record,
    make_report,
)
from tests.pg import empty_tables

BACKENDS = ["sqlite", "postgresql"]


@contextmanager
def _store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store of `backend`, for the body of the ``with``."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/contract/control.db"
    elif backend == "postgresql":
        url = request.getfixturevalue("pg_database")
        empty_tables(url)
        yield url
    else:
        raise AssertionError(f"no URL for backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with _store_url(request.param, request, tmp_path) as url:
        # As the decider opens it: group_commit then runs with SQLite's context memory.
        opened = open_store(url, remember_contexts=True)
        yield opened
        opened.close()


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


def test_decisions_keep_the_epoch_they_continued_from(store: Store) -> None:
    store.record_decisions([make_record("run-a", 5)])
    late = make_record("run-a", 2, previous_epoch=None)  # arrived after epoch 5
    after = make_record("run-a", 6, previous_epoch=5)
    store.record_decisions([late, after])

    assert store.load_context("run-a", 7).previous_epoch == 6
    assert store.load_context("run-a", 4).previous_epoch == 2
    assert store.load_context("run-a", 2).previous_epoch is None
    run = store.get_run("run-a")
    assert run is not None
    assert [(d.epoch, d.previous_epoch) for _, d in run[1]] == [(2, None), (5, None), (6, 5)]


def test_load_context_on_an_empty_store(store: Store) -> None:
    empty = RunContext(existing=None, previous_state=None, active_policy=None)
    assert store.load_context("nobody", 0) == empty
    assert store.load_context("nobody", 0, LABELS) == empty
    assert empty.pinned_policy is None and empty.shadow_policy is None
    assert empty.override is None and empty.previous_shadow_state is None


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
        ("alice", "PolicyActivated", "v1", "OK"),
        ("bob", "PolicyActivated", "v2", "OK"),
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


def test_admin_events_are_listed_newest_first_filtered_and_limited(store: Store) -> None:
    store.record_admin_event("alice", "SetOverride", "run-a", {"lr": 0.01}, "OK")
    store.record_admin_event("bob", "SetOverride", "run-b", {}, "OK")
    middle = datetime.now(UTC)
    store.record_admin_event("alice", "ClearOverride", "run-a", {}, "NOT_FOUND")

    def listed(**fields: Any) -> list[tuple[str, str, str]]:
        events = store.list_admin_events(AuditFilter(**fields))
        return [(e.actor, e.action, e.target) for e in events]

    assert listed() == [
        ("alice", "ClearOverride", "run-a"),
        ("bob", "SetOverride", "run-b"),
        ("alice", "SetOverride", "run-a"),
    ]
    assert listed(actor="alice", action="SetOverride") == [("alice", "SetOverride", "run-a")]
    assert listed(target="run-b") == [("bob", "SetOverride", "run-b")]
    assert listed(action="Set") == []  # exact matches only
    assert listed(since=middle) == [("alice", "ClearOverride", "run-a")]
    assert [t for _, _, t in listed(until=middle)] == ["run-b", "run-a"]
    assert len(listed(limit=2)) == 2 and len(listed(limit=0)) == 3
    [oldest] = store.list_admin_events(AuditFilter(target="run-a", action="SetOverride"))
    assert (oldest.details, oldest.result) == ({"lr": 0.01}, "OK")
    assert oldest.at.tzinfo is not None


# --- the fleet at a glance ----------------------------------------------------------------


def test_runs_with_nonfinite_losses_are_found_in_their_reports(store: Store) -> None:
    losses = {
        "run-fine": (0.5, None),
        "run-nan": (math.nan, 0.6),
        "run-inf": (0.5, math.inf),
        "run-neg": (0.5, -math.inf),
        "run-nan-val": (0.5, math.nan),
    }
    store.record_decisions(
        [
            make_record(run_id, 0, report=make_report(run_id, 0, train_loss=t, val_loss=v))
            for run_id, (t, v) in losses.items()
        ]
    )
    assert store.runs_with_nonfinite_losses(list(losses)) == {
        "run-nan",
        "run-inf",
        "run-neg",
        "run-nan-val",
    }
    assert store.runs_with_nonfinite_losses(["run-fine", "run-other"]) == set()
    assert store.runs_with_nonfinite_losses([]) == set()


def test_runs_with_a_decision_reason_match_a_like_pattern_of_the_policy(store: Store) -> None:
    spent = "Plateau: x, but the budget of 3 interventions is spent"
    store.record_decisions(
        [
            make_record("run-a", 0, reason=spent),
            make_record("run-b", 0, reason="val_loss 0.5 improved"),
            make_record("run-c", 0, reason=spent, source=Source.OVERRIDE),
        ]
    )
    like = "Plateau: %the budget of % interventions is spent%"
    assert store.runs_with_decision_reason(["run-a", "run-b", "run-c"], like) == {"run-a"}
    assert store.runs_with_decision_reason(["run-b"], like) == set()


def test_report_series_are_thinned_evenly_keeping_the_newest(store: Store) -> None:
    store.record_decisions(
        [make_record("run-a", e) for e in range(10)]
        + [make_record("run-b", 7)]
        + [make_record("run-c", e) for e in range(3)]
        + [make_record("run-gaps", e) for e in range(0, 20, 2)]
        + [make_record("run-late", e) for e in range(5, 15)]
    )

    def epochs(per_run: int, runs: tuple[str, ...] = ("run-a", "run-b")) -> dict[str, list[int]]:
        series = store.report_series(list(runs), per_run)
        return {run_id: [r.epoch for r in reports] for run_id, reports in series.items()}

    assert epochs(4) == {"run-a": [0, 3, 6, 9], "run-b": [7]}
    assert epochs(1) == {"run-a": [9], "run-b": [7]}
    assert epochs(0)["run-a"] == list(range(10)) == epochs(20)["run-a"]
    assert epochs(2, ("run-c", "run-none")) == {"run-c": [0, 2]}
    # Every fourth row of each, whether epochs have gaps or start late.
    assert epochs(4, ("run-gaps", "run-late")) == {
        "run-gaps": [0, 6, 12, 18],
        "run-late": [5, 8, 11, 14],
    }
    # What a trend needs, as reported; the weights' JSON is not decoded for it.
    [first, *_] = store.report_series(["run-a"], 4)["run-a"]
    reported = make_report("run-a", 0)
    for name in ("epoch", "train_loss", "val_loss", "pseudo_dice", "current_lr"):
        assert getattr(first, name) == getattr(reported, name), name


def test_schema_version_and_integrity(store: Store) -> None:
    assert store.schema_version() >= 1
    store.record_decisions([make_record("run-a", e) for e in range(3)])
    store.check_integrity()


def test_a_closed_store_is_unavailable(store: Store) -> None:
    store.close()
    with pytest.raises(StoreUnavailable):
        store.load_context("run-a", 0)
    store.close()  # closing twice is harmless


# --- overrides ----------------------------------------------------------------------


def test_set_override_stores_every_field_and_gives_an_id(store: Store) -> None:
    wanted = make_override(
        lr=None,
        loss_weights=frozen_map({"dice": 0.5, "focal": 0.5}),
        hold_interventions=True,
        once=True,
    )
    stored = store.set_override(wanted)
    assert stored.override_id is not None
    assert stored == replace(wanted, override_id=stored.override_id)
    assert stored.active and stored.cleared_by == ""
    assert store.list_overrides("run-a") == [stored]
    assert store.load_context("run-a", 0).override == stored


def test_an_operator_rollback_keeps_what_it_restores_and_its_epoch(store: Store) -> None:
    wanted = make_override(
        action=Action.ROLLBACK,
        once=True,
        lr=0.004,
        loss_weights=frozen_map({"dice": 1.0, "ce": 1.0}),
        rollback_epoch=12,
    )
    stored = store.set_override(wanted)
    assert stored == replace(wanted, override_id=stored.override_id)
    assert store.load_context("run-a", 13).override == stored
    capped = store.set_override(make_override(at=1, lr=0.5, exceed_lr_cap=True))
    assert (capped.exceed_lr_cap, capped.action) == (True, None)


def test_a_new_override_replaces_the_active_one(store: Store) -> None:
    first = store.set_override(make_override(at=0))
    second = store.set_override(make_override(at=1, lr=0.03, actor="bob"))
    other_run = store.set_override(make_override("run-b", at=2))
    assert first.override_id is not None and second.override_id is not None
    assert second.override_id > first.override_id
    assert (first.replaced_override_id, second.replaced_override_id) == (None, first.override_id)
    assert other_run.replaced_override_id is None

    assert store.load_context("run-a", 0).override == second
    assert store.list_overrides("run-a") == [second]
    everything = store.list_overrides("run-a", include_cleared=True)
    assert [o.override_id for o in everything] == [first.override_id, second.override_id]
    replaced = everything[0]
    assert replaced.cleared_at == second.created_at
    assert replaced.cleared_by == f"replaced by override {second.override_id}"
    assert store.list_overrides() == [second, other_run]


def test_clear_override(store: Store) -> None:
    active = store.set_override(make_override())
    at = T0 + timedelta(hours=1)

    cleared = store.clear_override("run-a", "bob", at)
    assert cleared == replace(active, cleared_at=at, cleared_by="bob")
    assert not cleared.active
    assert store.load_context("run-a", 0).override is None
    assert store.list_overrides("run-a") == []
    assert store.list_overrides("run-a", include_cleared=True) == [cleared]
    assert store.clear_override("run-a", "bob", at) is None
    assert store.clear_override("nobody", "bob", at) is None


def test_decisions_keep_the_override_they_were_made_under(store: Store) -> None:
    held = store.set_override(make_override(hold_interventions=True))
    record = make_record("run-a", 0, override_id=held.override_id, source=Source.OVERRIDE)
    assert store.record_decisions([record]) == [record.decision]
    assert store.load_context("run-a", 0).existing == record.decision
    run = store.get_run("run-a")
    assert run is not None and run[1][0][1].override_id == held.override_id
    # A held override is not consumed.
    assert store.load_context("run-a", 1).override == held


def _once_record(epoch: int, override: Override, **fields: Any) -> DecisionRecord:
    record = make_record(
        override.run_id, epoch, override_id=override.override_id, source=Source.OVERRIDE, **fields
    )
    return replace(record, consumed_override=override.override_id)


def test_a_once_override_is_consumed_by_the_decision_that_used_it(store: Store) -> None:
    once = store.set_override(make_override(once=True))
    record = _once_record(4, once)

    assert store.record_decisions([record]) == [record.decision]

    assert store.load_context("run-a", 5).override is None
    [consumed] = store.list_overrides("run-a", include_cleared=True)
    assert consumed.cleared_at == record.decision.decided_at
    assert consumed.cleared_by == "consumed by epoch 4"


def test_a_once_override_applies_exactly_once(store: Store) -> None:
    once = store.set_override(make_override(once=True))
    first, rival = _once_record(4, once), _once_record(5, once)

    # Two epochs decided with the same once override, in one batch: only the first stands.
    assert store.record_decisions([first, rival]) == [first.decision, None]
    run = store.get_run("run-a")
    assert run is not None
    assert [d.epoch for _, d in run[1]] == [4]
    assert run[0].report_count == 1
    # ... and in a later batch too; a retry of the first gets its decision back.
    assert store.record_decisions([rival, _once_record(4, once)]) == [None, first.decision]
    assert store.load_context("run-a", 5).existing is None
    [consumed] = store.list_overrides("run-a", include_cleared=True)
    assert consumed.cleared_by == "consumed by epoch 4"


def test_a_retry_consumes_nothing(store: Store) -> None:
    store.record_decisions([make_record("run-a", 3)])
    later = store.set_override(make_override(at=5, once=True))
    # A report retried after the override was set gets the recorded decision;
    # the override waits for the run's next report.
    retry = _once_record(3, later)
    [got] = store.record_decisions([retry])
    assert got is not None and got.override_id is None
    assert store.load_context("run-a", 4).override == later


def test_a_decision_whose_once_override_was_cleared_meanwhile_is_refused(store: Store) -> None:
    once = store.set_override(make_override(once=True))
    store.clear_override("run-a", "bob", T0 + timedelta(minutes=1))
    assert store.record_decisions([_once_record(0, once)]) == [None]
    assert store.run_ids() == []
    assert store.load_context("run-a", 0).existing is None
    replaced = store.set_override(make_override(at=2, once=True))
    store.set_override(make_override(at=3, once=True))
    assert store.record_decisions([_once_record(0, replaced)]) == [None]
    assert store.run_ids() == []


# --- policy pins and the shadow version ----------------------------------------------


def _pin(version: str, at: int, **selector: str) -> PolicyPin:
    return PolicyPin(RunSelector(**selector), version, T0 + timedelta(minutes=at), "alice")


def test_the_most_specific_matching_pin_wins(store: Store) -> None:
    for version in ("v-active", "v-dataset", "v-config", "v-fold", "v-exact", "v-other"):
        store.put_policy(make_policy(version))
    store.activate_policy("v-active", actor="alice")
    store.pin_policy(_pin("v-dataset", 0, dataset="Dataset042_Disc"))
    store.pin_policy(_pin("v-config", 1, dataset="Dataset042_Disc", configuration="2d"))
    store.pin_policy(_pin("v-fold", 2, fold="0"))
    store.pin_policy(_pin("v-other", 3, dataset="Dataset999_Other"))

    def pinned(**labels: str) -> str | None:
        return store.load_context("run-a", 0, RunLabels(**labels)).pinned_policy

    assert pinned(dataset="Dataset042_Disc", configuration="2d", fold="0") == "v-config"
    assert pinned(dataset="Dataset042_Disc", configuration="3d_fullres", fold="0") == "v-fold"
    assert pinned(dataset="Dataset042_Disc", configuration="3d_fullres", fold="1") == "v-dataset"
    assert pinned(dataset="Dataset007_Lung", fold="0") == "v-fold"
    assert pinned(dataset="Dataset007_Lung", fold="1") is None
    assert store.load_context("run-a", 0).pinned_policy is None  # no labels, no pin
    assert store.load_context("run-a", 0).active_policy == "v-active"

    store.pin_policy(_pin("v-exact", 4, dataset="Dataset042_Disc", configuration="2d", fold="0"))
    assert pinned(dataset="Dataset042_Disc", configuration="2d", fold="0") == "v-exact"


def test_equally_specific_pins_go_to_the_most_recent(store: Store) -> None:
    for version in ("v1", "v2"):
        store.put_policy(make_policy(version))
    store.pin_policy(_pin("v1", 5, configuration="2d"))
    store.pin_policy(_pin("v2", 1, dataset="Dataset042_Disc"))
    assert store.load_context("r", 0, LABELS).pinned_policy == "v1"
    # Pinning the same selector again replaces it and makes it the most recent.
    store.pin_policy(_pin("v2", 9, configuration="2d"))
    assert store.load_context("r", 0, LABELS).pinned_policy == "v2"
    assert [(p.selector, p.version) for p in store.list_pins()] == [
        (RunSelector(dataset="Dataset042_Disc"), "v2"),
        (RunSelector(configuration="2d"), "v2"),
    ]


def test_pin_and_unpin(store: Store) -> None:
    store.put_policy(make_policy("v1"))
    with pytest.raises(NotFound, match="v9"):
        store.pin_policy(_pin("v9", 0, dataset="D"))
    pin = _pin("v1", 0, dataset="D", fold="all")
    assert store.pin_policy(pin) == pin
    assert store.list_pins() == [pin]
    assert store.unpin_policy(RunSelector(dataset="D")) is False  # selectors match exactly
    assert store.unpin_policy(RunSelector(dataset="D", fold="all")) is True
    assert store.unpin_policy(RunSelector(dataset="D", fold="all")) is False
    assert store.list_pins() == []
    labels = RunLabels(dataset="D", fold="all")
    assert store.load_context("r", 0, labels).pinned_policy is None


def test_set_and_clear_the_shadow_version(store: Store) -> None:
    store.put_policy(make_policy("v1"))
    assert store.shadow_policy() is None
    with pytest.raises(NotFound, match="v9"):
        store.set_shadow_policy("v9", "alice", T0)
    store.set_shadow_policy("v1", "alice", T0)
    assert store.shadow_policy() == "v1"
    assert store.load_context("run-a", 0).shadow_policy == "v1"
    store.set_shadow_policy(None, "alice", T0)
    assert store.shadow_policy() is None
    assert store.load_context("run-a", 0).shadow_policy is None


def _shadowed(epoch: int, version: str, run_id: str = "run-a", **fields: Any) -> DecisionRecord:
    record = make_record(run_id, epoch, state=f"real {epoch}")
    shadow = make_decision(run_id, epoch, policy_version=version, **fields)
    return replace(record, shadow=shadow, shadow_state=f"{version} {epoch}")


def test_shadow_decisions_are_stored_beside_the_real_ones(store: Store) -> None:
    for version in ("v-shadow", "v-next"):
        store.put_policy(make_policy(version))
    store.set_shadow_policy("v-shadow", "alice", T0)
    records = [_shadowed(e, "v-shadow", action=Action.INTERVENE, lr=0.1) for e in (0, 1)]
    assert store.record_decisions(records) == [r.decision for r in records]

    assert store.shadow_decisions("run-a") == [r.shadow for r in records]
    assert store.shadow_decisions("nobody") == []
    context = store.load_context("run-a", 2)
    assert context.previous_state == "real 1"
    assert context.previous_shadow_state == "v-shadow 1"
    # A retry stores no second shadow decision.
    retry = _shadowed(1, "v-shadow", action=Action.STOP)
    assert store.record_decisions([retry]) == [records[1].decision]
    assert store.shadow_decisions("run-a") == [r.shadow for r in records]
    # The stored shadow state is only handed out for the current shadow version.
    store.set_shadow_policy("v-next", "alice", T0)
    assert store.load_context("run-a", 2).previous_shadow_state is None
    store.set_shadow_policy(None, "alice", T0)
    assert store.load_context("run-a", 2).previous_shadow_state is None
    # An epoch decided without a shadow breaks the chain.
    store.set_shadow_policy("v-shadow", "alice", T0)
    store.record_decisions([make_record("run-a", 2)])
    assert store.load_context("run-a", 3).previous_shadow_state is None


def test_shadow_summary_counts_differences_by_transition(store: Store) -> None:
    store.put_policy(make_policy("v-shadow"))
    same = _shadowed(0, "v-shadow")
    other_reason = _shadowed(1, "v-shadow", reason="worded differently")
    intervenes = _shadowed(2, "v-shadow", action=Action.INTERVENE, lr=0.05)
    other_weights = _shadowed(3, "v-shadow", loss_weights=frozen_map({"dice": 1.0}))
    real_intervenes = replace(
        _shadowed(4, "v-shadow"),
        decision=make_decision("run-a", 4, action=Action.INTERVENE, lr=0.02),
    )
    other_lr = replace(
        _shadowed(5, "v-shadow", action=Action.INTERVENE, lr=0.03),
        decision=make_decision("run-a", 5, action=Action.INTERVENE, lr=0.02),
    )
    elsewhere = _shadowed(0, "v-other", run_id="run-b", action=Action.STOP)
    store.record_decisions(
        [same, other_reason, intervenes, other_weights, real_intervenes, other_lr, elsewhere]
    )

    summary = store.shadow_summary("v-shadow")
    assert (summary.version, summary.evaluated, summary.differed) == ("v-shadow", 6, 4)
    assert dict(summary.by_transition) == {
        "NONE->INTERVENE": 1,
        "NONE->NONE": 1,
        "INTERVENE->NONE": 1,
        "INTERVENE->INTERVENE": 1,
    }
    empty = store.shadow_summary("never-shadowed")
    assert (empty.evaluated, empty.differed, dict(empty.by_transition)) == (0, 0, {})


# --- decision queries ---------------------------------------------------------------


def _mixed_decisions(store: Store) -> list[Decision]:
    records = [
        make_record("run-a", 0, decided_at=T0),
        make_record("run-b", 0, decided_at=T0 + timedelta(seconds=1)),
        make_record("run-a", 1, decided_at=T0 + timedelta(seconds=2), action=Action.INTERVENE),
        make_record(
            "run-a",
            2,
            decided_at=T0 + timedelta(seconds=3),
            action=Action.ROLLBACK,
            source=Source.SAFETY,
        ),
        make_record("run-b", 1, decided_at=T0 + timedelta(seconds=4), source=Source.OVERRIDE),
    ]
    store.record_decisions(records[:2])
    store.record_decisions(records[2:])
    return [r.decision for r in records]


def test_list_decisions_filters_oldest_first(store: Store) -> None:
    a0, b0, a1, a2, b1 = _mixed_decisions(store)

    def ids(**kwargs: Any) -> list[str]:
        return [d.decision_id for d in store.list_decisions(DecisionFilter(**kwargs))]

    assert store.list_decisions(DecisionFilter()) == [a0, b0, a1, a2, b1]
    assert ids(run_id="run-a") == [d.decision_id for d in (a0, a1, a2)]
    assert ids(action=Action.INTERVENE) == [a1.decision_id]
    assert ids(source=Source.SAFETY) == [a2.decision_id]
    assert ids(run_id="run-b", source=Source.OVERRIDE) == [b1.decision_id]
    assert ids(since=T0 + timedelta(seconds=1)) == [d.decision_id for d in (b0, a1, a2, b1)]
    assert ids(until=T0 + timedelta(seconds=2)) == [a0.decision_id, b0.decision_id]
    later = datetime(2025, 3, 4, 7, 6, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert ids(since=later, until=T0 + timedelta(seconds=4)) == [a1.decision_id, a2.decision_id]
    assert ids(limit=2) == [a0.decision_id, b0.decision_id]
    assert ids(limit=0) == ids()
    assert ids(run_id="nobody") == []


def test_decisions_after_a_cursor_in_commit_order(store: Store) -> None:
    assert store.latest_decision_seq() == 0
    start = store.decisions_after(0, DecisionFilter(), 10)
    assert (start.decisions, start.cursor) == ((), 0)

    first = make_record("run-a", 0)
    store.record_decisions([first])
    cursor = store.latest_decision_seq()
    assert cursor > 0
    assert store.decisions_after(cursor, DecisionFilter(), 10).decisions == ()

    _, b0, a1, a2, b1 = _mixed_decisions(store)  # run-a 0 again: a duplicate, not new
    page = store.decisions_after(cursor, DecisionFilter(), 10)
    assert page.decisions == (b0, a1, a2, b1)
    assert page.cursor == store.latest_decision_seq()
    assert store.decisions_after(page.cursor, DecisionFilter(), 10).decisions == ()

    # Filters and limits; a cursor past rows that do not match moves on all the same.
    only_a = store.decisions_after(cursor, DecisionFilter(run_id="run-a"), 10)
    assert only_a.decisions == (a1, a2)
    assert only_a.cursor == page.cursor
    assert store.decisions_after(cursor, DecisionFilter(source=Source.OVERRIDE), 10).decisions == (
        b1,
    )
    assert store.decisions_after(cursor, DecisionFilter(action=Action.ROLLBACK), 10).decisions == (
        a2,
    )
    two = store.decisions_after(cursor, DecisionFilter(), 2)
    assert two.decisions == (b0, a1)
    rest = store.decisions_after(two.cursor, DecisionFilter(), 2)
    assert rest.decisions == (a2, b1)
    assert first.decision not in page.decisions


# --- read-decide-write in one transaction --------------------------------------------


def _recording_decide(
    seen: list[tuple[int, RunContext]],
) -> Callable[[Report, RunContext], DecisionRecord | Decision]:
    """Records every context it decides on; answers a stored epoch's decision again."""

    def decide(report: Report, context: RunContext) -> DecisionRecord | Decision:
        if context.existing is not None:
            return context.existing
        seen.append((report.epoch, context))
        if report.train_loss < 0:
            raise InvalidArgument("train_loss", "this test refuses negative losses")
        record = make_record(
            report.run_id,
            report.epoch,
            state=f"after {report.epoch}",
            previous_epoch=context.previous_epoch,
            policy_version=context.pinned_policy or context.active_policy or "none",
        )
        return replace(record, report=report)

    return decide


def test_group_commit_reads_each_context_inside_its_transaction(store: Store) -> None:
    for version in ("v-active", "v-pinned"):
        store.put_policy(make_policy(version))
    store.activate_policy("v-active", actor="alice")
    store.pin_policy(_pin("v-pinned", 0, dataset=LABELS.dataset))
    [stored] = store.record_decisions([make_record("run-a", 0, state="after 0")])
    seen: list[tuple[int, RunContext]] = []

    outcomes = store.group_commit(
        [
            make_report("run-a", 0),  # decided before: the stored decision, no decide
            make_report("run-a", 1),
            make_report("run-a", 2),  # sees epoch 1, decided earlier in this batch
            make_report("run-b", 0, train_loss=-1.0, labels=RunLabels()),  # decide refuses
            make_report("run-a", 1),  # a duplicate within the batch
            make_report("run-c", 0, labels=RunLabels()),
        ],
        _recording_decide(seen),
    )

    assert outcomes[0] == stored
    one, two, refused, again, other = outcomes[1:]
    assert isinstance(refused, InvalidArgument)
    assert isinstance(one, Decision) and isinstance(two, Decision) and isinstance(other, Decision)
    assert again == one
    assert (one.previous_epoch, two.previous_epoch, other.previous_epoch) == (0, 1, None)
    assert (one.policy_version, other.policy_version) == ("v-pinned", "v-active")
    contexts = dict(seen)
    assert contexts[1].previous_state == "after 0" and contexts[2].previous_state == "after 1"
    assert [epoch for epoch, _ in seen] == [1, 2, 0, 0]  # run-a 0 and 1 were not decided again
    run = store.get_run("run-a")
    assert run is not None and [d.epoch for _, d in run[1]] == [0, 1, 2]
    assert store.get_run("run-b") is None


def test_store_calls_inside_a_write_transaction_join_it(store: Store) -> None:
    first = make_record("run-a", 0, state="s0")
    with store.write_transaction():
        assert store.record_decisions([first]) == [first.decision]
        assert store.load_context("run-a", 1).previous_state == "s0"  # uncommitted, visible
        store.set_override(make_override(once=True))
    assert store.load_context("run-a", 1).override is not None

    with pytest.raises(RuntimeError, match="boom"), store.write_transaction():
        store.record_decisions([make_record("run-a", 1)])
        store.clear_override("run-a", "bob", T0)
        raise RuntimeError("boom")
    # Rolled back as a whole.
    assert store.load_context("run-a", 1).existing is None
    assert store.load_context("run-a", 1).override is not None
    run = store.get_run("run-a")
    assert run is not None and run[0].report_count == 1


def _context_of(store: Store, report: Report) -> RunContext:
    """Decide `report` alone through group_commit; the context its decide saw."""
    seen: list[tuple[int, RunContext]] = []
    [outcome] = store.group_commit([report], _recording_decide(seen))
    assert isinstance(outcome, Decision), outcome
    [(_, context)] = seen
    return context


def test_each_batch_sees_what_changed_since_the_last_one(
    store: Store, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Changes made between batches by this store or another process on the same
    database (the front end's admin calls, a replica) reach the next decision."""
    for version in ("v1", "v2", "v3"):
        store.put_policy(make_policy(version))
    store.activate_policy("v1", actor="alice")
    assert _context_of(store, make_report("run-a", 0)).previous_epoch is None
    assert _context_of(store, make_report("run-a", 1)).previous_state == "after 0"

    with _reopened(request, tmp_path) as other:
        held = other.set_override(make_override(hold_interventions=True))
        context = _context_of(store, make_report("run-a", 2))
        assert (context.override, context.previous_state) == (held, "after 1")
        other.activate_policy("v2", actor="bob")
        assert _context_of(store, make_report("run-a", 3)).active_policy == "v2"
        other.pin_policy(_pin("v3", 1, dataset=LABELS.dataset))
        assert _context_of(store, make_report("run-a", 4)).pinned_policy == "v3"
        other.set_shadow_policy("v1", "bob", T0)
        assert _context_of(store, make_report("run-a", 5)).shadow_policy == "v1"
        # A replica decides an epoch: the next one continues from it.
        assert _context_of(other, make_report("run-a", 6)).previous_state == "after 5"
    context = _context_of(store, make_report("run-a", 7))
    assert (context.previous_epoch, context.previous_state) == (6, "after 6")

    # The same store's own admin writes count as well.
    store.clear_override("run-a", "bob", T0)
    assert _context_of(store, make_report("run-a", 8)).override is None
    store.unpin_policy(RunSelector(dataset=LABELS.dataset))
    assert _context_of(store, make_report("run-a", 9)).pinned_policy is None
    # New labels: the pin is looked up for them.
    store.pin_policy(_pin("v3", 2, configuration="3d_fullres"))
    relabelled = replace(LABELS, configuration="3d_fullres")
    assert _context_of(store, make_report("run-a", 10, labels=relabelled)).pinned_policy == "v3"
    assert _context_of(store, make_report("run-a", 11)).pinned_policy is None


def test_a_consumed_once_override_is_gone_for_the_next_batch(store: Store) -> None:
    store.record_decisions([make_record("run-a", 0, state="after 0")])
    once = store.set_override(make_override(once=True))

    def use_once(report: Report, context: RunContext) -> DecisionRecord:
        assert context.override == once
        return replace(_once_record(report.epoch, once, state="after 1"), report=report)

    [used] = store.group_commit([make_report("run-a", 1)], use_once)
    assert isinstance(used, Decision) and used.override_id == once.override_id
    context = _context_of(store, make_report("run-a", 2))
    assert (context.override, context.previous_state) == (None, "after 1")


def test_a_late_report_does_not_rewind_the_run(store: Store) -> None:
    """An older epoch arriving late continues from what precedes it; the next new
    epoch still continues from the newest one."""
    _context_of(store, make_report("run-a", 0))
    _context_of(store, make_report("run-a", 2))
    late = _context_of(store, make_report("run-a", 1))
    assert (late.previous_epoch, late.previous_state) == (0, "after 0")
    context = _context_of(store, make_report("run-a", 3))
    assert (context.previous_epoch, context.previous_state) == (2, "after 2")


def test_a_failed_batch_leaves_nothing_for_the_next(store: Store) -> None:
    _context_of(store, make_report("run-a", 0))
    seen: list[tuple[int, RunContext]] = []
    decide = _recording_decide(seen)

    def fail_on_run_b(report: Report, context: RunContext) -> DecisionRecord:
        if report.run_id == "run-b":
            raise StoreUnavailable("the disk is full")
        return decide(report, context)

    with pytest.raises(StoreUnavailable):
        store.group_commit(
            [make_report("run-a", 1), make_report("run-a", 2), make_report("run-b", 0)],
            fail_on_run_b,
        )
    assert [epoch for epoch, _ in seen] == [1, 2]
    context = _context_of(store, make_report("run-a", 3))
    assert (context.previous_epoch, context.previous_state) == (0, "after 0")


@contextmanager
def _reopened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A second store on the test's database: another connection, as another process has."""
    backend = request.node.callspec.params["store"]
    url = (
        f"sqlite:///{tmp_path}/contract/control.db"
        if backend == "sqlite"
        else request.getfixturevalue("pg_database")
    )
    other = open_store(url)
    try:
        yield other
    finally:
        other.close()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with _store_url(request.param, request, tmp_path) as url:
        yield url


def test_a_read_only_store_reads_everything_and_refuses_every_write(store_url: str) -> None:
    writer = open_store(store_url)
    try:
        writer.record_decisions([make_record("run-a", 0)])
        writer.put_policy(make_policy("v1"))
        override = writer.set_override(make_override())
        reader = open_store(store_url, read_only=True)
        try:
            assert reader.run_ids() == ["run-a"]
            assert reader.get_run("run-a") == writer.get_run("run-a")
            assert reader.list_overrides("run-a") == [override]
            assert reader.get_policy("v1") == writer.get_policy("v1")
            writes: list[Callable[[], object]] = [
                lambda: reader.record_decisions([make_record("run-a", 1)]),
                lambda: reader.set_override(make_override(at=1)),
                lambda: reader.clear_override("run-a", "bob", T0),
                lambda: reader.put_policy(make_policy("v2")),
                lambda: reader.activate_policy("v1", actor="bob"),
                lambda: reader.record_admin_event("bob", "GetRun", "run-a", {}, "OK"),
            ]
            for write in writes:
                with pytest.raises(StoreUnavailable, match="read-only"):
                    write()
        finally:
            reader.close()
        found = writer.get_run("run-a")
        assert found is not None and [r.epoch for r, _ in found[1]] == [0]
        assert writer.list_overrides("run-a") == [override]
        assert [p.version for p in writer.list_policies()] == ["v1"]
        assert writer.admin_events() == []
    finally:
        writer.close()
