"""Storage: the contract, the backends, and the URL factory.

Group commit (one transaction per batch of reports) is `Store.group_commit`,
called by the decider process (control_server/decider.py).

`PostgresStore` is imported on first use: psycopg is an optional extra (`postgres`).
"""

from typing import TYPE_CHECKING

from control_server.store.base import Store
from control_server.store.factory import open_store
from control_server.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from control_server.store.postgres import PostgresStore

__all__ = ["PostgresStore", "SqliteStore", "Store", "open_store"]


def __getattr__(name: str) -> object:
    if name == "PostgresStore":
        from control_server.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
