#!/usr/bin/env bash
# Benchmarks ivy-server against nats-server and an ideal broadcast server (issue 7).
#
#   ./scripts/bench.sh            # the default run: a few minutes on 2 cores
#   ./scripts/bench.sh --full     # the issue's sizes: 10,000 subscribers, 10,000 events/s
#   ./scripts/bench.sh -- ARGS    # extra ivy-bench arguments (see ivy-bench --help)
#
# Installs what is missing (nats-server, fonts for the plots) with apt, builds in release,
# runs ivy-bench, writes results/bench-<date>.json, the plots in docs/bench/, and the
# generated section of docs/BENCHMARKS.md. Servers listen on 127.0.0.1 only; the client
# spreads its connections over loopback source addresses (fresh ones for each scenario).
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --) shift; extra=("$@"); break ;;
    *) extra+=("$1") ;;
  esac
  shift
done

need=()
command -v nats-server >/dev/null || need+=(nats-server)
command -v prlimit >/dev/null || need+=(util-linux)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench.sh: installing ${need[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >&2
fi

echo "bench.sh: building (release)" >&2
cargo build --release -q -p ivy-server -p ivy-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/release"

date=$(date -u +%Y-%m-%d-%H%M%S)
mkdir -p results docs/bench
out="results/bench-$date.json"

if [ "$full" = 1 ]; then
  sizes=(--subscribers 1000,10000 --latency-subscribers 1000 --latency-rate 500 --idle-connections 50000)
  shown="./scripts/bench.sh --full"
else
  sizes=()
  shown="./scripts/bench.sh"
fi
[ ${#extra[@]} -gt 0 ] && shown="$shown -- ${extra[*]}"

echo "bench.sh: load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$bin/ivy-bench" --scenarios all --repo . "${sizes[@]}" "${extra[@]}" \
  --out "$out" --plots docs/bench --doc docs/BENCHMARKS.md --command "$shown"
echo "bench.sh: results in $out; docs/BENCHMARKS.md and docs/bench/*.png regenerated" >&2
