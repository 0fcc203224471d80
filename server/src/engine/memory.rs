//! The in-memory engine: the single-node sequencer over a store that lives in memory.
//!
//! Everything the sled engine promises holds while the process lives (timestamps, group
//! commit, stored before delivered, the log endpoint's pages), and nothing survives it: a
//! restarted server starts empty. Made for fast tests of the protocol and for ephemeral
//! deployments (`ivy-server --memory`), and a second implementation of the engine seam.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::sync::{Arc, PoisonError, RwLock};

use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, ancestors};

use super::local::{LocalEngine, Record, Storage, WallClock};
use super::{Context, Direction, Engine, Open};

/// Opens an in-memory engine.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let ivy = ivy_server::Ivy::builder(ivy_server::Config::default()).engine(ivy_server::engine::MemoryEngine::new()).open()?;
/// let ts = ivy.publish("/chat", "hello").await.unwrap();
/// # ivy.shutdown().await; let _ = ts; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MemoryEngine {
    wall: WallClock,
}

impl MemoryEngine {
    /// An empty in-memory engine with the system clock.
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    /// Timestamps from `wall` instead of the system clock (for tests of clock steps).
    pub fn wall_clock(mut self, wall: WallClock) -> MemoryEngine {
        self.wall = wall;
        self
    }
}

impl Open for MemoryEngine {
    fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>> {
        LocalEngine::open(Arc::new(MemStorage::default()), self.wall, context)
    }

    fn describe(&self) -> String {
        "in memory (nothing is kept after the process exits)".into()
    }
}

/// Events in memory: every event once, and per channel the positions of its events.
#[derive(Debug, Default)]
pub(crate) struct MemStorage(RwLock<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Every event (the root's log), in timestamp order: timestamp and line.
    events: Vec<(Timestamp, Box<[u8]>)>,
    /// For each channel other than the root, the indexes in `events` of its subtree's events.
    channels: HashMap<Box<str>, Vec<usize>>,
    floor: Option<Timestamp>,
}

impl Inner {
    fn visit(
        &self,
        channel: &str,
        after: Option<Timestamp>,
        until: Timestamp,
        dir: Direction,
        visit: &mut dyn FnMut(Timestamp, &[u8]) -> ControlFlow<()>,
    ) {
        if channel == ROOT {
            self.walk(self.events.len(), |i| i, after, until, dir, visit);
        } else if let Some(index) = self.channels.get(channel) {
            self.walk(index.len(), |i| index[i], after, until, dir, visit);
        }
    }

    /// Visits the events `at(0..len)` (in timestamp order) within the bounds.
    fn walk(
        &self,
        len: usize,
        at: impl Fn(usize) -> usize,
        after: Option<Timestamp>,
        until: Timestamp,
        dir: Direction,
        visit: &mut dyn FnMut(Timestamp, &[u8]) -> ControlFlow<()>,
    ) {
        let ts = |i: usize| self.events[at(i)].0;
        // The first position after `after`, and the first after `until`.
        let lo = after.map_or(0, |a| partition(len, |i| ts(i) <= a));
        let hi = partition(len, |i| ts(i) <= until);
        let mut each = |i: usize| {
            let (t, line) = &self.events[at(i)];
            visit(*t, line)
        };
        match dir {
            Direction::Forward => {
                for i in lo..hi.max(lo) {
                    if each(i).is_break() {
                        return;
                    }
                }
            }
            Direction::Backward => {
                for i in (lo..hi.max(lo)).rev() {
                    if each(i).is_break() {
                        return;
                    }
                }
            }
        }
    }
}

/// The first `i` in `0..len` for which `below(i)` is false (`below` is true, then false).
fn partition(len: usize, below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl MemStorage {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Storage for MemStorage {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        let mut inner = self.0.write().unwrap_or_else(PoisonError::into_inner);
        for r in records {
            let at = inner.events.len();
            inner.events.push((r.ts, r.line.into()));
            for anc in ancestors(r.path).filter(|a| *a != ROOT) {
                match inner.channels.get_mut(anc) {
                    Some(v) => v.push(at),
                    None => {
                        inner.channels.insert(anc.into(), vec![at]);
                    }
                }
            }
        }
        Ok(())
    }

    fn commit(&self) -> io::Result<()> {
        Ok(())
    }

    fn acks_before_durable(&self) -> bool {
        false
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        Ok(self.read().events.last().map(|e| e.0))
    }

    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.0.write().unwrap_or_else(PoisonError::into_inner).floor = Some(ts);
        Ok(())
    }

    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        Ok(self.read().floor)
    }

    fn scan(
        &self,
        channel: &str,
        after: Option<Timestamp>,
        until: Timestamp,
        dir: Direction,
        visit: &mut dyn FnMut(Timestamp, &[u8]) -> ControlFlow<()>,
    ) -> io::Result<()> {
        self.read().visit(channel, after, until, dir, visit);
        Ok(())
    }
}
