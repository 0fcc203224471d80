// Browser end-to-end tests of the demo's "who is here" (the presence extension): two people in
// separate browser contexts (Debian's Chromium through playwright-core) against a real
// ivy-server serving web-demo/dist, with auth on as scripts/run.sh starts it and a linger of
// 2 s. Run by e2e/run.mjs (or `node --test e2e/presence.test.mjs`).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  DESKTOP,
  PHONE,
  WAIT,
  beginDiagnostics,
  diagnosed,
  joinRoom,
  launchBrowser,
  openPage,
  screenshot,
  sleep,
  startServer,
  tempDir,
  waitReady,
  withDiagnostics,
} from "./harness.mjs";

/** The server's `--presence-linger` in these tests, in seconds. */
const LINGER = 2;

/** @type {import("playwright-core").Browser} */
let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

/** The names in the page's people list, in its order. */
function people(page) {
  return page.$$eval("#people-list li.person", (els) => els.map((e) => e.getAttribute("data-name")));
}

/** The page's join and leave notices, oldest first. */
async function notices(page) {
  const items = await page.$$eval("#presence-log li", (els) => els.map((e) => `${e.getAttribute("data-kind")}:${e.firstChild?.textContent ?? ""}`));
  return items.reverse();
}

/** Waits until the page's list is exactly `names` and its count says so; returns the ms it took. */
async function waitPeople(page, names, timeout = WAIT) {
  const start = Date.now();
  await diagnosed(
    `waitPeople(${page.label}, ${JSON.stringify(names)})`,
    page.waitForFunction(
      (want) => {
        const got = Array.from(document.querySelectorAll("#people-list li.person"), (e) => e.getAttribute("data-name"));
        const count = document.getElementById("people-count")?.textContent;
        return JSON.stringify(got) === JSON.stringify(want) && count === `${want.length} here`;
      },
      names,
      { timeout },
    ),
  );
  return Date.now() - start;
}

/** `GET /presence/<path>` (anonymous read of /chat, as the demo's server allows). */
async function serverPresence(server, path) {
  const r = await fetch(`${server.url}/presence${path}`);
  assert.equal(r.status, 200, await r.clone().text());
  const body = await r.json();
  return body.members.map((m) => m.sub ?? `anon:${m.anon}`);
}

test("who is here: a join appears, a reload shows nothing, a leave disappears within the linger", async () => {
  beginDiagnostics("presence");
  const data = tempDir();
  const server = await startServer(data.dir, 0, undefined, { args: ["--presence-linger", String(LINGER)] });
  /** @type {any[]} */
  const pages = [];
  const page = async (opts) => {
    const p = await openPage(browser, opts);
    pages.push(p);
    return p;
  };
  try {
    const ada = await page(DESKTOP);
    const bob = await page(PHONE);
    await joinRoom(ada, server, "ada", "lobby");
    await waitPeople(ada, ["ada"]);
    await ada.locator("#people-count").click();
    assert.equal(await ada.locator("#people").isVisible(), true, "the count opens the list");
    assert.equal(await ada.locator("#people-list li.person-me").textContent(), "ada (you)");

    // bob joins: he appears in ada's list, and ada's page says so.
    await joinRoom(bob, server, "bob", "lobby");
    await waitPeople(ada, ["ada", "bob"]);
    await waitPeople(bob, ["ada", "bob"]);
    assert.deepEqual(await notices(ada), ["join:bob joined"]);
    assert.deepEqual(await notices(bob), [], "the first snapshot announces nobody");
    assert.deepEqual(await serverPresence(server, "/chat/lobby"), ["ada", "bob"]);

    // bob reloads: within the linger his return is no leave and no join for ada.
    await bob.reload();
    await waitReady(bob);
    const until = Date.now() + (LINGER + 1.5) * 1000;
    while (Date.now() < until) {
      assert.deepEqual(await people(ada), ["ada", "bob"], "bob stays in ada's list across his reload");
      await sleep(100);
    }
    assert.deepEqual(await notices(ada), ["join:bob joined"], "no 'bob left' and no second 'bob joined'");
    await waitPeople(bob, ["ada", "bob"]);
    assert.deepEqual(await notices(bob), []);

    // bob leaves the room (back to the join form): gone from ada's list within the linger and
    // a tick, with a notice.
    await bob.locator("#leave").click();
    const took = await waitPeople(ada, ["ada"], (LINGER + 5) * 1000);
    assert.ok(took >= (LINGER - 0.5) * 1000, `the leave waits for the linger (${took} ms)`);
    assert.deepEqual(await notices(ada), ["join:bob joined", "leave:bob left"]);
    assert.equal(await ada.locator("#presence-toast").textContent(), "bob left");

    // bob comes back (the join form, filled with his nickname and the room), then his browser
    // goes away without leaving the room.
    assert.equal(await bob.locator("#room").inputValue(), "lobby");
    await bob.locator("#join-button").click();
    await waitReady(bob);
    await waitPeople(ada, ["ada", "bob"]);
    await waitPeople(bob, ["ada", "bob"]);
    await screenshot(ada, "presence-1-both");
    pages.splice(pages.indexOf(bob), 1);
    await bob.context().close();
    await waitPeople(ada, ["ada"], (LINGER + 5) * 1000);
    assert.deepEqual(await notices(ada), ["join:bob joined", "leave:bob left", "join:bob joined", "leave:bob left"]);
    assert.deepEqual(await serverPresence(server, "/chat/lobby"), ["ada"]);
    assert.deepEqual(ada.errors, [], "errors in ada's console");
  } catch (e) {
    throw await withDiagnostics(e);
  } finally {
    for (const [i, p] of pages.entries()) {
      await screenshot(p, `presence-end-${i + 1}`).catch(() => {});
      await p.context().close().catch(() => {});
    }
    await server.stop();
    data.remove();
  }
});
