"""grpc.health.v1 follows the store: NOT_SERVING while it cannot write, SERVING again
once a write commits.

A server whose store cannot write answers every report UNAVAILABLE; saying so on
the health service lets a load balancer (or the container's HEALTHCHECK) route
to a replica that can. The front end probes with a real write every
`PROBE_INTERVAL_S` (`Store.check_writable`, in a worker thread: ReportEpoch
never waits for it), and at once when the decider's store refused a batch. A
batch the decider committed since the last probe is proof enough: then no
probe is written (on SQLite it would take the write lock from the reports). A
probe that takes longer than `PROBE_TIMEOUT_S` (a hung database) counts as a
failure while it runs; only one probe runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from control_server.domain import StoreUnavailable
from control_server.redact import redact
from control_server.store import Store

logger = logging.getLogger(__name__)

#: Seconds between write probes.
PROBE_INTERVAL_S = 2.0
#: Seconds a probe may take before the store counts as hung (until it answers).
PROBE_TIMEOUT_S = 2.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StoreHealth:
    """Sets `services` on `servicer` SERVING or NOT_SERVING as the store's write probes go.

    `start()` begins probing (the first probe at once); `probe_now()` asks for a probe
    before the next interval; `await stop()` ends probing.
    """

    def __init__(
        self,
        store: Store,
        servicer: health.aio.HealthServicer,
        services: Sequence[str],
        *,
        interval_s: float = PROBE_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"probe interval and timeout must be > 0 seconds, but got {interval_s}, "
                f"{timeout_s}."
            )
        self._store = store
        self._servicer = servicer
        self._services = tuple(services)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[None] | None = None
        #: Whether the last probe committed its write.
        self.serving = True
        #: Whether the decider committed a batch since the last probe.
        self._committed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def committed(self) -> None:
        """The decider committed a batch: the store takes writes."""
        self._committed = True

    def probe_now(self) -> None:
        """Probe before the next interval (the decider's store just refused a batch)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop probing; a probe still running gets `PROBE_TIMEOUT_S` to end (it uses
        the store, which is closed next)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._probe is not None and not self._probe.done():
            await asyncio.wait({self._probe}, timeout=self._timeout_s)

    async def _run(self) -> None:
        while True:
            woken = self._wake.is_set()
            self._wake.clear()
            if self._committed and self.serving and not woken:
                self._committed = False  # a commit proved it: no probe this interval
            else:
                self._committed = False
                await self._probe_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def _probe_once(self) -> None:
        probe = self._probe = asyncio.ensure_future(asyncio.to_thread(self._store.check_writable))
        done, _ = await asyncio.wait({probe}, timeout=self._timeout_s)
        if not done:
            await self._set(False, f"a write got no answer in {self._timeout_s:g} s")
            await asyncio.wait({probe})
        try:
            probe.result()
        except StoreUnavailable as exc:
            await self._set(False, str(exc))
        except Exception as exc:  # an unexpected failure is a failure to write all the same
            await self._set(False, f"{type(exc).__name__}: {exc}")
        else:
            await self._set(True, "")

    async def _set(self, serving: bool, reason: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            logger.info("health SERVING: the store takes writes again")
        else:
            logger.error("health NOT_SERVING: the store cannot write: %s", redact(reason))
        status = _SERVING if serving else _NOT_SERVING
        for name in self._services:
            await self._servicer.set(name, status)
