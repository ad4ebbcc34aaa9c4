"""Policy experiments through real servers: deterministic arms at StartRun, stable
across replicas and restarts (SQLite and PostgreSQL), observe-only runs never
steered, the report's numbers, promote and end, and clear refusals."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator

import grpc
import pytest

from control_server.domain import ExperimentArm
from control_server.experiment_stats import compare_paired, compare_unpaired
from control_server.experiments import OBSERVE_ONLY, assign_arm
from tests.conftest import ServerThread, Stubs
from tests.integration.test_admin import (
    DEFAULT_VERSION,
    EAGER_VERSION,
    LABELS,
    Trainer,
    admin_events,
    put_eager,
    rpc_error,
)
from tests.integration.test_run_attempts import start
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

SELECTOR = pb.RunSelector(dataset=LABELS.dataset)
ARMS = [
    pb.ExperimentArm(name="observe", observe_only=True, share=1),
    pb.ExperimentArm(name="eager", policy_version=EAGER_VERSION, share=1),
]


def start_experiment(admin: pb_grpc.ControlAdminStub, name: str = "lr-boost") -> pb.Experiment:
    experiment: pb.Experiment = admin.StartExperiment(
        pb.StartExperimentRequest(name=name, selector=SELECTOR, arms=ARMS)
    )
    return experiment


def expected_arm(run_id: str, experiment: str = "lr-boost") -> str:
    arms = [
        ExperimentArm("observe", OBSERVE_ONLY.version, 1, observe_only=True),
        ExperimentArm("eager", EAGER_VERSION, 1),
    ]
    return assign_arm(experiment, run_id, arms).name


RUN_IDS = [f"run-{i:02d}" for i in range(12)]


def test_new_runs_get_their_arm_at_start_run_and_observe_only_runs_are_never_steered(
    server: ServerThread, stubs: Stubs
) -> None:
    put_eager(stubs)
    started = start_experiment(stubs.admin)
    assert started.status == pb.RUNNING and started.baseline_arm == "observe"
    assert started.arms[0].policy_version == OBSERVE_ONLY.version

    arms = {run_id: start(stubs, run_id).arm for run_id in RUN_IDS}

    assert arms == {run_id: expected_arm(run_id) for run_id in RUN_IDS}
    assert set(arms.values()) == {"observe", "eager"}  # both arms drawn from 12 runs
    for run_id, arm in arms.items():
        decisions = Trainer(run_id).run(stubs, range(8))  # a flat loss: a plateau
        steered_by = {d.policy_version for d in decisions}
        actions = {d.action for d in decisions}
        if arm == "observe":
            assert steered_by == {OBSERVE_ONLY.version} and actions == {pb.NONE}
            assert any(
                d.reason.endswith(
                    "; policy observe-only never intervenes (interventions.max_interventions is 0)."
                )
                for d in decisions
            )
        else:
            assert steered_by == {EAGER_VERSION} and pb.INTERVENE in actions
    listed = stubs.admin.ListRuns(pb.ListRunsRequest()).runs
    assert {r.run_id: (r.experiment, r.arm) for r in listed} == {
        run_id: ("lr-boost", arm) for run_id, arm in arms.items()
    }
    observed = stubs.admin.ListRuns(pb.ListRunsRequest(experiment="lr-boost", arm="observe"))
    assert sorted(r.run_id for r in observed.runs) == sorted(
        run_id for run_id, arm in arms.items() if arm == "observe"
    )
    assigned = admin_events(server, "ExperimentAssigned")
    assert sorted(e["target"] for e in assigned) == RUN_IDS
    assert {e["actor"] for e in assigned} == {"anonymous"}
    assert stubs.admin.GetExperiment(pb.GetExperimentRequest(name="lr-boost")).assigned_runs == 12


def test_runs_outside_the_selector_or_known_before_keep_their_policy(stubs: Stubs) -> None:
    put_eager(stubs)
    known = start(stubs, "run-before")
    start_experiment(stubs.admin)

    elsewhere = stubs.control.StartRun(
        pb.StartRunRequest(
            run_id="run-other",
            labels=pb.RunLabels(dataset="Dataset001_Other", configuration="2d", fold="0"),
            initial_lr=0.01,
        )
    )
    resumed = start(stubs, "run-before", resume_from_epoch=0)

    assert (elsewhere.experiment, elsewhere.arm) == ("", "")
    assert elsewhere.policy_version == DEFAULT_VERSION
    assert (resumed.experiment, resumed.arm) == ("", "")
    assert resumed.policy_version == known.policy_version == DEFAULT_VERSION


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('shared')}/control.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def connect() -> Iterator[Callable[[ServerThread], Stubs]]:
    channels: list[grpc.Channel] = []

    def make(server: ServerThread) -> Stubs:
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return Stubs(
            channel, pb_grpc.TrainingControlStub(channel), pb_grpc.ControlAdminStub(channel)
        )

    yield make
    for channel in channels:
        channel.close()


def test_an_arm_is_the_same_on_every_replica_and_after_restarts(
    store_url: str,
    make_server: Callable[..., ServerThread],
    connect: Callable[[ServerThread], Stubs],
) -> None:
    first, second = make_server(store_url=store_url), make_server(store_url=store_url)
    a, b = connect(first), connect(second)
    put_eager(a)
    start_experiment(a.admin)

    # Each run starts on one replica and resumes on the other; StartRuns of new runs
    # race on both replicas at once for the last ones.
    on_a = {run_id: start(a, run_id).arm for run_id in RUN_IDS[:6]}
    on_b = {run_id: start(b, run_id, resume_from_epoch=0).arm for run_id in RUN_IDS[:6]}
    raced = {run_id: (start(a, run_id).arm, start(b, run_id).arm) for run_id in RUN_IDS[6:]}
    first.stop()
    second.stop()
    restarted = connect(make_server(store_url=store_url))
    again = {run_id: start(restarted, run_id, resume_from_epoch=0).arm for run_id in RUN_IDS}

    expected = {run_id: expected_arm(run_id) for run_id in RUN_IDS}
    assert on_a == on_b == {k: expected[k] for k in RUN_IDS[:6]}
    assert raced == {k: (expected[k], expected[k]) for k in RUN_IDS[6:]}
    assert again == expected
    listed = restarted.admin.ListRuns(pb.ListRunsRequest()).runs
    assert {r.run_id: r.arm for r in listed} == expected
    assert (
        restarted.admin.GetExperiment(pb.GetExperimentRequest(name="lr-boost")).assigned_runs == 12
    )


# --- the report ---------------------------------------------------------------------------

#: Final Dice by run, made up for the report (folds pair runs across arms).
DICE = {"run-00": 0.61, "run-01": 0.64, "run-02": 0.58, "run-03": 0.70, "run-04": 0.66,
        "run-05": 0.59, "run-06": 0.73, "run-07": 0.62, "run-08": 0.55, "run-09": 0.68,
        "run-10": 0.71, "run-11": 0.60}  # fmt: skip


def finish_all(stubs: Stubs) -> dict[str, str]:
    """Start, report and finish every run with its DICE (fold: the run's number mod 3,
    its best EMA epoch its number); the arm of each."""
    arms = {}
    for i, run_id in enumerate(RUN_IDS):
        labels = pb.RunLabels(dataset=LABELS.dataset, configuration="2d", fold=str(i % 3))
        arms[run_id] = start(stubs, run_id, labels=labels).arm
        trainer = Trainer(run_id, labels=labels)
        trainer.run(stubs, range(8))
        stubs.control.FinishRun(
            pb.FinishRunRequest(
                run_id=run_id,
                status=pb.COMPLETED if i != 11 else pb.FAILED,
                error="" if i != 11 else "out of memory",
                metrics=pb.FinalMetrics(
                    mean_dice=DICE[run_id], best_ema_pseudo_dice=DICE[run_id], best_ema_epoch=i
                ),
            )
        )
    return arms


def test_the_report_counts_each_arm_and_compares_its_final_dice_with_the_baseline(
    stubs: Stubs,
) -> None:
    put_eager(stubs)
    start_experiment(stubs.admin)
    arms = finish_all(stubs)
    members = {arm: [r for r in RUN_IDS if arms[r] == arm] for arm in ("observe", "eager")}

    report = stubs.admin.GetExperimentReport(pb.GetExperimentReportRequest(name="lr-boost"))
    paired = stubs.admin.GetExperimentReport(
        pb.GetExperimentReportRequest(name="lr-boost", pair_by="fold", confidence=0.9)
    )

    observe, eager = report.arms
    assert (observe.arm.name, eager.arm.name) == ("observe", "eager")
    assert sorted(observe.run_ids) == members["observe"]
    assert sorted(eager.run_ids) == members["eager"]
    assert not observe.HasField("vs_baseline") and eager.HasField("vs_baseline")
    assert observe.interventions == 0 and observe.rollbacks == 0
    assert eager.interventions > 0
    failed = {"observe": 0, "eager": 0}
    failed[arms["run-11"]] = 1
    for arm in (observe, eager):
        runs = members[arm.arm.name]
        dice = [DICE[r] for r in runs]
        assert dict(arm.runs_by_status) == {
            k: v for k, v in {"COMPLETED": len(runs) - failed[arm.arm.name],
                              "FAILED": failed[arm.arm.name]}.items() if v
        }  # fmt: skip
        assert arm.final_dice.n == len(dice)
        assert arm.final_dice.mean == pytest.approx(statistics.mean(dice))
        assert arm.final_dice.median == pytest.approx(statistics.median(dice))
        assert arm.final_dice.sd == pytest.approx(statistics.stdev(dice))
        assert (arm.final_dice.min, arm.final_dice.max) == (min(dice), max(dice))
        epochs = [RUN_IDS.index(r) for r in runs]
        assert arm.epochs_to_best.mean == pytest.approx(statistics.mean(epochs))

    unpaired = compare_unpaired(
        [DICE[r] for r in members["eager"]], [DICE[r] for r in members["observe"]], 0.95
    )
    got = eager.vs_baseline
    assert not got.paired
    assert got.difference == pytest.approx(unpaired.difference)
    assert (got.ci_low, got.ci_high) == pytest.approx((unpaired.ci_low, unpaired.ci_high))
    assert got.p_value == pytest.approx(unpaired.p_value)
    assert got.win_rate == pytest.approx(unpaired.win_rate)

    def by_fold(arm: str) -> dict[str, float]:
        folds: dict[str, list[float]] = {}
        for r in members[arm]:
            folds.setdefault(str(RUN_IDS.index(r) % 3), []).append(DICE[r])
        return {k: statistics.fmean(v) for k, v in folds.items()}

    expected = compare_paired(by_fold("eager"), by_fold("observe"), 0.9)
    got = paired.arms[1].vs_baseline
    assert got.paired and paired.pair_by == "fold" and paired.confidence == 0.9
    assert got.n == expected.n
    assert got.difference == pytest.approx(expected.difference)
    assert got.method == expected.method


def test_promote_activates_the_winner_and_ends_the_experiment(
    server: ServerThread, stubs: Stubs
) -> None:
    put_eager(stubs)
    start_experiment(stubs.admin)
    start(stubs, "run-00")

    promoted = stubs.admin.PromoteExperiment(
        pb.PromoteExperimentRequest(name="lr-boost", arm="eager", reason="it won")
    )

    assert promoted.status == pb.ENDED and promoted.promoted_arm == "eager"
    assert promoted.ended_by == "anonymous" and promoted.HasField("ended_at")
    assert stubs.admin.GetPolicy(pb.GetPolicyRequest()).version == EAGER_VERSION
    after = start(stubs, "run-new")
    assert (after.arm, after.policy_version) == ("", EAGER_VERSION)
    assert start(stubs, "run-00", resume_from_epoch=0).arm == expected_arm("run-00")
    assert list(stubs.admin.ListExperiments(pb.ListExperimentsRequest()).experiments) == []
    listed = stubs.admin.ListExperiments(pb.ListExperimentsRequest(include_ended=True))
    assert [e.name for e in listed.experiments] == ["lr-boost"]
    again = rpc_error(
        lambda: stubs.admin.PromoteExperiment(
            pb.PromoteExperimentRequest(name="lr-boost", arm="eager")
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended" in str(again.details())
    recorded = admin_events(server, "PromoteExperiment")
    assert recorded[0]["result"] == "OK" and recorded[0]["target"] == "lr-boost"


def test_promote_with_pin_pins_the_arm_to_the_selector_and_end_promotes_nothing(
    stubs: Stubs,
) -> None:
    put_eager(stubs)
    start_experiment(stubs.admin, "pinned")
    stubs.admin.PromoteExperiment(pb.PromoteExperimentRequest(name="pinned", arm="eager", pin=True))
    start_experiment(stubs.admin, "ended")
    ended = stubs.admin.EndExperiment(pb.EndExperimentRequest(name="ended", reason="enough"))

    policies = stubs.admin.ListPolicies(pb.ListPoliciesRequest())
    assert policies.active_version == DEFAULT_VERSION
    [eager] = [p for p in policies.policies if p.version == EAGER_VERSION]
    assert list(eager.pins) == [SELECTOR]
    assert ended.status == pb.ENDED and ended.promoted_arm == ""
    assert start(stubs, "run-late").policy_version == EAGER_VERSION  # the pin, no arm


@pytest.mark.parametrize(
    ("request_", "code", "names"),
    [
        (pb.StartExperimentRequest(name="", selector=SELECTOR, arms=ARMS),
         grpc.StatusCode.INVALID_ARGUMENT, "name:"),
        (pb.StartExperimentRequest(name="has space", selector=SELECTOR, arms=ARMS),
         grpc.StatusCode.INVALID_ARGUMENT, "name:"),
        (pb.StartExperimentRequest(name="x", arms=ARMS),
         grpc.StatusCode.INVALID_ARGUMENT, "selector:"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=ARMS[:1]),
         grpc.StatusCode.INVALID_ARGUMENT, "arms: must list at least two arms"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=[ARMS[1], ARMS[1]]),
         grpc.StatusCode.INVALID_ARGUMENT, "arms[1].name: must be unique"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=[
            ARMS[0], pb.ExperimentArm(name="eager", policy_version=EAGER_VERSION, share=-1)]),
         grpc.StatusCode.INVALID_ARGUMENT, "arms[1].share"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=[
            pb.ExperimentArm(name="o", observe_only=True, policy_version=EAGER_VERSION),
            ARMS[1]]),
         grpc.StatusCode.INVALID_ARGUMENT, "arms[0].policy_version"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=[
            ARMS[0], pb.ExperimentArm(name="b")]),
         grpc.StatusCode.INVALID_ARGUMENT, "arms[1].policy_version"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=ARMS, baseline_arm="nope"),
         grpc.StatusCode.INVALID_ARGUMENT, "baseline_arm"),
        (pb.StartExperimentRequest(name="x", selector=SELECTOR, arms=[
            ARMS[0], pb.ExperimentArm(name="b", policy_version="0123456789ab")]),
         grpc.StatusCode.NOT_FOUND, "0123456789ab"),
    ],
)  # fmt: skip
def test_a_bad_experiment_is_refused_naming_the_field_and_nothing_is_stored(
    stubs: Stubs, request_: pb.StartExperimentRequest, code: grpc.StatusCode, names: str
) -> None:
    put_eager(stubs)

    error = rpc_error(lambda: stubs.admin.StartExperiment(request_))

    assert error.code() == code
    assert names in str(error.details())
    listed = stubs.admin.ListExperiments(pb.ListExperimentsRequest(include_ended=True))
    assert list(listed.experiments) == []


def test_a_taken_name_or_a_running_twin_selector_is_refused(stubs: Stubs) -> None:
    put_eager(stubs)
    start_experiment(stubs.admin, "first")

    taken = rpc_error(lambda: start_experiment(stubs.admin, "first"))
    twin = rpc_error(lambda: start_experiment(stubs.admin, "second"))
    bad_pair = rpc_error(
        lambda: stubs.admin.GetExperimentReport(
            pb.GetExperimentReportRequest(name="first", pair_by="seed")
        )
    )
    missing = rpc_error(lambda: stubs.admin.GetExperiment(pb.GetExperimentRequest(name="nope")))

    assert taken.code() == twin.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "named 'first' exists already" in str(taken.details())
    assert "'first' is running on the same selector" in str(twin.details())
    assert bad_pair.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pair_by" in str(bad_pair.details())
    assert missing.code() == grpc.StatusCode.NOT_FOUND
