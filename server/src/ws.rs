//! The WebSocket endpoint: one task per connection, joining a reader (commands) and a writer
//! (the bounded outbound queue, coalesced into one flush per burst).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ivy_client_core::wire::{Command, ErrorCode, Op, encode_ack, encode_error};
use tokio::sync::mpsc;

use crate::Shared;
use crate::broker::{Conn, Ending};
use crate::sequencer::{Input, PublishRequest, Reply};

/// Close codes the server sends (see `docs/PROTOCOL.md`).
pub mod close_code {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol (for example an unmasked frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_UTF8: u16 = 1007;
    /// A message exceeded the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The connection's outbound queue overflowed: it did not read fast enough.
    pub const SLOW_CONSUMER: u16 = crate::broker::SLOW_CONSUMER;
}

/// The subprotocol echoed when the client offers it.
pub const SUBPROTOCOL: &str = "ivy1";

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

pub(crate) async fn handler(State(shared): State<Arc<Shared>>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    if !origin_allowed(&shared.config.allowed_origins, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let max = shared.config.max_message_size;
    let tracker = shared.tracker.clone();
    ws.protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024)
        .on_upgrade(move |socket| tracker.track_future(connection(shared, socket)))
}

async fn connection(shared: Arc<Shared>, socket: WebSocket) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (conn, rx, ending) = Conn::new(id, shared.config.queue_length);
    let (sink, stream) = socket.split();
    tracing::debug!(conn = id, "connected");
    tokio::join!(read_loop(&shared, conn, stream), write_loop(&shared, rx, sink, &ending));
    tracing::debug!(conn = id, code = ending.code(), "disconnected");
}

async fn read_loop(shared: &Shared, conn: Arc<Conn>, mut stream: futures_util::stream::SplitStream<WebSocket>) {
    let mut subs: HashSet<Box<str>> = HashSet::new();
    let ending = conn.ending();
    let kill = ending.kill().clone();
    loop {
        let msg = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            _ = shared.stop_reading.cancelled() => {
                ending.set(close_code::GOING_AWAY);
                break;
            }
            m = stream.next() => m,
        };
        match msg {
            Some(Ok(Message::Text(text))) => handle_command(shared, &conn, &mut subs, text).await,
            Some(Ok(Message::Binary(_))) => {
                let mut line = Vec::new();
                encode_error(
                    None,
                    ErrorCode::Unsupported,
                    "binary frames are not part of the protocol; send each command as a text frame",
                    &mut line,
                );
                conn.push_line(line);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                ending.end(PEER_GONE);
                break;
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
                break;
            }
        }
    }
    shared.broker.unsubscribe_all(&conn, &mut subs.iter().map(|s| &**s));
}

async fn handle_command(shared: &Shared, conn: &Arc<Conn>, subs: &mut HashSet<Box<str>>, text: Utf8Bytes) {
    let bytes = text.as_bytes();
    let cmd = match Command::parse_with_limit(bytes, shared.config.max_path_length) {
        Ok(cmd) => cmd,
        Err(e) => {
            let mut line = Vec::new();
            encode_error(e.ack, e.kind.code(), &e.kind.to_string(), &mut line);
            conn.push_line(line);
            return;
        }
    };
    let ack = cmd.ack;
    let ack_line = |ts| {
        if let Some(key) = ack {
            let mut line = Vec::new();
            encode_ack(key, ts, &mut line);
            conn.push_line(line);
        }
    };
    match cmd.op {
        Op::Subscribe(path) => {
            if !subs.contains(&*path) && subs.len() >= shared.config.max_subscriptions {
                let mut line = Vec::new();
                let msg = format!("this connection already holds {} subscriptions, the limit", subs.len());
                encode_error(ack, ErrorCode::TooManySubscriptions, &msg, &mut line);
                conn.push_line(line);
                return;
            }
            shared.broker.subscribe(conn, &path, &mut |ts| ack_line(ts));
            subs.insert(path.into_owned().into_boxed_str());
        }
        Op::Unsubscribe(path) => {
            subs.remove(&*path);
            shared.broker.unsubscribe(conn, &path, &mut |ts| ack_line(ts));
        }
        Op::Timestamp => {
            let mut line = Vec::new();
            encode_ack(ack.unwrap_or_default(), shared.clock.now(), &mut line);
            conn.push_line(line);
        }
        Op::Send { path, data } => {
            let data_start = data.as_ptr() as usize - bytes.as_ptr() as usize;
            let request = PublishRequest {
                path: path.into_owned().into_boxed_str(),
                message: text.clone(),
                data_start,
                sender: Some(conn.id()),
                reply: Reply::Conn { conn: conn.clone(), key: ack.map(Box::from) },
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

async fn write_loop(shared: &Shared, mut rx: mpsc::Receiver<Message>, mut sink: Sink, ending: &Ending) {
    let kill = ending.kill();
    loop {
        let first = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            _ = shared.force_close.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
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
            _ = kill.cancelled() => break,
            _ = shared.force_close.cancelled() => break,
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
        _ = shared.force_close.cancelled() => {}
    }
}
