"""Several real server replicas on ONE store agree through the store alone.

PostgreSQL: replicas are real aio servers (tests/conftest.py ServerThread), each
with its own store and connection pool, on one database of this module on the
system server (tests/pg.py: skipped without it, failed with CI=true), emptied
for each test. SQLite: two `control-server serve` processes on one file.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import ServerProcess, ServerThread
from tests.integration.test_admin import (
    DEFAULT_VERSION,
    EAGER,
    EAGER_VERSION,
    LABELS,
    STREAM_DEADLINE,
    Trainer,
    struct,
)
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.sim import SimulatedRun

CALL_TIMEOUT = 10.0


@dataclass
class Replica:
    """A running server and stubs on a channel of its own."""

    server: ServerThread | ServerProcess
    channel: grpc.Channel
    control: pb_grpc.TrainingControlStub
    admin: pb_grpc.ControlAdminStub

    @classmethod
    def connect(cls, server: ServerThread | ServerProcess) -> Replica:
        channel = grpc.insecure_channel(server.target)
        return cls(
            server,
            channel,
            pb_grpc.TrainingControlStub(channel),
            pb_grpc.ControlAdminStub(channel),
        )


@pytest.fixture
def replicas(
    pg_url: str, make_server: Callable[..., ServerThread]
) -> Iterator[Callable[[int], list[Replica]]]:
    """Start n replicas on the PostgreSQL database (stopped by make_server)."""
    channels: list[grpc.Channel] = []

    def start(n: int) -> list[Replica]:
        started = [Replica.connect(make_server(store_url=pg_url)) for _ in range(n)]
        channels.extend(r.channel for r in started)
        return started

    yield start
    for channel in channels:
        channel.close()


def _key(decision: pb.Decision) -> bytes:
    return decision.SerializeToString(deterministic=True)


def _outcome(d: pb.Decision) -> tuple[object, ...]:
    """What a trainer acts on, and why (ids and times aside)."""
    return (
        d.epoch,
        d.action,
        d.source,
        round(d.lr, 12) if d.HasField("lr") else None,
        tuple(sorted(d.loss_weights.items())),
        d.intervention_index,
        d.reason,
        d.policy_version,
    )


def _race(
    replicas: list[Replica], runs: list[Trainer], epochs: range, copies: int
) -> dict[tuple[str, int], list[pb.Decision]]:
    """Send each run's report of each epoch `copies` times at once, spread over every
    replica; every run applies the answer before its next epoch, as a trainer would."""
    answers: dict[tuple[str, int], list[pb.Decision]] = defaultdict(list)
    with ThreadPoolExecutor(len(runs) * copies) as pool:
        for epoch in epochs:
            start = threading.Barrier(len(runs) * copies)

            def send(
                replica: Replica, report: pb.EpochReport, start: threading.Barrier = start
            ) -> pb.Decision:
                start.wait(CALL_TIMEOUT)
                return replica.control.ReportEpoch(report, timeout=CALL_TIMEOUT)

            futures = [
                (run, pool.submit(send, replicas[(i + c) % len(replicas)], run.report(epoch)))
                for i, run in enumerate(runs)
                for c in range(copies)
            ]
            for run, future in futures:
                answers[(run.run_id, epoch)].append(future.result(CALL_TIMEOUT * 2))
            for run in runs:
                run.apply(answers[(run.run_id, epoch)][0])
    return answers


# --- starting ---------------------------------------------------------------------------


def test_replicas_starting_together_on_an_empty_database_agree(
    make_server: Callable[..., ServerThread], pg_fresh_url: str
) -> None:
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda _: make_server(store_url=pg_fresh_url), range(3)))
    nodes = [Replica.connect(s) for s in servers]
    try:
        assert {s.running.policy_version for s in servers} == {DEFAULT_VERSION}
        assert {n.admin.GetPolicy(pb.GetPolicyRequest()).version for n in nodes} == {
            DEFAULT_VERSION
        }
        run = Trainer("run-first")
        answered = [run.apply(n.control.ReportEpoch(run.report(e))) for e, n in enumerate(nodes)]
        assert [d.epoch for d in answered] == [0, 1, 2]
    finally:
        for node in nodes:
            node.channel.close()
        for server in servers:
            server.stop()


# --- idempotency ------------------------------------------------------------------------


def test_one_decision_per_epoch_when_replicas_race(
    replicas: Callable[[int], list[Replica]],
) -> None:
    nodes = replicas(3)
    nodes[0].admin.PutPolicy(pb.PutPolicyRequest(document=struct(EAGER)))
    nodes[0].admin.ActivatePolicy(pb.ActivatePolicyRequest(version=EAGER_VERSION))
    runs = [Trainer(f"run-race-{i}") for i in range(3)]

    answers = _race(nodes, runs, range(8), copies=6)

    for (run_id, epoch), got in answers.items():
        assert len({_key(d) for d in got}) == 1, f"{run_id} epoch {epoch}: {got}"
    # Enforced by the database: one row per (run, epoch), whichever replica is asked.
    for node in nodes:
        listed = node.admin.ListDecisions(pb.ListDecisionsRequest(limit=1000)).decisions
        assert sorted((d.run_id, d.epoch) for d in listed) == sorted(answers)
    for run in runs:
        detail = nodes[1].admin.GetRun(pb.GetRunRequest(run_id=run.run_id))
        assert [e.decision.epoch for e in detail.epochs] == list(range(8))
        assert detail.run.report_count == 8
        indexes = [
            e.decision.intervention_index
            for e in detail.epochs
            if e.decision.action == pb.INTERVENE
        ]
        assert indexes == list(range(1, len(indexes) + 1)) and indexes  # never a second time


def test_sqlite_shared_by_two_server_processes_keeps_idempotency(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    servers = [ServerProcess("--store", f"sqlite:///{db}", cwd=tmp_path) for _ in range(2)]
    nodes = [Replica.connect(s) for s in servers]
    try:
        runs = [Trainer(f"run-file-{i}") for i in range(3)]
        answers = _race(nodes, runs, range(6), copies=4)
        for (run_id, epoch), got in answers.items():
            assert len({_key(d) for d in got}) == 1, f"{run_id} epoch {epoch}: {got}"
        listed = nodes[1].admin.ListDecisions(pb.ListDecisionsRequest(limit=1000)).decisions
        assert sorted((d.run_id, d.epoch) for d in listed) == sorted(answers)
    finally:
        for node in nodes:
            node.channel.close()
        for server in servers:
            code, output = server.terminate()
            assert code == 0, output


# --- operators' changes reach every replica ---------------------------------------------


def test_overrides_and_policy_changes_made_through_one_replica_apply_on_all(
    replicas: Callable[[int], list[Replica]],
) -> None:
    a, b, c = replicas(3)
    run = Trainer("run-ops")
    for epoch, node in enumerate((a, b)):
        assert run.apply(node.control.ReportEpoch(run.report(epoch))).policy_version == (
            DEFAULT_VERSION
        )

    # A once override set through A applies at the run's next report on B, once.
    override = a.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-ops", lr=0.02, once=True, exceed_lr_cap=True, reason="warm restart"
        )
    )
    report = run.report(2)
    applied = run.apply(b.control.ReportEpoch(report))
    assert (applied.source, applied.override_id) == (pb.OVERRIDE, override.override_id)
    assert c.control.ReportEpoch(report) == applied  # a retry, elsewhere
    assert run.apply(c.control.ReportEpoch(run.report(3))).source == pb.POLICY

    # A held override set through C holds on A until cleared through B.
    c.admin.SetOverride(pb.SetOverrideRequest(run_id="run-ops", lr=0.003, reason="hold"))
    held = run.apply(a.control.ReportEpoch(run.report(4)))
    assert (held.source, held.lr) == (pb.OVERRIDE, pytest.approx(0.003))
    assert [o.reason for o in a.admin.ListOverrides(pb.ListOverridesRequest()).overrides] == [
        "hold"
    ]
    b.admin.ClearOverride(pb.ClearOverrideRequest(run_id="run-ops"))
    assert run.apply(a.control.ReportEpoch(run.report(5))).source == pb.POLICY

    # A version stored and activated through A decides the next reports on B and C.
    a.admin.PutPolicy(pb.PutPolicyRequest(document=struct(EAGER)))
    a.admin.ActivatePolicy(pb.ActivatePolicyRequest(version=EAGER_VERSION))
    assert run.apply(b.control.ReportEpoch(run.report(6))).policy_version == EAGER_VERSION
    assert run.apply(c.control.ReportEpoch(run.report(7))).policy_version == EAGER_VERSION
    for node in (a, b, c):
        assert node.admin.GetPolicy(pb.GetPolicyRequest()).version == EAGER_VERSION

    # A pin made through B decides matching runs on C; others keep the active version.
    b.admin.ActivatePolicy(pb.ActivatePolicyRequest(version=DEFAULT_VERSION))
    b.admin.PinPolicy(
        pb.PinPolicyRequest(version=EAGER_VERSION, selector=pb.RunSelector(dataset=LABELS.dataset))
    )
    pinned = Trainer("run-pinned")
    other = Trainer("run-other", labels=pb.RunLabels(dataset="Dataset007_Lung"))
    assert c.control.ReportEpoch(pinned.report(0)).policy_version == EAGER_VERSION
    assert a.control.ReportEpoch(other.report(0)).policy_version == DEFAULT_VERSION


# --- the live tail ------------------------------------------------------------------------


def test_a_watch_on_one_replica_sees_every_decision_of_the_others(
    replicas: Callable[[int], list[Replica]],
) -> None:
    watcher, *writers = replicas(3)
    call = watcher.admin.WatchDecisions(pb.WatchDecisionsRequest(), timeout=STREAM_DEADLINE)
    try:
        call.initial_metadata()  # the watch is live
        runs = [Trainer(f"run-watched-{i}") for i in range(4)]

        def train(index: int) -> list[pb.Decision]:
            run, node = runs[index], writers[index % len(writers)]
            return [run.apply(node.control.ReportEpoch(run.report(e))) for e in range(6)]

        with ThreadPoolExecutor(len(runs)) as pool:
            made = [d for ds in pool.map(train, range(len(runs))) for d in ds]
        seen = [next(call) for _ in made]
    finally:
        call.cancel()
    assert sorted(_key(d) for d in seen) == sorted(_key(d) for d in made)
    for run in runs:  # each run's decisions arrive in its epoch order
        epochs = [d.epoch for d in seen if d.run_id == run.run_id]
        assert epochs == sorted(epochs)


# --- a run hopping between replicas --------------------------------------------------------


def _simulate(nodes: list[Replica], scenario: str, epochs: int) -> list[pb.Decision]:
    """A simulated run reporting each epoch to the next replica in turn."""
    run = SimulatedRun(f"run-hop-{scenario}", epochs=epochs, scenario=scenario, seed=7)
    decisions = []
    while not run.done:
        report = run.next_report()
        decision = nodes[report.epoch % len(nodes)].control.ReportEpoch(
            report, timeout=CALL_TIMEOUT
        )
        run.apply(decision)
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize("scenario", ["plateau", "collapse"])
def test_a_run_hopping_between_replicas_decides_as_on_one_server(
    scenario: str,
    replicas: Callable[[int], list[Replica]],
    make_server: Callable[..., ServerThread],
) -> None:
    hopping = _simulate(replicas(3), scenario, epochs=30)
    alone = Replica.connect(make_server())  # one server, its own SQLite store
    try:
        single = _simulate([alone], scenario, epochs=30)
    finally:
        alone.channel.close()

    assert [_outcome(d) for d in hopping] == [_outcome(d) for d in single]
    actions = {d.action for d in hopping}
    assert pb.INTERVENE in actions  # the comparison covers interventions ...
    if scenario == "collapse":
        assert pb.ROLLBACK in actions  # ... and the divergence guard
