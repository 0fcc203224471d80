//! The single-node engine: one sequencer thread, a clock, and a [`Storage`] (sled or memory).
//!
//! # The sequencer
//!
//! One thread stamps, stores and delivers every event, in order. Group commit: it takes every
//! request waiting in the queue (up to a batch limit), gives them consecutive timestamps,
//! appends them to the storage in one atomic batch, makes the batch as durable as the storage
//! promises with one flush ([`Storage::commit`]), raises the visible mark, and only then hands
//! the events to the fan-out, completing each request right after its event (so a sender's
//! ack precedes, on its connection, every event with a later timestamp). Concurrent senders share each
//! flush, so throughput grows with concurrency instead of staying at one flush per event.
//!
//! # Timestamps
//!
//! [`Clock`]: an event's timestamp is `max(wall clock, previous + 1 ns)`. At startup the clock
//! resumes after the newest stored event and after the storage's clock floor.
//!
//! Clock floor: when the storage acknowledges events before they are durable (sled with
//! `--durability async`, where an acknowledged event can still be lost in a crash), the clock
//! gets a limit; a batch whose timestamps would go above it first records a new floor in the
//! storage, durably, one second ahead of what it needs, so a restart after a crash never hands
//! out the timestamp of a lost event again, at the cost of one extra flush per second of
//! timestamps. A graceful stop records the clock's exact position.
//!
//! # The three marks
//!
//! handed out ([`Clock::last`]) ≥ visible to log readers ([`Watermark`], raised after the
//! batch is committed) ≥ delivered (the fan-out's position, raised by [`FanOut::deliver`]
//! after the visible mark). A subscriber's position is therefore always in the log.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use ivy_client_core::Timestamp;
use ivy_client_core::path::ROOT;
use ivy_client_core::wire::encode_event;

use super::clock::Clock;
use super::idempotency::{self, Keys};
use super::{
    BoxFuture, ChannelsRequest, Context, DeleteRequest, Direction, Engine, Horizon, Page, Publish, PublishError, ReadRequest, Requests,
    Retention, Revocation, StoredChannel,
};
use crate::fanout::{FanOut, Published};

pub use super::clock::WallClock;

/// Most events in one group commit.
const MAX_BATCH: usize = 4096;
/// Most bytes one group commit stores, counting what the store keeps of each event
/// ([`stored_cost`]).
const MAX_BATCH_STORED_BYTES: usize = 16 << 20;
/// Most log entries one group commit writes (an event is one entry per level of its path).
const MAX_BATCH_ENTRIES: usize = 64 * 1024;

/// What the store keeps of an event of `data` bytes on `path`, at most: its log entries (one
/// per level of its path) and their bytes (the line once, 16 bytes per level, and the copies
/// of a short line on a shallow path: see [`super::sled`]'s layout). The memory store keeps
/// less (the line once, and a position per level).
pub(crate) fn stored_cost(path: &str, data: usize) -> (usize, usize) {
    // The line: the data (escaping aside), the path and about 32 bytes of timestamp and colons.
    super::sled::stored(ivy_client_core::path::depth(path), data.saturating_add(path.len()).saturating_add(32))
}

/// What storing `r` costs: its log entries and the bytes they hold.
fn cost(r: &Publish) -> (usize, usize) {
    stored_cost(&r.path, r.data.len().saturating_add(r.origin.wire().len()).saturating_add(r.id.as_ref().map_or(0, |id| 1 + id.len())))
}
/// How far beyond the timestamps it needs a new clock floor is recorded.
const FLOOR_AHEAD_NANOS: u128 = 1_000_000_000;

/// One event to append.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    /// Its timestamp (unique, greater than every stored one).
    pub(crate) ts: Timestamp,
    /// Its normalized path.
    pub(crate) path: &'a str,
    /// The encoded event line.
    pub(crate) line: &'a [u8],
    /// Its sender.
    pub(crate) origin: &'a super::Origin,
    /// Its send id, if it has one (stored with it by a store that keeps ids).
    pub(crate) id: Option<&'a [u8]>,
}

/// What [`Storage::scan`] calls for each event: its timestamp, its line and its sender's wire
/// form (`?` for an event stored before senders were).
pub(crate) type Visit<'a> = dyn FnMut(Timestamp, &[u8], &[u8]) -> ControlFlow<()> + 'a;

/// What [`Storage::ids`] calls for each event with an id: its timestamp, its sender's wire form
/// and its id.
pub(crate) type VisitId<'a> = dyn FnMut(Timestamp, &[u8], &[u8]) + 'a;

/// What the single-node engine stores in: sled ([`super::sled`]) or memory
/// ([`super::memory`]). Called from the sequencer thread (writes) and tokio's blocking pool
/// (reads), never from an async task.
pub(crate) trait Storage: Send + Sync + 'static {
    /// Appends events atomically (all or none), in timestamp order.
    fn append(&self, records: &[Record<'_>]) -> io::Result<()>;
    /// Makes the appended events as durable as the storage promises before their acks (sled
    /// with sync durability: flush and fsync; otherwise nothing).
    fn commit(&self) -> io::Result<()>;
    /// Whether an acknowledged event can still be lost in a crash (then the clock needs a
    /// durable floor).
    fn acks_before_durable(&self) -> bool;
    /// Makes everything appended durable (the final flush).
    fn flush(&self) -> io::Result<()>;
    /// The newest stored timestamp.
    fn last_timestamp(&self) -> io::Result<Option<Timestamp>>;
    /// Durably records the clock floor `ts` (flushed with every event appended before when
    /// this returns): no timestamp above it is handed out before a higher one is recorded, and
    /// a reopened clock resumes after it.
    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()>;
    /// The last recorded clock floor, if any.
    fn clock_floor(&self) -> io::Result<Option<Timestamp>>;
    /// Whether the store takes more events: `Err` with the reason when it is full (a size
    /// limit or its disk's free-space reserve). Called once per group commit: cheap, or
    /// refreshed in the background.
    fn admit(&self) -> Result<(), Arc<str>> {
        Ok(())
    }
    /// Whether the store takes a batch now: [`Storage::admit`] (refused with
    /// [`PublishError::StoreFull`]), or a store that failed and waits to be reopened refusing
    /// it (see [`super::reopen`]). Called once per group commit, before anything is stamped.
    fn ready(&self) -> Result<(), PublishError> {
        self.admit().map_err(PublishError::StoreFull)
    }
    /// Deletes events of `channel`'s log (its subtree; with `own`, only the events sent to
    /// `channel` itself) with timestamps below `before`, from every log that holds them, and
    /// raises the horizon of each log that lost events to the newest one it lost (recorded
    /// before the events are removed). Runs beside appends and reads without blocking them,
    /// in steps; one deletion at a time.
    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted>;
    /// The horizon of `channel`'s log: the newest event deleted from it (by retention or
    /// [`Storage::delete`]), if any. A reader resuming after an older timestamp may have
    /// missed events.
    fn horizon(&self, channel: &str) -> Option<Horizon>;
    /// Visits the events of `channel`'s subtree with `after < ts <= until`, in `dir` order,
    /// until the visitor breaks.
    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()>;
    /// The channels with a visible log in a range ([`super::Engine::channels`]). (The
    /// defaults of this and the next two are for test stores.)
    fn channels(&self, request: &ChannelsRequest) -> io::Result<Vec<StoredChannel>> {
        let _ = request;
        Ok(Vec::new())
    }
    /// The token revocations in force at `now`; expired ones are dropped.
    fn revocations(&self, now: u64) -> io::Result<Vec<Revocation>> {
        let _ = now;
        Ok(Vec::new())
    }
    /// Records `revocation` durably (replacing one of its `jti`), dropping those expired at `now`.
    fn revoke(&self, revocation: &Revocation, now: u64) -> io::Result<()> {
        let _ = (revocation, now);
        Err(io::Error::new(io::ErrorKind::Unsupported, "this store keeps no revocations"))
    }
    /// Visits the send ids stored with the events after `after` (oldest first), for the
    /// sequencer to remember them after a restart. Default: none (a store that keeps no ids
    /// across restarts: memory).
    fn ids(&self, after: Timestamp, visit: &mut VisitId<'_>) -> io::Result<()> {
        let _ = (after, visit);
        Ok(())
    }
    /// How many times the store was reopened in the running process (see
    /// [`super::reopen`]): the send ids remembered are then read again from it (a failed flush
    /// may have stored events, and with async durability a reopen loses the unflushed ones).
    fn generation(&self) -> u64 {
        0
    }
}

/// The newest event of `channel`'s log visible at `until`, if any.
pub(crate) fn newest(storage: &dyn Storage, channel: &str, until: Timestamp) -> io::Result<Option<Timestamp>> {
    let mut newest = None;
    storage.scan(channel, None, until, Direction::Backward, &mut |ts, _, _| {
        newest = Some(ts);
        ControlFlow::Break(())
    })?;
    Ok(newest)
}

/// Remembers the send ids of the events of `storage` inside the window at `now`.
fn remember_ids(keys: &mut Keys, storage: &dyn Storage, now: Timestamp) -> io::Result<usize> {
    let after = keys.horizon(now);
    let mut n = 0usize;
    storage.ids(after, &mut |ts, origin, id| {
        if let Some(origin) = super::Origin::from_wire(origin) {
            keys.insert(idempotency::key(&origin, id), ts);
            n += 1;
        }
    })?;
    keys.report();
    if n > 0 {
        tracing::info!(ids = n, after = %after, "send ids remembered from the store (the idempotency window)");
    }
    Ok(n)
}

/// What a deletion removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// How many events.
    pub events: u64,
    /// The newest of them.
    pub newest: Option<Timestamp>,
}

/// The path of an event line (`@ts:/path:data`).
pub(crate) fn line_path(line: &[u8]) -> Option<&str> {
    let rest = line.strip_prefix(b"@")?;
    let rest = &rest[rest.iter().position(|&b| b == b':')? + 1..];
    std::str::from_utf8(&rest[..rest.iter().position(|&b| b == b':')?]).ok()
}

/// Reads one page from `storage`.
pub(crate) fn read_page(storage: &dyn Storage, request: &ReadRequest) -> io::Result<Page> {
    let mut page = Page { horizon: storage.horizon(&request.channel), ..Page::default() };
    if request.limit == 0 {
        return Ok(page);
    }
    storage.scan(&request.channel, request.after, request.until, request.direction, &mut |ts, line, origin| {
        page.push_for(request, ts, line, origin);
        if page.is_full(request) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })?;
    Ok(page)
}

/// The newest timestamp visible to log readers (see the module docs).
#[derive(Debug, Default)]
struct Watermark(Mutex<Timestamp>);

impl Watermark {
    fn get(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn raise(&self, ts: Timestamp) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *m = (*m).max(ts);
    }
}

/// State shared by the engine's handle and its sequencer thread.
struct Shared {
    storage: Arc<dyn Storage>,
    clock: Clock,
    visible: Watermark,
    /// With a per-channel event limit: how many events each path was sent since the retention
    /// thread last looked.
    written: Option<Mutex<HashMap<Box<str>, u64>>>,
}

impl Shared {
    /// `before`, or everything visible when `None`, never beyond what is visible (a batch
    /// being stored is not deleted).
    fn cap(&self, before: Option<Timestamp>) -> Timestamp {
        let visible = Timestamp::from_nanos(self.visible.get().as_nanos().saturating_add(1));
        before.map_or(visible, |b| b.min(visible))
    }
}

/// The single-node engine (see the module docs).
pub(crate) struct LocalEngine {
    shared: Arc<Shared>,
    sequencer: Mutex<Option<JoinHandle<()>>>,
    /// Dropped at shutdown: the retention thread then stops.
    retention: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Who is subscribed where, in this process.
    presence: Arc<super::LocalPresence>,
}

impl LocalEngine {
    /// Opens the engine over `storage`, with timestamps from `wall` and the retention
    /// settings `retention`.
    pub(crate) fn open(storage: Arc<dyn Storage>, wall: WallClock, retention: Retention, context: Context) -> io::Result<Arc<dyn Engine>> {
        let last = storage.last_timestamp()?.unwrap_or(Timestamp::ZERO);
        // After a crash with async durability the floor is above the newest surviving event:
        // lost events had timestamps up to it, which must not be handed out again.
        // Deleted events' timestamps were handed out too (the newest may be gone).
        let deleted = storage.horizon(ROOT).map_or(Timestamp::ZERO, |h| h.newest);
        let floor = storage.clock_floor()?.unwrap_or(Timestamp::ZERO).max(last).max(deleted);
        // Positions start at the newest stored event, below the floor after a crash that lost
        // events: a client that saw them finds P < L and knows (docs/PROTOCOL.md 8.4).
        context.fanout.start_at(last);
        let clock = Clock::new(wall.clone(), floor);
        if storage.acks_before_durable() {
            // Every timestamp above the floor must first be covered by a durable floor.
            clock.set_limit(floor);
        }
        tracing::info!(last = %last, floor = %floor, "event store open");
        let written = retention.max_events.map(|_| Mutex::default());
        // The ids of the events still inside the idempotency window (a store that keeps them).
        let mut keys = Keys::new(context.idempotency, context.metrics.clone());
        if keys.is_active() {
            remember_ids(&mut keys, &*storage, clock.wall_now())?;
        }
        let generation = storage.generation();
        let shared = Arc::new(Shared { storage, clock, visible: Watermark(Mutex::new(last)), written });
        let presence = super::LocalPresence::start(context.presence, context.fanout.clone());
        let sequencer = Sequencer {
            shared: shared.clone(),
            fanout: context.fanout,
            requests: context.requests,
            metrics: context.metrics,
            keys,
            generation,
        };
        let handle = std::thread::Builder::new().name("ivy-sequencer".into()).spawn(move || sequencer.run())?;
        let stop = if retention.is_active() {
            let (stop, stopped) = std::sync::mpsc::channel();
            let retainer = Retainer { shared: shared.clone(), retention, wall, checked: HashMap::new() };
            std::thread::Builder::new().name("ivy-retention".into()).spawn(move || retainer.run(stopped))?;
            Some(stop)
        } else {
            None
        };
        Ok(Arc::new(LocalEngine { shared, sequencer: Mutex::new(Some(handle)), retention: Mutex::new(stop), presence }))
    }
}

/// The retention thread: deletes, in the background, the events that [`Retention`] no longer
/// keeps. Sends are not blocked: the storage deletes in steps beside its appends.
struct Retainer {
    shared: Arc<Shared>,
    retention: Retention,
    wall: WallClock,
    /// Paths whose own events were counted since startup, and the events sent to each since
    /// it was last trimmed.
    checked: HashMap<Box<str>, u64>,
}

impl Retainer {
    /// How often the thread looks: a quarter of the age limit, between 50 ms and 1 s.
    fn interval(&self) -> std::time::Duration {
        let quarter = self.retention.max_age.map_or(std::time::Duration::from_secs(1), |a| a / 4);
        quarter.clamp(std::time::Duration::from_millis(50), std::time::Duration::from_secs(1))
    }

    fn run(mut self, stop: std::sync::mpsc::Receiver<()>) {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(self.interval()) {
            if let Err(e) = self.pass() {
                tracing::error!(error = %e, "deleting events past the retention limits failed; will try again");
            }
        }
    }

    fn pass(&mut self) -> io::Result<()> {
        let storage = &*self.shared.storage;
        if let Some(age) = self.retention.max_age {
            let cutoff = Timestamp::from_nanos(self.wall.now().as_nanos().saturating_sub(age.as_nanos()));
            let deleted = storage.delete(ROOT, self.shared.cap(Some(cutoff)), false)?;
            if deleted.events > 0 {
                tracing::debug!(events = deleted.events, before = %cutoff, "retention: deleted events older than --retention-max-age");
            }
        }
        if let (Some(keep), Some(written)) = (self.retention.max_events, &self.shared.written) {
            let sent = std::mem::take(&mut *written.lock().unwrap_or_else(PoisonError::into_inner));
            for path in super::trims_due(&mut self.checked, sent, keep) {
                self.trim(&path, keep)?;
            }
        }
        Ok(())
    }

    /// Deletes the events sent to `path` itself beyond its newest `keep`.
    fn trim(&self, path: &str, keep: u64) -> io::Result<()> {
        let storage = &*self.shared.storage;
        let until = self.shared.visible.get();
        let mut own = 0u64;
        let mut cut = None;
        storage.scan(path, None, until, Direction::Backward, &mut |ts, line, _| {
            if line_path(line) == Some(path) {
                own += 1;
                if own > keep {
                    cut = Some(ts);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })?;
        if let Some(cut) = cut {
            let deleted = storage.delete(path, Timestamp::from_nanos(cut.as_nanos().saturating_add(1)), true)?;
            tracing::debug!(channel = path, events = deleted.events, "retention: deleted events beyond --retention-max-events");
        }
        Ok(())
    }
}

impl Engine for LocalEngine {
    fn presence(&self) -> Arc<dyn super::Presence> {
        self.presence.clone()
    }

    fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    fn visible(&self) -> Timestamp {
        self.shared.visible.get()
    }

    fn read(&self, request: ReadRequest) -> BoxFuture<'static, io::Result<Page>> {
        let storage = self.shared.storage.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || read_page(&*storage, &request)).await.map_err(io::Error::other)? })
    }

    fn delete(&self, request: DeleteRequest) -> BoxFuture<'static, io::Result<Deleted>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let before = shared.cap(request.before);
                let deleted = shared.storage.delete(&request.channel, before, false)?;
                tracing::info!(channel = %request.channel, before = %before, events = deleted.events, "deleted a channel's history");
                Ok(deleted)
            })
            .await
            .map_err(io::Error::other)?
        })
    }

    fn channels(&self, request: ChannelsRequest) -> BoxFuture<'static, io::Result<Vec<StoredChannel>>> {
        let storage = self.shared.storage.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || storage.channels(&request)).await.map_err(io::Error::other)? })
    }

    fn revocations(&self, now: u64) -> io::Result<Vec<Revocation>> {
        self.shared.storage.revocations(now)
    }

    fn revoke(&self, revocation: Revocation, now: u64) -> BoxFuture<'static, io::Result<()>> {
        let storage = self.shared.storage.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || storage.revoke(&revocation, now)).await.map_err(io::Error::other)? })
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        drop(self.retention.lock().unwrap_or_else(PoisonError::into_inner).take());
        let handle = self.sequencer.lock().unwrap_or_else(PoisonError::into_inner).take();
        Box::pin(async move {
            if let Some(handle) = handle {
                // Joined from a thread of its own, not tokio's blocking pool: if the final flush
                // never returns (a stuck disk) and the caller stops waiting, the runtime must
                // still be able to shut down.
                let (done, joined) = tokio::sync::oneshot::channel();
                let joiner = std::thread::Builder::new().name("ivy-sequencer-join".into()).spawn(move || {
                    let _ = handle.join();
                    let _ = done.send(());
                });
                if joiner.is_ok() {
                    let _ = joined.await;
                }
            }
        })
    }
}

/// The sequencer thread's state.
struct Sequencer {
    shared: Arc<Shared>,
    fanout: Arc<FanOut>,
    requests: Requests,
    metrics: super::EngineMetrics,
    /// The send ids remembered (see [`super::idempotency`]).
    keys: Keys,
    /// The store's [`Storage::generation`] when they were read from it.
    generation: u64,
}

/// A send of a batch that repeats an earlier one (see [`super::idempotency`]): it is not
/// stored, and completes in its place among the batch's sends (so that a connection's acks
/// stay in send order).
struct Repeat {
    request: Publish,
    /// How many of the batch's events to store come before it.
    after: usize,
    of: Of,
}

/// What a repeat repeats.
enum Of {
    /// An event stored before, at this timestamp.
    Stored(Timestamp),
    /// The event to store at this place of the batch.
    Batch(usize),
}

/// The repeats taken out of a batch, and the key of each send left in it.
#[derive(Default)]
struct Repeats {
    /// In batch order.
    list: std::collections::VecDeque<Repeat>,
    /// The key of each send left in the batch that has an id, by place.
    keys: Vec<Option<idempotency::Key>>,
    /// How many were answered with their first's timestamp.
    replayed: usize,
}

impl Repeats {
    /// Completes the repeats placed before the batch's event `upto`, the batch stored (`ts`:
    /// the timestamp of its event at a place) or failed with `failed`.
    fn complete(&mut self, upto: usize, ts: impl Fn(usize) -> Option<Timestamp>, failed: Option<&PublishError>) {
        while self.list.front().is_some_and(|r| r.after <= upto) {
            let Some(r) = self.list.pop_front() else { break };
            match (r.of, failed) {
                (Of::Stored(first), _) => {
                    self.replayed += 1;
                    r.request.done.replayed(first);
                }
                (Of::Batch(_), Some(e)) => r.request.done.complete(Err(e.clone())),
                (Of::Batch(at), None) => match ts(at) {
                    Some(first) => {
                        self.replayed += 1;
                        r.request.done.replayed(first);
                    }
                    None => {
                        r.request.done.complete(Err(PublishError::storage(io::Error::other("the first send of this id was not stored"))))
                    }
                },
            }
        }
    }

    /// Completes every repeat left after a failure of the batch.
    fn fail(&mut self, upto: usize, e: &PublishError) {
        self.complete(upto, |_| None, Some(e));
    }
}

impl Sequencer {
    /// Takes the repeats out of `batch` (nothing to do, and nothing allocated, unless a send
    /// in it has an id and ids are remembered).
    fn take_repeats(&mut self, batch: &mut Vec<Publish>) -> Option<Repeats> {
        if !self.keys.is_active() {
            return None;
        }
        self.keys.expire(self.shared.clock.wall_now());
        if !batch.iter().any(|r| r.id.is_some()) {
            return None;
        }
        // A store reopened after a failure (which `ready` does when it is time) holds the ids
        // of its events, which may differ from those remembered: read them again.
        let storage = &*self.shared.storage;
        if storage.ready().is_ok() && storage.generation() != self.generation {
            let now = self.shared.clock.wall_now();
            let mut keys = Keys::new(self.keys.settings(), self.metrics.clone());
            match remember_ids(&mut keys, storage, now) {
                Ok(_) => {
                    self.keys = keys;
                    self.generation = storage.generation();
                    // What the reopened store holds is durable, also the events of a batch
                    // whose flush failed: a repeat of one is answered, so it must be visible.
                    if let Ok(Some(last)) = storage.last_timestamp() {
                        self.shared.visible.raise(last);
                    }
                }
                Err(e) => tracing::error!(error = %e, "reading the send ids of the reopened store failed; will try again"),
            }
        }
        let mut repeats = Repeats::default();
        let mut firsts: HashMap<idempotency::Key, usize> = HashMap::new();
        let mut kept = Vec::with_capacity(batch.len());
        for r in batch.drain(..) {
            let Some(id) = &r.id else {
                kept.push(r);
                repeats.keys.push(None);
                continue;
            };
            let key = idempotency::key(&r.origin, id);
            let of = match self.keys.get(&key) {
                Some(ts) => Of::Stored(ts),
                None => match firsts.get(&key) {
                    Some(&at) => Of::Batch(at),
                    None => {
                        firsts.insert(key.clone(), kept.len());
                        kept.push(r);
                        repeats.keys.push(Some(key));
                        continue;
                    }
                },
            };
            repeats.list.push_back(Repeat { request: r, after: kept.len(), of });
        }
        *batch = kept;
        Some(repeats)
    }

    fn run(mut self) {
        let mut batch: Vec<Publish> = Vec::new();
        while let Some(first) = self.requests.blocking_next() {
            let (mut entries, mut bytes) = cost(&first);
            batch.push(first);
            // The items of one `POST /publish` stay together, beyond the limits if need be.
            while (batch.len() < MAX_BATCH && bytes < MAX_BATCH_STORED_BYTES && entries < MAX_BATCH_ENTRIES)
                || self.requests.continues_batch()
            {
                match self.requests.try_next() {
                    Some(r) => {
                        let (e, b) = cost(&r);
                        entries += e;
                        bytes += b;
                        batch.push(r);
                    }
                    None => break,
                }
            }
            self.commit(&mut batch);
            if self.requests.is_ended() {
                break;
            }
        }
        // Requests still queued (sent after the end) are refused, then the store is flushed.
        self.requests.refuse_rest();
        let storage = &self.shared.storage;
        // Nothing after the clock's position was handed out: a clean restart resumes right there.
        if let Err(e) = storage.set_clock_floor(self.shared.clock.last()) {
            tracing::error!(error = %e, "recording the clock floor failed");
        }
        if let Err(e) = storage.flush() {
            tracing::error!(error = %e, "final flush of the event store failed");
        }
    }

    fn commit(&mut self, batch: &mut Vec<Publish>) {
        let storage = &*self.shared.storage;
        super::answer_probes(batch, || storage.ready(), &self.fanout);
        match self.take_repeats(batch) {
            None => {
                // Each send was completed; nothing of the batch is remembered.
                let _ = self.store(batch, None);
            }
            Some(mut repeats) => {
                if let Ok(stamps) = self.store(batch, Some(&mut repeats)) {
                    for (key, ts) in std::mem::take(&mut repeats.keys).into_iter().zip(stamps) {
                        if let Some(key) = key {
                            self.keys.insert(key, ts);
                        }
                    }
                    self.keys.report();
                }
                if repeats.replayed > 0 {
                    self.metrics.replayed(repeats.replayed);
                }
            }
        }
    }

    /// Refuses the whole batch with `e` (its repeats in their places).
    fn refuse(&self, batch: &mut Vec<Publish>, e: PublishError, mut repeats: Option<&mut Repeats>) -> Result<Vec<Timestamp>, PublishError> {
        self.metrics.refused(batch.len(), &e);
        for (i, r) in batch.drain(..).enumerate() {
            if let Some(rep) = repeats.as_deref_mut() {
                rep.fail(i, &e);
            }
            r.done.complete(Err(e.clone()));
        }
        if let Some(rep) = repeats {
            rep.fail(usize::MAX, &e);
        }
        Err(e)
    }

    /// Stores and delivers `batch`, completing each send, and each of its `repeats` in its
    /// place (their keys say which sends are stored with their id); the timestamps of its
    /// events (when it has repeats), or the error they all failed with.
    fn store(&self, batch: &mut Vec<Publish>, mut repeats: Option<&mut Repeats>) -> Result<Vec<Timestamp>, PublishError> {
        let storage = &*self.shared.storage;
        if batch.is_empty() {
            if let Some(rep) = repeats {
                rep.complete(usize::MAX, |_| None, None);
            }
            return Ok(Vec::new());
        }
        if let Err(e) = storage.ready() {
            tracing::warn!(events = batch.len(), reason = %e, "events refused");
            return self.refuse(batch, e, repeats);
        }
        let lines = match self.stamp(batch) {
            Ok(lines) => lines,
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "recording the clock floor failed; the events were not stored");
                return self.refuse(batch, PublishError::storage(e), repeats);
            }
        };
        // Only the first of each id in the batch is stored with it (the repeats are out).
        let keys = repeats.as_deref().map(|r| &r.keys[..]);
        let records: Vec<Record<'_>> = batch
            .iter()
            .zip(&lines)
            .enumerate()
            .map(|(i, (r, (ts, line)))| Record {
                ts: *ts,
                path: &r.path,
                line,
                origin: &r.origin,
                id: keys.and_then(|k| k.get(i)?.as_ref()).and(r.id.as_deref()),
            })
            .collect();
        let started = std::time::Instant::now();
        let stored = storage.append(&records).and_then(|()| storage.commit());
        drop(records);
        if let Err(e) = stored {
            tracing::error!(error = %e, events = batch.len(), "storing events failed; they were not delivered live");
            return self.refuse(batch, PublishError::storage(e), repeats);
        }
        self.metrics.group_commit(batch.len(), started.elapsed());
        if let Some(written) = &self.shared.written {
            let mut written = written.lock().unwrap_or_else(PoisonError::into_inner);
            for r in batch.iter() {
                match written.get_mut(&r.path) {
                    Some(n) => *n += 1,
                    None => {
                        written.insert(r.path.clone(), 1);
                    }
                }
            }
        }
        // Stored: log readers may see the batch now, before any subscriber gets it.
        if let Some((ts, _)) = lines.last() {
            self.shared.visible.raise(*ts);
            // One line per group commit (the events themselves: the connections' "out" lines).
            tracing::trace!(events = lines.len(), first = %lines[0].0, last = %ts, "committed");
        }
        let stamps = if repeats.is_some() { lines.iter().map(|(ts, _)| *ts).collect() } else { Vec::new() };
        let mut done = Vec::with_capacity(batch.len());
        let published: Vec<Published> = batch
            .drain(..)
            .zip(lines)
            .map(|(r, (ts, line))| {
                done.push(Some(r.done));
                Published::new(ts, r.path, r.sender, self.fanout.line(line)).from(r.origin)
            })
            .collect();
        // Repeats of earlier events placed before the batch's first event.
        if let Some(rep) = repeats.as_deref_mut() {
            rep.complete(0, |_| None, None);
        }
        // Each send completes right after its event is delivered, before the later ones; a
        // repeat right after the send before it.
        self.fanout.deliver(&published, |i| {
            if let (Some(d), Some(p)) = (done.get_mut(i).and_then(Option::take), published.get(i)) {
                d.complete(Ok(p.ts));
            }
            if let Some(rep) = repeats.as_deref_mut() {
                rep.complete(i + 1, |at| published.get(at).map(|p| p.ts), None);
            }
        });
        if let Some(rep) = repeats {
            rep.complete(usize::MAX, |at| published.get(at).map(|p| p.ts), None);
        }
        Ok(stamps)
    }

    /// Gives the batch its timestamps and encodes its lines, first raising the clock floor when
    /// the clock's limit is in the way.
    fn stamp(&self, batch: &[Publish]) -> io::Result<Vec<(Timestamp, Vec<u8>)>> {
        let encode = |next: &mut dyn FnMut() -> Timestamp| -> Vec<(Timestamp, Vec<u8>)> {
            batch
                .iter()
                .map(|r| {
                    let ts = next();
                    let mut line = Vec::new();
                    encode_event(ts, &r.path, &r.data, &mut line);
                    (ts, line)
                })
                .collect()
        };
        let clock = &self.shared.clock;
        // One raise is normally enough; the wall clock would have to jump a second ahead between
        // two attempts for another one to be needed.
        for _ in 0..4 {
            match clock.allocate(batch.len(), encode) {
                Ok(lines) => return Ok(lines),
                Err(needed) => {
                    let floor = Timestamp::from_nanos(needed.as_nanos().saturating_add(FLOOR_AHEAD_NANOS));
                    self.shared.storage.set_clock_floor(floor)?;
                    clock.set_limit(floor);
                }
            }
        }
        Err(io::Error::other("the clock floor could not be raised ahead of the wall clock"))
    }
}
