-- 0002: operators' controls: overrides that record how they ended,
-- the override each decision used, policy pins, the shadow policy and its
-- decisions, and indexes for the audit queries.
--
-- Same conventions as 0001 (ISO-8601 UTC text timestamps, JSON text maps).

-- Who or what cleared an override: an operator's name, "replaced by override N",
-- or "consumed by epoch N" for a `once` override (written with that decision).
ALTER TABLE overrides ADD COLUMN cleared_by TEXT NOT NULL DEFAULT '';
CREATE INDEX overrides_by_run ON overrides (run_id, id);

-- The override in force when a decision was made (NULL: none), for replay.
ALTER TABLE decisions ADD COLUMN override_id INTEGER REFERENCES overrides (id);
-- The epoch whose policy state a decision continued from (NULL: the initial state).
-- Usually the epoch before; a late report of an older epoch continues from whatever
-- was stored before it at the time, and replay must follow the same chain. Rows
-- written before 0002 continued from their predecessor in epoch order.
ALTER TABLE decisions ADD COLUMN previous_epoch INTEGER;
UPDATE decisions SET previous_epoch = (
    SELECT max(p.epoch) FROM decisions AS p
    WHERE p.run_id = decisions.run_id AND p.epoch < decisions.epoch
);
-- ListDecisions by time. WatchDecisions follows the implicit rowid: SQLite has one
-- writer at a time, so rowids grow in commit order and a cursor never skips a row.
CREATE INDEX decisions_by_time ON decisions (decided_at);

-- Runs matching a selector (non-empty fields must equal the run's labels) use the
-- pinned version instead of the active one. The most specific pin wins, ties go
-- to the most recently pinned. One pin per selector.
CREATE TABLE policy_pins (
    id                 INTEGER PRIMARY KEY,
    dataset            TEXT NOT NULL DEFAULT '',
    configuration      TEXT NOT NULL DEFAULT '',
    fold               TEXT NOT NULL DEFAULT '',
    version            TEXT NOT NULL REFERENCES policies (version),
    pinned_at          TEXT NOT NULL,
    actor              TEXT NOT NULL,
    UNIQUE (dataset, configuration, fold)
);

-- The shadow version: evaluated beside every real decision, never applied. At most one row.
CREATE TABLE shadow_policy (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    version            TEXT NOT NULL REFERENCES policies (version),
    set_at             TEXT NOT NULL,
    actor              TEXT NOT NULL
);

-- What the shadow version decided for a report, written in the transaction of the
-- real decision of the same (run_id, epoch). `state` is the shadow's fold state.
CREATE TABLE shadow_decisions (
    run_id             TEXT NOT NULL,
    epoch              INTEGER NOT NULL,
    decision_id        TEXT NOT NULL UNIQUE,
    action             TEXT NOT NULL,
    source             TEXT NOT NULL,
    reason             TEXT NOT NULL,
    policy_version     TEXT NOT NULL,
    decided_at         TEXT NOT NULL,
    lr                 REAL,
    loss_weights       TEXT NOT NULL,
    intervention_index INTEGER NOT NULL,
    override_id        INTEGER REFERENCES overrides (id),
    previous_epoch     INTEGER,
    state              TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch),
    FOREIGN KEY (run_id, epoch) REFERENCES decisions (run_id, epoch)
        DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX shadow_decisions_by_version ON shadow_decisions (policy_version);
