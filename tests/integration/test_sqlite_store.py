"""What only the SQLite backend does: files, migrations, pragmas, several openers."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.domain import (
    DecisionFilter,
    Override,
    RunFilter,
    StoreUnavailable,
    frozen_map,
)
from control_server.store import SqliteStore, open_store
from control_server.store.sqlite import MIGRATIONS
from tests.factories import T0, make_record


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(db)
    yield opened
    opened.close()


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A private copy of the packaged migrations that a test may extend."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    for entry in MIGRATIONS.iterdir():
        if entry.name.endswith(".sql"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def _raw(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


SHIPPED = [
    (1, "0001_initial.sql"),
    (2, "0002_operators.sql"),
    (3, "0003_attempts.sql"),
    (4, "0004_override_actions.sql"),
    (5, "0005_chains.sql"),
    (6, "0006_experiments.sql"),
]
LATEST = len(SHIPPED)
#: The file name of a migration the package does not ship (a later one, in a test).
NEXT = f"{LATEST + 1:04d}"


def test_migrations_ship_with_the_package() -> None:
    for _, name in SHIPPED:
        assert MIGRATIONS.joinpath(name).is_file()


def test_pragmas(store: SqliteStore, db: Path) -> None:
    conn = store._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (5000,)
    assert _raw(db, "SELECT version, name FROM schema_version ORDER BY version") == SHIPPED


def test_data_survives_close_and_reopen(db: Path) -> None:
    first = open_store(f"sqlite:///{db}")
    record = make_record("run-a", 7)
    first.record_decisions([record])
    first.close()

    again = open_store(f"sqlite:///{db}")
    try:
        assert again.load_context("run-a", 7).existing == record.decision
        assert again.schema_version() == LATEST
    finally:
        again.close()


def test_a_newer_schema_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    _raw(
        db,
        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, 'x', 'now')",
        (LATEST + 1,),
    )
    with pytest.raises(
        StoreUnavailable, match=rf"schema version {LATEST + 1} is newer .* knows \({LATEST}\)"
    ):
        SqliteStore(db)


def test_a_second_migration_is_applied_once(db: Path, migrations: Path) -> None:
    old = SqliteStore(db)
    old.record_decisions([make_record("run-a", 0)])
    old.close()
    (migrations / f"{NEXT}_run_notes.sql").write_text(
        "-- a later change; semicolons in 'strings;' are fine\n"
        "ALTER TABLE runs ADD COLUMN note TEXT NOT NULL DEFAULT 'a;b';\n"
        "CREATE INDEX runs_by_note ON runs (note);\n",
        encoding="utf-8",
    )

    for _ in range(2):
        store = SqliteStore(db, migrations=migrations)
        try:
            assert store.schema_version() == LATEST + 1
            assert store.load_context("run-a", 0).existing is not None
        finally:
            store.close()
    assert _raw(db, "SELECT note FROM runs") == [("a;b",)]
    assert _raw(db, "SELECT version FROM schema_version ORDER BY version") == [
        (n,) for n in range(1, LATEST + 2)
    ]
    with pytest.raises(StoreUnavailable, match="newer"):
        SqliteStore(db)  # the packaged code knows only the shipped ones


def test_a_populated_0001_database_upgrades_to_the_operators_schema(
    db: Path, tmp_path: Path
) -> None:
    only_first = tmp_path / "only-0001"
    only_first.mkdir()
    (only_first / "0001_initial.sql").write_text(
        MIGRATIONS.joinpath("0001_initial.sql").read_text(encoding="utf-8"), encoding="utf-8"
    )
    SqliteStore(db, migrations=only_first).close()
    at = "2025-03-04T05:06:07.123456+00:00"
    # What a 0001 server wrote: a run, its report and decision, and an override.
    _raw(
        db,
        "INSERT INTO runs (run_id, first_seen, last_seen, last_epoch, report_count, "
        "intervention_count, current_lr) VALUES ('run-a', ?, ?, 3, 2, 0, 0.01)",
        (at, at),
    )
    for epoch in (0, 3):
        _raw(
            db,
            "INSERT INTO reports (run_id, epoch, train_loss, intervention_count, current_lr, "
            "initial_lr, loss_weights) VALUES ('run-a', ?, 0.5, 0, 0.01, 0.01, '{}')",
            (epoch,),
        )
        _raw(
            db,
            "INSERT INTO decisions (decision_id, run_id, epoch, action, source, reason, "
            "policy_version, decided_at, lr, loss_weights, intervention_index, state) "
            "VALUES (?, 'run-a', ?, 'NONE', 'POLICY', 'fine', 'v1', ?, NULL, '{}', 0, '{}')",
            (f"d-old-{epoch}", epoch, at),
        )
    _raw(
        db,
        "INSERT INTO overrides (run_id, actor, reason, lr, weights, hold, once, created_at) "
        "VALUES ('run-a', 'alice', 'old', 0.1, '{}', 0, 0, ?)",
        (at,),
    )

    store = SqliteStore(db)
    try:
        assert store.schema_version() == LATEST
        existing = store.load_context("run-a", 3).existing
        assert existing is not None
        assert (existing.decision_id, existing.override_id, existing.decided_at) == (
            "d-old-3",
            None,
            T0,
        )
        # Old decisions continued from their predecessor in epoch order.
        assert existing.previous_epoch == 0
        assert store.load_context("run-a", 4).previous_epoch == 3
        [override] = store.list_overrides("run-a")
        assert (override.override_id, override.actor, override.cleared_by) == (1, "alice", "")
        page = store.decisions_after(0, DecisionFilter(), 10)
        assert [d.decision_id for d in page.decisions] == ["d-old-0", "d-old-3"]
        assert page.decisions[0].previous_epoch is None
        store.record_decisions([make_record("run-a", 4)])
        store.check_integrity()
    finally:
        store.close()


def test_a_failing_migration_changes_nothing(db: Path, migrations: Path) -> None:
    SqliteStore(db).close()
    (migrations / f"{NEXT}_broken.sql").write_text(
        "CREATE TABLE half_done (x INTEGER);\nALTER TABLE no_such_table ADD COLUMN y;\n",
        encoding="utf-8",
    )
    with pytest.raises(StoreUnavailable, match="no_such_table"):
        SqliteStore(db, migrations=migrations)
    assert _raw(db, "SELECT max(version) FROM schema_version") == [(LATEST,)]
    assert _raw(db, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


def test_numbering_gaps_are_refused(db: Path, migrations: Path) -> None:
    (migrations / f"{LATEST + 2:04d}_skips_one.sql").write_text("SELECT 1;", encoding="utf-8")
    with pytest.raises(RuntimeError, match="without gaps"):
        SqliteStore(db, migrations=migrations)


def test_a_failing_batch_stores_nothing(store: SqliteStore) -> None:
    stored = make_record("run-a", 0)
    store.record_decisions([stored])
    fresh = make_record("run-b", 0)
    # Same decision_id for another (run, epoch): the primary key fails mid-batch.
    clash = make_record("run-a", 1, decision_id=stored.decision.decision_id)

    with pytest.raises(StoreUnavailable, match=r"UNIQUE constraint failed: decisions\.decision_id"):
        store.record_decisions([fresh, clash])

    assert store.run_ids() == ["run-a"]
    assert store.load_context("run-b", 0).existing is None
    run = store.get_run("run-a")
    assert run is not None and run[0].report_count == 1
    assert store.record_decisions([fresh]) == [fresh.decision]


def test_a_read_only_database_refuses_the_whole_batch(store: SqliteStore) -> None:
    conn = store._connection()  # this thread's connection is the writer here
    conn.execute("PRAGMA query_only = ON")
    batch = [make_record("run-a", 0), make_record("run-b", 0)]
    with pytest.raises(StoreUnavailable, match="readonly"):
        store.record_decisions(batch)
    conn.execute("PRAGMA query_only = OFF")

    assert store.run_ids() == []
    assert conn.in_transaction is False
    assert store.record_decisions(batch) == [r.decision for r in batch]


def test_two_stores_on_one_file_see_each_other(db: Path) -> None:
    a, b = SqliteStore(db), SqliteStore(db)
    try:
        first = make_record("run-a", 0)
        a.record_decisions([first])
        assert b.load_context("run-a", 0).existing == first.decision
        # b's retry of the same epoch gets a's decision.
        assert b.record_decisions([make_record("run-a", 0)]) == [first.decision]
        b.record_decisions([make_record("run-a", 1, state="from b")])
        assert a.load_context("run-a", 2).previous_state == "from b"
    finally:
        a.close()
        b.close()


def test_concurrent_writers_on_one_file(db: Path) -> None:
    stores = [SqliteStore(db) for _ in range(2)]
    errors: list[BaseException] = []

    def write(store: SqliteStore, run_id: str) -> None:
        try:
            for epoch in range(0, 40, 4):
                store.record_decisions([make_record(run_id, epoch + i) for i in range(4)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(stores[i % 2], f"run-{i}")) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert sorted(stores[0].run_ids()) == [f"run-{i}" for i in range(4)]
        assert [s.report_count for s in stores[1].list_runs(RunFilter())] == [40] * 4
    finally:
        for store in stores:
            store.close()


def test_the_active_override_is_the_latest_uncleared(store: SqliteStore, db: Path) -> None:
    insert = (
        "INSERT INTO overrides (run_id, actor, reason, lr, weights, hold, once, created_at, "
        "cleared_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    at = "2025-03-04T05:06:07.123456+00:00"
    _raw(db, insert, ("run-a", "alice", "old", 0.1, "{}", 0, 0, at, None))
    _raw(
        db, insert, ("run-a", "bob", "newest", None, '{"dice": 0.5, "focal": 0.5}', 1, 1, at, None)
    )
    _raw(db, insert, ("run-a", "carol", "cleared", 0.3, "{}", 0, 0, at, at))
    _raw(db, insert, ("run-b", "dave", "other run", 0.2, "{}", 0, 0, at, None))

    assert store.load_context("run-a", 3).override == Override(
        override_id=2,
        run_id="run-a",
        actor="bob",
        reason="newest",
        lr=None,
        loss_weights=frozen_map({"dice": 0.5, "focal": 0.5}),
        hold_interventions=True,
        once=True,
        created_at=T0,
    )
    assert store.load_context("run-c", 0).override is None


def test_integrity_check_finds_dangling_rows(store: SqliteStore, db: Path) -> None:
    store.check_integrity()
    conn = sqlite3.connect(db)  # foreign keys are off by default on a plain connection
    try:
        with conn:
            conn.execute(
                "INSERT INTO active_policy (id, version, activated_at, actor) "
                "VALUES (1, 'ghost', 'now', 'x')"
            )
    finally:
        conn.close()
    with pytest.raises(StoreUnavailable, match="dangling"):
        store.check_integrity()


def test_each_thread_has_its_own_connection_and_close_closes_all(store: SqliteStore) -> None:
    store.record_decisions([make_record("run-a", 0)])
    seen: list[object] = []

    def read() -> None:
        seen.append(store._connection())
        seen.append(store.load_context("run-a", 0).existing)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert seen[0] is not store._connection()
    assert seen[1] is not None
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        seen[0].execute("SELECT 1")  # type: ignore[attr-defined]


# --- the URL factory ----------------------------------------------------------------


def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///nested/dir/rel.db")
    relative.close()
    assert (tmp_path / "nested" / "dir" / "rel.db").is_file()

    absolute = tmp_path / "abs" / "a.db"
    store = open_store(f"sqlite:///{absolute}")  # four slashes: sqlite:////tmp/...
    store.close()
    assert absolute.is_file()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/control", "unknown store URL scheme 'mysql'"),
        ("control.db", "scheme://"),
        ("sqlite:///:memory:", "must name a file"),
        ("sqlite://host/control.db", "no host"),
        ("sqlite:///control.db?timeout=3", "parameters"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_read_only_opens_neither_a_missing_file_nor_an_unmigrated_one(
    db: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "typo" / "control.db"
    with pytest.raises(StoreUnavailable, match="no such file"):
        open_store(f"sqlite:///{missing}", read_only=True)
    assert not missing.parent.exists()

    only_first = tmp_path / "only-0001"
    only_first.mkdir()
    (only_first / "0001_initial.sql").write_text(
        MIGRATIONS.joinpath("0001_initial.sql").read_text(encoding="utf-8"), encoding="utf-8"
    )
    SqliteStore(db, migrations=only_first).close()
    before = db.read_bytes()
    with pytest.raises(StoreUnavailable, match=r"schema version 1 is older .* cannot be migrated"):
        open_store(f"sqlite:///{db}", read_only=True)
    assert db.read_bytes() == before
    assert _raw(db, "SELECT version FROM schema_version") == [(1,)]


# --- the file under a running store -------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_whose_file_is_deleted_or_replaced_refuses_every_write(
    how: str, store: SqliteStore, db: Path
) -> None:
    store.record_decisions([make_record("kept", 0)])
    store.check_writable()
    copy = db.with_name("copy.db")
    copy.write_bytes(db.read_bytes())
    db.unlink()
    if how == "replaced":
        copy.rename(db)  # another file (another inode) at the same path
    said = f"sqlite store {db}: the database file was {how}"
    with pytest.raises(StoreUnavailable, match=said):
        store.record_decisions([make_record("lost", 0)])
    with pytest.raises(StoreUnavailable, match=said):
        store.check_writable()
    # Another thread's first connection must not open (or create) what is there now.
    seen: list[Exception] = []

    def probe() -> None:
        try:
            store.check_writable()
        except Exception as exc:
            seen.append(exc)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert [type(e) for e in seen] == [StoreUnavailable]
    assert db.exists() == (how == "replaced")


def test_the_write_probe_writes_and_leaves_nothing(store: SqliteStore, db: Path) -> None:
    rows = _raw(db, "SELECT * FROM schema_version")
    store.check_writable()
    assert _raw(db, "SELECT * FROM schema_version") == rows


def test_create_false_opens_no_new_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "control.db"
    with pytest.raises(StoreUnavailable, match="no such file"):
        open_store(f"sqlite:///{missing}", create=False)
    assert not missing.parent.exists()
    missing.parent.mkdir()
    with pytest.raises(StoreUnavailable, match="no such file"):
        open_store(f"sqlite:///{missing}", create=False)
    assert not missing.exists()


@pytest.mark.parametrize(
    ("leave", "loud"),
    [("nothing", False), ("no directory", True), ("a -wal file", True)],
)
def test_a_new_store_is_announced_loudly_where_one_was(
    leave: str, loud: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "control.db"
    if leave != "no directory":
        db.parent.mkdir()
    if leave == "a -wal file":
        db.with_name("control.db-wal").write_bytes(b"")
    with caplog.at_level("INFO", logger="control_server.store.factory"):
        open_store(f"sqlite:///{db}").close()
    [said] = [r for r in caplog.records if "creating a new" in r.getMessage()]
    assert str(db) in said.getMessage()
    assert said.levelname == ("WARNING" if loud else "INFO")
    caplog.clear()
    with caplog.at_level("INFO", logger="control_server.store.factory"):
        open_store(f"sqlite:///{db}").close()  # it exists now: nothing to say
    assert not [r for r in caplog.records if "creating a new" in r.getMessage()]
