//! The memory of presence state per member, measured in-process (`docs/BENCHMARKS.md`,
//! "Presence"): `LocalPresence` (what the sled and memory engines use) with N members joining
//! one room, as token members (`sub` of 12 bytes, no info; then with a 100-byte info) and as
//! anonymous ones; the resident memory of this process before and after, per member. No
//! sockets: the connection's own memory (queues, buffers, subscription) is in the socket
//! figures of the same section.
//!
//! ```sh
//! cargo run --release -p ivy-server --example presence_memory -- 100000
//! ```

use std::sync::Arc;

use ivy_server::engine::{ConnId, FanOut, LocalPresence, Member, MemberId, Presence, PresenceOptions};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn measure(n: u64, what: &str, member: impl Fn(u64) -> Member) {
    let presence = LocalPresence::start(PresenceOptions::default(), Arc::new(FanOut::new()));
    let members: Vec<Member> = (0..n).map(&member).collect();
    let before = rss_bytes();
    for (i, m) in members.iter().enumerate() {
        presence.join(ConnId(i as u64), "/bench-room", m);
    }
    let after = rss_bytes();
    assert_eq!(presence.count("/bench-room"), n as usize);
    println!(
        "{what}: {n} members in /bench-room: RSS {} -> {} KiB: {:.0} bytes per member (the channel's entry, the aggregates of / and /bench-room, the connection's record)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) as f64 / n as f64
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    // Each kind in a fresh process: memory freed by one measurement would be reused by the next.
    let Some(kind) = std::env::args().nth(2) else {
        let exe = std::env::current_exe().expect("this program");
        for kind in ["sub", "info", "anon"] {
            let status = std::process::Command::new(&exe).arg(n.to_string()).arg(kind).status().expect("run");
            assert!(status.success());
        }
        return;
    };
    match kind.as_str() {
        "sub" => measure(n, "token members", |i| Member { id: MemberId::Sub(format!("member-{i:06}").into()), info: None }),
        // Each its own info (97 bytes of JSON), as each token would carry.
        "info" => measure(n, "token members with a 97-byte info each", |i| Member {
            id: MemberId::Sub(format!("member-{i:06}").into()),
            info: Some(Arc::from(format!("{{\"name\":\"{}{i:06}\"}}", "x".repeat(81)).as_str())),
        }),
        _ => measure(n, "anonymous members", |_| Member { id: MemberId::anonymous(), info: None }),
    }
}
