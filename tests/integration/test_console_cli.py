"""`control-server console` as people start it: a real subprocess against a real server
subprocess, reached over HTTP(S) as a browser would (urllib here; clicking is
tests/browser's)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.cli import build_parser
from tests.certs import make_certs
from tests.conftest import REPO, ServerProcess

URL = re.compile(r"serving on (https?)://([^/]+):(\d+)/ for the server at (\S+)")


class ConsoleProcess:
    """`control-server console` as a subprocess; its URL read back from its first line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_server.cli", "console", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline()
        match = URL.search(self.first_line)
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=20)
            raise AssertionError(f"the console did not start: {self.first_line!r}\n{err}")
        self.scheme, self.host, port, self.server = match.groups()
        self.port = int(port)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}/"

    def terminate(self, timeout: float = 20) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=20)


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    started = ServerProcess("--store", f"sqlite:///{tmp_path}/control.db", cwd=tmp_path)
    yield started
    started.kill()


@pytest.fixture
def consoles() -> Iterator[list[ConsoleProcess]]:
    started: list[ConsoleProcess] = []
    yield started
    for console in started:
        console.kill()


def run_console(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """A console expected to refuse and exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "control_server.cli", "console", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_the_console_prints_its_url_serves_pages_and_stops_cleanly_on_sigterm(
    server: ServerProcess, consoles: list[ConsoleProcess]
) -> None:
    console = ConsoleProcess("--server", server.target, "--listen", "127.0.0.1:0")
    consoles.append(console)
    assert console.scheme == "http" and console.host == "127.0.0.1"
    assert console.server == server.target

    assert fetch(console.url + "healthz") == (200, "ok\n")
    status, page = fetch(console.url)
    assert status == 200, page
    assert "<h1>Fleet</h1>" in page

    code, out, err = console.terminate()
    assert code == 0, err
    assert out.strip().endswith("control-server console: stopped")
    assert "Traceback" not in err and "warning" not in err


def test_the_console_refuses_to_listen_beyond_loopback_without_https() -> None:
    # Refused before it connects to anything: no server needed.
    result = run_console("--server", "127.0.0.1:1", "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0:0" in result.stderr
    assert "--https-cert" in result.stderr and "--insecure" in result.stderr
    assert result.stdout == ""


def test_insecure_lets_the_console_listen_beyond_loopback(
    server: ServerProcess, consoles: list[ConsoleProcess]
) -> None:
    console = ConsoleProcess("--server", server.target, "--listen", "0.0.0.0:0", "--insecure")
    consoles.append(console)
    assert console.host == "0.0.0.0"
    assert fetch(console.url + "healthz") == (200, "ok\n")


def test_the_console_serves_https_and_reaches_a_tls_server(
    tmp_path: Path, consoles: list[ConsoleProcess]
) -> None:
    certs = make_certs(tmp_path)
    tls_server = ServerProcess(
        "--store",
        f"sqlite:///{tmp_path}/control.db",
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        cwd=tmp_path,
    )
    try:
        console = ConsoleProcess(
            "--server",
            tls_server.target,
            "--listen",
            "127.0.0.1:0",
            "--tls-ca",
            str(certs.ca),
            "--https-cert",
            str(certs.server_cert),
            "--https-key",
            str(certs.server_key),
        )
        consoles.append(console)
        assert console.scheme == "https"
        trusting = ssl.create_default_context(cafile=str(certs.ca))
        assert fetch(console.url + "healthz", trusting) == (200, "ok\n")
        status, page = fetch(console.url, trusting)
        assert status == 200, page
        assert "<h1>Fleet</h1>" in page

        # A browser that does not trust the CA gets no page.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(console.url + "healthz", ssl.create_default_context())
        code, _, err = console.terminate()
        assert code == 0, err
        assert "warning" not in err
    finally:
        tls_server.kill()


def test_https_needs_both_certificate_and_key(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    result = run_console("--https-cert", str(certs.server_cert), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "--https-cert and --https-key must be given together" in result.stderr


def test_a_malformed_server_address_is_refused_with_what_is_wrong() -> None:
    result = run_console("--server", "control-host", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "--server must be HOST:PORT, but got 'control-host'" in result.stderr


def test_a_server_that_does_not_answer_is_named_at_start_and_on_the_page(
    tmp_path: Path, consoles: list[ConsoleProcess]
) -> None:
    # A port nobody listens on: bound and closed again.
    gone = ServerProcess("--store", f"sqlite:///{tmp_path}/control.db", cwd=tmp_path)
    gone.terminate()
    console = ConsoleProcess("--server", gone.target, "--listen", "127.0.0.1:0")
    consoles.append(console)
    assert console.proc.stderr is not None
    warning = console.proc.stderr.readline()
    assert f"warning: cannot use the server at {gone.target} (UNAVAILABLE" in warning

    status, page = fetch(console.url)
    assert status == 502
    assert "UNAVAILABLE" in page and gone.target in page
    assert fetch(console.url + "healthz") == (200, "ok\n")


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_starts_the_console_as_the_cli_takes_it_and_lists_every_option() -> None:
    parser = build_parser()
    block = readme_section("The console").split("```sh\n", 1)[1].split("```", 1)[0]
    words = block.split()
    assert words[:2] == [".venv/bin/control-server", "console"]
    args = parser.parse_args(words[1:])
    assert (args.server, args.listen) == ("127.0.0.1:50051", "127.0.0.1:8080")

    console = next(
        action.choices["console"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    # The table right after the heading "`control-server console` (see The console)".
    after = readme_section("Configuration reference").split("`control-server console`", 1)[1]
    table = after.split("\n\n")[1]
    for action in console._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in table, flag
