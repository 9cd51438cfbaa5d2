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

/// Rows per multi-row statement: 24 binds each stays below both backends'
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

/// `Ok` if `c` is among the charges an update statement returned, else the
/// version conflict it lost.
pub(super) fn applied(
    updated: &std::collections::HashSet<String>,
    c: &super::ChargeRecord,
) -> StorageResult<()> {
    if updated.contains(&c.id) {
        Ok(())
    } else {
        Err(StorageError::Conflict(
            "the charge changed concurrently".to_string(),
        ))
    }
}

/// Whether a failed multi-row statement is worth retrying row by row: not
/// when the database itself is gone.
pub(super) fn retry_one_by_one(e: &StorageError) -> bool {
    !matches!(e, StorageError::Unavailable(_))
}

macro_rules! impl_charge_batch {
    ($storage:ty, $db:ty, $conn:ty, $err:path) => {
        impl $storage {
            /// Inserts `rows` with one statement.
            async fn insert_charges(
                conn: &mut $conn,
                rows: &[&$crate::storage::group::NewCharge],
            ) -> StorageResult<()> {
                let mut insert = sqlx::QueryBuilder::<$db>::new(concat!(
                    "INSERT INTO charges (",
                    charge_columns!(),
                    ") "
                ));
                insert.push_values(rows, |mut row, w| {
                    let c = &w.charge;
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
                        .push_bind(c.updated_at)
                        .push_bind(&c.pending_action)
                        .push_bind(c.pending_amount);
                });
                insert.build().execute(&mut *conn).await.map_err($err)?;
                Ok(())
            }

            /// Applies each `(charge, expected_version)` whose stored charge
            /// still has that version, with one statement; returns the ids
            /// of the charges it updated.
            async fn update_charges(
                conn: &mut $conn,
                rows: &[(&$crate::storage::ChargeRecord, i64)],
            ) -> StorageResult<std::collections::HashSet<String>> {
                let mut update = sqlx::QueryBuilder::<$db>::new(
                    "UPDATE charges SET status = v.column1, captured = v.column2, \
                     amount_captured = v.column3, amount_refunded = v.column4, \
                     failure_code = v.column5, failure_message = v.column6, \
                     next_action = v.column7, processor_ref = v.column8, \
                     version = v.column9, updated_at = v.column10, card_id = v.column11, \
                     pending_action = v.column15, pending_amount = v.column16 \
                     FROM (",
                );
                update.push_values(rows, |mut row, (c, expected_version)| {
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
                        .push_bind(*expected_version)
                        .push_bind(&c.pending_action)
                        .push_bind(c.pending_amount);
                });
                update.push(
                    ") AS v WHERE charges.merchant_id = v.column12 AND charges.id = v.column13 \
                     AND charges.version = v.column14 RETURNING charges.id",
                );
                let ids: Vec<String> = update
                    .build_query_scalar()
                    .fetch_all(&mut *conn)
                    .await
                    .map_err($err)?;
                Ok(ids.into_iter().collect())
            }

            /// Updates one charge if it still has `expected_version`.
            pub(super) async fn update_one_charge(
                conn: &mut $conn,
                c: &$crate::storage::ChargeRecord,
                expected_version: i64,
            ) -> StorageResult<()> {
                let updated = Self::update_charges(conn, &[(c, expected_version)]).await?;
                $crate::storage::charges_sql::applied(&updated, c)
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
                    let rows: Vec<_> = chunk.iter().map(|p| &p.write).collect();
                    let inserted = Self::insert_charges(conn, &rows).await;
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
                                let one = Self::insert_charges(conn, &[&p.write]).await;
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
                    seen.insert((
                        p.write.charge.merchant_id.as_str(),
                        p.write.charge.id.as_str(),
                    ))
                });
                for chunk in first.chunks($crate::storage::charges_sql::CHARGE_ROWS_PER_STATEMENT) {
                    Self::charge_savepoint(conn, "SAVEPOINT charges").await?;
                    let rows: Vec<_> = chunk
                        .iter()
                        .map(|p| (&p.write.charge, p.write.expected_version))
                        .collect();
                    let updated = Self::update_charges(conn, &rows).await;
                    match updated {
                        Ok(ids) => {
                            for p in chunk {
                                let outcome =
                                    $crate::storage::charges_sql::applied(&ids, &p.write.charge);
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
    super::sqlite::db_err
);
impl_charge_batch!(
    super::PgStorage,
    sqlx::Postgres,
    sqlx::PgConnection,
    super::postgres::db_err
);
