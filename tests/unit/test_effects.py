"""Effects of interventions, overrides and rollbacks against values computed by hand.

The recorded run below (`RUN_A`, policy "pA": the defaults, mode min, monitored
val_loss, default horizon guard_epochs 2 + patience 3 = 5) has, by epoch:

    epoch   val_loss  grad   decision
    0..4    1.00 .90 .80 .81 .82            (best 0.80 at epoch 2)
    5       0.83      0.04   INTERVENE #1 (POLICY, weights unchanged)
    6..10   .81 .76 .78 .77 .775           (new best 0.76 at epoch 7)
    11      0.78      0.3    INTERVENE #2 (POLICY, dice=0.6,focal=0.4)
    12, 13  0.77 0.765
    14      0.79      0.8    INTERVENE #3 (POLICY, dice=0.6,focal=0.4)
    15      1.30      0.04   ROLLBACK (SAFETY: the guard undoes #3; restores ce=1,dice=1)
    16..17  0.775 0.77
    18      0.772     none   INTERVENE (OVERRIDE 1, LR only)
    19      0.74                            (new best)
    20      0.75      0.005  ROLLBACK (OVERRIDE 2, rollback_epoch 18; restores ce=1,dice=1)
    21      nan                             (skipped when taking bests)
    22..24  0.73 0.735 0.738                (new best 0.73 at 22)
    23      (also a late INTERVENE: recorded, never applied: no effect)

Relative changes are (best_before - best_after) / |best_before| (mode min: > 0 better).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from control_server.convert import effect_to_proto
from control_server.domain import Action, Decision, Report, Source, frozen_map
from control_server.effects import (
    EffectGroup,
    grad_norm_bucket,
    loss_mix,
    rollbacks,
    run_effects,
    summarize,
)
from control_server.policy.document import (
    GuardConfig,
    InterventionConfig,
    PlateauConfig,
    PolicyDoc,
)
from tests.factories import make_decision, make_override, make_report

POLICIES = {
    "pA": PolicyDoc(),
    # Default horizon 1 + 1 = 2.
    "pB": PolicyDoc(plateau=PlateauConfig(patience=1), guard=GuardConfig(guard_epochs=1)),
    # Dice, higher is better; default horizon 1 + 2 = 3.
    "pD": PolicyDoc(
        plateau=PlateauConfig(monitor="pseudo_dice", mode="max", patience=2),
        guard=GuardConfig(guard_epochs=1),
    ),
}
MIX = {"dice": 0.6, "focal": 0.4}
RESTORED = {"ce": 1.0, "dice": 1.0}
VAL = {
    **{0: 1.00, 1: 0.90, 2: 0.80, 3: 0.81, 4: 0.82, 5: 0.83},
    **{6: 0.81, 7: 0.76, 8: 0.78, 9: 0.77, 10: 0.775, 11: 0.78, 12: 0.77, 13: 0.765},
    **{14: 0.79, 15: 1.30, 16: 0.775, 17: 0.77, 18: 0.772, 19: 0.74, 20: 0.75},
    **{21: math.nan, 22: 0.73, 23: 0.735, 24: 0.738},
}
GRAD: dict[int, float | None] = {11: 0.3, 14: 0.8, 18: None, 20: 0.005}
DECISIONS: dict[int, dict[str, Any]] = {
    5: {"action": Action.INTERVENE, "intervention_index": 1, "lr": 0.02},
    11: {"action": Action.INTERVENE, "intervention_index": 2, "loss_weights": MIX},
    14: {"action": Action.INTERVENE, "intervention_index": 3, "loss_weights": MIX},
    15: {"action": Action.ROLLBACK, "source": Source.SAFETY, "loss_weights": RESTORED},
    18: {"action": Action.INTERVENE, "source": Source.OVERRIDE, "lr": 0.02, "override_id": 1},
    20: {
        "action": Action.ROLLBACK,
        "source": Source.OVERRIDE,
        "override_id": 2,
        "loss_weights": RESTORED,
    },
    23: {"action": Action.INTERVENE, "intervention_index": 1, "late": True},
}
OVERRIDES = [
    make_override(override_id=1),
    make_override(override_id=2, lr=0.01, action=Action.ROLLBACK, rollback_epoch=18),
]


def recorded(
    values: Mapping[int, float | None],
    decisions: dict[int, dict[str, Any]],
    version: str = "pA",
    grads: dict[int, float | None] | None = None,
    metric: str = "val_loss",
) -> list[tuple[Report, Decision]]:
    """A run's history: `values` of `metric` by epoch, the decisions at the epochs
    `decisions` names (NONE elsewhere), all by `version`."""
    grads = grads or {}
    epochs = []
    for epoch, value in values.items():
        fields = decisions.get(epoch, {})
        weights = frozen_map(fields.get("loss_weights", {}))
        report = make_report(
            epoch=epoch, avg_gradient_norm=grads.get(epoch, 0.04), **{metric: value}
        )
        decision = make_decision(
            epoch=epoch, policy_version=version, **{**fields, "loss_weights": weights}
        )
        epochs.append((report, decision))
    return epochs


RUN_A = recorded(VAL, DECISIONS, grads=GRAD)


def effects_of(epochs: Sequence[tuple[Report, Decision]], horizon: int = 0) -> dict[int, Any]:
    return run_effects(epochs, POLICIES.__getitem__, horizon, OVERRIDES)


def test_only_applied_interventions_and_rollbacks_have_an_effect() -> None:
    # Epoch 23's INTERVENE is late: recorded, never applied.
    assert sorted(effects_of(RUN_A)) == [5, 11, 14, 15, 18, 20]
    kinds = {e: effect.kind for e, effect in effects_of(RUN_A).items()}
    assert kinds == {5: "1", 11: "2", 14: "3", 15: "rollback", 18: "override", 20: "rollback"}


def test_an_intervention_followed_by_a_new_best() -> None:
    e = effects_of(RUN_A)[5]
    assert (e.metric, e.mode, e.policy_version) == ("val_loss", "min", "pA")
    assert e.value_at_decision == 0.83
    assert e.best_before == 0.80  # epoch 2
    # Epochs 6..10: .81 .76 .78 .77 .775 -> 0.76, first beating 0.80 at epoch 7.
    assert e.best_after == 0.76
    assert e.relative_change == pytest.approx((0.80 - 0.76) / 0.80)  # 0.05
    assert (e.new_best, e.epochs_to_new_best) == (True, 2)
    assert (e.horizon, e.epochs_observed, e.complete) == (5, 5, True)
    assert (e.rolled_back, e.rolled_back_at_epoch) == (False, None)
    assert (e.grad_norm_bucket, e.loss_mix) == ("0.01<=g<0.1", "unchanged")


def test_an_intervention_without_a_new_best() -> None:
    e = effects_of(RUN_A)[11]
    assert (e.value_at_decision, e.best_before) == (0.78, 0.76)  # best: epoch 7
    # Epochs 12..16: .77 .765 .79 1.30 .775 -> 0.765, none below 0.76.
    assert e.best_after == 0.765
    assert e.relative_change == pytest.approx((0.76 - 0.765) / 0.76)  # -0.0065789
    assert (e.new_best, e.epochs_to_new_best) == (False, None)
    # The guard's rollback at 15 undoes #3 (epoch 14), its mark, not #2.
    assert e.rolled_back is False
    assert (e.grad_norm_bucket, e.loss_mix) == ("0.1<=g<=0.5", "dice=0.6,focal=0.4")


def test_an_intervention_the_guard_rolled_back() -> None:
    e = effects_of(RUN_A)[14]
    assert (e.rolled_back, e.rolled_back_at_epoch) == (True, 15)
    # Epochs 15..19: 1.30 .775 .77 .772 .74 -> 0.74 at epoch 19, below 0.76.
    assert e.best_after == 0.74
    assert e.relative_change == pytest.approx(0.02 / 0.76)  # 0.0263158
    assert (e.new_best, e.epochs_to_new_best) == (True, 5)
    assert e.grad_norm_bucket == "g>0.5"


def test_the_guards_rollback_itself() -> None:
    e = effects_of(RUN_A)[15]
    assert (e.kind, e.value_at_decision, e.best_before) == ("rollback", 1.30, 0.76)
    # Epochs 16..20: .775 .77 .772 .74 .75 -> 0.74 at epoch 19 (4 after).
    assert e.best_after == 0.74
    assert (e.new_best, e.epochs_to_new_best) == (True, 4)
    assert (e.rolled_back, e.loss_mix) == (False, "ce=1,dice=1")


def test_an_operator_override_rolled_back_by_an_operator() -> None:
    e = effects_of(RUN_A)[18]
    assert (e.kind, e.grad_norm_bucket, e.loss_mix) == ("override", "missing", "unchanged")
    assert e.best_before == 0.76
    # Epochs 19..23: .74 .75 nan .73 .735 -> 0.73 (nan skipped); 0.74 < 0.76 at epoch 19.
    assert e.best_after == 0.73
    assert e.relative_change == pytest.approx(0.03 / 0.76)  # 0.0394737
    assert (e.new_best, e.epochs_to_new_best) == (True, 1)
    # Override 2 (the ROLLBACK decided at 20) names rollback_epoch 18.
    assert (e.rolled_back, e.rolled_back_at_epoch) == (True, 20)
    assert e.complete


def test_an_operator_rollback_with_an_incomplete_horizon() -> None:
    e = effects_of(RUN_A)[20]
    assert (e.kind, e.value_at_decision, e.best_before) == ("rollback", 0.75, 0.74)
    # Epochs 21..25, of which 21..24 are reported: nan .73 .735 .738 -> 0.73 at 22.
    assert (e.horizon, e.epochs_observed, e.complete) == (5, 4, False)
    assert e.best_after == 0.73
    assert e.relative_change == pytest.approx(0.01 / 0.74)  # 0.0135135
    assert (e.new_best, e.epochs_to_new_best) == (True, 2)
    assert e.grad_norm_bucket == "g<0.01"


def test_an_explicit_horizon_replaces_the_policys() -> None:
    e = effects_of(RUN_A, horizon=2)[14]
    # Epochs 15..16 only: 1.30 .775 -> 0.775, worse than 0.76.
    assert (e.horizon, e.epochs_observed) == (2, 2)
    assert e.best_after == 0.775
    assert e.relative_change == pytest.approx(-0.015 / 0.76)  # -0.0197368
    assert (e.new_best, e.epochs_to_new_best) == (False, None)
    assert e.rolled_back  # a rollback is not bounded by the horizon


def test_the_default_horizon_is_each_decisions_policys() -> None:
    # The same run decided by pB: guard_epochs 1 + patience 1 = 2.
    effects = run_effects(recorded(VAL, DECISIONS, "pB", GRAD), POLICIES.__getitem__)
    e = effects[5]
    assert (e.horizon, e.epochs_observed, e.policy_version) == (2, 2, "pB")
    # Epochs 6..7: .81 .76 -> 0.76, as within 5.
    assert (e.best_after, e.epochs_to_new_best) == (0.76, 2)


def test_a_monitored_val_loss_falls_back_to_train_loss() -> None:
    # No val_loss reported: train_loss (0.5 - epoch / 100) is monitored.
    epochs = recorded(
        {e: None for e in range(8)},
        {3: {"action": Action.INTERVENE, "intervention_index": 1}},
    )
    e = run_effects(epochs, POLICIES.__getitem__)[3]
    assert e.metric == "train_loss"
    assert e.value_at_decision == e.best_before == pytest.approx(0.47)
    # Epochs 4..7: 0.46 .. 0.43 -> 0.43; the first new best one epoch after.
    assert e.best_after == pytest.approx(0.43)
    assert e.relative_change == pytest.approx(0.04 / 0.47)
    assert (e.epochs_to_new_best, e.epochs_observed) == (1, 4)


def test_a_dice_monitor_is_better_higher() -> None:
    dice = {0: 0.50, 1: 0.60, 2: 0.58, 3: 0.59, 4: None, 5: 0.63, 6: 0.61, 7: 0.65}
    epochs = recorded(
        dice,
        {3: {"action": Action.INTERVENE, "intervention_index": 1}},
        "pD",
        metric="pseudo_dice",
    )
    e = run_effects(epochs, POLICIES.__getitem__)[3]
    assert (e.metric, e.mode, e.value_at_decision, e.best_before) == (
        "pseudo_dice",
        "max",
        0.59,
        0.60,  # epoch 1
    )
    # Epochs 4..6 (horizon 3), 4 reported without a Dice: .63 .61 -> 0.63 at epoch 5;
    # epoch 7's 0.65 lies beyond the horizon.
    assert (e.horizon, e.epochs_observed) == (3, 3)
    assert e.best_after == 0.63
    assert e.relative_change == pytest.approx((0.63 - 0.60) / 0.60)  # +0.05
    assert (e.new_best, e.epochs_to_new_best) == (True, 2)


def test_the_guard_undoes_the_last_automatic_intervention_and_an_operator_the_named_one() -> None:
    auto = {"action": Action.INTERVENE, "intervention_index": 1}
    by_hand = {"action": Action.INTERVENE, "source": Source.OVERRIDE}
    guard = {"action": Action.ROLLBACK, "source": Source.SAFETY}
    epochs = recorded({e: 0.5 for e in range(8)}, {1: auto, 2: by_hand, 3: guard})
    # The operator's intervention at 2 sets no mark: the guard's rollback at 3 undoes 1.
    assert rollbacks(epochs) == {1: 3}
    # An operator's ROLLBACK without its override on record: the latest intervention.
    operator = {"action": Action.ROLLBACK, "source": Source.OVERRIDE, "override_id": 9}
    epochs = recorded({e: 0.5 for e in range(8)}, {1: auto, 2: by_hand, 4: operator})
    assert rollbacks(epochs) == {2: 4}
    named = [make_override(override_id=9, action=Action.ROLLBACK, rollback_epoch=1)]
    assert rollbacks(epochs, named) == {1: 4}


@pytest.mark.parametrize(
    ("grad", "bucket"),
    [
        (0.0099, "g<0.01"),
        (0.01, "0.01<=g<0.1"),
        (0.0999, "0.01<=g<0.1"),
        (0.1, "0.1<=g<=0.5"),
        (0.5, "0.1<=g<=0.5"),
        (0.5001, "g>0.5"),
        (None, "missing"),
        (math.nan, "missing"),
    ],
)
def test_grad_norm_buckets_are_the_policys(grad: float | None, bucket: str) -> None:
    assert grad_norm_bucket(InterventionConfig(), grad) == bucket


def test_loss_mixes_are_sorted() -> None:
    decision = make_decision(loss_weights=frozen_map({"focal": 0.4, "dice": 0.6}))
    assert loss_mix(decision) == "dice=0.6,focal=0.4"
    assert loss_mix(make_decision()) == "unchanged"


def test_the_summary_of_the_recorded_run() -> None:
    summary = summarize(effects_of(RUN_A).values(), runs=1)
    assert (summary.runs, summary.decisions) == (1, 6)
    # Relative changes: 5: 0.05, 11: -0.0065789, 14: 0.0263158, 15: 0.0263158,
    # 18: 0.0394737, 20: 0.0135135 -> mean 0.14903983 / 6, median the middle two's mean;
    # epochs to a new best: 2 (5), 5 (14), 4 (15), 1 (18), 2 (20) -> 14 / 5.
    changes = [0.04 / 0.8, -0.005 / 0.76, 0.02 / 0.76, 0.02 / 0.76, 0.03 / 0.76, 0.01 / 0.74]
    (policy,) = summary.by_policy
    assert policy == EffectGroup(
        key="pA",
        count=6,
        complete=5,  # epoch 20's horizon has 4 of 5 epochs
        new_best=5,  # all but epoch 11
        rolled_back=2,  # 14 by the guard, 18 by the operator
        mean_relative_change=pytest.approx(sum(changes) / 6),  # 0.02484
        median_relative_change=pytest.approx(0.02 / 0.76),
        mean_epochs_to_new_best=2.8,
    )
    assert [g.key for g in summary.by_kind] == ["1", "2", "3", "override", "rollback"]
    rollback = summary.by_kind[-1]
    # Epochs 15 and 20: changes 0.0263158 and 0.0135135, new bests after 4 and 2.
    assert rollback == EffectGroup(
        "rollback",
        2,
        1,
        2,
        0,
        pytest.approx((0.02 / 0.76 + 0.01 / 0.74) / 2),
        pytest.approx((0.02 / 0.76 + 0.01 / 0.74) / 2),
        3.0,
    )
    buckets = {g.key: (g.count, g.mean_relative_change) for g in summary.by_grad_norm_bucket}
    assert buckets == {
        "0.01<=g<0.1": (2, pytest.approx((0.05 + 0.02 / 0.76) / 2)),  # epochs 5, 15
        "0.1<=g<=0.5": (1, pytest.approx(-0.005 / 0.76)),  # 11
        "g<0.01": (1, pytest.approx(0.01 / 0.74)),  # 20
        "g>0.5": (1, pytest.approx(0.02 / 0.76)),  # 14
        "missing": (1, pytest.approx(0.03 / 0.76)),  # 18
    }
    mixes = {g.key: (g.count, g.new_best, g.rolled_back) for g in summary.by_loss_mix}
    assert mixes == {
        "ce=1,dice=1": (2, 2, 0),  # the rollbacks at 15 and 20
        "dice=0.6,focal=0.4": (2, 1, 1),  # 11 (no new best) and 14 (rolled back)
        "unchanged": (2, 2, 1),  # 5 and 18 (rolled back)
    }


def test_a_group_without_values_has_no_means() -> None:
    # Decided at the last epoch: nothing reported after it yet.
    epochs = recorded({0: 0.5, 1: 0.4}, {1: {"action": Action.INTERVENE, "intervention_index": 1}})
    e = run_effects(epochs, POLICIES.__getitem__)[1]
    assert (e.best_after, e.relative_change, e.epochs_observed) == (None, None, 0)
    (group,) = summarize([e], runs=1).by_kind
    assert (group.count, group.complete, group.mean_relative_change) == (1, 0, None)
    assert group.mean_epochs_to_new_best is None


def test_an_effect_on_the_wire_leaves_what_is_missing_unset() -> None:
    # Epoch 20: best after, change and epochs to a new best set, 4 of 5 epochs seen.
    msg = effect_to_proto(effects_of(RUN_A)[20])
    assert (msg.kind, msg.best_before, msg.best_after) == ("rollback", 0.74, 0.73)
    assert (msg.epochs_to_new_best, msg.horizon, msg.epochs_observed) == (2, 5, 4)
    assert not msg.HasField("rolled_back_at_epoch")
    epochs = recorded({0: 0.5, 1: 0.4}, {1: {"action": Action.INTERVENE, "intervention_index": 1}})
    empty = effect_to_proto(run_effects(epochs, POLICIES.__getitem__)[1])
    assert not any(
        empty.HasField(f)
        for f in ("best_after", "relative_change", "epochs_to_new_best", "rolled_back_at_epoch")
    )
    assert (empty.value_at_decision, empty.best_before) == (0.4, 0.4)
