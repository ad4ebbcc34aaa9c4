"""`make bench`: durable decisions per second of the control server, against a bare echo.

Two servers run as subprocesses (so neither shares a GIL with the load
generator): the real control server on a fresh SQLite file, and an echo server
of the same flavour that answers every report at once and stores nothing
(benchmarks/echo_server.py). This process is the load generator: N concurrent
simulated runs (`trainer_client.sim.SimulatedRun`), each reporting epoch after
epoch and applying each decision, as real trainers do. Echo and control are
measured alternately and the medians reported, so drift on a shared machine
cancels out. After each control measurement the audit is checked: the SQLite
file must hold at least one decision row per successful reply.

The last line is machine-readable:
``bench: decisions_per_s=N p50_ms=N p99_ms=N vs_echo=R``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.sim import SimulatedRun

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = REPO / "control_server" / "policies" / "default.yaml"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
LISTEN = "127.0.0.1:0"
RUN_LABELS = {"dataset": "Dataset999_Bench", "configuration": "3d_fullres", "fold": "0",
              "trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "host": "bench"}  # fmt: skip
# CPUs used by other processes above which the summary warns of a contended machine.
CONTENDED_CPUS = 0.25
# One run in this many hits the "collapse" scenario, so ROLLBACKs happen too.
COLLAPSE_EVERY = 4
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
]


class BenchError(Exception):
    """The bench cannot produce honest numbers (a server failed, the audit is short)."""


@dataclass
class ServerProcess:
    """A server subprocess whose first stdout line names the port it bound."""

    name: str
    proc: subprocess.Popen[str]
    log: Path
    target: str = ""

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: Path) -> ServerProcess:
        """Start `argv` and wait for its ``...: serving on HOST:PORT`` line."""
        with log.open("w") as err:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        server = cls(name, proc, log)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True
        ).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            line = ""
        if "serving on " not in line:
            server.stop()
            raise BenchError(f"{name} server did not start: {line.strip()!r}\n{server.log_tail()}")
        server.target = line.split("serving on ", 1)[1].split()[0]
        return server

    def check_alive(self) -> None:
        """Raise BenchError when the server has exited."""
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} server exited with {self.proc.returncode}\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float | None:
        """CPU time the server process used so far (Linux /proc), or None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the servers drain and stop cleanly), SIGKILL if that takes too long."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def machine_busy_seconds() -> float | None:
    """CPU time all processes of the machine used so far (Linux /proc/stat), or None."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    """One load phase: how many runs, for how long, how fast."""

    in_flight: int
    warmup: float
    seconds: float
    epochs: int
    channels: int = 1
    # Reports per second of all runs together; 0: closed loop (next report at each answer).
    rate: float = 0.0


@dataclass
class Measurement:
    """What one load phase saw: replies and latencies inside the measured window."""

    label: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    replies: int = 0  # every successful reply, warm-up and tail included
    errors: int = 0
    prefix: str = ""
    server_cpu_s: float | None = None  # the server's CPU time over the whole phase
    # CPUs busy with other processes than the bench and its servers (a shared machine).
    others_cpus: float | None = None

    @property
    def cpu_us_per_reply(self) -> float | None:
        if self.server_cpu_s is None or not self.replies:
            return None
        return 1e6 * self.server_cpu_s / self.replies

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def quantile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def describe(self) -> str:
        cpu = self.cpu_us_per_reply
        return (
            f"{self.rate:7.0f}/s  p50 {self.quantile_ms(0.5):6.2f} ms  "
            f"p99 {self.quantile_ms(0.99):6.2f} ms  "
            + (f"server CPU {cpu:4.0f} us/reply  " if cpu is not None else "")
            + f"({len(self.latencies)} timed, {self.replies} replies, {self.errors} errors"
            + (f", others {self.others_cpus:.1f} CPUs" if self.others_cpus is not None else "")
            + ")"
        )


async def drive(target: str, label: str, load: Load) -> Measurement:
    """Run `load.in_flight` simulated runs against `target` for warm-up + seconds.

    Each run reports epoch after epoch and applies each decision; a finished
    run is replaced by a new one. Only replies that arrive inside the window
    after the warm-up are timed.
    """
    prefix = f"bench-{label}-{uuid.uuid4().hex[:8]}-"
    result = Measurement(label, load.seconds, prefix=prefix)
    interval = load.in_flight / load.rate if load.rate > 0 else 0.0
    # Distinct channel args keep the channels from sharing one connection.
    channels = [
        grpc.aio.insecure_channel(target, options=[*CHANNEL_OPTIONS, ("bench.channel", i)])
        for i in range(min(load.channels, load.in_flight))
    ]
    clock = time.perf_counter
    runs_started = 0

    def new_run() -> SimulatedRun:
        nonlocal runs_started
        runs_started += 1
        return SimulatedRun(
            f"{prefix}{runs_started}",
            epochs=load.epochs,
            scenario="collapse" if runs_started % COLLAPSE_EVERY == 0 else "plateau",
            seed=runs_started,
            labels=RUN_LABELS,
        )

    async def worker(index: int, window_start: float, window_end: float) -> None:
        stub = pb_grpc.TrainingControlStub(channels[index % len(channels)])
        run = new_run()
        next_at = clock() + interval * index / load.in_flight
        while True:
            if interval:
                await asyncio.sleep(max(0.0, next_at - clock()))
                next_at = max(next_at + interval, clock())
            if clock() >= window_end:
                return
            if run.done:
                run = new_run()
            report = run.next_report()
            sent = clock()
            try:
                decision = await stub.ReportEpoch(report, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                result.errors += 1
                run.apply(None)
                continue
            answered = clock()
            result.replies += 1
            if window_start <= answered <= window_end:
                result.latencies.append(answered - sent)
            run.apply(decision)

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        window_start = clock() + load.warmup
        window_end = window_start + load.seconds
        async with asyncio.timeout(load.warmup + load.seconds + 2 * CALL_TIMEOUT_S):
            async with asyncio.TaskGroup() as group:
                for i in range(load.in_flight):
                    group.create_task(worker(i, window_start, window_end))
    finally:
        for channel in channels:
            await channel.close()
    return result


def measure(server: ServerProcess, label: str, load: Load, idle: ServerProcess) -> Measurement:
    """One load phase against a live server, with the CPU time it and others used meanwhile."""
    server.check_alive()
    meters = (server.cpu_seconds, idle.cpu_seconds, time.process_time, machine_busy_seconds)
    before = [meter() for meter in meters]
    started = time.perf_counter()
    result = asyncio.run(drive(server.target, label, load))
    wall = time.perf_counter() - started
    after = [meter() for meter in meters]
    server.check_alive()
    used = [b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    if before[0] is not None and after[0] is not None:
        result.server_cpu_s = after[0] - before[0]
    if len(used) == len(meters):
        ours = used[0] + used[1] + used[2]
        result.others_cpus = max(0.0, (used[3] - ours) / wall)
    return result


def audited_decisions(db: Path, prefix: str) -> dict[str, int]:
    """Decision rows by action for runs whose id starts with `prefix` (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT action, COUNT(*) FROM decisions WHERE run_id >= ? AND run_id < ? "
            "GROUP BY action",
            (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)),
        ).fetchall()
    return {str(action): int(count) for action, count in rows}


def audit_ok(db: Path, m: Measurement) -> tuple[bool, str]:
    """Whether the audit holds a decision row for every successful reply, and a note."""
    by_action = audited_decisions(db, m.prefix)
    rows = sum(by_action.values())
    ok = rows >= m.replies
    actions = ", ".join(f"{a} {n}" for a, n in sorted(by_action.items()) if a != "NONE")
    return ok, (
        f"audit {rows} rows {'>=' if ok else '< MISSING:'} {m.replies} replies"
        + (f" ({actions})" if actions else "")
    )


def start_servers(tmp: Path, db: Path, policy: Path, servers: list[ServerProcess]) -> None:
    """Start the echo and the control server (appended to `servers` as they start)."""
    echo = [sys.executable, str(REPO / "benchmarks" / "echo_server.py"), "--listen", LISTEN]
    servers.append(ServerProcess.start("echo", echo, tmp / "echo.log"))
    control = [sys.executable, "-m", "control_server.cli", "serve", "--listen", LISTEN,
               "--store", f"sqlite:///{db}", "--policy", str(policy)]  # fmt: skip
    servers.append(ServerProcess.start("control", control, tmp / "control.log"))


def summary(name: str, unit: str, ms: Sequence[Measurement]) -> str:
    """One line of medians over repeated measurements of one server."""
    cpus = [c for c in (m.cpu_us_per_reply for m in ms) if c is not None]
    cpu = f"  server CPU {statistics.median(cpus):4.0f} us/reply" if cpus else ""
    return (
        f"  {name:<7} {statistics.median(m.rate for m in ms):7.0f} {unit:<11}  "
        f"p50 {statistics.median(m.quantile_ms(0.5) for m in ms):6.2f} ms  "
        f"p99 {statistics.median(m.quantile_ms(0.99) for m in ms):6.2f} ms{cpu}"
    )


def run_bench(args: argparse.Namespace, tmp: Path) -> int:
    """Start both servers, measure alternately, print the summary; return the exit code."""
    db = tmp / "control.db"
    load = Load(args.in_flight, args.warmup, args.seconds, args.epochs, args.channels)
    light = [("1 in flight", replace(load, in_flight=1, seconds=args.light_seconds))]
    if args.rate > 0:
        title = f"{args.in_flight} runs at {args.rate:g} reports/s"
        light.append((title, replace(load, seconds=args.light_seconds, rate=args.rate)))
    results: dict[str, list[Measurement]] = {"echo": [], "control": []}
    light_results: dict[str, list[Measurement]] = {"echo": [], "control": []}
    failed = False
    servers: list[ServerProcess] = []
    try:
        start_servers(tmp, db, args.policy, servers)
        print(
            f"bench: {load.in_flight} runs in flight, {load.seconds:g} s per measurement after "
            f"{load.warmup:g} s warm-up, {args.repeats} x (echo, control); "
            f"echo {servers[0].target}, control {servers[1].target} (SQLite)",
            flush=True,
        )
        phases = [(str(r), load, results) for r in range(1, args.repeats + 1)]
        phases += [(f"L{i}", lo, light_results) for i, (_, lo) in enumerate(light, 1)]
        for tag, phase, sink in phases:
            for server in servers:
                idle = servers[1] if server is servers[0] else servers[0]
                m = measure(server, f"{server.name}{tag}", phase, idle)
                sink[server.name].append(m)
                line = f"  {server.name:<7} #{tag}: {m.describe()}"
                if server.name == "control":
                    ok, note = audit_ok(db, m)
                    failed |= not ok
                    line += f"; {note}"
                failed |= m.errors > 0
                print(line, flush=True)
    finally:
        for server in servers:
            server.stop()

    print_summary(results, light_results, [title for title, _ in light], failed)
    return 1 if failed else 0


def print_summary(
    results: dict[str, list[Measurement]],
    light_results: dict[str, list[Measurement]],
    light_titles: Sequence[str],
    failed: bool,
) -> None:
    """The human summary, then the one machine-readable last line."""
    control = results["control"]
    echo_rate = statistics.median(m.rate for m in results["echo"])
    rate = statistics.median(m.rate for m in control)
    p50 = statistics.median(m.quantile_ms(0.5) for m in control)
    p99 = statistics.median(m.quantile_ms(0.99) for m in control)
    print(f"medians of {len(control)} measurements of each server:")
    print(summary("echo", "RPC/s", results["echo"]))
    print(summary("control", "decisions/s", control))
    pairs = zip(light_titles, light_results["echo"], light_results["control"], strict=True)
    for title, e, c in pairs:
        print(
            f"latency at {title}: control p50 {c.quantile_ms(0.5):.2f} ms, "
            f"p99 {c.quantile_ms(0.99):.2f} ms ({c.rate:.0f}/s); "
            f"echo p50 {e.quantile_ms(0.5):.2f} ms, p99 {e.quantile_ms(0.99):.2f} ms"
        )
    others = [m.others_cpus for ms in results.values() for m in ms if m.others_cpus is not None]
    if others and statistics.median(others) > CONTENDED_CPUS:
        print(
            f"warning: other processes kept {statistics.median(others):.1f} CPUs busy during "
            "the measurements (median): absolute numbers are low, compare the ratio"
        )
    if failed:
        print("bench: FAILED: call errors, or decisions missing from the audit", file=sys.stderr)
    print(
        f"bench: decisions_per_s={rate:.0f} p50_ms={p50:.1f} p99_ms={p99:.1f} "
        f"vs_echo={rate / echo_rate:.2f}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--in-flight", type=int, default=64, help="concurrent simulated runs (default 64)")
    add("--seconds", type=float, default=5.0, help="measured seconds per phase (default 5)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    add("--repeats", type=int, default=3, help="(echo, control) pairs measured (default 3)")
    add("--channels", type=int, default=1, help="client channels the runs share (default 1)")
    add("--epochs", type=int, default=100, help="epochs per simulated run (default 100)")
    add("--rate", type=float, default=500.0,
        help="reports/s of the fixed-rate latency phase; 0 skips it (default 500)")  # fmt: skip
    add("--light-seconds", type=float, default=2.0,
        help="measured seconds of each low-load latency phase (default 2)")  # fmt: skip
    add("--policy", type=Path, default=DEFAULT_POLICY,
        help="policy YAML for the control server (default: the packaged default)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the bench in a temporary directory; return the exit code."""
    args = build_parser().parse_args(argv)
    for flag in ("in_flight", "repeats", "epochs", "channels"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"bench: --{flag.replace('_', '-')} must be >= 1")
    if args.seconds <= 0 or args.warmup < 0 or args.light_seconds <= 0:
        raise SystemExit("bench: --seconds and --light-seconds must be > 0, --warmup >= 0")
    # SIGTERM unwinds like Ctrl-C, so that the servers are stopped and the files removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="trainctl-bench-"))
    try:
        return run_bench(args, tmp)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
