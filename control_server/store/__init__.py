"""Storage: the contract, the backends, the URL factory and the group committer."""

from control_server.store.base import Store
from control_server.store.committer import GroupCommitter
from control_server.store.factory import open_store
from control_server.store.sqlite import SqliteStore

__all__ = ["GroupCommitter", "SqliteStore", "Store", "open_store"]
