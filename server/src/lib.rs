//! The Ivy reference server: hierarchical pub/sub over WebSocket with persistent event logs.
//!
//! Usable as the `ivy-server` binary ([`cli`]) and as a library, either whole ([`run`]) or
//! embedded in a larger axum application ([`Ivy::router`]):
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use ivy_server::{Config, Ivy, engine::SledEngine};
//! let ivy = Ivy::builder(Config::default()).engine(SledEngine::new("/var/lib/ivy")).open()?;
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
//! connections, `TCP_NODELAY`, graceful shutdown of `ivy` at the end), and terminates TLS when
//! [`Config::tls_cert`] and [`Config::tls_key`] are set (rustls with its `ring` provider;
//! `wss://` and `https://` then; certificates are read once, at [`IvyBuilder::open`]). A
//! router served by `axum::serve` instead gets no TLS from Ivy: put a TLS proxy in front, or
//! use [`serve`].
//!
//! Endpoints: `GET /ws` (the command protocol, subprotocol `ivy1`), `GET /log/<path>` (the
//! stored events of a channel's subtree, with its horizon in `Ivy-Horizon` once events were
//! deleted) and `DELETE /log/<path>[?before=TS]` (an operator's deletion, with a server API
//! key: [`Config::api_keys`]), `GET /channels` (the channels with a log or subscribers, page
//! by page, filtered by the caller's read grants), the admin endpoints with a server API key
//! (`POST /admin/disconnect`, `POST /admin/revoke`, `GET /admin/revocations`: closing a
//! `sub`'s connections, revoking a token by its `jti`), `GET /presence/<path>` (who is subscribed in a subtree, paged:
//! [`engine::presence`]); with [`Config::demo_token_endpoint`] (demos only, never in
//! production) also `POST /demo/token` ([`demo`]). Retention settings belong to the engines
//! ([`engine::Retention`]). The protocol is specified in `docs/PROTOCOL.md`.
//!
//! Operations endpoints, in a router of their own ([`Ivy::ops_router`], which [`run`] and
//! the binary serve beside [`Ivy::router`], so that an application with its own `/metrics`
//! can leave them out): `GET /healthz`, `GET /readyz` (a probe through the engine and the
//! fan-out), `GET /info` and `GET /metrics` (Prometheus; [`metrics`]); see [`ops`].
//!
//! Inside, one concept per module:
//!
//! - [`engine`]: ordering, storage and the bus, behind the [`engine::Engine`] trait; the sled
//!   engine is the default, the in-memory engine a second one, the Redis engine
//!   ([`engine::RedisEngine`], `--redis`) a third, for several nodes on one Redis: each goes in
//!   as one implementation, with no change to what follows;
//! - [`fanout`]: this node's subscriptions and the delivery of each event to them;
//! - [`engine::presence`]: who is subscribed where, the `~+` watches and their `^` lines,
//!   behind the engine seam ([`engine::Engine::presence`]);
//! - `session`: one connection's protocol, sans-IO (a command in, a decision out);
//! - `ws`: the WebSocket I/O that feeds the session and carries out its decisions;
//! - `conn`: a connection's outbound queue and ending, what it owes from the log when it fell
//!   behind, and the registry of connections;
//! - [`auth`]: tokens, grants and who a connection is;
//! - [`demo`]: the demo-only token endpoint (unfit for production);
//! - `budget`: the server-wide memory budget;
//! - `http`: the log endpoint, CORS; `serve`: the accept loop; [`cli`]: the binary;
//! - `channels`: `GET /channels`; `admin`: the admin endpoints and the revoked tokens;
//! - [`ops`]: health, readiness, info; [`metrics`]: what `/metrics` counts.

// The admin endpoints (`/admin/...`): disconnect, revoke.
mod admin;
pub mod auth;
mod budget;
mod catchup;
// `GET /channels`.
mod channels;
pub mod cli;
pub mod config;
mod conn;
pub mod demo;
pub mod engine;
pub mod fanout;
mod http;
mod limits;
// HTTP publish: `POST`/`PUT /log/<path>`, `POST /publish`.
pub mod logquery;
pub mod metrics;
pub mod ops;
mod presence_http;
mod publish;
pub mod ratelimit;
mod serve;
mod session;
mod static_files;
mod tls;
mod ws;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use ivy_client_core::Timestamp;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use conn::close_code;
pub use engine::sled::Durability;
pub use engine::{PublishError, Replied, WallClock};
pub use serve::serve;
pub use ws::SUBPROTOCOL;

use conn::Connections;
use engine::{Completion, Engine, Open, Publish, Publisher, SledEngine};
use fanout::FanOut;

/// How long connections get to finish their queued replies at shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every handler.
pub(crate) struct Shared {
    config: Config,
    engine: Arc<dyn Engine>,
    fanout: Arc<FanOut>,
    publisher: Publisher,
    connections: Arc<Connections>,
    /// Cancelled when shutdown begins (stop reading commands).
    stop_reading: CancellationToken,
    tracker: TaskTracker,
    refusals: session::Refusals,
    /// The `--static-dir` router, if any.
    static_files: Option<Router>,
    /// The log requests in progress.
    log_requests: Arc<limits::Counted>,
    /// Keys, token rules and anonymous grants.
    auth: auth::Auth,
    /// What the server holds for its clients (`--memory-budget`).
    budget: Arc<budget::Budget>,
    /// The byte budgets of identities (`--byte-rate-per-identity`).
    identities: ratelimit::Identities,
    /// TLS termination by [`serve`] (`--tls-cert`, `--tls-key`), if configured.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The demo-only token endpoint, when enabled (`--demo-token-endpoint`).
    demo: Option<demo::DemoTokens>,
    /// What `/metrics` shows.
    metrics: metrics::Metrics,
    /// Health, readiness, node id.
    ops: ops::Ops,
}

/// A running Ivy instance: its engine, fan-out and connections.
pub struct Ivy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ivy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ivy").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

/// Builds an [`Ivy`]: its [`Config`] and its engine ([`IvyBuilder::engine`]).
#[must_use]
pub struct IvyBuilder {
    config: Config,
    engine: Box<dyn Open>,
}

impl std::fmt::Debug for IvyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvyBuilder").field("config", &self.config).field("engine", &self.engine.describe()).finish()
    }
}

impl IvyBuilder {
    /// The engine (default: [`SledEngine`] in `./ivy-data`).
    pub fn engine(self, engine: impl Open) -> IvyBuilder {
        self.engine_boxed(Box::new(engine))
    }

    /// [`IvyBuilder::engine`] with an engine chosen at run time.
    pub fn engine_boxed(mut self, engine: Box<dyn Open>) -> IvyBuilder {
        self.engine = engine;
        self
    }

    /// Opens the engine and starts the server's machinery. Must be called within a tokio
    /// runtime.
    pub fn open(self) -> io::Result<Ivy> {
        let IvyBuilder { config, engine } = self;
        let auth = auth::Auth::new(&config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let node_id = match &config.node_id {
            Some(id) => ops::check_node_id(id).map(|()| id.clone()).map_err(invalid)?,
            None => ops::random_node_id(),
        };
        if config.ops_require_api_key && config.api_keys.is_empty() {
            return Err(invalid("ops_require_api_key needs a server API key (--api-key)".into()));
        }
        let tls = tls::server_config(&config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if auth.enabled() {
            tracing::info!(keys = config.auth_hmac_secrets.len() + config.auth_public_keys.len(), "auth on: tokens are checked");
        } else {
            tracing::warn!(
                "auth is off: no --auth-hmac-secret or --auth-public-key is configured, so every client may read and write every path"
            );
            if !config.anonymous_read.is_empty() || !config.anonymous_write.is_empty() {
                tracing::warn!("--anonymous-read and --anonymous-write have no effect while auth is off");
            }
        }
        let demo = demo::DemoTokens::new(&config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if demo.is_some() {
            tracing::warn!(
                ttl = ?config.demo_token_ttl,
                grants = ?config.demo_token_grants,
                "--demo-token-endpoint is on: POST /demo/token gives anyone a token for any nickname not in use; for demos only, NEVER in production"
            );
        }
        let static_files = match &config.static_dir {
            Some(dir) => {
                static_files::check(dir)?;
                Some(static_files::router(dir)?)
            }
            None => None,
        };
        let (publisher, requests) = engine::queue();
        let budget = budget::Budget::new(config.memory_budget);
        let kind = engine.kind();
        let metrics = metrics::Metrics::new(env!("CARGO_PKG_VERSION"), &node_id, kind, config.memory_budget);
        let fanout = Arc::new(FanOut::with_budget(budget.clone()).with_counts(metrics.delivery.clone()));
        let description = engine.describe();
        let presence = engine::PresenceOptions::new(config.presence_linger, config.presence_max_list, metrics.presence_lines.clone());
        let idempotency = engine::Idempotency::new(config.idempotency_window, config.idempotency_max_keys);
        let engine =
            engine.open(engine::Context { requests, fanout: fanout.clone(), metrics: metrics.engine.clone(), presence, idempotency })?;
        tracing::info!(engine = %description, node = %node_id, "engine open");
        // The token revocations in force (`POST /admin/revoke`), before any token is checked.
        let now = auth::now_unix();
        auth.revoked().insert(engine.revocations(now)?, now);
        let connections = Arc::new(Connections::new(config.max_connections));
        let stop_reading = CancellationToken::new();
        {
            // An embedding application may cancel `stop_signal` itself instead of calling
            // `shutdown`: the connections stop reading either way.
            let (stop, connections) = (stop_reading.clone(), connections.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                connections.stop_reading();
            });
        }
        let refusals = session::Refusals::new(&config).with_counts(metrics.refused.clone()).with_send_ids(engine.send_ids());
        let identities = ratelimit::Identities::new(config.byte_rate_per_identity, config.byte_burst_per_identity);
        let log_requests = limits::Counted::new(config.max_log_requests.max(1), config.max_log_requests_per_address);
        let shared = Arc::new(Shared {
            config,
            engine,
            fanout,
            publisher,
            connections,
            stop_reading,
            tracker: TaskTracker::new(),
            refusals,
            static_files,
            log_requests,
            auth,
            budget,
            identities,
            tls,
            demo,
            metrics,
            ops: ops::Ops::new(node_id, kind),
        });
        // Admin commands made on the other nodes of a cluster (after the revocations loaded
        // above: the engine hands over every one made since).
        if let Some(commands) = shared.engine.control() {
            tokio::spawn(admin::apply_controls(Arc::downgrade(&shared), commands));
        }
        Ok(Ivy { shared })
    }
}

impl Ivy {
    /// A builder with `config` and the default engine ([`SledEngine`] in `./ivy-data`).
    pub fn builder(config: Config) -> IvyBuilder {
        IvyBuilder { config, engine: Box::new(SledEngine::default()) }
    }

    /// The routes `/ws`, `/log`, `/log/` and `/log/{*path}` (`GET`, `DELETE`, and `POST`/`PUT` to
    /// publish), `POST /publish`, `GET /presence/{*path}`, `GET /channels` and the admin routes (`POST /admin/disconnect`,
    /// `POST /admin/revoke`, `GET /admin/revocations`), to serve or merge into an app.
    /// With [`Config::static_dir`] set, also a fallback serving that directory at `/` (an
    /// application that has a fallback of its own should leave `static_dir` unset).
    pub fn router(&self) -> Router {
        let log = Router::new()
            .route("/log", get(http::handler).options(http::preflight).delete(http::delete).post(publish::log).put(publish::log))
            .route("/log/", get(http::handler).options(http::preflight).delete(http::delete).post(publish::log).put(publish::log))
            .route("/log/{*path}", get(http::handler).options(http::preflight).delete(http::delete).post(publish::log).put(publish::log))
            .route("/publish", axum::routing::post(publish::batch).options(http::preflight))
            .layer(axum::middleware::from_fn_with_state(self.shared.clone(), ops::count_log_reads))
            .layer(axum::middleware::from_fn_with_state(self.shared.clone(), http::cors_layer));
        // CORS on `/ws` too: a page of another origin may read why its token was refused
        // (`fetch` of a plain `GET /ws?token=...`, see docs/PROTOCOL.md 2.1).
        let socket =
            Router::new().route("/ws", get(ws::handler)).layer(axum::middleware::from_fn_with_state(self.shared.clone(), http::cors_layer));
        // `GET /presence/<path>`: who is here (docs/PROTOCOL.md 9.13); CORS as the log.
        let presence = Router::new()
            .route("/presence", get(presence_http::handler).options(http::preflight))
            .route("/presence/", get(presence_http::handler).options(http::preflight))
            .route("/presence/{*path}", get(presence_http::handler).options(http::preflight))
            .layer(axum::middleware::from_fn_with_state(self.shared.clone(), http::cors_layer));
        let channels = Router::new()
            .route("/channels", get(channels::handler).options(http::preflight))
            .layer(axum::middleware::from_fn_with_state(self.shared.clone(), http::cors_layer));
        // No CORS: a server API key belongs to a backend, never to a page.
        let admin = Router::new()
            .route("/admin/disconnect", axum::routing::post(admin::disconnect))
            .route("/admin/revoke", axum::routing::post(admin::revoke))
            .route("/admin/revocations", get(admin::revocations));
        let mut router = socket.merge(log).merge(presence).merge(channels).merge(admin);
        if self.shared.demo.is_some() {
            router = router.route("/demo/token", axum::routing::post(demo::handler));
        }
        let router = router.with_state(self.shared.clone());
        let router = match &self.shared.static_files {
            Some(files) => router.merge(files.clone()),
            None => router,
        };
        if self.shared.config.allowed_hosts.is_empty() {
            router
        } else {
            router.layer(axum::middleware::from_fn_with_state(self.shared.clone(), http::host_guard))
        }
    }

    /// The operations routes: `GET /healthz`, `/readyz`, `/info` and `/metrics` (see [`ops`]),
    /// to serve beside [`Ivy::router`]: `ivy.ops_router().merge(ivy.router())`, as [`run`]
    /// and the binary do (in that order, [`Config::allowed_hosts`] keeps guarding unknown
    /// paths). Not behind [`Config::allowed_hosts`]: health checks address a server by its IP.
    pub fn ops_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(ops::healthz))
            .route("/readyz", get(ops::readyz))
            .route("/info", get(ops::info))
            .route("/metrics", get(ops::metrics))
            .with_state(self.shared.clone())
    }

    /// The metrics in the Prometheus text format (what `GET /metrics` answers), for an
    /// application that serves them itself.
    pub fn metrics(&self) -> String {
        self.shared.metrics.encode(ops::sample(&self.shared), metrics::Format::Prometheus)
    }

    /// The readiness check of `GET /readyz`: `Err` with the reason when not ready.
    pub async fn ready(&self) -> Result<(), String> {
        ops::ready(&self.shared).await.map_err(|e| e.to_string())
    }

    /// This server's node id ([`Config::node_id`], or a random one per start).
    pub fn node_id(&self) -> &str {
        &self.shared.ops.node_id
    }

    /// Cancel it to begin draining before a shutdown: `GET /readyz` answers 503 from then on
    /// while everything else goes on serving (what `--shutdown-delay` does), so that a load
    /// balancer stops sending new clients first.
    pub fn drain_signal(&self) -> CancellationToken {
        self.shared.ops.draining.clone()
    }

    /// Publishes an event from the embedding application (no sender is excluded). Resolves
    /// to its timestamp once it is stored (as durably as the engine promises) and delivered
    /// to the subscribers' queues.
    pub async fn publish(&self, path: &str, data: &str) -> Result<Timestamp, PublishError> {
        let config = &self.shared.config;
        let path = ivy_client_core::path::normalize_with_limit(path.as_bytes(), config.max_path_length)
            .and_then(|p| ivy_client_core::path::check_depth(&p, config.max_path_depth).map(|()| p))
            .map_err(PublishError::InvalidPath)?;
        let (done, outcome) = Completion::channel();
        self.shared.publisher.publish(Publish::new(path.into_owned(), Bytes::copy_from_slice(data.as_bytes()), done)).await;
        outcome.await.unwrap_or(Err(PublishError::ShuttingDown))
    }

    /// Closes every WebSocket connection of this node whose token has `sub` with close code
    /// 4004, as `POST /admin/disconnect` does on this node; how many were closed. They may
    /// reconnect. (On several nodes, Redis, the endpoint tells the other nodes too; this call
    /// does not.)
    pub fn disconnect(&self, sub: &str) -> usize {
        admin::disconnect_sub(&self.shared, sub)
    }

    /// Revokes the token whose `jti` claim is `jti` until `until` (seconds since the Unix
    /// epoch), as `POST /admin/revoke` does: stored by the engine (it survives a restart),
    /// then refused at every token check, and the open connections using it are closed with
    /// 4003. Resolves to how many were closed. [`io::ErrorKind::InvalidInput`] for an empty
    /// `jti` or an `until` not in the future; an engine that stores no revocations:
    /// [`io::ErrorKind::Unsupported`].
    pub async fn revoke(&self, jti: &str, until: u64) -> io::Result<usize> {
        let now = auth::now_unix();
        if jti.is_empty() || until <= now {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a revocation needs a jti and an until in the future"));
        }
        admin::revoke_jti(&self.shared, jti, until, now).await
    }

    /// [`Ivy::publish`] with a send id (`docs/PROTOCOL.md` 5.9): within the idempotency window
    /// ([`Config::idempotency_window`]) a repeat of `id` stores nothing and resolves to the
    /// first event's timestamp, [`Replied::replayed`] set. The scope is the application's
    /// (`*`), shared with the HTTP publishes of a server API key.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let ivy = ivy_server::Ivy::builder(ivy_server::Config::default()).engine(ivy_server::engine::MemoryEngine::new()).open().unwrap();
    /// let first = ivy.publish_with_id("/orders", "paid", "order-42").await.unwrap();
    /// let again = ivy.publish_with_id("/orders", "paid", "order-42").await.unwrap();
    /// assert_eq!((again.ts, first.replayed, again.replayed), (first.ts, false, true));
    /// assert!(matches!(ivy.publish_with_id("/orders", "x", "not an id").await, Err(ivy_server::PublishError::InvalidId)));
    /// # ivy.shutdown().await; }
    /// ```
    pub async fn publish_with_id(&self, path: &str, data: &str, id: &str) -> Result<Replied, PublishError> {
        if !ivy_client_core::wire::is_valid_send_id(id.as_bytes()) {
            return Err(PublishError::InvalidId);
        }
        if !self.shared.engine.send_ids() {
            return Err(PublishError::storage(io::Error::new(
                io::ErrorKind::Unsupported,
                "send ids are not supported by this server's engine",
            )));
        }
        let config = &self.shared.config;
        let path = ivy_client_core::path::normalize_with_limit(path.as_bytes(), config.max_path_length)
            .and_then(|p| ivy_client_core::path::check_depth(&p, config.max_path_depth).map(|()| p))
            .map_err(PublishError::InvalidPath)?;
        let (done, outcome) = Completion::channel_with_replay();
        let mut request = Publish::new(path.into_owned(), Bytes::copy_from_slice(data.as_bytes()), done);
        request.id = Some(Bytes::copy_from_slice(id.as_bytes()));
        self.shared.publisher.publish(request).await;
        outcome.await.unwrap_or(Err(PublishError::ShuttingDown))
    }

    /// Whether [`serve`] terminates TLS ([`Config::tls_cert`] and [`Config::tls_key`] are set):
    /// its URLs are then `wss://` and `https://`.
    pub fn tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// The number of open WebSocket connections (at most `--max-connections`).
    pub fn connections(&self) -> usize {
        self.shared.connections.len()
    }

    /// Cancelled when shutdown begins; also a handy trigger for `with_graceful_shutdown`.
    pub fn stop_signal(&self) -> CancellationToken {
        self.shared.stop_reading.clone()
    }

    /// Shuts down: connections stop reading, get their queued replies and a close frame
    /// (1001), the engine finishes every accepted event and flushes. Each step is bounded (5 s
    /// for the connections, then they are cut; [`Config::flush_timeout`] for the engine, then it is abandoned and
    /// this returns: with sync durability every acknowledged event is durable already, with
    /// async the last flush interval may be lost as in a crash, and the clock floor keeps its
    /// timestamps from being reused). A sled store's files are
    /// closed (and its lock released) when the `Ivy` and every router made from it are
    /// dropped.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared.stop_reading.cancel();
        shared.connections.stop_reading();
        shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, shared.tracker.wait()).await.is_err() {
            tracing::warn!("connections did not finish in time; closing them");
            shared.connections.force();
            shared.tracker.wait().await;
        }
        shared.publisher.stop().await;
        let grace = shared.config.flush_timeout;
        if tokio::time::timeout(grace, shared.engine.shutdown()).await.is_err() {
            tracing::error!(
                ?grace,
                "the engine did not finish storing and flushing in time (a full or stuck disk?); shutting down without it"
            );
            return;
        }
        tracing::info!("shut down; event store flushed");
    }
}

/// Serves Ivy (built by `builder`: [`Ivy::router`] and [`Ivy::ops_router`]) on `listener`
/// until `shutdown` resolves, then shuts down gracefully: the binary's whole life. See
/// [`serve`] for what the accept loop does.
pub async fn run(
    builder: IvyBuilder,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let ivy = builder.open()?;
    serve(&ivy, ivy.ops_router().merge(ivy.router()), listener, shutdown).await
}
