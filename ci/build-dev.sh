#!/usr/bin/env bash
# Rebuilds the C core (strict static library), the eBPF objects and the cffi
# extension in place, for developers iterating on C. Serialized with flock
# so parallel builds in one tree do not trample each other.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/xo-build.lock
flock 9
make -s -C xo_core
if [ -f bpf/Makefile ]; then
	make -s -C bpf
	mkdir -p xo_core/python/xo/data
	cp bpf/build/*.bpf.o xo_core/python/xo/data/ 2>/dev/null || true
fi
.venv/bin/python xo_core/python/xo/_build_cffi.py >/dev/null
