//! The demo-only token endpoint, `POST /demo/token` (`--demo-token-endpoint`).
//!
//! **Unfit for production.** It hands a signed token to anyone who asks for a nickname that
//! nobody else holds: there is no password, no account, nothing that proves who a visitor is.
//! It exists so that the chat demo (`./scripts/run.sh`) runs with auth on, with verified
//! senders, without a backend of its own. A real application mints its tokens in its own
//! backend, after its own login (`docs/PROTOCOL.md` 2.5 has an example).
//!
//! What it does promise: one visitor cannot post as another. The first request for a
//! nickname claims it for the visitor that made it, who gets a random secret in an
//! `HttpOnly`, `SameSite=Strict` cookie; a later request for that nickname gets a token only
//! with that cookie (else 409, "nickname taken"). A claim ends after [`IDLE`] without a token
//! request (a page refreshing its token keeps it), and at most [`MAX_CLAIMS`] are held
//! ([`MAX_CLAIMS_PER_ADDRESS`] from one client address), so the memory it takes is bounded
//! and one client cannot take every nickname. Nicknames are compared without regard to case, so `Ada`
//! cannot pass for `ada`.
//!
//! The state is a pure structure ([`Claims`]) that takes the time as a parameter; the
//! handler around it parses the request, reads the cookie and mints the token with the
//! server's first `--auth-hmac-secret` (the code of `ivy-server token`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::Shared;
use crate::auth::{Mint, Secret, mint_hs256};
use crate::limits::Admitted;

/// A claim without a token request for this long ends (its nickname is free again).
pub const IDLE: Duration = Duration::from_secs(3600);

/// Most nicknames claimed at once; beyond, requests for new ones get 503 until claims expire.
pub const MAX_CLAIMS: usize = 10_000;

/// Most nicknames claimed at once from one client IP address (when served by
/// [`crate::serve`]), so that one client cannot take them all; beyond, 429.
pub const MAX_CLAIMS_PER_ADDRESS: usize = 64;

/// Longest nickname, in characters.
pub const MAX_NICKNAME: usize = 32;

/// Largest request body read, in bytes.
const MAX_BODY: usize = 1024;

/// The cookie that holds a visitor's secret.
pub const COOKIE: &str = "ivy_demo_visitor";

/// A visitor's secret: 128 random bits, written as 32 hex digits.
type Visitor = [u8; 16];

/// What [`Claims::claim`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The nickname is the visitor's (it was free, or theirs already).
    Granted,
    /// Another visitor holds it.
    Taken,
    /// It is free, but [`MAX_CLAIMS`] are held: none can be added now.
    Full,
    /// It is free, but the visitor's address holds [`MAX_CLAIMS_PER_ADDRESS`] already.
    TooMany,
}

/// The nicknames claimed, by their lowercase form: who holds each and when it last got a
/// token. Bounded by its capacity; claims idle for longer than `idle` are expired.
#[derive(Debug)]
pub struct Claims {
    by_nick: HashMap<String, Held>,
    capacity: usize,
    per_address: usize,
    idle: Duration,
}

/// A claim: who holds it, from where, and when it last got a token.
#[derive(Debug)]
struct Held {
    visitor: Visitor,
    address: Option<IpAddr>,
    last: Instant,
}

impl Claims {
    /// Room for `capacity` claims, at most `per_address` from one address, each ending after
    /// `idle` without use.
    pub fn new(capacity: usize, per_address: usize, idle: Duration) -> Claims {
        Claims { by_nick: HashMap::new(), capacity, per_address, idle }
    }

    /// Claims `nickname` for `visitor` (from `address`, when known) at `now`, or renews the
    /// visitor's claim.
    pub fn claim(&mut self, nickname: &str, visitor: &Visitor, address: Option<IpAddr>, now: Instant) -> Claim {
        let key = nickname.to_lowercase();
        let idle = self.idle;
        let live = |last: Instant| now.saturating_duration_since(last) < idle;
        if let Some(held) = self.by_nick.get_mut(&key) {
            let theirs = bool::from(subtle::ConstantTimeEq::ct_eq(&held.visitor[..], &visitor[..]));
            if live(held.last) && !theirs {
                return Claim::Taken;
            }
            if theirs {
                // The visitor's own claim: renewed.
                held.last = now;
                return Claim::Granted;
            }
            // An expired claim: free again (counted as a new one below).
            self.by_nick.remove(&key);
        }
        if address.is_some() && self.by_nick.values().filter(|h| h.address == address && live(h.last)).count() >= self.per_address {
            return Claim::TooMany;
        }
        if self.by_nick.len() >= self.capacity {
            self.by_nick.retain(|_, h| live(h.last));
            if self.by_nick.len() >= self.capacity {
                return Claim::Full;
            }
        }
        self.by_nick.insert(key, Held { visitor: *visitor, address, last: now });
        Claim::Granted
    }

    /// How many claims are held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.by_nick.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_nick.is_empty()
    }
}

/// The endpoint's state: the key it signs with, what its tokens grant, the claims.
pub(crate) struct DemoTokens {
    secret: Secret,
    mint: Mint,
    claims: Mutex<Claims>,
}

impl std::fmt::Debug for DemoTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoTokens").field("ttl", &self.mint.ttl).field("read", &self.mint.read).finish_non_exhaustive()
    }
}

impl DemoTokens {
    /// The endpoint of `config`, if it enables it; an error if it does without an HMAC secret
    /// or with an invalid grant.
    pub(crate) fn new(config: &crate::Config) -> Result<Option<DemoTokens>, String> {
        if !config.demo_token_endpoint {
            return Ok(None);
        }
        let Some(secret) = config.auth_hmac_secrets.first() else {
            return Err("--demo-token-endpoint needs --auth-hmac-secret: it signs the demo's tokens with the first one".into());
        };
        crate::auth::Grants::new(&config.demo_token_grants).map_err(|e| format!("--demo-token-grant: {e}"))?;
        if config.demo_token_ttl < Duration::from_secs(1) {
            return Err("--demo-token-ttl must be at least 1s".into());
        }
        let mint = Mint {
            sub: String::new(),
            read: config.demo_token_grants.clone(),
            write: config.demo_token_grants.clone(),
            ttl: config.demo_token_ttl,
            issuer: config.auth_issuer.clone(),
            audience: config.auth_audience.clone(),
        };
        let claims = Claims::new(MAX_CLAIMS, MAX_CLAIMS_PER_ADDRESS, IDLE);
        Ok(Some(DemoTokens { secret: secret.clone(), mint, claims: Mutex::new(claims) }))
    }
}

/// The body of a request: JSON `{"nickname": "ada"}` or the form `nickname=ada`.
#[derive(Deserialize)]
struct TokenRequest {
    nickname: String,
}

fn reply(status: StatusCode, message: &str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (status, headers, format!("{message}\n")).into_response()
}

/// A nickname as typed, trimmed and with runs of white space made one space; an error for an
/// empty or too long one, or one with control characters.
pub fn nickname(raw: &str) -> Result<String, String> {
    let nick = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    if nick.is_empty() {
        return Err("pick a nickname".into());
    }
    if nick.chars().count() > MAX_NICKNAME {
        return Err(format!("a nickname has at most {MAX_NICKNAME} characters"));
    }
    if nick.chars().any(char::is_control) {
        return Err("a nickname cannot contain control characters".into());
    }
    Ok(nick)
}

/// The visitor secret of the request's cookie, if it has a well-formed one.
fn visitor_cookie(headers: &HeaderMap) -> Option<Visitor> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)?
        .1;
    let bytes = value.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

fn hex(v: &Visitor) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /demo/token`.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    connection: Option<axum::Extension<Arc<Admitted>>>,
    request: Request,
) -> Response {
    let Some(demo) = shared.demo.as_ref() else { return reply(StatusCode::NOT_FOUND, "not found") };
    let (parts, body) = request.into_parts();
    if !crate::ws::origin_allowed(&shared.config.allowed_origins, &parts.headers) {
        return reply(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body is limited to {MAX_BODY} bytes")),
    };
    let parsed: Result<TokenRequest, String> = match media.as_str() {
        "application/json" => serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}")),
        "application/x-www-form-urlencoded" => serde_urlencoded::from_bytes(&bytes).map_err(|e| format!("invalid form: {e}")),
        _ => {
            return reply(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send {\"nickname\": \"...\"} as application/json, or nickname=... as application/x-www-form-urlencoded",
            );
        }
    };
    let nick = match parsed.and_then(|b| nickname(&b.nickname)) {
        Ok(n) => n,
        Err(e) => return reply(StatusCode::BAD_REQUEST, &e),
    };
    let (visitor, new_visitor) = match visitor_cookie(&parts.headers) {
        Some(v) => (v, false),
        None => {
            let mut v = [0u8; 16];
            if let Err(e) = getrandom::fill(&mut v) {
                tracing::error!(error = %e, "no randomness for a demo visitor");
                return reply(StatusCode::INTERNAL_SERVER_ERROR, "no randomness available");
            }
            (v, true)
        }
    };
    let address = connection.and_then(|c| c.ip());
    let decision = demo.claims.lock().map(|mut c| c.claim(&nick, &visitor, address, Instant::now()));
    match decision {
        Ok(Claim::Granted) => {}
        Ok(Claim::Taken) => {
            return reply(StatusCode::CONFLICT, &format!("nickname taken: {nick:?} is in use by another visitor; pick another"));
        }
        Ok(Claim::TooMany) => {
            return reply(StatusCode::TOO_MANY_REQUESTS, "too many nicknames are in use from your address; try again later");
        }
        Ok(Claim::Full) => {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "too many nicknames are in use on this demo server; try again later");
        }
        Err(_) => return reply(StatusCode::INTERNAL_SERVER_ERROR, "the demo's claims are unavailable"),
    }
    let mint = Mint { sub: nick.clone(), ..demo.mint.clone() };
    let token = match mint_hs256(&demo.secret, &mint) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "minting a demo token failed");
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "minting the token failed");
        }
    };
    tracing::debug!(sub = %nick, new_visitor, "demo token issued");
    let ttl = mint.ttl.as_secs().max(1);
    let body = serde_json::json!({ "token": token, "sub": nick, "expires_in": ttl, "read": mint.read, "write": mint.write });
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        format!("{body}\n"),
    )
        .into_response();
    if new_visitor {
        // Sent to this endpoint only, never readable by scripts, never on cross-site requests.
        let cookie = format!("{COOKIE}={}; Path=/demo/; HttpOnly; SameSite=Strict; Max-Age={}", hex(&visitor), 7 * 24 * 3600);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nickname_is_its_first_visitors_until_idle() {
        let t0 = Instant::now();
        let mut c = Claims::new(2, 10, Duration::from_secs(60));
        let (ada, bob) = ([1u8; 16], [2u8; 16]);
        assert_eq!(c.claim("Ada", &ada, None, t0), Claim::Granted);
        assert_eq!(c.claim("ada", &ada, None, t0 + Duration::from_secs(30)), Claim::Granted, "the holder renews it");
        assert_eq!(c.claim("ADA", &bob, None, t0 + Duration::from_secs(80)), Claim::Taken, "renewed at 30 s, not idle at 80 s");
        assert_eq!(c.claim("bob", &bob, None, t0), Claim::Granted);
        // Full: a third nickname waits until a claim is idle.
        assert_eq!(c.claim("eve", &[3u8; 16], None, t0 + Duration::from_secs(10)), Claim::Full);
        assert_eq!(c.claim("eve", &[3u8; 16], None, t0 + Duration::from_secs(61)), Claim::Granted, "bob's claim expired and was swept");
        assert_eq!(c.len(), 2);
        // An idle claim can be taken over.
        assert_eq!(c.claim("ada", &bob, None, t0 + Duration::from_secs(200)), Claim::Granted);
        assert_eq!(c.claim("ada", &ada, None, t0 + Duration::from_secs(201)), Claim::Taken);
    }

    #[test]
    fn one_address_holds_a_bounded_number_of_nicknames() {
        let t0 = Instant::now();
        let mut c = Claims::new(100, 2, Duration::from_secs(60));
        let (here, there) = (Some(IpAddr::from([10, 0, 0, 1])), Some(IpAddr::from([10, 0, 0, 2])));
        assert_eq!(c.claim("a", &[1u8; 16], here, t0), Claim::Granted);
        assert_eq!(c.claim("b", &[2u8; 16], here, t0), Claim::Granted);
        assert_eq!(c.claim("c", &[3u8; 16], here, t0), Claim::TooMany, "whatever the cookie");
        assert_eq!(c.claim("a", &[1u8; 16], here, t0), Claim::Granted, "renewing one held is not a new one");
        assert_eq!(c.claim("c", &[3u8; 16], there, t0), Claim::Granted);
        assert_eq!(c.claim("d", &[4u8; 16], here, t0 + Duration::from_secs(61)), Claim::Granted, "its claims expired");
    }

    #[test]
    fn nicknames_are_trimmed_and_checked() {
        assert_eq!(nickname("  Ada   Lovelace ").unwrap(), "Ada Lovelace");
        assert_eq!(nickname("🦊 fox").unwrap(), "🦊 fox");
        assert!(nickname("   ").is_err());
        assert!(nickname(&"x".repeat(33)).is_err());
        assert!(nickname(&"é".repeat(32)).is_ok());
        assert!(nickname("a\u{7}b").is_err());
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; ivy_demo_visitor=000102030405060708090a0b0c0d0e0f; b=2"));
        let v = visitor_cookie(&h).unwrap();
        assert_eq!(hex(&v), "000102030405060708090a0b0c0d0e0f");
        h.insert(header::COOKIE, HeaderValue::from_static("ivy_demo_visitor=zz0102030405060708090a0b0c0d0e0f"));
        assert_eq!(visitor_cookie(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("ivy_demo_visitor=00"));
        assert_eq!(visitor_cookie(&h), None);
    }
}
