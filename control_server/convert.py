"""The only proto <-> domain mapping. Validation of incoming reports lives here too:
a malformed field raises InvalidArgument naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from control_server.domain import (
    Action,
    Assignment,
    AuditEvent,
    AuditFilter,
    Decision,
    DecisionFilter,
    Effect,
    Experiment,
    ExperimentArm,
    FinalMetrics,
    InvalidArgument,
    Override,
    PolicyCatalog,
    PolicyView,
    Report,
    RunAttempt,
    RunDetail,
    RunEpoch,
    RunFilter,
    RunFlag,
    RunLabels,
    RunSelector,
    RunStatus,
    RunSummary,
    ShadowSummary,
    Source,
    Verdict,
    frozen_map,
)
from control_server.effects import EffectGroup, EffectSummary, check_horizon
from control_server.experiment_stats import Comparison, Distribution
from control_server.experiments import ArmReport, ExperimentReport
from control_server.fleet import check_trend_points
from control_server.policy.document import integer_fields
from control_server.what_if import WhatIf, check_replay_limits
from trainer_client.api import control_pb2 as pb
from trainer_client.vocabulary import LABEL_KEYS, LossWeightError, check_loss_weights

#: Each label and the field name its errors give (built once: this is the decider's hot path).
_LABEL_FIELDS = tuple((key, f"labels.{key}") for key in LABEL_KEYS)
MAX_ID_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_LIST_LIMIT = 1000
MAX_DECISIONS_LIMIT = 10_000
DEFAULT_AUDIT_LIMIT = 200
MAX_AUDIT_LIMIT = 5000
#: GetRun's epochs per page: the default, and the most a page may hold (with a shadow
#: decision per epoch a page of the most stays far below gRPC's 4 MB message limit).
DEFAULT_RUN_PAGE = 1000
MAX_RUN_PAGE = 5000
#: FinishRun keeps this much of a failure's text.
MAX_ERROR_LENGTH = 4000
#: FinishRun's Dice per class holds at most this many classes.
MAX_CLASSES = 1000

_ACTIONS = {a: pb.Action.Value(a.value) for a in Action}
_SOURCES = {s: pb.Source.Value(s.value) for s in Source}
_ACTIONS_BACK = {number: a for a, number in _ACTIONS.items()}
_SOURCES_BACK = {number: s for s, number in _SOURCES.items()}
_STATUSES = {s: pb.RunStatus.Value(s.value) for s in RunStatus}
_STATUSES_BACK = {number: s for s, number in _STATUSES.items()}
_STATUS_NAMES = set(pb.RunStatus.values())
_FLAGS = {f: pb.RunFlag.Value(f.value) for f in RunFlag}
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
    if msg.attempt < 0:
        raise InvalidArgument("attempt", f"must be >= 0, but got {msg.attempt}")
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
        # An LR of 0 trains nothing, and a decision scaling it would be 0 too.
        current_lr=_check_number(msg.current_lr + 0.0, "current_lr", positive=True),
        initial_lr=_check_number(msg.initial_lr, "initial_lr", positive=True),
        loss_weights=weights_from_proto(msg.loss_weights, "loss_weights"),
        labels=labels_from_proto(msg.labels),
        attempt=msg.attempt,
        late=msg.late,
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
        attempt=report.attempt,
        late=report.late,
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
        attempt=decision.attempt,
        late=decision.late,
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
        status=_STATUSES[run.status],
        attempt=run.attempt,
        rollback_count=run.rollback_count,
        final_metrics=metrics_to_proto(run.final_metrics),
        error=run.error,
        experiment=run.experiment,
        arm=run.arm,
        flags=[_FLAGS[f] for f in run.flags],
        monitored=run.monitored,
        monitored_mode=run.monitored_mode,
        trend=run.trend,
    )
    if run.last_decision is not None:
        msg.last_decision.CopyFrom(decision_to_proto(run.last_decision))
    if run.best_value is not None:
        msg.best_value = run.best_value
    if run.finished_at is not None:
        msg.finished_at.CopyFrom(_timestamp(run.finished_at))
    return msg


def metrics_to_proto(metrics: FinalMetrics) -> pb.FinalMetrics:
    msg = pb.FinalMetrics(dice_per_class=dict(metrics.dice_per_class))
    if metrics.mean_dice is not None:
        msg.mean_dice = metrics.mean_dice
    if metrics.best_ema_pseudo_dice is not None:
        msg.best_ema_pseudo_dice = metrics.best_ema_pseudo_dice
    if metrics.best_ema_epoch is not None:
        msg.best_ema_epoch = metrics.best_ema_epoch
    return msg


def metrics_from_proto(msg: pb.FinalMetrics) -> FinalMetrics:
    """Final metrics; a Dice is NaN (nnU-Net's for a class absent from every case) or
    within [0, 1]."""

    def dice(value: float, field: str) -> float:
        if not math.isnan(value) and not 0.0 <= value <= 1.0:
            raise InvalidArgument(field, f"must be within [0, 1] or NaN, but got {value!r}")
        return value

    per_class = {}
    for name, value in msg.dice_per_class.items():
        _check_text(name, "metrics.dice_per_class", required=True)
        per_class[name] = dice(value, f"metrics.dice_per_class[{name!r}]")
    if len(per_class) > MAX_CLASSES:
        raise InvalidArgument("metrics.dice_per_class", f"must have at most {MAX_CLASSES} classes")
    if msg.HasField("best_ema_epoch") and msg.best_ema_epoch < 0:
        raise InvalidArgument(
            "metrics.best_ema_epoch", f"must be >= 0, but got {msg.best_ema_epoch}"
        )
    return FinalMetrics(
        mean_dice=dice(msg.mean_dice, "metrics.mean_dice") if msg.HasField("mean_dice") else None,
        dice_per_class=frozen_map(per_class),
        best_ema_pseudo_dice=(
            dice(msg.best_ema_pseudo_dice, "metrics.best_ema_pseudo_dice")
            if msg.HasField("best_ema_pseudo_dice")
            else None
        ),
        best_ema_epoch=msg.best_ema_epoch if msg.HasField("best_ema_epoch") else None,
    )


def start_run_from_proto(msg: pb.StartRunRequest, now: datetime) -> tuple[RunAttempt, RunLabels]:
    """The attempt a StartRun opens (numbered by the store) and the run's labels."""
    if msg.HasField("resume_from_epoch") and msg.resume_from_epoch < 0:
        raise InvalidArgument("resume_from_epoch", f"must be >= 0, but got {msg.resume_from_epoch}")
    attempt = RunAttempt(
        run_id=_check_text(msg.run_id, "run_id", required=True),
        attempt=0,
        started_at=now,
        resume_from_epoch=msg.resume_from_epoch if msg.HasField("resume_from_epoch") else None,
        trainer_name=_check_text(msg.trainer_name, "trainer_name"),
        trainer_version=_check_text(msg.trainer_version, "trainer_version"),
        initial_lr=_check_number(msg.initial_lr, "initial_lr", positive=True),
        loss_weights=weights_from_proto(msg.loss_weights, "loss_weights"),
    )
    return attempt, labels_from_proto(msg.labels)


def start_run_to_proto(
    attempt: RunAttempt, message: str, assignment: Assignment | None
) -> pb.StartRunResponse:
    return pb.StartRunResponse(
        attempt=attempt.attempt,
        policy_version=attempt.policy_version,
        history_reset=attempt.history_reset,
        superseded_epochs=attempt.superseded_epochs,
        message=message,
        experiment=assignment.experiment if assignment else "",
        arm=assignment.arm if assignment else "",
    )


def finish_run_from_proto(
    msg: pb.FinishRunRequest,
) -> tuple[str, int, RunStatus, str, FinalMetrics]:
    """(run_id, attempt, status, error, metrics) of a FinishRun."""
    status = _STATUSES_BACK.get(msg.status)
    if status is None or not status.finished:
        got = pb.RunStatus.Name(msg.status) if msg.status in _STATUS_NAMES else msg.status
        raise InvalidArgument("status", f"must be COMPLETED, STOPPED or FAILED, but got {got}")
    if msg.attempt < 0:
        raise InvalidArgument("attempt", f"must be >= 0, but got {msg.attempt}")
    error = msg.error[:MAX_ERROR_LENGTH]
    if status is RunStatus.FAILED and not error.strip():
        raise InvalidArgument("error", "must say what went wrong when status is FAILED")
    return (
        _check_text(msg.run_id, "run_id", required=True),
        msg.attempt,
        status,
        error,
        metrics_from_proto(msg.metrics),
    )


def run_status_to_proto(status: RunStatus) -> pb.RunStatus.ValueType:
    return _STATUSES[status]


def attempt_to_proto(attempt: RunAttempt) -> pb.RunAttempt:
    msg = pb.RunAttempt(
        attempt=attempt.attempt,
        started_at=_timestamp(attempt.started_at),
        history_reset=attempt.history_reset,
        superseded_epochs=attempt.superseded_epochs,
        trainer_name=attempt.trainer_name,
        trainer_version=attempt.trainer_version,
        policy_version=attempt.policy_version,
        initial_lr=attempt.initial_lr or 0.0,
        loss_weights=dict(attempt.loss_weights),
        status=_STATUSES[attempt.status],
        error=attempt.error,
        metrics=metrics_to_proto(attempt.metrics),
    )
    if attempt.resume_from_epoch is not None:
        msg.resume_from_epoch = attempt.resume_from_epoch
    if attempt.finished_at is not None:
        msg.finished_at.CopyFrom(_timestamp(attempt.finished_at))
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
        status=_status(msg.status),
        experiment=_check_text(msg.experiment, "experiment"),
        arm=_check_text(msg.arm, "arm"),
        # Read by name: the generated ListRunsRequest may predate the field.
        trend_points=check_trend_points(msg.trend_points),
    )


def _status(number: int) -> RunStatus | None:
    if number == pb.RUN_STATUS_UNSPECIFIED:
        return None
    if number not in _STATUSES_BACK:
        raise InvalidArgument("status", f"unknown run status {number}")
    return _STATUSES_BACK[number]


def run_page_from_proto(msg: pb.GetRunRequest) -> tuple[str, int, int, int]:
    """(run_id, first epoch, page size, effect horizon) of a GetRun page."""
    run_id = _check_text(msg.run_id, "run_id", required=True)
    size = _limit(msg.page_size, "page_size", DEFAULT_RUN_PAGE, MAX_RUN_PAGE)
    if msg.page_token:
        try:
            token_run, _, epoch_text = msg.page_token.rpartition("@")
            from_epoch = int(epoch_text)
        except ValueError:
            raise InvalidArgument("page_token", "is not one GetRun returned") from None
        if token_run != run_id or from_epoch < 0:
            raise InvalidArgument("page_token", "is not one GetRun returned for this run")
    else:
        from_epoch = msg.from_epoch
        if from_epoch < 0:
            raise InvalidArgument("from_epoch", f"must be >= 0, but got {from_epoch}")
    return run_id, from_epoch, size, check_horizon(msg.effect_horizon, "effect_horizon")


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


def run_epoch_to_proto(epoch: RunEpoch) -> pb.RunEpoch:
    """One epoch of a run; its report names the attempt and lateness its decision records."""
    report = replace(epoch.report, attempt=epoch.decision.attempt, late=epoch.decision.late)
    msg = pb.RunEpoch(report=report_to_proto(report), decision=decision_to_proto(epoch.decision))
    if epoch.shadow is not None:
        msg.shadow.CopyFrom(decision_to_proto(epoch.shadow))
    if epoch.effect is not None:
        msg.effect.CopyFrom(effect_to_proto(epoch.effect))
    return msg


def effect_to_proto(effect: Effect) -> pb.InterventionEffect:
    """An effect; a value the record lacks (no finite value before the decision, a
    missing metric at it) is NaN where the field is not optional."""
    msg = pb.InterventionEffect(
        metric=effect.metric,
        mode=effect.mode,
        value_at_decision=_or_nan(effect.value_at_decision),
        best_before=_or_nan(effect.best_before),
        new_best=effect.new_best,
        rolled_back=effect.rolled_back,
        horizon=effect.horizon,
        epochs_observed=effect.epochs_observed,
        grad_norm_bucket=effect.grad_norm_bucket,
        loss_mix=effect.loss_mix,
        kind=effect.kind,
    )
    _set_present(
        msg, effect, ("best_after", "relative_change", "epochs_to_new_best", "rolled_back_at_epoch")
    )
    return msg


def _set_present(msg: Any, source: object, names: tuple[str, ...]) -> None:
    """Copy the optional fields `names` of `source` that are not None into `msg`
    (an unset optional field reads as absent, not as 0)."""
    for name in names:
        value = getattr(source, name)
        if value is not None:
            setattr(msg, name, value)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def effect_summary_from_proto(
    msg: pb.GetEffectSummaryRequest,
) -> tuple[RunSelector, str, int, str]:
    """(selector, policy version, horizon, experiment) of a GetEffectSummary request."""
    return (
        selector_from_proto(msg.selector),
        _check_text(msg.policy_version, "policy_version"),
        check_horizon(msg.horizon, "horizon"),
        _check_text(msg.experiment, "experiment"),
    )


def _effect_group_to_proto(group: EffectGroup) -> pb.EffectGroup:
    msg = pb.EffectGroup(
        key=group.key,
        count=group.count,
        complete=group.complete,
        new_best=group.new_best,
        rolled_back=group.rolled_back,
    )
    _set_present(
        msg, group, ("mean_relative_change", "median_relative_change", "mean_epochs_to_new_best")
    )
    return msg


def effect_summary_to_proto(summary: EffectSummary) -> pb.EffectSummary:
    return pb.EffectSummary(
        runs=summary.runs,
        decisions=summary.decisions,
        by_policy=[_effect_group_to_proto(g) for g in summary.by_policy],
        by_kind=[_effect_group_to_proto(g) for g in summary.by_kind],
        by_grad_norm_bucket=[_effect_group_to_proto(g) for g in summary.by_grad_norm_bucket],
        by_loss_mix=[_effect_group_to_proto(g) for g in summary.by_loss_mix],
    )


def run_detail_to_proto(detail: RunDetail) -> pb.GetRunResponse:
    epochs = [run_epoch_to_proto(e) for e in detail.epochs]
    return pb.GetRunResponse(
        run=run_summary_to_proto(detail.run),
        epochs=epochs,
        overrides=[override_to_proto(o) for o in detail.overrides],
        attempts=[attempt_to_proto(a) for a in detail.attempts],
        superseded=[run_epoch_to_proto(e) for e in detail.superseded],
        next_page_token=(
            "" if detail.next_epoch is None else f"{detail.run.run_id}@{detail.next_epoch}"
        ),
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


def audit_filter_from_proto(msg: pb.ListAuditEventsRequest) -> AuditFilter:
    return AuditFilter(
        actor=_check_text(msg.actor, "actor"),
        action=_check_text(msg.action, "action"),
        target=_check_text(msg.target, "target"),
        since=_datetime(msg.since) if msg.HasField("since") else None,
        until=_datetime(msg.until) if msg.HasField("until") else None,
        limit=_limit(msg.limit, "limit", DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT),
    )


def audit_event_to_proto(event: AuditEvent) -> pb.AuditEvent:
    details = Struct()
    details.update(dict(event.details))
    return pb.AuditEvent(
        at=_timestamp(event.at),
        actor=event.actor,
        action=event.action,
        target=event.target,
        details=details,
        result=event.result,
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
        action=_action(msg.action),
        exceed_lr_cap=msg.exceed_lr_cap,
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
        action=_ACTIONS[override.action] if override.action is not None else pb.ACTION_UNSPECIFIED,
        exceed_lr_cap=override.exceed_lr_cap,
        replaced_override_id=override.replaced_override_id or 0,
    )
    if override.lr is not None:
        msg.lr = override.lr
    if override.rollback_epoch is not None:
        msg.rollback_epoch = override.rollback_epoch
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


def replay_request_from_proto(
    msg: pb.ReplayPolicyRequest,
) -> tuple[str, str, RunSelector, int, int]:
    """(stored version, document text, selector, runs, differences listed): one of the
    first two is set."""
    which = msg.WhichOneof("candidate")
    if which == "version":
        version, document = _check_text(msg.version, "version", required=True), ""
    elif which == "yaml":
        version, document = "", msg.yaml
    else:
        raise InvalidArgument("candidate", "set either version (stored) or yaml (a document)")
    limit, max_differences = check_replay_limits(msg.limit, msg.max_differences)
    return version, document, selector_from_proto(msg.selector), limit, max_differences


def verdict_to_proto(verdict: Verdict, run_id: str, epoch: int, version: str) -> pb.Decision:
    """What a policy would decide, as a Decision without id or time."""
    msg = pb.Decision(
        run_id=run_id,
        epoch=epoch,
        action=_ACTIONS[verdict.action],
        loss_weights=dict(verdict.loss_weights),
        intervention_index=verdict.intervention_index,
        source=_SOURCES[verdict.source],
        reason=verdict.reason,
        policy_version=version,
    )
    if verdict.lr is not None:
        msg.lr = verdict.lr
    return msg


def what_if_to_proto(what_if: WhatIf) -> pb.ReplayPolicyResponse:
    return pb.ReplayPolicyResponse(
        version=what_if.version,
        name=what_if.name,
        runs=what_if.runs,
        decisions=what_if.decisions,
        differing=what_if.differing,
        runs_differing=what_if.runs_differing,
        by_transition=dict(what_if.by_transition),
        differences=[
            pb.ReplayDifference(
                run_id=d.run_id,
                epoch=d.epoch,
                recorded=decision_to_proto(d.recorded),
                candidate=verdict_to_proto(d.recomputed, d.run_id, d.epoch, what_if.version),
            )
            for d in what_if.differences
        ],
    )


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


# --- experiments --------------------------------------------------------------------------


def arms_from_proto(arms: Any) -> list[ExperimentArm]:
    return [
        ExperimentArm(
            name=a.name,
            policy_version=a.policy_version,
            share=a.share if a.share else 1.0,
            observe_only=a.observe_only,
        )
        for a in arms
    ]


def _arm_to_proto(arm: ExperimentArm) -> pb.ExperimentArm:
    return pb.ExperimentArm(
        name=arm.name,
        policy_version=arm.policy_version,
        observe_only=arm.observe_only,
        share=arm.share,
    )


def experiment_to_proto(e: Experiment) -> pb.Experiment:
    msg = pb.Experiment(
        name=e.name,
        description=e.description,
        selector=pb.RunSelector(
            dataset=e.selector.dataset,
            configuration=e.selector.configuration,
            fold=e.selector.fold,
        ),
        arms=[_arm_to_proto(a) for a in e.arms],
        baseline_arm=e.baseline_arm,
        status=pb.RUNNING if e.running else pb.ENDED,
        started_at=_timestamp(e.started_at),
        started_by=e.started_by,
        ended_by=e.ended_by,
        promoted_arm=e.promoted_arm,
        assigned_runs=e.assigned_runs,
    )
    if e.ended_at is not None:
        msg.ended_at.CopyFrom(_timestamp(e.ended_at))
    return msg


def _distribution_to_proto(d: Distribution) -> pb.Distribution:
    msg = pb.Distribution(n=d.n)
    _set_present(msg, d, ("mean", "median", "sd", "min", "max"))
    return msg


def _comparison_to_proto(c: Comparison) -> pb.ArmComparison:
    msg = pb.ArmComparison(paired=c.paired, n=c.n, method=c.method)
    _set_present(msg, c, ("difference", "ci_low", "ci_high", "p_value", "win_rate"))
    return msg


def _arm_report_to_proto(a: ArmReport) -> pb.ArmReport:
    msg = pb.ArmReport(
        arm=_arm_to_proto(a.arm),
        runs=len(a.run_ids),
        runs_by_status=dict(a.runs_by_status),
        interventions=a.interventions,
        rollbacks=a.rollbacks,
        stops=a.stops,
        final_dice=_distribution_to_proto(a.final_dice),
        epochs_to_best=_distribution_to_proto(a.epochs_to_best),
        run_ids=list(a.run_ids),
    )
    if a.vs_baseline is not None:
        msg.vs_baseline.CopyFrom(_comparison_to_proto(a.vs_baseline))
    return msg


def experiment_report_to_proto(r: ExperimentReport) -> pb.ExperimentReport:
    return pb.ExperimentReport(
        experiment=experiment_to_proto(r.experiment),
        arms=[_arm_report_to_proto(a) for a in r.arms],
        confidence=r.confidence,
        pair_by=r.pair_by,
    )
