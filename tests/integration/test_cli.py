"""`control-server serve` and `control-server replay` as users run them: real subprocesses."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO, ServerProcess
from tests.factories import epoch_report
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

EAGER_POLICY = """
name: eager
plateau: {patience: 1, cooldown: 0, warmup_epochs: 2}
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_server.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def flat_run(target: str, run_id: str, epochs: int) -> list[pb.Decision]:
    """A run whose loss never improves after epoch 0, applying what it is told."""
    decisions = []
    lr, count = 0.001, 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        for epoch in range(epochs):
            d = stub.ReportEpoch(
                epoch_report(run_id, epoch, val_loss=0.5, current_lr=lr, intervention_count=count)
            )
            if d.action == pb.INTERVENE:
                lr, count = d.lr, d.intervention_index
            decisions.append(d)
    return decisions


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "eager.yaml"
    path.write_text(EAGER_POLICY)
    return path


def test_serve_drains_on_sigterm_and_a_restart_loses_nothing(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess("--store", store, cwd=tmp_path)
    try:
        first = flat_run(server.target, "run-s", 3)
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert "stopped" in output
    again = ServerProcess("--store", store, cwd=tmp_path)
    try:
        retried = flat_run(again.target, "run-s", 3)
    finally:
        again.terminate()
    assert [d.decision_id for d in retried] == [d.decision_id for d in first]


def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    result = cli("serve", "--listen", "0.0.0.0:0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--insecure" in result.stderr


def test_serve_refuses_an_invalid_policy_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("plateau: {patience: -3}\n")
    result = cli(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        f"sqlite:///{tmp_path}/c.db",
        "--policy",
        str(bad),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "plateau.patience" in result.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name: " + "[" * 20_000 + "]" * 20_000 + "\n", "levels deep"),
        ("name: a\nplateau: &p {patience: 2}\nx: *p\n", "YAML aliases (*name) are not supported"),
    ],
    ids=["nested", "alias"],
)
def test_serve_refuses_a_policy_file_put_policy_would_refuse(
    tmp_path: Path, text: str, says: str
) -> None:
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(text)
    began = time.monotonic()
    result = cli(
        "serve", "--store", f"sqlite:///{tmp_path}/c.db", "--policy", str(hostile), cwd=tmp_path
    )
    assert time.monotonic() - began < 30  # the nested one cost 25 s of CPU, then a traceback
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("control-server serve: policy: ") and says in line
    assert str(hostile) in line
    assert not (tmp_path / "c.db").exists()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
def test_serve_on_a_port_in_use_names_the_port_and_the_flag(
    tmp_path: Path, busy_port: int, flag: str
) -> None:
    address = f"127.0.0.1:{busy_port}"
    listen = ["--listen", address] if flag == "--listen" else ["--metrics-listen", address]
    result = cli("serve", "--store", f"sqlite:///{tmp_path}/c.db", *listen, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"control-server serve: {flag} {address}: port {busy_port} is already in use; "
        f"pass another {flag} HOST:PORT (port 0 picks a free one)"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["serve", "--log-level", "DEBUG"],
            "--log-level is an option of `control-server`: give it before `serve`",
        ),
        (
            ["--listen", "127.0.0.1:0", "serve"],
            "--listen is an option of `control-server serve`: give it after the command",
        ),
        (
            ["--auth-file", "t.json", "token", "list"],
            "--auth-file is an option of `control-server token list`: give it after the command",
        ),
    ],
)
def test_a_flag_on_the_wrong_side_of_the_command_says_where_it_belongs(
    tmp_path: Path, args: list[str], says: str
) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"control-server: {says}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
def test_serve_refuses_an_address_without_a_port(tmp_path: Path, flag: str) -> None:
    result = cli("serve", "--store", f"sqlite:///{tmp_path}/c.db", flag, "127.0.0.1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"control-server serve: {flag} must be HOST:PORT, but got '127.0.0.1' (no port)"
    )
    assert not (tmp_path / "c.db").exists()


def test_serve_warns_when_metrics_are_served_beyond_loopback(tmp_path: Path) -> None:
    server = ServerProcess(
        "--store", f"sqlite:///{tmp_path}/c.db", "--metrics-listen", "0.0.0.0:0", cwd=tmp_path
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            pb_grpc.ControlAdminStub(channel).ListPolicies(pb.ListPoliciesRequest(), timeout=10)
    finally:
        code, output = server.terminate()
    assert code == 0, output
    (warning,) = [line for line in output.splitlines() if "WARNING" in line]
    assert "serving metrics on 0.0.0.0:0 beyond loopback" in warning


def test_replay_reproduces_the_record_and_catches_a_tampered_decision(
    tmp_path: Path, policy_file: Path
) -> None:
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess("--store", store, "--policy", str(policy_file), cwd=tmp_path)
    try:
        decisions = flat_run(server.target, "run-x", 12)
        flat_run(server.target, "run-y", 6)
    finally:
        server.terminate()
    assert any(d.action == pb.INTERVENE for d in decisions)

    ok = cli("replay", "--store", store, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 runs, 18 decisions, 0 differ" in ok.stdout

    intervened = next(d for d in decisions if d.action == pb.INTERVENE)
    with sqlite3.connect(tmp_path / "control.db") as db:
        db.execute("UPDATE decisions SET lr = 0.5 WHERE decision_id = ?", (intervened.decision_id,))
    db.close()
    bad = cli("replay", "--store", store, "--run", "run-x", cwd=tmp_path)
    assert bad.returncode == 1
    assert f"run run-x epoch {intervened.epoch}" in bad.stdout
    assert "1 differ" in bad.stdout


def test_replay_of_a_store_that_is_not_there_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "control.db"
    result = cli("replay", "--store", f"sqlite:///{missing}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"control-server replay: sqlite store {missing}: no such file" in result.stderr
    assert not missing.parent.exists()


def test_replay_with_another_policy_is_a_what_if(tmp_path: Path, policy_file: Path) -> None:
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess("--store", store, "--policy", str(policy_file), cwd=tmp_path)
    try:
        flat_run(server.target, "run-w", 10)
    finally:
        server.terminate()
    patient = tmp_path / "patient.yaml"
    patient.write_text("name: patient\nplateau: {patience: 50}\n")
    result = cli("replay", "--store", store, "--policy", str(patient), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "what-if policy patient@" in result.stdout
    assert "run run-w epoch" in result.stdout
    assert "would differ" in result.stdout


def test_sigterm_under_load_keeps_every_answered_decision(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess("--store", store, cwd=tmp_path)
    answered: list[str] = []
    started = threading.Event()

    def one_run(i: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TrainingControlStub(channel)
            for epoch in range(10_000):
                try:
                    answered.append(stub.ReportEpoch(epoch_report(f"load-{i}", epoch)).decision_id)
                except grpc.RpcError:
                    return
                started.set()

    threads = [threading.Thread(target=one_run, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        assert started.wait(30)
        time.sleep(0.3)
    finally:
        code, output = server.terminate()
        for t in threads:
            t.join(30)
    assert code == 0, output
    assert len(answered) > 8
    with sqlite3.connect(tmp_path / "control.db") as db:
        stored = {row[0] for row in db.execute("SELECT decision_id FROM decisions")}
    db.close()
    assert set(answered) <= stored
