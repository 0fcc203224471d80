//! Presence across nodes (issue 15), against real `ivy-server` processes on one real
//! `redis-server` (started here on a free loopback port, whatever `IVY_TEST_ENGINE` says):
//! a watcher on one node sees the joins and leaves of members connected to the others,
//! `GET /presence` answers the same on every node, one member connected to two nodes is one
//! member with its connections summed, a SIGKILLed node's members leave the others within
//! the stated bound (heartbeat TTL + check interval + linger), a node that shuts down
//! gracefully takes its members along at once (after the linger), and after a SIGKILL and
//! restart of Redis (or a FLUSHALL) every node converges to the same presence again, and a
//! join storm on one node reaches the others coalesced.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ivy_tests::{Client, Got, RedisServer, ServerProcess, http_get, server_bin, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "redis-presence-test-secret";

/// The bound of a SIGKILLed node's members on the other nodes, without the linger: the alive
/// key's TTL (10 s) plus the check interval (2 s) (`docs/PROTOCOL.md` 5.10).
const DEAD_NODE_BOUND: Duration = Duration::from_secs(12);

fn token(sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + 3600, "read": ["/"], "write": ["/"]});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A node on `redis` with auth on and the linger `linger` (seconds), its data in `dir`.
async fn node(redis: &RedisServer, dir: &Path, linger: &str) -> ServerProcess {
    std::fs::create_dir_all(dir).unwrap();
    let url = redis.url();
    let flags = ["--redis", url.as_str(), "--auth-hmac-secret", SECRET, "--presence-linger", linger];
    ServerProcess::start_bin(&server_bin(), dir, &flags, &[("RUST_LOG", "error")]).await
}

async fn connect(node: &ServerProcess, sub: &str) -> Client {
    Client::connect(&format!("{}?token={}", node.ws_url(), token(sub))).await
}

/// `GET /presence/room` on `node`: the members as (sub, conns), and the count.
async fn room(node: &ServerProcess) -> (usize, Vec<(String, u64)>) {
    let auth = format!("Bearer {}", token("backend"));
    let r = http_get(node.addr, "/presence/room", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let members = v["members"].as_array().unwrap().iter().map(|m| (m["sub"].as_str().unwrap().to_string(), m["conns"].as_u64().unwrap()));
    (v["count"].as_u64().unwrap() as usize, members.collect())
}

/// Waits (at most `within`) until `check` holds; panics with its last value otherwise.
async fn until<T: std::fmt::Debug, F: Future<Output = T>>(within: Duration, mut probe: impl FnMut() -> F, check: impl Fn(&T) -> bool) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = probe().await;
        if check(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not reached within {within:?}: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until every node's `GET /presence/room` shows `expected` (sub, conns), within 10 s.
async fn everywhere(nodes: &[&ServerProcess], expected: &[(&str, u64)]) {
    let expected: Vec<(String, u64)> = expected.iter().map(|(s, k)| (s.to_string(), *k)).collect();
    for n in nodes {
        until(Duration::from_secs(10), || room(n), |(count, members)| *count == expected.len() && *members == expected).await;
    }
}

/// A watcher of `/room`: its snapshot's members, then changes applied.
struct Watcher {
    client: Client,
    members: BTreeSet<String>,
}

impl Watcher {
    async fn start(node: &ServerProcess, sub: &str) -> Watcher {
        let mut client = connect(node, sub).await;
        client.send("#w#~+/room").await;
        let mut members = BTreeSet::new();
        loop {
            let line = client.recv().await;
            if let Some(rest) = line.strip_prefix("^=/room:") {
                let v: Value = serde_json::from_str(rest).unwrap();
                members.extend(v["members"].as_array().unwrap().iter().map(|m| m["sub"].as_str().unwrap().to_string()));
            } else if line.starts_with("#w#") {
                return Watcher { client, members };
            }
        }
    }

    /// The next change of `/room` within `wait`: (joined, left).
    async fn change(&mut self, wait: Duration) -> Option<(Vec<String>, Vec<String>)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.client.next_within(left).await {
                Got::Line(l) if l.starts_with("^~/room:") => {
                    let v: Value = serde_json::from_str(&l["^~/room:".len()..]).unwrap();
                    let subs = |f: &str| -> Vec<String> {
                        v[f].as_array().map(|a| a.iter().map(|m| m["sub"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
                    };
                    let (joined, gone) = (subs("join"), subs("leave"));
                    self.members.extend(joined.iter().cloned());
                    for g in &gone {
                        self.members.remove(g);
                    }
                    return Some((joined, gone));
                }
                Got::Line(_) => continue,
                Got::Timeout => return None,
                other => panic!("the watcher got {other:?}"),
            }
        }
    }
}

fn subs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_shows_the_members_of_every_node() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = node(&redis, &dir.path().join("a"), "1").await;
    let b = node(&redis, &dir.path().join("b"), "1").await;
    let c = node(&redis, &dir.path().join("c"), "1").await;
    let mut w = Watcher::start(&a, "backend").await;
    assert_eq!(w.members, BTreeSet::from(["backend".to_string()]), "the watcher alone");
    // ada subscribes on B: the watcher on A sees her join; every node lists her.
    let mut ada_b = connect(&b, "ada").await;
    let started = tokio::time::Instant::now();
    ada_b.subscribe("/room").await;
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((subs(&["ada"]), vec![])));
    println!("a join on node B reached a watcher on node A after {:?} (presence tick 100 ms)", started.elapsed());
    everywhere(&[&a, &b, &c], &[("ada", 1), ("backend", 1)]).await;
    // ada on C too: one member, her connections summed, nothing announced.
    let mut ada_c = connect(&c, "ada").await;
    ada_c.subscribe("/room").await;
    everywhere(&[&a, &b, &c], &[("ada", 2), ("backend", 1)]).await;
    // bob on C, a watcher on C (a snapshot taken from the replicated view).
    let mut bob = connect(&c, "bob").await;
    bob.subscribe("/room").await;
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((subs(&["bob"]), vec![])), "bob, not ada again");
    let w_c = Watcher::start(&c, "carol").await;
    assert_eq!(w_c.members, ["ada", "backend", "bob", "carol"].into_iter().map(String::from).collect());
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((subs(&["carol"]), vec![])), "a watcher is present");
    // ada's connection on B goes: still present through C.
    ada_b.close().await;
    everywhere(&[&a, &b, &c], &[("ada", 1), ("backend", 1), ("bob", 1), ("carol", 1)]).await;
    assert_eq!(w.change(Duration::from_millis(1500)).await, None, "ada stays (on C): no leave");
    // Her last one goes: she leaves everywhere after the linger.
    ada_c.close().await;
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((vec![], subs(&["ada"]))));
    everywhere(&[&a, &b, &c], &[("backend", 1), ("bob", 1), ("carol", 1)]).await;
    assert_eq!(w.members, ["backend", "bob", "carol"].into_iter().map(String::from).collect());
    bob.close().await;
    for n in [a, b, c] {
        assert!(n.terminate().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_members_leave_within_the_bound_and_a_stopped_nodes_at_once() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = node(&redis, &dir.path().join("a"), "1").await;
    let b = node(&redis, &dir.path().join("b"), "1").await;
    let c = node(&redis, &dir.path().join("c"), "1").await;
    let mut w = Watcher::start(&a, "backend").await;
    let mut bob = connect(&b, "bob").await;
    bob.subscribe("/room").await;
    let mut carol = connect(&c, "carol").await;
    carol.subscribe("/room").await;
    everywhere(&[&a, &b, &c], &[("backend", 1), ("bob", 1), ("carol", 1)]).await;
    while w.members.len() < 3 {
        w.change(Duration::from_secs(10)).await.expect("the joins");
    }
    assert_eq!(redis.command(&["SCARD", "{ivy}:presence:nodes"]), ":3");
    // A graceful stop deletes C's presence at once: carol leaves after the linger (1 s), long
    // before a heartbeat could expire.
    let stopped = tokio::time::Instant::now();
    assert!(c.terminate().await.success());
    assert_eq!(w.change(Duration::from_secs(6)).await, Some((vec![], subs(&["carol"]))));
    println!("a stopped node's member left the others after {:?} (linger 1 s)", stopped.elapsed());
    // A SIGKILL: B's members leave once its heartbeat expired, plus the check and the linger.
    let killed = tokio::time::Instant::now();
    b.kill().await;
    let bound = DEAD_NODE_BOUND + Duration::from_secs(1) + Duration::from_secs(3);
    assert_eq!(w.change(bound).await, Some((vec![], subs(&["bob"]))), "bob leaves within the bound");
    println!("a killed node's member left the others after {:?} (bound 12 s + linger 1 s)", killed.elapsed());
    everywhere(&[&a], &[("backend", 1)]).await;
    // Its keys are gone too (any node cleans up).
    until(Duration::from_secs(5), || async { redis.command(&["SCARD", "{ivy}:presence:nodes"]) }, |n| n == ":1").await;
    drop(bob);
    drop(carol);
    assert!(a.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_kill_and_restart_presence_converges_again() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = node(&redis, &dir.path().join("a"), "1").await;
    let b = node(&redis, &dir.path().join("b"), "1").await;
    let mut w = Watcher::start(&a, "backend").await;
    let mut ada = connect(&a, "ada").await;
    ada.subscribe("/room").await;
    let mut bob = connect(&b, "bob").await;
    bob.subscribe("/room").await;
    everywhere(&[&a, &b], &[("ada", 1), ("backend", 1), ("bob", 1)]).await;
    redis.kill();
    // While Redis is down: ada leaves (on A). (A subscribe is not taken meanwhile: the node
    // cannot make sure of its position, docs/PROTOCOL.md 7, 1013.) Eve joins on B right after
    // Redis is back, before the nodes took their snapshots.
    ada.close().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    let mut eve = connect(&b, "eve").await;
    eve.subscribe("/room").await;
    everywhere(&[&a, &b], &[("backend", 1), ("bob", 1), ("eve", 1)]).await;
    // The watcher's view (snapshot and changes) converged too.
    let expected: BTreeSet<String> = ["backend", "bob", "eve"].into_iter().map(String::from).collect();
    while w.members != expected {
        w.change(Duration::from_secs(10)).await.unwrap_or_else(|| panic!("the watcher's view stays {:?}", w.members));
    }
    // And changes flow again both ways.
    eve.close().await;
    let mut zoe = connect(&a, "zoe").await;
    zoe.subscribe("/room").await;
    everywhere(&[&a, &b], &[("backend", 1), ("bob", 1), ("zoe", 1)]).await;
    drop(bob);
    drop(zoe);
    for n in [a, b] {
        assert!(n.terminate().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_everything_the_nodes_write_their_presence_again_and_nobody_leaves() {
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = node(&redis, &dir.path().join("a"), "1").await;
    let b = node(&redis, &dir.path().join("b"), "1").await;
    let mut w = Watcher::start(&a, "backend").await;
    let mut bob = connect(&b, "bob").await;
    bob.subscribe("/room").await;
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((subs(&["bob"]), vec![])));
    everywhere(&[&a, &b], &[("backend", 1), ("bob", 1)]).await;
    // Redis forgets every key (as a restart without persistence would, minus the lost
    // connections): the heartbeats find their keys gone and write everything again.
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK");
    until(Duration::from_secs(10), || async { redis.command(&["SCARD", "{ivy}:presence:nodes"]) }, |n| n == ":2").await;
    // Longer than a heartbeat TTL plus a check: nobody was taken for dead meanwhile.
    assert_eq!(w.change(Duration::from_secs(13)).await, None, "no leave, no join");
    everywhere(&[&a, &b], &[("backend", 1), ("bob", 1)]).await;
    // Changes flow again.
    bob.close().await;
    assert_eq!(w.change(Duration::from_secs(10)).await, Some((vec![], subs(&["bob"]))));
    for n in [a, b] {
        assert!(n.terminate().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_on_one_node_reaches_another_coalesced() {
    const MEMBERS: usize = 200;
    let dir = temp_dir();
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let a = node(&redis, &dir.path().join("a"), "1").await;
    let b = node(&redis, &dir.path().join("b"), "1").await;
    let mut w = Watcher::start(&a, "backend").await;
    let started = tokio::time::Instant::now();
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let mut c = connect(&b, &format!("m{i:03}")).await;
        c.send("+/room").await;
        members.push(c);
    }
    let mut lines = 0;
    while w.members.len() < MEMBERS + 1 {
        w.change(Duration::from_secs(10)).await.unwrap_or_else(|| panic!("{} of {MEMBERS} joined", w.members.len() - 1));
        lines += 1;
    }
    println!("{MEMBERS} joins on node B reached a watcher on node A in {lines} lines after {:?}", started.elapsed());
    // The publisher writes once per tick and the other node applies a whole read at once:
    // changes are coalesced across nodes as on one.
    assert!(lines < MEMBERS / 2, "{lines} lines for {MEMBERS} joins");
    let (count, _) = room(&a).await;
    assert_eq!(count, MEMBERS + 1);
    drop(members);
    for n in [a, b] {
        assert!(n.terminate().await.success());
    }
}
