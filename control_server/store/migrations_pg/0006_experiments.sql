-- 0006: policy experiments, the PostgreSQL dialect of
-- ../migrations/0006_experiments.sql (read there what the tables mean).

CREATE TABLE experiments (
    name               text PRIMARY KEY,
    description        text NOT NULL DEFAULT '',
    dataset            text NOT NULL DEFAULT '',
    configuration      text NOT NULL DEFAULT '',
    fold               text NOT NULL DEFAULT '',
    arms               text NOT NULL,
    baseline_arm       text NOT NULL,
    started_at         timestamptz NOT NULL,
    started_by         text NOT NULL,
    ended_at           timestamptz,
    ended_by           text NOT NULL DEFAULT '',
    promoted_arm       text NOT NULL DEFAULT ''
);

CREATE TABLE experiment_assignments (
    run_id             text PRIMARY KEY,
    experiment         text NOT NULL REFERENCES experiments (name),
    arm                text NOT NULL,
    policy_version     text NOT NULL,
    assigned_at        timestamptz NOT NULL
);
CREATE INDEX experiment_assignments_by_experiment ON experiment_assignments (experiment);
