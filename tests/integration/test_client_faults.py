"""ControlClient against real gRPC servers that misbehave on purpose.

The servicer here is a fault injector, not the control server: it answers,
stalls, fails with a chosen status, or checks metadata, and counts attempts so
that transparent gRPC retries are visible.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from tests.factories import epoch_report
from trainer_client import (
    ClientConfig,
    ControlClient,
    ControlError,
    ControlProtocolError,
    ControlRejected,
    ControlUnauthorized,
    ControlUnavailable,
    RunState,
)
from trainer_client.api import control_pb2, control_pb2_grpc

DEADLINE_S = 0.5
# Time allowed beyond the deadline for scheduling on a busy CI machine.
SLACK_S = 1.5

Behaviour = Callable[["FaultServicer", control_pb2.EpochReport, Any, int], control_pb2.Decision]


def answer(report: control_pb2.EpochReport, **fields: Any) -> control_pb2.Decision:
    """The decision a well-behaved server would send for `report`."""
    values: dict[str, Any] = {
        "decision_id": f"d-{report.run_id}-{report.epoch}",
        "run_id": report.run_id,
        "epoch": report.epoch,
        "action": control_pb2.NONE,
        "source": control_pb2.POLICY,
        "reason": "Val_loss 0.4 improved on best 0.5.",
        "policy_version": "v-test",
    }
    values.update(fields)
    return control_pb2.Decision(**values)


@dataclass
class FaultServicer(control_pb2_grpc.TrainingControlServicer):  # type: ignore[misc]
    """Counts attempts, records metadata, and lets `behaviour` decide each one."""

    behaviour: Behaviour
    attempts: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ReportEpoch(self, request: control_pb2.EpochReport, context: Any) -> control_pb2.Decision:
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
            self.metadata.append(dict(context.invocation_metadata()))
        return self.behaviour(self, request, context, attempt)


@dataclass
class Running:
    servicer: FaultServicer
    target: str


@pytest.fixture
def start_server() -> Iterator[Callable[[Behaviour], Running]]:
    """Start fault servers on port 0; all are released and stopped at the end."""
    started: list[tuple[grpc.Server, futures.ThreadPoolExecutor, FaultServicer]] = []

    def start(behaviour: Behaviour) -> Running:
        servicer = FaultServicer(behaviour)
        executor = futures.ThreadPoolExecutor(max_workers=4)
        server = grpc.server(executor)
        control_pb2_grpc.add_TrainingControlServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, executor, servicer))
        return Running(servicer, f"127.0.0.1:{port}")

    yield start
    for server, executor, servicer in started:
        servicer.release.set()  # let stalled handlers return before the pool shuts down
        server.stop(None).wait(5)
        executor.shutdown(wait=True)


def ok(servicer: FaultServicer, report: control_pb2.EpochReport, context: Any, attempt: int) -> Any:
    return answer(report)


def stall(
    servicer: FaultServicer, report: control_pb2.EpochReport, context: Any, attempt: int
) -> Any:
    servicer.release.wait(30)
    return answer(report)


def client_for(target: str, **overrides: Any) -> ControlClient:
    values: dict[str, Any] = {"target": target, "deadline_s": DEADLINE_S}
    values.update(overrides)
    return ControlClient(ClientConfig(**values))


def free_port() -> int:
    """A port nothing listens on: bind, read it, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def warnings_from_client(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "trainer_client.client" and record.levelno == logging.WARNING
    ]


# --- (a) no server at all -------------------------------------------------------------


def test_no_server_fails_open_within_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    with client_for(f"127.0.0.1:{free_port()}") as client:
        started = time.monotonic()
        assert client.report(epoch_report(epoch=3)) is None
        elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + SLACK_S
    [message] = warnings_from_client(caplog)
    assert message.startswith("[ReportEpoch] run=run-a epoch=3 ")
    assert "\n" not in message


def test_no_server_raises_unavailable_when_fail_closed() -> None:
    with (
        client_for(f"127.0.0.1:{free_port()}", fail_open=False) as client,
        pytest.raises(ControlUnavailable) as caught,
    ):
        client.report(epoch_report(epoch=3))
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# --- (b) a server that never answers --------------------------------------------------


def test_stalled_server_costs_about_the_deadline(
    start_server: Callable[[Behaviour], Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = start_server(stall)
    with client_for(server.target) as client:
        started = time.monotonic()
        assert client.report(epoch_report(epoch=3)) is None
        elapsed = time.monotonic() - started
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + SLACK_S
    [message] = warnings_from_client(caplog)
    assert "DEADLINE_EXCEEDED" in message


def test_stalled_server_raises_unavailable_when_fail_closed(
    start_server: Callable[[Behaviour], Running],
) -> None:
    server = start_server(stall)
    with (
        client_for(server.target, fail_open=False) as client,
        pytest.raises(ControlUnavailable) as caught,
    ):
        client.report(epoch_report(epoch=3))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # A deadline is not retried: the server saw exactly one attempt.
    assert server.servicer.attempts == 1


# --- (c) transparent retries on UNAVAILABLE, inside the deadline -------------------------


def test_unavailable_twice_then_an_answer_is_retried_within_the_deadline(
    start_server: Callable[[Behaviour], Running],
) -> None:
    def flaky(servicer: FaultServicer, report: Any, context: Any, attempt: int) -> Any:
        if attempt <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica warming up")
        return answer(report, action=control_pb2.INTERVENE, lr=0.01, intervention_index=1)

    server = start_server(flaky)
    with client_for(server.target, deadline_s=2.0, fail_open=False) as client:
        started = time.monotonic()
        decision = client.report(epoch_report(epoch=3))
        elapsed = time.monotonic() - started
    assert decision is not None
    assert decision.action == control_pb2.INTERVENE
    assert server.servicer.attempts == 3
    # gRPC itself retried (it numbers the attempts), not a loop in the client.
    assert server.servicer.metadata[2].get("grpc-previous-rpc-attempts") == "2"
    assert elapsed < 2.0


def test_retries_give_up_at_max_attempts(start_server: Callable[[Behaviour], Running]) -> None:
    def down(servicer: FaultServicer, report: Any, context: Any, attempt: int) -> Any:
        context.abort(grpc.StatusCode.UNAVAILABLE, "store unavailable")

    server = start_server(down)
    with client_for(server.target, deadline_s=5.0, fail_open=False) as client:
        started = time.monotonic()
        with pytest.raises(ControlUnavailable, match="store unavailable"):
            client.report(epoch_report(epoch=3))
        elapsed = time.monotonic() - started
    assert server.servicer.attempts == 5
    assert elapsed < 5.0


# --- (d) rejected input --------------------------------------------------------------


def invalid(servicer: FaultServicer, report: Any, context: Any, attempt: int) -> Any:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "epoch: must be >= 0, but got -1.")


def test_invalid_argument_raises_rejected_with_the_servers_message(
    start_server: Callable[[Behaviour], Running],
) -> None:
    server = start_server(invalid)
    with (
        client_for(server.target, fail_open=False) as client,
        pytest.raises(ControlRejected) as caught,
    ):
        client.report(epoch_report(epoch=3))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "epoch: must be >= 0, but got -1."
    assert "epoch: must be >= 0" in str(caught.value)
    assert server.servicer.attempts == 1  # not retryable


def test_invalid_argument_fails_open_with_one_warning(
    start_server: Callable[[Behaviour], Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = start_server(invalid)
    with client_for(server.target) as client:
        assert client.report(epoch_report(epoch=3)) is None
    [message] = warnings_from_client(caplog)
    assert "INVALID_ARGUMENT: epoch: must be >= 0, but got -1." in message


# --- (e) the bearer token --------------------------------------------------------------


def test_the_bearer_token_arrives_as_metadata(
    start_server: Callable[[Behaviour], Running],
) -> None:
    server = start_server(ok)
    with client_for(server.target, token="s3cret", fail_open=False) as client:
        assert client.report(epoch_report(epoch=3)) is not None
    with client_for(server.target, fail_open=False) as client:
        assert client.report(epoch_report(epoch=3)) is not None
    with_token, without = server.servicer.metadata
    assert with_token["authorization"] == "Bearer s3cret"
    assert "authorization" not in without


def test_a_refused_token_raises_unauthorized(start_server: Callable[[Behaviour], Running]) -> None:
    def guarded(servicer: FaultServicer, report: Any, context: Any, attempt: int) -> Any:
        if dict(context.invocation_metadata()).get("authorization") != "Bearer right":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return answer(report)

    server = start_server(guarded)
    with (
        client_for(server.target, token="wrong", fail_open=False) as client,
        pytest.raises(ControlUnauthorized, match="unknown token"),
    ):
        client.report(epoch_report(epoch=3))
    with client_for(server.target, token="right", fail_open=False) as client:
        assert client.report(epoch_report(epoch=3)) is not None


# --- defensive checks, lifecycle -------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"epoch": 4},
        {"run_id": "run-b"},
        {"lr": -0.01},
        {"lr": float("nan")},
        {"loss_weights": {"dice": -1.0}},
        {"action": control_pb2.ACTION_UNSPECIFIED},
    ],
)
def test_an_unusable_decision_is_a_failure(
    start_server: Callable[[Behaviour], Running],
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, Any],
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = start_server(lambda servicer, report, context, attempt: answer(report, **fields))
    with client_for(server.target) as client:
        assert client.report(epoch_report(epoch=3)) is None
    assert len(warnings_from_client(caplog)) == 1
    with (
        client_for(server.target, fail_open=False) as client,
        pytest.raises(ControlProtocolError),
    ):
        client.report(epoch_report(epoch=3))


def test_the_channel_is_created_on_first_use_and_reused(
    start_server: Callable[[Behaviour], Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(ok)
    created: list[str] = []
    real = grpc.insecure_channel

    def counting(target: str, **kwargs: Any) -> Any:
        created.append(target)
        return real(target, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", counting)
    with client_for(server.target) as client:
        assert created == []  # nothing exists yet that a fork() could break
        assert client.report(epoch_report(epoch=1)) is not None
        assert client.report(epoch_report(epoch=2)) is not None
    assert created == [server.target]


def test_a_closed_client_fails_like_any_other_failure(
    start_server: Callable[[Behaviour], Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = start_server(ok)
    client = client_for(server.target)
    assert client.report(epoch_report(epoch=3)) is not None
    client.close()
    client.close()  # idempotent
    assert client.report(epoch_report(epoch=3)) is None
    assert len(warnings_from_client(caplog)) == 1
    closed = client_for(server.target, fail_open=False)
    closed.close()
    with pytest.raises(ControlError, match="closed"):
        closed.report(epoch_report(epoch=3))


# --- (f) RunState.apply ----------------------------------------------------------------


def fresh_state() -> RunState:
    return RunState(run_id="run-a", initial_lr=0.01, current_lr=0.006, intervention_count=1)


def decided(action: int, **fields: Any) -> control_pb2.Decision:
    return control_pb2.Decision(run_id="run-a", epoch=9, action=action, **fields)


def test_intervene_takes_lr_weights_and_index() -> None:
    state = fresh_state()
    weights = {"dice": 0.6, "focal": 0.4}
    state.apply(
        decided(control_pb2.INTERVENE, lr=0.009, loss_weights=weights, intervention_index=2)
    )
    assert state.current_lr == pytest.approx(0.009)
    assert state.loss_weights == weights
    assert state.intervention_count == 2
    report = state.build_report(10, train_loss=0.3)
    assert report.intervention_count == 2
    assert dict(report.loss_weights) == weights
    assert not report.HasField("val_loss")


def test_intervene_without_lr_or_weights_keeps_them() -> None:
    state = fresh_state()
    state.apply(decided(control_pb2.INTERVENE, intervention_index=2))
    assert state.current_lr == pytest.approx(0.006)
    assert state.loss_weights == {"dice": 1.0, "ce": 1.0}
    assert state.intervention_count == 2


def test_override_with_index_zero_keeps_the_count() -> None:
    state = fresh_state()
    state.apply(
        decided(
            control_pb2.INTERVENE,
            lr=0.002,
            loss_weights={"dice": 1.0},
            intervention_index=0,
            source=control_pb2.OVERRIDE,
        )
    )
    assert state.current_lr == pytest.approx(0.002)
    assert state.loss_weights == {"dice": 1.0}
    assert state.intervention_count == 1


def test_rollback_restores_lr_and_weights_and_still_counts() -> None:
    state = fresh_state()
    state.apply(
        decided(
            control_pb2.INTERVENE,
            lr=0.01,
            loss_weights={"dice": 0.5, "focal": 0.5},
            intervention_index=2,
        )
    )
    state.apply(
        decided(
            control_pb2.ROLLBACK,
            lr=0.006,
            loss_weights={"dice": 1.0, "ce": 1.0},
            source=control_pb2.SAFETY,
        )
    )
    assert state.current_lr == pytest.approx(0.006)
    assert state.loss_weights == {"dice": 1.0, "ce": 1.0}
    assert state.intervention_count == 2


@pytest.mark.parametrize("action", [control_pb2.NONE, control_pb2.STOP])
def test_none_and_stop_change_nothing(action: int) -> None:
    state = fresh_state()
    state.apply(decided(action, lr=0.5, loss_weights={"dice": 1.0}, intervention_index=3))
    state.apply(None)
    assert state == fresh_state()


def test_labels_are_checked() -> None:
    with pytest.raises(ValueError, match="labels must use keys"):
        RunState(run_id="r", initial_lr=0.01, current_lr=0.01, labels={"site": "x"})
