"""WatchDecisions at scale: one store reader per server, caps per server and per token,
and a watch whose client stops reading (real servers on port 0, real SQLite stores)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_server.auth import Role
from control_server.domain import DecisionFilter
from control_server.store import Store, open_store
from control_server.tokens import create_token
from control_server.watch import Watches
from tests.conftest import ServerThread
from tests.factories import epoch_report, make_record
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

STREAM_DEADLINE = 30.0


def open_watch(admin: pb_grpc.ControlAdminStub, metadata: Any = None, **request: Any) -> grpc.Call:
    """A WatchDecisions stream, once it is live (the server sends headers then)."""
    call = admin.WatchDecisions(
        pb.WatchDecisionsRequest(**request), metadata=metadata, timeout=STREAM_DEADLINE
    )
    call.initial_metadata()
    return call


def refused(admin: pb_grpc.ControlAdminStub, metadata: Any = None) -> grpc.RpcError:
    call = admin.WatchDecisions(
        pb.WatchDecisionsRequest(), metadata=metadata, timeout=STREAM_DEADLINE
    )
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    return error.value


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def test_the_server_caps_its_streams_and_a_cancelled_one_frees_its_slot(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(max_watch_streams=3)
    with grpc.insecure_channel(server.target) as channel:
        admin = pb_grpc.ControlAdminStub(channel)
        calls = [open_watch(admin) for _ in range(3)]
        try:
            error = refused(admin)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 WatchDecisions streams open" in (error.details() or "")
            assert "--max-watch-streams 3" in (error.details() or "")

            calls.pop(0).cancel()
            deadline = time.monotonic() + 10
            while server.running.watches.count > 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            calls.append(open_watch(admin))  # the freed slot

            # Every open stream gets a decision made now.
            decision = pb_grpc.TrainingControlStub(channel).ReportEpoch(epoch_report("run-c"))
            assert [next(call) for call in calls] == [decision] * 3
        finally:
            for call in calls:
                call.cancel()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_a_token_is_capped_apart_from_the_others(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    operator_token, _ = create_token(path, "operator-1", Role.OPERATOR)
    admin_token, _ = create_token(path, "admin-1", Role.ADMIN)
    server = make_server(auth_file=path, max_watch_streams_per_token=2)
    operator = bearer(operator_token)
    with grpc.insecure_channel(server.target) as channel:
        admin = pb_grpc.ControlAdminStub(channel)
        calls = [open_watch(admin, operator) for _ in range(2)]
        try:
            error = refused(admin, operator)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error.details() or ""
            assert "token 'operator-1' already has 2 WatchDecisions streams open" in details
            assert "--max-watch-streams-per-token 2" in details
            calls.append(open_watch(admin, bearer(admin_token)))
        finally:
            for call in calls:
                call.cancel()


def test_decisions_of_another_replica_reach_every_open_stream(
    server: ServerThread, channel: grpc.Channel, make_server: Callable[..., ServerThread]
) -> None:
    other = make_server()  # the same SQLite file
    admin = pb_grpc.ControlAdminStub(channel)
    calls = [open_watch(admin) for _ in range(3)] + [open_watch(admin, run_id="run-far")]
    try:
        with grpc.insecure_channel(other.target) as elsewhere:
            control = pb_grpc.TrainingControlStub(elsewhere)
            made = [control.ReportEpoch(epoch_report("run-far", epoch)) for epoch in range(3)]
        for call in calls:
            assert [next(call) for _ in made] == made
    finally:
        for call in calls:
            call.cancel()


def test_idle_streams_do_not_read_the_store_per_stream(
    server: ServerThread, channel: grpc.Channel
) -> None:
    """Reports wake one reader per server, not one per open stream."""
    store = server.running.watches.store
    reads = 0
    decisions_after = store.decisions_after

    def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return decisions_after(*args)

    store.decisions_after = counted  # type: ignore[method-assign]
    admin = pb_grpc.ControlAdminStub(channel)
    idle = [open_watch(admin, run_id=f"run-idle-{i}") for i in range(60)]
    watched = open_watch(admin, run_id="run-busy")
    try:
        control = pb_grpc.TrainingControlStub(channel)
        before = reads
        made = [control.ReportEpoch(epoch_report("run-busy", epoch)) for epoch in range(10)]
        assert [next(watched) for _ in made] == made
        # Per stream it would be 61 per report; one reader reads at most once per
        # report, plus its polls every 0.5 s.
        assert reads - before <= 10 + 20
    finally:
        for call in [*idle, watched]:
            call.cancel()


# --- a watch whose client stops reading -----------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path}/control.db")
    yield opened
    opened.close()


def test_a_watch_that_falls_behind_reads_on_by_itself_and_loses_nothing(store: Store) -> None:
    async def scenario() -> tuple[list[tuple[str, int]], int]:
        watches = Watches(store, poll_s=0.05, max_buffered=5)
        slow = watches.open(DecisionFilter(), "slow")
        await slow.open()
        made = []
        for batch in range(4):  # 4 reads of 8: past 5 buffered, it reads by itself
            records = [make_record("run-s", 8 * batch + i) for i in range(8)]
            await asyncio.to_thread(store.record_decisions, records)
            made += [(r.decision.run_id, r.decision.epoch) for r in records]
            watches.notify()
            await asyncio.sleep(0.2)
        buffered = len(slow.buffer)
        seen = []
        async with asyncio.timeout(10):
            async for decision in slow:
                seen.append((decision.run_id, decision.epoch))
                if len(seen) == len(made):
                    break
        assert seen == made
        # A decision after the catch-up still arrives.
        await asyncio.to_thread(store.record_decisions, [make_record("run-s", 99)])
        watches.notify()
        async with asyncio.timeout(10):
            late = await anext(slow)
        slow.close()
        watches.close()
        return [(late.run_id, late.epoch)], buffered

    late, buffered = asyncio.run(scenario())
    assert late == [("run-s", 99)]
    assert buffered <= 5 + 8  # it stopped taking decisions from the shared reader
