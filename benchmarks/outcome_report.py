"""The outcome benchmark's results: each run's curve and Dice, the table, the plot, the last line.

`RunResult` is one training as the benchmark saw it: the final Dice from
nnU-Net's ``validation/summary.json`` (the same file for every arm, stock
included), the per-epoch pseudo Dice and LR (from the server's GetRun for
runs under control, from nnU-Net's log for the stock trainer) and the epochs
where the server intervened or rolled back.

The comparisons use the functions the server's experiment report uses
(`control_server.experiment_stats`), so the stock row, which the server never
sees, is computed exactly as the experiment's arms are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from control_server.experiment_stats import (
    Comparison,
    compare_paired,
    distribution,
    min_detectable_difference,
)

__all__ = [
    "ArmRow",
    "Point",
    "RunResult",
    "arm_rows",
    "detectable_differences",
    "ema",
    "format_table",
    "outcome_line",
    "parse_nnunet_log",
    "plot_outcome",
    "read_final_dice",
]

#: nnU-Net's EMA of the pseudo Dice: ema = 0.9 ema + 0.1 new.
EMA_KEEP = 0.9


@dataclass(frozen=True)
class Point:
    """One epoch of a run: its raw mean pseudo Dice (None when nnU-Net had none) and LR."""

    epoch: int
    pseudo_dice: float | None
    lr: float


@dataclass
class RunResult:
    """One training of the benchmark."""

    arm: str
    seed: int
    run_id: str
    wall_s: float
    exit_code: int
    #: Mean foreground Dice of nnU-Net's final validation (None: the run failed).
    final_dice: float | None = None
    curve: list[Point] = field(default_factory=list)
    interventions: list[int] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    #: The epoch of the best EMA pseudo Dice.
    best_epoch: int | None = None


@dataclass(frozen=True)
class ArmRow:
    """One line of the table."""

    arm: str
    runs: int
    dice_mean: float | None
    dice_sd: float | None
    vs_stock: Comparison | None
    vs_observe: Comparison | None
    interventions: int
    rollbacks: int
    #: Of the runs with an intervention: those rolled back, and the epochs it took.
    rollback_lags: tuple[int, ...]
    epochs_to_best: float | None
    wall_s: float


# --- reading what nnU-Net wrote -------------------------------------------------------------

_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_LR = re.compile(r"Current learning rate: ([0-9.eE+-]+)")
_DICE = re.compile(r"Pseudo dice \[(.*)\]")
_BEST = re.compile(r"New best EMA pseudo Dice")
_NUMBER = re.compile(r"(nan|[0-9.eE+-]+)\)?(?:,|$)")


def parse_nnunet_log(text: str) -> tuple[list[Point], int | None]:
    """Per-epoch (pseudo Dice, LR) from nnU-Net's console log, and the best EMA's epoch."""
    points: list[Point] = []
    epoch: int | None = None
    lr = math.nan
    best: int | None = None
    for line in text.splitlines():
        if match := _EPOCH.search(line):
            epoch = int(match.group(1))
        elif match := _LR.search(line):
            lr = float(match.group(1))
        elif (match := _DICE.search(line)) and epoch is not None:
            values = [float(v) for v in _NUMBER.findall(match.group(1).replace(" ", ""))]
            finite = [v for v in values if math.isfinite(v)]
            dice = sum(finite) / len(finite) if finite else None
            points.append(Point(epoch, dice, lr))
        elif _BEST.search(line) and epoch is not None:
            best = epoch
    return points, best


def read_final_dice(fold_folder: Path) -> float | None:
    """The final validation's mean foreground Dice (None when there is none)."""
    summary = fold_folder / "validation" / "summary.json"
    if not summary.is_file():
        return None
    value = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    return float(value) if math.isfinite(value) else None


def ema(values: Sequence[float | None]) -> list[float]:
    """nnU-Net's EMA of a series (a missing value keeps the previous one)."""
    result: list[float] = []
    current: float | None = None
    for value in values:
        if value is not None and math.isfinite(value):
            current = value if current is None else EMA_KEEP * current + (1 - EMA_KEEP) * value
        result.append(math.nan if current is None else current)
    return result


# --- the table ------------------------------------------------------------------------------


def _by_seed(runs: Sequence[RunResult]) -> dict[str, float]:
    return {str(r.seed): r.final_dice for r in runs if r.final_dice is not None}


def _lags(runs: Sequence[RunResult]) -> tuple[int, ...]:
    """For each run that was rolled back: epochs from its first intervention to the rollback."""
    lags = []
    for run in runs:
        if run.interventions and run.rollbacks:
            lags.append(run.rollbacks[0] - run.interventions[0])
    return tuple(lags)


def arm_rows(
    results: Sequence[RunResult],
    arm_order: Sequence[str],
    server_comparisons: Mapping[str, Comparison] | None = None,
    confidence: float = 0.95,
) -> list[ArmRow]:
    """One row per arm; vs_stock paired by seed with the server's own statistics.

    `server_comparisons` are the experiment report's (each arm against ``observe``);
    the stock arm, outside the experiment, gets the same comparison computed here.
    """
    by_arm = {arm: [r for r in results if r.arm == arm] for arm in arm_order}
    stock = _by_seed(by_arm.get("stock", []))
    observe = _by_seed(by_arm.get("observe", []))
    rows = []
    for arm in arm_order:
        runs = by_arm[arm]
        dice = distribution([r.final_dice for r in runs if r.final_dice is not None])
        vs_stock = (
            compare_paired(_by_seed(runs), stock, confidence) if stock and arm != "stock" else None
        )
        if arm == "stock":
            vs_observe = compare_paired(stock, observe, confidence) if observe else None
        else:
            vs_observe = (server_comparisons or {}).get(arm)
        bests = [r.best_epoch for r in runs if r.best_epoch is not None]
        rows.append(
            ArmRow(
                arm=arm,
                runs=dice.n,
                dice_mean=dice.mean,
                dice_sd=dice.sd,
                vs_stock=vs_stock,
                vs_observe=vs_observe,
                interventions=sum(len(r.interventions) for r in runs),
                rollbacks=sum(len(r.rollbacks) for r in runs),
                rollback_lags=_lags(runs),
                epochs_to_best=sum(bests) / len(bests) if bests else None,
                wall_s=sum(r.wall_s for r in runs),
            )
        )
    return rows


def _num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _comparison(c: Comparison | None) -> tuple[str, str]:
    if c is None or c.difference is None:
        return "-", "-"
    interval = (
        f" [{_num(c.ci_low, signed=True)}, {_num(c.ci_high, signed=True)}]"
        if c.ci_low is not None
        else ""
    )
    return f"{_num(c.difference, signed=True)}{interval}", _num(c.win_rate, 2)


HEADER = (
    "arm",
    "runs",
    "final Dice mean ± sd",
    "Δ vs stock [95% CI]",
    "win",
    "Δ vs observe [95% CI]",
    "win",
    "interv.",
    "rollbacks",
    "epochs to best",
    "wall time",
)


def table_cells(row: ArmRow) -> tuple[str, ...]:
    stock, stock_win = _comparison(row.vs_stock)
    observe, observe_win = _comparison(row.vs_observe)
    rollbacks = str(row.rollbacks)
    if row.rollback_lags:
        rollbacks += f" (after {'/'.join(str(lag) for lag in row.rollback_lags)} ep.)"
    return (
        row.arm,
        str(row.runs),
        f"{_num(row.dice_mean)} ± {_num(row.dice_sd)}",
        stock,
        stock_win,
        observe,
        observe_win,
        str(row.interventions),
        rollbacks,
        _num(row.epochs_to_best, 1),
        f"{row.wall_s / 60:.1f} min",
    )


def format_table(rows: Sequence[ArmRow]) -> str:
    """The rows as a Markdown table (it reads as plain text too)."""
    cells = [HEADER, *(table_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def detectable_differences(
    results: Sequence[RunResult], seeds: int, noise_arms: Sequence[str]
) -> dict[str, float | None]:
    """The smallest true difference in final Dice this many seeds detect at 80% power
    (two-sided 5%, t approximation; `min_detectable_difference`), two ways:

    - ``paired``: from the sd of the paired differences arm - stock, variances pooled
      over `noise_arms` (arms that change the training by an effect we want to
      detect). With every arm seeded alike, an arm that never intervenes matches
      stock to the last digit, so the noise a paired comparison faces is how far
      two trajectories drift apart once one is perturbed: these arms measure it.
    - ``unpaired``: from the sd of the final Dice across seeds within an arm,
      pooled over every arm (the fold-to-fold spread; a conservative bound).
    """
    stock = _by_seed([r for r in results if r.arm == "stock"])
    arms_ = sorted({r.arm for r in results})
    paired_vars, unpaired_vars = [], []
    for arm in arms_:
        values = _by_seed([r for r in results if r.arm == arm])
        spread = distribution(list(values.values())).sd
        if spread is not None:
            unpaired_vars.append(spread**2)
        if arm in noise_arms:
            diffs = [values[k] - stock[k] for k in sorted(values.keys() & stock.keys())]
            drift = distribution(diffs).sd
            if drift is not None:
                paired_vars.append(drift**2)
    out: dict[str, float | None] = {"paired": None, "unpaired": None}
    if seeds >= 2 and paired_vars:
        sd = math.sqrt(sum(paired_vars) / len(paired_vars))
        out["paired"] = min_detectable_difference(sd, seeds, paired=True)
    if seeds >= 2 and unpaired_vars:
        sd = math.sqrt(sum(unpaired_vars) / len(unpaired_vars))
        out["unpaired"] = min_detectable_difference(sd, seeds, paired=False)
    return out


# --- the machine-readable line --------------------------------------------------------------


def outcome_line(rows: Sequence[ArmRow], summary: Mapping[str, Any]) -> str:
    """``outcome: {json}``: per arm the table's numbers, then `summary`'s."""
    arms = {}
    for row in rows:
        data = asdict(row)
        for key in ("vs_stock", "vs_observe"):
            comparison = getattr(row, key)
            data[key] = asdict(comparison) if comparison is not None else None
        data["rollback_lags"] = list(row.rollback_lags)
        arms[row.arm] = data
    return "outcome: " + json.dumps({**summary, "arms": arms}, sort_keys=True, allow_nan=False)


# --- the plot -------------------------------------------------------------------------------


def plot_outcome(
    results: Sequence[RunResult], arm_order: Sequence[str], path: Path, title: str
) -> Path:
    """Per arm: the EMA pseudo Dice and LR per epoch (each seed faint, the mean bold;
    ▲ an intervention, ✕ a rollback) and the final Dice of each seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    figure, (dice_ax, lr_ax, final_ax) = plt.subplots(
        1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [3, 3, 2]}
    )
    for index, arm in enumerate(arm_order):
        colour = colours(index % 10)
        runs = [r for r in results if r.arm == arm and r.curve]
        curves = []
        for run in runs:
            epochs = [p.epoch for p in run.curve]
            smooth = ema([p.pseudo_dice for p in run.curve])
            curves.append(dict(zip(epochs, smooth, strict=True)))
            dice_ax.plot(epochs, smooth, color=colour, alpha=0.25, linewidth=0.8)
            lr_ax.plot(epochs, [p.lr for p in run.curve], color=colour, alpha=0.5, linewidth=0.9)
            at = dict(zip(epochs, smooth, strict=True))
            for marks, marker in ((run.interventions, "^"), (run.rollbacks, "x")):
                shown = [e for e in marks if e in at]
                dice_ax.scatter(
                    shown, [at[e] for e in shown], marker=marker, color=colour, s=40, zorder=3
                )
        if curves:
            common = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [sum(c[e] for c in curves) / len(curves) for e in common]
            dice_ax.plot(common, mean, color=colour, linewidth=2.2, label=arm)
        finals = [r.final_dice for r in results if r.arm == arm and r.final_dice is not None]
        final_ax.scatter([index] * len(finals), finals, color=colour, alpha=0.7)
        if finals:
            final_ax.hlines(
                sum(finals) / len(finals), index - 0.3, index + 0.3, color=colour, linewidth=2.5
            )
    dice_ax.set(xlabel="epoch", ylabel="EMA pseudo Dice (mean over classes)")
    dice_ax.set_title("Pseudo Dice per epoch (triangle: intervention, x: rollback)")
    dice_ax.legend(fontsize=8, loc="lower right")
    dice_ax.grid(alpha=0.3)
    lr_ax.set(xlabel="epoch", ylabel="learning rate", yscale="log")
    lr_ax.set_title("LR per epoch")
    lr_ax.grid(alpha=0.3)
    final_ax.set_xticks(range(len(arm_order)), arm_order, rotation=30, ha="right")
    final_ax.set(ylabel="final validation Dice (foreground mean)")
    final_ax.set_title("Final Dice per seed (bar: mean)")
    final_ax.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
