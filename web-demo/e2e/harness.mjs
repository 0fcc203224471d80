// Helpers of the browser end-to-end tests: a real ivy-server (the built binary) serving the
// built demo, Debian's Chromium driven by playwright-core, and readers for what the pages show
// and what the server stored.

import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, existsSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createServer, connect } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const demoDir = resolve(here, "..");
export const repoRoot = resolve(demoDir, "..");
export const distDir = process.env.IVY_DEMO_DIST ?? join(demoDir, "dist");
export const outputDir = process.env.E2E_OUTPUT ?? join(here, "output");

/** How long to wait for something that should happen. */
export const WAIT = 20_000;

/** Added to every byte between the pages and the server, in ms, by a proxy (`E2E_LATENCY_MS`,
 * for the stress mode; 0: the pages connect directly). */
export const LATENCY = Number(process.env.E2E_LATENCY_MS ?? 0);

/** The server's log filter: every connection, command, reply, commit and log request of the
 * server at trace level, kept in memory and printed when a test fails. */
const SERVER_LOG = process.env.RUST_LOG ?? "warn,ivy_server=trace";

/** Lines of each server's log kept for the diagnostics. */
const SERVER_LOG_LINES = 400;
/** Console lines of each page kept for the diagnostics. */
const CONSOLE_LINES = 100;

/**
 * What a failing test prints: the servers and pages of the current test (see
 * `beginDiagnostics`, `diagnostics`).
 */
const diag = { name: "", servers: /** @type {any[]} */ ([]), pages: /** @type {any[]} */ ([]) };

/** Starts collecting the servers and pages of the test `name` for `diagnostics()`. */
export function beginDiagnostics(name) {
  diag.name = name;
  diag.servers = [];
  diag.pages = [];
}

/** Keeps the last `max` items pushed. */
function ring(max) {
  const items = [];
  let total = 0;
  return {
    push(item) {
      total++;
      items.push(item);
      if (items.length > max) items.shift();
    },
    lines: () => items.slice(),
    get total() {
      return total;
    },
  };
}

const t0 = Date.now();
/** Seconds since the harness started, for lines collected from pages and servers. */
function stamp() {
  return `+${((Date.now() - t0) / 1000).toFixed(3)}s`;
}

function targetDir() {
  return process.env.CARGO_TARGET_DIR ? resolve(repoRoot, process.env.CARGO_TARGET_DIR) : join(repoRoot, "target");
}

/** A binary of the workspace: `$IVY_<NAME>_BIN`, else target/debug, else target/release. */
export function binary(name) {
  const env = process.env[`IVY_${name.toUpperCase().replace(/-/g, "_")}_BIN`];
  if (env) return env;
  for (const profile of ["debug", "release"]) {
    const p = join(targetDir(), profile, name);
    if (existsSync(p)) return p;
  }
  throw new Error(`${name} not built: run \`cargo build -p ivy-server -p ivy-client-native --bins\` (looked in ${targetDir()})`);
}

/** A fresh temporary directory, removed by the returned function. */
export function tempDir(prefix = "ivy-e2e-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** The HMAC secret of the servers started with auth (one per test run, the same across a
 * server's restarts, so that the pages' tokens stay valid). */
export const SECRET = `e2e-${randomBytes(16).toString("hex")}`;

/** The flags of the demo with auth on, as `scripts/run.sh` starts it: tokens signed with
 * `SECRET`, the demo-only token endpoint, the chat readable without a token. */
export const AUTH_FLAGS = ["--auth-hmac-secret", SECRET, "--demo-token-endpoint", "--anonymous-read", "/chat"];

/**
 * Starts `ivy-server --listen 127.0.0.1:PORT --data DIR --static-dir web-demo/dist` and waits
 * for its first stdout line, `ivy-server listening on http://ADDR`. Port 0 picks a free port;
 * a restart passes the port it had, so that open pages reconnect to it. `staticDir`: what it
 * serves (the built demo by default). `auth`: with `AUTH_FLAGS` (by default for the demo, as
 * `scripts/run.sh` runs it); `args`: more flags.
 */
export async function startServer(dataDir, port = 0, staticDir = distDir, { auth = staticDir === distDir, args = [] } = {}) {
  if (!existsSync(join(staticDir, "index.html"))) throw new Error(`${staticDir}/index.html missing: build the demo first (npm run build)`);
  const flags = [...(auth ? AUTH_FLAGS : []), ...args];
  const deadline = Date.now() + WAIT;
  for (;;) {
    try {
      return await spawnServer(dataDir, port, staticDir, flags);
    } catch (e) {
      // Right after a kill the port can still be busy for a moment.
      if (port === 0 || Date.now() > deadline) throw e;
      await sleep(200);
    }
  }
}

/** Latency proxies by server port, kept across restarts on the same port (see `LATENCY`). */
const latencyProxies = new Map();

function spawnServer(dataDir, port, staticDir, flags) {
  return new Promise((resolvePromise, reject) => {
    const proc = spawn(binary("ivy-server"), ["--listen", `127.0.0.1:${port}`, "--data", dataDir, "--static-dir", staticDir, ...flags], {
      env: { ...process.env, RUST_LOG: SERVER_LOG, NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    const log = ring(SERVER_LOG_LINES);
    createInterface({ input: proc.stderr }).on("line", (line) => {
      if (stderr.length < 4096) stderr += `${line}\n`;
      log.push(line);
      if (process.env.E2E_VERBOSE) process.stderr.write(`${line}\n`);
    });
    const lines = createInterface({ input: proc.stdout });
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`ivy-server did not start in time: ${stderr}`));
    }, WAIT);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`ivy-server exited with ${code}: ${stderr.trim()}`));
    });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = /listening on http:\/\/(\S+)$/.exec(line);
      if (!m) {
        proc.kill("SIGKILL");
        reject(new Error(`unexpected first line ${JSON.stringify(line)}`));
        return;
      }
      const addr = m[1];
      const exited = new Promise((r) => proc.once("exit", (code, signal) => r(signal ?? code)));
      const server = {
        addr,
        port: Number(addr.slice(addr.lastIndexOf(":") + 1)),
        url: `http://${addr}`,
        /** Where pages connect: the server, or its latency proxy in the stress mode. */
        clientUrl: `http://${addr}`,
        pid: proc.pid,
        started: stamp(),
        /** The last lines of its log (stderr). */
        log,
        exit: /** @type {string | null} */ (null),
        /** SIGKILL: no flush, no close frames; the pages see their connections drop. */
        async kill() {
          proc.kill("SIGKILL");
          await exited;
        },
        /** SIGTERM: graceful shutdown. */
        async stop() {
          if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
          await exited;
        },
      };
      void exited.then((how) => (server.exit = `${stamp()} (${how})`));
      const ready = LATENCY > 0 ? latencyProxy(server.port) : Promise.resolve(undefined);
      void ready.then(
        (proxy) => {
          if (proxy) server.clientUrl = proxy.url;
          diag.servers.push(server);
          resolvePromise(server);
        },
        (e) => {
          proc.kill("SIGKILL");
          reject(e);
        },
      );
    });
  });
}

async function latencyProxy(port) {
  let proxy = latencyProxies.get(port);
  if (!proxy) {
    proxy = await startProxy(port, { latencyMs: LATENCY, unref: true });
    latencyProxies.set(port, proxy);
  }
  return proxy;
}

/**
 * A TCP proxy on 127.0.0.1 between pages and the server that can hold back the bytes of one
 * direction ("up": page to server, "down": server to page) and cut every open connection, to
 * lose a request or its reply on purpose. New connections after a cut go through normally.
 * `latencyMs` delays every chunk by that much plus up to half as much again at random, in
 * order within each direction (the stress mode's network). `unref`: the proxy does not keep
 * the process alive.
 */
export async function startProxy(upstreamPort, { latencyMs = 0, unref = false } = {}) {
  /** @type {Set<{ client: import("node:net").Socket, server: import("node:net").Socket }>} */
  const pairs = new Set();
  const hold = { up: false, down: false };
  const proxy = createServer((client) => {
    const server = connect(upstreamPort, "127.0.0.1");
    const pair = { client, server };
    pairs.add(pair);
    const forward = (from, to, dir) => {
      // Delayed chunks of this direction, oldest first, written by one timer at a time: timers
      // of different durations due in the same millisecond may fire in any order, and a
      // reordered chunk would corrupt the stream.
      /** @type {{ due: number, chunk: Buffer }[]} */
      const queue = [];
      let timer = null;
      const flush = () => {
        timer = null;
        while (queue.length > 0 && queue[0].due <= Date.now()) {
          const { chunk } = /** @type {{ due: number, chunk: Buffer }} */ (queue.shift());
          if (!to.destroyed) to.write(chunk);
        }
        if (queue.length > 0) timer = setTimeout(flush, queue[0].due - Date.now());
      };
      from.on("data", (chunk) => {
        if (hold[dir]) return; // held bytes are dropped: the cut that follows loses them
        if (latencyMs <= 0) {
          to.write(chunk);
          return;
        }
        // Never before the previous chunk of this direction.
        const last = queue.length > 0 ? queue[queue.length - 1].due : 0;
        queue.push({ due: Math.max(last, Date.now() + latencyMs + Math.random() * latencyMs * 0.5), chunk });
        if (timer === null) timer = setTimeout(flush, queue[0].due - Date.now());
      });
    };
    forward(client, server, "up");
    forward(server, client, "down");
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      server.destroy();
    };
    client.on("close", end).on("error", end);
    server.on("close", end).on("error", end);
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", () => r(undefined)));
  if (unref) proxy.unref();
  const address = proxy.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    /** Drops the bytes of `dir` from now on (until `release`). */
    hold(dir) {
      hold[dir] = true;
    },
    release() {
      hold.up = false;
      hold.down = false;
    },
    /** Closes every open connection (both sides see it end). */
    cutAll() {
      for (const { client, server } of pairs) {
        client.destroy();
        server.destroy();
      }
      pairs.clear();
    },
    close() {
      this.cutAll();
      return new Promise((r) => proxy.close(() => r(undefined)));
    },
  };
}

/** A free TCP port of 127.0.0.1 (the system's pick), for the processes that cannot take
 * port 0 and say which they got: redis-server, haproxy. */
export async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", () => r(undefined)));
  const address = s.address();
  const port = typeof address === "object" && address ? address.port : 0;
  await new Promise((r) => s.close(() => r(undefined)));
  return port;
}

/**
 * Spawns a helper process (redis-server, haproxy) whose output is kept for the diagnostics,
 * listed there as a server of the test (`what`, `addr`); `ready()` is polled until it resolves
 * true (or the process exits, or `WAIT` passes). Returns the server-like object the
 * diagnostics print, with `kill` and `stop`.
 */
async function startHelper(what, command, args, addr, ready) {
  const proc = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
  const log = ring(SERVER_LOG_LINES);
  for (const stream of [proc.stdout, proc.stderr]) {
    createInterface({ input: stream }).on("line", (line) => {
      log.push(`${what}: ${line}`);
      if (process.env.E2E_VERBOSE) process.stderr.write(`${what}: ${line}\n`);
    });
  }
  let exit = /** @type {string | null} */ (null);
  const exited = new Promise((r) =>
    proc.once("exit", (code, signal) => {
      exit = `${stamp()} (${signal ?? code})`;
      r(undefined);
    }),
  );
  const helper = {
    addr,
    port: Number(addr.slice(addr.lastIndexOf(":") + 1)),
    url: `http://${addr}`,
    clientUrl: `http://${addr}`,
    pid: proc.pid,
    started: stamp(),
    log,
    get exit() {
      return exit;
    },
    async kill() {
      proc.kill("SIGKILL");
      await exited;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await exited;
    },
  };
  diag.servers.push(helper);
  const deadline = Date.now() + WAIT;
  for (;;) {
    if (exit !== null) throw new Error(`${what} exited ${exit}: ${log.lines().join("\n")}`);
    if (await ready().catch(() => false)) return helper;
    if (Date.now() > deadline) {
      await helper.kill();
      throw new Error(`${what} did not get ready in time: ${log.lines().join("\n")}`);
    }
    await sleep(50);
  }
}

/**
 * Starts Debian's `redis-server` on a free port of 127.0.0.1 with its files in `dir`, as
 * `./scripts/run.sh --nodes N` and the Rust tests (`ivy_tests::RedisServer`) start it:
 * `appendonly yes`, `appendfsync always` (an ack means the event is on disk), no snapshots.
 * Ready once it answers PING. `url`: what `ivy-server --redis` takes.
 */
export async function startRedis(dir) {
  const port = await freePort();
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always"];
  args.push("--save", "", "--protected-mode", "no", "--loglevel", "warning");
  const ping = () =>
    new Promise((resolvePromise) => {
      const c = connect(port, "127.0.0.1");
      let got = "";
      c.on("connect", () => c.write("PING\r\n"));
      c.on("data", (d) => {
        got += d;
        if (got.includes("\r\n")) {
          c.destroy();
          resolvePromise(got.startsWith("+PONG"));
        }
      });
      c.on("error", () => resolvePromise(false));
    });
  const redis = await startHelper("redis-server", "redis-server", args, `127.0.0.1:${port}`, ping);
  return Object.assign(redis, { url: `redis://127.0.0.1:${port}` });
}

/**
 * Starts the demo's load balancer in front of `servers` on a free port of 127.0.0.1: Debian's
 * `haproxy` with the configuration `scripts/haproxy-demo.sh` writes (the one of
 * `./scripts/run.sh --nodes N`: TCP, round robin, `/readyz` checked every 500 ms, a dead node
 * skipped). Ready once a `GET /readyz` through it answers 200. Pages open its `url` as a
 * server's (`joinRoom`).
 */
export async function startBalancer(servers, dir) {
  const port = await freePort();
  const addr = `127.0.0.1:${port}`;
  const config = execFileSync("bash", [join(repoRoot, "scripts", "haproxy-demo.sh"), addr, ...servers.map((s) => s.addr)], { encoding: "utf8" });
  const file = join(dir, "haproxy.cfg");
  writeFileSync(file, config);
  const haproxy = existsSync("/usr/sbin/haproxy") ? "/usr/sbin/haproxy" : "haproxy";
  const ready = async () => (await fetch(`http://${addr}/readyz`, { signal: AbortSignal.timeout(2000) })).status === 200;
  return startHelper("haproxy", haproxy, ["-db", "-f", file], addr, ready);
}

/** Debian's Chromium, headless, with the flags this machine needs (see shared/GUIDE.md). */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

export const PHONE = { viewport: { width: 390, height: 780 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };
export const DESKTOP = { viewport: { width: 1100, height: 760 } };

/** A new browser context (its own storage, like another person) with one page; console
 * errors and page errors are collected on `page.errors`, every console line (the last 100) on
 * `page.consoleLines` for the diagnostics. */
export async function openPage(browser, options = DESKTOP) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const errors = [];
  const consoleLines = ring(CONSOLE_LINES);
  page.on("pageerror", (e) => {
    errors.push(`pageerror: ${e.message}`);
    consoleLines.push(`${stamp()} pageerror: ${e.stack ?? e.message}`);
  });
  page.on("console", (m) => {
    consoleLines.push(`${stamp()} ${m.type()}: ${m.text()}`);
    // Chromium logs every refused connection attempt itself while the server is down, and
    // every answer with an error status: the demo's token endpoint refusing a taken nickname
    // (409) or missing (404, 405), a handshake refusing a token and the client's fetch that
    // learns why (401).
    const expected =
      /^WebSocket connection to .* failed|^Failed to load resource: net::ERR_CONNECTION_REFUSED|^Failed to load resource: the server responded with a status of (401|404|405|409)/;
    if (m.type() === "error" && !expected.test(m.text())) errors.push(`console: ${m.text()}`);
  });
  page.on("crash", () => consoleLines.push(`${stamp()} the page crashed`));
  const p = Object.assign(page, { errors, consoleLines, label: `page ${diag.pages.length + 1}` });
  diag.pages.push(p);
  return p;
}

/** Opens the demo, picks `nick` and `room` in the join form, waits until the room is ready.
 * In the stress mode (`E2E_LATENCY_MS`) the page connects through the server's latency proxy
 * unless `query` names a server. */
export async function joinRoom(page, server, nick, room, query = "") {
  page.label = `page ${diag.pages.indexOf(page) + 1} (${nick})`;
  if (server.clientUrl !== server.url && !query.includes("server=")) {
    query = `${query ? `${query}&` : "?"}server=${encodeURIComponent(server.clientUrl)}`;
  }
  await page.goto(`${server.url}/${query}#${room}`);
  await page.locator("#nick").fill(nick);
  await page.locator("#room").fill(room);
  await page.locator("#join-button").click();
  await waitReady(page);
}

/** The room shows its history and is subscribed; the connection is up. */
export async function waitReady(page) {
  await waitFor(page, '#chat[data-ready="true"]', "waitReady");
  await waitStatus(page, "connected");
}

export async function waitStatus(page, status) {
  await waitFor(page, `#status[data-status="${status}"]`, `waitStatus(${status})`);
}

/** Waits until `selector` matches; a timeout fails with the diagnostics. */
export async function waitFor(page, selector, what = `waitFor(${selector})`) {
  await diagnosed(`${what} on ${page.label}`, page.locator(selector).waitFor({ timeout: WAIT }));
}

/** Types `text` into the composer and presses Send. */
export async function say(page, text) {
  await page.locator("#text").fill(text);
  await page.locator("#send").click();
}

/** The confirmed messages the page shows, in order. */
export async function shown(page) {
  return page.$$eval("#messages li.msg", (els) =>
    els.map((e) => ({
      ts: e.getAttribute("data-ts"),
      nick: e.getAttribute("data-nick"),
      text: e.querySelector(".text")?.textContent ?? null,
    })),
  );
}

/** Waits until the page shows `count` confirmed messages and none pending. */
export async function waitShown(page, count) {
  await diagnosed(
    `waitShown(${page.label}, ${count})`,
    page.waitForFunction(
      (n) => document.querySelectorAll("#messages li.msg").length === n && document.querySelectorAll("#pending li").length === 0,
      count,
      { timeout: WAIT },
    ),
  );
  return shown(page);
}

/**
 * Awaits `promise`; if it fails, fails with `what`, the original error and `diagnostics()` of
 * every page and server of the test (also written to the output directory).
 */
export async function diagnosed(what, promise) {
  try {
    return await promise;
  } catch (e) {
    throw await withDiagnostics(e, what);
  }
}

/** `e` with the diagnostics appended to its message (once), also saved to a file. */
export async function withDiagnostics(e, what = "the test failed") {
  const err = e instanceof Error ? e : new Error(String(e));
  if (/** @type {any} */ (err).diagnosed) return err;
  const text = await diagnostics();
  let file = "";
  try {
    mkdirSync(outputDir, { recursive: true });
    file = join(outputDir, `${diag.name || "test"}-diagnostics-${Date.now()}.txt`);
    writeFileSync(file, `${what}\n${err.stack ?? err.message}\n\n${text}\n`);
  } catch {
    file = "(not saved)";
  }
  // A new error: the test runner prints the stack, which holds the message it was made with.
  const out = new Error(`${what}: ${err.message}\n\n${text}\n(saved in ${file})\n`, { cause: err });
  return Object.assign(out, { diagnosed: true });
}

/** What each page of the current test knows and the servers' logs, as text. */
export async function diagnostics() {
  const out = [`==== diagnostics of "${diag.name}" at ${stamp()}`];
  for (const page of diag.pages) out.push(...(await pageDiagnostics(page)));
  for (const [i, s] of diag.servers.entries()) {
    const lines = s.log.lines();
    out.push(
      `---- server ${i + 1}: ${s.addr} (pid ${s.pid}) started ${s.started}${s.exit ? `, exited ${s.exit}` : ", running"}; clients via ${s.clientUrl}`,
      `  log (last ${lines.length} of ${s.log.total} lines):`,
      ...lines.map((l) => `  ${l}`),
    );
  }
  return out.join("\n");
}

/** One page: what it shows, `window.ivyDebug()` (the client and the room), its console. */
async function pageDiagnostics(page) {
  const out = [`---- ${page.label}: ${page.isClosed() ? "closed" : page.url()}`];
  if (!page.isClosed()) {
    const state = await Promise.race([
      page
        .evaluate(() => {
          const q = (s) => document.querySelector(s);
          const msgs = Array.from(document.querySelectorAll("#messages li.msg"));
          let debug;
          try {
            const w = /** @type {any} */ (window);
            debug = typeof w.ivyDebug === "function" ? w.ivyDebug() : "window.ivyDebug is missing";
          } catch (e) {
            debug = `ivyDebug() threw: ${e instanceof Error ? e.stack || e.message : String(e)}`;
          }
          return {
            dom: {
              status: q("#status")?.getAttribute("data-status") ?? null,
              ready: q("#chat")?.getAttribute("data-ready") ?? null,
              notice: q("#notice")?.hidden === false ? q("#notice")?.textContent : null,
              shown: msgs.length,
              last: msgs.slice(-3).map((e) => `${e.getAttribute("data-ts")} ${e.getAttribute("data-nick")}: ${e.querySelector(".text")?.textContent}`),
              pending: Array.from(document.querySelectorAll("#pending li")).map((e) => `${e.getAttribute("data-state")} ${e.getAttribute("data-id")}: ${e.querySelector(".text")?.textContent}`),
            },
            debug,
          };
        })
        .catch((e) => `evaluate failed: ${e instanceof Error ? e.message : String(e)}`),
      sleep(5000).then(() => "the page did not answer within 5 s"),
    ]);
    if (typeof state === "string") {
      out.push(`  ${state}`);
    } else {
      out.push(`  shows: ${JSON.stringify(state.dom)}`);
      out.push(...formatDebug(state.debug));
    }
  }
  const lines = page.consoleLines.lines();
  out.push(`  console (last ${lines.length} of ${page.consoleLines.total}):`, ...lines.map((l) => `    ${l}`));
  return out;
}

/** `ivyDebug()`'s object, readable: times relative to the page's clock now. */
function formatDebug(debug) {
  if (typeof debug !== "object" || debug === null) return [`  client: ${String(debug)}`];
  const { client, room } = debug;
  if (!client || typeof client !== "object" || !client.client) return [`  client: ${JSON.stringify(client)}`];
  const now = client.now;
  const rel = (t) => (typeof t === "number" ? `${t - now >= 0 ? "+" : ""}${Math.round(t - now)}ms` : "none");
  const c = client.client;
  const attempt = c.attempt !== null ? ` (attempt ${c.attempt})` : "";
  const out = [
    `  client: ${c.state}${attempt}; timers: connect ${rel(c.connectTimer)}, retry ${rel(c.retryTimer)}, idle ${rel(c.idleTimer)}, probe ${rel(c.probeTimer)}`,
  ];
  for (const s of c.subscriptions) {
    const backfill = s.phase === "backfilling" ? `, complete ${s.complete}, target ${s.target}` : s.target ? `, forgotten up to ${s.target}` : "";
    const page = s.page
      ? `, page #${s.page.id} after ${s.page.after ?? "the beginning"} in flight (deadline ${rel(s.pageDeadline)})`
      : s.pageRetry !== null
        ? `, page retry ${rel(s.pageRetry)}`
        : "";
    const failures = s.pageFailures > 0 ? `, ${s.pageFailures} failed pages` : "";
    const hold = s.ownUnacked > 0 ? `, holding live events after ${s.released} for ${s.ownUnacked} own sends` : "";
    out.push(`    subscription ${s.id} ${s.path}: ${s.phase}, last ${s.last}${backfill}, ${s.buffered} buffered${page}${failures}${hold}`);
  }
  if (c.subscriptions.length === 0) out.push("    no subscription");
  for (const p of c.pending) {
    const what = [p.kind, p.request !== null ? `request ${p.request}` : "", p.path ?? "", p.sub !== null ? `sub ${p.sub}` : ""].filter(Boolean).join(" ");
    out.push(`    pending #${p.key} ${what}${p.deadline !== null ? `, deadline ${rel(p.deadline)}` : ""}`);
  }
  for (const q of c.offline) out.push(`    offline send ${q.request} ${q.path}, queued ${rel(q.queuedAt)}`);
  out.push(`  driver: ${JSON.stringify({ ...client.driver, timerAt: rel(client.driver.timerAt) })}`);
  out.push(`  room: ${JSON.stringify(room)}`);
  out.push(`  trace (last ${client.trace.length} of ${client.traceTotal}):`);
  for (const e of client.trace) out.push(`    ${rel(e.at).padStart(9)} ${e.kind.padEnd(10)} ${e.text}`);
  return out;
}

/** The server's log of `/chat/<room>` with each event's verified sender (`?ext=sender`:
 * `@TS~SENDER:PATH:DATA`), parsed and unescaped (`%25` → `%`, `%0A` → LF). `sender`: the
 * token's `sub` of the connection that sent it, or null (no token, the application, unknown). */
export async function serverLog(server, room) {
  const r = await fetch(`${server.url}/log/chat/${room}?ext=sender`);
  if (r.status !== 200) throw new Error(`GET /log/chat/${room}: ${r.status}`);
  const body = await r.text();
  if (body === "") return [];
  const unescape = (s) => s.replace(/%25|%0A|%0D|%3A/g, (e) => ({ "%25": "%", "%0A": "\n", "%0D": "\r", "%3A": ":" })[e]);
  return body.split("\n").map((line) => {
    const m = /^@(\d+\.\d{9})~([^:]*):([^:]*):(.*)$/s.exec(line);
    if (!m) throw new Error(`bad log line ${JSON.stringify(line)}`);
    const data = m[4].replace(/%25|%0A/g, (s) => (s === "%25" ? "%" : "\n"));
    const sender = m[2].startsWith("=") ? unescape(m[2].slice(1)) : null;
    return { ts: m[1], path: m[3], data, sender };
  });
}

/** The log as the demo should show it: chat messages as {ts, nick, text}, `nick` being the
 * verified sender (the page shows it rather than the nickname in the data). */
export async function serverMessages(server, room) {
  return (await serverLog(server, room)).map((e) => {
    const d = JSON.parse(e.data);
    return { ts: e.ts, nick: e.sender ?? d.nick, text: d.text };
  });
}

/** A token signed with `SECRET` (by `ivy-server token`): `sub`, writing and reading `/chat`. */
export function mintToken(sub, ttl = "1h") {
  const args = ["token", "--auth-hmac-secret", SECRET, "--sub", sub, "--read", "/chat", "--write", "/chat", "--ttl", ttl];
  return execFileSync(binary("ivy-server"), args, { encoding: "utf8" }).trim();
}

/** Publishes lines with the `ivy` command-line client (one event per stdin line), with a
 * token for `sub` (the servers of the demo have auth on). */
export async function seed(server, path, lines, sub = "seeder") {
  const env = { ...process.env, IVY_TOKEN: mintToken(sub) };
  await new Promise((resolvePromise, reject) => {
    const proc = spawn(binary("ivy"), ["--url", `ws://${server.addr}`, "send", path], { stdio: ["pipe", "ignore", "pipe"], env });
    let stderr = "";
    proc.stderr.on("data", (d) => (stderr += d));
    proc.on("exit", (code) => (code === 0 ? resolvePromise(undefined) : reject(new Error(`ivy send exited with ${code}: ${stderr}`))));
    proc.stdin.end(lines.map((l) => `${l}\n`).join(""));
  });
}

/** Saves a screenshot under the output directory. */
export async function screenshot(page, name) {
  mkdirSync(outputDir, { recursive: true });
  const path = join(outputDir, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}
