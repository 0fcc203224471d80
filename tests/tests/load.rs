//! `ivy-load` (the load driver, `tests/src/bin/ivy-load.rs`) against a real server: a smoke
//! test of its counts and its JSON result line. It measures; this test asserts no timing.

use ivy_tests::{TestServer, log_text, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ivy_load_sends_every_event_with_an_ack_and_prints_one_json_line() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ivy-load"))
        .args(["--url", &server.ws_url(), "--senders", "4", "--events", "203", "--size", "10", "--window", "2"])
        .output()
        .await
        .expect("run ivy-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.trim();
    assert_eq!(line.lines().count(), 1, "{stdout}");
    for field in [
        "\"senders\":4",
        "\"window\":2",
        "\"size\":10",
        "\"events\":203",
        "\"acked\":203",
        "\"errors\":0",
        "\"acked_per_sec\":",
        "\"p99\":",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    // 203 events over 4 senders: 51, 51, 51, 50, each on its own channel.
    assert_eq!(log_text(server.addr, "/log/load").await.lines().count(), 203);
    assert_eq!(log_text(server.addr, "/log/load/0").await.lines().count(), 51);
    assert_eq!(log_text(server.addr, "/log/load/3").await.lines().count(), 50);
    // A server that is not there: a clear error and exit status 1.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ivy-load"))
        .args(["--url", &format!("ws://{dead}/ws"), "--senders", "2", "--events", "10"])
        .output()
        .await
        .expect("run ivy-load");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    server.stop().await;
}
