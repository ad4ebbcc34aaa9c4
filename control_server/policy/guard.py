"""The divergence guard: undo an automatic intervention that made things worse."""

from __future__ import annotations

import math
from dataclasses import dataclass

from control_server.domain import Action, Report, Source, Verdict
from control_server.policy._text import num, pct
from control_server.policy._text import weights as fmt_weights
from control_server.policy.document import GuardConfig
from control_server.policy.state import InterventionMark


@dataclass(frozen=True)
class Window:
    """Where a report stands relative to the pending intervention mark."""

    mark: InterventionMark | None  # the mark to carry into the next state
    armed: InterventionMark | None  # the mark this report is judged against


def window(cfg: GuardConfig, mark: InterventionMark | None, report: Report) -> Window:
    """Arm the guard for epochs 1..guard_epochs after an intervention the client applied."""
    if mark is None:
        return Window(None, None)
    elapsed = report.epoch - mark.epoch
    if elapsed < 1:
        # Nothing after the intervention yet (a replay of its own epoch): keep waiting.
        return Window(mark, None)
    if report.intervention_count < mark.k or elapsed > cfg.guard_epochs:
        # Never applied (the client failed open) or the window has passed.
        return Window(None, None)
    # The last watched epoch clears the mark once it has been judged.
    return Window(mark if elapsed < cfg.guard_epochs else None, mark)


def is_worse(mode: str, value: float, reference: float, tolerance: float) -> bool:
    """True when `value` is worse than `reference` by more than tolerance * |reference|."""
    margin = tolerance * abs(reference)
    return value > reference + margin if mode == "min" else value < reference - margin


def check(
    cfg: GuardConfig,
    mode: str,
    mark: InterventionMark,
    report: Report,
    name: str,
    raw: float | None,
) -> Verdict | None:
    """ROLLBACK when the losses are not finite or `raw` diverged from the mark; else None.

    `raw` is None (or not finite) when a Dice monitor's report has no usable pseudo
    Dice: there is nothing to compare, so only the losses are checked.
    """
    if not report.losses_finite:
        what = f"the losses are not finite ({losses(report)})"
    elif (
        raw is not None
        and math.isfinite(raw)
        and is_worse(mode, raw, mark.value, cfg.rollback_tolerance)
    ):
        if mark.value == 0:
            what = f"{name} {num(raw)} is worse than {num(mark.value)}"
        else:
            rel = abs(raw - mark.value) / abs(mark.value)
            what = f"{name} {num(raw)} is {pct(rel)} worse than {num(mark.value)}"
    else:
        return None
    restore = f"LR {num(mark.lr_before)}"
    restore += (
        f" and weights {fmt_weights(mark.weights_before)}"
        if mark.weights_before
        else " (weights were not reported)"
    )
    return Verdict(
        action=Action.ROLLBACK,
        source=Source.SAFETY,
        reason=(
            f"Divergence guard: {what} at intervention {mark.k} (epoch {mark.epoch}), "
            f"beyond the {pct(cfg.rollback_tolerance)} tolerance; rolling back to {restore}."
            if report.losses_finite
            else f"Divergence guard: {what} {_within(report, mark)}; rolling back to {restore}."
        ),
        lr=mark.lr_before,
        loss_weights=mark.weights_before,
        intervention_index=0,
    )


def _within(report: Report, mark: InterventionMark) -> str:
    elapsed = report.epoch - mark.epoch
    return (
        f"{elapsed} epoch{'' if elapsed == 1 else 's'} after intervention {mark.k} "
        f"(epoch {mark.epoch})"
    )


def losses(report: Report) -> str:
    """The reported losses, for reasons about non-finite values ("train_loss nan, val_loss 0.3")."""
    text = f"train_loss {num(report.train_loss)}"
    if report.val_loss is not None:
        text += f", val_loss {num(report.val_loss)}"
    return text
