//! Server configuration: command-line flags, each also settable by an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

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
            static_dir: None,
        }
    }
}
