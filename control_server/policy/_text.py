"""Number and weight formatting shared by the reasons (one style everywhere)."""

from __future__ import annotations

from collections.abc import Mapping


def num(value: float) -> str:
    """A compact number: four significant digits, %g style ("0.005", "-0.4123", "1e-05")."""
    return f"{value:.4g}"


def pct(fraction: float) -> str:
    """A fraction as a percentage ("50%")."""
    return f"{fraction * 100:.4g}%"


def weights(mix: Mapping[str, float]) -> str:
    """A weight map in key order ("dice 0.6, focal 0.4"); empty reads "unchanged"."""
    if not mix:
        return "unchanged"
    return ", ".join(f"{name} {num(mix[name])}" for name in sorted(mix))


def sentence(text: str) -> str:
    """Operator-supplied text without a trailing full stop, so it nests in one sentence."""
    return text.strip().rstrip(".")
