//! Idempotent sends (docs/PROTOCOL.md 5.9, 9.12): `[#key#]*ID:path:data` over real WebSockets,
//! `Idempotency-Key` and per-item ids over real HTTP, against real servers on 127.0.0.1 (in
//! process on the engine of `IVY_TEST_ENGINE`, or the `ivy-server` binary on sled, killed with
//! SIGKILL and restarted on the same data directory), with real tokens minted here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ivy_server::auth::Secret;
use ivy_tests::{Client, Got, HttpResponse, ServerProcess, TestServer, config, http_get, log_text, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn json_body(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

const SECRET: &str = "idempotency-secret";
const KEY: &str = "the-api-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": ["/"], "write": ["/"]});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// The timestamp of an ack line `#key#@ts` (panics on anything else).
fn acked(line: &str, key: &str) -> String {
    let prefix = format!("#{key}#@");
    line.strip_prefix(&prefix).unwrap_or_else(|| panic!("expected an ack of {key}, got {line:?}")).to_string()
}

/// The log's lines (`GET /log<path>`), without the empty last one.
async fn log_lines(addr: SocketAddr, path: &str) -> Vec<String> {
    log_text(addr, &format!("/log{path}")).await.lines().map(str::to_string).collect()
}

/// Waits (up to 5 s) until `/metrics` has each of `lines`.
async fn metrics_reach(addr: SocketAddr, lines: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http_get(addr, "/metrics", &[]).await.text();
        if lines.iter().all(|l| metrics.lines().any(|m| m == *l)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{lines:?} not in\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request with a body (`Connection: close`); the response.
use ivy_tests::http_send as send;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_on_the_same_or_another_connection_is_stored_once_and_gets_the_first_timestamp() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let mut watcher = Client::connect(&server.ws_url()).await;
    assert!(watcher.request("#s#+/a").await.starts_with("#s#@"));
    let mut a = Client::connect(&server.ws_url()).await;
    let first = acked(&a.request("#1#*c1.1:/a/b:hello").await, "1");
    assert_eq!(watcher.recv().await, format!("@{first}:/a/b:hello"), "the event carries no id");
    // The same id again, on the same connection: the first's reply, byte for byte.
    assert_eq!(a.request("#2#*c1.1:/a/b:hello").await, format!("#2#@{first}"));
    // And from another connection of the same sender (anonymous), with other data and path.
    let mut b = Client::connect(&server.ws_url()).await;
    assert_eq!(b.request("#x#*c1.1:/elsewhere:other data").await, format!("#x#@{first}"));
    // Without a key: no reply, nothing stored (a keyed send after it shows its ack in order).
    b.send("*c1.1:/a/b:hello").await;
    let second = acked(&b.request("#y#*c1.2:/a/b:next").await, "y");
    assert!(second > first);
    assert_eq!(watcher.recv().await, format!("@{second}:/a/b:next"));
    watcher.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(log_lines(server.addr, "/").await, [format!("@{first}:/a/b:hello"), format!("@{second}:/a/b:next")]);
    // An id is not a plain send's business: the same data without one is another event.
    let plain = acked(&a.request("#3#:/a/b:hello").await, "3");
    assert!(plain > second);
    // Replays are counted, and the ids remembered (in the engine's memory: Redis keeps them
    // in Redis, where their keys expire, and reports no count).
    if redis() {
        metrics_reach(server.addr, &["ivy_idempotency_replays_total 3"]).await;
    } else {
        metrics_reach(server.addr, &["ivy_idempotency_replays_total 3", "ivy_idempotency_keys 2"]).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acks_of_repeats_come_in_send_order() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let mut a = Client::connect(&server.ws_url()).await;
    // Pipelined: firsts and repeats mixed, some in the same group commit as their first.
    for i in 0..200 {
        let id = format!("p.{}", i / 2);
        a.send(&format!("#{i}#*{id}:/p:{i}")).await;
    }
    let mut stamps: HashMap<String, String> = HashMap::new();
    for i in 0..200 {
        let line = a.recv().await;
        let ts = acked(&line, &i.to_string());
        let id = format!("p.{}", i / 2);
        match stamps.get(&id) {
            Some(first) => assert_eq!(&ts, first, "send {i} repeats {id}"),
            None => {
                stamps.insert(id, ts);
            }
        }
    }
    let log = log_lines(server.addr, "/p").await;
    assert_eq!(log.len(), 100, "each id once");
    for (i, line) in log.iter().enumerate() {
        assert_eq!(line, &format!("@{}:/p:{}", stamps[&format!("p.{i}")], 2 * i));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_are_malformed_and_nothing_is_stored() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let reason = "a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; the command was not executed";
    let long = "x".repeat(65);
    for bad in ["*:/a:x".to_string(), "*a b:/a:x".into(), "*a/b:/a:x".into(), "*a%20:/a:x".into(), format!("*{long}:/a:x"), "*abc".into()] {
        assert_eq!(a.request(&format!("#k#{bad}")).await, format!("#k#!malformed {reason}"), "{bad}");
    }
    assert_eq!(a.request("#k#*ok:/a").await, "#k#!malformed send needs ':' between path and data (:/path:data)");
    assert!(a.request("#k#*ok:/A:x").await.starts_with("#k#!bad-path "));
    // The longest id is fine.
    let max = "y".repeat(64);
    let ts = acked(&a.request(&format!("#k#*{max}:/a:x")).await, "k");
    assert_eq!(log_lines(server.addr, "/").await, [format!("@{ts}:/a:x")]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_scoped_to_their_sender() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup
        .config
        .clone()
        .auth_hmac_secrets(vec![Secret::new(SECRET)])
        .anonymous_write(vec!["/".into()])
        .anonymous_read(vec!["/".into()]);
    let server = TestServer::start(setup).await;
    let url = |sub: &str| format!("{}?token={}", server.ws_url(), token(sub));
    let mut ada = Client::connect(&url("ada")).await;
    let mut bob = Client::connect(&url("bob")).await;
    let mut anon = Client::connect(&server.ws_url()).await;
    let t_ada = acked(&ada.request("#1#*same:/s:from ada").await, "1");
    let t_bob = acked(&bob.request("#1#*same:/s:from bob").await, "1");
    let t_anon = acked(&anon.request("#1#*same:/s:from nobody").await, "1");
    assert!(t_ada < t_bob && t_bob < t_anon, "three sends, three events");
    // Each sender's repeat gets its own first.
    let mut ada2 = Client::connect(&url("ada")).await;
    assert_eq!(ada2.request("#2#*same:/s:again").await, format!("#2#@{t_ada}"));
    assert_eq!(bob.request("#2#*same:/s:again").await, format!("#2#@{t_bob}"));
    assert_eq!(anon.request("#2#*same:/s:again").await, format!("#2#@{t_anon}"));
    let log = log_text(server.addr, "/log/s?ext=sender").await;
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [format!("@{t_ada}~=ada:/s:from ada"), format!("@{t_bob}~=bob:/s:from bob"), format!("@{t_anon}~-:/s:from nobody")]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_forgotten_after_the_window() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().idempotency_window(Duration::from_millis(300));
    let server = TestServer::start(setup).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let first = acked(&a.request("#1#*w:/w:one").await, "1");
    assert_eq!(a.request("#2#*w:/w:one").await, format!("#2#@{first}"), "inside the window");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = acked(&a.request("#3#*w:/w:one").await, "3");
    assert!(again > first, "after the window the id is a new send");
    assert_eq!(log_lines(server.addr, "/w").await.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_accepts_ids_and_ignores_them() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().idempotency_window(Duration::ZERO);
    let server = TestServer::start(setup).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let one = acked(&a.request("#1#*z:/z:x").await, "1");
    let two = acked(&a.request("#2#*z:/z:x").await, "2");
    assert!(two > one);
    assert_eq!(log_lines(server.addr, "/z").await.len(), 2);
    server.stop().await;
}

/// Whether the tests run on Redis (`IVY_TEST_ENGINE=redis`).
fn redis() -> bool {
    ivy_tests::EngineKind::from_env() == ivy_tests::EngineKind::Redis
}

/// On sled and in memory; on Redis the limit does not apply (each id's key expires with the
/// window, which bounds them: window × rate), and every id stays remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_keys_the_oldest_ids_are_forgotten_first() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().idempotency_max_keys(3);
    let server = TestServer::start(setup).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let mut stamps = Vec::new();
    for i in 0..5 {
        stamps.push(acked(&a.request(&format!("#{i}#*m.{i}:/m:{i}")).await, &i.to_string()));
    }
    if redis() {
        for (i, first) in stamps.iter().enumerate() {
            assert_eq!(a.request(&format!("#r{i}#*m.{i}:/m:{i}")).await, format!("#r{i}#@{first}"), "Redis keeps m.{i}");
        }
        assert_eq!(log_lines(server.addr, "/m").await.len(), 5);
        metrics_reach(server.addr, &["ivy_idempotency_evicted_total 0", "ivy_idempotency_replays_total 5"]).await;
        server.stop().await;
        return;
    }
    // The newest three are remembered, the two oldest were evicted.
    for (i, first) in stamps.iter().enumerate().skip(2) {
        assert_eq!(a.request(&format!("#r{i}#*m.{i}:/m:{i}")).await, format!("#r{i}#@{first}"));
    }
    let again = acked(&a.request("#r0#*m.0:/m:0").await, "r0");
    assert!(again > stamps[4]);
    assert_eq!(log_lines(server.addr, "/m").await.len(), 6);
    // Counted by the sequencer right after the acks of the commit that evicted them.
    metrics_reach(server.addr, &["ivy_idempotency_evicted_total 3", "ivy_idempotency_keys 3"]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_while_the_first_is_in_flight_get_its_timestamp() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    // 8 connections send the same 50 ids at once, racing each other into the same and
    // successive group commits.
    let mut tasks = Vec::new();
    for c in 0..8 {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            for i in 0..50 {
                client.send(&format!("#{i}#*race.{i}:/race:{c}")).await;
            }
            let mut got = Vec::new();
            for i in 0..50 {
                got.push(acked(&client.recv().await, &i.to_string()));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    for i in 0..50 {
        let first = &all[0][i];
        assert!(all.iter().all(|got| &got[i] == first), "every sender of race.{i} got the same timestamp");
    }
    let log = log_lines(server.addr, "/race").await;
    assert_eq!(log.len(), 50, "each id stored once");
    for (i, line) in log.iter().enumerate() {
        assert!(line.starts_with(&format!("@{}:/race:", all[0][i])), "{line}");
    }
    server.stop().await;
}

/// A raw WebSocket client on a server that may be killed.
async fn try_connect(url: &str) -> Option<Client> {
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(url)).await.ok()?.ok()?;
    Some(Client::from_stream(ws))
}

/// The ack `#i#@ts` of a line, if it is one.
fn ack_of(line: &str) -> Option<(usize, String)> {
    let (key, ts) = line.strip_prefix('#')?.split_once("#@")?;
    Some((key.parse().ok()?, ts.to_string()))
}

/// What one connection to a server that gets killed saw.
#[derive(Default)]
struct Round {
    /// The acks, by send number.
    acks: HashMap<usize, String>,
    /// The highest send number sent (exclusive).
    sent: usize,
}

/// Sends `#i#*k.i:/kill/..:i` for i in 0..n, at most `window` unacknowledged at a time, until
/// every one is acknowledged or the connection fails (the server was killed).
async fn send_all(client: &mut Client, n: usize, window: usize) -> Round {
    let mut round = Round::default();
    let mut acked = 0;
    loop {
        while round.sent < n && round.sent - acked < window {
            let i = round.sent;
            let cmd = format!("#{i}#*k.{i}:/kill/{}:{i}", i % 7);
            if client.send_raw(tokio_tungstenite::tungstenite::Message::text(cmd)).await.is_err() {
                return round;
            }
            round.sent += 1;
        }
        if acked == n {
            return round;
        }
        match client.next_within(Duration::from_secs(10)).await {
            Got::Line(line) => {
                let (i, ts) = ack_of(&line).unwrap_or_else(|| panic!("unexpected line {line:?}"));
                round.acks.insert(i, ts);
                acked += 1;
            }
            _ => return round,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_retried_across_sigkills_of_the_real_binary_are_stored_exactly_once() {
    let dir = temp_dir();
    const N: usize = 4000;
    const KILLS: usize = 3;
    // The first timestamp acknowledged for each send (from any attempt).
    let mut firsts: HashMap<usize, String> = HashMap::new();
    let (mut attempts, mut repeats_acked, mut in_flight_at_kills) = (0, 0, 0);
    let mut server = Some(ServerProcess::start_sled(dir.path(), &[]).await);
    for round in 0..=KILLS {
        let running = server.as_ref().expect("running");
        let mut client = try_connect(&running.ws_url()).await.expect("connect");
        // SIGKILL the real binary while sends are in flight (after 100, 200, 300 ms).
        let killer = (round < KILLS).then(|| {
            let pid = running.pid();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100 * (round as u64 + 1))).await;
                std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status().expect("kill -KILL")
            })
        });
        // Every send from the first again, acknowledged before or not, in order: what a client
        // resending after a reconnect does; then the sends not made yet.
        let seen = send_all(&mut client, N, 64).await;
        attempts += seen.sent;
        if let Some(killer) = killer {
            assert!(killer.await.unwrap().success());
            server.take().expect("running").wait().await;
            in_flight_at_kills += seen.sent - seen.acks.len();
        } else {
            assert_eq!(seen.acks.len(), N, "every send acknowledged in the last round");
        }
        for (i, ts) in seen.acks {
            match firsts.get(&i) {
                Some(first) => {
                    assert_eq!(&ts, first, "a repeat of k.{i} gets the first timestamp (round {round})");
                    repeats_acked += 1;
                }
                None => {
                    firsts.insert(i, ts);
                }
            }
        }
        if round < KILLS {
            server = Some(ServerProcess::start_sled(dir.path(), &[]).await);
        }
    }
    let server = server.expect("running");
    assert_eq!(firsts.len(), N);
    assert!(repeats_acked > 0, "repeats were answered from the restarted store");
    assert!(in_flight_at_kills > 0, "some sends were in flight at a kill");
    let log = log_lines(server.addr, "/kill").await;
    let mut seen = HashMap::new();
    for line in &log {
        let (ts, rest) = line[1..].split_once(':').unwrap();
        let i: usize = rest.rsplit(':').next().unwrap().parse().unwrap();
        assert!(seen.insert(i, ts.to_string()).is_none(), "k.{i} twice in the log");
        assert_eq!(firsts[&i], ts, "the log holds the acknowledged event of k.{i}");
    }
    assert_eq!(seen.len(), N, "each send exactly once in the log ({attempts} attempts)");
    eprintln!(
        "{N} sends, {attempts} attempts over {KILLS} SIGKILLs ({in_flight_at_kills} in flight at the kills), {repeats_acked} repeats answered with their first timestamp"
    );
    assert!(server.terminate().await.success());
}

/// Auth on, with an API key, and anonymous reads and writes of everything.
async fn open_auth_server(dir: &std::path::Path) -> TestServer {
    let mut setup = config(dir);
    setup.config = setup
        .config
        .clone()
        .auth_hmac_secrets(vec![Secret::new(SECRET)])
        .api_keys(vec![KEY.into()])
        .anonymous_read(vec!["/".into()])
        .anonymous_write(vec!["/".into()]);
    TestServer::start(setup).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_log_post_or_put_replay_the_first_answer() {
    let dir = temp_dir();
    let server = open_auth_server(dir.path()).await;
    let addr = server.addr;
    let first = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1")], b"one").await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let ts = first.text().trim().to_string();
    // The same key again (PUT, other data): the first's answer, marked replayed.
    let again = send(addr, "PUT", "/log/h", &[("Idempotency-Key", "h.1")], b"two").await;
    assert_eq!((again.status, again.text()), (201, first.text()));
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // JSON answers too.
    let json_again = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1"), ("Accept", "application/json")], b"x").await;
    assert_eq!(json_body(&json_again), json!({"timestamp": ts}));
    // The same scope over a WebSocket (anonymous): the same send.
    let mut ws = Client::connect(&server.ws_url()).await;
    assert_eq!(ws.request("#w#*h.1:/h:three").await, format!("#w#@{ts}"));
    // The API key is another sender (`*`), a token's sub another again.
    let bearer = format!("Bearer {KEY}");
    let by_key = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1"), ("Authorization", &bearer)], b"by key").await;
    assert_eq!(by_key.status, 201);
    assert_eq!(by_key.header("idempotent-replayed"), None);
    let by_key_again = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1"), ("Authorization", &bearer)], b"x").await;
    assert_eq!((by_key_again.text(), by_key_again.header("idempotent-replayed")), (by_key.text(), Some("true")));
    let ada = format!("Bearer {}", token("ada"));
    let by_ada = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1"), ("Authorization", &ada)], b"by ada").await;
    assert_eq!((by_ada.status, by_ada.header("idempotent-replayed")), (201, None));
    let log = log_text(addr, "/log/h?ext=sender").await;
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [format!("@{ts}~-:/h:one"), format!("@{}~*:/h:by key", by_key.text().trim()), format!("@{}~=ada:/h:by ada", by_ada.text().trim())]
    );
    // Bad keys: 400 with the reason, nothing stored.
    for bad in ["", "a b", "a/b", &"k".repeat(65)] {
        let r = send(addr, "POST", "/log/h", &[("Idempotency-Key", bad)], b"bad").await;
        assert_eq!(r.status, 400, "{bad:?}");
        assert_eq!(r.text(), "invalid Idempotency-Key: a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; nothing was stored\n");
    }
    let two = send(addr, "POST", "/log/h", &[("Idempotency-Key", "a"), ("Idempotency-Key", "b")], b"bad").await;
    assert_eq!((two.status, two.text()), (400, "one Idempotency-Key header at most\n".to_string()));
    assert_eq!(log_lines(addr, "/h").await.len(), 3);
    // A browser may send the header and read the answer's.
    let pre = ivy_tests::http_request(addr, "OPTIONS", "/log/h", &[("Origin", "https://app.example")]).await;
    assert!(pre.header("access-control-allow-headers").unwrap().contains("Idempotency-Key"));
    let cors = send(addr, "POST", "/log/h", &[("Idempotency-Key", "h.1"), ("Origin", "https://app.example")], b"x").await;
    assert!(cors.header("access-control-expose-headers").unwrap().contains("Idempotent-Replayed"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_items_carry_ids_or_take_them_from_the_header() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let addr = server.addr;
    let post = |headers: Vec<(&'static str, String)>, body: Value| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        send(addr, "POST", "/publish", &headers, body.to_string().as_bytes()).await
    };
    // Per-item ids: a repeat inside the same request is a repeat too.
    let items = json!([{"path": "/p", "data": "a", "id": "x"}, {"path": "/p", "data": "b", "id": "x"}, {"path": "/p", "data": "c"}]);
    let r = post(vec![], items.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let res = json_body(&r);
    let t0 = res[0]["timestamp"].as_str().unwrap().to_string();
    assert_eq!(res[0], json!({"timestamp": t0}));
    assert_eq!(res[1], json!({"timestamp": t0, "replayed": true}));
    let t2 = res[2]["timestamp"].as_str().unwrap().to_string();
    assert!(t2 > t0);
    // The whole request again: its item with an id is replayed, the one without is stored again.
    let res = json_body(&post(vec![], items).await);
    assert_eq!((&res[0], &res[1]), (&json!({"timestamp": t0, "replayed": true}), &json!({"timestamp": t0, "replayed": true})));
    assert!(res[2]["timestamp"].as_str().unwrap() > t2.as_str());
    // The header: item i gets KEY.i.
    let batch = json!([{"path": "/q", "data": "0"}, {"path": "/q", "data": "1"}]);
    let key = || vec![("Idempotency-Key", "batch-7".to_string())];
    let first = json_body(&post(key(), batch.clone()).await);
    assert!(first[0].get("replayed").is_none() && first[1].get("replayed").is_none(), "{first}");
    let again = json_body(&post(key(), batch).await);
    for i in 0..2 {
        assert_eq!(again[i], json!({"timestamp": first[i]["timestamp"], "replayed": true}));
    }
    let by_item = json_body(&post(vec![], json!([{"path": "/q", "data": "x", "id": "batch-7.1"}])).await);
    assert_eq!(by_item[0], json!({"timestamp": first[1]["timestamp"], "replayed": true}), "KEY.i is the item's id");
    assert_eq!(log_lines(addr, "/q").await.len(), 2);
    // Refusals: both kinds of ids, a header too long for KEY.i, a bad item id.
    let both = post(key(), json!([{"path": "/q", "data": "x", "id": "y"}])).await;
    assert_eq!(
        (both.status, both.text()),
        (400, "use either the Idempotency-Key header or per-item ids, not both; nothing was stored\n".into())
    );
    let long = post(vec![("Idempotency-Key", "k".repeat(58))], json!([{"path": "/q", "data": "x"}])).await;
    assert_eq!(long.status, 400);
    assert!(long.text().starts_with("the Idempotency-Key of POST /publish is at most 57 bytes"), "{}", long.text());
    assert_eq!(post(vec![("Idempotency-Key", "k".repeat(57))], json!([{"path": "/q", "data": "x"}])).await.status, 200);
    let bad = post(vec![], json!([{"path": "/q", "data": "x"}, {"path": "/q", "data": "x", "id": "no spaces"}])).await;
    assert_eq!(
        (bad.status, bad.text()),
        (400, "item 1: invalid id: a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; nothing was stored\n".into())
    );
    assert_eq!(log_lines(addr, "/q").await.len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_survive_a_graceful_restart_and_older_events_are_not_remembered() {
    let dir = temp_dir();
    let mut setup = config(dir.path()).sled();
    setup.config = setup.config.clone().idempotency_window(Duration::from_secs(2));
    let server = TestServer::start(setup.clone()).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let old = acked(&a.request("#1#*old:/r:old").await, "1");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fresh = acked(&a.request("#2#*fresh:/r:fresh").await, "2");
    server.stop().await;
    let server = TestServer::start(setup).await;
    let mut a = Client::connect(&server.ws_url()).await;
    assert_eq!(a.request("#3#*fresh:/r:x").await, format!("#3#@{fresh}"), "remembered from the store");
    let new = acked(&a.request("#4#*old:/r:old").await, "4");
    assert!(new > old, "past the window when the store opened: a new send");
    metrics_reach(server.addr, &["ivy_idempotency_keys 2"]).await;
    assert_eq!(log_lines(server.addr, "/r").await.len(), 3);
    server.stop().await;
}
