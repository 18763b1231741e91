#!/usr/bin/env bash
# The README's test command: installs what is needed, builds the C core with
# -Werror, lints the Python, and runs the whole pytest suite on the real
# kernel. Exits non-zero on any failure, including "no tests ran".
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "xo tests need root (namespaces, TCP_REPAIR, BPF)" >&2; exit 1; }
bash ci/install.sh
echo "[xo test] strict C build (libxo.a, -Wall -Wextra -Werror)"
make -s -C xo_core
echo "[xo test] ruff"
.venv/bin/ruff check xo_core/python plugins/ceph tests
echo "[xo test] pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
	echo "pytest collected no tests: that is a failure here" >&2
	exit 1
fi
exit "$rc"
