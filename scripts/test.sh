#!/usr/bin/env bash
# Sets up what the tests need (skipping what is present) and runs every test of the project.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain: wasm32 target"
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi

step "redis-server (Debian's; the Redis engine's tests start their own on a free loopback port)"
if ! command -v redis-server >/dev/null; then
  # apt may be busy (another install, unattended upgrades): wait for its lock, then retry.
  for attempt in 1 2 3 4 5; do
    if apt-get -o DPkg::Lock::Timeout=120 update && \
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends redis-server; then
      break
    fi
    echo "apt-get failed (attempt $attempt); retrying in 15 s" >&2
    sleep 15
  done
  command -v redis-server >/dev/null || { echo "redis-server could not be installed" >&2; exit 1; }
fi
# Debian's package starts a system Redis on port 6379: the tests never use it.

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

step "client-core builds for wasm32-unknown-unknown"
cargo build -p ivy-client-core --target wasm32-unknown-unknown

results=$(mktemp)
trap 'rm -f "$results"' EXIT

step "the Rust client library alone pulls in none of the CLI's dependencies (they are behind its cli feature)"
cli_only=$(cargo tree -p ivy-client-native -e normal --prefix none | grep -E '^(clap|tracing-subscriber|humantime|rustix) ' || true)
if [ -n "$cli_only" ]; then
  echo "$cli_only"
  echo "check: 0 passed, 1 failed (ivy-client-native without the cli feature)" | tee -a "$results"
else
  echo "check: 1 passed, 0 failed (ivy-client-native without the cli feature: $(cargo tree -p ivy-client-native -e normal --prefix none | sort -u | wc -l) crates)" | tee -a "$results"
fi

step "binaries the integration tests start (ivy-server, ivy; cargo test does not build a dependency's binaries)"
cargo build --workspace --bins

# tests/tests/redis.rs and redis_campaign.rs (three nodes on one Redis, faults) start their own
# redis-server whatever IVY_TEST_ENGINE says: this run covers them; the Redis run below does not
# repeat them.
step "Rust unit, property, doc and integration tests"
cargo test --workspace 2>&1 | tee -a "$results"

step "The protocol's integration tests again, on the in-memory engine (IVY_TEST_ENGINE=memory)"
IVY_TEST_ENGINE=memory cargo test -p ivy-tests --test conformance --test log --test client_native --test client_cli --test idempotency \
  --test hostile --test faults --test embedding --test static_files --test load --test channels_admin --test presence --test presence_clients 2>&1 | tee -a "$results"

step "The protocol's integration tests again, on the Redis engine (IVY_TEST_ENGINE=redis: a redis-server per test)"
IVY_TEST_ENGINE=redis cargo test -p ivy-tests --test conformance --test log --test client_native --test client_cli \
  --test hostile --test faults --test embedding --test static_files --test load --test retention --test http_publish \
  --test senders --test ops --test own_sends --test auth --test presence --test presence_clients --test idempotency --test channels_admin 2>&1 | tee -a "$results"

step "WebAssembly: core tests in Node, browser client in headless Chromium, TypeScript types, imports"
./scripts/test-wasm.sh 2>&1 | tee -a "$results"

step "Web demo: TypeScript check, vite build, browser end-to-end tests (Playwright + Chromium)"
IVY_WASM_PKG_FRESH=1 ./scripts/test-web.sh 2>&1 | tee -a "$results"

step "The example token backend of docs/AUTH.md (Node.js, jose) against ivy-server and ivy"
./scripts/test-example-backend.sh 2>&1 | tee -a "$results"

# One closing line for everything above: 'summary: N passed, N failed, N skipped'.
awk '/^check: [0-9]+ passed, [0-9]+ failed/ { p += $2; f += $4; if ($7 ~ /^skipped/) s += $6 }
     /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, s; if (p == 0 || f > 0) exit 1 }' "$results"
