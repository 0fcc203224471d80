//! The HTTP log endpoint: `GET /log/<path>`.
//!
//! Whole-log and `n=K` reads are streamed in chunks from a blocking thread, so a large log
//! never sits in memory; cursor pages (`after`, `limit`) are bounded by the page limit.

use std::io;
use std::num::NonZeroU64;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ivy_client_core::Timestamp;
use ivy_client_core::path::normalize_with_limit;
use tokio::sync::mpsc;

use crate::Shared;
use crate::logquery::{self, LogQuery};
use crate::store::{Direction, EventLog};

/// Size of the chunks a streamed log is sent in.
const CHUNK: usize = 64 * 1024;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_CACHE: &str = "no-cache";

fn bad_request(reason: impl Into<String>) -> Response {
    let mut body = reason.into();
    body.push('\n');
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, NO_CACHE)], body)
        .into_response()
}

fn server_error(e: io::Error) -> Response {
    tracing::error!(error = %e, "reading the log failed");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("reading the log failed: {e}\n")).into_response()
}

fn etag(newest: Option<Timestamp>) -> String {
    match newest {
        Some(ts) => format!("\"{ts}\""),
        None => "\"empty\"".to_string(),
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

/// The pieces of a log response.
struct Meta {
    newest: Option<Timestamp>,
    cache: &'static str,
    link: Option<String>,
}

fn respond(headers: &HeaderMap, meta: Meta, body: impl FnOnce() -> Body) -> Response {
    let tag = etag(meta.newest);
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(meta.cache));
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
    if if_none_match(headers, &tag) {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    (StatusCode::OK, h, body()).into_response()
}

/// `GET /log`, `/log/` and `/log/<path>`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    OriginalUri(original): OriginalUri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let raw = uri.path().strip_prefix("/log").unwrap_or("");
    let path = match normalize_with_limit(raw.as_bytes(), shared.config.max_path_length) {
        Ok(p) => p.into_owned(),
        Err(e) => return bad_request(format!("invalid path: {e}")),
    };
    let query = match logquery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(reason) => return bad_request(reason.to_string()),
    };
    let log = shared.log.clone();
    // Only durable events are shown (see `Watermark`).
    let visible = shared.visible.get();
    match query {
        LogQuery::Page { after, limit } => {
            let cap = shared.config.log_page_limit.max(1);
            let effective = limit.map_or(cap, |l| usize::try_from(l.get()).unwrap_or(usize::MAX).min(cap));
            let p = path.clone();
            let page = tokio::task::spawn_blocking(move || read_page(&*log, &p, after, visible, effective)).await;
            let (body, count, newest) = match page {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => return server_error(e),
                Err(e) => return server_error(io::Error::other(e)),
            };
            let full = count == effective;
            let immutable = full && limit.map(NonZeroU64::get) == Some(effective as u64);
            let link = full.then(|| {
                let last = newest.map_or(String::new(), |t| t.to_string());
                // The path as requested, so that the link works under any mount point.
                format!("<{}?after={last}&limit={effective}>; rel=\"next\"", original.path())
            });
            let meta = Meta { newest, cache: if immutable { IMMUTABLE } else { NO_CACHE }, link };
            respond(&headers, meta, || Body::from(body))
        }
        LogQuery::All | LogQuery::Last(_) => {
            let (p, q) = (path.clone(), query);
            let log2 = log.clone();
            let bounds = tokio::task::spawn_blocking(move || stream_bounds(&*log2, &p, q, visible)).await;
            let (start_after, newest) = match bounds {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return server_error(e),
                Err(e) => return server_error(io::Error::other(e)),
            };
            let meta = Meta { newest, cache: NO_CACHE, link: None };
            respond(&headers, meta, move || match newest {
                None => Body::empty(),
                Some(until) => stream_body(log, path, start_after, until),
            })
        }
    }
}

/// Reads one cursor page: the body, the number of events and the newest one.
fn read_page(
    log: &dyn EventLog,
    path: &str,
    after: Option<Timestamp>,
    until: Timestamp,
    limit: usize,
) -> io::Result<(Vec<u8>, usize, Option<Timestamp>)> {
    let mut body = Vec::new();
    let mut count = 0;
    let mut newest = None;
    log.scan(path, after, Some(until), Direction::Forward, &mut |ts, load| {
        if count > 0 {
            body.push(b'\n');
        }
        load(&mut body)?;
        count += 1;
        newest = Some(ts);
        Ok(if count >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    })?;
    Ok((body, count, newest))
}

/// For a streamed read: the exclusive start and the newest event (the stream's end, so that
/// the body matches its ETag even while events keep arriving).
fn stream_bounds(log: &dyn EventLog, path: &str, q: LogQuery, until: Timestamp) -> io::Result<(Option<Timestamp>, Option<Timestamp>)> {
    let want = match q {
        LogQuery::Last(k) => k.get(),
        _ => 1,
    };
    let mut newest = None;
    let mut oldest = None;
    let mut seen = 0u64;
    log.scan(path, None, Some(until), Direction::Backward, &mut |ts, _| {
        newest.get_or_insert(ts);
        oldest = Some(ts);
        seen += 1;
        Ok(if seen >= want { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    })?;
    let start_after = match q {
        LogQuery::Last(_) => oldest.filter(|&t| t != Timestamp::ZERO).map(Timestamp::prev),
        _ => None,
    };
    Ok((start_after, newest))
}

fn stream_body(log: Arc<dyn EventLog>, path: String, after: Option<Timestamp>, until: Timestamp) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(CHUNK + 1024);
        let mut first = true;
        let r = log.scan(&path, after, Some(until), Direction::Forward, &mut |_, load| {
            if !first {
                buf.push(b'\n');
            }
            first = false;
            load(&mut buf)?;
            if buf.len() >= CHUNK {
                let chunk = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 1024)));
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(ControlFlow::Break(())); // client went away
                }
            }
            Ok(ControlFlow::Continue(()))
        });
        let _ = match r {
            Ok(()) if !buf.is_empty() => tx.blocking_send(Ok(Bytes::from(buf))),
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "streaming the log failed");
                tx.blocking_send(Err(e))
            }
        };
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

/// Answers `OPTIONS` preflights for the log endpoint.
pub(crate) async fn preflight() -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("If-None-Match"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    (StatusCode::NO_CONTENT, h).into_response()
}
