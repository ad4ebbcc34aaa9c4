"""Use cases: load the run's context, decide, record durably, answer; and the
operators' controls (overrides, policy rollout, audit queries, a live tail).

Speaks domain types only and raises domain errors; the servicer maps them to
status codes. Holds no per-run state: everything a decision needs comes in the
report or from the store, so any replica can answer any run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import yaml

from control_server.domain import (
    LOSS_COMPONENTS,
    Decision,
    DecisionFilter,
    DecisionRecord,
    InvalidArgument,
    NotFound,
    Override,
    PolicyCatalog,
    PolicyPin,
    PolicyVersion,
    PolicyView,
    Report,
    RunContext,
    RunDetail,
    RunEpoch,
    RunFilter,
    RunSelector,
    RunSummary,
    ShadowSummary,
    StoreUnavailable,
    Verdict,
    remember,
)
from control_server.policy import INITIAL_STATE, PolicyState, step
from control_server.policy.document import PolicyDoc, parse_policy, parse_policy_yaml
from control_server.replay import fold_state
from control_server.store import Store

logger = logging.getLogger(__name__)

#: Seconds between a watch's polls of the store (decisions of other replicas).
WATCH_POLL_S = 0.5
#: Runs whose latest policy state the decider keeps parsed (oldest out first).
STATE_MEMO_RUNS = 10_000
#: Decisions a watch reads from the store at a time.
WATCH_PAGE = 256


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


def validate_override(override: Override) -> None:
    """Raise InvalidArgument naming the first bad field of an override request."""
    if not override.run_id.strip():
        raise InvalidArgument("run_id", "must not be empty")
    if override.lr is not None and not (math.isfinite(override.lr) and override.lr > 0):
        raise InvalidArgument("lr", f"must be a finite number > 0, but got {override.lr!r}")
    for component, weight in override.loss_weights.items():
        where = f"loss_weights[{component!r}]"
        if component not in LOSS_COMPONENTS:
            raise InvalidArgument(
                where, f"unknown loss component; expected one of {', '.join(LOSS_COMPONENTS)}"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidArgument(where, f"must be a finite number >= 0, but got {weight!r}")
    if override.loss_weights and sum(override.loss_weights.values()) <= 0:
        raise InvalidArgument("loss_weights", "must not all be 0")
    if override.lr is None and not override.loss_weights and not override.hold_interventions:
        raise InvalidArgument(
            "override", "set at least one of lr, loss_weights and hold_interventions"
        )


def _check_selector(selector: RunSelector) -> None:
    if selector.specificity == 0:
        raise InvalidArgument("selector", "set at least one of dataset, configuration and fold")


def _reject_yaml_aliases(text: str) -> None:
    """Anchors and aliases can expand into huge documents; policies do not need them."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise InvalidArgument("yaml", "YAML aliases (*name) are not supported")
    except yaml.YAMLError as exc:
        raise InvalidArgument("yaml", f"not valid YAML: {exc}") from exc


class _Broadcast:
    """Wakes every watch once per notify: an asyncio.Event replaced on each notify."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.watchers = 0

    def current(self) -> asyncio.Event:
        """The event the next notify sets; take it before reading the store."""
        return self._event

    def notify(self) -> None:
        """Wake the watches (a no-op, on the hot path, when there are none)."""
        if self.watchers:
            self.wake_all()

    def wake_all(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class DecisionWatch:
    """A live tail of the decisions committed after it was opened (an async iterator).

    `await open()` first. Wakes at once on this replica's commits and polls the
    store every `WATCH_POLL_S` (in a worker thread, off the event loop), so
    decisions of other replicas sharing the store show up too. Ends when the
    service closes; `close()` it when the caller goes away.
    """

    def __init__(self, service: ControlService, decision_filter: DecisionFilter) -> None:
        self._service = service
        self._filter = decision_filter
        self._cursor: int | None = None
        self._buffer: deque[Decision] = deque()
        self._closed = False
        service.broadcast.watchers += 1

    async def open(self) -> None:
        """Start from the latest committed decision: only later ones are sent."""
        self._cursor = await asyncio.to_thread(self._service.store.latest_decision_seq)

    def __aiter__(self) -> DecisionWatch:
        return self

    async def __anext__(self) -> Decision:
        if self._cursor is None:
            raise RuntimeError("DecisionWatch: await open() before iterating")
        while not self._buffer:
            if self._closed or self._service.closed:
                self.close()
                raise StopAsyncIteration
            event = self._service.broadcast.current()
            page = await asyncio.to_thread(
                self._service.store.decisions_after, self._cursor, self._filter, WATCH_PAGE
            )
            self._cursor = page.cursor
            if page.decisions:
                self._buffer.extend(page.decisions)
                break
            try:
                async with asyncio.timeout(self._service.watch_poll_s):
                    await event.wait()
            except TimeoutError:
                pass
        return self._buffer.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._service.broadcast.watchers -= 1


class ControlService:
    """The server's use cases."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime] = utc_now,
        *,
        watch_poll_s: float = WATCH_POLL_S,
    ) -> None:
        self.store = store
        self._clock = clock
        self.policies = PolicyCache(store)
        self.broadcast = _Broadcast()
        self.watch_poll_s = watch_poll_s
        self.closed = False
        # run_id -> (state JSON, the PolicyState it encodes) of the run's latest
        # decision here: the next report's stored state is usually that very text,
        # so it need not be parsed again.
        self._states: dict[str, tuple[str, PolicyState]] = {}

    def close(self) -> None:
        """End every open watch (call before stopping the server, so that it does not
        wait out its grace period on them)."""
        self.closed = True
        self.broadcast.wake_all()

    # --- ReportEpoch ------------------------------------------------------------------

    def decide_batch(self, reports: Sequence[Report]) -> list[Decision | Exception]:
        """Decide a batch of epochs in ONE transaction (the decider process calls this).

        Idempotent per (run_id, epoch): a report already decided gets its stored
        decision back. Every decision is durable when this returns, and each
        run's read-decide-write is atomic (see `Store.decide_and_record`).
        """
        return self.store.decide_and_record(reports, self._decide)

    def decided(self) -> None:
        """Tell the live watches that decisions were committed (the front end calls this)."""
        self.broadcast.notify()

    def _decide(self, report: Report, context: RunContext) -> DecisionRecord:
        version = context.pinned_policy or context.active_policy
        if version is None:
            raise StoreUnavailable("no active policy is stored; start the server with --policy")
        doc = self.policies.get(version)
        state = self._state(report.run_id, context.previous_state)
        override = context.override
        verdict, new_state = step(doc, version, state, report, override)
        now = self._clock()
        decision = _decision(report, verdict, version, now, context)
        shadow, shadow_state = self._shadow(report, context, version, now)
        state_json = new_state.to_json()
        remember(self._states, report.run_id, (state_json, new_state), STATE_MEMO_RUNS)
        return DecisionRecord(
            report,
            decision,
            state_json,
            consumed_override=(
                override.override_id if override is not None and override.once else None
            ),
            shadow=shadow,
            shadow_state=shadow_state,
        )

    def _state(self, run_id: str, text: str | None) -> PolicyState:
        """The PolicyState `text` encodes (to_json/from_json round-trip exactly)."""
        if text is None:
            return INITIAL_STATE
        memo = self._states.get(run_id)
        if memo is not None and memo[0] == text:
            return memo[1]
        return PolicyState.from_json(text)

    def _shadow(
        self, report: Report, context: RunContext, real_version: str, now: datetime
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
        return _decision(report, verdict, version, now, context), after.to_json()

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

    # --- overrides --------------------------------------------------------------------

    def set_override(self, override: Override, actor: str) -> Override:
        """Validate and store an override; it replaces the run's active one."""
        validate_override(override)
        stored = self.store.set_override(
            replace(
                override,
                actor=actor,
                created_at=self._clock(),
                override_id=None,
                cleared_at=None,
                cleared_by="",
            )
        )
        logger.info(
            "[SetOverride] run=%s override=%s by %s: lr=%s weights=%s hold=%s once=%s",
            stored.run_id,
            stored.override_id,
            actor,
            stored.lr,
            dict(stored.loss_weights),
            stored.hold_interventions,
            stored.once,
        )
        return stored

    def clear_override(self, run_id: str, actor: str) -> Override | None:
        """Clear the run's active override; None when it had none."""
        if not run_id.strip():
            raise InvalidArgument("run_id", "must not be empty")
        cleared = self.store.clear_override(run_id, actor, self._clock())
        logger.info(
            "[ClearOverride] run=%s by %s: %s",
            run_id,
            actor,
            f"cleared override {cleared.override_id}" if cleared else "none was active",
        )
        return cleared

    def list_overrides(self, run_id: str, include_cleared: bool) -> list[Override]:
        return self.store.list_overrides(run_id, include_cleared=include_cleared)

    # --- policies ---------------------------------------------------------------------

    def put_policy(self, source: Mapping[str, Any] | str, actor: str) -> tuple[PolicyView, bool]:
        """Validate and store a version (not activated); True when it was new.

        `source` is plain data or YAML/JSON text. An invalid document raises
        InvalidArgument naming the field and stores nothing.
        """
        if isinstance(source, str):
            _reject_yaml_aliases(source)
            doc = parse_policy_yaml(source)
        else:
            doc = parse_policy(source)
        created = self.store.get_policy(doc.version) is None
        stored = store_policy(self.store, doc, self._clock)
        logger.info(
            "[PutPolicy] %s@%s by %s (%s)",
            doc.name,
            stored.version,
            actor,
            "new" if created else "already stored",
        )
        return self._view(stored), created

    def get_policy(self, version: str) -> PolicyView:
        """A stored version; the active one when `version` is empty."""
        if not version:
            active = self.store.active_policy()
            if active is None:
                raise NotFound("no policy is active")
            version = active
        stored = self.store.get_policy(version)
        if stored is None:
            raise NotFound(f"policy version {version!r} is not stored")
        return self._view(stored)

    def list_policies(self) -> PolicyCatalog:
        active, shadow = self.store.active_policy(), self.store.shadow_policy()
        pins = self.store.list_pins()
        views = tuple(_view(p, active, shadow, pins) for p in self.store.list_policies())
        return PolicyCatalog(views, active, shadow)

    def activate_policy(self, version: str, actor: str) -> PolicyView:
        if not version:
            raise InvalidArgument("version", "must not be empty")
        self.store.activate_policy(version, actor)
        logger.info("[ActivatePolicy] %s by %s", version, actor)
        return self.get_policy(version)

    def pin_policy(self, version: str, selector: RunSelector, actor: str) -> PolicyView:
        """Runs the selector matches use `version` instead of the active one."""
        if not version:
            raise InvalidArgument("version", "must not be empty")
        _check_selector(selector)
        self.store.pin_policy(PolicyPin(selector, version, self._clock(), actor))
        logger.info("[PinPolicy] %s to %s by %s", version, selector, actor)
        return self.get_policy(version)

    def unpin_policy(self, selector: RunSelector, actor: str) -> bool:
        _check_selector(selector)
        removed = self.store.unpin_policy(selector)
        logger.info("[UnpinPolicy] %s by %s: %s", selector, actor, removed)
        return removed

    def set_shadow_policy(self, version: str, actor: str) -> PolicyCatalog:
        """Shadow a stored version (empty: stop shadowing)."""
        self.store.set_shadow_policy(version or None, actor, self._clock())
        logger.info("[SetShadowPolicy] %s by %s", version or "(none)", actor)
        return self.list_policies()

    def shadow_summary(self, version: str) -> ShadowSummary:
        """How often `version` (empty: the current shadow) decided differently."""
        if not version:
            shadow = self.store.shadow_policy()
            if shadow is None:
                raise NotFound("no shadow policy is set; name a version")
            version = shadow
        elif self.store.get_policy(version) is None:
            raise NotFound(f"policy version {version!r} is not stored")
        return self.store.shadow_summary(version)

    def _view(self, policy: PolicyVersion) -> PolicyView:
        return _view(
            policy, self.store.active_policy(), self.store.shadow_policy(), self.store.list_pins()
        )

    # --- audit ------------------------------------------------------------------------

    def list_runs(self, run_filter: RunFilter) -> list[RunSummary]:
        return self.store.list_runs(run_filter)

    def get_run(self, run_id: str) -> RunDetail:
        """A run's epochs (report, decision, shadow) in order and all its overrides."""
        if not run_id.strip():
            raise InvalidArgument("run_id", "must not be empty")
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} is not recorded")
        summary, pairs = run
        shadows = {d.epoch: d for d in self.store.shadow_decisions(run_id)}
        overrides = self.store.list_overrides(run_id, include_cleared=True)
        epochs = tuple(RunEpoch(r, d, shadows.get(r.epoch)) for r, d in pairs)
        return RunDetail(summary, epochs, tuple(overrides))

    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        return self.store.list_decisions(decision_filter)

    def watch_decisions(self, decision_filter: DecisionFilter) -> DecisionWatch:
        """A live tail from now on; decisions committed before this call are not sent."""
        if self.closed:
            raise StoreUnavailable("the server is shutting down")
        return DecisionWatch(self, decision_filter)


def _decision(
    report: Report, verdict: Verdict, version: str, now: datetime, context: RunContext
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
    )


def _view(
    policy: PolicyVersion, active: str | None, shadow: str | None, pins: list[PolicyPin]
) -> PolicyView:
    return PolicyView(
        policy=policy,
        active=policy.version == active,
        shadow=policy.version == shadow,
        pins=tuple(p.selector for p in pins if p.version == policy.version),
    )
