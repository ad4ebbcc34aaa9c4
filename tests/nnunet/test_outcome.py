"""`make outcome --small` for real: two arms (stock nnU-Net, the default policy), one seed.

The whole benchmark runs as a user runs it (a real server, a policy
experiment, real nnU-Net trainings on the CPU); what is checked is what a user
would notice: the table names both arms with a final Dice, the plot is a PNG,
and the last line is the machine-readable ``outcome:`` one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(400)
def test_small_outcome_prints_the_table_the_plot_and_the_outcome_line(tmp_path: Path) -> None:
    work = tmp_path / "outcome"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "outcome.py"), "--small", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()

    rows = {
        cells[0]: cells
        for line in lines
        if line.startswith("| ")
        and (cells := [c.strip() for c in line.strip("|").split("|")])[0] in ("stock", "seed")
    }
    assert set(rows) == {"stock", "seed"}, result.stdout
    for arm, cells in rows.items():
        assert cells[1] == "1", f"{arm}: one run expected, got {cells}"
        dice = float(cells[2].split("±")[0])
        assert 0.0 <= dice <= 1.0, f"{arm}: final Dice {dice}"

    png = work / "outcome.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000

    assert lines[-1].startswith("outcome: ")
    outcome = json.loads(lines[-1].removeprefix("outcome: "))
    assert set(outcome["arms"]) == {"stock", "seed"}
    for arm in ("stock", "seed"):
        assert math.isfinite(outcome["arms"][arm]["dice_mean"])
        assert outcome["arms"][arm]["runs"] == 1
    assert outcome["failed"] == []
    assert Path(outcome["png"]) == png
