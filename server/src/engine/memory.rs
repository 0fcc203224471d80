//! The in-memory engine: the single-node sequencer over a store that lives in memory.
//!
//! Everything the sled engine promises holds while the process lives (timestamps, group
//! commit, stored before delivered, the log endpoint's pages), and nothing survives it: a
//! restarted server starts empty. Made for fast tests of the protocol and for ephemeral
//! deployments (`ivy-server --memory`), and a second implementation of the engine seam.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::ControlFlow;
use std::sync::{Arc, PoisonError, RwLock};

use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, ancestors};

use super::local::{Deleted, LocalEngine, Record, Storage, Visit, VisitId, WallClock, line_path};
use super::{Context, Direction, Engine, Horizon, Open, Origin, Retention};

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
    retention: Retention,
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

    /// How long events are kept (default: everything).
    pub fn retention(mut self, retention: Retention) -> MemoryEngine {
        self.retention = retention;
        self
    }
}

impl Open for MemoryEngine {
    fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>> {
        LocalEngine::open(Arc::new(MemStorage::default()), self.wall, self.retention, context)
    }

    fn describe(&self) -> String {
        "in memory (nothing is kept after the process exits)".into()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Events in memory: every event once, and per channel the positions of its events.
#[derive(Debug, Default)]
pub(crate) struct MemStorage {
    inner: RwLock<Inner>,
    /// Held by the one deletion in progress.
    deleting: std::sync::Mutex<()>,
}

/// An event's line and sender.
/// An event's line, sender and send id (if it has one).
type Stored = (Box<[u8]>, Origin, Option<Box<[u8]>>);

#[derive(Debug, Default)]
struct Inner {
    /// Every event (the root's log), in timestamp order: timestamp, line and sender (`None`
    /// once deleted: a hole that keeps the positions of the later ones). The first is at
    /// position `base`.
    events: VecDeque<(Timestamp, Option<Stored>)>,
    /// The position of `events[0]` (positions count every event ever appended).
    base: usize,
    /// For each channel other than the root, the positions of its subtree's events.
    channels: HashMap<Box<str>, VecDeque<usize>>,
    /// Each log's horizon: the newest event deleted from it.
    horizons: HashMap<Box<str>, Horizon>,
    floor: Option<Timestamp>,
}

impl Inner {
    fn visit(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) {
        if channel == ROOT {
            self.walk(self.events.len(), |i| i, after, until, dir, visit);
        } else if let Some(index) = self.channels.get(channel) {
            self.walk(index.len(), |i| index[i] - self.base, after, until, dir, visit);
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
        visit: &mut Visit<'_>,
    ) {
        let ts = |i: usize| self.events[at(i)].0;
        // The first position after `after`, and the first after `until`.
        let lo = after.map_or(0, |a| partition(len, |i| ts(i) <= a));
        let hi = partition(len, |i| ts(i) <= until);
        let mut each = |i: usize| match &self.events[at(i)] {
            (t, Some((line, origin, _))) => visit(*t, line, origin.wire()),
            (_, None) => ControlFlow::Continue(()),
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

/// Events removed per step of a deletion (few in tests, so that they take many steps).
const DELETE_STEP: usize = if cfg!(test) { 64 } else { 4096 };

/// An event to delete: its position, timestamp and path.
type Victim = (usize, Timestamp, Box<str>);

impl Inner {
    /// The next victims of a deletion after `after` (at most [`DELETE_STEP`], from at most 4
    /// times as many events of the log): position, timestamp, path; and the last timestamp
    /// looked at.
    fn victims(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, own: bool) -> (Vec<Victim>, Option<Timestamp>) {
        let (mut found, mut last) = (Vec::new(), None);
        let mut seen = 0;
        let mut each = |pos: usize| -> bool {
            let (ts, line) = &self.events[pos - self.base];
            if *ts > until {
                return false;
            }
            last = Some(*ts);
            seen += 1;
            if let Some(path) = line.as_ref().and_then(|(l, ..)| line_path(l)).filter(|p| !own || *p == channel) {
                found.push((pos, *ts, path.into()));
            }
            found.len() < DELETE_STEP && seen < 4 * DELETE_STEP
        };
        let past = |ts: Timestamp| after.is_some_and(|a| ts <= a);
        if channel == ROOT {
            let start = partition(self.events.len(), |i| past(self.events[i].0));
            for pos in self.base + start..self.base + self.events.len() {
                if !each(pos) {
                    break;
                }
            }
        } else if let Some(index) = self.channels.get(channel) {
            let start = partition(index.len(), |i| past(self.events[index[i] - self.base].0));
            for &pos in index.range(start..) {
                if !each(pos) {
                    break;
                }
            }
        }
        (found, last)
    }

    /// Removes `victims` (in order) from every log that holds them, raising their horizons.
    fn remove(&mut self, victims: &[Victim]) {
        // Each log that holds a victim, and the victims' positions in it (in order).
        let mut logs: HashMap<&str, Vec<usize>> = HashMap::new();
        for (pos, _, path) in victims {
            for anc in ancestors(path) {
                logs.entry(anc).or_default().push(*pos);
            }
        }
        for (log, lost) in &logs {
            let newest = self.events[lost[lost.len() - 1] - self.base].0;
            let h = self.horizons.entry((*log).into()).or_insert(Horizon { newest, deletions: 0 });
            *h = Horizon { newest: h.newest.max(newest), deletions: h.deletions + 1 };
            if *log != ROOT
                && let Some(index) = self.channels.get_mut(*log)
            {
                // Retention by age removes the oldest: a prefix, removed in its own time.
                if index.iter().take(lost.len()).eq(lost.iter()) {
                    index.drain(..lost.len());
                } else {
                    index.retain(|p| lost.binary_search(p).is_err());
                }
                if index.is_empty() {
                    self.channels.remove(*log);
                }
            }
        }
        for (pos, ..) in victims {
            self.events[pos - self.base].1 = None;
        }
        // The holes at the front go (retention by age deletes from the front).
        while self.events.front().is_some_and(|e| e.1.is_none()) {
            self.events.pop_front();
            self.base += 1;
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
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Storage for MemStorage {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for r in records {
            let at = inner.base + inner.events.len();
            inner.events.push_back((r.ts, Some((r.line.into(), r.origin.clone(), r.id.map(Box::from)))));
            for anc in ancestors(r.path).filter(|a| *a != ROOT) {
                match inner.channels.get_mut(anc) {
                    Some(v) => v.push_back(at),
                    None => {
                        inner.channels.insert(anc.into(), VecDeque::from([at]));
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
        Ok(self.read().events.back().map(|e| e.0))
    }

    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        let _one = self.deleting.lock().unwrap_or_else(PoisonError::into_inner);
        let mut deleted = Deleted::default();
        let Some(until) = before.as_nanos().checked_sub(1).map(Timestamp::from_nanos) else { return Ok(deleted) };
        let mut after = None;
        // In steps: the victims found under the read lock, removed under the write lock, so
        // that appends never wait for more than one step.
        loop {
            let (victims, last) = self.read().victims(channel, after, until, own);
            let Some(last) = last else { break };
            after = Some(last);
            if victims.is_empty() {
                continue;
            }
            self.inner.write().unwrap_or_else(PoisonError::into_inner).remove(&victims);
            deleted.events += victims.len() as u64;
            deleted.newest = victims.last().map(|v| v.1).max(deleted.newest);
        }
        Ok(deleted)
    }

    fn horizon(&self, channel: &str) -> Option<Horizon> {
        self.read().horizons.get(channel).copied()
    }

    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner).floor = Some(ts);
        Ok(())
    }

    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        Ok(self.read().floor)
    }

    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
        self.read().visit(channel, after, until, dir, visit);
        Ok(())
    }

    fn ids(&self, after: Timestamp, visit: &mut VisitId<'_>) -> io::Result<()> {
        let inner = self.read();
        let start = partition(inner.events.len(), |i| inner.events[i].0 <= after);
        for (ts, stored) in inner.events.range(start..) {
            if let Some((_, origin, Some(id))) = stored {
                visit(*ts, origin.wire(), id);
            }
        }
        Ok(())
    }
}
