//! The admin endpoints (`docs/PROTOCOL.md` 9.15), each with a server API key
//! (`Authorization: Bearer KEY`, [`crate::Config::api_keys`]):
//!
//! - `POST /admin/disconnect` `{"sub":"ada"}`: closes every WebSocket connection of that `sub`
//!   on this node with 4004 (it may reconnect: revoke its token to keep it out), and tells the
//!   other nodes of a cluster to close theirs ([`crate::engine::Engine::broadcast`]); the
//!   answer counts this node's;
//! - `POST /admin/revoke` `{"jti":"...","until":SECONDS}`: the token with that `jti` is refused
//!   from now until `until` (default: a day from now; at most a year) at the handshake, at an
//!   in-band refresh and on HTTP (401 `token revoked`), and the open connections that use it
//!   are closed with 4003. Stored by the engine ([`crate::engine::Engine::revoke`]), so it
//!   holds across restarts; expired revocations are dropped;
//! - `GET /admin/revocations`: the revocations in force.
//!
//! Without a configured key they answer 403; with a missing or wrong key, 401.
//!
//! On an engine of several nodes (Redis), the revocations and disconnects made on the other
//! nodes arrive through [`crate::engine::Engine::control`] and are applied here as the
//! endpoints apply them ([`apply_controls`]); a revocation reaches them with
//! [`crate::engine::Engine::revoke`] itself.
//!
//! The revoked token ids are held in memory ([`Revoked`]) and checked by every token
//! verification ([`crate::auth`]), which costs one atomic load while none is revoked, and a
//! hash lookup under a read lock for a token with a `jti` otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::Shared;
use crate::auth::{Access, now_unix};
use crate::conn::{Conn, REVOKED, close_code};
use crate::engine::{Control, Revocation};

/// How long a revocation lasts when `until` is not given: a day.
pub const DEFAULT_REVOCATION_SECS: u64 = 24 * 3600;
/// The longest a revocation may last: a year.
pub const MAX_REVOCATION_SECS: u64 = 365 * 24 * 3600;
/// The largest request body of an admin endpoint.
const MAX_BODY: usize = 16 * 1024;
/// The longest `jti` taken.
pub const MAX_JTI_BYTES: usize = 1024;

/// The revoked token ids in force: `jti` → until (seconds since the Unix epoch).
#[derive(Debug, Default)]
pub(crate) struct Revoked {
    map: RwLock<HashMap<Box<str>, u64>>,
    /// How many entries `map` has: verification skips the lock while it is zero.
    len: AtomicUsize,
}

impl Revoked {
    /// Whether the token `jti` is refused at `now`.
    pub(crate) fn is_revoked(&self, jti: &str, now: u64) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.map.read().unwrap_or_else(PoisonError::into_inner).get(jti).is_some_and(|&until| until > now)
    }

    /// Adds (or replaces) revocations, dropping those expired at `now`.
    pub(crate) fn insert(&self, all: impl IntoIterator<Item = Revocation>, now: u64) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, until| *until > now);
        map.extend(all.into_iter().filter(|r| r.until > now).map(|r| (r.jti, r.until)));
        self.len.store(map.len(), Ordering::Release);
    }

    /// The revocations in force at `now`, by `jti`.
    pub(crate) fn list(&self, now: u64) -> Vec<Revocation> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<Revocation> =
            map.iter().filter(|(_, until)| **until > now).map(|(jti, until)| Revocation { jti: jti.clone(), until: *until }).collect();
        all.sort_unstable_by(|a, b| a.jti.cmp(&b.jti));
        all
    }

    /// How many are in force at `now` (the `ivy_revoked_tokens` gauge).
    pub(crate) fn count(&self, now: u64) -> usize {
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.map.read().unwrap_or_else(PoisonError::into_inner).values().filter(|&&until| until > now).count()
    }
}

/// Records who `conn` is from `access` (at its start and at each in-band refresh).
pub(crate) fn identify(_shared: &Shared, conn: &Conn, access: &Access) {
    let principal = match access {
        Access::Granted(p) if p.sub.is_some() => Some(p.clone()),
        _ => None,
    };
    conn.who().set(principal);
}

/// Closes `conn` with 4003 if its token was revoked meanwhile (between its verification and
/// the registration that lets a revocation find the connection).
pub(crate) fn check_revoked(shared: &Shared, conn: &Conn) {
    let revoked = shared.auth.revoked();
    let now = now_unix();
    if conn.who().matches(|p| p.jti.as_deref().is_some_and(|j| revoked.is_revoked(j, now))) {
        tracing::debug!(conn = %conn.id(), "token revoked: closing");
        conn.ending().end(REVOKED);
    }
}

const NOSNIFF: (header::HeaderName, &str) = (header::X_CONTENT_TYPE_OPTIONS, "nosniff");

fn text(status: StatusCode, reason: &str) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store"), NOSNIFF];
    (status, headers, format!("{reason}\n")).into_response()
}

fn json(value: serde_json::Value) -> Response {
    let mut body = value.to_string();
    body.push('\n');
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store"), NOSNIFF], body).into_response()
}

/// The refusal of a request without the server API key, if it is one.
fn refused(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let keys = &shared.config.api_keys;
    if keys.is_empty() {
        return Some(text(StatusCode::FORBIDDEN, "admin needs a server API key (--api-key), and none is configured"));
    }
    if crate::http::authorized(keys, headers) {
        return None;
    }
    let mut r = text(StatusCode::UNAUTHORIZED, "the admin endpoints need a server API key: Authorization: Bearer KEY");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// The JSON body of an admin request, or its 400 (413 when too large).
async fn body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, Response> {
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return Err(text(StatusCode::PAYLOAD_TOO_LARGE, &format!("the body is larger than {MAX_BODY} bytes"))),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let why = e.to_string();
        text(StatusCode::BAD_REQUEST, &format!("invalid body: {}", why.lines().next().unwrap_or_default()))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    sub: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    jti: String,
    #[serde(default)]
    until: Option<u64>,
}

/// `POST /admin/disconnect`.
pub(crate) async fn disconnect(State(shared): State<Arc<Shared>>, headers: HeaderMap, request: Body) -> Response {
    if let Some(r) = refused(&shared, &headers) {
        return r;
    }
    let DisconnectBody { sub } = match body(request).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if sub.is_empty() || sub.len() > ivy_client_core::wire::MAX_SUB_BYTES {
        return text(StatusCode::BAD_REQUEST, &format!("invalid body: sub must have 1 to {} bytes", ivy_client_core::wire::MAX_SUB_BYTES));
    }
    let n = disconnect_sub(&shared, &sub);
    // The other nodes of a cluster close theirs (an engine of several nodes; at once otherwise).
    match shared.engine.broadcast(Control::Disconnect { sub: sub.as_str().into() }).await {
        Ok(()) => json(serde_json::json!({ "disconnected": n })),
        Err(e) => {
            tracing::error!(error = %e, sub = %sub, "telling the other nodes to disconnect a sub failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "closed {n} connection(s) of this sub on this node, but the other nodes could not be told (the server's log has the details); try again"
                ),
            )
        }
    }
}

/// `POST /admin/revoke`.
pub(crate) async fn revoke(State(shared): State<Arc<Shared>>, headers: HeaderMap, request: Body) -> Response {
    if let Some(r) = refused(&shared, &headers) {
        return r;
    }
    let RevokeBody { jti, until } = match body(request).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return text(StatusCode::BAD_REQUEST, &format!("invalid body: jti must have 1 to {MAX_JTI_BYTES} bytes"));
    }
    let now = now_unix();
    let until = until.unwrap_or(now + DEFAULT_REVOCATION_SECS);
    if until <= now {
        return text(StatusCode::BAD_REQUEST, &format!("invalid body: until ({until}) is not in the future (now: {now})"));
    }
    if until > now + MAX_REVOCATION_SECS {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("invalid body: until is more than a year ahead (at most {})", now + MAX_REVOCATION_SECS),
        );
    }
    match revoke_jti(&shared, &jti, until, now).await {
        Ok(n) => json(serde_json::json!({ "revoked": jti, "until": until, "disconnected": n })),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            text(StatusCode::NOT_IMPLEMENTED, "this server's engine does not store token revocations")
        }
        Err(e) => {
            tracing::error!(error = %e, "storing a token revocation failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "storing the revocation failed; the server's log has the details")
        }
    }
}

/// Closes every connection of `sub` with 4004; how many.
pub(crate) fn disconnect_sub(shared: &Shared, sub: &str) -> usize {
    let n = shared.connections.end_where(|p| p.sub.as_deref() == Some(sub), close_code::DISCONNECTED);
    shared.metrics.admin_disconnects.inc_by(n as u64);
    tracing::info!(sub = %sub, connections = n, "admin: disconnected a sub's connections");
    n
}

/// Revokes the token `jti` until `until` (stored by the engine first) and closes its
/// connections with 4003; how many.
pub(crate) async fn revoke_jti(shared: &Shared, jti: &str, until: u64, now: u64) -> std::io::Result<usize> {
    let revocation = Revocation { jti: jti.into(), until };
    shared.engine.revoke(revocation.clone(), now).await?;
    let n = apply_revocation(shared, revocation, now);
    tracing::info!(jti = %jti, until, connections = n, "admin: revoked a token");
    Ok(n)
}

/// Refuses the token of `revocation` from now on and closes its connections with 4003; how
/// many. (A revocation made here, once stored, or on another node: [`apply_controls`].)
fn apply_revocation(shared: &Shared, revocation: Revocation, now: u64) -> usize {
    let jti = revocation.jti.clone();
    shared.auth.revoked().insert([revocation], now);
    shared.connections.end_where(|p| p.jti.as_deref() == Some(&*jti), REVOKED)
}

/// Applies on this node, until the engine ends them, the admin commands made on the other
/// nodes of a cluster ([`crate::engine::Engine::control`]): a revocation as `POST
/// /admin/revoke` does after storing it, a disconnect as `POST /admin/disconnect` does.
/// Holds the server weakly: it ends with the server too.
pub(crate) async fn apply_controls(shared: Weak<Shared>, mut commands: mpsc::Receiver<Control>) {
    while let Some(command) = commands.recv().await {
        let Some(shared) = shared.upgrade() else { return };
        match command {
            Control::Revoke(revocation) => {
                let (jti, until) = (revocation.jti.clone(), revocation.until);
                let n = apply_revocation(&shared, revocation, now_unix());
                tracing::info!(jti = %jti, until, connections = n, "admin: applied a token revocation made on another node");
            }
            Control::Disconnect { sub } => {
                let n = shared.connections.end_where(|p| p.sub.as_deref() == Some(&*sub), close_code::DISCONNECTED);
                shared.metrics.admin_disconnects.inc_by(n as u64);
                tracing::info!(sub = %sub, connections = n, "admin: applied a disconnect made on another node");
            }
        }
    }
}

/// `GET /admin/revocations`.
pub(crate) async fn revocations(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&shared, &headers) {
        return r;
    }
    let all: Vec<serde_json::Value> =
        shared.auth.revoked().list(now_unix()).into_iter().map(|r| serde_json::json!({ "jti": &*r.jti, "until": r.until })).collect();
    json(serde_json::json!({ "revocations": all }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_expire() {
        let r = Revoked::default();
        assert!(!r.is_revoked("a", 10));
        r.insert([Revocation { jti: "a".into(), until: 20 }, Revocation { jti: "b".into(), until: 5 }], 10);
        assert!(r.is_revoked("a", 10) && !r.is_revoked("a", 20) && !r.is_revoked("b", 10));
        assert_eq!(r.count(10), 1);
        assert_eq!(r.list(10), vec![Revocation { jti: "a".into(), until: 20 }]);
        r.insert([Revocation { jti: "c".into(), until: 40 }], 25);
        assert_eq!(r.list(25), vec![Revocation { jti: "c".into(), until: 40 }], "a expired and was dropped");
    }
}
