"""WatchDecisions: live tails of the decisions committed after a watch opened.

One reader per server, not one per stream: `Watches` runs a single task that
reads the decisions committed since its cursor, in a worker thread, when this
replica's decider commits (the front end calls `Watches.notify`) and every
`poll_s` (so decisions of other replicas sharing the store show up too), and
hands each one to the watches whose filter it matches (looked up by run id:
an idle watch costs nothing per decision). It runs only while a watch is open.

A watch waits on its own buffer. One whose client stops reading, and so falls
more than `max_buffered` decisions behind, leaves the shared reader and reads
its backlog from the store by itself, from where its buffer ended, as fast as
its client takes it: nothing is lost and the server's memory stays bounded.

Open streams are capped per server and per token (`WatchLimitReached`, which
the servicer answers with RESOURCE_EXHAUSTED): each is a task and a buffer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from control_server.domain import (
    Decision,
    DecisionFilter,
    DomainError,
    ResourceExhausted,
    StoreUnavailable,
)
from control_server.store import Store

__all__ = ["DecisionWatch", "WatchLimitReached", "Watches"]

logger = logging.getLogger(__name__)

#: Seconds between reads of the store while watches are open (decisions of other replicas).
WATCH_POLL_S = 0.5
#: Decisions read from the store at a time.
WATCH_PAGE = 256
#: Open WatchDecisions streams a server accepts (`--max-watch-streams`).
MAX_WATCH_STREAMS = 1000
#: Open WatchDecisions streams one token may hold (`--max-watch-streams-per-token`).
MAX_WATCH_STREAMS_PER_TOKEN = 100
#: Decisions a watch may hold unsent before it reads on from the store by itself.
MAX_BUFFERED = 4096
_EVERYTHING = DecisionFilter(limit=0)


class WatchLimitReached(ResourceExhausted):
    """Opening one more watch would exceed a cap; the message names it and its flag."""


class Watches:
    """The open watches of one server, the one reader feeding them, and their caps.

    `max_per_token` None: no cap per caller (a server without authentication,
    where every caller is "anonymous").
    """

    def __init__(
        self,
        store: Store,
        *,
        poll_s: float = WATCH_POLL_S,
        max_streams: int = MAX_WATCH_STREAMS,
        max_per_token: int | None = MAX_WATCH_STREAMS_PER_TOKEN,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, but got {max_streams}.")
        if max_per_token is not None and max_per_token < 1:
            raise ValueError(f"max_per_token must be at least 1, but got {max_per_token}.")
        self.store = store
        self.poll_s = poll_s
        self.max_streams = max_streams
        self.max_per_token = max_per_token
        self.max_buffered = max_buffered
        self.closed = False
        self._opened: dict[DecisionWatch, str] = {}  # every open watch -> its caller
        self._per_caller: dict[str, int] = {}
        # Fed by the reader: by run id ("" for watches of every run).
        self._live: dict[str, set[DecisionWatch]] = {}
        # Waiting for a read that began after they opened (see _read_loop).
        self._pending: list[DecisionWatch] = []
        self._cursor: int | None = None
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        #: Replaced after each read that found decisions: watches reading by themselves
        #: wait on it.
        self.tick = asyncio.Event()

    @property
    def count(self) -> int:
        """Open watches."""
        return len(self._opened)

    def open(self, decision_filter: DecisionFilter, caller: str) -> DecisionWatch:
        """A live tail from now on (`await` its `open()`); decisions committed before it
        are not sent. Raises WatchLimitReached at a cap, StoreUnavailable when closed."""
        if self.closed:
            raise StoreUnavailable("the server is shutting down")
        if len(self._opened) >= self.max_streams:
            raise WatchLimitReached(
                f"this server already has {len(self._opened)} WatchDecisions streams open, "
                f"its cap (--max-watch-streams {self.max_streams}); close one, or raise the cap"
            )
        held = self._per_caller.get(caller, 0)
        if self.max_per_token is not None and held >= self.max_per_token:
            raise WatchLimitReached(
                f"token {caller!r} already has {held} WatchDecisions streams open, the cap per "
                f"token (--max-watch-streams-per-token {self.max_per_token}); close one, or "
                "raise the cap"
            )
        watch = DecisionWatch(self, decision_filter)
        self._opened[watch] = caller
        self._per_caller[caller] = held + 1
        return watch

    def notify(self) -> None:
        """Decisions were committed: read them (a no-op, on the hot path, without watches)."""
        if self._opened:
            self._wake.set()

    def close(self) -> None:
        """End every open watch (call before stopping the server, so that it does not
        wait out its grace period on them)."""
        self.closed = True
        for watch in list(self._opened):
            watch.wake()
        self._wake.set()
        self.tick.set()  # watches reading by themselves wait on it

    # --- what the watches call ----------------------------------------------------------

    def _join(self, watch: DecisionWatch) -> None:
        self._pending.append(watch)
        self._wake.set()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop(), name="watch-reader")

    def _leave(self, watch: DecisionWatch) -> None:
        caller = self._opened.pop(watch, None)
        if caller is not None:
            left = self._per_caller[caller] - 1
            if left:
                self._per_caller[caller] = left
            else:
                del self._per_caller[caller]
        self._detach(watch)
        if watch in self._pending:
            self._pending.remove(watch)

    def _detach(self, watch: DecisionWatch) -> None:
        """Stop feeding `watch` (it left, or reads by itself now)."""
        fed = self._live.get(watch.run_id)
        if fed is not None:
            fed.discard(watch)
            if not fed:
                del self._live[watch.run_id]

    # --- the one reader -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read what was committed since the cursor and hand it out, until no watch is open.

        A watch joins once a read that began after it opened has caught up (a short
        page): everything committed after its `open()` returned is above that
        read's cursor, so it gets every later decision and none from before."""
        try:
            while self._opened and not self.closed:
                joining, self._pending = self._pending, []
                self._wake.clear()
                try:
                    if self._cursor is None:
                        self._cursor = await asyncio.to_thread(self.store.latest_decision_seq)
                        full = False
                    else:
                        full = await self._read_once(self._cursor)
                except DomainError as exc:
                    self._fail_all(exc, joining)
                    await self._wait()
                    continue
                except Exception:
                    logger.exception("[WatchDecisions] reading new decisions failed")
                    self._fail_all(StoreUnavailable("cannot read new decisions"), joining)
                    await self._wait()
                    continue
                if full:
                    self._pending[:0] = joining  # not caught up: join after the next read
                    continue
                for watch in joining:
                    if watch in self._opened:
                        self._live.setdefault(watch.run_id, set()).add(watch)
                        watch.start()
                if not self._pending:
                    await self._wait()
        finally:
            self._reader = None
            self._cursor = None  # the next reader starts from the latest decision
            self._live.clear()

    async def _read_once(self, cursor: int) -> bool:
        """One read and its hand-out; True when the page was full (more to read)."""
        page = await asyncio.to_thread(self.store.decisions_after, cursor, _EVERYTHING, WATCH_PAGE)
        # Buffers complete up to `cursor`: one too long reads on by itself from there.
        for fed in list(self._live.values()):
            for watch in [w for w in fed if len(w.buffer) > self.max_buffered]:
                logger.warning(
                    "[WatchDecisions] a watch fell %d decisions behind: it reads the store "
                    "by itself now",
                    len(watch.buffer),
                )
                self._detach(watch)
                watch.read_alone(cursor)
        everyone = self._live.get("")
        for decision in page.decisions:
            for group in (self._live.get(decision.run_id), everyone):
                for watch in group or ():
                    watch.offer(decision)
        self._cursor = page.cursor
        if page.decisions:
            self.tick.set()
            self.tick = asyncio.Event()
        return len(page.decisions) >= WATCH_PAGE

    async def _wait(self) -> None:
        """Until a notify, a new watch, or `poll_s` (other replicas' decisions)."""
        try:
            async with asyncio.timeout(self.poll_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _fail_all(self, error: DomainError, joining: list[DecisionWatch]) -> None:
        for watch in [*joining, *(w for fed in self._live.values() for w in fed)]:
            watch.fail(error)
        self._live.clear()
        self._cursor = None


class DecisionWatch:
    """A live tail of the decisions committed after it was opened (an async iterator).

    `await open()` first. Ends when the server's watches close; `close()` it when
    the caller goes away.
    """

    def __init__(self, watches: Watches, decision_filter: DecisionFilter) -> None:
        self._watches = watches
        self._filter = decision_filter
        self.run_id = decision_filter.run_id
        self.buffer: deque[Decision] = deque()
        self._ready = asyncio.Event()
        self._started = False
        self._error: DomainError | None = None
        # Set when it reads by itself: the cursor its buffer is complete up to.
        self._cursor: int | None = None
        self._closed = False

    async def open(self) -> None:
        """Return once the watch is live: every decision committed afterwards is sent."""
        self._watches._join(self)
        while not self._started and self._error is None and not self._closed:
            if self._watches.closed:
                return
            await self._ready.wait()
            self._ready.clear()
        if self._error is not None:
            raise self._error

    def __aiter__(self) -> DecisionWatch:
        return self

    async def __anext__(self) -> Decision:
        while not self.buffer:
            if self._error is not None:
                self.close()
                raise self._error
            if self._closed or self._watches.closed:
                self.close()
                raise StopAsyncIteration
            if self._cursor is not None:
                await self._read_by_itself(self._cursor)
            else:
                self._ready.clear()
                await self._ready.wait()
        return self.buffer.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._watches._leave(self)

    # --- what the reader calls ----------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._ready.set()

    def offer(self, decision: Decision) -> None:
        f = self._filter
        if (f.action is None or decision.action == f.action) and (
            f.source is None or decision.source == f.source
        ):
            self.buffer.append(decision)
            self._ready.set()

    def read_alone(self, cursor: int) -> None:
        self._cursor = cursor
        self._ready.set()

    def fail(self, error: DomainError) -> None:
        self._error = error
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    async def _read_by_itself(self, cursor: int) -> None:
        tick = self._watches.tick
        page = await asyncio.to_thread(
            self._watches.store.decisions_after, cursor, self._filter, WATCH_PAGE
        )
        self._cursor = page.cursor
        if page.decisions:
            self.buffer.extend(page.decisions)
            return
        try:
            async with asyncio.timeout(self._watches.poll_s):
                await tick.wait()
        except TimeoutError:
            pass
