"""The words both sides of training control share: loss components, run labels,
weights, and the errors the server's use cases raise.

Plain Python, no dependencies: the trainer (`trainer_client`, its nnU-Net
package) and the server (`control_server`: conversion, overrides, policy
documents, `controlctl`) import these definitions instead of spelling them
again, so a new loss component or label is added in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "LABEL_KEYS",
    "LOSS_COMPONENTS",
    "SELECTOR_KEYS",
    "DomainError",
    "FailedPrecondition",
    "InvalidArgument",
    "LossWeightError",
    "NotFound",
    "ResourceExhausted",
    "StoreUnavailable",
    "check_loss_weights",
]

#: The loss components the trainer implements and a weight map may name.
LOSS_COMPONENTS: tuple[str, ...] = ("dice", "ce", "focal", "variance")
#: nnU-Net's default loss: ``DC_and_CE_loss`` with both weights 1.
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = MappingProxyType({"dice": 1.0, "ce": 1.0})
#: The labels a run may carry (the fields of the API's `RunLabels`).
LABEL_KEYS: tuple[str, ...] = ("dataset", "configuration", "fold", "trainer", "plans", "host")
#: The labels a policy pin or a run filter selects on (a prefix of `LABEL_KEYS`).
SELECTOR_KEYS: tuple[str, ...] = LABEL_KEYS[:3]


class DomainError(Exception):
    """Base of the errors the server's use cases raise; `trainer_client.errors.status_of`
    gives the status code a call that raised one ends with."""


class InvalidArgument(DomainError):
    """A request field is malformed; `field` names it and `problem` says what is wrong."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


class NotFound(DomainError):
    """The named object does not exist."""


class FailedPrecondition(DomainError):
    """The request is well formed but contradicts what the run's record holds (a
    retry with a different payload, an epoch older than the attempt's last, a
    superseded attempt)."""


class ResourceExhausted(DomainError):
    """The answer would exceed a limit (e.g. a page over the message size limit)."""


class StoreUnavailable(DomainError):
    """The store cannot be reached or refused the write; nothing was decided."""


class LossWeightError(ValueError):
    """A weight map is not one the trainer can apply.

    `component` names the offending entry (None: the map as a whole); `problem`
    says what is wrong with it, without naming it, so that each caller can name
    the field in its own terms (``loss_weights['x']``, ``intervention.final_mix.x``).
    """

    def __init__(self, component: str | None, problem: str) -> None:
        super().__init__(f"{component}: {problem}" if component is not None else problem)
        self.component = component
        self.problem = problem


def check_loss_weights(
    weights: Mapping[str, Any], *, allow_all_zero: bool = False
) -> dict[str, float]:
    """A validated copy of a weight map: known components, finite weights >= 0 and,
    unless `allow_all_zero`, not all 0 (an empty map is all 0). Raises
    LossWeightError for the first problem, in the map's order."""
    checked: dict[str, float] = {}
    for component, weight in weights.items():
        if component not in LOSS_COMPONENTS:
            raise LossWeightError(
                component, f"unknown loss component; expected one of {', '.join(LOSS_COMPONENTS)}"
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise LossWeightError(component, f"must be a finite number >= 0, but got {weight!r}")
        checked[component] = float(weight)
    if not allow_all_zero and not any(checked.values()):
        raise LossWeightError(None, "must not all be 0")
    return checked
