//! `ivy-server` as an operator meets it: startup errors that name the path and what to do,
//! logs for pipes (no colour codes) and for collectors (`--log-format json`), connections
//! logged at info, and the `--listen` forms.

use std::process::Stdio;
use std::time::Duration;

use ivy_tests::{Client, WAIT, server_bin, temp_dir};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A store that cannot be opened: the error names its path and the flag to change it, the
/// exit code is 1, and "listening" is never printed.
#[tokio::test]
async fn a_store_that_cannot_be_opened_is_named_and_nothing_listens() {
    let dir = temp_dir();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let data = file.join("data");
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(server_bin()).args(["--listen", "127.0.0.1:0", "--data"]).arg(&data).kill_on_drop(true).output(),
    )
    .await
    .expect("exited in time")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains(&format!("cannot open the event store in {}", data.display())), "{stderr}");
    assert!(stderr.contains("--data"), "{stderr}");
}

/// Starts the binary on the memory engine with `flags`, its stderr piped with `RUST_LOG`
/// unset (the default, info); returns it, its address and its stderr lines.
async fn start(flags: &[&str]) -> (tokio::process::Child, String, tokio::io::Lines<BufReader<tokio::process::ChildStderr>>) {
    let mut child = tokio::process::Command::new(server_bin())
        .args(["--memory", "--listen", "127.0.0.1:0"])
        .args(flags)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, stdout.next_line()).await.unwrap().unwrap().unwrap();
    let addr = line.rsplit("http://").next().unwrap().trim().to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, addr, stderr)
}

/// Log lines up to and including the first that contains `needle`.
async fn lines_until(stderr: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stderr.next_line()).await {
            Ok(Ok(Some(l))) => {
                let done = l.contains(needle);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            other => panic!("no log line with {needle:?} ({other:?}); saw {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_have_no_colour_codes_and_connections_are_logged_at_info() {
    let (mut child, addr, mut stderr) = start(&[]).await;
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    let _ = c.publish("/x", "y").await;
    c.close().await;
    let mut seen = lines_until(&mut stderr, "connected").await;
    seen.extend(lines_until(&mut stderr, "disconnected").await);
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "{seen:?}");
    // At the default level no library's debug lines (tungstenite's "Received close frame"
    // used to show, from the directive that kept its trace lines out).
    assert!(seen.iter().all(|l| !l.contains("DEBUG") && !l.contains("TRACE")), "{seen:?}");
    let connected = seen.iter().find(|l| l.contains(" connected")).expect("a connected line");
    assert!(connected.contains("INFO") && connected.contains("peer=127.0.0.1"), "{connected}");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line() {
    let (mut child, addr, mut stderr) = start(&["--log-format", "json"]).await;
    let c = Client::connect(&format!("ws://{addr}/ws")).await;
    c.close().await;
    let seen = lines_until(&mut stderr, "disconnected").await;
    for line in &seen {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
    let connected: serde_json::Value = serde_json::from_str(seen.iter().find(|l| l.contains("\"connected\"")).unwrap()).unwrap();
    assert_eq!(connected["level"], "INFO");
    assert_eq!(connected["fields"]["peer"], "127.0.0.1");
    child.kill().await.unwrap();
}

/// `--listen PORT` is 127.0.0.1:PORT, and durations take units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_forms_and_duration_units() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(server_bin())
        .args(["--memory", "--listen", &port.to_string(), "--ping-interval", "1500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, stdout.next_line()).await.unwrap().unwrap().unwrap();
    assert_eq!(line, format!("ivy-server listening on http://127.0.0.1:{port}"));
    child.kill().await.unwrap();
}
