//! The server clock: unique, strictly increasing event timestamps.
//!
//! An event's timestamp is `max(wall clock, previous timestamp + 1 ns)`, so timestamps stay
//! unique and increasing when many events arrive in one nanosecond and when the wall clock
//! steps backwards. At startup the clock resumes after the newest stored event, which keeps
//! them increasing across restarts.

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
    last: Mutex<Timestamp>,
}

impl Clock {
    /// A clock whose first timestamp is after `floor`.
    pub fn new(wall: WallClock, floor: Timestamp) -> Clock {
        Clock { wall, last: Mutex::new(floor) }
    }

    /// Calls `f` with a generator of fresh event timestamps, holding the clock for the batch.
    pub fn allocate<R>(&self, f: impl FnOnce(&mut dyn FnMut() -> Timestamp) -> R) -> R {
        let now = self.wall.now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = || {
            let t = now.max(last.next());
            *last = t;
            t
        };
        f(&mut next)
    }

    /// The current time for `@`: at least every timestamp handed out so far, and every
    /// later event gets a greater one.
    pub fn now(&self) -> Timestamp {
        let now = self.wall.now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        *last = now.max(*last);
        *last
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
        clock.allocate(|next| (0..3).for_each(|_| seen.push(next())));
        secs.store(50, Ordering::SeqCst);
        clock.allocate(|next| seen.push(next()));
        let t = clock.now();
        clock.allocate(|next| seen.push(next()));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen[3] <= t && t < seen[4]);
        assert_eq!(seen[0], Timestamp::new(100, 0).unwrap());
        assert_eq!(seen[4], Timestamp::new(100, 4).unwrap());
    }
}
