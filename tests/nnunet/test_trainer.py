"""nnUNetTrainerControlled trains for real on the CPU and really uses what was decided.

Each test trains the synthetic disc dataset for a few epochs (5 + 2 iterations
each) and asserts on what the trainer actually used: the optimizer's LR in the
next epoch's steps, the loss object's weights, the parameters after a rollback.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from control_server.auth import Role
from control_server.tokens import create_token
from tests.conftest import ServerThread
from tests.nnunet.conftest import RecordingTrainer, ScriptedServer
from tests.tcp_proxy import TcpProxy
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.errors import ControlSetupError, ControlUnavailable
from trainer_client.nnunet import CONTROL_LOG_KEY, SNAPSHOT_FILE, CompositeLoss

HERE = Path(__file__).resolve().parent
REFERENCE = {"dice": 1.0, "ce": 1.0}
# Scripted decisions two tests share: an intervention, and the rollback that undoes it.
INTERVENE_AT_0 = {
    "action": pb.INTERVENE,
    "lr": 0.004,
    "loss_weights": {"dice": 0.5, "focal": 0.5},
    "intervention_index": 1,
}
ROLLBACK_TO_REFERENCE = {"action": pb.ROLLBACK, "lr": 0.0095, "loss_weights": REFERENCE}


def get_run(target: str, run_id: str) -> pb.GetRunResponse:
    with grpc.insecure_channel(target) as channel:
        response: pb.GetRunResponse = pb_grpc.ControlAdminStub(channel).GetRun(
            pb.GetRunRequest(run_id=run_id), timeout=10
        )
    return response


def poly(epoch: int, epochs: int) -> float:
    return float((1 - epoch / epochs) ** 0.9)


@pytest.mark.timeout(240)
def test_a_real_policy_steers_the_lr_and_loss_weights_the_optimizer_uses(
    make_server: Callable[..., ServerThread], make_trainer: Callable[..., RecordingTrainer]
) -> None:
    server = make_server(policy_file=HERE / "intervene_early.yaml")
    epochs = 5
    trainer = make_trainer(epochs=epochs, server=server.target, plot=True)
    trainer.run_training()

    run = get_run(server.target, trainer.run_id)
    assert trainer.run_id == "Dataset042_Disc__RecordingTrainer__nnUNetPlans__2d__fold_0"
    assert [e.report.epoch for e in run.epochs] == list(range(epochs))
    decisions = {e.report.epoch: e.decision for e in run.epochs}
    reports = {e.report.epoch: e.report for e in run.epochs}
    interventions = [e for e, d in decisions.items() if d.action == pb.INTERVENE]
    assert interventions == [1, 2, 3], [pb.Action.Name(d.action) for d in decisions.values()]
    assert [decisions[e].intervention_index for e in interventions] == [1, 2, 3]

    expected_weights = dict(REFERENCE)
    for epoch in range(1, epochs):
        decided = decisions[epoch - 1]
        if decided.action == pb.INTERVENE:
            # Every step of the next epoch ran at exactly the decided LR ...
            assert decided.HasField("lr")
            assert trainer.lr_of(epoch) == pytest.approx(decided.lr, rel=1e-12)
            # ... and nnU-Net's own LR log shows it.
            assert trainer.logger.get_value("lrs", step=epoch) == pytest.approx(decided.lr)
            if decided.loss_weights:
                expected_weights = dict(decided.loss_weights)
        else:
            # PolyLR went on decaying from the last decided LR.
            ratio = poly(epoch, epochs) / poly(epoch - 1, epochs)
            expected = trainer.lr_of(epoch - 1) * ratio
            assert trainer.lr_of(epoch) == pytest.approx(expected, rel=1e-12)
        assert all(w == expected_weights for w in trainer.weights_of(epoch))
        # The next report carries what the optimizer used, and the count.
        assert dict(reports[epoch].loss_weights) == expected_weights
        assert reports[epoch].current_lr == pytest.approx(trainer.logger.get_value("lrs", epoch))
    assert reports[epochs - 1].intervention_count == 3
    assert dict(decisions[3].loss_weights) == {"dice": 0.6, "focal": 0.4}
    assert isinstance(trainer.loss, CompositeLoss) and trainer.loss.weights == {
        "dice": 0.6,
        "focal": 0.4,
    }

    for epoch, report in reports.items():
        # The epoch mean of the steps' pre-clip norms (all finite here).
        norms = trainer.norms[epoch]
        assert len(norms) == 5 and all(math.isfinite(n) and n > 0 for n in norms)
        assert report.avg_gradient_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)
        # Reported losses are nnU-Net's logged ones, computed with the reference weights.
        assert report.train_loss == pytest.approx(trainer.logger.get_value("train_losses", epoch))
        assert report.val_loss == pytest.approx(trainer.logger.get_value("val_losses", epoch))
        assert report.initial_lr == 0.01 and report.labels.trainer == "RecordingTrainer"
    assert trainer.loss.reference_weights == REFERENCE

    output = Path(trainer.output_folder)
    assert (output / "checkpoint_final.pth").is_file()
    assert (output / "progress.png").is_file()
    log = next(output.glob("training_log_*.txt")).read_text()
    assert "training control: epoch 1: INTERVENE, next LR" in log


@pytest.mark.timeout(240)
def test_rollback_restores_the_snapshot_a_bad_decision_is_refused_and_stop_ends_cleanly(
    scripted_server: Callable[..., ScriptedServer],
    make_trainer: Callable[..., RecordingTrainer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = scripted_server(
        {
            0: INTERVENE_AT_0,
            1: ROLLBACK_TO_REFERENCE,
            2: {
                "action": pb.INTERVENE,
                "lr": 0.5,
                "loss_weights": {"dice": 0.5, "tversky": 0.5},
                "intervention_index": 2,
            },
            3: {"action": pb.STOP, "reason": "Enough."},
        }
    )
    trainer = make_trainer(epochs=10, server=server.target)
    trainer.run_training()

    # INTERVENE at 0: epoch 1 trains with the new LR and weights.
    assert trainer.lr_of(1) == pytest.approx(0.004, rel=1e-12)
    assert trainer.weights_of(1)[0] == {"dice": 0.5, "focal": 0.5}
    # ROLLBACK at 1: epoch 2 starts from the parameters snapshotted at epoch 0,
    # bit for bit, with the LR and weights from the decision.
    snapshot = trainer.last_rollback
    assert snapshot is not None and snapshot.epoch == 0
    assert trainer.after_rollback is not None
    epoch, state = trainer.after_rollback
    assert epoch == 2
    assert state.keys() == snapshot.network.keys()
    assert all(torch.equal(state[k], snapshot.network[k]) for k in state)
    assert trainer.checksums[1] != pytest.approx(trainer.checksums[0])
    assert trainer.lr_of(2) == pytest.approx(0.0095, rel=1e-12)
    assert trainer.weights_of(2)[0] == REFERENCE
    # The unknown component and the LR 50x the initial one at 2: the client refuses
    # the decision (one warning), nothing changed.
    [refused] = [r.getMessage() for r in caplog.records if r.name == "trainer_client.client"]
    assert "epoch=2" in refused and "decision lr must be at most the client's cap 0.1" in refused
    log = next(Path(trainer.output_folder).glob("training_log_*.txt")).read_text()
    assert "epoch 2: no decision; LR and loss weights unchanged" in log
    assert trainer.weights_of(3)[0] == REFERENCE
    assert trainer.lr_of(3) == pytest.approx(0.0095 * poly(3, 10) / poly(2, 10), rel=1e-12)
    assert [e.outcome for e in trainer.control_events] == [
        "applied",
        "applied",
        "no decision",
        "stop",
    ]
    assert server.servicer.reports[3].intervention_count == 1
    # STOP at 3: no epoch 4, and the final checkpoint is written; FinishRun says STOPPED.
    assert max(e for e, _, _ in trainer.steps) == 3
    assert [r.epoch for r in server.servicer.reports] == [0, 1, 2, 3]
    trainer.finish_control()
    [finish] = server.servicer.finishes
    assert (finish.status, finish.attempt) == (pb.STOPPED, 1)
    assert finish.metrics.best_ema_epoch in range(4)
    final = torch.load(
        Path(trainer.output_folder) / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert final["current_epoch"] == 4
    assert final["logging"][CONTROL_LOG_KEY][-1]["stopped"] is True


@pytest.mark.timeout(240)
def test_resume_after_a_crash_keeps_run_id_interventions_lr_and_weights(
    scripted_server: Callable[..., ScriptedServer], make_trainer: Callable[..., RecordingTrainer]
) -> None:
    server = scripted_server(
        {
            0: {
                "action": pb.INTERVENE,
                "lr": 0.003,
                "loss_weights": {"dice": 0.7, "focal": 0.3},
                "intervention_index": 1,
            }
        }
    )
    epochs = 4
    crashing = make_trainer(
        epochs=epochs, server=server.target, save_every=1, env={"TRAINCTL_RUN_ID": "crash-run"}
    )
    crashing.crash_after_epoch = 1
    with pytest.raises(RuntimeError, match="simulated crash after epoch 1"):
        crashing.run_training()
    expected_lr_2 = 0.003 * poly(2, epochs) / poly(1, epochs)

    # The restart, as `trainctl-nnunet ... --c`: no TRAINCTL_RUN_ID this time.
    resumed = make_trainer(
        epochs=epochs, server=server.target, continue_training=True, env={"TRAINCTL_RUN_ID": ""}
    )
    checkpoint = Path(resumed.output_folder) / "checkpoint_latest.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["logging"][CONTROL_LOG_KEY][-1]["attempt"] == 1
    resumed.load_checkpoint(str(checkpoint))
    assert resumed.current_epoch == 2
    assert resumed.run_id == "crash-run"
    assert resumed.run_state.intervention_count == 1
    assert resumed.loss.weights == {"dice": 0.7, "focal": 0.3}
    assert resumed.loss.reference_weights == REFERENCE
    resumed.run_training()

    assert resumed.lr_of(2) == pytest.approx(expected_lr_2, rel=1e-12)
    assert resumed.weights_of(3)[0] == {"dice": 0.7, "focal": 0.3}
    after = [r for r in server.servicer.reports if r.epoch >= 2]
    assert [r.epoch for r in after] == [2, 3]
    assert {r.run_id for r in server.servicer.reports} == {"crash-run"}
    assert all(r.intervention_count == 1 for r in after)
    assert after[0].current_lr == pytest.approx(expected_lr_2)
    # StartRun at each start, the resume with the checkpoint's epoch; every report
    # names its attempt, which the checkpoint keeps; the crash ended attempt 1 FAILED.
    first, second = server.servicer.starts
    assert not first.HasField("resume_from_epoch")
    assert second.resume_from_epoch == 1 and second.run_id == "crash-run"
    assert [r.attempt for r in server.servicer.reports] == [1, 1, 2, 2]
    assert resumed.logger.get_value(CONTROL_LOG_KEY, step=-1)["attempt"] == 2
    failed = server.servicer.finishes[0]
    assert failed.status == pb.FAILED and failed.attempt == 1
    assert failed.error == "RuntimeError: simulated crash after epoch 1"
    # nnU-Net's own logs run on seamlessly: one entry per epoch.
    assert len(resumed.logger.get_value("lrs", step=None)) == epochs
    assert len(resumed.logger.get_value(CONTROL_LOG_KEY, step=None)) == epochs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("snapshot_file", ["kept", "lost", "of another epoch"])
def test_a_run_resumed_after_an_intervention_can_still_roll_it_back(
    scripted_server: Callable[..., ScriptedServer],
    make_trainer: Callable[..., RecordingTrainer],
    snapshot_file: str,
) -> None:
    server = scripted_server(
        {
            0: INTERVENE_AT_0,
            2: ROLLBACK_TO_REFERENCE,
        }
    )
    epochs = 4
    crashing = make_trainer(
        epochs=epochs, server=server.target, save_every=1, env={"TRAINCTL_RUN_ID": "rb-run"}
    )
    crashing.crash_after_epoch = 1
    with pytest.raises(RuntimeError, match="simulated crash after epoch 1"):
        crashing.run_training()
    output = Path(crashing.output_folder)
    saved = output / SNAPSHOT_FILE
    assert saved.is_file()
    if snapshot_file == "lost":
        saved.unlink()
    elif snapshot_file == "of another epoch":
        fields = torch.load(saved, weights_only=False)
        torch.save({**fields, "epoch": 7}, saved)

    resumed = make_trainer(
        epochs=epochs, server=server.target, continue_training=True, env={"TRAINCTL_RUN_ID": ""}
    )
    resumed.load_checkpoint(str(output / "checkpoint_latest.pth"))
    resumed.run_training()

    # The ROLLBACK at 2 undoes the intervention at 0, decided before the restart:
    # epoch 3 starts from the parameters of epoch 0, bit for bit, if the file is its.
    assert [e.outcome for e in resumed.control_events] == ["applied", "none"]
    log = Path(resumed.log_file).read_text()
    if snapshot_file == "kept":
        assert resumed.after_rollback is not None
        epoch, state = resumed.after_rollback
        assert epoch == 3
        before = crashing.states[0]
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k], before[k]) for k in state)
        assert not all(torch.equal(state[k], resumed.states[2][k]) for k in state)
        assert f"restored the model and optimizer of epoch 0 from {SNAPSHOT_FILE}" in log
    else:
        assert resumed.last_rollback is None
        assert "ROLLBACK without a snapshot of the intervention it undoes" in log
    if snapshot_file == "of another epoch":
        assert "holds the snapshot of run rb-run epoch 7, not of run rb-run epoch 0" in log
    # Either way the decision's LR and weights are taken.
    assert resumed.lr_of(3) == pytest.approx(0.0095, rel=1e-12)
    assert resumed.weights_of(3)[0] == REFERENCE


@pytest.mark.timeout(240)
def test_a_snapshot_that_cannot_be_saved_costs_a_warning_not_the_training(
    scripted_server: Callable[..., ScriptedServer], make_trainer: Callable[..., RecordingTrainer]
) -> None:
    server = scripted_server({0: {"action": pb.INTERVENE, "lr": 0.004, "intervention_index": 1}})
    trainer = make_trainer(epochs=2, server=server.target)
    blocked = Path(trainer.output_folder) / SNAPSHOT_FILE
    blocked.mkdir(parents=True)  # a directory where the file should go: the save fails
    trainer.run_training()

    assert [e.outcome for e in trainer.control_events] == ["applied", "none"]
    assert trainer.lr_of(1) == pytest.approx(0.004, rel=1e-12)
    log = Path(trainer.log_file).read_text()
    assert f"WARNING: could not save the snapshot of epoch 0 to {blocked}" in log
    assert not Path(f"{blocked}.partial").exists()


def assert_unchanged_training(
    trainer: RecordingTrainer, epochs: int, deadline_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    for epoch in range(epochs):
        assert trainer.lr_of(epoch) == pytest.approx(0.01 * poly(epoch, epochs), rel=1e-12)
        assert all(w == REFERENCE for w in trainer.weights_of(epoch))
    assert [e.outcome for e in trainer.control_events] == ["no decision"] * epochs
    # At most the deadline per epoch (plus scheduling slack on a busy machine).
    assert all(e.seconds <= deadline_s + 1.0 for e in trainer.control_events)
    # One warning when control was lost (at StartRun), not one per epoch.
    [lost] = [r for r in caplog.records if r.name == "trainer_client.client"]
    assert lost.levelno == logging.WARNING and "control lost" in lost.getMessage()
    assert (Path(trainer.output_folder) / "checkpoint_final.pth").is_file()


@pytest.mark.timeout(240)
def test_without_a_server_the_training_completes_unchanged(
    make_trainer: Callable[..., RecordingTrainer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    trainer = make_trainer(epochs=2, server=None, deadline_s=0.5)
    trainer.run_training()
    assert_unchanged_training(trainer, 2, 0.5, caplog)


@pytest.mark.timeout(240)
def test_a_server_that_never_answers_costs_at_most_the_deadline_per_epoch(
    scripted_server: Callable[..., ScriptedServer],
    make_trainer: Callable[..., RecordingTrainer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    server = scripted_server({}, hang=True)
    trainer = make_trainer(epochs=2, server=server.target, deadline_s=0.5)
    trainer.run_training()
    assert_unchanged_training(trainer, 2, 0.5, caplog)
    assert all(e.seconds >= 0.4 for e in trainer.control_events)
    # StartRun at the start, then again before each epoch's report: it never answered.
    assert len(server.servicer.starts) == 3 and server.servicer.reports == []


@pytest.mark.timeout(240)
def test_with_fail_open_off_an_absent_server_stops_the_training(
    make_trainer: Callable[..., RecordingTrainer],
) -> None:
    trainer = make_trainer(
        epochs=2, server=None, deadline_s=0.5, env={"TRAINCTL_FAIL_OPEN": "false"}
    )
    with pytest.raises(ControlUnavailable):
        trainer.run_training()
    assert trainer.steps == []  # StartRun failed: not one epoch ran


# --- the run's lifecycle against a real server ---------------------------------------------


class CuttingTrainer(RecordingTrainer):
    """Cuts `proxy` (the only way to the server) once epoch `cut_after_epoch` ended."""

    proxy: TcpProxy | None = None
    cut_after_epoch = 0

    def on_epoch_end(self) -> None:
        try:
            super().on_epoch_end()
        finally:
            if self.proxy is not None and self.current_epoch - 1 == self.cut_after_epoch:
                self.proxy.cut()


@pytest.mark.timeout(240)
def test_an_outage_then_a_crash_then_a_resume_leaves_no_hole_and_finish_run_has_the_dice(
    server: ServerThread,
    make_trainer: Callable[..., RecordingTrainer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Epoch 0 reaches the server; then the network is cut, epoch 1's report is held and
    checkpointed, and the training crashes. Resumed with --c once the network is back,
    it delivers epoch 1 late, opens attempt 2 from the checkpoint's epoch, trains on,
    validates, and FinishRun records the final Dice and the best EMA pseudo Dice."""
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    epochs = 4
    with TcpProxy(server.port) as proxy:
        target = f"127.0.0.1:{proxy.port}"
        crashing = make_trainer(
            epochs=epochs,
            server=target,
            deadline_s=2.0,
            save_every=1,
            env={"TRAINCTL_RUN_ID": "life-run"},
            trainer_class=CuttingTrainer,
        )
        assert isinstance(crashing, CuttingTrainer)
        crashing.proxy = proxy
        crashing.crash_after_epoch = 1
        with pytest.raises(RuntimeError, match="simulated crash after epoch 1"):
            crashing.run_training()
        assert [e.outcome for e in crashing.control_events] == ["none", "no decision"]
        lost, unrecorded = (r.getMessage() for r in caplog.records)
        assert "epoch=1 control lost" in lost
        assert "[FinishRun]" in unrecorded and "1 held reports never delivered" in unrecorded
        caplog.clear()

        proxy.restore()
        # The same trainer class (its name is in the output folder), not cutting this time.
        resumed = make_trainer(
            epochs=epochs,
            server=target,
            deadline_s=2.0,
            continue_training=True,
            trainer_class=CuttingTrainer,
        )
        resumed.load_checkpoint(str(Path(resumed.output_folder) / "checkpoint_latest.pth"))
        assert resumed.run_id == "life-run" and resumed.run_state.attempt == 1
        resumed.run_training()
        resumed.perform_actual_validation(False)

    [back] = [r.getMessage() for r in caplog.records]
    assert "control is back: 1 held reports delivered late" in back
    run = get_run(server.target, "life-run")
    assert [(e.report.epoch, e.report.attempt, e.report.late) for e in run.epochs] == [
        (0, 1, False),
        (1, 1, True),
        (2, 2, False),
        (3, 2, False),
    ]
    first, second = run.attempts
    assert first.status in (pb.ACTIVE, pb.STALE)  # its FAILED could not be delivered
    assert second.resume_from_epoch == 1
    assert second.trainer_name == "CuttingTrainer"
    assert "nnunetv2" in second.trainer_version
    assert second.status == pb.COMPLETED
    summary = json.loads((Path(resumed.output_folder) / "validation" / "summary.json").read_text())
    metrics = second.metrics
    assert metrics.mean_dice == pytest.approx(summary["foreground_mean"]["Dice"])
    assert dict(metrics.dice_per_class) == pytest.approx({"1": summary["mean"]["1"]["Dice"]})
    ema = resumed.logger.get_value("ema_fg_dice", step=None)
    assert metrics.best_ema_pseudo_dice == pytest.approx(max(ema))
    assert metrics.best_ema_epoch == ema.index(max(ema))
    log = Path(resumed.log_file).read_text()
    assert "training control: run life-run COMPLETED" in log
    assert "continues from epoch 1" in log  # the server's StartRun message


@pytest.mark.timeout(240)
def test_a_wrong_token_stops_the_training_before_its_first_epoch(
    make_server: Callable[..., ServerThread],
    make_trainer: Callable[..., RecordingTrainer],
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "gpu-1", Role.TRAINER)
    server = make_server(auth_file=path)
    env = {"TRAINCTL_TOKEN": "wrong"}
    trainer = make_trainer(epochs=1, server=server.target, env=env)
    with pytest.raises(ControlSetupError, match="set TRAINCTL_TOKEN") as caught:
        trainer.run_training()
    assert caught.value.variable == "TRAINCTL_TOKEN"
    assert trainer.steps == []
    log = Path(trainer.log_file).read_text()
    assert "ERROR: the training does not start:" in log and "TRAINCTL_TOKEN" in log
    # TRAINCTL_FAIL_OPEN=always: the operator chose to train without control.
    trainer = make_trainer(
        epochs=1, server=server.target, env={**env, "TRAINCTL_FAIL_OPEN": "always"}
    )
    trainer.run_training()
    assert [e.outcome for e in trainer.control_events] == ["no decision"]
