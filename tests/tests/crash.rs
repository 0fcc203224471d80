//! Crash campaigns: concurrent publishers send with acks while the server process is killed
//! with SIGKILL at random moments and restarted on the same data directory, cycle after cycle.
//! Followers resume after every restart with the recipe of `docs/PROTOCOL.md` 8.4 (subscribe
//! with an ack to get the position P, backfill from the log after the last event they
//! processed up to P, then live).
//!
//! Checked after every restart and at the end:
//! - every stored line parses and the log's timestamps are strictly increasing;
//! - nothing is stored that was not sent, and nothing is stored twice;
//! - `--durability sync`: every acked event is in the log, exactly once, at its acked timestamp,
//!   and every follower's stream is exactly the channel's log (no gap, no duplicate);
//! - `--durability async`: acked events of the last flush interval may be lost (not asserted
//!   either way), but a timestamp is never handed out twice, and followers never see a
//!   duplicate or an event out of order.
//!
//! Short by default (a few seconds). `IVY_CRASH_CYCLES=N` sets the number of cycles of each
//! campaign for a long run; `IVY_CRASH_SEED=S` replays the random kill delays of a printed seed.

use ivy_tests::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ivy_client_core::Timestamp;
use ivy_client_core::path::is_within;
use ivy_client_core::wire::{ServerLine, parse_event, parse_line};
use ivy_tests::{ServerProcess, WAIT, server_bin, temp_dir, try_http_get};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Concurrent publishers, each on its own channel under `/crash`.
const PUBLISHERS: usize = 4;
/// Sends in flight per publisher (pipelined, acks awaited in order).
const WINDOW: usize = 8;
/// Most sends per publisher per cycle (a bound; a cycle normally ends by the kill first).
const MAX_SENDS: u64 = 50_000;
/// Page size of the followers' backfill.
const PAGE: usize = 200;
/// Default cycles per campaign.
const DEFAULT_CYCLES: usize = 5;

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")))
}

/// One stored or acked event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    ts: Timestamp,
    path: String,
    data: Vec<u8>,
}

/// What the publishers of one cycle did.
#[derive(Debug, Default)]
struct Sends {
    acked: Vec<Event>,
    /// Sent but not acked before the kill: each may or may not be stored.
    unacked: Vec<Vec<u8>>,
}

/// Sends with acks, `WINDOW` in flight, until the connection dies (or `MAX_SENDS`).
async fn publish_until_killed(addr: SocketAddr, id: usize, cycle: usize) -> Sends {
    let mut out = Sends::default();
    let Ok(Ok((ws, _))) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))).await else {
        return out; // killed before we got in
    };
    let (mut tx, mut rx) = ws.split();
    let path = format!("/crash/p{id}");
    let mut pending: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut seq = 0u64;
    'run: loop {
        while pending.len() < WINDOW && seq < MAX_SENDS {
            // `%` and `:` in the data: escaping and parsing must survive crashes too.
            let data = format!("c{cycle}:p{id}:{seq}:50% done");
            if tx.send(Message::text(format!("#{seq}#:{path}:{data}"))).await.is_err() {
                break 'run;
            }
            pending.push_back((seq, data.into_bytes()));
            seq += 1;
        }
        if pending.is_empty() {
            break;
        }
        match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match parse_line(t.as_bytes()) {
                Ok(ServerLine::Ack { key, ts }) => {
                    let (want, data) = pending.pop_front().expect("a pending send");
                    // Acks of one connection's sends come in send order.
                    assert_eq!(key, want.to_string().as_bytes(), "publisher {id}: ack {t:?} out of order");
                    out.acked.push(Event { ts, path: path.clone(), data });
                }
                _ => panic!("publisher {id}: unexpected line {t:?}"),
            },
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("publisher {id}: no reply for {WAIT:?} from a live server"),
        }
    }
    out.unacked.extend(pending.into_iter().map(|(_, d)| d));
    out
}

/// Sends one event with an ack to a live server and returns its timestamp.
async fn publish_one(addr: SocketAddr) -> Timestamp {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.expect("connect to a live server");
    ws.send(Message::text("#last#:/crash/final:x")).await.expect("send");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => match parse_line(t.as_bytes()) {
            Ok(ServerLine::Ack { key: b"last", ts }) => ts,
            _ => panic!("expected an ack, got {t:?}"),
        },
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// A client that wants every event of `channel` exactly once, in order, across restarts.
#[derive(Debug)]
struct Follower {
    channel: String,
    /// L: the last event processed.
    last: Timestamp,
    seen: Vec<Event>,
    /// Reconnects whose position P was below L (events already processed were lost).
    continuity_lost: usize,
    /// Duplicates or out-of-order events (must stay empty).
    violations: Vec<String>,
    sessions: usize,
}

enum SessionEnd {
    /// The server is gone (killed): wait for the next cycle.
    ServerGone,
    /// Closed as a slow consumer while backfilling: reconnect to the same server.
    Reconnect,
}

impl Follower {
    fn new(channel: &str) -> Follower {
        Follower {
            channel: channel.into(),
            last: Timestamp::ZERO,
            seen: Vec::new(),
            continuity_lost: 0,
            violations: Vec::new(),
            sessions: 0,
        }
    }

    fn process(&mut self, ts: Timestamp, path: &str, data: &[u8], via: &str) {
        if ts <= self.last {
            self.violations.push(format!("{via}: event {ts} after {} (duplicate or out of order)", self.last));
            return;
        }
        assert!(is_within(path, &self.channel), "{via}: event on {path} delivered to a follower of {}", self.channel);
        self.last = ts;
        self.seen.push(Event { ts, path: path.into(), data: data.into() });
    }

    /// Follows until the server dies.
    async fn follow_until_killed(mut self, addr: SocketAddr) -> Follower {
        for _ in 0..100 {
            match self.session(addr).await {
                SessionEnd::ServerGone => break,
                SessionEnd::Reconnect => {}
            }
        }
        self
    }

    /// One connection, following the recipe of `docs/PROTOCOL.md` 8.4.
    async fn session(&mut self, addr: SocketAddr) -> SessionEnd {
        let Ok(Ok((ws, _))) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))).await else {
            return SessionEnd::ServerGone;
        };
        let (mut tx, mut rx) = ws.split();
        if tx.send(Message::text(format!("#s#+{}", self.channel))).await.is_err() {
            return SessionEnd::ServerGone;
        }
        // Step 2: the ack comes before any event of the subscription.
        let position = match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match parse_line(t.as_bytes()) {
                Ok(ServerLine::Ack { key: b"s", ts }) => ts,
                _ => panic!("{}: expected the subscribe ack, got {t:?}", self.channel),
            },
            Ok(_) => return SessionEnd::ServerGone,
            Err(_) => panic!("{}: no subscribe ack for {WAIT:?} from a live server", self.channel),
        };
        self.sessions += 1;
        // Buffer the live events while backfilling.
        let (live_tx, mut live) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = rx.next().await {
                if live_tx.send(m).is_err() {
                    break;
                }
            }
        });
        if position < self.last {
            // Step 5: events already processed are gone (only possible with async durability).
            self.continuity_lost += 1;
        } else if self.last < position {
            // Step 3: backfill after L up to P.
            let mut after = self.last;
            loop {
                let target = format!("/log{}?after={after}&limit={PAGE}", self.channel);
                let page = match try_http_get(addr, &target, &[]).await {
                    Ok(r) if r.status == 200 => r.body,
                    Ok(r) => panic!("GET {target}: status {} {}", r.status, String::from_utf8_lossy(&r.body)),
                    Err(_) => return SessionEnd::ServerGone, // killed mid-backfill: resume next time
                };
                let mut count = 0;
                let mut reached = false;
                for line in page.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    count += 1;
                    let ev = parse_event(line).unwrap_or_else(|e| panic!("log line {:?}: {e}", String::from_utf8_lossy(line)));
                    if ev.ts > position {
                        reached = true; // arrives live
                        break;
                    }
                    self.process(ev.ts, &ev.path, &ev.data, "backfill");
                    after = ev.ts;
                }
                if reached || count < PAGE {
                    break;
                }
            }
        }
        // Step 4: the buffered live events, then live.
        while let Some(m) = live.recv().await {
            match m {
                Ok(Message::Text(t)) => {
                    let ev = parse_event(t.as_bytes()).unwrap_or_else(|e| panic!("live line {t:?}: {e}"));
                    assert!(ev.ts > position, "live event {} not after the subscribe position {position}", ev.ts);
                    self.process(ev.ts, &ev.path, &ev.data, "live");
                }
                Ok(Message::Close(Some(f))) if u16::from(f.code) == 4000 => return SessionEnd::Reconnect,
                Ok(Message::Close(_)) | Err(_) => return SessionEnd::ServerGone,
                Ok(_) => {}
            }
        }
        SessionEnd::ServerGone
    }
}

/// The whole log: every line must parse, timestamps strictly increasing.
async fn read_log(addr: SocketAddr) -> Vec<Event> {
    let r = try_http_get(addr, "/log/", &[]).await.unwrap_or_else(|e| panic!("GET /log/ from a live server: {e}"));
    assert_eq!(r.status, 200, "GET /log/: {}", String::from_utf8_lossy(&r.body));
    let mut out: Vec<Event> = Vec::new();
    for (i, line) in r.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let ev = parse_event(line).unwrap_or_else(|e| panic!("stored line {i} is corrupt ({e}): {:?}", String::from_utf8_lossy(line)));
        if let Some(prev) = out.last() {
            assert!(prev.ts < ev.ts, "stored timestamps not strictly increasing at line {i}: {} then {}", prev.ts, ev.ts);
        }
        out.push(Event { ts: ev.ts, path: ev.path.into_owned(), data: ev.data.into_owned() });
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    Async,
}

/// Everything sent so far, and the checks against a log read after a restart.
#[derive(Debug, Default)]
struct History {
    acked: Vec<Event>,
    unacked: Vec<Vec<u8>>,
    /// The greatest timestamp ever acked (lost or not).
    max_acked: Timestamp,
}

impl History {
    /// Checks the log; returns how many acked events it lacks.
    fn check(&self, log: &[Event], mode: Mode, when: &str) -> usize {
        let mut by_data: HashMap<&[u8], &Event> = HashMap::new();
        for ev in log {
            assert!(by_data.insert(&ev.data, ev).is_none(), "{when}: {:?} stored twice", String::from_utf8_lossy(&ev.data));
        }
        let by_ts: HashMap<Timestamp, &Event> = log.iter().map(|e| (e.ts, e)).collect();
        let mut missing = 0;
        for a in &self.acked {
            match by_ts.get(&a.ts) {
                Some(stored) => assert_eq!(*stored, a, "{when}: the event stored at {} is not the one acked with it", a.ts),
                None => {
                    assert!(!by_data.contains_key(&*a.data), "{when}: acked event stored at another timestamp: {a:?}");
                    assert_eq!(mode, Mode::Async, "{when}: acked event lost with --durability sync: {a:?}");
                    missing += 1;
                }
            }
        }
        // What survives a crash is a prefix of what that server run handed out: an acked
        // event may be missing only if no later event of the same run was stored.
        let run_of = |data: &[u8]| data.split(|&b| b == b':').next().map(<[u8]>::to_vec).unwrap_or_default();
        let mut newest_stored: HashMap<Vec<u8>, Timestamp> = HashMap::new();
        for ev in log {
            let t = newest_stored.entry(run_of(&ev.data)).or_insert(ev.ts);
            *t = (*t).max(ev.ts);
        }
        for a in self.acked.iter().filter(|a| !by_ts.contains_key(&a.ts)) {
            if let Some(newest) = newest_stored.get(&run_of(&a.data)) {
                assert!(a.ts > *newest, "{when}: acked event {a:?} lost although the later {newest} of the same run survived");
            }
        }
        let acked: HashSet<Timestamp> = self.acked.iter().map(|a| a.ts).collect();
        let unacked: HashSet<&[u8]> = self.unacked.iter().map(|d| &d[..]).collect();
        for ev in log {
            assert!(acked.contains(&ev.ts) || unacked.contains(&*ev.data), "{when}: stored event that was never sent: {ev:?}");
        }
        missing
    }
}

async fn campaign(bin: &Path, mode: Mode, extra: &[&str], env: &[(&str, &str)], name: &str) {
    let seed = env_number("IVY_CRASH_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let cycles = env_number("IVY_CRASH_CYCLES").map_or(DEFAULT_CYCLES, |n| n as usize);
    println!("{name}: {cycles} cycles, seed {seed} (IVY_CRASH_SEED={seed} replays the kill delays)");
    let mut rng = Rng(seed);
    let dir = temp_dir();
    let mut flags = vec!["--durability", if mode == Mode::Sync { "sync" } else { "async" }];
    flags.extend_from_slice(extra);
    let mut history = History::default();
    let mut followers = vec![Follower::new("/crash"), Follower::new("/crash/p1"), Follower::new("/")];
    let started = Instant::now();
    let mut total_lost = 0;
    for cycle in 0..cycles {
        let server = ServerProcess::start_bin(bin, dir.path(), &flags, env).await;
        let addr = server.addr;
        let log = read_log(addr).await;
        let missing = history.check(&log, mode, &format!("{name}, restart {cycle}"));
        let lost = missing - total_lost;
        total_lost = missing;

        let mut tasks = Vec::new();
        for f in followers.drain(..) {
            tasks.push(tokio::spawn(f.follow_until_killed(addr)));
        }
        let mut pubs = Vec::new();
        for id in 0..PUBLISHERS {
            pubs.push(tokio::spawn(publish_until_killed(addr, id, cycle)));
        }
        // Mostly mid-run kills; one in five right away, while connections are being set up.
        let delay = if rng.range(0, 5) == 0 { rng.range(0, 60) } else { rng.range(100, 700) };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill().await;

        let mut acked_now = 0;
        for p in pubs {
            let sends = p.await.expect("publisher task");
            acked_now += sends.acked.len();
            // Strictly increasing across restarts: never a timestamp handed out before, even
            // one whose event a crash took away.
            if let Some(first) = sends.acked.iter().map(|a| a.ts).min() {
                assert!(
                    first > history.max_acked,
                    "{name}, cycle {cycle}: timestamp {first} handed out after a restart is not above {} acked before",
                    history.max_acked
                );
            }
            history.unacked.extend(sends.unacked);
            history.acked.extend(sends.acked);
        }
        for t in tasks {
            followers.push(t.await.expect("follower task"));
        }
        history.max_acked = history.acked.iter().map(|a| a.ts).max().unwrap_or(Timestamp::ZERO);
        println!("{name}: restart {cycle}: {lost} acked events lost in the crash before; killed after {delay} ms, {acked_now} acked");
    }

    // Final restart: the log against everything acked, and every follower against the log.
    let server = ServerProcess::start_bin(bin, dir.path(), &flags, env).await;
    let log = read_log(server.addr).await;
    total_lost = history.check(&log, mode, &format!("{name}, final restart"));
    // One more event: its timestamp must be above everything acked before, lost or not.
    let after = publish_one(server.addr).await;
    assert!(after > history.max_acked, "{name}: timestamp {after} handed out after the final restart is not above {}", history.max_acked);
    let by_ts: HashMap<Timestamp, &Event> = log.iter().map(|e| (e.ts, e)).collect();
    for f in &followers {
        assert!(f.violations.is_empty(), "{name}: follower of {} saw duplicates or disorder: {:?}", f.channel, f.violations);
        if mode == Mode::Sync {
            assert_eq!(f.continuity_lost, 0, "{name}: follower of {} found events it had processed missing", f.channel);
            let expected: Vec<&Event> = log.iter().filter(|e| is_within(&e.path, &f.channel) && e.ts <= f.last).collect();
            let seen: Vec<&Event> = f.seen.iter().collect();
            assert!(
                seen == expected,
                "{name}: follower of {} saw {} events, the log has {} up to {}",
                f.channel,
                seen.len(),
                expected.len(),
                f.last
            );
        } else {
            for e in &f.seen {
                if let Some(stored) = by_ts.get(&e.ts) {
                    assert_eq!(*stored, e, "{name}: follower of {} saw another event at {}", f.channel, e.ts);
                }
            }
        }
        println!(
            "{name}: follower of {}: {} events in {} sessions, continuity lost {} times",
            f.channel,
            f.seen.len(),
            f.sessions,
            f.continuity_lost
        );
    }
    assert!(history.acked.len() > cycles, "{name}: the campaign hardly sent anything ({} acked)", history.acked.len());
    println!(
        "{name}: {} acked, {} unacked, {} acked lost, {} stored, {:.1} s",
        history.acked.len(),
        history.unacked.len(),
        total_lost,
        log.len(),
        started.elapsed().as_secs_f64()
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_with_sync_durability_loses_no_acked_event() {
    campaign(&server_bin(), Mode::Sync, &[], &[], "sync").await;
}

/// The async hazard needs a wall clock behind the newest timestamps (after a step back), so
/// this runs `ivy-test-server`, the server with a frozen clock: without a durable clock floor
/// it would reuse the timestamps of the acked events a crash lost. The long flush interval
/// makes such losses likely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_async_durability_never_reuses_a_timestamp() {
    let bin = Path::new(env!("CARGO_BIN_EXE_ivy-test-server"));
    campaign(bin, Mode::Async, &["--flush-interval-ms", "2000"], &[("IVY_TEST_FROZEN_CLOCK", "4102444800")], "async").await;
}

/// The floor is recorded one second ahead while running, but a graceful shutdown records the
/// clock's exact position: a clean restart continues right after the last timestamp.
#[tokio::test]
async fn a_graceful_restart_with_async_durability_resumes_right_after_the_last_timestamp() {
    let dir = temp_dir();
    let frozen = Timestamp::new(4_102_444_800, 0).expect("timestamp");
    let open = || async {
        let engine = ivy_server::engine::SledEngine::new(dir.path())
            .durability(ivy_server::Durability::Async)
            .wall_clock(ivy_server::WallClock::from_fn(move || frozen));
        // sled releases its lock from a background thread shortly after the store is dropped.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match ivy_server::Ivy::builder(ivy_server::Config::default()).engine(engine.clone()).open() {
                Ok(ivy) => return ivy,
                Err(e) if e.to_string().contains("could not acquire lock") && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    };
    let ivy = open().await;
    let mut last = Timestamp::ZERO;
    for i in 0..3 {
        last = ivy.publish("/g", &i.to_string()).await.expect("publish");
    }
    assert_eq!(last, Timestamp::new(4_102_444_800, 2).expect("timestamp"));
    ivy.shutdown().await;
    drop(ivy);
    let ivy = open().await;
    assert_eq!(ivy.publish("/g", "after").await.expect("publish"), last.next());
    ivy.shutdown().await;
}
