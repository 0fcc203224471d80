// Ivy chat: pick a nickname and a room (/chat/<room>); history, then live messages.
// The room is in the URL hash (#lobby), the nickname in localStorage. With auth on (the
// server's demo token endpoint), the nickname gets a token, which the client refreshes before
// it expires; one client per nickname.

import init, { IvyClient, type IvyStatus, type IvyStatusReason } from "ivy-client-wasm";
import { NicknameTaken, demoToken, tokenProvider } from "./auth";
import { normalizeNick, normalizeRoom, nickError, roomError } from "./message";
import { People } from "./people";
import { Room, errorText } from "./room";
import { MessageList } from "./view";
import "./style.css";

const NICK_KEY = "ivy-chat.nick";
const RECENT_KEY = "ivy-chat.recent";

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`#${id} missing from index.html`);
  return e as T;
}

const ui = {
  join: el("join"),
  joinForm: el<HTMLFormElement>("join-form"),
  nick: el<HTMLInputElement>("nick"),
  room: el<HTMLInputElement>("room"),
  joinError: el("join-error"),
  joinButton: el<HTMLButtonElement>("join-button"),
  recent: el("recent"),
  recentList: el("recent-list"),
  chat: el("chat"),
  leave: el<HTMLButtonElement>("leave"),
  roomName: el("room-name"),
  me: el("me"),
  status: el("status"),
  statusText: el("status-text"),
  notice: el("notice"),
  scroller: el("scroller"),
  earlier: el<HTMLButtonElement>("earlier"),
  empty: el("empty"),
  messages: el<HTMLOListElement>("messages"),
  pending: el<HTMLOListElement>("pending"),
  jump: el<HTMLButtonElement>("jump"),
  composer: el<HTMLFormElement>("composer"),
  text: el<HTMLTextAreaElement>("text"),
  send: el<HTMLButtonElement>("send"),
  peopleCount: el<HTMLButtonElement>("people-count"),
  people: el("people"),
  peopleList: el<HTMLUListElement>("people-list"),
  presenceLog: el<HTMLOListElement>("presence-log"),
  presenceToast: el("presence-toast"),
};

/** The server: the one that served this page, or `?server=ws://host:port`. */
function serverUrl(): string {
  return new URLSearchParams(location.search).get("server") ?? new URL("./", location.href).href;
}

const STATUS_TEXT: Record<IvyStatus, string> = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
  unauthorized: "Signed out",
};

/** The page's client, for `clientNick` (with its token, when the server has auth on). */
let client: IvyClient | undefined;
let clientNick: string | undefined;
/** The name the others see: the token's `sub`, or the nickname without auth. */
let myName = "";
/** Whether the page asks for verified senders (auth on): messages show who sent them as the
 * server vouches, not the nickname their data carries. */
let senders = false;
let room: Room | undefined;
/** Who is in the open room. */
let people: People | undefined;

declare global {
  interface Window {
    /** Debugging aid: what this page's client and room know (see README, "When it stalls"). */
    ivyDebug?: () => object;
  }
}

function showStatus(status: IvyStatus): void {
  ui.status.dataset.status = status;
  ui.statusText.textContent = STATUS_TEXT[status] ?? status;
}

function setNotice(text: string | null): void {
  ui.notice.hidden = text === null;
  ui.notice.textContent = text ?? "";
}

function recentRooms(): string[] {
  try {
    const v: unknown = JSON.parse(localStorage.getItem(RECENT_KEY) ?? "[]");
    return Array.isArray(v) ? v.filter((r): r is string => typeof r === "string" && roomError(r) === null) : [];
  } catch {
    return [];
  }
}

function remember(roomName: string): void {
  const list = [roomName, ...recentRooms().filter((r) => r !== roomName)].slice(0, 6);
  localStorage.setItem(RECENT_KEY, JSON.stringify(list));
}

function showJoin(roomName: string, error: string | null = null): void {
  room?.close();
  room = undefined;
  people?.close();
  people = undefined;
  ui.chat.hidden = true;
  ui.join.hidden = false;
  document.title = "Ivy chat";
  ui.nick.value = localStorage.getItem(NICK_KEY) ?? "";
  ui.room.value = roomName || ui.room.value || "lobby";
  ui.joinError.textContent = error ?? "";
  ui.joinError.hidden = error === null;
  const recent = recentRooms();
  ui.recent.hidden = recent.length === 0;
  ui.recentList.replaceChildren(
    ...recent.map((r) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chip";
      b.textContent = `#${r}`;
      b.onclick = () => {
        ui.room.value = r;
        ui.joinForm.requestSubmit();
      };
      return b;
    }),
  );
  (ui.nick.value ? ui.room : ui.nick).focus();
}

/**
 * The client for `nick`: the current one if it is still usable, else a new one with a token
 * from the demo endpoint (none when the server has no such endpoint). Throws `NicknameTaken`.
 */
async function clientFor(nick: string): Promise<IvyClient> {
  if (client && clientNick === nick && client.status !== "unauthorized" && client.status !== "closed") return client;
  const token = await demoToken(nick);
  client?.close();
  room?.close();
  room = undefined;
  people?.close();
  people = undefined;
  // With a token, the server vouches for who sent each message (`senders`): the page shows
  // that name, not the nickname a message's data claims.
  const c = new IvyClient(
    serverUrl(),
    token ? { maxBackoffMs: 4000, token: token.token, getToken: tokenProvider(nick), senders: true } : { maxBackoffMs: 4000 },
  );
  client = c;
  clientNick = nick;
  myName = token?.sub ?? nick;
  senders = token !== null;
  showStatus(c.status);
  c.onStatus((s, why) => {
    if (c !== client) return;
    showStatus(s);
    room?.onStatus(s);
    if (s === "unauthorized") signedOut(why);
  });
  c.onError((e) => {
    // A refused token is shown by the status; anything else (a bug in a callback) is the
    // page's error as before.
    if ((e as { code?: unknown }).code !== "unauthorized") reportError(e);
  });
  return c;
}

/** The token was refused and no fresh one came (the nickname's claim expired and someone
 * else took it, or the server restarted with another secret and the nickname is taken). */
function signedOut(why: IvyStatusReason): void {
  setNotice(`Signed out: ${why.message}. Go back (←) and join again.`);
  setComposer(false);
}

function setComposer(enabled: boolean): void {
  ui.text.disabled = !enabled;
  ui.send.disabled = !enabled;
}

/** Gets the client for `nick`, then opens the room; the join form with the reason if the
 * nickname is taken or no token could be had. */
async function enter(roomName: string, nick: string): Promise<void> {
  ui.joinButton.disabled = true;
  try {
    const c = await clientFor(nick);
    showChat(c, roomName, myName);
  } catch (e) {
    showJoin(roomName, e instanceof NicknameTaken ? e.message : `Could not join: ${errorText(e)}`);
  } finally {
    ui.joinButton.disabled = false;
  }
}

function showChat(client: IvyClient, roomName: string, nick: string): void {
  room?.close();
  setComposer(client.status !== "unauthorized");
  ui.join.hidden = true;
  ui.chat.hidden = false;
  document.title = `#${roomName} · Ivy chat`;
  ui.roomName.textContent = `#${roomName}`;
  ui.me.textContent = `as ${nick}`;
  ui.messages.replaceChildren();
  ui.pending.replaceChildren();
  setNotice(null);
  const view = new MessageList(ui.scroller, ui.messages, ui.pending, ui.earlier, ui.empty, ui.jump, nick, {
    retry: (id) => room?.retry(id),
    discard: (id) => room?.discard(id),
  }, senders);
  const r = new Room(client, roomName, nick, view, setNotice, senders);
  room = r;
  people?.close();
  delete ui.people.dataset.ready;
  const who = new People(client, r.path, nick, {
    count: ui.peopleCount,
    panel: ui.people,
    list: ui.peopleList,
    log: ui.presenceLog,
    toast: ui.presenceToast,
  });
  people = who;
  who.open();
  ui.earlier.onclick = async () => {
    ui.earlier.disabled = true;
    try {
      await r.loadEarlier();
    } catch (e) {
      setNotice(`Could not load earlier messages: ${errorText(e)}`);
    } finally {
      ui.earlier.disabled = false;
    }
  };
  delete ui.chat.dataset.ready;
  void r.open().then(() => {
    // History shown and subscribed: end-to-end tests wait for this.
    if (room === r) ui.chat.dataset.ready = "true";
  });
  remember(roomName);
  ui.text.focus();
}

/** Opens the room in the hash, or the join form. */
function route(): void {
  const roomName = normalizeRoom(decodeURIComponent(location.hash.slice(1)));
  const nick = normalizeNick(localStorage.getItem(NICK_KEY) ?? "");
  if (roomName !== "" && roomError(roomName) === null && nickError(nick) === null) {
    if (room?.path !== `/chat/${roomName}` || ui.chat.hidden || clientNick !== nick) void enter(roomName, nick);
  } else {
    showJoin(roomName);
  }
}

function joinSubmitted(e: SubmitEvent): void {
  e.preventDefault();
  const nick = normalizeNick(ui.nick.value);
  const roomName = normalizeRoom(ui.room.value);
  const error = nickError(nick) ?? roomError(roomName);
  if (error) {
    ui.joinError.textContent = error;
    ui.joinError.hidden = false;
    return;
  }
  localStorage.setItem(NICK_KEY, nick);
  if (location.hash === `#${roomName}`) {
    void enter(roomName, nick);
  } else {
    location.hash = roomName; // hashchange opens it
  }
}

function autosize(): void {
  ui.text.style.height = "auto";
  ui.text.style.height = `${ui.text.scrollHeight}px`;
}

function sendTyped(): void {
  const text = ui.text.value;
  if (!room || text.trim() === "") return;
  const error = room.send(text);
  if (error) {
    setNotice(error);
    return;
  }
  ui.text.value = "";
  autosize();
  ui.text.focus();
}

async function main(): Promise<void> {
  await init();
  window.ivyDebug = () => ({
    client: (client?.debugState() as object | undefined) ?? null,
    room: room?.debugState() ?? null,
    people: people?.debugState() ?? null,
  });

  ui.joinForm.addEventListener("submit", joinSubmitted);
  ui.room.addEventListener("input", () => (ui.joinError.hidden = true));
  ui.nick.addEventListener("input", () => (ui.joinError.hidden = true));
  ui.leave.onclick = () => {
    history.pushState(null, "", location.pathname + location.search);
    showJoin(room?.path.slice("/chat/".length) ?? "");
  };
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    sendTyped();
  });
  // Enter sends, Shift+Enter makes a new line; on touch screens Enter is a new line and the
  // Send button sends.
  const touch = matchMedia("(pointer: coarse)").matches;
  ui.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touch) {
      e.preventDefault();
      sendTyped();
    }
  });
  ui.text.addEventListener("input", autosize);
  window.addEventListener("hashchange", route);
  route();
}

main().catch((e: unknown) => {
  document.body.textContent = `Ivy chat could not start: ${errorText(e)}`;
  throw e;
});
