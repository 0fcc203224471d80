//! HTTP publish (docs/PROTOCOL.md 9.12): `POST`/`PUT /log/<path>` with the event's data as the
//! body, and `POST /publish` with a JSON array of `{"path", "data"}`.
//!
//! Both go through the same engine queue as a WebSocket send (group commit, fan-out, the same
//! store limits and error reasons); a `201` (or a `timestamp` item) is given when the engine
//! completes the event, exactly when a WebSocket send is acknowledged.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use ivy_client_core::path::{check_depth, normalize_with_limit};
use ivy_client_core::wire::ErrorCode;

use crate::Shared;
use crate::auth::{self, Access, Need};
use crate::engine::{Completion, Origin, Publish, PublishError, Replied};
use crate::limits::Admitted;

/// Most items in one `POST /publish`.
pub(crate) const MAX_ITEMS: usize = 1000;
/// Smallest body limit of `POST /publish` (the limit is the larger of this and twice
/// `--max-message-size`).
const MIN_BATCH_BODY: usize = 1 << 20;

const NOSNIFF: (header::HeaderName, &str) = (header::X_CONTENT_TYPE_OPTIONS, "nosniff");

fn text(status: StatusCode, reason: &str) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-cache"), NOSNIFF];
    (status, headers, format!("{reason}\n")).into_response()
}

/// Most bytes of data an event on `path` may have: what fits in a WebSocket send of it
/// (`:/path:data`, without an ack key) in `--max-message-size`.
fn data_limit(shared: &Shared, path: &str) -> usize {
    shared.config.max_message_size.saturating_sub(path.len() + 2)
}

/// Who publishes: a server API key (anything, as the application) or what a token (or none)
/// grants.
enum Writer {
    Key,
    Access(Access, bool),
}

/// The byte budget of the writer's identity (`--byte-rate-per-identity`), shared with its
/// WebSocket connections: `None` for the API key, anonymous writers and auth off.
fn identity_budget(shared: &Shared, writer: &Writer) -> Option<Arc<crate::ratelimit::IdentityBudget>> {
    match writer {
        Writer::Access(Access::Granted(p), _) => p.sub.as_deref().and_then(|sub| shared.identities.budget(sub)),
        _ => None,
    }
}

fn identity_limited(shared: &Shared) -> String {
    let c = &shared.config;
    format!(
        "too many bytes for this identity: its connections together may store {} bytes per second (bursts of {}); this send was not executed",
        c.byte_rate_per_identity, c.byte_burst_per_identity
    )
}

/// The place of an HTTP publish among the log requests in progress (`--max-log-requests`),
/// or its 503.
fn admit(shared: &Shared, connection: Option<axum::Extension<Arc<Admitted>>>) -> Result<Arc<Admitted>, Box<Response>> {
    shared.log_requests.admit(connection.and_then(|c| c.ip())).ok_or_else(|| {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "too many log requests in progress; try again shortly");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Box::new(r)
    })
}

impl Writer {
    fn origin(&self) -> Origin {
        match self {
            Writer::Key => Origin::APPLICATION,
            Writer::Access(access, _) => crate::session::origin_of(access),
        }
    }

    /// `Err` with the refusal's status and one-line reason.
    fn check(&self, path: &str) -> Result<(), (StatusCode, String)> {
        match self {
            Writer::Key => Ok(()),
            Writer::Access(access, _) if access.allows(Need::Write, path) => Ok(()),
            Writer::Access(access, true) => Err((StatusCode::FORBIDDEN, access.refusal(Need::Write, path))),
            Writer::Access(access, false) => {
                Err((StatusCode::UNAUTHORIZED, format!("a token or a server API key is needed: {}", access.refusal(Need::Write, path))))
            }
        }
    }
}

fn refusal(status: StatusCode, reason: &str) -> Response {
    if status == StatusCode::UNAUTHORIZED { auth::unauthorized(reason) } else { auth::forbidden(reason) }
}

/// The writer of a request, or its 401.
fn writer(shared: &Shared, headers: &HeaderMap, query: Option<&str>) -> Result<Writer, Box<Response>> {
    let keys = &shared.config.api_keys;
    if !keys.is_empty() && crate::http::authorized(keys, headers) {
        return Ok(Writer::Key);
    }
    // With auth off a token means nothing, but a wrong server API key is refused, not ignored.
    if !shared.auth.enabled() && !keys.is_empty() && headers.contains_key(header::AUTHORIZATION) {
        return Err(Box::new(auth::unauthorized("invalid server API key")));
    }
    match shared.auth.request_access(headers, query) {
        Ok((access, with_token)) => Ok(Writer::Access(access, with_token)),
        Err(e) if keys.is_empty() => Err(Box::new(auth::unauthorized(&e.0))),
        Err(e) => Err(Box::new(auth::unauthorized(&format!("neither a server API key nor a valid token: {}", e.0)))),
    }
}

/// Reads `body`, refusing it (`Err(None)`) once it is over `limit` bytes; `Err(Some(_))` when
/// reading failed.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Option<axum::Error>> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Some)?;
        if buf.len() + chunk.len() > limit {
            return Err(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The 503 of a server over its memory budget (the WebSocket's `overloaded`).
fn overloaded(shared: &Shared) -> Option<Response> {
    let budget = &shared.budget;
    if !budget.is_over() {
        return None;
    }
    let msg = format!(
        "event not stored: the server is overloaded: it holds {} bytes for its clients, its memory budget is {}; retry later",
        budget.used(),
        budget.limit()
    );
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, &msg);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Some(r)
}

/// The status, wire code and one-line reason of a failed publish (the reasons of the
/// WebSocket's error lines).
fn failure(e: &PublishError) -> (StatusCode, ErrorCode, String) {
    match e {
        PublishError::Storage(e) if e.kind() == std::io::ErrorKind::NotConnected => {
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Storage, PublishError::storage_reason(e).into())
        }
        PublishError::Storage(e) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Storage, PublishError::storage_reason(e).into()),
        PublishError::StoreFull(_) => (StatusCode::INSUFFICIENT_STORAGE, ErrorCode::StoreFull, e.to_string()),
        PublishError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ShuttingDown, e.to_string()),
        PublishError::InvalidPath(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadPath, e.to_string()),
        PublishError::InvalidId => (StatusCode::BAD_REQUEST, ErrorCode::Malformed, e.to_string()),
    }
}

/// A publish request for the engine (with its send id, if any), and where its outcome
/// arrives.
fn request(
    path: &str,
    data: Bytes,
    origin: Origin,
    id: Option<Bytes>,
) -> (Publish, tokio::sync::oneshot::Receiver<Result<Replied, PublishError>>) {
    let (done, rx) = Completion::channel_with_replay();
    let mut request = Publish::new(path, data, done);
    request.origin = origin;
    request.id = id;
    (request, rx)
}

/// The outcome of a queued request (a dropped completion: the engine stopped).
async fn outcome(rx: tokio::sync::oneshot::Receiver<Result<Replied, PublishError>>) -> Result<Replied, PublishError> {
    rx.await.unwrap_or(Err(PublishError::ShuttingDown))
}

/// The header that makes an HTTP publish idempotent (`docs/PROTOCOL.md` 9.12).
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header of a repeat's answer.
const REPLAYED: &str = "idempotent-replayed";
/// Longest `Idempotency-Key` of `POST /publish`: item `i` gets the id `KEY.i`, which must fit
/// in 64 bytes.
const MAX_BATCH_KEY: usize = ivy_client_core::wire::MAX_SEND_ID_BYTES - 7;

/// Why a send id is refused (the WebSocket's `malformed` reason).
const BAD_ID: &str = "a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -";

/// The refusal of an `Idempotency-Key` (or per-item ids) by an engine that does not honour send
/// ids ([`crate::engine::Engine::send_ids`]): retried, such a publish could be stored twice.
const NO_SEND_IDS: &str = "send ids (Idempotency-Key, per-item ids) are not supported by this server's engine; nothing was stored";

/// The request's `Idempotency-Key`, if it has one, or its 400.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<Bytes>, Box<Response>> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Box::new(text(StatusCode::BAD_REQUEST, "one Idempotency-Key header at most")));
    }
    if !ivy_client_core::wire::is_valid_send_id(value.as_bytes()) {
        return Err(Box::new(text(StatusCode::BAD_REQUEST, &format!("invalid Idempotency-Key: {BAD_ID}; nothing was stored"))));
    }
    Ok(Some(Bytes::copy_from_slice(value.as_bytes())))
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")))
}

/// The channel of `/log/<path>` (the log endpoint's rule), or its 400.
fn log_path(shared: &Shared, uri: &Uri) -> Result<String, Box<Response>> {
    let raw = uri.path().strip_prefix("/log").unwrap_or("");
    let raw = raw.replace("%2e", ".").replace("%2E", ".");
    normalize(shared, &raw).map_err(|e| Box::new(text(StatusCode::BAD_REQUEST, &format!("invalid path: {e}"))))
}

fn normalize(shared: &Shared, raw: &str) -> Result<String, ivy_client_core::path::PathError> {
    normalize_with_limit(raw.as_bytes(), shared.config.max_path_length)
        .and_then(|p| check_depth(&p, shared.config.max_path_depth).map(|()| p))
        .map(|p| p.into_owned())
}

/// `POST` and `PUT /log/<path>`: the body is the event's data.
pub(crate) async fn log(
    State(shared): State<Arc<Shared>>,
    connection: Option<axum::Extension<Arc<Admitted>>>,
    uri: Uri,
    OriginalUri(original): OriginalUri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = match log_path(&shared, &uri) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let writer = match writer(&shared, &headers, query.as_deref()) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let id = match idempotency_key(&headers) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    if id.is_some() && !shared.engine.send_ids() {
        return text(StatusCode::NOT_IMPLEMENTED, NO_SEND_IDS);
    }
    if let Err((status, reason)) = writer.check(&path) {
        return refusal(status, &reason);
    }
    let _place = match admit(&shared, connection) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = data_limit(&shared, &path);
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the data of an event on {path} is at most {limit} bytes (--max-message-size less the send command's path)"),
        )
    };
    if content_length(&headers).is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    if let Some(r) = overloaded(&shared) {
        return r;
    }
    let data = match read_body(body, limit).await {
        Ok(d) => d,
        Err(None) => return too_large(),
        Err(Some(e)) => {
            tracing::debug!(error = %e, "reading a publish body failed");
            return text(StatusCode::BAD_REQUEST, "reading the request body failed");
        }
    };
    if let Err(e) = std::str::from_utf8(&data) {
        let reason = format!("the body must be UTF-8 text (an event's data is text): invalid byte at offset {}", e.valid_up_to());
        return text(StatusCode::UNSUPPORTED_MEDIA_TYPE, &reason);
    }
    if let Some(identity) = identity_budget(&shared, &writer) {
        if !identity.fits() {
            return text(StatusCode::TOO_MANY_REQUESTS, &identity_limited(&shared));
        }
        identity.spend(crate::engine::stored_cost(&path, data.len()).1 as u64);
    }
    let _charge = (shared.budget.limit() != 0).then(|| shared.budget.charge(data.len()));
    let (request, rx) = request(&path, data, writer.origin(), id);
    shared.publisher.publish(request).await;
    match outcome(rx).await {
        Ok(Replied { ts, replayed }) => {
            let (content_type, body) = if wants_json(&headers) {
                ("application/json", format!("{{\"timestamp\":\"{ts}\"}}\n"))
            } else {
                ("text/plain; charset=utf-8", format!("{ts}\n"))
            };
            let mut r = (StatusCode::CREATED, [(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache"), NOSNIFF], body)
                .into_response();
            // The log page that starts with this event (timestamps are unique).
            let location = format!("{}?after={}&limit=1", original.path(), ts.prev());
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            // A repeat of a stored send (same sender and Idempotency-Key): nothing was stored.
            if replayed {
                r.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
            }
            r
        }
        Err(e) => {
            let (status, _, reason) = failure(&e);
            let mut r = text(status, &reason);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    path: String,
    data: String,
    /// The item's send id (`docs/PROTOCOL.md` 9.12).
    #[serde(default)]
    id: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum ItemResult {
    Replayed { timestamp: String, replayed: bool },
    Stored { timestamp: String },
    Failed { error: ItemError },
}

#[derive(serde::Serialize)]
struct ItemError {
    code: &'static str,
    message: String,
}

/// `POST /publish`: a JSON array of `{"path", "data"}`, stored in one group commit; answers
/// one result per item, in order.
pub(crate) async fn batch(
    State(shared): State<Arc<Shared>>,
    connection: Option<axum::Extension<Arc<Admitted>>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let writer = match writer(&shared, &headers, query.as_deref()) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let key = match idempotency_key(&headers) {
        Ok(Some(k)) if k.len() > MAX_BATCH_KEY => {
            let reason = format!(
                "the Idempotency-Key of POST /publish is at most {MAX_BATCH_KEY} bytes (item i gets the id KEY.i); nothing was stored"
            );
            return text(StatusCode::BAD_REQUEST, &reason);
        }
        Ok(k) => k,
        Err(r) => return *r,
    };
    let _place = match admit(&shared, connection) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = shared.config.max_message_size.saturating_mul(2).max(MIN_BATCH_BODY);
    let too_large = || text(StatusCode::PAYLOAD_TOO_LARGE, &format!("the body of POST /publish is at most {limit} bytes"));
    if content_length(&headers).is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    if let Some(r) = overloaded(&shared) {
        return r;
    }
    let raw = match read_body(body, limit).await {
        Ok(d) => d,
        Err(None) => return too_large(),
        Err(Some(e)) => {
            tracing::debug!(error = %e, "reading a publish body failed");
            return text(StatusCode::BAD_REQUEST, "reading the request body failed");
        }
    };
    let items: Vec<Item> = match serde_json::from_slice(&raw) {
        Ok(items) => items,
        Err(e) => {
            let reason = format!("the body must be a JSON array of {{\"path\": \"...\", \"data\": \"...\"}} (and an optional \"id\"): {e}");
            return text(StatusCode::BAD_REQUEST, &reason.replace('\n', " "));
        }
    };
    if items.len() > MAX_ITEMS {
        return text(StatusCode::PAYLOAD_TOO_LARGE, &format!("at most {MAX_ITEMS} items per POST /publish, not {}", items.len()));
    }
    // Checked whole before anything is stored: paths, sizes and ids refuse the request.
    if (key.is_some() || items.iter().any(|item| item.id.is_some())) && !shared.engine.send_ids() {
        return text(StatusCode::NOT_IMPLEMENTED, NO_SEND_IDS);
    }
    if key.is_some() && items.iter().any(|item| item.id.is_some()) {
        return text(StatusCode::BAD_REQUEST, "use either the Idempotency-Key header or per-item ids, not both; nothing was stored");
    }
    let mut paths = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if item.id.as_ref().is_some_and(|id| !ivy_client_core::wire::is_valid_send_id(id.as_bytes())) {
            return text(StatusCode::BAD_REQUEST, &format!("item {i}: invalid id: {BAD_ID}; nothing was stored"));
        }
        let path = match normalize(&shared, &item.path) {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("item {i}: invalid path: {e}")),
        };
        let max = data_limit(&shared, &path);
        if item.data.len() > max {
            let reason = format!("item {i}: the data of an event on {path} is at most {max} bytes, this one has {}", item.data.len());
            return text(StatusCode::PAYLOAD_TOO_LARGE, &reason);
        }
        paths.push(path);
    }
    let _charge = (shared.budget.limit() != 0).then(|| shared.budget.charge(raw.len()));
    drop(raw);
    let origin = writer.origin();
    let identity = identity_budget(&shared, &writer);
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(items.len());
    let mut requests = Vec::new();
    let mut waiting = Vec::new();
    for (i, (item, path)) in items.into_iter().zip(&paths).enumerate() {
        let id = match (&key, item.id) {
            (Some(k), _) => {
                let mut id = bytes::BytesMut::with_capacity(k.len() + 4);
                id.extend_from_slice(k);
                id.extend_from_slice(format!(".{i}").as_bytes());
                Some(id.freeze())
            }
            (None, id) => id.map(Bytes::from),
        };
        let limited = || identity.as_ref().is_some_and(|i| !i.fits());
        match writer.check(path) {
            Ok(()) if limited() => results.push(Some(ItemResult::Failed {
                error: ItemError { code: ErrorCode::RateLimited.as_str(), message: identity_limited(&shared) },
            })),
            Ok(()) => {
                if let Some(i) = &identity {
                    i.spend(crate::engine::stored_cost(path, item.data.len()).1 as u64);
                }
                let (request, rx) = request(path, Bytes::from(item.data), origin.clone(), id);
                requests.push(request);
                waiting.push((results.len(), rx));
                results.push(None);
            }
            Err((_, message)) => {
                results.push(Some(ItemResult::Failed { error: ItemError { code: ErrorCode::Forbidden.as_str(), message } }))
            }
        }
    }
    shared.publisher.publish_batch(requests).await;
    for (i, rx) in waiting {
        results[i] = Some(match outcome(rx).await {
            Ok(Replied { ts, replayed: true }) => ItemResult::Replayed { timestamp: ts.to_string(), replayed: true },
            Ok(Replied { ts, .. }) => ItemResult::Stored { timestamp: ts.to_string() },
            Err(e) => {
                let (_, code, message) = failure(&e);
                ItemResult::Failed { error: ItemError { code: code.as_str(), message } }
            }
        });
    }
    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let mut body = serde_json::to_vec(&results).unwrap_or_else(|_| b"[]".to_vec());
    body.push(b'\n');
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache"), NOSNIFF], body).into_response()
}
