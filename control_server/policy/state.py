"""The policy's fold state: everything the next decision of a run needs.

The service stores it as JSON after every decision, so that the run's next
report continues from it on any replica. `to_json` is compact and
deterministic (sorted keys, shortest round-tripping float repr), and
`from_json(to_json(s)) == s` holds for every state the engine produces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control_server.domain import frozen_map

#: Bumped when the JSON layout changes incompatibly.
STATE_FORMAT = 1


@dataclass(frozen=True)
class InterventionMark:
    """An automatic intervention the divergence guard may still have to undo."""

    epoch: int
    k: int
    value: float  # raw monitored value of the intervention's epoch
    lr_before: float
    weights_before: Mapping[str, float] = field(default_factory=frozen_map)

    def to_data(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "k": self.k,
            "value": self.value,
            "lr_before": self.lr_before,
            "weights_before": dict(self.weights_before),
        }

    @classmethod
    def from_data(cls, data: Any) -> InterventionMark:
        obj = _mapping(data, "mark")
        raw_weights = _mapping(obj.get("weights_before", {}), "mark.weights_before")
        weights = {str(k): _float(v, f"mark.weights_before.{k}") for k, v in raw_weights.items()}
        return cls(
            epoch=_int(obj.get("epoch"), "mark.epoch"),
            k=_int(obj.get("k"), "mark.k"),
            value=_float(obj.get("value"), "mark.value"),
            lr_before=_float(obj.get("lr_before"), "mark.lr_before"),
            weights_before=frozen_map(weights),
        )


@dataclass(frozen=True)
class PolicyState:
    """The fold state after a report (ReduceLROnPlateau's counters plus the guard's mark)."""

    # Best (possibly smoothed) monitored value so far; None before the first finite one.
    best: float | None = None
    num_bad_epochs: int = 0
    cooldown_left: int = 0
    # Smoothed monitored value; None when EMA is off or nothing finite was seen yet.
    ema: float | None = None
    # Epoch of the last report folded in (bookkeeping only; decisions never read it).
    last_epoch: int | None = None
    mark: InterventionMark | None = None

    def to_json(self) -> str:
        """Compact, deterministic JSON (stored with each decision)."""
        data = {
            "v": STATE_FORMAT,
            "best": self.best,
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_left": self.cooldown_left,
            "ema": self.ema,
            "last_epoch": self.last_epoch,
            "mark": None if self.mark is None else self.mark.to_data(),
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PolicyState:
        """Parse `to_json` output; raise ValueError naming the bad field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy state is not valid JSON: {exc}") from exc
        obj = _mapping(data, "state")
        if obj.get("v") != STATE_FORMAT:
            raise ValueError(f"state.v must be {STATE_FORMAT}, but got {obj.get('v')!r}.")
        mark = obj.get("mark")
        last_epoch = obj.get("last_epoch")
        return cls(
            best=_optional_float(obj.get("best"), "best"),
            num_bad_epochs=_int(obj.get("num_bad_epochs", 0), "num_bad_epochs"),
            cooldown_left=_int(obj.get("cooldown_left", 0), "cooldown_left"),
            ema=_optional_float(obj.get("ema"), "ema"),
            last_epoch=None if last_epoch is None else _int(last_epoch, "last_epoch"),
            mark=None if mark is None else InterventionMark.from_data(mark),
        )


INITIAL_STATE = PolicyState()
"""The state before a run's first report."""


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"state.{where} must be an object, but got {value!r}.")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"state.{where} must be an integer, but got {value!r}.")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"state.{where} must be a number, but got {value!r}.")
    return float(value)


def _optional_float(value: Any, where: str) -> float | None:
    return None if value is None else _float(value, where)
