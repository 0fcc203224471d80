//! The accept loop: serves a router the way the binary does.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;

use crate::{Ivy, SHUTDOWN_GRACE};

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
