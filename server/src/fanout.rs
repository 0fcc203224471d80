//! Fan-out: this node's registry of subscriptions and the delivery of events to them.
//!
//! The engine hands every stored event to [`FanOut::deliver`], once, in timestamp order; the
//! fan-out queues it for each connection subscribed to its path or an ancestor of it.
//!
//! Costs: an event's line is encoded once and its bytes are shared by every receiver (a
//! reference-count increment each); bubbling looks up one hash entry per level of the event's
//! path, so it costs the path depth plus the matching subscribers, never the number of
//! channels. Each connection has a bounded queue; a connection whose queue is full is a slow
//! consumer: it is closed (code 4000) and never blocks anyone else.
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
    channels: RwLock<HashMap<Box<str>, Vec<Arc<Conn>>>>,
    position: Mutex<Timestamp>,
}

impl FanOut {
    /// An empty registry at position zero.
    pub fn new() -> FanOut {
        FanOut::default()
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
        let subs = map.entry(channel.into()).or_default();
        if !subs.iter().any(|c| c.id() == conn.id()) {
            subs.push(conn.clone());
        }
        position(self.position());
    }

    /// Unsubscribes (idempotent); `position` gets the timestamp after which no event is queued
    /// for this subscription.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channel: &str, position: impl FnOnce(Timestamp)) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        remove(&mut map, conn, channel);
        position(self.position());
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
            for channel in ancestors(&ev.path) {
                let Some(subs) = map.get(channel) else { continue };
                for c in subs {
                    if ev.sender != Some(c.id()) {
                        c.push_event(ev.ts, &ev.line.0);
                    }
                }
            }
            delivered(i);
        }
        // Under the read lock: a subscribe (write lock) sees either none or all of the batch.
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = newest.ts;
    }
}

fn remove(map: &mut HashMap<Box<str>, Vec<Arc<Conn>>>, conn: &Conn, channel: &str) {
    if let Some(subs) = map.get_mut(channel) {
        if let Some(i) = subs.iter().position(|c| c.id() == conn.id()) {
            subs.swap_remove(i);
        }
        if subs.is_empty() {
            map.remove(channel);
        }
    }
}
