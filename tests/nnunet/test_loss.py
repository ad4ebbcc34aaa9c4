"""The composite loss: nnU-Net's default to the last bit, focal and variance by hand, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from trainer_client.nnunet import (
    CompositeLoss,
    LossTerms,
    check_loss_weights,
    focal_loss,
    region_variance_loss,
)

# nnU-Net's deep supervision weights for 5 scales: 1/2^i, the last 0, normalised.
_DS = np.array([1 / 2**i for i in range(5)])
_DS[-1] = 0
DS_WEIGHTS = list(_DS / _DS.sum())
DEFAULT = {"dice": 1.0, "ce": 1.0}


def outputs(
    seed: int, classes: int = 3, batch: int = 2, size: int = 32, ignore: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deep-supervision logits (requiring grad) and targets at 5 scales."""
    generator = torch.Generator().manual_seed(seed)
    logits, targets = [], []
    for i in range(5):
        side = size // 2**i
        logits.append(torch.randn(batch, classes, side, side, generator=generator).requires_grad_())
        labels = classes + (1 if ignore is not None else 0)
        target = torch.randint(0, labels, (batch, 1, side, side), generator=generator).float()
        if ignore is not None:
            target[target == classes] = ignore
        targets.append(target)
    return logits, targets


def composite(
    weights: dict[str, float] = DEFAULT,
    reference: dict[str, float] = DEFAULT,
    *,
    batch_dice: bool = True,
    ignore_label: int | None = None,
) -> CompositeLoss:
    terms = LossTerms(
        batch_dice=batch_dice,
        ignore_label=ignore_label,
        ddp=False,
        weights=weights,
        reference_weights=reference,
    )
    return CompositeLoss(terms, DS_WEIGHTS)


def nnunet_default(*, batch_dice: bool = True, ignore_label: int | None = None) -> torch.nn.Module:
    """Exactly nnUNetTrainer._build_loss for a label (not region) dataset, not DDP."""
    loss = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=ignore_label,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(loss, DS_WEIGHTS)


@pytest.mark.parametrize(
    ("batch_dice", "ignore_label", "seed"),
    [(True, None, 0), (False, None, 1), (True, 3, 2), (False, 3, 3)],
)
def test_dice_1_ce_1_is_nnunets_default_loss_value_and_gradient(
    batch_dice: bool, ignore_label: int | None, seed: int
) -> None:
    logits, targets = outputs(seed, ignore=ignore_label)
    ours = composite(batch_dice=batch_dice, ignore_label=ignore_label)(logits, targets)
    ours.backward()
    our_grads = [x.grad.clone() for x in logits if x.grad is not None]
    for x in logits:
        x.grad = None
    theirs = nnunet_default(batch_dice=batch_dice, ignore_label=ignore_label)(logits, targets)
    theirs.backward()
    their_grads = [x.grad for x in logits if x.grad is not None]
    # Same operations in the same order: equal to float precision (in practice, bit for bit).
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert len(our_grads) == len(their_grads) == 4  # the lowest scale has weight 0
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_one_evaluation_gives_the_optimizers_and_the_reference_loss() -> None:
    logits, targets = outputs(4)
    loss = composite({"dice": 0.5, "focal": 0.3, "variance": 0.2})
    optimizer_loss, reference_loss = loss.pair(logits, targets)

    dice = DeepSupervisionWrapper(
        MemoryEfficientSoftDiceLoss(
            apply_nonlin=lambda x: torch.softmax(x, 1),
            batch_dice=True,
            do_bg=False,
            smooth=1e-5,
            ddp=False,
        ),
        DS_WEIGHTS,
    )(logits, targets)
    focal = sum(w * focal_loss(x, t) for w, x, t in zip(DS_WEIGHTS, logits, targets, strict=True))
    variance = sum(
        w * region_variance_loss(x, t) for w, x, t in zip(DS_WEIGHTS, logits, targets, strict=True)
    )
    expected = 0.5 * dice + 0.3 * focal + 0.2 * variance
    torch.testing.assert_close(optimizer_loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference_loss, nnunet_default()(logits, targets))
    # Called as nnU-Net calls it: the optimizer's loss, or during validation the reference one.
    assert loss(logits, targets) == optimizer_loss
    loss.use_reference = True
    assert loss(logits, targets) == reference_loss


def test_focal_is_the_softmax_focal_loss_with_gamma_2() -> None:
    logits = torch.tensor([[[[2.0]], [[0.5]], [[-1.0]]], [[[0.0]], [[3.0]], [[0.0]]]])  # (2,3,1,1)
    target = torch.tensor([[[[0.0]]], [[[2.0]]]])
    p = torch.softmax(logits, 1)[:, :, 0, 0]
    pt = torch.stack([p[0, 0], p[1, 2]])
    expected = (-((1 - pt) ** 2) * torch.log(pt)).mean()
    torch.testing.assert_close(focal_loss(logits, target), expected)
    # gamma 0 is plain cross-entropy; gamma 2 discounts the easy voxels.
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), ce)
    assert focal_loss(logits, target) < ce


def test_variance_is_the_spread_of_each_class_probability_inside_its_region() -> None:
    # Two classes; the foreground region holds 3 voxels with p(fg) = 0.2, 0.5, 0.9.
    p_fg = torch.tensor([0.2, 0.5, 0.9, 0.3])
    logits = torch.log(torch.stack([1 - p_fg, p_fg])).view(1, 2, 1, 4)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 4)
    expected = float(np.var([0.2, 0.5, 0.9]))
    assert region_variance_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # Mean over the foreground classes present; an absent class is left out.
    three = torch.cat([logits, torch.full((1, 1, 1, 4), -30.0)], 1)
    assert region_variance_loss(three, target).item() == pytest.approx(expected, rel=1e-4)
    # No foreground anywhere: 0, and still differentiable.
    empty = torch.zeros(1, 1, 1, 4)
    x = logits.clone().requires_grad_()
    value = region_variance_loss(x, empty)
    value.backward()
    assert value.item() == 0.0 and x.grad is not None
    # An ignored voxel does not count.
    mask = torch.tensor([True, True, False, True]).view(1, 1, 1, 4)
    assert region_variance_loss(logits, target, mask).item() == pytest.approx(
        float(np.var([0.2, 0.5])), rel=1e-5
    )


def test_new_weights_apply_at_every_scale_and_bad_ones_change_nothing() -> None:
    logits, targets = outputs(5)
    loss = composite()
    before = loss(logits, targets)
    loss.set_weights({"dice": 0.6, "focal": 0.4})
    assert loss.weights == {"dice": 0.6, "focal": 0.4}
    assert isinstance(loss.scales, DeepSupervisionWrapper) and loss.scales.loss is loss.terms
    assert not math.isclose(loss(logits, targets).item(), before.item())
    for bad, message in [
        ({"dice": 0.5, "tversky": 0.5}, "unknown loss component"),
        ({"dice": -1.0}, "dice: must be a finite number >= 0"),
        ({"dice": 0.0, "ce": 0.0}, "must not all be 0"),
        ({"dice": float("nan")}, "dice: must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            loss.set_weights(bad)
        assert loss.weights == {"dice": 0.6, "focal": 0.4}
    assert check_loss_weights({"variance": 1}) == {"variance": 1.0}
