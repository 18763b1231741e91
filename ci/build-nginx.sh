#!/usr/bin/env bash
# Builds the XO nginx module as a dynamic module for Debian's packaged nginx
# (nginx-dev's source tree, Debian's configure flags, --with-compat):
#   plugins/nginx/build/ngx_http_xo_module.so
# Load it with `load_module /path/ngx_http_xo_module.so;` in Debian's
# /usr/sbin/nginx. The static build from a patched source tree is
# `xo nginx build` (docs/nginx.md). Safe to run again: rebuilds only when a
# source is newer than the module.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
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
