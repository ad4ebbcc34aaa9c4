"""The SQLite backend: one file, WAL, `synchronous=FULL`, one connection per thread.

Several server processes may share the file: writes take the write lock up
front (`BEGIN IMMEDIATE`) and wait out each other through `busy_timeout`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from control_server.domain import (
    Action,
    Decision,
    DecisionFilter,
    DecisionPage,
    DecisionRecord,
    NotFound,
    Override,
    PolicyPin,
    PolicyVersion,
    Report,
    RunContext,
    RunFilter,
    RunLabels,
    RunSelector,
    RunSummary,
    ShadowSummary,
    Source,
    StoreUnavailable,
    remember,
)
from control_server.store.base import Store
from control_server.store.rows import (
    check_record,
    dump_weights,
    labels_row,
    load_weights,
    shadow_summary_from,
)
from control_server.store.schema import (
    SQLITE_MIGRATIONS,
    check_current,
    check_level,
    load_migrations,
)

logger = logging.getLogger(__name__)

#: The numbered migration files shipped with the package.
MIGRATIONS: Traversable = SQLITE_MIGRATIONS


# Column lists shared by the queries and the row mappers below (order matters).
_LABELS = "dataset, configuration, fold, trainer, plans, host"
# Also the columns of shadow_decisions.
_DECISION = (
    "decision_id, run_id, epoch, action, source, reason, policy_version, decided_at, "
    "lr, loss_weights, intervention_index, override_id, previous_epoch"
)
_REPORT = (
    "run_id, epoch, train_loss, val_loss, pseudo_dice, avg_gradient_norm, "
    f"intervention_count, current_lr, initial_lr, loss_weights, {_LABELS}"
)
_RUN = (
    f"run_id, {_LABELS}, first_seen, last_seen, last_epoch, report_count, "
    "intervention_count, current_lr"
)
_OVERRIDE = "id, run_id, actor, reason, lr, weights, hold, once, created_at, cleared_at, cleared_by"
_PIN = "dataset, configuration, fold, version, pinned_at, actor"
_N_DECISION = 13
_N_REPORT = 16
_N_RUN = 13
# A run's summary fields that follow its newest epoch (a late, older report leaves them).
_FOLLOW_NEWEST = (*_LABELS.split(", "), "intervention_count", "current_lr")


def _qualified(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def _marks(n: int) -> str:
    return ", ".join("?" * n)


_INSERT_DECISION = (
    f"INSERT INTO decisions ({_DECISION}, state) VALUES ({_marks(_N_DECISION + 1)}) "
    "ON CONFLICT (run_id, epoch) DO NOTHING"
)
_INSERT_REPORT = f"INSERT INTO reports ({_REPORT}) VALUES ({_marks(_N_REPORT)})"
# SET expressions all see the old row, so the CASE compares with the old last_epoch.
_UPSERT_RUN = (
    f"INSERT INTO runs ({_RUN}) VALUES ({_marks(_N_RUN)}) ON CONFLICT (run_id) DO UPDATE SET "
    + "".join(
        f"{c} = CASE WHEN excluded.last_epoch >= runs.last_epoch "
        f"THEN excluded.{c} ELSE runs.{c} END, "
        for c in _FOLLOW_NEWEST
    )
    + "first_seen = min(runs.first_seen, excluded.first_seen), "
    "last_seen = max(runs.last_seen, excluded.last_seen), "
    "last_epoch = max(runs.last_epoch, excluded.last_epoch), "
    "report_count = runs.report_count + 1"
)
_INSERT_SHADOW = (
    f"INSERT INTO shadow_decisions ({_DECISION}, state) VALUES ({_marks(_N_DECISION + 1)})"
)
# A `once` override is consumed by the decision that used it, if nobody beat it to it.
_CONSUME_OVERRIDE = (
    "UPDATE overrides SET cleared_at = ?, cleared_by = ? WHERE id = ? AND cleared_at IS NULL"
)
_SELECT_DECISION = f"SELECT {_DECISION} FROM decisions WHERE run_id = ? AND epoch = ?"
# Everything load_context needs in ONE statement (atomic without BEGIN/COMMIT; on the
# ReportEpoch hot path each statement costs more than the lookups in it):
# - the active, shadow and pinned versions and the run's latest uncleared override
#   (partial index), in one row;
# - the most specific pin matching the run's labels, ties to the most recently pinned
#   (a scan: pins are few, and the OR-index plan SQLite picks otherwise is slower);
# - joined to the decision at `epoch` (if stored) and the latest one before it (unique
#   index), each with the shadow version and state stored beside it: 1 or 2 rows.
_BEST_PIN = (
    "SELECT id FROM policy_pins NOT INDEXED WHERE ? AND (dataset = '' OR dataset = ?) "
    "AND (configuration = '' OR configuration = ?) AND (fold = '' OR fold = ?) "
    "ORDER BY (dataset != '') + (configuration != '') + (fold != '') DESC, "
    "pinned_at DESC, id DESC LIMIT 1"
)
_SELECT_CONTEXT = (
    "SELECT a.version, sp.version, pin.version, "
    "(SELECT max(epoch) FROM decisions WHERE run_id = ?), "
    f"{_qualified('o', _OVERRIDE)}, d.* "
    "FROM (SELECT 1) AS one "
    "LEFT JOIN active_policy AS a ON a.id = 1 "
    "LEFT JOIN shadow_policy AS sp ON sp.id = 1 "
    f"LEFT JOIN policy_pins AS pin ON pin.id = ({_BEST_PIN}) "
    "LEFT JOIN overrides AS o ON o.id = "
    "(SELECT max(id) FROM overrides WHERE run_id = ? AND cleared_at IS NULL) "
    f"LEFT JOIN (SELECT {_qualified('d', _DECISION)}, d.state, s.policy_version, s.state "
    "FROM decisions AS d LEFT JOIN shadow_decisions AS s "
    "ON s.run_id = d.run_id AND s.epoch = d.epoch "
    "WHERE d.run_id = ? AND d.epoch <= ? ORDER BY d.epoch DESC LIMIT 2) AS d ON 1"
)
_N_CONTEXT_HEAD = 4 + len(_OVERRIDE.split(","))
#: Runs whose next context the decider's connection remembers (least recently used out).
CONTEXT_CACHE_RUNS = 10_000
_SELECT_RUNS = (
    f"SELECT {_qualified('r', _RUN)}, {_qualified('d', _DECISION)} FROM runs AS r "
    "LEFT JOIN decisions AS d ON d.run_id = r.run_id AND d.epoch = r.last_epoch"
)
_SELECT_PAIRS = (
    f"SELECT {_qualified('p', _REPORT)}, {_qualified('d', _DECISION)} FROM reports AS p "
    "JOIN decisions AS d ON d.run_id = p.run_id AND d.epoch = p.epoch "
    "WHERE p.run_id = ? ORDER BY p.epoch"
)


class _Contexts:
    """One connection's memory of each run's next context (the decider's hot path).

    After a decision of epoch E is recorded, the context of the run's next report
    is known without reading it: E, the state recorded with it, and the versions
    and override that decided it. It stays true while nothing else writes, which
    the write transactions of `decide_and_record` check: `PRAGMA data_version`
    changes when another connection (the front end's admin calls, another server
    process) has committed, and any other write transaction of this connection
    forgets everything. A transaction that fails forgets everything too.
    """

    __slots__ = ("data_version", "entries", "live", "loaded")

    def __init__(self) -> None:
        self.data_version: int | None = None
        # run_id -> (labels, context for any epoch above context.previous_epoch)
        self.entries: dict[str, tuple[RunLabels | None, RunContext]] = {}
        # Contexts handed out in this transaction that may be remembered once recorded:
        # run_id -> (labels, context, epoch); only for an epoch above all stored ones.
        self.loaded: dict[str, tuple[RunLabels | None, RunContext, int]] = {}
        self.live = False  # inside a write transaction whose data_version was checked

    def forget(self) -> None:
        self.entries.clear()
        self.loaded.clear()

    def lookup(self, run_id: str, epoch: int, labels: RunLabels | None) -> RunContext | None:
        hit = self.entries.get(run_id)
        if hit is None or hit[0] != labels:
            return None
        context = hit[1]
        if context.previous_epoch is None or epoch <= context.previous_epoch:
            return None  # a retry or a late report: read it
        self.loaded[run_id] = (labels, context, epoch)
        return context

    def recorded(self, record: DecisionRecord) -> None:
        """Remember the run's next context after `record` was stored (not yet committed)."""
        run_id = record.decision.run_id
        loaded = self.loaded.pop(run_id, None)
        if loaded is None or loaded[2] != record.decision.epoch or not self.live:
            self.entries.pop(run_id, None)
            return
        labels, context, epoch = loaded
        if record.consumed_override is not None:
            self.entries.pop(run_id, None)  # the run's active override has changed
            return
        shadow_state = record.shadow_state if record.shadow is not None else None
        following = replace(
            context,
            existing=None,
            previous_state=record.state,
            previous_epoch=epoch,
            previous_shadow_state=shadow_state,
        )
        remember(self.entries, run_id, (labels, following), CONTEXT_CACHE_RUNS)


class SqliteStore(Store):
    """`Store` on one SQLite file (created and migrated on open).

    With ``read_only=True`` (replay) it opens an existing, migrated file without
    ever writing it, also on a read-only volume; every write raises
    StoreUnavailable.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        migrations: Traversable = MIGRATIONS,
        read_only: bool = False,
    ) -> None:
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._read_only = read_only
        self._immutable = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        if read_only:
            if not Path(self._path).is_file():
                raise StoreUnavailable(f"sqlite store {self._path}: no such file")
        else:
            _require_writable(Path(self._path))
        try:
            conn = self._connection()
            if read_only:
                self._level = _level(conn)
                check_current(self._level, len(load_migrations(migrations)))
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreUnavailable(
                        f"sqlite store {self._path}: cannot use WAL (journal_mode={mode})"
                    )
                self._level = _migrate(conn, load_migrations(migrations))
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise _unavailable(self._path, exc) from exc
            raise
        logger.info(
            "opened sqlite store %s (schema %d%s)",
            self._path,
            self._level,
            ", read-only" if read_only else "",
        )

    # --- connections and transactions -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self._path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise _unavailable(self._path, exc) from exc
        with self._lock:
            if not self._closed:
                self._connections.append(conn)
        if self._closed:
            conn.close()
            raise StoreUnavailable(f"sqlite store {self._path} is closed")
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise _unavailable(self._path, exc) from exc
        self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() may close every thread's
        # connection; each connection is still used by its own thread alone.
        if not self._read_only:
            return sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        # mode=ro never writes the file. Reading a WAL database needs its -shm, which
        # a read-only volume does not let SQLite create; without a -wal nobody is
        # writing it (a writer keeps one), so it may then be read as immutable.
        uri = Path(self._path).resolve().as_uri() + "?mode=ro"
        for immutable in (self._immutable, True):
            conn = sqlite3.connect(
                uri + ("&immutable=1" if immutable else ""),
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                conn.close()
                if immutable or Path(f"{self._path}-wal").exists():
                    raise
                continue
            self._immutable = immutable
            return conn
        raise AssertionError("unreachable: the immutable attempt returns or raises")

    def _contexts(self) -> _Contexts:
        """This thread's (this connection's) remembered run contexts."""
        contexts: _Contexts | None = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = self._local.contexts = _Contexts()
        return contexts

    @contextmanager
    def _transaction(
        self, *, write: bool = False, deciding: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One transaction: commit on success, roll back on any error. Inside an
        open transaction of this thread (write_transaction), it joins that one.

        A write transaction that is not `deciding` (decide_and_record's) makes
        this connection forget the run contexts it remembers.
        sqlite3 errors become StoreUnavailable; domain errors pass through.
        """
        if write and self._read_only:
            raise StoreUnavailable(f"sqlite store {self._path} is open read-only")
        conn = self._connection()
        if conn.in_transaction:
            yield conn
            return
        contexts = self._contexts()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            if write:
                # Holding the write lock: nobody else commits until we do.
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if not deciding or version != contexts.data_version:
                    contexts.forget()
                contexts.data_version = version
                contexts.live = deciding
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)
            if write:
                contexts.forget()
            if isinstance(exc, sqlite3.Error):
                raise _unavailable(self._path, exc) from exc
            raise
        finally:
            if write:
                contexts.live = False
                contexts.loaded.clear()

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        with self._transaction(write=True, deciding=True):
            yield

    def close(self) -> None:
        """Close every connection; later calls raise StoreUnavailable."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                logger.warning("closing a connection to %s failed", self._path, exc_info=True)

    # --- decisions --------------------------------------------------------------------

    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision | None]:
        for record in records:
            check_record(record)
        if not records:
            return []
        results: list[Decision | None] = []
        reports: list[tuple[Any, ...]] = []
        runs: list[tuple[Any, ...]] = []
        contexts = self._contexts()
        with self._transaction(write=True) as conn:
            for record in records:
                decision = record.decision
                decided_at = _ts(decision.decided_at)
                cursor = conn.execute(
                    _INSERT_DECISION, (*_decision_row(decision, decided_at), record.state)
                )
                if cursor.rowcount == 1:
                    if record.consumed_override is not None:
                        consumed = conn.execute(
                            _CONSUME_OVERRIDE,
                            (
                                decided_at,
                                f"consumed by epoch {decision.epoch}",
                                record.consumed_override,
                            ),
                        )
                        if consumed.rowcount != 1:
                            # Used up or cleared meanwhile: this decision must not stand.
                            conn.execute(
                                "DELETE FROM decisions WHERE decision_id = ?",
                                (decision.decision_id,),
                            )
                            results.append(None)
                            continue
                    if record.shadow is not None:
                        conn.execute(
                            _INSERT_SHADOW,
                            (
                                *_decision_row(record.shadow, _ts(record.shadow.decided_at)),
                                record.shadow_state,
                            ),
                        )
                    reports.append(_report_row(record.report))
                    runs.append(_run_row(record.report, decided_at))
                    results.append(decision)
                    contexts.recorded(record)
                    continue
                row = conn.execute(_SELECT_DECISION, (decision.run_id, decision.epoch)).fetchone()
                if row is None:  # pragma: no cover - the conflict guarantees the row
                    raise StoreUnavailable(
                        f"decision ({decision.run_id!r}, {decision.epoch}) "
                        "conflicted but cannot be read"
                    )
                results.append(_decision_from(row))
            if reports:
                conn.executemany(_INSERT_REPORT, reports)
                conn.executemany(_UPSERT_RUN, runs)
        return results

    def load_context(self, run_id: str, epoch: int, labels: RunLabels | None = None) -> RunContext:
        contexts = self._contexts()
        if contexts.live:
            remembered = contexts.lookup(run_id, epoch, labels)
            if remembered is not None:
                return remembered
        pin_params = (
            (1, labels.dataset, labels.configuration, labels.fold)
            if labels is not None
            else (0, "", "", "")
        )
        try:
            rows = (
                self._connection()
                .execute(_SELECT_CONTEXT, (run_id, *pin_params, run_id, run_id, epoch))
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise _unavailable(self._path, exc) from exc
        head = rows[0][:_N_CONTEXT_HEAD]
        active, shadow, pinned, newest = head[0], head[1], head[2], head[3]
        override = _override_from(head[4:]) if head[4] is not None else None
        # Decision columns, then its state, shadow version and shadow state; None: none.
        decisions = [row[_N_CONTEXT_HEAD:] for row in rows if row[_N_CONTEXT_HEAD] is not None]
        existing: Decision | None = None
        if decisions and decisions[0][2] == epoch:
            existing = _decision_from(decisions[0])
            decisions = decisions[1:]
        previous_epoch: int | None = None
        previous_state: str | None = None
        previous_shadow_state: str | None = None
        if decisions:
            previous_epoch = decisions[0][2]
            previous_state = decisions[0][_N_DECISION]
            if shadow is not None and decisions[0][_N_DECISION + 1] == shadow:
                previous_shadow_state = decisions[0][_N_DECISION + 2]
        context = RunContext(
            existing=existing,
            previous_state=previous_state,
            previous_epoch=previous_epoch,
            active_policy=active,
            override=override,
            pinned_policy=pinned,
            shadow_policy=shadow,
            previous_shadow_state=previous_shadow_state,
        )
        if contexts.live and (newest is None or epoch > newest):
            contexts.loaded[run_id] = (labels, context, epoch)
        return context

    def latest_decision_seq(self) -> int:
        with self._transaction() as conn:
            return int(conn.execute("SELECT coalesce(max(rowid), 0) FROM decisions").fetchone()[0])

    def decisions_after(
        self, cursor: int, decision_filter: DecisionFilter, limit: int
    ) -> DecisionPage:
        where, params = _decision_where(replace(decision_filter, since=None, until=None))
        sql = f"SELECT rowid, {_DECISION} FROM decisions WHERE rowid > ?"
        sql += "".join(f" AND {w}" for w in where) + " ORDER BY rowid LIMIT ?"
        with self._transaction() as conn:
            rows = conn.execute(sql, (cursor, *params, max(limit, 1))).fetchall()
            if len(rows) < max(limit, 1):
                # Same snapshot: nothing matching was committed up to the latest rowid.
                latest = conn.execute("SELECT coalesce(max(rowid), 0) FROM decisions")
                next_cursor = max(cursor, int(latest.fetchone()[0]))
            else:
                next_cursor = int(rows[-1][0])
        return DecisionPage(tuple(_decision_from(r[1:]) for r in rows), next_cursor)

    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        where, params = _decision_where(decision_filter)
        sql = f"SELECT {_DECISION} FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY decided_at, rowid LIMIT ?"
        limit = decision_filter.limit if decision_filter.limit > 0 else -1
        with self._transaction() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [_decision_from(r) for r in rows]

    def shadow_decisions(self, run_id: str) -> list[Decision]:
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_DECISION} FROM shadow_decisions WHERE run_id = ? ORDER BY epoch",
                (run_id,),
            ).fetchall()
        return [_decision_from(r) for r in rows]

    def shadow_summary(self, version: str) -> ShadowSummary:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT d.action, s.action, "
                "(s.action != d.action OR s.lr IS NOT d.lr OR s.loss_weights != d.loss_weights), "
                "count(*) FROM shadow_decisions AS s JOIN decisions AS d "
                "ON d.run_id = s.run_id AND d.epoch = s.epoch "
                "WHERE s.policy_version = ? GROUP BY 1, 2, 3",
                (version,),
            ).fetchall()
        return shadow_summary_from(version, rows)

    # --- overrides --------------------------------------------------------------------

    def set_override(self, override: Override) -> Override:
        if override.created_at is None:
            raise ValueError("set_override needs an override with created_at set")
        created_at = _ts(override.created_at)
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "INSERT INTO overrides (run_id, actor, reason, lr, weights, hold, once, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    override.run_id,
                    override.actor,
                    override.reason,
                    _real(override.lr),
                    dump_weights(override.loss_weights),
                    int(override.hold_interventions),
                    int(override.once),
                    created_at,
                ),
            )
            new_id = cursor.lastrowid
            conn.execute(
                "UPDATE overrides SET cleared_at = ?, cleared_by = ? "
                "WHERE run_id = ? AND cleared_at IS NULL AND id != ?",
                (created_at, f"replaced by override {new_id}", override.run_id, new_id),
            )
            row = conn.execute(
                f"SELECT {_OVERRIDE} FROM overrides WHERE id = ?", (new_id,)
            ).fetchone()
        return _override_from(row)

    def clear_override(self, run_id: str, actor: str, at: datetime) -> Override | None:
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT max(id) FROM overrides WHERE run_id = ? AND cleared_at IS NULL", (run_id,)
            ).fetchone()
            if row[0] is None:
                return None
            conn.execute(
                "UPDATE overrides SET cleared_at = ?, cleared_by = ? "
                "WHERE run_id = ? AND cleared_at IS NULL",
                (_ts(at), actor, run_id),
            )
            cleared = conn.execute(
                f"SELECT {_OVERRIDE} FROM overrides WHERE id = ?", (row[0],)
            ).fetchone()
        return _override_from(cleared)

    def list_overrides(self, run_id: str = "", *, include_cleared: bool = False) -> list[Override]:
        where: list[str] = []
        params: list[Any] = []
        if run_id:
            where.append("run_id = ?")
            params.append(run_id)
        if not include_cleared:
            where.append("cleared_at IS NULL")
        sql = f"SELECT {_OVERRIDE} FROM overrides"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._transaction() as conn:
            rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return [_override_from(r) for r in rows]

    # --- policies ---------------------------------------------------------------------

    def put_policy(self, policy: PolicyVersion) -> PolicyVersion:
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO policies (version, name, document, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (version) DO NOTHING",
                (
                    policy.version,
                    policy.name,
                    json.dumps(policy.document, sort_keys=True),
                    _ts(policy.created_at),
                ),
            )
            row = conn.execute(
                "SELECT version, name, document, created_at FROM policies WHERE version = ?",
                (policy.version,),
            ).fetchone()
        return _policy_from(row)

    def get_policy(self, version: str) -> PolicyVersion | None:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT version, name, document, created_at FROM policies WHERE version = ?",
                (version,),
            ).fetchone()
        return _policy_from(row) if row is not None else None

    def list_policies(self) -> list[PolicyVersion]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT version, name, document, created_at FROM policies "
                "ORDER BY created_at, rowid"
            ).fetchall()
        return [_policy_from(row) for row in rows]

    def activate_policy(self, version: str, actor: str) -> None:
        now = _ts(datetime.now(UTC))
        with self._transaction(write=True) as conn:
            _require_policy(conn, version)
            row = conn.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
            conn.execute(
                "INSERT INTO active_policy (id, version, activated_at, actor) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
                "activated_at = excluded.activated_at, actor = excluded.actor",
                (version, now, actor),
            )
            _insert_admin_event(
                conn,
                now,
                actor,
                "PolicyActivated",
                version,
                {"previous": row[0] if row else None},
                "OK",
            )

    def active_policy(self) -> str | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def set_shadow_policy(self, version: str | None, actor: str, at: datetime) -> None:
        with self._transaction(write=True) as conn:
            if version is None:
                conn.execute("DELETE FROM shadow_policy")
                return
            _require_policy(conn, version)
            conn.execute(
                "INSERT INTO shadow_policy (id, version, set_at, actor) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
                "set_at = excluded.set_at, actor = excluded.actor",
                (version, _ts(at), actor),
            )

    def shadow_policy(self) -> str | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT version FROM shadow_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def pin_policy(self, pin: PolicyPin) -> PolicyPin:
        s = pin.selector
        with self._transaction(write=True) as conn:
            _require_policy(conn, pin.version)
            conn.execute(
                f"INSERT INTO policy_pins ({_PIN}) VALUES ({_marks(6)}) "
                "ON CONFLICT (dataset, configuration, fold) DO UPDATE SET "
                "version = excluded.version, pinned_at = excluded.pinned_at, "
                "actor = excluded.actor",
                (s.dataset, s.configuration, s.fold, pin.version, _ts(pin.pinned_at), pin.actor),
            )
            row = conn.execute(
                f"SELECT {_PIN} FROM policy_pins "
                "WHERE dataset = ? AND configuration = ? AND fold = ?",
                (s.dataset, s.configuration, s.fold),
            ).fetchone()
        return _pin_from(row)

    def unpin_policy(self, selector: RunSelector) -> bool:
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "DELETE FROM policy_pins WHERE dataset = ? AND configuration = ? AND fold = ?",
                (selector.dataset, selector.configuration, selector.fold),
            )
        return cursor.rowcount == 1

    def list_pins(self) -> list[PolicyPin]:
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT {_PIN} FROM policy_pins ORDER BY pinned_at, id").fetchall()
        return [_pin_from(r) for r in rows]

    # --- runs -------------------------------------------------------------------------

    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        """Runs matching the filter, most recently active first; limit <= 0 means no limit."""
        where: list[str] = []
        params: list[Any] = []
        for column in ("dataset", "configuration", "fold"):
            value = getattr(run_filter, column)
            if value:
                where.append(f"r.{column} = ?")
                params.append(value)
        sql = _SELECT_RUNS
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.last_seen DESC, r.run_id LIMIT ?"
        params.append(run_filter.limit if run_filter.limit > 0 else -1)
        with self._transaction() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_summary_from(row) for row in rows]

    def get_run(self, run_id: str) -> tuple[RunSummary, list[tuple[Report, Decision]]] | None:
        with self._transaction() as conn:
            row = conn.execute(_SELECT_RUNS + " WHERE r.run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            pairs = conn.execute(_SELECT_PAIRS, (run_id,)).fetchall()
        return _summary_from(row), [
            (_report_from(p[:_N_REPORT]), _decision_from(p[_N_REPORT:])) for p in pairs
        ]

    def run_ids(self) -> list[str]:
        with self._transaction() as conn:
            rows = conn.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()
        return [str(row[0]) for row in rows]

    # --- audit and maintenance --------------------------------------------------------

    def record_admin_event(
        self, actor: str, action: str, target: str, details: dict[str, Any], result: str
    ) -> None:
        with self._transaction(write=True) as conn:
            _insert_admin_event(
                conn, _ts(datetime.now(UTC)), actor, action, target, details, result
            )

    def admin_events(self) -> list[dict[str, Any]]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT at, actor, action, target, details, result FROM admin_events ORDER BY id"
            ).fetchall()
        return [
            {
                "at": _dt(at),
                "actor": actor,
                "action": action,
                "target": target,
                "details": json.loads(details),
                "result": result,
            }
            for at, actor, action, target, details, result in rows
        ]

    def schema_version(self) -> int:
        with self._transaction() as conn:
            return _level(conn)

    def check_integrity(self) -> None:
        with self._transaction() as conn:
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
        if problems != ["ok"]:
            raise StoreUnavailable(
                f"sqlite store {self._path} failed its integrity check: " + "; ".join(problems[:5])
            )
        if orphans:
            raise StoreUnavailable(
                f"sqlite store {self._path} has {len(orphans)} rows with "
                f"dangling references, e.g. {orphans[0]!r}"
            )


# --- migrations -------------------------------------------------------------------------


def _migrate(conn: sqlite3.Connection, migrations: list[tuple[str, str]]) -> int:
    """Apply the migrations the database lacks, one transaction each; return the level."""
    known = len(migrations)
    level = _level(conn)
    while True:
        check_level(level, known)
        if level == known:
            return level
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated meanwhile: decide under the write lock.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            level = _level(conn)
            if level < known:
                name, sql = migrations[level]
                for statement in _statements(sql):
                    conn.execute(statement)
                level += 1
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (level, name, _ts(datetime.now(UTC))),
                )
                logger.info("applied migration %s", name)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _level(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])


def _statements(script: str) -> Iterator[str]:
    """Split a SQL script into complete statements (executescript would commit first)."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip(";").strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer[:80]!r}")


# Primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14


def _on_read_only_volume(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unavailable(path: str, exc: sqlite3.Error) -> StoreUnavailable:
    """StoreUnavailable for a sqlite3 error, saying what an operator can do about it."""
    message = f"sqlite store {path}: {exc}"
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None
    if code == _SQLITE_FULL:
        message += " (the volume holding it is full; it serves again once there is room)"
    elif code in (_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN) and _on_read_only_volume(
        Path(path).parent
    ):
        message += " (the volume holding it is mounted read-only)"
    elif code == _SQLITE_READONLY:
        message += " (its file or its directory does not allow writes)"
    elif code == _SQLITE_IOERR:
        # ext4 turns a volume read-only on errors without saying so in statvfs.
        message += " (the volume holding it failed or turned read-only; see the kernel log)"
    return StoreUnavailable(message)


def _require_writable(path: Path) -> None:
    """Refuse a store this process could read but not write.

    SQLite would open it read-only and keep it so, answering every report with
    an error, until every connection of the process closed: better to say so
    at start.
    """
    for target in (path, path.parent):
        if target.exists() and not os.access(target, os.W_OK):
            why = (
                "the volume holding it is mounted read-only"
                if _on_read_only_volume(target)
                else "permission denied"
            )
            raise StoreUnavailable(f"sqlite store {path}: cannot write to {target} ({why})")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.warning("rollback failed", exc_info=True)


# --- row mapping ------------------------------------------------------------------------


def _ts(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text, so that text order is time order (naive = UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _real(value: float | None) -> float | str | None:
    """SQLite stores a bound NaN as NULL; keep it as the text 'NaN' instead."""
    if value is not None and math.isnan(value):
        return "NaN"
    return value


def _float(value: float | str) -> float:
    return float(value)


def _opt_float(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def _decision_row(d: Decision, decided_at: str) -> tuple[Any, ...]:
    return (
        d.decision_id,
        d.run_id,
        d.epoch,
        d.action.value,
        d.source.value,
        d.reason,
        d.policy_version,
        decided_at,
        _real(d.lr),
        dump_weights(d.loss_weights),
        d.intervention_index,
        d.override_id,
        d.previous_epoch,
    )


def _decision_from(row: Sequence[Any]) -> Decision:
    return Decision(
        decision_id=row[0],
        run_id=row[1],
        epoch=row[2],
        action=Action(row[3]),
        source=Source(row[4]),
        reason=row[5],
        policy_version=row[6],
        decided_at=_dt(row[7]),
        lr=_opt_float(row[8]),
        loss_weights=load_weights(row[9]),
        intervention_index=row[10],
        override_id=row[11],
        previous_epoch=row[12],
    )


def _report_row(r: Report) -> tuple[Any, ...]:
    return (
        r.run_id,
        r.epoch,
        _real(r.train_loss),
        _real(r.val_loss),
        _real(r.pseudo_dice),
        _real(r.avg_gradient_norm),
        r.intervention_count,
        _real(r.current_lr),
        _real(r.initial_lr),
        dump_weights(r.loss_weights),
        *labels_row(r.labels),
    )


def _report_from(row: Sequence[Any]) -> Report:
    return Report(
        run_id=row[0],
        epoch=row[1],
        train_loss=_float(row[2]),
        val_loss=_opt_float(row[3]),
        pseudo_dice=_opt_float(row[4]),
        avg_gradient_norm=_opt_float(row[5]),
        intervention_count=row[6],
        current_lr=_float(row[7]),
        initial_lr=_float(row[8]),
        loss_weights=load_weights(row[9]),
        labels=RunLabels(*row[10:16]),
    )


def _run_row(report: Report, seen: str) -> tuple[Any, ...]:
    return (
        report.run_id,
        *labels_row(report.labels),
        seen,
        seen,
        report.epoch,
        1,
        report.intervention_count,
        _real(report.current_lr),
    )


def _summary_from(row: Sequence[Any]) -> RunSummary:
    last = row[_N_RUN:]
    return RunSummary(
        run_id=row[0],
        labels=RunLabels(*row[1:7]),
        first_seen=_dt(row[7]),
        last_seen=_dt(row[8]),
        last_epoch=row[9],
        report_count=row[10],
        intervention_count=row[11],
        current_lr=_float(row[12]),
        last_decision=_decision_from(last) if last[0] is not None else None,
    )


def _override_from(row: Sequence[Any]) -> Override:
    return Override(
        override_id=row[0],
        run_id=row[1],
        actor=row[2],
        reason=row[3],
        lr=_opt_float(row[4]),
        loss_weights=load_weights(row[5]),
        hold_interventions=bool(row[6]),
        once=bool(row[7]),
        created_at=_dt(row[8]),
        cleared_at=None if row[9] is None else _dt(row[9]),
        cleared_by=row[10],
    )


def _pin_from(row: Sequence[Any]) -> PolicyPin:
    return PolicyPin(
        selector=RunSelector(dataset=row[0], configuration=row[1], fold=row[2]),
        version=row[3],
        pinned_at=_dt(row[4]),
        actor=row[5],
    )


def _require_policy(conn: sqlite3.Connection, version: str) -> None:
    if conn.execute("SELECT 1 FROM policies WHERE version = ?", (version,)).fetchone() is None:
        raise NotFound(f"policy version {version!r} is not stored")


def _decision_where(f: DecisionFilter) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their parameters) of a decision filter, limit aside."""
    where: list[str] = []
    params: list[Any] = []
    for condition, value in (
        ("run_id = ?", f.run_id or None),
        ("action = ?", f.action.value if f.action is not None else None),
        ("source = ?", f.source.value if f.source is not None else None),
        ("decided_at >= ?", _ts(f.since) if f.since is not None else None),
        ("decided_at < ?", _ts(f.until) if f.until is not None else None),
    ):
        if value is not None:
            where.append(condition)
            params.append(value)
    return where, params


def _policy_from(row: Sequence[Any]) -> PolicyVersion:
    return PolicyVersion(
        version=row[0], name=row[1], document=json.loads(row[2]), created_at=_dt(row[3])
    )


def _insert_admin_event(
    conn: sqlite3.Connection,
    at: str,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
    result: str,
) -> None:
    conn.execute(
        "INSERT INTO admin_events (at, actor, action, target, details, result) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (at, actor, action, target, json.dumps(details, sort_keys=True, default=str), result),
    )
