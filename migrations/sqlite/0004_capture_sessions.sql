-- cardvault schema v4 for SQLite (keep equivalent to migrations/postgres):
-- hosted card-capture sessions.
--
-- A session holds no card data and no usable secret: only the SHA-256 of
-- its 256-bit secret. It hangs off its customer, so deleting the customer
-- (or shredding the merchant, which deletes its customers) deletes it.

CREATE TABLE capture_sessions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    merchant_id    TEXT NOT NULL REFERENCES merchants (id),
    customer_id    TEXT NOT NULL,
    -- Canonical scheme://host[:port] of the page allowed to embed it.
    allowed_origin TEXT NOT NULL CHECK (length(allowed_origin) BETWEEN 8 AND 200),
    secret_hash    BLOB NOT NULL CHECK (length(secret_hash) = 32),
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL CHECK (expires_at > created_at),
    used_at        INTEGER,
    -- The card saved through it; set together with used_at.
    card_id        TEXT,
    CHECK ((used_at IS NULL) = (card_id IS NULL)),
    FOREIGN KEY (customer_id, merchant_id)
        REFERENCES customers (id, merchant_id) ON DELETE CASCADE
) STRICT;

CREATE INDEX capture_sessions_expiry ON capture_sessions (expires_at);
CREATE INDEX capture_sessions_customer ON capture_sessions (customer_id);
