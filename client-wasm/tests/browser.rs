//! The WebAssembly client in headless Chromium against a real `ivy-server`.
//!
//! Run by `scripts/test.sh`, which starts `ivy-test-control` (a real server it can restart)
//! and passes its addresses at compile time in `IVY_TEST_SERVER` and `IVY_TEST_CONTROL`.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use ivy_client_wasm::{IvyClient, IvyOptions, LogOptions, SubscribeOptions};
use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const SERVER: Option<&str> = option_env!("IVY_TEST_SERVER");
const CONTROL: Option<&str> = option_env!("IVY_TEST_CONTROL");

fn server() -> &'static str {
    SERVER.expect("IVY_TEST_SERVER must be set at build time (scripts/test.sh does it)")
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(f: &Function, ms: i32);
}

/// `globalThis.fetch(url)` (not declared as an import: the library declares one already).
fn fetch(url: &str) -> Promise {
    let f: Function = Reflect::get(&js_sys::global(), &"fetch".into()).unwrap().unchecked_into();
    f.call1(&JsValue::NULL, &url.into()).unwrap().unchecked_into()
}

async fn sleep(ms: i32) {
    let p = Promise::new(&mut |resolve, _| set_timeout(&resolve, ms));
    let _ = JsFuture::from(p).await;
}

type Events = Rc<RefCell<Vec<(String, String, String)>>>;

fn get(o: &JsValue, k: &str) -> String {
    Reflect::get(o, &k.into()).ok().and_then(|v| v.as_string()).unwrap_or_default()
}

/// A callback that records events, and the record.
fn recorder() -> (Function, Events) {
    let events: Events = Rc::default();
    let e = events.clone();
    let cb =
        Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| e.borrow_mut().push((get(&ev, "ts"), get(&ev, "path"), get(&ev, "data"))));
    let f: Function = cb.as_ref().unchecked_ref::<Function>().clone();
    cb.forget();
    (f, events)
}

fn options(from: &str) -> SubscribeOptions {
    let o = Object::new();
    Reflect::set(&o, &"from".into(), &from.into()).unwrap();
    o.unchecked_into()
}

async fn wait_for(events: &Events, n: usize, what: &str) {
    for _ in 0..400 {
        if events.borrow().len() >= n {
            return;
        }
        sleep(25).await;
    }
    panic!("{what}: {} of {n} events after 10 s", events.borrow().len());
}

async fn ok(p: Promise) -> JsValue {
    JsFuture::from(p).await.unwrap_or_else(|e| panic!("rejected: {e:?}"))
}

async fn err(p: Promise) -> String {
    match JsFuture::from(p).await {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(e) => {
            assert!(e.is_instance_of::<js_sys::Error>(), "rejections are Error objects");
            String::from(e.unchecked_into::<js_sys::Error>().message())
        }
    }
}

/// The rejection of `p` (an `IvyError`), to read its `code`, `uncertain` and `status`.
async fn rejection(p: Promise) -> JsValue {
    match JsFuture::from(p).await {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(e) => {
            assert!(e.is_instance_of::<js_sys::Error>(), "rejections are Error objects");
            e
        }
    }
}

fn uncertain(e: &JsValue) -> bool {
    Reflect::get(e, &"uncertain".into()).ok().and_then(|v| v.as_bool()).expect("`uncertain` is a boolean")
}

fn message(e: &JsValue) -> String {
    String::from(e.clone().unchecked_into::<js_sys::Error>().message())
}

fn unique(prefix: &str) -> String {
    format!("/{prefix}/{}", (js_sys::Math::random() * 1e9) as u64)
}

fn fast() -> IvyOptions {
    let o = Object::new();
    for (k, v) in [("minBackoffMs", 20.0), ("maxBackoffMs", 300.0), ("idleTimeoutMs", 1000.0), ("probeTimeoutMs", 1000.0)] {
        Reflect::set(&o, &k.into(), &v.into()).unwrap();
    }
    o.unchecked_into()
}

async fn connected(c: &IvyClient) {
    for _ in 0..400 {
        if c.status() == "connected" {
            return;
        }
        sleep(25).await;
    }
    panic!("not connected: {}", c.status());
}

#[wasm_bindgen_test]
async fn subscribe_send_with_ack_and_escaping() {
    let path = unique("w");
    let a = IvyClient::new(server(), Some(fast())).unwrap();
    let b = IvyClient::new(server(), Some(fast())).unwrap();
    let (cb, events) = recorder();
    let sub = a.subscribe(&path, cb, Some(options("beginning"))).unwrap();
    assert_eq!(sub.path(), path);
    connected(&a).await;
    connected(&b).await;
    let tricky = "line1\nline2 50% literal %0A and %25 🎉";
    let ts = ok(b.send(&format!("{path}/x"), tricky.into())).await.as_string().unwrap();
    assert_eq!(ts.len(), 20);
    // Our own send shows up in our own subscription, in place, once.
    let bytes = Uint8Array::from("from a: ünï".as_bytes());
    let own = ok(a.send(&path, bytes.into())).await.as_string().unwrap();
    wait_for(&events, 2, "two events").await;
    sleep(200).await;
    let got = events.borrow().clone();
    assert_eq!(got, vec![(ts.clone(), format!("{path}/x"), tricky.to_string()), (own, path.clone(), "from a: ünï".to_string())]);
    // The server time is at least every timestamp handed out.
    let now = ok(a.timestamp()).await.as_string().unwrap();
    assert!(now >= ts);
    sub.unsubscribe();
    ok(b.send(&path, "after unsubscribe".into())).await;
    sleep(300).await;
    assert_eq!(events.borrow().len(), 2, "nothing after unsubscribe");
    a.close();
    b.close();
    assert_eq!(a.status(), "closed");
}

/// `senders: true`: every event, live and in log pages, has its verified sender (anonymous
/// here: the test server has auth off); without it, none.
#[wasm_bindgen_test]
async fn senders_on_request() {
    let path = unique("s");
    let opts = fast();
    Reflect::set(&opts, &"senders".into(), &true.into()).unwrap();
    let a = IvyClient::new(server(), Some(opts)).unwrap();
    let b = IvyClient::new(server(), Some(fast())).unwrap();
    let (seen_a, seen_b): (Rc<RefCell<Vec<JsValue>>>, Rc<RefCell<Vec<JsValue>>>) = (Rc::default(), Rc::default());
    let keep = |store: Rc<RefCell<Vec<JsValue>>>| {
        let cb = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| store.borrow_mut().push(ev));
        let f: Function = cb.as_ref().unchecked_ref::<Function>().clone();
        cb.forget();
        f
    };
    let _sa = a.subscribe(&path, keep(seen_a.clone()), Some(options("beginning"))).unwrap();
    let _sb = b.subscribe(&path, keep(seen_b.clone()), Some(options("beginning"))).unwrap();
    connected(&a).await;
    connected(&b).await;
    ok(b.send(&path, "hello".into())).await;
    for _ in 0..400 {
        if !seen_a.borrow().is_empty() && !seen_b.borrow().is_empty() {
            break;
        }
        sleep(25).await;
    }
    let sender = |ev: &JsValue| Reflect::get(ev, &"sender".into()).unwrap();
    let kind = |ev: &JsValue| get(&sender(ev), "kind");
    assert_eq!(kind(&seen_a.borrow()[0]), "anonymous");
    assert!(sender(&seen_b.borrow()[0]).is_undefined(), "no sender without the option");
    let page = ok(a.log(&path, None)).await;
    assert_eq!(kind(&js_sys::Array::from(&page).get(0)), "anonymous");
    let page = ok(b.log(&path, None)).await;
    assert!(sender(&js_sys::Array::from(&page).get(0)).is_undefined());
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn errors_are_error_objects() {
    let c = IvyClient::new(server(), Some(fast())).unwrap();
    connected(&c).await;
    assert!(err(c.send("/Bad", "x".into())).await.contains("invalid path"));
    let invalid = Uint8Array::from(&[0xff, 0xfe][..]);
    assert!(err(c.send("/ok", invalid.into())).await.contains("UTF-8"));
    assert!(err(c.send("/ok", JsValue::from(42))).await.contains("string or a Uint8Array"));
    assert!(err(c.log("/Bad", None)).await.contains("invalid path"));
    let (cb, _) = recorder();
    let e = c.subscribe("/ok", cb, Some(options("yesterday"))).unwrap_err();
    assert!(e.is_instance_of::<js_sys::Error>());
    assert!(IvyClient::new("ftp://nowhere", None).is_err());
    c.close();
    assert!(err(c.send("/ok", "x".into())).await.contains("closed"));
}

#[wasm_bindgen_test]
async fn errors_carry_a_code_and_whether_a_send_may_have_been_stored() {
    let c = IvyClient::new(server(), Some(fast())).unwrap();
    connected(&c).await;
    let e = rejection(c.send("/Bad", "x".into())).await;
    assert_eq!((get(&e, "code"), uncertain(&e)), ("invalid-path".into(), false));
    let e = rejection(c.send("/ok", Uint8Array::from(&[0xff][..]).into())).await;
    assert_eq!((get(&e, "code"), uncertain(&e)), ("invalid-argument".into(), false));
    let e = rejection(c.log("/Bad", None)).await;
    assert_eq!(get(&e, "code"), "invalid-path");
    // Log options are checked as the server checks them, with the server's reasons.
    let o = Object::new();
    Reflect::set(&o, &"n".into(), &1.into()).unwrap();
    Reflect::set(&o, &"after".into(), &"1700000000.000000000".into()).unwrap();
    let e = rejection(c.log("/ok", Some(o.unchecked_into()))).await;
    assert_eq!((get(&e, "code"), message(&e)), ("invalid-argument".into(), "n cannot be combined with after or limit".into()));
    let o = Object::new();
    Reflect::set(&o, &"n".into(), &0.into()).unwrap();
    let e = rejection(c.log("/ok", Some(o.unchecked_into()))).await;
    assert_eq!((get(&e, "code"), message(&e)), ("invalid-argument".into(), "invalid line count".into()));
    // The server's refusal of a log read: code "http" with its status.
    let long = format!("/{}", "a".repeat(300));
    let e = rejection(c.log(&long, None)).await;
    assert_eq!(get(&e, "code"), "http");
    assert_eq!(Reflect::get(&e, &"status".into()).unwrap().as_f64(), Some(400.0));
    assert!(message(&e).starts_with("HTTP 400: invalid path"), "{}", message(&e));
    // Thrown at once, with a code too.
    let (cb, _) = recorder();
    assert_eq!(get(&c.subscribe("/ok", cb, Some(options("yesterday"))).unwrap_err(), "code"), "invalid-argument");
    assert_eq!(get(&IvyClient::new("ftp://nowhere", None).unwrap_err(), "code"), "invalid-argument");
    c.close();
    let e = rejection(c.timestamp()).await;
    assert_eq!((get(&e, "code"), uncertain(&e)), ("closed".into(), false));
    // Not connected, with no offline queue: nothing was sent.
    let o = Object::new();
    Reflect::set(&o, &"offlineQueue".into(), &0.into()).unwrap();
    let d = IvyClient::new(server(), Some(o.unchecked_into())).unwrap();
    let e = rejection(d.send("/ok", "x".into())).await;
    assert_eq!((get(&e, "code"), uncertain(&e)), ("not-connected".into(), false));
    d.close();
}

#[wasm_bindgen_test]
async fn log_paging() {
    let path = unique("l");
    let c = IvyClient::new(server(), Some(fast())).unwrap();
    connected(&c).await;
    let mut ts = Vec::new();
    for i in 0..5 {
        ts.push(ok(c.send(&format!("{path}/{i}"), format!("e{i}").into())).await.as_string().unwrap());
    }
    let page = |after: Option<&str>, limit: u32| {
        let o = Object::new();
        if let Some(a) = after {
            Reflect::set(&o, &"after".into(), &a.into()).unwrap();
        }
        Reflect::set(&o, &"limit".into(), &limit.into()).unwrap();
        c.log(&path, Some(o.unchecked_into::<LogOptions>()))
    };
    let tss = |v: JsValue| -> Vec<String> { js_sys::Array::from(&v).iter().map(|e| get(&e, "ts")).collect() };
    assert_eq!(tss(ok(page(None, 2)).await), ts[0..2]);
    assert_eq!(tss(ok(page(Some(&ts[1]), 2)).await), ts[2..4]);
    assert_eq!(tss(ok(page(Some(&ts[3]), 2)).await), ts[4..5]);
    let last = Object::new();
    Reflect::set(&last, &"n".into(), &1.into()).unwrap();
    let l = ok(c.log(&path, Some(last.unchecked_into::<LogOptions>()))).await;
    assert_eq!(tss(l.clone()), ts[4..5]);
    assert_eq!(get(&js_sys::Array::from(&l).get(0), "data"), "e4");
    c.close();
}

#[wasm_bindgen_test]
async fn a_server_restart_loses_and_repeats_nothing() {
    let control = CONTROL.expect("IVY_TEST_CONTROL must be set at build time");
    let path = unique("r");
    let sub_client = IvyClient::new(server(), Some(fast())).unwrap();
    let pub_client = IvyClient::new(server(), Some(fast())).unwrap();
    let (cb, events) = recorder();
    let _sub = sub_client.subscribe(&path, cb, Some(options("beginning"))).unwrap();
    connected(&sub_client).await;
    connected(&pub_client).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(ok(pub_client.send(&path, format!("before {i}").into())).await.as_string().unwrap());
    }
    // Restart the server (SIGKILL, then start on the same port and data directory).
    let restarted = JsFuture::from(fetch(&format!("{control}/restart")));
    // Sends made meanwhile all resolve (issue 16): those written before the kill whose acks
    // were lost are resent with their send ids after the reconnect and stored once (the
    // restarted server answers a stored one with its first timestamp); the others are queued.
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(JsFuture::from(pub_client.send(&path, format!("during {i}").into())));
    }
    restarted.await.expect("restart");
    for p in pending {
        match p.await {
            Ok(ts) => acked.push(ts.as_string().unwrap()),
            Err(e) => panic!("a send failed across the restart: {} (uncertain: {})", get(&e, "code"), uncertain(&e)),
        }
    }
    for i in 0..20 {
        acked.push(ok(pub_client.send(&path, format!("after {i}").into())).await.as_string().unwrap());
    }
    // The truth: the server's log for the channel.
    let log: Vec<String> = js_sys::Array::from(&ok(sub_client.log(&path, None)).await).iter().map(|e| get(&e, "ts")).collect();
    // Every send once, in the order made, at the timestamp it resolved with.
    assert_eq!(acked, log, "the log holds each send exactly once");
    wait_for(&events, log.len(), "all events after the restart").await;
    sleep(300).await;
    let got: Vec<String> = events.borrow().iter().map(|e| e.0.clone()).collect();
    assert_eq!(got, log, "exactly the log, once, in order");
    sub_client.close();
    pub_client.close();
}

/// `o[k1][k2]...`.
fn at(o: &JsValue, keys: &[&str]) -> JsValue {
    keys.iter().fold(o.clone(), |v, k| Reflect::get(&v, &(*k).into()).unwrap_or(JsValue::UNDEFINED))
}

#[wasm_bindgen_test]
async fn debug_state_shows_the_subscriptions_the_requests_and_the_trace() {
    let path = unique("d");
    let c = IvyClient::new(server(), Some(fast())).unwrap();
    let (cb, events) = recorder();
    let _sub = c.subscribe(&path, cb, Some(options("beginning"))).unwrap();
    connected(&c).await;
    let ts = ok(c.send(&path, "hello \"debug\"".into())).await.as_string().unwrap();
    wait_for(&events, 1, "the own event").await;
    // An unanswered send: nothing runs between the call and the snapshot.
    let unanswered = c.send(&format!("{path}/later"), "pending".into());
    let d = c.debug_state();
    assert!(at(&d, &["now"]).as_f64().is_some());
    assert_eq!(at(&d, &["client", "state"]).as_string().as_deref(), Some("connected"));
    let subs = js_sys::Array::from(&at(&d, &["client", "subscriptions"]));
    assert_eq!(subs.length(), 1);
    let s = subs.get(0);
    assert_eq!(get(&s, "path"), path);
    assert_eq!(get(&s, "phase"), "live");
    assert_eq!(get(&s, "last"), ts, "the own event was delivered");
    assert_eq!(at(&s, &["ownUnacked"]).as_f64(), Some(1.0), "the unanswered send holds live events back");
    assert_eq!(get(&s, "released"), ts);
    let pending = js_sys::Array::from(&at(&d, &["client", "pending"]));
    let sends: Vec<JsValue> = pending.iter().filter(|p| get(p, "kind") == "send").collect();
    assert_eq!(sends.len(), 1);
    assert_eq!(get(&sends[0], "path"), format!("{path}/later"));
    assert!(at(&sends[0], &["deadline"]).as_f64() > at(&d, &["now"]).as_f64());
    assert_eq!(at(&d, &["driver", "droppedInputs"]).as_f64(), Some(0.0));
    assert_eq!(at(&d, &["driver", "socketReadyState"]).as_f64(), Some(1.0), "OPEN");
    // The trace: the connection, the subscribe and its log page, the frames both ways.
    let trace = js_sys::Array::from(&at(&d, &["trace"]));
    let entries: Vec<(String, String)> = trace.iter().map(|e| (get(&e, "kind"), get(&e, "text"))).collect();
    assert!(at(&d, &["traceTotal"]).as_f64() >= Some(f64::from(trace.length())));
    let has = |kind: &str, text: &str| entries.iter().any(|(k, t)| k == kind && t.contains(text));
    assert!(has("connect", "/ws") && has("open", ""), "{entries:?}");
    assert!(has("out", &format!("+{path}")) && has("log?", &path), "{entries:?}");
    assert!(has("out", &format!(":{path}:hello \"debug\"")), "{entries:?}");
    assert!(has("in", &format!("@{ts}")), "the send's ack: {entries:?}");
    assert!(has("out", &format!(":{path}/later:pending")), "{entries:?}");
    ok(unanswered).await;
    c.close();
    let d = c.debug_state();
    assert_eq!(at(&d, &["client", "state"]).as_string().as_deref(), Some("closed"));
    assert!(js_sys::Array::from(&at(&d, &["trace"])).iter().any(|e| get(&e, "kind") == "disconnect"));
}

type Presence = Rc<RefCell<Vec<JsValue>>>;

/// A presence callback that records the events, and the record.
fn presence_recorder() -> (Function, Presence) {
    let events: Presence = Rc::default();
    let e = events.clone();
    let cb = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| e.borrow_mut().push(ev));
    let f: Function = cb.as_ref().unchecked_ref::<Function>().clone();
    cb.forget();
    (f, events)
}

async fn wait_presence(events: &Presence, n: usize, what: &str) {
    for _ in 0..400 {
        if events.borrow().len() >= n {
            return;
        }
        sleep(25).await;
    }
    panic!("{what}: {} of {n} presence events after 10 s: {:?}", events.borrow().len(), events.borrow());
}

fn kind(e: &JsValue) -> String {
    get(e, "type")
}

fn at_path(o: &JsValue, path: &[&str]) -> JsValue {
    path.iter().fold(o.clone(), |v, k| Reflect::get(&v, &(*k).into()).unwrap_or(JsValue::UNDEFINED))
}

#[wasm_bindgen_test]
async fn presence_watch_and_who() {
    // The server runs without auth: every connection is an anonymous member of its own.
    let path = unique("presence");
    let a = IvyClient::new(server(), Some(fast())).unwrap();
    connected(&a).await;
    let (cb, events) = presence_recorder();
    let watch = a.presence(&path, cb).unwrap();
    assert_eq!(watch.path(), path);
    wait_presence(&events, 1, "the snapshot").await;
    let first = events.borrow()[0].clone();
    assert_eq!(kind(&first), "snapshot");
    assert_eq!(at_path(&first, &["view", "count"]).as_f64(), Some(1.0), "the watcher is present itself");
    let me = get(&at_path(&first, &["view", "members"]).unchecked_into::<js_sys::Array>().get(0), "anon");
    assert_eq!(me.len(), 16, "an anonymous id: {me}");
    assert_eq!(at_path(&first, &["view", "complete"]).as_bool(), Some(true));

    // Another client subscribes below the path: a join of another anonymous member, and the count.
    let b = IvyClient::new(server(), Some(fast())).unwrap();
    connected(&b).await;
    let (noop, _) = recorder();
    let sub = b.subscribe(&format!("{path}/x"), noop, None).unwrap();
    wait_presence(&events, 3, "a join and a count").await;
    let (join, count) = (events.borrow()[1].clone(), events.borrow()[2].clone());
    assert_eq!(kind(&join), "join");
    let other = get(&at_path(&join, &["member"]), "anon");
    assert!(other.len() == 16 && other != me, "{other}");
    assert_eq!(at_path(&join, &["member", "conns"]).as_f64(), Some(1.0));
    assert_eq!((kind(&count), at_path(&count, &["count"]).as_f64()), ("count".to_string(), Some(2.0)));
    // A one-off query from b (no subscription of its own there besides /x).
    let view = ok(b.who(&path)).await;
    assert_eq!(at_path(&view, &["count"]).as_f64(), Some(2.0));
    assert_eq!(at_path(&view, &["path"]).as_string().as_deref(), Some(path.as_str()));
    // Events of the path never reach the presence callback, presence never the subscription.
    let (rec, got) = recorder();
    let events_sub = a.subscribe(&path, rec, None).unwrap();
    ok(b.send(&format!("{path}/x"), "hello".into())).await;
    wait_for(&got, 1, "the event").await;
    assert_eq!(events.borrow().len(), 3, "no presence event for an event: {:?}", events.borrow());
    // b leaves (the server's linger is 1 s): a leave and the count.
    sub.unsubscribe();
    wait_presence(&events, 5, "a leave and a count").await;
    let (leave, count) = (events.borrow()[3].clone(), events.borrow()[4].clone());
    assert_eq!((kind(&leave), get(&at_path(&leave, &["member"]), "anon")), ("leave".to_string(), other));
    assert_eq!(at_path(&count, &["count"]).as_f64(), Some(1.0));
    assert_eq!(got.borrow().len(), 1, "only the event reached the subscription");
    // Stopped: nothing more.
    watch.stop();
    let sub2 = b.subscribe(&path, recorder().0, None).unwrap();
    sleep(600).await;
    assert_eq!(events.borrow().len(), 5);
    // who needs a connection; an invalid path is refused.
    let e = rejection(b.who("/Not Valid")).await;
    assert_eq!(get(&e, "code"), "invalid-path");
    sub2.unsubscribe();
    events_sub.unsubscribe();
    a.close();
    let e = rejection(a.who(&path)).await;
    assert_eq!(get(&e, "code"), "closed");
    b.close();
}
