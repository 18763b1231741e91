#!/usr/bin/env bash
# The full-kernel lane: runs a command inside Debian's packaged 6.1 kernel
# (tc-flower, act_pedit, act_gact, kTLS, loadable modules) under QEMU TCG,
# with the host root shared read-only and this project read-write.
#
#   bash ci/vmlane.sh prepare              fetch + unpack the kernel (cached)
#   bash ci/vmlane.sh run [-t SEC] CMD...  run CMD in the guest, in the
#                                          project directory; exits with
#                                          CMD's status (125: the guest did
#                                          not report one, 77: no QEMU)
#   bash ci/vmlane.sh pytest [ARGS...]     the fullkernel-marked tests, in
#                                          one pytest process in the guest
#
# See docs/vmlane.md. The work is done by tests/vmlane.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the lane needs root (apt, 9p export of /)" >&2; exit 1; }
PY=.venv/bin/python
[ -x "$PY" ] || PY=/usr/bin/python3
if [ "${1:-}" = pytest ]; then
	shift
	args=""
	[ "$#" = 0 ] || printf -v args ' %q' "$@"
	exec "$PY" tests/vmlane.py run -t "${XO_VMLANE_TIMEOUT:-360}" \
		".venv/bin/python -m pytest -q -p no:cacheprovider -m fullkernel$args"
fi
exec "$PY" tests/vmlane.py "$@"
