"""nnU-Net v2 under training control: `nnUNetTrainerControlled` and ``trainctl-nnunet``.

The only module of the project that imports torch or nnunetv2. The trainer is
an `nnUNetTrainer` with the base ``__init__`` signature, configured through the
environment (``TRAINCTL_SERVER``, ``TRAINCTL_TOKEN``, ``TRAINCTL_RUN_ID``,
``TRAINCTL_DEADLINE_S``, ``TRAINCTL_FAIL_OPEN``; see `ClientConfig.from_env`).
After every epoch it reports to the control server and applies the decision at
the epoch boundary:

- gradient norm: ``train_step`` keeps the pre-clip total norm that
  ``clip_grad_norm_`` returns as a device tensor; the epoch mean (non-finite
  steps left out) is computed once per epoch, so no step waits on the device;
- loss: `CompositeLoss`, a weighted sum of ``dice`` (nnU-Net's soft Dice),
  ``ce``, ``focal`` and ``variance`` under nnU-Net's deep supervision. Every
  scale yields the loss with the optimizer's weights and with the run's
  reference (initial) weights from one evaluation of the components; reports
  and nnU-Net's own ``train_losses``/``val_losses`` use the reference ones;
- LR: PolyLR's base is rescaled so that the next epoch runs at exactly the
  decided LR and the decay goes on from there;
- ROLLBACK restores the snapshot (network, optimizer, grad scaler, control
  state) taken before the intervention it undoes. It is kept in memory and,
  by rank 0, in ``checkpoint_before_intervention.pth`` in the output folder,
  so that a run resumed with ``--c`` can still roll back: the checkpoint's
  control state names the epoch of the snapshot it expects, and a file of
  another epoch or run is not used. STOP ends the training with the final
  checkpoint;
- the control state is logged once per epoch in nnU-Net's logger, which every
  checkpoint saves, so ``--c`` resumes with the same run id, intervention
  count, LR and weights;
- under DDP only rank 0 talks to the server; the decision is broadcast and
  every rank applies it.

``trainctl-nnunet D C F [--c]`` builds the trainer directly, without nnU-Net's
search by name (which imports torchvision, broken beside a CPU-only torch).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import multiprocessing
import os
import pickle
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.helpers import dummy_context, softmax_helper_dim1
from torch import autocast, nn
from torch import distributed as dist

from trainer_client.api import control_pb2
from trainer_client.client import DEFAULT_LOSS_WEIGHTS, ControlClient, RunState
from trainer_client.config import ClientConfig

__all__ = [
    "CONTROL_LOG_KEY",
    "LOSS_COMPONENTS",
    "SNAPSHOT_FILE",
    "CompositeLoss",
    "ControlEvent",
    "LossTerms",
    "build_trainer",
    "default_run_id",
    "focal_loss",
    "main",
    "mean_finite",
    "nnUNetTrainerControlled",
    "region_variance_loss",
    "share_decision",
]

logger = logging.getLogger(__name__)

#: The loss components the trainer implements (the server knows the same names).
LOSS_COMPONENTS: tuple[str, ...] = ("dice", "ce", "focal", "variance")
#: The key of the control state in nnU-Net's logger (saved in every checkpoint).
CONTROL_LOG_KEY = "training_control"
#: The snapshot taken before the latest intervention, in the output folder (rank 0).
SNAPSHOT_FILE = "checkpoint_before_intervention.pth"

# DC_and_CE_loss computes ``weight_ce * ce + weight_dice * dc``: summing in the
# same order makes {dice 1, ce 1} give its value to the last bit.
_SUM_ORDER = ("ce", "dice", "focal", "variance")
_FOCAL_GAMMA = 2.0
_PREFIX = "training control:"


# --- the composite loss ------------------------------------------------------------------


def check_loss_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """A validated copy of a weight map; `ValueError` naming the problem otherwise."""
    unknown = sorted(set(weights) - set(LOSS_COMPONENTS))
    if unknown:
        raise ValueError(
            f"unknown loss component(s) {', '.join(unknown)}; "
            f"expected one of {', '.join(LOSS_COMPONENTS)}"
        )
    checked = {name: float(w) for name, w in weights.items()}
    if any(not (math.isfinite(w) and w >= 0) for w in checked.values()):
        raise ValueError(f"loss weights must be finite and >= 0, but got {checked}")
    if not any(checked.values()):
        raise ValueError(f"loss weights must not all be 0, but got {checked}")
    return checked


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = _FOCAL_GAMMA,
) -> torch.Tensor:
    """Multi-class softmax focal loss, mean over (unmasked) voxels.

    ``-(1 - p_t) ** gamma * log(p_t)``, where p_t is the softmax probability of
    the true class; `target` holds class indices, shape (b, 1, ...).
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, target.long())
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if mask is None:
        return loss.mean()
    weight = mask.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def region_variance_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over foreground classes of the variance of the predicted probability of
    the class inside its ground-truth region (over the whole batch).

    Classes absent from the batch are left out (0 when none is present). No
    host sync: absent classes are masked, not filtered.
    """
    probs = torch.softmax(logits.float(), dim=1)
    with torch.no_grad():
        onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
        if mask is not None:
            onehot = onehot * mask.to(onehot.dtype)
    probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = [0, *range(2, probs.ndim)]
    count = onehot.sum(axes)
    n = count.clamp_min(1.0)
    mean = (probs * onehot).sum(axes) / n
    shape = [1, -1] + [1] * (probs.ndim - 2)
    variance = (onehot * (probs - mean.view(shape)) ** 2).sum(axes) / n
    present = (count > 0).to(variance.dtype)
    return (variance * present).sum() / present.sum().clamp_min(1.0)


class LossTerms(nn.Module):
    """Every loss component at one scale; returns ``[optimizer loss, reference loss]``.

    The components are evaluated once (only those with a weight in either map)
    and combined with both weight maps. ``dice`` and ``ce`` are nnU-Net's own
    modules with the settings of its default ``DC_and_CE_loss``, ignore label
    included.
    """

    def __init__(
        self,
        *,
        batch_dice: bool,
        ignore_label: int | None,
        ddp: bool,
        weights: Mapping[str, float],
        reference_weights: Mapping[str, float],
    ) -> None:
        super().__init__()
        ce_kwargs: dict[str, Any] = {} if ignore_label is None else {"ignore_index": ignore_label}
        self.ce = RobustCrossEntropyLoss(**ce_kwargs)
        self.dc = MemoryEfficientSoftDiceLoss(
            apply_nonlin=softmax_helper_dim1,
            batch_dice=batch_dice,
            smooth=1e-5,
            do_bg=False,
            ddp=ddp,
        )
        self.ignore_label = ignore_label
        self.weights = check_loss_weights(weights)
        self.reference_weights = check_loss_weights(reference_weights)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask: torch.Tensor | None = None
        target_dice = target
        if self.ignore_label is not None:
            # As DC_and_CE_loss: ignored voxels get label 0 and no gradient.
            mask = target != self.ignore_label
            target_dice = torch.where(mask, target, 0)
        needed = {n for n, w in (*self.weights.items(), *self.reference_weights.items()) if w}
        values: dict[str, torch.Tensor] = {}
        if "dice" in needed:
            values["dice"] = self.dc(net_output, target_dice, loss_mask=mask)
        if "ce" in needed and (mask is None or bool(mask.sum() > 0)):
            values["ce"] = self.ce(net_output, target[:, 0])
        if "focal" in needed:
            values["focal"] = focal_loss(net_output, target_dice, mask)
        if "variance" in needed:
            values["variance"] = region_variance_loss(net_output, target_dice, mask)
        return torch.stack(
            [
                _weighted_sum(values, self.weights, net_output),
                _weighted_sum(values, self.reference_weights, net_output),
            ]
        )


def _weighted_sum(
    values: Mapping[str, torch.Tensor], weights: Mapping[str, float], like: torch.Tensor
) -> torch.Tensor:
    total: torch.Tensor | None = None
    for name in _SUM_ORDER:
        weight = weights.get(name, 0.0)
        if weight and name in values:
            term = weight * values[name].float()
            total = term if total is None else total + term
    # Nothing to weigh (only ce, and every voxel ignored): 0, still on the graph.
    return total if total is not None else (like.float() * 0.0).sum()


class CompositeLoss(nn.Module):
    """nnU-Net's loss slot: the weighted components under deep supervision.

    Calling it returns the loss with the optimizer's weights (or, while
    `use_reference` is set, as during validation, with the reference weights);
    `pair` returns both. `DeepSupervisionWrapper` calls the one `LossTerms`
    object at every scale, so `set_weights` changes every scale at once.
    """

    def __init__(self, terms: LossTerms, deep_supervision_weights: Sequence[float] | None) -> None:
        super().__init__()
        self.terms = terms
        self.scales: nn.Module = (
            DeepSupervisionWrapper(terms, deep_supervision_weights)
            if deep_supervision_weights is not None
            else terms
        )
        self.use_reference = False

    @property
    def weights(self) -> dict[str, float]:
        """The weights the optimizer's loss uses."""
        return dict(self.terms.weights)

    @property
    def reference_weights(self) -> dict[str, float]:
        """The run's reference weights (reported losses use them)."""
        return dict(self.terms.reference_weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Use `weights` from the next call on; `ValueError` (and no change) if invalid."""
        self.terms.weights = check_loss_weights(weights)

    def set_reference_weights(self, weights: Mapping[str, float]) -> None:
        self.terms.reference_weights = check_loss_weights(weights)

    def pair(self, net_output: Any, target: Any) -> torch.Tensor:
        """``[loss with the optimizer's weights, loss with the reference weights]``."""
        result: torch.Tensor = self.scales(net_output, target)
        return result

    def forward(self, net_output: Any, target: Any) -> torch.Tensor:
        return self.pair(net_output, target)[1 if self.use_reference else 0]


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


# --- decisions across ranks --------------------------------------------------------------


def share_decision(
    decision: control_pb2.Decision | None, error: str | None = None
) -> control_pb2.Decision | None:
    """Broadcast rank 0's decision (or its failure) to every rank; identity without DDP.

    Every rank calls this after rank 0 reported. A failure on rank 0 (with
    fail-open off) raises on every rank instead of leaving the others waiting.
    """
    if dist.is_available() and dist.is_initialized():
        payload: list[Any] = [
            (decision.SerializeToString() if decision is not None else None, error)
        ]
        dist.broadcast_object_list(payload, src=0)
        data, error = payload[0]
        decision = control_pb2.Decision.FromString(data) if data is not None else None
    if error is not None:
        raise RuntimeError(f"{_PREFIX} rank 0 failed to report: {error}")
    return decision


# --- the trainer -------------------------------------------------------------------------


def default_run_id(dataset: str, trainer: str, plans: str, configuration: str, fold: Any) -> str:
    """The run id a trainer uses unless TRAINCTL_RUN_ID says otherwise.

    It names nnU-Net's output folder (dataset, trainer, plans, configuration,
    fold), so a resumed training keeps it and two trainings that would share
    a folder share it too.
    """
    return f"{dataset}__{trainer}__{plans}__{configuration}__fold_{fold}"


@dataclass(frozen=True)
class _Snapshot:
    """What ROLLBACK restores: taken right before an intervention is applied."""

    run_id: str
    epoch: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    grad_scaler: dict[str, Any] | None
    lr_base: float
    loss_weights: dict[str, float]


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
    """An nnUNetTrainer steered by a training-control server; see the module doc.

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
        self.last_rollback: _Snapshot | None = None
        self._grad_norms: list[torch.Tensor] = []
        self._client: ControlClient | None = None
        self._run: RunState | None = None
        self._snapshot: _Snapshot | None = None
        #: The epoch of the intervention a ROLLBACK would undo (None: nothing to undo);
        #: saved in the control state, so a resumed run knows which snapshot file is its.
        self._snapshot_epoch: int | None = None
        self._stop_requested = False
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
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return super().do_split()  # type: ignore[no-any-return]
        if dist.get_rank() != 0:
            dist.barrier()
            return super().do_split()  # type: ignore[no-any-return]
        try:
            return super().do_split()  # type: ignore[no-any-return]
        finally:
            dist.barrier()

    def on_train_start(self) -> None:
        super().on_train_start()
        # Only now: the data loaders (and their worker processes) exist, and a
        # gRPC channel must not be inherited through a fork.
        if self.local_rank == 0:
            self._client = ControlClient(self.control_config)
        config = self.control_config
        self.print_to_log_file(
            f"{_PREFIX} run {self.run_id}, server {config.target}, "
            f"deadline {config.deadline_s:g} s, "
            f"fail-open {'on' if config.fail_open else 'off'}, "
            f"loss weights {_fmt_weights(self._loss_weights())}, "
            f"interventions so far {self._control().intervention_count}"
        )

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
        """nnU-Net's loop, which also ends when a STOP was applied."""
        self.on_train_start()
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

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- checkpoints ----------------------------------------------------------------------

    def load_checkpoint(self, filename_or_checkpoint: dict[str, Any] | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
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
        self.print_to_log_file(
            f"{_PREFIX} resumed run {run.run_id} at epoch {self.current_epoch}: "
            f"{run.intervention_count} interventions, next LR {self._next_epoch_lr():.6g}, "
            f"loss weights {_fmt_weights(run.loss_weights)}"
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
            self._bare_network().load_state_dict(snapshot.network)
            self.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
            if self.grad_scaler is not None and snapshot.grad_scaler is not None:
                self.grad_scaler.load_state_dict(snapshot.grad_scaler)
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

    def _save_snapshot(self, snapshot: _Snapshot) -> None:
        """Rank 0 writes the snapshot next to the checkpoints (atomically: a crash
        mid-write leaves the previous file). A failure costs only the rollback after
        a restart, so it is logged, not raised."""
        if self.local_rank != 0:
            return
        path = join(self.output_folder, SNAPSHOT_FILE)
        partial = path + ".partial"
        started = time.perf_counter()
        try:
            torch.save(vars(snapshot), partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:
            with contextlib.suppress(OSError):
                os.remove(partial)  # a full disk should not stay fuller
            self.print_to_log_file(
                f"{_PREFIX} WARNING: could not save the snapshot of epoch {snapshot.epoch} to "
                f"{path}: {error}; a ROLLBACK after a restart will restore only LR and weights"
            )
            return
        self.print_to_log_file(
            f"{_PREFIX} saved the snapshot of epoch {snapshot.epoch} "
            f"({time.perf_counter() - started:.2f} s)"
        )

    def _saved_snapshot(self, epoch: int) -> _Snapshot | None:
        """The snapshot file, if it is the one this run's control state expects (the
        run resumed since it was taken); else None, with the reason logged."""
        expected = self._snapshot_epoch
        if expected is None:
            return None
        path = join(self.output_folder, SNAPSHOT_FILE)
        try:
            fields = torch.load(path, map_location=self.device, weights_only=False)
            snapshot = _Snapshot(**fields)
        except (OSError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as error:
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

    def _take_snapshot(self, epoch: int) -> _Snapshot:
        return _Snapshot(
            run_id=self.run_id,
            epoch=epoch,
            network={k: v.detach().clone() for k, v in self._bare_network().state_dict().items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            grad_scaler=(
                copy.deepcopy(self.grad_scaler.state_dict())
                if self.grad_scaler is not None
                else None
            ),
            lr_base=float(self.lr_scheduler.initial_lr),
            loss_weights=self._loss_weights(),
        )

    def _bare_network(self) -> nn.Module:
        module: nn.Module = self.network.module if self.is_ddp else self.network
        # torch.compile wraps the module; its state dict keys carry a prefix.
        return getattr(module, "_orig_mod", module)

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


def _fmt_weights(weights: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k} {weights[k]:g}" for k in sorted(weights) if weights[k]) + "}"


# --- trainctl-nnunet ---------------------------------------------------------------------


def build_trainer(
    dataset_name_or_id: str,
    configuration: str,
    fold: str | int,
    plans_identifier: str = "nnUNetPlans",
    *,
    continue_training: bool = False,
    device: torch.device | None = None,
    trainer_class: type[nnUNetTrainerControlled] = nnUNetTrainerControlled,
) -> nnUNetTrainerControlled:
    """Instantiate the trainer as ``nnUNetv2_train`` would, without its search by name."""
    dataset: str | int = dataset_name_or_id
    if not dataset_name_or_id.startswith("Dataset"):
        try:
            dataset = int(dataset_name_or_id)
        except ValueError:
            raise ValueError(
                "dataset must be an id or a name like Dataset042_Disc, "
                f"but got {dataset_name_or_id!r}."
            ) from None
    if fold != "all":
        fold = int(fold)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = load_json(join(folder, plans_identifier + ".json"))
    # nnUNetTrainer.__init__ pops it: it tells its logger whether to resume.
    plans["continue_training"] = continue_training
    dataset_json = load_json(join(folder, "dataset.json"))
    return trainer_class(
        plans=plans,
        configuration=configuration,
        fold=fold,
        dataset_json=dataset_json,
        device=device if device is not None else torch.device("cuda"),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainctl-nnunet",
        description="Train nnU-Net v2 (nnUNetTrainerControlled) under a training-control server. "
        "The client is configured by TRAINCTL_* environment variables; nnU-Net by its own "
        "(nnUNet_raw, nnUNet_preprocessed, nnUNet_results).",
    )
    parser.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    parser.add_argument("configuration", help="e.g. 2d, 3d_fullres")
    parser.add_argument("fold", help="0-4 or 'all'")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--val", action="store_true", help="only run the final validation of a finished training"
    )
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default="cuda")
    parser.add_argument("--epochs", type=int, help="number of epochs (nnU-Net: 1000)")
    parser.add_argument("--iterations", type=int, help="train iterations per epoch (250)")
    parser.add_argument("--val-iterations", type=int, help="validation iterations per epoch (50)")
    parser.add_argument(
        "--save-every", type=int, help="write checkpoint_latest every N epochs (50)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: all cores on cpu, 1 on cuda)"
    )
    parser.add_argument("--npz", action="store_true", help="save softmax of the final validation")
    parser.add_argument(
        "--no-final-validation", action="store_true", help="skip the final validation"
    )
    parser.add_argument(
        "--disable-checkpointing", action="store_true", help="write no checkpoints (testing)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trainctl-nnunet``: train (or continue) one fold under control; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "iterations", "val_iterations", "save_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {value}")
    if args.c and args.val:
        parser.error("--c and --val exclude each other")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        # nnU-Net's choice: more threads do not help a GPU training.
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    try:
        trainer = build_trainer(
            args.dataset,
            args.configuration,
            args.fold,
            args.plans,
            continue_training=args.c,
            device=torch.device(args.device),
        )
    except (ValueError, OSError, RuntimeError) as error:
        print(f"trainctl-nnunet: {error}", file=sys.stderr)
        return 2
    # Before initialize(): the LR schedule is built for num_epochs.
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.iterations is not None:
        trainer.num_iterations_per_epoch = args.iterations
    if args.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = args.val_iterations
    if args.save_every is not None:
        trainer.save_every = args.save_every
    trainer.disable_checkpointing = args.disable_checkpointing

    from nnunetv2.run.run_training import maybe_load_checkpoint

    maybe_load_checkpoint(trainer, args.c, args.val, None)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if not args.no_final_validation:
        trainer.perform_actual_validation(args.npz)
    return 0


# nnU-Net's final validation starts a spawn pool, which imports the main
# module again: without this guard it would start another training.
if __name__ == "__main__":
    raise SystemExit(main())
