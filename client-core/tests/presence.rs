//! The client state machine's presence watches and queries (`~+PATH`, `~?PATH`; **Extension**
//! `docs/PROTOCOL.md` 5.10 and 6.5), driven frame by frame as a server would answer: the
//! snapshot, the changes, the resynchronisation after a reconnect (only real differences), the
//! attribution of snapshot lines when several are under way, and the separation from the event
//! stream.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use ivy_client_core::client::{
    Action, Client, ClientError, ClientEvent, Config, ConnState, PresenceEvent, PresenceView, ServerCode, Start, WatchId,
};
use ivy_client_core::presence::{Member, MemberId};

/// Connects `c` (started or reconnecting) and returns the frames it sent on the connection.
fn connect(c: &mut Client, now: u64) -> Vec<String> {
    c.start(now);
    if let ConnState::Reconnecting { retry_at, .. } = c.state() {
        c.handle_timeout(retry_at.max(now));
    }
    let mut frames = Vec::new();
    while let Some(a) = c.poll_action() {
        assert_eq!(a, Action::Connect);
    }
    c.handle_connected(now);
    while let Some(a) = c.poll_action() {
        if let Action::Send(f) = a {
            frames.push(f);
        }
    }
    frames
}

fn frames(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(a) = c.poll_action() {
        if let Action::Send(f) = a {
            out.push(f);
        }
    }
    out
}

fn feed(c: &mut Client, lines: &[&str]) -> Vec<ClientEvent> {
    for l in lines {
        c.handle_frame(0, l);
    }
    let mut out = Vec::new();
    while let Some(e) = c.poll_event() {
        if !matches!(e, ClientEvent::State(_)) {
            out.push(e);
        }
    }
    out
}

fn presence(watch: WatchId, events: Vec<ClientEvent>) -> Vec<PresenceEvent> {
    events
        .into_iter()
        .map(|e| match e {
            ClientEvent::Presence { watch: w, event } if w == watch => event,
            other => panic!("not a presence event of {watch:?}: {other:?}"),
        })
        .collect()
}

fn sub(s: &str, conns: u32) -> Member {
    Member { id: MemberId::Sub(s.into()), info: None, conns }
}

fn key(frame: &str) -> &str {
    frame.split('#').nth(1).unwrap()
}

#[test]
fn a_watch_reports_its_snapshot_then_changes_and_presence_stays_out_of_the_event_stream() {
    let mut c = Client::new(Config::default(), 1);
    let s = c.subscribe(0, "/room", Start::Now).unwrap();
    let w = c.watch_presence(0, "room/").unwrap();
    assert_eq!(c.watch_path(w), Some("/room"));
    let sent = connect(&mut c, 0);
    assert_eq!(sent, ["#1#+/room", "#2#~+/room"]);
    assert_eq!(c.presence_view(w), None);
    let out = feed(
        &mut c,
        &[
            "#1#@0000000010.000000000",
            r#"^=/room:{"count":1,"members":[{"sub":"ada","info":{"nick":"Ada"},"conns":2}]}"#,
            r#"^./room:{"count":1}"#,
            "#2#@0000000010.000000000",
        ],
    );
    let ada = Member { id: MemberId::Sub("ada".into()), info: Some(r#"{"nick":"Ada"}"#.into()), conns: 2 };
    let view = PresenceView { path: "/room".into(), count: 1, members: vec![ada.clone()], complete: true };
    assert_eq!(presence(w, out), [PresenceEvent::Snapshot(view.clone())]);
    assert_eq!(c.presence_view(w), Some(view));
    assert!(c.presence_live(w) && c.is_live());
    let debug = c.debug_state().to_json();
    assert!(debug.contains(r#""presence":[{"id":2,"path":"/room","phase":"live","count":1,"members":1}]"#), "{debug}");
    // An event, a presence change, another event: the subscription sees the two events, in
    // order, and nothing else; the watch sees the change.
    let out = feed(
        &mut c,
        &[
            "@0000000011.000000000:/room:hi",
            r#"^~/room:{"join":[{"anon":"00ff00ff00ff00ff"}],"count":2}"#,
            "@0000000012.000000000:/room/x:there",
        ],
    );
    let anon = Member { id: MemberId::Anon("00ff00ff00ff00ff".into()), info: None, conns: 1 };
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(matches!(&out[0], ClientEvent::Event { sub, event } if *sub == s && &*event.data == b"hi"));
    assert_eq!(out[1], ClientEvent::Presence { watch: w, event: PresenceEvent::Join(anon.clone()) });
    assert_eq!(out[2], ClientEvent::Presence { watch: w, event: PresenceEvent::Count(2) });
    assert!(matches!(&out[3], ClientEvent::Event { sub, event } if *sub == s && &*event.data == b"there"));
    let out = feed(&mut c, &[r#"^~/room:{"leave":[{"sub":"ada"}],"count":1}"#]);
    assert_eq!(presence(w, out), [PresenceEvent::Leave(Member { conns: 0, ..ada }), PresenceEvent::Count(1)]);
    // The subscription of the same path ends: the watch holds the path, so no `-`.
    c.unsubscribe(0, s);
    assert_eq!(frames(&mut c), Vec::<String>::new());
    c.unwatch_presence(0, w);
    assert_eq!(frames(&mut c), ["#3#-/room"]);
    assert_eq!(feed(&mut c, &[r#"^~/room:{"leave":[{"anon":"00ff00ff00ff00ff"}],"count":0}"#]), []);
}

#[test]
fn after_a_reconnect_only_the_real_differences_are_reported() {
    let mut c = Client::new(Config::default(), 2);
    let w = c.watch_presence(0, "/room").unwrap();
    let sent = connect(&mut c, 0);
    feed(
        &mut c,
        &[
            r#"^=/room:{"count":3,"members":[{"sub":"ada","conns":1},{"sub":"bob","conns":1},{"sub":"eve","conns":1}]}"#,
            r#"^./room:{"count":3}"#,
            &format!("#{}#@0000000010.000000000", key(&sent[0])),
        ],
    );
    c.handle_disconnected(100);
    assert_eq!(c.presence_view(w).unwrap().count, 3, "the view stays while disconnected");
    assert!(!c.presence_live(w));
    // While away: bob left, cy joined, ada and eve stayed (ada reloaded within the linger).
    let sent = connect(&mut c, 200);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].ends_with("#~+/room"), "{sent:?}");
    let out = feed(
        &mut c,
        &[
            // A change before the fresh snapshot began: the snapshot has it.
            r#"^~/room:{"leave":[{"sub":"ada"}],"count":2}"#,
            r#"^=/room:{"count":3,"members":[{"sub":"ada","conns":1},{"sub":"cy","conns":1},{"sub":"eve","conns":1}]}"#,
            r#"^./room:{"count":3}"#,
            &format!("#{}#@0000000020.000000000", key(&sent[0])),
        ],
    );
    assert_eq!(presence(w, out), [PresenceEvent::Leave(sub("bob", 0)), PresenceEvent::Join(sub("cy", 1))]);
    // Nobody changed across another reconnect: nothing is reported at all.
    c.handle_disconnected(300);
    let sent = connect(&mut c, 400);
    let out = feed(
        &mut c,
        &[
            r#"^=/room:{"count":3,"members":[{"sub":"ada","conns":1},{"sub":"cy","conns":1},{"sub":"eve","conns":1}]}"#,
            r#"^./room:{"count":3}"#,
            &format!("#{}#@0000000030.000000000", key(&sent[0])),
        ],
    );
    assert_eq!(out, []);
    let names: Vec<String> = c.presence_view(w).unwrap().members.into_iter().map(|m| m.id.to_string()).collect();
    assert_eq!(names, ["ada", "cy", "eve"]);
}

#[test]
fn snapshot_lines_belong_to_the_oldest_snapshot_under_way_and_changes_to_every_watch_above() {
    let mut c = Client::new(Config::default(), 3);
    let all = c.watch_presence(0, "/chat").unwrap();
    let a = c.watch_presence(0, "/chat/a").unwrap();
    let sent = connect(&mut c, 0);
    assert_eq!(sent, ["#1#~+/chat", "#2#~+/chat/a"]);
    let q = c.who(0, "/chat/b").unwrap();
    assert_eq!(frames(&mut c), ["#3#~?/chat/b"]);
    let out = feed(
        &mut c,
        &[
            r#"^=/chat/a:{"count":1,"members":[{"sub":"ada","conns":1}]}"#,
            r#"^=/chat/b:{"count":1,"members":[{"sub":"bob","conns":1}]}"#,
            r#"^./chat:{"count":2}"#,
            "#1#@0000000001.000000000",
            r#"^=/chat/a:{"count":1,"members":[{"sub":"ada","conns":1}]}"#,
            r#"^./chat/a:{"count":1}"#,
            "#2#@0000000001.000000000",
            r#"^=/chat/b:{"count":1,"members":[{"sub":"bob","conns":1}]}"#,
            r#"^./chat/b:{"count":1}"#,
            "#3#@0000000001.000000000",
        ],
    );
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(matches!(&out[0], ClientEvent::Presence { watch, event: PresenceEvent::Snapshot(v) } if *watch == all && v.count == 2));
    assert!(
        matches!(&out[1], ClientEvent::Presence { watch, event: PresenceEvent::Snapshot(v) } if *watch == a && v.members == [sub("ada", 1)])
    );
    let who = PresenceView { path: "/chat/b".into(), count: 1, members: vec![sub("bob", 1)], complete: true };
    assert_eq!(out[2], ClientEvent::Who { id: q, result: Ok(who) });
    // A change of /chat/a reaches both watches (the connection gets it once).
    let out = feed(&mut c, &[r#"^~/chat/a:{"join":[{"sub":"cy"}],"count":2}"#]);
    assert_eq!(
        out,
        [
            ClientEvent::Presence { watch: all, event: PresenceEvent::Join(sub("cy", 1)) },
            ClientEvent::Presence { watch: all, event: PresenceEvent::Count(3) },
            ClientEvent::Presence { watch: a, event: PresenceEvent::Join(sub("cy", 1)) },
            ClientEvent::Presence { watch: a, event: PresenceEvent::Count(2) },
        ]
    );
    // A change of /chat/b: only the watch of /chat. ada moving to /chat/b: still in /chat.
    let out = feed(&mut c, &[r#"^~/chat/b:{"join":[{"sub":"ada"}],"count":2}"#, r#"^~/chat/a:{"leave":[{"sub":"ada"}],"count":1}"#]);
    assert_eq!(
        out,
        [
            ClientEvent::Presence { watch: a, event: PresenceEvent::Leave(sub("ada", 0)) },
            ClientEvent::Presence { watch: a, event: PresenceEvent::Count(1) }
        ]
    );
}

#[test]
fn refusals_timeouts_and_stray_lines() {
    let mut c = Client::new(Config::default().request_timeout(1000), 4);
    assert_eq!(c.who(0, "/x"), Err(ClientError::NotConnected));
    assert!(matches!(c.watch_presence(0, "/A"), Err(ClientError::InvalidPath(_))));
    let w = c.watch_presence(0, "/secret").unwrap();
    let ok = c.watch_presence(0, "/open").unwrap();
    let sent = connect(&mut c, 0);
    assert_eq!(sent, ["#1#~+/secret", "#2#~+/open"]);
    // Refused: no snapshot lines for it; the next snapshot is the other watch's.
    let out = feed(
        &mut c,
        &[
            "#1#!forbidden no read grant covers /secret",
            r#"^=/open:{"count":1,"members":[{"sub":"ada","conns":1}]}"#,
            r#"^./open:{"count":1}"#,
            "#2#@0000000001.000000000",
        ],
    );
    let refused = ClientError::Server { code: ServerCode::from_wire("forbidden"), message: "no read grant covers /secret".into() };
    assert_eq!(out[0], ClientEvent::Presence { watch: w, event: PresenceEvent::Failed(refused) });
    assert!(matches!(&out[1], ClientEvent::Presence { watch, event: PresenceEvent::Snapshot(v) } if *watch == ok && v.count == 1));
    assert_eq!(c.watch_path(w), None);
    // A query refused by an older server; one that gets no answer in time.
    let old = c.who(10, "/open").unwrap();
    let f = frames(&mut c);
    let out = feed(&mut c, &[&format!("#{}#!malformed unknown command '~'", key(&f[0]))]);
    assert!(matches!(&out[0], ClientEvent::Who { id, result: Err(ClientError::Server { .. }) } if *id == old));
    let slow = c.who(20, "/open").unwrap();
    let _ = frames(&mut c);
    c.handle_timeout(1020);
    let out = feed(&mut c, &[]);
    assert!(out.contains(&ClientEvent::Who { id: slow, result: Err(ClientError::Timeout) }), "{out:?}");
    // Its late lines are read and dropped.
    let out = feed(&mut c, &[r#"^=/open:{"count":1,"members":[{"sub":"ada","conns":1}]}"#, r#"^./open:{"count":1}"#]);
    assert_eq!(out, []);
    // A watch removed before its refusal, and a timed-out query refused late: their refusals
    // still end their turn, so the next snapshot goes to the next command.
    let gone = c.watch_presence(1100, "/gone").unwrap();
    let late = c.who(1100, "/late").unwrap();
    let f = frames(&mut c);
    c.unwatch_presence(1100, gone);
    let _ = frames(&mut c);
    c.handle_timeout(2200);
    assert!(feed(&mut c, &[]).contains(&ClientEvent::Who { id: late, result: Err(ClientError::Timeout) }));
    let next = c.who(2200, "/open").unwrap();
    let g = frames(&mut c);
    let out = feed(
        &mut c,
        &[
            &format!("#{}#!forbidden no", key(&f[0])),
            &format!("#{}#!forbidden no", key(&f[1])),
            r#"^=/open:{"count":1,"members":[{"sub":"ada","conns":1}]}"#,
            r#"^./open:{"count":1}"#,
            &format!("#{}#@0000000002.000000000", key(&g[0])),
        ],
    );
    assert!(out.iter().any(|e| matches!(e, ClientEvent::Who { id, result: Ok(v) } if *id == next && v.count == 1)), "{out:?}");
    // Lines no watch or query asked for, and a garbled one: warnings, nothing else.
    let out = feed(&mut c, &[r#"^./zzz:{"count":0}"#, r#"^=/zzz:{"count":0}"#, "^~/open:{nope}"]);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|e| matches!(e, ClientEvent::Warning(_))), "{out:?}");
    // A query in flight when the connection drops fails; the watch resumes on the next one.
    let lost = c.who(30, "/open").unwrap();
    c.handle_disconnected(40);
    let out = feed(&mut c, &[]);
    assert!(out.contains(&ClientEvent::Who { id: lost, result: Err(ClientError::ConnectionLost) }), "{out:?}");
    // Closing ends the watches.
    c.close(50);
    assert_eq!(c.watch_path(ok), None);
    assert_eq!(c.watch_presence(50, "/open"), Err(ClientError::Closed));
}

#[test]
fn a_subscription_ended_by_the_server_ends_the_watch_of_its_path() {
    let mut c = Client::new(Config::default(), 5);
    let w = c.watch_presence(0, "/r").unwrap();
    connect(&mut c, 0);
    feed(&mut c, &[r#"^./r:{"count":0}"#, "#1#@0000000001.000000000"]);
    let out = feed(&mut c, &["!subscription-ended /r the refreshed token has no read grant covering it"]);
    assert_eq!(
        out,
        [ClientEvent::Presence { watch: w, event: PresenceEvent::Ended("/r the refreshed token has no read grant covering it".into()) }]
    );
    assert_eq!(c.watch_path(w), None);
}
