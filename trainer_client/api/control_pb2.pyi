import datetime

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
ACTION_UNSPECIFIED: Action
NONE: Action
INTERVENE: Action
ROLLBACK: Action
STOP: Action
SOURCE_UNSPECIFIED: Source
POLICY: Source
OVERRIDE: Source
SAFETY: Source

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
    __slots__ = ("run_id", "epoch", "train_loss", "val_loss", "pseudo_dice", "avg_gradient_norm", "intervention_count", "current_lr", "initial_lr", "loss_weights", "labels")
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
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., pseudo_dice: _Optional[float] = ..., avg_gradient_norm: _Optional[float] = ..., intervention_count: _Optional[int] = ..., current_lr: _Optional[float] = ..., initial_lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., labels: _Optional[_Union[RunLabels, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("decision_id", "run_id", "epoch", "action", "lr", "loss_weights", "intervention_index", "source", "reason", "policy_version", "decided_at")
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
    def __init__(self, decision_id: _Optional[str] = ..., run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., lr: _Optional[float] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., intervention_index: _Optional[int] = ..., source: _Optional[_Union[Source, str]] = ..., reason: _Optional[str] = ..., policy_version: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "labels", "last_epoch", "report_count", "intervention_count", "current_lr", "last_decision", "first_seen", "last_seen")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LR_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    labels: RunLabels
    last_epoch: int
    report_count: int
    intervention_count: int
    current_lr: float
    last_decision: Decision
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., labels: _Optional[_Union[RunLabels, _Mapping]] = ..., last_epoch: _Optional[int] = ..., report_count: _Optional[int] = ..., intervention_count: _Optional[int] = ..., current_lr: _Optional[float] = ..., last_decision: _Optional[_Union[Decision, _Mapping]] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("dataset", "configuration", "fold", "limit")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    FOLD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    configuration: str
    fold: str
    limit: int
    def __init__(self, dataset: _Optional[str] = ..., configuration: _Optional[str] = ..., fold: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunEpoch(_message.Message):
    __slots__ = ("report", "decision")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    report: EpochReport
    decision: Decision
    def __init__(self, report: _Optional[_Union[EpochReport, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run", "epochs")
    RUN_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    run: RunSummary
    epochs: _containers.RepeatedCompositeFieldContainer[RunEpoch]
    def __init__(self, run: _Optional[_Union[RunSummary, _Mapping]] = ..., epochs: _Optional[_Iterable[_Union[RunEpoch, _Mapping]]] = ...) -> None: ...
