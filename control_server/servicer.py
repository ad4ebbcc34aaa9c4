"""Thin gRPC adapters: decode, call one service function, encode.

Domain errors become status codes here and only here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from control_server import convert
from control_server.domain import DomainError, InvalidArgument, NotFound, StoreUnavailable
from control_server.service import ControlService
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CODES: list[tuple[type[DomainError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
]


async def _handle(
    rpc: str, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]
) -> T:
    try:
        return await call()
    except DomainError as exc:
        code = next((c for kind, c in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
        logger.warning("[%s] %s: %s", rpc, code.name, exc)
        await context.abort(code, str(exc))
    raise AssertionError("unreachable: abort raises")


class TrainingControlServicer(pb_grpc.TrainingControlServicer):  # type: ignore[misc]
    def __init__(self, service: ControlService) -> None:
        self._service = service

    async def ReportEpoch(
        self, request: pb.EpochReport, context: grpc.aio.ServicerContext
    ) -> pb.Decision:
        async def call() -> pb.Decision:
            report = convert.report_from_proto(request)
            return convert.decision_to_proto(await self._service.report_epoch(report))

        return await _handle("ReportEpoch", context, call)


class ControlAdminServicer(pb_grpc.ControlAdminServicer):  # type: ignore[misc]
    def __init__(self, service: ControlService) -> None:
        self._service = service

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        async def call() -> pb.ListRunsResponse:
            runs = self._service.list_runs(convert.run_filter_from_proto(request))
            return pb.ListRunsResponse(runs=[convert.run_summary_to_proto(r) for r in runs])

        return await _handle("ListRuns", context, call)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunResponse:
        async def call() -> pb.GetRunResponse:
            if not request.run_id:
                raise InvalidArgument("run_id", "must not be empty")
            run, epochs = self._service.get_run(request.run_id)
            return pb.GetRunResponse(
                run=convert.run_summary_to_proto(run),
                epochs=[
                    pb.RunEpoch(
                        report=convert.report_to_proto(r), decision=convert.decision_to_proto(d)
                    )
                    for r, d in epochs
                ],
            )

        return await _handle("GetRun", context, call)
