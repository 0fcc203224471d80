//! Requests awaiting their reply (by ack key), their deadlines, the offline queue, and the
//! sends whose ack was lost, waiting to be resent with their id (`docs/PROTOCOL.md` 5.9).
//!
//! Ack keys are allocated in increasing order, and every deadline is the request's time plus
//! the same timeout, so deadlines grow with the key: the earliest one is the first entry, and
//! expired requests leave from the front. (A deadline is raised to the previous one if the
//! driver's clock ever went back, which keeps that true whatever the input.)

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::collections::VecMap;
use super::debug::{PendingDebug, QueuedDebug};
use super::{ClientError, ClientEvent, Millis, RequestId, SubId, WatchId};
use crate::timestamp::Timestamp;
use crate::wire::{Command, Op};

/// A command awaiting its reply that has no deadline of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    /// `+path`, for this subscription.
    Subscribe(SubId),
    /// `-path`.
    Unsubscribe,
    /// `@` sent by the keepalive (the probe timer covers it).
    Probe,
    /// `&token`: an in-band token refresh, of the client's token number (generation) so.
    Refresh(u64),
    /// `~+path`, for this presence watch.
    Watch(WatchId),
}

/// A send of the application, with its idempotency id.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SendReq {
    pub(super) id: RequestId,
    pub(super) path: String,
    pub(super) data: Vec<u8>,
    /// Its send id (`<instance>.<counter>`): the same at every resend.
    pub(super) send_id: String,
    /// When it was first written to a connection (`None`: never written).
    pub(super) first_sent: Option<Millis>,
    /// Whether it was last written with its id (`*ID`); false: as a plain send.
    pub(super) with_id: bool,
}

impl SendReq {
    /// A send not written yet.
    pub(super) fn new(id: RequestId, path: String, data: Vec<u8>, send_id: String) -> SendReq {
        SendReq { id, path, data, send_id, first_sent: None, with_id: false }
    }
}

/// What a reply answers.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answered {
    /// A command without a deadline.
    Control(Control),
    /// A send: its event, to insert in the subscriptions once stored (or to resend plain).
    Send(SendReq),
    /// A timestamp request.
    Time { id: RequestId },
    /// A presence query (`~?path`).
    Query { id: RequestId },
}

#[derive(Debug)]
enum Kind {
    Send(SendReq),
    Time,
    Query,
}

/// A send or timestamp request: the application waits for its outcome.
#[derive(Debug)]
struct Timed {
    id: RequestId,
    deadline: Millis,
    kind: Kind,
}

impl Timed {
    fn outcome(self, result: Result<Timestamp, ClientError>) -> ClientEvent {
        match self.kind {
            Kind::Send(_) => ClientEvent::Sent { id: self.id, result },
            Kind::Time => ClientEvent::Time { id: self.id, result },
            // Only ever failed here (a query's success is its snapshot).
            Kind::Query => ClientEvent::Who { id: self.id, result: result.and(Err(ClientError::ConnectionLost)) },
        }
    }
}

/// A send made while disconnected.
#[derive(Debug)]
pub(super) struct QueuedSend {
    pub(super) req: SendReq,
    queued_at: Millis,
}

/// Everything sent or queued that awaits an outcome.
#[derive(Debug)]
pub(super) struct Requests {
    next_key: u64,
    /// Sends and timestamp requests by ack key (their deadlines grow with the key).
    timed: VecMap<u64, Timed>,
    /// Subscribes, unsubscribes and probes by ack key.
    control: VecMap<u64, Control>,
    /// Sends made while disconnected, oldest first.
    offline: VecDeque<QueuedSend>,
    /// Sends written with their id whose connection dropped before the ack, in send order:
    /// resent (with the same id) first thing on the next connection. All older than the
    /// offline queue's (which is empty while connected, and these are only added at a
    /// disconnect).
    resend: VecDeque<SendReq>,
}

impl Requests {
    pub(super) fn new() -> Requests {
        Requests { next_key: 1, timed: VecMap::new(), control: VecMap::new(), offline: VecDeque::new(), resend: VecDeque::new() }
    }

    /// A fresh ack key, and the frame of `op` with it.
    fn frame(&mut self, op: Op<'_>) -> (u64, String) {
        let key = self.next_key;
        self.next_key += 1;
        let wire = key.to_string();
        let line = Command { ack: Some(wire.as_bytes()), op }.to_bytes();
        // Commands are built from UTF-8 parts (paths are ASCII, data is `&str`).
        let text = String::from_utf8(line).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        (key, text)
    }

    /// The ack key of the last frame made.
    pub(super) fn last_key(&self) -> u64 {
        self.next_key.saturating_sub(1)
    }

    /// The frame of a subscribe, unsubscribe or probe; its reply is awaited.
    pub(super) fn control(&mut self, op: Op<'_>, control: Control) -> String {
        let (key, frame) = self.frame(op);
        self.control.insert(key, control);
        frame
    }

    fn insert_timed(&mut self, key: u64, id: RequestId, deadline: Millis, kind: Kind) {
        let deadline = self.timed.last().map_or(deadline, |t| deadline.max(t.deadline));
        self.timed.insert(key, Timed { id, deadline, kind });
    }

    /// The length in bytes of the frame that [`Requests::send`] would build now for `path`
    /// and `data_len` bytes of data: `#key#:path:data`, or with a send id of `id_len` bytes
    /// `#key#*ID:path:data`.
    pub(super) fn send_len(&self, path: &str, data_len: usize, id_len: Option<usize>) -> usize {
        let mut digits = 1;
        let mut k = self.next_key;
        while k >= 10 {
            k /= 10;
            digits += 1;
        }
        digits + path.len() + data_len + 4 + id_len.map_or(0, |n| n + 1)
    }

    /// The frame of a send, with its id when `with_id` (`#key#*ID:path:data`, `docs/PROTOCOL.md`
    /// 5.9) or plain (`#key#:path:data`); it awaits its reply until `deadline`.
    pub(super) fn send(&mut self, mut req: SendReq, with_id: bool, deadline: Millis) -> String {
        let id = with_id.then_some(req.send_id.as_bytes());
        let (key, frame) = self.frame(Op::Send { path: req.path.as_str().into(), data: &req.data, id });
        req.with_id = with_id;
        let id = req.id;
        self.insert_timed(key, id, deadline, Kind::Send(req));
        frame
    }

    /// The frame of a timestamp request; it fails with [`ClientError::Timeout`] at `deadline`.
    pub(super) fn time(&mut self, id: RequestId, deadline: Millis) -> String {
        let (key, frame) = self.frame(Op::Timestamp);
        self.insert_timed(key, id, deadline, Kind::Time);
        frame
    }

    /// The frame of a presence query (`~?path`); it fails with [`ClientError::Timeout`] at
    /// `deadline`.
    pub(super) fn query(&mut self, id: RequestId, path: &str, deadline: Millis) -> String {
        let (key, frame) = self.frame(Op::PresenceQuery(path.into()));
        self.insert_timed(key, id, deadline, Kind::Query);
        frame
    }

    /// What the reply with ack key `key` answers, if anything is waiting for it.
    pub(super) fn answer(&mut self, key: &[u8]) -> Option<Answered> {
        let key = core::str::from_utf8(key).ok().and_then(|k| k.parse::<u64>().ok())?;
        if let Some(t) = self.timed.remove(&key) {
            return Some(match t.kind {
                Kind::Send(req) => Answered::Send(req),
                Kind::Time => Answered::Time { id: t.id },
                Kind::Query => Answered::Query { id: t.id },
            });
        }
        self.control.remove(&key).map(Answered::Control)
    }

    /// Fails every request awaiting a reply with `err`, in request order (the connection is
    /// gone, or the client closed). Queued offline sends are not affected.
    pub(super) fn fail_sent(&mut self, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        self.control.clear();
        while let Some(t) = self.timed.pop_first() {
            events.push_back(t.outcome(Err(err.clone())));
        }
    }

    /// The connection is gone: the sends written with their id keep them to be resent on the
    /// next connection (when `resend`), in send order; every other request awaiting a reply
    /// fails with [`ClientError::ConnectionLost`] (a plain send's outcome is unknown).
    pub(super) fn connection_lost(&mut self, resend: bool, events: &mut VecDeque<ClientEvent>) {
        self.control.clear();
        let mut kept = Vec::new();
        while let Some(t) = self.timed.pop_first() {
            match t.kind {
                Kind::Send(req) if resend && req.with_id => kept.push(req),
                _ => events.push_back(t.outcome(Err(ClientError::ConnectionLost))),
            }
        }
        // Ack keys follow the writes; a send resent plain (after `malformed`) was written
        // again later than sends made after it: the application's order is the request id's.
        kept.sort_by_key(|r| r.id);
        // Those that waited already (none: they are resent at each connection) come first.
        self.resend.extend(kept);
    }

    /// The oldest send to resend, now that a connection is up.
    pub(super) fn take_resend(&mut self) -> Option<SendReq> {
        self.resend.pop_front()
    }

    /// When the oldest send awaiting its resend can no longer be resent (`window` after it
    /// was first written).
    pub(super) fn resend_deadline(&self, window: Millis) -> Option<Millis> {
        self.resend.iter().filter_map(|r| r.first_sent).map(|t| t.saturating_add(window)).min()
    }

    /// Fails the sends awaiting their resend whose `window` passed with `err`.
    pub(super) fn expire_resend(&mut self, now: Millis, window: Millis, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        self.resend.retain(|r| {
            let passed = r.first_sent.is_some_and(|t| t.saturating_add(window) <= now);
            if passed {
                events.push_back(ClientEvent::Sent { id: r.id, result: Err(err.clone()) });
            }
            !passed
        });
    }

    /// Fails every send awaiting its resend with `err`, oldest first.
    pub(super) fn fail_resend(&mut self, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        while let Some(r) = self.resend.pop_front() {
            events.push_back(ClientEvent::Sent { id: r.id, result: Err(err.clone()) });
        }
    }

    /// Whether a send written with its id is among the requests whose deadline passed: its
    /// reply is lost (the connection is stuck), and it is resent on a new connection.
    pub(super) fn id_send_overdue(&self, now: Millis) -> bool {
        self.timed.values().take_while(|t| t.deadline <= now).any(|t| matches!(&t.kind, Kind::Send(r) if r.with_id))
    }

    /// The earliest deadline of a request awaiting its reply.
    pub(super) fn next_deadline(&self) -> Option<Millis> {
        self.timed.first().map(|t| t.deadline)
    }

    /// Fails the requests whose deadline passed with [`ClientError::Timeout`]; `send_expired`
    /// gets the path of each send among them.
    pub(super) fn expire(&mut self, now: Millis, events: &mut VecDeque<ClientEvent>, mut send_expired: impl FnMut(String)) {
        while self.timed.first().is_some_and(|t| t.deadline <= now) {
            if let Some(mut t) = self.timed.pop_first() {
                if let Kind::Send(req) = &mut t.kind {
                    send_expired(core::mem::take(&mut req.path));
                }
                events.push_back(t.outcome(Err(ClientError::Timeout)));
            }
        }
    }

    /// Whether the send, time or presence query `id` still awaits its reply.
    pub(super) fn is_pending(&self, id: RequestId) -> bool {
        self.timed.values().any(|t| t.id == id)
    }

    /// How many sends into `channel` (or below it) await their reply.
    pub(super) fn sends_within(&self, channel: &str) -> usize {
        self.timed.values().filter(|t| matches!(&t.kind, Kind::Send(r) if crate::path::is_within(&r.path, channel))).count()
    }

    /// The requests awaiting their reply: the sends and time requests by ack key, then the
    /// others by ack key, for [`Client::debug_state`](super::Client::debug_state).
    pub(super) fn pending_debug(&self) -> impl Iterator<Item = PendingDebug<'_>> {
        let timed = self.timed.iter().map(|(&key, t)| {
            let (kind, path) = match &t.kind {
                Kind::Send(r) => ("send", Some(r.path.as_str())),
                Kind::Time => ("time", None),
                Kind::Query => ("who", None),
            };
            PendingDebug { key, kind, request: Some(t.id), sub: None, path, deadline: Some(t.deadline) }
        });
        let control = self.control.iter().map(|(&key, c)| {
            let (kind, sub) = match *c {
                Control::Subscribe(sub) => ("subscribe", Some(sub)),
                Control::Unsubscribe => ("unsubscribe", None),
                Control::Probe => ("probe", None),
                Control::Refresh(_) => ("refresh", None),
                Control::Watch(_) => ("watch", None),
            };
            PendingDebug { key, kind, request: None, sub, path: None, deadline: None }
        });
        timed.chain(control)
    }

    /// The sends waiting for a connection, oldest first (those awaiting their resend, with
    /// the time they were first written, then the offline queue), for
    /// [`Client::debug_state`](super::Client::debug_state).
    pub(super) fn offline_debug(&self) -> impl Iterator<Item = QueuedDebug<'_>> {
        let resend = self.resend.iter().map(|r| QueuedDebug { id: r.id, path: &r.path, queued_at: r.first_sent.unwrap_or(0) });
        resend.chain(self.offline.iter().map(|q| QueuedDebug { id: q.req.id, path: &q.req.path, queued_at: q.queued_at }))
    }

    /// Queues a send made while disconnected; false when `capacity` sends wait already.
    pub(super) fn queue_offline(&mut self, capacity: usize, now: Millis, req: SendReq) -> bool {
        if self.offline.len() >= capacity {
            return false;
        }
        self.offline.push_back(QueuedSend { req, queued_at: now });
        true
    }

    /// The oldest queued send, to transmit now that a connection is up.
    pub(super) fn take_offline(&mut self) -> Option<QueuedSend> {
        self.offline.pop_front()
    }

    /// When the oldest queued send times out.
    pub(super) fn offline_deadline(&self, timeout: Millis) -> Option<Millis> {
        self.offline.front().map(|q| q.queued_at.saturating_add(timeout))
    }

    /// Fails the queued sends that waited `timeout` with [`ClientError::NotConnected`]: they
    /// were never written, so nothing was stored (not [`ClientError::Timeout`], which means
    /// the reply to a written send never came).
    pub(super) fn expire_offline(&mut self, now: Millis, timeout: Millis, events: &mut VecDeque<ClientEvent>) {
        while self.offline.front().is_some_and(|q| q.queued_at.saturating_add(timeout) <= now) {
            if let Some(q) = self.offline.pop_front() {
                events.push_back(ClientEvent::Sent { id: q.req.id, result: Err(ClientError::NotConnected) });
            }
        }
    }

    /// Fails every queued send with `err`, oldest first.
    pub(super) fn fail_offline(&mut self, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        while let Some(q) = self.offline.pop_front() {
            events.push_back(ClientEvent::Sent { id: q.req.id, result: Err(err.clone()) });
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn drain(events: &mut VecDeque<ClientEvent>) -> Vec<ClientEvent> {
        events.drain(..).collect()
    }

    fn req(id: u64, path: &str, data: &[u8]) -> SendReq {
        SendReq::new(RequestId(id), path.into(), data.to_vec(), alloc::format!("inst.{id}"))
    }

    #[test]
    fn keys_are_allocated_in_order_and_replies_find_their_request() {
        let mut r = Requests::new();
        assert_eq!(r.control(Op::Subscribe("/a".into()), Control::Subscribe(SubId(7))), "#1#+/a");
        assert_eq!(r.send(req(1, "/a", b"x"), false, 100), "#2#:/a:x");
        assert_eq!(r.time(RequestId(2), 100), "#3#@");
        assert_eq!(r.control(Op::Timestamp, Control::Probe), "#4#@");
        assert_eq!(r.answer(b"3"), Some(Answered::Time { id: RequestId(2) }));
        assert_eq!(r.answer(b"3"), None, "answered once");
        assert_eq!(r.answer(b"1"), Some(Answered::Control(Control::Subscribe(SubId(7)))));
        let Some(Answered::Send(sent)) = r.answer(b"2") else { panic!("a send") };
        assert_eq!((sent.id, sent.path.as_str(), sent.data.as_slice(), sent.with_id), (RequestId(1), "/a", &b"x"[..], false));
        assert_eq!(r.answer(b"x"), None);
        assert_eq!(r.answer(b"4"), Some(Answered::Control(Control::Probe)));
    }

    #[test]
    fn deadlines_expire_from_the_front_and_never_go_back() {
        let mut r = Requests::new();
        let mut events = VecDeque::new();
        let _ = r.control(Op::Unsubscribe("/a".into()), Control::Unsubscribe);
        let _ = r.send(req(1, "/a", b""), false, 100);
        let _ = r.time(RequestId(2), 50); // a clock that went back: raised to 100
        let _ = r.time(RequestId(3), 200);
        assert_eq!(r.next_deadline(), Some(100));
        assert_eq!(r.sends_within("/"), 1);
        let mut expired_sends = Vec::new();
        r.expire(99, &mut events, |p| expired_sends.push(p));
        assert!(events.is_empty());
        r.expire(100, &mut events, |p| expired_sends.push(p));
        assert_eq!(expired_sends, ["/a"]);
        assert_eq!(r.sends_within("/"), 0);
        assert_eq!(
            drain(&mut events),
            [
                ClientEvent::Sent { id: RequestId(1), result: Err(ClientError::Timeout) },
                ClientEvent::Time { id: RequestId(2), result: Err(ClientError::Timeout) },
            ]
        );
        assert_eq!(r.next_deadline(), Some(200));
        r.fail_sent(&ClientError::ConnectionLost, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Time { id: RequestId(3), result: Err(ClientError::ConnectionLost) }]);
        assert_eq!((r.next_deadline(), r.answer(b"1")), (None, None), "control requests are dropped too");
    }

    #[test]
    fn the_offline_queue_is_bounded_and_times_out_oldest_first() {
        let mut r = Requests::new();
        let mut events = VecDeque::new();
        assert!(r.queue_offline(2, 0, req(1, "/q", b"1")));
        assert!(r.queue_offline(2, 10, req(2, "/q", b"2")));
        assert!(!r.queue_offline(2, 10, req(3, "/q", b"3")));
        assert_eq!(r.offline_deadline(100), Some(100));
        r.expire_offline(105, 100, &mut events);
        // Never written: certainly not stored.
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(1), result: Err(ClientError::NotConnected) }]);
        assert_eq!(r.offline_deadline(100), Some(110));
        let q = r.take_offline().unwrap().req;
        assert_eq!((q.id, q.path.as_str(), q.data.as_slice()), (RequestId(2), "/q", &b"2"[..]));
        assert!(r.queue_offline(1, 20, req(4, "/q", b"")));
        r.fail_offline(&ClientError::Closed, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(4), result: Err(ClientError::Closed) }]);
        assert_eq!(r.offline_deadline(100), None);
    }

    #[test]
    fn sends_with_ids_wait_for_their_resend_in_send_order_until_the_window_passes() {
        let mut r = Requests::new();
        let mut events = VecDeque::new();
        let mut first = req(1, "/a", b"x");
        first.first_sent = Some(10);
        assert_eq!(r.send_len("/a", 1, Some(first.send_id.len())), "#1#*inst.1:/a:x".len());
        assert_eq!(r.send(first, true, 100), "#1#*inst.1:/a:x");
        let mut plain = req(2, "/a", b"y");
        plain.first_sent = Some(20);
        assert_eq!(r.send(plain, false, 100), "#2#:/a:y");
        let _ = r.time(RequestId(3), 100);
        // Resent plain after `malformed`: a later key for an earlier send.
        let mut late = req(0, "/a", b"w");
        late.first_sent = Some(5);
        let _ = r.send(late, true, 100);
        assert!(!r.id_send_overdue(99));
        assert!(r.id_send_overdue(100));
        r.connection_lost(true, &mut events);
        // The plain send and the time request fail (uncertain); the sends with ids wait.
        assert_eq!(
            drain(&mut events),
            [
                ClientEvent::Sent { id: RequestId(2), result: Err(ClientError::ConnectionLost) },
                ClientEvent::Time { id: RequestId(3), result: Err(ClientError::ConnectionLost) },
            ]
        );
        assert_eq!(r.offline_debug().map(|q| (q.id, q.queued_at)).collect::<Vec<_>>(), [(RequestId(0), 5), (RequestId(1), 10)]);
        assert_eq!(r.resend_deadline(1000), Some(1005));
        r.expire_resend(1005, 1000, &ClientError::WindowPassed, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(0), result: Err(ClientError::WindowPassed) }]);
        let again = r.take_resend().unwrap();
        assert_eq!((again.id, again.send_id.as_str(), again.first_sent), (RequestId(1), "inst.1", Some(10)));
        assert_eq!(r.take_resend(), None);
        // Without resends (a window of 0), everything fails.
        let _ = r.send(again, true, 200);
        r.connection_lost(false, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(1), result: Err(ClientError::ConnectionLost) }]);
        let mut closed = req(9, "/a", b"z");
        closed.first_sent = Some(1);
        let _ = r.send(closed, true, 300);
        r.connection_lost(true, &mut events);
        r.fail_resend(&ClientError::Closed, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(9), result: Err(ClientError::Closed) }]);
    }
}
