//! HTTP publish (docs/PROTOCOL.md 9.12): `POST`/`PUT /log/<path>` and `POST /publish`, against
//! a real server on 127.0.0.1 over real HTTP, with real tokens minted here (HS256, as
//! tests/tests/auth.rs does), on the engine of `IVY_TEST_ENGINE`.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ivy_server::auth::Secret;
use ivy_tests::{Client, HttpResponse, TestServer, config, http_get, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "publish-secret";
const KEY: &str = "the-api-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(sub: &str, read: &[&str], write: &[&str]) -> String {
    let claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": read, "write": write});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// One HTTP/1.1 request with a body (`Connection: close`); the response.
use ivy_tests::http_send as send;

async fn post(addr: SocketAddr, target: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    send(addr, "POST", target, headers, body.as_bytes()).await
}

/// Auth on: a token secret, an API key, anonymous write of `/inbox`, anonymous read of `/`.
async fn auth_server(dir: &std::path::Path) -> TestServer {
    let mut setup = config(dir);
    setup.config = setup
        .config
        .clone()
        .auth_hmac_secrets(vec![Secret::new(SECRET)])
        .api_keys(vec![KEY.into()])
        .anonymous_read(vec!["/".into()])
        .anonymous_write(vec!["/inbox".into()]);
    TestServer::start(setup).await
}

/// The data as an event line carries it.
fn esc(data: &str) -> String {
    String::from_utf8(ivy_client_core::escape::escape(data.as_bytes()).into_owned()).unwrap()
}

fn is_timestamp(s: &str) -> bool {
    ivy_client_core::Timestamp::parse(s.as_bytes()).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_and_put_store_deliver_and_show_in_the_log() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    // An original ivy1 subscriber, no opt-ins: it gets the ordinary event lines.
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.subscribe("/chat").await;

    let l2 = esc("hello: world\nline two");
    let r = post(server.addr, "/log/chat/room", &[("Content-Type", "text/plain")], "hello: world\nline two").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let body = r.text();
    assert!(body.ends_with('\n') && body.lines().count() == 1, "{body:?}");
    let t1 = body.trim_end().to_string();
    assert!(is_timestamp(&t1), "{t1:?}");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let location = r.header("location").expect("Location").to_string();
    assert!(location.starts_with("/log/chat/room?after=") && location.ends_with("&limit=1"), "{location}");
    assert_eq!(sub.recv().await, format!("@{t1}:/chat/room:{l2}"));

    let r = send(server.addr, "PUT", "/log/chat", &[("Accept", "application/json")], "via put".as_bytes()).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let t2 = v["timestamp"].as_str().unwrap().to_string();
    assert!(is_timestamp(&t2) && t2 > t1, "{v}");
    assert_eq!(sub.recv().await, format!("@{t2}:/chat:via put"));

    let log = http_get(server.addr, "/log/chat", &[]).await;
    assert_eq!(log.status, 200);
    assert_eq!(log.text(), format!("@{t1}:/chat/room:{l2}\n@{t2}:/chat:via put"));
    // The Location names the page that holds exactly this event.
    let page = http_get(server.addr, &location, &[]).await;
    assert_eq!(page.text(), format!("@{t1}:/chat/room:{l2}"));
    // Auth off: anonymous sender.
    assert_eq!(http_get(server.addr, "/log/chat/room?ext=sender", &[]).await.text(), format!("@{t1}~-:/chat/room:{l2}"));
    // An empty body is an empty event, as `:/path:` is.
    let r = post(server.addr, "/log/chat", &[], "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(sub.recv().await, format!("@{}:/chat:", r.text().trim_end()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_paths_are_refused_with_a_reason() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().max_message_size(100);
    let server = TestServer::start(setup).await;
    let r = send(server.addr, "POST", "/log/a", &[], &[b'o', b'k', 0xff, 0xfe]).await;
    assert_eq!(r.status, 415);
    assert!(r.text().contains("UTF-8") && r.text().lines().count() == 1, "{}", r.text());
    // `:/a:` plus the data is the send command: 100 bytes at most, so 96 bytes of data.
    let r = post(server.addr, "/log/a", &[], &"x".repeat(96)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = post(server.addr, "/log/a", &[], &"x".repeat(97)).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("at most 96 bytes"), "{}", r.text());
    // The same limit as the WebSocket: the largest send frame it takes.
    let mut ws = Client::connect(&server.ws_url()).await;
    assert!(ws.request(&format!("#k#:/a:{}", "x".repeat(92))).await.starts_with("#k#@"), "100 bytes with the ack key");
    // Far larger than the limit: refused without reading it all.
    let r = send(server.addr, "POST", "/log/a", &[], &vec![b'x'; 4 << 20]).await;
    assert_eq!(r.status, 413);
    let r = post(server.addr, "/log/a/B%20c", &[], "x").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().starts_with("invalid path"), "{}", r.text());
    // Nothing but the two good events was stored.
    assert_eq!(http_get(server.addr, "/log/a", &[]).await.text().lines().count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_api_keys_and_anonymous_grants_decide_and_name_the_sender() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    let ada = token("ada", &["/"], &["/chat"]);
    let ada_auth = format!("Bearer {ada}");

    // No token, a path no anonymous grant covers: 401.
    let r = post(addr, "/log/chat", &[], "x").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(r.text().contains("no write grant covering /chat"), "{}", r.text());
    // An invalid token: 401.
    let r = post(addr, "/log/chat", &[("Authorization", "Bearer not.a.jwt")], "x").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text().lines().count(), 1);
    // A token signed with another secret: 401.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "eve", "exp": now() + 3600, "write": ["/"]}),
        &EncodingKey::from_secret(b"other"),
    )
    .unwrap();
    assert_eq!(post(addr, "/log/chat", &[("Authorization", &format!("Bearer {forged}"))], "x").await.status, 401);
    // A valid token whose grant is too small: 403.
    let r = post(addr, "/log/admin", &[("Authorization", &ada_auth)], "x").await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("the token of \"ada\" has no write grant covering /admin"), "{}", r.text());
    // Covered: stored as ada. `?token=` works too, as on /log.
    let r = post(addr, "/log/chat/room", &[("Authorization", &ada_auth)], "from ada").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t_ada = r.text().trim_end().to_string();
    let r = post(addr, &format!("/log/chat?token={ada}"), &[], "query token").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t_query = r.text().trim_end().to_string();
    // The API key: anything, as the application.
    let r = post(addr, "/log/admin", &[("Authorization", &format!("Bearer {KEY}"))], "from key").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t_key = r.text().trim_end().to_string();
    // A wrong key is neither a key nor a token: 401.
    let r = post(addr, "/log/admin", &[("Authorization", "Bearer wrong-key")], "x").await;
    assert_eq!(r.status, 401);
    assert!(r.text().starts_with("neither a server API key nor a valid token"), "{}", r.text());
    // Anonymous write grant.
    let r = post(addr, "/log/inbox/1", &[], "anon").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t_anon = r.text().trim_end().to_string();

    assert_eq!(
        http_get(addr, "/log/chat?ext=sender", &[]).await.text(),
        format!("@{t_ada}~=ada:/chat/room:from ada\n@{t_query}~=ada:/chat:query token")
    );
    assert_eq!(http_get(addr, "/log/admin?ext=sender", &[]).await.text(), format!("@{t_key}~*:/admin:from key"));
    assert_eq!(http_get(addr, "/log/inbox?ext=sender", &[]).await.text(), format!("@{t_anon}~-:/inbox/1:anon"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_anyone_publishes_and_a_configured_key_must_be_right() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().api_keys(vec![KEY.into()]);
    let server = TestServer::start(setup).await;
    let r = post(server.addr, "/log/x", &[], "anyone").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t1 = r.text().trim_end().to_string();
    let r = post(server.addr, "/log/x", &[("Authorization", &format!("Bearer {KEY}"))], "the app").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let t2 = r.text().trim_end().to_string();
    let r = post(server.addr, "/log/x", &[("Authorization", "Bearer wrong")], "x").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "invalid server API key\n");
    assert_eq!(http_get(server.addr, "/log/x?ext=sender", &[]).await.text(), format!("@{t1}~-:/x:anyone\n@{t2}~*:/x:the app"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stores_a_batch_with_one_result_per_item() {
    let dir = temp_dir();
    let server = auth_server(dir.path()).await;
    let addr = server.addr;
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.subscribe("/").await;
    let ada = format!("Bearer {}", token("ada", &["/"], &["/chat"]));
    let two = esc("two\nlines");
    let items = json!([
        {"path": "/chat/a", "data": "one"},
        {"path": "/admin", "data": "not allowed"},
        {"path": "chat/b/", "data": "two\nlines"},
        {"path": "/other", "data": "not allowed either"},
    ]);
    let r = post(addr, "/publish", &[("Authorization", &ada), ("Content-Type", "application/json")], &items.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let results = v.as_array().unwrap();
    assert_eq!(results.len(), 4);
    let t_a = results[0]["timestamp"].as_str().unwrap().to_string();
    assert_eq!(results[1]["error"]["code"], "forbidden");
    assert!(results[1]["error"]["message"].as_str().unwrap().contains("no write grant covering /admin"), "{v}");
    let t_b = results[2]["timestamp"].as_str().unwrap().to_string();
    assert_eq!(results[3]["error"]["code"], "forbidden");
    assert!(t_b > t_a);
    // Delivered like any other events, in order; the refused ones never were.
    assert_eq!(sub.recv().await, format!("@{t_a}:/chat/a:one"));
    assert_eq!(sub.recv().await, format!("@{t_b}:/chat/b:{two}"));
    assert_eq!(http_get(addr, "/log/?ext=sender", &[]).await.text(), format!("@{t_a}~=ada:/chat/a:one\n@{t_b}~=ada:/chat/b:{two}"));

    // The API key may write anywhere.
    let r = post(addr, "/publish", &[("Authorization", &format!("Bearer {KEY}"))], r#"[{"path":"/admin","data":"ok"}]"#).await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v[0]["timestamp"].is_string(), "{v}");
    // Anonymous: only the anonymous grant.
    let r = post(addr, "/publish", &[], r#"[{"path":"/inbox","data":"hi"},{"path":"/chat","data":"no"}]"#).await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v[0]["timestamp"].is_string() && v[1]["error"]["code"] == "forbidden", "{v}");
    // An empty batch is an empty answer.
    assert_eq!(post(addr, "/publish", &[], "[]").await.text(), "[]\n");

    // Whole-request refusals, nothing stored: bad JSON, a bad path, too many items, too large.
    let before = http_get(addr, "/log/", &[]).await.text();
    for (body, status, reason) in [
        ("{\"path\":\"/a\"}".to_string(), 400, "JSON array"),
        ("[{\"path\":\"/a\",\"data\":1}]".to_string(), 400, "JSON array"),
        ("not json".to_string(), 400, "JSON array"),
        (r#"[{"path":"/inbox","data":"x"},{"path":"/a b","data":"x"}]"#.to_string(), 400, "item 1: invalid path"),
        (json!(vec![json!({"path": "/inbox", "data": ""}); 1001]).to_string(), 413, "at most 1000 items"),
        (json!([{"path": "/inbox", "data": "x".repeat(70_000)}]).to_string(), 413, "item 0: the data of an event on /inbox is at most"),
    ] {
        let r = post(addr, "/publish", &[], &body).await;
        assert_eq!(r.status, status, "{}", r.text());
        assert!(r.text().contains(reason) && r.text().lines().count() == 1, "{}", r.text());
    }
    let r = post(addr, "/publish", &[], &format!("[{}]", "x".repeat(2 << 20))).await;
    assert_eq!(r.status, 413);
    let r = post(addr, "/publish", &[("Authorization", "Bearer wrong")], "[]").await;
    assert_eq!(r.status, 401);
    assert_eq!(http_get(addr, "/log/", &[]).await.text(), before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_may_publish_across_origins() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    for target in ["/log/chat", "/publish"] {
        let r = send(
            server.addr,
            "OPTIONS",
            target,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type, authorization"),
            ],
            b"",
        )
        .await;
        assert!(r.status == 204, "{target}: {}", r.status);
        let methods = r.header("access-control-allow-methods").unwrap();
        assert!(methods.contains("POST") && (target == "/publish" || methods.contains("PUT")), "{methods}");
        let headers = r.header("access-control-allow-headers").unwrap().to_ascii_lowercase();
        assert!(headers.contains("content-type") && headers.contains("authorization"), "{headers}");
    }
    let r = post(server.addr, "/log/chat", &[("Origin", "https://app.example")], "x").await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-expose-headers").unwrap().contains("Location"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_s_byte_budget_covers_its_http_publishes() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config =
        setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).byte_rate_per_identity(1).byte_burst_per_identity(1000);
    let server = TestServer::start(setup).await;
    let ada = token("ada", &["/"], &["/"]);
    // ada's connection holds her budget, which her HTTP publishes share.
    let mut ws = Client::connect(&format!("{}?token={ada}", server.ws_url())).await;
    // A reply: the connection's session (and its hold on the budget) exists.
    assert!(ws.request("#t#@").await.starts_with("#t#@"));
    let auth = format!("Bearer {ada}");
    let r = post(
        server.addr,
        "/publish",
        &[("Authorization", &auth)],
        &json!([{"path": "/a", "data": "x".repeat(2000)}, {"path": "/a", "data": "y"}]).to_string(),
    )
    .await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v[0]["timestamp"].is_string(), "{v}");
    assert_eq!(v[1]["error"]["code"], "rate-limited", "{v}");
    let r = post(server.addr, "/log/a", &[("Authorization", &auth)], "z").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().starts_with("too many bytes for this identity"), "{}", r.text());
    assert_eq!(http_get(server.addr, &format!("/log/a?token={ada}"), &[]).await.text().lines().count(), 1);
    server.stop().await;
}

/// A full store: `507` with the reason of `!store-full`, and a `store-full` item; the binary,
/// its flags, the sled engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_is_507_with_the_websocket_reason() {
    let dir = temp_dir();
    let server = ivy_tests::ServerProcess::start_sled(dir.path(), &["--min-free-space", "1000000000000000000"]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let ws = c.request("#r#:/full:x").await;
    let reason = ws.strip_prefix("#r#!store-full ").unwrap_or_else(|| panic!("{ws}")).to_string();
    let r = post(server.addr, "/log/full", &[], "x").await;
    assert_eq!(r.status, 507);
    assert_eq!(r.text(), format!("{reason}\n"));
    let r = post(server.addr, "/publish", &[], r#"[{"path":"/full","data":"x"}]"#).await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v[0]["error"]["code"], "store-full", "{v}");
    assert_eq!(v[0]["error"]["message"], reason.as_str());
    assert_eq!(http_get(server.addr, "/log/full", &[]).await.text(), "");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_takes_posts_too() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let r = post(server.addr, "/log/", &[], "to the root").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let ts = r.text().trim_end().to_string();
    assert_eq!(http_get(server.addr, "/log", &[]).await.text(), format!("@{ts}:/:to the root"));
    server.stop().await;
}

/// One group commit, seen from outside: a commit hands out consecutive nanoseconds from one
/// reading of the clock, and two commits cannot (the wall clock moves on between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_items_of_one_publish_share_one_group_commit() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let items: Vec<Value> = (0..1000).map(|i| json!({"path": format!("/batch/{}", i % 7), "data": i.to_string()})).collect();
    let r = post(server.addr, "/publish", &[], &Value::from(items).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let ts: Vec<ivy_client_core::Timestamp> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ivy_client_core::Timestamp::parse(r["timestamp"].as_str().unwrap().as_bytes()).unwrap())
        .collect();
    assert_eq!(ts.len(), 1000);
    for pair in ts.windows(2) {
        assert_eq!(pair[1], pair[0].next(), "consecutive: one commit");
    }
    let log = http_get(server.addr, "/log/batch", &[]).await.text();
    assert_eq!(log.lines().count(), 1000);
    assert!(log.lines().next().unwrap().ends_with(":/batch/0:0") && log.lines().last().unwrap().ends_with(":/batch/5:999"));
    server.stop().await;
}
