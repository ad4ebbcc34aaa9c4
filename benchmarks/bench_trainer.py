"""`make bench`, the trainer's side: what training control costs an nnU-Net training.

1. Gradient-norm capture: nnU-Net's ``train_step`` on a real 2D network (the
   synthetic disc dataset, planned and preprocessed here) with the capture on
   and off, interleaved step by step in one process (ABBA order, so drift on a
   shared machine hits both alike), on pre-loaded batches. The capture itself
   (keeping a device tensor) is also timed directly, with the once-per-epoch
   reduction, since it is far below the noise of a whole step.
2. The report round-trip per epoch: `ControlClient.report` against a real
   `control-server serve` on SQLite, epoch after epoch, as a trainer sends it.

Goal: the capture costs at most 1% of a step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.01
DATASET_ID = 42


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_steps(work: Path, steps: int, threads: int) -> tuple[str, bool]:
    """Time train_step with and without the capture; return the summary and the verdict."""
    from trainer_client.nnunet.synthetic import make_disc_dataset, nnunet_env, plan_and_preprocess

    env = nnunet_env(work / "nnunet")
    make_disc_dataset(Path(env["nnUNet_raw"]), DATASET_ID)
    plan_and_preprocess(DATASET_ID, env)
    os.environ.update(env)
    os.environ["TRAINCTL_SERVER"] = "127.0.0.1:1"  # no reports here

    import torch

    from trainer_client.nnunet import build_trainer, mean_finite

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's set-up chatter
        trainer = build_trainer(str(DATASET_ID), "2d", 0, device=device)
        trainer.initialize()
        trainer.dataloader_train, _ = trainer.get_dataloaders()
        trainer.on_train_epoch_start()
        batches = [next(trainer.dataloader_train) for _ in range(8)]

    def step(i: int, capture: bool) -> float:
        trainer.capture_grad_norm = capture
        started = time.perf_counter()
        trainer.train_step(batches[i % len(batches)])  # ends with the loss's host copy
        return time.perf_counter() - started

    for i in range(4):  # warm-up
        step(i, True)
    timed: dict[bool, list[float]] = {True: [], False: []}
    for i in range(steps):
        capture = (i % 4) in (0, 3)  # A B B A
        timed[capture].append(step(i, capture))
    with_ms = statistics.median(timed[True]) * 1e3
    without_ms = statistics.median(timed[False]) * 1e3

    # The capture alone: what train_step does with the norm (keep the tensor) ...
    norm = torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    kept: list[torch.Tensor] = []
    calls = 100_000
    started = time.perf_counter()
    for _ in range(calls):
        kept.append(norm.detach())
    append_us = (time.perf_counter() - started) / calls * 1e6
    # ... and the once-per-epoch mean over a full nnU-Net epoch of 250 steps.
    epoch = [norm.detach() for _ in range(250)]
    started = time.perf_counter()
    for _ in range(20):
        mean_finite(epoch)
    reduce_ms = (time.perf_counter() - started) / 20 * 1e3
    per_step_us = append_us + reduce_ms * 1e3 / 250
    share = per_step_us / (with_ms * 1e3)

    p10, p90 = (quantile(timed[False], q) * 1e3 for q in (0.1, 0.9))
    lines = [
        f"train_step ({device.type}, {threads} thread(s), nnU-Net 2d 64x64, batch "
        f"{trainer.batch_size}), median of {len(timed[True])} interleaved steps each:",
        f"  with gradient-norm capture {with_ms:8.2f} ms   without {without_ms:8.2f} ms   "
        f"ratio {with_ms / without_ms:.3f} (step-to-step noise: p10-p90 {p10:.0f}-{p90:.0f} ms)",
        f"  the capture itself: {append_us:.2f} us per step + {reduce_ms:.3f} ms per epoch of 250 "
        f"steps = {per_step_us:.2f} us per step = {share * 100:.4f}% of a step "
        f"(goal <= {GOAL * 100:g}%: {'met' if share <= GOAL else 'MISSED'})",
    ]
    return "\n".join(lines), share <= GOAL


def bench_reports(work: Path, epochs: int) -> str:
    """Time ControlClient.report against a real server, one report per epoch."""
    from trainer_client.client import ControlClient, RunState
    from trainer_client.config import ClientConfig

    server = subprocess.Popen(
        [sys.executable, "-m", "control_server.cli", "--log-level", "WARNING", "serve",
         "--listen", "127.0.0.1:0", "--store", f"sqlite:///{work}/control.db"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"serving on (\S+)", line)
        if not match:
            raise RuntimeError(f"the control server did not start: {line!r}")
        state = RunState(
            run_id="bench-trainer", initial_lr=0.01, current_lr=0.01,
            labels={"dataset": "Dataset042_Disc", "configuration": "2d", "fold": "0",
                    "trainer": "nnUNetTrainerControlled", "plans": "nnUNetPlans", "host": "bench"},
        )  # fmt: skip
        seconds = []
        with ControlClient(ClientConfig(target=match.group(1))) as client:
            for epoch in range(epochs):
                loss = 0.9 * 0.95**epoch
                report = state.build_report(
                    epoch, train_loss=loss, val_loss=loss * 1.1, avg_gradient_norm=0.05
                )
                started = time.perf_counter()
                decision = client.report(report)
                seconds.append(time.perf_counter() - started)
                if decision is None:
                    raise RuntimeError(f"no decision for epoch {epoch} (see the warning)")
                state.apply(decision)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    ms = [s * 1e3 for s in seconds]
    return (
        f"report round-trip per epoch (real server, SQLite, {epochs} epochs, first one "
        f"included): p50 {quantile(ms, 0.5):.1f} ms   p95 {quantile(ms, 0.95):.1f} ms   "
        f"max {max(ms):.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="timed steps in all (default 80)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--epochs", type=int, default=50, help="reports to time (default 50)")
    args = parser.parse_args(argv)
    print("bench_trainer: what training control costs an nnU-Net training", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        steps, met = bench_steps(work, args.steps, args.threads)
        print(steps, flush=True)
        print(bench_reports(work, args.epochs), flush=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
