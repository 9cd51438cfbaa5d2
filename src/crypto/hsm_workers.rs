//! The threads that make the keyring's HSM calls.
//!
//! PKCS#11 calls block, so they cannot run on the async workers. Handing
//! each one to `spawn_blocking` let every concurrent request have a thread
//! of its own in the HSM library: under 64 connections of hsm-mode
//! add_card, about a hundred threads queued on the session pool's condition
//! variable and on SoftHSM's locks, and the server spent more of its CPU
//! switching between them than in the HSM library (see BENCHMARKS.md, item
//! 47). Here a fixed number of threads take calls from one queue: under
//! load a thread finishes a call and takes the next one without sleeping,
//! and the HSM sees at most that many callers at once.
//!
//! Threads are started as calls arrive, up to the limit, and stop when the
//! keyring is dropped; the drop waits for them. A call whose caller has
//! gone (a request that timed out or was dropped) is skipped instead of
//! spending an HSM operation.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use cardvault_hsm::{HsmError, KeyCustodian};

use super::CryptoError;

/// One queued HSM call: runs against the custodian and answers its caller.
type Call = Box<dyn FnOnce(&dyn KeyCustodian) + Send>;

pub(super) struct HsmWorkers {
    custodian: Arc<dyn KeyCustodian>,
    queue: flume::Sender<Call>,
    /// The receiving end, cloned into each thread started.
    calls: flume::Receiver<Call>,
    limit: usize,
    /// Threads started so far; changes only under `threads`' lock.
    started: AtomicUsize,
    /// The threads, joined when the workers are dropped.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl HsmWorkers {
    /// Workers for `custodian`, at most `limit` threads (at least 1). Starts
    /// none yet.
    pub(super) fn new(custodian: Arc<dyn KeyCustodian>, limit: usize) -> Self {
        let (queue, calls) = flume::unbounded();
        HsmWorkers {
            custodian,
            queue,
            calls,
            limit: limit.max(1),
            started: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Threads started so far (for tests).
    #[cfg(test)]
    pub(super) fn threads(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }

    /// Runs `f` on one of the threads and waits for its result without
    /// blocking the async runtime.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, CryptoError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn KeyCustodian) -> Result<T, HsmError> + Send + 'static,
    {
        let (answer, result) = tokio::sync::oneshot::channel();
        let call: Call = Box::new(move |custodian| {
            if !answer.is_closed() {
                // The caller may have gone meanwhile; nothing to tell it then.
                let _ = answer.send(f(custodian));
            }
        });
        self.queue
            .send(call)
            .map_err(|_| CryptoError::Task("the HSM call queue is closed".to_string()))?;
        self.start_thread_if_needed()?;
        result
            .await
            .map_err(|_| CryptoError::Task("the HSM call panicked".to_string()))?
            .map_err(CryptoError::from)
    }

    /// Starts one more thread while fewer than `limit` run. A thread that
    /// cannot be started is an outage (503) only when there is none at all
    /// to take the call; otherwise the running ones take it.
    fn start_thread_if_needed(&self) -> Result<(), CryptoError> {
        if self.started.load(Ordering::Acquire) >= self.limit {
            return Ok(());
        }
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        let n = self.started.load(Ordering::Acquire);
        if n >= self.limit {
            return Ok(());
        }
        let calls = self.calls.clone();
        let custodian = Arc::clone(&self.custodian);
        let spawned = std::thread::Builder::new()
            .name(format!("cardvault-hsm-{n}"))
            .spawn(move || serve(&calls, custodian.as_ref()));
        match spawned {
            Ok(thread) => {
                threads.push(thread);
                self.started.store(n + 1, Ordering::Release);
                Ok(())
            }
            Err(e) if n == 0 => Err(CryptoError::Task(format!(
                "could not start an HSM thread: {e}"
            ))),
            Err(e) => {
                tracing::warn!(error = %e, threads = n, "could not start another HSM thread");
                Ok(())
            }
        }
    }
}

impl Drop for HsmWorkers {
    /// Closes the queue and waits for the threads to end (each finishes the
    /// call it is in and lets go of its sessions). Left to end on their own,
    /// a thread could still be inside the HSM library when the process exits
    /// and the library tears itself down: the API test binary crashed so in
    /// SoftHSM, in `cardvault-hsm-0`, after all its tests had passed.
    fn drop(&mut self) {
        let (closed, _) = flume::bounded(0);
        drop(std::mem::replace(&mut self.queue, closed));
        let threads = std::mem::take(
            self.threads
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let me = std::thread::current().id();
        for thread in threads {
            // A call that dropped the last keyring on an HSM thread cannot
            // wait for that thread; it ends once the call returns.
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

/// A thread's loop: takes calls until every sender is gone (the keyring was
/// dropped). A call that panics loses its answer (its caller gets a
/// `Task` error) but not the thread.
fn serve(calls: &flume::Receiver<Call>, custodian: &dyn KeyCustodian) {
    while let Ok(call) = calls.recv() {
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| call(custodian)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;

    fn workers(limit: usize) -> (HsmWorkers, Arc<dyn KeyCustodian>) {
        let custodian: Arc<dyn KeyCustodian> = crate::testkit::fresh_custodian();
        (HsmWorkers::new(Arc::clone(&custodian), limit), custodian)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_the_limit_of_calls_run_at_once() {
        let (w, _custodian) = workers(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = (0..16).map(|i| {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            w.run(move |_| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            })
        });
        let answers: Vec<usize> = futures_util::future::try_join_all(calls).await.unwrap();
        assert_eq!(
            answers,
            (0..16).collect::<Vec<_>>(),
            "each caller gets its own answer"
        );
        assert_eq!(most.load(Ordering::SeqCst), 2, "two threads, both used");
        assert_eq!(w.threads(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_call_fails_its_caller_and_keeps_the_thread() {
        let (w, _custodian) = workers(1);
        let failed = w
            .run(|_| -> Result<(), HsmError> { panic!("HSM library bug") })
            .await;
        assert!(
            matches!(&failed, Err(e @ CryptoError::Task(_)) if e.is_unavailable()),
            "{failed:?}"
        );
        let healthy = tokio::time::timeout(Duration::from_secs(10), w.run(|c| c.health())).await;
        assert!(matches!(healthy, Ok(Ok(()))), "{healthy:?}");
        assert_eq!(w.threads(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_whose_caller_left_is_not_made() {
        let (w, _custodian) = workers(1);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let first = w.run(move |_| {
            hold.recv_timeout(Duration::from_secs(10)).unwrap();
            Ok(())
        });
        let made = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&made);
        let second = w.run(move |_| {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        });
        let (first, gave_up) = tokio::join!(first, async {
            // The second caller gives up while the only thread is busy with
            // the first call; then the first call is let go.
            let gave_up = tokio::time::timeout(Duration::from_millis(50), second).await;
            release.send(()).unwrap();
            gave_up
        });
        first.unwrap();
        assert!(gave_up.is_err(), "the second call waited behind the first");
        // Calls are taken in order: once a third is answered, the second
        // has been taken off the queue.
        w.run(|_| Ok(())).await.unwrap();
        assert!(
            !made.load(Ordering::SeqCst),
            "an abandoned call reached the HSM"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_workers_waits_for_the_call_in_progress() {
        let (w, custodian) = workers(1);
        let (started, running) = std::sync::mpsc::channel::<()>();
        let call = w.run(move |_| {
            started.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        });
        // The caller gives up while the call is still in the HSM thread.
        assert!(tokio::time::timeout(Duration::from_millis(20), call)
            .await
            .is_err());
        running.recv_timeout(Duration::from_secs(10)).unwrap();
        drop(w);
        assert_eq!(
            Arc::strong_count(&custodian),
            1,
            "a thread was still in an HSM call after its workers were dropped"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_threads_stop_with_the_keyring() {
        let (w, custodian) = workers(2);
        let before = Arc::strong_count(&custodian);
        let slow = |_: &dyn KeyCustodian| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        };
        let (a, b) = tokio::join!(w.run(slow), w.run(slow));
        a.unwrap();
        b.unwrap();
        assert_eq!(w.threads(), 2);
        drop(w);
        // Each thread held the custodian; the drop waited for them to end
        // and let go of it.
        assert_eq!(
            Arc::strong_count(&custodian),
            before - 1,
            "threads outlived their keyring"
        );
    }
}
