// The package's entry: the public API (typed in ivy_client_wasm.d.ts) over the classes that
// wasm-bindgen generates (ivy_client_wasm_glue.js). This layer holds what is cheaper in
// JavaScript than in the .wasm: loading the inlined module without an init step, checking
// options, listeners that can be removed, guarded callbacks, status reasons.
//
// The .wasm is inlined (gzipped, base64, in ivy_client_wasm_wasm.js) so that no bundler or dev
// server has to find it: Vite's dependency pre-bundling moves the JavaScript and breaks the
// `new URL("..._bg.wasm", import.meta.url)` that wasm-bindgen would use.
import loadGlue, { IvyClient as RawClient } from "./ivy_client_wasm_glue.js";
import WASM_GZ_BASE64 from "./ivy_client_wasm_wasm.js";

/** An `IvyError`: an `Error` with `code` and `uncertain` (and `status` for "http"). */
function ivyError(message, code, uncertain = false) {
  return Object.assign(new Error(message), { code, uncertain });
}

function invalid(message) {
  return ivyError(message, "invalid-argument");
}

let loading;
let loaded = false;

async function load() {
  const gz = Uint8Array.from(atob(WASM_GZ_BASE64), (c) => c.charCodeAt(0));
  const wasm = await new Response(new Blob([gz]).stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer();
  await loadGlue({ module_or_path: wasm });
  loaded = true;
}

/** Loads the WebAssembly module (once; later calls return the same promise). Optional: the
 * client loads it by itself. Awaiting it first makes every call synchronous from the start
 * (argument errors are then thrown rather than reported). */
export default function init() {
  if (!loading) {
    loading = load();
    loading.catch(() => {
      loading = undefined;
    });
  }
  return loading;
}

/** Calls `f(arg)`; an exception goes to `report` instead of vanishing. */
function guarded(f, report) {
  return (arg, more) => {
    try {
      f(arg, more);
    } catch (e) {
      report(e);
    }
  };
}

/** The default destination of an error nobody listens for: the page's error reporting. */
function reportGlobally(e) {
  if (typeof reportError === "function") reportError(e);
  else console.error(e);
}

/** Adds `f` to `set` and returns the function that removes it. */
function listen(set, f, what) {
  if (typeof f !== "function") throw invalid(`${what} must be a function`);
  const entry = { f };
  set.add(entry);
  return () => void set.delete(entry);
}

const DURATIONS = ["minBackoffMs", "maxBackoffMs", "connectTimeoutMs", "requestTimeoutMs", "idleTimeoutMs", "probeTimeoutMs", "idempotencyWindowMs"];
const COUNTS = { offlineQueue: 0, pageLimit: 1, maxMessageSize: 0 };

/** Checks an options object against `check` (key: validator); unknown keys are errors. */
function checkOptions(options, what, checks) {
  if (options === undefined || options === null) return {};
  if (typeof options !== "object" || Array.isArray(options)) throw invalid(`${what} must be an object`);
  for (const [key, value] of Object.entries(options)) {
    const check = checks[key];
    if (!check) throw invalid(`unknown option \`${key}\` in ${what} (known: ${Object.keys(checks).join(", ")})`);
    if (value !== undefined) check(value, key);
  }
  return options;
}

function count(min) {
  return (v, key) => {
    if (typeof v !== "number" || !Number.isInteger(v) || v < min) throw invalid(`option \`${key}\` must be an integer >= ${min}, not ${show(v)}`);
  };
}

function duration(v, key) {
  const zero = key === "minBackoffMs" || key === "idempotencyWindowMs";
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || (v === 0 && !zero)) {
    throw invalid(`option \`${key}\` must be a number of milliseconds ${zero ? ">= 0" : "> 0"}, not ${show(v)}`);
  }
}

function show(v) {
  return typeof v === "string" ? JSON.stringify(v) : String(v);
}

const CLIENT_OPTIONS = Object.fromEntries([
  ...DURATIONS.map((k) => [k, duration]),
  ...Object.entries(COUNTS).map(([k, min]) => [k, count(min)]),
  [
    "token",
    (v) => {
      if (typeof v !== "string" || v === "") throw invalid(`option \`token\` must be a non-empty string (a JWT), not ${show(v)}`);
    },
  ],
  [
    "getToken",
    (v) => {
      if (typeof v !== "function") throw invalid("option `getToken` must be a function returning a token (or a promise of one)");
    },
  ],
  [
    "senders",
    (v) => {
      if (typeof v !== "boolean") throw invalid(`option \`senders\` must be true or false, not ${show(v)}`);
    },
  ],
]);

/** The `exp` claim of a JWT (seconds since the Unix epoch), read without checking anything:
 * the server checks the token; the client only needs to know when to ask for a fresh one.
 * Undefined when the token has none or is not a JWT. */
export function tokenExp(token) {
  try {
    const part = token.split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
    const exp = JSON.parse(new TextDecoder().decode(bytes)).exp;
    return typeof exp === "number" && Number.isFinite(exp) && exp > 0 ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** The token provider as the module calls it: a promise of `[token, exp]`, or of null when
 * the provider has none (the client then ends "unauthorized"). */
function tokenProvider(getToken, report) {
  return async () => {
    let t;
    try {
      t = await getToken();
    } catch (e) {
      // Reported, and the client acts as if there were no fresh token.
      report(e);
      return null;
    }
    if (t === null || t === undefined || t === "") return null;
    if (typeof t !== "string") {
      report(invalid(`getToken must return a string (a JWT), null or undefined, not ${show(t)}`));
      return null;
    }
    return [t, tokenExp(t)];
  };
}
const SUBSCRIBE_OPTIONS = {
  from: (v) => {
    if (typeof v !== "string") throw invalid(`option \`from\` must be "now", "beginning" or a timestamp string, not ${show(v)}`);
  },
  onError: (v) => {
    if (typeof v !== "function") throw invalid("option `onError` must be a function");
  },
};
const LOG_OPTIONS = {
  after: (v) => {
    if (typeof v !== "string") throw invalid(`option \`after\` must be a timestamp string, not ${show(v)}`);
  },
  limit: count(1),
  n: count(1),
};

/** The server's base URL as an absolute string; relative URLs are resolved against the page. */
function serverUrl(url) {
  if (typeof url !== "string") throw invalid("the server URL must be a string");
  let u;
  try {
    u = typeof location === "undefined" ? new URL(url) : new URL(url, location.href);
  } catch {
    throw invalid(`invalid server URL ${show(url)}`);
  }
  if (!/^(wss?|https?):$/.test(u.protocol)) throw invalid(`invalid server URL ${show(url)}: use ws://, wss://, http:// or https://, or a path relative to the page`);
  if (u.username || u.password || u.search || u.hash) throw invalid(`invalid server URL ${show(url)}: no credentials, query or fragment`);
  return u.href;
}

/** What each WebSocket close code of the server means (docs/PROTOCOL.md, 7). */
const CLOSE_CODES = {
  1001: "the server is shutting down",
  1002: "the server saw a WebSocket protocol error",
  1007: "the server received text that is not UTF-8",
  1009: "a message exceeded the server's size limit",
  4000: "the client did not read fast enough (the server's queue for it was full)",
  4001: "the server received nothing for a whole ping interval",
  4003: "the connection's token expired and was not refreshed in time, or was revoked",
  4004: "an administrator disconnected this user",
  4005: "the server's event store lost events (the client resumes from the log)",
};

/** The reason of a change of the core's state from `prev` to `status`. */
function reasonOf(status, prev, cause, closeCode, why) {
  if (status === "connected") return { code: "connected", message: "connected" };
  if (status === "unauthorized") return { code: "unauthorized", message: `the server refused the token: ${why || "no reason given"}` };
  if (status === "closed") return { code: "closed", message: "closed by the application (close())" };
  if (why) return { code: "token-refused", message: `the server refused the token (${why}); asking getToken for a fresh one` };
  const wasConnected = prev === "connected";
  if (cause === "close") {
    if (closeCode !== undefined && closeCode !== 1005 && closeCode !== 1006) {
      const what = CLOSE_CODES[closeCode] ?? `the server closed the connection with code ${closeCode}`;
      return { code: "server-closed", message: what, closeCode };
    }
    return wasConnected
      ? { code: "connection-lost", message: "the connection was lost (no close frame: the server or the network went away)", closeCode }
      : {
          code: "connect-failed",
          message: "the connection could not be opened (the server is down or unreachable, refused this page's origin, or TLS failed: the browser does not tell which; its console does)",
          closeCode,
        };
  }
  if (cause === "timeout") {
    return wasConnected
      ? { code: "timeout", message: "the server stopped answering (no reply to a probe within probeTimeoutMs)" }
      : { code: "connect-timeout", message: "the connection was not open within connectTimeoutMs" };
  }
  if (cause === "in") return { code: "protocol-error", message: "the client dropped the connection after an unexpected message from the server (see the console)" };
  return { code: "connection-lost", message: `the connection failed (${cause})` };
}

/** A connection to an Ivy server that reconnects by itself. See ivy_client_wasm.d.ts. */
export class IvyClient {
  #raw = null;
  /** Calls made before the module was loaded, in order: `{ run, fail }`. */
  #queue = [];
  #closed = false;
  /** What calls fail with once the client ended ("closed", or "unauthorized"). */
  #endError = null;
  #status = "connecting";
  #rawStatus = "connecting";
  #everConnected = false;
  #reason = { code: "connecting", message: "connecting for the first time" };
  #statusListeners = new Set();
  #errorListeners = new Set();
  #waiters = new Set();
  #report = (e) => this.#reportError(e);
  #pageLimit;

  /** Connects to `url` and resolves with the client once it is connected. */
  static connect(url, options) {
    const client = new IvyClient(url, options);
    return client.ready().then(() => client);
  }

  constructor(url, options) {
    const href = serverUrl(url);
    const opts = { ...checkOptions(options, "the client options", CLIENT_OPTIONS) };
    this.#pageLimit = opts.pageLimit ?? 1000;
    if (opts.minBackoffMs !== undefined && opts.maxBackoffMs !== undefined && opts.minBackoffMs > opts.maxBackoffMs) {
      throw invalid(`option \`minBackoffMs\` (${opts.minBackoffMs}) is larger than \`maxBackoffMs\` (${opts.maxBackoffMs})`);
    }
    if (opts.getToken) opts.getToken = tokenProvider(opts.getToken, this.#report);
    if (opts.token) opts.tokenExp = tokenExp(opts.token);
    const start = () => {
      if (this.#closed) return;
      try {
        this.#raw = new RawClient(href, opts);
      } catch (e) {
        // Not expected: the URL and options were checked above.
        this.#reportError(e);
        return this.#end({ code: "closed", message: e instanceof Error ? e.message : show(e) }, e);
      }
      this.#raw.onStatus((change) => this.#onRawStatus(change));
      const queue = this.#queue;
      this.#queue = [];
      for (const q of queue) q.run();
    };
    if (loaded) start();
    else {
      init().then(start, (e) => {
        const err = ivyError(`ivy-client-wasm could not load its WebAssembly module: ${e instanceof Error ? e.message : show(e)}`, "load-failed");
        this.#reportError(err);
        this.#end({ code: "load-failed", message: err.message }, err);
      });
    }
  }

  /** Runs `f` now if the module is loaded, else once it is (`fail(err)` if it never is). */
  #whenLoaded(f, fail) {
    if (this.#raw) f();
    else if (this.#closed) fail(this.#endError ?? ivyError("client closed", "closed"));
    else this.#queue.push({ run: f, fail });
  }

  /** A promise of `f()`'s promise, once the module is loaded. */
  #request(f) {
    return new Promise((resolve, reject) => this.#whenLoaded(() => f(this.#raw).then(resolve, reject), reject));
  }

  #reportError(e) {
    if (this.#errorListeners.size === 0) return reportGlobally(e);
    for (const { f } of [...this.#errorListeners]) {
      try {
        f(e);
      } catch (e2) {
        reportGlobally(e2);
      }
    }
  }

  #onRawStatus([status, cause, closeCode, why]) {
    const prev = this.#rawStatus;
    this.#rawStatus = status;
    const final = status === "closed" || status === "unauthorized";
    // A retry (waiting, then connecting again) changes nothing the application sees: the
    // reason stays that of the failure.
    if (status === "connected" || final || (status === "reconnecting" && cause !== "start")) {
      this.#reason = reasonOf(status, prev, cause, closeCode, why);
    }
    if (status === "connected") this.#everConnected = true;
    const shown = status === "connected" || final ? status : this.#everConnected ? "reconnecting" : "connecting";
    if (final) {
      const err = status === "unauthorized" ? ivyError(this.#reason.message, "unauthorized") : undefined;
      if (err) this.#reportError(err);
      return this.#end(this.#reason, err, shown);
    }
    this.#set(shown);
  }

  #set(status) {
    if (status === this.#status) return;
    this.#status = status;
    const reason = this.#reason;
    for (const { f } of [...this.#statusListeners]) {
      try {
        f(status, reason);
      } catch (e) {
        this.#reportError(e);
      }
    }
    if (status === "connected") {
      for (const w of this.#waiters) w.resolve();
      this.#waiters.clear();
    }
  }

  /** Closed (or unauthorized): queued calls and `ready()` waiters fail. */
  #end(reason, error, status = "closed") {
    this.#closed = true;
    this.#reason = reason;
    const err = error ?? ivyError("client closed", "closed");
    this.#endError = err;
    const queue = this.#queue;
    this.#queue = [];
    for (const q of queue) q.fail(err);
    for (const w of this.#waiters) w.reject(err);
    this.#waiters.clear();
    this.#set(status);
  }

  get status() {
    return this.#status;
  }

  get statusReason() {
    return this.#reason;
  }

  onStatus(listener) {
    return listen(this.#statusListeners, listener, "the status listener");
  }

  onError(listener) {
    return listen(this.#errorListeners, listener, "the error listener");
  }

  ready(timeoutMs) {
    if (timeoutMs !== undefined) duration(timeoutMs, "timeoutMs");
    if (this.#status === "connected") return Promise.resolve();
    if (this.#closed) return Promise.reject(this.#endError ?? ivyError("client closed", "closed"));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      this.#waiters.add(w);
      if (timeoutMs !== undefined) {
        const t = setTimeout(() => {
          if (this.#waiters.delete(w)) reject(ivyError(`not connected within ${timeoutMs} ms (${this.#reason.message})`, "timeout"));
        }, timeoutMs);
        w.resolve = () => (clearTimeout(t), resolve());
        w.reject = (e) => (clearTimeout(t), reject(e));
      }
    });
  }

  subscribe(path, callback, options) {
    if (typeof callback !== "function") throw invalid("the subscription callback must be a function");
    const o = checkOptions(options, "the subscribe options", SUBSCRIBE_OPTIONS);
    const report = this.#report;
    const onError = guarded(o.onError ?? report, report);
    const sub = new IvySubscription(path);
    const inner = sub[INNER];
    const run = () => {
      if (inner.ended) return;
      inner.raw = this.#raw.subscribe(path, guarded(callback, report), { from: o.from, onError });
    };
    if (this.#raw) run();
    else {
      this.#whenLoaded(
        () => {
          try {
            run();
          } catch (e) {
            inner.ended = true;
            onError(e);
          }
        },
        () => {},
      );
    }
    return sub;
  }

  send(path, data) {
    return this.#request((raw) => raw.send(path, data));
  }

  timestamp() {
    return this.#request((raw) => raw.timestamp());
  }

  presence(path, callback) {
    if (typeof callback !== "function") throw invalid("the presence callback must be a function");
    const report = this.#report;
    const watch = new IvyPresence(path);
    const inner = watch[INNER];
    const cb = guarded((e) => {
      applyPresence(inner.view, e);
      if (e.type === "error") inner.ended = true;
      callback(e);
    }, report);
    const run = () => {
      if (inner.ended) return;
      inner.raw = this.#raw.presence(path, cb);
      inner.view.path = inner.raw.path;
    };
    if (this.#raw) run();
    else {
      this.#whenLoaded(
        () => {
          try {
            run();
          } catch (e) {
            inner.ended = true;
            cb({ type: "error", error: e });
          }
        },
        () => {},
      );
    }
    return watch;
  }

  who(path) {
    return this.#request((raw) => raw.who(path));
  }

  log(path, options) {
    let o;
    try {
      o = { ...checkOptions(options, "the log options", LOG_OPTIONS) };
    } catch (e) {
      return Promise.reject(e);
    }
    // A page by default, never the whole history at once.
    if (o.n === undefined && o.limit === undefined) o.limit = this.#pageLimit;
    return this.#request((raw) =>
      raw.log(path, o).then((events) => {
        // The server's `Link: <...?after=TS&limit=L>; rel="next"`: more may follow after TS.
        const next = /[?&]after=([0-9]+\.[0-9]+)/.exec(events.link ?? "");
        delete events.link;
        events.next = next ? next[1] : null;
        return events;
      }),
    );
  }

  async *logPages(path, options) {
    const o = { ...checkOptions(options, "the log options", { after: LOG_OPTIONS.after, limit: LOG_OPTIONS.limit }) };
    for (;;) {
      const page = await this.log(path, o);
      if (page.length > 0) yield page;
      if (page.next === null) return;
      o.after = page.next;
    }
  }

  debugState() {
    return this.#raw ? this.#raw.debugState() : { loading: !this.#closed, closed: this.#closed };
  }

  close() {
    if (this.#raw) this.#raw.close();
    else if (!this.#closed) this.#end(reasonOf("closed"));
  }
}

if (typeof Symbol.dispose === "symbol") {
  IvyClient.prototype[Symbol.dispose] = IvyClient.prototype.close;
}

/** A member's key in a view: subs and anonymous ids never collide. */
function memberKey(m) {
  return m.sub !== undefined ? `=${m.sub}` : `-${m.anon}`;
}

/** Subs first, then anonymous members, each by code unit order (the server's and the core's
 * order, for ASCII ids). */
function memberOrder(a, b) {
  if ((a.sub === undefined) !== (b.sub === undefined)) return a.sub === undefined ? 1 : -1;
  const x = a.sub ?? a.anon;
  const y = b.sub ?? b.anon;
  return x < y ? -1 : x > y ? 1 : 0;
}

/** Keeps `view` (`{path, count, members, complete}`) as the watch's events describe it. */
function applyPresence(view, e) {
  if (e.type === "snapshot") {
    Object.assign(view, e.view, { members: [...e.view.members] });
  } else if (e.type === "join") {
    const key = memberKey(e.member);
    const i = view.members.findIndex((m) => memberKey(m) === key);
    if (i >= 0) view.members[i] = e.member;
    else {
      view.members.push(e.member);
      view.members.sort(memberOrder);
    }
  } else if (e.type === "leave") {
    const key = memberKey(e.member);
    view.members = view.members.filter((m) => memberKey(m) !== key);
  } else if (e.type === "count") {
    view.count = e.count;
  }
}

/** A presence watch; `stop()` ends it. */
export class IvyPresence {
  constructor(path) {
    this[INNER] = { raw: null, ended: false, view: { path, count: 0, members: [], complete: true } };
  }

  get path() {
    return this[INNER].view.path;
  }

  /** The view after the events delivered so far (a copy). */
  get view() {
    const v = this[INNER].view;
    return { ...v, members: [...v.members] };
  }

  stop() {
    const inner = this[INNER];
    inner.ended = true;
    inner.raw?.stop();
  }
}

if (typeof Symbol.dispose === "symbol") {
  IvyPresence.prototype[Symbol.dispose] = IvyPresence.prototype.stop;
}

/** The state of an `IvySubscription`, out of the application's sight. */
const INNER = Symbol("ivy");

/** A subscription; `unsubscribe()` ends it. */
export class IvySubscription {
  constructor(path) {
    this[INNER] = { raw: null, ended: false, path };
  }

  get path() {
    const { raw, path } = this[INNER];
    return raw ? raw.path : path;
  }

  unsubscribe() {
    const inner = this[INNER];
    inner.ended = true;
    inner.raw?.unsubscribe();
  }
}

if (typeof Symbol.dispose === "symbol") {
  IvySubscription.prototype[Symbol.dispose] = IvySubscription.prototype.unsubscribe;
}
