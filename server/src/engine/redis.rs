//! The Redis engine (`ivy-server --redis redis://HOST:PORT[/DB]`): the log, the order and the
//! clock live in Redis, so that any number of nodes can share them; the node keeps nothing on
//! its own disk.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! use ivy_server::engine::RedisEngine;
//! let ivy = ivy_server::Ivy::builder(ivy_server::Config::default()).engine(RedisEngine::new("redis://127.0.0.1:6379")).open()?;
//! # ivy.shutdown().await; Ok(()) }
//! ```
//!
//! # Keys
//!
//! Every key carries the hash tag `{ivy}` (one Redis Cluster slot, for a later sharding):
//!
//! - `{ivy}:clock`: the stream ID of the last timestamp handed out;
//! - `{ivy}:n`: how many events were ever stored (each event's number, `n`, is the next one);
//! - `{ivy}:log:/`: the root channel's log, a STREAM holding every event in timestamp order,
//!   each entry with the fields `l` (the event line exactly as delivered to a connection without
//!   extensions, `@ts:/path:data`), `o` (its sender's wire form, `docs/PROTOCOL.md` 6.1.1),
//!   `n` (its number) and `w` (the node and group commit that wrote it), and the markers of
//!   repeated send ids (below);
//! - `{ivy}:log:<path>`: the log of each other channel (its whole subtree), a STREAM with the
//!   fields `l` and `o`: an event is appended to its channel's log and every ancestor's, with
//!   the same ID (the fan-in of the sled layout);
//! - `{ivy}:paths`: the SORTED SET (scores 0) of the channels that have a log, for `GET
//!   /channels` ([`admin`]);
//! - `{ivy}:revoked`, `{ivy}:control`: the token revocations and the stream of admin commands
//!   every node applies ([`admin`]);
//! - `{ivy}:horizon:<path>`: a HASH, once the log lost events (retention or a deletion): `ts`,
//!   the ID of the newest event deleted from it, and `d`, how many deletions changed it;
//! - `{ivy}:id:<origin> <id>`: a send id ([`Publish::id`], `docs/PROTOCOL.md` 5.9) in the scope
//!   of its sender's wire form (an id holds no space, so the last space splits the key one way
//!   only): the stream ID of the event first stored with it, set with `PX` = the idempotency
//!   window ([`Context::idempotency`]), so that Redis forgets it after the window (the key
//!   limit, `--idempotency-max-keys`, does not apply: the TTL bounds the keys, window × rate).
//!   The keys are written by the scripts that store their events, so they are exactly as
//!   durable as the events (in the append-only file, with them).
//!
//! # Send ids: repeats and their markers
//!
//! The publish script looks up each event's id key (`GET`) before storing it. A repeat (the key
//! is there: within the window, same sender and id, whatever its path and data) stores no
//! event, counts no `n` and adds no channel: the script appends to the root log only a
//! *marker*, an entry with a fresh stream ID (the next one, as an event's) and the fields `w`
//! (the writer tag) and `r` (the first event's ID), and no `l`, `o`, `n`. Otherwise it stores the
//! event and sets the key; a repeat later in the same script then finds it (a repeat in the
//! same group commit as its first gets its result; a failed script stored neither, so a failed
//! send is not remembered). With a zero window the script ignores ids. The writing node's
//! reader meets the marker in its place among the node's other entries and completes the
//! repeat there with the first's timestamp ([`Completion::replayed`]), so that a connection's
//! replies keep send order. A marker is no event: every reader of the log skips it (log pages,
//! their counts, bounds and ETags are those of a log without markers; pages go on by the last
//! entry seen, not by the events counted), it has no number (the continuity check skips it),
//! other nodes' readers skip it, and deletions and retention remove the markers of the root
//! log they step over (with `--retention-max-events` alone, only when `/` itself is trimmed:
//! a marker is a few dozen bytes per repeat).
//!
//! Stream IDs are the timestamps: `ms = secs × 1000 + nanos / 1 000 000`,
//! `seq = nanos mod 1 000 000`. The map is strictly increasing (a timestamp is
//! `ms × 10⁶ + seq` nanoseconds), so ID order is timestamp order and `after=TS` is an
//! exclusive XRANGE bound.
//!
//! # Writes: one script per group commit
//!
//! A writer task takes every request waiting in the queue (up to the same batch limits as the
//! single-node sequencer) and stores them with ONE Lua script (EVALSHA, loaded again on
//! NOSCRIPT): for each event `ts = max(Redis TIME, last + 1 ns, the node's floor + 1 ns)`, XADD to
//! each level's log (or, for a repeat of a send id, a marker to the root log: see below), then
//! SET the clock; it returns the IDs. Redis runs scripts one at a time,
//! so the order is total across nodes and no node's clock decides it. The node's floor (its
//! wall clock, and the newest timestamp it delivered or answered to `@`) only raises
//! timestamps: a node's `@` answer is below every later event it sends, and its timestamps keep
//! increasing if Redis's clock steps back or Redis lost its clock key. A node whose clock runs
//! ahead pulls the timestamps of the events it sends ahead with it (never their order).
//!
//! # Delivery: from the log, never from pub/sub
//!
//! A reader task runs `XREAD BLOCK` on the root log from the newest ID it handed to the
//! fan-out and hands every entry to the [`FanOut`] in order. A send completes when this node's
//! reader has delivered its event (right after it, before any later one: the seam's order).
//! The reader knows its own node's events by their `w` field, in the order they were written,
//! and so their sending connections (sender exclusion). After a lost connection the reader
//! resumes from its last ID: nothing is missed while the log holds it. Each event's number
//! `n` follows the previous one's; when it does not (events deleted before this node read them,
//! or Redis lost events and its counter went back), the node's subscribers are closed with
//! 4005 (continuity lost, `docs/PROTOCOL.md` 7) and the error is logged: never a silent gap.
//!
//! # Faults
//!
//! While Redis is unreachable, sends fail at once with `storage`
//! (`event not stored: the event store (Redis) is unreachable`) and `/readyz` is not ready;
//! the connections reconnect with backoff. Before a subscribe or a presence watch is answered
//! ([`Engine::settled`]) the node reads Redis's clock and waits until its reader delivered it,
//! so that positions mean the same on every node; when it cannot within [`SETTLE`] (Redis
//! unreachable, a lagging link) the connection is closed with 1013 (try again later) instead,
//! and a waiting subscribe cuts the reader's reconnection backoff short. A send whose write was cut by a lost connection
//! fails with `storage` too, saying that it may be in the log: if it was stored, it is
//! delivered to the subscribers (it is in the log), only the sender got an error.
//!
//! # Presence and the admin state
//!
//! Presence, channel listing, revocations and admin disconnects are on Redis too: presence
//! as a replicated view (`redis_presence`'s module docs), the rest in [`admin`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ivy_client_core::Timestamp;
use ivy_client_core::path::ROOT;
use ivy_client_core::wire::encode_event;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

mod admin;

use super::local::{Deleted, WallClock, line_path, stored_cost};
use super::{
    BoxFuture, Completion, ConnId, Context, DeleteRequest, Direction, Engine, FanOut, Horizon, Open, Origin, Page, Publish, PublishError,
    Published, ReadRequest, Requests, Retention,
};

/// Most events in one group commit (one script call).
const MAX_BATCH: usize = 4096;
/// Most bytes one group commit stores.
const MAX_BATCH_STORED_BYTES: usize = 16 << 20;
/// Most entries one XREAD of the reader returns.
const READ_COUNT: usize = 1024;
/// How long one XREAD of the reader blocks.
const BLOCK: Duration = Duration::from_millis(1000);
/// How long a command waits for its reply before the connection counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries per XRANGE of a log read.
const READ_CHUNK: usize = 512;
/// Entries looked at per step of a deletion.
const DELETE_STEP: usize = if cfg!(test) { 64 } else { 1024 };
/// The close code of a connection whose stream lost continuity (`docs/PROTOCOL.md` 7).
pub const CONTINUITY_LOST: u16 = 4005;

const CLOCK_KEY: &str = "{ivy}:clock";
/// The longest a subscribe waits for this node to catch up with Redis ([`Engine::settled`]):
/// longer than the reader's longest backoff (2 s), which a waiting subscribe cuts short.
const SETTLE: Duration = Duration::from_secs(5);
const COUNT_KEY: &str = "{ivy}:n";
const CHANNELS_KEY: &str = admin::PATHS_KEY;
const ROOT_KEY: &str = "{ivy}:log:/";

fn log_key(channel: &str) -> String {
    format!("{{ivy}}:log:{channel}")
}

fn horizon_key(channel: &str) -> String {
    format!("{{ivy}}:horizon:{channel}")
}

/// The stream ID of a timestamp (see the module docs).
fn id_of(ts: Timestamp) -> String {
    let n = ts.as_nanos();
    format!("{}-{}", n / 1_000_000, n % 1_000_000)
}

/// The timestamp of a stream ID.
fn ts_of(id: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(id).ok()?;
    let (ms, seq) = s.split_once('-')?;
    let (ms, seq): (u128, u128) = (ms.parse().ok()?, seq.parse().ok()?);
    (seq < 1_000_000).then(|| Timestamp::from_nanos(ms * 1_000_000 + seq))
}

/// The script of a group commit: see the module docs. KEYS: the clock, the counter, the set
/// of channels, the root log. ARGV: the node's floor (an ID), the writer tag, the idempotency
/// window in milliseconds (`0`: ids are ignored), then for each event its path, the rest of
/// its line after the timestamp (`:/path:data`), its sender and its send id (`''`: none).
/// An event whose id key (`{ivy}:id:ORIGIN ID`, see the module docs) is present is a repeat: only a marker entry (`w`, and
/// `r`: the first event's ID) is appended to the root log, in its place. Returns the IDs.
const PUBLISH: &str = r#"
local function parse(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))
end
local function step(ms, sq)
  if sq < 999999 then return ms, sq + 1 end
  return ms + 1, 0
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sq = (tonumber(t[2]) % 1000) * 1000
local now = ms
local function atleast(id)
  local b_ms, b_sq = parse(id)
  b_ms, b_sq = step(b_ms, b_sq)
  if b_ms > ms or (b_ms == ms and b_sq > sq) then ms, sq = b_ms, b_sq end
end
atleast(redis.call('GET', KEYS[1]) or '0-0')
atleast(ARGV[1])
local top = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
if top[1] then atleast(top[1][1]) end
local window = tonumber(ARGV[3])
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
local stored = 0
local ids = {}
local id
for i = 4, #ARGV, 4 do
  if i > 4 then ms, sq = step(ms, sq) end
  local path, rest, origin, sid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  id = string.format('%d-%d', ms, sq)
  local key, first = nil, nil
  if window > 0 and sid ~= '' then
    key = '{ivy}:id:' .. origin .. ' ' .. sid
    first = redis.call('GET', key)
  end
  if first then
    redis.call('XADD', KEYS[4], id, 'w', ARGV[2], 'r', first)
  else
    local line = string.format('@%010d.%09d', math.floor(ms / 1000), (ms % 1000) * 1000000 + sq) .. rest
    n = n + 1
    stored = stored + 1
    redis.call('XADD', KEYS[4], id, 'l', line, 'o', origin, 'n', n, 'w', ARGV[2])
    if path ~= '/' then
      local j = 2
      while true do
        local k = string.find(path, '/', j, true)
        local anc = path
        if k then anc = string.sub(path, 1, k - 1) end
        redis.call('XADD', '{ivy}:log:' .. anc, id, 'l', line, 'o', origin)
        redis.call('ZADD', KEYS[3], 0, anc)
        if not k then break end
        j = k + 1
      end
    end
    -- The window counts from the event's timestamp, which may be ahead of Redis's clock.
    if key then redis.call('SET', key, id, 'PX', window + math.max(0, ms - now)) end
  end
  ids[#ids + 1] = id
end
if stored > 0 then redis.call('INCRBY', KEYS[2], stored) end
redis.call('SET', KEYS[1], id)
return ids
"#;

/// One step of a deletion. KEYS: the channel's log. ARGV: the cursor (XRANGE start), the end
/// (exclusive, `(ID`), `1` to delete only the events sent to the channel itself, the channel,
/// the step. Deletes the events found from every log that holds them and raises those logs'
/// horizons (and the root log's repeat markers it looks at, which are no events); returns the number deleted, the newest deleted, the last ID looked at and how
/// many were looked at.
const DELETE: &str = r#"
local function parse(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1))
end
local function newer(a, b)
  local a_ms, a_sq = parse(a)
  local b_ms, b_sq = parse(b)
  return a_ms > b_ms or (a_ms == b_ms and a_sq > b_sq)
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[5]))
local newest, order = {}, {}
local deleted, last, newest_all = 0, '', ''
for _, e in ipairs(entries) do
  local id, f = e[1], e[2]
  last = id
  local line
  for i = 1, #f, 2 do if f[i] == 'l' then line = f[i + 1] end end
  local path = line and string.match(line, '^@[^:]*:([^:]*):')
  if path and (ARGV[3] ~= '1' or path == ARGV[4]) then
    local logs = {'/'}
    if path ~= '/' then
      local j = 2
      while true do
        local k = string.find(path, '/', j, true)
        if k then logs[#logs + 1] = string.sub(path, 1, k - 1) else logs[#logs + 1] = path end
        if not k then break end
        j = k + 1
      end
    end
    for _, log in ipairs(logs) do
      redis.call('XDEL', '{ivy}:log:' .. log, id)
      if not newest[log] then order[#order + 1] = log end
      newest[log] = id
    end
    deleted = deleted + 1
    newest_all = id
  elseif not line and KEYS[1] == '{ivy}:log:/' then
    redis.call('XDEL', KEYS[1], id)
  end
end
for _, log in ipairs(order) do
  local h = '{ivy}:horizon:' .. log
  local old = redis.call('HGET', h, 'ts')
  if not old or newer(newest[log], old) then redis.call('HSET', h, 'ts', newest[log]) end
  redis.call('HINCRBY', h, 'd', 1)
end
return {deleted, newest_all, last, #entries}
"#;

/// What the node reads at startup, atomically: the clock, the counter, the newest entry of
/// the root log.
const STATE: &str = r#"
local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local id = ''
if top[1] then id = top[1][1] end
return {redis.call('GET', KEYS[1]) or '0-0', redis.call('GET', KEYS[2]) or '0', id}
"#;

/// Opens the Redis engine: the URL of the Redis server (`redis://[:PASSWORD@]HOST:PORT[/DB]`,
/// `rediss://` for TLS), the retention settings and the node's wall clock.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisEngine {
    /// The Redis URL.
    pub url: String,
    /// How long events are kept. Default: everything (the log then grows in Redis's memory).
    pub retention: Retention,
    /// The node's wall clock (only its floor: Redis's clock orders events). Default: the system's.
    pub wall: WallClock,
}

impl RedisEngine {
    /// The engine on the Redis server at `url`.
    pub fn new(url: impl Into<String>) -> RedisEngine {
        RedisEngine { url: url.into(), retention: Retention::keep_everything(), wall: WallClock::system() }
    }

    /// How long events are kept (see [`Retention`]).
    pub fn retention(mut self, retention: Retention) -> RedisEngine {
        self.retention = retention;
        self
    }

    /// The node's wall clock (tests).
    pub fn wall_clock(mut self, wall: WallClock) -> RedisEngine {
        self.wall = wall;
        self
    }

    /// The URL with its password hidden, for logs.
    fn redacted(&self) -> String {
        redact(&self.url)
    }
}

/// `url` with the password (between `:` and `@` of the authority) replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.into() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.into(),
    }
}

fn io_err(e: redis::RedisError) -> io::Error {
    io::Error::other(format!("the event store (Redis) failed: {e}"))
}

/// The client's error line: `storage event not stored: the event store (Redis) is unreachable`.
const UNREACHABLE: &str = "event not stored: the event store (Redis) is unreachable";
/// When a write's connection was lost.
const CUT: &str =
    "event not stored: the connection to the event store (Redis) was lost during the write; the event may still be in the log";

fn unreachable() -> PublishError {
    PublishError::unreachable(UNREACHABLE)
}

impl Open for RedisEngine {
    fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>> {
        if self.url.starts_with("rediss://") {
            // redis-rs takes rustls's process-wide provider: the workspace's, ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid Redis URL {}: {e}", self.redacted())))?;
        // The starting state, synchronously: the fan-out's position must be set before any
        // subscription takes one.
        let mut sync = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| io::Error::other(format!("cannot reach Redis at {}: {e}", self.redacted())))?;
        let _ = sync.set_read_timeout(Some(RESPONSE_TIMEOUT));
        let (clock, count, top): (String, u64, String) =
            redis::Script::new(STATE).key(CLOCK_KEY).key(COUNT_KEY).key(ROOT_KEY).invoke(&mut sync).map_err(io_err)?;
        let last = ts_of(top.as_bytes()).unwrap_or(Timestamp::ZERO);
        let clock = ts_of(clock.as_bytes()).unwrap_or(Timestamp::ZERO);
        durability_report(&mut sync, &self.redacted(), &self.retention);
        let loaded = admin::load(&mut sync, crate::auth::now_unix())?;
        drop(sync);
        context.fanout.start_at(last);
        tracing::info!(last = %last, clock = %clock, events = count, "event store (Redis) open");

        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone()).map_err(io_err)?;
        let blocking = config.set_response_timeout(Some(BLOCK + RESPONSE_TIMEOUT));
        let reader_conn = ConnectionManager::new_lazy_with_config(client.clone(), blocking.clone()).map_err(io_err)?;
        let control_conn = ConnectionManager::new_lazy_with_config(client.clone(), blocking.clone()).map_err(io_err)?;
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag).map_err(|e| io::Error::other(format!("no random node tag: {e}")))?;
        let node: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        // Presence: every node keeps the whole cluster's view (super::redis_presence).
        let presence_conn = ConnectionManager::new_lazy_with_config(client, blocking).map_err(io_err)?;
        let presence = super::redis_presence::RedisPresence::start(
            context.presence,
            context.fanout.clone(),
            node.clone(),
            conn.clone(),
            presence_conn,
        );
        let shared = Arc::new(Shared {
            conn,
            node,
            pending: Mutex::new(VecDeque::new()),
            visible: AtomicU64::new(nanos(last)),
            clock: AtomicU64::new(nanos(clock.max(last))),
            healthy: AtomicBool::new(true),
            wall: self.wall,
            fanout: context.fanout,
            written: self.retention.max_events.map(|_| Mutex::default()),
            stop: CancellationToken::new(),
            delivered: tokio::sync::Notify::new(),
            position: AtomicU64::new(nanos(last)),
            wake: tokio::sync::Notify::new(),
        });
        let reader =
            Reader { shared: shared.clone(), conn: reader_conn, metrics: context.metrics.clone(), last, expected: count, down_since: None };
        let reader = tokio::spawn(reader.run());
        // Milliseconds (PX), at least one; 0: ids ignored.
        let window = if context.idempotency.is_active() {
            u64::try_from(context.idempotency.window.as_millis()).unwrap_or(u64::MAX).max(1)
        } else {
            0
        };
        let writer = Writer { shared: shared.clone(), requests: context.requests, metrics: context.metrics, batches: 0, window };
        let writer = tokio::spawn(writer.run());
        if self.retention.is_active() {
            let retainer = Retainer { shared: shared.clone(), retention: self.retention, checked: HashMap::new() };
            tokio::spawn(retainer.run());
        }
        let admin = admin::Admin::start(shared.clone(), control_conn, loaded);
        Ok(Arc::new(RedisLog { shared, tasks: Mutex::new(Some((writer, reader))), presence, admin }))
    }

    fn describe(&self) -> String {
        format!("Redis at {}", self.redacted())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// Logs what an ack means with Redis's persistence settings, and warns when it is not durable
/// or when nothing bounds the log.
fn durability_report(conn: &mut redis::Connection, url: &str, retention: &Retention) {
    let get = |conn: &mut redis::Connection, key: &str| -> Option<String> {
        let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(key).query(conn).ok()?;
        v.get(1).cloned()
    };
    let aof = get(conn, "appendonly");
    let fsync = get(conn, "appendfsync");
    match (aof.as_deref(), fsync.as_deref()) {
        (Some("yes"), Some("always")) => tracing::info!(
            redis = url,
            "Redis has appendonly yes, appendfsync always: an ack means the event is in Redis's append-only file, fsynced; it survives a crash of Redis or of its machine"
        ),
        (Some("yes"), Some(f)) => tracing::warn!(
            redis = url,
            appendfsync = f,
            "Redis has appendonly yes but not appendfsync always: an acked event can be lost in a crash of Redis's machine (about the last second with everysec; with no, whatever the OS had not written). Set appendfsync always for durable acks"
        ),
        (Some(_), _) => tracing::warn!(
            redis = url,
            "Redis has appendonly no: acks are NOT durable; a restart of Redis loses every event since its last RDB snapshot (all of them without one). Set appendonly yes and appendfsync always for durable acks"
        ),
        (None, _) => tracing::warn!(
            redis = url,
            "Redis refused CONFIG GET: its persistence settings are unknown, so is what an ack survives (appendonly yes with appendfsync always makes acks durable)"
        ),
    }
    let policy = get(conn, "maxmemory-policy");
    let maxmemory = get(conn, "maxmemory");
    if let Some(policy) = policy.as_deref().filter(|p| *p != "noeviction") {
        if maxmemory.as_deref().is_some_and(|m| m != "0") {
            tracing::warn!(
                redis = url,
                maxmemory_policy = policy,
                "Redis evicts keys when it reaches maxmemory: it may delete parts of the log, the clock or the send ids. The nodes find lost events (their subscribers are closed with 4005) but cannot bring them back. Set maxmemory-policy noeviction: Redis then refuses writes when full, and sends fail with a storage error"
            );
        } else {
            tracing::info!(
                redis = url,
                maxmemory_policy = policy,
                "Redis has no maxmemory, so its eviction policy never applies; should one be set, set maxmemory-policy noeviction too"
            );
        }
    }
    if !retention.is_active() {
        tracing::warn!(
            "no retention bound (--retention-max-age, --retention-max-events): on Redis the log grows in Redis's memory until Redis refuses writes"
        );
    }
}

fn nanos(ts: Timestamp) -> u64 {
    u64::try_from(ts.as_nanos()).unwrap_or(u64::MAX)
}

/// A group commit of this node whose events the reader has not all delivered yet: for each
/// event, its sending connection and its completion (`None` once its sender was told).
#[derive(Debug)]
struct Pending {
    batch: u64,
    events: VecDeque<(Option<ConnId>, Option<Completion>)>,
}

/// State shared by the engine's handle and its tasks.
struct Shared {
    conn: ConnectionManager,
    /// This node's tag in the `w` field of the events it writes.
    node: String,
    /// This node's group commits in the order they were written.
    pending: Mutex<VecDeque<Pending>>,
    /// The newest event delivered to the fan-out (nanoseconds): what log readers see.
    visible: AtomicU64,
    /// The greatest timestamp this node handed out (`@`) or delivered (nanoseconds).
    clock: AtomicU64,
    /// Whether Redis answers (sends fail at once when not).
    healthy: AtomicBool,
    wall: WallClock,
    fanout: Arc<FanOut>,
    /// With a per-channel event limit: how many events each path was sent since the retention
    /// task last looked.
    written: Option<Mutex<HashMap<Box<str>, u64>>>,
    stop: CancellationToken,
    /// Woken each time the reader handed events to the fan-out ([`Engine::settled`]).
    delivered: tokio::sync::Notify,
    /// The newest event the fan-out has been given (nanoseconds), set once
    /// [`FanOut::deliver`] returned: a subscription made now takes a position at least this
    /// one (`visible` is raised before the delivery, so it may be ahead of the fan-out's).
    position: AtomicU64,
    /// Cuts the reader's backoff short: a subscribe waits for it ([`Engine::settled`]) and
    /// has just heard from Redis.
    wake: tokio::sync::Notify,
}

impl Shared {
    fn visible(&self) -> Timestamp {
        Timestamp::from_nanos(u128::from(self.visible.load(Ordering::Acquire)))
    }

    fn ready(&self) -> Result<(), PublishError> {
        if self.healthy.load(Ordering::Acquire) { Ok(()) } else { Err(unreachable()) }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `before`, or everything visible when `None`, never beyond what this node delivered.
    fn cap(&self, before: Option<Timestamp>) -> Timestamp {
        let visible = Timestamp::from_nanos(self.visible().as_nanos().saturating_add(1));
        before.map_or(visible, |b| b.min(visible))
    }

    /// Deletes events of `channel`'s log before `before` (with `own`, only those sent to it),
    /// in steps.
    async fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        let script = redis::Script::new(DELETE);
        let mut conn = self.conn.clone();
        let mut deleted = Deleted::default();
        let mut cursor = "-".to_string();
        let end = format!("({}", id_of(before));
        loop {
            let (n, newest, last, seen): (u64, String, String, usize) = script
                .key(log_key(channel))
                .arg(&cursor)
                .arg(&end)
                .arg(if own { "1" } else { "0" })
                .arg(channel)
                .arg(DELETE_STEP)
                .invoke_async(&mut conn)
                .await
                .map_err(io_err)?;
            deleted.events += n;
            if let Some(ts) = ts_of(newest.as_bytes()) {
                deleted.newest = deleted.newest.max(Some(ts));
            }
            if seen < DELETE_STEP || last.is_empty() {
                return Ok(deleted);
            }
            cursor = format!("({last}");
        }
    }

    /// Ends every subscribed connection of this node with [`CONTINUITY_LOST`].
    fn continuity_lost(&self, why: &str) {
        let n = self.fanout.end_subscribers(CONTINUITY_LOST);
        tracing::error!(connections = n, "continuity lost: {why}; the node's subscribers were closed with 4005 (they resume from the log)");
    }
}

/// The running engine.
struct RedisLog {
    shared: Arc<Shared>,
    tasks: Mutex<Option<(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>)>>,
    presence: Arc<super::redis_presence::RedisPresence>,
    /// Channel listing, revocations and the other nodes' admin commands ([`admin`]).
    admin: admin::Admin,
}

impl Engine for RedisLog {
    fn presence(&self) -> Arc<dyn super::Presence> {
        self.presence.view()
    }

    fn channels(&self, request: super::ChannelsRequest) -> BoxFuture<'static, io::Result<Vec<super::StoredChannel>>> {
        Box::pin(admin::channels(self.shared.conn.clone(), request))
    }

    fn revocations(&self, now: u64) -> io::Result<Vec<super::Revocation>> {
        Ok(self.admin.revocations(now))
    }

    fn revoke(&self, revocation: super::Revocation, _now: u64) -> BoxFuture<'static, io::Result<()>> {
        admin::revoke(&self.shared, revocation)
    }

    fn control(&self) -> Option<tokio::sync::mpsc::Receiver<super::Control>> {
        self.admin.commands()
    }

    fn broadcast(&self, control: super::Control) -> BoxFuture<'static, io::Result<()>> {
        admin::broadcast(&self.shared, control)
    }

    fn now(&self) -> Timestamp {
        let now = nanos(self.shared.wall.now()).max(self.shared.visible.load(Ordering::Acquire));
        let before = self.shared.clock.fetch_max(now, Ordering::AcqRel);
        Timestamp::from_nanos(u128::from(before.max(now)))
    }

    fn visible(&self) -> Timestamp {
        self.shared.visible()
    }

    /// Waits until this node's reader has delivered the newest event Redis holds now (the
    /// clock key: the last event any node stored), at most [`SETTLE`]: another node may have
    /// delivered it already, and a subscribe position below it would tell a client that moved
    /// here that history was lost. `false` when Redis cannot be read (a few tries: the first
    /// command after Redis restarted fails while the connection is made again) or the reader
    /// did not catch up in time: the connection is then closed with 1013 (try again later).
    fn settled(&self) -> BoxFuture<'static, bool> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let deadline = tokio::time::sleep(SETTLE);
            tokio::pin!(deadline);
            let mut conn = shared.conn.clone();
            let get = redis::cmd("GET").arg(CLOCK_KEY).clone();
            let mut tries = 0;
            let top = loop {
                let error = tokio::select! {
                    top = get.query_async::<Option<String>>(&mut conn) => match top {
                        Ok(top) => break top.and_then(|id| ts_of(id.as_bytes())),
                        Err(e) => e.to_string(),
                    },
                    () = &mut deadline => "no answer".into(),
                };
                tries += 1;
                if tries == 4 || deadline.is_elapsed() {
                    tracing::warn!(error, "a subscribe could not read Redis's clock: closed with 1013 (try again later)");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            // An empty store: nothing to wait for.
            let Some(top) = top else { return true };
            let position = || Timestamp::from_nanos(u128::from(shared.position.load(Ordering::Acquire)));
            // Redis answered: a reader waiting to retry after a lost connection retries now.
            shared.wake.notify_one();
            loop {
                let delivered = shared.delivered.notified();
                if position() >= top {
                    return true;
                }
                tokio::select! {
                    () = delivered => {}
                    () = &mut deadline => {
                        tracing::warn!(at = %position(), redis = %top, "this node's reader did not catch up with Redis within {SETTLE:?}: a subscribe was closed with 1013 (try again later)");
                        return false;
                    }
                }
            }
        })
    }

    fn read(&self, request: ReadRequest) -> BoxFuture<'static, io::Result<Page>> {
        let conn = self.shared.conn.clone();
        Box::pin(read_page(conn, request))
    }

    fn delete(&self, request: DeleteRequest) -> BoxFuture<'static, io::Result<Deleted>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let before = shared.cap(request.before);
            let deleted = shared.delete(&request.channel, before, false).await?;
            tracing::info!(channel = %request.channel, before = %before, events = deleted.events, "deleted a channel's history");
            Ok(deleted)
        })
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).take();
        let shared = self.shared.clone();
        let presence = self.presence.clone();
        Box::pin(async move {
            presence.shutdown().await;
            if let Some((writer, reader)) = tasks {
                let _ = writer.await;
                // The sends written complete once the reader delivered them.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && shared.pending().iter().any(|p| p.events.iter().any(|e| e.1.is_some())) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                shared.stop.cancel();
                let _ = reader.await;
                for p in shared.pending().drain(..) {
                    for (_, done) in p.events {
                        if let Some(done) = done {
                            done.complete(Err(PublishError::ShuttingDown));
                        }
                    }
                }
            }
        })
    }
}

/// Reads one page of `request.channel`'s log.
async fn read_page(mut conn: ConnectionManager, request: ReadRequest) -> io::Result<Page> {
    let key = log_key(&request.channel);
    let horizon: (Option<String>, Option<u64>) =
        redis::cmd("HMGET").arg(horizon_key(&request.channel)).arg("ts").arg("d").query_async(&mut conn).await.map_err(io_err)?;
    let mut page = Page { horizon: horizon_of(horizon), ..Page::default() };
    if request.limit == 0 || request.after.is_some_and(|a| a >= request.until) {
        return Ok(page);
    }
    let until = id_of(request.until);
    let mut after = match request.after {
        Some(a) => format!("({}", id_of(a)),
        None => "-".into(),
    };
    let mut top = until.clone();
    loop {
        let chunk = (request.limit - page.count).clamp(1, READ_CHUNK);
        let mut cmd = match request.direction {
            Direction::Forward => {
                let mut c = redis::cmd("XRANGE");
                c.arg(&key).arg(&after).arg(&until);
                c
            }
            Direction::Backward => {
                let mut c = redis::cmd("XREVRANGE");
                c.arg(&key).arg(&top).arg(&after);
                c
            }
        };
        let reply: Value = cmd.arg("COUNT").arg(chunk).query_async(&mut conn).await.map_err(io_err)?;
        let entries = entries(reply);
        let got = entries.len();
        // The cursor moves by entries, the page fills by events: markers are not events.
        for e in entries.iter().filter(|e| !e.is_marker()) {
            page.push_for(&request, e.ts, &e.line, &e.origin);
            if page.is_full(&request) {
                return Ok(page);
            }
        }
        match entries.last() {
            Some(e) if got >= chunk => {
                let cursor = format!("({}", id_of(e.ts));
                match request.direction {
                    Direction::Forward => after = cursor,
                    Direction::Backward => top = cursor,
                }
            }
            _ => return Ok(page),
        }
    }
}

fn horizon_of((ts, d): (Option<String>, Option<u64>)) -> Option<Horizon> {
    let newest = ts_of(ts?.as_bytes())?;
    Some(Horizon { newest, deletions: d.unwrap_or(1) })
}

/// One entry of a log: an event, or (root log only) a repeat's marker.
#[derive(Debug, Default)]
struct Entry {
    ts: Timestamp,
    /// The event line (empty: a marker).
    line: Vec<u8>,
    origin: Vec<u8>,
    /// The event's number (the root log's events).
    n: Option<u64>,
    /// The writer tag (the root log's entries).
    writer: Vec<u8>,
    /// A marker's first event (`r`): the stream ID of the event stored with the repeated id.
    first: Vec<u8>,
}

impl Entry {
    /// Whether this is a repeat's marker (see the module docs), which no reader of the log
    /// sees: only the reader of the node that wrote it, to answer the repeat in its place.
    fn is_marker(&self) -> bool {
        self.line.is_empty()
    }
}

fn bytes_of(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// Each entry of an XRANGE reply (`[[id, [field, value, ...]], ...]`, the fields a map with
/// RESP3), in its order: `visit(id, fields)`, the fields as (name, value) pairs.
pub(super) fn each_entry(reply: Value, mut visit: impl FnMut(Vec<u8>, &mut dyn Iterator<Item = (Vec<u8>, Value)>)) {
    let Value::Array(items) = reply else { return };
    for item in items {
        let Value::Array(mut pair) = item else { continue };
        if pair.len() != 2 {
            continue;
        }
        let fields = match pair.pop().unwrap_or(Value::Nil) {
            Value::Array(f) => f,
            Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        };
        let id = bytes_of(pair.pop().unwrap_or(Value::Nil));
        let mut it = fields.into_iter();
        let mut pairs = std::iter::from_fn(|| Some((bytes_of(it.next()?), it.next()?)));
        visit(id, &mut pairs);
    }
}

/// The entries of an XRANGE reply, in its order.
fn entries(reply: Value) -> Vec<Entry> {
    let mut out = Vec::new();
    each_entry(reply, |id, fields| {
        let Some(ts) = ts_of(&id) else { return };
        let mut e = Entry { ts, ..Entry::default() };
        for (k, v) in fields {
            match k.as_slice() {
                b"l" => e.line = bytes_of(v),
                b"o" => e.origin = bytes_of(v),
                b"n" => e.n = std::str::from_utf8(&bytes_of(v)).ok().and_then(|s| s.parse().ok()),
                b"w" => e.writer = bytes_of(v),
                b"r" => e.first = bytes_of(v),
                _ => {}
            }
        }
        if e.origin.is_empty() {
            e.origin = b"?".to_vec();
        }
        out.push(e);
    });
    out
}

/// The entries of an XREAD reply on one stream (`[[key, entries]]`, or a map with RESP3).
fn read_entries(reply: Value) -> Vec<Entry> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => entries(kv.pop().unwrap_or(Value::Nil)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

/// The writer task: group commits, one script each.
struct Writer {
    shared: Arc<Shared>,
    requests: Requests,
    metrics: super::EngineMetrics,
    batches: u64,
    /// The idempotency window in milliseconds, `0` when ids are ignored (the script's ARGV[3]).
    window: u64,
}

fn cost(r: &Publish) -> usize {
    stored_cost(&r.path, r.data.len().saturating_add(r.origin.wire().len()).saturating_add(r.id.as_ref().map_or(0, |id| 1 + id.len()))).1
}

impl Writer {
    async fn run(mut self) {
        let script = redis::Script::new(PUBLISH);
        let mut batch: Vec<Publish> = Vec::new();
        while let Some(first) = self.requests.next().await {
            let mut bytes = cost(&first);
            batch.push(first);
            while (batch.len() < MAX_BATCH && bytes < MAX_BATCH_STORED_BYTES) || self.requests.continues_batch() {
                match self.requests.try_next() {
                    Some(r) => {
                        bytes += cost(&r);
                        batch.push(r);
                    }
                    None => break,
                }
            }
            self.commit(&script, &mut batch).await;
            if self.requests.is_ended() {
                break;
            }
        }
        self.requests.refuse_rest();
    }

    /// Answers every send still waiting for the reader as one whose write lost its
    /// connection (`CUT`), in order; the events stay known to the reader, which delivers
    /// those that were stored.
    fn answer_pending_as_cut(&self) {
        let taken: Vec<Completion> =
            self.shared.pending().iter_mut().flat_map(|p| p.events.iter_mut().filter_map(|e| e.1.take())).collect();
        if taken.is_empty() {
            return;
        }
        let error = PublishError::unreachable(CUT);
        self.metrics.refused(taken.len(), &error);
        tracing::warn!(events = taken.len(), "Redis is unreachable: sends written before are answered as maybe stored");
        for done in taken {
            done.complete(Err(error.clone()));
        }
    }

    fn refuse(&self, batch: &mut Vec<Publish>, e: PublishError) {
        self.metrics.refused(batch.len(), &e);
        tracing::warn!(events = batch.len(), reason = %e, "events refused");
        for r in batch.drain(..) {
            r.done.complete(Err(e.clone()));
        }
    }

    async fn commit(&mut self, script: &redis::Script, batch: &mut Vec<Publish>) {
        let shared = &*self.shared;
        super::answer_probes(batch, || shared.ready(), &shared.fanout);
        if batch.is_empty() {
            return;
        }
        if let Err(e) = shared.ready() {
            // Sends written before Redis went away wait for the reader to deliver them; this
            // batch's refusals must not overtake their acks (a connection's replies come in
            // send order, docs/PROTOCOL.md 5.7): they are answered first, as a write whose
            // connection was lost ("may still be in the log"; the reader still delivers
            // them if they are, without an ack).
            self.answer_pending_as_cut();
            return self.refuse(batch, e);
        }
        self.batches += 1;
        let no = self.batches;
        // The node's floor: its wall clock and what it handed out (`@`) or delivered.
        // (Events come after the floor: after the wall clock's previous nanosecond.)
        let wall = nanos(shared.wall.now()).saturating_sub(1);
        let floor = shared.clock.load(Ordering::Acquire).max(shared.visible.load(Ordering::Acquire)).max(wall);
        let floor = Timestamp::from_nanos(u128::from(floor));
        let mut invocation = script.prepare_invoke();
        invocation
            .key(CLOCK_KEY)
            .key(COUNT_KEY)
            .key(CHANNELS_KEY)
            .key(ROOT_KEY)
            .arg(id_of(floor))
            .arg(format!("{}:{no}", shared.node))
            .arg(self.window);
        let mut line = Vec::new();
        for r in batch.iter() {
            line.clear();
            encode_event(Timestamp::ZERO, &r.path, &r.data, &mut line);
            let rest = line.iter().position(|&b| b == b':').map_or(&line[..], |i| &line[i..]);
            invocation.arg(&*r.path).arg(rest).arg(r.origin.wire()).arg(r.id.as_deref().unwrap_or_default());
        }
        let paths: Option<Vec<Box<str>>> = shared.written.as_ref().map(|_| batch.iter().map(|r| r.path.clone()).collect());
        // Registered before the write: the reader may deliver the events before the reply.
        let (events, completions): (VecDeque<_>, Vec<_>) = batch.drain(..).map(|r| ((r.sender, None), r.done)).unzip();
        let count = events.len();
        let mut events = events;
        for (e, done) in events.iter_mut().zip(completions) {
            e.1 = Some(done);
        }
        shared.pending().push_back(Pending { batch: no, events });
        let started = Instant::now();
        let mut conn = shared.conn.clone();
        let result: Result<Vec<String>, redis::RedisError> = invocation.invoke_async(&mut conn).await;
        match result {
            Ok(_) => {
                self.metrics.group_commit(count, started.elapsed());
                if let (Some(written), Some(paths)) = (&shared.written, paths) {
                    let mut written = written.lock().unwrap_or_else(PoisonError::into_inner);
                    for p in paths {
                        *written.entry(p).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                // A reply from Redis (an error of the script before it wrote): nothing stored.
                // Otherwise the write may or may not have happened: the events stay known to
                // the reader, which delivers them if they are in the log.
                let answered = matches!(e.kind(), redis::ErrorKind::Server(_));
                let error = if answered {
                    PublishError::storage(io::Error::other(format!("the event store (Redis) refused the write: {e}")))
                } else {
                    shared.healthy.store(false, Ordering::Release);
                    tracing::error!(error = %e, events = count, "the connection to Redis failed during a write");
                    PublishError::unreachable(CUT)
                };
                let mut pending = shared.pending();
                let taken: Vec<Completion> = match pending.iter().position(|p| p.batch == no) {
                    Some(i) if answered => {
                        pending.remove(i).map(|p| p.events.into_iter().filter_map(|e| e.1).collect()).unwrap_or_default()
                    }
                    Some(i) => pending[i].events.iter_mut().filter_map(|e| e.1.take()).collect(),
                    None => Vec::new(),
                };
                drop(pending);
                self.metrics.refused(taken.len(), &error);
                for done in taken {
                    done.complete(Err(error.clone()));
                }
            }
        }
    }
}

/// The reader task: delivers the root log to the fan-out, in order.
struct Reader {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    metrics: super::EngineMetrics,
    /// The newest event handed to the fan-out (or the newest stored at startup).
    last: Timestamp,
    /// The number of the newest event seen.
    expected: u64,
    /// Since when Redis does not answer.
    down_since: Option<Instant>,
}

impl Reader {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(READ_COUNT).arg("BLOCK").arg(BLOCK.as_millis() as u64).arg("STREAMS").arg(ROOT_KEY).arg(id_of(self.last));
            let read = cmd.query_async::<Value>(&mut self.conn);
            let reply = tokio::select! {
                r = read => r,
                _ = self.shared.stop.cancelled() => return,
            };
            match reply {
                Ok(reply) => {
                    if self.down_since.is_some() && !self.reconnected().await {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            () = self.shared.wake.notified() => {}
                        }
                        continue;
                    }
                    backoff = Duration::from_millis(50);
                    self.shared.healthy.store(true, Ordering::Release);
                    self.deliver(read_entries(reply));
                }
                Err(e) => {
                    self.shared.healthy.store(false, Ordering::Release);
                    if self.down_since.is_none() {
                        tracing::error!(error = %e, "lost the connection to Redis; sends fail until it is back, reconnecting");
                        self.down_since = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        () = self.shared.wake.notified() => {}
                        _ = self.shared.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Back after a lost connection: checks that Redis still holds what this node saw.
    async fn reconnected(&mut self) -> bool {
        let state: Result<(String, u64, String), _> =
            redis::Script::new(STATE).key(CLOCK_KEY).key(COUNT_KEY).key(ROOT_KEY).invoke_async(&mut self.conn).await;
        let Ok((_, count, top)) = state else { return false };
        let down = self.down_since.take().map(|t| t.elapsed()).unwrap_or_default();
        let top = ts_of(top.as_bytes()).unwrap_or(Timestamp::ZERO);
        // The counter only grows (deletions leave it), so a smaller one means lost writes; the
        // newest entry may be older than this node's position after a deletion, which is no loss.
        if count < self.expected {
            self.shared.continuity_lost(&format!(
                "Redis came back without events this node had seen (it holds {count} events up to {top}; this node saw {} up to {}): \
                 Redis lost acknowledged writes (persistence off or not fsynced)",
                self.expected, self.last
            ));
            self.expected = count;
        } else {
            tracing::info!(down = ?down, "the connection to Redis is back; resuming from the log at {}", self.last);
        }
        true
    }

    fn deliver(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let shared = &*self.shared;
        let fanout = &shared.fanout;
        let tag = shared.node.as_bytes();
        let mut published = Vec::with_capacity(entries.len());
        let mut done: Vec<Option<Completion>> = Vec::with_capacity(entries.len());
        // The sends this read answers without an event of theirs (repeats, and sends never
        // stored), each with the number of events delivered before it: they complete in that
        // place among the others, so that a connection's replies keep send order.
        let mut others: VecDeque<(usize, Completion, Outcome)> = VecDeque::new();
        let mut gap = None;
        {
            let mut pending = shared.pending();
            for e in entries {
                // The cursor moves past every entry, markers included.
                self.last = e.ts;
                if let Some(n) = e.n {
                    if n != self.expected + 1 && gap.is_none() {
                        gap = Some((self.expected, n, e.ts));
                    }
                    self.expected = n;
                }
                let mut sender = None;
                let mut completion = None;
                if let Some(batch) = e.writer.strip_prefix(tag).and_then(|r| r.strip_prefix(b":")) {
                    let batch: u64 = std::str::from_utf8(batch).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                    // Earlier batches of this node with events left were never stored.
                    while pending.front().is_some_and(|p| p.batch < batch) {
                        if let Some(p) = pending.pop_front() {
                            let at = published.len();
                            others.extend(p.events.into_iter().filter_map(|e| e.1).map(|d| (at, d, Outcome::Failed(unreachable()))));
                        }
                    }
                    if let Some(p) = pending.front_mut().filter(|p| p.batch == batch) {
                        if let Some((s, d)) = p.events.pop_front() {
                            (sender, completion) = (s, d);
                        }
                        if p.events.is_empty() {
                            pending.pop_front();
                        }
                    }
                }
                if e.is_marker() {
                    // A repeat of this node: answered with its first event's timestamp.
                    if let Some(d) = completion {
                        let outcome = match ts_of(&e.first) {
                            Some(first) => Outcome::Replayed(first),
                            None => Outcome::Failed(PublishError::storage(io::Error::other(
                                "the event store (Redis) holds a repeat marker without its first event",
                            ))),
                        };
                        others.push_back((published.len(), d, outcome));
                    }
                    continue;
                }
                let Some(path) = line_path(&e.line).map(Box::<str>::from) else { continue };
                let origin = Origin::from_wire(&e.origin).unwrap_or(Origin::UNKNOWN);
                published.push(Published::new(e.ts, path, sender, fanout.line(e.line)).from(origin));
                done.push(completion);
            }
        }
        // Visible to log readers before any subscriber gets it.
        shared.visible.fetch_max(nanos(self.last), Ordering::AcqRel);
        shared.clock.fetch_max(nanos(self.last), Ordering::AcqRel);
        let mut replayed = 0;
        let mut complete_others = |upto: usize| {
            while others.front().is_some_and(|o| o.0 <= upto) {
                if let Some((_, d, outcome)) = others.pop_front() {
                    match outcome {
                        Outcome::Replayed(first) => {
                            replayed += 1;
                            d.replayed(first);
                        }
                        Outcome::Failed(e) => d.complete(Err(e)),
                    }
                }
            }
        };
        fanout.deliver(&published, |i| {
            complete_others(i);
            if let (Some(d), Some(p)) = (done.get_mut(i).and_then(Option::take), published.get(i)) {
                d.complete(Ok(p.ts));
            }
        });
        shared.position.fetch_max(nanos(self.last), Ordering::AcqRel);
        complete_others(usize::MAX);
        if replayed > 0 {
            self.metrics.replayed(replayed);
        }
        shared.delivered.notify_waiters();
        if let Some((expected, n, ts)) = gap {
            shared.continuity_lost(&format!(
                "the event after number {expected} in Redis is number {n} (at {ts}): events were deleted (retention) before this node \
                 delivered them, or Redis lost events"
            ));
        }
    }
}

/// How the reader answers a send of this node that has no event of its own in the log.
enum Outcome {
    /// A repeat: the first event's timestamp.
    Replayed(Timestamp),
    /// Not stored.
    Failed(PublishError),
}

/// The retention task: deletes, in the background, what [`Retention`] no longer keeps.
struct Retainer {
    shared: Arc<Shared>,
    retention: Retention,
    checked: HashMap<Box<str>, u64>,
}

impl Retainer {
    fn interval(&self) -> Duration {
        let quarter = self.retention.max_age.map_or(Duration::from_secs(1), |a| a / 4);
        quarter.clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval()) => {}
                _ = self.shared.stop.cancelled() => return,
            }
            if let Err(e) = self.pass().await {
                tracing::error!(error = %e, "deleting events past the retention limits failed; will try again");
            }
        }
    }

    async fn pass(&mut self) -> io::Result<()> {
        if let Some(age) = self.retention.max_age {
            let cutoff = Timestamp::from_nanos(self.shared.wall.now().as_nanos().saturating_sub(age.as_nanos()));
            let deleted = self.shared.delete(ROOT, self.shared.cap(Some(cutoff)), false).await?;
            if deleted.events > 0 {
                tracing::debug!(events = deleted.events, before = %cutoff, "retention: deleted events older than --retention-max-age");
            }
        }
        if let (Some(keep), Some(written)) = (self.retention.max_events, &self.shared.written) {
            let sent = std::mem::take(&mut *written.lock().unwrap_or_else(PoisonError::into_inner));
            for path in super::trims_due(&mut self.checked, sent, keep) {
                self.trim(&path, keep).await?;
            }
        }
        Ok(())
    }

    /// Deletes the events sent to `path` itself beyond its newest `keep`.
    async fn trim(&self, path: &str, keep: u64) -> io::Result<()> {
        let mut own = 0u64;
        let mut until = self.shared.visible();
        let cut = 'scan: loop {
            let page = read_page(self.shared.conn.clone(), ReadRequest::new(path, None, until, READ_CHUNK).backward()).await?;
            let lines = Bytes::from(page.lines);
            for line in lines.split(|&b| b == b'\n') {
                if line_path(line) == Some(path) {
                    own += 1;
                    if own > keep {
                        break 'scan crate::catchup::split_line(line).map(|(ts, _)| ts);
                    }
                }
            }
            match page.first.zip(page.last) {
                Some((_, oldest)) if page.count >= READ_CHUNK && oldest > Timestamp::ZERO => {
                    until = Timestamp::from_nanos(oldest.as_nanos() - 1);
                }
                _ => break None,
            }
        };
        if let Some(cut) = cut {
            let deleted = self.shared.delete(path, Timestamp::from_nanos(cut.as_nanos().saturating_add(1)), true).await?;
            tracing::debug!(channel = path, events = deleted.events, "retention: deleted events beyond --retention-max-events");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_timestamps_in_order() {
        let at = |s, n| Timestamp::new(s, n).unwrap();
        assert_eq!(id_of(at(1_795_312_345, 123_456_789)), "1795312345123-456789");
        assert_eq!(ts_of(b"1795312345123-456789"), Some(at(1_795_312_345, 123_456_789)));
        assert_eq!(ts_of(b"1795312345123-1000000"), None);
        assert_eq!(ts_of(b"0-0"), Some(Timestamp::ZERO));
        // Strictly increasing: the next nanosecond is the next ID, also across a millisecond.
        let a = at(10, 999_999);
        assert_eq!(id_of(a), "10000-999999");
        assert_eq!(id_of(a.next()), "10001-0");
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("redis://:secret@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(redact("rediss://user:secret@host:6380"), "rediss://user:***@host:6380");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
