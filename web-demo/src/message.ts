// Chat messages on the wire, names, and small formatting helpers (no DOM, no client).

import type { IvySender } from "ivy-client-wasm";

/** What a chat message carries as its event data (JSON). `id` lets the sender recognize
 * its own message when it comes back through the subscription; other clients ignore it. */
export interface ChatData {
  nick: string;
  text: string;
  id?: string;
}

/** Who sent an event, as the server verified it (the client's `senders` option): a token's
 * `sub`, a connection without a token, the server's embedding application, or unknown (an
 * event stored before the server recorded senders). */
export type Sender = IvySender;

/** A message as the room displays it. */
export interface ChatMessage {
  ts: string;
  path: string;
  /** The name shown: the verified sender's `sub` when there is one, else the nickname the
   * data carries (which anybody could have written). */
  nick: string;
  text: string;
  id?: string;
  /** The server vouches for `nick` (the sender's token). */
  verified: boolean;
  /** The data was not a chat message (sent by another tool): shown as is. */
  raw: boolean;
}

/** Room names are one path segment under /chat (the protocol's path characters). */
export const ROOM_PATTERN = /^[0-9a-z.-]{1,64}$/;

export const NICK_MAX = 32;

/** The largest event data the demo sends, in UTF-8 bytes (the server's default limit is
 * 65536 bytes for the whole command, path and ack key included). */
export const MAX_DATA_BYTES = 60_000;

export function roomPath(room: string): string {
  return `/chat/${room}`;
}

/** A typed room name, lowercased and trimmed; spaces become dashes. */
export function normalizeRoom(input: string): string {
  return input.trim().toLowerCase().replace(/\s+/g, "-");
}

export function roomError(room: string): string | null {
  if (room === "") return "Pick a room.";
  if (!ROOM_PATTERN.test(room)) return "A room name may only contain a-z, 0-9, '.' and '-' (at most 64).";
  if (room === "." || room === "..") return "Pick a room name with a letter or digit.";
  return null;
}

export function normalizeNick(input: string): string {
  return input.trim().replace(/\s+/g, " ");
}

export function nickError(nick: string): string | null {
  if (nick === "") return "Pick a nickname.";
  if ([...nick].length > NICK_MAX) return `A nickname has at most ${NICK_MAX} characters.`;
  return null;
}

export function encode(data: ChatData): string {
  return JSON.stringify(data);
}

export function dataBytes(data: string): number {
  return new TextEncoder().encode(data).length;
}

/** Parses event data; anything that is not a chat message is kept as raw text. The name shown
 * is the verified sender's when the server gave one (`sender`), whatever the data says. */
export function decode(ts: string, path: string, data: string, sender?: Sender): ChatMessage {
  const verified = sender?.kind === "user" ? sender.sub : undefined;
  try {
    const v: unknown = JSON.parse(data);
    if (v !== null && typeof v === "object" && typeof (v as { text?: unknown }).text === "string") {
      const o = v as { nick?: unknown; text: string; id?: unknown };
      const claimed = typeof o.nick === "string" && o.nick.trim() !== "" ? o.nick : "anonymous";
      const nick = verified ?? (sender?.kind === "application" ? "server" : claimed);
      const id = typeof o.id === "string" ? o.id : undefined;
      return { ts, path, nick, text: o.text, id, verified: verified !== undefined, raw: false };
    }
  } catch {
    // not JSON: fall through
  }
  return { ts, path, nick: verified ?? "", text: data, verified: verified !== undefined, raw: true };
}

/** A random id (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function newId(): string {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Seconds of an Ivy timestamp ("1700000000.000000001"). */
export function tsSeconds(ts: string): number {
  return Number(ts.slice(0, ts.indexOf(".")));
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

/** "14:03" today, "Mar 4, 14:03" otherwise. */
export function shortTime(ts: string, now = new Date()): string {
  const d = new Date(tsSeconds(ts) * 1000);
  return d.toDateString() === now.toDateString() ? timeFmt.format(d) : dateTimeFmt.format(d);
}

export function fullTime(ts: string): string {
  return fullFmt.format(new Date(tsSeconds(ts) * 1000));
}

/** Initials-free avatar colour: a stable hue per nickname. */
export function nickHue(nick: string): number {
  let h = 0;
  for (const c of nick) h = (h * 31 + (c.codePointAt(0) ?? 0)) % 360;
  return h;
}
