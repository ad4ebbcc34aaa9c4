"""TLS and client certificates, and the trainer client and trainctl-sim with a token over TLS."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_server.auth import Role
from control_server.tokens import create_token
from tests.certs import Certs, make_certs
from tests.conftest import REPO, ServerProcess, ServerThread
from tests.factories import epoch_report
from tests.integration.test_cli import cli
from trainer_client import ClientConfig, ControlClient, ControlUnauthorized, ControlUnavailable
from trainer_client.api import control_pb2 as pb
from trainer_client.client import open_channel


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(make_server: Callable[..., ServerThread], certs: Certs) -> ServerThread:
    return make_server(tls_cert=certs.server_cert, tls_key=certs.server_key)


@pytest.fixture
def mtls_server(make_server: Callable[..., ServerThread], certs: Certs) -> ServerThread:
    return make_server(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)


def strict(target: str, **fields: object) -> ClientConfig:
    """A client config that raises instead of failing open, with a short deadline."""
    return ClientConfig(target=target, fail_open=False, deadline_s=5.0, **fields)  # type: ignore[arg-type]


def health_check(config: ClientConfig) -> int:
    channel = open_channel(config)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
    finally:
        channel.close()


def test_a_client_with_the_ca_connects(tls_server: ServerThread, certs: Certs) -> None:
    config = strict(tls_server.target, tls_ca=certs.ca)
    assert config.use_tls
    with ControlClient(config) as client:
        decision = client.report(epoch_report("tls-run"))
    assert decision is not None and decision.action == pb.NONE


@pytest.mark.parametrize("how", ["plaintext", "system roots", "another CA"])
def test_a_client_without_the_ca_fails(tls_server: ServerThread, certs: Certs, how: str) -> None:
    config = {
        "plaintext": strict(tls_server.target),
        "system roots": strict(tls_server.target, tls=True),
        "another CA": strict(tls_server.target, tls_ca=certs.other_ca),
    }[how]
    with ControlClient(config) as client, pytest.raises(ControlUnavailable):
        client.report(epoch_report("tls-run"))


def test_client_certificates_are_required_and_verified(
    mtls_server: ServerThread, certs: Certs
) -> None:
    without = strict(mtls_server.target, tls_ca=certs.ca)
    with pytest.raises(grpc.RpcError) as refused:
        health_check(without)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with_cert = strict(
        mtls_server.target,
        tls_ca=certs.ca,
        tls_cert=certs.client_cert,
        tls_key=certs.client_key,
    )
    assert health_check(with_cert) == health_pb2.HealthCheckResponse.SERVING
    with ControlClient(with_cert) as client:
        assert client.report(epoch_report("mtls-run")) is not None


def test_a_client_certificate_from_another_ca_is_refused(
    mtls_server: ServerThread, certs: Certs, tmp_path: Path
) -> None:
    other = make_certs(tmp_path)
    config = strict(
        mtls_server.target,
        tls_ca=certs.ca,
        tls_cert=other.client_cert,
        tls_key=other.client_key,
    )
    with pytest.raises(grpc.RpcError) as refused:
        health_check(config)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_unreadable_tls_file_is_named(tls_server: ServerThread, tmp_path: Path) -> None:
    config = strict(tls_server.target, tls_ca=tmp_path / "missing-ca.pem")
    with ControlClient(config) as client, pytest.raises(Exception, match="TRAINCTL_TLS_CA"):
        client.report(epoch_report("tls-run"))
    # Failing open, the same error is one warning and no decision.
    with ControlClient(ClientConfig(target=tls_server.target, tls_ca=tmp_path / "x")) as client:
        assert client.report(epoch_report("tls-run")) is None


def test_the_trainer_client_with_a_token_over_tls(
    make_server: Callable[..., ServerThread], certs: Certs, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    trainer, _ = create_token(path, "gpu-node-7", Role.TRAINER)
    operator, _ = create_token(path, "alice", Role.OPERATOR)
    server = make_server(auth_file=path, tls_cert=certs.server_cert, tls_key=certs.server_key)
    env = {"TRAINCTL_SERVER": server.target, "TRAINCTL_TLS_CA": str(certs.ca)}
    config = ClientConfig.from_env({**env, "TRAINCTL_TOKEN": trainer, "TRAINCTL_FAIL_OPEN": "0"})
    with ControlClient(config) as client:
        decision = client.report(epoch_report("tok-run"))
    assert decision is not None and decision.run_id == "tok-run"
    for wrong in ({"TRAINCTL_TOKEN": operator}, {}):
        config = ClientConfig.from_env({**env, **wrong, "TRAINCTL_FAIL_OPEN": "0"})
        with ControlClient(config) as client, pytest.raises(ControlUnauthorized):
            client.report(epoch_report("tok-run", epoch=1))


def sim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer_client.sim", "--epochs", "3", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )


def test_trainctl_sim_with_a_token_over_mutual_tls(
    make_server: Callable[..., ServerThread], certs: Certs, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    trainer, _ = create_token(path, "sim-node", Role.TRAINER)
    server = make_server(
        auth_file=path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )
    flags = [
        "--target",
        server.target,
        "--tls-ca",
        str(certs.ca),
        "--tls-cert",
        str(certs.client_cert),
        "--tls-key",
        str(certs.client_key),
        "--no-fail-open",
    ]
    ok = sim(*flags, env={"TRAINCTL_TOKEN": trainer})
    assert ok.returncode == 0, ok.stderr
    assert "tls=True token=set" in ok.stdout
    assert "finished after epoch 2" in ok.stdout
    assert trainer not in ok.stdout + ok.stderr
    refused = sim(*flags, env={"TRAINCTL_TOKEN": "wrong"})
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
    # The same settings from the environment alone.
    from_env = sim(
        "--no-fail-open",
        env={
            "TRAINCTL_SERVER": server.target,
            "TRAINCTL_TOKEN": trainer,
            "TRAINCTL_TLS_CA": str(certs.ca),
            "TRAINCTL_TLS_CERT": str(certs.client_cert),
            "TRAINCTL_TLS_KEY": str(certs.client_key),
        },
    )
    assert from_env.returncode == 0, from_env.stderr


def test_serve_with_tls_flags(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "tokens.json"
    operator, _ = create_token(path, "alice", Role.OPERATOR)
    server = ServerProcess(
        "--store",
        f"sqlite:///{tmp_path}/control.db",
        "--auth-file",
        str(path),
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca),
        cwd=tmp_path,
    )
    try:
        config = strict(
            server.target, tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key
        )
        channel = open_channel(config)
        try:
            list_runs = channel.unary_unary("/trainingcontrol.v1.ControlAdmin/ListRuns")
            list_runs(b"", metadata=(("authorization", f"Bearer {operator}"),), timeout=10)
        finally:
            channel.close()
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert "tls mutual" in output


def _outside_dates(expired: bool) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    if expired:
        return now - dt.timedelta(days=30), now - dt.timedelta(days=2)
    return now + dt.timedelta(days=2), now + dt.timedelta(days=30)


@pytest.mark.parametrize(
    ("expired", "says"),
    [(True, "expired on"), (False, "not valid before")],
    ids=["expired", "early"],
)
def test_serve_refuses_a_certificate_outside_its_dates(
    tmp_path: Path, expired: bool, says: str
) -> None:
    valid = _outside_dates(expired)
    certs = make_certs(tmp_path, server_valid=valid)
    result = cli(
        "serve",
        "--store",
        f"sqlite:///{tmp_path}/control.db",
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"control-server serve: the TLS certificate {certs.server_cert} {says}")
    start, end = (f"{when:%Y-%m-%d %H:%M} UTC" for when in valid)
    assert f"(valid from {start} to {end})" in line
    assert "--allow-invalid-cert-dates" in line
    assert not (tmp_path / "control.db").exists()


def test_serve_serves_an_expired_certificate_when_told_and_warns(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, server_valid=_outside_dates(expired=True))
    server = ServerProcess(
        "--store",
        f"sqlite:///{tmp_path}/control.db",
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--allow-invalid-cert-dates",
        cwd=tmp_path,
    )
    try:
        # Served as told; and, as the refusal warned, clients refuse it.
        with pytest.raises(grpc.RpcError) as refused:
            health_check(strict(server.target, tls_ca=certs.ca))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        code, output = server.terminate()
    assert code == 0, output
    warning = next(line for line in output.splitlines() if "WARNING" in line)
    assert f"the TLS certificate {certs.server_cert} expired on" in warning
    assert "serving it anyway (--allow-invalid-cert-dates)" in warning


def test_serve_refuses_half_a_tls_pair(tmp_path: Path, certs: Certs) -> None:
    result = cli("serve", "--tls-cert", str(certs.server_cert), cwd=tmp_path)
    assert result.returncode == 2
    assert "tls_cert and tls_key must be given together" in result.stderr
