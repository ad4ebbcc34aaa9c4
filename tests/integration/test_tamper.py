"""The record is tamper-evident: `control-server replay` reports every edited or
deleted row, each tampering done for real with sqlite3/psycopg on a store a real
server wrote, and stays quiet on a store nobody touched (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from tests.conftest import ServerProcess
from tests.factories import epoch_report
from tests.integration.test_cli import EAGER_POLICY, cli, flat_run
from trainer_client.api import control_pb2_grpc as pb_grpc

Tamper = Callable[[sqlite3.Connection], None]


@pytest.fixture
def recorded(tmp_path: Path) -> str:
    """A SQLite store a real server wrote: two runs, one with interventions."""
    policy = tmp_path / "eager.yaml"
    policy.write_text(EAGER_POLICY)
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess("--store", store, "--policy", str(policy), cwd=tmp_path)
    try:
        flat_run(server.target, "run-x", 12)
        flat_run(server.target, "run-y", 6)
    finally:
        server.terminate()
    return store


def replay(store: str, cwd: Path) -> tuple[int, list[str], str]:
    result = cli("replay", "--store", store, cwd=cwd)
    lines = result.stdout.splitlines()
    return result.returncode, [x for x in lines if x.startswith("tampered: ")], result.stdout


def test_an_untouched_record_verifies(recorded: str, tmp_path: Path) -> None:
    code, tampered, out = replay(recorded, tmp_path)
    assert (code, tampered) == (0, []), out
    assert "0 signs of edited or deleted rows" in out
    assert "the run registry's head is " in out and "(empty)" not in out


def _state_edit(db: sqlite3.Connection) -> None:
    (state,) = db.execute("SELECT state FROM decisions WHERE run_id='run-x' AND epoch=4").fetchone()
    edited = json.loads(state)
    edited["num_bad_epochs"] = 0
    db.execute(
        "UPDATE decisions SET state = ? WHERE run_id='run-x' AND epoch=4", (json.dumps(edited),)
    )


def _policy_edit(db: sqlite3.Connection) -> None:
    for version, text in db.execute("SELECT version, document FROM policies").fetchall():
        document = json.loads(text)
        if document.get("name") == "eager":
            document["plateau"]["patience"] = 9
            db.execute(
                "UPDATE policies SET document = ? WHERE version = ?",
                (json.dumps(document), version),
            )


TAMPERINGS: dict[str, tuple[Tamper, str]] = {
    "a report's loss edited": (
        lambda db: db.execute("UPDATE reports SET val_loss = 0.1 WHERE run_id='run-x' AND epoch=3"),
        "run run-x epoch 3: report, decision or policy state edited",
    ),
    "a decision's reason edited": (
        lambda db: db.execute(
            "UPDATE decisions SET reason = 'all fine' WHERE run_id='run-y' AND epoch=2"
        ),
        "run run-y epoch 2: report, decision or policy state edited",
    ),
    "the stored policy state edited": (
        _state_edit,
        "run run-x epoch 4: report, decision or policy state edited",
    ),
    "a middle epoch deleted": (
        lambda db: (
            db.execute("DELETE FROM decisions WHERE run_id='run-x' AND epoch=5"),
            db.execute("DELETE FROM reports WHERE run_id='run-x' AND epoch=5"),
        ),
        "run run-x epoch 6: the epoch 5 it continued from is missing (deleted)",
    ),
    "the newest epochs deleted": (
        lambda db: (
            db.execute("DELETE FROM decisions WHERE run_id='run-x' AND epoch >= 10"),
            db.execute("DELETE FROM reports WHERE run_id='run-x' AND epoch >= 10"),
        ),
        "run run-x: its summary counts 12 epochs up to 11, its history holds 10 up to 9",
    ),
    "a whole run deleted": (
        lambda db: [
            db.execute(f"DELETE FROM {table} WHERE run_id='run-y'")
            for table in ("shadow_decisions", "decisions", "reports", "runs")
        ],
        "run run-y: registered but not in the store (deleted)",
    ),
    "a run's registry entry deleted": (
        lambda db: db.execute("DELETE FROM run_registry WHERE run_id='run-x'"),
        "run run-x: not in the run registry",
    ),
    "a policy document edited under its version": (
        lambda db: _policy_edit(db),
        "its stored document was edited (it now hashes to",
    ),
}


@pytest.mark.parametrize("what", list(TAMPERINGS))
def test_replay_reports_each_tampering(recorded: str, tmp_path: Path, what: str) -> None:
    tamper, finding = TAMPERINGS[what]
    with sqlite3.connect(tmp_path / "control.db") as db:
        tamper(db)
    db.close()
    code, tampered, out = replay(recorded, tmp_path)
    assert code == 1, out
    assert any(finding in line for line in tampered), out


def test_the_chains_verify_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """Floats, times and NULLs come back from PostgreSQL as they were hashed."""
    server = ServerProcess("--store", pg_url, cwd=tmp_path)
    try:
        flat_run(server.target, "run-pg", 8)
    finally:
        server.terminate()
    code, tampered, out = replay(pg_url, tmp_path)
    assert (code, tampered) == (0, []), out
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE reports SET train_loss = 0.1 WHERE run_id='run-pg' AND epoch=2")
    code, tampered, out = replay(pg_url, tmp_path)
    assert code == 1 and any("run run-pg epoch 2" in line for line in tampered), out


def test_a_server_decides_nothing_with_an_edited_policy(recorded: str, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "control.db") as db:
        _policy_edit(db)
    db.close()
    server = ServerProcess("--store", recorded, cwd=tmp_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TrainingControlStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ReportEpoch(epoch_report("run-x", 12, val_loss=0.5, current_lr=0.001))
    finally:
        _, log = server.terminate()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "hashes to" in log and "the store was edited" in log
