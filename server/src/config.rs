//! The server's configuration: the protocol's limits and the HTTP settings, whatever the
//! engine. Each default is a constant here, used by [`Config::default`] and by the command
//! line ([`crate::cli`]), so the two cannot drift (a test checks it).

use std::path::PathBuf;
use std::time::Duration;

pub use crate::auth::Secret;

/// Default of [`Config::max_message_size`].
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_536;
/// Default of [`Config::max_path_length`].
pub const DEFAULT_MAX_PATH_LENGTH: usize = 255;
/// Default of [`Config::max_path_depth`]: each level of an event's path holds an entry for it
/// in its log, so the depth bounds what one event costs on disk.
pub const DEFAULT_MAX_PATH_DEPTH: usize = 16;
/// Default of [`Config::max_subscriptions`].
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1024;
/// Default of [`Config::queue_length`].
pub const DEFAULT_QUEUE_LENGTH: usize = 1024;
/// Default of [`Config::queue_bytes`] (1 MiB): a burst of that much reaches a reader through
/// its queue; beyond, it is read from the log.
pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;
/// Default of [`Config::memory_budget`] (1 GiB).
pub const DEFAULT_MEMORY_BUDGET: usize = 1 << 30;
/// Default of [`Config::log_page_limit`].
pub const DEFAULT_LOG_PAGE_LIMIT: usize = 10_000;
/// Default of [`Config::log_page_bytes`].
pub const DEFAULT_LOG_PAGE_BYTES: usize = 4 << 20;
/// Default of [`Config::max_log_requests`].
pub const DEFAULT_MAX_LOG_REQUESTS: usize = 256;
/// Default of [`Config::max_log_requests_per_address`].
pub const DEFAULT_MAX_LOG_REQUESTS_PER_ADDRESS: usize = 16;
/// Default of [`Config::max_connections`]: room for the 50,000 idle connections of the
/// benchmarks, twice over, while bounding the memory idle connections can take.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default of [`Config::rate_limit`], in commands per second per connection: two and a half
/// times what a busy legitimate publisher (20,000 commands per second) needs.
pub const DEFAULT_RATE_LIMIT: u32 = 50_000;
/// Default of [`Config::rate_burst`]: enough for a reconnecting client to resubscribe to the
/// most channels it may hold (`--max-subscriptions`) and resend its pending events at once.
pub const DEFAULT_RATE_BURST: u32 = 10_000;
/// Default of [`Config::subscribe_rate`], in subscribes and unsubscribes per second per
/// connection.
pub const DEFAULT_SUBSCRIBE_RATE: u32 = 1000;
/// Default of [`Config::subscribe_burst`]: twice [`DEFAULT_MAX_SUBSCRIPTIONS`], so that a
/// reconnecting client can resubscribe to all it may hold at once, and change them again.
pub const DEFAULT_SUBSCRIBE_BURST: u32 = 2048;
/// Default of [`Config::max_connections_per_address`].
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// Default of [`Config::first_byte_timeout`].
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`Config::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`Config::byte_rate`]: bytes stored per second per connection, counting an
/// event's line plus 16 bytes per level of its path (16 MiB).
pub const DEFAULT_BYTE_RATE: u64 = 16 << 20;
/// Default of [`Config::byte_burst`] (32 MiB).
pub const DEFAULT_BYTE_BURST: u64 = 32 << 20;
/// Default of [`Config::byte_rate_per_identity`] (16 MiB per second).
pub const DEFAULT_BYTE_RATE_PER_IDENTITY: u64 = 16 << 20;
/// Default of [`Config::byte_burst_per_identity`] (32 MiB).
pub const DEFAULT_BYTE_BURST_PER_IDENTITY: u64 = 32 << 20;
/// Default of [`Config::flush_timeout`].
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Config::ping_interval`].
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default of [`Config::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`Config::idempotency_window`] (10 minutes).
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = crate::engine::idempotency::DEFAULT_WINDOW;
/// Default of [`Config::idempotency_max_keys`].
pub const DEFAULT_IDEMPOTENCY_MAX_KEYS: usize = crate::engine::idempotency::DEFAULT_MAX_KEYS;

/// Default of [`Config::auth_refresh_grace`].
pub const DEFAULT_AUTH_REFRESH_GRACE: Duration = Duration::from_secs(10);
/// Default of [`Config::presence_linger`].
pub const DEFAULT_PRESENCE_LINGER: Duration = Duration::from_secs(5);
/// Default of [`Config::presence_max_list`].
pub const DEFAULT_PRESENCE_MAX_LIST: usize = 1000;
/// Default of [`Config::demo_token_ttl`] (5 minutes).
pub const DEFAULT_DEMO_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Default of [`Config::demo_token_grants`]: the chat demo's channels.
pub const DEFAULT_DEMO_TOKEN_GRANT: &str = "/chat";

/// Parses seconds, with an optional fraction (`30`, `0.25`); `0` means off.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    // A unit, or none for seconds: `250ms`, `1.5s`, `2m`, `1h`, `30`.
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("{s:?} is not a duration (a number of seconds, or with a unit: 250ms, 1.5s, 2m, 1h, 7d)")),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (a number of seconds, or with a unit: 250ms, 1.5s, 2m, 1h, 7d)"))?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is not a duration between 0 and 10^19 seconds"))
}

/// Configuration of an Ivy server (not of its engine: see [`crate::engine`]). Build it from
/// [`Config::default`] with the setters; fields can be read and set directly too. New fields
/// may be added in minor releases.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Largest WebSocket message accepted, in bytes; larger ones close the connection with
    /// 1009. Default [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
    /// Longest channel path accepted, in bytes after normalization. Default
    /// [`DEFAULT_MAX_PATH_LENGTH`].
    pub max_path_length: usize,
    /// Most levels of a channel path (`/a/b` has 2). Default [`DEFAULT_MAX_PATH_DEPTH`].
    pub max_path_depth: usize,
    /// Most subscriptions one connection may hold. Default [`DEFAULT_MAX_SUBSCRIPTIONS`].
    pub max_subscriptions: usize,
    /// Lines (events, replies, errors) queued for one connection. An event that finds the
    /// queue full is not lost: the connection catches up from the log (and is closed with 4000
    /// if it stays behind for a whole [`Config::ping_interval`]); a command waits for room for
    /// its reply. Default [`DEFAULT_QUEUE_LENGTH`].
    pub queue_length: usize,
    /// Bytes of events queued for one connection (an empty queue takes any event); beyond, as
    /// for [`Config::queue_length`], it catches up from the log. Default
    /// [`DEFAULT_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Bytes the server holds for its clients at most (event lines until written, sends until
    /// stored, catch-up pages; `docs/GUARANTEES.md`); while they are reached, large or
    /// pipelined sends are refused with `overloaded` and queues take less. 0: no budget.
    /// Default [`DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: usize,
    /// Most events one log page returns (`limit` above it is capped). Default
    /// [`DEFAULT_LOG_PAGE_LIMIT`].
    pub log_page_limit: usize,
    /// Most bytes of lines in one cursor page: a page ends after the event that reaches it
    /// (with a `rel="next"` link), whatever its `limit`. Default [`DEFAULT_LOG_PAGE_BYTES`].
    pub log_page_bytes: usize,
    /// Most log requests in progress at once (a streamed log counts until it is sent); more
    /// get 503. Default [`DEFAULT_MAX_LOG_REQUESTS`].
    pub max_log_requests: usize,
    /// Most log requests in progress from one client IP address (when served by
    /// [`crate::serve`]); more get 503. 0: no limit. Default
    /// [`DEFAULT_MAX_LOG_REQUESTS_PER_ADDRESS`].
    pub max_log_requests_per_address: usize,
    /// Origins allowed to open WebSockets and read logs from a browser. Empty (the default):
    /// every origin.
    pub allowed_origins: Vec<String>,
    /// Host names (`Host` header) the server answers to, each with or without a port (without:
    /// any port); others get 421. Empty (the default): any. Set it when the server is reachable
    /// under names a browser could be tricked into using (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Most WebSocket connections at once; beyond it the handshake is refused with 503.
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Most TCP connections (HTTP and WebSocket) from one client IP address at once; more are
    /// closed as soon as they are accepted. 0: no limit. Applies when served by
    /// [`crate::serve`]. Default [`DEFAULT_MAX_CONNECTIONS_PER_ADDRESS`].
    pub max_connections_per_address: usize,
    /// Time a new TCP connection gets to send its first byte before it is closed. Zero: no
    /// limit (the header timeout still applies). Applies when served by [`crate::serve`].
    /// Default [`DEFAULT_FIRST_BYTE_TIMEOUT`].
    pub first_byte_timeout: Duration,
    /// Time a connection's writes may make no progress (a client that stopped reading) before
    /// it is closed. Zero: no limit. Applies when served by [`crate::serve`]. Default
    /// [`DEFAULT_WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// Commands one connection may send per second, on average; excess ones get
    /// `!rate-limited`. 0: no limit. Default [`DEFAULT_RATE_LIMIT`].
    pub rate_limit: u32,
    /// Commands one connection may send in a burst above the rate (minimum 1). Default
    /// [`DEFAULT_RATE_BURST`].
    pub rate_burst: u32,
    /// Subscribes and unsubscribes one connection may make per second, on average (they also
    /// count towards [`Config::rate_limit`]): beyond the burst, the connection's next command
    /// is read only when the rate allows, so its changes are paced, never refused. 0: no
    /// limit. Default [`DEFAULT_SUBSCRIBE_RATE`].
    pub subscribe_rate: u32,
    /// Subscribes and unsubscribes one connection may send in a burst above that rate
    /// (minimum 1). Default [`DEFAULT_SUBSCRIBE_BURST`].
    pub subscribe_burst: u32,
    /// Bytes one connection's sends may store per second, on average, counting what the store
    /// keeps of an event (its line once, 16 bytes per level of its path, and the copies of a
    /// short line on a shallow path: [`crate::engine::sled`]); excess sends get
    /// `!rate-limited`. 0: no limit. Default [`DEFAULT_BYTE_RATE`].
    pub byte_rate: u64,
    /// Bytes one connection may store in a burst above the byte rate. Default
    /// [`DEFAULT_BYTE_BURST`].
    pub byte_burst: u64,
    /// Bytes the sends of one identity (a token's `sub`, with auth on) may store per second in
    /// all, whatever the number of its connections, counted as [`Config::byte_rate`]; excess
    /// sends get `!rate-limited`. 0: no limit. Default [`DEFAULT_BYTE_RATE_PER_IDENTITY`].
    pub byte_rate_per_identity: u64,
    /// Bytes one identity may store in a burst above that rate. Default
    /// [`DEFAULT_BYTE_BURST_PER_IDENTITY`].
    pub byte_burst_per_identity: u64,
    /// Time between the server's pings on each WebSocket; a connection silent for a whole
    /// interval after a ping is closed with 4001. Zero: no pings. Default
    /// [`DEFAULT_PING_INTERVAL`].
    pub ping_interval: Duration,
    /// Time an HTTP connection gets to send a complete request head; slower ones, and idle
    /// keep-alive connections, are closed. Zero: no limit. Applies when served by
    /// [`crate::serve`]. Default [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// Time the engine gets, at shutdown, to store what it accepted and flush: a full or stuck
    /// disk must not keep the process from exiting (with sync durability every acknowledged
    /// event is durable already). Default [`DEFAULT_FLUSH_TIMEOUT`].
    pub flush_timeout: Duration,
    /// Serve the files of this directory at `/` (`index.html` for a directory), next to `/ws`
    /// and `/log/`, which take precedence. Default: none.
    pub static_dir: Option<PathBuf>,
    /// Server API keys: a request with `Authorization: Bearer <one of them>` may use the
    /// operator endpoints (`DELETE /log/<path>`) and publish anywhere over HTTP as the
    /// application (`POST /log/<path>`, `POST /publish`). Default: none (the operator
    /// endpoints answer 403).
    pub api_keys: Vec<String>,
    /// HS256 secrets that tokens may be signed with (several: rotation). With no secret and
    /// no public key, auth is off and everything is allowed. Default: none.
    pub auth_hmac_secrets: Vec<Secret>,
    /// PEM public keys (RSA for RS256, EC P-256 for ES256, Ed25519 for EdDSA) that tokens may
    /// be signed with; a key's `kid` is its file name without the extension. Default: none.
    pub auth_public_keys: Vec<PathBuf>,
    /// The `iss` every token must have, when set. Default: none (not checked).
    pub auth_issuer: Option<String>,
    /// The `aud` every token must have, when set. Default: none (not checked).
    pub auth_audience: Option<String>,
    /// Paths a connection or log request without a token may read (with auth on). Default:
    /// none.
    pub anonymous_read: Vec<String>,
    /// Paths a connection without a token may send to (with auth on). Default: none.
    pub anonymous_write: Vec<String>,
    /// How long past its token's `exp` (the last token it presented, at the handshake or
    /// in-band with `&JWT`) a connection stays open before it is closed with 4003.
    /// Default [`DEFAULT_AUTH_REFRESH_GRACE`].
    pub auth_refresh_grace: Duration,
    /// How long a member whose last connection subscribed at a channel went (closed,
    /// dropped, unsubscribed) stays present there: a connection of the same member that
    /// subscribes again within it causes no leave and no join (`docs/PROTOCOL.md` 5.10).
    /// Zero: leaves at once. Default [`DEFAULT_PRESENCE_LINGER`].
    pub presence_linger: Duration,
    /// Above this many members, a channel's presence lines carry counts only (no member
    /// list). Default [`DEFAULT_PRESENCE_MAX_LIST`].
    pub presence_max_list: usize,
    /// A PEM file of the server's certificate chain (its own certificate first, then the
    /// intermediates): with [`Config::tls_key`], [`crate::serve`] speaks TLS (rustls) on every
    /// connection, so that `/ws`, `/log` and the static files are served over `wss://` and
    /// `https://`. Both or neither; read once, when the server opens (a renewed certificate
    /// takes a restart). Default: none (plain TCP).
    pub tls_cert: Option<PathBuf>,
    /// The PEM file of the private key of [`Config::tls_cert`] (PKCS#8, PKCS#1 RSA or SEC1
    /// EC). Default: none.
    pub tls_key: Option<PathBuf>,
    /// **For demos only, never in production**: serve `POST /demo/token`, which hands a
    /// token signed with the first of [`Config::auth_hmac_secrets`] (required) to anyone
    /// asking for a nickname that no other visitor holds (see the `demo` module docs:
    /// `server/src/demo.rs`). Default: off.
    pub demo_token_endpoint: bool,
    /// Lifetime of the demo endpoint's tokens. Default [`DEFAULT_DEMO_TOKEN_TTL`].
    pub demo_token_ttl: Duration,
    /// Paths the demo endpoint's tokens may read and write. Default
    /// [`DEFAULT_DEMO_TOKEN_GRANT`].
    pub demo_token_grants: Vec<String>,
    /// This server's node id, as `GET /info` and `/metrics` state it: 1 to 64 ASCII letters,
    /// digits, `.`, `_`, `-`. Default: none (a random one per start, 16 hex digits).
    pub node_id: Option<String>,
    /// Whether `GET /info` and `GET /metrics` need a server API key ([`Config::api_keys`],
    /// `Authorization: Bearer KEY`); `/healthz` and `/readyz` never do. Default: false (open,
    /// as monitoring endpoints on a private port usually are: they carry counts only, no
    /// channel name, path or identity).
    pub ops_require_api_key: bool,
    /// How long a send id (`*ID:path:data`, `Idempotency-Key`, `docs/PROTOCOL.md` 5.9) is
    /// remembered after its event's timestamp: a repeat within it is answered with the first
    /// event's timestamp and not stored again. Zero: ids are accepted and ignored. Default
    /// [`DEFAULT_IDEMPOTENCY_WINDOW`].
    pub idempotency_window: Duration,
    /// Most send ids remembered; beyond, the oldest are forgotten first (the window is then
    /// shorter). Default [`DEFAULT_IDEMPOTENCY_MAX_KEYS`].
    pub idempotency_max_keys: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_path_length: DEFAULT_MAX_PATH_LENGTH,
            max_path_depth: DEFAULT_MAX_PATH_DEPTH,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            queue_length: DEFAULT_QUEUE_LENGTH,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            log_page_limit: DEFAULT_LOG_PAGE_LIMIT,
            log_page_bytes: DEFAULT_LOG_PAGE_BYTES,
            max_log_requests: DEFAULT_MAX_LOG_REQUESTS,
            max_log_requests_per_address: DEFAULT_MAX_LOG_REQUESTS_PER_ADDRESS,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            rate_limit: DEFAULT_RATE_LIMIT,
            rate_burst: DEFAULT_RATE_BURST,
            subscribe_rate: DEFAULT_SUBSCRIBE_RATE,
            subscribe_burst: DEFAULT_SUBSCRIBE_BURST,
            byte_rate: DEFAULT_BYTE_RATE,
            byte_burst: DEFAULT_BYTE_BURST,
            byte_rate_per_identity: DEFAULT_BYTE_RATE_PER_IDENTITY,
            byte_burst_per_identity: DEFAULT_BYTE_BURST_PER_IDENTITY,
            ping_interval: DEFAULT_PING_INTERVAL,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            static_dir: None,
            api_keys: Vec::new(),
            auth_hmac_secrets: Vec::new(),
            auth_public_keys: Vec::new(),
            auth_issuer: None,
            auth_audience: None,
            anonymous_read: Vec::new(),
            anonymous_write: Vec::new(),
            auth_refresh_grace: DEFAULT_AUTH_REFRESH_GRACE,
            presence_linger: DEFAULT_PRESENCE_LINGER,
            presence_max_list: DEFAULT_PRESENCE_MAX_LIST,
            tls_cert: None,
            tls_key: None,
            demo_token_endpoint: false,
            demo_token_ttl: DEFAULT_DEMO_TOKEN_TTL,
            demo_token_grants: vec![DEFAULT_DEMO_TOKEN_GRANT.to_string()],
            node_id: None,
            ops_require_api_key: false,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            idempotency_max_keys: DEFAULT_IDEMPOTENCY_MAX_KEYS,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        impl Config {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Config {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`Config::max_message_size`].
    max_message_size: usize;
    /// Sets [`Config::max_path_length`].
    max_path_length: usize;
    /// Sets [`Config::max_path_depth`].
    max_path_depth: usize;
    /// Sets [`Config::max_subscriptions`].
    max_subscriptions: usize;
    /// Sets [`Config::queue_length`].
    queue_length: usize;
    /// Sets [`Config::queue_bytes`].
    queue_bytes: usize;
    /// Sets [`Config::memory_budget`].
    memory_budget: usize;
    /// Sets [`Config::log_page_limit`].
    log_page_limit: usize;
    /// Sets [`Config::log_page_bytes`].
    log_page_bytes: usize;
    /// Sets [`Config::max_log_requests`].
    max_log_requests: usize;
    /// Sets [`Config::max_log_requests_per_address`].
    max_log_requests_per_address: usize;
    /// Sets [`Config::allowed_origins`].
    allowed_origins: Vec<String>;
    /// Sets [`Config::allowed_hosts`].
    allowed_hosts: Vec<String>;
    /// Sets [`Config::max_connections`].
    max_connections: usize;
    /// Sets [`Config::max_connections_per_address`].
    max_connections_per_address: usize;
    /// Sets [`Config::first_byte_timeout`].
    first_byte_timeout: Duration;
    /// Sets [`Config::write_timeout`].
    write_timeout: Duration;
    /// Sets [`Config::rate_limit`].
    rate_limit: u32;
    /// Sets [`Config::rate_burst`].
    rate_burst: u32;
    /// Sets [`Config::subscribe_rate`].
    subscribe_rate: u32;
    /// Sets [`Config::subscribe_burst`].
    subscribe_burst: u32;
    /// Sets [`Config::byte_rate`].
    byte_rate: u64;
    /// Sets [`Config::byte_burst`].
    byte_burst: u64;
    /// Sets [`Config::byte_rate_per_identity`].
    byte_rate_per_identity: u64;
    /// Sets [`Config::byte_burst_per_identity`].
    byte_burst_per_identity: u64;
    /// Sets [`Config::ping_interval`].
    ping_interval: Duration;
    /// Sets [`Config::header_timeout`].
    header_timeout: Duration;
    /// Sets [`Config::flush_timeout`].
    flush_timeout: Duration;
    /// Sets [`Config::static_dir`].
    static_dir: Option<PathBuf>;
    /// Sets [`Config::api_keys`].
    api_keys: Vec<String>;
    /// Sets [`Config::auth_hmac_secrets`].
    auth_hmac_secrets: Vec<Secret>;
    /// Sets [`Config::auth_public_keys`].
    auth_public_keys: Vec<PathBuf>;
    /// Sets [`Config::auth_issuer`].
    auth_issuer: Option<String>;
    /// Sets [`Config::auth_audience`].
    auth_audience: Option<String>;
    /// Sets [`Config::anonymous_read`].
    anonymous_read: Vec<String>;
    /// Sets [`Config::anonymous_write`].
    anonymous_write: Vec<String>;
    /// Sets [`Config::auth_refresh_grace`].
    auth_refresh_grace: Duration;
    /// Sets [`Config::presence_linger`].
    presence_linger: Duration;
    /// Sets [`Config::presence_max_list`].
    presence_max_list: usize;
    /// Sets [`Config::tls_cert`].
    tls_cert: Option<PathBuf>;
    /// Sets [`Config::tls_key`].
    tls_key: Option<PathBuf>;
    /// Sets [`Config::demo_token_endpoint`] (demos only, never in production).
    demo_token_endpoint: bool;
    /// Sets [`Config::demo_token_ttl`].
    demo_token_ttl: Duration;
    /// Sets [`Config::demo_token_grants`].
    demo_token_grants: Vec<String>;
    /// Sets [`Config::node_id`].
    node_id: Option<String>;
    /// Sets [`Config::ops_require_api_key`].
    ops_require_api_key: bool;
    /// Sets [`Config::idempotency_window`].
    idempotency_window: Duration;
    /// Sets [`Config::idempotency_max_keys`].
    idempotency_max_keys: usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_seconds("7d"), Ok(Duration::from_secs(7 * 86_400)), "the README's --retention-max-age 7d");
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_seconds(" 1h "), Ok(Duration::from_secs(3600)));
        assert!(parse_seconds("5w").is_err());
        assert!(parse_seconds("ms").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("1e30").is_err());
    }

    #[test]
    fn setters_set() {
        let c = Config::default().max_subscriptions(3).ping_interval(Duration::ZERO).allowed_origins(vec!["http://a".into()]);
        assert_eq!((c.max_subscriptions, c.ping_interval, c.allowed_origins.len()), (3, Duration::ZERO, 1));
        assert_eq!(
            Config { max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS, ping_interval: DEFAULT_PING_INTERVAL, allowed_origins: vec![], ..c },
            Config::default()
        );
    }
}
