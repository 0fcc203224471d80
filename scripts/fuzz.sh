#!/usr/bin/env bash
# Fuzzes the parsers that face untrusted input, one target after another, for SECONDS each
# (default 600): usage `scripts/fuzz.sh [SECONDS]`. Targets (fuzz/fuzz_targets/):
# command_parse, line_parse, path_normalize, log_query; IVY_FUZZ_TARGETS="a b" picks some.
#
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. The committed seeds are in
# fuzz/corpus/<target> (read only); what the fuzzer finds goes to fuzz/work/<target>, a crash
# to fuzz/artifacts/<target>/ (both ignored by git). Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-600}
case $secs in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
targets=${IVY_FUZZ_TARGETS:-"command_parse line_parse path_normalize log_query"}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz
fi

cargo +nightly fuzz build
failed=()
summary=()
for t in $targets; do
  mkdir -p "work/$t"
  printf '\n==> fuzzing %s for %s s\n' "$t" "$secs"
  log="work/$t.log"
  if cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
    tail -n 40 "$log" >&2
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)
  summary+=("$t: $status, ${runs:-?} executions; ${done_line:-no final line} (log: fuzz/$log)")
done

printf '\n==> summary\n'
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
