"""A run's timeline as the server recorded it: rows, a text table and a PNG plot.

`timeline_rows` turns a ``GetRun`` answer into one `TimelineRow` per epoch;
`format_timeline` prints them as a table; `plot_timeline` draws the monitored
loss per epoch with interventions, rollbacks and stops marked, and the LR on a
second axis (`plot_run` does both steps). Needs matplotlib (nnunetv2 depends on
it), not torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer_client.api import control_pb2

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["TimelineRow", "format_timeline", "plot_run", "plot_timeline", "timeline_rows"]


@dataclass(frozen=True)
class TimelineRow:
    """One epoch: what the trainer reported and what the server decided."""

    epoch: int
    train_loss: float
    val_loss: float | None
    grad_norm: float | None
    #: The LR and loss weights the epoch trained with.
    lr: float
    weights: Mapping[str, float]
    #: "NONE", "INTERVENE", "ROLLBACK", "STOP" ("-" when no decision was recorded).
    action: str
    #: What the decision set for the next epoch (None / empty: unchanged).
    decided_lr: float | None = None
    decided_weights: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    reason: str = ""
    intervention_index: int = 0

    @property
    def monitored(self) -> float:
        """The loss the policy watches: val_loss, else train_loss."""
        return self.val_loss if self.val_loss is not None else self.train_loss


def timeline_rows(run: control_pb2.GetRunResponse) -> list[TimelineRow]:
    """One row per recorded epoch, in epoch order."""
    rows = []
    for entry in run.epochs:
        report, decision = entry.report, entry.decision
        has_decision = entry.HasField("decision")
        rows.append(
            TimelineRow(
                epoch=report.epoch,
                train_loss=report.train_loss,
                val_loss=report.val_loss if report.HasField("val_loss") else None,
                grad_norm=(
                    report.avg_gradient_norm if report.HasField("avg_gradient_norm") else None
                ),
                lr=report.current_lr,
                weights=dict(report.loss_weights),
                action=control_pb2.Action.Name(decision.action) if has_decision else "-",
                decided_lr=decision.lr if has_decision and decision.HasField("lr") else None,
                decided_weights=dict(decision.loss_weights) if has_decision else {},
                source=control_pb2.Source.Name(decision.source) if has_decision else "",
                reason=decision.reason if has_decision else "",
                intervention_index=decision.intervention_index if has_decision else 0,
            )
        )
    return sorted(rows, key=lambda row: row.epoch)


def _weights(weights: Mapping[str, float]) -> str:
    return " ".join(f"{k}={weights[k]:g}" for k in sorted(weights) if weights[k]) or "-"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_timeline(rows: Sequence[TimelineRow]) -> str:
    """A table: epoch, losses, gradient norm, LR and weights used, action, what it set, why."""
    header = (
        f"{'epoch':>5}  {'train':>8}  {'val':>8}  {'grad':>7}  {'lr':>8}  {'weights':<22}  "
        f"{'action':<9}  {'-> lr':>8}  {'-> weights':<22}  reason"
    )
    lines = [header]
    for row in rows:
        changed = row.action in ("INTERVENE", "ROLLBACK")
        lines.append(
            f"{row.epoch:>5}  {row.train_loss:>8.4f}  {_number(row.val_loss, '8.4f'):>8}  "
            f"{_number(row.grad_norm, '7.4f'):>7}  {row.lr:>8.5f}  {_weights(row.weights):<22}  "
            f"{row.action:<9}  "
            f"{_number(row.decided_lr if changed else None, '8.5f'):>8}  "
            f"{(_weights(row.decided_weights) if changed else '-'):<22}  "
            f"{row.reason if row.action != 'NONE' else ''}"
        )
    return "\n".join(lines)


def _zoom(ax: Axes, rows: Sequence[TimelineRow]) -> None:
    """Fit the loss axis to the curves after the first epoch, whose loss is usually far off
    and would flatten the plateaus that matter; say so when it is left out."""
    if len(rows) < 5:
        return
    values = [v for row in rows[1:] for v in (row.monitored, row.train_loss) if math.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    pad = 0.12 * (hi - lo) or 0.05 * abs(hi) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    first = rows[0]
    if math.isfinite(first.monitored) and not lo - pad <= first.monitored <= hi + pad:
        ax.annotate(
            f"epoch {first.epoch}: {first.monitored:.3g} (off scale)",
            (0.01, 0.98),
            xycoords="axes fraction",
            va="top",
            fontsize=8,
            color="#1f4e9c",
        )


def plot_timeline(rows: Sequence[TimelineRow], path: str | Path, *, title: str = "") -> Path:
    """Write the PNG: monitored loss with decisions marked, LR on the right axis."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    figure = Figure(figsize=(11, 5.5), dpi=110, layout="constrained")
    ax = figure.add_subplot()
    epochs = [row.epoch for row in rows]
    monitored = [row.monitored for row in rows]
    name = "val_loss" if any(row.val_loss is not None for row in rows) else "train_loss"
    ax.plot(epochs, [row.train_loss for row in rows], color="#9ab", lw=1.2, label="train_loss")
    ax.plot(
        epochs, monitored, color="#1f4e9c", lw=2, marker="o", ms=3.5, label=f"{name} (monitored)"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (reference weights)")
    ax.grid(alpha=0.3)
    _zoom(ax, rows)

    styles = {
        "INTERVENE": ("#2a9d3f", "^", "intervention"),
        "ROLLBACK": ("#d62828", "X", "rollback"),
        "STOP": ("black", "s", "stop"),
    }
    for row in rows:
        style = styles.get(row.action)
        if style is None or not math.isfinite(row.monitored):
            continue
        color, marker, _ = style
        ax.axvline(row.epoch, color=color, alpha=0.25, lw=1, ls="--")
        ax.plot([row.epoch], [row.monitored], marker=marker, color=color, ms=11, ls="none")
        label = ""
        if row.action == "INTERVENE":
            label = f"#{row.intervention_index}" if row.intervention_index else "override"
            if row.decided_weights and dict(row.decided_weights) != dict(row.weights):
                label += "\n" + _weights(row.decided_weights)
        elif row.action == "ROLLBACK":
            label = "rollback"
        if label:
            ax.annotate(
                label,
                (row.epoch, row.monitored),
                xytext=(6, 10),
                textcoords="offset points",
                fontsize=8,
                color=color,
            )

    lr_axis = ax.twinx()
    lr_axis.step(epochs, [row.lr for row in rows], where="mid", color="#e07a10", lw=1.6)
    lr_axis.set_ylabel("learning rate used in the epoch (log)", color="#e07a10")
    lr_axis.tick_params(axis="y", which="both", colors="#e07a10")
    if all(row.lr > 0 for row in rows):
        # LRs span decades (PolyLR's tail, boosts): a log axis shows them all.
        lr_axis.set_yscale("log")

    handles = [
        Line2D([], [], color="#9ab", lw=1.2, label="train_loss"),
        Line2D([], [], color="#1f4e9c", lw=2, marker="o", ms=3.5, label=f"{name} (monitored)"),
        Line2D([], [], color="#e07a10", lw=1.6, label="LR (right axis)"),
    ] + [
        Line2D([], [], color=c, marker=m, ls="none", ms=9, label=text)
        for action, (c, m, text) in styles.items()
        if any(row.action == action for row in rows)
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_run(run: control_pb2.GetRunResponse, path: str | Path) -> Path:
    """`plot_timeline` of a ``GetRun`` answer, titled with the run's id and labels."""
    labels = run.run.labels
    described = ", ".join(
        v
        for v in (labels.dataset, labels.configuration, labels.fold and f"fold {labels.fold}")
        if v
    )
    title = f"{run.run.run_id}" + (f"  ({described})" if described else "")
    return plot_timeline(timeline_rows(run), path, title=title)
