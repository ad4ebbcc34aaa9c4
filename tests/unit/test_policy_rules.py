"""The intervention rules: LR scale, damping, cap, weights, budget."""

from __future__ import annotations

from typing import Any

import pytest

from control_server.domain import Action, Source, frozen_map
from control_server.policy import INITIAL_STATE, PolicyDoc, PolicyState, parse_policy, step
from control_server.policy.scaling import damping, lr_scale, plan_lr
from control_server.policy.weights import mix_seed, plan_weights
from tests.factories import policy_report

VERSION = "v-test"
DEFAULT = parse_policy({})
# One report away from firing: 3 bad epochs behind a best of 0.30 (patience 3).
DUE = PolicyState(best=0.30, num_bad_epochs=3, last_epoch=14)


def doc(**sections: dict[str, Any]) -> PolicyDoc:
    return parse_policy(sections)


def test_worked_example_from_the_spec() -> None:
    # Plateau at epoch 15, g = 0.04, LR 0.005, initial LR 0.01, k = 3:
    # 0.005 x 10 x 0.5 = 0.025, capped to 0.010.
    verdict, _ = step(DEFAULT, VERSION, DUE, policy_report(intervention_count=2))
    assert verdict.action is Action.INTERVENE
    assert verdict.source is Source.POLICY
    assert verdict.intervention_index == 3
    assert verdict.lr == 0.010
    assert dict(verdict.loss_weights) == {"dice": 0.6, "focal": 0.4}
    assert verdict.reason == (
        "Plateau: val_loss 0.3222 is worse than the best 0.3; no improvement beyond the "
        "threshold for 4 epochs (patience: 3 epochs without improvement allowed); "
        "intervention 3 of 3: grad norm 0.04 -> 10x, damping 0.5, "
        "LR 0.005 -> 0.01 (capped at max_lr 0.01); weights dice 0.6, focal 0.4 (final mix)."
    )


@pytest.mark.parametrize(
    ("g", "scale"),
    [
        (0.0, 15.0),
        (0.009999, 15.0),
        (0.01, 10.0),  # the edge belongs to the upper bucket
        (0.010001, 10.0),
        (0.099999, 10.0),
        (0.1, 5.0),
        (0.100001, 5.0),
        (0.499999, 5.0),
        (0.5, 5.0),  # inclusive upper edge of the 5x bucket
        (0.500001, 3.0),
        (12.0, 3.0),
    ],
)
def test_lr_scale_buckets_and_exact_edges(g: float, scale: float) -> None:
    assert lr_scale(DEFAULT.interventions, g) == scale


def test_missing_grad_norm_counts_as_0_1_so_5x() -> None:
    plan = plan_lr(DEFAULT.interventions, 1, None, 0.001, 0.01)
    assert (plan.grad_norm_used, plan.scale, plan.lr) == (0.1, 5.0, 0.005)
    verdict, _ = step(
        DEFAULT, VERSION, DUE, policy_report(avg_gradient_norm=None, current_lr=0.001)
    )
    assert verdict.lr == 0.005
    assert "grad norm missing (counted as 0.1) -> 5x" in verdict.reason


def test_missing_grad_norm_is_configurable() -> None:
    cfg = doc(interventions={"missing_grad_norm": 0.0}).interventions
    assert plan_lr(cfg, 1, None, 0.0001, 0.01).scale == 15.0


@pytest.mark.parametrize(("k", "factor"), [(1, 1.0), (2, 0.7), (3, 0.5), (4, 0.5), (9, 0.5)])
def test_damping_per_k_and_the_last_value_repeats(k: int, factor: float) -> None:
    assert damping(DEFAULT.interventions, k) == factor


@pytest.mark.parametrize(
    ("k", "lr"), [(1, 0.0001 * 10 * 1.0), (2, 0.0001 * 10 * 0.7), (3, 0.0001 * 10 * 0.5)]
)
def test_intervention_lr_applies_damping(k: int, lr: float) -> None:
    verdict, _ = step(
        DEFAULT, VERSION, DUE, policy_report(current_lr=0.0001, intervention_count=k - 1)
    )
    assert verdict.lr == lr
    assert "capped" not in verdict.reason


def test_lr_is_capped_at_initial_lr_by_default() -> None:
    verdict, _ = step(DEFAULT, VERSION, DUE, policy_report(current_lr=0.005, initial_lr=0.02))
    assert verdict.lr == 0.02  # 0.005 x 10 x 1.0 = 0.05
    assert "(capped at max_lr 0.02)" in verdict.reason


def test_lr_is_capped_at_the_documents_max_lr() -> None:
    policy = doc(interventions={"max_lr": 0.03})
    verdict, _ = step(policy, VERSION, DUE, policy_report(current_lr=0.005, initial_lr=0.01))
    assert verdict.lr == 0.03  # above initial_lr: the document's cap wins
    verdict, _ = step(policy, VERSION, DUE, policy_report(current_lr=0.002, initial_lr=0.01))
    assert verdict.lr == 0.02  # under the cap: not capped at initial_lr either


def test_first_intervention_keeps_the_current_weights() -> None:
    weights = frozen_map({"dice": 1.0, "ce": 0.5})
    verdict, _ = step(DEFAULT, VERSION, DUE, policy_report(loss_weights=weights))
    assert verdict.intervention_index == 1
    assert dict(verdict.loss_weights) == {"ce": 0.5, "dice": 1.0}
    assert "weights kept (ce 0.5, dice 1)." in verdict.reason


def test_second_intervention_draws_a_seeded_mix() -> None:
    cfg = DEFAULT.interventions
    current = frozen_map({"dice": 1.0, "ce": 1.0})
    first = plan_weights(cfg, 2, "run-a", 15, VERSION, current)
    assert first == plan_weights(cfg, 2, "run-a", 15, VERSION, current)
    assert dict(first.weights) in [dict(m) for m in cfg.random_mixes]
    # Over many runs the draw varies (and covers every mix), so it really depends on run_id.
    drawn = {
        tuple(sorted(plan_weights(cfg, 2, f"run-{i}", 15, VERSION, current).weights.items()))
        for i in range(200)
    }
    assert len(drawn) == len(cfg.random_mixes)
    verdict, _ = step(DEFAULT, VERSION, DUE, policy_report(intervention_count=1))
    assert verdict.intervention_index == 2
    assert dict(verdict.loss_weights) == dict(first.weights)
    assert "(seeded draw: mix " in verdict.reason


def test_mix_seed_is_a_fixed_sha256_number() -> None:
    # Pinned: the same on every process, replica and Python (no salted hash()).
    seed = 0x83C7EF5C582AA98193B740D058038B27E195CA5D82A706A31E3E514CCA56704C
    assert mix_seed("run-a", 15, 2, "abc") == seed
    assert mix_seed("run-b", 15, 2, "abc") != seed
    assert mix_seed("run-a", 15, 2, "abd") != seed
    # ...and the draw it seeds is pinned too (random.Random(int) is stable across versions).
    assert plan_weights(DEFAULT.interventions, 2, "run-a", 15, "abc", {}).mix_index == 2


def test_final_intervention_takes_the_final_mix() -> None:
    policy = doc(interventions={"max_interventions": 4, "final_mix": {"dice": 1, "ce": 1}})
    verdict, _ = step(policy, VERSION, DUE, policy_report(intervention_count=3))
    assert verdict.intervention_index == 4
    assert dict(verdict.loss_weights) == {"ce": 1.0, "dice": 1.0}
    assert "(final mix)" in verdict.reason


def test_a_budget_of_one_keeps_the_weights() -> None:
    policy = doc(interventions={"max_interventions": 1})
    verdict, _ = step(policy, VERSION, DUE, policy_report())
    assert dict(verdict.loss_weights) == {"ce": 1.0, "dice": 1.0}


def test_spent_budget_decides_none_and_resets_the_count() -> None:
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(intervention_count=3))
    assert (verdict.action, verdict.source, verdict.lr) == (Action.NONE, Source.POLICY, None)
    assert "the budget of 3 interventions is spent" in verdict.reason
    assert (state.num_bad_epochs, state.cooldown_left, state.mark) == (0, 0, None)
    # The next bad epoch does not re-announce the plateau.
    verdict, _ = step(DEFAULT, VERSION, state, policy_report(16, 0.33, intervention_count=3))
    assert "for 1 epoch (patience: 3 epochs" in verdict.reason


def test_spent_budget_stops_when_configured() -> None:
    policy = doc(interventions={"stop_when_exhausted": True})
    verdict, _ = step(policy, VERSION, DUE, policy_report(intervention_count=3))
    assert (verdict.action, verdict.source) == (Action.STOP, Source.POLICY)
    assert "spent; stopping." in verdict.reason


def test_zero_budget_never_intervenes() -> None:
    policy = doc(interventions={"max_interventions": 0})
    verdict, _ = step(policy, VERSION, DUE, policy_report())
    assert verdict.action is Action.NONE
    assert verdict.reason.endswith(
        "; policy default never intervenes (interventions.max_interventions is 0)."
    )


def test_intervention_sets_cooldown_and_a_guard_mark() -> None:
    _, state = step(DEFAULT, VERSION, DUE, policy_report(intervention_count=2))
    assert (state.num_bad_epochs, state.cooldown_left) == (0, 2)
    assert state.mark is not None
    assert (state.mark.epoch, state.mark.k, state.mark.value, state.mark.lr_before) == (
        15,
        3,
        0.3222,
        0.005,
    )
    assert dict(state.mark.weights_before) == {"ce": 1.0, "dice": 1.0}
    assert INITIAL_STATE.mark is None


# --- an intervention that would change nothing ----------------------------------


AT_CAP: dict[str, Any] = {"current_lr": 0.01, "initial_lr": 0.01}  # cap: the initial LR


def test_an_intervention_at_the_cap_that_keeps_the_weights_is_none() -> None:
    # k = 1 keeps the weights; 0.01 x 10 x 1.0 capped at 0.01 is the LR already set.
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(**AT_CAP))
    assert (verdict.action, verdict.source) == (Action.NONE, Source.POLICY)
    assert (verdict.lr, dict(verdict.loss_weights), verdict.intervention_index) == (None, {}, 0)
    assert verdict.reason == (
        "Plateau: val_loss 0.3222 is worse than the best 0.3; no improvement beyond the "
        "threshold for 4 epochs (patience: 3 epochs without improvement allowed), but nothing "
        "to change: the LR is already at its cap 0.01 and the loss weights stay ce 1, dice 1 "
        "(kept); no intervention, budget untouched (0 of 3 used)."
    )
    # Nothing to undo and nothing changed: no guard mark, no cooldown; the count restarts.
    assert (state.num_bad_epochs, state.cooldown_left, state.mark) == (0, 0, None)


def test_a_later_plateau_below_the_cap_is_intervention_1() -> None:
    _, state = step(DEFAULT, VERSION, DUE, policy_report(**AT_CAP))
    for epoch in range(16, 19):  # three more bad epochs: the count is 3, not above patience
        verdict, state = step(DEFAULT, VERSION, state, policy_report(epoch, **AT_CAP))
        assert verdict.action is Action.NONE
    verdict, _ = step(DEFAULT, VERSION, state, policy_report(19, current_lr=0.002))
    assert (verdict.action, verdict.intervention_index, verdict.lr) == (Action.INTERVENE, 1, 0.01)


def test_a_drawn_or_final_mix_equal_to_the_current_weights_at_the_cap_is_none() -> None:
    drawn = plan_weights(DEFAULT.interventions, 2, "run-a", 15, VERSION, {}).weights
    for used, weights, origin in [
        (1, drawn, "seeded draw: mix"),
        (2, DEFAULT.interventions.final_mix, "final mix"),
    ]:
        report = policy_report(intervention_count=used, loss_weights=frozen_map(weights), **AT_CAP)
        verdict, _ = step(DEFAULT, VERSION, DUE, report)
        assert (verdict.action, verdict.intervention_index) == (Action.NONE, 0)
        assert "the LR is already at its cap 0.01 and the loss weights stay " in verdict.reason
        assert f"({origin}" in verdict.reason
        assert verdict.reason.endswith(f"budget untouched ({used} of 3 used).")


def test_an_lr_that_stays_without_a_cap_is_said_so() -> None:
    policy = doc(interventions={"lr_scales": [1, 1, 1, 1], "damping": [1]})
    verdict, _ = step(policy, VERSION, DUE, policy_report(loss_weights=frozen_map({})))
    assert verdict.action is Action.NONE
    assert (
        "nothing to change: the LR stays 0.005 (grad norm 0.04 -> 1x, damping 1) and the loss "
        "weights stay as they are (none reported);"
    ) in verdict.reason


@pytest.mark.parametrize(
    ("used", "fields"),
    [
        (0, {"current_lr": 0.02, "initial_lr": 0.01}),  # above the cap: lowered to it
        (1, AT_CAP),  # LR at the cap, but intervention 2 draws a new mix
        (0, {"current_lr": 0.009, "initial_lr": 0.01}),  # weights kept, LR raised
    ],
)
def test_an_intervention_that_changes_one_thing_still_counts(
    used: int, fields: dict[str, Any]
) -> None:
    verdict, state = step(DEFAULT, VERSION, DUE, policy_report(intervention_count=used, **fields))
    assert (verdict.action, verdict.intervention_index) == (Action.INTERVENE, used + 1)
    assert state.mark is not None and state.cooldown_left == 2
