"""Policy experiments: arms, the deterministic assignment of runs, promote and end.

An experiment assigns each new run its selector matches to one arm, once, at
the run's first StartRun. The arm is a pure function of (experiment name, run
id, arms): every replica, and every restart, computes the same one, and the
store keeps the first assignment made (a resumed attempt keeps its arm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from control_server.domain import ExperimentArm

__all__ = ["assign_arm"]


def assign_arm(experiment: str, run_id: str, arms: Sequence[ExperimentArm]) -> ExperimentArm:
    """The arm `run_id` belongs to: a uniform draw from SHA-256(experiment, run id)
    placed on the arms' cumulative shares (in the order the arms were given)."""
    if not arms:
        raise ValueError("assign_arm() needs at least one arm, but got none.")
    digest = hashlib.sha256(f"{experiment}\0{run_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64 * sum(a.share for a in arms)
    total = 0.0
    for arm in arms:
        total += arm.share
        if draw < total:
            return arm
    return arms[-1]  # float rounding at the very top of the range
