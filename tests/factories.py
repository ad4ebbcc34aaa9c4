"""Builders of valid test data with sensible defaults; every field can be overridden.

- `epoch_report()`: the wire message a trainer sends (``control_pb2.EpochReport``).
- `make_report()`, `make_decision()`, `make_record()`, `make_override()`,
  `make_policy()`: the domain objects a store keeps, on a fixed clock (`T0`).
- `policy_report()`: the domain report the policy unit tests hand to the engine.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from control_server.domain import (
    Action,
    Decision,
    DecisionRecord,
    Override,
    PolicyVersion,
    Report,
    RunLabels,
    Source,
    frozen_map,
)
from trainer_client.api import control_pb2 as pb

#: The time every stored object is dated from.
T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
#: The labels of a domain report, every field set.
LABELS = RunLabels(
    dataset="Dataset042_Disc",
    configuration="2d",
    fold="0",
    trainer="nnUNetTrainerControlled",
    plans="nnUNetPlans",
    host="gpu-7",
)
_ids = count()


def epoch_report(run_id: str = "run-a", epoch: int = 0, **fields: Any) -> pb.EpochReport:
    """A valid report with sensible defaults; override any field."""
    values: dict[str, Any] = {
        "run_id": run_id,
        "epoch": epoch,
        "train_loss": 0.5,
        "val_loss": 0.6,
        "avg_gradient_norm": 0.05,
        "intervention_count": 0,
        "current_lr": 0.01,
        "initial_lr": 0.01,
        "loss_weights": {"dice": 1.0, "ce": 1.0},
        "labels": pb.RunLabels(dataset="Dataset042_Disc", configuration="2d", fold="0"),
    }
    values.update(fields)
    return pb.EpochReport(**values)


def make_report(run_id: str = "run-a", epoch: int = 0, **fields: Any) -> Report:
    """A stored report: losses falling by 0.01 an epoch, every optional field set."""
    values: dict[str, Any] = {
        "train_loss": 0.5 - epoch / 100,
        "current_lr": 0.01,
        "initial_lr": 0.01,
        "val_loss": 0.6 - epoch / 100,
        "pseudo_dice": 0.7,
        "avg_gradient_norm": 0.04,
        "intervention_count": 0,
        "loss_weights": frozen_map({"dice": 1.0, "ce": 1.0}),
        "labels": LABELS,
    }
    values.update(fields)
    return Report(run_id=run_id, epoch=epoch, **values)


def make_decision(run_id: str = "run-a", epoch: int = 0, **fields: Any) -> Decision:
    """A policy's NONE with a new id, decided `epoch` seconds after `T0`."""
    values: dict[str, Any] = {
        "decision_id": f"d-{next(_ids)}",
        "action": Action.NONE,
        "source": Source.POLICY,
        "reason": f"no plateau at epoch {epoch}",
        "policy_version": "abc123def456",
        "decided_at": T0 + timedelta(seconds=epoch),
    }
    values.update(fields)
    return Decision(run_id=run_id, epoch=epoch, **values)


def make_record(
    run_id: str = "run-a",
    epoch: int = 0,
    *,
    state: str | None = None,
    report: Report | None = None,
    **decision_fields: Any,
) -> DecisionRecord:
    """What one decided report writes: the report, the decision and the policy state."""
    return DecisionRecord(
        report=report or make_report(run_id, epoch),
        decision=make_decision(run_id, epoch, **decision_fields),
        state=state if state is not None else f'{{"run": "{run_id}", "epoch": {epoch}}}',
    )


def make_override(run_id: str = "run-a", at: int = 0, **fields: Any) -> Override:
    """Alice's override raising the LR, set `at` minutes after `T0`."""
    values: dict[str, Any] = {
        "actor": "alice",
        "reason": "try a higher LR",
        "lr": 0.02,
        "created_at": T0 + timedelta(minutes=at),
    }
    values.update(fields)
    return Override(run_id=run_id, **values)


def make_policy(version: str = "v1", name: str = "default", **doc: Any) -> PolicyVersion:
    """A stored policy version whose document is `doc` over a patience of 3."""
    return PolicyVersion(
        version=version,
        name=name,
        document={"name": name, "plateau": {"patience": 3}, **doc},
        created_at=T0,
    )


def policy_report(epoch: int = 15, value: float = 0.3222, **fields: Any) -> Report:
    """A report for the policy engine: both losses at `value`, the LR at half its
    initial 0.01, gradient norm 0.04, no labels (by default, the epoch-15 plateau of
    the worked example)."""
    values: dict[str, Any] = {
        "run_id": "run-a",
        "epoch": epoch,
        "train_loss": value,
        "val_loss": value,
        "current_lr": 0.005,
        "initial_lr": 0.01,
        "avg_gradient_norm": 0.04,
        "intervention_count": 0,
        "loss_weights": frozen_map({"dice": 1.0, "ce": 1.0}),
    }
    values.update(fields)
    return Report(**values)
