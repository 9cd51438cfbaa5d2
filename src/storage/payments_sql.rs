//! SQL for the payment stores ([`super::payments`]), shared by SQLite and
//! PostgreSQL: the statements use only syntax both accept (`RETURNING`,
//! `INSERT … SELECT`, optimistic `version` checks instead of row locks), so
//! one macro generates both implementations. The only backend differences,
//! placeholders (`?` vs `$n`), how a write transaction begins and how
//! errors are classified, come from the backend modules.

use std::borrow::Cow;

use async_trait::async_trait;

use super::common::{into_page, page_fetch_limit};
use super::payments::{
    ChargeRecord, ChargeStore, DeliveryAttempt, DeliveryRecord, DueDelivery, EventRecord,
    EventStore, LineItem, RefundRecord, TokenRecord, TokenStore, TokenTake, Unsettled,
    VerificationRecord, VerificationStore, WebhookEndpointRecord, WebhookStore,
};
use super::{AuditEntry, Metadata, Page, PgStorage, SqliteStorage, StorageError, StorageResult};

/// How long a used or expired token row is kept (payload already gone) so
/// that a second use is told "used" rather than "no such token".
const TOKEN_TOMBSTONE_SECS: i64 = 24 * 3600;

pub(super) fn sqlite_sql(sql: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(sql)
}

/// Rewrites `?` placeholders as PostgreSQL's `$1, $2, …`. The statements
/// here never contain a literal `?`.
pub(super) fn pg_sql(sql: &'static str) -> Cow<'static, str> {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StorageError {
    StorageError::Other(format!("corrupt {what} row: {err}"))
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> StorageResult<String> {
    serde_json::to_string(v).map_err(|e| StorageError::Other(format!("cannot encode {what}: {e}")))
}

macro_rules! token_columns {
    () => {
        "id, merchant_id, card_id, payload, last4, brand, exp_month, exp_year, created_at, \
         expires_at, used_at"
    };
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: String,
    merchant_id: String,
    card_id: Option<String>,
    payload: Option<Vec<u8>>,
    last4: String,
    brand: String,
    exp_month: i64,
    exp_year: i64,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

impl From<TokenRow> for TokenRecord {
    fn from(r: TokenRow) -> Self {
        TokenRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            card_id: r.card_id,
            payload: r.payload,
            last4: r.last4,
            brand: r.brand,
            exp_month: r.exp_month,
            exp_year: r.exp_year,
            created_at: r.created_at,
            expires_at: r.expires_at,
            used_at: r.used_at,
        }
    }
}

macro_rules! charge_columns {
    () => {
        "id, merchant_id, customer_id, card_id, amount, currency, status, captured, \
         amount_captured, amount_refunded, capture_requested, failure_code, failure_message, \
         next_action, description, metadata, line_items, processor, processor_ref, version, \
         created_at, updated_at, pending_action, pending_amount"
    };
}
pub(super) use charge_columns;

#[derive(sqlx::FromRow)]
struct ChargeRow {
    id: String,
    merchant_id: String,
    customer_id: String,
    card_id: String,
    amount: i64,
    currency: String,
    status: String,
    captured: i64,
    amount_captured: i64,
    amount_refunded: i64,
    capture_requested: i64,
    failure_code: Option<String>,
    failure_message: Option<String>,
    next_action: Option<String>,
    description: Option<String>,
    metadata: String,
    line_items: String,
    processor: String,
    processor_ref: Option<String>,
    version: i64,
    created_at: i64,
    updated_at: i64,
    pending_action: Option<String>,
    pending_amount: Option<i64>,
}

impl TryFrom<ChargeRow> for ChargeRecord {
    type Error = StorageError;
    fn try_from(r: ChargeRow) -> StorageResult<Self> {
        Ok(ChargeRecord {
            metadata: serde_json::from_str::<Metadata>(&r.metadata)
                .map_err(|e| corrupt("charges.metadata", e))?,
            line_items: serde_json::from_str::<Vec<LineItem>>(&r.line_items)
                .map_err(|e| corrupt("charges.line_items", e))?,
            id: r.id,
            merchant_id: r.merchant_id,
            customer_id: r.customer_id,
            card_id: r.card_id,
            amount: r.amount,
            currency: r.currency,
            status: r.status,
            captured: r.captured != 0,
            amount_captured: r.amount_captured,
            amount_refunded: r.amount_refunded,
            capture_requested: r.capture_requested != 0,
            failure_code: r.failure_code,
            failure_message: r.failure_message,
            next_action: r.next_action,
            description: r.description,
            processor: r.processor,
            processor_ref: r.processor_ref,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            pending_action: r.pending_action,
            pending_amount: r.pending_amount,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RefundRow {
    id: String,
    merchant_id: String,
    charge_id: String,
    amount: i64,
    status: String,
    created_at: i64,
}

impl From<RefundRow> for RefundRecord {
    fn from(r: RefundRow) -> Self {
        RefundRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            charge_id: r.charge_id,
            amount: r.amount,
            status: r.status,
            created_at: r.created_at,
        }
    }
}

macro_rules! verification_columns {
    () => {
        "id, merchant_id, card_id, method, status, amount_sealed, currency, attempts, \
         max_attempts, failure_code, created_at, updated_at"
    };
}

#[derive(sqlx::FromRow)]
struct VerificationRow {
    id: String,
    merchant_id: String,
    card_id: String,
    method: String,
    status: String,
    amount_sealed: Option<Vec<u8>>,
    currency: Option<String>,
    attempts: i64,
    max_attempts: i64,
    failure_code: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl From<VerificationRow> for VerificationRecord {
    fn from(r: VerificationRow) -> Self {
        VerificationRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            card_id: r.card_id,
            method: r.method,
            status: r.status,
            amount_sealed: r.amount_sealed,
            currency: r.currency,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            failure_code: r.failure_code,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: String,
    merchant_id: String,
    #[sqlx(rename = "type")]
    event_type: String,
    data: String,
    created_at: i64,
}

impl From<EventRow> for EventRecord {
    fn from(r: EventRow) -> Self {
        EventRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            event_type: r.event_type,
            data: r.data,
            created_at: r.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct EndpointRow {
    id: String,
    merchant_id: String,
    url: String,
    events: String,
    secret_sealed: Vec<u8>,
    created_at: i64,
}

impl TryFrom<EndpointRow> for WebhookEndpointRecord {
    type Error = StorageError;
    fn try_from(r: EndpointRow) -> StorageResult<Self> {
        Ok(WebhookEndpointRecord {
            events: serde_json::from_str(&r.events).map_err(|e| corrupt("webhook_endpoints", e))?,
            id: r.id,
            merchant_id: r.merchant_id,
            url: r.url,
            secret_sealed: r.secret_sealed,
            created_at: r.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    event_id: String,
    event_type: String,
    endpoint_id: String,
    status: String,
    attempts: i64,
    next_attempt_at: i64,
    last_status: Option<i64>,
    last_error: Option<String>,
    updated_at: i64,
}

impl From<DeliveryRow> for DeliveryRecord {
    fn from(r: DeliveryRow) -> Self {
        DeliveryRecord {
            event_id: r.event_id,
            event_type: r.event_type,
            endpoint_id: r.endpoint_id,
            status: r.status,
            attempts: r.attempts,
            next_attempt_at: r.next_attempt_at,
            last_status: r.last_status,
            last_error: r.last_error,
            updated_at: r.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DueRow {
    seq: i64,
    attempts: i64,
    next_at: i64,
    ev_id: String,
    ev_merchant_id: String,
    ev_type: String,
    ev_data: String,
    ev_created_at: i64,
    ep_id: String,
    ep_url: String,
    ep_events: String,
    ep_secret_sealed: Vec<u8>,
    ep_created_at: i64,
}

impl TryFrom<DueRow> for DueDelivery {
    type Error = StorageError;
    fn try_from(r: DueRow) -> StorageResult<Self> {
        Ok(DueDelivery {
            seq: r.seq,
            attempts: r.attempts,
            endpoint: WebhookEndpointRecord {
                id: r.ep_id,
                merchant_id: r.ev_merchant_id.clone(),
                url: r.ep_url,
                events: serde_json::from_str(&r.ep_events)
                    .map_err(|e| corrupt("webhook_endpoints", e))?,
                secret_sealed: r.ep_secret_sealed,
                created_at: r.ep_created_at,
            },
            event: EventRecord {
                id: r.ev_id,
                merchant_id: r.ev_merchant_id,
                event_type: r.ev_type,
                data: r.ev_data,
                created_at: r.ev_created_at,
            },
        })
    }
}

/// Events of the customer and card lifecycle, written by the customer and
/// card stores in the transaction of the change. Their data is a minimal,
/// non-sensitive view (ids, last4, brand, expiry), never a PAN.
pub(super) mod lifecycle {
    use serde_json::json;

    use crate::domain::new_id;
    use crate::storage::{CardRecord, CustomerRecord, EventRecord};

    fn event(merchant_id: &str, event_type: &str, data: serde_json::Value, at: i64) -> EventRecord {
        EventRecord {
            id: new_id("evt"),
            merchant_id: merchant_id.to_string(),
            event_type: event_type.to_string(),
            data: data.to_string(),
            created_at: at,
        }
    }

    pub fn customer_created(c: &CustomerRecord, at: i64) -> EventRecord {
        let data =
            json!({"id": c.id, "object": "customer", "email": c.email, "created": c.created_at});
        event(&c.merchant_id, "customer.created", data, at)
    }

    pub fn customer_deleted(merchant_id: &str, id: &str, at: i64) -> EventRecord {
        let data = json!({"id": id, "object": "customer", "deleted": true});
        event(merchant_id, "customer.deleted", data, at)
    }

    fn card_data(c: &CardRecord) -> serde_json::Value {
        json!({
            "id": c.id, "object": "card", "customer": c.customer_id, "last4": c.last4,
            "brand": c.brand, "exp_month": c.exp_month, "exp_year": c.exp_year,
            "status": c.status, "created": c.created_at,
        })
    }

    pub fn card_created(c: &CardRecord, at: i64) -> EventRecord {
        event(&c.merchant_id, "card.created", card_data(c), at)
    }

    pub fn card_deleted(c: &CardRecord, at: i64) -> EventRecord {
        let mut data = card_data(c);
        data["deleted"] = json!(true);
        event(&c.merchant_id, "card.deleted", data, at)
    }
}

/// Implements the payment stores for one backend. `$q` adapts placeholders,
/// `$begin` starts a write transaction, `$err` classifies errors and
/// `$audit` appends an audit entry inside a transaction.
macro_rules! impl_payment_stores {
    ($storage:ty, $q:path, $begin:path, $err:path, $audit:path) => {
        impl $storage {
            /// Appends events and their webhook deliveries inside the
            /// caller's transaction with one multi-row insert and one
            /// fan-out per 500 events (the group-commit flush).
            pub(super) async fn insert_event_rows(
                conn: &mut <<Self as BackendDb>::Db as sqlx::Database>::Connection,
                events: &[EventRecord],
            ) -> StorageResult<()> {
                for chunk in events.chunks(500) {
                    let mut insert = sqlx::QueryBuilder::<<Self as BackendDb>::Db>::new(
                        "INSERT INTO events (id, merchant_id, type, data, created_at) ",
                    );
                    insert.push_values(chunk, |mut row, e| {
                        row.push_bind(&e.id)
                            .push_bind(&e.merchant_id)
                            .push_bind(&e.event_type)
                            .push_bind(&e.data)
                            .push_bind(e.created_at);
                    });
                    insert
                        .build()
                        .execute(&mut *conn)
                        .await
                        .map_err($err)?;
                    // Same fan-out as `insert_events`, for the whole chunk.
                    let mut fan_out = sqlx::QueryBuilder::<<Self as BackendDb>::Db>::new(
                        "INSERT INTO webhook_deliveries (event_id, endpoint_id, merchant_id, \
                         status, attempts, next_attempt_at, updated_at) \
                         SELECT e.id, w.id, w.merchant_id, 'pending', 0, e.created_at * 1000, \
                         e.created_at FROM events e JOIN webhook_endpoints w \
                         ON w.merchant_id = e.merchant_id AND (w.events LIKE '%\"*\"%' \
                         OR w.events LIKE '%\"' || e.type || '\"%') WHERE e.id IN (",
                    );
                    let mut ids = fan_out.separated(", ");
                    for e in chunk {
                        ids.push_bind(&e.id);
                    }
                    ids.push_unseparated(")");
                    fan_out
                        .build()
                        .execute(&mut *conn)
                        .await
                        .map_err($err)?;
                }
                Ok(())
            }

            /// Appends events (and their webhook deliveries) inside `tx`.
            pub(super) async fn insert_events<'c>(
                tx: &mut sqlx::Transaction<'c, <Self as BackendDb>::Db>,
                events: &[EventRecord],
            ) -> StorageResult<()> {
                for e in events {
                    sqlx::query(&$q(
                        "INSERT INTO events (id, merchant_id, type, data, created_at) \
                         VALUES (?, ?, ?, ?, ?)",
                    ))
                    .bind(&e.id)
                    .bind(&e.merchant_id)
                    .bind(&e.event_type)
                    .bind(&e.data)
                    .bind(e.created_at)
                    .execute(&mut **tx)
                    .await
                    .map_err($err)?;
                    // Fan out to subscribed endpoints in the same transaction:
                    // a delivery exists as soon as its event does. The LIKE may
                    // over-match (`_`); the worker checks subscriptions again.
                    sqlx::query(&$q(
                        "INSERT INTO webhook_deliveries (event_id, endpoint_id, merchant_id, \
                         status, attempts, next_attempt_at, updated_at) \
                         SELECT ?, id, merchant_id, 'pending', 0, ?, ? FROM webhook_endpoints \
                         WHERE merchant_id = ? AND (events LIKE '%\"*\"%' \
                         OR events LIKE '%\"' || ? || '\"%')",
                    ))
                    .bind(&e.id)
                    // next_attempt_at is in unix milliseconds.
                    .bind(e.created_at.saturating_mul(1000))
                    .bind(e.created_at)
                    .bind(&e.merchant_id)
                    .bind(&e.event_type)
                    .execute(&mut **tx)
                    .await
                    .map_err($err)?;
                }
                Ok(())
            }
        }

        #[async_trait]
        impl TokenStore for $storage {
            async fn insert_token(&self, t: &TokenRecord, audit: &AuditEntry) -> StorageResult<()> {
                let mut tx = $begin(self).await?;
                sqlx::query(&$q(
                    "INSERT INTO card_tokens (id, merchant_id, card_id, payload, last4, brand, \
                     exp_month, exp_year, created_at, expires_at, used_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ))
                .bind(&t.id)
                .bind(&t.merchant_id)
                .bind(&t.card_id)
                .bind(&t.payload)
                .bind(&t.last4)
                .bind(&t.brand)
                .bind(t.exp_month)
                .bind(t.exp_year)
                .bind(t.created_at)
                .bind(t.expires_at)
                .bind(t.used_at)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }

            async fn take_token(
                &self,
                merchant_id: &str,
                id: &str,
                now: i64,
                audit: &AuditEntry,
            ) -> StorageResult<Option<TokenTake>> {
                let mut tx = $begin(self).await?;
                let row: Option<TokenRow> = sqlx::query_as(&$q(concat!(
                    "SELECT ",
                    token_columns!(),
                    " FROM card_tokens WHERE merchant_id = ? AND id = ?"
                )))
                    .bind(merchant_id)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err($err)?;
                let Some(token) = row.map(TokenRecord::from) else {
                    return Ok(None);
                };
                if token.used_at.is_some() {
                    return Ok(Some(TokenTake::Used));
                }
                if token.expires_at <= now || token.payload.is_none() {
                    return Ok(Some(TokenTake::Expired));
                }
                // The WHERE re-checks under the write lock (PostgreSQL
                // re-evaluates it after a concurrent taker commits), so at
                // most one caller ever gets the payload.
                let done = sqlx::query(&$q(
                    "UPDATE card_tokens SET payload = NULL, used_at = ? \
                     WHERE merchant_id = ? AND id = ? AND used_at IS NULL AND expires_at > ?",
                ))
                .bind(now)
                .bind(merchant_id)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                if done.rows_affected() != 1 {
                    return Ok(Some(TokenTake::Used));
                }
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)?;
                Ok(Some(TokenTake::Taken(token)))
            }

            async fn sweep_tokens(&self, now: i64) -> StorageResult<u64> {
                let mut tx = $begin(self).await?;
                let purged = sqlx::query(&$q(
                    "UPDATE card_tokens SET payload = NULL \
                     WHERE payload IS NOT NULL AND expires_at <= ?",
                ))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err($err)?
                .rows_affected();
                sqlx::query(&$q("DELETE FROM card_tokens WHERE expires_at <= ?"))
                    .bind(now - TOKEN_TOMBSTONE_SECS)
                    .execute(&mut *tx)
                    .await
                    .map_err($err)?;
                tx.commit().await.map_err($err)?;
                Ok(purged)
            }
        }

        #[async_trait]
        impl ChargeStore for $storage {
            async fn insert_charge(
                &self,
                c: &ChargeRecord,
                events: &[EventRecord],
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                self.writer
                    .defer($crate::storage::group::NewCharge {
                        metadata: encode("metadata", &c.metadata)?,
                        line_items: encode("line_items", &c.line_items)?,
                        charge: c.clone(),
                        events: events.to_vec(),
                        audit: audit.clone(),
                    })
                    .await
            }

            async fn update_charge(
                &self,
                c: &ChargeRecord,
                expected_version: i64,
                refund: Option<&RefundRecord>,
                events: &[EventRecord],
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let Some(refund) = refund else {
                    // The common case joins the batch's multi-row update.
                    return self
                        .writer
                        .defer($crate::storage::group::ChargeChange {
                            charge: c.clone(),
                            expected_version,
                            events: events.to_vec(),
                            audit: audit.clone(),
                        })
                        .await;
                };
                let (c, r, events, audit) =
                    (c.clone(), refund.clone(), events.to_vec(), audit.clone());
                self.writer.run(move |batch| Box::pin(async move {
                <$storage>::update_one_charge(&mut *batch.tx, &c, expected_version).await?;
                sqlx::query(&$q(
                    "INSERT INTO refunds (id, merchant_id, charge_id, amount, status, \
                     created_at) VALUES (?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status \
                     WHERE refunds.status = 'pending'",
                ))
                .bind(&r.id)
                .bind(&r.merchant_id)
                .bind(&r.charge_id)
                .bind(r.amount)
                .bind(&r.status)
                .bind(r.created_at)
                .execute(&mut *batch.tx)
                .await
                .map_err($err)?;
                for e in events {
                    batch.event(e);
                }
                batch.audit(audit);
                Ok(())
                })).await
            }

            async fn get_charge(
                &self,
                merchant_id: &str,
                id: &str,
            ) -> StorageResult<Option<ChargeRecord>> {
                let row: Option<ChargeRow> = sqlx::query_as(&$q(concat!(
                    "SELECT ",
                    charge_columns!(),
                    " FROM charges WHERE merchant_id = ? AND id = ?"
                )))
                .bind(merchant_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err($err)?;
                row.map(ChargeRecord::try_from).transpose()
            }

            async fn unsettled_charges(
                &self,
                kind: Unsettled,
                processor: &str,
                before: i64,
                after: (i64, &str),
                limit: u32,
            ) -> StorageResult<Vec<ChargeRecord>> {
                // The first condition is the predicate of the partial index
                // (`charges_unsettled`, `charges_pending_action`), written
                // the same way so both planners use it.
                let sql = match kind {
                    Unsettled::Authorization => concat!(
                        "SELECT ",
                        charge_columns!(),
                        " FROM charges WHERE status IN ('processing', 'pending') \
                         AND updated_at < ? \
                         AND (updated_at > ? OR (updated_at = ? AND id > ?)) \
                         AND (status = 'processing' OR failure_code = 'processor_unavailable') \
                         AND processor = ? \
                         ORDER BY updated_at, id LIMIT ?"
                    ),
                    Unsettled::Action => concat!(
                        "SELECT ",
                        charge_columns!(),
                        " FROM charges WHERE pending_action IS NOT NULL \
                         AND updated_at < ? \
                         AND (updated_at > ? OR (updated_at = ? AND id > ?)) \
                         AND processor = ? \
                         ORDER BY updated_at, id LIMIT ?"
                    ),
                };
                let rows: Vec<ChargeRow> = sqlx::query_as(&$q(sql))
                    .bind(before)
                    .bind(after.0)
                    .bind(after.0)
                    .bind(after.1)
                    .bind(processor)
                    .bind(i64::from(limit))
                    .fetch_all(self.pool())
                    .await
                    .map_err($err)?;
                rows.into_iter().map(ChargeRecord::try_from).collect()
            }

            async fn list_charges(
                &self,
                merchant_id: &str,
                customer_id: Option<&str>,
                limit: u32,
                starting_after: Option<&str>,
            ) -> StorageResult<Page<ChargeRecord>> {
                let cursor: i64 = match starting_after {
                    None => i64::MAX,
                    Some(after) => sqlx::query_scalar(&$q(
                        "SELECT seq FROM charges WHERE merchant_id = ? AND id = ?",
                    ))
                    .bind(merchant_id)
                    .bind(after)
                    .fetch_optional(self.pool())
                    .await
                    .map_err($err)?
                    .ok_or(StorageError::NotFound)?,
                };
                let rows: Vec<ChargeRow> = sqlx::query_as(&$q(concat!(
                    "SELECT ",
                    charge_columns!(),
                    " FROM charges WHERE merchant_id = ? AND (? IS NULL OR customer_id = ?) \
                     AND seq < ? ORDER BY seq DESC LIMIT ?"
                )))
                .bind(merchant_id)
                .bind(customer_id)
                .bind(customer_id)
                .bind(cursor)
                .bind(page_fetch_limit(limit))
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                let rows = rows
                    .into_iter()
                    .map(ChargeRecord::try_from)
                    .collect::<StorageResult<Vec<_>>>()?;
                Ok(into_page(rows, limit))
            }

            async fn pending_refunds(
                &self,
                processor: &str,
                before: i64,
                after: (i64, &str),
                limit: u32,
            ) -> StorageResult<Vec<RefundRecord>> {
                // `r.status = 'pending'` is the predicate of the partial
                // index `refunds_pending`.
                let rows: Vec<RefundRow> = sqlx::query_as(&$q(
                    "SELECT r.id, r.merchant_id, r.charge_id, r.amount, r.status, r.created_at \
                     FROM refunds r JOIN charges c ON c.id = r.charge_id \
                     WHERE r.status = 'pending' AND r.created_at < ? \
                     AND (r.created_at > ? OR (r.created_at = ? AND r.id > ?)) \
                     AND c.processor = ? \
                     ORDER BY r.created_at, r.id LIMIT ?",
                ))
                .bind(before)
                .bind(after.0)
                .bind(after.0)
                .bind(after.1)
                .bind(processor)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                Ok(rows.into_iter().map(RefundRecord::from).collect())
            }

            async fn list_refunds(
                &self,
                merchant_id: &str,
                charge_id: &str,
            ) -> StorageResult<Vec<RefundRecord>> {
                let rows: Vec<RefundRow> = sqlx::query_as(&$q(
                    "SELECT id, merchant_id, charge_id, amount, status, created_at FROM refunds \
                     WHERE merchant_id = ? AND charge_id = ? ORDER BY created_at, id",
                ))
                .bind(merchant_id)
                .bind(charge_id)
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                Ok(rows.into_iter().map(RefundRecord::from).collect())
            }
        }

        #[async_trait]
        impl VerificationStore for $storage {
            async fn insert_verification(
                &self,
                v: &VerificationRecord,
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let mut tx = $begin(self).await?;
                sqlx::query(&$q(
                    "INSERT INTO card_verifications (id, merchant_id, card_id, method, status, \
                     amount_sealed, currency, attempts, max_attempts, failure_code, created_at, \
                     updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ))
                .bind(&v.id)
                .bind(&v.merchant_id)
                .bind(&v.card_id)
                .bind(&v.method)
                .bind(&v.status)
                .bind(&v.amount_sealed)
                .bind(&v.currency)
                .bind(v.attempts)
                .bind(v.max_attempts)
                .bind(&v.failure_code)
                .bind(v.created_at)
                .bind(v.updated_at)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }

            async fn get_verification(
                &self,
                merchant_id: &str,
                id: &str,
            ) -> StorageResult<Option<VerificationRecord>> {
                let row: Option<VerificationRow> = sqlx::query_as(&$q(concat!(
                    "SELECT ",
                    verification_columns!(),
                    " FROM card_verifications WHERE merchant_id = ? AND id = ?"
                )))
                    .bind(merchant_id)
                    .bind(id)
                    .fetch_optional(self.pool())
                    .await
                    .map_err($err)?;
                Ok(row.map(VerificationRecord::from))
            }

            async fn update_verification(
                &self,
                v: &VerificationRecord,
                expected_attempts: i64,
                card_status: Option<&str>,
                events: &[EventRecord],
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let mut tx = $begin(self).await?;
                let done = sqlx::query(&$q(
                    "UPDATE card_verifications SET status = ?, amount_sealed = ?, attempts = ?, \
                     failure_code = ?, updated_at = ? \
                     WHERE merchant_id = ? AND id = ? AND attempts = ? AND status = 'pending'",
                ))
                .bind(&v.status)
                .bind(&v.amount_sealed)
                .bind(v.attempts)
                .bind(&v.failure_code)
                .bind(v.updated_at)
                .bind(&v.merchant_id)
                .bind(&v.id)
                .bind(expected_attempts)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                if done.rows_affected() != 1 {
                    return Err(StorageError::Conflict(
                        "the verification changed concurrently".to_string(),
                    ));
                }
                if let Some(status) = card_status {
                    sqlx::query(&$q("UPDATE cards SET status = ? WHERE merchant_id = ? AND id = ?"))
                        .bind(status)
                        .bind(&v.merchant_id)
                        .bind(&v.card_id)
                        .execute(&mut *tx)
                        .await
                        .map_err($err)?;
                }
                Self::insert_events(&mut tx, events).await?;
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }
        }

        #[async_trait]
        impl EventStore for $storage {
            async fn list_events(
                &self,
                merchant_id: &str,
                event_type: Option<&str>,
                limit: u32,
                starting_after: Option<&str>,
            ) -> StorageResult<Page<EventRecord>> {
                let cursor: i64 = match starting_after {
                    None => i64::MAX,
                    Some(after) => sqlx::query_scalar(&$q(
                        "SELECT seq FROM events WHERE merchant_id = ? AND id = ?",
                    ))
                    .bind(merchant_id)
                    .bind(after)
                    .fetch_optional(self.pool())
                    .await
                    .map_err($err)?
                    .ok_or(StorageError::NotFound)?,
                };
                let rows: Vec<EventRow> = sqlx::query_as(&$q(
                    "SELECT id, merchant_id, type, data, created_at FROM events \
                     WHERE merchant_id = ? AND (? IS NULL OR type = ?) AND seq < ? \
                     ORDER BY seq DESC LIMIT ?",
                ))
                .bind(merchant_id)
                .bind(event_type)
                .bind(event_type)
                .bind(cursor)
                .bind(page_fetch_limit(limit))
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                Ok(into_page(rows.into_iter().map(EventRecord::from).collect(), limit))
            }

            async fn get_event(
                &self,
                merchant_id: &str,
                id: &str,
            ) -> StorageResult<Option<EventRecord>> {
                let row: Option<EventRow> = sqlx::query_as(&$q(
                    "SELECT id, merchant_id, type, data, created_at FROM events \
                     WHERE merchant_id = ? AND id = ?",
                ))
                .bind(merchant_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err($err)?;
                Ok(row.map(EventRecord::from))
            }
        }

        #[async_trait]
        impl WebhookStore for $storage {
            async fn insert_webhook_endpoint(
                &self,
                e: &WebhookEndpointRecord,
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let events = encode("events", &e.events)?;
                let mut tx = $begin(self).await?;
                sqlx::query(&$q(
                    "INSERT INTO webhook_endpoints (id, merchant_id, url, events, secret_sealed, \
                     created_at) VALUES (?, ?, ?, ?, ?, ?)",
                ))
                .bind(&e.id)
                .bind(&e.merchant_id)
                .bind(&e.url)
                .bind(events)
                .bind(&e.secret_sealed)
                .bind(e.created_at)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }

            async fn list_webhook_endpoints(
                &self,
                merchant_id: &str,
            ) -> StorageResult<Vec<WebhookEndpointRecord>> {
                let rows: Vec<EndpointRow> = sqlx::query_as(&$q(
                    "SELECT id, merchant_id, url, events, secret_sealed, created_at \
                     FROM webhook_endpoints WHERE merchant_id = ? ORDER BY seq",
                ))
                .bind(merchant_id)
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                rows.into_iter().map(WebhookEndpointRecord::try_from).collect()
            }

            async fn get_webhook_endpoint(
                &self,
                merchant_id: &str,
                id: &str,
            ) -> StorageResult<Option<WebhookEndpointRecord>> {
                let row: Option<EndpointRow> = sqlx::query_as(&$q(
                    "SELECT id, merchant_id, url, events, secret_sealed, created_at \
                     FROM webhook_endpoints WHERE merchant_id = ? AND id = ?",
                ))
                .bind(merchant_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err($err)?;
                row.map(WebhookEndpointRecord::try_from).transpose()
            }

            async fn delete_webhook_endpoint(
                &self,
                merchant_id: &str,
                id: &str,
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let mut tx = $begin(self).await?;
                sqlx::query(&$q(
                    "DELETE FROM webhook_deliveries WHERE merchant_id = ? AND endpoint_id = ? \
                     AND status = 'pending'",
                ))
                .bind(merchant_id)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                let done = sqlx::query(&$q(
                    "DELETE FROM webhook_endpoints WHERE merchant_id = ? AND id = ?",
                ))
                .bind(merchant_id)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                if done.rows_affected() != 1 {
                    return Err(StorageError::NotFound);
                }
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }

            async fn due_deliveries(
                &self,
                now: i64,
                lease_until: i64,
                limit: u32,
            ) -> StorageResult<Vec<DueDelivery>> {
                let rows: Vec<DueRow> = sqlx::query_as(&$q(
                    "SELECT d.seq AS seq, d.attempts AS attempts, \
                     d.next_attempt_at AS next_at, e.id AS ev_id, \
                     e.merchant_id AS ev_merchant_id, e.type AS ev_type, e.data AS ev_data, \
                     e.created_at AS ev_created_at, w.id AS ep_id, w.url AS ep_url, \
                     w.events AS ep_events, w.secret_sealed AS ep_secret_sealed, \
                     w.created_at AS ep_created_at \
                     FROM webhook_deliveries d \
                     JOIN events e ON e.id = d.event_id \
                     JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                     WHERE d.status = 'pending' AND d.next_attempt_at <= ? \
                     ORDER BY d.seq LIMIT ?",
                ))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                // Lease each row by moving its next attempt past the send's
                // timeout, if nobody else did first: nodes sharing the
                // database do not send the same delivery at once, and one
                // that dies mid-send leaves the row to be retried after the
                // lease. One write transaction for the round (on SQLite it
                // takes its turn behind the group writer and commits once,
                // instead of one commit, and one wait for the lock, per row).
                // Its durable commit also makes durable every event it
                // leases before anything is sent.
                let mut tx = $begin(self).await?;
                let mut leased = Vec::with_capacity(rows.len());
                for row in rows {
                    let done = sqlx::query(&$q(
                        "UPDATE webhook_deliveries SET next_attempt_at = ? \
                         WHERE seq = ? AND status = 'pending' AND next_attempt_at = ?",
                    ))
                    .bind(lease_until)
                    .bind(row.seq)
                    .bind(row.next_at)
                    .execute(&mut *tx)
                    .await
                    .map_err($err)?;
                    if done.rows_affected() == 1 {
                        leased.push(DueDelivery::try_from(row)?);
                    }
                }
                tx.commit().await.map_err($err)?;
                Ok(leased)
            }

            async fn list_deliveries(
                &self,
                merchant_id: &str,
                endpoint_id: &str,
                limit: u32,
            ) -> StorageResult<Vec<DeliveryRecord>> {
                let rows: Vec<DeliveryRow> = sqlx::query_as(&$q(
                    "SELECT d.event_id AS event_id, e.type AS event_type, \
                     d.endpoint_id AS endpoint_id, d.status AS status, d.attempts AS attempts, \
                     d.next_attempt_at AS next_attempt_at, d.last_status AS last_status, \
                     d.last_error AS last_error, d.updated_at AS updated_at \
                     FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
                     WHERE d.merchant_id = ? AND d.endpoint_id = ? ORDER BY d.seq DESC LIMIT ?",
                ))
                .bind(merchant_id)
                .bind(endpoint_id)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
                .map_err($err)?;
                Ok(rows.into_iter().map(DeliveryRecord::from).collect())
            }

            async fn record_delivery(&self, a: &DeliveryAttempt) -> StorageResult<()> {
                // A transaction of its own so that, on SQLite, it takes its
                // turn at the write gate instead of polling for the lock.
                let mut tx = $begin(self).await?;
                sqlx::query(&$q(
                    "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, \
                     last_status = ?, last_error = ?, updated_at = ? WHERE seq = ?",
                ))
                .bind(&a.status)
                .bind(a.attempts)
                .bind(a.next_attempt_at)
                .bind(a.last_status)
                .bind(&a.last_error)
                .bind(a.at)
                .bind(a.seq)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                tx.commit().await.map_err($err)?;
                Ok(())
            }
        }
    };
}

/// The sqlx database of a storage type (lets the macro name transaction types).
pub(super) trait BackendDb {
    type Db: sqlx::Database;
}

impl BackendDb for SqliteStorage {
    type Db = sqlx::Sqlite;
}

impl BackendDb for PgStorage {
    type Db = sqlx::Postgres;
}

async fn sqlite_begin(
    s: &SqliteStorage,
) -> StorageResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
    // Takes the write lock up front, in turn with the writer (see sqlite.rs).
    s.begin_write().await
}

async fn pg_begin(s: &PgStorage) -> StorageResult<sqlx::Transaction<'static, sqlx::Postgres>> {
    s.pool().begin().await.map_err(super::postgres::db_err)
}

impl_payment_stores!(
    SqliteStorage,
    sqlite_sql,
    sqlite_begin,
    super::sqlite::db_err,
    super::sqlite_audit::insert_audit
);
impl_payment_stores!(
    PgStorage,
    pg_sql,
    pg_begin,
    super::postgres::db_err,
    super::postgres_audit::insert_audit
);

#[cfg(test)]
mod tests {
    use super::pg_sql;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(pg_sql("a = ? AND b = ?"), "a = $1 AND b = $2");
    }
}
