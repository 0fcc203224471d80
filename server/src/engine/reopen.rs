//! A store that reopens itself after a write failure, so that the running server recovers
//! once the disk has room again (issue 12, finding 4).
//!
//! sled 0.34 records the first I/O error of a write (a full disk, a failing device) as its
//! "global error" and returns it from every later write and flush of that instance, forever:
//! only opening the store again clears it (`PageCache::start`). A server that kept the same
//! instance therefore failed every send with `storage` until it was restarted, even after space
//! was freed. [`Reopening`] wraps the store and, after a failed write:
//!
//! - refuses every batch without touching the store: with `store-full` when the failure was a
//!   full disk (the reason says so and what it waits for), with `storage` otherwise;
//! - reopens the store in the running process (the old instance is dropped first: it holds the
//!   store's file lock) once the disk has room again (at least the free-space reserve and
//!   [`REOPEN_MIN_FREE`], measured at most once a second), or, after another failure, after a
//!   back-off (1 s, doubling up to a minute);
//! - keeps serving reads from the failed instance until then (sled's reads do not go through
//!   the global error).
//!
//! Reopening rather than exiting for a supervisor to restart the process: connections,
//! subscriptions and their positions survive (no event was delivered from a failed batch, so
//! nothing is owed to them), and the recovery needs no supervisor. A reopen checks the store
//! against its acknowledged mark exactly as a startup does (`--repair` is never applied
//! to a reopen): with sync durability every acknowledged event was fsynced before its ack, so
//! the reopened store holds them all. With async durability the events acknowledged since the
//! last flush are lost, as in a crash.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ivy_client_core::Timestamp;

use super::local::{Deleted, Record, Storage, Visit, VisitId};
use super::{Direction, Horizon, PublishError};

/// Free space a full disk must have again before the store is reopened, whatever the
/// free-space reserve (sled writes whole buffers of up to a few hundred KiB).
pub(crate) const REOPEN_MIN_FREE: u64 = 1 << 20;
/// How often a full disk's free space is measured while the store waits for it.
const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// The first and the longest wait before reopening after a failure other than a full disk.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// The file kept beside the store's so that the store can be opened on a full disk.
pub const BALLAST_FILE: &str = "ivy-ballast";
/// Its size: sled writes up to one segment (512 KiB) when it opens a store (it zeroes the rest
/// of the last segment), which a full disk refuses ("No space left on device"), so the
/// store would not open again until space was freed by hand.
pub(crate) const BALLAST_BYTES: u64 = 1 << 20;

/// Opens the store in `dir` with `open`. When that fails because the disk is full, the
/// ballast ([`BALLAST_FILE`]) is removed and the store opened again: `(store, true)`, and the
/// store should take no sends until the disk has room. After a normal open the ballast is
/// (re)made if missing.
pub(crate) fn open_with_ballast<T>(dir: &Path, open: impl Fn() -> io::Result<T>) -> io::Result<(T, bool)> {
    let ballast = dir.join(BALLAST_FILE);
    match open() {
        Ok(store) => {
            keep_ballast(&ballast);
            Ok((store, false))
        }
        Err(e) if is_full(&e) && ballast.exists() => {
            tracing::warn!(
                error = %e,
                file = %ballast.display(),
                "the disk is full: removing the space kept for this to open the event store; sends are refused until the disk has room"
            );
            std::fs::remove_file(&ballast)?;
            Ok((open()?, true))
        }
        Err(e) => Err(e),
    }
}

/// Makes the ballast file unless it is there; a disk without room for it goes without.
fn keep_ballast(path: &Path) {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= BALLAST_BYTES) {
        return;
    }
    // Bytes that no file system compresses or deduplicates away: the space must really be
    // taken.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..BALLAST_BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let written = std::fs::File::create(path).and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        tracing::warn!(error = %e, file = %path.display(), "could not keep space for opening the store on a full disk");
        let _ = std::fs::remove_file(path);
    }
}

/// Opens the store again: the store, and whether it took the ballast to open (see
/// [`open_with_ballast`]).
pub(crate) type Reopen = Box<dyn Fn() -> io::Result<(Box<dyn Storage>, bool)> + Send + Sync>;
/// The free space of the store's file system, in bytes.
pub(crate) type FreeSpace = Box<dyn Fn() -> io::Result<u64> + Send + Sync>;

/// A [`Storage`] that reopens itself after a write failure (see the [module docs](self)).
pub(crate) struct Reopening {
    /// The open store; `None` only while a reopen failed.
    current: RwLock<Option<Box<dyn Storage>>>,
    reopen: Reopen,
    free_space: FreeSpace,
    /// The free space a full disk must have again: the reserve, at least [`REOPEN_MIN_FREE`].
    wanted_free: u64,
    failed: Mutex<Option<Failed>>,
    /// How many times the store was reopened ([`Storage::generation`]).
    reopens: std::sync::atomic::AtomicU64,
}

/// A write failed: the store is waiting to be reopened.
#[derive(Debug)]
struct Failed {
    /// The disk is full (otherwise another I/O error).
    full: bool,
    error: Arc<io::Error>,
    /// When to check (full) or try (otherwise) again.
    next: Instant,
    backoff: Duration,
    /// Free space when last measured.
    free: Option<u64>,
}

/// Whether `e` says the disk (or a quota) is full.
pub(crate) fn is_full(e: &io::Error) -> bool {
    // sled copies its global error into a new `io::Error` of the same kind, without the OS code.
    // The quota's kind (`QuotaExceeded`, once `FilesystemQuotaExceeded`) is newer than this
    // crate's minimum Rust: recognized by name.
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(28 | 122))
        || format!("{:?}", e.kind()).ends_with("QuotaExceeded")
}

impl std::fmt::Debug for Reopening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopening").field("wanted_free", &self.wanted_free).field("failed", &self.failed).finish_non_exhaustive()
    }
}

impl Reopening {
    /// Wraps the open `store`; `reopen` opens it again, `free_space` measures its disk, and
    /// `min_free` is its free-space reserve. `on_full_disk`: the store was opened on a full
    /// disk (with the ballast's space), and takes no sends until the disk has room.
    pub(crate) fn new(store: Box<dyn Storage>, reopen: Reopen, free_space: FreeSpace, min_free: u64, on_full_disk: bool) -> Reopening {
        let r = Reopening {
            current: RwLock::new(Some(store)),
            reopen,
            free_space,
            wanted_free: min_free.max(REOPEN_MIN_FREE) + BALLAST_BYTES,
            failed: Mutex::new(None),
            reopens: std::sync::atomic::AtomicU64::new(0),
        };
        if on_full_disk {
            r.fail(&io::Error::from(io::ErrorKind::StorageFull));
        }
        r
    }

    /// Marks the store as failed by `e` (unless it already is).
    fn fail(&self, e: &io::Error) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_some() {
            return;
        }
        let full = is_full(e);
        tracing::error!(
            error = %e,
            "the event store cannot write; sends are refused until it is reopened ({})",
            if full { "once the disk has room again" } else { "after a pause" }
        );
        *failed = Some(Failed {
            full,
            error: Arc::new(io::Error::new(e.kind(), e.to_string())),
            next: Instant::now() + if full { Duration::ZERO } else { BACKOFF.0 },
            backoff: BACKOFF.0,
            free: None,
        });
    }

    fn with<T>(&self, f: impl FnOnce(&dyn Storage) -> io::Result<T>) -> io::Result<T> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        match current.as_deref() {
            Some(store) => f(store),
            None => Err(io::Error::other("the event store is closed after a failure; reopening it failed so far")),
        }
    }

    /// Runs a write; a failure marks the store as failed.
    fn write<T>(&self, f: impl FnOnce(&dyn Storage) -> io::Result<T>) -> io::Result<T> {
        let result = self.with(f);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// After a failure: reopens the store when it is time to (see the module docs); whether
    /// it is open and working again.
    fn recover(&self, failed: &mut Failed) -> bool {
        let now = Instant::now();
        if now < failed.next {
            return false;
        }
        if failed.full {
            failed.next = now + MEASURE_EVERY;
            failed.free = (self.free_space)().ok();
            if failed.free.is_none_or(|f| f < self.wanted_free) {
                return false;
            }
        }
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // The failed instance goes first: it holds the store's lock.
        drop(current.take());
        match (self.reopen)() {
            Ok((store, false)) => {
                *current = Some(store);
                self.reopens.fetch_add(1, std::sync::atomic::Ordering::Release);
                tracing::info!(free = ?failed.free, "the event store was reopened after a write failure; sends are accepted again");
                true
            }
            Ok((store, true)) => {
                // Full again meanwhile: open, and waiting for room as before.
                *current = Some(store);
                self.reopens.fetch_add(1, std::sync::atomic::Ordering::Release);
                failed.full = true;
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "reopening the event store failed; trying again later");
                failed.full = is_full(&e);
                failed.error = Arc::new(io::Error::new(e.kind(), e.to_string()));
                failed.next = now + failed.backoff;
                failed.backoff = (failed.backoff * 2).min(BACKOFF.1);
                false
            }
        }
    }
}

impl Storage for Reopening {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        self.write(|s| s.append(records))
    }

    fn commit(&self) -> io::Result<()> {
        self.write(|s| s.commit())
    }

    fn acks_before_durable(&self) -> bool {
        self.with(|s| Ok(s.acks_before_durable())).unwrap_or(false)
    }

    fn flush(&self) -> io::Result<()> {
        self.write(|s| s.flush())
    }

    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        self.with(|s| s.last_timestamp())
    }

    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.write(|s| s.set_clock_floor(ts))
    }

    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        self.with(|s| s.clock_floor())
    }

    fn admit(&self) -> Result<(), Arc<str>> {
        match self.with(|s| Ok(s.admit())) {
            Ok(admitted) => admitted,
            Err(e) => Err(e.to_string().into()),
        }
    }

    fn ready(&self) -> Result<(), PublishError> {
        {
            let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(f) = failed.as_mut() {
                if self.recover(f) {
                    *failed = None;
                } else if f.full {
                    let free = f.free.map_or(String::new(), |b| format!(" ({b} bytes free)"));
                    return Err(PublishError::StoreFull(
                        format!(
                            "the disk is full: the store could not write{free}; sends are accepted again once {} bytes are free",
                            self.wanted_free
                        )
                        .into(),
                    ));
                } else {
                    return Err(PublishError::Storage(f.error.clone()));
                }
            }
        }
        self.admit().map_err(PublishError::StoreFull)
    }

    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        // A deletion writes: its failure is a failed write like any other (sled keeps failing
        // after it until reopened).
        self.write(|s| s.delete(channel, before, own))
    }

    fn horizon(&self, channel: &str) -> Option<Horizon> {
        self.with(|s| Ok(s.horizon(channel))).ok().flatten()
    }

    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
        self.with(|s| s.scan(channel, after, until, dir, visit))
    }

    fn ids(&self, after: Timestamp, visit: &mut VisitId<'_>) -> io::Result<()> {
        self.with(|s| s.ids(after, visit))
    }

    fn generation(&self) -> u64 {
        self.reopens.load(std::sync::atomic::Ordering::Acquire)
    }
}
