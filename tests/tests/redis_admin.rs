//! `GET /channels` and the admin endpoints (docs/PROTOCOL.md 9.14, 9.15) on two nodes of the
//! Redis engine sharing one real `redis-server` (started here on a free loopback port,
//! whatever `IVY_TEST_ENGINE` says): both nodes list the same channels, page by page; a
//! revocation or a disconnect made on one node is applied on the other (4003, 4004, the
//! token refused there at the handshake and on HTTP), also on a node that could not reach
//! Redis when it was made, and a node that opens later loads the revocations.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ivy_server::auth::Secret;
use ivy_server::engine::RedisEngine;
use ivy_tests::{Client, Config, FaultProxy, Got, HttpResponse, RedisServer, WAIT, http_get, http_send, raw_ws_open_at, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "redis-admin-secret";
const KEY: &str = "the-admin-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token for `sub` that may read and write everything, valid for an hour, with `jti`.
fn token(sub: &str, jti: &str) -> String {
    let claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": ["/"], "write": ["/"], "jti": jti});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A node: an in-process server on 127.0.0.1 (port 0) on the Redis at `url`, auth on, with
/// the admin key.
struct Node {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Node {
    async fn start(url: String) -> Node {
        let config = Config::default().auth_hmac_secrets(vec![Secret::new(SECRET)]).api_keys(vec![KEY.into()]);
        let builder = ivy_server::Ivy::builder(config).engine(RedisEngine::new(url));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ivy_server::run(builder, listener, async move {
            let _ = rx.await;
        }));
        Node { addr, stop: Some(tx), task }
    }

    async fn on(redis: &RedisServer) -> Node {
        Node::start(redis.url()).await
    }

    fn ws(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("shutdown in time").expect("join").expect("run");
    }
}

fn bearer() -> String {
    format!("Bearer {KEY}")
}

async fn admin(addr: SocketAddr, what: &str, body: &str) -> HttpResponse {
    let auth = bearer();
    http_send(addr, "POST", &format!("/admin/{what}"), &[("Content-Type", "application/json"), ("Authorization", &auth)], body.as_bytes())
        .await
}

fn json_of(r: &HttpResponse) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// `GET /channels{query}` with the admin key (every channel): its JSON.
async fn channels(addr: SocketAddr, query: &str) -> Value {
    let auth = bearer();
    json_of(&http_get(addr, &format!("/channels{query}"), &[("Authorization", &auth)]).await)
}

/// Polls `GET /channels{query}` on `addr` until it answers `expected` (a node lists what its
/// reader delivered: the other node's sends arrive within moments), at most [`WAIT`].
async fn lists(addr: SocketAddr, query: &str, expected: &Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = channels(addr, query).await;
        if &got == expected {
            return;
        }
        assert!(Instant::now() < deadline, "GET /channels{query} on {addr}: {got}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the close frame of `c`.
async fn closed(c: &mut Client) -> (u16, String) {
    loop {
        match c.next_within(WAIT).await {
            Got::Close(code, reason) => return (code, reason),
            Got::Line(_) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn row(path: &str, newest: &str) -> Value {
    json!({"path": path, "subscribers": 0, "newest": newest})
}

fn page(rows: Vec<Value>, next: Option<&str>) -> Value {
    json!({"channels": rows, "next": next})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_list_the_same_channels_page_by_page() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let (a, b) = (Node::on(&redis).await, Node::on(&redis).await);
    for n in [&a, &b] {
        assert_eq!(channels(n.addr, "").await, page(vec![], None));
    }
    let t = token("ada", "j");
    let (mut ca, mut cb) = (Client::connect(&a.ws(&t)).await, Client::connect(&b.ws(&t)).await);
    let t1 = ca.publish("/chat/room1", "a1").await;
    let t2 = cb.publish("/chat/room2/x", "b1").await;
    let t3 = ca.publish("/chat-x", "a2").await;
    let t4 = cb.publish("/news", "b2").await;
    let t5 = ca.publish("/chat/room1", "a3").await;
    assert!(t1 < t2 && t2 < t3 && t3 < t4 && t4 < t5, "one order across the nodes");
    let all = page(
        vec![
            row("/", &t5),
            row("/chat", &t5),
            row("/chat-x", &t3),
            row("/chat/room1", &t5),
            row("/chat/room2", &t2),
            row("/chat/room2/x", &t2),
            row("/news", &t4),
        ],
        None,
    );
    for n in [&a, &b] {
        lists(n.addr, "", &all).await;
        // Pages and their cursors, a prefix (not /chat-x), a cursor within a prefix.
        lists(n.addr, "?limit=2", &page(vec![row("/", &t5), row("/chat", &t5)], Some("/chat"))).await;
        lists(n.addr, "?limit=2&after=/chat", &page(vec![row("/chat-x", &t3), row("/chat/room1", &t5)], Some("/chat/room1"))).await;
        lists(
            n.addr,
            "?limit=3&after=/chat/room1",
            &page(vec![row("/chat/room2", &t2), row("/chat/room2/x", &t2), row("/news", &t4)], None),
        )
        .await;
        let chat = page(vec![row("/chat", &t5), row("/chat/room1", &t5), row("/chat/room2", &t2), row("/chat/room2/x", &t2)], None);
        lists(n.addr, "?prefix=/chat", &chat).await;
        lists(n.addr, "?prefix=/chat&after=/chat/room1&limit=1", &page(vec![row("/chat/room2", &t2)], Some("/chat/room2"))).await;
        lists(n.addr, "?prefix=/chat/room2", &page(vec![row("/chat/room2", &t2), row("/chat/room2/x", &t2)], None)).await;
        lists(n.addr, "?prefix=/nothing", &page(vec![], None)).await;
    }
    // A channel whose history is deleted (its subtree's: both logs now empty) is not listed,
    // and a page fills on past such channels.
    let auth = bearer();
    let r = http_send(a.addr, "DELETE", "/log/chat/room2", &[("Authorization", &auth)], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after_delete = page(vec![row("/", &t5), row("/chat", &t5), row("/chat-x", &t3), row("/chat/room1", &t5), row("/news", &t4)], None);
    for n in [&a, &b] {
        lists(n.addr, "", &after_delete).await;
        lists(n.addr, "?after=/chat/room1&limit=1", &page(vec![row("/news", &t4)], None)).await;
        lists(n.addr, "?prefix=/chat/room2", &page(vec![], None)).await;
    }
    // Listed empty, they left the index of channels; a send brings them back.
    assert_eq!(redis.command(&["ZSCORE", "{ivy}:paths", "/chat/room2/x"]), "$-1", "emptied channels leave the index");
    assert_eq!(redis.command(&["ZSCORE", "{ivy}:paths", "/chat/room1"]), "$1", "the others stay");
    let t6 = cb.publish("/chat/room2/x", "again").await;
    for n in [&a, &b] {
        lists(n.addr, "?prefix=/chat/room2", &page(vec![row("/chat/room2", &t6), row("/chat/room2/x", &t6)], None)).await;
    }
    // The subscribers column is each node's own.
    cb.subscribe("/news").await;
    lists(b.addr, "?prefix=/news", &json!({"channels": [{"path": "/news", "subscribers": 1, "newest": t4}], "next": null})).await;
    lists(a.addr, "?prefix=/news", &page(vec![row("/news", &t4)], None)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_closes_and_refuses_the_token_on_the_other_and_on_nodes_opened_later() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let (a, b) = (Node::on(&redis).await, Node::on(&redis).await);
    let (revoked, other) = (token("ada", "jti-1"), token("ada", "jti-2"));
    let mut live = Client::connect(&b.ws(&revoked)).await;
    live.subscribe("/x").await;
    let mut kept = Client::connect(&b.ws(&other)).await;
    kept.subscribe("/x").await;
    let v = json_of(&admin(a.addr, "revoke", r#"{"jti":"jti-1"}"#).await);
    // "disconnected" counts the connections of the node that was asked.
    assert_eq!((v["revoked"].clone(), v["disconnected"].clone()), (json!("jti-1"), json!(0)), "{v}");
    let until = v["until"].as_u64().unwrap();
    assert_eq!(closed(&mut live).await, (4003, "token revoked: reconnect with a fresh token".to_string()));
    // Node B refuses it at the handshake, on HTTP and at an in-band refresh.
    let r = raw_ws_open_at(b.addr, &format!("/ws?token={revoked}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    let auth = format!("Bearer {revoked}");
    let r = http_get(b.addr, "/log/x", &[("Authorization", &auth)]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    assert_eq!(kept.request(&format!("#r#&{revoked}")).await, "#r#!unauthorized token revoked");
    kept.publish("/x", "still here").await;
    let listed = json!({"revocations": [{"jti": "jti-1", "until": until}]});
    assert_eq!(json_of(&http_get(b.addr, "/admin/revocations", &[("Authorization", &bearer())]).await), listed);
    // A node opened afterwards loads it; so does a node restarted.
    b.stop().await;
    let c = Node::on(&redis).await;
    let r = raw_ws_open_at(c.addr, &format!("/ws?token={revoked}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    assert_eq!(json_of(&http_get(c.addr, "/admin/revocations", &[("Authorization", &bearer())]).await), listed);
    // And a revocation made on the new node reaches the old one.
    let mut on_a = Client::connect(&a.ws(&other)).await;
    on_a.subscribe("/x").await;
    assert_eq!(json_of(&admin(c.addr, "revoke", r#"{"jti":"jti-2"}"#).await)["disconnected"], json!(0));
    assert_eq!(closed(&mut on_a).await.0, 4003);
    let r = http_get(a.addr, "/log/x", &[("Authorization", &format!("Bearer {other}"))]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    // In Redis: the hash of revocations.
    assert_eq!(redis.command(&["HEXISTS", "{ivy}:revoked", "jti-1"]), ":1");
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_disconnect_on_one_node_closes_the_subs_connections_on_every_node() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let (a, b) = (Node::on(&redis).await, Node::on(&redis).await);
    let (ada, bob) = (token("ada", "a"), token("bob", "b"));
    let mut on_a = Client::connect(&a.ws(&ada)).await;
    let mut on_b1 = Client::connect(&b.ws(&ada)).await;
    let mut on_b2 = Client::connect(&b.ws(&ada)).await;
    let mut bob_b = Client::connect(&b.ws(&bob)).await;
    on_b1.subscribe("/x").await;
    bob_b.subscribe("/x").await;
    // The answer counts this node's connections; the other node closes its own.
    assert_eq!(json_of(&admin(a.addr, "disconnect", r#"{"sub":"ada"}"#).await), json!({"disconnected": 1}));
    for c in [&mut on_a, &mut on_b1, &mut on_b2] {
        assert_eq!(closed(c).await, (4004, "disconnected by an administrator".to_string()));
    }
    bob_b.publish("/y", "still here").await;
    // A disconnect is no ban: ada comes back on B.
    let mut back = Client::connect(&b.ws(&ada)).await;
    back.publish("/z", "back").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_applies_what_was_made_meanwhile_once_back() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let a = Node::on(&redis).await;
    let b = Node::start(format!("redis://{}", proxy.addr)).await;
    let mut revoked = Client::connect(&b.ws(&token("ada", "jti-gone"))).await;
    revoked.subscribe("/x").await;
    let mut bob = Client::connect(&b.ws(&token("bob", "jti-bob"))).await;
    bob.subscribe("/x").await;
    assert_eq!(b.readyz().await, 200);
    // B loses Redis: its connections are cut and new ones find nothing.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    proxy.set_upstream(dead);
    proxy.cut_all();
    let deadline = Instant::now() + WAIT;
    while b.readyz().await != 503 {
        assert!(Instant::now() < deadline, "node B still ready without Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile, on A: a revocation whose command the stream then drops (only the hash of
    // revocations has it), and a disconnect (recent: applied once B is back).
    assert_eq!(json_of(&admin(a.addr, "revoke", r#"{"jti":"jti-gone"}"#).await)["revoked"], json!("jti-gone"));
    assert_eq!(json_of(&admin(a.addr, "disconnect", r#"{"sub":"bob"}"#).await), json!({"disconnected": 0}));
    assert_eq!(redis.command(&["XLEN", "{ivy}:control"]), ":2");
    redis.command(&["XTRIM", "{ivy}:control", "MAXLEN", "1"]);
    // Nothing reached B yet.
    revoked.expect_silence(Duration::from_millis(300)).await;
    proxy.set_upstream(upstream);
    assert_eq!(closed(&mut revoked).await.0, 4003, "the revocation, from the hash read again");
    assert_eq!(closed(&mut bob).await.0, 4004, "the disconnect, from the stream");
    let r = http_get(b.addr, "/log/x", &[("Authorization", &format!("Bearer {}", token("ada", "jti-gone")))]).await;
    assert_eq!((r.status, r.text().as_str()), (401, "token revoked\n"));
    a.stop().await;
    b.stop().await;
}

impl Node {
    async fn readyz(&self) -> u16 {
        http_get(self.addr, "/readyz", &[]).await.status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_older_than_30_s_is_not_applied_by_a_node_that_was_cut_off() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let a = Node::on(&redis).await;
    let b = Node::start(format!("redis://{}", proxy.addr)).await;
    let mut bob = Client::connect(&b.ws(&token("bob", "jti-bob"))).await;
    bob.subscribe("/x").await;
    let mut carol = Client::connect(&b.ws(&token("carol", "jti-carol"))).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    proxy.set_upstream(dead);
    proxy.cut_all();
    let deadline = Instant::now() + WAIT;
    while b.readyz().await != 503 {
        assert!(Instant::now() < deadline, "node B still ready without Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A disconnect of bob made a minute ago (by Redis's clock: its stream ID), which B missed.
    let old = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() - 60_000;
    redis.command(&["XADD", "{ivy}:control", &format!("{old}-0"), "k", "disconnect", "s", "bob", "o", "elsewhere"]);
    proxy.set_upstream(upstream);
    while b.readyz().await != 200 {
        assert!(Instant::now() < deadline, "node B not ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A fresh one after it in the stream: once B applied it, it has passed the old one.
    assert_eq!(json_of(&admin(a.addr, "disconnect", r#"{"sub":"carol"}"#).await), json!({"disconnected": 0}));
    assert_eq!(closed(&mut carol).await.0, 4004);
    // Bob's connection is open: its sends are answered (the first ones may meet the writer's
    // connection still broken by the cut), until one is acked.
    for i in 1.. {
        let reply = bob.request(&format!("#{i}#:/y:still here")).await;
        if reply.starts_with(&format!("#{i}#@")) {
            break;
        }
        assert!(reply.starts_with(&format!("#{i}#!storage ")), "{reply}");
        assert!(Instant::now() < deadline, "no send acked after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
}
