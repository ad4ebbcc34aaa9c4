"""The decision policy: a validated document and the pure engine that applies it."""

from control_server.policy.document import (
    GuardConfig,
    InterventionConfig,
    PlateauConfig,
    PolicyDoc,
    PolicyError,
    parse_policy,
    parse_policy_source,
    parse_policy_yaml,
)
from control_server.policy.engine import last_verdict, step
from control_server.policy.state import INITIAL_STATE, InterventionMark, PolicyState

__all__ = [
    "INITIAL_STATE",
    "GuardConfig",
    "InterventionConfig",
    "InterventionMark",
    "PlateauConfig",
    "PolicyDoc",
    "PolicyError",
    "PolicyState",
    "last_verdict",
    "parse_policy",
    "parse_policy_source",
    "parse_policy_yaml",
    "step",
]
