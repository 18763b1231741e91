// SPDX-License-Identifier: MIT
/*
 * Wire format of a connection state (big-endian throughout):
 *
 *   "XOST" | version u16 | flags u16 (0) | total length u32 | fields...
 *   field:   type u16 | field flags u16 | length u32 | value
 *
 * A field with XO_FIELD_OPTIONAL set may be skipped by a reader that does
 * not know its type; an unknown field without it is an error. This lets a
 * minor addition travel to older readers while anything they must
 * understand is refused cleanly. A new major version bumps XO_STATE_VERSION.
 *
 * The encoding is canonical: known fields appear in increasing type order,
 * each with the flags the encoder gives it (0 for required fields 1-4,
 * XO_FIELD_OPTIONAL for 5-9, 0 for 10), and a field with nothing to say is
 * left out.
 *
 * Field 10, TLS record state, is present only for a TLS connection but is
 * never skippable: a reader that does not know it must refuse the state,
 * not restore the connection without its keys.
 *   version u16 | cipher u16 | directions u8 (1 TX, 2 RX) | key length u8
 *   | IV length u8 | salt length u8 | per direction, TX first:
 *   key | IV | salt | record sequence number u64 The decoder refuses anything else, so every accepted input
 * (less any unknown optional fields it skipped) re-encodes to itself.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"
#include "wire.h"

#define XO_STATE_MAGIC "XOST"
#define XO_STATE_HDR_LEN 12
#define XO_FIELD_HDR_LEN 8
#define XO_FIELD_OPTIONAL 1
#define XO_ENDPOINT_LEN 24

enum xo_field {
	F_ENDPOINTS = 1, /* local + remote, required */
	F_SEQ = 2,       /* snd_seq, rcv_seq, required */
	F_WINDOW = 3,    /* TCP_REPAIR_WINDOW, required */
	F_OPTIONS = 4,   /* options, wscales, mss, timestamp, required */
	F_SENDQ = 5,     /* inflight_len u32 + queue bytes */
	F_RECVQ = 6,
	F_APP = 7,
	F_META = 8,
	F_PEER_MAC = 9,
	F_TLS = 10,      /* TLS record state; never skippable */
	F_MAX = 10,
};

static const char *const field_names[] = {
	"?", "endpoints", "sequence numbers", "window", "options",
	"send queue", "receive queue", "application data", "metadata",
	"peer MAC", "TLS",
};

/* Fields 1-4 are required, the rest optional (the flag a reader needs to
 * skip a type it does not know). */
static uint16_t field_flags(int type)
{
	return type >= F_SENDQ && type != F_TLS ? XO_FIELD_OPTIONAL : 0;
}

#define TLS_HDR_LEN 8

/* Re-raise the last error with a prefix (the sentence is copied first:
 * xo_fail() writes where xo_last_error() points). */
static int again(int code, const char *prefix)
{
	char why[512];

	snprintf(why, sizeof(why), "%s", xo_last_error());
	return xo_fail(code, "%s: %s", prefix, why);
}

static int tls_dirs(uint8_t dirs)
{
	return !!(dirs & XO_TLS_DIR_TX) + !!(dirs & XO_TLS_DIR_RX);
}

static size_t tls_len(const struct xo_tls_state *t)
{
	uint32_t key = 0, iv = 0, salt = 0;

	if (!t || xo_tls_sizes(t->cipher, &key, &iv, &salt))
		return TLS_HDR_LEN; /* encode refuses it first */
	return TLS_HDR_LEN + (size_t)tls_dirs(t->dirs) * (key + iv + salt + 8);
}

static size_t field_len(const struct xo_tcp_state *st, int type)
{
	switch (type) {
	case F_ENDPOINTS:
		return 2 * XO_ENDPOINT_LEN;
	case F_SEQ:
		return 8;
	case F_WINDOW:
		return 20;
	case F_OPTIONS:
		return 12;
	case F_SENDQ:
		return 4 + (size_t)st->inflight_len + st->unsent_len;
	case F_RECVQ:
		return st->recvq_len;
	case F_APP:
		return st->app_len;
	case F_META:
		return st->meta_len;
	case F_PEER_MAC:
		return 6;
	case F_TLS:
		return tls_len(st->tls);
	}
	return 0;
}

/* Optional fields with nothing to say are left out. */
static int field_present(const struct xo_tcp_state *st, int type)
{
	switch (type) {
	case F_SENDQ:
		return st->inflight_len || st->unsent_len;
	case F_RECVQ:
		return st->recvq_len != 0;
	case F_APP:
		return st->app_len != 0;
	case F_META:
		return st->meta_len != 0;
	case F_PEER_MAC:
		return st->has_peer_mac;
	case F_TLS:
		return st->tls != NULL;
	}
	return 1;
}

size_t xo_state_encoded_size(const struct xo_tcp_state *st)
{
	size_t total = XO_STATE_HDR_LEN;

	for (int t = 1; t <= F_MAX; t++)
		if (field_present(st, t))
			total += XO_FIELD_HDR_LEN + field_len(st, t);
	return total;
}

static uint8_t *put_endpoint(uint8_t *p, const struct xo_endpoint *ep)
{
	p = xo_put16(p, ep->family == AF_INET6 ? 6 : 4);
	p = xo_put16(p, ep->port);
	p = xo_put32(p, ep->scope_id);
	memcpy(p, ep->addr, 16);
	return p + 16;
}

static uint8_t *put_field(uint8_t *p, const struct xo_tcp_state *st, int type)
{
	p = xo_put16(p, type);
	p = xo_put16(p, field_flags(type));
	p = xo_put32(p, (uint32_t)field_len(st, type));
	switch (type) {
	case F_ENDPOINTS:
		p = put_endpoint(p, &st->local);
		return put_endpoint(p, &st->remote);
	case F_SEQ:
		p = xo_put32(p, st->snd_seq);
		return xo_put32(p, st->rcv_seq);
	case F_WINDOW:
		p = xo_put32(p, st->snd_wl1);
		p = xo_put32(p, st->snd_wnd);
		p = xo_put32(p, st->max_window);
		p = xo_put32(p, st->rcv_wnd);
		return xo_put32(p, st->rcv_wup);
	case F_OPTIONS:
		*p++ = st->options;
		*p++ = st->snd_wscale;
		*p++ = st->rcv_wscale;
		*p++ = 0;
		p = xo_put32(p, st->mss_clamp);
		return xo_put32(p, st->timestamp);
	case F_SENDQ:
		p = xo_put32(p, st->inflight_len);
		return xo_put_bytes(p, st->sendq,
				    (size_t)st->inflight_len + st->unsent_len);
	case F_RECVQ:
		return xo_put_bytes(p, st->recvq, st->recvq_len);
	case F_APP:
		return xo_put_bytes(p, st->app_data, st->app_len);
	case F_META:
		return xo_put_bytes(p, st->meta, st->meta_len);
	case F_PEER_MAC:
		return xo_put_bytes(p, st->peer_mac, 6);
	case F_TLS: {
		const struct xo_tls_state *t = st->tls;
		uint32_t key, iv, salt;

		xo_tls_sizes(t->cipher, &key, &iv, &salt); /* checked */
		p = xo_put16(p, t->version);
		p = xo_put16(p, t->cipher);
		*p++ = t->dirs;
		*p++ = (uint8_t)key;
		*p++ = (uint8_t)iv;
		*p++ = (uint8_t)salt;
		for (int i = 0; i < 2; i++) {
			const struct xo_tls_dir *d = i ? &t->rx : &t->tx;

			if (!(t->dirs & (i ? XO_TLS_DIR_RX : XO_TLS_DIR_TX)))
				continue;
			p = xo_put_bytes(p, d->key, key);
			p = xo_put_bytes(p, d->iv, iv);
			p = xo_put_bytes(p, d->salt, salt);
			p = xo_put64(p, d->rec_seq);
		}
		return p;
	}
	}
	return p;
}

int64_t xo_state_encode(const struct xo_tcp_state *st, uint8_t *out,
			size_t cap)
{
	size_t need;
	uint8_t *p = out;

	xo_clear_error();
	if (!st || !out)
		return xo_fail(XO_E_INVAL, "encode: NULL argument");
	if (st->tls && xo_tls_check(st->tls))
		return again(XO_E_FIELD, "encode");
	need = xo_state_encoded_size(st);
	if (need > cap)
		return xo_fail(XO_E_NOSPACE, "encode: need %zu bytes, have %zu",
			       need, cap);
	if (need > UINT32_MAX)
		return xo_fail(XO_E_TOO_LARGE, "encode: %zu bytes", need);
	memcpy(p, XO_STATE_MAGIC, 4);
	p = xo_put16(p + 4, XO_STATE_VERSION);
	p = xo_put16(p, 0);
	p = xo_put32(p, (uint32_t)need);
	for (int t = 1; t <= F_MAX; t++)
		if (field_present(st, t))
			p = put_field(p, st, t);
	return (int64_t)(p - out);
}

/* ---- decoding: nothing is trusted, every length is checked ---------- */

static int get_endpoint(const uint8_t *p, struct xo_endpoint *ep,
			const char *which)
{
	uint16_t fam = xo_get16(p);

	if (fam != 4 && fam != 6)
		return xo_fail(XO_E_FIELD,
			       "decode: %s endpoint family %u (want 4 or 6)",
			       which, fam);
	ep->family = fam == 6 ? AF_INET6 : AF_INET;
	ep->port = xo_get16(p + 2);
	ep->scope_id = xo_get32(p + 4);
	memcpy(ep->addr, p + 8, 16);
	if (ep->port == 0)
		return xo_fail(XO_E_FIELD, "decode: %s port is 0", which);
	if (fam == 4 && (ep->scope_id || memcmp(ep->addr + 4,
						"\0\0\0\0\0\0\0\0\0\0\0\0", 12)))
		return xo_fail(XO_E_FIELD,
			       "decode: %s IPv4 endpoint has IPv6-only bytes set",
			       which);
	return 0;
}

static int dup_bytes(uint8_t **dst, const uint8_t *src, size_t len,
		     const char *what)
{
	if (!len)
		return 0;
	*dst = malloc(len);
	if (!*dst)
		return xo_fail(XO_E_NOMEM, "decode: %zu bytes for %s", len,
			       what);
	memcpy(*dst, src, len);
	return 0;
}

static int check_fixed(int type, uint32_t len, uint32_t want)
{
	if (len != want)
		return xo_fail(XO_E_LENGTH,
			       "decode: %s field is %u bytes, must be %u",
			       field_names[type], len, want);
	return 0;
}

static int decode_tls(const uint8_t *v, uint32_t len, struct xo_tcp_state *st)
{
	uint32_t key, iv, salt, want;
	struct xo_tls_state *t;
	const uint8_t *p;
	uint16_t version, cipher;
	int ret;

	if (len < TLS_HDR_LEN)
		return xo_fail(XO_E_LENGTH,
			       "decode: TLS field is %u bytes, its header alone needs %d",
			       len, TLS_HDR_LEN);
	version = xo_get16(v);
	cipher = xo_get16(v + 2);
	ret = xo_tls_sizes(cipher, &key, &iv, &salt);
	if (ret)
		return again(XO_E_FIELD, "decode");
	if (version != XO_TLS_1_2 && version != XO_TLS_1_3)
		return xo_fail(XO_E_FIELD,
			       "decode: TLS version 0x%04x (want 0x0303 or 0x0304)",
			       version);
	if (!v[4] || v[4] & ~(XO_TLS_DIR_TX | XO_TLS_DIR_RX))
		return xo_fail(XO_E_FIELD,
			       "decode: TLS direction bits 0x%x (want TX 1, RX 2 or both)",
			       v[4]);
	if (v[5] != key || v[6] != iv || v[7] != salt)
		return xo_fail(XO_E_LENGTH,
			       "decode: TLS %s with key/IV/salt of %u/%u/%u bytes, the cipher's are %u/%u/%u",
			       xo_tls_cipher_name(cipher), v[5], v[6], v[7],
			       key, iv, salt);
	want = TLS_HDR_LEN + (uint32_t)tls_dirs(v[4]) * (key + iv + salt + 8);
	if (len != want)
		return xo_fail(XO_E_LENGTH,
			       "decode: TLS field is %u bytes, %s with %d direction(s) takes %u",
			       len, xo_tls_cipher_name(cipher), tls_dirs(v[4]),
			       want);
	t = xo_secret_alloc(sizeof(*t));
	if (!t)
		return XO_E_NOMEM;
	st->tls = t; /* released with st on any failure */
	t->version = version;
	t->cipher = cipher;
	t->dirs = v[4];
	p = v + TLS_HDR_LEN;
	for (int i = 0; i < 2; i++) {
		struct xo_tls_dir *d = i ? &t->rx : &t->tx;

		if (!(t->dirs & (i ? XO_TLS_DIR_RX : XO_TLS_DIR_TX)))
			continue;
		memcpy(d->key, p, key);
		memcpy(d->iv, p + key, iv);
		memcpy(d->salt, p + key + iv, salt);
		d->rec_seq = xo_get64(p + key + iv + salt);
		p += key + iv + salt + 8;
	}
	ret = xo_tls_check(t);
	if (ret)
		return again(ret, "decode");
	return 0;
}

static int decode_field(int type, const uint8_t *v, uint32_t len,
			struct xo_tcp_state *st)
{
	int ret;

	switch (type) {
	case F_ENDPOINTS:
		ret = check_fixed(type, len, 2 * XO_ENDPOINT_LEN);
		if (!ret)
			ret = get_endpoint(v, &st->local, "local");
		if (!ret)
			ret = get_endpoint(v + XO_ENDPOINT_LEN, &st->remote,
					   "remote");
		if (!ret && st->local.family != st->remote.family)
			ret = xo_fail(XO_E_FIELD,
				      "decode: local and remote families differ");
		return ret;
	case F_SEQ:
		ret = check_fixed(type, len, 8);
		if (ret)
			return ret;
		st->snd_seq = xo_get32(v);
		st->rcv_seq = xo_get32(v + 4);
		return 0;
	case F_WINDOW:
		ret = check_fixed(type, len, 20);
		if (ret)
			return ret;
		st->snd_wl1 = xo_get32(v);
		st->snd_wnd = xo_get32(v + 4);
		st->max_window = xo_get32(v + 8);
		st->rcv_wnd = xo_get32(v + 12);
		st->rcv_wup = xo_get32(v + 16);
		return 0;
	case F_OPTIONS:
		ret = check_fixed(type, len, 12);
		if (ret)
			return ret;
		st->options = v[0];
		st->snd_wscale = v[1];
		st->rcv_wscale = v[2];
		st->mss_clamp = xo_get32(v + 4);
		st->timestamp = xo_get32(v + 8);
		if (st->options & ~(XO_OPT_TIMESTAMPS | XO_OPT_SACK |
				    XO_OPT_WSCALE))
			return xo_fail(XO_E_FIELD, "decode: option bits 0x%x",
				       st->options);
		/* RFC 7323: the shift count is at most 14. */
		if (st->snd_wscale > 14 || st->rcv_wscale > 14)
			return xo_fail(XO_E_FIELD,
				       "decode: window scale %u/%u > 14",
				       st->snd_wscale, st->rcv_wscale);
		if (!(st->options & XO_OPT_WSCALE) &&
		    (st->snd_wscale || st->rcv_wscale))
			return xo_fail(XO_E_FIELD,
				       "decode: window scales set but not negotiated");
		if (st->mss_clamp == 0 || st->mss_clamp > 65535)
			return xo_fail(XO_E_FIELD, "decode: MSS clamp %u",
				       st->mss_clamp);
		if (v[3])
			return xo_fail(XO_E_FIELD,
				       "decode: reserved options byte set");
		return 0;
	case F_SENDQ:
		if (len <= 4)
			return xo_fail(XO_E_LENGTH,
				       "decode: send queue field is %u bytes, need 4 + at least 1",
				       len);
		st->inflight_len = xo_get32(v);
		if (st->inflight_len > len - 4)
			return xo_fail(XO_E_LENGTH,
				       "decode: %u in-flight bytes announced, %u present",
				       st->inflight_len, len - 4);
		st->unsent_len = len - 4 - st->inflight_len;
		if (len - 4 > XO_MAX_QUEUE_BYTES)
			return xo_fail(XO_E_TOO_LARGE,
				       "decode: send queue %u bytes", len - 4);
		return dup_bytes(&st->sendq, v + 4, len - 4, "send queue");
	case F_RECVQ:
		if (!len)
			return xo_fail(XO_E_LENGTH,
				       "decode: empty receive queue field (an empty queue is left out)");
		if (len > XO_MAX_QUEUE_BYTES)
			return xo_fail(XO_E_TOO_LARGE,
				       "decode: receive queue %u bytes", len);
		st->recvq_len = len;
		return dup_bytes(&st->recvq, v, len, "receive queue");
	case F_APP:
		if (!len)
			return xo_fail(XO_E_LENGTH,
				       "decode: empty application data field (left out when empty)");
		if (len > XO_MAX_APP_BYTES)
			return xo_fail(XO_E_TOO_LARGE,
				       "decode: application data %u bytes", len);
		st->app_len = len;
		return dup_bytes(&st->app_data, v, len, "application data");
	case F_META:
		if (!len)
			return xo_fail(XO_E_LENGTH,
				       "decode: empty metadata field (left out when empty)");
		if (len > XO_MAX_META_BYTES)
			return xo_fail(XO_E_TOO_LARGE,
				       "decode: metadata %u bytes", len);
		st->meta_len = len;
		return dup_bytes(&st->meta, v, len, "metadata");
	case F_PEER_MAC:
		ret = check_fixed(type, len, 6);
		if (ret)
			return ret;
		memcpy(st->peer_mac, v, 6);
		st->has_peer_mac = 1;
		return 0;
	case F_TLS:
		return decode_tls(v, len, st);
	}
	return 0;
}

static int decode(const uint8_t *buf, size_t len, struct xo_tcp_state *st)
{
	uint32_t seen = 0, total;
	int last = 0;
	uint16_t version;
	size_t off;
	int ret;

	if (len < XO_STATE_HDR_LEN)
		return xo_fail(XO_E_TRUNCATED,
			       "decode: %zu bytes, a state header needs %d", len,
			       XO_STATE_HDR_LEN);
	if (memcmp(buf, XO_STATE_MAGIC, 4))
		return xo_fail(XO_E_BAD_MAGIC,
			       "decode: not an XO connection state (bad magic)");
	version = xo_get16(buf + 4);
	if (version != XO_STATE_VERSION)
		return xo_fail(XO_E_VERSION,
			       "decode: state version %u, this build reads version %d",
			       version, XO_STATE_VERSION);
	if (xo_get16(buf + 6))
		return xo_fail(XO_E_FIELD, "decode: header flags 0x%x",
			       xo_get16(buf + 6));
	total = xo_get32(buf + 8);
	if (total > len)
		return xo_fail(XO_E_TRUNCATED,
			       "decode: header announces %u bytes, %zu present",
			       total, len);
	if (total < len)
		return xo_fail(XO_E_LENGTH,
			       "decode: %zu trailing bytes after the state",
			       len - total);

	for (off = XO_STATE_HDR_LEN; off < total;) {
		uint16_t type, flags;
		uint32_t flen;

		if (total - off < XO_FIELD_HDR_LEN)
			return xo_fail(XO_E_TRUNCATED,
				       "decode: field header cut at byte %zu",
				       off);
		type = xo_get16(buf + off);
		flags = xo_get16(buf + off + 2);
		flen = xo_get32(buf + off + 4);
		off += XO_FIELD_HDR_LEN;
		if (flen > total - off)
			return xo_fail(XO_E_TRUNCATED,
				       "decode: field %u announces %u bytes, %zu left",
				       type, flen, total - off);
		if (flags & ~XO_FIELD_OPTIONAL)
			return xo_fail(XO_E_FIELD,
				       "decode: field %u has unknown flags 0x%x",
				       type, flags);
		if (type == 0 || type > F_MAX) {
			if (!(flags & XO_FIELD_OPTIONAL))
				return xo_fail(XO_E_FIELD,
					       "decode: unknown required field %u (newer sender?)",
					       type);
			off += flen;
			continue;
		}
		if (seen & (1u << type))
			return xo_fail(XO_E_DUPLICATE,
				       "decode: %s field appears twice",
				       field_names[type]);
		seen |= 1u << type;
		if (type < last)
			return xo_fail(XO_E_FIELD,
				       "decode: %s field after %s field (fields go in type order)",
				       field_names[type], field_names[last]);
		last = type;
		if (flags != field_flags(type))
			return xo_fail(XO_E_FIELD,
				       "decode: %s field has flags 0x%x, it is always written with 0x%x",
				       field_names[type], flags, field_flags(type));
		ret = decode_field(type, buf + off, flen, st);
		if (ret)
			return ret;
		off += flen;
	}
	for (int t = F_ENDPOINTS; t <= F_OPTIONS; t++)
		if (!(seen & (1u << t)))
			return xo_fail(XO_E_MISSING, "decode: no %s field",
				       field_names[t]);
	return 0;
}

int xo_state_decode(const uint8_t *buf, size_t len, struct xo_tcp_state *st)
{
	int ret;

	xo_clear_error();
	if (!buf || !st)
		return xo_fail(XO_E_INVAL, "decode: NULL argument");
	memset(st, 0, sizeof(*st));
	ret = decode(buf, len, st);
	if (ret)
		xo_state_release(st);
	return ret;
}
