"""`nnUNetTrainerControlled`: an nnUNetTrainer that reports every epoch and obeys.

After nnU-Net has logged an epoch, the trainer reports it to the control
server (rank 0 only) and applies the decision at the epoch boundary: the next
epoch's LR (PolyLR's base is rescaled so that the next epoch runs at exactly
the decided LR and the decay goes on from there), the loss weights of its
`CompositeLoss`, a ROLLBACK to the `Snapshot` taken before the intervention
it undoes, or STOP. The control state is logged once per epoch in nnU-Net's
logger, which every checkpoint saves, so a resumed run keeps its run id,
intervention count, LR and weights, its attempt, and the reports held for late
delivery while the server was unreachable.

The run's lifecycle: `on_train_start` calls StartRun (with the checkpoint's epoch
after ``--c``); a setup mistake (token, role, TLS, address) stops the training
there, before its first epoch, unless TRAINCTL_FAIL_OPEN=always. FinishRun says
how it ended: FAILED with the error as soon as training or validation raises;
COMPLETED or STOPPED after the final validation (`perform_actual_validation`),
with its mean Dice per class and overall and the best EMA pseudo Dice and its
epoch, or from `finish_control` when no validation follows.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from trainer_client.api import control_pb2
from trainer_client.client import DEFAULT_LOSS_WEIGHTS, ControlClient, RunState
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError
from trainer_client.nnunet.ddp import rank_zero_first, share_decision
from trainer_client.nnunet.loss import CompositeLoss, LossTerms, check_loss_weights
from trainer_client.nnunet.snapshot import (
    SNAPSHOT_FILE,
    SNAPSHOT_READ_ERRORS,
    Snapshot,
    bare_network,
    load_snapshot,
    restore_snapshot,
    save_snapshot,
    take_snapshot,
)

__all__ = [
    "CONTROL_LOG_KEY",
    "ControlEvent",
    "default_run_id",
    "mean_finite",
    "nnUNetTrainerControlled",
]

#: The key of the control state in nnU-Net's logger (saved in every checkpoint).
CONTROL_LOG_KEY = "training_control"

_PREFIX = "training control:"


def mean_finite(values: Sequence[torch.Tensor]) -> float | None:
    """The mean of the finite ones among scalar device tensors, None if none is.

    One device-to-host copy for the lot: the per-step values stay on the device.
    """
    if not values:
        return None
    stacked = torch.stack([v.reshape(()) for v in values]).float()
    finite = torch.isfinite(stacked)
    sums = [torch.where(finite, stacked, 0.0).sum(), finite.sum().to(stacked.dtype)]
    total, count = torch.stack(sums).tolist()
    return total / count if count else None


# --- the trainer -------------------------------------------------------------------------


def default_run_id(dataset: str, trainer: str, plans: str, configuration: str, fold: Any) -> str:
    """The run id a trainer uses unless TRAINCTL_RUN_ID says otherwise.

    It names nnU-Net's output folder (dataset, trainer, plans, configuration,
    fold), so a resumed training keeps it and two trainings that would share
    a folder share it too.
    """
    return f"{dataset}__{trainer}__{plans}__{configuration}__fold_{fold}"


@dataclass
class ControlEvent:
    """What the trainer did with one epoch's report (for logs, tests and benchmarks)."""

    epoch: int
    report: control_pb2.EpochReport
    decision: control_pb2.Decision | None
    #: "applied", "no decision", "refused", "none" (action NONE) or "stop".
    outcome: str
    #: Seconds spent reporting and applying (the training's cost of control).
    seconds: float
    #: The LR and loss weights the next epoch uses.
    next_lr: float | None = None
    next_weights: dict[str, float] = field(default_factory=dict)


class nnUNetTrainerControlled(nnUNetTrainer):  # type: ignore[misc]  # nnunetv2 is untyped
    """An nnUNetTrainer steered by a training-control server; see `trainer_client.nnunet`.

    Configured only through TRAINCTL_* environment variables: the constructor
    keeps the base signature, which nnU-Net's bookkeeping of init arguments
    relies on.
    """

    #: The weights a run starts with (nnU-Net's default loss); reports use them.
    reference_loss_weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS

    def __init__(
        self,
        plans: dict[str, Any],
        configuration: str,
        fold: int | str,
        dataset_json: dict[str, Any],
        device: torch.device = torch.device("cuda"),  # noqa: B008  # the base signature
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.control_config = ClientConfig.from_env(os.environ)
        #: Keep each step's gradient norm (off only to measure what keeping it costs).
        self.capture_grad_norm = True
        #: One entry per reported epoch, in order.
        self.control_events: list[ControlEvent] = []
        #: The snapshot the last ROLLBACK restored (None until one did).
        self.last_rollback: Snapshot | None = None
        self._grad_norms: list[torch.Tensor] = []
        self._client: ControlClient | None = None
        self._run: RunState | None = None
        self._snapshot: Snapshot | None = None
        #: The epoch of the intervention a ROLLBACK would undo (None: nothing to undo);
        #: saved in the control state, so a resumed run knows which snapshot file is its.
        self._snapshot_epoch: int | None = None
        self._stop_requested = False
        #: The epoch of the checkpoint this training resumed from (None: from scratch).
        self._resumed_from: int | None = None
        #: Reports a checkpoint held for late delivery (serialized), for the new client.
        self._restored_held: list[bytes] = []
        #: How the run ended, once training ended; sent by FinishRun after validation.
        self._finish_status: control_pb2.RunStatus.ValueType | None = None
        self._validated = False
        self.logger.local_logger.my_fantastic_logging.setdefault(CONTROL_LOG_KEY, [])

    # -- set-up ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The id this training reports under."""
        return self._control().run_id

    @property
    def run_state(self) -> RunState:
        """The control state the reports carry (built by `initialize`)."""
        return self._control()

    @property
    def stop_requested(self) -> bool:
        """True once a STOP was applied (the training ends after this epoch)."""
        return self._stop_requested

    def initialize(self) -> None:
        super().initialize()
        name = type(self).__name__
        plans = self.plans_manager.plans_name
        dataset = self.plans_manager.dataset_name
        run_id = self.control_config.run_id or default_run_id(
            dataset, name, plans, self.configuration_name, self.fold
        )
        self._run = RunState(
            run_id=run_id,
            initial_lr=float(self.initial_lr),
            current_lr=float(self.initial_lr),
            labels={
                "dataset": dataset,
                "configuration": self.configuration_name,
                "fold": str(self.fold),
                "trainer": name,
                "plans": plans,
                "host": socket.gethostname(),
            },
            loss_weights=dict(self.reference_loss_weights),
        )

    def _build_loss(self) -> nn.Module:
        if self.label_manager.has_regions:
            self.print_to_log_file(
                f"{_PREFIX} region-based training keeps nnU-Net's DC_and_BCE loss; "
                "decisions that change loss weights will be refused"
            )
            loss: nn.Module = super()._build_loss()
            return loss
        terms = LossTerms(
            batch_dice=self.configuration_manager.batch_dice,
            ignore_label=self.label_manager.ignore_label,
            ddp=self.is_ddp,
            weights=self.reference_loss_weights,
            reference_weights=self.reference_loss_weights,
        )
        if self._do_i_compile():
            terms.dc = torch.compile(terms.dc)
        weights = None
        if self.enable_deep_supervision:
            # nnU-Net's own deep supervision weights: 1/2^i, the last 0, normalised.
            scales = self._get_deep_supervision_scales()
            ds = np.array([1 / (2**i) for i in range(len(scales))])
            # DDP without compile rejects the unused last output (see nnUNetTrainer).
            ds[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
            weights = list(ds / ds.sum())
        return CompositeLoss(terms, weights)

    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split, safe across ranks. Every rank that finds no
        splits_final.json writes it, so a rank could read it half written
        (seen: JSONDecodeError on rank 1): here rank 0 writes it while the others
        wait, then they read it."""
        with rank_zero_first():
            return super().do_split()  # type: ignore[no-any-return]

    def on_train_start(self) -> None:
        super().on_train_start()
        config = self.control_config
        mode = "always" if config.fail_open_on_setup else "outage" if config.fail_open else "never"
        self.print_to_log_file(
            f"{_PREFIX} run {self.run_id}, server {config.target}, "
            f"deadline {config.deadline_s:g} s, fail-open {mode}, "
            f"loss weights {_fmt_weights(self._loss_weights())}, "
            f"interventions so far {self._control().intervention_count}"
        )
        # Only now: the data loaders (and their worker processes) exist, and a
        # gRPC channel must not be inherited through a fork.
        failure: Exception | None = None
        if self.local_rank == 0:
            self._client = ControlClient(config)
            try:
                self._start_run(self._client)
            except Exception as exc:  # a setup mistake, or any failure with fail-open off
                failure = exc
                self.print_to_log_file(f"{_PREFIX} ERROR: the training does not start: {exc}")
                self._client.close()
                self._client = None
        try:
            share_decision(None, f"{type(failure).__name__}: {failure}" if failure else None)
        except RuntimeError:
            # Every rank stops; rank 0 with its own error, which names what to fix.
            if failure is not None:
                raise failure from None
            raise

    def _start_run(self, client: ControlClient) -> None:
        """Hand the client the reports a checkpoint held, then StartRun."""
        client.hold_reports(self._restored_held)
        self._restored_held = []
        start = client.start_run(
            self._control(),
            trainer_name=type(self).__name__,
            trainer_version=_versions(),
            resume_from_epoch=self._resumed_from,
        )
        if start.message:
            warning = "WARNING: " if start.history_reset else ""
            self.print_to_log_file(f"{_PREFIX} {warning}{start.message}")

    # -- one epoch ------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._grad_norms = []
        if isinstance(self.loss, CompositeLoss):
            self.loss.use_reference = False
        super().on_train_epoch_start()

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """nnU-Net's train step, keeping the pre-clip gradient norm and reporting the
        loss with the reference weights (the optimizer's weights drive the update)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        context = (
            autocast(self.device.type, enabled=True)
            if self.device.type == "cuda"
            else dummy_context()
        )
        with context:
            output = self.network(data)
            if isinstance(self.loss, CompositeLoss):
                pair = self.loss.pair(output, target)
            else:
                single = self.loss(output, target)
                pair = torch.stack([single, single])
            loss = pair[0]

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        if self.capture_grad_norm:
            # The device tensor, not its value: reading it here would wait for the device.
            self._grad_norms.append(norm.detach())
        return {"loss": pair[1].detach().cpu().numpy()}

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if isinstance(self.loss, CompositeLoss):
            self.loss.use_reference = True

    @property
    def step_gradient_norms(self) -> tuple[torch.Tensor, ...]:
        """This epoch's pre-clip gradient norms so far, one device tensor per step."""
        return tuple(self._grad_norms)

    def epoch_gradient_norm(self) -> float | None:
        """Mean pre-clip total gradient norm of this epoch's finite steps (one host sync)."""
        return mean_finite(self._grad_norms)

    def on_epoch_end(self) -> None:
        # Before nnU-Net's own epoch end: it writes the checkpoints, which must
        # hold this epoch's decision, and plots the logger, whose lists must all
        # have this epoch's entry.
        self._control_epoch()
        super().on_epoch_end()

    def run_training(self) -> None:
        """nnU-Net's loop, which also ends when a STOP was applied. An exception ends
        the run as FAILED (FinishRun) and goes on up."""
        self.on_train_start()
        try:
            self._train_epochs()
        except BaseException as error:
            self._finish(control_pb2.FAILED, error=_error_text(error))
            raise

    def _train_epochs(self) -> None:
        while self.current_epoch < self.num_epochs and not self._stop_requested:
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [
                self.train_step(next(self.dataloader_train))
                for _ in range(self.num_iterations_per_epoch)
            ]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [
                    self.validation_step(next(self.dataloader_val))
                    for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        if self._stop_requested:
            self.print_to_log_file(
                f"{_PREFIX} stopped by the server after epoch {self.current_epoch - 1}"
            )
        self.on_train_end()
        # FinishRun waits for the final validation's Dice (or `finish_control`).
        self._finish_status = control_pb2.STOPPED if self._stop_requested else control_pb2.COMPLETED

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation, then FinishRun with its Dice (FAILED if it raises)."""
        try:
            super().perform_actual_validation(save_probabilities)
        except BaseException as error:
            self._finish(control_pb2.FAILED, error=_error_text(error))
            raise
        self._validated = True
        self.finish_control()

    def finish_control(self) -> None:
        """Send FinishRun for a training that ended (COMPLETED or STOPPED) with its final
        metrics, and close the client; for when no final validation follows. Does
        nothing before the training ended, or once done."""
        if self._finish_status is None:
            return
        if self._client is None:  # not rank 0, or no control: nothing to tell
            self._finish_status = None
            return
        self._finish(self._finish_status, metrics=self.final_metrics())

    def _finish(
        self,
        status: control_pb2.RunStatus.ValueType,
        *,
        error: str = "",
        metrics: control_pb2.FinalMetrics | None = None,
    ) -> None:
        client, self._client = self._client, None
        self._finish_status = None
        if client is None:
            return
        try:
            recorded = client.finish_run(self.run_id, status, error=error, metrics=metrics)
        except ControlError as failure:  # fail-open off: the run must hear of it
            self.print_to_log_file(f"{_PREFIX} ERROR: FinishRun failed: {failure}")
            raise
        finally:
            client.close()
        if recorded:
            self.print_to_log_file(
                f"{_PREFIX} run {self.run_id} {control_pb2.RunStatus.Name(status)}"
                + (f": {error}" if error else "")
            )

    def final_metrics(self) -> control_pb2.FinalMetrics:
        """The final validation's Dice (mean and per class, from its summary.json, when it
        ran in this process) and the best EMA pseudo Dice with its epoch."""
        metrics = control_pb2.FinalMetrics()
        summary_file = Path(self.output_folder) / "validation" / "summary.json"
        if self._validated and summary_file.is_file():
            try:
                summary = json.loads(summary_file.read_text())
            except (OSError, ValueError) as error:
                self.print_to_log_file(f"{_PREFIX} WARNING: cannot read {summary_file}: {error}")
                summary = {}
            overall = _finite(summary.get("foreground_mean", {}).get("Dice"))
            if overall is not None:
                metrics.mean_dice = overall
            for label, values in summary.get("mean", {}).items():
                dice = _finite(values.get("Dice")) if isinstance(values, dict) else None
                if dice is not None:
                    metrics.dice_per_class[str(label)] = dice
        logged = self.logger.local_logger.my_fantastic_logging.get("ema_fg_dice", [])
        finite = [(v, epoch) for epoch, v in enumerate(map(_finite, logged)) if v is not None]
        if finite:
            # nnU-Net's _best_ema: the first epoch that reached the highest EMA.
            best, epoch = max(finite, key=lambda pair: (pair[0], -pair[1]))
            metrics.best_ema_pseudo_dice, metrics.best_ema_epoch = best, epoch
        return metrics

    def on_train_end(self) -> None:
        super().on_train_end()

    # -- checkpoints ----------------------------------------------------------------------

    def load_checkpoint(self, filename_or_checkpoint: dict[str, Any] | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        # The checkpoint was written after this epoch; StartRun continues from it.
        self._resumed_from = self.current_epoch - 1 if self.current_epoch > 0 else None
        self._restore_control_state()

    def _restore_control_state(self) -> None:
        logged = self.logger.local_logger.my_fantastic_logging
        history = logged.get(CONTROL_LOG_KEY)
        if history is None:
            # A checkpoint of another trainer: one (empty) entry per epoch it ran.
            history = logged[CONTROL_LOG_KEY] = [None] * len(logged.get("train_losses", []))
        saved = next((entry for entry in reversed(history) if entry), None)
        if saved is None:
            self.print_to_log_file(
                f"{_PREFIX} the checkpoint holds no control state; starting fresh"
            )
            return
        run = self._control()
        if self.control_config.run_id is None:
            run.run_id = saved["run_id"]
        elif self.control_config.run_id != saved["run_id"]:
            self.print_to_log_file(
                f"{_PREFIX} TRAINCTL_RUN_ID={self.control_config.run_id} replaces the checkpoint's "
                f"run id {saved['run_id']}"
            )
        run.intervention_count = int(saved["intervention_count"])
        # Absent in older checkpoints: attempt 0 and nothing held.
        run.attempt = int(saved.get("attempt", 0))
        self._restored_held = list(saved.get("held_reports", []))
        run.loss_weights = dict(saved["loss_weights"])
        self.lr_scheduler.initial_lr = float(saved["lr_base"])
        self._stop_requested = bool(saved["stopped"])
        self._snapshot_epoch = saved.get("snapshot_epoch")  # absent in older checkpoints
        if isinstance(self.loss, CompositeLoss):
            self.loss.set_reference_weights(saved["reference_loss_weights"])
            self.loss.set_weights(saved["loss_weights"])
        if int(saved["num_epochs"]) != self.num_epochs:
            self.print_to_log_file(
                f"{_PREFIX} WARNING: the checkpoint was trained for {saved['num_epochs']} epochs, "
                f"this run for {self.num_epochs}: the decided LR shifts with the PolyLR horizon"
            )
        held = f", {len(self._restored_held)} reports held" if self._restored_held else ""
        self.print_to_log_file(
            f"{_PREFIX} resumed run {run.run_id} at epoch {self.current_epoch} (a checkpoint "
            f"of attempt {run.attempt}): {run.intervention_count} interventions, next LR "
            f"{self._next_epoch_lr():.6g}, loss weights {_fmt_weights(run.loss_weights)}{held}"
        )

    def _control_state(self) -> dict[str, Any]:
        run = self._control()
        return {
            "run_id": run.run_id,
            "intervention_count": run.intervention_count,
            "lr_base": float(self.lr_scheduler.initial_lr),
            "loss_weights": self._loss_weights(),
            "reference_loss_weights": self._reference_weights(),
            "stopped": self._stop_requested,
            "num_epochs": int(self.num_epochs),
            "snapshot_epoch": self._snapshot_epoch,
            "attempt": run.attempt,
            # Reports no server answered yet (rank 0's), delivered late after a resume.
            "held_reports": self._client.held_reports() if self._client is not None else [],
        }

    # -- report, decide, apply --------------------------------------------------------------

    def _control(self) -> RunState:
        if self._run is None:
            raise RuntimeError("the trainer is not initialized yet: call initialize() first")
        return self._run

    def _loss_weights(self) -> dict[str, float]:
        if isinstance(self.loss, CompositeLoss):
            return self.loss.weights
        return dict(self._control().loss_weights)

    def _reference_weights(self) -> dict[str, float]:
        if isinstance(self.loss, CompositeLoss):
            return self.loss.reference_weights
        return dict(self.reference_loss_weights)

    def _control_epoch(self) -> None:
        started = time.perf_counter()
        epoch = self.current_epoch
        report = self._build_report(epoch)
        decision: control_pb2.Decision | None = None
        error: str | None = None
        if self.local_rank == 0 and self._client is not None:
            try:
                decision = self._client.report(report)
            except Exception as exc:  # fail-open is off: every rank must hear of it
                error = f"{type(exc).__name__}: {exc}"
        decision = share_decision(decision, error)
        outcome = self._apply(epoch, decision)
        history = self.logger.local_logger.my_fantastic_logging[CONTROL_LOG_KEY]
        if history and isinstance(history[-1], dict):
            # Only the latest entry holds the held reports: every checkpoint saves them all.
            history[-1].pop("held_reports", None)
        self.logger.local_logger.log(CONTROL_LOG_KEY, self._control_state(), epoch)
        self.control_events.append(
            ControlEvent(
                epoch=epoch,
                report=report,
                decision=decision,
                outcome=outcome,
                seconds=time.perf_counter() - started,
                next_lr=self._next_epoch_lr(),
                next_weights=self._loss_weights(),
            )
        )

    def _build_report(self, epoch: int) -> control_pb2.EpochReport:
        run = self._control()
        get = self.logger.get_value
        run.current_lr = float(self.optimizer.param_groups[0]["lr"])
        run.loss_weights = self._loss_weights()
        val_loss = float(get("val_losses", step=-1)) if get("val_losses", step=None) else None
        dice = float(get("mean_fg_dice", step=-1)) if get("mean_fg_dice", step=None) else None
        return run.build_report(
            epoch,
            train_loss=float(get("train_losses", step=-1)),
            val_loss=val_loss,
            pseudo_dice=dice if dice is not None and math.isfinite(dice) else None,
            avg_gradient_norm=self.epoch_gradient_norm(),
        )

    def _apply(self, epoch: int, decision: control_pb2.Decision | None) -> str:
        if decision is None:
            self.print_to_log_file(
                f"{_PREFIX} epoch {epoch}: no decision; LR and loss weights unchanged"
            )
            return "no decision"
        action = decision.action
        name = control_pb2.Action.Name(action)
        if action in (control_pb2.INTERVENE, control_pb2.ROLLBACK) and decision.loss_weights:
            problem = self._weights_problem(decision.loss_weights)
            if problem is not None:
                self.print_to_log_file(
                    f"{_PREFIX} ERROR: epoch {epoch}: refused {name} {decision.decision_id}: "
                    f"{problem}; training goes on with LR and loss weights unchanged"
                )
                return "refused"
        if action == control_pb2.INTERVENE:
            self._snapshot = self._take_snapshot(epoch)
            self._snapshot_epoch = epoch
            self._save_snapshot(self._snapshot)
            self._take_lr_and_weights(decision)
        elif action == control_pb2.ROLLBACK:
            self._rollback(epoch, decision)
        elif action == control_pb2.STOP:
            self._stop_requested = True
        self.print_to_log_file(
            f"{_PREFIX} epoch {epoch}: {name}"
            + (
                f", next LR {self._next_epoch_lr():.6g}, loss weights "
                f"{_fmt_weights(self._loss_weights())}"
                if action in (control_pb2.INTERVENE, control_pb2.ROLLBACK)
                else ""
            )
            + (f" ({decision.reason})" if decision.reason else "")
        )
        if action == control_pb2.NONE:
            return "none"
        return "stop" if action == control_pb2.STOP else "applied"

    def _weights_problem(self, weights: Mapping[str, float]) -> str | None:
        if not isinstance(self.loss, CompositeLoss):
            return "this trainer's loss (region-based) has no adjustable weights"
        try:
            check_loss_weights(weights)
        except ValueError as error:
            return str(error)
        return None

    def _take_lr_and_weights(self, decision: control_pb2.Decision) -> None:
        run = self._control()
        run.apply(decision)
        if decision.HasField("lr"):
            self._set_next_epoch_lr(decision.lr)
        if decision.loss_weights and isinstance(self.loss, CompositeLoss):
            self.loss.set_weights(dict(decision.loss_weights))
        run.loss_weights = self._loss_weights()

    def _rollback(self, epoch: int, decision: control_pb2.Decision) -> None:
        started = time.perf_counter()
        snapshot, source = self._snapshot, "memory"
        if snapshot is None:
            snapshot, source = self._saved_snapshot(epoch), SNAPSHOT_FILE
        self._snapshot, self._snapshot_epoch = None, None
        if snapshot is None:
            self.print_to_log_file(
                f"{_PREFIX} WARNING: epoch {epoch}: ROLLBACK without a snapshot of the "
                "intervention it undoes; only the LR and loss weights are restored"
            )
        else:
            restore_snapshot(
                snapshot,
                network=self._bare_network(),
                optimizer=self.optimizer,
                grad_scaler=self.grad_scaler,
            )
            self.lr_scheduler.initial_lr = snapshot.lr_base
            if isinstance(self.loss, CompositeLoss):
                self.loss.set_weights(snapshot.loss_weights)
            self._control().loss_weights = dict(snapshot.loss_weights)
            self.last_rollback = snapshot
            self.print_to_log_file(
                f"{_PREFIX} epoch {epoch}: restored the model and optimizer of epoch "
                f"{snapshot.epoch} from {source} ({time.perf_counter() - started:.2f} s)"
            )
        self._take_lr_and_weights(decision)

    def _save_snapshot(self, snapshot: Snapshot) -> None:
        """Rank 0 writes the snapshot next to the checkpoints (atomically: a crash
        mid-write leaves the previous file). A failure costs only the rollback after
        a restart, so it is logged, not raised."""
        if self.local_rank != 0:
            return
        path = join(self.output_folder, SNAPSHOT_FILE)
        started = time.perf_counter()
        try:
            save_snapshot(snapshot, path)
        except (OSError, RuntimeError) as error:
            self.print_to_log_file(
                f"{_PREFIX} WARNING: could not save the snapshot of epoch {snapshot.epoch} to "
                f"{path}: {error}; a ROLLBACK after a restart will restore only LR and weights"
            )
            return
        self.print_to_log_file(
            f"{_PREFIX} saved the snapshot of epoch {snapshot.epoch} "
            f"({time.perf_counter() - started:.2f} s)"
        )

    def _saved_snapshot(self, epoch: int) -> Snapshot | None:
        """The snapshot file, if it is the one this run's control state expects (the
        run resumed since it was taken); else None, with the reason logged."""
        expected = self._snapshot_epoch
        if expected is None:
            return None
        path = join(self.output_folder, SNAPSHOT_FILE)
        try:
            snapshot = load_snapshot(path, self.device)
        except SNAPSHOT_READ_ERRORS as error:
            self.print_to_log_file(
                f"{_PREFIX} WARNING: epoch {epoch}: cannot read the snapshot {path}: {error}"
            )
            return None
        if snapshot.run_id != self.run_id or snapshot.epoch != expected:
            self.print_to_log_file(
                f"{_PREFIX} WARNING: epoch {epoch}: {path} holds the snapshot of run "
                f"{snapshot.run_id} epoch {snapshot.epoch}, not of run {self.run_id} epoch "
                f"{expected}; not used"
            )
            return None
        return snapshot

    def _take_snapshot(self, epoch: int) -> Snapshot:
        return take_snapshot(
            run_id=self.run_id,
            epoch=epoch,
            network=self._bare_network(),
            optimizer=self.optimizer,
            grad_scaler=self.grad_scaler,
            lr_base=self.lr_scheduler.initial_lr,
            loss_weights=self._loss_weights(),
        )

    def _bare_network(self) -> nn.Module:
        return bare_network(self.network, self.is_ddp)

    def _set_next_epoch_lr(self, lr: float) -> None:
        """Rescale PolyLR's base so that the next epoch's ``step`` lands on `lr` exactly
        and the decay goes on from there."""
        factor = self._poly_factor(self.current_epoch + 1)
        if factor > 0:
            self.lr_scheduler.initial_lr = lr / factor

    def _next_epoch_lr(self) -> float:
        return float(self.lr_scheduler.initial_lr) * self._poly_factor(self.current_epoch + 1)

    def _poly_factor(self, epoch: int) -> float:
        scheduler = self.lr_scheduler
        return float(max(0.0, 1.0 - epoch / scheduler.max_steps) ** scheduler.exponent)


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (numpy's included), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _versions() -> str:
    """'training-control 0.1.0 / nnunetv2 2.8.1' (a version unknown: '?')."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return f"training-control {version('training-control')} / nnunetv2 {version('nnunetv2')}"


def _fmt_weights(weights: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k} {weights[k]:g}" for k in sorted(weights) if weights[k]) + "}"
