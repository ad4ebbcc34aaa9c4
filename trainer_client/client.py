"""The trainer's side of ReportEpoch: one lazy channel, a deadline, retries, fail-open.

`ControlClient.report` sends one `EpochReport` and returns the `Decision`, or
None when anything went wrong and ``fail_open`` is set: a slow or absent
server costs a training at most the deadline per epoch and changes nothing.
`RunState` is the per-run state the reports carry and the decisions update.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from trainer_client.api import control_pb2, control_pb2_grpc
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError, ControlProtocolError, from_rpc_error
from trainer_client.vocabulary import DEFAULT_LOSS_WEIGHTS, LABEL_KEYS

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "LABEL_KEYS",
    "ControlClient",
    "RunState",
    "channel_credentials",
    "open_channel",
]

logger = logging.getLogger(__name__)

_SERVICE = "trainingcontrol.v1.TrainingControl"
_KEEPALIVE_MS = 60_000
# gRPC's default reconnect backoff grows to 120 s: after a server restart a
# run would miss reports for minutes, since calls fail fast while it waits.
_MAX_RECONNECT_BACKOFF_MS = 10_000
_KNOWN_ACTIONS = frozenset(
    {control_pb2.NONE, control_pb2.INTERVENE, control_pb2.ROLLBACK, control_pb2.STOP}
)



def service_config() -> str:
    """The channel's service config: retries for ReportEpoch, round-robin over replicas.

    gRPC retries transparently on UNAVAILABLE, inside the call's deadline
    (reports are idempotent per run and epoch); the throttle stops retry
    storms against a server that is down for everyone. No "timeout" here: in
    grpcio it fires about a second early (grpc/grpc#34547, #40633; a 0.5 s one
    fails at once), so the deadline is set per call instead.
    """
    return json.dumps(
        {
            # Replicas are stateless: spread runs over every address the name resolves to.
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": _SERVICE, "method": "ReportEpoch"}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }
    )


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    """Channel arguments for `config` (retries, message limits, keepalive)."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Epochs last minutes: pings keep idle connections through NATs and
        # load balancers, and find dead ones before the next report does.
        # The server must permit them (keepalive_permit_without_calls and
        # http2.min_ping_interval_without_data_ms <= 60 s).
        ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for `config` (CA, client certificate), or None for plaintext.

    Raises `ControlError` naming the setting when a file cannot be read.
    """
    if not config.use_tls:
        return None

    def read(path: Path | None, setting: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as error:
            raise ControlError(f"cannot read {setting} file {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.tls_ca, "TRAINCTL_TLS_CA"),
        private_key=read(config.tls_key, "TRAINCTL_TLS_KEY"),
        certificate_chain=read(config.tls_cert, "TRAINCTL_TLS_CERT"),
    )


def open_channel(config: ClientConfig) -> grpc.Channel:
    """A channel to ``config.target``: TLS when configured, with `channel_options`."""
    credentials = channel_credentials(config)
    options = channel_options(config)
    if credentials is not None:
        return grpc.secure_channel(config.target, credentials, options=options)
    if config.token and not is_loopback(config.target):
        logger.warning(
            "sending a bearer token to %s without TLS: anyone on the path can read it; "
            "set TRAINCTL_TLS_CA (or TRAINCTL_TLS=1)",
            config.target,
        )
    return grpc.insecure_channel(config.target, options=options)


def is_loopback(target: str) -> bool:
    """True when a gRPC target or listen address (HOST:PORT, dns:///HOST:PORT) is loopback."""
    host = target.split("///", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControlClient:
    """A ReportEpoch client for one training process; use as a context manager.

    The channel is created on the first report, not in ``__init__``: nnU-Net
    forks its data-loader workers after the trainer is built, and a gRPC
    channel must not exist across a fork.
    """

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._channel: Any = None
        self._stub: Any = None
        self._pid: int | None = None
        self._closed = False
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    @property
    def config(self) -> ClientConfig:
        """The configuration this client was built with."""
        return self._config

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; later reports fail (and fail open). Idempotent."""
        with self._lock:
            self._closed = True
            channel, self._channel, self._stub = self._channel, None, None
            owned = self._pid == os.getpid()
        if channel is not None and owned:
            channel.close()

    def report(self, report: control_pb2.EpochReport) -> control_pb2.Decision | None:
        """Send one epoch report and return the server's decision.

        With ``fail_open`` any failure is logged as one warning and returns
        None (keep training unchanged); otherwise it raises a `ControlError`.
        """
        try:
            return self._report(report)
        except Exception as error:
            if not self._config.fail_open:
                raise
            # Fail open covers our own bugs too: never stop a training over control.
            logger.warning(
                "[ReportEpoch] run=%s epoch=%s no decision, training goes on unchanged: %s",
                report.run_id,
                report.epoch,
                _one_line(error),
            )
            return None

    def _report(self, report: control_pb2.EpochReport) -> control_pb2.Decision:
        stub = self._get_stub()
        try:
            decision: control_pb2.Decision = stub.ReportEpoch(
                report, timeout=self._config.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        _check_decision(report, decision)
        return decision

    def _get_stub(self) -> Any:
        with self._lock:
            if self._closed:
                raise ControlError("the client is closed")
            pid = os.getpid()
            if self._stub is None or self._pid != pid:
                # A channel inherited through fork() is unusable in the child;
                # leave it to the parent and start our own.
                self._channel = open_channel(self._config)
                self._stub = control_pb2_grpc.TrainingControlStub(self._channel)
                self._pid = pid
            return self._stub


def _check_decision(report: control_pb2.EpochReport, decision: control_pb2.Decision) -> None:
    """Refuse a decision the trainer must not act on (wrong run or epoch, bad numbers)."""
    problem = None
    if decision.run_id != report.run_id or decision.epoch != report.epoch:
        problem = (
            f"decision is for run={decision.run_id!r} epoch={decision.epoch}, "
            f"not run={report.run_id!r} epoch={report.epoch}"
        )
    elif decision.action not in _KNOWN_ACTIONS:
        problem = f"decision has an unknown action {decision.action}"
    elif decision.HasField("lr") and not (math.isfinite(decision.lr) and decision.lr > 0):
        problem = f"decision lr must be a positive number, but got {decision.lr!r}"
    elif any(not (math.isfinite(w) and w >= 0) for w in decision.loss_weights.values()):
        problem = f"decision loss_weights must be >= 0, but got {dict(decision.loss_weights)}"
    elif decision.loss_weights and not any(decision.loss_weights.values()):
        problem = "decision loss_weights are all zero"
    if problem is not None:
        raise ControlProtocolError(problem)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, ControlError) else f"{type(error).__name__}: {text}"


@dataclass
class RunState:
    """What a run's reports carry between epochs; decisions update it via `apply`."""

    #: The run's id, stable across resumes.
    run_id: str
    #: The LR the run started with (the PolyLR base before any intervention).
    initial_lr: float
    #: The LR used during the epoch being reported.
    current_lr: float
    #: Run labels; keys are among `LABEL_KEYS`.
    labels: dict[str, str] = field(default_factory=dict)
    #: Loss weights the optimizer uses.
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    #: Automatic interventions applied so far (a rolled-back one still counts).
    intervention_count: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.labels) - set(LABEL_KEYS))
        if unknown:
            raise ValueError(f"labels must use keys from {LABEL_KEYS}, but got {unknown}.")
        if not self.run_id:
            raise ValueError("run_id must be non-empty.")

    def build_report(
        self,
        epoch: int,
        train_loss: float,
        val_loss: float | None = None,
        pseudo_dice: float | None = None,
        avg_gradient_norm: float | None = None,
    ) -> control_pb2.EpochReport:
        """The `EpochReport` for `epoch`, carrying this state; unset optionals stay unset."""
        report = control_pb2.EpochReport(
            run_id=self.run_id,
            epoch=epoch,
            train_loss=train_loss,
            intervention_count=self.intervention_count,
            current_lr=self.current_lr,
            initial_lr=self.initial_lr,
            loss_weights=self.loss_weights,
            labels=control_pb2.RunLabels(**self.labels),
        )
        if val_loss is not None:
            report.val_loss = val_loss
        if pseudo_dice is not None:
            report.pseudo_dice = pseudo_dice
        if avg_gradient_norm is not None:
            report.avg_gradient_norm = avg_gradient_norm
        return report

    def apply(self, decision: control_pb2.Decision | None) -> None:
        """Take over the LR, weights and intervention count of INTERVENE and ROLLBACK.

        NONE, STOP and None (no decision) change nothing here; the trainer acts
        on STOP and restores its snapshot on ROLLBACK.
        """
        if decision is None or decision.action not in (control_pb2.INTERVENE, control_pb2.ROLLBACK):
            return
        if decision.HasField("lr"):
            self.current_lr = decision.lr
        if decision.loss_weights:
            self.loss_weights = dict(decision.loss_weights)
        # Overrides carry index 0 and a rollback must not uncount the
        # intervention it undoes, hence max rather than assignment.
        self.intervention_count = max(self.intervention_count, decision.intervention_index)
