//! Identity and permissions: signed tokens (JWT) with path-scoped read and write grants
//! (`docs/PROTOCOL.md`, section 2.5, an extension).
//!
//! `Auth` is built once from the [`Config`] (its keys decoded, its validation rules set) and
//! shared by every handler. A token is verified at a WebSocket connection's handshake, at each
//! of its in-band refreshes (`&JWT`, applied by the session), or per log request, giving a
//! [`Principal`]; each command is then checked against
//! the principal's [`Grants`] (`Access`), a comparison of paths that allocates nothing.
//!
//! Verification is [`jsonwebtoken`]'s, never ours: this module only picks the keys a token
//! may be checked with (by its `alg` and `kid`), sets the rules (`exp` required, `nbf` and
//! `iss`/`aud` checked, a small leeway) and turns the claims into grants.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ivy_client_core::path;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::Config;

/// The reason a revoked token is refused with (401, or an in-band refresh's error).
pub const REVOKED: &str = "token revoked";

/// Leeway for `exp`, `nbf` and `iat`: clocks of the token's issuer and of this server may
/// differ by this much.
pub const LEEWAY: Duration = Duration::from_secs(5);

/// A secret that never shows in `Debug` output (the server's configuration is logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// Its bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// Paths a principal may read or write: each covers itself and every path below it by whole
/// segments (`/chat` covers `/chat/room1`, not `/chatter`); `/` covers everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(Box<[Box<str>]>);

impl Grants {
    /// Grants on `paths` (normalized; an invalid one is an error naming it).
    pub fn new<S: AsRef<str>>(paths: &[S]) -> Result<Grants, String> {
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let raw = p.as_ref();
            let normal = path::normalize(raw.as_bytes()).map_err(|e| format!("invalid grant path {raw:?}: {e}"))?;
            out.push(normal.into_owned().into_boxed_str());
        }
        Ok(Grants(out.into_boxed_slice()))
    }

    /// Whether a grant covers the normalized `path` (allocates nothing).
    pub fn covers(&self, path: &str) -> bool {
        self.0.iter().any(|g| covers(g, path))
    }

    /// These grants and `more`.
    fn with(self, more: &Grants) -> Grants {
        if more.is_empty() {
            return self;
        }
        let mut all = self.0.into_vec();
        all.extend(more.0.iter().cloned());
        Grants(all.into_boxed_slice())
    }

    /// Whether there is no grant at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The granted paths.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|g| &**g)
    }
}

/// Whether a grant on `grant` covers `path` (both normalized): the same paths as the subtree
/// a subscription to `grant` delivers.
fn covers(grant: &str, path: &str) -> bool {
    grant == path::ROOT || path::is_within(path, grant)
}

/// Who a connection or request is, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`; `None` for a request without a token (the anonymous grants).
    pub sub: Option<Box<str>>,
    /// Paths it may subscribe to and read the logs of.
    pub read: Grants,
    /// Paths it may send to.
    pub write: Grants,
    /// The token's `exp`, in seconds since the Unix epoch (`None`: anonymous).
    pub exp: Option<u64>,
    /// The token's `jti` (its id), if it has one: what `POST /admin/revoke` names.
    pub jti: Option<Box<str>>,
    /// The token's `info` claim (public info of its member in presence: a JSON object, as
    /// compact JSON of at most [`crate::engine::presence::MAX_INFO_BYTES`] bytes).
    pub info: Option<Arc<str>>,
}

/// What one connection or request may do.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// Auth is off: everything, as in the original.
    Open,
    /// Auth is on: what the principal was granted.
    Granted(Arc<Principal>),
}

/// Which grant a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Read,
    Write,
}

impl Access {
    /// Whether `path` (normalized) may be read (subscribed to) or written (sent to).
    pub(crate) fn allows(&self, need: Need, path: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Granted(p) => match need {
                Need::Read => p.read.covers(path),
                Need::Write => p.write.covers(path),
            },
        }
    }

    /// The one-line reason of a refusal of `need` on `path` (built only when refusing).
    pub(crate) fn refusal(&self, need: Need, path: &str) -> String {
        let who = match self {
            Access::Granted(p) => match &p.sub {
                Some(sub) => format!("the token of {sub:?} has"),
                None => "without a token there is".to_string(),
            },
            Access::Open => "there is".to_string(),
        };
        match need {
            Need::Read => format!("{who} no read grant covering {path} (a subscription delivers the path's whole subtree)"),
            Need::Write => format!("{who} no write grant covering {path}"),
        }
    }

    /// The principal's `exp`, if it has one.
    pub(crate) fn expires(&self) -> Option<u64> {
        match self {
            Access::Granted(p) => p.exp,
            Access::Open => None,
        }
    }
}

/// Why a token was refused: the one-line reason sent with 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError(pub String);

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenError {}

/// A verification key: its algorithm, its `kid` (a public key's file name without its
/// extension; none for an HMAC secret) and the key.
struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// The claims read from a token (`sub` and `exp` required; `nbf` checked by the validation).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    /// Present (even `null`) or absent: a present non-object is refused.
    #[serde(default, deserialize_with = "present")]
    info: Option<serde_json::Value>,
}

/// A claim that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The server's token rules: its keys and checks, and the anonymous grants.
pub(crate) struct Auth {
    keys: Vec<Key>,
    /// Per algorithm configured: its validation (the algorithm alone, `exp` and `sub`
    /// required, `nbf` checked, `iss` and `aud` when configured).
    validations: Vec<(Algorithm, Validation)>,
    anonymous: Arc<Principal>,
    /// The revoked tokens (`POST /admin/revoke`), refused by [`Auth::verify`].
    revoked: Arc<crate::admin::Revoked>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<_> = self.keys.iter().map(|k| (k.alg, k.kid.as_deref())).collect();
        f.debug_struct("Auth").field("keys", &kinds).field("anonymous", &self.anonymous).finish()
    }
}

impl Auth {
    /// The rules of `config`: its keys read and decoded (an unreadable or unusable key file,
    /// or an invalid anonymous grant, is an error naming it).
    pub(crate) fn new(config: &Config) -> Result<Auth, String> {
        let mut keys = Vec::new();
        for s in &config.auth_hmac_secrets {
            if s.expose().is_empty() {
                return Err("--auth-hmac-secret is empty".into());
            }
            keys.push(Key { alg: Algorithm::HS256, kid: None, key: DecodingKey::from_secret(s.expose()) });
        }
        for file in &config.auth_public_keys {
            keys.push(public_key(file)?);
        }
        let mut algs: Vec<Algorithm> = Vec::new();
        for k in &keys {
            if !algs.contains(&k.alg) {
                algs.push(k.alg);
            }
        }
        let validations = algs
            .into_iter()
            .map(|alg| {
                let mut v = Validation::new(alg);
                v.leeway = LEEWAY.as_secs();
                v.validate_nbf = true;
                // A configured `iss` or `aud` must be present too (the crate checks them only
                // when a token has them).
                let mut required = vec!["exp", "sub"];
                if let Some(iss) = &config.auth_issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                match &config.auth_audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&required);
                (alg, v)
            })
            .collect();
        let read = Grants::new(&config.anonymous_read).map_err(|e| format!("--anonymous-read: {e}"))?;
        let write = Grants::new(&config.anonymous_write).map_err(|e| format!("--anonymous-write: {e}"))?;
        Ok(Auth {
            keys,
            validations,
            anonymous: Arc::new(Principal { sub: None, read, write, exp: None, jti: None, info: None }),
            revoked: Arc::default(),
        })
    }

    /// The revoked tokens.
    pub(crate) fn revoked(&self) -> &Arc<crate::admin::Revoked> {
        &self.revoked
    }

    /// Whether tokens are checked (some key is configured); without, everything is allowed.
    pub(crate) fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// What a request with these headers and query may do: its token (`Authorization: Bearer`
    /// or `?token=`) verified, or the anonymous grants without one. With auth off nothing is
    /// looked at (not even a malformed `Authorization` header): everything is allowed.
    pub(crate) fn request_access(&self, headers: &HeaderMap, query: Option<&str>) -> Result<(Access, bool), TokenError> {
        if !self.enabled() {
            return Ok((Access::Open, false));
        }
        let token = request_token(headers, query)?;
        Ok((self.access(token.as_deref())?, token.is_some()))
    }

    /// What a connection or request with `token` (or none) may do.
    pub(crate) fn access(&self, token: Option<&str>) -> Result<Access, TokenError> {
        if !self.enabled() {
            return Ok(Access::Open);
        }
        match token {
            None => Ok(Access::Granted(self.anonymous.clone())),
            Some(t) => self.verify(t, now_unix()).map(|p| Access::Granted(Arc::new(p))),
        }
    }

    /// Whether `path` needs more than the anonymous grants to be read (then a response that
    /// served it must not be cached as public).
    pub(crate) fn read_needs_token(&self, path: &str) -> bool {
        self.enabled() && !self.anonymous.read.covers(path)
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    fn verify(&self, token: &str, now: u64) -> Result<Principal, TokenError> {
        let refuse = |m: &str| Err(TokenError(m.to_string()));
        let head = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) => return refuse("invalid token: not a JWT with a supported algorithm (\"alg\": \"none\" is never accepted)"),
        };
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == head.alg) else {
            return Err(TokenError(format!("invalid token: algorithm {:?} is not accepted by this server", head.alg)));
        };
        // A `kid` naming a configured key picks it; otherwise every key of the algorithm is
        // tried (rotation: old and new keys side by side).
        let named = head.kid.as_deref().filter(|kid| self.keys.iter().any(|k| k.alg == head.alg && k.kid.as_deref() == Some(*kid)));
        let mut last = None;
        for k in self.keys.iter().filter(|k| k.alg == head.alg && (named.is_none() || k.kid.as_deref() == named)) {
            match jsonwebtoken::decode::<Claims>(token, &k.key, validation) {
                Ok(data) => {
                    let p = principal(data.claims, now, &self.anonymous)?;
                    // Checked after the signature: only a genuine token's id counts.
                    if p.jti.as_deref().is_some_and(|jti| self.revoked.is_revoked(jti, now)) {
                        return Err(TokenError(REVOKED.into()));
                    }
                    return Ok(p);
                }
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => last = Some(e),
                Err(e) => return Err(reason(&e)),
            }
        }
        Err(last.map_or_else(|| TokenError("invalid token: no key to check it with".into()), |e| reason(&e)))
    }
}

/// The principal of verified claims: its grants, and the anonymous ones (a token never allows
/// less than none).
fn principal(c: Claims, now: u64, anonymous: &Principal) -> Result<Principal, TokenError> {
    if c.iat.is_some_and(|iat| iat > now.saturating_add(LEEWAY.as_secs())) {
        return Err(TokenError("invalid token: issued in the future (iat)".into()));
    }
    let sub = match c.sub {
        Some(sub) if sub.len() > ivy_client_core::wire::MAX_SUB_BYTES => {
            return Err(TokenError(format!("invalid token: sub longer than {} bytes", ivy_client_core::wire::MAX_SUB_BYTES)));
        }
        Some(sub) if !sub.is_empty() => sub,
        Some(_) => return Err(TokenError("invalid token: sub is empty".into())),
        None => return Err(TokenError("invalid token: no sub claim".into())),
    };
    let Some(exp) = c.exp else { return Err(TokenError("invalid token: no exp claim".into())) };
    let read = Grants::new(&c.read).map_err(|e| TokenError(format!("invalid token: read claim: {e}")))?.with(&anonymous.read);
    let write = Grants::new(&c.write).map_err(|e| TokenError(format!("invalid token: write claim: {e}")))?.with(&anonymous.write);
    let info = match c.info {
        None => None,
        Some(v @ serde_json::Value::Object(_)) => {
            let text = serde_json::to_string(&v).unwrap_or_default();
            if text.len() > crate::engine::presence::MAX_INFO_BYTES {
                return Err(info_refused());
            }
            Some(Arc::from(text))
        }
        Some(_) => return Err(info_refused()),
    };
    let jti = c.jti.filter(|j| !j.is_empty()).map(String::into_boxed_str);
    Ok(Principal { sub: Some(sub.into_boxed_str()), read, write, exp: Some(exp), jti, info })
}

/// Why a token's `info` claim is refused.
fn info_refused() -> TokenError {
    TokenError(format!("info claim must be a JSON object of at most {} bytes", crate::engine::presence::MAX_INFO_BYTES))
}

/// The one-line reason for a failed verification.
fn reason(e: &jsonwebtoken::errors::Error) -> TokenError {
    let m = match e.kind() {
        ErrorKind::InvalidSignature => "invalid token: bad signature".to_string(),
        ErrorKind::ExpiredSignature => "token expired".to_string(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_string(),
        ErrorKind::InvalidIssuer => "invalid token: wrong issuer (iss)".to_string(),
        ErrorKind::InvalidAudience => "invalid token: wrong audience (aud)".to_string(),
        ErrorKind::InvalidAlgorithm => "invalid token: algorithm not accepted for this key".to_string(),
        ErrorKind::MissingRequiredClaim(c) => format!("invalid token: no {c} claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("invalid token: malformed {c} claim"),
        ErrorKind::Json(j) => format!("invalid token: malformed claims ({})", one_line(&j.to_string())),
        _ => "invalid token: malformed".to_string(),
    };
    TokenError(m)
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Reads a PEM public key and picks its algorithm: RS256 for RSA, ES256 for EC P-256, EdDSA
/// for Ed25519. Its `kid` is its file name without the extension.
fn public_key(file: &Path) -> Result<Key, String> {
    let shown = file.display();
    let pem = std::fs::read(file).map_err(|e| format!("--auth-public-key {shown}: {e}"))?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("PRIVATE KEY-----") {
        return Err(format!("--auth-public-key {shown}: this is a private key; give the public key (openssl pkey -pubout)"));
    }
    // The algorithm from the key's type, found by its object identifier in the DER.
    let der = pem::parse(&pem).map_err(|e| format!("--auth-public-key {shown}: not a PEM public key ({e})"))?;
    let der = der.contents();
    const RSA: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const EC: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    let (alg, key) = if text.contains("BEGIN RSA PUBLIC KEY") || has(RSA) {
        (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
    } else if has(EC) && has(P256) {
        (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
    } else if has(EC) {
        return Err(format!("--auth-public-key {shown}: an EC key on a curve other than P-256 (only ES256 is supported)"));
    } else if has(ED25519) {
        (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem))
    } else {
        return Err(format!("--auth-public-key {shown}: not an RSA, EC P-256 or Ed25519 public key"));
    };
    let key = key.map_err(|e| format!("--auth-public-key {shown}: {e}"))?;
    let kid = file.file_stem().map(|s| s.to_string_lossy().into_owned());
    Ok(Key { alg, kid, key })
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The token of a request: `Authorization: Bearer JWT` if present, else `?token=JWT`. `Err`
/// for an `Authorization` header that is not a bearer token.
pub(crate) fn request_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Result<Option<std::borrow::Cow<'a, str>>, TokenError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| TokenError("invalid Authorization header".into()))?;
        let (scheme, token) = v.split_once(' ').unwrap_or((v, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(TokenError("invalid Authorization header: expected \"Bearer <token>\"".into()));
        }
        return Ok(Some(token.trim().into()));
    }
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("token=") {
            return Ok(Some(percent_encoding::percent_decode_str(v).decode_utf8_lossy()));
        }
    }
    Ok(None)
}

/// The refusal of a request without a valid token: 401 with `reason` on one line.
pub(crate) fn unauthorized(reason: &str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::WWW_AUTHENTICATE, "Bearer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (StatusCode::UNAUTHORIZED, headers, format!("{reason}\n")).into_response()
}

/// The refusal of a valid token whose grants are too small: 403 with `reason` on one line.
pub(crate) fn forbidden(reason: &str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (StatusCode::FORBIDDEN, headers, format!("{reason}\n")).into_response()
}

/// A URI for logs, with the value of a `token` parameter replaced by `[redacted]`.
pub(crate) struct Redacted<'a>(pub &'a Uri);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.path())?;
        let Some(q) = self.0.query() else { return Ok(()) };
        for (i, pair) in q.split('&').enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            match pair.split_once('=') {
                Some(("token", _)) => f.write_str("token=[redacted]")?,
                _ => f.write_str(pair)?,
            }
        }
        Ok(())
    }
}

/// What `ivy-server token` puts in a token.
#[derive(Debug, Clone, Default)]
pub struct Mint {
    /// `sub`.
    pub sub: String,
    /// `read` grants.
    pub read: Vec<String>,
    /// `write` grants.
    pub write: Vec<String>,
    /// Lifetime (`exp` = now + ttl).
    pub ttl: Duration,
    /// `iss`, if set.
    pub issuer: Option<String>,
    /// `aud`, if set.
    pub audience: Option<String>,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    read: &'a [String],
    write: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// An HS256 token signed with `secret` (the development helper `ivy-server token`).
pub fn mint_hs256(secret: &Secret, m: &Mint) -> Result<String, String> {
    if m.sub.is_empty() {
        return Err("--sub is empty".into());
    }
    Grants::new(&m.read)?;
    Grants::new(&m.write)?;
    let iat = now_unix();
    let claims = MintClaims {
        sub: &m.sub,
        iat,
        exp: iat.saturating_add(m.ttl.as_secs().max(1)),
        read: &m.read,
        write: &m.write,
        iss: m.issuer.as_deref(),
        aud: m.audience.as_deref(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.expose())).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(p: &[&str]) -> Grants {
        Grants::new(p).unwrap()
    }

    #[test]
    fn grants_cover_whole_segments() {
        let g = grants(&["/chat", "/x/y/"]);
        assert!(g.covers("/chat") && g.covers("/chat/room1") && g.covers("/chat/a/b") && g.covers("/x/y/z"));
        assert!(!g.covers("/chatter") && !g.covers("/") && !g.covers("/x") && !g.covers("/ch"));
        let root = grants(&["/"]);
        assert!(root.covers("/") && root.covers("/anything/below"));
        assert!(!grants(&[]).covers("/"));
        assert!(Grants::new(&["/Bad"]).is_err());
    }

    fn auth(config: Config) -> Auth {
        Auth::new(&config).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn the_info_claim_is_a_small_json_object() {
        let a = auth(Config::default().auth_hmac_secrets(vec!["k".into()]));
        let now = now_unix();
        let t = token("k", serde_json::json!({"sub": "ada", "exp": now + 60, "info": {"name": "Ada", "n": [1, 2]}}));
        assert_eq!(a.verify(&t, now).unwrap().info.as_deref(), Some(r#"{"n":[1,2],"name":"Ada"}"#));
        let none = token("k", serde_json::json!({"sub": "ada", "exp": now + 60}));
        assert_eq!(a.verify(&none, now).unwrap().info, None);
        let refused = "info claim must be a JSON object of at most 1024 bytes";
        for info in [serde_json::json!("Ada"), serde_json::json!([1]), serde_json::json!(null), serde_json::json!({"x": "y".repeat(1020)})]
        {
            let t = token("k", serde_json::json!({"sub": "ada", "exp": now + 60, "info": info}));
            assert_eq!(a.verify(&t, now).unwrap_err().0, refused);
        }
        let largest = token("k", serde_json::json!({"sub": "ada", "exp": now + 60, "info": {"x": "y".repeat(1016)}}));
        assert_eq!(a.verify(&largest, now).unwrap().info.map(|i| i.len()), Some(1024));
    }

    #[test]
    fn hs256_tokens_are_verified_with_each_secret() {
        let a = auth(Config::default().auth_hmac_secrets(vec!["old".into(), "new".into()]));
        let now = now_unix();
        for secret in ["old", "new"] {
            let t = token(secret, serde_json::json!({"sub": "ada", "exp": now + 60, "read": ["/chat"]}));
            let p = a.verify(&t, now).unwrap();
            assert_eq!(p.sub.as_deref(), Some("ada"));
            assert!(p.read.covers("/chat/x") && p.write.is_empty());
        }
        let bad = token("other", serde_json::json!({"sub": "ada", "exp": now + 60}));
        assert_eq!(a.verify(&bad, now).unwrap_err().0, "invalid token: bad signature");
        let expired = token("new", serde_json::json!({"sub": "ada", "exp": now - 60}));
        assert_eq!(a.verify(&expired, now).unwrap_err().0, "token expired");
        let long = token("new", serde_json::json!({"sub": "x".repeat(257), "exp": now + 60}));
        assert_eq!(a.verify(&long, now).unwrap_err().0, "invalid token: sub longer than 256 bytes");
        let longest = token("new", serde_json::json!({"sub": "é".repeat(128), "exp": now + 60}));
        assert_eq!(a.verify(&longest, now).unwrap().sub.as_deref().map(str::len), Some(256));
        let nosub = token("new", serde_json::json!({"exp": now + 60}));
        assert_eq!(a.verify(&nosub, now).unwrap_err().0, "invalid token: no sub claim");
        let future = token("new", serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now + 60}));
        assert_eq!(a.verify(&future, now).unwrap_err().0, "token not valid yet (nbf)");
        let iat = token("new", serde_json::json!({"sub": "a", "exp": now + 600, "iat": now + 60}));
        assert_eq!(a.verify(&iat, now).unwrap_err().0, "invalid token: issued in the future (iat)");
        let slightly = token("new", serde_json::json!({"sub": "a", "exp": now + 600, "iat": now + 2, "nbf": now + 2}));
        assert!(a.verify(&slightly, now).is_ok(), "within the leeway");
        assert!(a.verify("not.a.token", now).is_err());
        // alg none: a header and claims with no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZGEiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(a.verify(none, now).unwrap_err().0.contains("none"));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let a =
            auth(Config::default().auth_hmac_secrets(vec!["s".into()]).auth_issuer(Some("me".into())).auth_audience(Some("ivy".into())));
        let now = now_unix();
        let ok = token("s", serde_json::json!({"sub": "a", "exp": now + 60, "iss": "me", "aud": "ivy"}));
        assert!(a.verify(&ok, now).is_ok());
        let iss = token("s", serde_json::json!({"sub": "a", "exp": now + 60, "iss": "you", "aud": "ivy"}));
        assert_eq!(a.verify(&iss, now).unwrap_err().0, "invalid token: wrong issuer (iss)");
        let aud = token("s", serde_json::json!({"sub": "a", "exp": now + 60, "iss": "me", "aud": "other"}));
        assert_eq!(a.verify(&aud, now).unwrap_err().0, "invalid token: wrong audience (aud)");
        let missing = token("s", serde_json::json!({"sub": "a", "exp": now + 60}));
        assert!(a.verify(&missing, now).is_err());
        // Without them configured, a token's aud is not held against it.
        let open = auth(Config::default().auth_hmac_secrets(vec!["s".into()]));
        assert!(open.verify(&aud, now).is_ok());
    }

    #[test]
    fn access_without_keys_is_open_and_anonymous_with() {
        let off = auth(Config::default().anonymous_read(vec!["/public".into()]));
        assert!(!off.enabled());
        assert!(off.access(None).unwrap().allows(Need::Write, "/x"));
        let on = auth(Config::default().auth_hmac_secrets(vec!["s".into()]).anonymous_read(vec!["/public".into()]));
        let anon = on.access(None).unwrap();
        assert!(anon.allows(Need::Read, "/public/a") && !anon.allows(Need::Read, "/") && !anon.allows(Need::Write, "/public"));
        assert_eq!(anon.refusal(Need::Write, "/public"), "without a token there is no write grant covering /public");
        assert!(on.read_needs_token("/private") && !on.read_needs_token("/public/x"));
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query_and_are_redacted() {
        let mut h = HeaderMap::new();
        assert_eq!(request_token(&h, Some("n=1&token=abc.d%2De")).unwrap().as_deref(), Some("abc.d-e"));
        assert_eq!(request_token(&h, Some("n=1")).unwrap(), None);
        h.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(request_token(&h, Some("token=abc")).unwrap().as_deref(), Some("xyz"));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert!(request_token(&h, None).is_err());
        let uri: Uri = "/log/a?n=2&token=SECRET.TOKEN&after=1".parse().unwrap();
        assert_eq!(Redacted(&uri).to_string(), "/log/a?n=2&token=[redacted]&after=1");
    }

    #[test]
    fn minted_tokens_verify() {
        let secret = Secret::new("s");
        let m = Mint {
            sub: "ada".into(),
            read: vec!["/chat".into()],
            write: vec!["/chat/lobby".into()],
            ttl: Duration::from_secs(3600),
            ..Mint::default()
        };
        let t = mint_hs256(&secret, &m).unwrap();
        let p = auth(Config::default().auth_hmac_secrets(vec![secret])).verify(&t, now_unix()).unwrap();
        assert!(p.write.covers("/chat/lobby") && !p.write.covers("/chat"));
        assert!(format!("{:?}", Secret::new("hunter2")).find("hunter2").is_none());
    }
}
