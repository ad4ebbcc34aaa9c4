"""The storage contract every backend implements (SQLite now, PostgreSQL in issue 5).

Methods are synchronous and thread-safe: reads may be called from the event
loop thread, `record_decisions` from the group-commit writer thread. Each
backend keeps one connection per thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from control_server.domain import (
    Decision,
    DecisionRecord,
    PolicyVersion,
    Report,
    RunContext,
    RunFilter,
    RunSummary,
)


class Store(ABC):
    """Durable record of runs, reports, decisions, overrides, policies and admin events."""

    @abstractmethod
    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision]:
        """Write all records in ONE transaction, durable on return.

        Idempotent per (run_id, epoch): when a decision for that key is already
        stored (earlier, or earlier in this batch), nothing is written for the
        record and the stored decision is returned in its place. Returns one
        decision per record, in order. Raises StoreUnavailable when the write
        fails; then nothing of the batch is stored.
        """

    @abstractmethod
    def load_context(self, run_id: str, epoch: int) -> RunContext:
        """What deciding (run_id, epoch) needs: the decision already stored for it,
        the policy state after the latest stored epoch before it, the active
        policy version and the run's active override."""

    @abstractmethod
    def put_policy(self, policy: PolicyVersion) -> PolicyVersion:
        """Store a policy version; storing an existing version again is a no-op
        that returns the stored one (versions never change)."""

    @abstractmethod
    def get_policy(self, version: str) -> PolicyVersion | None:
        """A stored policy version, or None."""

    @abstractmethod
    def list_policies(self) -> list[PolicyVersion]:
        """All stored versions, oldest first."""

    @abstractmethod
    def activate_policy(self, version: str, actor: str) -> None:
        """Make a stored version the active one (records an admin event).
        Raises NotFound for an unknown version."""

    @abstractmethod
    def active_policy(self) -> str | None:
        """The active version, or None before any activation."""

    @abstractmethod
    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        """Runs matching the filter, most recently active first."""

    @abstractmethod
    def get_run(self, run_id: str) -> tuple[RunSummary, list[tuple[Report, Decision]]] | None:
        """A run's summary and its (report, decision) pairs in epoch order, or None."""

    @abstractmethod
    def run_ids(self) -> list[str]:
        """Every run id, for replay."""

    @abstractmethod
    def record_admin_event(
        self, actor: str, action: str, target: str, details: dict[str, Any], result: str
    ) -> None:
        """Append who did what to what, and how it ended."""

    @abstractmethod
    def admin_events(self) -> list[dict[str, Any]]:
        """All admin events, oldest first (keys: actor, action, target, details, result, at)."""

    @abstractmethod
    def schema_version(self) -> int:
        """The migration level of the open database."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise StoreUnavailable if the database fails its own integrity check."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""
