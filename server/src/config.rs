//! Server configuration: command-line flags, each also settable by an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// When an event is acknowledged relative to its durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Durability {
    /// Acknowledge and broadcast an event only after the write that holds it has been
    /// flushed and fsynced (group commit: concurrent events share one flush).
    #[default]
    Sync,
    /// Acknowledge and broadcast once the event is in the store's memory, and flush in the
    /// background (every `--flush-interval-ms`). A crash of the machine or of the process can
    /// lose the events of the last interval, even though they were acknowledged; their
    /// timestamps are never handed out again (a durable clock floor).
    Async,
}

/// Default of `--max-message-size`.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_536;
/// Default of `--max-path-length`.
pub const DEFAULT_MAX_PATH_LENGTH: usize = 255;
/// Default of `--max-subscriptions`.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1024;
/// Default of `--queue-length`.
pub const DEFAULT_QUEUE_LENGTH: usize = 1024;
/// Default of `--log-page-limit`.
pub const DEFAULT_LOG_PAGE_LIMIT: usize = 10_000;
/// Default of `--flush-interval-ms`.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 100;
/// Default of `--max-connections`: room for the 50,000 idle connections of the benchmarks,
/// twice over, while bounding the memory idle connections can take.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default of `--rate-limit`, in commands per second per connection: two and a half times
/// what a busy legitimate publisher (20,000 commands per second) needs.
pub const DEFAULT_RATE_LIMIT: u32 = 50_000;
/// Default of `--rate-burst`: enough for a reconnecting client to resubscribe to the most
/// channels it may hold (`--max-subscriptions`) and resend its pending events at once.
pub const DEFAULT_RATE_BURST: u32 = 10_000;
/// Default of `--ping-interval`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default of `--header-timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses seconds, with an optional fraction (`30`, `0.25`); `0` means off.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a number of seconds between 0 and 10^19"))
}

/// Configuration of an Ivy server.
#[derive(Debug, Clone, Parser)]
#[command(name = "ivy-server", version, about = "Reference server for the Ivy hierarchical pub/sub protocol with persistent event logs")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "IVY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory of the sled event store (created if missing).
    #[arg(long, env = "IVY_DATA", default_value = "./ivy-data")]
    pub data: PathBuf,

    /// When events are acknowledged: `sync` (after fsync, the default) or `async`.
    #[arg(long, env = "IVY_DURABILITY", value_enum, default_value_t = Durability::Sync)]
    pub durability: Durability,

    /// Background flush interval of `--durability async`, in milliseconds.
    #[arg(long, env = "IVY_FLUSH_INTERVAL_MS", default_value_t = DEFAULT_FLUSH_INTERVAL_MS)]
    pub flush_interval_ms: u64,

    /// Largest WebSocket message accepted, in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "IVY_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// Longest channel path accepted, in bytes after normalization.
    #[arg(long, env = "IVY_MAX_PATH_LENGTH", default_value_t = DEFAULT_MAX_PATH_LENGTH)]
    pub max_path_length: usize,

    /// Most subscriptions one connection may hold.
    #[arg(long, env = "IVY_MAX_SUBSCRIPTIONS", default_value_t = DEFAULT_MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,

    /// Messages queued for one connection before it counts as a slow consumer and is closed
    /// with code 4000.
    #[arg(long, env = "IVY_QUEUE_LENGTH", default_value_t = DEFAULT_QUEUE_LENGTH)]
    pub queue_length: usize,

    /// Most events one log page returns (`limit` above it is capped).
    #[arg(long, env = "IVY_LOG_PAGE_LIMIT", default_value_t = DEFAULT_LOG_PAGE_LIMIT)]
    pub log_page_limit: usize,

    /// Origins allowed to open WebSockets and read logs from a browser (repeat the flag or
    /// separate with commas). Empty: every origin.
    #[arg(long = "allowed-origin", env = "IVY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most WebSocket connections at once; beyond it the handshake is refused with 503.
    #[arg(long, env = "IVY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Commands (text or binary messages) one connection may send per second, on average;
    /// excess commands are refused with `!rate-limited` and not executed. 0: no limit.
    #[arg(long, env = "IVY_RATE_LIMIT", default_value_t = DEFAULT_RATE_LIMIT)]
    pub rate_limit: u32,

    /// Commands one connection may send in a burst above the average rate (minimum 1).
    #[arg(long, env = "IVY_RATE_BURST", default_value_t = DEFAULT_RATE_BURST)]
    pub rate_burst: u32,

    /// Seconds between the server's pings on each WebSocket (fractions allowed); a connection
    /// from which nothing, not even a pong, arrives for a whole interval after a ping is
    /// closed with 4001. 0: no pings.
    #[arg(long, env = "IVY_PING_INTERVAL", value_parser = parse_seconds, default_value = "30")]
    pub ping_interval: Duration,

    /// Seconds an HTTP connection gets to send a complete request head (fractions allowed);
    /// slower ones, and idle keep-alive connections waiting for a next request, are closed.
    /// 0: no limit. Applies when served by `ivy-server` or `ivy_server::serve`.
    #[arg(long, env = "IVY_HEADER_TIMEOUT", value_parser = parse_seconds, default_value = "30")]
    pub header_timeout: Duration,

    /// Serve the files of this directory at `/` (`index.html` for a directory), next to `/ws`
    /// and `/log/`, which take precedence. Off when not set.
    #[arg(long, env = "IVY_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
}
impl Config {
    /// The defaults, with the data directory `data`. Reads no flags and no environment.
    pub fn new(data: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: data.into(),
            durability: Durability::Sync,
            flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_path_length: DEFAULT_MAX_PATH_LENGTH,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            queue_length: DEFAULT_QUEUE_LENGTH,
            log_page_limit: DEFAULT_LOG_PAGE_LIMIT,
            allowed_origins: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            rate_limit: DEFAULT_RATE_LIMIT,
            rate_burst: DEFAULT_RATE_BURST,
            ping_interval: DEFAULT_PING_INTERVAL,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            static_dir: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("1e30").is_err());
    }
}
