//! The `ivy` command-line client against the real server, including `ivy sub` under a proxy
//! that cuts connections while events flow.

use std::process::Stdio;
use std::time::Duration;

use ivy_tests::{Client, FaultProxy, ServerProcess, TestServer, ivy_bin, log_text, temp_dir};
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

    // `pub` is `send`; `time --human` is a UTC date.
    let (code, out, _) = ivy(&url, &["pub", "/c", "five"], None).await;
    assert_eq!(code, 0);
    assert!(is_ts(out.trim()), "{out}");
    let (code, out, _) = ivy(&url, &["time", "--human"], None).await;
    assert_eq!(code, 0);
    let date = out.trim();
    assert!(date.len() == 30 && date.starts_with("20") && date.ends_with('Z') && date.as_bytes()[10] == b'T', "{out}");

    // Errors: refused by the server (1), usage (2: found before connecting, so the same
    // against a dead address), cannot connect (3).
    let (code, _, err) = ivy(&url, &["send", "/c", &"x".repeat(70_000)], None).await;
    assert_eq!(code, 1, "{err}");
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dead = format!("ws://{dead}");
    for (args, says) in [
        (&["send", "/Bad", "x"][..], "invalid path"),
        (&["sub", "/a", "/Bad"][..], "invalid path"),
        (&["log", "/c", "-n", "0"][..], "--last"),
        (&["log", "/c", "--limit", "0"][..], "--limit"),
        (&["sub", "/c", "--count", "0"][..], "--count"),
        (&["log", "/c", "--after", "yesterday"][..], "--after"),
        (&["log", "/c", "--json", "--raw"][..], "--raw"),
    ] {
        let (code, _, err) = ivy(&dead, args, None).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    for bad_url in ["ftp://x", "ws://"] {
        let (code, _, err) = ivy(bad_url, &["time"], None).await;
        assert_eq!(code, 2, "{bad_url}: {err}");
        assert!(err.contains("--url"), "{err}");
    }
    for args in [&["time"][..], &["send", "/c", "x"], &["sub", "/c"], &["log", "/c"]] {
        let (code, _, err) = ivy(&dead, args, None).await;
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.contains("cannot connect"), "{args:?}: {err}");
    }
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

fn spawn_ivy(url: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(ivy_bin())
        .arg("--url")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy")
}

fn interrupt(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
}

async fn exit_code(child: &mut tokio::process::Child) -> i32 {
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("ivy exited in time").unwrap();
    status.code().expect("an exit code")
}

/// `--json` and `--raw`, for `sub` and `log`: the data unescaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_raw_output() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let sub = spawn_ivy(&url, &["sub", "--from-beginning", "--json", "/j", "--count", "2"]);
    let raw_sub = spawn_ivy(&url, &["sub", "--from-beginning", "--raw", "/j", "--count", "2"]);
    // A send's data is taken as it is (event lines escape % as %25 and a newline as %0A).
    let mut c = Client::connect(&server.ws_url()).await;
    let t1 = c.publish("/j/a", "say \"hi\" 100% é").await;
    let t2 = c.publish("/j", "two\nlines").await;
    let json = format!(
        "{{\"ts\":\"{t1}\",\"path\":\"/j/a\",\"data\":\"say \\\"hi\\\" 100% é\"}}\n{{\"ts\":\"{t2}\",\"path\":\"/j\",\"data\":\"two\\nlines\"}}\n"
    );
    let raw = "say \"hi\" 100% é\ntwo\nlines\n";
    let (code, out, _) = ivy(&url, &["log", "/j", "--json"], None).await;
    assert_eq!(code, 0);
    assert_eq!(out, json);
    let (_, out, _) = ivy(&url, &["log", "/j", "--raw"], None).await;
    assert_eq!(out, raw);
    let out = tokio::time::timeout(Duration::from_secs(10), sub.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), json);
    let out = tokio::time::timeout(Duration::from_secs(10), raw_sub.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), raw);
    c.close().await;
    server.stop().await;
}

/// `ivy send` with a live standard input publishes each line when it is read (not at EOF or
/// after 256 lines), and at Ctrl-C keeps what was sent and exits 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_publishes_stdin_lines_as_they_arrive() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let mut child = spawn_ivy(&url, &["send", "/live"]);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    for word in ["first", "second", "third"] {
        stdin.write_all(format!("{word}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
        // Its timestamp comes while standard input is still open.
        let ts = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await.expect("a timestamp before EOF").unwrap().unwrap();
        assert!(is_ts(&ts), "{ts}");
        acked.push(format!("@{ts}:/live:{word}"));
        assert_eq!(log_text(server.addr, "/log/live").await, acked.join("\n"));
    }
    // Ctrl-C with standard input still open: exits 130, nothing sent is lost.
    interrupt(&child);
    assert_eq!(exit_code(&mut child).await, 130);
    assert_eq!(log_text(server.addr, "/log/live").await, acked.join("\n"));
    drop(stdin);
    server.stop().await;
}

/// `ivy sub ... | head -1`: once the reader of its output has gone, `sub` ends at once, not at
/// its next event; Ctrl-C ends it with 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_ends_when_its_reader_goes_and_at_ctrl_c() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let mut child = spawn_ivy(&url, &["sub", "--from-beginning", "/h"]);
    let (code, _, err) = ivy(&url, &["send", "/h", "one"], None).await;
    assert_eq!(code, 0, "{err}");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(first.ends_with(":/h:one"), "{first}");
    drop(lines);
    assert_eq!(exit_code(&mut child).await, 0, "ended with no further event");

    let mut child = spawn_ivy(&url, &["sub", "/h"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Live from its start, which comes some time after the spawn: send until one is printed.
    let mut printed = false;
    for i in 0..50 {
        let (code, _, _) = ivy(&url, &["send", "/h", &format!("more {i}")], None).await;
        assert_eq!(code, 0);
        if let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
            printed = true;
            break;
        }
    }
    assert!(printed, "sub printed nothing");
    interrupt(&child);
    assert_eq!(exit_code(&mut child).await, 130);
    server.stop().await;
}

/// `ivy log` reads over HTTP alone: it never opens the WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_needs_no_websocket() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let (code, _, _) = ivy(&format!("ws://{}", server.addr), &["send", "/l", "x"], None).await;
    assert_eq!(code, 0);
    // A proxy that records the first line of every request it forwards.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = seen.clone();
    let upstream = server.addr;
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n") {
                    if tokio::io::AsyncReadExt::read(&mut down, &mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                recorded.lock().unwrap().push(String::from_utf8_lossy(&head).trim_end().to_string());
                let mut up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                up.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    let (code, out, err) = ivy(&format!("ws://{proxy}"), &["log", "/l"], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with(":/l:x\n"), "{out}");
    assert_eq!(*seen.lock().unwrap(), ["GET /log/l HTTP/1.1"]);
    server.stop().await;
}

/// `ivy sub` says on stderr when its connection is lost and when it is back (not with
/// `--quiet`), and prints every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_reports_reconnects_on_stderr() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let proxy = FaultProxy::start(server.addr).await;
    let url = format!("ws://{}", server.addr);
    for quiet in [false, true] {
        let mut args = vec!["sub", "--from-beginning", "/r", "--count", "2"];
        if quiet {
            args.push("--quiet");
        }
        let mut child = spawn_ivy(&proxy.url(), &args);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (code, _, _) = ivy(&url, &["send", "/r", if quiet { "q1" } else { "one" }], None).await;
        assert_eq!(code, 0);
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap().unwrap();
        proxy.cut_all();
        let (code, _, _) = ivy(&url, &["send", "/r", if quiet { "q2" } else { "two" }], None).await;
        assert_eq!(code, 0);
        let mut printed = vec![first];
        while let Ok(Ok(Some(l))) = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            printed.push(l);
        }
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
        assert!(out.status.success());
        let log: Vec<String> = log_text(server.addr, "/log/r").await.lines().map(str::to_string).collect();
        assert_eq!(printed, log[..2], "quiet: {quiet}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        if quiet {
            assert_eq!(stderr, "");
        } else {
            let says = format!("ivy: disconnected from {0}; reconnecting\nivy: reconnected to {0}\n", proxy.url());
            assert_eq!(stderr, says);
        }
    }
    server.stop().await;
}

async fn next_line(out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(30), out.next_line()).await.expect("a line in time").expect("read")
}

/// `ivy send` across a SIGKILL and restart of the real server (issue 16): a line the server
/// stored but whose ack never reached `ivy` (the replies held, then the server killed) is resent
/// with its send id once `ivy` has reconnected to the restarted server, which answers with the
/// first timestamp. Each line's timestamp is printed once, in order, and the log holds each line
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_resends_across_a_server_restart_and_prints_each_timestamp_once() {
    let dir = temp_dir();
    let mut server = ServerProcess::start_sled(dir.path(), &[]).await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut child = tokio::process::Command::new(ivy_bin())
        .arg("--url")
        .arg(proxy.url())
        .args(["send", "/r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    stdin.write_all(b"one\n").await.unwrap();
    let mut printed = vec![next_line(&mut out).await.expect("the first timestamp")];

    proxy.hold_replies(true);
    stdin.write_all(b"two\n").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while log_text(server.addr, "/log/r").await.lines().count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the server stores the second line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().await;
    server = ServerProcess::start_sled(dir.path(), &[]).await;
    proxy.set_upstream(server.addr);
    // Cut first, then release the replies: the held ack (in the proxy's socket) never reaches
    // `ivy`, whose next connection waits for the release.
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.hold_replies(false);
    // A third line meanwhile: sent after the resend of the second.
    stdin.write_all(b"three\n").await.unwrap();
    drop(stdin);
    while let Some(line) = next_line(&mut out).await {
        printed.push(line);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = log_text(server.addr, "/log/r").await.lines().map(str::to_string).collect();
    let data: Vec<&str> = log.iter().map(|l| l.rsplit(':').next().unwrap()).collect();
    assert_eq!(data, ["one", "two", "three"], "each line stored once");
    let stored: Vec<&str> = log.iter().map(|l| &l[1..21]).collect();
    assert_eq!(printed, stored, "each timestamp printed once, the second the first one's");
    let metrics = ivy_tests::http_get(server.addr, "/metrics", &[]).await.text();
    assert!(metrics.lines().any(|l| l == "ivy_idempotency_replays_total 1"), "the second line was resent and recognized");
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains("; reconnecting") && stderr.contains("ivy: reconnected to"), "{stderr}");
    server.kill().await;
}

/// `ivy send --retry-for`: a send that cannot be acknowledged within the budget (the server
/// is gone for good) ends `ivy` with exit code 1, saying that the event may or may not be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_gives_up_after_its_retry_budget() {
    let dir = temp_dir();
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut child = tokio::process::Command::new(ivy_bin())
        .arg("--url")
        .arg(proxy.url())
        .args(["send", "/g", "--retry-for", "1s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    stdin.write_all(b"one\n").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), out.next_line()).await.unwrap().unwrap().expect("a timestamp");
    assert!(is_ts(&first), "{first}");
    // The replies stop (a server that hangs), then the server is gone.
    proxy.hold_replies(true);
    stdin.write_all(b"two\n").await.unwrap();
    drop(stdin);
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("no ack within 1s (--retry-for)") && stderr.contains("may or may not have been stored"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "gave up after about a second: {:?}", started.elapsed());
    server.kill().await;
}
