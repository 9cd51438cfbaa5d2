//! SQLite reads on the caller's thread.
//!
//! sqlx runs every SQLite connection on a thread of its own: each statement
//! is a command sent to that thread and each row a message sent back, so a
//! point lookup costs two cross-thread wake-ups. Under load on two cores,
//! profiles of `get_card` showed the connection threads and the kernel's
//! task switching taking more CPU than the lookup and the HTTP stack
//! together. The hot single-statement reads (a card, a customer's wallet, a
//! customer) therefore run here, on the request's own thread, on plain
//! SQLite connections (`rusqlite`, the same `libsqlite3-sys` build sqlx
//! uses) kept in a small pool.
//!
//! What keeps that safe on an async runtime:
//! - The connections are `query_only` and never wait: their busy timeout is
//!   zero. A read in WAL mode takes no lock a writer holds, so it answers
//!   from the page cache in microseconds; the rare case where SQLite would
//!   make it wait (WAL recovery, an exclusive lock) comes back as
//!   [`Inline::Fallback`], and the caller runs the same statement through
//!   the regular pool, whose connections wait on their own threads.
//! - A connection that fails in any other way is dropped, not reused.
//! - Each statement is an autocommit read: it sees every transaction
//!   committed before it started, so a card acknowledged by the writer is
//!   readable by the next request.

use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::{StorageError, StorageResult};

/// Statements prepared and kept per connection.
const STATEMENT_CACHE: usize = 32;

/// Why an inline read did not answer.
#[derive(Debug)]
pub(super) enum Inline {
    /// It would have had to wait (or could not open a connection): the
    /// caller asks the regular pool instead.
    Fallback,
    /// The statement failed; the regular pool would fail the same way.
    Failed(StorageError),
}

/// A pool of read-only SQLite connections used on the caller's thread.
pub(super) struct InlineReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl std::fmt::Debug for InlineReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineReads")
            .field("path", &self.path)
            .field("max_idle", &self.max_idle)
            .finish()
    }
}

impl InlineReads {
    /// Reads of the database file at `path`, keeping at most `max_idle`
    /// connections between uses. Opens nothing yet.
    pub(super) fn new(path: PathBuf, max_idle: usize) -> Self {
        InlineReads {
            path,
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        // Read-write open of an existing file (a read-only open cannot
        // create the WAL index if it is missing); `query_only` refuses any
        // write on it.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::ZERO)?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.pragma_update(None, "cache_size", -super::sqlite::READ_CACHE_KIB)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    /// Runs `read` on an idle connection (or a new one).
    pub(super) fn run<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, Inline> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.open().map_err(|_| Inline::Fallback)?,
        };
        match read(&conn) {
            Ok(value) => {
                self.put_back(conn);
                Ok(value)
            }
            Err(e) if would_wait(&e) => {
                self.put_back(conn);
                Err(Inline::Fallback)
            }
            // Anything else: the connection is not trusted again.
            Err(e) => Err(Inline::Failed(map_err(e))),
        }
    }

    fn put_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Connections kept between uses (for tests).
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Whether SQLite refused because another connection holds a lock.
fn would_wait(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// The same classification as the sqlx path (`common::map_err`): I/O-level
/// failures are retryable (503), a unique violation is a conflict, a
/// missing parent row is not-found, the rest are errors. Messages name
/// columns and constraints, never values.
pub(super) fn map_err(e: rusqlite::Error) -> StorageError {
    use rusqlite::ffi;
    if let rusqlite::Error::SqliteFailure(failure, _) = &e {
        match failure.extended_code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                return StorageError::Conflict(e.to_string())
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => return StorageError::NotFound,
            _ => {}
        }
    }
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::FileLockingProtocolFailed,
        ) => StorageError::Unavailable(e.to_string()),
        _ => StorageError::Other(e.to_string()),
    }
}

/// The answer of an inline read, or of `pool` when it had to fall back.
pub(super) async fn or_pool<T, F>(inline: Result<T, Inline>, pool: F) -> StorageResult<T>
where
    F: std::future::Future<Output = StorageResult<T>>,
{
    match inline {
        Ok(value) => Ok(value),
        Err(Inline::Failed(e)) => Err(e),
        Err(Inline::Fallback) => pool.await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn database(dir: &tempfile::TempDir) -> (PathBuf, Connection) {
        let path = dir.path().join("inline.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
            .unwrap();
        (path, conn)
    }

    fn count(c: &Connection) -> rusqlite::Result<i64> {
        c.prepare_cached("SELECT count(*) FROM t")?
            .query_row([], |r| r.get(0))
    }

    #[test]
    fn reuses_connections_sees_commits_and_drops_failed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = database(&dir);
        let reads = InlineReads::new(path, 2);
        assert_eq!(reads.run(count).unwrap(), 2);
        assert_eq!(reads.idle_count(), 1);
        // A commit made elsewhere is seen by the next read on the same
        // (reused) connection.
        writer.execute("INSERT INTO t VALUES (3)", []).unwrap();
        assert_eq!(reads.run(count).unwrap(), 3);
        assert_eq!(reads.idle_count(), 1);
        // Writes are refused, and the connection is not kept.
        let write = reads.run(|c| c.execute("DELETE FROM t", []));
        assert!(matches!(write, Err(Inline::Failed(StorageError::Other(_)))));
        assert_eq!(reads.idle_count(), 0);
        assert_eq!(reads.run(count).unwrap(), 3);
        let bad = reads.run(|c| c.execute_batch("SELEKT 1"));
        assert!(matches!(bad, Err(Inline::Failed(_))), "{bad:?}");
        assert_eq!(reads.idle_count(), 0);
    }

    #[test]
    fn a_locked_database_is_a_fallback_not_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (path, locker) = database(&dir);
        // In rollback-journal mode an exclusive transaction shuts readers
        // out: the simplest way to make SQLite say "wait".
        locker
            .pragma_update(None, "journal_mode", "DELETE")
            .unwrap();
        let reads = InlineReads::new(path, 2);
        assert_eq!(reads.run(count).unwrap(), 2);
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locker.execute("INSERT INTO t VALUES (3)", []).unwrap();
        let started = std::time::Instant::now();
        let locked = reads.run(count);
        assert!(matches!(locked, Err(Inline::Fallback)), "{locked:?}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        // The connection is kept: it did nothing wrong.
        assert_eq!(reads.idle_count(), 1);
        locker.execute_batch("COMMIT").unwrap();
        assert_eq!(reads.run(count).unwrap(), 3);
    }

    #[test]
    fn a_missing_file_is_a_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let reads = InlineReads::new(dir.path().join("absent.db"), 2);
        assert!(matches!(reads.run(count), Err(Inline::Fallback)));
        assert!(!dir.path().join("absent.db").exists());
    }

    #[tokio::test]
    async fn only_a_fallback_asks_the_pool() {
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let pool = || async {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(7)
        };
        assert_eq!(or_pool(Ok(1), pool()).await.unwrap(), 1);
        let failed = or_pool(Err(Inline::Failed(StorageError::NotFound)), pool()).await;
        assert!(matches!(failed, Err(StorageError::NotFound)));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(or_pool(Err(Inline::Fallback), pool()).await.unwrap(), 7);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
