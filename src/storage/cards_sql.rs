//! The group-commit flush of card inserts, shared by both backends (the
//! SQL is the same; `QueryBuilder` numbers the placeholders).
//!
//! All cards of a batch go into one multi-row `INSERT … SELECT … FROM
//! (VALUES …) WHERE EXISTS (customer) ON CONFLICT DO NOTHING RETURNING id`,
//! and the first card of each customer without a default becomes its
//! default with one `UPDATE … FROM (VALUES …)`. The insert skips, rather
//! than fails on, a card that breaks a unique index, so one faulty card
//! never costs the others (and no savepoint is needed). A skipped card is
//! then looked up: the customer already has it (same fingerprint), its id
//! is taken (a conflict), or the customer is not the merchant's.

use super::common::card_columns;
use super::group::PendingCard;
use super::{AuditEntry, CardInsert, EventRecord, StorageError, StorageResult};

/// Cards per multi-row insert: 17 binds each stays below both backends'
/// limits on bound parameters.
pub(super) const CARD_ROWS_PER_INSERT: usize = 500;

/// Records what a stored card adds to the batch: its event and audit entry.
pub(super) fn created(
    p: &PendingCard,
    default: bool,
    events: &mut Vec<EventRecord>,
    audit: &mut Vec<AuditEntry>,
) {
    events.push(p.write.event.clone());
    audit.push(p.write.audit.clone());
    p.resolve(Ok(CardInsert::Created { default }));
}

macro_rules! impl_card_batch {
    ($storage:ty, $db:ty, $conn:ty, $q:path, $err:path, $by_fingerprint:path) => {
        impl $storage {
            /// Inserts the batch's cards inside the caller's transaction,
            /// resolving each and recording the stored ones' events and
            /// audit entries.
            pub(super) async fn insert_card_rows(
                conn: &mut $conn,
                cards: &[PendingCard],
                events: &mut Vec<EventRecord>,
                audit: &mut Vec<AuditEntry>,
            ) -> StorageResult<()> {
                for chunk in cards.chunks($crate::storage::cards_sql::CARD_ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(concat!(
                        "INSERT INTO cards (",
                        card_columns!(),
                        ") SELECT * FROM ("
                    ));
                    insert.push_values(chunk, |mut row, p| {
                        let c = &p.write.card;
                        row.push_bind(&c.id)
                            .push_bind(&c.merchant_id)
                            .push_bind(&c.customer_id)
                            .push_bind(&c.pan_ciphertext)
                            .push_bind(&c.dek_id)
                            .push_bind(&c.fingerprint)
                            .push_bind(&c.bin)
                            .push_bind(&c.last4)
                            .push_bind(c.pan_length)
                            .push_bind(&c.brand)
                            .push_bind(&c.funding)
                            .push_bind(c.exp_month)
                            .push_bind(c.exp_year)
                            .push_bind(&c.holder_name)
                            .push_bind(&c.alias)
                            .push_bind(&c.status)
                            .push_bind(c.created_at);
                    });
                    insert.push(
                        ") AS v WHERE EXISTS (SELECT 1 FROM customers \
                         WHERE customers.id = v.column3 AND customers.merchant_id = v.column2) \
                         ON CONFLICT DO NOTHING RETURNING id",
                    );
                    let ids: Vec<String> = insert
                        .build_query_scalar()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err($err)?;
                    let ids: std::collections::HashSet<String> = ids.into_iter().collect();
                    Self::settle_card_chunk(conn, chunk, &ids, events, audit).await?;
                }
                Ok(())
            }

            /// After the multi-row insert: defaults for the inserted cards,
            /// lookups for the skipped ones.
            async fn settle_card_chunk(
                conn: &mut $conn,
                chunk: &[PendingCard],
                inserted: &std::collections::HashSet<String>,
                events: &mut Vec<EventRecord>,
                audit: &mut Vec<AuditEntry>,
            ) -> StorageResult<()> {
                // The first inserted card of each customer may become its
                // default.
                let mut seen = std::collections::HashSet::new();
                let candidates: Vec<&PendingCard> = chunk
                    .iter()
                    .filter(|p| inserted.contains(&p.write.card.id))
                    .filter(|p| seen.insert(p.write.card.customer_id.as_str()))
                    .collect();
                let mut defaults = std::collections::HashSet::new();
                if !candidates.is_empty() {
                    let mut update = sqlx::QueryBuilder::<$db>::new(
                        "UPDATE customers SET default_card_id = v.column2 FROM (",
                    );
                    update.push_values(&candidates, |mut row, p| {
                        row.push_bind(&p.write.card.customer_id)
                            .push_bind(&p.write.card.id)
                            .push_bind(&p.write.card.merchant_id);
                    });
                    update.push(
                        ") AS v WHERE customers.id = v.column1 \
                         AND customers.merchant_id = v.column3 \
                         AND customers.default_card_id IS NULL RETURNING customers.default_card_id",
                    );
                    let set: Vec<Option<String>> = update
                        .build_query_scalar()
                        .fetch_all(&mut *conn)
                        .await
                        .map_err($err)?;
                    defaults.extend(set.into_iter().flatten());
                }
                for p in chunk {
                    if inserted.contains(&p.write.card.id) {
                        let default = defaults.contains(&p.write.card.id);
                        $crate::storage::cards_sql::created(p, default, events, audit);
                    } else {
                        // The card is already saved (perhaps earlier in this
                        // batch), its id is taken, or the customer is not
                        // the merchant's.
                        let card = &p.write.card;
                        p.resolve(match $by_fingerprint(&mut *conn, card).await? {
                            Some(existing) => Ok(CardInsert::Existing(existing)),
                            None if Self::card_id_taken(&mut *conn, &card.id).await? => Err(
                                StorageError::Conflict("a card with this id exists".to_string()),
                            ),
                            None => Err(StorageError::NotFound),
                        });
                    }
                }
                Ok(())
            }

            async fn card_id_taken(conn: &mut $conn, id: &str) -> StorageResult<bool> {
                let found: Option<i32> = sqlx::query_scalar(&$q("SELECT 1 FROM cards WHERE id = ?"))
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err($err)?;
                Ok(found.is_some())
            }
        }
    };
}

impl_card_batch!(
    super::SqliteStorage,
    sqlx::Sqlite,
    sqlx::SqliteConnection,
    super::payments_sql::sqlite_sql,
    super::sqlite::db_err,
    super::sqlite::fetch_card_by_fingerprint
);
impl_card_batch!(
    super::PgStorage,
    sqlx::Postgres,
    sqlx::PgConnection,
    super::payments_sql::pg_sql,
    super::postgres::db_err,
    super::postgres::fetch_card_by_fingerprint
);
