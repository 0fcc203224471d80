//! The accept loop: serves a router the way the binary does.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use axum::Router;

use crate::limits::Counted;
use crate::{Ivy, SHUTDOWN_GRACE};

/// File descriptors kept free of connections (the store, static files, blocking threads).
const RESERVED_FDS: u64 = 256;

/// A connection whose writes stay blocked for `limit` (the client stopped reading) fails
/// with `TimedOut`, which ends it (HTTP responses and WebSockets alike).
struct WriteTimeout<T> {
    io: T,
    limit: Option<Duration>,
    /// Running while a write is blocked.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn new(io: T, limit: Option<Duration>) -> WriteTimeout<T> {
        WriteTimeout { io, limit, stalled: None }
    }

    /// The outcome of a write that returned `poll`.
    fn watch<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match (poll, self.limit) {
            (Poll::Pending, Some(limit)) => {
                let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))),
                    Poll::Pending => Poll::Pending,
                }
            }
            (poll, _) => {
                if poll.is_ready() {
                    self.stalled = None;
                }
                poll
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How many connections fit below this process's file-descriptor limit.
fn connection_capacity() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft != rlimit::INFINITY => usize::try_from(soft.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX),
        _ => usize::MAX,
    }
}

/// Serves `app` ([`Ivy::router`], alone or merged into an application's routes) on
/// `listener` until `shutdown` resolves or [`Ivy::stop_signal`] is cancelled, then shuts
/// `ivy` down gracefully (section 8.3 of `docs/PROTOCOL.md`); in-flight HTTP requests get
/// 5 seconds to finish.
///
/// Compared with a bare `axum::serve`, the accept loop protects the server from clients that
/// open connections and send nothing or too many:
///
/// - a connection that sends no byte within [`Config::first_byte_timeout`](crate::Config::first_byte_timeout), or no complete
///   request head within [`Config::header_timeout`](crate::Config::header_timeout), is closed (WebSockets, once upgraded, are
///   bounded by `--max-connections` and the ping timeout instead);
/// - it holds at most [`Config::max_connections_per_address`](crate::Config::max_connections_per_address) TCP connections from one client
///   IP address, and in all as many as fit below the process's file-descriptor limit (less 256
///   kept for the store and files); a connection beyond either is closed as soon as it is
///   accepted, so the server never runs out of descriptors (the binary first raises its soft
///   limit to the hard one).
///
/// With TLS ([`Config::tls_cert`](crate::Config::tls_cert)), every connection is a TLS one
/// (rustls); its handshake counts as part of the request head (the first byte within the
/// first-byte timeout, the whole handshake within the header timeout from the connection's
/// start), so a client that opens a connection and stalls costs no more than without TLS. A
/// connection that does not start with a TLS handshake (plain HTTP on the TLS port) gets a
/// 400 that says to use `https://` or `wss://`.
///
/// It also sets `TCP_NODELAY`, so that small lines are not held back, and survives accept
/// errors such as running out of file descriptors (it logs them and retries shortly).
pub async fn serve(
    ivy: &Ivy,
    app: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use hyper_util::rt::TokioIo;
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
    let config = &ivy.shared.config;
    let header_timeout = Some(config.header_timeout).filter(|t| !t.is_zero());
    let first_byte = Some(config.first_byte_timeout).filter(|t| !t.is_zero());
    let write_timeout = Some(config.write_timeout).filter(|t| !t.is_zero());
    let tls = ivy.shared.tls.clone();
    let admission = Counted::new(connection_capacity(), config.max_connections_per_address);
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
        let Some(admitted) = admission.admit(Some(peer.ip())) else {
            tracing::debug!(%peer, "connection refused: too many connections (from this address, or in all)");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
        }
        let place = admitted.clone();
        let app = tower::ServiceExt::map_request(app.clone(), move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(place.clone());
            req
        });
        let service = TowerToHyperService::new(app);
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            let started = tokio::time::Instant::now();
            // With TLS, the handshake counts as part of the request head: it must be over
            // within the header timeout from the connection's start.
            let head_deadline = header_timeout.map(|t| started + t);
            let mut first = [0u8; 1];
            let wait = match first_byte {
                Some(limit) => Some(Some(started + limit)),
                None if tls.is_some() => Some(head_deadline),
                None => None,
            };
            let peeked = match wait {
                Some(deadline) => within(deadline, stream.peek(&mut first)).await.is_some_and(|r| matches!(r, Ok(n) if n > 0)),
                None => true,
            };
            if !peeked {
                tracing::debug!(%peer, "no first byte in time: closing");
                return;
            }
            let io = WriteTimeout::new(stream, write_timeout);
            let Some(tls) = tls else {
                return http_connection(TokioIo::new(io), service, header_timeout, stop, peer).await;
            };
            // A TLS connection starts with a handshake record (22); anything else is most
            // likely plain HTTP sent to the TLS port: say so, in plain HTTP.
            if first[0] != 22 {
                tracing::debug!(%peer, "plain HTTP on the TLS port: refused");
                return refuse_plain(io).await;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match within(head_deadline, acceptor.accept(io)).await {
                None => tracing::debug!(%peer, "TLS handshake not done in time: closing"),
                Some(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Some(Ok(io)) => http_connection(TokioIo::new(io), service, header_timeout, stop, peer).await,
            }
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

/// Serves HTTP/1.1 (and its upgrades to WebSocket) on one connection until it ends or `stop`
/// is cancelled, then shuts it down gracefully.
async fn http_connection<I, S>(
    io: I,
    service: S,
    header_timeout: Option<Duration>,
    stop: tokio_util::sync::CancellationToken,
    peer: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = http.serve_connection(io, service).with_upgrades();
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
}

/// `f`, unless `deadline` passes first (`None`); no deadline: `f`.
async fn within<F: Future>(deadline: Option<tokio::time::Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says to use TLS, then closes.
async fn refuse_plain(mut io: WriteTimeout<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = "this server speaks TLS: use https:// or wss://\n";
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // Bounded whatever the write timeout: the client may read nothing.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut request = [0u8; 4096];
        let _ = io.io.try_read(&mut request);
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await?;
        // Read what the client still sends until it closes, so that closing does not reset
        // the connection before the client has read the answer.
        let mut rest = [0u8; 4096];
        while io.read(&mut rest).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// Accept errors that concern only the connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}
