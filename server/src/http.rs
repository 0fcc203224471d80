//! The HTTP log endpoint: `GET /log/<path>`, read through the engine.
//!
//! Whole-log and `n=K` reads are streamed as a sequence of pages of about [`CHUNK`] bytes, so
//! a large log never sits in memory; cursor pages (`after`, `limit`) are bounded by the page
//! limit.

use std::io;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ivy_client_core::Timestamp;
use ivy_client_core::path::{check_depth, normalize_with_limit};

use crate::Shared;
use crate::auth::{self, Need};
use crate::engine::{DeleteRequest, Engine, Horizon, ReadRequest};
use crate::limits::Admitted;
use crate::logquery::{self, LogQuery};

/// Size of the chunks a streamed log is sent in.
const CHUNK: usize = 64 * 1024;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_CACHE: &str = "no-cache";
/// The same for a page that needed a token: never stored by a shared cache.
const PRIVATE_IMMUTABLE: &str = "private, max-age=31536000, immutable";
const PRIVATE_NO_CACHE: &str = "private, no-cache";
/// Browsers must not guess another type than the `text/plain` of a log (whose lines anyone
/// can write).
const NOSNIFF: (header::HeaderName, &str) = (header::X_CONTENT_TYPE_OPTIONS, "nosniff");

fn bad_request(reason: impl Into<String>) -> Response {
    let mut body = reason.into();
    body.push('\n');
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF], body)
        .into_response()
}

/// A failed read: the details go to the server's log, not to the client.
fn server_error(e: io::Error) -> Response {
    tracing::error!(error = %e, "reading the log failed");
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF];
    (StatusCode::INTERNAL_SERVER_ERROR, headers, "reading the log failed; the server's log has the details\n").into_response()
}

/// The tag of a body: its newest event, and how many deletions changed the log (a body is
/// determined by both), and `+sender` for the extended lines (`ext=sender`: other bytes).
fn etag(newest: Option<Timestamp>, horizon: Option<Horizon>, senders: bool) -> String {
    let newest = newest.map_or("empty".to_string(), |ts| ts.to_string());
    let ext = if senders { "+sender" } else { "" };
    match horizon {
        Some(h) => format!("\"{newest}-{}{ext}\"", h.deletions),
        None => format!("\"{newest}{ext}\""),
    }
}

fn if_none_match(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*")
}

/// The header that states a log's horizon: the newest event deleted from it.
pub(crate) const HORIZON: &str = "ivy-horizon";

/// The pieces of a log response.
struct Meta {
    newest: Option<Timestamp>,
    cache: &'static str,
    link: Option<String>,
    horizon: Option<Horizon>,
    /// Served on a token's grant (not the anonymous ones): `Vary: Authorization`.
    private: bool,
    /// The extended lines (`ext=sender`).
    senders: bool,
}

fn respond(headers: &HeaderMap, meta: Meta, body: impl FnOnce() -> Body) -> Response {
    let tag = etag(meta.newest, meta.horizon, meta.senders);
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(meta.cache));
    h.insert(NOSNIFF.0, HeaderValue::from_static(NOSNIFF.1));
    if meta.private {
        h.append(header::VARY, HeaderValue::from_static("Authorization"));
    }
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    if let Some(ts) = meta.newest {
        let when = UNIX_EPOCH + Duration::from_secs(ts.secs());
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(when)) {
            h.insert(header::LAST_MODIFIED, v);
        }
    }
    if let Some(link) = meta.link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LINK, link);
    }
    if meta.senders {
        h.insert(crate::ws::IVY_EXTENSIONS, HeaderValue::from_static(ivy_client_core::http::EXT_SENDER));
    }
    if let Some(horizon) = meta.horizon.and_then(|h| HeaderValue::from_str(&h.newest.to_string()).ok()) {
        h.insert(HORIZON, horizon);
    }
    if if_none_match(headers, &tag) {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    (StatusCode::OK, h, body()).into_response()
}

/// `GET /log`, `/log/` and `/log/<path>`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    connection: Option<axum::Extension<Arc<Admitted>>>,
    method: Method,
    uri: Uri,
    OriginalUri(original): OriginalUri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // Counted until the response is built, and a streamed log until its body is sent.
    let Some(place) = shared.log_requests.admit(connection.and_then(|c| c.ip())) else {
        let headers =
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::RETRY_AFTER, "1"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF];
        return (StatusCode::SERVICE_UNAVAILABLE, headers, "too many log requests in progress; try again shortly\n").into_response();
    };
    // A HEAD request gets the headers of the GET, and no body is read for it.
    let head = method == Method::HEAD;
    let path = match log_path(&shared, &uri) {
        Ok(p) => p,
        Err(response) => return *response,
    };
    // Verified once per request; the grant covers the path or the request is refused.
    match shared.auth.request_access(&headers, query.as_deref()) {
        Err(e) => {
            tracing::debug!(uri = %auth::Redacted(&original), reason = %e, "log request refused: invalid token");
            return auth::unauthorized(&e.0);
        }
        Ok((access, with_token)) if !access.allows(Need::Read, &path) => {
            let reason = access.refusal(Need::Read, &path);
            return if with_token { auth::forbidden(&reason) } else { auth::unauthorized(&format!("a token is needed: {reason}")) };
        }
        Ok(_) => {}
    }
    let private = shared.auth.read_needs_token(&path);
    let (immutable_cache, no_cache) = if private { (PRIVATE_IMMUTABLE, PRIVATE_NO_CACHE) } else { (IMMUTABLE, NO_CACHE) };
    // `ext=sender`: the extended lines, with their senders (docs/PROTOCOL.md 9.9).
    let senders = ivy_client_core::http::wants_senders(query.as_deref());
    let query = match logquery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(reason) => return bad_request(reason.to_string()),
    };
    let engine = shared.engine.clone();
    // Only durable events are shown (see `Engine::visible`).
    let visible = engine.visible();
    tracing::trace!(path = %path, query = ?query, visible = %visible, head, "log request");
    match query {
        LogQuery::Page { after, limit } => {
            let cap = shared.config.log_page_limit.max(1);
            let effective = limit.map_or(cap, |l| usize::try_from(l.get()).unwrap_or(usize::MAX).min(cap));
            let mut request = ReadRequest::new(path.as_str(), after, visible, effective)
                .max_bytes(shared.config.log_page_bytes.max(1))
                .with_senders(senders);
            if head {
                request = request.without_lines();
            }
            let page = match engine.read(request).await {
                Ok(page) => page,
                Err(e) => return server_error(e),
            };
            tracing::trace!(path = %path, events = page.count, first = ?page.first, last = ?page.last, "log page");
            let full = page.count == effective;
            // A page that reached the byte cap first may be followed too, but its extent
            // depends on the server's configuration: not immutable.
            let more = full || (!head && page.lines.len() >= shared.config.log_page_bytes.max(1));
            let immutable = full && limit.map(NonZeroU64::get) == Some(effective as u64);
            let newest = page.last;
            let link = more.then(|| {
                let last = newest.map_or(String::new(), |t| t.to_string());
                // The path as requested, so that the link works under any mount point.
                let ext = if senders { "&ext=sender" } else { "" };
                format!("<{}?after={last}&limit={effective}{ext}>; rel=\"next\"", original.path())
            });
            let meta =
                Meta { newest, cache: if immutable { immutable_cache } else { no_cache }, link, horizon: page.horizon, private, senders };
            respond(&headers, meta, || Body::from(page.lines))
        }
        LogQuery::All | LogQuery::Last(_) => {
            let (start_after, newest, horizon) = match stream_bounds(&*engine, &path, query, visible).await {
                Ok(b) => b,
                Err(e) => return server_error(e),
            };
            tracing::trace!(path = %path, after = ?start_after, until = ?newest, "log stream");
            let meta = Meta { newest, cache: no_cache, link: None, horizon, private, senders };
            respond(&headers, meta, move || match newest {
                Some(until) if !head => stream_body(engine, path, (start_after, until), senders, place),
                _ => Body::empty(),
            })
        }
    }
}

/// The channel of a log request (`/log/<path>`), or the 400 that refuses it.
fn log_path(shared: &Shared, uri: &Uri) -> Result<String, Box<Response>> {
    let raw = uri.path().strip_prefix("/log").unwrap_or("");
    // `%2e` is the only escape in a log path: a `.` written so that HTTP clients keep the
    // channel's `.` and `..` segments (they remove dot segments).
    let unescaped;
    let raw = if raw.contains('%') {
        unescaped = raw.replace("%2e", ".").replace("%2E", ".");
        unescaped.as_str()
    } else {
        raw
    };
    normalize_with_limit(raw.as_bytes(), shared.config.max_path_length)
        .and_then(|p| check_depth(&p, shared.config.max_path_depth).map(|()| p))
        .map(|p| p.into_owned())
        .map_err(|e| Box::new(bad_request(format!("invalid path: {e}"))))
}

/// Whether `headers` carry `Authorization: Bearer K` with K one of `keys` (compared in
/// constant time).
pub(crate) fn authorized(keys: &[String], headers: &HeaderMap) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, token)) = given.trim().split_once(' ') else { return false };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let token = token.trim().as_bytes();
    // Every key is compared, so the time does not tell which one nearly matched.
    keys.iter().fold(false, |found, k| found | bool::from(subtle::ConstantTimeEq::ct_eq(k.as_bytes(), token)))
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF], format!("{body}\n"))
        .into_response()
}

/// `DELETE /log/<path>[?before=TS]` with a server API key: deletes the channel's history (its
/// whole subtree, as `GET` shows it), or its events older than `TS`, and answers what was
/// deleted as JSON.
pub(crate) async fn delete(State(shared): State<Arc<Shared>>, uri: Uri, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    if shared.config.api_keys.is_empty() {
        return text(StatusCode::FORBIDDEN, "deleting a log needs a server API key, and none is configured (--api-key)");
    }
    if !authorized(&shared.config.api_keys, &headers) {
        let mut r = text(StatusCode::UNAUTHORIZED, "deleting a log needs a server API key: Authorization: Bearer KEY");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = match log_path(&shared, &uri) {
        Ok(p) => p,
        Err(response) => return *response,
    };
    let before = match delete_query(query.as_deref()) {
        Ok(b) => b,
        Err(reason) => return bad_request(reason),
    };
    let engine = shared.engine.clone();
    let deleted = match engine.delete(DeleteRequest::new(path.as_str(), before)).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, channel = %path, "deleting a log failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "deleting the log failed; the server's log has the details");
        }
    };
    let horizon = match engine.read(ReadRequest::new(path.as_str(), None, engine.visible(), 0)).await {
        Ok(page) => page.horizon.map(|h| h.newest),
        Err(e) => return server_error(e),
    };
    let ts = |t: Option<Timestamp>| t.map_or("null".to_string(), |t| format!("\"{t}\""));
    // Paths are `[0-9a-z./-]`: nothing to escape in JSON.
    let body = format!(
        "{{\"channel\":\"{path}\",\"before\":{},\"deleted\":{},\"newest_deleted\":{},\"horizon\":{}}}\n",
        ts(before),
        deleted.events,
        ts(deleted.newest),
        ts(horizon)
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF], body).into_response()
}

/// The query of a deletion: `before=TS` (optional; with or without `@`), nothing else.
fn delete_query(raw: Option<&str>) -> Result<Option<Timestamp>, String> {
    let mut before = None;
    for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        if name != "before" {
            return Err(format!("unknown parameter {name} (a deletion takes only before=TS)"));
        }
        if before.is_some() {
            return Err("parameter before given more than once".into());
        }
        let value = value.strip_prefix("%40").or_else(|| value.strip_prefix('@')).unwrap_or(value);
        before = Some(Timestamp::parse(value.as_bytes()).map_err(|e| format!("invalid before timestamp: {e}"))?);
    }
    Ok(before)
}

/// For a streamed read: the exclusive start, the newest event (the stream's end, so that
/// the body matches its ETag even while events keep arriving) and the log's horizon.
async fn stream_bounds(
    engine: &dyn Engine,
    path: &str,
    q: LogQuery,
    until: Timestamp,
) -> io::Result<(Option<Timestamp>, Option<Timestamp>, Option<Horizon>)> {
    let want = match q {
        LogQuery::Last(k) => usize::try_from(k.get()).unwrap_or(usize::MAX),
        _ => 1,
    };
    let page = engine.read(ReadRequest::new(path, None, until, want).backward().without_lines()).await?;
    // Backward: the first is the newest, the last the oldest.
    let (newest, oldest) = (page.first, page.last);
    let start_after = match q {
        LogQuery::Last(_) => oldest.filter(|&t| t != Timestamp::ZERO).map(Timestamp::prev),
        _ => None,
    };
    Ok((start_after, newest, page.horizon))
}

/// The body of a streamed read: pages of about [`CHUNK`] bytes, read one after another as
/// the client takes them, joined by newlines.
fn stream_body(
    engine: Arc<dyn Engine>,
    path: String,
    (after, until): (Option<Timestamp>, Timestamp),
    senders: bool,
    place: Arc<Admitted>,
) -> Body {
    struct Cursor {
        engine: Arc<dyn Engine>,
        path: String,
        after: Option<Timestamp>,
        until: Timestamp,
        senders: bool,
        first: bool,
        done: bool,
        /// The request's place among the log requests in progress.
        _place: Arc<Admitted>,
    }
    let cursor = Cursor { engine, path, after, until, senders, first: true, done: false, _place: place };
    Body::from_stream(futures_util::stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        let request = ReadRequest::new(c.path.as_str(), c.after, c.until, usize::MAX).max_bytes(CHUNK).with_senders(c.senders);
        match c.engine.read(request).await {
            Ok(page) if page.count == 0 => None,
            Ok(page) => {
                let mut chunk = Vec::with_capacity(page.lines.len() + 1);
                if !c.first {
                    chunk.push(b'\n');
                }
                chunk.extend_from_slice(&page.lines);
                c.first = false;
                c.after = page.last;
                c.done = page.last >= Some(c.until);
                Some((Ok::<_, io::Error>(Bytes::from(chunk)), c))
            }
            Err(e) => {
                tracing::error!(error = %e, "streaming the log failed");
                c.done = true;
                Some((Err(e), c))
            }
        }
    }))
}

/// Whether the `Host` header names one of `allowed` (an entry without a port allows any).
pub(crate) fn host_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    // `[::1]:8080`, `example.com:8080`, `example.com`.
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(host) || (!a.contains(':') || a.ends_with(']')) && a.eq_ignore_ascii_case(name))
}

/// Middleware (with `--allowed-host`): 421 for a request to another host name.
pub(crate) async fn host_guard(State(shared): State<Arc<Shared>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if host_allowed(&shared.config.allowed_hosts, req.headers()) {
        return next.run(req).await;
    }
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_CACHE), NOSNIFF];
    (StatusCode::MISDIRECTED_REQUEST, headers, "host not allowed\n").into_response()
}

/// Answers `OPTIONS` preflights for the log endpoint.
pub(crate) async fn preflight() -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PUT, OPTIONS"));
    // `Authorization` by name: a wildcard would not cover it. `Content-Type` for publishing
    // (`POST`, `PUT`) a body that is not a form's, `Idempotency-Key` for its send id.
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("If-None-Match, Authorization, Content-Type, Idempotency-Key"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    (StatusCode::NO_CONTENT, h).into_response()
}

/// Adds CORS headers for an allowed `Origin`. With a restricted origin list the answer
/// depends on `Origin`, so `Vary: Origin` is always sent for caches.
fn cors_headers(allowed: &[String], req: &HeaderMap, out: &mut HeaderMap) {
    let any = allowed.is_empty() || allowed.iter().any(|a| a == "*");
    if !any {
        out.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let Some(origin) = req.get(header::ORIGIN) else { return };
    if any {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else if crate::ws::origin_allowed(allowed, req) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    } else {
        return;
    }
    out.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Link, ETag, Last-Modified, Location, Ivy-Horizon, Ivy-Extensions, WWW-Authenticate, Idempotent-Replayed"),
    );
}

/// Middleware: CORS headers on every log response, errors included.
pub(crate) async fn cors_layer(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let req_headers = req.headers().clone();
    let mut resp = next.run(req).await;
    cors_headers(&shared.config.allowed_origins, &req_headers, resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_with_and_without_ports() {
        let allowed = ["chat.example".to_string(), "localhost:8080".to_string(), "[::1]".to_string()];
        let ok = |host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            host_allowed(&allowed, &h)
        };
        assert!(ok("chat.example") && ok("CHAT.example:443") && ok("localhost:8080") && ok("[::1]:9000") && ok("[::1]"));
        assert!(!ok("localhost") && !ok("localhost:8081") && !ok("evil.example") && !ok("chat.example.evil"));
        assert!(!host_allowed(&allowed, &HeaderMap::new()), "no Host header");
    }
}
