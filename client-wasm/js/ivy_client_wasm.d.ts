// Types of ivy-client-wasm, the browser client of Ivy (hierarchical pub/sub with persistent
// event logs). No `lib` beyond "es2022" and "dom" is needed.

declare global {
  interface SymbolConstructor {
    /** Declared here (as TypeScript's `esnext.disposable` lib and @types/node do, compatibly)
     * so that the classes' `[Symbol.dispose]` needs no particular `lib`; `using` itself needs
     * `"lib": ["esnext.disposable"]` (or "esnext") and a runtime with `Symbol.dispose`. */
    readonly dispose: unique symbol;
  }
}

/** An event's timestamp: seconds and nanoseconds since the Unix epoch, fixed width
 * (`"1700000000.000000001"`), so timestamps compare correctly as strings. */
export type IvyTimestamp = `${number}.${number}`;

/** Connection state, as the application sees it (events only on a change):
 * - "connecting": not connected yet, since the client was created (the first attempt and its
 *   retries);
 * - "connected";
 * - "reconnecting": the connection was lost after having been connected, and the client is
 *   trying again (every attempt and the waits between them);
 * - "closed": `close()` was called (or the module could not load): final;
 * - "unauthorized": the server refused the client's token, and no fresh one was to be had (no
 *   `getToken`, it returned nothing or threw, or its token was refused too): final, with the
 *   server's reason in `statusReason.message`; create a new client with a valid token. */
export type IvyStatus = "connecting" | "connected" | "reconnecting" | "closed" | "unauthorized";

/** Why the status is what it is: the last change, or the last failed attempt. */
export interface IvyStatusReason {
  /** "connecting" (initial), "connected", "closed" (`close()`), "load-failed" (the WebAssembly
   * module could not be loaded), "connect-failed" (the connection could not be opened: the
   * browser does not say whether the server is down, refused the page's origin or TLS failed),
   * "connect-timeout" (not open within `connectTimeoutMs`), "connection-lost" (dropped without
   * a close frame), "server-closed" (the server closed it: see `closeCode`), "timeout" (the
   * server stopped answering: no reply to a probe), "protocol-error" (the client dropped the
   * connection after an unexpected message), "unauthorized" (final: the token was refused and
   * no fresh one was to be had; `message` has the server's reason, such as "token expired"). */
  code: string;
  /** For people; the wording may change. */
  message: string;
  /** The WebSocket close code, when there was one: 1001 the server is shutting down, 1009 a
   * message exceeded the server's size limit, 4000 the client read too slowly, 4001 the server
   * received nothing for a ping interval, 4003 the token expired and was not refreshed in time
   * (or was revoked), 4004 an administrator disconnected the user, 4005 the server's event store (Redis) lost
   * events, 1006 no close frame
   * (docs/PROTOCOL.md, 7). */
  closeCode?: number;
}

/** Who sent an event, as the server verified it (`senders: true`; docs/PROTOCOL.md 6.1.1):
 * a connection with a token (`sub`: its token's `sub`), one without a token ("anonymous"; every
 * connection while the server's auth is off), the server's embedding application, or unknown
 * (stored before the server recorded senders). */
export type IvySender = { kind: "user"; sub: string } | { kind: "anonymous" } | { kind: "application" } | { kind: "unknown" };

/** An event: its unique timestamp, normalized path and data, and with the `senders` option
 * its verified sender. */
export interface IvyEvent {
  ts: IvyTimestamp;
  path: string;
  data: string;
  /** Only with the `senders` option (absent otherwise, and from a server without it). */
  sender?: IvySender;
}

/** Tuning; all optional. Unknown keys and values of the wrong type or range are refused with
 * an `IvyError` ("invalid-argument"). */
export interface IvyOptions {
  /** First wait before reconnecting, in ms (default 250; >= 0). */
  minBackoffMs?: number;
  /** Longest wait between attempts, in ms (default 30,000; >= minBackoffMs). */
  maxBackoffMs?: number;
  /** Time for a connection to open, in ms (default 10,000). */
  connectTimeoutMs?: number;
  /** Time for a reply to a send or timestamp request, and longest wait of a send in the offline
   * queue, in ms (default 30,000). A send without a reply in time makes the client reconnect
   * and resend it with its id. */
  requestTimeoutMs?: number;
  /** Silence after which the client probes the connection, in ms (default 30,000). */
  idleTimeoutMs?: number;
  /** Time for the probe's answer before the connection counts as lost, in ms (default 10,000). */
  probeTimeoutMs?: number;
  /** How long after a send was first written it may still be resent with its id when its
   * ack was lost, in ms (default 600,000: the server's `--idempotency-window` default; set it
   * no longer than the server's). Past it the send fails "window-passed" (uncertain). 0: never
   * resend (a lost ack fails "connection-lost"). */
  idempotencyWindowMs?: number;
  /** Ask for each event's verified sender, live and in `log()` pages (`ext=sender`,
   * docs/PROTOCOL.md 6.1.1): events then have `sender` (default false). */
  senders?: boolean;
  /** Sends kept while disconnected (default 1000; 0: a send while disconnected fails). */
  offlineQueue?: number;
  /** Events per log page when a subscription backfills, and of `log()` without `n` or
   * `limit` (default 1000; >= 1). */
  pageLimit?: number;
  /** The server's message size limit (its `--max-message-size`), in bytes (default 65,536,
   * the server's default; 0: no check). A send whose command (ack key, path and data) is
   * larger is refused at once with "too-large" (nothing sent, the connection kept), where the
   * server would close the connection (code 1009) and every subscription would backfill
   * again. */
  maxMessageSize?: number;
  /** A token (a JWT from your backend) for a server with auth on: sent as `?token=` on the
   * WebSocket (browsers cannot set its headers) and as `Authorization: Bearer` on log reads.
   * Without `getToken`, a refused or expired token ends the client ("unauthorized"). */
  token?: string;
  /** Where fresh tokens come from (for example your backend's token endpoint). The client
   * calls it before its token expires (it reads the token's `exp`: 30 s ahead, or a third of
   * the remaining lifetime of a shorter-lived token) and hands the new token to the live connection, which goes on
   * without a reconnect; and once more after the server refused a token. Without `token`, it
   * is called at once for the first one, while the client connects without a token (what the
   * server allows anonymously); the token is presented in-band when it comes. Return the token (a string), or null or
   * undefined when there is none: the client then ends "unauthorized" once its token is
   * refused. A thrown error goes to the `onError` listeners and counts as none. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
}

/** Where a subscription starts, and where its notices go. */
export interface SubscribeOptions {
  /** "now" (default): live events only; "beginning": the whole history, then live; a
   * timestamp: the events after it (for example the last one the application saw). */
  from?: "now" | "beginning" | IvyTimestamp;
  /** Continuity-lost notices ("continuity-lost": the server lost events this subscription
   * delivered, or events after the last one delivered were deleted by retention or an
   * operator; it goes on) and the server's refusal of the subscription (its code; the
   * subscription ended). Without it they go to the client's `onError` listeners. */
  onError?: (err: IvyError) => void;
}

/** What went wrong, for code to act on (the message is for people and may change):
 * "window-passed" (a send whose ack was lost and that could not be resent with its id within
 * `idempotencyWindowMs`: it may or may not have been stored, see `uncertain`),
 * "connection-lost" and "timeout" (a timestamp request whose reply never came, or a send to an
 * older server without send ids, whose sends are plain: it may or may not have been stored;
 * with ids a send whose connection drops is resent after the reconnect instead), "not-connected" (a timestamp request while
 * disconnected, a send beyond the offline queue, or a queued send that found no connection
 * within `requestTimeoutMs`: never written, not stored), "too-large" (a send over
 * `maxMessageSize`: not sent), "closed", "invalid-path",
 * "invalid-argument" (an option, a timestamp, data or URL that cannot be used),
 * "forbidden" (the token, or without one the server's anonymous grants, does not allow the
 * command: a send or a subscription to that path; nothing was done, the connection stays),
 * "unauthorized" (the token was refused and no fresh one was to be had: the client ended),
 * "subscription-ended" (onError: a refreshed token no longer covers the subscription's path;
 * it ended), "continuity-lost" (onError: the server lost events this subscription delivered, or events
 * after the last one delivered were deleted from the log by retention or an operator, as its
 * `Ivy-Horizon` says; it goes on), "http" (a log read failed; `status` says how the server answered), "busy" (the
 * client was called in the middle of an update), "load-failed" (the WebAssembly module could
 * not be loaded), or the server's code when it refused a command ("too-many-subscriptions",
 * "rate-limited", "storage", "store-full", "shutting-down", ...). */
export type IvyErrorCode =
  | "window-passed"
  | "connection-lost"
  | "timeout"
  | "not-connected"
  | "too-large"
  | "closed"
  | "invalid-path"
  | "invalid-argument"
  | "continuity-lost"
  | "forbidden"
  | "unauthorized"
  | "subscription-ended"
  | "http"
  | "busy"
  | "load-failed"
  | (string & {});

/** Every rejected promise, every thrown error and every `onError` notice of the client is an
 * `IvyError`. (An exception thrown by the application's own callback is passed to `onError`
 * listeners as it was thrown.) */
export interface IvyError extends Error {
  code: IvyErrorCode;
  /** True when a failed send may nevertheless have been stored: "window-passed" (its ack was
   * lost and it could not be resent within the idempotency window), or against an older server
   * without send ids "connection-lost" and "timeout". If it was, it is in the log and the
   * subscriptions deliver it; look for it in the log before sending it again. False otherwise:
   * nothing was stored. */
  uncertain: boolean;
  /** With code "http": the HTTP status of the server's answer, if it answered. */
  status?: number;
}

/** Parameters of a log read: a page (`after`, `limit`), or the last `n` events. */
export interface LogOptions {
  /** The page starts after this timestamp (default: at the oldest event). */
  after?: IvyTimestamp;
  /** At most this many events (default: the client's `pageLimit`, 1000; the server caps it,
   * 10,000 by default). */
  limit?: number;
  /** The last `n` events instead of a page (not with `after` or `limit`). */
  n?: number;
}

/** A member of a channel's presence: a token's `sub` (with the token's public `info` claim,
 * if it has one), or an anonymous connection's server-assigned `anon` id (16 hex digits, new
 * at each connection: an anonymous reload is a leave and a join). */
export type IvyMember =
  | { sub: string; anon?: undefined; info?: Record<string, unknown>; conns: number }
  | { anon: string; sub?: undefined; info?: undefined; conns: number };

/** Who is present at a path: the members subscribed at it or below (the union over its
 * channels), sorted (subs first). */
export interface IvyPresenceView {
  /** The normalized path. */
  path: string;
  /** The number of distinct members (an estimate when `complete` is false). */
  count: number;
  /** The members; `conns`: their connections subscribed there (summed over channels; a
   * member that joined since the snapshot counts 1). */
  members: IvyMember[];
  /** False when a channel had more members than the server lists (its
   * `--presence-max-list`): those are missing from `members`, and `count` is an estimate. */
  complete: boolean;
}

/** What a presence watch reports: the first snapshot, then members joining and leaving the
 * view and its count (a "snapshot" again replaces the view when a channel passes the server's
 * `--presence-max-list` and is counted, not listed, from then on: `complete` false); after a reconnect only real changes (no leave and join of someone who
 * stayed). "error" is the last one: the server refused the watch (for example "forbidden":
 * no read grant covering the path; "malformed": a server without presence) or ended it
 * ("subscription-ended"). */
export type IvyPresenceEvent =
  | { type: "snapshot"; view: IvyPresenceView }
  | { type: "join"; member: IvyMember }
  | { type: "leave"; member: IvyMember }
  | { type: "count"; count: number }
  | { type: "error"; error: IvyError };

/** A page of the log, oldest first, with the cursor of the next one. */
export interface IvyLogPage extends Array<IvyEvent> {
  /** Where the next page starts (pass it as `after`), or null when the server said this page
   * is the last one for now (its `Link: rel="next"` header; always null for `n`). */
  next: IvyTimestamp | null;
}

/** Loads the WebAssembly module, once (later calls return the same promise). Optional: the
 * client loads it by itself on first use. Before it is loaded, calls are queued, and argument
 * errors that only the module can find (an invalid path of `subscribe`) go to the
 * subscription's `onError` instead of being thrown; awaiting `init()` first makes them
 * thrown from the start. */
export default function init(): Promise<void>;

/** The `exp` claim of a JWT, in seconds since the Unix epoch, read without verifying the token
 * (undefined when it has none or is not a JWT): what the client uses to refresh in time. */
export function tokenExp(token: string): number | undefined;

/** A connection to an Ivy server that reconnects by itself. Every subscription delivers each
 * event of its channel (and descendants) exactly once, in timestamp order, across reconnects
 * and server restarts, or tells `onError` that continuity was lost. */
export class IvyClient {
  /** Creates the client and starts connecting to `url`: the server's base URL (`ws://`,
   * `wss://`, `http://`, `https://`), or a URL relative to the page (`"/"`: the server that
   * served it); the WebSocket (`/ws`) and log (`/log/`) endpoints are derived from it. Throws
   * an `IvyError` ("invalid-argument") for an unusable URL or option. */
  constructor(url: string, options?: IvyOptions);
  /** `new IvyClient(url, options)`, resolved once connected (it waits as long as the client
   * retries; rejects only if the client is closed or cannot load). */
  static connect(url: string, options?: IvyOptions): Promise<IvyClient>;
  /** The connection state (see `IvyStatus`). */
  readonly status: IvyStatus;
  /** Why: the last change or the last failed attempt (see `IvyStatusReason`). */
  readonly statusReason: IvyStatusReason;
  /** Calls `listener` on every change of `status`, with its reason; returns the function that
   * removes it. */
  onStatus(listener: (status: IvyStatus, reason: IvyStatusReason) => void): () => void;
  /** Calls `listener` with what would otherwise be lost: an exception thrown by a
   * subscription callback, a status listener or an `onError` option, a subscription notice
   * without an `onError` option, a module that cannot load. Without any listener these go to
   * the page's `reportError` (the console and `window.onerror`). The client goes on either
   * way. Returns the function that removes the listener. */
  onError(listener: (error: unknown) => void): () => void;
  /** Resolves when connected (at once if it is); rejects with an `IvyError` "closed" if the
   * client is closed first ("unauthorized" if its token is refused for good), or "timeout"
   * after `timeoutMs` if given. */
  ready(timeoutMs?: number): Promise<void>;
  /** Subscribes to `path` and its descendants; `callback` gets every event exactly once, in
   * timestamp order, across reconnects (this client's own events included, in place). Throws
   * an `IvyError` for an invalid path or option. */
  subscribe(path: string, callback: (event: IvyEvent) => void, options?: SubscribeOptions): IvySubscription;
  /** Publishes `data` (a string, or UTF-8 bytes) on `path`. Resolves to the event's timestamp
   * once the server stored it; while disconnected the send is queued (`offlineQueue`). Each
   * send carries an id (docs/PROTOCOL.md 5.9): when the connection drops before its ack, it is
   * resent with the same id after the reconnect, in order, and stored once, so the promise
   * survives reconnects and server restarts. Rejects with an `IvyError`; when its `uncertain`
   * is true ("window-passed") the event may have been stored. */
  send(path: string, data: string | Uint8Array): Promise<IvyTimestamp>;
  /** The server's current time. */
  timestamp(): Promise<IvyTimestamp>;
  /** Watches who is present at `path` (the members subscribed at it or below; the presence
   * extension, docs/PROTOCOL.md 5.10): `callback` gets `{type: "snapshot"}` first, then
   * "join", "leave" and "count", kept right across reconnects. The watch subscribes this
   * client to `path` (so it is present there itself). Throws an `IvyError` for an invalid
   * path; a refusal by the server comes as `{type: "error"}`. */
  presence(path: string, callback: (event: IvyPresenceEvent) => void): IvyPresence;
  /** Who is present at `path` now, once (no subscription). Rejects with an `IvyError`:
   * "not-connected", "forbidden", "timeout", ... */
  who(path: string): Promise<IvyPresenceView>;
  /** A page of a channel's stored history (its whole subtree), oldest first: `limit` events
   * (default `pageLimit`, 1000) after `after` (default: from the oldest), with the cursor
   * `next`; or the last `n` events. Rejects with an `IvyError`: "invalid-path",
   * "invalid-argument" (for example `n` with `after`), or "http" with the `status` of the
   * server's answer. */
  log(path: string, options?: LogOptions): Promise<IvyLogPage>;
  /** Every page of the history from `after` (default: the oldest event) to the end, following
   * the cursor: `for await (const page of client.logPages("/chat")) ...`. Each page is one
   * request, made when the loop asks for it. */
  logPages(path: string, options?: Pick<LogOptions, "after" | "limit">): AsyncGenerator<IvyLogPage, void, undefined>;
  /** For debugging only (the shape may change): what the client knows, as a plain object. */
  debugState(): unknown;
  /** Closes the connection for good; pending requests reject with "closed" and callbacks
   * stop. (There is no `free()`: the memory is released once the client is unreachable.) */
  close(): void;
  /** `close()`, for `using client = new IvyClient(...)` (where the runtime has
   * `Symbol.dispose`). */
  [Symbol.dispose](): void;
}

/** A presence watch. */
export class IvyPresence {
  private constructor();
  /** The watched path (normalized once the module is loaded). */
  readonly path: string;
  /** The view after the events delivered so far (a copy; empty before the snapshot). */
  readonly view: IvyPresenceView;
  /** Ends the watch: its callback is not called again. (This client stays subscribed to the
   * path if a subscription of its own holds it.) */
  stop(): void;
  /** `stop()`, for `using watch = client.presence(...)`. */
  [Symbol.dispose](): void;
}

/** A subscription. */
export class IvySubscription {
  private constructor();
  /** The subscription's normalized channel path (as given, until the module is loaded). */
  readonly path: string;
  /** Ends the subscription: its callback is not called again. */
  unsubscribe(): void;
  /** `unsubscribe()`, for `using sub = client.subscribe(...)`. */
  [Symbol.dispose](): void;
}
