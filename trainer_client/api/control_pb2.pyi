import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    NONE: _ClassVar[Action]
    INTERVENE: _ClassVar[Action]
    ROLLBACK: _ClassVar[Action]
    STOP: _ClassVar[Action]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    POLICY: _ClassVar[Source]
    OVERRIDE: _ClassVar[Source]
    SAFETY: _ClassVar[Source]

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    ACTIVE: _ClassVar[RunStatus]
    COMPLETED: _ClassVar[RunStatus]
    STOPPED: _ClassVar[RunStatus]
    FAILED: _ClassVar[RunStatus]
    STALE: _ClassVar[RunStatus]

class RunFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_FLAG_UNSPECIFIED: _ClassVar[RunFlag]
    FLAG_ROLLED_BACK: _ClassVar[RunFlag]
    FLAG_NON_FINITE: _ClassVar[RunFlag]
    FLAG_BUDGET_SPENT: _ClassVar[RunFlag]
    FLAG_STALE: _ClassVar[RunFlag]
    FLAG_OVERRIDE: _ClassVar[RunFlag]

class ExperimentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATUS_UNSPECIFIED: _ClassVar[ExperimentStatus]
    RUNNING: _ClassVar[ExperimentStatus]
    ENDED: _ClassVar[ExperimentStatus]
ACTION_UNSPECIFIED: Action
NONE: Action
INTERVENE: Action
ROLLBACK: Action
STOP: Action
SOURCE_UNSPECIFIED: Source
POLICY: Source
OVERRIDE: Source
SAFETY: Source
RUN_STATUS_UNSPECIFIED: RunStatus
ACTIVE: RunStatus
COMPLETED: RunStatus
STOPPED: RunStatus
FAILED: RunStatus
STALE: RunStatus
RUN_FLAG_UNSPECIFIED: RunFlag
FLAG_ROLLED_BACK: RunFlag
FLAG_NON_FINITE: RunFlag
FLAG_BUDGET_SPENT: RunFlag
FLAG_STALE: RunFlag
FLAG_OVERRIDE: RunFlag
EXPERIMENT_STATUS_UNSPECIFIED: ExperimentStatus
RUNNING: ExperimentStatus
ENDED: ExperimentStatus

class RunLabels(_message.Message):
    __slots__ = ("dataset", "configuration", "fold", "trainer", "plans", "host")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    FOLD_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    configuration: str
    fold: str
    trainer: str
    plans: str
    host: str
    def __init__(self, dataset: _Optional[str] = ..., configuration: _Optional[str] = ..., fold: _Optional[str] = ..., trainer: _Optional[str] = ..., plans: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class EpochReport(_message.Message):
    __slots__ = ("run_id", "epoch", "train_loss", "val_loss", "pseudo_dice", "avg_gradient_norm", "intervention_count", "current_lr", "initial_lr", "loss_weights", "labels", "attempt", "late")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_DICE_FIELD_NUMBER: _ClassVar[int]
    AVG_GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LR_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    train_loss: float
    val_loss: float
    pseudo_dice: float
    avg_gradient_norm: float
    intervention_count: int
    current_lr: float
    initial_lr: float
    loss_weights: _containers.ScalarMap[str, float]
    labels: RunLabels
    attempt: int
    late: bool
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., pseudo_dice: _Optional[float] = ..., avg_gradient_norm: _Optional[float] = ..., intervention_count: _Optional[int] = ..., current_lr: _Optional[float] = ..., initial_lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., labels: _Optional[_Union[RunLabels, _Mapping]] = ..., attempt: _Optional[int] = ..., late: _Optional[bool] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("decision_id", "run_id", "epoch", "action", "lr", "loss_weights", "intervention_index", "source", "reason", "policy_version", "decided_at", "override_id", "attempt", "late")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    run_id: str
    epoch: int
    action: Action
    lr: float
    loss_weights: _containers.ScalarMap[str, float]
    intervention_index: int
    source: Source
    reason: str
    policy_version: str
    decided_at: _timestamp_pb2.Timestamp
    override_id: int
    attempt: int
    late: bool
    def __init__(self, decision_id: _Optional[str] = ..., run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., intervention_index: _Optional[int] = ..., source: _Optional[_Union[Source, str]] = ..., reason: _Optional[str] = ..., policy_version: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., override_id: _Optional[int] = ..., attempt: _Optional[int] = ..., late: _Optional[bool] = ...) -> None: ...

class FinalMetrics(_message.Message):
    __slots__ = ("mean_dice", "dice_per_class", "best_ema_pseudo_dice", "best_ema_epoch")
    class DicePerClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MEAN_DICE_FIELD_NUMBER: _ClassVar[int]
    DICE_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    BEST_EMA_PSEUDO_DICE_FIELD_NUMBER: _ClassVar[int]
    BEST_EMA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    mean_dice: float
    dice_per_class: _containers.ScalarMap[str, float]
    best_ema_pseudo_dice: float
    best_ema_epoch: int
    def __init__(self, mean_dice: _Optional[float] = ..., dice_per_class: _Optional[_Mapping[str, float]] = ..., best_ema_pseudo_dice: _Optional[float] = ..., best_ema_epoch: _Optional[int] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("run_id", "labels", "initial_lr", "loss_weights", "trainer_name", "trainer_version", "resume_from_epoch")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAINER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    labels: RunLabels
    initial_lr: float
    loss_weights: _containers.ScalarMap[str, float]
    trainer_name: str
    trainer_version: str
    resume_from_epoch: int
    def __init__(self, run_id: _Optional[str] = ..., labels: _Optional[_Union[RunLabels, _Mapping]] = ..., initial_lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., trainer_name: _Optional[str] = ..., trainer_version: _Optional[str] = ..., resume_from_epoch: _Optional[int] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("attempt", "policy_version", "history_reset", "superseded_epochs", "message", "experiment", "arm")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_RESET_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    policy_version: str
    history_reset: bool
    superseded_epochs: int
    message: str
    experiment: str
    arm: str
    def __init__(self, attempt: _Optional[int] = ..., policy_version: _Optional[str] = ..., history_reset: _Optional[bool] = ..., superseded_epochs: _Optional[int] = ..., message: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "attempt", "status", "error", "metrics")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    attempt: int
    status: RunStatus
    error: str
    metrics: FinalMetrics
    def __init__(self, run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., status: _Optional[_Union[RunStatus, str]] = ..., error: _Optional[str] = ..., metrics: _Optional[_Union[FinalMetrics, _Mapping]] = ...) -> None: ...

class FinishRunResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ...) -> None: ...

class RunAttempt(_message.Message):
    __slots__ = ("attempt", "started_at", "resume_from_epoch", "history_reset", "superseded_epochs", "trainer_name", "trainer_version", "policy_version", "initial_lr", "loss_weights", "status", "finished_at", "error", "metrics")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_RESET_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAINER_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    started_at: _timestamp_pb2.Timestamp
    resume_from_epoch: int
    history_reset: bool
    superseded_epochs: int
    trainer_name: str
    trainer_version: str
    policy_version: str
    initial_lr: float
    loss_weights: _containers.ScalarMap[str, float]
    status: RunStatus
    finished_at: _timestamp_pb2.Timestamp
    error: str
    metrics: FinalMetrics
    def __init__(self, attempt: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resume_from_epoch: _Optional[int] = ..., history_reset: _Optional[bool] = ..., superseded_epochs: _Optional[int] = ..., trainer_name: _Optional[str] = ..., trainer_version: _Optional[str] = ..., policy_version: _Optional[str] = ..., initial_lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., metrics: _Optional[_Union[FinalMetrics, _Mapping]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "labels", "last_epoch", "report_count", "intervention_count", "current_lr", "last_decision", "first_seen", "last_seen", "status", "attempt", "rollback_count", "best_value", "final_metrics", "finished_at", "error", "experiment", "arm", "flags", "monitored", "monitored_mode", "trend")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LR_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_COUNT_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MONITORED_FIELD_NUMBER: _ClassVar[int]
    MONITORED_MODE_FIELD_NUMBER: _ClassVar[int]
    TREND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    labels: RunLabels
    last_epoch: int
    report_count: int
    intervention_count: int
    current_lr: float
    last_decision: Decision
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    status: RunStatus
    attempt: int
    rollback_count: int
    best_value: float
    final_metrics: FinalMetrics
    finished_at: _timestamp_pb2.Timestamp
    error: str
    experiment: str
    arm: str
    flags: _containers.RepeatedScalarFieldContainer[RunFlag]
    monitored: str
    monitored_mode: str
    trend: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, run_id: _Optional[str] = ..., labels: _Optional[_Union[RunLabels, _Mapping]] = ..., last_epoch: _Optional[int] = ..., report_count: _Optional[int] = ..., intervention_count: _Optional[int] = ..., current_lr: _Optional[float] = ..., last_decision: _Optional[_Union[Decision, _Mapping]] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., attempt: _Optional[int] = ..., rollback_count: _Optional[int] = ..., best_value: _Optional[float] = ..., final_metrics: _Optional[_Union[FinalMetrics, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ..., flags: _Optional[_Iterable[_Union[RunFlag, str]]] = ..., monitored: _Optional[str] = ..., monitored_mode: _Optional[str] = ..., trend: _Optional[_Iterable[float]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("dataset", "configuration", "fold", "limit", "status", "experiment", "arm", "trend_points")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    FOLD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    TREND_POINTS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    configuration: str
    fold: str
    limit: int
    status: RunStatus
    experiment: str
    arm: str
    trend_points: int
    def __init__(self, dataset: _Optional[str] = ..., configuration: _Optional[str] = ..., fold: _Optional[str] = ..., limit: _Optional[int] = ..., status: _Optional[_Union[RunStatus, str]] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ..., trend_points: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id", "from_epoch", "page_size", "page_token", "effect_horizon")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EFFECT_HORIZON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_epoch: int
    page_size: int
    page_token: str
    effect_horizon: int
    def __init__(self, run_id: _Optional[str] = ..., from_epoch: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., effect_horizon: _Optional[int] = ...) -> None: ...

class RunEpoch(_message.Message):
    __slots__ = ("report", "decision", "shadow", "effect")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    report: EpochReport
    decision: Decision
    shadow: Decision
    effect: InterventionEffect
    def __init__(self, report: _Optional[_Union[EpochReport, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., shadow: _Optional[_Union[Decision, _Mapping]] = ..., effect: _Optional[_Union[InterventionEffect, _Mapping]] = ...) -> None: ...

class InterventionEffect(_message.Message):
    __slots__ = ("metric", "mode", "value_at_decision", "best_before", "best_after", "relative_change", "new_best", "epochs_to_new_best", "rolled_back", "rolled_back_at_epoch", "horizon", "epochs_observed", "grad_norm_bucket", "loss_mix", "kind")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_AT_DECISION_FIELD_NUMBER: _ClassVar[int]
    BEST_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BEST_AFTER_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    NEW_BEST_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_TO_NEW_BEST_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_AT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_OBSERVED_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_BUCKET_FIELD_NUMBER: _ClassVar[int]
    LOSS_MIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    metric: str
    mode: str
    value_at_decision: float
    best_before: float
    best_after: float
    relative_change: float
    new_best: bool
    epochs_to_new_best: int
    rolled_back: bool
    rolled_back_at_epoch: int
    horizon: int
    epochs_observed: int
    grad_norm_bucket: str
    loss_mix: str
    kind: str
    def __init__(self, metric: _Optional[str] = ..., mode: _Optional[str] = ..., value_at_decision: _Optional[float] = ..., best_before: _Optional[float] = ..., best_after: _Optional[float] = ..., relative_change: _Optional[float] = ..., new_best: _Optional[bool] = ..., epochs_to_new_best: _Optional[int] = ..., rolled_back: _Optional[bool] = ..., rolled_back_at_epoch: _Optional[int] = ..., horizon: _Optional[int] = ..., epochs_observed: _Optional[int] = ..., grad_norm_bucket: _Optional[str] = ..., loss_mix: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run", "epochs", "overrides", "attempts", "superseded", "next_page_token")
    RUN_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run: RunSummary
    epochs: _containers.RepeatedCompositeFieldContainer[RunEpoch]
    overrides: _containers.RepeatedCompositeFieldContainer[Override]
    attempts: _containers.RepeatedCompositeFieldContainer[RunAttempt]
    superseded: _containers.RepeatedCompositeFieldContainer[RunEpoch]
    next_page_token: str
    def __init__(self, run: _Optional[_Union[RunSummary, _Mapping]] = ..., epochs: _Optional[_Iterable[_Union[RunEpoch, _Mapping]]] = ..., overrides: _Optional[_Iterable[_Union[Override, _Mapping]]] = ..., attempts: _Optional[_Iterable[_Union[RunAttempt, _Mapping]]] = ..., superseded: _Optional[_Iterable[_Union[RunEpoch, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("override_id", "run_id", "lr", "loss_weights", "hold_interventions", "once", "reason", "actor", "created_at", "cleared_at", "cleared_by", "action", "exceed_lr_cap", "replaced_override_id", "rollback_epoch")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OVERRIDE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    HOLD_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    ONCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_AT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_BY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EXCEED_LR_CAP_FIELD_NUMBER: _ClassVar[int]
    REPLACED_OVERRIDE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_EPOCH_FIELD_NUMBER: _ClassVar[int]
    override_id: int
    run_id: str
    lr: float
    loss_weights: _containers.ScalarMap[str, float]
    hold_interventions: bool
    once: bool
    reason: str
    actor: str
    created_at: _timestamp_pb2.Timestamp
    cleared_at: _timestamp_pb2.Timestamp
    cleared_by: str
    action: Action
    exceed_lr_cap: bool
    replaced_override_id: int
    rollback_epoch: int
    def __init__(self, override_id: _Optional[int] = ..., run_id: _Optional[str] = ..., lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., hold_interventions: _Optional[bool] = ..., once: _Optional[bool] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cleared_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cleared_by: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., exceed_lr_cap: _Optional[bool] = ..., replaced_override_id: _Optional[int] = ..., rollback_epoch: _Optional[int] = ...) -> None: ...

class SetOverrideRequest(_message.Message):
    __slots__ = ("run_id", "lr", "loss_weights", "hold_interventions", "once", "reason", "action", "allow_unknown_run", "exceed_lr_cap")
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    HOLD_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    ONCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNKNOWN_RUN_FIELD_NUMBER: _ClassVar[int]
    EXCEED_LR_CAP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    lr: float
    loss_weights: _containers.ScalarMap[str, float]
    hold_interventions: bool
    once: bool
    reason: str
    action: Action
    allow_unknown_run: bool
    exceed_lr_cap: bool
    def __init__(self, run_id: _Optional[str] = ..., lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., hold_interventions: _Optional[bool] = ..., once: _Optional[bool] = ..., reason: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., allow_unknown_run: _Optional[bool] = ..., exceed_lr_cap: _Optional[bool] = ...) -> None: ...

class ClearOverrideRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ClearOverrideResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: bool
    def __init__(self, cleared: _Optional[bool] = ...) -> None: ...

class ListOverridesRequest(_message.Message):
    __slots__ = ("run_id", "include_cleared")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLEARED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    include_cleared: bool
    def __init__(self, run_id: _Optional[str] = ..., include_cleared: _Optional[bool] = ...) -> None: ...

class ListOverridesResponse(_message.Message):
    __slots__ = ("overrides",)
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    overrides: _containers.RepeatedCompositeFieldContainer[Override]
    def __init__(self, overrides: _Optional[_Iterable[_Union[Override, _Mapping]]] = ...) -> None: ...

class RunSelector(_message.Message):
    __slots__ = ("dataset", "configuration", "fold")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    FOLD_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    configuration: str
    fold: str
    def __init__(self, dataset: _Optional[str] = ..., configuration: _Optional[str] = ..., fold: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("version", "name", "document", "created_at", "active", "shadow", "pins")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    version: str
    name: str
    document: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    active: bool
    shadow: bool
    pins: _containers.RepeatedCompositeFieldContainer[RunSelector]
    def __init__(self, version: _Optional[str] = ..., name: _Optional[str] = ..., document: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., shadow: _Optional[bool] = ..., pins: _Optional[_Iterable[_Union[RunSelector, _Mapping]]] = ...) -> None: ...

class PutPolicyRequest(_message.Message):
    __slots__ = ("document", "yaml")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    document: _struct_pb2.Struct
    yaml: str
    def __init__(self, document: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., yaml: _Optional[str] = ...) -> None: ...

class PutPolicyResponse(_message.Message):
    __slots__ = ("policy", "created")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    created: bool
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "active_version", "shadow_version")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    active_version: str
    shadow_version: str
    def __init__(self, policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., active_version: _Optional[str] = ..., shadow_version: _Optional[str] = ...) -> None: ...

class ActivatePolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class PinPolicyRequest(_message.Message):
    __slots__ = ("version", "selector")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    selector: RunSelector
    def __init__(self, version: _Optional[str] = ..., selector: _Optional[_Union[RunSelector, _Mapping]] = ...) -> None: ...

class UnpinPolicyRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: RunSelector
    def __init__(self, selector: _Optional[_Union[RunSelector, _Mapping]] = ...) -> None: ...

class UnpinPolicyResponse(_message.Message):
    __slots__ = ("unpinned",)
    UNPINNED_FIELD_NUMBER: _ClassVar[int]
    unpinned: bool
    def __init__(self, unpinned: _Optional[bool] = ...) -> None: ...

class SetShadowPolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class GetShadowSummaryRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ShadowSummary(_message.Message):
    __slots__ = ("version", "evaluated", "differed", "by_transition")
    class ByTransitionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    DIFFERED_FIELD_NUMBER: _ClassVar[int]
    BY_TRANSITION_FIELD_NUMBER: _ClassVar[int]
    version: str
    evaluated: int
    differed: int
    by_transition: _containers.ScalarMap[str, int]
    def __init__(self, version: _Optional[str] = ..., evaluated: _Optional[int] = ..., differed: _Optional[int] = ..., by_transition: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListDecisionsRequest(_message.Message):
    __slots__ = ("run_id", "action", "source", "since", "until", "limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    action: Action
    source: Source
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, run_id: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., source: _Optional[_Union[Source, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListDecisionsResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class WatchDecisionsRequest(_message.Message):
    __slots__ = ("run_id", "action", "source")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    action: Action
    source: Source
    def __init__(self, run_id: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., source: _Optional[_Union[Source, str]] = ...) -> None: ...

class GetEffectSummaryRequest(_message.Message):
    __slots__ = ("selector", "policy_version", "horizon", "experiment")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    selector: RunSelector
    policy_version: str
    horizon: int
    experiment: str
    def __init__(self, selector: _Optional[_Union[RunSelector, _Mapping]] = ..., policy_version: _Optional[str] = ..., horizon: _Optional[int] = ..., experiment: _Optional[str] = ...) -> None: ...

class EffectGroup(_message.Message):
    __slots__ = ("key", "count", "complete", "new_best", "rolled_back", "mean_relative_change", "median_relative_change", "mean_epochs_to_new_best")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    NEW_BEST_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    MEAN_RELATIVE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_RELATIVE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    MEAN_EPOCHS_TO_NEW_BEST_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    complete: int
    new_best: int
    rolled_back: int
    mean_relative_change: float
    median_relative_change: float
    mean_epochs_to_new_best: float
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ..., complete: _Optional[int] = ..., new_best: _Optional[int] = ..., rolled_back: _Optional[int] = ..., mean_relative_change: _Optional[float] = ..., median_relative_change: _Optional[float] = ..., mean_epochs_to_new_best: _Optional[float] = ...) -> None: ...

class EffectSummary(_message.Message):
    __slots__ = ("runs", "decisions", "by_policy", "by_kind", "by_grad_norm_bucket", "by_loss_mix")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    BY_POLICY_FIELD_NUMBER: _ClassVar[int]
    BY_KIND_FIELD_NUMBER: _ClassVar[int]
    BY_GRAD_NORM_BUCKET_FIELD_NUMBER: _ClassVar[int]
    BY_LOSS_MIX_FIELD_NUMBER: _ClassVar[int]
    runs: int
    decisions: int
    by_policy: _containers.RepeatedCompositeFieldContainer[EffectGroup]
    by_kind: _containers.RepeatedCompositeFieldContainer[EffectGroup]
    by_grad_norm_bucket: _containers.RepeatedCompositeFieldContainer[EffectGroup]
    by_loss_mix: _containers.RepeatedCompositeFieldContainer[EffectGroup]
    def __init__(self, runs: _Optional[int] = ..., decisions: _Optional[int] = ..., by_policy: _Optional[_Iterable[_Union[EffectGroup, _Mapping]]] = ..., by_kind: _Optional[_Iterable[_Union[EffectGroup, _Mapping]]] = ..., by_grad_norm_bucket: _Optional[_Iterable[_Union[EffectGroup, _Mapping]]] = ..., by_loss_mix: _Optional[_Iterable[_Union[EffectGroup, _Mapping]]] = ...) -> None: ...

class ExperimentArm(_message.Message):
    __slots__ = ("name", "policy_version", "observe_only", "share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy_version: str
    observe_only: bool
    share: float
    def __init__(self, name: _Optional[str] = ..., policy_version: _Optional[str] = ..., observe_only: _Optional[bool] = ..., share: _Optional[float] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("name", "description", "selector", "arms", "baseline_arm", "status", "started_at", "started_by", "ended_at", "ended_by", "promoted_arm", "assigned_runs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ARM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_BY_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_ARM_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_RUNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    selector: RunSelector
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    baseline_arm: str
    status: ExperimentStatus
    started_at: _timestamp_pb2.Timestamp
    started_by: str
    ended_at: _timestamp_pb2.Timestamp
    ended_by: str
    promoted_arm: str
    assigned_runs: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., selector: _Optional[_Union[RunSelector, _Mapping]] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., baseline_arm: _Optional[str] = ..., status: _Optional[_Union[ExperimentStatus, str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_by: _Optional[str] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_by: _Optional[str] = ..., promoted_arm: _Optional[str] = ..., assigned_runs: _Optional[int] = ...) -> None: ...

class StartExperimentRequest(_message.Message):
    __slots__ = ("name", "description", "selector", "arms", "baseline_arm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ARM_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    selector: RunSelector
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    baseline_arm: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., selector: _Optional[_Union[RunSelector, _Mapping]] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., baseline_arm: _Optional[str] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("include_ended",)
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    include_ended: bool
    def __init__(self, include_ended: _Optional[bool] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ...) -> None: ...

class GetExperimentReportRequest(_message.Message):
    __slots__ = ("name", "pair_by", "confidence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAIR_BY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pair_by: str
    confidence: float
    def __init__(self, name: _Optional[str] = ..., pair_by: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class Distribution(_message.Message):
    __slots__ = ("n", "mean", "median", "sd", "min", "max")
    N_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_FIELD_NUMBER: _ClassVar[int]
    SD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    n: int
    mean: float
    median: float
    sd: float
    min: float
    max: float
    def __init__(self, n: _Optional[int] = ..., mean: _Optional[float] = ..., median: _Optional[float] = ..., sd: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ArmComparison(_message.Message):
    __slots__ = ("paired", "n", "difference", "ci_low", "ci_high", "p_value", "win_rate", "method")
    PAIRED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    WIN_RATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    paired: bool
    n: int
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    win_rate: float
    method: str
    def __init__(self, paired: _Optional[bool] = ..., n: _Optional[int] = ..., difference: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., p_value: _Optional[float] = ..., win_rate: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class ArmReport(_message.Message):
    __slots__ = ("arm", "runs", "runs_by_status", "interventions", "rollbacks", "stops", "final_dice", "epochs_to_best", "vs_baseline", "run_ids")
    class RunsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ARM_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    RUNS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    STOPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_DICE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_TO_BEST_FIELD_NUMBER: _ClassVar[int]
    VS_BASELINE_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    arm: ExperimentArm
    runs: int
    runs_by_status: _containers.ScalarMap[str, int]
    interventions: int
    rollbacks: int
    stops: int
    final_dice: Distribution
    epochs_to_best: Distribution
    vs_baseline: ArmComparison
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, arm: _Optional[_Union[ExperimentArm, _Mapping]] = ..., runs: _Optional[int] = ..., runs_by_status: _Optional[_Mapping[str, int]] = ..., interventions: _Optional[int] = ..., rollbacks: _Optional[int] = ..., stops: _Optional[int] = ..., final_dice: _Optional[_Union[Distribution, _Mapping]] = ..., epochs_to_best: _Optional[_Union[Distribution, _Mapping]] = ..., vs_baseline: _Optional[_Union[ArmComparison, _Mapping]] = ..., run_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ExperimentReport(_message.Message):
    __slots__ = ("experiment", "arms", "confidence", "pair_by")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PAIR_BY_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    arms: _containers.RepeatedCompositeFieldContainer[ArmReport]
    confidence: float
    pair_by: str
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., arms: _Optional[_Iterable[_Union[ArmReport, _Mapping]]] = ..., confidence: _Optional[float] = ..., pair_by: _Optional[str] = ...) -> None: ...

class PromoteExperimentRequest(_message.Message):
    __slots__ = ("name", "arm", "pin", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    arm: str
    pin: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., arm: _Optional[str] = ..., pin: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class EndExperimentRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("at", "actor", "action", "target", "details", "result")
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    details: _struct_pb2.Struct
    result: str
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., result: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("actor", "action", "target", "since", "until", "limit")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    actor: str
    action: str
    target: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class ReplayPolicyRequest(_message.Message):
    __slots__ = ("version", "yaml", "selector", "limit", "max_differences")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    version: str
    yaml: str
    selector: RunSelector
    limit: int
    max_differences: int
    def __init__(self, version: _Optional[str] = ..., yaml: _Optional[str] = ..., selector: _Optional[_Union[RunSelector, _Mapping]] = ..., limit: _Optional[int] = ..., max_differences: _Optional[int] = ...) -> None: ...

class ReplayDifference(_message.Message):
    __slots__ = ("run_id", "epoch", "recorded", "candidate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    recorded: Decision
    candidate: Decision
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., recorded: _Optional[_Union[Decision, _Mapping]] = ..., candidate: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class ReplayPolicyResponse(_message.Message):
    __slots__ = ("version", "name", "runs", "decisions", "differing", "runs_differing", "by_transition", "differences")
    class ByTransitionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DIFFERING_FIELD_NUMBER: _ClassVar[int]
    RUNS_DIFFERING_FIELD_NUMBER: _ClassVar[int]
    BY_TRANSITION_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    version: str
    name: str
    runs: int
    decisions: int
    differing: int
    runs_differing: int
    by_transition: _containers.ScalarMap[str, int]
    differences: _containers.RepeatedCompositeFieldContainer[ReplayDifference]
    def __init__(self, version: _Optional[str] = ..., name: _Optional[str] = ..., runs: _Optional[int] = ..., decisions: _Optional[int] = ..., differing: _Optional[int] = ..., runs_differing: _Optional[int] = ..., by_transition: _Optional[_Mapping[str, int]] = ..., differences: _Optional[_Iterable[_Union[ReplayDifference, _Mapping]]] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Caller(_message.Message):
    __slots__ = ("name", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...
