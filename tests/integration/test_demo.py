"""The simulated demo (`demo.py --simulated`): every kind of decision, the audit, a clean replay.

`make demo` itself trains nnU-Net for real (minutes on a CPU); its parts are
tested in tests/nnunet/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO


def test_the_demo_shows_interventions_a_rollback_and_a_replayable_audit(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py"), "--simulated", "--work", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "serving on 127.0.0.1:" in out
    assert "intervention 1 of 3" in out and "intervention 2 of 3" in out
    assert "ROLLBACK" in out and "Divergence guard" in out
    assert "Audit of demo-Dataset042_Disc-2d-fold0 as stored: 40 reports" in out
    assert "0 differ from the record" in out
    # It ends by saying how to see the run in the console, on its own store.
    assert (
        f"control-server serve --listen 127.0.0.1:50051 --store sqlite:///{tmp_path}/control.db"
        in out
    )
    assert "control-server console --server 127.0.0.1:50051 --listen 127.0.0.1:8080" in out
    assert out.rstrip().splitlines()[-1].startswith("Console: http://127.0.0.1:8080/")


def test_the_demo_with_keep_leaves_a_console_that_shows_its_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py"), "--simulated", "--keep",
         "--console-port", "0", "--work", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    kill = re.search(r"stop them with: kill (\d+) (\d+)", result.stdout)
    pids = [int(pid) for pid in kill.groups()] if kill else []
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(pids) == 2, result.stdout
        url = re.search(r"^Console: (http://127\.0\.0\.1:\d+/)", result.stdout, re.M)
        assert url, result.stdout
        with urllib.request.urlopen(url.group(1) + "healthz", timeout=20) as response:
            assert response.read() == b"ok\n"
        # The server has no tokens: the fleet opens without signing in, with the demo's run.
        with urllib.request.urlopen(url.group(1), timeout=20) as response:
            assert response.status == 200
            assert "demo-Dataset042_Disc-2d-fold0" in response.read().decode()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            wait_gone(pid)


def wait_gone(pid: int, timeout: float = 20) -> None:
    """Wait until `pid` (not our child: the demo started it in a session of its own) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_the_simulated_demo_leaves_what_make_demo_made_alone(tmp_path: Path) -> None:
    # The demo in a checkout of its own, so that its default folders (var/ beside
    # demo/) are this test's and not the real checkout's.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "demo", checkout / "demo")
    made = checkout / "var" / "demo"
    (made / "nnunet" / "nnUNet_results").mkdir(parents=True)
    for name in ("control.db", "training.log", "timeline.png", "nnunet/nnUNet_results/log.txt"):
        (made / name).write_text(f"what make demo made: {name}")
    before = sorted((p.relative_to(made), p.read_bytes()) for p in made.rglob("*") if p.is_file())

    result = subprocess.run(
        [sys.executable, str(checkout / "demo" / "demo.py"), "--simulated"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    after = sorted((p.relative_to(made), p.read_bytes()) for p in made.rglob("*") if p.is_file())
    assert after == before
    simulated = checkout / "var" / "demo-simulated" / "control.db"
    assert simulated.is_file()
    assert f"Store: {simulated}" in result.stdout
