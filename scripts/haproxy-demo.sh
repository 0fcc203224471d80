#!/usr/bin/env bash
# Prints the HAProxy configuration of the multi-node demo's load balancer on stdout:
#
#   scripts/haproxy-demo.sh LISTEN NODE...      e.g. 127.0.0.1:8080 127.0.0.1:8081 127.0.0.1:8082
#
# One place for it: `./scripts/run.sh --nodes N` and the browser end-to-end test of the nodes
# (web-demo/e2e/nodes.test.mjs) both write it to a temporary file and run `haproxy -db -f FILE`.
#
# The balancer passes TCP through (`mode tcp`: the page, its token requests and its WebSocket
# reach a node unchanged, `Host` and `Origin` included), spreads new connections over the nodes
# (`balance roundrobin`) and skips a node that does not answer `GET /readyz` with 200 (checked
# every 500 ms, down after one failure, up again after two successes), so that a page whose node
# died reconnects through it to a live one; a connection refused by a node that died since the
# last check is tried again on another (`retries 3`, `option redispatch`). WebSockets live for
# hours: the client and tunnel timeouts are long (a dead node's connections end at once anyway,
# with the node's TCP reset).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 LISTEN NODE... (HOST:PORT each)" >&2
  exit 2
fi
listen=$1
shift
cat <<EOF
# The Ivy demo's load balancer (scripts/haproxy-demo.sh).
global
    maxconn 4096

defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout check 1s
    retries 3
    option redispatch

frontend ivy
    bind $listen
    default_backend ivy_nodes

backend ivy_nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server check inter 500ms fall 1 rise 2
EOF
i=0
for node in "$@"; do
  i=$((i + 1))
  echo "    server node$i $node"
done
