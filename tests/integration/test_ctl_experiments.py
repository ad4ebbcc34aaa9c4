"""`controlctl experiment ...` against a real server, with simulated trainings
(`trainctl-sim`, which calls StartRun) landing in the arms: start, list, show,
report (unpaired and paired, text and JSON), promote (activate or pin), end, and
the refusals that name the bad argument."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_server import ctl
from control_server.domain import ExperimentArm
from control_server.experiments import OBSERVE_ONLY, assign_arm
from control_server.policy.document import parse_policy_yaml
from tests.conftest import ServerThread
from trainer_client import sim
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

EAGER_YAML = "name: eager\nplateau: {patience: 1, cooldown: 0, warmup_epochs: 2}\n"
EAGER_VERSION = parse_policy_yaml(EAGER_YAML).version
DATASET = "Dataset042_Disc"
#: Simulated runs: fold = the run's number mod 3, so arms share folds to pair by.
RUN_IDS = [f"sim-{i:02d}" for i in range(10)]


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_ctl(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `controlctl ARGS` in-process against the server; no traceback, ever."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = ctl.main(["--server", server.target, *args], env={})
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Result(code, out, err)

    return run


@pytest.fixture
def admin(server: ServerThread) -> Any:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ControlAdminStub(channel)


@pytest.fixture
def eager(run_ctl: Callable[..., Result], tmp_path: Path) -> str:
    """The eager policy pushed (not activated); its version."""
    path = tmp_path / "eager.yaml"
    path.write_text(EAGER_YAML)
    assert run_ctl("policy", "push", str(path)).code == 0
    return EAGER_VERSION


def start_lr_boost(run_ctl: Callable[..., Result], version: str, name: str = "lr-boost") -> Result:
    return run_ctl(
        "experiment",
        "start",
        name,
        "--dataset",
        DATASET,
        "--arm",
        f"eager={version}",
        "--observe-arm",
        "observe",
        "--description",
        "does an eager plateau pay?",
    )


def simulate(server: ServerThread, run_id: str, fold: str, seed: int) -> None:
    """One simulated training through the real client: StartRun, 30 epochs (long enough
    for the eager arm to meet a plateau), FinishRun."""
    labels = ["--dataset", DATASET, "--configuration", "2d", "--fold", fold]
    code = sim.main(
        [
            "--target",
            server.target,
            "--run-id",
            run_id,
            "--epochs",
            "16",
            "--seed",
            str(seed),
            *labels,
        ]
    )
    assert code == 0


def expected_arms(name: str = "lr-boost") -> dict[str, str]:
    """The arm of each run id, as the server must draw it (arms in the order given:
    the --arm ones, then the --observe-arm ones)."""
    arms = [
        ExperimentArm("eager", EAGER_VERSION, 1),
        ExperimentArm("observe", OBSERVE_ONLY.version, 1, observe_only=True),
    ]
    return {run_id: assign_arm(name, run_id, arms).name for run_id in RUN_IDS}


def line_of(text: str, start: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_start_simulate_report_and_promote(
    server: ServerThread, admin: Any, run_ctl: Callable[..., Result], eager: str
) -> None:
    started = start_lr_boost(run_ctl, eager)
    assert started.code == 0, started.err
    assert "experiment     lr-boost" in started.out
    assert "status         running, 0 runs assigned" in started.out
    assert "selector       dataset=Dataset042_Disc" in started.out
    assert line_of(started.out, "observe (baseline)").split() == [
        "observe", "(baseline)", "observe-only", OBSERVE_ONLY.version, "1",
    ]  # fmt: skip
    assert line_of(started.out, "eager ").split() == ["eager", "policy", EAGER_VERSION, "1"]

    arms = expected_arms()
    assert min(list(arms.values()).count(arm) for arm in ("eager", "observe")) >= 2
    for i, run_id in enumerate(RUN_IDS):
        simulate(server, run_id, fold=str(i % 3), seed=i)

    listed = run_ctl("experiment", "list")
    assert listed.code == 0
    row = line_of(listed.out, "lr-boost").split()
    assert row[:4] == ["lr-boost", "running", "dataset=Dataset042_Disc", f"eager={eager}:1"]
    assert row[4:7] == ["observe=observe-only:1", "observe", str(len(RUN_IDS))]

    report = run_ctl("experiment", "report", "lr-boost")
    assert report.code == 0, report.err
    served = admin.GetExperimentReport(pb.GetExperimentReportRequest(name="lr-boost"))
    by_arm = {a.arm.name: a for a in served.arms}
    assert sorted(by_arm["eager"].run_ids) == sorted(r for r in RUN_IDS if arms[r] == "eager")
    assert by_arm["observe"].interventions == 0 and by_arm["eager"].interventions > 0
    assert "final Dice unpaired, 95% intervals" in report.out
    per_arm, against = report.out.split("\n\nagainst the baseline arm observe\n")
    observe_row = line_of(per_arm, "observe (baseline)").split()
    eager_row = line_of(per_arm, "eager ").split()
    for row, arm in ((observe_row, by_arm["observe"]), (eager_row, by_arm["eager"])):
        dice = arm.final_dice
        assert str(arm.runs) in row and str(arm.interventions) in row
        assert f"{dice.mean:.4f}" in row and f"{dice.sd:.4f}" in row
        assert f"{dice.median:.4f}" in row and f"{dice.min:.4f}-{dice.max:.4f}" in row
        assert f"completed {arm.runs}" in " ".join(row)
    vs = by_arm["eager"].vs_baseline
    assert vs.method.startswith("unpaired: bootstrap")
    comparison = line_of(against, "eager ")
    assert comparison.split()[:6] == [
        "eager",
        str(vs.n),
        f"{vs.difference:+.4f}",
        f"[{vs.ci_low:+.4f},",
        f"{vs.ci_high:+.4f}]",
        f"{vs.p_value:.3g}",
    ]
    assert comparison.endswith(vs.method)

    paired = run_ctl("experiment", "report", "lr-boost", "--pair-by", "fold", "--json")
    assert paired.code == 0
    data = json.loads(paired.out)
    assert data["pair_by"] == "fold" and data["confidence"] == 0.95
    [compared] = [a["vs_baseline"] for a in data["arms"] if "vs_baseline" in a]
    folds = [
        {str(i % 3) for i, r in enumerate(RUN_IDS) if arms[r] == a} for a in ("eager", "observe")
    ]
    assert compared["paired"] is True and compared["n"] == len(folds[0] & folds[1]) >= 2
    text = run_ctl("experiment", "report", "lr-boost", "--pair-by", "fold", "--confidence", "0.9")
    assert "final Dice paired by fold, 90% intervals" in text.out
    assert "90% CI" in text.out

    promoted = run_ctl("experiment", "promote", "lr-boost", "eager", "--reason", "it won")
    assert promoted.code == 0, promoted.err
    assert promoted.out.strip() == (
        f"promoted arm eager of experiment lr-boost: policy {eager} activated; "
        "the experiment has ended"
    )
    assert admin.GetPolicy(pb.GetPolicyRequest()).version == eager
    shown = run_ctl("experiment", "show", "lr-boost")
    assert f"status         promoted eager, {len(RUN_IDS)} runs assigned" in shown.out
    assert "ended (UTC)" in shown.out
    assert "lr-boost" not in run_ctl("experiment", "list").out
    assert "promoted eager" in line_of(run_ctl("experiment", "list", "--all").out, "lr-boost")


def test_promote_pin_and_end(admin: Any, run_ctl: Callable[..., Result], eager: str) -> None:
    assert start_lr_boost(run_ctl, eager, "pinned").code == 0
    pinned = run_ctl("experiment", "promote", "pinned", "eager", "--pin")
    assert pinned.out.strip() == (
        f"promoted arm eager of experiment pinned: policy {eager} pinned to "
        "dataset=Dataset042_Disc; the experiment has ended"
    )
    policies = admin.ListPolicies(pb.ListPoliciesRequest())
    [stored] = [p for p in policies.policies if p.version == eager]
    assert list(stored.pins) == [pb.RunSelector(dataset=DATASET)]
    assert policies.active_version != eager

    assert start_lr_boost(run_ctl, eager, "ended").code == 0
    ended = run_ctl("experiment", "end", "ended", "--reason", "enough")
    assert ended.out.strip() == "ended experiment ended (0 runs assigned)"
    shown = json.loads(run_ctl("experiment", "show", "ended", "--json").out)
    assert shown["status"] == "ENDED" and "promoted_arm" not in shown
    again = run_ctl("experiment", "end", "ended")
    assert again.code == 2 and "FAILED_PRECONDITION" in again.err


def test_an_empty_report_says_why_nothing_compares(
    run_ctl: Callable[..., Result], eager: str
) -> None:
    assert start_lr_boost(run_ctl, eager).code == 0
    report = run_ctl("experiment", "report", "lr-boost")
    assert report.code == 0
    assert line_of(report.out, "observe (baseline)").split()[3:] == ["0"] * 5 + ["-"] * 5
    assert "needs 2 runs per arm with a final Dice (arm 0, baseline 0)" in report.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arm", "eager"], "--arm: expected NAME=VERSION[:SHARE], but got 'eager'"),
        (["--arm", "=v1"], "--arm: expected NAME=VERSION[:SHARE], but got '=v1'"),
        (["--arm", "a=v1:-1", "--observe-arm", "o"], "--arm: SHARE must be a number > 0, "
         "but got '-1' in 'a=v1:-1'"),
        (["--arm", "a=v1", "--observe-arm", "o:x"], "--observe-arm: SHARE must be a number > 0,"
         " but got 'x' in 'o:x'"),
        (["--arm", "a=v1", "--observe-arm", "o=v2"], "--observe-arm: expected NAME[:SHARE], "
         "but got 'o=v2'"),
        (["--arm", "a=v1"], "experiment start: give at least two arms (--arm, --observe-arm), "
         "but got 1"),
    ],
)  # fmt: skip
def test_a_bad_arm_is_refused_naming_it(
    admin: Any, run_ctl: Callable[..., Result], args: list[str], message: str
) -> None:
    result = run_ctl("experiment", "start", "x", "--dataset", DATASET, *args)
    assert (result.code, result.out) == (2, "")
    assert result.err.strip() == f"controlctl: {message}"
    listed = admin.ListExperiments(pb.ListExperimentsRequest(include_ended=True))
    assert list(listed.experiments) == []


def test_server_refusals_and_bad_options_name_the_culprit(
    run_ctl: Callable[..., Result], eager: str
) -> None:
    missing = run_ctl("experiment", "report", "nope")
    assert missing.code == 2 and missing.err.startswith("controlctl: NOT_FOUND:")
    assert "nope" in missing.err
    unknown = run_ctl("experiment", "start", "x", "--dataset", DATASET, "--arm", "a=0123456789ab",
                      "--observe-arm", "o")  # fmt: skip
    assert unknown.code == 2 and "0123456789ab" in unknown.err
    assert start_lr_boost(run_ctl, eager).code == 0
    bad_arm = run_ctl("experiment", "promote", "lr-boost", "nope")
    assert bad_arm.code == 2 and "nope" in bad_arm.err
    confidence = run_ctl("experiment", "report", "lr-boost", "--confidence", "95")
    assert confidence.code == 2
    assert "argument --confidence: expected a number in (0, 1), but got '95'" in confidence.err
    no_dataset = run_ctl("experiment", "start", "x", "--arm", "a=v")
    assert no_dataset.code == 2 and "--dataset" in no_dataset.err
