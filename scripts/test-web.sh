#!/usr/bin/env bash
# The chat web demo's checks: builds the wasm package and the demo, type-checks it, and runs
# the browser end-to-end tests (Playwright through playwright-core, driving Debian's Chromium)
# against the real ivy-server binary: the demo's (e2e/chat.test.mjs), the chat on three nodes over
# Redis behind the demo's load balancer, one node killed (e2e/nodes.test.mjs), and the npm package's, packed
# and installed in a fresh Vite app (e2e/package.test.mjs). Installs what is missing: Chromium,
# redis-server and haproxy (apt), npm packages.
# Prints 'check: N passed, N failed ...' lines that scripts/test.sh adds to its summary.
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

step "web demo: Node.js"
if ! command -v node >/dev/null || ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  echo "Node.js >= 20.19 with npm is needed for the web demo (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
echo "node $(node --version), npm $(npm --version)"

if [ "${IVY_WASM_PKG_FRESH:-}" != 1 ]; then
  step "web demo: wasm package (client-wasm/build.sh)"
  client-wasm/build.sh
fi

step "web demo: Chromium (and an emoji font, for readable screenshots), redis-server and haproxy (e2e/nodes.test.mjs)"
packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium chromium-driver)
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || packages+=(fonts-noto-color-emoji)
command -v redis-server >/dev/null || packages+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || packages+=(haproxy)
if [ ${#packages[@]} -gt 0 ]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
fi
/usr/bin/chromium --version
"$(command -v haproxy || echo /usr/sbin/haproxy)" -v | sed -n 1p

step "web demo: npm packages (npm ci from the lock, when node_modules does not hold it)"
(cd web-demo && npm_locked)

step "web demo: TypeScript check (tsc --noEmit)"
(cd web-demo && npm run --silent typecheck) && echo "check: 1 passed, 0 failed (TypeScript: web demo and its tests)"

step "web demo: vite build"
(cd web-demo && npm run --silent build)

step "web demo: browser end-to-end tests"
cargo build -p ivy-server -p ivy-client-native --features ivy-client-native/cli --bins
(cd web-demo && node e2e/run.mjs)
