//! Presence (issue 14, the clients' part) against real servers on 127.0.0.1 with real tokens
//! minted here: the native client's presence stream (`Client::presence`) and snapshot call
//! (`Client::who`), its resynchronisation after reconnects (only real differences: no phantom
//! members, no missed leaves), the separation of presence from the event stream, and the CLI's
//! `ivy who` and `ivy sub --presence` in the formats their help documents.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use ivy_client_native::{Client, ClientError, ConnState, Error, ErrorCode, Member, MemberId, PresenceEvent, PresenceStream, ServerCode};
use ivy_server::auth::Secret;
use ivy_tests::{FaultProxy, TestServer, config, ivy_bin, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "presence-clients-secret";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token for `sub` reading and writing `grants`, with the `info` claim if given.
fn token(sub: &str, grants: &[&str], info: Option<Value>) -> String {
    let mut claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": grants, "write": grants});
    if let Some(info) = info {
        claims["info"] = info;
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A server with auth on (anonymous read of `/public`) and the given linger.
async fn server(dir: &std::path::Path, linger: Duration) -> TestServer {
    let mut setup = config(dir);
    setup.config =
        setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).anonymous_read(vec!["/public".into()]).presence_linger(linger);
    TestServer::start(setup).await
}

async fn client(url: &str, token: &str) -> Client {
    Client::builder(url).token(token).backoff(Duration::from_millis(20), Duration::from_millis(150)).connect().await.expect("connect")
}

fn sub(s: &str) -> MemberId {
    MemberId::Sub(s.into())
}

fn names(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.id.to_string()).collect()
}

/// The next presence event within 10 s.
async fn next(p: &mut PresenceStream) -> PresenceEvent {
    tokio::time::timeout(Duration::from_secs(10), p.next()).await.expect("a presence event in time").expect("the stream goes on")
}

/// Every presence event that comes within `wait`.
async fn drain(p: &mut PresenceStream, wait: Duration) -> Vec<PresenceEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, p.next()).await {
        out.push(e);
    }
    out
}

/// `who(path)` until `done` holds (another client's subscription or departure may still be on
/// its way to the server, and a departure shows after the linger), at most 5 s.
async fn who_until(c: &Client, path: &str, done: impl Fn(&ivy_client_native::PresenceView) -> bool) -> ivy_client_native::PresenceView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = c.who(path).await.unwrap();
        if done(&v) || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The joins and leaves among `events`, as `+name` and `-name`.
fn moves(events: &[PresenceEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            PresenceEvent::Join(m) => Some(format!("+{}", m.id)),
            PresenceEvent::Leave(m) => Some(format!("-{}", m.id)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_stream_reports_a_snapshot_then_joins_leaves_and_counts_and_never_mixes_with_events() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO).await;
    let url = format!("ws://{}", server.addr);
    let watcher = client(&url, &token("watcher", &["/room"], None)).await;
    // An event subscription of the same path on the same client: it gets events, only events.
    let mut events = watcher.subscribe("/room").await.unwrap();
    let mut p = watcher.presence("/room").await.unwrap();
    let view = p.snapshot().await.unwrap().clone();
    assert_eq!((view.path.as_str(), view.count, names(&view.members)), ("/room", 1, vec!["watcher".to_string()]));
    assert_eq!(view.members[0].conns, 1, "one connection, subscribed once at /room");

    let ada = client(&url, &token("ada", &["/room"], Some(json!({"nick": "Ada L."})))).await;
    let ada_sub = ada.subscribe("/room/a").await.unwrap();
    let join = next(&mut p).await;
    let PresenceEvent::Join(m) = &join else { panic!("{join:?}") };
    assert_eq!((&m.id, m.info.as_deref(), m.conns), (&sub("ada"), Some(r#"{"nick":"Ada L."}"#), 1));
    assert_eq!(next(&mut p).await, PresenceEvent::Count(2));
    // A second tab of ada: the same member, nothing announced.
    let ada2 = client(&url, &token("ada", &["/room"], None)).await;
    let ada2_sub = ada2.subscribe("/room/a").await.unwrap();
    let ts = ada.send("/room/a", "hello").await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((ev.ts, &*ev.path, &*ev.data), (ts, "/room/a", &b"hello"[..]));
    assert_eq!(drain(&mut p, Duration::from_millis(400)).await, []);
    // A second watch of the same path on the same client gets a snapshot of its own; dropping
    // it leaves the first one (and the subscription) as they were.
    let mut again = watcher.presence("/room").await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(10), again.snapshot()).await.expect("a second snapshot").unwrap();
    assert_eq!(names(&v.members), ["ada", "watcher"]);
    drop(again);
    // The one-off query sees ada's two connections.
    let who = who_until(&watcher, "/room", |v| v.members.first().is_some_and(|m| m.conns == 2)).await;
    assert_eq!(names(&who.members), ["ada", "watcher"]);
    assert_eq!((who.count, who.members[0].conns, who.complete), (2, 2, true));
    // The first tab goes: ada stays; the second goes: ada leaves.
    drop(ada_sub);
    assert_eq!(drain(&mut p, Duration::from_millis(400)).await, []);
    drop(ada2_sub);
    let leave = next(&mut p).await;
    assert!(matches!(&leave, PresenceEvent::Leave(m) if m.id == sub("ada")), "{leave:?}");
    assert_eq!(next(&mut p).await, PresenceEvent::Count(1));
    assert_eq!(names(&p.view().members), ["watcher"]);
    assert_eq!(p.view().count, 1);
    // A watch without a read grant: refused, and its stream ends.
    let mut w = watcher.presence("/secret").await.unwrap();
    match w.snapshot().await {
        Err(Error::Request(ClientError::Server { code, .. })) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("a watch without a read grant: {other:?}"),
    }
    assert!(w.next().await.is_none(), "a refused watch's stream ends");
    // Anonymous members (no token, anonymous read of /public) have server ids of their own.
    let anon = Client::connect(&url).await.unwrap();
    let mut anon_watch = anon.presence("/public").await.unwrap();
    let v = anon_watch.snapshot().await.unwrap();
    assert_eq!(v.count, 1);
    let MemberId::Anon(id) = &v.members[0].id else { panic!("{v:?}") };
    assert_eq!(id.len(), 16, "16 hex digits");
    // The events stream saw nothing but the event.
    assert!(tokio::time::timeout(Duration::from_millis(200), events.next()).await.is_err(), "no other item on the event stream");
    for c in [watcher, ada, ada2, anon] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_answers_once_and_refuses_without_a_grant() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO).await;
    let url = format!("ws://{}", server.addr);
    let ada = client(&url, &token("ada", &["/chat"], Some(json!({"nick": "Ada"})))).await;
    let _s = ada.subscribe("/chat/x").await.unwrap();
    let bob = client(&url, &token("bob", &["/chat/y"], None)).await;
    let _t = bob.subscribe("/chat/y").await.unwrap();
    let v = who_until(&ada, "/chat", |v| v.count == 2).await;
    assert_eq!((v.path.as_str(), v.count, names(&v.members)), ("/chat", 2, vec!["ada".to_string(), "bob".to_string()]));
    assert_eq!(v.members[0].info.as_deref(), Some(r#"{"nick":"Ada"}"#));
    // bob may read /chat/y only.
    match bob.who("/chat").await {
        Err(Error::Request(ClientError::Server { code, .. })) => assert_eq!(code, ServerCode::Known(ErrorCode::Forbidden)),
        other => panic!("who without a grant: {other:?}"),
    }
    assert_eq!(names(&who_until(&bob, "/chat/y", |v| v.count == 1).await.members), ["bob"]);
    // who makes no subscription: ada's who of /chat/y did not make her present there.
    assert_eq!(names(&ada.who("/chat/y").await.unwrap().members), ["bob"]);
    assert!(matches!(ada.who("/Bad Path").await, Err(Error::Request(ClientError::InvalidPath(_)))));
    ada.close().await;
    assert!(matches!(ada.who("/chat").await, Err(Error::Closed | Error::Request(ClientError::Closed))));
    bob.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_the_stream_reports_only_the_real_differences() {
    let dir = temp_dir();
    // A linger longer than the watcher's quick reconnects, shorter than its long absence.
    let server = server(dir.path(), Duration::from_millis(800)).await;
    let url = format!("ws://{}", server.addr);
    let proxy = FaultProxy::start(server.addr).await;
    let watcher = client(&proxy.url(), &token("watcher", &["/room"], None)).await;
    let mut p = watcher.presence("/room").await.unwrap();
    p.snapshot().await.unwrap();
    let ada = client(&url, &token("ada", &["/room"], None)).await;
    let _a = ada.subscribe("/room").await.unwrap();
    let bob = client(&url, &token("bob", &["/room"], None)).await;
    let b = bob.subscribe("/room/b").await.unwrap();
    let got = drain(&mut p, Duration::from_millis(500)).await;
    let mut m = moves(&got);
    m.sort();
    assert_eq!(m, ["+ada", "+bob"]);
    assert_eq!(p.view().count, 3);

    // Quick cuts (reconnects within the linger): nothing is reported at all.
    let mut connections = watcher.connections();
    for _ in 0..3 {
        let n = *connections.borrow_and_update();
        proxy.cut_all();
        tokio::time::timeout(Duration::from_secs(10), connections.wait_for(|c| *c > n)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(drain(&mut p, Duration::from_millis(400)).await, [], "no phantom leave and join across reconnects");

    // A long absence: the server is unreachable for the watcher while bob leaves and cy joins.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    proxy.set_upstream(dead);
    proxy.cut_all();
    let mut state = watcher.state();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| !matches!(s, ConnState::Connected))).await.unwrap().unwrap();
    drop(b);
    let cy = client(&url, &token("cy", &["/room"], None)).await;
    let _c = cy.subscribe("/room/c").await.unwrap();
    // bob's leave takes effect after the linger.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(drain(&mut p, Duration::from_millis(50)).await, [], "nothing while disconnected");
    proxy.set_upstream(server.addr);
    let got = drain(&mut p, Duration::from_secs(3)).await;
    // The fresh snapshot against the view: bob is gone, cy came; ada and the watcher itself
    // (back, with a new connection) are not reported; the count did not change (3).
    let mut m = moves(&got);
    m.sort();
    assert_eq!(m, ["+cy", "-bob"], "{got:?}");
    assert!(!got.iter().any(|e| matches!(e, PresenceEvent::Count(_))), "{got:?}");
    assert_eq!(names(&p.view().members), ["ada", "cy", "watcher"]);
    // And live again: ada leaves.
    ada.close().await;
    assert!(matches!(next(&mut p).await, PresenceEvent::Leave(m) if m.id == sub("ada")));
    assert_eq!(next(&mut p).await, PresenceEvent::Count(2));
    for c in [watcher, bob, cy] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_converges_without_phantoms() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::from_secs(2)).await;
    let port = server.addr;
    let url = format!("ws://{}", server.addr);
    let watcher = client(&url, &token("watcher", &["/room"], None)).await;
    let mut p = watcher.presence("/room").await.unwrap();
    p.snapshot().await.unwrap();
    let ada = client(&url, &token("ada", &["/room"], None)).await;
    let _a = ada.subscribe("/room").await.unwrap();
    assert_eq!(moves(&drain(&mut p, Duration::from_millis(400)).await), ["+ada"]);
    // The server stops (presence is not persisted) and comes back on the same port: both
    // clients reconnect; the watcher's fresh snapshot has the same members.
    server.stop().await;
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).presence_linger(Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind(port).await.expect("the same port again");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let restarted = tokio::spawn(ivy_server::run(setup.builder(), listener, async move {
        let _ = stopped.await;
    }));
    let mut connections = watcher.connections();
    tokio::time::timeout(Duration::from_secs(15), connections.wait_for(|c| *c >= 2)).await.unwrap().unwrap();
    let got = drain(&mut p, Duration::from_secs(2)).await;
    // Presence is not persisted: if ada reconnects after the watcher's fresh snapshot was
    // taken, the snapshot lacks her (a leave), then she joins again; if before, nothing. The
    // watcher itself never shows up, and the view ends right either way.
    let m = moves(&got);
    assert!(m.is_empty() || m == ["-ada", "+ada"], "{got:?}");
    assert_eq!(names(&p.view().members), ["ada", "watcher"]);
    assert_eq!(p.view().count, 2);
    watcher.close().await;
    ada.close().await;
    let _ = stop.send(());
    let _ = restarted.await;
}

async fn ivy(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(ivy_bin()).arg("--url").arg(url).args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .expect("ivy finished")
    .expect("ivy ran");
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ivy_who_prints_the_members_and_ivy_sub_presence_follows_them() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO).await;
    let url = format!("ws://{}", server.addr);
    let ada = client(&url, &token("ada l", &["/room"], Some(json!({"nick": "Ada"})))).await;
    let a = ada.subscribe("/room/a").await.unwrap();
    let anon = Client::connect(&url).await.unwrap();
    let _p = anon.subscribe("/public").await.unwrap();

    let reader = token("cli", &["/"], None);
    let (code, out, err) = ivy(&url, &["--token", &reader, "who", "/room"]).await;
    assert_eq!((code, out.as_str()), (0, "=ada%20l 1 {\"nick\":\"Ada\"}\n# 1 member\n"), "{err}");
    let (code, out, _) = ivy(&url, &["--token", &reader, "who", "/room", "--json"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({"path": "/room", "count": 1, "complete": true, "members": [{"sub": "ada l", "info": {"nick": "Ada"}, "conns": 1}]})
    );
    let (code, out, _) = ivy(&url, &["--token", &reader, "who", "/public"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with('-') && lines[0].ends_with(" 1") && lines[0].len() == 19, "{out}");
    assert_eq!(lines[1], "# 1 member");
    // No read grant: refused, exit 1.
    let (code, out, err) = ivy(&url, &["--token", &token("nobody", &["/elsewhere"], None), "who", "/room"]).await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("forbidden"), "{err}");

    // `ivy sub --presence`: the snapshot, then changes, between the events.
    let mut child = tokio::process::Command::new(ivy_bin())
        .args(["--url", &url, "--token", &token("cli", &["/room"], None), "sub", "--presence", "/room"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line =
        async || tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.expect("a line in time").unwrap().unwrap();
    // The CLI is present itself (its subscription).
    assert_eq!(line().await, "^=/room =ada%20l 1 {\"nick\":\"Ada\"}");
    assert_eq!(line().await, "^=/room =cli 1");
    assert_eq!(line().await, "^#/room 2");
    let bob = client(&url, &token("bob", &["/room"], None)).await;
    let b = bob.subscribe("/room").await.unwrap();
    assert_eq!(line().await, "^+/room =bob 1");
    assert_eq!(line().await, "^#/room 3");
    let ts = bob.send("/room", "hi 100%").await.unwrap();
    assert_eq!(line().await, format!("@{ts}:/room:hi 100%25"));
    drop(a);
    assert_eq!(line().await, "^-/room =ada%20l");
    assert_eq!(line().await, "^#/room 2");
    drop(b);
    assert_eq!(line().await, "^-/room =bob");
    assert_eq!(line().await, "^#/room 1");
    let _ = child.start_kill();

    // --json.
    let out = tokio::process::Command::new(ivy_bin())
        .args(["--url", &url, "--token", &token("cli", &["/room"], None), "sub", "--presence", "--json", "--count", "1", "/room"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut child = out;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v, json!({"presence": "snapshot", "path": "/room", "count": 1, "complete": true, "members": [{"sub": "cli", "conns": 1}]}));
    let ts = bob.send("/room", "x").await.unwrap();
    let ev: Value =
        serde_json::from_str(&tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap()).unwrap();
    assert_eq!(ev, json!({"ts": ts.to_string(), "path": "/room", "data": "x"}));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "--count 1 ends after the one event");
    // --presence without a grant for the path: refused, exit 1.
    let (code, _, err) = ivy(&url, &["--token", &token("nobody", &["/elsewhere"], None), "sub", "--presence", "/room"]).await;
    assert_eq!(code, 1, "{err}");
    for c in [ada, anon, bob] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_list_limit_the_view_is_counted_not_listed() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config = setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).presence_linger(Duration::ZERO).presence_max_list(2);
    let server = TestServer::start(setup).await;
    let url = format!("ws://{}", server.addr);
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let c = client(&url, &token(name, &["/big"], None)).await;
        let s = c.subscribe("/big/room").await.unwrap();
        members.push((c, s));
    }
    let watcher = client(&url, &token("watcher", &["/big"], None)).await;
    let mut p = watcher.presence("/big").await.unwrap();
    let v = p.snapshot().await.unwrap().clone();
    // /big/room has 2 members (listed), /big 1 (the watcher).
    assert_eq!((v.count, v.complete, names(&v.members)), (3, true, vec!["a".to_string(), "b".to_string(), "watcher".to_string()]));
    // A third member of /big/room: above the limit, its change carries counts only.
    let c = client(&url, &token("c", &["/big"], None)).await;
    let s = c.subscribe("/big/room").await.unwrap();
    members.push((c, s));
    // The list cannot be followed any more: the view comes whole, counted (no leaves of a and b).
    let got = drain(&mut p, Duration::from_millis(600)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let PresenceEvent::Snapshot(v) = &got[0] else { panic!("{got:?}") };
    assert_eq!((v.count, v.complete, names(&v.members)), (4, false, vec!["watcher".to_string()]));
    assert_eq!((p.view().count, p.view().complete), (4, false));
    // who: the count-only channel, the estimate flagged.
    let w = who_until(&watcher, "/big", |v| v.count == 4).await;
    assert_eq!((w.count, w.complete, names(&w.members)), (4, false, vec!["watcher".to_string()]));
    // One leaves: the count follows.
    let (c, s) = members.pop().unwrap();
    drop(s);
    assert_eq!(next(&mut p).await, PresenceEvent::Count(3));
    c.close().await;
    for (c, _) in members {
        c.close().await;
    }
    watcher.close().await;
    server.stop().await;
}
