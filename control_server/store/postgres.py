"""The PostgreSQL backend: psycopg 3 and a connection pool, for replicas sharing one database.

Replicas agree through the database alone:

- idempotency per (run_id, epoch) is the decisions table's unique key;
- a batch's read-decide-write is serialised per run: before reading any context,
  `decide_and_record` takes a transaction-level advisory lock on every run of the
  batch, in one statement and in key order (two replicas never deadlock);
- WatchDecisions' cursor (`decisions.seq`) is assigned under one more advisory
  lock, held until commit, so it grows in commit order;
- migrations run under an advisory lock, so replicas starting together do not race.

A batch costs a fixed number of round trips whatever its size: contexts are
read ahead in one statement, and rows go in as multi-row INSERTs (binary arrays
through `unnest`), all tables but one in one statement.

A thread checks a connection out of the pool for one transaction (or one read)
and checks it on checkout (a transaction's BEGIN doubles as the check): a
restarted database costs the calls made while it was down (StoreUnavailable)
and none after. Every connection speaks UTC.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed

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
)
from control_server.store.base import Decide, Store
from control_server.store.factory import redact_url
from control_server.store.rows import (
    check_record,
    dump_weights,
    labels_row,
    load_weights,
    shadow_summary_from,
)
from control_server.store.schema import (
    POSTGRES_MIGRATIONS,
    check_current,
    check_level,
    load_migrations,
)

logger = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]

#: libpq settings used unless the URL sets them: fail fast on a dead or vanished peer.
CONNECT_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "application_name": "control-server",
        "connect_timeout": "5",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "5000",
    }
)

#: Server-side bounds of every session, in seconds: a replica that stops inside a
#: transaction (SIGSTOP, a network partition) loses its session, and so its locks,
#: after `idle_in_transaction`; no call waits longer than `lock_wait` for another
#: replica's lock, or `statement` for one statement. Migrations lift the last two.
SESSION_TIMEOUTS: Mapping[str, float] = MappingProxyType(
    {"idle_in_transaction": 15.0, "lock_wait": 10.0, "statement": 30.0}
)
_SESSION_SETTINGS = {
    "idle_in_transaction": "idle_in_transaction_session_timeout",
    "lock_wait": "lock_timeout",
    "statement": "statement_timeout",
}

#: Seconds a call waits for a connection while the database is known to be down.
FAIL_FAST_S = 0.1

# Advisory locks of the two-int4 key space (runs use the one-int8 space, apart).
_LOCK_CLASS = 0x7443  # "tC"
_MIGRATION_LOCK = 1
_SEQUENCE_LOCK = 2
_POLICY_LOCK = 3


# Column lists shared by the queries and the row mappers (order matters), with the
# array types `unnest` needs for batch inserts.
_LABELS = "dataset, configuration, fold, trainer, plans, host"
_DECISION = (
    "decision_id, run_id, epoch, action, source, reason, policy_version, decided_at, "
    "lr, loss_weights, intervention_index, override_id, previous_epoch"
)
_DECISION_TYPES = (
    "text text bigint text text text text timestamptz float8 text integer bigint bigint"
)
_REPORT = (
    "run_id, epoch, train_loss, val_loss, pseudo_dice, avg_gradient_norm, "
    f"intervention_count, current_lr, initial_lr, loss_weights, {_LABELS}"
)
_REPORT_TYPES = "text bigint float8 float8 float8 float8 integer float8 float8 text" + " text" * 6
_RUN = (
    f"run_id, {_LABELS}, first_seen, last_seen, last_epoch, report_count, "
    "intervention_count, current_lr"
)
_RUN_TYPES = "text" + " text" * 6 + " timestamptz timestamptz bigint integer integer float8"
_OVERRIDE = "id, run_id, actor, reason, lr, weights, hold, once, created_at, cleared_at, cleared_by"
_PIN = "dataset, configuration, fold, version, pinned_at, actor"
_POLICY = "version, name, document, created_at"
_N_DECISION = 13
_N_REPORT = 16
_N_RUN = 13
# A run's summary fields that follow its newest epoch (a late, older report leaves them).
_FOLLOW_NEWEST = (*_LABELS.split(", "), "intervention_count", "current_lr")


def _names(columns: str) -> list[str]:
    return [c.strip() for c in columns.split(",")]


def _qualified(alias: str, columns: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in _names(columns))


def _unnest(columns: str, types: str, *, join: str = "") -> str:
    """`SELECT columns FROM unnest(%b::type[], ...)` in array order: one row per element
    (cross-joined with `join`, a one-row CTE, when given).

    Arrays go in binary (%b): text arrays cost a regex escape per element client-side."""
    names = _names(columns)
    arrays = ", ".join(f"%b::{t}[]" for t in types.split())
    if len(names) != len(types.split()):  # pragma: no cover - a programming error
        raise AssertionError(f"{len(names)} columns but {len(types.split())} types")
    return (
        f"SELECT {', '.join(f'u.{n}' for n in names)} FROM unnest({arrays}) WITH ORDINALITY "
        f"AS u({', '.join(names)}, ord)" + (f" CROSS JOIN {join}" if join else "") + " ORDER BY ord"
    )


_LOCK_RUNS = (
    # Key order, so that two transactions locking overlapping runs never deadlock
    # (since 9.6 volatile target-list functions run after the sort).
    "SELECT pg_advisory_xact_lock(k) FROM "
    "(SELECT DISTINCT hashtextextended(r, 0) AS k FROM unnest(%b::text[]) AS r) AS keys "
    "ORDER BY k"
)
# Seq numbers are drawn under an advisory lock held until commit, so that they grow
# in commit order; the CTE is joined, so the lock is taken before any row is formed.
_INSERT_DECISIONS = (
    "WITH seq_lock AS (SELECT pg_advisory_xact_lock(%s, %s)) "
    f"INSERT INTO decisions ({_DECISION}, state) "
    + _unnest(f"{_DECISION}, state", _DECISION_TYPES + " text", join="seq_lock")
    + " ON CONFLICT (run_id, epoch) DO NOTHING RETURNING decision_id"
)
_SELECT_STORED = (
    f"SELECT {_qualified('d', _DECISION)} FROM decisions AS d "
    "JOIN unnest(%b::text[], %b::bigint[]) AS k (run_id, epoch) "
    "ON d.run_id = k.run_id AND d.epoch = k.epoch"
)
# A `once` override is consumed by the decision that used it, if nobody beat it to it.
_CONSUME_OVERRIDES = (
    "UPDATE overrides AS o SET cleared_at = c.at, cleared_by = c.by "
    "FROM unnest(%b::bigint[], %b::timestamptz[], %b::text[]) AS c (id, at, by) "
    "WHERE o.id = c.id AND o.cleared_at IS NULL RETURNING o.id"
)
# The rest of a batch in ONE statement (data-modifying CTEs always run, once):
# decisions whose override was used up meanwhile go, shadows and reports come,
# run summaries are upserted. Empty arrays write nothing.
# SET expressions all see the old row, so the CASE compares with the old last_epoch.
_WRITE_REST = (
    "WITH lost AS (DELETE FROM decisions WHERE decision_id = ANY(%b::text[])), "
    f"shadows AS (INSERT INTO shadow_decisions ({_DECISION}, state) "
    + _unnest(f"{_DECISION}, state", _DECISION_TYPES + " text")
    + f"), reports AS (INSERT INTO reports ({_REPORT}) "
    + _unnest(_REPORT, _REPORT_TYPES)
    + f") INSERT INTO runs ({_RUN}) "
    + _unnest(_RUN, _RUN_TYPES)
    + " ON CONFLICT (run_id) DO UPDATE SET "
    + "".join(
        f"{c} = CASE WHEN excluded.last_epoch >= runs.last_epoch "
        f"THEN excluded.{c} ELSE runs.{c} END, "
        for c in _FOLLOW_NEWEST
    )
    + "first_seen = least(runs.first_seen, excluded.first_seen), "
    "last_seen = greatest(runs.last_seen, excluded.last_seen), "
    "last_epoch = greatest(runs.last_epoch, excluded.last_epoch), "
    "report_count = runs.report_count + 1"
)
# Everything deciding a batch needs, in ONE statement (one snapshot, one round trip):
# per (run, epoch, labels) key, in key order, the active and shadow versions, the
# version of the most specific pin matching the labels (ties: the most recently
# pinned), the run's active override (the latest uncleared one), and the decision at
# `epoch` (if stored) and the latest one before it, each with the shadow version and
# state stored beside it: 1 or 2 rows per key.
_SELECT_CONTEXTS = (
    f"SELECT k.ord, k.epoch, a.version, sp.version, pin.version, {_qualified('o', _OVERRIDE)}, "
    f"{_qualified('d', _DECISION)}, d.state, d.shadow_version, d.shadow_state "
    "FROM unnest(%b::text[], %b::bigint[], %b::boolean[], %b::text[], %b::text[], %b::text[]) "
    "WITH ORDINALITY AS k (run_id, epoch, pinned, dataset, configuration, fold, ord) "
    "LEFT JOIN active_policy AS a ON a.id = 1 "
    "LEFT JOIN shadow_policy AS sp ON sp.id = 1 "
    "LEFT JOIN LATERAL (SELECT p.version FROM policy_pins AS p WHERE k.pinned "
    "AND (p.dataset = '' OR p.dataset = k.dataset) "
    "AND (p.configuration = '' OR p.configuration = k.configuration) "
    "AND (p.fold = '' OR p.fold = k.fold) "
    "ORDER BY (p.dataset <> '')::int + (p.configuration <> '')::int + (p.fold <> '')::int "
    "DESC, p.pinned_at DESC, p.id DESC LIMIT 1) AS pin ON true "
    f"LEFT JOIN LATERAL (SELECT {_OVERRIDE} FROM overrides "
    "WHERE run_id = k.run_id AND cleared_at IS NULL ORDER BY id DESC LIMIT 1) AS o ON true "
    f"LEFT JOIN LATERAL (SELECT {_qualified('d', _DECISION)}, d.state, "
    "s.policy_version AS shadow_version, s.state AS shadow_state "
    "FROM decisions AS d LEFT JOIN shadow_decisions AS s "
    "ON s.run_id = d.run_id AND s.epoch = d.epoch "
    "WHERE d.run_id = k.run_id AND d.epoch <= k.epoch "
    "ORDER BY d.epoch DESC LIMIT 2) AS d ON true "
    "ORDER BY k.ord, d.epoch DESC"
)
_N_CONTEXT_HEAD = 5 + len(_names(_OVERRIDE))
_SELECT_RUNS = (
    f"SELECT {_qualified('r', _RUN)}, {_qualified('d', _DECISION)} FROM runs AS r "
    "LEFT JOIN decisions AS d ON d.run_id = r.run_id AND d.epoch = r.last_epoch"
)
_SELECT_PAIRS = (
    f"SELECT {_qualified('p', _REPORT)}, {_qualified('d', _DECISION)} FROM reports AS p "
    "JOIN decisions AS d ON d.run_id = p.run_id AND d.epoch = p.epoch "
    "WHERE p.run_id = %s ORDER BY p.epoch"
)
_BEGIN_WRITE = "BEGIN"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
_LATEST_SEQ = "SELECT coalesce(max(seq), 0) FROM decisions"
# Rows that would break a foreign key (should the constraints ever be bypassed) or a
# run summary's count: one statement, one snapshot.
_INTEGRITY = {
    "reports without a run": "SELECT count(*) FROM reports AS p "
    "WHERE NOT EXISTS (SELECT 1 FROM runs AS r WHERE r.run_id = p.run_id)",
    "decisions without a report": "SELECT count(*) FROM decisions AS d WHERE NOT EXISTS "
    "(SELECT 1 FROM reports AS p WHERE p.run_id = d.run_id AND p.epoch = d.epoch)",
    "shadow decisions without a decision": "SELECT count(*) FROM shadow_decisions AS s "
    "WHERE NOT EXISTS "
    "(SELECT 1 FROM decisions AS d WHERE d.run_id = s.run_id AND d.epoch = s.epoch)",
    "runs whose report_count is off": "SELECT count(*) FROM runs AS r WHERE r.report_count "
    "<> (SELECT count(*) FROM reports AS p WHERE p.run_id = r.run_id)",
}


_ContextKey = tuple[str, int, RunLabels | None]


@dataclass
class _Transaction:
    """This thread's open transaction and the advisory locks it holds."""

    conn: Connection
    write: bool
    locked_runs: set[str] = field(default_factory=set)
    #: Contexts read ahead for a batch, each handed out once; a run's are dropped
    #: when the transaction writes decisions of that run.
    contexts: dict[_ContextKey, RunContext] = field(default_factory=dict)


class PostgresStore(Store):
    """`Store` on a PostgreSQL database (migrated on open), shared by any number of replicas.

    `timeout` bounds how long a call waits for a connection: a database that is
    down fails the first call after that long, with StoreUnavailable, and later
    ones within `FAIL_FAST_S` until a call succeeds again (reads run on the event
    loop: an outage must not stall it). `open_timeout` bounds the wait for the
    database at open. `session_timeouts` overrides entries of SESSION_TIMEOUTS.
    With `read_only` (replay) every transaction is read-only and the database must
    already be migrated.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 8,
        timeout: float = 1.0,
        open_timeout: float = 10.0,
        reconnect_timeout: float = 5.0,
        session_timeouts: Mapping[str, float] = SESSION_TIMEOUTS,
        migrations: Traversable = POSTGRES_MIGRATIONS,
        read_only: bool = False,
    ) -> None:
        if timeout <= 0 or open_timeout <= 0:
            raise ValueError(f"timeouts must be > 0 seconds, but got {timeout}, {open_timeout}.")
        unknown = set(session_timeouts) - set(_SESSION_SETTINGS)
        if unknown:
            raise ValueError(
                f"session_timeouts takes {sorted(_SESSION_SETTINGS)}, but got {sorted(unknown)}."
            )
        params: dict[str, Any] = {**CONNECT_DEFAULTS, **conninfo_to_dict(url)}
        self._name = redact_url(url)
        self._timeout = timeout
        self._max_size = max_size
        self._local = threading.local()
        self._closed = False
        self._failing = False
        # A pool that gives up reconnecting soon retries at the next call's request:
        # recovery after an outage then takes seconds, not the pool's long backoff.
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            make_conninfo("", **params),
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            configure=_session_setup({**SESSION_TIMEOUTS, **session_timeouts}, read_only),
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            name=f"control-store {self._name}",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=open_timeout)
            with self._pool.connection(timeout=open_timeout) as conn:
                if read_only:
                    self._level = _level(conn)
                    check_current(self._level, len(load_migrations(migrations)))
                else:
                    self._level = _migrate(conn, load_migrations(migrations))
        except BaseException as exc:
            self.close()
            if isinstance(exc, psycopg.Error):
                raise StoreUnavailable(f"postgresql store {self._name}: {exc}") from exc
            raise
        logger.info("opened postgresql store %s (schema %d)", self._name, self._level)

    # --- connections and transactions -------------------------------------------------

    def _checkout(self, first: str = "") -> Connection:
        """A working connection from the pool, on which `first` (BEGIN, or an empty
        query) succeeded: stale ones (a restarted database) are dropped and the next
        one tried, so that a restart costs no call made after it."""
        if self._closed:
            raise StoreUnavailable(f"postgresql store {self._name} is closed")
        # While the database is known to be down, the pool's background reconnection
        # hands out a connection as soon as there is one: do not wait long for it.
        timeout = FAIL_FAST_S if self._failing else self._timeout
        try:
            for _ in range(self._max_size + 1):
                conn = self._pool.getconn(timeout=timeout)
                try:
                    conn.execute(first)
                except psycopg.Error:
                    _rollback(conn)
                    self._pool.putconn(conn)  # broken: the pool discards and replaces it
                    if conn.broken:
                        continue
                    raise
                self._failing = False
                return conn
        except PoolClosed as exc:
            raise StoreUnavailable(f"postgresql store {self._name} is closed") from exc
        except psycopg.Error as exc:
            self._failing = True
            raise self._unavailable(exc) from exc
        self._failing = True
        raise StoreUnavailable(f"postgresql store {self._name}: no working connection")

    def _checkin(self, conn: Connection) -> None:
        try:
            self._pool.putconn(conn)
        except Exception:  # pragma: no cover - the pool closes what it cannot keep
            logger.warning("returning a connection to %s failed", self._name, exc_info=True)

    def _unavailable(self, exc: psycopg.Error) -> StoreUnavailable:
        return StoreUnavailable(f"postgresql store {self._name}: {exc}".strip())

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """psycopg errors become StoreUnavailable; domain errors pass through."""
        try:
            yield
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[_Transaction]:
        """One transaction on a checked-out connection: committed on success, rolled
        back on any error. Inside this thread's open transaction, it joins that one.

        Writes run at READ COMMITTED (each statement sees what committed before it,
        so a statement after an advisory lock sees the lock holder's writes); reads
        at REPEATABLE READ, READ ONLY (one snapshot for all their statements).
        """
        joined: _Transaction | None = getattr(self._local, "txn", None)
        if joined is not None:
            if write and not joined.write:  # pragma: no cover - a programming error
                raise RuntimeError("a write cannot join a read-only transaction")
            with self._errors():
                yield joined
            return
        conn = self._checkout(_BEGIN_WRITE if write else _BEGIN_READ)
        txn = _Transaction(conn, write)
        self._local.txn = txn
        try:
            with self._errors():
                yield txn
                conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        finally:
            self._local.txn = None
            self._checkin(conn)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for a one-statement read: this thread's transaction if it has
        one, else a checked-out connection in autocommit (no BEGIN/COMMIT round trips)."""
        joined: _Transaction | None = getattr(self._local, "txn", None)
        if joined is not None:
            with self._errors():
                yield joined.conn
            return
        conn = self._checkout()
        try:
            with self._errors():
                yield conn
        finally:
            self._checkin(conn)

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        with self._transaction(write=True):
            yield

    def close(self) -> None:
        """Close the pool; later calls raise StoreUnavailable."""
        self._closed = True
        self._pool.close()

    # --- decisions --------------------------------------------------------------------

    def decide_and_record(
        self, reports: Sequence[Report], decide: Decide
    ) -> list[Decision | Exception]:
        """As `Store.decide_and_record`, with every run of the batch locked first (one
        statement, key order), so that replicas serialise per run and never deadlock,
        and every report's context read ahead in one statement."""
        with self._transaction(write=True) as txn:
            keys = [(r.run_id, r.epoch, r.labels) for r in reports]
            with self._errors():
                # Two statements: the read's snapshot must come after the locks.
                self._lock_runs(txn, [r.run_id for r in reports])
                cursor = txn.conn.execute(_SELECT_CONTEXTS, _context_params(keys))
            txn.contexts.update(
                zip(keys, _contexts_from(cursor.fetchall(), len(keys)), strict=True)
            )
            try:
                return super().decide_and_record(reports, decide)
            finally:
                txn.contexts.clear()

    def _lock_runs(self, txn: _Transaction, run_ids: Iterable[str]) -> None:
        new = sorted(set(run_ids) - txn.locked_runs)
        if new:
            txn.conn.execute(_LOCK_RUNS, (new,))
            txn.locked_runs.update(new)

    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision | None]:
        for record in records:
            check_record(record)
        if not records:
            return []
        results: list[Decision | None] = []
        with self._transaction(write=True) as txn:
            written = {r.report.run_id for r in records}
            for key in [k for k in txn.contexts if k[0] in written]:
                del txn.contexts[key]
            for segment in _segments(records):
                results.extend(_record_segment(txn.conn, segment))
        return results

    def load_context(self, run_id: str, epoch: int, labels: RunLabels | None = None) -> RunContext:
        key = (run_id, epoch, labels)
        joined: _Transaction | None = getattr(self._local, "txn", None)
        if joined is not None and joined.write:
            ahead = joined.contexts.pop(key, None)
            if ahead is not None:
                return ahead
            # Read-decide-write: the run's lock first; the read below then sees what
            # any replica committed for the run before it.
            with self._errors():
                self._lock_runs(joined, [run_id])
        with self._read() as conn:
            rows = conn.execute(_SELECT_CONTEXTS, _context_params([key])).fetchall()
        [context] = _contexts_from(rows, 1)
        return context

    def latest_decision_seq(self) -> int:
        with self._read() as conn:
            row = conn.execute(_LATEST_SEQ).fetchone()
        return int(row[0]) if row is not None else 0

    def decisions_after(
        self, cursor: int, decision_filter: DecisionFilter, limit: int
    ) -> DecisionPage:
        where, params = _decision_where(replace(decision_filter, since=None, until=None))
        # One statement, one snapshot: the page and the latest seq it was cut from.
        sql = (
            "WITH latest AS (SELECT coalesce(max(seq), 0) AS seq FROM decisions) "
            "SELECT latest.seq, page.* FROM latest LEFT JOIN LATERAL "
            f"(SELECT seq AS page_seq, {_DECISION} FROM decisions WHERE seq > %s"
            + "".join(f" AND {w}" for w in where)
            + " ORDER BY seq LIMIT %s) AS page ON true"
        )
        limit = max(limit, 1)
        with self._read() as conn:
            rows = conn.execute(sql, (cursor, *params, limit)).fetchall()
        latest = int(rows[0][0])
        page = [row[1:] for row in rows if row[1] is not None]
        # A short page: nothing else matching was committed up to `latest`.
        next_cursor = max(cursor, latest) if len(page) < limit else int(page[-1][0])
        return DecisionPage(tuple(_decision_from(r[1:]) for r in page), next_cursor)

    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        where, params = _decision_where(decision_filter)
        sql = f"SELECT {_DECISION} FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY decided_at, seq LIMIT %s"
        limit = decision_filter.limit if decision_filter.limit > 0 else None
        with self._read() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [_decision_from(r) for r in rows]

    def shadow_decisions(self, run_id: str) -> list[Decision]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_DECISION} FROM shadow_decisions WHERE run_id = %s ORDER BY epoch",
                (run_id,),
            ).fetchall()
        return [_decision_from(r) for r in rows]

    def shadow_summary(self, version: str) -> ShadowSummary:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT d.action, s.action, (s.action <> d.action "
                "OR s.lr IS DISTINCT FROM d.lr OR s.loss_weights <> d.loss_weights), "
                "count(*) FROM shadow_decisions AS s JOIN decisions AS d "
                "ON d.run_id = s.run_id AND d.epoch = s.epoch "
                "WHERE s.policy_version = %s GROUP BY 1, 2, 3",
                (version,),
            ).fetchall()
        return shadow_summary_from(version, rows)

    # --- overrides --------------------------------------------------------------------

    def set_override(self, override: Override) -> Override:
        if override.created_at is None:
            raise ValueError("set_override needs an override with created_at set")
        created_at = _aware(override.created_at)
        with self._transaction(write=True) as txn:
            # Serialised with the run's decisions and its other overrides.
            self._lock_runs(txn, [override.run_id])
            row = txn.conn.execute(
                "INSERT INTO overrides (run_id, actor, reason, lr, weights, hold, once, "
                "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {_OVERRIDE}",
                (
                    override.run_id,
                    override.actor,
                    override.reason,
                    override.lr,
                    dump_weights(override.loss_weights),
                    override.hold_interventions,
                    override.once,
                    created_at,
                ),
            ).fetchone()
            assert row is not None
            new_id = row[0]
            txn.conn.execute(
                "UPDATE overrides SET cleared_at = %s, cleared_by = %s "
                "WHERE run_id = %s AND cleared_at IS NULL AND id <> %s",
                (created_at, f"replaced by override {new_id}", override.run_id, new_id),
            )
        return _override_from(row)

    def clear_override(self, run_id: str, actor: str, at: datetime) -> Override | None:
        with self._transaction(write=True) as txn:
            self._lock_runs(txn, [run_id])
            rows = txn.conn.execute(
                "UPDATE overrides SET cleared_at = %s, cleared_by = %s "
                f"WHERE run_id = %s AND cleared_at IS NULL RETURNING {_OVERRIDE}",
                (_aware(at), actor, run_id),
            ).fetchall()
        if not rows:
            return None
        return _override_from(max(rows, key=lambda r: int(r[0])))

    def list_overrides(self, run_id: str = "", *, include_cleared: bool = False) -> list[Override]:
        where: list[str] = []
        params: list[Any] = []
        if run_id:
            where.append("run_id = %s")
            params.append(run_id)
        if not include_cleared:
            where.append("cleared_at IS NULL")
        sql = f"SELECT {_OVERRIDE} FROM overrides"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return [_override_from(r) for r in rows]

    # --- policies ---------------------------------------------------------------------

    def put_policy(self, policy: PolicyVersion) -> PolicyVersion:
        with self._transaction(write=True) as txn:
            txn.conn.execute(
                f"INSERT INTO policies ({_POLICY}) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (version) DO NOTHING",
                (
                    policy.version,
                    _text(policy.name),
                    json.dumps(policy.document, sort_keys=True),
                    _aware(policy.created_at),
                ),
            )
            # A new statement, a new snapshot: sees a concurrent replica's insert too.
            row = txn.conn.execute(
                f"SELECT {_POLICY} FROM policies WHERE version = %s", (policy.version,)
            ).fetchone()
        assert row is not None
        return _policy_from(row)

    def get_policy(self, version: str) -> PolicyVersion | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_POLICY} FROM policies WHERE version = %s", (version,)
            ).fetchone()
        return _policy_from(row) if row is not None else None

    def list_policies(self) -> list[PolicyVersion]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_POLICY} FROM policies ORDER BY created_at, seq")
            return [_policy_from(row) for row in rows.fetchall()]

    def activate_policy(self, version: str, actor: str) -> None:
        now = datetime.now(UTC)
        with self._transaction(write=True) as txn:
            conn = txn.conn
            # One activation at a time, so that each event names the true previous one.
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _POLICY_LOCK))
            _require_policy(conn, version)
            row = conn.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
            conn.execute(
                "INSERT INTO active_policy (id, version, activated_at, actor) "
                "VALUES (1, %s, %s, %s) "
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
        with self._read() as conn:
            row = conn.execute("SELECT version FROM active_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def set_shadow_policy(self, version: str | None, actor: str, at: datetime) -> None:
        with self._transaction(write=True) as txn:
            if version is None:
                txn.conn.execute("DELETE FROM shadow_policy")
                return
            _require_policy(txn.conn, version)
            txn.conn.execute(
                "INSERT INTO shadow_policy (id, version, set_at, actor) VALUES (1, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
                "set_at = excluded.set_at, actor = excluded.actor",
                (version, _aware(at), actor),
            )

    def shadow_policy(self) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT version FROM shadow_policy WHERE id = 1").fetchone()
        return str(row[0]) if row is not None else None

    def pin_policy(self, pin: PolicyPin) -> PolicyPin:
        s = pin.selector
        with self._transaction(write=True) as txn:
            _require_policy(txn.conn, pin.version)
            row = txn.conn.execute(
                f"INSERT INTO policy_pins ({_PIN}) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (dataset, configuration, fold) DO UPDATE SET "
                "version = excluded.version, pinned_at = excluded.pinned_at, "
                f"actor = excluded.actor RETURNING {_PIN}",
                (s.dataset, s.configuration, s.fold, pin.version, _aware(pin.pinned_at), pin.actor),
            ).fetchone()
        assert row is not None
        return _pin_from(row)

    def unpin_policy(self, selector: RunSelector) -> bool:
        with self._transaction(write=True) as txn:
            cursor = txn.conn.execute(
                "DELETE FROM policy_pins WHERE dataset = %s AND configuration = %s AND fold = %s",
                (selector.dataset, selector.configuration, selector.fold),
            )
            return cursor.rowcount == 1

    def list_pins(self) -> list[PolicyPin]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_PIN} FROM policy_pins ORDER BY pinned_at, id")
            return [_pin_from(r) for r in rows.fetchall()]

    # --- runs -------------------------------------------------------------------------

    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        """Runs matching the filter, most recently active first; limit <= 0 means no limit."""
        where: list[str] = []
        params: list[Any] = []
        for column in ("dataset", "configuration", "fold"):
            value = getattr(run_filter, column)
            if value:
                where.append(f"r.{column} = %s")
                params.append(value)
        sql = _SELECT_RUNS
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.last_seen DESC, r.run_id LIMIT %s"
        params.append(run_filter.limit if run_filter.limit > 0 else None)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_summary_from(row) for row in rows]

    def get_run(self, run_id: str) -> tuple[RunSummary, list[tuple[Report, Decision]]] | None:
        with self._transaction() as txn:
            row = txn.conn.execute(_SELECT_RUNS + " WHERE r.run_id = %s", (run_id,)).fetchone()
            if row is None:
                return None
            pairs = txn.conn.execute(_SELECT_PAIRS, (run_id,)).fetchall()
        return _summary_from(row), [
            (_report_from(p[:_N_REPORT]), _decision_from(p[_N_REPORT:])) for p in pairs
        ]

    def run_ids(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()
        return [str(row[0]) for row in rows]

    # --- audit and maintenance --------------------------------------------------------

    def record_admin_event(
        self, actor: str, action: str, target: str, details: dict[str, Any], result: str
    ) -> None:
        with self._transaction(write=True) as txn:
            _insert_admin_event(txn.conn, datetime.now(UTC), actor, action, target, details, result)

    def admin_events(self) -> list[dict[str, Any]]:
        with self._read() as conn:
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
        with self._read() as conn:
            return _level(conn)

    def setting_warnings(self) -> list[str]:
        """Autovacuum off: every decision updates its run's row, so without vacuuming
        the runs table fills with dead row versions and each report gets slower (seen
        here: p50 at one report in flight 4.5 ms on a fresh database, 10-12 ms after
        100,000 decisions; 4.2 ms again after a VACUUM)."""
        with self._read() as conn:
            row = conn.execute("SHOW autovacuum").fetchone()
        if row is not None and row[0] == "off":
            return [
                f"postgresql store {self._name}: autovacuum is off; every decision updates "
                "its run's row, so the runs table bloats and reports get slower: turn "
                "autovacuum on or VACUUM the database regularly"
            ]
        return []

    def check_integrity(self) -> None:
        """Raise StoreUnavailable when rows dangle or a run summary miscounts its reports
        (PostgreSQL checks its own pages; these are the store's invariants)."""
        sql = "SELECT " + ", ".join(f"({q})" for q in _INTEGRITY.values())
        with self._read() as conn:
            row = conn.execute(sql).fetchone()
        assert row is not None
        problems = [f"{n} {what}" for what, n in zip(_INTEGRITY, row, strict=True) if n]
        if problems:
            raise StoreUnavailable(
                f"postgresql store {self._name} failed its integrity check: " + "; ".join(problems)
            )


# --- batch reads and writes ---------------------------------------------------------------


def _context_params(keys: Sequence[_ContextKey]) -> tuple[list[Any], ...]:
    """The arrays of `_SELECT_CONTEXTS` (no labels: no pin applies)."""
    no_labels = RunLabels()
    return (
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] is not None for k in keys],
        [(k[2] or no_labels).dataset for k in keys],
        [(k[2] or no_labels).configuration for k in keys],
        [(k[2] or no_labels).fold for k in keys],
    )


def _contexts_from(rows: Sequence[Sequence[Any]], count: int) -> list[RunContext]:
    """One RunContext per key from `_SELECT_CONTEXTS` rows (grouped by key, in order)."""
    groups: list[list[Sequence[Any]]] = [[] for _ in range(count)]
    for row in rows:
        groups[row[0] - 1].append(row)
    return [_context_from(group) for group in groups]


def _context_from(rows: Sequence[Sequence[Any]]) -> RunContext:
    """One key's rows: (ord, epoch, active, shadow, pinned, override..., decision...)."""
    head = rows[0][:_N_CONTEXT_HEAD]
    epoch, active, shadow, pinned = head[1], head[2], head[3], head[4]
    override = _override_from(head[5:]) if head[5] is not None else None
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
    return RunContext(
        existing=existing,
        previous_state=previous_state,
        previous_epoch=previous_epoch,
        active_policy=active,
        override=override,
        pinned_policy=pinned,
        shadow_policy=shadow,
        previous_shadow_state=previous_shadow_state,
    )


# --- batch writes -----------------------------------------------------------------------


def _segments(records: Sequence[DecisionRecord]) -> Iterator[list[DecisionRecord]]:
    """Consecutive slices in which no run and no consumed override repeats.

    Within a slice the multi-row statements below mean exactly what writing the
    records one by one would; slices are written in order, in the same transaction.
    """
    segment: list[DecisionRecord] = []
    runs: set[str] = set()
    overrides: set[int] = set()
    for record in records:
        claimed = record.consumed_override
        if record.report.run_id in runs or (claimed is not None and claimed in overrides):
            yield segment
            segment, runs, overrides = [], set(), set()
        segment.append(record)
        runs.add(record.report.run_id)
        if claimed is not None:
            overrides.add(claimed)
    if segment:
        yield segment


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to one list per column (the arrays `unnest` takes); no rows, empty lists."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _record_segment(conn: Connection, records: list[DecisionRecord]) -> list[Decision | None]:
    """Write one slice (see `_segments`): two statements, and two more only when a
    record is a duplicate or consumes an override.

    No pipeline mode here: libpq ends a pipeline with a Flush, after which the server
    no longer arms idle_in_transaction_session_timeout until the next statement, and
    a replica stopped right then would hold its locks for good."""
    rows = [(*_decision_row(r.decision), r.state) for r in records]
    insert = conn.execute(
        _INSERT_DECISIONS, (_LOCK_CLASS, _SEQUENCE_LOCK, *_columns(rows, _N_DECISION + 1))
    )
    inserted = {row[0] for row in insert.fetchall()}
    new = [r for r in records if r.decision.decision_id in inserted]
    lost: set[str] = set()
    claims = [r for r in new if r.consumed_override is not None]
    if claims:
        consumed = conn.execute(
            _CONSUME_OVERRIDES,
            (
                [r.consumed_override for r in claims],
                [_aware(r.decision.decided_at) for r in claims],
                [f"consumed by epoch {r.decision.epoch}" for r in claims],
            ),
        ).fetchall()
        # Used up or cleared meanwhile: these decisions must not stand.
        still = {row[0] for row in consumed}
        lost = {r.decision.decision_id for r in claims if r.consumed_override not in still}
    stored: dict[tuple[str, int], Decision] = {}
    duplicates = [r for r in records if r.decision.decision_id not in inserted]
    if duplicates:
        for row in conn.execute(
            _SELECT_STORED,
            ([r.decision.run_id for r in duplicates], [r.decision.epoch for r in duplicates]),
        ).fetchall():
            decision = _decision_from(row)
            stored[(decision.run_id, decision.epoch)] = decision
    winners = [r for r in new if r.decision.decision_id not in lost]
    shadows = [(*_decision_row(r.shadow), r.shadow_state) for r in winners if r.shadow is not None]
    runs = [_run_row(r.report, _aware(r.decision.decided_at)) for r in winners]
    if winners or lost:
        conn.execute(
            _WRITE_REST,
            (
                sorted(lost),
                *_columns(shadows, _N_DECISION + 1),
                *_columns([_report_row(r.report) for r in winners], _N_REPORT),
                *_columns(runs, _N_RUN),
            ),
        )
    results: list[Decision | None] = []
    for record in records:
        decision = record.decision
        if decision.decision_id in inserted:
            results.append(None if decision.decision_id in lost else decision)
            continue
        found = stored.get((decision.run_id, decision.epoch))
        if found is None:  # pragma: no cover - the conflict guarantees the row
            raise StoreUnavailable(
                f"decision ({decision.run_id!r}, {decision.epoch}) conflicted but cannot be read"
            )
        results.append(found)
    return results


# --- migrations -------------------------------------------------------------------------


def _migrate(conn: Connection, migrations: list[tuple[str, str]]) -> int:
    """Apply the migrations the database lacks, one transaction each, under an advisory
    lock (replicas starting together wait for each other); return the level."""
    known = len(migrations)
    while True:
        with conn.transaction():
            # Another replica's migration may take long, and so may this one.
            conn.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _MIGRATION_LOCK))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            level = _level(conn)
            check_level(level, known)
            if level == known:
                return level
            name, sql = migrations[level]
            conn.execute(sql.encode(), prepare=False)  # a script: several statements
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, now())",
                (level + 1, name),
            )
            logger.info("applied migration %s", name)


def _level(conn: Connection) -> int:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if exists is None or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row is not None else 0


def _session_setup(
    timeouts: Mapping[str, float], read_only: bool = False
) -> Callable[[Connection], None]:
    """The pool's `configure`: every connection speaks UTC (timestamps come back in UTC),
    bounds its waits (see SESSION_TIMEOUTS) and, `read_only`, writes nothing."""
    sql = (
        "SET TIME ZONE 'UTC'; "
        + "".join(f"SET {_SESSION_SETTINGS[k]} = {int(v * 1000)}; " for k, v in timeouts.items())
        + ("SET default_transaction_read_only = on; " if read_only else "")
    ).encode()

    def configure(conn: Connection) -> None:
        conn.execute(sql)

    return configure


def _rollback(conn: Connection) -> None:
    """Roll back an open transaction; a broken connection has none left to roll back."""
    if conn.closed or conn.broken or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        logger.warning("rollback failed", exc_info=True)


# --- row mapping ------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    """Naive datetimes are UTC (as on SQLite)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _dt(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; an audited or named string keeps the rest."""
    return value.replace("\x00", "\ufffd")


def _decision_row(d: Decision) -> tuple[Any, ...]:
    return (
        d.decision_id,
        d.run_id,
        d.epoch,
        d.action.value,
        d.source.value,
        d.reason,
        d.policy_version,
        _aware(d.decided_at),
        d.lr,
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
        lr=row[8],
        loss_weights=load_weights(row[9]),
        intervention_index=row[10],
        override_id=row[11],
        previous_epoch=row[12],
    )


def _report_row(r: Report) -> tuple[Any, ...]:
    return (
        r.run_id,
        r.epoch,
        r.train_loss,
        r.val_loss,
        r.pseudo_dice,
        r.avg_gradient_norm,
        r.intervention_count,
        r.current_lr,
        r.initial_lr,
        dump_weights(r.loss_weights),
        *labels_row(r.labels),
    )


def _report_from(row: Sequence[Any]) -> Report:
    return Report(
        run_id=row[0],
        epoch=row[1],
        train_loss=row[2],
        val_loss=row[3],
        pseudo_dice=row[4],
        avg_gradient_norm=row[5],
        intervention_count=row[6],
        current_lr=row[7],
        initial_lr=row[8],
        loss_weights=load_weights(row[9]),
        labels=RunLabels(*row[10:16]),
    )


def _run_row(report: Report, seen: datetime) -> tuple[Any, ...]:
    return (
        report.run_id,
        *labels_row(report.labels),
        seen,
        seen,
        report.epoch,
        1,
        report.intervention_count,
        report.current_lr,
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
        current_lr=row[12],
        last_decision=_decision_from(last) if last[0] is not None else None,
    )


def _override_from(row: Sequence[Any]) -> Override:
    return Override(
        override_id=row[0],
        run_id=row[1],
        actor=row[2],
        reason=row[3],
        lr=row[4],
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


def _policy_from(row: Sequence[Any]) -> PolicyVersion:
    return PolicyVersion(
        version=row[0], name=row[1], document=json.loads(row[2]), created_at=_dt(row[3])
    )


def _require_policy(conn: Connection, version: str) -> None:
    if conn.execute("SELECT 1 FROM policies WHERE version = %s", (version,)).fetchone() is None:
        raise NotFound(f"policy version {version!r} is not stored")


def _decision_where(f: DecisionFilter) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their parameters) of a decision filter, limit aside."""
    where: list[str] = []
    params: list[Any] = []
    for condition, value in (
        ("run_id = %s", f.run_id or None),
        ("action = %s", f.action.value if f.action is not None else None),
        ("source = %s", f.source.value if f.source is not None else None),
        ("decided_at >= %s", _aware(f.since) if f.since is not None else None),
        ("decided_at < %s", _aware(f.until) if f.until is not None else None),
    ):
        if value is not None:
            where.append(condition)
            params.append(value)
    return where, params


def _insert_admin_event(
    conn: Connection,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any],
    result: str,
) -> None:
    conn.execute(
        "INSERT INTO admin_events (at, actor, action, target, details, result) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (
            at,
            _text(actor),
            _text(action),
            _text(target),
            json.dumps(details, sort_keys=True, default=str),
            _text(result),
        ),
    )
