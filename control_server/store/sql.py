"""`SqlStore`: every store method whose SQL both dialects share, written once.

A backend supplies the dialect: how a value is stored (its `codec`), a few column
and keyword spellings, and three ways into the database, each a context manager
that yields a session taking `?` placeholders: `_reading` (one statement),
`_snapshot` (several statements, one snapshot) and `_writing` (a write
transaction; the runs and the activation it must serialise with are named, for a
backend that locks them). What stays in a backend is its own: connections,
transactions, locking, the batched hot path (record_decisions, load_context),
error diagnosis and its database's checks.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from control_server.chain import ChainedEpoch, RegistryEntry, register
from control_server.domain import (
    Assignment,
    AuditEvent,
    AuditFilter,
    Decision,
    DecisionFilter,
    Experiment,
    FailedPrecondition,
    FinalMetrics,
    NotFound,
    Override,
    PolicyPin,
    PolicyVersion,
    Report,
    RunAttempt,
    RunFilter,
    RunLabels,
    RunSelector,
    RunStatus,
    RunSummary,
    ShadowSummary,
    Source,
)
from control_server.store.base import Store
from control_server.store.rows import (
    ASSIGNMENT,
    ATTEMPT,
    DECISION,
    EXPERIMENT,
    N_DECISION,
    N_REPORT,
    NEW_OVERRIDE,
    OVERRIDE,
    PIN,
    POLICY,
    REPORT,
    RUN,
    SUMMARY_EXTRA,
    Codec,
    dump_metrics,
    insert,
    labels_row,
    qualified,
    shadow_summary_from,
)
from control_server.store.schema import check_level
from trainer_client.vocabulary import LABEL_KEYS, SELECTOR_KEYS

logger = logging.getLogger(__name__)

SELECT_RUNS = (
    f"SELECT {qualified('r', RUN)}, {qualified('d', DECISION)}, {SUMMARY_EXTRA} FROM runs AS r "
    "LEFT JOIN decisions AS d ON d.run_id = r.run_id AND d.epoch = r.last_epoch "
    "LEFT JOIN run_attempts AS a ON a.run_id = r.run_id AND a.attempt = r.attempt "
    "LEFT JOIN experiment_assignments AS ea ON ea.run_id = r.run_id"
)
_SELECT_PAIRS = (
    f"SELECT {qualified('p', REPORT)}, {qualified('d', DECISION)} FROM reports AS p "
    "JOIN decisions AS d ON d.run_id = p.run_id AND d.epoch = p.epoch "
    "WHERE p.run_id = ? AND p.epoch >= ? ORDER BY p.epoch LIMIT ?"
)
_SELECT_SUPERSEDED = (
    f"SELECT {qualified('p', REPORT)}, {qualified('d', DECISION)} "
    "FROM superseded_reports AS p JOIN superseded_decisions AS d "
    "ON d.run_id = p.run_id AND d.attempt = p.attempt AND d.epoch = p.epoch "
    "WHERE p.run_id = ? AND p.epoch >= ? AND p.epoch <= ? ORDER BY p.epoch, p.attempt"
)
# A run's epochs after `cut` leave its current history for the superseded tables
# (params of each: superseded_by where named, run_id, cut). Shadow decisions go.
_SUPERSEDE = (
    f"INSERT INTO superseded_reports ({REPORT}, attempt, superseded_by) "
    f"SELECT {qualified('p', REPORT)}, d.attempt, ? FROM reports AS p JOIN decisions AS d "
    "ON d.run_id = p.run_id AND d.epoch = p.epoch WHERE p.run_id = ? AND p.epoch > ?",
    f"INSERT INTO superseded_decisions ({DECISION}, state, chain, superseded_by) "
    f"SELECT {DECISION}, state, chain, ? FROM decisions WHERE run_id = ? AND epoch > ?",
    "DELETE FROM shadow_decisions WHERE run_id = ? AND epoch > ?",
    "DELETE FROM decisions WHERE run_id = ? AND epoch > ?",
    "DELETE FROM reports WHERE run_id = ? AND epoch > ?",
)
# The summary of a run whose history was cut, from what remains (params: attempt,
# seen, the labels, then run_id five times, then the initial LR, then run_id).
_RESUMMARISE_RUN = (
    "UPDATE runs SET attempt = ?, last_seen = ?, "
    + ", ".join(f"{k} = ?" for k in LABEL_KEYS)
    + ", last_epoch = coalesce((SELECT max(epoch) FROM reports WHERE run_id = ?), -1), "
    "report_count = (SELECT count(*) FROM reports WHERE run_id = ?), "
    "intervention_count = coalesce((SELECT intervention_count FROM reports "
    "WHERE run_id = ? ORDER BY epoch DESC LIMIT 1), 0), "
    "current_lr = coalesce((SELECT current_lr FROM reports "
    "WHERE run_id = ? ORDER BY epoch DESC LIMIT 1), ?) WHERE run_id = ?"
)


def _keep_evenly(i: str, total: str) -> str:
    """Of a run's `total` rows, keep the row of index `i` (from 0) when i * steps /
    (total - 1) (integer division) steps up at it: steps + 1 rows spread evenly, the
    oldest and the newest among them (one row asked for: the newest alone). Params:
    the rows to keep, then steps (keep - 1) three times."""
    per = f"nullif({total} - 1, 0)"
    return (
        f"{total} <= ? OR {i} = {total} - 1 OR (? > 0 AND ({i} = 0 OR "
        f"({i} * ?) / {per} > (({i} - 1) * ?) / {per}))"
    )


def _series_by_epoch(marks: str) -> str:
    """The kept reports of runs without gaps in their epochs: a row's index is its
    epoch less the run's first, so no window has to number (and sort) the rows."""
    return (
        f"SELECT {qualified('p', REPORT)} FROM reports AS p JOIN (SELECT run_id, "
        f"min(epoch) AS first, count(*) AS total FROM reports WHERE run_id IN ({marks}) "
        "GROUP BY run_id) AS k ON k.run_id = p.run_id "
        f"WHERE {_keep_evenly('(p.epoch - k.first)', 'k.total')} ORDER BY p.run_id, p.epoch"
    )


def _series_by_row_number(marks: str) -> str:
    """The kept reports of any runs: numbered on the key alone in one window (one pass
    in the primary key's order), then joined back, so the window carries no reports."""
    return (
        f"SELECT {qualified('p', REPORT)} FROM (SELECT run_id, epoch, row_number() "
        "OVER w AS n, count(*) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND "
        f"UNBOUNDED FOLLOWING) AS total FROM reports WHERE run_id IN ({marks}) "
        "WINDOW w AS (PARTITION BY run_id ORDER BY epoch)) AS t "
        "JOIN reports AS p ON p.run_id = t.run_id AND p.epoch = t.epoch "
        f"WHERE {_keep_evenly('(t.n - 1)', 't.total')} ORDER BY p.run_id, p.epoch"
    )


#: An epoch above every real one (an open upper bound as a parameter).
_NO_EPOCH_BOUND = 2**62
_UPSERT_SINGLETON = (
    "INSERT INTO {table} (id, version, {at}, actor) VALUES (1, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
    "{at} = excluded.{at}, actor = excluded.actor"
)


class Rows(Protocol):
    """What a session's `execute` returns (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Session(Protocol):
    """A connection that takes SQL with `?` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows: ...


S = TypeVar("S", bound=Session)


#: The schema_version row `check_writable` writes and deletes (never committed).
_PROBE_VERSION = -1


class SqlStore(Store, Generic[S]):
    """The shared SQL of `Store`; a subclass supplies the dialect (see the module)."""

    #: How this dialect stores values, and the row mappers built on that.
    codec: ClassVar[Codec]
    #: The column that orders rows of one table by insertion (commit order for decisions).
    seq: ClassVar[str]
    #: The LIMIT parameter that means no limit.
    no_limit: ClassVar[int | None]
    #: The null-safe "differs" operator.
    distinct: ClassVar[str]
    #: CREATE TABLE IF NOT EXISTS schema_version (the migration runner's own table).
    schema_version_table: ClassVar[str]
    #: A condition true when the float column `{0}` holds NaN or an infinity.
    nonfinite: ClassVar[str]

    # --- the dialect's ways into its database -------------------------------------------

    @abstractmethod
    def _reading(self) -> AbstractContextManager[S]:
        """A session for one read statement."""

    def _snapshot(self) -> AbstractContextManager[S]:
        """A session for several read statements that see one snapshot."""
        return self._reading()

    @abstractmethod
    def _writing(
        self, *, runs: Sequence[str] = (), activation: bool = False
    ) -> AbstractContextManager[S]:
        """A session in a write transaction, serialised with other writers of the
        overrides of `runs` and, with `activation`, with other activations."""

    @abstractmethod
    def _insert_returning(
        self, s: S, sql: str, params: Sequence[Any], table: str, columns: str
    ) -> Any:
        """Run `sql`, a one-row INSERT INTO `table`, and return `columns` of that row."""

    @abstractmethod
    def _read_level(self, s: S) -> int:
        """The migration level of the database (0: none applied, no schema_version)."""

    @abstractmethod
    def _exclusive(self, s: S) -> AbstractContextManager[None]:
        """A transaction on `s` that no other process migrating the database shares."""

    @abstractmethod
    def _apply(self, s: S, script: str) -> None:
        """Run a migration script (several statements) inside the open transaction."""

    # --- migrations ---------------------------------------------------------------------

    def _migrate(self, s: S, migrations: list[tuple[str, str]]) -> int:
        """Apply the migrations the database lacks, one transaction each; return the level."""
        known = len(migrations)
        level = self._read_level(s)
        while True:
            check_level(level, known)
            if level == known:
                return level
            with self._exclusive(s):
                # Another process may have migrated meanwhile: decide under its lock.
                s.execute(self.schema_version_table)
                level = self._read_level(s)
                if level < known:
                    name, sql = migrations[level]
                    self._apply(s, sql)
                    level += 1
                    s.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                        (level, name, self.codec.time(datetime.now(UTC))),
                    )
                    logger.info("applied migration %s", name)

    def schema_version(self) -> int:
        with self._reading() as s:
            return self._read_level(s)

    def check_writable(self) -> None:
        """A row written and deleted in one transaction: the whole write path (locks,
        log, commit) runs, and nothing is left (an unchanged row would write nothing)."""
        with self._writing() as s:
            s.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (_PROBE_VERSION, "write probe", self.codec.time(datetime.now(UTC))),
            )
            s.execute("DELETE FROM schema_version WHERE version = ?", (_PROBE_VERSION,))

    # --- decisions ----------------------------------------------------------------------

    def _decision_where(self, f: DecisionFilter) -> tuple[list[str], list[Any]]:
        """SQL conditions (and their parameters) of a decision filter, limit aside."""
        time = self.codec.time
        where: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("run_id = ?", f.run_id or None),
            ("action = ?", f.action.value if f.action is not None else None),
            ("source = ?", f.source.value if f.source is not None else None),
            ("decided_at >= ?", time(f.since) if f.since is not None else None),
            ("decided_at < ?", time(f.until) if f.until is not None else None),
        ):
            if value is not None:
                where.append(condition)
                params.append(value)
        return where, params

    def latest_decision_seq(self) -> int:
        with self._reading() as s:
            row = s.execute(f"SELECT coalesce(max({self.seq}), 0) FROM decisions").fetchone()
        return int(row[0])

    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        where, params = self._decision_where(decision_filter)
        sql = f"SELECT {DECISION} FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY decided_at, {self.seq} LIMIT ?"
        limit = decision_filter.limit if decision_filter.limit > 0 else self.no_limit
        with self._reading() as s:
            rows = s.execute(sql, (*params, limit)).fetchall()
        return [self.codec.decision_from(r) for r in rows]

    def shadow_decisions(
        self, run_id: str, from_epoch: int = 0, to_epoch: int | None = None
    ) -> list[Decision]:
        upper = to_epoch if to_epoch is not None else _NO_EPOCH_BOUND
        with self._reading() as s:
            rows = s.execute(
                f"SELECT {DECISION} FROM shadow_decisions WHERE run_id = ? "
                "AND epoch >= ? AND epoch <= ? ORDER BY epoch",
                (run_id, from_epoch, upper),
            ).fetchall()
        return [self.codec.decision_from(r) for r in rows]

    def shadow_summary(self, version: str) -> ShadowSummary:
        differs = self.distinct
        with self._reading() as s:
            rows = s.execute(
                "SELECT d.action, s.action, (s.action <> d.action "
                f"OR s.lr {differs} d.lr OR s.loss_weights <> d.loss_weights), "
                "count(*) FROM shadow_decisions AS s JOIN decisions AS d "
                "ON d.run_id = s.run_id AND d.epoch = s.epoch "
                "WHERE s.policy_version = ? GROUP BY 1, 2, 3",
                (version,),
            ).fetchall()
        return shadow_summary_from(version, rows)

    # --- overrides ----------------------------------------------------------------------

    def set_override(self, override: Override) -> Override:
        if override.created_at is None:
            raise ValueError("set_override needs an override with created_at set")
        created_at = self.codec.time(override.created_at)
        with self._writing(runs=[override.run_id]) as s:
            # The run's lock is held: the active override read here is the one replaced.
            active = s.execute(
                "SELECT max(id) FROM overrides WHERE run_id = ? AND cleared_at IS NULL",
                (override.run_id,),
            ).fetchone()
            new = replace(override, replaced_override_id=active[0] if active else None)
            row = self._insert_returning(
                s,
                insert("overrides", NEW_OVERRIDE),
                self.codec.override_row(new, created_at),
                "overrides",
                OVERRIDE,
            )
            new_id = row[0]
            s.execute(
                "UPDATE overrides SET cleared_at = ?, cleared_by = ? "
                "WHERE run_id = ? AND cleared_at IS NULL AND id <> ?",
                (created_at, f"replaced by override {new_id}", override.run_id, new_id),
            )
        return self.codec.override_from(row)

    def list_overrides(self, run_id: str = "", *, include_cleared: bool = False) -> list[Override]:
        where: list[str] = []
        params: list[Any] = []
        if run_id:
            where.append("run_id = ?")
            params.append(run_id)
        if not include_cleared:
            where.append("cleared_at IS NULL")
        sql = f"SELECT {OVERRIDE} FROM overrides"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._reading() as s:
            rows = s.execute(sql + " ORDER BY id", params).fetchall()
        return [self.codec.override_from(r) for r in rows]

    # --- policies -----------------------------------------------------------------------

    def _require_policy(self, s: S, version: str) -> None:
        if s.execute("SELECT 1 FROM policies WHERE version = ?", (version,)).fetchone() is None:
            raise NotFound(f"policy version {version!r} is not stored")

    def put_policy(self, policy: PolicyVersion) -> PolicyVersion:
        with self._writing() as s:
            s.execute(
                insert("policies", POLICY) + " ON CONFLICT (version) DO NOTHING",
                (
                    policy.version,
                    self.codec.text(policy.name),
                    json.dumps(policy.document, sort_keys=True),
                    self.codec.time(policy.created_at),
                ),
            )
            # A new statement: sees a concurrent writer's insert too.
            row = s.execute(
                f"SELECT {POLICY} FROM policies WHERE version = ?", (policy.version,)
            ).fetchone()
        return self.codec.policy_from(row)

    def get_policy(self, version: str) -> PolicyVersion | None:
        with self._reading() as s:
            row = s.execute(
                f"SELECT {POLICY} FROM policies WHERE version = ?", (version,)
            ).fetchone()
        return self.codec.policy_from(row) if row is not None else None

    def list_policies(self) -> list[PolicyVersion]:
        with self._reading() as s:
            rows = s.execute(
                f"SELECT {POLICY} FROM policies ORDER BY created_at, {self.seq}"
            ).fetchall()
        return [self.codec.policy_from(row) for row in rows]

    def activate_policy(self, version: str, actor: str) -> None:
        now = self.codec.time(datetime.now(UTC))
        # One activation at a time, so that each event names the true previous one.
        with self._writing(activation=True) as s:
            self._require_policy(s, version)
            row = s.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
            s.execute(
                _UPSERT_SINGLETON.format(table="active_policy", at="activated_at"),
                (version, now, actor),
            )
            self._insert_admin_event(
                s,
                now,
                actor,
                "PolicyActivated",
                version,
                {"previous": row[0] if row else None},
                "OK",
            )

    def active_policy(self) -> str | None:
        with self._reading() as s:
            row = s.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def set_shadow_policy(self, version: str | None, actor: str, at: datetime) -> None:
        with self._writing() as s:
            if version is None:
                s.execute("DELETE FROM shadow_policy")
                return
            self._require_policy(s, version)
            s.execute(
                _UPSERT_SINGLETON.format(table="shadow_policy", at="set_at"),
                (version, self.codec.time(at), actor),
            )

    def shadow_policy(self) -> str | None:
        with self._reading() as s:
            row = s.execute("SELECT version FROM shadow_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def pin_policy(self, pin: PolicyPin) -> PolicyPin:
        sel = pin.selector
        key = (sel.dataset, sel.configuration, sel.fold)
        with self._writing() as s:
            self._require_policy(s, pin.version)
            s.execute(
                insert("policy_pins", PIN) + " ON CONFLICT (dataset, configuration, fold) "
                "DO UPDATE SET "
                "version = excluded.version, pinned_at = excluded.pinned_at, "
                "actor = excluded.actor",
                (*key, pin.version, self.codec.time(pin.pinned_at), pin.actor),
            )
            row = s.execute(
                f"SELECT {PIN} FROM policy_pins "
                "WHERE dataset = ? AND configuration = ? AND fold = ?",
                key,
            ).fetchone()
        return self.codec.pin_from(row)

    def unpin_policy(self, selector: RunSelector) -> bool:
        with self._writing() as s:
            cursor = s.execute(
                "DELETE FROM policy_pins WHERE dataset = ? AND configuration = ? AND fold = ?",
                (selector.dataset, selector.configuration, selector.fold),
            )
            return cursor.rowcount == 1

    def list_pins(self) -> list[PolicyPin]:
        with self._reading() as s:
            rows = s.execute(f"SELECT {PIN} FROM policy_pins ORDER BY pinned_at, id").fetchall()
        return [self.codec.pin_from(r) for r in rows]

    # --- runs ---------------------------------------------------------------------------

    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        """Runs matching the filter, most recently active first; limit <= 0 means no limit.
        A status filter of ACTIVE or STALE selects every run not finished."""
        where: list[str] = []
        params: list[Any] = []
        for column in SELECTOR_KEYS:
            value = getattr(run_filter, column)
            if value:
                where.append(f"r.{column} = ?")
                params.append(value)
        for column in ("experiment", "arm"):
            value = getattr(run_filter, column)
            if value:
                where.append(f"ea.{column} = ?")
                params.append(value)
        status = run_filter.status
        if status is not None:
            where.append("coalesce(a.status, 'ACTIVE') = ?")
            params.append(status.value if status.finished else RunStatus.ACTIVE.value)
        sql = SELECT_RUNS
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.last_seen DESC, r.run_id LIMIT ?"
        params.append(run_filter.limit if run_filter.limit > 0 else self.no_limit)
        with self._reading() as s:
            rows = s.execute(sql, params).fetchall()
        return [self.codec.summary_from(row) for row in rows]

    def get_run(
        self, run_id: str, from_epoch: int = 0, limit: int = 0
    ) -> tuple[RunSummary, list[tuple[Report, Decision]]] | None:
        with self._snapshot() as s:
            row = s.execute(SELECT_RUNS + " WHERE r.run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            pairs = s.execute(
                _SELECT_PAIRS, (run_id, from_epoch, limit if limit > 0 else self.no_limit)
            ).fetchall()
        return self.codec.summary_from(row), self._pairs(pairs)

    def _pairs(self, rows: Sequence[Any]) -> list[tuple[Report, Decision]]:
        """(report, decision) from rows of REPORT then DECISION columns (the decision
        records the attempt and lateness)."""
        c = self.codec
        return [(c.report_from(p[:N_REPORT]), c.decision_from(p[N_REPORT:])) for p in rows]

    def stored_report(self, run_id: str, epoch: int) -> Report | None:
        with self._reading() as s:
            row = s.execute(
                f"SELECT {REPORT} FROM reports WHERE run_id = ? AND epoch = ?", (run_id, epoch)
            ).fetchone()
        return None if row is None else self.codec.report_from(row)

    def superseded(
        self, run_id: str, from_epoch: int = 0, to_epoch: int | None = None
    ) -> list[tuple[Report, Decision]]:
        upper = to_epoch if to_epoch is not None else _NO_EPOCH_BOUND
        with self._reading() as s:
            rows = s.execute(_SELECT_SUPERSEDED, (run_id, from_epoch, upper)).fetchall()
        return self._pairs(rows)

    def start_attempt(self, attempt: RunAttempt, labels: RunLabels) -> RunAttempt:
        c = self.codec
        run_id = attempt.run_id
        at = c.time(attempt.started_at)
        with self._writing(runs=[run_id]) as s:
            row = s.execute("SELECT attempt FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                number, moved, reset = 1, 0, False
                s.execute(
                    insert("runs", RUN),
                    (
                        run_id,
                        *labels_row(labels),
                        at,
                        at,
                        -1,
                        0,
                        0,
                        c.real(attempt.initial_lr or 0.0),
                    ),
                )
                self._register_runs(s, [(run_id, attempt.started_at)])
            else:
                number = row[0] + 1
                reset = attempt.resume_from_epoch is None
                cut = -1 if attempt.resume_from_epoch is None else attempt.resume_from_epoch
                moved = self._supersede(s, run_id, cut, number)
                s.execute(
                    _RESUMMARISE_RUN,
                    (
                        number,
                        at,
                        *labels_row(labels),
                        *[run_id] * 4,
                        c.real(attempt.initial_lr or 0.0),
                        run_id,
                    ),
                )
            stored = replace(attempt, attempt=number, history_reset=reset, superseded_epochs=moved)
            s.execute(insert("run_attempts", ATTEMPT), c.attempt_row(stored))
        return stored

    def _supersede(self, s: S, run_id: str, cut: int, by: int) -> int:
        """Move the run's epochs after `cut` to the superseded tables; how many moved."""
        reports, decisions, *deletes = _SUPERSEDE
        s.execute(reports, (by, run_id, cut))
        moved = s.execute(decisions, (by, run_id, cut)).rowcount
        for statement in deletes:
            s.execute(statement, (run_id, cut))
        return max(moved, 0)

    def finish_attempt(
        self,
        run_id: str,
        attempt: int,
        status: RunStatus,
        error: str,
        metrics: FinalMetrics,
        at: datetime,
    ) -> RunAttempt:
        c = self.codec
        with self._writing(runs=[run_id]) as s:
            row = s.execute(
                "SELECT attempt, first_seen FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"run {run_id!r} is not known")
            latest = row[0]
            number = attempt or latest
            if number > latest:
                raise NotFound(f"run {run_id!r} has no attempt {number} (its latest is {latest})")
            if number < latest:
                raise FailedPrecondition(
                    f"attempt {number} of run {run_id!r} was superseded by attempt {latest}"
                )
            found = s.execute(
                f"SELECT {ATTEMPT} FROM run_attempts WHERE run_id = ? AND attempt = ?",
                (run_id, number),
            ).fetchone()
            current = (
                c.attempt_from(found)
                if found is not None
                else RunAttempt(run_id=run_id, attempt=number, started_at=c.dt(row[1]))
            )
            ended = replace(current, status=status, finished_at=at, error=error, metrics=metrics)
            if found is None:
                s.execute(insert("run_attempts", ATTEMPT), c.attempt_row(ended))
            else:
                s.execute(
                    "UPDATE run_attempts SET status = ?, finished_at = ?, error = ?, metrics = ? "
                    "WHERE run_id = ? AND attempt = ?",
                    (
                        status.value,
                        c.time(at),
                        c.text(error),
                        dump_metrics(metrics),
                        run_id,
                        number,
                    ),
                )
        return ended

    def list_attempts(self, run_id: str) -> list[RunAttempt]:
        c = self.codec
        with self._snapshot() as s:
            rows = s.execute(
                f"SELECT {ATTEMPT} FROM run_attempts WHERE run_id = ? ORDER BY attempt",
                (run_id,),
            ).fetchall()
            run = s.execute("SELECT first_seen FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        attempts = [c.attempt_from(r) for r in rows]
        if run is not None and (not attempts or attempts[0].attempt > 1):
            # The run began reporting without a StartRun: its implicit first attempt.
            attempts.insert(0, RunAttempt(run_id=run_id, attempt=1, started_at=c.dt(run[0])))
        return attempts

    def chained_history(self, run_id: str) -> list[ChainedEpoch]:
        c = self.codec
        with self._reading() as s:
            rows = s.execute(
                f"SELECT {qualified('p', REPORT)}, {qualified('d', DECISION)}, d.state, d.chain "
                "FROM reports AS p JOIN decisions AS d "
                "ON d.run_id = p.run_id AND d.epoch = p.epoch WHERE p.run_id = ? ORDER BY p.epoch",
                (run_id,),
            ).fetchall()
        end = N_REPORT + N_DECISION
        return [
            ChainedEpoch(
                c.report_from(r[:N_REPORT]), c.decision_from(r[N_REPORT:end]), r[end], r[end + 1]
            )
            for r in rows
        ]

    def run_registry(self) -> list[RegistryEntry]:
        with self._reading() as s:
            rows = s.execute(
                "SELECT seq, run_id, registered_at, hash FROM run_registry ORDER BY seq"
            ).fetchall()
        return [RegistryEntry(r[0], r[1], self.codec.dt(r[2]), r[3]) for r in rows]

    def _lock_registry(self, s: S) -> None:
        """Serialise registry entries with other writers (SQLite: its write lock does)."""

    def _register_runs(self, s: S, runs: Sequence[tuple[str, datetime]]) -> None:
        """Enter new runs in the chained run registry (inside the caller's transaction)."""
        if not runs:
            return
        self._lock_registry(s)
        row = s.execute("SELECT hash FROM run_registry ORDER BY seq DESC LIMIT 1").fetchone()
        previous: str | None = row[0] if row is not None else None
        for run_id, at in runs:
            if s.execute("SELECT 1 FROM run_registry WHERE run_id = ?", (run_id,)).fetchone():
                continue
            previous = register(previous, run_id, at)
            s.execute(
                "INSERT INTO run_registry (run_id, registered_at, hash) VALUES (?, ?, ?)",
                (run_id, self.codec.time(at), previous),
            )

    def recent_epoch_times(self, run_ids: Sequence[str], count: int) -> dict[str, list[datetime]]:
        times: dict[str, list[datetime]] = {run_id: [] for run_id in run_ids}
        if not run_ids:
            return times
        marks = ", ".join("?" * len(run_ids))
        with self._reading() as s:
            rows = s.execute(
                "SELECT run_id, decided_at FROM (SELECT run_id, decided_at, row_number() "
                "OVER (PARTITION BY run_id ORDER BY epoch DESC) AS n FROM decisions "
                f"WHERE run_id IN ({marks}) AND NOT late) AS t WHERE n <= ? "
                "ORDER BY run_id, n",
                (*run_ids, count),
            ).fetchall()
        for run_id, decided_at in rows:
            times[run_id].append(self.codec.dt(decided_at))
        return times

    def run_ids(self) -> list[str]:
        with self._reading() as s:
            rows = s.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()
        return [str(row[0]) for row in rows]

    # --- the fleet at a glance ------------------------------------------------------------

    def runs_with_nonfinite_losses(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        marks = ", ".join("?" * len(run_ids))
        bad = " OR ".join(self.nonfinite.format(c) for c in ("train_loss", "val_loss"))
        with self._reading() as s:
            rows = s.execute(
                f"SELECT DISTINCT run_id FROM reports WHERE run_id IN ({marks}) AND ({bad})",
                tuple(run_ids),
            ).fetchall()
        return {str(row[0]) for row in rows}

    def runs_with_decision_reason(self, run_ids: Sequence[str], like: str) -> set[str]:
        if not run_ids:
            return set()
        marks = ", ".join("?" * len(run_ids))
        with self._reading() as s:
            rows = s.execute(
                f"SELECT DISTINCT run_id FROM decisions WHERE run_id IN ({marks}) "
                "AND source = ? AND reason LIKE ?",
                (*run_ids, Source.POLICY.value, like),
            ).fetchall()
        return {str(row[0]) for row in rows}

    def report_series(self, run_ids: Sequence[str], per_run: int) -> dict[str, list[Report]]:
        series: dict[str, list[Report]] = {}
        if not run_ids:
            return series
        keep = per_run if per_run > 0 else _NO_EPOCH_BOUND
        steps = keep - 1
        with self._snapshot() as s:
            shapes = s.execute(
                "SELECT run_id, min(epoch), max(epoch), count(*) FROM reports "
                f"WHERE run_id IN ({', '.join('?' * len(run_ids))}) GROUP BY run_id",
                tuple(run_ids),
            ).fetchall()
            # A run whose epochs have no gaps (nearly every run) has the index of each
            # row in its epoch: no window needs to number (and sort) its rows.
            gapless = [r for r, lo, hi, total in shapes if hi - lo + 1 == total]
            gapped = [r for r, lo, hi, total in shapes if hi - lo + 1 != total]
            rows: list[Any] = []
            for ids, query in ((gapless, _series_by_epoch), (gapped, _series_by_row_number)):
                if ids:
                    rows += s.execute(
                        query(", ".join("?" * len(ids))), (*ids, keep, steps, steps, steps)
                    ).fetchall()
        for row in rows:
            report = self.codec.trend_report_from(row)
            series.setdefault(report.run_id, []).append(report)
        return series

    # --- experiments --------------------------------------------------------------------

    _SELECT_EXPERIMENTS = (
        f"SELECT {EXPERIMENT}, (SELECT count(*) FROM experiment_assignments AS ea "
        "WHERE ea.experiment = e.name) FROM experiments AS e"
    )

    def start_experiment(self, experiment: Experiment) -> Experiment:
        sel = experiment.selector
        # Serialised with activations: two starts cannot both find no running twin.
        with self._writing(activation=True) as s:
            for arm in experiment.arms:
                self._require_policy(s, arm.policy_version)
            if s.execute("SELECT 1 FROM experiments WHERE name = ?", (experiment.name,)).fetchone():
                raise FailedPrecondition(
                    f"an experiment named {experiment.name!r} exists already (names are never "
                    "reused, so its report stays what it was); choose another name"
                )
            twin = s.execute(
                "SELECT name FROM experiments WHERE ended_at IS NULL AND dataset = ? "
                "AND configuration = ? AND fold = ?",
                (sel.dataset, sel.configuration, sel.fold),
            ).fetchone()
            if twin is not None:
                raise FailedPrecondition(
                    f"experiment {twin[0]!r} is running on the same selector; end or promote "
                    "it first (a run can be in one experiment only)"
                )
            s.execute(insert("experiments", EXPERIMENT), self.codec.experiment_row(experiment))
        return experiment

    def get_experiment(self, name: str) -> Experiment | None:
        with self._reading() as s:
            row = s.execute(self._SELECT_EXPERIMENTS + " WHERE e.name = ?", (name,)).fetchone()
        return None if row is None else self.codec.experiment_from(row[:-1], row[-1])

    def list_experiments(self, include_ended: bool = False) -> list[Experiment]:
        sql = self._SELECT_EXPERIMENTS
        if not include_ended:
            sql += " WHERE e.ended_at IS NULL"
        with self._reading() as s:
            rows = s.execute(sql + " ORDER BY e.started_at, e.name").fetchall()
        return [self.codec.experiment_from(r[:-1], r[-1]) for r in rows]

    def end_experiment(
        self, name: str, actor: str, at: datetime, promoted_arm: str = ""
    ) -> Experiment:
        with self._writing(activation=True) as s:
            row = s.execute("SELECT ended_at FROM experiments WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"experiment {name!r} does not exist")
            if row[0] is not None:
                ended = self.codec.dt(row[0]).strftime("%Y-%m-%d %H:%M:%S")
                raise FailedPrecondition(f"experiment {name!r} has already ended (at {ended} UTC)")
            s.execute(
                "UPDATE experiments SET ended_at = ?, ended_by = ?, promoted_arm = ? "
                "WHERE name = ?",
                (self.codec.time(at), self.codec.text(actor), promoted_arm, name),
            )
        found = self.get_experiment(name)
        assert found is not None
        return found

    def assign_run(self, assignment: Assignment, actor: str) -> Assignment | None:
        a = assignment
        at = self.codec.time(a.assigned_at)
        with self._writing(runs=[a.run_id]) as s:
            # Only while the experiment runs; a run assigned before keeps its arm.
            inserted = s.execute(
                f"INSERT INTO experiment_assignments ({ASSIGNMENT}) "
                "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM experiments "
                "WHERE name = ? AND ended_at IS NULL) ON CONFLICT (run_id) DO NOTHING",
                (a.run_id, a.experiment, a.arm, a.policy_version, at, a.experiment),
            ).rowcount
            if inserted == 1:
                self._insert_admin_event(
                    s,
                    at,
                    actor,
                    "ExperimentAssigned",
                    a.run_id,
                    {"experiment": a.experiment, "arm": a.arm, "policy": a.policy_version},
                    "OK",
                )
            row = s.execute(
                f"SELECT {ASSIGNMENT} FROM experiment_assignments WHERE run_id = ?", (a.run_id,)
            ).fetchone()
        return None if row is None else self.codec.assignment_from(row)

    def assignment(self, run_id: str) -> Assignment | None:
        with self._reading() as s:
            row = s.execute(
                f"SELECT {ASSIGNMENT} FROM experiment_assignments WHERE run_id = ?", (run_id,)
            ).fetchone()
        return None if row is None else self.codec.assignment_from(row)

    def assignments(self, experiment: str) -> list[Assignment]:
        with self._reading() as s:
            rows = s.execute(
                f"SELECT {ASSIGNMENT} FROM experiment_assignments WHERE experiment = ? "
                "ORDER BY assigned_at, run_id",
                (experiment,),
            ).fetchall()
        return [self.codec.assignment_from(r) for r in rows]

    # --- audit --------------------------------------------------------------------------

    def _insert_admin_event(
        self,
        s: S,
        at: Any,
        actor: str,
        action: str,
        target: str,
        details: dict[str, Any],
        result: str,
    ) -> None:
        text = self.codec.text
        s.execute(
            "INSERT INTO admin_events (at, actor, action, target, details, result) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                at,
                text(actor),
                text(action),
                text(target),
                json.dumps(details, sort_keys=True, default=str),
                text(result),
            ),
        )

    def record_admin_event(
        self, actor: str, action: str, target: str, details: dict[str, Any], result: str
    ) -> None:
        now = self.codec.time(datetime.now(UTC))
        with self._writing() as s:
            self._insert_admin_event(s, now, actor, action, target, details, result)

    def admin_events(self) -> list[dict[str, Any]]:
        with self._reading() as s:
            rows = s.execute(
                "SELECT at, actor, action, target, details, result FROM admin_events ORDER BY id"
            ).fetchall()
        return [
            {
                "at": self.codec.dt(at),
                "actor": actor,
                "action": action,
                "target": target,
                "details": json.loads(details),
                "result": result,
            }
            for at, actor, action, target, details, result in rows
        ]

    def list_admin_events(self, audit_filter: AuditFilter) -> list[AuditEvent]:
        f, time = audit_filter, self.codec.time
        where: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("actor = ?", f.actor or None),
            ("action = ?", f.action or None),
            ("target = ?", f.target or None),
            ("at >= ?", time(f.since) if f.since is not None else None),
            ("at < ?", time(f.until) if f.until is not None else None),
        ):
            if value is not None:
                where.append(condition)
                params.append(value)
        sql = "SELECT at, actor, action, target, details, result FROM admin_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # The id is the recorded order, and its index serves the newest first.
        sql += " ORDER BY id DESC LIMIT ?"
        with self._reading() as s:
            rows = s.execute(sql, (*params, f.limit if f.limit > 0 else self.no_limit)).fetchall()
        return [
            AuditEvent(self.codec.dt(at), actor, action, target, json.loads(details), result)
            for at, actor, action, target, details, result in rows
        ]

    def delete_admin_events(self, before: datetime, limit: int) -> int:
        cutoff = self.codec.time(before)
        # Found in a read (no index on `at`: the scan must not hold the write lock),
        # then deleted by their id range, which the primary key finds at once.
        with self._reading() as s:
            found = s.execute(
                "SELECT min(id), max(id), count(*) FROM (SELECT id FROM admin_events "
                "WHERE at < ? ORDER BY id LIMIT ?) AS old",
                (cutoff, max(limit, 1)),
            ).fetchone()
        if not found[2]:
            return 0
        with self._writing() as s:
            deleted = s.execute(
                "DELETE FROM admin_events WHERE id >= ? AND id <= ? AND at < ?",
                (found[0], found[1], cutoff),
            )
            return int(deleted.rowcount)
