"""Prometheus metrics: one interceptor for the RPCs, plus the store's commit latency.

RPC metrics carry go-grpc-prometheus's names and labels, so existing dashboards
and alerts work unchanged. Each server gets its own registry (several servers
may live in one process, as in the tests).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from control_server.interceptors import Stream, Unary, wrap_handler
from trainer_client.api import control_pb2 as pb

logger = logging.getLogger(__name__)

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_ACTION_NAMES = {number: name for name, number in pb.Action.items()}
_SOURCE_NAMES = {number: name for name, number in pb.Source.items()}


@dataclass
class Metrics:
    """The server's metrics, registered in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            _RPC_LABELS,
            registry=r,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_RPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            _RPC_LABELS,
            registry=r,
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            _RPC_LABELS,
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had "
            "been application-level handled by the server.",
            _RPC_LABELS,
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.decisions = Counter(
            "training_control_decisions_total",
            "Decisions answered to ReportEpoch, by action and source.",
            ("action", "source"),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "training_control_store_commit_seconds",
            "Latency of one group commit to the store.",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self._decision_children: dict[tuple[int, int], Counter] = {}
        self.commit_rows = Histogram(
            "training_control_store_commit_rows",
            "Decisions written per group commit.",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )

    def count_decision(self, action: int, source: int) -> None:
        """Count one answered decision by its Action and Source numbers."""
        # A child per label pair, looked up once (labels() costs 3x an inc).
        child = self._decision_children.get((action, source))
        if child is None:
            child = self.decisions.labels(_ACTION_NAMES[action], _SOURCE_NAMES[source])
            self._decision_children[(action, source)] = child
        child.inc()

    def observe_commit(self, rows: int, seconds: float) -> None:
        """Called for each batch the decider process committed."""
        self.commit_seconds.observe(seconds)
        self.commit_rows.observe(rows)

    def serve(self, listen: str) -> MetricsEndpoint:
        """Expose /metrics over HTTP on HOST:PORT (port 0: any free port)."""
        host, _, port = listen.rpartition(":")
        server, thread = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry
        )
        logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return MetricsEndpoint(server.server_port, server, thread)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP endpoint."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _go_name(code: grpc.StatusCode) -> str:
    """grpc-go's spelling of a code ("InvalidArgument"), which go-grpc-prometheus uses."""
    if code == grpc.StatusCode.OK:
        return "OK"
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


_GO_NAMES = {code: _go_name(code) for code in grpc.StatusCode}


def _code(context: grpc.aio.ServicerContext, fallback: str) -> str:
    """The status the handler set, else `fallback`: OK, Unknown (an exception with no
    status reaches the client as UNKNOWN) or Canceled (the client went away)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return _GO_NAMES[code]
    if isinstance(code, int):
        return next((_GO_NAMES[c] for c in grpc.StatusCode if c.value[0] == code), str(code))
    return fallback


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every RPC (go-grpc-prometheus names), and decisions by action/source."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        # The wrapper depends on the method and its handler only: build it once per
        # method (per call, it cost as much as a quarter of a bare RPC's server CPU).
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(details.method, handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = path.lstrip("/").rpartition("/")
        labels = (_kind(handler), service, method)
        m = self._m
        started, received, sent = (
            m.started.labels(*labels),
            m.received.labels(*labels),
            m.sent.labels(*labels),
        )
        handling = m.handling.labels(*labels)
        handled: dict[str, Counter] = {}  # by code: labels() costs 3x an inc

        def done(context: grpc.aio.ServicerContext, began: float, fallback: str = "OK") -> None:
            handling.observe(time.perf_counter() - began)
            # A call the client abandoned must not touch its context (grpc aio crashes).
            code = fallback if fallback == "Canceled" else _code(context, fallback)
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = m.handled.labels(*labels, code)
            counter.inc()

        def unary(inner: Unary) -> Unary:
            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                received.inc()
                began = time.perf_counter()
                try:
                    response = await inner(request, context)
                except asyncio.CancelledError:
                    done(context, began, "Canceled")
                    raise
                except BaseException:
                    done(context, began, "Unknown")
                    raise
                sent.inc()
                done(context, began)
                return response

            return unary_unary

        def stream(inner: Stream) -> Stream:
            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                started.inc()
                received.inc()
                began, outcome = time.perf_counter(), "Unknown"
                try:
                    async for response in inner(request, context):
                        sent.inc()
                        yield response
                    outcome = "OK"
                except (asyncio.CancelledError, GeneratorExit):
                    outcome = "Canceled"
                    raise
                finally:
                    done(context, began, outcome)

            return unary_stream

        def write_stream(inner: Unary) -> Unary:
            # Handlers that write with context.write (health's Watch): time them only.
            async def written(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                received.inc()
                began, outcome = time.perf_counter(), "Unknown"
                try:
                    result = await inner(request, context)
                    outcome = "OK"
                    return result
                except asyncio.CancelledError:
                    outcome = "Canceled"
                    raise
                finally:
                    done(context, began, outcome)

            return written

        # Client and bidi streams (reflection) come back unwrapped: not counted.
        return wrap_handler(handler, unary, stream, write_stream=write_stream)
