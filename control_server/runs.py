"""A run's lifecycle: StartRun opens attempts, FinishRun ends them, and what a run's
status is when it is read (ACTIVE turns STALE when it stops reporting).

ReportEpoch itself is `report_epoch.py`'s (in the decider process); StartRun and
FinishRun are rare and run here, in the front end, each in one write transaction
that serialises with the run's reports (`Store.start_attempt`).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import pairwise

from control_server.domain import (
    Assignment,
    FinalMetrics,
    NotFound,
    RunAttempt,
    RunLabels,
    RunStatus,
    RunSummary,
    StoreUnavailable,
)
from control_server.experiments import assign_new_run
from control_server.report_epoch import utc_now
from control_server.store import Store

logger = logging.getLogger(__name__)

#: A run is stale after this many of its own median epoch times without a report.
DEFAULT_STALE_FACTOR = 5.0
#: ... and never sooner than this (epochs of a few seconds jitter a lot).
STALE_FLOOR = timedelta(seconds=60)
#: A run with fewer than two live epochs has no median yet: stale after this.
STALE_WITHOUT_MEDIAN = timedelta(minutes=30)
#: How many of a run's newest epochs its median epoch time is taken over.
MEDIAN_OVER = 21


class RunLifecycle:
    """StartRun and FinishRun, and the status of runs as they are read."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime] = utc_now,
        stale_factor: float = DEFAULT_STALE_FACTOR,
    ) -> None:
        if not stale_factor > 0:
            raise ValueError(f"stale_factor must be > 0, but got {stale_factor}.")
        self.store = store
        self._clock = clock
        self.stale_factor = stale_factor

    def start(
        self, attempt: RunAttempt, labels: RunLabels, actor: str
    ) -> tuple[RunAttempt, str, Assignment | None]:
        """Open the run's next attempt: the stored attempt, one sentence saying what it
        did to the run's history (for both logs), and the run's experiment arm (a new
        run matching a running experiment is assigned one here, by `actor`)."""
        now = self._clock()
        assignment = assign_new_run(self.store, attempt.run_id, labels, actor, now)
        context = self.store.load_context(attempt.run_id, 0, labels)
        version = assignment.policy_version if assignment else context.steering_policy
        if version is None:
            raise StoreUnavailable("no active policy is stored; start the server with --policy")
        stored = self.store.start_attempt(
            replace(attempt, started_at=now, policy_version=version), labels
        )
        message = _start_message(stored, assignment)
        level = logging.WARNING if stored.history_reset else logging.INFO
        logger.log(level, "[StartRun] %s", message)
        return stored, message, assignment

    def finish(
        self, run_id: str, attempt: int, status: RunStatus, error: str, metrics: FinalMetrics
    ) -> RunAttempt:
        ended = self.store.finish_attempt(run_id, attempt, status, error, metrics, self._clock())
        logger.info(
            "[FinishRun] run=%s attempt=%d %s%s",
            run_id,
            ended.attempt,
            status.value,
            f": {error[:200]}" if error else "",
        )
        return ended

    # --- reading runs -------------------------------------------------------------------

    def with_status(self, runs: Sequence[RunSummary]) -> list[RunSummary]:
        """The runs with STALE set on those not finished that stopped reporting."""
        now = self._clock()
        unfinished = [r.run_id for r in runs if not r.status.finished]
        times = self.store.recent_epoch_times(unfinished, MEDIAN_OVER) if unfinished else {}
        out = []
        for run in runs:
            if not run.status.finished and now - run.last_seen > self.stale_after(
                times.get(run.run_id, [])
            ):
                run = replace(run, status=RunStatus.STALE)
            out.append(run)
        return out

    def stale_after(self, newest_first: Sequence[datetime]) -> timedelta:
        """How long a run whose newest epochs were decided at these times may be silent."""
        gaps = [(a - b).total_seconds() for a, b in pairwise(newest_first)]
        if not gaps:
            return STALE_WITHOUT_MEDIAN
        median = timedelta(seconds=statistics.median(gaps) * self.stale_factor)
        return max(median, STALE_FLOOR)

    def attempts(self, run_id: str) -> list[RunAttempt]:
        attempts = self.store.list_attempts(run_id)
        if not attempts:
            raise NotFound(f"run {run_id!r} is not recorded")
        return attempts


def _start_message(a: RunAttempt, assignment: Assignment | None = None) -> str:
    where = f"run {a.run_id!r} attempt {a.attempt}, steered by policy {a.policy_version}"
    if assignment is not None:
        where += f" (arm {assignment.arm!r} of experiment {assignment.experiment!r})"
    if a.attempt == 1:
        return f"{where}: a new run"
    if a.history_reset:
        return (
            f"{where}: started from scratch on a known run id, so its history begins "
            f"afresh; the {a.superseded_epochs} epochs recorded before are kept as superseded"
        )
    kept = f"continues from epoch {a.resume_from_epoch}"
    if a.superseded_epochs:
        return (
            f"{where}: {kept}; {a.superseded_epochs} later epochs of earlier attempts "
            "are superseded (kept in the record)"
        )
    return f"{where}: {kept}"
