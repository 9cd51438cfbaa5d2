-- Issue 6: tamper-evident audit trail and the HSM key registry (PostgreSQL;
-- keep equivalent to migrations/sqlite).

-- Each entry is chained to the one before it: hash = SHA-256 over the
-- previous hash and the entry's fields; mac = HMAC-SHA256(audit key, hash)
-- under the data key `mac_key_id` (purpose `audit`, wrapped by the KEK).
-- Appends take a transaction-scoped advisory lock so the chain is linear.
-- Rows written before this migration have NULLs and are reported as
-- unchained by `cardvault audit verify`.
ALTER TABLE audit_log ADD COLUMN prev_hash BYTEA;
ALTER TABLE audit_log ADD COLUMN hash BYTEA;
ALTER TABLE audit_log ADD COLUMN mac BYTEA;
ALTER TABLE audit_log ADD COLUMN mac_key_id TEXT;

-- Checkpoints over the chain head, signed with an HMAC key inside the HSM
-- (`hsm_label`): an attacker with the database but not the HSM cannot cut
-- the tail of the log or rebuild the chain unnoticed.
CREATE TABLE audit_checkpoints (
    seq         BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    head_seq    BIGINT NOT NULL,
    head_hash   BYTEA NOT NULL CHECK (length(head_hash) = 32),
    entries     BIGINT NOT NULL,
    hsm_label   TEXT NOT NULL,
    signature   BYTEA NOT NULL CHECK (length(signature) = 32)
);

CREATE TRIGGER audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- The HSM keys the vault created (KEKs, merchant wrapping keys), with their
-- life cycle: `active` keys wrap new data keys, `retired` ones only unwrap
-- what still references them, `destroyed` ones are gone from the HSM.
CREATE TABLE hsm_keys (
    label         TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('kek', 'merchant')),
    merchant_id   TEXT,
    version       BIGINT NOT NULL CHECK (version >= 1),
    state         TEXT NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at    BIGINT NOT NULL,
    retired_at    BIGINT,
    destroyed_at  BIGINT
);

CREATE INDEX hsm_keys_owner ON hsm_keys (kind, merchant_id, version);
CREATE INDEX data_keys_wrapping_label ON data_keys (wrapping_label);
CREATE INDEX cards_dek ON cards (dek_id);
