//! The `ivy` command-line client against the real server, including `ivy sub` under a proxy
//! that cuts connections while events flow.

use std::process::Stdio;
use std::time::Duration;

use ivy_tests::{FaultProxy, TestServer, ivy_bin, log_text, temp_dir};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn ivy(url: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = tokio::process::Command::new(ivy_bin())
        .arg("--url")
        .arg(url)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input.as_bytes()).await.unwrap();
        drop(w);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("ivy finished").expect("output");
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn is_ts(s: &str) -> bool {
    s.len() == 20 && s.as_bytes()[10] == b'.' && s.bytes().enumerate().all(|(i, b)| i == 10 || b.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_send_log_and_errors() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = format!("ws://{}", server.addr);

    let (code, out, _) = ivy(&url, &["time"], None).await;
    assert_eq!(code, 0);
    assert!(is_ts(out.trim()), "{out}");

    let (code, out, _) = ivy(&url, &["send", "/c", "one: 100%"], None).await;
    assert_eq!(code, 0);
    let t1 = out.trim().to_string();
    assert!(is_ts(&t1));
    let (code, out, _) = ivy(&url, &["send", "c/x"], Some("two\nthree\nfour\n")).await;
    assert_eq!(code, 0);
    let ts: Vec<&str> = out.lines().collect();
    assert_eq!(ts.len(), 3);
    assert!(ts.windows(2).all(|w| w[0] < w[1]) && ts[0] > t1.as_str());

    let (code, out, _) = ivy(&url, &["log", "/c"], None).await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("{}\n", log_text(server.addr, "/log/c").await));
    assert_eq!(out.lines().count(), 4);
    assert!(out.starts_with(&format!("@{t1}:/c:one: 100%25\n")));
    let (_, out, _) = ivy(&url, &["log", "/c", "--limit", "2"], None).await;
    assert_eq!(out.lines().count(), 2);
    let (_, out, _) = ivy(&url, &["log", "/c", "-n", "1"], None).await;
    assert_eq!(out, format!("@{}:/c/x:four\n", ts[2]));
    let (_, out, _) = ivy(&url, &["log", "/c", "--after", ts[1]], None).await;
    assert_eq!(out, format!("@{}:/c/x:four\n", ts[2]));

    // The URL from the environment.
    let out = tokio::process::Command::new(ivy_bin()).arg("time").env("IVY_URL", &url).output().await.unwrap();
    assert!(out.status.success());

    // Errors: refused by the server (1), usage (2), cannot connect (3).
    let (code, _, err) = ivy(&url, &["send", "/Bad", "x"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid path"), "{err}");
    let (code, _, err) = ivy(&url, &["log", "/c", "-n", "0"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid line count"), "{err}");
    let (code, _, err) = ivy(&url, &["log", "/c", "--after", "yesterday"], None).await;
    assert_eq!(code, 2);
    assert!(err.contains("--after"), "{err}");
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (code, _, err) = ivy(&format!("ws://{dead}"), &["time"], None).await;
    assert_eq!(code, 3);
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, err) = ivy("wss://secure.example", &["time"], None).await;
    assert_eq!(code, 3);
    assert!(err.contains("invalid server URL"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_prints_exactly_the_log_through_random_cuts() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let proxy = FaultProxy::start(server.addr).await;
    let n = 1000;
    let url = format!("ws://{}", server.addr);
    let mut child = tokio::process::Command::new(ivy_bin())
        .args(["--url", &proxy.url(), "sub", "--from-beginning", "/s", "--count", &(n + 1).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first connection must succeed (a failed first connect is exit code 3, by design):
    // wait for one event to come through before the chaos starts.
    let (code, _, err) = ivy(&url, &["send", "/s/x", "warm-up"], None).await;
    assert_eq!(code, 0, "{err}");
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("first line in time").unwrap().unwrap();
    let mut printed = vec![first];
    let chaos = proxy.chaos(42, Duration::from_secs(3));
    // Publish through the CLI too: stdin lines, pipelined.
    let input: String = (0..n).map(|i| format!("event {i} 50%\n")).collect();
    let (code, out, err) = ivy(&url, &["send", "/s/x"], Some(&input)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), n);
    let n = n + 1;
    while printed.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) => printed.push(l),
            other => panic!("after {} lines: {other:?}", printed.len()),
        }
    }
    chaos.await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "ivy sub exits after --count events");
    let log: Vec<String> = log_text(server.addr, "/log/s").await.lines().map(str::to_string).collect();
    assert_eq!(printed, log);
    server.stop().await;
}
