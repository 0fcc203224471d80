//! The event log: the storage interface and its sled implementation.
//!
//! [`EventLog`] is the narrow interface the rest of the server uses, so that a distributed
//! engine can replace sled without touching the protocol code. The sled layout, in one tree
//! so that a batch of events is written atomically:
//!
//! - `v` → the layout version (`1`);
//! - `c` → the clock floor (12 bytes, big-endian; optional): no timestamp above it has been
//!   handed out, so a restarted clock resumes after `max(floor, newest event)`;
//! - `e` ‖ ts (12 bytes, big-endian) → the event line exactly as delivered (`@ts:/path:data`);
//! - `i` ‖ channel ‖ `0x00` ‖ ts → empty, for the event's own path and each ancestor except
//!   the root (the root's log is the whole `e` range).
//!
//! A channel's log (its whole subtree, in timestamp order) is one range scan of its index
//! prefix; `0x00` cannot occur in a path, so `/a` never matches `/ab`.

use std::io;
use std::ops::ControlFlow;
use std::path::Path;

use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, ancestors};

use crate::config::Durability;

/// One event to append.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Its timestamp (unique, greater than every stored one).
    pub ts: Timestamp,
    /// Its normalized path.
    pub path: &'a str,
    /// The encoded event line.
    pub line: &'a [u8],
}

/// Scan direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// A visitor of log entries: gets each timestamp and a loader that appends its line to a buffer.
pub type Visit<'a> = dyn FnMut(Timestamp, &mut dyn FnMut(&mut Vec<u8>) -> io::Result<()>) -> io::Result<ControlFlow<()>> + 'a;

/// Storage of events.
pub trait EventLog: Send + Sync + 'static {
    /// Appends events atomically (all or none), in timestamp order.
    fn append(&self, records: &[Record<'_>]) -> io::Result<()>;
    /// Makes every appended event durable (flush and fsync).
    fn sync(&self) -> io::Result<()>;
    /// The newest stored timestamp.
    fn last_timestamp(&self) -> io::Result<Option<Timestamp>>;
    /// Durably records the clock floor `ts` (flushed and fsynced when this returns, together
    /// with every event appended before): the server promises to hand out no timestamp above
    /// it before recording a higher one, and resumes its clock after it when the store is
    /// opened again. This is what keeps timestamps unique after a crash that lost events
    /// which had already been acknowledged (asynchronous durability).
    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()>;
    /// The last recorded clock floor, if any.
    fn clock_floor(&self) -> io::Result<Option<Timestamp>>;
    /// Visits the events of `channel`'s subtree with `after < ts <= until`, in `dir` order,
    /// until the visitor breaks.
    fn scan(
        &self,
        channel: &str,
        after: Option<Timestamp>,
        until: Option<Timestamp>,
        dir: Direction,
        visit: &mut Visit<'_>,
    ) -> io::Result<()>;
}

/// The sled-backed [`EventLog`].
#[derive(Debug, Clone)]
pub struct SledLog {
    db: sled::Db,
}

const LAYOUT_VERSION: &[u8] = b"1";

/// How long opening waits for the store's lock to be released by an instance going away.
const LOCK_WAIT_MS: u64 = 3000;

/// Whether sled refused to open because another instance holds the store's file lock.
fn is_lock_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}
const CLOCK_FLOOR_KEY: &[u8] = b"c";

fn to_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

fn event_key(ts: Timestamp) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = b'e';
    k[1..].copy_from_slice(&ts.to_be_bytes());
    k
}

fn index_prefix(channel: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(channel.len() + 2 + Timestamp::BYTES);
    k.push(b'i');
    k.extend_from_slice(channel.as_bytes());
    k.push(0);
    k
}

fn ts_of_key(key: &[u8]) -> io::Result<Timestamp> {
    key.len()
        .checked_sub(Timestamp::BYTES)
        .and_then(|at| Timestamp::from_be_bytes(&key[at..]))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt key in event store"))
}

impl SledLog {
    /// Opens (or creates) the store in `dir`. With [`Durability::Async`], sled flushes in the
    /// background every `flush_interval_ms`.
    pub fn open(dir: &Path, durability: Durability, flush_interval_ms: u64) -> io::Result<SledLog> {
        let flush_every = match durability {
            Durability::Sync => Some(1000),
            Durability::Async => Some(flush_interval_ms.max(1)),
        };
        let config = sled::Config::new().path(dir).flush_every_ms(flush_every);
        // sled releases its file lock from a background thread after the previous instance is
        // dropped: a reopen right after a shutdown (in-process restarts, quick service restarts)
        // waits for it briefly instead of failing. Another live process keeps it: then fail.
        let mut waited = 0;
        let db = loop {
            match config.open().map_err(to_io) {
                Err(e) if is_lock_error(&e) && waited < LOCK_WAIT_MS => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    waited += 50;
                }
                other => break other?,
            }
        };
        match db.get(b"v").map_err(to_io)? {
            None => {
                db.insert(b"v", LAYOUT_VERSION).map_err(to_io)?;
            }
            Some(v) if &*v == LAYOUT_VERSION => {}
            Some(v) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: event store layout {:?} is not supported (expected 1)", dir.display(), String::from_utf8_lossy(&v)),
                ));
            }
        }
        Ok(SledLog { db })
    }
}

impl EventLog for SledLog {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        let mut key = Vec::new();
        for r in records {
            batch.insert(&event_key(r.ts)[..], r.line);
            for anc in ancestors(r.path).filter(|a| *a != ROOT) {
                key.clear();
                key.push(b'i');
                key.extend_from_slice(anc.as_bytes());
                key.push(0);
                key.extend_from_slice(&r.ts.to_be_bytes());
                batch.insert(&key[..], &[][..]);
            }
        }
        self.db.apply_batch(batch).map_err(to_io)
    }

    fn sync(&self) -> io::Result<()> {
        self.db.flush().map(|_| ()).map_err(to_io)
    }

    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        match self.db.scan_prefix(b"e").next_back() {
            None => Ok(None),
            Some(kv) => ts_of_key(&kv.map_err(to_io)?.0).map(Some),
        }
    }

    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.db.insert(CLOCK_FLOOR_KEY, &ts.to_be_bytes()[..]).map_err(to_io)?;
        self.sync()
    }

    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        match self.db.get(CLOCK_FLOOR_KEY).map_err(to_io)? {
            None => Ok(None),
            Some(v) => Timestamp::from_be_bytes(&v)
                .map(Some)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt clock floor in event store")),
        }
    }

    fn scan(
        &self,
        channel: &str,
        after: Option<Timestamp>,
        until: Option<Timestamp>,
        dir: Direction,
        visit: &mut Visit<'_>,
    ) -> io::Result<()> {
        use std::ops::Bound::{Excluded, Included};
        let root = channel == ROOT;
        let prefix = if root { b"e".to_vec() } else { index_prefix(channel) };
        let bound = |ts: Timestamp| {
            let mut k = prefix.clone();
            k.extend_from_slice(&ts.to_be_bytes());
            k
        };
        let lo = match after {
            Some(a) => Excluded(bound(a)),
            None => Included(prefix.clone()),
        };
        let hi = Included(bound(until.unwrap_or(Timestamp::MAX)));
        let iter = self.db.range::<Vec<u8>, _>((lo, hi));
        let mut step = |kv: sled::Result<(sled::IVec, sled::IVec)>| -> io::Result<ControlFlow<()>> {
            let (k, v) = kv.map_err(to_io)?;
            let ts = ts_of_key(&k)?;
            let mut load = |out: &mut Vec<u8>| -> io::Result<()> {
                if root {
                    out.extend_from_slice(&v);
                    return Ok(());
                }
                match self.db.get(event_key(ts)).map_err(to_io)? {
                    Some(line) => {
                        out.extend_from_slice(&line);
                        Ok(())
                    }
                    None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("index entry without event {ts:?}"))),
                }
            };
            visit(ts, &mut load)
        };
        match dir {
            Direction::Forward => {
                for kv in iter {
                    if step(kv)?.is_break() {
                        break;
                    }
                }
            }
            Direction::Backward => {
                for kv in iter.rev() {
                    if step(kv)?.is_break() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_floor_survives_reopening_and_is_not_an_event() {
        let dir = std::env::temp_dir().join(format!("ivy-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        {
            let log = SledLog::open(&dir, Durability::Async, 100).unwrap();
            assert_eq!(log.clock_floor().unwrap(), None);
            log.append(&[Record { ts: ts(1), path: "/a", line: b"@1700000000.000000001:/a:x" }]).unwrap();
            log.set_clock_floor(ts(9)).unwrap();
            assert_eq!(log.last_timestamp().unwrap(), Some(ts(1)));
        }
        let log = SledLog::open(&dir, Durability::Sync, 100).unwrap();
        assert_eq!(log.clock_floor().unwrap(), Some(ts(9)));
        assert_eq!(log.last_timestamp().unwrap(), Some(ts(1)));
        let mut seen = Vec::new();
        log.scan(ROOT, None, None, Direction::Forward, &mut |t, _| {
            seen.push(t);
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(seen, vec![ts(1)]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
