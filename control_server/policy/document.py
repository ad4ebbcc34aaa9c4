"""The policy document: a validated, versioned, immutable description of the policy.

YAML on disk and the same schema over gRPC. Every number of the decision policy
is a field here. Parsing is strict: an unknown key, a wrong type, an
out-of-range number or an unknown loss component raises `PolicyError` naming
the field (dotted path, e.g. ``plateau.patience``).

A document from outside (a ``--policy`` file, PutPolicy's YAML or structure)
goes through `parse_policy_source`, which bounds its size and nesting before
anything is built from it and refuses YAML aliases.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from control_server.domain import InvalidArgument
from trainer_client.vocabulary import LossWeightError, check_loss_weights


class PolicyError(InvalidArgument):
    """A policy document is invalid; `field` is the dotted path of the culprit."""


WeightMix = Mapping[str, float]


#: What `plateau.monitor` may name. The Dice monitors read a report's pseudo Dice
#: (mode max); `ema_pseudo_dice` smooths it as nnU-Net does for its best checkpoint.
MONITORS = ("val_loss", "train_loss", "pseudo_dice", "ema_pseudo_dice")
DICE_MONITORS = frozenset({"pseudo_dice", "ema_pseudo_dice"})


@dataclass(frozen=True)
class PlateauConfig:
    """Plateau detection, with the meaning of PyTorch's ReduceLROnPlateau."""

    monitor: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    cooldown: int = 2
    min_delta: float = 0.01
    threshold_mode: str = "rel"
    warmup_epochs: int = 5
    ema_alpha: float | None = None


@dataclass(frozen=True)
class InterventionConfig:
    """How an intervention scales the LR and changes the loss weights."""

    max_interventions: int = 3
    # g < e0 -> s0; e0 <= g < e1 -> s1; e1 <= g <= e2 -> s2; g > e2 -> s3.
    grad_norm_edges: tuple[float, float, float] = (0.01, 0.1, 0.5)
    lr_scales: tuple[float, float, float, float] = (15.0, 10.0, 5.0, 3.0)
    missing_grad_norm: float = 0.1
    # Multiplier of intervention k is damping[k-1] (the last one repeats).
    damping: tuple[float, ...] = (1.0, 0.7, 0.5)
    # Absolute LR cap; None caps at the run's initial_lr.
    max_lr: float | None = None
    # Intervention 2's weights: one mix drawn by a generator seeded from
    # (run_id, epoch, k, policy version).
    random_mixes: tuple[WeightMix, ...] = (
        {"dice": 0.6, "focal": 0.4},
        {"dice": 0.5, "focal": 0.5},
        {"dice": 0.4, "focal": 0.6},
        {"dice": 0.7, "focal": 0.3},
        {"dice": 0.5, "focal": 0.3, "variance": 0.2},
    )
    # The final intervention's conservative weights.
    final_mix: WeightMix = field(default_factory=lambda: {"dice": 0.6, "focal": 0.4})
    # STOP once the budget is spent and another plateau is detected.
    stop_when_exhausted: bool = False


@dataclass(frozen=True)
class GuardConfig:
    """The divergence guard and the non-finite-loss rule."""

    guard_epochs: int = 2
    # Roll back when the monitored value is worse than at the intervention by
    # more than this fraction of its magnitude.
    rollback_tolerance: float = 0.5
    # A non-finite loss with no intervention to undo: "stop" or "none".
    on_nonfinite: str = "stop"


@dataclass(frozen=True)
class PolicyDoc:
    """A whole policy document."""

    name: str = "default"
    description: str = ""
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    interventions: InterventionConfig = field(default_factory=InterventionConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_mapping(self) -> dict[str, Any]:
        """The canonical plain-data form (what is stored and hashed)."""
        data = asdict(self)
        interventions = data["interventions"]
        for key in ("grad_norm_edges", "lr_scales", "damping"):
            interventions[key] = list(interventions[key])
        interventions["random_mixes"] = [
            dict(sorted(m.items())) for m in self.interventions.random_mixes
        ]
        interventions["final_mix"] = dict(sorted(self.interventions.final_mix.items()))
        return data

    @property
    def version(self) -> str:
        """Content-derived id: equal documents get the same id on every replica."""
        canonical = json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


_SECTIONS: dict[str, type] = {
    "plateau": PlateauConfig,
    "interventions": InterventionConfig,
    "guard": GuardConfig,
}


def integer_fields() -> frozenset[str]:
    """Dotted paths of the fields that must be integers (e.g. ``plateau.patience``).

    Formats without integers (protobuf's Struct carries every number as a double)
    convert integral numbers at these paths before `parse_policy`.
    """
    return frozenset(
        f"{section}.{f.name}"
        for section, cls in _SECTIONS.items()
        for f in fields(cls)
        if f.type in ("int", int)
    )


def parse_policy(data: Any) -> PolicyDoc:
    """Validate plain data (parsed YAML/JSON) into a PolicyDoc; raise PolicyError."""
    if data is None:
        data = {}
    _require_mapping(data, "policy")
    unknown = set(data) - {"name", "description", *_SECTIONS}
    if unknown:
        name = sorted(str(k) for k in unknown)[0]
        raise PolicyError(
            name, f"unknown key; expected one of name, description, {', '.join(_SECTIONS)}"
        )
    name = data.get("name", "default")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError("name", f"must be a non-empty string, but got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PolicyError("description", f"must be a string, but got {description!r}")
    plateau = _plateau(data.get("plateau") or {})
    interventions = _interventions(data.get("interventions") or {})
    guard = _guard(data.get("guard") or {})
    return PolicyDoc(name, description, plateau, interventions, guard)


def parse_policy_source(source: Mapping[str, Any] | str) -> PolicyDoc:
    """Validate a document from outside: YAML/JSON text or plain data (a Struct's).

    Both forms obey the same limits, checked before anything is built from the
    document: at most `MAX_POLICY_BYTES` (the text, or the data as JSON), at
    most `MAX_POLICY_DEPTH` nested collections, no YAML aliases.
    """
    if isinstance(source, str):
        return parse_policy_yaml(source)
    _check_depth(source)
    _check_size(len(json.dumps(source, default=str).encode()))
    return parse_policy(source)


def parse_policy_yaml(text: str) -> PolicyDoc:
    """Validate YAML (or JSON) text, within the limits of `parse_policy_source`."""
    _check_size(len(text.encode()))
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise PolicyError("policy", f"not valid YAML: {exc}") from exc
    return parse_policy(data)


# --- limits -----------------------------------------------------------------

#: The largest policy document accepted, in bytes (the shipped one is about 1 KB).
MAX_POLICY_BYTES = 64 * 1024
#: The deepest nesting of mappings and lists accepted (the schema needs 4:
#: ``interventions.random_mixes[i].dice``).
MAX_POLICY_DEPTH = 8


def _check_size(size: int) -> None:
    if size > MAX_POLICY_BYTES:
        raise PolicyError(
            "policy", f"must be at most {MAX_POLICY_BYTES} bytes, but got {size} bytes"
        )


def _too_deep() -> PolicyError:
    return PolicyError(
        "policy",
        f"must nest mappings and lists at most {MAX_POLICY_DEPTH} levels deep, "
        "but got deeper nesting",
    )


def _check_depth(data: Any) -> None:
    """Refuse data nested deeper than MAX_POLICY_DEPTH (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth >= MAX_POLICY_DEPTH:
            raise _too_deep()
        pending.extend((child, depth + 1) for child in children)


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's safe loader, stopping at MAX_POLICY_DEPTH and refusing aliases.

    The depth is checked twice: in the composer, for every collection, and in
    the scanner, for flow collections (``[[[[``), whose look-ahead costs time
    quadratic in their depth before the composer sees anything. Aliases can
    expand a small text into a huge document; policies do not need them.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_POLICY_DEPTH:
            raise _too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise PolicyError("policy", "YAML aliases (*name) are not supported")
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_POLICY_DEPTH:
                raise _too_deep()
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1


# --- field validation -------------------------------------------------------


def _require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise PolicyError(where, f"must be a mapping, but got {type(value).__name__}")


def _check_keys(data: Mapping[str, Any], cls: type, section: str) -> None:
    _require_mapping(data, section)
    allowed = {f.name for f in fields(cls)}
    for key in data:
        if key not in allowed:
            raise PolicyError(
                f"{section}.{key}", f"unknown key; expected one of {', '.join(sorted(allowed))}"
            )


def _number(
    data: Mapping[str, Any],
    key: str,
    section: str,
    default: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    value = data.get(key, default)
    where = f"{section}.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(where, f"must be a finite number, but got {value!r}")
    _range(float(value), where, lo, hi, lo_open)
    return float(value)


def _integer(
    data: Mapping[str, Any],
    key: str,
    section: str,
    default: int,
    *,
    lo: int = 0,
    hi: int | None = None,
) -> int:
    value = data.get(key, default)
    where = f"{section}.{key}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(where, f"must be an integer, but got {value!r}")
    _range(value, where, lo, hi, False)
    return value


def _range(value: float, where: str, lo: float | None, hi: float | None, lo_open: bool) -> None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise PolicyError(where, f"must be {'>' if lo_open else '>='} {lo}, but got {value}")
    if hi is not None and value > hi:
        raise PolicyError(where, f"must be <= {hi}, but got {value}")


def _choice(
    data: Mapping[str, Any], key: str, section: str, default: str, options: tuple[str, ...]
) -> str:
    value = data.get(key, default)
    if value not in options:
        raise PolicyError(
            f"{section}.{key}", f"must be one of {', '.join(options)}, but got {value!r}"
        )
    return str(value)


def _plateau(data: Mapping[str, Any]) -> PlateauConfig:
    s, d = "plateau", PlateauConfig()
    _check_keys(data, PlateauConfig, s)
    ema = data.get("ema_alpha")
    ema_alpha = (
        None if ema is None else _number(data, "ema_alpha", s, 0.0, lo=0.0, hi=1.0, lo_open=True)
    )
    monitor = _choice(data, "monitor", s, d.monitor, MONITORS)
    mode = _choice(data, "mode", s, d.mode, ("min", "max"))
    _check_dice_monitor(monitor, mode, ema_alpha)
    return PlateauConfig(
        monitor=monitor,
        mode=mode,
        patience=_integer(data, "patience", s, d.patience, hi=10_000),
        cooldown=_integer(data, "cooldown", s, d.cooldown, hi=10_000),
        min_delta=_number(data, "min_delta", s, d.min_delta, lo=0.0),
        threshold_mode=_choice(data, "threshold_mode", s, d.threshold_mode, ("rel", "abs")),
        warmup_epochs=_integer(data, "warmup_epochs", s, d.warmup_epochs, hi=1_000_000),
        ema_alpha=ema_alpha,
    )


def _check_dice_monitor(monitor: str, mode: str, ema_alpha: float | None) -> None:
    """A Dice is better when higher, and nnU-Net's EMA of it is smoothed already."""
    if monitor not in DICE_MONITORS:
        return
    if mode != "max":
        raise PolicyError(
            "plateau.mode",
            f"must be max when plateau.monitor is {monitor} (higher Dice is better), "
            f"but got {mode!r}",
        )
    if monitor == "ema_pseudo_dice" and ema_alpha is not None:
        raise PolicyError(
            "plateau.ema_alpha",
            "must be null when plateau.monitor is ema_pseudo_dice (it already is nnU-Net's "
            f"EMA of the pseudo Dice, with alpha 0.1), but got {ema_alpha!r}",
        )


def _weight_mix(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise PolicyError(
            where, f"must be a non-empty mapping of loss component to weight, but got {value!r}"
        )
    try:
        mix = check_loss_weights(value)
    except LossWeightError as exc:
        if exc.component is None:
            raise PolicyError(where, f"weights {exc.problem}") from None
        raise PolicyError(f"{where}.{exc.component}", exc.problem) from None
    return dict(sorted(mix.items()))


def _float_list(
    data: Mapping[str, Any],
    key: str,
    section: str,
    default: tuple[float, ...],
    length: int | None,
    lo: float,
    lo_open: bool,
) -> tuple[float, ...]:
    value = data.get(key, list(default))
    where = f"{section}.{key}"
    if (
        not isinstance(value, list | tuple)
        or (length is not None and len(value) != length)
        or not value
    ):
        want = f"a list of {length} numbers" if length else "a non-empty list of numbers"
        raise PolicyError(where, f"must be {want}, but got {value!r}")
    return tuple(_number({key: v}, key, section, 0.0, lo=lo, lo_open=lo_open) for v in value)


def _interventions(data: Mapping[str, Any]) -> InterventionConfig:
    s, d = "interventions", InterventionConfig()
    _check_keys(data, InterventionConfig, s)
    edges = _float_list(data, "grad_norm_edges", s, d.grad_norm_edges, 3, 0.0, False)
    if not edges[0] < edges[1] < edges[2]:
        raise PolicyError(
            f"{s}.grad_norm_edges", f"must be strictly increasing, but got {list(edges)}"
        )
    scales = _float_list(data, "lr_scales", s, d.lr_scales, 4, 0.0, True)
    damping = _float_list(data, "damping", s, d.damping, None, 0.0, True)
    max_lr = data.get("max_lr")
    if max_lr is not None:
        max_lr = _number(data, "max_lr", s, 0.0, lo=0.0, lo_open=True)
    raw_mixes = data.get("random_mixes", list(d.random_mixes))
    if not isinstance(raw_mixes, list) or not raw_mixes:
        raise PolicyError(
            f"{s}.random_mixes", f"must be a non-empty list of weight maps, but got {raw_mixes!r}"
        )
    mixes = tuple(_weight_mix(m, f"{s}.random_mixes[{i}]") for i, m in enumerate(raw_mixes))
    stop = data.get("stop_when_exhausted", d.stop_when_exhausted)
    if not isinstance(stop, bool):
        raise PolicyError(f"{s}.stop_when_exhausted", f"must be true or false, but got {stop!r}")
    return InterventionConfig(
        max_interventions=_integer(data, "max_interventions", s, d.max_interventions, hi=1000),
        grad_norm_edges=(edges[0], edges[1], edges[2]),
        lr_scales=(scales[0], scales[1], scales[2], scales[3]),
        missing_grad_norm=_number(data, "missing_grad_norm", s, d.missing_grad_norm, lo=0.0),
        damping=damping,
        max_lr=max_lr,
        random_mixes=mixes,
        final_mix=_weight_mix(data.get("final_mix", d.final_mix), f"{s}.final_mix"),
        stop_when_exhausted=stop,
    )


def _guard(data: Mapping[str, Any]) -> GuardConfig:
    s, d = "guard", GuardConfig()
    _check_keys(data, GuardConfig, s)
    return GuardConfig(
        guard_epochs=_integer(data, "guard_epochs", s, d.guard_epochs, hi=10_000),
        rollback_tolerance=_number(data, "rollback_tolerance", s, d.rollback_tolerance, lo=0.0),
        on_nonfinite=_choice(data, "on_nonfinite", s, d.on_nonfinite, ("stop", "none")),
    )
