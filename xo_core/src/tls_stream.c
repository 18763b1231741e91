// SPDX-License-Identifier: MIT
/*
 * A TLS stream over the core's record layer, without I/O: the caller puts
 * the ciphertext it read from a (non-blocking) socket in, takes plaintext
 * out, gives plaintext to seal and takes the ciphertext to send. Partial
 * records on the way in and ciphertext not sent yet stay here, so an
 * event loop can stop at EAGAIN anywhere. The session's state to hand off
 * next exists only at a record boundary with nothing held either way.
 *
 * Input: one buffer of two records' room. A record is decrypted in place
 * and its plaintext handed out from there; it leaves the buffer once all
 * of it was read. Output: whole records sealed into a buffer of
 * XO_TLS_STREAM_OUT_CAP bytes, sent from its front.
 */
#include <openssl/crypto.h>
#include <string.h>

#include "internal.h"

#define IN_CAP (2 * XO_TLS_MAX_RECORD)

struct xo_tls_stream {
	struct xo_tls_rec *rec;
	int err;            /* a bad record ends the session (sticky) */
	int closed;         /* an alert came: no more input */
	size_t in_start, in_end;
	uint8_t *pt;        /* plaintext of the record at in_start */
	size_t pt_len;
	size_t rec_len;     /* that record's length on the wire */
	size_t out_start, out_end;
	uint8_t in[IN_CAP];
	uint8_t out[XO_TLS_STREAM_OUT_CAP];
};

int xo_tls_stream_new(const struct xo_tls_state *tls, struct xo_tls_stream **out)
{
	struct xo_tls_stream *s;
	int ret;

	xo_clear_error();
	if (!out)
		return xo_fail(XO_E_INVAL, "TLS stream: NULL output");
	*out = NULL;
	s = xo_secret_alloc(sizeof(*s));
	if (!s)
		return XO_E_NOMEM;
	ret = xo_tls_rec_new(tls, &s->rec);
	if (ret) {
		xo_secret_free(s);
		return ret;
	}
	*out = s;
	return 0;
}

void xo_tls_stream_free(struct xo_tls_stream *s)
{
	if (!s)
		return;
	xo_tls_rec_free(s->rec);
	xo_secret_free(s); /* wipes the buffers */
}

uint8_t *xo_tls_stream_in_space(struct xo_tls_stream *s, size_t *room)
{
	if (!s->pt_len && s->in_start) {
		memmove(s->in, s->in + s->in_start, s->in_end - s->in_start);
		s->in_end -= s->in_start;
		s->in_start = 0;
	}
	*room = s->err || s->closed ? 0 : IN_CAP - s->in_end;
	return s->in + s->in_end;
}

int xo_tls_stream_in_commit(struct xo_tls_stream *s, size_t n)
{
	xo_clear_error();
	if (n > IN_CAP - s->in_end)
		return xo_fail(XO_E_INVAL, "TLS stream: %zu bytes committed, room for %zu",
			       n, IN_CAP - s->in_end);
	s->in_end += n;
	return 0;
}

int64_t xo_tls_stream_read(struct xo_tls_stream *s, uint8_t *buf, size_t len,
			   int *closed)
{
	struct xo_tls_record r;
	int64_t n;

	xo_clear_error();
	*closed = 0;
	if (s->err)
		return xo_fail(s->err, "TLS stream: the session ended at a bad record");
	for (;;) {
		if (s->pt_len) {
			n = (int64_t)(len < s->pt_len ? len : s->pt_len);
			memcpy(buf, s->pt, (size_t)n);
			OPENSSL_cleanse(s->pt, (size_t)n);
			s->pt += n;
			s->pt_len -= (size_t)n;
			if (!s->pt_len)
				s->in_start += s->rec_len;
			return n;
		}
		if (s->closed) {
			*closed = 1;
			return 0;
		}
		n = xo_tls_rec_open(s->rec, s->in + s->in_start,
				    s->in_end - s->in_start, &r);
		if (n < 0) {
			s->err = (int)n;
			return n;
		}
		if (!n)
			return 0; /* a whole record is not here yet */
		if (r.type == 23) {
			s->pt = r.data;
			s->pt_len = r.len;
			s->rec_len = (size_t)n;
			if (!r.len)
				s->in_start += (size_t)n;
			continue;
		}
		s->in_start += (size_t)n;
		if (r.type == 21) { /* close_notify or a fatal alert */
			OPENSSL_cleanse(r.data, r.len);
			s->closed = 1;
			continue;
		}
		s->err = XO_E_UNSUPPORTED;
		return xo_fail(XO_E_UNSUPPORTED,
			       "TLS stream: record type %u (post-handshake messages such "
			       "as KeyUpdate are not supported)", r.type);
	}
}

size_t xo_tls_stream_in_pending(const struct xo_tls_stream *s)
{
	return s->pt_len + (s->in_end - s->in_start) - (s->pt_len ? s->rec_len : 0);
}

int64_t xo_tls_stream_write(struct xo_tls_stream *s, const uint8_t *buf,
			    size_t len)
{
	size_t taken = 0, chunk, need;
	int64_t n;

	xo_clear_error();
	if (s->err)
		return xo_fail(s->err, "TLS stream: the session ended at a bad record");
	if (s->out_start == s->out_end) {
		s->out_start = s->out_end = 0;
	} else if (s->out_start) {
		memmove(s->out, s->out + s->out_start, s->out_end - s->out_start);
		s->out_end -= s->out_start;
		s->out_start = 0;
	}
	while (taken < len) {
		chunk = len - taken;
		if (chunk > XO_TLS_MAX_PLAINTEXT)
			chunk = XO_TLS_MAX_PLAINTEXT;
		need = xo_tls_rec_sealed_size(s->rec, (uint32_t)chunk);
		if (need > sizeof(s->out) - s->out_end)
			break;
		n = xo_tls_rec_seal(s->rec, 23, buf + taken, (uint32_t)chunk,
				    s->out + s->out_end, sizeof(s->out) - s->out_end);
		if (n < 0) {
			s->err = (int)n;
			return n;
		}
		s->out_end += (size_t)n;
		taken += chunk;
	}
	return (int64_t)taken;
}

const uint8_t *xo_tls_stream_out(const struct xo_tls_stream *s, size_t *len)
{
	*len = s->out_end - s->out_start;
	return s->out + s->out_start;
}

int xo_tls_stream_sent(struct xo_tls_stream *s, size_t n)
{
	xo_clear_error();
	if (n > s->out_end - s->out_start)
		return xo_fail(XO_E_INVAL, "TLS stream: %zu bytes sent of %zu", n,
			       s->out_end - s->out_start);
	s->out_start += n;
	return 0;
}

int xo_tls_stream_get_state(const struct xo_tls_stream *s,
			    struct xo_tls_state *out)
{
	xo_clear_error();
	if (s->err)
		return xo_fail(s->err, "TLS stream: the session ended at a bad record");
	if (s->closed)
		return xo_fail(XO_E_STATE, "TLS stream: the peer closed the session");
	if (s->pt_len || s->in_end != s->in_start)
		return xo_fail(XO_E_BUSY,
			       "TLS stream: %zu bytes received and not read (not at a "
			       "record boundary)", xo_tls_stream_in_pending(s));
	if (s->out_end != s->out_start)
		return xo_fail(XO_E_BUSY, "TLS stream: %zu bytes sealed and not sent",
			       s->out_end - s->out_start);
	return xo_tls_rec_get_state(s->rec, out);
}
