"""The fleet page: every run at a glance, filterable and sortable, updated live.

One ListRuns call (up to 1,000 runs, each with its monitored-value trend) feeds the
whole page: rows are turned into plain view data here and rendered once by Jinja,
no call per row. ListRuns filters what it can (labels, status, experiment and arm);
the policy version and the free text on the run id are filtered here. The table body
is also served alone (`/fleet/rows`), so fleet.js can re-read it when a run it does
not show yet reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_server.console.app import call, render
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

#: ListRuns returns at most this many runs to one page.
FLEET_LIMIT = 1000
#: Points of each run's monitored-value sparkline.
TREND_POINTS = 40
#: Characters of a run id shown before it is shortened (the full id is in the title).
RUN_ID_SHOWN = 21
#: Characters of the last reason shown in a row (the full reason is in the title).
REASON_SHOWN = 70
SPARK_WIDTH, SPARK_HEIGHT = 72, 20

#: Status word and the symbol shown before it (colour only repeats them).
STATUS = {
    pb.ACTIVE: ("active", "▶"),
    pb.COMPLETED: ("completed", "✓"),
    pb.STOPPED: ("stopped", "■"),
    pb.FAILED: ("failed", "✗"),
    pb.STALE: ("stale", "◔"),
    pb.RUN_STATUS_UNSPECIFIED: ("unknown", "?"),
}
#: What the status filter offers: word -> RunStatus.
STATUS_BY_WORD = {word: status for status, (word, _) in STATUS.items() if status}


@dataclass(frozen=True)
class Flag:
    """One health flag as a badge: its text, why it is shown (the badge's title), and
    how bad it is (the CSS class; the text says it without colour)."""

    key: str
    text: str
    why: str
    level: str


def run_flags(run: pb.RunSummary) -> list[Flag]:
    """The run's flags (RunSummary.flags) as badges that say why the run needs a look."""
    flags = []
    for flag in run.flags:
        if flag == pb.FLAG_ROLLED_BACK:
            times = f"{run.rollback_count} rollback{'s' if run.rollback_count != 1 else ''}"
            flags.append(
                Flag(
                    "rolled-back",
                    "rolled back",
                    f"{times} (the divergence guard's or an operator's) in the current history",
                    "bad",
                )
            )
        elif flag == pb.FLAG_NON_FINITE:
            flags.append(
                Flag("non-finite", "non-finite", "a report had a NaN or infinite loss", "bad")
            )
        elif flag == pb.FLAG_BUDGET_SPENT:
            flags.append(
                Flag(
                    "budget-spent",
                    "budget spent",
                    "a plateau was detected after the policy's intervention budget was spent",
                    "warn",
                )
            )
        elif flag == pb.FLAG_STALE:
            flags.append(
                Flag(
                    "stale",
                    "stale",
                    "not finished and silent for longer than its stale multiple of its "
                    "median epoch time",
                    "bad",
                )
            )
        elif flag == pb.FLAG_OVERRIDE:
            flags.append(Flag("override", "override", "an operator's override is in force", "info"))
    return flags


def split_run_id(run_id: str) -> dict[str, str]:
    """Labels read from an nnU-Net run id ``Dataset__Trainer__Plans__configuration__fold_F``
    (nnU-Net's output folder names joined by "__"); {} for any other id."""
    parts = run_id.split("__")
    if len(parts) != 5 or not parts[4].startswith("fold_"):
        return {}
    dataset, trainer, plans, configuration, fold = parts
    return {
        "dataset": dataset,
        "trainer": trainer,
        "plans": plans,
        "configuration": configuration,
        "fold": fold.removeprefix("fold_"),
    }


def run_labels(run: pb.RunSummary) -> dict[str, str]:
    """The run's labels, the empty ones read from its id when it is nnU-Net's."""
    given = {
        key: getattr(run.labels, key) for key in ("dataset", "configuration", "fold", "trainer")
    }
    parsed = split_run_id(run.run_id)
    return {key: value or parsed.get(key, "") for key, value in given.items()}


def short_id(run_id: str, shown: int = RUN_ID_SHOWN) -> str:
    """The run id, its middle elided when longer than `shown` characters."""
    if len(run_id) <= shown:
        return run_id
    head = (shown - 1) // 2
    return f"{run_id[:head]}…{run_id[-(shown - 1 - head) :]}"


def truncate(text: str, shown: int) -> str:
    return text if len(text) <= shown else text[: shown - 1].rstrip() + "…"


@dataclass(frozen=True)
class Sparkline:
    """A trend as an inline SVG polyline: its points and what it says in words."""

    points: str
    label: str
    last_x: float
    last_y: float
    width: int
    height: int


def sparkline(
    values: Sequence[float],
    name: str,
    width: int = SPARK_WIDTH,
    height: int = SPARK_HEIGHT,
) -> Sparkline | None:
    """`values` scaled into a width x height box (higher values drawn higher); None with
    fewer than two finite values."""
    finite = [(i, v) for i, v in enumerate(values) if v == v and abs(v) != float("inf")]
    if len(finite) < 2:
        return None
    low = min(v for _, v in finite)
    high = max(v for _, v in finite)
    span = high - low or 1.0
    steps = max(len(values) - 1, 1)
    pad = 2.0
    points = []
    for i, value in finite:
        x = pad + (width - 2 * pad) * i / steps
        y = pad + (height - 2 * pad) * (1 - (value - low) / span)
        points.append((x, y))
    first, last = finite[0][1], finite[-1][1]
    label = f"{name} from {first:.3g} to {last:.3g} (lowest {low:.3g}, highest {high:.3g})"
    return Sparkline(
        " ".join(f"{x:.1f},{y:.1f}" for x, y in points),
        label,
        points[-1][0],
        points[-1][1],
        width,
        height,
    )


def trainer_short(trainer: str) -> str:
    """nnU-Net's trainer class without its common "nnUNetTrainer" prefix ("Controlled")."""
    rest = trainer.removeprefix("nnUNetTrainer")
    return rest if rest and rest != trainer else trainer


@dataclass(frozen=True)
class FleetRow:
    """One run of the fleet as the template shows it."""

    run_id: str
    short_id: str
    labels: Mapping[str, str]
    status: str
    status_symbol: str
    flags: Sequence[Flag]
    spark: Sparkline | None
    monitored: str
    epoch: int
    reports: int
    interventions: int
    rollbacks: int
    last_action: str
    last_source: str
    last_reason: str
    policy_version: str
    experiment: str
    arm: str
    final_dice: float | None
    last_seen: Any
    #: What went wrong, for a failed run.
    error: str

    @property
    def needs_look(self) -> bool:
        return bool(self.flags) or self.status in ("failed", "stale")


def fleet_row(run: pb.RunSummary) -> FleetRow:
    word, symbol = STATUS.get(run.status, STATUS[pb.RUN_STATUS_UNSPECIFIED])
    decision = run.last_decision
    action = pb.Action.Name(decision.action) if decision.action else ""
    source = pb.Source.Name(decision.source) if decision.source else ""
    monitored = run.monitored or "val_loss"
    trend = list(run.trend)
    dice = run.final_metrics.mean_dice if run.final_metrics.HasField("mean_dice") else None
    return FleetRow(
        run_id=run.run_id,
        short_id=short_id(run.run_id),
        labels=run_labels(run),
        status=word,
        status_symbol=symbol,
        flags=run_flags(run),
        spark=sparkline(trend, monitored),
        monitored=monitored,
        epoch=run.last_epoch,
        reports=run.report_count,
        interventions=run.intervention_count,
        rollbacks=run.rollback_count,
        last_action=action,
        last_source=source,
        last_reason=decision.reason,
        policy_version=decision.policy_version,
        experiment=run.experiment,
        arm=run.arm,
        final_dice=dice,
        last_seen=run.last_seen,
        error=run.error,
    )


@dataclass(frozen=True)
class FleetQuery:
    """The fleet's filters, as the GET form sends them."""

    dataset: str = ""
    configuration: str = ""
    fold: str = ""
    status: str = ""
    policy: str = ""
    experiment: str = ""
    arm: str = ""
    text: str = ""
    attention: bool = False

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FleetQuery:
        def get(name: str) -> str:
            return str(query.get(name, "")).strip()

        status = get("status")
        if status and status not in STATUS_BY_WORD:
            raise web.HTTPBadRequest(
                text=f"status must be one of {', '.join(STATUS_BY_WORD)}, but got {status!r}"
            )
        return cls(
            dataset=get("dataset"),
            configuration=get("configuration"),
            fold=get("fold"),
            status=status,
            policy=get("policy"),
            experiment=get("experiment"),
            arm=get("arm"),
            text=get("q"),
            attention=get("attention") == "1",
        )

    def request(self) -> pb.ListRunsRequest:
        """What ListRuns filters itself, with the sparklines' trend."""
        fields: dict[str, Any] = {
            "dataset": self.dataset,
            "configuration": self.configuration,
            "fold": self.fold,
            "limit": FLEET_LIMIT,
            "experiment": self.experiment,
            "arm": self.arm,
            "trend_points": TREND_POINTS,
        }
        if self.status:
            fields["status"] = STATUS_BY_WORD[self.status]
        return pb.ListRunsRequest(**fields)

    def keep(self, row: FleetRow) -> bool:
        """The filters ListRuns does not know: policy version, text in the run id, and
        the runs that need a look."""
        if self.policy and not row.policy_version.startswith(self.policy):
            return False
        if self.text and self.text.lower() not in row.run_id.lower():
            return False
        return not self.attention or row.needs_look

    @property
    def active(self) -> bool:
        return any(value for value in vars(self).values())


@dataclass(frozen=True)
class Fleet:
    rows: list[FleetRow]
    #: Label values, policies and experiment arms seen, for the filter's choices.
    choices: dict[str, list[str]]

    @property
    def attention(self) -> int:
        return sum(row.needs_look for row in self.rows)


async def load_fleet(request: web.Request, query: FleetQuery) -> Fleet:
    found = await call(request, "ListRuns", query.request())
    every = [fleet_row(run) for run in found.runs]
    choices: dict[str, set[str]] = {
        "dataset": set(),
        "configuration": set(),
        "fold": set(),
        "policy": set(),
        "experiment": set(),
        "arm": set(),
    }
    for row in every:
        for key in ("dataset", "configuration", "fold"):
            if row.labels[key]:
                choices[key].add(row.labels[key])
        if row.policy_version:
            choices["policy"].add(row.policy_version)
        if row.experiment:
            choices["experiment"].add(row.experiment)
        if row.arm:
            choices["arm"].add(row.arm)
    # The chosen value stays a choice even when nothing matches it any more.
    for key in choices:
        chosen = getattr(query, key)
        if chosen:
            choices[key].add(chosen)
    return Fleet(
        [row for row in every if query.keep(row)], {k: sorted(v) for k, v in choices.items()}
    )


@routes.get("/")
async def fleet_page(request: web.Request) -> web.StreamResponse:
    query = FleetQuery.from_query(request.query)
    fleet = await load_fleet(request, query)
    return render(
        request,
        "fleet.html",
        fleet=fleet,
        query=query,
        statuses=list(STATUS_BY_WORD),
        limit=FLEET_LIMIT,
        trainer_short=trainer_short,
    )


@routes.get("/fleet/rows")
async def fleet_rows(request: web.Request) -> web.StreamResponse:
    """The table body alone, for fleet.js when a run it does not show reports."""
    query = FleetQuery.from_query(request.query)
    fleet = await load_fleet(request, query)
    return render(request, "_fleet_rows.html", fleet=fleet, trainer_short=trainer_short)
