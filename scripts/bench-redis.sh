#!/usr/bin/env bash
# Acked publishes per second: ivy-server on Redis (--redis, one node) against ivy-server on sled
# (--durability sync), the same release build, the same client (ivy-bench's durable scenario
# against a running server), the same machine. APPENDFSYNC=everysec shows what Redis's fsync
# per script costs. Needs redis-server (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ivy-server -p ivy-bench --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
redis_port=${REDIS_PORT:-16399}
ivy_port=${IVY_PORT:-18099}
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
mkdir -p "$dir/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir/redis" --appendonly yes \
  --appendfsync "${APPENDFSYNC:-always}" --save '' --protected-mode no --loglevel warning &
sleep 0.5
run() {
  local name=$1; shift
  RUST_LOG=error "$bin/ivy-server" --listen "127.0.0.1:$ivy_port" --rate-limit 0 "$@" >/dev/null 2>&1 &
  local pid=$!
  sleep 1
  echo "== $name"
  "$bin/ivy-bench" --scenarios durable --servers ivy --ivy-addr "127.0.0.1:$ivy_port" --senders "${SENDERS:-1,16,256}" \
    --durable-secs "${SECS:-3}" --out "$dir/$name.json" --data-dir "$dir" 2>&1 | grep "acked in"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run "redis (appendfsync ${APPENDFSYNC:-always})" --redis "redis://127.0.0.1:$redis_port"
run "sled (--durability sync)" --data "$dir/sled"
