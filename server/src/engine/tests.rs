//! Unit tests of the single-node engine and the fan-out on the in-memory store: group commit,
//! subscribe positions, one delivery per connection, sender exclusion, the slow-consumer
//! rule and the shutdown order. No sockets, no files.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use ivy_client_core::Timestamp;
use tokio::sync::mpsc;

use super::local::{Deleted, LocalEngine, Record, Storage, Visit, WallClock};
use super::memory::MemStorage;
use super::{Completion, Context, Direction, Engine, Publish, PublishError, Publisher, ReadRequest, Retention, queue};
use crate::conn::Conn;
use crate::fanout::{ConnId, FanOut};

/// A memory store whose appends can be held at a gate, and which records each batch's size.
#[derive(Default)]
struct Gated {
    inner: MemStorage,
    batches: Mutex<Vec<usize>>,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl Gated {
    fn close_gate(&self) {
        *self.gate.lock().unwrap() = true;
    }

    fn open_gate(&self) {
        *self.gate.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

impl Storage for Gated {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        self.batches.lock().unwrap().push(records.len());
        let mut closed = self.gate.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.append(records)
    }
    fn commit(&self) -> io::Result<()> {
        self.inner.commit()
    }
    fn acks_before_durable(&self) -> bool {
        false
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        self.inner.last_timestamp()
    }
    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.inner.set_clock_floor(ts)
    }
    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        self.inner.clock_floor()
    }
    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        self.inner.delete(channel, before, own)
    }
    fn horizon(&self, channel: &str) -> Option<super::Horizon> {
        self.inner.horizon(channel)
    }
    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
        self.inner.scan(channel, after, until, dir, visit)
    }
}

struct Fixture {
    engine: Arc<dyn Engine>,
    publisher: Publisher,
    fanout: Arc<FanOut>,
}

fn at(secs: u64, nanos: u32) -> Timestamp {
    Timestamp::new(secs, nanos).unwrap()
}

/// An engine over `storage` whose wall clock stands still at 100 s (timestamps then advance
/// one nanosecond per event).
fn open(storage: Arc<dyn Storage>) -> Fixture {
    let (publisher, requests) = queue();
    let fanout = Arc::new(FanOut::new());
    let engine = LocalEngine::open(
        storage,
        WallClock::from_fn(|| at(100, 0)),
        Retention::default(),
        Context { requests, fanout: fanout.clone(), metrics: Default::default(), idempotency: Default::default() },
    )
    .unwrap();
    Fixture { engine, publisher, fanout }
}

impl Fixture {
    async fn publish(&self, path: &str, data: &str, sender: Option<ConnId>) -> Result<Timestamp, PublishError> {
        let (done, outcome) = Completion::channel();
        let mut request = Publish::new(path, Bytes::copy_from_slice(data.as_bytes()), done);
        request.sender = sender;
        self.publisher.publish(request).await;
        outcome.await.unwrap()
    }

    /// A connection subscribed to `paths`, its queue holding `capacity` messages.
    fn subscriber(&self, id: u64, capacity: usize, paths: &[&str]) -> (Arc<Conn>, mpsc::Receiver<Message>, Vec<Timestamp>) {
        let (conn, rx, _ending) = Conn::new(ConnId(id), capacity);
        let mut positions = Vec::new();
        for p in paths {
            self.fanout.subscribe(&conn, p, |ts| positions.push(ts));
        }
        (conn, rx, positions)
    }

    async fn stop(self) {
        self.publisher.stop().await;
        self.engine.shutdown().await;
    }
}

fn lines(rx: &mut mpsc::Receiver<Message>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        match m {
            Message::Text(t) => out.push(t.as_str().to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn requests_waiting_while_a_batch_is_stored_share_the_next_commit() {
    let storage = Arc::new(Gated::default());
    let f = Arc::new(open(storage.clone()));
    storage.close_gate();
    // The first request is taken alone and held at the gate; 99 more queue up meanwhile.
    let first = tokio::spawn({
        let f = f.clone();
        async move { f.publish("/g", "0", None).await }
    });
    while storage.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut rest = Vec::new();
    for i in 1..100 {
        let f = f.clone();
        rest.push(tokio::spawn(async move { f.publish("/g", &i.to_string(), None).await }));
        // Let each one reach the queue in order.
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    storage.open_gate();
    let mut acks = vec![first.await.unwrap().unwrap()];
    for r in rest {
        acks.push(r.await.unwrap().unwrap());
    }
    assert_eq!(storage.batches(), [1, 99], "one commit for everything that waited");
    // Consecutive timestamps in the order the requests were queued (the clock stands still).
    assert_eq!(acks, (0..100).map(|n| at(100, n)).collect::<Vec<_>>());
    let page = f.engine.read(ReadRequest::new("/g", None, f.engine.visible(), 1000)).await.unwrap();
    assert_eq!(page.count, 100);
    assert_eq!(page.last, Some(at(100, 99)));
    Arc::into_inner(f).unwrap().stop().await;
}

#[tokio::test]
async fn a_batch_is_stored_in_one_commit_even_beyond_the_batch_limit() {
    let storage = Arc::new(Gated::default());
    let f = Arc::new(open(storage.clone()));
    storage.close_gate();
    let first = tokio::spawn({
        let f = f.clone();
        async move { f.publish("/b", "first", None).await }
    });
    while storage.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // More items than one group commit takes (4096): one `POST /publish` stays together.
    let mut outcomes = Vec::new();
    let mut requests = Vec::new();
    for i in 0..5000 {
        let (done, rx) = Completion::channel();
        requests.push(Publish::new("/b", Bytes::from(i.to_string()), done));
        outcomes.push(rx);
    }
    f.publisher.publish_batch(requests).await;
    let last = tokio::spawn({
        let f = f.clone();
        async move { f.publish("/b", "last", None).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    storage.open_gate();
    first.await.unwrap().unwrap();
    let mut acks = Vec::new();
    for rx in outcomes {
        acks.push(rx.await.unwrap().unwrap());
    }
    last.await.unwrap().unwrap();
    assert_eq!(storage.batches(), [1, 5000, 1], "the batch alone in one commit");
    assert_eq!(acks, (1..5001).map(|n| at(100, n)).collect::<Vec<_>>());
    Arc::into_inner(f).unwrap().stop().await;
}

#[tokio::test]
async fn a_subscription_gets_what_follows_its_position_and_the_log_has_the_rest() {
    let f = open(Arc::new(MemStorage::default()));
    let before = f.publish("/a/b", "before", None).await.unwrap();
    let (_conn, mut rx, positions) = f.subscriber(1, 16, &["/a"]);
    assert_eq!(positions, [before], "the position is the newest delivered event");
    let after = f.publish("/a/b", "after", None).await.unwrap();
    assert_eq!(lines(&mut rx), [format!("@{after}:/a/b:after")]);
    // Everything up to the position is in the log, visible.
    let page = f.engine.read(ReadRequest::new("/a", None, positions[0], 10)).await.unwrap();
    assert_eq!(page.lines, format!("@{before}:/a/b:before").into_bytes());
    assert!(f.engine.visible() >= after);
    f.stop().await;
}

#[tokio::test]
async fn an_event_reaches_a_connection_once_however_many_of_its_subscriptions_match() {
    let f = open(Arc::new(MemStorage::default()));
    let (_a, mut rx_a, _) = f.subscriber(1, 16, &["/", "/x", "/x/y", "/x/y/z"]);
    let (_b, mut rx_b, _) = f.subscriber(2, 16, &["/x/y/z"]);
    let (_c, mut rx_c, _) = f.subscriber(3, 16, &["/x/yz", "/q"]);
    let t1 = f.publish("/x/y/z", "1", None).await.unwrap();
    let t2 = f.publish("/x", "2", None).await.unwrap();
    assert_eq!(lines(&mut rx_a), [format!("@{t1}:/x/y/z:1"), format!("@{t2}:/x:2")]);
    assert_eq!(lines(&mut rx_b), [format!("@{t1}:/x/y/z:1")]);
    assert!(lines(&mut rx_c).is_empty(), "/x/yz is not an ancestor of /x/y/z");
    f.stop().await;
}

#[tokio::test]
async fn the_sender_does_not_get_its_own_event() {
    let f = open(Arc::new(MemStorage::default()));
    let (sender, mut rx_sender, _) = f.subscriber(1, 16, &["/s"]);
    let (_other, mut rx_other, _) = f.subscriber(2, 16, &["/s"]);
    let t = f.publish("/s", "mine", Some(sender.id())).await.unwrap();
    assert!(lines(&mut rx_sender).is_empty());
    assert_eq!(lines(&mut rx_other), [format!("@{t}:/s:mine")]);
    // Its next event from elsewhere it gets.
    let t2 = f.publish("/s", "theirs", None).await.unwrap();
    assert_eq!(lines(&mut rx_sender), [format!("@{t2}:/s:theirs")]);
    f.stop().await;
}

/// An event that finds a queue full is not lost: the connection falls behind (it will read the
/// rest from the log), keeps what fit, and holds its replies back to their places; nobody else
/// waits.
#[tokio::test]
async fn a_full_queue_puts_the_connection_behind_and_nobody_else_waits() {
    let f = open(Arc::new(MemStorage::default()));
    let (slow, mut rx_slow, positions) = f.subscriber(1, 3, &["/q"]);
    let (_fast, mut rx_fast, _) = f.subscriber(2, 16, &["/q"]);
    let slot = slow.try_reserve().unwrap();
    let mut ts = Vec::new();
    for i in 0..4 {
        ts.push(f.publish("/q", &i.to_string(), None).await.unwrap());
    }
    assert_eq!(slow.ending().code(), 0, "not closed");
    assert!(slow.outbox().is_behind());
    assert!(slow.behind_since().is_some());
    // A reply now is held back (after the events offered so far), not queued.
    slot.send_line(b"##@1".to_vec());
    assert_eq!(lines(&mut rx_slow), [format!("@{}:/q:0", ts[0]), format!("@{}:/q:1", ts[1])], "what fit in the queue");
    assert_eq!(lines(&mut rx_fast).len(), 4);
    // Rejoining: the log from the event that did not fit up to the position is owed, through
    // /q's subscription, then the held reply.
    let rejoin = f.fanout.quiesced(|p| slow.outbox().rejoin(p));
    assert!(!slow.outbox().is_behind());
    assert_eq!((rejoin.after, rejoin.until), (ts[2].prev(), ts[3]));
    assert_eq!(rejoin.windows, [(Arc::from("/q"), ts[2].prev().max(positions[0]), ts[3])]);
    assert_eq!(rejoin.held.iter().map(|h| h.pos).collect::<Vec<_>>(), [ts[3]]);
    // Live again.
    let t = f.publish("/q", "live", None).await.unwrap();
    assert_eq!(lines(&mut rx_slow), [format!("@{t}:/q:live")]);
    slow.outbox().round_done();
    assert!(slow.behind_since().is_none(), "caught up");
    f.stop().await;
}

#[tokio::test]
async fn shutdown_completes_what_was_queued_and_refuses_what_comes_after() {
    let storage = Arc::new(Gated::default());
    let f = Arc::new(open(storage.clone()));
    storage.close_gate();
    let queued: Vec<_> = (0..5)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move { f.publish("/z", &i.to_string(), None).await })
        })
        .collect();
    while storage.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    f.publisher.stop().await;
    storage.open_gate();
    for q in queued {
        assert!(q.await.unwrap().is_ok(), "queued before the end: stored");
    }
    f.engine.shutdown().await;
    assert!(matches!(f.publish("/z", "late", None).await, Err(PublishError::ShuttingDown)));
}

#[tokio::test]
async fn a_senders_ack_comes_before_the_later_events_of_its_group_commit() {
    let storage = Arc::new(Gated::default());
    let f = open(storage.clone());
    let (me, mut rx_me, _) = f.subscriber(1, 16, &["/r"]);
    storage.close_gate();
    // Something is being stored; meanwhile this connection's send and then another's wait, and
    // are committed together.
    let (first, _) = Completion::channel();
    f.publisher.publish(Publish::new("/x", Bytes::from_static(b"first"), first)).await;
    while storage.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let slot = me.try_reserve().unwrap();
    let mut mine =
        Publish::new("/r", Bytes::from_static(b"mine"), Completion::reply(crate::session::PendingReply::new(slot, Some(b"7"), None)));
    mine.sender = Some(me.id());
    f.publisher.publish(mine).await;
    let (theirs, theirs_ts) = Completion::channel();
    f.publisher.publish(Publish::new("/r", Bytes::from_static(b"theirs"), theirs)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    storage.open_gate();
    let t = theirs_ts.await.unwrap().unwrap();
    assert_eq!(storage.batches(), [1, 2], "both sends in one commit");
    let got = lines(&mut rx_me);
    assert_eq!(got, [format!("#7#@{}", t.prev()), format!("@{t}:/r:theirs")], "the ack first, then the later event");
    f.stop().await;
}

/// The final flush is bounded: a store whose flush never returns (a full or stuck disk) does
/// not keep `Ivy::shutdown` from returning.
#[tokio::test]
async fn shutdown_returns_when_the_final_flush_never_does() {
    #[derive(Default)]
    struct Stuck(MemStorage);
    impl Storage for Stuck {
        fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
            self.0.append(records)
        }
        fn commit(&self) -> io::Result<()> {
            Ok(())
        }
        fn acks_before_durable(&self) -> bool {
            false
        }
        fn flush(&self) -> io::Result<()> {
            loop {
                std::thread::park();
            }
        }
        fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
            self.0.last_timestamp()
        }
        fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
            self.0.set_clock_floor(ts)
        }
        fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
            self.0.clock_floor()
        }
        fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
            self.0.delete(channel, before, own)
        }
        fn horizon(&self, channel: &str) -> Option<super::Horizon> {
            self.0.horizon(channel)
        }
        fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
            self.0.scan(channel, after, until, dir, visit)
        }
    }
    struct OpenStuck;
    impl super::Open for OpenStuck {
        fn open(self: Box<Self>, context: Context) -> io::Result<Arc<dyn Engine>> {
            LocalEngine::open(Arc::new(Stuck::default()), WallClock::from_fn(|| at(100, 0)), Retention::default(), context)
        }
        fn describe(&self) -> String {
            "a store whose flush never returns".into()
        }
    }
    let config = crate::Config::default().flush_timeout(Duration::from_millis(200));
    let ivy = crate::Ivy::builder(config).engine(OpenStuck).open().unwrap();
    assert!(ivy.publish("/a", "x").await.is_ok());
    tokio::time::timeout(Duration::from_secs(30), ivy.shutdown()).await.expect("shutdown returned");
}

/// A store that behaves as sled does after an I/O error: once a write of an instance failed,
/// every later write of that instance fails too; a new instance (a reopen) works once the disk
/// does. Its events live in a memory store shared by every instance (the disk).
struct Poisoning {
    disk: Arc<Disk>,
    poisoned: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Disk {
    events: MemStorage,
    /// The error the disk gives (raw OS code), 0 when it works.
    error: std::sync::atomic::AtomicI32,
    /// What the file system reports free.
    free: std::sync::atomic::AtomicU64,
    reopens: std::sync::atomic::AtomicUsize,
    writes: std::sync::atomic::AtomicUsize,
    /// The next flush fails after its batch was written (an event stored, its send failed).
    fail_commit: std::sync::atomic::AtomicBool,
}

impl Disk {
    fn fails(&self) -> Option<io::Error> {
        match self.error.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            code => Some(io::Error::from_raw_os_error(code)),
        }
    }
}

impl Poisoning {
    fn write(&self, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.disk.writes.fetch_add(1, SeqCst);
        if self.poisoned.load(SeqCst) {
            return Err(io::Error::other("poisoned by an earlier error"));
        }
        if let Some(e) = self.disk.fails() {
            self.poisoned.store(true, SeqCst);
            // sled's copy of its error keeps the kind, not the OS code.
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        f()
    }
}

impl Storage for Poisoning {
    fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
        self.write(|| self.disk.events.append(records))
    }
    fn commit(&self) -> io::Result<()> {
        if self.disk.fail_commit.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.poisoned.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(io::Error::other("the flush failed"));
        }
        self.write(|| Ok(()))
    }
    fn acks_before_durable(&self) -> bool {
        false
    }
    fn flush(&self) -> io::Result<()> {
        self.write(|| Ok(()))
    }
    fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
        self.disk.events.last_timestamp()
    }
    fn ids(&self, after: Timestamp, visit: &mut super::local::VisitId<'_>) -> io::Result<()> {
        self.disk.events.ids(after, visit)
    }
    fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
        self.write(|| self.disk.events.set_clock_floor(ts))
    }
    fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
        self.disk.events.clock_floor()
    }
    fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
        let mut deleted = None;
        self.write(|| {
            deleted = Some(self.disk.events.delete(channel, before, own)?);
            Ok(())
        })?;
        Ok(deleted.expect("written"))
    }
    fn horizon(&self, channel: &str) -> Option<super::Horizon> {
        self.disk.events.horizon(channel)
    }
    fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
        self.disk.events.scan(channel, after, until, dir, visit)
    }
}

fn reopening(disk: &Arc<Disk>) -> Arc<dyn Storage> {
    use super::reopen::Reopening;
    let instance = |disk: &Arc<Disk>| Box::new(Poisoning { disk: disk.clone(), poisoned: Default::default() }) as Box<dyn Storage>;
    let (d1, d2) = (disk.clone(), disk.clone());
    let reopen = Box::new(move || {
        d1.reopens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match d1.fails() {
            Some(e) => Err(e),
            None => Ok((instance(&d1), false)),
        }
    });
    let free = Box::new(move || Ok(d2.free.load(std::sync::atomic::Ordering::SeqCst)));
    Arc::new(Reopening::new(instance(disk), reopen, free, 0, false))
}

/// After a failed write the store is not written to again until it is reopened: sends are
/// refused with store-full while the disk is full (and with storage after another error),
/// the store is reopened once the disk has room (or after a pause), and sends are accepted
/// again, in the same engine, with every acked event still readable.
#[tokio::test]
async fn a_store_that_failed_to_write_is_reopened_once_the_disk_has_room() {
    use std::sync::atomic::Ordering::SeqCst;
    let disk = Arc::new(Disk::default());
    disk.free.store(u64::MAX, SeqCst);
    let f = open(reopening(&disk));
    let first = f.publish("/a", "1", None).await.unwrap();

    // The disk fills: the failing batch gets storage, later ones store-full without a write.
    disk.error.store(28, SeqCst);
    disk.free.store(0, SeqCst);
    assert!(matches!(f.publish("/a", "2", None).await, Err(PublishError::Storage(_))));
    let writes = disk.writes.load(SeqCst);
    let refused = f.publish("/a", "3", None).await.unwrap_err();
    assert!(matches!(&refused, PublishError::StoreFull(why) if why.contains("the disk is full")), "{refused}");
    assert_eq!(disk.writes.load(SeqCst), writes, "a failed store is not written to");
    assert_eq!(disk.reopens.load(SeqCst), 0, "no reopen while the disk has no room");

    // Room again: within a second (the next measurement) the store is reopened.
    disk.error.store(0, SeqCst);
    disk.free.store(u64::MAX, SeqCst);
    let mut tries = 0;
    let again = loop {
        match f.publish("/a", "4", None).await {
            Ok(ts) => break ts,
            Err(PublishError::StoreFull(_)) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(disk.reopens.load(SeqCst), 1);
    assert!(again > first);

    // Another error (EIO): storage, then storage without a write, then a reopen after a pause.
    disk.error.store(5, SeqCst);
    assert!(matches!(f.publish("/a", "5", None).await, Err(PublishError::Storage(_))));
    disk.error.store(0, SeqCst);
    let writes = disk.writes.load(SeqCst);
    assert!(matches!(f.publish("/a", "6", None).await, Err(PublishError::Storage(_))), "refused until the pause is over");
    assert_eq!(disk.writes.load(SeqCst), writes);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let last = f.publish("/a", "7", None).await.unwrap();
    assert_eq!(disk.reopens.load(SeqCst), 2);
    let page = f.engine.read(ReadRequest::new("/a", None, f.engine.visible(), 10)).await.unwrap();
    let text = String::from_utf8(page.lines).unwrap();
    assert_eq!(text, format!("@{first}:/a:1\n@{again}:/a:4\n@{last}:/a:7"), "the acked events, and only those");
}

impl Fixture {
    /// Sends `(path, data, id)` in one group commit; each outcome, with whether it was a repeat.
    async fn publish_ids(&self, sends: &[(&str, &str, Option<&str>)]) -> Vec<Result<super::Replied, PublishError>> {
        let mut requests = Vec::new();
        let mut outcomes = Vec::new();
        for (path, data, id) in sends {
            let (done, outcome) = Completion::channel_with_replay();
            let mut request = Publish::new(*path, Bytes::copy_from_slice(data.as_bytes()), done);
            request.id = id.map(|i| Bytes::copy_from_slice(i.as_bytes()));
            requests.push(request);
            outcomes.push(outcome);
        }
        self.publisher.publish_batch(requests).await;
        let mut out = Vec::new();
        for o in outcomes {
            out.push(o.await.unwrap());
        }
        out
    }
}

/// A repeat in the same group commit as its first shares its outcome: a failed first is not
/// remembered (its retry is stored), while a repeat of an event stored before is answered
/// even when the store refuses the batch.
#[tokio::test]
async fn a_failed_first_is_not_remembered_and_a_stored_one_is_answered_even_while_the_store_fails() {
    use std::sync::atomic::Ordering::SeqCst;
    let disk = Arc::new(Disk::default());
    disk.free.store(u64::MAX, SeqCst);
    let f = open(reopening(&disk));
    let replied = |ts, replayed| super::Replied { ts, replayed };
    let a = f.publish_ids(&[("/i", "a", Some("a"))]).await[0].clone().unwrap();
    assert!(!a.replayed);
    disk.error.store(5, SeqCst);
    let out = f.publish_ids(&[("/i", "b", Some("b")), ("/i", "a again", Some("a")), ("/i", "b again", Some("b")), ("/i", "c", None)]).await;
    assert!(matches!(out[0], Err(PublishError::Storage(_))), "{:?}", out[0]);
    assert_eq!(out[1].clone().unwrap(), replied(a.ts, true), "stored before: answered");
    assert!(matches!(out[2], Err(PublishError::Storage(_))), "the first's failure");
    assert!(matches!(out[3], Err(PublishError::Storage(_))));
    disk.error.store(0, SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = f.publish_ids(&[("/i", "b", Some("b")), ("/i", "b", Some("b")), ("/i", "a", Some("a"))]).await;
    let b = out[0].clone().unwrap();
    assert!(!b.replayed && b.ts > a.ts, "the failed first was not remembered: stored now");
    assert_eq!((out[1].clone().unwrap(), out[2].clone().unwrap()), (replied(b.ts, true), replied(a.ts, true)));
    let page = f.engine.read(ReadRequest::new("/i", None, f.engine.visible(), 10)).await.unwrap();
    assert_eq!(String::from_utf8(page.lines).unwrap(), format!("@{}:/i:a\n@{}:/i:b", a.ts, b.ts));

    // A flush that fails after its batch was written: the send failed, but its event (and id)
    // is in the store. Once the store is reopened, its ids are read again: the retry is a
    // repeat, not a second event.
    disk.fail_commit.store(true, SeqCst);
    assert!(matches!(f.publish_ids(&[("/i", "d", Some("d"))]).await[0], Err(PublishError::Storage(_))));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = f.publish_ids(&[("/i", "d", Some("d")), ("/i", "a", Some("a"))]).await;
    let d = out[0].clone().unwrap();
    assert!(d.replayed && d.ts > b.ts, "the stored event of the failed send: {d:?}");
    assert_eq!(out[1].clone().unwrap(), replied(a.ts, true), "and the ids from before");
    let page = f.engine.read(ReadRequest::new("/i", None, f.engine.visible(), 10)).await.unwrap();
    assert_eq!(page.count, 3);
    f.stop().await;
}

/// A deletion runs beside the sends: while one is in progress (held inside the storage), new
/// events are stored, acknowledged and readable; it deletes what was visible when it began,
/// and the log then states its horizon.
#[tokio::test]
async fn sends_go_on_while_a_deletion_is_in_progress() {
    #[derive(Default)]
    struct SlowDelete {
        inner: MemStorage,
        /// (entered, released)
        state: Mutex<(bool, bool)>,
        changed: Condvar,
    }
    impl Storage for SlowDelete {
        fn append(&self, records: &[Record<'_>]) -> io::Result<()> {
            self.inner.append(records)
        }
        fn commit(&self) -> io::Result<()> {
            Ok(())
        }
        fn acks_before_durable(&self) -> bool {
            false
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn last_timestamp(&self) -> io::Result<Option<Timestamp>> {
            self.inner.last_timestamp()
        }
        fn set_clock_floor(&self, ts: Timestamp) -> io::Result<()> {
            self.inner.set_clock_floor(ts)
        }
        fn clock_floor(&self) -> io::Result<Option<Timestamp>> {
            self.inner.clock_floor()
        }
        fn delete(&self, channel: &str, before: Timestamp, own: bool) -> io::Result<Deleted> {
            let mut st = self.state.lock().unwrap();
            st.0 = true;
            self.changed.notify_all();
            while !st.1 {
                st = self.changed.wait(st).unwrap();
            }
            drop(st);
            self.inner.delete(channel, before, own)
        }
        fn horizon(&self, channel: &str) -> Option<super::Horizon> {
            self.inner.horizon(channel)
        }
        fn scan(&self, channel: &str, after: Option<Timestamp>, until: Timestamp, dir: Direction, visit: &mut Visit<'_>) -> io::Result<()> {
            self.inner.scan(channel, after, until, dir, visit)
        }
    }
    let storage = Arc::new(SlowDelete::default());
    let f = open(storage.clone());
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(f.publish("/a/b", &format!("old{i}"), None).await.unwrap());
    }
    let deletion = f.engine.delete(super::DeleteRequest::new("/a", None));
    let deletion = tokio::spawn(deletion);
    let s = storage.clone();
    tokio::task::spawn_blocking(move || {
        let mut st = s.state.lock().unwrap();
        while !st.0 {
            st = s.changed.wait(st).unwrap();
        }
    })
    .await
    .unwrap();
    // The deletion is held inside the storage: sends are stored and acknowledged meanwhile.
    let new = [f.publish("/a/b", "new0", None).await.unwrap(), f.publish("/c", "new1", None).await.unwrap()];
    let page = f.engine.read(ReadRequest::new("/", None, f.engine.visible(), 100)).await.unwrap();
    assert_eq!(page.count, 5);
    assert!(!deletion.is_finished());
    {
        let mut st = storage.state.lock().unwrap();
        st.1 = true;
        storage.changed.notify_all();
    }
    let deleted = deletion.await.unwrap().unwrap();
    assert_eq!(deleted, Deleted { events: 3, newest: Some(before[2]) }, "what was visible when it began");
    let page = f.engine.read(ReadRequest::new("/", None, f.engine.visible(), 100)).await.unwrap();
    assert_eq!((page.count, page.first, page.last), (2, Some(new[0]), Some(new[1])));
    assert_eq!(page.horizon.map(|h| h.newest), Some(before[2]));
    f.stop().await;
}
