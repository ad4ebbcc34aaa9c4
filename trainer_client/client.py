"""The trainer's side of training control: one lazy channel, a deadline, retries, fail-open.

A training calls `ControlClient.start_run` once at start (and again when it
resumes from a checkpoint), `ControlClient.report` after every epoch, and
`ControlClient.finish_run` at the end. `RunState` is the per-run state the
reports carry and the decisions update.

Setup mistakes fail fast: a refused token or role, a TLS mismatch or an address
that is no control server make `start_run` raise `ControlSetupError`, naming the
variable to fix (unless ``fail_open_on_setup``). Outages fail open: a slow or
absent server costs a training at most the deadline per epoch and changes
nothing. While it is unreachable the client holds the epoch reports (at most
``max_held_reports``, the oldest dropped first) and delivers them, marked late,
before the next report once it is back, so the run's record has no holes; one
warning says control was lost, one that it is back. A decision the trainer must
not act on (an unknown loss component, an LR outside (0, cap]) is refused and
the run keeps its last good state.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from trainer_client.api import control_pb2, control_pb2_grpc
from trainer_client.config import ClientConfig
from trainer_client.errors import (
    ControlError,
    ControlProtocolError,
    ControlRejected,
    ControlSetupError,
    ControlUnauthorized,
    ControlUnavailable,
    from_rpc_error,
)
from trainer_client.vocabulary import (
    DEFAULT_LOSS_WEIGHTS,
    LABEL_KEYS,
    LossWeightError,
    check_loss_weights,
)

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "LABEL_KEYS",
    "ControlClient",
    "RunStart",
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
_C = grpc.StatusCode
# What gRPC's status details say when a TLS handshake failed on the client's side.
_TLS_FAILURE_MARKS = ("handshake failed", "ssl_error", "certificate_verify_failed")
# ... and when the peer answered something that is not HTTP/2 (an HTTP/1 server).
_NOT_HTTP2_MARKS = ("failed parsing http/2", "http1.x", "expected settings frame")
# ... and when the peer accepted the connection and then dropped it: what a TLS server
# does to a plaintext client, and to a TLS client without the certificate it requires.
_DROPPED_MARKS = ("socket closed", "connection reset")
_FIX_TLS = "set TRAINCTL_TLS_CA to the PEM CA that signed the server's certificate"


def service_config() -> str:
    """The channel's service config: retries for ReportEpoch, round-robin over replicas.

    gRPC retries ReportEpoch and FinishRun transparently on UNAVAILABLE, inside
    the call's deadline (both are idempotent); never StartRun, each of which opens
    a new attempt. The throttle stops retry storms against a server that is down
    for everyone. No "timeout" here: in
    grpcio it fires about a second early (grpc/grpc#34547, #40633; a 0.5 s one
    fails at once), so the deadline is set per call instead.
    """
    return json.dumps(
        {
            # Replicas are stateless: spread runs over every address the name resolves to.
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [
                        {"service": _SERVICE, "method": "ReportEpoch"},
                        {"service": _SERVICE, "method": "FinishRun"},
                    ],
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


@dataclass(frozen=True)
class RunStart:
    """What `ControlClient.start_run` got: the attempt StartRun opened, or attempt 0
    when there is none (an older server, or a server unreachable or refused with
    fail-open, in which case reports go to the run's latest attempt)."""

    attempt: int
    #: The policy version that will steer the run ("" when unknown).
    policy_version: str = ""
    #: True when the run id had earlier attempts and this one starts from scratch.
    history_reset: bool = False
    #: Epochs of earlier attempts this one supersedes.
    superseded_epochs: int = 0
    #: One sentence for the trainer's log: the server's, or why there is no attempt.
    message: str = ""


class ControlClient:
    """A training process's client of the control server; use as a context manager.

    The channel is created on the first call, not in ``__init__``: nnU-Net
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
        #: The attempt StartRun opened (0: none yet); stamped on reports that name none.
        self._attempt = 0
        #: A StartRun the server was unreachable for: sent once it is back.
        self._pending_start: control_pb2.StartRunRequest | None = None
        self._state: RunState | None = None
        #: Reports no server answered, marked late, oldest first.
        self._held: deque[control_pb2.EpochReport] = deque(maxlen=config.max_held_reports)
        #: Since control was lost: held reports dropped (over the bound), late ones delivered.
        self._dropped = 0
        self._delivered = 0
        self._refused = 0
        #: True while the server has not answered since a call it missed (or since
        #: reports held by an earlier process were restored); warned once per loss.
        self._lost = False
        self._warned_lost = False

    @property
    def config(self) -> ClientConfig:
        """The configuration this client was built with."""
        return self._config

    @property
    def attempt(self) -> int:
        """The attempt StartRun opened (0: none, e.g. an older server)."""
        return self._attempt

    @property
    def control_lost(self) -> bool:
        """True from a call the server did not answer until one it answers again."""
        return self._lost

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
        """Close the channel; later calls fail (and fail open). Idempotent."""
        with self._lock:
            self._closed = True
            channel, self._channel, self._stub = self._channel, None, None
            owned = self._pid == os.getpid()
        if channel is not None and owned:
            channel.close()

    # -- held reports ---------------------------------------------------------------------

    def held_reports(self) -> list[bytes]:
        """The reports held for late delivery, serialized, oldest first (for a checkpoint)."""
        return [report.SerializeToString() for report in self._held]

    def hold_reports(self, serialized: Iterable[bytes]) -> None:
        """Hold reports saved by `held_reports` (a resumed training's checkpoint); they
        are delivered late, before anything else, once the server answers (and the
        warning that control is back counts them)."""
        for data in serialized:
            self._hold(control_pb2.EpochReport.FromString(data))
            self._lost = True

    def _hold(self, report: control_pb2.EpochReport) -> None:
        if self._held.maxlen == 0:
            self._dropped += 1
            return
        if len(self._held) == self._held.maxlen:
            self._dropped += 1
        late = control_pb2.EpochReport()
        late.CopyFrom(report)
        late.late = True
        self._held.append(late)

    # -- StartRun -------------------------------------------------------------------------

    def start_run(
        self,
        state: RunState,
        *,
        trainer_name: str,
        trainer_version: str,
        resume_from_epoch: int | None = None,
    ) -> RunStart:
        """Open the run's next attempt (call once at start, and again on resume with the
        epoch of the checkpoint); sets ``state.attempt`` and logs the server's message.

        Raises `ControlSetupError` for a setup mistake unless ``fail_open_on_setup``;
        with ``fail_open`` an outage or any other failure is one warning and attempt 0
        (for an outage, StartRun is sent again once the server is back). Without it,
        those raise their `ControlError`.
        """
        request = control_pb2.StartRunRequest(
            run_id=state.run_id,
            labels=control_pb2.RunLabels(**state.labels),
            initial_lr=state.initial_lr,
            loss_weights=state.loss_weights,
            trainer_name=trainer_name,
            trainer_version=trainer_version,
        )
        if resume_from_epoch is not None:
            request.resume_from_epoch = resume_from_epoch
        self._state = state
        self._pending_start = None
        # A new attempt: unknown until StartRun answers (a checkpoint's is an earlier one).
        state.attempt = self._attempt = 0
        try:
            # Reports an earlier attempt held (restored from its checkpoint) go first:
            # once the next attempt is open, the server refuses the earlier one's.
            with contextlib.suppress(ControlUnauthorized):  # StartRun names what to fix
                self._deliver_held(earlier_attempts_only=True)
            start = self._start(request)
        except Exception as error:
            return self._start_failed(request, error)
        self._started(start)
        if self._lost:
            self._control_back(state.run_id)
        return start

    def _start(self, request: control_pb2.StartRunRequest) -> RunStart:
        stub = self._get_stub()
        try:
            response: control_pb2.StartRunResponse = stub.StartRun(
                request, timeout=self._config.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            problem = self._setup_problem(error)
            if problem is not None:
                raise problem from error
            if error.code() == _C.UNIMPLEMENTED:
                return RunStart(
                    0,
                    message="the control server does not know StartRun (an older server): "
                    "reports go without attempts",
                )
            raise from_rpc_error(error) from error
        if response.attempt < 1:
            raise ControlProtocolError(
                f"StartRun answered attempt {response.attempt}; an attempt is >= 1"
            )
        return RunStart(
            attempt=response.attempt,
            policy_version=response.policy_version,
            history_reset=response.history_reset,
            superseded_epochs=response.superseded_epochs,
            message=response.message,
        )

    def _started(self, start: RunStart) -> None:
        self._attempt = start.attempt
        if self._state is not None:
            self._state.attempt = start.attempt
        # The server's message names the run, the attempt and the policy; a history
        # reset is a warning, for a restart from scratch may well be a mistake.
        logger.log(
            logging.WARNING if start.history_reset else logging.INFO,
            "[StartRun] %s",
            start.message
            or f"run {self._state.run_id if self._state else '?'} attempt {start.attempt}",
        )

    def _start_failed(self, request: control_pb2.StartRunRequest, error: Exception) -> RunStart:
        config = self._config
        if isinstance(error, ControlSetupError):
            if not config.fail_open_on_setup:
                raise error
            logger.warning(
                "[StartRun] run=%s training without control (TRAINCTL_FAIL_OPEN=always): %s",
                request.run_id,
                _one_line(error),
            )
            return RunStart(0, message=f"training without control: {_one_line(error)}")
        if not config.fail_open:
            raise error
        if isinstance(error, ControlUnavailable):
            self._pending_start = request
            self._lose_control("StartRun", request.run_id, None, error)
            return RunStart(
                0, message="the control server is unreachable: StartRun is sent when it is back"
            )
        # Fail open covers our own bugs too: never stop a training over control.
        logger.warning(
            "[StartRun] run=%s no attempt, reports go to the run's latest: %s",
            request.run_id,
            _one_line(error),
        )
        return RunStart(0, message=f"no attempt: {_one_line(error)}")

    def _setup_problem(self, error: grpc.RpcError) -> ControlSetupError | None:
        """The setup mistake a failed StartRun reveals, or None (an outage, or a refusal
        of this request that the next one may not meet)."""
        config = self._config
        code = error.code()
        details = error.details() or ""
        where = f"the control server at {config.target}"

        def mistake(message: str, variable: str) -> ControlSetupError:
            return ControlSetupError(
                f"{message} ({code.name}: {' '.join(details.split())})",
                variable=variable,
                code=code,
                details=details,
            )

        if code == _C.UNAUTHENTICATED:
            if config.token is None:
                return mistake(f"{where} needs a token: set TRAINCTL_TOKEN", "TRAINCTL_TOKEN")
            return mistake(
                f"{where} does not know the token: set TRAINCTL_TOKEN to a token of role "
                "trainer from its token file",
                "TRAINCTL_TOKEN",
            )
        if code == _C.PERMISSION_DENIED:
            return mistake(
                f"{where} refused the token's role: set TRAINCTL_TOKEN to a token of role trainer",
                "TRAINCTL_TOKEN",
            )
        if code == _C.UNIMPLEMENTED:
            if self._serves_report_epoch():
                return None  # an older control server: no StartRun yet
            return mistake(
                f"{config.target} is a gRPC server but not a training-control server: set "
                "TRAINCTL_SERVER to the control server's HOST:PORT",
                "TRAINCTL_SERVER",
            )
        if code != _C.UNAVAILABLE:
            return None
        lowered = details.lower()
        if any(mark in lowered for mark in _NOT_HTTP2_MARKS):
            return mistake(
                f"{config.target} does not speak gRPC (no HTTP/2): set TRAINCTL_SERVER to the "
                "control server's HOST:PORT",
                "TRAINCTL_SERVER",
            )
        if any(mark in lowered for mark in _TLS_FAILURE_MARKS):
            if "wrong_version_number" in lowered:
                return mistake(
                    f"{where} does not speak TLS: unset TRAINCTL_TLS, TRAINCTL_TLS_CA, "
                    "TRAINCTL_TLS_CERT and TRAINCTL_TLS_KEY (or serve TLS)",
                    "TRAINCTL_TLS_CA",
                )
            return mistake(f"TLS with {where} failed: {_FIX_TLS}", "TRAINCTL_TLS_CA")
        if any(mark in lowered for mark in _DROPPED_MARKS):
            return self._dropped_connection(mistake)
        return None

    def _serves_report_epoch(self) -> bool:
        """Whether the server knows ReportEpoch: an empty report is refused by a control
        server (INVALID_ARGUMENT), by anything else as UNIMPLEMENTED."""
        try:
            self._get_stub().ReportEpoch(
                control_pb2.EpochReport(), timeout=self._config.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return bool(error.code() != _C.UNIMPLEMENTED)
        return True

    def _dropped_connection(self, mistake: Any) -> ControlSetupError | None:
        """Why the server dropped the connection, when TLS explains it: the server
        speaks TLS to a plaintext client, or wants a client certificate this client
        lacks. None when no TLS handshake tells (an outage)."""
        config = self._config
        address = _host_port(config.target)
        if address is None:
            return None
        if not config.use_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if _tls_handshake(address, context, self._config.deadline_s) is not None:
                return mistake(  # type: ignore[no-any-return]
                    f"the control server at {config.target} speaks TLS and this client does "
                    f"not: {_FIX_TLS} (or TRAINCTL_TLS=1 for a publicly signed one)",
                    "TRAINCTL_TLS_CA",
                )
            return None
        if config.tls_cert is None:
            context = ssl.create_default_context(
                cafile=str(config.tls_ca) if config.tls_ca is not None else None
            )
            context.check_hostname = False
            answer = _tls_handshake(address, context, self._config.deadline_s)
            if answer is not None and answer != "ok":
                return mistake(  # type: ignore[no-any-return]
                    f"the control server at {config.target} requires a client certificate: "
                    "set TRAINCTL_TLS_CERT and TRAINCTL_TLS_KEY",
                    "TRAINCTL_TLS_CERT",
                )
        return None

    # -- ReportEpoch ----------------------------------------------------------------------

    def report(self, report: control_pb2.EpochReport) -> control_pb2.Decision | None:
        """Send one epoch report and return the server's decision.

        Reports held while the server was unreachable go first, marked late. With
        ``fail_open`` a failure returns None (keep training unchanged): an outage holds
        the report (one warning when control is lost, one when it is back), anything
        else is one warning. Without it, it raises a `ControlError`.
        """
        try:
            self._catch_up()
            decision = self._send(report)
        except Exception as error:
            if not self._config.fail_open:
                raise
            if isinstance(error, ControlUnavailable):
                self._hold(report)
                self._lose_control("ReportEpoch", report.run_id, report.epoch, error)
                return None
            # Fail open covers our own bugs too: never stop a training over control.
            logger.warning(
                "[ReportEpoch] run=%s epoch=%s no decision, training goes on unchanged: %s",
                report.run_id,
                report.epoch,
                _one_line(error),
            )
            return None
        if self._lost:
            self._control_back(report.run_id)
        return decision

    def _send(self, report: control_pb2.EpochReport) -> control_pb2.Decision:
        if report.attempt == 0 and self._attempt:
            stamped = control_pb2.EpochReport()
            stamped.CopyFrom(report)
            stamped.attempt = self._attempt
            report = stamped
        stub = self._get_stub()
        try:
            decision: control_pb2.Decision = stub.ReportEpoch(
                report, timeout=self._config.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        _check_decision(report, decision, self._config.lr_cap(report.initial_lr))
        return decision

    def _catch_up(self) -> None:
        """Before a report: the held reports of earlier attempts, a StartRun the server
        missed, then this attempt's held reports. Raises ControlUnavailable while the
        server is still unreachable."""
        self._deliver_held(earlier_attempts_only=True)
        if self._pending_start is not None:
            request = self._pending_start
            try:
                start = self._start(request)
            except ControlUnavailable:
                raise
            except Exception as error:
                self._pending_start = None
                logger.warning(
                    "[StartRun] run=%s no attempt, reports go to the run's latest: %s",
                    request.run_id,
                    _one_line(error),
                )
            else:
                self._pending_start = None
                self._started(start)
        self._deliver_held(earlier_attempts_only=False)

    def _deliver_held(self, *, earlier_attempts_only: bool) -> None:
        """Deliver held reports, oldest first, each marked late; the server's answer to
        a late report is never applied. One the server refuses is dropped (counted)."""
        while self._held:
            report = self._held[0]
            if earlier_attempts_only and not (report.attempt and report.attempt != self._attempt):
                return
            try:
                self._send(report)
            except (ControlRejected, ControlProtocolError) as error:
                # The server refused this report (e.g. its epoch is recorded differently):
                # it will not take it later either.
                self._refused += 1
                logger.debug("late report of epoch %d refused: %s", report.epoch, error)
            self._held.popleft()
            self._delivered += 1

    def _lose_control(self, rpc: str, run_id: str, epoch: int | None, error: BaseException) -> None:
        if self._warned_lost:
            return
        self._lost = self._warned_lost = True
        at = f" epoch={epoch}" if epoch is not None else ""
        logger.warning(
            "[%s] run=%s%s control lost, training goes on unchanged; reports are held (up to "
            "%d) and delivered late when the server at %s (TRAINCTL_SERVER) is back: %s",
            rpc,
            run_id,
            at,
            self._config.max_held_reports,
            self._config.target,
            _one_line(error),
        )

    def _control_back(self, run_id: str) -> None:
        refused = f", {self._refused} of them refused" if self._refused else ""
        dropped = (
            f"; {self._dropped} older ones were dropped (TRAINCTL_MAX_HELD_REPORTS="
            f"{self._config.max_held_reports})"
            if self._dropped
            else ""
        )
        logger.warning(
            "[ReportEpoch] run=%s control is back: %d held reports delivered late%s%s",
            run_id,
            self._delivered - self._refused,
            refused,
            dropped,
        )
        self._lost = self._warned_lost = False
        self._delivered = self._refused = self._dropped = 0

    # -- FinishRun ------------------------------------------------------------------------

    def finish_run(
        self,
        run_id: str,
        status: control_pb2.RunStatus.ValueType,
        *,
        error: str = "",
        metrics: control_pb2.FinalMetrics | None = None,
    ) -> bool:
        """Tell the server how the run ended (COMPLETED, STOPPED or FAILED with `error`)
        and its final metrics, after delivering what is held; True once recorded.

        With ``fail_open``, or for FAILED (the training already failed), a failure is
        one warning and False; otherwise it raises. An older server without FinishRun
        is a debug line.
        """
        request = control_pb2.FinishRunRequest(
            run_id=run_id, attempt=self._attempt, status=status, error=error[:4000]
        )
        if metrics is not None:
            request.metrics.CopyFrom(metrics)
        try:
            self._catch_up()
            if self._lost:
                self._control_back(run_id)
            self._get_stub().FinishRun(
                request, timeout=self._config.deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as failure:
            if failure.code() == _C.UNIMPLEMENTED:
                logger.debug("[FinishRun] run=%s the server does not know FinishRun", run_id)
                return False
            return self._finish_failed(request, from_rpc_error(failure))
        except Exception as failure:
            return self._finish_failed(request, failure)
        logger.info(
            "[FinishRun] run=%s attempt=%d %s",
            run_id,
            self._attempt,
            control_pb2.RunStatus.Name(status),
        )
        return True

    def _finish_failed(self, request: control_pb2.FinishRunRequest, error: Exception) -> bool:
        if not self._config.fail_open and request.status != control_pb2.FAILED:
            raise error
        held = f"; {len(self._held)} held reports never delivered" if self._held else ""
        logger.warning(
            "[FinishRun] run=%s the end of the run (%s) was not recorded%s: %s",
            request.run_id,
            control_pb2.RunStatus.Name(request.status),
            held,
            _one_line(error),
        )
        return False

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


def _host_port(target: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or dns:///HOST:PORT target; None for other forms."""
    host, _, port = target.split("///", 1)[-1].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _tls_handshake(address: tuple[str, int], context: ssl.SSLContext, timeout: float) -> str | None:
    """Try a TLS handshake with `address`, then read: "ok" when the server speaks TLS
    and stays, "closed" (or the alert's text) when it ends the connection right after
    the handshake, as a TLS 1.3 server that wants a client certificate does when it
    got none; None when the handshake fails (no TLS there)."""
    try:
        with (
            socket.create_connection(address, timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=address[0]) as tls,
        ):
            try:
                tls.settimeout(min(timeout, 0.5))
                if not tls.recv(1):
                    return "closed"
            except ssl.SSLError as alert:
                return str(alert)
            except OSError:
                pass  # a timeout: the server waits for the client's HTTP/2 preface
            return "ok"
    except OSError:  # ssl.SSLError among them
        return None


def _check_decision(
    report: control_pb2.EpochReport, decision: control_pb2.Decision, lr_cap: float
) -> None:
    """Refuse a decision the trainer must not act on (wrong run or epoch, bad numbers, an
    unknown loss component, an LR above the client's cap)."""
    problem = None
    if decision.run_id != report.run_id or decision.epoch != report.epoch:
        problem = (
            f"decision is for run={decision.run_id!r} epoch={decision.epoch}, "
            f"not run={report.run_id!r} epoch={report.epoch}"
        )
    elif report.late:
        return  # recorded, never applied: nothing in it is acted on
    elif decision.action not in _KNOWN_ACTIONS:
        problem = f"decision has an unknown action {decision.action}"
    elif decision.HasField("lr") and not (math.isfinite(decision.lr) and decision.lr > 0):
        problem = f"decision lr must be a positive number, but got {decision.lr!r}"
    elif decision.HasField("lr") and decision.lr > lr_cap:
        problem = (
            f"decision lr must be at most the client's cap {lr_cap:g} (TRAINCTL_MAX_LR; "
            f"default 10x the initial LR), but got {decision.lr!r}"
        )
    elif decision.loss_weights:
        try:
            check_loss_weights(decision.loss_weights)
        except LossWeightError as error:
            problem = (
                f"decision loss_weights['{error.component}']: {error.problem}"
                if (error.component is not None)
                else f"decision loss_weights: {error.problem}"
            )
    if problem is not None:
        raise ControlProtocolError(problem + "; the run keeps its last good state")


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
    #: The attempt StartRun opened (0: none, e.g. an older server); reports carry it.
    attempt: int = 0

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
            attempt=self.attempt,
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
