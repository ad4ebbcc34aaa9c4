"""Faults, as tests: real servers killed, real databases stopped, real volumes broken.

Every test starts `control-server serve` as a subprocess on port 0 (its output
goes to a file, never to a pipe that could fill and stall it) and breaks
something real under it:

1. SIGKILL under load (SQLite and PostgreSQL): every decision a client received
   is in the store, the store passes its integrity check, and a restarted server
   serves on and answers retried reports with the recorded decisions.
2. PostgreSQL stopped, restarted or crashed (a private server, tests/pg.py):
   UNAVAILABLE while it is away, never a decision that was not stored, and the
   control server serves again by itself once the database is back.
3. SQLite volumes, real small filesystems mounted for the test (chmod does not
   stop root): a full tmpfs; an ext4 volume that the kernel turns read-only under
   the running server (errors=remount-ro, an error triggered through sysfs); and a
   store on a volume that is read-only when the server starts. Linux refuses to
   remount a volume read-only by hand while a process holds a file on it open for
   writing (EBUSY), hence the ext4 error. Each answers UNAVAILABLE (or refuses to
   start) with a message that says why, loses and corrupts nothing, and serves
   again once there is room or the volume is writable (after a repair, for ext4).
4. The store lost under a running server, and what the health service says: a
   SQLite directory deleted (UNAVAILABLE, NOT_SERVING, and a restart that says
   loudly it starts an empty store); a PostgreSQL connection cut or stalled
   through a TCP proxy (NOT_SERVING while it lasts, SERVING once writes work).

Clients are told "store unavailable" and nothing more (no path, no URL, no
password); the cause is in the server's log, credentials masked.

Without root (mount) these volume tests skip; without PostgreSQL its tests skip,
or fail when CI=true.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_server.domain import DecisionFilter
from control_server.store import open_store
from tests.conftest import REPO
from tests.factories import epoch_report
from tests.integration.test_cli import cli
from tests.pg import PrivatePostgres
from tests.tcp_proxy import TcpProxy
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

#: Seconds a server gets to print its "serving on" line.
START_TIMEOUT_S = 30
#: Deadline of every call in these tests.
CALL_TIMEOUT_S = 5
#: Client threads of the load, one run each.
LOAD_RUNS = 6
#: Decisions the load must have received before the server is killed.
LOAD_DECISIONS = 200
#: Seconds the server gets to serve again once the database is back.
RECOVERY_S = 30
#: Deadline of a call while the database is down (the store waits ~1 s for a connection).
OUTAGE_CALL_TIMEOUT_S = 15
SERVING = re.compile(r"control-server: serving on [^:]+:(\d+)")


# --- a server subprocess --------------------------------------------------------------


def _running_in_group(pgid: int) -> bool:
    """Whether a process of group `pgid` has not exited yet (zombies have: their files
    are closed)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class Served:
    """`control-server serve --listen 127.0.0.1:0 --store URL` as a subprocess."""

    _count = 0

    def __init__(self, store_url: str, home: Path, *args: str) -> None:
        Served._count += 1
        self.log = home / f"server-{Served._count}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "control_server.cli",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--store",
                    store_url,
                    *args,
                ],
                cwd=home,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,  # kill() takes the server and its decider together
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while (match := SERVING.search(self.output())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{match.group(1)}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the server and its decider process (a crashed container): no
        drain, no commit of what is queued, no close."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        # The decider child gets the SIGKILL too, but may still be exiting, its files
        # open (a remount would find them busy): wait until none of the group runs.
        deadline = time.monotonic() + 20
        while _running_in_group(self.proc.pid):
            assert time.monotonic() < deadline, f"group {self.proc.pid} outlived SIGKILL"
            time.sleep(0.02)

    def terminate(self) -> tuple[int, str]:
        """SIGTERM (a clean stop); return the exit code and the whole output."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        return code, self.output()


@pytest.fixture
def servers() -> Iterator[list[Served]]:
    """Servers a test starts; whatever is still running at the end is killed."""
    started: list[Served] = []
    yield started
    for server in started:
        server.kill()


def serve(servers: list[Served], store_url: str, home: Path, *args: str) -> Served:
    server = Served(store_url, home, *args)
    servers.append(server)
    return server


# --- load -----------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads reporting epochs as fast as they can, one run each, until
    `stop` is set or a call fails (with `retry_unavailable`, one that failed with
    UNAVAILABLE is sent again instead, as a trainer would next epoch).

    Records every decision a client received and the last epoch each run sent
    (which may have been decided and stored without its answer arriving).
    """

    target: str
    runs: list[str]
    retry_unavailable: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    received: dict[tuple[str, int], str] = field(default_factory=dict)
    last_sent: dict[str, int] = field(default_factory=dict)
    #: Codes of the calls that ended a thread.
    failures: list[grpc.StatusCode] = field(default_factory=list)
    #: UNAVAILABLE answers that were retried.
    retried: int = 0
    #: Answers that were not for the report sent.
    wrong: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _paused: bool = False
    _in_flight: int = 0

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(r,)) for r in self.runs]
        for thread in self._threads:
            thread.start()

    def _run(self, run_id: str) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.TrainingControlStub(channel)
            epoch = 0
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                with self._lock:
                    go = not self._paused
                    self._in_flight += go
                if not go:
                    self.stop.wait(0.01)
                    continue
                self.last_sent[run_id] = epoch
                try:
                    decision = stub.ReportEpoch(epoch_report(run_id, epoch), timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as error:
                    if self.retry_unavailable and error.code() == grpc.StatusCode.UNAVAILABLE:
                        with self._lock:
                            self.retried += 1
                        self.stop.wait(0.05)
                        continue
                    with self._lock:
                        self.failures.append(error.code())
                    return
                finally:
                    with self._lock:
                        self._in_flight -= 1
                with self._lock:
                    if (decision.run_id, decision.epoch) != (run_id, epoch):
                        self.wrong.append(f"{run_id}/{epoch}: {decision}")
                        return
                    self.received[(run_id, epoch)] = decision.decision_id
                epoch += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No call in flight for the body of the ``with`` (the calls in flight end first).

        gRPC cannot fork while threads are inside calls ("Other threads are currently
        calling into gRPC, skipping fork() handlers"): the child may die before its
        exec. Starting a process (PrivatePostgres.start) from this one needs a pause.
        """
        with self._lock:
            self._paused = True
        deadline = time.monotonic() + 2 * OUTAGE_CALL_TIMEOUT_S
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self._in_flight == 0, "a load call hangs"
        try:
            yield
        finally:
            with self._lock:
                self._paused = False

    def wait_for(self, decisions: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < decisions and time.monotonic() < deadline:
            if not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.01)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def received_epochs(self, run_id: str) -> list[int]:
        return sorted(epoch for run, epoch in self.received if run == run_id)


# --- the store, seen from outside the server ------------------------------------------


def stored_decisions(store_url: str) -> dict[tuple[str, int], str]:
    """(run_id, epoch) -> decision_id of every stored decision, after the store's
    own integrity check passed."""
    store = open_store(store_url)
    try:
        store.check_integrity()
        return {
            (d.run_id, d.epoch): d.decision_id
            for d in store.list_decisions(DecisionFilter(limit=0))
        }
    finally:
        store.close()


def sqlite_read_only(path: Path) -> dict[tuple[str, int], str]:
    """Like `stored_decisions`, through a read-only connection (for read-only volumes):
    SQLite's `PRAGMA integrity_check` and `foreign_key_check` must pass."""
    # Without a WAL the file alone is the database; SQLite then needs to create the
    # -shm to read it, which a read-only volume refuses, unless told it is immutable.
    immutable = "" if Path(f"{path}-wal").exists() else "&immutable=1"
    db = sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True)
    try:
        assert [r[0] for r in db.execute("PRAGMA integrity_check")] == ["ok"]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = db.execute("SELECT run_id, epoch, decision_id FROM decisions").fetchall()
    finally:
        db.close()
    return {(run, epoch): decision_id for run, epoch, decision_id in rows}


def call(stub: pb_grpc.TrainingControlStub, run_id: str, epoch: int) -> pb.Decision:
    decision = stub.ReportEpoch(epoch_report(run_id, epoch), timeout=CALL_TIMEOUT_S)
    assert (decision.run_id, decision.epoch) == (run_id, epoch)
    return decision


def refused(stub: pb_grpc.TrainingControlStub, run_id: str, epoch: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stub.ReportEpoch(epoch_report(run_id, epoch), timeout=CALL_TIMEOUT_S)
    return error.value


def assert_received_are_stored(load: Load, stored: dict[tuple[str, int], str]) -> None:
    """Every decision a client received is stored under the same id, and each run's
    record is gap-free: what it was told, and perhaps the report it sent last, whose
    answer never came (a commit may succeed while its answer is lost)."""
    lost = {k: v for k, v in load.received.items() if stored.get(k) != v}
    assert not lost, f"{len(lost)} received decisions are not stored, e.g. {next(iter(lost))}"
    for run in load.runs:
        epochs = sorted(epoch for r, epoch in stored if r == run)
        answered = load.received_epochs(run)
        assert epochs in (answered, [*answered, load.last_sent[run]]), run


# --- 1. SIGKILL under load --------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store of each backend (PostgreSQL: a new database on the
    system server; skipped without it, failed with CI=true)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/control.db"
        return
    yield request.getfixturevalue("pg_fresh_url")


def test_sigkill_under_load_keeps_every_received_decision_and_a_restart_serves_on(
    store_url: str, tmp_path: Path, servers: list[Served]
) -> None:
    server = serve(servers, store_url, tmp_path)
    load = Load(server.target, [f"kill-{i}" for i in range(LOAD_RUNS)])
    load.start()
    try:
        load.wait_for(LOAD_DECISIONS, timeout=30)
    finally:
        server.kill()
        load.join(timeout=3 * CALL_TIMEOUT_S)
    assert len(load.received) >= LOAD_DECISIONS, server.output()
    assert not load.wrong
    # Every client saw the server go away, and nothing else.
    assert len(load.failures) == LOAD_RUNS
    assert set(load.failures) == {grpc.StatusCode.UNAVAILABLE}

    stored = stored_decisions(store_url)
    assert_received_are_stored(load, stored)

    again = serve(servers, store_url, tmp_path)
    with grpc.insecure_channel(again.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        after: dict[tuple[str, int], str] = {}
        for run in load.runs:
            last = load.received_epochs(run)[-1]
            assert call(stub, run, last).decision_id == load.received[(run, last)]
            cut_off = load.last_sent[run]
            retried = call(stub, run, cut_off).decision_id
            if (run, cut_off) in stored:
                assert retried == stored[(run, cut_off)]
            after[(run, cut_off)] = retried
            after[(run, cut_off + 1)] = call(stub, run, cut_off + 1).decision_id
    code, output = again.terminate()
    assert code == 0, output
    stored = stored_decisions(store_url)
    assert {k: stored.get(k) for k in after} == after


# --- 2. PostgreSQL restarted or unreachable -------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this module's own, to stop, kill and restart at will."""
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture
def pg_url(private_pg: PrivatePostgres) -> str:
    """A new database on the private server (started, should a test have left it down)."""
    private_pg.start()
    return private_pg.create_database()


def until_served(
    stub: pb_grpc.TrainingControlStub, run_id: str, epoch: int
) -> tuple[pb.Decision, int]:
    """Report until a decision comes back; every answer before it must be UNAVAILABLE.
    Returns the decision and how many UNAVAILABLE answers it took."""
    deadline = time.monotonic() + RECOVERY_S
    for attempt in range(10_000):
        try:
            decision = stub.ReportEpoch(epoch_report(run_id, epoch), timeout=OUTAGE_CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert time.monotonic() < deadline, f"not served {RECOVERY_S}s after: {error}"
            time.sleep(0.1)
            continue
        assert (decision.run_id, decision.epoch) == (run_id, epoch)
        return decision, attempt
    raise AssertionError("unreachable")


def test_postgres_down_answers_unavailable_and_the_server_recovers_by_itself(
    private_pg: PrivatePostgres, pg_url: str, servers: list[Served], tmp_path: Path
) -> None:
    server = serve(servers, pg_url, tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        answered = {("pg", e): call(stub, "pg", e).decision_id for e in range(3)}

        private_pg.stop("fast")
        for run_id, epoch in (("pg", 3), ("pg-lost", 0)):
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as down:
                stub.ReportEpoch(epoch_report(run_id, epoch), timeout=OUTAGE_CALL_TIMEOUT_S)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value
            assert down.value.details() == "store unavailable"
            assert time.monotonic() - began < OUTAGE_CALL_TIMEOUT_S
        # A retried report of a stored epoch cannot be confirmed either: UNAVAILABLE.
        assert refused(stub, "pg", 2).code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.poll() is None, "the server died with its database"

        private_pg.start()
        decision, _ = until_served(stub, "pg", 3)
        answered[("pg", 3)] = decision.decision_id
        answered[("pg", 4)] = call(stub, "pg", 4).decision_id
        assert call(stub, "pg", 2).decision_id == answered[("pg", 2)]
    assert server.proc.poll() is None, "recovering took a restart of the control server"
    code, output = server.terminate()
    assert code == 0, output
    assert "UNAVAILABLE: postgresql store" in output  # the cause, in the server's log
    # What got UNAVAILABLE and was never retried was not decided behind the client's back.
    assert stored_decisions(pg_url) == answered


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_postgres_restarted_under_load_keeps_every_received_decision(
    how: str, private_pg: PrivatePostgres, pg_url: str, servers: list[Served], tmp_path: Path
) -> None:
    server = serve(servers, pg_url, tmp_path)
    load = Load(server.target, [f"{how}-{i}" for i in range(LOAD_RUNS)], retry_unavailable=True)
    load.start()
    try:
        load.wait_for(LOAD_DECISIONS // 2, timeout=30)
        before = len(load.received)
        assert before >= LOAD_DECISIONS // 2, server.output()
        if how == "restart":
            private_pg.stop("fast")  # sessions are terminated, transactions rolled back
        else:
            private_pg.kill()  # the postmaster and its backends die; start() recovers
        with load.paused():  # while it forks the new postmaster
            private_pg.start()
        # Served again without a restart of the control server.
        load.wait_for(before + LOAD_DECISIONS // 2, timeout=RECOVERY_S)
        assert len(load.received) >= before + LOAD_DECISIONS // 2, server.output()
    finally:
        load.stop.set()
        load.join(timeout=3 * CALL_TIMEOUT_S)
    assert not load.wrong
    assert load.failures == [], "only UNAVAILABLE may answer while the database is away"
    assert server.proc.poll() is None
    code, output = server.terminate()
    assert code == 0, output
    assert_received_are_stored(load, stored_decisions(pg_url))


# --- 3. read-only and full SQLite volumes ---------------------------------------------


def sh(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@dataclass
class Volume:
    """A small filesystem mounted for one test: a real volume that fills up and
    turns read-only (chmod does not stop root, and tests run as root in CI)."""

    path: Path
    image: Path | None = None
    filler: Path | None = None

    def remount(self, *, read_only: bool) -> None:
        result = sh("mount", "-o", "remount," + ("ro" if read_only else "rw"), str(self.path))
        assert result.returncode == 0, result.stderr

    def fill(self) -> None:
        """Take every free byte with one file."""
        self.filler = self.path / "filler"
        with self.filler.open("wb", buffering=0) as out:
            for chunk in (1 << 16, 1 << 12, 1 << 9):
                for _ in range(10_000):  # bounded: a few MiB at most
                    try:
                        out.write(b"\0" * chunk)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC, error
                        break
        assert os.statvfs(self.path).f_bavail == 0, "the volume still has room"

    def free(self) -> None:
        assert self.filler is not None
        self.filler.unlink()
        self.filler = None

    def fail(self) -> None:
        """An ext4 error under a running server: the kernel remounts the volume
        read-only at once (errors=remount-ro), files open for writing or not."""
        assert self.image is not None
        device = sh("findmnt", "-n", "-o", "SOURCE", str(self.path)).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        trigger.write_text("test_faults: simulated ext4 error\n")
        with pytest.raises(OSError) as refused:
            (self.path / "probe").write_bytes(b"")
        assert refused.value.errno == errno.EROFS

    def repair(self) -> None:
        """What an operator does next: unmount, fsck, mount again."""
        assert self.image is not None
        assert sh("umount", str(self.path)).returncode == 0
        fsck = sh("e2fsck", "-f", "-y", str(self.image))
        assert fsck.returncode < 4, fsck.stdout + fsck.stderr  # 1, 2: errors corrected
        mounted = sh("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.path))
        assert mounted.returncode == 0, mounted.stderr


def _mount_or_skip(path: Path, *command: str) -> None:
    try:
        result = sh(*command)
    except FileNotFoundError as error:
        pytest.skip(f"cannot mount a test volume here: {error}")
    if result.returncode != 0:
        pytest.skip(
            "mounting a small test volume needs root with CAP_SYS_ADMIN (and loop devices "
            f"for ext4): {' '.join(command)}: {result.stderr.strip()}"
        )


def _unmount(path: Path) -> None:
    if sh("umount", str(path)).returncode != 0:
        sh("umount", "-l", str(path))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Volume]:
    """A 2 MiB tmpfs."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    _mount_or_skip(path, "mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(path))
    try:
        yield Volume(path)
    finally:
        _unmount(path)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Volume]:
    """A 16 MiB ext4 filesystem on a loop device, mounted with errors=remount-ro."""
    path, image = tmp_path / "ext4", tmp_path / "ext4.img"
    path.mkdir()
    with image.open("wb") as out:
        out.truncate(16 * 1024 * 1024)
    made = sh("mkfs.ext4", "-q", "-F", str(image)) if shutil.which("mkfs.ext4") else None
    if made is None or made.returncode != 0:
        pytest.skip("no mkfs.ext4 here to make a test volume")
    _mount_or_skip(path, "mount", "-o", "loop,errors=remount-ro", str(image), str(path))
    try:
        device = sh("findmnt", "-n", "-o", "SOURCE", str(path)).stdout.strip()
        if not (Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error").exists():
            pytest.skip(f"this kernel has no /sys/fs/ext4/{Path(device).name}/trigger_fs_error")
        yield Volume(path, image=image)
    finally:
        _unmount(path)


def test_a_full_volume_answers_unavailable_keeps_the_store_intact_and_serves_again(
    tmpfs: Volume, servers: list[Served], tmp_path: Path
) -> None:
    db = tmpfs.path / "control.db"
    server = serve(servers, f"sqlite:///{db}", tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        answered = {("full", e): call(stub, "full", e).decision_id for e in range(5)}

        tmpfs.fill()
        failure: grpc.RpcError | None = None
        epoch = 5
        for epoch in range(5, 505):  # a WAL page or two per report: full within a few
            try:
                answered[("full", epoch)] = call(stub, "full", epoch).decision_id
            except grpc.RpcError as error:
                failure = error
                break
        assert failure is not None, "reports kept being stored on a full volume"
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        assert failure.details() == "store unavailable"
        assert server.proc.poll() is None, "the server died on a full volume"
        assert refused(stub, "full", epoch).code() == grpc.StatusCode.UNAVAILABLE

        # Nothing stored is lost or corrupted; the refused report left no trace.
        assert sqlite_read_only(db) == answered

        tmpfs.free()
        answered[("full", epoch)] = call(stub, "full", epoch).decision_id
        answered[("full", epoch + 1)] = call(stub, "full", epoch + 1).decision_id
    code, output = server.terminate()
    assert code == 0, output
    assert "Traceback" not in output
    assert "(the volume holding it is full;" in output
    assert stored_decisions(f"sqlite:///{db}") == answered


def test_a_volume_turning_read_only_under_a_running_server_answers_unavailable(
    ext4: Volume, servers: list[Served], tmp_path: Path
) -> None:
    db = ext4.path / "control.db"
    url = f"sqlite:///{db}"
    server = serve(servers, url, tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        answered = {("ro", e): call(stub, "ro", e).decision_id for e in range(5)}

        ext4.fail()
        for epoch in (5, 6):
            error = refused(stub, "ro", epoch)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == "store unavailable"
        # A retried report gets its recorded decision or UNAVAILABLE, nothing else.
        try:
            assert call(stub, "ro", 3).decision_id == answered[("ro", 3)]
        except grpc.RpcError as retry:
            assert retry.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.poll() is None, "the server died on a read-only volume"
        assert sqlite_read_only(db) == answered
    code, output = server.terminate()
    assert code == 0, output
    assert "Traceback" not in output
    assert "turned read-only" in output

    ext4.repair()
    again = serve(servers, url, tmp_path)
    with grpc.insecure_channel(again.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        assert call(stub, "ro", 4).decision_id == answered[("ro", 4)]
        answered[("ro", 5)] = call(stub, "ro", 5).decision_id
    code, output = again.terminate()
    assert code == 0, output
    assert stored_decisions(url) == answered


@pytest.mark.parametrize("left", ["stopped", "crashed"])
def test_a_store_on_a_read_only_volume_refuses_to_serve_clearly_and_replays(
    left: str, tmpfs: Volume, servers: list[Served], tmp_path: Path
) -> None:
    db = tmpfs.path / "control.db"
    url = f"sqlite:///{db}"
    first = serve(servers, url, tmp_path)
    with grpc.insecure_channel(first.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        answered = {("ro", e): call(stub, "ro", e).decision_id for e in range(3)}
    if left == "crashed":
        first.kill()  # the WAL, holding the decisions, stays beside the database
        assert Path(f"{db}-wal").exists()
    else:
        code, output = first.terminate()
        assert code == 0, output

    tmpfs.remount(read_only=True)
    start = cli("serve", "--listen", "127.0.0.1:0", "--store", url, cwd=tmp_path)
    assert start.returncode == 2, start.stdout + start.stderr
    assert "mounted read-only" in start.stderr, start.stderr
    assert "Traceback" not in start.stderr
    assert sqlite_read_only(db) == answered
    # Replay only reads: it works on the read-only volume (the audit of a copy).
    replay = cli("replay", "--store", url, cwd=tmp_path)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replay: 1 runs, 3 decisions, 0 differ from the record" in replay.stdout

    tmpfs.remount(read_only=False)
    server = serve(servers, url, tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        assert call(stub, "ro", 2).decision_id == answered[("ro", 2)]
        answered[("ro", 3)] = call(stub, "ro", 3).decision_id
    code, output = server.terminate()
    assert code == 0, output
    assert stored_decisions(url) == answered


# --- 4. the store lost under a running server; health --------------------------------

#: Seconds the health service gets to follow the store (probes every 2 s).
HEALTH_S = 20
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def until_health(channel: grpc.Channel, status: int) -> None:
    """Wait until grpc.health.v1 answers `status` for the server as a whole."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + HEALTH_S
    while True:
        now = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        if now.status == status:
            return
        assert time.monotonic() < deadline, f"health {now.status} after {HEALTH_S} s"
        time.sleep(0.1)


def test_a_sqlite_directory_deleted_under_a_running_server_stops_it_recording_and_serving(
    servers: list[Served], tmp_path: Path
) -> None:
    folder = tmp_path / "var"
    db = folder / "control.db"
    url = f"sqlite:///{db}"
    server = serve(servers, url, tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainingControlStub(channel)
        call(stub, "gone", 0)
        until_health(channel, _SERVING)

        shutil.rmtree(folder)
        for epoch in (1, 0):  # a new epoch, and a retry of the recorded one
            error = refused(stub, "gone", epoch)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == "store unavailable"
        admin = pb_grpc.ControlAdminStub(channel)
        with pytest.raises(grpc.RpcError) as override:
            admin.SetOverride(
                pb.SetOverrideRequest(run_id="gone", hold_interventions=True),
                timeout=CALL_TIMEOUT_S,
            )
        assert override.value.code() == grpc.StatusCode.UNAVAILABLE
        assert override.value.details() == "store unavailable"
        until_health(channel, _NOT_SERVING)
        assert not folder.exists(), "the server made a new store where the old one was"
    code, output = server.terminate()
    assert code == 0, output
    assert f"sqlite store {db}: the database file was deleted while the server was running" in (
        output
    )
    assert "health NOT_SERVING" in output

    # A restart on the same URL starts an empty store, and says so loudly.
    again = serve(servers, url, tmp_path)
    warnings = [line for line in again.output().splitlines() if " WARNING " in line]
    assert any(f"sqlite store {db} does not exist" in w and "EMPTY" in w for w in warnings), (
        again.output()
    )


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_postgresql_store_cut_off_or_hung_is_not_serving_until_it_writes_again(
    fault: str, pg_fresh_url: str, servers: list[Served], tmp_path: Path
) -> None:
    host_port, _, database = pg_fresh_url.rpartition("/")
    port = int(host_port.rpartition(":")[2])
    # Passwords in both places a URL can carry one (the test server trusts and ignores them).
    user_password, query_password = "Us3rPassw0rd", "Qu3ryPassw0rd"
    with TcpProxy(port) as proxy:
        url = (
            f"postgresql://postgres:{user_password}@127.0.0.1:{proxy.port}/{database}"
            f"?password={query_password}"
        )
        server = serve(servers, url, tmp_path)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TrainingControlStub(channel)
            answered = {("pg", 0): call(stub, "pg", 0).decision_id}
            until_health(channel, _SERVING)

            proxy.cut() if fault == "cut" else proxy.stall()
            until_health(channel, _NOT_SERVING)
            if fault == "cut":
                error = refused(stub, "pg", 1)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert error.details() == "store unavailable"
            assert server.proc.poll() is None

            proxy.restore()
            until_health(channel, _SERVING)
            decision, _ = until_served(stub, "pg", 1)
            answered[("pg", 1)] = decision.decision_id
        code, output = server.terminate()
    assert code == 0, output
    assert "health NOT_SERVING: the store cannot write" in output
    assert "health SERVING: the store takes writes again" in output
    assert user_password not in output and query_password not in output
    assert f"postgres:***@127.0.0.1:{proxy.port}/{database}?password=***" in output
    assert stored_decisions(pg_fresh_url) == answered
