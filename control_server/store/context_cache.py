"""The SQLite decider's memory of each run's next context.

Only the decider process needs it: it records batch after batch through
`Store.group_commit` on its own connection, and after a decision of epoch
E is recorded the context of the run's next report is known without reading
it: E, the state recorded with it, and the versions and override that decided
it. `SqliteStore(remember_contexts=True)` keeps one `ContextCache` per
connection.
"""

from __future__ import annotations

from dataclasses import replace

from control_server.domain import DecisionRecord, RunContext, RunLabels, remember

#: Runs whose next context one connection remembers (least recently used out).
CONTEXT_CACHE_RUNS = 10_000


class ContextCache:
    """One connection's remembered contexts.

    They stay true while nothing else writes, which each write transaction
    checks (`begin`): the database's data version changes when another
    connection (the front end's admin calls, another server process) has
    committed, and any write transaction of this connection other than a
    batch's forgets everything. A transaction that fails forgets everything too.
    """

    __slots__ = ("data_version", "entries", "live", "loaded")

    def __init__(self) -> None:
        self.data_version: int | None = None
        # run_id -> (labels, context for any epoch above context.previous_epoch)
        self.entries: dict[str, tuple[RunLabels | None, RunContext]] = {}
        # Contexts handed out in this transaction that may be remembered once recorded:
        # run_id -> (labels, context, epoch); only for an epoch above all stored ones.
        self.loaded: dict[str, tuple[RunLabels | None, RunContext, int]] = {}
        self.live = False  # inside a batch's write transaction whose data_version was checked

    def begin(self, data_version: int, *, batch: bool) -> None:
        """A write transaction began, holding the write lock, at `data_version`; a
        `batch` (group_commit's) may use and extend what is remembered."""
        if not batch or data_version != self.data_version:
            self.forget()
        self.data_version = data_version
        self.live = batch

    def end(self) -> None:
        self.live = False
        self.loaded.clear()

    def forget(self) -> None:
        self.entries.clear()
        self.loaded.clear()

    def lookup(self, run_id: str, epoch: int, labels: RunLabels | None) -> RunContext | None:
        hit = self.entries.get(run_id)
        if hit is None or hit[0] != labels:
            return None
        context = hit[1]
        if context.previous_epoch is None or epoch <= context.previous_epoch:
            return None  # a retry or a late report: read it
        self.loaded[run_id] = (labels, context, epoch)
        return context

    def recorded(self, record: DecisionRecord) -> None:
        """Remember the run's next context after `record` was stored (not yet committed)."""
        run_id = record.decision.run_id
        loaded = self.loaded.pop(run_id, None)
        if loaded is None or loaded[2] != record.decision.epoch or not self.live:
            self.entries.pop(run_id, None)
            return
        labels, context, epoch = loaded
        if record.consumed_override is not None:
            self.entries.pop(run_id, None)  # the run's active override has changed
            return
        shadow_state = record.shadow_state if record.shadow is not None else None
        following = replace(
            context,
            existing=None,
            previous_state=record.state,
            previous_epoch=epoch,
            previous_shadow_state=shadow_state,
            attempt=record.decision.attempt,
            last_epoch=epoch,
            previous_chain=record.chain,
        )
        remember(self.entries, run_id, (labels, following), CONTEXT_CACHE_RUNS)
