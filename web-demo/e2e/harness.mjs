// Helpers of the browser end-to-end tests: a real ivy-server (the built binary) serving the
// built demo, Debian's Chromium driven by playwright-core, and readers for what the pages show
// and what the server stored.

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, existsSync } from "node:fs";
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

/**
 * Starts `ivy-server --listen 127.0.0.1:PORT --data DIR --static-dir web-demo/dist` and waits
 * for its first stdout line, `ivy-server listening on http://ADDR`. Port 0 picks a free port;
 * a restart passes the port it had, so that open pages reconnect to it.
 */
export async function startServer(dataDir, port = 0) {
  if (!existsSync(join(distDir, "index.html"))) throw new Error(`${distDir}/index.html missing: build the demo first (npm run build)`);
  const deadline = Date.now() + WAIT;
  for (;;) {
    try {
      return await spawnServer(dataDir, port);
    } catch (e) {
      // Right after a kill the port can still be busy for a moment.
      if (port === 0 || Date.now() > deadline) throw e;
      await sleep(200);
    }
  }
}

function spawnServer(dataDir, port) {
  return new Promise((resolvePromise, reject) => {
    const proc = spawn(binary("ivy-server"), ["--listen", `127.0.0.1:${port}`, "--data", dataDir, "--static-dir", distDir], {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    proc.stderr.on("data", (d) => {
      stderr += d;
      if (process.env.E2E_VERBOSE) process.stderr.write(d);
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
      const exited = new Promise((r) => proc.once("exit", r));
      resolvePromise({
        addr,
        port: Number(addr.slice(addr.lastIndexOf(":") + 1)),
        url: `http://${addr}`,
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
      });
    });
  });
}

/**
 * A TCP proxy on 127.0.0.1 between pages and the server that can hold back the bytes of one
 * direction ("up": page to server, "down": server to page) and cut every open connection, to
 * lose a request or its reply on purpose. New connections after a cut go through normally.
 */
export async function startProxy(upstreamPort) {
  /** @type {Set<{ client: import("node:net").Socket, server: import("node:net").Socket }>} */
  const pairs = new Set();
  const hold = { up: false, down: false };
  const proxy = createServer((client) => {
    const server = connect(upstreamPort, "127.0.0.1");
    const pair = { client, server };
    pairs.add(pair);
    const forward = (from, to, dir) =>
      from.on("data", (chunk) => {
        if (!hold[dir]) to.write(chunk); // held bytes are dropped: the cut that follows loses them
      });
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
 * errors and page errors are collected on `page.errors`. */
export async function openPage(browser, options = DESKTOP) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    // Chromium logs every refused connection attempt itself while the server is down.
    const expected = /^WebSocket connection to .* failed|^Failed to load resource: net::ERR_CONNECTION_REFUSED/;
    if (m.type() === "error" && !expected.test(m.text())) errors.push(`console: ${m.text()}`);
  });
  return Object.assign(page, { errors });
}

/** Opens the demo, picks `nick` and `room` in the join form, waits until the room is ready. */
export async function joinRoom(page, server, nick, room, query = "") {
  await page.goto(`${server.url}/${query}#${room}`);
  await page.locator("#nick").fill(nick);
  await page.locator("#room").fill(room);
  await page.locator("#join-button").click();
  await waitReady(page);
}

/** The room shows its history and is subscribed; the connection is up. */
export async function waitReady(page) {
  await page.locator('#chat[data-ready="true"]').waitFor({ timeout: WAIT });
  await waitStatus(page, "connected");
}

export async function waitStatus(page, status) {
  await page.locator(`#status[data-status="${status}"]`).waitFor({ timeout: WAIT });
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
  await page.waitForFunction(
    (n) => document.querySelectorAll("#messages li.msg").length === n && document.querySelectorAll("#pending li").length === 0,
    count,
    { timeout: WAIT },
  );
  return shown(page);
}

/** The server's log of `/chat/<room>`, parsed and unescaped (`%25` → `%`, `%0A` → LF). */
export async function serverLog(server, room) {
  const r = await fetch(`${server.url}/log/chat/${room}`);
  if (r.status !== 200) throw new Error(`GET /log/chat/${room}: ${r.status}`);
  const body = await r.text();
  if (body === "") return [];
  return body.split("\n").map((line) => {
    const m = /^@(\d+\.\d{9}):([^:]*):(.*)$/s.exec(line);
    if (!m) throw new Error(`bad log line ${JSON.stringify(line)}`);
    const data = m[3].replace(/%25|%0A/g, (s) => (s === "%25" ? "%" : "\n"));
    return { ts: m[1], path: m[2], data };
  });
}

/** The log as the demo should show it: chat messages as {ts, nick, text}. */
export async function serverMessages(server, room) {
  return (await serverLog(server, room)).map((e) => {
    const d = JSON.parse(e.data);
    return { ts: e.ts, nick: d.nick, text: d.text };
  });
}

/** Publishes lines with the `ivy` command-line client (one event per stdin line). */
export async function seed(server, path, lines) {
  await new Promise((resolvePromise, reject) => {
    const proc = spawn(binary("ivy"), ["--url", `ws://${server.addr}`, "send", path], { stdio: ["pipe", "ignore", "pipe"] });
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
