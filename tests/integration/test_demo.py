"""`make demo` as a newcomer sees it: every kind of decision, the audit, a clean replay."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_demo_shows_interventions_a_rollback_and_a_replayable_audit() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py")],
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
