//! The server-wide memory budget (`--memory-budget`): what the server holds for its clients,
//! counted in one place, so that load is shed before memory runs out.
//!
//! Counted: every event line from its encoding until its last receiver wrote it (once, however
//! many queues share it), the frames of sends read and not yet stored, and the log pages that
//! connections catching up hold. Not counted (each bounded per connection or per request by
//! its own limit, see `docs/GUARANTEES.md`): reply lines, the WebSocket layer's buffers and
//! the pages of `/log` requests.
//!
//! While the budget is used up, the server sheds: a send larger than [`SMALL_SEND`] bytes, or
//! from a connection that already has a send waiting to be stored, is refused with
//! `overloaded`; a connection's queue takes at most [`SHED_QUEUE_BYTES`] of events (beyond, it
//! catches up from the log); catch-up reads pages of [`SHED_PAGE_BYTES`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// While the budget is used up, the largest send (its whole frame) still accepted from a
/// connection with no other send waiting: a client sending small events one at a time is
/// served.
pub(crate) const SMALL_SEND: usize = 1024;
/// While the budget is used up, the most bytes of events a connection's queue takes.
pub(crate) const SHED_QUEUE_BYTES: usize = 64 << 10;
/// While the budget is used up, the bytes of one catch-up page (plus one event).
pub(crate) const SHED_PAGE_BYTES: usize = 16 << 10;

/// Bytes held for clients, and their limit (0: none).
#[derive(Debug, Default)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicUsize::new(0) })
    }

    /// Whether the budget is used up.
    pub(crate) fn is_over(&self) -> bool {
        self.limit != 0 && self.used.load(Ordering::Relaxed) >= self.limit
    }

    /// The bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit (0: none).
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Counts `n` bytes until the returned charge is dropped.
    pub(crate) fn charge(self: &Arc<Self>, n: usize) -> Charge {
        self.used.fetch_add(n, Ordering::Relaxed);
        Charge { budget: self.clone(), n }
    }
}

/// Bytes counted in a [`Budget`] until dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// An event line's bytes, counted in the budget for as long as they live.
#[derive(Debug)]
pub(crate) struct Counted {
    pub(crate) bytes: Vec<u8>,
    pub(crate) _charge: Charge,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_count_until_dropped() {
        let b = Budget::new(100);
        let c1 = b.charge(60);
        assert!(!b.is_over());
        let c2 = b.charge(40);
        assert!(b.is_over());
        drop(c1);
        assert_eq!(b.used(), 40);
        drop(c2);
        assert_eq!(b.used(), 0);
        let unlimited = Budget::new(0);
        let _c = unlimited.charge(usize::MAX / 2);
        assert!(!unlimited.is_over());
    }
}
