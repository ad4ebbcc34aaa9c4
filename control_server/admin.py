"""The operators' use cases (ControlAdmin): overrides, policy rollout, audit queries.

Speaks domain types only and raises domain errors; the servicer maps them to
status codes. Every call is store work, run in a worker thread by the
servicer. ReportEpoch has its own module (report_epoch.py, run by the decider
process) and WatchDecisions its own (watch.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from control_server.domain import (
    Action,
    AuditEvent,
    AuditFilter,
    Decision,
    DecisionFilter,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Override,
    PolicyCatalog,
    PolicyPin,
    PolicyVersion,
    PolicyView,
    Report,
    RunDetail,
    RunEpoch,
    RunFilter,
    RunLabels,
    RunSelector,
    RunSummary,
    ShadowSummary,
)
from control_server.effects import EffectsService, EffectSummary
from control_server.fleet import FleetView
from control_server.policy.document import PolicyDoc, parse_policy_source
from control_server.report_epoch import PolicyCache, utc_now
from control_server.runs import RunLifecycle
from control_server.store import Store
from control_server.what_if import WhatIf, replay_candidate
from trainer_client.vocabulary import LossWeightError, check_loss_weights

logger = logging.getLogger(__name__)


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
    if override.action is not None:
        _check_operator_action(override)
        return
    if override.lr is not None and not (math.isfinite(override.lr) and override.lr > 0):
        raise InvalidArgument("lr", f"must be a finite number > 0, but got {override.lr!r}")
    try:
        if override.loss_weights:  # none: the override leaves the weights alone
            check_loss_weights(override.loss_weights)
    except LossWeightError as exc:
        where = "loss_weights" if exc.component is None else f"loss_weights[{exc.component!r}]"
        raise InvalidArgument(where, exc.problem) from None
    if override.lr is None and not override.loss_weights and not override.hold_interventions:
        raise InvalidArgument(
            "override", "set at least one of lr, loss_weights and hold_interventions"
        )
    if override.exceed_lr_cap:
        if override.lr is None:
            raise InvalidArgument("exceed_lr_cap", "applies to lr, but lr is not set")
        if not override.reason.strip():
            raise InvalidArgument(
                "reason", "must say why the LR may exceed the policy's cap (exceed_lr_cap is set)"
            )


def _check_operator_action(override: Override) -> None:
    """A STOP or ROLLBACK sets nothing else (a ROLLBACK's LR and weights are the server's)."""
    action = override.action
    if action not in (Action.STOP, Action.ROLLBACK):
        name = action.value if action is not None else "none"
        raise InvalidArgument("action", f"must be STOP or ROLLBACK, but got {name}")
    for field_name, is_set in (
        ("lr", override.lr is not None),
        ("loss_weights", bool(override.loss_weights)),
        ("hold_interventions", override.hold_interventions),
        ("exceed_lr_cap", override.exceed_lr_cap),
    ):
        if is_set:
            raise InvalidArgument(
                field_name, f"must not be set with action {action.value}, which sets nothing else"
            )


def rollback_target(override: Override, epochs: Sequence[tuple[Report, Decision]]) -> Override:
    """A ROLLBACK override with what it restores: the LR and weights reported at the run's
    last intervention (automatic or an override's), which the trainer snapshotted before
    applying it. Raises FailedPrecondition when there is none left to undo."""
    for report, decision in reversed(epochs):
        if decision.action == Action.ROLLBACK:
            raise FailedPrecondition(
                f"run {override.run_id!r} has no intervention to roll back: its last one was "
                f"already rolled back at epoch {decision.epoch}"
            )
        if decision.action == Action.INTERVENE:
            return replace(
                override,
                lr=report.current_lr,
                loss_weights=report.loss_weights,
                rollback_epoch=report.epoch,
            )
    what = f"none in its {len(epochs)} reported epochs" if epochs else "it has not reported yet"
    raise FailedPrecondition(
        f"run {override.run_id!r} has no intervention to roll back ({what}); "
        "a STOP, or an override of lr or loss_weights, may be what is meant"
    )


def _check_selector(selector: RunSelector) -> None:
    if selector.specificity == 0:
        raise InvalidArgument("selector", "set at least one of dataset, configuration and fold")


class AdminService:
    """The operators' use cases."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime] = utc_now,
        runs: RunLifecycle | None = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self._policies = PolicyCache(store)
        self.effects = EffectsService(store, self._policies.get)
        self.fleet = FleetView(store, self._policies.get)
        #: Whose view of a run's status (STALE) the run reads take.
        self.runs = runs if runs is not None else RunLifecycle(store, clock)

    # --- overrides --------------------------------------------------------------------

    def set_override(
        self, override: Override, actor: str, *, allow_unknown_run: bool = False
    ) -> Override:
        """Validate and store an override; it replaces the run's active one (named in
        the result's `replaced_override_id`).

        A run id the server has never seen is NotFound (a typo, most likely) unless
        `allow_unknown_run`. An LR above the cap of the policy steering the run is
        refused unless `exceed_lr_cap`. STOP and ROLLBACK apply once; a ROLLBACK
        with no intervention to undo is FailedPrecondition.
        """
        validate_override(override)
        found = self.store.get_run(override.run_id)
        if found is None and not allow_unknown_run:
            raise NotFound(
                f"run {override.run_id!r} has never reported to this server; check the run id, "
                "or set allow_unknown_run (controlctl: --allow-unknown-run) to set an override "
                "for a run that has not started yet"
            )
        epochs = found[1] if found is not None else []
        if override.action is not None:
            override = replace(override, once=True)
            if override.action == Action.ROLLBACK:
                override = rollback_target(override, epochs)
        elif override.lr is not None:
            self._check_lr_cap(override, found[0].labels if found else None, epochs)
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
            "[SetOverride] run=%s override=%s by %s: action=%s lr=%s weights=%s hold=%s once=%s "
            "exceed_lr_cap=%s replaced=%s",
            stored.run_id,
            stored.override_id,
            actor,
            stored.action.value if stored.action is not None else "-",
            stored.lr,
            dict(stored.loss_weights),
            stored.hold_interventions,
            stored.once,
            stored.exceed_lr_cap,
            stored.replaced_override_id,
        )
        return stored

    def _check_lr_cap(
        self,
        override: Override,
        labels: RunLabels | None,
        epochs: Sequence[tuple[Report, Decision]],
    ) -> None:
        """Refuse an LR above the cap of the policy that steers the run (pinned or active):
        its interventions.max_lr, or else the run's initial_lr, as its interventions are
        capped. A run that has not reported under a policy without max_lr has no cap yet."""
        lr = override.lr
        next_epoch = epochs[-1][0].epoch + 1 if epochs else 0
        context = self.store.load_context(override.run_id, next_epoch, labels)
        version = context.steering_policy
        if lr is None or version is None or override.exceed_lr_cap:
            return
        doc = self._policies.get(version)
        steering = f"policy {doc.name}@{version}"
        if doc.interventions.max_lr is not None:
            cap, what = doc.interventions.max_lr, f"the interventions.max_lr of {steering}"
        elif epochs:
            cap = epochs[-1][0].initial_lr
            what = f"the run's initial_lr ({steering} sets no interventions.max_lr)"
        else:
            return
        if lr > cap:
            raise InvalidArgument(
                "lr",
                f"must be at most {cap:g}, {what}, but got {lr!r}; set exceed_lr_cap "
                "(controlctl: --exceed-lr-cap) with a reason to go above it",
            )

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
        doc = parse_policy_source(source)
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
        """Runs matching the filter, most recently active first, with their status
        (ACTIVE and STALE are told apart here, so their filter reads every run not
        finished and cuts to the limit after)."""
        status = run_filter.status
        if status is None or status.finished:
            runs = self.runs.with_status(self.store.list_runs(run_filter))
        else:
            unfinished = self.runs.with_status(self.store.list_runs(replace(run_filter, limit=0)))
            runs = [r for r in unfinished if r.status is status][: run_filter.limit]
        return self.fleet.enrich(runs, run_filter.trend_points)

    def get_run(
        self, run_id: str, from_epoch: int = 0, page_size: int = 0, effect_horizon: int = 0
    ) -> RunDetail:
        """One page of a run: up to `page_size` epochs (report, decision, shadow, and the
        effect of an intervention or rollback over `effect_horizon` epochs, 0: the
        policy's default) from `from_epoch` on (<= 0: all), the superseded epochs in the
        page's range, and all its overrides and attempts."""
        if not run_id.strip():
            raise InvalidArgument("run_id", "must not be empty")
        # One more than the page, to know whether another page follows.
        run = self.store.get_run(run_id, from_epoch, page_size + 1 if page_size > 0 else 0)
        if run is None:
            raise NotFound(f"run {run_id!r} is not recorded")
        summary, pairs = run
        next_epoch: int | None = None
        if page_size > 0 and len(pairs) > page_size:
            next_epoch = pairs[page_size][0].epoch
            pairs = pairs[:page_size]
        last = next_epoch - 1 if next_epoch is not None else None
        shadows = {d.epoch: d for d in self.store.shadow_decisions(run_id, from_epoch, last)}
        overrides = self.store.list_overrides(run_id, include_cleared=True)
        epochs = self.effects.for_run(
            run_id, [RunEpoch(r, d, shadows.get(r.epoch)) for r, d in pairs], effect_horizon
        )
        superseded = tuple(
            RunEpoch(r, d) for r, d in self.store.superseded(run_id, from_epoch, last)
        )
        return RunDetail(
            self.fleet.enrich(self.runs.with_status([summary]))[0],
            epochs,
            tuple(overrides),
            attempts=tuple(self.runs.attempts(run_id)),
            superseded=superseded,
            next_epoch=next_epoch,
        )

    def list_decisions(self, decision_filter: DecisionFilter) -> list[Decision]:
        return self.store.list_decisions(decision_filter)

    def list_audit_events(self, audit_filter: AuditFilter) -> list[AuditEvent]:
        return self.store.list_admin_events(audit_filter)

    def replay_policy(
        self, version: str, document: str, selector: RunSelector, limit: int, max_differences: int
    ) -> WhatIf:
        """What a candidate would have decided on the `limit` most recently active runs
        the selector matches, listing at most `max_differences` differences. The
        candidate is the stored `version`, or else `document` (YAML or JSON text),
        validated as PutPolicy does and not stored."""
        if version:
            if self.store.get_policy(version) is None:
                raise NotFound(f"policy version {version!r} is not stored")
            candidate = self._policies.get(version)
        elif document.strip():
            candidate = parse_policy_source(document)
        else:
            raise InvalidArgument("candidate", "set either version (stored) or yaml (a document)")
        run_filter = RunFilter(
            dataset=selector.dataset,
            configuration=selector.configuration,
            fold=selector.fold,
            limit=limit,
        )
        run_ids = [r.run_id for r in self.store.list_runs(run_filter)]
        return replay_candidate(self.store, candidate, run_ids, max_differences)

    def effect_summary(
        self, selector: RunSelector, policy_version: str, horizon: int, experiment: str = ""
    ) -> EffectSummary:
        """The effects of the matching runs' interventions, overrides and rollbacks, summed
        per policy version, kind, gradient-norm bucket and loss mix; only the runs
        assigned to `experiment` when it is set (NotFound: no such experiment)."""
        run_ids: set[str] | None = None
        if experiment:
            if self.store.get_experiment(experiment) is None:
                raise NotFound(f"experiment {experiment!r} does not exist")
            run_ids = {a.run_id for a in self.store.assignments(experiment)}
        return self.effects.summary(selector, policy_version, horizon, run_ids)


def _view(
    policy: PolicyVersion, active: str | None, shadow: str | None, pins: list[PolicyPin]
) -> PolicyView:
    return PolicyView(
        policy=policy,
        active=policy.version == active,
        shadow=policy.version == shadow,
        pins=tuple(p.selector for p in pins if p.version == policy.version),
    )
