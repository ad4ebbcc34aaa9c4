"""PostgreSQL for tests: the system server, throwaway databases, private servers.

- `system_admin_url()`: the server tests share (``TC_TEST_POSTGRES_URL``, default
  ``postgresql://postgres@127.0.0.1:5432/test``), or skip with the reason; with
  ``CI=true`` the test fails instead, since CI must run them.
- `fresh_database(admin_url)`: a new, empty database on that server for the body
  of a ``with`` (``CREATE DATABASE tc_test_<random>``), dropped afterwards;
  `empty_tables(url)` empties one between tests (much faster than DDL there).
- `PrivatePostgres`: a server of its own (initdb + postgres in a temporary directory,
  on a free port) that a test may stop, restart or kill without disturbing others.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

#: The shared server's admin URL (a database to connect to for CREATE DATABASE).
SYSTEM_URL = os.environ.get("TC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: Where initdb and postgres live.
PG_BIN = Path(os.environ.get("TC_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: The system user a private server runs as when the tests run as root (initdb refuses root).
PG_USER = os.environ.get("TC_PG_USER", "postgres")


def in_ci() -> bool:
    """True when the CI environment says so (CI=true): PostgreSQL tests must run there."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test with `reason`, or fail it in CI."""
    if in_ci():
        pytest.fail(f"PostgreSQL is required when CI=true: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason} (set CI=true to make this an error)")


def system_admin_url() -> str:
    """The shared server's admin URL once it answers; otherwise skip (fail in CI)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[postgres]')")
    try:
        with psycopg.connect(SYSTEM_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        unavailable(f"cannot connect to {SYSTEM_URL}: {' '.join(str(exc).split())}")
    return SYSTEM_URL


def with_database(url: str, dbname: str) -> str:
    """`url` naming another database on the same server."""
    return urlsplit(url)._replace(path=f"/{dbname}").geturl()


def create_database(
    admin_url: str, *, template: str | None = None, prefix: str = "tc_test_"
) -> str:
    """Create an empty database (or a copy of `template`); return its URL."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(statement)
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database `url` names, closing whatever is still connected to it."""
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def empty_tables(url: str, *, keep: tuple[str, ...] = ("schema_version",)) -> None:
    """Delete every row of every table in the database but `keep`, referencing tables
    first: an emptied store without the DDL (TRUNCATE, CREATE DATABASE) that costs
    a checkpoint-sized fsync each on the shared server."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
            if r[0] not in keep
        ]
        edges = conn.execute(
            "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
            "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
        ).fetchall()
        order: list[str] = []
        pending = set(tables)
        while pending:
            # A table goes once nothing still pending references it.
            ready = sorted(
                t
                for t in pending
                if not any(dst == t and src in pending - {t} for src, dst in edges)
            )
            if not ready:
                raise RuntimeError(f"foreign keys form a cycle among {sorted(pending)}")
            order += ready
            pending -= set(ready)
        with conn.transaction():
            for table in order:
                conn.execute(
                    psycopg.sql.SQL("DELETE FROM {}").format(psycopg.sql.Identifier(table))
                )


@contextmanager
def fresh_database(admin_url: str, *, template: str | None = None) -> Iterator[str]:
    """A new database for the body of the ``with``; yields its URL, drops it after."""
    url = create_database(admin_url, template=template)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of one's own, for tests that stop, restart or kill it.

    ``with PrivatePostgres() as pg:`` runs initdb (trust auth, user ``postgres``)
    in a fresh temporary directory and starts the server on 127.0.0.1 and a free
    port (kept across restarts, so URLs stay valid); leaving the ``with`` stops it
    and removes the directory. As root, the server runs as `PG_USER`.

    `url` is the ``postgres`` database; `create_database()` makes another.
    `stop(mode)` stops it as ``pg_ctl stop -m smart|fast|immediate`` would; `kill()`
    sends SIGKILL to the postmaster (a crash: the next `start()` recovers);
    `restart()` is stop + start; `running()` tells. `settings` are extra
    ``-c name=value`` server settings. The postmaster is a child of this process
    (not daemonised by pg_ctl), so that a killed one is reaped at once.
    """

    def __init__(self, *, settings: Mapping[str, str] | None = None) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            unavailable("psycopg is not installed (pip install -e '.[postgres]')")
        if not (PG_BIN / "initdb").exists():
            unavailable(f"no PostgreSQL binaries in {PG_BIN} (set TC_PG_BIN)")
        self.settings = dict(settings or {})
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = PG_USER if os.geteuid() == 0 else None
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            if self._user is not None:
                shutil.chown(self.root, self._user)
            self._run(
                PG_BIN / "initdb",
                "-D",
                self.data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: Any, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(a) for a in argv],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(str(argv[0])).name} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                + self.log_tail()
            )
        return done.stdout

    def start(self) -> None:
        """Start the server (as a child of this process) and wait until it answers."""
        if self.running():
            return
        argv = [
            str(PG_BIN / "postgres"), "-D", str(self.data),
            "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.root}",
            *(a for k, v in self.settings.items() for a in ("-c", f"{k}={v}")),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, user=self._user, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._reap(timeout=10)
                raise RuntimeError("postgres did not start:\n" + self.log_tail())
            time.sleep(0.05)

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def _reap(self, timeout: float) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``smart`` waits for sessions, ``fast`` rolls them back,
        ``immediate`` skips the shutdown checkpoint (recovery at the next start)."""
        if not self.running():
            return
        assert self._proc is not None
        self._proc.send_signal(_STOP_SIGNALS[mode])
        self._reap(timeout=60)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; return once it and its backends are
        gone (they notice its death), so that `start()` can recover the data directory."""
        if not self.running():
            return
        assert self._proc is not None
        family = _children(self._proc.pid)
        self._proc.kill()
        self._reap(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.05)

    def pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def running(self) -> bool:
        return self.pid() is not None

    def create_database(self, name: str | None = None) -> str:
        """Create a database on this server; return its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"tc_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return with_database(self.url, name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server (immediately) and remove its directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
