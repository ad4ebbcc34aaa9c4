"""The SQLite backend: one file, WAL, `synchronous=FULL`, one connection per thread.

Several server processes may share the file: writes take the write lock up
front (`BEGIN IMMEDIATE`) and wait out each other through `busy_timeout`.
Every SQL statement not written here is `SqlStore`'s; values are stored as the
codec below says (ISO-8601 UTC text timestamps, a NaN as the text 'NaN').
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from control_server.domain import (
    Decision,
    DecisionFilter,
    DecisionPage,
    DecisionRecord,
    Override,
    RunContext,
    RunLabels,
    StoreUnavailable,
)
from control_server.store.context_cache import ContextCache
from control_server.store.rows import (
    DECISION,
    OVERRIDE,
    REPORT,
    RUN,
    check_record,
    codec,
    insert,
    qualified,
    upsert_run,
)
from control_server.store.schema import SQLITE_MIGRATIONS, check_current, load_migrations
from control_server.store.sql import SqlStore

logger = logging.getLogger(__name__)

#: The numbered migration files shipped with the package.
MIGRATIONS: Traversable = SQLITE_MIGRATIONS


def _ts(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text, so that text order is time order (naive = UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _real(value: float | None) -> float | str | None:
    """SQLite stores a bound NaN as NULL; keep it as the text 'NaN' instead."""
    if value is not None and math.isnan(value):
        return "NaN"
    return value


CODEC = codec(time=_ts, dt=datetime.fromisoformat, real=_real, number=float, flag=int)
_decision_row = CODEC.decision_row
_decision_from = CODEC.decision_from
_report_row = CODEC.report_row
_run_row = CODEC.run_row
_context_from = CODEC.context_from


_INSERT_DECISION = (
    insert("decisions", f"{DECISION}, state, chain") + " ON CONFLICT (run_id, epoch) DO NOTHING"
)
_INSERT_REPORT = insert("reports", REPORT)
_UPSERT_RUN = insert("runs", RUN) + " " + upsert_run("min", "max")
_INSERT_SHADOW = insert("shadow_decisions", f"{DECISION}, state")
# A `once` override is consumed by the decision that used it, if nobody beat it to it.
_CONSUME_OVERRIDE = (
    "UPDATE overrides SET cleared_at = ?, cleared_by = ? WHERE id = ? AND cleared_at IS NULL"
)
_SELECT_DECISION = f"SELECT {DECISION} FROM decisions WHERE run_id = ? AND epoch = ?"
# Everything load_context needs in ONE statement (atomic without BEGIN/COMMIT; on the
# report hot path each statement costs more than the lookups in it):
# - the run's newest stored epoch and latest attempt, the active, shadow and pinned
#   versions, its experiment arm's version and the run's latest uncleared override
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
    "SELECT r.last_epoch, "
    "a.version, sp.version, pin.version, r.attempt, r.last_epoch, ea.policy_version, "
    f"{qualified('o', OVERRIDE)}, d.* FROM (SELECT 1) AS one "
    "LEFT JOIN runs AS r ON r.run_id = ? "
    "LEFT JOIN experiment_assignments AS ea ON ea.run_id = r.run_id "
    "LEFT JOIN active_policy AS a ON a.id = 1 "
    "LEFT JOIN shadow_policy AS sp ON sp.id = 1 "
    f"LEFT JOIN policy_pins AS pin ON pin.id = ({_BEST_PIN}) "
    "LEFT JOIN overrides AS o ON o.id = "
    "(SELECT max(id) FROM overrides WHERE run_id = ? AND cleared_at IS NULL) "
    f"LEFT JOIN (SELECT {qualified('d', DECISION)}, d.state, s.policy_version, s.state, d.chain "
    "FROM decisions AS d LEFT JOIN shadow_decisions AS s "
    "ON s.run_id = d.run_id AND s.epoch = d.epoch "
    "WHERE d.run_id = ? AND d.epoch <= ? ORDER BY d.epoch DESC LIMIT 2) AS d ON 1"
)


class SqliteStore(SqlStore[sqlite3.Connection]):
    """`Store` on one SQLite file (created and migrated on open).

    With ``read_only=True`` (replay) it opens an existing, migrated file without
    ever writing it, also on a read-only volume; every write raises
    StoreUnavailable. With ``remember_contexts`` (the decider's store) each
    connection remembers the runs' next contexts between batches (ContextCache).
    With ``create=False`` a missing file is an error instead of a new, empty store.

    A writable store remembers which file it opened (device and inode) and checks,
    before each write transaction (one stat), that the file at its path is still that
    one: a file deleted, or its directory, or replaced under a running server would
    otherwise go on taking writes that nobody can read back. It then answers
    StoreUnavailable until restarted.
    """

    codec = CODEC
    seq = "rowid"
    no_limit = -1
    distinct = "IS NOT"
    # A NaN is kept as the text 'NaN' (see _real); 9e999 reads as an infinity.
    nonfinite = "(typeof({0}) = 'text' OR {0} IN (9e999, -9e999))"
    schema_version_table = (
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        "name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        migrations: Traversable = MIGRATIONS,
        read_only: bool = False,
        remember_contexts: bool = False,
        create: bool = True,
    ) -> None:
        self._path = str(path)
        #: (st_dev, st_ino) of the file opened; None until opened, and for read-only stores.
        self._identity: tuple[int, int] | None = None
        self._remember = remember_contexts
        self._busy_timeout = busy_timeout
        self._read_only = read_only
        self._immutable = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        if (read_only or not create) and not Path(self._path).is_file():
            raise StoreUnavailable(f"sqlite store {self._path}: no such file")
        if not read_only:
            _require_writable(Path(self._path))
        try:
            conn = self._connection()
            if not read_only:
                self._identity = _file_identity(self._path)
            if read_only:
                self._level = self._read_level(conn)
                check_current(self._level, len(load_migrations(migrations)))
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreUnavailable(
                        f"sqlite store {self._path}: cannot use WAL (journal_mode={mode})"
                    )
                self._level = self._migrate(conn, load_migrations(migrations))
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
        # A new connection opens whatever file is at the path now (or creates one).
        self._check_identity()
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

    def _contexts(self) -> ContextCache | None:
        """This thread's (this connection's) remembered run contexts; None: none kept."""
        if not self._remember:
            return None
        cache: ContextCache | None = getattr(self._local, "contexts", None)
        if cache is None:
            cache = self._local.contexts = ContextCache()
        return cache

    @contextmanager
    def _transaction(
        self, *, write: bool = False, batch: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One transaction: commit on success, roll back on any error. Inside an
        open transaction of this thread (write_transaction), it joins that one.

        A write transaction that is not a `batch` (group_commit's, through
        write_transaction) makes this connection forget the contexts it remembers.
        sqlite3 errors become StoreUnavailable; domain errors pass through.
        """
        if write and self._read_only:
            raise StoreUnavailable(f"sqlite store {self._path} is open read-only")
        conn = self._connection()
        if conn.in_transaction:
            yield conn
            return
        if write:
            self._check_identity()
        cache = self._contexts() if write else None
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            if cache is not None:
                # Holding the write lock: nobody else commits until we do.
                cache.begin(conn.execute("PRAGMA data_version").fetchone()[0], batch=batch)
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)
            if cache is not None:
                cache.forget()
            if isinstance(exc, sqlite3.Error):
                raise _unavailable(self._path, exc) from exc
            raise
        finally:
            if cache is not None:
                cache.end()

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        with self._transaction(write=True, batch=True):
            yield

    def _check_identity(self) -> None:
        """Raise StoreUnavailable unless the file at the path is the one opened."""
        if self._identity is None:
            return  # read-only, or still opening: nothing to compare with yet
        try:
            now: tuple[int, int] | None = _file_identity(self._path)
        except OSError:
            now = None
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            raise StoreUnavailable(
                f"sqlite store {self._path}: the database file was {what} while the server "
                "was running; nothing more is recorded: restore the file (or its "
                "directory) and restart the server"
            )

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

    # --- the dialect (see SqlStore) -----------------------------------------------------

    def _reading(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction()

    def _writing(
        self, *, runs: Sequence[str] = (), activation: bool = False
    ) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(write=True)  # BEGIN IMMEDIATE serialises every writer

    def _insert_returning(
        self, s: sqlite3.Connection, sql: str, params: Sequence[Any], table: str, columns: str
    ) -> Any:
        rowid = s.execute(sql, params).lastrowid
        return s.execute(f"SELECT {columns} FROM {table} WHERE rowid = ?", (rowid,)).fetchone()

    def _read_level(self, s: sqlite3.Connection) -> int:
        exists = s.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if exists is None:
            return 0
        return int(s.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])

    @contextmanager
    def _exclusive(self, s: sqlite3.Connection) -> Iterator[None]:
        s.execute("BEGIN IMMEDIATE")
        try:
            yield
            s.execute("COMMIT")
        except BaseException:
            _rollback(s)
            raise

    def _apply(self, s: sqlite3.Connection, script: str) -> None:
        for statement in _statements(script):
            s.execute(statement)

    # --- the hot path: a batch's decisions and contexts ---------------------------------

    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision | None]:
        for record in records:
            check_record(record)
        if not records:
            return []
        results: list[Decision | None] = []
        reports: list[tuple[Any, ...]] = []
        runs: list[tuple[Any, ...]] = []
        new_runs: list[tuple[str, datetime]] = []
        cache = self._contexts()
        with self._transaction(write=True) as conn:
            for record in records:
                decision = record.decision
                decided_at = _ts(decision.decided_at)
                cursor = conn.execute(
                    _INSERT_DECISION,
                    (*_decision_row(decision, decided_at), record.state, record.chain),
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
                    if record.new_run:
                        new_runs.append((decision.run_id, decision.decided_at))
                    runs.append(_run_row(record.report, decided_at))
                    results.append(decision)
                    if cache is not None:
                        cache.recorded(record)
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
                self._register_runs(conn, new_runs)
        return results

    def load_context(self, run_id: str, epoch: int, labels: RunLabels | None = None) -> RunContext:
        cache = self._contexts()
        live = cache if cache is not None and cache.live else None
        if live is not None:
            remembered = live.lookup(run_id, epoch, labels)
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
        context = _context_from(rows, epoch, 1)
        newest = rows[0][0]
        if live is not None and (newest is None or epoch > newest):
            live.loaded[run_id] = (labels, context, epoch)
        return context

    # --- reads and writes whose SQL is SQLite's own -------------------------------------

    def decisions_after(
        self, cursor: int, decision_filter: DecisionFilter, limit: int
    ) -> DecisionPage:
        where, params = self._decision_where(replace(decision_filter, since=None, until=None))
        sql = f"SELECT rowid, {DECISION} FROM decisions WHERE rowid > ?"
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
                f"SELECT {OVERRIDE} FROM overrides WHERE id = ?", (row[0],)
            ).fetchone()
        return CODEC.override_from(cleared)

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


def _file_identity(path: str) -> tuple[int, int]:
    """(device, inode) of the file at `path` (OSError when there is none)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


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
