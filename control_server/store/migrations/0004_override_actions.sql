-- 0004: operators' STOP and ROLLBACK overrides, an LR above the policy's cap, and
-- which override each one replaced.
--
-- Same conventions as 0001 (ISO-8601 UTC text timestamps, JSON text maps).

-- STOP or ROLLBACK (NULL: an LR / weights / hold override). A ROLLBACK's lr and
-- weights are what it restores: those reported at rollback_epoch, the epoch of the
-- intervention it undoes.
ALTER TABLE overrides ADD COLUMN action TEXT CHECK (action IN ('STOP', 'ROLLBACK'));
ALTER TABLE overrides ADD COLUMN rollback_epoch INTEGER;
-- The operator allowed lr above the cap of the policy steering the run (the reason
-- says why).
ALTER TABLE overrides ADD COLUMN exceed_lr_cap INTEGER NOT NULL DEFAULT 0
    CHECK (exceed_lr_cap IN (0, 1));
-- The override that was active when this one was set, and that this one cleared.
ALTER TABLE overrides ADD COLUMN replaced_override_id INTEGER REFERENCES overrides (id);
