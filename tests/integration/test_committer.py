"""Group commit against a real SQLite file."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from control_server.domain import Decision, DecisionRecord, StoreUnavailable
from control_server.store import GroupCommitter, SqliteStore
from tests.integration.test_store_contract import make_record


class FlakyStore(SqliteStore):
    """A real store whose writes can be made to fail or to wait at a gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []

    def record_decisions(self, records: Sequence[DecisionRecord]) -> list[Decision]:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.batch_sizes.append(len(records))
        if self.fail:
            raise StoreUnavailable("disk on fire")
        return super().record_decisions(records)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlakyStore]:
    opened = FlakyStore(tmp_path / "control.db")
    yield opened
    opened.close()


def _started(store: SqliteStore, max_batch: int = 512, max_wait: float = 0.002) -> GroupCommitter:
    committer = GroupCommitter(store.record_decisions, max_batch=max_batch, max_wait=max_wait)
    committer.start()
    return committer


def test_concurrent_submits_share_transactions(store: FlakyStore) -> None:
    records = [make_record(f"run-{i % 20}", i // 20) for i in range(400)]

    async def main() -> list[Decision]:
        committer = _started(store)
        try:
            return await asyncio.gather(*(committer.submit(r) for r in records))
        finally:
            await committer.close()
            assert committer.rows == 400
            assert committer.batches == len(store.batch_sizes)
            assert committer.batches < 400 // 4

    assert asyncio.run(main()) == [r.decision for r in records]
    assert sum(store.batch_sizes) == 400
    assert max(store.batch_sizes) <= 512
    assert sorted(store.run_ids()) == sorted(f"run-{i}" for i in range(20))
    run = store.get_run("run-7")
    assert run is not None and run[0].report_count == 20


def test_batches_are_capped(store: FlakyStore) -> None:
    records = [make_record("run-a", e) for e in range(50)]

    async def main() -> None:
        committer = _started(store, max_batch=8)
        store.gate.clear()
        first = asyncio.ensure_future(committer.submit(make_record("run-b", 0)))
        await asyncio.to_thread(store.entered.wait, 10)
        rest = [asyncio.ensure_future(committer.submit(r)) for r in records]
        await asyncio.sleep(0)
        store.gate.set()
        await asyncio.gather(first, *rest)
        await committer.close()

    asyncio.run(main())
    assert store.batch_sizes[0] == 1
    assert max(store.batch_sizes) == 8
    assert sum(store.batch_sizes) == 51


def test_duplicates_in_flight_resolve_to_one_decision(store: FlakyStore) -> None:
    duplicates = [make_record("run-a", 5, reason=f"attempt {i}") for i in range(10)]

    async def main() -> list[Decision]:
        committer = _started(store)
        try:
            return await asyncio.gather(*(committer.submit(r) for r in duplicates))
        finally:
            await committer.close()

    results = asyncio.run(main())
    assert len({d.decision_id for d in results}) == 1
    assert results[0] in [r.decision for r in duplicates]
    run = store.get_run("run-a")
    assert run is not None
    assert [d for _, d in run[1]] == [results[0]]


def test_close_drains_everything_submitted(store: FlakyStore) -> None:
    records = [make_record("run-a", e) for e in range(100)]

    async def main() -> list[asyncio.Task[Decision]]:
        committer = _started(store)
        store.gate.clear()  # hold the writer so that the queue is full at close()
        tasks = [asyncio.ensure_future(committer.submit(r)) for r in records]
        await asyncio.sleep(0)
        threading.Timer(0.05, store.gate.set).start()
        await committer.close()
        assert all(t.done() for t in tasks)
        with pytest.raises(StoreUnavailable, match="closed"):
            await committer.submit(make_record("run-a", 999))
        return tasks

    tasks = asyncio.run(main())
    assert [t.result() for t in tasks] == [r.decision for r in records]
    run = store.get_run("run-a")
    assert run is not None and run[0].report_count == 100


def test_a_store_error_reaches_every_waiter_and_the_committer_recovers(store: FlakyStore) -> None:
    async def main() -> None:
        committer = _started(store)
        store.fail = True
        store.gate.clear()
        first = asyncio.ensure_future(committer.submit(make_record("run-x", 0)))
        await asyncio.to_thread(store.entered.wait, 10)
        # These queue up behind the blocked batch and fail together.
        batch = [
            asyncio.ensure_future(committer.submit(make_record("run-a", e))) for e in range(20)
        ]
        await asyncio.sleep(0)
        store.gate.set()
        results = await asyncio.gather(first, *batch, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert "disk on fire" in str(results[0])
        assert committer.failed_batches == len(store.batch_sizes) < 21
        assert committer.rows == 0

        store.fail = False
        again = make_record("run-a", 0)
        assert await committer.submit(again) == again.decision
        assert committer.rows == 1
        await committer.close()

    asyncio.run(main())
    assert store.run_ids() == ["run-a"]


def test_a_cancelled_caller_still_gets_its_row_stored(store: FlakyStore) -> None:
    record = make_record("run-a", 0)

    async def main() -> None:
        committer = _started(store)
        store.gate.clear()
        task = asyncio.ensure_future(committer.submit(record))
        await asyncio.to_thread(store.entered.wait, 10)
        task.cancel()
        store.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await committer.close()
        assert committer.rows == 1

    asyncio.run(main())
    assert store.load_context("run-a", 0).existing == record.decision


def test_a_lone_caller_does_not_wait(store: FlakyStore) -> None:
    """The adaptive wait only applies after a batch of >= 2 rows."""

    async def main() -> float:
        committer = _started(store, max_wait=0.2)
        try:
            start = time.perf_counter()
            for epoch in range(10):
                await committer.submit(make_record("run-a", epoch))
            return time.perf_counter() - start
        finally:
            await committer.close()

    assert asyncio.run(main()) < 1.0  # a fixed 0.2 s wait would take >= 2 s
    assert store.batch_sizes == [1] * 10


def test_submit_needs_start(store: FlakyStore) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="start"):
            await GroupCommitter(store.record_decisions).submit(make_record())

    asyncio.run(main())


def test_bad_settings_are_refused(store: FlakyStore) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitter(store.record_decisions, max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        GroupCommitter(store.record_decisions, max_wait=-1)
