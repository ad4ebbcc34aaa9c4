"""Use cases: load the run's context, decide, record durably, answer.

Speaks domain types only and raises domain errors; the servicer maps them to
status codes. Holds no per-run state: everything a decision needs comes in the
report or from the store, so any replica can answer any run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from control_server.domain import (
    Decision,
    DecisionRecord,
    NotFound,
    PolicyVersion,
    Report,
    RunFilter,
    RunSummary,
    StoreUnavailable,
)
from control_server.policy import INITIAL_STATE, PolicyState, step
from control_server.policy.document import PolicyDoc, parse_policy
from control_server.store import GroupCommitter, Store

logger = logging.getLogger(__name__)


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
            self._docs[version] = doc
        return doc


def store_policy(
    store: Store, doc: PolicyDoc, clock: Callable[[], datetime] = utc_now
) -> PolicyVersion:
    """Store a policy document as an immutable version (a no-op if already stored)."""
    return store.put_policy(
        PolicyVersion(
            version=doc.version, name=doc.name, document=doc.to_mapping(), created_at=clock()
        )
    )


class ControlService:
    """The server's use cases."""

    def __init__(
        self, store: Store, committer: GroupCommitter, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._store = store
        self._committer = committer
        self._clock = clock
        self.policies = PolicyCache(store)

    async def report_epoch(self, report: Report) -> Decision:
        """Decide one epoch. Idempotent per (run_id, epoch); durable before it returns."""
        context = self._store.load_context(report.run_id, report.epoch)
        if context.existing is not None:
            logger.info(
                "[ReportEpoch] run=%s epoch=%d replayed recorded decision %s",
                report.run_id,
                report.epoch,
                context.existing.decision_id,
            )
            return context.existing
        if context.active_policy is None:
            raise StoreUnavailable("no active policy is stored; start the server with --policy")
        version = context.active_policy
        doc = self.policies.get(version)
        state = (
            PolicyState.from_json(context.previous_state)
            if context.previous_state is not None
            else INITIAL_STATE
        )
        verdict, new_state = step(doc, version, state, report, context.override)
        decision = Decision(
            decision_id=str(uuid.uuid4()),
            run_id=report.run_id,
            epoch=report.epoch,
            action=verdict.action,
            source=verdict.source,
            reason=verdict.reason,
            policy_version=version,
            decided_at=self._clock(),
            lr=verdict.lr,
            loss_weights=verdict.loss_weights,
            intervention_index=verdict.intervention_index,
        )
        stored = await self._committer.submit(DecisionRecord(report, decision, new_state.to_json()))
        logger.debug(
            "[ReportEpoch] run=%s epoch=%d action=%s source=%s",
            report.run_id,
            report.epoch,
            stored.action.value,
            stored.source.value,
        )
        return stored

    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        return self._store.list_runs(run_filter)

    def get_run(self, run_id: str) -> tuple[RunSummary, list[tuple[Report, Decision]]]:
        run = self._store.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} is not recorded")
        return run
