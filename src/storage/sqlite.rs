//! SQLite implementation of the storage traits (the embedded default).
//!
//! Durability: WAL journal with `synchronous=FULL`, so a committed
//! transaction survives power loss. Write transactions start with
//! `BEGIN IMMEDIATE`: they take the single write lock up front, so a
//! read-then-write never fails on a lock upgrade (which `busy_timeout` cannot
//! wait out) and concurrent writers simply queue. `secure_delete` zeroes
//! deleted rows, so a deleted card's ciphertext does not stay in the file.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::OptionalExtension;
use sqlx::error::DatabaseError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteExecutor, SqlitePoolOptions};
use sqlx::{QueryBuilder, Sqlite, SqlitePool, Transaction};

use super::common::{
    self, api_key_columns, audit_columns, card_columns, customer_columns, data_key_columns,
    ApiKeyRow, AuditDbRow, CardRow, CardViewRow, CustomerJson, CustomerRow, DataKeyRow,
    IdempotencyRow, MerchantRow,
};
use super::group::{GroupBackend, GroupCommit, Tx, WriteGate};
use super::lean::LeanPool;
use super::payments_sql::lifecycle;
use super::sqlite_audit::insert_audit;
use super::sqlite_checkpoint::{self, CheckpointPolicy};
use super::sqlite_direct::DirectWrites;
use super::sqlite_inline::{or_pool, Inline, InlineReads};
use super::{
    ApiKeyRecord, AuditEntry, AuditRow, AuditStore, CardInsert, CardRecord, CardStore, CardUpdate,
    CustomerRecord, CustomerStore, CustomerUpdate, DataKeyRecord, IdempotencyClaim,
    IdempotencyStore, KeyStore, MerchantRecord, MerchantStore, Page, Storage, StorageError,
    StorageResult,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a statement waits for another connection's write lock.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a pooled connection before it is told the
/// database is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Storage in one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStorage {
    pool: SqlitePool,
    /// Single statements outside transactions (see [`super::lean`]).
    reads: LeanPool<Sqlite>,
    /// The hot reads, on the caller's thread (see [`super::sqlite_inline`]).
    inline: Arc<InlineReads>,
    /// Group commit of the hot write paths (see [`super::group`]).
    pub(super) writer: GroupCommit<Sqlite>,
    /// Shared with the writer: other write transactions queue here for
    /// their turn at the write lock, and the WAL checkpointer for a moment
    /// between two batches (see [`super::sqlite_checkpoint`]).
    write_gate: WriteGate,
    /// MACs the audit chain; appends fail until it is installed.
    pub(super) sealer: std::sync::Arc<super::chain::SealerCell>,
    /// Keeps the WAL checkpointer running; it stops once this is dropped.
    _checkpointer: Arc<()>,
}

/// The pragmas of every connection that writes (the pool's, the group
/// writer's, and the writer's direct one, see [`super::sqlite_direct`]):
/// - WAL journal with `synchronous=FULL`: a committed transaction survives
///   power loss.
/// - `secure_delete`: the bytes of deleted rows are zeroed instead of left
///   in free pages: a deleted card's ciphertext and fingerprint must not
///   linger in the file (or its copies).
/// - `temp_store=MEMORY`: savepoint and statement journals in memory, not in
///   temporary files. The group-commit writer runs batches inside
///   savepoints, and copying each page it touches to a file cost it a write
///   syscall per page. (It also keeps pages of card rows out of temporary
///   files.)
/// - `wal_autocheckpoint`: the WAL size (pages) at which a committing
///   connection checkpoints by itself, a safety net should the checkpointer
///   fall behind (it makes the WAL start over long before, see
///   [`super::sqlite_checkpoint`]).
pub(super) const CONNECTION_PRAGMAS: [(&str, &str); 6] = [
    ("journal_mode", "WAL"),
    ("synchronous", "FULL"),
    ("foreign_keys", "ON"),
    ("secure_delete", "ON"),
    ("temp_store", "MEMORY"),
    ("wal_autocheckpoint", "16384"),
];

/// The page cache, in KiB, of every SQLite connection but the writers'
/// (the pool's, the lean and inline reads', the WAL checkpointer's), set as
/// `cache_size = -READ_CACHE_KIB`. SQLite's default is 2,000 KiB per
/// connection. Readers gain little from more: every commit changes the
/// database, and a reader's next transaction then empties its cache. But
/// with dozens of connections, caches filled by a long read under load (the
/// periodic audit checkpoint's count) stayed in the process: in a 60-second
/// load run, RSS stepped from 52 to 78 MiB at the first checkpoint, and
/// with this cap to 62 MiB. The writers keep the default, since their
/// cache is what saves them reading back the pages of a batch's indexes.
pub(super) const READ_CACHE_KIB: i64 = 256;

/// SQLite primary result codes that mean "try again later" rather than a bug:
/// BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL.
fn is_transient(db: &dyn DatabaseError) -> bool {
    db.code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 14 | 15))
}

pub(super) fn db_err(err: sqlx::Error) -> StorageError {
    common::map_err(err, is_transient)
}

impl SqliteStorage {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or
    /// `sqlite:path`). Does not migrate: see [`Storage::migrate`].
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        // The writer has a connection of its own: an in-memory database
        // would be a different one per connection (and is not durable).
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StorageError::Other(
                "in-memory SQLite databases are not supported: use a file".to_string(),
            ));
        }
        let options = CONNECTION_PRAGMAS.iter().fold(
            SqliteConnectOptions::from_str(url)
                .map_err(db_err)?
                .create_if_missing(true)
                .busy_timeout(BUSY_TIMEOUT),
            |options, (name, value)| options.pragma(*name, *value),
        );
        let reader = options
            .clone()
            .pragma("cache_size", format!("-{READ_CACHE_KIB}"));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(|conn, _| Box::pin(async move { Ok(common::reusable(conn)) }))
            .connect_with(reader.clone())
            .await
            .map_err(db_err)?;
        let reads = LeanPool::new(reader.clone(), max_connections, ACQUIRE_TIMEOUT);
        // The pool above has created the file: the inline reads open it.
        let inline = Arc::new(InlineReads::new(
            options.get_filename().to_path_buf(),
            max_connections as usize,
        ));
        let direct = DirectWrites::new(options.get_filename().to_path_buf());
        let sealer: Arc<super::chain::SealerCell> = Default::default();
        let write_gate = WriteGate::default();
        let checkpointer = Arc::new(());
        // Never creates a database: it only checkpoints the one opened here.
        sqlite_checkpoint::start(
            reader.create_if_missing(false),
            Arc::clone(&write_gate),
            Arc::downgrade(&checkpointer),
            CheckpointPolicy::default(),
        )?;
        Ok(SqliteStorage {
            writer: GroupCommit::start(
                options.statement_cache_capacity(super::group::WRITER_STATEMENT_CACHE),
                Arc::clone(&sealer),
                Some(Arc::clone(&write_gate)),
                Some(Box::new(direct)),
            )?,
            write_gate,
            pool,
            reads,
            inline,
            sealer,
            _checkpointer: checkpointer,
        })
    }

    /// The connection pool (for tests and operator tooling).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Runs `read` on an inline connection on a blocking thread: for reads
    /// of thousands of rows (an audit walk's pages), which must neither
    /// hold a runtime thread nor pay sqlx's hand-off per row.
    pub(super) async fn bulk_read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, Inline> {
        let inline = Arc::clone(&self.inline);
        tokio::task::spawn_blocking(move || inline.run(read))
            .await
            .unwrap_or(Err(Inline::Fallback))
    }

    /// The card views `sql` selects with its two binds: inline, or from the
    /// pool when the inline read would have had to wait.
    async fn card_views(
        &self,
        sql: &'static str,
        first: &str,
        second: &str,
    ) -> StorageResult<Vec<(CardRecord, bool)>> {
        let inline = self.inline.run(|c| {
            c.prepare_cached(sql)?
                .query_map((first, second), card_view)?
                .collect()
        });
        or_pool(inline, async {
            let rows: Vec<CardViewRow> = sqlx::query_as(sql)
                .bind(first)
                .bind(second)
                .fetch_all(&self.reads)
                .await
                .map_err(db_err)?;
            Ok(rows.into_iter().map(CardViewRow::into_view).collect())
        })
        .await
    }

    /// The write gate, for tests that hold it.
    #[cfg(test)]
    pub(super) fn write_gate(&self) -> &WriteGate {
        &self.write_gate
    }

    pub(super) async fn begin_write(&self) -> StorageResult<Transaction<'static, Sqlite>> {
        // Wait for the writer's current batch to commit, then take the
        // write lock before its next one. The gate is let go once the lock
        // is ours: the writer's next BEGIN IMMEDIATE then waits (briefly,
        // in SQLite's busy handler) for this transaction instead.
        let _turn = self.write_gate.lock().await;
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
    }
}

impl GroupBackend for Sqlite {
    fn begin_group(
        pool: &SqlitePool,
    ) -> futures_util::future::BoxFuture<'_, StorageResult<Tx<Sqlite>>> {
        Box::pin(async move { pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_err) })
    }
    fn storage_err(e: sqlx::Error) -> StorageError {
        db_err(e)
    }
    fn flush<'a>(
        tx: &'a mut Tx<Sqlite>,
        sealer: &'a super::chain::SealerCell,
        deferred: &'a super::group::DeferredWrites,
        mut events: Vec<super::EventRecord>,
        mut audit: Vec<AuditEntry>,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<()>> {
        let conn: &'a mut sqlx::SqliteConnection = tx;
        Box::pin(async move {
            SqliteStorage::insert_card_rows(conn, &deferred.cards, &mut events, &mut audit).await?;
            SqliteStorage::write_charge_rows(
                conn,
                &deferred.new_charges,
                &deferred.charge_changes,
                &mut events,
                &mut audit,
            )
            .await?;
            SqliteStorage::insert_event_rows(conn, &events).await?;
            super::sqlite_audit::insert_audit_rows(conn, sealer, &audit).await
        })
    }
    fn exec<'a>(
        tx: &'a mut Tx<Sqlite>,
        sql: &'static str,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<()>> {
        let conn: &'a mut sqlx::SqliteConnection = tx;
        Box::pin(async move {
            sqlx::Executor::execute(conn, sql).await.map_err(db_err)?;
            Ok(())
        })
    }
}

const CUSTOMER_BY_ID: &str = concat!(
    "SELECT ",
    customer_columns!(),
    " FROM customers WHERE merchant_id = ? AND id = ?"
);
const CARD_BY_ID: &str = concat!(
    "SELECT ",
    card_columns!(),
    " FROM cards WHERE merchant_id = ? AND id = ?"
);
/// A card and whether it is its customer's default.
macro_rules! card_view_select {
    () => {
        concat!(
            "SELECT ",
            card_columns!(),
            ", coalesce((SELECT default_card_id FROM customers \
             WHERE customers.id = cards.customer_id) = cards.id, false) AS is_default \
             FROM cards "
        )
    };
}
const CARD_VIEW_BY_ID: &str = concat!(card_view_select!(), "WHERE merchant_id = ? AND id = ?");
const CARD_VIEWS_OF_CUSTOMER: &str = concat!(
    card_view_select!(),
    "WHERE merchant_id = ? AND customer_id = ? ORDER BY seq"
);

async fn fetch_customer(
    ex: impl SqliteExecutor<'_>,
    merchant_id: &str,
    id: &str,
) -> StorageResult<Option<CustomerRecord>> {
    let row: Option<CustomerRow> = sqlx::query_as(CUSTOMER_BY_ID)
        .bind(merchant_id)
        .bind(id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)?;
    row.map(CustomerRecord::try_from).transpose()
}

async fn fetch_card(
    ex: impl SqliteExecutor<'_>,
    merchant_id: &str,
    id: &str,
) -> StorageResult<Option<CardRecord>> {
    let row: Option<CardRow> = sqlx::query_as(CARD_BY_ID)
        .bind(merchant_id)
        .bind(id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)?;
    Ok(row.map(CardRecord::from))
}

pub(super) async fn fetch_card_by_fingerprint(
    ex: impl SqliteExecutor<'_>,
    card: &CardRecord,
) -> StorageResult<Option<CardRecord>> {
    let row: Option<CardRow> = sqlx::query_as(concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE merchant_id = ? AND customer_id = ? AND fingerprint = ?"
    ))
    .bind(&card.merchant_id)
    .bind(&card.customer_id)
    .bind(&card.fingerprint)
    .fetch_optional(ex)
    .await
    .map_err(db_err)?;
    Ok(row.map(CardRecord::from))
}

/// The customer's `default_card_id`, or `None` when the customer is not
/// the merchant's.
async fn fetch_default_card(
    ex: impl SqliteExecutor<'_>,
    merchant_id: &str,
    customer_id: &str,
) -> StorageResult<Option<Option<String>>> {
    sqlx::query_scalar("SELECT default_card_id FROM customers WHERE merchant_id = ? AND id = ?")
        .bind(merchant_id)
        .bind(customer_id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)
}

async fn set_default_card(
    ex: impl SqliteExecutor<'_>,
    merchant_id: &str,
    customer_id: &str,
    card_id: Option<&str>,
) -> StorageResult<()> {
    sqlx::query("UPDATE customers SET default_card_id = ? WHERE merchant_id = ? AND id = ?")
        .bind(card_id)
        .bind(merchant_id)
        .bind(customer_id)
        .execute(ex)
        .await
        .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl MerchantStore for SqliteStorage {
    async fn create_merchant(
        &self,
        merchant: &MerchantRecord,
        keys: &[ApiKeyRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO merchants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&merchant.id)
            .bind(&merchant.name)
            .bind(merchant.created_at)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        for key in keys {
            sqlx::query(
                "INSERT INTO api_keys (id, merchant_id, kind, hash, scopes, created_at, \
                 last_used_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&key.id)
            .bind(&key.merchant_id)
            .bind(key.kind.as_str())
            .bind(&key.hash[..])
            .bind(common::encode_scopes(key)?)
            .bind(key.created_at)
            .bind(key.last_used_at)
            .bind(key.revoked_at)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn get_merchant(&self, id: &str) -> StorageResult<Option<MerchantRecord>> {
        let row: Option<MerchantRow> =
            sqlx::query_as("SELECT id, name, created_at FROM merchants WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reads)
                .await
                .map_err(db_err)?;
        Ok(row.map(MerchantRecord::from))
    }

    async fn find_api_key(&self, hash: &[u8; 32]) -> StorageResult<Option<ApiKeyRecord>> {
        let row: Option<ApiKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE hash = ? AND revoked_at IS NULL"
        ))
        .bind(&hash[..])
        .fetch_optional(&self.reads)
        .await
        .map_err(db_err)?;
        row.map(ApiKeyRecord::try_from).transpose()
    }

    async fn touch_api_key(&self, id: &str, at: i64) -> StorageResult<()> {
        // max(): batched touches may arrive out of order; never go backwards.
        // It goes through the writer: a write of its own would compete for
        // SQLite's one write lock with a writer that only lets go of it for
        // microseconds between batches (the load run saw it wait 1.4 s).
        let id = id.to_string();
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, ?1), ?1) \
                         WHERE id = ?2",
                    )
                    .bind(at)
                    .bind(&id)
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    Ok(())
                })
            })
            .await
    }
}

#[async_trait]
impl CustomerStore for SqliteStorage {
    async fn insert_customer(&self, c: &CustomerRecord, audit: &AuditEntry) -> StorageResult<()> {
        let json = CustomerJson::encode(c)?;
        let (c, audit) = (c.clone(), audit.clone());
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    sqlx::query(concat!(
                        "INSERT INTO customers (",
                        customer_columns!(),
                        ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ))
                    .bind(&c.id)
                    .bind(&c.merchant_id)
                    .bind(&c.email)
                    .bind(&c.first_name)
                    .bind(&c.last_name)
                    .bind(&c.phone)
                    .bind(json.document)
                    .bind(json.billing_address)
                    .bind(json.metadata)
                    .bind(&c.default_card_id)
                    .bind(c.created_at)
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    batch.event(lifecycle::customer_created(&c, audit.at));
                    batch.audit(audit);
                    Ok(())
                })
            })
            .await
    }

    async fn get_customer(
        &self,
        merchant_id: &str,
        id: &str,
    ) -> StorageResult<Option<CustomerRecord>> {
        let inline = self.inline.run(|c| {
            c.prepare_cached(CUSTOMER_BY_ID)?
                .query_row((merchant_id, id), CustomerRow::from_sqlite)
                .optional()
        });
        let inline = inline.and_then(|row| {
            row.map(CustomerRecord::try_from)
                .transpose()
                .map_err(Inline::Failed)
        });
        or_pool(inline, fetch_customer(&self.reads, merchant_id, id)).await
    }

    async fn update_customer(
        &self,
        merchant_id: &str,
        id: &str,
        update: &CustomerUpdate,
    ) -> StorageResult<CustomerRecord> {
        let mut tx = self.begin_write().await?;
        let mut c = fetch_customer(&mut *tx, merchant_id, id)
            .await?
            .ok_or(StorageError::NotFound)?;
        common::apply_customer_update(&mut c, update);
        let json = CustomerJson::encode(&c)?;
        sqlx::query(
            "UPDATE customers SET email = ?, first_name = ?, last_name = ?, phone = ?, \
             document = ?, billing_address = ?, metadata = ? WHERE merchant_id = ? AND id = ?",
        )
        .bind(&c.email)
        .bind(&c.first_name)
        .bind(&c.last_name)
        .bind(&c.phone)
        .bind(json.document)
        .bind(json.billing_address)
        .bind(json.metadata)
        .bind(merchant_id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(c)
    }

    async fn delete_customer(
        &self,
        merchant_id: &str,
        id: &str,
        audit: &AuditEntry,
        card_audit: &(dyn for<'c> Fn(&'c CardRecord) -> AuditEntry + Send + Sync),
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        if fetch_default_card(&mut *tx, merchant_id, id)
            .await?
            .is_none()
        {
            return Err(StorageError::NotFound);
        }
        let cards: Vec<CardRow> = sqlx::query_as(concat!(
            "SELECT ",
            card_columns!(),
            " FROM cards WHERE merchant_id = ? AND customer_id = ? ORDER BY seq"
        ))
        .bind(merchant_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query("DELETE FROM cards WHERE merchant_id = ? AND customer_id = ?")
            .bind(merchant_id)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("DELETE FROM customers WHERE merchant_id = ? AND id = ?")
            .bind(merchant_id)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        insert_audit(&mut tx, &self.sealer, audit).await?;
        let mut events = vec![lifecycle::customer_deleted(merchant_id, id, audit.at)];
        for card in cards.into_iter().map(CardRecord::from) {
            insert_audit(&mut tx, &self.sealer, &card_audit(&card)).await?;
            events.push(lifecycle::card_deleted(&card, audit.at));
        }
        SqliteStorage::insert_events(&mut tx, &events).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn list_customers(
        &self,
        merchant_id: &str,
        email: Option<&str>,
        limit: u32,
        starting_after: Option<&str>,
    ) -> StorageResult<Page<CustomerRecord>> {
        let cursor: Option<i64> = match starting_after {
            None => None,
            Some(after) => Some(
                sqlx::query_scalar("SELECT seq FROM customers WHERE merchant_id = ? AND id = ?")
                    .bind(merchant_id)
                    .bind(after)
                    .fetch_optional(&self.reads)
                    .await
                    .map_err(db_err)?
                    .ok_or(StorageError::NotFound)?,
            ),
        };
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            customer_columns!(),
            " FROM customers WHERE merchant_id = "
        ));
        q.push_bind(merchant_id);
        if let Some(email) = email {
            q.push(" AND lower(email) = lower(")
                .push_bind(email)
                .push(")");
        }
        if let Some(seq) = cursor {
            q.push(" AND seq < ").push_bind(seq);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(common::page_fetch_limit(limit));
        let rows: Vec<CustomerRow> = q
            .build_query_as()
            .fetch_all(&self.reads)
            .await
            .map_err(db_err)?;
        let rows = rows
            .into_iter()
            .map(CustomerRecord::try_from)
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(common::into_page(rows, limit))
    }
}

#[async_trait]
impl CardStore for SqliteStorage {
    async fn insert_card(
        &self,
        card: &CardRecord,
        audit: &AuditEntry,
    ) -> StorageResult<CardInsert> {
        let inserted = self
            .writer
            .defer(super::group::NewCard::new(card, audit))
            .await;
        match inserted {
            Err(StorageError::Conflict(message)) => {
                // The write lock makes a duplicate fingerprint impossible,
                // but answer it like the check should one slip through;
                // anything else (a reused card id) is a conflict.
                match fetch_card_by_fingerprint(&self.reads, card).await? {
                    Some(existing) => Ok(CardInsert::Existing(existing)),
                    None => Err(StorageError::Conflict(message)),
                }
            }
            other => other,
        }
    }

    async fn get_card(
        &self,
        merchant_id: &str,
        card_id: &str,
    ) -> StorageResult<Option<CardRecord>> {
        let inline = self.inline.run(|c| {
            c.prepare_cached(CARD_BY_ID)?
                .query_row((merchant_id, card_id), |row| {
                    CardRow::from_sqlite(row, 0).map(CardRecord::from)
                })
                .optional()
        });
        or_pool(inline, fetch_card(&self.reads, merchant_id, card_id)).await
    }

    async fn get_card_view(
        &self,
        merchant_id: &str,
        card_id: &str,
    ) -> StorageResult<Option<(CardRecord, bool)>> {
        // Card ids are unique: at most one row.
        let views = self.card_views(CARD_VIEW_BY_ID, merchant_id, card_id);
        Ok(views.await?.into_iter().next())
    }

    async fn list_card_views(
        &self,
        merchant_id: &str,
        customer_id: &str,
    ) -> StorageResult<Vec<(CardRecord, bool)>> {
        self.card_views(CARD_VIEWS_OF_CUSTOMER, merchant_id, customer_id)
            .await
    }

    async fn list_cards(
        &self,
        merchant_id: &str,
        customer_id: &str,
    ) -> StorageResult<Vec<CardRecord>> {
        let rows: Vec<CardRow> = sqlx::query_as(concat!(
            "SELECT ",
            card_columns!(),
            " FROM cards WHERE merchant_id = ? AND customer_id = ? ORDER BY seq"
        ))
        .bind(merchant_id)
        .bind(customer_id)
        .fetch_all(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(CardRecord::from).collect())
    }

    async fn update_card(
        &self,
        merchant_id: &str,
        card_id: &str,
        update: &CardUpdate,
    ) -> StorageResult<CardRecord> {
        let mut tx = self.begin_write().await?;
        let mut card = fetch_card(&mut *tx, merchant_id, card_id)
            .await?
            .ok_or(StorageError::NotFound)?;
        common::apply_card_update(&mut card, update);
        sqlx::query(
            "UPDATE cards SET alias = ?, holder_name = ?, exp_month = ?, exp_year = ? \
             WHERE merchant_id = ? AND id = ?",
        )
        .bind(&card.alias)
        .bind(&card.holder_name)
        .bind(card.exp_month)
        .bind(card.exp_year)
        .bind(merchant_id)
        .bind(card_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if update.make_default {
            set_default_card(&mut *tx, merchant_id, &card.customer_id, Some(card_id)).await?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(card)
    }

    async fn delete_card(
        &self,
        merchant_id: &str,
        card_id: &str,
        audit: &AuditEntry,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        let card = fetch_card(&mut *tx, merchant_id, card_id)
            .await?
            .ok_or(StorageError::NotFound)?;
        let current_default = fetch_default_card(&mut *tx, merchant_id, &card.customer_id)
            .await?
            .ok_or(StorageError::NotFound)?;
        sqlx::query("DELETE FROM cards WHERE merchant_id = ? AND id = ?")
            .bind(merchant_id)
            .bind(card_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if current_default.as_deref() == Some(card_id) {
            let newest: Option<String> = sqlx::query_scalar(
                "SELECT id FROM cards WHERE merchant_id = ? AND customer_id = ? \
                 ORDER BY seq DESC LIMIT 1",
            )
            .bind(merchant_id)
            .bind(&card.customer_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            set_default_card(&mut *tx, merchant_id, &card.customer_id, newest.as_deref()).await?;
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        SqliteStorage::insert_events(&mut tx, &[lifecycle::card_deleted(&card, audit.at)]).await?;
        tx.commit().await.map_err(db_err)
    }
}

#[async_trait]
impl KeyStore for SqliteStorage {
    async fn insert_data_key(
        &self,
        key: &DataKeyRecord,
        audit: Option<&AuditEntry>,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(concat!(
            "INSERT INTO data_keys (",
            data_key_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&key.id)
        .bind(&key.merchant_id)
        .bind(&key.purpose)
        .bind(key.version)
        .bind(&key.mode)
        .bind(&key.wrapped)
        .bind(&key.wrapping_label)
        .bind(key.seals_reserved)
        .bind(key.created_at)
        .bind(key.retired_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if let Some(audit) = audit {
            insert_audit(&mut tx, &self.sealer, audit).await?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn get_data_key(&self, id: &str) -> StorageResult<Option<DataKeyRecord>> {
        let row: Option<DataKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            data_key_columns!(),
            " FROM data_keys WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(row.map(DataKeyRecord::from))
    }

    async fn current_data_key(
        &self,
        merchant_id: Option<&str>,
        purpose: &str,
    ) -> StorageResult<Option<DataKeyRecord>> {
        let row: Option<DataKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            data_key_columns!(),
            " FROM data_keys WHERE merchant_id IS ? AND purpose = ? AND retired_at IS NULL \
             ORDER BY version DESC LIMIT 1"
        ))
        .bind(merchant_id)
        .bind(purpose)
        .fetch_optional(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(row.map(DataKeyRecord::from))
    }

    async fn reserve_seals(&self, id: &str, block: i64) -> StorageResult<i64> {
        common::check_seal_block(block)?;
        // A unit of the writer's batch, like every hot write. As an
        // autocommit statement of its own it polled (SQLite's busy handler)
        // for a write lock the writer frees only for microseconds between
        // batches: 36-532 ms under add_card, longer than the quarter block
        // the keyring reserves ahead lasts, so every seal under the key
        // then waited for it.
        let id = id.to_string();
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "UPDATE data_keys SET seals_reserved = seals_reserved + ? WHERE id = ? \
                         RETURNING seals_reserved",
                    )
                    .bind(block)
                    .bind(&id)
                    .fetch_optional(&mut *batch.tx)
                    .await
                    .map_err(db_err)?
                    .ok_or(StorageError::NotFound)
                })
            })
            .await
    }

    async fn active_hsm_key(
        &self,
        kind: &str,
        merchant_id: Option<&str>,
    ) -> StorageResult<Option<String>> {
        self.active_hsm_key_impl(kind, merchant_id).await
    }

    async fn register_hsm_key(&self, k: &super::HsmKeyRecord) -> StorageResult<()> {
        self.register_hsm_key_impl(k).await
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStorage {
    // The three writes go through the group-commit writer: a write of its
    // own would compete for SQLite's one write lock with a writer that lets
    // go of it only for microseconds between batches.
    async fn claim_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        request_hash: &[u8; 32],
        now: i64,
    ) -> StorageResult<IdempotencyClaim> {
        let (merchant_id, key, request_hash) =
            (merchant_id.to_string(), key.to_string(), *request_hash);
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    // Inside one write transaction, insert-or-read cannot
                    // race with a release.
                    let inserted = sqlx::query(
                        "INSERT INTO idempotency_keys \
                         (merchant_id, key, request_hash, state, created_at) \
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (merchant_id, key) DO NOTHING",
                    )
                    .bind(&merchant_id)
                    .bind(&key)
                    .bind(&request_hash[..])
                    .bind(common::IDEMPOTENCY_PENDING)
                    .bind(now)
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    if inserted.rows_affected() == 1 {
                        return Ok(IdempotencyClaim::Claimed);
                    }
                    let row: IdempotencyRow = sqlx::query_as(
                        "SELECT request_hash, state, status, body, created_at FROM idempotency_keys \
                         WHERE merchant_id = ? AND key = ?",
                    )
                    .bind(&merchant_id)
                    .bind(&key)
                    .fetch_one(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    IdempotencyClaim::try_from(row)
                })
            })
            .await
    }

    async fn complete_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        status: u16,
        body: &[u8],
    ) -> StorageResult<()> {
        let (merchant_id, key, body) = (merchant_id.to_string(), key.to_string(), body.to_vec());
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE idempotency_keys SET state = ?, status = ?, body = ? \
                         WHERE merchant_id = ? AND key = ?",
                    )
                    .bind(common::IDEMPOTENCY_COMPLETED)
                    .bind(i64::from(status))
                    .bind(&body)
                    .bind(&merchant_id)
                    .bind(&key)
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    if done.rows_affected() == 0 {
                        return Err(StorageError::NotFound);
                    }
                    Ok(())
                })
            })
            .await
    }

    async fn release_idempotency_key(&self, merchant_id: &str, key: &str) -> StorageResult<()> {
        let (merchant_id, key) = (merchant_id.to_string(), key.to_string());
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    // Only a pending claim can be released: a completed
                    // response stays replayable whatever a late caller does.
                    sqlx::query(
                        "DELETE FROM idempotency_keys \
                         WHERE merchant_id = ? AND key = ? AND state = ?",
                    )
                    .bind(&merchant_id)
                    .bind(&key)
                    .bind(common::IDEMPOTENCY_PENDING)
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    Ok(())
                })
            })
            .await
    }

    async fn sweep_idempotency_keys(&self, before: i64, limit: u32) -> StorageResult<u64> {
        // A bounded chunk per writer unit: the sweep takes its turn between
        // batches instead of holding the write lock for a whole backlog.
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    let done = sqlx::query(
                        "DELETE FROM idempotency_keys WHERE rowid IN \
                         (SELECT rowid FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
                    )
                    .bind(before)
                    .bind(i64::from(limit))
                    .execute(&mut *batch.tx)
                    .await
                    .map_err(db_err)?;
                    Ok(done.rows_affected())
                })
            })
            .await
    }
}

#[async_trait]
impl AuditStore for SqliteStorage {
    async fn append_audit(&self, entry: &AuditEntry) -> StorageResult<()> {
        super::sqlite_audit::append(self, entry).await
    }

    async fn list_audit(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<AuditRow>> {
        let rows: Vec<AuditDbRow> = sqlx::query_as(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(AuditRow::from).collect())
    }
}

#[async_trait]
impl Storage for SqliteStorage {
    async fn migrate(&self) -> StorageResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| common::map_migrate_err(e, is_transient))
    }

    async fn health(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn group_commit_stats(&self) -> super::GroupSnapshot {
        self.writer.stats().snapshot()
    }
}

/// A card view row read by `rusqlite`: the card's columns, then `is_default`.
fn card_view(row: &rusqlite::Row<'_>) -> rusqlite::Result<(CardRecord, bool)> {
    let card = CardRow::from_sqlite(row, 0)?;
    Ok((CardRecord::from(card), row.get(common::CARD_COLUMN_COUNT)?))
}
