-- 0003: run attempts and a run's lifecycle, the PostgreSQL dialect of
-- ../migrations/0003_attempts.sql (read there what the tables mean).

-- The run's latest attempt.
ALTER TABLE runs ADD COLUMN attempt integer NOT NULL DEFAULT 1;

-- The attempt that reported an epoch, and whether the report was late (held by the
-- client while the server was unreachable: recorded, never decided as live).
ALTER TABLE decisions ADD COLUMN attempt integer NOT NULL DEFAULT 1;
ALTER TABLE decisions ADD COLUMN late boolean NOT NULL DEFAULT false;
ALTER TABLE shadow_decisions ADD COLUMN attempt integer NOT NULL DEFAULT 1;
ALTER TABLE shadow_decisions ADD COLUMN late boolean NOT NULL DEFAULT false;

-- One row per StartRun (and per implicit attempt 1 once FinishRun names it).
-- status: ACTIVE until FinishRun says COMPLETED, STOPPED or FAILED.
CREATE TABLE run_attempts (
    run_id             text NOT NULL,
    attempt            integer NOT NULL,
    started_at         timestamptz NOT NULL,
    resume_from_epoch  bigint,
    history_reset      boolean NOT NULL DEFAULT false,
    superseded_epochs  integer NOT NULL DEFAULT 0,
    trainer_name       text NOT NULL DEFAULT '',
    trainer_version    text NOT NULL DEFAULT '',
    policy_version     text NOT NULL DEFAULT '',
    initial_lr         double precision,
    loss_weights       text NOT NULL DEFAULT '{}',
    status             text NOT NULL DEFAULT 'ACTIVE',
    finished_at        timestamptz,
    error              text NOT NULL DEFAULT '',
    metrics            text NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, attempt)
);

-- Epochs an attempt superseded: the report and decision rows as they were, with the
-- attempt that reported them and the one that superseded them.
CREATE TABLE superseded_reports (
    run_id             text NOT NULL,
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
    attempt            integer NOT NULL,
    superseded_by      integer NOT NULL,
    PRIMARY KEY (run_id, attempt, epoch)
);
CREATE TABLE superseded_decisions (
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
    override_id        bigint,
    previous_epoch     bigint,
    attempt            integer NOT NULL,
    late               boolean NOT NULL DEFAULT false,
    state              text NOT NULL,
    superseded_by      integer NOT NULL,
    UNIQUE (run_id, attempt, epoch)
);
