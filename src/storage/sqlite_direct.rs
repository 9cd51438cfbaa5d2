//! The SQLite group-commit writer's hot batches, on the writer's own thread.
//!
//! A batch of deferred writes (new cards, new charges, charge updates) and
//! audit appends runs no statement a caller wrote: the writer knows every
//! statement in it. Through sqlx, each of those statements was a command
//! sent to the connection's own thread and an answer sent back; under an
//! `add_card` load the writer spent more of each cycle on those hand-offs
//! than on SQLite's work (see BENCHMARKS.md). Here the writer thread drives
//! a plain SQLite connection (`rusqlite`, the same `libsqlite3-sys` build
//! sqlx uses) itself: one row per prepared statement, no hand-off, no
//! multi-row statement to build.
//!
//! The transaction is the same as on the sqlx path: `BEGIN IMMEDIATE`, the
//! batch's rows, its events and chained audit entries, one `COMMIT`
//! (durable: the connection has the pool's pragmas, `synchronous=FULL`
//! among them). Callers are answered only after the commit returned. A row
//! that breaks a constraint fails alone: SQLite rolls back that statement
//! only, and its write gets the error. Anything that may have cost the
//! transaction (an I/O error, a full disk, a lost lock) fails the batch.

use std::path::PathBuf;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::cards_sql::created;
use super::chain::{self, SealerCell};
use super::charges_sql::settle;
use super::common::{card_columns, CardRow};
use super::group::{DirectWriter, PendingCard, PendingChargeChange, PendingNewCharge, Records};
use super::payments_sql::charge_columns;
use super::sqlite_inline::map_err;
use super::{AuditEntry, CardInsert, CardRecord, EventRecord, StorageError, StorageResult};

/// Statements prepared and kept on the connection (there are eleven).
const STATEMENT_CACHE: usize = 16;

/// One row from `VALUES`, never `INSERT … SELECT`: SQLite gives a statement
/// that may write several rows and may abort (a NOT NULL, CHECK or foreign
/// key constraint) a statement journal, a copy of every page it is about to
/// change, so that it can be undone alone. A single-row insert checks all
/// of its constraints before it writes anything and needs none. A customer
/// that is missing, or another merchant's, fails the foreign key on
/// `(customer_id, merchant_id)` before any write: `NotFound` for the row
/// (unless a unique conflict skips the row first: see `skipped_card`).
const INSERT_CARD: &str = concat!(
    "INSERT INTO cards (",
    card_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
     ON CONFLICT DO NOTHING"
);
const SET_FIRST_DEFAULT: &str = "UPDATE customers SET default_card_id = ?1 \
     WHERE id = ?2 AND merchant_id = ?3 AND default_card_id IS NULL";
const CARD_BY_FINGERPRINT: &str = concat!(
    "SELECT ",
    card_columns!(),
    " FROM cards WHERE merchant_id = ?1 AND customer_id = ?2 AND fingerprint = ?3"
);
const CARD_ID_TAKEN: &str = "SELECT 1 FROM cards WHERE id = ?1";
const INSERT_CHARGE: &str = concat!(
    "INSERT INTO charges (",
    charge_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
     ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
);
const UPDATE_CHARGE: &str = "UPDATE charges SET status = ?1, captured = ?2, \
     amount_captured = ?3, amount_refunded = ?4, failure_code = ?5, failure_message = ?6, \
     next_action = ?7, processor_ref = ?8, version = ?9, updated_at = ?10, card_id = ?11, \
     pending_action = ?15, pending_amount = ?16 \
     WHERE merchant_id = ?12 AND id = ?13 AND version = ?14";
const INSERT_EVENT: &str =
    "INSERT INTO events (id, merchant_id, type, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5)";
/// The webhook deliveries of one event: the same fan-out as the sqlx
/// path's, for one event whose fields are bound instead of joined.
const FAN_OUT_EVENT: &str = "INSERT INTO webhook_deliveries (event_id, endpoint_id, \
     merchant_id, status, attempts, next_attempt_at, updated_at) \
     SELECT ?1, w.id, w.merchant_id, 'pending', 0, ?4 * 1000, ?4 FROM webhook_endpoints w \
     WHERE w.merchant_id = ?2 AND (w.events LIKE '%\"*\"%' \
     OR w.events LIKE '%\"' || ?3 || '\"%')";
const INSERT_AUDIT: &str = "INSERT INTO audit_log (at, actor, merchant_id, event, resource, \
     outcome, origin, request_id, detail, prev_hash, hash, mac, mac_key_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

/// The writer's own connection to the database file, opened on first use
/// and dropped (reopened on the next batch) after any failure that may
/// have left it in doubt.
pub(super) struct DirectWrites {
    path: PathBuf,
    conn: Option<Connection>,
}

impl DirectWrites {
    /// Writes to the (existing) database file at `path`. Opens nothing yet.
    pub(super) fn new(path: PathBuf) -> Self {
        DirectWrites { path, conn: None }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        // No CREATE flag: the pool created the file; a file that has gone
        // away is an outage, not a reason to start an empty database.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        for (name, value) in super::sqlite::CONNECTION_PRAGMAS {
            conn.pragma_update(None, name, value)?;
        }
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn conn(&mut self) -> StorageResult<&Connection> {
        if self.conn.is_none() {
            self.conn = Some(self.open().map_err(map_err)?);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("no database connection".into()))
    }

    /// Runs one of the transaction's own statements; a connection it
    /// failed on is not trusted again.
    fn control(&mut self, sql: &str) -> StorageResult<()> {
        let done = self
            .conn()?
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([]));
        match done {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = map_err(e);
                if matches!(e, StorageError::Unavailable(_)) {
                    self.conn = None;
                }
                Err(e)
            }
        }
    }

    /// The connection's value of `pragma` (for tests).
    #[cfg(test)]
    fn pragma(&mut self, pragma: &str) -> StorageResult<String> {
        self.conn()?
            .pragma_query_value(None, pragma, |r| r.get::<_, rusqlite::types::Value>(0))
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .map_err(map_err)
    }
}

impl DirectWriter for DirectWrites {
    fn begin(&mut self) -> StorageResult<()> {
        self.control("BEGIN IMMEDIATE")
    }

    fn flush(&mut self, sealer: &SealerCell, records: Records) -> StorageResult<()> {
        let Records {
            mut audit,
            mut events,
            deferred,
        } = records;
        let conn = self.conn()?;
        insert_cards(conn, &deferred.cards, &mut events, &mut audit)?;
        insert_charges(conn, &deferred.new_charges, &mut events, &mut audit)?;
        update_charges(conn, &deferred.charge_changes, &mut events, &mut audit)?;
        insert_events(conn, &events)?;
        insert_audit(conn, sealer, &audit)
    }

    fn commit(&mut self) -> StorageResult<()> {
        let committed = self.control("COMMIT");
        if committed.is_err() {
            self.rollback();
        }
        committed
    }

    fn rollback(&mut self) {
        let Some(conn) = &self.conn else { return };
        if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
            // Still inside a transaction we cannot end: start afresh.
            self.conn = None;
        }
    }
}

/// The outcome of one row's statement: an error of the row's own (a
/// constraint it broke; SQLite rolled back that statement only) is its
/// write's, an error that may have cost the transaction is the batch's.
fn row_outcome<T>(conn: &Connection, done: rusqlite::Result<T>) -> StorageResult<StorageResult<T>> {
    match done {
        Ok(value) => Ok(Ok(value)),
        Err(e) => {
            let e = map_err(e);
            if matches!(e, StorageError::Unavailable(_)) || conn.is_autocommit() {
                Err(e)
            } else {
                Ok(Err(e))
            }
        }
    }
}

fn insert_cards(
    conn: &Connection,
    cards: &[PendingCard],
    events: &mut Vec<EventRecord>,
    audit: &mut Vec<AuditEntry>,
) -> StorageResult<()> {
    if cards.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(INSERT_CARD).map_err(map_err)?;
    let mut set_default = conn.prepare_cached(SET_FIRST_DEFAULT).map_err(map_err)?;
    for p in cards {
        let c = &p.write.card;
        let inserted = insert.execute(params![
            c.id,
            c.merchant_id,
            c.customer_id,
            c.pan_ciphertext,
            c.dek_id,
            c.fingerprint,
            c.bin,
            c.last4,
            c.pan_length,
            c.brand,
            c.funding,
            c.exp_month,
            c.exp_year,
            c.holder_name,
            c.alias,
            c.status,
            c.created_at,
        ]);
        match row_outcome(conn, inserted)? {
            Ok(0) => p.resolve(skipped_card(conn, c)?),
            Ok(_) => {
                // The customer's first card becomes its default.
                let default = set_default
                    .execute(params![c.id, c.customer_id, c.merchant_id])
                    .map_err(map_err)?
                    == 1;
                created(p, default, events, audit);
            }
            Err(e) => p.resolve(Err(e)),
        }
    }
    Ok(())
}

/// Why a card was not inserted (a conflict the insert skipped, which
/// SQLite checks before the foreign key): the customer already has it
/// (same fingerprint, perhaps from earlier in this batch), its id is taken,
/// or the customer is another merchant's and already has this card there.
fn skipped_card(conn: &Connection, c: &CardRecord) -> StorageResult<StorageResult<CardInsert>> {
    let existing = conn
        .prepare_cached(CARD_BY_FINGERPRINT)
        .and_then(|mut s| {
            s.query_row(params![c.merchant_id, c.customer_id, c.fingerprint], |r| {
                CardRow::from_sqlite(r, 0)
            })
            .optional()
        })
        .map_err(map_err)?;
    if let Some(row) = existing {
        return Ok(Ok(CardInsert::Existing(CardRecord::from(row))));
    }
    let taken = conn
        .prepare_cached(CARD_ID_TAKEN)
        .and_then(|mut s| s.exists(params![c.id]))
        .map_err(map_err)?;
    Ok(Err(if taken {
        StorageError::Conflict("a card with this id exists".to_string())
    } else {
        StorageError::NotFound
    }))
}

fn insert_charges(
    conn: &Connection,
    new: &[PendingNewCharge],
    events: &mut Vec<EventRecord>,
    audit: &mut Vec<AuditEntry>,
) -> StorageResult<()> {
    if new.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(INSERT_CHARGE).map_err(map_err)?;
    for p in new {
        let (c, w) = (&p.write.charge, &p.write);
        let done = insert.execute(params![
            c.id,
            c.merchant_id,
            c.customer_id,
            c.card_id,
            c.amount,
            c.currency,
            c.status,
            i64::from(c.captured),
            c.amount_captured,
            c.amount_refunded,
            i64::from(c.capture_requested),
            c.failure_code,
            c.failure_message,
            c.next_action,
            c.description,
            w.metadata,
            w.line_items,
            c.processor,
            c.processor_ref,
            c.version,
            c.created_at,
            c.updated_at,
            c.pending_action,
            c.pending_amount,
        ]);
        let outcome = row_outcome(conn, done)?.map(|_| ());
        settle(p, outcome, events, audit);
    }
    Ok(())
}

/// Applies each update whose stored charge still has its expected version,
/// in arrival order (a later update of the same charge sees the earlier).
fn update_charges(
    conn: &Connection,
    changes: &[PendingChargeChange],
    events: &mut Vec<EventRecord>,
    audit: &mut Vec<AuditEntry>,
) -> StorageResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut update = conn.prepare_cached(UPDATE_CHARGE).map_err(map_err)?;
    for p in changes {
        let c = &p.write.charge;
        let done = update.execute(params![
            c.status,
            i64::from(c.captured),
            c.amount_captured,
            c.amount_refunded,
            c.failure_code,
            c.failure_message,
            c.next_action,
            c.processor_ref,
            c.version,
            c.updated_at,
            c.card_id,
            c.merchant_id,
            c.id,
            p.write.expected_version,
            c.pending_action,
            c.pending_amount,
        ]);
        let outcome = row_outcome(conn, done)?.and_then(|rows| match rows {
            1 => Ok(()),
            _ => Err(StorageError::Conflict(
                "the charge changed concurrently".to_string(),
            )),
        });
        settle(p, outcome, events, audit);
    }
    Ok(())
}

fn insert_events(conn: &Connection, events: &[EventRecord]) -> StorageResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(INSERT_EVENT).map_err(map_err)?;
    let mut fan_out = conn.prepare_cached(FAN_OUT_EVENT).map_err(map_err)?;
    for e in events {
        insert
            .execute(params![
                e.id,
                e.merchant_id,
                e.event_type,
                e.data,
                e.created_at
            ])
            .map_err(map_err)?;
        fan_out
            .execute(params![e.id, e.merchant_id, e.event_type, e.created_at])
            .map_err(map_err)?;
    }
    Ok(())
}

/// Appends `entries`, in order, to the chain. The transaction holds the
/// write lock (`BEGIN IMMEDIATE`), so the head cannot move meanwhile.
fn insert_audit(
    conn: &Connection,
    sealer: &SealerCell,
    entries: &[AuditEntry],
) -> StorageResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let sealer = sealer.get()?;
    let head: Option<Option<Vec<u8>>> = conn
        .prepare_cached(chain::HEAD_HASH)
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .map_err(map_err)?;
    let links = chain::links(head.flatten(), entries, sealer.as_ref())?;
    let mut insert = conn.prepare_cached(INSERT_AUDIT).map_err(map_err)?;
    for (e, link) in entries.iter().zip(links) {
        insert
            .execute(params![
                e.at,
                e.actor,
                e.merchant_id,
                e.event,
                e.resource,
                e.outcome,
                e.origin,
                e.request_id,
                e.detail,
                &link.prev_hash[..],
                &link.hash[..],
                &link.mac[..],
                link.mac_key_id,
            ])
            .map_err(map_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::{SqliteStorage, Storage};

    async fn database(dir: &tempfile::TempDir) -> (SqliteStorage, PathBuf) {
        let path = dir.path().join("direct.db");
        let url = format!("sqlite://{}", path.display());
        let storage = SqliteStorage::connect(&url, 2).await.unwrap();
        storage.migrate().await.unwrap();
        (storage, path)
    }

    #[tokio::test]
    async fn the_writer_connection_is_as_durable_as_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (_storage, path) = database(&dir).await;
        let mut direct = DirectWrites::new(path);
        // synchronous=FULL is 2, temp_store=MEMORY is 2.
        assert_eq!(direct.pragma("journal_mode").unwrap(), "wal");
        assert_eq!(direct.pragma("synchronous").unwrap(), "2");
        assert_eq!(direct.pragma("foreign_keys").unwrap(), "1");
        assert_eq!(direct.pragma("secure_delete").unwrap(), "1");
        assert_eq!(direct.pragma("temp_store").unwrap(), "2");
        // The writer keeps SQLite's default page cache; only the readers'
        // is cut (see `READ_CACHE_KIB`).
        assert_eq!(direct.pragma("cache_size").unwrap(), "-2000");
    }

    #[tokio::test]
    async fn a_missing_file_is_an_outage_and_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.db");
        let mut direct = DirectWrites::new(path.clone());
        assert!(matches!(direct.begin(), Err(StorageError::Unavailable(_))));
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_failed_flush_leaves_nothing_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, path) = database(&dir).await;
        let mut direct = DirectWrites::new(path);
        let entry = AuditEntry {
            at: 1,
            actor: "operator".into(),
            merchant_id: None,
            event: "test.append".into(),
            resource: None,
            outcome: "success".into(),
            origin: None,
            request_id: None,
            detail: None,
        };
        // No sealer installed: the audit rows cannot be chained, so the
        // batch fails as a whole (the event before it goes too).
        direct.begin().unwrap();
        let records = Records {
            audit: vec![entry.clone()],
            events: vec![EventRecord {
                id: "evt_1".into(),
                merchant_id: "m_1".into(),
                event_type: "test.event".into(),
                data: "{}".into(),
                created_at: 1,
            }],
            ..Records::default()
        };
        assert!(direct.flush(&SealerCell::default(), records).is_err());
        direct.rollback();
        let count = |table: &str| {
            let sql = format!("SELECT count(*) FROM {table}");
            let pool = storage.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>(&sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(count("events").await, 0);
        assert_eq!(count("audit_log").await, 0);
        // The same connection then writes and commits.
        direct.begin().unwrap();
        let records = Records {
            audit: vec![entry],
            ..Records::default()
        };
        let sealer = SealerCell::default();
        sealer.set(std::sync::Arc::new(FixedSealer));
        direct.flush(&sealer, records).unwrap();
        direct.commit().unwrap();
        assert_eq!(count("audit_log").await, 1);
    }

    struct FixedSealer;

    impl chain::AuditSealer for FixedSealer {
        fn key_id(&self) -> &str {
            "dek_test"
        }
        fn mac(&self, data: &[u8]) -> [u8; 32] {
            use sha2::Digest;
            sha2::Sha256::digest(data).into()
        }
    }
}
