"""The intervention's LR: a scale from the gradient norm, progressive damping, a cap."""

from __future__ import annotations

import math
from dataclasses import dataclass

from control_server.policy._text import num
from control_server.policy.document import InterventionConfig


def lr_scale(cfg: InterventionConfig, grad_norm: float) -> float:
    """g < e0 -> s0; e0 <= g < e1 -> s1; e1 <= g <= e2 -> s2; g > e2 -> s3."""
    e0, e1, e2 = cfg.grad_norm_edges
    s0, s1, s2, s3 = cfg.lr_scales
    if grad_norm < e0:
        return s0
    if grad_norm < e1:
        return s1
    if grad_norm <= e2:
        return s2
    return s3


def damping(cfg: InterventionConfig, k: int) -> float:
    """The multiplier of intervention k (1-based); the last listed value repeats."""
    return cfg.damping[min(k, len(cfg.damping)) - 1]


@dataclass(frozen=True)
class LrPlan:
    """How intervention k's LR came about (the reason quotes every number)."""

    grad_norm: float | None  # as reported; None when missing
    grad_norm_used: float
    scale: float
    damping: float
    lr_before: float
    uncapped: float
    max_lr: float

    @property
    def lr(self) -> float:
        return min(self.uncapped, self.max_lr)

    @property
    def capped(self) -> bool:
        return self.uncapped > self.max_lr

    @property
    def changes_nothing(self) -> bool:
        """The new LR is the current one (to one part in a billion): typically the
        current LR already sits at the cap."""
        return math.isclose(self.lr, self.lr_before, rel_tol=1e-9)

    def clause(self) -> str:
        """'grad norm 0.04 -> 10x, damping 0.5, LR 0.005 -> 0.01 (capped at max_lr 0.01)'."""
        cap = f" (capped at max_lr {num(self.max_lr)})" if self.capped else ""
        return f"{self._factors()}, LR {num(self.lr_before)} -> {num(self.lr)}{cap}"

    def unchanged_clause(self) -> str:
        """Why the LR stays: 'the LR is already at its cap 0.01' or 'the LR stays 0.005
        (grad norm 0.04 -> 1x, damping 1)'."""
        if self.capped:
            return f"the LR is already at its cap {num(self.max_lr)}"
        return f"the LR stays {num(self.lr_before)} ({self._factors()})"

    def _factors(self) -> str:
        if self.grad_norm is None or math.isnan(self.grad_norm):
            grad = f"grad norm missing (counted as {num(self.grad_norm_used)})"
        else:
            grad = f"grad norm {num(self.grad_norm)}"
        return f"{grad} -> {num(self.scale)}x, damping {num(self.damping)}"


def plan_lr(
    cfg: InterventionConfig,
    k: int,
    grad_norm: float | None,
    current_lr: float,
    initial_lr: float,
) -> LrPlan:
    """new LR = min(current_lr * scale(g) * damping[k-1], max_lr or initial_lr)."""
    # A NaN norm says nothing about the landscape: treat it as missing.
    used = cfg.missing_grad_norm
    if grad_norm is not None and not math.isnan(grad_norm):
        used = grad_norm
    scale = lr_scale(cfg, used)
    factor = damping(cfg, k)
    return LrPlan(
        grad_norm=grad_norm,
        grad_norm_used=used,
        scale=scale,
        damping=factor,
        lr_before=current_lr,
        uncapped=current_lr * scale * factor,
        max_lr=cfg.max_lr if cfg.max_lr is not None else initial_lr,
    )
