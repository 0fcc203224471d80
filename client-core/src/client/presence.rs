//! One presence watch's machine (`~+PATH`, **Extension** `docs/PROTOCOL.md` 5.10): collect the
//! snapshot (`^=` lines until `^.`), then apply the changes (`^~`); after each reconnect, watch
//! again and diff the fresh snapshot against the view the application has, so that it sees only
//! the real differences (no phantom members, no missed leaves).
//!
//! The view of a watched path `P` is the union over the channels at or below `P` (the server
//! reports each channel apart): a member is in the view while it is in at least one of them,
//! and joins or leaves the view with its first or last channel. A channel above the server's
//! `--presence-max-list` is reported by count only: its members are not in the member list
//! ([`PresenceView::complete`] is false) and the view's count is then an estimate (the
//! snapshot's exact distinct count, moved by the changes of the counted channels).
//!
//! Presence lines never reach the subscriptions' event buffers: they carry no timestamp and
//! are neither ordered nor deduplicated with the events.

use alloc::string::String;
use alloc::vec::Vec;

use super::ClientError;
use crate::presence::{ChannelChange, ChannelSnapshot, Member, MemberId};

/// What a presence watch tells the application ([`ClientEvent::Presence`](super::ClientEvent::Presence)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    /// The view to take as a whole: the watch's first snapshot (everyone present), and again
    /// whenever the members can no longer be followed one by one, or can again: a channel
    /// passed the server's `--presence-max-list` and is counted, not listed, from then on
    /// ([`PresenceView::complete`] turns false), or a fresh snapshot after a reconnect differs
    /// in that respect. Other fresh snapshots are not reported as such: only their
    /// differences, as joins and leaves.
    Snapshot(PresenceView),
    /// A member entered the view (its first channel at or below the path).
    Join(Member),
    /// A member left the view (its last channel), with its last known info (and `conns` 0).
    Leave(Member),
    /// The number of members of the view changed (after the joins and leaves of one line,
    /// or of a fresh snapshot).
    Count(u64),
    /// The server refused the watch (`forbidden`, an older server's `malformed`...): it was
    /// removed.
    Failed(ClientError),
    /// The server ended the subscription under the watch (`!subscription-ended`): it was
    /// removed.
    Ended(String),
}

/// Who is present at a path: the union of the members of its channels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceView {
    /// The watched or queried path.
    pub path: String,
    /// The number of distinct members (an estimate when not [`PresenceView::complete`]).
    pub count: u64,
    /// The members, sorted by id (subs first); `conns` summed over their channels.
    pub members: Vec<Member>,
    /// False when a channel had more members than the server lists (`--presence-max-list`):
    /// its members are missing from `members`, and `count` is an estimate.
    pub complete: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    info: Option<String>,
    /// Connections summed over the channels it is in.
    conns: u32,
    /// The channels it is in.
    channels: u32,
}

#[derive(Debug, Clone)]
struct Chan {
    count: u64,
    /// By id, with their connections there; `None`: counts only.
    members: Option<Vec<(MemberId, u32)>>,
}

/// The view of one path, kept per channel (sorted vectors: few channels, binary searches).
#[derive(Debug, Clone, Default)]
pub(super) struct View {
    channels: Vec<(String, Chan)>,
    union: Vec<(MemberId, Entry)>,
    /// The snapshot's exact distinct count minus the count this view computes from its
    /// channels at the snapshot (members counted twice in counted channels, say).
    correction: i64,
}

fn find<K: Ord, V>(v: &[(K, V)], k: &K) -> Result<usize, usize> {
    v.binary_search_by(|(key, _)| key.cmp(k))
}

impl View {
    /// The view's count: the listed members, the counted channels, the snapshot's correction.
    pub(super) fn count(&self) -> u64 {
        let counted: u64 = self.channels.iter().filter(|(_, c)| c.members.is_none()).map(|(_, c)| c.count).sum();
        let n = (self.union.len() as i64).saturating_add(counted as i64).saturating_add(self.correction);
        n.max(0) as u64
    }

    fn complete(&self) -> bool {
        self.channels.iter().all(|(_, c)| c.members.is_some())
    }

    fn member(id: &MemberId, e: &Entry) -> Member {
        Member { id: id.clone(), info: e.info.clone(), conns: e.conns }
    }

    /// How many members are listed.
    pub(super) fn listed(&self) -> usize {
        self.union.len()
    }

    /// The members, sorted by id.
    pub(super) fn members(&self) -> impl Iterator<Item = Member> + '_ {
        self.union.iter().map(|(id, e)| Self::member(id, e))
    }

    pub(super) fn is_complete(&self) -> bool {
        self.complete()
    }

    pub(super) fn to_view(&self, path: &str) -> PresenceView {
        PresenceView { path: path.into(), count: self.count(), members: self.members().collect(), complete: self.complete() }
    }

    fn chan(&mut self, channel: &str) -> &mut Chan {
        let i = match self.channels.binary_search_by(|(c, _)| c.as_str().cmp(channel)) {
            Ok(i) => i,
            Err(i) => {
                self.channels.insert(i, (channel.into(), Chan { count: 0, members: Some(Vec::new()) }));
                i
            }
        };
        &mut self.channels[i].1
    }

    /// Adds `m` to the union (for one more channel); returns whether it is new to the view.
    fn enter(&mut self, m: &Member, conns: u32) -> bool {
        match find(&self.union, &m.id) {
            Ok(i) => {
                let e = &mut self.union[i].1;
                e.channels += 1;
                e.conns = e.conns.saturating_add(conns);
                if m.info.is_some() {
                    e.info.clone_from(&m.info);
                }
                false
            }
            Err(i) => {
                self.union.insert(i, (m.id.clone(), Entry { info: m.info.clone(), conns, channels: 1 }));
                true
            }
        }
    }

    /// Removes `id` from the union for one channel; returns the member when it left the view.
    fn exit(&mut self, id: &MemberId, conns: u32) -> Option<Member> {
        let i = find(&self.union, id).ok()?;
        let e = &mut self.union[i].1;
        e.channels = e.channels.saturating_sub(1);
        e.conns = e.conns.saturating_sub(conns);
        if e.channels == 0 {
            let (id, e) = self.union.remove(i);
            return Some(Member { id, info: e.info, conns: 0 });
        }
        None
    }

    /// A `^=C` line of a snapshot being collected.
    pub(super) fn add_snapshot(&mut self, channel: &str, snap: ChannelSnapshot) {
        // A channel reported twice (never expected): the second report wins.
        if let Ok(i) = self.channels.binary_search_by(|(c, _)| c.as_str().cmp(channel)) {
            let (_, old) = self.channels.remove(i);
            for (id, conns) in old.members.into_iter().flatten() {
                let _ = self.exit(&id, conns);
            }
        }
        let members = snap.members.map(|list| {
            let mut mine: Vec<(MemberId, u32)> = Vec::with_capacity(list.len());
            for m in &list {
                if let Err(i) = find(&mine, &m.id) {
                    mine.insert(i, (m.id.clone(), m.conns));
                    self.enter(m, m.conns);
                }
            }
            mine
        });
        *self.chan(channel) = Chan { count: snap.count, members };
    }

    /// The `^.` line: the snapshot's exact distinct count.
    pub(super) fn end_snapshot(&mut self, count: u64) {
        self.correction = 0;
        self.correction = (count as i64).saturating_sub(self.count() as i64);
    }

    /// A `^~C` change; the members entering or leaving the view go to `out`.
    pub(super) fn apply(&mut self, channel: &str, change: ChannelChange, out: &mut Vec<PresenceEvent>) {
        let chan = self.chan(channel);
        chan.count = change.count;
        if change.counts.is_some() {
            // Counts only: the channel's list is no longer known (its members stay in the
            // view through their other channels only).
            if let Some(list) = chan.members.take() {
                for (id, conns) in list {
                    let _ = self.exit(&id, conns);
                }
            }
        } else if chan.members.is_some() {
            // Leaves first: a member in both lists (never expected) ends present.
            for m in change.leave {
                let chan = self.chan(channel);
                let Some(list) = chan.members.as_mut() else { break };
                if let Ok(i) = find(list, &m.id) {
                    let (id, conns) = list.remove(i);
                    out.extend(self.exit(&id, conns).map(PresenceEvent::Leave));
                }
            }
            for m in change.join {
                let chan = self.chan(channel);
                let Some(list) = chan.members.as_mut() else { break };
                match find(list, &m.id) {
                    // Already known (a change the snapshot already had): its info may be newer.
                    Ok(_) => {
                        if let (Ok(i), Some(_)) = (find(&self.union, &m.id), &m.info) {
                            self.union[i].1.info.clone_from(&m.info);
                        }
                    }
                    Err(i) => {
                        list.insert(i, (m.id.clone(), 1));
                        if self.enter(&m, 1) {
                            let i = find(&self.union, &m.id).unwrap_or(0);
                            let (id, e) = &self.union[i];
                            out.push(PresenceEvent::Join(Self::member(id, e)));
                        }
                    }
                }
            }
        }
        // A listed channel nobody is in any more is forgotten.
        if let Ok(i) = self.channels.binary_search_by(|(c, _)| c.as_str().cmp(channel)) {
            let c = &self.channels[i].1;
            if c.count == 0 && c.members.as_ref().is_some_and(Vec::is_empty) {
                self.channels.remove(i);
            }
        }
    }

    /// The joins and leaves that turn `old` into `self` (a fresh snapshot after a reconnect).
    pub(super) fn diff(&self, old: &View, out: &mut Vec<PresenceEvent>) {
        let (mut a, mut b) = (old.union.iter().peekable(), self.union.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some((ia, ea)), Some((ib, _))) if ia < ib => {
                    out.push(PresenceEvent::Leave(Member { conns: 0, ..Self::member(ia, ea) }));
                    a.next();
                }
                (Some((ia, _)), Some((ib, eb))) if ia > ib => {
                    out.push(PresenceEvent::Join(Self::member(ib, eb)));
                    b.next();
                }
                (Some(_), Some(_)) => {
                    a.next();
                    b.next();
                }
                (Some((ia, ea)), None) => {
                    out.push(PresenceEvent::Leave(Member { conns: 0, ..Self::member(ia, ea) }));
                    a.next();
                }
                (None, Some((ib, eb))) => {
                    out.push(PresenceEvent::Join(Self::member(ib, eb)));
                    b.next();
                }
                (None, None) => break,
            }
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Not watched on the current connection (or no connection).
    Offline,
    /// `~+path` sent; the snapshot is collected into `fresh` (`started` once its first line
    /// came: changes before that are already in the snapshot, changes after it apply to it).
    Collecting { fresh: View, started: bool },
    /// Snapshot done: changes apply to the view.
    Live,
}

/// A presence watch of the client.
#[derive(Debug)]
pub(super) struct Watch {
    /// Normalized path.
    pub(super) path: String,
    phase: Phase,
    /// What the application was told (`None` before the first snapshot).
    view: Option<View>,
    /// The count last reported.
    reported: u64,
}

impl Watch {
    pub(super) fn new(path: String) -> Watch {
        Watch { path, phase: Phase::Offline, view: None, reported: 0 }
    }

    /// `~+path` went out on a new connection.
    pub(super) fn watching(&mut self) {
        self.phase = Phase::Collecting { fresh: View::default(), started: false };
    }

    /// The connection dropped: the view stays as it was until the next snapshot.
    pub(super) fn disconnected(&mut self) {
        self.phase = Phase::Offline;
    }

    pub(super) fn is_offline(&self) -> bool {
        matches!(self.phase, Phase::Offline)
    }

    pub(super) fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// The current view, if a snapshot came.
    pub(super) fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// "offline", "collecting" (its snapshot under way) or "live", for the debug state.
    pub(super) fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Offline => "offline",
            Phase::Collecting { .. } => "collecting",
            Phase::Live => "live",
        }
    }

    /// Whether the watch collects a snapshot (its first line may come).
    pub(super) fn is_collecting(&self) -> bool {
        matches!(self.phase, Phase::Collecting { .. })
    }

    /// A `^=` line of this watch's snapshot.
    pub(super) fn on_snapshot(&mut self, channel: &str, snap: ChannelSnapshot) {
        if let Phase::Collecting { fresh, started } = &mut self.phase {
            *started = true;
            fresh.add_snapshot(channel, snap);
        }
    }

    /// The `^.` line of this watch's snapshot: the first is reported whole, later ones by
    /// their differences from what was reported.
    pub(super) fn on_end(&mut self, count: u64, out: &mut Vec<PresenceEvent>) {
        let Phase::Collecting { fresh, .. } = core::mem::replace(&mut self.phase, Phase::Live) else { return };
        let mut fresh = fresh;
        fresh.end_snapshot(count);
        match self.view.take() {
            None => {
                out.push(PresenceEvent::Snapshot(fresh.to_view(&self.path)));
                self.reported = fresh.count();
            }
            // Listed members became counted ones, or the other way round: a diff would tell
            // leaves and joins that did not happen.
            Some(old) if old.is_complete() != fresh.is_complete() => {
                out.push(PresenceEvent::Snapshot(fresh.to_view(&self.path)));
                self.reported = fresh.count();
            }
            Some(old) => {
                fresh.diff(&old, out);
                self.report_count(fresh.count(), out);
            }
        }
        self.view = Some(fresh);
    }

    /// A `^~` line of a channel at or below the path.
    pub(super) fn on_change(&mut self, channel: &str, change: ChannelChange, out: &mut Vec<PresenceEvent>) {
        match &mut self.phase {
            Phase::Collecting { fresh, started: true } => fresh.apply(channel, change, &mut Vec::new()),
            Phase::Live => {
                let Some(view) = self.view.as_mut() else { return };
                let complete = view.is_complete();
                view.apply(channel, change, out);
                let n = view.count();
                if view.is_complete() != complete {
                    // A channel is counted from now on: its members leave the list, not the
                    // room; the application takes the view as a whole.
                    out.push(PresenceEvent::Snapshot(view.to_view(&self.path)));
                    self.reported = n;
                } else {
                    self.report_count(n, out);
                }
            }
            _ => {}
        }
    }

    fn report_count(&mut self, n: u64, out: &mut Vec<PresenceEvent>) {
        if n != self.reported {
            self.reported = n;
            out.push(PresenceEvent::Count(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;
    use alloc::vec;

    use super::*;
    use crate::presence::{PresenceLine, parse_presence};

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Feeds wire lines to a watch of `path`; returns the events.
    fn feed(w: &mut Watch, lines: &[&str]) -> Vec<PresenceEvent> {
        let mut out = Vec::new();
        for l in lines {
            match parse_presence(l.as_bytes()).unwrap() {
                PresenceLine::Snapshot { channel, snapshot } => w.on_snapshot(&channel, snapshot),
                PresenceLine::End { count, .. } => w.on_end(count, &mut out),
                PresenceLine::Change { channel, change } => w.on_change(&channel, change, &mut out),
            }
        }
        out
    }

    fn sub(s: &str, conns: u32) -> Member {
        Member { id: MemberId::Sub(s.into()), info: None, conns }
    }

    fn ids(v: &View) -> Vec<String> {
        v.members().map(|m| m.id.to_string()).collect()
    }

    #[test]
    fn the_view_is_the_union_over_channels() {
        let mut w = Watch::new("/chat".into());
        w.watching();
        let out = feed(
            &mut w,
            &[
                r#"^=/chat:{"count":1,"members":[{"sub":"ada","conns":1}]}"#,
                r#"^=/chat/a:{"count":2,"members":[{"sub":"ada","conns":2},{"anon":"ff","conns":1}]}"#,
                r#"^./chat:{"count":2}"#,
            ],
        );
        let view = PresenceView {
            path: "/chat".into(),
            count: 2,
            members: vec![sub("ada", 3), Member { id: MemberId::Anon("ff".into()), info: None, conns: 1 }],
            complete: true,
        };
        assert_eq!(out, [PresenceEvent::Snapshot(view)]);
        // ada leaves /chat/a: still in /chat, so still in the view.
        assert_eq!(feed(&mut w, &[r#"^~/chat/a:{"leave":[{"sub":"ada"}],"count":1}"#]), []);
        // ... and /chat: gone.
        assert_eq!(
            feed(&mut w, &[r#"^~/chat:{"leave":[{"sub":"ada"}],"count":0}"#]),
            [PresenceEvent::Leave(sub("ada", 0)), PresenceEvent::Count(1)]
        );
        // bob joins /chat/b (a channel the snapshot did not have), with info.
        let out = feed(&mut w, &[r#"^~/chat/b:{"join":[{"sub":"bob","info":{"n":"Bob"}}],"count":1}"#]);
        let bob = Member { id: MemberId::Sub("bob".into()), info: Some(r#"{"n":"Bob"}"#.into()), conns: 1 };
        assert_eq!(out, [PresenceEvent::Join(bob.clone()), PresenceEvent::Count(2)]);
        // A join already known, a leave of someone absent: no event.
        assert_eq!(feed(&mut w, &[r#"^~/chat/b:{"join":[{"sub":"bob"}],"leave":[{"sub":"zed"}],"count":1}"#]), []);
        assert_eq!(ids(w.view().unwrap()), ["bob", "anon:ff"]);
    }

    #[test]
    fn changes_before_the_snapshot_are_in_it_and_changes_during_it_apply() {
        let mut w = Watch::new("/r".into());
        w.watching();
        // A change before this watch's snapshot began: the snapshot has it.
        let out = feed(
            &mut w,
            &[
                r#"^~/r:{"leave":[{"sub":"old"}],"count":0}"#,
                r#"^=/r:{"count":1,"members":[{"sub":"a","conns":1}]}"#,
                r#"^~/r:{"join":[{"sub":"b"}],"count":2}"#,
                r#"^./r:{"count":2}"#,
            ],
        );
        let PresenceEvent::Snapshot(v) = &out[0] else { panic!("{out:?}") };
        assert_eq!((v.count, v.members.len(), out.len()), (2, 2, 1));
    }

    #[test]
    fn a_fresh_snapshot_is_reported_by_its_differences_only() {
        let mut w = Watch::new("/r".into());
        w.watching();
        feed(
            &mut w,
            &[r#"^=/r:{"count":3,"members":[{"sub":"a","conns":1},{"sub":"b","conns":1},{"anon":"01","conns":1}]}"#, r#"^./r:{"count":3}"#],
        );
        w.disconnected();
        // Changes while offline are not applied.
        assert_eq!(feed(&mut w, &[r#"^~/r:{"leave":[{"sub":"a"}],"count":2}"#]), []);
        w.watching();
        // Meanwhile: a left, c joined, b stayed (the anonymous member reloaded: a new id).
        let out = feed(
            &mut w,
            &[r#"^=/r:{"count":3,"members":[{"sub":"b","conns":2},{"sub":"c","conns":1},{"anon":"02","conns":1}]}"#, r#"^./r:{"count":3}"#],
        );
        assert_eq!(
            out,
            [
                PresenceEvent::Leave(sub("a", 0)),
                PresenceEvent::Join(sub("c", 1)),
                PresenceEvent::Leave(Member { id: MemberId::Anon("01".into()), info: None, conns: 0 }),
                PresenceEvent::Join(Member { id: MemberId::Anon("02".into()), info: None, conns: 1 }),
            ]
        );
        // Nobody changed: nothing at all (no phantom leave and join, no count).
        w.watching();
        let out = feed(
            &mut w,
            &[r#"^=/r:{"count":3,"members":[{"sub":"b","conns":2},{"sub":"c","conns":1},{"anon":"02","conns":1}]}"#, r#"^./r:{"count":3}"#],
        );
        assert_eq!(out, []);
        // Everyone left: leaves and the count; an empty snapshot is the end line alone.
        w.watching();
        let out = feed(&mut w, &[r#"^./r:{"count":0}"#]);
        assert_eq!(out.len(), 4);
        assert_eq!(out[3], PresenceEvent::Count(0));
    }

    #[test]
    fn large_channels_are_counted_not_listed() {
        let mut w = Watch::new("/".into());
        w.watching();
        let out = feed(
            &mut w,
            &[r#"^=/big:{"count":5000}"#, r#"^=/small:{"count":1,"members":[{"sub":"a","conns":1}]}"#, r#"^./:{"count":5001}"#],
        );
        let PresenceEvent::Snapshot(v) = &out[0] else { panic!() };
        assert_eq!((v.count, v.members.len(), v.complete), (5001, 1, false));
        assert_eq!(feed(&mut w, &[r#"^~/big:{"joined":10,"left":2,"count":5008}"#]), [PresenceEvent::Count(5009)]);
        // A listed channel that grows past the limit: its members leave the list, not the count.
        let out = feed(&mut w, &[r#"^~/small:{"joined":1500,"left":0,"count":1501}"#]);
        assert_eq!(out, [PresenceEvent::Count(6509)]);
        assert_eq!(w.view().unwrap().members().count(), 0);
        // A complete view that turns incomplete is reported whole.
        let mut w = Watch::new("/r".into());
        w.watching();
        feed(&mut w, &[r#"^=/r:{"count":2,"members":[{"sub":"a","conns":1},{"sub":"b","conns":1}]}"#, r#"^./r:{"count":2}"#]);
        let out = feed(&mut w, &[r#"^~/r:{"joined":1,"left":0,"count":3}"#]);
        assert_eq!(out, [PresenceEvent::Snapshot(PresenceView { path: "/r".into(), count: 3, members: vec![], complete: false })]);
        // So is a fresh snapshot (after a reconnect) that is complete again.
        w.watching();
        let out = feed(&mut w, &[r#"^=/r:{"count":1,"members":[{"sub":"a","conns":1}]}"#, r#"^./r:{"count":1}"#]);
        assert_eq!(
            out,
            [PresenceEvent::Snapshot(PresenceView { path: "/r".into(), count: 1, members: vec![sub("a", 1)], complete: true })]
        );
    }

    #[test]
    fn the_correction_keeps_the_exact_count_of_overlapping_counted_channels() {
        let mut v = View::default();
        v.add_snapshot("/a", ChannelSnapshot { count: 2000, members: None });
        v.add_snapshot("/b", ChannelSnapshot { count: 2000, members: None });
        v.end_snapshot(3000); // 1000 members in both
        assert_eq!(v.count(), 3000);
        let mut out = Vec::new();
        v.apply("/a", ChannelChange { join: vec![], leave: vec![], counts: Some((0, 500)), count: 1500 }, &mut out);
        assert_eq!((v.count(), out.len()), (2500, 0));
    }
}
