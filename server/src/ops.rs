//! The operations endpoints ([`crate::Ivy::ops_router`]): `GET /healthz`, `GET /readyz`,
//! `GET /info` and `GET /metrics`.
//!
//! - `/healthz`: `200 ok` while the process serves HTTP; it asks the engine nothing, so a
//!   liveness check never restarts a server that is only busy or waiting for disk space.
//! - `/readyz`: `200 ready` once a readiness probe went through the whole path of an event,
//!   otherwise `503` with a one-line reason. The probe is a request in the engine's publish
//!   queue, behind every send already queued; the engine's sequencer takes it in order with
//!   the events, makes on it the check it makes before storing each group commit (the store's
//!   size limit, its disk's free-space reserve, a failed write waiting for the store to be
//!   reopened: `store-full` and `storage` for a send), and hands it to the fan-out as it hands
//!   an event, to an in-process subscriber of a channel that has no path (so that no client
//!   can subscribe to it: every path starts with `/`), whose queue the prober then reads. It
//!   is never stored, so no log (the root's included) shows it, no client receives it, no
//!   timestamp is taken for it and retention never sees it. Not ready: during shutdown (and
//!   during `--shutdown-delay`), when the store refuses events, and when the probe does not
//!   come back within [`PROBE_TIMEOUT`] (a sequencer stuck in a flush, a full queue that does
//!   not drain). At most one probe is in flight; every answer within [`REUSE`] of the last
//!   probe is that probe's, so a storm of checks costs one probe a second.
//! - `/info`: a JSON object (version, node id, engine, uptime, connections, subscriptions,
//!   events published since start).
//! - `/metrics`: the Prometheus text format (OpenMetrics when `Accept` asks for it): see
//!   [`crate::metrics`].
//!
//! `/healthz` and `/readyz` are always open (load balancers and orchestrators send no
//! credentials; they tell nothing but a reason). `/info` and `/metrics` are open too by
//! default, like most servers' monitoring endpoints on a private port: they carry no channel
//! name, path or identity, only counts. With [`crate::Config::ops_require_api_key`] they need a
//! server API key (`Authorization: Bearer KEY`, as `DELETE /log`). None of them is behind
//! `--allowed-host` (a probe addresses the server by its IP).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::Shared;
use crate::budget::Budget;
use crate::conn::Conn;
use crate::engine::{Completion, PROBE_CHANNEL, Publish, PublishError};
use crate::metrics::{Sample, format_for};

/// How long a readiness probe may take to come back.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe's result answers `/readyz` before another probe is made.
pub const REUSE: Duration = Duration::from_secs(1);

/// The longest `--node-id`.
pub const MAX_NODE_ID: usize = 64;

/// Ready, or why not.
type Readiness = Result<(), Arc<str>>;

/// The state of the operations endpoints.
#[derive(Debug)]
pub(crate) struct Ops {
    /// This server's node id (`--node-id`, or random per start).
    pub(crate) node_id: String,
    /// The engine's kind (`sled`, `memory`).
    pub(crate) engine: &'static str,
    started: Instant,
    /// The last probe: when it ended and what it found. Held while a probe is in flight.
    last: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    /// Cancelled when the server starts draining (`--shutdown-delay`): not ready from then on.
    pub(crate) draining: tokio_util::sync::CancellationToken,
}

impl Ops {
    pub(crate) fn new(node_id: String, engine: &'static str) -> Ops {
        Ops {
            node_id,
            engine,
            started: Instant::now(),
            last: tokio::sync::Mutex::new(None),
            draining: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// Whether `id` is a valid node id: 1 to [`MAX_NODE_ID`] ASCII letters, digits, `.`, `_`, `-`.
pub fn check_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty() && id.len() <= MAX_NODE_ID && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(format!("invalid node id {id:?}: 1 to {MAX_NODE_ID} ASCII letters, digits, '.', '_' or '-'")) }
}

/// A node id for this start: 16 hex digits from the process's random hash keys.
pub(crate) fn random_node_id() -> String {
    use std::hash::BuildHasher;
    let seed = (std::process::id(), std::time::SystemTime::now());
    format!("{:016x}", std::collections::hash_map::RandomState::new().hash_one(seed))
}

const NO_STORE: &str = "no-store";

fn text(status: StatusCode, body: String) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_STORE)];
    (status, headers, body).into_response()
}

/// `GET /healthz`.
pub(crate) async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n".into())
}

/// `GET /readyz`.
pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match ready(&shared).await {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Why the server is stopping, if it is.
fn stopping(shared: &Shared) -> Option<&'static str> {
    if shared.stop_reading.is_cancelled() {
        Some("shutting down")
    } else if shared.ops.draining.is_cancelled() {
        Some("shutting down (draining before the shutdown)")
    } else {
        None
    }
}

/// The readiness check (see the [module docs](self)).
pub(crate) async fn ready(shared: &Shared) -> Result<(), Arc<str>> {
    if let Some(why) = stopping(shared) {
        return Err(why.into());
    }
    // One probe in flight: the others wait for it and take its result.
    let mut last = shared.ops.last.lock().await;
    if let Some((at, result)) = &*last {
        if at.elapsed() < REUSE {
            return result.clone();
        }
    }
    let result = probe(shared).await;
    *last = Some((Instant::now(), result.clone()));
    drop(last);
    // A shutdown that began during the probe wins.
    match stopping(shared) {
        Some(why) => Err(why.into()),
        None => result,
    }
}

/// Why a probe failed, in a line.
fn reason(e: &PublishError) -> Arc<str> {
    match e {
        PublishError::StoreFull(why) => format!("the event store takes no events: {why}").into(),
        PublishError::Storage(e) => format!("the event store failed: {e}").into(),
        PublishError::ShuttingDown => "shutting down".into(),
        PublishError::InvalidPath(e) => format!("probe refused: {e}").into(),
        PublishError::InvalidId => "probe refused: invalid id".into(),
    }
}

/// Sends one probe through the engine and the fan-out to an in-process subscriber.
async fn probe(shared: &Shared) -> Result<(), Arc<str>> {
    let (conn, mut rx, _ending) = Conn::with_limits(shared.connections.next_id(), 1, usize::MAX, Budget::new(0));
    shared.fanout.subscribe(&conn, PROBE_CHANNEL, |_| {});
    let round = async {
        let (done, outcome) = Completion::channel();
        // Waits while the queue is full: a queue that does not drain is a stuck path.
        shared.publisher.publish(Publish::probe(done)).await;
        match outcome.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(reason(&e)),
            Err(_) => return Err("the engine dropped the probe".into()),
        }
        // Queued by the fan-out before the engine completed the probe.
        match rx.try_recv() {
            Ok(_) => Ok(()),
            Err(_) => Err(Arc::<str>::from("the probe was not delivered")),
        }
    };
    let result = match tokio::time::timeout(PROBE_TIMEOUT, round).await {
        Ok(r) => r,
        Err(_) => Err(format!("delivery stuck: a probe did not go through the engine and the fan-out within {PROBE_TIMEOUT:?}").into()),
    };
    shared.fanout.unsubscribe_all(&conn, std::iter::once(PROBE_CHANNEL));
    if let Err(why) = &result {
        tracing::warn!(reason = %why, "not ready");
    }
    result
}

/// Refuses a request for `/info` or `/metrics` without a server API key when
/// [`crate::Config::ops_require_api_key`] is set.
fn refused(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    if !shared.config.ops_require_api_key || crate::http::authorized(&shared.config.api_keys, headers) {
        return None;
    }
    let mut r = text(StatusCode::UNAUTHORIZED, "this endpoint needs a server API key: Authorization: Bearer KEY\n".into());
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// What `/info` and `/metrics` sample.
pub(crate) fn sample(shared: &Shared) -> Sample {
    let queues = shared.connections.queues();
    Sample {
        connections: shared.connections.len(),
        behind: queues.behind,
        subscriptions: shared.fanout.subscriptions(),
        queued_bytes: queues.bytes,
        queued_bytes_max: queues.max_bytes,
        budget_used: shared.budget.used(),
        uptime: shared.ops.started.elapsed().as_secs_f64(),
    }
}

/// The `/info` object.
pub(crate) fn info_json(shared: &Shared) -> serde_json::Value {
    let s = sample(shared);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node_id": shared.ops.node_id,
        "engine": shared.ops.engine,
        "uptime_seconds": shared.ops.started.elapsed().as_secs(),
        "connections": s.connections,
        "subscriptions": s.subscriptions,
        "events_published": shared.metrics.delivery.published_total(),
    })
}

/// `GET /info`.
pub(crate) async fn info(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&shared, &headers) {
        return r;
    }
    let mut body = info_json(&shared).to_string();
    body.push('\n');
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, NO_STORE)], body).into_response()
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&shared, &headers) {
        return r;
    }
    let format = format_for(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let body = shared.metrics.encode(sample(&shared), format);
    (StatusCode::OK, [(header::CONTENT_TYPE, format.content_type()), (header::CACHE_CONTROL, NO_STORE)], body).into_response()
}

/// Middleware on the log routes: counts reads (`GET`, `HEAD`) by status and times them until
/// their answer's headers.
pub(crate) async fn count_log_reads(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let started = Instant::now();
    let response = next.run(req).await;
    shared.metrics.log_reads.read(response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(check_node_id("eu-1.node_2").is_ok());
        assert!(check_node_id("").is_err());
        assert!(check_node_id("a b").is_err());
        assert!(check_node_id("é").is_err());
        assert!(check_node_id(&"a".repeat(MAX_NODE_ID)).is_ok());
        assert!(check_node_id(&"a".repeat(MAX_NODE_ID + 1)).is_err());
        let (a, b) = (random_node_id(), random_node_id());
        assert!(check_node_id(&a).is_ok() && a.len() == 16);
        assert_ne!(a, b);
    }
}
