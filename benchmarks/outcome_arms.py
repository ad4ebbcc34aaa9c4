"""The outcome benchmark's arms: what steers each, and the run ids that land a run in it.

An arm is either nnU-Net's own trainer (``stock``: no control, not in the
experiment) or an arm of the server's policy experiment, steered by a policy
document stored with PutPolicy (or observe-only). The server assigns each new
run an arm from (experiment, run id) alone (`control_server.experiments.
assign_arm`), so the benchmark puts a run into an arm by choosing its id.

The default policy's numbers are the shipped ``default.yaml``, read as it is:
the ``seed`` arm runs exactly what a user gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from control_server.domain import ExperimentArm
from control_server.experiments import assign_arm

__all__ = [
    "ARMS",
    "INITIAL_LR",
    "SMALL_ARMS",
    "Arm",
    "arm_policies",
    "experiment_arms",
    "run_id_for",
]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = REPO / "control_server" / "builtin_policies" / "default.yaml"
#: nnU-Net's default initial LR (SGD); the policies' LR caps are multiples of it.
INITIAL_LR = 1e-2
#: Weights that leave nnU-Net's loss as it is (Dice + cross-entropy).
NEUTRAL_MIX = {"dice": 1.0, "ce": 1.0}
#: The injected collapse: the LR multiplied by this, once.
COLLAPSE_SCALE = 30.0


@dataclass(frozen=True)
class Arm:
    """One arm of the benchmark."""

    name: str
    #: One line for the report.
    description: str
    #: nnU-Net's own trainer, outside the experiment (nothing talks to the server).
    stock: bool = False
    #: The policy document (PutPolicy) that steers it; None: observe-only (or stock).
    policy: Mapping[str, Any] | None = None
    #: TRAINCTL_MAX_LR for its runs, as a multiple of the initial LR (None: the client's
    #: default, 10x): the injected collapse sets an LR above that.
    max_lr_factor: float | None = None
    #: Extra TRAINCTL_* variables (none so far; kept for variants that need one).
    env: Mapping[str, str] = field(default_factory=dict)


def default_policy() -> dict[str, Any]:
    """The shipped default policy document, unchanged."""
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    assert isinstance(data, dict)
    return data


def _variant(name: str, description: str, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The default document with `sections` merged over it, under a new name."""
    document = default_policy()
    document["name"] = name
    document["description"] = description
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    return document


def collapse_policy(name: str, *, guard: bool, at_epoch: int) -> dict[str, Any]:
    """One LR spike of `COLLAPSE_SCALE` x at the first non-improving epoch after `at_epoch`.

    Patience 0 and one intervention: it fires once, at about a fixed epoch, with
    the loss left as it is, so the spike is the only change. With `guard`, the
    divergence guard watches the two epochs after it and rolls back a loss 20%
    worse than at the spike; without, nothing undoes it.
    """
    return _variant(
        name,
        f"Injected collapse: LR x{COLLAPSE_SCALE:g} once after epoch {at_epoch}, "
        f"guard {'on' if guard else 'off'}.",
        plateau={"patience": 0, "cooldown": 0, "warmup_epochs": at_epoch, "min_delta": 0.0},
        interventions={
            "max_interventions": 1,
            "lr_scales": [COLLAPSE_SCALE] * 4,
            "damping": [1.0],
            "max_lr": COLLAPSE_SCALE * INITIAL_LR,
            "random_mixes": [NEUTRAL_MIX],
            "final_mix": NEUTRAL_MIX,
        },
        guard={"guard_epochs": 2 if guard else 0, "rollback_tolerance": 0.2},
    )


def arms(epochs: int) -> tuple[Arm, ...]:
    """Every arm, for trainings of `epochs` epochs (the collapse comes at a third of them)."""
    at_epoch = max(1, epochs // 3)
    return (
        Arm("stock", "nnU-Net's own nnUNetTrainer, no control at all", stock=True),
        Arm("observe", "our trainer, reporting; the server never intervenes"),
        Arm("seed", "the default policy (the seed's table), as shipped", policy=default_policy()),
        Arm(
            "rop",
            "ReduceLROnPlateau-like: LR x0.5 at each plateau, up to 4 times, loss unchanged",
            policy=_variant(
                "rop",
                "ReduceLROnPlateau-like: halve the LR at a plateau, loss unchanged.",
                interventions={
                    "max_interventions": 4,
                    "lr_scales": [0.5] * 4,
                    "damping": [1.0],
                    "random_mixes": [NEUTRAL_MIX],
                    "final_mix": NEUTRAL_MIX,
                },
            ),
        ),
        Arm(
            "seed-cap3x",
            "the default policy with its LR cap at 3x the initial LR (default: 1x)",
            policy=_variant(
                "seed-cap3x",
                "The default policy, LR cap 3x the initial LR.",
                interventions={"max_lr": 3 * INITIAL_LR},
            ),
        ),
        Arm(
            "collapse-guard",
            f"LR x{COLLAPSE_SCALE:g} injected after epoch {at_epoch}, divergence guard on",
            policy=collapse_policy("collapse-guard", guard=True, at_epoch=at_epoch),
            max_lr_factor=COLLAPSE_SCALE,
        ),
        Arm(
            "collapse-noguard",
            f"LR x{COLLAPSE_SCALE:g} injected after epoch {at_epoch}, guard off",
            policy=collapse_policy("collapse-noguard", guard=False, at_epoch=at_epoch),
            max_lr_factor=COLLAPSE_SCALE,
        ),
    )


ARMS = tuple(arm.name for arm in arms(30))
#: `--small`: one arm without control, one under the default policy.
SMALL_ARMS = ("stock", "seed")


def experiment_arms(
    selected: Sequence[Arm], versions: Mapping[str, str]
) -> tuple[ExperimentArm, ...]:
    """The experiment's arms: ``observe`` (always: the baseline) and every selected
    non-stock arm, with the policy version PutPolicy gave it, equal shares."""
    result = [ExperimentArm(name="observe", policy_version="", observe_only=True, share=1.0)]
    for arm in selected:
        if arm.stock or arm.name == "observe":
            continue
        result.append(
            ExperimentArm(
                name=arm.name, policy_version=versions[arm.name], observe_only=False, share=1.0
            )
        )
    return tuple(result)


def arm_policies(selected: Sequence[Arm]) -> dict[str, Mapping[str, Any]]:
    """The policy document of each selected arm that has one."""
    return {arm.name: arm.policy for arm in selected if arm.policy is not None}


def run_id_for(
    experiment: str, arm: str, prefix: str, seed: int, arms_: Sequence[ExperimentArm]
) -> str:
    """The first ``{prefix}-{seed}-{n}`` that the server will assign to `arm`."""
    if arm not in {a.name for a in arms_}:
        raise ValueError(f"arm must be one of the experiment's, but got {arm!r}.")
    for n in range(100_000):
        run_id = f"{prefix}-{seed}-{n}"
        if assign_arm(experiment, run_id, arms_).name == arm:
            return run_id
    raise RuntimeError(f"no run id of {prefix}-{seed}-N lands in arm {arm!r}")
