//! The Ivy client for web applications: the sans-IO core of `ivy-client-core` driven by the
//! browser (WebSocket, `fetch` for log pages, `setTimeout` for deadlines), exported to
//! JavaScript with wasm-bindgen.
//!
//! Web apps get exactly the guarantees of the Rust client, from the same code: every
//! subscription delivers each event of its channel exactly once, in order, across reconnects
//! and server restarts (or reports that continuity was lost); sends resolve to the event's
//! timestamp once stored, once, across reconnects (each carries an id, from a random instance
//! read from `crypto.getRandomValues`, and is resent with it when its ack was lost); sends
//! made while disconnected are queued.
//!
//! The package's entry is the JavaScript layer `js/ivy_client_wasm.js` (loading the inlined
//! module, option checks, listeners, status reasons), which wraps these exports; used through
//! it:
//!
//! ```js
//! import { IvyClient } from "ivy-client-wasm";
//! const client = new IvyClient("ws://127.0.0.1:8080");
//! const sub = client.subscribe("/chat/room1", (e) => console.log(e.ts, e.path, e.data), { from: "beginning" });
//! const ts = await client.send("/chat/room1", "hello");
//! sub.unsubscribe();
//! client.close();
//! ```
//!
//! Rules kept here: no panic reaches JavaScript (errors are `Error` objects, each with a
//! machine-readable `code` and `uncertain`: the `IvyError` interface of the TypeScript
//! types); callbacks are never invoked while Rust state is borrowed (they are queued and run
//! after each step, so a callback may call back into the client). An input from the browser
//! (a socket event, the timer, a log page) that finds the state borrowed anyway would be
//! dropped: none is expected, and each is counted in `debugState()` and warned on the
//! console, never lost silently.
//!
//! The crate uses `core` and `alloc` only: the package links no standard library, whose panic
//! handler would bring Rust's formatting machinery into the `.wasm` (see the README's size
//! section). A panic aborts the module (`RuntimeError: unreachable`), as it did with the
//! standard library and `panic = "abort"`.
#![no_std]

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use ivy_client_core as ivy_core;
use ivy_core::Timestamp;
use ivy_core::client::{
    self, Action, ClientError, ClientEvent, ConnState, PresenceEvent, PresenceView, RequestId, Start, SubId, SubscriptionError, Token,
    WatchId,
};
use ivy_core::http::{Endpoints, LogQuery};
use ivy_core::presence::{Member, MemberId};
use ivy_core::wire::Sender;
use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{MessageEvent, WebSocket};

/// The allocator: dlmalloc, the one the standard library uses on wasm32 (the crate is
/// `no_std`, so it is named here). lol_alloc's free list would be 2.4 KB gzipped smaller, but
/// its allocation time grows with the number of free blocks, which nothing bounds in a
/// long-running page.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[cfg(all(target_arch = "wasm32", not(feature = "std")))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

// The public types are written by hand in `js/ivy_client_wasm.d.ts`, over the JavaScript layer
// `js/ivy_client_wasm.js` that wraps these exports; this section only keeps the generated
// (unshipped) `.d.ts` of the glue self-contained.
#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &'static str = r#"
export type IvyStatus = "connecting" | "connected" | "reconnecting" | "closed";
export type IvySender = { kind: "user"; sub: string } | { kind: "anonymous" } | { kind: "application" } | { kind: "unknown" };
export interface IvyEvent { ts: string; path: string; data: string; sender?: IvySender }
export type IvyOptions = Record<string, number | boolean>;
export interface SubscribeOptions { from?: string; onError?: (err: Error) => void }
export interface LogOptions { after?: string; limit?: number; n?: number }
export interface IvyMember { sub?: string; anon?: string; info?: Record<string, unknown>; conns: number }
export interface IvyPresenceView { path: string; count: number; members: IvyMember[]; complete: boolean }
export type IvyPresenceEvent = { type: "snapshot"; view: IvyPresenceView } | { type: "join"; member: IvyMember } | { type: "leave"; member: IvyMember } | { type: "count"; count: number } | { type: "error"; error: Error };
"#;

#[wasm_bindgen]
extern "C" {
    /// `IvyOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "IvyOptions")]
    pub type IvyOptions;
    /// `SubscribeOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "SubscribeOptions")]
    pub type SubscribeOptions;
    /// `LogOptions` in TypeScript.
    #[wasm_bindgen(typescript_type = "LogOptions")]
    pub type LogOptions;
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &Function, timeout: f64) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(handle: &JsValue);
    #[wasm_bindgen(js_name = fetch)]
    fn fetch(url: &str, init: &JsValue) -> Promise;
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
    #[wasm_bindgen(js_namespace = Math, js_name = random)]
    fn math_random() -> f64;
    #[wasm_bindgen(js_namespace = Date, js_name = now)]
    fn date_now() -> f64;
    /// `crypto.getRandomValues` (browsers, Node 19 and later, workers): the send ids' instance.
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues, catch)]
    fn get_random_values(array: &Uint8Array) -> Result<JsValue, JsValue>;
}

/// 12 random bytes from `crypto.getRandomValues`, for the client's send-id instance
/// (`Config::instance`); `Math.random` only where there is no `crypto` (none of the supported
/// environments).
fn random_instance() -> [u8; 12] {
    let mut bytes = [0u8; 12];
    let array = Uint8Array::new_with_length(12);
    if get_random_values(&array).is_ok() {
        array.copy_to(&mut bytes);
    } else {
        for b in &mut bytes {
            *b = (math_random() * 256.0) as u8;
        }
    }
    bytes
}

/// An `IvyError`: an `Error` with `code` and `uncertain`.
fn ivy_error(message: &str, code: &str, uncertain: bool) -> js_sys::Error {
    let e = js_sys::Error::new(message);
    let _ = Reflect::set(&e, &"code".into(), &code.into());
    let _ = Reflect::set(&e, &"uncertain".into(), &uncertain.into());
    e
}

fn invalid_argument(message: &str) -> JsValue {
    ivy_error(message, "invalid-argument", false).into()
}

fn busy() -> JsValue {
    ivy_error("client busy", "busy", false).into()
}

/// A failed log read; `status` when the server answered.
fn http_error(status: Option<u16>, message: &str) -> JsValue {
    let e = ivy_error(message, "http", false);
    if let Some(s) = status {
        let _ = Reflect::set(&e, &"status".into(), &s.into());
    }
    e.into()
}

/// The `code` of a request's failure.
fn error_code(e: &ClientError) -> &str {
    match e {
        ClientError::InvalidPath(_) => "invalid-path",
        ClientError::Server { code, .. } => code.as_str(),
        ClientError::ConnectionLost => "connection-lost",
        ClientError::NotConnected => "not-connected",
        ClientError::Timeout => "timeout",
        ClientError::WindowPassed => "window-passed",
        ClientError::Closed => "closed",
        ClientError::TooLarge { .. } => "too-large",
        ClientError::Unauthorized => "unauthorized",
    }
}

fn client_error(e: &ClientError) -> JsValue {
    ivy_error(&e.to_string(), error_code(e), e.is_uncertain()).into()
}

fn subscription_error(e: &SubscriptionError) -> JsValue {
    let code = match e {
        SubscriptionError::ContinuityLost { .. } => "continuity-lost",
        SubscriptionError::Refused(e) => error_code(e),
        SubscriptionError::Ended(_) => "subscription-ended",
    };
    ivy_error(&e.to_string(), code, false).into()
}

fn now() -> client::Millis {
    performance_now().max(0.0) as u64
}

fn status_str(s: ConnState) -> &'static str {
    match s {
        ConnState::Idle | ConnState::Connecting { .. } => "connecting",
        ConnState::Connected => "connected",
        ConnState::Reconnecting { .. } | ConnState::AwaitingToken => "reconnecting",
        ConnState::Closed => "closed",
        ConnState::Unauthorized => "unauthorized",
    }
}

fn set(o: &Object, key: &str, value: &JsValue) {
    let _ = Reflect::set(o, &key.into(), value);
}

/// `{sub, info?, conns}` or `{anon, conns}` (the server's member objects; `info` parsed).
fn member_object(m: &Member) -> JsValue {
    let o = Object::new();
    match &m.id {
        MemberId::Sub(s) => set(&o, "sub", &JsValue::from_str(s)),
        MemberId::Anon(a) => set(&o, "anon", &JsValue::from_str(a)),
    }
    if let Some(info) = m.info.as_deref().and_then(|i| js_sys::JSON::parse(i).ok()) {
        set(&o, "info", &info);
    }
    set(&o, "conns", &JsValue::from(m.conns));
    o.into()
}

fn view_object(v: &PresenceView) -> JsValue {
    let o = Object::new();
    set(&o, "path", &JsValue::from_str(&v.path));
    set(&o, "count", &JsValue::from(v.count as f64));
    let members: Array = v.members.iter().map(member_object).collect();
    set(&o, "members", &members);
    set(&o, "complete", &JsValue::from(v.complete));
    o.into()
}

/// `{type: "snapshot", view}`, `{type: "join" | "leave", member}`, `{type: "count", count}` or
/// `{type: "error", error}` (the watch was refused or ended: it is over).
fn presence_object(e: &PresenceEvent) -> JsValue {
    let o = Object::new();
    let kind = match e {
        PresenceEvent::Snapshot(v) => {
            set(&o, "view", &view_object(v));
            "snapshot"
        }
        PresenceEvent::Join(m) => {
            set(&o, "member", &member_object(m));
            "join"
        }
        PresenceEvent::Leave(m) => {
            set(&o, "member", &member_object(m));
            "leave"
        }
        PresenceEvent::Count(n) => {
            set(&o, "count", &JsValue::from(*n as f64));
            "count"
        }
        PresenceEvent::Failed(err) => {
            set(&o, "error", &client_error(err));
            "error"
        }
        PresenceEvent::Ended(reason) => {
            let mut message = String::from("presence ended by the server: ");
            message.push_str(reason);
            set(&o, "error", &ivy_error(&message, "subscription-ended", false).into());
            "error"
        }
    };
    set(&o, "type", &kind.into());
    o.into()
}

fn event_object(e: &ivy_core::Event<'_>) -> JsValue {
    let o = Object::new();
    let _ = Reflect::set(&o, &"ts".into(), &e.ts.to_string().into());
    let _ = Reflect::set(&o, &"path".into(), &JsValue::from_str(&e.path));
    let _ = Reflect::set(&o, &"data".into(), &JsValue::from_str(&String::from_utf8_lossy(&e.data)));
    if let Some(sender) = &e.sender {
        let s = Object::new();
        let kind = match sender {
            Sender::User(sub) => {
                let _ = Reflect::set(&s, &"sub".into(), &JsValue::from_str(sub));
                "user"
            }
            Sender::Anonymous => "anonymous",
            Sender::Application => "application",
            Sender::Unknown => "unknown",
        };
        let _ = Reflect::set(&s, &"kind".into(), &kind.into());
        let _ = Reflect::set(&o, &"sender".into(), &s);
    }
    o.into()
}

/// A callback to run once no Rust state is borrowed: a function and its one argument.
struct Call(Function, JsValue);

/// The one closure type of every handler given to JavaScript (WebSocket events, the timer):
/// each closure type costs its own glue. The argument is the event (undefined for the timer).
type Handler = Closure<dyn FnMut(JsValue)>;

struct Socket {
    ws: WebSocket,
    _on_open: Handler,
    _on_message: Handler,
    _on_close: Handler,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        self.ws.set_onerror(None);
        let _ = self.ws.close();
    }
}

struct SubCallbacks {
    on_event: Function,
    on_error: Option<Function>,
}

/// Entries of the diagnostic trace (`debugState().trace`): the last frames in and out, the
/// connection changes and log pages, each cut to `client::TRACE_TEXT` bytes.
const TRACE_ENTRIES: usize = 64;

struct State {
    core: client::Client,
    /// The last inputs and outputs, for `debugState()`.
    trace: client::Trace,
    ws_url: String,
    http_base: String,
    /// The token provider (`options.getToken`, wrapped by the JavaScript layer: a promise of
    /// `[token, exp]` or of null). The core's current token (`core.token()`) is sent as
    /// `?token=` on the WebSocket and as `Authorization: Bearer` on log reads.
    get_token: Option<Function>,
    /// `ext=sender` on log reads too.
    senders: bool,
    socket: Option<Socket>,
    /// Increments per socket, so that late events of a replaced socket are ignored.
    socket_gen: u64,
    timer: Option<(client::Millis, JsValue)>,
    /// Few entries: vectors (a hash map would cost code size in the .wasm).
    subs: Vec<(SubId, SubCallbacks)>,
    requests: Vec<(RequestId, Function, Function)>,
    /// Presence watches and their callbacks; presence queries and their promise's functions.
    watches: Vec<(WatchId, Function)>,
    whos: Vec<(RequestId, Function, Function)>,
    status_callbacks: Vec<Function>,
    /// The input being handled, for the status callbacks: "start", "open", "in", "close",
    /// "timeout", "closed" (`close()`), "send-failed", "socket-error", "unauthorized" (a probe
    /// found the token refused).
    cause: &'static str,
    /// The code of the last close event (with cause "close").
    close_code: Option<u16>,
    /// Whether the current socket opened (a close before that, with a token, is probed with
    /// `fetch` to learn whether the server refused the token).
    opened: bool,
}

struct Inner {
    state: RefCell<State>,
    calls: RefCell<VecDeque<Call>>,
    draining: Cell<bool>,
    timer_closure: RefCell<Option<Handler>>,
    /// Log pages fetched and not answered yet (for `debugState()`).
    fetches: Cell<u32>,
    /// Inputs dropped because the state was borrowed (a re-entrant call: never expected;
    /// counted in `debugState()` and warned on the console).
    dropped: Cell<u32>,
}

/// Counts and reports an input that found the state borrowed and was dropped.
fn dropped(inner: &Inner, what: &str) {
    inner.dropped.set(inner.dropped.get() + 1);
    let mut message = String::from(what);
    message.push_str(" dropped: the client was busy (a re-entrant call, which is a bug)");
    web_sys_warn(&message);
}

/// A connection to an Ivy server that reconnects by itself.
#[wasm_bindgen]
pub struct IvyClient {
    inner: Rc<Inner>,
}

/// A subscription; call `unsubscribe()` to end it.
#[wasm_bindgen]
pub struct IvySubscription {
    inner: Weak<Inner>,
    id: SubId,
    path: String,
}

impl core::fmt::Debug for IvyClient {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IvyClient").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl core::fmt::Debug for IvySubscription {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IvySubscription").field("path", &self.path).finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl IvySubscription {
    /// The subscription's normalized channel path.
    #[wasm_bindgen(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// Ends the subscription: its callback is not called again.
    pub fn unsubscribe(&self) {
        if let Some(inner) = self.inner.upgrade() {
            if let Ok(mut st) = inner.state.try_borrow_mut() {
                st.subs.retain(|(id, _)| *id != self.id);
                st.core.unsubscribe(now(), self.id);
            }
            pump(&inner);
        }
    }
}

/// A presence watch; call `stop()` to end it.
#[wasm_bindgen]
pub struct IvyPresence {
    inner: Weak<Inner>,
    id: WatchId,
    path: String,
}

impl core::fmt::Debug for IvyPresence {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IvyPresence").field("path", &self.path).finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl IvyPresence {
    /// The watch's normalized path.
    #[wasm_bindgen(getter)]
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// Ends the watch: its callback is not called again.
    pub fn stop(&self) {
        if let Some(inner) = self.inner.upgrade() {
            if let Ok(mut st) = inner.state.try_borrow_mut() {
                st.watches.retain(|(id, _)| *id != self.id);
                st.core.unwatch_presence(now(), self.id);
            }
            pump(&inner);
        }
    }
}

/// A `Config` setter of a duration option.
type Setter = fn(client::Config, client::Millis) -> client::Config;

fn number(options: &JsValue, key: &str) -> Option<u64> {
    Reflect::get(options, &key.into()).ok().and_then(|v| v.as_f64()).filter(|n| n.is_finite() && *n >= 0.0).map(|n| n as u64)
}

#[wasm_bindgen]
impl IvyClient {
    /// Starts connecting to the server at `url` (`ws://host:port`, or `http://`, `wss://`,
    /// `https://`); the WebSocket (`/ws`) and log (`/log/`) endpoints are derived from it.
    /// Throws an `IvyError` ("invalid-argument") for a URL that is none of these.
    #[wasm_bindgen(constructor)]
    pub fn new(url: &str, options: Option<IvyOptions>) -> Result<IvyClient, JsValue> {
        let options: Option<JsValue> = options.map(Into::into);
        let token = options_value(options.as_ref(), "token").and_then(|v| v.as_string()).filter(|t| !t.is_empty());
        let token_exp = options_value(options.as_ref(), "tokenExp").and_then(|v| v.as_f64()).filter(|e| e.is_finite() && *e > 0.0);
        let get_token = options_value(options.as_ref(), "getToken").and_then(|f| f.dyn_into::<Function>().ok());
        let Endpoints { ws: ws_url, http: http_base, .. } = Endpoints::from_base(url).map_err(|e| invalid_argument(&e.to_string()))?;
        let mut cfg = client::Config::default();
        if let Some(o) = options.filter(|o| o.is_object()) {
            let durations: [(&str, Setter); 7] = [
                ("minBackoffMs", client::Config::min_backoff),
                ("maxBackoffMs", client::Config::max_backoff),
                ("connectTimeoutMs", client::Config::connect_timeout),
                ("requestTimeoutMs", client::Config::request_timeout),
                ("idleTimeoutMs", client::Config::idle_timeout),
                ("probeTimeoutMs", client::Config::probe_timeout),
                ("idempotencyWindowMs", client::Config::idempotency_window),
            ];
            for (key, set) in durations {
                if let Some(v) = number(&o, key) {
                    cfg = set(cfg, v);
                }
            }
            if let Some(v) = number(&o, "offlineQueue") {
                cfg = cfg.offline_queue(v as usize);
            }
            if let Some(v) = number(&o, "maxMessageSize") {
                cfg = cfg.max_message_size(v as usize);
            }
            if let Some(v) = number(&o, "pageLimit").filter(|v| *v >= 1) {
                cfg = cfg.page_limit(v.min(u64::from(u32::MAX)) as u32);
            }
            // `ext=sender` (docs/PROTOCOL.md 6.1.1): every event gets its `sender`.
            if Reflect::get(&o, &"senders".into()).ok().and_then(|v| v.as_bool()) == Some(true) {
                cfg = cfg.senders(true);
            }
        }
        cfg = cfg.token_provider(get_token.is_some()).instance(random_instance());
        let ws_url = cfg.ws_url(&ws_url);
        let senders = cfg.senders;
        let seed = (math_random() * 9_007_199_254_740_992.0) as u64;
        let mut core = client::Client::new(cfg, seed);
        if let Some(t) = token.clone() {
            core.set_token(now(), Token::from_exp(t, token_exp.map(|e| e as u64), date_now() as u64, now()));
        }
        let state = State {
            core,
            trace: client::Trace::new(TRACE_ENTRIES),
            ws_url,
            http_base,
            get_token: get_token.clone(),
            senders,
            socket: None,
            socket_gen: 0,
            timer: None,
            subs: Vec::new(),
            requests: Vec::new(),
            watches: Vec::new(),
            whos: Vec::new(),
            status_callbacks: Vec::new(),
            cause: "start",
            close_code: None,
            opened: false,
        };
        let inner = Rc::new(Inner {
            state: RefCell::new(state),
            calls: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            timer_closure: RefCell::new(None),
            fetches: Cell::new(0),
            dropped: Cell::new(0),
        });
        let weak = Rc::downgrade(&inner);
        *inner.timer_closure.borrow_mut() = Some(Closure::new(move |_| {
            if let Some(inner) = weak.upgrade() {
                match inner.state.try_borrow_mut() {
                    Ok(mut st) => {
                        st.timer = None;
                        st.cause = "timeout";
                        st.core.handle_timeout(now());
                    }
                    Err(_) => dropped(&inner, "a timer"),
                }
                pump(&inner);
            }
        }));
        inner.state.borrow_mut().core.start(now());
        pump(&inner);
        // A provider and no token: the connection opens without one (the server's anonymous
        // grants) and takes the provider's token in-band once it comes.
        if let (Some(f), None) = (get_token, token) {
            ask_token(&inner, &f, false);
        }
        Ok(IvyClient { inner })
    }

    /// The connection state: "connecting", "connected", "reconnecting" or "closed".
    #[wasm_bindgen(getter, unchecked_return_type = "IvyStatus")]
    pub fn status(&self) -> String {
        self.inner.state.try_borrow().map_or("connecting", |st| status_str(st.core.state())).to_string()
    }

    /// Calls `callback` on every change of the core's state with `[status, cause, closeCode,
    /// why]` (`why`: the server's reason for refusing the token, while waiting for a fresh one
    /// or once "unauthorized"):
    /// the new state, the input that caused it ("start", "open", "in", "close", "timeout",
    /// "closed", "send-failed", "socket-error", "unauthorized") and, with "close", the WebSocket
    /// close code.
    /// (The package's JavaScript layer turns these into its status events and reasons.)
    #[wasm_bindgen(js_name = onStatus)]
    pub fn on_status(
        &self,
        #[wasm_bindgen(unchecked_param_type = "(change: [string, string, number | undefined, string | undefined]) => void")]
        callback: Function,
    ) {
        if let Ok(mut st) = self.inner.state.try_borrow_mut() {
            st.status_callbacks.push(callback);
        }
    }

    /// Subscribes to `path` and its descendants; `callback` gets every event exactly once, in
    /// timestamp order, across reconnects (this client's own events included, in place).
    /// `options.from`: "now" (default), "beginning", or a timestamp to resume after.
    /// `options.onError` gets continuity-lost notices and a refusal by the server, as
    /// `IvyError`s ("continuity-lost", or the server's code).
    pub fn subscribe(
        &self,
        path: &str,
        #[wasm_bindgen(unchecked_param_type = "(event: IvyEvent) => void")] callback: Function,
        options: Option<SubscribeOptions>,
    ) -> Result<IvySubscription, JsValue> {
        let options: Option<JsValue> = options.map(Into::into);
        let mut start = Start::Now;
        let mut on_error = None;
        if let Some(o) = options.filter(|o| o.is_object()) {
            if let Ok(from) = Reflect::get(&o, &"from".into()) {
                if let Some(f) = from.as_string() {
                    start = match f.as_str() {
                        "now" => Start::Now,
                        "beginning" => Start::Beginning,
                        t => Start::After(t.parse().map_err(|e| invalid_argument(&format!("invalid `from` timestamp \"{t}\": {e}")))?),
                    };
                } else if !from.is_undefined() && !from.is_null() {
                    return Err(invalid_argument("`from` must be \"now\", \"beginning\" or a timestamp string"));
                }
            }
            on_error = Reflect::get(&o, &"onError".into()).ok().and_then(|f| f.dyn_into::<Function>().ok());
        }
        let result = {
            let mut st = self.inner.state.try_borrow_mut().map_err(|_| busy())?;
            let id = st.core.subscribe(now(), path, start).map_err(|e| client_error(&e))?;
            st.subs.push((id, SubCallbacks { on_event: callback, on_error }));
            let path = st.core.sub_path(id).unwrap_or(path).to_string();
            IvySubscription { inner: Rc::downgrade(&self.inner), id, path }
        };
        pump(&self.inner);
        Ok(result)
    }

    /// Publishes `data` (a string, or UTF-8 bytes) on `path`. Resolves to the event's
    /// timestamp once the server stored it; while disconnected the send is queued. The send
    /// carries an id (`docs/PROTOCOL.md` 5.9): when the connection drops before its ack, it is
    /// resent with that id after the reconnect and stored once, so the promise survives a
    /// reconnect. Rejects with an `IvyError`; when its `uncertain` is true ("window-passed":
    /// it could not be resent within the idempotency window; against an older server without
    /// ids, "connection-lost" or "timeout") the event may have been stored.
    #[wasm_bindgen(unchecked_return_type = "Promise<string>")]
    pub fn send(&self, path: &str, #[wasm_bindgen(unchecked_param_type = "string | Uint8Array")] data: JsValue) -> Promise {
        let text = if let Some(s) = data.as_string() {
            Ok(s)
        } else if let Some(bytes) = data.dyn_ref::<Uint8Array>() {
            String::from_utf8(bytes.to_vec()).map_err(|_| invalid_argument("data must be valid UTF-8: the protocol carries text"))
        } else {
            Err(invalid_argument("data must be a string or a Uint8Array"))
        };
        self.request(|core| {
            let text = text?;
            core.send(now(), path, &text).map_err(|e| client_error(&e))
        })
    }

    /// Watches who is present at `path` (subscribed at it or below; the presence extension):
    /// `callback` gets the first snapshot, then joins, leaves and counts, resynchronised after
    /// each reconnect (only real changes are reported), and a last `{type: "error"}` if the
    /// server refuses or ends the watch. The watch subscribes this client to `path` too.
    pub fn presence(
        &self,
        path: &str,
        #[wasm_bindgen(unchecked_param_type = "(event: IvyPresenceEvent) => void")] callback: Function,
    ) -> Result<IvyPresence, JsValue> {
        let result = {
            let mut st = self.inner.state.try_borrow_mut().map_err(|_| busy())?;
            let id = st.core.watch_presence(now(), path).map_err(|e| client_error(&e))?;
            st.watches.push((id, callback));
            let path = st.core.watch_path(id).unwrap_or(path).to_string();
            IvyPresence { inner: Rc::downgrade(&self.inner), id, path }
        };
        pump(&self.inner);
        Ok(result)
    }

    /// Who is present at `path` now, once (no subscription): resolves to
    /// `{path, count, members, complete}`. Needs a connection ("not-connected" otherwise).
    #[wasm_bindgen(unchecked_return_type = "Promise<IvyPresenceView>")]
    pub fn who(&self, path: &str) -> Promise {
        let mut resolve_reject = None;
        let promise = Promise::new(&mut |resolve, reject| resolve_reject = Some((resolve, reject)));
        let Some((resolve, reject)) = resolve_reject else { return promise };
        match self.inner.state.try_borrow_mut() {
            Ok(mut st) => match st.core.who(now(), path) {
                Ok(id) => st.whos.push((id, resolve, reject)),
                Err(e) => {
                    drop(st);
                    let _ = reject.call1(&JsValue::NULL, &client_error(&e));
                }
            },
            Err(_) => {
                let _ = reject.call1(&JsValue::NULL, &busy());
            }
        }
        pump(&self.inner);
        promise
    }

    /// The server's current time.
    #[wasm_bindgen(unchecked_return_type = "Promise<string>")]
    pub fn timestamp(&self) -> Promise {
        self.request(|core| core.timestamp(now()).map_err(|e| client_error(&e)))
    }

    /// A channel's stored history (its whole subtree), oldest first: all of it, the last `n`
    /// events, or a page (`after`, `limit`); the array's `link` property holds the answer's
    /// `Link` header when it has one (the JavaScript layer turns it into `next`). Rejects with an `IvyError`: "invalid-path",
    /// "invalid-argument" (for example `n` with `after`), or "http" with the `status` of the
    /// server's answer.
    #[wasm_bindgen(unchecked_return_type = "Promise<IvyEvent[]>")]
    pub fn log(&self, path: &str, options: Option<LogOptions>) -> Promise {
        let options: Option<JsValue> = options.map(Into::into);
        let target = (|| -> Result<String, JsValue> {
            let path = ivy_core::path::normalize(path.as_bytes()).map_err(|e| client_error(&ClientError::InvalidPath(e)))?;
            let (mut after, mut limit, mut n) = (None, None, None);
            if let Some(o) = options.filter(|o| o.is_object()) {
                if let Some(a) = Reflect::get(&o, &"after".into()).ok().and_then(|v| v.as_string()) {
                    after = Some(a.parse().map_err(|e| invalid_argument(&format!("invalid `after` timestamp \"{a}\": {e}")))?);
                }
                limit = number(&o, "limit").map(|v| v.min(u64::from(u32::MAX)));
                n = number(&o, "n");
            }
            let query = LogQuery::from_parts(n, after, limit).map_err(|e| invalid_argument(&e.to_string()))?;
            Ok(query.target(&path))
        })();
        let (base, senders, token) = self
            .inner
            .state
            .try_borrow()
            .map(|st| (st.http_base.clone(), st.senders, st.core.token().map(String::from)))
            .unwrap_or_default();
        wasm_bindgen_futures::future_to_promise(async move {
            let url = ivy_core::http::with_senders(format!("{base}{}", target?), senders);
            let (body, _horizon, link) = get_text(&url, token.as_deref()).await.map_err(|e| http_error(e.status, &e.to_string()))?;
            let events = ivy_core::http::parse_log(&body).map_err(|e| http_error(None, &format!("unparsable log line: {e}")))?;
            let events: Array = events.iter().map(event_object).collect();
            // The server's `Link: rel="next"` (cursor pages that may have a next one), for the
            // JavaScript layer's `next`.
            if let Some(link) = link {
                let _ = Reflect::set(&events, &"link".into(), &link.into());
            }
            Ok(events.into())
        })
    }

    /// A snapshot of the client for diagnostics, as a plain object: `now`; `client`, the
    /// core's view (the connection state and its timers, every subscription with its phase,
    /// last delivered timestamp, backfill bounds, log page in flight, and the own sends whose
    /// acks hold its live events back, the unanswered requests, the offline queue); `driver`
    /// (the socket, the timer's deadline, log fetches in flight, inputs dropped); `trace`, the
    /// last 64 frames in and out, connection changes and log pages, each cut to 160 bytes.
    /// Times are `performance.now()` milliseconds. Changes nothing; costs nothing until called
    /// (but the trace's short copy of each input and output). For debugging only: the shape
    /// may change.
    #[wasm_bindgen(js_name = debugState)]
    pub fn debug_state(&self) -> JsValue {
        let inner = &self.inner;
        let mut j = client::JsonWriter::new();
        j.object("");
        j.num("now", Some(now()));
        match inner.state.try_borrow() {
            Ok(st) => {
                st.core.debug_state().write_json(&mut j, "client");
                j.object("driver");
                j.num("socketGeneration", Some(st.socket_gen));
                j.num("socketReadyState", st.socket.as_ref().map(|s| u64::from(s.ws.ready_state())));
                j.num("timerAt", st.timer.as_ref().map(|t| t.0));
                j.num("fetchesInFlight", Some(u64::from(inner.fetches.get())));
                j.num("droppedInputs", Some(u64::from(inner.dropped.get())));
                j.end_object();
                j.num("traceTotal", Some(st.trace.total()));
                st.trace.write_json(&mut j, "trace");
            }
            Err(_) => j.bool("busy", true),
        }
        j.end_object();
        let text = j.finish();
        js_sys::JSON::parse(&text).unwrap_or_else(|_| text.into())
    }

    /// Closes the connection; pending requests reject and callbacks stop.
    pub fn close(&self) {
        if let Ok(mut st) = self.inner.state.try_borrow_mut() {
            st.cause = "closed";
            st.core.close(now());
        }
        pump(&self.inner);
    }

    fn request(&self, f: impl FnOnce(&mut client::Client) -> Result<RequestId, JsValue>) -> Promise {
        let mut resolve_reject = None;
        let promise = Promise::new(&mut |resolve, reject| resolve_reject = Some((resolve, reject)));
        let Some((resolve, reject)) = resolve_reject else { return promise };
        match self.inner.state.try_borrow_mut() {
            Ok(mut st) => match f(&mut st.core) {
                Ok(id) => {
                    st.requests.push((id, resolve, reject));
                }
                Err(e) => {
                    drop(st);
                    let _ = reject.call1(&JsValue::NULL, &e);
                }
            },
            Err(_) => {
                let _ = reject.call1(&JsValue::NULL, &busy());
            }
        }
        pump(&self.inner);
        promise
    }
}

/// Why a fetch failed: the status when the server answered with one other than 200.
struct FetchError {
    status: Option<u16>,
    message: String,
}

impl core::fmt::Display for FetchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The body of a 200 answer, the log's horizon (`Ivy-Horizon`, the newest event deleted from
/// it) if it states one, and its `Link` header if any (a cursor page that may have a next one).
async fn get_text(url: &str, token: Option<&str>) -> Result<(String, Option<Timestamp>, Option<String>), FetchError> {
    let failed = |message: String| FetchError { status: None, message };
    let resp = wasm_bindgen_futures::JsFuture::from(fetch(url, &fetch_init(token)))
        .await
        .map_err(|e| failed(format!("fetch {url}: {}", describe(&e))))?;
    let resp: web_sys::Response = resp.dyn_into().map_err(|_| failed("fetch did not return a Response".into()))?;
    let text = resp.text().map_err(|e| failed(describe(&e)))?;
    let text = wasm_bindgen_futures::JsFuture::from(text).await.map_err(|e| failed(describe(&e)))?;
    let text = text.as_string().unwrap_or_default();
    if resp.status() != 200 {
        return Err(FetchError { status: Some(resp.status()), message: text.trim_end().into() });
    }
    let horizon = header(&resp, "Ivy-Horizon").and_then(|v| Timestamp::parse(v.as_bytes()).ok());
    Ok((text, horizon, header(&resp, "Link")))
}

/// The `init` of a log read's `fetch`: `{ headers: { Authorization: "Bearer ..." } }` with a
/// token (a header, not the query: the URL of a log page may be kept in caches and logs).
fn fetch_init(token: Option<&str>) -> JsValue {
    let init = Object::new();
    if let Some(t) = token {
        let headers = Object::new();
        let _ = Reflect::set(&headers, &"Authorization".into(), &format!("Bearer {t}").into());
        let _ = Reflect::set(&init, &"headers".into(), &headers);
    }
    init.into()
}

/// `options[key]`, if `options` is an object that has it.
fn options_value(options: Option<&JsValue>, key: &str) -> Option<JsValue> {
    let o = options.filter(|o| o.is_object())?;
    Reflect::get(o, &key.into()).ok().filter(|v| !v.is_undefined() && !v.is_null())
}

/// `response.headers.get(name)`, through `Reflect` (no `Headers` binding needed).
fn header(resp: &web_sys::Response, name: &str) -> Option<String> {
    let headers = Reflect::get(resp, &"headers".into()).ok()?;
    let get: js_sys::Function = Reflect::get(&headers, &"get".into()).ok()?.dyn_into().ok()?;
    get.call1(&headers, &name.into()).ok()?.as_string()
}

fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| e.as_string()).unwrap_or_else(|| "unknown error".into())
}

/// Runs the core's actions, queues its events as callbacks, re-arms the timer, then (in the
/// outermost call only) invokes the queued callbacks with no Rust state borrowed.
fn pump(inner: &Rc<Inner>) {
    if let Ok(mut st) = inner.state.try_borrow_mut() {
        step(inner, &mut st);
    }
    if inner.draining.get() {
        return; // an outer pump is invoking callbacks and will run these in order
    }
    inner.draining.set(true);
    loop {
        let next = inner.calls.borrow_mut().pop_front();
        match next {
            Some(Call(f, arg)) => {
                let _ = f.call1(&JsValue::NULL, &arg);
            }
            None => break,
        }
    }
    inner.draining.set(false);
}

fn step(inner: &Rc<Inner>, st: &mut State) {
    loop {
        let mut progressed = false;
        while let Some(action) = st.core.poll_action() {
            progressed = true;
            match action {
                Action::Connect => {
                    st.trace.push(now(), "connect", &st.ws_url);
                    connect(inner, st);
                }
                Action::Send(text) => {
                    st.trace.push(now(), "out", &text);
                    let failed = st.socket.as_ref().is_some_and(|s| s.ws.send_with_str(&text).is_err());
                    if failed {
                        st.cause = "send-failed";
                        st.socket = None;
                        st.core.handle_disconnected(now());
                    }
                }
                Action::Disconnect => {
                    st.trace.push(now(), "disconnect", "");
                    st.socket = None;
                }
                Action::NeedToken => {
                    st.trace.push(now(), "token?", "");
                    match st.get_token.clone() {
                        Some(f) => ask_token(inner, &f, true),
                        None => st.core.handle_token(now(), Err("no token provider (getToken)".into())),
                    }
                }
                Action::FetchLog(req) => {
                    let target = req.target();
                    st.trace.push(now(), "log?", &target);
                    let url = format!("{}{target}", st.http_base);
                    let token = st.core.token().map(String::from);
                    let weak = Rc::downgrade(inner);
                    inner.fetches.set(inner.fetches.get() + 1);
                    wasm_bindgen_futures::spawn_local(async move {
                        let result = get_text(&url, token.as_deref()).await;
                        if let Some(inner) = weak.upgrade() {
                            inner.fetches.set(inner.fetches.get().saturating_sub(1));
                            match inner.state.try_borrow_mut() {
                                Ok(mut st) => {
                                    // The start of the page (empty: nothing after the cursor) or the error.
                                    match &result {
                                        Ok((body, ..)) => st.trace.push(now(), "log", body),
                                        Err(e) => st.trace.push(now(), "log", &e.to_string()),
                                    }
                                    let horizon = result.as_ref().ok().and_then(|r| r.1);
                                    let result = result.as_ref().map(|r| r.0.as_str()).map_err(ToString::to_string);
                                    st.core.handle_log_page_with_horizon(now(), req.id, result, horizon);
                                }
                                Err(_) => dropped(&inner, "a log page"),
                            }
                            pump(&inner);
                        }
                    });
                }
            }
        }
        while let Some(event) = st.core.poll_event() {
            progressed = true;
            queue_event(inner, st, event);
        }
        if !progressed {
            break;
        }
    }
    // Re-arm the timer for the core's next deadline.
    let deadline = st.core.poll_timeout();
    if st.timer.as_ref().map(|t| t.0) != deadline {
        if let Some((_, handle)) = st.timer.take() {
            clear_timeout(&handle);
        }
        if let Some(d) = deadline {
            if let Some(cb) = inner.timer_closure.borrow().as_ref() {
                let delay = d.saturating_sub(now()) as f64;
                st.timer = Some((d, set_timeout(cb.as_ref().unchecked_ref(), delay)));
            }
        }
    }
}

fn sub_callbacks(st: &State, sub: SubId) -> Option<&SubCallbacks> {
    st.subs.iter().find(|(id, _)| *id == sub).map(|(_, c)| c)
}

fn queue_event(inner: &Rc<Inner>, st: &mut State, event: ClientEvent) {
    let mut calls = inner.calls.borrow_mut();
    match event {
        ClientEvent::Event { sub, event } => {
            if let Some(cb) = sub_callbacks(st, sub) {
                calls.push_back(Call(cb.on_event.clone(), event_object(&event)));
            }
        }
        ClientEvent::ContinuityLost { sub, last, position } => {
            if let Some(f) = sub_callbacks(st, sub).and_then(|c| c.on_error.clone()) {
                calls.push_back(Call(f, subscription_error(&SubscriptionError::ContinuityLost { last, position })));
            }
        }
        ClientEvent::SubscribeFailed { sub, error } => {
            let removed = st.subs.iter().position(|(id, _)| *id == sub).map(|i| st.subs.remove(i).1);
            if let Some(f) = removed.and_then(|c| c.on_error) {
                calls.push_back(Call(f, subscription_error(&SubscriptionError::Refused(error))));
            }
        }
        ClientEvent::Sent { id, result } | ClientEvent::Time { id, result } => {
            let found = st.requests.iter().position(|(r, _, _)| *r == id).map(|i| st.requests.remove(i));
            if let Some((_, resolve, reject)) = found {
                match result {
                    Ok(ts) => calls.push_back(Call(resolve, ts.to_string().into())),
                    Err(e) => calls.push_back(Call(reject, client_error(&e))),
                }
            }
        }
        ClientEvent::SubscriptionEnded { sub, reason } => {
            let removed = st.subs.iter().position(|(id, _)| *id == sub).map(|i| st.subs.remove(i).1);
            if let Some(f) = removed.and_then(|c| c.on_error) {
                calls.push_back(Call(f, subscription_error(&SubscriptionError::Ended(reason))));
            }
        }
        ClientEvent::Presence { watch, event } => {
            if let Some(i) = st.watches.iter().position(|(id, _)| *id == watch) {
                let f = st.watches[i].1.clone();
                if matches!(event, PresenceEvent::Failed(_) | PresenceEvent::Ended(_)) {
                    st.watches.remove(i);
                }
                calls.push_back(Call(f, presence_object(&event)));
            }
        }
        ClientEvent::Who { id, result } => {
            if let Some(i) = st.whos.iter().position(|(r, _, _)| *r == id) {
                let (_, resolve, reject) = st.whos.remove(i);
                match result {
                    Ok(view) => calls.push_back(Call(resolve, view_object(&view))),
                    Err(e) => calls.push_back(Call(reject, client_error(&e))),
                }
            }
        }
        ClientEvent::TokenRefused { error } => web_sys_warn(&format!("the refreshed token was refused: {error}")),
        // The status change that follows carries the reason (`onStatus`).
        ClientEvent::Unauthorized { .. } => {}
        ClientEvent::State(s) => {
            if matches!(s, ConnState::Closed | ConnState::Unauthorized) {
                st.subs.clear();
                st.watches.clear();
            }
            // Why the token was refused, while waiting for a fresh one or for good.
            let why = match s {
                ConnState::Unauthorized | ConnState::AwaitingToken => {
                    st.core.unauthorized_reason().map_or(JsValue::UNDEFINED, JsValue::from)
                }
                _ => JsValue::UNDEFINED,
            };
            let code = st.close_code.map_or(JsValue::UNDEFINED, JsValue::from);
            let change: JsValue = Array::of4(&status_str(s).into(), &st.cause.into(), &code, &why).into();
            for f in &st.status_callbacks {
                calls.push_back(Call(f.clone(), change.clone()));
            }
        }
        ClientEvent::Warning(w) => web_sys_warn(&w),
    }
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = warn)]
    fn console_warn(s: &str);
}

fn web_sys_warn(s: &str) {
    console_warn(&format!("ivy: {s}"));
}

/// After a WebSocket with a token closed without opening: `fetch` of `url` (`/ws?token=...`,
/// no upgrade) tells a refused token (401, with the server's reason) from anything else (the
/// server down, another refusal); the core is told which, unless it moved on meanwhile.
fn probe(inner: &Rc<Inner>, url: String, generation: u64, code: Option<u16>, reason: String) {
    let weak = Rc::downgrade(inner);
    wasm_bindgen_futures::spawn_local(async move {
        let answer = get_text(&url, None).await;
        let Some(inner) = weak.upgrade() else { return };
        match inner.state.try_borrow_mut() {
            Ok(mut st) => {
                if st.socket_gen == generation && matches!(st.core.state(), ConnState::Connecting { .. }) {
                    match answer {
                        Err(FetchError { status: Some(401), message }) => {
                            st.trace.push(now(), "refused", &message);
                            st.cause = "unauthorized";
                            st.core.handle_unauthorized(now(), &message);
                        }
                        _ => st.core.handle_close(now(), code, &reason),
                    }
                }
            }
            Err(_) => dropped(&inner, "a token probe"),
        }
        pump(&inner);
    });
}

/// Asks the token provider `f` (the JavaScript layer's wrapper of `getToken`: a promise of
/// `[token, exp]`, or of null for none) and hands its answer to the core: as the answer to
/// `Action::NeedToken` if `asked`, else as a new token. Called from a task of its own, so that
/// the application's code never runs while the client's state is borrowed.
fn ask_token(inner: &Rc<Inner>, f: &Function, asked: bool) {
    let weak = Rc::downgrade(inner);
    let f = f.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let promise = f.call0(&JsValue::NULL).ok().and_then(|p| p.dyn_into::<Promise>().ok());
        let answer = match promise {
            Some(p) => wasm_bindgen_futures::JsFuture::from(p).await.map_err(|e| describe(&e)),
            None => Err("getToken did not return a promise".into()),
        };
        let Some(inner) = weak.upgrade() else { return };
        match inner.state.try_borrow_mut() {
            Ok(mut st) => {
                let result = answer.and_then(|v| {
                    let pair = v.dyn_into::<Array>().map_err(|_| String::from("getToken gave no token"))?;
                    let value = pair.get(0).as_string().filter(|t| !t.is_empty()).ok_or_else(|| String::from("getToken gave no token"))?;
                    let exp = pair.get(1).as_f64().filter(|e| e.is_finite() && *e > 0.0).map(|e| e as u64);
                    Ok(Token::from_exp(value, exp, date_now() as u64, now()))
                });
                st.trace.push(now(), "token", if result.is_ok() { "fresh token" } else { "none" });
                if asked {
                    st.core.handle_token(now(), result);
                } else if let Ok(t) = result {
                    st.core.set_token(now(), t);
                }
            }
            Err(_) => dropped(&inner, "a token"),
        }
        pump(&inner);
    });
}

fn connect(inner: &Rc<Inner>, st: &mut State) {
    st.socket = None;
    st.opened = false;
    st.socket_gen += 1;
    let generation = st.socket_gen;
    // Browsers cannot set headers on a WebSocket: the token goes in the query.
    let url = match st.core.token() {
        Some(t) => {
            let sep = if st.ws_url.contains('?') { '&' } else { '?' };
            format!("{}{sep}token={}", st.ws_url, String::from(js_sys::encode_uri_component(t)))
        }
        None => st.ws_url.clone(),
    };
    let ws = match WebSocket::new_with_str(&url, ivy_core::SUBPROTOCOL) {
        Ok(ws) => ws,
        Err(e) => {
            web_sys_warn(&format!("cannot open WebSocket: {}", describe(&e)));
            st.cause = "socket-error";
            st.core.handle_disconnected(now());
            return;
        }
    };
    // Each handler checks that its socket is still the current one, then steps the core.
    // `kind` names the input in the trace and in a report of a dropped input.
    let handler = |kind: &'static str, f: fn(&mut client::Client, Option<String>)| {
        let weak = Rc::downgrade(inner);
        move |text: Option<String>| {
            let Some(inner) = weak.upgrade() else { return };
            match inner.state.try_borrow_mut() {
                Ok(mut st) => {
                    if st.socket_gen != generation {
                        return;
                    }
                    st.trace.push(now(), kind, text.as_deref().unwrap_or(""));
                    st.cause = kind;
                    if kind == "open" {
                        st.opened = true;
                    }
                    f(&mut st.core, text);
                }
                Err(_) => dropped(&inner, kind),
            }
            pump(&inner);
        }
    };
    let on_open = handler("open", |c, _| c.handle_connected(now()));
    let on_message = handler("in", |c, text| match text {
        Some(t) => c.handle_frame(now(), &t),
        None => c.handle_activity(now()),
    });
    let on_open = Handler::new(move |_| on_open(None));
    let on_message = Handler::new(move |e: JsValue| on_message(e.unchecked_into::<MessageEvent>().data().as_string()));
    let weak = Rc::downgrade(inner);
    let on_close = Handler::new(move |e: JsValue| {
        let Some(inner) = weak.upgrade() else { return };
        let code = Reflect::get(&e, &"code".into()).ok().and_then(|c| c.as_f64()).map(|c| c as u16);
        let reason = Reflect::get(&e, &"reason".into()).ok().and_then(|r| r.as_string()).unwrap_or_default();
        match inner.state.try_borrow_mut() {
            Ok(mut st) => {
                if st.socket_gen != generation {
                    return;
                }
                // The code, for the trace: an integer, written by the JSON writer that
                // `debugState()` links anyway (formatting an f64, or even a u64, would bring
                // more formatting code into the .wasm).
                let mut text = client::JsonWriter::new();
                text.num("", code.map(u64::from));
                st.trace.push(now(), "close", &text.finish());
                st.cause = "close";
                st.close_code = code;
                if !st.opened && matches!(st.core.state(), ConnState::Connecting { .. }) {
                    if let Some(t) = st.core.token() {
                        // Never opened, with a token: the browser does not say whether the
                        // server refused it (401). A plain GET of /ws with it does.
                        let url = format!("{}/ws?token={}", st.http_base, String::from(js_sys::encode_uri_component(t)));
                        drop(st);
                        probe(&inner, url, generation, code, reason);
                        return;
                    }
                }
                st.core.handle_close(now(), code, &reason);
            }
            Err(_) => dropped(&inner, "close"),
        }
        pump(&inner);
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    // A failed connection fires `error` then `close`; `close` alone is enough.
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    st.socket = Some(Socket { ws, _on_open: on_open, _on_message: on_message, _on_close: on_close });
}
