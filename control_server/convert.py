"""The only proto <-> domain mapping. Validation of incoming reports lives here too:
a malformed field raises InvalidArgument naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from control_server.domain import (
    LOSS_COMPONENTS,
    Action,
    Decision,
    InvalidArgument,
    Report,
    RunFilter,
    RunLabels,
    RunSummary,
    Source,
    frozen_map,
)
from trainer_client.api import control_pb2 as pb

MAX_ID_LENGTH = 256
MAX_LIST_LIMIT = 1000

_ACTIONS = {a: pb.Action.Value(a.value) for a in Action}
_SOURCES = {s: pb.Source.Value(s.value) for s in Source}


def _check_text(value: str, field: str, *, required: bool = False) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            field, f"must be at most {MAX_ID_LENGTH} characters, but got {len(value)}"
        )
    if not value.isprintable():
        raise InvalidArgument(field, "must contain printable characters only")
    return value


def _check_number(value: float, field: str, *, positive: bool = False) -> float:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InvalidArgument(field, f"must be a finite number {bound}, but got {value!r}")
    return value


def weights_from_proto(weights: Mapping[str, float], field: str) -> Mapping[str, float]:
    """Validate a loss weight map: known components, finite weights >= 0."""
    for component, weight in weights.items():
        if component not in LOSS_COMPONENTS:
            raise InvalidArgument(
                f"{field}[{component!r}]",
                f"unknown loss component; expected one of {', '.join(LOSS_COMPONENTS)}",
            )
        _check_number(weight, f"{field}[{component!r}]")
    return frozen_map(weights)


def labels_from_proto(msg: pb.RunLabels) -> RunLabels:
    return RunLabels(
        dataset=_check_text(msg.dataset, "labels.dataset"),
        configuration=_check_text(msg.configuration, "labels.configuration"),
        fold=_check_text(msg.fold, "labels.fold"),
        trainer=_check_text(msg.trainer, "labels.trainer"),
        plans=_check_text(msg.plans, "labels.plans"),
        host=_check_text(msg.host, "labels.host"),
    )


def report_from_proto(msg: pb.EpochReport) -> Report:
    """Validate and convert an EpochReport. Non-finite losses are allowed: they are
    a training event the policy decides on, not bad input."""
    if msg.epoch < 0:
        raise InvalidArgument("epoch", f"must be >= 0, but got {msg.epoch}")
    if msg.intervention_count < 0:
        raise InvalidArgument(
            "intervention_count", f"must be >= 0, but got {msg.intervention_count}"
        )
    return Report(
        run_id=_check_text(msg.run_id, "run_id", required=True),
        epoch=msg.epoch,
        train_loss=msg.train_loss,
        val_loss=msg.val_loss if msg.HasField("val_loss") else None,
        pseudo_dice=msg.pseudo_dice if msg.HasField("pseudo_dice") else None,
        avg_gradient_norm=(
            _check_number(msg.avg_gradient_norm, "avg_gradient_norm")
            if msg.HasField("avg_gradient_norm")
            else None
        ),
        intervention_count=msg.intervention_count,
        current_lr=_check_number(msg.current_lr, "current_lr"),
        initial_lr=_check_number(msg.initial_lr, "initial_lr", positive=True),
        loss_weights=weights_from_proto(msg.loss_weights, "loss_weights"),
        labels=labels_from_proto(msg.labels),
    )


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def labels_to_proto(labels: RunLabels) -> pb.RunLabels:
    return pb.RunLabels(
        dataset=labels.dataset,
        configuration=labels.configuration,
        fold=labels.fold,
        trainer=labels.trainer,
        plans=labels.plans,
        host=labels.host,
    )


def report_to_proto(report: Report) -> pb.EpochReport:
    msg = pb.EpochReport(
        run_id=report.run_id,
        epoch=report.epoch,
        train_loss=report.train_loss,
        intervention_count=report.intervention_count,
        current_lr=report.current_lr,
        initial_lr=report.initial_lr,
        loss_weights=dict(report.loss_weights),
        labels=labels_to_proto(report.labels),
    )
    if report.val_loss is not None:
        msg.val_loss = report.val_loss
    if report.pseudo_dice is not None:
        msg.pseudo_dice = report.pseudo_dice
    if report.avg_gradient_norm is not None:
        msg.avg_gradient_norm = report.avg_gradient_norm
    return msg


def decision_to_proto(decision: Decision) -> pb.Decision:
    msg = pb.Decision(
        decision_id=decision.decision_id,
        run_id=decision.run_id,
        epoch=decision.epoch,
        action=_ACTIONS[decision.action],
        loss_weights=dict(decision.loss_weights),
        intervention_index=decision.intervention_index,
        source=_SOURCES[decision.source],
        reason=decision.reason,
        policy_version=decision.policy_version,
        decided_at=_timestamp(decision.decided_at),
    )
    if decision.lr is not None:
        msg.lr = decision.lr
    return msg


def run_summary_to_proto(run: RunSummary) -> pb.RunSummary:
    msg = pb.RunSummary(
        run_id=run.run_id,
        labels=labels_to_proto(run.labels),
        last_epoch=run.last_epoch,
        report_count=run.report_count,
        intervention_count=run.intervention_count,
        current_lr=run.current_lr,
        first_seen=_timestamp(run.first_seen),
        last_seen=_timestamp(run.last_seen),
    )
    if run.last_decision is not None:
        msg.last_decision.CopyFrom(decision_to_proto(run.last_decision))
    return msg


def run_filter_from_proto(msg: pb.ListRunsRequest) -> RunFilter:
    if msg.limit < 0 or msg.limit > MAX_LIST_LIMIT:
        raise InvalidArgument(
            "limit", f"must be between 0 and {MAX_LIST_LIMIT}, but got {msg.limit}"
        )
    return RunFilter(
        dataset=_check_text(msg.dataset, "dataset"),
        configuration=_check_text(msg.configuration, "configuration"),
        fold=_check_text(msg.fold, "fold"),
        limit=msg.limit or 100,
    )
