"""WatchDecisions: live tails of the decisions committed after a watch opened.

A `DecisionWatch` wakes at once when this replica's decider commits (the
front end calls `Watches.notify`) and polls the store every `poll_s` (in a
worker thread, off the event loop), so decisions of other replicas sharing
the store show up too.
"""

from __future__ import annotations

import asyncio
from collections import deque

from control_server.domain import Decision, DecisionFilter, StoreUnavailable
from control_server.store import Store

#: Seconds between a watch's polls of the store (decisions of other replicas).
WATCH_POLL_S = 0.5
#: Decisions a watch reads from the store at a time.
WATCH_PAGE = 256


class Watches:
    """The open watches of one server: wakes them all at once, ends them at shutdown.

    Wakes by replacing an asyncio.Event on each notify: every watch waits on the
    event it took before its last read, so none misses a wake-up."""

    def __init__(self, store: Store, *, poll_s: float = WATCH_POLL_S) -> None:
        self.store = store
        self.poll_s = poll_s
        self.count = 0
        self.closed = False
        self._event = asyncio.Event()

    def open(self, decision_filter: DecisionFilter) -> DecisionWatch:
        """A live tail from now on; decisions committed before this call are not sent."""
        if self.closed:
            raise StoreUnavailable("the server is shutting down")
        return DecisionWatch(self, decision_filter)

    def current(self) -> asyncio.Event:
        """The event the next notify sets; take it before reading the store."""
        return self._event

    def notify(self) -> None:
        """Wake the watches: decisions were committed (a no-op, on the hot path, when
        there are none)."""
        if self.count:
            self._wake_all()

    def close(self) -> None:
        """End every open watch (call before stopping the server, so that it does not
        wait out its grace period on them)."""
        self.closed = True
        self._wake_all()

    def _wake_all(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class DecisionWatch:
    """A live tail of the decisions committed after it was opened (an async iterator).

    `await open()` first. Ends when the server's watches close; `close()` it when
    the caller goes away.
    """

    def __init__(self, watches: Watches, decision_filter: DecisionFilter) -> None:
        self._watches = watches
        self._filter = decision_filter
        self._cursor: int | None = None
        self._buffer: deque[Decision] = deque()
        self._closed = False
        watches.count += 1

    async def open(self) -> None:
        """Start from the latest committed decision: only later ones are sent."""
        self._cursor = await asyncio.to_thread(self._watches.store.latest_decision_seq)

    def __aiter__(self) -> DecisionWatch:
        return self

    async def __anext__(self) -> Decision:
        if self._cursor is None:
            raise RuntimeError("DecisionWatch: await open() before iterating")
        while not self._buffer:
            if self._closed or self._watches.closed:
                self.close()
                raise StopAsyncIteration
            event = self._watches.current()
            page = await asyncio.to_thread(
                self._watches.store.decisions_after, self._cursor, self._filter, WATCH_PAGE
            )
            self._cursor = page.cursor
            if page.decisions:
                self._buffer.extend(page.decisions)
                break
            try:
                async with asyncio.timeout(self._watches.poll_s):
                    await event.wait()
            except TimeoutError:
                pass
        return self._buffer.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._watches.count -= 1
