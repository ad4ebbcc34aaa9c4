-- 0004: operators' STOP and ROLLBACK overrides, an LR above the policy's cap, and
-- which override each one replaced (see migrations/0004_override_actions.sql).

ALTER TABLE overrides ADD COLUMN action text CHECK (action IN ('STOP', 'ROLLBACK'));
ALTER TABLE overrides ADD COLUMN rollback_epoch bigint;
ALTER TABLE overrides ADD COLUMN exceed_lr_cap boolean NOT NULL DEFAULT false;
ALTER TABLE overrides ADD COLUMN replaced_override_id bigint REFERENCES overrides (id);
