"""`make outcome`: does training control help a real nnU-Net training? A policy experiment.

Real nnU-Net v2 trainings on the CPU, on a synthetic task made to plateau
(`outcome_task`: thin vessels, small rare lesions, a faint textured organ,
label noise), several seeds per arm:

- ``stock``: nnU-Net's own nnUNetTrainer, no control at all;
- ``observe``: our trainer, reporting to a server that never intervenes (the
  experiment's baseline arm);
- ``seed``: the default policy as shipped;
- ``rop`` and ``seed-cap3x``: two variants (`outcome_arms`);
- ``collapse-guard`` / ``collapse-noguard``: an LR spike injected as a policy,
  with the divergence guard on and off.

Everything but ``stock`` runs through one real ``control-server serve`` as one
policy experiment: the server assigns each run an arm from its run id, and the
benchmark picks run ids that land where it wants (`outcome_arms.run_id_for`).
Seed k trains fold k with torch/NumPy seeded by k in every arm, so the arms'
runs pair by fold. Afterwards it prints the table (the server's experiment
report for the experiment arms, the same statistics computed here for
``stock``), writes a PNG and ends with one machine-readable line starting
``outcome:``. Everything lands under var/outcome/ (``--small``: var/outcome-small/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from outcome_arms import (  # noqa: E402
    INITIAL_LR,
    SMALL_ARMS,
    Arm,
    arms,
    experiment_arms,
    run_id_for,
)
from outcome_report import (  # noqa: E402
    Point,
    RunResult,
    arm_rows,
    detectable_differences,
    format_table,
    outcome_line,
    parse_nnunet_log,
    plot_outcome,
    read_final_dice,
)
from outcome_task import TASK_NAME, make_hard_dataset  # noqa: E402

from control_server.experiment_stats import Comparison  # noqa: E402
from trainer_client.api import control_pb2 as pb  # noqa: E402
from trainer_client.api import control_pb2_grpc as pb_grpc  # noqa: E402
from trainer_client.nnunet.synthetic import nnunet_env, plan_and_preprocess  # noqa: E402

DATASET_ID = 77
DATASET = f"Dataset{DATASET_ID:03d}_{TASK_NAME}"
EXPERIMENT = "outcome"
#: Arms left out of the paired noise estimate: no change to training, or a deliberate one.
NOT_NOISE_ARMS = ("stock", "observe", "collapse-noguard")
#: nnU-Net's 5-fold split: seed k trains fold k, so there are at most 5 seeds.
MAX_SEEDS = 5


@dataclass(frozen=True)
class Settings:
    """One benchmark's size."""

    arms: tuple[Arm, ...]
    seeds: int
    epochs: int
    iterations: int
    val_iterations: int
    cases: int
    parallel: int
    work: Path


@dataclass(frozen=True)
class Job:
    """One training to run."""

    arm: Arm
    seed: int
    run_id: str


# --- the server ---------------------------------------------------------------------------


def start_server(work: Path) -> tuple[subprocess.Popen[str], str]:
    """`control-server serve` on a free port, a fresh SQLite store, the default policy."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_server.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{work / 'control.db'}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r"serving on (\S+)", line)
    if not match:
        server.kill()
        raise SystemExit(f"outcome: the control server did not start: {line!r}")
    return server, match.group(1)


def stop_server(server: subprocess.Popen[str]) -> None:
    server.terminate()
    server.communicate(timeout=30)


def start_experiment(
    admin: pb_grpc.ControlAdminStub, selected: Sequence[Arm]
) -> list[pb.ExperimentArm]:
    """Store each arm's policy, start the experiment; return its arms in the server's order."""
    versions = {}
    for arm in selected:
        if arm.policy is not None:
            # JSON is YAML without the aliases a YAML dump would write for shared maps.
            response = admin.PutPolicy(pb.PutPolicyRequest(yaml=json.dumps(arm.policy)), timeout=30)
            versions[arm.name] = response.policy.version
    arms_ = experiment_arms(selected, versions)
    started = admin.StartExperiment(
        pb.StartExperimentRequest(
            name=EXPERIMENT,
            description="make outcome: the default policy and variants against no control",
            selector=pb.RunSelector(dataset=DATASET),
            arms=[
                pb.ExperimentArm(
                    name=a.name,
                    policy_version=a.policy_version,
                    observe_only=a.observe_only,
                    share=a.share,
                )
                for a in arms_
            ],
            baseline_arm="observe",
        ),
        timeout=30,
    )
    return list(started.arms)


def plan_jobs(settings: Settings, server_arms: Sequence[pb.ExperimentArm]) -> list[Job]:
    """Every (seed, arm) training, seed by seed (an interrupted run has whole seeds)."""
    from control_server.domain import ExperimentArm

    domain_arms = [
        ExperimentArm(a.name, a.policy_version, a.share, a.observe_only) for a in server_arms
    ]
    jobs = []
    for seed in range(settings.seeds):
        for arm in settings.arms:
            run_id = (
                f"stock-{seed}"
                if arm.stock
                else run_id_for(EXPERIMENT, arm.name, "outcome", seed, domain_arms)
            )
            jobs.append(Job(arm, seed, run_id))
    return jobs


# --- the trainings ------------------------------------------------------------------------


def run_job(job: Job, settings: Settings, target: str) -> RunResult:
    """Train one (arm, seed) in a subprocess with results of its own; time it."""
    folder = settings.work / "runs" / job.run_id
    folder.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(settings.work / "nnunet")
    env["nnUNet_results"] = str(folder / "results")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if not job.arm.stock:
        env.update(
            {
                "TRAINCTL_SERVER": target,
                "TRAINCTL_RUN_ID": job.run_id,
                # A benchmark run must not train on silently without its control.
                "TRAINCTL_FAIL_OPEN": "never",
                **job.arm.env,
            }
        )
        if job.arm.max_lr_factor is not None:
            env["TRAINCTL_MAX_LR"] = repr(job.arm.max_lr_factor * INITIAL_LR)
    command = [
        sys.executable,
        str(HERE / "outcome_train.py"),
        str(job.seed),
        "stock" if job.arm.stock else "controlled",
        str(DATASET_ID),
        "2d",
        str(job.seed),
        "--device",
        "cpu",
        "--epochs",
        str(settings.epochs),
        "--iterations",
        str(settings.iterations),
        "--val-iterations",
        str(settings.val_iterations),
        # One thread each: two trainings share the two cores.
        "--threads",
        "1",
    ]
    started = time.monotonic()
    with (folder / "train.log").open("w") as log:
        code = subprocess.run(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False
        ).returncode
    wall = time.monotonic() - started
    result = RunResult(job.arm.name, job.seed, job.run_id, wall, code)
    folds = sorted((folder / "results").glob(f"{DATASET}/*/fold_{job.seed}"))
    if code == 0 and folds:
        result.final_dice = read_final_dice(folds[0])
    status = (
        f"Dice {result.final_dice:.3f}"
        if result.final_dice is not None
        else f"FAILED (exit {code})"
    )
    print(f"  {job.arm.name:<17} seed {job.seed}  {status}  {wall:.0f} s", flush=True)
    return result


def run_all(jobs: Sequence[Job], settings: Settings, target: str) -> list[RunResult]:
    with ThreadPoolExecutor(max_workers=settings.parallel) as pool:
        return list(pool.map(lambda job: run_job(job, settings, target), jobs))


# --- what happened ------------------------------------------------------------------------


def get_run(admin: pb_grpc.ControlAdminStub, run_id: str) -> tuple[str, list[pb.RunEpoch]]:
    """The arm the server assigned the run to, and its epochs (every page)."""
    epochs: list[pb.RunEpoch] = []
    token = ""
    while True:
        page = admin.GetRun(pb.GetRunRequest(run_id=run_id, page_token=token), timeout=30)
        epochs.extend(page.epochs)
        token = page.next_page_token
        if not token:
            return page.run.arm, epochs


def add_curves(results: Sequence[RunResult], admin: pb_grpc.ControlAdminStub, work: Path) -> None:
    """Each run's per-epoch curve: GetRun for runs under control, nnU-Net's log for stock."""
    for result in results:
        log = (work / "runs" / result.run_id / "train.log").read_text(errors="replace")
        points, best = parse_nnunet_log(log)
        result.best_epoch = best
        if result.arm == "stock":
            result.curve = points
            continue
        try:
            arm, epochs = get_run(admin, result.run_id)
        except grpc.RpcError as error:
            print(f"outcome: GetRun {result.run_id}: {error.code().name}", file=sys.stderr)
            continue
        if arm != result.arm:
            # The run id was chosen for its arm: another arm means the server's
            # assignment changed, and the table would mix arms up.
            raise SystemExit(
                f"outcome: the server put run {result.run_id} in arm {arm!r}, "
                f"but it was chosen for {result.arm!r}"
            )
        for record in epochs:
            report, decision = record.report, record.decision
            dice = report.pseudo_dice if report.HasField("pseudo_dice") else None
            result.curve.append(Point(int(report.epoch), dice, report.current_lr))
            if decision.action == pb.INTERVENE:
                result.interventions.append(int(decision.epoch))
            elif decision.action == pb.ROLLBACK:
                result.rollbacks.append(int(decision.epoch))


def server_comparisons(admin: pb_grpc.ControlAdminStub) -> dict[str, Comparison]:
    """The experiment report's comparison of each arm with ``observe``, paired by fold."""
    report = admin.GetExperimentReport(
        pb.GetExperimentReportRequest(name=EXPERIMENT, pair_by="fold"), timeout=60
    )
    comparisons = {}
    for arm in report.arms:
        if not arm.HasField("vs_baseline"):
            continue
        c = arm.vs_baseline

        def get(name: str, c: pb.ArmComparison = c) -> float | None:
            return getattr(c, name) if c.HasField(name) else None

        comparisons[arm.arm.name] = Comparison(
            paired=c.paired,
            n=c.n,
            difference=get("difference"),
            ci_low=get("ci_low"),
            ci_high=get("ci_high"),
            p_value=get("p_value"),
            win_rate=get("win_rate"),
            method=c.method,
        )
    return comparisons


# --- the whole benchmark ------------------------------------------------------------------


def _dice(value: float | None) -> str:
    return f"{value:.3f} Dice" if value is not None else "- (needs 2 seeds)"


def fresh(work: Path) -> None:
    """Create `work`, removing what an earlier outcome run left there (and nothing else)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in (
        "nnunet",
        "runs",
        "control.db",
        "control.db-wal",
        "control.db-shm",
        "outcome.png",
        "report.txt",
    ):
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_data(settings: Settings) -> None:
    env = nnunet_env(settings.work / "nnunet")
    make_hard_dataset(Path(env["nnUNet_raw"]), DATASET_ID, cases=settings.cases, seed=0)
    plan_and_preprocess(DATASET_ID, env)


def run(settings: Settings) -> int:
    """The benchmark; returns the exit code (1 when a training failed)."""
    started = time.monotonic()
    fresh(settings.work)
    names = [a.name for a in settings.arms]
    print(
        f"outcome: {len(names)} arms ({', '.join(names)}) x {settings.seeds} seeds, "
        f"{settings.epochs} epochs of {settings.iterations} iterations, "
        f"{settings.parallel} at a time; output in {settings.work}",
        flush=True,
    )
    t = time.monotonic()
    prepare_data(settings)
    print(
        f"  {DATASET}: {settings.cases} cases planned and preprocessed "
        f"({time.monotonic() - t:.0f} s)",
        flush=True,
    )
    server, target = start_server(settings.work)
    try:
        with grpc.insecure_channel(target) as channel:
            admin = pb_grpc.ControlAdminStub(channel)
            server_arms = start_experiment(admin, settings.arms)
            jobs = plan_jobs(settings, server_arms)
            t = time.monotonic()
            results = run_all(jobs, settings, target)
            training_s = time.monotonic() - t
            add_curves(results, admin, settings.work)
            comparisons = server_comparisons(admin)
            admin.EndExperiment(
                pb.EndExperimentRequest(name=EXPERIMENT, reason="make outcome finished"),
                timeout=30,
            )
    finally:
        stop_server(server)
    rows = arm_rows(results, names, comparisons)
    table = format_table(rows)
    mdd = detectable_differences(
        results, settings.seeds, [n for n in names if n not in NOT_NOISE_ARMS]
    )
    png = plot_outcome(
        results,
        names,
        settings.work / "outcome.png",
        f"{DATASET}: {settings.seeds} seeds x {settings.epochs} epochs of "
        f"{settings.iterations} iterations, nnU-Net 2d on the CPU",
    )
    wall = time.monotonic() - started
    failed = [r.run_id for r in results if r.final_dice is None]
    lines = [
        "",
        table,
        "",
        "Δ: mean of the paired differences in final Dice (pairs: same fold and seed), "
        "95% bootstrap CI; win: share of pairs the arm won. 'vs observe' is the server's "
        "experiment report (pair_by fold); 'vs stock' the same functions applied here. "
        "rollbacks: (epochs from the intervention to its rollback). epochs to best: of the "
        "EMA pseudo Dice. wall time: the arm's trainings summed, each beside another one.",
        "detectable difference (80% power, two-sided 5%, t approximation): "
        f"paired {_dice(mdd['paired'])} (sd of arm - stock pooled over the arms that "
        f"intervene, {', '.join(NOT_NOISE_ARMS)} excluded), unpaired {_dice(mdd['unpaired'])} "
        "(sd across seeds within an arm)",
        f"trainings: {len(results)} in {training_s / 60:.1f} min ({settings.parallel} at a time); "
        f"whole benchmark {wall / 60:.1f} min",
        f"plot: {png}",
    ]
    if failed:
        lines.append(f"FAILED runs (logs under {settings.work / 'runs'}): {', '.join(failed)}")
    summary = {
        "dataset": DATASET,
        "seeds": settings.seeds,
        "epochs": settings.epochs,
        "iterations": settings.iterations,
        "parallel": settings.parallel,
        "detectable_difference": mdd,
        "training_s": round(training_s, 1),
        "wall_s": round(wall, 1),
        "png": str(png),
        "failed": failed,
    }
    lines.append(outcome_line(rows, summary))
    text = "\n".join(lines)
    (settings.work / "report.txt").write_text(text + "\n")
    (settings.work / "runs.json").write_text(
        json.dumps(
            [r.__dict__ | {"curve": [p.__dict__ for p in r.curve]} for r in results],
            indent=1,
            default=str,
        )
        + "\n"
    )
    print(text, flush=True)
    return 1 if failed else 0


def settings_from(args: argparse.Namespace) -> Settings:
    every = arms(args.epochs)
    wanted = args.arms.split(",") if args.arms else [a.name for a in every]
    by_name = {a.name: a for a in every}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(
            f"outcome: --arms must name arms among {', '.join(by_name)}, but got {unknown[0]!r}"
        )
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise SystemExit(
            f"outcome: --seeds must be from 1 to {MAX_SEEDS} (one fold each), but got {args.seeds}"
        )
    for name in ("epochs", "iterations", "val_iterations", "parallel"):
        if getattr(args, name) < 1:
            raise SystemExit(
                f"outcome: --{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}"
            )
    return Settings(
        arms=tuple(by_name[n] for n in wanted),
        seeds=args.seeds,
        epochs=args.epochs,
        iterations=args.iterations,
        val_iterations=args.val_iterations,
        cases=args.cases,
        parallel=args.parallel,
        work=args.work.resolve(),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help="the quick check (make test): stock and seed, 1 seed, 3 epochs",
    )
    parser.add_argument("--seeds", type=int, help=f"seeds (= folds) per arm, 1-{MAX_SEEDS} (4)")
    parser.add_argument("--epochs", type=int, help="epochs per training (30)")
    parser.add_argument("--iterations", type=int, help="train iterations per epoch (10)")
    parser.add_argument("--val-iterations", type=int, help="validation iterations per epoch (3)")
    parser.add_argument("--arms", help="comma-separated arms (default: all)")
    parser.add_argument("--cases", type=int, help="cases in the synthetic dataset (40)")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time (2)")
    parser.add_argument("--work", type=Path, help="output folder (var/outcome)")
    args = parser.parse_args(argv)
    small = {
        "seeds": 1,
        "epochs": 3,
        "iterations": 3,
        "val_iterations": 1,
        "cases": 20,
        "arms": ",".join(SMALL_ARMS),
        "work": REPO / "var" / "outcome-small",
    }
    full = {
        "seeds": 4,
        "epochs": 30,
        "iterations": 10,
        "val_iterations": 3,
        "cases": 40,
        "arms": None,
        "work": REPO / "var" / "outcome",
    }
    for name, value in (small if args.small else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run(settings_from(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
