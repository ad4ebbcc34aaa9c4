"""Policy experiments: arms, the deterministic assignment of runs, promote and end.

An experiment assigns each new run its selector matches to one arm, once, at
the run's first StartRun. The arm is a pure function of (experiment name, run
id, arms): every replica, and every restart, computes the same one, and the
store keeps the first assignment made (a resumed attempt keeps its arm).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from control_server.domain import (
    Action,
    Assignment,
    Experiment,
    ExperimentArm,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolicyPin,
    PolicyVersion,
    RunLabels,
    RunSelector,
    RunSummary,
)
from control_server.experiment_stats import (
    Comparison,
    Distribution,
    compare_paired,
    compare_unpaired,
    distribution,
)
from control_server.policy.document import parse_policy
from control_server.report_epoch import utc_now
from control_server.store import Store

if TYPE_CHECKING:
    from control_server.runs import RunLifecycle

__all__ = [
    "OBSERVE_ONLY",
    "ArmReport",
    "ExperimentReport",
    "ExperimentService",
    "assign_arm",
    "assign_new_run",
    "match",
]

logger = logging.getLogger(__name__)

#: The intervals' confidence when a request names none.
DEFAULT_CONFIDENCE = 0.95


def assign_arm(experiment: str, run_id: str, arms: Sequence[ExperimentArm]) -> ExperimentArm:
    """The arm `run_id` belongs to: a uniform draw from SHA-256(experiment, run id)
    placed on the arms' cumulative shares (in the order the arms were given)."""
    if not arms:
        raise ValueError("assign_arm() needs at least one arm, but got none.")
    digest = hashlib.sha256(f"{experiment}\0{run_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64 * sum(a.share for a in arms)
    total = 0.0
    for arm in arms:
        total += arm.share
        if draw < total:
            return arm
    return arms[-1]  # float rounding at the very top of the range


# --- the observe-only arm ---------------------------------------------------------------

#: The built-in policy of observe-only arms: it records every report and never
#: intervenes (no budget, no guard, a non-finite loss does not stop the run), so its
#: runs are the uncontrolled baseline. Operators' overrides still apply to them.
OBSERVE_ONLY = parse_policy(
    {
        "name": "observe-only",
        "description": "Records every report and never intervenes: an experiment's baseline.",
        "interventions": {"max_interventions": 0},
        "guard": {"guard_epochs": 0, "on_nonfinite": "none"},
    }
)

#: Labels runs can be paired by in a report.
PAIR_LABELS = ("fold", "dataset", "configuration", "host")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def match(experiments: Sequence[Experiment], labels: RunLabels) -> Experiment | None:
    """The running experiment whose selector matches `labels` most specifically (ties:
    the most recently started), as pins are chosen."""
    matching = [
        e
        for e in experiments
        if e.running
        and all(
            not want or want == getattr(labels, key)
            for key, want in (
                ("dataset", e.selector.dataset),
                ("configuration", e.selector.configuration),
                ("fold", e.selector.fold),
            )
        )
    ]
    if not matching:
        return None
    return max(matching, key=lambda e: (e.selector.specificity, e.started_at, e.name))


def assign_new_run(
    store: Store, run_id: str, labels: RunLabels, actor: str, now: datetime
) -> Assignment | None:
    """At StartRun: the run's arm — the one it has, or, for a run the store does not
    know yet, one drawn now from the running experiment its labels match."""
    existing = store.assignment(run_id)
    if existing is not None:
        return existing
    if store.load_context(run_id, 0).attempt != 0:
        return None  # started before any experiment matched it: it keeps its policy
    experiment = match(store.list_experiments(), labels)
    if experiment is None:
        return None
    arm = assign_arm(experiment.name, run_id, experiment.arms)
    stored = store.assign_run(
        Assignment(run_id, experiment.name, arm.name, arm.policy_version, now), actor
    )
    if stored is not None:
        logger.info(
            "[StartRun] run=%s assigned to arm %r of experiment %r (policy %s)",
            run_id,
            stored.arm,
            stored.experiment,
            stored.policy_version,
        )
    return stored


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmReport:
    """One arm's runs and outcomes; `vs_baseline` is None for the baseline arm."""

    arm: ExperimentArm
    run_ids: tuple[str, ...]
    runs_by_status: Mapping[str, int]
    interventions: int
    rollbacks: int
    stops: int
    final_dice: Distribution
    epochs_to_best: Distribution
    vs_baseline: Comparison | None


@dataclass(frozen=True)
class ExperimentReport:
    experiment: Experiment
    arms: tuple[ArmReport, ...]
    confidence: float
    pair_by: str


def _arm_report(
    arm: ExperimentArm,
    runs: Sequence[RunSummary],
    baseline: Sequence[RunSummary] | None,
    pair_by: str,
    confidence: float,
) -> ArmReport:
    dice = _dice(runs)
    comparison: Comparison | None = None
    if baseline is not None:
        if pair_by:
            comparison = compare_paired(
                _paired(runs, pair_by), _paired(baseline, pair_by), confidence
            )
        else:
            comparison = compare_unpaired(
                [d for _, d in dice], [d for _, d in _dice(baseline)], confidence
            )
    return ArmReport(
        arm=arm,
        run_ids=tuple(r.run_id for r in runs),
        runs_by_status=dict(sorted(Counter(r.status.value for r in runs).items())),
        interventions=sum(r.intervention_count for r in runs),
        rollbacks=sum(r.rollback_count for r in runs),
        stops=sum(
            1 for r in runs if r.last_decision is not None and r.last_decision.action == Action.STOP
        ),
        final_dice=distribution([d for _, d in dice]),
        epochs_to_best=distribution(
            [
                float(r.final_metrics.best_ema_epoch)
                for r in runs
                if r.final_metrics.best_ema_epoch is not None
            ]
        ),
        vs_baseline=comparison,
    )


def _dice(runs: Sequence[RunSummary]) -> list[tuple[RunSummary, float]]:
    return [
        (r, r.final_metrics.mean_dice)
        for r in runs
        if r.final_metrics.mean_dice is not None and math.isfinite(r.final_metrics.mean_dice)
    ]


def _paired(runs: Sequence[RunSummary], label: str) -> dict[str, float]:
    """Final Dice by the value of `label` (runs sharing a value: their mean)."""
    groups: dict[str, list[float]] = {}
    for run, dice in _dice(runs):
        groups.setdefault(getattr(run.labels, label), []).append(dice)
    return {key: statistics.fmean(values) for key, values in groups.items()}


# --- the use cases ------------------------------------------------------------------------


class ExperimentService:
    """Start, read, report, promote and end experiments (ControlAdmin)."""

    def __init__(
        self, store: Store, runs: RunLifecycle, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.store = store
        self._runs = runs
        self._clock = clock

    def start(
        self,
        name: str,
        selector: RunSelector,
        arms: Sequence[ExperimentArm],
        baseline_arm: str,
        description: str,
        actor: str,
    ) -> Experiment:
        """Validate and store a running experiment; InvalidArgument names the bad field."""
        _check_name(name)
        if selector.specificity == 0:
            raise InvalidArgument("selector", "set at least one of dataset, configuration and fold")
        arms = _checked_arms(arms)
        if any(a.observe_only for a in arms):
            store_observe_only(self.store, self._clock)
            arms = [
                replace(a, policy_version=OBSERVE_ONLY.version) if a.observe_only else a
                for a in arms
            ]
        baseline = baseline_arm or next((a.name for a in arms if a.observe_only), arms[0].name)
        if baseline not in {a.name for a in arms}:
            raise InvalidArgument(
                "baseline_arm",
                f"must name one of the arms ({', '.join(a.name for a in arms)}), "
                f"but got {baseline!r}",
            )
        experiment = Experiment(
            name=name,
            selector=selector,
            arms=tuple(arms),
            baseline_arm=baseline,
            started_at=self._clock(),
            started_by=actor,
            description=description,
        )
        self.store.start_experiment(experiment)
        logger.info(
            "[StartExperiment] %s on %s by %s: arms %s, baseline %s",
            name,
            selector,
            actor,
            ", ".join(f"{a.name}={a.policy_version}x{a.share:g}" for a in arms),
            baseline,
        )
        return self.get(name)

    def get(self, name: str) -> Experiment:
        if not name.strip():
            raise InvalidArgument("name", "must not be empty")
        found = self.store.get_experiment(name)
        if found is None:
            raise NotFound(f"experiment {name!r} does not exist")
        return found

    def list(self, include_ended: bool) -> list[Experiment]:
        return self.store.list_experiments(include_ended)

    def report(self, name: str, pair_by: str = "", confidence: float = 0.0) -> ExperimentReport:
        """Per arm: its runs by status, interventions, rollbacks, stops, final Dice and
        epochs to best, and its final Dice against the baseline arm's."""
        experiment = self.get(name)
        if pair_by and pair_by not in PAIR_LABELS:
            raise InvalidArgument(
                "pair_by", f"must be empty or one of {', '.join(PAIR_LABELS)}, but got {pair_by!r}"
            )
        confidence = confidence or DEFAULT_CONFIDENCE
        if not (math.isfinite(confidence) and 0 < confidence < 1):
            raise InvalidArgument(
                "confidence", f"must be between 0 and 1 (e.g. 0.95), but got {confidence!r}"
            )
        by_arm: dict[str, list[RunSummary]] = {a.name: [] for a in experiment.arms}
        for assignment in self.store.assignments(name):
            found = self.store.get_run(assignment.run_id, 0, 1)
            if found is not None and assignment.arm in by_arm:
                by_arm[assignment.arm].append(found[0])
        for arm_name, runs in by_arm.items():
            by_arm[arm_name] = self._runs.with_status(runs)
        baseline = by_arm[experiment.baseline_arm]
        arms = tuple(
            _arm_report(
                arm,
                by_arm[arm.name],
                None if arm.name == experiment.baseline_arm else baseline,
                pair_by,
                confidence,
            )
            for arm in experiment.arms
        )
        return ExperimentReport(experiment, arms, confidence, pair_by)

    def promote(self, name: str, arm_name: str, pin: bool, reason: str, actor: str) -> Experiment:
        """Activate the arm's policy (or pin it to the experiment's selector), then end
        the experiment naming the arm."""
        experiment = self.get(name)
        if not experiment.running:
            raise FailedPrecondition(f"experiment {name!r} has already ended")
        arm = experiment.arm(arm_name)
        if arm is None:
            raise InvalidArgument(
                "arm",
                f"must name one of the arms of {name!r} "
                f"({', '.join(a.name for a in experiment.arms)}), but got {arm_name!r}",
            )
        if pin:
            self.store.pin_policy(
                PolicyPin(experiment.selector, arm.policy_version, self._clock(), actor)
            )
        else:
            self.store.activate_policy(arm.policy_version, actor)
        ended = self.store.end_experiment(name, actor, self._clock(), promoted_arm=arm.name)
        logger.info(
            "[PromoteExperiment] %s: arm %s (policy %s) %s by %s%s",
            name,
            arm.name,
            arm.policy_version,
            f"pinned to {experiment.selector}" if pin else "activated",
            actor,
            f": {reason}" if reason else "",
        )
        return ended

    def end(self, name: str, reason: str, actor: str) -> Experiment:
        self.get(name)
        ended = self.store.end_experiment(name, actor, self._clock())
        logger.info("[EndExperiment] %s by %s%s", name, actor, f": {reason}" if reason else "")
        return ended


def store_observe_only(store: Store, clock: Callable[[], datetime] = utc_now) -> None:
    """Store the observe-only policy (a no-op when it is stored already)."""
    store.put_policy(
        PolicyVersion(
            version=OBSERVE_ONLY.version,
            name=OBSERVE_ONLY.name,
            document=OBSERVE_ONLY.to_mapping(),
            created_at=clock(),
        )
    )


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            "name",
            "must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, "
            f"but got {name!r}",
        )


def _checked_arms(arms: Sequence[ExperimentArm]) -> list[ExperimentArm]:
    if len(arms) < 2:
        raise InvalidArgument("arms", f"must list at least two arms, but got {len(arms)}")
    seen: set[str] = set()
    for i, arm in enumerate(arms):
        where = f"arms[{i}]"
        try:
            _check_name(arm.name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}.name", exc.problem) from None
        if arm.name in seen:
            raise InvalidArgument(f"{where}.name", f"must be unique, but {arm.name!r} repeats")
        seen.add(arm.name)
        if not (math.isfinite(arm.share) and arm.share > 0):
            raise InvalidArgument(f"{where}.share", f"must be a number > 0, but got {arm.share!r}")
        if arm.observe_only and arm.policy_version:
            raise InvalidArgument(
                f"{where}.policy_version",
                "must be empty for an observe_only arm (the built-in observe-only policy "
                f"steers it), but got {arm.policy_version!r}",
            )
        if not arm.observe_only and not arm.policy_version:
            raise InvalidArgument(
                f"{where}.policy_version", "must name a stored policy version (or set observe_only)"
            )
    return list(arms)
