"""Plateau detection with PyTorch ReduceLROnPlateau's counting, plus warmup and EMA.

One deliberate difference from PyTorch: `rel` thresholds are relative to |best|
(nnU-Net losses are often negative). On non-negative values the comparison is
computed exactly as PyTorch computes it, so the two agree to the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from control_server.domain import Report
from control_server.policy._text import num, nums, pct, pcts
from control_server.policy.document import DICE_MONITORS, PlateauConfig
from control_server.policy.state import PolicyState


def monitored_value(cfg: PlateauConfig, report: Report) -> tuple[str, float | None]:
    """The name of the value the policy compares and its raw value in `report`:
    `val_loss` falls back to `train_loss` when a report has none; the Dice monitors
    read `pseudo_dice` (None when the report has none)."""
    if cfg.monitor in DICE_MONITORS:
        return "pseudo_dice", report.pseudo_dice
    if cfg.monitor == "val_loss" and report.val_loss is not None:
        return "val_loss", report.val_loss
    return "train_loss", report.train_loss


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


#: nnU-Net's own smoothing of the pseudo Dice: ema = 0.9 * ema + 0.1 * dice, seeded
#: with the first value (nnUNetTrainer.on_validation_epoch_end's ema_fg_dice).
NNUNET_DICE_EMA_ALPHA = 0.1


def smoothing(cfg: PlateauConfig) -> float | None:
    """The EMA alpha applied to the monitored value; None when it is compared raw.

    `ema_pseudo_dice` smooths as nnU-Net does, so the compared value is the
    ema_fg_dice nnU-Net selects its best checkpoint by (when every epoch reports a
    pseudo Dice: an epoch without one leaves the EMA as it was).
    """
    if cfg.monitor == "ema_pseudo_dice":
        return NNUNET_DICE_EMA_ALPHA
    return cfg.ema_alpha


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
    alpha = smoothing(cfg)
    if alpha is not None:
        ema = raw if ema is None else alpha * raw + (1 - alpha) * ema
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
    """How reasons name the compared value ("val_loss", "val_loss EMA", "ema_pseudo_dice")."""
    if cfg.monitor == "ema_pseudo_dice":
        return "ema_pseudo_dice"
    return monitored if cfg.ema_alpha is None else f"{monitored} EMA"


def plateau_clause(cfg: PlateauConfig, name: str, obs: Observation) -> str:
    """'val_loss 0.412 improved on the best 0.42 by 1.905%, less than the 2% threshold;
    no improvement beyond the threshold for 3 epochs (patience: 2 epochs without
    improvement allowed)'."""
    return f"{comparison(cfg, name, obs)}; {_streak(cfg, obs.state.num_bad_epochs)}"


def status_clause(cfg: PlateauConfig, name: str, obs: Observation, epoch: int) -> str:
    """The counters' state when nothing fires, as a clause for a NONE reason."""
    if obs.due and not obs.allowed:
        return (
            f"{plateau_clause(cfg, name, obs)}, but no intervention before warmup ends "
            f"at epoch {cfg.warmup_epochs}"
        )
    if obs.improved:
        text = comparison(cfg, name, obs)
    elif obs.in_cooldown:
        left = obs.state.cooldown_left
        text = f"{comparison(cfg, name, obs)}; not counted (cooldown, {_epochs(left)} left)"
    else:
        text = plateau_clause(cfg, name, obs)
    if epoch < cfg.warmup_epochs:
        return f"{text}; warmup until epoch {cfg.warmup_epochs}"
    return text


def comparison(cfg: PlateauConfig, name: str, obs: Observation) -> str:
    """This epoch's value against the best before it, in the threshold's unit (a
    percentage of |best| for `rel`, the difference for `abs`): worse than, equal to,
    better but not by more than the threshold, or a new best."""
    value, best = obs.value, obs.previous_best
    if best is None:
        return f"{name} {num(value)} sets the first best"
    shown, shown_best = nums(value, best)
    gain = best - value if cfg.mode == "min" else value - best
    if gain < 0:
        return f"{name} {shown} is worse than the best {shown_best}"
    if gain == 0:
        return f"{name} {shown} equals the best {shown_best}"
    text = f"{name} {shown} improved on the best {shown_best} by "
    if obs.improved:
        return f"{text}{_amount(cfg, gain, best)}, a new best"
    return text + _short_of_threshold(cfg, gain, best)


def _amount(cfg: PlateauConfig, gain: float, best: float) -> str:
    if cfg.threshold_mode == "rel" and best != 0:
        return pct(gain / abs(best))
    return num(gain)


def _short_of_threshold(cfg: PlateauConfig, gain: float, best: float) -> str:
    """'1.905%, less than the 2% threshold'; a gain equal to the threshold (to the
    last bit) is 'not more than' it, as is_better compares strictly."""
    t = cfg.min_delta
    relative = cfg.threshold_mode == "rel" and best != 0
    amount = gain / abs(best) if relative else gain
    if amount < t:
        shown, threshold = pcts(amount, t) if relative else nums(amount, t)
        return f"{shown}, less than the {threshold} threshold"
    threshold = pct(t) if relative else num(t)
    return f"{threshold}, not more than the {threshold} threshold"


def _streak(cfg: PlateauConfig, count: int) -> str:
    """'no improvement beyond the threshold for 3 epochs (patience: 2 epochs without
    improvement allowed)': the count fires once it exceeds the patience."""
    what = "no improvement beyond the threshold" if cfg.min_delta > 0 else "no improvement"
    return (
        f"{what} for {_epochs(count)} "
        f"(patience: {_epochs(cfg.patience)} without improvement allowed)"
    )


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"
