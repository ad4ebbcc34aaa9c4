"""The audit trail of operator calls: one interceptor recording every ControlAdmin call.

Each call becomes one admin event in the store: who (the actor the auth
interceptor established), what (the method, its target and the request as
compact JSON), when (the store stamps it as the call ends) and the result (the
status code name). It sits outside the auth interceptor, so refused calls are
recorded too. ReportEpoch is not recorded here (its decisions are its audit),
nor are health checks and reflection.

Refused calls (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) are
counted, not written one by one: a client hammering the server without a token
must not turn every refusal into a store write that trainers queue behind. They
are grouped per (actor, peer address without its port, method, code, message)
over `refusal_interval_s`, and each group becomes one event at the interval's
end with its count, its first and last time and its first call's request.
At most `max_refusal_groups` groups are kept per interval; refusals beyond them
are counted in one "(others)" group per code, so memory stays bounded.

With a retention (`--audit-retention-days`), events older than it are deleted
at start and every hour, in small transactions, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import json_format, message_factory, text_format
from google.protobuf.message import DecodeError, Message

from control_server.identity import current_actor
from control_server.interceptors import Stream, Unary, wrap_handler
from control_server.store import Store
from trainer_client.api import control_pb2 as pb

__all__ = ["AuditInterceptor", "RefusalTally"]

logger = logging.getLogger(__name__)

_ADMIN = pb.DESCRIPTOR.services_by_name["ControlAdmin"]
#: Request JSON longer than this is cut (policy documents can be large).
MAX_REQUEST_CHARS = 4096
_TARGET_FIELDS = ("run_id", "version", "name")
#: Records one call: (request, context or None, began, error, actor, peer).
_Record = Callable[[Any, Any, float, BaseException | None, str, str], None]
#: Results of calls refused before they ran: counted per group, not written one by one.
REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
#: Seconds over which refused calls are counted into one event per group.
REFUSAL_INTERVAL_S = 10.0
#: Groups of refused calls kept per interval; beyond them, one "(others)" group per code.
MAX_REFUSAL_GROUPS = 1000
#: The actor and action of the group counting refusals beyond `MAX_REFUSAL_GROUPS`.
OTHERS = "(others)"
#: Seconds between two retention passes (the first runs at start).
RETENTION_EVERY_S = 3600.0
#: Events deleted per transaction by a retention pass (other writers get the store between).
RETENTION_BATCH = 1000


def _code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the client went away, or the server is stopping
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    # An exception with no status reaches the client as UNKNOWN.
    return "OK" if error is None else "UNKNOWN"


def peer_address(peer: str) -> str:
    """A gRPC peer without its port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"): a client
    opening a new connection per call is still one peer."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


@dataclass
class _Outcome:
    """How one call ended, read on the event loop."""

    action: str
    request_type: type[Message]
    request: Any
    result: str
    status_message: str | None
    actor: str
    peer: str


@dataclass
class RefusalGroup:
    """Refused calls of one (actor, peer address, method, code, message) in one interval."""

    first: _Outcome
    count: int
    first_at: float
    last_at: float


class RefusalTally:
    """Refused calls counted per group over an interval, in bounded memory.

    Not thread-safe: `add` and `drain` are called on the event loop.
    """

    def __init__(self, max_groups: int = MAX_REFUSAL_GROUPS) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be at least 1, but got {max_groups}.")
        self.max_groups = max_groups
        self._groups: dict[tuple[str, ...], RefusalGroup] = {}
        self._others: dict[str, RefusalGroup] = {}

    def add(self, outcome: _Outcome, at: float) -> None:
        """Count one refused call that ended at `at` (seconds since the epoch)."""
        key = (
            outcome.actor,
            peer_address(outcome.peer),
            outcome.action,
            outcome.result,
            outcome.status_message or "",
        )
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) < self.max_groups:
                self._groups[key] = RefusalGroup(outcome, 1, at, at)
                return
            group = self._others.get(outcome.result)
            if group is None:
                self._others[outcome.result] = RefusalGroup(outcome, 1, at, at)
                return
        group.count += 1
        group.last_at = at

    def drain(self) -> tuple[list[RefusalGroup], list[RefusalGroup]]:
        """The groups counted since the last drain, and the "(others)" ones; starts afresh."""
        groups, others = list(self._groups.values()), list(self._others.values())
        self._groups, self._others = {}, {}
        return groups, others

    def __len__(self) -> int:
        return len(self._groups) + len(self._others)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class AuditInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records every ControlAdmin call, allowed or refused, as an admin event.

    `start()` it on the server's event loop to write refused calls every
    `refusal_interval_s` and to apply the retention; `close()` writes what is left.
    `retention_days` None or 0: keep every event.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_request_chars: int = MAX_REQUEST_CHARS,
        refusal_interval_s: float = REFUSAL_INTERVAL_S,
        max_refusal_groups: int = MAX_REFUSAL_GROUPS,
        retention_days: float | None = None,
    ) -> None:
        if refusal_interval_s <= 0:
            raise ValueError(f"refusal_interval_s must be positive, but got {refusal_interval_s}.")
        if retention_days is not None and not retention_days >= 0:
            raise ValueError(f"retention_days must be 0 or more, but got {retention_days}.")
        self._store = store
        self._max = max_request_chars
        self._refusal_interval_s = refusal_interval_s
        self._refusals = RefusalTally(max_refusal_groups)
        self._retention_days = retention_days or None
        # One thread writes every record, in the order the calls ended: off the event
        # loop (a store waiting for a lock must not stall every call the server is
        # serving), and in order (a refusal reaches its client before its record is
        # written, so the next call's record could otherwise overtake it).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._pending: set[asyncio.Future[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._pruning: asyncio.Future[int] | None = None
        self._closing = False
        # Refusals come from terminators without a deserializer: decode their bytes here.
        self._request_types: dict[str, type[Message]] = {
            f"/{_ADMIN.full_name}/{m.name}": message_factory.GetMessageClass(m.input_type)
            for m in _ADMIN.methods
        }

    def start(self) -> None:
        """Start writing refusals every interval and, with a retention, pruning."""
        self._tasks.append(asyncio.create_task(self._write_refusals_every_interval()))
        if self._retention_days is not None:
            self._tasks.append(asyncio.create_task(self._prune_every_hour()))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        request_type = self._request_types.get(method)
        if handler is None or request_type is None:
            return handler
        action = method.rsplit("/", 1)[-1]

        def record(
            request: Any,
            context: grpc.aio.ServicerContext | None,
            began: float,
            error: BaseException | None,
            actor: str,
            peer: str,
        ) -> None:
            # A stream's end cannot await (its generator may be closing): the write
            # is queued, and `close()` waits for it.
            outcome = self._outcome(action, request_type, request, context, error, actor, peer)
            self._record(outcome, began)

        def audited(unary: Unary) -> Unary:
            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                began, error, peer = time.monotonic(), None, context.peer()
                try:
                    return await unary(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    # The auth interceptor set the actor in this task, inside the call.
                    # An answer goes out after its record is stored (a refusal is
                    # counted, and written at the interval's end); a call cancelled
                    # meanwhile still gets its record (shielded).
                    outcome = self._outcome(
                        action, request_type, request, context, error, current_actor(), peer
                    )
                    written = self._record(outcome, began)
                    if written is not None:
                        await asyncio.shield(written)

            return unary_unary

        return wrap_handler(
            handler,
            audited,
            lambda stream: _audited_generator(stream, record),
            write_stream=lambda stream: _audited_writer(stream, record),
        )

    def _record(self, outcome: _Outcome, began: float) -> asyncio.Future[None] | None:
        """Count a refusal, or queue the call's event; None when nothing is written now."""
        if outcome.result in REFUSED:
            self._refusals.add(outcome, time.time())
            return None
        duration_ms = round((time.monotonic() - began) * 1000, 1)
        return self._write(self._event(outcome, {"peer": outcome.peer, "duration_ms": duration_ms}))

    def _write(self, write: Callable[[], None]) -> asyncio.Future[None]:
        """Queue one record's store write on the writer thread."""
        pending = asyncio.get_running_loop().run_in_executor(self._writer, write)
        self._pending.add(pending)
        pending.add_done_callback(self._pending.discard)
        return pending

    async def flush(self) -> None:
        """Write the refusals counted so far, and wait until every queued event is written."""
        self._write_refusals()
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def close(self) -> None:
        """Write what is counted and queued, then stop the writer thread (before
        closing the store)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._pruning is not None:
            # Ends after its current batch (it checks _closing), before the store closes.
            await asyncio.gather(self._pruning, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        self._writer.shutdown(wait=False)

    # --- refused calls --------------------------------------------------------------------

    async def _write_refusals_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._refusal_interval_s)
            self._write_refusals()

    def _write_refusals(self) -> None:
        """Queue one event per group of refusals counted since the last time."""
        groups, others = self._refusals.drain()
        if not groups and not others:
            return
        total = sum(g.count for g in (*groups, *others))
        top = max((*groups, *others), key=lambda g: g.count)
        logger.warning(
            "refused %d calls in %d groups since the last count (most: %d x %s %s by %s "
            "from %s: %s)",
            total,
            len(groups) + len(others),
            top.count,
            top.first.action,
            top.first.result,
            top.first.actor,
            peer_address(top.first.peer),
            top.first.status_message,
        )
        for group in groups:
            self._write(self._event(group.first, self._group_details(group)))
        for group in others:
            details = self._group_details(group)
            details["beyond_groups"] = self._refusals.max_groups
            outcome = group.first
            self._write(
                self._event(
                    _Outcome(OTHERS, outcome.request_type, None, outcome.result, None, OTHERS, ""),
                    details,
                )
            )

    @staticmethod
    def _group_details(group: RefusalGroup) -> dict[str, Any]:
        return {
            "peer": peer_address(group.first.peer),
            "count": group.count,
            "first_at": _iso(group.first_at),
            "last_at": _iso(group.last_at),
        }

    # --- retention ------------------------------------------------------------------------

    async def _prune_every_hour(self) -> None:
        while not self._closing:
            self._pruning = asyncio.ensure_future(asyncio.to_thread(self._prune))
            try:
                await asyncio.shield(self._pruning)
            except Exception:
                logger.exception("audit retention: could not delete old admin events")
            finally:
                self._pruning = None
            await asyncio.sleep(RETENTION_EVERY_S)

    def _prune(self) -> int:
        """Delete the events older than the retention, a batch per transaction."""
        assert self._retention_days is not None
        before = datetime.now(UTC) - timedelta(days=self._retention_days)
        deleted = 0
        while not self._closing:
            count = self._store.delete_admin_events(before, RETENTION_BATCH)
            deleted += count
            if count < RETENTION_BATCH:
                break
        if deleted:
            logger.info(
                "audit retention: deleted %d admin events recorded before %s "
                "(--audit-retention-days %g)",
                deleted,
                before.isoformat(timespec="seconds"),
                self._retention_days,
            )
        return deleted

    # --- one event ------------------------------------------------------------------------

    def _outcome(
        self,
        action: str,
        request_type: type[Message],
        request: Any,
        context: grpc.aio.ServicerContext | None,
        error: BaseException | None,
        actor: str,
        peer: str,
    ) -> _Outcome:
        """Read how one call ended (on the event loop: its context is not to be touched
        elsewhere, nor at all when None, the client having left: grpc aio crashes the
        process)."""
        try:
            result = _code_name(context, error) if context is not None else "CANCELLED"
            status_message = context.details() if context is not None else None
        except Exception:
            logger.exception("[%s] could not read the call's outcome (actor %s)", action, actor)
            result, status_message = "UNKNOWN", None
        message = str(status_message)[:500] if status_message else None
        return _Outcome(action, request_type, request, result, message, actor, peer)

    def _event(self, outcome: _Outcome, details: dict[str, Any]) -> Callable[[], None]:
        """The store write that records `outcome` with `details` (and its request)."""

        def write() -> None:
            try:
                message = self._decode(outcome.request_type, outcome.request)
                recorded = {"request": self._request_json(message), **details}
                if outcome.result != "OK" and outcome.status_message:
                    recorded["message"] = outcome.status_message
                target = next(
                    (str(getattr(message, f)) for f in _TARGET_FIELDS if getattr(message, f, "")),
                    "",
                )
                self._store.record_admin_event(
                    outcome.actor, outcome.action, target, recorded, outcome.result
                )
            except Exception:
                # Never let the audit change a call's outcome: it already ran.
                logger.exception(
                    "[%s] could not record the admin event (actor %s)",
                    outcome.action,
                    outcome.actor,
                )

        return write

    @staticmethod
    def _decode(request_type: type[Message], request: Any) -> Message | None:
        if isinstance(request, Message):
            return request
        if isinstance(request, bytes):
            try:
                return request_type.FromString(request)
            except DecodeError:
                return None
        return None

    def _request_json(self, message: Message | None) -> Any:
        if message is None:
            return None
        try:
            as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
            text = json.dumps(as_dict, separators=(",", ":"), sort_keys=True, allow_nan=False)
        except (json_format.Error, ValueError):
            # JSON has no Infinity/NaN (a Struct holding one cannot be mapped): keep the text.
            text = text_format.MessageToString(message, as_one_line=True)
            return {"text": text[: self._max], "chars": len(text)}
        if len(text) <= self._max:
            return as_dict
        return {"truncated": text[: self._max], "chars": len(text)}


def _audited_generator(stream: Stream, record: _Record) -> Stream:
    """A yielding unary-stream behavior, recorded once it ends."""

    async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        began, error, actor, peer = time.monotonic(), None, None, context.peer()
        live: grpc.aio.ServicerContext | None = context
        try:
            async for response in stream(request, context):
                actor = current_actor()
                yield response
        except BaseException as exc:
            error = exc
            if isinstance(exc, GeneratorExit | asyncio.CancelledError):
                # Abandoned by the client (closed later, from another task): its
                # context is gone, and so is this task's actor; use what was read.
                live = None
            else:
                actor = current_actor()
            raise
        finally:
            record(request, live, began, error, actor or current_actor(), peer)

    return generate


def _audited_writer(stream: Unary, record: _Record) -> Unary:
    """A unary-stream behavior writing with ``context.write``, recorded once it ends."""

    async def write(request: Any, context: grpc.aio.ServicerContext) -> Any:
        began, error, peer = time.monotonic(), None, context.peer()
        live: grpc.aio.ServicerContext | None = context
        try:
            return await stream(request, context)
        except BaseException as exc:
            error = exc
            if isinstance(exc, asyncio.CancelledError):
                live = None
            raise
        finally:
            record(request, live, began, error, current_actor(), peer)

    return write
