//! Diagnostics: a read-only view of the client's state ([`Client::debug_state`]), a small
//! ring of recent inputs and outputs that a driver may keep ([`Trace`]), and the JSON writer
//! both are written with ([`JsonWriter`]), for drivers that hand them to JavaScript or a log.
//!
//! They answer "why does this subscription not advance?" from outside the state machine: its
//! phase, what it delivered last, what it waits for (a subscribe ack, a log page and its
//! deadline, a retry, the acks of our own sends that hold its live events back), the requests
//! still unanswered, the timers, and what went over the wire last. Nothing here changes the
//! client. The view copies nothing when taken; reading it (or writing it as JSON) walks the
//! subscriptions and requests once. None of it costs anything until asked for, except the
//! trace, which costs its driver one short copy per entry.
//!
//! The JSON is written by hand (digits, escapes), without `core::fmt`, to keep the
//! WebAssembly package small.

use alloc::string::String;
use alloc::vec::Vec;

use super::timer::Timer;
use super::{Client, ConnState, Millis, RequestId, SubId};
use crate::timestamp::Timestamp;

/// A read-only view of a [`Client`] (see [`Client::debug_state`]): its scalars, and its
/// subscriptions, pending requests and offline queue walked on demand ([`DebugState::subs`],
/// [`DebugState::pending`], [`DebugState::offline`]), so that taking it copies and allocates
/// nothing. Times are the driver's milliseconds ([`Millis`]); the earliest of the timers and
/// deadlines is [`Client::poll_timeout`].
#[derive(Debug, Clone, Copy)]
pub struct DebugState<'a> {
    /// The connection state.
    pub state: ConnState,
    /// When the connection attempt in progress is abandoned.
    pub connect_timer: Option<Millis>,
    /// When the next connection attempt starts.
    pub retry_timer: Option<Millis>,
    /// When silence on the connection makes the client send a probe.
    pub idle_timer: Option<Millis>,
    /// When an unanswered probe counts the connection as dead.
    pub probe_timer: Option<Millis>,
    client: &'a Client,
}

/// One subscription in a [`DebugState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubDebug<'a> {
    /// Its id.
    pub id: SubId,
    /// Its normalized path.
    pub path: &'a str,
    /// "offline" (not subscribed on the current connection), "subscribing" (waiting for the
    /// ack), "backfilling" (reading the log up to `target`) or "live".
    pub phase: &'static str,
    /// The last timestamp delivered (the resume cursor).
    pub last: Timestamp,
    /// Backfilling: everything up to here is known (delivered or buffered).
    pub complete: Option<Timestamp>,
    /// Backfilling: the position to read the log up to. Subscribing: the newest live event
    /// forgotten meanwhile because the buffer was full, if any (the backfill goes that far).
    pub target: Option<Timestamp>,
    /// Events buffered, not yet delivered.
    pub buffered: usize,
    /// The log page in flight: its request id and cursor.
    pub page: Option<(u64, Option<Timestamp>)>,
    /// When the page in flight counts as lost and is requested again.
    pub page_deadline: Option<Millis>,
    /// When a failed or lost page is requested again.
    pub page_retry: Option<Millis>,
    /// Failed pages in a row.
    pub page_failures: u32,
    /// Our sends into this channel that await their ack: while there are any, live events
    /// after `released` are held back.
    pub own_unacked: u32,
    /// While `own_unacked > 0`: live events up to here may be delivered (the newest of our
    /// acks).
    pub released: Option<Timestamp>,
}

/// One unanswered request in a [`DebugState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDebug<'a> {
    /// The ack key on the wire.
    pub key: u64,
    /// "subscribe", "unsubscribe", "probe", "refresh", "watch" (a presence watch), "send",
    /// "time" or "who" (a presence query).
    pub kind: &'static str,
    /// The id of a send or time request.
    pub request: Option<RequestId>,
    /// The subscription of a subscribe.
    pub sub: Option<SubId>,
    /// The path of a send.
    pub path: Option<&'a str>,
    /// When a send or time request times out.
    pub deadline: Option<Millis>,
}

/// A send queued while disconnected, in a [`DebugState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedDebug<'a> {
    /// The send's id.
    pub id: RequestId,
    /// Its path.
    pub path: &'a str,
    /// When it was queued.
    pub queued_at: Millis,
}

impl Client {
    /// A view of the state, for diagnostics (see [`DebugState`]); changes nothing.
    pub fn debug_state(&self) -> DebugState<'_> {
        DebugState {
            state: self.state,
            connect_timer: self.timers.get(Timer::Connect),
            retry_timer: self.timers.get(Timer::Retry),
            idle_timer: self.timers.get(Timer::Idle),
            probe_timer: self.timers.get(Timer::Probe),
            client: self,
        }
    }
}

impl<'a> DebugState<'a> {
    /// Every subscription, by id.
    pub fn subs(&self) -> impl Iterator<Item = SubDebug<'a>> + use<'a> {
        self.client.subs.iter().map(|(id, s)| s.debug(*id))
    }

    /// The requests written to the connection and not answered yet: the sends and time
    /// requests by ack key, then the subscribes, unsubscribes and probes by ack key.
    pub fn pending(&self) -> impl Iterator<Item = PendingDebug<'a>> + use<'a> {
        self.client.requests.pending_debug()
    }

    /// The sends waiting for a connection, oldest first.
    pub fn offline(&self) -> impl Iterator<Item = QueuedDebug<'a>> + use<'a> {
        self.client.requests.offline_debug()
    }

    /// The view as one JSON object (timestamps as strings, absent values as `null`).
    pub fn to_json(&self) -> String {
        let mut j = JsonWriter::new();
        self.write_json(&mut j, "");
        j.finish()
    }

    /// Writes the view as a JSON object, under `key` (`""`: as a bare value).
    pub fn write_json(&self, j: &mut JsonWriter, key: &str) {
        j.object(key);
        let (state, attempt) = match self.state {
            ConnState::Idle => ("idle", None),
            ConnState::Connecting { attempt } => ("connecting", Some(attempt)),
            ConnState::Connected => ("connected", None),
            ConnState::Reconnecting { attempt, .. } => ("reconnecting", Some(attempt)),
            ConnState::Closed => ("closed", None),
            ConnState::AwaitingToken => ("awaiting-token", None),
            ConnState::Unauthorized => ("unauthorized", None),
        };
        j.str("state", state);
        j.num("attempt", attempt.map(u64::from));
        j.num("connectTimer", self.connect_timer);
        j.num("retryTimer", self.retry_timer);
        j.num("idleTimer", self.idle_timer);
        j.num("probeTimer", self.probe_timer);
        j.array("subscriptions");
        for s in self.subs() {
            j.object("");
            j.num("id", Some(s.id.0));
            j.str("path", s.path);
            j.str("phase", s.phase);
            j.ts("last", Some(s.last));
            j.ts("complete", s.complete);
            j.ts("target", s.target);
            j.num("buffered", Some(s.buffered as u64));
            match s.page {
                Some((id, after)) => {
                    j.object("page");
                    j.num("id", Some(id));
                    j.ts("after", after);
                    j.end_object();
                }
                None => j.null("page"),
            }
            j.num("pageDeadline", s.page_deadline);
            j.num("pageRetry", s.page_retry);
            j.num("pageFailures", Some(u64::from(s.page_failures)));
            j.num("ownUnacked", Some(u64::from(s.own_unacked)));
            j.ts("released", s.released);
            j.end_object();
        }
        j.end_array();
        // Presence watches: phase, and what the application was told.
        j.array("presence");
        for (id, w) in self.client.watches.iter() {
            j.object("");
            j.num("id", Some(id.0));
            j.str("path", &w.path);
            j.str("phase", w.phase_name());
            j.num("count", w.view().map(|v| v.count()));
            j.num("members", w.view().map(|v| v.listed() as u64));
            j.end_object();
        }
        j.end_array();
        j.array("pending");
        for p in self.pending() {
            j.object("");
            j.num("key", Some(p.key));
            j.str("kind", p.kind);
            j.num("request", p.request.map(|r| r.0));
            j.num("sub", p.sub.map(|s| s.0));
            match p.path {
                Some(path) => j.str("path", path),
                None => j.null("path"),
            }
            j.num("deadline", p.deadline);
            j.end_object();
        }
        j.end_array();
        j.array("offline");
        for q in self.offline() {
            j.object("");
            j.num("request", Some(q.id.0));
            j.str("path", q.path);
            j.num("queuedAt", Some(q.queued_at));
            j.end_object();
        }
        j.end_array();
        j.end_object();
    }
}

/// The most text kept of one [`Trace`] entry, in bytes (a cut entry ends with "…" on top).
pub const TRACE_TEXT: usize = 160;

/// A ring of the last inputs and outputs of a client (frames in and out, connection changes,
/// log pages), kept by a driver for diagnostics: a fixed number of entries, each cut to
/// [`TRACE_TEXT`] bytes, so its memory stays bounded however long the client runs. Once full,
/// a push reuses the oldest entry's buffer: no allocation.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    cap: usize,
    /// The oldest entry once full (the next one overwritten).
    next: usize,
    total: u64,
    entries: Vec<TraceEntry>,
}

/// One [`Trace`] entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// When (the driver's milliseconds).
    pub at: Millis,
    /// What, chosen by the driver: for example "in" (a frame received), "out" (a frame
    /// sent), "open", "close", "log?" (a page requested), "log" (a page received).
    pub kind: &'static str,
    /// The frame or a description, cut to [`TRACE_TEXT`] bytes (then ending with "…").
    pub text: String,
}

impl Trace {
    /// A trace of the last `cap` entries (0 keeps nothing but the count).
    pub fn new(cap: usize) -> Trace {
        Trace { cap, next: 0, total: 0, entries: Vec::new() }
    }

    /// Records an entry, replacing the oldest beyond the capacity.
    pub fn push(&mut self, at: Millis, kind: &'static str, text: &str) {
        self.total += 1;
        if self.cap == 0 {
            return;
        }
        let mut end = text.len().min(TRACE_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let entry = if self.entries.len() < self.cap {
            self.entries.push(TraceEntry { at, kind, text: String::new() });
            self.entries.last_mut()
        } else {
            let e = self.entries.get_mut(self.next);
            self.next = (self.next + 1) % self.cap;
            e
        };
        if let Some(e) = entry {
            e.at = at;
            e.kind = kind;
            e.text.clear();
            e.text.push_str(&text[..end]);
            if end < text.len() {
                e.text.push('…');
            }
        }
    }

    /// The entries kept, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &TraceEntry> {
        let (newer, older) = self.entries.split_at(self.next.min(self.entries.len()));
        older.iter().chain(newer)
    }

    /// How many entries were ever recorded (also those no longer kept).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The entries as a JSON array of `{"at":..,"kind":..,"text":..}`, oldest first.
    pub fn to_json(&self) -> String {
        let mut j = JsonWriter::new();
        self.write_json(&mut j, "");
        j.finish()
    }

    /// Writes the entries as a JSON array under `key` (`""`: as a bare value).
    pub fn write_json(&self, j: &mut JsonWriter, key: &str) {
        j.array(key);
        for e in self.entries() {
            j.object("");
            j.num("at", Some(e.at));
            j.str("kind", e.kind);
            j.str("text", &e.text);
            j.end_object();
        }
        j.end_array();
    }
}

/// A minimal JSON writer for diagnostics: it puts the commas between members and elements
/// and escapes strings. Every method takes the member's key; `""` writes a bare value (an
/// array element, or the document itself). Keys are written as given (no escaping).
#[derive(Debug, Default)]
pub struct JsonWriter(String);

impl JsonWriter {
    /// An empty document.
    pub fn new() -> JsonWriter {
        JsonWriter(String::new())
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.0
    }

    fn key(&mut self, k: &str) {
        if !matches!(self.0.as_bytes().last(), Some(b'{' | b'[') | None) {
            self.0.push(',');
        }
        if !k.is_empty() {
            self.0.push('"');
            self.0.push_str(k);
            self.0.push_str("\":");
        }
    }

    /// Opens an object.
    pub fn object(&mut self, k: &str) {
        self.key(k);
        self.0.push('{');
    }

    /// Closes the innermost object.
    pub fn end_object(&mut self) {
        self.0.push('}');
    }

    /// Opens an array.
    pub fn array(&mut self, k: &str) {
        self.key(k);
        self.0.push('[');
    }

    /// Closes the innermost array.
    pub fn end_array(&mut self) {
        self.0.push(']');
    }

    /// `null`.
    pub fn null(&mut self, k: &str) {
        self.key(k);
        self.0.push_str("null");
    }

    /// `true` or `false`.
    pub fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
    }

    /// A number (`null` for `None`).
    pub fn num(&mut self, k: &str, v: Option<u64>) {
        let Some(n) = v else { return self.null(k) };
        self.key(k);
        self.digits(n, 1);
    }

    /// `n` in decimal, with at least `width` digits (at most 20).
    fn digits(&mut self, mut n: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut i = digits.len();
        while n > 0 || i + width > digits.len() {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        for &d in &digits[i..] {
            self.0.push(char::from(d));
        }
    }

    /// A timestamp, as a string in its wire form (`null` for `None`).
    pub fn ts(&mut self, k: &str, v: Option<Timestamp>) {
        let Some(t) = v else { return self.null(k) };
        self.key(k);
        self.0.push('"');
        self.digits(t.secs(), 10);
        self.0.push('.');
        self.digits(u64::from(t.subsec_nanos()), 9);
        self.0.push('"');
    }

    /// A string, escaped.
    pub fn str(&mut self, k: &str, s: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.key(k);
        let o = &mut self.0;
        o.push('"');
        for c in s.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                '\n' => o.push_str("\\n"),
                '\0'..'\x20' => {
                    o.push_str("\\u00");
                    o.push(char::from(HEX[(c as usize) >> 4]));
                    o.push(char::from(HEX[(c as usize) & 15]));
                }
                c => o.push(c),
            }
        }
        o.push('"');
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::client::{Action, Config, Start};

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn ts(n: u32) -> Timestamp {
        Timestamp::new(1_700_000_000, n).unwrap()
    }

    #[test]
    fn the_snapshot_shows_phases_holds_pending_requests_timers_and_pages() {
        let cfg = Config::default();
        let mut c = Client::new(cfg.clone(), 1);
        let d = c.debug_state();
        assert_eq!((d.state, d.subs().count(), d.connect_timer), (ConnState::Idle, 0, None));
        c.start(0);
        assert_eq!(c.poll_action(), Some(Action::Connect));
        assert_eq!(c.debug_state().connect_timer, Some(cfg.connect_timeout));
        // Offline: the send waits in the queue, the subscription knows nothing yet.
        let queued = c.send(5, "/a/q", "offline").unwrap();
        let sub = c.subscribe(6, "/a", Start::Beginning).unwrap();
        let d = c.debug_state();
        assert_eq!(d.offline().collect::<Vec<_>>(), vec![QueuedDebug { id: queued, path: "/a/q", queued_at: 5 }]);
        let s: Vec<_> = d.subs().collect();
        assert_eq!((s.len(), s[0].id, s[0].path, s[0].phase, s[0].own_unacked), (1, sub, "/a", "offline", 0));
        c.handle_connected(10);
        while c.poll_action().is_some() {}
        let d = c.debug_state();
        assert_eq!(d.state, ConnState::Connected);
        assert!(d.offline().next().is_none());
        assert_eq!((d.connect_timer, d.idle_timer), (None, Some(10 + cfg.idle_timeout)));
        // The subscribe (key 1) and the queued send (key 2): sends first.
        let pending: Vec<_> = d.pending().collect();
        let kinds: Vec<_> = pending.iter().map(|p| (p.key, p.kind, p.sub, p.path)).collect();
        assert_eq!(kinds, [(2, "send", None, Some("/a/q")), (1, "subscribe", Some(sub), None)]);
        assert_eq!((pending[0].request, pending[0].deadline), (Some(queued), Some(10 + cfg.request_timeout)));
        let s = d.subs().next().unwrap();
        assert_eq!((s.phase, s.own_unacked, s.released), ("subscribing", 1, Some(Timestamp::ZERO)));
        // The subscribe's ack: backfilling up to the position, a page in flight.
        c.handle_frame(20, &alloc::format!("#1#@{}", ts(5)));
        let d = c.debug_state();
        let s = d.subs().next().unwrap();
        assert_eq!((s.phase, s.complete, s.target), ("backfilling", Some(Timestamp::ZERO), Some(ts(5))));
        assert!(matches!(s.page, Some((_, None))));
        assert_eq!((s.page_deadline, s.page_retry, s.page_failures), (Some(20 + cfg.request_timeout), None, 0));
        assert_eq!(d.pending().count(), 1);
        // A failed page: a retry time instead of a page in flight.
        let Some(Action::FetchLog(req)) = c.poll_action() else { panic!("a log page") };
        c.handle_log_page(21, req.id, Err("down".into()));
        let s = c.debug_state().subs().next().unwrap();
        assert_eq!((s.page, s.page_deadline, s.page_failures), (None, None, 1));
        assert!(s.page_retry.is_some_and(|t| t > 21));
        let json = c.debug_state().to_json();
        assert!(json.starts_with("{\"state\":\"connected\",\"attempt\":null,\"connectTimer\":null,"), "{json}");
        assert!(json.contains("\"phase\":\"backfilling\""), "{json}");
        assert!(json.contains("\"last\":\"0000000000.000000000\",\"complete\":\"0000000000.000000000\""), "{json}");
        assert!(json.contains("\"target\":\"1700000000.000000005\""), "{json}");
        assert!(json.contains("\"page\":null,"), "{json}");
        assert!(json.contains("{\"key\":2,\"kind\":\"send\",\"request\":1,\"sub\":null,\"path\":\"/a/q\",\"deadline\":"), "{json}");
        assert!(json.ends_with("\"offline\":[]}"), "{json}");
    }

    #[test]
    fn the_trace_keeps_the_last_entries_cut_to_size() {
        let mut t = Trace::new(2);
        assert_eq!((t.total(), t.entries().count(), t.to_json().as_str()), (0, 0, "[]"));
        t.push(1, "in", "one");
        t.push(2, "out", "two \"quoted\"\n");
        t.push(3, "in", &"é".repeat(200));
        t.push(4, "close", "code 1006");
        assert_eq!(t.total(), 4);
        let e: Vec<&TraceEntry> = t.entries().collect();
        assert_eq!((e[0].at, e[0].kind), (3, "in"));
        assert_eq!(e[0].text, alloc::format!("{}…", "é".repeat(TRACE_TEXT / 2)), "cut at a character boundary");
        assert_eq!((e[1].at, e[1].kind, e[1].text.as_str()), (4, "close", "code 1006"));
        assert_eq!(e.len(), 2);
        let mut none = Trace::new(0);
        none.push(1, "in", "x");
        assert_eq!((none.total(), none.entries().count()), (1, 0));
    }

    #[test]
    fn the_json_writer_separates_escapes_and_nests() {
        let mut t = Trace::new(4);
        t.push(7, "out", "a\"b\\c\nd\u{1}é");
        let mut j = JsonWriter::new();
        j.object("");
        j.num("zero", Some(0));
        j.num("max", Some(u64::MAX));
        j.num("none", None);
        j.bool("yes", true);
        t.write_json(&mut j, "trace");
        j.array("empty");
        j.end_array();
        j.end_object();
        assert_eq!(
            j.finish(),
            r#"{"zero":0,"max":18446744073709551615,"none":null,"yes":true,"trace":[{"at":7,"kind":"out","text":"a\"b\\c\nd\u0001é"}],"empty":[]}"#
        );
    }
}
