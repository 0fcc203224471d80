#!/usr/bin/env bash
# Builds and starts the Ivy server on http://127.0.0.1:8080 with its embedded sled store in
# ./ivy-data. Extra arguments go to ivy-server (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -p ivy-server -- "$@"
