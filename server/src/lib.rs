//! The Ivy reference server: hierarchical pub/sub over WebSocket with persistent event logs.
//!
//! Usable as the `ivy-server` binary and as a library, either whole ([`run`]) or embedded in a
//! larger axum application ([`Ivy::router`]):
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let config = ivy_server::Config::new("/var/lib/ivy");
//! let ivy = ivy_server::Ivy::open(config)?;
//! let app = axum::Router::new()
//!     .route("/health", axum::routing::get(|| async { "ok" }))
//!     .merge(ivy.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let stop = ivy.stop_signal();
//! axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await?;
//! ivy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`serve`] runs such a router the way the binary does (an HTTP header timeout against idle
//! connections, `TCP_NODELAY`, graceful shutdown of `ivy` at the end).
//!
//! Endpoints: `GET /ws` (the command protocol, subprotocol `ivy1`) and `GET /log/<path>` (the
//! stored events of a channel's subtree). The protocol is specified in `docs/PROTOCOL.md`.
//!
//! Inside: a sequencer thread stamps, stores (group commit, a few blocks per group) and
//! publishes every event in order; storage sits behind [`store::EventLog`] (sled by default) and fan-out behind
//! [`broker::Broker`] (in-process by default), so other engines can replace them without
//! touching the protocol code.

pub mod broker;
pub mod clock;
pub mod config;
mod http;
pub mod logquery;
pub mod ratelimit;
pub mod sequencer;
mod static_files;
pub mod store;
mod ws;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::routing::get;
use ivy_client_core::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use clock::WallClock;
pub use config::{Config, Durability};
pub use sequencer::PublishError;
pub use ws::{SUBPROTOCOL, close_code};

use broker::{Broker, LocalBroker};
use clock::Clock;
use sequencer::{Input, PublishRequest, Reply};
use store::{EventLog, SledLog};

/// How long connections get to finish their queued replies at shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The newest timestamp whose event is durable (or, with [`Durability::Async`], stored in
/// memory) and may be shown to log readers. Events are appended before their flush completes;
/// reads stop at this mark so that nobody sees, or caches as immutable, an event that a crash
/// could still take back.
#[derive(Debug, Default)]
pub struct Watermark(Mutex<Timestamp>);

impl Watermark {
    /// A mark at `ts`.
    pub fn new(ts: Timestamp) -> Watermark {
        Watermark(Mutex::new(ts))
    }
    /// The current mark.
    pub fn get(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Raises the mark to `ts`.
    pub fn raise(&self, ts: Timestamp) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *m = (*m).max(ts);
    }
}

/// State shared by every handler.
pub(crate) struct Shared {
    config: Config,
    log: Arc<dyn EventLog>,
    visible: Arc<Watermark>,
    broker: Arc<dyn Broker>,
    clock: Arc<Clock>,
    publish_tx: mpsc::Sender<Input>,
    next_id: AtomicU64,
    /// Stop reading commands (graceful shutdown, first step).
    stop_reading: CancellationToken,
    /// Stop writing, even with replies queued (graceful shutdown, last resort).
    force_close: CancellationToken,
    /// The open WebSocket connections, which get the two signals above.
    live: Arc<ws::Live>,
    tracker: TaskTracker,
    /// Open WebSocket connections (bounded by `--max-connections`).
    connections: Arc<AtomicUsize>,
    refusals: ws::Refusals,
}

/// A running Ivy instance: its store, sequencer and fan-out.
pub struct Ivy {
    shared: Arc<Shared>,
    sequencer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Ivy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ivy").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl Ivy {
    /// Opens the store in `config.data` and starts the sequencer. Must be called within a
    /// tokio runtime.
    pub fn open(config: Config) -> io::Result<Ivy> {
        Ivy::open_with_clock(config, WallClock::system())
    }

    /// [`Ivy::open`] with a custom wall clock (for tests of clock steps).
    pub fn open_with_clock(config: Config, wall: WallClock) -> io::Result<Ivy> {
        if let Some(dir) = &config.static_dir {
            static_files::check(dir)?;
        }
        std::fs::create_dir_all(&config.data)?;
        let log = SledLog::open(&config.data, config.durability, config.flush_interval_ms)?;
        let last = log.last_timestamp()?.unwrap_or(Timestamp::ZERO);
        // After a crash with async durability the floor is above the newest surviving event:
        // lost events had timestamps up to it, which must not be handed out again.
        let floor = log.clock_floor()?.unwrap_or(Timestamp::ZERO).max(last);
        let log: Arc<dyn EventLog> = Arc::new(log);
        // Positions start at the newest stored event, below the floor after a crash that lost
        // events: a client that saw them finds P < L and knows (docs/PROTOCOL.md 8.4).
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new(last));
        let clock = Arc::new(Clock::new(wall, floor));
        if config.durability == Durability::Async {
            // Every timestamp above the floor must first be covered by a durable floor.
            clock.set_limit(floor);
        }
        let visible = Arc::new(Watermark::new(last));
        let (publish_tx, handle) =
            sequencer::spawn(log.clone(), broker.clone(), clock.clone(), visible.clone(), config.durability, 16 * 1024);
        tracing::info!(data = %config.data.display(), last = %last, floor = %floor, durability = ?config.durability, "event store open");
        let refusals = ws::Refusals::new(&config);
        let shared = Arc::new(Shared {
            config,
            log,
            visible,
            broker,
            clock,
            publish_tx,
            next_id: AtomicU64::new(1),
            stop_reading: CancellationToken::new(),
            force_close: CancellationToken::new(),
            live: Arc::default(),
            tracker: TaskTracker::new(),
            connections: Arc::new(AtomicUsize::new(0)),
            refusals,
        });
        tokio::spawn(shared.live.clone().watch(shared.stop_reading.clone(), shared.force_close.clone()));
        Ok(Ivy { shared, sequencer: Mutex::new(Some(handle)) })
    }

    /// The routes `/ws`, `/log`, `/log/` and `/log/{*path}`, to serve or merge into an app.
    /// With [`Config::static_dir`] set, also a fallback serving that directory at `/` (an
    /// application that has a fallback of its own should leave `static_dir` unset).
    pub fn router(&self) -> Router {
        let log = Router::new()
            .route("/log", get(http::handler).options(http::preflight))
            .route("/log/", get(http::handler).options(http::preflight))
            .route("/log/{*path}", get(http::handler).options(http::preflight))
            .layer(axum::middleware::from_fn_with_state(self.shared.clone(), cors_layer));
        let router = Router::new().route("/ws", get(ws::handler)).merge(log).with_state(self.shared.clone());
        match &self.shared.config.static_dir {
            Some(dir) => router.merge(static_files::router(dir)),
            None => router,
        }
    }

    /// Publishes an event from the embedding application (no sender is excluded). Resolves
    /// to its timestamp once it is stored (durably with [`Durability::Sync`]) and delivered
    /// to the subscribers' queues.
    pub async fn publish(&self, path: &str, data: &str) -> Result<Timestamp, PublishError> {
        let path = ivy_client_core::path::normalize_with_limit(path.as_bytes(), self.shared.config.max_path_length)
            .map_err(PublishError::InvalidPath)?;
        let (tx, rx) = oneshot::channel();
        let request = PublishRequest {
            path: path.into_owned().into_boxed_str(),
            message: data.to_string().into(),
            data_start: 0,
            sender: None,
            reply: Reply::Channel(tx),
        };
        if self.shared.publish_tx.send(Input::Publish(request)).await.is_err() {
            return Err(PublishError::ShuttingDown);
        }
        rx.await.unwrap_or(Err(PublishError::ShuttingDown))
    }

    /// The number of open WebSocket connections (at most `--max-connections`).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Cancelled when shutdown begins; also a handy trigger for `with_graceful_shutdown`.
    pub fn stop_signal(&self) -> CancellationToken {
        self.shared.stop_reading.clone()
    }

    /// Shuts down: connections stop reading, get their queued replies and a close frame
    /// (1001), the sequencer finishes every accepted event and the store is flushed. The
    /// store's files are closed (and its lock released) when the `Ivy` and every router made
    /// from it are dropped.
    pub async fn shutdown(&self) {
        self.shared.stop_reading.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!("connections did not finish in time; closing them");
            self.shared.force_close.cancel();
            self.shared.tracker.wait().await;
        }
        let _ = self.shared.publish_tx.send(Input::Stop).await;
        let handle = self.sequencer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        tracing::info!("shut down; event store flushed");
    }
}

/// Adds CORS headers for an allowed `Origin`. With a restricted origin list the answer
/// depends on `Origin`, so `Vary: Origin` is always sent for caches.
pub(crate) fn cors_headers(allowed: &[String], req: &HeaderMap, out: &mut HeaderMap) {
    let any = allowed.is_empty() || allowed.iter().any(|a| a == "*");
    if !any {
        out.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let Some(origin) = req.get(header::ORIGIN) else { return };
    if any {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else if ws::origin_allowed(allowed, req) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    } else {
        return;
    }
    out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Link, ETag, Last-Modified"));
}

/// Middleware: CORS headers on every log response, errors included.
async fn cors_layer(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let req_headers = req.headers().clone();
    let mut resp = next.run(req).await;
    cors_headers(&shared.config.allowed_origins, &req_headers, resp.headers_mut());
    resp
}

/// Serves Ivy on `listener` until `shutdown` resolves, then shuts down gracefully: the
/// binary's whole life. See [`serve`] for what the accept loop does.
pub async fn run(config: Config, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
    let ivy = Ivy::open(config)?;
    serve(&ivy, ivy.router(), listener, shutdown).await
}

/// Serves `app` ([`Ivy::router`], alone or merged into an application's routes) on
/// `listener` until `shutdown` resolves or [`Ivy::stop_signal`] is cancelled, then shuts
/// `ivy` down gracefully (section 8.3 of `docs/PROTOCOL.md`); in-flight HTTP requests get
/// 5 seconds to finish.
///
/// Compared with a bare `axum::serve`, the accept loop protects the server from clients that
/// open connections and send nothing: an HTTP connection that does not complete a request head
/// within [`Config::header_timeout`] is closed (WebSockets, once upgraded, are bounded by
/// `--max-connections` and the ping timeout instead). It also sets `TCP_NODELAY`, so that
/// small lines are not held back, and survives accept errors such as running out of file
/// descriptors (it logs them and retries shortly).
pub async fn serve(
    ivy: &Ivy,
    app: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let stop = ivy.stop_signal();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            () = stopper.cancelled() => {}
        }
        stopper.cancel();
    });
    let header_timeout = Some(ivy.shared.config.header_timeout).filter(|t| !t.is_zero());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors or memory: wait for some to be freed.
                    tracing::warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        while connections.try_join_next().is_some() {}
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
        }
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                    return;
                }
                () = stop.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let http_done = async {
        if tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!("HTTP requests did not finish in time; closing them");
            connections.shutdown().await;
        }
    };
    tokio::join!(ivy.shutdown(), http_done);
    Ok(())
}

/// Accept errors that concern only the connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}
