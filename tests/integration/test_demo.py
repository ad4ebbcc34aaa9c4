"""The simulated demo (`demo.py --simulated`): every kind of decision, the audit, a clean replay.

`make demo` itself trains nnU-Net for real (minutes on a CPU); its parts are
tested in tests/nnunet/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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
