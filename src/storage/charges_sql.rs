//! The group-commit flush of charge writes, shared by both backends (the SQL
//! is the same; `QueryBuilder` numbers the placeholders).
//!
//! A batch's new charges go into one multi-row `INSERT`, and its charge
//! updates into one `UPDATE … FROM (VALUES …) … RETURNING id` whose
//! optimistic version check is made per row: an update whose id does not
//! come back lost a race and fails alone with `Conflict`. When one charge
//! is updated twice in a batch, the first update joins the multi-row
//! statement and the later ones run one by one after it, in order, so each
//! sees the one before. Should a multi-row statement fail as a whole, it is
//! rolled back to its savepoint and its writes run one by one, each in its
//! own savepoint, so only the faulty one fails. Events and audit entries of
//! a write are recorded only once the write is stored.

use super::group::Pending;
use super::payments_sql::charge_columns;
use super::{AuditEntry, EventRecord, StorageError, StorageResult};

/// Rows per multi-row statement: 22 binds each stays below both backends'
/// limits on bound parameters.
pub(super) const CHARGE_ROWS_PER_STATEMENT: usize = 400;

/// A charge write that carries events and an audit entry.
pub(super) trait Recorded {
    fn records(&self) -> (&[EventRecord], &AuditEntry);
}

impl Recorded for super::group::NewCharge {
    fn records(&self) -> (&[EventRecord], &AuditEntry) {
        (&self.events, &self.audit)
    }
}

impl Recorded for super::group::ChargeChange {
    fn records(&self) -> (&[EventRecord], &AuditEntry) {
        (&self.events, &self.audit)
    }
}

/// Settles one charge write: a stored one adds its events and audit entry
/// to the batch.
pub(super) fn settle<W: Recorded>(
    p: &Pending<W, ()>,
    outcome: StorageResult<()>,
    events: &mut Vec<EventRecord>,
    audit: &mut Vec<AuditEntry>,
) {
    if outcome.is_ok() {
        let (e, a) = p.write.records();
        events.extend_from_slice(e);
        audit.push(a.clone());
    }
    p.resolve(outcome);
}

/// Whether a failed multi-row statement is worth retrying row by row: not
/// when the database itself is gone.
pub(super) fn retry_one_by_one(e: &StorageError) -> bool {
    !matches!(e, StorageError::Unavailable(_))
}

macro_rules! impl_charge_batch {
    ($storage:ty, $db:ty, $conn:ty, $q:path, $err:path) => {
        impl $storage {
            /// Inserts one charge.
            pub(super) async fn insert_one_charge(
                conn: &mut $conn,
                w: &$crate::storage::group::NewCharge,
            ) -> StorageResult<()> {
                let c = &w.charge;
                sqlx::query(&$q(concat!(
                    "INSERT INTO charges (",
                    charge_columns!(),
                    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                )))
                .bind(&c.id)
                .bind(&c.merchant_id)
                .bind(&c.customer_id)
                .bind(&c.card_id)
                .bind(c.amount)
                .bind(&c.currency)
                .bind(&c.status)
                .bind(i64::from(c.captured))
                .bind(c.amount_captured)
                .bind(c.amount_refunded)
                .bind(i64::from(c.capture_requested))
                .bind(&c.failure_code)
                .bind(&c.failure_message)
                .bind(&c.next_action)
                .bind(&c.description)
                .bind(&w.metadata)
                .bind(&w.line_items)
                .bind(&c.processor)
                .bind(&c.processor_ref)
                .bind(c.version)
                .bind(c.created_at)
                .bind(c.updated_at)
                .execute(&mut *conn)
                .await
                .map_err($err)?;
                Ok(())
            }

            /// Updates one charge if it still has `expected_version`.
            pub(super) async fn update_one_charge(
                conn: &mut $conn,
                c: &$crate::storage::ChargeRecord,
                expected_version: i64,
            ) -> StorageResult<()> {
                let done = sqlx::query(&$q(
                    "UPDATE charges SET status = ?, captured = ?, amount_captured = ?, \
                     amount_refunded = ?, failure_code = ?, failure_message = ?, next_action = ?, \
                     processor_ref = ?, version = ?, updated_at = ?, card_id = ? \
                     WHERE merchant_id = ? AND id = ? AND version = ?",
                ))
                .bind(&c.status)
                .bind(i64::from(c.captured))
                .bind(c.amount_captured)
                .bind(c.amount_refunded)
                .bind(&c.failure_code)
                .bind(&c.failure_message)
                .bind(&c.next_action)
                .bind(&c.processor_ref)
                .bind(c.version)
                .bind(c.updated_at)
                .bind(&c.card_id)
                .bind(&c.merchant_id)
                .bind(&c.id)
                .bind(expected_version)
                .execute(&mut *conn)
                .await
                .map_err($err)?;
                if done.rows_affected() != 1 {
                    return Err(StorageError::Conflict(
                        "the charge changed concurrently".to_string(),
                    ));
                }
                Ok(())
            }

            /// Writes the batch's new charges and charge updates inside the
            /// caller's transaction, resolving each and recording the stored
            /// ones' events and audit entries.
            pub(super) async fn write_charge_rows(
                conn: &mut $conn,
                new: &[$crate::storage::group::PendingNewCharge],
                changes: &[$crate::storage::group::PendingChargeChange],
                events: &mut Vec<EventRecord>,
                audit: &mut Vec<AuditEntry>,
            ) -> StorageResult<()> {
                use $crate::storage::charges_sql::{retry_one_by_one, settle};
                for chunk in new.chunks($crate::storage::charges_sql::CHARGE_ROWS_PER_STATEMENT) {
                    Self::charge_savepoint(conn, "SAVEPOINT charges").await?;
                    let mut insert = sqlx::QueryBuilder::<$db>::new(concat!(
                        "INSERT INTO charges (",
                        charge_columns!(),
                        ") "
                    ));
                    insert.push_values(chunk, |mut row, p| {
                        let (w, c) = (&p.write, &p.write.charge);
                        row.push_bind(&c.id)
                            .push_bind(&c.merchant_id)
                            .push_bind(&c.customer_id)
                            .push_bind(&c.card_id)
                            .push_bind(c.amount)
                            .push_bind(&c.currency)
                            .push_bind(&c.status)
                            .push_bind(i64::from(c.captured))
                            .push_bind(c.amount_captured)
                            .push_bind(c.amount_refunded)
                            .push_bind(i64::from(c.capture_requested))
                            .push_bind(&c.failure_code)
                            .push_bind(&c.failure_message)
                            .push_bind(&c.next_action)
                            .push_bind(&c.description)
                            .push_bind(&w.metadata)
                            .push_bind(&w.line_items)
                            .push_bind(&c.processor)
                            .push_bind(&c.processor_ref)
                            .push_bind(c.version)
                            .push_bind(c.created_at)
                            .push_bind(c.updated_at);
                    });
                    let inserted = insert
                        .build()
                        .persistent(false)
                        .execute(&mut *conn)
                        .await
                        .map_err($err);
                    match inserted {
                        Ok(_) => {
                            for p in chunk {
                                settle(p, Ok(()), events, audit);
                            }
                        }
                        Err(e) if retry_one_by_one(&e) => {
                            Self::charge_savepoint(conn, "ROLLBACK TO SAVEPOINT charges").await?;
                            for p in chunk {
                                Self::charge_savepoint(conn, "SAVEPOINT charge").await?;
                                let one = Self::insert_one_charge(conn, &p.write).await;
                                Self::end_charge_savepoint(conn, &one).await?;
                                settle(p, one, events, audit);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    Self::charge_savepoint(conn, "RELEASE SAVEPOINT charges").await?;
                }

                // The first update of each charge joins the multi-row
                // statement; later ones run after it, one by one, in order.
                let mut seen = std::collections::HashSet::new();
                let (first, later): (Vec<_>, Vec<_>) = changes.iter().partition(|p| {
                    seen.insert((p.write.charge.merchant_id.as_str(), p.write.charge.id.as_str()))
                });
                for chunk in first.chunks($crate::storage::charges_sql::CHARGE_ROWS_PER_STATEMENT) {
                    Self::charge_savepoint(conn, "SAVEPOINT charges").await?;
                    let mut update = sqlx::QueryBuilder::<$db>::new(
                        "UPDATE charges SET status = v.column1, captured = v.column2, \
                         amount_captured = v.column3, amount_refunded = v.column4, \
                         failure_code = v.column5, failure_message = v.column6, \
                         next_action = v.column7, processor_ref = v.column8, \
                         version = v.column9, updated_at = v.column10, card_id = v.column11 \
                         FROM (",
                    );
                    update.push_values(chunk, |mut row, p| {
                        let c = &p.write.charge;
                        row.push_bind(&c.status)
                            .push_bind(i64::from(c.captured))
                            .push_bind(c.amount_captured)
                            .push_bind(c.amount_refunded)
                            .push_bind(&c.failure_code)
                            .push_bind(&c.failure_message)
                            .push_bind(&c.next_action)
                            .push_bind(&c.processor_ref)
                            .push_bind(c.version)
                            .push_bind(c.updated_at)
                            .push_bind(&c.card_id)
                            .push_bind(&c.merchant_id)
                            .push_bind(&c.id)
                            .push_bind(p.write.expected_version);
                    });
                    update.push(
                        ") AS v WHERE charges.merchant_id = v.column12 AND charges.id = v.column13 \
                         AND charges.version = v.column14 RETURNING charges.id",
                    );
                    let updated: Result<Vec<String>, StorageError> = update
                        .build_query_scalar()
                        .persistent(false)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err($err);
                    match updated {
                        Ok(ids) => {
                            let ids: std::collections::HashSet<String> = ids.into_iter().collect();
                            for p in chunk {
                                let outcome = if ids.contains(&p.write.charge.id) {
                                    Ok(())
                                } else {
                                    Err(StorageError::Conflict(
                                        "the charge changed concurrently".to_string(),
                                    ))
                                };
                                settle(p, outcome, events, audit);
                            }
                        }
                        Err(e) if retry_one_by_one(&e) => {
                            Self::charge_savepoint(conn, "ROLLBACK TO SAVEPOINT charges").await?;
                            for p in chunk {
                                Self::update_charge_alone(conn, p, events, audit).await?;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    Self::charge_savepoint(conn, "RELEASE SAVEPOINT charges").await?;
                }
                for p in later {
                    Self::update_charge_alone(conn, p, events, audit).await?;
                }
                Ok(())
            }

            /// One charge update in its own savepoint.
            async fn update_charge_alone(
                conn: &mut $conn,
                p: &$crate::storage::group::PendingChargeChange,
                events: &mut Vec<EventRecord>,
                audit: &mut Vec<AuditEntry>,
            ) -> StorageResult<()> {
                Self::charge_savepoint(conn, "SAVEPOINT charge").await?;
                let one =
                    Self::update_one_charge(conn, &p.write.charge, p.write.expected_version).await;
                Self::end_charge_savepoint(conn, &one).await?;
                $crate::storage::charges_sql::settle(p, one, events, audit);
                Ok(())
            }

            async fn charge_savepoint(conn: &mut $conn, sql: &'static str) -> StorageResult<()> {
                sqlx::Executor::execute(&mut *conn, sql)
                    .await
                    .map_err($err)?;
                Ok(())
            }

            /// Ends a one-row savepoint: kept if the write succeeded, rolled
            /// back if not (then released either way).
            async fn end_charge_savepoint(
                conn: &mut $conn,
                outcome: &StorageResult<()>,
            ) -> StorageResult<()> {
                if let Err(e) = outcome {
                    if !$crate::storage::charges_sql::retry_one_by_one(e) {
                        return Err(e.duplicate());
                    }
                    Self::charge_savepoint(conn, "ROLLBACK TO SAVEPOINT charge").await?;
                }
                Self::charge_savepoint(conn, "RELEASE SAVEPOINT charge").await
            }
        }
    };
}

impl_charge_batch!(
    super::SqliteStorage,
    sqlx::Sqlite,
    sqlx::SqliteConnection,
    super::payments_sql::sqlite_sql,
    super::sqlite::db_err
);
impl_charge_batch!(
    super::PgStorage,
    sqlx::Postgres,
    sqlx::PgConnection,
    super::payments_sql::pg_sql,
    super::postgres::db_err
);
