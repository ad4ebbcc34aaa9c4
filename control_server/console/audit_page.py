"""The audit page: who did what through ControlAdmin, when, and how it ended, newest
first, filtered by actor, action, target and time (a GET form, so a filtered view is
a link one can share)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from control_server.console.app import call, render
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

DEFAULT_LIMIT = 200
#: The server refuses more.
MAX_LIMIT = 5000


def parse_since(text: str) -> datetime | None:
    """A time typed as ISO 8601 ("2026-12-06T01:00", "... 01:00:00Z", a date alone);
    without a zone it is UTC, as every time on these pages."""
    text = text.strip()
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since must be a time such as 2026-12-06T01:00 (UTC), but got {text!r}."
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@routes.get("/audit")
async def audit(request: web.Request) -> web.StreamResponse:
    query = request.query
    filters = {name: query.get(name, "").strip() for name in ("actor", "action", "target")}
    since_text = query.get("since", "").strip()
    errors = []
    try:
        limit = int(query.get("limit", "") or DEFAULT_LIMIT)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        errors.append(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, but got {query.get('limit')!r}."
        )
        limit = DEFAULT_LIMIT
    message = pb.ListAuditEventsRequest(limit=limit, **filters)
    try:
        since = parse_since(since_text)
    except ValueError as error:
        errors.append(str(error))
        since = None
    if since is not None:
        stamp = Timestamp()
        stamp.FromDatetime(since)
        message.since.CopyFrom(stamp)
    found = await call(request, "ListAuditEvents", message)
    events = [
        (event, json.dumps(MessageToDict(event.details), separators=(",", ":"), sort_keys=True))
        for event in found.events
    ]
    return render(
        request,
        "audit.html",
        status=400 if errors else 200,
        events=events,
        filters=filters,
        since=since_text,
        limit=limit,
        errors=errors,
    )
