"""The operators' use cases (ControlAdmin): overrides, policy rollout, audit queries.

Speaks domain types only and raises domain errors; the servicer maps them to
status codes. Every call is store work, run in a worker thread by the
servicer. ReportEpoch has its own module (report_epoch.py, run by the decider
process) and WatchDecisions its own (watch.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import yaml

from control_server.domain import (
    Decision,
    DecisionFilter,
    InvalidArgument,
    NotFound,
    Override,
    PolicyCatalog,
    PolicyPin,
    PolicyVersion,
    PolicyView,
    RunDetail,
    RunEpoch,
    RunFilter,
    RunSelector,
    RunSummary,
    ShadowSummary,
)
from control_server.policy.document import PolicyDoc, parse_policy, parse_policy_yaml
from control_server.report_epoch import utc_now
from control_server.store import Store
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


class AdminService:
    """The operators' use cases."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self._clock = clock

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


def _view(
    policy: PolicyVersion, active: str | None, shadow: str | None, pins: list[PolicyPin]
) -> PolicyView:
    return PolicyView(
        policy=policy,
        active=policy.version == active,
        shadow=policy.version == shadow,
        pins=tuple(p.selector for p in pins if p.version == policy.version),
    )
