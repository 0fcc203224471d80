//! In-band token refresh (issue 13, `docs/PROTOCOL.md` 5.8) against a real server on
//! 127.0.0.1, with real tokens minted here: the `&JWT` command moves the expiry deadline, its
//! grants replace the old ones (`!subscription-ended` before the reply), refusals keep the
//! connection, a connection without a token takes one in-band, auth off ignores it, an old
//! client sees today's lines; the native client's token provider (refresh ahead of expiry,
//! 401 and 4003 handling, the terminal unauthorized state) and the CLI's exit code 4 and
//! `--token-file`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use ivy_client_native::{ClientError, ConnState, Error as ClientErr, Start, SubscriptionError};
use ivy_server::auth::Secret;
use ivy_tests::{Client, Got, TestServer, config, ivy_bin, temp_dir};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "refresh-secret";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A token of `sub` expiring at `exp` with these grants (read and write alike).
fn token(sub: &str, exp: u64, grants: &[&str]) -> String {
    sign(&json!({"sub": sub, "exp": exp, "read": grants, "write": grants}))
}

/// A server with auth on (one secret), anonymous read of `/public`, and this grace.
async fn server(grace: Duration) -> (TestServer, tempfile::TempDir) {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.config =
        setup.config.clone().auth_hmac_secrets(vec![Secret::new(SECRET)]).anonymous_read(vec!["/public".into()]).auth_refresh_grace(grace);
    (TestServer::start(setup).await, dir)
}

async fn connect(server: &TestServer, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", server.ws_url())).await
}

/// Sleeps until the wall clock is past `unix` seconds plus `extra`.
async fn sleep_past(unix: u64, extra: Duration) {
    let target = UNIX_EPOCH + Duration::from_secs(unix) + extra;
    if let Ok(left) = target.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

fn acked(line: &str, key: &str) -> bool {
    line.strip_prefix(&format!("#{key}#@")).is_some_and(|ts| ts.len() == 20 && ts.as_bytes()[10] == b'.')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_moves_the_expiry_deadline_of_a_live_connection() {
    let (server, _dir) = server(Duration::from_millis(500)).await;
    let old_exp = now() + 2;
    let mut c = connect(&server, &token("ada", old_exp, &["/"])).await;
    c.subscribe("/chat").await;
    let new_exp = old_exp + 3;
    let reply = c.request(&format!("#r#&{}", token("ada", new_exp, &["/"]))).await;
    assert!(acked(&reply, "r"), "{reply}");
    // Past the old token's deadline (exp + grace) by a second: still open and working.
    sleep_past(old_exp, Duration::from_millis(1500)).await;
    assert!(acked(&c.request("#t#@").await, "t"));
    c.publish("/chat/a", "after the old deadline").await;
    // The new deadline closes it as before.
    match c.next_within(Duration::from_secs(15)).await {
        Got::Close(4003, reason) => assert_eq!(reason, "token expired: refresh it in-band or reconnect with a fresh token"),
        other => panic!("expected 4003, got {other:?}"),
    }
    assert!(SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(new_exp), "closed at the new deadline, not before");
    // Without a key, a success has no reply.
    let mut quiet = connect(&server, &token("ada", now() + 60, &["/"])).await;
    quiet.send(&format!("&{}", token("ada", now() + 120, &["/"]))).await;
    quiet.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_grants_end_subscriptions_before_the_reply_and_forbid_what_they_no_longer_cover() {
    let (server, _dir) = server(Duration::from_secs(10)).await;
    let exp = now() + 3600;
    let mut c = connect(&server, &token("ada", exp, &["/chat"])).await;
    for p in ["/chat/room1", "/chat/room2", "/chat"] {
        assert!(acked(&c.request(&format!("#s#+{p}")).await, "s"));
    }
    let mut other = connect(&server, &token("bob", exp, &["/"])).await;
    let before = other.publish("/chat/room2", "before").await;
    assert_eq!(c.recv().await, format!("@{before}:/chat/room2:before"));
    c.send(&format!("#r#&{}", token("ada", exp, &["/chat/room1"]))).await;
    assert_eq!(c.recv().await, "!subscription-ended /chat the new token of \"ada\" has no read grant covering /chat");
    assert_eq!(c.recv().await, "!subscription-ended /chat/room2 the new token of \"ada\" has no read grant covering /chat/room2");
    assert!(acked(&c.recv().await, "r"));
    // Nothing more through the ended ones; the one still covered delivers (once).
    other.publish("/chat/room2", "after").await;
    let kept = other.publish("/chat/room1", "kept").await;
    assert_eq!(c.recv().await, format!("@{kept}:/chat/room1:kept"));
    c.expect_silence(Duration::from_millis(300)).await;
    // Later commands are checked against the new grants.
    assert_eq!(
        c.request("#1#+/chat/room2").await,
        "#1#!forbidden the token of \"ada\" has no read grant covering /chat/room2 (a subscription delivers the path's whole subtree)"
    );
    assert_eq!(c.request("#2#:/chat/room2:x").await, "#2#!forbidden the token of \"ada\" has no write grant covering /chat/room2");
    assert!(acked(&c.request("#3#:/chat/room1:x").await, "3"));
    // More grants allow more.
    assert!(acked(&c.request(&format!("#r2#&{}", token("ada", exp, &["/chat", "/news"]))).await, "r2"));
    assert!(acked(&c.request("#4#+/news").await, "4"));
    assert!(acked(&c.request("#5#:/chat/room2:x").await, "5"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_are_unauthorized_and_the_connection_keeps_its_token() {
    let (server, _dir) = server(Duration::from_secs(10)).await;
    let exp = now() + 3600;
    let mut c = connect(&server, &token("ada", exp, &["/chat"])).await;
    c.subscribe("/chat").await;
    let wrong_key =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"sub": "ada", "exp": exp}), &EncodingKey::from_secret(b"other"))
            .unwrap();
    let cases = [
        ("garbage".to_string(), "invalid token: not a JWT with a supported algorithm (\"alg\": \"none\" is never accepted)"),
        (String::new(), "invalid token: not a JWT with a supported algorithm (\"alg\": \"none\" is never accepted)"),
        (token("ada", now() - 60, &["/"]), "token expired"),
        (wrong_key, "invalid token: bad signature"),
        (token("bob", exp, &["/"]), "a refreshed token must have the same sub (\"ada\")"),
    ];
    for (i, (t, reason)) in cases.iter().enumerate() {
        assert_eq!(c.request(&format!("#{i}#&{t}")).await, format!("#{i}#!unauthorized {reason}"));
    }
    // Without a key, the refusal still comes.
    assert!(c.request("&garbage").await.starts_with("!unauthorized invalid token: "));
    // The connection goes on with its token and grants.
    let mut other = connect(&server, &token("bob", exp, &["/"])).await;
    let ts = other.publish("/chat/x", "still here").await;
    assert_eq!(c.recv().await, format!("@{ts}:/chat/x:still here"));
    assert!(c.request("#f#+/other").await.starts_with("#f#!forbidden "), "no grants from a refused token");
    // Refreshes have a budget of their own (each verifies a signature): a burst, then paced.
    let good = token("ada", exp, &["/chat"]);
    let mut replies = Vec::new();
    for i in 0..30 {
        replies.push(c.request(&format!("#b{i}#&{good}")).await);
        if replies.last().is_some_and(|r| r.contains("!rate-limited")) {
            break;
        }
    }
    let last = replies.last().unwrap();
    assert!(
        last.ends_with("!rate-limited too many token refreshes: at most 1 per second (bursts of 10); this one was not executed"),
        "{replies:?}"
    );
    assert!(acked(&c.request("#t#@").await, "t"), "the connection stays open");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_token_takes_one_in_band() {
    let (server, _dir) = server(Duration::from_millis(200)).await;
    let mut c = Client::connect(&server.ws_url()).await;
    assert!(acked(&c.request("#p#+/public").await, "p"));
    assert!(c.request("#1#+/chat").await.starts_with("#1#!forbidden without a token there is no read grant covering /chat"));
    let exp = now() + 2;
    assert!(acked(&c.request(&format!("#r#&{}", token("ada", exp, &["/chat"]))).await, "r"));
    assert!(acked(&c.request("#2#+/chat").await, "2"));
    assert!(acked(&c.request("#3#+/public").await, "3"), "the anonymous grants still apply");
    // It is ada's now: another sub is refused.
    assert_eq!(
        c.request(&format!("#4#&{}", token("bob", exp, &["/"]))).await,
        "#4#!unauthorized a refreshed token must have the same sub (\"ada\")"
    );
    // And it has ada's token's deadline.
    assert!(matches!(c.next_within(Duration::from_secs(15)).await, Got::Close(4003, _)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_off_a_refresh_is_accepted_and_ignored() {
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.subscribe("/x").await;
    assert!(acked(&c.request("#1#&not-even-a-jwt").await, "1"));
    c.send("&whatever").await;
    c.expect_silence(Duration::from_millis(300)).await;
    let mut other = Client::connect(&server.ws_url()).await;
    let ts = other.publish("/x/y", "z").await;
    assert_eq!(c.recv().await, format!("@{ts}:/x/y:z"), "nothing changed");
    server.stop().await;
}

/// A client of the original protocol (ivy1, no extension used) on a server with auth on,
/// with a token it never refreshes: exactly the lines it gets today, then the 4003 close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ivy1_client_that_never_refreshes_sees_todays_lines() {
    let (server, _dir) = server(Duration::ZERO).await;
    let exp = now() + 2;
    let mut c = connect(&server, &token("ada", exp, &["/chat"])).await;
    assert_eq!(c.protocol.as_deref(), Some("ivy1"));
    c.send("+/chat").await;
    let mut other = connect(&server, &token("bob", now() + 3600, &["/"])).await;
    let ts = other.publish("/chat/a", "hi").await;
    let mut lines = vec![c.recv().await];
    c.send(":/chat/b:own").await;
    c.send("@").await;
    lines.push(c.recv().await);
    assert_eq!(lines[0], format!("@{ts}:/chat/a:hi"));
    assert!(lines[1].starts_with("##@"), "{lines:?}");
    match c.next_within(Duration::from_secs(15)).await {
        Got::Close(4003, _) => {}
        other => panic!("expected only the close, got {other:?} after {lines:?}"),
    }
    server.stop().await;
}

/// A TCP proxy counting the connections made through it (each WebSocket handshake is one).
async fn counting_proxy(upstream: std::net::SocketAddr) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_with_a_provider_outlives_its_tokens() {
    let (server, _dir) = server(Duration::from_millis(800)).await;
    let (url, handshakes) = counting_proxy(server.addr).await;
    let asked = Arc::new(AtomicU64::new(0));
    let a = asked.clone();
    let client = ivy_client_native::Client::builder(&url)
        .token_provider(move || {
            a.fetch_add(1, Ordering::SeqCst);
            async { Some(token("ada", now() + 3, &["/chat"])) }
        })
        .connect()
        .await
        .unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the first token comes from the provider");
    let mut sub = client.subscribe_from("/chat", Start::Beginning).await.unwrap();
    let publisher = ivy_client_native::Client::builder(format!("ws://{}", server.addr))
        .token(token("bob", now() + 3600, &["/"]))
        .connect()
        .await
        .unwrap();
    // Events all along several expiries of 3-second tokens.
    let mut sent = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        sent.push(publisher.send("/chat/room", &format!("{}", sent.len())).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("events").expect("open").expect("no error");
        got.push(e.ts);
    }
    assert_eq!(got, sent, "every event, once, in order");
    assert!(asked.load(Ordering::SeqCst) >= 3, "refreshed ahead of each expiry: {}", asked.load(Ordering::SeqCst));
    assert_eq!(*client.connections().borrow(), 1, "never reconnected (no 4003)");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(*client.state().borrow(), ConnState::Connected);
    // Its own sends use the refreshed grants too, and log reads the refreshed token.
    client.send("/chat/own", "x").await.unwrap();
    assert_eq!(client.log("/chat", ivy_client_native::LogQuery::All).await.unwrap().len(), sent.len() + 1);
    client.close().await;
    publisher.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_no_token_ends_the_client_unauthorized_without_a_reconnect_storm() {
    let (server, _dir) = server(Duration::ZERO).await;
    let (url, handshakes) = counting_proxy(server.addr).await;
    let asked = Arc::new(AtomicU64::new(0));
    let a = asked.clone();
    let client = ivy_client_native::Client::builder(&url)
        .token(token("ada", now() + 2, &["/chat"]))
        .token_provider(move || {
            a.fetch_add(1, Ordering::SeqCst);
            async { None }
        })
        .connect()
        .await
        .unwrap();
    let mut sub = client.subscribe("/chat").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), sub.next()).await.expect("the subscription ended");
    assert!(matches!(end, Some(Err(SubscriptionError::Refused(ClientError::Unauthorized)))), "{end:?}");
    let mut state = client.state();
    tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| *s == ConnState::Unauthorized)).await.unwrap().unwrap();
    let reason = client.unauthorized_reason().unwrap();
    assert!(reason.starts_with("token expired: refresh it in-band"), "{reason}");
    assert!(reason.ends_with("no fresh token: the token provider returned none"), "{reason}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handshakes.load(Ordering::SeqCst), 1, "no reconnect after the refusal");
    // Asked ahead of expiry, and once more after the 4003.
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(client.send("/chat/x", "y").await, Err(ClientErr::Request(ClientError::Unauthorized)));
    assert!(matches!(client.subscribe("/chat").await, Err(ClientErr::Request(ClientError::Unauthorized))));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_at_the_handshake_asks_the_provider_once() {
    let (server, _dir) = server(Duration::from_secs(10)).await;
    let (url, handshakes) = counting_proxy(server.addr).await;
    let asked = Arc::new(AtomicU64::new(0));
    let a = asked.clone();
    let client = ivy_client_native::Client::builder(&url)
        .token(token("ada", now() - 60, &["/chat"]))
        .token_provider(move || {
            a.fetch_add(1, Ordering::SeqCst);
            async { Some(token("ada", now() + 3600, &["/chat"])) }
        })
        .connect()
        .await
        .expect("connected with the fresh token");
    assert_eq!((asked.load(Ordering::SeqCst), handshakes.load(Ordering::SeqCst)), (1, 2));
    client.send("/chat/x", "y").await.unwrap();
    client.close().await;

    // A fresh token refused too: unauthorized, after exactly one more attempt.
    let (url, handshakes) = counting_proxy(server.addr).await;
    let r = ivy_client_native::Client::builder(&url)
        .token(token("ada", now() - 60, &["/chat"]))
        .token_provider(|| async { Some("not-a-jwt".to_string()) })
        .retry_initial_connect(true)
        .connect()
        .await;
    match r {
        Err(ClientErr::Connect(e)) => {
            assert_eq!(e.status, Some(401));
            assert!(e.message.starts_with("HTTP 401: invalid token"), "{}", e.message);
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(handshakes.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[test]
fn the_expiry_is_read_from_the_token() {
    assert_eq!(ivy_client_native::token_expiry(&token("ada", 1_800_000_000, &[])), Some(1_800_000_000));
    assert_eq!(ivy_client_native::token_expiry(&sign(&json!({"sub": "a", "exp": 1.5e9}))), Some(1_500_000_000));
    assert_eq!(ivy_client_native::token_expiry(&sign(&json!({"sub": "a"}))), None);
    assert_eq!(ivy_client_native::token_expiry("garbage"), None);
    assert_eq!(ivy_client_native::token_expiry("a.!!!.c"), None);
}

async fn ivy(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(ivy_bin()).args(args).env_remove("IVY_TOKEN").env_remove("IVY_TOKEN_FILE").output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.unwrap().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exits_4_when_unauthorized_and_rereads_its_token_file() {
    let (server, dir) = server(Duration::from_millis(500)).await;
    let url = format!("ws://{}", server.addr);
    let expired = token("ada", now() - 60, &["/chat"]);
    let (code, _, err) = ivy(&["--url", &url, "--token", &expired, "sub", "/chat"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("HTTP 401: token expired"), "{err}");

    // --token-file: read again ahead of expiry; the refreshed token keeps `ivy sub` connected.
    let file = dir.path().join("token");
    let old_exp = now() + 2;
    std::fs::write(&file, format!("{}\n", token("ada", old_exp, &["/chat"]))).unwrap();
    let path = file.to_str().unwrap().to_string();
    let sub = tokio::spawn({
        let url = url.clone();
        async move { ivy(&["--url", &url, "--token-file", &path, "sub", "/chat", "--count", "1"]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&file, token("ada", now() + 3600, &["/chat"])).unwrap();
    // After the first token's deadline: the event still reaches the same `ivy sub`.
    sleep_past(old_exp, Duration::from_millis(1500)).await;
    let mut publisher = connect(&server, &token("bob", now() + 3600, &["/"])).await;
    let ts = publisher.publish("/chat/a", "after").await;
    let (code, out, err) = sub.await.unwrap();
    assert_eq!((code, out.as_str()), (0, format!("@{ts}:/chat/a:after\n").as_str()), "{err}");
    assert!(!err.contains("reconnect"), "kept its connection: {err}");

    // A token file whose token the server refuses: read once more after the 401, then exit 4
    // (no retries).
    std::fs::write(&file, &expired).unwrap();
    let (code, _, err) = ivy(&["--url", &url, "--token-file", file.to_str().unwrap(), "sub", "/chat"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("ivy: unauthorized: the server refused the token"), "{err}");
    assert!(err.contains("HTTP 401: token expired"), "{err}");
    std::fs::remove_file(&file).unwrap();
    let (code, _, err) = ivy(&["--url", &url, "--token-file", file.to_str().unwrap(), "time"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read the token file"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_subscription_that_a_refreshed_token_no_longer_covers_ends_with_the_reason() {
    let (server, _dir) = server(Duration::from_secs(5)).await;
    let first = Arc::new(AtomicU64::new(0));
    let f = first.clone();
    let client = ivy_client_native::Client::builder(format!("ws://{}", server.addr))
        .token(token("ada", now() + 2, &["/chat", "/news"]))
        .token_provider(move || {
            f.fetch_add(1, Ordering::SeqCst);
            async { Some(token("ada", now() + 3600, &["/chat"])) }
        })
        .connect()
        .await
        .unwrap();
    let mut news = client.subscribe("/news").await.unwrap();
    let mut chat = client.subscribe("/chat").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), news.next()).await.expect("ended in time") {
        Some(Err(SubscriptionError::Ended(reason))) => {
            assert_eq!(reason, "/news the new token of \"ada\" has no read grant covering /news")
        }
        other => panic!("{other:?}"),
    }
    assert!(news.next().await.is_none(), "the stream ends");
    let ts = client.send("/chat/a", "still").await.unwrap();
    assert_eq!(chat.next().await.unwrap().unwrap().ts, ts);
    assert!(matches!(
        client.send("/news/a", "x").await,
        Err(ClientErr::Request(ClientError::Server { code, .. })) if code == ivy_client_native::ErrorCode::Forbidden
    ));
    assert_eq!((first.load(Ordering::SeqCst), *client.connections().borrow()), (1, 1));
    client.close().await;
    server.stop().await;
}
