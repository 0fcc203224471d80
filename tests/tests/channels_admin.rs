//! `GET /channels` (docs/PROTOCOL.md 9.14) and the admin endpoints (9.15: disconnect, revoke,
//! revocations) against a real server on 127.0.0.1 over real HTTP and WebSocket, with real
//! tokens minted here (HS256), on the engine of `IVY_TEST_ENGINE` (the restart test on sled);
//! and the CLI's `ivy channels` and `ivy admin`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ivy_server::auth::Secret;
use ivy_tests::{Client, Got, HttpResponse, TestServer, config, http_get, ivy_bin, raw_ws_open_at, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "channels-secret";
const KEY: &str = "the-admin-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token for `sub` with these read grants (write: the same), valid for an hour, with `jti`.
fn token(sub: &str, read: &[&str], jti: Option<&str>) -> String {
    let mut claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": read, "write": read});
    if let Some(j) = jti {
        claims["jti"] = json!(j);
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// One HTTP/1.1 request with a body (`Connection: close`); the response.
use ivy_tests::http_send as send;

async fn admin(addr: SocketAddr, what: &str, key: Option<&str>, body: &str) -> HttpResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    send(addr, "POST", &format!("/admin/{what}"), &headers, body.as_bytes()).await
}

fn json_of(r: &HttpResponse) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// `GET /channels` with `query` and `headers`: its JSON.
async fn channels(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Value {
    json_of(&http_get(addr, &format!("/channels{query}"), headers).await)
}

/// The paths of a page.
fn paths(page: &Value) -> Vec<String> {
    page["channels"].as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap().to_string()).collect()
}

/// Auth on: the token secret, the API key, anonymous read of `/public`.
async fn auth_server(dir: &std::path::Path) -> TestServer {
    let mut setup = config(dir);
    setup.config =
        setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).api_keys(vec![KEY.into()]).anonymous_read(vec!["/public".into()]);
    TestServer::start(setup).await
}

async fn connect(server: &TestServer, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", server.ws_url())).await
}

/// Waits (a few seconds at most) for `/metrics` to show `line` (a connection's close is
/// counted once its task ends, just after its close frame went out).
async fn metric_shows(addr: SocketAddr, line: &str) {
    let mut text = String::new();
    for _ in 0..100 {
        text = http_get(addr, "/metrics", &[]).await.text();
        if text.contains(&format!("\n{line}\n")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {line:?} in\n{text}");
}

/// Waits for the close frame of `c`.
async fn closed(c: &mut Client) -> (u16, String) {
    loop {
        match c.next_within(Duration::from_secs(10)).await {
            Got::Close(code, reason) => return (code, reason),
            Got::Line(_) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_lists_stored_and_subscribed_channels_with_their_counts() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let addr = server.addr;
    let empty = channels(addr, "", &[]).await;
    assert_eq!(empty, json!({"channels": [], "next": null}));
    let mut a = Client::connect(&server.ws_url()).await;
    let t1 = a.publish("/chat/room1", "hi").await;
    let t2 = a.publish("/chat/room2/x", "yo").await;
    let t3 = a.publish("/chat-x", "other").await;
    // Subscribers: two on /chat/room1, one on a channel without events, one on the root.
    let mut b = Client::connect(&server.ws_url()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    b.subscribe("/chat/room1").await;
    c.subscribe("/chat/room1").await;
    c.subscribe("/lobby/empty").await;
    a.subscribe("/").await;
    let all = channels(addr, "", &[]).await;
    let row = |path: &str, subs: u64, newest: Option<&str>| json!({"path": path, "subscribers": subs, "newest": newest});
    assert_eq!(
        all["channels"],
        json!([
            row("/", 1, Some(&t3)),
            row("/chat", 0, Some(&t2)),
            row("/chat-x", 0, Some(&t3)),
            row("/chat/room1", 2, Some(&t1)),
            row("/chat/room2", 0, Some(&t2)),
            row("/chat/room2/x", 0, Some(&t2)),
            row("/lobby/empty", 1, None),
        ]),
        "{all}"
    );
    assert_eq!(all["next"], Value::Null);
    // A prefix: the channel and its subtree (not /chat-x).
    assert_eq!(paths(&channels(addr, "?prefix=/chat", &[]).await), ["/chat", "/chat/room1", "/chat/room2", "/chat/room2/x"]);
    assert_eq!(paths(&channels(addr, "?prefix=%2Fchat%2Froom2", &[]).await), ["/chat/room2", "/chat/room2/x"]);
    assert_eq!(paths(&channels(addr, "?prefix=/lobby", &[]).await), ["/lobby/empty"]);
    assert_eq!(paths(&channels(addr, "?prefix=/nothing", &[]).await), Vec::<String>::new());
    // A page and its cursor.
    let page = channels(addr, "?prefix=/chat&limit=2", &[]).await;
    assert_eq!((paths(&page), page["next"].clone()), (vec!["/chat".to_string(), "/chat/room1".into()], json!("/chat/room1")));
    let page = channels(addr, "?prefix=/chat&limit=2&after=/chat/room1", &[]).await;
    assert_eq!((paths(&page), page["next"].clone()), (vec!["/chat/room2".to_string(), "/chat/room2/x".into()], Value::Null));
    // An unsubscribed channel without events is gone; the counts follow.
    c.request("#u#-/lobby/empty").await;
    b.close().await;
    let mut subs = HashMap::new();
    for _ in 0..100 {
        let page = channels(addr, "", &[]).await;
        subs = page["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["path"].as_str().unwrap().to_string(), c["subscribers"].as_u64().unwrap()))
            .collect();
        if subs.get("/chat/room1") == Some(&1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(subs.get("/chat/room1"), Some(&1), "{subs:?}");
    assert!(!subs.contains_key("/lobby/empty"), "{subs:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_walks_through_many_channels_and_bad_queries_are_refused() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let addr = server.addr;
    // 1,234 channels (and their parents /many and /many/gN), in two batches.
    let items: Vec<Value> = (0..1234).map(|i| json!({"path": format!("/many/g{}/c{i:04}", i % 10), "data": "x"})).collect();
    for chunk in items.chunks(1000) {
        let r = send(addr, "POST", "/publish", &[("Content-Type", "application/json")], json!(chunk).to_string().as_bytes()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut want: Vec<String> = (0..1234).map(|i| format!("/many/g{}/c{i:04}", i % 10)).collect();
    want.extend((0..10).map(|g| format!("/many/g{g}")));
    want.push("/many".into());
    want.sort();
    for limit in [1000, 97] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let q = match &after {
                Some(a) => format!("?prefix=/many&limit={limit}&after={a}"),
                None => format!("?prefix=/many&limit={limit}"),
            };
            let page = channels(addr, &q, &[]).await;
            let got = paths(&page);
            assert!(got.len() <= limit);
            pages += 1;
            seen.extend(got);
            match page["next"].as_str() {
                Some(next) => {
                    assert_eq!(Some(next), seen.last().map(String::as_str), "next is the page's last path");
                    after = Some(next.to_string());
                }
                None => break,
            }
        }
        assert_eq!(seen, want, "limit {limit}");
        assert_eq!(pages, want.len().div_ceil(limit), "limit {limit}");
    }
    // The default page is 100.
    assert_eq!(paths(&channels(addr, "?prefix=/many", &[]).await).len(), 100);
    for (query, reason) in [
        ("?limit=1001", "invalid limit \"1001\": a number from 1 to 1000"),
        ("?limit=0", "invalid limit \"0\": a number from 1 to 1000"),
        ("?limit=ten", "invalid limit \"ten\": a number from 1 to 1000"),
        ("?prefix=/Chat", "invalid prefix: "),
        ("?after=/A", "invalid after: "),
        ("?limit=1&limit=2", "parameter limit given more than once"),
        ("?prefix=/%FF", "invalid prefix: not UTF-8"),
        (&format!("?prefix=/{}", "a".repeat(300)), "invalid prefix: "),
        (&format!("?after=/{}", "a/".repeat(40)), "invalid after: "),
    ] {
        let r = http_get(addr, &format!("/channels{query}"), &[]).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(r.text().starts_with(reason), "{query}: {}", r.text());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_filtered_by_what_the_caller_may_read() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    for path in ["/public/news", "/chat/a", "/chat/a/x", "/chat/b", "/chatter", "/secret"] {
        let r = send(addr, "POST", &format!("/log{path}"), &[("Authorization", &format!("Bearer {KEY}"))], b"e").await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let key = format!("Bearer {KEY}");
    let all = ["/", "/chat", "/chat/a", "/chat/a/x", "/chat/b", "/chatter", "/public", "/public/news", "/secret"];
    assert_eq!(paths(&channels(addr, "", &[("Authorization", &key)]).await), all, "the API key sees all");
    // Anonymous: the anonymous read grants.
    assert_eq!(paths(&channels(addr, "", &[]).await), ["/public", "/public/news"]);
    // A token: its grants and the anonymous ones, by header or query.
    let t = token("ada", &["/chat/a", "/chatter"], None);
    let bearer = format!("Bearer {t}");
    let mine = ["/chat/a", "/chat/a/x", "/chatter", "/public", "/public/news"];
    let r = http_get(addr, "/channels", &[("Authorization", &bearer)]).await;
    assert_eq!(r.header("vary"), Some("Authorization"));
    assert_eq!(paths(&json_of(&r)), mine);
    assert_eq!(paths(&channels(addr, &format!("?token={t}"), &[]).await), mine);
    assert_eq!(paths(&channels(addr, "?prefix=/chat", &[("Authorization", &bearer)]).await), ["/chat/a", "/chat/a/x"]);
    assert_eq!(paths(&channels(addr, "?prefix=/chat/a/x", &[("Authorization", &bearer)]).await), ["/chat/a/x"]);
    assert_eq!(
        paths(&channels(addr, "?prefix=/secret", &[("Authorization", &bearer)]).await),
        Vec::<String>::new(),
        "skipped, not refused"
    );
    // Paging within the grants.
    let page = channels(addr, "?limit=2", &[("Authorization", &bearer)]).await;
    assert_eq!((paths(&page), page["next"].clone()), (vec!["/chat/a".to_string(), "/chat/a/x".into()], json!("/chat/a/x")));
    let page = channels(addr, "?limit=2&after=/chat/a/x", &[("Authorization", &bearer)]).await;
    assert_eq!(paths(&page), ["/chatter", "/public"]);
    // A bad token or key is 401, as for the log.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "eve", "exp": now() + 60, "read": ["/"]}),
        &EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    for auth in [format!("Bearer {forged}"), "Bearer wrong-key".to_string(), "Basic abc".into()] {
        let r = http_get(addr, "/channels", &[("Authorization", &auth)]).await;
        assert_eq!(r.status, 401, "{auth}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    // CORS like the log.
    let r = http_get(addr, "/channels", &[("Origin", "https://app.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_disconnect_closes_every_connection_of_a_sub_with_4004() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    let (ada, bob) = (token("ada", &["/"], None), token("bob", &["/"], None));
    let mut a1 = connect(&server, &ada).await;
    let mut a2 = connect(&server, &ada).await;
    let mut b = connect(&server, &bob).await;
    a1.subscribe("/x").await;
    b.subscribe("/x").await;
    let r = admin(addr, "disconnect", Some(KEY), r#"{"sub":"ada"}"#).await;
    assert_eq!(json_of(&r), json!({"disconnected": 2}));
    for c in [&mut a1, &mut a2] {
        assert_eq!(closed(c).await, (4004, "disconnected by an administrator".to_string()));
    }
    // Bob is untouched, and ada may come back (disconnect is not a ban).
    b.publish("/y", "still here").await;
    let mut a3 = connect(&server, &ada).await;
    a3.publish("/z", "back").await;
    assert_eq!(json_of(&admin(addr, "disconnect", Some(KEY), r#"{"sub":"nobody"}"#).await), json!({"disconnected": 0}));
    // Refusals: no key, a wrong one, bad bodies.
    let r = admin(addr, "disconnect", None, r#"{"sub":"bob"}"#).await;
    assert_eq!((r.status, r.header("www-authenticate")), (401, Some("Bearer")));
    assert_eq!(r.text(), "the admin endpoints need a server API key: Authorization: Bearer KEY\n");
    assert_eq!(admin(addr, "disconnect", Some("wrong"), r#"{"sub":"bob"}"#).await.status, 401);
    assert_eq!(admin(addr, "disconnect", Some(&bob), r#"{"sub":"bob"}"#).await.status, 401, "a token is not an API key");
    for (body, reason) in [
        ("not json", "invalid body: "),
        (r#"{"sub":""}"#, "invalid body: sub must have 1 to 256 bytes"),
        (r#"{"user":"bob"}"#, "invalid body: unknown field `user`"),
        (r#"{}"#, "invalid body: missing field `sub`"),
        (r#"{"sub":7}"#, "invalid body: invalid type"),
    ] {
        let r = admin(addr, "disconnect", Some(KEY), body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().starts_with(reason), "{body}: {}", r.text());
    }
    let big = format!(r#"{{"sub":"{}"}}"#, "x".repeat(20_000));
    assert_eq!(admin(addr, "disconnect", Some(KEY), &big).await.status, 413);
    b.publish("/y", "still here").await;
    metric_shows(addr, "ivy_admin_disconnects_total 2").await;
    metric_shows(addr, "ivy_connections_closed_total{code=\"4004\"} 2").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_key_the_admin_endpoints_answer_403() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    for what in ["disconnect", "revoke"] {
        let r = admin(server.addr, what, Some("anything"), r#"{"sub":"a"}"#).await;
        assert_eq!((r.status, r.text().as_str()), (403, "admin needs a server API key (--api-key), and none is configured\n"));
    }
    assert_eq!(http_get(server.addr, "/admin/revocations", &[]).await.status, 403);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_everywhere_and_its_connections_are_closed() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    let revoked = token("ada", &["/"], Some("jti-1"));
    let other = token("ada", &["/"], Some("jti-2"));
    let mut live = connect(&server, &revoked).await;
    live.subscribe("/x").await;
    let mut kept = connect(&server, &other).await;
    kept.subscribe("/x").await;
    // A connection that moved to the revoked token in-band is found by it too.
    let mut moved = connect(&server, &other).await;
    assert!(moved.request(&format!("#r#&{revoked}")).await.starts_with("#r#@"));
    let r = admin(addr, "revoke", Some(KEY), r#"{"jti":"jti-1"}"#).await;
    let v = json_of(&r);
    assert_eq!((v["revoked"].clone(), v["disconnected"].clone()), (json!("jti-1"), json!(2)), "{v}");
    let until = v["until"].as_u64().unwrap();
    assert!(until.abs_diff(now() + 86_400) <= 5, "a day by default: {until}");
    for c in [&mut live, &mut moved] {
        assert_eq!(closed(c).await, (4003, "token revoked: reconnect with a fresh token".to_string()));
    }
    kept.publish("/x", "still here").await;
    // The handshake, the log, /channels, HTTP publish and an in-band refresh refuse it.
    let r = raw_ws_open_at(addr, &format!("/ws?token={revoked}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    let bearer = format!("Bearer {revoked}");
    for target in ["/log/x", "/channels"] {
        let r = http_get(addr, target, &[("Authorization", &bearer)]).await;
        assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"), "{target}");
    }
    let r = send(addr, "POST", "/log/x", &[("Authorization", &bearer)], b"no").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(kept.request(&format!("#r#&{revoked}")).await, "#r#!unauthorized token revoked");
    // The other token of the same sub still works.
    assert_eq!(http_get(addr, "/log/x", &[("Authorization", &format!("Bearer {other}"))]).await.status, 200);
    // Listed; an explicit until; refusals.
    let soon = now() + 600;
    let v = json_of(&admin(addr, "revoke", Some(KEY), &format!(r#"{{"jti":"jti-3","until":{soon}}}"#)).await);
    assert_eq!(v, json!({"revoked": "jti-3", "until": soon, "disconnected": 0}));
    let list = json_of(&http_get(addr, "/admin/revocations", &[("Authorization", &format!("Bearer {KEY}"))]).await);
    assert_eq!(list, json!({"revocations": [{"jti": "jti-1", "until": until}, {"jti": "jti-3", "until": soon}]}));
    assert_eq!(http_get(addr, "/admin/revocations", &[]).await.status, 401);
    for (body, reason) in [
        (format!(r#"{{"jti":"j","until":{}}}"#, now() - 10), "invalid body: until ("),
        (format!(r#"{{"jti":"j","until":{}}}"#, now() + 400 * 86_400), "invalid body: until is more than a year ahead"),
        (r#"{"jti":""}"#.to_string(), "invalid body: jti must have 1 to 1024 bytes"),
        (r#"{"jti":"j","unitl":5}"#.to_string(), "invalid body: unknown field `unitl`"),
        ("[]".to_string(), "invalid body: "),
    ] {
        let r = admin(addr, "revoke", Some(KEY), &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().starts_with(reason), "{body}: {}", r.text());
    }
    assert_eq!(admin(addr, "revoke", Some("wrong"), r#"{"jti":"x"}"#).await.status, 401);
    metric_shows(addr, "ivy_revoked_tokens 2").await;
    metric_shows(addr, "ivy_connections_closed_total{code=\"4003\"} 2").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_a_restart_until_they_expire() {
    let dir = temp_dir();
    let setup = || {
        let mut s = config(dir.path()).sled();
        s.config = s.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).api_keys(vec![KEY.into()]);
        s
    };
    let server = TestServer::start(setup()).await;
    let (long, short) = (token("ada", &["/"], Some("long")), token("ada", &["/"], Some("short")));
    json_of(&admin(server.addr, "revoke", Some(KEY), r#"{"jti":"long"}"#).await);
    let until = now() + 3;
    json_of(&admin(server.addr, "revoke", Some(KEY), &format!(r#"{{"jti":"short","until":{until}}}"#)).await);
    server.stop().await;
    let server = TestServer::start(setup()).await;
    let open = |t: &str| format!("/ws?token={t}");
    let handshake =
        |t: String| async move { raw_ws_open_at(server.addr, &open(&t), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0 };
    let r = handshake(long.clone()).await;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"), "after the restart");
    assert_eq!(handshake(short.clone()).await.status, 401, "not expired yet");
    // Once `until` passed, the token is accepted again, and the revocation is not listed.
    while now() <= until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(handshake(short.clone()).await.status, 101);
    let list = json_of(&http_get(server.addr, "/admin/revocations", &[("Authorization", &format!("Bearer {KEY}"))]).await);
    assert_eq!(list["revocations"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["revocations"][0]["jti"], "long");
    server.stop().await;
}

/// The CLI: `ivy channels` pages through everything (plain and `--json`), with a token's
/// grants; `ivy admin disconnect` and `ivy admin revoke` with `--api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ivy_channels_and_ivy_admin() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    let items: Vec<Value> = (0..250).map(|i| json!({"path": format!("/chat/r{i:03}"), "data": "x"})).collect();
    let r = send(addr, "POST", "/publish", &[("Authorization", &format!("Bearer {KEY}"))], json!(items).to_string().as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = format!("ws://{addr}");
    let ivy = |args: &[&str]| {
        let out = std::process::Command::new(ivy_bin()).arg("--url").arg(&url).args(args).output().unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let t = token("ada", &["/chat"], Some("cli-jti"));
    // Pages of 100 (the default), all printed: `PATH SUBSCRIBERS NEWEST`.
    let (code, out, err) = ivy(&["--token", &t, "channels", "--prefix", "/chat"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 251, "{out}");
    assert!(lines[0].starts_with("/chat 0 "), "{}", lines[0]);
    assert!(lines[250].starts_with("/chat/r249 0 "), "{}", lines[250]);
    let ts = lines[1].split(' ').nth(2).unwrap();
    assert!(ivy_client_core::Timestamp::parse(ts.as_bytes()).is_ok(), "{ts}");
    // --limit is the page size; --json one object a line.
    let (code, out, _) = ivy(&["--token", &t, "channels", "--prefix", "/chat", "--limit", "7", "--json"]);
    assert_eq!(code, Some(0));
    let objects: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 251);
    assert_eq!(objects[3]["path"], "/chat/r002");
    assert_eq!(objects[3]["subscribers"], 0);
    // Without a token: the anonymous grants (none here but /public): nothing.
    let (code, out, _) = ivy(&["channels"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    let (code, _, err) = ivy(&["channels", "--limit", "1001"]);
    assert_eq!(code, Some(2), "{err}");
    // Admin: revoke the CLI's token, which then is refused (exit 4); disconnect.
    let (code, out, err) = ivy(&["admin", "--api-key", KEY, "revoke", "cli-jti"]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["revoked"].clone(), v["disconnected"].clone()), (json!("cli-jti"), json!(0)));
    let (code, _, err) = ivy(&["--token", &t, "channels"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("token revoked"), "{err}");
    let mut c = connect(&server, &token("bob", &["/"], None)).await;
    let (code, out, err) = ivy(&["admin", "--api-key", KEY, "disconnect", "bob"]);
    assert_eq!((code, out.trim()), (Some(0), r#"{"disconnected":1}"#), "{err}");
    assert_eq!(closed(&mut c).await.0, 4004);
    let (code, _, err) = ivy(&["admin", "--api-key", "wrong", "disconnect", "bob"]);
    assert_eq!(code, Some(4), "{err}");
    let (code, out, err) = ivy(&["admin", "--api-key", KEY, "revocations"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cli-jti"), "{out}");
    server.stop().await;
}

/// The same from an embedding application: `Ivy::disconnect` and `Ivy::revoke`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_application_disconnects_and_revokes() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]);
    let ivy = std::sync::Arc::new(setup.builder().open().unwrap());
    let app = ivy.router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = ivy.stop_signal();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.unwrap();
    });
    let t = token("ada", &["/"], Some("emb-1"));
    let mut c = Client::connect(&format!("ws://{addr}/ws?token={t}")).await;
    c.subscribe("/x").await;
    assert_eq!(ivy.disconnect("ada"), 1);
    assert_eq!(closed(&mut c).await.0, 4004);
    let mut c = Client::connect(&format!("ws://{addr}/ws?token={t}")).await;
    c.subscribe("/x").await;
    assert_eq!(ivy.revoke("emb-1", now() + 60).await.unwrap(), 1);
    assert_eq!(closed(&mut c).await, (4003, "token revoked: reconnect with a fresh token".to_string()));
    let r = raw_ws_open_at(addr, &format!("/ws?token={t}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0;
    assert_eq!(r.status, 401);
    assert_eq!(ivy.revoke("emb-2", now() - 1).await.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    ivy.stop_signal().cancel();
    task.await.unwrap();
    ivy.shutdown().await;
}
