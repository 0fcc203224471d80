// The npm package as a new user meets it: a fresh Vite + TypeScript app (e2e/fresh-app, no Vite
// configuration, no `await init()`) installed from the packed tarball (`npm pack` of
// client-wasm/pkg), type-checked strictly, then run in Debian's Chromium against a real
// ivy-server: in the Vite dev server (which pre-bundles the package) and after `vite build`
// (served by ivy-server, the client given the relative URL "/").

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { cpSync, existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { WAIT, beginDiagnostics, demoDir, launchBrowser, openPage, repoRoot, sleep, startServer, tempDir, withDiagnostics } from "./harness.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const pkgDir = join(repoRoot, "client-wasm", "pkg");
const run = promisify(execFile);

/** @type {import("playwright-core").Browser} */
let browser;
/** @type {{ dir: string, remove: () => void }} */
let work;
let app = "";

/** Runs `cmd args` in `cwd`; a failure carries its output. */
async function sh(cwd, cmd, args) {
  try {
    return (await run(cmd, args, { cwd, maxBuffer: 64 << 20 })).stdout;
  } catch (e) {
    const err = /** @type {any} */ (e);
    throw new Error(`${cmd} ${args.join(" ")} failed in ${cwd}:\n${err.stdout ?? ""}${err.stderr ?? ""}`);
  }
}

function version(name) {
  return JSON.parse(readFileSync(join(demoDir, "node_modules", name, "package.json"), "utf8")).version;
}

before(async () => {
  work = tempDir("ivy-fresh-app-");
  const packed = JSON.parse(await sh(pkgDir, "npm", ["pack", "--json", "--pack-destination", work.dir]));
  const tarball = join(work.dir, packed[0].filename);
  app = join(work.dir, "app");
  cpSync(join(here, "fresh-app"), app, { recursive: true });
  // The demo's versions of Vite and TypeScript (already in npm's cache).
  const manifest = {
    name: "fresh-app",
    private: true,
    type: "module",
    dependencies: { "ivy-client-wasm": `file:${tarball}` },
    devDependencies: { vite: version("vite"), typescript: version("typescript") },
  };
  writeFileSync(join(app, "package.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  await sh(app, "npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  work?.remove();
});

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => resolve(typeof a === "object" && a ? a.port : 0));
    });
  });
}

/** Opens `url`, waits for the scenario's result and checks it. Returns the page. */
async function scenario(url) {
  const page = await openPage(browser);
  /** @type {string[]} */
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  await page.goto(url);
  const handle = await page.waitForFunction(() => /** @type {any} */ (window).ivyResult, null, { timeout: WAIT * 2 });
  const result = /** @type {any} */ (await handle.jsonValue());
  assert.deepEqual(result.failures, [], `the scenario's checks: ${JSON.stringify(result)}`);
  // One status event per change, each with its reason: no "reconnecting" before the first
  // connection, nothing from the removed listener.
  assert.deepEqual(result.statuses, [
    ["connected", "connected"],
    ["closed", "closed"],
  ]);
  assert.ok(result.subPath.startsWith("/fresh/"));
  assert.match(result.errors.negative, /^invalid-argument: option `maxBackoffMs` must be a number of milliseconds > 0, not -5$/);
  assert.match(result.errors.string, /^invalid-argument: option `connectTimeoutMs` must be a number of milliseconds > 0, not "5"$/);
  assert.match(result.errors.unknown, /^invalid-argument: unknown option `maxBackofMs`/);
  assert.match(result.errors.scheme, /^invalid-argument: invalid server URL "ftp:\/\/example.com"/);
  assert.match(result.errors.from, /^invalid-argument: option `from` must be "now", "beginning" or a timestamp string, not 5$/);
  // The unhooked callback's exceptions reached the page's error reporting (once per event);
  // nothing else was reported.
  assert.deepEqual(page.errors, ["pageerror: unhooked boom", "pageerror: unhooked boom"]);
  return { page, requests };
}

test("a fresh app type-checks against the package's types (strict; lib es2022 and dom only)", async () => {
  await sh(app, join(app, "node_modules", ".bin", "tsc"), ["-p", "."]);
});

test("the package works in the Vite dev server with no configuration (pre-bundled, no init step)", async () => {
  beginDiagnostics("fresh-app-vite-dev");
  const data = tempDir();
  const server = await startServer(data.dir, 0, app);
  const port = await freePort();
  const vite = spawn(join(app, "node_modules", ".bin", "vite"), ["--port", String(port), "--strictPort", "--host", "127.0.0.1"], {
    cwd: app,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  vite.stdout.on("data", (d) => (output += d));
  vite.stderr.on("data", (d) => (output += d));
  try {
    const base = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + WAIT;
    for (;;) {
      const up = await fetch(`${base}/`).then((r) => r.ok, () => false);
      if (up) break;
      if (Date.now() > deadline || vite.exitCode !== null) throw new Error(`vite did not start:\n${output}`);
      await sleep(100);
    }
    const { requests } = await scenario(`${base}/?server=${encodeURIComponent(server.url)}&dead=${await freePort()}`);
    // The case that used to break: Vite served the package from its pre-bundled copy.
    assert.ok(
      requests.some((u) => u.includes("/node_modules/.vite/deps/ivy-client-wasm.js")),
      `pre-bundled: ${requests.filter((u) => u.includes("ivy")).join(", ")}`,
    );
  } catch (e) {
    throw await withDiagnostics(e, `vite dev (output:\n${output})`);
  } finally {
    vite.kill("SIGTERM");
    await server.stop();
    data.remove();
  }
});

test("the package works after vite build, served by ivy-server, with a relative server URL", async () => {
  beginDiagnostics("fresh-app-vite-build");
  await sh(app, join(app, "node_modules", ".bin", "vite"), ["build"]);
  const dist = join(app, "dist");
  // One JavaScript bundle holds everything: no separate .wasm to find.
  const assets = readdirSync(join(dist, "assets"));
  assert.ok(!assets.some((f) => f.endsWith(".wasm")), `assets: ${assets.join(", ")}`);
  assert.ok(existsSync(join(dist, "index.html")));
  const data = tempDir();
  const server = await startServer(data.dir, 0, dist);
  try {
    await scenario(`${server.url}/?dead=${await freePort()}`);
  } catch (e) {
    throw await withDiagnostics(e);
  } finally {
    await server.stop();
    data.remove();
  }
});

test("status: one event per change, with its reason (server shut down, server killed, back)", async () => {
  beginDiagnostics("fresh-app-status");
  const dist = join(app, "dist");
  if (!existsSync(join(dist, "index.html"))) await sh(app, join(app, "node_modules", ".bin", "vite"), ["build"]);
  const data = tempDir();
  let server = await startServer(data.dir, 0, dist);
  try {
    const page = await openPage(browser);
    await page.goto(`${server.url}/?mode=status`);
    const statuses = async () => /** @type {any[]} */ (await page.evaluate(() => /** @type {any} */ (window).ivyResult));
    const waitLength = (n) =>
      page.waitForFunction((k) => /** @type {any} */ (window).ivyResult?.length >= k, n, { timeout: WAIT });
    await waitLength(1);
    // Graceful shutdown: close code 1001. While it is down every attempt fails, without a
    // status event (no flicker between "connecting" and "reconnecting").
    await server.stop();
    await waitLength(2);
    await sleep(1500);
    assert.equal((await statuses()).length, 2, JSON.stringify(await statuses()));
    server = await startServer(data.dir, server.port, dist);
    await waitLength(3);
    // Killed: no close frame.
    await server.kill();
    await waitLength(4);
    server = await startServer(data.dir, server.port, dist);
    await waitLength(5);
    assert.deepEqual(await statuses(), [
      ["connected", "connected", null],
      ["reconnecting", "server-closed", 1001],
      ["connected", "connected", null],
      ["reconnecting", "connection-lost", 1006],
      ["connected", "connected", null],
    ]);
    assert.deepEqual(page.errors, []);
  } catch (e) {
    throw await withDiagnostics(e);
  } finally {
    await server.stop();
    data.remove();
  }
});
