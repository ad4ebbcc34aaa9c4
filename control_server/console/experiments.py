"""The experiments pages: every experiment (running and ended) with the form that
starts one, and one experiment's arms, assigned runs and outcome report (final Dice
per arm with its spread, and each arm against the baseline with the difference's
interval, p-value and win rate)."""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist

import grpc
from aiohttp import web

from control_server.console.actions import arm_text, selector_text
from control_server.console.app import call, render
from control_server.console.client import rpc_error_text
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

#: Arm rows of the start form.
ARM_ROWS = 4
#: Power of the minimum detectable difference shown beside each comparison.
POWER = 0.8
PAIR_BY = ("", "fold", "dataset", "configuration", "host")


@routes.get("/experiments")
async def experiments(request: web.Request) -> web.StreamResponse:
    found = await call(request, "ListExperiments", pb.ListExperimentsRequest(include_ended=True))
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    return render(
        request,
        "experiments.html",
        experiments=list(reversed(found.experiments)),
        policies=list(listed.policies),
        arm_rows=ARM_ROWS,
        selector_text=selector_text,
        arm_text=arm_text,
        status_name=pb.ExperimentStatus.Name,
    )


@routes.get("/experiments/{name}")
async def experiment(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    pair_by = request.query.get("pair_by", "")
    if pair_by not in PAIR_BY:
        pair_by = ""
    found = await call(request, "GetExperiment", pb.GetExperimentRequest(name=name))
    runs = await call(request, "ListRuns", pb.ListRunsRequest(experiment=name, limit=1000))
    per_arm = Counter(r.arm for r in runs.runs)
    report = None
    report_error = ""
    try:
        report = await call(
            request,
            "GetExperimentReport",
            pb.GetExperimentReportRequest(name=name, pair_by=pair_by),
        )
    except grpc.aio.AioRpcError as error:
        # The arms and runs are still worth seeing when the report cannot be made.
        report_error = rpc_error_text(error)
    return render(
        request,
        "experiment.html",
        experiment=found,
        runs=list(runs.runs),
        per_arm=per_arm,
        report=report,
        baseline=baseline_of(report) if report is not None else None,
        report_error=report_error,
        pair_by=pair_by,
        pair_choices=PAIR_BY,
        mdd=minimum_detectable_difference,
        normal_half=normal_half_width,
        selector_text=selector_text,
        status_name=pb.ExperimentStatus.Name,
        run_status_name=pb.RunStatus.Name,
        pct=lambda value: f"{100 * value:.0f}%",
    )


def minimum_detectable_difference(
    arm: pb.ArmReport, baseline: pb.ArmReport | None, confidence: float
) -> float | None:
    """The smallest true difference in mean final Dice these sample sizes would find
    with probability POWER at the report's confidence (two-sided, normal
    approximation with the arms' pooled SD): how much a "no difference" can rule out.
    None when an arm has fewer than two final Dice values."""
    if baseline is None:
        return None
    a, b = arm.final_dice, baseline.final_dice
    if a.n < 2 or b.n < 2 or not a.HasField("sd") or not b.HasField("sd"):
        return None
    pooled = math.sqrt(((a.n - 1) * a.sd**2 + (b.n - 1) * b.sd**2) / (a.n + b.n - 2))
    normal = NormalDist()
    z = normal.inv_cdf(1 - (1 - (confidence or 0.95)) / 2) + normal.inv_cdf(POWER)
    return z * pooled * math.sqrt(1 / a.n + 1 / b.n)


def normal_half_width(dist: pb.Distribution, confidence: float) -> float:
    """Half the width of the normal-approximation interval of a mean (sd / sqrt(n))."""
    z = NormalDist().inv_cdf(1 - (1 - (confidence or 0.95)) / 2)
    return float(z * dist.sd / math.sqrt(dist.n))


def baseline_of(report: pb.ExperimentReport) -> pb.ArmReport | None:
    name = report.experiment.baseline_arm
    return next((a for a in report.arms if a.arm.name == name), None)
