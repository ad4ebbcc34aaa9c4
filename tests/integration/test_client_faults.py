"""ControlClient against real gRPC servers that misbehave on purpose.

The servicer of the first sections is a fault injector, not the control server:
it answers, stalls, fails with a chosen status, or checks metadata, and counts
attempts so that transparent gRPC retries are visible. The later ones run the
real control server: run attempts, setup mistakes (a wrong token or role, a TLS
mismatch, an address that is no control server), an outage made by cutting a
TCP proxy between client and server, and decisions the client refuses.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from control_server.auth import Role
from control_server.tokens import create_token
from tests.certs import Certs, make_certs
from tests.conftest import ServerThread, Stubs
from tests.factories import epoch_report
from tests.tcp_proxy import TcpProxy
from trainer_client import (
    ClientConfig,
    ControlClient,
    ControlError,
    ControlProtocolError,
    ControlRejected,
    ControlSetupError,
    ControlUnauthorized,
    ControlUnavailable,
    RunStart,
    RunState,
)
from trainer_client.api import control_pb2, control_pb2_grpc
from trainer_client.sim import main as sim_main

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


# --- (g) run attempts: StartRun, attempts on every report, FinishRun (real server) --------


def start(client: ControlClient, state: RunState, resume_from_epoch: int | None = None) -> RunStart:
    return client.start_run(
        state, trainer_name="test-trainer", trainer_version="0", resume_from_epoch=resume_from_epoch
    )


def get_run(target: str, run_id: str) -> control_pb2.GetRunResponse:
    with grpc.insecure_channel(target) as channel:
        response: control_pb2.GetRunResponse = control_pb2_grpc.ControlAdminStub(channel).GetRun(
            control_pb2.GetRunRequest(run_id=run_id), timeout=10
        )
    return response


def client_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "trainer_client.client" and record.levelno == level
    ]


def test_start_run_opens_attempts_reports_carry_them_and_finish_run_records_the_end(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trainer_client.client")
    state = RunState(run_id="att-run", initial_lr=0.01, current_lr=0.01)
    with client_for(server.target, fail_open=False) as client:
        first = start(client, state)
        assert (first.attempt, state.attempt, client.attempt) == (1, 1, 1)
        for epoch in range(3):
            decision = client.report(state.build_report(epoch, train_loss=0.5 - epoch / 100))
            assert decision is not None and decision.attempt == 1
        assert client.finish_run(
            "att-run",
            control_pb2.COMPLETED,
            metrics=control_pb2.FinalMetrics(mean_dice=0.8, dice_per_class={"1": 0.8}),
        )
        # A restart from scratch on the same run id: a clean history, said as a warning.
        again = start(client, state)
        assert again.attempt == 2 and again.history_reset and again.superseded_epochs == 3
        # A resume from the checkpoint of epoch 1 (as nnU-Net's --c).
        resumed = start(client, state, resume_from_epoch=1)
        assert resumed.attempt == 3 and not resumed.history_reset
        decision = client.report(state.build_report(2, train_loss=0.48))
        assert decision is not None and decision.attempt == 3
        assert client.finish_run("att-run", control_pb2.FAILED, error="RuntimeError: boom")

    run = get_run(server.target, "att-run")
    assert [(a.attempt, a.status) for a in run.attempts] == [
        (1, control_pb2.COMPLETED),
        (2, control_pb2.ACTIVE),
        (3, control_pb2.FAILED),
    ]
    assert run.attempts[0].metrics.mean_dice == pytest.approx(0.8)
    assert run.attempts[0].trainer_name == "test-trainer"
    assert run.attempts[2].resume_from_epoch == 1
    assert run.attempts[2].error == "RuntimeError: boom"
    # One line each: the server's message, a warning for the history reset.
    infos = client_records(caplog, logging.INFO)
    [reset] = client_records(caplog, logging.WARNING)
    assert sum("attempt 1" in m for m in infos) == 1
    assert "att-run" in reset and "attempt 2" in reset
    assert sum("[StartRun]" in m for m in infos) == 2


def test_an_older_server_without_start_run_is_attempt_zero_and_reports_go_on(
    start_server: Callable[[Behaviour], Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trainer_client.client")
    server = start_server(ok)  # knows ReportEpoch only: StartRun is UNIMPLEMENTED
    state = RunState(run_id="run-a", initial_lr=0.01, current_lr=0.01)
    with client_for(server.target, fail_open=False) as client:
        assert start(client, state).attempt == 0
        assert client.report(state.build_report(0, train_loss=0.5)) is not None
        assert not client.finish_run("run-a", control_pb2.COMPLETED)
    assert warnings_from_client(caplog) == []
    assert any("older server" in m for m in client_records(caplog, logging.INFO))


# --- (h) setup mistakes fail fast, naming the variable (real servers) ---------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def start_fails(config: ClientConfig) -> ControlSetupError:
    """StartRun with `config` raises a ControlSetupError: return it."""
    state = RunState(run_id="setup-run", initial_lr=0.01, current_lr=0.01)
    with ControlClient(config) as client, pytest.raises(ControlSetupError) as caught:
        start(client, state)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    ("token", "variable", "says"),
    [
        ("wrong", "TRAINCTL_TOKEN", "does not know the token"),
        (None, "TRAINCTL_TOKEN", "needs a token"),
        ("operator", "TRAINCTL_TOKEN", "token of role trainer"),
    ],
)
def test_a_refused_token_or_role_stops_the_start(
    make_server: Callable[..., ServerThread],
    tmp_path: Path,
    token: str | None,
    variable: str,
    says: str,
) -> None:
    path = tmp_path / "tokens.json"
    operator, _ = create_token(path, "alice", Role.OPERATOR)
    server = make_server(auth_file=path)
    sent = operator if token == "operator" else token
    # Fail-open (the default) does not cover a setup mistake.
    error = start_fails(ClientConfig(target=server.target, token=sent))
    assert error.variable == variable
    assert f"set {variable}" in str(error) and says in str(error)
    if sent is not None:
        assert sent not in str(error)


@pytest.mark.parametrize(
    ("how", "variable", "says"),
    [
        ("plaintext to TLS", "TRAINCTL_TLS_CA", "speaks TLS and this client does not"),
        ("another CA", "TRAINCTL_TLS_CA", "set TRAINCTL_TLS_CA"),
        ("TLS to plaintext", "TRAINCTL_TLS_CA", "does not speak TLS"),
        ("no client certificate", "TRAINCTL_TLS_CERT", "requires a client certificate"),
    ],
)
def test_a_tls_mismatch_stops_the_start(
    make_server: Callable[..., ServerThread], certs: Certs, how: str, variable: str, says: str
) -> None:
    if how == "TLS to plaintext":
        config = ClientConfig(target=make_server().target, tls_ca=certs.ca)
    elif how == "no client certificate":
        server = make_server(
            tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca
        )
        config = ClientConfig(target=server.target, tls_ca=certs.ca)
    else:
        server = make_server(tls_cert=certs.server_cert, tls_key=certs.server_key)
        ca = certs.other_ca if how == "another CA" else None
        config = ClientConfig(target=server.target, tls_ca=ca)
    error = start_fails(config)
    assert error.variable == variable
    assert says in str(error)


def test_an_address_that_is_not_a_control_server_stops_the_start(
    tmp_path: Path,
) -> None:
    # A gRPC server of something else (health only), and an HTTP/1 server.
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), other)
    grpc_port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        for target, says in (
            (f"127.0.0.1:{grpc_port}", "not a training-control server"),
            (f"127.0.0.1:{web.server_address[1]}", "does not speak gRPC"),
        ):
            error = start_fails(ClientConfig(target=target))
            assert error.variable == "TRAINCTL_SERVER"
            assert says in str(error) and "set TRAINCTL_SERVER" in str(error)
    finally:
        other.stop(None).wait(5)
        web.shutdown()
        web.server_close()


def test_fail_open_always_trains_on_after_a_setup_mistake(
    make_server: Callable[..., ServerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    path = tmp_path / "tokens.json"
    create_token(path, "gpu-1", Role.TRAINER)
    server = make_server(auth_file=path)
    env = {"TRAINCTL_SERVER": server.target, "TRAINCTL_TOKEN": "wrong"}
    config = ClientConfig.from_env({**env, "TRAINCTL_FAIL_OPEN": "always"})
    state = RunState(run_id="setup-run", initial_lr=0.01, current_lr=0.01)
    with ControlClient(config) as client:
        assert start(client, state).attempt == 0
        assert client.report(state.build_report(0, train_loss=0.5)) is None
    first, _ = warnings_from_client(caplog)
    assert "TRAINCTL_FAIL_OPEN=always" in first and "set TRAINCTL_TOKEN" in first
    # The same mistake without `always` stops the start.
    start_fails(ClientConfig.from_env(env))


def test_an_unreachable_server_at_start_is_an_outage_not_a_setup_mistake(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """StartRun while the server is unreachable fails open; it is sent when it is back,
    before the reports held meanwhile, which then belong to the attempt it opened."""
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    state = RunState(run_id="late-start", initial_lr=0.01, current_lr=0.01)
    with TcpProxy(server.port) as proxy, client_for(f"127.0.0.1:{proxy.port}") as client:
        proxy.cut()
        assert start(client, state).attempt == 0
        assert client.report(state.build_report(0, train_loss=0.5)) is None
        proxy.restore()
        decision = report_until_answered(client, state, 1)
        assert client.attempt == state.attempt == 1
    assert decision.attempt == 1
    run = get_run(server.target, "late-start")
    assert [a.attempt for a in run.attempts] == [1]
    epochs = [(e.report.epoch, e.report.late, e.report.attempt) for e in run.epochs]
    held = list(range(decision.epoch))
    assert epochs == [(e, True, 1) for e in held] + [(decision.epoch, False, 1)]
    lost, back = warnings_from_client(caplog)
    assert "[StartRun]" in lost and "control lost" in lost and "TRAINCTL_SERVER" in lost
    assert f"control is back: {len(held)} held reports delivered late" in back


# --- (i) an outage: reports held, delivered late when the server is back ------------------


def report_until_answered(
    client: ControlClient, state: RunState, first_epoch: int, *, timeout_s: float = 30
) -> control_pb2.Decision:
    """Report epochs from `first_epoch` on, a little apart (as epochs are), until one is
    answered: gRPC reconnects after its backoff, not at once."""
    epoch = first_epoch
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        decision = client.report(state.build_report(epoch, train_loss=0.5 - epoch / 1000))
        if decision is not None:
            return decision
        epoch += 1
        time.sleep(0.3)
    raise AssertionError("the server did not answer again")


def test_reports_during_an_outage_are_delivered_late_with_one_warning_each_way(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    state = RunState(run_id="outage-run", initial_lr=0.01, current_lr=0.01)
    with TcpProxy(server.port) as proxy, client_for(f"127.0.0.1:{proxy.port}") as client:
        assert start(client, state).attempt == 1
        for epoch in range(2):
            assert client.report(state.build_report(epoch, train_loss=0.5)) is not None
        proxy.cut()
        for epoch in range(2, 6):
            assert client.report(state.build_report(epoch, train_loss=0.5)) is None
        assert client.control_lost
        assert len(client.held_reports()) == 4
        proxy.restore()
        decision = report_until_answered(client, state, 6)
        assert not client.control_lost and client.held_reports() == []
        assert client.finish_run("outage-run", control_pb2.COMPLETED)

    run = get_run(server.target, "outage-run")
    epochs = [(e.report.epoch, e.report.late, e.decision.late) for e in run.epochs]
    # No holes: every epoch is recorded, those of the outage marked late, in order.
    assert [e for e, _, _ in epochs] == list(range(decision.epoch + 1))
    late = {e for e, is_late, _ in epochs if is_late}
    assert {2, 3, 4, 5} <= late and decision.epoch not in late
    assert all(decided_late == is_late for _, is_late, decided_late in epochs)
    assert all(e.decision.action == control_pb2.NONE for e in run.epochs if e.report.late)
    assert {e.report.attempt for e in run.epochs} == {1}
    [lost, back] = warnings_from_client(caplog)
    assert "epoch=2 control lost" in lost
    assert f"control is back: {len(late)} held reports delivered late" in back


def test_reports_held_by_an_earlier_process_go_before_its_next_attempt(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumed training hands the client the reports its checkpoint held: they are
    delivered late as the earlier attempt's before StartRun opens the next one (the
    server refuses a superseded attempt's reports)."""
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    state = RunState(run_id="restored-run", initial_lr=0.01, current_lr=0.01)
    with client_for(server.target, fail_open=False) as first:
        start(first, state)
        first.report(state.build_report(0, train_loss=0.5))
    held = state.build_report(1, train_loss=0.49)  # the crashed process could not send it
    with client_for(server.target, fail_open=False) as resumed:
        resumed.hold_reports([held.SerializeToString()])
        assert start(resumed, state, resume_from_epoch=1).attempt == 2
        resumed.report(state.build_report(2, train_loss=0.48))
    run = get_run(server.target, "restored-run")
    assert [(e.report.epoch, e.report.attempt, e.report.late) for e in run.epochs] == [
        (0, 1, False),
        (1, 1, True),
        (2, 2, False),
    ]
    [back] = warnings_from_client(caplog)
    assert "control is back: 1 held reports delivered late" in back


def test_held_reports_are_bounded_and_the_dropped_ones_counted(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    state = RunState(run_id="bounded-run", initial_lr=0.01, current_lr=0.01)
    with (
        TcpProxy(server.port) as proxy,
        client_for(f"127.0.0.1:{proxy.port}", max_held_reports=2) as client,
    ):
        start(client, state)
        proxy.cut()
        for epoch in range(5):
            client.report(state.build_report(epoch, train_loss=0.5))
        assert [control_pb2.EpochReport.FromString(b).epoch for b in client.held_reports()] == [
            3,
            4,
        ]
        proxy.restore()
        report_until_answered(client, state, 5)
    [_, back] = warnings_from_client(caplog)
    assert "2 held reports delivered late" in back
    assert "older ones were dropped (TRAINCTL_MAX_HELD_REPORTS=2)" in back


# --- (j) a decision the trainer must not act on is refused; control is not lost ------------


def test_an_lr_above_the_clients_cap_is_refused_and_the_run_keeps_its_state(
    server: ServerThread, stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    state = RunState(run_id="cap-run", initial_lr=0.01, current_lr=0.01)
    with client_for(server.target) as client:
        start(client, state)
        assert client.report(state.build_report(0, train_loss=0.5)) is not None
        # An operator raises the LR far above the cap (the server lets them, with a reason).
        stubs.admin.SetOverride(
            control_pb2.SetOverrideRequest(
                run_id="cap-run", lr=1.0, exceed_lr_cap=True, reason="typo", once=True
            ),
            timeout=10,
        )
        before = dataclasses.replace(state)
        assert client.report(state.build_report(1, train_loss=0.5)) is None
        assert state == before
        # Control is not lost: the next report is decided as usual.
        decision = client.report(state.build_report(2, train_loss=0.49))
        assert decision is not None and decision.epoch == 2
    [refused] = warnings_from_client(caplog)
    assert "decision lr must be at most the client's cap 0.1 (TRAINCTL_MAX_LR" in refused
    assert "keeps its last good state" in refused


def test_a_decision_naming_an_unknown_loss_component_is_refused(
    start_server: Callable[[Behaviour], Running], caplog: pytest.LogCaptureFixture
) -> None:
    """A fake server: the real one validates weights with the same vocabulary as the
    client, so neither a policy nor an override can make it send an unknown component."""
    caplog.set_level(logging.WARNING, logger="trainer_client.client")

    def weird(servicer: FaultServicer, report: Any, context: Any, attempt: int) -> Any:
        if report.epoch == 1:
            weights = {"dice": 1.0, "lovasz": 1.0}
            return answer(report, action=control_pb2.INTERVENE, loss_weights=weights)
        return answer(report)

    server = start_server(weird)
    state = RunState(run_id="run-a", initial_lr=0.01, current_lr=0.01)
    with client_for(server.target) as client:
        for epoch in range(3):
            decision = client.report(state.build_report(epoch, train_loss=0.5))
            assert (decision is None) == (epoch == 1)
            assert state.loss_weights == {"dice": 1.0, "ce": 1.0}
    [refused] = warnings_from_client(caplog)
    assert "decision loss_weights['lovasz']: unknown loss component" in refused


# --- (k) trainctl-sim: StartRun, FinishRun, and a setup mistake that stops it -----------


def run_sim(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    for name in ("TRAINCTL_TOKEN", "TRAINCTL_FAIL_OPEN", "TRAINCTL_RUN_ID", "TRAINCTL_SERVER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    code = sim_main(["--epochs", "4", "--deadline", "5", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_trainctl_sim_starts_and_finishes_its_runs(
    server: ServerThread,
    stubs: Stubs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ("--target", server.target, "--run-id", "sim-run")
    code, out, _ = run_sim(monkeypatch, capsys, *flags)
    assert code == 0
    assert "attempt 1: run 'sim-run' attempt 1" in out
    # The same run id again, from scratch: the server says the history begins afresh.
    stubs.admin.SetOverride(
        control_pb2.SetOverrideRequest(run_id="sim-run", action=control_pb2.STOP, reason="enough"),
        timeout=10,
    )
    code, out, _ = run_sim(monkeypatch, capsys, *flags)
    assert code == 0
    assert "attempt 2:" in out and "afresh" in out
    assert "stopped by the server after epoch 0" in out
    attempts = get_run(server.target, "sim-run").attempts
    assert [(a.attempt, a.status) for a in attempts] == [
        (1, control_pb2.COMPLETED),
        (2, control_pb2.STOPPED),
    ]
    first = attempts[0]
    assert first.trainer_name == "SimulatedTrainer"
    assert 0 < first.metrics.mean_dice <= 1 and first.metrics.dice_per_class["1"] > 0
    assert first.metrics.best_ema_epoch == 3  # the loss falls every epoch here


def test_trainctl_sim_stops_before_the_first_epoch_on_a_wrong_token(
    make_server: Callable[..., ServerThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "gpu-1", Role.TRAINER)
    server = make_server(auth_file=path)
    env = {"TRAINCTL_SERVER": server.target, "TRAINCTL_TOKEN": "wrong"}
    code, out, err = run_sim(monkeypatch, capsys, env=env)
    assert code == 1
    assert "set TRAINCTL_TOKEN" in err and "wrong" not in err
    assert "val_loss" not in out  # no epoch ran: not even the header
    code, out, _ = run_sim(monkeypatch, capsys, env={**env, "TRAINCTL_FAIL_OPEN": "always"})
    assert code == 0
    assert "finished after epoch 3" in out
