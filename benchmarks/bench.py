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

With PostgreSQL reachable (``--postgres``, default the local test server), the
same rounds also measure the control server on a fresh PostgreSQL database,
first one process ("pg") and then two processes on that database ("pg x2"):
the load generator's channels balance every call round-robin over both
(gRPC's client-side ``round_robin`` policy, as a gRPC-aware load balancer
would), so each run hops between the replicas from epoch to epoch. Their
ratios to SQLite and to one replica are printed before the last line; without
PostgreSQL that part is skipped with a note. Each decision updates its run's
row, so the bench VACUUMs the PostgreSQL database before each of its
measurements, as autovacuum would on a real server (the test servers of this
project's machines run with autovacuum off; without it, latency at one report
in flight doubles after the first heavy phase).

Open WatchDecisions streams must not slow the trainers down: with ``--watches
N`` (default 1,000) the SQLite server is also measured at 1 report in flight
with N idle streams open (each watching a run that never reports, held by a
subprocess of this script over several connections) and without, in
alternation; the ratio of the p50s is printed (goal <= 1.5x).

The last line is machine-readable, for the SQLite single server:
``bench: decisions_per_s=N p50_ms=N p99_ms=N vs_echo=R watches=N watch_p50_ratio=R``
(the last two only with ``--watches``).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.sim import SimulatedRun

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = REPO / "control_server" / "builtin_policies" / "default.yaml"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
LISTEN = "127.0.0.1:0"
RUN_LABELS = {"dataset": "Dataset999_Bench", "configuration": "3d_fullres", "fold": "0",
              "trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "host": "bench"}  # fmt: skip
# CPUs used by other processes above which the summary warns of a contended machine.
CONTENDED_CPUS = 0.25
# One run in this many hits the "collapse" scenario, so ROLLBACKs happen too.
COLLAPSE_EVERY = 4
#: The admin connection used to create (and drop) the bench's PostgreSQL database.
DEFAULT_POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: Streams the watch holder opens per connection (HTTP/2 allows ~100 by default).
WATCHES_PER_CHANNEL = 100
#: The goal for ReportEpoch's p50 with the watches open, as a ratio to none.
WATCH_RATIO_GOAL = 1.5
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
        """CPU time the server and its child processes (the decider) used so far
        (Linux /proc), or None."""
        try:
            total = 0
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # the process ended meanwhile
                if stat.parent.name == str(self.proc.pid) or fields[1] == str(self.proc.pid):
                    total += int(fields[11]) + int(fields[12])
            return total / os.sysconf("SC_CLK_TCK")
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


async def drive(
    target: str, label: str, load: Load, options: Sequence[tuple[str, str | int]] = ()
) -> Measurement:
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
        grpc.aio.insecure_channel(
            target, options=[*CHANNEL_OPTIONS, *options, ("bench.channel", i)]
        )
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


@dataclass
class Target:
    """What one measurement drives: one server, or several on one store behind the
    client's round_robin balancing (every call to the next server in turn)."""

    name: str
    description: str
    servers: list[ServerProcess]
    audit: Callable[[Measurement], tuple[bool, str]] | None = None
    #: Run before each measurement (store housekeeping).
    prepare: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        if len(self.servers) == 1:
            return self.servers[0].target
        return "ipv4:" + ",".join(s.target for s in self.servers)

    @property
    def options(self) -> list[tuple[str, str | int]]:
        return [("grpc.lb_policy_name", "round_robin")] if len(self.servers) > 1 else []


def _cpu(servers: Sequence[ServerProcess]) -> float | None:
    used = [s.cpu_seconds() for s in servers]
    return None if any(u is None for u in used) else sum(u for u in used if u is not None)


def measure(
    target: Target, label: str, load: Load, everyone: Sequence[ServerProcess]
) -> Measurement:
    """One load phase against a live target, with the CPU time it and others used meanwhile."""
    for server in everyone:
        server.check_alive()
    meters: list[Callable[[], float | None]] = [
        lambda: _cpu(target.servers),
        lambda: _cpu(everyone),
        time.process_time,
        machine_busy_seconds,
    ]
    before = [meter() for meter in meters]
    started = time.perf_counter()
    result = asyncio.run(drive(target.address, label, load, target.options))
    wall = time.perf_counter() - started
    after = [meter() for meter in meters]
    for server in everyone:
        server.check_alive()
    used = [b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    if before[0] is not None and after[0] is not None:
        result.server_cpu_s = after[0] - before[0]
    if len(used) == len(meters):
        ours = used[1] + used[2]
        result.others_cpus = max(0.0, (used[3] - ours) / wall)
    return result


def audited_decisions(db: Path, prefix: str) -> dict[str, int]:
    """Decision rows by action for runs whose id starts with `prefix` (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT action, COUNT(*) FROM decisions WHERE run_id >= ? AND run_id < ? "
            "GROUP BY action",
            (prefix, _prefix_end(prefix)),
        ).fetchall()
    return {str(action): int(count) for action, count in rows}


def pg_audited_decisions(url: str, prefix: str) -> dict[str, int]:
    """As `audited_decisions`, from a PostgreSQL database."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT action, count(*) FROM decisions WHERE run_id >= %s AND run_id < %s "
            "GROUP BY action",
            (prefix, _prefix_end(prefix)),
        ).fetchall()
    return {str(action): int(count) for action, count in rows}


def vacuum_postgres(url: str) -> None:
    """VACUUM the bench database, as autovacuum would between measurements."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM")


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def audit_note(by_action: dict[str, int], m: Measurement) -> tuple[bool, str]:
    """Whether the audit holds a decision row for every successful reply, and a note."""
    rows = sum(by_action.values())
    ok = rows >= m.replies
    actions = ", ".join(f"{a} {n}" for a, n in sorted(by_action.items()) if a != "NONE")
    return ok, (
        f"audit {rows} rows {'>=' if ok else '< MISSING:'} {m.replies} replies"
        + (f" ({actions})" if actions else "")
    )


async def hold_watches(target: str, count: int) -> None:
    """Open `count` idle WatchDecisions streams on `target`, print one line once all are
    live, and hold them until stdin closes (the bench's side of `WatchHolder`)."""
    channels = [
        grpc.aio.insecure_channel(target, options=[*CHANNEL_OPTIONS, ("bench.watch", i)])
        for i in range(-(-count // WATCHES_PER_CHANNEL))
    ]
    calls = []
    try:
        for i in range(count):
            stub = pb_grpc.ControlAdminStub(channels[i // WATCHES_PER_CHANNEL])
            calls.append(stub.WatchDecisions(pb.WatchDecisionsRequest(run_id=f"idle-watch-{i}")))
        # The server sends headers once a watch is live.
        await asyncio.gather(*(call.initial_metadata() for call in calls))
        print(f"watching {count}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        for call in calls:
            if call.done():
                raise SystemExit(f"a watch ended: {await call.code()} {await call.details()}")
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


#: (streams open, measurements without them, measurements with them).
WatchResults = tuple[int, list[Measurement], list[Measurement]]


class WatchHolder:
    """A subprocess holding N idle WatchDecisions streams open on a server."""

    def __init__(self, target: str, count: int, log: Path) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--hold-watches", target,
                "--watches", str(count)]  # fmt: skip
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True,
            )  # fmt: skip
        self.log = log
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("watching"):
            self.stop()
            raise BenchError(f"could not open {count} watches: {line!r}\n{log.read_text()}")

    def stop(self) -> None:
        """Close the streams (stdin closed), and fail if one ended before."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code != 0:
            raise BenchError(f"the watch holder exited with {code}: {self.log.read_text()}")


def measure_watches(
    control: Target, load: Load, count: int, repeats: int, everyone: list[ServerProcess],
    tmp: Path,
) -> WatchResults:  # fmt: skip
    """`load` against the control server without and with `count` idle watches open,
    in alternation, `repeats` times each; print each measurement."""
    without: list[Measurement] = []
    with_watches: list[Measurement] = []
    for r in range(1, repeats + 1):
        m = measure(control, f"nowatch{r}", load, everyone)
        without.append(m)
        print(f"  no watch #{r}: {m.describe()}", flush=True)
        holder = WatchHolder(control.address, count, tmp / "watches.log")
        try:
            m = measure(control, f"watch{r}", load, everyone)
        finally:
            holder.stop()
        with_watches.append(m)
        print(f"  {count} watches #{r}: {m.describe()}", flush=True)
    return count, without, with_watches


def start_servers(tmp: Path, db: Path, policy: Path, servers: list[ServerProcess]) -> None:
    """Start the echo and the control server (appended to `servers` as they start)."""
    echo = [sys.executable, str(REPO / "benchmarks" / "echo_server.py"), "--listen", LISTEN]
    servers.append(ServerProcess.start("echo", echo, tmp / "echo.log"))
    servers.append(
        ServerProcess.start("control", control_argv(f"sqlite:///{db}", policy), tmp / "control.log")
    )


def control_argv(store_url: str, policy: Path) -> list[str]:
    return [sys.executable, "-m", "control_server.cli", "serve", "--listen", LISTEN,
            "--store", store_url, "--policy", str(policy)]  # fmt: skip


def create_postgres_database(admin_url: str) -> tuple[str | None, str]:
    """A fresh database for the bench on the server of `admin_url`: (its URL, "") or
    (None, why not)."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[postgres]')"
    name = f"tc_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        return None, f"cannot create a database through {admin_url}: {' '.join(str(exc).split())}"
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl(), ""


def drop_postgres_database(admin_url: str, url: str) -> None:
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    except psycopg.Error as exc:
        print(f"bench: could not drop the bench database {name}: {exc}", file=sys.stderr)


def summary(name: str, unit: str, ms: Sequence[Measurement]) -> str:
    """One line of medians over repeated measurements of one target."""
    cpus = [c for c in (m.cpu_us_per_reply for m in ms) if c is not None]
    cpu = f"  server CPU {statistics.median(cpus):4.0f} us/reply" if cpus else ""
    return (
        f"  {name:<7} {_rate(ms):7.0f} {unit:<11}  "
        f"p50 {statistics.median(m.quantile_ms(0.5) for m in ms):6.2f} ms  "
        f"p99 {_p99(ms):6.2f} ms{cpu}"
    )


def _rate(ms: Sequence[Measurement]) -> float:
    return statistics.median(m.rate for m in ms)


def _p99(ms: Sequence[Measurement]) -> float:
    return statistics.median(m.quantile_ms(0.99) for m in ms)


def run_bench(args: argparse.Namespace, tmp: Path) -> int:
    """Start the servers, measure them in alternation, print the summary; return the
    exit code."""
    db = tmp / "control.db"
    load = Load(args.in_flight, args.warmup, args.seconds, args.epochs, args.channels)
    light = [("1 in flight", replace(load, in_flight=1, seconds=args.light_seconds))]
    if args.rate > 0:
        title = f"{args.in_flight} runs at {args.rate:g} reports/s"
        light.append((title, replace(load, seconds=args.light_seconds, rate=args.rate)))
    failed = False
    watch_results: WatchResults | None = None
    servers: list[ServerProcess] = []
    pg_url, pg_note = (
        create_postgres_database(args.postgres) if args.postgres else (None, "--postgres ''")
    )
    try:
        start_servers(tmp, db, args.policy, servers)
        echo, control = servers
        targets = [
            Target("echo", "bare aio echo, no store", [echo]),
            Target(
                "control",
                "SQLite, 1 server",
                [control],
                lambda m: audit_note(audited_decisions(db, m.prefix), m),
            ),
        ]
        if pg_url is not None:
            replicas = []
            for i in (1, 2):
                argv = control_argv(pg_url, args.policy)
                replicas.append(ServerProcess.start(f"pg{i}", argv, tmp / f"pg{i}.log"))
                servers.append(replicas[-1])

            def pg_audit(m: Measurement) -> tuple[bool, str]:
                assert pg_url is not None
                return audit_note(pg_audited_decisions(pg_url, m.prefix), m)

            def pg_vacuum() -> None:
                assert pg_url is not None
                vacuum_postgres(pg_url)

            targets += [
                Target("pg", "PostgreSQL, 1 server", replicas[:1], pg_audit, pg_vacuum),
                Target(
                    "pg x2", "PostgreSQL, 2 servers, round_robin", replicas, pg_audit, pg_vacuum
                ),
            ]
        print(
            f"bench: {load.in_flight} runs in flight, {load.seconds:g} s per measurement after "
            f"{load.warmup:g} s warm-up, {args.repeats} x ({', '.join(t.name for t in targets)}); "
            + "; ".join(f"{t.name} {t.address} ({t.description})" for t in targets),
            flush=True,
        )
        if pg_url is None:
            print(f"bench: PostgreSQL comparison skipped: {pg_note}", flush=True)
        results: dict[str, list[Measurement]] = {t.name: [] for t in targets}
        light_results: dict[str, list[Measurement]] = {t.name: [] for t in targets}
        phases = [(str(r), load, results) for r in range(1, args.repeats + 1)]
        phases += [(f"L{i}", lo, light_results) for i, (_, lo) in enumerate(light, 1)]
        for tag, phase, sink in phases:
            for target in targets:
                label = target.name.replace(" ", "")
                if target.prepare is not None:
                    target.prepare()
                m = measure(target, f"{label}{tag}", phase, servers)
                sink[target.name].append(m)
                line = f"  {target.name:<7} #{tag}: {m.describe()}"
                if target.audit is not None:
                    ok, note = target.audit(m)
                    failed |= not ok
                    line += f"; {note}"
                failed |= m.errors > 0
                print(line, flush=True)
        if args.watches:
            print(
                f"bench: ReportEpoch at 1 in flight without and with {args.watches} idle "
                "WatchDecisions streams open (SQLite, 1 server)",
                flush=True,
            )
            watch_results = measure_watches(
                targets[1], light[0][1], args.watches, args.repeats, servers, tmp
            )
            failed |= any(m.errors for ms in watch_results[1:] for m in ms)
    finally:
        for server in servers:
            server.stop()
        if pg_url is not None:
            drop_postgres_database(args.postgres, pg_url)

    print_summary(results, light_results, [title for title, _ in light], failed, watch_results)
    return 1 if failed else 0


def print_summary(
    results: dict[str, list[Measurement]],
    light_results: dict[str, list[Measurement]],
    light_titles: Sequence[str],
    failed: bool,
    watch_results: WatchResults | None = None,
) -> None:
    """The human summary, the store and replica comparison, then the one machine-readable
    last line (SQLite, one server)."""
    control = results["control"]
    echo_rate = _rate(results["echo"])
    rate = _rate(control)
    p50 = statistics.median(m.quantile_ms(0.5) for m in control)
    p99 = _p99(control)
    print(f"medians of {len(control)} measurements of each server:")
    print(summary("echo", "RPC/s", results["echo"]))
    for name in results:
        if name != "echo":
            print(summary(name, "decisions/s", results[name]))
    for index, title in enumerate(light_titles):
        parts = [
            f"{name} p50 {m.quantile_ms(0.5):.2f} ms, p99 {m.quantile_ms(0.99):.2f} ms"
            + (f" ({m.rate:.0f}/s)" if name != "echo" else "")
            for name, m in ((name, ms[index]) for name, ms in light_results.items())
        ]
        print(f"latency at {title}: " + "; ".join(parts))
    own_store = [m.others_cpus for n in ("echo", "control") for m in results[n]]
    others = [o for o in own_store if o is not None]
    if others and statistics.median(others) > CONTENDED_CPUS:
        print(
            f"warning: other processes kept {statistics.median(others):.1f} CPUs busy during "
            "the measurements (median): absolute numbers are low, compare the ratio"
        )
    if "pg" in results:
        pg, pg2 = results["pg"], results["pg x2"]
        print("stores and replicas (same run, same load; PostgreSQL's own CPU counts as others'):")
        print(
            f"  PostgreSQL vs SQLite, 1 server:   {_rate(pg) / rate:.2f}x decisions/s, "
            f"p99 {_p99(pg) / p99:.2f}x ({_rate(pg):.0f}/s, p99 {_p99(pg):.1f} ms "
            f"vs {rate:.0f}/s, p99 {p99:.1f} ms)"
        )
        print(
            f"  PostgreSQL, 2 servers vs 1:       {_rate(pg2) / _rate(pg):.2f}x decisions/s, "
            f"p99 {_p99(pg2) / _p99(pg):.2f}x ({_rate(pg2):.0f}/s, p99 {_p99(pg2):.1f} ms)"
        )
        print(
            f"bench: postgres decisions_per_s={_rate(pg):.0f} p99_ms={_p99(pg):.1f} "
            f"vs_sqlite={_rate(pg) / rate:.2f}; two_replicas decisions_per_s={_rate(pg2):.0f} "
            f"p99_ms={_p99(pg2):.1f} vs_one={_rate(pg2) / _rate(pg):.2f}",
            flush=True,
        )
    watch_part = ""
    if watch_results is not None:
        count, without, with_watches = watch_results
        p50_without = statistics.median(m.quantile_ms(0.5) for m in without)
        p50_with = statistics.median(m.quantile_ms(0.5) for m in with_watches)
        ratio = p50_with / p50_without
        print(
            f"latency with {count} idle watch streams open (1 in flight, SQLite): "
            f"p50 {p50_with:.2f} ms, p99 {_p99(with_watches):.2f} ms; without: "
            f"p50 {p50_without:.2f} ms, p99 {_p99(without):.2f} ms; p50 ratio {ratio:.2f}x "
            f"(goal <= {WATCH_RATIO_GOAL:g}x{'' if ratio <= WATCH_RATIO_GOAL else ': MISSED'})"
        )
        watch_part = f" watches={count} watch_p50_ratio={ratio:.2f}"
    if failed:
        print("bench: FAILED: call errors, or decisions missing from the audit", file=sys.stderr)
    print(
        f"bench: decisions_per_s={rate:.0f} p50_ms={p50:.1f} p99_ms={p99:.1f} "
        f"vs_echo={rate / echo_rate:.2f}{watch_part}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--in-flight", type=int, default=64, help="concurrent simulated runs (default 64)")
    add("--seconds", type=float, default=5.0, help="measured seconds per phase (default 5)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    add("--repeats", type=int, default=3,
        help="rounds of (echo, control[, pg, pg x2]) measured (default 3)")  # fmt: skip
    add("--channels", type=int, default=1, help="client channels the runs share (default 1)")
    add("--epochs", type=int, default=100, help="epochs per simulated run (default 100)")
    add("--rate", type=float, default=500.0,
        help="reports/s of the fixed-rate latency phase; 0 skips it (default 500)")  # fmt: skip
    add("--light-seconds", type=float, default=2.0,
        help="measured seconds of each low-load latency phase (default 2)")  # fmt: skip
    add("--policy", type=Path, default=DEFAULT_POLICY,
        help="policy YAML for the control server (default: the packaged default)")  # fmt: skip
    add("--watches", type=int, default=1000, metavar="N",
        help="also measure 1 report in flight with N idle WatchDecisions streams open; "
             "0 skips (default 1000)")  # fmt: skip
    add("--hold-watches", metavar="TARGET", help=argparse.SUPPRESS)  # the holder subprocess
    add("--postgres", default=DEFAULT_POSTGRES, metavar="URL",
        help="PostgreSQL server to compare with (a fresh database is created and dropped "
             f"through this URL; '' skips; default {DEFAULT_POSTGRES})")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the bench in a temporary directory; return the exit code."""
    args = build_parser().parse_args(argv)
    if args.hold_watches:
        asyncio.run(hold_watches(args.hold_watches, args.watches))
        return 0
    if args.watches < 0:
        raise SystemExit("bench: --watches must be >= 0")
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
