-- cardvault schema v1 for SQLite (keep equivalent to migrations/postgres).
--
-- Times are unix seconds. No column may ever hold a plaintext PAN or CVV:
-- cards keep the sealed PAN (`pan_ciphertext`) plus display metadata whose
-- CHECKs cap it at what the API may show (bin of 6/8 digits, last4).
-- STRICT tables make SQLite enforce the declared column types.

CREATE TABLE merchants (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- Only a SHA-256 of each key string is stored.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY NOT NULL,
    merchant_id   TEXT NOT NULL REFERENCES merchants (id),
    kind          TEXT NOT NULL CHECK (kind IN ('secret', 'publishable')),
    hash          BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    -- JSON array of scope names, e.g. ["cards:reveal"].
    scopes        TEXT NOT NULL DEFAULT '[]',
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    revoked_at    INTEGER
) STRICT;

CREATE INDEX api_keys_merchant ON api_keys (merchant_id);

-- `seq` orders listings newest first with a stable cursor; `id` is public.
CREATE TABLE customers (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    merchant_id      TEXT NOT NULL REFERENCES merchants (id),
    email            TEXT NOT NULL,
    first_name       TEXT,
    last_name        TEXT,
    phone            TEXT,
    -- JSON documents (`Document`, `Address`) and a JSON object of strings.
    document         TEXT,
    billing_address  TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    -- Declared before `cards` exists: SQLite resolves foreign keys lazily.
    default_card_id  TEXT REFERENCES cards (id) ON DELETE SET NULL,
    created_at       INTEGER NOT NULL,
    -- Target of the cards' (customer, merchant) foreign key.
    UNIQUE (id, merchant_id)
) STRICT;

CREATE INDEX customers_merchant_seq ON customers (merchant_id, seq);
CREATE INDEX customers_merchant_email ON customers (merchant_id, lower(email), seq);

CREATE TABLE cards (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    merchant_id     TEXT NOT NULL REFERENCES merchants (id),
    customer_id     TEXT NOT NULL,
    -- Sealed record: version || dek_id || nonce || ciphertext || tag.
    pan_ciphertext  BLOB NOT NULL CHECK (length(pan_ciphertext) > 0),
    dek_id          TEXT NOT NULL,
    -- Keyed HMAC of the PAN (never an unkeyed hash).
    fingerprint     BLOB NOT NULL CHECK (length(fingerprint) > 0),
    bin             TEXT NOT NULL
                    CHECK (length(bin) IN (6, 8) AND bin NOT GLOB '*[^0-9]*'),
    last4           TEXT NOT NULL
                    CHECK (length(last4) = 4 AND last4 NOT GLOB '*[^0-9]*'),
    pan_length      INTEGER NOT NULL CHECK (pan_length BETWEEN 12 AND 19),
    brand           TEXT NOT NULL,
    funding         TEXT NOT NULL,
    exp_month       INTEGER NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year        INTEGER NOT NULL CHECK (exp_year BETWEEN 1970 AND 9999),
    holder_name     TEXT,
    alias           TEXT,
    status          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    UNIQUE (customer_id, fingerprint),
    -- A card can only hang off a customer of the same merchant; deleting the
    -- customer deletes its cards (and so their ciphertext).
    FOREIGN KEY (customer_id, merchant_id)
        REFERENCES customers (id, merchant_id) ON DELETE CASCADE
) STRICT;

CREATE INDEX cards_merchant ON cards (merchant_id);

-- Data keys, wrapped under an HSM key (envelope mode) or naming an HSM key
-- object (hsm mode, `wrapped` is NULL).
CREATE TABLE data_keys (
    id              TEXT PRIMARY KEY NOT NULL,
    merchant_id     TEXT REFERENCES merchants (id),
    purpose         TEXT NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    mode            TEXT NOT NULL CHECK (mode IN ('envelope', 'hsm')),
    wrapped         BLOB,
    wrapping_label  TEXT NOT NULL,
    seals_reserved  INTEGER NOT NULL DEFAULT 0 CHECK (seals_reserved >= 0),
    created_at      INTEGER NOT NULL,
    retired_at      INTEGER
) STRICT;

-- One key per (owner, purpose, version): two nodes racing to create the same
-- version get a conflict instead of two keys. System keys have no merchant.
CREATE UNIQUE INDEX data_keys_owner_purpose_version
    ON data_keys (coalesce(merchant_id, ''), purpose, version);

CREATE TABLE idempotency_keys (
    merchant_id   TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  BLOB NOT NULL CHECK (length(request_hash) = 32),
    state         TEXT NOT NULL CHECK (state IN ('pending', 'completed')),
    status        INTEGER CHECK (status BETWEEN 100 AND 599),
    body          BLOB,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (merchant_id, key),
    CHECK (state = 'pending' OR (status IS NOT NULL AND body IS NOT NULL))
) STRICT;

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE audit_log (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    at           INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    merchant_id  TEXT,
    event        TEXT NOT NULL,
    resource     TEXT,
    outcome      TEXT NOT NULL,
    origin       TEXT,
    request_id   TEXT,
    detail       TEXT
) STRICT;

CREATE INDEX audit_log_merchant ON audit_log (merchant_id, seq);

-- The audit trail is append-only (PCI DSS 10.3): the application can add
-- entries but not rewrite or remove them.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
