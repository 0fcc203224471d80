#!/usr/bin/env bash
# The browser end-to-end tests in their stress mode (web-demo/e2e/stress.mjs): builds what they
# need (the server and CLI binaries, the wasm package, the demo), then runs them repeatedly.
# Arguments go to stress.mjs, for example:
#   ./scripts/stress-web.sh --runs 100 --grep "server restart" --load 2 --latency 20
# Set IVY_STRESS_NO_BUILD=1 to skip the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
# npm packages exactly as package-lock.json has them (npm ci, which never rewrites the lock),
# skipped when node_modules already holds that lock.
npm_locked() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund "$@"
  fi
}

if [ "${IVY_STRESS_NO_BUILD:-}" != 1 ]; then
  cargo build -p ivy-server -p ivy-client-native --features ivy-client-native/cli --bins
  client-wasm/build.sh
  (cd web-demo && npm_locked && npm run --silent build)
fi
cd web-demo
exec node e2e/stress.mjs "$@"
