"""What a candidate policy would have decided on recorded runs (ReplayPolicy).

The candidate replaces every recorded decision's policy, epoch by epoch, along the
recorded chain and under the recorded overrides (`replay.replay_store`, as
``control-server replay --policy`` does). Read-only: nothing is stored and nothing
reaches a trainer. After a run's first difference the rest of it is indicative
only: the real run reacted to the recorded decisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from control_server.domain import Decision, InvalidArgument
from control_server.policy.document import PolicyDoc
from control_server.replay import Difference, replay_store
from control_server.store import Store

__all__ = [
    "DEFAULT_MAX_DIFFERENCES",
    "DEFAULT_RUNS",
    "MAX_DIFFERENCES",
    "MAX_RUNS",
    "WhatIf",
    "check_replay_limits",
    "decides_otherwise",
    "replay_candidate",
]

#: Runs replayed when the caller names no limit, and the most it may name.
DEFAULT_RUNS = 100
MAX_RUNS = 1000
#: Differences listed when the caller names no maximum, and the most it may name.
DEFAULT_MAX_DIFFERENCES = 200
MAX_DIFFERENCES = 10_000


@dataclass(frozen=True)
class WhatIf:
    """The candidate's decisions against the recorded ones."""

    version: str
    name: str
    runs: int
    decisions: int
    differing: int
    runs_differing: int
    #: Differences by "RECORDED->CANDIDATE" action pair.
    by_transition: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: The first differences, in run then epoch order.
    differences: tuple[Difference, ...] = ()


def check_replay_limits(limit: int, max_differences: int) -> tuple[int, int]:
    """(runs, differences listed) with their defaults; InvalidArgument naming the field."""
    if not 0 <= limit <= MAX_RUNS:
        raise InvalidArgument("limit", f"must be between 0 and {MAX_RUNS}, but got {limit}")
    if not 0 <= max_differences <= MAX_DIFFERENCES:
        raise InvalidArgument(
            "max_differences",
            f"must be between 0 and {MAX_DIFFERENCES}, but got {max_differences}",
        )
    return limit or DEFAULT_RUNS, max_differences or DEFAULT_MAX_DIFFERENCES


def decides_otherwise(difference: Difference) -> bool:
    """A different action, LR or weight map, as the shadow summary counts them: a reason
    worded otherwise (another patience, another name) changes nothing for a trainer."""
    recorded, candidate = difference.recorded, difference.recomputed
    return (
        recorded.action != candidate.action
        or recorded.lr != candidate.lr
        or dict(recorded.loss_weights) != dict(candidate.loss_weights)
    )


def replay_candidate(
    store: Store, doc: PolicyDoc, run_ids: Sequence[str], max_differences: int
) -> WhatIf:
    """Replay `run_ids` with `doc` in place of every recorded decision's policy."""

    def candidate(_recorded: Decision) -> tuple[PolicyDoc, str]:
        return doc, doc.version

    runs, decisions, found = replay_store(store, run_ids, candidate)
    differences = sorted(
        (d for d in found if decides_otherwise(d)), key=lambda d: (d.run_id, d.epoch)
    )
    transitions = Counter(
        f"{d.recorded.action.value}->{d.recomputed.action.value}" for d in differences
    )
    return WhatIf(
        version=doc.version,
        name=doc.name,
        runs=runs,
        decisions=decisions,
        differing=len(differences),
        runs_differing=len({d.run_id for d in differences}),
        by_transition=MappingProxyType(dict(sorted(transitions.items()))),
        differences=tuple(differences[:max_differences]),
    )
