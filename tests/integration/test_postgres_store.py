"""What only the PostgreSQL backend does: migrations under a lock, a commit-ordered
watch cursor, per-run locks across replicas, and a database that goes away.

The contract itself runs in test_store_contract.py. These tests use the system
server (tests/pg.py: skipped without it, failed with CI=true) and, for outages,
a private server of their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.pg import PrivatePostgres, in_ci, system_admin_url

try:
    import psycopg
except ImportError:  # pragma: no cover - psycopg is in [dev]
    if in_ci():
        raise
    pytest.skip("psycopg is not installed (pip install -e '.[postgres]')", allow_module_level=True)

from control_server.domain import (
    Decision,
    DecisionFilter,
    DecisionRecord,
    Report,
    RunContext,
    StoreUnavailable,
)
from control_server.store import PostgresStore, open_store
from control_server.store.factory import redact_url
from control_server.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, load_migrations
from tests.conftest import ServerThread
from tests.factories import epoch_report, make_record, make_report
from tests.integration.test_cli import cli
from tests.integration.test_sqlite_store import SHIPPED
from trainer_client.api import control_pb2_grpc as pb_grpc


@pytest.fixture
def stores(pg_url: str) -> Iterator[Callable[[], PostgresStore]]:
    """Open stores on `pg_url` (as replicas would); all closed at the end."""
    opened: list[PostgresStore] = []

    def open_one() -> PostgresStore:
        store = PostgresStore(pg_url)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


def _raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def _copy(source: Any, folder: Path, *, upto: int | None = None) -> Path:
    folder.mkdir()
    for level, (name, sql) in enumerate(load_migrations(source), 1):
        if upto is None or level <= upto:
            (folder / name).write_text(sql, encoding="utf-8")
    return folder


# --- migrations -------------------------------------------------------------------------


def test_both_dialects_ship_the_same_migration_levels() -> None:
    sqlite = [name for name, _ in load_migrations(SQLITE_MIGRATIONS)]
    postgres = [name for name, _ in load_migrations(POSTGRES_MIGRATIONS)]
    assert sqlite == postgres == [name for _, name in SHIPPED]


def test_replicas_starting_together_migrate_once(pg_fresh_url: str) -> None:
    start = threading.Barrier(4)

    def open_one(_: int) -> int:
        start.wait()
        store = PostgresStore(pg_fresh_url)
        try:
            return store.schema_version()
        finally:
            store.close()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(open_one, range(4))) == [len(SHIPPED)] * 4
    assert (
        _raw(pg_fresh_url, "SELECT version, name FROM schema_version ORDER BY version") == SHIPPED
    )


def test_a_newer_schema_is_refused(pg_fresh_url: str) -> None:
    PostgresStore(pg_fresh_url).close()
    latest = len(SHIPPED)
    _raw(pg_fresh_url, "INSERT INTO schema_version VALUES (%s, 'future.sql', now())", (latest + 1,))
    with pytest.raises(
        StoreUnavailable, match=rf"schema version {latest + 1} is newer .* knows \({latest}\)"
    ):
        PostgresStore(pg_fresh_url)


def test_a_later_migration_is_applied_once_and_a_failing_one_changes_nothing(
    pg_fresh_url: str, tmp_path: Path
) -> None:
    only_first = _copy(POSTGRES_MIGRATIONS, tmp_path / "only-0001", upto=1)
    PostgresStore(pg_fresh_url, migrations=only_first).close()
    # What a 0001 server wrote: a run with two decided epochs.
    _raw(
        pg_fresh_url,
        "INSERT INTO runs (run_id, first_seen, last_seen, last_epoch, report_count, "
        "intervention_count, current_lr) VALUES ('run-a', now(), now(), 3, 2, 0, 0.01)",
    )
    for epoch in (0, 3):
        _raw(
            pg_fresh_url,
            "INSERT INTO reports (run_id, epoch, train_loss, intervention_count, current_lr, "
            "initial_lr, loss_weights) VALUES ('run-a', %s, 0.5, 0, 0.01, 0.01, '{}')",
            (epoch,),
        )
        _raw(
            pg_fresh_url,
            "INSERT INTO decisions (decision_id, run_id, epoch, action, source, reason, "
            "policy_version, decided_at, loss_weights, intervention_index, state) "
            "VALUES (%s, 'run-a', %s, 'NONE', 'POLICY', 'fine', 'v1', now(), '{}', 0, '{}')",
            (f"d-old-{epoch}", epoch),
        )

    store = PostgresStore(pg_fresh_url)  # the later migrations on a populated database
    try:
        assert store.schema_version() == len(SHIPPED)
        existing = store.load_context("run-a", 3).existing
        assert existing is not None and existing.previous_epoch == 0
        store.record_decisions([make_record("run-a", 4, previous_epoch=3)])
        store.check_integrity()
    finally:
        store.close()

    broken = _copy(POSTGRES_MIGRATIONS, tmp_path / "broken")
    (broken / f"{len(SHIPPED) + 1:04d}_broken.sql").write_text(
        "CREATE TABLE half_done (x integer);\nALTER TABLE no_such_table ADD COLUMN y integer;\n",
        encoding="utf-8",
    )
    with pytest.raises(StoreUnavailable, match="no_such_table"):
        PostgresStore(pg_fresh_url, migrations=broken)
    assert _raw(pg_fresh_url, "SELECT max(version) FROM schema_version") == [(len(SHIPPED),)]
    assert _raw(pg_fresh_url, "SELECT to_regclass('half_done')") == [(None,)]


# --- URLs ----------------------------------------------------------------------------


def test_url_spellings_and_a_password_kept_out_of_messages(pg_url: str) -> None:
    for scheme in ("postgres", "postgresql+psycopg"):
        store = open_store(pg_url.replace("postgresql", scheme, 1))
        try:
            assert isinstance(store, PostgresStore)
            assert store.schema_version() == len(SHIPPED)
        finally:
            store.close()
    assert redact_url("postgresql://tc:s3cret@db:5432/x") == "postgresql://tc:***@db:5432/x"
    assert redact_url("sqlite:///control.db") == "sqlite:///control.db"
    for url in (
        "postgresql://tc:s3cret@127.0.0.1:1/x",
        "postgresql://tc@127.0.0.1:1/x?password=s3cret",
        "host=127.0.0.1 port=1 user=tc password=s3cret dbname=x",
    ):
        with pytest.raises(StoreUnavailable) as refused:
            PostgresStore(url, open_timeout=0.5)
        assert "s3cret" not in str(refused.value) and "1" in str(refused.value)
        assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as malformed:
        open_store("postgresql://tc:s3cret@127.0.0.1/x?password=s3cret&bogus=1")
    assert "s3cret" not in str(malformed.value)


def test_serve_on_a_database_that_does_not_exist_says_so_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    where = psycopg.conninfo.conninfo_to_dict(pg_url)
    host, port, user = where.get("host", "127.0.0.1"), where.get("port", 5432), where["user"]
    url = f"postgresql://{user}:Us3rPassw0rd@{host}:{port}/nosuchdb_tc?password=Qu3ryPassw0rd"
    began = time.monotonic()
    result = cli("serve", "--listen", "127.0.0.1:0", "--store", url, cwd=tmp_path)
    took = time.monotonic() - began
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"control-server serve: postgresql store postgresql://{user}:***@{host}:{port}/"
        f'nosuchdb_tc?password=***: database "nosuchdb_tc" does not exist; create it with: '
        f"createdb -h {host} -p {port} -U {user} nosuchdb_tc"
    ], result.stderr
    assert took < 5, f"{took:.1f} s: the pool's retries were waited out"


def test_a_server_refused_by_its_database_says_why_at_once(pg_url: str, tmp_path: Path) -> None:
    where = psycopg.conninfo.conninfo_to_dict(pg_url)
    url = f"postgresql://no_such_role_tc:Us3rPassw0rd@{where.get('host', '127.0.0.1')}:" + (
        f"{where.get('port', 5432)}/{where['dbname']}"
    )
    result = cli("serve", "--listen", "127.0.0.1:0", "--store", url, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.endswith('role "no_such_role_tc" does not exist'), line
    assert "Us3rPassw0rd" not in line


# --- replicas on one database -----------------------------------------------------------


def _decide(report: Report, context: RunContext) -> DecisionRecord:
    record = make_record(report.run_id, report.epoch, previous_epoch=context.previous_epoch)
    return replace(record, report=report)


def test_watch_cursor_follows_commit_order_not_insert_order(
    stores: Callable[[], PostgresStore],
) -> None:
    first, second, watcher = stores(), stores(), stores()
    cursor = watcher.latest_decision_seq()
    inserted, release = threading.Event(), threading.Event()
    early, late = make_record("run-a", 0), make_record("run-b", 0)

    def slow_commit() -> None:
        with first.write_transaction():
            first.record_decisions([early])
            inserted.set()
            release.wait(10)

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(slow_commit)
        assert inserted.wait(10)
        fast = pool.submit(second.record_decisions, [late])
        time.sleep(0.3)
        # The later writer waits for the earlier one's commit; a watch sees neither yet.
        assert not fast.done()
        assert watcher.decisions_after(cursor, DecisionFilter(), 10).decisions == ()
        release.set()
        slow.result(10)
        assert fast.result(10) == [late.decision]
    page = watcher.decisions_after(cursor, DecisionFilter(), 10)
    assert page.decisions == (early.decision, late.decision)


def test_a_watch_never_misses_what_other_replicas_commit(
    stores: Callable[[], PostgresStore],
) -> None:
    writers = [stores() for _ in range(3)]
    watcher = stores()
    cursor = watcher.latest_decision_seq()
    done = threading.Event()
    seen: list[str] = []

    def write(index: int) -> list[str]:
        ids: list[str] = []
        for batch in range(15):
            records = [make_record(f"w{index}-b{batch}-{i}", 0) for i in range(1 + batch % 4)]
            writers[index].record_decisions(records)
            ids += [r.decision.decision_id for r in records]
        return ids

    def watch() -> None:
        nonlocal cursor
        while True:
            finished = done.is_set()
            page = watcher.decisions_after(cursor, DecisionFilter(), 7)
            seen.extend(d.decision_id for d in page.decisions)
            cursor = page.cursor
            if finished and not page.decisions:
                return

    with ThreadPoolExecutor(4) as pool:
        tail = pool.submit(watch)
        written = [pool.submit(write, i) for i in range(3)]
        expected = [i for w in written for i in w.result(30)]
        done.set()
        tail.result(30)
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == set(expected)


def test_replicas_serialise_read_decide_write_per_run(
    stores: Callable[[], PostgresStore],
) -> None:
    first, second = stores(), stores()
    deciding, release = threading.Event(), threading.Event()
    second_decided: list[Report] = []

    def slow_decide(report: Report, context: RunContext) -> DecisionRecord:
        deciding.set()
        release.wait(10)
        return _decide(report, context)

    def counted_decide(report: Report, context: RunContext) -> DecisionRecord | Decision:
        if context.existing is not None:
            return context.existing  # a retry: answered as recorded, not decided again
        second_decided.append(report)
        return _decide(report, context)

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(first.group_commit, [make_report("run-a", 5)], slow_decide)
        assert deciding.wait(10)
        waiting = pool.submit(
            second.group_commit,
            [make_report("run-a", 5), make_report("run-a", 6)],
            counted_decide,
        )
        time.sleep(0.3)
        assert not waiting.done()  # the run is locked by the first replica
        release.set()
        [stored] = held.result(10)
        retried, next_epoch = waiting.result(10)
    # The second replica read after the first committed: it got the stored decision
    # back for epoch 5 and continued from it for epoch 6.
    assert retried == stored
    assert [r.epoch for r in second_decided] == [6]
    assert not isinstance(next_epoch, Exception) and next_epoch.previous_epoch == 5


def test_replicas_locking_overlapping_runs_in_any_order_never_deadlock(
    stores: Callable[[], PostgresStore],
) -> None:
    replicas = [stores() for _ in range(3)]
    runs = [f"run-{i}" for i in range(8)]
    decided: dict[tuple[str, int], set[str]] = {}
    lock = threading.Lock()

    def replica(index: int) -> None:
        for epoch in range(6):
            order = runs if (index + epoch) % 2 else runs[::-1]
            outcomes = replicas[index].group_commit([make_report(r, epoch) for r in order], _decide)
            with lock:
                for run_id, outcome in zip(order, outcomes, strict=True):
                    assert not isinstance(outcome, Exception), outcome
                    decided.setdefault((run_id, epoch), set()).add(outcome.decision_id)

    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(replica, i) for i in range(3)]:
            future.result(60)
    # Every replica got the one decision stored for each (run, epoch).
    assert len(decided) == len(runs) * 6
    assert all(len(ids) == 1 for ids in decided.values())
    replicas[0].check_integrity()


# --- a database that goes away -------------------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    system_admin_url()  # same skip/fail rule as the shared server
    with PrivatePostgres() as pg:
        yield pg


def _eventually(call: Callable[[], Any], seconds: float = 15.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_an_unreachable_database_fails_calls_and_the_pool_reconnects(
    private_pg: PrivatePostgres,
) -> None:
    store = PostgresStore(private_pg.create_database())
    try:
        store.record_decisions([make_record("run-a", 0)])
        private_pg.restart()  # idle connections went stale: the next call must not notice
        assert store.load_context("run-a", 0).existing is not None

        private_pg.stop()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.record_decisions([make_record("run-a", 1)])
        assert time.monotonic() - began < 3  # the pool's timeout, not a TCP one
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.load_context("run-a", 1)
        assert time.monotonic() - began < 0.5  # known to be down: fail fast

        private_pg.start()
        stored = _eventually(lambda: store.record_decisions([make_record("run-a", 1)]))
        assert stored[0] is not None
        run = store.get_run("run-a")
        assert run is not None and [r.epoch for r, _ in run[1]] == [0, 1]
        store.check_integrity()
    finally:
        store.close()
        private_pg.start()


def test_report_epoch_is_unavailable_while_the_database_is_down(
    private_pg: PrivatePostgres, make_server: Callable[..., ServerThread]
) -> None:
    url = private_pg.create_database()
    server = make_server(store_url=url)
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.TrainingControlStub(channel)
    received = []
    try:
        received.append(stub.ReportEpoch(epoch_report("run-down", 0), timeout=5))
        private_pg.stop()
        for epoch in (1, 2):
            with pytest.raises(grpc.RpcError) as down:
                stub.ReportEpoch(epoch_report("run-down", epoch), timeout=5)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        private_pg.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                received.append(stub.ReportEpoch(epoch_report("run-down", 1), timeout=5))
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        received.append(stub.ReportEpoch(epoch_report("run-down", 2), timeout=5))
    finally:
        channel.close()
        private_pg.start()
    stored = {
        row[0]: row[1]
        for row in _raw(url, "SELECT epoch, decision_id FROM decisions WHERE run_id = 'run-down'")
    }
    # Every decision a client received is stored, and nothing else was.
    assert stored == {d.epoch: d.decision_id for d in received}


def test_a_replica_stuck_inside_a_transaction_does_not_block_the_others(
    pg_url: str,
) -> None:
    stuck = PostgresStore(pg_url, session_timeouts={"idle_in_transaction": 0.5})
    healthy = PostgresStore(pg_url)
    try:
        # Its session is ended under it (idle in a transaction too long) ...
        with pytest.raises(StoreUnavailable), stuck.write_transaction():
            stuck.record_decisions([make_record("run-stuck", 0)])  # holds the seq lock
            began = time.monotonic()
            # ... so another replica waiting for the lock meanwhile gets it.
            assert healthy.record_decisions([make_record("run-ok", 0)]) is not None
            assert time.monotonic() - began < 5
        assert healthy.load_context("run-stuck", 0).existing is None  # nothing of it stored
        assert stuck.load_context("run-ok", 0).existing is not None  # and it serves on
    finally:
        stuck.close()
        healthy.close()


def _set_autovacuum(admin_url: str, value: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET autovacuum = {value}")
        conn.execute("SELECT pg_reload_conf()")


def test_a_server_on_a_database_without_autovacuum_warns_at_start(
    private_pg: PrivatePostgres,
    make_server: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = private_pg.create_database()
    try:
        _set_autovacuum(private_pg.url, "off")
        with caplog.at_level("WARNING", logger="control_server.app"):
            make_server(store_url=url)
        warnings = [r.getMessage() for r in caplog.records if "autovacuum" in r.getMessage()]
        assert len(warnings) == 1
        assert "autovacuum is off" in warnings[0] and "VACUUM" in warnings[0]
        assert redact_url(url) in warnings[0]

        caplog.clear()
        _set_autovacuum(private_pg.url, "on")
        with caplog.at_level("WARNING", logger="control_server.app"):
            make_server(store_url=url)
        assert not [r for r in caplog.records if "autovacuum" in r.getMessage()]
    finally:
        _set_autovacuum(private_pg.url, "DEFAULT")


def test_read_only_does_not_migrate_an_older_schema(pg_fresh_url: str, tmp_path: Path) -> None:
    only_first = _copy(POSTGRES_MIGRATIONS, tmp_path / "only-0001", upto=1)
    PostgresStore(pg_fresh_url, migrations=only_first).close()
    with pytest.raises(StoreUnavailable, match=r"schema version 1 is older .* cannot be migrated"):
        PostgresStore(pg_fresh_url, read_only=True)
    assert _raw(pg_fresh_url, "SELECT version FROM schema_version") == [(1,)]
