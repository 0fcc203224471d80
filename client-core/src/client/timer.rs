//! The connection's timers, as a fixed table (quinn-proto's `TimerTable`).
//!
//! The per-request and per-subscription deadlines are not here: the pending requests keep
//! theirs in key order ([`super::requests`]), so their earliest is the first one, and each
//! subscription keeps the deadline of its own log page ([`super::subscription`]).

use super::Millis;

/// A connection timer. Each is armed only in the connection state it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// Connecting: the attempt is abandoned.
    Connect,
    /// Reconnecting: the next attempt starts.
    Retry,
    /// Connected with no probe out: silence until then sends a probe.
    Idle,
    /// Connected with a probe out: no frame until then means the connection is dead.
    Probe,
}

impl Timer {
    const COUNT: usize = 4;

    const fn index(self) -> usize {
        match self {
            Timer::Connect => 0,
            Timer::Retry => 1,
            Timer::Idle => 2,
            Timer::Probe => 3,
        }
    }
}

/// When each [`Timer`] fires, if armed.
#[derive(Debug, Default)]
pub(super) struct TimerTable {
    at: [Option<Millis>; Timer::COUNT],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Millis) {
        self.at[timer.index()] = Some(at);
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Millis> {
        self.at[timer.index()]
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.at[timer.index()] = None;
    }

    pub(super) fn stop_all(&mut self) {
        self.at = [None; Timer::COUNT];
    }

    /// Whether `timer` is armed and due at `now`.
    pub(super) fn is_due(&self, timer: Timer, now: Millis) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }

    /// The earliest armed timer's time.
    pub(super) fn next_timeout(&self) -> Option<Millis> {
        self.at.iter().flatten().min().copied()
    }
}

/// The earlier of two optional times.
pub(super) fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_table_reports_the_earliest_armed_timer() {
        let mut t = TimerTable::default();
        assert_eq!(t.next_timeout(), None);
        t.set(Timer::Idle, 30);
        t.set(Timer::Probe, 20);
        assert_eq!(t.next_timeout(), Some(20));
        assert!(t.is_due(Timer::Probe, 20) && !t.is_due(Timer::Probe, 19) && !t.is_due(Timer::Connect, 100));
        t.stop(Timer::Probe);
        assert_eq!((t.get(Timer::Probe), t.next_timeout()), (None, Some(30)));
        t.set(Timer::Retry, 5);
        assert_eq!(t.next_timeout(), Some(5));
        t.stop_all();
        assert_eq!(t.next_timeout(), None);
        assert_eq!(earliest(Some(3), None), Some(3));
        assert_eq!(earliest(Some(3), Some(2)), Some(2));
        assert_eq!(earliest(None, None), None);
    }
}
