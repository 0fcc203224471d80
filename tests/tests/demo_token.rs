//! The demo-only token endpoint (`ivy-server --demo-token-endpoint`, `POST /demo/token`),
//! against the real binary over real HTTP: the tokens it mints verify and grant what the chat
//! needs, a nickname is its first visitor's (their cookie) and a second visitor gets 409, bad
//! requests get clear refusals, and the server refuses to start with the flag but no secret.

use std::time::Duration;

use ivy_tests::{Client, ServerProcess, http_get, server_bin, temp_dir};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "demo-test-secret";

/// A raw HTTP/1.1 response: status, headers (names lowercased), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The visitor cookie it sets (`name=value`), if any.
    fn cookie(&self) -> Option<String> {
        self.header("set-cookie").map(|c| c.split(';').next().unwrap().to_string())
    }
}

/// `method /demo/token` with `body` of `content_type` and extra headers.
async fn request(addr: std::net::SocketAddr, method: &str, content_type: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} /demo/token HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("reply in time").unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    Reply { status, headers, body: body.to_string() }
}

async fn token_for(addr: std::net::SocketAddr, nickname: &str, cookie: Option<&str>) -> Reply {
    let body = serde_json::json!({ "nickname": nickname }).to_string();
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    request(addr, "POST", "application/json", &body, &headers).await
}

/// The claims of `token`, checked with the server's secret.
fn claims(token: &str) -> Value {
    let mut v = Validation::new(Algorithm::HS256);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(SECRET.as_bytes()), &v).expect("a valid token").claims
}

async fn demo_server(dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
    let mut flags = vec!["--auth-hmac-secret", SECRET, "--demo-token-endpoint", "--anonymous-read", "/chat"];
    flags.extend_from_slice(extra);
    ServerProcess::start(dir, &flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nickname_gets_a_short_lived_token_for_the_chat_and_it_works() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &[]).await;
    let r = token_for(server.addr, "  Ada  Lovelace ", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let set_cookie = r.header("set-cookie").expect("a visitor cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/demo/"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    let body = r.json();
    assert_eq!(body["sub"], "Ada Lovelace");
    assert_eq!(body["expires_in"], 300);
    let token = body["token"].as_str().unwrap();
    let c = claims(token);
    assert_eq!(c["sub"], "Ada Lovelace");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300, "five minutes by default");
    assert_eq!((c["read"].clone(), c["write"].clone()), (serde_json::json!(["/chat"]), serde_json::json!(["/chat"])));

    // The token reads and writes the chat, nothing else.
    let mut ws = Client::connect(&format!("{}?token={token}", server.ws_url())).await;
    ws.subscribe("/chat/lobby").await;
    ws.publish("/chat/room2", "hi").await;
    assert!(ws.request("#3#:/elsewhere:hi").await.starts_with("#3#!forbidden "));
    // Without a token the log of the chat is readable (--anonymous-read /chat), writing is not.
    let mut anon = Client::connect(&server.ws_url()).await;
    assert!(anon.request("#1#:/chat/lobby:spoof").await.starts_with("#1#!forbidden "));
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_visitor_cannot_take_another_visitors_nickname() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &["--demo-token-ttl", "2s"]).await;
    let first = token_for(server.addr, "ada", None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let c = claims(first.json()["token"].as_str().unwrap());
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 2, "--demo-token-ttl");
    let cookie = first.cookie().unwrap();

    // Another visitor (no cookie, or someone else's), whatever the case of the nickname.
    for (nick, other) in [("ada", None), ("ADA", None), (" Ada ", Some("ivy_demo_visitor=00000000000000000000000000000000"))] {
        let r = token_for(server.addr, nick, other).await;
        assert_eq!(r.status, 409, "{nick:?}: {}", r.body);
        assert!(r.body.starts_with("nickname taken: "), "{}", r.body);
        assert_eq!(r.header("set-cookie"), None, "a refusal claims nothing");
    }
    // The first visitor gets fresh tokens for it (a refresh), with no new cookie.
    let again = token_for(server.addr, "ada", Some(&cookie)).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("set-cookie"), None);
    assert_eq!(claims(again.json()["token"].as_str().unwrap())["sub"], "ada");
    // ... and may claim a second nickname with the same cookie; a new visitor gets a free one.
    assert_eq!(token_for(server.addr, "ada2", Some(&cookie)).await.status, 200);
    let bob = token_for(server.addr, "bob", None).await;
    assert_eq!(bob.status, 200);
    assert_ne!(bob.cookie().unwrap(), cookie);
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_are_accepted_and_bad_requests_get_clear_refusals() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &[]).await;
    let form = request(server.addr, "POST", "application/x-www-form-urlencoded", "nickname=grace+hopper", &[]).await;
    assert_eq!(form.status, 200, "{}", form.body);
    assert_eq!(form.json()["sub"], "grace hopper");

    let cases: [(&str, &str, &str, u16, &str); 6] = [
        ("POST", "application/json", r#"{"nickname": "   "}"#, 400, "pick a nickname"),
        ("POST", "application/json", r#"{"nick": "ada"}"#, 400, "invalid JSON"),
        ("POST", "application/json", &format!(r#"{{"nickname": "{}"}}"#, "x".repeat(33)), 400, "at most 32 characters"),
        ("POST", "text/plain", "ada", 415, "application/json"),
        ("POST", "application/json", &format!(r#"{{"nickname": "{}"}}"#, "x".repeat(2000)), 413, "limited to 1024 bytes"),
        ("GET", "application/json", "", 405, ""),
    ];
    for (method, content_type, body, status, reason) in cases {
        let r = request(server.addr, method, content_type, body, &[]).await;
        assert_eq!(r.status, status, "{method} {body:.40}: {}", r.body);
        assert!(r.body.contains(reason), "{:?} should say {reason:?}", r.body);
    }
    server.kill().await;

    // Without the flag there is no such endpoint.
    let plain = ServerProcess::start(dir.path(), &["--auth-hmac-secret", SECRET]).await;
    assert_eq!(token_for(plain.addr, "ada", None).await.status, 404);
    assert_eq!(http_get(plain.addr, "/demo/token", &[]).await.status, 404);
    plain.kill().await;
}

#[tokio::test]
async fn the_flag_without_a_secret_refuses_to_start() {
    let dir = temp_dir();
    let out = tokio::process::Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0", "--memory", "--demo-token-endpoint", "--data"])
        .arg(dir.path())
        .env_remove("IVY_AUTH_HMAC_SECRET")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("exits in time").unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing listened: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--demo-token-endpoint needs --auth-hmac-secret"), "{stderr}");
}

/// Browsers do not show a page why its WebSocket failed to open: the wasm client then asks
/// with `fetch` (a plain `GET /ws?token=...`), which gets the refusal's status and reason,
/// with CORS headers so that a page of another origin may read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_of_ws_with_a_refused_token_says_why() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &[]).await;
    let origin = [("Origin", "http://page.example")];
    let bad = http_get(server.addr, "/ws?token=not.a.jwt", &origin).await;
    assert_eq!(bad.status, 401);
    assert!(bad.text().starts_with("invalid token: "), "{}", bad.text());
    assert_eq!(bad.header("access-control-allow-origin"), Some("*"));
    // A valid token: not a WebSocket request, so not a 401.
    let token = token_for(server.addr, "ada", None).await.json()["token"].as_str().unwrap().to_string();
    let good = http_get(server.addr, &format!("/ws?token={token}"), &origin).await;
    assert!(good.status != 401 && good.status >= 400, "{} {}", good.status, good.text());
    server.kill().await;
}

/// The demo pages get their token after the page loaded: a connection opened without one that
/// presents a token in-band (`&JWT`) takes its identity, and its later events are from that
/// `sub` (the verified sender of `ext=sender`), not anonymous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_taken_in_band_is_the_verified_sender_of_later_events() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &[]).await;
    let token = token_for(server.addr, "ada", None).await.json()["token"].as_str().unwrap().to_string();
    let mut ws = Client::connect(&format!("{}?ext=sender", server.ws_url())).await;
    assert!(ws.request("#1#:/chat/room:before").await.starts_with("#1#!forbidden "), "anonymous: read only");
    assert!(ws.request(&format!("#2#&{token}")).await.starts_with("#2#@"));
    ws.publish("/chat/room", "after").await;
    let log = ivy_tests::log_text(server.addr, "/log/chat/room?ext=sender").await;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("~=ada:/chat/room:after"), "{log}");
    server.kill().await;
}

/// One client address cannot take every nickname: it holds at most 64 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_64_nicknames() {
    let dir = temp_dir();
    let server = demo_server(dir.path(), &[]).await;
    for i in 0..ivy_server::demo::MAX_CLAIMS_PER_ADDRESS {
        assert_eq!(token_for(server.addr, &format!("visitor {i}"), None).await.status, 200, "claim {i}");
    }
    let r = token_for(server.addr, "one too many", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("too many nicknames"), "{}", r.body);
    server.kill().await;
}
