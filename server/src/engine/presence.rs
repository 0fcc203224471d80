//! Presence: who is subscribed where (`docs/PROTOCOL.md` 5.10, 6.5 and 9.13), behind the
//! engine seam ([`crate::engine::Engine::presence`]).
//!
//! **Model.** Every subscription of a connection makes its *member* present in that channel: a
//! token's `sub` (several connections of one `sub` are one member, with `conns` the number of
//! them subscribed there), or, for a connection without a token, an id of its own
//! ([`MemberId::Anon`]). State is kept per channel (channel -> member -> conns, info); the
//! presence of a path P is the union over P's subtree, kept incrementally in a per-path
//! aggregate (member -> the number of channels of P's subtree it is in, and its connections
//! there), so that a count is a map's length and a page of members a range of a sorted map,
//! never a walk of the subtree.
//!
//! **Linger.** When a member's last connection subscribed at C goes (a close, a drop, an
//! unsubscribe), it stays present at C, with 0 connections, for [`PresenceOptions::linger`];
//! a connection of the same member subscribing at C again within it changes nothing that is
//! announced. Deadlines are kept in one queue in their order (the linger is one duration for
//! the whole server), popped by the presence tick.
//!
//! **Watchers and lines.** A connection that watches P (`~+P`) gets a snapshot of P (one `^=`
//! line per channel of P's subtree that has members, then `^.P`), then the changes of every
//! channel at or below P (`^~` lines). Changes are coalesced per channel during a tick
//! ([`TICK`], 100 ms): a join and a leave of one member within a tick cancel out, and each
//! changed channel gives one line per tick, built once and shared by every watcher that gets
//! it (the bytes are reference-counted), each watcher getting it once even when it watches
//! several ancestors of the channel. Above [`PresenceOptions::max_list`] members a channel's
//! lines carry counts only. A new watch is answered at the next tick, after that tick's changes
//! went to the older watchers: its snapshot is then exactly the state those changes lead to,
//! and every later change reaches it (no gap, no change it already saw); the snapshot lines of
//! one tick are shared too (a join storm of N members watching one room builds the room's
//! snapshot once per tick, not N times).
//!
//! **Cost.** A join or a leave updates the channel's entry and one aggregate entry per level
//! of its path (O(depth · log members)), under one lock; the tick's work is one line per
//! changed channel plus one queue push per watcher that gets it.
//!
//! **Not persisted.** Presence is the state of the live connections: after a restart it is
//! empty and fills up again as clients reconnect and subscribe.
//!
//! **Several nodes.** The Redis engine keeps a *replicated view* in a [`LocalPresence`]
//! (`LocalPresence::replicated`): its own connections' joins and leaves as here, plus the
//! other nodes' contributions (per node, channel and member: that node's connections of the
//! member there), set to absolute values; a member's connections are the sum, so the linger,
//! the ticks and the watchers are the same. Its own contributions are kept apart, to be
//! published (`engine::redis_presence`: keys, tasks, the bound for a dead node's members);
//! the sled and memory engines never keep them.

use std::collections::hash_map::Entry as HashEntry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use ivy_client_core::path::{self, ancestors};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::conn::{Conn, ReplySlot, close_code};
use crate::engine::{ConnId, FanOut};
use crate::session::ack_line;

/// How often changes are sent: one `^~` line per changed channel per tick.
pub const TICK: Duration = Duration::from_millis(100);

/// The longest `info` claim, as compact JSON.
pub const MAX_INFO_BYTES: usize = 1024;

/// Presence settings (`--presence-linger`, `--presence-max-list`) and where it counts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PresenceOptions {
    /// How long a member whose last connection left a channel stays present there.
    pub linger: Duration,
    /// Above this many members, a channel's lines carry counts only.
    pub max_list: usize,
    /// Presence lines queued for connections (`ivy_presence_lines_total`).
    pub lines: Counter,
}

impl PresenceOptions {
    /// The options, lines counted in `lines`.
    pub fn new(linger: Duration, max_list: usize, lines: Counter) -> PresenceOptions {
        PresenceOptions { linger, max_list, lines }
    }
}

impl Default for PresenceOptions {
    fn default() -> PresenceOptions {
        PresenceOptions::new(Duration::from_secs(5), 1000, Counter::default())
    }
}

/// Who a member is. Token members sort before anonymous ones, each by their id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberId {
    /// A token's `sub`.
    Sub(Arc<str>),
    /// A connection without a token: a random id of its own (16 hex digits on the wire).
    Anon(u64),
}

impl MemberId {
    /// A fresh anonymous id.
    pub fn anonymous() -> MemberId {
        let id = getrandom::u64().unwrap_or_else(|_| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
        });
        MemberId::Anon(id)
    }

    /// The paging cursor of `GET /presence` after this member: `=sub` or `-hex`.
    pub fn cursor(&self) -> String {
        match self {
            MemberId::Sub(s) => format!("={s}"),
            MemberId::Anon(a) => format!("-{a:016x}"),
        }
    }

    /// The member a cursor names (`None`: not a cursor).
    pub fn from_cursor(cursor: &str) -> Option<MemberId> {
        match cursor.split_at_checked(1)? {
            ("=", sub) if !sub.is_empty() => Some(MemberId::Sub(sub.into())),
            ("-", hex) if hex.len() == 16 => u64::from_str_radix(hex, 16).ok().map(MemberId::Anon),
            _ => None,
        }
    }

    /// Appends `"sub":"..."` or `"anon":"..."`.
    fn write_json(&self, out: &mut String) {
        match self {
            MemberId::Sub(s) => {
                out.push_str("\"sub\":");
                json_string(s, out);
            }
            MemberId::Anon(a) => {
                let _ = write!(out, "\"anon\":\"{a:016x}\"");
            }
        }
    }
}

/// A connection's member: its id and public info (the token's `info` claim, compact JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Who.
    pub id: MemberId,
    /// The `info` claim, a JSON object as compact text.
    pub info: Option<Arc<str>>,
}

/// One member of a path's presence ([`Presence::members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Who.
    pub id: MemberId,
    /// Its info (of its most recent connection).
    pub info: Option<Arc<str>>,
    /// Its connections subscribed in the subtree (0 while it lingers).
    pub conns: u32,
}

impl MemberView {
    /// The member as a JSON object: `{"sub":..,"info":..,"conns":k}`.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        write_member(&self.id, self.info.as_deref(), Some(self.conns), &mut out);
        out
    }
}

/// A page of a path's members ([`Presence::members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    /// The distinct members of the path's subtree.
    pub count: usize,
    /// Members in key order after the cursor.
    pub members: Vec<MemberView>,
    /// The cursor of the next page, when there are more.
    pub next: Option<String>,
}

/// A watch asked for by `~+P`, answered at the next tick: the snapshot lines, then the
/// subscription (its reply `#key#@position` last), then `done`.
#[derive(Debug)]
pub struct Watch {
    pub(crate) conn: Arc<Conn>,
    pub(crate) path: Box<str>,
    pub(crate) ack: Option<Box<[u8]>>,
    pub(crate) slot: ReplySlot,
    pub(crate) done: oneshot::Sender<()>,
}

/// Presence state behind the engine seam (see the [module docs](self)).
pub trait Presence: Send + Sync + 'static {
    /// `conn` (of `member`) subscribed at `channel`: idempotent per connection and channel.
    fn join(&self, conn: ConnId, channel: &str, member: &Member);
    /// `conn` unsubscribed from `channel` (idempotent); the member's leave lingers.
    fn leave(&self, conn: ConnId, channel: &str);
    /// `conn` closed: all its presence leaves (lingering) and its watches end.
    fn disconnect(&self, conn: ConnId);
    /// `conn` changed member (it took a token in-band): it leaves as the old one, joins as
    /// `member`, everywhere it is subscribed.
    fn rekey(&self, conn: ConnId, member: &Member);
    /// The distinct members of `path`'s subtree, from a counter.
    fn count(&self, path: &str) -> usize;
    /// Up to `limit` members of `path`'s subtree after `after`, in key order.
    fn members(&self, path: &str, after: Option<&MemberId>, limit: usize) -> MembersPage;
    /// Registers a watch, answered at the next tick.
    fn watch(&self, watch: Watch);
    /// `conn` stops watching `path` (idempotent).
    fn unwatch(&self, conn: ConnId, path: &str);
    /// The snapshot lines of `path` now (`^=` lines, then `^.`), for `~?`.
    fn query(&self, path: &str) -> Vec<Utf8Bytes>;
    /// Members summed over channels (`ivy_presence_members`).
    fn members_total(&self) -> usize;
}

/// The in-process presence of the sled and memory engines (see the [module docs](self)).
#[derive(Debug)]
pub struct LocalPresence {
    state: Mutex<State>,
    fanout: Arc<FanOut>,
    options: PresenceOptions,
}

#[derive(Debug, Default)]
struct State {
    /// Paths with members in their subtree.
    nodes: BTreeMap<Box<str>, Node>,
    /// The connections present somewhere or watching: their member and channels.
    conns: HashMap<ConnId, ConnState>,
    /// Changes since the last tick, per channel.
    pending: HashMap<Box<str>, BTreeMap<MemberId, Change>>,
    /// Linger deadlines in order: (deadline, channel, member, generation).
    lingering: VecDeque<(Instant, Box<str>, MemberId, u64)>,
    generation: u64,
    /// Watchers per path.
    watchers: HashMap<Box<str>, Watchers>,
    /// Watches to answer at the next tick.
    new_watches: Vec<Watch>,
    /// Members summed over channels.
    total: usize,
    /// The other nodes' contributions, when replicated ([`LocalPresence::replicated`]): per
    /// node, (channel, member) -> that node's connections of the member there (never 0).
    remote: HashMap<Box<str>, HashMap<Key, u32>>,
    /// This node's own contributions and which changed, when replicated.
    outbox: Option<Outbox>,
}

/// A member at a channel.
type Key = (Box<str>, MemberId);

/// This node's own contributions, kept apart from the remote ones so that they can be
/// published (only when replicated: the sled and memory engines never pay for it).
#[derive(Debug, Default)]
struct Outbox {
    /// (channel, member) -> this node's connections of the member there, and its info.
    local: HashMap<Key, (u32, Option<Arc<str>>)>,
    /// The keys whose value changed since they were last taken.
    dirty: HashSet<(Box<str>, MemberId)>,
}

/// One node's contribution to a channel's presence: its connections of `member` at `channel`
/// (0: none), an absolute value (applying it twice changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Contribution {
    pub(crate) channel: Box<str>,
    pub(crate) member: Member,
    pub(crate) conns: u32,
}

#[derive(Debug)]
struct ConnState {
    member: Member,
    channels: HashSet<Box<str>>,
    watching: Vec<Box<str>>,
}

#[derive(Debug, Default)]
struct Node {
    /// Members subscribed at this very channel.
    direct: BTreeMap<MemberId, Entry>,
    /// Members of the subtree (this channel included).
    subtree: BTreeMap<MemberId, Agg>,
}

#[derive(Debug)]
struct Entry {
    conns: u32,
    info: Option<Arc<str>>,
    /// The generation of its linger, while it lingers.
    linger: Option<u64>,
}

#[derive(Debug)]
struct Agg {
    /// Channels of the subtree where the member is present.
    channels: u32,
    conns: u32,
    info: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
enum Change {
    Joined(Option<Arc<str>>),
    Left,
}

/// A path's watching connections: a vector to deliver to, indexed for O(1) removal.
#[derive(Debug, Default)]
struct Watchers {
    conns: Vec<Arc<Conn>>,
    at: HashMap<ConnId, usize>,
}

impl Watchers {
    fn insert(&mut self, conn: &Arc<Conn>) {
        if let HashEntry::Vacant(e) = self.at.entry(conn.id()) {
            e.insert(self.conns.len());
            self.conns.push(conn.clone());
        }
    }

    fn remove(&mut self, id: ConnId) {
        let Some(i) = self.at.remove(&id) else { return };
        self.conns.swap_remove(i);
        if let Some(moved) = self.conns.get(i) {
            self.at.insert(moved.id(), i);
        }
    }
}

impl LocalPresence {
    /// Presence with `options`, whose watches subscribe on `fanout`; its tick runs on the
    /// current tokio runtime for as long as the presence lives.
    pub fn start(options: PresenceOptions, fanout: Arc<FanOut>) -> Arc<LocalPresence> {
        let presence = Arc::new(LocalPresence { state: Mutex::default(), fanout, options });
        let weak: Weak<LocalPresence> = Arc::downgrade(&presence);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut interval = tokio::time::interval(TICK);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    let Some(p) = weak.upgrade() else { return };
                    p.tick(Instant::now());
                }
            });
        }
        presence
    }

    /// Presence whose state is the whole cluster's: this node's connections (as
    /// [`LocalPresence::start`]) plus the other nodes' contributions, set with
    /// [`LocalPresence::set_remote`] and friends; this node's own contributions are kept
    /// apart for [`LocalPresence::take_local_changes`] (the Redis engine's replicated view,
    /// `engine::redis_presence`).
    pub(crate) fn replicated(options: PresenceOptions, fanout: Arc<FanOut>) -> Arc<LocalPresence> {
        let presence = LocalPresence::start(options, fanout);
        presence.lock().outbox = Some(Outbox::default());
        presence
    }

    /// This node's contributions that changed since the last call, as absolute values.
    pub(crate) fn take_local_changes(&self) -> Vec<Contribution> {
        let mut st = self.lock();
        let Some(out) = st.outbox.as_mut() else { return Vec::new() };
        let dirty = std::mem::take(&mut out.dirty);
        dirty
            .into_iter()
            .map(|(channel, id)| {
                let (conns, info) = out.local.get(&(channel.clone(), id.clone())).cloned().unwrap_or((0, None));
                Contribution { channel, member: Member { id, info }, conns }
            })
            .collect()
    }

    /// All of this node's contributions (the changes not taken yet are in them: they are
    /// marked taken).
    pub(crate) fn take_local_all(&self) -> Vec<Contribution> {
        let mut st = self.lock();
        let Some(out) = st.outbox.as_mut() else { return Vec::new() };
        out.dirty.clear();
        out.local
            .iter()
            .map(|((channel, id), (conns, info))| Contribution {
                channel: channel.clone(),
                member: Member { id: id.clone(), info: info.clone() },
                conns: *conns,
            })
            .collect()
    }

    /// Sets `node`'s contribution to an absolute value: a member's connections at a channel
    /// are this node's plus every other node's, it joins when that sum leaves 0 and lingers
    /// when it reaches 0, exactly as with this node's own joins and leaves.
    pub(crate) fn set_remote(&self, node: &str, c: &Contribution) {
        let linger = self.options.linger;
        self.lock().set_remote(node, c, linger);
    }

    /// Replaces all of `node`'s contributions by `all` (a snapshot of its hash): only the
    /// differences change anything, so unchanged members announce nothing.
    pub(crate) fn replace_remote(&self, node: &str, all: &[Contribution]) {
        let linger = self.options.linger;
        let mut st = self.lock();
        let keep: HashSet<(&str, &MemberId)> = all.iter().filter(|c| c.conns > 0).map(|c| (&*c.channel, &c.member.id)).collect();
        let gone: Vec<(Box<str>, MemberId)> =
            st.remote.get(node).map(|m| m.keys().filter(|(ch, id)| !keep.contains(&(&**ch, id))).cloned().collect()).unwrap_or_default();
        for (channel, id) in gone {
            st.set_remote(node, &Contribution { channel, member: Member { id, info: None }, conns: 0 }, linger);
        }
        for c in all {
            st.set_remote(node, c, linger);
        }
    }

    /// Drops every contribution of `node` (gone): ordinary leaves, which linger.
    pub(crate) fn drop_remote(&self, node: &str) {
        self.replace_remote(node, &[]);
    }

    /// The nodes whose contributions this view holds.
    pub(crate) fn remote_nodes(&self) -> Vec<Box<str>> {
        self.lock().remote.keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One tick at `now`: lingers that ended leave, the changes go out, new watches are
    /// answered.
    pub(crate) fn tick(&self, now: Instant) {
        let mut st = self.lock();
        let st = &mut *st;
        while st.lingering.front().is_some_and(|(at, ..)| *at <= now) {
            let Some((_, channel, member, generation)) = st.lingering.pop_front() else { break };
            let still = st.nodes.get(&channel).and_then(|n| n.direct.get(&member)).is_some_and(|e| e.linger == Some(generation));
            if still {
                st.remove(&channel, &member);
            }
        }
        let max_list = self.options.max_list;
        let mut seen: HashSet<ConnId> = HashSet::new();
        let mut lines = 0u64;
        for (channel, changes) in std::mem::take(&mut st.pending) {
            if changes.is_empty() {
                continue;
            }
            let count = st.nodes.get(&channel).map_or(0, |n| n.direct.len());
            let line = change_line(&channel, &changes, count, max_list);
            seen.clear();
            for a in ancestors(&channel) {
                if let Some(w) = st.watchers.get(a) {
                    for c in &w.conns {
                        if seen.insert(c.id()) {
                            lines += 1;
                            push(c, &line);
                        }
                    }
                }
            }
        }
        if !st.new_watches.is_empty() {
            let mut snapshots: HashMap<Box<str>, Vec<Utf8Bytes>> = HashMap::new();
            let mut channel_lines: HashMap<Box<str>, Utf8Bytes> = HashMap::new();
            for w in std::mem::take(&mut st.new_watches) {
                if w.conn.ending().code() != 0 {
                    continue;
                }
                let snapshot = snapshots.entry(w.path.clone()).or_insert_with(|| st.snapshot_lines(&w.path, max_list, &mut channel_lines));
                for line in snapshot.iter() {
                    lines += 1;
                    push(&w.conn, line);
                }
                st.watchers.entry(w.path.clone()).or_default().insert(&w.conn);
                let state = st.conns.entry(w.conn.id()).or_insert_with(|| ConnState {
                    member: Member { id: MemberId::Anon(0), info: None },
                    channels: HashSet::new(),
                    watching: Vec::new(),
                });
                if !state.watching.contains(&w.path) {
                    state.watching.push(w.path.clone());
                }
                // Under the presence lock: a connection closing removes its pending watches
                // first (`disconnect`), so none is subscribed after its subscriptions ended.
                let Watch { conn, path, ack, slot, done } = w;
                self.fanout.subscribe(&conn, &path, |ts| match ack {
                    Some(key) => slot.send_line_at(ts, ack_line(&key, ts)),
                    None => drop(slot),
                });
                let _ = done.send(());
            }
        }
        self.options.lines.inc_by(lines);
    }
}

/// Queues a presence line; a connection that cannot take it is closed as a slow consumer
/// (presence lines are not in the log: they cannot be caught up).
fn push(conn: &Conn, line: &Utf8Bytes) {
    if !conn.push_presence(line) {
        tracing::debug!(conn = %conn.id(), "queue full for a presence line: closing");
        conn.ending().end(close_code::SLOW_CONSUMER);
    }
}

impl State {
    fn conn_state(&mut self, conn: ConnId, member: &Member) -> &mut ConnState {
        let state =
            self.conns.entry(conn).or_insert_with(|| ConnState { member: member.clone(), channels: HashSet::new(), watching: Vec::new() });
        if state.channels.is_empty() {
            state.member = member.clone();
        }
        state
    }

    /// `n` more connections of `member` at `channel`.
    fn add(&mut self, channel: &str, member: &Member, n: u32) {
        let node = self.nodes.entry(channel.into()).or_default();
        match node.direct.get_mut(&member.id) {
            Some(e) => {
                e.conns += n;
                e.info.clone_from(&member.info);
                e.linger = None;
                for a in ancestors(channel) {
                    if let Some(agg) = self.nodes.get_mut(a).and_then(|node| node.subtree.get_mut(&member.id)) {
                        agg.conns += n;
                        agg.info.clone_from(&member.info);
                    }
                }
            }
            None => {
                node.direct.insert(member.id.clone(), Entry { conns: n, info: member.info.clone(), linger: None });
                for a in ancestors(channel) {
                    let node = match self.nodes.get_mut(a) {
                        Some(n) => n,
                        None => self.nodes.entry(a.into()).or_default(),
                    };
                    let agg = node.subtree.entry(member.id.clone()).or_insert(Agg { channels: 0, conns: 0, info: None });
                    agg.channels += 1;
                    agg.conns += n;
                    agg.info.clone_from(&member.info);
                }
                self.total += 1;
                self.changed(channel, &member.id, Change::Joined(member.info.clone()));
            }
        }
    }

    /// `n` connections of `member` less at `channel`: at the last one, it lingers (or leaves).
    fn sub(&mut self, channel: &str, member: &MemberId, n: u32, linger: Duration) {
        let Some(e) = self.nodes.get_mut(channel).and_then(|node| node.direct.get_mut(member)) else { return };
        e.conns = e.conns.saturating_sub(n);
        let last = e.conns == 0;
        if last && !linger.is_zero() {
            self.generation += 1;
            e.linger = Some(self.generation);
            self.lingering.push_back((Instant::now() + linger, channel.into(), member.clone(), self.generation));
        }
        for a in ancestors(channel) {
            if let Some(agg) = self.nodes.get_mut(a).and_then(|node| node.subtree.get_mut(member)) {
                agg.conns = agg.conns.saturating_sub(n);
            }
        }
        if last && linger.is_zero() {
            self.remove(channel, member);
        }
    }

    /// `node`'s contribution `c`, an absolute value (see [`LocalPresence::set_remote`]).
    fn set_remote(&mut self, node: &str, c: &Contribution, linger: Duration) {
        let key = (c.channel.clone(), c.member.id.clone());
        let per = match self.remote.get_mut(node) {
            Some(per) => per,
            None if c.conns == 0 => return,
            None => self.remote.entry(node.into()).or_default(),
        };
        let old = if c.conns == 0 { per.remove(&key) } else { per.insert(key, c.conns) }.unwrap_or(0);
        if per.is_empty() {
            self.remote.remove(node);
        }
        if c.conns > old {
            self.add(&c.channel, &c.member, c.conns - old);
        } else if c.conns < old {
            self.sub(&c.channel, &c.member.id, old - c.conns, linger);
        } else if let Some(e) = self.nodes.get_mut(&c.channel).and_then(|n| n.direct.get_mut(&c.member.id)) {
            // The same connections, another info (its connection that subscribed last): no line.
            e.info.clone_from(&c.member.info);
            for a in ancestors(&c.channel) {
                if let Some(agg) = self.nodes.get_mut(a).and_then(|n| n.subtree.get_mut(&c.member.id)) {
                    agg.info.clone_from(&c.member.info);
                }
            }
        }
    }

    /// This node's `member` has one more connection at `channel` (when replicated).
    fn local_joined(&mut self, channel: &str, member: &Member) {
        let Some(out) = self.outbox.as_mut() else { return };
        let key = (Box::<str>::from(channel), member.id.clone());
        let e = out.local.entry(key.clone()).or_insert((0, None));
        e.0 += 1;
        e.1.clone_from(&member.info);
        out.dirty.insert(key);
    }

    /// This node's `member` has one connection less at `channel` (when replicated).
    fn local_left(&mut self, channel: &str, member: &MemberId) {
        let Some(out) = self.outbox.as_mut() else { return };
        let key = (Box::<str>::from(channel), member.clone());
        let Some(e) = out.local.get_mut(&key) else { return };
        e.0 = e.0.saturating_sub(1);
        if e.0 == 0 {
            out.local.remove(&key);
        }
        out.dirty.insert(key);
    }

    /// `member` leaves `channel`.
    fn remove(&mut self, channel: &str, member: &MemberId) {
        let Some(node) = self.nodes.get_mut(channel) else { return };
        if node.direct.remove(member).is_none() {
            return;
        }
        for a in ancestors(channel) {
            let Some(node) = self.nodes.get_mut(a) else { continue };
            if let Some(agg) = node.subtree.get_mut(member) {
                agg.channels -= 1;
                if agg.channels == 0 {
                    node.subtree.remove(member);
                }
            }
            if node.subtree.is_empty() {
                self.nodes.remove(a);
            }
        }
        self.total -= 1;
        self.changed(channel, member, Change::Left);
    }

    /// Records a change of `channel` for the next tick (a join and a leave cancel out).
    fn changed(&mut self, channel: &str, member: &MemberId, change: Change) {
        let changes = match self.pending.get_mut(channel) {
            Some(c) => c,
            None => self.pending.entry(channel.into()).or_default(),
        };
        match (changes.remove(member), change) {
            (Some(Change::Left), Change::Joined(_)) | (Some(Change::Joined(_)), Change::Left) => {}
            (_, change) => {
                changes.insert(member.clone(), change);
            }
        }
    }

    /// The snapshot of `path`: a `^=` line per channel of its subtree with members (in path
    /// order), then `^.`; channel lines shared through `cache` within a tick.
    fn snapshot_lines(&self, path: &str, max_list: usize, cache: &mut HashMap<Box<str>, Utf8Bytes>) -> Vec<Utf8Bytes> {
        let mut out = Vec::new();
        for (channel, node) in subtree(&self.nodes, path) {
            if node.direct.is_empty() {
                continue;
            }
            let line = match cache.get(channel) {
                Some(l) => l.clone(),
                None => {
                    let l = snapshot_line(channel, node, max_list);
                    cache.insert(channel.into(), l.clone());
                    l
                }
            };
            out.push(line);
        }
        let count = self.nodes.get(path).map_or(0, |n| n.subtree.len());
        out.push(Utf8Bytes::from(format!("^.{path}:{{\"count\":{count}}}")));
        out
    }
}

/// The nodes at or below `path`, in path order.
fn subtree<'a>(nodes: &'a BTreeMap<Box<str>, Node>, path: &str) -> impl Iterator<Item = (&'a str, &'a Node)> + 'a {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let this = nodes.get_key_value(path).map(|(k, n)| (&**k, n));
    let below = if path == path::ROOT {
        nodes.range::<str, _>((Excluded(path::ROOT), Unbounded))
    } else {
        // The descendants of /a are /a/...: from "/a/" up to "/a0" ('0' follows '/').
        let (from, to) = (format!("{path}/"), format!("{path}0"));
        nodes.range::<str, _>((Included(from.as_str()), Excluded(to.as_str())))
    };
    this.into_iter().chain(below.map(|(k, n)| (&**k, n)))
}

/// `^=C:{"count":N,"members":[...]}` (count only above `max_list`).
fn snapshot_line(channel: &str, node: &Node, max_list: usize) -> Utf8Bytes {
    let count = node.direct.len();
    let mut out = String::with_capacity(32 + channel.len() + if count <= max_list { count * 40 } else { 0 });
    let _ = write!(out, "^={channel}:{{\"count\":{count}");
    if count <= max_list {
        out.push_str(",\"members\":[");
        for (i, (id, e)) in node.direct.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_member(id, e.info.as_deref(), Some(e.conns), &mut out);
        }
        out.push(']');
    }
    out.push('}');
    Utf8Bytes::from(out)
}

/// `^~C:{"join":[..],"leave":[..],"count":N}` (counts only above `max_list`).
fn change_line(channel: &str, changes: &BTreeMap<MemberId, Change>, count: usize, max_list: usize) -> Utf8Bytes {
    let mut out = String::with_capacity(32 + channel.len() + changes.len() * 40);
    let _ = write!(out, "^~{channel}:{{");
    if count > max_list {
        let joined = changes.values().filter(|c| matches!(c, Change::Joined(_))).count();
        let _ = write!(out, "\"joined\":{joined},\"left\":{},\"count\":{count}}}", changes.len() - joined);
        return Utf8Bytes::from(out);
    }
    let list = |name: &str, joined: bool, out: &mut String| {
        let mut first = true;
        for (id, c) in changes {
            let info = match (c, joined) {
                (Change::Joined(info), true) => info.as_deref(),
                (Change::Left, false) => None,
                _ => continue,
            };
            if first {
                let _ = write!(out, "\"{name}\":[");
                first = false;
            } else {
                out.push(',');
            }
            write_member(id, info, None, out);
        }
        if !first {
            out.push_str("],");
        }
    };
    list("join", true, &mut out);
    list("leave", false, &mut out);
    let _ = write!(out, "\"count\":{count}}}");
    Utf8Bytes::from(out)
}

/// `{"sub":"ada","info":{..},"conns":2}`, `{"anon":"..","conns":1}`.
fn write_member(id: &MemberId, info: Option<&str>, conns: Option<u32>, out: &mut String) {
    out.push('{');
    id.write_json(out);
    if let Some(info) = info {
        out.push_str(",\"info\":");
        out.push_str(info);
    }
    if let Some(n) = conns {
        let _ = write!(out, ",\"conns\":{n}");
    }
    out.push('}');
}

/// Appends `s` as a JSON string.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Presence for LocalPresence {
    fn join(&self, conn: ConnId, channel: &str, member: &Member) {
        let mut st = self.lock();
        let state = st.conn_state(conn, member);
        if state.channels.contains(channel) {
            return;
        }
        state.channels.insert(channel.into());
        let member = state.member.clone();
        st.add(channel, &member, 1);
        st.local_joined(channel, &member);
    }

    fn leave(&self, conn: ConnId, channel: &str) {
        let mut st = self.lock();
        let Some(state) = st.conns.get_mut(&conn) else { return };
        if !state.channels.remove(channel) {
            return;
        }
        let id = state.member.id.clone();
        if state.channels.is_empty() && state.watching.is_empty() {
            st.conns.remove(&conn);
        }
        st.sub(channel, &id, 1, self.options.linger);
        st.local_left(channel, &id);
    }

    fn disconnect(&self, conn: ConnId) {
        let mut st = self.lock();
        st.new_watches.retain(|w| w.conn.id() != conn);
        let Some(state) = st.conns.remove(&conn) else { return };
        for path in &state.watching {
            if let Some(w) = st.watchers.get_mut(path) {
                w.remove(conn);
                if w.conns.is_empty() {
                    st.watchers.remove(path);
                }
            }
        }
        for channel in &state.channels {
            st.sub(channel, &state.member.id, 1, self.options.linger);
            st.local_left(channel, &state.member.id);
        }
    }

    fn rekey(&self, conn: ConnId, member: &Member) {
        let mut st = self.lock();
        let Some(state) = st.conns.get_mut(&conn) else { return };
        let old = std::mem::replace(&mut state.member, member.clone());
        let channels: Vec<Box<str>> = state.channels.iter().cloned().collect();
        for channel in &channels {
            st.sub(channel, &old.id, 1, self.options.linger);
            st.local_left(channel, &old.id);
            st.add(channel, member, 1);
            st.local_joined(channel, member);
        }
    }

    fn count(&self, path: &str) -> usize {
        self.lock().nodes.get(path).map_or(0, |n| n.subtree.len())
    }

    fn members(&self, path: &str, after: Option<&MemberId>, limit: usize) -> MembersPage {
        let st = self.lock();
        let Some(node) = st.nodes.get(path) else { return MembersPage { count: 0, members: Vec::new(), next: None } };
        let range = match after {
            Some(a) => node.subtree.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => node.subtree.range(..),
        };
        let mut members = Vec::with_capacity(limit.min(node.subtree.len()));
        let mut more = false;
        for (id, agg) in range {
            if members.len() == limit {
                more = true;
                break;
            }
            members.push(MemberView { id: id.clone(), info: agg.info.clone(), conns: agg.conns });
        }
        let next = if more { members.last().map(|m| m.id.cursor()) } else { None };
        MembersPage { count: node.subtree.len(), members, next }
    }

    fn watch(&self, watch: Watch) {
        self.lock().new_watches.push(watch);
    }

    fn unwatch(&self, conn: ConnId, path: &str) {
        let mut st = self.lock();
        st.new_watches.retain(|w| !(w.conn.id() == conn && &*w.path == path));
        let Some(state) = st.conns.get_mut(&conn) else { return };
        state.watching.retain(|p| &**p != path);
        if state.channels.is_empty() && state.watching.is_empty() {
            st.conns.remove(&conn);
        }
        if let Some(w) = st.watchers.get_mut(path) {
            w.remove(conn);
            if w.conns.is_empty() {
                st.watchers.remove(path);
            }
        }
    }

    fn query(&self, path: &str) -> Vec<Utf8Bytes> {
        let lines = self.lock().snapshot_lines(path, self.options.max_list, &mut HashMap::new());
        self.options.lines.inc_by(lines.len() as u64);
        lines
    }

    fn members_total(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Message;

    fn presence(linger: u64, max_list: usize) -> Arc<LocalPresence> {
        Arc::new(LocalPresence {
            state: Mutex::default(),
            fanout: Arc::new(FanOut::new()),
            options: PresenceOptions::new(Duration::from_millis(linger), max_list, Counter::default()),
        })
    }

    fn sub(s: &str) -> Member {
        Member { id: MemberId::Sub(s.into()), info: None }
    }

    fn lines(rx: &mut tokio::sync::mpsc::Receiver<Message>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Message::Text(t)) = rx.try_recv() {
            out.push(t.as_str().to_string());
        }
        out
    }

    fn watch(p: &LocalPresence, conn: &Arc<Conn>, path: &str) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let slot = conn.try_reserve().unwrap();
        p.watch(Watch { conn: conn.clone(), path: path.into(), ack: Some(b"w".as_slice().into()), slot, done });
        rx
    }

    #[tokio::test]
    async fn counts_are_unions_over_the_subtree_and_conns_are_summed() {
        let p = presence(0, 1000);
        p.join(ConnId(1), "/chat/a", &sub("ada"));
        p.join(ConnId(2), "/chat/b", &sub("ada"));
        p.join(ConnId(2), "/chat/b", &sub("ada"));
        p.join(ConnId(3), "/chat/b", &sub("bob"));
        p.join(ConnId(4), "/other", &Member { id: MemberId::Anon(7), info: None });
        assert_eq!((p.count("/chat"), p.count("/chat/a"), p.count("/chat/b"), p.count("/"), p.count("/nowhere")), (2, 1, 2, 3, 0));
        let page = p.members("/chat", None, 10);
        assert_eq!(page.members.iter().map(|m| (m.id.cursor(), m.conns)).collect::<Vec<_>>(), [("=ada".into(), 2), ("=bob".into(), 1)]);
        let first = p.members("/", None, 2);
        assert_eq!(first.next.as_deref(), Some("=bob"));
        let rest = p.members("/", MemberId::from_cursor("=bob").as_ref(), 2);
        assert_eq!((rest.members.len(), rest.next, rest.members[0].id.clone()), (1, None, MemberId::Anon(7)));
        assert_eq!(p.members_total(), 4);
        p.disconnect(ConnId(2));
        assert_eq!((p.count("/chat"), p.count("/chat/b")), (2, 1));
        p.leave(ConnId(1), "/chat/a");
        p.leave(ConnId(3), "/chat/b");
        p.disconnect(ConnId(4));
        assert_eq!((p.count("/"), p.members_total()), (0, 0));
        assert!(p.lock().nodes.is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn a_watch_gets_its_snapshot_then_coalesced_changes_once() {
        let p = presence(0, 1000);
        let (w, mut rx, _) = Conn::new(ConnId(10), 64);
        p.join(ConnId(1), "/chat/a", &Member { id: MemberId::Sub("ada".into()), info: Some("{\"n\":1}".into()) });
        let done = watch(&p, &w, "/chat");
        let done2 = watch(&p, &w, "/chat/a");
        p.tick(Instant::now());
        done.await.unwrap();
        done2.await.unwrap();
        let got = lines(&mut rx);
        assert_eq!(got[0], "^=/chat/a:{\"count\":1,\"members\":[{\"sub\":\"ada\",\"info\":{\"n\":1},\"conns\":1}]}");
        assert_eq!(got[1], "^./chat:{\"count\":1}");
        assert!(got[2].starts_with("#w#@"), "{got:?}");
        assert_eq!(got[3], got[0]);
        assert_eq!(got[4], "^./chat/a:{\"count\":1}");
        // Within a tick: bob joins and leaves (nothing), eve joins, ada leaves.
        p.join(ConnId(2), "/chat/a", &sub("bob"));
        p.leave(ConnId(2), "/chat/a");
        p.join(ConnId(3), "/chat/a", &sub("e\"ve"));
        p.leave(ConnId(1), "/chat/a");
        p.tick(Instant::now());
        assert_eq!(lines(&mut rx), ["^~/chat/a:{\"join\":[{\"sub\":\"e\\\"ve\"}],\"leave\":[{\"sub\":\"ada\"}],\"count\":1}"]);
        p.tick(Instant::now());
        assert!(lines(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn a_leave_lingers_and_a_return_within_it_is_silent() {
        let p = presence(200, 1000);
        let (w, mut rx, _) = Conn::new(ConnId(10), 64);
        let done = watch(&p, &w, "/");
        p.tick(Instant::now());
        done.await.unwrap();
        lines(&mut rx);
        p.join(ConnId(1), "/r", &sub("ada"));
        p.tick(Instant::now());
        assert_eq!(lines(&mut rx), ["^~/r:{\"join\":[{\"sub\":\"ada\"}],\"count\":1}"]);
        p.disconnect(ConnId(1));
        assert_eq!(p.members("/r", None, 10).members[0].conns, 0, "lingering");
        p.tick(Instant::now());
        p.join(ConnId(2), "/r", &sub("ada"));
        p.tick(Instant::now() + Duration::from_secs(1));
        assert!(lines(&mut rx).is_empty(), "back within the linger: nothing");
        p.leave(ConnId(2), "/r");
        p.tick(Instant::now());
        assert!(lines(&mut rx).is_empty());
        p.tick(Instant::now() + Duration::from_secs(1));
        assert_eq!(lines(&mut rx), ["^~/r:{\"leave\":[{\"sub\":\"ada\"}],\"count\":0}"]);
        assert_eq!(p.count("/"), 0);
    }

    #[tokio::test]
    async fn above_the_list_limit_lines_carry_counts() {
        let p = presence(0, 2);
        let (w, mut rx, _) = Conn::new(ConnId(10), 64);
        for i in 0..3 {
            p.join(ConnId(i), "/r", &sub(&format!("m{i}")));
        }
        assert_eq!(p.query("/r")[0].as_str(), "^=/r:{\"count\":3}");
        let done = watch(&p, &w, "/r");
        p.tick(Instant::now());
        done.await.unwrap();
        lines(&mut rx);
        p.join(ConnId(5), "/r", &sub("x"));
        p.join(ConnId(6), "/r", &sub("y"));
        p.leave(ConnId(0), "/r");
        p.tick(Instant::now());
        assert_eq!(lines(&mut rx), ["^~/r:{\"joined\":2,\"left\":1,\"count\":4}"]);
        p.leave(ConnId(1), "/r");
        p.leave(ConnId(2), "/r");
        p.tick(Instant::now());
        assert_eq!(lines(&mut rx), ["^~/r:{\"leave\":[{\"sub\":\"m1\"},{\"sub\":\"m2\"}],\"count\":2}"], "at the limit: listed");
    }

    #[tokio::test]
    async fn a_closed_connections_pending_watch_is_dropped_before_it_subscribes() {
        let p = presence(0, 1000);
        let (w, _rx, _) = Conn::new(ConnId(10), 64);
        p.join(ConnId(10), "/r", &sub("ada"));
        let done = watch(&p, &w, "/r");
        p.disconnect(ConnId(10));
        p.tick(Instant::now());
        assert!(done.await.is_err(), "never answered");
        assert_eq!(p.fanout.subscriptions(), 0, "never subscribed after its subscriptions ended");
        assert!(p.lock().conns.is_empty() && p.lock().watchers.is_empty());
    }

    #[tokio::test]
    async fn a_connection_that_takes_a_token_changes_member_everywhere() {
        let p = presence(0, 1000);
        let anon = Member { id: MemberId::Anon(5), info: None };
        p.join(ConnId(1), "/a", &anon);
        p.join(ConnId(1), "/b/c", &anon);
        p.rekey(ConnId(1), &sub("zed"));
        let page = p.members("/", None, 10);
        assert_eq!(page.members.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), [MemberId::Sub("zed".into())]);
        assert_eq!(page.members[0].conns, 2);
        p.disconnect(ConnId(1));
        assert_eq!(p.count("/"), 0);
    }

    fn contribution(channel: &str, member: &str, conns: u32) -> Contribution {
        Contribution { channel: channel.into(), member: sub(member), conns }
    }

    #[tokio::test]
    async fn remote_contributions_add_up_with_local_ones_and_linger_alike() {
        let p = presence(200, 1000);
        p.lock().outbox = Some(Outbox::default());
        let (w, mut rx, _) = Conn::new(ConnId(10), 64);
        let done = watch(&p, &w, "/");
        p.tick(Instant::now());
        done.await.unwrap();
        lines(&mut rx);
        // ada: one connection here, two on node B: one member with three connections.
        p.join(ConnId(1), "/r", &sub("ada"));
        p.set_remote("b", &contribution("/r", "ada", 2));
        p.set_remote("b", &contribution("/r", "ada", 2));
        p.set_remote("c", &contribution("/r/x", "bob", 1));
        assert_eq!(p.members("/r", None, 10).members.iter().map(|m| m.conns).collect::<Vec<_>>(), [3, 1]);
        p.tick(Instant::now());
        let mut got = lines(&mut rx);
        got.sort();
        assert_eq!(got, ["^~/r/x:{\"join\":[{\"sub\":\"bob\"}],\"count\":1}", "^~/r:{\"join\":[{\"sub\":\"ada\"}],\"count\":1}"]);
        // Only this node's own connections are published.
        assert_eq!(p.take_local_changes(), [Contribution { channel: "/r".into(), member: sub("ada"), conns: 1 }]);
        assert!(p.take_local_changes().is_empty());
        // A replaced snapshot that matches changes nothing; c's node is dropped: bob lingers.
        p.replace_remote("b", &[contribution("/r", "ada", 2)]);
        p.drop_remote("c");
        assert_eq!(p.remote_nodes(), [Box::<str>::from("b")]);
        p.tick(Instant::now());
        assert!(lines(&mut rx).is_empty(), "a leave lingers");
        assert_eq!(p.count("/r"), 2);
        p.tick(Instant::now() + Duration::from_secs(1));
        assert_eq!(lines(&mut rx), ["^~/r/x:{\"leave\":[{\"sub\":\"bob\"}],\"count\":0}"]);
        // ada's local connection goes: still present through b; then b's go too.
        p.disconnect(ConnId(1));
        assert_eq!(p.take_local_changes(), [Contribution { channel: "/r".into(), member: sub("ada"), conns: 0 }]);
        p.set_remote("b", &contribution("/r", "ada", 0));
        p.tick(Instant::now() + Duration::from_secs(2));
        assert_eq!(lines(&mut rx), ["^~/r:{\"leave\":[{\"sub\":\"ada\"}],\"count\":0}"]);
        assert!(p.lock().nodes.is_empty() && p.remote_nodes().is_empty());
    }

    #[test]
    fn cursors_round_trip() {
        for id in [MemberId::Sub("a=b".into()), MemberId::Anon(0x9f3c), MemberId::anonymous()] {
            assert_eq!(MemberId::from_cursor(&id.cursor()), Some(id));
        }
        for bad in ["", "=", "x", "-12", "-zzzzzzzzzzzzzzzz"] {
            assert_eq!(MemberId::from_cursor(bad), None);
        }
    }
}
