"""The effect of every intervention, override and rollback, derived from the reports after it.

An effect is never stored: it is computed on read from a run's current history,
so it always reflects the whole record (a horizon still forming fills in as the
run reports). For a decision at epoch d steered by policy P:

- the metric is P's monitored value (`plateau.monitored_value`: raw, no EMA; a
  missing val_loss falls back to train_loss as the policy does), the mode P's
  plateau.mode;
- `best_before` is the best finite value of the epochs <= d, `best_after` the best
  finite value of the epochs d+1 .. d+h, h the horizon (default P's
  guard.guard_epochs + plateau.patience: the guard's window, then as long as the
  plateau rule waits before it fires again);
- `relative_change` is (best_after - best_before) / |best_before|, signed so that
  > 0 is better (the plain difference when best_before is 0); `new_best` says a
  value in the horizon beat best_before strictly (no threshold), and
  `epochs_to_new_best` after how many epochs the first one came.

`summarize` sums effects per policy version, kind, gradient-norm bucket and loss
mix: the counts an operator checks the policy's LR scales and mixes against.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from control_server.domain import (
    Action,
    Decision,
    Effect,
    InvalidArgument,
    Override,
    Report,
    RunEpoch,
    RunFilter,
    RunSelector,
    Source,
)
from control_server.policy.document import InterventionConfig, PolicyDoc
from control_server.policy.plateau import monitored_value
from control_server.policy.scaling import lr_scale
from control_server.store import Store

__all__ = [
    "MAX_HORIZON",
    "EffectGroup",
    "EffectSummary",
    "EffectsService",
    "check_horizon",
    "effect_kind",
    "grad_norm_bucket",
    "loss_mix",
    "relative_change",
    "rollbacks",
    "run_effects",
    "summarize",
]

#: The longest horizon a caller may ask for, in epochs (nnU-Net trains 1000).
MAX_HORIZON = 10_000

PolicyLookup = Callable[[str], PolicyDoc]


@dataclass(frozen=True)
class EffectGroup:
    """The effects of one group of decisions (one policy version, kind, bucket or mix).

    The mean and median relative change are over the group's effects that have one
    (a value after the decision is reported), complete or not; the mean epochs to a
    new best over those that reached one. None: no effect had one.
    """

    key: str
    count: int
    complete: int
    new_best: int
    rolled_back: int
    mean_relative_change: float | None
    median_relative_change: float | None
    mean_epochs_to_new_best: float | None


@dataclass(frozen=True)
class EffectSummary:
    """Effects summed per policy version, kind, gradient-norm bucket and loss mix, each
    tuple sorted by key. `runs` counts the runs read, `decisions` the effects summed."""

    runs: int
    decisions: int
    by_policy: tuple[EffectGroup, ...]
    by_kind: tuple[EffectGroup, ...]
    by_grad_norm_bucket: tuple[EffectGroup, ...]
    by_loss_mix: tuple[EffectGroup, ...]


# --- one run ----------------------------------------------------------------------------


def run_effects(
    epochs: Sequence[tuple[Report, Decision]],
    policy: PolicyLookup,
    horizon: int = 0,
    overrides: Iterable[Override] = (),
) -> dict[int, Effect]:
    """The effect of each intervention, override and rollback of a run, by decision epoch.

    `epochs` is the run's current history in epoch order; `policy` finds the document
    of a decision's policy version; `horizon` > 0 replaces each policy's default;
    `overrides` are the run's overrides (cleared ones included), for the epoch an
    operator's ROLLBACK names. Late decisions were never applied: they have no effect
    and undo nothing. See `rollbacks` for when an effect counts as rolled back.
    """
    if horizon < 0:
        raise ValueError(f"horizon must be >= 0, but got {horizon}.")
    undone = rollbacks(epochs, overrides)
    effects: dict[int, Effect] = {}
    for index, (_, decision) in enumerate(epochs):
        kind = effect_kind(decision)
        if kind is None:
            continue
        doc = policy(decision.policy_version)
        effects[decision.epoch] = _effect(
            doc, kind, epochs, index, horizon, undone.get(decision.epoch)
        )
    return effects


def effect_kind(decision: Decision) -> str | None:
    """Kind "1", "2", ... for automatic intervention k, "override" for an operator's
    intervention, "rollback" for any rollback; None for every other decision and
    for late ones (recorded, never applied)."""
    if decision.late:
        return None
    if decision.action == Action.ROLLBACK:
        return "rollback"
    if decision.action != Action.INTERVENE:
        return None
    if decision.source == Source.OVERRIDE:
        return "override"
    return str(decision.intervention_index)


def rollbacks(
    epochs: Sequence[tuple[Report, Decision]], overrides: Iterable[Override] = ()
) -> dict[int, int]:
    """The epoch of each undone intervention -> the epoch of the ROLLBACK that undid it.

    The rule follows what each rollback restores:
    - the divergence guard's (source SAFETY) undoes the guard's mark, which is the
      latest automatic intervention before it (an operator's intervention sets no
      mark, so one in between does not change which); a rollback in between would
      have cleared the mark, so then it undoes nothing;
    - an operator's (source OVERRIDE) undoes the epoch its override names
      (`Override.rollback_epoch`, found through `Decision.override_id`); without that
      override on record, the latest intervention before it, automatic or not, as
      `admin.rollback_target` chose when the override was set.
    Late decisions neither undo nor are undone.
    """
    named = {o.override_id: o.rollback_epoch for o in overrides if o.override_id is not None}
    undone: dict[int, int] = {}
    last_auto: int | None = None  # the guard's mark: cleared by any rollback
    last_any: int | None = None
    for _, decision in epochs:
        if decision.late:
            continue
        if decision.action == Action.INTERVENE:
            last_any = decision.epoch
            if decision.source == Source.POLICY:
                last_auto = decision.epoch
        elif decision.action == Action.ROLLBACK:
            if decision.source == Source.OVERRIDE:
                target = _named_target(named, decision.override_id, last_any)
            else:
                target = last_auto
            if target is not None and target < decision.epoch:
                undone.setdefault(target, decision.epoch)
            last_auto = last_any = None
    return undone


def _named_target(
    named: dict[int, int | None], override_id: int | None, fallback: int | None
) -> int | None:
    """The epoch the operator's ROLLBACK override names, else `fallback`."""
    target = named.get(override_id) if override_id is not None else None
    return fallback if target is None else target


def _effect(
    doc: PolicyDoc,
    kind: str,
    epochs: Sequence[tuple[Report, Decision]],
    index: int,
    horizon: int,
    rolled_back_at: int | None,
) -> Effect:
    report, decision = epochs[index]
    cfg, mode = doc.plateau, doc.plateau.mode
    h = horizon or doc.guard.guard_epochs + doc.plateau.patience
    metric, at_decision = monitored_value(cfg, report)
    before = _best(mode, (monitored_value(cfg, r)[1] for r, _ in epochs[: index + 1]))
    window = list(
        itertools.takewhile(lambda r: r.epoch <= decision.epoch + h, _later(epochs, index))
    )
    after = [(r.epoch, monitored_value(cfg, r)[1]) for r in window]
    best_after = _best(mode, (v for _, v in after))
    first_new_best = _first_better(mode, after, before)
    return Effect(
        epoch=decision.epoch,
        policy_version=decision.policy_version,
        kind=kind,
        metric=metric,
        mode=mode,
        value_at_decision=at_decision,
        best_before=before,
        best_after=best_after,
        relative_change=relative_change(mode, before, best_after),
        new_best=first_new_best is not None,
        epochs_to_new_best=None if first_new_best is None else first_new_best - decision.epoch,
        rolled_back=rolled_back_at is not None,
        rolled_back_at_epoch=rolled_back_at,
        horizon=h,
        epochs_observed=len(window),
        grad_norm_bucket=grad_norm_bucket(doc.interventions, report.avg_gradient_norm),
        loss_mix=loss_mix(decision),
    )


def relative_change(mode: str, before: float | None, after: float | None) -> float | None:
    """(after - before) / |before|, signed so that > 0 is better; the plain difference
    when `before` is 0; None when either is missing."""
    if before is None or after is None:
        return None
    gain = after - before if mode == "max" else before - after
    return gain if before == 0 else gain / abs(before)


def grad_norm_bucket(cfg: InterventionConfig, grad_norm: float | None) -> str:
    """The policy's gradient-norm bucket of `grad_norm`, e.g. "0.1<=g<=0.5", as the
    policy scales the LR; "missing" for no norm (or NaN, which the policy treats as
    missing)."""
    if grad_norm is None or math.isnan(grad_norm):
        return "missing"
    # The policy's own comparison (edges inclusive where it says so), asked for the
    # bucket's index instead of its scale.
    index = int(lr_scale(replace(cfg, lr_scales=(0.0, 1.0, 2.0, 3.0)), grad_norm))
    e0, e1, e2 = (f"{e:g}" for e in cfg.grad_norm_edges)
    return (f"g<{e0}", f"{e0}<=g<{e1}", f"{e1}<=g<={e2}", f"g>{e2}")[index]


def loss_mix(decision: Decision) -> str:
    """The weights the decision set, e.g. "dice=0.6,focal=0.4" (sorted); "unchanged"."""
    weights = decision.loss_weights
    if not weights:
        return "unchanged"
    return ",".join(f"{name}={weights[name]:g}" for name in sorted(weights))


def _later(epochs: Sequence[tuple[Report, Decision]], index: int) -> Iterator[Report]:
    """The reports after the `index`th epoch, in epoch order."""
    return (epochs[i][0] for i in range(index + 1, len(epochs)))


def _first_better(
    mode: str, values: Iterable[tuple[int, float | None]], best: float | None
) -> int | None:
    """The first epoch whose finite value beats `best` strictly (any finite one when
    there is no best yet); None when none does."""
    for epoch, value in values:
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value > best if mode == "max" else value < best):
            return epoch
    return None


def _best(mode: str, values: Iterable[float | None]) -> float | None:
    """The best finite value (None: there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


# --- many runs --------------------------------------------------------------------------


def summarize(effects: Iterable[Effect], runs: int) -> EffectSummary:
    """Effects summed per policy version, kind, gradient-norm bucket and loss mix."""
    effects = list(effects)
    return EffectSummary(
        runs=runs,
        decisions=len(effects),
        by_policy=_groups(effects, lambda e: e.policy_version),
        by_kind=_groups(effects, lambda e: e.kind),
        by_grad_norm_bucket=_groups(effects, lambda e: e.grad_norm_bucket),
        by_loss_mix=_groups(effects, lambda e: e.loss_mix),
    )


def _groups(effects: Sequence[Effect], key: Callable[[Effect], str]) -> tuple[EffectGroup, ...]:
    grouped: dict[str, list[Effect]] = {}
    for effect in effects:
        grouped.setdefault(key(effect), []).append(effect)
    return tuple(_group(k, grouped[k]) for k in sorted(grouped))


def _group(key: str, effects: Sequence[Effect]) -> EffectGroup:
    changes = [e.relative_change for e in effects if e.relative_change is not None]
    to_best = [e.epochs_to_new_best for e in effects if e.epochs_to_new_best is not None]
    return EffectGroup(
        key=key,
        count=len(effects),
        complete=sum(e.complete for e in effects),
        new_best=sum(e.new_best for e in effects),
        rolled_back=sum(e.rolled_back for e in effects),
        mean_relative_change=statistics.fmean(changes) if changes else None,
        median_relative_change=statistics.median(changes) if changes else None,
        mean_epochs_to_new_best=statistics.fmean(to_best) if to_best else None,
    )


# --- reading the store ------------------------------------------------------------------


class EffectsService:
    """Effects read from the store: one run's (GetRun) and summed over runs
    (GetEffectSummary). `policies` finds a version's document (a `PolicyCache`'s get)."""

    def __init__(self, store: Store, policies: PolicyLookup) -> None:
        self._store = store
        self._policies = policies

    def for_run(
        self, run_id: str, epochs: Sequence[RunEpoch], horizon: int = 0
    ) -> tuple[RunEpoch, ...]:
        """`epochs` (a page of the run) with their effects, judged over the run's whole
        current history: a page's last decisions need the reports of the next page."""
        check_horizon(horizon, "effect_horizon")
        if not any(effect_kind(e.decision) for e in epochs):
            return tuple(epochs)
        effects = self._effects(run_id, horizon)
        return tuple(replace(e, effect=effects.get(e.decision.epoch)) for e in epochs)

    def summary(
        self,
        selector: RunSelector,
        policy_version: str = "",
        horizon: int = 0,
        run_ids: set[str] | None = None,
    ) -> EffectSummary:
        """The effects of the runs whose labels match `selector` (and are in `run_ids`,
        when given), of decisions made by `policy_version` (empty: any)."""
        check_horizon(horizon, "horizon")
        run_filter = RunFilter(
            dataset=selector.dataset,
            configuration=selector.configuration,
            fold=selector.fold,
            limit=0,
        )
        runs = [
            r.run_id
            for r in self._store.list_runs(run_filter)
            if run_ids is None or r.run_id in run_ids
        ]
        effects = [
            effect
            for run_id in sorted(runs)
            for effect in self._effects(run_id, horizon).values()
            if not policy_version or effect.policy_version == policy_version
        ]
        return summarize(effects, len(runs))

    def _effects(self, run_id: str, horizon: int) -> dict[int, Effect]:
        found = self._store.get_run(run_id)
        if found is None:
            return {}
        overrides = self._store.list_overrides(run_id, include_cleared=True)
        return run_effects(found[1], self._policies, horizon, overrides)


def check_horizon(horizon: int, field: str) -> int:
    """`horizon` when it is one a caller may ask for (0: each policy's default);
    InvalidArgument naming `field` otherwise."""
    if not 0 <= horizon <= MAX_HORIZON:
        raise InvalidArgument(
            field,
            f"must be between 0 and {MAX_HORIZON} epochs (0: the policy's default), "
            f"but got {horizon}",
        )
    return horizon
