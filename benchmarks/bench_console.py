"""`make bench` (the console's part): what the operators' console costs per page, in
time and bytes, against the gRPC calls behind each page.

A fresh SQLite store is filled through a real server (gRPC, many simulated trainers
in parallel, as a fleet would fill it): 1,000 runs (as many as the fleet page shows),
999 of about 30 epochs with nnU-Net's run ids
(``Dataset0NN_Name__nnUNetTrainerControlled__nnUNetPlans__CONF__fold_K``), most
completed with a final Dice, some still active, failed, stopped on a non-finite loss
or rolled back by the divergence guard; and one run of 1,000 epochs with the
policy's interventions, a guard rollback and an operator's override. Then the real
console (`control-server console`, a subprocess) serves that server, and this
process measures, in interleaved rounds after a warm-up, repeated GETs over one
kept-alive connection with a signed-in session:

- the fleet page ``/`` (every run: one ListRuns with each run's trend),
- the run page ``/runs/ID`` of the 1,000-epoch run (GetRun of all its epochs),
- ``/healthz`` (the console's floor: HTTP with no gRPC call and no template),

and, as baselines, the gRPC calls behind the pages straight to the server
(ListRuns limit=1000 trend_points=40, GetRun page_size=1000). Console times are
printed as ratios to them. Bytes: the body as the console sends it to a browser
that accepts gzip, its raw size, and its gzip size (what compression would save).

The last line is machine-readable:
``bench-console: fleet_ms=N fleet_bytes=N run_ms=N run_bytes=N fleet_vs_grpc=R run_vs_grpc=R``
(medians; bytes as sent). ``--small`` runs it in seconds (50 runs, a run of 100
epochs, few rounds) for the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from bench import BenchError, ServerProcess  # noqa: E402

from trainer_client.api import control_pb2 as pb  # noqa: E402
from trainer_client.api import control_pb2_grpc as pb_grpc  # noqa: E402
from trainer_client.sim import SimulatedRun  # noqa: E402

#: Dataset names cycled over Dataset001..Dataset0NN (the Medical Segmentation
#: Decathlon's and a few of nnU-Net's usual others).
DATASET_NAMES = ("BrainTumour", "Heart", "Liver", "Hippocampus", "Prostate", "Lung",
                 "Pancreas", "HepaticVessel", "Spleen", "Colon", "ACDC", "KiTS", "AMOS",
                 "BTCV", "LiTS", "BraTS")  # fmt: skip
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
FOLDS = 5
TRAINER = "nnUNetTrainerControlled"
PLANS = "nnUNetPlans"
#: Points of each run's trend the fleet page asks for (fleet.TREND_POINTS).
TREND_POINTS = 40
FLEET_LIMIT = 1000
CALL_TIMEOUT_S = 60.0
#: Simulated trainers reporting at once while the store is filled.
FILL_IN_FLIGHT = 48


@dataclass(frozen=True)
class Sizes:
    #: Runs in all, the long one included (the fleet page shows up to 1,000).
    runs: int
    epochs: int
    long_epochs: int
    rounds: int
    warmup: int


FULL = Sizes(runs=1000, epochs=30, long_epochs=1000, rounds=20, warmup=3)
SMALL = Sizes(runs=50, epochs=12, long_epochs=100, rounds=3, warmup=1)


def run_id_of(index: int) -> str:
    """The index-th nnU-Net run id: 4 configurations x 5 folds per dataset."""
    dataset, rest = divmod(index, len(CONFIGURATIONS) * FOLDS)
    configuration, fold = divmod(rest, FOLDS)
    name = DATASET_NAMES[dataset % len(DATASET_NAMES)]
    return (
        f"Dataset{dataset + 1:03d}_{name}__{TRAINER}__{PLANS}__"
        f"{CONFIGURATIONS[configuration]}__fold_{fold}"
    )


def labels_of(run_id: str) -> dict[str, str]:
    dataset, trainer, plans, configuration, fold = run_id.split("__")
    return {"dataset": dataset, "trainer": trainer, "plans": plans,
            "configuration": configuration, "fold": fold.removeprefix("fold_"),
            "host": f"gpu-node-{int(fold.removeprefix('fold_')) + 1}"}  # fmt: skip


# --- filling the store through the server -------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one run of the fleet goes: its epochs, its scenario and how it ends."""

    run_id: str
    epochs: int
    scenario: str = "plateau"
    #: COMPLETED, STOPPED, FAILED, or RUN_STATUS_UNSPECIFIED: still running.
    ending: int = pb.COMPLETED
    #: The last report's validation loss is NaN (the policy STOPs the run).
    non_finite: bool = False
    #: Epoch at which an operator sets an LR override (-1: none).
    override_at: int = -1


def fleet_plans(sizes: Sizes) -> list[Plan]:
    """Most runs complete; one in 10 collapses (the guard rolls it back), one in 5 is
    still running, one in 25 failed, one in 50 stops on a NaN loss."""
    plans = []
    for index in range(sizes.runs - 1):  # the long run is the last
        epochs = max(4, sizes.epochs + (index * 7) % 11 - 5)
        ending = pb.COMPLETED
        if index % 5 == 1:
            ending = pb.RUN_STATUS_UNSPECIFIED
        elif index % 25 == 3:
            ending = pb.FAILED
        plans.append(
            Plan(
                run_id_of(index),
                epochs,
                scenario="collapse" if index % 10 == 7 else "plateau",
                ending=ending,
                non_finite=index % 50 == 9,
            )
        )
    return plans


async def play(channel: grpc.aio.Channel, plan: Plan, seed: int) -> int:
    """One simulated trainer: StartRun, its epochs (each decision applied), FinishRun as
    planned. Returns the reports sent."""
    control = pb_grpc.TrainingControlStub(channel)
    run = SimulatedRun(
        plan.run_id,
        epochs=plan.epochs,
        scenario=plan.scenario,
        seed=seed,
        labels=labels_of(plan.run_id),
    )
    started = await control.StartRun(
        pb.StartRunRequest(
            run_id=plan.run_id,
            labels=pb.RunLabels(**run.state.labels),
            initial_lr=run.state.initial_lr,
            loss_weights=run.state.loss_weights,
            trainer_name=TRAINER,
            trainer_version="bench",
        ),
        timeout=CALL_TIMEOUT_S,
    )
    run.state.attempt = started.attempt
    sent = 0
    while not run.done:
        report = run.next_report()
        if plan.non_finite and run.epoch == plan.epochs:
            report.val_loss = math.nan
        if run.epoch - 1 == plan.override_at:
            await pb_grpc.ControlAdminStub(channel).SetOverride(
                pb.SetOverrideRequest(
                    run_id=plan.run_id,
                    lr=min(run.state.current_lr * 3, run.state.initial_lr),
                    once=True,
                    reason="bench: an operator tries a higher LR",
                ),
                timeout=CALL_TIMEOUT_S,
            )
        decision = await control.ReportEpoch(report, timeout=CALL_TIMEOUT_S)
        run.apply(decision)
        sent += 1
    if plan.ending != pb.RUN_STATUS_UNSPECIFIED:
        status = pb.STOPPED if run.stopped else plan.ending
        await control.FinishRun(
            pb.FinishRunRequest(
                run_id=plan.run_id,
                attempt=started.attempt,
                status=status,
                error="RuntimeError: CUDA out of memory" if status == pb.FAILED else "",
                metrics=run.final_metrics() if status == pb.COMPLETED else None,
            ),
            timeout=CALL_TIMEOUT_S,
        )
    return sent


async def fill(target: str, plans: Sequence[Plan], long_plan: Plan) -> int:
    """Play every plan against `target`, FILL_IN_FLIGHT at a time, the long run beside
    them; returns the reports sent."""
    channels = [grpc.aio.insecure_channel(target, options=[("bench.channel", i)]) for i in range(4)]
    queue: asyncio.Queue[tuple[int, Plan]] = asyncio.Queue()
    for index, plan in enumerate(plans):
        queue.put_nowait((index, plan))
    sent = 0

    async def worker(number: int) -> None:
        nonlocal sent
        while not queue.empty():
            index, plan = queue.get_nowait()
            reported = await play(channels[number % len(channels)], plan, seed=index)
            sent += reported  # after the await: no update lost between workers

    try:
        async with asyncio.TaskGroup() as group:
            long_run = group.create_task(play(channels[0], long_plan, seed=10_000))
            for number in range(FILL_IN_FLIGHT):
                group.create_task(worker(number))
    finally:
        for channel in channels:
            await channel.close()
    return sent + long_run.result()


# --- measuring ------------------------------------------------------------------------


class Page:
    """GETs of one console page over a kept-alive connection, with the session cookie
    of a signed-in person (the server has no tokens: the console signs everyone in)."""

    def __init__(self, base_url: str, path: str, cookie: str) -> None:
        parts = urlsplit(base_url)
        self.connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
        self.path = path
        self.cookie = cookie
        self.body = b""
        self.sent_bytes = 0
        self.encoding = ""

    def get(self) -> float:
        """One GET; its seconds (request sent to the last byte read)."""
        started = time.perf_counter()
        self.connection.request(
            "GET", self.path, headers={"Cookie": self.cookie, "Accept-Encoding": "gzip"}
        )
        response = self.connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise BenchError(f"GET {self.path} answered {response.status}: {body[:300]!r}")
        self.encoding = response.getheader("Content-Encoding") or ""
        self.sent_bytes = len(body)
        self.body = gzip.decompress(body) if self.encoding == "gzip" else body
        return elapsed


def sign_in(base_url: str) -> str:
    """The session cookie the console sets on a first visit (no tokens on the server)."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    connection.request("GET", "/signin")
    connection.getresponse().read()
    connection.request("GET", "/", headers={"Accept": "text/html"})
    response = connection.getresponse()
    response.read()
    cookie = response.getheader("Set-Cookie") or ""
    connection.close()
    if response.status != 200 or not cookie:
        raise BenchError(f"the console did not open a session: {response.status}, {cookie!r}")
    return cookie.split(";", 1)[0]


@dataclass
class Timed:
    name: str
    call: Callable[[], float]
    seconds: list[float]

    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)

    def p90_ms(self) -> float:
        ordered = sorted(self.seconds)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def grpc_call(method: Callable[..., object], request: object) -> Callable[[], float]:
    def call() -> float:
        started = time.perf_counter()
        method(request, timeout=CALL_TIMEOUT_S)
        return time.perf_counter() - started

    return call


def list_runs_request() -> pb.ListRunsRequest:
    """What the fleet page asks for: every run with its sparkline's trend."""
    return pb.ListRunsRequest(limit=FLEET_LIMIT, trend_points=TREND_POINTS)


def measure(timed: Sequence[Timed], sizes: Sizes) -> None:
    """Warm-up, then rounds in which each is called once in turn (drift cancels out)."""
    for _ in range(sizes.warmup):
        for one in timed:
            one.call()
    for _ in range(sizes.rounds):
        for one in timed:
            one.seconds.append(one.call())


def run_bench(sizes: Sizes, tmp: Path) -> int:
    plans = fleet_plans(sizes)
    long_run = "Dataset901_LongTraining__nnUNetTrainerControlled__nnUNetPlans__3d_fullres__fold_0"
    long_plan = Plan(
        long_run,
        sizes.long_epochs,
        scenario="collapse",
        ending=pb.RUN_STATUS_UNSPECIFIED,
        override_at=sizes.long_epochs // 2,
    )
    servers: list[ServerProcess] = []
    try:
        python = [sys.executable, "-m", "control_server.cli", "--log-level", "WARNING"]
        store = f"sqlite:///{tmp}/console-bench.db"
        server = ServerProcess.start(
            "control",
            [*python, "serve", "--listen", "127.0.0.1:0", "--store", store],
            tmp / "server.log",
        )
        servers.append(server)
        started = time.monotonic()
        try:
            reports = asyncio.run(fill(server.target, plans, long_plan))
        except* grpc.RpcError as failed:
            raise BenchError(f"filling the store failed: {failed.exceptions[0]}") from None
        filled_s = time.monotonic() - started
        print(
            f"bench-console: filled {store} through the server in {filled_s:.1f} s: "
            f"{len(plans) + 1} runs, {reports} reports ({reports / filled_s:.0f}/s); "
            f"the long run {long_run} has {sizes.long_epochs} epochs",
            flush=True,
        )
        console = ServerProcess.start(
            "console",
            [*python, "console", "--server", server.target, "--listen", "127.0.0.1:0"],
            tmp / "console.log",
        )
        servers.append(console)
        base = console.target
        cookie = sign_in(base)
        fleet = Page(base, "/", cookie)
        run_page = Page(base, f"/runs/{long_run}", cookie)
        health = Page(base, "/healthz", cookie)
        channel = grpc.insecure_channel(
            server.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        admin = pb_grpc.ControlAdminStub(channel)
        list_request = list_runs_request()
        get_request = pb.GetRunRequest(run_id=long_run, page_size=sizes.long_epochs)
        timed = [
            Timed("console /", fleet.get, []),
            Timed("gRPC ListRuns", grpc_call(admin.ListRuns, list_request), []),
            Timed("console /runs/ID", run_page.get, []),
            Timed("gRPC GetRun", grpc_call(admin.GetRun, get_request), []),
            Timed("console /healthz", health.get, []),
        ]
        measure(timed, sizes)
        listed = admin.ListRuns(list_request, timeout=CALL_TIMEOUT_S)
        got = admin.GetRun(get_request, timeout=CALL_TIMEOUT_S)
        channel.close()
        for one in servers:
            one.check_alive()
    finally:
        for one in reversed(servers):
            one.stop()

    html = fleet.body.decode()
    shown = sum(run_id in html for run_id in [long_run, *(plan.run_id for plan in plans)])
    if shown != sizes.runs:
        raise BenchError(f"the fleet page shows {shown} of the {sizes.runs} runs")
    if long_run not in run_page.body.decode():
        raise BenchError(f"the run page of {long_run} does not name it")
    if len(got.epochs) != sizes.long_epochs:
        raise BenchError(f"GetRun returned {len(got.epochs)} of {sizes.long_epochs} epochs")
    print_table(timed, fleet, run_page, listed.ByteSize(), got.ByteSize(), sizes)
    return 0


def print_table(
    timed: Sequence[Timed],
    fleet: Page,
    run_page: Page,
    list_bytes: int,
    get_bytes: int,
    sizes: Sizes,
) -> None:
    by_name = {one.name: one for one in timed}
    fleet_ms = by_name["console /"].median_ms()
    run_ms = by_name["console /runs/ID"].median_ms()
    list_ms = by_name["gRPC ListRuns"].median_ms()
    get_ms = by_name["gRPC GetRun"].median_ms()
    health_ms = by_name["console /healthz"].median_ms()
    print(
        f"median and p90 of {sizes.rounds} requests each after {sizes.warmup} warm-up, "
        "interleaved; one kept-alive connection; console and server on this machine:"
    )
    print(f"  {'':<18} {'median ms':>10} {'p90 ms':>8} {'vs gRPC':>8} {'vs healthz':>10}")
    for name, baseline in (
        ("console /", list_ms),
        ("gRPC ListRuns", None),
        ("console /runs/ID", get_ms),
        ("gRPC GetRun", None),
        ("console /healthz", None),
    ):
        one = by_name[name]
        ratio = f"{one.median_ms() / baseline:7.2f}x" if baseline else f"{'':>8}"
        print(
            f"  {name:<18} {one.median_ms():>10.2f} {one.p90_ms():>8.2f} {ratio} "
            f"{one.median_ms() / health_ms:>9.1f}x"
        )
    print("bytes (the console's as sent to a browser accepting gzip; raw; gzip -6):")
    for name, page, wire in (
        (f"/ ({sizes.runs} runs)", fleet, list_bytes),
        (f"/runs/ID ({sizes.long_epochs} epochs)", run_page, get_bytes),
    ):
        packed = len(gzip.compress(page.body, compresslevel=6))
        print(
            f"  {name:<24} sent {page.sent_bytes:>9,} ({page.encoding or 'uncompressed'})  "
            f"raw {len(page.body):>9,}  gzip {packed:>8,}  "
            f"(gRPC answer {wire:,} bytes)"
        )
    print(
        f"bench-console: fleet_ms={fleet_ms:.1f} fleet_bytes={fleet.sent_bytes} "
        f"run_ms={run_ms:.1f} run_bytes={run_page.sent_bytes} "
        f"fleet_vs_grpc={fleet_ms / list_ms:.2f} run_vs_grpc={run_ms / get_ms:.2f}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="50 runs, a run of 100 epochs, 3 rounds (seconds)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="trainctl-bench-console-"))
    try:
        return run_bench(SMALL if args.small else FULL, tmp)
    except BenchError as exc:
        print(f"bench-console: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-console: interrupted; server and console stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
