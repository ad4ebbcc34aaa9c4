"""The ReportEpoch use case: a batch of reports in, durable decisions out.

The decider process (control_server/decider.py) runs it, with a store of its
own: for each report the store reads the run's context (its latest policy
state, the active or pinned version, the active override) inside one write
transaction, `decide_report` turns report and context into the record to
store, and the store writes every record of the batch before it commits (group
commit: `Store.group_commit`). Holds no per-run state that matters: everything
a decision needs comes in the report or from the store, so any replica can
answer any run; the memos here only save re-parsing what the store returned.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from control_server.chain import link
from control_server.domain import (
    Decision,
    DecisionRecord,
    FailedPrecondition,
    NotFound,
    Report,
    RunContext,
    StoreUnavailable,
    Verdict,
    remember,
)
from control_server.policy import INITIAL_STATE, PolicyState, step
from control_server.policy.document import PolicyDoc, parse_policy
from control_server.replay import decide_epoch, fold_state
from control_server.store import Store

logger = logging.getLogger(__name__)

#: Runs whose latest policy state is kept parsed (oldest out first).
STATE_MEMO_RUNS = 10_000


def utc_now() -> datetime:
    return datetime.now(UTC)


class PolicyCache:
    """Parsed policy documents by version. Versions are immutable, so caching
    them forever is safe on every replica."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._docs: dict[str, PolicyDoc] = {}

    def get(self, version: str) -> PolicyDoc:
        doc = self._docs.get(version)
        if doc is None:
            stored = self._store.get_policy(version)
            if stored is None:
                raise NotFound(f"policy version {version!r} is not stored")
            doc = parse_policy(dict(stored.document))
            if doc.version != version:
                # Versions are content hashes: this document was edited in the store.
                raise StoreUnavailable(
                    f"policy version {version!r} is stored with a document that hashes to "
                    f"{doc.version!r}: the store was edited; nothing is decided with it"
                )
            self._docs[version] = doc
        return doc


class ReportEpoch:
    """Decides and records reports; `decide_batch` is the whole use case."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self._clock = clock
        self.policies = PolicyCache(store)
        # run_id -> (state JSON, the PolicyState it encodes) of the run's latest
        # decision here: the next report's stored state is usually that very text,
        # so it need not be parsed again.
        self._states: dict[str, tuple[str, PolicyState]] = {}

    def decide_batch(self, reports: Sequence[Report]) -> list[Decision | Exception]:
        """Decide and record a batch of epochs in ONE transaction.

        Idempotent per (run_id, epoch): a report already decided gets its stored
        decision back. Every decision is durable when this returns, and each
        run's read-decide-write is atomic (see `Store.group_commit`).
        """
        return self.store.group_commit(reports, self.decide_report)

    def decide_report(self, report: Report, context: RunContext) -> DecisionRecord | Decision:
        """The record one report makes, given what the store holds for its run, or the
        decision already recorded for it when the report is a retry.

        Raises FailedPrecondition for a report of an attempt that is not the run's
        latest, a retry whose payload differs from the recorded one, and an epoch
        older than the newest one recorded."""
        attempt = _attempt(report, context)
        if context.existing is not None:
            return self._retry(report, context.existing)
        if context.last_epoch is not None and report.epoch < context.last_epoch:
            raise FailedPrecondition(
                f"epoch {report.epoch} of run {report.run_id!r} is older than epoch "
                f"{context.last_epoch}, the latest attempt {attempt} recorded; a training "
                "that restarted must call StartRun (with resume_from_epoch when it resumes)"
            )
        version = context.steering_policy
        if version is None:
            raise StoreUnavailable("no active policy is stored; start the server with --policy")
        doc = self.policies.get(version)
        state = self._state(report.run_id, context.previous_state)
        now = self._clock()
        override = context.override
        verdict, new_state = decide_epoch(doc, version, state, report, override, late=report.late)
        decision = replace(
            _decision(report, verdict, version, now, context, attempt), late=report.late
        )
        # A late report is recorded, not decided: no shadow decision either.
        shadow, shadow_state = (
            (None, None) if report.late else self._shadow(report, context, version, now, attempt)
        )
        state_json = new_state.to_json()
        remember(self._states, report.run_id, (state_json, new_state), STATE_MEMO_RUNS)
        return DecisionRecord(
            report,
            decision,
            state_json,
            chain=link(context.previous_chain, report, decision, state_json),
            new_run=context.attempt == 0,
            # A `once` override is for a live epoch: a late report leaves it in force.
            consumed_override=(
                override.override_id
                if override is not None and override.once and not report.late
                else None
            ),
            shadow=shadow,
            shadow_state=shadow_state,
        )

    def _retry(self, report: Report, existing: Decision) -> Decision:
        """The recorded decision, when `report` repeats the payload it was decided on."""
        stored = self.store.stored_report(report.run_id, report.epoch)
        differ = [] if stored is None else stored.differences(report)
        if differ:
            raise FailedPrecondition(
                f"epoch {report.epoch} of run {report.run_id!r} is already recorded with "
                f"a different {', '.join(differ)}; a retry must repeat the report it "
                "retries (a training that restarted must call StartRun)"
            )
        return existing

    def _state(self, run_id: str, text: str | None) -> PolicyState:
        """The PolicyState `text` encodes (to_json/from_json round-trip exactly)."""
        if text is None:
            return INITIAL_STATE
        memo = self._states.get(run_id)
        if memo is not None and memo[0] == text:
            return memo[1]
        return PolicyState.from_json(text)

    def _shadow(
        self, report: Report, context: RunContext, real_version: str, now: datetime, attempt: int
    ) -> tuple[Decision | None, str | None]:
        """The shadow version's decision and state; never lets the real decision fail."""
        version = context.shadow_policy
        if version is None or version == real_version:
            return None, None
        try:
            doc = self.policies.get(version)
            if context.previous_shadow_state is not None:
                state = PolicyState.from_json(context.previous_shadow_state)
            elif context.previous_epoch is not None:
                # Shadowing started mid-run: catch up on the run's recorded epochs once.
                state = self._fold_history(doc, version, report, context.previous_epoch)
            else:
                state = INITIAL_STATE
            verdict, after = step(doc, version, state, report, context.override)
        except Exception:
            logger.exception(
                "[ReportEpoch] run=%s epoch=%d shadow policy %s failed; no shadow decision",
                report.run_id,
                report.epoch,
                version,
            )
            return None, None
        return _decision(report, verdict, version, now, context, attempt), after.to_json()

    def _fold_history(
        self, doc: PolicyDoc, version: str, report: Report, after_epoch: int
    ) -> PolicyState:
        found = self.store.get_run(report.run_id)
        epochs = [] if found is None else [p for p in found[1] if p[0].epoch < report.epoch]
        overrides = {
            o.override_id: o
            for o in self.store.list_overrides(report.run_id, include_cleared=True)
            if o.override_id is not None
        }
        logger.info(
            "[ReportEpoch] run=%s epoch=%d shadow %s folded over %d recorded epochs",
            report.run_id,
            report.epoch,
            version,
            len(epochs),
        )
        return fold_state(doc, version, epochs, overrides, after_epoch)


def _attempt(report: Report, context: RunContext) -> int:
    """The attempt a report belongs to: the one it names, which must be the run's
    latest; none named, the latest (1 for a new run)."""
    latest = context.attempt or 1
    if report.attempt == 0 or report.attempt == latest:
        return latest
    if report.attempt > latest:
        raise FailedPrecondition(
            f"run {report.run_id!r} has no attempt {report.attempt} (its latest is {latest}); "
            "call StartRun"
        )
    raise FailedPrecondition(
        f"attempt {report.attempt} of run {report.run_id!r} was superseded by attempt "
        f"{latest}: another StartRun of this run id came after it"
    )


def _decision(
    report: Report,
    verdict: Verdict,
    version: str,
    now: datetime,
    context: RunContext,
    attempt: int,
) -> Decision:
    return Decision(
        decision_id=str(uuid.uuid4()),
        run_id=report.run_id,
        epoch=report.epoch,
        action=verdict.action,
        source=verdict.source,
        reason=verdict.reason,
        policy_version=version,
        decided_at=now,
        lr=verdict.lr,
        loss_weights=verdict.loss_weights,
        intervention_index=verdict.intervention_index,
        override_id=context.override.override_id if context.override is not None else None,
        previous_epoch=context.previous_epoch,
        attempt=attempt,
    )
