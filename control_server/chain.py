"""The record's tamper evidence: hash chains, computed here and checked by replay.

Each decision stored in a run's current history carries `chain`: the SHA-256 of the
chain of the decision it continued from (its `previous_epoch`; "" for a run's first)
and of everything the epoch recorded: the report, the decision and the policy state
stored with it. Editing any of them, or deleting a row of the history, breaks the
chain at that row or the next. Every run is also entered, once, in a chained
registry (`run_registry`): deleting a whole run leaves its entry behind, and
deleting an entry breaks the registry's chain. Policy versions are hashes of their
content, so an edited document no longer hashes to its version.

What a chain cannot show by itself: rows cut from the END of a history together
with the run's summary, or the newest registry entries together with their runs.
`verify` checks the summary's epoch count and newest epoch against the history,
and prints the registry's head so that an operator can keep it elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_server.domain import Decision, DomainError, PolicyVersion, Report, RunSummary
from control_server.policy.document import parse_policy

#: The chain value before a history's first row, and before the registry's first entry.
GENESIS = ""

_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _digest(previous: str, payload: Any) -> str:
    return hashlib.sha256(f"{previous}\n{_JSON.encode(payload)}".encode()).hexdigest()


def link(previous: str | None, report: Report, decision: Decision, state: str) -> str:
    """The chain value of an epoch recorded after `previous` (None: a run's first)."""
    r, d = report, decision
    return _digest(
        previous or GENESIS,
        [
            [r.run_id, r.epoch, r.train_loss, r.val_loss, r.pseudo_dice, r.avg_gradient_norm],
            [r.intervention_count, r.current_lr, r.initial_lr, dict(r.loss_weights)],
            [r.labels.dataset, r.labels.configuration, r.labels.fold],
            [r.labels.trainer, r.labels.plans, r.labels.host],
            [d.decision_id, d.run_id, d.epoch, d.action.value, d.source.value, d.reason],
            [d.policy_version, _time(d.decided_at), d.lr, dict(d.loss_weights)],
            [d.intervention_index, d.override_id, d.previous_epoch, d.attempt, d.late],
            state,
        ],
    )


def register(previous: str | None, run_id: str, at: datetime) -> str:
    """The registry hash of a run entered after `previous` (None: the first entry)."""
    return _digest(previous or GENESIS, [run_id, _time(at)])


@dataclass(frozen=True)
class ChainedEpoch:
    """One epoch of a run's current history as stored, with its chain value (None:
    recorded before chains existed)."""

    report: Report
    decision: Decision
    state: str
    chain: str | None


@dataclass(frozen=True)
class RegistryEntry:
    seq: int
    run_id: str
    registered_at: datetime
    hash: str


def verify_history(summary: RunSummary | None, epochs: Sequence[ChainedEpoch]) -> list[str]:
    """What was edited or deleted in one run's history, one finding per line."""
    findings: list[str] = []
    chains: dict[int, str | None] = {}
    run_id = summary.run_id if summary is not None else epochs[0].report.run_id
    for e in epochs:
        epoch = e.report.epoch
        previous = e.decision.previous_epoch
        if e.chain is None:
            chains[epoch] = None  # recorded before the chain existed
            continue
        if previous is not None and previous not in chains:
            findings.append(
                f"run {run_id} epoch {epoch}: the epoch {previous} it continued from is "
                "missing (deleted)"
            )
        expected = link(chains.get(previous) if previous is not None else None, *_parts(e))
        if e.chain != expected:
            findings.append(
                f"run {run_id} epoch {epoch}: report, decision or policy state edited "
                "(or an earlier row of the run deleted): the chain does not match"
            )
        chains[epoch] = e.chain
    if summary is not None and epochs:
        if summary.report_count != len(epochs) or summary.last_epoch != epochs[-1].report.epoch:
            findings.append(
                f"run {run_id}: its summary counts {summary.report_count} epochs up to "
                f"{summary.last_epoch}, its history holds {len(epochs)} up to "
                f"{epochs[-1].report.epoch} (rows deleted or added)"
            )
    elif summary is not None and summary.report_count:
        findings.append(
            f"run {run_id}: its summary counts {summary.report_count} epochs, "
            "its history holds none (deleted)"
        )
    return findings


def _parts(e: ChainedEpoch) -> tuple[Report, Decision, str]:
    return e.report, e.decision, e.state


def verify_registry(
    entries: Sequence[RegistryEntry], run_ids: Sequence[str], chained_runs: set[str]
) -> list[str]:
    """Deleted runs, deleted or edited registry entries, and runs never registered.
    `chained_runs`: the runs that have chained rows (older runs were never registered)."""
    findings: list[str] = []
    previous: str | None = None
    for entry in entries:
        if entry.hash != register(previous, entry.run_id, entry.registered_at):
            findings.append(
                f"run registry entry {entry.seq} ({entry.run_id}): edited, or an entry "
                "before it deleted"
            )
        previous = entry.hash
    registered = {e.run_id for e in entries}
    present = set(run_ids)
    for run_id in sorted(registered - present):
        findings.append(f"run {run_id}: registered but not in the store (deleted)")
    for run_id in sorted((chained_runs & present) - registered):
        findings.append(f"run {run_id}: not in the run registry (its entry was deleted)")
    return findings


def verify_policy(policy: PolicyVersion) -> str | None:
    """A finding when a stored policy document no longer hashes to its version."""
    try:
        content = parse_policy(dict(policy.document)).version
    except (ValueError, DomainError) as exc:
        return f"policy {policy.version}: its stored document no longer parses ({exc})"
    if content != policy.version:
        return (
            f"policy {policy.version}: its stored document was edited (it now hashes to {content})"
        )
    return None


def registry_head(entries: Sequence[RegistryEntry]) -> str:
    return entries[-1].hash if entries else GENESIS
