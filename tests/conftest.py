"""Shared fixtures: real servers on ephemeral ports, real stores on disk, PostgreSQL
databases (test data builders: tests/factories.py)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import settings

from control_server.app import RunningServer, ServerConfig, start_server
from control_server.store import open_store
from tests.pg import empty_tables, fresh_database, system_admin_url
from trainer_client.api import control_pb2_grpc as pb_grpc

# Shared 2-core machines stall now and then: judge properties, not timing.
settings.register_profile("shared-machine", deadline=None, print_blob=True)
settings.load_profile("shared-machine")


class ServerThread:
    """A real aio server in its own thread and event loop, as a replica would run."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(config))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.running.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers on port 0 with a SQLite store under tmp_path; all stopped at the end."""
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        config = ServerConfig(listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/control.db")
        server = ServerThread(replace(config, **overrides))
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A new PostgreSQL database for the module (migrated by the first store opened on
    it), on the system server: skipped without it, failed with CI=true (tests/pg.py)."""
    with fresh_database(system_admin_url()) as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The module's PostgreSQL database, migrated and emptied for this test."""
    open_store(pg_database).close()
    empty_tables(pg_database)
    return pg_database


@pytest.fixture
def pg_fresh_url() -> Iterator[str]:
    """A new PostgreSQL database of this test's own, not migrated yet; dropped after."""
    with fresh_database(system_admin_url()) as url:
        yield url


@dataclass
class Stubs:
    channel: grpc.Channel
    control: pb_grpc.TrainingControlStub
    admin: pb_grpc.ControlAdminStub


@pytest.fixture
def stubs(server: ServerThread) -> Iterator[Stubs]:
    channel = grpc.insecure_channel(server.target)
    yield Stubs(channel, pb_grpc.TrainingControlStub(channel), pb_grpc.ControlAdminStub(channel))
    channel.close()


REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving on [^:]+:(\d+)")


class ServerProcess:
    """`control-server serve` as a real subprocess (port 0, read back from its output)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_server.cli", "serve", "--listen", "127.0.0.1:0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            match = SERVING.search(line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.target = f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 20) -> tuple[int, str]:
        """SIGTERM, wait, and return (exit code, the rest of its output)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=20)
