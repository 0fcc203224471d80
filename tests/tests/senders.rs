//! Verified senders (issue 13, part B; `docs/PROTOCOL.md` 2.6, 6.1.1 and 9.9): real servers on
//! 127.0.0.1, real tokens minted here (as in `auth.rs`). A connection that asks for
//! `ext=sender` gets `@ts~sender:/path:data`, where the sender is what the server verified (a
//! token's `sub`, `-` without a token, `*` for the application, `?` for events stored before
//! senders were); every other connection and log read gets exactly the original bytes.
//! On the engine of `IVY_TEST_ENGINE` (sled or memory) but for the tests of stored files.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use ivy_client_native::{LogQuery, LogReader, Sender, Start};
use ivy_server::auth::Secret;
use ivy_tests::{Client, Got, TestServer, config, http_get, ivy_bin, raw_ws_open_at, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "iat": now(), "exp": now() + 3600, "read": ["/chat"], "write": ["/chat"]});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"secret")).unwrap()
}

/// Auth on (one HMAC secret); anonymous read of `/chat` and write of `/chat/open`.
fn auth_setup(dir: &std::path::Path) -> ivy_tests::Setup {
    let mut setup = config(dir);
    setup.config = setup
        .config
        .clone()
        .auth_hmac_secrets(vec![Secret::new("secret")])
        .anonymous_read(vec!["/chat".into()])
        .anonymous_write(vec!["/chat/open".into()]);
    setup
}

/// `#1#:path:data` from `c`: the event's timestamp, from its ack.
async fn send(c: &mut Client, path: &str, data: &str) -> String {
    let ack = c.request(&format!("#1#:{path}:{data}")).await;
    ack.strip_prefix("#1#@").unwrap_or_else(|| panic!("not an ack: {ack}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_in_receivers_get_the_verified_sender_and_the_others_the_original_line() {
    let dir = temp_dir();
    let server = TestServer::start(auth_setup(dir.path())).await;
    let ws = server.ws_url();
    // The handshake names the extensions taken; unknown names are ignored.
    for (query, want) in [("ext=sender", Some("sender")), ("ext=presence,sender", Some("sender")), ("ext=presence", None), ("", None)] {
        let (r, _) = raw_ws_open_at(server.addr, &format!("/ws?{query}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap();
        assert_eq!(r.status, 101, "{query}");
        assert_eq!(r.header("ivy-extensions"), want, "{query}");
    }
    let mut with = Client::connect(&format!("{ws}?ext=sender")).await;
    let mut without = Client::connect(&ws).await;
    with.subscribe("/chat").await;
    without.subscribe("/chat").await;

    let mut ada = Client::connect(&format!("{ws}?token={}", token("ada"))).await;
    // Data that looks like a sender is data.
    let t1 = send(&mut ada, "/chat/room", "hi~=bob:x").await;
    assert_eq!(with.recv().await, format!("@{t1}~=ada:/chat/room:hi~=bob:x"));
    assert_eq!(without.recv().await, format!("@{t1}:/chat/room:hi~=bob:x"));

    let mut anonymous = Client::connect(&ws).await;
    let t2 = send(&mut anonymous, "/chat/open", "anon").await;
    assert_eq!(with.recv().await, format!("@{t2}~-:/chat/open:anon"));
    assert_eq!(without.recv().await, format!("@{t2}:/chat/open:anon"));

    // A sub with the characters the line escapes.
    let odd = "a:b%c\nd\re ~=bob";
    let mut odd_client = Client::connect(&format!("{ws}?token={}", token(odd))).await;
    let t3 = send(&mut odd_client, "/chat", "x").await;
    assert_eq!(with.recv().await, format!("@{t3}~=a%3Ab%25c%0Ad%0De ~=bob:/chat:x"));
    assert_eq!(without.recv().await, format!("@{t3}:/chat:x"));
    let line = format!("@{t3}~=a%3Ab%25c%0Ad%0De ~=bob:/chat:x");
    let parsed = ivy_client_core::wire::parse_event(line.as_bytes()).unwrap();
    assert_eq!(parsed.sender, Some(ivy_client_core::wire::Sender::User(odd.into())));

    // Forging: a path cannot carry a sender, and the ext parameter is only read at the handshake.
    let refused = ada.request("#2#:/chat/room~=bob:x").await;
    assert!(refused.starts_with("#2#!bad-path"), "{refused}");
    with.expect_silence(Duration::from_millis(200)).await;

    // A sub longer than 256 bytes is refused at the handshake.
    let long = token(&"x".repeat(257));
    let (r, _) = raw_ws_open_at(server.addr, &format!("/ws?token={long}"), &[("Sec-WebSocket-Protocol", "ivy1")]).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "invalid token: sub longer than 256 bytes\n");
    let (r, _) = raw_ws_open_at(server.addr, &format!("/ws?token={}", token(&"y".repeat(256))), &[("Sec-WebSocket-Protocol", "ivy1")])
        .await
        .unwrap();
    assert_eq!(r.status, 101, "256 bytes are allowed");

    // The log: the original bytes without the parameter, the extended lines with it; each
    // with its own stable ETag.
    let plain = http_get(server.addr, "/log/chat", &[]).await;
    let ext = http_get(server.addr, "/log/chat?ext=sender", &[]).await;
    assert_eq!(plain.text(), format!("@{t1}:/chat/room:hi~=bob:x\n@{t2}:/chat/open:anon\n@{t3}:/chat:x"));
    assert_eq!(ext.text(), format!("@{t1}~=ada:/chat/room:hi~=bob:x\n@{t2}~-:/chat/open:anon\n@{t3}~=a%3Ab%25c%0Ad%0De ~=bob:/chat:x"));
    assert_eq!(plain.header("ivy-extensions"), None);
    assert_eq!(ext.header("ivy-extensions"), Some("sender"));
    let (tag, ext_tag) = (plain.header("etag").unwrap().to_string(), ext.header("etag").unwrap().to_string());
    assert_ne!(tag, ext_tag);
    assert_eq!(http_get(server.addr, "/log/chat", &[]).await.header("etag"), Some(tag.as_str()));
    assert_eq!(http_get(server.addr, "/log/chat?ext=sender", &[]).await.header("etag"), Some(ext_tag.as_str()));
    let again = http_get(server.addr, "/log/chat?ext=sender", &[("If-None-Match", &ext_tag)]).await;
    assert_eq!(again.status, 304);
    let stale = http_get(server.addr, "/log/chat?ext=sender", &[("If-None-Match", &tag)]).await;
    assert_eq!(stale.status, 200, "the original body's tag does not validate the extended one");
    // Pages: the next link keeps the parameter; an immutable page stays immutable.
    let page = http_get(server.addr, "/log/chat?limit=2&ext=sender", &[]).await;
    assert_eq!(page.text(), format!("@{t1}~=ada:/chat/room:hi~=bob:x\n@{t2}~-:/chat/open:anon"));
    assert_eq!(page.header("link"), Some(format!("</log/chat?after={t2}&limit=2&ext=sender>; rel=\"next\"").as_str()));
    assert_eq!(page.header("cache-control"), Some("public, max-age=31536000, immutable"));
    let last = http_get(server.addr, "/log/chat?n=1&ext=sender", &[]).await;
    assert_eq!(last.text(), format!("@{t3}~=a%3Ab%25c%0Ad%0De ~=bob:/chat:x"));
    // CORS lets browsers read the header.
    let cors = http_get(server.addr, "/log/chat?ext=sender", &[("Origin", "http://app.example")]).await;
    assert!(cors.header("access-control-expose-headers").unwrap().contains("Ivy-Extensions"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_everyone_is_anonymous_and_the_application_is_star() {
    let dir = temp_dir();
    let ivy = Arc::new(config(dir.path()).builder().open().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, stop) = (ivy.router(), ivy.stop_signal());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.unwrap();
    });
    let mut with = Client::connect(&format!("ws://{addr}/ws?ext=sender")).await;
    with.subscribe("/").await;
    // A token is ignored with auth off: the sender is anonymous.
    let mut c = Client::connect(&format!("ws://{addr}/ws?token={}", token("ada"))).await;
    let t1 = send(&mut c, "/a", "x").await;
    assert_eq!(with.recv().await, format!("@{t1}~-:/a:x"));
    let t2 = ivy.publish("/a/b", "from the app").await.unwrap();
    assert_eq!(with.recv().await, format!("@{t2}~*:/a/b:from the app"));
    assert_eq!(http_get(addr, "/log/a?ext=sender", &[]).await.text(), format!("@{t1}~-:/a:x\n@{t2}~*:/a/b:from the app"));
    assert_eq!(http_get(addr, "/log/a", &[]).await.text(), format!("@{t1}:/a:x\n@{t2}:/a/b:from the app"));
    ivy.stop_signal().cancel();
    task.await.unwrap();
    ivy.shutdown().await;
}

/// A connection whose queue overflows catches up from the log: with `ext=sender` it gets the
/// extended lines there too, exactly as live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_from_the_log_keeps_the_extended_lines() {
    let dir = temp_dir();
    let mut setup = auth_setup(dir.path());
    setup.queue_length = 4;
    let server = TestServer::start(setup).await;
    let ws = server.ws_url();
    let mut slow = Client::connect(&format!("{ws}?ext=sender")).await;
    let mut plain = Client::connect(&ws).await;
    slow.subscribe("/chat").await;
    plain.subscribe("/chat").await;
    let mut ada = Client::connect(&format!("{ws}?token={}", token("ada"))).await;
    let mut anon = Client::connect(&ws).await;
    // Pipelined, unread by the subscribers: their queues overflow.
    for i in 0..300 {
        let (c, path) = if i % 3 == 0 { (&mut anon, "/chat/open") } else { (&mut ada, "/chat/a") };
        c.send(&format!(":{path}:{i}")).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let (line, ext) = (plain.recv().await, slow.recv().await);
        // Both in timestamp order: the same event.
        let (ts, rest) = line.trim_start_matches('@').split_once(':').unwrap();
        let n: u32 = rest.rsplit(':').next().unwrap().parse().unwrap();
        let (path, who) = if n % 3 == 0 { ("/chat/open", "-") } else { ("/chat/a", "=ada") };
        assert_eq!(line, format!("@{ts}:{path}:{n}"));
        assert_eq!(ext, format!("@{ts}~{who}:{path}:{n}"));
        assert!(seen.insert(n), "{n} twice");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_client_and_the_cli_show_senders() {
    let dir = temp_dir();
    let server = TestServer::start(auth_setup(dir.path())).await;
    let url = format!("ws://{}", server.addr);
    let ada = ivy_client_native::Client::builder(&url).token(token("ada")).senders(true).connect().await.unwrap();
    let plain = ivy_client_native::Client::builder(&url).token(token("bob")).connect().await.unwrap();
    let mut sub = ada.subscribe_from("/chat", Start::Beginning).await.unwrap();
    let mut plain_sub = plain.subscribe_from("/chat", Start::Beginning).await.unwrap();
    let t1 = plain.send("/chat/x", "from bob").await.unwrap();
    let t2 = ada.send("/chat/y", "from ada").await.unwrap();
    let e = sub.next().await.unwrap().unwrap();
    assert_eq!((e.ts, e.sender()), (t1, Some(&Sender::User("bob".into()))));
    let e = plain_sub.next().await.unwrap().unwrap();
    assert_eq!((e.ts, e.sender()), (t1, None));
    let anon = Client::connect(&server.ws_url()).await;
    let mut anon = anon;
    let t3 = send(&mut anon, "/chat/open", "anon").await;
    // Backfill from the log (a new subscription from the beginning) has them too.
    let mut from_log = ada.subscribe_from("/chat", Start::Beginning).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = from_log.next().await.unwrap().unwrap();
        seen.push((e.ts.to_string(), e.sender.clone()));
    }
    assert_eq!(
        seen,
        vec![
            (t1.to_string(), Some(Sender::User("bob".into()))),
            (t2.to_string(), Some(Sender::User("ada".into()))),
            (t3.clone(), Some(Sender::Anonymous))
        ]
    );
    let logs = LogReader::new(&url).unwrap().senders(true);
    let events = logs.log("/chat", LogQuery::All).await.unwrap();
    let senders: Vec<_> = events.iter().map(|e| e.sender.clone()).collect();
    assert_eq!(senders, vec![Some(Sender::User("bob".into())), Some(Sender::User("ada".into())), Some(Sender::Anonymous)]);
    let events = LogReader::new(&url).unwrap().log("/chat", LogQuery::All).await.unwrap();
    assert!(events.iter().all(|e| e.sender.is_none()));

    // The CLI.
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(ivy_bin()).args(&args).env_remove("IVY_TOKEN").output();
        let out = tokio::time::timeout(Duration::from_secs(30), out).await.unwrap().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let args = |rest: &[&str]| -> Vec<String> { ["--url", &url].iter().chain(rest).map(|s| s.to_string()).collect() };
    let json_lines = |out: String| -> Vec<Value> { out.lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
    let log = json_lines(run(args(&["log", "/chat", "--senders", "--json"])).await);
    let senders: Vec<&Value> = log.iter().map(|v| &v["sender"]).collect();
    assert_eq!(senders, [&json!({"sub": "bob"}), &json!({"sub": "ada"}), &json!("anonymous")]);
    assert!(json_lines(run(args(&["log", "/chat", "--json"])).await).iter().all(|v| v.get("sender").is_none()));
    let lines = run(args(&["log", "/chat", "--senders"])).await;
    assert_eq!(lines, format!("@{t1}~=bob:/chat/x:from bob\n@{t2}~=ada:/chat/y:from ada\n@{t3}~-:/chat/open:anon\n"));
    let sub = json_lines(run(args(&["sub", "/chat", "--from-beginning", "--count", "3", "--senders", "--json"])).await);
    assert_eq!(sub.iter().map(|v| &v["sender"]).collect::<Vec<_>>(), senders);
    let raw = run(args(&["log", "/chat", "--senders", "--raw"])).await;
    assert_eq!(raw, "from bob\nfrom ada\nanon\n");
    ada.close().await;
    plain.close().await;
    server.stop().await;
}

/// A sled store keeps the senders across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_survive_a_restart() {
    let dir = temp_dir();
    let server = TestServer::start(auth_setup(dir.path()).sled()).await;
    let mut ada = Client::connect(&format!("{}?token={}", server.ws_url(), token("ada"))).await;
    let t1 = send(&mut ada, "/chat/a", "1").await;
    let mut anon = Client::connect(&server.ws_url()).await;
    let t2 = send(&mut anon, "/chat/open", "2").await;
    let before = http_get(server.addr, "/log/chat?ext=sender", &[]).await.text();
    assert_eq!(before, format!("@{t1}~=ada:/chat/a:1\n@{t2}~-:/chat/open:2"));
    server.stop().await;
    let server = TestServer::start(auth_setup(dir.path()).sled()).await;
    assert_eq!(http_get(server.addr, "/log/chat?ext=sender", &[]).await.text(), before);
    assert_eq!(http_get(server.addr, "/log/chat/a?ext=sender", &[]).await.text(), format!("@{t1}~=ada:/chat/a:1"));
    assert_eq!(http_get(server.addr, "/log/chat", &[]).await.text(), format!("@{t1}:/chat/a:1\n@{t2}:/chat/open:2"));
    server.stop().await;
}

/// A store written by the layout 3 server (no senders: built here the way it wrote its blocks)
/// opens with its events' senders unknown (`?`), reads byte for byte as before without the
/// parameter, and takes new events with their senders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_3_store_is_read_with_unknown_senders() {
    let dir = temp_dir();
    let ts = |n: u32| ivy_client_core::Timestamp::new(1_700_000_000, n).unwrap();
    let events = [(ts(1), "/chat/a", "one"), (ts(2), "/chat", "two")];
    let mut lines = Vec::new();
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        db.insert(b"v", &b"3"[..]).unwrap();
        for (t, path, data) in events {
            let mut line = Vec::new();
            ivy_client_core::wire::encode_event(t, path, data.as_bytes(), &mut line);
            // A layout 3 entry: timestamp (12 bytes), the line's length (4 bytes), the line;
            // short lines on shallow paths are copied into every level's log.
            let mut entry = t.to_be_bytes().to_vec();
            entry.extend_from_slice(&(line.len() as u32).to_be_bytes());
            entry.extend_from_slice(&line);
            for anc in ivy_client_core::path::ancestors(path) {
                let mut key = if anc == "/" { b"b".to_vec() } else { [b"j", anc.as_bytes(), b"\0"].concat() };
                key.extend_from_slice(&t.to_be_bytes());
                db.insert(key, entry.clone()).unwrap();
            }
            lines.push(String::from_utf8(line).unwrap());
        }
        db.flush().unwrap();
    }
    let server = TestServer::start(auth_setup(dir.path()).sled()).await;
    assert_eq!(http_get(server.addr, "/log/chat", &[]).await.text(), lines.join("\n"));
    assert_eq!(
        http_get(server.addr, "/log/chat?ext=sender", &[]).await.text(),
        format!("@{}~?:/chat/a:one\n@{}~?:/chat:two", ts(1), ts(2))
    );
    let mut with = Client::connect(&format!("{}?ext=sender", server.ws_url())).await;
    with.subscribe("/chat").await;
    let mut anon = Client::connect(&server.ws_url()).await;
    let t3 = send(&mut anon, "/chat/open", "three").await;
    assert_eq!(with.recv().await, format!("@{t3}~-:/chat/open:three"));
    assert_eq!(
        http_get(server.addr, "/log/chat/a?ext=sender", &[]).await.text(),
        format!("@{}~?:/chat/a:one", ts(1)),
        "a channel's copy of an old line is unknown too"
    );
    assert_eq!(
        http_get(server.addr, "/log/chat?ext=sender", &[]).await.text(),
        format!("@{}~?:/chat/a:one\n@{}~?:/chat:two\n@{t3}~-:/chat/open:three", ts(1), ts(2))
    );
    match with.next_within(Duration::from_millis(100)).await {
        Got::Timeout => {}
        other => panic!("{other:?}"),
    }
    server.stop().await;
}
