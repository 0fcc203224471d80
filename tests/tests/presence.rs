//! Presence (issue 14, the server's part), against real servers on 127.0.0.1 with real tokens
//! minted here (HS256, as a backend in any language would): the `~+` watch and `~?` query
//! commands, the `^=`, `^.` and `^~` lines (`docs/PROTOCOL.md` 5.10, 6.5), `GET /presence`
//! (9.13), the linger, killed clients, a restart, a join storm, grants, and old clients that
//! never see a presence line.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ivy_server::auth::Secret;
use ivy_tests::{Client, FaultProxy, Got, ServerProcess, TestServer, config, http_get, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "presence-test-secret";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token for `sub` reading `read` (and writing it), with `info` if given.
fn token(sub: &str, read: &[&str], info: Option<Value>) -> String {
    let mut claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": read, "write": read});
    if let Some(info) = info {
        claims["info"] = info;
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A server with auth on (anonymous read of `/public`), the linger `linger`, and an API key.
async fn server(dir: &std::path::Path, linger: Duration, tweak: impl FnOnce(ivy_server::Config) -> ivy_server::Config) -> TestServer {
    let mut setup = config(dir);
    setup.config = tweak(
        setup
            .config
            .clone()
            .auth_hmac_secrets(vec![Secret::new(SECRET)])
            .anonymous_read(vec!["/public".into()])
            .api_keys(vec!["backend-key".into()])
            .presence_linger(linger),
    );
    TestServer::start(setup).await
}

async fn connect(server: &TestServer, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", server.ws_url())).await
}

/// Sends `[#key#]~+path` (or `~?`) and collects the lines up to its reply: the snapshot lines
/// (`^=`), the end line (`^.`) and the reply (changes of paths the connection already watches
/// may come in between: skipped).
async fn presence_cmd(c: &mut Client, cmd: &str) -> (Vec<String>, String, String) {
    let key = cmd.strip_prefix('#').and_then(|r| r.split('#').next()).expect("a keyed command").to_string();
    c.send(cmd).await;
    let mut snapshot = Vec::new();
    let mut end = None;
    loop {
        let line = c.recv().await;
        if line.starts_with("^=") {
            assert!(end.is_none(), "a snapshot line after the end line: {line}");
            snapshot.push(line);
        } else if line.starts_with("^.") {
            end = Some(line);
        } else if line.starts_with(&format!("#{key}#")) {
            return (snapshot, end.expect("the end line before the reply"), line);
        } else {
            assert!(line.starts_with("^~"), "{cmd}: {line}");
        }
    }
}

/// The JSON of a presence line `^xPATH:JSON`, with its path.
fn parse(line: &str) -> (String, Value) {
    let rest = &line[2..];
    let colon = rest.find(':').expect("path:json");
    (rest[..colon].to_string(), serde_json::from_str(&rest[colon + 1..]).unwrap_or_else(|e| panic!("{line}: {e}")))
}

/// The next `^~` line within `wait` (other lines skipped), parsed.
async fn change_within(c: &mut Client, wait: Duration) -> Option<(String, Value)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Got::Line(l) if l.starts_with("^~") => return Some(parse(&l)),
            Got::Line(_) => continue,
            Got::Timeout => return None,
            other => panic!("expected a change, got {other:?}"),
        }
    }
}

async fn change(c: &mut Client) -> (String, Value) {
    change_within(c, Duration::from_secs(10)).await.expect("a change line")
}

/// The members of a JSON list (`join`, `leave`, `members`) as their ids: `sub` or `anon:ID`.
fn ids(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| match (m.get("sub"), m.get("anon")) {
                    (Some(s), _) => s.as_str().unwrap().to_string(),
                    (_, Some(a)) => format!("anon:{}", a.as_str().unwrap()),
                    _ => panic!("member without an id: {m}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /presence/<path>` with a bearer token (or none): status and JSON body.
async fn get_presence(server: &TestServer, target: &str, bearer: Option<&str>) -> (u16, Value, ivy_tests::HttpResponse) {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
    let r = http_get(server.addr, target, &headers).await;
    let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, body, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_gets_a_snapshot_then_joins_and_leaves_in_every_order() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let admin = token("watcher", &["/"], None);
    let mut w = connect(&server, &admin).await;
    let (snapshot, end, reply) = presence_cmd(&mut w, "#w#~+/room").await;
    // The watcher is subscribed at /room: present there, in its own snapshot (its join came
    // before the snapshot, so no change line announces it to itself).
    assert_eq!(snapshot, ["^=/room:{\"count\":1,\"members\":[{\"sub\":\"watcher\",\"conns\":1}]}"]);
    assert_eq!(end, "^./room:{\"count\":1}");
    assert!(reply.starts_with("#w#@"), "{reply}");
    assert_eq!(change_within(&mut w, Duration::from_millis(300)).await, None);
    let (_, v, _) = get_presence(&server, "/presence/room", Some(&admin)).await;
    assert_eq!(ids(&v, "members"), ["watcher"]);

    let ada_token = token("ada", &["/room"], Some(json!({"name": "Ada L."})));
    let bob_token = token("bob", &["/room"], None);
    // ada joins, bob joins, ada leaves, bob leaves.
    let mut ada = connect(&server, &ada_token).await;
    ada.subscribe("/room/a").await;
    let (c, v) = change(&mut w).await;
    assert_eq!((c.as_str(), v.clone()), ("/room/a", json!({"join": [{"sub": "ada", "info": {"name": "Ada L."}}], "count": 1})));
    let mut bob = connect(&server, &bob_token).await;
    bob.subscribe("/room/a").await;
    assert_eq!(change(&mut w).await.1, json!({"join": [{"sub": "bob"}], "count": 2}));
    let (_, v, _) = get_presence(&server, "/presence/room", Some(&admin)).await;
    assert_eq!(v["count"], 3);
    assert_eq!(ids(&v, "members"), ["ada", "bob", "watcher"]);
    assert_eq!(v["members"][0], json!({"sub": "ada", "info": {"name": "Ada L."}, "conns": 1}));
    ada.request("#u#-/room/a").await;
    assert_eq!(change(&mut w).await.1, json!({"leave": [{"sub": "ada"}], "count": 1}));
    bob.close().await;
    assert_eq!(change(&mut w).await.1, json!({"leave": [{"sub": "bob"}], "count": 0}));

    // bob joins first, then ada; bob leaves first.
    let mut bob = connect(&server, &bob_token).await;
    bob.subscribe("/room/b").await;
    assert_eq!(change(&mut w).await, ("/room/b".into(), json!({"join": [{"sub": "bob"}], "count": 1})));
    ada.subscribe("/room/b").await;
    assert_eq!(change(&mut w).await.1, json!({"join": [{"sub": "ada", "info": {"name": "Ada L."}}], "count": 2}));
    // A second watcher now gets both in its snapshot, per channel, with the subtree count.
    let mut w2 = connect(&server, &admin).await;
    let (snapshot, end, _) = presence_cmd(&mut w2, "#s#~+/room").await;
    assert_eq!(
        snapshot,
        [
            "^=/room:{\"count\":1,\"members\":[{\"sub\":\"watcher\",\"conns\":2}]}",
            "^=/room/b:{\"count\":2,\"members\":[{\"sub\":\"ada\",\"info\":{\"name\":\"Ada L.\"},\"conns\":1},{\"sub\":\"bob\",\"conns\":1}]}",
        ]
    );
    assert_eq!(end, "^./room:{\"count\":3}");
    // w2 is one more connection of "watcher" at /room: not a join.
    assert_eq!(change_within(&mut w, Duration::from_millis(400)).await, None);
    bob.request("#u#-/room/b").await;
    for watcher in [&mut w, &mut w2] {
        assert_eq!(change(watcher).await, ("/room/b".into(), json!({"leave": [{"sub": "bob"}], "count": 1})));
    }
    // A join and a leave within one tick cancel out: nothing is sent.
    bob.send("+/room/c").await;
    bob.send("-/room/c").await;
    bob.request("##@").await;
    ada.request("#u#-/room/b").await;
    assert_eq!(change(&mut w).await, ("/room/b".into(), json!({"leave": [{"sub": "ada"}], "count": 0})));
    assert_eq!(change_within(&mut w, Duration::from_millis(400)).await, None, "bob's join and leave of /room/c cancelled out");
    // Unsubscribing ends the watch too.
    w2.request("#u#-/room").await;
    ada.subscribe("/room/d").await;
    assert!(change(&mut w).await.0 == "/room/d");
    assert_eq!(change_within(&mut w2, Duration::from_millis(400)).await, None, "no more changes after -/room");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_of_one_sub_are_one_member() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let admin = token("backend", &["/"], None);
    let mut w = connect(&server, &admin).await;
    presence_cmd(&mut w, "#w#~+/chat").await;
    let mut tabs = Vec::new();
    for i in 0..3 {
        let mut tab = connect(&server, &token("ada", &["/chat"], Some(json!({"tab": i})))).await;
        tab.subscribe("/chat/lobby").await;
        tabs.push(tab);
    }
    assert_eq!(change(&mut w).await.1, json!({"join": [{"sub": "ada", "info": {"tab": 0}}], "count": 1}));
    assert_eq!(change_within(&mut w, Duration::from_millis(400)).await, None, "the other tabs are the same member");
    let (_, v, _) = get_presence(&server, "/presence/chat/lobby", Some(&admin)).await;
    assert_eq!(v, json!({"count": 1, "members": [{"sub": "ada", "info": {"tab": 2}, "conns": 3}], "next": null}), "info of the latest");
    let (snapshot, ..) = presence_cmd(&mut w, "#q#~?/chat").await;
    assert_eq!(
        snapshot,
        [
            "^=/chat:{\"count\":1,\"members\":[{\"sub\":\"backend\",\"conns\":1}]}",
            "^=/chat/lobby:{\"count\":1,\"members\":[{\"sub\":\"ada\",\"info\":{\"tab\":2},\"conns\":3}]}"
        ]
    );
    // One tab subscribed twice, and at two channels: conns summed over the subtree.
    tabs[0].subscribe("/chat/lobby").await;
    tabs[0].subscribe("/chat/other").await;
    assert_eq!(change(&mut w).await, ("/chat/other".into(), json!({"join": [{"sub": "ada", "info": {"tab": 0}}], "count": 1})));
    let (_, v, _) = get_presence(&server, "/presence/chat", Some(&admin)).await;
    assert_eq!(ids(&v, "members"), ["ada", "backend"], "the watcher is subscribed at /chat");
    assert_eq!(v["members"][0]["conns"], 4);
    // Closing tabs: the member leaves with its last connection.
    tabs.pop().unwrap().close().await;
    tabs.pop().unwrap().close().await;
    assert_eq!(change_within(&mut w, Duration::from_millis(400)).await, None);
    tabs.pop().unwrap().close().await;
    let mut got = BTreeMap::new();
    for _ in 0..2 {
        let (c, v) = change(&mut w).await;
        got.insert(c, v);
    }
    assert_eq!(got["/chat/lobby"], json!({"leave": [{"sub": "ada"}], "count": 0}));
    assert_eq!(got["/chat/other"], json!({"leave": [{"sub": "ada"}], "count": 0}));
    let (_, v, _) = get_presence(&server, "/presence/chat/lobby?count", Some(&admin)).await;
    assert_eq!(v, json!({"count": 0}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_members_of_their_own() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let mut w = Client::connect(&server.ws_url()).await;
    presence_cmd(&mut w, "#w#~+/public").await;
    let mut a = Client::connect(&server.ws_url()).await;
    a.subscribe("/public/room").await;
    let (_, first) = change(&mut w).await;
    let id = ids(&first, "join")[0].clone();
    assert!(id.len() == 5 + 16 && id[5..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let mut b = Client::connect(&server.ws_url()).await;
    b.subscribe("/public/room").await;
    let (_, second) = change(&mut w).await;
    assert_ne!(ids(&second, "join"), ids(&first, "join"), "each connection its own member");
    assert_eq!(second["count"], 2);
    let (status, v, r) = get_presence(&server, "/presence/public/room", None).await;
    assert_eq!(status, 200, "anonymous read of /public");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m["conns"] == 1 && m.get("info").is_none() && m["anon"].as_str().unwrap().len() == 16));
    // The watcher itself is an anonymous member of /public.
    assert_eq!(get_presence(&server, "/presence/public?count", None).await.1, json!({"count": 3}));
    // An anonymous "reload" is a leave and a join (anonymous ids are per connection).
    b.close().await;
    let mut b = Client::connect(&server.ws_url()).await;
    b.subscribe("/public/room").await;
    let mut joins = 0;
    let mut leaves = 0;
    while joins + leaves < 2 {
        let (_, v) = change(&mut w).await;
        joins += ids(&v, "join").len();
        leaves += ids(&v, "leave").len();
    }
    assert_eq!((joins, leaves), (1, 1));
    server.stop().await;

    // Auth off: every connection is anonymous.
    let dir = temp_dir();
    let open = TestServer::start(config(dir.path())).await;
    let mut c = Client::connect(&open.ws_url()).await;
    let (snapshot, end, reply) = presence_cmd(&mut c, "#x#~+/a").await;
    assert_eq!(snapshot.len(), 1, "itself: {snapshot:?}");
    let (_, v) = parse(&snapshot[0]);
    assert_eq!((v["count"].clone(), v["members"][0]["conns"].clone()), (json!(1), json!(1)));
    assert!(v["members"][0]["anon"].is_string());
    assert_eq!(end, "^./a:{\"count\":1}");
    assert!(reply.starts_with("#x#@"));
    let r = http_get(open.addr, "/presence/a", &[]).await;
    assert_eq!(r.status, 200);
    open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_within_the_linger_announces_nothing_and_a_leave_comes_after_it() {
    let dir = temp_dir();
    let linger = Duration::from_millis(1500);
    let server = server(dir.path(), linger, |c| c).await;
    let admin = token("backend", &["/"], None);
    let mut w = connect(&server, &admin).await;
    presence_cmd(&mut w, "#w#~+/room").await;
    let ada = token("ada", &["/room"], None);
    let mut tab = connect(&server, &ada).await;
    tab.subscribe("/room").await;
    assert_eq!(change(&mut w).await.1["join"][0]["sub"], "ada");
    // A reload: the connection closes, a new one subscribes within the linger.
    tab.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, v, _) = get_presence(&server, "/presence/room", Some(&admin)).await;
    assert_eq!(v["members"][0], json!({"sub": "ada", "conns": 0}), "lingering: still a member, no connection");
    let mut tab = connect(&server, &ada).await;
    tab.subscribe("/room").await;
    assert_eq!(change_within(&mut w, linger + Duration::from_millis(500)).await, None, "no leave, no join");
    // An unsubscribe lingers too: the leave comes after the linger.
    let left = Instant::now();
    tab.request("#u#-/room").await;
    let (_, v) = change(&mut w).await;
    let took = left.elapsed();
    assert_eq!(v, json!({"leave": [{"sub": "ada"}], "count": 1}));
    assert!(took >= linger - Duration::from_millis(100) && took < linger + Duration::from_secs(2), "{took:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_is_gone_after_the_detection_and_the_linger() {
    let dir = temp_dir();
    let linger = Duration::from_millis(500);
    let ping = Duration::from_millis(500);
    let server = server(dir.path(), linger, |c| c.ping_interval(ping)).await;
    let admin = token("backend", &["/"], None);
    let mut w = connect(&server, &admin).await;
    presence_cmd(&mut w, "#w#~+/room").await;
    // Its TCP connection dropped with no close frame.
    let mut dropped = connect(&server, &token("ada", &["/room"], None)).await;
    dropped.subscribe("/room").await;
    assert_eq!(change(&mut w).await.1["join"][0]["sub"], "ada");
    let t = Instant::now();
    drop(dropped);
    let (_, v) = change(&mut w).await;
    assert_eq!(v["leave"][0]["sub"], "ada");
    assert!(t.elapsed() < linger + Duration::from_secs(2), "{:?}", t.elapsed());
    // Half-open: the bytes stop (a vanished host), only the ping timeout can tell.
    let proxy = FaultProxy::start(server.addr).await;
    let mut silent = Client::connect(&format!("{}/ws?token={}", proxy.url(), token("bob", &["/room"], None))).await;
    silent.subscribe("/room").await;
    assert_eq!(change(&mut w).await.1["join"][0]["sub"], "bob");
    let t = Instant::now();
    proxy.stall(true);
    let (_, v) = change(&mut w).await;
    let took = t.elapsed();
    assert_eq!(v["leave"][0]["sub"], "bob");
    // The bound of docs/PROTOCOL.md 5.10: two ping intervals, the linger, a tick.
    assert!(took >= linger && took < 2 * ping + linger + Duration::from_secs(1), "{took:?}");
    // w answered every ping meanwhile: still there.
    assert_eq!(get_presence(&server, "/presence/room?count", Some(&admin)).await.1, json!({"count": 1}));
    drop(silent);
    server.stop().await;
}

fn server_flags(linger: &str) -> Vec<String> {
    ["--auth-hmac-secret", SECRET, "--presence-linger", linger].iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_presence_fills_up_again_as_members_reconnect() {
    let dir = temp_dir();
    let flags = server_flags("1");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let first = ServerProcess::start_sled(dir.path(), &flags).await;
    let url = |s: &ServerProcess, sub: &str| format!("{}?token={}", s.ws_url(), token(sub, &["/"], None));
    let mut members = Vec::new();
    for sub in ["ada", "bob", "eve"] {
        let mut c = Client::connect(&url(&first, sub)).await;
        c.subscribe("/room").await;
        members.push(c);
    }
    let admin = token("backend", &["/"], None);
    let count = |s: &ServerProcess| {
        let addr = s.addr;
        let auth = format!("Bearer {admin}");
        async move { serde_json::from_slice::<Value>(&http_get(addr, "/presence/room?count", &[("Authorization", &auth)]).await.body).unwrap() }
    };
    assert_eq!(count(&first).await, json!({"count": 3}));
    first.kill().await;
    for c in &mut members {
        assert!(matches!(c.next_within(Duration::from_secs(5)).await, Got::Ended | Got::Close(..)));
    }
    let second = ServerProcess::start_sled(dir.path(), &flags).await;
    assert_eq!(count(&second).await, json!({"count": 0}), "presence is not persisted");
    let mut w = Client::connect(&url(&second, "backend")).await;
    let (snapshot, end, _) = presence_cmd(&mut w, "#w#~+/room").await;
    assert_eq!(snapshot.len(), 1);
    assert_eq!(end, "^./room:{\"count\":1}", "the watcher alone");
    let mut back = Vec::new();
    for sub in ["ada", "bob", "eve"] {
        let mut c = Client::connect(&url(&second, sub)).await;
        c.subscribe("/room").await;
        back.push(c);
    }
    let mut joined = BTreeSet::new();
    while joined.len() < 3 {
        let (_, v) = change(&mut w).await;
        joined.extend(ids(&v, "join"));
    }
    assert_eq!(joined, ["ada", "bob", "eve"].into_iter().map(String::from).collect());
    assert_eq!(count(&second).await, json!({"count": 4}));
    // A re-watch after the restart gives the full view in one snapshot.
    let mut w2 = Client::connect(&url(&second, "observer")).await;
    let (snapshot, ..) = presence_cmd(&mut w2, "#q#~?/room").await;
    let (_, v) = parse(&snapshot[0]);
    assert_eq!(ids(&v, "members"), ["ada", "backend", "bob", "eve"]);
    second.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_sends_each_member_a_bounded_number_of_lines() {
    const MEMBERS: usize = 1000;
    let dir = temp_dir();
    let server = server(dir.path(), Duration::from_secs(5), |c| c.presence_max_list(100).max_connections(MEMBERS + 10)).await;
    let url = server.ws_url();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..MEMBERS {
        let t = token(&format!("m{i:04}"), &["/room"], Some(json!({"n": i})));
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&format!("{url}?token={t}")).await;
            c.send("#w#~+/room").await;
            // Every presence line until the view holds every member.
            let (mut lines, mut bytes, mut count) = (0usize, 0usize, 0u64);
            let mut replied = false;
            while count < MEMBERS as u64 || !replied {
                let line = match c.next_within(Duration::from_secs(60)).await {
                    Got::Line(l) => l,
                    other => panic!("member {i}: {other:?}"),
                };
                if line.starts_with("#w#@") {
                    replied = true;
                    continue;
                }
                assert!(line.starts_with('^'), "{line}");
                lines += 1;
                bytes += line.len();
                let (_, v) = parse(&line);
                if line.starts_with("^=") || line.starts_with("^~") {
                    count = v["count"].as_u64().unwrap();
                    if count > 100 {
                        assert!(v.get("members").is_none() && v.get("join").is_none(), "counts only above the list limit: {line}");
                    }
                }
            }
            (lines, bytes, c)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let took = started.elapsed();
    let ticks = (took.as_millis() / 100) as usize + 1;
    let max_lines = results.iter().map(|r| r.0).max().unwrap();
    let total_bytes: usize = results.iter().map(|r| r.1).sum();
    println!("storm of {MEMBERS}: {took:?}, {ticks} ticks, at most {max_lines} lines per member, {total_bytes} bytes in all");
    // A snapshot line, its end line, then at most one change line per tick.
    assert!(max_lines <= ticks + 2, "{max_lines} lines for {ticks} ticks");
    assert!(max_lines < MEMBERS / 4, "not a line per join");
    let admin = token("backend", &["/"], None);
    assert_eq!(get_presence(&server, "/presence/room?count", Some(&admin)).await.1, json!({"count": MEMBERS}));
    // The metrics: members summed over channels, and the lines sent.
    let metrics = http_get(server.addr, "/metrics", &[]).await.text();
    assert!(metrics.lines().any(|l| l == format!("ivy_presence_members {MEMBERS}")), "{metrics}");
    let lines: u64 = metrics.lines().find_map(|l| l.strip_prefix("ivy_presence_lines_total ")).unwrap().parse().unwrap();
    assert!(lines >= 2 * MEMBERS as u64, "{lines}");
    // Paging through all of them: 1000 members in pages of 300, in order, each once.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let target = format!("/presence/room?limit=300{after}");
        let (status, v, _) = get_presence(&server, &target, Some(&admin)).await;
        assert_eq!(status, 200);
        seen.extend(ids(&v, "members"));
        match v["next"].as_str() {
            Some(next) => after = format!("&after={}", next.replace('=', "%3D")),
            None => break,
        }
    }
    assert_eq!(seen, (0..MEMBERS).map(|i| format!("m{i:04}")).collect::<Vec<_>>());
    drop(results);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_who_may_watch_query_and_read_presence() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let chat = token("ada", &["/chat"], None);
    let mut ada = connect(&server, &chat).await;
    let (_, end, _) = presence_cmd(&mut ada, "#1#~+/chat/a").await;
    assert_eq!(end, "^./chat/a:{\"count\":1}");
    for cmd in ["#2#~+/", "#3#~?/other", "#4#~+/chatter"] {
        let reply = ada.request(cmd).await;
        assert!(reply.starts_with(&format!("{}!forbidden the token of \"ada\" has no read grant covering ", &cmd[..3])), "{reply}");
    }
    assert_eq!(ada.request("#5#~x/chat").await, "#5#!malformed unknown presence command (expected ~+path or ~?path)");
    assert_eq!(ada.request("#6#~+/Chat").await, "#6#!bad-path invalid character 'C' at byte 1 of path (allowed: a-z 0-9 . - /)");
    // A one-off query subscribes to nothing: no event reaches it afterwards.
    let mut q = connect(&server, &token("bob", &["/"], None)).await;
    let (snapshot, end, reply) = presence_cmd(&mut q, "#q#~?/chat").await;
    assert_eq!(snapshot, ["^=/chat/a:{\"count\":1,\"members\":[{\"sub\":\"ada\",\"conns\":1}]}"]);
    assert_eq!(end, "^./chat:{\"count\":1}");
    assert!(reply.starts_with("#q#@"));
    ada.publish("/chat/a", "hello").await;
    q.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(get_presence(&server, "/presence/chat?count", Some(&token("bob", &["/"], None))).await.1, json!({"count": 1}));

    // HTTP: as the log.
    let (status, _, r) = get_presence(&server, "/presence/chat", None).await;
    assert_eq!(status, 401, "no token, no anonymous grant: {}", r.text());
    assert!(r.text().starts_with("a token is needed: without a token there is no read grant covering /chat"), "{}", r.text());
    let (status, v, _) = get_presence(&server, "/presence/chat/a", Some(&chat)).await;
    assert_eq!((status, v["count"].clone()), (200, json!(1)));
    let (status, _, r) = get_presence(&server, "/presence/", Some(&chat)).await;
    assert_eq!(status, 403, "{}", r.text());
    assert_eq!(r.text(), "the token of \"ada\" has no read grant covering / (a subscription delivers the path's whole subtree)\n");
    assert_eq!(get_presence(&server, "/presence/chat", Some("not.a.token")).await.0, 401);
    assert_eq!(get_presence(&server, "/presence/chat", Some(&token("eve", &["/x"], Some(json!("eve"))))).await.0, 401);
    let (status, v, _) = get_presence(&server, "/presence", Some("backend-key")).await;
    assert_eq!((status, v["count"].clone()), (200, json!(1)), "the API key reads every path (ada; bob only queried)");
    let r = http_get(server.addr, &format!("/presence/chat?token={chat}"), &[]).await;
    assert_eq!(r.status, 200, "?token= as for the log");
    for (target, reason) in [
        ("/presence/chat?limit=0", "invalid limit: \"0\" (expected 1 to 1000)\n"),
        ("/presence/chat?after=ada", "invalid after: \"ada\" is not a cursor of this endpoint\n"),
        ("/presence/Chat", "invalid path: invalid character 'C' at byte 1 of path (allowed: a-z 0-9 . - /)\n"),
    ] {
        let r = http_get(server.addr, target, &[("Authorization", &format!("Bearer {chat}"))]).await;
        assert_eq!((r.status, r.text().as_str()), (400, reason), "{target}");
    }
    // Paging: one member a page.
    let mut bob = connect(&server, &token("bob", &["/chat"], None)).await;
    bob.subscribe("/chat/b").await;
    let (_, v, _) = get_presence(&server, "/presence/chat?limit=1", Some(&chat)).await;
    assert_eq!(v, json!({"count": 2, "members": [{"sub": "ada", "conns": 1}], "next": "=ada"}));
    let (_, v, _) = get_presence(&server, "/presence/chat?limit=1&after=%3Dada", Some(&chat)).await;
    assert_eq!(v, json!({"count": 2, "members": [{"sub": "bob", "conns": 1}], "next": null}));
    // A token whose info claim is not a small object is refused, at the handshake and in-band.
    let bad = token("eve", &["/chat"], Some(json!({"bio": "x".repeat(2000)})));
    let r = ivy_tests::raw_ws_open_at(server.addr, &format!("/ws?token={bad}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap().0;
    assert_eq!((r.status, r.text().as_str()), (401, "info claim must be a JSON object of at most 1024 bytes\n"));
    let mut anon = Client::connect(&server.ws_url()).await;
    assert_eq!(anon.request(&format!("#r#&{bad}")).await, "#r#!unauthorized info claim must be a JSON object of at most 1024 bytes");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_watching_the_root_gets_every_change_once() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let mut backend = connect(&server, &token("backend", &["/"], None)).await;
    presence_cmd(&mut backend, "#1#~+/").await;
    presence_cmd(&mut backend, "#2#~+/chat").await;
    presence_cmd(&mut backend, "#3#~+/chat/a").await;
    // (Its own joins at /chat and /chat/a came before the replies, as it watched / already.)
    assert_eq!(change_within(&mut backend, Duration::from_millis(300)).await, None);
    let mut ada = connect(&server, &token("ada", &["/"], Some(json!({"role": "admin"})))).await;
    // (The backend is present at /chat and /chat/a itself.)
    for (p, n) in [("/chat/a", 2), ("/games/x/y", 1), ("/chat", 2)] {
        ada.subscribe(p).await;
        let (c, v) = change(&mut backend).await;
        assert_eq!((c.as_str(), v), (p, json!({"join": [{"sub": "ada", "info": {"role": "admin"}}], "count": n})));
        assert_eq!(change_within(&mut backend, Duration::from_millis(300)).await, None, "once, though watched three times");
    }
    // An in-band token taken by an anonymous connection makes it that member.
    let mut late = Client::connect(&server.ws_url()).await;
    late.subscribe("/public/x").await;
    let (_, v) = change(&mut backend).await;
    let anon = ids(&v, "join")[0].clone();
    assert!(anon.starts_with("anon:"));
    assert!(late.request(&format!("#r#&{}", token("zed", &["/"], None))).await.starts_with("#r#@"));
    let (c, v) = change(&mut backend).await;
    assert_eq!(c, "/public/x");
    assert_eq!((ids(&v, "join"), ids(&v, "leave")), (vec!["zed".to_string()], vec![anon]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_client_gets_exactly_the_bytes_it_got_before() {
    let dir = temp_dir();
    let server = server(dir.path(), Duration::ZERO, |c| c).await;
    let everything = token("old", &["/"], None);
    // The old client: subscribes, receives events; never sends '~'.
    let mut old = connect(&server, &everything).await;
    let at = old.subscribe("/room").await;
    assert_eq!(at.len(), 20);
    let mut watcher = connect(&server, &token("watcher", &["/"], None)).await;
    presence_cmd(&mut watcher, "#w#~+/room").await;
    let mut ada = connect(&server, &token("ada", &["/room"], Some(json!({"n": 1})))).await;
    ada.subscribe("/room/a").await;
    assert_eq!(change(&mut watcher).await.0, "/room/a");
    let ts = ada.publish("/room/a", "hi:there%").await;
    ada.request("#u#-/room/a").await;
    assert_eq!(change(&mut watcher).await.0, "/room/a");
    let mut bob = connect(&server, &token("bob", &["/room"], None)).await;
    bob.subscribe("/room").await;
    assert_eq!(change(&mut watcher).await.0, "/room");
    bob.close().await;
    // The watcher saw joins and leaves; the old client only the event, byte for byte.
    assert_eq!(old.recv().await, format!("@{ts}:/room/a:hi:there%25"));
    old.expect_silence(Duration::from_millis(600)).await;
    assert_eq!(change(&mut watcher).await.1, json!({"leave": [{"sub": "bob"}], "count": 2}));
    assert_eq!(old.request("#t#@").await.len(), "#t#@".len() + 20);
    server.stop().await;
}
