-- 0005: the record's tamper evidence (control_server/chain.py says what is hashed).
--
-- Same conventions as 0001.

-- The chain value of each recorded epoch (NULL: recorded before this migration).
ALTER TABLE decisions ADD COLUMN chain TEXT;
ALTER TABLE superseded_decisions ADD COLUMN chain TEXT;

-- Every run, entered once, chained: a deleted run leaves its entry behind.
CREATE TABLE run_registry (
    seq                INTEGER PRIMARY KEY,
    run_id             TEXT NOT NULL UNIQUE,
    registered_at      TEXT NOT NULL,
    hash               TEXT NOT NULL
);
