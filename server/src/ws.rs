//! The WebSocket endpoint, I/O only: one task per connection, joining a reader (frames into
//! the connection's [`Session`], its decisions carried out) and a writer (the bounded outbound
//! queue, coalesced into one flush per burst).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::Shared;
use crate::auth::{self, Access};
use crate::budget::{SHED_PAGE_BYTES, SMALL_SEND};
use crate::catchup::{Filter, split_line};
use crate::conn::{Conn, Ending, Outbox, PEER_GONE, ReaderStop, ReplySlot, Slot, Stop, WriterStop, close_code};
use crate::engine::presence::Watch;
use crate::engine::{Completion, Member, MemberId, Origin, Publish, ReadRequest};
use crate::fanout::ConnId;
use crate::limits::Admitted;
use crate::session::{Outcome, PendingReply, Session, ack_line, error_line};
use ivy_client_core::wire::ErrorCode;

/// The subprotocol: one definition, in the protocol core.
pub use ivy_client_core::SUBPROTOCOL;

pub(crate) fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true, // not a browser
        Some(Ok(origin)) => allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)),
        Some(Err(_)) => allowed.iter().any(|a| a == "*"),
    }
}

/// `Retry-After` of the refusal at the connection limit, in seconds.
const RETRY_AFTER: &str = "5";

pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    admitted: Option<Extension<Arc<Admitted>>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !origin_allowed(&shared.config.allowed_origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    // The token is verified here, once for the connection's whole life.
    let access = match shared.auth.request_access(&headers, query.as_deref()) {
        Ok((access, _)) => access,
        Err(e) => {
            // Never the token itself: the URI with it redacted.
            tracing::debug!(uri = %auth::Redacted(&uri), reason = %e, "WebSocket refused: invalid token");
            return auth::unauthorized(&e.0);
        }
    };
    // The token is checked before the upgrade request itself: a plain `GET /ws?token=...` (a
    // browser's `fetch` after a failed WebSocket, whose status the browser hides) learns why
    // its token is refused.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(slot) = shared.connections.admit() else {
        let max = shared.connections.max();
        tracing::debug!(limit = max, "WebSocket refused: connection limit reached");
        let body = format!("too many connections: the limit is {max}; try again later\n");
        let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::RETRY_AFTER, RETRY_AFTER)];
        return (StatusCode::SERVICE_UNAVAILABLE, headers, body).into_response();
    };
    // The extensions asked for (`ext=a,b`): the known ones are taken and echoed, the others
    // ignored (docs/PROTOCOL.md 2.6).
    let senders = ivy_client_core::http::wants_senders(query.as_deref());
    let max = shared.config.max_message_size;
    let tracker = shared.tracker.clone();
    let mut response = ws
        .protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(2048)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                // The TCP connection's place (under `serve`) is held for as long as it lives.
                let peer = admitted.as_ref().and_then(|a| a.ip());
                let _admitted = admitted;
                connection(shared, socket, slot, peer, access, senders).await;
            })
        });
    if senders {
        response.headers_mut().insert(IVY_EXTENSIONS, header::HeaderValue::from_static(ivy_client_core::http::EXT_SENDER));
    }
    response
}

/// The response header that names the extensions a connection got (`docs/PROTOCOL.md` 2.6).
pub(crate) const IVY_EXTENSIONS: header::HeaderName = header::HeaderName::from_static("ivy-extensions");

/// Most sends of one connection waiting in the engine's queue or being stored: its fair share,
/// so that one connection's flood cannot fill the queue that every connection's sends go
/// through (a send beyond it waits, and the connection's next commands with it).
const SENDS_IN_FLIGHT: usize = 256;

async fn connection(shared: Arc<Shared>, socket: WebSocket, mut slot: Slot, peer: Option<std::net::IpAddr>, access: Access, senders: bool) {
    let id = shared.connections.next_id();
    let config = &shared.config;
    let (conn, rx, ending) = Conn::with_limits(id, config.queue_length, config.queue_bytes, shared.budget.clone());
    let conn = conn.with_senders(senders);
    let out = conn.outbox().clone();
    // Who it is, for the admin endpoints (before it is registered, so that they see it).
    crate::admin::identify(&shared, &conn, &access);
    slot.register(&ending, &out, conn.who());
    // A revocation made after the handshake's check and before the registration.
    crate::admin::check_revoked(&shared, &conn);
    let Some((reader_stop, writer_stop)) = ending.halves() else { return };
    let identity = match &access {
        Access::Granted(p) => p.sub.as_deref().and_then(|sub| shared.identities.budget(sub)),
        Access::Open => None,
    };
    let session = Session::new(&shared.config, access).with_identity_budget(identity);
    let (sink, stream) = socket.split();
    match peer {
        Some(ip) => tracing::info!(conn = %id, peer = %ip, "connected"),
        None => tracing::info!(conn = %id, "connected"),
    }
    let reader = async {
        let (stream, stop) = read_loop(&shared, conn, session, stream, reader_stop).await;
        linger(stream, stop).await;
    };
    tokio::join!(reader, write_loop(&shared, (id, senders), out, rx, sink, writer_stop, &ending));
    tracing::info!(conn = %id, code = ending.code(), "disconnected");
    shared.metrics.closed(ending.code());
    drop(slot);
}

type Stream = futures_util::stream::SplitStream<WebSocket>;

/// After the server closed a connection that may still be sending (a slow consumer, a message
/// too big or not UTF-8), reads and discards its input until it closes too, at most
/// `CLOSE_TIMEOUT`: a socket closed with unread input is reset by the kernel, and the reset
/// can destroy the close frame on its way to the client. (After a framing error nothing more
/// can be read, so a client that keeps sending then may still see a reset.)
async fn linger(mut stream: Stream, mut stop: ReaderStop) {
    if !matches!(stop.ending().code(), close_code::SLOW_CONSUMER | close_code::TOO_BIG | close_code::INVALID_UTF8) {
        return;
    }
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    let forced = stop.stopped(&[Stop::Forced]);
    tokio::pin!(forced);
    loop {
        tokio::select! {
            _ = &mut forced => return,
            next = tokio::time::timeout_at(deadline, stream.next()) => match next {
                Ok(Some(Ok(_))) => {}
                _ => return,
            },
        }
    }
}

/// Waits for the next ping tick; forever when pings are off.
async fn tick(pings: &mut Option<Interval>) {
    match pings {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits until the connection's token has expired (past `--auth-refresh-grace`); forever
/// when it has none.
async fn expiry(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// When a token expiring at `exp` (seconds since the Unix epoch) closes its connection: `exp`
/// plus `grace`, as an `Instant`.
fn expiry_deadline(exp: u64, grace: Duration) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let left = Duration::from_secs(exp).saturating_sub(now).saturating_add(grace);
    // A far-future `exp` would overflow an Instant: a year is forever enough.
    Instant::now() + left.min(Duration::from_secs(365 * 86_400))
}

/// Reads frames and carries out the session's decisions until the connection ends; gives the
/// stream and the reader's stop back.
async fn read_loop(
    shared: &Shared,
    conn: Arc<Conn>,
    mut session: Session,
    mut stream: Stream,
    mut stop: ReaderStop,
) -> (Stream, ReaderStop) {
    let ending = conn.ending();
    let started = Instant::now();
    let every = shared.config.ping_interval;
    let mut pings = (!every.is_zero()).then(|| {
        let mut interval = tokio::time::interval_at(started + every, every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    // A ping went out and nothing has arrived since.
    let mut awaiting_pong = false;
    // Only a connection with a token has a timer (boxed: most have none).
    let mut expires =
        session.expires().map(|exp| Box::pin(tokio::time::sleep_until(expiry_deadline(exp, shared.config.auth_refresh_grace))));
    let sends = Arc::new(Semaphore::new(SENDS_IN_FLIGHT));
    // Who the connection is in presence (an anonymous one gets an id of its own).
    let presence = shared.engine.presence();
    let mut member = member_of(session.access());
    {
        // Created once, not per command.
        let stopped = stop.stopped(&[Stop::Killed, Stop::Shutdown]);
        tokio::pin!(stopped);
        loop {
            let msg = tokio::select! {
                biased;
                s = &mut stopped => {
                    if s == Stop::Shutdown {
                        ending.set(close_code::GOING_AWAY);
                    }
                    break;
                }
                () = expiry(&mut expires) => {
                    tracing::debug!(conn = %conn.id(), "token expired: closing");
                    ending.end(close_code::TOKEN_EXPIRED);
                    break;
                }
                m = stream.next() => m,
                () = tick(&mut pings) => {
                    // Behind (not caught up since its queue overflowed) for a whole interval, or
                    // behind and silent: a slow consumer.
                    if conn.behind_since().is_some_and(|since| since.elapsed() >= every || awaiting_pong) {
                        tracing::debug!(conn = %conn.id(), "behind for a whole ping interval: closing");
                        ending.end(close_code::SLOW_CONSUMER);
                        break;
                    }
                    if awaiting_pong {
                        tracing::debug!(conn = %conn.id(), "no pong for a whole ping interval: closing");
                        ending.end(close_code::PING_TIMEOUT);
                        break;
                    }
                    awaiting_pong = true;
                    conn.push_ping();
                    continue;
                }
            };
            // Anything at all (a pong, a command, even a bad frame) shows the peer is alive.
            awaiting_pong = false;
            let frame = match msg {
                Some(Ok(Message::Text(text))) => Some(text),
                Some(Ok(Message::Binary(_))) => None,
                other => {
                    if end_of_stream(other, &conn) {
                        break;
                    }
                    continue;
                }
            };
            // Every command may have a reply: wait for a place for it in the queue. A client that
            // does not read its replies is not read either, and is closed after a whole ping
            // interval of that.
            let slot = match conn.try_reserve() {
                Ok(slot) => slot,
                Err(false) => break,
                // The slow path, boxed: its futures (a reservation, a timer) would otherwise make
                // every connection's task larger for a wait that idle connections never do.
                Err(true) => {
                    let wait = Box::pin(async {
                        tokio::select! {
                            biased;
                            s = &mut stopped => {
                                if s == Stop::Shutdown {
                                    ending.set(close_code::GOING_AWAY);
                                }
                                None
                            }
                            slot = conn.reserve() => slot,
                            () = stall(every) => {
                                tracing::debug!(conn = %conn.id(), "replies unread for a whole ping interval: closing");
                                ending.end(close_code::SLOW_CONSUMER);
                                None
                            }
                        }
                    });
                    match wait.await {
                        Some(slot) => slot,
                        None => break,
                    }
                }
            };
            let now = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            match frame {
                Some(text) => {
                    tracing::trace!(conn = %conn.id(), "in {}", Excerpt(text.as_bytes()));
                    let outcome = session.on_text(now, text.as_bytes(), &shared.refusals);
                    if let Outcome::Refresh { ack, token } = outcome {
                        // Verified here, applied by the session; the deadline moves with it.
                        let verified = std::str::from_utf8(token)
                            .map_err(|_| auth::TokenError("invalid token: not UTF-8".into()))
                            .and_then(|t| shared.auth.access(Some(t)));
                        let refreshed = verified.clone();
                        match session.refresh(verified) {
                            Ok(done) => {
                                tracing::debug!(conn = %conn.id(), ended = done.ended.len(), "token refreshed in-band");
                                if let Ok(access) = &refreshed {
                                    crate::admin::identify(shared, &conn, access);
                                    crate::admin::check_revoked(shared, &conn);
                                }
                                if let Some(sub) = &done.new_identity {
                                    session.set_identity_budget(shared.identities.budget(sub));
                                    // Present as the token's sub from now on.
                                    member = member_of(session.access());
                                    presence.rekey(conn.id(), &member);
                                }
                                // Each ended subscription is announced right after its last
                                // event, before the reply (a place for each, as for replies).
                                for (path, line) in done.ended {
                                    presence.unwatch(conn.id(), &path);
                                    presence.leave(conn.id(), &path);
                                    let place = match conn.try_reserve() {
                                        Ok(place) => Some(place),
                                        Err(false) => None,
                                        // Replies unread: as in the slow path above.
                                        Err(true) => {
                                            Box::pin(async {
                                                tokio::select! {
                                                    place = conn.reserve() => place,
                                                    () = stall(every) => {
                                                        ending.end(close_code::SLOW_CONSUMER);
                                                        None
                                                    }
                                                }
                                            })
                                            .await
                                        }
                                    };
                                    shared.fanout.unsubscribe(&conn, &path, |ts| {
                                        if let Some(place) = place {
                                            place.send_line_at(ts, line);
                                        }
                                    });
                                }
                                expires = session
                                    .expires()
                                    .map(|exp| Box::pin(tokio::time::sleep_until(expiry_deadline(exp, shared.config.auth_refresh_grace))));
                                if let Some(key) = ack {
                                    slot.send_line(ack_line(key, shared.engine.now()));
                                }
                            }
                            Err(reason) => {
                                tracing::debug!(conn = %conn.id(), %reason, "in-band token refused");
                                slot.send_line(error_line(ack, ErrorCode::Unauthorized, &reason));
                            }
                        }
                        continue;
                    }
                    execute(shared, (&conn, &member), &sends, &text, outcome, slot, session.origin()).await;
                    // Subscription changes beyond their budget: the next command waits (the
                    // slow path, boxed like the others).
                    let pause = session.take_pause();
                    if pause > 0 {
                        let wait = Box::pin(async {
                            tokio::select! {
                                biased;
                                s = &mut stopped => {
                                    if s == Stop::Shutdown {
                                        ending.set(close_code::GOING_AWAY);
                                    }
                                    false
                                }
                                () = tokio::time::sleep(Duration::from_nanos(pause)) => true,
                            }
                        });
                        if !wait.await {
                            break;
                        }
                    }
                }
                None => {
                    tracing::trace!(conn = %conn.id(), "in (binary frame)");
                    let outcome = session.on_binary(now, &shared.refusals);
                    execute(shared, (&conn, &member), &sends, &Utf8Bytes::from_static(""), outcome, slot, session.origin()).await;
                }
            }
        }
    }
    // Presence first: a watch still waiting for its tick is dropped before the fan-out
    // subscriptions end, so that none is made after them.
    presence.disconnect(conn.id());
    shared.fanout.unsubscribe_all(&conn, session.subscriptions());
    (stream, stop)
}

/// The member a connection with `access` is in presence: its token's `sub` and `info`, or an
/// anonymous member of its own.
fn member_of(access: &Access) -> Member {
    match access {
        Access::Granted(p) => match &p.sub {
            Some(sub) => Member { id: MemberId::Sub(Arc::from(&**sub)), info: p.info.clone() },
            None => Member { id: MemberId::anonymous(), info: None },
        },
        Access::Open => Member { id: MemberId::anonymous(), info: None },
    }
}

/// Carries out one decision of the session; its reply (if any) goes into `slot`.
async fn execute(
    shared: &Shared,
    (conn, member): (&Arc<Conn>, &Member),
    sends: &Arc<Semaphore>,
    frame: &Utf8Bytes,
    outcome: Outcome<'_>,
    slot: ReplySlot,
    origin: &Origin,
) {
    match outcome {
        Outcome::Reply(line) => slot.send_line(line),
        Outcome::Prepared(line) => slot.send(Message::Text(line)),
        Outcome::Subscribe { ack, path } => {
            if !shared.engine.settled().await {
                return conn.ending().end(close_code::TRY_AGAIN_LATER);
            }
            // Present before the reply goes out: a `~?` or `GET /presence` made after it
            // finds the member.
            shared.engine.presence().join(conn.id(), &path, member);
            shared.fanout.subscribe(conn, &path, |ts| {
                if let Some(key) = ack {
                    slot.send_line_at(ts, ack_line(key, ts));
                }
            });
        }
        Outcome::Unsubscribe { ack, path } => {
            let presence = shared.engine.presence();
            presence.unwatch(conn.id(), &path);
            presence.leave(conn.id(), &path);
            shared.fanout.unsubscribe(conn, &path, |ts| {
                if let Some(key) = ack {
                    slot.send_line_at(ts, ack_line(key, ts));
                }
            });
        }
        Outcome::PresenceWatch { ack, path } => {
            if !shared.engine.settled().await {
                return conn.ending().end(close_code::TRY_AGAIN_LATER);
            }
            // Present at once; the snapshot, the subscription and its reply come at the next
            // presence tick, and the next command is read after them (replies stay in order).
            let presence = shared.engine.presence();
            presence.join(conn.id(), &path, member);
            let (done, answered) = tokio::sync::oneshot::channel();
            let path: Box<str> = path.into();
            presence.watch(Watch { conn: conn.clone(), path, ack: ack.map(Box::from), slot, done });
            let _ = Box::pin(answered).await;
        }
        Outcome::PresenceQuery { ack, path } => {
            for line in shared.engine.presence().query(&path) {
                if !conn.push_presence(&line) {
                    conn.ending().end(close_code::SLOW_CONSUMER);
                    return;
                }
            }
            if let Some(key) = ack {
                slot.send_line(ack_line(key, shared.engine.now()));
            }
        }
        Outcome::Time { ack } => slot.send_line(ack_line(ack.unwrap_or_default(), shared.engine.now())),
        // Carried out by the read loop, which owns the session and the expiry timer.
        Outcome::Refresh { .. } => {}
        Outcome::Send { ack, path, data, id } => {
            let budget = &shared.budget;
            // The memory budget is used up: shed what costs (a large send, or pipelined ones),
            // serve a connection sending small events one at a time.
            if budget.is_over() && (frame.len() > SMALL_SEND || sends.available_permits() < SENDS_IN_FLIGHT) {
                shared.metrics.refused.overloaded.inc();
                let msg = format!(
                    "event not stored: the server is overloaded: it holds {} bytes for its clients, its memory budget is {}; retry later",
                    budget.used(),
                    budget.limit()
                );
                return slot.send_line(error_line(ack, ErrorCode::Overloaded, &msg));
            }
            // The frame's bytes are shared, not copied: the request keeps a slice of them.
            let bytes = Bytes::from(frame.clone());
            let id = id.map(|id| bytes.slice(id));
            let data = bytes.slice(data);
            // Waits (boxed, the rare case: see the reservation in `read_loop`) only when the
            // connection has all its share of sends in the queue, or the queue is full.
            let share = match sends.clone().try_acquire_owned() {
                Ok(share) => Some(share),
                // Never closed: this waits for one of the connection's sends to complete.
                Err(_) => Box::pin(sends.clone().acquire_owned()).await.ok(),
            };
            let mut reply = PendingReply::new(slot, ack, share);
            if budget.limit() != 0 {
                reply = reply.charged(budget.charge(frame.len()));
            }
            let done = Completion::reply(reply);
            let mut request = Publish::new(path, data, done);
            request.sender = Some(conn.id());
            request.origin = origin.clone();
            request.id = id;
            if let Err(request) = shared.publisher.try_publish(request) {
                Box::pin(shared.publisher.publish(request)).await;
            }
        }
    }
}

/// Waits `limit`, forever when it is zero.
async fn stall(limit: Duration) {
    if limit.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(limit).await;
}

/// Handles what the stream gave besides a command; whether the connection is over.
fn end_of_stream(msg: Option<Result<Message, axum::Error>>, conn: &Conn) -> bool {
    let ending = conn.ending();
    match msg {
        Some(Ok(Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => false,
        Some(Ok(Message::Close(_))) | None => {
            ending.end(PEER_GONE);
            true
        }
        Some(Err(e)) => {
            let e = e.into_inner();
            // axum boxes tungstenite's error; the workspace pins the same tungstenite.
            let code = match e.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Capacity(_)) => close_code::TOO_BIG,
                Some(tungstenite::Error::Utf8(_)) => close_code::INVALID_UTF8,
                Some(tungstenite::Error::Protocol(_)) => close_code::PROTOCOL_ERROR,
                _ => PEER_GONE,
            };
            tracing::debug!(conn = %conn.id(), error = %e, code, "read error");
            ending.end(code);
            true
        }
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// How long a close frame may take to go out before the connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most queued messages written before one flush.
const COALESCE: usize = 256;

/// The most of a frame that a trace-level log line shows, in bytes.
const EXCERPT: usize = 120;

/// The start of a frame, for trace-level logs: formatted only when such a line is written
/// (`tracing::trace!` evaluates its arguments after the level check, and this one holds a
/// reference only). A token refresh (`[#key#]&JWT`) shows without its token.
struct Excerpt<'a>(&'a [u8]);

impl std::fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key_end = match self.0.strip_prefix(b"#") {
            Some(rest) => rest.iter().position(|&b| b == b'#').map_or(0, |end| end + 2),
            None => 0,
        };
        if self.0.get(key_end) == Some(&b'&') {
            let key = String::from_utf8_lossy(&self.0[..key_end.min(EXCERPT)]);
            return write!(f, "{}&[redacted]", key.escape_debug());
        }
        let head = String::from_utf8_lossy(&self.0[..self.0.len().min(EXCERPT)]);
        write!(f, "{}{}", head.escape_debug(), if self.0.len() > EXCERPT { "…" } else { "" })
    }
}

/// A message on its way to the socket, for trace-level logs (see [`Excerpt`]).
struct Outgoing<'a>(&'a Message);

impl std::fmt::Display for Outgoing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Message::Text(t) => Excerpt(t.as_bytes()).fmt(f),
            Message::Ping(_) => f.write_str("(ping)"),
            Message::Pong(_) => f.write_str("(pong)"),
            Message::Close(c) => write!(f, "(close {:?})", c.as_ref().map(|c| c.code)),
            Message::Binary(b) => write!(f, "(binary, {} bytes)", b.len()),
        }
    }
}

/// The bytes of a queued text line (what [`Outbox`] counts).
fn text_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        _ => 0,
    }
}

/// Writes the connection's queue to its socket, `conn` naming it in trace-level logs of each
/// message written; when the connection is behind and its queue is written, catches it up from
/// the log ([`catch_up`]).
async fn write_loop(
    shared: &Shared,
    (conn, senders): (ConnId, bool),
    out: Arc<Outbox>,
    mut rx: mpsc::Receiver<Message>,
    mut sink: Sink,
    mut stop: WriterStop,
    ending: &Ending,
) {
    {
        // Created once, not per message.
        let stopped = stop.stopped(&[Stop::Killed, Stop::Forced]);
        tokio::pin!(stopped);
        loop {
            // A message already queued needs no wait (the write below still watches for the end).
            let first = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if out.is_behind() => {
                    // The slow path, boxed (see the reservation in `read_loop`).
                    let round = Box::pin(catch_up(shared, (conn, senders), &out, &mut sink));
                    tokio::select! {
                        biased;
                        _ = &mut stopped => break,
                        r = round => match r {
                            Ok(()) => continue,
                            Err(code) => {
                                ending.end(code);
                                break;
                            }
                        },
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    () = out.fell_behind() => continue,
                },
            };
            let write = async {
                tracing::trace!(conn = %conn, "out {}", Outgoing(&first));
                let mut taken = text_len(&first);
                sink.feed(first).await?;
                for _ in 1..COALESCE {
                    match rx.try_recv() {
                        Ok(m) => {
                            tracing::trace!(conn = %conn, "out {}", Outgoing(&m));
                            taken += text_len(&m);
                            sink.feed(m).await?;
                        }
                        Err(_) => break,
                    }
                }
                out.written(taken);
                sink.flush().await
            };
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                r = write => if r.is_err() {
                    ending.end(PEER_GONE);
                    break;
                },
            }
        }
    }
    let frame = close_frame(ending);
    // Free the queue now; a slow consumer's close frame may have to wait for it to read.
    drop(rx);
    let close = async {
        if let Some((code, reason)) = frame {
            sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await?;
        }
        sink.close().await
    };
    tokio::select! {
        _ = tokio::time::timeout(CLOSE_TIMEOUT, close) => {}
        _ = stop.stopped(&[Stop::Forced]) => {}
    }
}

/// Most events in one page read to catch a connection up.
const CATCH_UP_EVENTS: usize = 1024;
/// Bytes of one page read to catch a connection up (plus one event).
const CATCH_UP_BYTES: usize = 256 << 10;

/// One catch-up round of a connection that is behind, its queue written: it rejoins live
/// delivery at the fan-out's position P (later events are queued again), then writes what it
/// is owed from the log up to P, page by page, with the replies held meanwhile at their places
/// (the queue, written next, holds only what came after P). `Err` with the close code when
/// the connection must end.
async fn catch_up(shared: &Shared, (conn, senders): (ConnId, bool), out: &Outbox, sink: &mut Sink) -> Result<(), u16> {
    let mut rejoin = shared.fanout.quiesced(|position| out.rejoin(position));
    let filter = Filter::new(std::mem::take(&mut rejoin.windows), std::mem::take(&mut rejoin.own));
    tracing::debug!(conn = %conn, after = %rejoin.after, until = %rejoin.until, "catching up from the log");
    let gone = |_| PEER_GONE;
    if let Some(channel) = filter.channel() {
        let budget = out.budget();
        let mut after = rejoin.after;
        while after < rejoin.until {
            let bytes = if budget.is_over() { SHED_PAGE_BYTES } else { CATCH_UP_BYTES };
            // The lines live delivery would have given: the extended ones with `ext=sender`.
            let request = ReadRequest::new(channel, Some(after), rejoin.until, CATCH_UP_EVENTS).max_bytes(bytes).with_senders(senders);
            let page = shared.engine.read(request.clone()).await.map_err(|e| {
                tracing::error!(conn = %conn, error = %e, "reading the log to catch a connection up failed; closing it");
                close_code::SLOW_CONSUMER
            })?;
            let full = page.is_full(&request);
            let last = page.last;
            let _charge = (budget.limit() != 0).then(|| budget.charge(page.lines.len()));
            let lines = Bytes::from(page.lines);
            // Deliveries from the log, counted once per page.
            let (mut events, mut bytes) = (0u64, 0u64);
            let mut start = 0;
            while start < lines.len() {
                let end = lines[start..].iter().position(|&b| b == b'\n').map_or(lines.len(), |i| start + i);
                let line = lines.slice(start..end);
                start = end + 1;
                let Some((ts, path)) = split_line(&line) else { continue };
                if !filter.wants(ts, path) {
                    continue;
                }
                while rejoin.held.front().is_some_and(|h| h.pos < ts) {
                    if let Some(h) = rejoin.held.pop_front() {
                        sink.feed(h.msg).await.map_err(gone)?;
                    }
                }
                if let Ok(text) = Utf8Bytes::try_from(line) {
                    tracing::trace!(conn = %conn, "out (from the log) {}", Excerpt(text.as_bytes()));
                    (events, bytes) = (events + 1, bytes + text.len() as u64);
                    sink.feed(Message::Text(text)).await.map_err(gone)?;
                }
            }
            shared.metrics.delivery.caught_up(events, bytes);
            sink.flush().await.map_err(gone)?;
            after = match (full, last) {
                (true, Some(last)) => last,
                _ => rejoin.until,
            };
        }
    }
    while let Some(h) = rejoin.held.pop_front() {
        sink.feed(h.msg).await.map_err(gone)?;
    }
    sink.flush().await.map_err(gone)?;
    out.round_done();
    Ok(())
}

/// The close frame for how the connection ended (none when the peer is gone).
fn close_frame(ending: &Ending) -> Option<(u16, &'static str)> {
    match ending.code() {
        PEER_GONE => None,
        0 | close_code::GOING_AWAY => Some((close_code::GOING_AWAY, "server shutting down")),
        close_code::TOO_BIG => Some((close_code::TOO_BIG, "message too big")),
        close_code::INVALID_UTF8 => Some((close_code::INVALID_UTF8, "text frame is not valid UTF-8")),
        close_code::PROTOCOL_ERROR => Some((close_code::PROTOCOL_ERROR, "WebSocket protocol error")),
        close_code::SLOW_CONSUMER => Some((close_code::SLOW_CONSUMER, "slow consumer: outbound queue full")),
        close_code::PING_TIMEOUT => Some((close_code::PING_TIMEOUT, "ping timeout: nothing received for a whole ping interval")),
        close_code::TOKEN_EXPIRED => Some((close_code::TOKEN_EXPIRED, "token expired: refresh it in-band or reconnect with a fresh token")),
        crate::conn::REVOKED => Some((close_code::TOKEN_EXPIRED, "token revoked: reconnect with a fresh token")),
        close_code::DISCONNECTED => Some((close_code::DISCONNECTED, "disconnected by an administrator")),
        close_code::TRY_AGAIN_LATER => {
            Some((close_code::TRY_AGAIN_LATER, "try again later: this node cannot reach the event store or is behind it"))
        }
        crate::engine::redis::CONTINUITY_LOST => {
            Some((crate::engine::redis::CONTINUITY_LOST, "continuity lost: the event store lost events; resume from the log"))
        }
        code => Some((code, "")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_excerpts_are_escaped_and_cut() {
        assert_eq!(Excerpt(b"#1#:/a:x\ny\"z").to_string(), "#1#:/a:x\\ny\\\"z");
        assert_eq!(Excerpt(b"#7#&eyJhbGciOi.secret.sig").to_string(), "#7#&[redacted]", "never a token");
        assert_eq!(Excerpt(b"&eyJhbGciOi.secret.sig").to_string(), "&[redacted]");
        let long = "é".repeat(100);
        let shown = Excerpt(long.as_bytes()).to_string();
        assert!(shown.starts_with(&"é".repeat(60)) && shown.ends_with('…'), "{shown}");
        assert_eq!(shown.chars().count(), 61);
        assert_eq!(Outgoing(&Message::Text("@1.000000001:/a:x".into())).to_string(), "@1.000000001:/a:x");
        assert_eq!(Outgoing(&Message::Ping(Bytes::new())).to_string(), "(ping)");
        let close = Message::Close(Some(CloseFrame { code: 1001, reason: "bye".into() }));
        assert_eq!(Outgoing(&close).to_string(), "(close Some(1001))");
    }
}
