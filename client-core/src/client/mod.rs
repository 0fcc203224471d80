//! The sans-IO client: a state machine that keeps subscriptions gap-free and duplicate-free
//! across disconnects, reconnects and server restarts.
//!
//! It owns no socket, clock, timer or random source. A driver (tokio in `ivy-client-native`,
//! the browser in `ivy-client-wasm`) feeds it inputs and carries out its outputs, in the style
//! of `quinn-proto`:
//!
//! - getters: [`Client::state`], [`Client::sub_path`], [`Client::sub_last`],
//!   [`Client::is_live`], and for diagnostics [`Client::debug_state`] (with [`Trace`], a
//!   ring of recent I/O that a driver may keep: `debug.rs`);
//! - inputs: [`Client::start`], [`Client::handle_connected`], [`Client::handle_frame`],
//!   [`Client::handle_activity`], [`Client::handle_disconnected`] (or
//!   [`Client::handle_close`] with the close code), [`Client::handle_unauthorized`],
//!   [`Client::handle_timeout`], [`Client::handle_log_page`], [`Client::set_token`],
//!   [`Client::handle_token`] (see [Tokens](#tokens));
//! - commands from the application: [`Client::subscribe`], [`Client::unsubscribe`],
//!   [`Client::send`], [`Client::timestamp`], [`Client::watch_presence`],
//!   [`Client::unwatch_presence`], [`Client::who`], [`Client::close`];
//! - outputs, to drain after every input or command: [`Client::poll_action`] (open the
//!   WebSocket, send a frame, drop the connection, fetch a log page, ask for a token),
//!   [`Client::poll_event`] (events and results for the application) and
//!   [`Client::poll_timeout`] (when to call [`Client::handle_timeout`] next).
//!
//! Time is a plain millisecond count from any fixed origin ([`Millis`]), passed to every
//! input and command: the machine has no clock of its own. Randomness comes from the driver:
//! a seed at construction (the backoff jitter) and the instance of the send ids
//! ([`Config::instance`]).
//!
//! The machine is split the way quinn-proto splits its `Connection`: this module
//! orchestrates the connection's lifecycle (connect, backoff, keepalive) and routing; each
//! subscription's backfill is its own machine (`subscription.rs`), the requests awaiting
//! replies and the offline queue are another (`requests.rs`), and the connection's timers are
//! a table (`timer.rs`).
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
//!   timestamp, so they appear in matching subscriptions in their place, once; while one is
//!   unacknowledged, a live subscription of its channel holds back the live events it gets,
//!   delivering at each of our acks those up to its timestamp (a server that acks a group
//!   commit after handing out all its events would otherwise put another sender's later
//!   event before our own, which would then be lost: issue 18);
//! - if the server reports a position before the last delivered event (it lost events that
//!   were delivered, for example after a crash in asynchronous durability mode),
//!   [`ClientEvent::ContinuityLost`] says so and delivery resumes after the last event.
//!
//! # Sends while disconnected, and lost acks
//!
//! A send made while disconnected is queued (up to [`Config::offline_queue`]) and sent after
//! the next connection is up; beyond that, or with a queue of 0, it fails at once with
//! [`ClientError::NotConnected`]. A queued send that finds no connection within
//! [`Config::request_timeout`] fails with [`ClientError::NotConnected`] too: it was never
//! written, so nothing was stored.
//!
//! Every send carries an id (`docs/PROTOCOL.md` 5.9): `<instance>.<counter>`, the instance
//! being 16 random base64url characters from the driver ([`Config::instance`],
//! [`Client::instance`]) and the counter the send's number in this client. It goes out as
//! `#key#*ID:path:data`; the server stores an id at most once within its idempotency
//! window, and answers a repeat with the first's ack. So a lost ack is not a lost send:
//!
//! - when the connection drops (or a send gets no reply within [`Config::request_timeout`],
//!   which counts the connection as stuck: the client reconnects) before a send's ack, the
//!   send waits, and right after the next connection is up (after the subscriptions are
//!   renewed), every such send is written again with the same id, in the order the
//!   application made them, before the sends queued meanwhile. It resolves once, with the
//!   timestamp the server gave it the first time if it was stored then;
//! - a send first written more than [`Config::idempotency_window`] (default 10 minutes, the
//!   server's default) before the connection that would resend it fails instead with
//!   [`ClientError::WindowPassed`] (the server may have forgotten its id): the only uncertain
//!   outcome ([`ClientError::is_uncertain`]). A send awaiting its resend fails so at that
//!   time even while disconnected.
//!
//! A server without send ids answers `*` with `malformed` (which stores nothing): the client
//! then writes that send again as a plain `:path:data`, once, and sends plainly from then on
//! ([`Client::send_ids`], a [`ClientEvent::Warning`] says so). A plain send's lost ack fails
//! it with [`ClientError::ConnectionLost`] or [`ClientError::Timeout`], which are uncertain:
//! if it was stored, it is in the log and appears in the subscriptions' backfill. So does a
//! send awaiting its resend when the client ends ([`ConnState::Unauthorized`]); after
//! [`Client::close`] it fails with [`ClientError::Closed`] (written, it may have been stored).
//!
//! # Presence
//!
//! [`Client::watch_presence`] (**Extension** `~+PATH`, `docs/PROTOCOL.md` 5.10) watches who is
//! subscribed at a path or below, with a sub-machine per watch (`presence.rs`): it collects the
//! snapshot (the `^=` lines of each channel, until `^.`), then applies the changes (`^~`); the
//! view is the union over the channels (a member is in it while it is in one of them). The
//! application gets [`ClientEvent::Presence`]: [`PresenceEvent::Snapshot`] once, then
//! [`PresenceEvent::Join`], [`PresenceEvent::Leave`] and [`PresenceEvent::Count`]. After each
//! reconnect the path is watched again and the fresh snapshot is compared with the view already
//! reported: only the differences come out, as joins and leaves (a member that left while the
//! client was away is a leave, one that stayed is nothing: no phantom members, no missed
//! leaves). Snapshot lines carry no command key: they belong to the oldest `~+` or `~?` of the
//! connection whose snapshot has not ended, since the server answers in command order.
//! Changes that arrive before a watch's snapshot began are already in it and are skipped;
//! applying a join of a known member or a leave of an absent one changes nothing, so a change
//! that races a snapshot cannot make a phantom. [`Client::who`] (`~?PATH`) is a one-off
//! snapshot ([`ClientEvent::Who`]). Presence lines never reach the subscriptions: they carry no
//! timestamp and never enter their buffers or their deduplication.
//!
//! # Tokens
//!
//! With auth on (`docs/PROTOCOL.md` 2.5) the driver presents [`Client::token`] at each
//! handshake. The core does not parse JWTs: the driver decodes a token's `exp` itself and
//! hands over a [`Token`] ([`Token::from_exp`]), either up front ([`Client::set_token`]) or in
//! answer to [`Action::NeedToken`] ([`Client::handle_token`]), which the core emits only with
//! [`Config::token_provider`] set:
//!
//! - ahead of the token's expiry (by the smaller of 30 s and a third of its remaining
//!   lifetime); the fresh token is then sent in-band (`#key#&JWT`) on a live connection, or
//!   presented at the next handshake; a refusal is [`ClientEvent::TokenRefused`];
//! - after the server refused the token ([`Client::handle_unauthorized`]: a 401 at the
//!   handshake, a close with 4003): once; with no fresh token, or a fresh token refused too,
//!   the client ends in [`ConnState::Unauthorized`] ([`ClientEvent::Unauthorized`]) and does
//!   not reconnect any more. Without a provider, the first refusal ends it so.
//!
//! A refreshed token with fewer grants makes the server end the subscriptions it no longer
//! covers (`!subscription-ended`): each is removed and reported as
//! [`ClientEvent::SubscriptionEnded`].

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};

mod collections;
mod config;
mod debug;
mod error;
mod presence;
mod requests;
mod subscription;
mod timer;

use collections::VecMap;
pub use config::Config;
pub use debug::{DebugState, JsonWriter, PendingDebug, QueuedDebug, SubDebug, TRACE_TEXT, Trace, TraceEntry};
pub use error::{ClientError, ServerCode, SubscriptionError};
pub use presence::{PresenceEvent, PresenceView};
use presence::{View, Watch};
use requests::{Answered, Control, Requests, SendReq};
use subscription::{Ctx, Sub};
use timer::{Timer, TimerTable, earliest};

use crate::http::LogQuery;
use crate::path;
use crate::presence::PresenceLine;
use crate::timestamp::Timestamp;
use crate::wire::{Event, Op, ServerLine, parse_line};

/// Milliseconds from an arbitrary fixed origin chosen by the driver (monotonic).
pub type Millis = u64;

/// Identifies a subscription of this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId(pub u64);

/// Identifies a presence watch of this client ([`Client::watch_presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchId(pub u64);

/// Identifies a send, timestamp or presence query request.
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
    /// The server refused the connection's token (a 401 at the handshake, or a close with
    /// 4003) and the client waits for a fresh one from the driver's provider
    /// ([`Action::NeedToken`], answered with [`Client::handle_token`]); the next attempt
    /// starts when it comes.
    AwaitingToken,
    /// Terminal: the server refused the token and no fresh one came (no provider, the
    /// provider had none, or the fresh one was refused too). No more connection attempts;
    /// [`Client::unauthorized_reason`] says why. Start over with a new [`Client`].
    Unauthorized,
}

/// A token (a JWT) for the server, with its expiry on the driver's clock ([`Millis`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The token, as sent (`Authorization: Bearer`, `?token=`, `&token`).
    pub value: String,
    /// When it expires on the driver's clock (`now` + its remaining lifetime), if known.
    pub expires_at: Option<Millis>,
}

impl Token {
    /// A token whose expiry is unknown (it is never refreshed ahead of time).
    pub fn new(value: impl Into<String>) -> Token {
        Token { value: value.into(), expires_at: None }
    }

    /// A token from its `exp` claim (seconds since the Unix epoch, decoded by the driver),
    /// with the wall clock `unix_now_ms` (milliseconds since the Unix epoch) and the driver's
    /// `now`, both read at the same moment: it expires at `now + exp * 1000 - unix_now_ms`.
    pub fn from_exp(value: impl Into<String>, exp: Option<u64>, unix_now_ms: u64, now: Millis) -> Token {
        let expires_at = exp.map(|e| now.saturating_add(e.saturating_mul(1000).saturating_sub(unix_now_ms)));
        Token { value: value.into(), expires_at }
    }
}

impl core::fmt::Debug for Token {
    // A token is a credential: never in a log.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Token").field("value", &"<redacted>").field("expires_at", &self.expires_at).finish()
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the WebSocket (offering [`crate::SUBPROTOCOL`]); then call
    /// [`Client::handle_connected`] or [`Client::handle_disconnected`].
    Connect,
    /// Send this text frame on the open WebSocket.
    Send(String),
    /// Drop the current connection or connection attempt. Do not call
    /// [`Client::handle_disconnected`] for it: the client already counts it as gone.
    Disconnect,
    /// Fetch a log page; then call [`Client::handle_log_page`].
    FetchLog(LogRequest),
    /// Ask the token provider for a fresh token (only with [`Config::token_provider`]);
    /// then call [`Client::handle_token`] with it, or with `Err(reason)` if it has none or
    /// failed. At most one is outstanding at a time; if no answer comes within
    /// [`Config::request_timeout`], the client counts it as `Err`.
    NeedToken,
}

/// A log page to fetch: `GET {http base}{target}` (see [`crate::http::Endpoints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    /// Pass back to [`Client::handle_log_page`].
    pub id: u64,
    /// Normalized channel path.
    pub path: String,
    /// Exclusive cursor (`None`: from the beginning).
    pub after: Option<Timestamp>,
    /// Page size (at least 1).
    pub limit: u32,
    /// Whether the page is asked with `ext=sender` ([`Config::senders`]).
    pub senders: bool,
}

impl LogRequest {
    /// The query of this page.
    pub fn query(&self) -> LogQuery {
        LogQuery::Page { after: self.after, limit: core::num::NonZeroU64::new(u64::from(self.limit)) }
    }

    /// The request target: `/log/chat?after=...&limit=...` (and `&ext=sender` with
    /// [`Config::senders`]).
    pub fn target(&self) -> String {
        crate::http::with_senders(self.query().target(&self.path), self.senders)
    }
}

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
    /// (it lost them: `position` is before `last`), or events after `last` were deleted from
    /// the channel's log before the subscription read them (retention or an operator's
    /// deletion: `position`, after `last`, is the log's horizon). Delivery continues after
    /// `last` with what the server has. [`SubscriptionError::ContinuityLost`] words it for
    /// the application.
    ContinuityLost {
        /// The subscription.
        sub: SubId,
        /// The last event delivered.
        last: Timestamp,
        /// The server's position (before `last`), or the log's horizon (after `last`).
        position: Timestamp,
    },
    /// The server refused a subscription; it was removed. [`SubscriptionError::Refused`]
    /// words it for the application.
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
    /// The server ended a subscription (`!subscription-ended`: the refreshed token no longer
    /// covers its path); it was removed. [`SubscriptionError::Ended`] words it.
    SubscriptionEnded {
        /// The subscription.
        sub: SubId,
        /// The server's message (it starts with the path).
        reason: String,
    },
    /// A fresh token was refused in-band (`!unauthorized`, or an older server that does not
    /// know the refresh command): the connection goes on with its previous token until that
    /// expires, and [`Client::token`] is that token again.
    TokenRefused {
        /// The server's refusal.
        error: ClientError,
    },
    /// Terminal: the client is now [`ConnState::Unauthorized`]; pending and queued requests
    /// failed with [`ClientError::Unauthorized`], the subscriptions ended.
    Unauthorized {
        /// Why (the server's reason, and the provider's when it had no fresh token).
        reason: String,
    },
    /// A presence watch's news ([`Client::watch_presence`]; **Extension**): its first
    /// snapshot, then the members joining and leaving and the count, resynchronised after each
    /// reconnect (only the real differences are reported).
    Presence {
        /// The watch.
        watch: WatchId,
        /// What happened.
        event: PresenceEvent,
    },
    /// Outcome of [`Client::who`]: the presence snapshot of the path.
    Who {
        /// The request.
        id: RequestId,
        /// The snapshot, or why it failed.
        result: Result<PresenceView, ClientError>,
    },
    /// The connection state changed.
    State(ConnState),
    /// Something unexpected from the server or a log fetch (reported, then retried or
    /// skipped as described in the message).
    Warning(String),
}

/// The client state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    rng: u64,
    state: ConnState,
    /// Failed connection attempts since the last connection that answered.
    attempt: u32,
    timers: TimerTable,
    /// Ids of subscriptions, requests and log pages.
    next_id: u64,
    requests: Requests,
    subs: VecMap<SubId, Sub>,
    watches: VecMap<WatchId, Watch>,
    /// The `~+` and `~?` commands of this connection (by ack key) whose reply has not come,
    /// in command order: the server answers in that order, so the `^=` lines are the first
    /// one's, and the reply comes after them (then the entry goes, whatever happened to it).
    snapshots: VecDeque<(u64, Snapshot)>,
    /// Presence queries whose snapshot ended, until their ack.
    queried: alloc::vec::Vec<(RequestId, PresenceView)>,
    actions: VecDeque<Action>,
    events: VecDeque<ClientEvent>,
    /// Whether the current connection sent a frame yet.
    got_frame: bool,
    /// The token presented at handshakes and refreshed in-band.
    token: Option<Token>,
    /// Bumped at each new token; `conn_token_gen`: the one the connection was opened with.
    token_gen: u64,
    conn_token_gen: u64,
    /// The token the server holds for the current connection (opened with, or refreshed to).
    server_token: Option<Token>,
    /// When to ask the provider for a fresh token ahead of expiry.
    refresh_at: Option<Millis>,
    /// The outstanding [`Action::NeedToken`]: why, and when it counts as failed.
    want: Option<(Want, Millis)>,
    /// Whether the provider was already asked after a refusal since the last connection that
    /// answered (a second refusal is terminal).
    auth_retried: bool,
    /// Why the client is [`ConnState::Unauthorized`] (or the refusal awaiting a token).
    unauthorized: Option<String>,
    /// The instance part of the send ids (16 base64url characters, [`Config::instance`]).
    instance: String,
    /// Sends made so far: the counter part of the send ids.
    sends: u64,
    /// The server answered a send with an id `malformed` (it has no send ids): sends are
    /// plain from then on.
    plain_sends: bool,
}

/// The 16 base64url characters of 12 bytes (no padding: 12 bytes are 16 characters).
fn base64url(bytes: &[u8; 12]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(16);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for shift in [18, 12, 6, 0] {
            out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
        }
    }
    out
}

/// A snapshot the server is sending (or about to send).
#[derive(Debug)]
enum Snapshot {
    /// For this watch's `~+`.
    Watch(WatchId),
    /// For this query's `~?`, collected here.
    Query(RequestId, String, View),
    /// For a watch removed since, or a query that timed out: its lines are read and dropped.
    Dropped,
}

/// Why a token was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Ahead of expiry.
    Refresh,
    /// The server refused the token.
    AfterRefusal,
}

impl Client {
    /// A client with `config`, seeding its jitter with `seed`.
    pub fn new(config: Config, seed: u64) -> Client {
        let instance = config.instance.unwrap_or_else(|| {
            // No random bytes from the driver: from the seed (as unique as it is).
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut b = [0u8; 12];
            for chunk in b.chunks_mut(4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&(x as u32).to_le_bytes());
            }
            b
        });
        Client {
            instance: base64url(&instance),
            sends: 0,
            plain_sends: false,
            cfg: config,
            rng: seed | 1,
            state: ConnState::Idle,
            attempt: 0,
            timers: TimerTable::default(),
            next_id: 1,
            requests: Requests::new(),
            subs: VecMap::new(),
            watches: VecMap::new(),
            snapshots: VecDeque::new(),
            queried: alloc::vec::Vec::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            got_frame: false,
            token: None,
            token_gen: 0,
            conn_token_gen: 0,
            server_token: None,
            refresh_at: None,
            want: None,
            auth_retried: false,
            unauthorized: None,
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
        self.subs.get(&sub).map(Sub::last)
    }

    /// The normalized path of a presence watch.
    pub fn watch_path(&self, watch: WatchId) -> Option<&str> {
        self.watches.get(&watch).map(|w| w.path.as_str())
    }

    /// The current view of a presence watch: what its events told so far (`None` before its
    /// first snapshot). While disconnected it is the view before the connection dropped.
    pub fn presence_view(&self, watch: WatchId) -> Option<PresenceView> {
        let w = self.watches.get(&watch)?;
        w.view().map(|v| v.to_view(&w.path))
    }

    /// Whether a presence watch's view is current: its snapshot on the current connection
    /// came and changes apply.
    pub fn presence_live(&self, watch: WatchId) -> bool {
        self.state == ConnState::Connected && self.watches.get(&watch).is_some_and(Watch::is_live)
    }

    /// The token to present at the handshake of [`Action::Connect`] (the newest one given).
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.value.as_str())
    }

    /// Why the client is [`ConnState::Unauthorized`] (or, while [`ConnState::AwaitingToken`],
    /// the refusal that made it ask for a token).
    pub fn unauthorized_reason(&self) -> Option<&str> {
        self.unauthorized.as_deref()
    }

    /// The instance part of this client's send ids (16 base64url characters): its sends carry
    /// the ids `<instance>.1`, `<instance>.2`, ... (`docs/PROTOCOL.md` 5.9).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether sends carry ids: true until a server answers one `malformed` (a server without
    /// send ids), after which sends are plain and a lost ack is uncertain again.
    pub fn send_ids(&self) -> bool {
        !self.plain_sends
    }

    /// Whether every subscription has caught up (live).
    pub fn is_live(&self) -> bool {
        self.state == ConnState::Connected && self.subs.values().all(Sub::is_live)
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
        let mut t = self.timers.next_timeout();
        if self.state == ConnState::Connected {
            t = earliest(t, self.requests.next_deadline());
            // Subscriptions are few (the server bounds them per connection); requests can
            // be many, and theirs is the first deadline.
            for s in self.subs.values() {
                t = earliest(t, s.page_timeout());
            }
        }
        t = earliest(t, self.refresh_at);
        t = earliest(t, self.want.map(|(_, deadline)| deadline));
        t = earliest(t, self.requests.resend_deadline(self.cfg.idempotency_window));
        earliest(t, self.requests.offline_deadline(self.cfg.request_timeout))
    }

    // ----- commands from the application -----

    /// Starts connecting (once; later connections are automatic).
    pub fn start(&mut self, now: Millis) {
        if self.state == ConnState::Idle {
            self.begin_attempt(now);
        }
    }

    /// Subscribes to `path` (normalized here) from `start`.
    pub fn subscribe(&mut self, now: Millis, path: &str, start: Start) -> Result<SubId, ClientError> {
        // A subscribe arms no timer: a connection that never answers it is caught by the
        // keepalive. `now` is taken like everywhere else, so that no command needs a clock.
        let _ = now;
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        match self.state {
            ConnState::Closed => return Err(ClientError::Closed),
            ConnState::Unauthorized => return Err(ClientError::Unauthorized),
            _ => {}
        }
        let id = SubId(self.id());
        let mut sub = Sub::new(path, start);
        for _ in 0..self.requests.sends_within(&sub.path) {
            sub.own_sent();
        }
        self.subs.insert(id, sub);
        if self.state == ConnState::Connected {
            if let Some(s) = self.subs.get_mut(&id) {
                s.subscribing();
                let frame = self.requests.control(Op::Subscribe(s.path.as_str().into()), Control::Subscribe(id));
                self.actions.push_back(Action::Send(frame));
            }
        }
        Ok(id)
    }

    /// Ends a subscription; no event of it is delivered after this call.
    pub fn unsubscribe(&mut self, now: Millis, sub: SubId) {
        let _ = now; // arms no timer (see `subscribe`)
        let Some(s) = self.subs.remove(&sub) else { return };
        if self.state == ConnState::Connected && !s.is_offline() && !self.holds(&s.path) {
            let frame = self.requests.control(Op::Unsubscribe(s.path.as_str().into()), Control::Unsubscribe);
            self.actions.push_back(Action::Send(frame));
        }
    }

    /// Publishes `data` on `path`. The outcome arrives as [`ClientEvent::Sent`].
    ///
    /// The send gets an id (`<instance>.<counter>`, [`Client::instance`]) and goes out as
    /// `#key#*ID:path:data` (`docs/PROTOCOL.md` 5.9); see [Sends](self#sends-while-disconnected-and-lost-acks)
    /// for what happens when its ack is lost.
    pub fn send(&mut self, now: Millis, path: &str, data: &str) -> Result<RequestId, ClientError> {
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        match self.state {
            ConnState::Closed => return Err(ClientError::Closed),
            ConnState::Unauthorized => return Err(ClientError::Unauthorized),
            _ => {}
        }
        let send_id = format!("{}.{}", self.instance, self.sends + 1);
        self.check_size(&path, data.len(), (!self.plain_sends).then_some(send_id.len()))?;
        self.sends += 1;
        let id = RequestId(self.id());
        let req = SendReq::new(id, path, data.as_bytes().to_vec(), send_id);
        if self.state == ConnState::Connected {
            self.transmit_send(now, req);
            return Ok(id);
        }
        let queued = self.requests.queue_offline(self.cfg.offline_queue, now, req);
        if queued { Ok(id) } else { Err(ClientError::NotConnected) }
    }

    /// Watches the presence of `path` (normalized here; **Extension** `~+PATH`,
    /// `docs/PROTOCOL.md` 5.10): who is subscribed at the path or below. The watch is also a
    /// subscription of the path on the server (exactly as `+PATH`), whose events this client
    /// drops unless a [`Client::subscribe`] of its own wants them. What it reports comes as
    /// [`ClientEvent::Presence`]: the first snapshot, then joins, leaves and counts; after each
    /// reconnect the path is watched again and the fresh snapshot is compared with the view
    /// reported so far, so only real changes are reported. Presence lines never enter the
    /// subscriptions' event streams. Refused by the server (no read grant, a server without
    /// presence): [`PresenceEvent::Failed`], and the watch is removed.
    pub fn watch_presence(&mut self, now: Millis, path: &str) -> Result<WatchId, ClientError> {
        let _ = now; // arms no timer (see `subscribe`)
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        match self.state {
            ConnState::Closed => return Err(ClientError::Closed),
            ConnState::Unauthorized => return Err(ClientError::Unauthorized),
            _ => {}
        }
        let id = WatchId(self.id());
        self.watches.insert(id, Watch::new(path));
        if self.state == ConnState::Connected {
            self.send_watch(id);
        }
        Ok(id)
    }

    /// Ends a presence watch; nothing of it is reported after this call. The subscription
    /// of its path ends too (`-PATH`) unless a subscription or another watch of this client
    /// holds the same path; then the server keeps sending the path's presence lines, which
    /// this client drops (the protocol has no command that ends the watch alone).
    pub fn unwatch_presence(&mut self, now: Millis, watch: WatchId) {
        let _ = now;
        let Some(w) = self.watches.remove(&watch) else { return };
        for (_, s) in self.snapshots.iter_mut() {
            if matches!(s, Snapshot::Watch(id) if *id == watch) {
                *s = Snapshot::Dropped;
            }
        }
        if self.state == ConnState::Connected && !w.is_offline() && !self.holds(&w.path) {
            let frame = self.requests.control(Op::Unsubscribe(w.path.as_str().into()), Control::Unsubscribe);
            self.actions.push_back(Action::Send(frame));
        }
    }

    /// Asks who is present at `path` (or below), once (**Extension** `~?PATH`; no
    /// subscription); the outcome arrives as [`ClientEvent::Who`]. Needs a connection (like
    /// [`Client::timestamp`]); fails with [`ClientError::Timeout`] after
    /// [`Config::request_timeout`].
    pub fn who(&mut self, now: Millis, path: &str) -> Result<RequestId, ClientError> {
        let path = path::normalize(path.as_bytes()).map_err(ClientError::InvalidPath)?.into_owned();
        match self.state {
            ConnState::Connected => {
                let id = RequestId(self.id());
                let frame = self.requests.query(id, &path, now.saturating_add(self.cfg.request_timeout));
                let key = self.requests.last_key();
                self.snapshots.push_back((key, Snapshot::Query(id, path, View::default())));
                self.actions.push_back(Action::Send(frame));
                Ok(id)
            }
            ConnState::Closed => Err(ClientError::Closed),
            ConnState::Unauthorized => Err(ClientError::Unauthorized),
            _ => Err(ClientError::NotConnected),
        }
    }

    /// Asks for the server time; the outcome arrives as [`ClientEvent::Time`].
    pub fn timestamp(&mut self, now: Millis) -> Result<RequestId, ClientError> {
        match self.state {
            ConnState::Connected => {
                let id = RequestId(self.id());
                let frame = self.requests.time(id, now.saturating_add(self.cfg.request_timeout));
                self.actions.push_back(Action::Send(frame));
                Ok(id)
            }
            ConnState::Closed => Err(ClientError::Closed),
            ConnState::Unauthorized => Err(ClientError::Unauthorized),
            _ => Err(ClientError::NotConnected),
        }
    }

    /// Closes the client: drops the connection, fails what is pending with
    /// [`ClientError::Closed`].
    pub fn close(&mut self, now: Millis) {
        let _ = now; // stops every timer, arms none (see `subscribe`)
        if self.state == ConnState::Closed {
            return;
        }
        if matches!(self.state, ConnState::Connected | ConnState::Connecting { .. }) {
            self.actions.push_back(Action::Disconnect);
        }
        self.requests.fail_sent(&ClientError::Closed, &mut self.events);
        self.requests.fail_resend(&ClientError::Closed, &mut self.events);
        self.requests.fail_offline(&ClientError::Closed, &mut self.events);
        self.subs.clear();
        self.clear_presence();
        self.timers.stop_all();
        self.refresh_at = None;
        self.want = None;
        self.set_state(ConnState::Closed);
    }

    /// Sets the token to present from now on (before [`Client::start`]: the initial token).
    /// On a live connection it is sent in-band (`&JWT`) at once; during a connection attempt,
    /// once the connection is up. With [`Config::token_provider`], a fresh one is asked for
    /// ahead of its expiry.
    pub fn set_token(&mut self, now: Millis, token: Token) {
        if matches!(self.state, ConnState::Closed | ConnState::Unauthorized) {
            return;
        }
        self.refresh_at = match token.expires_at {
            // An expired token is not refreshed ahead: the server refuses it, and that
            // refusal asks the provider (no loop over a provider that returns it again).
            Some(at) if self.cfg.token_provider && at > now => {
                let margin = (at.saturating_sub(now) / 3).min(30_000);
                Some(at.saturating_sub(margin).max(now))
            }
            _ => None,
        };
        self.token = Some(token);
        self.token_gen += 1;
        if self.state == ConnState::Connected {
            self.send_refresh();
        }
    }

    /// The provider's answer to [`Action::NeedToken`]: a fresh token, or why there is none.
    /// A token that was not asked for is taken as by [`Client::set_token`].
    pub fn handle_token(&mut self, now: Millis, result: Result<Token, String>) {
        let want = self.want.take().map(|(w, _)| w);
        match (result, want) {
            (Ok(token), Some(Want::AfterRefusal)) if self.state == ConnState::AwaitingToken => {
                self.set_token(now, token);
                self.begin_attempt(now);
            }
            (Ok(token), _) => self.set_token(now, token),
            (Err(why), Some(Want::AfterRefusal)) if self.state == ConnState::AwaitingToken => {
                let refusal = self.unauthorized.take().unwrap_or_default();
                self.end_unauthorized(format!("{refusal}; no fresh token: {why}"));
            }
            (Err(why), _) => self.events.push_back(ClientEvent::Warning(format!(
                "the token provider gave no fresh token ({why}); the current one is used until the server refuses it"
            ))),
        }
    }

    /// The server refused the token: the handshake was answered 401 (`reason`: the body's
    /// line), or the connection was closed with 4003 (`reason`: the close reason). Call this
    /// instead of [`Client::handle_disconnected`]. With a provider, asked once since the last
    /// connection that worked: [`ConnState::AwaitingToken`] and [`Action::NeedToken`];
    /// otherwise the client ends in [`ConnState::Unauthorized`].
    pub fn handle_unauthorized(&mut self, now: Millis, reason: &str) {
        if !matches!(self.state, ConnState::Connected | ConnState::Connecting { .. }) {
            return;
        }
        self.requests.connection_lost(self.cfg.idempotency_window > 0, &mut self.events);
        for s in self.subs.values_mut() {
            s.disconnected();
        }
        self.presence_disconnected();
        self.timers.stop_all();
        self.refresh_at = None;
        if self.cfg.token_provider && !self.auth_retried {
            self.auth_retried = true;
            self.unauthorized = Some(reason.into());
            // A refresh already asked for is answered as this request.
            let deadline = now.saturating_add(self.cfg.request_timeout);
            if self.want.is_none() {
                self.actions.push_back(Action::NeedToken);
            }
            self.want = Some((Want::AfterRefusal, deadline));
            self.set_state(ConnState::AwaitingToken);
        } else {
            self.end_unauthorized(reason.into());
        }
    }

    /// The WebSocket closed with `code` (if it had one) and `reason`: a 4003 is
    /// [`Client::handle_unauthorized`], anything else [`Client::handle_disconnected`].
    pub fn handle_close(&mut self, now: Millis, code: Option<u16>, reason: &str) {
        if code == Some(crate::close_code::TOKEN_EXPIRED) {
            self.handle_unauthorized(now, reason);
        } else {
            self.handle_disconnected(now);
        }
    }

    // ----- inputs from the driver -----

    /// The WebSocket is open.
    pub fn handle_connected(&mut self, now: Millis) {
        if !matches!(self.state, ConnState::Connecting { .. }) {
            return;
        }
        self.timers.stop(Timer::Connect);
        self.timers.stop(Timer::Probe);
        self.timers.set(Timer::Idle, now.saturating_add(self.cfg.idle_timeout));
        self.got_frame = false;
        self.set_state(ConnState::Connected);
        if self.token_gen != self.conn_token_gen {
            // A token that came during the attempt: the handshake had the previous one.
            self.send_refresh();
        }
        for (id, s) in self.subs.iter_mut() {
            s.subscribing();
            let frame = self.requests.control(Op::Subscribe(s.path.as_str().into()), Control::Subscribe(*id));
            self.actions.push_back(Action::Send(frame));
        }
        let watches: alloc::vec::Vec<WatchId> = self.watches.iter().map(|(id, _)| *id).collect();
        for id in watches {
            self.send_watch(id);
        }
        // The sends whose ack the last connection lost: again, with their ids, in their
        // order, before anything new; unless the server may have forgotten their ids.
        let window = self.cfg.idempotency_window;
        self.requests.expire_resend(now, window, &ClientError::WindowPassed, &mut self.events);
        while let Some(req) = self.requests.take_resend() {
            self.transmit_send(now, req);
        }
        while let Some(q) = self.requests.take_offline() {
            // Checked again with the ack key it gets now (one digit longer, rarely).
            let id_len = (!self.plain_sends).then_some(q.req.send_id.len());
            match self.check_size(&q.req.path, q.req.data.len(), id_len) {
                Ok(()) => self.transmit_send(now, q.req),
                Err(e) => self.events.push_back(ClientEvent::Sent { id: q.req.id, result: Err(e) }),
            }
        }
    }

    /// Refuses a send whose command (with a send id of `id_len` bytes) would exceed
    /// [`Config::max_message_size`].
    fn check_size(&self, path: &str, data_len: usize, id_len: Option<usize>) -> Result<(), ClientError> {
        let (size, limit) = (self.requests.send_len(path, data_len, id_len), self.cfg.max_message_size);
        if limit > 0 && size > limit { Err(ClientError::TooLarge { size, limit }) } else { Ok(()) }
    }

    /// A non-text frame (ping, pong) arrived: the connection is alive.
    pub fn handle_activity(&mut self, now: Millis) {
        if self.state == ConnState::Connected {
            self.timers.stop(Timer::Probe);
            self.timers.set(Timer::Idle, now.saturating_add(self.cfg.idle_timeout));
        }
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
            self.auth_retried = false;
        }
        match parse_line(frame.as_bytes()) {
            Ok(ServerLine::Event(ev)) => self.route(now, ev.into_owned()),
            Ok(ServerLine::Ack { key, ts }) => self.on_reply(now, key, Ok(ts)),
            Ok(ServerLine::Error { key: Some(key), code, message }) => {
                let err = ClientError::Server { code: ServerCode::from_wire(code), message: message.to_string() };
                self.on_reply(now, key, Err(err));
            }
            Ok(ServerLine::Error { key: None, code: "subscription-ended", message }) => self.subscription_ended(message),
            Ok(ServerLine::Presence(line)) => self.on_presence(line),
            Ok(ServerLine::Error { key: None, code, message }) => {
                self.events.push_back(ClientEvent::Warning(format!("server error without ack key: {code} {message}")));
            }
            Err(e) => self.events.push_back(ClientEvent::Warning(format!("unparsable line from the server ({e}): \"{frame}\""))),
        }
    }

    /// The WebSocket closed or failed, or the connection attempt failed.
    pub fn handle_disconnected(&mut self, now: Millis) {
        if matches!(self.state, ConnState::Connected | ConnState::Connecting { .. }) {
            self.on_disconnect(now);
        }
    }

    /// A deadline from [`Client::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Millis) {
        // Offline sends that waited too long, and lost acks that can no longer be resent.
        self.requests.expire_offline(now, self.cfg.request_timeout, &mut self.events);
        self.requests.expire_resend(now, self.cfg.idempotency_window, &ClientError::WindowPassed, &mut self.events);
        self.token_timeouts(now);
        match self.state {
            ConnState::Reconnecting { .. } if self.timers.is_due(Timer::Retry, now) => self.begin_attempt(now),
            ConnState::Connecting { .. } if self.timers.is_due(Timer::Connect, now) => {
                self.actions.push_back(Action::Disconnect);
                self.on_disconnect(now);
            }
            ConnState::Connected => self.connected_timeouts(now),
            _ => {}
        }
    }

    /// A log page requested by [`Action::FetchLog`] arrived (`Ok(body)`) or failed.
    pub fn handle_log_page(&mut self, now: Millis, id: u64, result: Result<&str, String>) {
        self.handle_log_page_with_horizon(now, id, result, None);
    }

    /// [`Client::handle_log_page`] with the log's horizon: the `Ivy-Horizon` header of the
    /// response (`docs/PROTOCOL.md` 9.5), the newest event deleted from the channel's log. A
    /// horizon after the last event a subscription delivered means events it never delivered
    /// were deleted: [`ClientEvent::ContinuityLost`] (with `position` the horizon), and
    /// delivery goes on with what the log has.
    pub fn handle_log_page_with_horizon(&mut self, now: Millis, id: u64, result: Result<&str, String>, horizon: Option<Timestamp>) {
        let (subs, mut cx, actions) = self.split(now);
        // Not found: stale, the subscription moved on.
        if let Some((sid, s)) = subs.iter_mut().find(|(_, s)| s.awaits_page(id)) {
            actions.extend(s.on_page(*sid, id, result, horizon, &mut cx).map(Action::FetchLog));
        }
    }

    // ----- internals -----

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The subscriptions, what they need to produce outputs, and the action queue.
    fn split(&mut self, now: Millis) -> (&mut VecMap<SubId, Sub>, Ctx<'_>, &mut VecDeque<Action>) {
        let cx = Ctx { now, cfg: &self.cfg, next_id: &mut self.next_id, events: &mut self.events };
        (&mut self.subs, cx, &mut self.actions)
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

    fn begin_attempt(&mut self, now: Millis) {
        self.conn_token_gen = self.token_gen;
        self.server_token = self.token.clone();
        self.timers.stop(Timer::Retry);
        self.timers.set(Timer::Connect, now.saturating_add(self.cfg.connect_timeout));
        self.set_state(ConnState::Connecting { attempt: self.attempt });
        self.actions.push_back(Action::Connect);
    }

    /// `#key#&token` with the current token, on the live connection.
    fn send_refresh(&mut self) {
        let Some(token) = &self.token else { return };
        let frame = self.requests.control(Op::Refresh(token.value.as_bytes()), Control::Refresh(self.token_gen));
        self.conn_token_gen = self.token_gen;
        self.actions.push_back(Action::Send(frame));
    }

    /// The refresh time of the token, and the provider's deadline.
    fn token_timeouts(&mut self, now: Millis) {
        if matches!(self.state, ConnState::Closed | ConnState::Unauthorized) {
            return;
        }
        if self.want.is_some_and(|(_, deadline)| deadline <= now) {
            self.handle_token(now, Err("the token provider did not answer in time".into()));
        }
        if self.refresh_at.is_some_and(|at| at <= now) {
            self.refresh_at = None;
            if self.want.is_none() {
                self.want = Some((Want::Refresh, now.saturating_add(self.cfg.request_timeout)));
                self.actions.push_back(Action::NeedToken);
            }
        }
    }

    /// Terminal: no valid token.
    fn end_unauthorized(&mut self, reason: String) {
        self.requests.fail_sent(&ClientError::Unauthorized, &mut self.events);
        // Written, and never to be resent: uncertain.
        self.requests.fail_resend(&ClientError::ConnectionLost, &mut self.events);
        self.requests.fail_offline(&ClientError::Unauthorized, &mut self.events);
        self.subs.clear();
        self.clear_presence();
        self.timers.stop_all();
        self.refresh_at = None;
        self.want = None;
        self.unauthorized = Some(reason.clone());
        self.events.push_back(ClientEvent::Unauthorized { reason });
        self.set_state(ConnState::Unauthorized);
    }

    /// `!subscription-ended <path> <reason>`: every subscription of that path ends.
    fn subscription_ended(&mut self, message: &str) {
        let path = message.split(' ').next().unwrap_or("");
        let ended: alloc::vec::Vec<SubId> = self.subs.iter().filter(|(_, s)| s.path == path).map(|(id, _)| *id).collect();
        let unwatched: alloc::vec::Vec<WatchId> = self.watches.iter().filter(|(_, w)| w.path == path).map(|(id, _)| *id).collect();
        for watch in &unwatched {
            self.watches.remove(watch);
            self.events.push_back(ClientEvent::Presence { watch: *watch, event: PresenceEvent::Ended(message.into()) });
        }
        if ended.is_empty() && unwatched.is_empty() {
            self.events.push_back(ClientEvent::Warning(format!("the server ended a subscription this client does not hold: {message}")));
        }
        for sub in ended {
            self.subs.remove(&sub);
            self.events.push_back(ClientEvent::SubscriptionEnded { sub, reason: message.into() });
        }
    }

    fn on_disconnect(&mut self, now: Millis) {
        // Sends with ids wait for the next connection; the rest fails.
        self.requests.connection_lost(self.cfg.idempotency_window > 0, &mut self.events);
        for s in self.subs.values_mut() {
            s.disconnected();
        }
        self.presence_disconnected();
        self.timers.stop_all();
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter: a random delay up to the exponential ceiling.
        let ceiling = self.cfg.backoff_ceiling(self.attempt);
        let delay = self.random() % ceiling.max(1);
        let retry_at = now.saturating_add(delay);
        self.timers.set(Timer::Retry, retry_at);
        self.set_state(ConnState::Reconnecting { attempt: self.attempt, retry_at });
    }

    fn connected_timeouts(&mut self, now: Millis) {
        // Dead-connection detection: probe after silence, give up after the probe's timeout.
        if self.timers.is_due(Timer::Probe, now) {
            self.events.push_back(ClientEvent::Warning("no answer to the probe: connection is dead, reconnecting".into()));
            self.actions.push_back(Action::Disconnect);
            self.on_disconnect(now);
            return;
        }
        // (The idle timer is stopped while a probe is out.)
        if self.timers.is_due(Timer::Idle, now) {
            let frame = self.requests.control(Op::Timestamp, Control::Probe);
            self.actions.push_back(Action::Send(frame));
            self.timers.stop(Timer::Idle);
            self.timers.set(Timer::Probe, now.saturating_add(self.cfg.probe_timeout));
        }
        // A send with an id without a reply in time: the connection is stuck (the server
        // answers every command, in order); resend it on a new one.
        if self.cfg.idempotency_window > 0 && self.requests.id_send_overdue(now) {
            self.events.push_back(ClientEvent::Warning("no reply to a send in time: reconnecting to resend it".into()));
            self.actions.push_back(Action::Disconnect);
            self.on_disconnect(now);
            return;
        }
        // Requests without a reply in time.
        let mut expired: alloc::vec::Vec<String> = alloc::vec::Vec::new();
        self.requests.expire(now, &mut self.events, |path| expired.push(path));
        self.forget_expired_queries();
        for path in expired {
            self.own_answered(now, &path, None);
        }
        // Log pages with no answer in time, and failed ones whose retry time came.
        let (subs, mut cx, actions) = self.split(now);
        let mut lost_page = false;
        for s in subs.values_mut() {
            let (lost, request) = s.on_timeout(&mut cx);
            lost_page |= lost;
            actions.extend(request.map(Action::FetchLog));
        }
        if lost_page {
            self.events.push_back(ClientEvent::Warning("a log page got no answer in time; requesting it again".into()));
        }
    }

    /// Writes a send: with its id, unless the server has none (or it goes plain once more
    /// after `malformed`); a resend always with its id (an older server refuses it
    /// `malformed`, which stores nothing).
    fn transmit_send(&mut self, now: Millis, mut req: SendReq) {
        for s in self.subs.values_mut() {
            if path::is_within(&req.path, &s.path) {
                s.own_sent();
            }
        }
        let with_id = !self.plain_sends || (req.first_sent.is_some() && req.with_id);
        req.first_sent.get_or_insert(now);
        let frame = self.requests.send(req, with_id, now.saturating_add(self.cfg.request_timeout));
        self.actions.push_back(Action::Send(frame));
    }

    /// One of our sends into `path` got its reply (`stored`: its event) or timed out: the
    /// subscriptions it held back deliver what they may (see `Sub::own_sent`).
    fn own_answered(&mut self, now: Millis, path: &str, stored: Option<Event<'static>>) {
        let (subs, mut cx, actions) = self.split(now);
        for (sid, s) in subs.iter_mut() {
            if path::is_within(path, &s.path) {
                actions.extend(s.own_answered(*sid, stored.clone(), &mut cx).map(Action::FetchLog));
            }
        }
    }

    fn on_reply(&mut self, now: Millis, key: &[u8], result: Result<Timestamp, ClientError>) {
        if !self.snapshots.is_empty() {
            // A `~+` or `~?` is answered after its snapshot lines: whatever became of it
            // (refused, removed, timed out), no line of it is coming any more.
            if let Some(k) = core::str::from_utf8(key).ok().and_then(|k| k.parse::<u64>().ok()) {
                self.snapshots.retain(|(sk, _)| *sk != k);
            }
        }
        let Some(answered) = self.requests.answer(key) else {
            self.events.push_back(ClientEvent::Warning(format!("reply with unknown ack key \"{}\"", String::from_utf8_lossy(key))));
            return;
        };
        match answered {
            Answered::Control(Control::Probe | Control::Unsubscribe) => {}
            Answered::Control(Control::Refresh(generation)) => {
                let newest = generation == self.token_gen;
                match result {
                    Ok(_) if newest => self.server_token = self.token.clone(),
                    Ok(_) => {}
                    Err(error) => {
                        if newest && self.server_token.is_some() {
                            // The connection goes on with its previous token: so does the
                            // next handshake (not asked again ahead: the server's refusal of
                            // it, at its expiry, asks the provider).
                            self.token = self.server_token.clone();
                            self.refresh_at = None;
                        }
                        self.events.push_back(ClientEvent::TokenRefused { error });
                    }
                }
            }
            Answered::Time { id } => self.events.push_back(ClientEvent::Time { id, result }),
            Answered::Query { id } => {
                let done = self.queried.iter().position(|(q, _)| *q == id).map(|i| self.queried.swap_remove(i).1);
                let result = match (result, done) {
                    (Ok(_), Some(view)) => Ok(view),
                    (Ok(_), None) => {
                        // Acked without a snapshot (never expected).
                        Err(ClientError::Server {
                            code: ServerCode::Other("protocol".into()),
                            message: "the server acknowledged the presence query without its snapshot".into(),
                        })
                    }
                    (Err(e), _) => Err(e),
                };
                self.events.push_back(ClientEvent::Who { id, result });
            }
            Answered::Control(Control::Watch(watch)) => match result {
                Ok(_) => {
                    if self.watches.get(&watch).is_some_and(Watch::is_collecting) {
                        self.events.push_back(ClientEvent::Warning(format!(
                            "the server acknowledged a presence watch without its snapshot end line (watch {})",
                            watch.0
                        )));
                    }
                }
                Err(error) => {
                    if self.watches.remove(&watch).is_some() {
                        self.events.push_back(ClientEvent::Presence { watch, event: PresenceEvent::Failed(error) });
                    }
                }
            },
            Answered::Send(mut req) => {
                let malformed = matches!(&result, Err(ClientError::Server { code, .. }) if *code == crate::wire::ErrorCode::Malformed);
                if malformed && req.with_id {
                    // A server without send ids (`!malformed unknown command '*'`): nothing
                    // was stored. Plain sends from now on; this one again, plain, once.
                    if !self.plain_sends {
                        self.plain_sends = true;
                        self.events.push_back(ClientEvent::Warning(
                            "the server does not know send ids (docs/PROTOCOL.md 5.9): sends are plain from now on, and a lost ack is uncertain"
                                .into(),
                        ));
                    }
                    self.own_answered(now, &req.path, None);
                    req.with_id = false;
                    req.first_sent = None;
                    self.transmit_send(now, req);
                    return;
                }
                // The server does not echo our own events: insert them in place.
                let SendReq { id, path, data, .. } = req;
                let stored = result.as_ref().ok().map(|&ts| Event { ts, path: path.as_str().into(), data: data.into(), sender: None });
                self.own_answered(now, &path, stored.map(Event::into_owned));
                self.events.push_back(ClientEvent::Sent { id, result });
            }
            Answered::Control(Control::Subscribe(sid)) => match result {
                Ok(position) => {
                    let (subs, mut cx, actions) = self.split(now);
                    if let Some(s) = subs.get_mut(&sid) {
                        actions.extend(s.on_position(sid, position, &mut cx).map(Action::FetchLog));
                    }
                }
                Err(error) => {
                    self.subs.remove(&sid);
                    self.events.push_back(ClientEvent::SubscribeFailed { sub: sid, error });
                }
            },
        }
    }

    /// Whether a subscription or a presence watch of this client holds `path` on the server.
    fn holds(&self, path: &str) -> bool {
        self.subs.values().any(|o| o.path == path) || self.watches.values().any(|w| w.path == path)
    }

    /// `#key#~+path` for this watch, on the live connection.
    fn send_watch(&mut self, id: WatchId) {
        let Some(w) = self.watches.get_mut(&id) else { return };
        w.watching();
        let frame = self.requests.control(Op::PresenceWatch(w.path.as_str().into()), Control::Watch(id));
        let key = self.requests.last_key();
        self.snapshots.push_back((key, Snapshot::Watch(id)));
        self.actions.push_back(Action::Send(frame));
    }

    fn presence_disconnected(&mut self) {
        for w in self.watches.values_mut() {
            w.disconnected();
        }
        self.snapshots.clear();
        self.queried.clear();
    }

    fn clear_presence(&mut self) {
        self.watches.clear();
        self.snapshots.clear();
        self.queried.clear();
    }

    /// Queries that timed out: their results are no longer awaited.
    fn forget_expired_queries(&mut self) {
        let requests = &self.requests;
        self.queried.retain(|(id, _)| requests.is_pending(*id));
        for (_, s) in self.snapshots.iter_mut() {
            if matches!(s, Snapshot::Query(id, ..) if !requests.is_pending(*id)) {
                *s = Snapshot::Dropped;
            }
        }
    }

    /// A presence line: `^=` and `^.` belong to the oldest snapshot under way, `^~` to every
    /// watch of a path at or above its channel.
    fn on_presence(&mut self, line: PresenceLine<'_>) {
        let mut out = alloc::vec::Vec::new();
        match line {
            PresenceLine::Snapshot { channel, snapshot } => match self.snapshots.front_mut().map(|(_, s)| s) {
                Some(Snapshot::Watch(id)) => {
                    if let Some(w) = self.watches.get_mut(id) {
                        w.on_snapshot(&channel, snapshot);
                    }
                }
                Some(Snapshot::Query(_, _, view)) => view.add_snapshot(&channel, snapshot),
                Some(Snapshot::Dropped) => {}
                None => self
                    .events
                    .push_back(ClientEvent::Warning(format!("presence snapshot line of {channel} that no watch or query asked for"))),
            },
            PresenceLine::End { path, count } => {
                let Some((_, head)) = self.snapshots.pop_front() else {
                    self.events
                        .push_back(ClientEvent::Warning(format!("presence snapshot end of {path} that no watch or query asked for")));
                    return;
                };
                match head {
                    Snapshot::Watch(id) => {
                        if let Some(w) = self.watches.get_mut(&id) {
                            w.on_end(count, &mut out);
                            self.events.extend(out.drain(..).map(|event| ClientEvent::Presence { watch: id, event }));
                        }
                    }
                    Snapshot::Query(id, qpath, mut view) => {
                        view.end_snapshot(count);
                        self.queried.push((id, view.to_view(&qpath)));
                    }
                    Snapshot::Dropped => {}
                }
            }
            PresenceLine::Change { channel, change } => {
                // Usually one watch: the change is moved to the last, cloned for the others.
                let last = self.watches.iter().filter(|(_, w)| path::is_within(&channel, &w.path)).map(|(id, _)| *id).last();
                let mut change = Some(change);
                for (id, w) in self.watches.iter_mut() {
                    if path::is_within(&channel, &w.path) {
                        let c = if Some(*id) == last { change.take() } else { change.clone() };
                        if let Some(c) = c {
                            w.on_change(&channel, c, &mut out);
                        }
                        self.events.extend(out.drain(..).map(|event| ClientEvent::Presence { watch: *id, event }));
                    }
                }
            }
        }
    }

    /// Hands a live (or own) event to every subscription whose channel it belongs to.
    fn route(&mut self, now: Millis, ev: Event<'static>) {
        let (subs, mut cx, actions) = self.split(now);
        for (sid, s) in subs.iter_mut() {
            if path::is_within(&ev.path, &s.path) {
                actions.extend(s.offer(*sid, ev.clone(), &mut cx).map(Action::FetchLog));
            }
        }
    }
}
