// An example backend that mints tokens for ivy-server (see docs/AUTH.md).
//
//   IVY_AUTH_HMAC_SECRET=... ivy-server --auth-hmac-secret "$IVY_AUTH_HMAC_SECRET"
//   IVY_AUTH_HMAC_SECRET=... PORT=3000 node server.mjs
//   curl -X POST -H 'Authorization: Bearer ada-session' http://127.0.0.1:3000/token
//
// The application decides who the caller is (here: a made-up session table standing in for
// your login) and what the caller may read and write; the token carries exactly that. The
// server checks the signature, `exp` and the grants, and never calls back here.
import { createServer } from "node:http";
import { SignJWT } from "jose";

const secret = process.env.IVY_AUTH_HMAC_SECRET;
if (!secret) {
  console.error("set IVY_AUTH_HMAC_SECRET to the secret ivy-server is started with");
  process.exit(2);
}
const key = new TextEncoder().encode(secret);
const ttl = process.env.TOKEN_TTL ?? "5m";

// Stands in for the application's own sessions: session id -> user.
const sessions = new Map([
  ["ada-session", { id: "ada", rooms: ["lobby", "ops"] }],
  ["bob-session", { id: "bob", rooms: ["lobby"] }],
]);

// What a user may do: read every room of the chat, write only into their own rooms.
function grantsFor(user) {
  return {
    read: ["/chat"],
    write: user.rooms.map((room) => `/chat/${room}`),
  };
}

export async function mint(user) {
  return new SignJWT(grantsFor(user))
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .setSubject(user.id)
    .setIssuedAt()
    .setExpirationTime(ttl)
    .sign(key);
}

const server = createServer(async (req, res) => {
  if (req.method !== "POST" || req.url !== "/token") {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    return;
  }
  const session = (req.headers.authorization ?? "").replace(/^Bearer /, "");
  const user = sessions.get(session);
  if (!user) {
    res.writeHead(401, { "content-type": "text/plain" }).end("not logged in\n");
    return;
  }
  const token = await mint(user);
  res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
  res.end(JSON.stringify({ token }));
});

server.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => {
  console.log(`token backend on http://127.0.0.1:${server.address().port}`);
});
