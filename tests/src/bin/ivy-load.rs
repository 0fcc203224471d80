//! `ivy-load`: drives a running Ivy server with concurrent acked senders and reports the
//! acknowledged events per second.
//!
//! It starts nothing itself: point it at a server (`--url`). Each of `--senders` connections
//! sends its share of `--events` events of `--size` bytes of data, each with an ack key,
//! keeping at most `--window` of them unacknowledged, so that with the default window of 1
//! every sender waits for each ack: the figure then shows how acks scale with concurrency
//! (group commit). Progress goes to stderr once a second; the result is one JSON line on
//! stdout. The exit status is 1 when a send was refused or a connection failed.
//!
//! ```text
//! ivy-load --url ws://127.0.0.1:8080/ws --senders 16 --events 20000 --size 100
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use ivy_client_core::wire::{ServerLine, parse_line};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(name = "ivy-load", about = "Drives an Ivy server with concurrent acked senders and reports acked events per second")]
struct Args {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Concurrent sending connections.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    senders: u32,
    /// Events to send in total (split evenly between the senders).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Unacknowledged events each sender may have in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    window: u32,
    /// Channel prefix: sender K sends to PATH/K.
    #[arg(long, default_value = "/load")]
    path: String,
}

/// What one sender measured.
#[derive(Debug, Default)]
struct Outcome {
    /// Ack latencies in microseconds.
    latencies: Vec<u32>,
    error: Option<String>,
}

async fn sender(args: Arc<Args>, id: u32, count: u64, acked: Arc<AtomicU64>, start: Arc<tokio::sync::Barrier>) -> Outcome {
    let mut out = Outcome { latencies: Vec::with_capacity(usize::try_from(count).unwrap_or(0)), error: None };
    let connected = tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::connect_async(args.url.as_str())).await;
    let ws = match connected {
        Ok(Ok((ws, _))) => Some(ws),
        Ok(Err(e)) => {
            out.error = Some(format!("sender {id}: cannot connect to {}: {e}", args.url));
            None
        }
        Err(_) => {
            out.error = Some(format!("sender {id}: no connection to {} within 30 s", args.url));
            None
        }
    };
    start.wait().await; // everyone starts together, connected or not
    let Some(ws) = ws else { return out };
    let (mut tx, mut rx) = ws.split();
    let data = "x".repeat(args.size);
    let prefix = format!(":{}/{id}:", args.path.trim_end_matches('/'));
    let mut sent_at = std::collections::VecDeque::with_capacity(args.window as usize);
    let mut next = 0u64;
    let mut done = 0u64;
    while done < count {
        while next < count && sent_at.len() < args.window as usize {
            let msg = format!("#{next}#{prefix}{data}");
            sent_at.push_back(Instant::now());
            if let Err(e) = tx.send(Message::text(msg)).await {
                out.error = Some(format!("sender {id}: send failed: {e}"));
                return out;
            }
            next += 1;
        }
        let reply = match tokio::time::timeout(Duration::from_secs(60), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => {
                out.error = Some(format!("sender {id}: connection failed: {e}"));
                return out;
            }
            Ok(None) => {
                out.error = Some(format!("sender {id}: the server closed the connection"));
                return out;
            }
            Err(_) => {
                out.error = Some(format!("sender {id}: no reply for 60 s"));
                return out;
            }
        };
        match parse_line(reply.as_bytes()) {
            Ok(ServerLine::Ack { .. }) => {
                let t0 = sent_at.pop_front().unwrap_or_else(Instant::now);
                out.latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                done += 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                out.error = Some(format!("sender {id}: refused: {reply}"));
                return out;
            }
        }
    }
    let _ = tx.close().await;
    out
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Arc::new(Args::parse());
    let acked = Arc::new(AtomicU64::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(args.senders as usize + 1));
    let mut tasks = Vec::new();
    for id in 0..args.senders {
        let share = args.events / u64::from(args.senders) + u64::from(u64::from(id) < args.events % u64::from(args.senders));
        tasks.push(tokio::spawn(sender(args.clone(), id, share, acked.clone(), start.clone())));
    }
    start.wait().await;
    let began = Instant::now();
    let progress = {
        let acked = acked.clone();
        let total = args.events;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = acked.load(Ordering::Relaxed);
                eprintln!("ivy-load: {now}/{total} acked, {}/s in the last second", now - last);
                last = now;
            }
        })
    };
    let mut latencies = Vec::with_capacity(usize::try_from(args.events).unwrap_or(0));
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(o) => {
                latencies.extend(o.latencies);
                errors.extend(o.error);
            }
            Err(e) => errors.push(format!("a sender panicked: {e}")),
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    progress.abort();
    latencies.sort_unstable();
    let n = latencies.len();
    for e in &errors {
        eprintln!("ivy-load: {e}");
    }
    println!(
        "{{\"url\":\"{}\",\"senders\":{},\"window\":{},\"size\":{},\"events\":{},\"acked\":{n},\"errors\":{},\"seconds\":{seconds:.3},\"acked_per_sec\":{:.1},\"latency_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}}}",
        args.url.replace('\\', "\\\\").replace('"', "\\\""),
        args.senders,
        args.window,
        args.size,
        args.events,
        errors.len(),
        n as f64 / seconds.max(1e-9),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
