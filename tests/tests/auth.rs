//! Identity and permissions (issue 13, the server's part): real tokens, minted here with a
//! standard JWT library and the test-only keys of `tests/fixtures/auth/` (made with openssl;
//! never use them elsewhere), against a real server on 127.0.0.1: every grant decision, every
//! refusal outcome, expiry on a live connection, key rotation, the helper that mints tokens,
//! the native client and the CLI with tokens, and that the logs never show a token.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use ivy_client_native::{ClientError, Error as ClientErr, ErrorCode, LogQuery, LogReader, Start};
use ivy_server::auth::Secret;
use ivy_tests::{Client, Got, HttpResponse, TestServer, config, http_get, ivy_bin, raw_ws_open_at, server_bin, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/auth").join(name)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims for `sub` valid for an hour, with these grants.
fn claims(sub: &str, read: &[&str], write: &[&str]) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": read, "write": write})
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// A token signed with the private key `key` of the fixtures, with `kid` in its header.
fn signed(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(fixture(key)).unwrap();
    let name = key;
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("{other:?}"),
    }
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A server with auth on: two HMAC secrets (rotation), anonymous read of `/public` and
/// anonymous write of `/public/inbox`.
async fn server(dir: &std::path::Path) -> TestServer {
    let mut setup = config(dir);
    setup.config = setup
        .config
        .clone()
        .auth_hmac_secrets(vec![Secret::new("old-secret"), Secret::new("new-secret")])
        .anonymous_read(vec!["/public".into()])
        .anonymous_write(vec!["/public/inbox".into()]);
    TestServer::start(setup).await
}

/// Opens `/ws` with `target`'s query and `headers`: the response (a 101, or a refusal with
/// its body).
async fn handshake(server: &TestServer, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut h = vec![("Sec-WebSocket-Protocol", "ivy1")];
    h.extend_from_slice(headers);
    raw_ws_open_at(server.addr, target, &h).await.unwrap().0
}

async fn connect(server: &TestServer, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", server.ws_url())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_at_the_handshake_with_401_and_a_reason() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let c = claims("ada", &["/"], &[]);
    let none = {
        // `alg: none`: a header and claims, no signature.
        use std::fmt::Write;
        let b64 = |v: &Value| {
            let s = v.to_string();
            let mut out = String::new();
            let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            for chunk in s.as_bytes().chunks(3) {
                let n = chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    let _ = out.write_char(t[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        };
        format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&c))
    };
    let hs384 = jsonwebtoken::encode(&Header::new(Algorithm::HS384), &c, &EncodingKey::from_secret(b"new-secret")).unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("garbage".into(), "invalid token: not a JWT"),
        (hs256("wrong-secret", &c), "invalid token: bad signature"),
        (hs256("new-secret", &json!({"sub": "ada", "exp": now() - 60})), "token expired"),
        (hs256("new-secret", &json!({"sub": "ada", "exp": now() + 60, "nbf": now() + 60})), "token not valid yet (nbf)"),
        (hs256("new-secret", &json!({"sub": "ada", "exp": now() + 600, "iat": now() + 60})), "invalid token: issued in the future (iat)"),
        (hs256("new-secret", &json!({"exp": now() + 60})), "invalid token: no sub claim"),
        (hs256("new-secret", &json!({"sub": "ada"})), "invalid token: no exp claim"),
        (hs256("new-secret", &json!({"sub": "ada", "exp": now() + 60, "read": ["/Bad"]})), "invalid token: read claim: invalid grant path"),
        (none, "invalid token: not a JWT with a supported algorithm (\"alg\": \"none\" is never accepted)"),
        (hs384, "invalid token: algorithm HS384 is not accepted by this server"),
        (signed(Algorithm::RS256, "rsa.key", None, &c), "invalid token: algorithm RS256 is not accepted by this server"),
    ];
    for (token, reason) in &cases {
        for (target, headers) in
            [(format!("/ws?token={token}"), vec![]), ("/ws".to_string(), vec![("Authorization", format!("Bearer {token}"))])]
        {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = handshake(&server, &target, &headers).await;
            assert_eq!(r.status, 401, "{reason}: {}", r.text());
            let body = r.text();
            assert!(body.starts_with(reason) && body.ends_with('\n') && body.lines().count() == 1, "{reason}: {body:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    let r = handshake(&server, "/ws", &[("Authorization", "Basic YWRhOnB3")]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "invalid Authorization header: expected \"Bearer <token>\"\n"));
    // The refusals cost nothing: the server still serves.
    let mut ok = connect(&server, &hs256("new-secret", &c)).await;
    assert!(ok.subscribe("/x").await.len() > 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_side_by_side() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    for secret in ["old-secret", "new-secret"] {
        let mut c = connect(&server, &hs256(secret, &claims("ada", &["/chat"], &["/chat"]))).await;
        c.subscribe("/chat").await;
        c.publish("/chat", secret).await;
        c.close().await;
    }
    // The same by the header.
    let token = hs256("old-secret", &claims("ada", &["/chat"], &[]));
    let r = handshake(&server, "/ws", &[("Authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(r.status, 101);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_is_checked_against_the_grants_and_the_connection_stays_open() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let mut ada = connect(&server, &hs256("new-secret", &claims("ada", &["/chat"], &["/chat/lobby"]))).await;
    let mut root = connect(&server, &hs256("new-secret", &claims("root", &["/"], &["/"]))).await;
    root.subscribe("/").await;

    // Reads: a grant on G covers G and below, by whole segments.
    ada.subscribe("/chat").await;
    ada.subscribe("/chat/room1").await;
    let refusal = "!forbidden the token of \"ada\" has no read grant covering";
    for path in ["/", "/chatter", "/other", "/cha"] {
        let reply = ada.request(&format!("#s#+{path}")).await;
        assert!(reply.starts_with(&format!("#s#{refusal} {path} ")), "{path}: {reply}");
    }
    // A keyless refusal has no key.
    ada.send("+/other").await;
    assert!(ada.recv().await.starts_with(refusal));

    // Writes: only below the write grant; a refused send is not stored or delivered.
    let ts = ada.publish("/chat/lobby", "hi").await;
    assert_eq!(root.recv().await, format!("@{ts}:/chat/lobby:hi"));
    let ts = ada.publish("/chat/lobby/deep", "below").await;
    assert_eq!(root.recv().await, format!("@{ts}:/chat/lobby/deep:below"));
    for path in ["/chat", "/chat/room1", "/chat/lobbyist", "/"] {
        assert_eq!(
            ada.request(&format!("#w#:{path}:nope")).await,
            format!("#w#!forbidden the token of \"ada\" has no write grant covering {path}")
        );
    }
    root.expect_silence(Duration::from_millis(300)).await;

    // The granted subscriptions deliver (once per connection), the refused ones nothing.
    let ts = root.publish("/chat/room1", "for ada").await;
    assert_eq!(ada.recv().await, format!("@{ts}:/chat/room1:for ada"));
    root.publish("/other", "not for ada").await;
    root.publish("/chatter", "nor this").await;
    ada.expect_silence(Duration::from_millis(300)).await;
    // Unsubscribing and the time need no grant.
    assert!(ada.request("#u#-/other").await.starts_with("#u#@"));
    assert!(ada.request("#t#@").await.starts_with("#t#@"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_the_anonymous_grants_apply() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let mut anon = Client::connect(&server.ws_url()).await;
    anon.subscribe("/public").await;
    anon.subscribe("/public/news").await;
    assert_eq!(
        anon.request("#1#+/private").await,
        "#1#!forbidden without a token there is no read grant covering /private (a subscription delivers the path's whole subtree)"
    );
    assert_eq!(anon.request("#2#:/public:x").await, "#2#!forbidden without a token there is no write grant covering /public");
    let ts = anon.publish("/public/inbox/msg", "hello").await;
    assert!(ts.len() == 20);
    server.stop().await;
}

/// Auth off (no key): today's behaviour exactly, whatever a client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_nothing_changes_on_the_wire() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().anonymous_read(vec!["/public".into()]);
    let server = TestServer::start(setup).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let mut b = Client::connect(&server.ws_url()).await;
    assert_eq!(a.protocol.as_deref(), Some("ivy1"));
    let pos = a.subscribe("/").await;
    assert_eq!(pos.len(), 20);
    let ts = b.publish("/anything/at/all", "x").await;
    assert_eq!(a.recv().await, format!("@{ts}:/anything/at/all:x"));
    b.send(":/no/key:y").await;
    assert!(a.recv().await.ends_with(":/no/key:y"));
    b.expect_silence(Duration::from_millis(200)).await;
    // A token (even a bad one), or any Authorization header, is ignored: there is nothing to
    // check it with.
    let mut c = Client::connect(&format!("{}?token=garbage", server.ws_url())).await;
    c.publish("/private", "z").await;
    let r = raw_ws_open_at(server.addr, "/ws", &[("Authorization", "Basic YWRhOnB3")]).await.unwrap().0;
    assert_eq!(r.status, 101);
    for headers in [&[][..], &[("Authorization", "Basic YWRhOnB3")][..]] {
        let r = http_get(server.addr, "/log/private?token=garbage", headers).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        assert!(r.header("vary").is_none());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_reads_need_a_read_grant_401_or_403_and_are_private() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let mut root = connect(&server, &hs256("new-secret", &claims("root", &["/"], &["/"]))).await;
    let ts = root.publish("/chat/room1", "secret").await;
    root.publish("/public/a", "open").await;
    let ada = hs256("new-secret", &claims("ada", &["/chat"], &[]));
    let bob = hs256("new-secret", &claims("bob", &["/elsewhere"], &[]));
    let origin = ("Origin", "http://app.example");

    // No token: 401; a bad one: 401; a token whose grants are too small: 403. One line each,
    // with CORS headers so that a page can read why.
    let r = http_get(server.addr, "/log/chat", &[origin]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.text(),
        "a token is needed: without a token there is no read grant covering /chat (a subscription delivers the path's whole subtree)\n"
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let r = http_get(server.addr, "/log/chat?token=nonsense", &[origin]).await;
    assert_eq!((r.status, r.text().lines().count()), (401, 1));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let expired = hs256("new-secret", &json!({"sub": "ada", "exp": now() - 60, "read": ["/"]}));
    let r = http_get(server.addr, &format!("/log/chat?token={expired}"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "token expired\n"));
    let r = http_get(server.addr, &format!("/log/chat?token={bob}"), &[origin]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "the token of \"bob\" has no read grant covering /chat (a subscription delivers the path's whole subtree)\n");
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    // `/` needs a grant covering everything.
    let r = http_get(server.addr, &format!("/log/?token={ada}"), &[]).await;
    assert_eq!(r.status, 403);

    // Granted, by the query or the header: 200, never cached as public.
    for (target, auth) in [(format!("/log/chat?token={ada}"), None), ("/log/chat".to_string(), Some(format!("Bearer {ada}")))] {
        let mut headers = vec![origin];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let r = http_get(server.addr, &target, &headers).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("@{ts}:/chat/room1:secret"));
        assert_eq!(r.header("cache-control"), Some("private, no-cache"));
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        assert!(r.headers.iter().any(|(k, v)| k == "vary" && v == "Authorization"), "{:?}", r.headers);
    }
    // A full page is immutable, privately.
    let r = http_get(server.addr, &format!("/log/chat?limit=1&token={ada}"), &[]).await;
    assert_eq!(r.header("cache-control"), Some("private, max-age=31536000, immutable"));
    // The anonymous grant: public as before, with or without a token.
    let r = http_get(server.addr, "/log/public?limit=1", &[]).await;
    assert_eq!((r.status, r.header("cache-control")), (200, Some("public, max-age=31536000, immutable")));
    assert!(!r.headers.iter().any(|(k, v)| k == "vary" && v == "Authorization"));
    let r = http_get(server.addr, &format!("/log/public/a?token={ada}"), &[]).await;
    assert_eq!((r.status, r.header("cache-control")), (200, Some("no-cache")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preflight_allows_the_authorization_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "OPTIONS /log/chat HTTP/1.1\r\nHost: {}\r\nOrigin: http://app.example\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let lower = raw.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 204"), "{raw}");
    assert!(lower.contains("access-control-allow-headers: if-none-match, authorization"), "{raw}");
    assert!(lower.contains("access-control-allow-origin: *"), "{raw}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_rs256_es256_eddsa_and_kid() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    let keys = ["rsa.pem", "ec.pem", "ec2.pem", "ed25519.pem"].map(fixture).to_vec();
    setup.config = setup.config.clone().auth_public_keys(keys).auth_issuer(Some("https://backend.example".into()));
    let server = TestServer::start(setup).await;
    let mut c = claims("ada", &["/chat"], &["/chat"]);
    c["iss"] = json!("https://backend.example");
    let ok = [
        signed(Algorithm::RS256, "rsa.key", None, &c),
        signed(Algorithm::RS256, "rsa.key", Some("rsa"), &c),
        signed(Algorithm::ES256, "ec.key", Some("ec"), &c),
        signed(Algorithm::ES256, "ec2.key", Some("ec2"), &c),
        // No kid, or one naming no key: every key of the algorithm is tried.
        signed(Algorithm::ES256, "ec2.key", None, &c),
        signed(Algorithm::ES256, "ec2.key", Some("unknown"), &c),
        signed(Algorithm::EdDSA, "ed25519.key", None, &c),
    ];
    for token in &ok {
        let mut client = connect(&server, token).await;
        client.publish("/chat", "signed").await;
        client.close().await;
    }
    // A kid naming a key picks that key alone.
    let wrong_kid = signed(Algorithm::ES256, "ec.key", Some("ec2"), &c);
    let r = handshake(&server, &format!("/ws?token={wrong_kid}"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "invalid token: bad signature\n"));
    // The issuer is checked, and required, when configured; HS256 is not configured here.
    let mut other = c.clone();
    other["iss"] = json!("https://evil.example");
    for (token, reason) in [
        (signed(Algorithm::EdDSA, "ed25519.key", None, &other), "invalid token: wrong issuer (iss)\n"),
        (signed(Algorithm::EdDSA, "ed25519.key", None, &claims("ada", &[], &[])), "invalid token: no iss claim\n"),
        (hs256("secret", &c), "invalid token: algorithm HS256 is not accepted by this server\n"),
    ] {
        let r = handshake(&server, &format!("/ws?token={token}"), &[]).await;
        assert_eq!((r.status, r.text().as_str()), (401, reason));
    }
    server.stop().await;

    // Unusable key files stop the server from starting, saying why.
    for (file, says) in [("p384.pem", "other than P-256"), ("ec.key", "private key"), ("missing.pem", "missing.pem")] {
        let e = ivy_server::Ivy::builder(ivy_server::Config::default().auth_public_keys(vec![fixture(file)]))
            .engine(ivy_server::engine::MemoryEngine::new())
            .open()
            .unwrap_err();
        assert!(e.to_string().contains(says), "{file}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_is_checked_when_configured() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new("s")]).auth_audience(Some("ivy".into()));
    let server = TestServer::start(setup).await;
    let mut c = claims("ada", &["/"], &[]);
    let r = handshake(&server, &format!("/ws?token={}", hs256("s", &c)), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "invalid token: no aud claim\n"));
    c["aud"] = json!("other");
    let r = handshake(&server, &format!("/ws?token={}", hs256("s", &c)), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "invalid token: wrong audience (aud)\n"));
    c["aud"] = json!(["other", "ivy"]);
    let r = handshake(&server, &format!("/ws?token={}", hs256("s", &c)), &[]).await;
    assert_eq!(r.status, 101);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connection_is_closed_with_4003_once_its_token_expired_past_the_grace() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new("s")]).auth_refresh_grace(Duration::from_millis(500));
    let server = TestServer::start(setup).await;
    let exp = now() + 2;
    let token = hs256("s", &json!({"sub": "ada", "exp": exp, "read": ["/"], "write": ["/"]}));
    let mut c = connect(&server, &token).await;
    let started = std::time::Instant::now();
    c.subscribe("/chat").await;
    c.publish("/chat/x", "before expiry").await;
    // Commands keep working until then: the token is not checked again per command.
    match c.next_within(Duration::from_secs(10)).await {
        Got::Close(code, reason) => {
            assert_eq!(code, 4003);
            assert_eq!(reason, "token expired: refresh it in-band or reconnect with a fresh token");
        }
        other => panic!("expected close 4003, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "closed too early: {waited:?}");
    // A connection without a token (anonymous) has no expiry.
    let mut anon = Client::connect(&server.ws_url()).await;
    anon.expect_silence(Duration::from_millis(300)).await;
    // A token already past `exp` (within the leeway) is accepted, then closed at once.
    let past = hs256("s", &json!({"sub": "ada", "exp": now() - 1}));
    let mut late = connect(&server, &past).await;
    assert!(matches!(late.next_within(Duration::from_secs(5)).await, Got::Close(4003, _)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_helper_mints_what_the_server_accepts() {
    let out = tokio::process::Command::new(server_bin())
        .args(["token", "--auth-hmac-secret", "dev-secret", "--sub", "ada", "--read", "/chat", "--write", "/chat/lobby", "--ttl", "1h"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // A standard library reads it.
    let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
    v.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_secret(b"dev-secret"), &v).unwrap();
    assert_eq!(data.claims["sub"], "ada");
    assert_eq!(data.claims["read"], json!(["/chat"]));
    assert_eq!(data.claims["write"], json!(["/chat/lobby"]));
    let ttl = data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 3600);
    // And the server does.
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new("dev-secret")]);
    let server = TestServer::start(setup).await;
    let mut c = connect(&server, &token).await;
    c.publish("/chat/lobby", "minted").await;
    assert!(c.request("#1#:/chat:x").await.starts_with("#1#!forbidden"));
    server.stop().await;
    // Without a secret it says what it needs (exit 2); the environment variable works too.
    let out = tokio::process::Command::new(server_bin())
        .args(["token", "--sub", "ada"])
        .env_remove("IVY_AUTH_HMAC_SECRET")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --auth-hmac-secret"));
    let out = tokio::process::Command::new(server_bin())
        .args(["token", "--sub", "ada", "--ttl", "10m"])
        .env("IVY_AUTH_HMAC_SECRET", "env-secret")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(jsonwebtoken::decode::<Value>(token.trim(), &jsonwebtoken::DecodingKey::from_secret(b"env-secret"), &v).is_ok());
}

/// The binary with trace-level logs: refused and accepted tokens, on `/ws` and `/log`, never
/// appear in them; and with no key the server warns that auth is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_show_a_token_and_auth_off_is_warned() {
    async fn run(args: &[&str], work: impl AsyncFnOnce(std::net::SocketAddr)) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
        let dir = temp_dir();
        let mut child = tokio::process::Command::new(server_bin())
            .args(["--listen", "127.0.0.1:0", "--memory", "--data"])
            .arg(dir.path())
            .args(args)
            .env("RUST_LOG", "trace")
            .env_remove("IVY_AUTH_HMAC_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let addr = line.rsplit("http://").next().unwrap().trim().parse().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let logs = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        work(addr).await;
        let pid = child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        child.wait().await.unwrap();
        logs.await.unwrap()
    }
    let good = hs256("log-secret", &claims("ada", &["/chat"], &["/chat"]));
    let bad = hs256("other-secret", &claims("eve", &["/"], &["/"]));
    let logs = run(&["--auth-hmac-secret", "log-secret"], async |addr| {
        let ws = format!("ws://{addr}/ws");
        let mut c = Client::connect(&format!("{ws}?token={good}")).await;
        c.publish("/chat", "x").await;
        c.close().await;
        for token in [&good, &bad] {
            let _ = raw_ws_open_at(addr, &format!("/ws?token={token}&x=1"), &[]).await;
            let _ = raw_ws_open_at(addr, "/ws", &[("Authorization", &format!("Bearer {token}"))]).await;
            let _ = http_get(addr, &format!("/log/chat?token={token}"), &[]).await;
            let _ = http_get(addr, "/log/chat", &[("Authorization", &format!("Bearer {token}"))]).await;
        }
    })
    .await;
    assert!(logs.contains("TRACE"), "trace logs were on");
    assert!(logs.contains("token=[redacted]"), "the refusals are logged, redacted:\n{logs}");
    for token in [&good, &bad] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a token in the logs:\n{logs}");
    }
    assert!(!logs.contains("log-secret"), "the secret in the logs");
    assert!(!logs.contains("auth is off"));

    let logs = run(&[], async |_| {}).await;
    assert!(logs.contains("auth is off"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_client_sends_its_token_and_stops_at_401() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let token = hs256("new-secret", &claims("ada", &["/chat"], &["/chat/lobby"]));
    let client = ivy_client_native::Client::builder(&url).token(&token).connect().await.unwrap();
    let mut sub = client.subscribe_from("/chat", Start::Beginning).await.unwrap();
    let ts = client.send("/chat/lobby", "hello").await.unwrap();
    let e = sub.next().await.unwrap().unwrap();
    assert_eq!((e.ts, &*e.path), (ts, "/chat/lobby"));
    // Refusals are typed.
    match client.send("/chat", "no").await {
        Err(ClientErr::Request(ClientError::Server { code, message })) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(message, "the token of \"ada\" has no write grant covering /chat");
        }
        other => panic!("{other:?}"),
    }
    let mut refused = client.subscribe("/private").await.unwrap();
    match refused.next().await {
        Some(Err(ivy_client_native::SubscriptionError::Refused(ClientError::Server { code, .. }))) => {
            assert_eq!(code, ErrorCode::Forbidden)
        }
        other => panic!("{other:?}"),
    }
    // Log reads carry it as a bearer token.
    let events = client.log("/chat", LogQuery::All).await.unwrap();
    assert_eq!(events.len(), 1);
    let anonymous = LogReader::new(&url).unwrap();
    match anonymous.log("/chat", LogQuery::All).await {
        Err(ClientErr::Log(e)) => assert_eq!(e.status, Some(401)),
        other => panic!("{other:?}"),
    }
    assert_eq!(LogReader::new(&url).unwrap().token(&token).log("/chat", LogQuery::All).await.unwrap().len(), 1);
    client.close().await;

    // A token refused at the handshake: Error::Connect with 401 and the reason, at once,
    // even when told to retry the first connection.
    let expired = hs256("new-secret", &json!({"sub": "ada", "exp": now() - 60}));
    for retry in [false, true] {
        let started = std::time::Instant::now();
        // Returning at all shows it: with retries on, anything but this refusal is retried.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            ivy_client_native::Client::builder(&url).token(&expired).retry_initial_connect(retry).connect(),
        )
        .await
        .unwrap_or_else(|_| panic!("retried forever (retry_initial_connect({retry}))"));
        match r {
            Err(ClientErr::Connect(e)) => {
                assert_eq!(e.status, Some(401));
                assert_eq!(e.message, "HTTP 401: token expired");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        println!("refused in {:?} (retry_initial_connect({retry}))", started.elapsed());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_native_client_closes_when_its_expired_token_is_refused() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new("s")]).auth_refresh_grace(Duration::ZERO);
    let server = TestServer::start(setup).await;
    let token = hs256("s", &json!({"sub": "ada", "exp": now() + 2, "read": ["/"]}));
    let client = ivy_client_native::Client::builder(format!("ws://{}", server.addr)).token(token).connect().await.unwrap();
    let mut sub = client.subscribe("/chat").await.unwrap();
    // Closed with 4003, the reconnect refused with 401: the client closes instead of retrying.
    let end = tokio::time::timeout(Duration::from_secs(15), sub.next()).await.expect("the subscription ended");
    assert!(end.is_none(), "{end:?}");
    let mut state = client.state();
    tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| *s == ivy_client_native::ConnState::Closed)).await.unwrap().unwrap();
    server.stop().await;
}

async fn ivy(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = tokio::process::Command::new(ivy_bin()).args(args).env_remove("IVY_TOKEN").envs(env.iter().copied()).output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.unwrap().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_token_by_flag_or_environment() {
    let dir = temp_dir();
    let server = server(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let token = hs256("new-secret", &claims("ada", &["/chat"], &["/chat"]));
    let (code, out, err) = ivy(&["--url", &url, "--token", &token, "send", "/chat/a", "by flag"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().len(), 20);
    let (code, _, err) = ivy(&["--url", &url, "send", "/chat/a", "by env"], &[("IVY_TOKEN", &token)]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ivy(&["--url", &url, "log", "/chat"], &[("IVY_TOKEN", &token)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(":/chat/a:by flag\n") && out.contains(":/chat/a:by env\n"), "{out}");
    let (code, out, _) = ivy(&["--url", &url, "--token", &token, "sub", "/chat", "--from-beginning", "--count", "2"], &[]).await;
    assert_eq!((code, out.lines().count()), (0, 2));
    // Refusals: a command beyond the grants (exit 1), no token for a private log (exit 1,
    // HTTP 401), a bad token at the handshake (exit 3: cannot connect, with the reason).
    let (code, _, err) = ivy(&["--url", &url, "--token", &token, "send", "/other", "x"], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("forbidden"), "{err}");
    let (code, _, err) = ivy(&["--url", &url, "log", "/chat"], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = ivy(&["--url", &url, "--token", "garbage", "time"], &[]).await;
    assert_eq!(code, 3);
    assert!(err.contains("HTTP 401: invalid token"), "{err}");
    // The token never shows in the CLI's own output either.
    assert!(!err.contains(&token));
    server.stop().await;

    // `ivy sub` whose token expires: closed with 4003, its reconnect refused with 401: it
    // ends (exit 3) instead of retrying forever.
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new("s")]).auth_refresh_grace(Duration::ZERO);
    let server = TestServer::start(setup).await;
    let url = format!("ws://{}", server.addr);
    let short = hs256("s", &json!({"sub": "ada", "exp": now() + 2, "read": ["/"]}));
    let (code, _, err) = ivy(&["--url", &url, "--token", &short, "sub", "/chat"], &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("refused to reopen it (HTTP 401"), "{err}");
    server.stop().await;
}

/// The byte rate per identity: the connections of one `sub` share it (opening more does not
/// multiply it), another identity has its own, and a refusal is `!rate-limited` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_s_connections_share_its_byte_rate() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    // 1 byte per second after a burst of 100,000: within the test, spent stays spent.
    setup.config =
        setup.config.clone().auth_hmac_secrets(vec![Secret::new("new-secret")]).byte_rate_per_identity(1).byte_burst_per_identity(100_000);
    let server = TestServer::start(setup).await;
    let ada = hs256("new-secret", &claims("ada", &["/"], &["/"]));
    let (mut a1, mut a2) = (connect(&server, &ada).await, connect(&server, &ada).await);
    let mut bob = connect(&server, &hs256("new-secret", &claims("bob", &["/"], &["/"]))).await;
    let big = "x".repeat(60_000);
    // Each 60 KB send counts about 60 KB: the first two fit the identity's burst, from either
    // connection; the third does not, from either, while bob's are unaffected.
    assert!(a1.request(&format!("#1#:/a:{big}")).await.starts_with("#1#@"));
    assert!(a2.request(&format!("#2#:/a:{big}")).await.starts_with("#2#@"));
    let refusal = "!rate-limited too many bytes for this identity";
    for c in [&mut a1, &mut a2] {
        let reply = c.request(&format!("#3#:/a:{big}")).await;
        assert!(reply.starts_with(&format!("#3#{refusal}")), "{reply}");
        // Small sends still fit? No: the identity's budget is overdrawn; nothing is stored.
        assert!(c.request("#4#:/a:small").await.starts_with(&format!("#4#{refusal}")));
    }
    for i in 0..2 {
        assert!(bob.request(&format!("#b{i}#:/b:{big}")).await.starts_with(&format!("#b{i}#@")));
    }
    let log = http_get(server.addr, &format!("/log/a?token={ada}"), &[]).await.text();
    assert_eq!(log.lines().count(), 2, "only the accepted sends are stored");
    server.stop().await;
}
