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
from typing import Any

#: Loss components the trainer knows how to weight (issue 3 implements them).
LOSS_COMPONENTS: tuple[str, ...] = ("dice", "ce", "focal", "variance")


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


class DomainError(Exception):
    """Base of the errors the service raises; the servicer maps them to codes."""


class InvalidArgument(DomainError):
    """A request field is malformed; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class NotFound(DomainError):
    """The named object does not exist."""


class StoreUnavailable(DomainError):
    """The store cannot be reached or refused the write; nothing was decided."""


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

    def monitored(self, monitor: str) -> float:
        """The monitored loss: `val_loss` falls back to `train_loss` when absent."""
        if monitor == "val_loss" and self.val_loss is not None:
            return self.val_loss
        return self.train_loss

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
    """An operator's override of one run (set and cleared through ControlAdmin)."""

    run_id: str
    actor: str
    reason: str
    lr: float | None = None
    loss_weights: Mapping[str, float] = field(default_factory=frozen_map)
    hold_interventions: bool = False
    once: bool = False
    created_at: datetime | None = None


@dataclass(frozen=True)
class PolicyVersion:
    """A stored, immutable policy document and its content-derived version id."""

    version: str
    name: str
    document: Mapping[str, Any]
    created_at: datetime


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


@dataclass(frozen=True)
class RunFilter:
    """Filters of ListRuns; empty strings match everything."""

    dataset: str = ""
    configuration: str = ""
    fold: str = ""
    limit: int = 100


@dataclass(frozen=True)
class DecisionRecord:
    """What one ReportEpoch writes: the report, its decision and the policy state after it.

    `state` is the policy's serialised fold state (JSON text) so that the next
    report of the run continues from it on any replica.
    """

    report: Report
    decision: Decision
    state: str


@dataclass(frozen=True)
class RunContext:
    """Everything the store holds that one report's decision needs, read at once."""

    existing: Decision | None
    previous_state: str | None
    active_policy: str | None
    override: Override | None = None
