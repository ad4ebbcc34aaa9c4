"""Plateau detection with PyTorch ReduceLROnPlateau's counting, plus warmup and EMA.

One deliberate difference from PyTorch: `rel` thresholds are relative to |best|
(nnU-Net losses are often negative). On non-negative values the comparison is
computed exactly as PyTorch computes it, so the two agree to the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from control_server.policy._text import num, pct
from control_server.policy.document import PlateauConfig
from control_server.policy.state import PolicyState


def is_better(cfg: PlateauConfig, value: float, best: float | None) -> bool:
    """True when `value` beats `best` by more than the threshold (None: nothing seen yet)."""
    if best is None:
        return True
    t = cfg.min_delta
    if cfg.threshold_mode == "abs":
        return value < best - t if cfg.mode == "min" else value > best + t
    # best * (1 -/+ t) is PyTorch's own expression; mirroring it on negative
    # values makes the margin |best| * t without rounding differently.
    if cfg.mode == "min":
        return value < best * (1 - t if best >= 0 else 1 + t)
    return value > best * (1 + t if best >= 0 else 1 - t)


@dataclass(frozen=True)
class Observation:
    """One finite value folded into the counters, before any firing reset."""

    state: PolicyState
    value: float  # the value compared (smoothed when EMA is on)
    previous_best: float | None
    improved: bool
    in_cooldown: bool  # this epoch's bad count was discarded by cooldown
    due: bool  # the bad count exceeds patience
    allowed: bool  # warmup is over; `due` may fire

    @property
    def fires(self) -> bool:
        return self.due and self.allowed


def observe(cfg: PlateauConfig, state: PolicyState, raw: float, epoch: int) -> Observation:
    """Fold one finite monitored value into the counters (ReduceLROnPlateau.step)."""
    ema = state.ema
    value = raw
    if cfg.ema_alpha is not None:
        ema = raw if ema is None else cfg.ema_alpha * raw + (1 - cfg.ema_alpha) * ema
        value = ema
    improved = is_better(cfg, value, state.best)
    best = value if improved else state.best
    num_bad = 0 if improved else state.num_bad_epochs + 1
    in_cooldown = state.cooldown_left > 0
    cooldown_left = state.cooldown_left
    if in_cooldown:
        cooldown_left -= 1
        num_bad = 0
    after = replace(state, best=best, num_bad_epochs=num_bad, cooldown_left=cooldown_left, ema=ema)
    return Observation(
        state=after,
        value=value,
        previous_best=state.best,
        improved=improved,
        in_cooldown=in_cooldown,
        due=num_bad > cfg.patience,
        allowed=epoch >= cfg.warmup_epochs,
    )


def reset(cfg: PlateauConfig, state: PolicyState, *, cooldown: bool) -> PolicyState:
    """The reset after a plateau is answered; `cooldown` when something was changed."""
    return replace(state, num_bad_epochs=0, cooldown_left=cfg.cooldown if cooldown else 0)


def metric_name(cfg: PlateauConfig, monitored: str) -> str:
    """How reasons name the compared value ("val_loss", "val_loss EMA")."""
    return monitored if cfg.ema_alpha is None else f"{monitored} EMA"


def plateau_clause(cfg: PlateauConfig, name: str, obs: Observation) -> str:
    """'val_loss 0.41 has not improved on best 0.4 by more than 1% (rel) for 4 epochs
    (patience 3)'."""
    best = obs.previous_best if obs.previous_best is not None else obs.value
    margin = ""
    if cfg.min_delta > 0:
        amount = pct(cfg.min_delta) if cfg.threshold_mode == "rel" else num(cfg.min_delta)
        margin = f" by more than {amount} ({cfg.threshold_mode})"
    return (
        f"{name} {num(obs.value)} has not improved on best {num(best)}{margin} "
        f"for {obs.state.num_bad_epochs} epochs (patience {cfg.patience})"
    )


def status_clause(cfg: PlateauConfig, name: str, obs: Observation, epoch: int) -> str:
    """The counters' state when nothing fires, as a clause for a NONE reason."""
    if obs.due and not obs.allowed:
        return (
            f"{plateau_clause(cfg, name, obs)}, but no intervention before warmup ends "
            f"at epoch {cfg.warmup_epochs}"
        )
    if obs.improved:
        prev = obs.previous_best
        text = f"{name} {num(obs.value)} " + (
            "sets the first best" if prev is None else f"improved on best {num(prev)}"
        )
    elif obs.in_cooldown:
        left = obs.state.cooldown_left
        text = (
            f"{name} {num(obs.value)} did not improve on best {num(_best(obs))}; "
            f"cooldown, {left} epoch{'' if left == 1 else 's'} left"
        )
    else:
        text = (
            f"{name} {num(obs.value)} has not improved on best {num(_best(obs))} "
            f"for {obs.state.num_bad_epochs} of {cfg.patience} epochs"
        )
    if epoch < cfg.warmup_epochs:
        return f"{text} (warmup until epoch {cfg.warmup_epochs})"
    return text


def _best(obs: Observation) -> float:
    best = obs.state.best
    return obs.value if best is None else best
