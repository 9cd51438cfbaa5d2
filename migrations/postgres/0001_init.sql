-- cardvault schema v1 for PostgreSQL (keep equivalent to migrations/sqlite).
--
-- Times are unix seconds. No column may ever hold a plaintext PAN or CVV:
-- cards keep the sealed PAN (`pan_ciphertext`) plus display metadata whose
-- CHECKs cap it at what the API may show (bin of 6/8 digits, last4).
-- Integer columns are BIGINT because the records carry i64.

CREATE TABLE merchants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Only a SHA-256 of each key string is stored.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    merchant_id   TEXT NOT NULL REFERENCES merchants (id),
    kind          TEXT NOT NULL CHECK (kind IN ('secret', 'publishable')),
    hash          BYTEA NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    -- JSON array of scope names, e.g. ["cards:reveal"].
    scopes        TEXT NOT NULL DEFAULT '[]',
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);

CREATE INDEX api_keys_merchant ON api_keys (merchant_id);

-- `seq` orders listings newest first with a stable cursor; `id` is public.
CREATE TABLE customers (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    merchant_id      TEXT NOT NULL REFERENCES merchants (id),
    email            TEXT NOT NULL,
    first_name       TEXT,
    last_name        TEXT,
    phone            TEXT,
    -- JSON documents (`Document`, `Address`) and a JSON object of strings,
    -- kept as text so both backends store the same bytes.
    document         TEXT,
    billing_address  TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    -- Foreign key added below, once `cards` exists.
    default_card_id  TEXT,
    created_at       BIGINT NOT NULL,
    -- Target of the cards' (customer, merchant) foreign key.
    UNIQUE (id, merchant_id)
);

CREATE INDEX customers_merchant_seq ON customers (merchant_id, seq);
CREATE INDEX customers_merchant_email ON customers (merchant_id, lower(email), seq);

CREATE TABLE cards (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    merchant_id     TEXT NOT NULL REFERENCES merchants (id),
    customer_id     TEXT NOT NULL,
    -- Sealed record: version || dek_id || nonce || ciphertext || tag.
    pan_ciphertext  BYTEA NOT NULL CHECK (octet_length(pan_ciphertext) > 0),
    dek_id          TEXT NOT NULL,
    -- Keyed HMAC of the PAN (never an unkeyed hash).
    fingerprint     BYTEA NOT NULL CHECK (octet_length(fingerprint) > 0),
    bin             TEXT NOT NULL CHECK (bin ~ '^[0-9]{6}([0-9]{2})?$'),
    last4           TEXT NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    pan_length      BIGINT NOT NULL CHECK (pan_length BETWEEN 12 AND 19),
    brand           TEXT NOT NULL,
    funding         TEXT NOT NULL,
    exp_month       BIGINT NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year        BIGINT NOT NULL CHECK (exp_year BETWEEN 1970 AND 9999),
    holder_name     TEXT,
    alias           TEXT,
    status          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    UNIQUE (customer_id, fingerprint),
    -- A card can only hang off a customer of the same merchant; deleting the
    -- customer deletes its cards (and so their ciphertext).
    FOREIGN KEY (customer_id, merchant_id)
        REFERENCES customers (id, merchant_id) ON DELETE CASCADE
);

CREATE INDEX cards_merchant ON cards (merchant_id);

ALTER TABLE customers
    ADD CONSTRAINT customers_default_card_fkey
    FOREIGN KEY (default_card_id) REFERENCES cards (id) ON DELETE SET NULL;

-- Data keys, wrapped under an HSM key (envelope mode) or naming an HSM key
-- object (hsm mode, `wrapped` is NULL).
CREATE TABLE data_keys (
    id              TEXT PRIMARY KEY,
    merchant_id     TEXT REFERENCES merchants (id),
    purpose         TEXT NOT NULL,
    version         BIGINT NOT NULL CHECK (version >= 1),
    mode            TEXT NOT NULL CHECK (mode IN ('envelope', 'hsm')),
    wrapped         BYTEA,
    wrapping_label  TEXT NOT NULL,
    seals_reserved  BIGINT NOT NULL DEFAULT 0 CHECK (seals_reserved >= 0),
    created_at      BIGINT NOT NULL,
    retired_at      BIGINT
);

-- One key per (owner, purpose, version): two nodes racing to create the same
-- version get a conflict instead of two keys. System keys have no merchant.
CREATE UNIQUE INDEX data_keys_owner_purpose_version
    ON data_keys (coalesce(merchant_id, ''), purpose, version);

CREATE TABLE idempotency_keys (
    merchant_id   TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  BYTEA NOT NULL CHECK (octet_length(request_hash) = 32),
    state         TEXT NOT NULL CHECK (state IN ('pending', 'completed')),
    status        BIGINT CHECK (status BETWEEN 100 AND 599),
    body          BYTEA,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, key),
    CHECK (state = 'pending' OR (status IS NOT NULL AND body IS NOT NULL))
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE audit_log (
    seq          BIGSERIAL PRIMARY KEY,
    at           BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    merchant_id  TEXT,
    event        TEXT NOT NULL,
    resource     TEXT,
    outcome      TEXT NOT NULL,
    origin       TEXT,
    request_id   TEXT,
    detail       TEXT
);

CREATE INDEX audit_log_merchant ON audit_log (merchant_id, seq);

-- The audit trail is append-only (PCI DSS 10.3): the application can add
-- entries but not rewrite or remove them.
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
