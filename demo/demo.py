"""`make demo`: a real nnU-Net v2 training on the CPU under a control server.

Starts `control-server serve` on a free port with a fresh SQLite store and the
demo policy (`demo/policy.yaml`), writes a small synthetic dataset (bright
discs on noise, 2D PNG) and plans and preprocesses it with nnU-Net, then trains
it with `trainctl-nnunet` (the `nnUNetTrainerControlled` trainer) on the CPU,
showing each epoch's decision as the trainer applied it. Afterwards it prints
the run's timeline as the server recorded it, writes a PNG plot of it (the
monitored loss with interventions and rollbacks marked, the LR on a second
axis), proves that the record replays through the recorded policy, and stops
the server. Everything lands under var/demo/.

``demo.py --simulated`` runs the quick simulated demo instead (no torch): a
simulated trainer whose second intervention collapses, so every kind of
decision shows up, including a rollback. It has its own folder,
var/demo-simulated/, so it never touches what the real demo made.

Both end by printing how to see the run in the console (`control-server console`,
the operators' web console). With ``--keep`` they leave a server and a console
running on the demo's store instead, detached from the demo (their output in
server.log and console.log, their PIDs printed and kept in kept.pids); the next
demo in the same folder stops them first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
#: Each demo its own folder: each starts by clearing what an earlier run of it left.
WORK = HERE.parent / "var" / "demo"
SIMULATED_WORK = HERE.parent / "var" / "demo-simulated"
DATASET_ID = 42
NNUNET_RUN_ID = "Dataset042_Disc__nnUNetTrainerControlled__nnUNetPlans__2d__fold_0"
SIM_RUN_ID = "demo-Dataset042_Disc-2d-fold0"
SIM_EPOCHS = 40
#: The console's port with --keep (a free one when it is taken).
CONSOLE_PORT = 8080
#: Seconds a detached server or console may take to print its serving line.
START_TIMEOUT_S = 30.0
KEPT_PIDS = "kept.pids"
# Lines of the trainer's output worth showing live (the full log is kept).
_SHOWN = re.compile(r"training control:|Mean Validation Dice|Traceback|Error")


def fresh(work: Path) -> None:
    """Create `work`, removing what an earlier demo left there (and nothing else);
    a server and console an earlier ``--keep`` left running on it are stopped first."""
    work.mkdir(parents=True, exist_ok=True)
    stop_kept(work)
    for name in (
        "nnunet",
        "control.db",
        "control.db-wal",
        "control.db-shm",
        "training.log",
        "timeline.png",
        "server.log",
        "console.log",
        KEPT_PIDS,
    ):
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def start_server(store: str, policy: Path) -> tuple[subprocess.Popen[str], str]:
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
            str(policy),
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


def stop_server(server: subprocess.Popen[str]) -> None:
    server.terminate()
    server.communicate(timeout=30)


# --- the console ---------------------------------------------------------------------


def control_server_command() -> str:
    """How to call `control-server` from here: the venv's script when there is one."""
    script = Path(sys.executable).parent / "control-server"
    if script.exists():
        return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)
    return f"{sys.executable} -m control_server.cli"


def print_console_hint(store: str, keep_flags: str) -> None:
    """How to see the demo's store in the console (the demo's own server is stopped)."""
    command = control_server_command()
    print(
        "\nSee it in the browser: run these two, each in a terminal of its own, and open\n"
        "the console (the operators' web console on the demo's store):\n"
        f"  {command} serve --listen 127.0.0.1:50051 --store {store}\n"
        f"  {command} console --server 127.0.0.1:50051 --listen 127.0.0.1:{CONSOLE_PORT}\n"
        f"Console: http://127.0.0.1:{CONSOLE_PORT}/   "
        f"(or run the demo with {keep_flags} to leave both running)"
    )


def start_detached(
    argv: list[str], log: Path, what: str
) -> tuple[subprocess.Popen[bytes], str | None]:
    """Start `argv` in a session of its own (it outlives the demo), output to `log`;
    wait for its "control-server WHAT: serving on ADDRESS" line: (process, the address,
    or None when it exited first)."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    prefix = "control-server" if what == "server" else f"control-server {what}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(rf"^{prefix}: serving on (\S+)", log.read_text(errors="replace"), re.M)
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            return proc, None
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"demo: the {what} did not start within {START_TIMEOUT_S:g} s; see {log}")


def keep_running(work: Path, store: str, console_port: int) -> None:
    """A server and a console on the demo's store, left running when the demo exits."""
    python = [sys.executable, "-m", "control_server.cli"]
    server, target = start_detached(
        [*python, "serve", "--listen", "127.0.0.1:0", "--store", store],
        work / "server.log",
        "server",
    )
    if target is None:
        raise SystemExit(f"demo: the server did not start; see {work / 'server.log'}")
    console_log = work / "console.log"

    def console_on(port: int) -> tuple[subprocess.Popen[bytes], str | None]:
        listen = f"127.0.0.1:{port}"
        return start_detached(
            [*python, "console", "--server", target, "--listen", listen], console_log, "console"
        )

    console, url = console_on(console_port)
    if url is None and console_port != 0:
        said = console_log.read_text(errors="replace").strip().splitlines()
        print(
            f"\ndemo: the console could not listen on port {console_port} "
            f"({said[-1] if said else 'no output'}); it listens on a free port instead"
        )
        console, url = console_on(0)
    if url is None:
        server.terminate()
        raise SystemExit(f"demo: the console did not start; see {console_log}")
    (work / KEPT_PIDS).write_text(f"{server.pid}\n{console.pid}\n")
    print(
        f"\nServer: {target} on {store} (PID {server.pid}, log {work / 'server.log'})\n"
        f"Console: {url} (PID {console.pid}, log {console_log})\n"
        f"Both keep running; stop them with: kill {server.pid} {console.pid}",
        flush=True,
    )


def stop_kept(work: Path) -> None:
    """Stop the server and console an earlier ``--keep`` left on `work` (those of its
    PIDs that are still ours: a `control_server.cli` process)."""
    pid_file = work / KEPT_PIDS
    if not pid_file.exists():
        return
    stopped = []
    for pid in (int(line) for line in pid_file.read_text().split() if line.isdigit()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"control_server.cli" not in command:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(pid)
    deadline = time.monotonic() + 20
    while stopped and time.monotonic() < deadline and any(_alive(p) for p in stopped):
        time.sleep(0.1)
    if stopped:
        print(
            "demo: stopped the server and console an earlier --keep left running "
            f"(PIDs {' '.join(map(str, stopped))})",
            flush=True,
        )
    pid_file.unlink()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def get_run(target: str, run_id: str) -> pb.GetRunResponse:
    with grpc.insecure_channel(target) as channel:
        response: pb.GetRunResponse = pb_grpc.ControlAdminStub(channel).GetRun(
            pb.GetRunRequest(run_id=run_id), timeout=30
        )
    return response


def replay(store: str) -> int:
    print("\nReplaying the recorded reports through the recorded policy:", flush=True)
    result = subprocess.run(
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
    return result.returncode


# --- the real thing ----------------------------------------------------------------------


def train(target: str, env: dict[str, str], epochs: int, iterations: int, log: Path) -> int:
    """Run trainctl-nnunet; show the control lines live, keep everything in `log`."""
    command = [
        sys.executable,
        "-m",
        "trainer_client.nnunet",
        str(DATASET_ID),
        "2d",
        "0",
        "--device",
        "cpu",
        "--epochs",
        str(epochs),
        "--iterations",
        str(iterations),
        "--val-iterations",
        "3",
        # One thread: two wait on each other whenever anything else runs on a 2-core box.
        "--threads",
        "1",
    ]
    print("$ TRAINCTL_SERVER=" + target + " trainctl-nnunet " + " ".join(command[3:]), flush=True)
    with log.open("w", buffering=1) as sink:
        trainer = subprocess.Popen(
            command,
            env={**env, "TRAINCTL_SERVER": target},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert trainer.stdout is not None
        for line in trainer.stdout:
            sink.write(line)
            if _SHOWN.search(line):
                # nnU-Net's timestamp prefix is noise here.
                print("  " + re.sub(r"^\S+ \S+: ", "", line.rstrip()), flush=True)
        return trainer.wait()


def real(work: Path, epochs: int, iterations: int, keep: bool, console_port: int) -> int:
    """The real demo; returns the exit code."""
    from control_server.ctl.plot import format_timeline, plot_run, timeline_rows
    from trainer_client.nnunet.synthetic import make_disc_dataset, nnunet_env, plan_and_preprocess

    started = time.monotonic()
    fresh(work)
    store = f"sqlite:///{work}/control.db"
    env = nnunet_env(work / "nnunet")
    server, target = start_server(store, HERE / "policy.yaml")
    try:
        print(f"\n1. A synthetic dataset (10 discs, 64x64 PNG) under {work / 'nnunet'}", flush=True)
        make_disc_dataset(Path(env["nnUNet_raw"]), DATASET_ID)
        print("   nnUNetv2_plan_and_preprocess -d 42 -c 2d (about 20 s) ...", flush=True)
        plan_and_preprocess(DATASET_ID, env)

        print(
            f"\n2. nnU-Net trains it on the CPU under control ({epochs} epochs of {iterations} "
            "iterations), each epoch's decision as the trainer applied it:",
            flush=True,
        )
        log = work / "training.log"
        code = train(target, env, epochs, iterations, log)
        if code != 0:
            print(f"demo: the training failed (exit {code}); its output: {log}", file=sys.stderr)
            return code

        run = get_run(target, NNUNET_RUN_ID)
        summary = run.run
        print(
            f"\n3. The run as the server recorded it: {summary.run_id}\n"
            f"   {summary.report_count} reports, {summary.intervention_count} interventions, "
            f"last LR {summary.current_lr:.5f}\n"
        )
        print(format_timeline(timeline_rows(run)))
        plot = plot_run(run, work / "timeline.png")
        print(f"\nPlot of the run: {plot}")
        print(f"nnU-Net's own output: {work / 'nnunet' / 'nnUNet_results'} (progress.png, log)")
    finally:
        stop_server(server)
    code = replay(store)
    print(f"\nStore: {work / 'control.db'}   ({time.monotonic() - started:.0f} s in all)")
    if keep:
        keep_running(work, store, console_port)
    else:
        print_console_hint(store, "make demo DEMO_ARGS=--keep")
    return code


# --- the simulated demo ------------------------------------------------------------------


def print_audit(target: str) -> None:
    run = get_run(target, SIM_RUN_ID)
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


def simulated(work: Path, keep: bool, console_port: int) -> int:
    fresh(work)
    store = f"sqlite:///{work}/control.db"
    server, target = start_server(store, HERE / "simulated_policy.yaml")
    try:
        print(
            f"\nSimulated nnU-Net training under control ({SIM_EPOCHS} epochs, "
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
                SIM_RUN_ID,
                "--epochs",
                str(SIM_EPOCHS),
                "--scenario",
                "collapse",
                "--dataset",
                "Dataset042_Disc",
            ],
            check=True,
        )
        print_audit(target)
    finally:
        stop_server(server)
    code = replay(store)
    print(f"\nStore: {work / 'control.db'}")
    if keep:
        keep_running(work, store, console_port)
    else:
        print_console_hint(store, "--simulated --keep")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--simulated", action="store_true", help="the quick simulated demo (no torch)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="real demo: epochs (default 30)")
    parser.add_argument(
        "--iterations", type=int, default=10, help="real demo: train iterations per epoch (10)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="output folder (default var/demo, or var/demo-simulated with --simulated)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave a server and the console running on the demo's store (PIDs printed)",
    )
    parser.add_argument(
        "--console-port",
        type=int,
        default=CONSOLE_PORT,
        help=f"with --keep: the console's port (default {CONSOLE_PORT}; a free one when taken)",
    )
    args = parser.parse_args()
    if args.work is not None:
        work = args.work.resolve()
    else:
        work = SIMULATED_WORK if args.simulated else WORK
    # The demo's children find this checkout even without an installed package.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])
    )
    if args.simulated:
        return simulated(work, args.keep, args.console_port)
    return real(work, args.epochs, args.iterations, args.keep, args.console_port)


if __name__ == "__main__":
    sys.exit(main())
