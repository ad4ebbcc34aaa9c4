-- 0001: the initial schema.
--
-- The runner (SqlStore._migrate in control_server/store/sql.py) applies each
-- numbered file in one transaction and records it in schema_version (which it
-- creates itself).
-- Statements here must work inside a transaction (no PRAGMA journal_mode etc.).
--
-- Conventions: timestamps are ISO-8601 UTC text with microseconds
-- (lexicographic order = time order); weight maps and documents are JSON text;
-- a NaN float is stored as the text 'NaN' (SQLite turns a bound NaN into NULL).

-- One row per run: the summary ListRuns shows, upserted with every new report.
CREATE TABLE runs (
    run_id             TEXT PRIMARY KEY,
    dataset            TEXT NOT NULL DEFAULT '',
    configuration      TEXT NOT NULL DEFAULT '',
    fold               TEXT NOT NULL DEFAULT '',
    trainer            TEXT NOT NULL DEFAULT '',
    plans              TEXT NOT NULL DEFAULT '',
    host               TEXT NOT NULL DEFAULT '',
    first_seen         TEXT NOT NULL,
    last_seen          TEXT NOT NULL,
    last_epoch         INTEGER NOT NULL,
    report_count       INTEGER NOT NULL,
    intervention_count INTEGER NOT NULL,
    current_lr         REAL NOT NULL
);
CREATE INDEX runs_by_activity ON runs (last_seen DESC, run_id);
CREATE INDEX runs_by_labels ON runs (dataset, configuration, fold);

-- Every report that got a decision, as the trainer sent it.
CREATE TABLE reports (
    run_id             TEXT NOT NULL
                       REFERENCES runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    epoch              INTEGER NOT NULL,
    train_loss         REAL NOT NULL,
    val_loss           REAL,
    pseudo_dice        REAL,
    avg_gradient_norm  REAL,
    intervention_count INTEGER NOT NULL,
    current_lr         REAL NOT NULL,
    initial_lr         REAL NOT NULL,
    loss_weights       TEXT NOT NULL,
    dataset            TEXT NOT NULL DEFAULT '',
    configuration      TEXT NOT NULL DEFAULT '',
    fold               TEXT NOT NULL DEFAULT '',
    trainer            TEXT NOT NULL DEFAULT '',
    plans              TEXT NOT NULL DEFAULT '',
    host               TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, epoch)
);

-- One decision per (run_id, epoch): the key that makes ReportEpoch idempotent.
-- `state` is the policy's fold state after this epoch (JSON text).
CREATE TABLE decisions (
    decision_id        TEXT PRIMARY KEY,
    run_id             TEXT NOT NULL,
    epoch              INTEGER NOT NULL,
    action             TEXT NOT NULL,
    source             TEXT NOT NULL,
    reason             TEXT NOT NULL,
    policy_version     TEXT NOT NULL,
    decided_at         TEXT NOT NULL,
    lr                 REAL,
    loss_weights       TEXT NOT NULL,
    intervention_index INTEGER NOT NULL,
    state              TEXT NOT NULL,
    UNIQUE (run_id, epoch),
    FOREIGN KEY (run_id, epoch) REFERENCES reports (run_id, epoch)
        DEFERRABLE INITIALLY DEFERRED
);

-- Operator overrides; the latest uncleared one of a run is active.
CREATE TABLE overrides (
    id                 INTEGER PRIMARY KEY,
    run_id             TEXT NOT NULL,
    actor              TEXT NOT NULL,
    reason             TEXT NOT NULL,
    lr                 REAL,
    weights            TEXT NOT NULL DEFAULT '{}',
    hold               INTEGER NOT NULL DEFAULT 0 CHECK (hold IN (0, 1)),
    once               INTEGER NOT NULL DEFAULT 0 CHECK (once IN (0, 1)),
    created_at         TEXT NOT NULL,
    cleared_at         TEXT
);
CREATE INDEX overrides_active ON overrides (run_id, id) WHERE cleared_at IS NULL;

-- Immutable policy versions (the id is derived from the content).
CREATE TABLE policies (
    version            TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    document           TEXT NOT NULL,
    created_at         TEXT NOT NULL
);

-- The active policy version: at most one row.
CREATE TABLE active_policy (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    version            TEXT NOT NULL REFERENCES policies (version),
    activated_at       TEXT NOT NULL,
    actor              TEXT NOT NULL
);

-- Who did what to what through ControlAdmin, and how it ended.
CREATE TABLE admin_events (
    id                 INTEGER PRIMARY KEY,
    at                 TEXT NOT NULL,
    actor              TEXT NOT NULL,
    action             TEXT NOT NULL,
    target             TEXT NOT NULL,
    details            TEXT NOT NULL,
    result             TEXT NOT NULL
);
