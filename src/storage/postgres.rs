//! PostgreSQL implementation of the storage traits (for production and
//! scale-out: several vault nodes share one database).
//!
//! Durability: every connection runs with `synchronous_commit=on`, so a
//! commit returns only once it is flushed (and, with a synchronous standby
//! configured, replicated). JIT compilation is off on every connection:
//! PostgreSQL compiles a query whose estimated cost passes `jit_above_cost`,
//! and a generic plan's estimate follows table averages, not the few rows a
//! vault query touches (a batched wallet read, planned with statistics of
//! customers averaging 959 cards, took 78-120 ms, nearly all of it
//! compiling, to read three cards). Concurrency: transactions run at READ
//! COMMITTED and lock the customer row (`FOR UPDATE`) before touching its
//! cards, always customer first, then card, so per-customer changes (first
//! card becomes default, default promotion, dedupe by fingerprint)
//! serialise without deadlocks.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::postgres::{PgConnectOptions, PgExecutor, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::batch::ReadBatcher;
use super::common::{
    self, api_key_columns, audit_columns, card_columns, customer_columns, data_key_columns,
    ApiKeyRow, AuditDbRow, CardRow, CardViewRow, CustomerJson, CustomerRow, DataKeyRow,
    IdempotencyRow, MerchantRow,
};
use super::group::{GroupBackend, GroupCommit, Tx};
use super::lean::LeanPool;
use super::payments_sql::lifecycle;
use super::postgres_audit::insert_audit;
use super::{
    ApiKeyRecord, AuditEntry, AuditRow, AuditStore, CardInsert, CardRecord, CardStore, CardUpdate,
    CustomerRecord, CustomerStore, CustomerUpdate, DataKeyRecord, IdempotencyClaim,
    IdempotencyStore, KeyStore, MerchantRecord, MerchantStore, Page, Storage, StorageError,
    StorageResult,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long a request waits for a pooled connection (or a new connection)
/// before it is told the database is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Batched reads of one kind running at once (see [`super::batch`]). Two
/// keep a query running while the previous one's answers go out; more
/// would split the same reads into smaller batches.
const READ_QUERIES_IN_FLIGHT: usize = 2;
/// Most keys one batched read carries.
const READ_BATCH: usize = 128;

/// Storage in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgStorage {
    pool: PgPool,
    /// Single statements outside transactions (see [`super::lean`]).
    reads: LeanPool<Postgres>,
    /// Cards by (merchant, id), read in batches (see [`super::batch`]).
    pub(super) cards: ReadBatcher<(String, String), Option<CardRecord>>,
    /// The same with their default flag (the card endpoints).
    pub(super) card_views: ReadBatcher<(String, String), Option<(CardRecord, bool)>>,
    /// Wallets by (merchant, customer), read in batches.
    pub(super) wallets: ReadBatcher<(String, String), Vec<(CardRecord, bool)>>,
    /// Group commit of the hot write paths (see [`super::group`]).
    pub(super) writer: GroupCommit<Postgres>,
    /// MACs the audit chain; appends fail until it is installed.
    pub(super) sealer: std::sync::Arc<super::chain::SealerCell>,
}

/// SQLSTATEs that mean "try again later" rather than a bug: connection
/// exceptions (08), insufficient resources (53), operator intervention
/// (57: shutdown, cannot connect now, statement timeout), system errors (58),
/// serialization failures and deadlocks (40001, 40P01), and a read-only
/// transaction (25006: connected to a standby during fail-over).
fn is_transient(db: &dyn DatabaseError) -> bool {
    db.code().is_some_and(|code| {
        ["08", "53", "57", "58"]
            .iter()
            .any(|class| code.starts_with(class))
            || matches!(&*code, "40001" | "40P01" | "25006")
    })
}

pub(super) fn db_err(err: sqlx::Error) -> StorageError {
    common::map_err(err, is_transient)
}

impl PgStorage {
    /// Connects to `url` (`postgres://…`). Does not migrate: see
    /// [`Storage::migrate`].
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(db_err)?
            .options([("synchronous_commit", "on"), ("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(|conn, _| Box::pin(async move { Ok(common::reusable(conn)) }))
            .connect_with(options.clone())
            .await
            .map_err(db_err)?;
        let reads = LeanPool::new(options.clone(), max_connections, ACQUIRE_TIMEOUT);
        let cards = batcher(&reads, |reads, keys| {
            Box::pin(by_card_id::<CardRow, _>(
                reads,
                CARDS_SQL,
                keys,
                CardRecord::from,
                |c| c,
            ))
        });
        let card_views = batcher(&reads, |reads, keys| {
            Box::pin(by_card_id(
                reads,
                CARD_VIEWS_SQL,
                keys,
                CardViewRow::into_view,
                |(c, _)| c,
            ))
        });
        let wallets = batcher(&reads, |reads, keys| Box::pin(wallets(reads, keys)));
        let sealer: Arc<super::chain::SealerCell> = Default::default();
        Ok(PgStorage {
            writer: GroupCommit::start(
                options.statement_cache_capacity(super::group::WRITER_STATEMENT_CACHE),
                Arc::clone(&sealer),
                // Row locks, not one write lock: nothing to queue for.
                None,
                // Statements go over the network anyway.
                None,
            )?,
            pool,
            reads,
            cards,
            card_views,
            wallets,
            sealer,
        })
    }

    /// The connection pool (for tests and operator tooling).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn begin(&self) -> StorageResult<sqlx::Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db_err)
    }
}

impl GroupBackend for Postgres {
    fn begin_group(
        pool: &PgPool,
    ) -> futures_util::future::BoxFuture<'_, StorageResult<Tx<Postgres>>> {
        Box::pin(async move { pool.begin().await.map_err(db_err) })
    }
    fn storage_err(e: sqlx::Error) -> StorageError {
        db_err(e)
    }
    fn flush<'a>(
        tx: &'a mut Tx<Postgres>,
        sealer: &'a super::chain::SealerCell,
        deferred: &'a super::group::DeferredWrites,
        mut events: Vec<super::EventRecord>,
        mut audit: Vec<AuditEntry>,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<()>> {
        let conn: &'a mut sqlx::PgConnection = tx;
        Box::pin(async move {
            PgStorage::insert_card_rows(conn, &deferred.cards, &mut events, &mut audit).await?;
            PgStorage::write_charge_rows(
                conn,
                &deferred.new_charges,
                &deferred.charge_changes,
                &mut events,
                &mut audit,
            )
            .await?;
            PgStorage::insert_event_rows(conn, &events).await?;
            super::postgres_audit::insert_audit_rows(conn, sealer, &audit).await
        })
    }
    fn exec<'a>(
        tx: &'a mut Tx<Postgres>,
        sql: &'static str,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<()>> {
        let conn: &'a mut sqlx::PgConnection = tx;
        Box::pin(async move {
            sqlx::Executor::execute(conn, sql).await.map_err(db_err)?;
            Ok(())
        })
    }
}

/// A read batcher over the lean pool, running `query` for each batch.
fn batcher<V, F>(reads: &LeanPool<Postgres>, query: F) -> ReadBatcher<(String, String), V>
where
    V: Clone + Send + 'static,
    F: Fn(
            LeanPool<Postgres>,
            Vec<(String, String)>,
        ) -> futures_util::future::BoxFuture<'static, StorageResult<Vec<V>>>
        + Send
        + Sync
        + 'static,
{
    let reads = reads.clone();
    ReadBatcher::new(
        READ_QUERIES_IN_FLIGHT,
        READ_BATCH,
        Box::new(move |keys| query(reads.clone(), keys)),
    )
}

/// Cards of a batch of (merchant, card id) keys. Each key is looked up on
/// its own through the card id index (`LATERAL`), whatever the planner
/// thinks of the arrays' sizes.
pub(super) const CARDS_SQL: &str = concat!(
    "SELECT ",
    card_columns!(),
    " FROM unnest($1::text[], $2::text[]) AS k(key_merchant, key_card) \
     CROSS JOIN LATERAL (SELECT ",
    card_columns!(),
    " FROM cards WHERE cards.merchant_id = k.key_merchant AND cards.id = k.key_card) c"
);

/// The same, each card with its default flag.
pub(super) const CARD_VIEWS_SQL: &str = concat!(
    "SELECT ",
    card_columns!(),
    ", is_default FROM unnest($1::text[], $2::text[]) AS k(key_merchant, key_card) \
     CROSS JOIN LATERAL (SELECT ",
    card_columns!(),
    ", coalesce((SELECT default_card_id FROM customers \
     WHERE customers.id = cards.customer_id) = cards.id, false) AS is_default \
     FROM cards WHERE cards.merchant_id = k.key_merchant AND cards.id = k.key_card) c"
);

/// Wallets of a batch of (merchant, customer) keys, each card with its
/// default flag, walked through the wallet index key by key. `OFFSET 0`
/// keeps the planner from flattening the per-key lookup into a join: with
/// statistics of a table whose customers average hundreds of cards (the
/// load tool's), the generic plan of the flattened form hashed the keys
/// against a parallel scan of every card (72 ms a query, against 0.1).
pub(super) const WALLETS_SQL: &str = concat!(
    "SELECT ",
    card_columns!(),
    ", is_default FROM unnest($1::text[], $2::text[]) AS k(key_merchant, key_customer) \
     CROSS JOIN LATERAL (SELECT seq, ",
    card_columns!(),
    ", coalesce((SELECT default_card_id FROM customers \
     WHERE customers.id = cards.customer_id) = cards.id, false) AS is_default \
     FROM cards WHERE cards.merchant_id = k.key_merchant \
     AND cards.customer_id = k.key_customer OFFSET 0) c ORDER BY c.seq"
);

/// The row of each (merchant, card) key of `sql` (one of the batched card
/// reads), in key order: one query for a batch of reads.
async fn by_card_id<R, T>(
    reads: LeanPool<Postgres>,
    sql: &'static str,
    keys: Vec<(String, String)>,
    into: fn(R) -> T,
    card: fn(&T) -> &CardRecord,
) -> StorageResult<Vec<Option<T>>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let rows: Vec<R> = fetch_keys(&reads, sql, &keys).await?;
    let mut found: HashMap<(String, String), T> = rows
        .into_iter()
        .map(|row| {
            let value = into(row);
            let c = card(&value);
            ((c.merchant_id.clone(), c.id.clone()), value)
        })
        .collect();
    Ok(keys.iter().map(|k| found.remove(k)).collect())
}

/// Runs a batched read `sql` for `keys`: the keys' merchants bound as
/// `$1`, their second halves (card or customer ids) as `$2`.
async fn fetch_keys<R>(
    reads: &LeanPool<Postgres>,
    sql: &'static str,
    keys: &[(String, String)],
) -> StorageResult<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let (merchants, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(m, c)| (m.as_str(), c.as_str())).unzip();
    sqlx::query_as(sql)
        .bind(&merchants)
        .bind(&ids)
        .fetch_all(reads)
        .await
        .map_err(db_err)
}

/// The cards of each (merchant, customer) key, oldest first, in key
/// order: one query for a batch of wallet reads.
async fn wallets(
    reads: LeanPool<Postgres>,
    keys: Vec<(String, String)>,
) -> StorageResult<Vec<Vec<(CardRecord, bool)>>> {
    let rows: Vec<CardViewRow> = fetch_keys(&reads, WALLETS_SQL, &keys).await?;
    let mut found: HashMap<(String, String), Vec<(CardRecord, bool)>> = HashMap::new();
    for row in rows {
        let (card, is_default) = row.into_view();
        found
            .entry((card.merchant_id.clone(), card.customer_id.clone()))
            .or_default()
            .push((card, is_default));
    }
    Ok(keys
        .iter()
        .map(|k| found.remove(k).unwrap_or_default())
        .collect())
}

async fn fetch_customer(
    ex: impl PgExecutor<'_>,
    merchant_id: &str,
    id: &str,
    for_update: bool,
) -> StorageResult<Option<CustomerRecord>> {
    const SQL: &str = concat!(
        "SELECT ",
        customer_columns!(),
        " FROM customers WHERE merchant_id = $1 AND id = $2"
    );
    const SQL_LOCK: &str = concat!(
        "SELECT ",
        customer_columns!(),
        " FROM customers WHERE merchant_id = $1 AND id = $2 FOR UPDATE"
    );
    let row: Option<CustomerRow> = sqlx::query_as(if for_update { SQL_LOCK } else { SQL })
        .bind(merchant_id)
        .bind(id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)?;
    row.map(CustomerRecord::try_from).transpose()
}

async fn fetch_card(
    ex: impl PgExecutor<'_>,
    merchant_id: &str,
    id: &str,
    for_update: bool,
) -> StorageResult<Option<CardRecord>> {
    const SQL: &str = concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE merchant_id = $1 AND id = $2"
    );
    const SQL_LOCK: &str = concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE merchant_id = $1 AND id = $2 FOR UPDATE"
    );
    let row: Option<CardRow> = sqlx::query_as(if for_update { SQL_LOCK } else { SQL })
        .bind(merchant_id)
        .bind(id)
        .fetch_optional(ex)
        .await
        .map_err(db_err)?;
    Ok(row.map(CardRecord::from))
}

pub(super) async fn fetch_card_by_fingerprint(
    ex: impl PgExecutor<'_>,
    card: &CardRecord,
) -> StorageResult<Option<CardRecord>> {
    let row: Option<CardRow> = sqlx::query_as(concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE merchant_id = $1 AND customer_id = $2 AND fingerprint = $3"
    ))
    .bind(&card.merchant_id)
    .bind(&card.customer_id)
    .bind(&card.fingerprint)
    .fetch_optional(ex)
    .await
    .map_err(db_err)?;
    Ok(row.map(CardRecord::from))
}

/// Locks the customer row and returns its `default_card_id`, or `None` when
/// the customer is not the merchant's.
async fn lock_customer(
    ex: impl PgExecutor<'_>,
    merchant_id: &str,
    customer_id: &str,
) -> StorageResult<Option<Option<String>>> {
    sqlx::query_scalar(
        "SELECT default_card_id FROM customers WHERE merchant_id = $1 AND id = $2 FOR UPDATE",
    )
    .bind(merchant_id)
    .bind(customer_id)
    .fetch_optional(ex)
    .await
    .map_err(db_err)
}

async fn set_default_card(
    ex: impl PgExecutor<'_>,
    merchant_id: &str,
    customer_id: &str,
    card_id: Option<&str>,
) -> StorageResult<()> {
    sqlx::query("UPDATE customers SET default_card_id = $1 WHERE merchant_id = $2 AND id = $3")
        .bind(card_id)
        .bind(merchant_id)
        .bind(customer_id)
        .execute(ex)
        .await
        .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl MerchantStore for PgStorage {
    async fn create_merchant(
        &self,
        merchant: &MerchantRecord,
        keys: &[ApiKeyRecord],
        audit: &AuditEntry,
    ) -> StorageResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO merchants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&merchant.id)
            .bind(&merchant.name)
            .bind(merchant.created_at)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        for key in keys {
            sqlx::query(
                "INSERT INTO api_keys (id, merchant_id, kind, hash, scopes, created_at, \
                 last_used_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
            sqlx::query_as("SELECT id, name, created_at FROM merchants WHERE id = $1")
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
            " FROM api_keys WHERE hash = $1 AND revoked_at IS NULL"
        ))
        .bind(&hash[..])
        .fetch_optional(&self.reads)
        .await
        .map_err(db_err)?;
        row.map(ApiKeyRecord::try_from).transpose()
    }

    async fn touch_api_key(&self, id: &str, at: i64) -> StorageResult<()> {
        // GREATEST (which ignores NULL): batched touches may arrive out of
        // order; never go backwards. It rides on the writer's next batch
        // instead of paying a commit of its own.
        let id = id.to_string();
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE api_keys SET last_used_at = GREATEST(last_used_at, $1) \
                         WHERE id = $2",
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
impl CustomerStore for PgStorage {
    async fn insert_customer(&self, c: &CustomerRecord, audit: &AuditEntry) -> StorageResult<()> {
        let json = CustomerJson::encode(c)?;
        let (c, audit) = (c.clone(), audit.clone());
        self.writer
            .run(move |batch| {
                Box::pin(async move {
                    sqlx::query(concat!(
                        "INSERT INTO customers (",
                        customer_columns!(),
                        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
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
        fetch_customer(&self.reads, merchant_id, id, false).await
    }

    async fn update_customer(
        &self,
        merchant_id: &str,
        id: &str,
        update: &CustomerUpdate,
    ) -> StorageResult<CustomerRecord> {
        let mut tx = self.begin().await?;
        let mut c = fetch_customer(&mut *tx, merchant_id, id, true)
            .await?
            .ok_or(StorageError::NotFound)?;
        common::apply_customer_update(&mut c, update);
        let json = CustomerJson::encode(&c)?;
        sqlx::query(
            "UPDATE customers SET email = $1, first_name = $2, last_name = $3, phone = $4, \
             document = $5, billing_address = $6, metadata = $7 \
             WHERE merchant_id = $8 AND id = $9",
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
        let mut tx = self.begin().await?;
        if lock_customer(&mut *tx, merchant_id, id).await?.is_none() {
            return Err(StorageError::NotFound);
        }
        // With the customer locked no card can be added or removed under us.
        let cards: Vec<CardRow> = sqlx::query_as(concat!(
            "SELECT ",
            card_columns!(),
            " FROM cards WHERE merchant_id = $1 AND customer_id = $2 ORDER BY seq"
        ))
        .bind(merchant_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query("DELETE FROM cards WHERE merchant_id = $1 AND customer_id = $2")
            .bind(merchant_id)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("DELETE FROM customers WHERE merchant_id = $1 AND id = $2")
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
        PgStorage::insert_events(&mut tx, &events).await?;
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
                sqlx::query_scalar("SELECT seq FROM customers WHERE merchant_id = $1 AND id = $2")
                    .bind(merchant_id)
                    .bind(after)
                    .fetch_optional(&self.reads)
                    .await
                    .map_err(db_err)?
                    .ok_or(StorageError::NotFound)?,
            ),
        };
        let mut q = QueryBuilder::<Postgres>::new(concat!(
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
impl CardStore for PgStorage {
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
                // The unit was rolled back: look for the card that won the
                // race, if that is what happened (a reused card id is a
                // real conflict).
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
        self.cards
            .get((merchant_id.to_string(), card_id.to_string()))
            .await
    }

    async fn get_card_view(
        &self,
        merchant_id: &str,
        card_id: &str,
    ) -> StorageResult<Option<(CardRecord, bool)>> {
        self.card_views
            .get((merchant_id.to_string(), card_id.to_string()))
            .await
    }

    async fn list_card_views(
        &self,
        merchant_id: &str,
        customer_id: &str,
    ) -> StorageResult<Vec<(CardRecord, bool)>> {
        self.wallets
            .get((merchant_id.to_string(), customer_id.to_string()))
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
            " FROM cards WHERE merchant_id = $1 AND customer_id = $2 ORDER BY seq"
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
        let mut tx = self.begin().await?;
        // Lock order: customer, then card (as everywhere else).
        let customer_id: String =
            sqlx::query_scalar("SELECT customer_id FROM cards WHERE merchant_id = $1 AND id = $2")
                .bind(merchant_id)
                .bind(card_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?
                .ok_or(StorageError::NotFound)?;
        if update.make_default {
            lock_customer(&mut *tx, merchant_id, &customer_id)
                .await?
                .ok_or(StorageError::NotFound)?;
        }
        let mut card = fetch_card(&mut *tx, merchant_id, card_id, true)
            .await?
            .ok_or(StorageError::NotFound)?;
        common::apply_card_update(&mut card, update);
        sqlx::query(
            "UPDATE cards SET alias = $1, holder_name = $2, exp_month = $3, exp_year = $4 \
             WHERE merchant_id = $5 AND id = $6",
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
        let mut tx = self.begin().await?;
        let card = fetch_card(&mut *tx, merchant_id, card_id, false)
            .await?
            .ok_or(StorageError::NotFound)?;
        let current_default = lock_customer(&mut *tx, merchant_id, &card.customer_id)
            .await?
            .ok_or(StorageError::NotFound)?;
        let deleted = sqlx::query("DELETE FROM cards WHERE merchant_id = $1 AND id = $2")
            .bind(merchant_id)
            .bind(card_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if deleted.rows_affected() == 0 {
            // Deleted by a concurrent request while we waited for the lock.
            return Err(StorageError::NotFound);
        }
        if current_default.as_deref() == Some(card_id) {
            let newest: Option<String> = sqlx::query_scalar(
                "SELECT id FROM cards WHERE merchant_id = $1 AND customer_id = $2 \
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
        PgStorage::insert_events(&mut tx, &[lifecycle::card_deleted(&card, audit.at)]).await?;
        tx.commit().await.map_err(db_err)
    }
}

#[async_trait]
impl KeyStore for PgStorage {
    async fn insert_data_key(
        &self,
        key: &DataKeyRecord,
        audit: Option<&AuditEntry>,
    ) -> StorageResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(concat!(
            "INSERT INTO data_keys (",
            data_key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
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
            " FROM data_keys WHERE id = $1"
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
            " FROM data_keys WHERE merchant_id IS NOT DISTINCT FROM $1 AND purpose = $2 \
             AND retired_at IS NULL ORDER BY version DESC LIMIT 1"
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
        sqlx::query_scalar(
            "UPDATE data_keys SET seals_reserved = seals_reserved + $1 WHERE id = $2 \
             RETURNING seals_reserved",
        )
        .bind(block)
        .bind(id)
        .fetch_optional(&self.reads)
        .await
        .map_err(db_err)?
        .ok_or(StorageError::NotFound)
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
impl IdempotencyStore for PgStorage {
    async fn claim_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        request_hash: &[u8; 32],
        now: i64,
    ) -> StorageResult<IdempotencyClaim> {
        for _ in 0..common::IDEMPOTENCY_CLAIM_ATTEMPTS {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (merchant_id, key, request_hash, state, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (merchant_id, key) DO NOTHING",
            )
            .bind(merchant_id)
            .bind(key)
            .bind(&request_hash[..])
            .bind(common::IDEMPOTENCY_PENDING)
            .bind(now)
            .execute(&self.reads)
            .await
            .map_err(db_err)?;
            if inserted.rows_affected() == 1 {
                return Ok(IdempotencyClaim::Claimed);
            }
            let row: Option<IdempotencyRow> = sqlx::query_as(
                "SELECT request_hash, state, status, body, created_at FROM idempotency_keys \
                 WHERE merchant_id = $1 AND key = $2",
            )
            .bind(merchant_id)
            .bind(key)
            .fetch_optional(&self.reads)
            .await
            .map_err(db_err)?;
            // No row: released between our insert and read; claim again.
            if let Some(row) = row {
                return IdempotencyClaim::try_from(row);
            }
        }
        Err(StorageError::Unavailable(
            "idempotency key keeps changing hands".to_string(),
        ))
    }

    async fn complete_idempotency_key(
        &self,
        merchant_id: &str,
        key: &str,
        status: u16,
        body: &[u8],
    ) -> StorageResult<()> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET state = $1, status = $2, body = $3 \
             WHERE merchant_id = $4 AND key = $5",
        )
        .bind(common::IDEMPOTENCY_COMPLETED)
        .bind(i64::from(status))
        .bind(body)
        .bind(merchant_id)
        .bind(key)
        .execute(&self.reads)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Err(StorageError::NotFound);
        }
        Ok(())
    }

    async fn release_idempotency_key(&self, merchant_id: &str, key: &str) -> StorageResult<()> {
        // Only a pending claim can be released: a completed response stays
        // replayable whatever a late caller does.
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE merchant_id = $1 AND key = $2 AND state = $3",
        )
        .bind(merchant_id)
        .bind(key)
        .bind(common::IDEMPOTENCY_PENDING)
        .execute(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn sweep_idempotency_keys(&self, before: i64, limit: u32) -> StorageResult<u64> {
        // `SKIP LOCKED`: a record another node is completing or sweeping
        // right now is left for the next round instead of waited on.
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (merchant_id, key) IN \
             (SELECT merchant_id, key FROM idempotency_keys WHERE created_at < $1 \
              LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.reads)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl AuditStore for PgStorage {
    async fn append_audit(&self, entry: &AuditEntry) -> StorageResult<()> {
        super::postgres_audit::append(self, entry).await
    }

    async fn list_audit(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<AuditRow>> {
        let rows: Vec<AuditDbRow> = sqlx::query_as(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
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
impl Storage for PgStorage {
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
        "postgres"
    }

    fn group_commit_stats(&self) -> super::GroupSnapshot {
        self.writer.stats().snapshot()
    }

    /// PostgreSQL keeps a prepared statement's generic plan once it has
    /// chosen one, until the table's statistics change. A new table has
    /// none until autovacuum's first `ANALYZE` (its daemon looks once a
    /// minute), and plans made meanwhile can be ruinous as the table grows:
    /// a charge lookup by merchant and id planned on an empty table walks
    /// the merchant's whole index range, and the writer's multi-row charge
    /// update without statistics hashes a full scan of the table (17-36 ms
    /// a batch under the load tool). So every table that was never
    /// analysed (`reltuples < 0`) and has outgrown the size the planner
    /// assumes for such a table (10 pages) is analysed here; that
    /// invalidates the plans made without statistics. Autovacuum keeps the
    /// statistics current from then on.
    async fn prime_statistics(&self) -> StorageResult<Vec<String>> {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r' \
             AND c.reltuples < 0 \
             AND pg_relation_size(c.oid) > 10 * current_setting('block_size')::bigint \
             ORDER BY c.relname",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        for table in &tables {
            // A name read from the catalogue, quoted as an identifier.
            let sql = format!("ANALYZE \"{}\"", table.replace('"', "\"\""));
            sqlx::raw_sql(&sql)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
        }
        Ok(tables)
    }

    fn read_batch_stats(&self) -> super::ReadBatchStats {
        [
            self.cards.stats(),
            self.card_views.stats(),
            self.wallets.stats(),
        ]
        .into_iter()
        .fold(super::ReadBatchStats::default(), |t, (queries, reads)| {
            super::ReadBatchStats {
                queries: t.queries + queries,
                reads: t.reads + reads,
            }
        })
    }
}
