"""Pick and open a store backend by URL."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

from control_server.store.base import Store
from control_server.store.sqlite import SqliteStore

logger = logging.getLogger(__name__)

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(url: str, *, read_only: bool = False, remember_contexts: bool = False) -> Store:
    """Open the store named by `url` (`read_only`: an existing, migrated one, never
    written; writes raise StoreUnavailable).

    `remember_contexts` is for the decider's store: a SQLite store then remembers
    each run's next context between `group_commit` batches (ContextCache);
    PostgreSQL reads every batch's contexts ahead instead and ignores it.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (as
    SQLAlchemy spells them) open or create a SQLite file, creating its parent
    directories. ``postgresql://user[:password]@host:port/db[?param=value]`` (or
    ``postgres://``, or ``postgresql+psycopg://``) opens a PostgreSQL database through
    a connection pool; libpq parameters such as ``sslmode`` go in the query string.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"store URL must look like scheme://..., but got {url!r}")
    backend = scheme.split("+", 1)[0].lower()
    if backend == "sqlite":
        return SqliteStore(
            _sqlite_path(url, rest, create=not read_only),
            read_only=read_only,
            remember_contexts=remember_contexts,
        )
    if backend in _POSTGRES_SCHEMES:
        try:
            from control_server.store.postgres import PostgresStore
        except ImportError as exc:
            raise ValueError(
                f"a PostgreSQL store needs psycopg: pip install 'training-control[postgres]' "
                f"({exc})"
            ) from exc
        return PostgresStore(f"postgresql://{rest}", read_only=read_only)
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {url!r}; "
        "expected sqlite:///path.db or postgresql://..."
    )


def _sqlite_path(url: str, rest: str, *, create: bool) -> Path:
    host, slash, path = rest.partition("/")
    if host or not slash:
        raise ValueError(
            f"a SQLite URL has no host: sqlite:///relative.db or "
            f"sqlite:////absolute.db, but got {url!r}"
        )
    if not path or path == ":memory:":
        raise ValueError(f"a SQLite URL must name a file, but got {url!r}")
    if "?" in path:
        raise ValueError(f"SQLite URL parameters are not supported, but got {url!r}")
    file = Path(path)
    if create:
        file.parent.mkdir(parents=True, exist_ok=True)
    logger.debug("sqlite store at %s", file)
    return file


def redact_url(url: str) -> str:
    """`url` without its password, for messages and logs. (libpq also reads the
    password from PGPASSWORD or ~/.pgpass, which keeps it out of the URL.)"""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
