//! The scenarios. Each starts a fresh server, drives it over WebSockets (or HTTP) on loopback,
//! and returns its figures as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Decoder, Ws};
use crate::servers::{Kind, Launch, Server};

/// Settings shared by the scenarios.
#[derive(Debug, Clone)]
pub struct Common {
    pub launch: Launch,
    pub payload: usize,
    pub per_address: usize,
    pub base: Instant,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[ivy-bench] {}", msg.as_ref());
}

/// Connects `n` clients (subscribed to the benchmark channel), 128 handshakes at a time.
async fn connect_subscribers(kind: Kind, addr: SocketAddr, n: usize, per_address: usize) -> Result<Vec<Ws>, String> {
    let done = AtomicU64::new(0);
    let first = (n > per_address).then(|| client::reserve_sources(n, per_address));
    let conns: Vec<Result<Ws, String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let done = &done;
            async move {
                let src = first.map(|first| client::source_ip(first, i, per_address));
                let mut ws = client::connect(kind, addr, src).await?;
                client::subscribe(kind, &mut ws).await?;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 1000 == 0 {
                    progress(format!("{}: {d}/{n} subscribers connected", kind.name()));
                }
                Ok(ws)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let conns = conns.into_iter().collect::<Result<Vec<_>, _>>()?;
    if kind == Kind::Ideal {
        // Registration happens right after the handshake, on the server's side.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(conns)
}

/// Reads deliveries until `stop`; counts them in `delivered`; with `base`, returns the
/// publish-to-receive latencies in microseconds.
async fn subscriber(kind: Kind, mut ws: Ws, stop: CancellationToken, delivered: Arc<AtomicU64>, base: Option<Instant>) -> Vec<u32> {
    let mut lat = Vec::new();
    let mut dec = Decoder::default();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let bytes = match msg {
            Some(Ok(Message::Text(t))) => tokio_tungstenite::tungstenite::Bytes::from(t),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(f))) => {
                progress(format!("{}: a subscriber was closed: {f:?}", kind.name()));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                progress(format!("{}: a subscriber failed: {e}", kind.name()));
                break;
            }
            None => break,
        };
        let mut n = 0;
        let now = base.map(|b| b.elapsed().as_nanos() as u64);
        dec.feed(kind, &bytes, |p| {
            n += 1;
            if let (Some(now), Some(sent)) = (now, client::sent_ns(p)) {
                lat.push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
            }
        });
        if n > 0 {
            delivered.fetch_add(n, Ordering::Relaxed);
        }
        if dec.ping {
            dec.ping = false;
            let _ = ws.send(Message::text("PONG\r\n")).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    lat
}

/// Waits until `delivered` reaches `target` or makes no progress for `stall`.
async fn wait_for(delivered: &AtomicU64, target: u64, stall: Duration) -> u64 {
    let mut last = delivered.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        let d = delivered.load(Ordering::Relaxed);
        if d >= target {
            return d;
        }
        if d != last {
            last = d;
            since = Instant::now();
        } else if since.elapsed() > stall {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn spawn_meter(name: &'static str, what: &'static str, counter: Arc<AtomicU64>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut last = counter.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = counter.load(Ordering::Relaxed);
            progress(format!("{name}: {now} {what} ({}/s)", now - last));
            last = now;
        }
    });
}

/// Fan-out: one publisher, `subs` subscribers, `events` events, at most `window` events in
/// flight (so that no queue overflows and no peer drops a slow consumer).
pub async fn fanout(kind: Kind, c: &Common, subs: usize, events: usize, window: usize) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    progress(format!("fan-out {}: {subs} subscribers, {events} events", kind.name()));
    let conns = connect_subscribers(kind, server.addr, subs, c.per_address).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let tasks: Vec<_> = conns.into_iter().map(|ws| tokio::spawn(subscriber(kind, ws, stop.clone(), delivered.clone(), None))).collect();
    let mut publisher = client::connect(kind, server.addr, None).await?;
    client::publisher_hello(kind, &mut publisher).await?;
    spawn_meter(kind.name(), "deliveries", delivered.clone(), stop.clone());
    let (subs_u, window_u) = (subs as u64, window as u64);
    let cpu0 = server.cpu_secs();
    let self0 = crate::servers::proc_cpu_secs(std::process::id());
    let t0 = Instant::now();
    for i in 0..events as u64 {
        while i * subs_u > delivered.load(Ordering::Relaxed) + window_u * subs_u {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let msg = client::publish_message(kind, &client::payload(c.base, c.payload), None);
        publisher.send(msg).await.map_err(|e| format!("publish: {e}"))?;
    }
    let target = events as u64 * subs_u;
    let got = wait_for(&delivered, target, Duration::from_secs(5)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.zip(server.cpu_secs()).map(|(a, b)| b - a);
    let client_cpu = self0.zip(crate::servers::proc_cpu_secs(std::process::id())).map(|(a, b)| b - a);
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    server.stop().await;
    let rate = got as f64 / secs;
    progress(format!("fan-out {}: {got}/{target} deliveries in {secs:.2} s: {rate:.0}/s, server CPU {cpu:?} s", kind.name()));
    Ok(json!({
        "server": kind.name(), "subscribers": subs, "events": events, "payload_bytes": c.payload, "window": window,
        "expected": target, "delivered": got, "secs": secs, "deliveries_per_s": rate,
        "server_cpu_s": cpu,
        "server_cpu_s_per_million": cpu.map(|c| c / got.max(1) as f64 * 1e6),
        "deliveries_per_server_cpu_s": cpu.map(|c| got as f64 / c.max(1e-9)),
        "client_cpu_s": client_cpu,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// Latency: `rate` events/s for `secs` seconds to `subs` subscribers.
pub async fn latency(kind: Kind, c: &Common, subs: usize, rate: f64, secs: f64) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    progress(format!("latency {}: {subs} subscribers, {rate} events/s for {secs} s", kind.name()));
    let conns = connect_subscribers(kind, server.addr, subs, c.per_address).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let tasks: Vec<_> =
        conns.into_iter().map(|ws| tokio::spawn(subscriber(kind, ws, stop.clone(), delivered.clone(), Some(c.base)))).collect();
    let mut publisher = client::connect(kind, server.addr, None).await?;
    client::publisher_hello(kind, &mut publisher).await?;
    spawn_meter(kind.name(), "deliveries", delivered.clone(), stop.clone());
    let total = (rate * secs) as u64;
    let cpu0 = server.cpu_secs();
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((t0.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while sent < due {
            let msg = client::publish_message(kind, &client::payload(c.base, c.payload), None);
            publisher.feed(msg).await.map_err(|e| format!("publish: {e}"))?;
            sent += 1;
        }
        publisher.flush().await.map_err(|e| format!("publish: {e}"))?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let target = total * subs as u64;
    let got = wait_for(&delivered, target, Duration::from_secs(3)).await;
    let cpu = cpu0.zip(server.cpu_secs()).map(|(a, b)| b - a);
    stop.cancel();
    let mut samples = Vec::with_capacity(target as usize);
    for t in tasks {
        if let Ok(v) = t.await {
            samples.extend(v);
        }
    }
    server.stop().await;
    samples.sort_unstable();
    let (p50, p99, p999) = (percentile(&samples, 0.5), percentile(&samples, 0.99), percentile(&samples, 0.999));
    progress(format!("latency {}: {got}/{target} delivered; p50 {p50:?} us, p99 {p99:?} us, p99.9 {p999:?} us", kind.name()));
    Ok(json!({
        "server": kind.name(), "subscribers": subs, "rate": rate, "secs": secs, "send_secs": send_secs,
        "expected": target, "delivered": got,
        "p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": samples.last(),
        "server_cpu_s": cpu,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// Durable publish: `senders` connections, each sending with an ack key and waiting for the
/// ack before the next, for `secs` seconds.
pub async fn durable(kind: Kind, c: &Common, senders: usize, secs: f64) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    progress(format!("durable {}: {senders} senders for {secs} s", kind.name()));
    let mut conns = Vec::new();
    for _ in 0..senders {
        conns.push(client::connect(kind, server.addr, None).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    spawn_meter(kind.name(), "acked", acked.clone(), stop.clone());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let cpu0 = server.cpu_secs();
    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            let (acked, base, size) = (acked.clone(), c.base, c.payload);
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let msg = client::publish_message(kind, &client::payload(base, size), Some("a"));
                    if ws.send(msg).await.is_err() {
                        errors += 1;
                        break;
                    }
                    loop {
                        match client::next(&mut ws).await {
                            Ok(m) if m.starts_with(b"#a#@") => {
                                acked.fetch_add(1, Ordering::Relaxed);
                                lat.push(t.elapsed().as_micros() as u32);
                                break;
                            }
                            Ok(m) if m.starts_with(b"#a#!") => {
                                errors += 1;
                                break;
                            }
                            Ok(_) => {}
                            Err(_) => return (lat, errors + 1),
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu0.zip(server.cpu_secs()).map(|(a, b)| b - a);
    stop.cancel();
    server.stop().await;
    lat.sort_unstable();
    let n = acked.load(Ordering::Relaxed);
    let rate = n as f64 / elapsed;
    progress(format!("durable {}: {senders} senders: {n} acked in {elapsed:.2} s: {rate:.0}/s", kind.name()));
    Ok(json!({
        "server": kind.name(), "senders": senders, "secs": elapsed, "acked": n, "acked_per_s": rate, "errors": errors,
        "ack_p50_us": percentile(&lat, 0.5), "ack_p99_us": percentile(&lat, 0.99),
        "server_cpu_s": cpu,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// Connections that store the events of the backfill and storage scenarios.
const FILL_CONNECTIONS: usize = 4;

/// Stores `events` events of `size` bytes on `channel` ([`FILL_CONNECTIONS`] connections,
/// `window` acked sends in flight in all); returns the seconds it took.
async fn fill(kind: Kind, c: &Common, addr: SocketAddr, channel: &str, events: usize, window: usize, size: usize) -> Result<f64, String> {
    // Several connections, each with its share of the window: one connection alone would be
    // held to the server's per-connection command rate limit.
    let mut conns = Vec::new();
    for _ in 0..FILL_CONNECTIONS {
        conns.push(client::connect(kind, addr, None).await?);
    }
    let t0 = Instant::now();
    let stored = Arc::new(AtomicU64::new(0));
    let fills: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let share = events / FILL_CONNECTIONS + usize::from(i < events % FILL_CONNECTIONS);
            let window = (window / FILL_CONNECTIONS).max(1);
            let (channel, stored, base, name) = (channel.to_owned(), stored.clone(), c.base, kind.name());
            tokio::spawn(async move {
                let (mut sent, mut acked) = (0usize, 0usize);
                while acked < share {
                    while sent < share && sent - acked < window {
                        let msg = Message::text(format!("#f#:{channel}:{}", client::payload(base, size)));
                        ws.feed(msg).await.map_err(|e| e.to_string())?;
                        sent += 1;
                    }
                    ws.flush().await.map_err(|e| e.to_string())?;
                    let m = client::next(&mut ws).await?;
                    if m.starts_with(b"#f#@") {
                        acked += 1;
                        let all = stored.fetch_add(1, Ordering::Relaxed) + 1;
                        if all % 20000 == 0 {
                            progress(format!("{name}: {all} stored"));
                        }
                    } else if m.starts_with(b"#f#!") {
                        return Err(String::from_utf8_lossy(&m).into_owned());
                    }
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for f in fills {
        f.await.map_err(|e| e.to_string())??;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// What reading a whole log took.
struct Read {
    events: usize,
    pages: usize,
    bytes: usize,
    secs: f64,
}

/// Reads `channel`'s whole log over `GET /log`, in cursor pages of `limit`, as the client core does.
async fn read_log(addr: SocketAddr, channel: &str, limit: usize) -> Result<Read, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let http: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let t0 = Instant::now();
    let mut after = "0000000000.000000000".to_owned();
    let (mut total, mut pages, mut bytes) = (0usize, 0usize, 0usize);
    loop {
        let uri: hyper::Uri = format!("http://{addr}/log{channel}?after={after}&limit={limit}").parse().map_err(|e| format!("{e}"))?;
        let resp = http.get(uri).await.map_err(|e| format!("GET: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET /log: {}", resp.status()));
        }
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        pages += 1;
        bytes += body.len();
        if body.is_empty() {
            break;
        }
        let n = body.iter().filter(|b| **b == b'\n').count() + 1;
        total += n;
        let last = &body[body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)..];
        let ts = last.get(1..).and_then(|l| l.split(|b| *b == b':').next()).ok_or("bad log line")?;
        after = String::from_utf8_lossy(ts).into_owned();
        // A page can also end early at the server's byte bound: only an empty page is the end.
    }
    Ok(Read { events: total, pages, bytes, secs: t0.elapsed().as_secs_f64() })
}

/// Backfill: stores `events` events ([`FILL_CONNECTIONS`] connections, `window` acked sends in
/// flight in all), then
/// reads them back over HTTP in cursor pages of each size in `limits`, as the client core does.
pub async fn backfill(kind: Kind, c: &Common, events: usize, window: usize, limits: &[usize]) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    progress(format!("backfill {}: storing {events} events", kind.name()));
    // A channel of its own, also when --ivy-addr reuses one server for every scenario.
    let channel =
        format!("/backfill/{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    let fill_secs = fill(kind, c, server.addr, &channel, events, window, c.payload).await?;
    let mut reads = Vec::new();
    for &limit in limits {
        let r = read_log(server.addr, &channel, limit).await?;
        progress(format!(
            "backfill {}: page limit {limit}: {} events in {} pages, {:.3} s: {:.0}/s",
            kind.name(),
            r.events,
            r.pages,
            r.secs,
            r.events as f64 / r.secs
        ));
        reads.push(json!({
            "page_limit": limit, "events": r.events, "pages": r.pages, "bytes": r.bytes, "secs": r.secs, "events_per_s": r.events as f64 / r.secs,
        }));
    }
    server.stop().await;
    Ok(json!({
        "server": kind.name(), "events": events, "fill_window": window, "fill_secs": fill_secs,
        "fill_acked_per_s": events as f64 / fill_secs, "reads": reads,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// Storage: for one path depth and event size, a fresh server stores `events` events on a path
/// of `depth` levels (`/l1/l2/...`); figures: the store's growth on disk per event and per
/// byte of data, the acked write rate, and the read rate of the whole log of the path itself
/// and of the root, page by page (limit 1,000), `passes` times each (the median pass is
/// reported). The per-connection byte rate is lifted (`IVY_BYTE_RATE=0`), so that what is
/// measured is the store.
pub async fn storage(kind: Kind, c: &Common, depth: usize, size: usize, events: usize, passes: usize) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start_with(kind, &c.launch, &[("IVY_BYTE_RATE", "0")]).await?;
    let data = server.data_dir();
    let empty = data.as_deref().map(dir_bytes);
    let channel: String = (1..=depth.max(1)).map(|i| format!("/l{i}")).collect();
    progress(format!("storage {}: {events} events of {size} bytes at depth {depth}", kind.name()));
    let fill_secs = fill(kind, c, server.addr, &channel, events, 64, size.max(20)).await?;
    let grown = data.as_deref().map(dir_bytes).zip(empty).map(|(a, b)| a.saturating_sub(b));
    // The median of `passes` reads of each log, alternated.
    let (mut leaves, mut roots) = (Vec::new(), Vec::new());
    for _ in 0..passes.max(1) {
        leaves.push(read_log(server.addr, &channel, 1000).await?);
        roots.push(read_log(server.addr, "/", 1000).await?);
    }
    for reads in [&mut leaves, &mut roots] {
        reads.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    }
    let (leaf, root) = (&leaves[leaves.len() / 2], &roots[roots.len() / 2]);
    if leaf.events < events || root.events < events {
        return Err(format!("read back {} and {} of {events} events", leaf.events, root.events));
    }
    server.stop().await;
    let per_event = grown.map(|g| g as f64 / events as f64);
    let amplification = per_event.map(|p| p / size as f64);
    progress(format!(
        "storage {}: depth {depth}, {size} B: {} B per event ({}x), write {:.0}/s, read leaf {:.0}/s, root {:.0}/s",
        kind.name(),
        per_event.map_or("?".into(), |p| format!("{p:.0}")),
        amplification.map_or("?".into(), |a| format!("{a:.2}")),
        events as f64 / fill_secs,
        leaf.events as f64 / leaf.secs,
        root.events as f64 / root.secs,
    ));
    Ok(json!({
        "server": kind.name(), "depth": depth, "payload_bytes": size, "events": events,
        "store_bytes": grown, "bytes_per_event": per_event, "amplification": amplification,
        "write_secs": fill_secs, "write_events_per_s": events as f64 / fill_secs,
        "write_mb_per_s": (events * size) as f64 / fill_secs / 1e6,
        "read_leaf_events_per_s": leaf.events as f64 / leaf.secs, "read_leaf_mb_per_s": leaf.bytes as f64 / leaf.secs / 1e6,
        "read_root_events_per_s": root.events as f64 / root.secs, "read_root_mb_per_s": root.bytes as f64 / root.secs / 1e6,
        "read_passes": passes,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// Idle connections: opens `n` WebSockets (each subscribed to one channel where the protocol
/// has channels) and reads the server's resident memory before and after.
pub async fn idle(kind: Kind, c: &Common, n: usize) -> Result<Value, String> {
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kib();
    progress(format!("idle {}: opening {n} connections (server RSS {rss0:?} KiB)", kind.name()));
    let first = match kind {
        Kind::Ivy | Kind::IvyAsync => Some(format!("+{}", client::IVY_CHANNEL)),
        Kind::Nats => Some(format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {} 1\r\n", client::NATS_SUBJECT)),
        Kind::Ideal => None,
    };
    let t0 = Instant::now();
    let done = AtomicU64::new(0);
    let sources = client::reserve_sources(n, c.per_address);
    let conns: Vec<Result<tokio::net::TcpStream, String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (first, done) = (first.as_deref(), &done);
            let src = Some(client::source_ip(sources, i, c.per_address));
            async move {
                let s = client::raw_connect(kind, server.addr, src, first).await;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 5000 == 0 {
                    progress(format!("idle {}: {d}/{n} connections", kind.name()));
                }
                s
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let open_secs = t0.elapsed().as_secs_f64();
    let failed = conns.iter().filter(|c| c.is_err()).count();
    if let Some(Err(e)) = conns.iter().find(|c| c.is_err()) {
        progress(format!("idle {}: {failed} connections failed, first: {e}", kind.name()));
    }
    let open = n - failed;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = server.rss_kib();
    drop(conns);
    server.stop().await;
    let per_conn = rss0.zip(rss1).map(|(a, b)| (b.saturating_sub(a) as f64 * 1024.0) / open.max(1) as f64);
    progress(format!("idle {}: {open} open, RSS {rss0:?} -> {rss1:?} KiB: {per_conn:?} bytes per connection", kind.name()));
    Ok(json!({
        "server": kind.name(), "connections": n, "open": open, "failed": failed, "open_secs": open_secs,
        "rss_before_kib": rss0, "rss_after_kib": rss1, "rss_bytes_per_conn": per_conn,
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// The wasm package: runs `client-wasm/build.sh` and reads its size line.
pub fn wasm(repo: &std::path::Path) -> Value {
    progress("wasm: client-wasm/build.sh");
    let out = std::process::Command::new("bash").arg(repo.join("client-wasm/build.sh")).current_dir(repo).output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => return json!({ "error": format!("build.sh failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")) }),
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("size:")) else { return json!({ "error": "no size line" }) };
    // size: wasm R bytes raw, W gzipped; glue J gzipped; total T bytes gzipped (K KiB)
    let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
    progress(format!("wasm: {line}"));
    json!({
        "wasm_raw_bytes": nums.first(), "wasm_gzip_bytes": nums.get(1), "glue_gzip_bytes": nums.get(2),
        "total_gzip_bytes": nums.get(3), "line": line,
    })
}

/// Churn: the delivery latency of an unrelated channel (`/quiet`: one publisher at `rate`
/// events/s, one subscriber) with and without subscribe churn on a channel with `big_subs`
/// subscribers (`/bench`, which also gets `big_rate` events/s), in the same run: first `secs`
/// seconds without churn, then `secs` seconds with `churners` connections alternating
/// `-/bench` and `+/bench` with ack keys, `churn_rate` commands/s in all (0: as fast as the
/// replies come, 32 in flight per connection).
#[allow(clippy::too_many_arguments)]
pub async fn churn(
    kind: Kind,
    c: &Common,
    big_subs: usize,
    big_rate: f64,
    churners: usize,
    churn_rate: f64,
    rate: f64,
    secs: f64,
) -> Result<Value, String> {
    if !kind.is_ivy() {
        return Err("churn: ivy only".into());
    }
    let load_before = loadavg();
    let server = Server::start(kind, &c.launch).await?;
    progress(format!("churn {}: {big_subs} subscribers of {}, {churners} churners", kind.name(), client::IVY_CHANNEL));
    let conns = connect_subscribers(kind, server.addr, big_subs, c.per_address).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let tasks: Vec<_> = conns.into_iter().map(|ws| tokio::spawn(subscriber(kind, ws, stop.clone(), delivered.clone(), None))).collect();
    // The quiet channel's subscriber: (send time, latency) of each delivery.
    let mut quiet = client::connect(kind, server.addr, None).await?;
    quiet.send(Message::text("#q#+/quiet")).await.map_err(|e| e.to_string())?;
    while !client::next(&mut quiet).await?.starts_with(b"#q#@") {}
    let quiet_task = {
        let (stop, base) = (stop.clone(), c.base);
        tokio::spawn(async move {
            let mut samples: Vec<(u64, u32)> = Vec::new();
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = client::next(&mut quiet) => m,
                };
                let Ok(m) = m else { break };
                let now = base.elapsed().as_nanos() as u64;
                let mut parts = m.splitn(3, |b| *b == b':');
                if let (Some(_), Some(_), Some(data)) = (parts.next(), parts.next(), parts.next()) {
                    if let Some(sent) = client::sent_ns(data) {
                        samples.push((sent, (now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32));
                    }
                }
            }
            samples
        })
    };
    // The publishers: /quiet at `rate`, /bench at `big_rate`, for both phases.
    let publish = |mut ws: Ws, path: &'static str, rate: f64, total_secs: f64, base: Instant, size: usize| async move {
        if rate <= 0.0 {
            return Ok::<u64, String>(0);
        }
        let total = (rate * total_secs) as u64;
        let t0 = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let due = ((t0.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while sent < due {
                ws.feed(Message::text(format!(":{path}:{}", client::payload(base, size)))).await.map_err(|e| e.to_string())?;
                sent += 1;
            }
            ws.flush().await.map_err(|e| e.to_string())?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(sent)
    };
    let quiet_pub = client::connect(kind, server.addr, None).await?;
    let big_pub = client::connect(kind, server.addr, None).await?;
    let mut churn_conns = Vec::new();
    for _ in 0..churners {
        churn_conns.push(client::connect(kind, server.addr, None).await?);
    }
    let cpu0 = server.cpu_secs();
    let t0 = Instant::now();
    let switch_ns = (t0 + Duration::from_secs_f64(secs)).duration_since(c.base).as_nanos() as u64;
    let quiet_h = tokio::spawn(publish(quiet_pub, "/quiet", rate, 2.0 * secs, c.base, c.payload));
    let big_h = tokio::spawn(publish(big_pub, client::IVY_CHANNEL, big_rate, 2.0 * secs, c.base, c.payload));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let cpu_mid = server.cpu_secs();
    progress(format!("churn {}: churn starts", kind.name()));
    let churn_end = Instant::now() + Duration::from_secs_f64(secs);
    let per_conn = churn_rate / churners.max(1) as f64;
    let churn_tasks: Vec<_> = churn_conns
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let (mut sent, mut ok, mut refused) = (0u64, 0u64, 0u64);
                let t0 = Instant::now();
                let mut in_flight = 0u64;
                while Instant::now() < churn_end {
                    let due = if per_conn > 0.0 { (t0.elapsed().as_secs_f64() * per_conn) as u64 + 1 } else { u64::MAX };
                    while in_flight < 32 && sent < due {
                        let cmd =
                            if sent % 2 == 0 { format!("#c#+{}", client::IVY_CHANNEL) } else { format!("#c#-{}", client::IVY_CHANNEL) };
                        if ws.feed(Message::text(cmd)).await.is_err() {
                            return (sent, ok, refused);
                        }
                        sent += 1;
                        in_flight += 1;
                    }
                    if ws.flush().await.is_err() {
                        break;
                    }
                    if in_flight == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    match tokio::time::timeout(Duration::from_millis(100), client::next(&mut ws)).await {
                        Ok(Ok(m)) if m.starts_with(b"#c#@") => {
                            ok += 1;
                            in_flight -= 1;
                        }
                        Ok(Ok(m)) if m.starts_with(b"#c#!") => {
                            refused += 1;
                            in_flight -= 1;
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {}
                    }
                }
                (sent, ok, refused)
            })
        })
        .collect();
    let (mut sent, mut ok, mut refused) = (0u64, 0u64, 0u64);
    for t in churn_tasks {
        if let Ok((s, o, r)) = t.await {
            sent += s;
            ok += o;
            refused += r;
        }
    }
    let churn_secs = secs;
    let _ = quiet_h.await;
    let _ = big_h.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = cpu0.zip(cpu_mid).zip(server.cpu_secs()).map(|((a, m), b)| (m - a, b - m));
    stop.cancel();
    let samples = quiet_task.await.unwrap_or_default();
    for t in tasks {
        let _ = t.await;
    }
    server.stop().await;
    let split = |churn: bool| {
        let mut v: Vec<u32> = samples.iter().filter(|(sent, _)| (*sent >= switch_ns) == churn).map(|(_, l)| *l).collect();
        v.sort_unstable();
        v
    };
    let (calm, churned) = (split(false), split(true));
    let stats = |v: &[u32]| (percentile(v, 0.5), percentile(v, 0.99), v.len());
    let ((c50, c99, cn), (h50, h99, hn)) = (stats(&calm), stats(&churned));
    let ratio = |a: Option<u32>, b: Option<u32>| a.zip(b).map(|(a, b)| b as f64 / a.max(1) as f64);
    progress(format!(
        "churn {}: /quiet p50 {c50:?} -> {h50:?} us, p99 {c99:?} -> {h99:?} us ({cn} and {hn} samples); churn {ok} executed, {refused} refused of {sent} in {churn_secs} s; server CPU {cpu:?}",
        kind.name()
    ));
    Ok(json!({
        "server": kind.name(), "big_subscribers": big_subs, "big_rate": big_rate, "churners": churners, "churn_rate": churn_rate,
        "quiet_rate": rate, "secs": secs,
        "calm": { "p50_us": c50, "p99_us": c99, "samples": cn, "server_cpu_s": cpu.map(|c| c.0) },
        "churn": { "p50_us": h50, "p99_us": h99, "samples": hn, "server_cpu_s": cpu.map(|c| c.1),
                   "commands_sent": sent, "executed": ok, "refused": refused, "executed_per_s": ok as f64 / churn_secs },
        "p50_ratio": ratio(c50, h50), "p99_ratio": ratio(c99, h99),
        "big_deliveries": delivered.load(Ordering::Relaxed),
        "load_before": load_before, "load_after": loadavg(),
    }))
}

/// Presence: a join storm into one room of `members` members. Every member's connection is
/// opened first; then each sends `#w#~+/bench-room` (`watch`) or `#w#+/bench-room` (the
/// baseline: a plain subscription, which is a presence join too but watches nothing), all at
/// once, and waits until its view holds every member (watch: the `count` of its snapshot and
/// change lines reaches `members`) or for its reply (baseline). Measured between the storm's
/// start and its end: server CPU seconds per join, bytes of presence lines per join (all
/// members together), the most presence lines one member received; and the server's resident
/// memory after the storm less before it, per member. Rooms smaller than 1,000 members are
/// run `1000 / members` at once (each member in its own room's storm), so that the CPU time,
/// read in 10 ms ticks, is measurable; the figures are per join all the same.
pub async fn presence(kind: Kind, c: &Common, members: usize, watch: bool) -> Result<Value, String> {
    let load_before = loadavg();
    let rooms = (1000 / members.max(1)).max(1);
    let room_size = members;
    let members = rooms * room_size;
    let server = Server::start_with(kind, &c.launch, &[("IVY_PRESENCE_LINGER", "0")]).await?;
    let mode = if watch { "watch" } else { "subscribe" };
    progress(format!("presence {mode}: {rooms} room(s) of {room_size} members: connecting"));
    let first = (members > c.per_address).then(|| client::reserve_sources(members, c.per_address));
    let conns: Vec<Result<Ws, String>> = futures_util::stream::iter(0..members)
        .map(|i| {
            let src = first.map(|first| client::source_ip(first, i, c.per_address));
            let addr = server.addr;
            async move { client::connect(kind, addr, src).await }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let conns = conns.into_iter().collect::<Result<Vec<_>, _>>()?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (cpu0, rss0) = (server.cpu_secs(), server.rss_kib());
    let started = Instant::now();
    let go = Arc::new(tokio::sync::Barrier::new(members + 1));
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let go = go.clone();
            tokio::spawn(async move {
                let room = format!("/bench-room/{}", i / room_size);
                go.wait().await;
                let cmd = if watch { format!("#w#~+{room}") } else { format!("#w#+{room}") };
                ws.send(Message::text(cmd)).await.map_err(|e| e.to_string())?;
                let (mut lines, mut bytes, mut replied, mut count) = (0u64, 0u64, false, 0u64);
                while !replied || (watch && count < room_size as u64) {
                    let msg = tokio::time::timeout(Duration::from_secs(120), ws.next())
                        .await
                        .map_err(|_| format!("a member waited 120 s (count {count} of {room_size})"))?;
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        other => return Err(format!("a member's connection ended: {other:?}")),
                    };
                    if text.starts_with("#w#") {
                        replied = true;
                    } else if let Some(rest) = text.strip_prefix('^') {
                        lines += 1;
                        bytes += text.len() as u64;
                        if let Some(json) = rest.strip_prefix(['=', '~']).and_then(|r| r.split_once(':')).map(|(_, j)| j) {
                            if let Some(n) = serde_json::from_str::<Value>(json).ok().and_then(|v| v["count"].as_u64()) {
                                count = n;
                            }
                        }
                    }
                }
                Ok::<_, String>((lines, bytes, ws))
            })
        })
        .collect();
    go.wait().await;
    let mut results = Vec::with_capacity(members);
    for t in tasks {
        results.push(t.await.map_err(|e| e.to_string())??);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = server.cpu_secs();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss1 = server.rss_kib();
    let lines_max = results.iter().map(|r| r.0).max().unwrap_or(0);
    let bytes: u64 = results.iter().map(|r| r.1).sum();
    drop(results);
    server.stop().await;
    let cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let cpu_us_per_join = cpu.map(|s| s * 1e6 / members as f64);
    let rss_per_member = rss0.zip(rss1).map(|(a, b)| (b.saturating_sub(a) as f64 * 1024.0) / members as f64);
    let ticks = (secs * 10.0).ceil() as u64;
    progress(format!(
        "presence {mode}: {rooms} room(s) of {room_size} members ({members} joins) in {secs:.2} s ({ticks} ticks): server CPU {cpu:?} s, {cpu_us_per_join:?} µs/join, {} bytes/join, at most {lines_max} lines per member, RSS {rss0:?} -> {rss1:?} KiB ({rss_per_member:?} bytes/member)",
        bytes / members as u64
    ));
    Ok(json!({
        "server": kind.name(), "mode": mode, "room_size": room_size, "rooms": rooms, "joins": members, "secs": secs, "ticks": ticks,
        "server_cpu_secs": cpu, "cpu_us_per_join": cpu_us_per_join,
        "presence_bytes": bytes, "bytes_per_join": bytes as f64 / members as f64, "lines_per_member_max": lines_max,
        "rss_before_kib": rss0, "rss_after_kib": rss1, "rss_bytes_per_member": rss_per_member,
        "load_before": load_before, "load_after": loadavg(),
    }))
}
