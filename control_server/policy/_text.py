"""Number and weight formatting shared by the reasons (one style everywhere)."""

from __future__ import annotations

from collections.abc import Mapping


def num(value: float) -> str:
    """A compact number: four significant digits, %g style ("0.005", "-0.4123", "1e-05")."""
    return f"{value:.4g}"


def pct(fraction: float) -> str:
    """A fraction as a percentage ("50%")."""
    return f"{fraction * 100:.4g}%"


def nums(a: float, b: float) -> tuple[str, str]:
    """Two numbers in `num` style, with more digits where four would make unequal
    values read the same ("0.50001" and "0.5", not "0.5" and "0.5")."""
    return _distinct(a, b, 1.0, "")


def pcts(a: float, b: float) -> tuple[str, str]:
    """Two fractions in `pct` style, told apart like `nums` ("1.9996%" and "2%")."""
    return _distinct(a, b, 100.0, "%")


def _distinct(a: float, b: float, scale: float, suffix: str) -> tuple[str, str]:
    digits = 4
    while True:
        sa, sb = f"{a * scale:.{digits}g}{suffix}", f"{b * scale:.{digits}g}{suffix}"
        if sa != sb or a == b or digits >= 17:
            return sa, sb
        digits += 1


def weights(mix: Mapping[str, float]) -> str:
    """A weight map in key order ("dice 0.6, focal 0.4"); empty reads "unchanged"."""
    if not mix:
        return "unchanged"
    return ", ".join(f"{name} {num(mix[name])}" for name in sorted(mix))


def sentence(text: str) -> str:
    """Operator-supplied text without a trailing full stop, so it nests in one sentence."""
    return text.strip().rstrip(".")
