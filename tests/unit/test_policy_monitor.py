"""The Dice monitors: pseudo_dice and ema_pseudo_dice (what nnU-Net selects its best
checkpoint by), their validation, nnU-Net's EMA, and epochs without a pseudo Dice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from control_server.domain import Action, Override, Report, Source, Verdict
from control_server.policy import INITIAL_STATE, PolicyDoc, PolicyError, PolicyState, step
from control_server.policy import parse_policy as parse
from control_server.policy.plateau import monitored_value
from control_server.policy_files import default_policy
from tests.factories import policy_report
from tests.unit.test_policy_plateau import torch_fired

VERSION = "v-test"


def doc(guard_epochs: int = 0, **plateau: Any) -> PolicyDoc:
    """A Dice policy without warmup and with a huge budget (the guard off by default)."""
    return parse(
        {
            "plateau": {"monitor": "pseudo_dice", "mode": "max", "warmup_epochs": 0, **plateau},
            "interventions": {"max_interventions": 1000},
            "guard": {"guard_epochs": guard_epochs},
        }
    )


def report(epoch: int, dice: float | None, **fields: Any) -> Report:
    """Losses falling steadily (a loss monitor would never see a plateau) and `dice`."""
    values = {"current_lr": 0.001, "avg_gradient_norm": 0.2, "pseudo_dice": dice, **fields}
    return policy_report(epoch, 1.0 - 0.05 * epoch, **values)


def run(policy: PolicyDoc, dice: Sequence[float | None]) -> list[tuple[Verdict, PolicyState]]:
    """Fold the policy over a Dice curve with a client that applies every intervention."""
    state, count, out = INITIAL_STATE, 0, []
    for epoch, value in enumerate(dice):
        verdict, state = step(
            policy, VERSION, state, report(epoch, value, intervention_count=count)
        )
        count += verdict.action is Action.INTERVENE
        out.append((verdict, state))
    return out


def fired(steps: Sequence[tuple[Verdict, PolicyState]]) -> list[int]:
    return [i for i, (v, _) in enumerate(steps) if v.action is Action.INTERVENE]


# --- the document ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("plateau", "field", "message"),
    [
        (
            {"monitor": "pseudo_dice"},
            "plateau.mode",
            "must be max when plateau.monitor is pseudo_dice (higher Dice is better), "
            "but got 'min'",
        ),
        (
            {"monitor": "ema_pseudo_dice", "mode": "min"},
            "plateau.mode",
            "must be max when plateau.monitor is ema_pseudo_dice (higher Dice is better), "
            "but got 'min'",
        ),
        (
            {"monitor": "ema_pseudo_dice", "mode": "max", "ema_alpha": 0.3},
            "plateau.ema_alpha",
            "must be null when plateau.monitor is ema_pseudo_dice (it already is nnU-Net's "
            "EMA of the pseudo Dice, with alpha 0.1), but got 0.3",
        ),
        (
            {"monitor": "dice", "mode": "max"},
            "plateau.monitor",
            "must be one of val_loss, train_loss, pseudo_dice, ema_pseudo_dice, but got 'dice'",
        ),
    ],
)
def test_a_dice_monitor_needs_mode_max_and_no_second_ema(
    plateau: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(PolicyError) as err:
        parse({"plateau": plateau})
    assert err.value.field == field
    assert str(err.value) == f"{field}: {message}"


def test_the_dice_monitors_are_accepted_and_existing_versions_stay() -> None:
    assert parse({"plateau": {"monitor": "pseudo_dice", "mode": "max"}}).plateau.monitor == (
        "pseudo_dice"
    )
    smoothed = parse({"plateau": {"monitor": "pseudo_dice", "mode": "max", "ema_alpha": 0.3}})
    assert smoothed.plateau.ema_alpha == 0.3
    ema = parse({"plateau": {"monitor": "ema_pseudo_dice", "mode": "max", "ema_alpha": None}})
    assert ema.plateau.ema_alpha is None
    # No field was added: the shipped default hashes as it did before the Dice monitors.
    assert default_policy().version == "90ab633fdc82"


# --- what is compared -----------------------------------------------------------


def test_monitored_value_names_the_value_and_reads_it_raw() -> None:
    with_val = report(3, 0.7)  # losses 0.85
    no_val = report(3, None, val_loss=None)
    loss, train = parse({}).plateau, parse({"plateau": {"monitor": "train_loss"}}).plateau
    assert monitored_value(loss, with_val) == ("val_loss", 0.85)
    assert monitored_value(loss, no_val) == ("train_loss", 0.85)
    assert monitored_value(train, report(3, 0.7, train_loss=0.9)) == ("train_loss", 0.9)
    for monitor in ("pseudo_dice", "ema_pseudo_dice"):
        cfg = parse({"plateau": {"monitor": monitor, "mode": "max"}}).plateau
        assert monitored_value(cfg, with_val) == ("pseudo_dice", 0.7)
        assert monitored_value(cfg, no_val) == ("pseudo_dice", None)


def test_a_pseudo_dice_plateau_fires_when_the_bad_count_exceeds_patience() -> None:
    # best 0.5, then 0.6 (+20%, a new best); 0.605, 0.58 and 0.604 all stay below
    # 0.6 * 1.01 = 0.606: bad epochs 1, 2, 3 at epochs 2, 3, 4; 3 > patience 2 at 4.
    steps = run(doc(patience=2, cooldown=0), [0.5, 0.6, 0.605, 0.58, 0.604])
    assert fired(steps) == [4]
    assert steps[1][0].reason == "pseudo_dice 0.6 improved on the best 0.5 by 20%, a new best."
    assert steps[3][0].reason == (
        "pseudo_dice 0.58 is worse than the best 0.6; no improvement beyond the threshold "
        "for 2 epochs (patience: 2 epochs without improvement allowed)."
    )
    assert steps[4][0].reason.startswith(
        "Plateau: pseudo_dice 0.604 improved on the best 0.6 by 0.6667%, less than the 1% "
        "threshold; no improvement beyond the threshold for 3 epochs "
        "(patience: 2 epochs without improvement allowed); intervention 1 of 1000: "
    )
    # The same losses under the default monitor: never a plateau.
    losses = parse({"plateau": {"warmup_epochs": 0, "patience": 2, "cooldown": 0}})
    assert fired(run(losses, [0.5, 0.6, 0.605, 0.58, 0.604])) == []


def test_ema_pseudo_dice_compares_nnunets_ema_fg_dice() -> None:
    dice = [0.5, 0.7, 0.6, 0.9]
    # nnU-Net: ema = 0.9 * ema + 0.1 * dice, seeded with the first value:
    # 0.5; 0.45 + 0.07 = 0.52; 0.468 + 0.06 = 0.528; 0.4752 + 0.09 = 0.5652.
    steps = run(doc(monitor="ema_pseudo_dice"), dice)
    compared = [state.ema for _, state in steps]
    assert compared == pytest.approx([0.5, 0.52, 0.528, 0.5652], abs=1e-12)
    nnunet: list[float] = []
    for value in dice:
        nnunet.append(nnunet[-1] * 0.9 + 0.1 * value if nnunet else value)
    assert compared == nnunet  # bit for bit, as nnU-Net computes it
    assert [state.best for _, state in steps] == compared  # each is a new best
    assert steps[0][0].reason == "ema_pseudo_dice 0.5 sets the first best."
    assert steps[1][0].reason == "ema_pseudo_dice 0.52 improved on the best 0.5 by 4%, a new best."
    assert steps[3][0].reason == (
        "ema_pseudo_dice 0.5652 improved on the best 0.528 by 7.045%, a new best."
    )


# --- a report without a pseudo Dice ----------------------------------------------


def test_a_report_without_pseudo_dice_is_skipped_and_changes_nothing() -> None:
    for monitor in ("pseudo_dice", "ema_pseudo_dice"):
        steps = run(doc(monitor=monitor, patience=0, cooldown=0), [0.6, 0.5, None, 0.5])
        verdict, state = steps[2]
        assert verdict == Verdict(
            Action.NONE,
            Source.POLICY,
            "pseudo_dice is not in this report; the plateau rule skips this epoch.",
        )
        before = steps[1][1]
        assert state.best == before.best == 0.6
        assert (state.num_bad_epochs, state.ema) == (before.num_bad_epochs, before.ema)
        assert state.last_epoch == 2


def test_a_nan_pseudo_dice_is_skipped_like_a_missing_one() -> None:
    steps = run(doc(), [0.6, math.nan, 0.7])
    assert steps[1][0].reason == (
        "pseudo_dice is nan, not a finite number; the plateau rule skips this epoch."
    )
    assert steps[1][1].best == 0.6
    assert steps[2][0].reason == "pseudo_dice 0.7 improved on the best 0.6 by 16.67%, a new best."


def test_an_operators_lr_applies_on_an_epoch_without_pseudo_dice() -> None:
    _, state = step(doc(), VERSION, INITIAL_STATE, report(0, 0.6))
    override = Override(run_id="run-a", actor="alice", reason="try", lr=0.002)
    verdict, after = step(doc(), VERSION, state, report(1, None), override)
    assert verdict.action is Action.INTERVENE and verdict.source is Source.OVERRIDE
    assert verdict.lr == 0.002
    assert after.best == 0.6


def _intervened(policy: PolicyDoc) -> PolicyState:
    """The state right after intervention 1 at epoch 1 (dice 0.6, patience 0)."""
    steps = run(policy, [0.6, 0.6])
    assert fired(steps) == [1]
    return steps[1][1]


def test_the_guard_skips_the_comparison_without_pseudo_dice_but_not_nan_losses() -> None:
    policy = doc(guard_epochs=2, patience=0, cooldown=0)
    state = _intervened(policy)
    verdict, _ = step(policy, VERSION, state, report(2, None, intervention_count=1))
    assert verdict.action is Action.NONE
    assert verdict.reason == "pseudo_dice is not in this report; the plateau rule skips this epoch."
    verdict, _ = step(
        policy, VERSION, state, report(2, None, intervention_count=1, train_loss=math.nan)
    )
    assert (verdict.action, verdict.source) == (Action.ROLLBACK, Source.SAFETY)
    assert "the losses are not finite (train_loss nan, val_loss 0.9)" in verdict.reason


def test_the_guard_rolls_back_a_dice_that_fell_by_more_than_the_tolerance() -> None:
    policy = doc(guard_epochs=2, patience=0, cooldown=0)
    state = _intervened(policy)
    verdict, _ = step(policy, VERSION, state, report(2, 0.2, intervention_count=1))
    assert (verdict.action, verdict.source) == (Action.ROLLBACK, Source.SAFETY)
    assert verdict.reason.startswith(
        "Divergence guard: pseudo_dice 0.2 is 66.67% worse than 0.6 at intervention 1 (epoch 1)"
    )
    # 0.35 is 41.67% worse: within the 50% tolerance.
    verdict, _ = step(policy, VERSION, state, report(2, 0.35, intervention_count=1))
    assert verdict.action is not Action.ROLLBACK


# --- agreement with ReduceLROnPlateau(mode="max") --------------------------------

DICE_CURVE = [
    0.21, 0.45, 0.6, 0.68, 0.72, 0.74, 0.745, 0.75, 0.748, 0.752, 0.751, 0.753,
    0.76, 0.759, 0.758, 0.757, 0.761, 0.76, 0.762, 0.759,
]  # fmt: skip


@pytest.mark.parametrize(("patience", "cooldown"), [(3, 2), (0, 0), (1, 3), (2, 0)])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
def test_fires_on_the_same_epochs_as_reduce_lr_on_plateau_mode_max(
    patience: int, cooldown: int, threshold_mode: str
) -> None:
    plateau: dict[str, Any] = {
        "patience": patience,
        "cooldown": cooldown,
        "threshold_mode": threshold_mode,
    }
    expected = torch_fired(DICE_CURVE, "max", patience, cooldown, 0.01, threshold_mode)
    assert expected  # the curve does plateau
    assert fired(run(doc(**plateau), DICE_CURVE)) == expected
    smoothed: list[float] = []
    for value in DICE_CURVE:
        smoothed.append(smoothed[-1] * 0.9 + 0.1 * value if smoothed else value)
    assert fired(run(doc(monitor="ema_pseudo_dice", **plateau), DICE_CURVE)) == torch_fired(
        smoothed, "max", patience, cooldown, 0.01, threshold_mode
    )
