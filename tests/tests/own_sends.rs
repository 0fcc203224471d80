//! Clients that subscribe to a channel and send into it while others do too (issue 18).
//!
//! The server stamps sends in group commits. It used to ack a batch only after handing all of
//! its events to the subscribed connections, so when a batch held a send of client A and a
//! later send of client B, A received B's event before the ack of its own, earlier, event; the
//! client, which inserts its own sends at their ack's timestamp, then took its own event for
//! one already delivered and dropped it (in the chat demo: a message pending forever). Now the
//! server acks each send before the batch's later events (docs/PROTOCOL.md 5.7, 8.1), and the
//! client holds back live events while its sends are unacked, so either fix alone keeps this
//! test passing; `client-core/tests/sim.rs` checks the client's against the old order.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use ivy_client_native::{Client, Event, Start, Subscription};
use ivy_tests::{TestServer, log_text, temp_dir};

const CLIENTS: usize = 3;
const ROUNDS: usize = 20;
/// Sends in flight at once per client: they share group commits with the other clients'.
const BURST: usize = 8;

/// The next `n` events, or what arrived before a silence of 10 s.
async fn next_events(sub: &mut Subscription, n: usize) -> Vec<Event> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(e))) => got.push(e),
            Ok(Some(Err(e))) => panic!("subscription error after {} events: {e}", got.len()),
            Ok(None) => panic!("stream ended after {} events", got.len()),
            Err(_) => break,
        }
    }
    got
}

fn line(e: &Event) -> String {
    let mut v = Vec::new();
    e.encode(&mut v);
    String::from_utf8(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_each_deliver_the_whole_log_their_own_events_included() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = format!("ws://{}", server.addr);
    let mut clients = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..CLIENTS {
        let c = Client::connect(&url).await.unwrap();
        subs.push(c.subscribe_from("/room", Start::Beginning).await.unwrap());
        // The subscription has taken effect once a later request is answered.
        let _ = c.timestamp().await.unwrap();
        clients.push(c);
    }
    let senders = clients.iter().enumerate().map(|(i, c)| async move {
        for round in 0..ROUNDS {
            let data: Vec<String> = (0..BURST).map(|k| format!("client {i} round {round} message {k}")).collect();
            for r in join_all(data.iter().map(|d| c.send("/room", d))).await {
                r.expect("send acked");
            }
        }
    });
    join_all(senders).await;

    let log: Vec<String> = log_text(server.addr, "/log/room").await.lines().map(str::to_string).collect();
    assert_eq!(log.len(), CLIENTS * ROUNDS * BURST);
    for (i, sub) in subs.iter_mut().enumerate() {
        let got: Vec<String> = next_events(sub, log.len()).await.iter().map(line).collect();
        let missing: Vec<&String> = log.iter().filter(|l| !got.contains(l)).collect();
        assert!(
            missing.is_empty(),
            "client {i} delivered {} of {} events; missing {:?}",
            got.len(),
            log.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(got, log, "client {i} delivered the log exactly, in order");
        // And nothing after it.
        assert!(tokio::time::timeout(Duration::from_millis(300), sub.next()).await.is_err(), "client {i}: nothing beyond the log");
    }
    for c in &clients {
        c.close().await;
    }
    server.stop().await;
}
