//! The Redis engine against a real `redis-server` that the tests start on a free loopback port
//! with its own directory (`--appendonly yes --appendfsync always`), whatever
//! `IVY_TEST_ENGINE` says: a SIGKILL of Redis and a restart on its append-only file lose no
//! acked event and timestamps keep increasing; while Redis is down sends fail at once with a
//! clear `storage` error and `/readyz` is not ready, and everything resumes once it is back;
//! two nodes on one Redis share one log and one order.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ivy_tests::{
    Client, Config, EngineKind, FaultProxy, Got, RedisServer, ServerProcess, Setup, TestServer, WAIT, http_get, log_text, server_bin,
    temp_dir,
};

/// The line of a send refused while Redis is unreachable.
const UNREACHABLE: &str = "storage event not stored: the event store (Redis) is unreachable";
/// The line of a send whose write lost its connection.
const CUT: &str =
    "storage event not stored: the connection to the event store (Redis) was lost during the write; the event may still be in the log";

/// A server setup on `redis` (a node's data directory is never used).
fn on(redis: &Arc<RedisServer>, dir: &Path) -> Setup {
    Setup {
        config: Config::default(),
        data: dir.to_path_buf(),
        engine: EngineKind::Redis,
        retention: Default::default(),
        wall: None,
        redis: Some(redis.clone()),
    }
}

/// Polls `/readyz` until it answers `status` (at most [`WAIT`]); its body.
async fn wait_ready(addr: std::net::SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(addr, "/readyz", &[]).await;
        if r.status == status {
            return r.text();
        }
        assert!(Instant::now() < deadline, "/readyz still answers {} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST target` with `body`: the status and the response body.
async fn post(addr: std::net::SocketAddr, target: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("POST {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut raw)).await.expect("response in time").unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, raw.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

fn ts_of(line: &str) -> &str {
    line[1..].split(':').next().unwrap()
}

/// `n` sends from each of `conns` concurrent connections; their lines as acked, by timestamp.
async fn send_concurrently(url: &str, conns: usize, n: usize, tag: &str) -> Vec<String> {
    let tasks: Vec<_> = (0..conns)
        .map(|k| {
            let (url, tag) = (url.to_string(), tag.to_string());
            tokio::spawn(async move {
                let mut c = Client::connect(&url).await;
                let mut lines = Vec::new();
                for i in 0..n {
                    let (path, data) = (format!("/k{k}/x"), format!("{tag}{k}-{i}"));
                    let ts = c.publish(&path, &data).await;
                    lines.push(format!("@{ts}:{path}:{data}"));
                }
                lines
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

/// Sends until one is acked (Redis coming back), at most [`WAIT`]; the acked line. Every
/// refusal meanwhile must be one of the two Redis errors.
async fn send_until_acked(c: &mut Client, path: &str, data: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    loop {
        i += 1;
        let reply = c.request(&format!("#{i}#:{path}:{data}")).await;
        if let Some(ts) = reply.strip_prefix(&format!("#{i}#@")) {
            return format!("@{ts}:{path}:{data}");
        }
        let error = reply.strip_prefix(&format!("#{i}#!")).unwrap_or_else(|| panic!("not a reply: {reply}"));
        assert!(error == UNREACHABLE || error == CUT, "{error}");
        assert!(Instant::now() < deadline, "no send was acked within {WAIT:?} of Redis coming back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subscriber's lines until it has `n` (each within [`WAIT`]).
async fn lines(c: &mut Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match c.next_within(WAIT).await {
            Got::Line(l) => got.push(l),
            other => panic!("after {} lines: {other:?}", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_of_redis_and_a_restart_on_its_aof_lose_no_acked_event() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let server = TestServer::start(on(&redis, dir.path())).await;
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.subscribe("/").await;
    let before = send_concurrently(&server.ws_url(), 4, 25, "a").await;
    assert_eq!(lines(&mut sub, before.len()).await, before, "the subscriber got every acked event in order");

    // SIGKILL: Redis writes nothing more. Restarted on the same port and directory, it
    // reloads its append-only file (fsynced at every write before the script's reply).
    redis.kill();
    redis.restart();
    let mut c = Client::connect(&server.ws_url()).await;
    let first_after = send_until_acked(&mut c, "/after", "first").await;
    let after = send_concurrently(&server.ws_url(), 2, 10, "b").await;

    let log = log_text(server.addr, "/log/").await;
    let logged: Vec<&str> = log.lines().collect();
    for line in &before {
        assert!(logged.contains(&line.as_str()), "acked before the kill and lost: {line}");
    }
    for line in after.iter().chain([&first_after]) {
        assert!(logged.contains(&line.as_str()), "acked after the restart and not in the log: {line}");
    }
    assert!(logged.windows(2).all(|w| ts_of(w[0]) < ts_of(w[1])), "timestamps increase: {log}");
    assert!(ts_of(&first_after) > ts_of(before.last().unwrap()), "after the restart timestamps keep increasing");
    // The subscriber stayed subscribed (nothing was lost: no continuity signal) and got every
    // event the log holds after the kill, in order.
    let rest: Vec<String> = logged[before.len()..].iter().map(|l| l.to_string()).collect();
    assert_eq!(lines(&mut sub, rest.len()).await, rest);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_sends_fail_at_once_and_everything_resumes_when_it_is_back() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let server = TestServer::start(on(&redis, dir.path())).await;
    let mut sub = Client::connect(&server.ws_url()).await;
    let position = sub.subscribe("/chat").await;
    let mut c = Client::connect(&server.ws_url()).await;
    let one = format!("@{}:/chat:one", c.publish("/chat", "one").await);
    assert!(ts_of(&one) > position.as_str());
    assert_eq!(sub.recv().await, one);
    assert_eq!(http_get(server.addr, "/readyz", &[]).await.status, 200);

    redis.kill();
    // The first send may find the connection cut during its write; from then on every send
    // is refused at once, with the reason.
    let started = Instant::now();
    let mut unreachable = 0;
    for i in 0..20 {
        let reply = c.request(&format!("#{i}#:/chat:down")).await;
        let error = reply.strip_prefix(&format!("#{i}#!")).unwrap_or_else(|| panic!("acked while Redis is down: {reply}"));
        assert!(error == UNREACHABLE || error == CUT, "{error}");
        unreachable += usize::from(error == UNREACHABLE);
    }
    assert!(unreachable >= 19, "refused at once as unreachable: {unreachable} of 20");
    assert!(started.elapsed() < Duration::from_secs(5), "refusals take no timeout: {:?}", started.elapsed());
    // HTTP publish says so too, with 503.
    let (status, body) = post(server.addr, "/log/chat", "down").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the event store (Redis) is unreachable"), "{body}");
    // Not ready (once the last probe's answer, at most a second old, is out of date).
    let ready = wait_ready(server.addr, 503).await;
    assert!(ready.contains("the event store (Redis) is unreachable"), "{ready}");
    // A subscribe now cannot learn whether this node is behind what another node delivered:
    // it is not answered with a position that may be behind, the connection is closed with
    // 1013 (try again later), and the client reconnects.
    let mut late = Client::connect(&server.ws_url()).await;
    late.send("#s#+/chat").await;
    match late.next_within(Duration::from_secs(10)).await {
        Got::Close(code, reason) => {
            assert_eq!(code, 1013, "{reason}");
            assert!(reason.contains("try again later"), "{reason}");
        }
        other => panic!("a subscribe while Redis is down: {other:?}"),
    }

    redis.restart();
    let two = send_until_acked(&mut c, "/chat", "two").await;
    wait_ready(server.addr, 200).await;
    // The subscriber is still subscribed, and gets what the log holds after `one`: `two`, and
    // whichever refused sends may have been stored (none is: Redis was down).
    assert_eq!(sub.recv().await, two);
    assert_eq!(log_text(server.addr, "/log/chat").await, format!("{one}\n{two}"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_share_one_log_and_one_order() {
    let dir = temp_dir();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = TestServer::start(on(&redis, &a_dir)).await;
    let b = TestServer::start(on(&redis, &b_dir)).await;
    let mut sub_b = Client::connect(&b.ws_url()).await;
    let p = sub_b.subscribe("/chat").await;
    let mut on_a = Client::connect(&a.ws_url()).await;
    let mut on_b = Client::connect(&b.ws_url()).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(format!("@{}:/chat:a{i}", on_a.publish("/chat", &format!("a{i}")).await));
        sent.push(format!("@{}:/chat:b{i}", on_b.publish("/chat", &format!("b{i}")).await));
    }
    assert!(sent.windows(2).all(|w| ts_of(&w[0]) < ts_of(&w[1])), "one order over both nodes: {sent:?}");
    assert!(ts_of(&sent[0]) > p.as_str());
    // A subscriber on B gets A's events and B's others' (its own connection sent none).
    assert_eq!(lines(&mut sub_b, sent.len()).await, sent);
    // The same log, byte for byte, with the same ETag, on both nodes.
    let (la, lb) = (http_get(a.addr, "/log/chat", &[]).await, http_get(b.addr, "/log/chat", &[]).await);
    assert_eq!(la.text(), sent.join("\n"));
    assert_eq!(la.text(), lb.text());
    assert_eq!(la.header("etag"), lb.header("etag"));
    // A client that saw up to the 4th event on A resumes on B with no gap and no duplicate.
    let last_seen = ts_of(&sent[3]).to_string();
    let mut moved = Client::connect(&b.ws_url()).await;
    let pos = moved.subscribe("/chat").await;
    let missed = log_text(b.addr, &format!("/log/chat?after={last_seen}")).await;
    assert_eq!(missed, sent[4..].join("\n"));
    assert!(pos.as_str() >= ts_of(sent.last().unwrap()));
    a.stop().await;
    b.stop().await;
}

/// Redis lost what the node had delivered (here: FLUSHALL, as a restart without persistence
/// would): the next event's number does not follow, so the node's subscribers are closed with
/// 4005 (continuity lost) instead of going on with a silent gap; timestamps keep increasing
/// past what the node delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_events_closes_the_subscribers_with_4005_and_timestamps_keep_increasing() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let server = TestServer::start(on(&redis, dir.path())).await;
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.subscribe("/").await;
    let mut c = Client::connect(&server.ws_url()).await;
    let before = c.publish("/a", "one").await;
    assert_eq!(sub.recv().await, format!("@{before}:/a:one"));
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK");
    let after = c.publish("/a", "two").await;
    assert!(after > before, "{after} after {before}");
    match sub.next_within(WAIT).await {
        Got::Close(code, reason) => {
            assert_eq!((code, reason.as_str()), (4005, "continuity lost: the event store lost events; resume from the log"))
        }
        other => panic!("expected the continuity-lost close, got {other:?}"),
    }
    // The log is what Redis holds now; a new subscriber goes on from there.
    assert_eq!(log_text(server.addr, "/log/").await, format!("@{after}:/a:two"));
    let mut again = Client::connect(&server.ws_url()).await;
    let p = again.subscribe("/").await;
    assert!(p >= after);
    let three = c.publish("/a", "three").await;
    assert_eq!(again.recv().await, format!("@{three}:/a:three"));
    server.stop().await;
}

/// A node that cannot reach Redis at startup refuses to start, saying so (its position in the
/// log would be unknown), with the URL's password hidden.
#[tokio::test]
async fn the_server_refuses_to_start_when_redis_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = tokio::process::Command::new(ivy_tests::server_bin())
        .args(["--listen", "127.0.0.1:0", "--redis", &format!("redis://:secret@127.0.0.1:{port}")])
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("ivy-server: cannot reach Redis at redis://:***@127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
    let bad = tokio::process::Command::new(ivy_tests::server_bin()).args(["--redis", "http://x"]).output().await.unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid Redis URL http://x"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// `rediss://`: the node talks TLS to Redis (rustls with the ring provider), trusting the
/// system's roots (`SSL_CERT_FILE` here names the test's CA) and checking Redis's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_talk_tls_to_redis() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let dir = temp_dir();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Ivy test Redis CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let (ca_file, cert_file, key_file) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .arg("--tls-key-file")
        .arg(&key_file)
        .arg("--tls-ca-cert-file")
        .arg(&ca_file)
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir.path())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server");
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "redis-server (TLS) did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("rediss://localhost:{port}");
    let ca_path = ca_file.to_str().unwrap();
    let server =
        ivy_tests::ServerProcess::start_bin(&ivy_tests::server_bin(), dir.path(), &["--redis", &url], &[("SSL_CERT_FILE", ca_path)]).await;
    let mut sub = Client::connect(&server.ws_url()).await;
    sub.subscribe("/tls").await;
    let mut c = Client::connect(&server.ws_url()).await;
    let ts = c.publish("/tls", "over tls").await;
    assert_eq!(sub.recv().await, format!("@{ts}:/tls:over tls"));
    assert_eq!(log_text(server.addr, "/log/tls").await, format!("@{ts}:/tls:over tls"));
    server.terminate().await;
    // Without the CA, the node refuses to start: Redis's certificate is not trusted.
    let out = tokio::process::Command::new(ivy_tests::server_bin())
        .args(["--listen", "127.0.0.1:0", "--redis", &url])
        .env("SSL_CERT_FILE", dir.path().join("none.pem"))
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach Redis at rediss://localhost"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = redis.kill().await;
}

/// Send ids (`docs/PROTOCOL.md` 5.9) on two nodes of one Redis: a repeat on node B of a send
/// made on node A (same sender, other path and data) stores nothing and gets the first's
/// timestamp, over the WebSocket (the same ack bytes) and over HTTP (`Idempotency-Key`: the
/// same `201` body, `Idempotent-Replayed: true`); the logs of both nodes are the same bytes,
/// each event once, and the repeats' markers in the root log show in no page, whatever its
/// limit. The native client, whose core gives every send an id, sends with ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_on_another_node_is_a_replay_and_the_logs_stay_identical() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = TestServer::start(on(&redis, &dir.path().join("a"))).await;
    let b = TestServer::start(on(&redis, &dir.path().join("b"))).await;
    let mut sub_b = Client::connect(&b.ws_url()).await;
    sub_b.subscribe("/ids").await;
    let mut on_a = Client::connect(&a.ws_url()).await;
    let mut on_b = Client::connect(&b.ws_url()).await;
    let reply = on_a.request("#1#*r.1:/ids:one").await;
    let first = reply.strip_prefix("#1#@").unwrap_or_else(|| panic!("{reply}")).to_string();
    assert_eq!(sub_b.recv().await, format!("@{first}:/ids:one"));
    // On B, the same sender (anonymous) and id, with other path and data: the first's ack.
    assert_eq!(on_b.request("#2#*r.1:/elsewhere:other").await, format!("#2#@{first}"));
    assert_eq!(on_a.request("#3#*r.1:/ids:again").await, format!("#3#@{first}"));
    // Pipelined on B: repeats and firsts mixed, acked in send order.
    for i in 0..6 {
        on_b.send(&format!("#p{i}#*r.{}:/ids:p{i}", 1 + i % 2)).await;
    }
    let mut second = None;
    for i in 0..6 {
        let line = on_b.recv().await;
        let ts = line.strip_prefix(&format!("#p{i}#@")).unwrap_or_else(|| panic!("send p{i}: {line}")).to_string();
        if i % 2 == 0 {
            assert_eq!(ts, first, "p{i} repeats r.1");
        } else {
            assert!(ts > first, "p{i}: r.2 is stored once, by p1");
            assert_eq!(*second.get_or_insert(ts.clone()), ts, "p{i} repeats r.2");
        }
    }
    let second = second.unwrap();
    assert_eq!(sub_b.recv().await, format!("@{second}:/ids:p1"));
    sub_b.expect_silence(Duration::from_millis(300)).await;

    // HTTP: the key on A, its repeat on B.
    let h = ivy_tests::http_send(a.addr, "POST", "/log/ids", &[("Idempotency-Key", "h.1")], b"by http").await;
    assert_eq!((h.status, h.header("idempotent-replayed")), (201, None), "{}", h.text());
    let again = ivy_tests::http_send(b.addr, "PUT", "/log/ids", &[("Idempotency-Key", "h.1")], b"other").await;
    assert_eq!((again.status, again.text(), again.header("idempotent-replayed")), (201, h.text(), Some("true")));
    let t_http = h.text().trim().to_string();
    assert_eq!(sub_b.recv().await, format!("@{t_http}:/ids:by http"));
    let items = ivy_tests::http_send(b.addr, "POST", "/publish", &[], br#"[{"path":"/ids","data":"x","id":"h.1"}]"#).await;
    let items: serde_json::Value = serde_json::from_slice(&items.body).unwrap_or_else(|e| panic!("{e}: {}", items.text()));
    assert_eq!(items, serde_json::json!([{"timestamp": t_http, "replayed": true}]), "an item's id on B");

    // The native client sends with ids: each send stored once.
    let native = ivy_client_native::Client::builder(b.ws_url()).connect().await.expect("connect");
    let n1 = native.send("/ids", "native 1").await.expect("send");
    let n2 = native.send("/ids", "native 2").await.expect("send");
    assert!(n1 < n2);
    native.close().await;

    let expected = [
        format!("@{first}:/ids:one"),
        format!("@{second}:/ids:p1"),
        format!("@{t_http}:/ids:by http"),
        format!("@{n1}:/ids:native 1"),
        format!("@{n2}:/ids:native 2"),
    ];
    for path in ["/log/ids", "/log/"] {
        let (la, lb) = (http_get(a.addr, path, &[]).await, http_get(b.addr, path, &[]).await);
        assert_eq!(la.text(), expected.join("\n"), "{path} on A: each event once, no marker");
        assert_eq!((la.text(), la.header("etag")), (lb.text(), lb.header("etag")), "{path}: the same on both nodes");
    }
    // Pages step over the markers between the events (a page of 2 holds 2 events).
    assert_eq!(log_text(b.addr, "/log/?limit=2").await, expected[..2].join("\n"));
    assert_eq!(log_text(b.addr, &format!("/log/?after={first}&limit=2")).await, expected[1..3].join("\n"));
    // Redis keeps the id with a TTL (the window), in the scope of the sender's wire form.
    let ttl = redis.command(&["PTTL", "{ivy}:id:- r.1"]);
    let ttl: i64 = ttl.strip_prefix(':').and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("PTTL: {ttl}"));
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
    a.stop().await;
    b.stop().await;
}

/// The ids are in Redis: a repeat after a SIGKILL of Redis and a restart on its append-only
/// file is still a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_a_sigkill_of_redis_and_a_restart_on_its_aof_is_still_a_replay() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let server = TestServer::start(on(&redis, dir.path())).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let reply = c.request("#1#*k.1:/kill:one").await;
    let first = reply.strip_prefix("#1#@").unwrap_or_else(|| panic!("{reply}")).to_string();
    redis.kill();
    redis.restart();
    // Until the node is back on Redis, a send fails (unreachable, or cut); then the repeat
    // gets the first's timestamp.
    let deadline = Instant::now() + WAIT;
    let mut i = 1;
    loop {
        i += 1;
        let reply = c.request(&format!("#{i}#*k.1:/kill:again")).await;
        if let Some(ts) = reply.strip_prefix(&format!("#{i}#@")) {
            assert_eq!(ts, first, "a replay after the restart");
            break;
        }
        let error = reply.strip_prefix(&format!("#{i}#!")).unwrap_or_else(|| panic!("not a reply: {reply}"));
        assert!(error == UNREACHABLE || error == CUT, "{error}");
        assert!(Instant::now() < deadline, "no reply within {WAIT:?} of Redis coming back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = send_until_acked(&mut c, "/kill", "two").await;
    assert_eq!(log_text(server.addr, "/log/kill").await, format!("@{first}:/kill:one\n{next}"));
    server.stop().await;
}

/// After the idempotency window (here 300 ms) Redis has forgotten the id (its key's TTL): the
/// same id is a new send. With a zero window ids are ignored: no key at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_an_id_is_stored_again_and_a_zero_window_keeps_no_ids() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let mut setup = on(&redis, &dir.path().join("a"));
    setup.config = setup.config.clone().idempotency_window(Duration::from_millis(300));
    let server = TestServer::start(setup).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let first = c.request("#1#*w:/w:one").await.strip_prefix("#1#@").expect("acked").to_string();
    assert_eq!(c.request("#2#*w:/w:one").await, format!("#2#@{first}"), "inside the window");
    let ttl = redis.command(&["PTTL", "{ivy}:id:- w"]);
    assert!(ttl.strip_prefix(':').and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| t > 0 && t <= 300), "{ttl}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = c.request("#3#*w:/w:one").await.strip_prefix("#3#@").expect("acked").to_string();
    assert!(again > first, "after the window: a new send");
    assert_eq!(log_text(server.addr, "/log/w").await, format!("@{first}:/w:one\n@{again}:/w:one"));
    server.stop().await;

    let mut setup = on(&redis, &dir.path().join("b"));
    setup.config = setup.config.clone().idempotency_window(Duration::ZERO);
    let server = TestServer::start(setup).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let one = c.request("#1#*z:/z:x").await.strip_prefix("#1#@").expect("acked").to_string();
    let two = c.request("#2#*z:/z:x").await.strip_prefix("#2#@").expect("acked").to_string();
    assert!(two > one);
    assert_eq!(redis.command(&["EXISTS", "{ivy}:id:- z"]), ":0");
    assert_eq!(log_text(server.addr, "/log/z").await.lines().count(), 2);
    server.stop().await;
}

/// A node whose link to Redis stalls (a congested network, an overloaded host) lags behind the
/// others. Its subscribers get every event, in order, once it catches up; a client that saw
/// events on an up-to-date node and moves to it is answered with a position at or past them
/// once it caught up (never one behind, which the client would report as lost history), and
/// when it cannot catch up within the bound (5 s) the connection is closed with 1013 (try
/// again later) instead. Afterwards it goes on as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lags_behind_redis_catches_up_in_order_and_never_answers_a_position_behind() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = TestServer::start(on(&redis, &dir.path().join("a"))).await;
    let link = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let b_url = format!("redis://{}", link.addr);
    let b = ServerProcess::start_bin(&server_bin(), &dir.path().join("b"), &["--redis", &b_url], &[]).await;
    let mut follower = Client::connect(&b.ws_url()).await;
    follower.subscribe("/chat").await;
    let mut on_a = Client::connect(&a.ws_url()).await;

    // A short stall: B lags, then catches up.
    link.stall(true);
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(format!("@{}:/chat:e{i}", on_a.publish("/chat", &format!("e{i}")).await));
    }
    follower.expect_silence(Duration::from_millis(300)).await;
    let mut moved = Client::connect(&b.ws_url()).await;
    moved.send("#m#+/chat").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    link.stall(false);
    let reply = moved.recv().await;
    let position = reply.strip_prefix("#m#@").unwrap_or_else(|| panic!("subscribe reply: {reply}"));
    assert!(position >= ts_of(sent.last().unwrap()), "position {position} is behind what A delivered: {sent:?}");
    assert_eq!(lines(&mut follower, sent.len()).await, sent, "the lagging node's subscriber gets everything, in order");

    // A stall longer than the bound: the subscribe is closed with 1013, nothing else changes.
    link.stall(true);
    let late = format!("@{}:/chat:late", on_a.publish("/chat", "late").await);
    let mut retry = Client::connect(&b.ws_url()).await;
    retry.send("#n#+/chat").await;
    match retry.next_within(Duration::from_secs(15)).await {
        Got::Close(code, reason) => assert_eq!(code, 1013, "{reason}"),
        other => panic!("a subscribe on a node stalled beyond the bound: {other:?}"),
    }
    link.stall(false);
    assert_eq!(follower.recv().await, late, "the follower stayed subscribed and gets what it missed");
    let mut again = Client::connect(&b.ws_url()).await;
    let position = again.subscribe("/chat").await;
    assert!(position.as_str() >= ts_of(&late), "{position}");
    assert_eq!(log_text(b.addr, "/log/chat").await, format!("{}\n{late}", sent.join("\n")));
    b.kill().await;
    a.stop().await;
}

/// What the node says at startup about Redis's persistence settings (issue 15, "Durability,
/// stated honestly"): what an ack means, with a warning when it is not durable, when Redis may
/// evict keys, and when nothing bounds the log in Redis's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_startup_the_node_states_what_an_ack_means_with_redis_settings() {
    use std::io::{BufRead, Read};
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    // The node's startup log (stderr), up to its "listening" line (stdout).
    let startup = |extra: &[&str]| {
        let mut child = std::process::Command::new(server_bin())
            .args(["--listen", "127.0.0.1:0", "--redis", &redis.url()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ivy-server");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let _ = child.kill();
        let mut log = String::new();
        child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
        let _ = child.wait();
        assert!(first.contains("listening"), "{first}{log}");
        log
    };
    const ENGINE_WARN: &str = "WARN ivy_server::engine::redis";
    let durable = startup(&["--retention-max-age", "7d"]);
    assert!(durable.contains("appendfsync always: an ack means the event is in Redis's append-only file, fsynced"), "{durable}");
    assert!(!durable.contains(ENGINE_WARN), "durable settings and a retention bound warn of nothing: {durable}");

    let unbounded = startup(&[]);
    assert!(unbounded.contains(ENGINE_WARN) && unbounded.contains("no retention bound"), "{unbounded}");

    redis.command(&["CONFIG", "SET", "appendfsync", "everysec"]);
    let everysec = startup(&["--retention-max-age", "7d"]);
    assert!(everysec.contains(ENGINE_WARN) && everysec.contains("but not appendfsync always"), "{everysec}");

    redis.command(&["CONFIG", "SET", "appendonly", "no"]);
    let volatile = startup(&["--retention-max-age", "7d"]);
    assert!(volatile.contains(ENGINE_WARN) && volatile.contains("acks are NOT durable"), "{volatile}");

    redis.command(&["CONFIG", "SET", "appendonly", "yes"]);
    redis.command(&["CONFIG", "SET", "appendfsync", "always"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1gb"]);
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let evicting = startup(&["--retention-max-age", "7d"]);
    assert!(evicting.contains(ENGINE_WARN) && evicting.contains("Redis evicts keys"), "{evicting}");
}
