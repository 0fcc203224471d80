#!/bin/bash
# A store written by an earlier ivy-server, opened by a later one: every log (whole, and a
# first cursor page) must read back byte for byte, new events go on top, and the earlier
# server is then told the layout is not its own. With `ext=sender` the old events read with an
# unknown sender (`~?`) when the old server did not record senders (layout 3), with the old
# server's senders otherwise; the new one with its own (`~-`, no token). A send with an id
# (`Idempotency-Key`) on the upgraded store is stored once, and still once after a restart
# (the id is stored with its event).
# Usage: scripts/check-store-compat.sh OLD_SERVER NEW_SERVER   (after cargo build -p ivy-client-native;
# the `ivy` binary is taken from $CARGO_TARGET_DIR, default target/)
set -euo pipefail
old=$1 new=$2
ivy="${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/debug/ivy"
work=$(mktemp -d)
trap 'kill "$(cat "$work/pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
port=18717
export IVY_URL=ws://127.0.0.1:$port
start() {
  "$1" --listen 127.0.0.1:$port --data "$work/data" >/dev/null 2>"$work/$2.err" &
  echo $! >"$work/pid"
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/log/" && return 0; sleep 0.1; done
  return 1
}
stop() { kill "$(cat "$work/pid")"; while kill -0 "$(cat "$work/pid")" 2>/dev/null; do sleep 0.1; done; }
logs="/ /a /a/b /a/b/c /a/b/c/d /c /l1 /l1/l2/l3/l4/l5/l6/l7/l8 /l1/l2/l3/l4/l5/l6/l7/l8/l9/l10/l11/l12/l13/l14/l15/l16"
read_all() {
  for l in $logs; do
    n=$(echo "$l" | tr / _)
    curl -s "http://127.0.0.1:$port/log$l" >"$work/$1$n"
    curl -s "http://127.0.0.1:$port/log$l?after=0000000000.000000000&limit=7" >"$work/$1page$n"
  done
}
start "$old" old
big=$(head -c 61440 /dev/zero | tr '\0' z)
for p in /a /a/b /a/b/c/d /c /l1/l2/l3/l4/l5/l6/l7/l8/l9/l10/l11/l12/l13/l14/l15/l16; do
  seq 1 300 | sed "s|^|small-$p-|" | "$ivy" send "$p" >/dev/null
  for i in 1 2 3; do "$ivy" send "$p" "$big$i" >/dev/null; done
done
read_all old
# An old server that records senders (layout 4) shows them; an earlier one ignores ext=sender.
for l in $logs; do
  n=$(echo "$l" | tr / _)
  curl -s "http://127.0.0.1:$port/log$l?ext=sender" >"$work/oldext$n"
done
stop
start "$new" new
read_all new
for l in $logs; do
  n=$(echo "$l" | tr / _)
  curl -s "http://127.0.0.1:$port/log$l?ext=sender" >"$work/newext$n"
done
"$ivy" send /a/b "after the upgrade" >/dev/null
curl -s "http://127.0.0.1:$port/log/a/b?n=1&ext=sender" >"$work/newsender"
idem() { curl -s -D "$work/idem.h" -X POST -H 'Idempotency-Key: compat.1' --data-binary once "http://127.0.0.1:$port/log/idem"; }
first=$(idem)
again=$(idem)
[ "$first" = "$again" ] && grep -qi '^idempotent-replayed: true' "$work/idem.h" || { echo "a repeated Idempotency-Key was not replayed: $first / $again" >&2; exit 1; }
stop
start "$new" new-again
after_restart=$(idem)
grep -qi '^idempotent-replayed: true' "$work/idem.h" && [ "$after_restart" = "$first" ] || { echo "the send id did not survive a restart: $first / $after_restart" >&2; exit 1; }
[ "$(curl -s "http://127.0.0.1:$port/log/idem" | wc -l)" = 0 ] && [ -n "$(curl -s "http://127.0.0.1:$port/log/idem")" ] || { echo "the send with an id is not in the log exactly once" >&2; exit 1; }
echo "a send with an id on the upgraded store: stored once at $first, replayed before and after a restart"
stop
for l in $logs; do
  n=$(echo "$l" | tr / _)
  cmp "$work/old$n" "$work/new$n" && cmp "$work/oldpage$n" "$work/newpage$n"
  if cmp -s "$work/old$n" "$work/oldext$n"; then
    sed 's/^@\([0-9]*\.[0-9]*\):/@\1~?:/' "$work/old$n" | cmp - "$work/newext$n"
    echo "same $l: $(wc -c <"$work/old$n") bytes; with ext=sender, every line's sender is ?"
  else
    cmp "$work/oldext$n" "$work/newext$n"
    echo "same $l: $(wc -c <"$work/old$n") bytes; with ext=sender, the same senders as the old server's"
  fi
done
grep -q '^@[0-9]*\.[0-9]*~-:/a/b:after the upgrade$' "$work/newsender" || { echo "the new event has no sender: $(cat "$work/newsender")" >&2; exit 1; }
echo "the new event has its sender: $(cut -c1-60 "$work/newsender")"
if start "$old" old-again; then stop; echo "the earlier server opened the upgraded store" >&2; exit 1; fi
echo "the earlier server refuses the upgraded store: $(tail -1 "$work/old-again.err")"
