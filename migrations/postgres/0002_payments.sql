-- cardvault schema v2 for PostgreSQL (keep equivalent to migrations/sqlite):
-- one-time tokens, charges, refunds, card verifications, the event outbox
-- and webhook endpoints/deliveries.
--
-- Still no plaintext PAN or CVV anywhere: a token's card number and CVV live
-- only in `payload`, sealed under the merchant's volatile key, and the
-- payload is NULLed the moment the token is used or expires.

CREATE TABLE card_tokens (
    id           TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL REFERENCES merchants (id),
    -- Set for a CVV re-capture token of a saved card.
    card_id      TEXT,
    -- Sealed JSON {number?, cvc?}; NULL once used or expired.
    payload      BYTEA CHECK (payload IS NULL OR octet_length(payload) > 0),
    last4        TEXT NOT NULL
                 CHECK (length(last4) = 4 AND last4 ~ '^[0-9]{4}$'),
    brand        TEXT NOT NULL,
    exp_month    BIGINT NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year     BIGINT NOT NULL CHECK (exp_year BETWEEN 1970 AND 9999),
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    used_at      BIGINT
);

CREATE INDEX card_tokens_expiry ON card_tokens (expires_at);

CREATE TABLE charges (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    merchant_id      TEXT NOT NULL REFERENCES merchants (id),
    customer_id      TEXT NOT NULL,
    -- Not a foreign key: a charge outlives the card it was made with.
    card_id          TEXT NOT NULL,
    amount           BIGINT NOT NULL CHECK (amount > 0),
    currency         TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('processing', 'pending', 'succeeded', 'failed', 'canceled')),
    captured         BIGINT NOT NULL CHECK (captured IN (0, 1)),
    amount_captured  BIGINT NOT NULL DEFAULT 0 CHECK (amount_captured >= 0),
    amount_refunded  BIGINT NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    capture_requested BIGINT NOT NULL CHECK (capture_requested IN (0, 1)),
    failure_code     TEXT,
    failure_message  TEXT,
    next_action      TEXT,
    description      TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    line_items       TEXT NOT NULL DEFAULT '[]',
    processor        TEXT NOT NULL,
    processor_ref    TEXT,
    -- Optimistic concurrency: every state change bumps it.
    version          BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    CHECK (amount_refunded <= amount_captured AND amount_captured <= amount)
);

CREATE INDEX charges_merchant_seq ON charges (merchant_id, seq);
CREATE INDEX charges_customer_seq ON charges (merchant_id, customer_id, seq);

CREATE TABLE refunds (
    id           TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL REFERENCES merchants (id),
    charge_id    TEXT NOT NULL REFERENCES charges (id),
    amount       BIGINT NOT NULL CHECK (amount > 0),
    status       TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE INDEX refunds_charge ON refunds (charge_id);

CREATE TABLE card_verifications (
    id           TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL REFERENCES merchants (id),
    card_id      TEXT NOT NULL,
    method       TEXT NOT NULL CHECK (method IN ('micro_charge', 'cvc')),
    status       TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    -- The micro-charge amount, sealed; NULL once the verification is over.
    amount_sealed BYTEA,
    currency     TEXT,
    attempts     BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    failure_code TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- The outbox: written in the transaction of the change it describes.
CREATE TABLE events (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    merchant_id  TEXT NOT NULL REFERENCES merchants (id),
    type         TEXT NOT NULL,
    -- JSON of the object after the change (never a PAN or CVV).
    data         TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE INDEX events_merchant_seq ON events (merchant_id, seq);

CREATE TABLE webhook_endpoints (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    merchant_id  TEXT NOT NULL REFERENCES merchants (id),
    url          TEXT NOT NULL,
    -- JSON array of event types, or ["*"].
    events       TEXT NOT NULL,
    -- Signing secret sealed under the merchant's key.
    secret_sealed BYTEA NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE INDEX webhook_endpoints_merchant ON webhook_endpoints (merchant_id, seq);

-- One row per (event, endpoint): created with the event, so a crash between
-- the change and the delivery loses nothing.
CREATE TABLE webhook_deliveries (
    seq              BIGSERIAL PRIMARY KEY,
    event_id         TEXT NOT NULL REFERENCES events (id),
    endpoint_id      TEXT NOT NULL,
    merchant_id      TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    -- Unix milliseconds (backoff is finer than a second).
    next_attempt_at  BIGINT NOT NULL,
    last_status      BIGINT,
    last_error       TEXT,
    updated_at       BIGINT NOT NULL,
    UNIQUE (event_id, endpoint_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
