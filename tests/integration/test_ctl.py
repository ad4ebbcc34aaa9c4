"""`controlctl` against a real server: every command, its output, exports and exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_server import ctl
from control_server.auth import Role
from control_server.ctl.render import EXPORT_FIELDS
from control_server.policy.document import parse_policy_yaml
from control_server.policy_files import default_policy
from control_server.tokens import create_token
from tests.certs import make_certs
from tests.conftest import REPO, ServerThread
from tests.factories import epoch_report
from tests.integration.test_readme_grpcurl import readme_section
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

EAGER_YAML = "name: eager\nplateau: {patience: 1, cooldown: 0, warmup_epochs: 2}\n"
EAGER_VERSION = parse_policy_yaml(EAGER_YAML).version
DEFAULT_VERSION = default_policy().version
LABELS = pb.RunLabels(dataset="Dataset042_Disc", configuration="2d", fold="0")


@dataclass
class Result:
    code: int
    out: str
    err: str


Ctl = Callable[..., Result]


@pytest.fixture
def run_ctl(capsys: pytest.CaptureFixture[str]) -> Ctl:
    """Run `controlctl ARGS` in-process against `target`; no traceback, ever."""

    def run(target: str, *args: str, env: dict[str, str] | None = None) -> Result:
        capsys.readouterr()
        code = ctl.main(["--server", target, *args], env=env or {})
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Result(code, out, err)

    return run


@pytest.fixture
def eager_file(tmp_path: Path) -> Path:
    path = tmp_path / "eager.yaml"
    path.write_text(EAGER_YAML)
    return path


@pytest.fixture
def admin(server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def flat_run(channel: Any, run_id: str, epochs: range, **labels: str) -> list[pb.Decision]:
    """A run whose loss never improves, applying the LR it is told, as a trainer does."""
    stub = pb_grpc.TrainingControlStub(channel)
    lr, count, decisions = 0.001, 0, []
    for epoch in epochs:
        d = stub.ReportEpoch(
            epoch_report(
                run_id,
                epoch,
                val_loss=0.5,
                current_lr=lr,
                intervention_count=count,
                labels=pb.RunLabels(**labels) if labels else LABELS,
            )
        )
        if d.action == pb.INTERVENE and d.HasField("lr"):
            lr, count = d.lr, max(count, d.intervention_index)
        decisions.append(d)
    return decisions


def test_runs_and_run_show_the_timeline(
    make_server: Callable[..., ServerThread], eager_file: Path, run_ctl: Ctl
) -> None:
    server = make_server(policy_file=eager_file)
    with grpc.insecure_channel(server.target) as channel:
        decisions = flat_run(channel, "run-a", range(5))
        flat_run(channel, "run-b", range(2), dataset="Dataset007_Other", configuration="3d")
    assert pb.INTERVENE in [d.action for d in decisions]

    listed = run_ctl(server.target, "runs")
    assert listed.code == 0
    header, *rows = listed.out.splitlines()
    assert header.split("  ")[0] == "RUN" and "LAST ACTION" in header
    assert [r.split()[0] for r in rows] == ["run-b", "run-a"]  # most recently active first
    assert "Dataset042_Disc/2d/0" in rows[1] and " 4 " in rows[1]

    only = run_ctl(server.target, "runs", "--dataset", "Dataset007_Other", "--limit", "5")
    assert [r.split()[0] for r in only.out.splitlines()[1:]] == ["run-b"]
    as_json = json.loads(run_ctl(server.target, "runs", "--json").out)
    assert {r["run_id"] for r in as_json["runs"]} == {"run-a", "run-b"}

    shown = run_ctl(server.target, "run", "run-a")
    assert shown.code == 0
    assert "labels         dataset=Dataset042_Disc configuration=2d fold=0" in shown.out
    lines = shown.out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("EPOCH"))
    timeline = lines[start + 1 : start + 6]
    assert [line.split()[0] for line in timeline] == ["0", "1", "2", "3", "4"]
    intervened = next(line for line in timeline if "INTERVENE #1" in line)
    assert "POLICY" in intervened and "Plateau" in intervened
    got = json.loads(run_ctl(server.target, "run", "run-a", "--json").out)
    assert [e["decision"]["decision_id"] for e in got["epochs"]] == [
        d.decision_id for d in decisions
    ]


def test_runs_show_status_attempts_and_final_dice_and_run_follows_pages(
    server: ServerThread, admin: Any, run_ctl: Ctl
) -> None:
    control = pb_grpc.TrainingControlStub(admin)
    start = pb.StartRunRequest(run_id="run-long", labels=LABELS, initial_lr=0.01)
    control.StartRun(start)
    flat_run(admin, "run-long", range(1003))  # more epochs than GetRun's default page
    start.resume_from_epoch = 1001  # a resume: attempt 2 supersedes epoch 1002
    control.StartRun(start)
    flat_run(admin, "run-long", range(1002, 1003))
    flat_run(admin, "run-done", range(3))
    control.FinishRun(
        pb.FinishRunRequest(
            run_id="run-done", status=pb.COMPLETED, metrics=pb.FinalMetrics(mean_dice=0.8123)
        )
    )

    listed = run_ctl(server.target, "runs")
    header, *rows = listed.out.splitlines()
    for column in ("STATUS", "ATTEMPT", "ROLLBACKS", "BEST", "FINAL DICE"):
        assert column in header
    done = next(r for r in rows if r.startswith("run-done"))
    assert " completed " in done and "0.8123" in done
    long = next(r for r in rows if r.startswith("run-long"))
    assert " active " in long and " 2 " in long
    completed = run_ctl(server.target, "runs", "--status", "completed")
    assert [r.split()[0] for r in completed.out.splitlines()[1:]] == ["run-done"]
    bad = run_ctl(server.target, "runs", "--status", "sleeping")
    assert bad.code == 2 and "--status" in bad.err

    shown = run_ctl(server.target, "run", "run-long")
    assert shown.code == 0
    assert "status         active, attempt 2" in shown.out
    assert "attempts (1 superseded epochs kept)" in shown.out
    assert "resume after 1001" in shown.out
    got = json.loads(run_ctl(server.target, "run", "run-long", "--json").out)
    assert [int(e["report"].get("epoch", 0)) for e in got["epochs"]] == list(range(1003))
    assert [e["decision"].get("attempt") for e in got["epochs"][-2:]] == [1, 2]
    assert len(got["superseded"]) == 1 and "next_page_token" not in got


def test_run_plot_is_a_png_with_the_decisions(
    make_server: Callable[..., ServerThread], eager_file: Path, run_ctl: Ctl, tmp_path: Path
) -> None:
    server = make_server(policy_file=eager_file)
    with grpc.insecure_channel(server.target) as channel:
        flat_run(channel, "run-a", range(4))
        admin = pb_grpc.ControlAdminStub(channel)
        admin.SetOverride(pb.SetOverrideRequest(run_id="run-a", lr=0.002, once=True, reason="x"))
        flat_run(channel, "run-a", range(4, 7))
    png = tmp_path / "run-a.png"
    result = run_ctl(server.target, "run", "run-a", "--plot", str(png))
    assert result.code == 0 and f"wrote {png}" in result.err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a drawn figure, not an empty canvas


def test_overrides_set_list_clear(server: ServerThread, admin: Any, run_ctl: Ctl) -> None:
    flat_run(admin, "run-a", range(1))
    once = run_ctl(
        server.target,
        "override",
        "set",
        "run-a",
        "--lr",
        "0.002",
        "--weights",
        "dice=0.6,focal=0.4",
        "--once",
        "--reason",
        "try a lower LR",
    )
    assert once.code == 0
    assert "override #1 on run-a: lr=0.002, weights=dice=0.6,focal=0.4, once" in once.out
    assert "(by anonymous): try a lower LR" in once.out
    active = run_ctl(server.target, "overrides").out.splitlines()
    assert active[0].split()[:3] == ["ID", "RUN", "LR"]
    assert active[1].split()[:4] == ["1", "run-a", "0.002", "dice=0.6,focal=0.4"]

    (applied,) = flat_run(admin, "run-a", range(1, 2))
    assert applied.source == pb.OVERRIDE and applied.lr == pytest.approx(0.002)
    assert run_ctl(server.target, "overrides").out.splitlines()[1:] == []  # consumed
    history = run_ctl(server.target, "overrides", "--run", "run-a", "--all").out.splitlines()
    assert len(history) == 2 and " by " in history[1]

    held = run_ctl(server.target, "override", "set", "run-a", "--hold", "--reason", "ablation")
    assert "hold interventions, until cleared" in held.out
    assert "override" in run_ctl(server.target, "run", "run-a").out.split("\n\n")[-1]
    cleared = run_ctl(server.target, "override", "clear", "run-a")
    assert cleared.out.strip() == "cleared the override of run-a"
    again = run_ctl(server.target, "override", "clear", "run-a")
    assert again.code == 0 and again.out.strip() == "run-a had no active override"


def test_override_stop_rollback_unknown_runs_and_the_lr_cap(
    server: ServerThread, admin: Any, run_ctl: Ctl
) -> None:
    def override(*args: str) -> Result:
        return run_ctl(server.target, "override", "set", *args)

    typo = override("run-z", "--lr", "0.002", "--reason", "lower")
    assert typo.code == 2 and typo.err.startswith("controlctl: NOT_FOUND: run 'run-z' ")
    assert "--allow-unknown-run" in typo.err
    early = override("run-z", "--lr", "0.002", "--allow-unknown-run", "--reason", "lower")
    assert early.out.startswith("override #1 on run-z: lr=0.002, until cleared")

    flat_run(admin, "run-a", range(1))  # initial_lr 0.01: the default policy's cap
    capped = override("run-a", "--lr", "0.05", "--reason", "warm restart")
    assert capped.code == 2
    assert capped.err.startswith("controlctl: INVALID_ARGUMENT: lr: must be at most 0.01")
    raised = override("run-a", "--lr", "0.05", "--exceed-lr-cap", "--reason", "warm restart")
    assert raised.out.startswith("override #2 on run-a: lr=0.05, above the policy's LR cap")

    stop = override("run-a", "--stop", "--reason", "bad labels")
    assert stop.code == 0
    assert stop.out.splitlines() == [
        "override #3 on run-a: STOP at the next report (by anonymous): bad labels",
        "replaced override #2, which was active",
    ]
    table = run_ctl(server.target, "overrides", "--run", "run-a").out.splitlines()
    assert table[0].split()[6:8] == ["ACTION", "LR>CAP"]
    assert table[1].split()[:8] == ["3", "run-a", "-", "-", "no", "yes", "STOP", "no"]

    both = override("run-a", "--stop", "--rollback", "--reason", "x")
    assert both.code == 2 and "not allowed with argument" in both.err
    mixed = override("run-a", "--stop", "--lr", "0.001", "--reason", "x")
    assert mixed.code == 2
    assert mixed.err.startswith("controlctl: INVALID_ARGUMENT: lr: must not be set with action")
    nothing = override("run-a", "--rollback", "--reason", "undo")
    assert nothing.code == 2 and nothing.err.startswith("controlctl: FAILED_PRECONDITION: ")
    assert "no intervention to roll back" in nothing.err

    flat_run(admin, "run-b", range(6))  # the default policy intervenes at epoch 5
    rollback = override("run-b", "--rollback", "--reason", "undo")
    assert rollback.out.startswith(
        "override #4 on run-b: ROLLBACK at the next report, restoring lr=0.001, "
        "weights=ce=1,dice=1 (by anonymous): undo"
    )


def test_override_errors_name_the_culprit(server: ServerThread, run_ctl: Ctl) -> None:
    bad = run_ctl(server.target, "override", "set", "r", "--weights", "dice:1", "--reason", "x")
    assert bad.code == 2
    assert bad.err.strip() == (
        "controlctl: --weights: expected NAME=NUMBER[,NAME=NUMBER...], but got 'dice:1'"
    )
    unknown = run_ctl(
        server.target, "override", "set", "r", "--weights", "dice=1,tversky=1", "--reason", "x"
    )
    assert unknown.code == 2
    assert unknown.err.startswith("controlctl: INVALID_ARGUMENT: ")
    assert "tversky" in unknown.err


def test_policy_push_activate_show_list_diff(
    server: ServerThread, run_ctl: Ctl, eager_file: Path, tmp_path: Path
) -> None:
    pushed = run_ctl(server.target, "policy", "push", str(eager_file), "--activate")
    assert pushed.code == 0
    assert pushed.out.splitlines() == [
        f"stored policy {EAGER_VERSION} (eager)",
        f"activated policy {EAGER_VERSION} (eager)",
    ]
    again = run_ctl(server.target, "policy", "push", str(eager_file))
    assert again.out.strip() == f"already stored: policy {EAGER_VERSION} (eager)"

    listed = run_ctl(server.target, "policy", "list").out.splitlines()
    assert listed[0].split() == ["VERSION", "NAME", "CREATED", "(UTC)", "STATUS", "PINS"]
    assert listed[1].split()[:2] == [DEFAULT_VERSION, "default"]
    assert listed[1].split()[4] == "-"
    assert listed[2].split()[:2] == [EAGER_VERSION, "eager"]
    assert listed[2].split()[4] == "active"

    shown = run_ctl(server.target, "policy", "show").out
    assert shown.startswith(f"# policy {EAGER_VERSION}, created ")
    assert "  patience: 1\n" in shown
    # What `show` prints is a policy file again: the same document, the same version.
    assert parse_policy_yaml(shown).version == EAGER_VERSION
    default_text = run_ctl(server.target, "policy", "show", DEFAULT_VERSION).out
    assert parse_policy_yaml(default_text) == default_policy()

    diff = run_ctl(server.target, "policy", "diff", DEFAULT_VERSION, str(eager_file))
    assert diff.code == 0
    lines = diff.out.splitlines()
    assert lines[:2] == [f"--- {DEFAULT_VERSION} (default)", f"+++ {eager_file}"]
    assert {"-name: default", "+name: eager", "-  patience: 3", "+  patience: 1"} <= set(lines)
    assert "   min_delta: 0.01" in lines  # unchanged context, not a whole-section rewrite
    same = run_ctl(server.target, "policy", "diff", EAGER_VERSION, str(eager_file))
    assert same.out == "" and "are the same document" in same.err

    round_trip = tmp_path / "shown.yaml"
    round_trip.write_text(default_text)
    back = run_ctl(server.target, "policy", "activate", DEFAULT_VERSION)
    assert back.out.strip() == f"activated policy {DEFAULT_VERSION} (default)"
    pushed_back = run_ctl(server.target, "policy", "push", str(round_trip))
    assert pushed_back.out.strip() == f"already stored: policy {DEFAULT_VERSION} (default)"


def test_a_bad_policy_file_names_the_field_and_changes_nothing(
    server: ServerThread, run_ctl: Ctl, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nplateau: {patience: -1}\n")
    pushed = run_ctl(server.target, "policy", "push", str(bad), "--activate")
    assert pushed.code == 2 and pushed.out == ""
    assert pushed.err.strip() == (
        "controlctl: INVALID_ARGUMENT: plateau.patience: must be >= 0, but got -1"
    )
    assert run_ctl(server.target, "policy", "show").out.startswith(f"# policy {DEFAULT_VERSION}")
    diffed = run_ctl(server.target, "policy", "diff", str(bad), DEFAULT_VERSION)
    assert diffed.code == 2
    assert diffed.err.strip() == f"controlctl: {bad}: plateau.patience: must be >= 0, but got -1"
    missing = run_ctl(server.target, "policy", "push", str(tmp_path / "nope.yaml"))
    assert missing.code == 2 and "cannot read" in missing.err
    unknown = run_ctl(server.target, "policy", "activate", "0123456789ab")
    assert unknown.code == 2 and unknown.err.startswith("controlctl: NOT_FOUND: ")


def test_pin_unpin_shadow_and_its_summary(
    server: ServerThread, admin: Any, run_ctl: Ctl, eager_file: Path
) -> None:
    run_ctl(server.target, "policy", "push", str(eager_file))
    pinned = run_ctl(
        server.target, "policy", "pin", EAGER_VERSION, "--dataset", "Dataset042_Disc", "--fold", "0"
    )
    assert pinned.out.strip() == (
        f"pinned policy {EAGER_VERSION} (eager) to dataset=Dataset042_Disc,fold=0"
    )
    listed = run_ctl(server.target, "policy", "list").out
    assert "dataset=Dataset042_Disc,fold=0" in listed
    (decision,) = flat_run(admin, "pinned-run", range(1))
    assert decision.policy_version == EAGER_VERSION
    unpinned = run_ctl(
        server.target, "policy", "unpin", "--dataset", "Dataset042_Disc", "--fold", "0"
    )
    assert unpinned.out.strip() == "unpinned dataset=Dataset042_Disc,fold=0"
    none = run_ctl(server.target, "policy", "unpin", "--dataset", "Dataset042_Disc")
    assert none.code == 0 and none.out.strip() == "no pin for dataset=Dataset042_Disc"

    shadow = run_ctl(server.target, "policy", "shadow", EAGER_VERSION)
    assert shadow.out.strip() == f"shadowing policy {EAGER_VERSION}"
    assert "active,shadow" not in run_ctl(server.target, "policy", "list").out
    flat_run(admin, "shadowed", range(6))
    summary = run_ctl(server.target, "policy", "shadow-summary").out.splitlines()
    assert summary[0].startswith(f"shadow policy {EAGER_VERSION}: 6 reports evaluated, ")
    assert summary[1].split() == ["REAL->SHADOW", "COUNT"]
    assert any(line.startswith("NONE->INTERVENE") for line in summary[2:])
    shown = run_ctl(server.target, "run", "shadowed").out
    assert f"shadow decisions (policy {EAGER_VERSION};" in shown
    assert run_ctl(server.target, "policy", "shadow", "--off").out.strip() == "no shadow policy"
    neither = run_ctl(server.target, "policy", "shadow")
    assert neither.code == 2 and "give a VERSION or --off" in neither.err


def test_decisions_table_csv_jsonl_and_filters(
    make_server: Callable[..., ServerThread], eager_file: Path, run_ctl: Ctl, tmp_path: Path
) -> None:
    server = make_server(policy_file=eager_file)
    with grpc.insecure_channel(server.target) as channel:
        made = flat_run(channel, "run-a", range(5)) + flat_run(channel, "run-b", range(2))
    target = server.target

    listed = run_ctl(target, "decisions").out.splitlines()
    assert listed[0].startswith("DECIDED (UTC)") and len(listed) == 1 + len(made)

    exported = run_ctl(target, "decisions", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.out)))
    assert tuple(rows[0]) == EXPORT_FIELDS
    assert [r["decision_id"] for r in rows] == [d.decision_id for d in made]
    intervened = next(r for r in rows if r["action"] == "INTERVENE")
    assert intervened["source"] == "POLICY" and intervened["intervention_index"] == "1"
    assert float(intervened["lr"]) > 0.001 and intervened["policy_version"] == EAGER_VERSION
    assert rows[0]["lr"] == "" and rows[0]["decided_at"].endswith("Z")

    lines = run_ctl(target, "decisions", "--run", "run-a", "--format", "jsonl").out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert set(records[0]) == set(EXPORT_FIELDS) and records[0]["lr"] is None

    only = run_ctl(
        target, "decisions", "--action", "intervene", "--source", "POLICY", "--format", "jsonl"
    ).out.splitlines()
    assert {json.loads(line)["action"] for line in only} == {"INTERVENE"}
    assert (
        len(run_ctl(target, "decisions", "--limit", "3", "--format", "jsonl").out.splitlines()) == 3
    )
    assert run_ctl(target, "decisions", "--since", "2100-01-01", "--format", "jsonl").out == ""
    recent = run_ctl(
        target, "decisions", "--since", "1h", "--until", "2100-01-01T00:00:00Z", "--format", "jsonl"
    )
    assert len(recent.out.splitlines()) == len(made)

    out = tmp_path / "decisions.csv"
    written = run_ctl(target, "decisions", "--format", "csv", "--output", str(out))
    assert written.out == "" and f"wrote {len(made)} decisions to {out}" in written.err
    assert out.read_text() == exported.out

    bad_time = run_ctl(target, "decisions", "--since", "yesterday")
    assert bad_time.code == 2 and "argument --since: expected an ISO 8601 time" in bad_time.err


def test_decisions_are_fetched_in_pages(
    server: ServerThread, admin: Any, run_ctl: Ctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = flat_run(admin, "run-a", range(8))
    monkeypatch.setattr("control_server.ctl.commands.PAGE_SIZE", 3)
    lines = run_ctl(server.target, "decisions", "--format", "jsonl").out.splitlines()
    assert [json.loads(line)["decision_id"] for line in lines] == [d.decision_id for d in made]
    limited = run_ctl(server.target, "decisions", "--format", "jsonl", "--limit", "5").out
    assert len(limited.splitlines()) == 5


def test_error_exit_codes(
    make_server: Callable[..., ServerThread], run_ctl: Ctl, tmp_path: Path
) -> None:
    server = make_server()
    unknown = run_ctl(server.target, "run", "nope")
    assert unknown.code == 2
    assert unknown.err.strip() == "controlctl: NOT_FOUND: run 'nope' is not recorded"
    assert unknown.out == ""

    # A port nothing listens on: the server's own, once it is stopped.
    down = make_server(store_url=f"sqlite:///{tmp_path}/down.db")
    address = down.target
    down.stop()
    unreachable = run_ctl(address, "--timeout", "2", "runs")
    assert unreachable.code == 1 and unreachable.err.startswith("controlctl: UNAVAILABLE: ")

    bad_env = run_ctl(server.target, "runs", env={"TRAINCTL_TLS": "maybe"})
    assert bad_env.code == 2 and "TRAINCTL_TLS" in bad_env.err


def test_tokens_from_the_environment_or_a_file(
    make_server: Callable[..., ServerThread], run_ctl: Ctl, tmp_path: Path
) -> None:
    auth_file = tmp_path / "tokens.json"
    operator, _ = create_token(auth_file, "alice", Role.OPERATOR)
    admin_token, _ = create_token(auth_file, "root", Role.ADMIN)
    server = make_server(auth_file=auth_file, store_url=f"sqlite:///{tmp_path}/auth.db")

    anonymous = run_ctl(server.target, "runs")
    assert anonymous.code == 3 and anonymous.err.startswith("controlctl: UNAUTHENTICATED: ")
    assert run_ctl(server.target, "runs", env={"TRAINCTL_TOKEN": operator}).code == 0
    token_file = tmp_path / "operator.token"
    token_file.write_text(operator + "\n")
    denied = run_ctl(server.target, "--token-file", str(token_file), "policy", "activate", "x")
    assert denied.code == 3 and denied.err.startswith("controlctl: PERMISSION_DENIED: ")
    # --token-file wins over TRAINCTL_TOKEN; the actor is the token's name.
    env = {"TRAINCTL_TOKEN": admin_token}
    set_ = run_ctl(
        server.target,
        "--token-file",
        str(token_file),
        "override",
        "set",
        "r",
        "--hold",
        "--allow-unknown-run",
        "--reason",
        "x",
        env=env,
    )
    assert "(by alice)" in set_.out
    assert run_ctl(server.target, "policy", "shadow", "--off", env=env).code == 0


def _controlctl(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "control_server.ctl", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _wait_until_watching(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the watch is live once this is printed
    assert "watching decisions" in line, line


def test_watch_prints_the_decisions_of_later_reports(server: ServerThread, admin: Any) -> None:
    proc = _controlctl(
        "--server", server.target, "watch", "--run", "run-w", "--count", "2", "--format", "jsonl"
    )
    try:
        _wait_until_watching(proc)
        flat_run(admin, "other-run", range(1))
        made = flat_run(admin, "run-w", range(2))
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(line)["decision_id"] for line in out.splitlines()] == [
        d.decision_id for d in made
    ]


def test_watch_lines_and_ctrl_c(server: ServerThread, admin: Any) -> None:
    proc = _controlctl("--server", server.target, "watch", "--action", "NONE")
    try:
        _wait_until_watching(proc)
        (made,) = flat_run(admin, "run-w", range(1))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err
    assert "  run-w  epoch 0  NONE (POLICY)  " in line
    assert f"policy {made.policy_version}  {made.reason}" in line
    assert rest == ""


def test_every_readme_controlctl_line_works(
    server: ServerThread, admin: Any, run_ctl: Ctl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = readme_section("controlctl")
    lines = [line for line in section.splitlines() if line.startswith("controlctl ")]
    monkeypatch.chdir(tmp_path)
    candidate = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "candidate.yaml").write_text(candidate)
    run_id = "Dataset042_Disc-2d-fold0"
    flat_run(admin, run_id, range(8))  # the default policy intervenes at epoch 5
    outputs: dict[str, str] = {}
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] == "watch":
            proc = _controlctl("--server", server.target, *args)
            try:
                _wait_until_watching(proc)
                (made,) = flat_run(admin, run_id, range(8, 9))
                assert proc.stdout is not None
                outputs[line] = proc.stdout.readline()
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=30)
            finally:
                proc.kill()
            assert proc.returncode == 0
            assert f"  {run_id}  epoch 8  " in outputs[line] and made.reason in outputs[line]
            continue
        result = run_ctl(server.target, *args)
        assert result.code == 0, f"{line}\n{result.err}"
        outputs[line] = result.out
    version = parse_policy_yaml(candidate).version
    assert f"controlctl policy activate {version}" in lines  # the README quotes the real hash

    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exported = list(csv.DictReader(io.StringIO((tmp_path / "decisions.csv").read_text())))
    assert [int(r["epoch"]) for r in exported] == list(range(8))
    interventions = [
        json.loads(line)
        for command, out in outputs.items()
        if "--format jsonl" in command
        for line in out.splitlines()
    ]
    assert [(d["epoch"], d["action"]) for d in interventions] == [(5, "INTERVENE")]
    pushed = next(out for command, out in outputs.items() if "policy push" in command)
    assert pushed.strip() == f"stored policy {version} (candidate)"
    diff = next(out for command, out in outputs.items() if "policy diff" in command)
    assert "+  patience: 2" in diff.splitlines()
    listed = next(out for command, out in outputs.items() if command.endswith("policy list"))
    assert f"{version}  candidate" in listed and "active" in listed.splitlines()[-1]
    effects = next(out for command, out in outputs.items() if "controlctl effects" in command)
    assert effects.startswith("1 interventions, overrides and rollbacks in 1 runs"), effects
    kinds = effects.split("\nKIND ", 1)[1].splitlines()
    assert kinds[1].split()[:2] == ["1", "1"]  # the intervention of epoch 5, kind 1
    experiments = next(out for command, out in outputs.items() if "experiment list" in command)
    assert "patience-2" in experiments
    report = next(out for command, out in outputs.items() if "experiment report" in command)
    assert "none (baseline)" in report and "candidate" in report
    stub = pb_grpc.ControlAdminStub(admin)
    [ended] = stub.ListExperiments(pb.ListExperimentsRequest(include_ended=True)).experiments
    assert (ended.status, ended.promoted_arm) == (pb.ENDED, "candidate")
    pinned = stub.GetPolicy(pb.GetPolicyRequest(version=version))
    assert [p.dataset for p in pinned.pins] == ["Dataset042_Disc"]


def test_tls_settings_come_from_the_trainer_clients_variables(
    make_server: Callable[..., ServerThread], run_ctl: Ctl, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    auth_file = tmp_path / "tokens.json"
    token, _ = create_token(auth_file, "alice", Role.OPERATOR)
    server = make_server(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        auth_file=auth_file,
    )
    env = {
        "TRAINCTL_TOKEN": token,
        "TRAINCTL_TLS_CA": str(certs.ca),
        "TRAINCTL_TLS_CERT": str(certs.client_cert),
        "TRAINCTL_TLS_KEY": str(certs.client_key),
    }
    assert run_ctl(server.target, "runs", env=env).code == 0
    # Without the client certificate the handshake fails: the settings were really used.
    no_cert = {k: v for k, v in env.items() if k == "TRAINCTL_TOKEN" or k == "TRAINCTL_TLS_CA"}
    refused = run_ctl(server.target, "--timeout", "5", "runs", env=no_cert)
    assert refused.code == 1 and refused.err.startswith("controlctl: UNAVAILABLE: ")
    missing = {**env, "TRAINCTL_TLS_CA": str(tmp_path / "nope.pem")}
    unreadable = run_ctl(server.target, "runs", env=missing)
    assert unreadable.code == 2 and "TRAINCTL_TLS_CA" in unreadable.err


def controlctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`controlctl ARGS` as a user runs it: a real process, only the given TRAINCTL_*."""
    return subprocess.run(
        [sys.executable, "-m", "control_server.ctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})},
    )


def complaint(result: subprocess.CompletedProcess[str]) -> str:
    """The line controlctl printed last on stderr (grpc may log before it), never a traceback."""
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_tls_mismatch_names_the_option_to_pass(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    tls = make_server(
        tls_cert=certs.server_cert, tls_key=certs.server_key, store_url=f"sqlite:///{tmp_path}/t.db"
    )
    mutual = make_server(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        store_url=f"sqlite:///{tmp_path}/m.db",
    )
    plain = make_server(store_url=f"sqlite:///{tmp_path}/p.db")
    ca, other = ("--tls-ca", str(certs.ca)), ("--tls-ca", str(certs.other_ca))
    client = ("--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key))
    cases = [
        (tls.target, (), f"the server at {tls.target} speaks TLS: pass --tls-ca FILE"),
        (
            mutual.target,
            ca,
            "the server requires a client certificate: pass --tls-cert FILE and --tls-key FILE",
        ),
        (
            tls.target,
            other,
            f"the server's certificate is not signed by --tls-ca {certs.other_ca}: pass --tls-ca",
        ),
        (plain.target, ca, f"the server at {plain.target} does not speak TLS: leave out --tls-ca"),
    ]
    for target, options, says in cases:
        result = controlctl("--server", target, "--timeout", "5", *options, "runs")
        assert result.returncode == 1, result.stderr
        assert complaint(result).startswith(f"controlctl: UNAVAILABLE: {says}"), options
    # The same through the variables, and with every option right: served.
    env = {"TRAINCTL_TLS_CA": str(certs.ca)}
    no_cert = controlctl("--server", mutual.target, "--timeout", "5", "runs", env=env)
    assert "the server requires a client certificate" in complaint(no_cert)
    assert controlctl("--server", mutual.target, *ca, *client, "runs").returncode == 0


def test_a_token_given_as_the_token_file_is_never_printed(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    auth_file = tmp_path / "tokens.json"
    token, _ = create_token(auth_file, "alice", Role.OPERATOR)
    server = make_server(auth_file=auth_file, store_url=f"sqlite:///{tmp_path}/auth.db")
    result = controlctl("--server", server.target, "--token-file", token, "runs")
    assert result.returncode == 2
    assert token not in result.stderr + result.stdout
    assert complaint(result).startswith("controlctl: the --token-file path does not exist")
    # A path that is no token is named, as any file that cannot be read.
    missing = tmp_path / "operator.token"
    named = controlctl("--server", server.target, "--token-file", str(missing), "runs")
    assert complaint(named) == f"controlctl: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (
            ["--server", "localhost", "runs"],
            {},
            "--server must be HOST:PORT, but got 'localhost' (no port)",
        ),
        (
            ["runs"],
            {"TRAINCTL_SERVER": "myhost"},
            "TRAINCTL_SERVER must be a HOST:PORT, but got 'myhost' (no port).",
        ),
        (
            ["runs", "--server", "127.0.0.1:1"],
            {},
            "--server is an option of `controlctl`: give it before `runs`",
        ),
        (
            ["--json", "runs"],
            {},
            "--json is an option of `controlctl runs`: give it after the command",
        ),
        (["--tls-cert", "c.pem", "runs"], {}, "--tls-cert and --tls-key must be given together"),
    ],
)
def test_setup_mistakes_are_one_line_naming_what_to_change(
    args: list[str], env: dict[str, str], says: str
) -> None:
    result = controlctl(*args, env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"controlctl: {says}")


def test_controlctl_is_a_declared_command() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["controlctl"] == "control_server.ctl:main"
    assert "matplotlib" in " ".join(project["optional-dependencies"]["plot"])
    helped = _controlctl("--help")
    out, _ = helped.communicate(timeout=60)
    assert helped.returncode == 0
    for command in ("runs", "run", "override", "overrides", "policy", "decisions", "watch"):
        assert f"    {command} " in out
