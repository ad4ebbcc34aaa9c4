"""nnU-Net v2 under training control: `nnUNetTrainerControlled` and ``trainctl-nnunet``.

The only package of the project that imports torch or nnunetv2. The trainer is
an `nnUNetTrainer` with the base ``__init__`` signature, configured through the
environment (``TRAINCTL_SERVER``, ``TRAINCTL_TOKEN``, ``TRAINCTL_RUN_ID``,
``TRAINCTL_DEADLINE_S``, ``TRAINCTL_FAIL_OPEN``, ``TRAINCTL_TLS_*``; see
`ClientConfig.from_env`).
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
  count, LR and weights, and the reports held while the server was unreachable
  (delivered late once it is back);
- the run's lifecycle: StartRun when training starts (after ``--c`` with the
  checkpoint's epoch: a new attempt), where a setup mistake (token, role, TLS,
  address) stops the training before its first epoch unless
  ``TRAINCTL_FAIL_OPEN=always``; FinishRun when it ends: FAILED with the error,
  or COMPLETED/STOPPED after the final validation with its Dice;
- under DDP only rank 0 talks to the server; the decision is broadcast and
  every rank applies it.

The modules, by concern: `loss` (the composite loss), `ddp` (decisions across
ranks), `snapshot` (what ROLLBACK restores), `trainer` (the trainer), `cli`
(``trainctl-nnunet``, which builds the trainer without nnU-Net's search by
name) and `synthetic` (a tiny dataset for the demo, tests and benchmark).
The names below are imported on first use, so that ``synthetic`` (numpy and
Pillow, no torch) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer_client.nnunet.cli import build_trainer, main
    from trainer_client.nnunet.ddp import share_decision
    from trainer_client.nnunet.loss import (
        LOSS_COMPONENTS,
        CompositeLoss,
        LossTerms,
        check_loss_weights,
        focal_loss,
        region_variance_loss,
    )
    from trainer_client.nnunet.snapshot import SNAPSHOT_FILE
    from trainer_client.nnunet.trainer import (
        CONTROL_LOG_KEY,
        ControlEvent,
        default_run_id,
        mean_finite,
        nnUNetTrainerControlled,
    )

__all__ = [
    "CONTROL_LOG_KEY",
    "LOSS_COMPONENTS",
    "SNAPSHOT_FILE",
    "CompositeLoss",
    "ControlEvent",
    "LossTerms",
    "build_trainer",
    "check_loss_weights",
    "default_run_id",
    "focal_loss",
    "main",
    "mean_finite",
    "nnUNetTrainerControlled",
    "region_variance_loss",
    "share_decision",
]

# Each exported name and the module that defines it.
_HOME = {
    "CONTROL_LOG_KEY": "trainer",
    "LOSS_COMPONENTS": "loss",
    "SNAPSHOT_FILE": "snapshot",
    "CompositeLoss": "loss",
    "ControlEvent": "trainer",
    "LossTerms": "loss",
    "build_trainer": "cli",
    "check_loss_weights": "loss",
    "default_run_id": "trainer",
    "focal_loss": "loss",
    "main": "cli",
    "mean_finite": "trainer",
    "nnUNetTrainerControlled": "trainer",
    "region_variance_loss": "loss",
    "share_decision": "ddp",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
