//! SQL of [`super::hosted::HostedStore`] for both backends. As in
//! `payments_sql.rs`, one macro generates both implementations from
//! statements both databases accept; the differences (placeholders, how a
//! write transaction starts, PostgreSQL's row lock on the customer, error
//! classification) are its arguments.

use async_trait::async_trait;

use super::common::{card_columns, CardRow};
use super::hosted::{CaptureSessionRecord, CaptureUse, HostedStore};
use super::payments_sql::{lifecycle, pg_sql, sqlite_sql};
use super::{
    AuditEntry, CardInsert, CardRecord, PgStorage, SqliteStorage, StorageError, StorageResult,
};

const SESSION_COLUMNS: &str = "id, merchant_id, customer_id, allowed_origin, secret_hash, \
     created_at, expires_at, used_at, card_id";

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    merchant_id: String,
    customer_id: String,
    allowed_origin: String,
    secret_hash: Vec<u8>,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
    card_id: Option<String>,
}

impl TryFrom<SessionRow> for CaptureSessionRecord {
    type Error = StorageError;
    fn try_from(r: SessionRow) -> StorageResult<Self> {
        let secret_hash = <[u8; 32]>::try_from(r.secret_hash.as_slice()).map_err(|_| {
            StorageError::Other("corrupt capture_sessions row: secret_hash length".into())
        })?;
        Ok(CaptureSessionRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            customer_id: r.customer_id,
            allowed_origin: r.allowed_origin,
            secret_hash,
            created_at: r.created_at,
            expires_at: r.expires_at,
            used_at: r.used_at,
            card_id: r.card_id,
        })
    }
}

/// `$q` adapts placeholders, `$begin` starts a write transaction, `$err`
/// classifies errors, `$audit` appends an audit entry inside a transaction
/// and `$lock` is what locks the customer row for the rest of the
/// transaction (SQLite's `BEGIN IMMEDIATE` already holds the write lock).
macro_rules! impl_hosted_store {
    ($storage:ty, $q:path, $begin:path, $err:path, $audit:path, $lock:literal) => {
        #[async_trait]
        impl HostedStore for $storage {
            async fn insert_capture_session(
                &self,
                s: &CaptureSessionRecord,
                audit: &AuditEntry,
            ) -> StorageResult<()> {
                let mut tx = $begin(self).await?;
                let inserted = sqlx::query(&$q(
                    "INSERT INTO capture_sessions (id, merchant_id, customer_id, allowed_origin, \
                     secret_hash, created_at, expires_at) \
                     SELECT ?, ?, ?, ?, ?, ?, ? FROM customers WHERE merchant_id = ? AND id = ?",
                ))
                .bind(&s.id)
                .bind(&s.merchant_id)
                .bind(&s.customer_id)
                .bind(&s.allowed_origin)
                .bind(&s.secret_hash[..])
                .bind(s.created_at)
                .bind(s.expires_at)
                .bind(&s.merchant_id)
                .bind(&s.customer_id)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                // The customer was deleted between the check and now.
                if inserted.rows_affected() != 1 {
                    return Err(StorageError::NotFound);
                }
                $audit(&mut tx, &self.sealer, audit).await?;
                tx.commit().await.map_err($err)
            }

            async fn find_capture_session(
                &self,
                id: &str,
            ) -> StorageResult<Option<CaptureSessionRecord>> {
                let row: Option<SessionRow> = sqlx::query_as(&format!(
                    "SELECT {SESSION_COLUMNS} FROM capture_sessions {}",
                    $q("WHERE id = ?")
                ))
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err($err)?;
                row.map(CaptureSessionRecord::try_from).transpose()
            }

            async fn get_capture_session(
                &self,
                merchant_id: &str,
                id: &str,
            ) -> StorageResult<Option<CaptureSessionRecord>> {
                let row: Option<SessionRow> = sqlx::query_as(&format!(
                    "SELECT {SESSION_COLUMNS} FROM capture_sessions {}",
                    $q("WHERE merchant_id = ? AND id = ?")
                ))
                .bind(merchant_id)
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err($err)?;
                row.map(CaptureSessionRecord::try_from).transpose()
            }

            async fn use_capture_session(
                &self,
                session_id: &str,
                now: i64,
                card: &CardRecord,
                use_audit: &AuditEntry,
                card_audit: &AuditEntry,
            ) -> StorageResult<CaptureUse> {
                let mut tx = $begin(self).await?;
                // Customer first, then its cards (the order every card
                // change takes), so this serialises with other card inserts
                // for the customer and the fingerprint check sees them all.
                let default: Option<Option<String>> = sqlx::query_scalar(&$q(concat!(
                    "SELECT default_card_id FROM customers WHERE merchant_id = ? AND id = ?",
                    $lock
                )))
                .bind(&card.merchant_id)
                .bind(&card.customer_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err($err)?;
                let Some(current_default) = default else {
                    return Ok(CaptureUse::NotFound);
                };
                let existing: Option<CardRow> = sqlx::query_as(&$q(concat!(
                    "SELECT ",
                    card_columns!(),
                    " FROM cards WHERE merchant_id = ? AND customer_id = ? AND fingerprint = ?"
                )))
                .bind(&card.merchant_id)
                .bind(&card.customer_id)
                .bind(&card.fingerprint)
                .fetch_optional(&mut *tx)
                .await
                .map_err($err)?;
                let existing = existing.map(CardRecord::from);
                let card_id = existing.as_ref().map_or(card.id.as_str(), |c| c.id.as_str());
                // The WHERE decides under the lock: of two concurrent uses
                // only one matches a row.
                let used = sqlx::query(&$q(
                    "UPDATE capture_sessions SET used_at = ?, card_id = ? \
                     WHERE id = ? AND merchant_id = ? AND customer_id = ? \
                     AND used_at IS NULL AND expires_at > ?",
                ))
                .bind(now)
                .bind(card_id)
                .bind(session_id)
                .bind(&card.merchant_id)
                .bind(&card.customer_id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err($err)?;
                if used.rows_affected() != 1 {
                    let state: Option<(Option<i64>, i64)> = sqlx::query_as(&$q(
                        "SELECT used_at, expires_at FROM capture_sessions \
                         WHERE id = ? AND merchant_id = ?",
                    ))
                    .bind(session_id)
                    .bind(&card.merchant_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err($err)?;
                    return Ok(match state {
                        None => CaptureUse::NotFound,
                        Some((Some(_), _)) => CaptureUse::Used,
                        Some((None, _)) => CaptureUse::Expired,
                    });
                }
                let outcome = match existing {
                    Some(found) => CardInsert::Existing(found),
                    None => {
                        sqlx::query(&$q(concat!(
                            "INSERT INTO cards (",
                            card_columns!(),
                            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        )))
                        .bind(&card.id)
                        .bind(&card.merchant_id)
                        .bind(&card.customer_id)
                        .bind(&card.pan_ciphertext)
                        .bind(&card.dek_id)
                        .bind(&card.fingerprint)
                        .bind(&card.bin)
                        .bind(&card.last4)
                        .bind(card.pan_length)
                        .bind(&card.brand)
                        .bind(&card.funding)
                        .bind(card.exp_month)
                        .bind(card.exp_year)
                        .bind(&card.holder_name)
                        .bind(&card.alias)
                        .bind(&card.status)
                        .bind(card.created_at)
                        .execute(&mut *tx)
                        .await
                        .map_err($err)?;
                        let default = current_default.is_none();
                        if default {
                            sqlx::query(&$q(
                                "UPDATE customers SET default_card_id = ? \
                                 WHERE merchant_id = ? AND id = ?",
                            ))
                            .bind(&card.id)
                            .bind(&card.merchant_id)
                            .bind(&card.customer_id)
                            .execute(&mut *tx)
                            .await
                            .map_err($err)?;
                        }
                        $audit(&mut tx, &self.sealer, card_audit).await?;
                        Self::insert_events(&mut tx, &[lifecycle::card_created(card, card_audit.at)])
                            .await?;
                        CardInsert::Created { default }
                    }
                };
                $audit(&mut tx, &self.sealer, use_audit).await?;
                tx.commit().await.map_err($err)?;
                Ok(CaptureUse::Saved(outcome))
            }

            async fn sweep_capture_sessions(&self, before: i64) -> StorageResult<u64> {
                // A transaction of its own so that, on SQLite, it takes its
                // turn at the write gate instead of polling for the lock.
                let mut tx = $begin(self).await?;
                let done = sqlx::query(&$q("DELETE FROM capture_sessions WHERE expires_at < ?"))
                    .bind(before)
                    .execute(&mut *tx)
                    .await
                    .map_err($err)?;
                tx.commit().await.map_err($err)?;
                Ok(done.rows_affected())
            }

            async fn charge_owner(&self, charge_id: &str) -> StorageResult<Option<String>> {
                sqlx::query_scalar(&$q("SELECT merchant_id FROM charges WHERE id = ?"))
                    .bind(charge_id)
                    .fetch_optional(self.pool())
                    .await
                    .map_err($err)
            }
        }
    };
}

impl_hosted_store!(
    SqliteStorage,
    sqlite_sql,
    SqliteStorage::begin_write,
    super::sqlite::db_err,
    super::sqlite_audit::insert_audit,
    ""
);
impl_hosted_store!(
    PgStorage,
    pg_sql,
    PgStorage::begin,
    super::postgres::db_err,
    super::postgres_audit::insert_audit,
    " FOR UPDATE"
);
