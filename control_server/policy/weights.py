"""The intervention's loss weights: keep, a seeded random mix, or the final mix."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from control_server.domain import frozen_map
from control_server.policy._text import weights as fmt_weights
from control_server.policy.document import InterventionConfig


def mix_seed(run_id: str, epoch: int, k: int, version: str) -> int:
    """The RNG seed of intervention k: sha256, so every process and replica agrees.

    Python's hash() is salted per process and would break replay.
    """
    digest = hashlib.sha256(f"{run_id}|{epoch}|{k}|{version}".encode()).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class WeightPlan:
    """Intervention k's weights and how they were chosen."""

    weights: Mapping[str, float]
    kind: str  # "keep", "random" or "final"
    mix_index: int = 0  # 0-based index into random_mixes when kind == "random"
    mix_count: int = 0

    def clause(self) -> str:
        """'weights dice 0.6, focal 0.4 (final mix)'."""
        if self.kind == "keep":
            return "weights kept" + (f" ({fmt_weights(self.weights)})" if self.weights else "")
        if self.kind == "final":
            return f"weights {fmt_weights(self.weights)} (final mix)"
        return (
            f"weights {fmt_weights(self.weights)} "
            f"(seeded draw: mix {self.mix_index + 1} of {self.mix_count})"
        )


def plan_weights(
    cfg: InterventionConfig,
    k: int,
    run_id: str,
    epoch: int,
    version: str,
    current: Mapping[str, float],
) -> WeightPlan:
    """k = 1 keeps `current`; the last k of the budget (k > 1) takes the final mix;
    any other k draws one of the random mixes with a generator seeded by
    (run_id, epoch, k, version)."""
    if k <= 1:
        return WeightPlan(frozen_map(current), "keep")
    if k >= cfg.max_interventions:
        return WeightPlan(frozen_map(cfg.final_mix), "final")
    rng = random.Random(mix_seed(run_id, epoch, k, version))
    index = rng.randrange(len(cfg.random_mixes))
    return WeightPlan(frozen_map(cfg.random_mixes[index]), "random", index, len(cfg.random_mixes))
