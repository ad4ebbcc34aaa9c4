"""Rows, written once for both backends: the column lists the queries share, the
mapping between rows and domain objects, record checks and the shadow summary's
aggregation.

What differs by dialect is how a value is stored (a timestamp, a float, a flag, a
string); `codec` builds the mappers around those few conversions, once per backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from control_server.domain import (
    Action,
    Assignment,
    Decision,
    DecisionRecord,
    Experiment,
    ExperimentArm,
    FinalMetrics,
    Override,
    PolicyPin,
    PolicyVersion,
    Report,
    RunAttempt,
    RunContext,
    RunLabels,
    RunSelector,
    RunStatus,
    RunSummary,
    ShadowSummary,
    Source,
    frozen_map,
)
from trainer_client.vocabulary import LABEL_KEYS

_JSON = json.JSONEncoder(sort_keys=True)

# Column lists shared by the queries and the row mappers (order matters).
LABELS = ", ".join(LABEL_KEYS)
#: Also the columns of shadow_decisions.
DECISION = (
    "decision_id, run_id, epoch, action, source, reason, policy_version, decided_at, "
    "lr, loss_weights, intervention_index, override_id, previous_epoch, attempt, late"
)
REPORT = (
    "run_id, epoch, train_loss, val_loss, pseudo_dice, avg_gradient_norm, "
    f"intervention_count, current_lr, initial_lr, loss_weights, {LABELS}"
)
RUN = (
    f"run_id, {LABELS}, first_seen, last_seen, last_epoch, report_count, "
    "intervention_count, current_lr"
)
OVERRIDE = (
    "id, run_id, actor, reason, lr, weights, hold, once, created_at, cleared_at, cleared_by, "
    "action, rollback_epoch, exceed_lr_cap, replaced_override_id"
)
#: The columns a new override is inserted with (the rest are the database's).
NEW_OVERRIDE = (
    "run_id, actor, reason, lr, weights, hold, once, created_at, "
    "action, rollback_epoch, exceed_lr_cap, replaced_override_id"
)
PIN = "dataset, configuration, fold, version, pinned_at, actor"
POLICY = "version, name, document, created_at"
EXPERIMENT = (
    "name, description, dataset, configuration, fold, arms, baseline_arm, started_at, "
    "started_by, ended_at, ended_by, promoted_arm"
)
ASSIGNMENT = "run_id, experiment, arm, policy_version, assigned_at"
ATTEMPT = (
    "run_id, attempt, started_at, resume_from_epoch, history_reset, superseded_epochs, "
    "trainer_name, trainer_version, policy_version, initial_lr, loss_weights, status, "
    "finished_at, error, metrics"
)
#: What a run summary shows beside its RUN columns and its latest decision (see
#: `SqlStore.SELECT_RUNS`): its attempt, that attempt's end, its rollbacks and the
#: policy state of its latest decision, and its experiment arm (`ea`).
SUMMARY_EXTRA = (
    "r.attempt, a.status, a.finished_at, a.error, a.metrics, "
    "(SELECT count(*) FROM decisions AS rb WHERE rb.run_id = r.run_id "
    "AND rb.action = 'ROLLBACK'), d.state, ea.experiment, ea.arm"
)
N_DECISION = 15
N_REPORT = 16
N_RUN = 13
# A run's summary fields that follow its newest epoch (a late, older report leaves them).
_FOLLOW_NEWEST = (*LABELS.split(", "), "intervention_count", "current_lr")


def upsert_run(least: str, greatest: str) -> str:
    """`ON CONFLICT (run_id) DO UPDATE SET ...` of a run summary's upsert, in a dialect
    whose two-argument minimum and maximum are `least` and `greatest`.

    SET expressions all see the old row, so the CASE compares with the old last_epoch."""
    return (
        "ON CONFLICT (run_id) DO UPDATE SET "
        + "".join(
            f"{c} = CASE WHEN excluded.last_epoch >= runs.last_epoch "
            f"THEN excluded.{c} ELSE runs.{c} END, "
            for c in _FOLLOW_NEWEST
        )
        + f"first_seen = {least}(runs.first_seen, excluded.first_seen), "
        f"last_seen = {greatest}(runs.last_seen, excluded.last_seen), "
        f"last_epoch = {greatest}(runs.last_epoch, excluded.last_epoch), "
        "report_count = runs.report_count + 1"
    )


def names(columns: str) -> list[str]:
    return [c.strip() for c in columns.split(",")]


def qualified(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in names(columns))


def insert(table: str, columns: str) -> str:
    """`INSERT INTO table (columns) VALUES (?, ...)`, one `?` per column."""
    return f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names(columns)))})"


def check_record(record: DecisionRecord) -> None:
    """Refuse a record whose report, decision and shadow disagree on (run_id, epoch)."""
    if (record.shadow is None) != (record.shadow_state is None):
        raise ValueError("a shadow decision and its shadow_state come together")
    key = (record.report.run_id, record.report.epoch)
    for what, d in (("decision", record.decision), ("shadow decision", record.shadow)):
        if d is not None and (d.run_id, d.epoch) != key:
            raise ValueError(
                f"report ({key[0]!r}, {key[1]}) and {what} ({d.run_id!r}, {d.epoch}) disagree"
            )


#: The label columns of a RunLabels, in the schema's order (a C call: the hot path).
labels_row: Callable[[RunLabels], tuple[str, ...]] = attrgetter(*names(LABELS))


def dump_weights(weights: Mapping[str, float]) -> str:
    """A weight map as the JSON text both schemas store (keys sorted)."""
    if not weights:
        return "{}"
    return _JSON.encode({k: float(v) for k, v in weights.items()})


def load_weights(text: str) -> Mapping[str, float]:
    return frozen_map(json.loads(text))


def best_of(state: str | None) -> float | None:
    """The `best` of a stored policy state (None when it has none or is not one)."""
    try:
        best = json.loads(state)["best"] if state else None
    except (ValueError, TypeError, KeyError):
        return None
    return float(best) if isinstance(best, int | float) else None


def dump_metrics(metrics: FinalMetrics) -> str:
    """Final metrics as the JSON text both schemas store ('{}': none)."""
    data: dict[str, Any] = {}
    if metrics.mean_dice is not None:
        data["mean_dice"] = metrics.mean_dice
    if metrics.dice_per_class:
        data["dice_per_class"] = dict(metrics.dice_per_class)
    if metrics.best_ema_pseudo_dice is not None:
        data["best_ema_pseudo_dice"] = metrics.best_ema_pseudo_dice
    if metrics.best_ema_epoch is not None:
        data["best_ema_epoch"] = metrics.best_ema_epoch
    return _JSON.encode(data)


def metrics_from(text: str | None) -> FinalMetrics:
    data = json.loads(text) if text else {}
    return FinalMetrics(
        mean_dice=data.get("mean_dice"),
        dice_per_class=frozen_map(data.get("dice_per_class")),
        best_ema_pseudo_dice=data.get("best_ema_pseudo_dice"),
        best_ema_epoch=data.get("best_ema_epoch"),
    )


def shadow_summary_from(version: str, rows: Iterable[tuple[str, str, bool, int]]) -> ShadowSummary:
    """Aggregate (real action, shadow action, differs, count) rows into a summary."""
    evaluated = differed = 0
    by_transition: dict[str, int] = {}
    for real, shadow, differs, n in rows:
        evaluated += n
        if differs:
            differed += n
            key = f"{real}->{shadow}"
            by_transition[key] = by_transition.get(key, 0) + n
    return ShadowSummary(
        version, evaluated, differed, MappingProxyType(dict(sorted(by_transition.items())))
    )


Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Codec:
    """One dialect's row mappers (see `codec`) and the conversions they are made of."""

    #: A timestamp as the dialect stores it (naive = UTC).
    time: Callable[[datetime], Any]
    #: A stored timestamp, back as an aware datetime.
    dt: Callable[[Any], datetime]
    #: A float (or None) as the dialect stores it.
    real: Callable[[float | None], Any]
    #: A string as the dialect can store it.
    text: Callable[[str], str]
    #: A boolean as the dialect stores it.
    flag: Callable[[bool], Any]
    #: (decision, its time as `time` made it) -> the DECISION columns.
    decision_row: Callable[[Decision, Any], tuple[Any, ...]]
    decision_from: Callable[[Row], Decision]
    report_row: Callable[[Report], tuple[Any, ...]]
    report_from: Callable[[Row], Report]
    #: REPORT columns -> a report of a trend: its losses and pseudo Dice only (the loss
    #: weights' JSON is not decoded: a fleet's trends read tens of thousands of rows).
    trend_report_from: Callable[[Row], Report]
    #: (a run's report, the time it was seen as `time` made it) -> the RUN columns.
    run_row: Callable[[Report, Any], tuple[Any, ...]]
    #: RUN columns, then the DECISION columns of its latest decision (NULLs: none).
    summary_from: Callable[[Row], RunSummary]
    attempt_row: Callable[[RunAttempt], tuple[Any, ...]]
    attempt_from: Callable[[Row], RunAttempt]
    #: (override, its created_at as `time` made it) -> the NEW_OVERRIDE columns.
    override_row: Callable[[Override, Any], tuple[Any, ...]]
    override_from: Callable[[Row], Override]
    pin_from: Callable[[Row], PolicyPin]
    policy_from: Callable[[Row], PolicyVersion]
    #: (rows of one context read, the epoch, where its columns start) -> the context.
    context_from: Callable[[Sequence[Row], int, int], RunContext]
    experiment_row: Callable[[Experiment], tuple[Any, ...]]
    #: (EXPERIMENT columns, the number of runs assigned) -> the experiment.
    experiment_from: Callable[[Row, int], Experiment]
    assignment_from: Callable[[Row], Assignment]


def _same(value: Any) -> Any:
    return value


def codec(
    *,
    time: Callable[[datetime], Any],
    dt: Callable[[Any], datetime],
    real: Callable[[float | None], Any] = _same,
    number: Callable[[Any], Any] = _same,
    text: Callable[[str], str] = _same,
    flag: Callable[[bool], Any] = _same,
) -> Codec:
    """The row mappers of a dialect that stores values through these conversions
    (`number` reads back a float that `real` stored; the default: as it is)."""

    def opt_number(value: Any) -> float | None:
        return None if value is None else number(value)

    def decision_row(d: Decision, decided_at: Any) -> tuple[Any, ...]:
        return (
            d.decision_id,
            d.run_id,
            d.epoch,
            d.action.value,
            d.source.value,
            d.reason,
            d.policy_version,
            decided_at,
            real(d.lr),
            dump_weights(d.loss_weights),
            d.intervention_index,
            d.override_id,
            d.previous_epoch,
            d.attempt,
            flag(d.late),
        )

    def decision_from(row: Row) -> Decision:
        return Decision(
            decision_id=row[0],
            run_id=row[1],
            epoch=row[2],
            action=Action(row[3]),
            source=Source(row[4]),
            reason=row[5],
            policy_version=row[6],
            decided_at=dt(row[7]),
            lr=opt_number(row[8]),
            loss_weights=load_weights(row[9]),
            intervention_index=row[10],
            override_id=row[11],
            previous_epoch=row[12],
            attempt=row[13],
            late=bool(row[14]),
        )

    def report_row(r: Report) -> tuple[Any, ...]:
        return (
            r.run_id,
            r.epoch,
            real(r.train_loss),
            real(r.val_loss),
            real(r.pseudo_dice),
            real(r.avg_gradient_norm),
            r.intervention_count,
            real(r.current_lr),
            real(r.initial_lr),
            dump_weights(r.loss_weights),
            *labels_row(r.labels),
        )

    def report_from(row: Row) -> Report:
        return Report(
            run_id=row[0],
            epoch=row[1],
            train_loss=number(row[2]),
            val_loss=opt_number(row[3]),
            pseudo_dice=opt_number(row[4]),
            avg_gradient_norm=opt_number(row[5]),
            intervention_count=row[6],
            current_lr=number(row[7]),
            initial_lr=number(row[8]),
            loss_weights=load_weights(row[9]),
            labels=RunLabels(*row[10:16]),
        )

    def trend_report_from(row: Row) -> Report:
        return Report(
            run_id=row[0],
            epoch=row[1],
            train_loss=number(row[2]),
            val_loss=opt_number(row[3]),
            pseudo_dice=opt_number(row[4]),
            intervention_count=row[6],
            current_lr=number(row[7]),
            initial_lr=number(row[8]),
        )

    def run_row(report: Report, seen: Any) -> tuple[Any, ...]:
        return (
            report.run_id,
            *labels_row(report.labels),
            seen,
            seen,
            report.epoch,
            1,
            report.intervention_count,
            real(report.current_lr),
        )

    def summary_from(row: Row) -> RunSummary:
        last = row[N_RUN : N_RUN + N_DECISION]
        extra = row[N_RUN + N_DECISION :]
        attempt, status, finished_at, error, metrics, rollbacks, state, experiment, arm = extra
        return RunSummary(
            run_id=row[0],
            labels=RunLabels(*row[1:7]),
            first_seen=dt(row[7]),
            last_seen=dt(row[8]),
            last_epoch=row[9],
            report_count=row[10],
            intervention_count=row[11],
            current_lr=number(row[12]),
            last_decision=decision_from(last) if last[0] is not None else None,
            attempt=attempt,
            status=RunStatus(status) if status is not None else RunStatus.ACTIVE,
            rollback_count=rollbacks,
            best_value=best_of(state),
            final_metrics=metrics_from(metrics),
            finished_at=None if finished_at is None else dt(finished_at),
            error=error or "",
            experiment=experiment or "",
            arm=arm or "",
        )

    def attempt_row(a: RunAttempt) -> tuple[Any, ...]:
        return (
            a.run_id,
            a.attempt,
            time(a.started_at),
            a.resume_from_epoch,
            flag(a.history_reset),
            a.superseded_epochs,
            text(a.trainer_name),
            text(a.trainer_version),
            a.policy_version,
            real(a.initial_lr),
            dump_weights(a.loss_weights),
            a.status.value,
            None if a.finished_at is None else time(a.finished_at),
            text(a.error),
            dump_metrics(a.metrics),
        )

    def attempt_from(row: Row) -> RunAttempt:
        return RunAttempt(
            run_id=row[0],
            attempt=row[1],
            started_at=dt(row[2]),
            resume_from_epoch=row[3],
            history_reset=bool(row[4]),
            superseded_epochs=row[5],
            trainer_name=row[6],
            trainer_version=row[7],
            policy_version=row[8],
            initial_lr=opt_number(row[9]),
            loss_weights=load_weights(row[10]),
            status=RunStatus(row[11]),
            finished_at=None if row[12] is None else dt(row[12]),
            error=row[13],
            metrics=metrics_from(row[14]),
        )

    def override_row(o: Override, created_at: Any) -> tuple[Any, ...]:
        return (
            o.run_id,
            o.actor,
            o.reason,
            real(o.lr),
            dump_weights(o.loss_weights),
            flag(o.hold_interventions),
            flag(o.once),
            created_at,
            None if o.action is None else o.action.value,
            o.rollback_epoch,
            flag(o.exceed_lr_cap),
            o.replaced_override_id,
        )

    def override_from(row: Row) -> Override:
        return Override(
            override_id=row[0],
            run_id=row[1],
            actor=row[2],
            reason=row[3],
            lr=opt_number(row[4]),
            loss_weights=load_weights(row[5]),
            hold_interventions=bool(row[6]),
            once=bool(row[7]),
            created_at=dt(row[8]),
            cleared_at=None if row[9] is None else dt(row[9]),
            cleared_by=row[10],
            action=None if row[11] is None else Action(row[11]),
            rollback_epoch=row[12],
            exceed_lr_cap=bool(row[13]),
            replaced_override_id=row[14],
        )

    def pin_from(row: Row) -> PolicyPin:
        return PolicyPin(
            selector=RunSelector(dataset=row[0], configuration=row[1], fold=row[2]),
            version=row[3],
            pinned_at=dt(row[4]),
            actor=row[5],
        )

    def policy_from(row: Row) -> PolicyVersion:
        return PolicyVersion(
            version=row[0], name=row[1], document=json.loads(row[2]), created_at=dt(row[3])
        )

    n_head = 6 + len(names(OVERRIDE))

    def context_from(rows: Sequence[Row], epoch: int, start: int) -> RunContext:
        """From `start` on, each row holds the active, shadow and pinned versions,
        the run's latest attempt and newest epoch (NULLs: a new run), the version of
        the run's experiment arm (NULL: none), the OVERRIDE
        columns of the run's active override, then the DECISION columns of the
        decision at `epoch` or the latest before it, its state, the shadow version
        and state stored beside it and its chain: 1 or 2 rows, newest first (NULLs:
        none)."""
        head = rows[0]
        active, shadow, pinned = head[start], head[start + 1], head[start + 2]
        attempt, last_epoch, assigned = head[start + 3], head[start + 4], head[start + 5]
        override = override_from(head[start + 6 :]) if head[start + 6] is not None else None
        first = start + n_head
        decisions = [row[first:] for row in rows if row[first] is not None]
        existing: Decision | None = None
        if decisions and decisions[0][2] == epoch:
            existing = decision_from(decisions[0])
            decisions = decisions[1:]
        previous_epoch: int | None = None
        previous_state: str | None = None
        previous_shadow_state: str | None = None
        previous_chain: str | None = None
        if decisions:
            previous_epoch = decisions[0][2]
            previous_state = decisions[0][N_DECISION]
            if shadow is not None and decisions[0][N_DECISION + 1] == shadow:
                previous_shadow_state = decisions[0][N_DECISION + 2]
            previous_chain = decisions[0][N_DECISION + 3]
        return RunContext(
            existing=existing,
            previous_state=previous_state,
            previous_epoch=previous_epoch,
            active_policy=active,
            override=override,
            pinned_policy=pinned,
            shadow_policy=shadow,
            previous_shadow_state=previous_shadow_state,
            attempt=attempt or 0,
            last_epoch=None if last_epoch is None or last_epoch < 0 else last_epoch,
            previous_chain=previous_chain,
            assigned_policy=assigned,
        )

    def experiment_row(e: Experiment) -> tuple[Any, ...]:
        arms = [
            {
                "name": a.name,
                "policy_version": a.policy_version,
                "share": a.share,
                "observe_only": a.observe_only,
            }
            for a in e.arms
        ]
        return (
            e.name,
            text(e.description),
            e.selector.dataset,
            e.selector.configuration,
            e.selector.fold,
            json.dumps(arms),
            e.baseline_arm,
            time(e.started_at),
            text(e.started_by),
            None if e.ended_at is None else time(e.ended_at),
            text(e.ended_by),
            e.promoted_arm,
        )

    def experiment_from(row: Row, assigned_runs: int = 0) -> Experiment:
        arms = tuple(
            ExperimentArm(
                name=a["name"],
                policy_version=a["policy_version"],
                share=float(a["share"]),
                observe_only=bool(a["observe_only"]),
            )
            for a in json.loads(row[5])
        )
        return Experiment(
            name=row[0],
            description=row[1],
            selector=RunSelector(dataset=row[2], configuration=row[3], fold=row[4]),
            arms=arms,
            baseline_arm=row[6],
            started_at=dt(row[7]),
            started_by=row[8],
            ended_at=None if row[9] is None else dt(row[9]),
            ended_by=row[10],
            promoted_arm=row[11],
            assigned_runs=assigned_runs,
        )

    def assignment_from(row: Row) -> Assignment:
        return Assignment(
            run_id=row[0],
            experiment=row[1],
            arm=row[2],
            policy_version=row[3],
            assigned_at=dt(row[4]),
        )

    return Codec(
        time=time,
        dt=dt,
        real=real,
        text=text,
        flag=flag,
        decision_row=decision_row,
        decision_from=decision_from,
        report_row=report_row,
        report_from=report_from,
        trend_report_from=trend_report_from,
        run_row=run_row,
        summary_from=summary_from,
        attempt_row=attempt_row,
        attempt_from=attempt_from,
        override_row=override_row,
        override_from=override_from,
        pin_from=pin_from,
        policy_from=policy_from,
        context_from=context_from,
        experiment_row=experiment_row,
        experiment_from=experiment_from,
        assignment_from=assignment_from,
    )
