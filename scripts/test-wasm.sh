#!/usr/bin/env bash
# The WebAssembly tests: the client core's unit and simulation tests compiled to wasm32 and run
# in Node; the browser client's tests in headless Chromium against a real ivy-server (which
# they restart); a strict TypeScript check of consumers against the package's types; and a
# check that the .wasm imports only wasm-bindgen's glue. (The packed package in a fresh Vite
# app: scripts/test-web.sh, web-demo/e2e/package.test.mjs.) Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# npm packages exactly as package-lock.json has them (npm ci, which never rewrites the lock),
# skipped when node_modules already holds that lock.
npm_locked() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund "$@"
  fi
}

step() { printf '\n==> %s\n' "$*"; }

step "wasm package (client-wasm/build.sh)"
client-wasm/build.sh

step "Chromium and chromedriver"
# apt may be busy (another install, unattended upgrades): wait for its lock, then retry.
apt_install() {
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if apt-get -o DPkg::Lock::Timeout=120 update && \
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends "$@"; then
      return 0
    fi
    echo "apt-get failed (attempt $attempt); retrying in 15 s" >&2
    sleep 15
  done
  return 1
}
if [ ! -x /usr/bin/chromium ] || ! command -v chromedriver >/dev/null; then
  apt_install chromium chromium-driver
fi

step "client-core tests compiled to wasm32, in Node"
cargo test -p ivy-client-core --target wasm32-unknown-unknown

step "browser client tests in headless Chromium against a real server"
cargo build -p ivy-server --bin ivy-server
cargo build -p ivy-tests --bin ivy-test-control
data=$(mktemp -d)
# The controller runs in its own process group so that it and its server are stopped together
# (a server left behind would keep this script's output pipe open).
coproc CONTROL { exec setsid "${CARGO_TARGET_DIR:-target}/debug/ivy-test-control" --data "$data"; }
# Keep the PID: bash unsets CONTROL_PID once the coprocess exits.
control_pid=$CONTROL_PID
stop_control() {
  if [ -n "$control_pid" ]; then
    kill -TERM -- "-$control_pid" 2>/dev/null || kill -TERM "$control_pid" 2>/dev/null || true
    control_pid=
  fi
}
trap 'stop_control; rm -rf "$data"' EXIT
read -r -u "${CONTROL[0]}" line
control=$(echo "$line" | sed -E 's/^control (http:[^ ]+) server .*/\1/')
server=$(echo "$line" | sed -E 's/.* server (ws:[^ ]+)$/\1/')
echo "server $server, control $control"
IVY_TEST_SERVER="$server" IVY_TEST_CONTROL="$control" CHROMEDRIVER="$(command -v chromedriver)" \
  WASM_BINDGEN_TEST_TIMEOUT=120 \
  cargo test -p ivy-client-wasm --target wasm32-unknown-unknown --test browser
stop_control

step "TypeScript: tsc --noEmit --strict of consumers against the package's types"
# consumer.ts with `lib` es2022 and dom only; using.ts with esnext.disposable.
(cd client-wasm/ts-check && npm_locked --silent && npx tsc -p . && npx tsc -p tsconfig.using.json \
  && echo "check: 2 passed, 0 failed (TypeScript consumers)")

step "the .wasm imports only wasm-bindgen's glue"
node client-wasm/check-imports.mjs
