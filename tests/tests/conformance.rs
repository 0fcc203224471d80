//! Conformance of the reference server with `docs/PROTOCOL.md` (which records the original
//! server's observed behaviour that we keep, and every difference): every decision, every
//! error case. Each test runs a real server on 127.0.0.1 port 0, on the engine of the
//! `IVY_TEST_ENGINE` switch (sled in a temporary directory by default).

use std::time::Duration;

use ivy_tests::{Client, Got, TestServer, config, http_get, log_text, temp_dir};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

const QUIET: Duration = Duration::from_millis(300);

fn is_ts(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20 && b[10] == b'.' && b.iter().enumerate().all(|(i, c)| i == 10 || c.is_ascii_digit())
}

/// Splits an event line into (timestamp, path, escaped data).
fn event(line: &str) -> (String, String, String) {
    let rest = line.strip_prefix('@').unwrap_or_else(|| panic!("not an event: {line:?}"));
    let (ts, rest) = rest.split_once(':').expect("ts");
    let (path, data) = rest.split_once(':').expect("path");
    assert!(is_ts(ts), "timestamp format {ts:?}");
    (ts.to_string(), path.to_string(), data.to_string())
}

#[tokio::test]
async fn subprotocol_is_echoed_and_optional() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let c = Client::connect(&server.ws_url()).await;
    assert_eq!(c.protocol.as_deref(), Some("ivy1"));
    let mut c2 = Client::connect_with(&server.ws_url(), None).await;
    assert_eq!(c2.protocol, None);
    let reply = c2.request("#t#@").await;
    assert!(reply.starts_with("#t#@") && is_ts(&reply[4..]), "{reply}");
    // Another subprotocol offered: accepted with none selected (tungstenite's client refuses
    // such a handshake itself, so check the raw response).
    let (status, headers) = ivy_tests::raw_handshake(server.addr, &[("Sec-WebSocket-Protocol", "other")]).await;
    assert_eq!(status, 101);
    assert!(!headers.iter().any(|(k, _)| k == "sec-websocket-protocol"), "{headers:?}");
    let (status, headers) = ivy_tests::raw_handshake(server.addr, &[("Sec-WebSocket-Protocol", "other, ivy1")]).await;
    assert_eq!(status, 101);
    assert!(headers.iter().any(|(k, v)| k == "sec-websocket-protocol" && v == "ivy1"), "{headers:?}");
    server.stop().await;
}

#[tokio::test]
async fn events_bubble_up_to_ancestors_only() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = server.ws_url();
    let mut subs = Vec::new();
    for path in ["/a/b/c", "/a/b", "/a", "/", "/ab", "/a/b/c/d", "/x"] {
        let mut c = Client::connect(&url).await;
        c.subscribe(path).await;
        subs.push((path, c));
    }
    let mut sender = Client::connect(&url).await;
    let ts = sender.publish("/a/b/c", "hello").await;
    let expected = format!("@{ts}:/a/b/c:hello");
    for (path, c) in &mut subs {
        if ["/a/b/c", "/a/b", "/a", "/"].contains(path) {
            assert_eq!(c.recv().await, expected, "subscriber of {path}");
        } else {
            c.expect_silence(QUIET).await;
        }
    }
    // The sender does not receive its own event.
    sender.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn sender_is_excluded_even_through_a_parent_subscription() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let mut b = Client::connect(&server.ws_url()).await;
    a.subscribe("/room").await;
    a.subscribe("/").await;
    b.subscribe("/room").await;
    let ts = a.publish("/room/x", "mine").await;
    a.expect_silence(QUIET).await;
    assert_eq!(b.recv().await, format!("@{ts}:/room/x:mine"));
    // The log still has it.
    assert_eq!(log_text(server.addr, "/log/room").await, format!("@{ts}:/room/x:mine"));
    server.stop().await;
}

#[tokio::test]
async fn one_delivery_per_connection_however_many_subscriptions_match() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    for p in ["/a", "/a/b", "/", "/a/b/c"] {
        r.subscribe(p).await;
    }
    let mut s = Client::connect(&server.ws_url()).await;
    let t1 = s.publish("/a/b/c", "1").await;
    let t2 = s.publish("/a", "2").await;
    assert_eq!(r.recv().await, format!("@{t1}:/a/b/c:1"));
    assert_eq!(r.recv().await, format!("@{t2}:/a:2"));
    r.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn every_acked_command_gets_exactly_one_reply() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let sub = c.request("#s1#+/a").await;
    assert!(sub.starts_with("#s1#@") && is_ts(&sub[5..]), "{sub}");
    let send = c.request("#p1#:/a:x").await;
    assert!(send.starts_with("#p1#@") && is_ts(&send[5..]), "{send}");
    let unsub = c.request("#u1#-/a").await;
    assert!(unsub.starts_with("#u1#@"), "{unsub}");
    // Unsubscribing something never subscribed still succeeds.
    assert!(c.request("#u2#-/never").await.starts_with("#u2#@"));
    // Timestamp: with a key, with an empty key, without a key (the original's `##@`), with junk after `@`.
    assert!(c.request("#k#@").await.starts_with("#k#@"));
    assert!(c.request("##@").await.starts_with("##@"));
    let bare = c.request("@ignored stuff").await;
    assert!(bare.starts_with("##@") && is_ts(&bare[3..]), "{bare}");
    // Ack keys are echoed raw, whatever they hold.
    let odd = c.request("#a:b c/é%0A\t#@").await;
    assert!(odd.starts_with("#a:b c/é%0A\t#@"), "{odd}");
    // Without a key, subscribe/unsubscribe/send produce no reply at all.
    c.send("+/b").await;
    c.send(":/b:y").await;
    c.send("-/b").await;
    c.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn timestamps_are_unique_increasing_and_match_the_ack() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    r.subscribe("/t").await;
    let mut s = Client::connect(&server.ws_url()).await;
    let mut acks = Vec::new();
    for i in 0..200 {
        s.send(&format!("#{i}#:/t:{i}")).await;
    }
    for i in 0..200 {
        let reply = s.recv().await;
        let prefix = format!("#{i}#@");
        assert!(reply.starts_with(&prefix), "{reply}");
        acks.push(reply[prefix.len()..].to_string());
    }
    let now = s.request("#now#@").await[6..].to_string();
    for (i, ack) in acks.iter().enumerate() {
        let (ts, path, data) = event(&r.recv().await);
        assert_eq!((&ts, path.as_str(), data), (ack, "/t", i.to_string()));
    }
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert!(acks.last().unwrap() <= &now, "@ is at least every timestamp handed out");
    let after = s.publish("/t", "later").await;
    assert!(after > now, "events after @ get greater timestamps");
    server.stop().await;
}

#[tokio::test]
async fn escaping_follows_the_original_rules() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    r.subscribe("/e").await;
    let mut s = Client::connect(&server.ws_url()).await;
    let cases = [
        ("50% off", "50%25 off"),
        ("line1\nline2", "line1%0Aline2"),
        ("%0A", "%250A"),
        ("%25", "%2525"),
        ("a\r\nb", "a\r%0Ab"),
        ("tab\there:colon:#hash#", "tab\there:colon:#hash#"),
        ("emoji 🎉 ünïcode", "emoji 🎉 ünïcode"),
        ("", ""),
        ("\n\n%", "%0A%0A%25"),
    ];
    for (data, wire) in cases {
        let ts = s.publish("/e", data).await;
        assert_eq!(r.recv().await, format!("@{ts}:/e:{wire}"), "data {data:?}");
    }
    let log = log_text(server.addr, "/log/e").await;
    let wires: Vec<&str> = log.split('\n').map(|l| l.splitn(3, ':').nth(2).unwrap()).collect();
    assert_eq!(wires, cases.iter().map(|c| c.1).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn path_forms_are_normalized() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = server.ws_url();
    let mut s = Client::connect(&url).await;
    // Each subscription form and the normalized channel it means.
    let forms = [("a/b", "/a/b"), ("  /a/b\t", "/a/b"), ("/a/n3/", "/a/n3"), ("/", "/"), ("", "/"), ("//", "/")];
    for (form, canonical) in forms {
        let mut r = Client::connect(&url).await;
        let reply = r.request(&format!("#k#+{form}")).await;
        assert!(reply.starts_with("#k#@"), "subscribe {form:?}: {reply}");
        let ts = s.publish(canonical, "x").await;
        assert_eq!(r.recv().await, format!("@{ts}:{canonical}:x"), "form {form:?}");
    }
    // Send paths are normalized the same way, and the event carries the normalized path.
    let mut r = Client::connect(&url).await;
    r.subscribe("/n").await;
    let ts = s.publish(" n/x/ ", "y").await;
    assert_eq!(r.recv().await, format!("@{ts}:/n/x:y"));
    // `/a//b` and `/a/../b` are distinct channels from `/a/b` and `/b`.
    let mut ab = Client::connect(&url).await;
    ab.subscribe("/a/b").await;
    let t1 = s.publish("/a//b", "1").await;
    let t2 = s.publish("/a/../b", "2").await;
    ab.expect_silence(QUIET).await;
    assert_eq!(log_text(server.addr, "/log/a//b").await, format!("@{t1}:/a//b:1"));
    assert_eq!(log_text(server.addr, "/log/a/..").await, format!("@{t2}:/a/../b:2"));
    // As HTTP clients that remove dot segments must write it.
    assert_eq!(log_text(server.addr, "/log/a/%2e%2e").await, format!("@{t2}:/a/../b:2"));
    assert_eq!(log_text(server.addr, "/log/a/%2E%2e/b").await, format!("@{t2}:/a/../b:2"));
    server.stop().await;
}

#[tokio::test]
async fn the_root_channel_receives_everything() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut root = Client::connect(&server.ws_url()).await;
    assert!(root.request("#r#+").await.starts_with("#r#@"));
    let mut s = Client::connect(&server.ws_url()).await;
    let t1 = s.publish("/x", "1").await;
    let t2 = s.publish("/y/z/w", "2").await;
    let t3 = s.publish("/", "3").await;
    assert_eq!(root.recv().await, format!("@{t1}:/x:1"));
    assert_eq!(root.recv().await, format!("@{t2}:/y/z/w:2"));
    assert_eq!(root.recv().await, format!("@{t3}:/:3"));
    assert_eq!(log_text(server.addr, "/log/").await, format!("@{t1}:/x:1\n@{t2}:/y/z/w:2\n@{t3}:/:3"));
    assert_eq!(log_text(server.addr, "/log").await, log_text(server.addr, "/log/").await);
    server.stop().await;
}

#[tokio::test]
async fn malformed_commands_get_errors_and_the_connection_stays_usable() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_path_length = 16;
    let server = TestServer::start(cfg).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let cases = [
        ("", "!malformed empty command"),
        ("#k#", "#k#!malformed empty command"),
        ("#unterminated", "!malformed ack key has no closing '#'"),
        ("x/a", "!malformed unknown command 'x' (expected one of + - : @)"),
        ("#k#?", "#k#!malformed unknown command '?' (expected one of + - : @)"),
        ("#k#:/a", "#k#!malformed send needs ':' between path and data (:/path:data)"),
        ("#k#+/A", "#k#!bad-path invalid character 'A' at byte 1 of path (allowed: a-z 0-9 . - /)"),
        ("#k#+/a_b", "#k#!bad-path invalid character '_' at byte 2 of path (allowed: a-z 0-9 . - /)"),
        ("#k#+/a b", "#k#!bad-path invalid byte 0x20 at byte 2 of path (allowed: a-z 0-9 . - /)"),
        ("#k#+/é", "#k#!bad-path invalid byte 0xc3 at byte 1 of path (allowed: a-z 0-9 . - /)"),
        ("#k#+/a//", "#k#!bad-path path must not end with '/' (only one trailing '/' is removed)"),
        ("#k#:/Caps:data", "#k#!bad-path invalid character 'C' at byte 1 of path (allowed: a-z 0-9 . - /)"),
        ("#k#-/a/b/c/d/e/f/g/h/i", "#k#!path-too-long path is 18 bytes long, the limit is 16"),
        ("+/UPPER", "!bad-path invalid character 'U' at byte 1 of path (allowed: a-z 0-9 . - /)"),
    ];
    for (cmd, reply) in cases {
        assert_eq!(c.request(cmd).await, reply, "command {cmd:?}");
    }
    // Still usable, and nothing was stored.
    assert!(c.request("#ok#@").await.starts_with("#ok#@"));
    assert_eq!(log_text(server.addr, "/log/").await, "");
    server.stop().await;
}

/// Paths deeper than `--max-path-depth` (default 16) are refused everywhere, before anything
/// is stored (PROTOCOL.md 3.1, step 7).
#[tokio::test]
async fn paths_deeper_than_the_limit_are_refused() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let sixteen = "/a".repeat(16);
    let seventeen = "/a".repeat(17);
    assert!(c.request(&format!("#1#+{sixteen}")).await.starts_with("#1#@"));
    for cmd in [format!("#2#+{seventeen}"), format!("#2#-{seventeen}"), format!("#2#:{seventeen}:x")] {
        assert_eq!(c.request(&cmd).await, "#2#!path-too-long path has 17 levels, the limit is 16", "{cmd}");
    }
    let r = http_get(server.addr, &format!("/log{seventeen}"), &[]).await;
    assert_eq!((r.status, r.text()), (400, "invalid path: path has 17 levels, the limit is 16\n".to_string()));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(http_get(server.addr, "/log/", &[]).await.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(log_text(server.addr, "/log/").await, "");
    server.stop().await;
}

#[tokio::test]
async fn binary_frames_get_an_error_and_the_connection_stays_open() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.send_raw(Message::binary(b"+/a".to_vec())).await.unwrap();
    assert_eq!(c.recv().await, "!unsupported binary frames are not part of the protocol; send each command as a text frame");
    assert!(c.request("#k#+/a").await.starts_with("#k#@"));
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_close_with_1009_and_others_are_unaffected() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut other = Client::connect(&server.ws_url()).await;
    other.subscribe("/big").await;
    let mut c = Client::connect(&server.ws_url()).await;
    // Exactly at the limit: accepted.
    let prefix = "#k#:/big:";
    let ok = format!("{prefix}{}", "x".repeat(65_536 - prefix.len()));
    assert!(c.request(&ok).await.starts_with("#k#@"));
    assert_eq!(event(&other.recv().await).2.len(), 65_536 - prefix.len());
    // One byte over: closed with 1009.
    let over = format!("{prefix}{}", "x".repeat(65_537 - prefix.len()));
    let _ = c.send_raw(Message::text(over)).await;
    match c.next_within(ivy_tests::WAIT).await {
        Got::Close(code, _) => assert_eq!(code, 1009),
        got => panic!("expected close 1009, got {got:?}"),
    }
    assert!(other.request("#k#@").await.starts_with("#k#@"));
    other.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let frame = Frame::message(b":/a:\xff\xfe".to_vec(), OpCode::Data(Data::Text), true);
    let _ = c.send_raw(Message::Frame(frame)).await;
    match c.next_within(ivy_tests::WAIT).await {
        Got::Close(code, _) => assert_eq!(code, 1007),
        got => panic!("expected close 1007, got {got:?}"),
    }
    assert_eq!(log_text(server.addr, "/log/").await, "");
    server.stop().await;
}

#[tokio::test]
async fn subscription_limit_is_enforced_per_connection() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_subscriptions = 3;
    let server = TestServer::start(cfg).await;
    let mut c = Client::connect(&server.ws_url()).await;
    for p in ["/1", "/2", "/3"] {
        c.subscribe(p).await;
    }
    // Re-subscribing an existing channel is not a new subscription.
    c.subscribe("/2").await;
    assert_eq!(c.request("#k#+/4").await, "#k#!too-many-subscriptions this connection already holds 3 subscriptions, the limit");
    assert!(c.request("#u#-/1").await.starts_with("#u#@"));
    c.subscribe("/4").await;
    // Another connection has its own budget.
    let mut d = Client::connect(&server.ws_url()).await;
    d.subscribe("/5").await;
    server.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    let mut s = Client::connect(&server.ws_url()).await;
    r.subscribe("/u").await;
    let t1 = s.publish("/u", "1").await;
    r.send("#x#-/u").await;
    assert_eq!(r.recv().await, format!("@{t1}:/u:1"), "events before the unsubscribe arrive first");
    assert_eq!(r.recv().await, format!("#x#@{t1}"), "the position is the last event delivered");
    s.publish("/u", "2").await;
    r.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn subscribe_position_splits_log_and_live_without_gap_or_overlap() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = server.ws_url();
    // A publisher sends continuously while a subscriber joins mid-stream.
    let publisher = tokio::spawn(async move {
        let mut s = Client::connect(&url).await;
        let mut acks = Vec::new();
        for i in 0..400 {
            acks.push(s.publish("/p/q", &i.to_string()).await);
        }
        acks
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut r = Client::connect(&server.ws_url()).await;
    let pos = r.subscribe("/p").await;
    let acks = publisher.await.unwrap();
    let backfill = log_text(server.addr, "/log/p").await;
    let mut seen: Vec<String> = backfill.lines().map(|l| event(l).0).filter(|ts| *ts <= pos).collect();
    let live_count = acks.iter().filter(|t| **t > pos).count();
    for _ in 0..live_count {
        let (ts, _, _) = event(&r.recv().await);
        assert!(ts > pos, "live events come after the position");
        seen.push(ts);
    }
    r.expect_silence(QUIET).await;
    assert_eq!(seen, acks, "log up to the position plus live after it is exactly the stream");
    server.stop().await;
}

#[tokio::test]
async fn an_event_is_in_the_log_before_any_subscriber_receives_it() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    r.subscribe("/d").await;
    let url = server.ws_url();
    let sender = tokio::spawn(async move {
        let mut s = Client::connect(&url).await;
        for i in 0..50 {
            s.send(&format!(":/d:{i}")).await;
        }
        s
    });
    for _ in 0..50 {
        let line = r.recv().await;
        let (ts, _, _) = event(&line);
        // The newest log entry is at least this event.
        let page = http_get(server.addr, &format!("/log/d?after={}&limit=1", ts_prev(&ts)), &[]).await;
        assert_eq!(page.text(), line);
    }
    drop(sender.await.unwrap());
    server.stop().await;
}

/// The timestamp one nanosecond earlier, as text.
fn ts_prev(ts: &str) -> String {
    let t: ivy_client_core::Timestamp = ts.parse().unwrap();
    t.prev().to_string()
}

#[tokio::test]
async fn concurrent_senders_get_unique_timestamps_and_nothing_is_lost() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut s = Client::connect(&url).await;
            for i in 0..50 {
                s.send(&format!("#{i}#:/c/{c}:{i}")).await;
            }
            let mut acks = Vec::new();
            for _ in 0..50 {
                let l = s.recv().await;
                acks.push(l.split_once('@').unwrap().1.to_string());
            }
            acks
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "unique timestamps");
    let log = log_text(server.addr, "/log/c").await;
    let logged: Vec<String> = log.lines().map(|l| event(l).0).collect();
    assert_eq!(logged, all, "the log holds every acked event once, in order");
    server.stop().await;
}

#[tokio::test]
async fn origin_restriction_when_configured() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.allowed_origins = vec!["http://good.example".into()];
    let server = TestServer::start(cfg).await;
    let handshake = |origin: &'static str| {
        let url = server.ws_url();
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("Origin", origin.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok((_, resp)) => resp.status().as_u16(),
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(handshake("http://evil.example").await, 403);
    assert_eq!(handshake("http://good.example").await, 101);
    let r = http_get(server.addr, "/log/", &[("Origin", "http://good.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("http://good.example"));
    let r = http_get(server.addr, "/log/", &[("Origin", "http://evil.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    server.stop().await;
}

/// With `--allowed-host`, requests for another host name (DNS rebinding) get 421, on every
/// endpoint; the allowed name works.
#[tokio::test]
async fn only_allowed_host_names_are_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.allowed_hosts = vec!["chat.example".into()];
    let server = TestServer::start(cfg).await;
    let status = |target: &'static str, host: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let upgrade =
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let extra = if target == "/ws" { upgrade } else { "Connection: close\r\n" };
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes()).await.unwrap();
        let mut buf = vec![0; 12];
        s.read_exact(&mut buf).await.unwrap();
        String::from_utf8(buf).unwrap()
    };
    for target in ["/log/", "/ws", "/anything"] {
        assert_eq!(status(target, "rebound.example:80").await, "HTTP/1.1 421", "{target}");
    }
    assert_eq!(status("/log/", "chat.example:8080").await, "HTTP/1.1 200");
    assert_eq!(status("/ws", "chat.example").await, "HTTP/1.1 101");
    server.stop().await;
}
