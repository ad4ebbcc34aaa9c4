"""Policy documents read from files: an operator's YAML file, or the one shipped in
``control_server/builtin_policies/``. (The policy engine itself reads no files.)"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from control_server.policy.document import (
    PolicyDoc,
    PolicyError,
    parse_policy_source,
    parse_policy_yaml,
)

__all__ = ["DEFAULT_POLICY_RESOURCE", "default_policy", "load_policy_file"]

#: The file of the shipped default policy, in ``control_server.builtin_policies``.
DEFAULT_POLICY_RESOURCE = "default.yaml"


def load_policy_file(path: str | Path) -> PolicyDoc:
    """Read and validate a YAML policy file, with the limits and rules PutPolicy applies
    (`parse_policy_source`); a PolicyError names the file."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return parse_policy_source(text)
    except PolicyError as exc:
        raise PolicyError(exc.field, f"{exc.problem} (in {path})") from None


def default_policy() -> PolicyDoc:
    """The policy shipped with the package (the product's defaults)."""
    shipped = resources.files("control_server.builtin_policies") / DEFAULT_POLICY_RESOURCE
    return parse_policy_yaml(shipped.read_text(encoding="utf-8"))
