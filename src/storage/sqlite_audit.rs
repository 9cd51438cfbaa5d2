//! SQLite side of the audit chain, the HSM key registry, rotation,
//! shredding and the audit report's evidence queries. Appends are
//! serialised by the write lock every write transaction takes up front
//! (`BEGIN IMMEDIATE`), so reading the head and appending after it is safe.

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};

use super::chain::{self, ChainRow, Checkpoint, SealerCell};
use super::common::{
    api_key_columns, count_matching, data_key_columns, ApiKeyRow, ChainDbRow, DataKeyRow,
    MerchantRow,
};
use super::sqlite::db_err;
use super::sqlite_inline::or_pool;
use super::{
    AdminStore, ApiKeyRecord, AuditChainStore, AuditEntry, AuditSealer, DataKeyRecord,
    HsmKeyRecord, MerchantRecord, Reseal, ScanHit, SqliteStorage, StaleCard, StorageError,
    StorageResult,
};

/// Appends `e` to the chain inside the caller's write transaction.
pub(super) async fn insert_audit(
    conn: &mut SqliteConnection,
    sealer: &SealerCell,
    e: &AuditEntry,
) -> StorageResult<()> {
    insert_audit_rows(conn, sealer, std::slice::from_ref(e)).await
}

/// Appends need no lock of their own on SQLite: every write transaction
/// took the database's write lock up front (`BEGIN IMMEDIATE`).
async fn chain_lock(_conn: &mut SqliteConnection) -> StorageResult<()> {
    Ok(())
}

chain::impl_insert_audit_rows!(sqlx::Sqlite, SqliteConnection, db_err, chain_lock);

/// A standalone append, committed with whatever else the group-commit
/// writer is batching.
pub(super) async fn append(s: &SqliteStorage, e: &AuditEntry) -> StorageResult<()> {
    s.writer.append(e.clone()).await
}

#[derive(sqlx::FromRow)]
struct HsmKeyRow {
    label: String,
    kind: String,
    merchant_id: Option<String>,
    version: i64,
    state: String,
    created_at: i64,
    retired_at: Option<i64>,
    destroyed_at: Option<i64>,
}

impl From<HsmKeyRow> for HsmKeyRecord {
    fn from(r: HsmKeyRow) -> Self {
        HsmKeyRecord {
            label: r.label,
            kind: r.kind,
            merchant_id: r.merchant_id,
            version: r.version,
            state: r.state,
            created_at: r.created_at,
            retired_at: r.retired_at,
            destroyed_at: r.destroyed_at,
        }
    }
}

impl SqliteStorage {
    pub(super) async fn active_hsm_key_impl(
        &self,
        kind: &str,
        merchant_id: Option<&str>,
    ) -> StorageResult<Option<String>> {
        sqlx::query_scalar(
            "SELECT label FROM hsm_keys WHERE kind = ? AND coalesce(merchant_id, '') = ? \
             AND state = 'active' ORDER BY version DESC LIMIT 1",
        )
        .bind(kind)
        .bind(merchant_id.unwrap_or(""))
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)
    }

    pub(super) async fn register_hsm_key_impl(&self, k: &HsmKeyRecord) -> StorageResult<()> {
        // Through the write gate like every other write: an autocommit
        // statement would poll (SQLite's busy handler) for a lock the
        // group-commit writer frees only between batches.
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO hsm_keys (label, kind, merchant_id, version, state, created_at, \
             retired_at, destroyed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (label) DO NOTHING",
        )
        .bind(&k.label)
        .bind(&k.kind)
        .bind(&k.merchant_id)
        .bind(k.version)
        .bind(&k.state)
        .bind(k.created_at)
        .bind(k.retired_at)
        .bind(k.destroyed_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    /// `(values, matching values)` of the single column `sql` selects,
    /// read on a blocking thread straight from SQLite (through sqlx each
    /// value is a message from the connection's thread and a copy; the
    /// report offered about 14 values per audit entry that way). The pool
    /// streams it when the direct read would have to wait.
    async fn scan_column(
        &self,
        sql: String,
        matches: for<'b> fn(&'b [u8]) -> bool,
    ) -> StorageResult<(i64, i64)> {
        let query = sql.clone();
        let direct = self
            .bulk_read(move |c| {
                let mut stmt = c.prepare(&query)?;
                let mut rows = stmt.query([])?;
                let (mut values, mut hits) = (0i64, 0i64);
                while let Some(row) = rows.next()? {
                    if let rusqlite::types::ValueRef::Blob(cell) = row.get_ref(0)? {
                        values += 1;
                        hits += i64::from(matches(cell));
                    }
                }
                Ok((values, hits))
            })
            .await;
        or_pool(direct, async {
            let mut conn = self.pool().acquire().await.map_err(db_err)?;
            let cells = sqlx::query_scalar::<_, Option<Vec<u8>>>(&sql).fetch(&mut *conn);
            count_matching(cells, matches, db_err).await
        })
        .await
    }
}

/// The chain rows after a seq, in order, a page at a time.
const CHAIN_PAGE: &str = "SELECT seq, at, actor, merchant_id, event, resource, outcome, origin, \
     request_id, detail, prev_hash, hash, mac, mac_key_id FROM audit_log WHERE seq > ? \
     ORDER BY seq LIMIT ?";

/// Entries per event and outcome, over the whole log.
const EVENT_COUNTS: &str = "SELECT event, outcome, count(*) FROM audit_log \
     GROUP BY event, outcome ORDER BY event, outcome";

/// Hashes more than one row up to a seq holds.
const DUPLICATE_HASHES: &str = "SELECT hash FROM audit_log WHERE seq <= ? AND hash IS NOT NULL \
     GROUP BY hash HAVING count(*) > 1";

/// A [`CHAIN_PAGE`] row read by `rusqlite`.
fn chain_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChainRow> {
    Ok(ChainRow {
        seq: r.get(0)?,
        entry: AuditEntry {
            at: r.get(1)?,
            actor: r.get(2)?,
            merchant_id: r.get(3)?,
            event: r.get(4)?,
            resource: r.get(5)?,
            outcome: r.get(6)?,
            origin: r.get(7)?,
            request_id: r.get(8)?,
            detail: r.get(9)?,
        },
        prev_hash: r.get(10)?,
        hash: r.get(11)?,
        mac: r.get(12)?,
        mac_key_id: r.get(13)?,
    })
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    seq: i64,
    at: i64,
    head_seq: i64,
    head_hash: Vec<u8>,
    entries: i64,
    hsm_label: String,
    signature: Vec<u8>,
}

impl From<CheckpointRow> for Checkpoint {
    fn from(r: CheckpointRow) -> Self {
        Checkpoint {
            seq: r.seq,
            at: r.at,
            head_seq: r.head_seq,
            head_hash: r.head_hash,
            entries: r.entries,
            hsm_label: r.hsm_label,
            signature: r.signature,
        }
    }
}

#[async_trait]
impl AuditChainStore for SqliteStorage {
    fn set_audit_sealer(&self, sealer: std::sync::Arc<dyn AuditSealer>) {
        self.sealer.set(sealer);
    }

    /// A page of the chain, read on a blocking thread straight from SQLite:
    /// through sqlx each row is a message from the connection's thread and
    /// a copy of every column, which made `audit verify` take about 19 µs
    /// a row. The pool answers when the direct read would have to wait.
    async fn chain_rows(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<ChainRow>> {
        let direct = self
            .bulk_read(move |c| {
                c.prepare_cached(CHAIN_PAGE)?
                    .query_map((after_seq, i64::from(limit)), chain_row)?
                    .collect()
            })
            .await;
        or_pool(direct, async {
            let rows: Vec<ChainDbRow> = sqlx::query_as(CHAIN_PAGE)
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
                .map_err(db_err)?;
            Ok(rows.into_iter().map(ChainRow::from).collect())
        })
        .await
    }

    async fn chain_end(&self) -> StorageResult<i64> {
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM audit_log")
            .fetch_one(self.pool())
            .await
            .map_err(db_err)
    }

    /// On a direct connection: its temporary storage is a file, so the
    /// sort behind `GROUP BY` spills to disk past a small cache. The pool's
    /// connections keep temporary storage in memory, which for this query
    /// grows with the log (the pool answers only when the direct read would
    /// have to wait).
    async fn chain_duplicate_hashes(&self, upto_seq: i64) -> StorageResult<Vec<Vec<u8>>> {
        let direct = self
            .bulk_read(move |c| {
                c.prepare_cached(DUPLICATE_HASHES)?
                    .query_map([upto_seq], |r| r.get(0))?
                    .collect()
            })
            .await;
        or_pool(direct, async {
            sqlx::query_scalar(DUPLICATE_HASHES)
                .bind(upto_seq)
                .fetch_all(self.pool())
                .await
                .map_err(db_err)
        })
        .await
    }

    async fn chain_head(
        &self,
        counted: Option<(i64, i64)>,
    ) -> StorageResult<Option<(i64, Vec<u8>, i64)>> {
        let mut conn = self.pool().acquire().await.map_err(db_err)?;
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, hash FROM audit_log WHERE hash IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
        let Some((seq, hash)) = head else {
            return Ok(None);
        };
        let (after, base) = super::chain::count_from(counted, seq);
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE hash IS NOT NULL AND seq > ? AND seq <= ?",
        )
        .bind(after)
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
        Ok(Some((seq, hash, base + n)))
    }

    async fn insert_checkpoint(&self, c: &Checkpoint) -> StorageResult<()> {
        // Gated, as `register_hsm_key_impl` explains.
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO audit_checkpoints (at, head_seq, head_hash, entries, hsm_label, \
             signature) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(c.at)
        .bind(c.head_seq)
        .bind(&c.head_hash)
        .bind(c.entries)
        .bind(&c.hsm_label)
        .bind(&c.signature)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn list_checkpoints(&self) -> StorageResult<Vec<Checkpoint>> {
        let rows: Vec<CheckpointRow> = sqlx::query_as(
            "SELECT seq, at, head_seq, head_hash, entries, hsm_label, signature \
             FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(Checkpoint::from).collect())
    }

    async fn latest_checkpoint(&self) -> StorageResult<Option<Checkpoint>> {
        let row: Option<CheckpointRow> = sqlx::query_as(super::chain::LATEST_CHECKPOINT)
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
        Ok(row.map(Checkpoint::from))
    }

    /// On a direct connection, for the same reason as
    /// [`chain_duplicate_hashes`](AuditChainStore::chain_duplicate_hashes):
    /// the sort behind `GROUP BY` over the whole log spills to a file
    /// there, where the pool's connections would hold it in memory.
    async fn audit_event_counts(&self) -> StorageResult<Vec<(String, String, i64)>> {
        let direct = self
            .bulk_read(|c| {
                c.prepare_cached(EVENT_COUNTS)?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .await;
        or_pool(direct, async {
            sqlx::query_as(EVENT_COUNTS)
                .fetch_all(self.pool())
                .await
                .map_err(db_err)
        })
        .await
    }
}

/// Tables a merchant's rows live in, children first.
const MERCHANT_TABLES: &[&str] = &[
    "webhook_deliveries",
    "events",
    "webhook_endpoints",
    "refunds",
    "card_verifications",
    "charges",
    "card_tokens",
    "cards",
    "customers",
    "idempotency_keys",
    "api_keys",
    "data_keys",
];

#[async_trait]
impl AdminStore for SqliteStorage {
    async fn list_hsm_keys(&self) -> StorageResult<Vec<HsmKeyRecord>> {
        let rows: Vec<HsmKeyRow> = sqlx::query_as(
            "SELECT label, kind, merchant_id, version, state, created_at, retired_at, \
             destroyed_at FROM hsm_keys ORDER BY kind, merchant_id, version",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(HsmKeyRecord::from).collect())
    }

    async fn set_hsm_key_state(
        &self,
        label: &str,
        state: &str,
        at: i64,
        audit: &AuditEntry,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        let column = if state == "destroyed" {
            "destroyed_at"
        } else {
            "retired_at"
        };
        sqlx::query(&format!(
            "UPDATE hsm_keys SET state = ?, {column} = coalesce({column}, ?) WHERE label = ?"
        ))
        .bind(state)
        .bind(at)
        .bind(label)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn list_data_keys(&self) -> StorageResult<Vec<DataKeyRecord>> {
        let rows: Vec<DataKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            data_key_columns!(),
            " FROM data_keys ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(DataKeyRecord::from).collect())
    }

    async fn rewrap_data_key(
        &self,
        id: &str,
        old_label: &str,
        new_label: &str,
        wrapped: &[u8],
        audit: &AuditEntry,
    ) -> StorageResult<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE data_keys SET wrapped = ?, wrapping_label = ? WHERE id = ? AND wrapping_label = ?",
        )
        .bind(wrapped)
        .bind(new_label)
        .bind(id)
        .bind(old_label)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn retire_data_key(&self, id: &str, at: i64, audit: &AuditEntry) -> StorageResult<bool> {
        let mut tx = self.begin_write().await?;
        let n =
            sqlx::query("UPDATE data_keys SET retired_at = ? WHERE id = ? AND retired_at IS NULL")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn stale_cards(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<StaleCard>> {
        let rows = sqlx::query(
            "SELECT c.seq, c.id, c.merchant_id, c.dek_id, c.pan_ciphertext FROM cards c \
             JOIN data_keys k ON k.id = c.dek_id \
             WHERE k.retired_at IS NOT NULL AND c.seq > ? ORDER BY c.seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(StaleCard {
                    seq: r.try_get("seq").map_err(db_err)?,
                    id: r.try_get("id").map_err(db_err)?,
                    merchant_id: r.try_get("merchant_id").map_err(db_err)?,
                    dek_id: r.try_get("dek_id").map_err(db_err)?,
                    pan_ciphertext: r.try_get("pan_ciphertext").map_err(db_err)?,
                })
            })
            .collect()
    }

    async fn count_stale_cards(&self) -> StorageResult<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM cards c JOIN data_keys k ON k.id = c.dek_id \
             WHERE k.retired_at IS NOT NULL",
        )
        .fetch_one(self.pool())
        .await
        .map_err(db_err)
    }

    async fn reseal_cards(&self, reseals: &[Reseal], audit: &AuditEntry) -> StorageResult<u64> {
        let mut tx = self.begin_write().await?;
        let mut done = 0;
        for r in reseals {
            done += sqlx::query(
                "UPDATE cards SET pan_ciphertext = ?, dek_id = ? WHERE id = ? AND dek_id = ?",
            )
            .bind(&r.pan_ciphertext)
            .bind(&r.new_dek_id)
            .bind(&r.id)
            .bind(&r.old_dek_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        }
        let mut audit = audit.clone();
        audit.detail = Some(format!("resealed={done}"));
        insert_audit(&mut tx, &self.sealer, &audit).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(done)
    }

    async fn delete_merchant_rows(
        &self,
        merchant_id: &str,
        audit: &AuditEntry,
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        // Cards go with their customers (ON DELETE CASCADE) but are deleted
        // explicitly first so the order does not depend on the cascade.
        for table in MERCHANT_TABLES {
            sqlx::query(&format!("DELETE FROM {table} WHERE merchant_id = ?"))
                .bind(merchant_id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        let n = sqlx::query("DELETE FROM merchants WHERE id = ?")
            .bind(merchant_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn list_merchants(&self) -> StorageResult<Vec<MerchantRecord>> {
        let rows: Vec<MerchantRow> =
            sqlx::query_as("SELECT id, name, created_at FROM merchants ORDER BY created_at, id")
                .fetch_all(self.pool())
                .await
                .map_err(db_err)?;
        Ok(rows.into_iter().map(MerchantRecord::from).collect())
    }

    async fn list_api_keys(&self) -> StorageResult<Vec<ApiKeyRecord>> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        rows.into_iter().map(ApiKeyRecord::try_from).collect()
    }

    async fn revoke_api_key(&self, id: &str, at: i64, audit: &AuditEntry) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        let n =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        if n == 0 {
            return Err(StorageError::NotFound);
        }
        insert_audit(&mut tx, &self.sealer, audit).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn scan_all_columns(
        &self,
        matches: for<'b> fn(&'b [u8]) -> bool,
    ) -> StorageResult<(Vec<ScanHit>, i64)> {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        let mut hits = Vec::new();
        let mut values = 0i64;
        for table in tables {
            let columns: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_table_info(?) ORDER BY cid")
                    .bind(&table)
                    .fetch_all(self.pool())
                    .await
                    .map_err(db_err)?;
            for column in columns {
                // CAST to BLOB gives the stored bytes of text and numbers alike.
                let sql = format!(
                    "SELECT CAST(\"{}\" AS BLOB) FROM \"{}\"",
                    column.replace('"', "\"\""),
                    table.replace('"', "\"\"")
                );
                let (seen, rows) = self.scan_column(sql, matches).await?;
                values += seen;
                if rows > 0 {
                    hits.push(ScanHit {
                        table: table.clone(),
                        column,
                        rows,
                    });
                }
            }
        }
        Ok((hits, values))
    }

    async fn count_older(
        &self,
        table: &str,
        column: &str,
        before: i64,
        held: Option<&str>,
    ) -> StorageResult<Option<i64>> {
        let exists: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pragma_table_info(?) WHERE name = ?")
                .bind(table)
                .bind(column)
                .fetch_one(self.pool())
                .await
                .map_err(db_err)?;
        if exists == 0 {
            return Ok(None);
        }
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE \"{}\" < ?{}",
            table.replace('"', "\"\""),
            column.replace('"', "\"\""),
            held.map(|h| format!(" AND \"{}\" IS NOT NULL", h.replace('"', "\"\"")))
                .unwrap_or_default()
        ))
        .bind(before)
        .fetch_one(self.pool())
        .await
        .map_err(db_err)?;
        Ok(Some(n))
    }
}
