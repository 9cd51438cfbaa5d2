//! The audit hash chain, backend-neutral: how an entry is encoded and
//! hashed, and the sealer that MACs each hash. Backends call [`link`] inside
//! the transaction that appends the entry, after serialising appends (SQLite:
//! the write lock of `BEGIN IMMEDIATE`; PostgreSQL: an advisory lock), so the
//! chain is linear.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use super::{AuditEntry, StorageError, StorageResult};

/// `prev_hash` of the first chained entry.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// MACs chain hashes under the audit key. Implemented by the keyring (the
/// key bytes never leave the crypto layer); synchronous because it runs
/// inside a database transaction and must not wait on the HSM.
pub trait AuditSealer: Send + Sync {
    /// Id of the data key (`dek_…`, purpose `audit`) the MACs are made with.
    fn key_id(&self) -> &str;
    /// HMAC-SHA256 of `data`.
    fn mac(&self, data: &[u8]) -> [u8; 32];
}

/// The sealer a storage appends with. Until one is installed every append
/// fails: an action whose audit record cannot be sealed is refused.
#[derive(Default)]
pub struct SealerCell(RwLock<Option<Arc<dyn AuditSealer>>>);

impl std::fmt::Debug for SealerCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealerCell")
    }
}

impl SealerCell {
    pub fn set(&self, sealer: Arc<dyn AuditSealer>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(sealer);
    }

    /// The installed sealer, or an error (fail closed).
    pub fn get(&self) -> StorageResult<Arc<dyn AuditSealer>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StorageError::Other("audit trail not sealed: no audit key".to_string()))
    }
}

/// The head of a multi-row audit insert (both backends).
pub(super) const INSERT_COLUMNS: &str = "INSERT INTO audit_log (at, actor, merchant_id, event, \
     resource, outcome, origin, request_id, detail, prev_hash, hash, mac, mac_key_id) ";

/// The hash of the chain's head (no row: the chain is empty).
pub(super) const HEAD_HASH: &str = "SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1";

/// The checkpoint stored last.
pub(super) const LATEST_CHECKPOINT: &str = "SELECT seq, at, head_seq, head_hash, entries, \
     hsm_label, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1";

/// Where `chain_head` starts counting chained rows, and what it adds:
/// after `counted`'s seq with its count, or from the first row with 0 when
/// there is none or it lies past the head `seq`.
pub(super) fn count_from(counted: Option<(i64, i64)>, seq: i64) -> (i64, i64) {
    match counted {
        Some((after, entries)) if after <= seq => (after, entries),
        _ => (i64::MIN, 0),
    }
}

/// Rows per audit insert: 13 binds each stays far below both backends'
/// limit on bound parameters.
pub(super) const ROWS_PER_INSERT: usize = 500;

/// Defines `insert_audit_rows` for one backend: appends `entries`, in
/// order, to the chain inside the caller's write transaction. `$lock`
/// serialises appends across transactions (and nodes) before the head is
/// read, by a statement of its own: under READ COMMITTED it then sees
/// every append committed before. Then multi-row inserts.
macro_rules! impl_insert_audit_rows {
    ($db:ty, $conn:ty, $err:path, $lock:path) => {
        pub(super) async fn insert_audit_rows(
            conn: &mut $conn,
            sealer: &SealerCell,
            entries: &[AuditEntry],
        ) -> StorageResult<()> {
            if entries.is_empty() {
                return Ok(());
            }
            let sealer = sealer.get()?;
            $lock(&mut *conn).await?;
            let head: Option<Option<Vec<u8>>> = sqlx::query_scalar(chain::HEAD_HASH)
                .fetch_optional(&mut *conn)
                .await
                .map_err($err)?;
            let links = chain::links(head.flatten(), entries, sealer.as_ref())?;
            for (chunk, links) in entries
                .chunks(chain::ROWS_PER_INSERT)
                .zip(links.chunks(chain::ROWS_PER_INSERT))
            {
                let mut insert = sqlx::QueryBuilder::<$db>::new(chain::INSERT_COLUMNS);
                insert.push_values(chunk.iter().zip(links), |mut row, (e, link)| {
                    row.push_bind(e.at)
                        .push_bind(&e.actor)
                        .push_bind(&e.merchant_id)
                        .push_bind(&e.event)
                        .push_bind(&e.resource)
                        .push_bind(&e.outcome)
                        .push_bind(&e.origin)
                        .push_bind(&e.request_id)
                        .push_bind(&e.detail)
                        .push_bind(&link.prev_hash[..])
                        .push_bind(&link.hash[..])
                        .push_bind(&link.mac[..])
                        .push_bind(&link.mac_key_id);
                });
                insert.build().execute(&mut *conn).await.map_err($err)?;
            }
            Ok(())
        }
    };
}
pub(super) use impl_insert_audit_rows;

/// The chain fields of one appended entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub mac: [u8; 32],
    pub mac_key_id: String,
}

fn put(buf: &mut Vec<u8>, field: Option<&str>) {
    match field {
        Some(s) => {
            buf.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        None => buf.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

/// SHA-256 over the previous hash and every field of the entry (length-
/// prefixed, so no two entries encode alike), plus the MAC key id.
pub fn entry_hash(prev_hash: &[u8], e: &AuditEntry, mac_key_id: &str) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"cardvault/audit/v1");
    buf.extend_from_slice(prev_hash);
    buf.extend_from_slice(&e.at.to_be_bytes());
    put(&mut buf, Some(&e.actor));
    put(&mut buf, e.merchant_id.as_deref());
    put(&mut buf, Some(&e.event));
    put(&mut buf, e.resource.as_deref());
    put(&mut buf, Some(&e.outcome));
    put(&mut buf, e.origin.as_deref());
    put(&mut buf, e.request_id.as_deref());
    put(&mut buf, e.detail.as_deref());
    put(&mut buf, Some(mac_key_id));
    Sha256::digest(&buf).into()
}

/// The link for `entry` appended after a head whose hash is `prev`
/// (`None`: the chain is empty).
pub fn link(
    prev: Option<&[u8]>,
    entry: &AuditEntry,
    sealer: &dyn AuditSealer,
) -> StorageResult<Link> {
    let prev_hash: [u8; 32] = match prev {
        None => GENESIS,
        Some(p) => p.try_into().map_err(|_| {
            StorageError::Other("audit chain head has a malformed hash".to_string())
        })?,
    };
    let key_id = sealer.key_id().to_string();
    let hash = entry_hash(&prev_hash, entry, &key_id);
    Ok(Link {
        prev_hash,
        hash,
        mac: sealer.mac(&hash),
        mac_key_id: key_id,
    })
}

/// The links of `entries` appended, in order, after a head whose hash is
/// `head` (`None`: the chain is empty).
pub fn links(
    head: Option<Vec<u8>>,
    entries: &[AuditEntry],
    sealer: &dyn AuditSealer,
) -> StorageResult<Vec<Link>> {
    let mut prev = head;
    entries
        .iter()
        .map(|e| {
            let link = link(prev.as_deref(), e, sealer)?;
            prev = Some(link.hash.to_vec());
            Ok(link)
        })
        .collect()
}

/// A stored audit row with its chain fields, for verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainRow {
    pub seq: i64,
    pub entry: AuditEntry,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
    pub mac: Option<Vec<u8>>,
    pub mac_key_id: Option<String>,
}

/// A signed checkpoint over the chain head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub at: i64,
    pub head_seq: i64,
    pub head_hash: Vec<u8>,
    /// Chained entries up to and including the head.
    pub entries: i64,
    pub hsm_label: String,
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The bytes the HSM signs.
    pub fn signed_bytes(at: i64, head_seq: i64, head_hash: &[u8], entries: i64) -> Vec<u8> {
        let mut b = b"cardvault/audit-checkpoint/v1".to_vec();
        b.extend_from_slice(&at.to_be_bytes());
        b.extend_from_slice(&head_seq.to_be_bytes());
        b.extend_from_slice(head_hash);
        b.extend_from_slice(&entries.to_be_bytes());
        b
    }
}
