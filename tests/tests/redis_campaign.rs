//! A multi-node campaign on Redis against the real binaries (issue 15, "Tests"): three
//! `ivy-server --redis` processes share one `redis-server` of the test's own (`--appendonly yes
//! --appendfsync always`, a free loopback port, a temp dir). Publishers send with acks
//! (pipelined, raw WebSocket) to nodes chosen at random, and drop their connections now and
//! then with sends in flight. `ivy sub` followers (the real CLI) connect through a
//! [`FaultProxy`] each, which is re-pointed between the nodes and cut during the run. One node
//! is SIGKILLed and restarted, then Redis is SIGKILLed and restarted on its append-only file,
//! then another node is SIGKILLed and restarted.
//!
//! Checked at the end, counted:
//! - the three nodes serve the same `/log/` bytes, page by page (same ETags), and the same
//!   `/log/c`, which is the root log's events under `/c`;
//! - the log's timestamps are strictly increasing; every acked event is in it exactly once, at
//!   its acked timestamp; nothing is in it that was not sent, nothing twice (a send whose reply
//!   was lost may or may not be in it);
//! - each publisher's acked timestamps increase in the order of its sends, across nodes;
//! - every follower printed exactly the log from its start position (from the beginning, after
//!   a timestamp, or from "now": from its first line on), no gap, no duplicate, and reported no
//!   continuity loss.
//!
//! About 30 s. `IVY_CAMPAIGN_SEED=S` replays the printed seed's schedule (the faults, their
//! order and delays; the timing of the processes is not reproducible), `IVY_CAMPAIGN_SECS=N`
//! sets the length of the fault schedule.
//!
//! A node that lags and a very slow node: node 0 reaches Redis through a proxy that stalls
//! for 0.4 to 1.2 s, four times, with a follower moved to node 0 during each stall
//! (`IVY_CAMPAIGN_LAG=0` leaves the stalls out), and one live node is frozen (SIGSTOP) for 1
//! to 3 s with a follower moved to it meanwhile, then thawed (SIGCONT).
//!
//! Found by this campaign and fixed: a false continuity loss (seeds 1796226501553217964,
//! 1796228236129597602, 1796236145648487695 with the stalls): `ivy: warning: continuity lost:
//! the server's history ends at 1796226512.779191001, before the last event delivered
//! (1796226513.135566000)`. A lagging node answered a subscribe with its own delivered
//! position, behind what another node had delivered to the follower before it moved; and
//! around the Redis restart, the node's first read of Redis's clock failed on the connection
//! Redis had dropped (or Redis was still down), and the subscribe was answered at once from
//! the node's position. Now a node answers a subscribe only once its reader delivered Redis's
//! clock, retrying the read and cutting the reader's backoff short; when it cannot within
//! 5 s it closes the connection with 1013 (try again later) and the client reconnects.
//!
//! Found by this campaign and fixed (seed 1796226641189679759 with `IVY_CAMPAIGN_LAG=1`; it
//! came from the Redis SIGKILL): replies to one connection's sends out of send order, against
//! `docs/PROTOCOL.md` 5.7. A send written just before Redis was killed waited for the node's
//! reader (for Redis to come back) while the connection's later sends were refused at once as
//! unreachable, and those refusals came first. `Writer::commit` now answers the sends still
//! waiting for the reader first, as writes whose connection was lost ("the event may still be
//! in the log"; the reader delivers those that were stored), then refuses the batch. The
//! assertion on reply order stays.

use ivy_tests::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ivy_client_core::Timestamp;
use ivy_client_core::path::is_within;
use ivy_client_core::wire::{ServerLine, parse_event, parse_line};
use ivy_tests::{FaultProxy, RedisServer, ServerProcess, WAIT, http_get, ivy_bin, server_bin, temp_dir};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Nodes on the one Redis.
const NODES: usize = 3;
/// Concurrent publishers (even ones send under `/c`, odd ones under `/d`).
const PUBLISHERS: usize = 6;
/// Sends in flight per publisher connection.
const WINDOW: usize = 4;
/// Most milliseconds a publisher waits between two sends.
const PACE_MS: u64 = 12;
/// Events per log page when the test reads the logs.
const PAGE: usize = 2000;
/// Default length of the fault schedule.
const DEFAULT_SECS: u64 = 20;

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")))
}

/// One acked event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    ts: Timestamp,
    path: String,
    data: Vec<u8>,
}

/// The addresses of the live nodes (`None`: killed), shared with the publishers.
type Addrs = Arc<Mutex<Vec<Option<SocketAddr>>>>;

fn live(addrs: &Addrs) -> Vec<(usize, SocketAddr)> {
    addrs.lock().unwrap().iter().enumerate().filter_map(|(i, a)| a.map(|a| (i, a))).collect()
}

/// What one publisher did.
#[derive(Debug, Default)]
struct Sent {
    acked: Vec<Event>,
    /// Sent without an ack (refused, or the reply lost with the connection): each may or may
    /// not be stored.
    unacked: Vec<Vec<u8>>,
    /// Refusals by their error line.
    errors: HashMap<String, usize>,
    sessions: usize,
    /// Broken promises seen on the wire (must stay empty).
    violations: Vec<String>,
}

/// Sends with acks until `stop`, to random live nodes, a new connection every few hundred
/// sends (the old one dropped with sends in flight).
async fn publisher(id: usize, mut rng: Rng, addrs: Addrs, stop: watch::Receiver<bool>, acked_ts: Arc<Mutex<Vec<Timestamp>>>) -> Sent {
    let path = format!("/{}/p{id}", if id % 2 == 0 { "c" } else { "d" });
    let mut out = Sent::default();
    let mut seq = 0u64;
    let mut last_ts = Timestamp::ZERO;
    while !*stop.borrow() {
        let up = live(&addrs);
        if up.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let (_, addr) = rng.pick(&up);
        let Ok(Ok((ws, _))) =
            tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        out.sessions += 1;
        let (mut tx, mut rx) = ws.split();
        let budget = rng.range(100, 1500);
        let mut sent_here = 0;
        let mut pending: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut next_send = tokio::time::Instant::now();
        let mut stop_rx = stop.clone();
        let mut waiting_since = tokio::time::Instant::now();
        'session: loop {
            let stopping = *stop_rx.borrow();
            if sent_here >= budget || (stopping && pending.is_empty()) {
                break; // dropped with whatever is in flight
            }
            let can_send = !stopping && pending.len() < WINDOW;
            if can_send && tokio::time::Instant::now() >= next_send {
                // `%` and `:` in the data: escaping survives every path too.
                let data = format!("p{id}:{seq}:50% done");
                if tx.send(Message::text(format!("#{seq}#:{path}:{data}"))).await.is_err() {
                    break 'session;
                }
                if pending.is_empty() {
                    waiting_since = tokio::time::Instant::now();
                }
                pending.push_back((seq, data.into_bytes()));
                seq += 1;
                sent_here += 1;
                next_send = tokio::time::Instant::now() + Duration::from_millis(rng.range(0, PACE_MS));
                continue;
            }
            let wake = if can_send { next_send } else { tokio::time::Instant::now() + Duration::from_millis(200) };
            tokio::select! {
                m = rx.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let line = parse_line(t.as_bytes());
                        let (key, ok) = match &line {
                            Ok(ServerLine::Ack { key, ts }) => (*key, Some(*ts)),
                            Ok(ServerLine::Error { key: Some(key), .. }) => (*key, None),
                            _ => {
                                out.violations.push(format!("publisher {id} on {addr}: unexpected line {t:?}"));
                                continue;
                            }
                        };
                        let Some((want, data)) = pending.pop_front() else {
                            out.violations.push(format!("publisher {id} on {addr}: a reply with nothing pending: {t:?}"));
                            continue;
                        };
                        waiting_since = tokio::time::Instant::now();
                        if key != want.to_string().as_bytes() {
                            out.violations.push(format!("publisher {id} on {addr}: reply {t:?} out of order (expected key {want})"));
                        }
                        match ok {
                            Some(ts) => {
                                if ts <= last_ts {
                                    out.violations.push(format!("publisher {id} on {addr}: send {want} acked at {ts}, not after {last_ts} acked before"));
                                }
                                last_ts = ts;
                                acked_ts.lock().unwrap().push(ts);
                                out.acked.push(Event { ts, path: path.clone(), data });
                            }
                            None => {
                                let error = t.splitn(3, '#').nth(2).unwrap_or_default().to_string();
                                *out.errors.entry(error).or_default() += 1;
                                out.unacked.push(data);
                                // While Redis is down every send is refused at once: no spin.
                                next_send = tokio::time::Instant::now() + Duration::from_millis(30);
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break 'session,
                    Some(Ok(_)) => {}
                },
                _ = tokio::time::sleep_until(wake) => {
                    if !pending.is_empty() && waiting_since.elapsed() > WAIT {
                        out.violations.push(format!("publisher {id} on {addr}: no reply for {WAIT:?} from {addr} with {} sends pending", pending.len()));
                        break 'session;
                    }
                }
                _ = stop_rx.changed() => {}
            }
        }
        out.unacked.extend(pending.into_iter().map(|(_, d)| d));
        if *stop.borrow() {
            let _ = tx.close().await;
        }
    }
    out
}

/// An `ivy sub` process and what it printed.
#[derive(Debug)]
struct Follower {
    name: &'static str,
    channel: &'static str,
    /// `--after` this timestamp; `None` with `from_beginning` unset: from "now".
    after: Option<Timestamp>,
    from_beginning: bool,
    child: tokio::process::Child,
    printed: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(name: &'static str, channel: &'static str, from_beginning: bool, after: Option<Timestamp>, proxy: &FaultProxy) -> Follower {
        let mut cmd = tokio::process::Command::new(ivy_bin());
        cmd.arg("--url").arg(proxy.url()).arg("sub").arg(channel);
        if from_beginning {
            cmd.arg("--from-beginning");
        }
        if let Some(t) = after {
            cmd.arg("--after").arg(t.to_string());
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().expect("spawn ivy sub");
        let printed = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (p, e) = (printed.clone(), stderr.clone());
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                p.lock().unwrap().push(l);
            }
        });
        let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                e.lock().unwrap().push(l);
            }
        });
        Follower { name, channel, after, from_beginning, child, printed, stderr }
    }

    fn count(&self) -> usize {
        self.printed.lock().unwrap().len()
    }

    /// Waits until it printed `n` lines (at most `wait`).
    async fn wait_for(&self, n: usize, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while self.count() < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// What it must have printed, from `log` (the root log's lines).
    fn expected<'a>(&self, log: &'a [(Timestamp, String, String)]) -> Vec<&'a str> {
        let mut lines: Vec<&(Timestamp, String, String)> = log.iter().filter(|(_, path, _)| is_within(path, self.channel)).collect();
        if let Some(t) = self.after {
            lines.retain(|(ts, _, _)| *ts > t);
        } else if !self.from_beginning {
            // From "now": its start position is unknown here, so from its first line on.
            let first = self.printed.lock().unwrap().first().cloned().unwrap_or_default();
            let at = lines.iter().position(|(_, _, l)| *l == first).unwrap_or_else(|| {
                panic!("follower {}: its first line {first:?} is not in the log", self.name);
            });
            lines.drain(..at);
        }
        lines.into_iter().map(|(_, _, l)| l.as_str()).collect()
    }
}

/// Where two line lists differ, in words.
fn difference(printed: &[String], expected: &[&str]) -> String {
    let first = printed.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(printed.len().min(expected.len()));
    let printed_set: HashSet<&str> = printed.iter().map(String::as_str).collect();
    let expected_set: HashSet<&str> = expected.iter().copied().collect();
    let missing: Vec<&&str> = expected.iter().filter(|l| !printed_set.contains(**l)).take(5).collect();
    let extra: Vec<&String> = printed.iter().filter(|l| !expected_set.contains(l.as_str())).take(5).collect();
    let mut seen = HashSet::new();
    let dups: Vec<&String> = printed.iter().filter(|l| !seen.insert(l.as_str())).take(5).collect();
    format!(
        "printed {} lines, the log has {}; first difference at line {first}: printed {:?}, log {:?}; missing (first 5 of {}): {missing:?}; \
         not in the log: {extra:?}; printed twice: {dups:?}",
        printed.len(),
        expected.len(),
        printed.get(first),
        expected.get(first),
        expected.iter().filter(|l| !printed_set.contains(**l)).count(),
    )
}

/// A node's whole log of `channel`, page by page: the raw bytes (pages joined by newlines)
/// and the pages' ETags.
async fn read_log(addr: SocketAddr, channel: &str) -> (Vec<u8>, Vec<Option<String>>) {
    let mut body = Vec::new();
    let mut etags = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let target = match &after {
            Some(a) => format!("/log{channel}?after={a}&limit={PAGE}"),
            None => format!("/log{channel}?limit={PAGE}"),
        };
        let r = http_get(addr, &target, &[]).await;
        assert_eq!(r.status, 200, "GET {target} from {addr}: {}", String::from_utf8_lossy(&r.body));
        etags.push(r.header("etag").map(str::to_string));
        let lines: Vec<&[u8]> = r.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        if let Some(last) = lines.last() {
            let ev = parse_event(last).unwrap_or_else(|e| panic!("log line {:?}: {e}", String::from_utf8_lossy(last)));
            after = Some(ev.ts.to_string());
            if !body.is_empty() {
                body.push(b'\n');
            }
            body.extend_from_slice(&r.body);
        }
        if lines.len() < PAGE {
            return (body, etags);
        }
    }
}

async fn start_node(bin: &Path, dir: &Path, url: &str) -> ServerProcess {
    ServerProcess::start_bin(bin, dir, &["--redis", url], &[("RUST_LOG", "error")]).await
}

/// One step of the fault schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Cut one follower's proxy, re-pointing it first to another live node (or not).
    Cut {
        proxy: usize,
        repoint: bool,
    },
    KillNode(usize),
    /// Re-point the proxies that lead to a killed node (a load balancer noticing).
    Repoint,
    RestartNode(usize),
    KillRedis,
    RestartRedis,
    /// Start the follower `--after` an acked timestamp.
    StartLateFollower,
    /// Stall node 0's link to Redis (it lags), and move a follower there meanwhile.
    Lag,
    /// Freeze a live node (SIGSTOP) for one to three seconds, moving a follower to it
    /// meanwhile, then thaw it (SIGCONT): a very slow node.
    Freeze,
}

/// The schedule: (delay before the step, step), seeded.
fn schedule(rng: &mut Rng, secs: u64, lag: bool) -> Vec<(Duration, Fault)> {
    let total = secs * 1000;
    let first_kill = rng.range(0, NODES as u64) as usize;
    let second_kill = (first_kill + 1 + rng.range(0, NODES as u64 - 1) as usize) % NODES;
    let mut marks: Vec<(u64, Vec<Fault>)> = vec![
        (total * 20 / 100 + rng.range(0, total / 10), vec![Fault::KillNode(first_kill)]),
        (total * 30 / 100, vec![Fault::StartLateFollower]),
        (total * 50 / 100 + rng.range(0, total / 10), vec![Fault::KillRedis]),
        (total * 75 / 100 + rng.range(0, total / 10), vec![Fault::KillNode(second_kill)]),
    ];
    // Each kill's follow-ups, relative to it.
    let mut followups = Vec::new();
    for (at, faults) in &marks {
        match faults[0] {
            Fault::KillNode(i) => {
                followups.push((at + rng.range(0, 400), vec![Fault::Repoint]));
                followups.push((at + rng.range(1000, 2500), vec![Fault::RestartNode(i)]));
            }
            Fault::KillRedis => followups.push((at + rng.range(500, 2000), vec![Fault::RestartRedis])),
            _ => {}
        }
    }
    marks.extend(followups);
    if lag {
        for _ in 0..4 {
            marks.push((rng.range(total / 10, total), vec![Fault::Lag]));
        }
    }
    marks.push((rng.range(total / 10, total * 9 / 10), vec![Fault::Freeze]));
    let mut t = 0;
    while t < total {
        t += rng.range(300, 1200);
        marks.push((t, vec![Fault::Cut { proxy: rng.range(0, 4) as usize, repoint: rng.range(0, 2) == 0 }]));
    }
    marks.sort_by_key(|(at, _)| *at);
    let mut out = Vec::new();
    let mut prev = 0;
    for (at, faults) in marks {
        for f in faults {
            out.push((Duration::from_millis(at - prev), f));
            prev = at;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_redis_cuts_and_kills_every_node_serves_one_exact_log() {
    let seed = env_number("IVY_CAMPAIGN_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let secs = env_number("IVY_CAMPAIGN_SECS").unwrap_or(DEFAULT_SECS).max(5);
    println!("redis campaign: seed {seed} (IVY_CAMPAIGN_SEED={seed} replays the fault schedule), {secs} s of faults");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let dir = temp_dir();
    // Restarted from this thread only: it was started with the parent-death signal of the
    // thread that spawns it (see ivy_tests::RedisServer).
    let redis = Arc::new(RedisServer::start(&dir.path().join("redis")));
    let url = redis.url();
    // IVY_CAMPAIGN_LAG=1: node 0 reaches Redis through a proxy that stalls now and then.
    let lag = std::env::var("IVY_CAMPAIGN_LAG").map_or(true, |v| v != "0");
    let redis_link = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let url_of = |i: usize| if lag && i == 0 { format!("redis://{}", redis_link.addr) } else { url.clone() };
    let bin = server_bin();
    let node_dirs: Vec<PathBuf> = (0..NODES).map(|i| dir.path().join(format!("node{i}"))).collect();
    let mut nodes: Vec<Option<ServerProcess>> = Vec::new();
    for (i, d) in node_dirs.iter().enumerate() {
        nodes.push(Some(start_node(&bin, d, &url_of(i)).await));
    }
    let addrs: Addrs = Arc::new(Mutex::new(nodes.iter().map(|n| n.as_ref().map(|n| n.addr)).collect()));

    // The followers, each through its proxy (the 4th, `--after`, starts mid-run).
    let mut proxies = Vec::new();
    // Where each proxy leads.
    let mut upstream = Vec::new();
    for i in 0..4 {
        let to = nodes[i % NODES].as_ref().unwrap().addr;
        proxies.push(FaultProxy::start(to).await);
        upstream.push(to);
    }
    let set_upstream = |proxies: &[FaultProxy], upstream: &mut Vec<SocketAddr>, p: usize, to: SocketAddr| {
        proxies[p].set_upstream(to);
        upstream[p] = to;
    };
    let mut followers = vec![
        Follower::start("root from the beginning", "/", true, None, &proxies[0]),
        Follower::start("/c from the beginning", "/c", true, None, &proxies[1]),
        Follower::start("root from now", "/", false, None, &proxies[2]),
    ];
    // `ivy sub` exits if its first connection fails: warm-up events until each printed one.
    let warm_at = nodes[0].as_ref().unwrap().addr;
    let (mut warm, _) = tokio_tungstenite::connect_async(format!("ws://{warm_at}/ws")).await.expect("connect");
    let mut warm_acked = Vec::new();
    let deadline = Instant::now() + WAIT;
    for k in 0.. {
        let data = format!("warm-up {k}");
        warm.send(Message::text(format!("#w#:/c/warm:{data}"))).await.unwrap();
        match tokio::time::timeout(WAIT, warm.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match parse_line(t.as_bytes()) {
                Ok(ServerLine::Ack { ts, .. }) => warm_acked.push(Event { ts, path: "/c/warm".into(), data: data.into_bytes() }),
                _ => panic!("warm-up send: {t:?}"),
            },
            other => panic!("warm-up send: {other:?}"),
        }
        if followers.iter().all(|f| f.count() > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the followers printed nothing within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = warm.close(None).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let acked_ts: Arc<Mutex<Vec<Timestamp>>> = Arc::default();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|id| {
            let r = Rng(seed ^ (id as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
            tokio::spawn(publisher(id, r, addrs.clone(), stop_rx.clone(), acked_ts.clone()))
        })
        .collect();

    // The faults.
    let (mut cuts, mut node_kills, mut redis_kills) = (0usize, 0usize, 0usize);
    let mut lags = 0usize;
    let mut freezes = 0usize;
    for (delay, fault) in schedule(&mut rng, secs, lag) {
        tokio::time::sleep(delay).await;
        match fault {
            Fault::Cut { proxy, repoint } => {
                if repoint {
                    let up = live(&addrs);
                    set_upstream(&proxies, &mut upstream, proxy, rng.pick(&up).1);
                }
                proxies[proxy].cut_all();
                cuts += 1;
            }
            Fault::KillNode(i) => {
                addrs.lock().unwrap()[i] = None;
                nodes[i].take().expect("a live node").kill().await;
                node_kills += 1;
                println!("redis campaign: {:.1} s: node {i} SIGKILLed", started.elapsed().as_secs_f64());
            }
            Fault::Repoint => {
                let up = live(&addrs);
                for p in 0..proxies.len() {
                    if !up.iter().any(|(_, a)| *a == upstream[p]) {
                        set_upstream(&proxies, &mut upstream, p, rng.pick(&up).1);
                    }
                }
            }
            Fault::RestartNode(i) => {
                let node = start_node(&bin, &node_dirs[i], &url_of(i)).await;
                addrs.lock().unwrap()[i] = Some(node.addr);
                // Followers go there too: one proxy re-pointed to it and cut.
                let p = rng.range(0, 4) as usize;
                set_upstream(&proxies, &mut upstream, p, node.addr);
                proxies[p].cut_all();
                cuts += 1;
                nodes[i] = Some(node);
                println!("redis campaign: {:.1} s: node {i} restarted", started.elapsed().as_secs_f64());
            }
            Fault::KillRedis => {
                redis.kill();
                redis_kills += 1;
                println!("redis campaign: {:.1} s: Redis SIGKILLed", started.elapsed().as_secs_f64());
            }
            Fault::RestartRedis => {
                redis.restart();
                println!("redis campaign: {:.1} s: Redis restarted on its append-only file", started.elapsed().as_secs_f64());
            }
            Fault::Lag => {
                redis_link.stall(true);
                tokio::time::sleep(Duration::from_millis(rng.range(200, 600))).await;
                let p = rng.range(0, proxies.len() as u64) as usize;
                if let Some(to) = addrs.lock().unwrap()[0] {
                    set_upstream(&proxies, &mut upstream, p, to);
                    proxies[p].cut_all();
                    cuts += 1;
                }
                tokio::time::sleep(Duration::from_millis(rng.range(200, 600))).await;
                redis_link.stall(false);
                lags += 1;
            }
            Fault::Freeze => {
                let up = live(&addrs);
                let (i, to) = rng.pick(&up);
                let Some(pid) = nodes[i].as_ref().map(|n| n.pid()) else { continue };
                let signal = |sig: &str| {
                    let ok =
                        std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().is_ok_and(|s| s.success());
                    assert!(ok, "kill -{sig} {pid}");
                };
                signal("STOP");
                println!("redis campaign: {:.1} s: node {i} frozen (SIGSTOP)", started.elapsed().as_secs_f64());
                tokio::time::sleep(Duration::from_millis(rng.range(300, 1000))).await;
                let p = rng.range(0, proxies.len() as u64) as usize;
                set_upstream(&proxies, &mut upstream, p, to);
                proxies[p].cut_all();
                cuts += 1;
                tokio::time::sleep(Duration::from_millis(rng.range(700, 2000))).await;
                signal("CONT");
                freezes += 1;
                println!("redis campaign: {:.1} s: node {i} thawed (SIGCONT)", started.elapsed().as_secs_f64());
            }
            Fault::StartLateFollower => {
                let after = {
                    let ts = acked_ts.lock().unwrap();
                    ts.get(ts.len() / 2).copied().unwrap_or(warm_acked[0].ts)
                };
                let up = live(&addrs);
                set_upstream(&proxies, &mut upstream, 3, rng.pick(&up).1);
                let f = Follower::start("root after a timestamp", "/", false, Some(after), &proxies[3]);
                // Its first connection must succeed: no fault until it printed its first line.
                assert!(f.wait_for(1, WAIT).await, "the late follower printed nothing: {:?}", f.stderr.lock().unwrap());
                followers.push(f);
            }
        }
    }
    let faults_done = started.elapsed();
    stop_tx.send_replace(true);
    let mut sent = Sent::default();
    let mut sessions = 0;
    for p in publishers {
        let s = p.await.expect("publisher task");
        sessions += s.sessions;
        sent.acked.extend(s.acked);
        sent.unacked.extend(s.unacked);
        sent.violations.extend(s.violations);
        for (k, v) in s.errors {
            *sent.errors.entry(k).or_default() += v;
        }
    }
    assert!(sent.violations.is_empty(), "seed {seed}: publishers saw: {:#?}", sent.violations);
    sent.acked.extend(warm_acked);

    // Every node serves the same log, once each has delivered everything (they converge).
    let live_nodes: Vec<SocketAddr> = nodes.iter().map(|n| n.as_ref().expect("every node is up at the end").addr).collect();
    let deadline = Instant::now() + WAIT;
    let logs = loop {
        let mut logs = Vec::new();
        for a in &live_nodes {
            logs.push(read_log(*a, "/").await);
        }
        if logs.iter().all(|l| l.0 == logs[0].0) || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (i, l) in logs.iter().enumerate().skip(1) {
        assert!(l.0 == logs[0].0, "seed {seed}: node {i}'s /log/ ({} bytes) differs from node 0's ({} bytes)", l.0.len(), logs[0].0.len());
        assert_eq!(l.1, logs[0].1, "seed {seed}: node {i}'s pages have other ETags than node 0's");
    }
    let raw = &logs[0].0;
    let mut log: Vec<(Timestamp, String, String)> = Vec::new();
    let mut by_data: HashMap<Vec<u8>, Timestamp> = HashMap::new();
    for line in raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let text = String::from_utf8(line.to_vec()).expect("UTF-8 log line");
        let ev = parse_event(line).unwrap_or_else(|e| panic!("seed {seed}: log line {text:?}: {e}"));
        if let Some((prev, _, prev_line)) = log.last() {
            assert!(*prev < ev.ts, "seed {seed}: timestamps not strictly increasing: {prev_line:?} then {text:?}");
        }
        if let Some(other) = by_data.insert(ev.data.to_vec(), ev.ts) {
            panic!("seed {seed}: {:?} stored twice, at {other} and {}", String::from_utf8_lossy(&ev.data), ev.ts);
        }
        log.push((ev.ts, ev.path.into_owned(), text));
    }
    let by_ts: HashMap<Timestamp, usize> = log.iter().enumerate().map(|(i, e)| (e.0, i)).collect();
    let mut lost = Vec::new();
    for a in &sent.acked {
        match by_ts.get(&a.ts) {
            Some(&i) => {
                let ev = parse_event(log[i].2.as_bytes()).unwrap();
                assert!(ev.path == a.path && *ev.data == *a.data, "seed {seed}: the event at {} is {:?}, acked as {a:?}", a.ts, log[i].2);
            }
            None => lost.push(a),
        }
    }
    assert!(lost.is_empty(), "seed {seed}: {} acked events are not in the log, first: {:?}", lost.len(), &lost[..lost.len().min(5)]);
    let acked_data: HashSet<&[u8]> = sent.acked.iter().map(|a| &a.data[..]).collect();
    let unacked: HashSet<&[u8]> = sent.unacked.iter().map(|d| &d[..]).collect();
    let mut unacked_stored = 0;
    for (data, ts) in &by_data {
        if !acked_data.contains(&data[..]) {
            assert!(unacked.contains(&data[..]), "seed {seed}: stored at {ts}, never sent: {:?}", String::from_utf8_lossy(data));
            unacked_stored += 1;
        }
    }
    assert_eq!(log.len(), sent.acked.len() + unacked_stored);
    // A channel's log is the root log's events under it, on every node.
    let c_lines: Vec<&str> = log.iter().filter(|e| is_within(&e.1, "/c")).map(|e| e.2.as_str()).collect();
    for (i, a) in live_nodes.iter().enumerate() {
        let (c, _) = read_log(*a, "/c").await;
        assert!(c == c_lines.join("\n").as_bytes(), "seed {seed}: node {i}'s /log/c is not the root log's events under /c");
    }

    // Every follower printed exactly the log from its start.
    let mut reconnects = Vec::new();
    for f in &followers {
        let want = f.expected(&log);
        f.wait_for(want.len(), Duration::from_secs(20)).await;
        // Anything more (a duplicate) would come right after.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let printed = f.printed.lock().unwrap().clone();
        let stderr = f.stderr.lock().unwrap().clone();
        assert!(
            printed == want,
            "seed {seed}: follower {} ({}): {}\nits stderr: {stderr:#?}",
            f.name,
            f.channel,
            difference(&printed, &want)
        );
        let lost: Vec<&String> = stderr.iter().filter(|l| l.contains("continuity lost") || l.contains("subscription ended")).collect();
        assert!(lost.is_empty(), "seed {seed}: follower {} reported: {lost:#?}", f.name);
        reconnects.push((f.name, printed.len(), stderr.iter().filter(|l| l.contains("reconnected to")).count()));
    }
    let connections_cut: u64 = proxies.iter().map(|p| p.cut_count.load(Ordering::Relaxed)).sum();
    println!(
        "redis campaign: seed {seed}: {} events in every node's log ({} bytes, identical on {NODES} nodes): {} acked, {} sent without an ack \
         ({unacked_stored} of them stored); {} refusals {:?}",
        log.len(),
        raw.len(),
        sent.acked.len(),
        sent.unacked.len(),
        sent.errors.values().sum::<usize>(),
        sent.errors
    );
    println!(
        "redis campaign: {cuts} proxy cuts ({connections_cut} connections cut), {node_kills} node SIGKILLs, {redis_kills} Redis SIGKILL, {lags} stalls of node 0's link to Redis, {freezes} node frozen; \
         {sessions} publisher connections; faults over {:.1} s, {:.1} s in all",
        faults_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for (name, n, r) in reconnects {
        println!("redis campaign: follower {name}: printed {n} events, {r} reconnects");
    }
    for f in &mut followers {
        let _ = f.child.start_kill();
    }
    for n in nodes.into_iter().flatten() {
        n.kill().await;
    }
    drop(redis);
}
