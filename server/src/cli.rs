//! The `ivy-server` command line: flags (each also an environment variable), logging,
//! binding, running until SIGINT or SIGTERM.
//!
//! The binary's `main` is [`main`]; a test build of the binary with another wall clock calls
//! [`main_with`], so that it runs exactly the same code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::auth::{Mint, Secret};
use crate::config::{self, Config, parse_seconds};
use crate::engine::sled::{self as sled_engine, Durability, SledEngine};
use crate::engine::{MemoryEngine, Open, RedisEngine, Retention, WallClock};

/// Default of `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The flags of `ivy-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ivy-server",
    version,
    about = "Reference server for the Ivy hierarchical pub/sub protocol with persistent event logs",
    after_help = "Durations take a unit (250ms, 1.5s, 2m, 1h, 7d) or none for seconds. Every flag can be set by its \
                  environment variable instead (shown with each).\n\
                  Logging: RUST_LOG picks what is logged (default info; for example RUST_LOG=ivy_server=debug, or \
                  RUST_LOG=ivy_server=trace for every line read and written); --log-format json for one JSON object \
                  per line. Logs go to stderr, coloured only on a terminal."
)]
#[non_exhaustive]
pub struct Cli {
    /// Address to listen on: HOST:PORT (`127.0.0.1:8080`, `localhost:8080`, `[::1]:8080`),
    /// `:PORT` for every interface (as `0.0.0.0:PORT`), or `PORT` alone for 127.0.0.1.
    #[arg(long, env = "IVY_LISTEN", default_value = DEFAULT_LISTEN, value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// How log lines are written to stderr: `text` (for people) or `json` (one object per
    /// line, for log collectors).
    #[arg(long, env = "IVY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Directory of the sled event store (created if missing).
    #[arg(long, env = "IVY_DATA", default_value = sled_engine::DEFAULT_DATA_DIR)]
    pub data: PathBuf,

    /// Keep events in memory only (no store on disk, nothing survives the process): for tests
    /// and throw-away servers. `--data`, `--durability` and `--flush-interval-ms` are ignored.
    #[arg(long, env = "IVY_MEMORY", conflicts_with = "redis")]
    pub memory: bool,

    /// Keep the log, the order and the clock in Redis (`redis://[:PASSWORD@]HOST:PORT[/DB]`,
    /// `rediss://` for TLS) instead of sled: any number of nodes can share one Redis, the node
    /// keeps nothing on its disk. `--data`, `--durability` and `--flush-interval-ms` are ignored.
    #[arg(long, env = "IVY_REDIS", value_name = "URL")]
    pub redis: Option<String>,

    /// Start on a sled store that lost acknowledged events (damaged or truncated: the server
    /// refuses it otherwise, saying what is lost), keeping what is intact.
    #[arg(long, env = "IVY_REPAIR")]
    pub repair: bool,

    /// Largest size of the sled store on disk, in bytes; beyond it sends are refused with
    /// `store-full`. 0: no limit.
    #[arg(long, env = "IVY_MAX_STORE_SIZE", default_value_t = 0)]
    pub max_store_size: u64,

    /// Free space kept on the store's file system, in bytes: below it sends are refused with
    /// `store-full`, before the disk is full. 0: none.
    #[arg(long, env = "IVY_MIN_FREE_SPACE", default_value_t = sled_engine::DEFAULT_MIN_FREE_SPACE)]
    pub min_free_space: u64,

    /// When events are acknowledged: `sync` (after fsync, the default) or `async`.
    #[arg(long, env = "IVY_DURABILITY", value_enum, default_value_t = Durability::Sync)]
    pub durability: Durability,

    /// Background flush interval of `--durability async`, in milliseconds.
    #[arg(long, env = "IVY_FLUSH_INTERVAL_MS", default_value_t = sled_engine::DEFAULT_FLUSH_INTERVAL.as_millis() as u64)]
    pub flush_interval_ms: u64,

    /// Largest WebSocket message accepted, in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "IVY_MAX_MESSAGE_SIZE", default_value_t = config::DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// Longest channel path accepted, in bytes after normalization.
    #[arg(long, env = "IVY_MAX_PATH_LENGTH", default_value_t = config::DEFAULT_MAX_PATH_LENGTH)]
    pub max_path_length: usize,

    /// Most levels of a channel path (`/a/b` has 2); deeper ones get `!path-too-long`. Each level
    /// holds an entry for an event in its log, so this bounds what one event costs on disk.
    #[arg(long, env = "IVY_MAX_PATH_DEPTH", default_value_t = config::DEFAULT_MAX_PATH_DEPTH)]
    pub max_path_depth: usize,

    /// Most subscriptions one connection may hold.
    #[arg(long, env = "IVY_MAX_SUBSCRIPTIONS", default_value_t = config::DEFAULT_MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,

    /// Lines queued for one connection. An event that finds them full makes the connection
    /// catch up from the log (closed with 4000 if it stays behind for a whole ping interval);
    /// a command waits for room for its reply.
    #[arg(long, env = "IVY_QUEUE_LENGTH", default_value_t = config::DEFAULT_QUEUE_LENGTH)]
    pub queue_length: usize,

    /// Bytes of events queued for one connection; beyond, it catches up from the log.
    #[arg(long, env = "IVY_QUEUE_BYTES", default_value_t = config::DEFAULT_QUEUE_BYTES)]
    pub queue_bytes: usize,

    /// Bytes the server holds for its clients at most (event lines until written, sends until
    /// stored, catch-up pages); while reached, large or pipelined sends get `overloaded`. 0: no
    /// budget.
    #[arg(long, env = "IVY_MEMORY_BUDGET", default_value_t = config::DEFAULT_MEMORY_BUDGET)]
    pub memory_budget: usize,

    /// Most events one log page returns (`limit` above it is capped).
    #[arg(long, env = "IVY_LOG_PAGE_LIMIT", default_value_t = config::DEFAULT_LOG_PAGE_LIMIT)]
    pub log_page_limit: usize,

    /// Most bytes of lines in one cursor page; a page ends after the event that reaches it,
    /// with a `rel="next"` link.
    #[arg(long, env = "IVY_LOG_PAGE_BYTES", default_value_t = config::DEFAULT_LOG_PAGE_BYTES)]
    pub log_page_bytes: usize,

    /// Most log requests in progress at once (a streamed log counts until it is sent); more
    /// get 503.
    #[arg(long, env = "IVY_MAX_LOG_REQUESTS", default_value_t = config::DEFAULT_MAX_LOG_REQUESTS)]
    pub max_log_requests: usize,

    /// Most log requests in progress from one client IP address; more get 503. 0: no limit.
    #[arg(long, env = "IVY_MAX_LOG_REQUESTS_PER_ADDRESS", default_value_t = config::DEFAULT_MAX_LOG_REQUESTS_PER_ADDRESS)]
    pub max_log_requests_per_address: usize,

    /// Origins allowed to open WebSockets and read logs from a browser (repeat the flag or
    /// separate with commas). Empty: every origin.
    #[arg(long = "allowed-origins", visible_alias = "allowed-origin", env = "IVY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Host names the server answers to (the `Host` header; repeat the flag or separate with
    /// commas; a name without a port allows any port); other requests get 421. Empty: any.
    #[arg(long = "allowed-hosts", visible_alias = "allowed-host", env = "IVY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// A server API key (repeat the flag, or separate with commas in the variable): requests
    /// with `Authorization: Bearer KEY` may use the operator endpoints (`DELETE /log/PATH`)
    /// and publish anywhere over HTTP (`POST /log/PATH`, `POST /publish`) as the application.
    /// None: the operator endpoints answer 403.
    #[arg(long = "api-key", env = "IVY_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// Delete events older than this many seconds, in the background. 0: keep them.
    #[arg(long, env = "IVY_RETENTION_MAX_AGE", value_parser = seconds, default_value_t = Seconds(Duration::ZERO))]
    pub retention_max_age: Seconds,

    /// Keep at most this many events per channel (the events sent to its path itself), deleting
    /// the oldest in the background. 0: no limit.
    #[arg(long, env = "IVY_RETENTION_MAX_EVENTS", default_value_t = 0)]
    pub retention_max_events: u64,

    /// Seconds a send id (`*ID:path:data`, `Idempotency-Key`) is remembered after its event
    /// (fractions allowed): a repeat within it gets the first event's timestamp and is not
    /// stored again. 0: ids are accepted and ignored.
    #[arg(long, env = "IVY_IDEMPOTENCY_WINDOW", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_IDEMPOTENCY_WINDOW))]
    pub idempotency_window: Seconds,

    /// Most send ids remembered; beyond, the oldest are forgotten first (under a heavy load
    /// of sends with ids the window is then shorter: ivy_idempotency_evicted_total). Not on
    /// Redis (--redis): there each id is a key that expires with the window.
    #[arg(long, env = "IVY_IDEMPOTENCY_MAX_KEYS", default_value_t = config::DEFAULT_IDEMPOTENCY_MAX_KEYS)]
    pub idempotency_max_keys: usize,

    /// Most WebSocket connections at once; beyond it the handshake is refused with 503.
    #[arg(long, env = "IVY_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Most TCP connections (HTTP and WebSocket) from one client IP address at once; more are
    /// closed as soon as they are accepted. 0: no limit.
    #[arg(long, env = "IVY_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: usize,

    /// Seconds a new TCP connection gets to send its first byte (fractions allowed); silent
    /// ones are closed. 0: no limit.
    #[arg(long, env = "IVY_FIRST_BYTE_TIMEOUT", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_FIRST_BYTE_TIMEOUT))]
    pub first_byte_timeout: Seconds,

    /// Seconds a connection's writes may make no progress (a client that stopped reading)
    /// before it is closed (fractions allowed). 0: no limit.
    #[arg(long, env = "IVY_WRITE_TIMEOUT", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_WRITE_TIMEOUT))]
    pub write_timeout: Seconds,

    /// Commands (text or binary messages) one connection may send per second, on average;
    /// excess commands are refused with `!rate-limited` and not executed. 0: no limit.
    #[arg(long, env = "IVY_RATE_LIMIT", default_value_t = config::DEFAULT_RATE_LIMIT)]
    pub rate_limit: u32,

    /// Commands one connection may send in a burst above the average rate (minimum 1).
    #[arg(long, env = "IVY_RATE_BURST", default_value_t = config::DEFAULT_RATE_BURST)]
    pub rate_burst: u32,

    /// Subscribes and unsubscribes one connection may make per second, on average (they count
    /// towards --rate-limit too): beyond the burst, the connection's next command is read only
    /// when the rate allows (paced, never refused). 0: no limit.
    #[arg(long, env = "IVY_SUBSCRIBE_RATE", default_value_t = config::DEFAULT_SUBSCRIBE_RATE)]
    pub subscribe_rate: u32,

    /// Subscribes and unsubscribes one connection may send in a burst above that rate
    /// (minimum 1).
    #[arg(long, env = "IVY_SUBSCRIBE_BURST", default_value_t = config::DEFAULT_SUBSCRIBE_BURST)]
    pub subscribe_burst: u32,

    /// Bytes one connection's sends may store per second, on average, counting an event's line
    /// plus 16 bytes per level of its path; excess sends get `!rate-limited`. 0: no limit.
    #[arg(long, env = "IVY_BYTE_RATE", default_value_t = config::DEFAULT_BYTE_RATE)]
    pub byte_rate: u64,

    /// Bytes one connection may store in a burst above the byte rate.
    #[arg(long, env = "IVY_BYTE_BURST", default_value_t = config::DEFAULT_BYTE_BURST)]
    pub byte_burst: u64,

    /// Bytes the sends of one identity (a token's `sub`, with auth on) may store per second in
    /// all, whatever the number of its connections; excess sends get `!rate-limited`. 0: no
    /// limit.
    #[arg(long, env = "IVY_BYTE_RATE_PER_IDENTITY", default_value_t = config::DEFAULT_BYTE_RATE_PER_IDENTITY)]
    pub byte_rate_per_identity: u64,

    /// Bytes one identity may store in a burst above that rate.
    #[arg(long, env = "IVY_BYTE_BURST_PER_IDENTITY", default_value_t = config::DEFAULT_BYTE_BURST_PER_IDENTITY)]
    pub byte_burst_per_identity: u64,

    /// Seconds between the server's pings on each WebSocket (fractions allowed); a connection
    /// from which nothing, not even a pong, arrives for a whole interval after a ping is
    /// closed with 4001. 0: no pings.
    #[arg(long, env = "IVY_PING_INTERVAL", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_PING_INTERVAL))]
    pub ping_interval: Seconds,

    /// Seconds an HTTP connection gets to send a complete request head (fractions allowed);
    /// slower ones, and idle keep-alive connections waiting for a next request, are closed.
    /// 0: no limit.
    #[arg(long, env = "IVY_HEADER_TIMEOUT", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_HEADER_TIMEOUT))]
    pub header_timeout: Seconds,

    /// Seconds the engine gets at shutdown to store what it accepted and flush (a full or stuck
    /// disk must not keep the process from exiting).
    #[arg(long, env = "IVY_FLUSH_TIMEOUT", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_FLUSH_TIMEOUT))]
    pub flush_timeout: Seconds,

    /// Serve the files of this directory at `/` (`index.html` for a directory), next to `/ws`
    /// and `/log/`, which take precedence. Off when not set.
    #[arg(long, env = "IVY_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,

    /// An HS256 secret that tokens may be signed with (repeat the flag to accept several while
    /// rotating; the environment variable takes one). With no secret and no public key, auth is
    /// off: everything is allowed, and the server warns at startup.
    #[arg(long = "auth-hmac-secret", env = "IVY_AUTH_HMAC_SECRET", global = true, hide_env_values = true, value_parser = secret)]
    pub auth_hmac_secrets: Vec<Secret>,

    /// A PEM public key file that tokens may be signed with: RSA (RS256), EC P-256 (ES256) or
    /// Ed25519 (EdDSA); its `kid` is the file name without extension. Repeatable.
    #[arg(long = "auth-public-key", env = "IVY_AUTH_PUBLIC_KEY")]
    pub auth_public_keys: Vec<PathBuf>,

    /// The `iss` every token must have (not checked when unset).
    #[arg(long, env = "IVY_AUTH_ISSUER", global = true)]
    pub auth_issuer: Option<String>,

    /// The `aud` every token must have (not checked when unset).
    #[arg(long, env = "IVY_AUTH_AUDIENCE", global = true)]
    pub auth_audience: Option<String>,

    /// A path (and everything below it) that connections and log requests without a token may
    /// read, with auth on (repeat the flag or separate with commas).
    #[arg(long, env = "IVY_ANONYMOUS_READ", value_delimiter = ',')]
    pub anonymous_read: Vec<String>,

    /// A path (and everything below it) that connections without a token may send to, with
    /// auth on (repeat the flag or separate with commas).
    #[arg(long, env = "IVY_ANONYMOUS_WRITE", value_delimiter = ',')]
    pub anonymous_write: Vec<String>,

    /// Seconds a connection stays open past its token's `exp` before it is closed with 4003
    /// (unless it refreshed its token in-band, `&JWT`, before then).
    #[arg(long, env = "IVY_AUTH_REFRESH_GRACE", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_AUTH_REFRESH_GRACE))]
    pub auth_refresh_grace: Seconds,

    /// Seconds a member stays present in a channel after its last connection there went
    /// (closed, dropped, unsubscribed): coming back within it announces no leave and no join,
    /// so a page reload does not flicker for everyone (fractions allowed; 0: leave at once).
    #[arg(long, env = "IVY_PRESENCE_LINGER", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_PRESENCE_LINGER))]
    pub presence_linger: Seconds,

    /// Above this many members, a channel's presence lines (^= and ^~) carry counts only, no
    /// member list (GET /presence pages the members whatever their number).
    #[arg(long, env = "IVY_PRESENCE_MAX_LIST", default_value_t = config::DEFAULT_PRESENCE_MAX_LIST)]
    pub presence_max_list: usize,

    /// A PEM file with the server's TLS certificate chain (its certificate first, then any
    /// intermediates). With --tls-key, every connection speaks TLS: wss:// and https://.
    /// Both or neither; read at startup only (a renewed certificate takes a restart).
    #[arg(long, env = "IVY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM file of the private key of --tls-cert (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, env = "IVY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// DEMOS ONLY, NEVER IN PRODUCTION: serve `POST /demo/token` (body `{"nickname": "ada"}`
    /// or `nickname=ada`), which hands anyone a token for a nickname no other visitor holds,
    /// signed with the first --auth-hmac-secret (required). There is no login: it only keeps
    /// one visitor from taking another's nickname (a cookie). `./scripts/run.sh` turns it on.
    #[arg(long, env = "IVY_DEMO_TOKEN_ENDPOINT")]
    pub demo_token_endpoint: bool,

    /// Lifetime of the demo endpoint's tokens (the demo page refreshes them before expiry).
    #[arg(long, env = "IVY_DEMO_TOKEN_TTL", value_parser = seconds, default_value_t = Seconds(config::DEFAULT_DEMO_TOKEN_TTL))]
    pub demo_token_ttl: Seconds,

    /// A path the demo endpoint's tokens may read and write (repeat the flag or separate with
    /// commas).
    #[arg(long = "demo-token-grant", env = "IVY_DEMO_TOKEN_GRANT", value_delimiter = ',', default_value = config::DEFAULT_DEMO_TOKEN_GRANT)]
    pub demo_token_grants: Vec<String>,

    /// This server's node id, as GET /info and /metrics state it (1 to 64 ASCII letters,
    /// digits, '.', '_', '-'). Default: a random one per start.
    #[arg(long, env = "IVY_NODE_ID", value_parser = node_id)]
    pub node_id: Option<String>,

    /// GET /info and GET /metrics need a server API key (--api-key) as `Authorization: Bearer
    /// KEY`. Default: open (they carry counts, no channel names); /healthz and /readyz are
    /// always open.
    #[arg(long, env = "IVY_OPS_REQUIRE_API_KEY", requires = "api_keys")]
    pub ops_require_api_key: bool,

    /// After SIGINT or SIGTERM, keep serving this long with GET /readyz answering 503, so that
    /// a load balancer stops sending new clients before the shutdown begins (a second signal
    /// ends the wait). 0: shut down at once.
    #[arg(long, env = "IVY_SHUTDOWN_DELAY", value_parser = seconds, default_value_t = Seconds(Duration::ZERO))]
    pub shutdown_delay: Seconds,

    /// A helper instead of the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `ivy-server`'s helpers.
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Prints a token signed with the (first) configured `--auth-hmac-secret`, with
    /// `--auth-issuer` and `--auth-audience` when set: for development and tests. A production
    /// backend mints its tokens itself.
    Token {
        /// The identity (`sub`).
        #[arg(long)]
        sub: String,
        /// A path it may read (repeatable, or separated by commas).
        #[arg(long, value_delimiter = ',')]
        read: Vec<String>,
        /// A path it may send to (repeatable, or separated by commas).
        #[arg(long, value_delimiter = ',')]
        write: Vec<String>,
        /// How long it is valid (a duration: 30m, 1h, 3600).
        #[arg(long, value_parser = seconds, default_value = "1h")]
        ttl: Seconds,
    },
}

fn secret(s: &str) -> Result<Secret, String> {
    if s.is_empty() { Err("the secret is empty".into()) } else { Ok(Secret::new(s)) }
}

/// The format of log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--listen`: `HOST:PORT` (a name is resolved, its first address taken), `:PORT` (every
/// interface) or `PORT` (127.0.0.1).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::{Ipv4Addr, ToSocketAddrs};
    let s = s.trim();
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port (0 to 65535)"));
    if let Some(p) = s.strip_prefix(':') {
        return Ok(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port(p)?)));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port(s)?)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, p)) = s.rsplit_once(':') else {
        return Err(format!("{s:?}: expected HOST:PORT, :PORT or PORT (for example 127.0.0.1:8080)"));
    };
    port(p)?;
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("{host:?} has no address")),
        Err(e) => Err(format!("cannot resolve {host:?}: {e}")),
    }
}

/// A duration given in seconds on the command line (its default shown in seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

fn node_id(s: &str) -> Result<String, String> {
    crate::ops::check_node_id(s).map(|()| s.to_string())
}

fn seconds(s: &str) -> Result<Seconds, String> {
    parse_seconds(s).map(Seconds)
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

impl Cli {
    /// The server's configuration from the flags.
    pub fn config(&self) -> Config {
        Config {
            max_message_size: self.max_message_size,
            max_path_length: self.max_path_length,
            max_path_depth: self.max_path_depth,
            max_subscriptions: self.max_subscriptions,
            queue_length: self.queue_length,
            queue_bytes: self.queue_bytes,
            memory_budget: self.memory_budget,
            log_page_limit: self.log_page_limit,
            log_page_bytes: self.log_page_bytes,
            max_log_requests: self.max_log_requests,
            max_log_requests_per_address: self.max_log_requests_per_address,
            allowed_origins: self.allowed_origins.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            first_byte_timeout: self.first_byte_timeout.0,
            write_timeout: self.write_timeout.0,
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
            subscribe_rate: self.subscribe_rate,
            subscribe_burst: self.subscribe_burst,
            byte_rate: self.byte_rate,
            byte_burst: self.byte_burst,
            byte_rate_per_identity: self.byte_rate_per_identity,
            byte_burst_per_identity: self.byte_burst_per_identity,
            ping_interval: self.ping_interval.0,
            header_timeout: self.header_timeout.0,
            flush_timeout: self.flush_timeout.0,
            static_dir: self.static_dir.clone(),
            api_keys: self.api_keys.clone(),
            auth_hmac_secrets: self.auth_hmac_secrets.clone(),
            auth_public_keys: self.auth_public_keys.clone(),
            auth_issuer: self.auth_issuer.clone(),
            auth_audience: self.auth_audience.clone(),
            anonymous_read: self.anonymous_read.clone(),
            anonymous_write: self.anonymous_write.clone(),
            auth_refresh_grace: self.auth_refresh_grace.0,
            presence_linger: self.presence_linger.0,
            presence_max_list: self.presence_max_list,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            demo_token_endpoint: self.demo_token_endpoint,
            demo_token_ttl: self.demo_token_ttl.0,
            demo_token_grants: self.demo_token_grants.clone(),
            node_id: self.node_id.clone(),
            ops_require_api_key: self.ops_require_api_key,
            idempotency_window: self.idempotency_window.0,
            idempotency_max_keys: self.idempotency_max_keys,
        }
    }

    /// The retention settings from the flags (both engines take them).
    pub fn retention(&self) -> Retention {
        Retention::keep_everything().max_age(Some(self.retention_max_age.0)).max_events(Some(self.retention_max_events))
    }

    /// The sled engine's settings from the flags.
    pub fn sled(&self, wall: WallClock) -> SledEngine {
        SledEngine::new(&self.data)
            .durability(self.durability)
            .flush_interval(Duration::from_millis(self.flush_interval_ms))
            .wall_clock(wall)
            .repair(self.repair)
            .max_size(self.max_store_size)
            .min_free_space(self.min_free_space)
            .retention(self.retention())
    }

    /// The engine the flags ask for, with timestamps from `wall`.
    pub fn engine(&self, wall: WallClock) -> Box<dyn Open> {
        if let Some(url) = &self.redis {
            return Box::new(RedisEngine::new(url.as_str()).wall_clock(wall).retention(self.retention()));
        }
        if self.memory { Box::new(MemoryEngine::new().wall_clock(wall).retention(self.retention())) } else { Box::new(self.sled(wall)) }
    }
}

/// The `ivy-server` binary.
pub fn main() -> ExitCode {
    main_with(WallClock::system())
}

/// The `ivy-server` binary with timestamps from `wall` (tests of clock steps use a frozen
/// one): parses the flags, sets up logging to stderr (`RUST_LOG`), binds, prints
/// `ivy-server listening on http://ADDR` (`https://ADDR` with TLS) on stdout and serves until SIGINT or SIGTERM. The
/// runtime is then given 2 seconds for what still runs (a read stuck on a failing disk must
/// not keep the process from exiting once the shutdown is over).
pub fn main_with(wall: WallClock) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ivy-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve_main(wall));
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

/// The log target whose trace lines are dropped: tungstenite logs messages (and so tokens)
/// whole there.
const NO_MESSAGE_BODIES: &str = "tungstenite";

async fn serve_main(wall: WallClock) -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token { sub, read, write, ttl }) = &cli.command {
        return token(&cli, sub, read, write, ttl.0);
    }
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite logs each received message whole at trace level, and a token refresh
    // (`&JWT`) is a message: its trace lines are dropped, whatever RUST_LOG asks, so that no
    // token reaches the logs (ours redact it). (A directive `tungstenite=debug` would do it
    // too, but would turn tungstenite's debug lines on for everyone.)
    let no_message_bodies = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with(NO_MESSAGE_BODIES))
    });
    let logs = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => {
            logs.with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_filter(no_message_bodies)).init()
        }
        LogFormat::Json => logs.with(layer.json().with_ansi(false).with_filter(no_message_bodies)).init(),
    }
    // Every connection is a file descriptor: take all the system allows (the soft limit is
    // often 1024 while the hard one is far higher). `serve` keeps connections below it.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    // Keys and grants are checked before anything is bound or opened.
    if let Err(e) = crate::auth::Auth::new(&cli.config()).and_then(|_| crate::demo::DemoTokens::new(&cli.config())) {
        eprintln!("ivy-server: {e}");
        return ExitCode::from(2);
    }
    // So are the TLS certificate and key.
    if let Err(e) = crate::tls::server_config(&cli.config()) {
        eprintln!("ivy-server: {e}");
        return ExitCode::from(2);
    }
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ivy-server: cannot listen on {}: {e}", cli.listen);
            return ExitCode::from(2);
        }
    };
    let ivy = match crate::Ivy::builder(cli.config()).engine_boxed(cli.engine(wall)).open() {
        Ok(ivy) => ivy,
        Err(e) => {
            let data = cli.data.display();
            let message = e.to_string();
            if cli.memory || cli.redis.is_some() || message.contains(&data.to_string()) {
                eprintln!("ivy-server: {message}");
            } else {
                // The store's own errors (permission denied, not a directory) name no path.
                eprintln!(
                    "ivy-server: cannot open the event store in {data}: {message}; the directory must be writable by this user \
                     (--data or IVY_DATA chooses another)"
                );
            }
            return ExitCode::FAILURE;
        }
    };
    // Before the listening line: from then on a signal shuts down gracefully.
    let first_signal = shutdown_signal();
    match listener.local_addr() {
        // A stable line for scripts and tests that bind port 0.
        Ok(addr) if ivy.tls() => {
            println!("ivy-server listening on https://{addr}");
            tracing::info!("TLS on: wss://{addr}/ws, https://{addr}/log/");
        }
        Ok(addr) => println!("ivy-server listening on http://{addr}"),
        Err(e) => eprintln!("ivy-server: {e}"),
    }
    let (draining, delay) = (ivy.drain_signal(), cli.shutdown_delay.0);
    let shutdown = async move {
        first_signal.await;
        if !delay.is_zero() {
            draining.cancel();
            tracing::info!(?delay, "draining: /readyz answers 503; shutting down after the delay (or at another signal)");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown_signal() => {}
            }
        }
    };
    match crate::serve(&ivy, ivy.ops_router().merge(ivy.router()), listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ivy-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ivy-server token`: prints a token signed with the first HMAC secret.
fn token(cli: &Cli, sub: &str, read: &[String], write: &[String], ttl: Duration) -> ExitCode {
    let Some(secret) = cli.auth_hmac_secrets.first() else {
        eprintln!("ivy-server token: needs --auth-hmac-secret (or IVY_AUTH_HMAC_SECRET) to sign with");
        return ExitCode::from(2);
    };
    let mint = Mint {
        sub: sub.into(),
        read: read.to_vec(),
        write: write.to_vec(),
        ttl,
        issuer: cli.auth_issuer.clone(),
        audience: cli.auth_audience.clone(),
    };
    match crate::auth::mint_hs256(secret, &mint) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ivy-server token: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are registered when this is called,
/// not when it is first polled: a signal that arrives right after the listening line (a test,
/// a supervisor) then shuts the server down gracefully instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending().await,
                }
            };
            let int = async {
                match int {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! {
                () = term => {}
                () = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line's defaults are the library's: one source for each.
    #[test]
    fn defaults_are_the_librarys() {
        let cli = Cli::try_parse_from(["ivy-server"]).unwrap();
        assert_eq!(cli.config(), Config::default());
        let sled = cli.sled(WallClock::system());
        let lib = SledEngine::default();
        assert_eq!((&sled.data, sled.durability, sled.flush_interval), (&lib.data, lib.durability, lib.flush_interval));
        assert_eq!((sled.max_size, sled.min_free_space, sled.repair), (lib.max_size, lib.min_free_space, lib.repair));
        assert_eq!((cli.retention(), sled.retention), (Retention::default(), lib.retention));
        assert_eq!(cli.listen, DEFAULT_LISTEN.parse::<SocketAddr>().unwrap());
        assert_eq!(cli.log_format, LogFormat::Text);
        assert!(!cli.memory);
    }

    #[test]
    fn auth_flags_reach_the_config_and_the_token_helper_parses() {
        let cli = Cli::try_parse_from([
            "ivy-server",
            "--auth-hmac-secret",
            "s3cr3t-old",
            "--auth-hmac-secret",
            "s3cr3t-new",
            "--auth-public-key",
            "/keys/2026-01.pem",
            "--auth-issuer",
            "https://backend.example",
            "--anonymous-read",
            "/public,/news",
            "--anonymous-write",
            "/inbox",
            "--auth-refresh-grace",
            "2s",
        ])
        .unwrap();
        let c = cli.config();
        assert_eq!(c.auth_hmac_secrets, [Secret::new("s3cr3t-old"), Secret::new("s3cr3t-new")]);
        assert_eq!(c.auth_public_keys, [PathBuf::from("/keys/2026-01.pem")]);
        assert_eq!((c.auth_issuer.as_deref(), c.auth_audience.as_deref()), (Some("https://backend.example"), None));
        assert_eq!(
            (c.anonymous_read.as_slice(), c.anonymous_write.as_slice()),
            (&["/public".to_string(), "/news".into()][..], &["/inbox".to_string()][..])
        );
        assert_eq!(c.auth_refresh_grace, Duration::from_secs(2));
        assert!(!format!("{cli:?}").contains("s3cr3t"), "secrets stay out of Debug output");
        // The helper takes the secret after its name too.
        let cli =
            Cli::try_parse_from(["ivy-server", "token", "--sub", "ada", "--read", "/chat", "--auth-hmac-secret", "s", "--ttl", "30m"])
                .unwrap();
        match cli.command {
            Some(Command::Token { sub, read, write, ttl }) => {
                assert_eq!(
                    (sub.as_str(), read.as_slice(), write.len(), ttl.0),
                    ("ada", &["/chat".to_string()][..], 0, Duration::from_secs(1800))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.auth_hmac_secrets, [Secret::new("s")]);
        assert!(Cli::try_parse_from(["ivy-server", "--auth-hmac-secret", ""]).is_err());
    }

    #[test]
    fn listen_takes_the_usual_forms() {
        let ok = |s: &str| parse_listen(s).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(ok("[::1]:9"), "[::1]:9");
        assert_eq!(ok(":8080"), "0.0.0.0:8080");
        assert_eq!(ok("8080"), "127.0.0.1:8080");
        assert!(parse_listen("localhost:8080").unwrap().ip().is_loopback());
        for bad in ["", ":", "x", "127.0.0.1", "127.0.0.1:99999", ":http", "no-such-host.invalid:80"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "ivy-server",
            "--ping-interval",
            "0.5",
            "--allowed-origin",
            "http://a,http://b",
            "--durability",
            "async",
            "--flush-interval-ms",
            "7",
            "--memory",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
            "--retention-max-age",
            "86400",
            "--retention-max-events",
            "100",
        ])
        .unwrap();
        assert_eq!(cli.config().api_keys, ["k1", "k2"]);
        assert_eq!(cli.retention(), Retention::default().max_age(Some(Duration::from_secs(86400))).max_events(Some(100)));
        let c = cli.config();
        assert_eq!(c.ping_interval, Duration::from_millis(500));
        assert_eq!(c.allowed_origins, ["http://a", "http://b"]);
        let s = cli.sled(WallClock::system());
        assert_eq!((s.durability, s.flush_interval), (Durability::Async, Duration::from_millis(7)));
        assert!(cli.memory);
    }

    #[test]
    fn redis_selects_the_redis_engine_and_excludes_memory() {
        let cli = Cli::try_parse_from(["ivy-server", "--redis", "redis://:pw@127.0.0.1:6380/2", "--retention-max-age", "60"]).unwrap();
        assert_eq!(cli.redis.as_deref(), Some("redis://:pw@127.0.0.1:6380/2"));
        let engine = cli.engine(WallClock::system());
        assert_eq!(engine.kind(), "redis");
        assert_eq!(engine.describe(), "Redis at redis://:***@127.0.0.1:6380/2", "no password in the logs");
        assert_eq!(Cli::try_parse_from(["ivy-server"]).unwrap().engine(WallClock::system()).kind(), "sled");
        let both = Cli::try_parse_from(["ivy-server", "--redis", "redis://127.0.0.1", "--memory"]);
        assert!(both.is_err(), "--redis and --memory are exclusive");
    }
}
