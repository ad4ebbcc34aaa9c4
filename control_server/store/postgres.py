"""The PostgreSQL backend: psycopg 3 and a connection pool, for replicas sharing one database.

Replicas agree through the database alone:

- idempotency per (run_id, epoch) is the decisions table's unique key;
- a batch's read-decide-write is serialised per run: before reading any context,
  `group_commit` takes a transaction-level advisory lock on every run of the
  batch, in one statement and in key order (two replicas never deadlock);
- WatchDecisions' cursor (`decisions.seq`) is assigned under one more advisory
  lock, held until commit, so it grows in commit order;
- migrations run under an advisory lock, so replicas starting together do not race.

A batch costs a fixed number of round trips whatever its size: contexts are
read ahead in one statement, and rows go in as multi-row INSERTs (binary arrays
through `unnest`), all tables but one in one statement (postgres_batch.py).
Every SQL statement not written here or there is `SqlStore`'s, whose `?`
placeholders a session translates for psycopg once per distinct query.

A thread checks a connection out of the pool for one transaction (or one read)
and checks it on checkout (a transaction's BEGIN doubles as the check): a
restarted database costs the calls made while it was down (StoreUnavailable)
and none after. Every connection speaks UTC.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed

from control_server.domain import (
    Decision,
    DecisionFilter,
    DecisionPage,
    DecisionRecord,
    Override,
    Report,
    RunContext,
    RunLabels,
    StoreUnavailable,
)
from control_server.redact import redact
from control_server.store.base import DecideReport
from control_server.store.postgres_batch import (
    CODEC,
    LOCK_CLASS,
    LOCK_RUNS,
    MIGRATION_LOCK,
    POLICY_LOCK,
    REGISTRY_LOCK,
    SELECT_CONTEXTS,
    Connection,
    ContextKey,
    aware,
    context_params,
    contexts_from,
    record_segment,
    segments,
)
from control_server.store.rows import DECISION, OVERRIDE, check_record
from control_server.store.schema import POSTGRES_MIGRATIONS, check_current, load_migrations
from control_server.store.sql import SqlStore

logger = logging.getLogger(__name__)

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

# What the server answers a connection it refuses for good (said at once at open); any
# other refusal (starting up, in recovery, too many clients) is waited out.
_NO_DATABASE = re.compile(r'FATAL:\s+database "(?P<db>[^"]*)" does not exist')
_FATAL = re.compile(r"FATAL:\s+(?P<why>.*)")
_TRANSIENT = re.compile(r"database system is|too many clients|connection slots", re.IGNORECASE)

_BEGIN_WRITE = "BEGIN"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
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


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """SqlStore's `?` SQL as psycopg takes it (once per distinct query)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Session:
    """A connection that takes SqlStore's SQL (`?` placeholders)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[tuple[Any, ...]]:
        return self.conn.execute(_placeholders(sql), params)


@dataclass
class _Transaction:
    """This thread's open transaction and the advisory locks it holds."""

    conn: Connection
    write: bool
    locked_runs: set[str] = field(default_factory=set)
    #: Contexts read ahead for a batch, each handed out once; a run's are dropped
    #: when the transaction writes decisions of that run.
    contexts: dict[ContextKey, RunContext] = field(default_factory=dict)


class PostgresStore(SqlStore[_Session]):
    """`Store` on a PostgreSQL database (migrated on open), shared by any number of replicas.

    `timeout` bounds how long a call waits for a connection: a database that is
    down fails the first call after that long, with StoreUnavailable, and later
    ones within `FAIL_FAST_S` until a call succeeds again (reads run on the event
    loop: an outage must not stall it). `open_timeout` bounds the wait for the
    database at open. `session_timeouts` overrides entries of SESSION_TIMEOUTS.
    With `read_only` (replay) every transaction is read-only and the database must
    already be migrated.
    """

    codec = CODEC
    seq = "seq"
    no_limit = None
    distinct = "IS DISTINCT FROM"
    # PostgreSQL's NaN equals NaN.
    nonfinite = "({0} IN ('NaN', 'Infinity', '-Infinity'))"
    schema_version_table = (
        "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL)"
    )

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
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ValueError(
                f"not a valid PostgreSQL URL {redact(url)!r}: {_one_line(exc)}"
            ) from None
        params: dict[str, Any] = {**CONNECT_DEFAULTS, **given}
        #: Masked wherever they would appear in a message (redact's patterns aside).
        self._secrets = tuple(str(given[k]) for k in ("password", "sslpassword") if given.get(k))
        self._name = redact(url, self._secrets)
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
            began = time.monotonic()
            self._refused_for_good(params)
            open_timeout = max(open_timeout - (time.monotonic() - began), FAIL_FAST_S)
            self._pool.open(wait=True, timeout=open_timeout)
            with self._pool.connection(timeout=open_timeout) as conn:
                if read_only:
                    self._level = self._read_level(_Session(conn))
                    check_current(self._level, len(load_migrations(migrations)))
                else:
                    self._level = self._migrate(_Session(conn), load_migrations(migrations))
        except BaseException as exc:
            self.close()
            if isinstance(exc, psycopg.Error):
                raise self._unavailable(exc) from exc
            raise
        logger.info("opened postgresql store %s (schema %d)", self._name, self._level)

    def _refused_for_good(self, params: Mapping[str, Any]) -> None:
        """One connection before the pool's: a database that refuses this server for
        good (no such database or role, a wrong password, no pg_hba.conf entry) is said
        at once, in one line, not after `open_timeout` of the pool's retries. One that
        is not up yet (refused, starting, in recovery) is left to the pool to wait for."""
        try:
            psycopg.connect(make_conninfo("", **params), autocommit=True).close()
        except psycopg.OperationalError as exc:
            text = str(exc)
            missing = _NO_DATABASE.search(text)
            if missing is not None:
                db = missing["db"]
                where = [
                    f"{flag} {shlex.quote(str(params[key]))}"
                    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user"))
                    if params.get(key)
                ]
                raise StoreUnavailable(
                    f'postgresql store {self._name}: database "{db}" does not exist; create '
                    f"it with: createdb {' '.join([*where, shlex.quote(db)])}"
                ) from None
            fatal = _FATAL.search(text)
            if fatal is not None and _TRANSIENT.search(fatal["why"]) is None:
                raise StoreUnavailable(
                    redact(f"postgresql store {self._name}: {fatal['why'].strip()}", self._secrets)
                ) from None

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
        """StoreUnavailable for a psycopg error: one line, every credential masked."""
        return StoreUnavailable(
            redact(f"postgresql store {self._name}: {_one_line(exc)}", self._secrets)
        )

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

    # --- the dialect (see SqlStore) -----------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[_Session]:
        with self._read() as conn:
            yield _Session(conn)

    @contextmanager
    def _snapshot(self) -> Iterator[_Session]:
        with self._transaction() as txn:
            yield _Session(txn.conn)

    @contextmanager
    def _writing(self, *, runs: Sequence[str] = (), activation: bool = False) -> Iterator[_Session]:
        """Override writes lock their runs (as a batch deciding them does); activations
        take one lock, so that each event names the true previous version."""
        with self._transaction(write=True) as txn:
            if activation:
                txn.conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, POLICY_LOCK))
            self._lock_runs(txn, runs)
            yield _Session(txn.conn)

    def _lock_registry(self, s: _Session) -> None:
        s.conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, REGISTRY_LOCK))

    def _insert_returning(
        self, s: _Session, sql: str, params: Sequence[Any], table: str, columns: str
    ) -> Any:
        return s.execute(f"{sql} RETURNING {columns}", params).fetchone()

    def _read_level(self, s: _Session) -> int:
        exists = s.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if exists is None or not exists[0]:
            return 0
        row = s.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        return int(row[0]) if row is not None else 0

    @contextmanager
    def _exclusive(self, s: _Session) -> Iterator[None]:
        """Under an advisory lock: replicas starting together wait for each other."""
        with s.conn.transaction():
            # Another replica's migration may take long, and so may this one.
            s.conn.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            s.conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
            yield

    def _apply(self, s: _Session, script: str) -> None:
        s.conn.execute(script.encode(), prepare=False)  # a script: several statements

    # --- decisions --------------------------------------------------------------------

    def group_commit(
        self, reports: Sequence[Report], decide_report: DecideReport
    ) -> list[Decision | Exception]:
        """As `Store.group_commit`, with every run of the batch locked first (one
        statement, key order), so that replicas serialise per run and never deadlock,
        and every report's context read ahead in one statement."""
        with self._transaction(write=True) as txn:
            keys = [(r.run_id, r.epoch, r.labels) for r in reports]
            with self._errors():
                # Two statements: the read's snapshot must come after the locks.
                self._lock_runs(txn, [r.run_id for r in reports])
                cursor = txn.conn.execute(SELECT_CONTEXTS, context_params(keys))
            txn.contexts.update(zip(keys, contexts_from(cursor.fetchall(), len(keys)), strict=True))
            try:
                return super().group_commit(reports, decide_report)
            finally:
                txn.contexts.clear()

    def _lock_runs(self, txn: _Transaction, run_ids: Iterable[str]) -> None:
        new = sorted(set(run_ids) - txn.locked_runs)
        if new:
            txn.conn.execute(LOCK_RUNS, (new,))
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
            for segment in segments(records):
                results.extend(record_segment(txn.conn, segment))
            self._register_runs(
                _Session(txn.conn),
                [
                    (r.report.run_id, r.decision.decided_at)
                    for r, stored in zip(records, results, strict=True)
                    if r.new_run and stored is r.decision
                ],
            )
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
            rows = conn.execute(SELECT_CONTEXTS, context_params([key])).fetchall()
        [context] = contexts_from(rows, 1)
        return context

    def decisions_after(
        self, cursor: int, decision_filter: DecisionFilter, limit: int
    ) -> DecisionPage:
        where, params = self._decision_where(replace(decision_filter, since=None, until=None))
        # One statement, one snapshot: the page and the latest seq it was cut from.
        sql = (
            "WITH latest AS (SELECT coalesce(max(seq), 0) AS seq FROM decisions) "
            "SELECT latest.seq, page.* FROM latest LEFT JOIN LATERAL "
            f"(SELECT seq AS page_seq, {DECISION} FROM decisions WHERE seq > ?"
            + "".join(f" AND {w}" for w in where)
            + " ORDER BY seq LIMIT ?) AS page ON true"
        )
        limit = max(limit, 1)
        with self._reading() as s:
            rows = s.execute(sql, (cursor, *params, limit)).fetchall()
        latest = int(rows[0][0])
        page = [row[1:] for row in rows if row[1] is not None]
        # A short page: nothing else matching was committed up to `latest`.
        next_cursor = max(cursor, latest) if len(page) < limit else int(page[-1][0])
        return DecisionPage(tuple(CODEC.decision_from(r[1:]) for r in page), next_cursor)

    def clear_override(self, run_id: str, actor: str, at: datetime) -> Override | None:
        with self._writing(runs=[run_id]) as s:
            rows = s.execute(
                "UPDATE overrides SET cleared_at = ?, cleared_by = ? "
                f"WHERE run_id = ? AND cleared_at IS NULL RETURNING {OVERRIDE}",
                (aware(at), actor, run_id),
            ).fetchall()
        if not rows:
            return None
        return CODEC.override_from(max(rows, key=lambda r: int(r[0])))

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


def _one_line(exc: BaseException) -> str:
    """An error's text on one line (libpq's spans several: the error, then hints)."""
    return " ".join(str(exc).split())


def _rollback(conn: Connection) -> None:
    """Roll back an open transaction; a broken connection has none left to roll back."""
    if conn.closed or conn.broken or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        logger.warning("rollback failed", exc_info=True)
