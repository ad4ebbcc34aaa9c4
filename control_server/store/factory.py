"""Pick and open a store backend by URL."""

from __future__ import annotations

import logging
from pathlib import Path

from control_server.redact import redact
from control_server.store.base import Store
from control_server.store.sqlite import SqliteStore

logger = logging.getLogger(__name__)

_POSTGRES_SCHEMES = ("postgresql", "postgres")
#: What SQLite leaves beside a database it wrote: found without the database, they say
#: it existed.
_SQLITE_LEFTOVERS = ("-wal", "-shm", "-journal")

__all__ = ["open_store", "redact_url"]

#: A store URL as it may be logged or shown: `redact` (control_server.redact).
redact_url = redact


def open_store(
    url: str, *, read_only: bool = False, remember_contexts: bool = False, create: bool = True
) -> Store:
    """Open the store named by `url` (`read_only`: an existing, migrated one, never
    written; writes raise StoreUnavailable; ``create=False``: an existing one, where a
    missing SQLite file is an error rather than a new, empty store).

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
        raise ValueError(f"store URL must look like scheme://..., but got {redact(url)!r}")
    backend = scheme.split("+", 1)[0].lower()
    if backend == "sqlite":
        return SqliteStore(
            _sqlite_path(url, rest, create=create and not read_only),
            read_only=read_only,
            remember_contexts=remember_contexts,
            create=create,
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
        f"unknown store URL scheme {scheme!r} in {redact(url)!r}; "
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
    if create and not file.exists():
        _say_new_store(file)
        file.parent.mkdir(parents=True, exist_ok=True)
    logger.debug("sqlite store at %s", file)
    return file


def _say_new_store(file: Path) -> None:
    """Log that a new, empty store is created at `file`: loudly (WARNING) where what is
    around it says a store was there (its directory gone, SQLite's files left beside
    it), since every run's record then starts again from nothing."""
    if not file.parent.is_dir():
        logger.warning(
            "sqlite store %s does not exist, nor does its directory %s: creating a new, "
            "EMPTY store; if the server has run with this store before, its record is "
            "gone (stop the server and restore the directory)",
            file,
            file.parent,
        )
        return
    left = [f"{file.name}{suffix}" for suffix in _SQLITE_LEFTOVERS]
    found = [name for name in left if (file.parent / name).exists()]
    if found:
        logger.warning(
            "sqlite store %s does not exist but %s does: creating a new, EMPTY store; "
            "its record is gone (stop the server and restore the file)",
            file,
            " and ".join(found),
        )
        return
    logger.info("sqlite store %s does not exist: creating a new, empty store", file)
