"""Wrapping a gRPC aio method handler: how the interceptors run code around an RPC.

An interceptor hands `wrap_handler` the handler and a wrapper per style of
behaviour; it gets back a handler of the same kind, with the same request
deserializer and response serializer, whose behaviour is the wrapped one.

grpc aio serves a unary-stream behaviour in one of two styles and tells them
apart by the function's kind: an async generator function yields the
responses, a coroutine function writes them with ``context.write`` (health's
Watch does). A wrapper must keep the style, so the two get a wrapper each.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["Stream", "Unary", "wrap_handler"]

#: A unary-unary behaviour, or a unary-stream one writing with ``context.write``.
Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
#: A unary-stream behaviour yielding its responses (an async generator function).
Stream = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Unary], Unary],
    stream: Callable[[Stream], Stream],
    *,
    write_stream: Callable[[Unary], Unary] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: by `unary` for a unary-unary handler,
    by `stream` for a unary-stream one that yields (`stream` must return an async
    generator function), by `write_stream` (default: `unary`) for one that writes
    with ``context.write``. Client-streaming and bidi handlers come back unchanged.
    """
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.unary_stream is not None:
        behaviour = handler.unary_stream
        if inspect.isasyncgenfunction(behaviour):
            return handler._replace(unary_stream=stream(behaviour))
        return handler._replace(unary_stream=(write_stream or unary)(behaviour))
    return handler
