"""The fleet at a glance: why each listed run needs a look (its flags), and the value its
policy monitors over its history (a trend small enough for a sparkline).

ListRuns asks for a page of up to 1,000 runs at once, so everything here is read
in a fixed number of store queries for the whole page (flags: two, plus the active
overrides; trends: one), never one read per run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from control_server.domain import (
    DomainError,
    InvalidArgument,
    Report,
    RunFlag,
    RunStatus,
    RunSummary,
)
from control_server.policy.document import PolicyDoc
from control_server.policy.engine import BUDGET_SPENT
from control_server.policy.plateau import monitored_value
from control_server.store import Store

__all__ = ["BUDGET_SPENT_LIKE", "MAX_TREND_POINTS", "FleetView", "check_trend_points", "thin"]

logger = logging.getLogger(__name__)

#: The most points a trend may be asked for.
MAX_TREND_POINTS = 500
#: The reasons of the plateaus the engine detected after the budget was spent (both
#: its "..., and the budget ..." STOP and its "..., but the budget ..." NONE).
BUDGET_SPENT_LIKE = "Plateau: %" + BUDGET_SPENT.format(budget="%") + "%"

PolicyLookup = Callable[[str], PolicyDoc]


def check_trend_points(points: int) -> int:
    """`points` when a caller may ask for it; InvalidArgument naming trend_points if not."""
    if not 0 <= points <= MAX_TREND_POINTS:
        raise InvalidArgument(
            "trend_points",
            f"must be between 0 and {MAX_TREND_POINTS} (0: no trend), but got {points}",
        )
    return points


def thin(values: Sequence[float], points: int) -> tuple[float, ...]:
    """At most `points` of `values`, evenly spread, the first and the last kept."""
    if points <= 0:
        return ()
    if len(values) <= points:
        return tuple(values)
    if points == 1:
        return (values[-1],)
    last = len(values) - 1
    return tuple(values[round(i * last / (points - 1))] for i in range(points))


def trend(doc: PolicyDoc, reports: Sequence[Report], points: int) -> tuple[float, ...]:
    """The value `doc` monitors in each report (raw, no EMA; a missing val_loss falls
    back as the policy's does), epochs without a finite one left out, thinned."""
    values = [monitored_value(doc.plateau, r)[1] for r in reports]
    return thin([v for v in values if v is not None and math.isfinite(v)], points)


class FleetView:
    """Fills in the flags, the monitored value and the trend of a page of runs."""

    def __init__(self, store: Store, policies: PolicyLookup) -> None:
        self._store = store
        self._policies = policies

    def enrich(self, runs: Sequence[RunSummary], trend_points: int = 0) -> list[RunSummary]:
        """`runs` (with their status already derived) with flags, monitored value and mode
        and, when `trend_points` > 0, their trend of at most that many points."""
        check_trend_points(trend_points)
        if not runs:
            return []
        ids = [r.run_id for r in runs]
        # The reports themselves, not the decisions, say a loss was non-finite: the
        # guard's rollback or an operator's STOP may have decided that epoch, so no one
        # reason marks it. SQLite keeps a NaN as the text 'NaN' (a bound NaN would
        # become NULL), PostgreSQL as NaN: the stores' query reads both.
        nonfinite = self._store.runs_with_nonfinite_losses(ids)
        budget_spent = self._store.runs_with_decision_reason(ids, BUDGET_SPENT_LIKE)
        overridden = {o.run_id for o in self._store.list_overrides()}
        # The store thins (a run of thousands of epochs ships only the points asked for);
        # an epoch among them without a finite value leaves its point out, rather than
        # pulling in a neighbour and spacing the rest unevenly.
        series = self._store.report_series(ids, trend_points) if trend_points else {}
        out = []
        for run in runs:
            flags = {
                RunFlag.ROLLED_BACK: run.rollback_count > 0,
                RunFlag.NON_FINITE: run.run_id in nonfinite,
                RunFlag.BUDGET_SPENT: run.run_id in budget_spent,
                RunFlag.STALE: run.status is RunStatus.STALE,
                RunFlag.OVERRIDE: run.run_id in overridden,
            }
            doc = self._policy_of(run)
            out.append(
                replace(
                    run,
                    flags=tuple(f for f in RunFlag if flags[f]),
                    monitored=doc.plateau.monitor if doc else "",
                    monitored_mode=doc.plateau.mode if doc else "",
                    trend=trend(doc, series.get(run.run_id, ()), trend_points) if doc else (),
                )
            )
        return out

    def _policy_of(self, run: RunSummary) -> PolicyDoc | None:
        """The document of the policy of the run's last decision (None: none, or one
        the store no longer has intact, which GetRun and replay report)."""
        if run.last_decision is None or not run.last_decision.policy_version:
            return None
        try:
            return self._policies(run.last_decision.policy_version)
        except DomainError as exc:
            logger.warning("[ListRuns] run=%s: no monitored value: %s", run.run_id, exc)
            return None
