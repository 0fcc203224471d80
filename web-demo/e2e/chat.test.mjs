// Browser end-to-end tests of the chat demo: Debian's Chromium (playwright-core) against a real
// ivy-server serving web-demo/dist with its sled store in a temporary directory. Run by
// e2e/run.mjs (or `node --test e2e/chat.test.mjs`). Screenshots go to e2e/output/.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  DESKTOP,
  PHONE,
  WAIT,
  beginDiagnostics,
  joinRoom,
  launchBrowser,
  openPage,
  say,
  screenshot,
  seed,
  serverLog,
  serverMessages,
  shown,
  sleep,
  startProxy,
  startServer,
  tempDir,
  waitReady,
  waitFor,
  waitShown,
  waitStatus,
  withDiagnostics,
} from "./harness.mjs";

/** @type {import("playwright-core").Browser} */
let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

/**
 * Runs `body` with a fresh server and data directory; screenshots every page it opened at the
 * end (also when the test fails), and checks that no page logged an error. A failure carries
 * the diagnostics (what each page and its client knew, their consoles, the servers' logs).
 * The server runs with auth on, as `scripts/run.sh` starts it (`AUTH_FLAGS`), plus `args`;
 * `restart(options)` may start it again with other flags (`startServer`'s options).
 * @param {string} name
 * @param {(ctx: { server: any, data: string, page: (opts?: object) => Promise<any>, restart: (options?: object) => Promise<any> }) => Promise<void>} body
 * @param {{ args?: string[] }} [options]
 */
async function withServer(name, body, { args = [] } = {}) {
  beginDiagnostics(name);
  const data = tempDir();
  let server = await startServer(data.dir, 0, undefined, { args });
  /** @type {any[]} */
  const pages = [];
  try {
    await body({
      get server() {
        return server;
      },
      data: data.dir,
      page: async (opts = DESKTOP) => {
        const p = await openPage(browser, opts);
        pages.push(p);
        return p;
      },
      restart: async (options = { args }) => {
        const port = server.port;
        await server.kill();
        server = await startServer(data.dir, port, undefined, options);
        return server;
      },
    });
    for (const p of pages) assert.deepEqual(p.errors, [], "errors in the page's console");
  } catch (e) {
    throw await withDiagnostics(e);
  } finally {
    for (const [i, p] of pages.entries()) {
      await screenshot(p, `${name}-${i + 1}`).catch(() => {});
      await p.context().close();
    }
    await server.stop();
    data.remove();
  }
}

test("two people in separate browser contexts chat both ways", async () => {
  await withServer("two-people", async ({ server, page }) => {
    const ada = await page(DESKTOP);
    const bob = await page(PHONE);
    await joinRoom(ada, server, "ada", "lobby");
    await joinRoom(bob, server, "bob", "lobby");
    assert.equal(await ada.locator("#room-name").textContent(), "#lobby");
    assert.equal(await ada.locator("#empty").isVisible(), true);

    await say(ada, "Hello Bob! Anyone here?");
    await waitShown(bob, 1);
    await say(bob, "Hi Ada, Bob here 👋");
    await waitShown(ada, 2);
    await say(ada, "Great, it works both ways.");
    await say(ada, "And two in a row.");
    // The sends are on their way (through a latency proxy in the stress mode): wait for them.
    const expected = await waitForLog(server, "lobby", 4);
    assert.deepEqual(
      expected.map((m) => [m.nick, m.text]),
      [
        ["ada", "Hello Bob! Anyone here?"],
        ["bob", "Hi Ada, Bob here 👋"],
        ["ada", "Great, it works both ways."],
        ["ada", "And two in a row."],
      ],
    );
    assert.deepEqual(await waitShown(ada, 4), expected);
    assert.deepEqual(await waitShown(bob, 4), expected);
    // Each sees their own messages as theirs.
    assert.deepEqual(await ada.$$eval("#messages li.msg", (els) => els.map((e) => e.classList.contains("mine"))), [true, false, true, true]);
    assert.deepEqual(await bob.$$eval("#messages li.msg", (els) => els.map((e) => e.classList.contains("mine"))), [false, true, false, false]);
    // Another room does not see them; the join form refuses invalid room names.
    const eve = await page(DESKTOP);
    await joinRoom(eve, server, "eve", "other.room-2");
    assert.deepEqual(await shown(eve), []);
    await eve.locator("#leave").click();
    await eve.locator("#room").fill("Not/Valid!");
    await eve.locator("#join-button").click();
    assert.match((await eve.locator("#join-error").textContent()) ?? "", /may only contain/);
  });
});

test("a reload shows the full history once, then live messages", async () => {
  await withServer("reload", async ({ server, page }) => {
    const ada = await page();
    const bob = await page();
    await joinRoom(ada, server, "ada", "history");
    await joinRoom(bob, server, "bob", "history");
    for (let i = 1; i <= 6; i++) await say(i % 2 ? ada : bob, `message ${i}`);
    await waitShown(ada, 6);
    await waitShown(bob, 6);

    await ada.reload();
    await waitReady(ada);
    const expected = await serverMessages(server, "history");
    assert.equal(expected.length, 6);
    const afterReload = await waitShown(ada, 6);
    assert.deepEqual(afterReload, expected);
    assert.equal(new Set(afterReload.map((m) => m.ts)).size, 6, "no message twice");

    // Live messages continue after the history, in both directions.
    await say(bob, "after the reload");
    await say(ada, "welcome back to me");
    const all = await waitForLog(server, "history", 8);
    assert.deepEqual(await waitShown(ada, 8), all);
    assert.deepEqual(await waitShown(bob, 8), all);

    // A newcomer in a fresh context sees the same history.
    const cat = await page(PHONE);
    await joinRoom(cat, server, "cat", "history");
    assert.deepEqual(await waitShown(cat, 8), all);
  });
});

test("a server restart while both pages are open: they reconnect, nothing lost or doubled", async () => {
  await withServer("restart", async ({ page, restart, ...ctx }) => {
    const ada = await page();
    const bob = await page(PHONE);
    await joinRoom(ada, ctx.server, "ada", "restart");
    await joinRoom(bob, ctx.server, "bob", "restart");
    await say(ada, "before the restart (ada)");
    await say(bob, "before the restart (bob)");
    await waitShown(ada, 2);
    await waitShown(bob, 2);

    // Kill the server (SIGKILL); the pages notice and keep trying.
    const port = ctx.server.port;
    await ctx.server.kill();
    await waitStatus(ada, "reconnecting");
    await waitStatus(bob, "reconnecting");
    // Messages typed while reconnecting show as pending, waiting for the connection.
    await say(ada, "typed while the server was down (ada)");
    await say(bob, "typed while the server was down (bob)");
    await say(bob, "and a second one (bob)");
    await waitFor(ada, '#pending li[data-state="queued"]');
    await waitFor(bob, '#pending li[data-state="queued"] >> nth=1');
    await screenshot(ada, "restart-while-down-1");
    await screenshot(bob, "restart-while-down-2");

    // Same data directory, same port: the pages reconnect by themselves.
    const server = await restart();
    assert.equal(server.port, port);
    await waitStatus(ada, "connected");
    await waitStatus(bob, "connected");
    let expected = await waitForLog(server, "restart", 5);
    assert.deepEqual(await waitShown(ada, 5), expected);
    assert.deepEqual(await waitShown(bob, 5), expected);

    // And the conversation continues.
    await say(bob, "after the restart (bob)");
    await say(ada, "after the restart (ada)");
    expected = await waitForLog(server, "restart", 7);
    assert.deepEqual(await waitShown(ada, 7), expected);
    assert.deepEqual(await waitShown(bob, 7), expected);
    const texts = expected.map((m) => m.text).sort();
    assert.deepEqual(texts, [
      "after the restart (ada)",
      "after the restart (bob)",
      "and a second one (bob)",
      "before the restart (ada)",
      "before the restart (bob)",
      "typed while the server was down (ada)",
      "typed while the server was down (bob)",
    ]);
  });
});

test("two pages sending bursts at the same moment each show every message, their own included", async () => {
  // Concurrent sends share the server's group commits, so each page receives the other page's
  // messages in between the acks of its own. A server that acks a commit only after handing
  // out all of its events (this one before issue 18's fix) gives a page the other's later
  // message before the ack of its own earlier one; its own message must still show, in place
  // (issue 18: it stayed pending forever).
  await withServer("bursts", async ({ server, page }) => {
    const ada = await page();
    const bob = await page(PHONE);
    await joinRoom(ada, server, "ada", "bursts");
    await joinRoom(bob, server, "bob", "bursts");
    const burst = (p, nick) =>
      p.evaluate((texts) => {
        const text = /** @type {HTMLTextAreaElement} */ (document.querySelector("#text"));
        const form = /** @type {HTMLFormElement} */ (document.querySelector("#composer"));
        for (const t of texts) {
          text.value = t;
          form.requestSubmit();
        }
      }, Array.from({ length: 10 }, (_, i) => `${nick} ${i + 1}`));
    for (let round = 0; round < 3; round++) await Promise.all([burst(ada, `ada ${round}`), burst(bob, `bob ${round}`)]);
    const expected = await waitForLog(server, "bursts", 60);
    assert.deepEqual(await waitShown(ada, 60), expected);
    assert.deepEqual(await waitShown(bob, 60), expected);
  });
});

test("newlines, a literal %0A, % and emoji arrive exactly as typed", async () => {
  await withServer("characters", async ({ server, page }) => {
    const ada = await page();
    const bob = await page(DESKTOP);
    await joinRoom(ada, server, "ada", "chars");
    await joinRoom(bob, server, "bob", "chars");
    const text = "first line\nsecond line has %0A literally, and 100% of %25\n\n   indented 🎉 👩‍👩‍👧 ✓ <b>not bold</b> &amp; \\n";
    await say(ada, text);
    // Typed with the keyboard: Shift+Enter is a new line, Enter sends.
    await bob.locator("#text").click();
    await bob.keyboard.type("typed line one");
    await bob.keyboard.press("Shift+Enter");
    await bob.keyboard.type("typed line two %0A 🙂");
    await bob.keyboard.press("Enter");
    const typed = "typed line one\ntyped line two %0A 🙂";
    assert.equal(await bob.locator("#text").inputValue(), "", "Enter sent the message");

    for (const p of [ada, bob]) {
      const got = await waitShown(p, 2);
      assert.deepEqual(
        got.map((m) => m.text),
        [text, typed],
      );
      // Rendered on several lines, not as one: the bubble is taller than three lines of text.
      const box = await p.locator("#messages li.msg .text").first().boundingBox();
      assert.ok(box && box.height > 60, `multi-line bubble height ${box?.height}`);
      assert.equal(await p.locator("#messages b").count(), 0, "HTML in a message is not interpreted");
    }
    const log = await serverLog(server, "chars");
    assert.deepEqual(
      log.map((e) => JSON.parse(e.data).text),
      [text, typed],
    );
    // On the wire, the log escapes % (and would escape a raw newline); the demo's JSON carries
    // the newline as \n.
    const raw = await (await fetch(`${server.url}/log/chat/chars`)).text();
    assert.ok(raw.includes("has %250A literally, and 100%25 of %2525"), raw);
  });
});

test("a long history opens with its latest messages, pages back, and stays bounded", async () => {
  await withServer("long-history", async ({ server, page }) => {
    const total = 3000;
    const lines = [];
    for (let i = 1; i <= total; i++) lines.push(JSON.stringify({ nick: `bot${i % 7}`, text: `history message ${i}` }));
    lines.push("plain text from the command line, not JSON: 50% done");
    await seed(server, "/chat/big", lines);
    const ada = await page();
    await joinRoom(ada, server, "ada", "big");
    // The last 200 events, in order, the last one being the raw line.
    const first = await waitShown(ada, 200);
    assert.equal(first[0].text, `history message ${total - 198}`);
    assert.equal(first[199].text, "plain text from the command line, not JSON: 50% done");
    assert.equal(await ada.locator("#messages li.raw").count(), 1);
    await waitFor(ada, "#earlier");

    // Load earlier: 200 more above, nothing repeated.
    await ada.locator("#earlier").click();
    const more = await waitShown(ada, 400);
    assert.equal(more[0].text, `history message ${total - 398}`);
    assert.equal(new Set(more.map((m) => m.ts)).size, 400);

    // A burst of 1000 live messages: all arrive (the last one is shown) but the page keeps at
    // most 500 rendered.
    await ada.locator("#scroller").evaluate((s) => (s.scrollTop = s.scrollHeight));
    const burst = [];
    for (let i = 1; i <= 1000; i++) burst.push(JSON.stringify({ nick: "flood", text: `live ${i}` }));
    await seed(server, "/chat/big", burst);
    await ada.waitForFunction(() => document.querySelector("#messages li.msg:last-child .text")?.textContent === "live 1000", null, {
      timeout: WAIT,
    });
    const rendered = await shown(ada);
    assert.ok(rendered.length <= 500, `${rendered.length} rendered`);
    const log = await serverLog(server, "big");
    assert.deepEqual(
      rendered.map((m) => m.ts),
      log.slice(-rendered.length).map((e) => e.ts),
    );
  });
});

test("a send whose connection drops before the reply is neither lost nor doubled", async () => {
  await withServer("in-flight", async ({ server, page }) => {
    const proxy = await startProxy(server.port);
    try {
      // Ada talks to the server through the proxy; Bob directly.
      const ada = await page();
      const bob = await page(PHONE);
      await joinRoom(ada, server, "ada", "flaky", `?server=${encodeURIComponent(proxy.url)}`);
      await joinRoom(bob, server, "bob", "flaky");
      await say(ada, "warm-up");
      await waitShown(bob, 1);

      // 1. The request is lost: the server never sees it. The client sends it again with its
      // send id after reconnecting (docs/PROTOCOL.md 5.9), and the server stores it.
      proxy.hold("up");
      await say(ada, "lost on the way, sent again");
      await waitFor(ada, '#pending li[data-state="sending"]');
      await new Promise((r) => setTimeout(r, 300));
      proxy.cutAll();
      proxy.release();
      await waitForLog(server, "flaky", 2);
      await waitShown(ada, 2);
      await waitShown(bob, 2);

      // 2. The reply is lost: the server stored it but the page never hears so. The client
      // sends it again with the same id; the server recognizes it and answers with the first
      // timestamp, storing nothing. The page never shows it as failed.
      proxy.hold("down");
      await say(ada, "stored, reply lost");
      await waitForLog(server, "flaky", 3);
      proxy.cutAll();
      proxy.release();
      await waitStatus(ada, "connected");
      await screenshot(ada, "in-flight-resent");
      await say(ada, "and one more after that");
      const expected = await waitForLog(server, "flaky", 4);
      assert.deepEqual(
        expected.map((m) => m.text),
        ["warm-up", "lost on the way, sent again", "stored, reply lost", "and one more after that"],
      );
      assert.deepEqual(await waitShown(ada, 4), expected);
      assert.deepEqual(await waitShown(bob, 4), expected);
      // Nothing more arrives later (the resend of the stored message stored nothing), and no
      // message was ever shown as failed.
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal((await serverLog(server, "flaky")).length, 4);
      assert.equal(await ada.locator("#pending li").count(), 0);
    } finally {
      await proxy.close();
    }
  });
});

test("each visitor chats under a nickname of their own: a taken nickname is refused", async () => {
  await withServer("nicknames", async ({ server, page }) => {
    const ada = await page(DESKTOP);
    const bob = await page(PHONE);
    await joinRoom(ada, server, "ada", "lobby");
    await joinRoom(bob, server, "bob", "lobby");
    await say(ada, "I am the real ada");
    await say(bob, "hi ada");
    const expected = await waitForLog(server, "lobby", 2);
    assert.deepEqual(await waitShown(ada, 2), expected);
    assert.deepEqual(await waitShown(bob, 2), expected);

    // A third visitor (another browser context: no cookie of ada's) cannot be ada, in any case.
    const eve = await page(DESKTOP);
    for (const nick of ["ada", " ADA "]) {
      await eve.goto(`${server.url}/#lobby`);
      await eve.locator("#nick").fill(nick);
      await eve.locator("#room").fill("lobby");
      await eve.locator("#join-button").click();
      await waitFor(eve, "#join-error:not([hidden])");
      assert.match((await eve.locator("#join-error").textContent()) ?? "", /is taken by someone else/);
      assert.equal(await eve.locator("#chat").isHidden(), true);
    }
    // With a nickname of her own she joins and sees the conversation.
    await joinRoom(eve, server, "eve", "lobby");
    assert.deepEqual(await waitShown(eve, 2), expected);
    // Ada's page, reloaded, keeps her nickname (her cookie says it is hers).
    await ada.reload();
    await waitReady(ada);
    await say(ada, "still me after a reload");
    const all = await waitForLog(server, "lobby", 3);
    assert.deepEqual(await waitShown(eve, 3), all);
    // Without a token nobody may write: the server refuses an anonymous send.
    await assert.rejects(seedAnonymous(server, "/chat/lobby", "spoofed"), /forbidden/);
    // Every name shown is the sender the server verified.
    assert.deepEqual(await eve.$$eval("#messages li.msg", (els) => els.map((e) => e.getAttribute("data-verified"))), ["true", "true", "true"]);
  });
});

test("messages show their verified sender, not the nickname their data claims", async () => {
  await withServer("verified-senders", async ({ server, page }) => {
    const ada = await page(DESKTOP);
    const bob = await page(PHONE);
    await joinRoom(ada, server, "ada", "lobby");
    await joinRoom(bob, server, "bob", "lobby");
    await say(ada, "hello, ada here");
    await waitShown(bob, 1);
    // Mallory has a token of her own and writes a message whose data says it is from ada.
    await seed(server, "/chat/lobby", [JSON.stringify({ nick: "ada", text: "I am ada, trust me" })], "mallory");
    const expected = await waitForLog(server, "lobby", 2);
    assert.deepEqual(
      expected.map((m) => [m.nick, m.text]),
      [
        ["ada", "hello, ada here"],
        ["mallory", "I am ada, trust me"],
      ],
    );
    for (const p of [ada, bob]) {
      assert.deepEqual(await waitShown(p, 2), expected);
      const names = await p.$$eval("#messages li.msg .nick", (els) => els.map((e) => e.textContent));
      assert.deepEqual(names, ["ada", "mallory"]);
    }
    // Ada's page does not take mallory's message for one of hers.
    assert.deepEqual(await ada.$$eval("#messages li.msg", (els) => els.map((e) => e.classList.contains("mine"))), [true, false]);
    // A reload reads the history with the senders too.
    await bob.reload();
    await waitReady(bob);
    assert.deepEqual(await waitShown(bob, 2), expected);
  });
});

test("a page whose token lives 3 seconds keeps chatting across its expiries, refreshing in-band", async () => {
  // Tokens of 3 s, and connections closed 1 s after their token expired unless refreshed:
  // the pages must refresh (the client asks getToken ahead of `exp`) on their open connection.
  await withServer(
    "short-tokens",
    async ({ server, page }) => {
      const ada = await page(DESKTOP);
      const bob = await page(PHONE);
      const tokens = { ada: 0, bob: 0 };
      const sockets = { ada: 0, bob: 0 };
      for (const [nick, p] of /** @type {const} */ ([["ada", ada], ["bob", bob]])) {
        p.on("request", (r) => void (r.url().endsWith("/demo/token") && tokens[nick]++));
        p.on("websocket", () => void sockets[nick]++);
      }
      await joinRoom(ada, server, "ada", "short");
      await joinRoom(bob, server, "bob", "short");
      // About 12 s of conversation: four lifetimes of a token.
      const texts = [];
      for (let i = 1; i <= 12; i++) {
        const [who, p] = i % 2 ? ["ada", ada] : ["bob", bob];
        const text = `${who} says ${i}`;
        texts.push(text);
        await say(p, text);
        await sleep(1000);
      }
      const expected = await waitForLog(server, "short", 12);
      assert.deepEqual(
        expected.map((m) => m.text),
        texts,
      );
      assert.deepEqual(await waitShown(ada, 12), expected);
      assert.deepEqual(await waitShown(bob, 12), expected);
      await waitStatus(ada, "connected");
      await waitStatus(bob, "connected");
      // Fresh tokens were fetched along the way, and the connection was never replaced (no
      // 4003 close, no reconnect): the refresh happened in-band.
      assert.ok(tokens.ada >= 4 && tokens.bob >= 4, `token requests ${JSON.stringify(tokens)}`);
      assert.deepEqual(sockets, { ada: 1, bob: 1 }, "one WebSocket per page");
    },
    { args: ["--demo-token-ttl", "3s", "--auth-refresh-grace", "1s"] },
  );
});

test("a refused token is replaced by a fresh one, and with none to be had the page says it is signed out", async () => {
  await withServer("refused-token", async ({ page, restart, ...ctx }) => {
    const ada = await page();
    await joinRoom(ada, ctx.server, "ada", "keys");
    await say(ada, "before the new key");
    await waitShown(ada, 1);

    // The server comes back with another secret: ada's token is refused at the handshake (the
    // browser hides the 401, the client learns it with fetch), the client asks getToken, and the
    // demo endpoint (which forgot every claim) gives her a new one.
    const other = ["--auth-hmac-secret", "another-secret", "--demo-token-endpoint", "--anonymous-read", "/chat"];
    let server = await restart({ auth: false, args: other });
    await waitStatus(ada, "connected");
    await say(ada, "after the new key");
    await waitForLog(server, "keys", 2);
    await waitShown(ada, 2);

    // Again, but now without the demo endpoint: no fresh token to be had. The client ends
    // "unauthorized" with the server's reason, and the page says so.
    server = await restart({ auth: false, args: ["--auth-hmac-secret", "a-third-secret", "--anonymous-read", "/chat"] });
    await waitStatus(ada, "unauthorized");
    const notice = (await ada.locator("#notice").textContent()) ?? "";
    assert.match(notice, /Signed out: the server refused the token: invalid token: bad signature/);
    assert.equal(await ada.locator("#text").isDisabled(), true);
    // What she saw stays on the page.
    assert.equal((await shown(ada)).length, 2);
  });
});

/** Sends `data` to `path` with the `ivy` CLI and no token. */
async function seedAnonymous(server, path, data) {
  const { spawn } = await import("node:child_process");
  const { binary } = await import("./harness.mjs");
  await new Promise((resolvePromise, reject) => {
    const env = { ...process.env };
    delete env.IVY_TOKEN;
    const proc = spawn(binary("ivy"), ["--url", `ws://${server.addr}`, "send", path, data], { stdio: ["ignore", "ignore", "pipe"], env });
    let stderr = "";
    proc.stderr.on("data", (d) => (stderr += d));
    proc.on("exit", (code) => (code === 0 ? resolvePromise(undefined) : reject(new Error(`ivy send exited with ${code}: ${stderr}`))));
  });
}

/** The server's messages once there are `n` of them. */
async function waitForLog(server, room, n) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const m = await serverMessages(server, room);
    if (m.length >= n || Date.now() > deadline) {
      assert.equal(m.length, n, "messages in the server's log");
      return m;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
