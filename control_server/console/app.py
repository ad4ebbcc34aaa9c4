"""The console's web application: sessions and sign-in, page rendering, the live feed
(server-sent events fed by WatchDecisions), static assets, and the mapping of the
server's errors onto pages. The pages themselves live in one module each (`fleet`,
`run_page`, `policies`, `experiments`, `audit_page`, `actions`), each a RouteTableDef.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jinja2
from aiohttp import web

from control_server.console.client import Admin, rpc_error_text, to_dict
from trainer_client.api import control_pb2 as pb

logger = logging.getLogger("control_server.console")

HERE = Path(__file__).parent
COOKIE = "tc_console"
#: A session unused for this long signs its person out.
SESSION_IDLE_S = 12 * 3600
#: Seconds between SSE comments that keep proxies from closing an idle feed.
HEARTBEAT_S = 15.0
#: gRPC status -> the HTTP status a page answers with.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}
#: Paths open without a session.
_OPEN = ("/signin", "/static/", "/healthz")


@dataclass
class Session:
    """One signed-in person: their token (kept only here, in memory), name and role as
    the server told (WhoAmI), and the token their forms must carry (CSRF)."""

    token: str | None
    name: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_used: float = field(default_factory=time.monotonic)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def new(self, session: Session) -> str:
        self._expire()
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = session
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is None or time.monotonic() - session.last_used > SESSION_IDLE_S:
            return None
        session.last_used = time.monotonic()
        return session

    def drop(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._by_id.items() if now - s.last_used > SESSION_IDLE_S]:
            del self._by_id[key]


@dataclass
class Console:
    admin: Admin
    templates: jinja2.Environment
    sessions: Sessions = field(default_factory=Sessions)
    #: Set cookies Secure (the console itself serves HTTPS).
    secure_cookies: bool = False
    #: The live feeds' WatchDecisions readers, ended when the console shuts down.
    feeds: set[asyncio.Task[None]] = field(default_factory=set)


CONSOLE = web.AppKey("console", Console)
#: The signed-in person of a request (None only on the pages open to anyone).
SESSION = web.RequestKey("session", Session)


def console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def session(request: web.Request) -> Session:
    """The signed-in person of a request past the session middleware."""
    return request[SESSION]


async def call(request: web.Request, method: str, message: Any) -> Any:
    """ControlAdmin `method` as the request's signed-in person."""
    return await console(request).admin.call(method, message, session(request).token)


# --- rendering ----------------------------------------------------------------------


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_time
    env.filters["num"] = format_number
    env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
    return env


def format_time(value: Any) -> str:
    """A protobuf Timestamp, a datetime or an RFC 3339 string as "2026-12-06 01:02:03Z"."""
    if value is None or value == "":
        return ""
    if hasattr(value, "ToDatetime"):
        if not value.seconds and not value.nanos:
            return ""
        value = value.ToDatetime(tzinfo=UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    text: str = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return text


def format_number(value: float | None, digits: int = 4) -> str:
    """A metric, LR or weight to `digits` significant digits ("" for None)."""
    if value is None:
        return ""
    return f"{value:.{digits}g}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """`template` with the signed-in person and the CSRF token every form needs."""
    found = request.get(SESSION)
    body = (
        console(request)
        .templates.get_template(template)
        .render(
            session=found,
            csrf=found.csrf if found else "",
            path=request.path_qs,
            # A run's page belongs to the fleet it was opened from.
            nav={"": "fleet", "runs": "fleet"}.get(
                request.path.split("/")[1], request.path.split("/")[1]
            ),
            **context,
        )
    )
    return web.Response(text=body, status=status, content_type="text/html")


def rpc_failure(request: web.Request, error: grpc.aio.AioRpcError) -> web.Response:
    """The server's error as it said it: JSON for scripts and the pages' fetches, else a page."""
    status = HTTP_STATUS.get(error.code(), 502)
    text = rpc_error_text(error)
    if wants_json(request):
        return web.json_response({"error": text, "code": error.code().name}, status=status)
    return render(request, "error.html", status=status, error=text, code=error.code().name)


def wants_json(request: web.Request) -> bool:
    """A script or the pages' own fetches (JSON answers), not a person's browser."""
    return request.path.startswith("/api/") or "application/json" in request.headers.get(
        "Accept", ""
    )


# --- sessions -----------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def sessions_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Find the request's person; send strangers to sign in (a server without tokens
    needs none: WhoAmI answers without one). A form must carry its session's CSRF token."""
    if request.path.startswith(_OPEN):
        known = console(request).sessions.get(request.cookies.get(COOKIE))
        if known is not None:
            request[SESSION] = known
        return _compressed(request, await handler(request))
    found = console(request).sessions.get(request.cookies.get(COOKIE))
    new_cookie = None
    if found is None:
        try:
            found, new_cookie = await _open_session(request)
        except grpc.aio.AioRpcError as error:
            return rpc_failure(request, error)
        if found is None:
            if wants_json(request) or request.method != "GET":
                return web.json_response(
                    {"error": "sign in first", "code": "UNAUTHENTICATED"}, status=401
                )
            raise web.HTTPSeeOther(f"/signin?next={quote(request.path_qs)}")
    request[SESSION] = found
    if request.method == "POST":
        form = await request.post()
        sent = request.headers.get("X-CSRF-Token") or str(form.get("csrf", ""))
        if not secrets.compare_digest(sent, found.csrf):
            return web.json_response(
                {"error": "the form is out of date (CSRF token): reload the page"}, status=403
            )
    try:
        response = await handler(request)
    except grpc.aio.AioRpcError as error:
        response = rpc_failure(request, error)
    if new_cookie is not None:
        _set_cookie(request, response, new_cookie)
    return _compressed(request, response)


def _compressed(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Pages and fragments gzipped for browsers that accept it (the fleet of 1,000 runs
    is 1.7 MB of HTML, 80 KB gzipped); the event stream and assets are left as they are."""
    if (
        isinstance(response, web.Response)
        and not isinstance(response, web.FileResponse)
        and response.body is not None
        and len(response.body) > 1024  # type: ignore[arg-type]
        and "gzip" in request.headers.get("Accept-Encoding", "")
    ):
        response.enable_compression(web.ContentCoding.gzip)
    return response


async def _open_session(request: web.Request) -> tuple[Session | None, str | None]:
    """A session without a token, when the server asks for none."""
    try:
        caller = await console(request).admin.call("WhoAmI", pb.WhoAmIRequest(), None)
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None, None
        raise
    found = Session(token=None, name=caller.name, role=caller.role)
    return found, console(request).sessions.new(found)


def _set_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        secure=console(request).secure_cookies,
        path="/",
    )


async def signin_page(request: web.Request) -> web.StreamResponse:
    return render(request, "signin.html", error="", next=_local(request.query.get("next")))


async def signin(request: web.Request) -> web.StreamResponse:
    """Sign in with one's own token: the server says who it belongs to (WhoAmI)."""
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _local(str(form.get("next", "")))
    if not token:
        return render(request, "signin.html", 400, error="paste your token", next=target)
    try:
        caller = await console(request).admin.call("WhoAmI", pb.WhoAmIRequest(), token)
    except grpc.aio.AioRpcError as error:
        status = HTTP_STATUS.get(error.code(), 502)
        return render(request, "signin.html", status, error=rpc_error_text(error), next=target)
    session_id = console(request).sessions.new(Session(token, caller.name, caller.role))
    logger.info("console: %s (%s) signed in", caller.name, caller.role)
    redirect = web.HTTPSeeOther(target)
    _set_cookie(request, redirect, session_id)
    raise redirect


async def signout(request: web.Request) -> web.StreamResponse:
    console(request).sessions.drop(request.cookies.get(COOKIE))
    redirect = web.HTTPSeeOther("/signin")
    redirect.del_cookie(COOKIE, path="/")
    raise redirect


def _local(target: str | None) -> str:
    """Only a path of this console (no open redirect to another site)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


# --- the live feed ------------------------------------------------------------------


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every decision the server makes (``event: decision``, the
    Decision as JSON), optionally of one run (``?run_id=``), from now on."""
    watch = pb.WatchDecisionsRequest(run_id=request.query.get("run_id", ""))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n: connected\n\n")
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    stream = console(request).admin.watch(watch, session(request).token)

    async def pump() -> None:
        try:
            async for decision in stream:
                data = json.dumps(to_dict(decision), separators=(",", ":"))
                queue.put_nowait(f"event: decision\ndata: {data}\n\n".encode())
        except grpc.aio.AioRpcError as error:
            text = json.dumps(rpc_error_text(error))
            queue.put_nowait(f"event: failure\ndata: {text}\n\n".encode())
        finally:
            queue.put_nowait(b"")  # the stream ended (or the console shuts down)

    task = asyncio.create_task(pump())
    feeds = console(request).feeds
    feeds.add(task)
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                chunk = b": still here\n\n"
            if chunk == b"":
                break
            await response.write(chunk)
    except ConnectionResetError:
        pass  # the page was closed
    finally:
        feeds.discard(task)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await stream.aclose()
    return response


# --- the application ----------------------------------------------------------------


def make_app(admin: Admin, *, secure_cookies: bool = False) -> web.Application:
    """The console over `admin`; closing the app closes the channel."""
    from control_server.console import actions, audit_page, experiments, fleet, policies, run_page

    app = web.Application(middlewares=[sessions_middleware])
    templates = _templates()
    app[CONSOLE] = Console(admin, templates, secure_cookies=secure_cookies)
    app.router.add_get("/signin", signin_page)
    app.router.add_post("/signin", signin)
    app.router.add_post("/signout", signout)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/events", events)
    assets = app.router.add_static("/static", HERE / "static", append_version=True)
    # Versioned URLs (?v=hash), so a browser never runs an old script with a new page.
    templates.globals["static"] = lambda name: str(assets.url_for(filename=name))
    for module in (fleet, run_page, policies, experiments, audit_page, actions):
        app.router.add_routes(module.routes)

    async def end_feeds(app: web.Application) -> None:
        # An open page's event stream would otherwise hold shutdown until it next writes.
        for task in list(app[CONSOLE].feeds):
            task.cancel()

    async def close_channel(app: web.Application) -> None:
        await app[CONSOLE].admin.close()

    app.on_shutdown.append(end_feeds)
    app.on_cleanup.append(close_channel)
    return app


@dataclass(frozen=True)
class RunningConsole:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_console(
    admin: Admin,
    listen: str,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> RunningConsole:
    """Serve the console on `listen` (HOST:PORT, port 0: any free one); HTTPS with a
    certificate and key."""
    context = None
    if tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    app = make_app(admin, secure_cookies=context is not None)
    # handler_cancellation: a page that leaves ends its event stream's handler at once.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]") or None, int(port), ssl_context=context)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else int(port)
    return RunningConsole(runner, bound)
