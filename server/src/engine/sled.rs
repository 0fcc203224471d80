//! The sled engine (the default): the single-node sequencer over an embedded sled store.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use ivy_server::engine::{Durability, SledEngine};
//! let engine = SledEngine::new("/var/lib/ivy").durability(Durability::Sync);
//! # let _ = engine; Ok(()) }
//! ```
//!
//! The store layout (version 5), in one sled tree so that a batch of events is written
//! atomically:
//!
//! - `v` → the layout version (`5`);
//! - `c` → the clock floor (12 bytes, big-endian; optional): no timestamp above it has been
//!   handed out, so a restarted clock resumes after `max(floor, newest event)`;
//! - `b` ‖ ts → a block of the root log: consecutive events, the first at `ts`;
//! - `j` ‖ channel ‖ `0x00` ‖ ts → a block of `channel`'s log (its whole subtree), the first
//!   event at `ts`, for each ancestor of an event's path except the root;
//! - `h` ‖ channel → the horizon of `channel`'s log, once it lost events (retention or a
//!   deletion): the newest event deleted from it (12 bytes) and how many deletions changed it
//!   (8 bytes). Written before the events are removed, in atomic steps beside the appends; a
//!   block that loses entries is rewritten under its key (still at or before its first entry),
//!   or removed when empty.
//!
//! Timestamps in keys are 12 bytes, big-endian, so key order is time order. A block is a run of
//! entries in timestamp order, each `ts (12 bytes) ‖ word (4 bytes, big-endian)` and then:
//!
//! - a line with its sender (the word's bit 30 is set, the rest below bit 29 is the line's
//!   length): the sender's wire form (`docs/PROTOCOL.md` 6.1.1: `=escaped-sub`, `-` or `*`)
//!   preceded by its length (2 bytes, big-endian), then, when bit 29 is set too (layout 5, in
//!   the root's log only), the event's send id (`docs/PROTOCOL.md` 5.9) preceded by its length
//!   (1 byte), then the event line exactly as delivered to a connection without extensions
//!   (`@ts:/path:data`); the extended line is built from the sender and the line, and the id is
//!   never part of either;
//! - a line without its sender (the word is its length, below 2³⁰; written by layout 3): read
//!   with the sender unknown, `?`;
//! - nothing (the word's top bit is set, the rest is the line's length): a *reference* to the
//!   event of that timestamp, whose line is in the root's log.
//!
//! A block holds at most [`BLOCK_BYTES`] of entries (one larger event makes a block of its own).
//! Each group commit writes its events as a few blocks rather than one key per event and index
//! entry: sled's cost is per key, so this is what makes group commit cheap; and a channel's log
//! is one range scan of its prefix reading whole blocks. `0x00` cannot occur in a path, so `/a`
//! never matches `/ab`.
//!
//! Every event's line is stored once, in the root's log, with its sender. The log of each
//! other level of its path holds a reference (16 bytes), or a copy of the line (and its sender)
//! when the copies are small: an event
//! at depth `d` (`/a/b` has 2) with a line of `n` bytes is copied into the `d` logs when
//! `d × n <= INLINE_BUDGET` (256 bytes), referenced otherwise. The copies spare a reader of a
//! channel one lookup per event where they cost little: short events on shallow paths. So an
//! event costs on disk its line, 16 bytes per level of its path, and at most 256 bytes of copies
//! (before sled's own overhead), whatever its depth; a 60 KB event at depth 16 is stored once
//! instead of 17 times. References are written in the same atomic batch as the lines they
//! point to, so a durable reference always has its line.
//!
//! Send ids: an event sent with an id has it stored in its root entry, in the same atomic write
//! as the event, so that an id is stored if and only if its event is (after any crash). On
//! open, the engine rebuilds the ids it remembers ([`super::idempotency`]) from the root
//! log's events within the idempotency window ([`Storage::ids`]): one range scan of the newest
//! blocks.
//!
//! Older layouts, from stores written by earlier versions:
//!
//! - layout 4 (no send ids) is read as it is: its blocks are layout 5 blocks without ids.
//!   Opening one records version 5, so that an earlier version (which would read the id bit as
//!   damage) refuses the store instead;
//! - layout 3 (no senders) is read as it is: its blocks are layout 4 blocks whose lines have
//!   no sender, and their events are read with the sender unknown (`?`). Opening one records
//!   version 5, so that an earlier version (which would read the sender bit as damage)
//!   refuses the store instead;
//! - layout 2 (every level's log held a copy of every line) is read as it is: its blocks are
//!   layout 3 blocks whose entries are all copies; it opens as layout 5, as layout 3 does;
//! - layout 1 (one key per event: `e` ‖ ts → line, and `i` ‖ channel ‖ `0x00` ‖ ts → index
//!   entries) is converted to layout 5 (senders unknown, no ids) when such a store is opened, in atomic steps that a
//!   crash can interrupt and a restart resumes.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, ancestors};

use super::local::{Deleted, LocalEngine, Record, Storage, Visit, VisitId, WallClock, line_path};
use super::reopen::{self, Reopening};
use super::{Context, Direction, Engine, Horizon, Open, Retention};
#[cfg(test)]
use super::{Origin, ReadRequest, local::read_page};

/// When an event is acknowledged relative to its durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Acknowledge and broadcast an event only after the write that holds it has been
    /// flushed and fsynced (group commit: concurrent events share one flush).
    #[default]
    Sync,
    /// Acknowledge and broadcast once the event is in the store's memory, and flush in the
    /// background (every [`SledEngine::flush_interval`]). A crash of the machine or of the
    /// process can lose the events of the last interval, even though they were acknowledged;
    /// their timestamps are never handed out again (a durable clock floor).
    Async,
}

/// Default of [`SledEngine::data`] (`--data`).
pub const DEFAULT_DATA_DIR: &str = "./ivy-data";
/// Default of [`SledEngine::min_free_space`] (`--min-free-space`): 64 MiB.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 64 << 20;
/// Default of [`SledEngine::flush_interval`] (`--flush-interval-ms`).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Opens the sled engine: the store in a directory (created if missing), its durability and
/// its clock. See the [module docs](self) for the layout.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SledEngine {
    /// The store's directory. Default [`DEFAULT_DATA_DIR`].
    pub data: PathBuf,
    /// When events are acknowledged. Default [`Durability::Sync`].
    pub durability: Durability,
    /// How often [`Durability::Async`] flushes in the background. Default
    /// [`DEFAULT_FLUSH_INTERVAL`].
    pub flush_interval: Duration,
    /// The wall clock timestamps follow. Default: the system clock.
    pub wall: WallClock,
    /// Open a store that lost acknowledged events (damaged or truncated) as it is, instead of
    /// refusing it: the loss is logged and the store's acknowledged mark reset. Default false.
    pub repair: bool,
    /// Largest size of the store on disk, in bytes; beyond it sends are refused with
    /// `store-full` (checked once a second). 0 (the default): no limit.
    pub max_size: u64,
    /// Free space kept on the store's file system, in bytes: below it sends are refused with
    /// `store-full`, before the disk is full (checked once a second). Default
    /// [`DEFAULT_MIN_FREE_SPACE`].
    pub min_free_space: u64,
    /// How long events are kept. Default: everything.
    pub retention: Retention,
}

impl Default for SledEngine {
    fn default() -> SledEngine {
        SledEngine::new(DEFAULT_DATA_DIR)
    }
}

impl SledEngine {
    /// The store in `data`, with the defaults.
    pub fn new(data: impl Into<PathBuf>) -> SledEngine {
        SledEngine {
            data: data.into(),
            durability: Durability::Sync,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            wall: WallClock::system(),
            repair: false,
            max_size: 0,
            min_free_space: DEFAULT_MIN_FREE_SPACE,
            retention: Retention::keep_everything(),
        }
    }

    /// How long events are kept (see [`Retention`]).
    pub fn retention(mut self, retention: Retention) -> SledEngine {
        self.retention = retention;
        self
    }

    /// When events are acknowledged.
    pub fn durability(mut self, durability: Durability) -> SledEngine {
        self.durability = durability;
        self
    }

    /// The background flush interval of [`Durability::Async`].
    pub fn flush_interval(mut self, interval: Duration) -> SledEngine {
        self.flush_interval = interval;
        self
    }

    /// Timestamps from `wall` instead of the system clock (for tests of clock steps).
    pub fn wall_clock(mut self, wall: WallClock) -> SledEngine {
        self.wall = wall;
        self
    }

    /// The store's size limit (see [`SledEngine::max_size`]).
    pub fn max_size(mut self, bytes: u64) -> SledEngine {
        self.max_size = bytes;
        self
    }

    /// The free-space reserve (see [`SledEngine::min_free_space`]).
    pub fn min_free_space(mut self, bytes: u64) -> SledEngine {
        self.min_free_space = bytes;
        self
    }

    /// Accept a store that lost acknowledged events (see [`SledEngine::repair`]).
    pub fn repair(mut self, repair: bool) -> SledEngine {
        self.repair = repair;
        self
    }
}

impl SledEngine {
    fn open_log(&self, repair: bool) -> io::Result<SledLog> {
        let mut log = SledLog::open_checked(&self.data, self.durability, self.flush_interval, repair)?;
        log.quota = Quota { dir: self.data.clone(), max_size: self.max_size, min_free: self.min_free_space, state: Default::default() };
        Ok(log)
    }
}

impl Open for SledEngine {
    fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>> {
        std::fs::create_dir_all(&self.data)?;
        let (log, on_full_disk) = reopen::open_with_ballast(&self.data, || self.open_log(self.repair))?;
        tracing::info!(data = %self.data.display(), durability = ?self.durability, "sled store open");
        // After a write failure the store is reopened in the running process (sled keeps
        // failing otherwise: see `super::reopen`), never with `--repair`.
        let (engine, dir) = ((*self).clone(), self.data.clone());
        let reopen = Box::new(move || {
            reopen::open_with_ballast(&engine.data, || engine.open_log(false)).map(|(log, full)| (Box::new(log) as Box<dyn Storage>, full))
        });
        let free_space = Box::new(move || fs2::available_space(&dir));
        let storage = Reopening::new(Box::new(log), reopen, free_space, self.min_free_space, on_full_disk);
        LocalEngine::open(Arc::new(storage), self.wall, self.retention, context)
    }

    fn describe(&self) -> String {
        format!("sled store in {} ({:?} durability)", self.data.display(), self.durability)
    }

    fn kind(&self) -> &'static str {
        "sled"
    }
}

/// The sled-backed [`Storage`].
#[derive(Debug)]
pub(crate) struct SledLog {
    db: sled::Db,
    durability: Durability,
    mark: Mark,
    quota: Quota,
    /// Each log's horizon (`h` ‖ channel → newest ‖ deletions), as stored.
    horizons: std::sync::RwLock<HashMap<Box<str>, Horizon>>,
    /// Held by the one deletion in progress.
    deleting: std::sync::Mutex<()>,
}

/// The store's limits ([`SledEngine::max_size`], [`SledEngine::min_free_space`]). The size on
/// disk and the free space are measured at most once a second (sled's size, a `statvfs`);
/// in between, what was appended since counts against both, so a burst cannot overshoot.
#[derive(Debug, Default)]
struct Quota {
    dir: PathBuf,
    max_size: u64,
    min_free: u64,
    state: std::sync::Mutex<QuotaState>,
}

#[derive(Debug, Default)]
struct QuotaState {
    /// When last measured, the size on disk and the free space then.
    measured: Option<(std::time::Instant, Option<u64>, Option<u64>)>,
    /// Bytes appended since.
    since: u64,
}

impl Quota {
    fn active(&self) -> bool {
        self.max_size > 0 || self.min_free > 0
    }

    fn appended(&self, bytes: u64) {
        if self.active() {
            let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.since = st.since.saturating_add(bytes);
        }
    }

    fn admit(&self, db: &sled::Db) -> Result<(), Arc<str>> {
        if !self.active() {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.measured.is_none_or(|(at, ..)| at.elapsed() >= Duration::from_secs(1)) {
            let size = (self.max_size > 0).then(|| db.size_on_disk().ok()).flatten();
            let free = (self.min_free > 0).then(|| fs2::available_space(&self.dir).ok()).flatten();
            st.measured = Some((std::time::Instant::now(), size, free));
            st.since = 0;
        }
        let Some((_, size, free)) = st.measured else { return Ok(()) };
        if let Some(size) = size.map(|s| s.saturating_add(st.since)).filter(|&s| s >= self.max_size) {
            return Err(format!("the store is full: {size} bytes on disk, the limit is {}", self.max_size).into());
        }
        if let Some(free) = free.map(|f| f.saturating_sub(st.since)).filter(|&f| f < self.min_free) {
            return Err(format!("the disk is nearly full: {free} bytes free, the server keeps {}", self.min_free).into());
        }
        Ok(())
    }
}

/// The acknowledged mark: the file [`MARK_FILE`] beside sled's own files, holding the newest
/// timestamp known to be durable in the store (written at most once a second in `sync` mode,
/// at each durable clock floor in `async` mode, and at shutdown). It can lag the store, never
/// lead it, so a store that opens with an older newest event than the mark lost events: it
/// was damaged or truncated (sled recovers a damaged log by cutting it at the damage, which
/// would otherwise go unnoticed and become permanent with the next writes).
#[derive(Debug)]
struct Mark {
    path: PathBuf,
    state: std::sync::Mutex<MarkState>,
}

#[derive(Debug, Default)]
struct MarkState {
    /// The newest event appended.
    appended: Option<Timestamp>,
    /// The mark on disk.
    written: Option<Timestamp>,
    /// When it was last written.
    at: Option<std::time::Instant>,
}

/// The acknowledged mark's file name.
pub const MARK_FILE: &str = "ivy-acked";

impl Mark {
    fn read(path: &Path) -> io::Result<Option<Timestamp>> {
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: unreadable mark ({e})", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that everything appended so far is durable (`always`: now; otherwise at most
    /// once a second).
    fn durable(&self, always: bool) {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(ts) = st.appended.filter(|&a| Some(a) > st.written) else { return };
        if !always && st.at.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        st.at = Some(std::time::Instant::now());
        match Mark::write(&self.path, ts) {
            Ok(()) => st.written = Some(ts),
            // The mark only detects damage later; failing to write it loses nothing now.
            Err(e) => tracing::warn!(error = %e, file = %self.path.display(), "writing the acknowledged mark failed"),
        }
    }

    fn write(path: &Path, ts: Timestamp) -> io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{ts}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

const LAYOUT_VERSION: &[u8] = b"5";
const LAYOUT_V4: &[u8] = b"4";
const LAYOUT_V3: &[u8] = b"3";
const LAYOUT_V2: &[u8] = b"2";
const LAYOUT_V1: &[u8] = b"1";

/// Most line bytes in one block (unless one event alone is larger). Small enough that a sled
/// leaf (split at 17 entries) stays below the size sled writes as a separate blob file (128 KiB
/// with its default 512 KiB segments), and that a read starting in the middle of a block
/// reads little for nothing; large enough to make a group commit a few keys.
pub const BLOCK_BYTES: usize = 4 * 1024;
/// Bytes before each line in a block (and the whole of a reference).
const ENTRY_HEADER: usize = Timestamp::BYTES + 4;
/// The bit of an entry's length word that makes it a reference.
const REFERENCE: u32 = 1 << 31;
/// The bit of a line's length word that says the line comes with its sender (layout 4): the
/// header is then followed by the sender's length (2 bytes, big-endian) and wire form, and
/// then the line. A line without it (written by layout 3) has an unknown sender (`?`).
const FROM: u32 = 1 << 30;
/// The bit of a line's length word (with [`FROM`]) that says the line comes with its send id
/// (layout 5): the sender is then followed by the id's length (1 byte) and the id, and then
/// the line. Only the root's log stores ids.
const WITH_ID: u32 = 1 << 29;
/// The sender of a line stored before senders were (layout 3).
const UNKNOWN_ORIGIN: &[u8] = b"?";
/// An event's line is copied into the logs of the levels below the root when, times their
/// number (its path's depth), it is at most this many bytes; otherwise they reference it.
pub const INLINE_BUDGET: usize = 256;

/// Whether the logs of an event's path below the root hold copies of its line (see the
/// [module docs](self)).
pub(crate) fn inline(depth: usize, line: usize) -> bool {
    depth.saturating_mul(line) <= INLINE_BUDGET
}

/// The bytes of block entries an event of `line` bytes at `depth` costs, and how many entries.
pub(crate) fn stored(depth: usize, line: usize) -> (usize, usize) {
    let copies = if inline(depth, line) { depth * line } else { 0 };
    (depth + 1, line + (depth + 1) * ENTRY_HEADER + copies)
}

/// How long opening waits for the store's lock to be released by an instance going away.
const LOCK_WAIT_MS: u64 = 3000;

/// Whether sled refused to open because another instance holds the store's file lock.
fn is_lock_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}
const CLOCK_FLOOR_KEY: &[u8] = b"c";
/// The prefix of the horizon keys: `h` ‖ channel → the newest event deleted from its log (12
/// bytes) ‖ how many deletions removed events from it (8 bytes, big-endian).
const HORIZON_PREFIX: &[u8] = b"h";
/// Events removed per atomic step of a deletion (few in tests, so that they take many steps).
const DELETE_STEP: usize = if cfg!(test) { 64 } else { 1024 };

/// The key of `channel`'s horizon.
fn horizon_key(channel: &str) -> Vec<u8> {
    let mut k = HORIZON_PREFIX.to_vec();
    k.extend_from_slice(channel.as_bytes());
    k
}

fn to_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what} in event store"))
}

/// The key prefix of `channel`'s blocks.
fn block_prefix(channel: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(channel.len() + 2 + Timestamp::BYTES);
    block_prefix_into(channel, &mut k);
    k
}

/// Writes the key prefix of `channel`'s blocks into `out` (cleared first).
fn block_prefix_into(channel: &str, out: &mut Vec<u8>) {
    out.clear();
    if channel == ROOT {
        out.push(b'b');
    } else {
        out.push(b'j');
        out.extend_from_slice(channel.as_bytes());
        out.push(0);
    }
}

fn with_ts(prefix: &[u8], ts: Timestamp) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + Timestamp::BYTES);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&ts.to_be_bytes());
    k
}

/// One entry of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry<'a> {
    /// The event line, its sender's wire form (`?` for a layout 3 line) and its send id
    /// (empty: none; only in the root's log).
    Line(&'a [u8], &'a [u8], &'a [u8]),
    /// A reference to the event, whose line (this many bytes) is in the root's log.
    Ref(usize),
}

/// The entries of a block, in order.
struct Entries<'a> {
    block: &'a [u8],
    /// Where the next entry begins.
    at: usize,
}

impl<'a> Entries<'a> {
    fn new(block: &'a [u8]) -> Entries<'a> {
        Entries { block, at: 0 }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = io::Result<(Timestamp, Entry<'a>)>;
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.block.get(self.at..).filter(|r| !r.is_empty())?;
        let parsed = (|| {
            let head = rest.get(..ENTRY_HEADER)?;
            let ts = Timestamp::from_be_bytes(&head[..Timestamp::BYTES])?;
            let word = u32::from_be_bytes(head[Timestamp::BYTES..].try_into().ok()?);
            if word & REFERENCE != 0 {
                return Some((ts, Entry::Ref((word & !REFERENCE) as usize), ENTRY_HEADER));
            }
            if word & FROM == 0 {
                let len = word as usize;
                let line = rest.get(ENTRY_HEADER..ENTRY_HEADER.checked_add(len)?)?;
                return Some((ts, Entry::Line(line, UNKNOWN_ORIGIN, b""), ENTRY_HEADER + len));
            }
            let len = (word & !(FROM | WITH_ID)) as usize;
            let olen = u16::from_be_bytes(rest.get(ENTRY_HEADER..ENTRY_HEADER + 2)?.try_into().ok()?) as usize;
            let mut start = ENTRY_HEADER + 2 + olen;
            let origin = rest.get(ENTRY_HEADER + 2..start)?;
            let mut id: &[u8] = b"";
            if word & WITH_ID != 0 {
                let ilen = usize::from(*rest.get(start)?);
                id = rest.get(start + 1..start + 1 + ilen)?;
                start += 1 + ilen;
            }
            let line = rest.get(start..start.checked_add(len)?)?;
            Some((ts, Entry::Line(line, origin, id), start + len))
        })();
        match parsed {
            Some((ts, entry, used)) => {
                self.at += used;
                Some(Ok((ts, entry)))
            }
            None => {
                self.at = self.block.len();
                Some(Err(corrupt("block")))
            }
        }
    }
}

/// What a scan does with each line and its sender.
type LineOut<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// Finds the lines that a channel's references point to in the root's log, keeping the last
/// root block read (consecutive references are mostly in the same block).
#[derive(Default)]
struct Lines {
    /// The last root block read.
    block: Option<sled::IVec>,
    /// Where in it the entry after the last line found begins, and that line's timestamp: a
    /// later reference is searched from there (a forward scan reads each block once).
    resume: (usize, Timestamp),
}

impl Lines {
    /// The line of the event at `ts` (`len` bytes, as its reference says) and its sender.
    fn get(&mut self, db: &sled::Db, ts: Timestamp, len: usize) -> io::Result<(&[u8], &[u8])> {
        let cached = match &self.block {
            Some(block) if self.resume.1 < ts => find(block, ts, self.resume.0)?,
            Some(block) => find(block, ts, 0)?,
            None => None,
        };
        let range = match cached {
            Some(range) => range,
            None => {
                // The root block that holds `ts` is the last one starting at or before it: the
                // one starting at `ts` for a large event (which makes a block of its own), found
                // by a point lookup; otherwise the one before.
                let key = with_ts(b"b", ts);
                let block = match db.get(&key).map_err(to_io)? {
                    Some(v) => v,
                    None => match db.range::<Vec<u8>, _>(..=key).next_back() {
                        Some(kv) => {
                            let (k, v) = kv.map_err(to_io)?;
                            if k.len() != 1 + Timestamp::BYTES || k[0] != b'b' {
                                return Err(corrupt(&format!("reference to {ts} (no event)")));
                            }
                            v
                        }
                        None => return Err(corrupt(&format!("reference to {ts} (no event)"))),
                    },
                };
                let range = find(&block, ts, 0)?.ok_or_else(|| corrupt(&format!("reference to {ts} (no event)")))?;
                self.block = Some(block);
                range
            }
        };
        self.resume = (range.0.end, ts);
        let block = self.block.as_deref().unwrap_or_default();
        let line = block.get(range.0).unwrap_or_default();
        let origin = range.1.and_then(|o| block.get(o)).unwrap_or(UNKNOWN_ORIGIN);
        if line.len() != len {
            return Err(corrupt(&format!("reference to {ts} (length)")));
        }
        Ok((line, origin))
    }
}

/// Where the line of the event at `ts` is in the root block `block` (and its sender, unless
/// unknown), if it is there, looking from the entry that begins at `from` (0, or the end of
/// an entry before `ts`).
type Found = (std::ops::Range<usize>, Option<std::ops::Range<usize>>);
fn find(block: &[u8], ts: Timestamp, from: usize) -> io::Result<Option<Found>> {
    let mut entries = Entries { block, at: from };
    loop {
        let before = entries.at;
        match entries.next().transpose()? {
            None => return Ok(None),
            Some((t, _)) if t < ts => {}
            Some((t, Entry::Line(line, origin, _))) if t == ts => {
                // The line is the entry's end; its sender (if stored) after the header and its
                // length (and before the id, if any).
                let end = entries.at;
                let start = end - line.len();
                let word =
                    block.get(before + Timestamp::BYTES..before + ENTRY_HEADER).and_then(|w| w.try_into().ok()).map(u32::from_be_bytes);
                let from = word.filter(|w| w & FROM != 0).map(|_| before + ENTRY_HEADER + 2..before + ENTRY_HEADER + 2 + origin.len());
                return Ok(Some((start..end, from)));
            }
            Some((t, Entry::Ref(_))) if t == ts => return Err(corrupt("root block (a reference)")),
            Some(_) => return Ok(None),
        }
    }
}

/// Builds the blocks of one append: one open block per key prefix, written to the batch when
/// full or at the end. Finding a prefix's block is a hash lookup, so an append costs
/// O(events × depth) whatever the number of distinct channels in it.
#[derive(Default)]
struct Blocks {
    /// Each prefix's open block: (prefix, first timestamp, entries), in the order first seen.
    open: Vec<(Box<[u8]>, Timestamp, Vec<u8>)>,
    /// Where each prefix's block is in `open`.
    index: HashMap<Box<[u8]>, usize>,
    /// Room to build a prefix in, reused.
    scratch: Vec<u8>,
    /// Bytes of entries written.
    bytes: u64,
}

impl Blocks {
    fn push(&mut self, batch: &mut sled::Batch, prefix: &[u8], ts: Timestamp, entry: Entry<'_>) {
        let at = match self.index.get(prefix) {
            Some(&at) => at,
            None => {
                self.open.push((prefix.into(), ts, Vec::new()));
                self.index.insert(prefix.into(), self.open.len() - 1);
                self.open.len() - 1
            }
        };
        let (p, first, buf) = &mut self.open[at];
        let body = match entry {
            Entry::Line(line, origin, id) => 2 + origin.len() + if id.is_empty() { 0 } else { 1 + id.len() } + line.len(),
            Entry::Ref(_) => 0,
        };
        if !buf.is_empty() && buf.len() + ENTRY_HEADER + body > BLOCK_BYTES {
            batch.insert(with_ts(p, *first), std::mem::take(buf));
        }
        if buf.is_empty() {
            *first = ts;
        }
        self.bytes += (ENTRY_HEADER + body) as u64;
        buf.extend_from_slice(&ts.to_be_bytes());
        // Lines are bounded far below 2 GiB by the maximum message size.
        let word = |len: usize| u32::try_from(len).unwrap_or(u32::MAX).min(REFERENCE - 1);
        match entry {
            Entry::Line(line, origin, id) => {
                // A sender's wire form is at most 1 + 3 × 256 bytes (an escaped sub), an id
                // at most 64 bytes.
                let olen = u16::try_from(origin.len()).unwrap_or(u16::MAX);
                let ilen = u8::try_from(id.len()).unwrap_or(u8::MAX);
                let flags = if id.is_empty() { FROM } else { FROM | WITH_ID };
                buf.extend_from_slice(&(word(line.len()).min(WITH_ID - 1) | flags).to_be_bytes());
                buf.extend_from_slice(&olen.to_be_bytes());
                buf.extend_from_slice(&origin[..usize::from(olen)]);
                if !id.is_empty() {
                    buf.push(ilen);
                    buf.extend_from_slice(&id[..usize::from(ilen)]);
                }
                buf.extend_from_slice(line);
            }
            Entry::Ref(len) => buf.extend_from_slice(&(word(len) | REFERENCE).to_be_bytes()),
        }
    }

    /// Adds an event to the root's blocks (its line) and those of each other level of its path
    /// (a copy or a reference, see the module docs).
    fn add(&mut self, batch: &mut sled::Batch, ts: Timestamp, path: &str, line: &[u8], origin: &[u8], id: &[u8]) {
        self.push(batch, b"b", ts, Entry::Line(line, origin, id));
        let entry =
            if inline(ivy_client_core::path::depth(path), line.len()) { Entry::Line(line, origin, b"") } else { Entry::Ref(line.len()) };
        let mut prefix = std::mem::take(&mut self.scratch);
        for anc in ancestors(path).filter(|a| *a != ROOT) {
            block_prefix_into(anc, &mut prefix);
            self.push(batch, &prefix, ts, entry);
        }
        self.scratch = prefix;
    }

    fn finish(self, batch: &mut sled::Batch) {
        for (p, first, buf) in self.open {
            if !buf.is_empty() {
                batch.insert(with_ts(&p, first), buf);
            }
        }
    }
}

/// Removes the snapshots sled began and never finished (`snap.<lsn>.generating`: sled writes a
/// snapshot under that name, then renames it). sled reads the newest snapshot file and refuses
/// a store whose newest one is empty or cut ("Read corrupted data"), which a crash or a full
/// disk during a snapshot leaves behind; without it, sled recovers from the previous snapshot
/// (kept until the new one is renamed) and the log.
fn remove_unfinished_snapshots(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a snapshot that sled began and never finished");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Converts a layout 1 store to layout 5 (its events' senders unknown): a few thousand events per atomic step (their old keys
/// removed, their blocks written), so a crash in the middle leaves a store this resumes.
fn migrate_v1(db: &sled::Db, dir: &Path) -> io::Result<()> {
    const STEP: usize = 4096;
    let mut moved = 0u64;
    loop {
        let mut batch = sled::Batch::default();
        let mut blocks = Blocks::default();
        let mut n = 0u64;
        for kv in db.scan_prefix(b"e").take(STEP) {
            let (k, line) = kv.map_err(to_io)?;
            let ts = Some(&k[..])
                .filter(|k| k.len() == 13)
                .and_then(|k| Timestamp::from_be_bytes(&k[1..]))
                .ok_or_else(|| corrupt("layout 1 key"))?;
            let event = ivy_client_core::wire::parse_event(&line).map_err(|e| corrupt(&format!("layout 1 event {ts} ({e})")))?;
            blocks.add(&mut batch, ts, &event.path, &line, UNKNOWN_ORIGIN, b"");
            for anc in ancestors(&event.path).filter(|a| *a != ROOT) {
                let mut ik = vec![b'i'];
                ik.extend_from_slice(anc.as_bytes());
                ik.push(0);
                ik.extend_from_slice(&ts.to_be_bytes());
                batch.remove(ik);
            }
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            break;
        }
        blocks.finish(&mut batch);
        db.apply_batch(batch).map_err(to_io)?;
        moved += n;
    }
    // Index entries without their event (none, unless the store was damaged) are dropped.
    let mut batch = sled::Batch::default();
    for kv in db.scan_prefix(b"i") {
        batch.remove(kv.map_err(to_io)?.0);
    }
    batch.insert(b"v", LAYOUT_VERSION);
    db.apply_batch(batch).map_err(to_io)?;
    db.flush().map_err(to_io)?;
    tracing::info!(events = moved, store = %dir.display(), "converted the event store from layout 1 to layout 5 (senders unknown)");
    Ok(())
}

impl SledLog {
    /// Opens (or creates) the store in `dir`. With [`Durability::Async`], sled flushes in the
    /// background every `flush_interval`.
    #[cfg(test)]
    pub(crate) fn open(dir: &Path, durability: Durability, flush_interval: Duration) -> io::Result<SledLog> {
        SledLog::open_checked(dir, durability, flush_interval, false)
    }

    /// [`SledLog::open`], then the check against the acknowledged mark ([`Mark`]): a store
    /// that lost acknowledged events is refused, unless `repair` accepts it as it is (the loss
    /// is logged, and the mark set to what the store holds).
    pub(crate) fn open_checked(dir: &Path, durability: Durability, flush_interval: Duration, repair: bool) -> io::Result<SledLog> {
        // sled can panic on a damaged store (for example "tried to serialize Uninitialized" on a
        // log cut in the middle of a segment): that is a damaged store, not a crash.
        let opened = std::panic::catch_unwind(|| {
            let log = SledLog::open_unchecked(dir, durability, flush_interval)?;
            let last = log.last_timestamp()?;
            Ok::<_, io::Error>((log, last))
        });
        let (mut log, last) = match opened {
            Ok(result) => result?,
            Err(panic) => {
                let why = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the event store in {} is damaged: sled cannot open it ({}); restore it from a backup, or move it aside to start with an empty store",
                        dir.display(),
                        why.unwrap_or_else(|| "no reason given".into())
                    ),
                ));
            }
        };
        let path = dir.join(MARK_FILE);
        let mark = Mark::read(&path)?;
        // Events up to the root's horizon may be missing because they were deleted (retention,
        // an operator), not lost.
        let known = last.max(log.horizon(ROOT).map(|h| h.newest));
        if let Some(mark) = mark.filter(|&m| Some(m) > known) {
            let held = last.map_or("no events".to_string(), |l| format!("events up to {l}"));
            let what = format!(
                "the event store in {} has lost acknowledged events: it holds {held}, but events up to {mark} were stored and acknowledged, so the events after {} up to {mark} are gone (the store was damaged or truncated)",
                dir.display(),
                last.map_or("the beginning".to_string(), |l| l.to_string()),
            );
            if !repair {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what}; nothing was changed. To accept the store as it is, keeping what is intact, start once with --repair"),
                ));
            }
            tracing::warn!("{what}; --repair: accepting the store as it is");
            // The lost events' timestamps were handed out: never again (the clock floor, which
            // may itself be lost, resumes after the mark).
            let floor = log.clock_floor()?.map_or(mark, |f| f.max(mark));
            log.set_clock_floor(floor)?;
            Mark::write(&path, known.unwrap_or(Timestamp::ZERO))?;
        }
        let written = mark.min(known).or(known);
        log.mark.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).written = written;
        Ok(log)
    }

    fn open_unchecked(dir: &Path, durability: Durability, flush_interval: Duration) -> io::Result<SledLog> {
        remove_unfinished_snapshots(dir)?;
        let flush_every = match durability {
            Durability::Sync => Some(1000),
            Durability::Async => Some(u64::try_from(flush_interval.as_millis()).unwrap_or(u64::MAX).max(1)),
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
            // Nothing to convert: a layout 3 block is a layout 4 block whose lines have no
            // sender (read as unknown, `?`), and a layout 2 block is one without references.
            // A layout 4 block is a layout 5 block without send ids.
            Some(v) if &*v == LAYOUT_V4 => {
                db.insert(b"v", LAYOUT_VERSION).map_err(to_io)?;
                db.flush().map_err(to_io)?;
                tracing::info!(store = %dir.display(), "event store opened as layout 5: send ids are stored with new events (nothing to convert; earlier versions no longer open it)");
            }
            Some(v) if &*v == LAYOUT_V3 || &*v == LAYOUT_V2 => {
                db.insert(b"v", LAYOUT_VERSION).map_err(to_io)?;
                db.flush().map_err(to_io)?;
                tracing::info!(store = %dir.display(), from = %String::from_utf8_lossy(&v), "event store opened as layout 5: its events have an unknown sender (nothing to convert; earlier versions no longer open it)");
            }
            Some(v) if &*v == LAYOUT_V1 => migrate_v1(&db, dir)?,
            Some(v) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: event store layout {:?} is not supported (expected 1, 2, 3, 4 or 5)",
                        dir.display(),
                        String::from_utf8_lossy(&v)
                    ),
                ));
            }
        }
        let mark = Mark { path: dir.join(MARK_FILE), state: std::sync::Mutex::default() };
        let mut horizons = HashMap::new();
        for kv in db.scan_prefix(HORIZON_PREFIX) {
            let (k, v) = kv.map_err(to_io)?;
            let channel = std::str::from_utf8(&k[HORIZON_PREFIX.len()..]).map_err(|_| corrupt("horizon key"))?;
            let newest = v.get(..Timestamp::BYTES).and_then(Timestamp::from_be_bytes).ok_or_else(|| corrupt("horizon"))?;
            let deletions =
                v.get(Timestamp::BYTES..).and_then(|d| d.try_into().ok()).map(u64::from_be_bytes).ok_or_else(|| corrupt("horizon"))?;
            horizons.insert(channel.into(), Horizon { newest, deletions });
        }
        Ok(SledLog {
            db,
            durability,
            mark,
            quota: Quota::default(),
            horizons: std::sync::RwLock::new(horizons),
            deleting: std::sync::Mutex::new(()),
        })
    }
}

impl SledLog {
    /// Rewrites the blocks of `channel`'s log that hold the entries at `lost` (in order) without
    /// them, into `batch`; a block left empty is removed. A block keeps its key (the timestamp
    /// of its first entry as written), which still orders it among the others.
    fn remove_entries(&self, batch: &mut sled::Batch, channel: &str, lost: &[Timestamp]) -> io::Result<()> {
        let (Some(&first), Some(&last)) = (lost.first(), lost.last()) else { return Ok(()) };
        let prefix = block_prefix(channel);
        let key_len = prefix.len() + Timestamp::BYTES;
        let lo = match self.db.range::<Vec<u8>, _>(..=with_ts(&prefix, first)).next_back() {
            Some(kv) => {
                let k = kv.map_err(to_io)?.0;
                if k.len() == key_len && k.starts_with(&prefix) { k.to_vec() } else { prefix.clone() }
            }
            None => prefix.clone(),
        };
        for kv in self.db.range(lo..=with_ts(&prefix, last)) {
            let (k, block) = kv.map_err(to_io)?;
            if k.len() != key_len {
                continue;
            }
            let mut kept = Vec::with_capacity(block.len());
            let mut entries = Entries::new(&block);
            let mut changed = false;
            loop {
                let start = entries.at;
                let Some(e) = entries.next() else { break };
                let (ts, _) = e?;
                if lost.binary_search(&ts).is_ok() {
                    changed = true;
                } else {
                    kept.extend_from_slice(&block[start..entries.at]);
                }
            }
            if changed {
                if kept.is_empty() {
                    batch.remove(k);
                } else {
                    batch.insert(k, kept);
                }
            }
        }
        Ok(())
    }
}

impl Storage for SledLog {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        let mut blocks = Blocks::default();
        for r in records {
            blocks.add(&mut batch, r.ts, r.path, r.line, r.origin.wire(), r.id.unwrap_or_default());
        }
        let bytes = blocks.bytes;
        blocks.finish(&mut batch);
        self.db.apply_batch(batch).map_err(to_io)?;
        self.quota.appended(bytes);
        if let Some(r) = records.last() {
            self.mark.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).appended = Some(r.ts);
        }
        Ok(())
    }

    fn commit(&self) -> io::Result<()> {
        match self.durability {
            Durability::Sync => {
                self.db.flush().map_err(to_io)?;
                self.mark.durable(false);
                Ok(())
            }
            Durability::Async => Ok(()),
        }
    }

    fn acks_before_durable(&self) -> bool {
        self.durability == Durability::Async
    }

    fn admit(&self) -> Result<(), Arc<str>> {
        self.quota.admit(&self.db)
    }

    fn flush(&self) -> io::Result<()> {
        self.db.flush().map_err(to_io)?;
        self.mark.durable(true);
        Ok(())
    }

    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        match self.db.scan_prefix(b"b").next_back() {
            None => Ok(None),
            Some(kv) => {
                let mut last = None;
                for e in Entries::new(&kv.map_err(to_io)?.1) {
                    last = Some(e?.0);
                }
                last.map(Some).ok_or_else(|| corrupt("empty block"))
            }
        }
    }

    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.db.insert(CLOCK_FLOOR_KEY, &ts.to_be_bytes()[..]).map_err(to_io)?;
        self.flush()
    }

    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        match self.db.get(CLOCK_FLOOR_KEY).map_err(to_io)? {
            None => Ok(None),
            Some(v) => Timestamp::from_be_bytes(&v)
                .map(Some)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "corrupt clock floor in event store")),
        }
    }

    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        let _one = self.deleting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut deleted = Deleted::default();
        let Some(until) = before.as_nanos().checked_sub(1).map(Timestamp::from_nanos) else { return Ok(deleted) };
        let mut after = None;
        loop {
            // The next step's events: at most DELETE_STEP of them, from at most 4 times as many
            // entries of the channel's log (with `own`, most may be its children's).
            let (mut victims, mut seen, mut last) = (Vec::<(Timestamp, Box<str>)>::new(), 0usize, None);
            self.scan(channel, after, until, Direction::Forward, &mut |ts, line, _| {
                seen += 1;
                last = Some(ts);
                if let Some(path) = line_path(line).filter(|p| !own || *p == channel) {
                    victims.push((ts, path.into()));
                }
                if victims.len() >= DELETE_STEP || seen >= 4 * DELETE_STEP { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })?;
            let Some(last) = last else { break };
            after = Some(last);
            if victims.is_empty() {
                continue;
            }
            // Each log that holds a victim, and the victims it holds (in timestamp order).
            let mut logs: HashMap<&str, Vec<Timestamp>> = HashMap::new();
            for (ts, path) in &victims {
                for anc in ancestors(path) {
                    logs.entry(anc).or_default().push(*ts);
                }
            }
            // The horizons first: a reader that meets a reference whose line is already gone
            // knows why (and a crash in between leaves the events, below a horizon).
            let mut batch = sled::Batch::default();
            let mut raised = Vec::new();
            {
                let horizons = self.horizons.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (log, lost) in &logs {
                    let old = horizons.get(*log);
                    let newest = old.map_or(lost[lost.len() - 1], |h| h.newest.max(lost[lost.len() - 1]));
                    let h = Horizon { newest, deletions: old.map_or(0, |h| h.deletions) + 1 };
                    let mut value = newest.to_be_bytes().to_vec();
                    value.extend_from_slice(&h.deletions.to_be_bytes());
                    batch.insert(horizon_key(log), value);
                    raised.push((Box::<str>::from(*log), h));
                }
            }
            self.db.apply_batch(batch).map_err(to_io)?;
            self.horizons.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(raised);
            let mut batch = sled::Batch::default();
            for (log, lost) in &logs {
                self.remove_entries(&mut batch, log, lost)?;
            }
            self.db.apply_batch(batch).map_err(to_io)?;
            deleted.events += victims.len() as u64;
            deleted.newest = victims.last().map(|v| v.0).max(deleted.newest);
        }
        if deleted.events > 0 {
            self.db.flush().map_err(to_io)?;
        }
        Ok(deleted)
    }

    fn horizon(&self, channel: &str) -> Option<Horizon> {
        self.horizons.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(channel).copied()
    }

    fn ids(&self, after: Timestamp, visit: &mut VisitId<'_>) -> io::Result<()> {
        // From the last root block starting at or before `after`.
        let key_len = 1 + Timestamp::BYTES;
        let lo = match self.db.range::<Vec<u8>, _>(..=with_ts(b"b", after)).next_back() {
            Some(kv) => {
                let k = kv.map_err(to_io)?.0;
                if k.len() == key_len && k[0] == b'b' { k.to_vec() } else { b"b".to_vec() }
            }
            None => b"b".to_vec(),
        };
        for kv in self.db.range(lo..) {
            let (k, block) = kv.map_err(to_io)?;
            if k.first() != Some(&b'b') {
                break;
            }
            if k.len() != key_len {
                continue;
            }
            for e in Entries::new(&block) {
                if let (ts, Entry::Line(_, origin, id)) = e?
                    && ts > after
                    && !id.is_empty()
                {
                    visit(ts, origin, id);
                }
            }
        }
        Ok(())
    }

    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
        use std::ops::Bound::Included;
        let prefix = block_prefix(channel);
        let key_len = prefix.len() + Timestamp::BYTES;
        let hi = with_ts(&prefix, until);
        // The first block that can hold an event after `after` is the last one starting at or
        // before it (or the channel's first block).
        let lo = match after {
            Some(a) => match self.db.range::<Vec<u8>, _>(..=with_ts(&prefix, a)).next_back() {
                Some(kv) => {
                    let k = kv.map_err(to_io)?.0;
                    if k.len() == key_len && k.starts_with(&prefix) { k.to_vec() } else { prefix.clone() }
                }
                None => prefix.clone(),
            },
            None => prefix.clone(),
        };
        if lo > hi {
            return Ok(());
        }
        let after_ok = |ts: Timestamp| after.is_none_or(|a| ts > a);
        let root = channel == ROOT;
        let mut lines = Lines::default();
        // A deletion in progress may have removed a line before its references: those are
        // below the root's horizon (raised first), and skipped.
        let deleted = self.horizon(ROOT).map(|h| h.newest);
        let mut line_of = |ts: Timestamp, entry: Entry<'_>, out: &mut LineOut<'_>| -> io::Result<ControlFlow<()>> {
            match entry {
                Entry::Line(line, origin, _) => Ok(out(line, origin)),
                Entry::Ref(_) if root => Err(corrupt("root block (a reference)")),
                Entry::Ref(len) => match lines.get(&self.db, ts, len) {
                    Ok((line, origin)) => Ok(out(line, origin)),
                    Err(_) if deleted.is_some_and(|d| ts <= d) => Ok(ControlFlow::Continue(())),
                    Err(e) => Err(e),
                },
            }
        };
        let iter = self.db.range::<Vec<u8>, _>((Included(lo), Included(hi)));
        match dir {
            Direction::Forward => {
                for kv in iter {
                    let (k, block) = kv.map_err(to_io)?;
                    if k.len() != key_len {
                        continue; // a block of another channel: `/a` ‖ 0 ‖ ts sorts before `/a/b` ‖ 0
                    }
                    for e in Entries::new(&block) {
                        let (ts, entry) = e?;
                        if ts > until {
                            return Ok(());
                        }
                        if after_ok(ts) && line_of(ts, entry, &mut |line, origin| visit(ts, line, origin))?.is_break() {
                            return Ok(());
                        }
                    }
                }
            }
            Direction::Backward => {
                for kv in iter.rev() {
                    let (k, block) = kv.map_err(to_io)?;
                    if k.len() != key_len {
                        continue;
                    }
                    let entries = Entries::new(&block).collect::<io::Result<Vec<_>>>()?;
                    for &(ts, entry) in entries.iter().rev() {
                        if !after_ok(ts) {
                            return Ok(());
                        }
                        if ts <= until && line_of(ts, entry, &mut |line, origin| visit(ts, line, origin))?.is_break() {
                            return Ok(());
                        }
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
            let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
            assert_eq!(log.clock_floor().unwrap(), None);
            log.append(&[Record { ts: ts(1), path: "/a", line: b"@1700000000.000000001:/a:x", origin: &Origin::ANONYMOUS, id: None }])
                .unwrap();
            log.set_clock_floor(ts(9)).unwrap();
            assert_eq!(log.last_timestamp().unwrap(), Some(ts(1)));
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
        assert_eq!(log.clock_floor().unwrap(), Some(ts(9)));
        assert_eq!(log.last_timestamp().unwrap(), Some(ts(1)));
        let mut seen = Vec::new();
        log.scan(ROOT, None, Timestamp::MAX, Direction::Forward, &mut |t, _, _| {
            seen.push(t);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, vec![ts(1)]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ivy-store-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn collect(
        log: &SledLog,
        channel: &str,
        after: Option<Timestamp>,
        until: Option<Timestamp>,
        dir: Direction,
        limit: usize,
    ) -> Vec<(Timestamp, Vec<u8>)> {
        let mut out = Vec::new();
        log.scan(channel, after, until.unwrap_or(Timestamp::MAX), dir, &mut |ts, line, _| {
            out.push((ts, line.to_vec()));
            if out.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })
        .unwrap();
        out
    }

    /// Scans of every channel, with every kind of bound, in both directions, across block
    /// boundaries and batches, against a plain list of the events.
    #[test]
    fn scans_match_a_model_across_blocks_and_batches() {
        let dir = temp_dir("model");
        let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let paths = ["/a", "/a/b", "/a/b/c", "/ab", "/x/y", "/a/bc"];
        let mut events: Vec<(Timestamp, String, Vec<u8>)> = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut nanos = 0;
        for _batch in 0..40 {
            let size = 1 + next(300) as usize;
            let mut lines = Vec::new();
            for _ in 0..size {
                nanos += 1 + next(3) as u32;
                let ts = Timestamp::new(1_700_000_000, nanos).unwrap();
                let path = paths[next(paths.len() as u64) as usize];
                // Mostly small events, some larger than a block.
                let len = if next(50) == 0 { BLOCK_BYTES + next(1000) as usize } else { next(300) as usize };
                let mut line = Vec::new();
                ivy_client_core::wire::encode_event(ts, path, &vec![b'x'; len], &mut line);
                lines.push((ts, path.to_string(), line));
            }
            let records: Vec<Record<'_>> =
                lines.iter().map(|(ts, p, l)| Record { ts: *ts, path: p, line: l, origin: &Origin::ANONYMOUS, id: None }).collect();
            log.append(&records).unwrap();
            events.extend(lines);
        }
        assert!(events.len() > 1000);
        assert_eq!(log.last_timestamp().unwrap(), events.last().map(|e| e.0));
        let all_ts: Vec<Timestamp> = events.iter().map(|e| e.0).collect();
        let probe = |i: u64| -> Option<Timestamp> {
            match i % 4 {
                0 => None,
                1 => Some(all_ts[(i as usize * 7919) % all_ts.len()]),
                2 => Some(Timestamp::from_nanos(all_ts[(i as usize * 104_729) % all_ts.len()].as_nanos() + 1)),
                _ => Some(Timestamp::new(1_600_000_000, 0).unwrap()),
            }
        };
        for channel in [ROOT, "/a", "/a/b", "/a/b/c", "/ab", "/x", "/x/y", "/a/bc", "/nothing"] {
            for i in 0..24u64 {
                let (after, until) = (probe(i), probe(i / 4 + 1));
                let limit = [usize::MAX, 1, 17, 1000][(i % 4) as usize];
                let model: Vec<(Timestamp, Vec<u8>)> = events
                    .iter()
                    .filter(|(ts, p, _)| {
                        (channel == ROOT || p == channel || p.starts_with(&format!("{channel}/")))
                            && after.is_none_or(|a| *ts > a)
                            && until.is_none_or(|u| *ts <= u)
                    })
                    .map(|(ts, _, l)| (*ts, l.clone()))
                    .collect();
                let forward = collect(&log, channel, after, until, Direction::Forward, limit);
                assert_eq!(forward, model.iter().take(limit).cloned().collect::<Vec<_>>(), "{channel} {after:?} {until:?} {limit}");
                let backward = collect(&log, channel, after, until, Direction::Backward, limit);
                assert_eq!(
                    backward,
                    model.iter().rev().take(limit).cloned().collect::<Vec<_>>(),
                    "{channel} {after:?} {until:?} {limit} back"
                );
            }
        }
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The in-memory store reads exactly what sled reads: both engines' logs agree, page by page.
    #[test]
    fn the_memory_store_reads_like_sled() {
        use super::super::memory::MemStorage;
        let dir = temp_dir("mem");
        let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let mem = MemStorage::default();
        let paths = ["/a", "/a/b", "/a/b/c", "/ab", "/x/y"];
        let mut nanos = 0;
        let mut all = Vec::new();
        for batch in 0..30u32 {
            let mut lines = Vec::new();
            for i in 0..(1 + batch * 7 % 40) {
                nanos += 1 + i % 3;
                let ts = Timestamp::new(1_700_000_000, nanos).unwrap();
                let path = paths[((batch + i) % 5) as usize];
                let mut line = Vec::new();
                ivy_client_core::wire::encode_event(ts, path, &vec![b'y'; ((i * 37) % 500) as usize], &mut line);
                lines.push((ts, path, line));
            }
            let records: Vec<Record<'_>> =
                lines.iter().map(|(ts, p, l)| Record { ts: *ts, path: p, line: l, origin: &Origin::ANONYMOUS, id: None }).collect();
            log.append(&records).unwrap();
            mem.append(&records).unwrap();
            all.extend(lines.iter().map(|l| l.0));
        }
        assert_eq!(log.last_timestamp().unwrap(), mem.last_timestamp().unwrap());
        let read = |s: &dyn Storage, ch: &str, after, until, dir, limit| {
            let mut out = Vec::new();
            s.scan(ch, after, until, dir, &mut |ts, line, _| {
                out.push((ts, line.to_vec()));
                if out.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
            .unwrap();
            out
        };
        for ch in [ROOT, "/a", "/a/b", "/a/b/c", "/ab", "/x", "/nothing"] {
            for (k, &t) in all.iter().enumerate().step_by(23) {
                let (after, until) = if k % 2 == 0 { (Some(t), Timestamp::MAX) } else { (None, t) };
                for dir in [Direction::Forward, Direction::Backward] {
                    for limit in [1, 10, usize::MAX] {
                        assert_eq!(
                            read(&log, ch, after, until, dir, limit),
                            read(&mem, ch, after, until, dir, limit),
                            "{ch} {after:?} {until} {dir:?} {limit}"
                        );
                    }
                }
            }
        }
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The bytes of every key and value in the store (what sled is given to keep).
    fn stored_bytes(log: &SledLog) -> usize {
        log.db.iter().map(|kv| kv.map(|(k, v)| k.len() + v.len()).unwrap()).sum()
    }

    /// A 60 KB event at depth 16 is kept once, with a reference per level (layout 2 kept 17
    /// copies), and a short event on a shallow path is copied into its levels' logs.
    #[test]
    fn a_large_deep_event_is_stored_once() {
        let dir = temp_dir("once");
        let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let empty = stored_bytes(&log);
        let path: String = (1..=16).map(|i| format!("/l{i}")).collect();
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        let mut line = Vec::new();
        ivy_client_core::wire::encode_event(ts(1), &path, &vec![b'x'; 60 * 1024], &mut line);
        log.append(&[Record { ts: ts(1), path: &path, line: &line, origin: &Origin::ANONYMOUS, id: None }]).unwrap();
        let grown = stored_bytes(&log) - empty;
        // The line, 17 entry headers, 17 keys (the longest, `/l1/.../l16`, 70 bytes).
        assert!(grown < line.len() + 17 * (ENTRY_HEADER + 80), "{grown} bytes for a {}-byte line", line.len());
        assert_eq!(stored(16, line.len()), (17, line.len() + 17 * ENTRY_HEADER));
        // Every level reads it back, byte for byte.
        for channel in ancestors(&path) {
            assert_eq!(collect(&log, channel, None, None, Direction::Forward, usize::MAX), vec![(ts(1), line.clone())], "{channel}");
        }
        // A short line on a shallow path is copied (no lookup when reading `/a`).
        let mut short = Vec::new();
        ivy_client_core::wire::encode_event(ts(2), "/a", b"hi", &mut short);
        assert!(inline(1, short.len()));
        log.append(&[Record { ts: ts(2), path: "/a", line: &short, origin: &Origin::ANONYMOUS, id: None }]).unwrap();
        let block = log.db.scan_prefix(block_prefix("/a")).next().unwrap().unwrap().1;
        assert_eq!(Entries::new(&block).map(|e| e.unwrap().1).collect::<Vec<_>>(), vec![Entry::Line(&short, b"-", b"")]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn ids_of(log: &SledLog, after: Timestamp) -> Vec<(Timestamp, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        log.ids(after, &mut |ts, origin, id| out.push((ts, origin.to_vec(), id.to_vec()))).unwrap();
        out
    }

    /// Layout 5: a send id is stored with its event's line in the root's log only; every log
    /// reads the events as before (copies and references, senders intact), the ids come back
    /// from [`Storage::ids`] after a reopen, and a layout 4 store opens as layout 5.
    #[test]
    fn send_ids_are_stored_with_their_events_and_read_back_after_a_reopen() {
        let dir = temp_dir("v5");
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        let line = |n: u32, path: &str, len: usize| {
            let mut l = Vec::new();
            ivy_client_core::wire::encode_event(ts(n), path, &vec![b'x'; len], &mut l);
            l
        };
        let ada = Origin::user("ada");
        // A short line on a shallow path (copied), a long one on a deep path (referenced),
        // one without an id, and one with the longest id; across several blocks.
        let events: Vec<(u32, &str, usize, Option<&[u8]>)> = vec![
            (1, "/a", 5, Some(b"s.1")),
            (2, "/a/b/c/d", 3000, Some(b"s.2")),
            (3, "/a/b", 7, None),
            (4, "/a/b/c/d", 9000, Some(&[b'z'; 64])),
        ];
        let lines: Vec<Vec<u8>> = events.iter().map(|(n, p, len, _)| line(*n, p, *len)).collect();
        {
            let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
            let records: Vec<Record<'_>> = events
                .iter()
                .zip(&lines)
                .map(|((n, p, _, id), l)| Record { ts: ts(*n), path: p, line: l, origin: &ada, id: *id })
                .collect();
            log.append(&records[..2]).unwrap();
            log.append(&records[2..]).unwrap();
            log.flush().unwrap();
            // Layout 4 as an earlier version left it (no ids yet): opened as 5 below.
            log.db.insert(b"v", LAYOUT_V4).unwrap();
            log.db.flush().unwrap();
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
        assert_eq!(log.db.get(b"v").unwrap().as_deref(), Some(LAYOUT_VERSION));
        for channel in ["/", "/a", "/a/b", "/a/b/c", "/a/b/c/d"] {
            let want: Vec<_> = events
                .iter()
                .zip(&lines)
                .filter(|((_, p, ..), _)| ancestors(p).any(|a| a == channel))
                .map(|((n, ..), l)| (ts(*n), l.clone(), b"=ada".to_vec()))
                .collect();
            assert_eq!(collect_with_origins(&log, channel, Direction::Forward), want, "{channel}");
            let mut back = want.clone();
            back.reverse();
            assert_eq!(collect_with_origins(&log, channel, Direction::Backward), back, "{channel}");
        }
        let all = vec![
            (ts(1), b"=ada".to_vec(), b"s.1".to_vec()),
            (ts(2), b"=ada".to_vec(), b"s.2".to_vec()),
            (ts(4), b"=ada".to_vec(), vec![b'z'; 64]),
        ];
        assert_eq!(ids_of(&log, Timestamp::ZERO), all);
        assert_eq!(ids_of(&log, ts(1)), all[1..], "only after");
        assert_eq!(ids_of(&log, ts(4)), vec![]);
        // Only the root's entries carry the id.
        let block = log.db.scan_prefix(block_prefix("/a")).next().unwrap().unwrap().1;
        assert!(Entries::new(&block).all(|e| matches!(e.unwrap().1, Entry::Line(_, _, b"") | Entry::Ref(_))));
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes events as layout 2 did (version 2, a copy of every line in every level's log),
    /// byte for byte: the fixture of a store made by an earlier version.
    /// A store as layout 3 wrote it: lines without senders, references for the lines too long
    /// to copy.
    fn write_layout_3(dir: &Path, events: &[(Timestamp, String, Vec<u8>)]) {
        let db = sled::Config::new().path(dir).open().unwrap();
        db.insert(b"v", LAYOUT_V3).unwrap();
        let mut batch = sled::Batch::default();
        for (ts, path, line) in events {
            // One block per event and log: blocks of any size are read the same.
            for anc in ancestors(path) {
                let mut block = ts.to_be_bytes().to_vec();
                if anc == ROOT || inline(ivy_client_core::path::depth(path), line.len()) {
                    block.extend_from_slice(&(line.len() as u32).to_be_bytes());
                    block.extend_from_slice(line);
                } else {
                    block.extend_from_slice(&(REFERENCE | line.len() as u32).to_be_bytes());
                }
                batch.insert(with_ts(&block_prefix(anc), *ts), block);
            }
        }
        db.apply_batch(batch).unwrap();
        db.flush().unwrap();
    }

    fn collect_with_origins(log: &SledLog, channel: &str, dir: Direction) -> Vec<(Timestamp, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        log.scan(channel, None, Timestamp::MAX, dir, &mut |ts, line, origin| {
            out.push((ts, line.to_vec(), origin.to_vec()));
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    /// A layout 3 store opens as layout 5: its events read as before, with an unknown sender
    /// (`?`, copies and references alike); new events keep their senders, across a reopen.
    #[test]
    fn a_layout_3_store_reads_with_unknown_senders_and_takes_new_events_with_theirs() {
        let dir = temp_dir("v3");
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        let paths = ["/a", "/a/b", "/a/b/c/d/e", "/c"];
        let origins: [&[u8]; 4] = [b"=ada", b"-", b"*", b"=a%3Ab%25%0A"];
        let event = |n: u32| {
            let path = paths[n as usize % paths.len()];
            let mut line = Vec::new();
            ivy_client_core::wire::encode_event(ts(n), path, &vec![b'a' + (n % 26) as u8; (n as usize * 37) % 700], &mut line);
            (ts(n), path.to_string(), line)
        };
        let old: Vec<_> = (1..=300).map(event).collect();
        write_layout_3(&dir, &old);
        let new: Vec<_> = (301..=600).map(event).collect();
        let origin_of = |t: Timestamp| -> Vec<u8> {
            let n = t.subsec_nanos();
            if n <= 300 { b"?".to_vec() } else { origins[n as usize % 4].to_vec() }
        };
        let channels = [ROOT, "/a", "/a/b", "/a/b/c", "/a/b/c/d/e", "/c", "/x"];
        let want = |events: &[(Timestamp, String, Vec<u8>)], channel: &str| -> Vec<(Timestamp, Vec<u8>, Vec<u8>)> {
            events
                .iter()
                .filter(|(_, p, _)| channel == ROOT || p == channel || p.starts_with(&format!("{channel}/")))
                .map(|(t, _, l)| (*t, l.clone(), origin_of(*t)))
                .collect()
        };
        {
            let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
            assert_eq!(log.db.get(b"v").unwrap().as_deref(), Some(LAYOUT_VERSION));
            for channel in channels {
                assert_eq!(collect_with_origins(&log, channel, Direction::Forward), want(&old, channel), "{channel}");
            }
            let senders: Vec<Origin> =
                new.iter().map(|(ts, ..)| Origin::from_wire(origins[ts.subsec_nanos() as usize % 4]).unwrap()).collect();
            let records: Vec<Record<'_>> =
                new.iter().zip(&senders).map(|((ts, p, l), origin)| Record { ts: *ts, path: p, line: l, origin, id: None }).collect();
            log.append(&records).unwrap();
            log.flush().unwrap();
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
        let all: Vec<_> = old.iter().chain(&new).cloned().collect();
        for channel in channels {
            let model = want(&all, channel);
            assert_eq!(collect_with_origins(&log, channel, Direction::Forward), model, "{channel}");
            assert_eq!(
                collect_with_origins(&log, channel, Direction::Backward),
                model.into_iter().rev().collect::<Vec<_>>(),
                "{channel} back"
            );
        }
        // A page with senders: the extended lines.
        let page = read_page(&log, &ReadRequest::new("/c", Some(ts(296)), Timestamp::MAX, 3).with_senders(true)).unwrap();
        let text = String::from_utf8(page.lines).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert!(lines[0].starts_with("@1700000000.000000299~?:/c:"), "{}", lines[0]);
        assert!(lines[1].starts_with("@1700000000.000000303~=a%3Ab%25%0A:/c:"), "{}", lines[1]);
        assert!(lines[2].starts_with("@1700000000.000000307~=a%3Ab%25%0A:/c:"), "{}", lines[2]);
        let plain = read_page(&log, &ReadRequest::new("/c", Some(ts(296)), Timestamp::MAX, 3)).unwrap();
        assert!(String::from_utf8(plain.lines).unwrap().starts_with("@1700000000.000000299:/c:"));
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn write_layout_2(dir: &Path, events: &[(Timestamp, String, Vec<u8>)]) {
        let db = sled::Config::new().path(dir).open().unwrap();
        db.insert(b"v", LAYOUT_V2).unwrap();
        for chunk in events.chunks(500) {
            let mut blocks: Vec<(Vec<u8>, Timestamp, Vec<u8>)> = Vec::new();
            let mut batch = sled::Batch::default();
            for (ts, path, line) in chunk {
                for anc in ancestors(path) {
                    let prefix = block_prefix(anc);
                    let at = match blocks.iter().position(|b| b.0 == prefix) {
                        Some(at) => at,
                        None => {
                            blocks.push((prefix, *ts, Vec::new()));
                            blocks.len() - 1
                        }
                    };
                    let (p, first, buf) = &mut blocks[at];
                    if !buf.is_empty() && buf.len() + ENTRY_HEADER + line.len() > BLOCK_BYTES {
                        batch.insert(with_ts(p, *first), std::mem::take(buf));
                    }
                    if buf.is_empty() {
                        *first = *ts;
                    }
                    buf.extend_from_slice(&ts.to_be_bytes());
                    buf.extend_from_slice(&(line.len() as u32).to_be_bytes());
                    buf.extend_from_slice(line);
                }
            }
            for (p, first, buf) in blocks {
                if !buf.is_empty() {
                    batch.insert(with_ts(&p, first), buf);
                }
            }
            db.apply_batch(batch).unwrap();
        }
        db.flush().unwrap();
    }

    /// A store written by the previous version (layout 2) opens, reads exactly as before, takes
    /// new events (with references) after its old ones, and is marked layout 3.
    #[test]
    fn a_layout_2_store_reads_the_same_and_takes_new_events() {
        let dir = temp_dir("v2");
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        let paths = ["/a", "/a/b", "/a/b/c/d/e", "/c"];
        let event = |n: u32| {
            let path = paths[n as usize % paths.len()];
            let mut line = Vec::new();
            ivy_client_core::wire::encode_event(ts(n), path, &vec![b'0' + (n % 10) as u8; (n as usize * 97) % 6000], &mut line);
            (ts(n), path.to_string(), line)
        };
        let old: Vec<_> = (1..=600).map(event).collect();
        write_layout_2(&dir, &old);
        let new: Vec<_> = (601..=1200).map(event).collect();
        let want = |events: &[(Timestamp, String, Vec<u8>)], channel: &str| -> Vec<(Timestamp, Vec<u8>)> {
            events
                .iter()
                .filter(|(_, p, _)| channel == ROOT || p == channel || p.starts_with(&format!("{channel}/")))
                .map(|(t, _, l)| (*t, l.clone()))
                .collect()
        };
        let channels = [ROOT, "/a", "/a/b", "/a/b/c", "/a/b/c/d/e", "/c", "/x"];
        {
            let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
            assert_eq!(log.db.get(b"v").unwrap().as_deref(), Some(LAYOUT_VERSION));
            for channel in channels {
                assert_eq!(collect(&log, channel, None, None, Direction::Forward, usize::MAX), want(&old, channel), "{channel}");
            }
            let records: Vec<Record<'_>> =
                new.iter().map(|(ts, p, l)| Record { ts: *ts, path: p, line: l, origin: &Origin::ANONYMOUS, id: None }).collect();
            log.append(&records).unwrap();
            log.flush().unwrap();
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
        let all: Vec<_> = old.iter().chain(&new).cloned().collect();
        assert_eq!(log.last_timestamp().unwrap(), Some(ts(1200)));
        for channel in channels {
            let model = want(&all, channel);
            assert_eq!(collect(&log, channel, None, None, Direction::Forward, usize::MAX), model, "{channel}");
            let back: Vec<_> = model.iter().rev().take(300).cloned().collect();
            assert_eq!(
                collect(&log, channel, Some(ts(400)), None, Direction::Backward, 300),
                back.into_iter().filter(|e| e.0 > ts(400)).collect::<Vec<_>>(),
                "{channel} back"
            );
        }
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A reference whose line is missing (a damaged store) is an error for the reader.
    #[test]
    fn a_dangling_reference_is_an_error() {
        let dir = temp_dir("dangling");
        let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let ts = Timestamp::new(1_700_000_000, 1).unwrap();
        let mut block = ts.to_be_bytes().to_vec();
        block.extend_from_slice(&(REFERENCE | 500).to_be_bytes());
        log.db.insert(with_ts(&block_prefix("/a"), ts), block).unwrap();
        let r = log.scan("/a", None, Timestamp::MAX, Direction::Forward, &mut |_, _, _| ControlFlow::Continue(()));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Deletions (a subtree before a timestamp, a channel's own events, everything before a
    /// cutoff, a whole subtree) remove the same events from both stores and from every log
    /// that held them, raise the same horizons (kept across a reopen), and leave the rest
    /// readable, with new events appended after.
    #[test]
    fn deletions_match_a_model_in_both_stores() {
        use super::super::memory::MemStorage;
        let dir = temp_dir("delete");
        let mut log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let mem = MemStorage::default();
        let paths = ["/a", "/a/b", "/a/b/c", "/ab", "/x/y", "/a/bc", "/a/b/c/d/e/f"];
        let channels = [ROOT, "/a", "/a/b", "/a/b/c", "/a/b/c/d/e/f", "/ab", "/x", "/x/y", "/a/bc", "/nothing"];
        let under = |p: &str, ch: &str| ch == ROOT || p == ch || p.starts_with(&format!("{ch}/"));
        let mut model: Vec<(Timestamp, String, Vec<u8>)> = Vec::new();
        let mut nanos = 0u32;
        let mut fill = |log: &SledLog, mem: &MemStorage, model: &mut Vec<(Timestamp, String, Vec<u8>)>, batches: u32| {
            for batch in 0..batches {
                let mut lines = Vec::new();
                for i in 0..(1 + batch * 13 % 60) {
                    nanos += 1 + i % 2;
                    let ts = Timestamp::new(1_700_000_000, nanos).unwrap();
                    let path = paths[((batch * 7 + i) % paths.len() as u32) as usize];
                    // Short lines (copied on shallow paths), longer ones (referenced), some
                    // larger than a block.
                    let len = [3, 40, 300, 5000][((i + batch) % 4) as usize];
                    let mut line = Vec::new();
                    ivy_client_core::wire::encode_event(ts, path, &vec![b'q'; len], &mut line);
                    lines.push((ts, path.to_string(), line));
                }
                let records: Vec<Record<'_>> =
                    lines.iter().map(|(ts, p, l)| Record { ts: *ts, path: p, line: l, origin: &Origin::ANONYMOUS, id: None }).collect();
                log.append(&records).unwrap();
                mem.append(&records).unwrap();
                model.extend(lines);
            }
        };
        fill(&log, &mem, &mut model, 40);
        let mut horizons: HashMap<&str, Timestamp> = HashMap::new();
        let check =
            |log: &SledLog, mem: &MemStorage, model: &[(Timestamp, String, Vec<u8>)], horizons: &HashMap<&str, Timestamp>, what: &str| {
                for ch in channels {
                    let want: Vec<(Timestamp, Vec<u8>)> =
                        model.iter().filter(|(_, p, _)| under(p, ch)).map(|(t, _, l)| (*t, l.clone())).collect();
                    let after = want.get(want.len() / 3).map(|e| e.0);
                    for (store, name) in [(log as &dyn Storage, "sled"), (mem as &dyn Storage, "memory")] {
                        let read = |after, dir, limit| {
                            let mut out = Vec::new();
                            store
                                .scan(ch, after, Timestamp::MAX, dir, &mut |ts, line, _| {
                                    out.push((ts, line.to_vec()));
                                    if out.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                                })
                                .unwrap();
                            out
                        };
                        assert_eq!(read(None, Direction::Forward, usize::MAX), want, "{what}: {name} {ch}");
                        let rest: Vec<_> = want.iter().filter(|e| after.is_none_or(|a| e.0 > a)).cloned().collect();
                        assert_eq!(
                            read(after, Direction::Forward, 25),
                            rest.iter().take(25).cloned().collect::<Vec<_>>(),
                            "{what}: {name} {ch} after"
                        );
                        assert_eq!(
                            read(after, Direction::Backward, 25),
                            rest.iter().rev().take(25).cloned().collect::<Vec<_>>(),
                            "{what}: {name} {ch} back"
                        );
                        assert_eq!(store.horizon(ch).map(|h| h.newest), horizons.get(ch).copied(), "{what}: {name} {ch} horizon");
                    }
                }
            };
        check(&log, &mem, &model, &horizons, "before");
        let at = |model: &[(Timestamp, String, Vec<u8>)], i: usize| model[i % model.len()].0;
        let ops: Vec<(&str, Timestamp, bool)> = vec![
            ("/a/b", at(&model, 500), false),
            ("/a", at(&model, 900), true),
            ("/a/b/c/d/e/f", Timestamp::MAX, false),
            (ROOT, at(&model, 200), false),
            ("/x", Timestamp::MAX, false),
            ("/nothing", Timestamp::MAX, false),
        ];
        for (i, (ch, before, own)) in ops.into_iter().enumerate() {
            let victims: Vec<(Timestamp, String)> = model
                .iter()
                .filter(|(t, p, _)| *t < before && if own { p == ch } else { under(p, ch) })
                .map(|(t, p, _)| (*t, p.clone()))
                .collect();
            for anc_ch in channels {
                if let Some(newest) = victims.iter().filter(|(_, p)| under(p, anc_ch)).map(|v| v.0).max() {
                    let h = horizons.entry(anc_ch).or_insert(newest);
                    *h = (*h).max(newest);
                }
            }
            let want = Deleted { events: victims.len() as u64, newest: victims.last().map(|v| v.0) };
            assert!(want.events > 0 || ch == "/nothing", "op {i} deletes something");
            assert_eq!(log.delete(ch, before, own).unwrap(), want, "op {i} sled");
            assert_eq!(mem.delete(ch, before, own).unwrap(), want, "op {i} memory");
            model.retain(|(t, p, _)| !(*t < before && if own { p == ch } else { under(p, ch) }));
            check(&log, &mem, &model, &horizons, &format!("op {i} ({ch} before {before}, own {own})"));
            assert_eq!(log.delete(ch, before, own).unwrap(), Deleted::default(), "op {i} again");
        }
        fill(&log, &mem, &mut model, 10);
        check(&log, &mem, &model, &horizons, "appended after");
        drop(log);
        log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        check(&log, &mem, &model, &horizons, "reopened");
        assert_eq!(log.last_timestamp().unwrap(), mem.last_timestamp().unwrap());
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store whose newest events were deleted (everything, here) is not mistaken for one that
    /// lost them: it reopens, without --repair, and its clock does not go back.
    #[test]
    fn a_store_whose_newest_events_were_deleted_is_not_damaged() {
        let dir = temp_dir("deleted-newest");
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        {
            let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
            let lines: Vec<Vec<u8>> = (1..=5)
                .map(|n| {
                    let mut line = Vec::new();
                    ivy_client_core::wire::encode_event(ts(n), "/a/b", b"x", &mut line);
                    line
                })
                .collect();
            let records: Vec<Record<'_>> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| Record { ts: ts(i as u32 + 1), path: "/a/b", line: l, origin: &Origin::ANONYMOUS, id: None })
                .collect();
            log.append(&records).unwrap();
            log.flush().unwrap();
            assert_eq!(Mark::read(&dir.join(MARK_FILE)).unwrap(), Some(ts(5)), "the mark is written");
            assert_eq!(log.delete(ROOT, Timestamp::MAX, false).unwrap().events, 5);
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).expect("a store whose events were deleted opens");
        assert_eq!(log.last_timestamp().unwrap(), None);
        assert_eq!(log.horizon(ROOT).map(|h| h.newest), Some(ts(5)));
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store written in layout 1 is converted when opened, and reads the same.
    #[test]
    fn a_layout_1_store_is_converted() {
        let dir = temp_dir("v1");
        let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
        let events: Vec<(Timestamp, &str, String)> = (1..=5000u32)
            .map(|n| (ts(n), ["/a", "/a/b", "/c"][n as usize % 3], format!("@{}:{}:m{n}", ts(n), ["/a", "/a/b", "/c"][n as usize % 3])))
            .collect();
        {
            let db = sled::Config::new().path(&dir).open().unwrap();
            db.insert(b"v", LAYOUT_V1).unwrap();
            db.insert(CLOCK_FLOOR_KEY, &ts(9000).to_be_bytes()[..]).unwrap();
            for (i, (t, path, line)) in events.iter().enumerate() {
                let mut k = vec![b'e'];
                k.extend_from_slice(&t.to_be_bytes());
                db.insert(k, line.as_bytes()).unwrap();
                for anc in ancestors(path).filter(|a| *a != ROOT) {
                    let mut k = vec![b'i'];
                    k.extend_from_slice(anc.as_bytes());
                    k.push(0);
                    k.extend_from_slice(&t.to_be_bytes());
                    // Both forms written by layout 1 versions: empty, or the line itself.
                    db.insert(k, if i % 2 == 0 { &b""[..] } else { line.as_bytes() }).unwrap();
                }
            }
            db.flush().unwrap();
        }
        let check = |log: &SledLog| {
            assert_eq!(log.last_timestamp().unwrap(), Some(ts(5000)));
            assert_eq!(log.clock_floor().unwrap(), Some(ts(9000)));
            for channel in [ROOT, "/a", "/a/b", "/c"] {
                let want: Vec<(Timestamp, Vec<u8>)> = events
                    .iter()
                    .filter(|(_, p, _)| channel == ROOT || *p == channel || p.starts_with(&format!("{channel}/")))
                    .map(|(t, _, l)| (*t, l.clone().into_bytes()))
                    .collect();
                assert_eq!(collect(log, channel, None, None, Direction::Forward, usize::MAX), want, "{channel}");
            }
        };
        {
            let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
            assert_eq!(log.db.get(b"v").unwrap().as_deref(), Some(LAYOUT_VERSION));
            assert_eq!(log.db.scan_prefix(b"e").count(), 0);
            assert_eq!(log.db.scan_prefix(b"i").count(), 0);
            check(&log);
        }
        let log = SledLog::open(&dir, Durability::Sync, DEFAULT_FLUSH_INTERVAL).unwrap();
        check(&log);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A damaged block is an error for the reader, never a panic or a wrong line.
    #[test]
    fn a_damaged_block_is_an_error() {
        let dir = temp_dir("damaged");
        let log = SledLog::open(&dir, Durability::Async, DEFAULT_FLUSH_INTERVAL).unwrap();
        let ts = Timestamp::new(1_700_000_000, 1).unwrap();
        let mut block = ts.to_be_bytes().to_vec();
        block.extend_from_slice(&1000u32.to_be_bytes());
        block.extend_from_slice(b"@short");
        log.db.insert(with_ts(b"b", ts), block).unwrap();
        let r = log.scan(ROOT, None, Timestamp::MAX, Direction::Forward, &mut |_, _, _| ControlFlow::Continue(()));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(log.last_timestamp().unwrap_err().kind(), io::ErrorKind::InvalidData);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
