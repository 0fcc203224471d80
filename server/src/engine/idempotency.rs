//! Idempotent sends (`docs/PROTOCOL.md` 5.9): the ids an engine remembers.
//!
//! A send may carry an id ([`super::Publish::id`]). Its *scope* is its sender
//! ([`super::Publish::origin`]: a token's `=sub`, `*` for the application and server API keys,
//! `-` anonymous), so the same id from another sender is another send. Within the window
//! ([`Idempotency::window`]) after an event with an id was stored, a send with the same scope
//! and id is a *repeat*: the engine stores and delivers nothing and completes it with the first
//! event's timestamp ([`super::Completion::replayed`]), whatever its path and data. A repeat in
//! the same group commit as its first shares that commit's outcome (a failed first is not
//! remembered: a later retry stores it).
//!
//! The lookup is the engine's (behind the seam): the single-node engine keeps the ids in the
//! sequencer's memory ([`Keys`]), checked when it takes a batch, and the sled engine stores each
//! id with its event in the same atomic write, so that after a restart (or a crash) the ids
//! are exactly those of the stored events; it rebuilds them on open from the events of the
//! root log newer than the window. The Redis engine keeps them in Redis, a key per id whose
//! TTL is the window, checked and set by the script that stores the batch (see
//! `engine/redis.rs`).
//!
//! Beyond [`Idempotency::max_keys`] ids (not on Redis, where the TTL bounds them), the oldest are forgotten first
//! (`ivy_idempotency_evicted_total`): under a heavy load of sends with ids, the window is
//! effectively shorter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ivy_client_core::Timestamp;

use super::{EngineMetrics, Origin};

/// Default of [`Idempotency::window`] (`--idempotency-window`): 10 minutes.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// Default of [`Idempotency::max_keys`] (`--idempotency-max-keys`).
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// How long and how many send ids an engine remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Idempotency {
    /// An id is remembered for at least this long after its event's timestamp (unless
    /// [`Idempotency::max_keys`] forgets it first). Zero: ids are accepted and ignored (every
    /// send is stored). Default [`DEFAULT_WINDOW`].
    pub window: Duration,
    /// Most ids remembered; beyond, the oldest are forgotten first. Default
    /// [`DEFAULT_MAX_KEYS`].
    pub max_keys: usize,
}

impl Default for Idempotency {
    fn default() -> Idempotency {
        Idempotency { window: DEFAULT_WINDOW, max_keys: DEFAULT_MAX_KEYS }
    }
}

impl Idempotency {
    /// The window and the key limit.
    pub fn new(window: Duration, max_keys: usize) -> Idempotency {
        Idempotency { window, max_keys }
    }

    /// Whether ids are remembered at all.
    pub fn is_active(&self) -> bool {
        !self.window.is_zero() && self.max_keys > 0
    }
}

/// One remembered id: its length (1 byte), the id, and its scope's wire form, in one
/// allocation shared by the map and the age queue.
pub(crate) type Key = Arc<[u8]>;

/// The key of `id` in the scope of `origin`.
pub(crate) fn key(origin: &Origin, id: &[u8]) -> Key {
    let scope = origin.wire();
    let mut k = Vec::with_capacity(1 + id.len() + scope.len());
    // Ids are at most 64 bytes (checked where they are parsed); the length keeps `a` + `=b`
    // apart from `a=` + `b`.
    k.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(id);
    k.extend_from_slice(scope);
    k.into()
}

/// The ids remembered by the single-node engine's sequencer, oldest first.
#[derive(Debug)]
pub(crate) struct Keys {
    settings: Idempotency,
    by_key: HashMap<Key, Timestamp>,
    /// The same keys in timestamp order (the order they are stored in).
    by_age: VecDeque<(Timestamp, Key)>,
    metrics: EngineMetrics,
}

impl Keys {
    pub(crate) fn new(settings: Idempotency, metrics: EngineMetrics) -> Keys {
        Keys { settings, by_key: HashMap::new(), by_age: VecDeque::new(), metrics }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.settings.is_active()
    }

    pub(crate) fn settings(&self) -> Idempotency {
        self.settings
    }

    /// The timestamp of the event stored with `key`, if remembered.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Timestamp> {
        self.by_key.get(key).copied()
    }

    /// The oldest timestamp still inside the window at `now`.
    pub(crate) fn horizon(&self, now: Timestamp) -> Timestamp {
        Timestamp::from_nanos(now.as_nanos().saturating_sub(self.settings.window.as_nanos()))
    }

    /// Forgets the ids whose window ended before `now`.
    pub(crate) fn expire(&mut self, now: Timestamp) {
        let horizon = self.horizon(now);
        let before = self.by_key.len();
        while self.by_age.front().is_some_and(|(ts, _)| *ts < horizon) {
            if let Some((_, k)) = self.by_age.pop_front() {
                self.by_key.remove(&k);
            }
        }
        if self.by_key.len() != before {
            self.metrics.idempotency_keys(self.by_key.len());
        }
    }

    /// Remembers `key` for the event stored at `ts` (timestamps come in increasing order),
    /// forgetting the oldest beyond the limit.
    pub(crate) fn insert(&mut self, key: Key, ts: Timestamp) {
        if !self.is_active() {
            return;
        }
        if self.by_key.insert(key.clone(), ts).is_none() {
            self.by_age.push_back((ts, key));
        }
        let mut evicted = 0;
        while self.by_key.len() > self.settings.max_keys {
            match self.by_age.pop_front() {
                Some((_, k)) => {
                    self.by_key.remove(&k);
                    evicted += 1;
                }
                None => break,
            }
        }
        if evicted > 0 {
            self.metrics.evicted(evicted);
        }
    }

    /// Reports the number of ids remembered (after a batch of inserts).
    pub(crate) fn report(&self) {
        self.metrics.idempotency_keys(self.by_key.len());
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: u64) -> Timestamp {
        Timestamp::new(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn keys_expire_after_the_window_and_the_oldest_go_beyond_the_limit() {
        let mut keys = Keys::new(Idempotency::new(Duration::from_secs(10), 3), EngineMetrics::default());
        let k = |id: &str| key(&Origin::ANONYMOUS, id.as_bytes());
        keys.insert(k("a"), ts(0));
        keys.insert(k("b"), ts(5));
        assert_eq!(keys.get(&k("a")), Some(ts(0)));
        assert_eq!(keys.get(&key(&Origin::user("ada"), b"a")), None, "another scope");
        keys.expire(ts(10));
        assert_eq!(keys.get(&k("a")), Some(ts(0)), "remembered for the whole window");
        keys.expire(ts(11));
        assert_eq!((keys.get(&k("a")), keys.get(&k("b"))), (None, Some(ts(5))));
        keys.insert(k("c"), ts(6));
        keys.insert(k("d"), ts(7));
        keys.insert(k("e"), ts(8));
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.get(&k("b")), None, "the oldest is forgotten first");
        assert_eq!(keys.get(&k("e")), Some(ts(8)));
        // An id and a scope never run into each other.
        assert_ne!(key(&Origin::user("b"), b"a"), key(&Origin::ANONYMOUS, b"a=b"));
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let mut keys = Keys::new(Idempotency::new(Duration::ZERO, 3), EngineMetrics::default());
        keys.insert(key(&Origin::ANONYMOUS, b"a"), ts(0));
        assert_eq!(keys.len(), 0);
        assert!(!keys.is_active());
    }
}
