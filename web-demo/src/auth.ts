// Tokens for the chat from the server's demo-only endpoint, POST /demo/token (ivy-server
// --demo-token-endpoint, which ../scripts/run.sh turns on). A real app gets its tokens from its
// own backend after its own login; this endpoint gives one to anybody for a nickname that no
// other visitor holds (the first visitor of a nickname keeps it through an HttpOnly cookie).

/** What the endpoint answers. */
export interface DemoToken {
  /** The JWT: `sub` the nickname, read and write grants on /chat, a few minutes of life. */
  token: string;
  /** The nickname as the server has it (trimmed): the identity the others see. */
  sub: string;
  /** Seconds the token is valid. */
  expiresIn: number;
}

/** The nickname is held by another visitor (409). */
export class NicknameTaken extends Error {
  constructor(readonly nick: string) {
    super(`The nickname “${nick}” is taken by someone else. Pick another one.`);
  }
}

/** The endpoint, next to the page (the server that served it). */
function endpoint(): string {
  return new URL("demo/token", new URL("./", location.href)).href;
}

/**
 * A token for `nick`, or null when the server has no demo endpoint (auth off: the chat works
 * without tokens, with nicknames carried in the messages). Throws `NicknameTaken`, or an
 * `Error` with the server's reason for another refusal.
 */
export async function demoToken(nick: string): Promise<DemoToken | null> {
  const r = await fetch(endpoint(), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ nickname: nick }),
    // The visitor cookie that proves this nickname is ours (same origin only).
    credentials: "same-origin",
    cache: "no-store",
  });
  if (r.status === 404 || r.status === 405) return null;
  if (r.status === 409) throw new NicknameTaken(nick);
  if (!r.ok) throw new Error(`The server refused a token (${r.status}): ${(await r.text()).trim()}`);
  const body = (await r.json()) as { token?: unknown; sub?: unknown; expires_in?: unknown };
  if (typeof body.token !== "string" || typeof body.sub !== "string") throw new Error("The server's token answer is malformed.");
  return { token: body.token, sub: body.sub, expiresIn: typeof body.expires_in === "number" ? body.expires_in : 0 };
}

/**
 * The client's `getToken`: a fresh token for `nick`, retried a few times over network errors
 * (a server restarting); null when the nickname is no longer ours (the client then ends
 * "unauthorized" and the page asks to join again).
 */
export function tokenProvider(nick: string): () => Promise<string | null> {
  return async () => {
    for (let attempt = 0; ; attempt++) {
      try {
        const t = await demoToken(nick);
        return t?.token ?? null;
      } catch (e) {
        if (e instanceof NicknameTaken || attempt >= 4) {
          if (e instanceof NicknameTaken) return null;
          throw e;
        }
        await new Promise((r) => setTimeout(r, 500 * 2 ** attempt));
      }
    }
  };
}
