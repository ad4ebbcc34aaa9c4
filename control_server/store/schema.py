"""Numbered schema migrations, shared by both backends.

Each backend ships its dialect in its own folder (``migrations/`` for SQLite,
``migrations_pg/`` for PostgreSQL) with the same numbering: schema level N
means the same tables and columns on both. A backend applies the files its
database lacks, one transaction each, and refuses a database whose level is
newer than the files it knows.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

from control_server.domain import StoreUnavailable

#: The SQLite dialect.
SQLITE_MIGRATIONS: Traversable = resources.files("control_server.store").joinpath("migrations")
#: The PostgreSQL dialect.
POSTGRES_MIGRATIONS: Traversable = resources.files("control_server.store").joinpath("migrations_pg")

_MIGRATION_NAME = re.compile(r"(\d{4})_\w+\.sql")


def load_migrations(source: Traversable) -> list[tuple[str, str]]:
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


def check_current(level: int, known: int) -> None:
    """For a store opened read-only (which cannot be migrated): raise StoreUnavailable
    unless the database is at exactly the level we know."""
    check_level(level, known)
    if level < known:
        raise StoreUnavailable(
            f"database schema version {level} is older than this control-server's ({known}) "
            "and a read-only store cannot be migrated: start `control-server serve` on it "
            "(or on a writable copy) once"
        )


def check_level(level: int, known: int) -> None:
    """Raise StoreUnavailable when the database is newer than the migrations we know."""
    if level > known:
        raise StoreUnavailable(
            f"database schema version {level} is newer than this control-server knows "
            f"({known}); upgrade control-server or use another store"
        )
