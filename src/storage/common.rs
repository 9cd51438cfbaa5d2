//! Backend-neutral pieces of the SQL stores: row shapes and their mapping to
//! records, JSON encoding of structured columns, update merging and error
//! classification. No backend-specific SQL lives here.

use sqlx::error::{DatabaseError, ErrorKind};

use super::{
    Address, ApiKeyKind, ApiKeyRecord, AuditEntry, AuditRow, CardRecord, CardUpdate,
    CustomerRecord, CustomerUpdate, DataKeyRecord, Document, IdempotencyClaim, MerchantRecord,
    Metadata, StorageError, StorageResult,
};

/// Tries a claim this many times when the row it collided with disappears
/// (released) before it could be read.
pub(super) const IDEMPOTENCY_CLAIM_ATTEMPTS: usize = 5;

/// Converts a sqlx error; `transient` tells which database errors of the
/// backend mean "unreachable / try again" (503) rather than a bug.
pub(super) fn map_err(err: sqlx::Error, transient: fn(&dyn DatabaseError) -> bool) -> StorageError {
    match err {
        sqlx::Error::Database(db) => {
            // `message()` is the primary message only: it names constraints
            // and columns, never the row values (Postgres puts those in
            // `detail`, which is deliberately not used).
            let message = db.message().to_string();
            match db.kind() {
                ErrorKind::UniqueViolation => StorageError::Conflict(message),
                // Only inserts/updates reference a parent, and a missing parent
                // is a missing (or foreign) merchant, customer or card.
                ErrorKind::ForeignKeyViolation => StorageError::NotFound,
                _ if transient(db.as_ref()) => StorageError::Unavailable(message),
                _ => StorageError::Other(message),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StorageError::Unavailable(err.to_string()),
        sqlx::Error::RowNotFound => StorageError::NotFound,
        other => StorageError::Other(other.to_string()),
    }
}

/// Converts a migration error (see [`map_err`]).
pub(super) fn map_migrate_err(
    err: sqlx::migrate::MigrateError,
    transient: fn(&dyn DatabaseError) -> bool,
) -> StorageError {
    match err {
        sqlx::migrate::MigrateError::Execute(e) => map_err(e, transient),
        other => StorageError::Other(format!("migration failed: {other}")),
    }
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StorageError {
    StorageError::Other(format!("corrupt {what} row: {err}"))
}

fn to_json<T: serde::Serialize>(what: &str, value: &T) -> StorageResult<String> {
    serde_json::to_string(value)
        .map_err(|e| StorageError::Other(format!("cannot encode {what}: {e}")))
}

fn opt_to_json<T: serde::Serialize>(
    what: &str,
    value: Option<&T>,
) -> StorageResult<Option<String>> {
    value.map(|v| to_json(what, v)).transpose()
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> StorageResult<T> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

fn opt_from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    text: Option<&str>,
) -> StorageResult<Option<T>> {
    text.map(|t| from_json(what, t)).transpose()
}

fn hash32(what: &str, bytes: &[u8]) -> StorageResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| corrupt(what, format!("hash of {} bytes", bytes.len())))
}

#[derive(sqlx::FromRow)]
pub(super) struct MerchantRow {
    id: String,
    name: String,
    created_at: i64,
}

impl From<MerchantRow> for MerchantRecord {
    fn from(r: MerchantRow) -> Self {
        MerchantRecord {
            id: r.id,
            name: r.name,
            created_at: r.created_at,
        }
    }
}

/// Column list matching [`ApiKeyRow`]'s fields (a macro so that `concat!` can
/// build `&'static str` queries).
macro_rules! api_key_columns {
    () => {
        "id, merchant_id, kind, hash, scopes, created_at, last_used_at, revoked_at"
    };
}
pub(super) use api_key_columns;

#[derive(sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    id: String,
    merchant_id: String,
    kind: String,
    hash: Vec<u8>,
    scopes: String,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = StorageError;
    fn try_from(r: ApiKeyRow) -> StorageResult<Self> {
        Ok(ApiKeyRecord {
            kind: ApiKeyKind::parse(&r.kind)
                .ok_or_else(|| corrupt("api_keys", format!("kind {:?}", r.kind)))?,
            hash: hash32("api_keys", &r.hash)?,
            scopes: from_json("api_keys", &r.scopes)?,
            id: r.id,
            merchant_id: r.merchant_id,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        })
    }
}

/// The JSON-encoded scopes column of an API key.
pub(super) fn encode_scopes(key: &ApiKeyRecord) -> StorageResult<String> {
    to_json("scopes", &key.scopes)
}

/// Column list matching [`CustomerRow`]'s fields (a macro so that `concat!` can
/// build `&'static str` queries).
macro_rules! customer_columns {
    () => {
        "id, merchant_id, email, first_name, last_name, phone, \
     document, billing_address, metadata, default_card_id, created_at"
    };
}
pub(super) use customer_columns;

#[derive(sqlx::FromRow)]
pub(super) struct CustomerRow {
    id: String,
    merchant_id: String,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    phone: Option<String>,
    document: Option<String>,
    billing_address: Option<String>,
    metadata: String,
    default_card_id: Option<String>,
    created_at: i64,
}

impl CustomerRow {
    /// The row of a `SELECT customer_columns!()` read by `rusqlite`.
    pub(super) fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(CustomerRow {
            id: row.get(0)?,
            merchant_id: row.get(1)?,
            email: row.get(2)?,
            first_name: row.get(3)?,
            last_name: row.get(4)?,
            phone: row.get(5)?,
            document: row.get(6)?,
            billing_address: row.get(7)?,
            metadata: row.get(8)?,
            default_card_id: row.get(9)?,
            created_at: row.get(10)?,
        })
    }
}

impl TryFrom<CustomerRow> for CustomerRecord {
    type Error = StorageError;
    fn try_from(r: CustomerRow) -> StorageResult<Self> {
        Ok(CustomerRecord {
            document: opt_from_json("customers.document", r.document.as_deref())?,
            billing_address: opt_from_json(
                "customers.billing_address",
                r.billing_address.as_deref(),
            )?,
            metadata: from_json("customers.metadata", &r.metadata)?,
            id: r.id,
            merchant_id: r.merchant_id,
            email: r.email,
            first_name: r.first_name,
            last_name: r.last_name,
            phone: r.phone,
            default_card_id: r.default_card_id,
            created_at: r.created_at,
        })
    }
}

/// The JSON-encoded columns of a customer.
pub(super) struct CustomerJson {
    pub document: Option<String>,
    pub billing_address: Option<String>,
    pub metadata: String,
}

impl CustomerJson {
    pub(super) fn encode(c: &CustomerRecord) -> StorageResult<Self> {
        Ok(CustomerJson {
            document: opt_to_json::<Document>("document", c.document.as_ref())?,
            billing_address: opt_to_json::<Address>("billing_address", c.billing_address.as_ref())?,
            metadata: to_json::<Metadata>("metadata", &c.metadata)?,
        })
    }
}

/// Applies `update` to `c` (the semantics of [`CustomerUpdate`]).
pub(super) fn apply_customer_update(c: &mut CustomerRecord, update: &CustomerUpdate) {
    if let Some(email) = &update.email {
        c.email.clone_from(email);
    }
    if let Some(v) = &update.first_name {
        c.first_name.clone_from(v);
    }
    if let Some(v) = &update.last_name {
        c.last_name.clone_from(v);
    }
    if let Some(v) = &update.phone {
        c.phone.clone_from(v);
    }
    if let Some(v) = &update.document {
        c.document.clone_from(v);
    }
    if let Some(v) = &update.billing_address {
        c.billing_address.clone_from(v);
    }
    if let Some(v) = &update.metadata {
        c.metadata.clone_from(v);
    }
}

/// Column list matching [`CardRow`]'s fields (a macro so that `concat!` can
/// build `&'static str` queries).
macro_rules! card_columns {
    () => {
        "id, merchant_id, customer_id, pan_ciphertext, dek_id, \
     fingerprint, bin, last4, pan_length, brand, funding, exp_month, exp_year, holder_name, \
     alias, status, created_at"
    };
}
pub(super) use card_columns;

#[derive(sqlx::FromRow)]
pub(super) struct CardRow {
    id: String,
    merchant_id: String,
    customer_id: String,
    pan_ciphertext: Vec<u8>,
    dek_id: String,
    fingerprint: Vec<u8>,
    bin: String,
    last4: String,
    pan_length: i64,
    brand: String,
    funding: String,
    exp_month: i64,
    exp_year: i64,
    holder_name: Option<String>,
    alias: Option<String>,
    status: String,
    created_at: i64,
}

impl CardRow {
    /// The row of a `SELECT card_columns!()` read by `rusqlite` (see
    /// `sqlite_inline`), columns by position from `first`.
    pub(super) fn from_sqlite(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(CardRow {
            id: row.get(first)?,
            merchant_id: row.get(first + 1)?,
            customer_id: row.get(first + 2)?,
            pan_ciphertext: row.get(first + 3)?,
            dek_id: row.get(first + 4)?,
            fingerprint: row.get(first + 5)?,
            bin: row.get(first + 6)?,
            last4: row.get(first + 7)?,
            pan_length: row.get(first + 8)?,
            brand: row.get(first + 9)?,
            funding: row.get(first + 10)?,
            exp_month: row.get(first + 11)?,
            exp_year: row.get(first + 12)?,
            holder_name: row.get(first + 13)?,
            alias: row.get(first + 14)?,
            status: row.get(first + 15)?,
            created_at: row.get(first + 16)?,
        })
    }
}

/// Columns in `card_columns!()`.
pub(super) const CARD_COLUMN_COUNT: usize = 17;

/// A card with whether it is its customer's default (one query for the
/// card endpoints).
#[derive(sqlx::FromRow)]
pub(super) struct CardViewRow {
    #[sqlx(flatten)]
    pub(super) card: CardRow,
    pub(super) is_default: bool,
}

impl CardViewRow {
    /// The card and whether it is its customer's default.
    pub(super) fn into_view(self) -> (CardRecord, bool) {
        (CardRecord::from(self.card), self.is_default)
    }
}

impl From<CardRow> for CardRecord {
    fn from(r: CardRow) -> Self {
        CardRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            customer_id: r.customer_id,
            pan_ciphertext: r.pan_ciphertext,
            dek_id: r.dek_id,
            fingerprint: r.fingerprint,
            bin: r.bin,
            last4: r.last4,
            pan_length: r.pan_length,
            brand: r.brand,
            funding: r.funding,
            exp_month: r.exp_month,
            exp_year: r.exp_year,
            holder_name: r.holder_name,
            alias: r.alias,
            status: r.status,
            created_at: r.created_at,
        }
    }
}

/// Applies the field changes of `update` to `c` (`make_default` is the
/// caller's business: it changes the customer, not the card).
pub(super) fn apply_card_update(c: &mut CardRecord, update: &CardUpdate) {
    if let Some(v) = &update.alias {
        c.alias.clone_from(v);
    }
    if let Some(v) = &update.holder_name {
        c.holder_name.clone_from(v);
    }
    if let Some(v) = update.exp_month {
        c.exp_month = v;
    }
    if let Some(v) = update.exp_year {
        c.exp_year = v;
    }
}

/// Column list matching [`DataKeyRow`]'s fields (a macro so that `concat!` can
/// build `&'static str` queries).
macro_rules! data_key_columns {
    () => {
        "id, merchant_id, purpose, version, mode, wrapped, \
     wrapping_label, seals_reserved, created_at, retired_at"
    };
}
pub(super) use data_key_columns;

#[derive(sqlx::FromRow)]
pub(super) struct DataKeyRow {
    id: String,
    merchant_id: Option<String>,
    purpose: String,
    version: i64,
    mode: String,
    wrapped: Option<Vec<u8>>,
    wrapping_label: String,
    seals_reserved: i64,
    created_at: i64,
    retired_at: Option<i64>,
}

impl From<DataKeyRow> for DataKeyRecord {
    fn from(r: DataKeyRow) -> Self {
        DataKeyRecord {
            id: r.id,
            merchant_id: r.merchant_id,
            purpose: r.purpose,
            version: r.version,
            mode: r.mode,
            wrapped: r.wrapped,
            wrapping_label: r.wrapping_label,
            seals_reserved: r.seals_reserved,
            created_at: r.created_at,
            retired_at: r.retired_at,
        }
    }
}

/// Column list matching [`AuditDbRow`]'s fields (a macro so that `concat!` can
/// build `&'static str` queries).
macro_rules! audit_columns {
    () => {
        "seq, at, actor, merchant_id, event, resource, outcome, origin, request_id, detail"
    };
}
pub(super) use audit_columns;

#[derive(sqlx::FromRow)]
pub(super) struct AuditDbRow {
    seq: i64,
    at: i64,
    actor: String,
    merchant_id: Option<String>,
    event: String,
    resource: Option<String>,
    outcome: String,
    origin: Option<String>,
    request_id: Option<String>,
    detail: Option<String>,
}

impl From<AuditDbRow> for AuditRow {
    fn from(r: AuditDbRow) -> Self {
        AuditRow {
            seq: r.seq,
            entry: AuditEntry {
                at: r.at,
                actor: r.actor,
                merchant_id: r.merchant_id,
                event: r.event,
                resource: r.resource,
                outcome: r.outcome,
                origin: r.origin,
                request_id: r.request_id,
                detail: r.detail,
            },
        }
    }
}

pub(super) const IDEMPOTENCY_PENDING: &str = "pending";
pub(super) const IDEMPOTENCY_COMPLETED: &str = "completed";

#[derive(sqlx::FromRow)]
pub(super) struct IdempotencyRow {
    request_hash: Vec<u8>,
    state: String,
    status: Option<i64>,
    body: Option<Vec<u8>>,
    created_at: i64,
}

impl TryFrom<IdempotencyRow> for IdempotencyClaim {
    type Error = StorageError;
    fn try_from(r: IdempotencyRow) -> StorageResult<Self> {
        let request_hash = hash32("idempotency_keys", &r.request_hash)?;
        match (r.state.as_str(), r.status, r.body) {
            (IDEMPOTENCY_PENDING, _, _) => Ok(IdempotencyClaim::InFlight {
                request_hash,
                created_at: r.created_at,
            }),
            (IDEMPOTENCY_COMPLETED, Some(status), Some(body)) => Ok(IdempotencyClaim::Completed {
                request_hash,
                status: u16::try_from(status)
                    .map_err(|_| corrupt("idempotency_keys", format!("status {status}")))?,
                body,
            }),
            (state, _, _) => Err(corrupt("idempotency_keys", format!("state {state:?}"))),
        }
    }
}

/// Rejects a negative seal reservation: the counter guards the GCM nonce
/// budget and must never go down.
pub(super) fn check_seal_block(block: i64) -> StorageResult<()> {
    if block < 0 {
        return Err(StorageError::Other(format!(
            "negative seal reservation {block}"
        )));
    }
    Ok(())
}

/// Rows to fetch for a page of `limit`: one more, to learn `has_more`.
pub(super) fn page_fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// Splits the `limit + 1` rows fetched into a page.
pub(super) fn into_page<T>(mut rows: Vec<T>, limit: u32) -> super::Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    super::Page {
        data: rows,
        has_more,
    }
}

/// A row of `audit_log` with its chain columns.
#[derive(sqlx::FromRow)]
pub(super) struct ChainDbRow {
    #[sqlx(flatten)]
    base: AuditDbRow,
    prev_hash: Option<Vec<u8>>,
    hash: Option<Vec<u8>>,
    mac: Option<Vec<u8>>,
    mac_key_id: Option<String>,
}

impl From<ChainDbRow> for super::chain::ChainRow {
    fn from(r: ChainDbRow) -> Self {
        let AuditRow { seq, entry } = r.base.into();
        super::chain::ChainRow {
            seq,
            entry,
            prev_hash: r.prev_hash,
            hash: r.hash,
            mac: r.mac,
            mac_key_id: r.mac_key_id,
        }
    }
}

/// Whether a connection going back to the pool may be handed out again. A
/// request cancelled while its transaction was starting (a client hanging
/// up during `BEGIN IMMEDIATE`'s wait for the write lock) can leave the
/// connection inside a transaction; it is closed instead (the database
/// rolls back), or the next transaction on it would fail.
pub(super) fn reusable(conn: &impl sqlx::Connection) -> bool {
    !conn.is_in_transaction()
}

/// Offers each non-NULL value a one-column query streams to `matches`;
/// returns `(values, matching values)`. The column is never held whole.
pub(super) async fn count_matching<T: AsRef<[u8]>>(
    mut cells: impl futures_util::Stream<Item = Result<Option<T>, sqlx::Error>> + Unpin,
    matches: for<'b> fn(&'b [u8]) -> bool,
    err: fn(sqlx::Error) -> StorageError,
) -> StorageResult<(i64, i64)> {
    use futures_util::TryStreamExt;
    let (mut values, mut hits) = (0i64, 0i64);
    while let Some(cell) = cells.try_next().await.map_err(err)? {
        if let Some(cell) = cell {
            values += 1;
            hits += i64::from(matches(cell.as_ref()));
        }
    }
    Ok((values, hits))
}
