//! Requests awaiting their reply (by ack key), their deadlines, and the offline queue.
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

/// What a reply answers.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answered {
    /// A command without a deadline.
    Control(Control),
    /// A send: its event, to insert in the subscriptions once stored.
    Send { id: RequestId, path: String, data: Vec<u8> },
    /// A timestamp request.
    Time { id: RequestId },
    /// A presence query (`~?path`).
    Query { id: RequestId },
}

#[derive(Debug)]
enum Kind {
    Send { path: String, data: Vec<u8> },
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
            Kind::Send { .. } => ClientEvent::Sent { id: self.id, result },
            Kind::Time => ClientEvent::Time { id: self.id, result },
            // Only ever failed here (a query's success is its snapshot).
            Kind::Query => ClientEvent::Who { id: self.id, result: result.and(Err(ClientError::ConnectionLost)) },
        }
    }
}

/// A send made while disconnected.
#[derive(Debug)]
pub(super) struct QueuedSend {
    pub(super) id: RequestId,
    pub(super) path: String,
    pub(super) data: Vec<u8>,
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
}

impl Requests {
    pub(super) fn new() -> Requests {
        Requests { next_key: 1, timed: VecMap::new(), control: VecMap::new(), offline: VecDeque::new() }
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
    /// and `data_len` bytes of data: `#key#:path:data`.
    pub(super) fn send_len(&self, path: &str, data_len: usize) -> usize {
        let mut digits = 1;
        let mut k = self.next_key;
        while k >= 10 {
            k /= 10;
            digits += 1;
        }
        digits + path.len() + data_len + 4
    }

    /// The frame of a send; it fails with [`ClientError::Timeout`] at `deadline`.
    pub(super) fn send(&mut self, id: RequestId, path: String, data: Vec<u8>, deadline: Millis) -> String {
        let (key, frame) = self.frame(Op::Send { path: path.as_str().into(), data: &data, id: None });
        self.insert_timed(key, id, deadline, Kind::Send { path, data });
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
                Kind::Send { path, data } => Answered::Send { id: t.id, path, data },
                Kind::Time => Answered::Time { id: t.id },
                Kind::Query => Answered::Query { id: t.id },
            });
        }
        self.control.remove(&key).map(Answered::Control)
    }

    /// Fails every request awaiting a reply with `err`, in request order (the connection is
    /// gone). Queued offline sends are not affected.
    pub(super) fn fail_sent(&mut self, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        self.control.clear();
        while let Some(t) = self.timed.pop_first() {
            events.push_back(t.outcome(Err(err.clone())));
        }
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
                if let Kind::Send { path, .. } = &mut t.kind {
                    send_expired(core::mem::take(path));
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
        self.timed.values().filter(|t| matches!(&t.kind, Kind::Send { path, .. } if crate::path::is_within(path, channel))).count()
    }

    /// The requests awaiting their reply: the sends and time requests by ack key, then the
    /// others by ack key, for [`Client::debug_state`](super::Client::debug_state).
    pub(super) fn pending_debug(&self) -> impl Iterator<Item = PendingDebug<'_>> {
        let timed = self.timed.iter().map(|(&key, t)| {
            let (kind, path) = match &t.kind {
                Kind::Send { path, .. } => ("send", Some(path.as_str())),
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

    /// The offline queue, oldest first, for [`Client::debug_state`](super::Client::debug_state).
    pub(super) fn offline_debug(&self) -> impl Iterator<Item = QueuedDebug<'_>> {
        self.offline.iter().map(|q| QueuedDebug { id: q.id, path: &q.path, queued_at: q.queued_at })
    }

    /// Queues a send made while disconnected; false when `capacity` sends wait already.
    pub(super) fn queue_offline(&mut self, capacity: usize, now: Millis, id: RequestId, path: String, data: Vec<u8>) -> bool {
        if self.offline.len() >= capacity {
            return false;
        }
        self.offline.push_back(QueuedSend { id, path, data, queued_at: now });
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
                events.push_back(ClientEvent::Sent { id: q.id, result: Err(ClientError::NotConnected) });
            }
        }
    }

    /// Fails every queued send with `err`, oldest first.
    pub(super) fn fail_offline(&mut self, err: &ClientError, events: &mut VecDeque<ClientEvent>) {
        while let Some(q) = self.offline.pop_front() {
            events.push_back(ClientEvent::Sent { id: q.id, result: Err(err.clone()) });
        }
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn drain(events: &mut VecDeque<ClientEvent>) -> Vec<ClientEvent> {
        events.drain(..).collect()
    }

    #[test]
    fn keys_are_allocated_in_order_and_replies_find_their_request() {
        let mut r = Requests::new();
        assert_eq!(r.control(Op::Subscribe("/a".into()), Control::Subscribe(SubId(7))), "#1#+/a");
        assert_eq!(r.send(RequestId(1), "/a".into(), b"x".to_vec(), 100), "#2#:/a:x");
        assert_eq!(r.time(RequestId(2), 100), "#3#@");
        assert_eq!(r.control(Op::Timestamp, Control::Probe), "#4#@");
        assert_eq!(r.answer(b"3"), Some(Answered::Time { id: RequestId(2) }));
        assert_eq!(r.answer(b"3"), None, "answered once");
        assert_eq!(r.answer(b"1"), Some(Answered::Control(Control::Subscribe(SubId(7)))));
        assert_eq!(r.answer(b"2"), Some(Answered::Send { id: RequestId(1), path: "/a".into(), data: b"x".to_vec() }));
        assert_eq!(r.answer(b"x"), None);
        assert_eq!(r.answer(b"4"), Some(Answered::Control(Control::Probe)));
    }

    #[test]
    fn deadlines_expire_from_the_front_and_never_go_back() {
        let mut r = Requests::new();
        let mut events = VecDeque::new();
        let _ = r.control(Op::Unsubscribe("/a".into()), Control::Unsubscribe);
        let _ = r.send(RequestId(1), "/a".into(), vec![], 100);
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
        assert!(r.queue_offline(2, 0, RequestId(1), "/q".into(), b"1".to_vec()));
        assert!(r.queue_offline(2, 10, RequestId(2), "/q".into(), b"2".to_vec()));
        assert!(!r.queue_offline(2, 10, RequestId(3), "/q".into(), b"3".to_vec()));
        assert_eq!(r.offline_deadline(100), Some(100));
        r.expire_offline(105, 100, &mut events);
        // Never written: certainly not stored.
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(1), result: Err(ClientError::NotConnected) }]);
        assert_eq!(r.offline_deadline(100), Some(110));
        let q = r.take_offline().unwrap();
        assert_eq!((q.id, q.path.as_str(), q.data.as_slice()), (RequestId(2), "/q", &b"2"[..]));
        assert!(r.queue_offline(1, 20, RequestId(4), "/q".into(), vec![]));
        r.fail_offline(&ClientError::Closed, &mut events);
        assert_eq!(drain(&mut events), [ClientEvent::Sent { id: RequestId(4), result: Err(ClientError::Closed) }]);
        assert_eq!(r.offline_deadline(100), None);
    }
}
