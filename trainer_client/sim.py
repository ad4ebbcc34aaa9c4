"""A simulated nnU-Net training that reports to the control server: demo and load generator.

`SimulatedRun` is a pure, deterministic state machine (no I/O, no clock): call
`next_report()` for an epoch's report, hand the server's answer (or None) to
`apply()`, repeat until `done`. The same object drives a plain loop, the CLI
below, or an asyncio load generator.

The curve: the (noise-free) validation loss ``level`` approaches a ``floor``
exponentially, ``level <- floor + (level - floor) * exp(-1 / tau)``, so the
loss decays, then plateaus while the gradient norm shrinks (0.04 -> 0.005).
An INTERVENE that raises the LR lowers the floor by ``escape`` (the plateau is
escaped). In the ``collapse`` scenario intervention number ``collapse_at``
doubles the loss instead (the spec's 0.3222 -> 0.6455) and keeps it there, so
the server's divergence guard decides ROLLBACK; the run then restores the
snapshot it took before that intervention.

The CLI runs the loop as a trainer does: StartRun first (a setup mistake ends it
before the first epoch), a report per epoch, FinishRun at the end (COMPLETED,
STOPPED when a decision said STOP, FAILED with the error).

The LR follows nnU-Net's PolyLR, ``lr_e = base * (1 - e / epochs) ** 0.9``; a
decided LR rescales ``base`` so that the next epoch runs at exactly that LR
and the decay goes on from there, as the real trainer does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import os
import random
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from trainer_client.api import control_pb2
from trainer_client.client import ControlClient, RunState
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError, ControlSetupError, ControlUnavailable

__all__ = ["SCENARIOS", "SimulatedRun", "main"]

SCENARIOS: tuple[str, ...] = ("plateau", "collapse")

_POLY_EXPONENT = 0.9
# Gradient norms at the start of training and deep in a plateau.
_GRAD_START = 0.04
_GRAD_PLATEAU = 0.005
# Training loss runs a little below validation loss, as in nnU-Net's logs.
_TRAIN_RATIO = 0.92


@dataclass(frozen=True)
class _Model:
    """The simulated model and optimizer: what a snapshot saves and a rollback restores."""

    level: float
    floor: float
    base_lr: float
    loss_weights: Mapping[str, float]


class SimulatedRun:
    """A deterministic training curve that reacts to decisions; see the module doc."""

    def __init__(
        self,
        run_id: str,
        *,
        epochs: int = 40,
        scenario: str = "plateau",
        seed: int = 0,
        initial_lr: float = 0.01,
        labels: Mapping[str, str] | None = None,
        collapse_at: int = 2,
        floor: float = 0.30,
        amplitude: float = 0.60,
        tau: float = 3.0,
        escape: float = 0.12,
        noise: float = 0.002,
    ) -> None:
        """Knobs: `floor` + `amplitude` is the first loss, `tau` the decay in epochs,
        `escape` the fraction of the floor an LR raise removes, `noise` the relative
        standard deviation of the loss noise, `collapse_at` the intervention (1-based,
        counting every INTERVENE applied) that collapses in the ``collapse`` scenario.
        """
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, but got {scenario!r}.")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, but got {epochs}.")
        if not (initial_lr > 0 and math.isfinite(initial_lr)):
            raise ValueError(f"initial_lr must be a positive number, but got {initial_lr}.")
        if collapse_at < 1:
            raise ValueError(f"collapse_at must be >= 1, but got {collapse_at}.")
        if not (floor > 0 and amplitude > 0 and tau > 0):
            raise ValueError(
                f"floor, amplitude and tau must be > 0, but got {floor}, {amplitude}, {tau}."
            )
        if not (0 <= escape < 1 and noise >= 0):
            raise ValueError(
                f"escape must be in [0, 1) and noise >= 0, but got {escape} and {noise}."
            )
        self.epochs = epochs
        self.scenario = scenario
        self.collapse_at = collapse_at
        self.state = RunState(
            run_id=run_id,
            initial_lr=initial_lr,
            current_lr=initial_lr,
            labels=dict(labels or {}),
        )
        self._amplitude = amplitude
        self._decay = math.exp(-1.0 / tau)
        self._escape = escape
        self._noise = noise
        self._rng = random.Random(seed)
        self._model = _Model(
            level=floor + amplitude,
            floor=floor,
            base_lr=initial_lr,
            loss_weights=dict(self.state.loss_weights),
        )
        self._snapshot: _Model | None = None
        self._epoch = 0
        self._interventions_applied = 0
        self._pending: control_pb2.EpochReport | None = None
        self._best_dice: tuple[float, int] | None = None
        self.stopped = False

    @property
    def done(self) -> bool:
        """True once all epochs ran or a STOP was applied."""
        return self.stopped or self._epoch >= self.epochs

    @property
    def epoch(self) -> int:
        """The next epoch `next_report` will run (0-based)."""
        return self._epoch

    @property
    def level(self) -> float:
        """The noise-free validation loss of the last epoch run."""
        return self._model.level

    def final_metrics(self) -> control_pb2.FinalMetrics:
        """What a final validation would say: the last epoch's Dice (one class) and the
        best pseudo Dice with its epoch."""
        metrics = control_pb2.FinalMetrics()
        if self._best_dice is not None:
            dice = _dice(self._model.level)
            metrics.mean_dice = dice
            metrics.dice_per_class["1"] = dice
            metrics.best_ema_pseudo_dice, metrics.best_ema_epoch = self._best_dice
        return metrics

    def lr_at(self, epoch: int) -> float:
        """The PolyLR value of `epoch` under the current base LR."""
        return self._model.base_lr * _poly(epoch, self.epochs)

    def next_report(self) -> control_pb2.EpochReport:
        """Run one epoch and return its report; `apply` its decision before the next."""
        if self.done:
            raise RuntimeError("the run is over: check `done` before `next_report()`.")
        if self._pending is not None:
            self.apply(None)  # a report nobody answered: keep training unchanged
        epoch = self._epoch
        model = self._model
        level = model.floor + (model.level - model.floor) * self._decay
        self._model = replace(model, level=level)
        progress = min(1.0, max(0.0, (level - model.floor) / self._amplitude))
        grad = (_GRAD_PLATEAU + (_GRAD_START - _GRAD_PLATEAU) * progress) * (
            1 + 0.05 * self._rng.gauss(0.0, 1.0)
        )
        val_loss = level * (1 + self._noise * self._rng.gauss(0.0, 1.0))
        train_loss = _TRAIN_RATIO * level * (1 + self._noise * self._rng.gauss(0.0, 1.0))
        self.state.current_lr = self.lr_at(epoch)
        dice = _dice(level)
        if self._best_dice is None or dice > self._best_dice[0]:
            self._best_dice = (dice, epoch)
        report = self.state.build_report(
            epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            pseudo_dice=dice,
            avg_gradient_norm=max(grad, 0.0),
        )
        self._pending = report
        self._epoch += 1
        return report

    def apply(self, decision: control_pb2.Decision | None) -> None:
        """React to the decision for the last report (None: no decision, nothing changes)."""
        report, self._pending = self._pending, None
        if report is None:
            raise RuntimeError("apply() answers a report: call next_report() first.")
        if decision is None:
            return
        if decision.run_id != report.run_id or decision.epoch != report.epoch:
            raise ValueError(
                f"decision is for run={decision.run_id!r} epoch={decision.epoch}, "
                f"not run={report.run_id!r} epoch={report.epoch}."
            )
        if decision.action == control_pb2.STOP:
            self.stopped = True
        elif decision.action == control_pb2.INTERVENE:
            self._intervene(decision)
        elif decision.action == control_pb2.ROLLBACK:
            self._rollback(decision)

    def _intervene(self, decision: control_pb2.Decision) -> None:
        # As the real trainer: snapshot model + optimizer + scheduler first.
        self._snapshot = self._model
        lr_before = self.lr_at(self._epoch)
        self.state.apply(decision)
        self._take_lr_and_weights(decision)
        self._interventions_applied += 1
        model = self._model
        if self.scenario == "collapse" and self._interventions_applied == self.collapse_at:
            # The spec's collapse: the loss doubles and stays there until rolled back.
            self._model = replace(model, level=2 * model.level, floor=2 * model.floor)
        elif decision.HasField("lr") and decision.lr > lr_before:
            self._model = replace(model, floor=model.floor * (1 - self._escape))

    def _rollback(self, decision: control_pb2.Decision) -> None:
        if self._snapshot is not None:
            self._model, self._snapshot = self._snapshot, None
            self.state.loss_weights = dict(self._model.loss_weights)
        self.state.apply(decision)
        self._take_lr_and_weights(decision)

    def _take_lr_and_weights(self, decision: control_pb2.Decision) -> None:
        base_lr = self._model.base_lr
        if decision.HasField("lr"):
            # Rescale PolyLR's base so that the next epoch runs at the decided LR.
            factor = _poly(self._epoch, self.epochs)
            base_lr = decision.lr / factor if factor > 0 else decision.lr
        self._model = replace(
            self._model, base_lr=base_lr, loss_weights=dict(self.state.loss_weights)
        )


def _dice(level: float) -> float:
    return min(1.0, max(0.0, 1.0 - level))


def _poly(epoch: int, epochs: int) -> float:
    return float(max(0.0, 1.0 - epoch / epochs) ** _POLY_EXPONENT)


# --- the CLI: one line per epoch, readable as a demo timeline -----------------------------

_HEADER = (
    f"{'epoch':>5}  {'val_loss':>8}  {'grad':>7}  {'action':<9}  {'lr':>9}  "
    f"{'weights':<32}  {'source':<8}  reason"
)


def _format_line(report: control_pb2.EpochReport, decision: control_pb2.Decision | None) -> str:
    monitored = report.val_loss if report.HasField("val_loss") else report.train_loss
    grad = f"{report.avg_gradient_norm:7.4f}" if report.HasField("avg_gradient_norm") else "-"
    if decision is None:
        action, lr, weights, source = "-", "-", "-", "-"
        reason = "no decision (see warning); training goes on unchanged"
    else:
        action = control_pb2.Action.Name(decision.action)
        lr = f"{decision.lr:9.6f}" if decision.HasField("lr") else "-"
        weights = _weights(decision.loss_weights) if decision.loss_weights else "-"
        source = control_pb2.Source.Name(decision.source)
        reason = decision.reason
    return (
        f"{report.epoch:>5}  {monitored:8.4f}  {grad:>7}  {action:<9}  {lr:>9}  "
        f"{weights:<32}  {source:<8}  {reason}"
    )


def _weights(weights: Mapping[str, float]) -> str:
    return " ".join(f"{name}={weights[name]:g}" for name in sorted(weights))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainctl-sim",
        description="Run a simulated nnU-Net training against the control server. "
        "TRAINCTL_* environment variables configure the client; flags win.",
    )
    parser.add_argument("--target", help="control server HOST:PORT (TRAINCTL_SERVER)")
    parser.add_argument("--run-id", help="run id (TRAINCTL_RUN_ID; default sim-SCENARIO-SEED)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs to run (default 40)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="plateau")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--collapse-at", type=int, default=2, help="intervention that collapses (default 2)"
    )
    parser.add_argument("--initial-lr", type=float, default=0.01, help="default 0.01")
    parser.add_argument("--dataset", default="Dataset999_Sim")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--trainer", default="SimulatedTrainer")
    parser.add_argument("--plans", default="nnUNetPlans")
    parser.add_argument("--deadline", type=float, help="seconds per report (TRAINCTL_DEADLINE_S)")
    parser.add_argument(
        "--fail-open",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep going without decisions when the server fails during the run "
        "(TRAINCTL_FAIL_OPEN=outage or never; =always also after a setup mistake)",
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds to sleep between epochs (demo pacing)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help="use TLS with the system's CA roots (TRAINCTL_TLS)",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="PEM CA to verify the server with; implies TLS (TRAINCTL_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, help="PEM client certificate, with --tls-key (TRAINCTL_TLS_CERT)"
    )
    parser.add_argument("--tls-key", type=Path, help="PEM client key (TRAINCTL_TLS_KEY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trainctl-sim``: run the loop through the real ControlClient; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    # The token comes from TRAINCTL_TOKEN only: a flag would show up in `ps`.
    try:
        config = ClientConfig.from_env(os.environ)
        flags = {
            "target": args.target,
            "run_id": args.run_id,
            "deadline_s": args.deadline,
            "fail_open": args.fail_open,
            "tls": args.tls,
            "tls_ca": args.tls_ca,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            # --no-fail-open fails closed on setup mistakes too.
            "fail_open_on_setup": False if args.fail_open is False else None,
        }
        config = replace(config, **{k: v for k, v in flags.items() if v is not None})
        run = SimulatedRun(
            config.run_id or f"sim-{args.scenario}-{args.seed}",
            epochs=args.epochs,
            scenario=args.scenario,
            seed=args.seed,
            initial_lr=args.initial_lr,
            collapse_at=args.collapse_at,
            labels={
                "dataset": args.dataset,
                "configuration": args.configuration,
                "fold": args.fold,
                "trainer": args.trainer,
                "plans": args.plans,
                "host": socket.gethostname(),
            },
        )
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(
        f"run {run.state.run_id}: scenario={run.scenario} epochs={run.epochs} "
        f"server={config.target} fail_open={_fail_open_mode(config)} tls={config.use_tls} "
        f"token={'set' if config.token else 'none'}",
        flush=True,
    )
    with ControlClient(config) as client:
        try:
            start = client.start_run(
                run.state, trainer_name=args.trainer, trainer_version=_version()
            )
        except ControlSetupError as error:
            print(f"trainctl-sim: {error}", file=sys.stderr)
            return 1
        except ControlError as error:
            print(f"trainctl-sim: StartRun: {error}", file=sys.stderr)
            return 2 if isinstance(error, ControlUnavailable) else 1
        print(f"attempt {start.attempt}: {start.message}", flush=True)
        print(_HEADER, flush=True)
        try:
            code = _loop(run, client, config, args.delay)
        except BaseException as error:
            client.finish_run(
                run.state.run_id, control_pb2.FAILED, error=f"{type(error).__name__}: {error}"
            )
            raise
        if code != 0:
            client.finish_run(run.state.run_id, control_pb2.FAILED, error=f"exit status {code}")
            return code
        status = control_pb2.STOPPED if run.stopped else control_pb2.COMPLETED
        client.finish_run(run.state.run_id, status, metrics=run.final_metrics())
    ending = "stopped by the server" if run.stopped else "finished"
    print(
        f"run {run.state.run_id} {ending} after epoch {run.epoch - 1}: "
        f"lr={run.state.current_lr:.6f} interventions={run.state.intervention_count} "
        f"weights={_weights(run.state.loss_weights)}",
        flush=True,
    )
    return 0


def _loop(run: SimulatedRun, client: ControlClient, config: ClientConfig, delay: float) -> int:
    """Run the epochs; the exit code (0, or 1/2 for a failure with fail-open off)."""
    while not run.done:
        report = run.next_report()
        try:
            decision = client.report(report)
        except ControlUnavailable as error:
            print(
                f"trainctl-sim: cannot reach the control server at {config.target}: {error}",
                file=sys.stderr,
            )
            return 2
        except ControlError as error:
            print(f"trainctl-sim: epoch {report.epoch}: {error}", file=sys.stderr)
            return 1
        run.apply(decision)
        print(_format_line(report, decision), flush=True)
        if delay > 0 and not run.done:
            time.sleep(delay)
    return 0


def _fail_open_mode(config: ClientConfig) -> str:
    """TRAINCTL_FAIL_OPEN's word for `config`."""
    if config.fail_open_on_setup:
        return "always"
    return "outage" if config.fail_open else "never"


def _version() -> str:
    try:
        return f"training-control {importlib.metadata.version('training-control')}"
    except importlib.metadata.PackageNotFoundError:
        return "training-control (from a checkout)"


if __name__ == "__main__":
    raise SystemExit(main())
