//! `GET /presence/<path>`: who is present in a path's subtree (`docs/PROTOCOL.md` 9.13).
//!
//! Members are paged in key order (token members by `sub`, then anonymous ones by id) with an
//! opaque cursor; `?count` alone answers from the path's counter.

use std::sync::Arc;

use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ivy_client_core::path::{check_depth, normalize_with_limit};

use crate::Shared;
use crate::auth::{self, Need};
use crate::engine::MemberId;

/// Default of `?limit`.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// The most members of one page.
pub(crate) const MAX_LIMIT: usize = 1000;

const NO_STORE: &str = "no-store";

fn plain(status: StatusCode, reason: &str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, NO_STORE),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (status, headers, format!("{reason}\n")).into_response()
}

fn json(body: String) -> Response {
    let headers = [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, NO_STORE)];
    (StatusCode::OK, headers, body).into_response()
}

/// What a presence request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Query {
    Count,
    Page { after: Option<MemberId>, limit: usize },
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| format!("invalid query: {e}"))?;
    let (mut count, mut after, mut limit) = (false, None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "count" => count = true,
            "after" => {
                after = Some(MemberId::from_cursor(&v).ok_or_else(|| format!("invalid after: {v:?} is not a cursor of this endpoint"))?)
            }
            "limit" => {
                let n = v.parse::<usize>().ok().filter(|n| (1..=MAX_LIMIT).contains(n));
                limit = Some(n.ok_or_else(|| format!("invalid limit: {v:?} (expected 1 to {MAX_LIMIT})"))?);
            }
            // The token (`?token=`) and unknown parameters are not this endpoint's.
            _ => {}
        }
    }
    if count {
        if after.is_some() || limit.is_some() {
            return Err("count takes no after or limit".into());
        }
        return Ok(Query::Count);
    }
    Ok(Query::Page { after, limit: limit.unwrap_or(DEFAULT_LIMIT) })
}

/// `GET /presence`, `/presence/` and `/presence/<path>`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    OriginalUri(original): OriginalUri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let raw = uri.path().strip_prefix("/presence").unwrap_or("");
    let raw = if raw.contains('%') { raw.replace("%2e", ".").replace("%2E", ".") } else { raw.to_string() };
    let path = match normalize_with_limit(raw.as_bytes(), shared.config.max_path_length)
        .and_then(|p| check_depth(&p, shared.config.max_path_depth).map(|()| p))
    {
        Ok(p) => p.into_owned(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("invalid path: {e}")),
    };
    // A server API key reads every path (a backend); otherwise as the log.
    let by_key = !shared.config.api_keys.is_empty() && crate::http::authorized(&shared.config.api_keys, &headers);
    if !by_key {
        match shared.auth.request_access(&headers, query.as_deref()) {
            Err(e) => {
                tracing::debug!(uri = %auth::Redacted(&original), reason = %e, "presence request refused: invalid token");
                return auth::unauthorized(&e.0);
            }
            Ok((access, with_token)) if !access.allows(Need::Read, &path) => {
                let reason = access.refusal(Need::Read, &path);
                return if with_token { auth::forbidden(&reason) } else { auth::unauthorized(&format!("a token is needed: {reason}")) };
            }
            Ok(_) => {}
        }
    }
    let presence = shared.engine.presence();
    match parse_query(query.as_deref()) {
        Err(reason) => plain(StatusCode::BAD_REQUEST, &reason),
        Ok(Query::Count) => json(format!("{{\"count\":{}}}", presence.count(&path))),
        Ok(Query::Page { after, limit }) => {
            let page = presence.members(&path, after.as_ref(), limit);
            let mut body = String::with_capacity(32 + page.members.len() * 48);
            body.push_str(&format!("{{\"count\":{},\"members\":[", page.count));
            for (i, m) in page.members.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&m.to_json());
            }
            body.push_str("],\"next\":");
            match page.next {
                Some(next) => body.push_str(&serde_json::Value::String(next).to_string()),
                None => body.push_str("null"),
            }
            body.push('}');
            json(body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(parse_query(None), Ok(Query::Page { after: None, limit: DEFAULT_LIMIT }));
        assert_eq!(parse_query(Some("count")), Ok(Query::Count));
        assert_eq!(parse_query(Some("count=1&token=x")), Ok(Query::Count));
        assert_eq!(parse_query(Some("after=%3Dada&limit=2")), Ok(Query::Page { after: Some(MemberId::Sub("ada".into())), limit: 2 }));
        assert_eq!(parse_query(Some("limit=0")).unwrap_err(), "invalid limit: \"0\" (expected 1 to 1000)");
        assert_eq!(parse_query(Some("limit=1001")).unwrap_err(), "invalid limit: \"1001\" (expected 1 to 1000)");
        assert_eq!(parse_query(Some("after=x")).unwrap_err(), "invalid after: \"x\" is not a cursor of this endpoint");
        assert_eq!(parse_query(Some("count&limit=3")).unwrap_err(), "count takes no after or limit");
    }
}
