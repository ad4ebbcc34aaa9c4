"""Recompute recorded decisions from recorded reports.

With the recorded policy (each decision's own version) every decision must come
out the same: that is the audit's proof. With another policy it is a what-if:
what that policy would have decided on the same reports. (After the first
difference a what-if is only indicative: the real run reacted to the recorded
decisions, not to the ones the other policy would have made.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from control_server.domain import Decision, Report, Verdict
from control_server.policy import INITIAL_STATE, step
from control_server.policy.document import PolicyDoc
from control_server.store import Store


@dataclass(frozen=True)
class Difference:
    """One epoch where the recomputed verdict differs from the recorded decision."""

    run_id: str
    epoch: int
    recorded: Decision
    recomputed: Verdict

    def describe(self) -> str:
        def short(d: Decision | Verdict) -> str:
            lr = "-" if d.lr is None else f"{d.lr:.6g}"
            weights = ",".join(f"{k}={v:g}" for k, v in d.loss_weights.items()) or "-"
            return f"{d.action.value}/{d.source.value} lr={lr} weights={weights}"

        return (
            f"run {self.run_id} epoch {self.epoch}: recorded {short(self.recorded)} "
            f"| recomputed {short(self.recomputed)}\n"
            f"    recorded:   {self.recorded.reason}\n    recomputed: {self.recomputed.reason}"
        )


def replay_run(
    epochs: Sequence[tuple[Report, Decision]],
    policy_for: Callable[[Decision], tuple[PolicyDoc, str]],
) -> list[Difference]:
    """Fold the policy over a run's recorded reports; return where it disagrees.

    `policy_for(recorded_decision)` gives the (document, version) to decide that
    epoch with: the recorded one for an audit, a fixed one for a what-if.
    """
    state = INITIAL_STATE
    differences = []
    for report, recorded in epochs:
        doc, version = policy_for(recorded)
        verdict, state = step(doc, version, state, report, None)
        if not recorded.same_outcome(verdict):
            differences.append(Difference(report.run_id, report.epoch, recorded, verdict))
    return differences


def replay_store(
    store: Store,
    run_ids: Sequence[str] | None,
    policy_for: Callable[[Decision], tuple[PolicyDoc, str]],
) -> tuple[int, int, list[Difference]]:
    """Replay the given runs (all when None). Returns (runs, decisions, differences)."""
    runs = decisions = 0
    differences: list[Difference] = []
    for run_id in run_ids if run_ids is not None else store.run_ids():
        found = store.get_run(run_id)
        if found is None:
            raise KeyError(run_id)
        _, epochs = found
        runs += 1
        decisions += len(epochs)
        differences.extend(replay_run(epochs, policy_for))
    return runs, decisions, differences
