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
//! use std::num::NonZeroU64;
//!
//! use futures_util::StreamExt;
//! use ivy_client_native::{Client, LogQuery, Start};
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
//! let first_page = LogQuery::Page { after: None, limit: NonZeroU64::new(100) };
//! let page = client.log("/chat", first_page).await?;
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
//! is accepted as a synonym. `wss://` (or `https://`) connects over TLS (rustls, with the
//! `ring` provider), trusting the system's root certificates (as found by
//! `rustls-native-certs`) and, with [`ClientBuilder::ca_file`] or [`LogReader::ca_file`], a
//! private certificate authority as well. A refused server certificate (not signed by a
//! trusted CA, not valid for the host name, expired) is [`Error::Tls`], and is not retried.
//!
//! With auth on (`docs/PROTOCOL.md` 2.5), [`ClientBuilder::token`] gives a token (a JWT) and
//! [`ClientBuilder::token_provider`] an async source of fresh ones: the client refreshes the
//! token in-band ahead of its expiry (the connection outlives its tokens), asks the provider
//! once after the server refused it (401, 4003), and otherwise ends in
//! [`ConnState::Unauthorized`] rather than reconnecting forever. A subscription that a
//! refreshed token no longer covers ends with [`SubscriptionError::Ended`].
//!
//! Presence (the server's extension, `docs/PROTOCOL.md` 5.10): [`Client::presence`] watches
//! who is subscribed at a path or below, as a [`PresenceStream`] of [`PresenceEvent`]s (the
//! first snapshot, then joins, leaves and the count, resynchronised after each reconnect so
//! that only real changes come out) with the view they build; [`Client::who`] asks once.
//!
//! Errors are types to branch on, not messages to parse: [`Error`] says what failed (the URL,
//! the first connection with the HTTP status of a refused handshake, a request, a log read),
//! [`ClientError`] why a request failed (with the server's [`ServerCode`]), and
//! [`Error::is_uncertain`] whether a failed send may nevertheless have been stored.
//!
//! **Sends survive a dropped connection.** Every send carries an id (`docs/PROTOCOL.md` 5.9:
//! this client's random instance, read from the operating system's random source, and a
//! counter); when the connection drops (or a reply does not come in time) before a send's ack,
//! the client resends it with the same id after it reconnects, in the order the sends were
//! made, and the server, which stores an id at most once, answers a repeat with the first's
//! timestamp. So [`Client::send`] resolves with the event's timestamp, once, across
//! disconnects and server restarts; it fails uncertain ([`Error::is_uncertain`],
//! [`ClientError::WindowPassed`]) only when it could not be resent within the server's
//! idempotency window ([`ClientBuilder::idempotency_window`], 10 minutes by default), for
//! example with the server down that long. Against an older server without send ids the client
//! falls back to plain sends, whose lost acks are uncertain ([`ClientError::ConnectionLost`]).
//!
//! What this crate is not: it does not persist subscription cursors (use
//! [`Client::subscribe_from`] with the last timestamp you processed to resume after a restart
//! of your program), nor the sends awaiting their ack (a send in flight when your program
//! exits may or may not be stored).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use ivy_client_core as ivy_core;
use ivy_core::client::{self, Action, ClientEvent, RequestId, SubId, WatchId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

pub use ivy_core::client::{ClientError, Config, PresenceEvent, PresenceView, ServerCode, Start, SubscriptionError};
pub use ivy_core::presence::{Member, MemberId};

/// The state of a [`Client`]'s connection ([`Client::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Not started yet.
    Idle,
    /// A connection attempt is under way; `attempt` counts the failures since the last
    /// connection (the loss of a connection counts as one: the first reconnect is attempt 1).
    Connecting {
        /// Failures before this attempt.
        attempt: u32,
    },
    /// Connected.
    Connected,
    /// Waiting until `retry_at` before the next attempt (a random delay within the backoff).
    Reconnecting {
        /// Failures so far.
        attempt: u32,
        /// When the next attempt starts.
        retry_at: Instant,
    },
    /// [`Client::close`] was called, or every handle was dropped.
    Closed,
    /// The server refused the token (a 401 at the handshake, or a close with 4003 at its
    /// expiry) and the [token provider](ClientBuilder::token_provider) is being asked for a
    /// fresh one; the next attempt starts when it answers.
    AwaitingToken,
    /// Terminal: the server refused the token and no fresh one came (no provider, the
    /// provider returned `None`, or the fresh token was refused too). The client makes no
    /// more connection attempts; requests fail with [`ClientError::Unauthorized`], the
    /// subscriptions ended with [`SubscriptionError::Refused`]`(`[`ClientError::Unauthorized`]`)`,
    /// and [`Client::unauthorized_reason`] says why. Build a new client with a valid token.
    Unauthorized,
}
pub use ivy_core::http::{Endpoints, LogQuery, LogQueryError, UrlError};
pub use ivy_core::wire::Sender;
pub use ivy_core::{ErrorCode, Timestamp};

/// An event as delivered: its timestamp, normalized path and data, and with
/// [`ClientBuilder::senders`] its verified sender ([`Event::sender`](ivy_core::wire::Event::sender)).
pub type Event = ivy_core::Event<'static>;

/// Errors of this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The URL cannot be used: not `ws://host[:port][/prefix]` or `wss://...` (or `http://...`,
    /// `https://...`). Nothing was attempted; fix the URL.
    InvalidUrl(UrlError),
    /// The first connection failed (see [`ClientBuilder::retry_initial_connect`]): the server
    /// is unreachable, or it refused the handshake ([`ConnectError::status`]). Also from
    /// [`LogReader::log`] when no TCP connection to the server could be made.
    Connect(ConnectError),
    /// TLS failed: the CA file cannot be used ([`TlsErrorKind::CaFile`], nothing was
    /// attempted), the server's certificate was refused ([`TlsErrorKind::Certificate`]: not
    /// retried, since trying again cannot help), or the handshake failed otherwise
    /// ([`TlsErrorKind::Handshake`]). From [`ClientBuilder::connect`] and [`LogReader::log`].
    Tls(TlsError),
    /// A request failed; see [`ClientError`] for what the caller should do, and
    /// [`Error::is_uncertain`].
    Request(ClientError),
    /// A log request failed: the server answered with an error status, or the request or
    /// its body failed. Reading the log has no side effect: retrying is safe.
    Log(LogError),
    /// The client is closed.
    Closed,
}

impl Error {
    /// Whether a failed send may nevertheless have been stored ([`ClientError::is_uncertain`]):
    /// its ack was lost and it could not be resent within the idempotency window
    /// ([`ClientError::WindowPassed`]), or, against an older server without send ids, the
    /// connection dropped or no reply came in time. Look for it in the log before sending it
    /// again. False for every other error, after which nothing was stored.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, Error::Request(e) if e.is_uncertain())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(e) => e.fmt(f),
            Error::Connect(e) => write!(f, "cannot connect: {e}"),
            Error::Tls(e) => e.fmt(f),
            Error::Request(e) => e.fmt(f),
            Error::Log(e) => write!(f, "log request failed: {e}"),
            Error::Closed => f.write_str("client closed"),
        }
    }
}

impl std::error::Error for Error {}

/// Why the first connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    /// The HTTP status with which the server refused the WebSocket handshake (for example
    /// 403 for an origin it does not allow, 503 when it holds its maximum of connections);
    /// `None` when the server could not be reached or the attempt failed otherwise.
    pub status: Option<u16>,
    /// What happened.
    pub message: String,
}

impl ConnectError {
    fn from_ws(e: &tungstenite::Error) -> ConnectError {
        match e {
            tungstenite::Error::Http(response) => {
                let status = response.status().as_u16();
                // The server's one-line reason (for example why a token was refused).
                let reason = response.body().as_deref().map(String::from_utf8_lossy).map(|b| b.trim_end().to_string());
                let message = match reason.filter(|r| !r.is_empty() && !r.contains('\n')) {
                    Some(r) => format!("HTTP {status}: {r}"),
                    None => e.to_string(),
                };
                ConnectError { status: Some(status), message }
            }
            _ => ConnectError { status: None, message: e.to_string() },
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

/// What kind of TLS failure a [`TlsError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// The CA file ([`ClientBuilder::ca_file`]) cannot be read or holds no PEM certificate.
    CaFile,
    /// The server's certificate was refused: not signed by a trusted certificate authority,
    /// not valid for the host name of the URL, expired or not yet valid. The client does not
    /// retry: a [`Client`] that was connected closes ([`ConnState::Closed`]).
    Certificate,
    /// The TLS handshake failed otherwise (for example the server does not speak TLS on that
    /// port). Retried like a network failure.
    Handshake,
}

/// Why TLS failed ([`Error::Tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// What failed.
    pub kind: TlsErrorKind,
    /// What happened, naming the cause (and the file or host).
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    /// The TLS failure among the causes of `e`, if any, as seen connecting to `host`.
    fn find(host: &str, e: &(dyn std::error::Error + 'static)) -> Option<TlsError> {
        let rustls = find_rustls(e)?;
        let (kind, why) = match rustls {
            rustls::Error::InvalidCertificate(c) => {
                let why = match c {
                    rustls::CertificateError::UnknownIssuer => "the server's certificate is not signed by a trusted certificate authority \
                        (UnknownIssuer; for a private CA, pass its certificate with --ca-file or ca_file)"
                        .to_string(),
                    rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. } => {
                        format!("the server's certificate is not valid for the host name {host} ({c:?})")
                    }
                    rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                        format!("the server's certificate has expired ({c:?})")
                    }
                    rustls::CertificateError::NotValidYet | rustls::CertificateError::NotValidYetContext { .. } => {
                        format!("the server's certificate is not valid yet ({c:?})")
                    }
                    rustls::CertificateError::BadSignature => "the server's certificate is not signed by a trusted certificate \
                        authority: its signature does not verify with the trusted CA of that name (BadSignature)"
                        .to_string(),
                    c if format!("{c:?}").contains("CaUsedAsEndEntity") => format!(
                        "the server's certificate is a CA certificate ({c:?}): a self-signed server certificate must say \
                         basicConstraints CA:FALSE"
                    ),
                    c => format!("the server's certificate was refused: {c:?}"),
                };
                (TlsErrorKind::Certificate, why)
            }
            e => (TlsErrorKind::Handshake, format!("{e} (does the server speak TLS on that port?)")),
        };
        Some(TlsError { kind, message: format!("TLS with {host} failed: {why}") })
    }
}

/// The rustls error among the causes of `e` (an `io::Error`'s own error included).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = find_rustls(inner) {
                return Some(r);
            }
        }
        next = e.source();
    }
    None
}

/// The TLS settings of a client: the system's roots, plus a private CA.
fn tls_config(tls: bool, ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if tls {
        roots = system_roots().clone();
    }
    if let Some(path) = ca_file {
        let failed =
            |why: String| TlsError { kind: TlsErrorKind::CaFile, message: format!("cannot use the CA file {}: {why}", path.display()) };
        let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(format!("not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(failed("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| failed(format!("a certificate in it cannot be used: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { kind: TlsErrorKind::Handshake, message: format!("TLS setup failed: {e}") })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The system's root certificates, loaded once per process.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "loading the system's root certificates");
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system root certificates");
        roots
    })
}

/// The host of an endpoint URL, for messages.
fn host_of(url: &str) -> String {
    url.parse::<hyper::Uri>().ok().and_then(|u| u.host().map(String::from)).unwrap_or_else(|| url.to_string())
}

/// Why a log request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError {
    /// The HTTP status when the server answered with one other than 200 (400 for an invalid
    /// path or query, 500 when it could not read its store); `None` when the request or its
    /// body failed, or the body could not be parsed.
    pub status: Option<u16>,
    /// With a status, the server's one-line reason (the response body); otherwise what failed.
    pub message: String,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for LogError {}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Error {
        match e {
            ClientError::Closed => Error::Closed,
            e => Error::Request(e),
        }
    }
}

/// Derives the endpoints from the base URL.
fn endpoints(url: &str) -> Result<Endpoints, Error> {
    Endpoints::from_base(url).map_err(Error::InvalidUrl)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Http = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

enum Cmd {
    Subscribe(String, Start, mpsc::Sender<Result<Event, SubscriptionError>>, oneshot::Sender<Result<u64, ClientError>>),
    Unsubscribe(u64, Option<oneshot::Sender<()>>),
    Send(String, String, oneshot::Sender<Result<Timestamp, ClientError>>),
    Time(oneshot::Sender<Result<Timestamp, ClientError>>),
    Watch(String, mpsc::UnboundedSender<PresenceEvent>, oneshot::Sender<Result<u64, ClientError>>),
    Unwatch(u64),
    Who(String, oneshot::Sender<Result<PresenceView, ClientError>>),
    Close(oneshot::Sender<()>),
}

/// Builder of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    config: Config,
    retry_initial: bool,
    buffer: usize,
    token: Option<Token>,
    ca_file: Option<PathBuf>,
    provider: Option<Provider>,
}

/// The application's source of fresh tokens ([`ClientBuilder::token_provider`]).
#[derive(Clone)]
struct Provider(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

/// What a [`Provider`] returns.
type TokenFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Provider")
    }
}

/// A bearer token, kept out of `Debug` output.
#[derive(Clone)]
struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The status of a handshake refused for want of a valid token: trying again with the same
/// token cannot help; the client asks its provider once, or stops.
const UNAUTHORIZED: u16 = 401;

/// The `exp` claim of a JWT (seconds since the Unix epoch), read from its payload without
/// verifying anything (the server verifies; the client only needs to know when to refresh).
/// `None` when the token is not a JWT or has no numeric `exp`.
pub fn token_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    // base64url (RFC 7515), unpadded as JWTs are, but padding tolerated.
    const B64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let payload = token.split('.').nth(1)?;
    let json = B64.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?;
    // A NumericDate may have a fraction (RFC 7519 section 2).
    exp.as_u64().or_else(|| exp.as_f64().filter(|e| e.is_finite() && *e >= 0.0).map(|e| e as u64))
}

/// `token` for the core: its expiry on the driver's clock, from its `exp`.
fn core_token(token: &str, now: client::Millis) -> client::Token {
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    client::Token::from_exp(token, token_expiry(token), unix_ms, now)
}

/// The default of [`ClientBuilder::subscription_buffer`].
pub const SUBSCRIPTION_BUFFER: usize = 10_000;

impl ClientBuilder {
    /// The state machine's tuning (backoff, timeouts, page size, offline queue), for example
    /// `Config::default().offline_queue(0).page_limit(500)`; each default is in its field's
    /// documentation.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Reconnect backoff bounds (defaults: 250 ms and 30 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config = self.config.min_backoff(millis(min)).max_backoff(millis(max));
        self
    }

    /// Silence after which the connection is probed, and how long the probe may take
    /// (defaults: 30 s and 10 s).
    pub fn keepalive(mut self, idle: Duration, probe_timeout: Duration) -> Self {
        self.config = self.config.idle_timeout(millis(idle)).probe_timeout(millis(probe_timeout));
        self
    }

    /// How many events a [`Subscription`] holds that the application has not taken yet
    /// (default [`SUBSCRIPTION_BUFFER`], at least 1). When it is full, the client stops taking
    /// that subscription's events from the server and, once the application has taken half of
    /// them, reads what it missed from the server's log: a slow consumer costs bounded memory
    /// and still gets every event once, in order (the other subscriptions are not held up).
    pub fn subscription_buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }

    /// How long a request (a send, a subscribe, a time request) may wait for its reply, and
    /// a send for a connection when offline (default 10 s). A send with no reply in time
    /// counts the connection as stuck: the client reconnects and resends it with its id.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config = self.config.request_timeout(millis(timeout));
        self
    }

    /// How long a connection attempt may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config = self.config.connect_timeout(millis(timeout));
        self
    }

    /// A token (a JWT from the application's backend, `docs/PROTOCOL.md` section 2.5) for a
    /// server with auth on: sent as `Authorization: Bearer` on the WebSocket handshake and
    /// on log reads. Without a [provider](ClientBuilder::token_provider), a refused token (a
    /// handshake answered 401: invalid, expired, or missing where one is needed; or a close
    /// with 4003 when it expires on a live connection) is not retried:
    /// [`ClientBuilder::connect`] returns [`Error::Connect`] with status 401, and a client
    /// that was connected ends in [`ConnState::Unauthorized`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into().into()));
        self
    }

    /// Ask for verified senders (**Extension** `ext=sender`, `docs/PROTOCOL.md` 6.1.1): every
    /// event, live or from the log, then carries who sent it ([`Event::sender`](ivy_core::wire::Event::sender):
    /// [`Sender::User`] with the sender's token `sub`, [`Sender::Anonymous`],
    /// [`Sender::Application`] or [`Sender::Unknown`]), as the server verified it. Default:
    /// false (`sender` is `None`). A server without the extension sends the original lines,
    /// and `sender` stays `None`.
    pub fn senders(mut self, on: bool) -> Self {
        self.config = self.config.senders(on);
        self
    }

    /// A PEM file of certificate authorities to trust for a `wss://` server, besides the
    /// system's roots (a private CA, or a self-signed server certificate). Read by
    /// [`ClientBuilder::connect`]: a file that cannot be read or holds no certificate is
    /// [`Error::Tls`] ([`TlsErrorKind::CaFile`]).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Where fresh tokens come from: an async function returning a token (a JWT), or `None`
    /// when it has none (for example the user signed out). The client reads each token's
    /// `exp` ([`token_expiry`]) and asks for a fresh one ahead of it (by the smaller of 30 s
    /// and a third of the token's lifetime), which it then sends in-band on the live
    /// connection (`&JWT`, `docs/PROTOCOL.md` 5.8), so that the connection outlives its
    /// tokens. When the server refuses the token (401 at the handshake, 4003), the provider is
    /// asked once more; if it returns `None`, or its token is refused too, the client ends in
    /// [`ConnState::Unauthorized`] instead of retrying. Without [`ClientBuilder::token`], the
    /// provider is asked for the first token before the first connection (if it has none, the
    /// client connects without a token). A provider that does not answer within the
    /// [request timeout](ClientBuilder::request_timeout) counts as having none.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), ivy_client_native::Error> {
    /// async fn fetch_token_from_backend() -> Option<String> { None }
    /// let client = ivy_client_native::Client::builder("ws://127.0.0.1:8080")
    ///     .token_provider(|| async { fetch_token_from_backend().await })
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn token_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        self.provider = Some(Provider(Arc::new(move || Box::pin(provider()))));
        self
    }

    /// How long after a send was first written the client may still resend it with its id
    /// when its ack was lost ([`Config::idempotency_window`]): at most the server's
    /// `--idempotency-window` (default 10 minutes, the server's default). Past it, the send
    /// fails with [`ClientError::WindowPassed`] (uncertain). Zero: never resend.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.config = self.config.idempotency_window(millis(window));
        self
    }

    /// Keep trying when the very first connection fails, instead of returning
    /// [`Error::Connect`] (default: false).
    pub fn retry_initial_connect(mut self, retry: bool) -> Self {
        self.retry_initial = retry;
        self
    }

    /// Starts the client and waits for the first connection.
    pub async fn connect(mut self) -> Result<Client, Error> {
        let mut logs = LogReader::new(&self.url)?;
        // The provider may have to give the first token (before the first connection).
        if self.token.is_none() {
            if let Some(Provider(p)) = &self.provider {
                let wait = Duration::from_millis(self.config.request_timeout);
                self.token = tokio::time::timeout(wait, p()).await.ok().flatten().map(|t| Token(t.into()));
            }
        }
        if let Some(path) = &self.ca_file {
            logs = logs.ca_file(path)?;
        }
        logs.token = Arc::new(Mutex::new(self.token.clone()));
        logs.senders = self.config.senders;
        let (endpoints, http, tls) = (logs.endpoints.clone(), logs.http.clone(), logs.tls.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, mut state_rx) = watch::channel(ConnState::Idle);
        let (connections_tx, connections) = watch::channel(0u64);
        let last_error = Arc::new(Mutex::new(None::<Error>));
        // A write that cannot complete (a peer that stopped reading, a half-open TCP
        // connection) must not stall the driver past the dead-connection deadline.
        let write_timeout = Duration::from_millis(self.config.probe_timeout.max(1000));
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let buffer = self.buffer;
        let senders = self.config.senders;
        let unauthorized = Arc::new(Mutex::new(None::<String>));
        let epoch = Instant::now();
        // The send ids' instance: from the operating system's random source (the time and the
        // process id only if that fails, which it does not on the supported platforms).
        let mut instance = [0u8; 12];
        if getrandom::fill(&mut instance).is_err() {
            instance[..8].copy_from_slice(&seed.to_le_bytes());
            instance[8..].copy_from_slice(&std::process::id().to_le_bytes());
        }
        let config = self.config.token_provider(self.provider.is_some()).instance(instance);
        let mut core = client::Client::new(config, seed ^ u64::from(std::process::id()));
        if let Some(Token(t)) = &self.token {
            core.set_token(0, core_token(t, 0));
        }
        let (token_tx, token_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            core,
            endpoints: endpoints.clone(),
            http: http.clone(),
            tls,
            senders,
            log_token: logs.token.clone(),
            provider: self.provider.clone(),
            token_tx,
            token_rx,
            unauthorized: unauthorized.clone(),
            epoch,
            write_timeout,
            state_tx,
            connections_tx,
            last_error: last_error.clone(),
            routes: HashMap::new(),
            by_core: HashMap::new(),
            next_handle: 0,
            resumes: FuturesUnordered::new(),
            sends: HashMap::new(),
            times: HashMap::new(),
            watches: HashMap::new(),
            whos: HashMap::new(),
        };
        tokio::spawn(driver.run(rx));
        let client = Client { tx, state: state_rx.clone(), connections, logs, buffer, last_error: last_error.clone(), unauthorized };
        loop {
            let state = *state_rx.borrow_and_update();
            match state {
                ConnState::Connected => return Ok(client),
                ConnState::Reconnecting { .. } if !self.retry_initial => {
                    let reason = last_error.lock().ok().and_then(|e| e.clone());
                    let reason =
                        reason.unwrap_or_else(|| Error::Connect(ConnectError { status: None, message: "connection failed".into() }));
                    client.close().await;
                    return Err(reason);
                }
                ConnState::Closed => {
                    // Closed by a refusal that retrying cannot change (401, a refused
                    // certificate).
                    let reason = last_error.lock().ok().and_then(|e| e.clone()).filter(is_final);
                    return Err(reason.unwrap_or(Error::Closed));
                }
                ConnState::Unauthorized => {
                    // A refusal that retrying cannot change (401), and no fresh token.
                    let reason = last_error.lock().ok().and_then(|e| e.clone()).and_then(|e| match e {
                        Error::Connect(c) if c.status == Some(UNAUTHORIZED) => Some(c),
                        _ => None,
                    });
                    let reason = reason.unwrap_or_else(|| ConnectError {
                        status: Some(UNAUTHORIZED),
                        message: client.unauthorized_reason().unwrap_or_else(|| "unauthorized".into()),
                    });
                    client.close().await;
                    return Err(Error::Connect(reason));
                }
                _ => {}
            }
            if state_rx.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }
}

/// Whether a failed connection attempt ends the client instead of being retried: a refused
/// server certificate (a 401 goes to the core, which asks the token provider or ends
/// unauthorized).
fn is_final(e: &Error) -> bool {
    match e {
        Error::Tls(t) => t.kind == TlsErrorKind::Certificate,
        _ => false,
    }
}

/// A connection to an Ivy server that reconnects by itself. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::UnboundedSender<Cmd>,
    state: watch::Receiver<ConnState>,
    connections: watch::Receiver<u64>,
    logs: LogReader,
    buffer: usize,
    last_error: Arc<Mutex<Option<Error>>>,
    unauthorized: Arc<Mutex<Option<String>>>,
}

/// Reads channel logs over HTTP alone, with no WebSocket connection (for a program that only
/// reads history, such as `ivy log`). [`Client::log`] is the same. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), ivy_client_native::Error> {
/// use ivy_client_native::{LogQuery, LogReader};
/// let logs = LogReader::new("ws://127.0.0.1:8080")?; // checks the URL; connects on each read
/// let last_ten = logs.log("/chat", LogQuery::Last(10.try_into().unwrap())).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LogReader {
    endpoints: Endpoints,
    http: Http,
    tls: Arc<rustls::ClientConfig>,
    /// Shared with the client's driver, which puts each refreshed token here.
    token: Arc<Mutex<Option<Token>>>,
    senders: bool,
}

impl LogReader {
    /// A reader of the server at `url` (its base URL, as for [`Client::connect`]); fails only
    /// for an invalid URL. An `https://` (or `wss://`) URL is read over TLS, trusting the
    /// system's roots.
    pub fn new(url: &str) -> Result<LogReader, Error> {
        let endpoints = endpoints(url)?;
        let tls = tls_config(endpoints.tls, None).map_err(Error::Tls)?;
        Ok(LogReader { endpoints, http: http_client(&tls), tls, token: Arc::new(Mutex::new(None)), senders: false })
    }

    /// Also trusts the certificate authorities of the PEM file at `path` (see
    /// [`ClientBuilder::ca_file`]); [`Error::Tls`] if it cannot be read or holds no
    /// certificate.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Result<LogReader, Error> {
        self.tls = tls_config(self.endpoints.tls, Some(path.as_ref())).map_err(Error::Tls)?;
        self.http = http_client(&self.tls);
        Ok(self)
    }

    /// Sends `token` with each read, as `Authorization: Bearer` (see [`ClientBuilder::token`]).
    pub fn token(mut self, token: impl Into<String>) -> LogReader {
        self.token = Arc::new(Mutex::new(Some(Token(token.into().into()))));
        self
    }

    /// Reads the extended lines, with their senders (`ext=sender`; see
    /// [`ClientBuilder::senders`]).
    pub fn senders(mut self, on: bool) -> LogReader {
        self.senders = on;
        self
    }

    /// The server's endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Reads a channel's log (its whole subtree, in timestamp order): all of it
    /// ([`LogQuery::All`]), its last events ([`LogQuery::Last`]) or one page
    /// ([`LogQuery::Page`]). [`Error::Connect`] when no TCP connection to the server could be
    /// made, [`Error::Log`] when the request or its answer failed.
    pub async fn log(&self, path: &str, query: LogQuery) -> Result<Vec<Event>, Error> {
        let path = ivy_core::path::normalize(path.as_bytes()).map_err(|e| Error::Request(ClientError::InvalidPath(e)))?;
        let url = ivy_core::http::with_senders(format!("{}{}", self.endpoints.http, query.target(&path)), self.senders);
        let token = self.token.lock().ok().and_then(|t| t.clone());
        let body = match fetch(&self.http, &url, token.as_ref()).await {
            Ok((body, _horizon)) => body,
            Err(Fetch::Connect(message)) => return Err(Error::Connect(ConnectError { status: None, message })),
            Err(Fetch::Tls(e)) => return Err(Error::Tls(e)),
            Err(Fetch::Log(e)) => return Err(Error::Log(e)),
        };
        ivy_core::http::parse_log(&body).map_err(|e| Error::Log(LogError { status: None, message: format!("unparsable log line: {e}") }))
    }

    /// One page of the server's `GET /channels` (the channels with a log or subscribers in
    /// `prefix`'s subtree, after the cursor `after`, at most `limit`, those the token may read):
    /// its JSON object, `{"channels":[{"path","subscribers","newest"}],"next"}`, as its text.
    /// Errors as for [`LogReader::info`].
    pub async fn channels(&self, prefix: &str, after: Option<&str>, limit: Option<u32>) -> Result<String, Error> {
        // Normalized paths are `a-z 0-9 . - /`: nothing to escape in a query.
        let path = |p: &str| {
            ivy_core::path::normalize(p.as_bytes()).map(|p| p.into_owned()).map_err(|e| Error::Request(ClientError::InvalidPath(e)))
        };
        let mut url = format!("{}/channels?prefix={}", self.endpoints.http, path(prefix)?);
        if let Some(a) = after {
            url.push_str(&format!("&after={}", path(a)?));
        }
        if let Some(l) = limit {
            url.push_str(&format!("&limit={l}"));
        }
        let token = self.token.lock().ok().and_then(|t| t.clone());
        fetched(fetch(&self.http, &url, token.as_ref()).await.map(|(body, _)| body))
    }

    /// An admin request with the server API key `key` (`docs/PROTOCOL.md` 9.15): `POST
    /// /admin/<what>` with the JSON `body`, or `GET /admin/<what>` without one; the answer's
    /// JSON text. Errors as for [`LogReader::info`] (a wrong key: 401 in [`Error::Log`]).
    pub async fn admin(&self, what: &str, key: &str, body: Option<String>) -> Result<String, Error> {
        let url = format!("{}/admin/{what}", self.endpoints.http);
        match body {
            Some(body) => fetched(post_json(&self.tls, &url, key, body).await),
            None => fetched(fetch(&self.http, &url, Some(&Token(key.into()))).await.map(|(body, _)| body)),
        }
    }

    /// The server's `GET /info`: a JSON object (version, node id, engine, uptime,
    /// connections, subscriptions, events published; see the server's README), as its text,
    /// unparsed (the library has no JSON parser). Errors as for [`LogReader::log`]; a server
    /// that requires an API key for it answers 401, in [`Error::Log`].
    pub async fn info(&self) -> Result<String, Error> {
        let url = format!("{}/info", self.endpoints.http);
        let token = self.token.lock().ok().and_then(|t| t.clone());
        match fetch(&self.http, &url, token.as_ref()).await {
            Ok((body, _)) => Ok(body),
            Err(Fetch::Connect(message)) => Err(Error::Connect(ConnectError { status: None, message })),
            Err(Fetch::Tls(e)) => Err(Error::Tls(e)),
            Err(Fetch::Log(e)) => Err(Error::Log(e)),
        }
    }
}

/// One request with a JSON body and `Authorization: Bearer key` (the admin endpoints): the
/// response's body on a 200, its status and reason otherwise.
async fn post_json(tls: &Arc<rustls::ClientConfig>, url: &str, key: &str, body: String) -> Result<String, Fetch> {
    let failed = |message: String| Fetch::Log(LogError { status: None, message });
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((**tls).clone()).https_or_http().enable_http1().wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("{url}: {e}")))?;
    let req = hyper::Request::post(uri)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| failed(format!("invalid request (the key?): {e}")))?;
    let resp = responded(url, tokio::time::timeout(Duration::from_secs(30), client.request(req)).await)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != hyper::StatusCode::OK {
        return Err(Fetch::Log(LogError { status: Some(status.as_u16()), message: text.trim_end().into() }));
    }
    Ok(text)
}

/// The response of an HTTP request made within a timeout, or why there is none: a refused
/// certificate, a failed connection (with its cause), a timeout or another failure.
fn responded(
    url: &str,
    r: Result<Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>, tokio::time::error::Elapsed>,
) -> Result<hyper::Response<hyper::body::Incoming>, Fetch> {
    let failed = |message: String| Fetch::Log(LogError { status: None, message });
    match r {
        Err(_) => Err(failed("timed out".into())),
        Ok(Err(e)) if e.is_connect() => {
            if let Some(tls) = TlsError::find(&host_of(url), &e) {
                return Err(Fetch::Tls(tls));
            }
            let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            Err(Fetch::Connect(format!("{url}: {cause}")))
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Ok(Ok(resp)) => Ok(resp),
    }
}

fn fetched<T>(r: Result<T, Fetch>) -> Result<T, Error> {
    match r {
        Ok(t) => Ok(t),
        Err(Fetch::Connect(message)) => Err(Error::Connect(ConnectError { status: None, message })),
        Err(Fetch::Tls(e)) => Err(Error::Tls(e)),
        Err(Fetch::Log(e)) => Err(Error::Log(e)),
    }
}

fn http_client(tls: &Arc<rustls::ClientConfig>) -> Http {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((**tls).clone()).https_or_http().enable_http1().wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cmd")
    }
}

impl Client {
    /// A builder for `url` (`ws://host:port`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            config: Config::default(),
            retry_initial: false,
            buffer: SUBSCRIPTION_BUFFER,
            token: None,
            ca_file: None,
            provider: None,
        }
    }

    /// Connects with the default configuration.
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        Client::builder(url).connect().await
    }

    /// The server's endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.logs.endpoints
    }

    /// Subscribes to `path` (and its descendants) from now on.
    pub async fn subscribe(&self, path: &str) -> Result<Subscription, Error> {
        self.subscribe_from(path, Start::Now).await
    }

    /// Subscribes to `path` from `start`: [`Start::Beginning`] for the whole history,
    /// [`Start::After`] to resume after an event the application already processed.
    pub async fn subscribe_from(&self, path: &str, start: Start) -> Result<Subscription, Error> {
        let (events_tx, events) = mpsc::channel(self.buffer);
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Subscribe(path.to_string(), start, events_tx, reply_tx)).map_err(|_| Error::Closed)?;
        let id = reply.await.map_err(|_| Error::Closed)??;
        Ok(Subscription { id, events, tx: self.tx.clone(), unsubscribed: false })
    }

    /// Publishes `data` on `path`; resolves to the event's timestamp once the server has
    /// stored it.
    ///
    /// The send survives a dropped connection: it is resent with its id after the client
    /// reconnects, and the server stores it once (see the [crate docs](crate)). It fails
    /// uncertain ([`Error::is_uncertain`]) only when that could not happen within the
    /// [idempotency window](ClientBuilder::idempotency_window).
    ///
    /// The send is made when this is first polled. Dropping the future after that does not
    /// take the send back: it may still be stored (it is queued, or already written).
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

    /// Reads a channel's log (its whole subtree, in timestamp order): all of it
    /// ([`LogQuery::All`]), its last events ([`LogQuery::Last`]) or one page
    /// ([`LogQuery::Page`]). See [`LogReader::log`].
    pub async fn log(&self, path: &str, query: LogQuery) -> Result<Vec<Event>, Error> {
        self.logs.log(path, query).await
    }

    /// Watches who is present at `path` (**Extension**, `docs/PROTOCOL.md` 5.10): the members
    /// subscribed at the path or below (a token's `sub`, or an anonymous connection), live.
    ///
    /// The stream yields the first [`PresenceEvent::Snapshot`], then [`PresenceEvent::Join`],
    /// [`PresenceEvent::Leave`] and [`PresenceEvent::Count`]; after a reconnect the client
    /// watches again and yields only the differences between the fresh snapshot and what it
    /// reported (no phantom members, no missed leaves); a `Snapshot` again replaces the view when
    /// a channel passes the server's `--presence-max-list` (counted, not listed, from then on:
    /// [`PresenceView::complete`] false). [`PresenceStream::view`] is the view
    /// after the items taken so far. The watch subscribes this connection to `path` on the
    /// server (so this client is itself present there). The stream ends after
    /// [`PresenceEvent::Failed`] (refused: no read grant covering `path`, or a server without
    /// presence) or [`PresenceEvent::Ended`]; dropping it ends the watch.
    ///
    /// Presence events are few (the server coalesces a channel's changes per 100 ms tick, and
    /// reports counts only above its `--presence-max-list`) and are buffered without bound
    /// until taken: read the stream.
    pub async fn presence(&self, path: &str) -> Result<PresenceStream, Error> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Watch(path.to_string(), events_tx, reply_tx)).map_err(|_| Error::Closed)?;
        let id = reply.await.map_err(|_| Error::Closed)??;
        let path = ivy_core::path::normalize(path.as_bytes()).map(|p| p.into_owned()).unwrap_or_default();
        let view = PresenceView { path, complete: true, ..PresenceView::default() };
        Ok(PresenceStream { id, events, tx: self.tx.clone(), view, ended: false })
    }

    /// Who is present at `path` (or below) now, once (**Extension** `~?PATH`; no
    /// subscription): the members, sorted by id (subs first), with their connections and info.
    /// Needs a connection ([`ClientError::NotConnected`] otherwise) and a read grant covering
    /// `path`. Over HTTP alone: `GET /presence/<path>` (what `ivy who` reads).
    pub async fn who(&self, path: &str) -> Result<PresenceView, Error> {
        let (reply_tx, reply) = oneshot::channel();
        self.tx.send(Cmd::Who(path.to_string(), reply_tx)).map_err(|_| Error::Closed)?;
        Ok(reply.await.map_err(|_| Error::Closed)??)
    }

    /// A watch of the connection state. A watch shows the latest state only: a connection
    /// that drops and comes back between two looks may show as `Connected` throughout; see
    /// [`Client::connections`].
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Why the client is [`ConnState::Unauthorized`], if it is: the server's reason for
    /// refusing the token (and why no fresh one came).
    pub fn unauthorized_reason(&self) -> Option<String> {
        self.unauthorized.lock().ok().and_then(|r| r.clone())
    }

    /// A watch of how many connections this client has made: 1 once connected, one more at
    /// each reconnect (so that no reconnect goes unnoticed, however quick).
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// Why the last connection attempt failed, if one did since the client started (for
    /// example why a client that closed by itself, [`ConnState::Closed`], could not reconnect:
    /// a 401, or a refused certificate, [`Error::Tls`]).
    pub fn last_connect_error(&self) -> Option<Error> {
        self.last_error.lock().ok().and_then(|e| e.clone())
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
/// Dropping it unsubscribes (so does [`Subscription::unsubscribe`], which waits for it).
///
/// It holds at most [`ClientBuilder::subscription_buffer`] events the application has not
/// taken; a consumer slower than the channel's events makes the client read them from the
/// server's log instead, once it has caught up with half of them: nothing is lost or
/// repeated.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    events: mpsc::Receiver<Result<Event, SubscriptionError>>,
    tx: mpsc::UnboundedSender<Cmd>,
    unsubscribed: bool,
}

impl Subscription {
    /// How many events are waiting to be taken (at most the subscription buffer).
    pub fn queued(&self) -> usize {
        self.events.len()
    }

    /// Ends the subscription; once this resolves, no further event of it is delivered and the
    /// client has told the server (when connected). Events already buffered are dropped.
    pub async fn unsubscribe(mut self) {
        self.unsubscribed = true;
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Unsubscribe(self.id, Some(done))).is_ok() {
            let _ = wait.await;
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Event, SubscriptionError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.unsubscribed {
            let _ = self.tx.send(Cmd::Unsubscribe(self.id, None));
        }
    }
}

/// The presence of a path, live ([`Client::presence`]): a stream of [`PresenceEvent`]s and the
/// view they build ([`PresenceStream::view`]). Dropping it ends the watch.
#[derive(Debug)]
pub struct PresenceStream {
    id: u64,
    events: mpsc::UnboundedReceiver<PresenceEvent>,
    tx: mpsc::UnboundedSender<Cmd>,
    view: PresenceView,
    ended: bool,
}

impl PresenceStream {
    /// Who is present, after the items taken from the stream so far (empty before the
    /// snapshot): members sorted by id (subs first), and the count.
    pub fn view(&self) -> &PresenceView {
        &self.view
    }

    /// Takes the stream's items up to the first snapshot and returns the view; `Err` when
    /// the watch failed or ended first.
    pub async fn snapshot(&mut self) -> Result<&PresenceView, Error> {
        loop {
            match self.next().await {
                Some(PresenceEvent::Snapshot(_)) => return Ok(&self.view),
                Some(PresenceEvent::Failed(e)) => return Err(e.into()),
                Some(PresenceEvent::Ended(reason)) => {
                    let code = ServerCode::from_wire("subscription-ended");
                    return Err(Error::Request(ClientError::Server { code, message: reason }));
                }
                Some(_) => {}
                None => return Err(Error::Closed),
            }
        }
    }

    fn apply(&mut self, e: &PresenceEvent) {
        let v = &mut self.view;
        match e {
            PresenceEvent::Snapshot(s) => *v = s.clone(),
            PresenceEvent::Join(m) => match v.members.binary_search_by(|x| x.id.cmp(&m.id)) {
                Ok(i) => v.members[i] = m.clone(),
                Err(i) => v.members.insert(i, m.clone()),
            },
            PresenceEvent::Leave(m) => {
                if let Ok(i) = v.members.binary_search_by(|x| x.id.cmp(&m.id)) {
                    v.members.remove(i);
                }
            }
            PresenceEvent::Count(n) => v.count = *n,
            PresenceEvent::Failed(_) | PresenceEvent::Ended(_) => self.ended = true,
        }
    }
}

impl Stream for PresenceStream {
    type Item = PresenceEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PresenceEvent>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = self.events.poll_recv(cx);
        if let Poll::Ready(Some(e)) = &item {
            let e = e.clone();
            self.apply(&e);
        }
        item
    }
}

impl Drop for PresenceStream {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Unwatch(self.id));
    }
}

/// Why a log request failed: no connection could be made, or the request or answer failed.
enum Fetch {
    Connect(String),
    Tls(TlsError),
    Log(LogError),
}

impl From<Fetch> for LogError {
    fn from(f: Fetch) -> LogError {
        match f {
            Fetch::Connect(message) => LogError { status: None, message },
            Fetch::Tls(e) => LogError { status: None, message: e.message },
            Fetch::Log(e) => e,
        }
    }
}

/// A log page: its body and the log's horizon (`Ivy-Horizon`, the newest event deleted from
/// it), if it states one.
async fn fetch(http: &Http, url: &str, token: Option<&Token>) -> Result<(String, Option<Timestamp>), Fetch> {
    let failed = |message: String| Fetch::Log(LogError { status: None, message });
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("{url}: {e}")))?;
    let mut req = hyper::Request::get(uri);
    if let Some(Token(t)) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::new()).map_err(|e| failed(format!("invalid request (the token?): {e}")))?;
    let resp = responded(url, tokio::time::timeout(Duration::from_secs(30), http.request(req)).await)?;
    let status = resp.status();
    let horizon = resp.headers().get("ivy-horizon").and_then(|v| Timestamp::parse(v.as_bytes()).ok());
    let body = resp.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes();
    let text = String::from_utf8(body.to_vec()).map_err(|_| failed("log body is not UTF-8".into()))?;
    if status != hyper::StatusCode::OK {
        return Err(Fetch::Log(LogError { status: Some(status.as_u16()), message: text.trim_end().into() }));
    }
    Ok((text, horizon))
}

fn millis(d: Duration) -> client::Millis {
    d.as_millis() as u64
}

/// A subscription of the application: where its events go, and how far they went.
struct Route {
    path: String,
    /// Where the application asked to start (the resume point while nothing was given).
    start: Start,
    tx: mpsc::Sender<Result<Event, SubscriptionError>>,
    /// The newest event handed to the application.
    last: Option<Timestamp>,
    /// The core's subscription; `None` while the consumer lags.
    core: Option<SubId>,
}

struct Driver {
    core: client::Client,
    endpoints: Endpoints,
    http: Http,
    tls: Arc<rustls::ClientConfig>,
    /// `ext=sender` on the WebSocket URL.
    senders: bool,
    /// The token for log reads, shared with [`Client::log`].
    log_token: Arc<Mutex<Option<Token>>>,
    provider: Option<Provider>,
    /// The provider's answers.
    token_tx: mpsc::UnboundedSender<Option<String>>,
    token_rx: mpsc::UnboundedReceiver<Option<String>>,
    unauthorized: Arc<Mutex<Option<String>>>,
    epoch: Instant,
    write_timeout: Duration,
    state_tx: watch::Sender<ConnState>,
    connections_tx: watch::Sender<u64>,
    last_error: Arc<Mutex<Option<Error>>>,
    /// The application's subscriptions, by handle.
    routes: HashMap<u64, Route>,
    /// The core's subscription of each route that has one (a route whose consumer lagged has
    /// none until it resumes).
    by_core: HashMap<SubId, u64>,
    next_handle: u64,
    /// Lagging routes, each resolving (to its handle) once its consumer has taken half of its
    /// buffer.
    resumes: FuturesUnordered<Pin<Box<dyn Future<Output = u64> + Send>>>,
    sends: HashMap<RequestId, oneshot::Sender<Result<Timestamp, ClientError>>>,
    times: HashMap<RequestId, oneshot::Sender<Result<Timestamp, ClientError>>>,
    /// The application's presence streams, by the core's watch.
    watches: HashMap<WatchId, mpsc::UnboundedSender<PresenceEvent>>,
    whos: HashMap<RequestId, oneshot::Sender<Result<PresenceView, ClientError>>>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Ws, Error>> + Send>>;

impl Driver {
    fn now(&self) -> client::Millis {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut ws: Option<Ws> = None;
        let mut connecting: Option<Connecting> = None;
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<(u64, Result<(String, Option<Timestamp>), LogError>)>();
        let mut closing: Option<oneshot::Sender<()>> = None;
        self.core.start(self.now());
        loop {
            // Carry out the core's actions, then hand its events to the application.
            let mut wrote = false;
            while let Some(action) = self.core.poll_action() {
                match action {
                    Action::Connect => {
                        let url = ivy_core::http::with_senders(self.endpoints.ws.clone(), self.senders);
                        let bearer = self.core.token().map(|t| format!("Bearer {t}"));
                        let tls = tokio_tungstenite::Connector::Rustls(self.tls.clone());
                        let host = host_of(&self.endpoints.ws);
                        connecting = Some(Box::pin(async move {
                            let mut req = url.into_client_request().map_err(|e| Error::Connect(ConnectError::from_ws(&e)))?;
                            req.headers_mut()
                                .insert("Sec-WebSocket-Protocol", hyper::header::HeaderValue::from_static(ivy_core::SUBPROTOCOL));
                            if let Some(bearer) = bearer {
                                let value = hyper::header::HeaderValue::try_from(bearer).map_err(|_| {
                                    Error::Connect(ConnectError {
                                        status: None,
                                        message: "the token cannot be sent in an HTTP header".into(),
                                    })
                                })?;
                                req.headers_mut().insert(hyper::header::AUTHORIZATION, value);
                            }
                            let (ws, _) =
                                tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(tls)).await.map_err(|e| {
                                    match TlsError::find(&host, &e) {
                                        Some(t) => Error::Tls(t),
                                        None if matches!(e, tungstenite::Error::Tls(_)) => Error::Tls(TlsError {
                                            kind: TlsErrorKind::Certificate,
                                            message: format!("TLS with {host} failed: {e}"),
                                        }),
                                        None => Error::Connect(ConnectError::from_ws(&e)),
                                    }
                                })?;
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
                    Action::NeedToken => match &self.provider {
                        Some(Provider(p)) => {
                            let (answer, tx) = (p(), self.token_tx.clone());
                            tokio::spawn(async move {
                                let _ = tx.send(answer.await);
                            });
                        }
                        None => self.core.handle_token(self.now(), Err("no token provider".into())),
                    },
                    Action::FetchLog(req) => {
                        let (http, url, tx) = (self.http.clone(), format!("{}{}", self.endpoints.http, req.target()), log_tx.clone());
                        let token = self.core.token().map(|t| Token(t.into()));
                        tokio::spawn(async move {
                            let _ = tx.send((req.id, fetch(&http, &url, token.as_ref()).await.map_err(LogError::from)));
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
                        self.core.close(self.now());
                        closing = Some(done);
                    }
                    Some(cmd) => self.command(cmd),
                    None => {
                        // Every handle was dropped.
                        self.core.close(self.now());
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
                            // 4003 (token expired) asks the provider; others reconnect.
                            let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                            self.core.handle_close(now, code, &reason);
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
                        Err(Error::Connect(e)) if e.status == Some(UNAUTHORIZED) => {
                            // The same token would be refused again: the core asks the provider
                            // once, or ends unauthorized.
                            tracing::debug!(reason = %e, "handshake refused with 401: the token is not accepted");
                            let reason = e.message.strip_prefix("HTTP 401: ").unwrap_or(&e.message).to_string();
                            self.note(Error::Connect(e));
                            self.core.handle_unauthorized(now, &reason);
                        }
                        Err(e) => {
                            let last = is_final(&e);
                            self.note(e);
                            self.core.handle_disconnected(now);
                            if last && closing.is_none() {
                                // The same certificate would be refused again: stop here.
                                tracing::debug!("the server's certificate is not accepted; closing");
                                self.core.close(now);
                                closing = Some(oneshot::channel().0);
                            }
                        }
                    }
                }
                Some((id, result)) = log_rx.recv() => {
                    let now = self.now();
                    match &result {
                        Ok((body, horizon)) => self.core.handle_log_page_with_horizon(now, id, Ok(body), *horizon),
                        Err(e) => self.core.handle_log_page(now, id, Err(e.to_string())),
                    }
                }
                Some(handle) = self.resumes.next(), if !self.resumes.is_empty() => self.resume(handle),
                Some(answer) = self.token_rx.recv() => {
                    let now = self.now();
                    match answer {
                        Some(t) => {
                            self.core.handle_token(now, Ok(core_token(&t, now)));
                            self.sync_log_token();
                        }
                        None => self.core.handle_token(now, Err("the token provider returned none".into())),
                    }
                }
                () = sleep_until(deadline) => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
            }
        }
    }

    /// Log reads use the core's current token.
    fn sync_log_token(&self) {
        if let Ok(mut slot) = self.log_token.lock() {
            *slot = self.core.token().map(|t| Token(t.into()));
        }
    }

    fn note_error(&self, message: String) {
        self.note(Error::Connect(ConnectError { status: None, message }));
    }

    fn note(&self, e: Error) {
        tracing::debug!(error = %e, "connection problem");
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(e);
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Subscribe(path, start, events, reply) => {
                let r = self.core.subscribe(now, &path, start).map(|id| {
                    let handle = self.next_handle;
                    self.next_handle += 1;
                    self.by_core.insert(id, handle);
                    self.routes.insert(handle, Route { path, start, tx: events, last: None, core: Some(id) });
                    handle
                });
                let _ = reply.send(r);
            }
            Cmd::Unsubscribe(handle, done) => {
                if let Some(core) = self.routes.remove(&handle).and_then(|r| r.core) {
                    self.by_core.remove(&core);
                    self.core.unsubscribe(now, core);
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
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
            Cmd::Watch(path, events, reply) => {
                let r = self.core.watch_presence(now, &path).map(|id| {
                    self.watches.insert(id, events);
                    id.0
                });
                let _ = reply.send(r);
            }
            Cmd::Unwatch(id) => {
                if self.watches.remove(&WatchId(id)).is_some() {
                    self.core.unwatch_presence(now, WatchId(id));
                }
            }
            Cmd::Who(path, reply) => match self.core.who(now, &path) {
                Ok(id) => {
                    self.whos.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Cmd::Close(_) => {}
        }
    }

    /// Hands an item of core subscription `sub` to its application stream. If the stream is
    /// full, the route lags: its core subscription ends (the server stops sending its events),
    /// and it resumes after its last event once the application has taken half of its buffer.
    fn forward(&mut self, sub: SubId, item: Result<Event, SubscriptionError>, ts: Option<Timestamp>) {
        let Some(&handle) = self.by_core.get(&sub) else { return };
        let Some(route) = self.routes.get_mut(&handle) else { return };
        match route.tx.try_send(item) {
            Ok(()) => {
                if ts.is_some() {
                    route.last = ts;
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(path = %route.path, last = ?route.last, "subscription buffer full: reading from the log once the consumer catches up");
                self.by_core.remove(&sub);
                route.core = None;
                self.core.unsubscribe(self.epoch.elapsed().as_millis() as u64, sub);
                let tx = route.tx.clone();
                let half = (tx.max_capacity() / 2).max(1);
                self.resumes.push(Box::pin(async move {
                    // Fails only when the application dropped the stream; then nothing resumes.
                    let _ = tx.reserve_many(half).await;
                    handle
                }));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {} // dropped: its Unsubscribe follows
        }
    }

    /// A lagging route's consumer has taken half of its buffer: subscribe again after the last
    /// event it was given (or from where it started, if it was given none).
    fn resume(&mut self, handle: u64) {
        let now = self.now();
        let Some(route) = self.routes.get_mut(&handle) else { return };
        if route.core.is_some() || route.tx.is_closed() {
            return;
        }
        let start = route.last.map_or(route.start, Start::After);
        match self.core.subscribe(now, &route.path, start) {
            Ok(id) => {
                route.core = Some(id);
                self.by_core.insert(id, handle);
            }
            Err(e) => {
                if let Some(route) = self.routes.remove(&handle) {
                    tokio::spawn(async move {
                        let _ = route.tx.send(Err(SubscriptionError::Refused(e))).await;
                    });
                }
            }
        }
    }

    fn dispatch(&mut self) {
        while let Some(event) = self.core.poll_event() {
            match event {
                ClientEvent::Event { sub, event } => {
                    let ts = event.ts;
                    self.forward(sub, Ok(event), Some(ts));
                }
                ClientEvent::ContinuityLost { sub, last, position } => {
                    // If the buffer is full, the notice comes again when the route resumes
                    // from its last event (the server still lacks what it lost).
                    self.forward(sub, Err(SubscriptionError::ContinuityLost { last, position }), None);
                }
                ClientEvent::SubscribeFailed { sub, error } => {
                    if let Some(route) = self.by_core.remove(&sub).and_then(|h| self.routes.remove(&h)) {
                        // The last item of the stream: waits for room if need be.
                        tokio::spawn(async move {
                            let _ = route.tx.send(Err(SubscriptionError::Refused(error))).await;
                        });
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
                ClientEvent::Presence { watch, event } => {
                    let last = matches!(event, PresenceEvent::Failed(_) | PresenceEvent::Ended(_));
                    let gone = self.watches.get(&watch).is_none_or(|tx| tx.send(event).is_err());
                    if last || gone {
                        self.watches.remove(&watch);
                        if gone && !last {
                            self.core.unwatch_presence(self.now(), watch);
                        }
                    }
                }
                ClientEvent::Who { id, result } => {
                    if let Some(tx) = self.whos.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                ClientEvent::State(state) => {
                    tracing::debug!(?state, "connection state");
                    let state = match state {
                        client::ConnState::Idle => ConnState::Idle,
                        client::ConnState::Connecting { attempt } => ConnState::Connecting { attempt },
                        client::ConnState::Connected => ConnState::Connected,
                        client::ConnState::Reconnecting { attempt, retry_at } => {
                            ConnState::Reconnecting { attempt, retry_at: self.epoch + Duration::from_millis(retry_at) }
                        }
                        client::ConnState::Closed => ConnState::Closed,
                        client::ConnState::AwaitingToken => ConnState::AwaitingToken,
                        client::ConnState::Unauthorized => ConnState::Unauthorized,
                    };
                    if state == ConnState::Closed {
                        self.watches.clear();
                        self.routes.clear();
                        self.by_core.clear();
                        self.resumes = FuturesUnordered::new();
                    }
                    if state == ConnState::Connected {
                        // Before the state, so that a watcher of both sees the count first.
                        self.connections_tx.send_modify(|n| *n += 1);
                    }
                    let _ = self.state_tx.send(state);
                }
                ClientEvent::SubscriptionEnded { sub, reason } => {
                    if let Some(route) = self.by_core.remove(&sub).and_then(|h| self.routes.remove(&h)) {
                        tokio::spawn(async move {
                            let _ = route.tx.send(Err(SubscriptionError::Ended(reason))).await;
                        });
                    }
                }
                ClientEvent::TokenRefused { error } => {
                    tracing::warn!("the refreshed token was refused: {error}");
                    // The core went back to the token the server kept.
                    self.sync_log_token();
                }
                ClientEvent::Unauthorized { reason } => {
                    tracing::warn!("unauthorized: {reason}");
                    if let Ok(mut slot) = self.unauthorized.lock() {
                        *slot = Some(reason);
                    }
                    // Each stream's last item says why it ended.
                    self.by_core.clear();
                    self.resumes = FuturesUnordered::new();
                    for (_, route) in self.routes.drain() {
                        tokio::spawn(async move {
                            let _ = route.tx.send(Err(SubscriptionError::Refused(ClientError::Unauthorized))).await;
                        });
                    }
                    for (_, tx) in self.watches.drain() {
                        let _ = tx.send(PresenceEvent::Failed(ClientError::Unauthorized));
                    }
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

async fn poll_connecting(c: &mut Option<Connecting>) -> Result<Ws, Error> {
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

    // The URL rules themselves are tested in ivy-client-core (`http::tests`).
    #[test]
    fn tls_urls_are_accepted_and_a_bad_ca_file_is_named() {
        assert_eq!(endpoints("ws://h:1").unwrap().ws, "ws://h:1/ws");
        assert!(matches!(endpoints("ftp://h"), Err(Error::InvalidUrl(UrlError::Malformed { .. }))));
        assert_eq!(endpoints("wss://h").unwrap().ws, "wss://h/ws");
        assert_eq!(endpoints("https://h/p").unwrap().http, "https://h/p");
        let missing = std::env::temp_dir().join("ivy-no-such-ca.pem");
        match LogReader::new("wss://h").unwrap().ca_file(&missing) {
            Err(Error::Tls(TlsError { kind: TlsErrorKind::CaFile, message })) => {
                assert!(message.contains(&missing.display().to_string()), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_say_whether_a_send_may_have_been_stored() {
        assert!(Error::Request(ClientError::WindowPassed).is_uncertain());
        assert!(Error::Request(ClientError::ConnectionLost).is_uncertain());
        assert!(Error::Request(ClientError::Timeout).is_uncertain());
        assert!(!Error::Request(ClientError::NotConnected).is_uncertain());
        assert!(!Error::Closed.is_uncertain());
        assert!(!Error::Log(LogError { status: None, message: "timed out".into() }).is_uncertain());
        let log = Error::Log(LogError { status: Some(400), message: "invalid line count".into() });
        assert_eq!(log.to_string(), "log request failed: HTTP 400: invalid line count");
        let refused = Error::Connect(ConnectError { status: Some(403), message: "HTTP error: 403 Forbidden".into() });
        assert_eq!(refused.to_string(), "cannot connect: HTTP error: 403 Forbidden");
    }
}
