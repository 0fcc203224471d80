//! One subscription's delivery machine: renew on each connection, backfill from the log up
//! to the position, merge with live events, then deliver live.
//!
//! Each phase carries the data only it has ([`Phase::Backfilling`] the backfill's bounds and
//! its page request), so a reconnect is one assignment, and a page request outside a backfill
//! cannot be written. The methods return the log page to request next, if any; the client
//! turns it into [`Action::FetchLog`](super::Action::FetchLog).

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;

use super::collections::MergeBuf;
use super::debug::SubDebug;
use super::{ClientEvent, Config, LogRequest, Millis, Start, SubId};
use crate::http::parse_log;
use crate::path;
use crate::timestamp::Timestamp;
use crate::wire::Event;

/// What a subscription needs from the client to produce outputs.
#[derive(Debug)]
pub(super) struct Ctx<'a> {
    /// The time of the input being handled.
    pub(super) now: Millis,
    pub(super) cfg: &'a Config,
    /// The client's id counter: log requests share it with subscriptions and requests.
    pub(super) next_id: &'a mut u64,
    /// Events for the application.
    pub(super) events: &'a mut VecDeque<ClientEvent>,
}

impl Ctx<'_> {
    fn id(&mut self) -> u64 {
        let id = *self.next_id;
        *self.next_id += 1;
        id
    }
}

#[derive(Debug)]
enum Phase {
    /// Not subscribed on the current connection (or no connection).
    Offline,
    /// `+path` sent, waiting for the position. `forgotten`: the newest live event dropped
    /// meanwhile because the buffer was full; the backfill goes at least that far.
    Subscribing { forgotten: Option<Timestamp> },
    /// Fetching the log up to the position.
    Backfilling(Backfill),
    /// Caught up: live events are delivered as they come.
    Live,
}

#[derive(Debug)]
struct Backfill {
    /// Everything up to here is in the buffer or delivered.
    complete: Timestamp,
    /// Backfill until `complete >= target`: the position, or a later live event that the
    /// full buffer dropped.
    target: Timestamp,
    page: PageState,
    /// Page fetches that failed in a row (the retry backs off).
    failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageState {
    /// No page requested (only between two steps of one input).
    Idle,
    /// A page request is out; it counts as lost at `deadline`.
    InFlight { id: u64, after: Option<Timestamp>, deadline: Millis },
    /// The last request failed or was lost: make it again then.
    RetryAt(Millis),
}

/// A subscription of the client.
#[derive(Debug)]
pub(super) struct Sub {
    /// Normalized channel path.
    pub(super) path: String,
    /// Where to start; consumed by the first subscription ack.
    start: Option<Start>,
    /// The last timestamp delivered (or the start cursor).
    last: Timestamp,
    phase: Phase,
    /// Events waiting for delivery, by timestamp (deduplicates).
    buf: MergeBuf,
    /// Our sends into this channel that await their reply (see [`Sub::own_sent`]).
    own_unacked: u32,
    /// While `own_unacked > 0`, live events up to here may be delivered: the newest of our
    /// acks (our later sends get later timestamps).
    released: Timestamp,
    /// The newest horizon of the channel's log seen (the newest event deleted from it).
    horizon: Timestamp,
}

impl Sub {
    pub(super) fn new(path: String, start: Start) -> Sub {
        Sub {
            path,
            start: Some(start),
            last: Timestamp::ZERO,
            phase: Phase::Offline,
            buf: MergeBuf::default(),
            own_unacked: 0,
            released: Timestamp::ZERO,
            horizon: Timestamp::ZERO,
        }
    }

    /// One of our sends into this channel went out (or was already out when the subscription
    /// was made). Until its reply, live events are held back past the newest of our acks: its
    /// timestamp is not known yet, and a server that acks a group commit only after handing
    /// out all of its events (servers before the 5.7 rule of `docs/PROTOCOL.md`) sends another
    /// sender's later event of the same commit first. Delivering that event at once would put
    /// `last` past our own event, which would then be taken for one already delivered and
    /// lost (issue 18: a chat page showed its own message as pending forever).
    pub(super) fn own_sent(&mut self) {
        if self.own_unacked == 0 {
            self.released = self.last;
        }
        self.own_unacked = self.own_unacked.saturating_add(1);
    }

    /// The reply to one of our sends into this channel: its event when stored (`None`: it
    /// failed or timed out). What it held back up to its timestamp is delivered, everything
    /// once no send of ours is waiting.
    #[must_use]
    pub(super) fn own_answered(&mut self, sub: SubId, stored: Option<Event<'static>>, cx: &mut Ctx<'_>) -> Option<LogRequest> {
        self.own_unacked = self.own_unacked.saturating_sub(1);
        if let Some(ev) = stored {
            self.released = self.released.max(ev.ts);
            if let Some(request) = self.offer(sub, ev, cx) {
                return Some(request);
            }
        }
        self.advance(sub, cx)
    }

    fn holding(&self) -> bool {
        self.own_unacked > 0
    }

    /// The last timestamp delivered (the resume cursor).
    pub(super) fn last(&self) -> Timestamp {
        self.last
    }

    pub(super) fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// Whether the current connection knows nothing of this subscription.
    pub(super) fn is_offline(&self) -> bool {
        matches!(self.phase, Phase::Offline)
    }

    /// `+path` went out on a new connection.
    pub(super) fn subscribing(&mut self) {
        self.phase = Phase::Subscribing { forgotten: None };
    }

    /// The connection dropped: what is buffered is in the log, and the next connection
    /// resumes after `last`.
    pub(super) fn disconnected(&mut self) {
        self.phase = Phase::Offline;
        self.buf.clear();
        // The sends failed with the connection.
        self.own_unacked = 0;
    }

    /// The subscription's ack: events after `position` arrive live, the others are in the log.
    #[must_use]
    pub(super) fn on_position(&mut self, sub: SubId, position: Timestamp, cx: &mut Ctx<'_>) -> Option<LogRequest> {
        let Phase::Subscribing { forgotten } = self.phase else { return None };
        match self.start.take() {
            Some(Start::Now) => self.last = position,
            Some(Start::Beginning) => self.last = Timestamp::ZERO,
            // The application's cursor may be later than the position (a server time, say).
            Some(Start::After(t)) => self.last = t,
            // A renewal: `last` is an event this subscription delivered. A position before it
            // means the server no longer has it.
            None if self.last > position => {
                cx.events.push_back(ClientEvent::ContinuityLost { sub, last: self.last, position });
            }
            None => {}
        }
        let target = position.max(self.last).max(forgotten.unwrap_or(Timestamp::ZERO));
        // Live events up to the cursor are old news.
        self.buf.drop_upto(self.last);
        self.phase = Phase::Backfilling(Backfill { complete: self.last, target, page: PageState::Idle, failures: 0 });
        self.advance(sub, cx)
    }

    /// A live event of this subscription's channel (or one of the client's own, at its ack).
    #[must_use]
    pub(super) fn offer(&mut self, sub: SubId, ev: Event<'static>, cx: &mut Ctx<'_>) -> Option<LogRequest> {
        if ev.ts <= self.last {
            return None; // already delivered
        }
        let max = cx.cfg.max_buffered;
        let deliverable = !self.holding() || ev.ts <= self.released;
        match &mut self.phase {
            Phase::Offline => None,
            Phase::Live if self.buf.is_empty() && deliverable => {
                self.last = ev.ts;
                cx.events.push_back(ClientEvent::Event { sub, event: ev });
                None
            }
            Phase::Live => {
                self.buf.push_live(ev);
                if self.buf.len() > max {
                    // Held back too long (bounded memory): forget the held live events and
                    // read them from the log, which has our sends too once they are stored.
                    if let Some(newest) = self.buf.forget_live_after(self.last) {
                        self.phase =
                            Phase::Backfilling(Backfill { complete: self.last, target: newest, page: PageState::Idle, failures: 0 });
                    }
                }
                self.advance(sub, cx)
            }
            // Bounded memory: everything live is also in the log, so past `max` forget the
            // buffered live events beyond what is complete, and fetch them from the log.
            Phase::Subscribing { forgotten } => {
                self.buf.push_live(ev);
                if self.buf.len() > max {
                    if let Some(newest) = self.buf.forget_live_after(self.last) {
                        *forgotten = Some(forgotten.map_or(newest, |f| f.max(newest)));
                    }
                }
                None
            }
            Phase::Backfilling(b) => {
                self.buf.push_live(ev);
                if self.buf.len() > max {
                    if let Some(newest) = self.buf.forget_live_after(b.complete) {
                        b.target = b.target.max(newest);
                    }
                }
                None
            }
        }
    }

    /// Whether log request `id` is this subscription's outstanding one.
    pub(super) fn awaits_page(&self, id: u64) -> bool {
        matches!(&self.phase, Phase::Backfilling(Backfill { page: PageState::InFlight { id: i, .. }, .. }) if *i == id)
    }

    /// The answer to log request `id`: a body, or why the fetch failed. Ignored unless it is
    /// the outstanding request (a late answer to a lost one, or one from before a reconnect).
    #[must_use]
    pub(super) fn on_page(
        &mut self,
        sub: SubId,
        id: u64,
        result: Result<&str, String>,
        horizon: Option<Timestamp>,
        cx: &mut Ctx<'_>,
    ) -> Option<LogRequest> {
        let Phase::Backfilling(b) = &mut self.phase else { return None };
        let PageState::InFlight { id: outstanding, after, .. } = b.page else { return None };
        if outstanding != id {
            return None;
        }
        let parsed = result.and_then(|body| parse_log(body).map_err(|e| format!("unparsable log line: {e}")));
        match parsed {
            Err(e) => {
                b.failures = b.failures.saturating_add(1);
                b.page = PageState::RetryAt(cx.now.saturating_add(cx.cfg.backoff_ceiling(b.failures)));
                cx.events.push_back(ClientEvent::Warning(format!("log fetch for {} failed ({e}); retrying", self.path)));
                None
            }
            Ok(events) => {
                b.page = PageState::Idle;
                b.failures = 0;
                if let Some(h) = horizon.filter(|&h| h > self.horizon) {
                    self.horizon = h;
                    // Events after the last one delivered were deleted (retention, or an
                    // operator): at least the one at the horizon. A subscription from the
                    // beginning, which delivered nothing yet, reads what is left.
                    if h > self.last && self.last != Timestamp::ZERO {
                        cx.events.push_back(ClientEvent::ContinuityLost { sub, last: self.last, position: h });
                    }
                }
                match events.last().map(|e| e.ts) {
                    // A page is a contiguous stretch of the log after the cursor: everything up
                    // to its newest event is now known. (Whether it was "full" is not trusted:
                    // the server may cap the limit.)
                    Some(newest) => b.complete = b.complete.max(newest),
                    // Nothing after the cursor: the log shows every event up to the position
                    // (the server makes events visible in the log before it acks a subscribe).
                    None => b.complete = b.complete.max(b.target).max(after.unwrap_or(Timestamp::ZERO)),
                }
                for ev in events {
                    if ev.ts > self.last && path::is_within(&ev.path, &self.path) {
                        self.buf.push_page(ev);
                    }
                }
                self.advance(sub, cx)
            }
        }
    }

    /// What the subscription is doing, for [`Client::debug_state`](super::Client::debug_state).
    pub(super) fn debug(&self, id: SubId) -> SubDebug<'_> {
        let mut d = SubDebug {
            id,
            path: &self.path,
            phase: "offline",
            last: self.last,
            complete: None,
            target: None,
            buffered: self.buf.len(),
            page: None,
            page_deadline: None,
            page_retry: None,
            page_failures: 0,
            own_unacked: self.own_unacked,
            released: self.holding().then_some(self.released),
        };
        match &self.phase {
            Phase::Offline => {}
            Phase::Subscribing { forgotten } => {
                d.phase = "subscribing";
                d.target = *forgotten;
            }
            Phase::Backfilling(b) => {
                d.phase = "backfilling";
                d.complete = Some(b.complete);
                d.target = Some(b.target);
                d.page_failures = b.failures;
                match b.page {
                    PageState::Idle => {}
                    PageState::InFlight { id, after, deadline } => {
                        d.page = Some((id, after));
                        d.page_deadline = Some(deadline);
                    }
                    PageState::RetryAt(t) => d.page_retry = Some(t),
                }
            }
            Phase::Live => d.phase = "live",
        }
        d
    }

    /// When [`Sub::on_timeout`] has something to do: the outstanding page's deadline or the
    /// retry time.
    pub(super) fn page_timeout(&self) -> Option<Millis> {
        match &self.phase {
            Phase::Backfilling(b) => match b.page {
                PageState::InFlight { deadline, .. } => Some(deadline),
                PageState::RetryAt(t) => Some(t),
                PageState::Idle => None,
            },
            _ => None,
        }
    }

    /// Time passed: a page with no answer by its deadline is abandoned (a late answer no
    /// longer matches its id) and made again, like a failed page whose retry time came.
    /// Returns whether a page was lost, and the request to make.
    #[must_use]
    pub(super) fn on_timeout(&mut self, cx: &mut Ctx<'_>) -> (bool, Option<LogRequest>) {
        let Phase::Backfilling(b) = &mut self.phase else { return (false, None) };
        let now = cx.now;
        let lost = matches!(b.page, PageState::InFlight { deadline, .. } if deadline <= now);
        if lost {
            b.page = PageState::RetryAt(now);
        }
        match b.page {
            PageState::RetryAt(t) if t <= now => (lost, self.request_page(cx)),
            _ => (lost, None),
        }
    }

    /// Delivers what is deliverable, and either requests the next log page or goes live.
    fn advance(&mut self, sub: SubId, cx: &mut Ctx<'_>) -> Option<LogRequest> {
        if matches!(&self.phase, Phase::Backfilling(b) if b.complete >= b.target) {
            self.phase = Phase::Live;
        }
        let upto = match &self.phase {
            Phase::Backfilling(b) => b.complete,
            // Held back for a send of ours: up to the newest of our acks (see `own_sent`).
            Phase::Live if self.holding() => self.released,
            Phase::Live => Timestamp::MAX,
            Phase::Offline | Phase::Subscribing { .. } => return None,
        };
        while let Some(ev) = self.buf.pop_upto(upto) {
            if ev.ts > self.last {
                self.last = ev.ts;
                cx.events.push_back(ClientEvent::Event { sub, event: ev });
            }
        }
        match &self.phase {
            Phase::Backfilling(b) if b.page == PageState::Idle => self.request_page(cx),
            _ => None,
        }
    }

    /// The next log page: the events after everything complete.
    fn request_page(&mut self, cx: &mut Ctx<'_>) -> Option<LogRequest> {
        let Phase::Backfilling(b) = &mut self.phase else { return None };
        let id = cx.id();
        let after = (b.complete > Timestamp::ZERO).then_some(b.complete);
        b.page = PageState::InFlight { id, after, deadline: cx.now.saturating_add(cx.cfg.request_timeout) };
        Some(LogRequest { id, path: self.path.clone(), after, limit: cx.cfg.page_limit.max(1), senders: cx.cfg.senders })
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;
    use alloc::vec::Vec;

    use super::*;
    use crate::wire::encode_event;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SUB: SubId = SubId(1);

    fn ts(n: u32) -> Timestamp {
        Timestamp::new(1_700_000_000, n).unwrap()
    }

    fn ev(n: u32) -> Event<'static> {
        Event { ts: ts(n), path: "/s".into(), data: n.to_string().into_bytes().into(), sender: None }
    }

    fn body(ns: &[u32]) -> String {
        let mut v = Vec::new();
        for &n in ns {
            let e = ev(n);
            encode_event(e.ts, &e.path, &e.data, &mut v);
            v.push(b'\n');
        }
        String::from_utf8(v).unwrap()
    }

    /// A subscription and what it needs, driven by hand.
    struct Harness {
        sub: Sub,
        cfg: Config,
        next_id: u64,
        events: VecDeque<ClientEvent>,
        now: Millis,
    }

    impl Harness {
        fn new(start: Start, cfg: Config) -> Harness {
            Harness { sub: Sub::new("/s".into(), start), cfg, next_id: 100, events: VecDeque::new(), now: 0 }
        }

        fn with<T>(&mut self, f: impl FnOnce(&mut Sub, &mut Ctx<'_>) -> T) -> T {
            let mut cx = Ctx { now: self.now, cfg: &self.cfg, next_id: &mut self.next_id, events: &mut self.events };
            f(&mut self.sub, &mut cx)
        }

        fn delivered(&mut self) -> Vec<u32> {
            self.events
                .drain(..)
                .filter_map(|e| match e {
                    ClientEvent::Event { event, .. } => Some(event.ts.subsec_nanos()),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn backfills_page_by_page_merging_live_events_then_goes_live() {
        let mut h = Harness::new(Start::Beginning, Config::default().page_limit(2));
        assert_eq!(h.with(|s, cx| s.offer(SUB, ev(1), cx)), None, "offline: nothing");
        h.sub.subscribing();
        // A live event before the ack is buffered.
        assert_eq!(h.with(|s, cx| s.offer(SUB, ev(5), cx)), None);
        let req = h.with(|s, cx| s.on_position(SUB, ts(4), cx)).expect("a page");
        assert_eq!((req.id, req.after, req.limit, req.path.as_str()), (100, None, 2, "/s"));
        assert!(h.sub.awaits_page(100) && !h.sub.awaits_page(99));
        assert_eq!(h.sub.page_timeout(), Some(30_000));
        // Pages come; the live event waits until everything before it is known.
        let next = h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[1, 2])), None, cx)).expect("the next page");
        assert_eq!((next.id, next.after), (101, Some(ts(2))));
        assert_eq!(h.delivered(), [1, 2]);
        assert_eq!(h.with(|s, cx| s.offer(SUB, ev(6), cx)), None);
        assert_eq!(h.with(|s, cx| s.on_page(SUB, next.id, Ok(&body(&[3, 4, 5])), None, cx)), None, "caught up");
        assert_eq!(h.delivered(), [3, 4, 5, 6]);
        assert!(h.sub.is_live());
        assert_eq!(h.sub.page_timeout(), None);
        // Live: at once, and never twice.
        assert_eq!(h.with(|s, cx| s.offer(SUB, ev(7), cx)), None);
        assert_eq!(h.with(|s, cx| s.offer(SUB, ev(7), cx)), None);
        assert_eq!(h.delivered(), [7]);
        assert_eq!(h.sub.last(), ts(7));
    }

    #[test]
    fn an_empty_page_completes_up_to_the_position() {
        let mut h = Harness::new(Start::After(ts(2)), Config::default());
        h.sub.subscribing();
        let req = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).unwrap();
        assert_eq!(req.after, Some(ts(2)));
        assert_eq!(h.with(|s, cx| s.on_page(SUB, req.id, Ok(""), None, cx)), None);
        assert!(h.sub.is_live());
        assert_eq!(h.delivered(), [] as [u32; 0]);
    }

    #[test]
    fn start_now_and_an_up_to_date_cursor_go_live_without_the_log() {
        let mut h = Harness::new(Start::Now, Config::default());
        h.sub.subscribing();
        assert_eq!(h.with(|s, cx| s.on_position(SUB, ts(9), cx)), None);
        assert!(h.sub.is_live());
        assert_eq!(h.sub.last(), ts(9));
    }

    #[test]
    fn a_renewal_behind_the_last_event_is_continuity_lost() {
        let mut h = Harness::new(Start::Now, Config::default());
        h.sub.subscribing();
        let _ = h.with(|s, cx| s.on_position(SUB, ts(3), cx));
        let _ = h.with(|s, cx| s.offer(SUB, ev(5), cx));
        assert_eq!(h.delivered(), [5]);
        h.sub.disconnected();
        assert!(h.sub.is_offline());
        h.sub.subscribing();
        assert_eq!(h.with(|s, cx| s.on_position(SUB, ts(4), cx)), None);
        assert_eq!(h.events.pop_front(), Some(ClientEvent::ContinuityLost { sub: SUB, last: ts(5), position: ts(4) }));
        assert!(h.sub.is_live(), "delivery resumes after the last event");
    }

    /// A log whose horizon (the newest event deleted from it) is after the last event
    /// delivered lost events the subscription never delivered: continuity lost, once, and
    /// delivery goes on with what the log has. A subscription from the beginning is not told.
    #[test]
    fn a_horizon_after_the_last_event_is_continuity_lost() {
        let mut h = Harness::new(Start::After(ts(2)), Config::default());
        h.sub.subscribing();
        let req = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).expect("a page");
        assert_eq!(req.after, Some(ts(2)));
        let next = h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[7, 8])), Some(ts(6)), cx)).expect("the next page");
        assert_eq!(h.events.pop_front(), Some(ClientEvent::ContinuityLost { sub: SUB, last: ts(2), position: ts(6) }));
        assert_eq!(h.delivered(), [7, 8]);
        assert_eq!(h.with(|s, cx| s.on_page(SUB, next.id, Ok(&body(&[9])), Some(ts(6)), cx)), None);
        assert_eq!(h.delivered(), [9], "reported once");
        assert!(h.sub.is_live());

        // Up to date with the horizon: nothing to report.
        let mut h = Harness::new(Start::After(ts(6)), Config::default());
        h.sub.subscribing();
        let req = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).expect("a page");
        assert_eq!(h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[7, 8, 9])), Some(ts(6)), cx)), None);
        assert_eq!(h.delivered(), [7, 8, 9]);
        // From the beginning: what is left.
        let mut h = Harness::new(Start::Beginning, Config::default());
        h.sub.subscribing();
        let req = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).expect("a page");
        assert_eq!(h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[7, 8, 9])), Some(ts(6)), cx)), None);
        assert_eq!(h.delivered(), [7, 8, 9]);
    }

    #[test]
    fn a_reconnect_forgets_the_page_in_flight_and_the_buffer() {
        let mut h = Harness::new(Start::Beginning, Config::default());
        h.sub.subscribing();
        let req = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).unwrap();
        let _ = h.with(|s, cx| s.offer(SUB, ev(10), cx));
        h.sub.disconnected();
        assert_eq!((h.sub.awaits_page(req.id), h.sub.page_timeout()), (false, None));
        assert_eq!(h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[1])), None, cx)), None, "a late page is ignored");
        h.sub.subscribing();
        let again = h.with(|s, cx| s.on_position(SUB, ts(10), cx)).unwrap();
        assert_eq!(again.after, None, "starts over from the last delivered event");
        assert_eq!(h.with(|s, cx| s.on_page(SUB, again.id, Ok(&body(&[1, 10])), None, cx)), None);
        assert_eq!(h.delivered(), [1, 10]);
    }

    #[test]
    fn failed_and_lost_pages_are_requested_again() {
        let mut h = Harness::new(Start::Beginning, Config::default().min_backoff(100).request_timeout(1000));
        h.sub.subscribing();
        let first = h.with(|s, cx| s.on_position(SUB, ts(9), cx)).unwrap();
        // Failures back off: 100, then 200.
        assert_eq!(h.with(|s, cx| s.on_page(SUB, first.id, Err("HTTP 500: boom".into()), None, cx)), None);
        assert!(matches!(h.events.pop_front(), Some(ClientEvent::Warning(w)) if w == "log fetch for /s failed (HTTP 500: boom); retrying"));
        assert_eq!(h.sub.page_timeout(), Some(100));
        h.now = 99;
        assert_eq!(h.with(|s, cx| s.on_timeout(cx)), (false, None));
        h.now = 100;
        let (lost, second) = h.with(|s, cx| s.on_timeout(cx));
        let second = second.unwrap();
        assert!(!lost && second.id != first.id && second.after.is_none());
        assert_eq!(h.with(|s, cx| s.on_page(SUB, second.id, Ok("not a log line"), None, cx)), None);
        assert!(matches!(h.events.pop_front(), Some(ClientEvent::Warning(w)) if w.contains("unparsable log line")));
        assert_eq!(h.sub.page_timeout(), Some(300));
        h.now = 300;
        let third = h.with(|s, cx| s.on_timeout(cx)).1.unwrap();
        // No answer by the deadline: lost, and made again at once.
        assert_eq!(h.sub.page_timeout(), Some(1300));
        h.now = 1300;
        let (lost, fourth) = h.with(|s, cx| s.on_timeout(cx));
        assert!(lost);
        let fourth = fourth.unwrap();
        assert_eq!(h.with(|s, cx| s.on_page(SUB, third.id, Ok(&body(&[1])), None, cx)), None, "not the outstanding request");
        assert!(!h.sub.awaits_page(third.id) && h.sub.awaits_page(fourth.id));
        assert_eq!(h.with(|s, cx| s.on_page(SUB, fourth.id, Ok(""), None, cx)), None);
        assert!(h.sub.is_live());
    }

    #[test]
    fn a_full_buffer_forgets_live_events_and_the_backfill_fetches_them() {
        let mut h = Harness::new(Start::Now, Config::default().max_buffered(2));
        h.sub.subscribing();
        // Live events before the ack overflow the buffer: the newest is remembered.
        for n in 5..9 {
            let _ = h.with(|s, cx| s.offer(SUB, ev(n), cx));
        }
        // The position is before them (they took effect after it): the backfill reaches them.
        let req = h.with(|s, cx| s.on_position(SUB, ts(4), cx)).expect("the forgotten events are fetched");
        assert_eq!(req.after, Some(ts(4)));
        let _ = h.with(|s, cx| s.offer(SUB, ev(9), cx));
        let _ = h.with(|s, cx| s.offer(SUB, ev(10), cx));
        let _ = h.with(|s, cx| s.offer(SUB, ev(11), cx)); // over the bound again: 8..10 forgotten, target 10
        let next = h.with(|s, cx| s.on_page(SUB, req.id, Ok(&body(&[5, 6, 7, 8])), None, cx)).expect("up to 11");
        assert_eq!(next.after, Some(ts(8)));
        assert_eq!(h.with(|s, cx| s.on_page(SUB, next.id, Ok(&body(&[9, 10, 11])), None, cx)), None);
        assert_eq!(h.delivered(), [5, 6, 7, 8, 9, 10, 11]);
        assert!(h.sub.is_live());
    }
}
