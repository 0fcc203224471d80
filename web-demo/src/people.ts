// Who is in the room, live: the client's presence watch of the room's channel
// (`client.presence(path, cb)`, the server's presence extension). The header shows the count;
// the people panel lists the members (the token's `sub`: the server vouches for it), and
// "ada joined" / "ada left" notices go to a short log and a passing toast.
//
// The client resynchronises the watch after each reconnect and reports only real changes, and
// the server delays a leave by its linger (5 s by default), so a reload or a network blip of
// somebody does not show as leaving and joining again.

import type { IvyClient, IvyMember, IvyPresence, IvyPresenceEvent } from "ivy-client-wasm";

/** Notices kept in the panel's log. */
const LOG_LENGTH = 20;
/** How long a notice stays in the toast. */
const TOAST_MS = 4000;

/** The name shown for a member: its `sub`, or "guest" and the start of an anonymous id. */
export function memberName(m: IvyMember): string {
  return m.sub !== undefined ? m.sub : `guest ${m.anon.slice(0, 4)}`;
}

/** A member's identity: subs and anonymous ids never collide. */
function memberKey(m: IvyMember): string {
  return m.sub !== undefined ? `=${m.sub}` : `-${m.anon}`;
}

export interface PeopleElements {
  /** The header's button with the count ("3 here"); it opens and closes the panel. */
  count: HTMLButtonElement;
  /** The panel. */
  panel: HTMLElement;
  /** The panel's list of members. */
  list: HTMLUListElement;
  /** The panel's log of recent joins and leaves. */
  log: HTMLOListElement;
  /** The toast that shows the latest notice for a moment. */
  toast: HTMLElement;
}

export class People {
  private watch: IvyPresence | undefined;
  private closed = false;
  private toastTimer: ReturnType<typeof setTimeout> | undefined;
  private members: IvyMember[] = [];
  private count = 0;
  private ready = false;

  constructor(
    private client: IvyClient,
    readonly path: string,
    /** Our own name (the token's `sub`), marked "(you)". */
    private me: string,
    private ui: PeopleElements,
  ) {
    ui.list.replaceChildren();
    ui.log.replaceChildren();
    ui.toast.hidden = true;
    ui.count.onclick = () => {
      ui.panel.hidden = !ui.panel.hidden;
      ui.count.setAttribute("aria-expanded", String(!ui.panel.hidden));
    };
    this.render();
  }

  open(): void {
    if (this.closed || this.watch) return;
    this.watch = this.client.presence(this.path, (e) => this.onPresence(e));
  }

  close(): void {
    this.closed = true;
    this.watch?.stop();
    this.watch = undefined;
    if (this.toastTimer !== undefined) clearTimeout(this.toastTimer);
  }

  /** What the panel knows, for `ivyDebug()`. */
  debugState(): object {
    return { path: this.path, ready: this.ready, count: this.count, members: this.members.map(memberName) };
  }

  private onPresence(e: IvyPresenceEvent): void {
    if (this.closed) return;
    switch (e.type) {
      case "snapshot":
        // Everyone present: no notices for them.
        this.members = [...e.view.members];
        this.count = e.view.count;
        this.ready = true;
        break;
      case "join":
        this.members = this.members.filter((m) => memberKey(m) !== memberKey(e.member));
        this.members.push(e.member);
        this.notice(`${memberName(e.member)} joined`, "join");
        break;
      case "leave":
        this.members = this.members.filter((m) => memberKey(m) !== memberKey(e.member));
        this.notice(`${memberName(e.member)} left`, "leave");
        break;
      case "count":
        this.count = e.count;
        break;
      case "error":
        // Refused (an older server without presence, or no read grant): the room works
        // without the list.
        this.ui.count.title = `Who is here is not available: ${e.error.message}`;
        this.ui.count.dataset.unavailable = "true";
        return;
    }
    this.render();
  }

  private render(): void {
    const { count, list, panel } = this.ui;
    count.textContent = this.ready ? `${this.count} here` : "…";
    count.dataset.count = String(this.count);
    if (this.ready) panel.dataset.ready = "true";
    const sorted = [...this.members].sort((a, b) => memberName(a).localeCompare(memberName(b)));
    list.replaceChildren(
      ...sorted.map((m) => {
        const li = document.createElement("li");
        li.className = "person";
        const name = memberName(m);
        li.dataset.name = name;
        li.textContent = name;
        if (m.sub !== undefined && m.sub === this.me) {
          li.classList.add("person-me");
          const you = document.createElement("span");
          you.className = "you";
          you.textContent = " (you)";
          li.append(you);
        }
        if (m.anon !== undefined) li.classList.add("anon");
        return li;
      }),
    );
  }

  private notice(text: string, kind: "join" | "leave"): void {
    const li = document.createElement("li");
    li.className = `presence-${kind}`;
    li.dataset.kind = kind;
    li.textContent = text;
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    li.append(" ", time);
    this.ui.log.prepend(li);
    while (this.ui.log.children.length > LOG_LENGTH) this.ui.log.lastElementChild?.remove();
    const toast = this.ui.toast;
    toast.textContent = text;
    toast.dataset.kind = kind;
    toast.hidden = false;
    if (this.toastTimer !== undefined) clearTimeout(this.toastTimer);
    this.toastTimer = setTimeout(() => (toast.hidden = true), TOAST_MS);
  }
}
