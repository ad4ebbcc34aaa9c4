"""`make demo`: a server on SQLite, a simulated training under its control, the audit.

Starts `control-server serve` on a free port with a fresh SQLite store, runs the
simulated trainer (`trainctl-sim`) on a plateauing curve whose second
intervention collapses, prints every epoch's decision as the trainer saw it,
then the run's audit as the server recorded it, proves the record replays, and
stops the server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "var" / "demo"
RUN_ID = "demo-Dataset042_Disc-2d-fold0"
EPOCHS = 40


def start_server(store: str) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_server.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--policy",
            str(HERE / "policy.yaml"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r"serving on (\S+)", line)
    if not match:
        server.kill()
        raise SystemExit(f"demo: the server did not start: {line!r}")
    print(line.strip())
    return server, match.group(1)


def print_audit(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        run = pb_grpc.ControlAdminStub(channel).GetRun(pb.GetRunRequest(run_id=RUN_ID))
    print(
        f"\nAudit of {run.run.run_id} as stored: {run.run.report_count} reports, "
        f"{run.run.intervention_count} interventions, last LR {run.run.current_lr:.4g}"
    )
    for e in run.epochs:
        d = e.decision
        if d.action == pb.NONE:
            continue
        lr = f"{d.lr:.4g}" if d.HasField("lr") else "-"
        weights = " ".join(f"{k}={v:g}" for k, v in sorted(d.loss_weights.items())) or "-"
        print(
            f"  epoch {d.epoch:>3} {pb.Action.Name(d.action):<9} {pb.Source.Name(d.source):<7} "
            f"lr={lr:<8} {weights:<28} policy={d.policy_version} id={d.decision_id[:8]}"
        )
        print(f"            {d.reason}")


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    store = f"sqlite:///{WORK}/control.db"
    server, target = start_server(store)
    try:
        print(
            f"\nSimulated nnU-Net training under control ({EPOCHS} epochs, "
            "the 2nd intervention collapses):\n",
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer_client.sim",
                "--target",
                target,
                "--run-id",
                RUN_ID,
                "--epochs",
                str(EPOCHS),
                "--scenario",
                "collapse",
                "--dataset",
                "Dataset042_Disc",
            ],
            check=True,
        )
        print_audit(target)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    print("\nReplaying the recorded reports through the recorded policy:")
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "control_server.cli",
            "--log-level",
            "WARNING",
            "replay",
            "--store",
            store,
        ],
        check=False,
    )
    print(f"\nStore: {WORK / 'control.db'}")
    return replay.returncode


if __name__ == "__main__":
    sys.exit(main())
