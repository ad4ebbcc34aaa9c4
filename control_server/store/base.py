"""The storage contract every backend implements (SQLite and PostgreSQL).

Methods are synchronous and thread-safe: reads may be called from the event
loop thread, `group_commit` from the decider process (its own instance). A thread
never shares a connection with another (SQLite keeps one per thread; PostgreSQL
checks one out of its pool per transaction). Timestamps come back timezone-aware
(UTC).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from control_server.chain import ChainedEpoch, RegistryEntry
from control_server.domain import (
    Assignment,
    AuditEvent,
    AuditFilter,
    Decision,
    DecisionFilter,
    DecisionPage,
    DecisionRecord,
    DomainError,
    Experiment,
    FinalMetrics,
    Override,
    PolicyPin,
    PolicyVersion,
    Report,
    RunAttempt,
    RunContext,
    RunFilter,
    RunLabels,
    RunSelector,
    RunStatus,
    RunSummary,
    ShadowSummary,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

#: Decides one report from its context (pure apart from store reads): the record to
#: store, or the decision already stored for it (a retry) to answer again.
DecideReport = Callable[[Report, RunContext], DecisionRecord | Decision]


class Store(ABC):
    """Durable record of runs, reports, decisions, overrides, policies and admin events."""

    @abstractmethod
    def write_transaction(self) -> AbstractContextManager[None]:
        """One write transaction on this thread's connection, committed on exit and
        rolled back on error. Store calls made on this thread inside it join it
        (they neither begin nor commit), so they see its uncommitted writes. It
        serialises against every other writer of the run's rows (SQLite: the
        database lock; PostgreSQL: row locks), so a read-decide-write inside it
        is atomic across replicas."""

    def group_commit(
        self, reports: Sequence[Report], decide_report: DecideReport
    ) -> list[Decision | Exception]:
        """Decide and record a batch of reports in ONE write transaction.

        For each report, in order: its context is read inside the transaction
        (so it sees the decisions made earlier in the batch) and `decide_report`
        makes the record, which is stored, or hands back the decision already
        stored (a retry; `decide_report` judges it). An error of `decide_report`
        fails that report alone. A store error fails the whole batch (StoreUnavailable;
        nothing of it is stored).
        """
        outcomes: list[Decision | Exception | None] = [None] * len(reports)
        pending: list[tuple[int, DecisionRecord]] = []
        pending_runs: set[str] = set()

        def flush() -> None:
            stored = self.record_decisions([record for _, record in pending])
            for (index, record), decision in zip(pending, stored, strict=True):
                outcomes[index] = (
                    decision
                    if decision is not None
                    else StoreUnavailable(
                        f"override {record.consumed_override} was consumed inside the transaction"
                    )
                )
            pending.clear()
            pending_runs.clear()

        with self.write_transaction():
            for index, report in enumerate(reports):
                if report.run_id in pending_runs:
                    flush()  # the run's earlier report must be visible to this one
                context = self.load_context(report.run_id, report.epoch, report.labels)
                try:
                    record = decide_report(report, context)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    if not isinstance(exc, DomainError):
                        logger.exception(
                            "[ReportEpoch] run=%s epoch=%d cannot be decided",
                            report.run_id,
                            report.epoch,
                        )
                    outcomes[index] = exc
                    continue
                if isinstance(record, Decision):
                    outcomes[index] = record
                    continue
                pending.append((index, record))
                pending_runs.add(report.run_id)
            if pending:
                flush()
        return [o if o is not None else StoreUnavailable("not decided") for o in outcomes]

    @abstractmethod
    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision | None]:
        """Write all records in ONE transaction, durable on return.

        Idempotent per (run_id, epoch): when a decision for that key is already
        stored (earlier, or earlier in this batch), nothing is written for the
        record and the stored decision is returned in its place.

        A newly stored decision's `consumed_override` is cleared in the same
        transaction (cleared_at = the decision's decided_at, cleared_by =
        "consumed by epoch N"). When that override is no longer active (another
        report consumed it, an operator cleared or replaced it), nothing of the
        record is stored and None is returned in its place: the caller decides
        again. This is what makes a `once` override apply exactly once.

        The record's `shadow` decision and `shadow_state` are stored beside a
        newly stored decision, never for a duplicate.

        Returns one entry per record, in order. Raises StoreUnavailable when the
        write fails; then nothing of the batch is stored.
        """

    @abstractmethod
    def load_context(self, run_id: str, epoch: int, labels: RunLabels | None = None) -> RunContext:
        """What deciding (run_id, epoch) needs, in one read: the decision already
        stored for it, the latest stored epoch before it and the policy state
        after that epoch (and the shadow state stored there, when it came from the
        current shadow version), the active and shadow versions, the version of
        the most specific pin matching `labels` (ties: the most recently pinned;
        None labels: no pin), and the run's active override."""

    @abstractmethod
    def latest_decision_seq(self) -> int:
        """The sequence number of the latest committed decision (0: none yet)."""

    @abstractmethod
    def decisions_after(
        self, cursor: int, decision_filter: DecisionFilter, limit: int
    ) -> DecisionPage:
        """Decisions matching the filter (run, action, source; not its times or
        limit) with a sequence number above `cursor`, in commit order, at most
        `limit`. Sequence numbers grow in commit order: a decision committed after
        this read always gets one above the returned cursor."""

    @abstractmethod
    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        """Decisions matching the filter, oldest first (decided_at, then commit order)."""

    @abstractmethod
    def shadow_decisions(
        self, run_id: str, from_epoch: int = 0, to_epoch: int | None = None
    ) -> list[Decision]:
        """A run's shadow decisions with from_epoch <= epoch <= to_epoch (None: no upper
        bound) in epoch order."""

    @abstractmethod
    def shadow_summary(self, version: str) -> ShadowSummary:
        """How often `version`, as shadow, decided differently from the real decision
        (a different action, LR or weight map), by "REAL->SHADOW" action pair."""

    # --- overrides ---------------------------------------------------------------------

    @abstractmethod
    def set_override(self, override: Override) -> Override:
        """Store a new active override for its run and return it with its id.

        Clears the run's previous active override in the same transaction
        (cleared_at = the new one's created_at, cleared_by = "replaced by
        override N") and names it in the new one's `replaced_override_id`.
        `override.created_at` must be set.
        """

    @abstractmethod
    def clear_override(self, run_id: str, actor: str, at: datetime) -> Override | None:
        """Clear the run's active override; return it as cleared, or None if none was."""

    @abstractmethod
    def list_overrides(self, run_id: str = "", *, include_cleared: bool = False) -> list[Override]:
        """Overrides of one run (empty: every run), oldest first; active ones only
        unless `include_cleared` (then consumed and replaced ones too)."""

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
        """Make a stored version the active one, recording a ``PolicyActivated``
        admin event that names the version it replaced (in the same transaction;
        an activation at server start has no call to record). Raises NotFound for
        an unknown version."""

    @abstractmethod
    def active_policy(self) -> str | None:
        """The active version, or None before any activation."""

    @abstractmethod
    def set_shadow_policy(self, version: str | None, actor: str, at: datetime) -> None:
        """Shadow a stored version (None: stop shadowing). Raises NotFound for an
        unknown version."""

    @abstractmethod
    def shadow_policy(self) -> str | None:
        """The shadow version, or None."""

    @abstractmethod
    def pin_policy(self, pin: PolicyPin) -> PolicyPin:
        """Pin a stored version to a selector, replacing any pin of the same
        selector (its pinned_at makes it the most recent). Raises NotFound for an
        unknown version."""

    @abstractmethod
    def unpin_policy(self, selector: RunSelector) -> bool:
        """Remove the pin of exactly this selector; False when there was none."""

    @abstractmethod
    def list_pins(self) -> list[PolicyPin]:
        """Every pin, oldest first."""

    @abstractmethod
    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        """Runs matching the filter (its labels and limit; a status filter is the
        caller's, since STALE is derived), most recently active first."""

    @abstractmethod
    def get_run(
        self, run_id: str, from_epoch: int = 0, limit: int = 0
    ) -> tuple[RunSummary, list[tuple[Report, Decision]]] | None:
        """A run's summary and its (report, decision) pairs in epoch order from
        `from_epoch` on, at most `limit` of them (<= 0: all), or None."""

    @abstractmethod
    def stored_report(self, run_id: str, epoch: int) -> Report | None:
        """The report stored for (run_id, epoch) in the run's current history, read
        inside the caller's write transaction when there is one."""

    @abstractmethod
    def start_attempt(self, attempt: RunAttempt, labels: RunLabels) -> RunAttempt:
        """Open `attempt.run_id`'s next attempt, in one write transaction serialised
        with the run's reports; `attempt.attempt` is ignored and the stored attempt
        (numbered, with its history_reset and superseded_epochs) is returned.

        A resume (`resume_from_epoch` set) keeps the current history up to that epoch
        and supersedes the epochs after it; a start from scratch of a known run
        supersedes all of them (history_reset). Superseded epochs move, report and
        decision, to the superseded tables (their shadow decisions are dropped), and
        the run's summary restarts from what remains. A new run gets its row here."""

    @abstractmethod
    def finish_attempt(
        self,
        run_id: str,
        attempt: int,
        status: RunStatus,
        error: str,
        metrics: FinalMetrics,
        at: datetime,
    ) -> RunAttempt:
        """Record how an attempt ended (0: the latest). Raises NotFound for an unknown
        run or attempt, FailedPrecondition for an attempt a later one superseded."""

    @abstractmethod
    def list_attempts(self, run_id: str) -> list[RunAttempt]:
        """A run's attempts, oldest first (an implicit attempt 1 with no StartRun is
        listed from its first report)."""

    @abstractmethod
    def superseded(
        self, run_id: str, from_epoch: int = 0, to_epoch: int | None = None
    ) -> list[tuple[Report, Decision]]:
        """A run's superseded (report, decision) pairs with from_epoch <= epoch <=
        to_epoch (None: no upper bound), by epoch, then attempt."""

    @abstractmethod
    def chained_history(self, run_id: str) -> list[ChainedEpoch]:
        """A run's current history as stored, with each epoch's state and chain value,
        in epoch order (for `replay`'s tamper check)."""

    @abstractmethod
    def run_registry(self) -> list[RegistryEntry]:
        """The run registry, in the order runs were entered."""

    @abstractmethod
    def recent_epoch_times(self, run_ids: Sequence[str], count: int) -> dict[str, list[datetime]]:
        """The decided_at of each run's newest `count` decisions, newest first."""

    @abstractmethod
    def run_ids(self) -> list[str]:
        """Every run id, for replay."""

    # --- the fleet at a glance (ListRuns' flags and trends: one query each) -----------

    @abstractmethod
    def runs_with_nonfinite_losses(self, run_ids: Sequence[str]) -> set[str]:
        """Those of `run_ids` with a report in their current history whose train or val
        loss is NaN or infinite."""

    @abstractmethod
    def runs_with_decision_reason(self, run_ids: Sequence[str], like: str) -> set[str]:
        """Those of `run_ids` with a decision of the policy (source POLICY) in their
        current history whose reason matches the SQL LIKE pattern `like`."""

    @abstractmethod
    def report_series(self, run_ids: Sequence[str], per_run: int) -> dict[str, list[Report]]:
        """Each run's reports of its current history in epoch order, evenly thinned to at
        most `per_run` of them, its newest always kept (<= 0: all); runs without any
        are left out. For trends: each report holds its epoch, losses, pseudo Dice, LR and
        intervention count; its loss weights, gradient norm and labels are left empty."""

    # --- experiments --------------------------------------------------------------------

    @abstractmethod
    def start_experiment(self, experiment: Experiment) -> Experiment:
        """Store a new running experiment. Raises NotFound for an arm's unknown policy
        version and FailedPrecondition when the name was ever used or a running
        experiment has exactly the same selector."""

    @abstractmethod
    def get_experiment(self, name: str) -> Experiment | None:
        """An experiment with its count of assigned runs, or None."""

    @abstractmethod
    def list_experiments(self, include_ended: bool = False) -> list[Experiment]:
        """Running experiments (and ended ones with `include_ended`), oldest first."""

    @abstractmethod
    def end_experiment(
        self, name: str, actor: str, at: datetime, promoted_arm: str = ""
    ) -> Experiment:
        """End a running experiment (naming the arm promoted, when one was). Raises
        NotFound for an unknown name and FailedPrecondition when it has ended."""

    @abstractmethod
    def assign_run(self, assignment: Assignment, actor: str) -> Assignment | None:
        """Record a run's arm, once: the run's stored assignment (an earlier one wins,
        unchanged), or None when it had none and the experiment is no longer running.
        A new assignment is recorded as an ``ExperimentAssigned`` admin event by
        `actor` in the same transaction."""

    @abstractmethod
    def assignment(self, run_id: str) -> Assignment | None:
        """The run's experiment arm, or None."""

    @abstractmethod
    def assignments(self, experiment: str) -> list[Assignment]:
        """The runs assigned to an experiment, in the order they were assigned."""

    @abstractmethod
    def record_admin_event(
        self, actor: str, action: str, target: str, details: dict[str, Any], result: str
    ) -> None:
        """Append who did what to what, and how it ended."""

    @abstractmethod
    def admin_events(self) -> list[dict[str, Any]]:
        """All admin events, oldest first (keys: actor, action, target, details, result, at)."""

    @abstractmethod
    def list_admin_events(self, audit_filter: AuditFilter) -> list[AuditEvent]:
        """The admin events the filter matches, newest first (recorded order), at most
        its limit (<= 0: all)."""

    @abstractmethod
    def delete_admin_events(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the admin events recorded before `before`, oldest
        first, in one short write transaction; return how many (audit retention:
        the caller repeats while it gets `limit`). Finding them does not hold the
        write lock, so writers wait for the deletes alone."""

    @abstractmethod
    def schema_version(self) -> int:
        """The migration level of the open database."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise StoreUnavailable if the database fails its own integrity check."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write transaction commits now (the server's
        health probe, every few seconds: cheap, and leaving nothing behind)."""

    def setting_warnings(self) -> list[str]:
        """What in the database's own settings will hurt this store, one sentence each
        (the server logs them at start); none by default."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Close every connection."""
