//! Two small collections that keep the WebAssembly build small (a `BTreeMap` costs about
//! 11 KB of code per instantiation there) and fit how the client uses its data: keys that
//! only grow, and events that arrive in order on each of two channels.

use alloc::collections::VecDeque;

use crate::timestamp::Timestamp;
use crate::wire::Event;

/// A map kept as a vector sorted by key. Keys are allocated in increasing order, so inserts
/// append and lookups are binary searches.
#[derive(Debug)]
pub(crate) struct VecMap<K, V> {
    entries: VecDeque<(K, V)>,
}

impl<K: Ord + Copy, V> VecMap<K, V> {
    pub(crate) fn new() -> Self {
        VecMap { entries: VecDeque::new() }
    }

    fn find(&self, k: &K) -> Result<usize, usize> {
        self.entries.binary_search_by(|(key, _)| key.cmp(k))
    }

    pub(crate) fn insert(&mut self, k: K, v: V) {
        match self.find(&k) {
            Ok(i) => self.entries[i].1 = v,
            Err(i) => self.entries.insert(i, (k, v)),
        }
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.find(k).ok().map(|i| &self.entries[i].1)
    }

    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.find(k).ok().map(|i| &mut self.entries[i].1)
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        self.find(k).ok().and_then(|i| self.entries.remove(i)).map(|(_, v)| v)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    /// The entry with the smallest key.
    pub(crate) fn first(&self) -> Option<&V> {
        self.entries.front().map(|(_, v)| v)
    }

    /// The entry with the largest key.
    pub(crate) fn last(&self) -> Option<&V> {
        self.entries.back().map(|(_, v)| v)
    }

    /// Removes the entry with the smallest key.
    pub(crate) fn pop_first(&mut self) -> Option<V> {
        self.entries.pop_front().map(|(_, v)| v)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Events waiting for delivery, from two sources that each arrive in timestamp order: the
/// live connection (plus the client's own events, inserted at their ack, which the server
/// orders after every earlier live event) and the log pages (fetched one after another).
/// Delivery merges the two and drops duplicates.
#[derive(Debug, Default)]
pub(crate) struct MergeBuf {
    live: VecDeque<Event<'static>>,
    page: VecDeque<Event<'static>>,
}

fn push_sorted(q: &mut VecDeque<Event<'static>>, ev: Event<'static>) {
    // In order in practice: append. Otherwise (never expected) insert in place, so the
    // queue stays sorted whatever the input.
    match q.back() {
        Some(b) if b.ts >= ev.ts => {
            if let Err(i) = q.binary_search_by(|e| e.ts.cmp(&ev.ts)) {
                q.insert(i, ev);
            }
        }
        _ => q.push_back(ev),
    }
}

impl MergeBuf {
    pub(crate) fn push_live(&mut self, ev: Event<'static>) {
        push_sorted(&mut self.live, ev);
    }

    pub(crate) fn push_page(&mut self, ev: Event<'static>) {
        push_sorted(&mut self.page, ev);
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len() + self.page.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty() && self.page.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.live.clear();
        self.page.clear();
    }

    /// Drops everything at or before `ts`.
    pub(crate) fn drop_upto(&mut self, ts: Timestamp) {
        while self.live.front().is_some_and(|e| e.ts <= ts) {
            self.live.pop_front();
        }
        while self.page.front().is_some_and(|e| e.ts <= ts) {
            self.page.pop_front();
        }
    }

    /// Forgets the live events after `ts` (they are in the log); returns the newest one dropped.
    pub(crate) fn forget_live_after(&mut self, ts: Timestamp) -> Option<Timestamp> {
        let newest = self.live.back().map(|e| e.ts).filter(|t| *t > ts);
        while self.live.back().is_some_and(|e| e.ts > ts) {
            self.live.pop_back();
        }
        newest
    }

    /// The oldest event at or before `upto`, merging both sources; an event present in both
    /// comes out once.
    pub(crate) fn pop_upto(&mut self, upto: Timestamp) -> Option<Event<'static>> {
        let l = self.live.front().map(|e| e.ts);
        let p = self.page.front().map(|e| e.ts);
        let ts = match (l, p) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => return None,
        };
        if ts > upto {
            return None;
        }
        let from_live = (l == Some(ts)).then(|| self.live.pop_front()).flatten();
        let from_page = (p == Some(ts)).then(|| self.page.pop_front()).flatten();
        from_live.or(from_page)
    }
}
