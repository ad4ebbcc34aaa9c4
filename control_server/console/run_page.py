"""The run page (one run's chart, decisions, attempts and overrides) and the compare
page (several runs' curves overlaid).

The chart's data travels as JSON: embedded in the page (a ``<script
type="application/json">`` block, so the first paint needs no second request) and
served at ``/runs/{id}/data.json`` for run.js to re-read when the run reports; the
decision table's body is served alone at ``/runs/{id}/decisions`` for the same
reason. Everything comes from GetRun (and ListRuns for the compare page's choices).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from control_server.console.app import call, render
from control_server.console.fleet import STATUS, fleet_row, run_flags, run_labels, short_id
from control_server.ctl.render import effect_text, shadow_differs, weights_text
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

#: GetRun's largest page, and the most epochs one page of the console shows.
PAGE_SIZE = 5000
MAX_EPOCHS = 5000
#: Runs one compare chart overlays at most.
MAX_COMPARED = 12
#: What a chart marker looks like, per kind: its symbol and its word.
MARKERS = {
    "intervention": ("▲", "intervention"),
    "rollback": ("✕", "rollback"),
    "override": ("◆", "override"),
    "stop": ("■", "stop"),
}
#: The curves the compare page can overlay: query value -> EpochReport field.
COMPARE_METRICS = {
    "val_loss": "val_loss",
    "train_loss": "train_loss",
    "pseudo_dice": "pseudo_dice",
}


async def get_run(request: web.Request, run_id: str) -> pb.GetRunResponse:
    """The run with up to MAX_EPOCHS epochs, following GetRun's pages."""
    whole: pb.GetRunResponse = await call(
        request, "GetRun", pb.GetRunRequest(run_id=run_id, page_size=PAGE_SIZE)
    )
    token = whole.next_page_token
    while token and len(whole.epochs) < MAX_EPOCHS:
        page = await call(
            request,
            "GetRun",
            pb.GetRunRequest(run_id=run_id, page_size=PAGE_SIZE, page_token=token),
        )
        whole.epochs.extend(page.epochs)
        whole.superseded.extend(page.superseded)
        token = page.next_page_token
    del whole.epochs[MAX_EPOCHS:]
    whole.next_page_token = token
    return whole


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such a value is a gap in the curve (the table says it)."""
    return value if value is not None and math.isfinite(value) else None


def _optional(message: Any, name: str) -> float | None:
    return _finite(getattr(message, name)) if message.HasField(name) else None


def marker_kind(decision: pb.Decision) -> str | None:
    """How the chart marks a decision: an automatic intervention, an override's
    intervention, a rollback, a stop; None for the rest."""
    if decision.action == pb.ROLLBACK:
        return "rollback"
    if decision.action == pb.STOP:
        return "stop"
    if decision.action == pb.INTERVENE:
        return "override" if decision.source == pb.OVERRIDE else "intervention"
    return None


def marker_label(decision: pb.Decision, kind: str) -> str:
    symbol, word = MARKERS[kind]
    if kind == "intervention" and decision.intervention_index:
        word = f"{word} #{decision.intervention_index}"
    elif kind in ("rollback", "stop"):
        word = f"{word} ({'guard' if decision.source == pb.SAFETY else _source(decision)})"
    return f"{symbol} {word} at epoch {decision.epoch}"


def _action(decision: pb.Decision) -> str:
    return pb.Action.Name(decision.action) if decision.action else ""


def _source(decision: pb.Decision) -> str:
    return pb.Source.Name(decision.source).lower() if decision.source else ""


def decision_what(decision: pb.Decision) -> str:
    """What a decision set: "lr 0.003, dice=0.6,focal=0.4" ("" when nothing)."""
    parts = []
    if decision.HasField("lr"):
        parts.append(f"lr {decision.lr:.4g}")
    if decision.loss_weights:
        parts.append(weights_text(decision.loss_weights))
    return ", ".join(parts)


def chart_data(run: pb.GetRunResponse) -> dict[str, Any]:
    """The chart's columns (uPlot's form: one array per series over the epochs), each
    epoch's decision for the hover area, and the markers."""
    epochs: list[int] = []
    train: list[float | None] = []
    val: list[float | None] = []
    dice: list[float | None] = []
    lr: list[float | None] = []
    decisions: list[list[Any]] = []
    markers: list[dict[str, Any]] = []
    for item in run.epochs:
        report, decision = item.report, item.decision
        epochs.append(report.epoch)
        train.append(_finite(report.train_loss))
        val.append(_optional(report, "val_loss"))
        dice.append(_optional(report, "pseudo_dice"))
        lr.append(report.current_lr if report.current_lr > 0 else None)
        decisions.append(
            [_action(decision), _source(decision), decision.reason, decision_what(decision)]
        )
        kind = marker_kind(decision)
        if kind is not None:
            markers.append(
                {"epoch": report.epoch, "kind": kind, "label": marker_label(decision, kind)}
            )
    summary = run.run
    return {
        "run_id": summary.run_id,
        "monitored": summary.monitored or "val_loss",
        "epochs": epochs,
        "train_loss": train,
        "val_loss": val,
        "pseudo_dice": dice,
        "lr": lr,
        "decisions": decisions,
        "markers": markers,
        "summary": {
            "last_epoch": summary.last_epoch,
            "status": STATUS.get(summary.status, STATUS[pb.RUN_STATUS_UNSPECIFIED])[0],
            "interventions": summary.intervention_count,
            "rollbacks": summary.rollback_count,
        },
    }


def json_script(data: Any) -> str:
    """JSON safe inside a <script> element: no "</script>", no "<!--", no HTML at all
    (every <, > and & escaped as JSON's \\u escapes)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class DecisionRow:
    epoch: int
    attempt: int
    action: str
    source: str
    lr: float | None
    weights: str
    reason: str
    effect: str
    shadow: str
    shadow_differs: bool
    late: bool
    marker: str


def decision_rows(run: pb.GetRunResponse, every_epoch: bool) -> list[DecisionRow]:
    """The decision table: the decisions that steered (or would have, for the shadow
    policy), or every epoch's."""
    rows = []
    for item in run.epochs:
        decision = item.decision
        shadow = item.shadow if item.HasField("shadow") else None
        differs = shadow is not None and shadow_differs(decision, shadow)
        steered = decision.action not in (pb.NONE, pb.ACTION_UNSPECIFIED)
        if not (every_epoch or steered or differs):
            continue
        kind = marker_kind(decision)
        rows.append(
            DecisionRow(
                epoch=item.report.epoch,
                attempt=decision.attempt,
                action=_action(decision),
                source=_source(decision),
                lr=decision.lr if decision.HasField("lr") else None,
                weights=weights_text(decision.loss_weights),
                reason=decision.reason,
                effect=effect_text(item.effect) if item.HasField("effect") else "",
                shadow=(
                    f"{_action(shadow)} {decision_what(shadow)}".strip()
                    if shadow is not None
                    else ""
                ),
                shadow_differs=differs,
                late=decision.late,
                marker=MARKERS[kind][0] if kind else "",
            )
        )
    return rows


def override_what(override: pb.Override) -> str:
    """What an override does, in words."""
    restoring = "restoring " if override.action == pb.ROLLBACK else ""
    what = [
        f"{pb.Action.Name(override.action)} at the next report" if override.action else "",
        f"{restoring}lr {override.lr:.4g}" if override.HasField("lr") else "",
        "above the policy's LR cap" if override.exceed_lr_cap else "",
        weights_text(override.loss_weights),
        "hold interventions" if override.hold_interventions else "",
        "" if override.action else "once" if override.once else "until cleared",
    ]
    return ", ".join(w for w in what if w)


def compare_link(run: pb.RunSummary) -> str | None:
    """The compare page for the folds of the run's dataset and configuration."""
    labels = run_labels(run)
    if not labels["dataset"] or not labels["configuration"]:
        return None
    return "/compare?" + urlencode(
        {"dataset": labels["dataset"], "configuration": labels["configuration"]}
    )


def flags_of(run: pb.GetRunResponse) -> list[int]:
    """The run's flags: as the server sent them in the summary, or, where GetRun's
    summary carries none, read from the page's own record as ListRuns derives them
    (rollbacks, non-finite losses, a plateau with the budget spent, stale, an override
    in force)."""
    if run.run.flags:
        return list(run.run.flags)

    def nonfinite(report: pb.EpochReport) -> bool:
        values = [report.train_loss] + ([report.val_loss] if report.HasField("val_loss") else [])
        return not all(math.isfinite(v) for v in values)

    found = {
        pb.FLAG_ROLLED_BACK: run.run.rollback_count > 0,
        pb.FLAG_NON_FINITE: any(nonfinite(e.report) for e in run.epochs),
        pb.FLAG_BUDGET_SPENT: any(
            e.decision.reason.startswith("Plateau:") and "budget" in e.decision.reason
            for e in run.epochs
        ),
        pb.FLAG_STALE: run.run.status == pb.STALE,
        pb.FLAG_OVERRIDE: any(not o.cleared_at.seconds for o in run.overrides),
    }
    return [flag for flag, on in found.items() if on]


def _every_epoch(request: web.Request) -> bool:
    return request.query.get("epochs") == "all"


@routes.get("/runs/{run_id}")
async def run_page(request: web.Request) -> web.StreamResponse:
    run_id = request.match_info["run_id"]
    run = await get_run(request, run_id)
    every_epoch = _every_epoch(request)
    summary = pb.RunSummary()
    summary.CopyFrom(run.run)
    summary.ClearField("flags")
    summary.flags.extend(flags_of(run))
    return render(
        request,
        "run.html",
        run=summary,
        row=fleet_row(summary),
        flags=run_flags(summary),
        short_id=short_id(run_id, 60),
        chart_json=json_script(chart_data(run)),
        rows=decision_rows(run, every_epoch),
        every_epoch=every_epoch,
        epoch_count=len(run.epochs),
        truncated=bool(run.next_page_token),
        attempts=list(run.attempts),
        overrides=list(run.overrides),
        override_what=override_what,
        superseded=len(run.superseded),
        compare=compare_link(summary),
        markers=MARKERS,
        status_of=lambda status: STATUS.get(status, STATUS[pb.RUN_STATUS_UNSPECIFIED]),
    )


@routes.get("/runs/{run_id}/data.json")
async def run_data(request: web.Request) -> web.StreamResponse:
    run = await get_run(request, request.match_info["run_id"])
    return web.Response(text=json_script(chart_data(run)), content_type="application/json")


@routes.get("/runs/{run_id}/decisions")
async def run_decisions(request: web.Request) -> web.StreamResponse:
    """The decision table's body alone, for run.js when the run reports."""
    run = await get_run(request, request.match_info["run_id"])
    return render(request, "_run_decisions.html", rows=decision_rows(run, _every_epoch(request)))


# --- compare ------------------------------------------------------------------------


def overlay(runs: Sequence[pb.GetRunResponse], metric: str) -> dict[str, Any]:
    """One x column (every epoch any run reported) and one column per run (None where
    it has no value), as uPlot takes them."""
    field = COMPARE_METRICS[metric]
    by_run: list[dict[int, float | None]] = []
    for run in runs:
        values: dict[int, float | None] = {}
        for item in run.epochs:
            report = item.report
            value = (
                _finite(report.train_loss) if field == "train_loss" else _optional(report, field)
            )
            values[int(report.epoch)] = value
        by_run.append(values)
    epochs = sorted(set().union(*by_run)) if by_run else []
    series = []
    for run in runs:
        labels = run_labels(run.run)
        fold = f"fold {labels['fold']}" if labels["fold"] else ""
        name = short_id(run.run.run_id, 40)
        series.append({"run_id": run.run.run_id, "label": f"{fold}: {name}" if fold else name})
    return {
        "metric": metric,
        "epochs": epochs,
        "columns": [[values.get(e) for e in epochs] for values in by_run],
        "series": series,
    }


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


@routes.get("/compare")
async def compare_page(request: web.Request) -> web.StreamResponse:
    """Runs overlaid: those named (``run=``, repeated), and every run of a dataset and
    configuration (``dataset=`` and ``configuration=``: its folds)."""
    query = request.query
    dataset = query.get("dataset", "").strip()
    configuration = query.get("configuration", "").strip()
    named = _unique(query.getall("run", []))
    listing = await call(request, "ListRuns", pb.ListRunsRequest(limit=1000))
    choices = [fleet_row(run) for run in listing.runs]
    if dataset and not named:
        folds = [
            r
            for r in choices
            if r.labels["dataset"] == dataset
            and (not configuration or r.labels["configuration"] == configuration)
        ]
        named = [
            r.run_id for r in sorted(folds, key=lambda r: (r.labels["fold"].zfill(3), r.run_id))
        ]
    metric = query.get("metric", "")
    if metric and metric not in COMPARE_METRICS:
        raise web.HTTPBadRequest(
            text=f"metric must be one of {', '.join(COMPARE_METRICS)}, but got {metric!r}"
        )
    shown = named[:MAX_COMPARED]
    runs = list(await asyncio.gather(*(get_run(request, run_id) for run_id in shown)))
    if not metric:
        # The EMA is a smoothing of the raw pseudo Dice, which is what was reported.
        monitored = {run.run.monitored.removeprefix("ema_") for run in runs}
        metric = next(iter(monitored)) if len(monitored) == 1 else ""
        metric = metric if metric in COMPARE_METRICS else "val_loss"
    groups = _unique(
        f"{r.labels['dataset']}|{r.labels['configuration']}"
        for r in choices
        if r.labels["dataset"] and r.labels["configuration"]
    )
    return render(
        request,
        "compare.html",
        chart_json=json_script(overlay(runs, metric)) if runs else "",
        runs=[run.run for run in runs],
        named=set(named),
        dropped=named[MAX_COMPARED:],
        choices=choices,
        groups=[g.split("|", 1) for g in groups],
        metric=metric,
        metrics=list(COMPARE_METRICS),
        status_of=lambda status: STATUS.get(status, STATUS[pb.RUN_STATUS_UNSPECIFIED]),
        labels_of=run_labels,
        dataset=dataset,
        configuration=configuration,
    )
