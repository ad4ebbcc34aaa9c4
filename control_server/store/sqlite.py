"""The SQLite backend: one file, WAL, `synchronous=FULL`, one connection per thread.

Several server processes may share the file: writes take the write lock up
front (`BEGIN IMMEDIATE`) and wait out each other through `busy_timeout`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from control_server.domain import (
    Action,
    Decision,
    DecisionRecord,
    NotFound,
    Override,
    PolicyVersion,
    Report,
    RunContext,
    RunFilter,
    RunLabels,
    RunSummary,
    Source,
    StoreUnavailable,
    frozen_map,
)
from control_server.store.base import Store

logger = logging.getLogger(__name__)

#: The numbered migration files shipped with the package.
MIGRATIONS: Traversable = resources.files("control_server.store").joinpath("migrations")

_JSON = json.JSONEncoder(sort_keys=True)
_MIGRATION_NAME = re.compile(r"(\d{4})_\w+\.sql")

# Column lists shared by the queries and the row mappers below (order matters).
_LABELS = "dataset, configuration, fold, trainer, plans, host"
_DECISION = (
    "decision_id, run_id, epoch, action, source, reason, policy_version, decided_at, "
    "lr, loss_weights, intervention_index"
)
_REPORT = (
    "run_id, epoch, train_loss, val_loss, pseudo_dice, avg_gradient_norm, "
    f"intervention_count, current_lr, initial_lr, loss_weights, {_LABELS}"
)
_RUN = (
    f"run_id, {_LABELS}, first_seen, last_seen, last_epoch, report_count, "
    "intervention_count, current_lr"
)
_OVERRIDE = "run_id, actor, reason, lr, weights, hold, once, created_at"
_N_DECISION = 11
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
_SELECT_DECISION = f"SELECT {_DECISION} FROM decisions WHERE run_id = ? AND epoch = ?"
# The decision at `epoch` (if stored) and the latest one before it, by the unique index.
_SELECT_CONTEXT_DECISIONS = (
    f"SELECT {_DECISION}, state FROM decisions "
    "WHERE run_id = ? AND epoch <= ? ORDER BY epoch DESC LIMIT 2"
)
# The active policy and the run's latest uncleared override (partial index), in one row.
_SELECT_CONTEXT_REST = (
    f"SELECT a.version, {_qualified('o', _OVERRIDE)} FROM (SELECT 1) AS one "
    "LEFT JOIN active_policy AS a ON a.id = 1 "
    "LEFT JOIN overrides AS o ON o.id = "
    "(SELECT max(id) FROM overrides WHERE run_id = ? AND cleared_at IS NULL)"
)
_SELECT_RUNS = (
    f"SELECT {_qualified('r', _RUN)}, {_qualified('d', _DECISION)} FROM runs AS r "
    "LEFT JOIN decisions AS d ON d.run_id = r.run_id AND d.epoch = r.last_epoch"
)
_SELECT_PAIRS = (
    f"SELECT {_qualified('p', _REPORT)}, {_qualified('d', _DECISION)} FROM reports AS p "
    "JOIN decisions AS d ON d.run_id = p.run_id AND d.epoch = p.epoch "
    "WHERE p.run_id = ? ORDER BY p.epoch"
)


class SqliteStore(Store):
    """`Store` on one SQLite file (created and migrated on open)."""

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 5.0, migrations: Traversable = MIGRATIONS
    ) -> None:
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            conn = self._connection()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreUnavailable(
                    f"sqlite store {self._path}: cannot use WAL (journal_mode={mode})"
                )
            self._level = _migrate(conn, _load_migrations(migrations))
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc
            raise
        logger.info("opened sqlite store %s (schema %d)", self._path, self._level)

    # --- connections and transactions -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self._path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            # check_same_thread=False only so that close() may close every thread's
            # connection; each connection is still used by its own thread alone.
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc
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
            raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction: commit on success, roll back on any error.

        sqlite3 errors become StoreUnavailable; domain errors pass through.
        """
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"sqlite store {self._path}: {exc}") from exc
            raise

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

    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision]:
        for record in records:
            report, decision = record.report, record.decision
            if (report.run_id, report.epoch) != (decision.run_id, decision.epoch):
                raise ValueError(
                    f"report ({report.run_id!r}, {report.epoch}) and decision "
                    f"({decision.run_id!r}, {decision.epoch}) disagree"
                )
        if not records:
            return []
        results: list[Decision] = []
        reports: list[tuple[Any, ...]] = []
        runs: list[tuple[Any, ...]] = []
        with self._transaction(write=True) as conn:
            for record in records:
                decision = record.decision
                decided_at = _ts(decision.decided_at)
                cursor = conn.execute(
                    _INSERT_DECISION, (*_decision_row(decision, decided_at), record.state)
                )
                if cursor.rowcount == 1:
                    reports.append(_report_row(record.report))
                    runs.append(_run_row(record.report, decided_at))
                    results.append(decision)
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

    def load_context(self, run_id: str, epoch: int) -> RunContext:
        with self._transaction() as conn:
            rows = conn.execute(_SELECT_CONTEXT_DECISIONS, (run_id, epoch)).fetchall()
            rest = conn.execute(_SELECT_CONTEXT_REST, (run_id,)).fetchone()
        existing: Decision | None = None
        if rows and rows[0][2] == epoch:
            existing = _decision_from(rows[0])
            rows = rows[1:]
        previous_state: str | None = rows[0][_N_DECISION] if rows else None
        override = _override_from(rest[1:]) if rest[1] is not None else None
        return RunContext(existing, previous_state, rest[0], override)

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
            known = conn.execute("SELECT 1 FROM policies WHERE version = ?", (version,))
            if known.fetchone() is None:
                raise NotFound(f"policy version {version!r} is not stored")
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
                "ActivatePolicy",
                version,
                {"previous": row[0] if row else None},
                "OK",
            )

    def active_policy(self) -> str | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

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


def _load_migrations(source: Traversable) -> list[tuple[str, str]]:
    """(name, sql) of files 0001_*.sql, 0002_*.sql, ... in order; gaps are an error."""
    found: dict[int, Traversable] = {}
    for entry in source.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match is None:
            continue
        level = int(match.group(1))
        if level in found:
            raise RuntimeError(
                f"two migrations numbered {level:04d}: {found[level].name} and {entry.name}"
            )
        found[level] = entry
    if sorted(found) != list(range(1, len(found) + 1)):
        raise RuntimeError(
            f"migrations must be numbered 0001, 0002, ... without gaps, but got {sorted(found)}"
        )
    return [
        (found[level].name, found[level].read_text(encoding="utf-8")) for level in sorted(found)
    ]


def _migrate(conn: sqlite3.Connection, migrations: list[tuple[str, str]]) -> int:
    """Apply the migrations the database lacks, one transaction each; return the level."""
    known = len(migrations)
    level = _level(conn)
    while True:
        if level > known:
            raise StoreUnavailable(
                f"database schema version {level} is newer than this control-server knows "
                f"({known}); upgrade control-server or use another store"
            )
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


def _weights(text: str) -> Mapping[str, float]:
    return frozen_map(json.loads(text))


def _dump_weights(weights: Mapping[str, float]) -> str:
    if not weights:
        return "{}"
    return _JSON.encode({k: float(v) for k, v in weights.items()})


def _labels_row(labels: RunLabels) -> tuple[str, ...]:
    return (
        labels.dataset,
        labels.configuration,
        labels.fold,
        labels.trainer,
        labels.plans,
        labels.host,
    )


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
        _dump_weights(d.loss_weights),
        d.intervention_index,
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
        loss_weights=_weights(row[9]),
        intervention_index=row[10],
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
        _dump_weights(r.loss_weights),
        *_labels_row(r.labels),
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
        loss_weights=_weights(row[9]),
        labels=RunLabels(*row[10:16]),
    )


def _run_row(report: Report, seen: str) -> tuple[Any, ...]:
    return (
        report.run_id,
        *_labels_row(report.labels),
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
        run_id=row[0],
        actor=row[1],
        reason=row[2],
        lr=_opt_float(row[3]),
        loss_weights=_weights(row[4]),
        hold_interventions=bool(row[5]),
        once=bool(row[6]),
        created_at=_dt(row[7]),
    )


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
