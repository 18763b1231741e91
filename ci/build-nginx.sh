#!/usr/bin/env bash
# The XO nginx builds (docs/nginx.md):
#
#   bash ci/build-nginx.sh          the dynamic module for Debian's packaged
#                                   nginx (nginx-dev's tree, Debian's configure
#                                   flags, --with-compat):
#                                   plugins/nginx/build/ngx_http_xo_module.so,
#                                   loaded with `load_module` into /usr/sbin/nginx
#   bash ci/build-nginx.sh static   nginx built from Debian's source package
#                                   (the .orig.tar.gz of `apt-get source
#                                   --download-only nginx`) with the module
#                                   compiled in by `xo nginx build`:
#                                   plugins/nginx/build/static/sbin/nginx
#
# Safe to run again: each rebuilds only when a source is newer than its output.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = "static" ]; then
	BIN=plugins/nginx/build/static/sbin/nginx
	SRCDIR=plugins/nginx/build/src
	make -s -C xo_core build/libxo.a
	if [ -x "$BIN" ] && [ -z "$(find plugins/nginx/ngx_http_xo_module.c \
		xo_core/build/libxo.a xo_core/include xo_core/python/xo/nginx.py \
		-newer "$BIN" 2>/dev/null)" ]; then
		exit 0
	fi
	mkdir -p "$SRCDIR"
	ORIG=$(ls "$SRCDIR"/nginx_*.orig.tar.gz 2>/dev/null | head -1 || true)
	if [ -z "$ORIG" ]; then
		# Debian's source package needs a deb-src line.
		SOURCES=/etc/apt/sources.list.d/xo-deb-src.sources
		if [ ! -f "$SOURCES" ]; then
			cat >"$SOURCES" <<-'EOF'
			Types: deb-src
			URIs: http://deb.debian.org/debian
			Suites: bookworm bookworm-updates
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
			EOF
			apt-get update -qq
		fi
		# Only the upstream tarball is needed (the Debian patches may be
		# missing from the mirror; apt-get then fails after fetching it).
		(cd "$SRCDIR" && apt-get source --download-only nginx >/dev/null 2>&1 || true)
		ORIG=$(ls "$SRCDIR"/nginx_*.orig.tar.gz 2>/dev/null | head -1 || true)
		if [ -z "$ORIG" ]; then
			echo "build-nginx: apt-get source --download-only nginx gave no .orig.tar.gz" >&2
			exit 1
		fi
	fi
	.venv/bin/xo nginx build --source "$ORIG"
	exit 0
fi
OUT=plugins/nginx/build
SO=$OUT/ngx_http_xo_module.so
SRC=/usr/share/nginx/src
if [ ! -x "$SRC/configure" ]; then
	echo "build-nginx: $SRC/configure missing: apt-get install nginx nginx-dev" >&2
	exit 1
fi
make -s -C xo_core build/libxo.a
if [ -f "$SO" ] && [ -z "$(find plugins/nginx/ngx_http_xo_module.c plugins/nginx/config \
	xo_core/build/libxo.a xo_core/include -newer "$SO" 2>/dev/null)" ]; then
	exit 0
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/xo-nginx-dyn.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
cp -a "$SRC/." "$WORK/"
# shellcheck disable=SC1091
. "$SRC/conf_flags"  # NGX_CONF_FLAGS: how Debian configured its nginx
(
	cd "$WORK"
	./configure "${NGX_CONF_FLAGS[@]}" --add-dynamic-module="$ROOT/plugins/nginx" \
		>"$WORK/configure.log" 2>&1 || { tail -20 "$WORK/configure.log"; exit 1; }
	make -f objs/Makefile -j2 modules >"$WORK/make.log" 2>&1 || { grep -B2 -A6 -E "error" "$WORK/make.log" | head -60; exit 1; }
)
cp "$WORK/objs/ngx_http_xo_module.so" "$SO"
echo "build-nginx: $SO"
