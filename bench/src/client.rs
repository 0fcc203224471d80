//! WebSocket clients of the three servers: connect (from a chosen 127.0.0.x source address),
//! subscribe, publish, and decode deliveries.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::servers::Kind;

pub type Ws = WebSocketStream<TcpStream>;

/// The channel (ivy path `/bench`, NATS subject `bench`) every scenario uses.
pub const IVY_CHANNEL: &str = "/bench";
pub const NATS_SUBJECT: &str = "bench";

/// The first loopback source address not yet used by this process (see [`reserve_sources`]).
static NEXT_SOURCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Reserves fresh loopback source addresses for `n` connections, `per_address` each, and
/// returns the first one's number (for [`source_ip`]). Every scenario and server gets
/// addresses of its own: the ports of the connections just closed stay in TIME_WAIT for a
/// minute, and a port in TIME_WAIT cannot be bound again, so reusing an address for another
/// 20,000 connections would run out of ports. The first number depends on the time of day, so
/// that runs one after the other do not meet their predecessors' TIME_WAIT ports either.
pub fn reserve_sources(n: usize, per_address: usize) -> usize {
    use std::sync::atomic::Ordering;
    let count = n.div_ceil(per_address.max(1)).max(1);
    let _ = NEXT_SOURCE.compare_exchange(
        usize::MAX,
        2 + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as usize) % 4096) * 1024,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    NEXT_SOURCE.fetch_add(count, Ordering::Relaxed)
}

/// Source address for connection `i` of a group whose addresses start at number `first`
/// (from [`reserve_sources`]), `per_address` connections each: 127.x.y.z with x.y.z = the number.
pub fn source_ip(first: usize, i: usize, per_address: usize) -> IpAddr {
    let n = first + i / per_address.max(1);
    IpAddr::from([127, ((n >> 16) & 0xff) as u8, ((n >> 8) & 0xff) as u8, (n & 0xff) as u8])
}

pub async fn tcp(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub async fn connect(kind: Kind, addr: SocketAddr, src: Option<IpAddr>) -> Result<Ws, String> {
    let stream = tcp(addr, src).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let url = format!("ws://{addr}{}", kind.ws_path());
    let mut req = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    if kind.is_ivy() {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(ivy_client_core::SUBPROTOCOL));
    }
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024).write_buffer_size(16 * 1024);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await.map_err(|e| format!("handshake {url}: {e}"))?;
    Ok(ws)
}

/// Subscribes `ws` to the benchmark channel and waits until the server confirms it.
pub async fn subscribe(kind: Kind, ws: &mut Ws) -> Result<(), String> {
    match kind {
        Kind::Ivy | Kind::IvyAsync => {
            send_text(ws, format!("#s#+{IVY_CHANNEL}")).await?;
            loop {
                let msg = next(ws).await?;
                if msg.starts_with(b"#s#@") {
                    return Ok(());
                }
                if msg.starts_with(b"#s#!") {
                    return Err(String::from_utf8_lossy(&msg).into_owned());
                }
            }
        }
        Kind::Nats => {
            send_text(ws, format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {NATS_SUBJECT} 1\r\nPING\r\n")).await?;
            let mut buf = Vec::new();
            loop {
                buf.extend_from_slice(&next(ws).await?);
                if buf.windows(6).any(|w| w == b"PONG\r\n") {
                    return Ok(());
                }
                if buf.windows(4).any(|w| w == b"-ERR") {
                    return Err(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        }
        Kind::Ideal => Ok(()),
    }
}

/// Prepares a publisher connection (NATS needs its CONNECT).
pub async fn publisher_hello(kind: Kind, ws: &mut Ws) -> Result<(), String> {
    if kind == Kind::Nats {
        send_text(ws, "CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n".to_owned()).await?;
        let mut buf = Vec::new();
        while !buf.windows(6).any(|w| w == b"PONG\r\n") {
            buf.extend_from_slice(&next(ws).await?);
        }
    }
    Ok(())
}

async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text)).await.map_err(|e| e.to_string())
}

/// The next text or binary message's bytes.
pub async fn next(ws: &mut Ws) -> Result<Bytes, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(Bytes::from(t)),
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the server: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".to_owned()),
        }
    }
}

/// A payload of `size` bytes (at least 20) starting with the send time in nanoseconds since
/// `base`, zero-padded to 20 digits, then `x`s.
pub fn payload(base: Instant, size: usize) -> String {
    let ns = base.elapsed().as_nanos() as u64;
    let mut s = format!("{ns:020}");
    s.extend(std::iter::repeat_n('x', size.saturating_sub(20)));
    s
}

/// The send time embedded by [`payload`].
pub fn sent_ns(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..20)?).ok()?.parse().ok()
}

/// The message that publishes `payload` (ivy with an optional ack key).
pub fn publish_message(kind: Kind, payload: &str, ack: Option<&str>) -> Message {
    match kind {
        Kind::Ivy | Kind::IvyAsync => match ack {
            Some(key) => Message::text(format!("#{key}#:{IVY_CHANNEL}:{payload}")),
            None => Message::text(format!(":{IVY_CHANNEL}:{payload}")),
        },
        Kind::Nats => Message::text(format!("PUB {NATS_SUBJECT} {}\r\n{payload}\r\n", payload.len())),
        Kind::Ideal => Message::text(payload.to_owned()),
    }
}

/// Decodes deliveries from the messages of one connection.
#[derive(Debug, Default)]
pub struct Decoder {
    /// NATS: bytes not yet parsed (a message may span WebSocket frames).
    buf: Vec<u8>,
    /// NATS: the server pinged; answer `PONG`.
    pub ping: bool,
}

impl Decoder {
    /// Calls `f` with the payload of every delivery in `msg`.
    pub fn feed(&mut self, kind: Kind, msg: &[u8], mut f: impl FnMut(&[u8])) {
        match kind {
            Kind::Ideal => f(msg),
            Kind::Ivy | Kind::IvyAsync => {
                // `@TS:/path:data`; replies start with `#`, errors with `!`.
                if msg.first() == Some(&b'@') {
                    let mut parts = msg.splitn(3, |b| *b == b':');
                    if let (Some(_), Some(_), Some(data)) = (parts.next(), parts.next(), parts.next()) {
                        f(data);
                    }
                }
            }
            Kind::Nats => {
                self.buf.extend_from_slice(msg);
                let mut pos = 0;
                loop {
                    let rest = &self.buf[pos..];
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { break };
                    let line = &rest[..eol];
                    if line.starts_with(b"MSG ") {
                        let len: usize = std::str::from_utf8(line.rsplit(|b| *b == b' ').next().unwrap_or_default())
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let need = eol + 2 + len + 2;
                        if rest.len() < need {
                            break;
                        }
                        f(&rest[eol + 2..eol + 2 + len]);
                        pos += need;
                    } else {
                        if line == b"PING" {
                            self.ping = true;
                        }
                        pos += eol + 2;
                    }
                }
                self.buf.drain(..pos);
            }
        }
    }
}

/// Opens a WebSocket without a WebSocket library (the idle scenario holds tens of thousands of
/// them): a handshake by hand, then an optional first command in one masked text frame.
pub async fn raw_connect(kind: Kind, addr: SocketAddr, src: Option<IpAddr>, first: Option<&str>) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tcp(addr, src).await.map_err(|e| format!("connect {addr} from {src:?}: {e}"))?;
    let proto = if kind.is_ivy() { format!("Sec-WebSocket-Protocol: {}\r\n", ivy_client_core::SUBPROTOCOL) } else { String::new() };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n",
        kind.ws_path()
    );
    stream.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    let mut chunk = [0u8; 1024];
    while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the handshake".to_owned());
        }
        resp.extend_from_slice(&chunk[..n]);
    }
    if !resp.starts_with(b"HTTP/1.1 101") {
        return Err(format!("handshake refused: {}", String::from_utf8_lossy(&resp[..resp.len().min(60)])));
    }
    if let Some(text) = first {
        let bytes = text.as_bytes();
        assert!(bytes.len() < 126);
        // FIN + text, masked with the all-zero key (so the payload goes as is).
        let mut frame = vec![0x81, 0x80 | bytes.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(bytes);
        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
    }
    Ok(stream)
}
