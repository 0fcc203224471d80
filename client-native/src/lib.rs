//! A tokio client for Ivy, the hierarchical pub/sub protocol with persistent event logs.
//!
//! This crate is a thin driver around the sans-IO state machine of `ivy-client-core`: it owns
//! the WebSocket (tokio-tungstenite), the HTTP client for log pages (hyper) and the timer, and
//! forwards everything else to the core. So it inherits the core's promise: **a subscription
//! delivers every event of its channel exactly once, in timestamp order, across disconnects,
//! reconnects and server restarts**, or yields [`SubscriptionError::ContinuityLost`].
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A real server on a free port with a temporary store, for this example.
//! # let dir = tempfile::tempdir()?;
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let url = format!("ws://{}", listener.local_addr()?);
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let ivy = ivy_server::Ivy::builder(ivy_server::Config::default()).engine(ivy_server::engine::SledEngine::new(dir.path()));
//! # let server = tokio::spawn(ivy_server::run(ivy, listener, async { let _ = stopped.await; }));
//! use futures_util::StreamExt;
//! use ivy_client_native::{Client, Start};
//!
//! let client = Client::connect(&url).await?; // for example "ws://127.0.0.1:8080"
//! let mut room = client.subscribe_from("/chat", Start::Beginning).await?;
//!
//! // Resolves once the server has stored the event.
//! let ts = client.send("/chat/room1", "hello").await?;
//!
//! // Events of /chat and its descendants, each once, in order (our own included).
//! let event = room.next().await.expect("stream open")?;
//! assert_eq!(event.ts, ts);
//! assert_eq!(&*event.path, "/chat/room1");
//! assert_eq!(&*event.data, b"hello");
//!
//! // The stored history, page by page.
//! let page = client.log("/chat", ivy_client_native::LogQuery { limit: Some(100), ..Default::default() }).await?;
//! assert_eq!(page.len(), 1);
//! client.close().await;
//! # let _ = stop.send(());
//! # server.await??;
//! # Ok(())
//! # }
//! ```
//!
//! Resuming in a later run of the program, after the last event it processed:
//!
//! ```no_run
//! # async fn demo(last_processed: ivy_client_native::Timestamp) -> Result<(), ivy_client_native::Error> {
//! use ivy_client_native::{Client, Start};
//! let client = Client::builder("ws://127.0.0.1:8080").retry_initial_connect(true).connect().await?;
//! let events = client.subscribe_from("/chat", Start::After(last_processed)).await?;
//! # Ok(()) }
//! ```
//!
//! The base URL is the server's (`ws://host:port`, optionally with a path prefix); the
//! WebSocket endpoint (`/ws`) and the log endpoint (`/log/...`) are derived from it. `http://`
//! is accepted as a synonym. TLS (`wss://`) is not built in.
//!
//! What this crate is not: it does not retry failed sends by itself (a send that was written
//! but not acknowledged may or may not be stored, and retrying could publish it twice), and
//! it does not persist subscription cursors (use [`Client::subscribe_from`] with the last
//! timestamp you processed to resume after a restart of your program).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use proto::client::{self as core, Action, ClientEvent, RequestId, SubId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub use proto::Timestamp;
pub use proto::client::{ClientError, Config, ConnState, Endpoints, Start};

/// An event as delivered: its timestamp, normalized path and data.
pub type Event = proto::Event<'static>;

/// Errors of this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The URL is not `ws://host[:port][/prefix]` (or `http://...`); the message says why.
    InvalidUrl(String),
    /// The first connection failed (see [`ClientBuilder::retry_initial_connect`]).
    Connect(String),
    /// A request failed; see [`ClientError`] for what the caller should do.
    Request(ClientError),
    /// A log request failed (status and body, or the transport error).
    Log(String),
    /// The client is closed.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(e) => f.write_str(e),
            Error::Connect(e) => write!(f, "cannot connect: {e}"),
            Error::Request(e) => e.fmt(f),
            Error::Log(e) => write!(f, "log request failed: {e}"),
            Error::Closed => f.write_str("client closed"),
        }
    }
}

impl std::error::Error for Error {}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Error {
        match e {
            ClientError::Closed => Error::Closed,
            e => Error::Request(e),
        }
    }
}

/// What a subscription stream yields besides events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The server no longer has events this subscription delivered (it lost them); delivery
    /// continues after `last`. The stream goes on.
    ContinuityLost {
        /// The last event delivered.
        last: Timestamp,
        /// The server's position.
        position: Timestamp,
    },
    /// The server refused the subscription (for example too many subscriptions); the stream
    /// ends.
    Refused(ClientError),
}

impl fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscriptionError::ContinuityLost { last, position } => {
                write!(f, "continuity lost: the server's history ends at {position}, before the last event delivered ({last})")
            }
            SubscriptionError::Refused(e) => write!(f, "subscription refused: {e}"),
        }
    }
}

impl std::error::Error for SubscriptionError {}

/// Derives the endpoints from the base URL; TLS is not built into this client.
fn endpoints(url: &str) -> Result<Endpoints, Error> {
    let e = Endpoints::from_base(url).map_err(Error::InvalidUrl)?;
    if e.tls {
        return Err(Error::InvalidUrl(format!("invalid server URL \"{url}\": TLS is not built into this client; use ws:// or http://")));
    }
    Ok(e)
}

/// Parameters of [`Client::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogQuery {
    /// Only events after this timestamp.
    pub after: Option<Timestamp>,
    /// At most this many events (capped by the server).
    pub limit: Option<u32>,
    /// The last `n` events (not combinable with `after`/`limit`).
    pub last: Option<u64>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Http = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>;

enum Cmd {
    Subscribe(String, Start, mpsc::UnboundedSender<Result<Event, SubscriptionError>>, oneshot::Sender<Result<SubId, ClientError>>),
    Unsubscribe(SubId),
    Send(String, String, oneshot::Sender<Result<Timestamp, ClientError>>),
    Time(oneshot::Sender<Result<Timestamp, ClientError>>),
    Close(oneshot::Sender<()>),
}

/// Builder of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    config: Config,
    retry_initial: bool,
}

impl ClientBuilder {
    /// The state machine's tuning (backoff, timeouts, page size, offline queue).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Reconnect backoff bounds.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.min_backoff = min.as_millis() as u64;
        self.config.max_backoff = max.as_millis() as u64;
        self
    }

    /// Silence after which the connection is probed, and how long the probe may take.
    pub fn keepalive(mut self, idle: Duration, probe_timeout: Duration) -> Self {
        self.config.idle_timeout = idle.as_millis() as u64;
        self.config.probe_timeout = probe_timeout.as_millis() as u64;
        self
    }

    /// Keep trying when the very first connection fails, instead of returning
    /// [`Error::Connect`] (default: false).
    pub fn retry_initial_connect(mut self, retry: bool) -> Self {
        self.retry_initial = retry;
        self
    }

    /// Starts the client and waits for the first connection.
    pub async fn connect(self) -> Result<Client, Error> {
        let endpoints = endpoints(&self.url)?;
        let http: Http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, mut state_rx) = watch::channel(ConnState::Idle);
        let last_error = Arc::new(Mutex::new(None::<String>));
        // A write that cannot complete (a peer that stopped reading, a half-open TCP
        // connection) must not stall the driver past the dead-connection deadline.
        let write_timeout = Duration::from_millis(self.config.probe_timeout.max(1000));
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let driver = Driver {
            core: core::Client::new(self.config, seed ^ u64::from(std::process::id())),
            endpoints: endpoints.clone(),
            http: http.clone(),
            epoch: Instant::now(),
            write_timeout,
            state_tx,
            last_error: last_error.clone(),
            subs: HashMap::new(),
            sends: HashMap::new(),
            times: HashMap::new(),
        };
        tokio::spawn(driver.run(rx));
        let client = Client { tx, state: state_rx.clone(), endpoints, http };
        loop {
            let state = *state_rx.borrow_and_update();
            match state {
                ConnState::Connected => return Ok(client),
                ConnState::Reconnecting { .. } if !self.retry_initial => {
                    let reason = last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_else(|| "connection failed".into());
                    client.close().await;
                    return Err(Error::Connect(reason));
                }
                ConnState::Closed => return Err(Error::Closed),
                _ => {}
            }
            if state_rx.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }
}

/// A connection to an Ivy server that reconnects by itself. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Cmd>,
    state: watch::Receiver<ConnState>,
    endpoints: Endpoints,
    http: Http,
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cmd")
    }
}

impl Client {
    /// A builder for `url` (`ws://host:port`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder { url: url.into(), config: Config::default(), retry_initial: false }
    }

    /// Connects with the default configuration.
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        Client::builder(url).connect().await
    }

    /// The server's endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Subscribes to `path` (and its descendants) from now on.
    pub async fn subscribe(&self, path: &str) -> Result<Subscription, Error> {
        self.subscribe_from(path, Start::Now).await
    }

    /// Subscribes to `path` from `start`: [`Start::Beginning`] for the whole history,
    /// [`Start::After`] to resume after an event the application already processed.
    pub async fn subscribe_from(&self, path: &str, start: Start) -> Result<Subscription, Error> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Subscribe(path.to_string(), start, events_tx, reply_tx)).map_err(|_| Error::Closed)?;
        let id = reply.await.map_err(|_| Error::Closed)??;
        Ok(Subscription { id, events, tx: self.tx.clone() })
    }

    /// Publishes `data` on `path`; resolves to the event's timestamp once the server has
    /// stored it.
    pub async fn send(&self, path: &str, data: &str) -> Result<Timestamp, Error> {
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Send(path.to_string(), data.to_string(), reply_tx)).map_err(|_| Error::Closed)?;
        Ok(reply.await.map_err(|_| Error::Closed)??)
    }

    /// The server's current time.
    pub async fn timestamp(&self) -> Result<Timestamp, Error> {
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Time(reply_tx)).map_err(|_| Error::Closed)?;
        Ok(reply.await.map_err(|_| Error::Closed)??)
    }

    /// Reads one page of a channel's log (its whole subtree, in timestamp order).
    pub async fn log(&self, path: &str, query: LogQuery) -> Result<Vec<Event>, Error> {
        let path = proto::path::normalize(path.as_bytes()).map_err(|e| Error::Request(ClientError::InvalidPath(e)))?;
        let mut target = core::log_target(&path, query.after, query.limit);
        if let Some(n) = query.last {
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(&format!("n={n}"));
        }
        let body = fetch(&self.http, &format!("{}{target}", self.endpoints.http)).await.map_err(Error::Log)?;
        core::parse_log(&body).map_err(|e| Error::Log(format!("unparsable log line: {e}")))
    }

    /// A watch of the connection state.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Closes the connection; pending requests fail with [`Error::Closed`] and subscription
    /// streams end.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A stream of the events of one subscription, in timestamp order, each exactly once.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    id: SubId,
    events: mpsc::UnboundedReceiver<Result<Event, SubscriptionError>>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Stream for Subscription {
    type Item = Result<Event, SubscriptionError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Unsubscribe(self.id));
    }
}

async fn fetch(http: &Http, url: &str) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), http.get(uri))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8(body.to_vec()).map_err(|_| "log body is not UTF-8".to_string())?;
    if status != hyper::StatusCode::OK {
        return Err(format!("HTTP {}: {}", status.as_u16(), text.trim_end()));
    }
    Ok(text)
}

struct Driver {
    core: core::Client,
    endpoints: Endpoints,
    http: Http,
    epoch: Instant,
    write_timeout: Duration,
    state_tx: watch::Sender<ConnState>,
    last_error: Arc<Mutex<Option<String>>>,
    subs: HashMap<SubId, mpsc::UnboundedSender<Result<Event, SubscriptionError>>>,
    sends: HashMap<RequestId, oneshot::Sender<Result<Timestamp, ClientError>>>,
    times: HashMap<RequestId, oneshot::Sender<Result<Timestamp, ClientError>>>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Ws, String>> + Send>>;

impl Driver {
    fn now(&self) -> core::Millis {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut ws: Option<Ws> = None;
        let mut connecting: Option<Connecting> = None;
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<(u64, Result<String, String>)>();
        let mut closing: Option<oneshot::Sender<()>> = None;
        self.core.start(self.now());
        loop {
            // Carry out the core's actions, then hand its events to the application.
            let mut wrote = false;
            while let Some(action) = self.core.poll_action() {
                match action {
                    Action::Connect => {
                        let url = self.endpoints.ws.clone();
                        connecting = Some(Box::pin(async move {
                            let mut req = url.into_client_request().map_err(|e| e.to_string())?;
                            req.headers_mut().insert("Sec-WebSocket-Protocol", hyper::header::HeaderValue::from_static("ivy1"));
                            let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| e.to_string())?;
                            Ok(ws)
                        }));
                    }
                    Action::Send(text) => {
                        if let Some(w) = ws.as_mut() {
                            match tokio::time::timeout(self.write_timeout, w.feed(Message::text(text))).await {
                                Ok(Ok(())) => wrote = true,
                                Ok(Err(e)) => {
                                    self.note_error(e.to_string());
                                    ws = None;
                                    self.core.handle_disconnected(self.now());
                                }
                                Err(_) => {
                                    self.note_error("write timed out: the connection is stuck".into());
                                    ws = None;
                                    self.core.handle_disconnected(self.now());
                                }
                            }
                        }
                    }
                    Action::Disconnect => {
                        connecting = None;
                        if let Some(mut w) = ws.take() {
                            let _ = tokio::time::timeout(Duration::from_secs(1), w.close(None)).await;
                        }
                    }
                    Action::FetchLog(req) => {
                        let (http, url, tx) = (self.http.clone(), format!("{}{}", self.endpoints.http, req.target()), log_tx.clone());
                        tokio::spawn(async move {
                            let _ = tx.send((req.id, fetch(&http, &url).await));
                        });
                    }
                }
            }
            if wrote {
                if let Some(w) = ws.as_mut() {
                    if !matches!(tokio::time::timeout(self.write_timeout, w.flush()).await, Ok(Ok(()))) {
                        self.note_error("write failed or timed out".into());
                        ws = None;
                        self.core.handle_disconnected(self.now());
                        continue;
                    }
                }
            }
            self.dispatch();
            if let Some(done) = closing.take() {
                let _ = done.send(());
                return;
            }
            let deadline = self.core.poll_timeout().map(|t| self.epoch + Duration::from_millis(t));
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Close(done)) => {
                        self.core.close();
                        closing = Some(done);
                    }
                    Some(cmd) => self.command(cmd),
                    None => {
                        // Every handle was dropped.
                        self.core.close();
                        closing = Some(oneshot::channel().0);
                    }
                },
                msg = next_message(&mut ws) => {
                    let now = self.now();
                    match msg {
                        Some(Ok(Message::Text(t))) => self.core.handle_frame(now, t.as_str()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => self.core.handle_activity(now),
                        Some(Ok(Message::Binary(_))) => self.core.handle_activity(now),
                        Some(Ok(Message::Close(frame))) => {
                            self.note_error(format!("server closed the connection: {frame:?}"));
                            ws = None;
                            self.core.handle_disconnected(now);
                        }
                        Some(Err(e)) => {
                            self.note_error(e.to_string());
                            ws = None;
                            self.core.handle_disconnected(now);
                        }
                        None => {
                            ws = None;
                            self.core.handle_disconnected(now);
                        }
                    }
                }
                result = poll_connecting(&mut connecting) => {
                    connecting = None;
                    let now = self.now();
                    match result {
                        Ok(stream) => {
                            ws = Some(stream);
                            self.core.handle_connected(now);
                        }
                        Err(e) => {
                            self.note_error(e);
                            self.core.handle_disconnected(now);
                        }
                    }
                }
                Some((id, result)) = log_rx.recv() => {
                    let now = self.now();
                    match &result {
                        Ok(body) => self.core.handle_log_page(now, id, Ok(body)),
                        Err(e) => self.core.handle_log_page(now, id, Err(e.clone())),
                    }
                }
                () = sleep_until(deadline) => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
            }
        }
    }

    fn note_error(&self, e: String) {
        tracing::debug!(error = %e, "connection problem");
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(e);
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Subscribe(path, start, events, reply) => {
                let r = self.core.subscribe(&path, start);
                if let Ok(id) = r {
                    self.subs.insert(id, events);
                }
                let _ = reply.send(r);
            }
            Cmd::Unsubscribe(id) => {
                self.subs.remove(&id);
                self.core.unsubscribe(id);
            }
            Cmd::Send(path, data, reply) => match self.core.send(now, &path, &data) {
                Ok(id) => {
                    self.sends.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Cmd::Time(reply) => match self.core.timestamp(now) {
                Ok(id) => {
                    self.times.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Cmd::Close(_) => {}
        }
    }

    fn dispatch(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                ClientEvent::Event { sub, event } => {
                    if let Some(tx) = self.subs.get(&sub) {
                        let _ = tx.send(Ok(event));
                    }
                }
                ClientEvent::ContinuityLost { sub, last, position } => {
                    if let Some(tx) = self.subs.get(&sub) {
                        let _ = tx.send(Err(SubscriptionError::ContinuityLost { last, position }));
                    }
                }
                ClientEvent::SubscribeFailed { sub, error } => {
                    if let Some(tx) = self.subs.remove(&sub) {
                        let _ = tx.send(Err(SubscriptionError::Refused(error)));
                    }
                }
                ClientEvent::Sent { id, result } => {
                    if let Some(tx) = self.sends.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                ClientEvent::Time { id, result } => {
                    if let Some(tx) = self.times.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                ClientEvent::State(state) => {
                    tracing::debug!(?state, "connection state");
                    if state == ConnState::Closed {
                        self.subs.clear();
                    }
                    let _ = self.state_tx.send(state);
                }
                ClientEvent::Warning(w) => tracing::warn!("{w}"),
            }
        }
    }
}

async fn next_message(ws: &mut Option<Ws>) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_connecting(c: &mut Option<Connecting>) -> Result<Ws, String> {
    match c {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_base_urls() {
        let e = endpoints("ws://127.0.0.1:8080").unwrap();
        assert_eq!((e.ws.as_str(), e.http.as_str()), ("ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080"));
        assert_eq!(endpoints("http://h:1/").unwrap().ws, "ws://h:1/ws");
        assert_eq!(endpoints("ws://h:1/ws").unwrap().http, "http://h:1");
        let p = endpoints("ws://h/ivy/").unwrap();
        assert_eq!((p.ws.as_str(), p.http.as_str()), ("ws://h/ivy/ws", "http://h/ivy"));
        for bad in ["h:1", "ftp://h", "ws://", "ws://h/x?y"] {
            assert!(matches!(endpoints(bad), Err(Error::InvalidUrl(m)) if m.contains("invalid server URL")), "{bad}");
        }
        assert!(matches!(endpoints("wss://h"), Err(Error::InvalidUrl(m)) if m.contains("TLS is not built in")));
    }
}
