//! The WebSocket endpoint: one task per connection, joining a reader (commands) and a writer
//! (the bounded outbound queue, coalesced into one flush per burst).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ivy_client_core::wire::{Command, ErrorCode, Op, encode_ack, encode_error};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::broker::{Conn, Ending, Half, ReplySlot, Stop};
use crate::ratelimit::RateLimiter;
use crate::sequencer::{Input, PublishRequest, Reply};

/// The close codes and the subprotocol: one definition, in the protocol core.
pub use ivy_client_core::{SUBPROTOCOL, close_code};

/// Recorded when the peer closed or vanished: nothing more to send.
const PEER_GONE: u16 = 1;

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

/// One of the `--max-connections` WebSocket slots, given back when dropped (when the
/// connection ends, or when the upgrade never completes).
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Replies prepared once, so that refusing a flood allocates nothing per command when it
/// carries no ack key.
#[derive(Debug)]
pub(crate) struct Refusals {
    rate_limited_message: Box<str>,
    rate_limited_keyless: Utf8Bytes,
}

impl Refusals {
    pub(crate) fn new(config: &crate::Config) -> Refusals {
        let message = format!(
            "too many commands: the limit is {} per second (bursts of {}); this command was not executed",
            config.rate_limit,
            config.rate_burst.max(1)
        );
        let mut line = Vec::new();
        encode_error(None, ErrorCode::RateLimited, &message, &mut line);
        Refusals {
            rate_limited_keyless: String::from_utf8_lossy(&line).into_owned().into(),
            rate_limited_message: message.into_boxed_str(),
        }
    }

    /// Replies `[#key#]!rate-limited ...` in `slot`.
    fn rate_limited(&self, key: Option<&[u8]>, slot: ReplySlot) {
        match key {
            None => slot.send(Message::Text(self.rate_limited_keyless.clone())),
            Some(key) => {
                let mut line = Vec::new();
                encode_error(Some(key), ErrorCode::RateLimited, &self.rate_limited_message, &mut line);
                slot.send_line(line);
            }
        }
    }
}

/// The open connections' [`Ending`]s, so that the server-wide shutdown signals reach each
/// connection's own (cheap to wait on) signal; touched once when a connection opens and once
/// when it closes, never per message. A slab: 8 bytes per connection, places reused.
#[derive(Debug, Default)]
pub(crate) struct Live(Mutex<Slab>);

#[derive(Debug, Default)]
struct Slab {
    places: Vec<Option<Arc<Ending>>>,
    free: Vec<usize>,
}

/// Removes a connection from [`Live`] when dropped.
pub(crate) struct Registered<'a>(&'a Live, usize);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut slab = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        slab.places[self.1] = None;
        slab.free.push(self.1);
    }
}

impl Live {
    /// Adds a connection; it gets the shutdown signals already given.
    pub(crate) fn register<'a>(&'a self, ending: &Arc<Ending>, stop: &CancellationToken, force: &CancellationToken) -> Registered<'a> {
        let place = {
            let mut slab = self.0.lock().unwrap_or_else(PoisonError::into_inner);
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
        // After the insertion: a signal given before it is seen here, one given after it
        // finds the connection in the slab (see `Live::watch`).
        if stop.is_cancelled() {
            ending.stop_reading();
        }
        if force.is_cancelled() {
            ending.force();
        }
        Registered(self, place)
    }

    /// Passes `stop` (stop reading) and then `force` (stop writing) to every open connection
    /// when they are cancelled. `Ivy::stop_signal` is public, so an embedding application may
    /// cancel it directly instead of calling `Ivy::shutdown`.
    pub(crate) async fn watch(self: Arc<Live>, stop: CancellationToken, force: CancellationToken) {
        stop.cancelled().await;
        self.each(Ending::stop_reading);
        force.cancelled().await;
        self.each(Ending::force);
    }

    fn each(&self, f: fn(&Ending)) {
        for ending in self.0.lock().unwrap_or_else(PoisonError::into_inner).places.iter().flatten() {
            f(ending);
        }
    }
}

/// `Retry-After` of the refusal at the connection limit, in seconds.
const RETRY_AFTER: &str = "5";

pub(crate) async fn handler(State(shared): State<Arc<Shared>>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    if !origin_allowed(&shared.config.allowed_origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let Some(slot) = Slot::take(&shared.connections, shared.config.max_connections) else {
        tracing::debug!(limit = shared.config.max_connections, "WebSocket refused: connection limit reached");
        let body = format!("too many connections: the limit is {}; try again later\n", shared.config.max_connections);
        let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::RETRY_AFTER, RETRY_AFTER)];
        return (StatusCode::SERVICE_UNAVAILABLE, headers, body).into_response();
    };
    let max = shared.config.max_message_size;
    let tracker = shared.tracker.clone();
    ws.protocols([SUBPROTOCOL]).max_message_size(max).max_frame_size(max).read_buffer_size(2048).write_buffer_size(16 * 1024).on_upgrade(
        move |socket| {
            tracker.track_future(async move {
                connection(shared, socket).await;
                drop(slot);
            })
        },
    )
}

async fn connection(shared: Arc<Shared>, socket: WebSocket) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (conn, rx, ending) = Conn::new(id, shared.config.queue_length);
    let _registered = shared.live.register(&ending, &shared.stop_reading, &shared.force_close);
    let (sink, stream) = socket.split();
    tracing::debug!(conn = id, "connected");
    let reader = async {
        let stream = read_loop(&shared, conn, stream).await;
        linger(stream, &ending).await;
    };
    tokio::join!(reader, write_loop(rx, sink, &ending));
    tracing::debug!(conn = id, code = ending.code(), "disconnected");
}

type Stream = futures_util::stream::SplitStream<WebSocket>;

/// After the server closed a connection that may still be sending (a slow consumer, a message
/// too big or not UTF-8), reads and discards its input until it closes too, at most
/// `CLOSE_TIMEOUT`: a socket closed with unread input is reset by the kernel, and the reset
/// can destroy the close frame on its way to the client. (After a framing error nothing more
/// can be read, so a client that keeps sending then may still see a reset.)
async fn linger(mut stream: Stream, ending: &Ending) {
    if !matches!(ending.code(), close_code::SLOW_CONSUMER | close_code::TOO_BIG | close_code::INVALID_UTF8) {
        return;
    }
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    loop {
        tokio::select! {
            _ = ending.stopped(Half::Reader, &[Stop::Forced]) => return,
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

/// The ack key of a command that is refused before parsing (`#key#...`), if complete.
fn ack_key(msg: &[u8]) -> Option<&[u8]> {
    let rest = msg.strip_prefix(b"#")?;
    rest.iter().position(|&b| b == b'#').map(|end| &rest[..end])
}

/// Reads and executes commands until the connection ends; gives the stream back.
async fn read_loop(shared: &Shared, conn: Arc<Conn>, mut stream: Stream) -> Stream {
    let mut subs: HashSet<Box<str>> = HashSet::new();
    let ending = conn.ending();
    let mut limiter = RateLimiter::new(shared.config.rate_limit, shared.config.rate_burst);
    let started = Instant::now();
    let every = shared.config.ping_interval;
    let mut pings = (!every.is_zero()).then(|| {
        let mut interval = tokio::time::interval_at(started + every, every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    // A ping went out and nothing has arrived since.
    let mut awaiting_pong = false;
    // Created once, not per command.
    let stopped = ending.stopped(Half::Reader, &[Stop::Killed, Stop::StopReading]);
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            biased;
            stop = &mut stopped => {
                if stop == Stop::StopReading {
                    ending.set(close_code::GOING_AWAY);
                }
                break;
            }
            m = stream.next() => m,
            () = tick(&mut pings) => {
                if awaiting_pong {
                    tracing::debug!(conn = conn.id(), "no pong for a whole ping interval: closing");
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
        let command = match msg {
            Some(Ok(Message::Text(text))) => Ok(text),
            Some(Ok(Message::Binary(_))) => Err(()),
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
            Err(true) => tokio::select! {
                biased;
                stop = &mut stopped => {
                    if stop == Stop::StopReading {
                        ending.set(close_code::GOING_AWAY);
                    }
                    break;
                }
                slot = conn.reserve() => match slot {
                    Some(slot) => slot,
                    None => break,
                },
                () = stall(every) => {
                    tracing::debug!(conn = conn.id(), "replies unread for a whole ping interval: closing");
                    ending.end(close_code::SLOW_CONSUMER);
                    break;
                }
            },
        };
        if let Some(limiter) = &mut limiter {
            let now = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if !limiter.check(now) {
                let key = command.as_ref().ok().and_then(|t| ack_key(t.as_bytes()));
                shared.refusals.rate_limited(key, slot);
                continue;
            }
        }
        match command {
            Ok(text) => handle_command(shared, &conn, &mut subs, text, slot).await,
            Err(()) => {
                let mut line = Vec::new();
                encode_error(
                    None,
                    ErrorCode::Unsupported,
                    "binary frames are not part of the protocol; send each command as a text frame",
                    &mut line,
                );
                slot.send_line(line);
            }
        }
    }
    shared.broker.unsubscribe_all(&conn, &mut subs.iter().map(|s| &**s));
    stream
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
            tracing::debug!(conn = conn.id(), error = %e, code, "read error");
            ending.end(code);
            true
        }
    }
}

/// Executes one command; its reply (if any) goes into `slot`.
async fn handle_command(shared: &Shared, conn: &Arc<Conn>, subs: &mut HashSet<Box<str>>, text: Utf8Bytes, slot: ReplySlot) {
    let bytes = text.as_bytes();
    let cmd = match Command::parse_with_limit(bytes, shared.config.max_path_length) {
        Ok(cmd) => cmd,
        Err(e) => {
            let mut line = Vec::new();
            encode_error(e.ack, e.kind.code(), &e.kind.to_string(), &mut line);
            slot.send_line(line);
            return;
        }
    };
    let ack = cmd.ack;
    let mut slot = Some(slot);
    let mut ack_line = |ts| {
        if let (Some(key), Some(slot)) = (ack, slot.take()) {
            let mut line = Vec::new();
            encode_ack(key, ts, &mut line);
            slot.send_line(line);
        }
    };
    match cmd.op {
        Op::Subscribe(path) => {
            if !subs.contains(&*path) && subs.len() >= shared.config.max_subscriptions {
                let mut line = Vec::new();
                let msg = format!("this connection already holds {} subscriptions, the limit", subs.len());
                encode_error(ack, ErrorCode::TooManySubscriptions, &msg, &mut line);
                if let Some(slot) = slot.take() {
                    slot.send_line(line);
                }
                return;
            }
            shared.broker.subscribe(conn, &path, &mut ack_line);
            subs.insert(path.into_owned().into_boxed_str());
        }
        Op::Unsubscribe(path) => {
            subs.remove(&*path);
            shared.broker.unsubscribe(conn, &path, &mut ack_line);
        }
        Op::Timestamp => {
            let mut line = Vec::new();
            encode_ack(ack.unwrap_or_default(), shared.clock.now(), &mut line);
            if let Some(slot) = slot.take() {
                slot.send_line(line);
            }
        }
        Op::Send { path, data } => {
            let data_start = data.as_ptr() as usize - bytes.as_ptr() as usize;
            let request = PublishRequest {
                path: path.into_owned().into_boxed_str(),
                message: text.clone(),
                data_start,
                sender: Some(conn.id()),
                reply: Reply::Conn { conn: conn.clone(), key: ack.map(Box::from), slot: slot.take() },
            };
            if let Err(mpsc::error::SendError(Input::Publish(r))) = shared.publish_tx.send(Input::Publish(request)).await {
                r.reply.send(Err(crate::sequencer::PublishError::ShuttingDown));
            }
        }
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// How long a close frame may take to go out before the connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most queued messages written before one flush.
const COALESCE: usize = 256;

async fn write_loop(mut rx: mpsc::Receiver<Message>, mut sink: Sink, ending: &Ending) {
    // Created once, not per message.
    let stopped = ending.stopped(Half::Writer, &[Stop::Killed, Stop::Forced]);
    tokio::pin!(stopped);
    loop {
        // A message already queued needs no wait (the write below still watches for the end).
        let first = match rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                biased;
                _ = &mut stopped => break,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
            },
        };
        let write = async {
            sink.feed(first).await?;
            for _ in 1..COALESCE {
                match rx.try_recv() {
                    Ok(m) => sink.feed(m).await?,
                    Err(_) => break,
                }
            }
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
    let frame = match ending.code() {
        PEER_GONE => None,
        0 | close_code::GOING_AWAY => Some((close_code::GOING_AWAY, "server shutting down")),
        close_code::TOO_BIG => Some((close_code::TOO_BIG, "message too big")),
        close_code::INVALID_UTF8 => Some((close_code::INVALID_UTF8, "text frame is not valid UTF-8")),
        close_code::PROTOCOL_ERROR => Some((close_code::PROTOCOL_ERROR, "WebSocket protocol error")),
        close_code::SLOW_CONSUMER => Some((close_code::SLOW_CONSUMER, "slow consumer: outbound queue full")),
        close_code::PING_TIMEOUT => Some((close_code::PING_TIMEOUT, "ping timeout: nothing received for a whole ping interval")),
        code => Some((code, "")),
    };
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
        _ = ending.stopped(Half::Writer, &[Stop::Forced]) => {}
    }
}
