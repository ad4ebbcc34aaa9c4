-- 0006: policy experiments (control_server/experiments.py).
--
-- Same conventions as 0001.

-- An A/B rollout: new runs the selector (dataset, configuration, fold; '' matches
-- all) matches are assigned an arm at their first StartRun while ended_at is NULL.
-- arms: JSON list of {"name", "policy_version", "share", "observe_only"}.
CREATE TABLE experiments (
    name               TEXT PRIMARY KEY,
    description        TEXT NOT NULL DEFAULT '',
    dataset            TEXT NOT NULL DEFAULT '',
    configuration      TEXT NOT NULL DEFAULT '',
    fold               TEXT NOT NULL DEFAULT '',
    arms               TEXT NOT NULL,
    baseline_arm       TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    started_by         TEXT NOT NULL,
    ended_at           TEXT,
    ended_by           TEXT NOT NULL DEFAULT '',
    promoted_arm       TEXT NOT NULL DEFAULT ''
);

-- The arm each run was assigned, once: its policy version steers the run (above
-- pins and the active version) for as long as the run lives.
CREATE TABLE experiment_assignments (
    run_id             TEXT PRIMARY KEY,
    experiment         TEXT NOT NULL REFERENCES experiments (name),
    arm                TEXT NOT NULL,
    policy_version     TEXT NOT NULL,
    assigned_at        TEXT NOT NULL
);
CREATE INDEX experiment_assignments_by_experiment ON experiment_assignments (experiment);
