"""The PostgreSQL backend's hot path: a batch in a fixed number of round trips.

Every report's context is read ahead in one statement, and the records go in as
multi-row INSERTs (binary arrays through `unnest`), all tables but one in one
statement, however large the batch. Also here: how PostgreSQL stores values
(`CODEC`) and the advisory-lock keys the backend serialises with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from control_server.domain import Decision, DecisionRecord, RunContext, RunLabels, StoreUnavailable
from control_server.store.rows import (
    DECISION,
    N_DECISION,
    N_REPORT,
    N_RUN,
    OVERRIDE,
    REPORT,
    RUN,
    codec,
    names,
    qualified,
    upsert_run,
)

Connection = psycopg.Connection[tuple[Any, ...]]

# Advisory locks of the two-int4 key space (runs use the one-int8 space, apart).
LOCK_CLASS = 0x7443  # "tC"
MIGRATION_LOCK = 1
SEQUENCE_LOCK = 2
POLICY_LOCK = 3
REGISTRY_LOCK = 4


# The array types `unnest` needs for batch inserts, in the order of the column lists.
_DECISION_TYPES = (
    "text text bigint text text text text timestamptz float8 text integer bigint bigint "
    "integer boolean"
)
_REPORT_TYPES = "text bigint float8 float8 float8 float8 integer float8 float8 text" + " text" * 6
_RUN_TYPES = "text" + " text" * 6 + " timestamptz timestamptz bigint integer integer float8"


def aware(value: datetime) -> datetime:
    """Naive datetimes are UTC (as on SQLite)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _dt(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; an audited or named string keeps the rest."""
    return value.replace("\x00", "\ufffd")


CODEC = codec(time=aware, dt=_dt, text=_text)
_decision_row = CODEC.decision_row
_decision_from = CODEC.decision_from
_report_row = CODEC.report_row
_run_row = CODEC.run_row
_context_from = CODEC.context_from


def _unnest(columns: str, types: str, *, join: str = "") -> str:
    """`SELECT columns FROM unnest(%b::type[], ...)` in array order: one row per element
    (cross-joined with `join`, a one-row CTE, when given).

    Arrays go in binary (%b): text arrays cost a regex escape per element client-side."""
    cols = names(columns)
    arrays = ", ".join(f"%b::{t}[]" for t in types.split())
    if len(cols) != len(types.split()):  # pragma: no cover - a programming error
        raise AssertionError(f"{len(cols)} columns but {len(types.split())} types")
    return (
        f"SELECT {', '.join(f'u.{n}' for n in cols)} FROM unnest({arrays}) WITH ORDINALITY "
        f"AS u({', '.join(cols)}, ord)" + (f" CROSS JOIN {join}" if join else "") + " ORDER BY ord"
    )


LOCK_RUNS = (
    # Key order, so that two transactions locking overlapping runs never deadlock
    # (since 9.6 volatile target-list functions run after the sort).
    "SELECT pg_advisory_xact_lock(k) FROM "
    "(SELECT DISTINCT hashtextextended(r, 0) AS k FROM unnest(%b::text[]) AS r) AS keys "
    "ORDER BY k"
)
# Seq numbers are drawn under an advisory lock held until commit, so that they grow
# in commit order; the CTE is joined, so the lock is taken before any row is formed.
_INSERT_DECISIONS = (
    "WITH seq_lock AS (SELECT pg_advisory_xact_lock(%s, %s)) "
    f"INSERT INTO decisions ({DECISION}, state, chain) "
    + _unnest(f"{DECISION}, state, chain", _DECISION_TYPES + " text text", join="seq_lock")
    + " ON CONFLICT (run_id, epoch) DO NOTHING RETURNING decision_id"
)
_SELECT_STORED = (
    f"SELECT {qualified('d', DECISION)} FROM decisions AS d "
    "JOIN unnest(%b::text[], %b::bigint[]) AS k (run_id, epoch) "
    "ON d.run_id = k.run_id AND d.epoch = k.epoch"
)
# A `once` override is consumed by the decision that used it, if nobody beat it to it.
_CONSUME_OVERRIDES = (
    "UPDATE overrides AS o SET cleared_at = c.at, cleared_by = c.by "
    "FROM unnest(%b::bigint[], %b::timestamptz[], %b::text[]) AS c (id, at, by) "
    "WHERE o.id = c.id AND o.cleared_at IS NULL RETURNING o.id"
)
# The rest of a batch in ONE statement (data-modifying CTEs always run, once):
# decisions whose override was used up meanwhile go, shadows and reports come,
# run summaries are upserted. Empty arrays write nothing.
_WRITE_REST = (
    "WITH lost AS (DELETE FROM decisions WHERE decision_id = ANY(%b::text[])), "
    f"shadows AS (INSERT INTO shadow_decisions ({DECISION}, state) "
    + _unnest(f"{DECISION}, state", _DECISION_TYPES + " text")
    + f"), reports AS (INSERT INTO reports ({REPORT}) "
    + _unnest(REPORT, _REPORT_TYPES)
    + f") INSERT INTO runs ({RUN}) "
    + _unnest(RUN, _RUN_TYPES)
    + " "
    + upsert_run("least", "greatest")
)
# Everything deciding a batch needs, in ONE statement (one snapshot, one round trip):
# per (run, epoch, labels) key, in key order, the run's latest attempt and newest
# epoch, the active and shadow versions, the
# version of the most specific pin matching the labels (ties: the most recently
# pinned), the run's active override (the latest uncleared one), and the decision at
# `epoch` (if stored) and the latest one before it, each with the shadow version and
# state stored beside it: 1 or 2 rows per key.
SELECT_CONTEXTS = (
    "SELECT k.ord, k.epoch, a.version, sp.version, pin.version, r.attempt, r.last_epoch, "
    f"ea.policy_version, {qualified('o', OVERRIDE)}, "
    f"{qualified('d', DECISION)}, d.state, d.shadow_version, d.shadow_state, d.chain "
    "FROM unnest(%b::text[], %b::bigint[], %b::boolean[], %b::text[], %b::text[], %b::text[]) "
    "WITH ORDINALITY AS k (run_id, epoch, pinned, dataset, configuration, fold, ord) "
    "LEFT JOIN runs AS r ON r.run_id = k.run_id "
    "LEFT JOIN experiment_assignments AS ea ON ea.run_id = k.run_id "
    "LEFT JOIN active_policy AS a ON a.id = 1 "
    "LEFT JOIN shadow_policy AS sp ON sp.id = 1 "
    "LEFT JOIN LATERAL (SELECT p.version FROM policy_pins AS p WHERE k.pinned "
    "AND (p.dataset = '' OR p.dataset = k.dataset) "
    "AND (p.configuration = '' OR p.configuration = k.configuration) "
    "AND (p.fold = '' OR p.fold = k.fold) "
    "ORDER BY (p.dataset <> '')::int + (p.configuration <> '')::int + (p.fold <> '')::int "
    "DESC, p.pinned_at DESC, p.id DESC LIMIT 1) AS pin ON true "
    f"LEFT JOIN LATERAL (SELECT {OVERRIDE} FROM overrides "
    "WHERE run_id = k.run_id AND cleared_at IS NULL ORDER BY id DESC LIMIT 1) AS o ON true "
    f"LEFT JOIN LATERAL (SELECT {qualified('d', DECISION)}, d.state, "
    "s.policy_version AS shadow_version, s.state AS shadow_state, d.chain "
    "FROM decisions AS d LEFT JOIN shadow_decisions AS s "
    "ON s.run_id = d.run_id AND s.epoch = d.epoch "
    "WHERE d.run_id = k.run_id AND d.epoch <= k.epoch "
    "ORDER BY d.epoch DESC LIMIT 2) AS d ON true "
    "ORDER BY k.ord, d.epoch DESC"
)

ContextKey = tuple[str, int, RunLabels | None]


# --- batch reads ------------------------------------------------------------------------


def context_params(keys: Sequence[ContextKey]) -> tuple[list[Any], ...]:
    """The arrays of `SELECT_CONTEXTS` (no labels: no pin applies)."""
    no_labels = RunLabels()
    return (
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] is not None for k in keys],
        [(k[2] or no_labels).dataset for k in keys],
        [(k[2] or no_labels).configuration for k in keys],
        [(k[2] or no_labels).fold for k in keys],
    )


def contexts_from(rows: Sequence[Sequence[Any]], count: int) -> list[RunContext]:
    """One RunContext per key from `SELECT_CONTEXTS` rows (grouped by key, in order)."""
    groups: list[list[Sequence[Any]]] = [[] for _ in range(count)]
    for row in rows:
        groups[row[0] - 1].append(row)
    # (ord, epoch, then the columns CODEC.context_from reads)
    return [_context_from(group, group[0][1], 2) for group in groups]


# --- batch writes -----------------------------------------------------------------------


def segments(records: Sequence[DecisionRecord]) -> Iterator[list[DecisionRecord]]:
    """Consecutive slices in which no run and no consumed override repeats.

    Within a slice the multi-row statements below mean exactly what writing the
    records one by one would; slices are written in order, in the same transaction.
    """
    segment: list[DecisionRecord] = []
    runs: set[str] = set()
    overrides: set[int] = set()
    for record in records:
        claimed = record.consumed_override
        if record.report.run_id in runs or (claimed is not None and claimed in overrides):
            yield segment
            segment, runs, overrides = [], set(), set()
        segment.append(record)
        runs.add(record.report.run_id)
        if claimed is not None:
            overrides.add(claimed)
    if segment:
        yield segment


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to one list per column (the arrays `unnest` takes); no rows, empty lists."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def record_segment(conn: Connection, records: list[DecisionRecord]) -> list[Decision | None]:
    """Write one slice (see `segments`): two statements, and two more only when a
    record is a duplicate or consumes an override.

    No pipeline mode here: libpq ends a pipeline with a Flush, after which the server
    no longer arms idle_in_transaction_session_timeout until the next statement, and
    a replica stopped right then would hold its locks for good."""
    rows = [
        (*_decision_row(r.decision, aware(r.decision.decided_at)), r.state, r.chain)
        for r in records
    ]
    insert = conn.execute(
        _INSERT_DECISIONS, (LOCK_CLASS, SEQUENCE_LOCK, *_columns(rows, N_DECISION + 2))
    )
    inserted = {row[0] for row in insert.fetchall()}
    new = [r for r in records if r.decision.decision_id in inserted]
    lost: set[str] = set()
    claims = [r for r in new if r.consumed_override is not None]
    if claims:
        consumed = conn.execute(
            _CONSUME_OVERRIDES,
            (
                [r.consumed_override for r in claims],
                [aware(r.decision.decided_at) for r in claims],
                [f"consumed by epoch {r.decision.epoch}" for r in claims],
            ),
        ).fetchall()
        # Used up or cleared meanwhile: these decisions must not stand.
        still = {row[0] for row in consumed}
        lost = {r.decision.decision_id for r in claims if r.consumed_override not in still}
    stored: dict[tuple[str, int], Decision] = {}
    duplicates = [r for r in records if r.decision.decision_id not in inserted]
    if duplicates:
        for row in conn.execute(
            _SELECT_STORED,
            ([r.decision.run_id for r in duplicates], [r.decision.epoch for r in duplicates]),
        ).fetchall():
            decision = _decision_from(row)
            stored[(decision.run_id, decision.epoch)] = decision
    winners = [r for r in new if r.decision.decision_id not in lost]
    shadows = [
        (*_decision_row(r.shadow, aware(r.shadow.decided_at)), r.shadow_state)
        for r in winners
        if r.shadow is not None
    ]
    runs = [_run_row(r.report, aware(r.decision.decided_at)) for r in winners]
    if winners or lost:
        conn.execute(
            _WRITE_REST,
            (
                sorted(lost),
                *_columns(shadows, N_DECISION + 1),
                *_columns([_report_row(r.report) for r in winners], N_REPORT),
                *_columns(runs, N_RUN),
            ),
        )
    results: list[Decision | None] = []
    for record in records:
        decision = record.decision
        if decision.decision_id in inserted:
            results.append(None if decision.decision_id in lost else decision)
            continue
        found = stored.get((decision.run_id, decision.epoch))
        if found is None:  # pragma: no cover - the conflict guarantees the row
            raise StoreUnavailable(
                f"decision ({decision.run_id!r}, {decision.epoch}) conflicted but cannot be read"
            )
        results.append(found)
    return results
