//! The operations endpoints (issue 16) against the real `ivy-server` binary over real HTTP:
//! `/healthz`, `/readyz` (ready, then failing when the store is full and while the server
//! shuts down), `/info`, `/metrics` (its text parsed line by line as the Prometheus
//! exposition format, its values following the events that flow), the API key that
//! `--ops-require-api-key` asks for, and `ivy info`.

use std::collections::HashMap;
use std::time::Duration;

use ivy_tests::{Client, EngineKind, Got, HttpResponse, ServerProcess, WAIT, http_get, ivy_bin, temp_dir};
use serde_json::Value;

/// Polls `GET target` until `done` holds for its response (at most [`WAIT`]); the last one.
async fn poll(server: &ServerProcess, target: &str, done: impl Fn(&HttpResponse) -> bool) -> HttpResponse {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = http_get(server.addr, target, &[]).await;
        if done(&r) || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sample line of the exposition format: its series (name and labels, as written) and
/// value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(s, v)| (s.to_string(), v.parse().unwrap()))
        .collect()
}

fn value(text: &str, series: &str) -> f64 {
    *samples(text).get(series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Checks every line of `text` against the Prometheus text format (version 0.0.4): `# HELP
/// name text`, `# TYPE name type` before the samples of `name`, and samples `name{l="v",...}
/// value` whose name is the family's (histograms: `_bucket`, `_sum`, `_count`), with a
/// number for a value; a histogram's buckets ascend in `le`, never decrease in count, and end
/// with `+Inf` equal to `_count`. Returns the families and their types.
fn check_exposition(text: &str) -> HashMap<String, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut current: Option<(String, String)> = None;
    let mut buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    assert!(text.ends_with('\n'), "the text ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(is_name(name) && !help.is_empty(), "{line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without type: {line}"));
            assert!(is_name(name), "{line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice for {name}");
            current = Some((name.to_string(), kind.to_string()));
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
            let (series, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample without value: {line}"));
            let v: f64 = match v {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a number: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"))),
                None => (series, ""),
            };
            assert!(is_name(name), "{line}");
            let mut le = None;
            for label in labels.split(',').filter(|l| !l.is_empty()) {
                let (k, val) = label.split_once('=').unwrap_or_else(|| panic!("label without value: {line}"));
                assert!(is_name(k) && val.starts_with('"') && val.ends_with('"') && val.len() >= 2, "{line}");
                if k == "le" {
                    le = Some(val.trim_matches('"').to_string());
                }
            }
            let (family, kind) = current.as_ref().unwrap_or_else(|| panic!("a sample before any TYPE: {line}"));
            match kind.as_str() {
                "histogram" => {
                    let suffix = name.strip_prefix(family.as_str()).unwrap_or_else(|| panic!("{name} outside {family}"));
                    assert!(["_bucket", "_sum", "_count"].contains(&suffix), "{line}");
                    let key = format!("{family}|{}", labels.split(',').filter(|l| !l.starts_with("le=")).collect::<Vec<_>>().join(","));
                    if suffix == "_bucket" {
                        let le = le.unwrap_or_else(|| panic!("a bucket without le: {line}"));
                        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
                        buckets.entry(key).or_default().push((le, v));
                    } else if suffix == "_count" {
                        let b = buckets.get(&key).unwrap_or_else(|| panic!("_count before buckets: {line}"));
                        assert!(b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "buckets of {key}: {b:?}");
                        assert_eq!(b.last().map(|l| l.0), Some(f64::INFINITY), "{key} ends with +Inf");
                        assert_eq!(b.last().map(|l| l.1), Some(v), "{key}: +Inf bucket equals _count");
                    }
                }
                // A counter's family is named with its `_total`.
                _ => assert_eq!(name, family, "{line}"),
            }
            assert!(v >= 0.0 || kind == "gauge", "{line}");
        }
    }
    types
}

async fn metrics(server: &ServerProcess) -> String {
    let r = http_get(server.addr, "/metrics", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = r.text();
    check_exposition(&text);
    text
}

async fn info(server: &ServerProcess) -> Value {
    let r = http_get(server.addr, "/info", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn healthz_and_readyz_answer_on_a_fresh_server_and_the_probe_is_in_no_log() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let h = http_get(server.addr, "/healthz", &[]).await;
    assert_eq!((h.status, h.text().as_str()), (200, "ok\n"));
    assert_eq!(h.header("cache-control"), Some("no-store"));
    let r = http_get(server.addr, "/readyz", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // A root subscriber and the root's log see the events, never a probe.
    let mut root = Client::connect(&server.ws_url()).await;
    root.subscribe("/").await;
    let mut publisher = Client::connect(&server.ws_url()).await;
    let ts = publisher.publish("/a", "one").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(http_get(server.addr, "/readyz", &[]).await.status, 200);
    }
    assert_eq!(root.recv().await, format!("@{ts}:/a:one"));
    root.expect_silence(Duration::from_millis(300)).await;
    let log = http_get(server.addr, "/log/", &[]).await;
    assert_eq!(log.text(), format!("@{ts}:/a:one"));
    // The probes were no events.
    assert_eq!(info(&server).await["events_published"], 1);
    let text = metrics(&server).await;
    assert_eq!(value(&text, "ivy_events_published_total"), 1.0);
    assert_eq!(value(&text, "ivy_group_commit_events_sum"), 1.0);
}

/// The store fills up (`--max-store-size` a little above a fresh store's size): sends are
/// refused with `store-full`, and `/readyz` says why with a 503 (after at most a second of
/// the previous probe's answer); `/healthz` stays 200.
#[tokio::test]
async fn readyz_fails_once_the_store_is_full() {
    let dir = temp_dir();
    let limit = (fresh_store_size().await + (256 << 10)).to_string();
    let server =
        ServerProcess::start_sled(dir.path(), &["--max-store-size", &limit, "--byte-rate", "0", "--byte-rate-per-identity", "0"]).await;
    assert_eq!(http_get(server.addr, "/readyz", &[]).await.status, 200);
    let mut c = Client::connect(&server.ws_url()).await;
    let data = "x".repeat(60_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut refused = None;
    for i in 0.. {
        let reply = c.request(&format!("#{i}#:/fill:{data}")).await;
        if reply.contains("!store-full") {
            refused = Some(reply);
            break;
        }
        assert!(reply.starts_with(&format!("#{i}#@")), "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "the store did not fill up");
    }
    let refused = refused.unwrap();
    let r = poll(&server, "/readyz", |r| r.status == 503).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.text();
    assert!(body.starts_with("not ready: the event store takes no events: ") && body.contains("the store is full"), "{body}");
    assert_eq!(body.lines().count(), 1, "one line: {body}");
    assert!(refused.contains("the store is full"), "{refused}");
    assert_eq!(http_get(server.addr, "/healthz", &[]).await.status, 200);
    let text = metrics(&server).await;
    assert!(value(&text, "ivy_events_refused_total{reason=\"store_full\"}") >= 1.0, "{text}");
}

/// The size of a fresh sled store: a server started and stopped on an empty directory.
async fn fresh_store_size() -> u64 {
    let dir = temp_dir();
    let server = ServerProcess::start_sled(dir.path(), &[]).await;
    server.terminate().await;
    fn size(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| if e.file_type().unwrap().is_dir() { size(&e.path()) } else { e.metadata().unwrap().len() })
            .sum()
    }
    size(dir.path())
}

/// SIGTERM with `--shutdown-delay`: `/readyz` answers 503 at once while everything else goes
/// on serving (a connection sends and is acknowledged), then the server stops.
#[tokio::test]
async fn readyz_fails_during_shutdown_while_the_server_still_serves() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &["--shutdown-delay", "3s"]).await;
    assert_eq!(http_get(server.addr, "/readyz", &[]).await.status, 200);
    let mut c = Client::connect(&server.ws_url()).await;
    let pid = server.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let r = poll(&server, "/readyz", |r| r.status == 503).await;
    assert_eq!((r.status, r.text().as_str()), (503, "not ready: shutting down (draining before the shutdown)\n"));
    assert_eq!(http_get(server.addr, "/healthz", &[]).await.status, 200);
    c.publish("/during", "drain").await;
    // Then the connection is closed with 1001 and the process exits cleanly.
    match c.next_within(Duration::from_secs(15)).await {
        Got::Close(code, _) => assert_eq!(code, 1001),
        other => panic!("expected a close 1001, got {other:?}"),
    }
    let status = server.wait().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn info_states_the_version_node_engine_and_counts() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &["--node-id", "eu-1.a"]).await;
    let mut a = Client::connect(&server.ws_url()).await;
    let mut b = Client::connect(&server.ws_url()).await;
    a.subscribe("/x").await;
    a.subscribe("/y").await;
    b.subscribe("/x").await;
    for i in 0..5 {
        b.publish("/z", &i.to_string()).await;
    }
    let i = info(&server).await;
    assert_eq!(i["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(i["node_id"], "eu-1.a");
    let engine = match EngineKind::from_env() {
        EngineKind::Memory => "memory",
        EngineKind::Redis => "redis",
        EngineKind::Sled => "sled",
    };
    assert_eq!(i["engine"], engine);
    assert!(i["uptime_seconds"].as_u64().is_some(), "{i}");
    assert_eq!(i["connections"], 2);
    assert_eq!(i["subscriptions"], 3);
    assert_eq!(i["events_published"], 5);
    let keys: Vec<&str> = i.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 7, "{keys:?}");
    a.close().await;
    let gone = async {
        loop {
            if info(&server).await["connections"] == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, gone).await.expect("the closed connection leaves the count");
    assert_eq!(info(&server).await["subscriptions"], 1);
    // Without --node-id: a random one per start.
    let other_dir = temp_dir();
    let other = ServerProcess::start(other_dir.path(), &[]).await;
    let id = info(&other).await["node_id"].as_str().unwrap().to_string();
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
}

#[tokio::test]
async fn a_bad_node_id_is_refused_at_startup() {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(ivy_tests::server_bin()).args(["--memory", "--listen", "127.0.0.1:0", "--node-id", "a b"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid node id"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Events flow, and the counters follow exactly: N events to two subscribers make N
/// published and 2N deliveries of exactly the bytes received; a log read is counted; the
/// gauges show the connections and subscriptions.
#[tokio::test]
async fn metrics_parse_and_follow_the_events() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let before = metrics(&server).await;
    let types = check_exposition(&before);
    for (family, kind) in [
        ("ivy_connections", "gauge"),
        ("ivy_subscriptions", "gauge"),
        ("ivy_events_published_total", "counter"),
        ("ivy_deliveries_total", "counter"),
        ("ivy_delivered_bytes_total", "counter"),
        ("ivy_connections_closed_total", "counter"),
        ("ivy_commands_refused_total", "counter"),
        ("ivy_group_commit_events", "histogram"),
        ("ivy_group_commit_seconds", "histogram"),
        ("ivy_log_reads_total", "counter"),
        ("ivy_log_read_seconds", "histogram"),
        ("ivy_outbound_queue_bytes", "gauge"),
        ("ivy_outbound_queue_bytes_max", "gauge"),
    ] {
        assert_eq!(types.get(family).map(String::as_str), Some(kind), "{family} in\n{before}");
    }
    assert_eq!(value(&before, "ivy_deliveries_total"), 0.0);
    let mut subs = [Client::connect(&server.ws_url()).await, Client::connect(&server.ws_url()).await];
    for s in &mut subs {
        s.subscribe("/m").await;
    }
    let mut publisher = Client::connect(&server.ws_url()).await;
    const N: usize = 20;
    for i in 0..N {
        publisher.publish("/m/x", &format!("event {i}")).await;
    }
    let mut bytes = 0;
    for s in &mut subs {
        for _ in 0..N {
            bytes += s.recv().await.len();
        }
    }
    let log = http_get(server.addr, "/log/m", &[]).await;
    assert_eq!(log.status, 200);
    let after = metrics(&server).await;
    assert_eq!(value(&after, "ivy_events_published_total"), N as f64);
    assert_eq!(value(&after, "ivy_deliveries_total"), (2 * N) as f64);
    assert_eq!(value(&after, "ivy_delivered_bytes_total"), bytes as f64);
    assert_eq!(value(&after, "ivy_group_commit_events_sum"), N as f64);
    assert!(value(&after, "ivy_group_commit_events_count") >= 1.0);
    assert_eq!(value(&after, "ivy_group_commit_seconds_count"), value(&after, "ivy_group_commit_events_count"));
    assert_eq!(value(&after, "ivy_connections"), 3.0);
    assert_eq!(value(&after, "ivy_subscriptions"), 2.0);
    assert_eq!(value(&after, "ivy_log_reads_total{code=\"200\"}"), 1.0);
    assert_eq!(value(&after, "ivy_log_read_seconds_count"), 1.0);
    // OpenMetrics when asked for it.
    let open = http_get(server.addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")]).await;
    assert_eq!(open.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(open.text().ends_with("# EOF\n"), "{}", open.text());
}

/// A message over `--max-message-size` closes its connection with 1009, counted by code;
/// a refused write (no grant) and rate-limited commands are counted by reason, as many as the
/// client was refused.
#[tokio::test]
async fn closes_and_refusals_are_counted() {
    let dir = temp_dir();
    let secret = "ops-test-secret";
    let server = ServerProcess::start(
        dir.path(),
        &["--max-message-size", "1024", "--auth-hmac-secret", secret, "--anonymous-read", "/", "--rate-limit", "1", "--rate-burst", "5"],
    )
    .await;
    let mut big = Client::connect(&server.ws_url()).await;
    big.send(&format!(":/a:{}", "x".repeat(2000))).await;
    match big.next_within(WAIT).await {
        Got::Close(code, _) => assert_eq!(code, 1009),
        other => panic!("expected a close 1009, got {other:?}"),
    }
    // Anonymous: may read, not write.
    let mut c = Client::connect(&server.ws_url()).await;
    let reply = c.request("#w#:/a:no").await;
    assert!(reply.starts_with("#w#!forbidden "), "{reply}");
    let mut limited = 0;
    for i in 0..20 {
        if c.request(&format!("#t{i}#@")).await.contains("!rate-limited") {
            limited += 1;
        }
    }
    assert!(limited > 0);
    let closed = async {
        loop {
            let text = metrics(&server).await;
            if samples(&text).get("ivy_connections_closed_total{code=\"1009\"}") == Some(&1.0) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let text = tokio::time::timeout(WAIT, closed).await.expect("the 1009 close is counted");
    assert_eq!(value(&text, "ivy_commands_refused_total{reason=\"forbidden\"}"), 1.0);
    assert_eq!(value(&text, "ivy_commands_refused_total{reason=\"rate_limited\"}"), f64::from(limited));
    assert_eq!(value(&text, "ivy_connections_closed_total{code=\"4000\"}"), 0.0);
}

/// `--ops-require-api-key`: `/info` and `/metrics` need the key; the health checks do not.
#[tokio::test]
async fn info_and_metrics_can_require_the_api_key() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &["--api-key", "k-ops", "--ops-require-api-key"]).await;
    for target in ["/info", "/metrics"] {
        let r = http_get(server.addr, target, &[]).await;
        assert_eq!(r.status, 401, "{target}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(http_get(server.addr, target, &[("Authorization", "Bearer wrong")]).await.status, 401, "{target}");
        assert_eq!(http_get(server.addr, target, &[("Authorization", "Bearer k-ops")]).await.status, 200, "{target}");
    }
    assert_eq!(http_get(server.addr, "/healthz", &[]).await.status, 200);
    assert_eq!(http_get(server.addr, "/readyz", &[]).await.status, 200);
    // Without a key to require, the server does not start.
    let out = tokio::process::Command::new(ivy_tests::server_bin())
        .args(["--memory", "--listen", "127.0.0.1:0", "--ops-require-api-key"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-key"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `--allowed-host` guards the protocol's endpoints and everything else, not the health
/// checks (which address the server by its IP).
#[tokio::test]
async fn the_health_checks_answer_whatever_the_host_name() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &["--allowed-hosts", "chat.example"]).await;
    for target in ["/healthz", "/readyz", "/info", "/metrics"] {
        assert_eq!(http_get(server.addr, target, &[]).await.status, 200, "{target}");
    }
    for target in ["/log/", "/anything"] {
        assert_eq!(http_get(server.addr, target, &[]).await.status, 421, "{target}");
    }
}

#[tokio::test]
async fn ivy_info_prints_the_server_info() {
    let dir = temp_dir();
    let server = ServerProcess::start(dir.path(), &["--node-id", "cli-node"]).await;
    let run = |json: bool| {
        let mut cmd = tokio::process::Command::new(ivy_bin());
        cmd.args(["--url", &server.http_url(), "info"]);
        if json {
            cmd.arg("--json");
        }
        cmd.output()
    };
    let out = tokio::time::timeout(WAIT, run(false)).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l == "node_id: cli-node"), "{text}");
    assert!(text.lines().any(|l| l == format!("version: {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.lines().any(|l| l == "connections: 0"), "{text}");
    let out = tokio::time::timeout(WAIT, run(true)).await.unwrap().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node_id"], "cli-node");
    // No server there: exit 3, as for the other commands.
    let out = tokio::process::Command::new(ivy_bin()).args(["--url", "ws://127.0.0.1:9", "info"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}
