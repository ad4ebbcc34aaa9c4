"""Group commit: many concurrent ReportEpoch calls, one durable transaction.

Committing inside the event loop halves throughput, and handing each row back
to the loop separately costs 17-34% (PERF.md, "Durable audit"). So one writer
thread takes whatever is queued into one call of the batch function (the
service's: load contexts, decide, record, all in one transaction) and wakes
each event loop once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from control_server.domain import Decision, StoreUnavailable

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
_Outcome = Decision | BaseException
#: Commits a batch in one transaction; one outcome (decision or error) per item, in order.
BatchFunction = Callable[[Sequence[Item]], Sequence[Decision | BaseException | None]]
#: Told (rows, seconds) after each committed batch (metrics).
BatchObserver = Callable[[int, float], None]


@dataclass(frozen=True, slots=True)
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future[Decision]
    loop: asyncio.AbstractEventLoop


class GroupCommitter(Generic[Item]):
    """One writer thread that commits queued items in batches through `commit`.

    `batches` and `rows` count what was committed; `failed_batches` counts
    batches the store refused.
    """

    def __init__(
        self,
        commit: BatchFunction[Item],
        *,
        max_batch: int = 512,
        max_wait: float = 0.002,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, but got {max_batch}.")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, but got {max_wait}.")
        self._commit_batch = commit
        self._observer = observer
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._queue: deque[_Pending[Item]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.batches = 0
        self.rows = 0
        self.failed_batches = 0

    def start(self) -> None:
        """Start the writer thread."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("GroupCommitter.start() was already called")
            self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    async def submit(self, item: Item) -> Decision:
        """Queue one item and wait until its batch is durable; return the stored decision.

        Raises StoreUnavailable when the batch's write failed or the committer is
        closed, and whatever error the batch function gave for this item.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        with self._cond:
            if self._thread is None:
                raise RuntimeError("GroupCommitter.start() was not called")
            if self._closing:
                raise StoreUnavailable("the group committer is closed")
            self._queue.append(_Pending(item, future, loop))
            self._cond.notify()
        return await future

    async def close(self) -> None:
        """Commit everything submitted so far, then stop the writer thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        previous = 0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                wait = previous >= 2 and not self._closing and len(self._queue) < self._max_batch
            if wait and self._max_wait > 0:
                # Under load more rows arrive within a fsync's time; a lone caller
                # (previous batch of 1) must not pay for the wait.
                time.sleep(self._max_wait)
            with self._cond:
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
            previous = len(batch)
            self._commit(batch)

    def _commit(self, batch: list[_Pending[Item]]) -> None:
        outcomes: list[_Outcome]
        began = time.perf_counter()
        try:
            stored = self._commit_batch([p.item for p in batch])
            if len(stored) != len(batch):
                raise RuntimeError(f"the batch gave {len(stored)} outcomes for {len(batch)} items")
            outcomes = [
                d if d is not None else StoreUnavailable("the store did not record the decision")
                for d in stored
            ]
            self.batches += 1
            self.rows += len(batch)
            if self._observer is not None:
                self._observer(len(batch), time.perf_counter() - began)
        except StoreUnavailable as exc:
            logger.warning("group commit of %d rows failed: %s", len(batch), exc)
            self.failed_batches += 1
            outcomes = [exc] * len(batch)
        except Exception as exc:
            logger.exception("group commit of %d rows failed unexpectedly", len(batch))
            self.failed_batches += 1
            outcomes = [exc] * len(batch)
        # One wake-up per event loop per batch (normally exactly one loop).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Decision], _Outcome]]]
        by_loop = {}
        for pending, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(pending.loop, []).append((pending.future, outcome))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:
                logger.warning("event loop closed; %d decisions were not handed back", len(items))


def _resolve(items: list[tuple[asyncio.Future[Decision], _Outcome]]) -> None:
    for future, outcome in items:
        if future.done():  # the caller was cancelled; the row is stored all the same
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
