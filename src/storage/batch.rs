//! Read batching: concurrent point reads of one kind share one query.
//!
//! On PostgreSQL every read is a round trip to a backend process on the
//! same machine: a `send`, a wake-up of the backend, its executor start-up
//! and a `recv` back, which cost more CPU than the lookup itself. A
//! [`ReadBatcher`] lets at most `max_in_flight` queries of its kind run at
//! once. A read that finds a slot free starts a query at once (so an idle
//! vault answers as fast as before); reads that arrive while every slot is
//! busy queue, and the next query to start takes all of them (up to
//! `max_batch` keys, each key once) and answers each from its rows.
//!
//! Each read still sees the database as of a moment between its arrival
//! and its answer: a batch starts only after every read in it arrived, so
//! a read never sees data older than the moment it was asked.
//!
//! Queries run on a task of their own, never on a caller's future: a
//! caller that goes away (a client hanging up) cannot cancel the read the
//! others in its batch wait for. A query that fails gives every read of
//! its batch the error; one that panics gives them `Unavailable`.

use std::collections::HashMap;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::{StorageError, StorageResult};

/// Runs one query for `keys` (each key once) and returns one value per
/// key, in the order of `keys`.
pub(super) type BatchQuery<K, V> =
    Box<dyn Fn(Vec<K>) -> BoxFuture<'static, StorageResult<Vec<V>>> + Send + Sync>;

/// See the module documentation.
pub(super) struct ReadBatcher<K, V> {
    shared: Arc<Shared<K, V>>,
}

impl<K, V> Clone for ReadBatcher<K, V> {
    fn clone(&self) -> Self {
        ReadBatcher {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, V> std::fmt::Debug for ReadBatcher<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBatcher")
            .field("max_in_flight", &self.shared.max_in_flight)
            .field("max_batch", &self.shared.max_batch)
            .finish()
    }
}

struct Shared<K, V> {
    state: Mutex<State<K, V>>,
    max_in_flight: usize,
    max_batch: usize,
    query: BatchQuery<K, V>,
}

type Reply<V> = oneshot::Sender<StorageResult<V>>;

struct State<K, V> {
    /// Reads waiting for a query, oldest first.
    queue: Vec<(K, Reply<V>)>,
    /// Queries running (each on its own task).
    in_flight: usize,
    /// Queries run, and the reads they answered (`/metrics`).
    queries: u64,
    keys: u64,
}

impl<K, V> ReadBatcher<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    pub(super) fn new(max_in_flight: usize, max_batch: usize, query: BatchQuery<K, V>) -> Self {
        ReadBatcher {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: Vec::new(),
                    in_flight: 0,
                    queries: 0,
                    keys: 0,
                }),
                max_in_flight: max_in_flight.max(1),
                max_batch: max_batch.max(1),
                query,
            }),
        }
    }

    /// The value for `key`, read by the next query of this kind.
    pub(super) async fn get(&self, key: K) -> StorageResult<V> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut st = self.shared.lock();
            st.queue.push((key, reply));
            let free = st.in_flight < self.shared.max_in_flight;
            if free {
                st.in_flight += 1;
            }
            free
        };
        if start {
            tokio::spawn(drive(Arc::clone(&self.shared)));
        }
        answer.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// Queries run so far, and the reads they answered.
    pub(super) fn stats(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.queries, st.keys)
    }
}

impl<K, V> Shared<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn abandoned() -> StorageError {
    StorageError::Unavailable("the read was abandoned; retry".to_string())
}

/// Holds one query slot. Dropped without [`Slot::release`] (the task was
/// cancelled: the runtime is shutting down), it frees the slot and fails
/// the reads still queued, which would otherwise wait for a query that
/// may never start.
struct Slot<K, V> {
    shared: Arc<Shared<K, V>>,
    released: bool,
}

impl<K, V> Drop for Slot<K, V> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let queued = {
            let mut st = self.shared.lock();
            st.in_flight -= 1;
            std::mem::take(&mut st.queue)
        };
        for (_, reply) in queued {
            let _ = reply.send(Err(abandoned()));
        }
    }
}

/// Runs queries for the queued reads until none are left, then frees its
/// slot. The check for "none left" and the release happen under the same
/// lock as a new read's check for a free slot, so no read is left queued
/// with no query coming.
async fn drive<K, V>(shared: Arc<Shared<K, V>>)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let mut slot = Slot {
        shared,
        released: false,
    };
    loop {
        let batch = {
            let mut st = slot.shared.lock();
            if st.queue.is_empty() {
                st.in_flight -= 1;
                slot.released = true;
                return;
            }
            let n = st.queue.len().min(slot.shared.max_batch);
            let batch: Vec<_> = st.queue.drain(..n).collect();
            st.queries += 1;
            st.keys += batch.len() as u64;
            batch
        };
        run(&slot.shared, batch).await;
    }
}

/// One query for `batch`; each read gets the value of its key, or the
/// query's error.
async fn run<K, V>(shared: &Shared<K, V>, batch: Vec<(K, Reply<V>)>)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let mut index: HashMap<K, usize> = HashMap::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    for (key, _) in &batch {
        index.entry(key.clone()).or_insert_with(|| {
            keys.push(key.clone());
            keys.len() - 1
        });
    }
    let wanted = keys.len();
    let outcome = match AssertUnwindSafe((shared.query)(keys)).catch_unwind().await {
        Ok(Ok(values)) if values.len() == wanted => Ok(values),
        Ok(Ok(values)) => Err(StorageError::Other(format!(
            "a batched read returned {} values for {wanted} keys",
            values.len()
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            tracing::error!("a batched read panicked");
            Err(StorageError::Unavailable(
                "the read failed; retry".to_string(),
            ))
        }
    };
    for (key, reply) in batch {
        let answer = match (&outcome, index.get(&key)) {
            (Ok(values), Some(&i)) => Ok(values[i].clone()),
            (Ok(_), None) => Err(StorageError::Other("a batched key went missing".into())),
            (Err(e), _) => Err(e.duplicate()),
        };
        // A reader that went away no longer wants its answer.
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A batcher whose query doubles each key after `delay`, failing for
    /// key 13 and panicking for key 66; it counts the queries it ran and
    /// the largest number of them running at once.
    fn doubler(
        max_in_flight: usize,
        max_batch: usize,
        delay: Duration,
    ) -> (ReadBatcher<u32, u32>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (Arc::clone(&running), Arc::clone(&peak));
        let b = ReadBatcher::new(
            max_in_flight,
            max_batch,
            Box::new(move |keys: Vec<u32>| {
                let (r, p) = (Arc::clone(&r), Arc::clone(&p));
                Box::pin(async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    let mut seen = std::collections::HashSet::new();
                    assert!(keys.iter().all(|k| seen.insert(*k)), "a key sent twice");
                    if keys.contains(&66) {
                        panic!("boom");
                    }
                    if keys.contains(&13) {
                        return Err(StorageError::Unavailable("down".into()));
                    }
                    Ok(keys.iter().map(|k| k * 2).collect())
                }) as BoxFuture<'static, StorageResult<Vec<u32>>>
            }),
        );
        (b, running, peak)
    }

    #[tokio::test]
    async fn a_lone_read_runs_at_once_and_concurrent_reads_share_queries() {
        let (b, _, peak) = doubler(2, 64, Duration::from_millis(20));
        assert_eq!(b.get(7).await.unwrap(), 14);
        assert_eq!(b.stats(), (1, 1));
        // 200 reads at once, 50 of them for the same key: two start
        // queries, the rest wait and share the next ones.
        let reads: Vec<_> = (0..200u32)
            .map(|i| {
                let b = b.clone();
                // Clear of the failing (13) and panicking (66) keys.
                let key = if i < 50 { 1 } else { 100 + i };
                tokio::spawn(async move { (key, b.get(key).await) })
            })
            .collect();
        for r in reads {
            let (key, value) = r.await.unwrap();
            assert_eq!(value.unwrap(), key * 2);
        }
        let (queries, keys) = b.stats();
        assert_eq!(keys, 201);
        assert!(queries <= 1 + 2 + 200 / 64 + 2, "{queries} queries");
        assert!(peak.load(Ordering::SeqCst) <= 2);
        // Slots were all given back: a new read starts a query again.
        assert_eq!(b.get(9).await.unwrap(), 18);
    }

    #[tokio::test]
    async fn a_failed_or_panicking_query_fails_its_batch_only() {
        let (b, running, _) = doubler(1, 64, Duration::from_millis(30));
        // Hold the only slot so the next reads share one batch.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.get(1).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let failing: Vec<_> = [13u32, 2, 3]
            .into_iter()
            .map(|k| {
                let b = b.clone();
                tokio::spawn(async move { b.get(k).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        for r in failing {
            assert!(matches!(
                r.await.unwrap(),
                Err(StorageError::Unavailable(_))
            ));
        }
        let panicking = b.get(66).await;
        assert!(matches!(panicking, Err(StorageError::Unavailable(_))));
        assert_eq!(running.load(Ordering::SeqCst), 0);
        // The batcher keeps working after both.
        assert_eq!(b.get(4).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cancel_the_others() {
        let (b, _, _) = doubler(1, 64, Duration::from_millis(30));
        let leader = tokio::spawn({
            let b = b.clone();
            async move { b.get(5).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let follower = tokio::spawn({
            let b = b.clone();
            async move { b.get(6).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        leader.abort();
        assert_eq!(follower.await.unwrap().unwrap(), 12);
        assert_eq!(b.stats(), (2, 2));
    }

    #[test]
    fn reads_queued_when_the_runtime_stops_are_failed_not_left_waiting() {
        let (b, _, _) = doubler(1, 64, Duration::from_secs(60));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.block_on(async {
            // The first read's query sleeps for a minute; the second queues.
            let b1 = b.clone();
            tokio::spawn(async move { b1.get(1).await });
            tokio::task::yield_now().await;
            let b2 = b.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                tx.send(rt.block_on(b2.get(2))).unwrap();
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        // Dropping the runtime cancels the query's task.
        drop(rt);
        let queued = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(queued, Err(StorageError::Unavailable(_))));
    }
}
