#!/usr/bin/env bash
# Installs everything XO needs on Debian 12 (root): system packages, the
# virtualenv in .venv (on Debian's python3, so python3-rados can be seen),
# and XO itself in editable mode. Safe to run again: each step is skipped
# when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
	build-essential make pkg-config python3-venv python3-dev libssl-dev
	# the envelope tests model AES-GCM and HKDF with it (the venv sees it)
	python3-cryptography
	clang libclang-rt-14-dev libbpf-dev libmnl-dev
	iproute2 nftables tcpdump curl procps
	# the full-kernel lane (ci/vmlane.sh): QEMU, a static busybox for its
	# initramfs, cpio to pack it, kmod for depmod/modprobe on the unpacked
	# kernel package
	qemu-system-x86 busybox-static cpio kmod
	# the Ceph plugin (plugins/ceph): Debian's Ceph 16.2.15 daemons, the
	# ceph/radosgw-admin tools and librados for Python (on /usr/bin/python3,
	# which .venv is built on)
	ceph-mon ceph-mgr ceph-osd radosgw ceph-common python3-rados
	# the nginx module (ci/build-nginx.sh): Debian's nginx and its module
	# build tree; the static build's libraries (dpkg-dev for apt-get
	# source); wrk for the HTTP and S3
	# benchmarks
	nginx nginx-dev libpcre2-dev zlib1g-dev dpkg-dev wrk
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "[xo install] apt: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
	echo "[xo install] creating .venv"
	/usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi
# setuptools prefers installed copies of the libraries it vendors; Debian's
# older ones (pulled in by ceph-mgr) are seen through --system-site-packages
# and break its build backend, so the venv gets current ones.
.venv/bin/python -m pip install -q --upgrade 'jaraco.functools>=4' 'jaraco.text>=3.12' \
	'jaraco.context>=5' 'more_itertools>=10' 'inflect>=7' 'autocommand>=2.2.2'
echo "[xo install] building and installing xo (editable)"
# ci/build-dev.sh leaves an interpreter-specific build of the cffi module,
# which Python would prefer over the one built here: drop it.
rm -f xo_core/python/xo/_xo_cffi.cpython-*.so
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test,bench]'
echo "[xo install] full-kernel lane: kernel package (cached)"
.venv/bin/python tests/vmlane.py prepare >/dev/null ||
	echo "[xo install] WARNING: the full-kernel lane could not be prepared; its tests will fail" >&2
echo "[xo install] nginx module (dynamic, for Debian's nginx)"
bash ci/build-nginx.sh
echo "[xo install] nginx with XO compiled in (static, from Debian's source package; ~1 min)"
bash ci/build-nginx.sh static
