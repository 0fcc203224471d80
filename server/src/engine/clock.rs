//! The server clock: unique, strictly increasing event timestamps.
//!
//! An event's timestamp is `max(wall clock, previous timestamp + 1 ns)`, so timestamps stay
//! unique and increasing when many events arrive in one nanosecond and when the wall clock
//! steps backwards. At startup the clock resumes after the newest stored event and after the
//! store's clock floor, which keeps them increasing across restarts.
//!
//! The clock can be given a limit: it then refuses to hand out event timestamps above it
//! ([`Clock::allocate`] fails with the timestamp it would need). With asynchronous durability
//! the sequencer keeps the limit equal to a clock floor it has recorded durably, so that
//! timestamps of events lost in a crash are never handed out again.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ivy_client_core::Timestamp;

/// A source of wall-clock time; replaceable for tests.
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> Timestamp + Send + Sync>);

impl WallClock {
    /// The system clock.
    pub fn system() -> WallClock {
        WallClock(Arc::new(|| {
            let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            Timestamp::new(d.as_secs(), d.subsec_nanos()).unwrap_or(Timestamp::ZERO)
        }))
    }

    /// A clock reading `f`.
    pub fn from_fn(f: impl Fn() -> Timestamp + Send + Sync + 'static) -> WallClock {
        WallClock(Arc::new(f))
    }

    /// The current wall-clock time.
    pub fn now(&self) -> Timestamp {
        (self.0)()
    }
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WallClock")
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::system()
    }
}

/// Hands out timestamps that never repeat and never go back.
#[derive(Debug)]
pub struct Clock {
    wall: WallClock,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// The greatest timestamp handed out (event or `@`).
    last: Timestamp,
    /// No event timestamp above this is handed out.
    limit: Timestamp,
}

impl Clock {
    /// A clock whose first timestamp is after `floor`, without limit.
    pub fn new(wall: WallClock, floor: Timestamp) -> Clock {
        Clock { wall, state: Mutex::new(State { last: floor, limit: Timestamp::MAX }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the greatest event timestamp the clock may hand out.
    pub fn set_limit(&self, limit: Timestamp) {
        self.state().limit = limit;
    }

    /// The wall clock's time, handing nothing out (for the idempotency window).
    pub fn wall_now(&self) -> Timestamp {
        self.wall.now()
    }

    /// The greatest timestamp handed out so far (events and `@` replies).
    pub fn last(&self) -> Timestamp {
        self.state().last
    }

    /// Calls `f` with a generator of `count` fresh event timestamps, holding the clock for the
    /// batch (`f` must call it at most `count` times). If the last of them would be above the
    /// limit, nothing is handed out and the error is that timestamp: raise the limit and retry.
    pub fn allocate<R>(&self, count: usize, f: impl FnOnce(&mut dyn FnMut() -> Timestamp) -> R) -> Result<R, Timestamp> {
        let now = self.wall.now();
        let mut state = self.state();
        let first = now.max(state.last.next());
        let newest = Timestamp::from_nanos(first.as_nanos().saturating_add(count.saturating_sub(1) as u128));
        if newest > state.limit {
            return Err(newest);
        }
        let mut next = || {
            let t = now.max(state.last.next());
            state.last = t;
            t
        };
        Ok(f(&mut next))
    }

    /// The current time for `@`: at least every timestamp handed out so far, and every
    /// later event gets a greater one. It follows the wall clock and is not bound by the limit.
    pub fn now(&self) -> Timestamp {
        let now = self.wall.now();
        let mut state = self.state();
        state.last = now.max(state.last);
        state.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn unique_and_increasing_when_the_wall_clock_steps_back() {
        let secs = Arc::new(AtomicU64::new(100));
        let s = secs.clone();
        let clock = Clock::new(WallClock::from_fn(move || Timestamp::new(s.load(Ordering::SeqCst), 0).unwrap()), Timestamp::ZERO);
        let mut seen = Vec::new();
        clock.allocate(3, |next| (0..3).for_each(|_| seen.push(next()))).unwrap();
        secs.store(50, Ordering::SeqCst);
        clock.allocate(1, |next| seen.push(next())).unwrap();
        let t = clock.now();
        clock.allocate(1, |next| seen.push(next())).unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen[3] <= t && t < seen[4]);
        assert_eq!(seen[0], Timestamp::new(100, 0).unwrap());
        assert_eq!(seen[4], Timestamp::new(100, 4).unwrap());
    }

    #[test]
    fn the_limit_refuses_a_batch_whole_and_names_the_timestamp_it_needs() {
        let at = |s, n| Timestamp::new(s, n).unwrap();
        let clock = Clock::new(WallClock::from_fn(move || at(100, 0)), at(100, 5));
        clock.set_limit(at(100, 8));
        assert_eq!(clock.allocate(3, |next| (next(), next(), next())), Ok((at(100, 6), at(100, 7), at(100, 8))));
        // Two more would need 100.000000010: nothing is handed out.
        assert_eq!(clock.allocate(2, |next| next()), Err(at(100, 10)));
        assert_eq!(clock.last(), at(100, 8));
        clock.set_limit(at(101, 0));
        assert_eq!(clock.allocate(2, |next| (next(), next())), Ok((at(100, 9), at(100, 10))));
        // `@` follows the wall clock, beyond the limit; the next batch must then ask again.
        let later = Clock::new(WallClock::from_fn(move || at(200, 0)), at(100, 0));
        later.set_limit(at(150, 0));
        assert_eq!(later.now(), at(200, 0));
        assert_eq!(later.allocate(1, |next| next()), Err(at(200, 1)));
    }
}
