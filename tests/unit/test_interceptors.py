"""wrap_handler: the wrapped handler keeps its kind, style and (de)serializers."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc

from control_server.interceptors import Stream, Unary, wrap_handler


def _deserialize(data: bytes) -> str:
    return data.decode()


def _serialize(text: str) -> bytes:
    return text.encode()


def _wrappers(calls: list[str]) -> dict[str, Any]:
    """A wrapper per style, each noting its name before the behavior runs."""

    def unary(behavior: Unary) -> Unary:
        async def run(request: Any, context: Any) -> Any:
            calls.append("unary")
            return await behavior(request, context)

        return run

    def stream(behavior: Stream) -> Stream:
        async def generate(request: Any, context: Any) -> AsyncIterator[Any]:
            calls.append("stream")
            async for response in behavior(request, context):
                yield response

        return generate

    def write_stream(behavior: Unary) -> Unary:
        async def run(request: Any, context: Any) -> Any:
            calls.append("write_stream")
            return await behavior(request, context)

        return run

    return {"unary": unary, "stream": stream, "write_stream": write_stream}


def test_unary_unary_keeps_its_kind_and_serializers() -> None:
    async def echo(request: str, context: Any) -> str:
        return request.upper()

    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=_deserialize, response_serializer=_serialize
    )
    calls: list[str] = []
    wrapped = wrap_handler(handler, **_wrappers(calls))
    assert not wrapped.request_streaming and not wrapped.response_streaming
    assert wrapped.request_deserializer is _deserialize
    assert wrapped.response_serializer is _serialize
    assert asyncio.run(wrapped.unary_unary("hi", None)) == "HI"
    assert calls == ["unary"]


def test_a_yielding_stream_stays_an_async_generator() -> None:
    async def count(request: int, context: Any) -> AsyncIterator[int]:
        for i in range(request):
            yield i

    handler = grpc.unary_stream_rpc_method_handler(
        count, request_deserializer=_deserialize, response_serializer=_serialize
    )
    calls: list[str] = []
    wrapped = wrap_handler(handler, **_wrappers(calls))
    assert not wrapped.request_streaming and wrapped.response_streaming
    assert wrapped.request_deserializer is _deserialize
    assert wrapped.response_serializer is _serialize
    assert inspect.isasyncgenfunction(wrapped.unary_stream)

    async def collect() -> list[int]:
        return [i async for i in wrapped.unary_stream(3, None)]

    assert asyncio.run(collect()) == [0, 1, 2]
    assert calls == ["stream"]


def test_a_writing_stream_stays_a_coroutine() -> None:
    written: list[str] = []

    class Context:
        async def write(self, response: str) -> None:
            written.append(response)

    async def watch(request: str, context: Context) -> None:
        await context.write(request)

    handler = grpc.unary_stream_rpc_method_handler(watch)
    calls: list[str] = []
    wrapped = wrap_handler(handler, **_wrappers(calls))
    assert wrapped.response_streaming
    assert inspect.iscoroutinefunction(wrapped.unary_stream)
    asyncio.run(wrapped.unary_stream("up", Context()))
    assert written == ["up"] and calls == ["write_stream"]

    # Without a write_stream wrapper, the unary one wraps it.
    calls.clear()
    wrappers = _wrappers(calls)
    del wrappers["write_stream"]
    asyncio.run(wrap_handler(handler, **wrappers).unary_stream("again", Context()))
    assert written == ["up", "again"] and calls == ["unary"]


def test_client_and_bidi_streams_come_back_unchanged() -> None:
    async def consume(requests: Any, context: Any) -> None:
        return None

    for handler in (
        grpc.stream_unary_rpc_method_handler(consume),
        grpc.stream_stream_rpc_method_handler(consume),
    ):
        assert wrap_handler(handler, **_wrappers([])) is handler
