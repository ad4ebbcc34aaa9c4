"""The default policy's decisions through a real server and store, with the real
client's bookkeeping (`RunState`) applying what it is told."""

from __future__ import annotations

from tests.conftest import Stubs
from trainer_client.api import control_pb2 as pb
from trainer_client.client import RunState


def test_a_plateau_at_the_lr_cap_changes_nothing_and_spends_no_budget(stubs: Stubs) -> None:
    # The LR is at the default cap (the initial LR) and intervention 1 keeps the
    # weights: the intervention would be a no-op.
    run = RunState(run_id="run-at-cap", initial_lr=0.01, current_lr=0.01)

    def report(epoch: int) -> pb.Decision:
        decision = stubs.control.ReportEpoch(
            run.build_report(epoch, train_loss=0.5, val_loss=0.5, avg_gradient_norm=0.05)
        )
        run.apply(decision)
        return decision

    # A flat loss: best at epoch 0, 5 bad epochs by epoch 5, where warmup ends.
    decisions = [report(epoch) for epoch in range(6)]
    at_cap = decisions[5]
    assert (at_cap.action, at_cap.source, at_cap.intervention_index) == (pb.NONE, pb.POLICY, 0)
    assert not at_cap.HasField("lr") and not at_cap.loss_weights
    assert at_cap.reason == (
        "Plateau: val_loss 0.5 equals the best 0.5; no improvement beyond the threshold for "
        "5 epochs (patience: 3 epochs without improvement allowed), but nothing to change: "
        "the LR is already at its cap 0.01 and the loss weights stay ce 1, dice 1 (kept); "
        "no intervention, budget untouched (0 of 3 used)."
    )
    assert run.intervention_count == 0
    # What is recorded is what was answered: no INTERVENE in the run's record.
    recorded = stubs.admin.ListDecisions(pb.ListDecisionsRequest(run_id="run-at-cap")).decisions
    assert [d.action for d in recorded] == [pb.NONE] * 6
    assert recorded[5].reason == at_cap.reason

    # The schedule lowers the LR; the count restarted at the no-op, so 4 more bad
    # epochs (6..9) make the next plateau: a real intervention, the first of the budget.
    run.current_lr = 0.004
    later = [report(epoch) for epoch in range(6, 10)]
    assert [d.action for d in later] == [pb.NONE, pb.NONE, pb.NONE, pb.INTERVENE]
    first = later[-1]
    assert (first.source, first.intervention_index, first.lr) == (pb.POLICY, 1, 0.01)
    assert "intervention 1 of 3: grad norm 0.05 -> 10x, damping 1, LR 0.004 -> 0.01" in (
        first.reason
    )
    assert run.intervention_count == 1
