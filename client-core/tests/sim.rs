//! Deterministic tests of the client state machine against a scripted in-memory server, with
//! simulated time: the connection is cut at every step of a scenario, and every subscription
//! must still deliver exactly the server's log for its channel, once, in order.

use std::collections::{HashMap, HashSet, VecDeque};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use ivy_client_core::Timestamp;
use ivy_client_core::client::{Action, Client, ClientError, ClientEvent, Config, ConnState, LogRequest, Millis, RequestId, Start, SubId};
use ivy_client_core::path::is_within;
use ivy_client_core::wire::{Command, Op, encode_ack, encode_error, encode_event};

/// A server that behaves like `ivy-server` for one client connection plus external publishers.
#[derive(Debug, Default)]
struct SimServer {
    log: Vec<(Timestamp, String, Vec<u8>)>,
    clock: u64,
    conn: Option<SimConn>,
    /// The server caps log pages at this many events (0: no cap).
    page_cap: usize,
    /// Paths whose subscription the server refuses.
    refuse: HashSet<String>,
    /// Group commit, as `ivy-server`'s sequencer does it: sends (and the external publishes
    /// that come while some are waiting) wait in `staged` until [`SimServer::commit`], which
    /// stamps them in order, hands every event of the batch to the connection and only then
    /// queues the acks. So another sender's later event can reach the client before the ack
    /// of its own earlier send. Off: each send is stored and acked at once.
    group_commit: bool,
    staged: Vec<Staged>,
    /// Counts connections, so that a batch committed after a cut acks nobody.
    conn_gen: u64,
    /// Send ids stored (`docs/PROTOCOL.md` 5.9), with their event's timestamp: kept across
    /// cuts and restarts, as `ivy-server` keeps them with the events.
    ids: HashMap<String, Timestamp>,
    /// An older server: a send with an id is `malformed`.
    no_ids: bool,
    /// Repeats answered from `ids` (nothing stored).
    replays: usize,
}

#[derive(Debug)]
struct Staged {
    path: String,
    data: Vec<u8>,
    /// The sending connection's generation and its ack key (`None`: an external publisher).
    from: Option<(u64, Vec<u8>)>,
    /// The send's id, if it has one.
    id: Option<String>,
}

#[derive(Debug, Default)]
struct SimConn {
    subs: HashSet<String>,
    outbox: VecDeque<String>,
}

impl SimServer {
    fn last(&self) -> Timestamp {
        self.log.last().map_or(Timestamp::ZERO, |e| e.0)
    }

    fn stamp(&mut self) -> Timestamp {
        self.clock += 1;
        Timestamp::new(1_700_000_000 + self.clock / 1000, (self.clock % 1000) as u32 * 1000).unwrap()
    }

    fn line(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    fn publish(&mut self, path: &str, data: &[u8], from_client: bool) -> Timestamp {
        let ts = self.stamp();
        self.log.push((ts, path.to_string(), data.to_vec()));
        if let Some(c) = &mut self.conn {
            if !from_client && c.subs.iter().any(|s| is_within(path, s)) {
                c.outbox.push_back(Self::line(|v| encode_event(ts, path, data, v)));
            }
        }
        ts
    }

    /// An external publish: joins the waiting batch when there is one.
    fn publish_external(&mut self, path: &str, data: &[u8]) {
        if self.group_commit && !self.staged.is_empty() {
            self.staged.push(Staged { path: path.to_string(), data: data.to_vec(), from: None, id: None });
        } else {
            self.publish(path, data, false);
        }
    }

    /// Stores the waiting batch, delivers its events, then acks its sends (see `group_commit`).
    fn commit(&mut self) {
        let batch = std::mem::take(&mut self.staged);
        let mut acks = Vec::new();
        for st in batch {
            // A send of an earlier connection (cut before its batch was stored) is another
            // connection's event for the current one: delivered to it live, like `ivy-server`.
            let ts = match &st.from {
                Some((generation, _)) => self.store(&st.path, &st.data, st.id, *generation == self.conn_gen),
                None => self.publish(&st.path, &st.data, false),
            };
            if let Some((generation, key)) = st.from {
                if generation == self.conn_gen {
                    acks.push(Self::line(|v| encode_ack(&key, ts, v)));
                }
            }
        }
        if let Some(c) = &mut self.conn {
            c.outbox.extend(acks);
        }
    }

    /// Stores a send of the client, unless its id was stored already: the timestamp of its
    /// event.
    fn store(&mut self, path: &str, data: &[u8], id: Option<String>, this_conn: bool) -> Timestamp {
        if let Some(first) = id.as_ref().and_then(|id| self.ids.get(id)) {
            self.replays += 1;
            return *first;
        }
        let ts = self.publish(path, data, this_conn);
        if let Some(id) = id {
            self.ids.insert(id, ts);
        }
        ts
    }

    fn frame(&mut self, text: &str) {
        let cmd = Command::parse(text.as_bytes()).expect("the client sends valid commands");
        let key = cmd.ack.expect("the client always uses ack keys").to_vec();
        if self.no_ids && matches!(cmd.op, Op::Send { id: Some(_), .. }) {
            // An older server: `*` is an unknown command (nothing executed).
            let reply = format!("#{}#!malformed unknown command '*' (expected one of + - : @)", String::from_utf8_lossy(&key));
            self.conn.as_mut().unwrap().outbox.push_back(reply);
            return;
        }
        let reply = match cmd.op {
            Op::Subscribe(p) if self.refuse.contains(&*p) => {
                Self::line(|v| encode_error(Some(&key), ivy_client_core::ErrorCode::TooManySubscriptions, "refused", v))
            }
            Op::Subscribe(p) => {
                self.conn.as_mut().unwrap().subs.insert(p.into_owned());
                let last = self.last();
                Self::line(|v| encode_ack(&key, last, v))
            }
            Op::Unsubscribe(p) => {
                self.conn.as_mut().unwrap().subs.remove(&*p);
                let last = self.last();
                Self::line(|v| encode_ack(&key, last, v))
            }
            Op::Send { path, data, id } if self.group_commit => {
                self.staged.push(Staged {
                    path: path.into_owned(),
                    data: data.to_vec(),
                    from: Some((self.conn_gen, key)),
                    id: id.map(|i| String::from_utf8(i.to_vec()).unwrap()),
                });
                return;
            }
            Op::Send { path, data, id } => {
                let ts = self.store(&path, data, id.map(|i| String::from_utf8(i.to_vec()).unwrap()), true);
                Self::line(|v| encode_ack(&key, ts, v))
            }
            Op::Timestamp | Op::Refresh(_) | Op::PresenceWatch(_) | Op::PresenceQuery(_) => {
                let t = self.last();
                Self::line(|v| encode_ack(&key, t, v))
            }
        };
        self.conn.as_mut().unwrap().outbox.push_back(reply);
    }

    fn page(&self, req: &LogRequest) -> String {
        let mut limit = req.limit as usize;
        if self.page_cap > 0 {
            limit = limit.min(self.page_cap);
        }
        let after = req.after.unwrap_or(Timestamp::ZERO);
        let lines: Vec<String> = self
            .log
            .iter()
            .filter(|(ts, p, _)| *ts > after && is_within(p, &req.path))
            .take(limit)
            .map(|(ts, p, d)| Self::line(|v| encode_event(*ts, p, d, v)))
            .collect();
        lines.join("\n")
    }
}

#[derive(Debug, Clone)]
enum Step {
    Publish(&'static str, &'static str),
    Send(&'static str, &'static str),
    Subscribe(&'static str, Start),
    Unsubscribe(usize),
}

struct Sim {
    client: Client,
    server: SimServer,
    now: Millis,
    rng: u64,
    logs: VecDeque<LogRequest>,
    delivered: HashMap<SubId, Vec<(Timestamp, String, Vec<u8>)>>,
    subs: Vec<(SubId, String, Start)>,
    removed: HashSet<SubId>,
    sends: HashMap<RequestId, Option<Result<Timestamp, ClientError>>>,
    sent_data: HashMap<RequestId, String>,
    lost: Vec<ClientEvent>,
    micro: usize,
}

impl Sim {
    fn new(seed: u64, config: Config) -> Sim {
        let mut client = Client::new(config, seed);
        client.start(0);
        Sim {
            client,
            server: SimServer::default(),
            now: 0,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            logs: VecDeque::new(),
            delivered: HashMap::new(),
            subs: Vec::new(),
            removed: HashSet::new(),
            sends: HashMap::new(),
            sent_data: HashMap::new(),
            lost: Vec::new(),
            micro: 0,
        }
    }

    fn rand(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.client.poll_event() {
            match e {
                ClientEvent::Event { sub, event } => {
                    self.delivered.entry(sub).or_default().push((event.ts, event.path.into_owned(), event.data.into_owned()))
                }
                ClientEvent::Sent { id, result } => {
                    let slot = self.sends.get_mut(&id).expect("known send");
                    assert!(slot.is_none(), "one outcome per send");
                    *slot = Some(result);
                }
                e @ (ClientEvent::ContinuityLost { .. }
                | ClientEvent::SubscribeFailed { .. }
                | ClientEvent::SubscriptionEnded { .. }
                | ClientEvent::TokenRefused { .. }
                | ClientEvent::Unauthorized { .. }) => self.lost.push(e),
                ClientEvent::Time { .. } | ClientEvent::State(_) | ClientEvent::Warning(_) => {}
                ClientEvent::Presence { .. } | ClientEvent::Who { .. } => {}
            }
        }
    }

    fn cut(&mut self) {
        if self.server.conn.take().is_some() {
            self.client.handle_disconnected(self.now);
        }
    }

    /// Performs one unit of work; false when there is nothing but timers.
    fn step_once(&mut self) -> bool {
        self.drain_events();
        let mut choices = Vec::new();
        if let Some(a) = self.client.poll_action() {
            self.act(a);
            self.drain_events();
            return true;
        }
        if self.server.conn.as_ref().is_some_and(|c| !c.outbox.is_empty()) {
            choices.push(0);
        }
        if !self.logs.is_empty() {
            choices.push(1);
        }
        if !self.server.staged.is_empty() {
            choices.push(2);
        }
        if choices.is_empty() {
            return false;
        }
        match choices[self.rand(choices.len())] {
            2 => self.server.commit(),
            0 => {
                let frame = self.server.conn.as_mut().unwrap().outbox.pop_front().unwrap();
                self.client.handle_frame(self.now, &frame);
            }
            _ => {
                // Log responses may come back in any order relative to frames.
                let i = self.rand(self.logs.len());
                let req = self.logs.remove(i).unwrap();
                let body = self.server.page(&req);
                self.client.handle_log_page(self.now, req.id, Ok(&body));
            }
        }
        self.drain_events();
        true
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Connect => {
                self.server.conn = Some(SimConn::default());
                self.server.conn_gen += 1;
                self.client.handle_connected(self.now);
            }
            Action::Send(frame) => {
                if self.server.conn.is_some() {
                    self.server.frame(&frame);
                }
            }
            Action::Disconnect => self.server.conn = None,
            Action::FetchLog(req) => self.logs.push_back(req),
            Action::NeedToken => panic!("no token provider here"),
        }
    }

    fn script(&mut self, step: &Step) {
        match step {
            Step::Publish(p, d) => self.server.publish_external(p, d.as_bytes()),
            Step::Send(p, d) => match self.client.send(self.now, p, d) {
                Ok(id) => {
                    self.sends.insert(id, None);
                    self.sent_data.insert(id, d.to_string());
                }
                Err(e) => panic!("send refused: {e}"),
            },
            Step::Subscribe(p, start) => {
                let id = self.client.subscribe(self.now, p, *start).unwrap();
                self.subs.push((id, ivy_client_core::path::normalize(p.as_bytes()).unwrap().into_owned(), *start));
            }
            Step::Unsubscribe(i) => {
                let id = self.subs[*i].0;
                self.client.unsubscribe(self.now, id);
                self.removed.insert(id);
            }
        }
        self.drain_events();
    }

    /// Runs the script, cutting the connection before the micro-steps in `cuts`.
    fn run(&mut self, script: &[Step], cuts: &[usize]) {
        let mut next = 0;
        for _ in 0..200_000 {
            if cuts.contains(&self.micro) {
                self.cut();
            }
            self.micro += 1;
            // Interleave script steps with the protocol's own work.
            if next < script.len() && self.rand(3) == 0 {
                self.script(&script[next]);
                next += 1;
                continue;
            }
            if self.step_once() {
                continue;
            }
            if next < script.len() {
                self.script(&script[next]);
                next += 1;
                continue;
            }
            let settled = self.client.is_live() && self.sends.values().all(Option::is_some) && self.logs.is_empty();
            if settled {
                return;
            }
            // Only timers left: jump to the next deadline.
            let t = self.client.poll_timeout().expect("something to wait for");
            self.now = self.now.max(t);
            self.client.handle_timeout(self.now);
        }
        panic!("did not settle: state {:?}", self.client.state());
    }

    /// Every live subscription delivered exactly its channel's log (from its start), in order.
    fn check(&self) {
        for (id, path, start) in &self.subs {
            if self.removed.contains(id) {
                continue;
            }
            let got = self.delivered.get(id).cloned().unwrap_or_default();
            let from = match start {
                Start::Beginning => Timestamp::ZERO,
                Start::After(t) => *t,
                Start::Now => unreachable!("the checked scenarios start from the beginning or a cursor"),
            };
            let want: Vec<_> = self.server.log.iter().filter(|(ts, p, _)| *ts > from && is_within(p, path)).cloned().collect();
            assert_eq!(got, want, "subscription {path} (micro-steps {})", self.micro);
        }
        assert!(self.lost.is_empty(), "{:?}", self.lost);
    }

    /// Every send resolved with its event's timestamp, and the log holds each exactly once
    /// (the scenarios' sends have distinct data).
    fn check_sends_once(&self) {
        for (id, r) in &self.sends {
            let Some((data, result)) = r.as_ref().map(|r| (&self.sent_data[id], r)) else { panic!("send {id:?} unresolved") };
            let stored: Vec<Timestamp> = self.server.log.iter().filter(|e| e.2 == data.as_bytes()).map(|e| e.0).collect();
            assert_eq!(stored.len(), 1, "{data:?} stored once (micro-steps {})", self.micro);
            assert_eq!(result, &Ok(stored[0]), "{data:?} resolved with its timestamp");
        }
    }
}

fn scenario() -> Vec<Step> {
    vec![
        Step::Publish("/a/old", "before anyone subscribed"),
        Step::Subscribe("/a", Start::Beginning),
        Step::Publish("/a/x", "1"),
        Step::Send("/a/mine", "own 1"),
        Step::Subscribe("/", Start::Beginning),
        Step::Publish("/b", "2"),
        Step::Publish("/a", "3\nwith newline and 50%"),
        Step::Subscribe("/a/x", Start::Beginning),
        Step::Send("/a/x/deep", "own 2"),
        Step::Publish("/ab", "not a child of /a"),
        Step::Publish("/a/x/y", "4"),
        Step::Send("/c", "own 3"),
        Step::Publish("/a/x", "5"),
        Step::Publish("/a", "6"),
        Step::Send("/a", "own 4"),
        Step::Publish("/z", "7"),
    ]
}

fn config() -> Config {
    Config::default().page_limit(2)
}

#[test]
fn no_cut_delivers_every_event_once_in_order() {
    for seed in 1..50 {
        let mut sim = Sim::new(seed, config());
        sim.run(&scenario(), &[]);
        sim.check();
        sim.check_sends_once();
        assert_eq!(sim.server.replays, 0);
    }
}

#[test]
fn a_cut_at_every_step_loses_and_repeats_nothing() {
    // How many micro-steps does the scenario take without cuts? Cut at each of them.
    let mut probe = Sim::new(7, config());
    probe.run(&scenario(), &[]);
    let total = probe.micro + 20;
    let mut replays = 0;
    for seed in [7, 8, 9] {
        for cut in 0..total {
            let mut sim = Sim::new(seed, config());
            sim.run(&scenario(), &[cut]);
            sim.check();
            // A lost ack is resent with the send's id: stored once, resolved with it.
            sim.check_sends_once();
            replays += sim.server.replays;
        }
    }
    assert!(replays > 0, "some cuts lost an ack after the send was stored");
}

#[test]
fn many_random_cuts_and_a_capped_page_limit() {
    for seed in 1..200u64 {
        let mut sim = Sim::new(seed, config());
        // The server caps pages below the client's limit: fullness cannot be trusted.
        sim.server.page_cap = 1 + (seed as usize % 2);
        let cuts: Vec<usize> = (0..6).map(|i| (seed as usize * 7 + i * 13) % 90).collect();
        sim.run(&scenario(), &cuts);
        sim.check();
        sim.check_sends_once();
    }
}

#[test]
fn bounded_buffer_during_backfill_still_delivers_everything() {
    for seed in 1..30 {
        let mut sim = Sim::new(seed, Config::default().page_limit(1).max_buffered(2));
        let mut script = vec![Step::Publish("/h", "history 1"), Step::Publish("/h", "history 2"), Step::Subscribe("/h", Start::Beginning)];
        for _ in 0..20 {
            script.push(Step::Publish("/h/live", "x"));
        }
        sim.run(&script, &[(seed as usize) % 40]);
        sim.check();
    }
}

#[test]
fn a_cursor_start_skips_what_came_before() {
    let mut sim = Sim::new(3, config());
    sim.run(&[Step::Publish("/k", "1"), Step::Publish("/k", "2")], &[]);
    let cursor = sim.server.log[0].0;
    sim.run(&[Step::Subscribe("/k", Start::After(cursor)), Step::Publish("/k", "3")], &[]);
    sim.check();
    assert_eq!(sim.delivered.values().next().unwrap().len(), 2);
}

#[test]
fn start_now_delivers_only_later_events() {
    let mut sim = Sim::new(5, config());
    sim.run(&[Step::Publish("/n", "old")], &[]);
    let id = sim.client.subscribe(sim.now, "/n", Start::Now).unwrap();
    sim.run(&[], &[]);
    sim.run(&[Step::Publish("/n", "new 1"), Step::Publish("/n/x", "new 2")], &[30]);
    let got: Vec<&[u8]> = sim.delivered[&id].iter().map(|e| e.2.as_slice()).collect();
    assert_eq!(got, [&b"new 1"[..], b"new 2"]);
}

#[test]
fn a_server_that_lost_events_is_reported_as_continuity_lost() {
    let mut sim = Sim::new(11, config());
    sim.run(&[Step::Subscribe("/l", Start::Beginning), Step::Publish("/l", "1"), Step::Publish("/l", "2")], &[]);
    // The server restarts having lost its last event (asynchronous durability crash).
    sim.server.log.pop();
    sim.cut();
    // It renews its subscription before anything new is published: the position is before
    // the last delivered event.
    sim.run(&[], &[]);
    sim.run(&[Step::Publish("/l", "3")], &[]);
    assert!(matches!(sim.lost.as_slice(), [ClientEvent::ContinuityLost { .. }]), "{:?}", sim.lost);
    // Delivery continued after the last delivered event, without repeats.
    let ts: Vec<Timestamp> = sim.delivered.values().next().unwrap().iter().map(|e| e.0).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn refused_subscriptions_are_reported_and_removed() {
    let mut sim = Sim::new(2, config());
    sim.server.refuse.insert("/no".into());
    let id = sim.client.subscribe(sim.now, "/no", Start::Beginning).unwrap();
    sim.run(&[], &[]);
    assert!(
        matches!(&sim.lost[..], [ClientEvent::SubscribeFailed { sub, error: ClientError::Server { code, .. } }] if *sub == id && code == "too-many-subscriptions")
    );
    assert_eq!(sim.client.sub_path(id), None);
    assert!(matches!(sim.client.subscribe(sim.now, "/BAD", Start::Now), Err(ClientError::InvalidPath(_))));
}

#[test]
fn sends_while_disconnected_are_queued_then_sent_once() {
    let mut c = Client::new(Config::default().offline_queue(2), 1);
    let a = c.send(0, "/q", "1").unwrap();
    let b = c.send(0, "/q", "2").unwrap();
    assert_eq!(c.send(0, "/q", "3"), Err(ClientError::NotConnected));
    c.start(0);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(5);
    let inst = c.instance().to_string();
    assert_eq!(c.poll_action(), Some(Action::Send(format!("#1#*{inst}.1:/q:1"))));
    assert_eq!(c.poll_action(), Some(Action::Send(format!("#2#*{inst}.2:/q:2"))));
    assert_eq!(c.poll_action(), None);
    c.handle_frame(6, "#1#@1700000000.000000001");
    c.handle_disconnected(7);
    let sent = |c: &mut Client| -> Vec<(RequestId, Result<Timestamp, ClientError>)> {
        std::iter::from_fn(|| c.poll_event())
            .filter_map(|e| if let ClientEvent::Sent { id, result } = e { Some((id, result)) } else { None })
            .collect()
    };
    // The second's ack was lost: it waits for the next connection, and is resent there with
    // its id.
    assert_eq!(sent(&mut c), [(a, Ok(Timestamp::new(1_700_000_000, 1).unwrap()))]);
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { panic!("{:?}", c.state()) };
    c.handle_timeout(retry_at);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(retry_at);
    assert_eq!(c.poll_action(), Some(Action::Send(format!("#3#*{inst}.2:/q:2"))));
    c.handle_frame(retry_at + 1, "#3#@1700000000.000000002");
    assert_eq!(sent(&mut c), [(b, Ok(Timestamp::new(1_700_000_000, 2).unwrap()))]);
}

#[test]
fn offline_sends_time_out_and_disabled_queue_fails_at_once() {
    let mut c = Client::new(Config::default().request_timeout(100), 1);
    let id = c.send(0, "/q", "x").unwrap();
    assert_eq!(c.poll_timeout(), Some(100));
    c.handle_timeout(100);
    // It was never written: certainly not stored (not `Timeout`, which is uncertain).
    let failed = std::iter::from_fn(|| c.poll_event()).find_map(|e| match e {
        ClientEvent::Sent { id: i, result: Err(e) } if i == id => Some(e),
        _ => None,
    });
    assert_eq!(failed, Some(ClientError::NotConnected));
    assert!(!ClientError::NotConnected.is_uncertain());
    let mut d = Client::new(Config::default().offline_queue(0), 1);
    assert_eq!(d.send(0, "/q", "x"), Err(ClientError::NotConnected));
    assert_eq!(d.timestamp(0), Err(ClientError::NotConnected));
}

#[test]
fn a_send_over_the_message_size_limit_is_refused_locally_and_the_connection_kept() {
    // "#1#*" + the 18-byte id "<16>.1" + ":/q:" is 26 bytes: 14 bytes of data make 40.
    let mut c = Client::new(Config::default().max_message_size(40), 1);
    // Checked while offline too: it would never be sent.
    assert_eq!(c.send(0, "/q", &"a".repeat(15)), Err(ClientError::TooLarge { size: 41, limit: 40 }));
    c.start(0);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(1);
    // Exactly the limit, which the server accepts.
    let fits = "a".repeat(14);
    c.send(2, "/q", &fits).unwrap();
    assert_eq!(c.poll_action(), Some(Action::Send(format!("#1#*{}.1:/q:{fits}", c.instance()))));
    let e = c.send(3, "/q", &"a".repeat(15)).unwrap_err();
    assert_eq!(e, ClientError::TooLarge { size: 41, limit: 40 });
    assert!(!e.is_uncertain());
    assert!(e.to_string().contains("nothing was sent"), "{e}");
    // Nothing sent, the connection kept.
    assert_eq!(c.poll_action(), None);
    assert_eq!(c.state(), ConnState::Connected);
    // 0: no check.
    let mut d = Client::new(Config::default().max_message_size(0).offline_queue(1), 1);
    assert!(d.send(0, "/q", &"a".repeat(100_000)).is_ok());
}

#[test]
fn backoff_is_exponential_with_full_jitter_and_resets_after_success() {
    let cfg = Config::default().min_backoff(100).max_backoff(1600).connect_timeout(50);
    let mut c = Client::new(cfg, 42);
    c.start(0);
    let mut now = 0;
    let mut delays = Vec::new();
    for _ in 0..8 {
        assert_eq!(c.poll_action(), Some(Action::Connect));
        c.handle_disconnected(now); // refused
        let ConnState::Reconnecting { attempt, retry_at } = c.state() else { panic!("{:?}", c.state()) };
        let ceiling = (100u64 << (attempt - 1)).min(1600);
        assert!(retry_at - now < ceiling, "attempt {attempt}: {} >= {ceiling}", retry_at - now);
        delays.push(retry_at - now);
        now = retry_at;
        c.handle_timeout(now);
    }
    assert!(delays.iter().collect::<HashSet<_>>().len() > 3, "jittered: {delays:?}");
    // A connection attempt that hangs is abandoned after connect_timeout.
    assert_eq!(c.poll_action(), Some(Action::Connect));
    assert_eq!(c.poll_timeout(), Some(now + 50));
    c.handle_timeout(now + 50);
    assert_eq!(c.poll_action(), Some(Action::Disconnect));
    assert!(matches!(c.state(), ConnState::Reconnecting { attempt: 9, .. }));
    // After a connection that answers, backoff starts over.
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { unreachable!() };
    c.handle_timeout(retry_at);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(retry_at);
    let _ = c.timestamp(retry_at).unwrap();
    c.handle_frame(retry_at + 1, "#1#@1700000000.000000000");
    c.handle_disconnected(retry_at + 2);
    assert!(matches!(c.state(), ConnState::Reconnecting { attempt: 1, .. }));
}

#[test]
fn silence_triggers_a_probe_then_a_reconnect() {
    let cfg = Config::default().idle_timeout(1000).probe_timeout(500);
    let mut c = Client::new(cfg, 1);
    c.start(0);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(0);
    assert_eq!(c.poll_timeout(), Some(1000));
    c.handle_timeout(1000);
    assert_eq!(c.poll_action(), Some(Action::Send("#1#@".into())));
    // An answer keeps the connection.
    c.handle_frame(1200, "#1#@1700000000.000000000");
    assert_eq!(c.poll_timeout(), Some(2200));
    c.handle_timeout(2200);
    assert_eq!(c.poll_action(), Some(Action::Send("#2#@".into())));
    // No answer: dead.
    assert_eq!(c.poll_timeout(), Some(2700));
    c.handle_timeout(2700);
    assert_eq!(c.poll_action(), Some(Action::Disconnect));
    assert!(matches!(c.state(), ConnState::Reconnecting { .. }));
}

#[test]
fn close_fails_everything_pending() {
    let mut c = Client::new(Config::default(), 1);
    c.start(0);
    let _ = c.poll_action();
    c.handle_connected(0);
    let s = c.send(0, "/a", "x").unwrap();
    let t = c.timestamp(0).unwrap();
    c.close(0);
    let events: Vec<ClientEvent> = std::iter::from_fn(|| c.poll_event()).collect();
    assert!(events.contains(&ClientEvent::Sent { id: s, result: Err(ClientError::Closed) }));
    assert!(events.contains(&ClientEvent::Time { id: t, result: Err(ClientError::Closed) }));
    assert!(events.contains(&ClientEvent::State(ConnState::Closed)));
    assert_eq!(c.send(0, "/a", "x"), Err(ClientError::Closed));
}

#[test]
fn unsubscribe_stops_delivery_at_once_and_keeps_shared_paths() {
    for cut in [usize::MAX, 3, 10, 25] {
        let mut sim = Sim::new(4, config());
        let script = [
            Step::Subscribe("/u", Start::Beginning),
            Step::Subscribe("/u", Start::Beginning),
            Step::Publish("/u", "1"),
            Step::Unsubscribe(0),
            Step::Publish("/u", "2"),
            Step::Publish("/u/x", "3"),
        ];
        sim.run(&script, &[cut]);
        sim.check(); // the second subscription to the same path got everything
        let first = sim.subs[0].0;
        let got = sim.delivered.get(&first).map_or(0, Vec::len);
        assert!(got <= 1, "nothing after unsubscribe: {got}");
        assert!(sim.server.conn.as_ref().is_none_or(|c| c.subs.contains("/u")), "the shared path stays subscribed");
    }
}

#[test]
fn a_log_page_that_never_comes_back_is_requested_again() {
    let cfg = Config::default().page_limit(2).request_timeout(1000);
    let mut sim = Sim::new(6, cfg);
    sim.run(&[Step::Publish("/p", "1"), Step::Publish("/p", "2"), Step::Publish("/p", "3")], &[]);
    let id = sim.client.subscribe(sim.now, "/p", Start::Beginning).unwrap();
    sim.subs.push((id, "/p".into(), Start::Beginning));
    // Run until the first log request goes out, then lose it.
    for _ in 0..100 {
        if !sim.logs.is_empty() {
            break;
        }
        assert!(sim.step_once(), "the client asks for a log page");
    }
    let lost = sim.logs.pop_front().expect("a log request");
    // Nothing else to do but wait: the deadline brings a new request, and delivery completes.
    sim.run(&[], &[]);
    sim.check();
    assert_eq!(sim.delivered[&id].len(), 3);
    // The lost page's late answer is ignored.
    let body = sim.server.page(&lost);
    sim.client.handle_log_page(sim.now, lost.id, Ok(&body));
    sim.drain_events();
    assert_eq!(sim.delivered[&id].len(), 3);
}

/// The schedule of issue 18, at the lowest level: the client is live on `/r`, sends, and the
/// server's group commit holds its send and another connection's later one. The server hands
/// the batch's events to the connection first, then the acks, so the other sender's event
/// (timestamp 2) arrives before the ack of our own (timestamp 1). Our event must still be
/// delivered, in its place; before the fix it was taken for already delivered and dropped,
/// and the page showed it as pending forever.
#[test]
fn own_send_acked_after_a_later_event_of_its_group_commit_is_delivered_in_place() {
    let mut c = Client::new(Config::default(), 1);
    c.start(0);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(0);
    let sub = c.subscribe(0, "/r", Start::Beginning).unwrap();
    assert_eq!(c.poll_action(), Some(Action::Send("#1#+/r".into())));
    c.handle_frame(1, "#1#@1700000000.000000000");
    let Some(Action::FetchLog(req)) = c.poll_action() else { panic!("a log page is requested") };
    c.handle_log_page(2, req.id, Ok(""));
    assert!(c.is_live());
    let mine = c.send(3, "/r", "mine").unwrap();
    assert_eq!(c.poll_action(), Some(Action::Send(format!("#2#*{}.1:/r:mine", c.instance()))));
    let _ = std::iter::from_fn(|| c.poll_event()).count();

    c.handle_frame(4, "@1700000000.000000002:/r:theirs");
    c.handle_frame(4, "#2#@1700000000.000000001");
    let got: Vec<ClientEvent> = std::iter::from_fn(|| c.poll_event()).collect();
    let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
    let ev = |n, data: &str| ClientEvent::Event {
        sub,
        event: ivy_client_core::wire::Event { ts: ts(n), path: "/r".into(), data: data.as_bytes().to_vec().into(), sender: None },
    };
    assert_eq!(got, [ev(1, "mine"), ev(2, "theirs"), ClientEvent::Sent { id: mine, result: Ok(ts(1)) }]);
    assert_eq!(c.sub_last(sub), Some(ts(2)));
}

/// The same scenarios as above against a server with group commit: own sends share batches
/// with external publishes, whose events reach the client before the sends' acks; with cuts
/// anywhere, every subscription still delivers exactly its channel's log.
#[test]
fn group_commits_with_cuts_lose_and_repeat_nothing() {
    let mut probe = Sim::new(7, config());
    probe.server.group_commit = true;
    probe.run(&scenario(), &[]);
    let total = probe.micro + 20;
    for seed in 1..40u64 {
        let mut sim = Sim::new(seed, config());
        sim.server.group_commit = true;
        sim.run(&scenario(), &[]);
        sim.check();
        sim.check_sends_once();
        for cut in (seed as usize % 3..total).step_by(3) {
            let mut sim = Sim::new(seed, config());
            sim.server.group_commit = true;
            sim.run(&scenario(), &[cut]);
            sim.check();
            // A resend may reach the server while its first is still staged: a repeat too.
            sim.check_sends_once();
        }
    }
}

/// Live events held back while an own send waits for its ack stay bounded: beyond
/// `max_buffered` the subscription forgets them and reads them from the log.
#[test]
fn held_back_live_events_stay_bounded_and_still_all_arrive() {
    for seed in 1..60u64 {
        let mut sim = Sim::new(seed, Config::default().page_limit(1).max_buffered(2));
        sim.server.group_commit = true;
        let mut script = vec![Step::Subscribe("/h", Start::Beginning), Step::Publish("/h", "history")];
        for own in ["own 0", "own 1", "own 2", "own 3", "own 4", "own 5"] {
            script.push(Step::Send("/h/mine", own));
            for _ in 0..5 {
                script.push(Step::Publish("/h/live", "x"));
            }
        }
        let cuts = if seed % 2 == 0 { vec![] } else { vec![(seed as usize * 11) % 120] };
        sim.run(&script, &cuts);
        sim.check();
        sim.check_sends_once();
    }
}

/// Holding back for our sends is bounded by our acks: with two sends in flight, each ack
/// releases what precedes it, so a client that always has a send out still delivers the others'
/// events one ack later, never waiting for all of its sends to be answered.
#[test]
fn held_back_events_go_out_at_each_ack_up_to_its_timestamp() {
    let mut c = Client::new(Config::default(), 1);
    c.start(0);
    let _ = c.poll_action();
    c.handle_connected(0);
    let sub = c.subscribe(0, "/r", Start::Beginning).unwrap();
    let _ = c.poll_action();
    c.handle_frame(1, "#1#@1700000000.000000000");
    let Some(Action::FetchLog(req)) = c.poll_action() else { panic!("a log page is requested") };
    c.handle_log_page(2, req.id, Ok(""));
    assert!(c.is_live());
    let a = c.send(3, "/r", "a").unwrap();
    let b = c.send(3, "/r", "b").unwrap();
    let _ = std::iter::from_fn(|| c.poll_action()).count();
    let _ = std::iter::from_fn(|| c.poll_event()).count();
    let ts = |n| Timestamp::new(1_700_000_000, n).unwrap();
    let ev = |n, data: &str| ClientEvent::Event {
        sub,
        event: ivy_client_core::wire::Event { ts: ts(n), path: "/r".into(), data: data.as_bytes().to_vec().into(), sender: None },
    };
    // Others' events while both sends are out: held (either send may come before them).
    c.handle_frame(4, "@1700000000.000000003:/r:x3");
    c.handle_frame(4, "@1700000000.000000005:/r:x5");
    assert_eq!(c.poll_event(), None);
    // The first ack releases what precedes it, our own event in its place.
    c.handle_frame(5, "#2#@1700000000.000000004");
    let got: Vec<ClientEvent> = std::iter::from_fn(|| c.poll_event()).collect();
    assert_eq!(got, [ev(3, "x3"), ev(4, "a"), ClientEvent::Sent { id: a, result: Ok(ts(4)) }]);
    // The second ack releases the rest.
    c.handle_frame(6, "#3#@1700000000.000000006");
    let got: Vec<ClientEvent> = std::iter::from_fn(|| c.poll_event()).collect();
    assert_eq!(got, [ev(5, "x5"), ev(6, "b"), ClientEvent::Sent { id: b, result: Ok(ts(6)) }]);
    // With nothing of ours out, live events go out at once again.
    c.handle_frame(7, "@1700000000.000000007:/r:x7");
    assert_eq!(c.poll_event(), Some(ev(7, "x7")));
}

/// A connected client, with its frames drained.
fn connected(cfg: Config) -> Client {
    let mut c = Client::new(cfg, 1);
    c.start(0);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(0);
    c
}

fn actions(c: &mut Client) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn sent(c: &mut Client) -> Vec<(RequestId, Result<Timestamp, ClientError>)> {
    std::iter::from_fn(|| c.poll_event())
        .filter_map(|e| if let ClientEvent::Sent { id, result } = e { Some((id, result)) } else { None })
        .collect()
}

fn reconnect(c: &mut Client) {
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { panic!("{:?}", c.state()) };
    c.handle_timeout(retry_at);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(retry_at);
}

fn ts(n: u32) -> Timestamp {
    Timestamp::new(1_700_000_000, n).unwrap()
}

/// After a reconnect, the sends whose acks were lost go first, with their ids and in their
/// order, then the sends queued while disconnected; a send resolves once.
#[test]
fn lost_acks_are_resent_in_order_with_their_ids_before_queued_sends() {
    let mut c = connected(Config::default());
    let inst = c.instance().to_string();
    let (a, b, d) = (c.send(1, "/o", "a").unwrap(), c.send(1, "/o", "b").unwrap(), c.send(1, "/o", "d").unwrap());
    assert_eq!(
        actions(&mut c),
        [
            Action::Send(format!("#1#*{inst}.1:/o:a")),
            Action::Send(format!("#2#*{inst}.2:/o:b")),
            Action::Send(format!("#3#*{inst}.3:/o:d"))
        ]
    );
    c.handle_frame(2, "#1#@1700000000.000000001");
    c.handle_disconnected(3);
    assert_eq!(sent(&mut c), [(a, Ok(ts(1)))], "the others wait: no uncertain outcome");
    let e = c.send(4, "/o", "e").unwrap();
    reconnect(&mut c);
    assert_eq!(
        actions(&mut c),
        [
            Action::Send(format!("#4#*{inst}.2:/o:b")),
            Action::Send(format!("#5#*{inst}.3:/o:d")),
            Action::Send(format!("#6#*{inst}.4:/o:e"))
        ]
    );
    // The server had stored b (its first ack was lost): the repeat's ack has b's timestamp.
    let now = 10_000;
    c.handle_frame(now, "#4#@1700000000.000000002");
    c.handle_frame(now, "#5#@1700000000.000000003");
    c.handle_frame(now, "#6#@1700000000.000000004");
    assert_eq!(sent(&mut c), [(b, Ok(ts(2))), (d, Ok(ts(3))), (e, Ok(ts(4)))]);
    assert!(c.send_ids());
}

/// A resend first written longer ago than the idempotency window could be stored twice: it
/// fails uncertain instead, at the reconnect or, while disconnected, when the window passes.
#[test]
fn a_lost_ack_past_the_idempotency_window_is_the_only_uncertain_send() {
    let cfg = Config::default().idempotency_window(5000).max_backoff(100);
    let mut c = connected(cfg.clone());
    let a = c.send(1000, "/w", "a").unwrap();
    let _ = actions(&mut c);
    c.handle_disconnected(1500);
    // Disconnected, with the retries failing: the window's end is a deadline.
    let mut now;
    loop {
        let t = c.poll_timeout().expect("a deadline");
        assert!(t <= 6000, "the window ends at 6000: {t}");
        now = t;
        c.handle_timeout(now);
        let events = sent(&mut c);
        if !events.is_empty() {
            assert_eq!(events, [(a, Err(ClientError::WindowPassed))]);
            assert!(ClientError::WindowPassed.is_uncertain());
            break;
        }
        if c.poll_action() == Some(Action::Connect) {
            c.handle_disconnected(now); // the server is still down
        }
    }
    assert_eq!(now, 6000);
    // At a reconnect after the window: not resent.
    let mut c = connected(cfg);
    let b = c.send(0, "/w", "b").unwrap();
    let _ = actions(&mut c);
    c.handle_disconnected(10);
    let ConnState::Reconnecting { .. } = c.state() else { panic!() };
    c.handle_timeout(4000);
    assert_eq!(c.poll_action(), Some(Action::Connect));
    c.handle_connected(5000);
    assert_eq!(actions(&mut c), []);
    assert_eq!(sent(&mut c), [(b, Err(ClientError::WindowPassed))]);
}

/// No reply to a send in time: the connection counts as stuck; the client reconnects and
/// resends it (the server answers a repeat still in flight with the first's outcome).
#[test]
fn a_send_without_a_reply_in_time_reconnects_and_is_resent() {
    let mut c = connected(Config::default().request_timeout(1000));
    let inst = c.instance().to_string();
    let a = c.send(0, "/t", "a").unwrap();
    let _ = actions(&mut c);
    assert_eq!(c.poll_timeout(), Some(1000));
    c.handle_timeout(1000);
    assert_eq!(c.poll_action(), Some(Action::Disconnect));
    assert!(matches!(c.state(), ConnState::Reconnecting { .. }));
    assert_eq!(sent(&mut c), []);
    reconnect(&mut c);
    assert_eq!(actions(&mut c), [Action::Send(format!("#2#*{inst}.1:/t:a"))]);
    c.handle_frame(1500, "#2#@1700000000.000000007");
    assert_eq!(sent(&mut c), [(a, Ok(ts(7)))]);
    // A timestamp request still times out as before.
    let t = c.timestamp(2000).unwrap();
    c.handle_timeout(3000);
    assert!(std::iter::from_fn(|| c.poll_event()).any(|e| e == ClientEvent::Time { id: t, result: Err(ClientError::Timeout) }));
}

/// An older server answers a send with an id `malformed` (nothing stored): that send goes
/// again plain, once, and the client sends plain from then on; a lost ack is uncertain again.
#[test]
fn an_older_server_without_send_ids_gets_plain_sends() {
    let mut c = connected(Config::default());
    let inst = c.instance().to_string();
    let a = c.send(0, "/p", "a").unwrap();
    let b = c.send(0, "/p", "b").unwrap();
    assert_eq!(actions(&mut c), [Action::Send(format!("#1#*{inst}.1:/p:a")), Action::Send(format!("#2#*{inst}.2:/p:b"))]);
    c.handle_frame(1, "#1#!malformed unknown command '*' (expected one of + - : @)");
    assert!(!c.send_ids());
    assert_eq!(actions(&mut c), [Action::Send("#3#:/p:a".into())]);
    c.handle_frame(1, "#2#!malformed unknown command '*' (expected one of + - : @)");
    assert_eq!(actions(&mut c), [Action::Send("#4#:/p:b".into())]);
    let warnings = std::iter::from_fn(|| c.poll_event()).filter(|e| matches!(e, ClientEvent::Warning(w) if w.contains("send ids"))).count();
    assert_eq!(warnings, 1);
    c.handle_frame(2, "#3#@1700000000.000000001");
    c.handle_frame(2, "#4#@1700000000.000000002");
    assert_eq!(sent(&mut c), [(a, Ok(ts(1))), (b, Ok(ts(2)))]);
    // From now on plain; a plain send's lost ack is uncertain, as without ids.
    let d = c.send(3, "/p", "d").unwrap();
    assert_eq!(actions(&mut c), [Action::Send("#5#:/p:d".into())]);
    c.handle_disconnected(4);
    assert_eq!(sent(&mut c), [(d, Err(ClientError::ConnectionLost))]);
    // A plain send refused `malformed` is not sent again.
    reconnect(&mut c);
    let f = c.send(10_000, "/p", "f").unwrap();
    let _ = actions(&mut c);
    c.handle_frame(10_001, "#6#!malformed something else");
    assert_eq!(actions(&mut c), []);
    assert!(matches!(&sent(&mut c)[..], [(id, Err(ClientError::Server { .. }))] if *id == f));
}

/// The same scenarios against a server without send ids: every send resolves (plain after
/// the first `malformed`), each stored at most once, and the uncertain ones at most once too.
#[test]
fn an_older_server_with_cuts_stores_nothing_twice() {
    for seed in 1..60u64 {
        let mut sim = Sim::new(seed, config());
        sim.server.no_ids = true;
        let cuts: Vec<usize> = if seed % 3 == 0 { vec![] } else { vec![(seed as usize * 7) % 80] };
        sim.run(&scenario(), &cuts);
        sim.check();
        assert!(!sim.client.send_ids());
        for (id, r) in &sim.sends {
            let data = &sim.sent_data[id];
            let stored = sim.server.log.iter().filter(|e| e.2 == data.as_bytes()).count();
            match r {
                Some(Ok(_)) => assert_eq!(stored, 1),
                Some(Err(e)) if e.is_uncertain() => assert!(stored <= 1),
                other => panic!("unexpected outcome {other:?}"),
            }
        }
    }
}

/// With a window of 0 the client never resends: a lost ack is uncertain at once.
#[test]
fn a_zero_window_never_resends() {
    let mut c = connected(Config::default().idempotency_window(0));
    let a = c.send(0, "/z", "a").unwrap();
    let _ = actions(&mut c);
    c.handle_disconnected(1);
    assert_eq!(sent(&mut c), [(a, Err(ClientError::ConnectionLost))]);
}

/// The instance comes from the driver's random bytes; ids differ between instances.
#[test]
fn send_ids_use_the_drivers_instance_and_count_sends() {
    let mut c = connected(Config::default().instance([0xfb; 12]));
    assert_eq!(c.instance(), "-_v7-_v7-_v7-_v7");
    let _ = c.send(0, "/i", "x").unwrap();
    let _ = c.send(0, "/i", "y").unwrap();
    assert_eq!(actions(&mut c), [Action::Send("#1#*-_v7-_v7-_v7-_v7.1:/i:x".into()), Action::Send("#2#*-_v7-_v7-_v7-_v7.2:/i:y".into())]);
    let other = Client::new(Config::default().instance([0; 12]), 1);
    assert_eq!(other.instance(), "AAAAAAAAAAAAAAAA");
    // Without the driver's bytes, from the seed.
    assert_ne!(Client::new(Config::default(), 1).instance(), Client::new(Config::default(), 2).instance());
    assert_eq!(Client::new(Config::default(), 1).instance().len(), 16);
}
