//! WAL checkpoints off the write path, and a WAL that starts over before
//! the writer has to do it.
//!
//! A thread of its own, with a connection of its own, runs
//! `PRAGMA wal_checkpoint(PASSIVE)` every [`CheckpointPolicy::every`]: it
//! copies committed frames into the database file without ever blocking
//! the writer or readers.
//!
//! Under steady writes that alone is not enough. A passive pass syncs the
//! database file only when no frame was committed while it copied, which
//! under load is almost never: the pages it copies pile up in the OS cache,
//! unsynced, and the WAL never starts over (SQLite restarts it only when a
//! write begins with every frame copied). It grows to the writers'
//! `wal_autocheckpoint` (see [`super::sqlite::CONNECTION_PRAGMAS`]), and
//! from then on the group-commit writer checkpoints itself after its
//! commit: it copies what is left and syncs every page piled up since. In
//! an `add_card` load that was an `fsync` of the database file of about
//! 42 ms, twice a second, with every write waiting behind it (see
//! BENCHMARKS.md).
//!
//! So once the WAL holds [`CheckpointPolicy::rewind_at`] frames, a round
//! makes it start over:
//! 1. after each pass that copied frames, it syncs the database file
//!    itself, off every lock (the `fsync` SQLite would have made in the
//!    writer's checkpoint, made earlier and on this thread, through a
//!    descriptor that is never closed: see [`sync_handle`]);
//! 2. it repeats the pass and the sync until a pass copies few frames
//!    ([`CheckpointPolicy::gated_at_most`]), then runs one last pass
//!    holding the write gate. The writer is between two batches then, so
//!    that pass copies the few frames left, SQLite syncs the few pages they
//!    touched, and the writer's next batch starts the WAL over.
//!
//! Below `rewind_at` a round only copies, as before: a page rewritten by
//! many batches is then written back once per rewind rather than once per
//! round (syncing after every round cost `add_card` about 5% more CPU per
//! request in an A/B of the two).
//!
//! None of this decides what is durable: every commit is synced by the
//! committing connection (`synchronous=FULL`), and SQLite itself still
//! syncs the database file before the WAL may start over.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::SqliteConnection;

use super::group::WriteGate;
use super::{StorageError, StorageResult};

/// When and how hard the checkpointer works.
#[derive(Clone, Copy, Debug)]
pub(super) struct CheckpointPolicy {
    /// Time between two rounds.
    pub every: Duration,
    /// WAL frames from which a round makes the WAL start over.
    pub rewind_at: i64,
    /// The pass under the write gate runs once a pass copies at most this
    /// many frames (or after [`Self::passes`] passes).
    pub gated_at_most: i64,
    /// Passes (with their syncs) before the gated one, at most.
    pub passes: usize,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every: Duration::from_millis(200),
            // 32 MiB of WAL at 4 KiB pages: half the writers'
            // `wal_autocheckpoint`, which the writer then never reaches.
            rewind_at: 8192,
            // About a batch or two of cards: a copy and a sync of well
            // under a millisecond's worth each.
            gated_at_most: 256,
            passes: 4,
        }
    }
}

/// What a passive pass left: frames in the WAL, and frames copied into the
/// database file since the WAL last started over.
#[derive(Clone, Copy, Debug)]
struct Progress {
    log: i64,
    copied: i64,
}

/// Starts the checkpointer on a thread of its own; it stops once `alive`
/// can no longer be upgraded. `options` must not create a database.
pub(super) fn start(
    options: SqliteConnectOptions,
    gate: WriteGate,
    alive: Weak<()>,
    policy: CheckpointPolicy,
) -> StorageResult<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StorageError::Other(format!("WAL checkpointer runtime: {e}")))?;
    let mut checkpointer = Checkpointer {
        options,
        gate,
        policy,
        conn: None,
    };
    std::thread::Builder::new()
        .name("cardvault-wal-checkpoint".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    tokio::time::sleep(policy.every).await;
                    if alive.strong_count() == 0 {
                        break;
                    }
                    if let Err(e) = checkpointer.round().await {
                        tracing::warn!(error = %e, "WAL checkpoint round failed");
                    }
                }
            })
        })
        .map_err(|e| StorageError::Other(format!("WAL checkpointer thread: {e}")))?;
    Ok(())
}

struct Checkpointer {
    options: SqliteConnectOptions,
    gate: WriteGate,
    policy: CheckpointPolicy,
    /// Kept between passes; a pass that fails drops it (the next one
    /// reconnects).
    conn: Option<SqliteConnection>,
}

impl Checkpointer {
    /// One round: see the module documentation.
    async fn round(&mut self) -> StorageResult<()> {
        let mut last = self.pass().await?;
        if last.log < self.policy.rewind_at {
            return Ok(());
        }
        self.sync_if(last.copied > 0)?;
        for _ in 0..self.policy.passes {
            let next = self.pass().await?;
            if next.log < last.log {
                // The WAL started over meanwhile (the writer's own
                // checkpoint, or an idle moment): nothing left to do.
                return Ok(());
            }
            let copied = next.copied - last.copied;
            self.sync_if(copied > 0)?;
            last = next;
            if copied <= self.policy.gated_at_most {
                break;
            }
        }
        // Between two of the writer's batches: this pass catches up, and
        // SQLite syncs the database file (only the pages copied since the
        // last sync above are still dirty).
        let gate = Arc::clone(&self.gate);
        let _turn = gate.lock().await;
        self.pass().await.map(drop)
    }

    async fn pass(&mut self) -> StorageResult<Progress> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => sqlx::Connection::connect_with(&self.options)
                .await
                .map_err(super::sqlite::db_err)?,
        };
        let (_busy, log, copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut conn)
                .await
                .map_err(super::sqlite::db_err)?;
        self.conn = Some(conn);
        Ok(Progress { log, copied })
    }

    /// Syncs the database file when a pass copied frames into it. Only
    /// what is already written is flushed: this never decides what is
    /// durable (see the module documentation).
    fn sync_if(&self, copied: bool) -> StorageResult<()> {
        if !copied {
            return Ok(());
        }
        sync_handle(self.options.get_filename())
            .and_then(|file| file.sync_data())
            .map_err(io_err)
    }
}

/// A read-only descriptor of the database file at `path`, opened once per
/// process and never closed.
///
/// Closing any descriptor of a file drops every POSIX lock the process
/// holds on that file, and SQLite's connections rely on theirs: a WAL
/// connection keeps a shared lock on the database file while it is open.
/// Without it, another process (a CLI command, say) closing its last
/// connection would take the file for unused, checkpoint it and delete the
/// WAL under this one. So the descriptor opened here to sync the file lives
/// as long as the process: one per database file, opened only once its WAL
/// first reaches [`CheckpointPolicy::rewind_at`].
fn sync_handle(path: &Path) -> std::io::Result<Arc<File>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Arc<File>>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(file) = open.get(path) {
        return Ok(Arc::clone(file));
    }
    let file = Arc::new(File::open(path)?);
    open.insert(path.to_path_buf(), Arc::clone(&file));
    Ok(file)
}

fn io_err(e: std::io::Error) -> StorageError {
    StorageError::Unavailable(format!("syncing the database file: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use rusqlite::Connection;

    use super::*;

    /// The checkpoint sequence number in the WAL header: SQLite adds one
    /// each time the WAL starts over.
    fn wal_restarts(db: &std::path::Path) -> u32 {
        use std::io::Read;
        let mut header = [0_u8; 16];
        std::fs::File::open(db.with_extension("db-wal"))
            .and_then(|mut f| f.read_exact(&mut header))
            .unwrap();
        u32::from_be_bytes([header[12], header[13], header[14], header[15]])
    }

    /// The descriptor used to sync a database file stays open after its
    /// handles are dropped: closing it would drop SQLite's POSIX locks on
    /// the file for the whole process.
    #[test]
    fn the_sync_descriptor_is_never_closed() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept.db");
        std::fs::write(&path, b"").unwrap();
        let first = sync_handle(&path).unwrap();
        let fd = first.as_raw_fd();
        assert!(Arc::ptr_eq(&first, &sync_handle(&path).unwrap()));
        drop(first);
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(target, path.canonicalize().unwrap());
    }

    /// A writer that commits back to back, taking the gate for each
    /// transaction as the group-commit writer does, and never checkpoints
    /// itself: the WAL can only start over through the checkpointer's
    /// gated pass. Without that pass, a passive pass almost never finds
    /// the writer idle, and the WAL grows for the whole run.
    #[test]
    fn the_wal_starts_over_under_back_to_back_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "synchronous", "OFF").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let gate: WriteGate = Arc::default();
        let alive = Arc::new(());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .unwrap()
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .create_if_missing(false);
            start(
                options,
                Arc::clone(&gate),
                Arc::downgrade(&alive),
                CheckpointPolicy {
                    every: Duration::from_millis(20),
                    rewind_at: 64,
                    gated_at_most: 16,
                    passes: 2,
                },
            )
            .unwrap();
        });
        let before = wal_restarts(&path);
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        let mut i = 0_i64;
        while std::time::Instant::now() < deadline {
            let _turn = gate.blocking_lock();
            writer.execute_batch("BEGIN IMMEDIATE").unwrap();
            // Random blobs over a growing key range: every commit adds
            // frames for pages all over the table.
            writer
                .execute(
                    "INSERT OR REPLACE INTO t (id, v) VALUES (?1, randomblob(600))",
                    [i * 7919 % 100_003],
                )
                .unwrap();
            writer.execute_batch("COMMIT").unwrap();
            i += 1;
        }
        drop(alive);
        let restarts = wal_restarts(&path).wrapping_sub(before);
        assert!(
            restarts >= 3,
            "the WAL started over {restarts} times in {i} back-to-back commits"
        );
    }
}
