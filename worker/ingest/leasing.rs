//! A poller's hold on its pilot's lease, as the poller sees it between database round trips.
//!
//! The supervisor takes and renews leases in batches (`store::leases`); each poller carries a
//! [`LeaseGuard`] and asks it before every step that acts on the mailbox or the store: a
//! login, a `RETR`, a `DELE`, a batch commit. The guard says no when the supervisor found the
//! lease gone (taken over, released) or when the last renewal is too old to vouch for it: the
//! local deadline is the renewal's start plus the TTL less a margin, on the monotonic clock,
//! which keeps counting while the process is frozen. So a replica woken from `SIGSTOP` past
//! its TTL sends nothing before its supervisor has renewed — and a renewal by then fails. The
//! commit also checks the fence in its transaction ([`store::leases::check_fence`]), so even a
//! guard that errs cannot make a stale holder store a batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::leases::Lease;

/// The share of the TTL kept back from the local deadline: local and database clocks may run
/// at slightly different rates, and a renewal's answer arrives after the database set expiry.
const MARGIN_DIVISOR: u32 = 5;

/// One pilot's lease as held by this replica. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    holder: Arc<str>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    lease: Lease,
    /// Past this instant the lease is not vouched for, whatever the database says.
    valid_until: Instant,
    lost: bool,
}

impl LeaseGuard {
    /// A guard for `lease`, held by `holder`, taken by a statement sent at `sent` with `ttl`.
    pub fn new(holder: Arc<str>, lease: Lease, sent: Instant, ttl: Duration) -> LeaseGuard {
        LeaseGuard {
            holder,
            state: Arc::new(Mutex::new(State {
                lease,
                valid_until: deadline(sent, ttl),
                lost: false,
            })),
        }
    }

    /// The replica that holds it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease to renew or check, while it is vouched for; `None` once lost or stale.
    pub fn current(&self) -> Option<Lease> {
        let state = self.lock();
        (!state.lost && Instant::now() < state.valid_until).then_some(state.lease)
    }

    /// The lease as last known, vouched for or not (for renewal and release).
    pub fn last_known(&self) -> Lease {
        self.lock().lease
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&self, lease: Lease, sent: Instant, ttl: Duration) {
        let mut state = self.lock();
        if !state.lost && lease.fence == state.lease.fence {
            state.lease = lease;
            state.valid_until = deadline(sent, ttl);
        }
    }

    /// The lease is gone: every later step is refused.
    pub fn lose(&self) {
        self.lock().lost = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.saturating_sub(ttl / MARGIN_DIVISOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(fence: i64) -> Lease {
        Lease {
            pilot_id: 7,
            fence,
            expires_at: chrono::Utc::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_stops_vouching_before_the_ttl_runs_out_and_after_it_is_lost() {
        let ttl = Duration::from_secs(10);
        let guard = LeaseGuard::new("r".into(), lease(3), Instant::now(), ttl);
        assert_eq!(guard.current().map(|l| l.fence), Some(3));
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(guard.current().is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(guard.current().is_none(), "8 s of 10 is the local limit");
        guard.renewed(lease(3), Instant::now(), ttl);
        assert!(guard.current().is_some(), "a renewal vouches again");
        guard.renewed(lease(4), Instant::now() + ttl, ttl);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            guard.current().is_none(),
            "a renewal of another fence is not this lease's"
        );
        guard.renewed(lease(3), Instant::now(), ttl);
        guard.lose();
        assert!(guard.current().is_none());
        guard.renewed(lease(3), Instant::now(), ttl);
        assert!(guard.current().is_none(), "a lost lease stays lost");
        assert_eq!(guard.last_known().fence, 3);
    }
}
