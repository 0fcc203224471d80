//! Faults: slow consumers, graceful shutdown, and the binary's command line.

use std::time::Duration;

use ivy_tests::{Client, Got, ServerProcess, TestServer, config, log_text, server_bin, temp_dir};

/// A subscriber that does not read falls behind (its events are read from the log when it
/// reads again) and is closed with 4000 once it stays behind for a whole ping interval, or is
/// behind and silent for a whole interval after a ping. (It answers no ping either: the
/// interval is long enough for it to fall behind before the ping timeout would close it.)
#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_never_blocks_the_others() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.queue_length = 16;
    cfg.ping_interval = Duration::from_secs(2);
    let server = TestServer::start(cfg).await;
    let mut slow = Client::connect(&server.ws_url()).await;
    slow.subscribe("/f").await;
    let mut fast = Client::connect(&server.ws_url()).await;
    fast.subscribe("/f").await;
    let url = server.ws_url();
    let data = "x".repeat(60_000);
    let n = 400; // 24 MB: far more than the socket buffers and the 16-message queue hold
    let publisher = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        for i in 0..n {
            p.send(&format!("#{i}#:/f:{data}")).await;
            p.recv().await;
        }
    });
    // The fast subscriber keeps reading and gets everything.
    for _ in 0..n {
        let line = fast.recv().await;
        assert!(line.ends_with("xxxx"));
    }
    publisher.await.unwrap();
    // The slow one does not read for more than two intervals (it fell behind during the
    // first, and answered no ping): once it reads, it finds some events and then close code
    // 4000. (One that reads again within a ping interval catches up instead.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut events = 0;
    let code = loop {
        match slow.next_within(Duration::from_secs(10)).await {
            Got::Line(_) => events += 1,
            Got::Close(code, reason) => {
                assert_eq!(reason, "slow consumer: outbound queue full");
                break code;
            }
            other => panic!("expected events then a close frame, got {other:?} after {events} events"),
        }
    };
    assert_eq!(code, 4000);
    assert!(events < n, "it was cut off before the end ({events} events)");
    // The server is fine and the log has everything.
    assert_eq!(log_text(server.addr, "/log/f?n=1").await.len(), 60_000 + 1 + 20 + 4);
    assert_eq!(log_text(server.addr, "/log/f").await.lines().count(), n);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_sends_queued_replies_then_close_1001_and_flushes() {
    let dir = temp_dir();
    let server = TestServer::start_sled_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let mut r = Client::connect(&server.ws_url()).await;
    r.subscribe("/s").await;
    for i in 0..50 {
        c.send(&format!("#{i}#:/s:{i}")).await;
    }
    // Wait for the first ack so the sends are in flight, then stop.
    let first = c.recv().await;
    assert!(first.starts_with("#0#@"));
    let mut acked = vec![first[4..].to_string()];
    let stopping = tokio::spawn(server.stop());
    let code = loop {
        match c.next_within(Duration::from_secs(10)).await {
            Got::Line(l) => {
                let prefix = format!("#{}#@", acked.len());
                assert!(l.starts_with(&prefix), "{l}");
                acked.push(l[prefix.len()..].to_string());
            }
            Got::Close(code, _) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1001);
    match r.next_within(Duration::from_secs(10)).await {
        Got::Line(_) | Got::Close(1001, _) => {}
        other => panic!("{other:?}"),
    }
    stopping.await.unwrap();
    // Every stored event was acked before the close frame, and every acked one is stored.
    let server = TestServer::start_sled_in(dir.path()).await;
    let log = log_text(server.addr, "/log/s").await;
    let stored: Vec<&str> = log.lines().map(|l| &l[1..21]).collect();
    assert_eq!(stored, acked.iter().map(String::as_str).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_a_connection_that_does_not_read_after_the_grace_period() {
    let dir = temp_dir();
    let server = TestServer::start_sled_in(dir.path()).await;
    // A subscriber that never reads: its socket buffers fill up and its writer is stuck in a
    // write, with events still queued (fewer than the queue holds, so it is no slow consumer).
    let mut stuck = Client::connect(&server.ws_url()).await;
    stuck.subscribe("/g").await;
    let mut p = Client::connect(&server.ws_url()).await;
    let data = "y".repeat(60_000);
    let n = 300; // 18 MB: more than loopback socket buffers hold
    for i in 0..n {
        p.send(&format!("#{i}#:/g:{data}")).await;
        assert!(p.recv().await.starts_with(&format!("#{i}#@")));
    }
    // The graceful shutdown waits for the stuck writer, then closes it (5 s grace) and finishes.
    let t = std::time::Instant::now();
    server.stop().await;
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(4), "the stuck connection was cut before its grace period ({took:?})");
    // Everything acked is stored.
    let server = TestServer::start_sled_in(dir.path()).await;
    assert_eq!(log_text(server.addr, "/log/g").await.lines().count(), n);
    server.stop().await;
    drop(stuck);
}

#[tokio::test]
async fn binary_help_flags_and_environment() {
    let out = std::process::Command::new(server_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data",
        "--max-message-size",
        "--max-path-length",
        "--max-path-depth",
        "--memory",
        "--max-subscriptions",
        "--queue-length",
        "--durability",
        "IVY_LISTEN",
        "IVY_DATA",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
    // A bad flag: clear error, non-zero exit.
    let out = std::process::Command::new(server_bin()).arg("--listen").arg("nonsense").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'nonsense'"));
    // Settings from the environment.
    let dir = temp_dir();
    let mut child = tokio::process::Command::new(server_bin())
        .env("IVY_LISTEN", "127.0.0.1:0")
        .env("IVY_DATA", dir.path())
        .env("IVY_MAX_PATH_LENGTH", "4")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr = line.rsplit("http://").next().unwrap().to_string();
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    assert_eq!(c.request("#k#+/abcde").await, "#k#!path-too-long path is 6 bytes long, the limit is 4");
    child.kill().await.unwrap();
    assert!(dir.path().join("conf").exists() || std::fs::read_dir(dir.path()).unwrap().next().is_some(), "store created in IVY_DATA");
}

#[tokio::test]
async fn a_busy_listen_address_is_a_clear_error() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let dir2 = temp_dir();
    let out = tokio::process::Command::new(server_bin())
        .arg("--listen")
        .arg(server.addr.to_string())
        .arg("--data")
        .arg(dir2.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
    server.kill().await;
}
