//! Wakes long-poll claims when work arrives: one LISTEN connection per process on the
//! store's work channel, fanned out to the claims waiting on each queue.
//!
//! A notification is only a hint; the claim decides what is there. Notifications sent while
//! the LISTEN connection is down are lost, so on every (re)connect all waiting claims are
//! woken to look again, and while it is down they look once a second instead of waiting for
//! a hint that cannot come.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Db;

/// How often waiting claims look while the LISTEN connection is down.
pub const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// The claims waiting per queue.
#[derive(Default)]
pub struct Waker {
    queues: Mutex<HashMap<String, Arc<Notify>>>,
    listening: AtomicBool,
    waiting: AtomicUsize,
}

/// Counts a claim as waiting while it lives.
pub struct Waiting<'w>(&'w AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Waker {
    /// The notifier of `queue` (names come from validated queues only, so the map stays
    /// as small as the set of queues).
    pub fn queue(&self, queue: &str) -> Arc<Notify> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.entry(queue.to_owned()).or_default().clone()
    }

    /// Whether hints arrive (the LISTEN connection is up).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Long-poll claims waiting now (tests wait for one before adding work).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Marks a claim as waiting until the guard drops.
    pub fn wait_guard(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(&self.waiting)
    }

    fn wake(&self, queue: &str) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = queues.get(queue) {
            n.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for n in queues.values() {
            n.notify_waiters();
        }
    }

    /// Listens until `shutdown`, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, db: Db, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = db.listen_work() => connected,
            };
            match connected {
                Ok(mut listener) => {
                    backoff = Duration::from_millis(200);
                    self.listening.store(true, Ordering::Release);
                    // Why wake everyone: hints sent before this connection are lost.
                    self.wake_all();
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            next = listener.next_queue() => next,
                        };
                        match next {
                            Ok(queue) => self.wake(&queue),
                            Err(e) => {
                                tracing::warn!(error = %e, "work LISTEN connection lost; reconnecting (long-poll claims look every second meanwhile)");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot LISTEN for new work; long-poll claims look every second meanwhile");
                }
            }
            self.listening.store(false, Ordering::Release);
            self.wake_all();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }
}
