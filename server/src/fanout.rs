//! Fan-out: this node's registry of subscriptions and the delivery of events to them.
//!
//! The engine hands every stored event to [`FanOut::deliver`], once, in timestamp order; the
//! fan-out queues it for each connection subscribed to its path or an ancestor of it.
//!
//! Costs: an event's line is encoded once and its bytes are shared by every receiver (a
//! reference-count increment each); bubbling looks up one hash entry per level of the event's
//! path, so it costs the path depth plus the matching subscribers, never the number of
//! channels. Each connection has a bounded queue (in lines and in bytes); an event that finds
//! it full is not queued, and the connection is *behind*: its writer reads what it missed from
//! the log and writes exactly the lines live delivery would have ([`crate::conn::Outbox`]), so
//! a burst larger than the queues reaches every reader that keeps up, and a slow one never
//! blocks anyone else (it is closed with 4000 if it stays behind for a whole ping interval).
//!
//! Positions: the fan-out's position is the newest event it was given. A subscription takes
//! effect at the current position, under the registry's lock, so every later event reaches
//! the subscriber and every earlier one is already in the log (the engine makes an event
//! visible before delivering it).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use axum::extract::ws::Utf8Bytes;
use ivy_client_core::Timestamp;
use ivy_client_core::path::ancestors;

use crate::budget::{Budget, Counted};
use crate::conn::Conn;

/// Identifies a connection of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An encoded event line (`@ts:/path:data`), valid UTF-8, shared by every receiver.
#[derive(Clone, PartialEq, Eq)]
pub struct Line(Utf8Bytes);

impl Line {
    /// A line from its text.
    pub fn from_string(line: String) -> Line {
        Line(line.into())
    }

    /// A line from bytes that are UTF-8 (lines are built from text frames and `&str`; an
    /// invalid sequence, which cannot happen, would be replaced).
    pub fn from_utf8_lossy(line: Vec<u8>) -> Line {
        match String::from_utf8(line) {
            Ok(s) => Line::from_string(s),
            Err(e) => Line::from_string(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }

    /// The line's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty (an event line never is).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

/// An event ready for delivery: stored, its line encoded once.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Published {
    /// The event's timestamp.
    pub ts: Timestamp,
    /// Its normalized path.
    pub path: Box<str>,
    /// The sending connection of this node, which does not receive its own event.
    pub sender: Option<ConnId>,
    /// The encoded line.
    pub line: Line,
}

impl Published {
    /// An event to deliver.
    pub fn new(ts: Timestamp, path: impl Into<Box<str>>, sender: Option<ConnId>, line: Line) -> Published {
        Published { ts, path: path.into(), sender, line }
    }
}

/// This node's subscriptions (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct FanOut {
    channels: RwLock<HashMap<Box<str>, Subscribers>>,
    position: Mutex<Timestamp>,
    budget: Arc<Budget>,
}

/// A channel's subscribed connections: a vector to deliver to, and where each connection is
/// in it, so that subscribing and unsubscribing cost O(1) under the registry's lock whatever
/// the channel's size (a linear search of a 5,000-subscriber channel under that lock, which
/// delivery also takes, raised an unrelated channel's latency 35-fold).
#[derive(Debug, Default)]
struct Subscribers {
    conns: Vec<Arc<Conn>>,
    at: HashMap<ConnId, usize>,
}

impl Subscribers {
    fn insert(&mut self, conn: &Arc<Conn>) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(conn.id()) {
            e.insert(self.conns.len());
            self.conns.push(conn.clone());
        }
    }

    fn remove(&mut self, id: ConnId) {
        let Some(i) = self.at.remove(&id) else { return };
        self.conns.swap_remove(i);
        if let Some(moved) = self.conns.get(i) {
            self.at.insert(moved.id(), i);
        }
    }

    fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

impl FanOut {
    /// An empty registry at position zero.
    pub fn new() -> FanOut {
        FanOut::default()
    }

    /// An empty registry whose event lines ([`FanOut::line`]) count in `budget`.
    pub(crate) fn with_budget(budget: Arc<Budget>) -> FanOut {
        FanOut { budget, ..FanOut::default() }
    }

    /// An event line from its encoded bytes (UTF-8), counted in the server's memory budget
    /// for as long as it lives (until its last receiver wrote it). Engines make their lines
    /// with it.
    pub fn line(&self, line: Vec<u8>) -> Line {
        if self.budget.limit() == 0 || std::str::from_utf8(&line).is_err() {
            return Line::from_utf8_lossy(line);
        }
        let charge = self.budget.charge(line.len());
        match Utf8Bytes::try_from(bytes::Bytes::from_owner(Counted { bytes: line, _charge: charge })) {
            Ok(text) => Line(text),
            // Checked above.
            Err(_) => Line::from_string(String::new()),
        }
    }

    /// Runs `f` with the position while no event is being delivered (under the registry's
    /// exclusive lock, as a subscription): a connection rejoins live delivery there.
    pub(crate) fn quiesced<R>(&self, f: impl FnOnce(Timestamp) -> R) -> R {
        let _map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        f(self.position())
    }

    /// Sets the position before the first delivery: the newest event already stored.
    pub fn start_at(&self, ts: Timestamp) {
        let mut p = self.position.lock().unwrap_or_else(PoisonError::into_inner);
        *p = (*p).max(ts);
    }

    /// The newest event delivered (or [`FanOut::start_at`]).
    pub fn position(&self) -> Timestamp {
        *self.position.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes `conn` to `channel` (idempotent) and calls `position` with the timestamp
    /// from which live delivery is guaranteed, before any event of the subscription is queued:
    /// every event with a greater timestamp that matches reaches `conn` live, every event up
    /// to it is already in the log.
    pub(crate) fn subscribe(&self, conn: &Arc<Conn>, channel: &str, position: impl FnOnce(Timestamp)) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(channel) {
            Some(subs) => subs.insert(conn),
            None => map.entry(channel.into()).or_default().insert(conn),
        }
        let at = self.position();
        conn.subscribed(channel, at);
        position(at);
    }

    /// Unsubscribes (idempotent); `position` gets the timestamp after which no event is queued
    /// for this subscription.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channel: &str, position: impl FnOnce(Timestamp)) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        remove(&mut map, conn, channel);
        let at = self.position();
        conn.unsubscribed(channel, at);
        position(at);
    }

    /// Removes every subscription of a closing connection.
    pub(crate) fn unsubscribe_all<'a>(&self, conn: &Conn, channels: impl Iterator<Item = &'a str>) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        for ch in channels {
            remove(&mut map, conn, ch);
        }
    }

    /// Delivers stored events, in timestamp order (each batch after the previous one), and
    /// moves the position to the newest. `delivered(i)` runs right after the `i`th event was
    /// queued for every subscriber and before any later one is: the engine completes the
    /// event's send there, so that every connection gets its own send's ack before the events
    /// with later timestamps (otherwise a client could take its own event, acked after a later
    /// one, for one it had already delivered).
    pub fn deliver(&self, batch: &[Published], mut delivered: impl FnMut(usize)) {
        let Some(newest) = batch.last() else { return };
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        for (i, ev) in batch.iter().enumerate() {
            // Read once per event: while the memory budget is used up, queues take less.
            let shed = self.budget.is_over();
            for channel in ancestors(&ev.path) {
                let Some(subs) = map.get(channel) else { continue };
                for c in &subs.conns {
                    if ev.sender != Some(c.id()) {
                        c.push_event(ev.ts, &ev.line.0, shed);
                    } else {
                        c.own_event(ev.ts);
                    }
                }
            }
            delivered(i);
        }
        // Under the read lock: a subscribe (write lock) sees either none or all of the batch.
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = newest.ts;
    }
}

fn remove(map: &mut HashMap<Box<str>, Subscribers>, conn: &Conn, channel: &str) {
    if let Some(subs) = map.get_mut(channel) {
        subs.remove(conn.id());
        if subs.is_empty() {
            map.remove(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_stay_indexed_through_churn() {
        let conns: Vec<Arc<Conn>> = (0..50).map(|i| Conn::new(ConnId(i), 1).0).collect();
        let mut subs = Subscribers::default();
        let mut model: Vec<u64> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let c = &conns[(rng % 50) as usize];
            if rng & 64 == 0 {
                subs.insert(c);
                if !model.contains(&c.id().0) {
                    model.push(c.id().0);
                }
            } else {
                subs.remove(c.id());
                model.retain(|&m| m != c.id().0);
            }
            let mut got: Vec<u64> = subs.conns.iter().map(|c| c.id().0).collect();
            got.sort_unstable();
            let mut want = model.clone();
            want.sort_unstable();
            assert_eq!(got, want);
            assert!(subs.conns.iter().enumerate().all(|(i, c)| subs.at[&c.id()] == i));
        }
    }
}
