"""The snapshot a ROLLBACK restores: network, optimizer, grad scaler and control state.

The trainer takes one right before it applies an intervention and keeps it in
memory; rank 0 also writes it to `SNAPSHOT_FILE` in the output folder, so
that a run resumed from a checkpoint can still roll back. The file holds the
snapshot's fields as a plain dict (no pickled class of this package).
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "SNAPSHOT_FILE",
    "SNAPSHOT_READ_ERRORS",
    "Snapshot",
    "bare_network",
    "load_snapshot",
    "restore_snapshot",
    "save_snapshot",
    "take_snapshot",
]

#: The snapshot taken before the latest intervention, in the output folder (rank 0).
SNAPSHOT_FILE = "checkpoint_before_intervention.pth"
#: What `load_snapshot` raises for a missing, truncated or foreign file.
SNAPSHOT_READ_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    RuntimeError,
    TypeError,
    EOFError,
    pickle.UnpicklingError,
)


@dataclass(frozen=True)
class Snapshot:
    """What ROLLBACK restores: taken right before an intervention is applied."""

    run_id: str
    epoch: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    grad_scaler: dict[str, Any] | None
    lr_base: float
    loss_weights: dict[str, float]


def bare_network(network: nn.Module, is_ddp: bool) -> nn.Module:
    """The module whose state dict a snapshot holds: without the DDP or compile wrapper."""
    # DistributedDataParallel keeps the wrapped module as `module`.
    module = cast(nn.Module, network.module) if is_ddp else network
    # torch.compile wraps the module; its state dict keys carry a prefix.
    return getattr(module, "_orig_mod", module)


def take_snapshot(
    *,
    run_id: str,
    epoch: int,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_scaler: Any,
    lr_base: float,
    loss_weights: dict[str, float],
) -> Snapshot:
    """Copies of the state of `network` (the bare module), `optimizer` and `grad_scaler`."""
    return Snapshot(
        run_id=run_id,
        epoch=epoch,
        network={k: v.detach().clone() for k, v in network.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        grad_scaler=(copy.deepcopy(grad_scaler.state_dict()) if grad_scaler is not None else None),
        lr_base=float(lr_base),
        loss_weights=loss_weights,
    )


def restore_snapshot(
    snapshot: Snapshot, *, network: nn.Module, optimizer: torch.optim.Optimizer, grad_scaler: Any
) -> None:
    """Load the snapshot's network, optimizer and grad scaler state (the snapshot stays intact)."""
    network.load_state_dict(snapshot.network)
    optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
    if grad_scaler is not None and snapshot.grad_scaler is not None:
        grad_scaler.load_state_dict(snapshot.grad_scaler)


def save_snapshot(snapshot: Snapshot, path: str) -> None:
    """Write `snapshot` to `path` atomically: a crash mid-write leaves the previous file.

    Raises `OSError` or `RuntimeError` when it cannot be written; no partial
    file is left behind then.
    """
    partial = path + ".partial"
    try:
        torch.save(vars(snapshot), partial)
        os.replace(partial, path)
    except (OSError, RuntimeError):
        with contextlib.suppress(OSError):
            os.remove(partial)  # a full disk should not stay fuller
        raise


def load_snapshot(path: str, device: torch.device) -> Snapshot:
    """The snapshot written to `path`; one of `SNAPSHOT_READ_ERRORS` if it cannot be read."""
    fields = torch.load(path, map_location=device, weights_only=False)
    return Snapshot(**fields)
