// The message list: batched rendering (at most one DOM update per animation frame), a cap on
// the number of rendered messages, stick-to-bottom scrolling, pending messages below.

import { type ChatMessage, fullTime, nickHue, shortTime } from "./message";

/** Messages kept in the DOM while the reader is at the bottom; older ones are dropped and
 * can be loaded again with "Load earlier messages". */
export const MAX_RENDERED = 500;

/** Consecutive messages of one nickname within this many seconds share one header. */
const GROUP_SECONDS = 300;

/** Within this many pixels of the bottom counts as "at the bottom". */
const BOTTOM_SLACK = 80;

export type PendingState =
  | { kind: "sending" }
  | { kind: "queued" }
  | { kind: "failed"; error: string };

export interface PendingHandlers {
  retry(id: string): void;
  discard(id: string): void;
}

export class MessageList {
  private queue: ChatMessage[] = [];
  private frame = 0;
  private timer = 0;
  private unseen = 0;
  private pendingEls = new Map<string, HTMLLIElement>();
  /** Whether older messages exist than the first rendered one. */
  hasEarlier = false;

  constructor(
    private scroller: HTMLElement,
    private list: HTMLOListElement,
    private pendingList: HTMLOListElement,
    private earlier: HTMLButtonElement,
    private empty: HTMLElement,
    private jump: HTMLButtonElement,
    private myNick: string,
    private handlers: PendingHandlers,
    /** Senders are verified (auth on): names only the data claims are marked as such. */
    private verifiedOnly = false,
  ) {
    this.scroller.addEventListener("scroll", () => {
      if (this.atBottom()) this.setUnseen(0);
    });
    this.jump.onclick = () => this.scrollToBottom();
  }

  /** Queues messages (in timestamp order, after everything added before) for the next frame. */
  add(messages: ChatMessage[]): void {
    if (messages.length === 0) return;
    for (const m of messages) this.queue.push(m);
    this.schedule();
  }

  /** The timestamp of the oldest and the number of rendered messages (for paging back). */
  firstTs(): string | undefined {
    return (this.list.firstElementChild as HTMLElement | null)?.dataset.ts;
  }

  renderedCount(): number {
    return this.list.childElementCount + this.queue.length;
  }

  /** Inserts older messages above the rendered ones, keeping what the reader sees in place. */
  prepend(messages: ChatMessage[]): void {
    if (messages.length > 0) {
      const before = this.scroller.scrollHeight;
      const frag = document.createDocumentFragment();
      let prev: ChatMessage | undefined;
      for (const m of messages) {
        frag.append(this.messageEl(m, prev));
        prev = m;
      }
      const oldFirst = this.list.firstElementChild as HTMLLIElement | null;
      this.list.prepend(frag);
      if (oldFirst && prev) this.setContinued(oldFirst, prev);
      this.scroller.scrollTop += this.scroller.scrollHeight - before;
    }
    this.updateChrome();
  }

  setEarlier(has: boolean): void {
    this.hasEarlier = has;
    this.updateChrome();
  }

  /** Shows a message of ours that has no timestamp yet, below the confirmed ones. */
  addPending(id: string, text: string, state: PendingState): void {
    const m: ChatMessage = { ts: "", path: "", nick: this.myNick, text, id, verified: false, raw: false };
    const el = this.messageEl(m, undefined);
    el.classList.add("pending");
    el.dataset.id = id;
    this.pendingEls.set(id, el);
    this.pendingList.append(el);
    this.setPending(id, state);
    this.updateChrome();
    this.scrollToBottom();
  }

  setPending(id: string, state: PendingState): void {
    const el = this.pendingEls.get(id);
    if (!el) return;
    el.dataset.state = state.kind;
    el.classList.toggle("failed", state.kind === "failed");
    const meta = el.querySelector(".state") as HTMLElement;
    meta.replaceChildren();
    switch (state.kind) {
      case "sending":
        meta.textContent = "Sending…";
        break;
      case "queued":
        meta.textContent = "Waiting for connection…";
        break;
      case "failed": {
        const why = document.createElement("span");
        why.textContent = `Not sent: ${state.error}`;
        const retry = document.createElement("button");
        retry.type = "button";
        retry.className = "link";
        retry.textContent = "Retry";
        retry.onclick = () => this.handlers.retry(id);
        const discard = document.createElement("button");
        discard.type = "button";
        discard.className = "link";
        discard.textContent = "Discard";
        discard.onclick = () => this.handlers.discard(id);
        meta.append(why, retry, discard);
        break;
      }
    }
  }

  pendingState(id: string): PendingState["kind"] | undefined {
    return this.pendingEls.get(id)?.dataset.state as PendingState["kind"] | undefined;
  }

  removePending(id: string): void {
    this.pendingEls.get(id)?.remove();
    this.pendingEls.delete(id);
    this.updateChrome();
  }

  scrollToBottom(): void {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.setUnseen(0);
  }

  private atBottom(): boolean {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight <= BOTTOM_SLACK;
  }

  private schedule(): void {
    if (this.frame !== 0) return;
    // One update per animation frame; the timer covers tabs where frames are paused.
    this.frame = requestAnimationFrame(() => this.flush());
    this.timer = window.setTimeout(() => this.flush(), 250);
  }

  private flush(): void {
    cancelAnimationFrame(this.frame);
    clearTimeout(this.timer);
    this.frame = 0;
    this.timer = 0;
    const batch = this.queue;
    if (batch.length === 0) return;
    this.queue = [];
    const stick = this.atBottom();
    // Only the newest MAX_RENDERED of a large batch are worth building.
    const start = Math.max(0, batch.length - MAX_RENDERED);
    if (start > 0) {
      this.list.replaceChildren();
      this.hasEarlier = true;
    }
    let prev = this.lastMessage();
    const frag = document.createDocumentFragment();
    for (let i = start; i < batch.length; i++) {
      const m = batch[i];
      frag.append(this.messageEl(m, prev));
      prev = m;
    }
    for (const m of batch) {
      if (m.id === undefined) continue;
      const p = this.pendingEls.get(m.id);
      if (p) {
        p.remove();
        this.pendingEls.delete(m.id);
      }
    }
    this.list.append(frag);
    if (stick) {
      this.trim();
      this.scrollToBottom();
    } else {
      this.setUnseen(this.unseen + batch.length);
    }
    this.updateChrome();
  }

  /** Drops the oldest rendered messages beyond the cap (only while the reader is at the bottom,
   * so nothing moves under their eyes). */
  private trim(): void {
    const extra = this.list.childElementCount - MAX_RENDERED;
    if (extra <= 0) return;
    for (let i = 0; i < extra; i++) this.list.firstElementChild?.remove();
    const first = this.list.firstElementChild as HTMLLIElement | null;
    first?.classList.remove("cont");
    this.hasEarlier = true;
  }

  private lastMessage(): ChatMessage | undefined {
    const el = this.list.lastElementChild as HTMLElement | null;
    if (!el) return undefined;
    return { ts: el.dataset.ts ?? "", path: "", nick: el.dataset.nick ?? "", text: "", verified: el.dataset.verified === "true", raw: el.classList.contains("raw") };
  }

  private setUnseen(n: number): void {
    this.unseen = n;
    this.jump.hidden = n === 0;
  }

  private updateChrome(): void {
    this.earlier.hidden = !this.hasEarlier;
    this.empty.hidden = this.list.childElementCount + this.pendingEls.size + this.queue.length > 0 || this.hasEarlier;
  }

  private setContinued(el: HTMLLIElement, prev: ChatMessage): void {
    const ts = el.dataset.ts ?? "";
    const same =
      !prev.raw &&
      !el.classList.contains("raw") &&
      prev.nick === el.dataset.nick &&
      Number(ts.split(".")[0]) - Number(prev.ts.split(".")[0]) < GROUP_SECONDS;
    el.classList.toggle("cont", same);
  }

  private messageEl(m: ChatMessage, prev: ChatMessage | undefined): HTMLLIElement {
    const li = document.createElement("li");
    li.className = "msg";
    if (m.raw) li.classList.add("raw");
    if (!m.raw && m.nick === this.myNick && (m.verified || !this.verifiedOnly)) li.classList.add("mine");
    if (m.ts) li.dataset.ts = m.ts;
    li.dataset.nick = m.nick;
    li.dataset.verified = String(m.verified);
    const meta = document.createElement("div");
    meta.className = "meta";
    const nick = document.createElement("span");
    nick.className = "nick";
    nick.textContent = m.raw ? (m.verified ? `${m.nick} · ${m.path}` : m.path) : m.nick;
    if (!m.raw) nick.style.setProperty("--hue", String(nickHue(m.nick)));
    meta.append(nick);
    if (m.ts && !m.raw && this.verifiedOnly && !m.verified) {
      // A name only the data claims: anybody could have written it.
      const tag = document.createElement("span");
      tag.className = "unverified";
      tag.textContent = "unverified";
      tag.title = "The server did not vouch for this name: the message carries it itself.";
      meta.append(tag);
    } else if (m.verified) {
      nick.title = "Verified by the server (the sender's token)";
    }
    if (m.ts) {
      const time = document.createElement("time");
      time.textContent = shortTime(m.ts);
      time.title = fullTime(m.ts);
      meta.append(time);
    }
    const state = document.createElement("span");
    state.className = "state";
    meta.append(state);
    const text = document.createElement("div");
    text.className = "text";
    // textContent: shown exactly as typed, never interpreted as HTML.
    text.textContent = m.text;
    li.append(meta, text);
    if (m.ts && prev) this.setContinued(li, prev);
    return li;
  }
}
