//! The engine seam: ordering, storage and delivery between connections.
//!
//! An engine owns three things, and the protocol code (WebSocket sessions, the HTTP log) owns
//! none of them:
//!
//! - **ordering**: it hands out every event's timestamp, unique and strictly increasing over
//!   everything it ever stored (and answers `@` with [`Engine::now`]);
//! - **storage**: it appends events to the logs of their channel and its ancestors, and reads
//!   them back page by page ([`Engine::read`]), showing only what is durable
//!   ([`Engine::visible`]);
//! - **deletion**: it deletes a channel's history on request ([`Engine::delete`]) and what
//!   its [`Retention`] settings no longer keep, in the background, and states each log's
//!   horizon ([`Page::horizon`]), the newest event it lost;
//! - **the bus**: it hands every stored event, once, in timestamp order, to this node's
//!   [`FanOut`] ([`FanOut::deliver`]), which routes it to the subscribed connections.
//! - **send ids**: it stores at most one event per sender and [`Publish::id`] within its
//!   idempotency window ([`Context::idempotency`]) and completes a repeat with the first one's
//!   timestamp ([`Completion::replayed`]), storing and delivering nothing; an engine that
//!   survives restarts remembers the ids across them (see [`idempotency`]).
//!
//! The order of those steps is the contract every engine keeps, because subscribe positions
//! and the clients' gap-free recipe (`docs/PROTOCOL.md` 8.1 and 8.4) rest on it: an event is
//! stored (durably, as the engine promises) and visible to [`Engine::read`] *before* it is
//! delivered to the fan-out; its sender's completion runs *after* it was delivered and
//! *before* any later event is ([`FanOut::deliver`] calls back between events), so that a
//! connection receives its send's ack before every event with a later timestamp. The
//! fan-out's position (the newest event it was given) is then always visible in the log,
//! which is what a subscription's position means.
//!
//! **Readiness probes.** The server's `/readyz` puts a probe in the queue of publish requests:
//! a [`Publish`] for which [`Publish::is_probe`] holds (it has no path). An engine never
//! stores it: it passes its group commits through [`answer_probes`] first, in the order it
//! takes them, which makes on the probes the check a batch must pass to be stored and hands
//! them to the fan-out, as events, to the prober's in-process subscriber (no client can
//! subscribe to a channel without a path). An engine that did not would fail the probes
//! (they time out), never store them.
//!
//! An engine is given to the server through [`crate::IvyBuilder::engine`] as an [`Open`]: the
//! server creates the queue of publish requests ([`Requests`]) and the fan-out, and the engine
//! opens with them ([`Context`]). Engines here:
//!
//! - [`SledEngine`] (the default, `ivy-server --data DIR`): an embedded sled store, one
//!   sequencer thread, group commit, a durable clock floor;
//! - [`MemoryEngine`] (`ivy-server --memory`): the same sequencer over a store in memory;
//!   nothing survives the process. Fast tests and ephemeral deployments use it;
//! - [`RedisEngine`] (`ivy-server --redis URL`): the log, the order and the clock in Redis,
//!   shared by any number of nodes; a writer task (one Lua script per group commit) and a
//!   reader task (`XREAD BLOCK` on the root log) that delivers to this node's fan-out.
//!
//! # Async engines
//!
//! The seam is asynchronous, so that an engine whose client is async (Redis, a network store)
//! implements it directly, with no runtime of its own:
//!
//! - writes arrive through [`Requests`], a bounded queue that an engine drains in batches
//!   either from a thread ([`Requests::blocking_next`], as the sled engine's sequencer does) or
//!   from a task ([`Requests::next`]); the senders wait when it is full (back-pressure), and
//!   each request carries a [`Completion`] the engine calls from wherever it finishes;
//! - reads return futures ([`Engine::read`] returns a boxed future of one [`Page`]): a network
//!   engine awaits its client there, and a blocking engine (sled) runs the read on tokio's
//!   blocking pool. The HTTP layer streams a large log as a sequence of bounded pages, so no
//!   engine ever holds a whole log in memory;
//! - [`Engine::shutdown`] returns a future that resolves once every accepted request is
//!   completed and what was stored is flushed.
//!
//! Nothing engine-specific is in the server's [`crate::Config`]: the data directory, the
//! durability mode, the flush interval and the clock floor belong to the sled engine's
//! builder ([`SledEngine`]).

mod clock;
pub mod idempotency;
mod local;
pub mod memory;
pub mod presence;
pub mod redis;
mod redis_presence;
mod reopen;
pub mod sled;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use ivy_client_core::Timestamp;
use tokio::sync::{mpsc, oneshot};

pub use self::redis::RedisEngine;
pub use crate::fanout::{ConnId, FanOut, Line, Published};
pub use crate::metrics::EngineMetrics;
pub use idempotency::Idempotency;
pub(crate) use local::stored_cost;
pub use local::{Deleted, WallClock};
pub use memory::MemoryEngine;
pub use presence::{LocalPresence, Member, MemberId, Presence, PresenceOptions};
pub use sled::{Durability, SledEngine};

/// Who sent an event, as the server verified it, in its wire form (`docs/PROTOCOL.md`
/// 6.1.1): `=escaped-sub` (a connection's verified token `sub`), `-` (anonymous), `*` (the
/// application, [`crate::Ivy::publish`]) or `?` (unknown: stored before the server recorded
/// senders). Engines store it with each event ([`Publish::origin`]) and give it back with
/// each line read. Cheap to clone: a user's form is shared (built once per connection).
#[derive(Clone, PartialEq, Eq)]
pub struct Origin(OriginRepr);

#[derive(Clone, PartialEq, Eq)]
enum OriginRepr {
    Static(&'static [u8]),
    User(Arc<[u8]>),
}

impl Origin {
    /// A connection without a token (every connection while auth is off).
    pub const ANONYMOUS: Origin = Origin(OriginRepr::Static(b"-"));
    /// The embedding application.
    pub const APPLICATION: Origin = Origin(OriginRepr::Static(b"*"));
    /// Unknown: an event stored before the server recorded senders.
    pub const UNKNOWN: Origin = Origin(OriginRepr::Static(b"?"));

    /// A connection whose verified token has this `sub`.
    pub fn user(sub: &str) -> Origin {
        let mut wire = vec![b'='];
        ivy_client_core::escape::escape_sub_into(sub.as_bytes(), &mut wire);
        Origin(OriginRepr::User(wire.into()))
    }

    /// From its wire form, as stored (`None` when it is not one).
    pub fn from_wire(wire: &[u8]) -> Option<Origin> {
        match wire {
            b"-" => Some(Origin::ANONYMOUS),
            b"*" => Some(Origin::APPLICATION),
            b"?" => Some(Origin::UNKNOWN),
            [b'=', ..] if ivy_client_core::wire::Sender::parse(wire).is_ok() => Some(Origin(OriginRepr::User(wire.into()))),
            _ => None,
        }
    }

    /// The wire form.
    pub fn wire(&self) -> &[u8] {
        match &self.0 {
            OriginRepr::Static(w) => w,
            OriginRepr::User(w) => w,
        }
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(self.wire()), f)
    }
}

/// A boxed future, as the engine's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A running engine. See the [module docs](self) for the contract.
pub trait Engine: Send + Sync + 'static {
    /// The current time for `@`: at least every timestamp handed out so far; every later
    /// event gets a greater one.
    fn now(&self) -> Timestamp;

    /// The newest timestamp whose event may be shown to log readers (durable, or stored as
    /// durably as the engine promises). Reads pass it as [`ReadRequest::until`].
    fn visible(&self) -> Timestamp;

    /// Reads one page of a channel's log (the channel and everything below it).
    fn read(&self, request: ReadRequest) -> BoxFuture<'static, io::Result<Page>>;

    /// Deletes the events of a channel's log (its whole subtree, as [`Engine::read`] shows
    /// it) older than [`DeleteRequest::before`], from every log that holds them (its
    /// ancestors' included), and raises the horizon ([`Page::horizon`]) of each log that lost
    /// events. Runs beside the sends, which it does not block.
    fn delete(&self, request: DeleteRequest) -> BoxFuture<'static, io::Result<Deleted>>;

    /// Finishes: completes every request accepted before [`Requests`] reported the end of
    /// the queue, flushes what was stored, and resolves. Called once, by the server.
    fn shutdown(&self) -> BoxFuture<'static, ()>;

    /// Lists the channels that have a log (at least one event visible at
    /// [`ChannelsRequest::until`]: sent to them or below them) in the subtree of
    /// [`ChannelsRequest::prefix`], in byte order of their paths, after
    /// [`ChannelsRequest::after`], at most [`ChannelsRequest::limit`], each with its newest
    /// visible event (`GET /channels`, which merges them with this node's subscribed
    /// channels). Costs the range it lists, not the number of channels in the store. The
    /// default: [`io::ErrorKind::Unsupported`].
    fn channels(&self, request: ChannelsRequest) -> BoxFuture<'static, io::Result<Vec<StoredChannel>>> {
        let _ = request;
        Box::pin(async { Err(io::Error::new(io::ErrorKind::Unsupported, "this engine does not list channels")) })
    }

    /// The token revocations in force at `now` (seconds since the Unix epoch), expired ones
    /// dropped. Called once, when the server opens (within the runtime, like [`Open::open`]:
    /// an engine may block briefly, or load them in `open` and give them here). The default:
    /// none.
    fn revocations(&self, now: u64) -> io::Result<Vec<Revocation>> {
        let _ = now;
        Ok(Vec::new())
    }

    /// Records a token revocation durably (replacing one of the same `jti`), dropping those
    /// expired at `now`; resolves once it is stored (`POST /admin/revoke`). The default:
    /// [`io::ErrorKind::Unsupported`].
    fn revoke(&self, revocation: Revocation, now: u64) -> BoxFuture<'static, io::Result<()>> {
        let _ = (revocation, now);
        Box::pin(async { Err(io::Error::new(io::ErrorKind::Unsupported, "this engine does not store token revocations")) })
    }

    /// The commands other nodes of the cluster made (an engine of several nodes:
    /// [`Control`]), for the server to apply on this node as its own admin endpoints do.
    /// Taken once, by the server, right after it loaded [`Engine::revocations`]; the
    /// commands end when the engine shuts down. The default, for single-node engines: none.
    fn control(&self) -> Option<mpsc::Receiver<Control>> {
        None
    }

    /// Tells the other nodes of the cluster to apply `control` (an engine of several nodes);
    /// resolves once the command is where every node reads it. The server calls it after it
    /// applied the command on this node (`POST /admin/disconnect`, [`crate::Ivy::disconnect`];
    /// a revocation travels with [`Engine::revoke`]). The default, for single-node engines:
    /// nothing to tell, at once.
    fn broadcast(&self, control: Control) -> BoxFuture<'static, io::Result<()>> {
        let _ = control;
        Box::pin(std::future::ready(Ok(())))
    }

    /// Who is subscribed where ([`presence`]): the sled and memory engines keep it in this
    /// process ([`LocalPresence`], started with [`Context::presence`]); an engine of several
    /// nodes keeps it where every node sees it (see the [`presence`] module docs).
    fn presence(&self) -> Arc<dyn Presence>;

    /// Whether the engine honours send ids ([`Publish::id`], `docs/PROTOCOL.md` 5.9): a
    /// repeat within the window stores nothing. An engine that does not makes the server
    /// refuse sends with ids, as a server without them would
    /// (`malformed` on the WebSocket, so that clients fall back to plain sends; `501` for an
    /// `Idempotency-Key` on HTTP), rather than store a retried send twice. The default: yes.
    fn send_ids(&self) -> bool {
        true
    }

    /// Resolves once this node's fan-out has delivered every event stored before the call
    /// (an engine of several nodes: what another node may have delivered already), so that a
    /// subscribe position taken after it is not behind what a client saw on another node:
    /// `true`. `false` when the engine could not make sure of it in a bounded time (it cannot
    /// reach its store, or lags behind it): the server then closes the connection with
    /// [`crate::close_code::TRY_AGAIN_LATER`] instead of answering with a position that may
    /// be behind. The server awaits it before each subscribe and presence watch. The default,
    /// for single-node engines: `true` at once.
    fn settled(&self) -> BoxFuture<'static, bool> {
        Box::pin(std::future::ready(true))
    }
}

/// A page of channels to list ([`Engine::channels`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelsRequest {
    /// The subtree (a normalized path): this channel and every one below it.
    pub prefix: Box<str>,
    /// Only channels whose path is greater (in byte order) than this one.
    pub after: Option<Box<str>>,
    /// Most channels in the page.
    pub limit: usize,
    /// Only events up to this one count: [`Engine::visible`] at the time of the request.
    pub until: Timestamp,
}

impl ChannelsRequest {
    /// The first `limit` channels of `prefix`'s subtree after `after`, by the events up to `until`.
    pub fn new(prefix: impl Into<Box<str>>, after: Option<Box<str>>, limit: usize, until: Timestamp) -> ChannelsRequest {
        ChannelsRequest { prefix: prefix.into(), after, limit, until }
    }

    /// Whether `path` is in the page's range: in the subtree, after the cursor.
    pub fn wants(&self, path: &str) -> bool {
        (self.prefix.as_ref() == ivy_client_core::path::ROOT || ivy_client_core::path::is_within(path, &self.prefix))
            && self.after.as_deref().is_none_or(|a| path > a)
    }
}

/// A channel with a log ([`Engine::channels`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChannel {
    /// Its path.
    pub path: Box<str>,
    /// Its newest visible event (its subtree's).
    pub newest: Timestamp,
}

/// A revoked token: refused until `until` ([`Engine::revoke`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The token's `jti` claim.
    pub jti: Box<str>,
    /// Until when it is refused, in seconds since the Unix epoch.
    pub until: u64,
}

/// An admin command made on one node that every node of a cluster applies
/// ([`Engine::control`], [`Engine::broadcast`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Control {
    /// A token revocation: refuse the token and close its connections with 4003.
    Revoke(Revocation),
    /// Close every connection of this `sub` with 4004 (`POST /admin/disconnect`).
    Disconnect {
        /// The token `sub` whose connections are closed.
        sub: Box<str>,
    },
}

/// How an engine is opened: what [`crate::IvyBuilder::engine`] takes.
pub trait Open: Send + 'static {
    /// Opens the engine, which takes over `context`. Called once, within a tokio runtime.
    fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>>;

    /// A short description for the startup log line (for example the data directory).
    fn describe(&self) -> String;

    /// The engine's kind in one word, as `/info` and `/metrics` state it (`sled`, `memory`).
    fn kind(&self) -> &'static str {
        "custom"
    }
}

/// What the server gives an engine when it opens.
#[derive(Debug)]
#[non_exhaustive]
pub struct Context {
    /// The publish requests, in arrival order.
    pub requests: Requests,
    /// This node's fan-out: give it every stored event, in timestamp order, after the event is
    /// visible and before its completion runs. Before the first delivery, set its starting
    /// position with [`FanOut::start_at`] (the newest event already stored).
    pub fanout: Arc<FanOut>,
    /// Where the engine reports its group commits and the events it refused (`/metrics`).
    pub metrics: EngineMetrics,
    /// The presence settings (`--presence-linger`, `--presence-max-list`).
    pub presence: PresenceOptions,
    /// How long and how many send ids ([`Publish::id`]) the engine remembers (see
    /// [`idempotency`]).
    pub idempotency: Idempotency,
}

/// Scan direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// One page to read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadRequest {
    /// The channel (normalized path): its events and those of every path below it.
    pub channel: Box<str>,
    /// Only events after this one (exclusive).
    pub after: Option<Timestamp>,
    /// Only events up to this one (inclusive): [`Engine::visible`] at the time of the request.
    pub until: Timestamp,
    /// Order of the page.
    pub direction: Direction,
    /// Most events in the page.
    pub limit: usize,
    /// The page ends after the event that brings its lines to this many bytes or more.
    pub max_bytes: usize,
    /// Whether the page carries the lines, or only their count and bounds.
    pub lines: bool,
    /// Whether the lines are the extended ones, with their senders (`ext=sender`,
    /// `@ts~sender:/path:data`), instead of the original ones.
    pub senders: bool,
}

impl ReadRequest {
    /// The first `limit` events of `channel` after `after`, up to `until`, oldest first, with
    /// their lines and no byte bound.
    pub fn new(channel: impl Into<Box<str>>, after: Option<Timestamp>, until: Timestamp, limit: usize) -> ReadRequest {
        ReadRequest {
            channel: channel.into(),
            after,
            until,
            direction: Direction::Forward,
            limit,
            max_bytes: usize::MAX,
            lines: true,
            senders: false,
        }
    }

    /// Newest first.
    pub fn backward(mut self) -> ReadRequest {
        self.direction = Direction::Backward;
        self
    }

    /// Ends the page once its lines reach `bytes`.
    pub fn max_bytes(mut self, bytes: usize) -> ReadRequest {
        self.max_bytes = bytes;
        self
    }

    /// The extended lines, with their senders.
    pub fn with_senders(mut self, senders: bool) -> ReadRequest {
        self.senders = senders;
        self
    }

    /// Counts and bounds only, no lines.
    pub fn without_lines(mut self) -> ReadRequest {
        self.lines = false;
        self
    }
}

/// A deletion of a channel's history ([`Engine::delete`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteRequest {
    /// The channel (normalized path): its events and those of every path below it.
    pub channel: Box<str>,
    /// Only events with a timestamp below this one; `None`: every event visible now.
    pub before: Option<Timestamp>,
}

impl DeleteRequest {
    /// Deletes `channel`'s events before `before` (all of them when `None`).
    pub fn new(channel: impl Into<Box<str>>, before: Option<Timestamp>) -> DeleteRequest {
        DeleteRequest { channel: channel.into(), before }
    }
}

/// How long events are kept: the retention settings every engine honours (default: keep
/// everything). Applied in the background, without blocking sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Events older than this (by their timestamp) are deleted. `None`: no age limit.
    pub max_age: Option<std::time::Duration>,
    /// Each channel keeps at most this many of the events sent to it (to its path itself;
    /// its children's count for them): the oldest beyond are deleted. `None`: no limit.
    pub max_events: Option<u64>,
}

impl Retention {
    /// Keep everything.
    pub fn keep_everything() -> Retention {
        Retention::default()
    }

    /// Deletes events older than `age`.
    pub fn max_age(mut self, age: Option<std::time::Duration>) -> Retention {
        self.max_age = age.filter(|a| !a.is_zero());
        self
    }

    /// Keeps at most `n` events per channel.
    pub fn max_events(mut self, n: Option<u64>) -> Retention {
        self.max_events = n.filter(|&n| n > 0);
        self
    }

    /// Whether anything is ever deleted.
    pub fn is_active(&self) -> bool {
        self.max_age.is_some() || self.max_events.is_some()
    }
}

/// The paths a retention pass trims to `keep` events, given the events `sent` to each since
/// the last pass; `checked` counts, per path, the events sent since its last trim. A path is
/// trimmed when first written after startup (its store may hold more than the limit), then
/// each time it has been sent an eighth of the limit more. (Both the local and the Redis
/// engines' retention tasks.)
pub(crate) fn trims_due(checked: &mut HashMap<Box<str>, u64>, sent: HashMap<Box<str>, u64>, keep: u64) -> Vec<Box<str>> {
    let slack = (keep / 8).max(1);
    let mut due = Vec::new();
    for (path, n) in sent {
        match checked.get_mut(&path) {
            Some(since) if *since + n < slack => *since += n,
            _ => {
                checked.insert(path.clone(), 0);
                due.push(path);
            }
        }
    }
    due
}

/// One page of a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The event lines in the page's order, joined by `\n` (the log endpoint's body format);
    /// empty when the request asked for no lines.
    pub lines: Vec<u8>,
    /// How many events the page has.
    pub count: usize,
    /// The timestamp of its first event (in the page's order).
    pub first: Option<Timestamp>,
    /// The timestamp of its last event (in the page's order).
    pub last: Option<Timestamp>,
    /// The log's horizon: the newest event deleted from it (by retention or
    /// [`Engine::delete`]), if any. A reader that last saw an older event may have missed
    /// events.
    pub horizon: Option<Horizon>,
}

/// What a log lost ([`Page::horizon`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// The newest event deleted from the log.
    pub newest: Timestamp,
    /// How many deletions removed events from it (any change of its older events changes
    /// this, also one below `newest`).
    pub deletions: u64,
}

impl Page {
    /// Adds an event at the end of the page.
    pub fn push(&mut self, ts: Timestamp, line: &[u8], with_line: bool) {
        if with_line {
            if self.count > 0 {
                self.lines.push(b'\n');
            }
            self.lines.extend_from_slice(line);
        }
        self.count += 1;
        self.first.get_or_insert(ts);
        self.last = Some(ts);
    }

    /// Adds an event at the end of the page, as its extended line (`@ts~origin:rest`) when
    /// `request` asks for senders.
    pub fn push_for(&mut self, request: &ReadRequest, ts: Timestamp, line: &[u8], origin: &[u8]) {
        if !(request.lines && request.senders) {
            return self.push(ts, line, request.lines);
        }
        if self.count > 0 {
            self.lines.push(b'\n');
        }
        if ivy_client_core::wire::extend_event_line(line, origin, &mut self.lines).is_none() {
            self.lines.extend_from_slice(line);
        }
        self.count += 1;
        self.first.get_or_insert(ts);
        self.last = Some(ts);
    }

    /// Whether `request` wants no more events after these.
    pub fn is_full(&self, request: &ReadRequest) -> bool {
        self.count >= request.limit || (request.lines && self.lines.len() >= request.max_bytes)
    }
}

/// A request to publish one event.
#[derive(Debug)]
#[non_exhaustive]
pub struct Publish {
    /// The normalized path.
    pub path: Box<str>,
    /// The event data, raw (escaped when the engine encodes the line).
    pub data: Bytes,
    /// The sending connection, which does not receive its own event.
    pub sender: Option<ConnId>,
    /// Who sent it, as verified (stored with it). [`Publish::new`]: the application.
    pub origin: Origin,
    /// The send's id (`*ID:path:data`, `Idempotency-Key`: checked by
    /// [`ivy_client_core::wire::is_valid_send_id`]), if it has one: an engine stores at most one
    /// event per ([`Publish::origin`], id) within its idempotency window, and completes a
    /// repeat with the first one's timestamp ([`Completion::replayed`]) without storing or
    /// delivering anything (see [`idempotency`]). Never part of the event's line.
    pub id: Option<Bytes>,
    /// Where the outcome goes.
    pub done: Completion,
}

impl Publish {
    /// A request to publish `data` on `path` (normalized) with no sending connection.
    pub fn new(path: impl Into<Box<str>>, data: Bytes, done: Completion) -> Publish {
        Publish { path: path.into(), data, sender: None, origin: Origin::APPLICATION, id: None, done }
    }

    /// A readiness probe (see the [module docs](self)).
    pub(crate) fn probe(done: Completion) -> Publish {
        Publish::new(PROBE_CHANNEL, Bytes::new(), done)
    }

    /// Whether this is a readiness probe, which is never stored (see the [module docs](self)).
    pub fn is_probe(&self) -> bool {
        self.path.is_empty()
    }
}

/// The channel of readiness probes: no path (a normalized path starts with `/`), so that no
/// client can subscribe to it and no log holds it.
pub(crate) const PROBE_CHANNEL: &str = "";

/// Takes the readiness probes out of `batch` (a group commit about to be stored) and answers
/// them: refused with the error of `ready` (the check a batch must pass to be stored) or, if
/// it passes, handed to the fan-out's probe subscribers and completed with the fan-out's
/// position. Costs a scan of the batch when it holds no probe.
pub fn answer_probes(batch: &mut Vec<Publish>, ready: impl FnOnce() -> Result<(), PublishError>, fanout: &FanOut) {
    if !batch.iter().any(Publish::is_probe) {
        return;
    }
    let (probes, events): (Vec<Publish>, Vec<Publish>) = std::mem::take(batch).into_iter().partition(Publish::is_probe);
    *batch = events;
    let ready = ready();
    for probe in probes {
        match &ready {
            Ok(()) => {
                fanout.deliver_probe();
                probe.done.complete(Ok(fanout.position()));
            }
            Err(e) => probe.done.complete(Err(e.clone())),
        }
    }
}

/// Why a publish failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PublishError {
    /// The path is invalid (only from [`crate::Ivy::publish`]; WebSocket sends are checked
    /// when parsed).
    InvalidPath(ivy_client_core::path::PathError),
    /// The send id is invalid (only from [`crate::Ivy::publish_with_id`]; WebSocket and HTTP
    /// ids are checked when parsed): 1 to 64 characters of `A-Z a-z 0-9 . _ ~ -`.
    InvalidId,
    /// The store failed; the event was not delivered live. If the failure came from the
    /// flush, the event may still be in the log.
    Storage(Arc<io::Error>),
    /// The store is full: its size limit, or its disk's free-space reserve (the reason says
    /// which). Nothing was stored.
    StoreFull(Arc<str>),
    /// The server is shutting down.
    ShuttingDown,
}

impl PublishError {
    /// A storage failure.
    pub fn storage(e: io::Error) -> PublishError {
        PublishError::Storage(Arc::new(e))
    }

    /// A storage failure because the event store cannot be reached (a network engine: Redis),
    /// with a reason that clients are shown as it is (`docs/PROTOCOL.md` 6.4); the other storage
    /// errors are for the server's log only.
    pub fn unreachable(reason: &'static str) -> PublishError {
        PublishError::storage(io::Error::new(io::ErrorKind::NotConnected, Unreachable(reason)))
    }

    /// What a client is told of a storage failure: the reason of [`PublishError::unreachable`],
    /// or that the server's log has the details.
    pub(crate) fn storage_reason(e: &io::Error) -> &'static str {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<Unreachable>()) {
            Some(Unreachable(reason)) => reason,
            None => "event not stored: the store failed; the server's log has the details",
        }
    }
}

/// The reason of [`PublishError::unreachable`].
#[derive(Debug)]
struct Unreachable(&'static str);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.strip_prefix("event not stored: ").unwrap_or(self.0))
    }
}

impl std::error::Error for Unreachable {}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::InvalidPath(e) => write!(f, "invalid path: {e}"),
            PublishError::InvalidId => f.write_str("a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -"),
            PublishError::Storage(e) => write!(f, "event not stored: {e}"),
            PublishError::StoreFull(why) => write!(f, "event not stored: {why}"),
            PublishError::ShuttingDown => f.write_str("server is shutting down"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Where the outcome of a publish goes: to the sending WebSocket connection (encoded there as
/// its ack or error line, in the place reserved for it) or to an in-process caller.
#[derive(Debug)]
pub struct Completion(CompletionTo);

#[derive(Debug)]
enum CompletionTo {
    Reply(crate::session::PendingReply),
    Channel(oneshot::Sender<Result<Timestamp, PublishError>>),
    Replay(oneshot::Sender<Result<Replied, PublishError>>),
}

/// The outcome of a publish whose completion says whether it was a repeat
/// ([`Completion::channel_with_replay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replied {
    /// The event's timestamp (for a repeat, the first one's).
    pub ts: Timestamp,
    /// Whether this was a repeat of a send stored before (same sender and id): nothing was
    /// stored or delivered.
    pub replayed: bool,
}

impl Completion {
    /// A completion whose outcome the returned receiver gets.
    pub fn channel() -> (Completion, oneshot::Receiver<Result<Timestamp, PublishError>>) {
        let (tx, rx) = oneshot::channel();
        (Completion(CompletionTo::Channel(tx)), rx)
    }

    /// A completion whose outcome the returned receiver gets, with whether it was a repeat.
    pub fn channel_with_replay() -> (Completion, oneshot::Receiver<Result<Replied, PublishError>>) {
        let (tx, rx) = oneshot::channel();
        (Completion(CompletionTo::Replay(tx)), rx)
    }

    pub(crate) fn reply(reply: crate::session::PendingReply) -> Completion {
        Completion(CompletionTo::Reply(reply))
    }

    /// Delivers the outcome (never blocks).
    pub fn complete(self, result: Result<Timestamp, PublishError>) {
        match self.0 {
            CompletionTo::Reply(reply) => reply.complete(result),
            CompletionTo::Channel(tx) => {
                let _ = tx.send(result);
            }
            CompletionTo::Replay(tx) => {
                let _ = tx.send(result.map(|ts| Replied { ts, replayed: false }));
            }
        }
    }

    /// Completes a repeat: the send with the same sender and id was stored at `ts` (the
    /// first one's reply: for a WebSocket send, the same `#key#@ts` bytes as a first ack).
    pub fn replayed(self, ts: Timestamp) {
        match self.0 {
            CompletionTo::Replay(tx) => {
                let _ = tx.send(Ok(Replied { ts, replayed: true }));
            }
            other => Completion(other).complete(Ok(ts)),
        }
    }
}

enum Input {
    Publish(Publish),
    /// Requests to store in one group commit ([`Publisher::publish_batch`]).
    Batch(Vec<Publish>),
    Stop,
}

/// The server's end of the publish queue.
#[derive(Debug, Clone)]
pub(crate) struct Publisher(mpsc::Sender<Input>);

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Publish(p) => p.fmt(f),
            Input::Batch(b) => b.fmt(f),
            Input::Stop => f.write_str("Stop"),
        }
    }
}

impl Publisher {
    /// Queues `request`, waiting while the queue is full; a closed engine completes it with
    /// [`PublishError::ShuttingDown`].
    pub(crate) async fn publish(&self, request: Publish) {
        if let Err(mpsc::error::SendError(Input::Publish(r))) = self.0.send(Input::Publish(request)).await {
            r.done.complete(Err(PublishError::ShuttingDown));
        }
    }

    /// Queues `requests` as one entry of the queue, so that the engine takes them together:
    /// [`Requests::continues_batch`] holds between them, and the single-node engine stores them
    /// in one group commit. Waits while the queue is full; a closed engine completes each with
    /// [`PublishError::ShuttingDown`].
    pub(crate) async fn publish_batch(&self, requests: Vec<Publish>) {
        if requests.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(Input::Batch(rs))) = self.0.send(Input::Batch(requests)).await {
            for r in rs {
                r.done.complete(Err(PublishError::ShuttingDown));
            }
        }
    }

    /// Queues `request` if there is room now; gives it back when the queue is full.
    // The `Err` is the request given back, not an error; boxing it would allocate per send.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_publish(&self, request: Publish) -> Result<(), Publish> {
        match self.0.try_send(Input::Publish(request)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Input::Publish(r))) => Err(r),
            Err(mpsc::error::TrySendError::Closed(Input::Publish(r))) => {
                r.done.complete(Err(PublishError::ShuttingDown));
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// Marks the end of the queue: requests queued before this are still served.
    pub(crate) async fn stop(&self) {
        let _ = self.0.send(Input::Stop).await;
    }
}

/// The engine's end of the publish queue: requests in arrival order, until the server stops
/// it. Requests that arrive after the end are refused with [`PublishError::ShuttingDown`]
/// ([`Requests::refuse_rest`]).
#[derive(Debug)]
pub struct Requests {
    rx: mpsc::Receiver<Input>,
    ended: bool,
    /// The rest of a batch being taken, in order.
    batch: std::collections::VecDeque<Publish>,
}

/// How many publish requests wait in the queue before senders wait.
const QUEUE: usize = 16 * 1024;

pub(crate) fn queue() -> (Publisher, Requests) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Publisher(tx), Requests { rx, ended: false, batch: std::collections::VecDeque::new() })
}

impl Requests {
    fn take(&mut self, input: Option<Input>) -> Option<Publish> {
        match input {
            Some(Input::Publish(p)) if !self.ended => Some(p),
            Some(Input::Publish(p)) => {
                p.done.complete(Err(PublishError::ShuttingDown));
                None
            }
            Some(Input::Batch(b)) if !self.ended => {
                self.batch.extend(b);
                self.batch.pop_front()
            }
            Some(Input::Batch(b)) => {
                for p in b {
                    p.done.complete(Err(PublishError::ShuttingDown));
                }
                None
            }
            Some(Input::Stop) | None => {
                self.ended = true;
                None
            }
        }
    }

    /// The next request, blocking the thread while there is none; `None` at the end of the
    /// queue. Never call it from an async task.
    pub fn blocking_next(&mut self) -> Option<Publish> {
        if let Some(p) = self.batch.pop_front() {
            return Some(p);
        }
        if self.ended {
            return None;
        }
        let input = self.rx.blocking_recv();
        self.take(input)
    }

    /// The next request; `None` at the end of the queue.
    pub async fn next(&mut self) -> Option<Publish> {
        if let Some(p) = self.batch.pop_front() {
            return Some(p);
        }
        if self.ended {
            return None;
        }
        let input = self.rx.recv().await;
        self.take(input)
    }

    /// A request already waiting, without waiting; `None` when there is none or at the end.
    pub fn try_next(&mut self) -> Option<Publish> {
        if let Some(p) = self.batch.pop_front() {
            return Some(p);
        }
        if self.ended {
            return None;
        }
        let input = match self.rx.try_recv() {
            Ok(input) => Some(input),
            Err(mpsc::error::TryRecvError::Empty) => return None,
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        self.take(input)
    }

    /// Whether the request taken last was submitted together with the next one (one HTTP
    /// `POST /publish`): an engine that groups requests into commits takes the next one into
    /// the same commit, also beyond its batch limits (a batch is bounded by its request's caps).
    pub fn continues_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Whether the end of the queue was reached.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// After the end: refuses every request still queued or arriving later.
    pub fn refuse_rest(&mut self) {
        self.ended = true;
        self.rx.close();
        for p in self.batch.drain(..) {
            p.done.complete(Err(PublishError::ShuttingDown));
        }
        while let Ok(input) = self.rx.try_recv() {
            match input {
                Input::Publish(p) => p.done.complete(Err(PublishError::ShuttingDown)),
                Input::Batch(b) => b.into_iter().for_each(|p| p.done.complete(Err(PublishError::ShuttingDown))),
                Input::Stop => {}
            }
        }
    }
}
