#!/bin/bash
# The storage scenario of ivy-bench with two ivy-server binaries alternated (before, after,
# after, before, before, after), each run on a fresh store; one JSON file per run in OUTDIR.
# Usage: scripts/bench-storage-alternated.sh BEFORE_SERVER AFTER_SERVER OUTDIR [ivy-bench options...]
# Build ivy-bench first (cargo build --release -p ivy-bench); compare the medians of the runs.
set -euo pipefail
before=$1 after=$2 out=$3
shift 3
bench="$(dirname "$0")/../target/release/ivy-bench"
mkdir -p "$out"
i=0
for which in before after after before before after; do
  i=$((i + 1))
  if [ "$which" = before ]; then bin=$before; else bin=$after; fi
  echo "run $i ($which): load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  "$bench" --scenarios storage --servers ivy --ivy-server "$bin" --out "$out/$i-$which.json" "$@"
done
