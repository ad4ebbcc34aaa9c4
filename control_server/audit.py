"""The audit trail of operator calls: one interceptor recording every ControlAdmin call.

Each call becomes one admin event in the store: who (the actor the auth
interceptor established), what (the method, its target and the request as
compact JSON), when (the store stamps it as the call ends) and the result (the
status code name). It sits outside the auth interceptor, so refused calls are
recorded too. ReportEpoch is not recorded here (its decisions are its audit),
nor are health checks and reflection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import json_format, message_factory, text_format
from google.protobuf.message import DecodeError, Message

from control_server.identity import current_actor
from control_server.interceptors import Stream, Unary, wrap_handler
from control_server.store import Store
from trainer_client.api import control_pb2 as pb

__all__ = ["AuditInterceptor"]

logger = logging.getLogger(__name__)

_ADMIN = pb.DESCRIPTOR.services_by_name["ControlAdmin"]
#: Request JSON longer than this is cut (policy documents can be large).
MAX_REQUEST_CHARS = 4096
_TARGET_FIELDS = ("run_id", "version")
#: Records one call: (request, context or None, began, error, actor, peer).
_Record = Callable[[Any, Any, float, BaseException | None, str, str], None]


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


class AuditInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records every ControlAdmin call, allowed or refused, as an admin event."""

    def __init__(self, store: Store, *, max_request_chars: int = MAX_REQUEST_CHARS) -> None:
        self._store = store
        self._max = max_request_chars
        # One thread writes every record, in the order the calls ended: off the event
        # loop (a store waiting for a lock must not stall every call the server is
        # serving), and in order (a refusal reaches its client before its record is
        # written, so the next call's record could otherwise overtake it).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._pending: set[asyncio.Future[None]] = set()
        # Refusals come from terminators without a deserializer: decode their bytes here.
        self._request_types: dict[str, type[Message]] = {
            f"/{_ADMIN.full_name}/{m.name}": message_factory.GetMessageClass(m.input_type)
            for m in _ADMIN.methods
        }

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
            self._write(
                self._event(action, request_type, request, context, began, error, actor, peer)
            )

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
                    # An answer goes out after its record is stored (a refusal before);
                    # a call cancelled meanwhile still gets its record (shielded).
                    actor = current_actor()
                    await asyncio.shield(
                        self._write(
                            self._event(
                                action, request_type, request, context, began, error, actor, peer
                            )
                        )
                    )

            return unary_unary

        return wrap_handler(
            handler,
            audited,
            lambda stream: _audited_generator(stream, record),
            write_stream=lambda stream: _audited_writer(stream, record),
        )

    def _write(self, write: Callable[[], None]) -> asyncio.Future[None]:
        """Queue one record's store write on the writer thread."""
        pending = asyncio.get_running_loop().run_in_executor(self._writer, write)
        self._pending.add(pending)
        pending.add_done_callback(self._pending.discard)
        return pending

    async def close(self) -> None:
        """Wait until every queued record is written, then stop the writer thread
        (before closing the store)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._writer.shutdown(wait=False)

    def _event(
        self,
        action: str,
        request_type: type[Message],
        request: Any,
        context: grpc.aio.ServicerContext | None,
        began: float,
        error: BaseException | None,
        actor: str,
        peer: str,
    ) -> Callable[[], None]:
        """Read how one call ended (on the event loop: its context is not to be
        touched elsewhere, nor at all when None, the client having left: grpc aio
        crashes the process); return the store write that records it."""
        try:
            result = _code_name(context, error) if context is not None else "CANCELLED"
            status_message = context.details() if context is not None else None
        except Exception:
            logger.exception("[%s] could not read the call's outcome (actor %s)", action, actor)
            result, status_message = "UNKNOWN", None
        duration_ms = round((time.monotonic() - began) * 1000, 1)

        def write() -> None:
            try:
                message = self._decode(request_type, request)
                details: dict[str, Any] = {
                    "request": self._request_json(message),
                    "peer": peer,
                    "duration_ms": duration_ms,
                }
                if result != "OK" and status_message:
                    details["message"] = str(status_message)[:500]
                target = next(
                    (str(getattr(message, f)) for f in _TARGET_FIELDS if getattr(message, f, "")),
                    "",
                )
                self._store.record_admin_event(actor, action, target, details, result)
            except Exception:
                # Never let the audit change a call's outcome: it already ran.
                logger.exception("[%s] could not record the admin event (actor %s)", action, actor)

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
