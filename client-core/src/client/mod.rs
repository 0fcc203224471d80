//! The sans-IO client: a state machine that keeps subscriptions gap-free and duplicate-free
//! across disconnects, reconnects and server restarts.
//!
//! It owns no socket, clock, timer or random source. A driver (tokio in `ivy-client-native`,
//! the browser in `ivy-client-wasm`) feeds it inputs and carries out its outputs, in the style
//! of `quinn-proto`:
//!
//! - inputs: [`Client::start`], [`Client::handle_connected`], [`Client::handle_frame`],
//!   [`Client::handle_activity`], [`Client::handle_disconnected`],
//!   [`Client::handle_timeout`], [`Client::handle_log_page`];
//! - commands from the application: [`Client::subscribe`], [`Client::unsubscribe`],
//!   [`Client::send`], [`Client::timestamp`], [`Client::close`];
//! - outputs, to drain after every input or command: [`Client::poll_action`] (open the
//!   WebSocket, send a frame, drop the connection, fetch a log page),
//!   [`Client::poll_event`] (events and results for the application) and
//!   [`Client::poll_timeout`] (when to call [`Client::handle_timeout`] next).
//!
//! Time is a plain millisecond count from any fixed origin ([`Millis`]); randomness (the
//! backoff jitter) comes from a seed given at construction.
//!
//! # The delivery promise
//!
//! Each subscription delivers every event of its channel (the channel and its descendants)
//! exactly once, in timestamp order, or emits [`ClientEvent::ContinuityLost`]. How:
//!
//! - after each (re)connect every subscription is renewed with an acked `+path`; the ack
//!   carries the position `P`: events after `P` arrive live, events up to `P` are in the log;
//! - the events between the last one delivered and `P` are fetched from the log, page by
//!   page, and merged with the live events that arrive meanwhile in one buffer ordered and
//!   deduplicated by timestamp; an event is delivered only when everything before it is known;
//! - the client's own sends (which the server does not echo) are inserted at their ack's
//!   timestamp, so they appear in matching subscriptions in their place, once;
//! - if the server reports a position before the last delivered event (it lost events that
//!   were delivered, for example after a crash in asynchronous durability mode),
//!   [`ClientEvent::ContinuityLost`] says so and delivery resumes after the last event.
//!
//! # Sends while disconnected
//!
//! A send made while disconnected is queued (up to [`Config::offline_queue`]) and sent after
//! the next connection is up; beyond that, or with a queue of 0, it fails at once with
//! [`ClientError::NotConnected`]. A send already written to a connection that then drops
//! fails with [`ClientError::ConnectionLost`]: it may or may not have been stored, and if it
//! was, it appears in the subscriptions' backfill. Nothing is retried behind the
//! application's back, so nothing is ever published twice.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

mod collections;
use collections::{MergeBuf, VecMap};
use core::fmt;

use crate::path::{self, PathError};
use crate::timestamp::Timestamp;
use crate::wire::{Command, Event, Op, ServerLine, parse_event, parse_line};

/// Milliseconds from an arbitrary fixed origin chosen by the driver (monotonic).
pub type Millis = u64;

/// Tuning of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Smallest reconnect backoff ceiling (the first retry waits a random time up to this).
    pub min_backoff: Millis,
    /// Largest reconnect backoff ceiling (it wins when below `min_backoff`).
    pub max_backoff: Millis,
    /// How long one connection attempt may take.
    pub connect_timeout: Millis,
    /// How long a send or timestamp request waits for its reply.
    pub request_timeout: Millis,
    /// With no frame received for this long, the client sends a probe (`@`).
    pub idle_timeout: Millis,
    /// With no frame received this long after a probe, the connection is dead: reconnect.
    pub probe_timeout: Millis,
    /// Events per log page when backfilling.
    pub page_limit: u32,
    /// Sends queued while disconnected; 0 fails them at once.
    pub offline_queue: usize,
    /// Live events buffered per subscription while it backfills; beyond this, buffered live
    /// events are dropped and fetched from the log instead (memory stays bounded).
    pub max_buffered: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            min_backoff: 250,
            max_backoff: 30_000,
            connect_timeout: 10_000,
            request_timeout: 30_000,
            idle_timeout: 30_000,
            probe_timeout: 10_000,
            page_limit: 1000,
            offline_queue: 1000,
            max_buffered: 10_000,
        }
    }
}

/// Identifies a subscription of this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId(pub u64);

/// Identifies a send or timestamp request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// With the events after the subscription takes effect on the server.
    #[default]
    Now,
    /// With the whole history of the channel.
    Beginning,
    /// With the events after this timestamp (for example the last one the application saw).
    After(Timestamp),
}

/// The connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// [`Client::start`] was not called yet.
    Idle,
    /// A connection attempt is under way (`attempt` counts failures since the last success).
    Connecting {
        /// Failed attempts before this one.
        attempt: u32,
    },
    /// Connected.
    Connected,
    /// Waiting before the next attempt.
    Reconnecting {
        /// Failed attempts so far.
        attempt: u32,
        /// When the next attempt starts.
        retry_at: Millis,
    },
    /// [`Client::close`] was called.
    Closed,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the WebSocket; then call [`Client::handle_connected`] or
    /// [`Client::handle_disconnected`].
    Connect,
    /// Send this text frame on the open WebSocket.
    Send(String),
    /// Drop the current connection or connection attempt. Do not call
    /// [`Client::handle_disconnected`] for it: the client already counts it as gone.
    Disconnect,
    /// Fetch a log page; then call [`Client::handle_log_page`].
    FetchLog(LogRequest),
}

/// A log page to fetch: `GET {http base}{target}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    /// Pass back to [`Client::handle_log_page`].
    pub id: u64,
    /// Normalized channel path.
    pub path: String,
    /// Exclusive cursor (`None`: from the beginning).
    pub after: Option<Timestamp>,
    /// Page size.
    pub limit: u32,
}

impl LogRequest {
    /// The request target: `/log/chat?after=...&limit=...`.
    pub fn target(&self) -> String {
        log_target(&self.path, self.after, Some(self.limit))
    }
}

/// A server's endpoints, derived from its base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The WebSocket endpoint: `ws://host:port/prefix/ws` (`wss://` with TLS).
    pub ws: String,
    /// The HTTP base of the log endpoint: `http://host:port/prefix` (`https://` with TLS);
    /// log targets ([`LogRequest::target`]) are appended to it.
    pub http: String,
    /// Whether the URL asked for TLS (`wss://` or `https://`).
    pub tls: bool,
}

impl Endpoints {
    /// Derives the endpoints from `ws://host[:port][/prefix]` (or `http://`, `wss://`,
    /// `https://`); a trailing `/` or `/ws` is accepted.
    pub fn from_base(url: &str) -> Result<Endpoints, String> {
        let bad = || format!("invalid server URL \"{url}\": expected ws://host:port (or wss://, http://, https://)");
        let (scheme, rest) = url.trim().split_once("://").ok_or_else(bad)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return Err(bad()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['?', '#', '@']) {
            return Err(bad());
        }
        let mut prefix = path.trim_end_matches('/');
        if let Some(p) = prefix.strip_suffix("/ws") {
            prefix = p;
        }
        if prefix.contains(['?', '#']) {
            return Err(bad());
        }
        let (ws, http) = if tls { ("wss", "https") } else { ("ws", "http") };
        Ok(Endpoints { ws: format!("{ws}://{authority}{prefix}/ws"), http: format!("{http}://{authority}{prefix}"), tls })
    }
}

/// The target of a log request: `/log{path}?after=..&limit=..` (root: `/log/`).
pub fn log_target(path: &str, after: Option<Timestamp>, limit: Option<u32>) -> String {
    let mut t = if path == path::ROOT { "/log/".to_string() } else { format!("/log{path}") };
    let mut sep = '?';
    if let Some(a) = after {
        t.push_str(&format!("{sep}after={a}"));
        sep = '&';
    }
    if let Some(l) = limit {
        t.push_str(&format!("{sep}limit={l}"));
    }
    t
}

/// Parses a log response body (event lines joined by `\n`).
pub fn parse_log(body: &str) -> Result<Vec<Event<'static>>, crate::wire::LineError> {
    body.split('\n').filter(|l| !l.is_empty()).map(|l| parse_event(l.as_bytes()).map(Event::into_owned)).collect()
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The path is invalid; nothing was sent.
    InvalidPath(PathError),
    /// The server refused the command (`!code message`).
    Server {
        /// The error code (see [`crate::ErrorCode`]).
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The connection dropped after the request was sent and before its reply: a send may
    /// or may not have been stored (if it was, it is in the log and in the backfill).
    ConnectionLost,
    /// Not connected, and the request cannot wait (timestamp) or the offline queue is full
    /// or disabled (send). Nothing was sent.
    NotConnected,
    /// No reply within [`Config::request_timeout`]; a send may or may not have been stored.
    Timeout,
    /// The client was closed.
    Closed,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::InvalidPath(e) => write!(f, "invalid path: {e}"),
            ClientError::Server { code, message } => write!(f, "server refused ({code}): {message}"),
            ClientError::ConnectionLost => f.write_str("connection lost before the reply; the event may or may not have been stored"),
            ClientError::NotConnected => f.write_str("not connected"),
            ClientError::Timeout => f.write_str("no reply in time; the event may or may not have been stored"),
            ClientError::Closed => f.write_str("client closed"),
        }
    }
}

impl core::error::Error for ClientError {}

/// What the client tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// An event of a subscription, in order, exactly once.
    Event {
        /// The subscription.
        sub: SubId,
        /// The event.
        event: Event<'static>,
    },
    /// The server's history no longer contains events this subscription already delivered
    /// (it lost them): delivery continues after `last`.
    ContinuityLost {
        /// The subscription.
        sub: SubId,
        /// The last event delivered.
        last: Timestamp,
        /// The server's position, before `last`.
        position: Timestamp,
    },
    /// The server refused a subscription; it was removed.
    SubscribeFailed {
        /// The subscription.
        sub: SubId,
        /// Why.
        error: ClientError,
    },
    /// Outcome of [`Client::send`]: the event's timestamp once stored.
    Sent {
        /// The request.
        id: RequestId,
        /// The timestamp, or why it failed.
        result: Result<Timestamp, ClientError>,
    },
    /// Outcome of [`Client::timestamp`].
    Time {
        /// The request.
        id: RequestId,
        /// The server time, or why it failed.
        result: Result<Timestamp, ClientError>,
    },
    /// The connection state changed.
    State(ConnState),
    /// Something unexpected from the server or a log fetch (reported, then retried or
    /// skipped as described in the message).
    Warning(String),
}

#[derive(Debug)]
enum Pending {
    Subscribe(SubId),
    Unsubscribe,
    Send { id: RequestId, path: String, data: Vec<u8>, deadline: Millis },
    Time { id: RequestId, deadline: Millis },
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not subscribed on the current connection (or no connection).
    Offline,
    /// `+path` sent, waiting for the position.
    Subscribing,
    /// Fetching the log up to the position.
    Backfilling,
    /// Caught up: live events are delivered as they come.
    Live,
}

#[derive(Debug)]
struct Sub {
    path: String,
    /// Where to start; consumed by the first subscription ack.
    start: Option<Start>,
    /// The last timestamp delivered (or the start cursor).
    last: Timestamp,
    phase: Phase,
    /// Events waiting for delivery, by timestamp (deduplicates).
    buf: MergeBuf,
    /// Everything up to here is in `buf` or delivered.
    complete: Timestamp,
    /// The subscription position: backfill until `complete >= target`.
    target: Timestamp,
    /// The outstanding log request and its cursor.
    log_req: Option<(u64, Option<Timestamp>)>,
    /// When to retry a failed log request.
    log_retry: Option<Millis>,
    /// When the outstanding log request counts as lost and is made again.
    log_deadline: Option<Millis>,
    log_failures: u32,
}

#[derive(Debug)]
struct QueuedSend {
    id: RequestId,
    path: String,
    data: Vec<u8>,
    queued_at: Millis,
}

/// The client state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    rng: u64,
    state: ConnState,
    attempt: u32,
    /// Connect deadline (Connecting) or retry time (Reconnecting).
    deadline: Option<Millis>,
    next_key: u64,
    next_id: u64,
    /// Outstanding requests by ack key (keys are decimal numbers on the wire).
    pending: VecMap<u64, Pending>,
    subs: VecMap<SubId, Sub>,
    offline: VecDeque<QueuedSend>,
    actions: VecDeque<Action>,
    events: VecDeque<ClientEvent>,
    last_rx: Millis,
    /// The latest time given by any input (for deadlines set inside the machine).
    now: Millis,
    probe_deadline: Option<Millis>,
    got_frame: bool,
}

impl Client {
    /// A client with `config`, seeding its jitter with `seed`.
    pub fn new(config: Config, seed: u64) -> Client {
        Client {
            cfg: config,
            rng: seed | 1,
            state: ConnState::Idle,
            attempt: 0,
            deadline: None,
            next_key: 1,
            next_id: 1,
            pending: VecMap::new(),
            subs: VecMap::new(),
            offline: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: 0,
            now: 0,
            probe_deadline: None,
            got_frame: false,
        }
    }

    // ----- getters -----

    /// The connection state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The normalized path of a subscription.
    pub fn sub_path(&self, sub: SubId) -> Option<&str> {
        self.subs.get(&sub).map(|s| s.path.as_str())
    }

    /// The last timestamp a subscription delivered (its resume cursor).
    pub fn sub_last(&self, sub: SubId) -> Option<Timestamp> {
        self.subs.get(&sub).map(|s| s.last)
    }

    /// Whether every subscription has caught up (live).
    pub fn is_live(&self) -> bool {
        self.state == ConnState::Connected && self.subs.values().all(|s| s.phase == Phase::Live)
    }

    // ----- outputs -----

    /// The next thing the driver must do.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut t = self.deadline;
        let mut min = |d: Option<Millis>| {
            if let Some(d) = d {
                t = Some(t.map_or(d, |t| t.min(d)));
            }
        };
        if self.state == ConnState::Connected {
            min(Some(self.probe_deadline.unwrap_or(self.last_rx.saturating_add(self.cfg.idle_timeout))));
            for p in self.pending.values() {
                if let Pending::Send { deadline, .. } | Pending::Time { deadline, .. } = p {
                    min(Some(*deadline));
                }
            }
            for s in self.subs.values() {
                min(s.log_retry);
                min(s.log_deadline);
            }
        }
        for q in &self.offline {
            min(Some(q.queued_at.saturating_add(self.cfg.request_timeout)));
        }
        t
    }

    // ----- commands from the application -----

    /// Starts connecting (once; later connections are automatic).
    pub fn start(&mut self, now: Millis) {
        self.now = self.now.max(now);
        if self.state == ConnState::Idle {
            self.begin_attempt(now);
        }
    }

    /// Subscribes to `path` (normalized here) from `start`.
    pub fn subscribe(&mut self, path: &str, start: Start) -> Result<SubId, ClientError> {
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        if self.state == ConnState::Closed {
            return Err(ClientError::Closed);
        }
        let id = SubId(self.id());
        let sub = Sub {
            path,
            start: Some(start),
            last: Timestamp::ZERO,
            phase: Phase::Offline,
            buf: MergeBuf::default(),
            complete: Timestamp::ZERO,
            target: Timestamp::ZERO,
            log_req: None,
            log_retry: None,
            log_deadline: None,
            log_failures: 0,
        };
        self.subs.insert(id, sub);
        if self.state == ConnState::Connected {
            self.send_subscribe(id);
        }
        Ok(id)
    }

    /// Ends a subscription; no event of it is delivered after this call.
    pub fn unsubscribe(&mut self, sub: SubId) {
        let Some(s) = self.subs.remove(&sub) else { return };
        if self.state == ConnState::Connected && s.phase != Phase::Offline && !self.subs.values().any(|o| o.path == s.path) {
            let (key, wire) = self.key();
            let line = Command { ack: Some(wire.as_bytes()), op: Op::Unsubscribe(s.path.as_str().into()) }.to_bytes();
            self.pending.insert(key, Pending::Unsubscribe);
            self.push_frame(line);
        }
    }

    /// Publishes `data` on `path`. The outcome arrives as [`ClientEvent::Sent`].
    pub fn send(&mut self, now: Millis, path: &str, data: &str) -> Result<RequestId, ClientError> {
        self.now = self.now.max(now);
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        let id = RequestId(self.id());
        match self.state {
            ConnState::Closed => Err(ClientError::Closed),
            ConnState::Connected => {
                self.transmit_send(now, id, path, data.as_bytes().to_vec());
                Ok(id)
            }
            _ if self.offline.len() < self.cfg.offline_queue => {
                self.offline.push_back(QueuedSend { id, path, data: data.as_bytes().to_vec(), queued_at: now });
                Ok(id)
            }
            _ => Err(ClientError::NotConnected),
        }
    }

    /// Asks for the server time; the outcome arrives as [`ClientEvent::Time`].
    pub fn timestamp(&mut self, now: Millis) -> Result<RequestId, ClientError> {
        match self.state {
            ConnState::Connected => {
                let id = RequestId(self.id());
                let (key, wire) = self.key();
                let line = Command { ack: Some(wire.as_bytes()), op: Op::Timestamp }.to_bytes();
                self.pending.insert(key, Pending::Time { id, deadline: now.saturating_add(self.cfg.request_timeout) });
                self.push_frame(line);
                Ok(id)
            }
            ConnState::Closed => Err(ClientError::Closed),
            _ => Err(ClientError::NotConnected),
        }
    }

    /// Closes the client: drops the connection, fails what is pending with
    /// [`ClientError::Closed`].
    pub fn close(&mut self) {
        if self.state == ConnState::Closed {
            return;
        }
        if matches!(self.state, ConnState::Connected | ConnState::Connecting { .. }) {
            self.actions.push_back(Action::Disconnect);
        }
        self.fail_pending(ClientError::Closed);
        while let Some(q) = self.offline.pop_front() {
            self.events.push_back(ClientEvent::Sent { id: q.id, result: Err(ClientError::Closed) });
        }
        self.subs.clear();
        self.deadline = None;
        self.set_state(ConnState::Closed);
    }

    // ----- inputs from the driver -----

    /// The WebSocket is open.
    pub fn handle_connected(&mut self, now: Millis) {
        self.now = self.now.max(now);
        if !matches!(self.state, ConnState::Connecting { .. }) {
            return;
        }
        self.deadline = None;
        self.last_rx = now;
        self.probe_deadline = None;
        self.got_frame = false;
        self.set_state(ConnState::Connected);
        let ids: Vec<SubId> = self.subs.keys().copied().collect();
        for id in ids {
            self.send_subscribe(id);
        }
        while let Some(q) = self.offline.pop_front() {
            self.transmit_send(now, q.id, q.path, q.data);
        }
    }

    /// A non-text frame (ping, pong) arrived: the connection is alive.
    pub fn handle_activity(&mut self, now: Millis) {
        self.now = self.now.max(now);
        self.last_rx = now;
        self.probe_deadline = None;
    }

    /// A text frame arrived.
    pub fn handle_frame(&mut self, now: Millis, frame: &str) {
        if self.state != ConnState::Connected {
            return;
        }
        self.handle_activity(now);
        if !self.got_frame {
            // The server answers: the connection works, so backoff starts over.
            self.got_frame = true;
            self.attempt = 0;
        }
        match parse_line(frame.as_bytes()) {
            Ok(ServerLine::Event(ev)) => self.route(ev.into_owned()),
            Ok(ServerLine::Ack { key, ts }) => self.on_reply(now, key, Ok(ts)),
            Ok(ServerLine::Error { key: Some(key), code, message }) => {
                let err = ClientError::Server { code: code.to_string(), message: message.to_string() };
                self.on_reply(now, key, Err(err));
            }
            Ok(ServerLine::Error { key: None, code, message }) => {
                self.events.push_back(ClientEvent::Warning(format!("server error without ack key: {code} {message}")));
            }
            Err(e) => self.events.push_back(ClientEvent::Warning(format!("unparsable line from the server ({e}): \"{frame}\""))),
        }
    }

    /// The WebSocket closed or failed, or the connection attempt failed.
    pub fn handle_disconnected(&mut self, now: Millis) {
        self.now = self.now.max(now);
        if matches!(self.state, ConnState::Connected | ConnState::Connecting { .. }) {
            self.on_disconnect(now);
        }
    }

    /// A deadline from [`Client::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.now = self.now.max(now);
        // Offline sends that waited too long.
        while self.offline.front().is_some_and(|q| q.queued_at.saturating_add(self.cfg.request_timeout) <= now) {
            if let Some(q) = self.offline.pop_front() {
                self.events.push_back(ClientEvent::Sent { id: q.id, result: Err(ClientError::Timeout) });
            }
        }
        match self.state {
            ConnState::Reconnecting { .. } if self.deadline.is_some_and(|d| d <= now) => self.begin_attempt(now),
            ConnState::Connecting { .. } if self.deadline.is_some_and(|d| d <= now) => {
                self.actions.push_back(Action::Disconnect);
                self.on_disconnect(now);
            }
            ConnState::Connected => self.connected_timeouts(now),
            _ => {}
        }
    }

    /// A log page requested by [`Action::FetchLog`] arrived (`Ok(body)`) or failed.
    pub fn handle_log_page(&mut self, now: Millis, id: u64, result: Result<&str, String>) {
        self.now = self.now.max(now);
        let Some((sid, after)) = self.subs.iter().find_map(|(sid, s)| match s.log_req {
            Some((rid, after)) if rid == id => Some((*sid, after)),
            _ => None,
        }) else {
            return; // stale: the subscription moved on
        };
        let parsed = result.and_then(|body| parse_log(body).map_err(|e| format!("unparsable log line: {e}")));
        let s = self.subs.get_mut(&sid).expect("found above");
        s.log_req = None;
        s.log_deadline = None;
        match parsed {
            Err(e) => {
                s.log_failures += 1;
                let delay = backoff_ceiling(&self.cfg, s.log_failures);
                s.log_retry = Some(now.saturating_add(delay));
                let path = s.path.clone();
                self.events.push_back(ClientEvent::Warning(format!("log fetch for {path} failed ({e}); retrying")));
            }
            Ok(events) => {
                s.log_failures = 0;
                match events.last().map(|e| e.ts) {
                    // A page is a contiguous stretch of the log after the cursor: everything up
                    // to its newest event is now known. (Whether it was "full" is not trusted:
                    // the server may cap the limit.)
                    Some(newest) => s.complete = s.complete.max(newest),
                    // Nothing after the cursor: the log shows every event up to the position
                    // (the server makes events visible in the log before it acks a subscribe).
                    None => s.complete = s.complete.max(s.target).max(after.unwrap_or(Timestamp::ZERO)),
                }
                for ev in events {
                    if ev.ts > s.last && path::is_within(&ev.path, &s.path) {
                        s.buf.push_page(ev);
                    }
                }
                self.advance(sid);
            }
        }
    }

    // ----- internals -----

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A fresh ack key and its wire form.
    fn key(&mut self) -> (u64, String) {
        let k = self.next_key;
        self.next_key += 1;
        (k, k.to_string())
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn set_state(&mut self, state: ConnState) {
        if self.state != state {
            self.state = state;
            self.events.push_back(ClientEvent::State(state));
        }
    }

    fn push_frame(&mut self, line: Vec<u8>) {
        // Commands are built from UTF-8 parts (paths are ASCII, data is `&str`).
        let text = String::from_utf8(line).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        self.actions.push_back(Action::Send(text));
    }

    fn begin_attempt(&mut self, now: Millis) {
        self.deadline = Some(now.saturating_add(self.cfg.connect_timeout));
        self.set_state(ConnState::Connecting { attempt: self.attempt });
        self.actions.push_back(Action::Connect);
    }

    fn on_disconnect(&mut self, now: Millis) {
        self.fail_pending(ClientError::ConnectionLost);
        for s in self.subs.values_mut() {
            s.phase = Phase::Offline;
            s.buf.clear();
            s.log_req = None;
            s.log_retry = None;
            s.log_deadline = None;
        }
        self.probe_deadline = None;
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter: a random delay up to the exponential ceiling.
        let ceiling = backoff_ceiling(&self.cfg, self.attempt);
        let delay = self.random() % ceiling.max(1);
        let retry_at = now.saturating_add(delay);
        self.deadline = Some(retry_at);
        self.set_state(ConnState::Reconnecting { attempt: self.attempt, retry_at });
    }

    fn fail_pending(&mut self, err: ClientError) {
        let mut failed: Vec<ClientEvent> = Vec::new();
        for (_, p) in self.pending.drain() {
            match p {
                Pending::Send { id, .. } => failed.push(ClientEvent::Sent { id, result: Err(err.clone()) }),
                Pending::Time { id, .. } => failed.push(ClientEvent::Time { id, result: Err(err.clone()) }),
                Pending::Subscribe(_) | Pending::Unsubscribe | Pending::Probe => {}
            }
        }
        // `pending` is ordered by ack key, which follows request order.
        self.events.extend(failed);
    }

    fn connected_timeouts(&mut self, now: Millis) {
        // Dead-connection detection: probe after silence, give up after the probe's timeout.
        match self.probe_deadline {
            Some(d) if d <= now => {
                self.events.push_back(ClientEvent::Warning("no answer to the probe: connection is dead, reconnecting".into()));
                self.actions.push_back(Action::Disconnect);
                self.on_disconnect(now);
                return;
            }
            None if self.last_rx.saturating_add(self.cfg.idle_timeout) <= now => {
                let (key, wire) = self.key();
                let line = Command { ack: Some(wire.as_bytes()), op: Op::Timestamp }.to_bytes();
                self.pending.insert(key, Pending::Probe);
                self.push_frame(line);
                self.probe_deadline = Some(now.saturating_add(self.cfg.probe_timeout));
            }
            _ => {}
        }
        // Requests without a reply in time.
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Send { deadline, .. } | Pending::Time { deadline, .. } if *deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            match self.pending.remove(&key) {
                Some(Pending::Send { id, .. }) => self.events.push_back(ClientEvent::Sent { id, result: Err(ClientError::Timeout) }),
                Some(Pending::Time { id, .. }) => self.events.push_back(ClientEvent::Time { id, result: Err(ClientError::Timeout) }),
                _ => {}
            }
        }
        // Log pages with no answer in time: the request is abandoned (a late answer is ignored,
        // its id no longer matches) and made again.
        let mut lost_page = false;
        for s in self.subs.values_mut() {
            if s.log_deadline.is_some_and(|d| d <= now) {
                s.log_req = None;
                s.log_deadline = None;
                s.log_retry = Some(now);
                lost_page = true;
            }
        }
        if lost_page {
            self.events.push_back(ClientEvent::Warning("a log page got no answer in time; requesting it again".into()));
        }
        // Log fetches to retry.
        let due: Vec<SubId> = self.subs.iter().filter(|(_, s)| s.log_retry.is_some_and(|r| r <= now)).map(|(id, _)| *id).collect();
        for sid in due {
            if let Some(s) = self.subs.get_mut(&sid) {
                s.log_retry = None;
            }
            self.request_page(sid);
        }
    }

    fn send_subscribe(&mut self, id: SubId) {
        let (key, wire) = self.key();
        let Some(s) = self.subs.get_mut(&id) else { return };
        s.phase = Phase::Subscribing;
        let line = Command { ack: Some(wire.as_bytes()), op: Op::Subscribe(s.path.as_str().into()) }.to_bytes();
        self.pending.insert(key, Pending::Subscribe(id));
        self.push_frame(line);
    }

    fn transmit_send(&mut self, now: Millis, id: RequestId, path: String, data: Vec<u8>) {
        let (key, wire) = self.key();
        let line = Command { ack: Some(wire.as_bytes()), op: Op::Send { path: path.as_str().into(), data: &data } }.to_bytes();
        self.pending.insert(key, Pending::Send { id, path, data, deadline: now.saturating_add(self.cfg.request_timeout) });
        self.push_frame(line);
    }

    fn on_reply(&mut self, _now: Millis, key: &[u8], result: Result<Timestamp, ClientError>) {
        let Some(p) = core::str::from_utf8(key).ok().and_then(|k| k.parse::<u64>().ok()).and_then(|k| self.pending.remove(&k)) else {
            self.events.push_back(ClientEvent::Warning(format!("reply with unknown ack key \"{}\"", String::from_utf8_lossy(key))));
            return;
        };
        match p {
            Pending::Probe | Pending::Unsubscribe => {}
            Pending::Time { id, .. } => self.events.push_back(ClientEvent::Time { id, result }),
            Pending::Send { id, path, data, .. } => {
                if let Ok(ts) = result {
                    // The server does not echo our own events: insert them in place.
                    let ev = Event { ts, path: path.into(), data: data.into() };
                    let matching: Vec<SubId> =
                        self.subs.iter().filter(|(_, s)| path::is_within(&ev.path, &s.path)).map(|(id, _)| *id).collect();
                    for sid in matching {
                        self.offer(sid, ev.clone());
                    }
                }
                self.events.push_back(ClientEvent::Sent { id, result });
            }
            Pending::Subscribe(sid) => match result {
                Ok(position) => self.on_subscribed(sid, position),
                Err(error) => {
                    self.subs.remove(&sid);
                    self.events.push_back(ClientEvent::SubscribeFailed { sub: sid, error });
                }
            },
        }
    }

    fn on_subscribed(&mut self, sid: SubId, position: Timestamp) {
        let Some(s) = self.subs.get_mut(&sid) else { return };
        if s.phase != Phase::Subscribing {
            return;
        }
        s.target = position;
        match s.start.take() {
            Some(Start::Now) => s.last = position,
            Some(Start::Beginning) => s.last = Timestamp::ZERO,
            // The application's cursor may be later than the position (a server time, say).
            Some(Start::After(t)) => s.last = t,
            // A renewal: `last` is an event this subscription delivered. A position before it
            // means the server no longer has it.
            None if s.last > position => {
                self.events.push_back(ClientEvent::ContinuityLost { sub: sid, last: s.last, position });
            }
            None => {}
        }
        s.complete = s.last;
        s.target = s.target.max(s.last);
        // Live events up to the cursor are old news.
        let last = s.last;
        s.buf.drop_upto(last);
        s.phase = Phase::Backfilling;
        self.advance(sid);
    }

    /// Delivers what is deliverable, and either requests the next log page or goes live.
    fn advance(&mut self, sid: SubId) {
        let Some(s) = self.subs.get_mut(&sid) else { return };
        if s.phase == Phase::Backfilling && s.complete >= s.target {
            s.phase = Phase::Live;
        }
        let upto = if s.phase == Phase::Live { Timestamp::MAX } else { s.complete };
        while let Some(ev) = s.buf.pop_upto(upto) {
            if ev.ts > s.last {
                s.last = ev.ts;
                self.events.push_back(ClientEvent::Event { sub: sid, event: ev });
            }
        }
        if s.phase == Phase::Backfilling && s.log_req.is_none() && s.log_retry.is_none() {
            self.request_page(sid);
        }
    }

    fn request_page(&mut self, sid: SubId) {
        let id = self.id();
        let limit = self.cfg.page_limit;
        let Some(s) = self.subs.get_mut(&sid) else { return };
        if s.phase != Phase::Backfilling {
            return;
        }
        let after = (s.complete > Timestamp::ZERO).then_some(s.complete);
        s.log_req = Some((id, after));
        s.log_deadline = Some(self.now.saturating_add(self.cfg.request_timeout));
        self.actions.push_back(Action::FetchLog(LogRequest { id, path: s.path.clone(), after, limit }));
    }

    /// Hands a live (or own) event to a subscription.
    fn offer(&mut self, sid: SubId, ev: Event<'static>) {
        let max = self.cfg.max_buffered;
        let Some(s) = self.subs.get_mut(&sid) else { return };
        if ev.ts <= s.last {
            return; // already delivered
        }
        match s.phase {
            Phase::Offline => {}
            Phase::Live if s.buf.is_empty() => {
                s.last = ev.ts;
                self.events.push_back(ClientEvent::Event { sub: sid, event: ev });
            }
            Phase::Live => {
                s.buf.push_live(ev);
                self.advance(sid);
            }
            Phase::Subscribing | Phase::Backfilling => {
                s.buf.push_live(ev);
                if s.buf.len() > max {
                    // Bounded memory: everything live is also in the log, so forget the
                    // buffered events beyond what is complete and fetch them from the log.
                    if let Some(newest) = s.buf.forget_live_after(s.complete) {
                        s.target = s.target.max(newest);
                    }
                }
            }
        }
    }

    /// Routes a live event to every subscription whose channel it belongs to.
    fn route(&mut self, ev: Event<'static>) {
        let matching: Vec<SubId> = self.subs.iter().filter(|(_, s)| path::is_within(&ev.path, &s.path)).map(|(id, _)| *id).collect();
        for sid in matching {
            self.offer(sid, ev.clone());
        }
    }
}

fn backoff_ceiling(cfg: &Config, attempt: u32) -> Millis {
    let exp = cfg.min_backoff.saturating_mul(1u64 << attempt.min(32).saturating_sub(1));
    // Not `clamp`, which panics when the bounds are crossed: a `max_backoff` below
    // `min_backoff` (a user's option) caps it.
    exp.max(cfg.min_backoff).min(cfg.max_backoff).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_crossed_bounds_do_not_panic() {
        let cfg = Config { min_backoff: 250, max_backoff: 30_000, ..Config::default() };
        let ceilings: alloc::vec::Vec<Millis> = (0..10).map(|a| backoff_ceiling(&cfg, a)).collect();
        assert_eq!(ceilings, [250, 250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        assert_eq!(backoff_ceiling(&cfg, u32::MAX), 30_000);
        let crossed = Config { min_backoff: 250, max_backoff: 100, ..Config::default() };
        assert!((0..40).all(|a| backoff_ceiling(&crossed, a) == 100));
        let zero = Config { min_backoff: 0, max_backoff: 0, ..Config::default() };
        assert_eq!(backoff_ceiling(&zero, 3), 1);
    }
}
