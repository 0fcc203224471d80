//! The Redis engine's channel listing, token revocations and admin commands across nodes
//! (`docs/PROTOCOL.md` 9.14 and 9.15), beside the writer and the reader of the log.
//!
//! # Keys
//!
//! - `{ivy}:paths`: a SORTED SET, every score 0, of the channels that have a log (each channel
//!   an event was sent to, and its ancestors but the root); the publish script adds them
//!   (ZADD). `GET /channels` reads the page's range of it (ZRANGEBYLEX, byte order of paths)
//!   and, pipelined, each listed channel's newest visible event (`XREVRANGE {ivy}:log:<path>
//!   <until> - COUNT 1`); a channel whose log is empty (every event deleted) is skipped and the
//!   page fills on from the range (reading twice as many each step past such channels), and
//!   it leaves the set (a script removes it if its log is still empty: a send re-adds it). A node of an earlier version kept the SET
//!   `{ivy}:channels` instead: a node copies it into `{ivy}:paths` when it opens (while a
//!   node of the earlier version still runs, the channels it alone creates are listed once a
//!   newer node opened after them; delete the old SET once none runs).
//! - `{ivy}:revoked`: a HASH, `jti` → until (seconds since the Unix epoch), of the token
//!   revocations. A node loads it at open, dropping (HDEL) those expired; `POST /admin/revoke`
//!   sets the field and adds a `revoke` command to the control stream in one script, and
//!   answers once Redis did (as durable as Redis's persistence).
//! - `{ivy}:control`: a STREAM of the admin commands every node applies (XADD `MAXLEN ~
//!   10000`), each entry with `k` (`revoke`, with `j` the jti and `u` the until, or
//!   `disconnect`, with `s` the sub) and `o`, the tag of the node that made it.
//!
//! # Commands across nodes
//!
//! Each node follows the control stream with its own connection (`XREAD BLOCK`), from its
//! newest entry at open (read atomically with the revocations loaded then, so that none made
//! meanwhile is missed), and hands the commands of the other nodes to the server
//! ([`crate::engine::Engine::control`]), which applies them as its admin endpoints do: a
//! revoked token is refused at the handshake, at an in-band refresh and on HTTP and its
//! connections are closed with 4003; a disconnected sub's connections are closed with 4004. A
//! node's own commands were applied when it made them.
//!
//! After a lost connection the node reads `{ivy}:revoked` again (no revocation is missed,
//! also one whose entry the stream dropped meanwhile) and resumes the stream after its last
//! entry. A `disconnect` older than [`STALE_DISCONNECT`] (by Redis's clock, when the node got
//! back) is skipped: it would close a user who reconnected since.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{BLOCK, BoxFuture, ROOT, Shared, bytes_of, entries, id_of, io_err, log_key};
use crate::engine::{ChannelsRequest, Control, Revocation, StoredChannel};

/// The channels that have a log (see the module docs).
pub(super) const PATHS_KEY: &str = "{ivy}:paths";
/// The SET of channels of earlier versions, copied into [`PATHS_KEY`] at open.
const OLD_CHANNELS_KEY: &str = "{ivy}:channels";
/// The token revocations: `jti` → until.
const REVOKED_KEY: &str = "{ivy}:revoked";
/// The stream of admin commands.
const CONTROL_KEY: &str = "{ivy}:control";
/// About how many commands the stream keeps.
const CONTROL_MAXLEN: usize = 10_000;
/// Most channels looked up in one step of a listing.
const LIST_CHUNK: usize = 1000;
/// Most commands one XREAD of the follower returns.
const CONTROL_COUNT: usize = 256;
/// How old a disconnect read after a lost connection may be to be applied still.
pub const STALE_DISCONNECT: Duration = Duration::from_secs(30);
/// How many commands wait for the server before the follower waits.
const QUEUE: usize = 1024;

/// Sets a revocation and tells the other nodes, atomically. KEYS: the revocations, the
/// control stream. ARGV: the jti, the until, the node's tag, the stream's length bound.
const REVOKE: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'k', 'revoke', 'j', ARGV[1], 'u', ARGV[2], 'o', ARGV[3])
return 1
"#;

/// What a node reads when it opens (within [`super::RedisEngine`]'s open), synchronously.
#[derive(Debug)]
pub(super) struct Loaded {
    /// The revocations in force.
    revocations: Vec<Revocation>,
    /// The control stream's newest entry then (`0-0` when empty): the follower starts after it.
    top: String,
}

/// Reads the revocations in force at `now` and the control stream's position (atomically),
/// drops the expired revocations, and copies an earlier version's channel SET.
pub(super) fn load(conn: &mut redis::Connection, now: u64) -> io::Result<Loaded> {
    copy_old_channels(conn)?;
    let (top, all): (Value, Vec<(String, String)>) = redis::pipe()
        .atomic()
        .cmd("XREVRANGE")
        .arg(CONTROL_KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .cmd("HGETALL")
        .arg(REVOKED_KEY)
        .query(conn)
        .map_err(io_err)?;
    let top = first_id(top).unwrap_or_else(|| "0-0".into());
    let (revocations, expired) = split_expired(all, now);
    if !expired.is_empty() {
        let _: () = redis::cmd("HDEL").arg(REVOKED_KEY).arg(&expired).query(conn).map_err(io_err)?;
    }
    Ok(Loaded { revocations, top })
}

/// The revocations of `{ivy}:revoked` in force at `now`, and the jtis of the others (expired,
/// or not a number: neither is refused).
fn split_expired(all: Vec<(String, String)>, now: u64) -> (Vec<Revocation>, Vec<String>) {
    let mut live = Vec::new();
    let mut expired = Vec::new();
    for (jti, until) in all {
        match until.parse::<u64>() {
            Ok(until) if until > now => live.push(Revocation { jti: jti.into(), until }),
            Ok(_) => expired.push(jti),
            Err(_) => {
                tracing::warn!(jti = %jti, until = %until, "a revocation in Redis has no valid until; dropped");
                expired.push(jti);
            }
        }
    }
    (live, expired)
}

/// Copies the members of an earlier version's `{ivy}:channels` SET into `{ivy}:paths` (a
/// step per thousand members; nothing when there is no such SET).
fn copy_old_channels(conn: &mut redis::Connection) -> io::Result<()> {
    let exists: bool = redis::cmd("EXISTS").arg(OLD_CHANNELS_KEY).query(conn).map_err(io_err)?;
    if !exists {
        return Ok(());
    }
    let mut cursor = 0u64;
    let mut copied = 0usize;
    loop {
        let (next, members): (u64, Vec<String>) =
            redis::cmd("SSCAN").arg(OLD_CHANNELS_KEY).arg(cursor).arg("COUNT").arg(1000).query(conn).map_err(io_err)?;
        if !members.is_empty() {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(PATHS_KEY);
            for m in &members {
                zadd.arg(0).arg(m);
            }
            let _: () = zadd.query(conn).map_err(io_err)?;
            copied += members.len();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    tracing::info!(channels = copied, "copied the channel set of an earlier version ({OLD_CHANNELS_KEY}) into {PATHS_KEY}");
    Ok(())
}

/// The first entry's ID of an XRANGE/XREVRANGE reply.
fn first_id(reply: Value) -> Option<String> {
    let Value::Array(items) = reply else { return None };
    let Value::Array(pair) = items.into_iter().next()? else { return None };
    let id = bytes_of(pair.into_iter().next()?);
    String::from_utf8(id).ok()
}

/// The engine's part of the admin commands: the revocations loaded at open and the commands
/// of the other nodes, until the server takes them.
pub(super) struct Admin {
    revocations: Mutex<Vec<Revocation>>,
    commands: Mutex<Option<mpsc::Receiver<Control>>>,
}

impl Admin {
    /// Starts following the control stream on `conn` (a connection of its own: it blocks).
    pub(super) fn start(shared: Arc<Shared>, conn: ConnectionManager, loaded: Loaded) -> Admin {
        let (tx, rx) = mpsc::channel(QUEUE);
        let follower = Follower { shared, conn, last: loaded.top, tx, stale_before_ms: 0, down: false };
        tokio::spawn(follower.run());
        Admin { revocations: Mutex::new(loaded.revocations), commands: Mutex::new(Some(rx)) }
    }

    /// [`crate::engine::Engine::revocations`]: those loaded at open, in force at `now`.
    pub(super) fn revocations(&self, now: u64) -> Vec<Revocation> {
        let mut loaded = self.revocations.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *loaded).into_iter().filter(|r| r.until > now).collect()
    }

    /// [`crate::engine::Engine::control`]: the commands of the other nodes (once).
    pub(super) fn commands(&self) -> Option<mpsc::Receiver<Control>> {
        self.commands.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// [`crate::engine::Engine::revoke`]: sets the revocation and tells the other nodes (one
/// script); resolves once Redis answered.
pub(super) fn revoke(shared: &Shared, revocation: Revocation) -> BoxFuture<'static, io::Result<()>> {
    let mut conn = shared.conn.clone();
    let node = shared.node.clone();
    Box::pin(async move {
        let _: i64 = redis::Script::new(REVOKE)
            .key(REVOKED_KEY)
            .key(CONTROL_KEY)
            .arg(&*revocation.jti)
            .arg(revocation.until)
            .arg(&node)
            .arg(CONTROL_MAXLEN)
            .invoke_async(&mut conn)
            .await
            .map_err(io_err)?;
        Ok(())
    })
}

/// [`crate::engine::Engine::broadcast`]: adds the command to the control stream.
pub(super) fn broadcast(shared: &Shared, control: Control) -> BoxFuture<'static, io::Result<()>> {
    let mut conn = shared.conn.clone();
    let mut xadd = redis::cmd("XADD");
    xadd.arg(CONTROL_KEY).arg("MAXLEN").arg("~").arg(CONTROL_MAXLEN).arg("*");
    match &control {
        Control::Revoke(r) => xadd.arg("k").arg("revoke").arg("j").arg(&*r.jti).arg("u").arg(r.until),
        Control::Disconnect { sub } => xadd.arg("k").arg("disconnect").arg("s").arg(&**sub),
    };
    xadd.arg("o").arg(&shared.node);
    Box::pin(async move {
        let _: Value = xadd.query_async(&mut conn).await.map_err(io_err)?;
        Ok(())
    })
}

/// [`crate::engine::Engine::channels`] (see the module docs).
pub(super) async fn channels(mut conn: ConnectionManager, request: ChannelsRequest) -> io::Result<Vec<StoredChannel>> {
    let mut out = Vec::new();
    if request.limit == 0 {
        return Ok(out);
    }
    let until = id_of(request.until);
    let prefix = &*request.prefix;
    // The prefix itself first (the root too, which the set does not hold), as on sled.
    if request.wants(prefix) {
        let mut newest: Vec<Value> = redis::pipe()
            .cmd("XREVRANGE")
            .arg(log_key(prefix))
            .arg(&until)
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(io_err)?;
        if let Some(ts) = newest.pop().and_then(|v| entries(v).first().map(|e| e.ts)) {
            out.push(StoredChannel { path: prefix.into(), newest: ts });
        }
    }
    // Below it: the set's members from `prefix/` up to (not including) `prefix0` ('0' follows
    // '/' in byte order), every member below the root.
    let below = if prefix == ROOT { ROOT.to_string() } else { format!("{prefix}/") };
    let end = if prefix == ROOT { "+".to_string() } else { format!("({prefix}0") };
    let mut min = match request.after.as_deref() {
        Some(after) if after >= below.as_str() => format!("({after}"),
        _ => format!("[{below}"),
    };
    // Past channels without visible events, each step reads twice as many (a page of one
    // behind thousands of emptied channels takes a few steps, not thousands).
    let mut step = 1;
    while out.len() < request.limit {
        let chunk = (request.limit - out.len()).max(step).min(LIST_CHUNK);
        let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(PATHS_KEY)
            .arg(&min)
            .arg(&end)
            .arg("LIMIT")
            .arg(0)
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .map_err(io_err)?;
        if members.is_empty() {
            break;
        }
        let mut pipe = redis::pipe();
        for m in &members {
            pipe.cmd("XREVRANGE").arg(log_key(m)).arg(&until).arg("-").arg("COUNT").arg(1);
        }
        let newest: Vec<Value> = pipe.query_async(&mut conn).await.map_err(io_err)?;
        let mut empty = Vec::new();
        for (path, reply) in members.iter().zip(newest) {
            // A channel whose events are all deleted, or not visible yet, is skipped.
            match entries(reply).first() {
                Some(e) if out.len() < request.limit => out.push(StoredChannel { path: path.as_str().into(), newest: e.ts }),
                Some(_) => break,
                None => empty.push(path),
            }
        }
        if !empty.is_empty() {
            step = (chunk * 2).min(LIST_CHUNK);
            // Those whose log is empty now leave the index (checked in the script: a send
            // meanwhile keeps it), so that the next listings do not look at them again.
            let script = redis::Script::new(PRUNE);
            let mut prune = script.prepare_invoke();
            prune.key(PATHS_KEY);
            for path in empty {
                prune.arg(path);
            }
            let pruned: Result<u64, _> = prune.invoke_async(&mut conn).await;
            if let Err(e) = pruned {
                tracing::warn!(error = %e, "removing emptied channels from the channel index failed; they are skipped meanwhile");
            }
        }
        if members.len() < chunk {
            break;
        }
        if let Some(last) = members.last() {
            min = format!("({last}");
        }
    }
    Ok(out)
}

/// Removes from the channel index those of ARGV whose log is empty. KEYS: the index.
const PRUNE: &str = r#"
local n = 0
for _, path in ipairs(ARGV) do
  if redis.call('XLEN', '{ivy}:log:' .. path) == 0 then
    redis.call('ZREM', KEYS[1], path)
    n = n + 1
  end
end
return n
"#;

/// One command of the control stream.
#[derive(Debug, Default)]
struct Command {
    id: String,
    kind: Vec<u8>,
    jti: Vec<u8>,
    until: Vec<u8>,
    sub: Vec<u8>,
    origin: Vec<u8>,
}

impl Command {
    /// The milliseconds of its ID (Redis's clock when it was added).
    fn ms(&self) -> u64 {
        self.id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
    }

    /// What to apply, if it is a well-formed command.
    fn control(&self) -> Option<Control> {
        let text = |b: &[u8]| std::str::from_utf8(b).ok().filter(|s| !s.is_empty()).map(Box::<str>::from);
        match self.kind.as_slice() {
            b"revoke" => {
                let until = std::str::from_utf8(&self.until).ok()?.parse().ok()?;
                Some(Control::Revoke(Revocation { jti: text(&self.jti)?, until }))
            }
            b"disconnect" => Some(Control::Disconnect { sub: text(&self.sub)? }),
            _ => None,
        }
    }
}

/// The commands of an XREAD reply on the control stream, in order.
fn commands(reply: Value) -> Vec<Command> {
    let streams: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for stream in streams {
        super::each_entry(stream, |id, fields| {
            let Ok(id) = String::from_utf8(id) else { return };
            let mut c = Command { id, ..Command::default() };
            for (k, v) in fields {
                match k.as_slice() {
                    b"k" => c.kind = bytes_of(v),
                    b"j" => c.jti = bytes_of(v),
                    b"u" => c.until = bytes_of(v),
                    b"s" => c.sub = bytes_of(v),
                    b"o" => c.origin = bytes_of(v),
                    _ => {}
                }
            }
            out.push(c);
        });
    }
    out
}

/// The task that follows the control stream (see the module docs).
struct Follower {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    /// The ID of the last entry read.
    last: String,
    tx: mpsc::Sender<Control>,
    /// Disconnects added before this (Redis's milliseconds) are stale.
    stale_before_ms: u64,
    /// Whether the connection was lost since the last answer.
    down: bool,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(CONTROL_COUNT).arg("BLOCK").arg(BLOCK.as_millis() as u64).arg("STREAMS").arg(CONTROL_KEY).arg(&self.last);
            let read = cmd.query_async::<Value>(&mut self.conn);
            let reply = tokio::select! {
                r = read => r,
                _ = self.shared.stop.cancelled() => return,
            };
            let result = match reply {
                Ok(reply) if self.down => match self.resync().await {
                    Ok(()) => Ok(reply),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match result {
                Ok(reply) => {
                    backoff = Duration::from_millis(50);
                    for c in commands(reply) {
                        self.last.clone_from(&c.id);
                        if c.origin == self.shared.node.as_bytes() {
                            continue;
                        }
                        let Some(control) = c.control() else {
                            tracing::warn!(id = %c.id, "an entry of {CONTROL_KEY} is not a command this node knows; skipped");
                            continue;
                        };
                        if matches!(control, Control::Disconnect { .. }) && c.ms() < self.stale_before_ms {
                            tracing::info!(id = %c.id, "a disconnect made while this node could not reach Redis is too old to apply; skipped");
                            continue;
                        }
                        if self.tx.send(control).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !self.down {
                        tracing::warn!(error = %e, "lost the connection to Redis that follows the admin commands of the other nodes; reconnecting");
                        self.down = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shared.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Back after a lost connection: applies every revocation in force (one whose command
    /// this node missed included) and marks older disconnects stale.
    async fn resync(&mut self) -> Result<(), redis::RedisError> {
        let ((secs, micros), all): ((u64, u64), Vec<(String, String)>) =
            redis::pipe().atomic().cmd("TIME").cmd("HGETALL").arg(REVOKED_KEY).query_async(&mut self.conn).await?;
        let now_ms = secs * 1000 + micros / 1000;
        self.stale_before_ms = now_ms.saturating_sub(STALE_DISCONNECT.as_millis() as u64);
        let (live, _) = split_expired(all, secs);
        let n = live.len();
        for r in live {
            if self.tx.send(Control::Revoke(r)).await.is_err() {
                break;
            }
        }
        self.down = false;
        tracing::info!(
            revocations = n,
            "the connection that follows the admin commands of the other nodes is back; revocations read again"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_and_invalid_revocations_are_dropped() {
        let all = vec![("a".to_string(), "20".to_string()), ("b".into(), "5".into()), ("c".into(), "x".into())];
        let (live, expired) = split_expired(all, 10);
        assert_eq!(live, vec![Revocation { jti: "a".into(), until: 20 }]);
        assert_eq!(expired, vec!["b".to_string(), "c".into()]);
    }

    #[test]
    fn commands_parse_and_unknown_ones_are_none() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, f: &[&str]| Value::Array(vec![bulk(id), Value::Array(f.iter().map(|s| bulk(s)).collect())]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(CONTROL_KEY),
            Value::Array(vec![
                entry("1700000000000-0", &["k", "revoke", "j", "t1", "u", "99", "o", "n1"]),
                entry("1700000000001-0", &["k", "disconnect", "s", "ada", "o", "n2"]),
                entry("1700000000002-0", &["k", "reboot", "o", "n2"]),
                entry("1700000000003-0", &["k", "revoke", "j", "t2", "u", "soon", "o", "n2"]),
            ]),
        ])]);
        let cs = commands(reply);
        assert_eq!(cs.len(), 4);
        assert_eq!(cs[0].control(), Some(Control::Revoke(Revocation { jti: "t1".into(), until: 99 })));
        assert_eq!((cs[0].origin.as_slice(), cs[0].ms()), (&b"n1"[..], 1_700_000_000_000));
        assert_eq!(cs[1].control(), Some(Control::Disconnect { sub: "ada".into() }));
        assert_eq!((cs[2].control(), cs[3].control()), (None, None));
    }
}
