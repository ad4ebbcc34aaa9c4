"""The only proto <-> domain mapping. Validation of incoming reports lives here too:
a malformed field raises InvalidArgument naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from control_server.domain import (
    Action,
    Decision,
    DecisionFilter,
    InvalidArgument,
    Override,
    PolicyCatalog,
    PolicyView,
    Report,
    RunDetail,
    RunFilter,
    RunLabels,
    RunSelector,
    RunSummary,
    ShadowSummary,
    Source,
    frozen_map,
)
from control_server.policy.document import integer_fields
from trainer_client.api import control_pb2 as pb
from trainer_client.vocabulary import LABEL_KEYS, LossWeightError, check_loss_weights

#: Each label and the field name its errors give (built once: this is the decider's hot path).
_LABEL_FIELDS = tuple((key, f"labels.{key}") for key in LABEL_KEYS)
MAX_ID_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_LIST_LIMIT = 1000
MAX_DECISIONS_LIMIT = 10_000

_ACTIONS = {a: pb.Action.Value(a.value) for a in Action}
_SOURCES = {s: pb.Source.Value(s.value) for s in Source}
_ACTIONS_BACK = {number: a for a, number in _ACTIONS.items()}
_SOURCES_BACK = {number: s for s, number in _SOURCES.items()}
_INTEGER_FIELDS = tuple(tuple(path.split(".")) for path in sorted(integer_fields()))


def _check_text(
    value: str, field: str, *, required: bool = False, max_length: int = MAX_ID_LENGTH
) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(
            field, f"must be at most {max_length} characters, but got {len(value)}"
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
    """Validate a loss weight map: known components, finite weights >= 0 (all 0 allowed)."""
    try:
        return frozen_map(check_loss_weights(weights, allow_all_zero=True))
    except LossWeightError as exc:
        raise InvalidArgument(f"{field}[{exc.component!r}]", exc.problem) from None


def labels_from_proto(msg: pb.RunLabels) -> RunLabels:
    return RunLabels(*[_check_text(getattr(msg, key), where) for key, where in _LABEL_FIELDS])


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
        # `+ 0.0` turns -0.0 into 0.0: the store keeps no negative zero, and the policy
        # must decide on what is stored, or replay would word its reasons differently.
        train_loss=msg.train_loss + 0.0,
        val_loss=msg.val_loss + 0.0 if msg.HasField("val_loss") else None,
        pseudo_dice=msg.pseudo_dice + 0.0 if msg.HasField("pseudo_dice") else None,
        avg_gradient_norm=(
            _check_number(msg.avg_gradient_norm + 0.0, "avg_gradient_norm")
            if msg.HasField("avg_gradient_norm")
            else None
        ),
        intervention_count=msg.intervention_count,
        current_lr=_check_number(msg.current_lr + 0.0, "current_lr"),
        initial_lr=_check_number(msg.initial_lr, "initial_lr", positive=True),
        loss_weights=weights_from_proto(msg.loss_weights, "loss_weights"),
        labels=labels_from_proto(msg.labels),
    )


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def labels_to_proto(labels: RunLabels) -> pb.RunLabels:
    return pb.RunLabels(**{k: getattr(labels, k) for k in LABEL_KEYS})


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
        override_id=decision.override_id or 0,
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


def _limit(value: int, field: str, default: int, maximum: int) -> int:
    if value < 0 or value > maximum:
        raise InvalidArgument(field, f"must be between 0 and {maximum}, but got {value}")
    return value or default


def _action(number: int) -> Action | None:
    if number == pb.ACTION_UNSPECIFIED:
        return None
    if number not in _ACTIONS_BACK:
        raise InvalidArgument("action", f"unknown action {number}")
    return _ACTIONS_BACK[number]


def _source(number: int) -> Source | None:
    if number == pb.SOURCE_UNSPECIFIED:
        return None
    if number not in _SOURCES_BACK:
        raise InvalidArgument("source", f"unknown source {number}")
    return _SOURCES_BACK[number]


def _datetime(ts: Timestamp) -> datetime:
    value: datetime = ts.ToDatetime(tzinfo=UTC)
    return value


# --- runs and decisions ---------------------------------------------------------------


def run_detail_to_proto(detail: RunDetail) -> pb.GetRunResponse:
    epochs = []
    for epoch in detail.epochs:
        msg = pb.RunEpoch(
            report=report_to_proto(epoch.report), decision=decision_to_proto(epoch.decision)
        )
        if epoch.shadow is not None:
            msg.shadow.CopyFrom(decision_to_proto(epoch.shadow))
        epochs.append(msg)
    return pb.GetRunResponse(
        run=run_summary_to_proto(detail.run),
        epochs=epochs,
        overrides=[override_to_proto(o) for o in detail.overrides],
    )


def decision_filter_from_proto(msg: pb.ListDecisionsRequest) -> DecisionFilter:
    since = _datetime(msg.since) if msg.HasField("since") else None
    until = _datetime(msg.until) if msg.HasField("until") else None
    return DecisionFilter(
        run_id=_check_text(msg.run_id, "run_id"),
        action=_action(msg.action),
        source=_source(msg.source),
        since=since,
        until=until,
        limit=_limit(msg.limit, "limit", 1000, MAX_DECISIONS_LIMIT),
    )


def watch_filter_from_proto(msg: pb.WatchDecisionsRequest) -> DecisionFilter:
    return DecisionFilter(
        run_id=_check_text(msg.run_id, "run_id"),
        action=_action(msg.action),
        source=_source(msg.source),
        limit=0,
    )


# --- overrides ------------------------------------------------------------------------


def override_from_proto(msg: pb.SetOverrideRequest) -> Override:
    """The requested override (actor and times are the service's to fill in)."""
    return Override(
        run_id=_check_text(msg.run_id, "run_id", required=True),
        actor="",
        reason=_check_text(msg.reason, "reason", max_length=MAX_REASON_LENGTH),
        lr=msg.lr if msg.HasField("lr") else None,
        loss_weights=frozen_map(msg.loss_weights),
        hold_interventions=msg.hold_interventions,
        once=msg.once,
    )


def override_to_proto(override: Override) -> pb.Override:
    msg = pb.Override(
        override_id=override.override_id or 0,
        run_id=override.run_id,
        loss_weights=dict(override.loss_weights),
        hold_interventions=override.hold_interventions,
        once=override.once,
        reason=override.reason,
        actor=override.actor,
        cleared_by=override.cleared_by,
    )
    if override.lr is not None:
        msg.lr = override.lr
    if override.created_at is not None:
        msg.created_at.CopyFrom(_timestamp(override.created_at))
    if override.cleared_at is not None:
        msg.cleared_at.CopyFrom(_timestamp(override.cleared_at))
    return msg


# --- policies -------------------------------------------------------------------------


def selector_from_proto(msg: pb.RunSelector, field: str = "selector") -> RunSelector:
    return RunSelector(
        dataset=_check_text(msg.dataset, f"{field}.dataset"),
        configuration=_check_text(msg.configuration, f"{field}.configuration"),
        fold=_check_text(msg.fold, f"{field}.fold"),
    )


def selector_to_proto(selector: RunSelector) -> pb.RunSelector:
    return pb.RunSelector(
        dataset=selector.dataset, configuration=selector.configuration, fold=selector.fold
    )


def policy_source_from_proto(msg: pb.PutPolicyRequest) -> Mapping[str, Any] | str:
    """The document as plain data (from a Struct) or as YAML/JSON text.

    A Struct carries every number as a double: integral numbers where the
    schema wants an integer become ints, so that `patience: 3` means 3.
    """
    which = msg.WhichOneof("source")
    if which == "yaml":
        text: str = msg.yaml
        return text
    if which != "document":
        raise InvalidArgument("document", "set either document (a structure) or yaml (text)")
    data = {key: _plain(value) for key, value in msg.document.fields.items()}
    for section, key in _INTEGER_FIELDS:
        values = data.get(section)
        if isinstance(values, dict):
            value = values.get(key)
            if isinstance(value, float) and value.is_integer():
                values[key] = int(value)
    return data


def _plain(value: Value) -> Any:
    """A Struct value as plain data (json_format refuses NaN and infinities, which the
    policy's validation should get to name instead)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind in ("number_value", "string_value", "bool_value"):
        return getattr(value, kind)
    return None


def policy_to_proto(view: PolicyView) -> pb.Policy:
    document = Struct()
    document.update(dict(view.policy.document))
    return pb.Policy(
        version=view.policy.version,
        name=view.policy.name,
        document=document,
        created_at=_timestamp(view.policy.created_at),
        active=view.active,
        shadow=view.shadow,
        pins=[selector_to_proto(s) for s in view.pins],
    )


def catalog_to_proto(catalog: PolicyCatalog) -> pb.ListPoliciesResponse:
    return pb.ListPoliciesResponse(
        policies=[policy_to_proto(v) for v in catalog.policies],
        active_version=catalog.active_version or "",
        shadow_version=catalog.shadow_version or "",
    )


def shadow_summary_to_proto(summary: ShadowSummary) -> pb.ShadowSummary:
    return pb.ShadowSummary(
        version=summary.version,
        evaluated=summary.evaluated,
        differed=summary.differed,
        by_transition=dict(summary.by_transition),
    )
