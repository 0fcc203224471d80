// The scenario of the fresh-app test (e2e/package.test.mjs): what a new user's first page does,
// with no `await init()` and no Vite configuration. The result, as JSON, goes into #result
// (and `window.ivyResult`); every check that fails is listed in `failures`.
import { IvyClient, type IvyError, type IvyEvent, type IvyStatus, type IvyStatusReason, type IvyTimestamp } from "ivy-client-wasm";

declare global {
  interface Window {
    ivyResult?: unknown;
  }
}

const failures: string[] = [];
function check(ok: boolean, what: string): void {
  if (!ok) failures.push(what);
}

async function until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function code(f: () => unknown): string {
  try {
    f();
    return "no error";
  } catch (e) {
    return `${(e as IvyError).code}: ${(e as IvyError).message}`;
  }
}

async function run(): Promise<object> {
  // The server that served this page (a relative URL), or ?server=... (the Vite dev server).
  const server = new URLSearchParams(location.search).get("server") ?? "/";
  const path = `/fresh/${Math.floor(Math.random() * 1e9)}`;

  // Created at once: no init step.
  const client = new IvyClient(server, { maxBackoffMs: 2000 });
  const statuses: [IvyStatus, string][] = [];
  const removed: IvyStatus[] = [];
  client.onStatus((s: IvyStatus, r: IvyStatusReason) => statuses.push([s, r.code]));
  const remove = client.onStatus((s) => removed.push(s));
  remove();
  // A throwing status listener is reported, and the others still run.
  client.onStatus(() => {
    throw new Error("status listener boom");
  });
  const reported: string[] = [];
  client.onError((e) => reported.push(e instanceof Error ? e.message : String(e)));

  // The first event's callback throws: reported, and delivery goes on.
  const got: IvyEvent[] = [];
  const sub = client.subscribe(
    path,
    (e) => {
      got.push(e);
      if (got.length === 1) throw new Error("callback boom");
    },
    { from: "beginning" },
  );
  await client.ready(10_000);
  check(client.status === "connected", `status ${client.status}`);
  const ts1: IvyTimestamp = await client.send(path, "one");
  const ts2 = await client.send(`${path}/x`, "two");
  await until(() => got.length >= 2, "two events");
  check(got[0]?.ts === ts1 && got[1]?.ts === ts2, `events ${JSON.stringify(got)}`);
  check(got[1]?.data === "two" && got[1]?.path === `${path}/x`, "second event");
  // Resuming after a timestamp: the type of `from` accepts it.
  const after: IvyEvent[] = [];
  const sub2 = client.subscribe(path, (e) => after.push(e), { from: ts1 });
  await until(() => after.length >= 1, "resumed subscription");
  check(after.length === 1 && after[0]?.ts === ts2, `resumed ${JSON.stringify(after)}`);
  sub2.unsubscribe();
  const log = await client.log(path);
  check(log.length === 2, `log ${log.length}`);
  check(reported.includes("callback boom") && reported.includes("status listener boom"), `reported ${JSON.stringify(reported)}`);

  // A send over the server's message size limit (65,536 bytes by default) is refused at once,
  // certainly not stored, and the connection stays (the status list shows no reconnect).
  const bigPath = `/fresh-big/${Math.floor(Math.random() * 1e9)}`;
  const outcome = (p: Promise<unknown>) => p.then(() => "sent", (e: IvyError) => `${e.code} ${e.uncertain}`);
  check((await outcome(client.send(bigPath, "x".repeat(70_000)))) === "too-large false", "a 70,000-byte send is too large");
  check(client.status === "connected", `status after the large send: ${client.status}`);
  check(typeof (await client.send(bigPath, "z".repeat(60_000))) === "string", "a 60,000-byte send is stored");
  const small = new IvyClient(server, { maxMessageSize: 100 });
  await small.ready();
  const over = await outcome(small.send(bigPath, "y".repeat(100)));
  check(over === "too-large false", `over maxMessageSize: ${over}`);
  check(small.status === "connected", "maxMessageSize: connection kept");
  small.close();

  // A send queued while offline that finds no connection in time was never written: it is
  // rejected as certainly not stored.
  const dead = new URLSearchParams(location.search).get("dead");
  const offline = new IvyClient(`ws://127.0.0.1:${dead}`, { requestTimeoutMs: 300 });
  const queued = await outcome(offline.send("/fresh/offline", "never written"));
  check(queued === "not-connected false", `queued send after requestTimeoutMs: ${queued}`);
  // Never connected: "connecting" through its retries, the reason the last failure.
  const why = offline.statusReason;
  check(offline.status === "connecting" && why.code === "connect-failed" && why.closeCode === 1006, `offline: ${offline.status} ${JSON.stringify(why)}`);
  offline.close();

  // The async factory resolves once connected.
  const made = await IvyClient.connect(server);
  check(made.status === "connected", `connect(): ${made.status}`);
  made.close();

  // The log in pages, with the cursor of the next one.
  const logPath = `/fresh-log/${Math.floor(Math.random() * 1e9)}`;
  const tss: IvyTimestamp[] = [];
  for (let i = 0; i < 5; i++) tss.push(await client.send(`${logPath}/${i}`, `e${i}`));
  const first = await client.log(logPath, { limit: 2 });
  check(first.length === 2 && first.next === tss[1], `first page: ${first.length} events, next ${first.next}`);
  const pages: string[][] = [];
  for await (const page of client.logPages(logPath, { limit: 2 })) pages.push(page.map((e) => e.ts));
  check(JSON.stringify(pages) === JSON.stringify([tss.slice(0, 2), tss.slice(2, 4), tss.slice(4)]), `pages ${JSON.stringify(pages)}`);
  const whole = await client.log(logPath);
  check(whole.length === 5 && whole.next === null, `default page: ${whole.length} events, next ${whole.next}`);
  const lastTwo = await client.log(logPath, { n: 2 });
  check(lastTwo.length === 2 && lastTwo[1]?.ts === tss[4] && lastTwo.next === null, "the last two");

  // Options are checked.
  const errors = {
    negative: code(() => new IvyClient(server, { maxBackoffMs: -5 })),
    string: code(() => new IvyClient(server, { connectTimeoutMs: "5" as unknown as number })),
    unknown: code(() => new IvyClient(server, { maxBackofMs: 5 } as unknown as object)),
    scheme: code(() => new IvyClient("ftp://example.com")),
    from: code(() => client.subscribe(path, () => {}, { from: 5 as unknown as "now" })),
  };

  // Without an onError listener, a callback's exception goes to the page (reportError).
  const other = new IvyClient(server);
  const otherGot: string[] = [];
  other.subscribe(path, (e) => {
    otherGot.push(e.data);
    throw new Error("unhooked boom");
  }, { from: "beginning" });
  await until(() => otherGot.length >= 2, "the other client's events");
  other.close();

  sub.unsubscribe();
  client.close();
  const closedReady = await client.ready().then(
    () => "resolved",
    (e: IvyError) => e.code,
  );
  check(closedReady === "closed", `ready() after close: ${closedReady}`);
  check(client.status === "closed", `status after close ${client.status}`);
  check(removed.length === 0, `removed listener called ${removed.length} times`);
  return { failures, statuses, reported, errors, subPath: sub.path };
}

/** `?mode=status`: a client whose status changes the test provokes (server stopped, killed). */
function statusMode(): void {
  const server = new URLSearchParams(location.search).get("server") ?? "/";
  const client = new IvyClient(server, { minBackoffMs: 50, maxBackoffMs: 300 });
  const statuses: [IvyStatus, string, number | null][] = [];
  window.ivyResult = statuses;
  client.onStatus((s, r) => statuses.push([s, r.code, r.closeCode ?? null]));
}

if (new URLSearchParams(location.search).get("mode") === "status") statusMode();
else run().then(
  (r) => {
    window.ivyResult = r;
    document.getElementById("result")!.textContent = JSON.stringify(r);
  },
  (e: unknown) => {
    window.ivyResult = { failures: [...failures, `threw: ${e instanceof Error ? e.stack ?? e.message : String(e)}`] };
    document.getElementById("result")!.textContent = JSON.stringify(window.ivyResult);
  },
);
