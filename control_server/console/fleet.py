"""The fleet page (being written)."""

from __future__ import annotations

from aiohttp import web

from control_server.console.app import call, render
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()


@routes.get("/")
async def fleet(request: web.Request) -> web.StreamResponse:
    found = await call(request, "ListRuns", pb.ListRunsRequest(limit=1000))
    return render(request, "fleet.html", runs=list(found.runs))
