-- 0005: the record's tamper evidence, the PostgreSQL dialect of
-- ../migrations/0005_chains.sql (read there what the columns mean).

ALTER TABLE decisions ADD COLUMN chain text;
ALTER TABLE superseded_decisions ADD COLUMN chain text;

CREATE TABLE run_registry (
    seq                bigserial PRIMARY KEY,
    run_id             text NOT NULL UNIQUE,
    registered_at      timestamptz NOT NULL,
    hash               text NOT NULL
);
