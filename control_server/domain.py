"""Domain types shared by the policy, the service and the stores.

Frozen dataclasses only: no proto types, no I/O. `convert.py` maps them to and
from the generated API at the edge.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar

# The errors and the words both sides share are defined once, in the light client.
from trainer_client.vocabulary import (
    LOSS_COMPONENTS,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)

__all__ = [
    "LOSS_COMPONENTS",
    "Action",
    "Assignment",
    "AuditEvent",
    "AuditFilter",
    "Decision",
    "DecisionFilter",
    "DecisionPage",
    "DecisionRecord",
    "DomainError",
    "Effect",
    "Experiment",
    "ExperimentArm",
    "FailedPrecondition",
    "FinalMetrics",
    "InvalidArgument",
    "NotFound",
    "Override",
    "PolicyCatalog",
    "PolicyPin",
    "PolicyVersion",
    "PolicyView",
    "Report",
    "ResourceExhausted",
    "RunAttempt",
    "RunContext",
    "RunDetail",
    "RunEpoch",
    "RunFilter",
    "RunFlag",
    "RunLabels",
    "RunSelector",
    "RunStatus",
    "RunSummary",
    "ShadowSummary",
    "Source",
    "StoreUnavailable",
    "Verdict",
    "frozen_map",
    "remember",
]

K = TypeVar("K")
V = TypeVar("V")


class Action(enum.Enum):
    """What the trainer does after the epoch it reported."""

    NONE = "NONE"
    INTERVENE = "INTERVENE"
    ROLLBACK = "ROLLBACK"
    STOP = "STOP"


class Source(enum.Enum):
    """Who made a decision."""

    POLICY = "POLICY"
    OVERRIDE = "OVERRIDE"
    SAFETY = "SAFETY"


class RunStatus(enum.Enum):
    """Where a run stands. ACTIVE and STALE are derived from its reports; the others
    are what FinishRun said of its latest attempt."""

    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    STALE = "STALE"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED)


class RunFlag(enum.StrEnum):
    """Why a run needs a look (ListRuns), in the order the API lists them."""

    ROLLED_BACK = "FLAG_ROLLED_BACK"
    NON_FINITE = "FLAG_NON_FINITE"
    BUDGET_SPENT = "FLAG_BUDGET_SPENT"
    STALE = "FLAG_STALE"
    OVERRIDE = "FLAG_OVERRIDE"


def remember(memo: dict[K, V], key: K, value: V, limit: int) -> None:
    """Store `key` -> `value` in `memo` as its newest entry; beyond `limit` entries the
    oldest goes (the decider's per-run memories stay bounded however many runs come)."""
    memo.pop(key, None)
    memo[key] = value
    if len(memo) > limit:
        del memo[next(iter(memo))]


def frozen_map(values: Mapping[str, float] | None = None) -> Mapping[str, float]:
    """A read-only copy of a weight map, keys sorted so equal maps print alike."""
    values = values or {}
    return MappingProxyType({k: float(values[k]) for k in sorted(values)})


@dataclass(frozen=True)
class RunLabels:
    """Labels of a run; they select pinned policies and filter audits."""

    dataset: str = ""
    configuration: str = ""
    fold: str = ""
    trainer: str = ""
    plans: str = ""
    host: str = ""


@dataclass(frozen=True)
class Report:
    """One epoch summary as the trainer sent it (already validated)."""

    run_id: str
    epoch: int
    train_loss: float
    current_lr: float
    initial_lr: float
    val_loss: float | None = None
    pseudo_dice: float | None = None
    avg_gradient_norm: float | None = None
    intervention_count: int = 0
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    labels: RunLabels = field(default_factory=RunLabels)
    #: The attempt the trainer names (0: the run's latest, or 1 for a new run).
    attempt: int = 0
    #: Held while the server was unreachable: recorded, never decided as live.
    late: bool = False

    def differences(self, other: Report) -> list[str]:
        """The payload fields in which `other` differs from this report (its attempt,
        lateness and labels aside): a retry must repeat the payload it was decided on."""
        fields = (
            "train_loss",
            "val_loss",
            "pseudo_dice",
            "avg_gradient_norm",
            "intervention_count",
            "current_lr",
            "initial_lr",
        )
        differ = [f for f in fields if not _same_value(getattr(self, f), getattr(other, f))]
        if dict(self.loss_weights) != dict(other.loss_weights):
            differ.append("loss_weights")
        return differ

    @property
    def losses_finite(self) -> bool:
        values = [self.train_loss] + ([self.val_loss] if self.val_loss is not None else [])
        return all(math.isfinite(v) for v in values)


@dataclass(frozen=True)
class Verdict:
    """What the policy decided for one report, before it gets an id and a time."""

    action: Action
    source: Source
    reason: str
    lr: float | None = None
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    intervention_index: int = 0


@dataclass(frozen=True)
class Decision:
    """A recorded decision: the verdict plus identity, run, epoch and policy version."""

    decision_id: str
    run_id: str
    epoch: int
    action: Action
    source: Source
    reason: str
    policy_version: str
    decided_at: datetime
    lr: float | None = None
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    intervention_index: int = 0
    #: The override in force when this was decided (replay passes it to the policy again).
    override_id: int | None = None
    #: The epoch whose policy state this continued from (None: the run's initial state);
    #: replay follows the same chain, also when reports arrived out of order.
    previous_epoch: int | None = None
    #: The attempt of the run that reported this epoch.
    attempt: int = 1
    #: The answer to a late report: recorded, not to be applied.
    late: bool = False

    def same_outcome(self, other: Decision | Verdict) -> bool:
        """True when both decide the same thing (ids and times aside)."""
        return (
            self.action == other.action
            and self.source == other.source
            and self.reason == other.reason
            and self.lr == other.lr
            and dict(self.loss_weights) == dict(other.loss_weights)
            and self.intervention_index == other.intervention_index
        )


@dataclass(frozen=True)
class Override:
    """An operator's override of one run (set and cleared through ControlAdmin).

    `override_id` is None until stored. `cleared_by` names who cleared it: an
    operator, "replaced by override N", or "consumed by epoch N" for a `once`.
    """

    run_id: str
    actor: str
    reason: str
    lr: float | None = None
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    hold_interventions: bool = False
    once: bool = False
    created_at: datetime | None = None
    override_id: int | None = None
    cleared_at: datetime | None = None
    cleared_by: str = ""
    #: STOP or ROLLBACK the run at its next report (always `once`); None: the LR /
    #: weights / hold override above. A ROLLBACK's `lr` and `loss_weights` are what
    #: it restores: those of the report of `rollback_epoch`, whose intervention it undoes.
    action: Action | None = None
    rollback_epoch: int | None = None
    #: The operator allowed `lr` above the policy's cap (the reason says why).
    exceed_lr_cap: bool = False
    #: The active override this one replaced when it was set (None: none).
    replaced_override_id: int | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None


@dataclass(frozen=True)
class RunSelector:
    """Runs whose labels match every non-empty field (a policy pin's target)."""

    dataset: str = ""
    configuration: str = ""
    fold: str = ""

    @property
    def specificity(self) -> int:
        """How many fields are set: the most specific matching pin wins."""
        return sum(1 for v in (self.dataset, self.configuration, self.fold) if v)


@dataclass(frozen=True)
class PolicyPin:
    """A policy version pinned to the runs a selector matches."""

    selector: RunSelector
    version: str
    pinned_at: datetime
    actor: str


@dataclass(frozen=True)
class PolicyVersion:
    """A stored, immutable policy document and its content-derived version id."""

    version: str
    name: str
    document: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class PolicyView:
    """A stored version with its standing: active, shadowed, and pinned where."""

    policy: PolicyVersion
    active: bool = False
    shadow: bool = False
    pins: tuple[RunSelector, ...] = ()


@dataclass(frozen=True)
class PolicyCatalog:
    """Every stored version (oldest first) and which ones are active and shadowed."""

    policies: tuple[PolicyView, ...]
    active_version: str | None
    shadow_version: str | None


@dataclass(frozen=True)
class ShadowSummary:
    """How often a shadow version would have decided differently from the real decision.

    `by_transition` counts differences by "REAL->SHADOW" action pair.
    """

    version: str
    evaluated: int
    differed: int
    by_transition: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class FinalMetrics:
    """What the trainer measured at the end (nnU-Net's final validation)."""

    mean_dice: float | None = None
    dice_per_class: Mapping[str, float] = field(default_factory=frozen_map)
    best_ema_pseudo_dice: float | None = None
    best_ema_epoch: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.mean_dice is None
            and not self.dice_per_class
            and self.best_ema_pseudo_dice is None
            and self.best_ema_epoch is None
        )


@dataclass(frozen=True)
class RunAttempt:
    """One attempt of a run: a StartRun, or the first report of a run that had none.

    `status` is what FinishRun said (ACTIVE until then); `superseded_epochs` counts
    the earlier attempts' epochs this one moved out of the run's current history.
    """

    run_id: str
    attempt: int
    started_at: datetime
    resume_from_epoch: int | None = None
    history_reset: bool = False
    superseded_epochs: int = 0
    trainer_name: str = ""
    trainer_version: str = ""
    policy_version: str = ""
    initial_lr: float | None = None
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    status: RunStatus = RunStatus.ACTIVE
    finished_at: datetime | None = None
    error: str = ""
    metrics: FinalMetrics = field(default_factory=FinalMetrics)


@dataclass(frozen=True)
class RunSummary:
    """The last known state of a run."""

    run_id: str
    labels: RunLabels
    last_epoch: int
    report_count: int
    intervention_count: int
    current_lr: float
    last_decision: Decision | None
    first_seen: datetime
    last_seen: datetime
    #: The latest attempt (1 for a run that never called StartRun).
    attempt: int = 1
    #: FinishRun's status of the latest attempt, else ACTIVE (STALE is derived on read).
    status: RunStatus = RunStatus.ACTIVE
    rollback_count: int = 0
    #: The policy's best monitored value so far (its state's `best`).
    best_value: float | None = None
    final_metrics: FinalMetrics = field(default_factory=FinalMetrics)
    finished_at: datetime | None = None
    error: str = ""
    #: The experiment and arm the run was assigned to ("": none).
    experiment: str = ""
    arm: str = ""
    #: Why the run needs a look, in RunFlag order (ListRuns fills them in).
    flags: tuple[RunFlag, ...] = ()
    #: The plateau.monitor and mode of the policy of the last decision ("": none).
    monitored: str = ""
    monitored_mode: str = ""
    #: That value over the current history, raw and thinned (empty unless asked).
    trend: tuple[float, ...] = ()


@dataclass(frozen=True)
class RunFilter:
    """Filters of ListRuns; empty strings match everything."""

    dataset: str = ""
    configuration: str = ""
    fold: str = ""
    limit: int = 100
    #: None matches every status.
    status: RunStatus | None = None
    #: Runs assigned to this experiment (and this arm of it, when set too).
    experiment: str = ""
    arm: str = ""
    #: Fill each run's trend with at most this many points (0: no trend).
    trend_points: int = 0


@dataclass(frozen=True)
class ExperimentArm:
    """One arm of an experiment: a stored policy version (the built-in observe-only
    version for `observe_only`) and its relative share of new runs."""

    name: str
    policy_version: str
    share: float
    observe_only: bool = False


@dataclass(frozen=True)
class Experiment:
    """An A/B rollout: runs the selector matches are assigned an arm at StartRun.

    `ended_at` is None while it runs; `promoted_arm` is set by a promote.
    """

    name: str
    selector: RunSelector
    arms: tuple[ExperimentArm, ...]
    baseline_arm: str
    started_at: datetime
    started_by: str
    description: str = ""
    ended_at: datetime | None = None
    ended_by: str = ""
    promoted_arm: str = ""
    assigned_runs: int = 0

    @property
    def running(self) -> bool:
        return self.ended_at is None

    def arm(self, name: str) -> ExperimentArm | None:
        return next((a for a in self.arms if a.name == name), None)


@dataclass(frozen=True)
class Assignment:
    """The arm a run was assigned to, once, at its first StartRun."""

    run_id: str
    experiment: str
    arm: str
    policy_version: str
    assigned_at: datetime


@dataclass(frozen=True)
class DecisionFilter:
    """Filters of ListDecisions and WatchDecisions; empty/None match everything.

    `since` is inclusive, `until` exclusive (decided_at); `limit` <= 0 means no limit.
    """

    run_id: str = ""
    action: Action | None = None
    source: Source | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


@dataclass(frozen=True)
class AuditFilter:
    """Filters of ListAuditEvents; empty strings match everything (exact matches).

    `since` is inclusive, `until` exclusive; at most `limit` events, newest first.
    """

    actor: str = ""
    action: str = ""
    target: str = ""
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 200


@dataclass(frozen=True)
class AuditEvent:
    """One recorded admin event: who did what to what, when, and how it ended."""

    at: datetime
    actor: str
    action: str
    target: str
    details: Mapping[str, Any]
    result: str


@dataclass(frozen=True)
class DecisionPage:
    """Decisions committed after a cursor, and the cursor to continue from.

    Every decision committed at or below `cursor` was visible to the read that
    returned this page; decisions committed later get a higher sequence number.
    """

    decisions: tuple[Decision, ...]
    cursor: int


@dataclass(frozen=True)
class Effect:
    """What followed one intervention, override or rollback, judged from the run's
    reports after it (derived on read, never stored; `control_server/effects.py`).

    Values are the monitored metric's raw values; `best_before` is None when no finite
    value was reported up to the decision, `best_after` (and so `relative_change`) when
    none has been reported in the horizon yet.
    """

    epoch: int
    policy_version: str
    kind: str
    metric: str
    mode: str
    value_at_decision: float | None
    best_before: float | None
    best_after: float | None
    relative_change: float | None
    new_best: bool
    epochs_to_new_best: int | None
    rolled_back: bool
    rolled_back_at_epoch: int | None
    horizon: int
    epochs_observed: int
    grad_norm_bucket: str
    loss_mix: str

    @property
    def complete(self) -> bool:
        """The whole horizon is reported."""
        return self.epochs_observed >= self.horizon


@dataclass(frozen=True)
class RunEpoch:
    """One epoch of a run: the report, the decision, the shadow one if any, and the
    decision's effect when it is an intervention or a rollback (GetRun fills it in)."""

    report: Report
    decision: Decision
    shadow: Decision | None = None
    effect: Effect | None = None


@dataclass(frozen=True)
class RunDetail:
    """One page of a run for GetRun: summary, the page's epochs in order, every
    override and attempt oldest first, the superseded epochs in the page's range,
    and the epoch the next page starts at (None: this is the last)."""

    run: RunSummary
    epochs: tuple[RunEpoch, ...]
    overrides: tuple[Override, ...]
    attempts: tuple[RunAttempt, ...] = ()
    superseded: tuple[RunEpoch, ...] = ()
    next_epoch: int | None = None


@dataclass(frozen=True)
class DecisionRecord:
    """What one ReportEpoch writes, in one transaction.

    `state` is the policy's serialised fold state (JSON text) so that the next
    report of the run continues from it on any replica. `consumed_override` is
    the id of the `once` override this decision used up; `shadow` and
    `shadow_state` are the shadow version's decision and fold state.
    """

    report: Report
    decision: Decision
    state: str
    consumed_override: int | None = None
    shadow: Decision | None = None
    shadow_state: str | None = None
    #: The epoch's chain value (control_server/chain.py; None: unchained).
    chain: str | None = None
    #: The run was not stored before this record: it enters the run registry.
    new_run: bool = False


@dataclass(frozen=True)
class RunContext:
    """Everything the store holds that one report's decision needs, read at once.

    `previous_state` is the policy state after the latest stored epoch before
    this one (`previous_epoch`); `previous_shadow_state` is the shadow state
    stored at that same epoch, and only when it came from the current
    `shadow_policy` (None: start the shadow afresh). `pinned_policy` is the
    version of the most specific pin matching the run's labels.
    """

    existing: Decision | None
    previous_state: str | None
    active_policy: str | None
    override: Override | None = None
    previous_epoch: int | None = None
    pinned_policy: str | None = None
    shadow_policy: str | None = None
    previous_shadow_state: str | None = None
    #: The run's latest attempt (0: the run is not stored yet).
    attempt: int = 0
    #: The newest epoch stored in the run's current history (None: none).
    last_epoch: int | None = None
    #: The chain value stored at `previous_epoch` (None: none, or unchained).
    previous_chain: str | None = None
    #: The policy version of the experiment arm the run was assigned to (None: none).
    assigned_policy: str | None = None

    @property
    def steering_policy(self) -> str | None:
        """The version that decides the run: its experiment arm's, else the most
        specific pin's, else the active one (None: no policy is active)."""
        return self.assigned_policy or self.pinned_policy or self.active_policy


def _same_value(a: object, b: object) -> bool:
    """Equal, where NaN equals NaN (a retried report repeats its NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
