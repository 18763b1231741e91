#!/usr/bin/env bash
# The README's main command: installs XO and runs it on the built-in default,
# the one-machine lab (client, host, two targets in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "xo needs root (namespaces, TCP_REPAIR, BPF)" >&2; exit 1; }
bash ci/install.sh
mkdir -p results
.venv/bin/xo doctor || true
.venv/bin/xo lab demo "$@"
