//! Persistence: restarts on the same data directory, SIGKILL, and timestamps that stay
//! unique and increasing across restarts and a wall clock that steps backwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ivy_client_core::Timestamp;
use ivy_server::engine::SledEngine;
use ivy_server::{Ivy, WallClock};
use ivy_tests::{Client, ServerProcess, TestServer, config, log_text, temp_dir};

#[tokio::test]
async fn a_graceful_restart_keeps_every_event() {
    let dir = temp_dir();
    let server = TestServer::start_sled_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let mut acked = Vec::new();
    for i in 0..100 {
        acked.push(c.publish(&format!("/r/{}", i % 3), &format!("event {i}\nline 2 50%")).await);
    }
    let before = log_text(server.addr, "/log/").await;
    let before_r1 = log_text(server.addr, "/log/r/1").await;
    server.stop().await;

    let server = TestServer::start_sled_in(dir.path()).await;
    assert_eq!(log_text(server.addr, "/log/").await, before);
    assert_eq!(log_text(server.addr, "/log/r/1").await, before_r1);
    let logged: Vec<&str> = before.lines().map(|l| &l[1..21]).collect();
    assert_eq!(logged, acked.iter().map(String::as_str).collect::<Vec<_>>());
    // New events continue after the old ones.
    let mut c = Client::connect(&server.ws_url()).await;
    let next = c.publish("/r/0", "after restart").await;
    assert!(next > *acked.last().unwrap());
    server.stop().await;
}

/// Serves an instance with a custom wall clock; returns its address and the instance.
async fn serve_with_clock(dir: &std::path::Path, wall: WallClock) -> (std::net::SocketAddr, Arc<Ivy>, tokio::task::JoinHandle<()>) {
    let ivy = Arc::new(Ivy::builder(config(dir).config).engine(SledEngine::new(dir).wall_clock(wall)).open().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = ivy.router();
    let stop = ivy.stop_signal();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.unwrap();
    });
    (addr, ivy, task)
}

#[tokio::test]
async fn timestamps_increase_when_the_wall_clock_steps_back() {
    let dir = temp_dir();
    // Year 2100, then the clock jumps back by an hour during the run.
    let secs = Arc::new(AtomicU64::new(4_102_444_800));
    let s = secs.clone();
    let wall = WallClock::from_fn(move || Timestamp::new(s.load(Ordering::SeqCst), 0).unwrap());
    let (addr, ivy, task) = serve_with_clock(dir.path(), wall).await;
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    let mut ts = Vec::new();
    for i in 0..5 {
        ts.push(c.publish("/clock", &i.to_string()).await);
    }
    secs.fetch_sub(3600, Ordering::SeqCst);
    for i in 5..10 {
        ts.push(c.publish("/clock", &i.to_string()).await);
    }
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
    assert_eq!(ts[0], "4102444800.000000000");
    assert_eq!(ts[9], "4102444800.000000009");
    ivy.stop_signal().cancel();
    task.await.unwrap();
    ivy.shutdown().await;
    drop(ivy); // releases the store's lock

    // Restart with the real clock, which is far behind year 2100: still increasing.
    let (addr, ivy, task) = serve_with_clock(dir.path(), WallClock::system()).await;
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    let after = c.publish("/clock", "after").await;
    assert_eq!(after, "4102444800.000000010");
    let time = c.request("#t#@").await;
    assert!(time["#t#@".len()..] >= *after, "{time}");
    let log = log_text(addr, "/log/clock").await;
    assert_eq!(log.lines().count(), 11);
    ivy.stop_signal().cancel();
    task.await.unwrap();
    ivy.shutdown().await;
}

#[tokio::test]
async fn sigkill_loses_no_acked_event_and_timestamps_keep_increasing() {
    let dir = temp_dir();
    let mut all_acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let server = ServerProcess::start_sled(dir.path(), &[]).await;
        let before = log_text(server.addr, "/log/").await;
        let stored: Vec<&str> = before.lines().map(|l| &l[1..21]).collect();
        assert_eq!(stored, all_acked.iter().map(String::as_str).collect::<Vec<_>>(), "round {round}: every acked event survived, once");
        let mut c = Client::connect(&server.ws_url()).await;
        for i in 0..200 {
            c.send(&format!("#{i}#:/k/{round}:{i}")).await;
        }
        for i in 0..200 {
            let reply = c.recv().await;
            let prefix = format!("#{i}#@");
            assert!(reply.starts_with(&prefix), "{reply}");
            let ts = reply[prefix.len()..].to_string();
            assert!(all_acked.last().is_none_or(|last| *last < ts));
            all_acked.push(ts);
        }
        server.kill().await;
    }
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    let log = log_text(server.addr, "/log/k").await;
    assert_eq!(log.lines().map(|l| &l[1..21]).collect::<Vec<_>>(), all_acked.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(log_text(server.addr, "/log/k/1").await.lines().count(), 200);
    let status = server.terminate().await;
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_one_instance_and_a_reopen_waits_for_the_lock() {
    let dir = temp_dir();
    let first = Ivy::builder(config(dir.path()).config).engine(SledEngine::new(dir.path())).open().unwrap();
    // A second live instance on the same directory is refused, clearly.
    let second = tokio::task::spawn_blocking({
        let cfg = config(dir.path()).sled();
        move || cfg.builder().open().map(|_| ())
    })
    .await
    .unwrap();
    let err = second.expect_err("the store is in use");
    assert!(err.to_string().contains("lock"), "{err}");
    // Right after the first one is shut down and dropped, opening succeeds (sled releases its
    // lock in the background; opening waits for it).
    first.shutdown().await;
    drop(first);
    let again = Ivy::builder(config(dir.path()).config).engine(SledEngine::new(dir.path())).open().expect("reopen right after a shutdown");
    again.shutdown().await;
}

/// A store that lost its newest events (an old backup restored over it, a bad copy, a damaged
/// log that sled recovered by cutting it) is refused, saying what is lost, until `--repair`
/// accepts it as it is; then it starts again normally, and never hands out a lost event's
/// timestamp again (with a wall clock that stands still, the next timestamp would otherwise
/// follow the newest surviving event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_acknowledged_events_is_refused_until_repaired() {
    let dir = temp_dir();
    let old = temp_dir();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ivy-test-server"));
    let frozen = [("IVY_TEST_FROZEN_CLOCK", "4102444800")];
    let start = |extra: &'static [&'static str]| ServerProcess::start_bin(bin, dir.path(), extra, &frozen);
    let publish = |n: usize| async move {
        let server = start(&[]).await;
        let mut c = Client::connect(&server.ws_url()).await;
        let mut last = String::new();
        for i in 0..n {
            last = c.publish(&format!("/t/{}", i % 7), "data").await;
        }
        assert!(server.terminate().await.success());
        last
    };
    let kept_last = publish(300).await;
    // The copy holds sled's files as they were (the mark inside the data directory is not
    // part of what gets lost).
    for f in ["conf", "db"] {
        std::fs::copy(dir.path().join(f), old.path().join(f)).unwrap();
    }
    let last = publish(300).await;
    for f in ["conf", "db"] {
        std::fs::copy(old.path().join(f), dir.path().join(f)).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir.path().join("blobs"));

    let out = tokio::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .envs(frozen)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a store that lost events is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("it holds events up to {kept_last}, but events up to {last} were stored and acknowledged")), "{err}");
    assert!(err.contains("--repair"), "{err}");

    // --repair keeps what is intact and says what was lost.
    let server = start(&["--repair"]).await;
    assert_eq!(log_text(server.addr, "/log/").await.lines().count(), 300);
    let mut c = Client::connect(&server.ws_url()).await;
    let after = c.publish("/t/0", "after the repair").await;
    assert!(after > last, "timestamps do not go back: {after} after {last}");
    assert!(server.terminate().await.success());
    // Accepted: later starts need no flag.
    let server = start(&[]).await;
    assert_eq!(log_text(server.addr, "/log/").await.lines().count(), 301);
    assert!(server.terminate().await.success());
}

/// A store cut in the middle of a segment can make sled itself panic while opening it: the
/// server reports a damaged store and exits with an error, it does not crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_sled_cannot_open_is_reported_not_a_crash() {
    let dir = temp_dir();
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    for i in 0..3000 {
        c.send(&format!(":/u/{}:{}", i % 5, "u".repeat(150))).await;
    }
    c.publish("/u", "last").await;
    assert!(server.terminate().await.success());
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    // Cuts at a few offsets inside segments: whatever sled makes of them, the outcome is a
    // refusal with a reason, never a panic's exit code.
    for cut in [len / 2 + 777, len / 3 + 4321, len / 4 + 99] {
        let copy = temp_dir();
        for f in ["conf", "db", "ivy-acked"] {
            std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
        }
        std::fs::OpenOptions::new().write(true).open(copy.path().join("db")).unwrap().set_len(cut).unwrap();
        let out = tokio::process::Command::new(ivy_tests::server_bin())
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(copy.path())
            .env("RUST_LOG", "off")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "a refusal, not a crash: {err}");
        assert!(err.contains("is damaged") || err.contains("has lost acknowledged events"), "{err}");
    }
}

/// A snapshot that sled began and never finished (a crash or a full disk in the middle of one
/// leaves an empty `snap.*.generating`) used to make the store unopenable ("Read corrupted
/// data") until someone deleted it by hand: it is removed, and the store opens with every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_snapshot_does_not_brick_the_store() {
    let dir = temp_dir();
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    for i in 0..50 {
        c.publish("/s", &i.to_string()).await;
    }
    assert!(server.terminate().await.success());
    std::fs::write(dir.path().join("snap.00000000000FFFFF.generating"), b"").unwrap();
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    assert_eq!(log_text(server.addr, "/log/s").await.lines().count(), 50);
    assert!(!dir.path().join("snap.00000000000FFFFF.generating").exists());
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
}
