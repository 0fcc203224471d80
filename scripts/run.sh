#!/usr/bin/env bash
# Builds everything (the wasm client package, the chat web demo, the server) and starts the
# server with the demo on http://127.0.0.1:8080 and its embedded sled store in ./ivy-data.
# Installs what is missing: the wasm32 target and the wasm-bindgen CLI (client-wasm/build.sh),
# the demo's npm packages. Extra arguments go to ivy-server (see --help); for example
# `./scripts/run.sh --listen 0.0.0.0:8080` to let phones on your network join.
#
# Auth is on: tokens are signed with IVY_AUTH_HMAC_SECRET, or with a random secret made for this
# run (tokens of an earlier run are then refused, and pages simply get new ones). The page gets
# its token from the demo-only endpoint POST /demo/token (--demo-token-endpoint: it hands a token
# to anyone for a nickname no other visitor holds; NEVER use it in production, where your own
# backend mints tokens after its own login). Without a token one may read /chat (the history
# shows before joining) and write nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# npm packages exactly as package-lock.json has them (npm ci, which never rewrites the lock),
# skipped when node_modules already holds that lock.
npm_locked() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund "$@"
  fi
}

step() { printf '\n==> %s\n' "$*" >&2; }

if ! command -v node >/dev/null || ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  echo "Node.js >= 20.19 with npm is needed to build the web demo (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

step "wasm client package (client-wasm/build.sh)"
client-wasm/build.sh >&2

step "chat web demo (npm install, vite build)"
(cd web-demo && npm_locked >&2 && npm run --silent build >&2)

step "server (cargo build --release)"
cargo build --release -p ivy-server

step "starting ivy-server with the demo: open the address it prints (http://127.0.0.1:8080 by default); Ctrl-C stops it"
# Defaults through the environment, so that flags given to this script override them.
export IVY_STATIC_DIR="${IVY_STATIC_DIR:-web-demo/dist}"
export IVY_DATA="${IVY_DATA:-./ivy-data}"
if [ -z "${IVY_AUTH_HMAC_SECRET:-}" ]; then
  IVY_AUTH_HMAC_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  echo "auth: a random HMAC secret for this run (set IVY_AUTH_HMAC_SECRET to keep one across runs)" >&2
fi
export IVY_AUTH_HMAC_SECRET
export IVY_DEMO_TOKEN_ENDPOINT="${IVY_DEMO_TOKEN_ENDPOINT:-true}"
export IVY_ANONYMOUS_READ="${IVY_ANONYMOUS_READ:-/chat}"
exec "${CARGO_TARGET_DIR:-target}/release/ivy-server" "$@"
