-- Issue 6: tamper-evident audit trail and the HSM key registry (SQLite;
-- keep equivalent to migrations/postgres).

-- Each entry is chained to the one before it: hash = SHA-256 over the
-- previous hash and the entry's fields; mac = HMAC-SHA256(audit key, hash)
-- under the data key `mac_key_id` (purpose `audit`, wrapped by the KEK).
-- Rows written before this migration have NULLs and are reported as
-- unchained by `cardvault audit verify`.
ALTER TABLE audit_log ADD COLUMN prev_hash BLOB;
ALTER TABLE audit_log ADD COLUMN hash BLOB;
ALTER TABLE audit_log ADD COLUMN mac BLOB;
ALTER TABLE audit_log ADD COLUMN mac_key_id TEXT;

-- Checkpoints over the chain head, signed with an HMAC key inside the HSM
-- (`hsm_label`): an attacker with the database but not the HSM cannot cut
-- the tail of the log or rebuild the chain unnoticed.
CREATE TABLE audit_checkpoints (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_hash   BLOB NOT NULL CHECK (length(head_hash) = 32),
    entries     INTEGER NOT NULL,
    hsm_label   TEXT NOT NULL,
    signature   BLOB NOT NULL CHECK (length(signature) = 32)
) STRICT;

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only');
END;

-- The HSM keys the vault created (KEKs, merchant wrapping keys), with their
-- life cycle: `active` keys wrap new data keys, `retired` ones only unwrap
-- what still references them, `destroyed` ones are gone from the HSM.
CREATE TABLE hsm_keys (
    label         TEXT PRIMARY KEY NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('kek', 'merchant')),
    merchant_id   TEXT,
    version       INTEGER NOT NULL CHECK (version >= 1),
    state         TEXT NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at    INTEGER NOT NULL,
    retired_at    INTEGER,
    destroyed_at  INTEGER
) STRICT;

CREATE INDEX hsm_keys_owner ON hsm_keys (kind, merchant_id, version);
CREATE INDEX data_keys_wrapping_label ON data_keys (wrapping_label);
CREATE INDEX cards_dek ON cards (dek_id);
