"""The composite loss: nnU-Net's soft Dice and cross-entropy, focal and region variance.

`CompositeLoss` fills nnU-Net's loss slot with a weighted sum of the
components under nnU-Net's deep supervision. Every scale yields the loss with
the optimizer's weights and with the run's reference (initial) weights from
one evaluation of the components, so reported losses stay comparable when the
weights change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

from trainer_client.vocabulary import LOSS_COMPONENTS, check_loss_weights

__all__ = [
    "LOSS_COMPONENTS",
    "CompositeLoss",
    "LossTerms",
    "check_loss_weights",
    "focal_loss",
    "region_variance_loss",
]

# DC_and_CE_loss computes ``weight_ce * ce + weight_dice * dc``: summing in the
# same order makes {dice 1, ce 1} give its value to the last bit.
_SUM_ORDER = ("ce", "dice", "focal", "variance")
_FOCAL_GAMMA = 2.0


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
