-- 0001: the initial schema (PostgreSQL dialect of ../migrations/0001_initial.sql).
--
-- Both backends share the migration numbering: level N means the same tables
-- and columns on SQLite and PostgreSQL. The runner (SqlStore._migrate in
-- control_server/store/sql.py) applies each file in one transaction under an
-- advisory lock taken by PostgresStore (replicas starting together do not race)
-- and records it in schema_version.
--
-- Conventions: timestamps are timestamptz; weight maps, documents, details and
-- policy states are JSON text, written exactly as on SQLite (jsonb would refuse
-- the \u0000 escape an audited request may hold); floats are double precision
-- (NaN and the infinities round-trip as they are).

CREATE TABLE runs (
    run_id             text PRIMARY KEY,
    dataset            text NOT NULL DEFAULT '',
    configuration      text NOT NULL DEFAULT '',
    fold               text NOT NULL DEFAULT '',
    trainer            text NOT NULL DEFAULT '',
    plans              text NOT NULL DEFAULT '',
    host               text NOT NULL DEFAULT '',
    first_seen         timestamptz NOT NULL,
    last_seen          timestamptz NOT NULL,
    last_epoch         bigint NOT NULL,
    report_count       integer NOT NULL,
    intervention_count integer NOT NULL,
    current_lr         double precision NOT NULL
);
CREATE INDEX runs_by_activity ON runs (last_seen DESC, run_id);
CREATE INDEX runs_by_labels ON runs (dataset, configuration, fold);

CREATE TABLE reports (
    run_id             text NOT NULL
                       REFERENCES runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    epoch              bigint NOT NULL,
    train_loss         double precision NOT NULL,
    val_loss           double precision,
    pseudo_dice        double precision,
    avg_gradient_norm  double precision,
    intervention_count integer NOT NULL,
    current_lr         double precision NOT NULL,
    initial_lr         double precision NOT NULL,
    loss_weights       text NOT NULL,
    dataset            text NOT NULL DEFAULT '',
    configuration      text NOT NULL DEFAULT '',
    fold               text NOT NULL DEFAULT '',
    trainer            text NOT NULL DEFAULT '',
    plans              text NOT NULL DEFAULT '',
    host               text NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, epoch)
);

-- One decision per (run_id, epoch): the key that makes ReportEpoch idempotent
-- across replicas. `seq` is WatchDecisions' cursor: the store assigns it under
-- a transaction-level advisory lock held until commit, so it grows in commit
-- order (a plain sequence default would not).
CREATE TABLE decisions (
    decision_id        text PRIMARY KEY,
    run_id             text NOT NULL,
    epoch              bigint NOT NULL,
    action             text NOT NULL,
    source             text NOT NULL,
    reason             text NOT NULL,
    policy_version     text NOT NULL,
    decided_at         timestamptz NOT NULL,
    lr                 double precision,
    loss_weights       text NOT NULL,
    intervention_index integer NOT NULL,
    state              text NOT NULL,
    seq                bigserial NOT NULL UNIQUE,
    UNIQUE (run_id, epoch),
    FOREIGN KEY (run_id, epoch) REFERENCES reports (run_id, epoch)
        DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE overrides (
    id                 bigserial PRIMARY KEY,
    run_id             text NOT NULL,
    actor              text NOT NULL,
    reason             text NOT NULL,
    lr                 double precision,
    weights            text NOT NULL DEFAULT '{}',
    hold               boolean NOT NULL DEFAULT false,
    once               boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL,
    cleared_at         timestamptz
);
CREATE INDEX overrides_active ON overrides (run_id, id) WHERE cleared_at IS NULL;

-- `seq` keeps insertion order for equal created_at (SQLite's rowid).
CREATE TABLE policies (
    version            text PRIMARY KEY,
    name               text NOT NULL,
    document           text NOT NULL,
    created_at         timestamptz NOT NULL,
    seq                bigserial NOT NULL
);

CREATE TABLE active_policy (
    id                 integer PRIMARY KEY CHECK (id = 1),
    version            text NOT NULL REFERENCES policies (version),
    activated_at       timestamptz NOT NULL,
    actor              text NOT NULL
);

CREATE TABLE admin_events (
    id                 bigserial PRIMARY KEY,
    at                 timestamptz NOT NULL,
    actor              text NOT NULL,
    action             text NOT NULL,
    target             text NOT NULL,
    details            text NOT NULL,
    result             text NOT NULL
);
