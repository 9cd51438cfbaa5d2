//! Group commit: write units that arrive while the database is busy share
//! one transaction and therefore one durable commit (one fsync), instead of
//! paying for a commit each.
//!
//! One writer per storage (a thread with its own runtime and connection)
//! owns the write path. It takes the first unit from its queue, begins a
//! transaction, and runs units one after another, each inside its own
//! savepoint: a unit that fails is rolled back to its savepoint and leaves
//! no trace, the others are kept. Units that arrive while the batch runs
//! join it (up to [`MAX_BATCH`]). Some units only record rows on the batch
//! (audit entries, events, card inserts); just before the commit the writer
//! writes those with multi-row statements (`flush`). Then it commits once,
//! and only after the commit has returned does it answer each unit's
//! caller. Nobody is ever told "done" before their write is durable, so a
//! crash loses only unacknowledged work. If the flush or the commit fails,
//! every unit of the batch gets the error and none of their writes exist.
//!
//! On SQLite, a batch that starts with a unit running no statements of its
//! own (a deferred write or an audit append: the hot paths) is written by
//! a [`DirectWriter`] on the writer thread itself, with no hand-off per
//! statement; it ends where a unit with statements arrives, which starts
//! the next batch. Same transaction, same commit-then-answer order.
//!
//! A caller that goes away (a dropped request future) does not cancel its
//! unit: the unit is owned by the writer and either commits or not, like a
//! transaction whose client disconnected.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use sqlx::{Database, Pool, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::chain::SealerCell;
use super::{
    AuditEntry, CardInsert, CardRecord, ChargeRecord, EventRecord, StorageError, StorageResult,
};

/// Most units one transaction takes. Bounds how long the write lock is held
/// and how much work one failed commit throws away.
const MAX_BATCH: usize = 512;
/// Units waiting for the writer; callers beyond it wait for room.
const QUEUE: usize = 8192;
/// How long the writer waits for its connection before failing a batch.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Prepared statements the writer's connection keeps. A multi-row
/// statement has one text per row count, so the flush alone has a few
/// hundred (cards, events, webhook fan-out, audit entries, charges, up to
/// the largest batch each). Kept prepared, each costs one round trip on
/// PostgreSQL instead of two (parse, then execute) and no re-parse on
/// SQLite.
pub(super) const WRITER_STATEMENT_CACHE: usize = 1024;
/// A batch that has not committed by then is abandoned (its connection is
/// dropped, so the transaction rolls back) and its callers get a 503.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The transaction a unit runs in.
pub(super) type Tx<DB> = Transaction<'static, DB>;

/// A batch in progress: its transaction, plus the audit entries and events
/// its units recorded and the writes they deferred. Those are written
/// together just before the commit (one multi-row statement per kind, and
/// one read of the audit chain head), so a unit pays for its own statements
/// only.
pub(super) struct Batch<DB: Database> {
    pub(super) tx: Tx<DB>,
    records: Records,
}

/// What a batch's units left for its flush: audit entries, events and
/// deferred writes.
#[derive(Default)]
pub(super) struct Records {
    pub(super) audit: Vec<AuditEntry>,
    pub(super) events: Vec<EventRecord>,
    pub(super) deferred: DeferredWrites,
}

impl Records {
    fn len(&self) -> (usize, usize) {
        (self.audit.len(), self.events.len())
    }

    /// Drops what was recorded after `mark` (see [`Records::len`]).
    fn truncate(&mut self, (audit, events): (usize, usize)) {
        self.audit.truncate(audit);
        self.events.truncate(events);
    }
}

/// The writes of a batch that wait for its flush, by kind.
#[derive(Default)]
pub(super) struct DeferredWrites {
    pub(super) cards: Vec<PendingCard>,
    pub(super) new_charges: Vec<PendingNewCharge>,
    pub(super) charge_changes: Vec<PendingChargeChange>,
}

type Slot<R> = Arc<std::sync::Mutex<Option<StorageResult<R>>>>;

/// A write waiting for its batch's flush, where all writes of its kind go
/// into one multi-row statement and each one's outcome is filled in.
pub(super) struct Pending<W, R> {
    pub(super) write: W,
    slot: Slot<R>,
}

impl<W, R> Pending<W, R> {
    /// Records the outcome of this write.
    pub(super) fn resolve(&self, outcome: StorageResult<R>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

/// A card to insert, with its audit entry and its `card.created` event
/// (written only if the card is).
pub(super) struct NewCard {
    pub(super) card: CardRecord,
    pub(super) audit: AuditEntry,
    pub(super) event: EventRecord,
}

impl NewCard {
    /// The write of `card`. Its event is made here, on the caller's
    /// thread: the writer, which every write waits for, only copies it.
    pub(super) fn new(card: &CardRecord, audit: &AuditEntry) -> Self {
        NewCard {
            card: card.clone(),
            audit: audit.clone(),
            event: super::payments_sql::lifecycle::card_created(card, audit.at),
        }
    }
}

/// A charge to insert (its metadata and line items already encoded), with
/// its events and audit entry.
pub(super) struct NewCharge {
    pub(super) charge: ChargeRecord,
    pub(super) metadata: String,
    pub(super) line_items: String,
    pub(super) events: Vec<EventRecord>,
    pub(super) audit: AuditEntry,
}

/// A charge update that applies only if the stored charge still has
/// `expected_version`; otherwise it fails with `Conflict`.
pub(super) struct ChargeChange {
    pub(super) charge: ChargeRecord,
    pub(super) expected_version: i64,
    pub(super) events: Vec<EventRecord>,
    pub(super) audit: AuditEntry,
}

pub(super) type PendingCard = Pending<NewCard, CardInsert>;
pub(super) type PendingNewCharge = Pending<NewCharge, ()>;
pub(super) type PendingChargeChange = Pending<ChargeChange, ()>;

/// A kind of write that waits for the flush: where a batch keeps it.
pub(super) trait DeferredWrite: Sized + Send + 'static {
    type Reply: Send + 'static;
    fn queue(deferred: &mut DeferredWrites) -> &mut Vec<Pending<Self, Self::Reply>>;
}

impl DeferredWrite for NewCard {
    type Reply = CardInsert;
    fn queue(deferred: &mut DeferredWrites) -> &mut Vec<PendingCard> {
        &mut deferred.cards
    }
}

impl DeferredWrite for NewCharge {
    type Reply = ();
    fn queue(deferred: &mut DeferredWrites) -> &mut Vec<PendingNewCharge> {
        &mut deferred.new_charges
    }
}

impl DeferredWrite for ChargeChange {
    type Reply = ();
    fn queue(deferred: &mut DeferredWrites) -> &mut Vec<PendingChargeChange> {
        &mut deferred.charge_changes
    }
}

impl<DB: Database> Batch<DB> {
    /// Records `entry` in the audit chain with this unit's writes.
    pub(super) fn audit(&mut self, entry: AuditEntry) {
        self.records.audit.push(entry);
    }

    /// Records `event` (and its webhook deliveries) with this unit's writes.
    pub(super) fn event(&mut self, event: EventRecord) {
        self.records.events.push(event);
    }
}

/// What the writer needs to know about a backend.
pub(super) trait GroupBackend: Database {
    /// Begins a write transaction (SQLite takes the write lock up front).
    fn begin_group(pool: &Pool<Self>) -> BoxFuture<'_, StorageResult<Tx<Self>>>;
    fn storage_err(e: sqlx::Error) -> StorageError;
    /// Runs `sql` (savepoint statements) inside the transaction.
    fn exec<'a>(tx: &'a mut Tx<Self>, sql: &'static str) -> BoxFuture<'a, StorageResult<()>>;
    /// Writes the batch's deferred writes (resolving each), then its events
    /// and chained audit entries (the stored writes' included), inside its
    /// transaction.
    fn flush<'a>(
        tx: &'a mut Tx<Self>,
        sealer: &'a SealerCell,
        deferred: &'a DeferredWrites,
        events: Vec<EventRecord>,
        audit: Vec<AuditEntry>,
    ) -> BoxFuture<'a, StorageResult<()>>;
}

/// Writes batches whose units run no statements of their own (deferred
/// writes and audit appends, the hot write paths) on a connection the
/// writer thread owns and drives itself, with no hand-off to another thread
/// per statement (SQLite: see `sqlite_direct`). Every call blocks the
/// writer thread, which has nothing else to do meanwhile.
pub(super) trait DirectWriter: Send + 'static {
    /// Begins a write transaction.
    fn begin(&mut self) -> StorageResult<()>;
    /// Writes `records` inside it: the deferred writes (resolving each),
    /// then the events and the chained audit entries.
    fn flush(&mut self, sealer: &SealerCell, records: Records) -> StorageResult<()>;
    /// Commits it (durably), or rolls it back and fails.
    fn commit(&mut self) -> StorageResult<()>;
    /// Rolls back whatever transaction is open.
    fn rollback(&mut self);
}

/// A queued unit of work, type-erased.
trait Unit<DB: Database>: Send {
    /// Whether the unit runs statements (and so needs a savepoint) or only
    /// records audit entries, events or deferred writes.
    fn touches_db(&self) -> bool;
    fn run<'a>(self: Box<Self>, batch: &'a mut Batch<DB>) -> BoxFuture<'a, Box<dyn Outcome>>;
    /// Records a unit that does not touch the database (see
    /// [`Unit::touches_db`]) on a batch that has no transaction of its own.
    fn record(self: Box<Self>, records: &mut Records) -> Box<dyn Outcome>;
    /// The unit cannot run (no transaction could be started).
    fn fail(self: Box<Self>, e: &StorageError);
}

/// A unit that has run, waiting for its batch's commit.
trait Outcome: Send {
    fn succeeded(&self) -> bool;
    fn settle(self: Box<Self>, commit: &StorageResult<()>);
}

struct Job<F, T> {
    work: F,
    reply: oneshot::Sender<StorageResult<T>>,
}

struct Done<T> {
    result: StorageResult<T>,
    reply: oneshot::Sender<StorageResult<T>>,
}

impl<DB, F, T> Unit<DB> for Job<F, T>
where
    DB: Database,
    T: Send + 'static,
    F: for<'a> FnOnce(&'a mut Batch<DB>) -> BoxFuture<'a, StorageResult<T>> + Send + 'static,
{
    fn touches_db(&self) -> bool {
        true
    }

    fn run<'a>(self: Box<Self>, batch: &'a mut Batch<DB>) -> BoxFuture<'a, Box<dyn Outcome>> {
        let Job { work, reply } = *self;
        Box::pin(async move {
            let result = work(batch).await;
            Box::new(Done { result, reply }) as Box<dyn Outcome>
        })
    }

    fn record(self: Box<Self>, _records: &mut Records) -> Box<dyn Outcome> {
        // The writer never does this (it checks `touches_db`); should it,
        // the unit fails rather than runs outside a transaction.
        Box::new(Done {
            result: Err(StorageError::Other(
                "a write with statements reached a batch without a transaction".into(),
            )),
            reply: self.reply,
        })
    }

    fn fail(self: Box<Self>, e: &StorageError) {
        let _ = self.reply.send(Err(e.duplicate()));
    }
}

/// A deferred write: joins its kind's multi-row statement at the flush.
struct Deferred<W: DeferredWrite> {
    write: W,
    reply: oneshot::Sender<StorageResult<W::Reply>>,
}

struct DeferredDone<R> {
    slot: Slot<R>,
    reply: oneshot::Sender<StorageResult<R>>,
}

impl<DB: Database, W: DeferredWrite> Unit<DB> for Deferred<W> {
    fn touches_db(&self) -> bool {
        false
    }

    fn run<'a>(self: Box<Self>, batch: &'a mut Batch<DB>) -> BoxFuture<'a, Box<dyn Outcome>> {
        Box::pin(std::future::ready(Unit::<DB>::record(
            self,
            &mut batch.records,
        )))
    }

    fn record(self: Box<Self>, records: &mut Records) -> Box<dyn Outcome> {
        let Deferred { write, reply } = *self;
        let slot = Arc::new(std::sync::Mutex::new(None));
        W::queue(&mut records.deferred).push(Pending {
            write,
            slot: Arc::clone(&slot),
        });
        Box::new(DeferredDone { slot, reply })
    }

    fn fail(self: Box<Self>, e: &StorageError) {
        let _ = self.reply.send(Err(e.duplicate()));
    }
}

impl<R: Send + 'static> Outcome for DeferredDone<R> {
    fn succeeded(&self) -> bool {
        true
    }

    fn settle(self: Box<Self>, commit: &StorageResult<()>) {
        let result = match commit {
            Ok(()) => self
                .slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| {
                    Err(StorageError::Other(
                        "the write was left out of its batch".into(),
                    ))
                }),
            Err(e) => Err(e.duplicate()),
        };
        let _ = self.reply.send(result);
    }
}

/// A standalone audit append: no statement of its own.
struct Append {
    entry: AuditEntry,
    reply: oneshot::Sender<StorageResult<()>>,
}

impl<DB: Database> Unit<DB> for Append {
    fn touches_db(&self) -> bool {
        false
    }

    fn run<'a>(self: Box<Self>, batch: &'a mut Batch<DB>) -> BoxFuture<'a, Box<dyn Outcome>> {
        Box::pin(std::future::ready(Unit::<DB>::record(
            self,
            &mut batch.records,
        )))
    }

    fn record(self: Box<Self>, records: &mut Records) -> Box<dyn Outcome> {
        let Append { entry, reply } = *self;
        records.audit.push(entry);
        Box::new(Done {
            result: Ok(()),
            reply,
        })
    }

    fn fail(self: Box<Self>, e: &StorageError) {
        let _ = self.reply.send(Err(e.duplicate()));
    }
}

impl<T: Send + 'static> Outcome for Done<T> {
    fn succeeded(&self) -> bool {
        self.result.is_ok()
    }

    fn settle(self: Box<Self>, commit: &StorageResult<()>) {
        let result = match commit {
            Ok(()) => self.result,
            Err(e) => Err(e.duplicate()),
        };
        // The caller may have gone away; its write stands (or not) anyway.
        let _ = self.reply.send(result);
    }
}

/// Counters of the writer, for `/metrics` and the load tool.
#[derive(Debug, Default)]
pub struct GroupStats {
    batches: AtomicU64,
    units: AtomicU64,
    collect_us: AtomicU64,
    flush_us: AtomicU64,
    commit_us: AtomicU64,
}

/// What the writer has done since start. The three durations add up to the
/// time the writer spent on committed batches: running the units' own
/// statements (`collect`), the multi-row inserts at the end of a batch
/// (`flush`), and `COMMIT` with its fsync (`commit`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub batches: u64,
    pub units: u64,
    pub collect_us: u64,
    pub flush_us: u64,
    pub commit_us: u64,
}

impl GroupStats {
    pub fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            units: self.units.load(Ordering::Relaxed),
            collect_us: self.collect_us.load(Ordering::Relaxed),
            flush_us: self.flush_us.load(Ordering::Relaxed),
            commit_us: self.commit_us.load(Ordering::Relaxed),
        }
    }

    fn record(&self, units: usize, began: Instant, flushing: Instant, committing: Instant) {
        let now = Instant::now();
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.units.fetch_add(units as u64, Ordering::Relaxed);
        self.collect_us
            .fetch_add(us(flushing - began), Ordering::Relaxed);
        self.flush_us
            .fetch_add(us(committing - flushing), Ordering::Relaxed);
        self.commit_us
            .fetch_add(us(now - committing), Ordering::Relaxed);
    }
}

/// The handle callers submit units through. Cloning shares the writer.
pub(super) struct GroupCommit<DB: Database> {
    queue: mpsc::Sender<Box<dyn Unit<DB>>>,
    stats: Arc<GroupStats>,
}

/// What every batch of one storage shares.
struct Shared<DB: Database> {
    pool: Pool<DB>,
    sealer: Arc<SealerCell>,
    stats: Arc<GroupStats>,
    gate: Option<WriteGate>,
}

/// Turns at the database's write lock (see [`GroupCommit::start`]). Tokio's
/// mutex is fair: waiters get it in the order they asked.
pub(super) type WriteGate = Arc<tokio::sync::Mutex<()>>;

impl<DB: Database> Clone for GroupCommit<DB> {
    fn clone(&self) -> Self {
        GroupCommit {
            queue: self.queue.clone(),
            stats: Arc::clone(&self.stats),
        }
    }
}

impl<DB: Database> std::fmt::Debug for GroupCommit<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("queued", &(QUEUE - self.queue.capacity()))
            .finish()
    }
}

impl<DB> GroupCommit<DB>
where
    DB: GroupBackend,
{
    /// Starts the writer on a thread of its own, with its own runtime and
    /// its own connection (opened from `options` on first use). Its many
    /// short waits on the database then never queue behind the request
    /// tasks of the server's runtime, which under load would stretch every
    /// statement of a batch. It stops when the last handle is dropped.
    ///
    /// With a `gate`, the writer holds it for
    /// each batch, from `BEGIN` to `COMMIT`: on SQLite, writers outside the
    /// group commit take the same gate before their `BEGIN IMMEDIATE`, so
    /// they queue for their turn (first come, first served) instead of
    /// polling for a write lock that the writer frees only for microseconds.
    ///
    /// With a `direct` writer, batches that start with a unit running no
    /// statements of its own go through it instead (see [`DirectWriter`]).
    pub(super) fn start(
        options: <DB::Connection as sqlx::Connection>::Options,
        sealer: Arc<SealerCell>,
        gate: Option<WriteGate>,
        direct: Option<Box<dyn DirectWriter>>,
    ) -> StorageResult<Self> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(GroupStats::default());
        let shared_stats = Arc::clone(&stats);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::Other(format!("database writer runtime: {e}")))?;
        std::thread::Builder::new()
            .name("cardvault-db-writer".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let pool = sqlx::pool::PoolOptions::<DB>::new()
                        .max_connections(1)
                        .acquire_timeout(ACQUIRE_TIMEOUT)
                        // sqlx pings every connection it takes back (and drops
                        // one that fails), so a ping before each batch too
                        // would only add a round trip to every commit cycle.
                        .test_before_acquire(false)
                        .after_release(|conn, _| {
                            Box::pin(async move { Ok(super::common::reusable(conn)) })
                        })
                        .connect_lazy_with(options);
                    let shared = Shared {
                        pool,
                        sealer,
                        stats: shared_stats,
                        gate,
                    };
                    writer(shared, direct, rx).await;
                })
            })
            .map_err(|e| StorageError::Other(format!("database writer thread: {e}")))?;
        Ok(GroupCommit { queue, stats })
    }

    pub(super) fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Runs `work` in the next batch and returns its result once the batch
    /// has committed. `work` must own what it uses (it may outlive the
    /// caller); an `Err` from it rolls back its own writes only.
    pub(super) async fn run<T, F>(&self, work: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Batch<DB>) -> BoxFuture<'a, StorageResult<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.submit(Box::new(Job { work, reply }), answer).await
    }

    /// Runs a deferred write in the next batch, together with the batch's
    /// other writes of its kind (cards, new charges, charge updates), and
    /// returns its outcome once the batch has committed.
    pub(super) async fn defer<W: DeferredWrite>(&self, write: W) -> StorageResult<W::Reply> {
        let (reply, answer) = oneshot::channel();
        self.submit(Box::new(Deferred { write, reply }), answer)
            .await
    }

    /// Appends `entry` to the audit chain in the next batch and returns
    /// once that batch has committed.
    pub(super) async fn append(&self, entry: AuditEntry) -> StorageResult<()> {
        let (reply, answer) = oneshot::channel();
        self.submit(Box::new(Append { entry, reply }), answer).await
    }

    async fn submit<T>(
        &self,
        unit: Box<dyn Unit<DB>>,
        answer: oneshot::Receiver<StorageResult<T>>,
    ) -> StorageResult<T> {
        self.queue
            .send(unit)
            .await
            .map_err(|_| StorageError::Unavailable("the database writer has stopped".into()))?;
        answer.await.map_err(|_| {
            StorageError::Unavailable("the write was abandoned before it committed".into())
        })?
    }
}

async fn writer<DB: GroupBackend>(
    shared: Shared<DB>,
    mut direct: Option<Box<dyn DirectWriter>>,
    mut rx: mpsc::Receiver<Box<dyn Unit<DB>>>,
) {
    // A unit with statements that arrived during a direct batch: it starts
    // the next batch.
    let mut carried: Option<Box<dyn Unit<DB>>> = None;
    loop {
        let first = match carried.take() {
            Some(unit) => unit,
            None => match rx.recv().await {
                Some(unit) => unit,
                None => break,
            },
        };
        let _turn = match &shared.gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        if let Some(direct) = direct.as_deref_mut().filter(|_| !first.touches_db()) {
            let batch = || run_direct_batch(&shared, direct, first, &mut rx);
            match std::panic::catch_unwind(AssertUnwindSafe(batch)) {
                Ok(next) => carried = next,
                Err(_panic) => {
                    // Its callers' answer channels are closed (a 503); the
                    // transaction it may have left open is rolled back.
                    tracing::error!("write batch panicked; its units were abandoned");
                    direct.rollback();
                }
            }
            continue;
        }
        let batch = tokio::time::timeout(BATCH_TIMEOUT, run_batch(&shared, first, &mut rx));
        // A panic or a timeout drops the batch: its transaction rolls back
        // and its callers' answer channels close (they see a 503). The
        // writer itself carries on with the next batch.
        match AssertUnwindSafe(batch).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(_elapsed)) => {
                tracing::error!(timeout_s = BATCH_TIMEOUT.as_secs(), "write batch timed out");
            }
            Err(_panic) => tracing::error!("write batch panicked; its units were abandoned"),
        }
    }
}

/// Answers `first` and everything already queued with `e` (the database
/// is unreachable: they would all fail the same way, one by one).
fn fail_queued<DB: Database>(
    first: Box<dyn Unit<DB>>,
    rx: &mut mpsc::Receiver<Box<dyn Unit<DB>>>,
    e: &StorageError,
) {
    first.fail(e);
    while let Ok(unit) = rx.try_recv() {
        unit.fail(e);
    }
}

/// A batch of units without statements of their own, on the direct
/// writer: it takes queued units until one has statements (returned, to
/// start the next batch) or the batch is full, then flushes and commits
/// them on the writer's own thread. No statement, and no wait, leaves it.
fn run_direct_batch<DB: Database>(
    shared: &Shared<DB>,
    direct: &mut dyn DirectWriter,
    first: Box<dyn Unit<DB>>,
    rx: &mut mpsc::Receiver<Box<dyn Unit<DB>>>,
) -> Option<Box<dyn Unit<DB>>> {
    let started = Instant::now();
    if let Err(e) = direct.begin() {
        fail_queued(first, rx, &e);
        return None;
    }
    let mut records = Records::default();
    let mut done: Vec<Box<dyn Outcome>> = Vec::new();
    let mut carried = None;
    let mut next = Some(first);
    while let Some(unit) = next.take() {
        done.push(unit.record(&mut records));
        if done.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(unit) if unit.touches_db() => carried = Some(unit),
                Ok(unit) => next = Some(unit),
                Err(_) => {}
            }
        }
    }
    let flushing = Instant::now();
    let flushed = direct.flush(&shared.sealer, records);
    let committing = Instant::now();
    let commit = match flushed {
        Ok(()) => direct.commit(),
        Err(e) => {
            direct.rollback();
            Err(e)
        }
    };
    conclude(shared, done, &commit, [started, flushing, committing]);
    carried
}

async fn run_batch<DB: GroupBackend>(
    shared: &Shared<DB>,
    first: Box<dyn Unit<DB>>,
    rx: &mut mpsc::Receiver<Box<dyn Unit<DB>>>,
) {
    let started = Instant::now();
    let tx = match DB::begin_group(&shared.pool).await {
        Ok(tx) => tx,
        Err(e) => {
            fail_queued(first, rx, &e);
            return;
        }
    };
    let mut batch = Batch {
        tx,
        records: Records::default(),
    };
    let mut done: Vec<Box<dyn Outcome>> = Vec::new();
    // Opened before the first unit that runs statements of its own (a
    // batch of deferred writes only needs none), kept open from there on.
    let mut in_savepoint = false;
    let mut next = Some(first);
    while let Some(unit) = next.take() {
        let touches_db = unit.touches_db();
        if touches_db && !in_savepoint {
            if let Err(e) = DB::exec(&mut batch.tx, "SAVEPOINT unit").await {
                // The transaction is no longer trustworthy: drop it (rolled
                // back) and fail the whole batch.
                unit.fail(&e);
                settle_all(done, &Err(e));
                return;
            }
            in_savepoint = true;
        }
        let mark = batch.records.len();
        let outcome = unit.run(&mut batch).await;
        let succeeded = outcome.succeeded();
        done.push(outcome);
        if !succeeded {
            // What the unit recorded goes with its rolled-back writes.
            batch.records.truncate(mark);
        }
        if touches_db {
            // RELEASE then a fresh SAVEPOINT in one round trip; ROLLBACK TO
            // keeps the savepoint for the next unit.
            let step = if succeeded {
                "RELEASE SAVEPOINT unit; SAVEPOINT unit"
            } else {
                "ROLLBACK TO SAVEPOINT unit"
            };
            if let Err(e) = DB::exec(&mut batch.tx, step).await {
                // The transaction is no longer trustworthy: drop it (rolled
                // back) and fail the whole batch.
                settle_all(done, &Err(e));
                return;
            }
        }
        if done.len() < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    let Batch {
        mut tx,
        records: Records {
            audit,
            events,
            deferred,
        },
    } = batch;
    let flushing = Instant::now();
    // The units are settled: the flush needs no savepoint of theirs around
    // its own writes (each journaled page costs a copy).
    let flushed = match in_savepoint {
        true => DB::exec(&mut tx, "RELEASE SAVEPOINT unit").await,
        false => Ok(()),
    };
    let flushed = match flushed {
        Ok(()) => DB::flush(&mut tx, &shared.sealer, &deferred, events, audit).await,
        Err(e) => Err(e),
    };
    let committing = Instant::now();
    let commit = match flushed {
        Ok(()) => tx.commit().await.map_err(DB::storage_err),
        Err(e) => Err(e),
    };
    conclude(shared, done, &commit, [started, flushing, committing]);
}

/// Counts a committed batch (its phases began at `started`, `flushing`
/// and `committing`) or logs a failed one, then answers its units.
fn conclude<DB: Database>(
    shared: &Shared<DB>,
    done: Vec<Box<dyn Outcome>>,
    commit: &StorageResult<()>,
    [started, flushing, committing]: [Instant; 3],
) {
    match commit {
        Ok(()) => shared
            .stats
            .record(done.len(), started, flushing, committing),
        Err(e) => tracing::warn!(error = %e, units = done.len(), "group commit failed"),
    }
    settle_all(done, commit);
}

fn settle_all(done: Vec<Box<dyn Outcome>>, commit: &StorageResult<()>) {
    for d in done {
        d.settle(commit);
    }
}

impl StorageError {
    /// The same error again (errors are not `Clone` to keep them cheap to
    /// move; a failed batch reports one to many callers).
    pub(super) fn duplicate(&self) -> StorageError {
        match self {
            StorageError::Unavailable(m) => StorageError::Unavailable(m.clone()),
            StorageError::Conflict(m) => StorageError::Conflict(m.clone()),
            StorageError::NotFound => StorageError::NotFound,
            StorageError::Other(m) => StorageError::Other(m.clone()),
        }
    }
}
