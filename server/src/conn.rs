//! One WebSocket connection as the rest of the server sees it, and the registry of them.
//!
//! - [`Conn`]: the bounded outbound queue of a connection (what the fan-out pushes events
//!   into) and its [`Ending`];
//! - [`Outbox`]: the queue's state shared with the writer: its bytes, and what a connection
//!   whose queue overflowed owes from the log (it is *behind* until its writer caught up);
//! - [`Ending`]: how the connection ends, split once into a [`ReaderStop`] and a
//!   [`WriterStop`], one per half of the connection task;
//! - [`ReplySlot`]: a place reserved in the queue for one reply;
//! - [`Connections`]: the open connections, their limit, and the shutdown signals they get.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::task::AtomicWaker;
use ivy_client_core::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::budget::{Budget, SHED_QUEUE_BYTES};
use crate::fanout::ConnId;

/// The close codes the server sends (`docs/PROTOCOL.md` section 7): one definition, in the
/// protocol core.
pub use ivy_client_core::close_code;

/// Recorded when the peer closed or vanished: nothing more to send.
pub(crate) const PEER_GONE: u16 = 1;
/// Recorded when the connection's token was revoked (`POST /admin/revoke`): closed with 4003
/// (the client's remedy is the expired token's: a fresh token), with its own reason.
pub(crate) const REVOKED: u16 = 2;

/// Who a connection is (its token's principal, replaced at each in-band refresh), for the
/// admin endpoints that close connections by `sub` or by token id. Read and written rarely
/// (at the start, at a refresh, by an admin request), never per message.
#[derive(Debug, Default)]
pub(crate) struct Who(Mutex<Option<Arc<crate::auth::Principal>>>);

impl Who {
    /// The connection's principal from now on.
    pub(crate) fn set(&self, principal: Option<Arc<crate::auth::Principal>>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = principal;
    }

    /// Whether the connection has a principal (a token) and it matches `f`.
    pub(crate) fn matches(&self, f: impl Fn(&crate::auth::Principal) -> bool) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).as_deref().is_some_and(f)
    }
}

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
    /// Whether it asked for the extended event lines (`ext=sender`).
    senders: bool,
    tx: mpsc::Sender<Message>,
    out: Arc<Outbox>,
    ending: Arc<Ending>,
    /// Who it is (for the admin endpoints).
    who: Arc<Who>,
}

/// Most timestamps of its own events a connection records while it is behind (to leave them
/// out of what it reads from the log); beyond, it is closed as a slow consumer.
const MAX_OWN_WHILE_BEHIND: usize = 64 * 1024;
/// Most subscriptions a connection removes while it is behind (each a window of the log to
/// read); beyond, it is closed as a slow consumer.
const MAX_ENDED_WHILE_BEHIND: usize = 4096;

/// A connection's outbound state shared by everything that queues lines for it (the fan-out,
/// the engine completing its sends, its reader) and by its writer, which does not hold the
/// [`Conn`].
///
/// **Behind.** Every event is in the log before it is delivered, so an event that finds the
/// queue full (in lines, `--queue-length`, or in bytes, `--queue-bytes`) is not lost: the
/// connection is marked behind from that event on, the fan-out stops queueing its events, and
/// its writer, once it has written the queue, reads what it missed from the log
/// ([`Outbox::rejoin`]) and writes exactly the lines live delivery would have: the events of
/// its subscriptions, each once, in order, without its own, with the replies that came meanwhile
/// held back to their places ([`Held`]). A connection that stays behind for a whole
/// `--ping-interval` is closed with 4000.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Bytes of the text lines in the queue.
    bytes: AtomicUsize,
    /// The most bytes of events the queue takes (an event is always taken by an empty queue).
    max_bytes: usize,
    /// The timestamp (in nanoseconds) of the last event offered: an event that reaches the
    /// connection through several of its subscriptions is queued once (events are delivered in
    /// timestamp order, so the last one is enough).
    last_event: AtomicU64,
    /// Whether the connection is behind (its live events are not queued); changed under `lag`,
    /// and only while the fan-out is delivering (set) or quiet (cleared), so that the fan-out
    /// reads it without the lock.
    behind: AtomicBool,
    lag: Mutex<Lag>,
    /// The writer's waker, woken when the connection falls behind (its queue may be empty:
    /// places reserved for replies count as full).
    writer: AtomicWaker,
    budget: Arc<Budget>,
}

/// What catching up needs (see [`Outbox`]).
#[derive(Debug, Default)]
struct Lag {
    /// The connection's subscriptions and their positions.
    subs: HashMap<Arc<str>, Timestamp>,
    /// From the fall behind until a catch-up round ends caught up (boxed: most connections
    /// never need it).
    behind: Option<Box<Behind>>,
}

/// The state of a connection behind (see [`Lag`]).
#[derive(Debug)]
struct Behind {
    /// The events after this timestamp are owed from the log (while behind).
    after: Timestamp,
    /// Since when the connection is behind; kept through catch-up rounds until one ends
    /// caught up.
    since: Instant,
    /// Replies that came while behind, in order.
    held: VecDeque<Held>,
    /// The connection's own events since it fell behind, ascending.
    own: Vec<Timestamp>,
    /// Subscriptions removed while behind: (channel, position, end position).
    ended: Vec<(Arc<str>, Timestamp, Timestamp)>,
}

impl Lag {
    /// The state behind (only while the connection is behind or catching up).
    fn behind(&mut self) -> &mut Behind {
        self.behind.get_or_insert_with(|| {
            Box::new(Behind { after: Timestamp::ZERO, since: Instant::now(), held: VecDeque::new(), own: Vec::new(), ended: Vec::new() })
        })
    }
}

/// A reply held back while its connection is behind: it goes out after every event up to `pos`
/// and before any later one, as it would have live.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) pos: Timestamp,
    /// Its place in the queue, kept so that held replies count against `--queue-length`.
    pub(crate) _place: mpsc::OwnedPermit<Message>,
    pub(crate) msg: Message,
}

/// What a connection owes from the log when it rejoins live delivery ([`Outbox::rejoin`]).
#[derive(Debug)]
pub(crate) struct Rejoin {
    /// Events after this one...
    pub(crate) after: Timestamp,
    /// ...up to this one (the fan-out's position when it rejoined) are read from the log.
    pub(crate) until: Timestamp,
    /// The windows of the log it is owed: (channel, after, up to), each non-empty.
    pub(crate) windows: Vec<(Arc<str>, Timestamp, Timestamp)>,
    /// Its own events in that range, ascending: left out.
    pub(crate) own: Vec<Timestamp>,
    /// The replies to write at their places.
    pub(crate) held: VecDeque<Held>,
}

fn nanos(ts: Timestamp) -> u64 {
    // Nanoseconds since the epoch fit a u64 until the year 2554.
    u64::try_from(ts.as_nanos()).unwrap_or(u64::MAX)
}

impl Conn {
    /// A connection, the receiving end of its outbound queue of `capacity` messages, and its
    /// ending state (shared with the writer, which must not hold the `Conn`); no byte limit.
    #[cfg(test)]
    pub(crate) fn new(id: ConnId, capacity: usize) -> (Arc<Conn>, mpsc::Receiver<Message>, Arc<Ending>) {
        Conn::with_limits(id, capacity, usize::MAX, Budget::new(0))
    }

    /// A connection whose queue holds `capacity` lines and `max_bytes` bytes of events, its
    /// event lines and catch-up pages counted in `budget`.
    pub(crate) fn with_limits(
        id: ConnId,
        capacity: usize,
        max_bytes: usize,
        budget: Arc<Budget>,
    ) -> (Arc<Conn>, mpsc::Receiver<Message>, Arc<Ending>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let ending = Arc::new(Ending::default());
        let out = Arc::new(Outbox {
            bytes: AtomicUsize::new(0),
            max_bytes: max_bytes.max(1),
            last_event: AtomicU64::new(0),
            behind: AtomicBool::new(false),
            lag: Mutex::default(),
            writer: AtomicWaker::new(),
            budget,
        });
        let conn = Conn { id, senders: false, tx, out, ending: ending.clone(), who: Arc::default() };
        (Arc::new(conn), rx, ending)
    }

    /// Makes the connection receive the extended event lines (`ext=sender`), before it is
    /// shared.
    pub(crate) fn with_senders(mut self: Arc<Self>, senders: bool) -> Arc<Conn> {
        match Arc::get_mut(&mut self) {
            Some(c) => c.senders = senders,
            None => debug_assert!(false, "with_senders on a shared connection"),
        }
        self
    }

    /// Whether the connection receives the extended event lines (`ext=sender`).
    pub(crate) fn senders(&self) -> bool {
        self.senders
    }

    /// The connection's id, unique in this process.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    /// The outbound state, for the writer.
    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.out
    }

    /// Queues the event at `ts` unless it was the last one offered. An event that does not fit
    /// (`shed`: the server's memory budget is used up, the queue takes less) makes the
    /// connection fall behind: it is read from the log later. Called by the fan-out only;
    /// whether the event was queued (for the delivery count). Inlined into the fan-out's
    /// loop, as it was before it returned the flag (a call per delivery measured about 18
    /// instructions per delivery, 1.5% of the fan-out's total, under callgrind).
    #[inline]
    pub(crate) fn push_event(&self, ts: Timestamp, line: &Utf8Bytes, shed: bool) -> bool {
        let out = &*self.out;
        let n = nanos(ts);
        if out.last_event.swap(n, Ordering::Relaxed) == n || out.behind.load(Ordering::Relaxed) {
            return false;
        }
        let len = line.len();
        let max = if shed { out.max_bytes.min(SHED_QUEUE_BYTES) } else { out.max_bytes };
        // Counted before it is queued: the writer may take it at once.
        let queued = out.bytes.fetch_add(len, Ordering::Relaxed);
        if queued > 0 && queued + len > max {
            out.bytes.fetch_sub(len, Ordering::Relaxed);
            self.fall_behind(ts);
            return false;
        }
        match self.tx.try_send(Message::Text(line.clone())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                out.bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                out.bytes.fetch_sub(len, Ordering::Relaxed);
                self.fall_behind(ts);
                false
            }
        }
    }

    /// Queues a presence line (`^...`: never stored, so never read from the log): `false` when
    /// the queue cannot take it (in lines or in bytes, as for an event), and the caller closes
    /// the connection as a slow consumer.
    pub(crate) fn push_presence(&self, line: &Utf8Bytes) -> bool {
        let out = &*self.out;
        let len = line.len();
        let queued = out.bytes.fetch_add(len, Ordering::Relaxed);
        if queued > 0 && queued + len > out.max_bytes {
            out.bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(Message::Text(line.clone())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                out.bytes.fetch_sub(len, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                out.bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }

    /// From the event at `ts` on, the connection's events are read from the log.
    fn fall_behind(&self, ts: Timestamp) {
        let out = &*self.out;
        let mut lag = out.lag.lock().unwrap_or_else(PoisonError::into_inner);
        lag.behind().after = ts.prev();
        out.behind.store(true, Ordering::Release);
        drop(lag);
        tracing::debug!(conn = %self.id, at = %ts, "queue full: catching up from the log");
        // The writer checks for this whenever it has written the queue; it may have checked
        // just before, and be waiting for a message.
        out.writer.wake();
    }

    /// The connection's own event at `ts` passed its subscriptions (it is not delivered to it):
    /// recorded while behind, so that reading the log leaves it out. Called by the fan-out only.
    pub(crate) fn own_event(&self, ts: Timestamp) {
        let out = &*self.out;
        if !out.behind.load(Ordering::Relaxed) {
            return;
        }
        let mut lag = out.lag.lock().unwrap_or_else(PoisonError::into_inner);
        let own = &mut lag.behind().own;
        if own.last() != Some(&ts) {
            own.push(ts);
        }
        if own.len() > MAX_OWN_WHILE_BEHIND {
            self.ending.end(close_code::SLOW_CONSUMER);
        }
    }

    /// The subscription to `channel` holds from `position` (under the fan-out's lock).
    pub(crate) fn subscribed(&self, channel: &str, position: Timestamp) {
        let mut lag = self.out.lag.lock().unwrap_or_else(PoisonError::into_inner);
        if !lag.subs.contains_key(channel) {
            lag.subs.insert(channel.into(), position);
        }
    }

    /// The subscription to `channel` ended at `position` (under the fan-out's lock).
    pub(crate) fn unsubscribed(&self, channel: &str, position: Timestamp) {
        let mut lag = self.out.lag.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((ch, from)) = lag.subs.remove_entry(channel) {
            if self.out.behind.load(Ordering::Relaxed) {
                let ended = &mut lag.behind().ended;
                ended.push((ch, from, position));
                if ended.len() > MAX_ENDED_WHILE_BEHIND {
                    self.ending.end(close_code::SLOW_CONSUMER);
                }
            }
        }
    }

    /// Since when the connection is behind, if it is.
    pub(crate) fn behind_since(&self) -> Option<Instant> {
        self.out.lag.lock().unwrap_or_else(PoisonError::into_inner).behind.as_ref().map(|b| b.since)
    }

    /// Waits for a free place in the outbound queue and reserves it for one reply; `None` once
    /// the connection is closed. Replies to a connection's own commands go through reserved
    /// places, so they never overflow its queue: a client that does not read its replies is
    /// slowed down (its commands stop being read) instead of disconnected.
    pub(crate) async fn reserve(&self) -> Option<ReplySlot> {
        let permit = self.tx.clone().reserve_owned().await.ok()?;
        Some(ReplySlot { permit, out: self.out.clone() })
    }

    /// [`Conn::reserve`] without waiting: `Err(true)` when the queue is full, `Err(false)`
    /// when the connection is closed.
    pub(crate) fn try_reserve(&self) -> Result<ReplySlot, bool> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(ReplySlot { permit, out: self.out.clone() }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(true),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(false),
        }
    }

    /// Queues a ping unless the queue is full: a full queue means the writer is busy, and a
    /// ping never makes a slow consumer.
    pub(crate) fn push_ping(&self) {
        let _ = self.tx.try_send(Message::Ping(bytes::Bytes::new()));
    }

    /// How the connection ends.
    pub(crate) fn ending(&self) -> &Ending {
        &self.ending
    }

    /// Who the connection is (its token's principal).
    pub(crate) fn who(&self) -> &Arc<Who> {
        &self.who
    }
}

impl Outbox {
    /// Whether the connection is behind (the writer then catches up).
    pub(crate) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Resolves once the connection is behind: what the writer waits for besides its queue
    /// (a few atomic operations per wait, as [`WriterStop::stopped`]).
    pub(crate) fn fell_behind(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.writer.register(cx.waker());
            // After the registration: a fall seen here, or one after it wakes the new waker.
            if self.behind.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    /// Bytes of the text lines in the queue now.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The writer took queued text lines of `len` bytes in all.
    pub(crate) fn written(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// The server's memory budget.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Queues `msg` in its reserved place, or holds it back to `pos` (`None`: after the events
    /// offered so far) while the connection is behind.
    fn reply(&self, place: mpsc::OwnedPermit<Message>, msg: Message, pos: Option<Timestamp>) {
        if self.behind.load(Ordering::Acquire) {
            let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked again under the lock: the writer rejoins under it.
            if self.behind.load(Ordering::Relaxed) {
                let offered = Timestamp::from_nanos(u128::from(self.last_event.load(Ordering::Relaxed)));
                let held = &mut lag.behind().held;
                let after_held = held.back().map_or(Timestamp::ZERO, |h| h.pos);
                let pos = pos.unwrap_or(offered).max(after_held);
                held.push_back(Held { pos, _place: place, msg });
                return;
            }
        }
        if let Message::Text(t) = &msg {
            self.bytes.fetch_add(t.len(), Ordering::Relaxed);
        }
        place.send(msg);
    }

    /// Rejoins live delivery at `until`, the fan-out's position, taken while no event is being
    /// delivered (under the fan-out's lock): every later event is queued live again, and the
    /// returned [`Rejoin`] says what to read from the log before the queue.
    pub(crate) fn rejoin(&self, until: Timestamp) -> Rejoin {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        self.behind.store(false, Ordering::Release);
        let lag = &mut *lag;
        let behind = lag.behind();
        let after = behind.after;
        let (own, held, ended) = (std::mem::take(&mut behind.own), std::mem::take(&mut behind.held), std::mem::take(&mut behind.ended));
        let mut windows: Vec<(Arc<str>, Timestamp, Timestamp)> =
            lag.subs.iter().map(|(ch, from)| (ch.clone(), (*from).max(after), until)).collect();
        windows.extend(ended.into_iter().map(|(ch, from, end)| (ch, from.max(after), end.min(until))));
        windows.retain(|(_, from, to)| from < to);
        Rejoin { after, until, windows, own, held }
    }

    /// A catch-up round ended; if the connection did not fall behind again meanwhile, it has
    /// caught up.
    pub(crate) fn round_done(&self) {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.behind.load(Ordering::Relaxed) {
            lag.behind = None;
        }
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
pub(crate) struct ReplySlot {
    permit: mpsc::OwnedPermit<Message>,
    out: Arc<Outbox>,
}

impl ReplySlot {
    /// Queues `msg` in the reserved place (never fails; a closed connection drops it).
    pub(crate) fn send(self, msg: Message) {
        self.out.reply(self.permit, msg, None);
    }

    /// Queues a text line in the reserved place.
    pub(crate) fn send_line(self, line: Vec<u8>) {
        self.send(text(line));
    }

    /// Queues a text line that belongs right after the events up to `pos` (an ack of a send at
    /// `pos`, of a subscription that holds from `pos`).
    pub(crate) fn send_line_at(self, pos: Timestamp, line: Vec<u8>) {
        self.out.reply(self.permit, text(line), Some(pos));
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

/// A registered connection: how it ends, its outbound state, who it is.
type Place = (Arc<Ending>, Arc<Outbox>, Arc<Who>);

#[derive(Debug, Default)]
struct Slab {
    places: Vec<Option<Place>>,
    free: Vec<usize>,
}

/// The outbound queues, sampled for `/metrics` ([`Connections::queues`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Queues {
    /// Bytes queued, summed over the connections.
    pub(crate) bytes: usize,
    /// The most one connection has queued.
    pub(crate) max_bytes: usize,
    /// Connections behind (catching up from the log).
    pub(crate) behind: usize,
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
        for (ending, ..) in self.slab.lock().unwrap_or_else(PoisonError::into_inner).places.iter().flatten() {
            f(ending);
        }
    }

    /// Ends with `code` every open connection whose principal matches `which`; how many.
    pub(crate) fn end_where(&self, which: impl Fn(&crate::auth::Principal) -> bool, code: u16) -> usize {
        let slab = self.slab.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for (ending, _, who) in slab.places.iter().flatten() {
            if ending.code() == 0 && who.matches(&which) {
                ending.end(code);
                n += 1;
            }
        }
        n
    }

    /// The outbound queues now (for `/metrics`; under the slab's lock, which only
    /// connections opening and closing take).
    pub(crate) fn queues(&self) -> Queues {
        let slab = self.slab.lock().unwrap_or_else(PoisonError::into_inner);
        slab.places.iter().flatten().fold(Queues::default(), |q, (_, out, _)| {
            let n = out.queued_bytes();
            Queues { bytes: q.bytes + n, max_bytes: q.max_bytes.max(n), behind: q.behind + usize::from(out.is_behind()) }
        })
    }
}

impl Slot {
    /// Registers the running connection's `ending` and its outbound state `out` (sampled for
    /// `/metrics`); it gets the shutdown signals already given.
    pub(crate) fn register(&mut self, ending: &Arc<Ending>, out: &Arc<Outbox>, who: &Arc<Who>) {
        let connections = &self.connections;
        let place = {
            let mut slab = connections.slab.lock().unwrap_or_else(PoisonError::into_inner);
            match slab.free.pop() {
                Some(place) => {
                    slab.places[place] = Some((ending.clone(), out.clone(), who.clone()));
                    place
                }
                None => {
                    slab.places.push(Some((ending.clone(), out.clone(), who.clone())));
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
