#!/usr/bin/env bash
# Checks the example token backend of docs/AUTH.md against the real ivy-server and ivy:
# tokens minted by it with a standard JWT library (jose) are accepted, and their grants hold.
# Needs the binaries built (cargo build --workspace --bins) and Node.js; installs jose itself.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
server_bin=$target/debug/ivy-server
ivy_bin=$target/debug/ivy
for bin in "$server_bin" "$ivy_bin"; do
  [ -x "$bin" ] || { echo "missing $bin: run cargo build --workspace --bins first"; exit 1; }
done

(cd docs/examples/token-backend && if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then npm ci --no-audit --no-fund; fi)

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

export IVY_AUTH_HMAC_SECRET="example-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
"$server_bin" --listen 127.0.0.1:0 --data "$work/data" --auth-hmac-secret "$IVY_AUTH_HMAC_SECRET" >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
PORT=0 node docs/examples/token-backend/server.mjs >"$work/backend.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  grep -q 'listening on' "$work/server.out" 2>/dev/null && grep -q 'token backend on' "$work/backend.out" 2>/dev/null && break
  sleep 0.1
done
ivy_url=$(sed -n 's/^ivy-server listening on //p' "$work/server.out")
backend=$(sed -n 's/^token backend on //p' "$work/backend.out")
[ -n "$ivy_url" ] && [ -n "$backend" ] || { cat "$work"/*.out "$work"/*.err; echo "servers did not start"; exit 1; }

passed=0 failed=0
check() { # description, then the command; the command's success is the check
  local what=$1; shift
  if "$@" >"$work/last" 2>&1; then passed=$((passed + 1)); echo "ok: $what"
  else failed=$((failed + 1)); echo "FAILED: $what"; cat "$work/last"; fi
}
token() { curl -sf -X POST -H "Authorization: Bearer $1" "$backend/token" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).token))'; }
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }

ada=$(token ada-session)
bob=$(token bob-session)
check "the backend refuses a caller without a session" test "$(status -X POST "$backend/token")" = 401
check "ada's token writes into a room of hers (ivy send)" "$ivy_bin" --url "$ivy_url" --token "$ada" send /chat/ops "hello from ada"
check "bob's token writes into the lobby" "$ivy_bin" --url "$ivy_url" --token "$bob" send /chat/lobby "hello from bob"
check "bob's token is refused a room he may not write (forbidden, exit 1)" bash -c '! "$0" --url "$1" --token "$2" send /chat/ops x && "$0" --url "$1" --token "$2" send /chat/ops x 2>&1 | grep -q forbidden' "$ivy_bin" "$ivy_url" "$bob"
check "bob's token reads the whole chat's log (ivy log)" bash -c '"$0" --url "$1" --token "$2" log /chat | grep -q "hello from ada"' "$ivy_bin" "$ivy_url" "$bob"
check "/log without a token is 401" test "$(status "$ivy_url/log/chat")" = 401
check "/log outside the grants is 403" test "$(status -H "Authorization: Bearer $bob" "$ivy_url/log/admin")" = 403
echo "check: $passed passed, $failed failed (the example token backend of docs/AUTH.md against ivy-server)"
[ "$failed" = 0 ]
