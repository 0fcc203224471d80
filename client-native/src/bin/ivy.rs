//! `ivy`: the command-line client.
//!
//! Exit codes: 0 success; 1 a request failed (refused by the server, lost, timed out), the log
//! options are invalid (`-n 0`) or standard input cannot be read; 2 bad usage; 3 cannot
//! connect to the server.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, SelectAll};
use ivy_client_native::{Client, Error, Event, LogQuery, LogQueryError, Start, SubscriptionError, Timestamp};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(name = "ivy", version, about = "Command-line client for Ivy, the hierarchical pub/sub server with persistent event logs")]
struct Cli {
    /// The server's base URL; the WebSocket (/ws) and log (/log/...) endpoints are derived
    /// from it.
    #[arg(long, global = true, env = "IVY_URL", default_value = "ws://127.0.0.1:8080")]
    url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the events of channels (and their descendants) as they arrive, one line each in
    /// the wire format `@TIMESTAMP:/path:data` (data escaped: `%` as %25, newline as %0A).
    /// Follows reconnects and server restarts without gaps or repeats.
    Sub {
        /// Channels to subscribe to. An event matching several is printed once per channel.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Start with the whole history of each channel.
        #[arg(long, conflicts_with = "after")]
        from_beginning: bool,
        /// Start after this timestamp (for example the last one printed by a previous run).
        #[arg(long)]
        after: Option<Timestamp>,
        /// Exit after printing this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publish an event and print its timestamp. Without DATA, publish each line of standard
    /// input as one event (printing one timestamp per line, in order).
    Send {
        /// Channel path.
        path: String,
        /// Event data.
        data: Option<String>,
    },
    /// Print a channel's stored events (its whole subtree), oldest first.
    Log {
        /// Channel path.
        path: String,
        /// Only events after this timestamp.
        #[arg(long)]
        after: Option<Timestamp>,
        /// At most this many events (capped by the server).
        #[arg(long)]
        limit: Option<u32>,
        /// Only the last N events.
        #[arg(short = 'n', long = "last", conflicts_with_all = ["after", "limit"])]
        last: Option<u64>,
    },
    /// Print the server's current time.
    Time,
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The client: a bad URL, no connection, a refused or lost request.
    Client(Error),
    /// The log options given (`-n 0`, `--limit 0`), checked as the server checks a query.
    Query(LogQueryError),
    /// Standard input could not be read (`ivy send` without DATA).
    Stdin(std::io::Error),
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
        }
    }
}

fn fail(e: &Failure) -> ExitCode {
    eprintln!("ivy: {e}");
    match e {
        Failure::Client(Error::Connect(_) | Error::InvalidUrl(_)) => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "ivy_client_native=error".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// An event as its wire line and a newline. For a terminal (`terminal`), control characters and
/// the invisible or reordering Unicode formatting characters (bidi overrides and isolates,
/// zero-width characters) are also written as `%XX` escapes of their bytes: a publisher must not
/// be able to move a subscriber's cursor, recolour or rewrite their screen, or disguise text.
/// (`%` itself is always escaped, as `%25`, so these escapes are unambiguous.) Pipes and files
/// get the exact wire line.
fn line(e: &Event, terminal: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(e.encoded_len() + 1);
    e.encode(&mut v);
    if terminal {
        v = for_terminal(&v);
    }
    v.push(b'\n');
    v
}

/// See [`line`].
fn for_terminal(line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let mut out = Vec::with_capacity(line.len());
    for c in text.chars() {
        let dangerous =
            c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
        let mut buf = [0u8; 4];
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        if dangerous {
            for b in bytes {
                out.extend_from_slice(format!("%{b:02X}").as_bytes());
            }
        } else {
            out.extend_from_slice(bytes);
        }
    }
    out
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Log { path, after, limit, last } => {
            let client = Client::builder(&cli.url).retry_initial_connect(false);
            // The log needs no WebSocket, but connecting validates the URL and the server.
            let client = client.connect().await?;
            let query = LogQuery::from_parts(last, after, limit.map(u64::from)).map_err(Failure::Query)?;
            let events = client.log(&path, query).await?;
            let mut out = std::io::stdout().lock();
            let terminal = out.is_terminal();
            for e in &events {
                let _ = out.write_all(&line(e, terminal));
            }
            let _ = out.flush();
            client.close().await;
            Ok(())
        }
        Command::Time => {
            let client = Client::connect(&cli.url).await?;
            let t = client.timestamp().await?;
            println!("{t}");
            client.close().await;
            Ok(())
        }
        Command::Send { path, data } => {
            let client = Client::connect(&cli.url).await?;
            let result = match data {
                Some(d) => client.send(&path, &d).await.map(|t| println!("{t}")).map_err(Failure::from),
                None => send_lines(&client, &path).await,
            };
            client.close().await;
            result
        }
        Command::Sub { paths, from_beginning, after, count } => {
            let client = Client::builder(&cli.url).retry_initial_connect(false).connect().await?;
            let start = match (from_beginning, after) {
                (true, _) => Start::Beginning,
                (false, Some(t)) => Start::After(t),
                (false, None) => Start::Now,
            };
            let mut streams = SelectAll::new();
            for p in &paths {
                streams.push(client.subscribe_from(p, start).await?);
            }
            let mut state = client.state();
            tokio::spawn(async move {
                while state.changed().await.is_ok() {
                    let s = *state.borrow_and_update();
                    tracing::info!(?s, "connection state");
                }
            });
            let mut printed = 0u64;
            let mut out = std::io::stdout();
            let terminal = out.is_terminal();
            while count.is_none_or(|c| printed < c) {
                let item = tokio::select! {
                    item = streams.next() => item,
                    _ = tokio::signal::ctrl_c() => break,
                };
                match item {
                    None => break,
                    Some(Ok(e)) => {
                        if out.write_all(&line(&e, terminal)).and_then(|()| out.flush()).is_err() {
                            break; // stdout closed
                        }
                        printed += 1;
                    }
                    Some(Err(e @ SubscriptionError::ContinuityLost { .. })) => eprintln!("ivy: warning: {e}"),
                    Some(Err(SubscriptionError::Refused(e))) => {
                        client.close().await;
                        return Err(Error::Request(e).into());
                    }
                }
            }
            client.close().await;
            Ok(())
        }
    }
}

/// Sends each stdin line as an event, with up to 256 in flight, printing timestamps in order.
async fn send_lines(client: &Client, path: &str) -> Result<(), Failure> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut in_flight = FuturesOrdered::new();
    let mut out = std::io::stdout();
    let mut eof = false;
    loop {
        while !eof && in_flight.len() < 256 {
            match lines.next_line().await {
                Ok(Some(l)) => {
                    let c = client.clone();
                    let p = path.to_string();
                    in_flight.push_back(async move { c.send(&p, &l).await });
                }
                Ok(None) => eof = true,
                Err(e) => return Err(Failure::Stdin(e)),
            }
        }
        match in_flight.next().await {
            Some(Ok(t)) => {
                let _ = writeln!(out, "{t}");
            }
            Some(Err(e)) => return Err(e.into()),
            None if eof => break,
            None => {}
        }
    }
    let _ = out.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_gets_no_control_or_reordering_characters() {
        let plain = "@1.000000000:/a:hello wörld 👋 50%25".as_bytes();
        assert_eq!(for_terminal(plain), plain, "printable text is unchanged");
        let hostile = "@1.000000000:/a:\u{1b}[2J\u{7}x\u{202E}gnp.exe\u{200B}\r\u{85}".as_bytes();
        assert_eq!(String::from_utf8(for_terminal(hostile)).unwrap(), "@1.000000000:/a:%1B[2J%07x%E2%80%AEgnp.exe%E2%80%8B%0D%C2%85");
    }
}
