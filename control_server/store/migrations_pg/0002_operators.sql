-- 0002: operators' controls, the PostgreSQL dialect of
-- ../migrations/0002_operators.sql: overrides that record how they ended, the
-- override each decision used, policy pins, the shadow policy and its
-- decisions, and indexes for the audit queries.

ALTER TABLE overrides ADD COLUMN cleared_by text NOT NULL DEFAULT '';
CREATE INDEX overrides_by_run ON overrides (run_id, id);

ALTER TABLE decisions ADD COLUMN override_id bigint REFERENCES overrides (id);
ALTER TABLE decisions ADD COLUMN previous_epoch bigint;
UPDATE decisions SET previous_epoch = (
    SELECT max(p.epoch) FROM decisions AS p
    WHERE p.run_id = decisions.run_id AND p.epoch < decisions.epoch
);
CREATE INDEX decisions_by_time ON decisions (decided_at);

CREATE TABLE policy_pins (
    id                 bigserial PRIMARY KEY,
    dataset            text NOT NULL DEFAULT '',
    configuration      text NOT NULL DEFAULT '',
    fold               text NOT NULL DEFAULT '',
    version            text NOT NULL REFERENCES policies (version),
    pinned_at          timestamptz NOT NULL,
    actor              text NOT NULL,
    UNIQUE (dataset, configuration, fold)
);

CREATE TABLE shadow_policy (
    id                 integer PRIMARY KEY CHECK (id = 1),
    version            text NOT NULL REFERENCES policies (version),
    set_at             timestamptz NOT NULL,
    actor              text NOT NULL
);

CREATE TABLE shadow_decisions (
    run_id             text NOT NULL,
    epoch              bigint NOT NULL,
    decision_id        text NOT NULL UNIQUE,
    action             text NOT NULL,
    source             text NOT NULL,
    reason             text NOT NULL,
    policy_version     text NOT NULL,
    decided_at         timestamptz NOT NULL,
    lr                 double precision,
    loss_weights       text NOT NULL,
    intervention_index integer NOT NULL,
    override_id        bigint REFERENCES overrides (id),
    previous_epoch     bigint,
    state              text NOT NULL,
    PRIMARY KEY (run_id, epoch),
    FOREIGN KEY (run_id, epoch) REFERENCES decisions (run_id, epoch)
        DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX shadow_decisions_by_version ON shadow_decisions (policy_version);
