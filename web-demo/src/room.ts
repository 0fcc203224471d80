// One open room: history, then live messages, and our own sends until they are confirmed.

import type { IvyClient, IvyError, IvyEvent, IvySubscription, IvyTimestamp } from "ivy-client-wasm";
import { type ChatMessage, MAX_DATA_BYTES, dataBytes, decode, encode, newId, roomPath } from "./message";
import type { MessageList } from "./view";

/** Messages shown when a room opens; older ones on demand. */
export const HISTORY = 200;

interface Pending {
  text: string;
  data: string;
}

export class Room {
  readonly path: string;
  private sub: IvySubscription | undefined;
  private closed = false;
  private lastTs: IvyTimestamp | undefined;
  private pending = new Map<string, Pending>();

  constructor(
    private client: IvyClient,
    room: string,
    private nick: string,
    private view: MessageList,
    private notice: (text: string | null) => void,
    /** The client asks for verified senders (`nick` is then our token's `sub`). */
    private senders = false,
  ) {
    this.path = roomPath(room);
  }

  /**
   * History, then live. The last HISTORY messages come from one log request (`n`), and the
   * subscription resumes right after the newest of them (`from: ts`): a room with a long history
   * opens as fast as a short one, and the client guarantees that everything after that
   * timestamp arrives once and in order, also across reconnects. An empty room subscribes
   * `from: "beginning"` so that nothing sent in between is missed.
   */
  async open(): Promise<void> {
    let history: IvyEvent[] | undefined;
    for (let attempt = 0; history === undefined; attempt++) {
      try {
        history = await this.client.log(this.path, { n: HISTORY });
      } catch (e) {
        if (this.closed) return;
        this.notice(`Waiting for the server… (${errorText(e)})`);
        await sleep(Math.min(500 * 2 ** attempt, 5000));
        if (this.closed) return;
      }
    }
    if (this.closed) return;
    this.notice(null);
    const messages = history.map((e) => this.toMessage(e));
    this.view.setEarlier(history.length === HISTORY);
    this.view.add(messages);
    this.lastTs = history.at(-1)?.ts;
    this.sub = this.client.subscribe(this.path, (e) => this.onEvent(e), {
      from: this.lastTs ?? "beginning",
      onError: (err) => this.notice(`${err.message}`),
    });
  }

  private onEvent(e: IvyEvent): void {
    if (this.closed) return;
    this.lastTs = e.ts;
    const m = this.toMessage(e);
    if (m.id !== undefined) this.pending.delete(m.id);
    this.view.add([m]);
  }

  /** Loads up to HISTORY messages older than the first rendered one. */
  async loadEarlier(): Promise<void> {
    const first = this.view.firstTs();
    if (first === undefined) return;
    // The log pages forward only: the last K events, of which the ones before `first` are new.
    const k = this.view.renderedCount() + HISTORY;
    const events = await this.client.log(this.path, { n: k });
    if (this.closed) return;
    const older = events.filter((e) => e.ts < first).map((e) => this.toMessage(e));
    this.view.prepend(older);
    this.view.setEarlier(events.length === k && older.length > 0);
  }

  /** Sends a message; it shows as pending until the subscription delivers it back. */
  send(text: string): string | null {
    const id = newId();
    const data = encode({ nick: this.nick, text, id });
    const bytes = dataBytes(data);
    if (bytes > MAX_DATA_BYTES) {
      return `This message is too long (${Math.ceil(bytes / 1024)} KiB; the limit is ${Math.floor(MAX_DATA_BYTES / 1024)} KiB).`;
    }
    this.pending.set(id, { text, data });
    this.view.addPending(id, text, { kind: this.client.status === "connected" ? "sending" : "queued" });
    this.transmit(id);
    return null;
  }

  /** Pending messages: the view marks the ones waiting for a connection. */
  onStatus(status: string): void {
    for (const [id] of this.pending) {
      const state = this.view.pendingState(id);
      if (state === "sending" && status !== "connected") this.view.setPending(id, { kind: "queued" });
      if (state === "queued" && status === "connected") this.view.setPending(id, { kind: "sending" });
    }
  }

  retry(id: string): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.view.setPending(id, { kind: this.client.status === "connected" ? "sending" : "queued" });
    this.transmit(id);
  }

  discard(id: string): void {
    this.pending.delete(id);
    this.view.removePending(id);
  }

  /** What the room knows, for `ivyDebug()` (see main.ts). */
  debugState(): object {
    return {
      path: this.path,
      subscribed: this.sub !== undefined,
      closed: this.closed,
      lastTs: this.lastTs ?? null,
      pending: [...this.pending].map(([id, p]) => ({ id, state: this.view.pendingState(id) ?? null, text: p.text.slice(0, 80) })),
    };
  }

  close(): void {
    this.closed = true;
    this.sub?.unsubscribe();
    this.sub = undefined;
  }

  /**
   * The message of an event. With verified senders (`senders`), every event from the server
   * has its `sender`; one without is our own send, which the client delivers in place from
   * its ack (the server does not echo it): the server stored it with our token's `sub`, the
   * name we show.
   */
  private toMessage(e: IvyEvent): ChatMessage {
    const sender = e.sender ?? (this.senders ? { kind: "user" as const, sub: this.nick } : undefined);
    return decode(e.ts, e.path, e.data, sender);
  }

  private transmit(id: string): void {
    const p = this.pending.get(id);
    if (!p) return;
    // The client queues the send while disconnected and sends it once the connection is
    // back; the promise resolves with the timestamp once the server has stored it. The send
    // carries an id (docs/PROTOCOL.md 5.9): when the connection drops before the server's
    // reply, the client sends it again with that id after reconnecting, and the server stores
    // it once. So a dropped connection neither loses nor doubles a message; nothing to do here.
    this.client.send(this.path, p.data).then(
      () => {
        // Stored. The subscription delivers it (our own sends included, in place).
      },
      (err: unknown) => {
        if (this.closed || !this.pending.has(id)) return;
        // Uncertain only when the client could not resend it within the server's idempotency
        // window (10 minutes without a connection): it may have been stored, and then the
        // subscription delivers it, which removes it from the pending list. Otherwise the
        // reader decides (Retry or Discard). Every other failure stored nothing.
        const why = isIvyError(err) && err.uncertain ? `${errorText(err)} (if it was, it appears above)` : errorText(err);
        this.view.setPending(id, { kind: "failed", error: why });
      },
    );
  }
}

/** The client rejects with (and passes to `onError`) `Error`s that carry a `code` and `uncertain`. */
function isIvyError(e: unknown): e is IvyError {
  const fields = e as Partial<IvyError>;
  return e instanceof Error && typeof fields.code === "string" && typeof fields.uncertain === "boolean";
}

export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
