//! Presence across the nodes of the Redis engine (issue 15): every node shows the same
//! presence (`docs/PROTOCOL.md` 5.10, 6.5, 9.13) within a short delay.
//!
//! **A replicated view.** Each node keeps the whole cluster's presence in its own
//! [`LocalPresence`] (so counts, pages, snapshots and watches stay in memory, and the tick,
//! the coalescing, the linger and the watchers are those of one node): its own connections'
//! joins and leaves, as on one node, plus the *contributions* of the other nodes: for each
//! (node, channel, member) the number of that node's connections of the member at the channel,
//! with its info. A member's connections at a channel are the sum over the nodes; it joins
//! when the sum leaves 0 and lingers when it reaches 0, wherever its connections were.
//! Contributions travel as absolute values, so that applying one twice (a replay) changes
//! nothing.
//!
//! # Keys
//!
//! All with the hash tag `{ivy}`:
//!
//! - `{ivy}:presence:node:<node>`: a HASH of the node's contributions, field: the channel, a
//!   newline and the member's cursor form (`=sub` or `-hex`, [`MemberId::cursor`]); value: its
//!   connections, then (with an info) a newline and the info (compact JSON);
//! - `{ivy}:presence:alive:<node>`: the node's heartbeat, a key with a TTL of
//!   [`ALIVE_TTL`] refreshed every [`HEARTBEAT`];
//! - `{ivy}:presence:nodes`: the SET of the node ids that have (or had) a hash;
//! - `{ivy}:presence:changes`: a STREAM of changes (`XADD MAXLEN ~ 100000`), each entry with
//!   `n` (the node) and either `t` = `s` with `c` (channel), `m` (member cursor), `k`
//!   (connections, 0: none) and `i` (info, when there is one), or `t` = `r`: the node rewrote
//!   its whole hash (a reconnect) or deleted it (a shutdown); a reader then reads that hash.
//!
//! # Tasks
//!
//! - *The publisher*: about once per presence tick ([`TICK`]) it takes this node's changed
//!   contributions (coalesced per channel and member: only the latest value of each) and
//!   writes them in one MULTI (HSET or HDEL, and an XADD, each). Whenever a write failed, or
//!   its heartbeat found its alive key gone (Redis restarted empty, or the others declared
//!   this node dead), it rewrites the hash whole instead (DEL, HSET, the heartbeat, SADD and a
//!   reset entry, in one MULTI); so while Redis is down the queue holds at most one value per
//!   key, and nothing is replayed from it. It refreshes the alive key every [`HEARTBEAT`]
//!   (`SET .. PX .. XX`: a missing key means a rewrite).
//! - *The follower*: on its own connection, `XREAD BLOCK` on the changes stream from its last
//!   ID, skipping this node's own entries, applying the absolute values. At start, after a
//!   lost connection, or when its last ID was trimmed away, it takes a snapshot first: the
//!   stream's top ID, then every live node's hash, each replacing that node's contributions by
//!   their difference (so unchanged members announce nothing), then reads on from that ID.
//!   Every [`CHECK`] it looks at the alive keys of the nodes it holds contributions from (and
//!   of the node set): a node whose key is gone while it is still in the set is dead: its
//!   contributions are dropped (ordinary leaves: they linger, then are announced), its hash
//!   and set entry deleted and a reset entry added for it (idempotent, any node may do it;
//!   the others then drop it at once). A node held but neither alive nor in the set (Redis
//!   lost its data, `FLUSHALL`, a restart without persistence; or another node swept it and
//!   its reset entry is on the way) is given [`ALIVE_TTL`] to write its hash again.
//!
//! # Bounds and choices
//!
//! - A change on one node reaches the watchers of another within about two ticks plus a
//!   round trip to Redis (the publisher's tick, then the other node's tick).
//! - A node that is SIGKILLed (or cut from Redis) stops refreshing its alive key: its members
//!   leave on the other nodes at most [`ALIVE_TTL`] + [`CHECK`] + `--presence-linger` after
//!   its last heartbeat (10 + 2 + 5 s with the defaults). A node that shuts down gracefully
//!   deletes its hash at once: its members leave after the linger.
//! - While Redis is unreachable a node keeps the last remote state it knew (its own
//!   connections still count at once) and takes a fresh snapshot when it is back; a node it
//!   held contributions from and that is missing after such a reconnect is given
//!   [`ALIVE_TTL`] to write its hash again before it counts as dead (after a Redis restart
//!   without persistence every node rewrites its hash within a heartbeat).
//! - `ivy_presence_members` (and every count) is the whole cluster's view: the same on every
//!   node.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::presence::{Contribution, TICK};
use super::{FanOut, LocalPresence, Member, MemberId, PresenceOptions};

/// How long a node's alive key lives without a refresh.
pub const ALIVE_TTL: Duration = Duration::from_secs(10);
/// How often a node refreshes its alive key.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often a node looks for dead nodes.
pub const CHECK: Duration = Duration::from_secs(2);
/// The approximate length the changes stream is trimmed to.
const MAX_CHANGES: usize = 100_000;
/// Entries per XREAD of the follower.
const READ_COUNT: usize = 1024;
/// How long one XREAD of the follower blocks.
const BLOCK: Duration = Duration::from_millis(1000);

const NODES_KEY: &str = "{ivy}:presence:nodes";
const CHANGES_KEY: &str = "{ivy}:presence:changes";

fn node_key(node: &str) -> String {
    format!("{{ivy}}:presence:node:{node}")
}

fn alive_key(node: &str) -> String {
    format!("{{ivy}}:presence:alive:{node}")
}

/// The hash field of a contribution: channel, `\n`, member cursor (a channel has no `\n`).
fn field(channel: &str, member: &MemberId) -> String {
    format!("{channel}\n{}", member.cursor())
}

/// The hash value of a contribution: connections, then `\n` and the info when there is one.
fn value(c: &Contribution) -> String {
    match &c.member.info {
        Some(info) => format!("{}\n{info}", c.conns),
        None => c.conns.to_string(),
    }
}

/// A contribution from a hash field and value (`None`: not one of ours).
fn parse_entry(field: &str, value: &str) -> Option<Contribution> {
    let (channel, cursor) = field.split_once('\n')?;
    let id = MemberId::from_cursor(cursor)?;
    let (conns, info) = match value.split_once('\n') {
        Some((k, info)) => (k, Some(Arc::<str>::from(info))),
        None => (value, None),
    };
    Some(Contribution { channel: channel.into(), member: Member { id, info }, conns: conns.parse().ok()? })
}

/// A stream ID as (ms, seq), to compare.
fn id_pair(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The replicated presence of one node, its tasks, and its goodbye ([`RedisPresence::shutdown`]).
pub(crate) struct RedisPresence {
    view: Arc<LocalPresence>,
    node: String,
    conn: ConnectionManager,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisPresence {
    /// Starts the replicated presence of `node`: `conn` for its writes, `blocking` (a
    /// connection whose response timeout covers [`BLOCK`]) for the follower's reads.
    pub(crate) fn start(
        options: PresenceOptions,
        fanout: Arc<FanOut>,
        node: String,
        conn: ConnectionManager,
        blocking: ConnectionManager,
    ) -> Arc<RedisPresence> {
        let view = LocalPresence::replicated(options, fanout);
        let stop = CancellationToken::new();
        let publisher = Publisher { view: view.clone(), node: node.clone(), conn: conn.clone(), stop: stop.clone(), rewrite: true };
        let follower = Follower {
            view: view.clone(),
            node: node.clone(),
            conn: blocking,
            stop: stop.clone(),
            last: None,
            grace_until: None,
            unlisted: HashMap::new(),
            down: false,
        };
        let tasks = vec![tokio::spawn(publisher.run()), tokio::spawn(follower.run())];
        Arc::new(RedisPresence { view, node, conn, stop, tasks: Mutex::new(tasks) })
    }

    /// The presence this node serves: the whole cluster's.
    pub(crate) fn view(&self) -> Arc<LocalPresence> {
        self.view.clone()
    }

    /// Stops the tasks and deletes this node's hash and keys (a reset entry tells the others):
    /// its members leave everywhere after the linger.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            let _ = t.await;
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(node_key(&self.node))
            .ignore()
            .del(alive_key(&self.node))
            .ignore()
            .srem(NODES_KEY, &self.node)
            .ignore()
            .cmd("XADD")
            .arg(CHANGES_KEY)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAX_CHANGES)
            .arg("*")
            .arg("n")
            .arg(&self.node)
            .arg("t")
            .arg("r")
            .ignore();
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "could not delete this node's presence from Redis; the other nodes drop it once its heartbeat expires");
        }
    }
}

impl Drop for RedisPresence {
    /// An engine dropped without a shutdown: its tasks end (its keys then expire like a dead
    /// node's).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Adds an XADD of `c` by `node` to `pipe`.
fn xadd_set(pipe: &mut redis::Pipeline, node: &str, c: &Contribution) {
    let cmd = pipe.cmd("XADD").arg(CHANGES_KEY).arg("MAXLEN").arg("~").arg(MAX_CHANGES).arg("*");
    cmd.arg("n").arg(node).arg("t").arg("s").arg("c").arg(&*c.channel).arg("m").arg(c.member.id.cursor()).arg("k").arg(c.conns);
    if let Some(info) = &c.member.info {
        cmd.arg("i").arg(&**info);
    }
    cmd.ignore();
}

/// The publisher task: this node's contributions to Redis (see the module docs).
struct Publisher {
    view: Arc<LocalPresence>,
    node: String,
    conn: ConnectionManager,
    stop: CancellationToken,
    /// Whether the hash must be written whole (at start, after a failed write, or when the
    /// alive key was gone).
    rewrite: bool,
}

impl Publisher {
    async fn run(mut self) {
        let mut heartbeat_at = Instant::now() + HEARTBEAT;
        let mut failing = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.stop.cancelled() => return,
            }
            let result = if self.rewrite { self.rewrite().await } else { self.flush().await };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("presence: Redis answers again; this node's presence was written whole");
                        failing = false;
                    }
                }
                Err(e) => {
                    self.rewrite = true;
                    if !failing {
                        tracing::warn!(error = %e, "presence: cannot write this node's presence to Redis; the other nodes see it again once Redis answers");
                        failing = true;
                    }
                    continue;
                }
            }
            if Instant::now() >= heartbeat_at {
                heartbeat_at = Instant::now() + HEARTBEAT;
                if self.rewrite {
                    continue;
                }
                let mut conn = self.conn.clone();
                let set: Result<Option<String>, _> = redis::cmd("SET")
                    .arg(alive_key(&self.node))
                    .arg(1)
                    .arg("PX")
                    .arg(ALIVE_TTL.as_millis() as u64)
                    .arg("XX")
                    .query_async(&mut conn)
                    .await;
                match set {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!(
                            "presence: this node's heartbeat key was gone (Redis restarted, or this node was out of touch for longer than its TTL); writing its presence whole"
                        );
                        self.rewrite = true;
                    }
                    Err(_) => self.rewrite = true,
                }
            }
        }
    }

    /// Writes the changed contributions (one MULTI).
    async fn flush(&mut self) -> redis::RedisResult<()> {
        let changes = self.view.take_local_changes();
        if changes.is_empty() {
            return Ok(());
        }
        let key = node_key(&self.node);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in &changes {
            if c.conns == 0 {
                pipe.hdel(&key, field(&c.channel, &c.member.id)).ignore();
            } else {
                pipe.hset(&key, field(&c.channel, &c.member.id), value(c)).ignore();
            }
            xadd_set(&mut pipe, &self.node, c);
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    /// Writes the hash whole, the heartbeat and a reset entry (one MULTI).
    async fn rewrite(&mut self) -> redis::RedisResult<()> {
        let all = self.view.take_local_all();
        let key = node_key(&self.node);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !all.is_empty() {
            let items: Vec<(String, String)> = all.iter().map(|c| (field(&c.channel, &c.member.id), value(c))).collect();
            pipe.hset_multiple(&key, &items).ignore();
        }
        pipe.cmd("SET").arg(alive_key(&self.node)).arg(1).arg("PX").arg(ALIVE_TTL.as_millis() as u64).ignore();
        pipe.sadd(NODES_KEY, &self.node).ignore();
        pipe.cmd("XADD")
            .arg(CHANGES_KEY)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAX_CHANGES)
            .arg("*")
            .arg("n")
            .arg(&self.node)
            .arg("t")
            .arg("r")
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        self.rewrite = false;
        Ok(())
    }
}

/// The follower task: the other nodes' contributions from Redis (see the module docs).
struct Follower {
    view: Arc<LocalPresence>,
    node: String,
    conn: ConnectionManager,
    stop: CancellationToken,
    /// The last ID of the changes stream applied (`None`: a snapshot is due).
    last: Option<String>,
    /// After a reconnect: until then, a held node whose alive key is missing is not dropped
    /// (it may not have rewritten its hash yet).
    grace_until: Option<Instant>,
    /// Held nodes whose alive key is missing and that are not in the node set either: since
    /// when. Redis lost its data (they write their hash again within a heartbeat) or another
    /// node swept them (its reset entry follows); past [`ALIVE_TTL`] they are dropped anyway.
    unlisted: HashMap<String, Instant>,
    down: bool,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        let mut check_at = Instant::now() + CHECK;
        loop {
            let stop = self.stop.clone();
            if stop.is_cancelled() {
                return;
            }
            let step = async {
                if self.last.is_none() {
                    self.snapshot().await?;
                }
                self.read().await?;
                if Instant::now() >= check_at {
                    check_at = Instant::now() + CHECK;
                    self.check().await?;
                }
                redis::RedisResult::Ok(())
            };
            let result = tokio::select! {
                r = step => r,
                () = stop.cancelled() => return,
            };
            match result {
                Ok(()) => {
                    if self.down {
                        tracing::info!("presence: following the other nodes' presence again");
                        self.down = false;
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    if !self.down {
                        tracing::warn!(error = %e, "presence: lost Redis; keeping the other nodes' presence as last known until it is back");
                        self.down = true;
                    }
                    // A snapshot is due when Redis is back; the nodes held get a TTL to be back.
                    self.last = None;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    self.grace_until = Some(Instant::now() + ALIVE_TTL);
                }
            }
        }
    }

    /// The stream's top ID, then every live node's hash (see the module docs).
    async fn snapshot(&mut self) -> redis::RedisResult<()> {
        let top: StreamRangeReply =
            redis::cmd("XREVRANGE").arg(CHANGES_KEY).arg("+").arg("-").arg("COUNT").arg(1).query_async(&mut self.conn).await?;
        let top = top.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone());
        let nodes: Vec<String> = redis::cmd("SMEMBERS").arg(NODES_KEY).query_async(&mut self.conn).await?;
        let others: Vec<&String> = nodes.iter().filter(|n| **n != self.node).collect();
        if !others.is_empty() {
            let mut pipe = redis::pipe();
            for n in &others {
                pipe.exists(alive_key(n)).hgetall(node_key(n));
            }
            let replies: Vec<Value> = pipe.query_async(&mut self.conn).await?;
            for (n, pair) in others.iter().zip(replies.chunks(2)) {
                let alive: bool = pair.first().map(redis::from_redis_value_ref).and_then(Result::ok).unwrap_or(false);
                if !alive {
                    continue;
                }
                let hash: HashMap<String, String> = pair.get(1).map(redis::from_redis_value_ref).and_then(Result::ok).unwrap_or_default();
                self.view.replace_remote(n, &contributions(&hash));
            }
        }
        tracing::debug!(nodes = others.len(), from = %top, "presence: snapshot of the other nodes' presence");
        self.last = Some(top);
        Ok(())
    }

    /// One XREAD of the changes stream from the last ID, applied.
    async fn read(&mut self) -> redis::RedisResult<()> {
        let Some(last) = self.last.clone() else { return Ok(()) };
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(CHANGES_KEY)
            .arg(&last)
            .query_async(&mut self.conn)
            .await?;
        let entries: Vec<StreamId> = reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
        if entries.len() >= READ_COUNT && self.trimmed_after(&last).await? {
            tracing::warn!(from = %last, "presence: the changes stream was trimmed past this node's position; taking a snapshot");
            self.last = None;
            return self.snapshot().await;
        }
        for e in &entries {
            self.last = Some(e.id.clone());
            let Some(node) = e.get::<String>("n") else { continue };
            if node == self.node {
                continue;
            }
            match e.get::<String>("t").as_deref() {
                Some("s") => {
                    let (Some(channel), Some(cursor), Some(conns)) = (e.get::<String>("c"), e.get::<String>("m"), e.get::<u32>("k")) else {
                        continue;
                    };
                    let Some(id) = MemberId::from_cursor(&cursor) else { continue };
                    let info = e.get::<String>("i").map(Arc::<str>::from);
                    self.view.set_remote(&node, &Contribution { channel: channel.into(), member: Member { id, info }, conns });
                }
                Some("r") => {
                    let hash: HashMap<String, String> = redis::cmd("HGETALL").arg(node_key(&node)).query_async(&mut self.conn).await?;
                    self.view.replace_remote(&node, &contributions(&hash));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether entries after `last` were trimmed away (Redis 7's `max-deleted-entry-id`).
    async fn trimmed_after(&mut self, last: &str) -> redis::RedisResult<bool> {
        let info: HashMap<String, Value> = redis::cmd("XINFO").arg("STREAM").arg(CHANGES_KEY).query_async(&mut self.conn).await?;
        let deleted: Option<String> = info.get("max-deleted-entry-id").map(redis::from_redis_value_ref).and_then(Result::ok);
        Ok(match (deleted.as_deref().and_then(id_pair), id_pair(last)) {
            (Some(deleted), Some(last)) => deleted > last,
            // Without the field (Redis before 7): a snapshot when behind by a whole read.
            _ => true,
        })
    }

    /// Drops the nodes whose alive key is gone (see the module docs).
    async fn check(&mut self) -> redis::RedisResult<()> {
        let held: HashSet<String> = self.view.remote_nodes().into_iter().map(String::from).collect();
        let listed: HashSet<String> = redis::cmd("SMEMBERS").arg(NODES_KEY).query_async(&mut self.conn).await?;
        let mut nodes: Vec<&String> = held.union(&listed).filter(|n| **n != self.node).collect();
        nodes.sort();
        self.unlisted.retain(|n, _| held.contains(n));
        if nodes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for n in &nodes {
            pipe.exists(alive_key(n));
        }
        let alive: Vec<bool> = pipe.query_async(&mut self.conn).await?;
        let now = Instant::now();
        let graced = self.grace_until.is_some_and(|t| now < t);
        let mut dead = Vec::new();
        for (n, alive) in nodes.into_iter().zip(alive) {
            if alive {
                self.unlisted.remove(n);
                continue;
            }
            if held.contains(n) {
                if graced {
                    continue;
                }
                if !listed.contains(n) {
                    // Not an expiry seen first here: Redis lost its data, or another node swept
                    // it (then its reset entry comes); wait a TTL for it to write again.
                    let since = *self.unlisted.entry(n.clone()).or_insert(now);
                    if now < since + ALIVE_TTL {
                        continue;
                    }
                }
                tracing::info!(node = %n, "presence: a node's heartbeat expired; its members leave (after the linger)");
                self.view.drop_remote(n);
                self.unlisted.remove(n);
            }
            dead.push(n.clone());
        }
        if !dead.is_empty() {
            // Deleted, and a reset entry for each: every other node then drops it at once.
            let mut pipe = redis::pipe();
            pipe.atomic();
            for n in &dead {
                pipe.del(node_key(n)).ignore().srem(NODES_KEY, n).ignore();
                pipe.cmd("XADD")
                    .arg(CHANGES_KEY)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_CHANGES)
                    .arg("*")
                    .arg("n")
                    .arg(n)
                    .arg("t")
                    .arg("r")
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.conn).await?;
        }
        Ok(())
    }
}

/// The contributions of a node's hash (fields that are not one are skipped).
fn contributions(hash: &HashMap<String, String>) -> Vec<Contribution> {
    hash.iter().filter_map(|(f, v)| parse_entry(f, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_entries_round_trip() {
        for c in [
            Contribution { channel: "/chat/a".into(), member: Member { id: MemberId::Sub("a\nb=c".into()), info: None }, conns: 2 },
            Contribution {
                channel: "/".into(),
                member: Member { id: MemberId::Anon(0xabc), info: Some("{\"n\":\"x\\ny\"}".into()) },
                conns: 1,
            },
        ] {
            assert_eq!(parse_entry(&field(&c.channel, &c.member.id), &value(&c)), Some(c));
        }
        assert_eq!(parse_entry("no-newline", "1"), None);
        assert_eq!(parse_entry("/a\n=x", "many"), None);
        assert!(id_pair("12-3") > id_pair("9-100"));
    }
}
