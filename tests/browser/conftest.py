"""Browser tests of the console: a real server (port 0, SQLite), real runs (the
simulator through real gRPC), the real console on port 0, and Debian's Chromium
driven by Playwright through ``executable_path`` (Playwright's own browser download
is never used). Without Chromium these tests skip here, and fail in CI (CI=true),
where `.ci/run` installs it.

Screenshots for people to look at land in var/console/ (ignored by git).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from control_server.console.app import RunningConsole, start_console
from control_server.console.client import Admin
from tests.conftest import REPO, ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.config import ClientConfig
from trainer_client.sim import SimulatedRun

SCREENSHOTS = REPO / "var" / "console"
#: What the environment checks showed Chromium needs as root in a container with no
#: network: no sandbox, no GPU, and none of its background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds a page may take to show what a test waits for (live updates: < 1 s
#: on an idle machine; CI's 2 shared cores get slack).
WAIT_MS = 10_000


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one test module. Not for the session: Playwright's sync API keeps an
    event loop running in this thread while it is open, and later tests that call
    asyncio.run() would fail."""
    path = chromium_path()
    if path is None:
        message = "Chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    yield opened
    context.close()


class ConsoleThread:
    """`control-server console` in its own thread and event loop, on port 0."""

    def __init__(self, target: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> RunningConsole:
            return await start_console(Admin(ClientConfig(target=target)), "127.0.0.1:0")

        self.running: RunningConsole = self._call(start())
        self.url = f"http://127.0.0.1:{self.running.port}"

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        self._call(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def make_console() -> Iterator[Callable[[ServerThread], ConsoleThread]]:
    """Start consoles for servers; all stopped at the end."""
    started: list[ConsoleThread] = []

    def make(server: ServerThread) -> ConsoleThread:
        console = ConsoleThread(server.target)
        started.append(console)
        return console

    yield make
    for console in started:
        console.stop()


@dataclass
class Trainer:
    """Simulated trainings reporting to a server over real gRPC, epoch by epoch."""

    channel: grpc.Channel
    control: pb_grpc.TrainingControlStub
    admin: pb_grpc.ControlAdminStub
    #: The trainer token's authorization metadata (empty without tokens).
    metadata: tuple[tuple[str, str], ...] = ()

    def start(self, run: SimulatedRun) -> pb.StartRunResponse:
        request = pb.StartRunRequest(
            run_id=run.state.run_id,
            labels=pb.RunLabels(**run.state.labels),
            initial_lr=run.state.initial_lr,
            loss_weights=dict(run.state.loss_weights),
            trainer_name="SimulatedRun",
        )
        response: pb.StartRunResponse = self.control.StartRun(
            request, timeout=10, metadata=self.metadata
        )
        return response

    def step(self, run: SimulatedRun) -> pb.Decision:
        """One epoch: report it, apply the decision."""
        decision: pb.Decision = self.control.ReportEpoch(
            run.next_report(), timeout=10, metadata=self.metadata
        )
        run.apply(decision)
        return decision

    def train(self, run: SimulatedRun, epochs: int | None = None) -> list[pb.Decision]:
        """`epochs` more epochs (all that are left when None)."""
        decisions = []
        while not run.done and (epochs is None or len(decisions) < epochs):
            decisions.append(self.step(run))
        return decisions

    def finish(
        self, run: SimulatedRun, status: int = pb.COMPLETED, dice: float = 0.8, error: str = ""
    ) -> None:
        """FinishRun; a FAILED run must say what went wrong (`error`)."""
        self.control.FinishRun(
            pb.FinishRunRequest(
                run_id=run.state.run_id,
                status=status,
                error=error,
                metrics=pb.FinalMetrics(mean_dice=dice),
            ),
            timeout=10,
            metadata=self.metadata,
        )


@pytest.fixture
def make_trainer() -> Iterator[Callable[..., Trainer]]:
    """Trainers for a server, optionally with a trainer token."""
    channels: list[grpc.Channel] = []

    def make(server: ServerThread, token: str | None = None) -> Trainer:
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return Trainer(
            channel,
            pb_grpc.TrainingControlStub(channel),
            pb_grpc.ControlAdminStub(channel),
            metadata,
        )

    yield make
    for channel in channels:
        channel.close()


def screenshot(page: Page, name: str) -> Path:
    """Save what the page shows now, whole, as var/console/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
