-- 0003: run attempts and a run's lifecycle.
--
-- Every StartRun opens an attempt of its run (a run that never called StartRun
-- has the implicit attempt 1). A resume keeps the epochs up to its checkpoint in
-- the run's current history; the later epochs of earlier attempts, and on a start
-- from scratch all of them, move to the superseded_* tables (kept, never decided
-- on again). The current history stays keyed by (run_id, epoch).
--
-- Same conventions as 0001 (ISO-8601 UTC text timestamps, JSON text maps).

-- The run's latest attempt.
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;

-- The attempt that reported an epoch, and whether the report was late (held by the
-- client while the server was unreachable: recorded, never decided as live).
ALTER TABLE decisions ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE decisions ADD COLUMN late INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1));
ALTER TABLE shadow_decisions ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE shadow_decisions ADD COLUMN late INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1));

-- One row per StartRun (and per implicit attempt 1 once FinishRun names it).
-- status: ACTIVE until FinishRun says COMPLETED, STOPPED or FAILED.
CREATE TABLE run_attempts (
    run_id             TEXT NOT NULL,
    attempt            INTEGER NOT NULL,
    started_at         TEXT NOT NULL,
    resume_from_epoch  INTEGER,
    history_reset      INTEGER NOT NULL DEFAULT 0 CHECK (history_reset IN (0, 1)),
    superseded_epochs  INTEGER NOT NULL DEFAULT 0,
    trainer_name       TEXT NOT NULL DEFAULT '',
    trainer_version    TEXT NOT NULL DEFAULT '',
    policy_version     TEXT NOT NULL DEFAULT '',
    initial_lr         REAL,
    loss_weights       TEXT NOT NULL DEFAULT '{}',
    status             TEXT NOT NULL DEFAULT 'ACTIVE',
    finished_at        TEXT,
    error              TEXT NOT NULL DEFAULT '',
    metrics            TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, attempt)
);

-- Epochs an attempt superseded: the report and decision rows as they were, with the
-- attempt that reported them and the one that superseded them.
CREATE TABLE superseded_reports (
    run_id             TEXT NOT NULL,
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
    attempt            INTEGER NOT NULL,
    superseded_by      INTEGER NOT NULL,
    PRIMARY KEY (run_id, attempt, epoch)
);
CREATE TABLE superseded_decisions (
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
    override_id        INTEGER,
    previous_epoch     INTEGER,
    attempt            INTEGER NOT NULL,
    late               INTEGER NOT NULL DEFAULT 0,
    state              TEXT NOT NULL,
    superseded_by      INTEGER NOT NULL,
    UNIQUE (run_id, attempt, epoch)
);
