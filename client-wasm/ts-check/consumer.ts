// A small consumer of the package, type-checked with `tsc --noEmit --strict` against the
// generated .d.ts (scripts/test-wasm.sh). It is not run: it proves the types are complete.
import init, {
  tokenExp, IvyClient, IvySubscription, type IvyError, type IvyErrorCode, type IvyEvent, type IvyStatus, type IvyOptions, type LogOptions,
  type IvyStatusReason, type IvyTimestamp, type IvySender,
  IvyPresence, type IvyPresenceEvent, type IvyPresenceView, type IvyMember,
} from "ivy-client-wasm";

export async function demo(): Promise<string> {
  await init();
  const options: IvyOptions = { minBackoffMs: 100, maxBackoffMs: 5000, offlineQueue: 10 };
  const client: IvyClient = new IvyClient("ws://127.0.0.1:8080", options);
  const statuses: IvyStatus[] = [];
  client.onStatus((s: IvyStatus) => statuses.push(s));
  // Listeners are removable; each change has a reason.
  const off: () => void = client.onStatus((s: IvyStatus, r: IvyStatusReason) => console.log(s, r.code, r.message, r.closeCode));
  off();
  const offErrors: () => void = client.onError((e: unknown) => console.error(e));
  offErrors();
  await client.ready(5000);
  const connected: IvyClient = await IvyClient.connect("/", { requestTimeoutMs: 1000, senders: true });
  const why: IvyStatusReason = connected.statusReason;
  const current: IvyStatus = client.status;
  const seen: IvyEvent[] = [];
  const sub: IvySubscription = client.subscribe("/chat/room1", (e: IvyEvent) => {
    const ts: IvyTimestamp = e.ts;
    const path: string = e.path;
    const data: string = e.data;
    // With `senders: true`: who sent it, as the server verified it.
    const sender: IvySender | undefined = e.sender;
    if (sender?.kind === "user") console.log(sender.sub);
    seen.push({ ts, path, data });
  }, { from: "beginning", onError: (err: Error) => console.warn(err.message) });
  const path: string = sub.path;
  // Options are optional everywhere.
  const bare = new IvyClient("ws://127.0.0.1:8080");
  bare.subscribe("/chat", (e) => seen.push(e)).unsubscribe();
  void bare.log("/chat");
  const ts: IvyTimestamp = await client.send(path, "hello");
  // `from` takes a timestamp as well as "now" and "beginning".
  client.subscribe(path, () => {}, { from: ts }).unsubscribe();
  const asString: string = ts;
  const ts2: string = await client.send(path, new TextEncoder().encode("bytes"));
  const query: LogOptions = { after: ts, limit: 10 };
  const page: IvyEvent[] = await client.log("/chat", query);
  const last: IvyEvent[] = await client.log("/chat", { n: 5 });
  const now: string = await client.timestamp();
  // Errors carry a code and whether a failed send may have been stored.
  client.subscribe("/chat", () => {}, {
    onError: (err: IvyError) => {
      const code: IvyErrorCode = err.code;
      const message: string = err.message;
      console.warn(code === "continuity-lost" ? "gap" : message);
    },
  });
  try {
    await client.send(path, "again");
  } catch (e) {
    const err = e as IvyError;
    const uncertain: boolean = err.uncertain;
    const status: number | undefined = err.status;
    if (uncertain || err.code === "too-many-subscriptions" || status === 400) console.warn(err.code);
  }
  sub.unsubscribe();
  client.close();
  // @ts-expect-error: data must be a string or bytes
  void client.send(path, 42);
  // @ts-expect-error: the callback receives an IvyEvent
  client.subscribe("/x", (e: number) => e);
  // @ts-expect-error: `from` is "now", "beginning" or a timestamp
  client.subscribe("/x", () => {}, { from: "yesterday" });
  // @ts-expect-error: no free(): close() is the one way to end a client
  client.free();
  // @ts-expect-error: unknown options are refused
  void new IvyClient("/", { maxBackofMs: 5 });
  // Tokens: a static one, a provider (sync or async, null for none), and the final status.
  const getToken = async (): Promise<string | null> => (await fetch("/token")).text();
  const authed = new IvyClient("/", { token: "a.b.c", getToken, requestTimeoutMs: 1000 });
  void new IvyClient("/", { getToken: () => null });
  const exp: number | undefined = tokenExp("a.b.c");
  authed.onStatus((s) => {
    if (s === "unauthorized") console.warn(authed.statusReason.code === "unauthorized", exp);
  });
  const tokenCodes: IvyErrorCode[] = ["forbidden", "unauthorized", "subscription-ended"];
  // @ts-expect-error: a token is a string
  void new IvyClient("/", { token: 42 });
  // @ts-expect-error: getToken returns a token (or a promise of one)
  void new IvyClient("/", { getToken: () => 42 });
  // Presence: a live watch with a handle, and a one-off query.
  const names: string[] = [];
  const watch: IvyPresence = client.presence("/chat/room1", (e: IvyPresenceEvent) => {
    if (e.type === "snapshot") names.push(...e.view.members.map((m: IvyMember) => m.sub ?? `anon ${m.anon}`));
    else if (e.type === "join") names.push(e.member.sub ?? e.member.anon);
    else if (e.type === "leave") console.log("left", e.member.sub, e.member.conns);
    else if (e.type === "count") console.log(e.count);
    else console.warn(e.error.code);
  });
  const nick: unknown = watch.view.members[0]?.info?.nick;
  const watched: string = watch.path;
  watch.stop();
  const here: IvyPresenceView = await client.who("/chat");
  const complete: boolean = here.complete;
  // @ts-expect-error: the callback receives an IvyPresenceEvent
  client.presence("/x", (e: string) => e);
  // @ts-expect-error: an event of type "count" has no member
  client.presence("/x", (e) => e.type === "count" && e.member);
  return [current, ts, ts2, now, asString, why.code, String(page.length + last.length), tokenCodes.join(), String(nick), watched, String(here.count + Number(complete))].join(" ");
}
