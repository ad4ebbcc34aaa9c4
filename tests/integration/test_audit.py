"""The audit under a flood of refused calls, and its retention (real servers on port 0,
real token files, real SQLite and PostgreSQL stores)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_server.audit import OTHERS, RETENTION_BATCH, AuditInterceptor
from control_server.auth import AuthInterceptor, Role
from control_server.store import open_store
from control_server.tokens import TokenTable, create_token
from tests.conftest import ServerThread
from tests.integration.test_cli import cli
from trainer_client.api import control_pb2 as pb

ADMIN_SERVICE = "trainingcontrol.v1.ControlAdmin"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refuse(channel: grpc.Channel, method: str, metadata: Any, times: int) -> None:
    """Call `method` `times` times; every call must be refused."""
    call = channel.unary_unary(f"/{ADMIN_SERVICE}/{method}")
    request = pb.GetRunRequest(run_id="run-x").SerializeToString()
    for _ in range(times):
        with pytest.raises(grpc.RpcError) as error:
            call(request, metadata=metadata, timeout=10)
        assert error.value.code() in {
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        }


def call_events(server: ServerThread) -> list[dict[str, Any]]:
    """Admin events of calls (the server's own activation at start left out)."""
    return [e for e in server.running.store.admin_events() if e["actor"] != "control-server"]


def counted_events(server: ServerThread, refusals: int) -> list[dict[str, Any]]:
    """The events of calls once `refusals` refused calls are written (a refusal reaches
    its client a moment before the server counts it)."""
    deadline = time.monotonic() + 10
    while True:
        server.call(server.running.audit.flush())
        events = call_events(server)
        if sum(e["details"]["count"] for e in events) >= refusals:
            return events
        assert time.monotonic() < deadline, events
        time.sleep(0.05)


def test_a_burst_of_refused_calls_becomes_a_few_counted_events(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    trainer, _ = create_token(path, "trainer-1", Role.TRAINER)
    server = make_server(auth_file=path)
    # Three connections (three client ports) from one address: one peer.
    for _ in range(3):
        with grpc.insecure_channel(server.target) as channel:
            refuse(channel, "GetRun", None, 100)
    with grpc.insecure_channel(server.target) as channel:
        refuse(channel, "GetRun", bearer(trainer), 80)
        refuse(channel, "GetRun", bearer("a-guess"), 40)
    # Counted, not written one by one: nothing yet, or one interval's worth.
    assert len(call_events(server)) <= 3

    events = counted_events(server, 420)
    # One event per group (two if the server's own 10 s count fell inside the burst).
    assert len(events) <= 6
    counts: dict[tuple[str, ...], int] = {}
    for e in events:
        key = (e["actor"], e["action"], e["target"], e["result"], e["details"]["message"])
        counts[key] = counts.get(key, 0) + e["details"]["count"]
    missing = "missing credentials: send metadata 'authorization: Bearer <token>'"
    role = "GetRun needs a token with role admin or operator"
    assert counts == {
        ("unauthenticated", "GetRun", "run-x", "UNAUTHENTICATED", missing): 300,
        ("trainer-1", "GetRun", "run-x", "PERMISSION_DENIED", role): 80,
        ("unauthenticated", "GetRun", "run-x", "UNAUTHENTICATED", "invalid or revoked token"): 40,
    }
    for details in (e["details"] for e in events):
        assert details["peer"] == "ipv4:127.0.0.1"
        assert details["first_at"] <= details["last_at"]
        assert details["request"] == {"run_id": "run-x"}
    assert "a-guess" not in json.dumps(events, default=str)

    # Counting starts afresh: five more refusals are a new event (two, when a count
    # is written between the fourth refusal and the fifth).
    with grpc.insecure_channel(server.target) as channel:
        refuse(channel, "GetRun", None, 5)
    later = counted_events(server, 425)[len(events) :]
    assert 1 <= len(later) <= 2
    assert sum(e["details"]["count"] for e in later) == 5


def test_refusals_beyond_the_group_cap_are_counted_as_others(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "admin-1", Role.ADMIN)
    store = open_store(f"sqlite:///{tmp_path}/control.db")

    async def scenario() -> None:
        audit = AuditInterceptor(store, max_refusal_groups=2)
        server = grpc.aio.server(interceptors=[audit, AuthInterceptor(TokenTable(path))])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for method, times in (("ListRuns", 3), ("GetRun", 4), ("GetPolicy", 5)):
                    call = channel.unary_unary(f"/{ADMIN_SERVICE}/{method}")
                    for _ in range(times):
                        with pytest.raises(grpc.RpcError):
                            await call(b"", timeout=10)
                for _ in range(6):
                    with pytest.raises(grpc.RpcError):
                        await channel.unary_unary(f"/{ADMIN_SERVICE}/ListPolicies")(
                            b"", metadata=bearer("wrong"), timeout=10
                        )
        finally:
            await server.stop(None)
            await audit.close()  # writes what was counted

    try:
        asyncio.run(scenario())
        events = store.admin_events()
    finally:
        store.close()
    summary = [(e["actor"], e["action"], e["result"], e["details"]["count"]) for e in events]
    assert summary == [
        ("unauthenticated", "ListRuns", "UNAUTHENTICATED", 3),
        ("unauthenticated", "GetRun", "UNAUTHENTICATED", 4),
        (OTHERS, OTHERS, "UNAUTHENTICATED", 11),
    ]
    assert events[2]["details"]["beyond_groups"] == 2


# --- retention ----------------------------------------------------------------------------


def _insert_events(url: str, at: datetime, count: int, action: str) -> None:
    """`count` admin events recorded at `at`, written straight into the database."""
    rows = [(at, "someone", action, f"run-{i}", "{}", "OK") for i in range(count)]
    sql = "INSERT INTO admin_events (at, actor, action, target, details, result) VALUES "
    if url.startswith("sqlite"):
        stamp = at.isoformat(timespec="microseconds")
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.executemany(sql + "(?, ?, ?, ?, ?, ?)", [(stamp, *r[1:]) for r in rows])
            conn.commit()
    else:
        import psycopg

        with psycopg.connect(url) as conn, conn.cursor() as cursor:
            cursor.executemany(sql + "(%s, %s, %s, %s, %s, %s)", rows)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/control.db"
        open_store(url).close()  # migrated
        return url
    return str(request.getfixturevalue("pg_url"))


def test_retention_deletes_old_events_at_start_and_keeps_the_rest(
    make_server: Callable[..., ServerThread], store_url: str
) -> None:
    now = datetime.now(UTC)
    old = 2 * RETENTION_BATCH + 17  # several batches
    _insert_events(store_url, now - timedelta(days=45), old, "Old")
    _insert_events(store_url, now - timedelta(days=29), 3, "Recent")
    server = make_server(store_url=store_url, audit_retention_days=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        actions = [e["action"] for e in server.running.store.admin_events()]
        if "Old" not in actions:
            break
        time.sleep(0.1)
    assert actions.count("Old") == 0
    assert actions.count("Recent") == 3
    assert "PolicyActivated" in actions  # the server's own, just now


def test_the_store_deletes_a_batch_at_a_time(store_url: str) -> None:
    now = datetime.now(UTC)
    _insert_events(store_url, now - timedelta(days=3), 5, "Old")
    _insert_events(store_url, now - timedelta(days=1), 2, "Recent")
    store = open_store(store_url)
    try:
        before = now - timedelta(days=2)
        assert store.delete_admin_events(before, 3) == 3
        assert store.delete_admin_events(before, 3) == 2
        assert store.delete_admin_events(before, 3) == 0
        assert [e["action"] for e in store.admin_events()] == ["Recent", "Recent"]
    finally:
        store.close()


def test_serve_refuses_a_negative_retention_and_a_zero_watch_cap(tmp_path: Path) -> None:
    retention = cli(
        "serve", "--listen", "127.0.0.1:0", "--audit-retention-days", "-1", cwd=tmp_path
    )
    assert retention.returncode == 2
    assert "--audit-retention-days" in retention.stderr and "-1" in retention.stderr
    watches = cli("serve", "--listen", "127.0.0.1:0", "--max-watch-streams", "0", cwd=tmp_path)
    assert watches.returncode == 2
    assert "--max-watch-streams" in watches.stderr
    assert not (tmp_path / "control.db").exists()
