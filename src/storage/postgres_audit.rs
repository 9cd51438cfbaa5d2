//! PostgreSQL side of the audit chain, the HSM key registry, rotation,
//! shredding and the audit report's evidence queries. Appends take a
//! transaction-scoped advisory lock before reading the chain head, so
//! concurrent transactions (and several vault nodes) append one after the
//! other and the chain stays linear.

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::chain::{self, ChainRow, Checkpoint, SealerCell};
use super::common::{
    api_key_columns, count_matching, data_key_columns, ApiKeyRow, ChainDbRow, DataKeyRow,
    MerchantRow,
};
use super::postgres::db_err;
use super::{
    AdminStore, ApiKeyRecord, AuditChainStore, AuditEntry, AuditSealer, DataKeyRecord,
    HsmKeyRecord, MerchantRecord, PgStorage, Reseal, ScanHit, StaleCard, StorageError,
    StorageResult,
};

/// Advisory lock key serialising audit appends ("cvaudit" in ASCII).
pub(super) const AUDIT_CHAIN_LOCK: i64 = 0x0063_7661_7564_6974;

/// Appends `e` to the chain inside the caller's write transaction.
pub(super) async fn insert_audit(
    conn: &mut PgConnection,
    sealer: &SealerCell,
    e: &AuditEntry,
) -> StorageResult<()> {
    insert_audit_rows(conn, sealer, std::slice::from_ref(e)).await
}

/// Serialises appends across transactions and nodes until commit. (The
/// lock and the head's read sent as one simple-query string saved a round
/// trip but was planned anew each time, and cost as much as the two
/// prepared statements under load.)
async fn chain_lock(conn: &mut PgConnection) -> StorageResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_CHAIN_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

chain::impl_insert_audit_rows!(sqlx::Postgres, PgConnection, db_err, chain_lock);

/// A standalone append, committed with whatever else the group-commit
/// writer is batching.
pub(super) async fn append(s: &PgStorage, e: &AuditEntry) -> StorageResult<()> {
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

impl PgStorage {
    pub(super) async fn active_hsm_key_impl(
        &self,
        kind: &str,
        merchant_id: Option<&str>,
    ) -> StorageResult<Option<String>> {
        sqlx::query_scalar(
            "SELECT label FROM hsm_keys WHERE kind = $1 AND coalesce(merchant_id, '') = $2 \
             AND state = 'active' ORDER BY version DESC LIMIT 1",
        )
        .bind(kind)
        .bind(merchant_id.unwrap_or(""))
        .fetch_optional(self.pool())
        .await
        .map_err(db_err)
    }

    pub(super) async fn register_hsm_key_impl(&self, k: &HsmKeyRecord) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO hsm_keys (label, kind, merchant_id, version, state, created_at, \
             retired_at, destroyed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
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
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }
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
impl AuditChainStore for PgStorage {
    fn set_audit_sealer(&self, sealer: std::sync::Arc<dyn AuditSealer>) {
        self.sealer.set(sealer);
    }

    async fn chain_rows(&self, after_seq: i64, limit: u32) -> StorageResult<Vec<ChainRow>> {
        let rows: Vec<ChainDbRow> = sqlx::query_as(
            "SELECT seq, at, actor, merchant_id, event, resource, outcome, origin, request_id, \
             detail, prev_hash, hash, mac, mac_key_id FROM audit_log WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(ChainRow::from).collect())
    }

    async fn chain_end(&self) -> StorageResult<i64> {
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM audit_log")
            .fetch_one(self.pool())
            .await
            .map_err(db_err)
    }

    async fn chain_duplicate_hashes(&self, upto_seq: i64) -> StorageResult<Vec<Vec<u8>>> {
        sqlx::query_scalar(
            "SELECT hash FROM audit_log WHERE seq <= $1 AND hash IS NOT NULL \
             GROUP BY hash HAVING count(*) > 1",
        )
        .bind(upto_seq)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)
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
            "SELECT count(*) FROM audit_log WHERE hash IS NOT NULL AND seq > $1 AND seq <= $2",
        )
        .bind(after)
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err)?;
        Ok(Some((seq, hash, base + n)))
    }

    async fn insert_checkpoint(&self, c: &Checkpoint) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (at, head_seq, head_hash, entries, hsm_label, \
             signature) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(c.at)
        .bind(c.head_seq)
        .bind(&c.head_hash)
        .bind(c.entries)
        .bind(&c.hsm_label)
        .bind(&c.signature)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
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

    async fn audit_event_counts(&self) -> StorageResult<Vec<(String, String, i64)>> {
        sqlx::query_as("SELECT event, outcome, count(*) FROM audit_log GROUP BY event, outcome ORDER BY event, outcome")
            .fetch_all(self.pool())
            .await
            .map_err(db_err)
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
impl AdminStore for PgStorage {
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
        let mut tx = self.begin().await?;
        let column = if state == "destroyed" {
            "destroyed_at"
        } else {
            "retired_at"
        };
        sqlx::query(&format!(
            "UPDATE hsm_keys SET state = $1, {column} = coalesce({column}, $2) WHERE label = $3"
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
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE data_keys SET wrapped = $1, wrapping_label = $2 WHERE id = $3 AND wrapping_label = $4",
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
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE data_keys SET retired_at = $1 WHERE id = $2 AND retired_at IS NULL",
        )
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
             WHERE k.retired_at IS NOT NULL AND c.seq > $1 ORDER BY c.seq LIMIT $2",
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
        let mut tx = self.begin().await?;
        let mut done = 0;
        for r in reseals {
            done += sqlx::query(
                "UPDATE cards SET pan_ciphertext = $1, dek_id = $2 WHERE id = $3 AND dek_id = $4",
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
        let mut tx = self.begin().await?;
        // Cards go with their customers (ON DELETE CASCADE) but are deleted
        // explicitly first so the order does not depend on the cascade.
        for table in MERCHANT_TABLES {
            sqlx::query(&format!("DELETE FROM {table} WHERE merchant_id = $1"))
                .bind(merchant_id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        let n = sqlx::query("DELETE FROM merchants WHERE id = $1")
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
        let mut tx = self.begin().await?;
        let n =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
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
        let mut conn = self.pool().acquire().await.map_err(db_err)?;
        let columns: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT table_name::text, column_name::text, data_type::text \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        let mut hits = Vec::new();
        let mut values = 0i64;
        for (table, column, data_type) in columns {
            let (t, c) = (table.replace('"', "\"\""), column.replace('"', "\"\""));
            // Binary columns as their bytes; everything else as its text.
            let (seen, rows) = if data_type == "bytea" {
                let sql = format!("SELECT \"{c}\" FROM \"{t}\"");
                let cells = sqlx::query_scalar::<_, Option<Vec<u8>>>(&sql).fetch(&mut *conn);
                count_matching(cells, matches, db_err).await?
            } else {
                let sql = format!("SELECT \"{c}\"::text FROM \"{t}\"");
                let cells = sqlx::query_scalar::<_, Option<String>>(&sql).fetch(&mut *conn);
                count_matching(cells, matches, db_err).await?
            };
            values += seen;
            if rows > 0 {
                hits.push(ScanHit {
                    table: table.clone(),
                    column,
                    rows,
                });
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
        let exists: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_one(self.pool())
        .await
        .map_err(db_err)?;
        if exists == 0 {
            return Ok(None);
        }
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE \"{}\" < $1{}",
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
