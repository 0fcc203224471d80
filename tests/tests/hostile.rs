//! Hostile and broken clients against a server that other clients are using at the same time.
//! Every scenario has a defined outcome (documented in `docs/PROTOCOL.md`, sections 2, 6.4
//! and 7), and a bystander (a publisher and a subscriber of its own channel) keeps working
//! throughout: every one of its sends is acked and delivered, in order.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ivy_tests::{Client, Got, ServerProcess, TestServer, WAIT, config, raw_ws_open, server_bin, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A well-behaved pair of clients that must not notice the abuse around them.
struct Bystander {
    stop: oneshot::Sender<()>,
    task: JoinHandle<usize>,
}

impl Bystander {
    /// Two connections: a subscriber of `/bystander` and a publisher sending to it.
    async fn start(url: &str) -> Bystander {
        let mut sub = Client::connect(url).await;
        sub.subscribe("/bystander").await;
        let mut publisher = Client::connect(url).await;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                // `publish` and `recv` panic after 10 s without an answer.
                let ts = publisher.publish("/bystander", &format!("b{n}")).await;
                assert_eq!(sub.recv().await, format!("@{ts}:/bystander:b{n}"), "the bystander's stream");
                n += 1;
                if stopped.try_recv() != Err(oneshot::error::TryRecvError::Empty) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            publisher.close().await;
            sub.close().await;
            n
        });
        Bystander { stop, task }
    }

    /// Stops it and checks it kept working.
    async fn finish(self) {
        let _ = self.stop.send(());
        let n = self.task.await.expect("the bystander never failed");
        assert!(n > 0, "the bystander got nothing through");
        println!("bystander: {n} events sent, acked and received in order");
    }
}

/// Reads frames from a raw server-to-client byte stream until EOF, an error or `WAIT`:
/// (opcode, payload) pairs. Server frames are never masked.
async fn read_frames(s: &mut TcpStream, mut buf: Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let (len, header) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let Some(payload) = rest.get(header..header + len) else { break };
        frames.push((opcode, payload.to_vec()));
        rest = &rest[header + len..];
    }
    frames
}

/// The close code and reason of a close frame payload.
fn close_of(payload: &[u8]) -> (u16, String) {
    (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_commands_get_their_documented_outcome() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let url = server.ws_url();
    let bystander = Bystander::start(&url).await;
    for round in 0..20 {
        // Over the size limit: close 1009.
        let mut c = Client::connect(&url).await;
        let _ = c.send_raw(Message::text(format!("#k#:/x:{}", "x".repeat(70_000)))).await;
        assert!(matches!(c.next_within(WAIT).await, Got::Close(1009, _)), "round {round}: oversized");
        // Invalid UTF-8 in a text frame: close 1007.
        let mut c = Client::connect(&url).await;
        let _ = c.send_raw(Message::Frame(Frame::message(b":/x:\xc3\x28".to_vec(), OpCode::Data(Data::Text), true))).await;
        assert!(matches!(c.next_within(WAIT).await, Got::Close(1007, _)), "round {round}: invalid UTF-8");
        // A binary frame, bad commands and paths: error lines, and the connection stays usable.
        let mut c = Client::connect(&url).await;
        c.send_raw(Message::binary(vec![0xff; 100])).await.unwrap();
        assert!(c.recv().await.starts_with("!unsupported "));
        let long = format!("/{}", "a".repeat(300));
        for (cmd, code) in [
            (format!("#1#+{long}"), "#1#!path-too-long path is 301 bytes long, the limit is 255"),
            ("#2#+/Ünïcode".to_string(), "#2#!bad-path "),
            ("#3#:/a b:data".to_string(), "#3#!bad-path "),
            ("#4#+/a//".to_string(), "#4#!bad-path "),
            ("#5#?".to_string(), "#5#!malformed "),
            ("#6".to_string(), "!malformed "),
            (String::new(), "!malformed "),
        ] {
            let reply = c.request(&cmd).await;
            assert!(reply.starts_with(code), "round {round}: {cmd:?} got {reply:?}");
        }
        assert!(c.request("#ok#@").await.starts_with("#ok#@"));
        c.close().await;
    }
    // A frame that breaks RFC 6455 (not masked): close 1002.
    let (resp, mut raw) = raw_ws_open(server.addr, &[]).await.expect("handshake");
    assert_eq!(resp.status, 101);
    raw.write_all(&[0x81, 0x03, b'+', b'/', b'a']).await.unwrap();
    let frames = read_frames(&mut raw, resp.body).await;
    let close = frames.iter().find(|(op, _)| *op == 0x8).map(|(_, p)| close_of(p));
    assert_eq!(close.map(|c| c.0), Some(1002), "{frames:?}");
    bystander.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_subscriptions_stop_at_the_limit_and_memory_stays_bounded() {
    let dir = temp_dir();
    // The rate limit is off here so that only the subscription limit is at work.
    let server = ServerProcess::start(dir.path(), &["--rate-limit", "0"]).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let before = server.rss_bytes();
    let (conns, attempts) = (8, 5000);
    let long = "x".repeat(200);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let url = server.ws_url();
        let long = long.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
            let (mut acks, mut refusals) = (0, 0);
            // Pipelined in windows of 200, like a client that does not want to be a slow consumer.
            for window in (0..attempts).collect::<Vec<_>>().chunks(200) {
                for i in window {
                    ws.feed(Message::text(format!("#{i}#+/c{c}/{long}/{i}"))).await.expect("send");
                }
                ws.flush().await.expect("send");
                for i in window {
                    match tokio::time::timeout(WAIT, ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            let key = format!("#{i}#");
                            assert!(t.starts_with(&key), "{t}");
                            if t[key.len()..].starts_with('@') {
                                acks += 1;
                            } else {
                                assert_eq!(
                                    &t[key.len()..],
                                    "!too-many-subscriptions this connection already holds 1024 subscriptions, the limit"
                                );
                                refusals += 1;
                            }
                        }
                        other => panic!("connection {c}: {other:?} after {acks} acks and {refusals} refusals"),
                    }
                }
            }
            // Keep the connection (and its subscriptions) open until memory is measured.
            ((acks, refusals), ws)
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        let (counts, ws) = t.await.expect("subscriber");
        assert_eq!(counts, (1024, attempts - 1024));
        open.push(ws);
    }
    if let (Some(before), Some(after)) = (before, server.rss_bytes()) {
        let grown = after.saturating_sub(before);
        println!("server RSS grew by {} KiB for {conns} connections at the subscription limit", grown / 1024);
        assert!(grown < 64 << 20, "server RSS grew by {grown} bytes");
    }
    bystander.finish().await;
    drop(open);
    server.kill().await;
}

/// Sends `#key#@` until one is not rate-limited (at most `WAIT`): the limiter refills.
async fn wait_for_a_token(c: &mut Client) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for k in 0.. {
        let reply = c.request(&format!("#t{k}#@")).await;
        if reply.starts_with(&format!("#t{k}#@")) {
            return;
        }
        assert!(reply.starts_with(&format!("#t{k}#!rate-limited ")), "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "still rate-limited after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_flood_is_rate_limited_and_the_connection_stays_open() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.rate_limit = 1000;
    cfg.rate_burst = 100;
    let server = TestServer::start(cfg).await;
    let url = server.ws_url();
    let bystander = Bystander::start(&url).await;
    let refused_text = "!rate-limited too many commands: the limit is 1000 per second (bursts of 100); this command was not executed";

    // Phase 1: 20,000 acked commands as fast as possible (sending them takes far less than the
    // 20 s the limit would need), replies read concurrently: each gets exactly one.
    let n = 20_000;
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        let (mut ok, mut refused) = (0, 0);
        for i in 0..n {
            let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(WAIT, rx.next()).await else {
                panic!("no reply to command {i}");
            };
            let key = format!("#{i}#");
            assert!(t.starts_with(&key), "replies in order: {t}");
            if t[key.len()..].starts_with('@') {
                ok += 1;
            } else {
                assert_eq!(&t[key.len()..], refused_text);
                refused += 1;
            }
        }
        (ok, refused, rx)
    });
    for i in 0..n {
        tx.feed(Message::text(format!("#{i}#@"))).await.expect("send");
    }
    tx.flush().await.expect("send");
    let (ok, refused, rx) = reader.await.expect("reader");
    println!("flood of {n} commands: {ok} executed, {refused} refused");
    assert!(ok >= 100, "at least the burst passes: {ok}");
    assert!(refused > 0);

    // Phase 2: keyless sends are refused with a keyless error and not stored.
    let mut c = Client::from_stream(tx.reunite(rx).expect("same stream"));
    wait_for_a_token(&mut c).await;
    let sends = 5_000;
    for i in 0..sends {
        c.send(&format!(":/flood:{i}")).await;
    }
    // Their refusals come back in order; an acked send after them settles them all (acks of
    // one connection's sends come in send order), once a token is back for it.
    let mut refused = 0;
    let last = 'probe: loop {
        c.send("#last#:/flood:last").await;
        loop {
            let reply = c.recv().await;
            if reply == refused_text {
                refused += 1;
            } else if let Some(ts) = reply.strip_prefix("#last#@") {
                break 'probe ts.to_string();
            } else {
                assert_eq!(reply, format!("#last#{refused_text}"));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stored = ivy_tests::log_text(server.addr, "/log/flood").await;
    let stored: Vec<&str> = stored.lines().collect();
    assert!(stored.last().is_some_and(|l| l.starts_with(&format!("@{last}:"))));
    assert_eq!(stored.len() - 1, sends - refused, "exactly the sends that were not refused are stored");
    println!("flood of {sends} keyless sends: {} stored, {refused} refused", stored.len() - 1);
    assert!(refused > 0);
    bystander.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_that_never_reads_is_closed_as_a_slow_consumer() {
    let dir = temp_dir();
    // A client that leaves its replies unread for a whole ping interval is closed.
    let server = ServerProcess::start(dir.path(), &["--queue-length", "256", "--ping-interval", "0.5"]).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let before = server.rss_bytes();
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.expect("connect");
    // Every command has a reply (some `rate-limited`); none is read. Once 256 replies wait,
    // the server stops reading the commands, then closes the connection. 100,000 commands
    // (about 12 MB) are far more than the queue and the socket buffers hold.
    let key = "k".repeat(100);
    let mut sent = 0u64;
    while sent < 100_000 {
        match tokio::time::timeout(Duration::from_secs(1), ws.send(Message::text(format!("#{key}{sent}#@")))).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let during = server.rss_bytes();
    // Still not reading for a while: the server closes the connection half a second after its
    // replies stopped being read (before, the test read at once, and on a loaded machine it
    // could drain the replies before the server's timer fired, then read pings forever).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now read: some replies, then the close frame 4000.
    let mut replies = 0u64;
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    let close = loop {
        assert!(tokio::time::Instant::now() < deadline, "no close frame after {replies} replies");
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => replies += 1,
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected replies then a close frame, got {other:?} after {replies} replies"),
        }
    };
    println!("never-reading flooder: {sent} commands sent, {replies} replies read before {close:?}");
    assert_eq!(close, Some((4000, "slow consumer: outbound queue full".to_string())));
    assert!(replies < sent, "the server dropped the replies it could not deliver");
    if let (Some(before), Some(during)) = (before, during) {
        let grown = during.saturating_sub(before);
        println!("server RSS grew by {} KiB during the flood", grown / 1024);
        assert!(grown < 64 << 20, "server RSS grew by {grown} bytes");
    }
    bystander.finish().await;
    server.kill().await;
}

/// Lines of a reader until (and with) the event whose data is `end` on `/room`.
async fn read_until_end(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        match c.next_within(WAIT).await {
            Got::Line(l) => {
                let end = l.ends_with(":/room:end");
                lines.push(l);
                if end {
                    return lines;
                }
            }
            other => panic!("a reader got {other:?} after {} lines", lines.len()),
        }
    }
}

/// The timestamp of an event line.
fn ts_of(line: &str) -> &str {
    line[1..].split(':').next().unwrap()
}

/// Issue 12, finding 7: a group commit with more matching events than a subscriber's queue
/// holds closed every subscriber of the channel with 4000 at once, however fast it read. Now a
/// connection whose queue overflows is fed from the log until it has caught up: each reader
/// receives exactly the lines it would have received live, once each and in order. A reader of
/// a channel and of its child gets each event once; a reader that sends into the channel gets
/// its acks at its events' places and not its own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_queues_reaches_every_fast_reader_whole_and_in_order() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    // A queue of 4 lines: every group commit of more than 4 events of /room overflows it.
    cfg.queue_length = 4;
    let server = TestServer::start(cfg).await;
    let url = server.ws_url();
    let bystander = Bystander::start(&url).await;
    let mut r1 = Client::connect(&url).await;
    let p1 = r1.subscribe("/room").await;
    let mut r2 = Client::connect(&url).await;
    let p2 = r2.subscribe("/room").await;
    assert!(r2.request("#s2#+/room/a").await.starts_with("#s2#@"));
    let mut r3 = Client::connect(&url).await;
    let p3 = r3.subscribe("/room").await;
    let own = 300;
    // The third reader sends into /room/a (the server reads its sends as its queue allows),
    // reads everything, and says when all its acks are in.
    let (acked, all_acked) = oneshot::channel();
    let r3 = tokio::spawn(async move {
        for i in 0..own {
            r3.send(&format!("#o{i}#:/room/a:y")).await;
        }
        let (mut lines, mut acked) = (Vec::new(), Some(acked));
        loop {
            match r3.next_within(WAIT).await {
                Got::Line(l) => {
                    let end = l.ends_with(":/room:end");
                    lines.push(l);
                    if lines.iter().filter(|l| l.starts_with("#o")).count() == own {
                        if let Some(a) = acked.take() {
                            let _ = a.send(());
                        }
                    }
                    if end {
                        return lines;
                    }
                }
                other => panic!("the sending reader got {other:?} after {} lines", lines.len()),
            }
        }
    });
    let readers = [(r1, p1), (r2, p2)].map(|(mut c, p)| tokio::spawn(async move { (p, read_until_end(&mut c).await) }));
    // Four senders, 1,000 one-byte keyless sends each, pipelined: group commits of hundreds.
    let mut senders = Vec::new();
    for s in 0..4 {
        let url = url.clone();
        senders.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
            let path = if s % 2 == 0 { "/room" } else { "/room/a" };
            for _ in 0..1000 {
                ws.feed(Message::text(format!(":{path}:x"))).await.unwrap();
            }
            ws.flush().await.unwrap();
            let mut c = Client::from_stream(ws);
            // Acks come in send order: once this one is in, all of them are stored.
            c.publish(path, "done").await;
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    all_acked.await.expect("the sending reader got its acks");
    let mut last = Client::connect(&url).await;
    last.publish("/room", "end").await;
    let log = ivy_tests::log_text(server.addr, "/log/room").await;
    let log: Vec<&str> = log.lines().collect();
    assert_eq!(log.len(), 4 * 1001 + own + 1);
    for r in readers {
        let (p, got) = r.await.expect("reader");
        let want: Vec<&str> = log.iter().copied().filter(|l| ts_of(l) > p.as_str()).collect();
        assert_eq!(got.len(), want.len(), "every event once");
        assert!(got.iter().zip(&want).all(|(g, w)| g == w), "the log's lines, in its order");
    }
    // The sending reader: the log's lines with its own events replaced by their acks.
    let got = r3.await.expect("the sending reader");
    let acks: std::collections::HashMap<&str, &str> =
        got.iter().filter(|l| l.starts_with("#o")).map(|l| (l.split("#@").nth(1).unwrap(), l.as_str())).collect();
    assert_eq!(acks.len(), own);
    let want: Vec<&str> = log.iter().filter(|l| ts_of(l) > p3.as_str()).map(|l| acks.get(ts_of(l)).copied().unwrap_or(l)).collect();
    assert_eq!(got.len(), want.len());
    assert!(got.iter().zip(&want).all(|(g, w)| g == w), "acks at their events' places, own events left out");
    let keys: Vec<String> = got.iter().filter(|l| l.starts_with("#o")).map(|l| l.split('#').nth(1).unwrap().to_string()).collect();
    assert_eq!(keys, (0..own).map(|i| format!("o{i}")).collect::<Vec<_>>(), "acks in send order");
    bystander.finish().await;
    server.stop().await;
}

/// A WebSocket that subscribed to `path` and then never reads, with a receive buffer so small
/// that what the server writes to it stays in the server.
async fn stalled_subscriber(addr: SocketAddr, path: &str) -> ivy_tests::Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/ws");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await.expect("handshake");
    ws.send(Message::text(format!("#s#+{path}"))).await.unwrap();
    // Its subscription's ack, the last thing it reads.
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert!(t.starts_with("#s#@"), "{t}"),
        other => panic!("no subscription ack: {other:?}"),
    }
    ws
}

/// Issue 12, finding 8: memory is bounded server-wide. A subscriber that stops reading pins
/// the lines queued for it, and a client pipelining large sends holds their frames until they
/// are stored: with `--memory-budget` used up, large or pipelined sends are refused with
/// `overloaded` (nothing stored), a small send from a client with none pending is still
/// served (the bystander), the stalled subscriber's queue stops growing (it falls behind, and
/// is owed the rest from the log), and once memory is freed sends are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_sheds_large_sends_with_overloaded_and_recovers() {
    let dir = temp_dir();
    // Queues large enough, and no byte rate, so that only the budget is at work.
    let flags =
        ["--memory-budget", "8000000", "--queue-bytes", "67108864", "--queue-length", "100000", "--byte-rate", "0", "--ping-interval", "2"];
    let server = ServerProcess::start(dir.path(), &flags).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let stalled = stalled_subscriber(server.addr, "/big").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.expect("connect");
    let data = "m".repeat(60_000);
    let n = 300; // 18 MB, more than twice the budget
    for i in 0..n {
        ws.feed(Message::text(format!("#k{i}#:/big:{data}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut c = Client::from_stream(ws);
    let (mut acked, mut refused) = (0, 0);
    for _ in 0..n {
        let reply = c.recv().await;
        let key = reply.split('#').nth(1).unwrap().to_string();
        let rest = &reply[key.len() + 2..];
        if rest.starts_with('@') {
            acked += 1;
        } else {
            assert!(rest.starts_with("!overloaded event not stored: the server is overloaded: it holds "), "{reply}");
            assert!(rest.ends_with(" bytes for its clients, its memory budget is 8000000; retry later"), "{reply}");
            refused += 1;
        }
    }
    println!("memory budget of 8 MB: {acked} sends of 60 KB stored, {refused} refused with overloaded");
    assert!(refused > 0 && acked > 0, "{acked} acked, {refused} refused");
    assert_eq!(ivy_tests::log_text(server.addr, "/log/big").await.lines().count(), acked, "nothing refused is stored");
    // The stalled subscriber is closed after a ping interval behind, which frees what it held.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = c.request(&format!("#again#:/big:{data}")).await;
        if reply.starts_with("#again#@") {
            break;
        }
        assert!(reply.starts_with("#again#!overloaded "), "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "the budget never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stalled);
    bystander.finish().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_with_503_and_their_slots_come_back() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_connections = 10;
    let server = TestServer::start(cfg).await;
    let url = server.ws_url();
    let bystander = Bystander::start(&url).await; // two of the ten
    let open_until_refused = |url: String| async move {
        let mut held = Vec::new();
        loop {
            let (resp, stream) = raw_ws_open(server_addr(&url), &[]).await.expect("an answer");
            match resp.status {
                101 => held.push(stream),
                503 => {
                    assert_eq!(resp.text(), "too many connections: the limit is 10; try again later\n");
                    assert_eq!(resp.header("retry-after"), Some("5"));
                    assert_eq!(resp.header("content-type"), Some("text/plain; charset=utf-8"));
                    return held;
                }
                other => panic!("status {other}"),
            }
            assert!(held.len() <= 10, "the limit is not enforced");
        }
    };
    let held = open_until_refused(url.clone()).await;
    assert_eq!(held.len(), 8);
    // Closing them (abruptly: TCP FIN without a close frame) gives the slots back.
    drop(held);
    let held = eventually_all_slots(&url, 8).await;
    drop(held);
    // A client reconnecting in a loop (politely, then abruptly) leaks no slot.
    for i in 0..300 {
        let mut c = connect_retrying(&url).await;
        if i % 2 == 0 {
            assert!(c.request("#k#@").await.starts_with("#k#@"));
            c.close().await;
        }
    }
    drop(eventually_all_slots(&url, 8).await);
    bystander.finish().await;
    server.stop().await;
}

fn server_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("ws://").trim_end_matches("/ws").parse().expect("address")
}

/// Connects, retrying while the server still counts connections that were just closed.
async fn connect_retrying(url: &str) -> Client {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return Client::from_stream(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                assert!(tokio::time::Instant::now() < deadline, "slots did not come back within {WAIT:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// Opens `n` raw connections at once, retrying refusals until the slots of closed connections
/// are back (at most `WAIT`).
async fn eventually_all_slots(url: &str, n: usize) -> Vec<TcpStream> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut held = Vec::new();
    while held.len() < n {
        let (resp, stream) = raw_ws_open(server_addr(url), &[]).await.expect("an answer");
        match resp.status {
            101 => held.push(stream),
            503 => {
                assert!(tokio::time::Instant::now() < deadline, "only {} slots came back within {WAIT:?}", held.len());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("status {other}"),
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_half_open_connection_is_closed_by_the_ping_timeout() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.ping_interval = Duration::from_millis(200);
    cfg.max_connections = 4;
    let server = TestServer::start(cfg).await;
    let url = server.ws_url();
    let bystander = Bystander::start(&url).await;
    // A client that only listens (it reads all the time, so its library answers pings) stays
    // connected.
    let mut listener = Client::connect(&url).await;
    listener.subscribe("/quiet").await;
    let listening = tokio::spawn(async move {
        loop {
            match listener.next_within(WAIT).await {
                Got::Line(l) => return l,
                Got::Timeout => {}
                other => panic!("the listener was cut: {other:?}"),
            }
        }
    });
    // A client that completes the handshake, then neither reads nor writes: half-open.
    let (resp, mut silent) = raw_ws_open(server.addr, &[]).await.expect("handshake");
    assert_eq!(resp.status, 101);
    // All four slots are taken: the silent connection holds one.
    let (refused, _) = raw_ws_open(server.addr, &[]).await.expect("an answer");
    assert_eq!(refused.status, 503);
    // Its slot comes back once the server gives up on it (after one to two intervals).
    drop(eventually_all_slots(&url, 1).await);
    // What the silent client would have read: pings, then the close frame 4001, then the end.
    let frames = read_frames(&mut silent, resp.body).await;
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    let close = frames.iter().find(|(op, _)| *op == 0x8).map(|(_, p)| close_of(p));
    assert!(pings >= 1, "{frames:?}");
    assert_eq!(close, Some((4001, "ping timeout: nothing received for a whole ping interval".to_string())));
    // The listener was pinged many times meanwhile, answered, and is still served.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut p = Client::connect(&url).await;
    let ts = p.publish("/quiet/x", "still there").await;
    assert_eq!(listening.await.expect("listener"), format!("@{ts}:/quiet/x:still there"));
    bystander.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_that_never_finish_a_request_are_cut_by_the_header_timeout() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.header_timeout = Duration::from_millis(300);
    let server = TestServer::start(cfg).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        if i % 2 == 1 {
            // Half a request head, never finished.
            s.write_all(b"GET /log/ HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        }
        idle.push(s);
    }
    for (i, s) in idle.iter_mut().enumerate() {
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break, // closed by the server
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!("connection {i} still open after {WAIT:?}"),
            }
        }
        // Nothing or an error status, never a 200.
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 4"), "{:?}", String::from_utf8_lossy(&got));
    }
    // A normal request is still answered.
    assert_eq!(ivy_tests::http_get(server.addr, "/log/nothing", &[]).await.status, 200);
    bystander.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn the_limits_are_flags_with_clear_errors() {
    let out = std::process::Command::new(server_bin()).arg("--help").output().expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--max-connections",
        "IVY_MAX_CONNECTIONS",
        "--rate-limit",
        "IVY_RATE_LIMIT",
        "--rate-burst",
        "IVY_RATE_BURST",
        "--ping-interval",
        "IVY_PING_INTERVAL",
        "--header-timeout",
        "IVY_HEADER_TIMEOUT",
        "--queue-bytes",
        "IVY_QUEUE_BYTES",
        "--memory-budget",
        "IVY_MEMORY_BUDGET",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
    for (arg, error) in [
        ("--ping-interval=soon", "\"soon\" is not a duration"),
        ("--header-timeout=-1", "\"-1\" is not a duration"),
        ("--header-timeout=5w", "\"5w\" is not a duration"),
        ("--max-connections=many", "invalid value 'many'"),
        ("--rate-limit=-5", "invalid value '-5'"),
    ] {
        // A value taken by mistake would start a server that never exits: bounded.
        let mut child = std::process::Command::new(server_bin())
            .arg(arg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        let started = std::time::Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{arg} was accepted: the server started instead of refusing it");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        assert_eq!(out.status.code(), Some(2), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(error), "{arg}: {err}");
    }
}

/// One connection sends 600 keyless events to distinct 119-level paths as fast as it can.
/// Storing them costs O(events x depth) (it was quadratic: 1,600 such sends froze every ack of
/// the server for 89 s), a group commit is bounded by the entries and bytes it stores, and a
/// connection has at most 256 sends in the engine's queue, so the bystander keeps getting its
/// acks within the usual wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_distinct_paths_do_not_freeze_the_group_commit() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_path_depth = 120;
    let server = TestServer::start(cfg).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let mut attacker = Client::connect(&server.ws_url()).await;
    let deep = "/a".repeat(118);
    for i in 0..600 {
        attacker.send(&format!(":/p{i}{deep}:x")).await;
    }
    // Everything gets stored (slowly: each event is written 120 times), while the bystander,
    // whose every send must be acked within the usual wait, keeps going.
    let deadline = tokio::time::Instant::now() + 6 * WAIT;
    while ivy_tests::log_text(server.addr, "/log/p599/a").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the deep events were not stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bystander.finish().await;
    attacker.close().await;
    server.stop().await;
}

/// A wrapper script that starts `ivy-server` with its file-descriptor limits set by `ulimit`.
fn with_ulimit(dir: &std::path::Path, limits: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("ivy-server-ulimit.sh");
    std::fs::write(&script, format!("#!/bin/sh\nulimit {limits}\nexec '{}' \"$@\"\n", server_bin().display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// (soft, hard) "Max open files" of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

/// The binary raises its soft file-descriptor limit to the hard one (commonly 1024 against
/// hundreds of thousands).
#[tokio::test]
async fn the_binary_takes_every_file_descriptor_the_system_allows() {
    let dir = temp_dir();
    let script = with_ulimit(dir.path(), "-S -n 256");
    let server = ServerProcess::start_bin(&script, &dir.path().join("data"), &[], &[]).await;
    let (soft, hard) = nofile(server.pid());
    assert_eq!(soft, hard, "soft limit raised to the hard one");
    assert_ne!(soft, "256");
    server.kill().await;
}

/// 600 idle TCP connections from one address against a server allowed 512 file descriptors
/// (they once stopped it answering anyone): at most `--max-connections-per-address` of them
/// are held, silent ones are closed after `--first-byte-timeout`, and a client from another
/// address is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_cannot_exhaust_file_descriptors() {
    let dir = temp_dir();
    let script = with_ulimit(dir.path(), "-n 512");
    let flags = ["--max-connections-per-address", "100", "--first-byte-timeout", "1"];
    let server = ServerProcess::start_bin(&script, &dir.path().join("data"), &flags, &[]).await;
    let attacker: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..600 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(attacker).unwrap();
        if let Ok(s) = socket.connect(server.addr).await {
            idle.push(s);
        }
    }
    let bystander = Bystander::start(&server.ws_url()).await;
    let r = ivy_tests::http_get(server.addr, "/log/", &[]).await;
    assert_eq!(r.status, 200);
    // The attacker's connections beyond the first 100 were closed at once; the rest within the
    // first-byte timeout.
    let mut open = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if !matches!(tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_))) {
            open += 1;
        }
    }
    assert_eq!(open, 0, "every idle connection was closed");
    let r = ivy_tests::http_get(server.addr, "/log/bystander", &[]).await;
    assert_eq!(r.status, 200);
    bystander.finish().await;
    server.kill().await;
}

/// Sends `GET` (or `HEAD`) `target` from `from` and returns the raw response head and the
/// stream, unread beyond what the first read gave.
async fn raw_request(server: std::net::SocketAddr, from: &str, method: &str, target: &str) -> (String, TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    // A small receive window, so that a response that is not read stays mostly unsent.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(server).await.unwrap();
    s.write_all(format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("a response").unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    (head.split("\r\n\r\n").next().unwrap_or_default().to_string() + "\r\n\r\n", s)
}

/// Log readers that stop reading cannot pin the server: a streamed log holds no thread while
/// its client does not read, at most `--max-log-requests-per-address` of them are served at
/// once (503 beyond), a connection whose writes stall for `--write-timeout` is closed, and
/// others keep reading meanwhile. Pages are capped in bytes; `HEAD` builds no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_log_readers_are_bounded_and_shed() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_log_requests_per_address = 3;
    cfg.write_timeout = Duration::from_secs(1);
    cfg.log_page_bytes = 200_000;
    let server = TestServer::start(cfg).await;
    let mut p = Client::connect(&server.ws_url()).await;
    let data = "z".repeat(60_000);
    for _ in 0..150 {
        p.publish("/big", &data).await; // 9 MB: more than loopback socket buffers hold
    }
    let bystander = Bystander::start(&server.ws_url()).await;
    // Three streams from one address that are never read, then a fourth: refused.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let (head, s) = raw_request(server.addr, "127.0.0.2", "GET", "/log/big").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stalled.push(s);
    }
    let (head, _) = raw_request(server.addr, "127.0.0.2", "GET", "/log/big").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    // Another address reads at once, in pages capped in bytes (200 KB: 4 events of 60 KB).
    let r = ivy_tests::http_get(server.addr, "/log/big?limit=1000", &[]).await;
    assert_eq!((r.status, r.text().lines().count()), (200, 4));
    assert!(r.header("link").is_some_and(|l| l.contains("rel=\"next\"")), "a byte-capped page links to the next one");
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    // HEAD: the headers of the GET, no body.
    let (head, _) = raw_request(server.addr, "127.0.0.1", "HEAD", "/log/big?limit=1000").await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("etag:") && head.ends_with("\r\n\r\n"), "{head}");
    // The stalled writers are closed after the write timeout; their address is served again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (head, _) = raw_request(server.addr, "127.0.0.2", "GET", "/log/bystander").await;
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stalled readers were never shed: {head}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stalled);
    bystander.finish().await;
    server.stop().await;
}

/// A WebSocket keeps its TCP connection's place among `--max-connections-per-address` for as
/// long as it lives.
#[tokio::test]
async fn websockets_count_against_the_per_address_limit() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_connections_per_address = 3;
    let server = TestServer::start(cfg).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::connect(&server.ws_url()).await);
    }
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    assert!(refused.is_err(), "a fourth connection from the address is closed on accept");
    open.pop().unwrap().close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio_tungstenite::connect_async(server.ws_url()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the closed WebSocket's place was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// Quotas on the store: with `--max-store-size`, sends are refused with `store-full` once the
/// store reaches it (what was stored stays readable, nothing refused is stored); with a
/// free-space reserve larger than the disk's free space, at once. The refusal names the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_sends_with_store_full_and_stays_readable() {
    let dir = temp_dir();
    let server = ServerProcess::start_sled(dir.path(), &["--max-store-size", "3000000"]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let data = "f".repeat(60_000);
    let mut stored = 0;
    let refusal = loop {
        let reply = c.request(&format!("#{stored}#:/full:{data}")).await;
        if reply.starts_with(&format!("#{stored}#@")) {
            stored += 1;
            // 3 MB: 50 events of 60 KB, each stored once (in the root's log; /full's log holds
            // a reference to it).
            assert!(stored <= 50, "the limit was overshot: {stored} events stored");
            continue;
        }
        break reply;
    };
    assert!(refusal.starts_with(&format!("#{stored}#!store-full event not stored: the store is full: ")), "{refusal}");
    assert!(refusal.ends_with("bytes on disk, the limit is 3000000"), "{refusal}");
    assert_eq!(ivy_tests::log_text(server.addr, "/log/full").await.lines().count(), stored);
    assert!(c.request("#t#@").await.starts_with("#t#@"), "the connection stays usable");
    server.kill().await;

    let server = ServerProcess::start_sled(dir.path(), &["--min-free-space", "1000000000000000000"]).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let reply = c.request("#r#:/full:x").await;
    assert!(reply.starts_with("#r#!store-full event not stored: the disk is nearly full: "), "{reply}");
    assert!(reply.ends_with("bytes free, the server keeps 1000000000000000000"), "{reply}");
    server.kill().await;
}

/// Subscribe churn (issue 12, finding 10): a connection flooding subscribes and unsubscribes
/// on a crowded channel gets `--subscribe-burst` changes at once and is then paced to
/// `--subscribe-rate`: its next command is read only when the rate allows, so every change is
/// executed and answered as before (no new lines for an `ivy1` client), only later, and it
/// costs the server at most the rate. The bystander and the crowded channel's subscribers
/// keep being served. The server's own clock (`@` replies) shows the pacing: 50 changes at
/// 100 per second take at least 0.4 s of it, however fast or slow the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_churn_is_paced_and_the_others_keep_being_served() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.subscribe_rate = 100;
    cfg.subscribe_burst = 20;
    let server = TestServer::start(cfg).await;
    let bystander = Bystander::start(&server.ws_url()).await;
    let mut crowd = Vec::new();
    for _ in 0..100 {
        let mut c = Client::connect(&server.ws_url()).await;
        c.subscribe("/crowd").await;
        crowd.push(c);
    }
    let mut churner = Client::connect(&server.ws_url()).await;
    let change = |i: usize| format!("#c{i}#{}/crowd", if i % 2 == 0 { '+' } else { '-' });
    for i in 0..20 {
        churner.send(&change(i)).await;
    }
    churner.send("#t1#@").await;
    for i in 20..70 {
        churner.send(&change(i)).await;
    }
    churner.send("#t2#@").await;
    let mut clock = Vec::new();
    for i in 0..72 {
        let reply = churner.recv().await;
        match i {
            20 | 71 => clock.push(reply.rsplit('@').next().unwrap().parse::<ivy_client_core::Timestamp>().unwrap()),
            _ => {
                let n = if i < 20 { i } else { i - 1 };
                assert!(reply.starts_with(&format!("#c{n}#@")), "every change is executed and acked, in order: {reply}");
            }
        }
    }
    let paced = clock[1].as_nanos().saturating_sub(clock[0].as_nanos());
    assert!(paced >= 400_000_000, "50 changes beyond the burst took {paced} ns of the server's clock");
    let mut publisher = Client::connect(&server.ws_url()).await;
    let ts = publisher.publish("/crowd", "still").await;
    for c in &mut crowd {
        assert_eq!(c.recv().await, format!("@{ts}:/crowd:still"));
    }
    bystander.finish().await;
    server.stop().await;
}
