//! The per-connection command rate limit: a token bucket, kept in its GCRA form (one
//! "theoretical arrival time" per connection), so a check is a few integer operations with no
//! allocation and no timer.
//!
//! A bucket of `burst` tokens refills at `rate` tokens per second; each command takes one.
//! Equivalently, commands are allowed as long as they do not run ahead of an ideal schedule of
//! one every `1/rate` seconds by more than `burst - 1` intervals.

/// Nanoseconds in one second.
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A token bucket over a monotonic clock read in nanoseconds (the caller supplies the time).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Nanoseconds per command at the sustained rate.
    interval: u64,
    /// How far (in nanoseconds) the schedule may run ahead of the clock: `(burst - 1) * interval`.
    tolerance: u64,
    /// The theoretical arrival time of the next command on the ideal schedule.
    tat: u64,
}

impl RateLimiter {
    /// A full bucket of `burst` commands (at least 1) refilling at `rate` per second; `None`
    /// for `rate == 0` (no limit).
    pub fn new(rate: u32, burst: u32) -> Option<RateLimiter> {
        if rate == 0 {
            return None;
        }
        let interval = NANOS_PER_SEC / u64::from(rate);
        let tolerance = u64::from(burst.max(1) - 1).saturating_mul(interval);
        Some(RateLimiter { interval, tolerance, tat: 0 })
    }

    /// Whether a command arriving at `now` (nanoseconds, never decreasing between calls) may
    /// run. An allowed command takes a token; a refused one takes nothing.
    pub fn check(&mut self, now: u64) -> bool {
        let tat = self.tat.max(now);
        if tat - now > self.tolerance {
            return false;
        }
        self.tat = tat.saturating_add(self.interval);
        true
    }
}

impl RateLimiter {
    /// Takes a token whatever the bucket holds (the schedule may run ahead of the clock) and
    /// returns how long, in nanoseconds from `now`, the caller should wait before its next
    /// command so that the bucket is not overdrawn: a pacer rather than a gate.
    pub fn take(&mut self, now: u64) -> u64 {
        self.tat = self.tat.max(now).saturating_add(self.interval);
        // The next command is within the limit once `tat - now <= tolerance`.
        self.tat.saturating_sub(now).saturating_sub(self.tolerance.saturating_add(self.interval))
    }
}

/// A budget of bytes per second (the same schedule, each byte a fraction of a token): a
/// command may run while the budget is not overdrawn by more than `burst` bytes, and then
/// spends its bytes, so one large command can overdraw it and the next ones wait.
#[derive(Debug, Clone)]
pub struct ByteLimiter {
    rate: u64,
    /// How far (in nanoseconds) the schedule may run ahead of the clock: `burst` bytes' worth.
    tolerance: u64,
    tat: u64,
}

impl ByteLimiter {
    /// `rate` bytes per second with bursts of `burst` bytes; `None` for `rate == 0` (no limit).
    pub fn new(rate: u64, burst: u64) -> Option<ByteLimiter> {
        (rate > 0).then(|| ByteLimiter { rate, tolerance: ByteLimiter::nanos(rate, burst), tat: 0 })
    }

    fn nanos(rate: u64, bytes: u64) -> u64 {
        u64::try_from(u128::from(bytes) * u128::from(NANOS_PER_SEC) / u128::from(rate)).unwrap_or(u64::MAX)
    }

    /// Whether a send arriving at `now` would fit (the budget is not overdrawn beyond the
    /// burst), spending nothing.
    pub fn fits(&self, now: u64) -> bool {
        self.tat.max(now) - now <= self.tolerance
    }

    /// Whether `bytes` arriving at `now` (nanoseconds, never decreasing) fit; if so they are
    /// spent. Refused ones cost nothing.
    pub fn check(&mut self, now: u64, bytes: u64) -> bool {
        let tat = self.tat.max(now);
        if tat - now > self.tolerance {
            return false;
        }
        self.tat = tat.saturating_add(ByteLimiter::nanos(self.rate, bytes));
        true
    }
}

/// The byte budgets of identities (a token's `sub`), shared by all of an identity's
/// connections, so that opening more connections does not multiply what one user may store.
/// An entry lives while a connection of its identity does. Its clock is the registry's (one
/// origin for every connection of the identity).
#[derive(Debug)]
pub(crate) struct Identities {
    rate: u64,
    burst: u64,
    epoch: std::time::Instant,
    budgets: std::sync::Mutex<std::collections::HashMap<Box<str>, std::sync::Weak<IdentityBudget>>>,
}

/// One identity's byte budget ([`Identities`]).
#[derive(Debug)]
pub(crate) struct IdentityBudget {
    epoch: std::time::Instant,
    limiter: std::sync::Mutex<ByteLimiter>,
}

impl IdentityBudget {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLimiter> {
        self.limiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a send would fit now, spending nothing.
    pub(crate) fn fits(&self) -> bool {
        self.lock().fits(self.now())
    }

    /// Spends `bytes` now.
    pub(crate) fn spend(&self, bytes: u64) {
        let now = self.now();
        self.lock().check(now, bytes);
    }
}

impl Identities {
    /// `rate` bytes per second per identity, bursts of `burst`; 0: no limit.
    pub(crate) fn new(rate: u64, burst: u64) -> Identities {
        Identities { rate, burst, epoch: std::time::Instant::now(), budgets: Default::default() }
    }

    /// The budget of identity `sub`, shared with its other connections (`None`: no limit).
    pub(crate) fn budget(&self, sub: &str) -> Option<std::sync::Arc<IdentityBudget>> {
        let fresh = ByteLimiter::new(self.rate, self.burst)?;
        let mut budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = budgets.get(sub).and_then(std::sync::Weak::upgrade) {
            return Some(b);
        }
        // Forget identities without connections now and then (amortized over new entries).
        if budgets.len() >= 1024 && budgets.len().is_power_of_two() {
            budgets.retain(|_, w| w.strong_count() > 0);
        }
        let b = std::sync::Arc::new(IdentityBudget { epoch: self.epoch, limiter: std::sync::Mutex::new(fresh) });
        budgets.insert(sub.into(), std::sync::Arc::downgrade(&b));
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_s_connections_share_its_budget() {
        // 1 byte per second, bursts of 1,000: what is spent stays spent for the test's length.
        let ids = Identities::new(1, 1000);
        let (a, b) = (ids.budget("ada").unwrap(), ids.budget("ada").unwrap());
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        let other = ids.budget("bob").unwrap();
        assert!(!std::sync::Arc::ptr_eq(&a, &other));
        assert!(a.fits());
        a.spend(1500);
        assert!(!b.fits(), "spent by the identity's other connection");
        assert!(other.fits(), "another identity has its own");
        drop((a, b));
        assert!(ids.budget("ada").unwrap().fits(), "a fresh budget once none of its connections is left");
        assert!(Identities::new(0, 10).budget("ada").is_none());
    }

    #[test]
    fn bytes_are_spent_and_refill_at_the_rate() {
        // 1,000 bytes per second, bursts of 2,000.
        let mut b = ByteLimiter::new(1000, 2000).unwrap();
        let t0 = NANOS_PER_SEC;
        assert!(b.check(t0, 1500), "within the burst");
        assert!(b.check(t0, 1500), "the budget is not overdrawn beyond the burst yet: spent");
        assert!(!b.check(t0, 1), "now it is: refused, and free");
        assert!(!b.check(t0 + 900 * MS, 1));
        assert!(b.check(t0 + 1000 * MS, 10), "a second later, back within the burst");
        assert!(ByteLimiter::new(0, 10).is_none());
        let mut big = ByteLimiter::new(u64::MAX, u64::MAX).unwrap();
        assert!((0..1000).all(|_| big.check(u64::MAX, u64::MAX)));
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_full_burst_then_the_sustained_rate() {
        // 1000 per second (one per ms), bursts of 5.
        let mut r = RateLimiter::new(1000, 5).unwrap();
        let t0 = 7 * NANOS_PER_SEC;
        assert!((0..5).all(|_| r.check(t0)), "the burst passes at once");
        assert!(!r.check(t0), "the sixth is refused");
        assert!(!r.check(t0 + MS / 2));
        assert!(r.check(t0 + MS), "one token back after 1 ms");
        assert!(!r.check(t0 + MS));
        // Refused commands cost nothing: after 10 quiet ms the bucket is full again, no more.
        assert!((0..5).all(|_| r.check(t0 + 11 * MS)));
        assert!(!r.check(t0 + 11 * MS));
    }

    #[test]
    fn a_steady_sender_at_the_rate_is_never_refused() {
        let mut r = RateLimiter::new(20_000, 1).unwrap();
        let step = NANOS_PER_SEC / 20_000;
        assert!((0..100_000u64).all(|i| r.check(i * step)));
        // Twice the rate: about half refused.
        let mut r = RateLimiter::new(20_000, 1).unwrap();
        let allowed = (0..100_000u64).filter(|i| r.check(i * step / 2)).count();
        assert_eq!(allowed, 50_000);
    }

    #[test]
    fn the_pacer_lets_a_burst_through_then_spaces_commands_at_the_rate() {
        // 1000 per second (one per ms), bursts of 3.
        let mut r = RateLimiter::new(1000, 3).unwrap();
        let t0 = 5 * NANOS_PER_SEC;
        assert_eq!((r.take(t0), r.take(t0), r.take(t0)), (0, 0, 0), "the burst needs no wait");
        assert_eq!(r.take(t0), MS, "the fourth: one interval");
        assert_eq!(r.take(t0 + MS), MS, "waited: the next one interval again");
        assert_eq!(r.take(t0 + 10 * MS), 0, "after a pause, no wait");
        // A caller that waits as told stays at the rate: n commands take (n - burst) intervals.
        let mut r = RateLimiter::new(1000, 3).unwrap();
        let mut now = t0;
        for _ in 0..103 {
            now += r.take(now);
        }
        assert_eq!(now - t0, 100 * MS);
        let mut r = RateLimiter::new(u32::MAX, u32::MAX).unwrap();
        assert!((0..1000).all(|_| r.take(u64::MAX) == 0));
    }

    #[test]
    fn zero_rate_is_no_limit_and_extremes_do_not_overflow() {
        assert!(RateLimiter::new(0, 10).is_none());
        let mut r = RateLimiter::new(u32::MAX, u32::MAX).unwrap();
        assert!((0..1000).all(|_| r.check(u64::MAX)));
        let mut r = RateLimiter::new(1, u32::MAX).unwrap();
        assert!(r.check(0));
        assert!(r.check(u64::MAX));
        let mut r = RateLimiter::new(1, 0).unwrap(); // burst 0 counts as 1
        assert!(r.check(5));
        assert!(!r.check(5));
    }
}
