//! One WebSocket connection as the rest of the server sees it, and the registry of them.
//!
//! - [`Conn`]: the bounded outbound queue of a connection (what the fan-out pushes events
//!   into) and its [`Ending`];
//! - [`Ending`]: how the connection ends, split once into a [`ReaderStop`] and a
//!   [`WriterStop`], one per half of the connection task;
//! - [`ReplySlot`]: a place reserved in the queue for one reply;
//! - [`Connections`]: the open connections, their limit, and the shutdown signals they get.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::task::AtomicWaker;
use ivy_client_core::Timestamp;
use tokio::sync::mpsc;

use crate::fanout::ConnId;

/// The close codes the server sends (`docs/PROTOCOL.md` section 7): one definition, in the
/// protocol core.
pub use ivy_client_core::close_code;

/// Recorded when the peer closed or vanished: nothing more to send.
pub(crate) const PEER_GONE: u16 = 1;

/// How a connection ends: the first close code recorded wins; [`Ending::end`] stops both
/// halves, and the server's shutdown steps stop the reader ([`Ending::stop_reading`]) and then
/// the writer ([`Ending::force`]).
///
/// The halves wait on it through their [`ReaderStop`] and [`WriterStop`], which cost a few
/// atomic operations per poll: a connection's task is polled several times per message, and a
/// `CancellationToken` (a mutex and a `Notify` per wait, shared by every connection for the
/// server-wide signals) cost several percent of the server's CPU time in the durable-publish
/// benchmark.
#[derive(Debug, Default)]
pub(crate) struct Ending {
    code: AtomicU16,
    flags: AtomicU8,
    /// One waker per half: the reader's, the writer's.
    wakers: [AtomicWaker; 2],
    split: AtomicBool,
}

/// Why a half stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// [`Ending::end`]: the connection is over.
    Killed,
    /// [`Ending::stop_reading`]: graceful shutdown, stop reading commands.
    Shutdown,
    /// [`Ending::force`]: shutdown's last resort, stop writing too.
    Forced,
}

impl Stop {
    const fn flag(self) -> u8 {
        match self {
            Stop::Killed => 1,
            Stop::Shutdown => 2,
            Stop::Forced => 4,
        }
    }
}

impl Ending {
    /// Records `code` if no code was recorded yet.
    pub(crate) fn set(&self, code: u16) {
        let _ = self.code.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records `code` and stops the connection now.
    pub(crate) fn end(&self, code: u16) {
        self.set(code);
        self.raise(Stop::Killed);
    }

    /// Stops reading commands (graceful shutdown); queued replies still go out.
    pub(crate) fn stop_reading(&self) {
        self.raise(Stop::Shutdown);
    }

    /// Stops writing, even with replies queued (the last step of a shutdown that timed out).
    pub(crate) fn force(&self) {
        self.raise(Stop::Forced);
    }

    fn raise(&self, stop: Stop) {
        self.flags.fetch_or(stop.flag(), Ordering::AcqRel);
        for w in &self.wakers {
            w.wake();
        }
    }

    /// The recorded code (0: none).
    pub(crate) fn code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }

    /// The two waiting ends, one for each half of the connection; `None` after the first call,
    /// so that each waker has exactly one owner.
    pub(crate) fn halves(self: &Arc<Self>) -> Option<(ReaderStop, WriterStop)> {
        if self.split.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some((ReaderStop(HalfStop { ending: self.clone(), half: 0 }), WriterStop(HalfStop { ending: self.clone(), half: 1 })))
    }
}

#[derive(Debug)]
struct HalfStop {
    ending: Arc<Ending>,
    half: usize,
}

impl HalfStop {
    fn stopped<'a>(&'a mut self, stops: &'a [Stop]) -> impl Future<Output = Stop> + 'a {
        std::future::poll_fn(move |cx| {
            let ending = &self.ending;
            ending.wakers[self.half].register(cx.waker());
            // After the registration: a flag raised before it is seen here, one raised after it
            // wakes the new waker.
            let flags = ending.flags.load(Ordering::Acquire);
            match stops.iter().find(|s| flags & s.flag() != 0) {
                Some(&stop) => Poll::Ready(stop),
                None => Poll::Pending,
            }
        })
    }
}

/// The reading half's wait for its end. Not `Clone`, and [`ReaderStop::stopped`] borrows it
/// mutably: one waiter at a time, which is what its single waker allows.
#[derive(Debug)]
pub(crate) struct ReaderStop(HalfStop);

/// The writing half's wait for its end (see [`ReaderStop`]).
#[derive(Debug)]
pub(crate) struct WriterStop(HalfStop);

impl ReaderStop {
    /// Resolves once one of `stops` happened (the first in their order, if several did); can
    /// be polled again after it resolved.
    pub(crate) fn stopped<'a>(&'a mut self, stops: &'a [Stop]) -> impl Future<Output = Stop> + 'a {
        self.0.stopped(stops)
    }

    /// The shared ending.
    pub(crate) fn ending(&self) -> &Ending {
        &self.0.ending
    }
}

impl WriterStop {
    /// See [`ReaderStop::stopped`].
    pub(crate) fn stopped<'a>(&'a mut self, stops: &'a [Stop]) -> impl Future<Output = Stop> + 'a {
        self.0.stopped(stops)
    }
}

/// One connection, as seen by the fan-out. Dropping the last `Arc<Conn>` closes the outbound
/// queue, which lets the writer finish.
#[derive(Debug)]
pub(crate) struct Conn {
    id: ConnId,
    tx: mpsc::Sender<Message>,
    /// The timestamp (in nanoseconds) of the last event queued: an event that reaches the
    /// connection through several of its subscriptions is queued once (events are delivered in
    /// timestamp order, so the last one is enough).
    last_event: AtomicU64,
    ending: Arc<Ending>,
}

impl Conn {
    /// A connection, the receiving end of its outbound queue of `capacity` messages, and its
    /// ending state (shared with the writer, which must not hold the `Conn`).
    pub(crate) fn new(id: ConnId, capacity: usize) -> (Arc<Conn>, mpsc::Receiver<Message>, Arc<Ending>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let ending = Arc::new(Ending::default());
        let conn = Conn { id, tx, last_event: AtomicU64::new(0), ending: ending.clone() };
        (Arc::new(conn), rx, ending)
    }

    /// The connection's id, unique in this process.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    /// Queues the event at `ts` unless it was the last one queued. A full queue marks the
    /// connection as a slow consumer and ends it.
    pub(crate) fn push_event(&self, ts: Timestamp, line: &Utf8Bytes) {
        // Nanoseconds since the epoch fit a u64 until the year 2554.
        let nanos = u64::try_from(ts.as_nanos()).unwrap_or(u64::MAX);
        if self.last_event.swap(nanos, Ordering::Relaxed) == nanos {
            return;
        }
        match self.tx.try_send(Message::Text(line.clone())) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.ending.end(close_code::SLOW_CONSUMER),
        }
    }

    /// Waits for a free place in the outbound queue and reserves it for one reply; `None` once
    /// the connection is closed. Replies to a connection's own commands go through reserved
    /// places, so they never overflow its queue: a client that does not read its replies is
    /// slowed down (its commands stop being read) instead of disconnected. Only events can
    /// overflow the queue.
    pub(crate) async fn reserve(&self) -> Option<ReplySlot> {
        self.tx.clone().reserve_owned().await.ok().map(ReplySlot)
    }

    /// [`Conn::reserve`] without waiting: `Err(true)` when the queue is full, `Err(false)`
    /// when the connection is closed.
    pub(crate) fn try_reserve(&self) -> Result<ReplySlot, bool> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(ReplySlot(permit)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(true),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(false),
        }
    }

    /// Queues a ping unless the queue is full: a full queue means the writer is stuck, and
    /// the next line will close the connection anyway; a ping never makes a slow consumer.
    pub(crate) fn push_ping(&self) {
        let _ = self.tx.try_send(Message::Ping(bytes::Bytes::new()));
    }

    /// How the connection ends.
    pub(crate) fn ending(&self) -> &Ending {
        &self.ending
    }
}

/// A text message from a line that is UTF-8 (lines are built from text frames and `&str`).
pub(crate) fn text(line: Vec<u8>) -> Message {
    match String::from_utf8(line) {
        Ok(s) => Message::Text(s.into()),
        Err(e) => Message::Text(String::from_utf8_lossy(e.as_bytes()).into_owned().into()),
    }
}

/// A place reserved in a connection's outbound queue for one reply ([`Conn::reserve`]).
/// Dropping it unused gives the place back.
#[derive(Debug)]
pub(crate) struct ReplySlot(mpsc::OwnedPermit<Message>);

impl ReplySlot {
    /// Queues `msg` in the reserved place (never fails; a closed connection drops it).
    pub(crate) fn send(self, msg: Message) {
        self.0.send(msg);
    }

    /// Queues a text line in the reserved place.
    pub(crate) fn send_line(self, line: Vec<u8>) {
        self.send(text(line));
    }
}

/// The open WebSocket connections: their number (bounded by `--max-connections`), their ids,
/// and their [`Ending`]s, so that the server-wide shutdown signals reach each connection's own
/// (cheap to wait on) signal. Touched when a connection is admitted and when it closes, never
/// per message. A slab: places are reused.
#[derive(Debug)]
pub(crate) struct Connections {
    max: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    stopping: AtomicBool,
    forced: AtomicBool,
    slab: Mutex<Slab>,
}

#[derive(Debug, Default)]
struct Slab {
    places: Vec<Option<Arc<Ending>>>,
    free: Vec<usize>,
}

/// A connection's place among the [`Connections`]: taken at the handshake (it counts towards
/// the limit), given the connection's [`Ending`] once it runs, and given back when dropped
/// (when the connection ends, or when the upgrade never completes).
#[derive(Debug)]
pub(crate) struct Slot {
    connections: Arc<Connections>,
    place: Option<usize>,
}

impl Connections {
    pub(crate) fn new(max: usize) -> Connections {
        Connections {
            max,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            slab: Mutex::default(),
        }
    }

    /// The connection limit.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// How many connections are open (or being upgraded).
    pub(crate) fn len(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Takes a place for a new connection, unless the limit is reached.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Slot> {
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1)).ok()?;
        Some(Slot { connections: self.clone(), place: None })
    }

    /// A fresh connection id.
    pub(crate) fn next_id(&self) -> ConnId {
        ConnId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Graceful shutdown, first step: every connection, open or opening later, stops reading.
    pub(crate) fn stop_reading(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.each(Ending::stop_reading);
    }

    /// Graceful shutdown, last resort: every connection stops writing too.
    pub(crate) fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
        self.each(Ending::force);
    }

    fn each(&self, f: fn(&Ending)) {
        for ending in self.slab.lock().unwrap_or_else(PoisonError::into_inner).places.iter().flatten() {
            f(ending);
        }
    }
}

impl Slot {
    /// Registers the running connection's `ending`; it gets the shutdown signals already
    /// given.
    pub(crate) fn register(&mut self, ending: &Arc<Ending>) {
        let connections = &self.connections;
        let place = {
            let mut slab = connections.slab.lock().unwrap_or_else(PoisonError::into_inner);
            match slab.free.pop() {
                Some(place) => {
                    slab.places[place] = Some(ending.clone());
                    place
                }
                None => {
                    slab.places.push(Some(ending.clone()));
                    slab.places.len() - 1
                }
            }
        };
        self.place = Some(place);
        // After the insertion: a signal given before it is seen here, one given after it finds
        // the connection in the slab.
        if connections.stopping.load(Ordering::SeqCst) {
            ending.stop_reading();
        }
        if connections.forced.load(Ordering::SeqCst) {
            ending.force();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(place) = self.place {
            let mut slab = self.connections.slab.lock().unwrap_or_else(PoisonError::into_inner);
            slab.places[place] = None;
            slab.free.push(place);
        }
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
    }
}
