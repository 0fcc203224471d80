//! `GET /channels` (`docs/PROTOCOL.md` 9.14): the channels with a log or with subscribers on
//! this node, in a subtree, page by page, filtered by what the caller may read.
//!
//! A page merges two sorted ranges: the engine's channels with stored events
//! ([`crate::engine::Engine::channels`], a key range of the store) and the fan-out's subscribed
//! channels ([`crate::fanout::FanOut::channels`], a range of each shard's sorted names). What
//! the caller may read narrows the ranges before they are read: the prefix intersected with each
//! read grant gives at most one subtree per grant, and only those are listed. So a page costs
//! its own size (times the caller's grants), never the number of channels on the server.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, check_depth, is_within, normalize_with_limit};

use crate::Shared;
use crate::auth::{self, Access};
use crate::engine::ChannelsRequest;
use crate::limits::Admitted;

/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 1000;

const NOSNIFF: (header::HeaderName, &str) = (header::X_CONTENT_TYPE_OPTIONS, "nosniff");

fn text(status: StatusCode, reason: &str) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store"), NOSNIFF];
    (status, headers, format!("{reason}\n")).into_response()
}

/// A parsed query.
#[derive(Debug, PartialEq, Eq)]
struct Query {
    prefix: String,
    after: Option<String>,
    limit: usize,
}

fn path_param(shared: &Shared, name: &str, raw: &str) -> Result<String, String> {
    let value = percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|_| format!("invalid {name}: not UTF-8"))?;
    normalize_with_limit(value.as_bytes(), shared.config.max_path_length)
        .and_then(|p| check_depth(&p, shared.config.max_path_depth).map(|()| p))
        .map(|p| p.into_owned())
        .map_err(|e| format!("invalid {name}: {e}"))
}

/// `prefix`, `after`, `limit`; other parameters (`token`) are ignored, as by the log.
fn parse(shared: &Shared, raw: Option<&str>) -> Result<Query, String> {
    let mut q = Query { prefix: ROOT.into(), after: None, limit: DEFAULT_LIMIT };
    let (mut prefix, mut after, mut limit) = (false, false, false);
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let seen = match name {
            "prefix" => &mut prefix,
            "after" => &mut after,
            "limit" => &mut limit,
            _ => continue,
        };
        if std::mem::replace(seen, true) {
            return Err(format!("parameter {name} given more than once"));
        }
        match name {
            "prefix" => q.prefix = path_param(shared, "prefix", value)?,
            "after" => q.after = Some(path_param(shared, "after", value)?),
            _ => {
                q.limit = match value.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                    _ => return Err(format!("invalid limit {value:?}: a number from 1 to {MAX_LIMIT}")),
                }
            }
        }
    }
    Ok(q)
}

/// Whether a grant on `grant` covers `path` (both normalized).
fn covers(grant: &str, path: &str) -> bool {
    grant == ROOT || is_within(path, grant)
}

/// The subtrees to list: `prefix`'s subtree intersected with each grant's (`None`: every
/// path), none covering another (so they are disjoint).
fn roots<'a>(prefix: &'a str, grants: Option<impl Iterator<Item = &'a str>>) -> Vec<&'a str> {
    let Some(grants) = grants else { return vec![prefix] };
    let mut roots: Vec<&str> = grants
        .filter_map(|g| {
            if covers(g, prefix) {
                Some(prefix)
            } else if covers(prefix, g) {
                Some(g)
            } else {
                None
            }
        })
        .collect();
    roots.sort_unstable();
    roots.dedup();
    let all = roots.clone();
    roots.retain(|r| !all.iter().any(|o| o != r && covers(o, r)));
    roots
}

/// `GET /channels`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    connection: Option<axum::Extension<Arc<Admitted>>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(_place) = shared.log_requests.admit(connection.and_then(|c| c.ip())) else {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "too many log requests in progress; try again shortly");
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    // Who asks: a server API key and auth off see everything, a token (or none) its read grants.
    let keys = &shared.config.api_keys;
    let access = if !keys.is_empty() && crate::http::authorized(keys, &headers) {
        Access::Open
    } else if !shared.auth.enabled() && !keys.is_empty() && headers.contains_key(header::AUTHORIZATION) {
        return auth::unauthorized("invalid server API key");
    } else {
        match shared.auth.request_access(&headers, query.as_deref()) {
            Ok((access, _)) => access,
            Err(e) => return auth::unauthorized(&e.0),
        }
    };
    let q = match parse(&shared, query.as_deref()) {
        Ok(q) => q,
        Err(reason) => return text(StatusCode::BAD_REQUEST, &reason),
    };
    let grants = match &access {
        Access::Open => None,
        Access::Granted(p) => Some(p.read.paths()),
    };
    let roots = roots(&q.prefix, grants);
    let visible = shared.engine.visible();
    // One more than the page, to know whether another page follows.
    let want = q.limit + 1;
    let after = q.after.as_deref();
    let mut found: BTreeMap<Box<str>, (usize, Option<Timestamp>)> = BTreeMap::new();
    for root in &roots {
        let request = ChannelsRequest::new(*root, after.map(Into::into), want, visible);
        match shared.engine.channels(request).await {
            Ok(stored) => {
                for c in stored {
                    found.entry(c.path).or_default().1 = Some(c.newest);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                return text(StatusCode::NOT_IMPLEMENTED, "this server's engine does not list channels");
            }
            Err(e) => {
                tracing::error!(error = %e, "listing channels failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "listing the channels failed; the server's log has the details");
            }
        }
        for (path, n) in shared.fanout.channels(root, after, want) {
            found.entry(path).or_default().0 = n;
        }
    }
    let more = found.len() > q.limit;
    let page: Vec<serde_json::Value> = found
        .iter()
        .take(q.limit)
        .map(|(path, (subscribers, newest))| {
            serde_json::json!({ "path": &**path, "subscribers": subscribers, "newest": newest.map(|t| t.to_string()) })
        })
        .collect();
    let next = if more { found.keys().nth(q.limit - 1).map(|p| p.to_string()) } else { None };
    let mut body = serde_json::json!({ "channels": page, "next": next }).to_string();
    body.push('\n');
    let mut response =
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store"), NOSNIFF], body).into_response();
    if matches!(access, Access::Granted(_)) {
        response.headers_mut().append(header::VARY, header::HeaderValue::from_static("Authorization"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grants_narrow_the_subtrees_listed() {
        let r = |prefix: &'static str, grants: &[&'static str]| roots(prefix, Some(grants.iter().copied()));
        assert_eq!(r("/", &["/"]), vec!["/"]);
        assert_eq!(r("/", &["/chat", "/news/a", "/chat/x"]), vec!["/chat", "/news/a"]);
        assert_eq!(r("/chat/a", &["/chat"]), vec!["/chat/a"]);
        assert_eq!(r("/chat", &["/chat/a", "/chat-x", "/chatter"]), vec!["/chat/a"]);
        assert!(r("/chat", &["/news"]).is_empty());
        assert!(r("/chat", &[]).is_empty());
        assert_eq!(roots("/x", None::<std::iter::Empty<&str>>), vec!["/x"]);
    }
}
