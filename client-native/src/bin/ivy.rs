//! `ivy`: the command-line client (built with the `cli` feature).
//!
//! Exit codes: 0 success; 1 a request failed (refused by the server, lost, timed out) or
//! standard input cannot be read; 2 bad usage (an unknown option, an invalid URL, path,
//! timestamp or count, a `--ca-file` that cannot be read: nothing was attempted); 3 cannot
//! connect to the server (unreachable, a refused handshake, or TLS failed: its certificate not
//! trusted or not valid for the host name); 4 unauthorized: the server refused the token (HTTP
//! 401 at the handshake or on a log read, or the token expired on a live connection and no
//! fresh one could be had); 130 interrupted (Ctrl-C).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, SelectAll};
use ivy_client_native::{
    Client, ClientError, ConnState, Error, Event, LogQuery, LogQueryError, LogReader, Member, MemberId, PresenceEvent, PresenceView,
    Sender, Start, SubscriptionError, Timestamp, TlsErrorKind,
};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(
    name = "ivy",
    version,
    about = "Command-line client for Ivy, the hierarchical pub/sub server with persistent event logs",
    after_help = "Exit codes: 0 success, 1 a request failed, 2 bad usage (a --ca-file that cannot be read included), 3 cannot \
                  connect (TLS failures included: an untrusted certificate, a wrong host name), 4 unauthorized (the token was refused),\n\
                  130 interrupted.\n\
                  RUST_LOG (for example RUST_LOG=ivy_client_native=debug) shows the client's own log on stderr."
)]
struct Cli {
    /// The server's base URL; the WebSocket (/ws) and log (/log/...) endpoints are derived
    /// from it.
    #[arg(long, global = true, env = "IVY_URL", default_value = "ws://127.0.0.1:8080", value_parser = parse_url)]
    url: String,

    /// A token (JWT) for a server with auth on, sent as `Authorization: Bearer`. A refused
    /// token (HTTP 401, or its expiry on a live connection) is not retried: exit code 4.
    #[arg(long, global = true, env = "IVY_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,

    /// A PEM file of certificate authorities to trust for a wss:// or https:// server, besides
    /// the system's roots (a private CA, or a self-signed certificate).
    #[arg(long, global = true, env = "IVY_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// A file holding the token (surrounding whitespace ignored), read at start and again
    /// whenever a fresh token is needed: ahead of the token's expiry (then sent in-band, so
    /// that `ivy sub` keeps its connection) and after the server refused it. Write a fresh
    /// token into it before the old one expires to keep a long `ivy sub` running.
    #[arg(long, global = true, env = "IVY_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,

    /// Do not report connection losses and reconnects on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the events of channels (and their descendants) as they arrive, one line each in
    /// the wire format `@TIMESTAMP:/path:data` (data escaped: `%` as %25, newline as %0A).
    /// Follows reconnects and server restarts without gaps or repeats, reporting them on
    /// stderr.
    Sub {
        /// Channels to subscribe to. An event matching several is printed once per channel.
        #[arg(required = true, value_parser = parse_path)]
        paths: Vec<String>,
        /// Start with the whole history of each channel.
        #[arg(long, conflicts_with = "after")]
        from_beginning: bool,
        /// Start after this timestamp (for example the last one printed by a previous run).
        #[arg(long)]
        after: Option<Timestamp>,
        /// Exit after printing this many events.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Also print who is present at each path (the presence extension): first everyone
        /// (`^=/path MEMBER CONNS [INFO]` per member), then `^+/path MEMBER CONNS [INFO]` for a
        /// join, `^-/path MEMBER` for a leave and `^#/path COUNT` for the count (after the
        /// snapshot and at each change). MEMBER is `=SUB` (a token's sub; `%`, space, tab, CR
        /// and LF escaped as %25, %20, %09, %0D, %0A) or `-ID` (an anonymous connection); INFO
        /// the token's info claim as JSON. After a reconnect only real changes are printed.
        /// With --json: {"presence":"snapshot"|"join"|"leave"|"count","path":..,...}.
        #[arg(long, conflicts_with = "raw")]
        presence: bool,
        #[command(flatten)]
        format: Format,
    },
    /// Print who is present at a path (subscribed at it or below; the presence extension):
    /// one line per member, `MEMBER CONNS [INFO]` (MEMBER `=SUB` or `-ID` for an anonymous
    /// connection, as `ivy sub --presence` prints them), sorted (subs first), then
    /// `# N members`. Needs a read grant covering the path.
    Who {
        /// Channel path.
        #[arg(value_parser = parse_path)]
        path: String,
        /// One JSON object: {"path":..,"count":N,"complete":true|false,"members":[{"sub":..,
        /// "info":{..},"conns":N} | {"anon":..,"conns":N}, ...]} (complete is false when a
        /// channel had more members than the server lists: count is then an estimate).
        #[arg(long)]
        json: bool,
    },
    /// Publish an event and print its timestamp once stored. Without DATA, publish each line
    /// of standard input as one event as soon as it is read, printing one timestamp per line,
    /// in order; Ctrl-C stops reading and waits for the sends already made. Each send carries
    /// an id: when the connection drops or the server restarts before its ack, it is resent
    /// after reconnecting and stored once (its timestamp printed once), for up to --retry-for.
    #[command(visible_alias = "pub")]
    Send {
        /// Channel path.
        #[arg(value_parser = parse_path)]
        path: String,
        /// Event data.
        data: Option<String>,
        /// How long a send may wait for its ack across lost connections and server restarts
        /// (reconnecting and resending it) before `ivy` gives up with exit code 1 (the event
        /// may or may not have been stored then). The first connection is not retried: a
        /// server that cannot be reached at all is exit code 3 at once.
        #[arg(long, env = "IVY_RETRY_FOR", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        retry_for: Duration,
    },
    /// Print a channel's stored events (its whole subtree), oldest first. Uses HTTP only.
    Log {
        /// Channel path.
        #[arg(value_parser = parse_path)]
        path: String,
        /// Only events after this timestamp.
        #[arg(long)]
        after: Option<Timestamp>,
        /// At most this many events (capped by the server).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Only the last N events.
        #[arg(short = 'n', long = "last", conflicts_with_all = ["after", "limit"], value_parser = clap::value_parser!(u64).range(1..))]
        last: Option<u64>,
        #[command(flatten)]
        format: Format,
    },
    /// Print the server's current time (a timestamp, or with --human a UTC date and time).
    Time {
        /// As an RFC 3339 date and time in UTC, such as 2026-12-02T02:05:24.891611992Z.
        #[arg(long)]
        human: bool,
    },
    /// Print what the server says about itself (GET /info): version, node id, engine, uptime,
    /// connections, subscriptions, events published since it started; one `key: value` line
    /// each. Uses HTTP only.
    Info {
        /// The server's JSON object as it sent it.
        #[arg(long)]
        json: bool,
    },
    /// List the channels that have stored events or subscribers on the server (GET /channels),
    /// those the token may read, in path order: one line each, `PATH SUBSCRIBERS NEWEST`
    /// (SUBSCRIBERS: the connections subscribed to exactly that channel; NEWEST: the timestamp
    /// of its newest stored event, `-` when it has none). Follows every page. Uses HTTP only.
    Channels {
        /// Only this channel and those below it.
        #[arg(long, default_value = "/", value_parser = parse_path)]
        prefix: String,
        /// Start after this channel (the last path printed by a previous listing).
        #[arg(long, value_parser = parse_path)]
        after: Option<String>,
        /// Channels per request (1 to 1000; the server's default: 100); every page is printed.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// One JSON object per line, as the server sent it: {"path","subscribers","newest"}.
        #[arg(long)]
        json: bool,
    },
    /// Administer the server with a server API key (POST /admin/...): print its JSON answer.
    Admin {
        /// The server API key (the server's --api-key).
        #[arg(long, env = "IVY_API_KEY", hide_env_values = true)]
        api_key: String,
        #[command(subcommand)]
        action: AdminAction,
    },
}

/// What `ivy admin` does.
#[derive(Debug, Subcommand)]
enum AdminAction {
    /// Close every WebSocket connection of the token `sub` SUB (close code 4004; they may
    /// reconnect: revoke their tokens to keep them out).
    Disconnect { sub: String },
    /// Refuse the token whose `jti` is JTI until --until, and close its connections (4003).
    Revoke {
        jti: String,
        /// Until when, in seconds since the Unix epoch (default: a day from now; at most a year).
        #[arg(long)]
        until: Option<u64>,
    },
    /// The revocations in force.
    Revocations,
}

/// How events are printed.
#[derive(Debug, Clone, Copy, Args)]
struct Format {
    /// One JSON object per line: {"ts":"TIMESTAMP","path":"/path","data":"..."}, the data
    /// unescaped (the timestamp is a string: it has more digits than a JSON number keeps).
    /// With --senders, also "sender": {"sub":"SUB"}, "anonymous", "application" or "unknown".
    #[arg(long, conflicts_with = "raw")]
    json: bool,
    /// The data alone, unescaped, one event per line (data that holds a newline spans lines).
    #[arg(long)]
    raw: bool,
    /// Ask the server for each event's verified sender (the ext=sender extension): lines are
    /// printed as received, `@TIMESTAMP~SENDER:/path:data`, SENDER being `=SUB` (the sender's
    /// token sub, `%`, `:`, CR and LF escaped as %25, %3A, %0D, %0A), `-` (no token), `*`
    /// (the server's application) or `?` (unknown: stored before senders were recorded).
    #[arg(long)]
    senders: bool,
}

/// `--url`: checked as the client checks it (the same errors), before anything connects.
fn parse_url(s: &str) -> Result<String, String> {
    LogReader::new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn parse_path(s: &str) -> Result<String, String> {
    ivy_client_core::path::normalize(s.as_bytes()).map(|p| p.into_owned()).map_err(|e| format!("invalid path: {e}"))
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The client: no connection, a refused or lost request.
    Client(Error),
    /// The log options given, checked as the server checks a query.
    Query(LogQueryError),
    /// Standard input could not be read (`ivy send` without DATA).
    Stdin(std::io::Error),
    /// Ctrl-C.
    Interrupted,
    /// The subscriptions ended because the client closed by itself: the server refused to
    /// reopen the connection (HTTP 401, for example after its token expired: close 4003), or
    /// its certificate was refused; with the reason, when known.
    Ended(Option<Error>),
    /// The server refused the token and no fresh one could be had: the reason.
    Unauthorized(String),
    /// The token file could not be read.
    TokenFile(std::path::PathBuf, std::io::Error),
    /// A send got no ack within `--retry-for` (reconnecting and resending it).
    GaveUp(Duration),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Client(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Client(e) => e.fmt(f),
            Failure::Query(e) => write!(f, "invalid log query: {e}"),
            Failure::Stdin(e) => write!(f, "cannot read standard input: {e}"),
            Failure::Interrupted => f.write_str("interrupted"),
            Failure::Ended(Some(e @ Error::Tls(_))) => write!(f, "the connection ended and could not be reopened: {e}"),
            Failure::Ended(_) => f.write_str("the subscriptions ended"),
            Failure::Unauthorized(reason) => write!(
                f,
                "unauthorized: the server refused the token ({reason}); give a fresh one (--token, or --token-file to have it re-read)"
            ),
            Failure::TokenFile(path, e) => write!(f, "cannot read the token file {}: {e}", path.display()),
            Failure::GaveUp(d) => write!(
                f,
                "no ack within {} (--retry-for), reconnecting and resending; the event may or may not have been stored",
                humantime::format_duration(*d)
            ),
        }
    }
}

fn exit_code(e: &Failure) -> u8 {
    match e {
        Failure::Client(Error::Tls(e)) if e.kind == TlsErrorKind::CaFile => 2,
        Failure::Unauthorized(_) | Failure::Client(Error::Request(ClientError::Unauthorized)) => 4,
        Failure::Client(Error::Connect(c)) if c.status == Some(401) => 4,
        Failure::Client(Error::Log(l)) if l.status == Some(401) => 4,
        Failure::Client(Error::Connect(_) | Error::Tls(_)) | Failure::Ended(_) => 3,
        Failure::Client(Error::InvalidUrl(_)) | Failure::Query(_) => 2,
        Failure::Interrupted => 130,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ivy_client_native=error".into())
                // tungstenite logs each frame whole at trace level: a token refresh is one.
                .add_directive("tungstenite::protocol=debug".parse().expect("a valid directive")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ivy: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli)).map_err(|e| match e {
        // A handshake refused for the token: said as such.
        Failure::Client(Error::Connect(c)) if c.status == Some(401) => Failure::Unauthorized(c.message),
        e => e,
    });
    let _ = std::io::stdout().flush();
    // Without waiting for a read of standard input that may never finish (after Ctrl-C).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, Failure::Interrupted) {
                eprintln!("ivy: {e}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// An event as printed: its wire line, a JSON object or its data, and a newline. For a
/// terminal (`terminal`), control characters and the invisible or reordering Unicode
/// formatting characters (bidi overrides and isolates, zero-width characters) are also written
/// as escapes (`%XX` of their bytes; `\uXXXX` in JSON): a publisher must not be able to move a
/// subscriber's cursor, recolour or rewrite their screen, or disguise text. (In the wire line
/// `%` itself is always escaped, as `%25`, so these escapes are unambiguous.) Pipes and files
/// get the exact bytes.
fn render(e: &Event, format: Format, terminal: bool) -> Vec<u8> {
    let mut v = if format.json {
        let ts = e.ts.to_string();
        let data = String::from_utf8_lossy(&e.data);
        let sender = match e.sender() {
            None => String::new(),
            Some(Sender::User(sub)) => format!(",\"sender\":{{\"sub\":{}}}", serde_json::Value::from(sub.as_str())),
            Some(Sender::Anonymous) => ",\"sender\":\"anonymous\"".into(),
            Some(Sender::Application) => ",\"sender\":\"application\"".into(),
            Some(Sender::Unknown) => ",\"sender\":\"unknown\"".into(),
        };
        let mut v = format!(
            "{{\"ts\":\"{ts}\",\"path\":{},\"data\":{}{sender}}}",
            serde_json::Value::from(&*e.path),
            serde_json::Value::from(&*data)
        )
        .into_bytes();
        if terminal {
            v = escape_for_terminal(&v, |c, out| out.extend_from_slice(format!("\\u{:04X}", u32::from(c)).as_bytes()));
        }
        v
    } else {
        let mut v = if format.raw {
            e.data.to_vec()
        } else {
            let mut v = Vec::with_capacity(e.encoded_len() + 1);
            e.encode(&mut v);
            v
        };
        if terminal {
            v = for_terminal(&v);
        }
        v
    };
    v.push(b'\n');
    v
}

/// A member's id as `ivy who` and `ivy sub --presence` print it: `=SUB` (with `%`, space, tab,
/// CR and LF escaped as %25, %20, %09, %0D, %0A) or `-ID` for an anonymous connection.
fn member_id_text(id: &MemberId) -> String {
    match id {
        MemberId::Sub(sub) => {
            let mut t = String::with_capacity(sub.len() + 1);
            t.push('=');
            for c in sub.chars() {
                match c {
                    '%' => t.push_str("%25"),
                    ' ' => t.push_str("%20"),
                    '\t' => t.push_str("%09"),
                    '\r' => t.push_str("%0D"),
                    '\n' => t.push_str("%0A"),
                    c => t.push(c),
                }
            }
            t
        }
        MemberId::Anon(id) => format!("-{id}"),
    }
}

/// `MEMBER CONNS [INFO]`.
fn member_text(m: &Member, conns: bool) -> String {
    let mut t = member_id_text(&m.id);
    if conns {
        t.push_str(&format!(" {}", m.conns));
        if let Some(info) = &m.info {
            t.push(' ');
            t.push_str(info);
        }
    }
    t
}

/// `{"sub":..,"info":{..},"conns":N}` or `{"anon":..,"conns":N}`, as the server writes members.
fn member_json(m: &Member, conns: bool) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    match &m.id {
        MemberId::Sub(s) => o.insert("sub".into(), s.as_str().into()),
        MemberId::Anon(a) => o.insert("anon".into(), a.as_str().into()),
    };
    if let Some(info) = m.info.as_deref().and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok()) {
        o.insert("info".into(), info);
    }
    if conns {
        o.insert("conns".into(), m.conns.into());
    }
    o.into()
}

fn view_json(v: &PresenceView) -> serde_json::Value {
    serde_json::json!({
        "path": v.path,
        "count": v.count,
        "complete": v.complete,
        "members": v.members.iter().map(|m| member_json(m, true)).collect::<Vec<_>>(),
    })
}

/// The lines of a presence event of `ivy sub --presence` (see its help), each with its newline.
fn render_presence(path: &str, e: &PresenceEvent, json: bool, terminal: bool) -> Vec<u8> {
    let mut lines: Vec<String> = Vec::new();
    if json {
        let v = match e {
            PresenceEvent::Snapshot(v) => {
                serde_json::json!({"presence": "snapshot", "path": path, "count": v.count, "complete": v.complete,
                    "members": v.members.iter().map(|m| member_json(m, true)).collect::<Vec<_>>()})
            }
            PresenceEvent::Join(m) => serde_json::json!({"presence": "join", "path": path, "member": member_json(m, false)}),
            PresenceEvent::Leave(m) => serde_json::json!({"presence": "leave", "path": path, "member": member_json(m, false)}),
            PresenceEvent::Count(n) => serde_json::json!({"presence": "count", "path": path, "count": n}),
            PresenceEvent::Failed(_) | PresenceEvent::Ended(_) => return Vec::new(),
        };
        lines.push(v.to_string());
    } else {
        match e {
            PresenceEvent::Snapshot(v) => {
                lines.extend(v.members.iter().map(|m| format!("^={path} {}", member_text(m, true))));
                lines.push(format!("^#{path} {}", v.count));
            }
            PresenceEvent::Join(m) => lines.push(format!("^+{path} {}", member_text(m, true))),
            PresenceEvent::Leave(m) => lines.push(format!("^-{path} {}", member_text(m, false))),
            PresenceEvent::Count(n) => lines.push(format!("^#{path} {n}")),
            PresenceEvent::Failed(_) | PresenceEvent::Ended(_) => {}
        }
    }
    let mut out = Vec::new();
    for l in lines {
        if terminal {
            out.extend_from_slice(&for_terminal(l.as_bytes()));
        } else {
            out.extend_from_slice(l.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// What `ivy sub` prints: events of its subscriptions, presence of its watched paths.
enum Item {
    Event(Result<Event, SubscriptionError>),
    Presence(String, PresenceEvent),
}

/// See [`render`].
fn for_terminal(line: &[u8]) -> Vec<u8> {
    escape_for_terminal(line, |c, out| {
        let mut buf = [0u8; 4];
        for b in c.encode_utf8(&mut buf).as_bytes() {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    })
}

fn escape_for_terminal(text: &[u8], mut escape: impl FnMut(char, &mut Vec<u8>)) -> Vec<u8> {
    let text = String::from_utf8_lossy(text);
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let dangerous =
            c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
        if dangerous {
            escape(c, &mut out);
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    out
}

/// A timestamp as an RFC 3339 date and time in UTC.
fn human(t: Timestamp) -> String {
    match SystemTime::UNIX_EPOCH.checked_add(Duration::new(t.secs(), t.subsec_nanos())) {
        Some(time) => humantime::format_rfc3339_nanos(time).to_string(),
        None => t.to_string(),
    }
}

/// Resolves when standard output is a pipe or socket whose reader has gone (`ivy sub | head
/// -1`), so that the command ends at once rather than at its next write; never otherwise.
async fn stdout_closed() {
    #[cfg(unix)]
    {
        use rustix::event::{PollFd, PollFlags, poll};
        use rustix::fs::FileType;
        let kind = rustix::fs::fstat(std::io::stdout()).map(|st| FileType::from_raw_mode(st.st_mode));
        if matches!(kind, Ok(FileType::Fifo | FileType::Socket)) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // poll(2) with no events asked for wakes only for POLLERR (a pipe's reader closed),
            // POLLHUP or POLLNVAL. A thread of its own: the runtime does not wait for it.
            std::thread::spawn(move || {
                let out = std::io::stdout();
                loop {
                    let mut fds = [PollFd::new(&out, PollFlags::empty())];
                    match poll(&mut fds, None) {
                        Ok(_) => {
                            let _ = tx.send(());
                            return;
                        }
                        Err(rustix::io::Errno::INTR) => {}
                        Err(_) => return,
                    }
                }
            });
            if rx.await.is_ok() {
                return;
            }
        }
    }
    std::future::pending::<()>().await;
}

/// Reports connection losses and reconnects on stderr (unless `quiet`), as they happen.
fn report_connection(client: &Client, url: String, quiet: bool) {
    if quiet {
        return;
    }
    let (mut state, mut connections) = (client.state(), client.connections());
    tokio::spawn(async move {
        let mut seen = *connections.borrow_and_update();
        let mut connected = true;
        loop {
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                r = connections.changed() => if r.is_err() { return },
            }
            // The count first: the driver bumps it before it shows the state.
            let n = *connections.borrow_and_update();
            let s = *state.borrow_and_update();
            if n > seen {
                if connected {
                    eprintln!("ivy: disconnected from {url}; reconnecting");
                }
                eprintln!("ivy: reconnected to {url}");
                seen = n;
                connected = true;
            }
            match s {
                ConnState::Connected | ConnState::Idle | ConnState::Closed | ConnState::Unauthorized => {}
                ConnState::AwaitingToken => eprintln!("ivy: the server refused the token; asking for a fresh one"),
                ConnState::Connecting { .. } | ConnState::Reconnecting { .. } if connected => {
                    connected = false;
                    eprintln!("ivy: disconnected from {url}; reconnecting");
                }
                // The loss counts as the first failure: attempt 1 is the first reconnect.
                ConnState::Connecting { attempt } if attempt > 1 => {
                    eprintln!("ivy: reconnecting to {url} (attempt {attempt})");
                }
                ConnState::Connecting { .. } | ConnState::Reconnecting { .. } => {}
            }
        }
    });
}

/// `future`, or [`Failure::Interrupted`] at Ctrl-C.
async fn interruptible<T>(future: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::select! {
        r = future => r,
        _ = tokio::signal::ctrl_c() => Err(Failure::Interrupted),
    }
}

/// The token in `path`, trimmed.
fn read_token_file(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map(|t| t.trim().to_string()).map_err(|e| Failure::TokenFile(path.to_path_buf(), e))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let url = cli.url;
    let ca_file = cli.ca_file;
    let token_file = cli.token_file;
    let token = match &token_file {
        Some(path) => Some(read_token_file(path)?).filter(|t| !t.is_empty()),
        None => cli.token,
    };
    let builder = || {
        let mut b = Client::builder(&url);
        if let Some(t) = &token {
            b = b.token(t.clone());
        }
        if let Some(p) = &ca_file {
            b = b.ca_file(p);
        }
        if let Some(path) = &token_file {
            // Read again at each refresh: whoever renews the token rewrites the file.
            let path = path.clone();
            b = b.token_provider(move || {
                let path = path.clone();
                async move {
                    match read_token_file(&path) {
                        Ok(t) if !t.is_empty() => Some(t),
                        Ok(_) => None,
                        Err(e) => {
                            eprintln!("ivy: {e}");
                            None
                        }
                    }
                }
            });
        }
        b
    };
    match cli.command {
        Command::Log { path, after, limit, last, format } => {
            let mut logs = LogReader::new(&url)?.senders(format.senders);
            if let Some(p) = &ca_file {
                logs = logs.ca_file(p)?;
            }
            if let Some(t) = &token {
                logs = logs.token(t.clone());
            }
            // The options were checked by the parser: -n and --limit are at least 1.
            let query = LogQuery::from_parts(last, after, limit.map(u64::from)).map_err(Failure::Query)?;
            let events = interruptible(async { Ok(logs.log(&path, query).await?) }).await?;
            let mut out = std::io::stdout().lock();
            let terminal = out.is_terminal();
            for e in &events {
                if out.write_all(&render(e, format, terminal)).is_err() {
                    break; // stdout closed
                }
            }
            let _ = out.flush();
            Ok(())
        }
        Command::Info { json } => {
            let mut reader = LogReader::new(&url)?;
            if let Some(p) = &ca_file {
                reader = reader.ca_file(p)?;
            }
            if let Some(t) = &token {
                reader = reader.token(t.clone());
            }
            let body = interruptible(async { Ok(reader.info().await?) }).await?;
            if json {
                println!("{}", body.trim_end());
                return Ok(());
            }
            let parsed: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                Failure::Client(Error::Log(ivy_client_native::LogError { status: None, message: format!("/info is not JSON: {e}") }))
            })?;
            let mut out = std::io::stdout().lock();
            let terminal = out.is_terminal();
            for (key, value) in parsed.as_object().into_iter().flatten() {
                // Strings without their quotes; anything else as JSON.
                let value = value.as_str().map_or_else(|| value.to_string(), str::to_string);
                let line = format!("{key}: {value}");
                let mut line = if terminal { for_terminal(line.as_bytes()) } else { line.into_bytes() };
                line.push(b'\n');
                if out.write_all(&line).is_err() {
                    break;
                }
            }
            let _ = out.flush();
            Ok(())
        }
        Command::Channels { prefix, after, limit, json } => {
            let mut reader = LogReader::new(&url)?;
            if let Some(p) = &ca_file {
                reader = reader.ca_file(p)?;
            }
            if let Some(t) = &token {
                reader = reader.token(t.clone());
            }
            let not_json = |e: serde_json::Error| {
                Failure::Client(Error::Log(ivy_client_native::LogError { status: None, message: format!("/channels is not JSON: {e}") }))
            };
            let mut after = after;
            let mut out = std::io::stdout().lock();
            loop {
                let body = interruptible(async { Ok(reader.channels(&prefix, after.as_deref(), limit).await?) }).await?;
                let page: serde_json::Value = serde_json::from_str(&body).map_err(not_json)?;
                for c in page["channels"].as_array().into_iter().flatten() {
                    let line = if json {
                        c.to_string()
                    } else {
                        let newest = c["newest"].as_str().unwrap_or("-");
                        format!("{} {} {newest}", c["path"].as_str().unwrap_or_default(), c["subscribers"])
                    };
                    if writeln!(out, "{line}").is_err() {
                        return Ok(()); // stdout closed
                    }
                }
                match page["next"].as_str() {
                    Some(next) if after.as_deref() != Some(next) => after = Some(next.to_string()),
                    _ => break,
                }
            }
            let _ = out.flush();
            Ok(())
        }
        Command::Admin { api_key, action } => {
            let mut reader = LogReader::new(&url)?;
            if let Some(p) = &ca_file {
                reader = reader.ca_file(p)?;
            }
            let (what, body) = match action {
                AdminAction::Disconnect { sub } => ("disconnect", Some(serde_json::json!({ "sub": sub }).to_string())),
                AdminAction::Revoke { jti, until: Some(until) } => {
                    ("revoke", Some(serde_json::json!({ "jti": jti, "until": until }).to_string()))
                }
                AdminAction::Revoke { jti, until: None } => ("revoke", Some(serde_json::json!({ "jti": jti }).to_string())),
                AdminAction::Revocations => ("revocations", None),
            };
            let answer = interruptible(async { Ok(reader.admin(what, &api_key, body).await?) }).await?;
            println!("{}", answer.trim_end());
            Ok(())
        }
        Command::Time { human: as_date } => {
            let t = interruptible(async {
                let client = builder().connect().await?;
                let t = client.timestamp().await;
                client.close().await;
                Ok(t?)
            })
            .await?;
            println!("{}", if as_date { human(t) } else { t.to_string() });
            Ok(())
        }
        Command::Send { path, data: Some(data), retry_for } => {
            let client = interruptible(async { Ok(builder().backoff(SEND_BACKOFF.0, SEND_BACKOFF.1).connect().await?) }).await?;
            report_connection(&client, url, cli.quiet);
            let t = interruptible(send_within(&client, &path, &data, retry_for)).await;
            client.close().await;
            println!("{}", t?);
            Ok(())
        }
        Command::Send { path, data: None, retry_for } => {
            let client = interruptible(async { Ok(builder().backoff(SEND_BACKOFF.0, SEND_BACKOFF.1).connect().await?) }).await?;
            report_connection(&client, url, cli.quiet);
            let result = send_lines(&client, &path, retry_for).await;
            client.close().await;
            result
        }
        Command::Who { path, json } => {
            let view = interruptible(async {
                let client = builder().connect().await?;
                let v = client.who(&path).await;
                client.close().await;
                Ok(v?)
            })
            .await?;
            let mut out = std::io::stdout().lock();
            let terminal = out.is_terminal();
            let mut text = String::new();
            if json {
                text.push_str(&view_json(&view).to_string());
                text.push('\n');
            } else {
                for m in &view.members {
                    text.push_str(&member_text(m, true));
                    text.push('\n');
                }
                let n = view.count;
                text.push_str(&format!("# {n} member{}", if n == 1 { "" } else { "s" }));
                if !view.complete {
                    text.push_str(" (estimated; channels above the server's --presence-max-list are not listed)");
                }
                text.push('\n');
            }
            let bytes = if terminal { for_terminal(text.as_bytes()) } else { text.into_bytes() };
            let _ = out.write_all(&bytes);
            let _ = out.flush();
            Ok(())
        }
        Command::Sub { paths, from_beginning, after, count, presence, format } => {
            let start = match (from_beginning, after) {
                (true, _) => Start::Beginning,
                (false, Some(t)) => Start::After(t),
                (false, None) => Start::Now,
            };
            let (client, mut streams) = interruptible(async {
                let client = builder().retry_initial_connect(false).senders(format.senders).connect().await?;
                let mut streams: SelectAll<std::pin::Pin<Box<dyn futures_util::Stream<Item = Item> + Send>>> = SelectAll::new();
                for p in &paths {
                    streams.push(Box::pin(client.subscribe_from(p, start).await?.map(Item::Event)));
                }
                if presence {
                    for p in &paths {
                        let path = p.clone();
                        streams.push(Box::pin(client.presence(p).await?.map(move |e| Item::Presence(path.clone(), e))));
                    }
                }
                Ok((client, streams))
            })
            .await?;
            report_connection(&client, url, cli.quiet);
            let mut printed = 0u64;
            let mut out = std::io::stdout();
            let terminal = out.is_terminal();
            let closed = stdout_closed();
            tokio::pin!(closed);
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            let mut result = Ok(());
            while count.is_none_or(|c| printed < c) {
                let item = tokio::select! {
                    item = streams.next() => item,
                    _ = &mut ctrl_c => {
                        result = Err(Failure::Interrupted);
                        break;
                    }
                    () = &mut closed => break,
                };
                match item {
                    None => {
                        result = Err(Failure::Ended(client.last_connect_error()));
                        break;
                    }
                    Some(Item::Presence(_, PresenceEvent::Failed(ClientError::Unauthorized))) => {
                        result = Err(Failure::Unauthorized(client.unauthorized_reason().unwrap_or_else(|| "no reason given".into())));
                        break;
                    }
                    Some(Item::Presence(path, PresenceEvent::Failed(e))) => {
                        eprintln!("ivy: presence of {path} refused");
                        result = Err(Error::Request(e).into());
                        break;
                    }
                    Some(Item::Presence(path, PresenceEvent::Ended(reason))) => {
                        eprintln!("ivy: presence of {path} ended by the server: {reason}")
                    }
                    Some(Item::Presence(path, e)) => {
                        if out.write_all(&render_presence(&path, &e, format.json, terminal)).and_then(|()| out.flush()).is_err() {
                            break; // stdout closed
                        }
                    }
                    Some(Item::Event(item)) => match item {
                        Ok(e) => {
                            if out.write_all(&render(&e, format, terminal)).and_then(|()| out.flush()).is_err() {
                                break; // stdout closed
                            }
                            printed += 1;
                        }
                        Err(e @ SubscriptionError::ContinuityLost { .. }) => eprintln!("ivy: warning: {e}"),
                        Err(SubscriptionError::Refused(ClientError::Unauthorized)) => {
                            result = Err(Failure::Unauthorized(client.unauthorized_reason().unwrap_or_else(|| "no reason given".into())));
                            break;
                        }
                        // The others go on.
                        Err(e @ SubscriptionError::Ended(_)) => eprintln!("ivy: {e}"),
                        Err(SubscriptionError::Refused(e)) => {
                            result = Err(Error::Request(e).into());
                            break;
                        }
                    },
                }
            }
            client.close().await;
            result
        }
    }
}

/// `ivy send`'s reconnect backoff: a restarted server is found again within a few seconds.
const SEND_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// One send, waiting for its ack (across reconnects: the client resends it with its id) at
/// most `retry_for`.
async fn send_within(client: &Client, path: &str, data: &str, retry_for: Duration) -> Result<Timestamp, Failure> {
    match tokio::time::timeout(retry_for, client.send(path, data)).await {
        Ok(t) => Ok(t?),
        Err(_) => Err(Failure::GaveUp(retry_for)),
    }
}

/// Sends each line of standard input as an event as soon as it is read, with up to 256 in
/// flight, printing the timestamps in order as their acks arrive. At Ctrl-C it stops reading,
/// waits for the acks of the sends already made (printing them), and fails with
/// [`Failure::Interrupted`]; a second Ctrl-C ends it at once.
async fn send_lines(client: &Client, path: &str, retry_for: Duration) -> Result<(), Failure> {
    const IN_FLIGHT: usize = 256;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut in_flight = FuturesOrdered::new();
    let mut out = std::io::stdout();
    let mut reading = true;
    let mut interrupted = false;
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    while reading || !in_flight.is_empty() {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => {
                if interrupted {
                    return Err(Failure::Interrupted);
                }
                interrupted = true;
                reading = false;
                ctrl_c = Box::pin(tokio::signal::ctrl_c());
                if !in_flight.is_empty() {
                    eprintln!("ivy: interrupted; waiting for {} send(s) in flight (Ctrl-C again to quit at once)", in_flight.len());
                }
            }
            Some(r) = in_flight.next(), if !in_flight.is_empty() => match r {
                Ok(t) => {
                    if writeln!(out, "{t}").and_then(|()| out.flush()).is_err() {
                        return Ok(()); // stdout closed
                    }
                }
                Err(e) => return Err(e),
            },
            line = lines.next_line(), if reading && in_flight.len() < IN_FLIGHT => match line {
                Ok(Some(l)) => {
                    let c = client.clone();
                    let p = path.to_string();
                    in_flight.push_back(async move { send_within(&c, &p, &l, retry_for).await });
                }
                Ok(None) => reading = false,
                Err(e) => return Err(Failure::Stdin(e)),
            },
        }
    }
    if interrupted { Err(Failure::Interrupted) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            ts: Timestamp::new(1_796_174_976, 891_611_992).unwrap(),
            path: "/a/b".into(),
            data: data.as_bytes().to_vec().into(),
            sender: None,
        }
    }

    const LINE: Format = Format { json: false, raw: false, senders: false };
    const JSON: Format = Format { json: true, raw: false, senders: false };
    const RAW: Format = Format { json: false, raw: true, senders: false };

    #[test]
    fn presence_renders_as_documented() {
        let ada = Member { id: MemberId::Sub("ada l\n%".into()), info: Some(r#"{"nick":"Ada"}"#.into()), conns: 2 };
        let anon = Member { id: MemberId::Anon("9f3c0a1b2c3d4e5f".into()), info: None, conns: 1 };
        let view = PresenceView { path: "/r".into(), count: 2, members: vec![ada.clone(), anon.clone()], complete: true };
        let text = |e: &PresenceEvent| String::from_utf8(render_presence("/r", e, false, false)).unwrap();
        assert_eq!(
            text(&PresenceEvent::Snapshot(view.clone())),
            "^=/r =ada%20l%0A%25 2 {\"nick\":\"Ada\"}\n^=/r -9f3c0a1b2c3d4e5f 1\n^#/r 2\n"
        );
        assert_eq!(text(&PresenceEvent::Join(anon.clone())), "^+/r -9f3c0a1b2c3d4e5f 1\n");
        assert_eq!(text(&PresenceEvent::Leave(Member { conns: 0, ..ada.clone() })), "^-/r =ada%20l%0A%25\n");
        assert_eq!(text(&PresenceEvent::Count(7)), "^#/r 7\n");
        let json = |e: &PresenceEvent| serde_json::from_slice::<serde_json::Value>(&render_presence("/r", e, true, false)).unwrap();
        assert_eq!(
            json(&PresenceEvent::Snapshot(view.clone())),
            serde_json::json!({"presence": "snapshot", "path": "/r", "count": 2, "complete": true, "members": [
                {"sub": "ada l\n%", "info": {"nick": "Ada"}, "conns": 2}, {"anon": "9f3c0a1b2c3d4e5f", "conns": 1}]})
        );
        assert_eq!(
            json(&PresenceEvent::Join(ada)),
            serde_json::json!({"presence": "join", "path": "/r", "member": {"sub": "ada l\n%", "info": {"nick": "Ada"}}})
        );
        assert_eq!(json(&PresenceEvent::Count(0)), serde_json::json!({"presence": "count", "path": "/r", "count": 0}));
        assert_eq!(view_json(&view)["members"][1], serde_json::json!({"anon": "9f3c0a1b2c3d4e5f", "conns": 1}));
        // A terminal gets no control characters from a member's info.
        let evil = Member { id: MemberId::Sub("x".into()), info: Some("{\"n\":\"\u{202E}\"}".into()), conns: 1 };
        assert!(!String::from_utf8(render_presence("/r", &PresenceEvent::Join(evil), false, true)).unwrap().contains('\u{202E}'));
    }

    #[test]
    fn senders_render_in_lines_and_json() {
        let s = |v: Vec<u8>| String::from_utf8(v).unwrap();
        let with = |sender| Event { sender: Some(sender), ..event("hi") };
        assert_eq!(s(render(&with(Sender::User("a:b".into())), LINE, false)), "@1796174976.891611992~=a%3Ab:/a/b:hi\n");
        assert_eq!(s(render(&with(Sender::Anonymous), LINE, false)), "@1796174976.891611992~-:/a/b:hi\n");
        let json = |e: &Event| serde_json::from_str::<serde_json::Value>(&s(render(e, JSON, false))).unwrap()["sender"].clone();
        assert_eq!(json(&with(Sender::User("a:b\n".into()))), serde_json::json!({"sub": "a:b\n"}));
        assert_eq!(json(&with(Sender::Anonymous)), serde_json::json!("anonymous"));
        assert_eq!(json(&with(Sender::Application)), serde_json::json!("application"));
        assert_eq!(json(&with(Sender::Unknown)), serde_json::json!("unknown"));
        assert_eq!(json(&event("hi")), serde_json::Value::Null, "no field without --senders");
        assert_eq!(s(render(&with(Sender::Anonymous), RAW, false)), "hi\n");
    }

    #[test]
    fn a_terminal_gets_no_control_or_reordering_characters() {
        let plain = "@1.000000000:/a:hello wörld 👋 50%25".as_bytes();
        assert_eq!(for_terminal(plain), plain, "printable text is unchanged");
        let hostile = "@1.000000000:/a:\u{1b}[2J\u{7}x\u{202E}gnp.exe\u{200B}\r\u{85}".as_bytes();
        assert_eq!(String::from_utf8(for_terminal(hostile)).unwrap(), "@1.000000000:/a:%1B[2J%07x%E2%80%AEgnp.exe%E2%80%8B%0D%C2%85");
    }

    #[test]
    fn events_render_as_lines_json_and_raw_data() {
        let e = event("say \"hi\"\n100% \u{1b}[2J\u{202E}");
        let s = |v: Vec<u8>| String::from_utf8(v).unwrap();
        assert_eq!(s(render(&e, LINE, false)), "@1796174976.891611992:/a/b:say \"hi\"%0A100%25 \u{1b}[2J\u{202E}\n");
        assert_eq!(s(render(&e, RAW, false)), "say \"hi\"\n100% \u{1b}[2J\u{202E}\n");
        let json = s(render(&e, JSON, false));
        assert_eq!(json, "{\"ts\":\"1796174976.891611992\",\"path\":\"/a/b\",\"data\":\"say \\\"hi\\\"\\n100% \\u001b[2J\u{202E}\"}\n");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["data"], "say \"hi\"\n100% \u{1b}[2J\u{202E}");
        // On a terminal the JSON stays valid JSON with the same value.
        let on_terminal = s(render(&e, JSON, true));
        assert!(!on_terminal.contains('\u{202E}'), "{on_terminal}");
        let v2: serde_json::Value = serde_json::from_str(&on_terminal).unwrap();
        assert_eq!(v2, v);
        assert_eq!(s(render(&e, RAW, true)), "say \"hi\"%0A100% %1B[2J%E2%80%AE\n");
    }

    #[test]
    fn timestamps_in_human_form() {
        assert_eq!(human(Timestamp::new(1_796_174_976, 891_611_992).unwrap()), "2026-12-02T01:29:36.891611992Z");
        assert_eq!(human(Timestamp::ZERO), "1970-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn usage_errors_are_caught_by_the_parser() {
        use clap::error::ErrorKind;
        let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("ivy").chain(args.iter().copied()));
        assert!(parse(&["send", "/a", "x"]).is_ok());
        assert!(parse(&["pub", "/a", "x"]).is_ok(), "pub is send");
        assert_eq!(parse(&["send", "/Bad", "x"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert!(parse(&["--url", "wss://x", "time"]).is_ok(), "wss:// is TLS");
        assert_eq!(parse(&["--url", "ftp://x", "time"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert_eq!(parse(&["log", "/a", "-n", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert_eq!(parse(&["log", "/a", "--limit", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert_eq!(parse(&["sub", "/a", "--count", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert_eq!(parse(&["log", "/a", "--json", "--raw"]).unwrap_err().kind(), ErrorKind::ArgumentConflict);
        assert!(parse(&["channels", "--prefix", "/chat", "--limit", "1000", "--json"]).is_ok());
        assert_eq!(parse(&["channels", "--limit", "0"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert_eq!(parse(&["channels", "--prefix", "/Bad"]).unwrap_err().kind(), ErrorKind::ValueValidation);
        assert!(parse(&["admin", "--api-key", "k", "revoke", "j1", "--until", "1800000000"]).is_ok());
        assert!(parse(&["admin", "--api-key", "k", "disconnect", "ada"]).is_ok());
        assert_eq!(parse(&["admin", "--api-key", "k", "ban", "ada"]).unwrap_err().kind(), ErrorKind::InvalidSubcommand);
    }
}
