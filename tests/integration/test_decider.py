"""The decider process on its own: group commit, per-request errors, crashes, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from control_server.app import activate_startup_policy
from control_server.decider import MAX_BATCH, Answer, Decider
from control_server.domain import InvalidArgument, StoreUnavailable
from control_server.store import open_store
from tests.factories import epoch_report
from trainer_client.api import control_pb2 as pb


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/control.db"
    store = open_store(url)
    activate_startup_policy(store, None)
    store.close()
    return url


def run(main: Callable[[Decider], Awaitable[Any]], store_url: str) -> Any:
    async def go() -> Any:
        decider = await Decider.start(store_url)
        try:
            return await main(decider)
        finally:
            await decider.close()

    return asyncio.run(go())


def decision(answer: Answer) -> pb.Decision:
    return pb.Decision.FromString(answer.decision)


def stored(tmp_path: Path) -> dict[tuple[str, int], str]:
    with sqlite3.connect(tmp_path / "control.db") as db:
        rows = db.execute("SELECT run_id, epoch, decision_id FROM decisions").fetchall()
    db.close()
    return {(r, e): d for r, e, d in rows}


def test_concurrent_reports_share_transactions(store_url: str, tmp_path: Path) -> None:
    async def main(decider: Decider) -> list[pb.Decision]:
        async def one_run(i: int) -> list[pb.Decision]:
            raw = [epoch_report(f"run-{i}", e).SerializeToString() for e in range(10)]
            return [decision(await decider.submit(r)) for r in raw]

        runs = await asyncio.gather(*(one_run(i) for i in range(20)))
        assert decider.rows == 200
        assert decider.batches < 200
        return [d for r in runs for d in r]

    decided = run(main, store_url)
    assert {(d.run_id, d.epoch): d.decision_id for d in decided} == stored(tmp_path)
    assert len(stored(tmp_path)) == 200


def test_a_report_already_decided_gets_its_stored_decision(store_url: str) -> None:
    async def main(decider: Decider) -> tuple[pb.Decision, pb.Decision]:
        raw = epoch_report("run-a", 0).SerializeToString()
        first, again = await asyncio.gather(decider.submit(raw), decider.submit(raw))
        return decision(first), decision(again)

    first, again = run(main, store_url)
    assert first.decision_id == again.decision_id


def test_bad_requests_fail_alone_and_name_what_is_wrong(store_url: str, tmp_path: Path) -> None:
    async def main(decider: Decider) -> list[Any]:
        return await asyncio.gather(
            decider.submit(b"\xff\xff\xff"),
            decider.submit(epoch_report("", 0).SerializeToString()),
            decider.submit(epoch_report("run-ok", 0, current_lr=-1.0).SerializeToString()),
            decider.submit(epoch_report("run-ok", 1).SerializeToString()),
            return_exceptions=True,
        )

    garbage, no_run, bad_lr, good = run(main, store_url)
    assert isinstance(garbage, InvalidArgument) and "EpochReport" in str(garbage)
    assert isinstance(no_run, InvalidArgument) and no_run.field == "run_id"
    assert isinstance(bad_lr, InvalidArgument) and bad_lr.field == "current_lr"
    assert decision(good).run_id == "run-ok"
    assert stored(tmp_path) == {("run-ok", 1): decision(good).decision_id}


def test_a_killed_decider_fails_its_calls_and_a_new_one_takes_over(
    store_url: str, tmp_path: Path
) -> None:
    async def main(decider: Decider) -> tuple[str, str]:
        first = decision(await decider.submit(epoch_report("run-k", 0).SerializeToString()))
        pid = decider.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while decider.restarts == 0 and time.monotonic() < deadline:
            try:
                await decider.submit(epoch_report("run-k", 1).SerializeToString())
            except StoreUnavailable as exc:
                assert "decider" in str(exc)
            await asyncio.sleep(0.05)
        assert decider.restarts == 1 and decider.pid != pid
        again = decision(await decider.submit(epoch_report("run-k", 0).SerializeToString()))
        return first.decision_id, again.decision_id

    first, again = run(main, store_url)
    assert first == again  # the new process answers from the same store
    assert stored(tmp_path)[("run-k", 0)] == first


def test_close_answers_every_call_made_so_far(store_url: str, tmp_path: Path) -> None:
    async def main() -> list[pb.Decision]:
        decider = await Decider.start(store_url)
        calls = [
            asyncio.ensure_future(decider.submit(epoch_report(f"run-{i}", 0).SerializeToString()))
            for i in range(100)
        ]
        await asyncio.sleep(0)  # the calls are sent
        await decider.close()
        with pytest.raises(StoreUnavailable, match="shutting down"):
            await decider.submit(epoch_report("late", 0).SerializeToString())
        return [decision(await c) for c in calls]

    decided = asyncio.run(main())
    assert len(decided) == 100
    assert {(d.run_id, d.epoch): d.decision_id for d in decided} == stored(tmp_path)


def test_a_cancelled_caller_still_gets_its_report_stored(store_url: str, tmp_path: Path) -> None:
    async def main(decider: Decider) -> None:
        call = asyncio.ensure_future(decider.submit(epoch_report("run-c", 0).SerializeToString()))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        call.cancel()
        # The next answer comes after the cancelled one's batch is committed.
        await decider.submit(epoch_report("run-d", 0).SerializeToString())

    run(main, store_url)
    assert ("run-c", 0) in stored(tmp_path)


def test_a_store_the_decider_cannot_open_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "control.db").mkdir()  # a directory where the database file should be
    url = f"sqlite:///{tmp_path}/control.db"
    with pytest.raises(StoreUnavailable, match="decider process did not start"):
        asyncio.run(Decider.start(url))


def test_more_reports_than_one_batch_holds_are_all_answered(store_url: str, tmp_path: Path) -> None:
    async def main(decider: Decider) -> list[Answer]:
        raw = [epoch_report(f"run-{i}", 0).SerializeToString() for i in range(MAX_BATCH * 2 + 7)]
        return await asyncio.wait_for(asyncio.gather(*(decider.submit(r) for r in raw)), 60)

    answers = run(main, store_url)
    assert len(stored(tmp_path)) == len(answers) == MAX_BATCH * 2 + 7
