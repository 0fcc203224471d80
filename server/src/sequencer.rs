//! The sequencer: one thread that stamps, stores and publishes every event, in order.
//!
//! Group commit: the thread takes every request waiting in its queue (up to a batch limit),
//! gives them consecutive timestamps, appends them to the log in one atomic batch, makes the
//! batch durable with one flush, and only then hands the events to the broker and answers
//! their senders. Concurrent senders share each flush, so throughput grows with concurrency
//! instead of staying at one flush per event.
//!
//! Clock floor: when the clock has a limit (asynchronous durability, where an acknowledged
//! event can still be lost in a crash), a batch whose timestamps would go above it first
//! records a new floor in the store, durably, one second ahead of what it needs; so a restart
//! after a crash never hands out the timestamp of a lost event again, at the cost of one
//! extra flush per second of timestamps. A graceful stop records the clock's exact position.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use axum::extract::ws::Utf8Bytes;
use ivy_client_core::Timestamp;
use ivy_client_core::wire::{ErrorCode, encode_ack, encode_error, encode_event};
use tokio::sync::{mpsc, oneshot};

use crate::Watermark;
use crate::broker::{Broker, Conn, Published, ReplySlot};
use crate::clock::Clock;
use crate::config::Durability;
use crate::store::{EventLog, Record};

/// Most events in one group commit.
const MAX_BATCH: usize = 4096;
/// Most data bytes in one group commit.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How far beyond the timestamps it needs a new clock floor is recorded.
const FLOOR_AHEAD_NANOS: u128 = 1_000_000_000;

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// The path is invalid (only from [`crate::Ivy::publish`]; WebSocket sends are checked
    /// when parsed).
    InvalidPath(ivy_client_core::path::PathError),
    /// The store failed; the event was not delivered live. If the failure came from the
    /// flush, the event may still be in the log.
    Storage(String),
    /// The server is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::InvalidPath(e) => write!(f, "invalid path: {e}"),
            PublishError::Storage(e) => write!(f, "event not stored: {e}"),
            PublishError::ShuttingDown => f.write_str("server is shutting down"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Where the outcome of a publish goes.
#[derive(Debug)]
pub enum Reply {
    /// Nowhere.
    None,
    /// To a WebSocket connection, as `#key#@ts` or `#key#!storage ...`; with no key, errors
    /// only.
    Conn {
        /// The sending connection.
        conn: Arc<Conn>,
        /// Its ack key.
        key: Option<Box<[u8]>>,
        /// The place reserved for the reply in the connection's queue, if any.
        slot: Option<ReplySlot>,
    },
    /// To an in-process caller.
    Channel(oneshot::Sender<Result<Timestamp, PublishError>>),
}

impl Reply {
    /// Delivers the outcome.
    pub fn send(self, result: Result<Timestamp, PublishError>) {
        match self {
            Reply::None => {}
            Reply::Channel(tx) => {
                let _ = tx.send(result);
            }
            Reply::Conn { conn, key, slot } => {
                let mut line = Vec::new();
                match (result, key) {
                    (Ok(ts), Some(key)) => encode_ack(&key, ts, &mut line),
                    (Ok(_), None) => return,
                    (Err(e), key) => {
                        let code = match e {
                            PublishError::Storage(_) => ErrorCode::Storage,
                            PublishError::InvalidPath(_) => ErrorCode::BadPath,
                            PublishError::ShuttingDown => ErrorCode::ShuttingDown,
                        };
                        encode_error(key.as_deref(), code, &e.to_string(), &mut line);
                    }
                }
                match slot {
                    Some(slot) => slot.send_line(line),
                    None => {
                        conn.push_line(line);
                    }
                }
            }
        }
    }
}

/// A request to publish one event.
#[derive(Debug)]
pub struct PublishRequest {
    /// Normalized path.
    pub path: Box<str>,
    /// The message the data came in (kept whole to avoid a copy).
    pub message: Utf8Bytes,
    /// Offset of the data in `message`.
    pub data_start: usize,
    /// Sending connection, excluded from delivery.
    pub sender: Option<u64>,
    /// Where the outcome goes.
    pub reply: Reply,
}

impl PublishRequest {
    /// The event data.
    pub fn data(&self) -> &[u8] {
        self.message.as_bytes().get(self.data_start..).unwrap_or_default()
    }
}

/// A message to the sequencer thread.
#[derive(Debug)]
pub enum Input {
    /// Publish an event.
    Publish(PublishRequest),
    /// Finish what is queued before this, flush and exit.
    Stop,
}

/// Starts the sequencer thread.
pub fn spawn(
    log: Arc<dyn EventLog>,
    broker: Arc<dyn Broker>,
    clock: Arc<Clock>,
    visible: Arc<Watermark>,
    durability: Durability,
    queue: usize,
) -> (mpsc::Sender<Input>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let handle = std::thread::Builder::new()
        .name("ivy-sequencer".into())
        .spawn(move || run(rx, &*log, &*broker, &clock, &visible, durability))
        .expect("spawn the sequencer thread");
    (tx, handle)
}

static SEQ: AtomicU64 = AtomicU64::new(1);

fn run(mut rx: mpsc::Receiver<Input>, log: &dyn EventLog, broker: &dyn Broker, clock: &Clock, visible: &Watermark, durability: Durability) {
    let mut batch: Vec<PublishRequest> = Vec::new();
    let mut stop = false;
    while !stop {
        match rx.blocking_recv() {
            None | Some(Input::Stop) => break,
            Some(Input::Publish(r)) => batch.push(r),
        }
        let mut bytes = batch[0].data().len();
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(Input::Publish(r)) => {
                    bytes += r.data().len();
                    batch.push(r);
                }
                Ok(Input::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        commit(&mut batch, log, broker, clock, visible, durability);
    }
    // Requests still queued (sent after Stop) are refused, then the store is flushed.
    rx.close();
    while let Ok(input) = rx.try_recv() {
        if let Input::Publish(r) = input {
            r.reply.send(Err(PublishError::ShuttingDown));
        }
    }
    // Nothing after the clock's position was handed out: a clean restart resumes right there.
    if let Err(e) = log.set_clock_floor(clock.last()) {
        tracing::error!(error = %e, "recording the clock floor failed");
    }
    if let Err(e) = log.sync() {
        tracing::error!(error = %e, "final flush of the event store failed");
    }
}

fn commit(
    batch: &mut Vec<PublishRequest>,
    log: &dyn EventLog,
    broker: &dyn Broker,
    clock: &Clock,
    visible: &Watermark,
    durability: Durability,
) {
    let lines = match stamp(batch, log, clock) {
        Ok(lines) => lines,
        Err(e) => {
            tracing::error!(error = %e, events = batch.len(), "recording the clock floor failed; the events were not stored");
            for r in batch.drain(..) {
                r.reply.send(Err(PublishError::Storage(e.to_string())));
            }
            return;
        }
    };
    let records: Vec<Record<'_>> = batch.iter().zip(&lines).map(|(r, (ts, line))| Record { ts: *ts, path: &r.path, line }).collect();
    let stored = log.append(&records).and_then(|()| match durability {
        Durability::Sync => log.sync(),
        Durability::Async => Ok(()),
    });
    drop(records);
    match stored {
        Ok(()) => {
            // Durable: log readers may see the batch now, before any subscriber gets it.
            if let Some((ts, _)) = lines.last() {
                visible.raise(*ts);
            }
            let published: Vec<Published> = batch
                .iter_mut()
                .zip(lines)
                .map(|(r, (ts, line))| Published {
                    seq: SEQ.fetch_add(1, Ordering::Relaxed),
                    ts,
                    path: std::mem::take(&mut r.path),
                    sender: r.sender,
                    line: match String::from_utf8(line) {
                        Ok(s) => Utf8Bytes::from(s),
                        // Data comes from text frames or `&str`, so this cannot happen.
                        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned().into(),
                    },
                })
                .collect();
            broker.publish(&published);
            for (r, p) in batch.drain(..).zip(&published) {
                r.reply.send(Ok(p.ts));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events = batch.len(), "storing events failed; they were not delivered live");
            for r in batch.drain(..) {
                r.reply.send(Err(PublishError::Storage(e.to_string())));
            }
        }
    }
}

/// Gives the batch its timestamps and encodes its lines, first raising the clock floor when
/// the clock's limit is in the way.
fn stamp(batch: &[PublishRequest], log: &dyn EventLog, clock: &Clock) -> std::io::Result<Vec<(Timestamp, Vec<u8>)>> {
    let encode = |next: &mut dyn FnMut() -> Timestamp| -> Vec<(Timestamp, Vec<u8>)> {
        batch
            .iter()
            .map(|r| {
                let ts = next();
                let mut line = Vec::new();
                encode_event(ts, &r.path, r.data(), &mut line);
                (ts, line)
            })
            .collect()
    };
    // One raise is normally enough; the wall clock would have to jump a second ahead between
    // two attempts for another one to be needed.
    for _ in 0..4 {
        match clock.allocate(batch.len(), encode) {
            Ok(lines) => return Ok(lines),
            Err(needed) => {
                let floor = Timestamp::from_nanos(needed.as_nanos().saturating_add(FLOOR_AHEAD_NANOS));
                log.set_clock_floor(floor)?;
                clock.set_limit(floor);
            }
        }
    }
    Err(std::io::Error::other("the clock floor could not be raised ahead of the wall clock"))
}
