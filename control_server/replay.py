"""Recompute recorded decisions from recorded reports.

With the recorded policy (each decision's own version) every decision must come
out the same: that is the audit's proof. Decisions made while an override was
in force get that override again (by the id recorded with the decision). With
another policy it is a what-if: what that policy would have decided on the
same reports under the same overrides. Each epoch continues from the state of
the epoch its decision continued from (recorded with it), so reports that
arrived out of order replay as they were decided. (After the first difference
a what-if is only indicative: the real run reacted to the recorded decisions,
not to the ones the other policy would have made.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from control_server.chain import registry_head, verify_history, verify_policy, verify_registry
from control_server.domain import Action, Decision, Override, Report, RunFilter, Source, Verdict
from control_server.policy import INITIAL_STATE, PolicyState, step
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


def late_verdict(epoch: int) -> Verdict:
    """What a late report gets: the trainer has moved on, so nothing is decided on it
    (its record only fills the hole the outage left)."""
    return Verdict(
        Action.NONE,
        Source.POLICY,
        f"late report of epoch {epoch}, delivered after the server was unreachable: "
        "recorded, not decided",
    )


def decide_epoch(
    doc: PolicyDoc,
    version: str,
    state: PolicyState,
    report: Report,
    override: Override | None,
    *,
    late: bool,
) -> tuple[Verdict, PolicyState]:
    """One epoch as ReportEpoch decides it: a late report passes the state through."""
    if late:
        return late_verdict(report.epoch), state
    return step(doc, version, state, report, override)


def recorded_override(decision: Decision, overrides: Mapping[int, Override]) -> Override | None:
    """The override a decision was made under (None when none was in force)."""
    if decision.override_id is None:
        return None
    return overrides.get(decision.override_id)


def fold_state(
    doc: PolicyDoc,
    version: str,
    epochs: Sequence[tuple[Report, Decision]],
    overrides: Mapping[int, Override],
    after_epoch: int | None,
) -> PolicyState:
    """The state `doc` reaches at `after_epoch` (None: the initial state), folding over
    the recorded epochs along the recorded chain, each under its recorded override."""
    if after_epoch is None:
        return INITIAL_STATE
    states = _fold(doc, version, epochs, overrides)
    return states.get(after_epoch, INITIAL_STATE)


def _fold(
    doc: PolicyDoc,
    version: str,
    epochs: Sequence[tuple[Report, Decision]],
    overrides: Mapping[int, Override],
) -> dict[int, PolicyState]:
    states: dict[int, PolicyState] = {}
    for report, recorded in epochs:
        state = _state_before(recorded, states)
        _, states[report.epoch] = decide_epoch(
            doc, version, state, report, recorded_override(recorded, overrides), late=recorded.late
        )
    return states


def _state_before(recorded: Decision, states: Mapping[int, PolicyState]) -> PolicyState:
    """The state a recorded decision continued from (its predecessor has a lower epoch,
    so an epoch-order fold has already computed it)."""
    if recorded.previous_epoch is None:
        return INITIAL_STATE
    return states.get(recorded.previous_epoch, INITIAL_STATE)


def replay_run(
    epochs: Sequence[tuple[Report, Decision]],
    policy_for: Callable[[Decision], tuple[PolicyDoc, str]],
    overrides: Mapping[int, Override] | None = None,
) -> list[Difference]:
    """Fold the policy over a run's recorded reports (in epoch order); return where it
    disagrees.

    Each epoch continues from the state of the epoch its decision continued from
    (normally the one before; not when reports arrived out of order).
    `policy_for(recorded_decision)` gives the (document, version) to decide that
    epoch with: the recorded one for an audit, a fixed one for a what-if.
    `overrides` maps override ids to the run's overrides (cleared ones included).
    """
    overrides = overrides or {}
    states: dict[int, PolicyState] = {}
    differences = []
    for report, recorded in epochs:
        doc, version = policy_for(recorded)
        override = recorded_override(recorded, overrides)
        state = _state_before(recorded, states)
        verdict, states[report.epoch] = decide_epoch(
            doc, version, state, report, override, late=recorded.late
        )
        if not recorded.same_outcome(verdict):
            differences.append(Difference(report.run_id, report.epoch, recorded, verdict))
    return differences


def verify_store(store: Store, run_ids: Sequence[str] | None = None) -> tuple[list[str], str]:
    """Every edited or deleted row the record's hash chains show (one finding each),
    and the run registry's head (kept elsewhere, it also shows the newest entries cut)."""
    findings: list[str] = []
    summaries = {r.run_id: r for r in store.list_runs(RunFilter(limit=0))}
    chained: set[str] = set()
    for run_id in run_ids if run_ids is not None else sorted(summaries):
        history = store.chained_history(run_id)
        if any(e.chain is not None for e in history):
            chained.add(run_id)
        if history or run_id in summaries:
            findings.extend(verify_history(summaries.get(run_id), history))
    registry = store.run_registry()
    if run_ids is None:
        findings.extend(verify_registry(registry, list(summaries), chained))
        findings.extend(f for p in store.list_policies() if (f := verify_policy(p)) is not None)
    return findings, registry_head(registry)


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
        overrides = {
            o.override_id: o
            for o in store.list_overrides(run_id, include_cleared=True)
            if o.override_id is not None
        }
        runs += 1
        decisions += len(epochs)
        differences.extend(replay_run(epochs, policy_for, overrides))
    return runs, decisions, differences
