//! Retention and deletion (issue 12, finding 3): `DELETE /log/<path>` with a server API key,
//! `--retention-max-age` and `--retention-max-events`, and the `Ivy-Horizon` header that
//! states what a log lost. On the engine of `IVY_TEST_ENGINE` (sled by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ivy_client_core::Timestamp;
use ivy_server::engine::{Retention, WallClock};
use ivy_tests::{Client, TestServer, WAIT, config, http_get, http_request, log_text, temp_dir};

/// Publishes `events` from one connection; their lines, in order.
async fn seed(c: &mut Client, events: &[(&str, String)]) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    for (path, data) in events {
        let ts = c.publish(path, data).await;
        lines.push((path.to_string(), format!("@{ts}:{path}:{data}")));
    }
    lines
}

fn joined<'a>(lines: impl IntoIterator<Item = &'a String>) -> String {
    lines.into_iter().cloned().collect::<Vec<_>>().join("\n")
}

fn ts_of(line: &str) -> &str {
    &line[1..line[1..].find(':').map_or(0, |i| i + 1)]
}

/// Polls `GET target` until `done` holds for its body, at most [`WAIT`] (the retention
/// thread works in the background).
async fn wait_for_log(addr: std::net::SocketAddr, target: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = log_text(addr, target).await;
        if done(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "GET {target} never got there; it is:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `DELETE /log/a?before=TS` needs a server API key (none configured: 403; missing or wrong:
/// 401), deletes the events of `/a` and below older than TS from every log (the root's
/// included), answers what it deleted, and raises the horizon of the logs that lost events
/// (`Ivy-Horizon`); other channels keep everything and state no horizon. Without `before`,
/// the whole history goes. A bystander keeps sending and receiving meanwhile.
#[tokio::test]
async fn deleting_a_channel_needs_the_api_key_and_removes_its_subtree_from_every_log() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.api_keys = vec!["first-key".into(), "s3cret".into()];
    let server = TestServer::start(setup).await;
    let mut bystander = Client::connect(&server.ws_url()).await;
    bystander.subscribe("/room").await;
    let mut c = Client::connect(&server.ws_url()).await;
    let events: Vec<(&str, String)> =
        (0..12).map(|i| (["/a", "/a/b", "/c", "/a/b/c"][i % 4], if i % 3 == 0 { "x".repeat(5000) } else { format!("m{i}") })).collect();
    let lines = seed(&mut c, &events).await;
    let under_a = |p: &str| p == "/a" || p.starts_with("/a/");
    // Before the 7th event: the events 0..6 of /a and below go.
    let before = ts_of(&lines[6].1).to_string();
    let target = format!("/log/a?before={before}");

    for (auth, status) in [(None, 401), (Some("Bearer wrong"), 401), (Some("Basic s3cret"), 401), (Some("Bearer s3cret-and-more"), 401)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = http_request(server.addr, "DELETE", &target, &headers).await;
        assert_eq!(r.status, status, "{auth:?}: {}", r.text());
    }
    assert_eq!(log_text(server.addr, "/log/").await, joined(lines.iter().map(|l| &l.1)), "nothing was deleted without the key");

    let tag = http_get(server.addr, "/log/a", &[]).await.header("etag").unwrap().to_string();
    let r = http_request(server.addr, "DELETE", &target, &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The newest event is the same, the body is not: so is the tag.
    let after = http_get(server.addr, "/log/a", &[("If-None-Match", &tag)]).await;
    assert_eq!(after.status, 200, "a body changed by a deletion is not 304");
    assert_ne!(after.header("etag"), Some(tag.as_str()));
    let same = http_get(server.addr, "/log/a", &[("If-None-Match", after.header("etag").unwrap())]).await;
    assert_eq!(same.status, 304);
    let gone: Vec<&(String, String)> = lines[..6].iter().filter(|(p, _)| under_a(p)).collect();
    let newest_gone = ts_of(&gone.last().unwrap().1).to_string();
    assert_eq!(
        r.text(),
        format!(
            "{{\"channel\":\"/a\",\"before\":\"{before}\",\"deleted\":{},\"newest_deleted\":\"{newest_gone}\",\"horizon\":\"{newest_gone}\"}}\n",
            gone.len()
        )
    );
    let kept: Vec<&(String, String)> = lines.iter().filter(|l| !gone.contains(l)).collect();
    for (channel, target) in [("/", "/log/"), ("/a", "/log/a"), ("/a/b", "/log/a/b"), ("/c", "/log/c")] {
        let want =
            joined(kept.iter().filter(|(p, _)| channel == "/" || p == channel || p.starts_with(&format!("{channel}/"))).map(|l| &l.1));
        let r = http_get(server.addr, target, &[]).await;
        assert_eq!(r.text(), want, "{target}");
        // A log's horizon is the newest event it lost.
        let lost = gone.iter().rfind(|(p, _)| channel == "/" || p == channel || p.starts_with(&format!("{channel}/")));
        assert_eq!(r.header("ivy-horizon"), lost.map(|l| ts_of(&l.1)), "{target} horizon");
        // Cursor pages and HEAD state it too.
        let page = http_get(server.addr, &format!("{target}?after=0000000000.000000000&limit=2"), &[]).await;
        assert_eq!(page.header("ivy-horizon"), lost.map(|l| ts_of(&l.1)), "{target} page horizon");
    }

    // The bystander was served throughout.
    let mut other = Client::connect(&server.ws_url()).await;
    let ts = other.publish("/room", "still here").await;
    assert_eq!(bystander.recv().await, format!("@{ts}:/room:still here"));

    // Without `before`: everything /a/b's log shows now.
    let r = http_request(server.addr, "DELETE", "/log/a/b", &[("Authorization", "Bearer first-key")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("{\"channel\":\"/a/b\",\"before\":null,\"deleted\":"), "{}", r.text());
    assert_eq!(log_text(server.addr, "/log/a/b").await, "");
    assert_eq!(log_text(server.addr, "/log/a").await, joined(kept.iter().filter(|(p, _)| p == "/a").map(|l| &l.1)));
    // A bad timestamp or parameter is a 400.
    let bad = http_request(server.addr, "DELETE", "/log/a?before=soon", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let bad = http_request(server.addr, "DELETE", "/log/a?n=3", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    server.stop().await;

    // No key configured: deletion is refused.
    let dir = temp_dir();
    let server = TestServer::start(config(dir.path())).await;
    let r = http_request(server.addr, "DELETE", "/log/a", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    server.stop().await;
}

/// A wall clock the test moves forward.
fn movable_clock() -> (WallClock, Arc<AtomicU64>) {
    let offset = Arc::new(AtomicU64::new(0));
    let o = offset.clone();
    let system = WallClock::system();
    let wall = WallClock::from_fn(move || Timestamp::from_nanos(system.now().as_nanos() + u128::from(o.load(Ordering::Relaxed))));
    (wall, offset)
}

/// `--retention-max-age`: once events are older than the age (the wall clock moved two hours
/// on), the background thread deletes them from every log, the logs state their horizon, and
/// the newer events stay; sends go on meanwhile.
#[tokio::test]
async fn events_older_than_the_retention_age_are_deleted_in_the_background() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    let (wall, offset) = movable_clock();
    setup.wall = Some(wall);
    setup.retention = Retention::default().max_age(Some(Duration::from_secs(3600)));
    let server = TestServer::start(setup).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let old = seed(&mut c, &(0..20).map(|i| (["/old", "/old/x", "/keep"][i % 3], format!("o{i}"))).collect::<Vec<_>>()).await;
    // An hour is far away: nothing goes.
    assert_eq!(log_text(server.addr, "/log/").await, joined(old.iter().map(|l| &l.1)));
    offset.store(2 * 3600 * 1_000_000_000, Ordering::Relaxed);
    let new = seed(&mut c, &[("/keep", "n1".to_string()), ("/old/x", "n2".to_string())]).await;
    let body = wait_for_log(server.addr, "/log/", |b| !b.contains(":o")).await;
    assert_eq!(body, joined(new.iter().map(|l| &l.1)));
    let newest_old = ts_of(&old.last().unwrap().1);
    let r = http_get(server.addr, "/log/", &[]).await;
    assert_eq!(r.header("ivy-horizon"), Some(newest_old));
    let r = http_get(server.addr, "/log/old", &[]).await;
    assert_eq!(r.text(), new[1].1);
    let old_of = |ch: &str| old.iter().rfind(|(p, _)| p == ch || p.starts_with(&format!("{ch}/"))).map(|l| ts_of(&l.1).to_string());
    assert_eq!(r.header("ivy-horizon").map(str::to_string), old_of("/old"));
    assert!(c.publish("/keep", "after").await.len() > 10, "sends are served");
    server.stop().await;

    // On sled, everything deleted (the newest events included) is not a damaged store: it
    // reopens, with its horizons, and new events get later timestamps.
    if setup_engine() == ivy_tests::EngineKind::Sled {
        let mut setup = config(dir.path());
        setup.retention = Retention::default().max_age(Some(Duration::from_secs(3600)));
        let (wall, offset) = movable_clock();
        offset.store(4 * 3600 * 1_000_000_000, Ordering::Relaxed);
        setup.wall = Some(wall);
        let server = TestServer::start(setup).await;
        wait_for_log(server.addr, "/log/", str::is_empty).await;
        let r = http_get(server.addr, "/log/keep", &[]).await;
        assert!(r.header("ivy-horizon").is_some_and(|h| h > newest_old), "{:?}", r.header("ivy-horizon"));
        server.stop().await;
        let server = TestServer::start(config(dir.path())).await;
        let mut c = Client::connect(&server.ws_url()).await;
        let ts = c.publish("/keep", "reopened").await;
        assert!(ts.as_str() > r.header("ivy-horizon").unwrap(), "a new event comes after every deleted one");
        assert_eq!(log_text(server.addr, "/log/").await, format!("@{ts}:/keep:reopened"));
        server.stop().await;
    }
}

fn setup_engine() -> ivy_tests::EngineKind {
    ivy_tests::EngineKind::from_env()
}

/// `--retention-max-events`: each channel keeps the newest N events sent to it; its
/// children's events are theirs (kept), and the channel's log states the horizon.
#[tokio::test]
async fn a_channel_keeps_its_newest_events_up_to_the_limit() {
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.retention = Retention::default().max_events(Some(10));
    let server = TestServer::start(setup).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let events: Vec<(&str, String)> = (0..40)
        .map(|i| {
            (
                if i % 8 == 7 {
                    "/m/child"
                } else if i % 10 == 9 {
                    "/other"
                } else {
                    "/m"
                },
                format!("e{i}"),
            )
        })
        .collect();
    let lines = seed(&mut c, &events).await;
    let own: Vec<&(String, String)> = lines.iter().filter(|(p, _)| p == "/m").collect();
    assert!(own.len() > 20);
    let dropped = &own[..own.len() - 10];
    let want: Vec<&String> = lines.iter().filter(|(p, _)| p.starts_with("/m")).filter(|l| !dropped.contains(l)).map(|l| &l.1).collect();
    let body = wait_for_log(server.addr, "/log/m", |b| b.lines().count() == want.len()).await;
    assert_eq!(body, joined(want));
    let r = http_get(server.addr, "/log/m", &[]).await;
    assert_eq!(r.header("ivy-horizon"), Some(ts_of(&dropped.last().unwrap().1)));
    assert_eq!(http_get(server.addr, "/log/m/child", &[]).await.header("ivy-horizon"), None);
    assert_eq!(log_text(server.addr, "/log/other").await, joined(lines.iter().filter(|(p, _)| p == "/other").map(|l| &l.1)));
    server.stop().await;
}

async fn next(s: &mut ivy_client_native::Subscription) -> Result<ivy_client_native::Event, ivy_client_native::SubscriptionError> {
    use futures_util::StreamExt;
    tokio::time::timeout(WAIT, s.next()).await.expect("in time").expect("open")
}

/// A client resuming after an event older than the log's horizon is told that continuity was
/// lost (the native client reads `Ivy-Horizon` from its first page), then receives what the
/// log still has, in order, and the live events after; a client resuming after the horizon
/// is told nothing.
#[tokio::test]
async fn a_resume_from_before_the_horizon_is_continuity_lost() {
    use ivy_client_native::{Start, SubscriptionError};
    let dir = temp_dir();
    let mut setup = config(dir.path());
    setup.api_keys = vec!["k".into()];
    let server = TestServer::start(setup).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let lines = seed(&mut c, &(0..8).map(|i| ("/feed", format!("f{i}"))).collect::<Vec<_>>()).await;
    let ts: Vec<Timestamp> = lines.iter().map(|l| ts_of(&l.1).parse().unwrap()).collect();
    // Delete the first five.
    let r = http_request(server.addr, "DELETE", &format!("/log/feed?before={}", ts[5]), &[("Authorization", "Bearer k")]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let client = ivy_client_native::Client::connect(server.ws_url()).await.unwrap();
    // The application processed up to the 2nd event: the 3rd to 5th are gone.
    let mut sub = client.subscribe_from("/feed", Start::After(ts[1])).await.unwrap();
    match next(&mut sub).await {
        Err(SubscriptionError::ContinuityLost { last, position }) => assert_eq!((last, position), (ts[1], ts[4])),
        other => panic!("expected continuity lost, got {other:?}"),
    }
    for want in &ts[5..] {
        assert_eq!(next(&mut sub).await.unwrap().ts, *want);
    }
    let live = c.publish("/feed", "live").await;
    assert_eq!(next(&mut sub).await.unwrap().ts.to_string(), live);
    // Resuming at the horizon: nothing was lost.
    let mut sub = client.subscribe_from("/feed", Start::After(ts[4])).await.unwrap();
    for want in ts[5..].iter().map(ToString::to_string).chain([live]) {
        assert_eq!(next(&mut sub).await.unwrap().ts.to_string(), want);
    }
    server.stop().await;
}

/// The binary's flags reach the engine it runs (sled, or memory with the switch):
/// `--retention-max-events` trims, `--api-key` allows `DELETE`.
#[tokio::test]
async fn the_binary_takes_the_retention_and_api_key_flags() {
    let dir = temp_dir();
    let server = ivy_tests::ServerProcess::start(dir.path(), &["--retention-max-events", "3", "--api-key", "from-the-flag"]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let lines = seed(&mut c, &(0..6).map(|i| ("/p", format!("p{i}"))).collect::<Vec<_>>()).await;
    let body = wait_for_log(server.addr, "/log/p", |b| b.lines().count() == 3).await;
    assert_eq!(body, joined(lines[3..].iter().map(|l| &l.1)));
    let r = http_request(server.addr, "DELETE", "/log/p", &[("Authorization", "Bearer from-the-flag")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(log_text(server.addr, "/log/p").await, "");
    server.kill().await;
}
