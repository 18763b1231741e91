// SPDX-License-Identifier: MIT
/* The small control-message payloads (layouts in xo.h). */
#include <string.h>
#include <sys/socket.h>

#include "internal.h"
#include "wire.h"

int xo_ready_encode(const struct xo_endpoint *ep, uint8_t *out, size_t cap)
{
	xo_clear_error();
	if (!ep || !out)
		return xo_fail(XO_E_INVAL, "ready: NULL argument");
	if (cap < XO_READY_LEN)
		return xo_fail(XO_E_NOSPACE, "ready: need %d bytes, have %zu",
			       XO_READY_LEN, cap);
	if ((ep->family != AF_INET && ep->family != AF_INET6) || !ep->port)
		return xo_fail(XO_E_INVAL, "ready: family %u port %u",
			       ep->family, ep->port);
	out[0] = ep->family == AF_INET6 ? 6 : 4;
	memcpy(out + 1, ep->addr, 16);
	if (ep->family == AF_INET)
		memset(out + 5, 0, 12);
	xo_put16(out + 17, ep->port);
	return XO_READY_LEN;
}

int xo_ready_decode(const uint8_t *buf, size_t len, struct xo_endpoint *ep)
{
	xo_clear_error();
	if (!buf || !ep)
		return xo_fail(XO_E_INVAL, "ready: NULL argument");
	if (len != XO_READY_LEN)
		return xo_fail(len < XO_READY_LEN ? XO_E_TRUNCATED : XO_E_LENGTH,
			       "ready: %zu bytes, must be %d", len,
			       XO_READY_LEN);
	if (buf[0] != 4 && buf[0] != 6)
		return xo_fail(XO_E_FIELD, "ready: family %u (want 4 or 6)",
			       buf[0]);
	if (buf[0] == 4 && memcmp(buf + 5, "\0\0\0\0\0\0\0\0\0\0\0\0", 12))
		return xo_fail(XO_E_FIELD,
			       "ready: IPv4 address with IPv6-only bytes set");
	memset(ep, 0, sizeof(*ep));
	ep->family = buf[0] == 6 ? AF_INET6 : AF_INET;
	memcpy(ep->addr, buf + 1, 16);
	ep->port = xo_get16(buf + 17);
	if (!ep->port)
		return xo_fail(XO_E_FIELD, "ready: port 0");
	return 0;
}

int xo_abort_encode(uint32_t reason, const char *text, uint32_t text_len,
		    uint8_t *out, size_t cap)
{
	xo_clear_error();
	if (!out || (text_len && !text))
		return xo_fail(XO_E_INVAL, "abort: NULL argument");
	if (text_len > XO_ABORT_MAX_TEXT)
		text_len = XO_ABORT_MAX_TEXT;
	if (cap < 4 + (size_t)text_len)
		return xo_fail(XO_E_NOSPACE, "abort: need %u bytes, have %zu",
			       4 + text_len, cap);
	xo_put32(out, reason);
	xo_put_bytes(out + 4, (const uint8_t *)text, text_len);
	return (int)(4 + text_len);
}

int xo_abort_decode(const uint8_t *buf, size_t len, uint32_t *reason,
		    const uint8_t **text, uint32_t *text_len)
{
	xo_clear_error();
	if (!buf || !reason || !text || !text_len)
		return xo_fail(XO_E_INVAL, "abort: NULL argument");
	if (len < 4)
		return xo_fail(XO_E_TRUNCATED, "abort: %zu bytes, need 4", len);
	if (len - 4 > XO_ABORT_MAX_TEXT)
		return xo_fail(XO_E_TOO_LARGE, "abort: %zu bytes of text > %d",
			       len - 4, XO_ABORT_MAX_TEXT);
	*reason = xo_get32(buf);
	*text = buf + 4;
	*text_len = (uint32_t)(len - 4);
	return 0;
}

int xo_load_encode(const struct xo_load_report *r, uint8_t *out, size_t cap)
{
	xo_clear_error();
	if (!r || !out)
		return xo_fail(XO_E_INVAL, "load report: NULL argument");
	if (cap < XO_LOAD_LEN)
		return xo_fail(XO_E_NOSPACE, "load report: need %d bytes",
			       XO_LOAD_LEN);
	xo_put32(out, r->active);
	xo_put32(out + 4, r->handoffs);
	xo_put64(out + 8, r->bytes_served);
	return XO_LOAD_LEN;
}

int xo_load_decode(const uint8_t *buf, size_t len, struct xo_load_report *r)
{
	xo_clear_error();
	if (!buf || !r)
		return xo_fail(XO_E_INVAL, "load report: NULL argument");
	if (len != XO_LOAD_LEN)
		return xo_fail(len < XO_LOAD_LEN ? XO_E_TRUNCATED : XO_E_LENGTH,
			       "load report: %zu bytes, must be %d", len,
			       XO_LOAD_LEN);
	r->active = xo_get32(buf);
	r->handoffs = xo_get32(buf + 4);
	r->bytes_served = xo_get64(buf + 8);
	return 0;
}
