"""The decision policy: a validated document and the pure engine that applies it."""

from control_server.policy.document import (
    DEFAULT_POLICY_RESOURCE,
    GuardConfig,
    InterventionConfig,
    PlateauConfig,
    PolicyDoc,
    PolicyError,
    default_policy,
    load_policy_file,
    parse_policy,
    parse_policy_yaml,
)
from control_server.policy.engine import decide, step
from control_server.policy.state import INITIAL_STATE, InterventionMark, PolicyState

__all__ = [
    "DEFAULT_POLICY_RESOURCE",
    "INITIAL_STATE",
    "GuardConfig",
    "InterventionConfig",
    "InterventionMark",
    "PlateauConfig",
    "PolicyDoc",
    "PolicyError",
    "PolicyState",
    "decide",
    "default_policy",
    "load_policy_file",
    "parse_policy",
    "parse_policy_yaml",
    "step",
]
