//! Fan-out: this node's registry of subscriptions and the delivery of events to them.
//!
//! The engine hands every stored event to [`FanOut::deliver`], once, in timestamp order; the
//! fan-out queues it for each connection subscribed to its path or an ancestor of it.
//!
//! Costs: an event's line is encoded once and its bytes are shared by every receiver (a
//! reference-count increment each); so is its extended line (`ext=sender`), built when the
//! first connection that asked for it receives the event, never for an event that none of
//! them receives; bubbling looks up one hash entry per level of the event's
//! path, so it costs the path depth plus the matching subscribers, never the number of
//! channels. Each connection has a bounded queue (in lines and in bytes); an event that finds
//! it full is not queued, and the connection is *behind*: its writer reads what it missed from
//! the log and writes exactly the lines live delivery would have (`conn::Outbox`), so
//! a burst larger than the queues reaches every reader that keeps up, and a slow one never
//! blocks anyone else (it is closed with 4000 if it stays behind for a whole ping interval).
//!
//! Locking: the registry is split into [`SHARDS`] shards by channel name, each behind its own
//! lock, and delivery takes a shard's lock only while it queues one event for one channel of
//! that shard. So subscribing and unsubscribing (which take the channel's shard for writing)
//! wait at most for one event's delivery to a channel of the same shard, and never hold up
//! delivery elsewhere: churn on a crowded channel does not delay an unrelated one (with one
//! lock for the whole registry, held by delivery for a whole batch, it did). Each batch's
//! delivery also holds a gate for reading, which only a connection rejoining live delivery
//! after catching up from the log takes for writing (`FanOut::quiesced`): it rejoins while
//! no batch is in flight.
//!
//! Positions: the fan-out's position is the newest event delivered in full; each shard also
//! keeps the newest event whose delivery went through it (set under its lock). A subscription
//! takes effect under its shard's lock at the greater of the two: every matching event after
//! it has yet to go through that shard and reaches the subscriber, every matching event up to
//! it went through the shard before and is already in the log (the engine makes an event
//! visible before delivering it). The position is exact, with no gap and no duplicate; the
//! order of delivery on each connection stays the commit order, since one sequencer delivers
//! every event in turn.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use axum::extract::ws::Utf8Bytes;
use ivy_client_core::Timestamp;
use ivy_client_core::path::ancestors;

use crate::budget::{Budget, Counted};
use crate::conn::Conn;
use crate::engine::Origin;
use crate::engine::PROBE_CHANNEL;
use crate::metrics::Delivery;

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
    /// Who sent it ([`Published::from`]; default unknown).
    pub origin: Origin,
    /// The extended line (`@ts~sender:/path:data`, for the connections that asked for
    /// `ext=sender`): built at most once, when the first of them receives the event, and
    /// shared by all of them.
    extended: OnceLock<Line>,
}

impl Published {
    /// An event to deliver.
    pub fn new(ts: Timestamp, path: impl Into<Box<str>>, sender: Option<ConnId>, line: Line) -> Published {
        Published { ts, path: path.into(), sender, line, origin: Origin::UNKNOWN, extended: OnceLock::new() }
    }

    /// Sets who sent it.
    pub fn from(mut self, origin: Origin) -> Published {
        self.origin = origin;
        self
    }

    /// The extended line, built on first use from the line and the sender.
    fn extended(&self, fanout: &FanOut) -> &Line {
        self.extended.get_or_init(|| {
            let mut ext = Vec::new();
            match ivy_client_core::wire::extend_event_line(self.line.as_bytes(), self.origin.wire(), &mut ext) {
                Some(()) => fanout.line(ext),
                None => self.line.clone(),
            }
        })
    }
}

/// How many shards the registry has (see the [module docs](self)).
pub const SHARDS: usize = 64;

/// This node's subscriptions (see the [module docs](self)).
#[derive(Debug)]
pub struct FanOut {
    shards: Box<[Shard]>,
    /// The newest event delivered in full, in nanoseconds since the epoch.
    position: AtomicU64,
    /// Held for reading by each batch's delivery, for writing by [`FanOut::quiesced`]: a
    /// connection that caught up from the log rejoins while no batch is in flight. (Once per
    /// batch and uncontended but for those rare rejoins; subscription changes do not take it.)
    gate: RwLock<()>,
    budget: Arc<Budget>,
    /// Counted once per batch (`crate::metrics`).
    counts: Delivery,
}

impl Default for FanOut {
    fn default() -> FanOut {
        FanOut {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            position: AtomicU64::new(0),
            gate: RwLock::new(()),
            budget: Arc::default(),
            counts: Delivery::default(),
        }
    }
}

/// One shard of the registry, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    channels: RwLock<HashMap<Box<str>, Subscribers>>,
    /// The keys of `channels` in order (for `GET /channels`): changed under `channels`' write
    /// lock, only when a channel gets its first subscriber or loses its last one.
    names: Mutex<BTreeSet<Box<str>>>,
    /// The newest event whose delivery went through this shard (nanoseconds), set under its
    /// lock.
    position: AtomicU64,
}

/// A timestamp in nanoseconds (they fit a u64 until the year 2554).
fn nanos(ts: Timestamp) -> u64 {
    u64::try_from(ts.as_nanos()).unwrap_or(u64::MAX)
}

/// The shard of a channel: FNV-1a of its name.
pub(crate) fn shard_of(channel: &str) -> usize {
    let h = channel.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    (h % SHARDS as u64) as usize
}

/// A channel's subscribed connections: a vector to deliver to, and where each connection is
/// in it, so that subscribing and unsubscribing cost O(1) under the registry's lock whatever
/// the channel's size (a linear search of a 5,000-subscriber channel under that lock, which
/// delivery also takes, raised an unrelated channel's latency 35-fold).
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
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

    /// The registry, its deliveries counted in `counts`.
    pub(crate) fn with_counts(mut self, counts: Delivery) -> FanOut {
        self.counts = counts;
        self
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

    /// Runs `f` with the position while no event is being delivered (no batch in flight:
    /// every event up to the position has been handed to the subscribers, every later one is
    /// yet to be): a connection rejoins live delivery there.
    pub(crate) fn quiesced<R>(&self, f: impl FnOnce(Timestamp) -> R) -> R {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        f(self.position())
    }

    /// Sets the position before the first delivery: the newest event already stored.
    pub fn start_at(&self, ts: Timestamp) {
        self.position.fetch_max(nanos(ts), Ordering::AcqRel);
    }

    /// The newest event delivered in full (or [`FanOut::start_at`]).
    pub fn position(&self) -> Timestamp {
        Timestamp::from_nanos(u128::from(self.position.load(Ordering::Acquire)))
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[shard_of(channel)]
    }

    /// The position of a subscription of `shard`'s channel taking effect now (under the
    /// shard's lock): see the [module docs](self).
    fn position_in(&self, shard: &Shard) -> Timestamp {
        let p = shard.position.load(Ordering::Acquire).max(self.position.load(Ordering::Acquire));
        Timestamp::from_nanos(u128::from(p))
    }

    /// Subscribes `conn` to `channel` (idempotent) and calls `position` with the timestamp
    /// from which live delivery is guaranteed, before any event of the subscription is queued:
    /// every event with a greater timestamp that matches reaches `conn` live, every event up
    /// to it is already in the log.
    pub(crate) fn subscribe(&self, conn: &Arc<Conn>, channel: &str, position: impl FnOnce(Timestamp)) {
        let shard = self.shard(channel);
        let mut map = shard.channels.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(channel) {
            Some(subs) => subs.insert(conn),
            None => {
                map.entry(channel.into()).or_default().insert(conn);
                if channel != PROBE_CHANNEL {
                    shard.names.lock().unwrap_or_else(PoisonError::into_inner).insert(channel.into());
                }
            }
        }
        let at = self.position_in(shard);
        conn.subscribed(channel, at);
        position(at);
    }

    /// Unsubscribes (idempotent); `position` gets the timestamp after which no event is queued
    /// for this subscription.
    pub(crate) fn unsubscribe(&self, conn: &Conn, channel: &str, position: impl FnOnce(Timestamp)) {
        let shard = self.shard(channel);
        let mut map = shard.channels.write().unwrap_or_else(PoisonError::into_inner);
        remove(&mut map, &shard.names, conn, channel);
        let at = self.position_in(shard);
        conn.unsubscribed(channel, at);
        position(at);
    }

    /// Removes every subscription of a closing connection.
    pub(crate) fn unsubscribe_all<'a>(&self, conn: &Conn, channels: impl Iterator<Item = &'a str>) {
        for ch in channels {
            let shard = self.shard(ch);
            let mut map = shard.channels.write().unwrap_or_else(PoisonError::into_inner);
            remove(&mut map, &shard.names, conn, ch);
        }
    }

    /// Delivers stored events, in timestamp order (each batch after the previous one), and
    /// moves the position to the newest. `delivered(i)` runs right after the `i`th event was
    /// queued for every subscriber and before any later one is: the engine completes the
    /// event's send there, so that every connection gets its own send's ack before the events
    /// with later timestamps (otherwise a client could take its own event, acked after a later
    /// one, for one it had already delivered).
    pub fn deliver(&self, batch: &[Published], mut delivered: impl FnMut(usize)) {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.counts.published(batch.len());
        // Deliveries and their bytes, counted here and added to the metrics once per batch.
        let (mut queued, mut bytes) = (0u64, 0u64);
        for (i, ev) in batch.iter().enumerate() {
            let ts = nanos(ev.ts);
            // Read once per event: while the memory budget is used up, queues take less.
            let shed = self.budget.is_over();
            for channel in ancestors(&ev.path) {
                let shard = self.shard(channel);
                let map = shard.channels.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(subs) = map.get(channel) {
                    for c in &subs.conns {
                        if ev.sender != Some(c.id()) {
                            let line = if c.senders() { ev.extended(self) } else { &ev.line };
                            if c.push_event(ev.ts, &line.0, shed) {
                                queued += 1;
                                bytes += line.len() as u64;
                            }
                        } else {
                            c.own_event(ev.ts);
                        }
                    }
                }
                // Under the shard's lock: a subscription to a channel of this shard that takes
                // effect later gets a position at or after this event.
                shard.position.store(ts, Ordering::Release);
            }
            self.position.store(ts, Ordering::Release);
            delivered(i);
        }
        self.counts.batch(queued, bytes);
    }

    /// Ends every connection that holds a subscription with the close `code` (an engine that
    /// lost continuity: its subscribers must resume from the log); returns how many.
    pub fn end_subscribers(&self, code: u16) -> usize {
        let mut ended = std::collections::HashSet::new();
        for shard in &self.shards {
            let map = shard.channels.read().unwrap_or_else(PoisonError::into_inner);
            for (channel, subs) in map.iter() {
                if channel.is_empty() {
                    continue;
                }
                for c in &subs.conns {
                    if ended.insert(c.id()) {
                        c.ending().end(code);
                    }
                }
            }
        }
        ended.len()
    }

    /// Hands a readiness probe to the subscribers of the probe channel (the server's
    /// in-process prober) as [`FanOut::deliver`] hands an event, under the gate and the
    /// channel's shard lock, without moving any position (`engine::answer_probes`).
    pub(crate) fn deliver_probe(&self) {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let map = self.shard(PROBE_CHANNEL).channels.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(subs) = map.get(PROBE_CHANNEL) {
            // A timestamp no event has (each prober is a fresh connection, which has seen none).
            let probe = Timestamp::from_nanos(u128::from(u64::MAX));
            for c in &subs.conns {
                c.push_event(probe, &Utf8Bytes::from_static("probe"), false);
            }
        }
    }

    /// How many subscriptions the connections hold (the probe's aside): one read lock per
    /// shard, for `/metrics` and `/info`.
    pub(crate) fn subscriptions(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let map = s.channels.read().unwrap_or_else(PoisonError::into_inner);
                map.iter().filter(|(ch, _)| !ch.is_empty()).map(|(_, subs)| subs.conns.len()).sum::<usize>()
            })
            .sum()
    }

    /// The subscribed channels in `prefix`'s subtree (a normalized path) after `after`, in
    /// byte order, at most `limit`, with how many connections subscribed to each exactly
    /// (`GET /channels`): a range of each shard's sorted names (one read lock per shard, the
    /// cost of the range, not of the number of channels), merged.
    pub(crate) fn channels(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(Box<str>, usize)> {
        use std::ops::Bound;
        let root = prefix == ivy_client_core::path::ROOT;
        let below = if root { String::from("/") } else { format!("{prefix}/") };
        let mut out: Vec<(Box<str>, usize)> = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.channels.read().unwrap_or_else(PoisonError::into_inner);
            let names = shard.names.lock().unwrap_or_else(PoisonError::into_inner);
            let count = |name: &str| map.get(name).map_or(0, |s| s.conns.len());
            let mut taken = 0;
            // The prefix itself, then its subtree below (`prefix/...`).
            if !root && after.is_none_or(|a| prefix > a) && names.contains(prefix) {
                out.push((prefix.into(), count(prefix)));
                taken += 1;
            }
            let lo = match after {
                Some(a) if a >= below.as_str() => Bound::Excluded(a),
                _ => Bound::Included(below.as_str()),
            };
            for name in names.range::<str, _>((lo, Bound::Unbounded)).take_while(|n| n.starts_with(&below)).take(limit - taken.min(limit)) {
                out.push((name.clone(), count(name)));
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        out
    }

    /// Holds the delivery gate for writing, as a rejoining connection does, for as long as
    /// the guard lives: every delivery (events and readiness probes) waits meanwhile (tests of
    /// a stuck delivery path).
    #[cfg(test)]
    pub(crate) fn hold_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `channel`'s shard for writing, as a subscription change does (tests).
    #[cfg(test)]
    pub(crate) fn hold(&self, channel: &str) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, Subscribers>> {
        self.shard(channel).channels.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn remove(map: &mut HashMap<Box<str>, Subscribers>, names: &Mutex<BTreeSet<Box<str>>>, conn: &Conn, channel: &str) {
    if let Some(subs) = map.get_mut(channel) {
        subs.remove(conn.id());
        if subs.is_empty() {
            map.remove(channel);
            names.lock().unwrap_or_else(PoisonError::into_inner).remove(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32, path: &str) -> Published {
        let ts = Timestamp::new(1_700_000_000, n).unwrap();
        Published::new(ts, path, None, Line::from_string(format!("@{ts}:{path}:{n}")))
    }

    fn received(rx: &mut tokio::sync::mpsc::Receiver<axum::extract::ws::Message>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(axum::extract::ws::Message::Text(t)) = rx.try_recv() {
            out.push(t.as_str().to_string());
        }
        out
    }

    /// The extended line (`ext=sender`) is built once per event, only when a connection that
    /// asked for it receives the event, and shared by all of them; the others get the original
    /// line.
    #[test]
    fn the_extended_line_is_built_once_and_only_when_wanted() {
        let fanout = FanOut::new();
        let (a, mut rx_a, _) = Conn::new(ConnId(1), 16);
        let (b, mut rx_b, _) = Conn::new(ConnId(2), 16);
        let (c, mut rx_c, _) = Conn::new(ConnId(3), 16);
        let (a, b) = (a.with_senders(true), b.with_senders(true));
        fanout.subscribe(&a, "/x", |_| {});
        fanout.subscribe(&b, "/", |_| {});
        fanout.subscribe(&c, "/x", |_| {});
        let ev = event(1, "/x/y").from(Origin::user("a:b"));
        fanout.deliver(std::slice::from_ref(&ev), |_| {});
        let text = |rx: &mut tokio::sync::mpsc::Receiver<axum::extract::ws::Message>| match rx.try_recv() {
            Ok(axum::extract::ws::Message::Text(t)) => t,
            other => panic!("{other:?}"),
        };
        let (ta, tb, tc) = (text(&mut rx_a), text(&mut rx_b), text(&mut rx_c));
        assert_eq!(ta.as_str(), "@1700000000.000000001~=a%3Ab:/x/y:1");
        assert_eq!(ta.as_str().as_ptr(), tb.as_str().as_ptr(), "one extended line, shared");
        assert_eq!(tc.as_str(), "@1700000000.000000001:/x/y:1");
        assert_eq!(tc.as_str().as_ptr(), ev.line.as_bytes().as_ptr(), "the original line, shared");
        // Nobody who asked for it receives this one (the sender is its only such subscriber).
        let mut own = event(2, "/x").from(Origin::ANONYMOUS);
        own.sender = Some(ConnId(1));
        let other = Published::new(own.ts, "/z", None, own.line.clone()).from(Origin::ANONYMOUS);
        fanout.unsubscribe(&b, "/", |_| {});
        let batch = [own, other];
        fanout.deliver(&batch, |_| {});
        assert_eq!(text(&mut rx_c).as_str(), "@1700000000.000000002:/x:2");
        assert!(rx_a.try_recv().is_err());
        assert!(batch.iter().all(|e| e.extended.get().is_none()), "never built");
    }

    /// A subscription change holds its channel's shard only: delivery to a channel of another
    /// shard goes on meanwhile (with one lock for the whole registry it waited).
    #[test]
    fn churn_on_one_channel_does_not_hold_up_delivery_to_another() {
        let fanout = Arc::new(FanOut::new());
        let quiet = (0..).map(|i| format!("/quiet{i}")).find(|q| shard_of(q) != shard_of("/big")).unwrap();
        let (conn, mut rx, _) = Conn::new(ConnId(1), 16);
        fanout.subscribe(&conn, &quiet, |_| {});
        let held = fanout.hold("/big");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let delivery = {
            let (fanout, quiet) = (fanout.clone(), quiet.clone());
            std::thread::spawn(move || {
                fanout.deliver(&[event(1, &quiet)], |_| {});
                let _ = done_tx.send(());
            })
        };
        let delivered = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        delivery.join().unwrap();
        assert!(delivered.is_ok(), "delivery to {quiet} waited for a subscription change on /big");
        assert_eq!(received(&mut rx).len(), 1);
    }

    /// Subscriptions and unsubscriptions racing with delivery: each gets exactly the matching
    /// events after its position (and up to its end position), in order, none twice, none
    /// missing.
    #[test]
    fn positions_are_exact_while_subscriptions_change_during_delivery() {
        let fanout = Arc::new(FanOut::new());
        let paths = ["/a/x", "/b/y", "/a", "/c", "/b/y/z"];
        let channels = ["/", "/a", "/b", "/a/x", "/c", "/b/y"];
        let events: Vec<Published> = (1..=4000u32).map(|n| event(n, paths[n as usize % paths.len()])).collect();
        let delivery = {
            let (fanout, events) = (fanout.clone(), events.clone());
            std::thread::spawn(move || {
                let mut rest = &events[..];
                let mut k = 0;
                while !rest.is_empty() {
                    k += 1;
                    let n = (1 + k * 7 % 40).min(rest.len());
                    fanout.deliver(&rest[..n], |_| {});
                    rest = &rest[n..];
                }
            })
        };
        let watchers: Vec<_> = (0..4u64)
            .map(|t| {
                let fanout = fanout.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for j in 0..60u64 {
                        let channel = channels[((t * 7 + j) % channels.len() as u64) as usize];
                        let (conn, rx, _) = Conn::new(ConnId(t * 1000 + j), 8192);
                        let mut from = Timestamp::ZERO;
                        fanout.subscribe(&conn, channel, |p| from = p);
                        for _ in 0..(j * 37 % 200) {
                            std::thread::yield_now();
                        }
                        let mut until = None;
                        if j % 2 == 0 {
                            fanout.unsubscribe(&conn, channel, |u| until = Some(u));
                        }
                        out.push((channel, from, until, conn, rx));
                    }
                    out
                })
            })
            .collect();
        let watched: Vec<_> = watchers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        delivery.join().unwrap();
        for (channel, from, until, conn, mut rx) in watched {
            fanout.unsubscribe(&conn, channel, |_| {});
            let want: Vec<String> = events
                .iter()
                .filter(|e| ancestors(&e.path).any(|a| a == channel) && e.ts > from && until.is_none_or(|u| e.ts <= u))
                .map(|e| String::from_utf8(e.line.as_bytes().to_vec()).unwrap())
                .collect();
            assert_eq!(received(&mut rx), want, "{channel} from {from} until {until:?}");
        }
    }

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
