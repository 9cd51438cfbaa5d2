//! A lean connection pool for the hot single-statement reads.
//!
//! sqlx's `Pool` pings a connection on every release (and, by default, on
//! every acquire). On SQLite a ping is a round trip to the connection's
//! worker thread, on PostgreSQL a round trip to the server: a `get_card`
//! through `Pool` cost three round trips where one does the work. This pool
//! skips those pings and instead decides from what it sees:
//! - a connection whose statement failed with anything but a database error
//!   (I/O, protocol, a dropped future halfway through a statement) is
//!   discarded, never reused;
//! - a connection idle for longer than [`PING_AFTER_IDLE`] is pinged before
//!   use (a server restart while it sat idle is found there, not by a
//!   request);
//! - a connection older than [`MAX_LIFETIME`] is closed on release, so
//!   prepared statements (and PostgreSQL's cached plans) are renewed.
//!
//! It is used through its [`Executor`] implementation, for one statement at
//! a time outside any transaction; transactions and streams keep using the
//! sqlx pool.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::TryStreamExt;
use sqlx::{ConnectOptions, Connection, Database, Describe, Either, Error, Execute, Executor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// An idle connection older than this is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);
/// A connection older than this is closed instead of going back idle.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// See the module documentation.
pub(super) struct LeanPool<DB: Database> {
    inner: Arc<Inner<DB>>,
}

impl<DB: Database> Clone for LeanPool<DB> {
    fn clone(&self) -> Self {
        LeanPool {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<DB: Database> std::fmt::Debug for LeanPool<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanPool")
            .field("size", &self.inner.size)
            .field("idle", &self.idle_count())
            .finish()
    }
}

struct Inner<DB: Database> {
    options: <DB::Connection as Connection>::Options,
    /// Most recently used last: the warmest connection is reused first.
    idle: Mutex<Vec<Idle<DB>>>,
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
    ping_after_idle: Duration,
    size: usize,
}

struct Idle<DB: Database> {
    conn: DB::Connection,
    created: Instant,
    since: Instant,
}

/// A connection taken from the pool. It goes back when dropped, unless a
/// statement on it did not finish cleanly.
struct Lease<DB: Database> {
    conn: Option<DB::Connection>,
    created: Instant,
    /// Set while a statement runs; still set at drop means the statement was
    /// abandoned or failed outside the database, so the connection's state
    /// is unknown.
    busy: bool,
    pool: Arc<Inner<DB>>,
    _permit: OwnedSemaphorePermit,
}

impl<DB: Database> LeanPool<DB> {
    /// A pool of at most `size` connections, opened when first needed.
    pub(super) fn new(
        options: <DB::Connection as Connection>::Options,
        size: u32,
        acquire_timeout: Duration,
    ) -> Self {
        let size = size.max(1) as usize;
        LeanPool {
            inner: Arc::new(Inner {
                options,
                idle: Mutex::new(Vec::with_capacity(size)),
                permits: Arc::new(Semaphore::new(size)),
                acquire_timeout,
                ping_after_idle: PING_AFTER_IDLE,
                size,
            }),
        }
    }

    /// The same pool, pinging connections idle for `after` or longer.
    #[cfg(test)]
    pub(super) fn ping_after_idle(mut self, after: Duration) -> Self {
        // Only a pool not yet cloned (not yet used) can be configured.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ping_after_idle = after;
        }
        self
    }

    pub(super) fn idle_count(&self) -> usize {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    async fn acquire(&self) -> Result<Lease<DB>, Error> {
        let inner = &self.inner;
        let permit = tokio::time::timeout(
            inner.acquire_timeout,
            Arc::clone(&inner.permits).acquire_owned(),
        )
        .await
        .map_err(|_| Error::PoolTimedOut)?
        .map_err(|_| Error::PoolClosed)?;
        loop {
            let idle = inner.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut idle) = idle else { break };
            if idle.since.elapsed() >= inner.ping_after_idle && idle.conn.ping().await.is_err() {
                // Gone while idle (server restart, network): try the next.
                drop(idle.conn);
                continue;
            }
            return Ok(Lease {
                conn: Some(idle.conn),
                created: idle.created,
                busy: false,
                pool: Arc::clone(inner),
                _permit: permit,
            });
        }
        let conn = tokio::time::timeout(inner.acquire_timeout, inner.options.connect())
            .await
            .map_err(|_| Error::PoolTimedOut)??;
        Ok(Lease {
            conn: Some(conn),
            created: Instant::now(),
            busy: false,
            pool: Arc::clone(inner),
            _permit: permit,
        })
    }
}

impl<DB: Database> Lease<DB> {
    fn conn(&mut self) -> Result<&mut DB::Connection, Error> {
        self.busy = true;
        // A lease holds its connection until it is dropped.
        self.conn.as_mut().ok_or(Error::PoolClosed)
    }

    /// Records how the statement ended. Success and the errors that say
    /// nothing about the connection (a constraint, a missing row or column)
    /// leave it usable; any other error (I/O, protocol, a server shutting
    /// the session down, a busy database) leaves `busy` set, so the
    /// connection is discarded: errors are rare here, a new connection is
    /// cheap, and a doubtful one must not serve the next request.
    fn finished<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if result
            .as_ref()
            .map_or_else(leaves_connection_usable, |_| true)
        {
            self.busy = false;
        }
        result
    }
}

fn leaves_connection_usable(e: &Error) -> bool {
    use sqlx::error::ErrorKind;
    match e {
        Error::RowNotFound
        | Error::ColumnNotFound(_)
        | Error::ColumnIndexOutOfBounds { .. }
        | Error::TypeNotFound { .. } => true,
        Error::Database(db) => matches!(
            db.kind(),
            ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation
        ),
        _ => false,
    }
}

impl<DB: Database> Drop for Lease<DB> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.busy || conn.is_in_transaction() {
            // Its state is unknown: never reuse it.
            drop(conn);
            return;
        }
        if self.created.elapsed() >= MAX_LIFETIME {
            // A polite close needs the runtime; without one, just drop.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = conn.close().await;
                });
            }
            return;
        }
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Idle {
                conn,
                created: self.created,
                since: Instant::now(),
            });
    }
}

impl<'p, DB: Database> Executor<'p> for &'_ LeanPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Database = DB;

    /// Runs the statement to completion, then yields its results: this pool
    /// is for bounded single statements, not for streaming large results.
    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let pool = self.clone();
        let all = async move {
            let mut lease = pool.acquire().await?;
            let result = async {
                lease
                    .conn()?
                    .fetch_many(query)
                    .try_collect::<Vec<_>>()
                    .await
            }
            .await;
            lease.finished(result)
        };
        Box::pin(
            futures_util::stream::once(all)
                .map_ok(|items| futures_util::stream::iter(items.into_iter().map(Ok)))
                .try_flatten(),
        )
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.acquire().await?;
            let result = async { lease.conn()?.fetch_optional(query).await }.await;
            lease.finished(result)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, Error>> {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.acquire().await?;
            let result = async { lease.conn()?.prepare_with(sql, parameters).await }.await;
            lease.finished(result)
        })
    }

    #[doc(hidden)]
    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, Error>> {
        let pool = self.clone();
        Box::pin(async move {
            let mut lease = pool.acquire().await?;
            let result = async { lease.conn()?.describe(sql).await }.await;
            lease.finished(result)
        })
    }
}
