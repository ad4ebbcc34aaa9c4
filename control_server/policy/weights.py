"""The intervention's loss weights: keep, a seeded random mix, or the final mix."""

from __future__ import annotations

import hashlib
import math
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
        return f"weights {fmt_weights(self.weights)} ({self._origin()})"

    def changes_nothing(self, current: Mapping[str, float]) -> bool:
        """The weights are the current ones (every component, to one part in a billion)."""
        return set(self.weights) == set(current) and all(
            math.isclose(w, current[name], rel_tol=1e-9) for name, w in self.weights.items()
        )

    def unchanged_clause(self) -> str:
        """'the loss weights stay ce 1, dice 1 (kept)', or '(final mix)' when the mix
        the intervention would set is the current one."""
        if not self.weights:
            return "the loss weights stay as they are (none reported)"
        origin = "kept" if self.kind == "keep" else self._origin()
        return f"the loss weights stay {fmt_weights(self.weights)} ({origin})"

    def _origin(self) -> str:
        if self.kind == "final":
            return "final mix"
        return f"seeded draw: mix {self.mix_index + 1} of {self.mix_count}"


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
