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
#
# `./scripts/run.sh --nodes N` (N >= 2) runs the chat on N nodes sharing one Redis instead:
# its own redis-server (Debian's, installed with apt when missing) on a free port of 127.0.0.1
# with its files in ./ivy-redis (appendonly yes, appendfsync always: an acknowledged send is on
# disk), N ivy-server nodes `--redis` on 127.0.0.1:8081..808N (same secret and demo settings as
# one node, `--retention-max-age 168h` unless given, node ids node1..nodeN), and a load balancer
# on 127.0.0.1:8080 (Debian's haproxy, installed when missing, configured by
# scripts/haproxy-demo.sh) that spreads the pages over the nodes and skips a dead one: kill a
# node and its pages reconnect through the balancer to another. The other arguments go to every
# node (not --listen: the ports are fixed). Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=${2:-}; shift 2 || { echo "run.sh: --nodes needs a number" >&2; exit 2; } ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ "$nodes" != 0 ] && { ! [[ "$nodes" =~ ^[0-9]+$ ]] || [ "$nodes" -lt 2 ] || [ "$nodes" -gt 100 ]; }; then
  echo "run.sh: --nodes takes a number from 2 to 100 (without it: one node, no Redis), not '$nodes'" >&2
  exit 2
fi
set -- ${args[@]+"${args[@]}"}
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

# Defaults through the environment, so that flags given to this script override them.
export IVY_STATIC_DIR="${IVY_STATIC_DIR:-web-demo/dist}"
if [ -z "${IVY_AUTH_HMAC_SECRET:-}" ]; then
  IVY_AUTH_HMAC_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  echo "auth: a random HMAC secret for this run (set IVY_AUTH_HMAC_SECRET to keep one across runs)" >&2
fi
export IVY_AUTH_HMAC_SECRET
export IVY_DEMO_TOKEN_ENDPOINT="${IVY_DEMO_TOKEN_ENDPOINT:-true}"
export IVY_ANONYMOUS_READ="${IVY_ANONYMOUS_READ:-/chat}"
server="${CARGO_TARGET_DIR:-target}/release/ivy-server"

if [ "$nodes" = 0 ]; then
  step "starting ivy-server with the demo: open the address it prints (http://127.0.0.1:8080 by default); Ctrl-C stops it"
  export IVY_DATA="${IVY_DATA:-./ivy-data}"
  exec "$server" "$@"
fi

# ---- --nodes N: Redis, N nodes, the balancer.
balancer=127.0.0.1:8080
node_port() { echo $((8080 + $1)); }
for p in 8080 $(for i in $(seq 1 "$nodes"); do node_port "$i"; done); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "run.sh: port $p of 127.0.0.1 is in use (--nodes $nodes needs 8080 for the balancer and 8081..$(node_port "$nodes") for the nodes): stop what listens there" >&2
    exit 1
  fi
done

step "Redis and HAProxy (Debian's packages, installed with apt when missing)"
packages=()
command -v redis-server >/dev/null || packages+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || packages+=(haproxy)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${packages[@]}"
fi
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)
export IVY_RETENTION_MAX_AGE="${IVY_RETENTION_MAX_AGE:-168h}"

pids=()
tmp=$(mktemp -d)
stop_all() {
  trap - EXIT INT TERM
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# A free port for Redis (it cannot take port 0 and say which it got): the system's pick.
redis_port=$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')
mkdir -p ivy-redis
step "redis-server on 127.0.0.1:$redis_port, its files in ./ivy-redis (appendonly, appendfsync always)"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$PWD/ivy-redis" --appendonly yes --appendfsync always \
  --save "" --protected-mode no --loglevel warning > >(sed -u 's/^/[redis] /' >&2) 2>&1 &
pids+=($!)
redis_pid=$!
for _ in $(seq 1 100); do
  [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
  kill -0 "$redis_pid" 2>/dev/null || { echo "run.sh: redis-server exited" >&2; exit 1; }
  sleep 0.1
done
[ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] || { echo "run.sh: redis-server does not answer on port $redis_port" >&2; exit 1; }

step "$nodes ivy-server nodes on Redis"
node_addrs=()
for i in $(seq 1 "$nodes"); do
  addr="127.0.0.1:$(node_port "$i")"
  node_addrs+=("$addr")
  IVY_NODE_ID="node$i" "$server" --redis "redis://127.0.0.1:$redis_port" --listen "$addr" "$@" \
    > >(sed -u "s/^/[node$i] /") 2> >(sed -u "s/^/[node$i] /" >&2) &
  pids+=($!)
  node_pids[i]=$!
done
for i in $(seq 1 "$nodes"); do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$(node_port "$i")") 2>/dev/null && break
    kill -0 "${node_pids[i]}" 2>/dev/null || { echo "run.sh: node $i exited (its log is above)" >&2; exit 1; }
    sleep 0.1
  done
done

step "haproxy on $balancer (scripts/haproxy-demo.sh)"
scripts/haproxy-demo.sh "$balancer" "${node_addrs[@]}" > "$tmp/haproxy.cfg"
"$haproxy" -db -f "$tmp/haproxy.cfg" > >(sed -u 's/^/[haproxy] /' >&2) 2>&1 &
pids+=($!)
haproxy_pid=$!

{
  printf '\n==> the chat on %s nodes: open http://%s (the balancer: each page on one node, moved to another when its node dies)\n' "$nodes" "$balancer"
  for i in $(seq 1 "$nodes"); do
    printf '    node%s: http://%s (directly; pid %s: `kill -9 %s` to see its pages move)\n' "$i" "${node_addrs[i - 1]}" "${node_pids[i]}" "${node_pids[i]}"
  done
  printf '    Ctrl-C stops everything. The nickname claims of the demo token endpoint are per node.\n'
} >&2
# Until Ctrl-C, or Redis or the balancer ends (a node may die: that is the point).
wait -n "$redis_pid" "$haproxy_pid" || true
kill -0 "$redis_pid" 2>/dev/null || echo "run.sh: redis-server ended; stopping everything" >&2
kill -0 "$haproxy_pid" 2>/dev/null || echo "run.sh: haproxy ended; stopping everything" >&2
exit 1
