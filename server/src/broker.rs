//! Fan-out: the channel registry and the per-connection outbound queues.
//!
//! [`Broker`] is the narrow interface the protocol code uses, so that a distributed fan-out
//! (Redis) can replace the in-process [`LocalBroker`] for multi-node deployments.
//!
//! Costs: an event's line is encoded once and its bytes are shared by every receiver (a
//! reference-count increment each); bubbling looks up one hash entry per level of the event's
//! path, so it costs the path depth plus the matching subscribers, never the number of
//! channels. Each connection has a bounded queue; a connection whose queue is full is a slow
//! consumer: it is closed (code 4000) and never blocks anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Poll;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::task::AtomicWaker;
use ivy_client_core::Timestamp;
use ivy_client_core::path::ancestors;
use tokio::sync::mpsc;

/// Close code recorded when the queue overflows (see `docs/PROTOCOL.md`).
pub const SLOW_CONSUMER: u16 = ivy_client_core::close_code::SLOW_CONSUMER;

/// How a connection ends: the first close code recorded wins; [`Ending::end`] stops both
/// halves, and the server's shutdown steps stop the reader ([`Ending::stop_reading`]) and then
/// the writer ([`Ending::force`]).
///
/// The halves wait with [`Ending::stopped`], which costs a few atomic operations per poll: a
/// connection's task is polled several times per message, and a `CancellationToken` (a mutex
/// and a `Notify` per wait, shared by every connection for the server-wide signals) cost
/// several percent of the server's CPU time in the durable-publish benchmark.
#[derive(Debug, Default)]
pub struct Ending {
    code: AtomicU16,
    flags: AtomicU8,
    wakers: [AtomicWaker; 2],
}

/// Which half of a connection waits in [`Ending::stopped`] (each half has its own waker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// The task reading commands (and, after it, the lingering read of a closed connection).
    Reader,
    /// The task writing the outbound queue.
    Writer,
}

/// Why a half stops ([`Ending::stopped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// [`Ending::end`]: the connection is over.
    Killed,
    /// [`Ending::stop_reading`]: graceful shutdown, stop reading commands.
    StopReading,
    /// [`Ending::force`]: shutdown's last resort, stop writing too.
    Forced,
}

const KILLED: u8 = 1;
const STOP_READING: u8 = 2;
const FORCED: u8 = 4;

impl Ending {
    /// Records `code` if no code was recorded yet.
    pub fn set(&self, code: u16) {
        let _ = self.code.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records `code` and stops the connection now.
    pub fn end(&self, code: u16) {
        self.set(code);
        self.raise(KILLED);
    }

    /// Stops reading commands (graceful shutdown); queued replies still go out.
    pub fn stop_reading(&self) {
        self.raise(STOP_READING);
    }

    /// Stops writing, even with replies queued (the last step of a shutdown that timed out).
    pub fn force(&self) {
        self.raise(FORCED);
    }

    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        for w in &self.wakers {
            w.wake();
        }
    }

    /// The recorded code (0: none).
    pub fn code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }

    /// Resolves once one of `stops` happened (the first in their order, if several did). Only
    /// one future per [`Half`] may wait at a time (each half has one waker); it can be polled
    /// again after it resolved.
    pub fn stopped<'a>(&'a self, half: Half, stops: &'a [Stop]) -> impl Future<Output = Stop> + 'a {
        std::future::poll_fn(move |cx| {
            self.wakers[half as usize].register(cx.waker());
            // After the registration: a flag raised before it is seen here, one raised after it
            // wakes the new waker.
            let flags = self.flags.load(Ordering::Acquire);
            for &stop in stops {
                let flag = match stop {
                    Stop::Killed => KILLED,
                    Stop::StopReading => STOP_READING,
                    Stop::Forced => FORCED,
                };
                if flags & flag != 0 {
                    return Poll::Ready(stop);
                }
            }
            Poll::Pending
        })
    }
}

/// One connection, as seen by the broker and the sequencer. Dropping the last `Arc<Conn>`
/// closes the outbound queue, which lets the writer finish.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    tx: mpsc::Sender<Message>,
    last_seq: AtomicU64,
    ending: Arc<Ending>,
}

impl Conn {
    /// A connection, the receiving end of its outbound queue of `capacity` messages, and its
    /// ending state (shared with the writer, which must not hold the `Conn`).
    pub fn new(id: u64, capacity: usize) -> (Arc<Conn>, mpsc::Receiver<Message>, Arc<Ending>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let ending = Arc::new(Ending::default());
        let conn = Conn { id, tx, last_seq: AtomicU64::new(0), ending: ending.clone() };
        (Arc::new(conn), rx, ending)
    }

    /// The connection's id, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues a message without waiting. A full queue marks the connection as a slow
    /// consumer and ends it; returns whether the message was queued.
    pub fn push(&self, msg: Message) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.ending.end(SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Waits for a free place in the outbound queue and reserves it for one reply; `None` once
    /// the connection is closed. Replies to a connection's own commands go through reserved
    /// places, so they never overflow its queue: a client that does not read its replies is
    /// slowed down (its commands stop being read) instead of disconnected. Only events can
    /// overflow the queue.
    pub async fn reserve(&self) -> Option<ReplySlot> {
        self.tx.clone().reserve_owned().await.ok().map(ReplySlot)
    }

    /// [`Conn::reserve`] without waiting: `Err(true)` when the queue is full, `Err(false)`
    /// when the connection is closed.
    pub fn try_reserve(&self) -> Result<ReplySlot, bool> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(ReplySlot(permit)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(true),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(false),
        }
    }

    /// Queues a ping unless the queue is full: a full queue means the writer is stuck, and
    /// the next line will close the connection anyway; a ping never makes a slow consumer.
    pub fn push_ping(&self) {
        let _ = self.tx.try_send(Message::Ping(bytes::Bytes::new()));
    }

    /// Queues a text line.
    pub fn push_line(&self, line: Vec<u8>) -> bool {
        self.push(text(line))
    }

    /// How the connection ends.
    pub fn ending(&self) -> &Ending {
        &self.ending
    }
}

/// A text message from a line that is UTF-8 (lines are built from text frames and `&str`).
fn text(line: Vec<u8>) -> Message {
    match String::from_utf8(line) {
        Ok(s) => Message::Text(s.into()),
        Err(e) => Message::Text(String::from_utf8_lossy(e.as_bytes()).into_owned().into()),
    }
}

/// A place reserved in a connection's outbound queue for one reply ([`Conn::reserve`]).
/// Dropping it unused gives the place back.
#[derive(Debug)]
pub struct ReplySlot(mpsc::OwnedPermit<Message>);

impl ReplySlot {
    /// Queues `msg` in the reserved place (never fails; a closed connection drops it).
    pub fn send(self, msg: Message) {
        self.0.send(msg);
    }

    /// Queues a text line in the reserved place.
    pub fn send_line(self, line: Vec<u8>) {
        self.send(text(line));
    }
}

/// An event ready for delivery: stored durably, its line encoded once.
#[derive(Debug, Clone)]
pub struct Published {
    /// Process-local sequence number (dedups deliveries to one connection).
    pub seq: u64,
    /// The event's timestamp.
    pub ts: Timestamp,
    /// Its normalized path.
    pub path: Box<str>,
    /// The sending connection, which does not receive its own event.
    pub sender: Option<u64>,
    /// The encoded line, shared by all receivers.
    pub line: Utf8Bytes,
}

/// Routes published events to subscribed connections.
pub trait Broker: Send + Sync + 'static {
    /// Subscribes `conn` to `channel` (idempotent) and calls `position` with the timestamp
    /// from which live delivery is guaranteed, before any event of the subscription is queued:
    /// every event with a greater timestamp that matches reaches `conn` live, every event up
    /// to it is already in the log.
    fn subscribe(&self, conn: &Arc<Conn>, channel: &str, position: &mut dyn FnMut(Timestamp));
    /// Unsubscribes (idempotent); `position` gets the timestamp after which no event is queued
    /// for this subscription.
    fn unsubscribe(&self, conn: &Arc<Conn>, channel: &str, position: &mut dyn FnMut(Timestamp));
    /// Removes every subscription of a closing connection.
    fn unsubscribe_all(&self, conn: &Arc<Conn>, channels: &mut dyn Iterator<Item = &str>);
    /// Delivers durable events, in timestamp order.
    fn publish(&self, batch: &[Published]);
}

/// The in-process broker.
#[derive(Debug)]
pub struct LocalBroker {
    channels: RwLock<HashMap<Box<str>, Vec<Arc<Conn>>>>,
    last: Mutex<Timestamp>,
}

impl LocalBroker {
    /// A broker whose positions start at `last`, the newest stored event.
    pub fn new(last: Timestamp) -> LocalBroker {
        LocalBroker { channels: RwLock::new(HashMap::new()), last: Mutex::new(last) }
    }

    fn last(&self) -> Timestamp {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Broker for LocalBroker {
    fn subscribe(&self, conn: &Arc<Conn>, channel: &str, position: &mut dyn FnMut(Timestamp)) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let subs = map.entry(channel.into()).or_default();
        if !subs.iter().any(|c| c.id == conn.id) {
            subs.push(conn.clone());
        }
        position(self.last());
    }

    fn unsubscribe(&self, conn: &Arc<Conn>, channel: &str, position: &mut dyn FnMut(Timestamp)) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        remove(&mut map, conn.id, channel);
        position(self.last());
    }

    fn unsubscribe_all(&self, conn: &Arc<Conn>, channels: &mut dyn Iterator<Item = &str>) {
        let mut map = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        for ch in channels {
            remove(&mut map, conn.id, ch);
        }
    }

    fn publish(&self, batch: &[Published]) {
        let Some(newest) = batch.last() else { return };
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        for ev in batch {
            for channel in ancestors(&ev.path) {
                let Some(subs) = map.get(channel) else { continue };
                for c in subs {
                    if ev.sender == Some(c.id) || c.last_seq.swap(ev.seq, Ordering::Relaxed) == ev.seq {
                        continue;
                    }
                    c.push(Message::Text(ev.line.clone()));
                }
            }
        }
        // Under the read lock: a subscribe (write lock) sees either none or all of the batch.
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = newest.ts;
    }
}

fn remove(map: &mut HashMap<Box<str>, Vec<Arc<Conn>>>, id: u64, channel: &str) {
    if let Some(subs) = map.get_mut(channel) {
        if let Some(i) = subs.iter().position(|c| c.id == id) {
            subs.swap_remove(i);
        }
        if subs.is_empty() {
            map.remove(channel);
        }
    }
}
