// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for the control-message envelope (xo_chan_open(),
 * xo_env_frame_len(), xo_chan_seal()).
 *
 * Build (tests/test_envelope.py does this and runs it for a few seconds):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Ixo_core/include -Ixo_core/src tests/fuzz/fuzz_envelope_open.c \
 *     xo_core/src/envelope.c xo_core/src/error.c -lcrypto
 *
 * The first input byte picks a mode:
 *   0  raw:    the rest is a frame, opened as is (what a peer without the
 *              key can send; seeds may carry genuine frames);
 *   1  forged: the rest is header + payload, MACed here with the right key,
 *              so the checks after authentication are reached too;
 *   2  sealed: the rest picks type, flags, conn id and payload; seal, open,
 *              then open again with one bit flipped.
 * Every answer is compared with a model of the documented check order, and
 * a rejected frame must leave the channel's sequence numbers alone.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"
#include "xo.h"

#define CHECK(cond)                                                        \
	do {                                                               \
		if (!(cond)) {                                             \
			fprintf(stderr, "%s:%d: check failed: %s (%s)\n",  \
				__FILE__, __LINE__, #cond, xo_last_error()); \
			abort();                                           \
		}                                                          \
	} while (0)

#define CHAN_ID 7
#define RECV_SEQ 100

static const uint8_t key[32] = {
	0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
	16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
};

/* What xo_chan_open() must answer. */
static int model(const uint8_t *b, size_t n, const struct xo_chan *ch)
{
	uint8_t want[XO_ENV_MAC_LEN];
	unsigned int mac_len = XO_ENV_MAC_LEN;
	uint32_t plen;
	size_t size;

	if (n < XO_ENV_HEADER_LEN)
		return XO_E_TRUNCATED;
	if (b[0] != 'X' || b[1] != 'M')
		return XO_E_BAD_MAGIC;
	if (b[2] != 1)
		return XO_E_VERSION;
	plen = xo_get32(b + 32);
	if (plen > XO_ENV_MAX_PAYLOAD)
		return XO_E_TOO_LARGE;
	size = (size_t)XO_ENV_HEADER_LEN + plen + XO_ENV_MAC_LEN;
	if (size > n)
		return XO_E_TRUNCATED;
	if (size < n)
		return XO_E_LENGTH;
	CHECK(HMAC(EVP_sha256(), key, sizeof(key), b, n - XO_ENV_MAC_LEN, want,
		   &mac_len));
	if (memcmp(want, b + n - XO_ENV_MAC_LEN, XO_ENV_MAC_LEN))
		return XO_E_AUTH;
	if (b[4] == ch->role)
		return XO_E_CHANNEL;
	if (b[4] > 1 || b[5] || xo_get32(b + 36))
		return XO_E_FIELD;
	if (xo_get64(b + 24) != ch->channel_id)
		return XO_E_CHANNEL;
	if (xo_get64(b + 16) <= ch->recv_seq)
		return XO_E_REPLAY;
	if (xo_get64(b + 16) != ch->recv_seq + 1)
		return XO_E_SEQUENCE;
	if (b[3] == 0 || b[3] > XO_MSG_MAX)
		return XO_E_MSG_TYPE;
	return 0;
}

static void chan(struct xo_chan *ch, uint8_t role)
{
	CHECK(xo_chan_init(ch, key, sizeof(key), CHAN_ID, role) == 0);
	ch->recv_seq = RECV_SEQ;
}

/* Open and compare with the model; on success check the parsed fields. */
static int open_checked(struct xo_chan *ch, const uint8_t *b, size_t n)
{
	struct xo_chan before = *ch;
	struct xo_msg msg;
	int want = model(b, n, ch);
	int ret = xo_chan_open(ch, b, n, &msg);
	int64_t fl = xo_env_frame_len(b, n);

	CHECK(ret == want);
	if (n >= XO_ENV_HEADER_LEN && want != XO_E_BAD_MAGIC &&
	    want != XO_E_VERSION && want != XO_E_TOO_LARGE)
		CHECK(fl == (int64_t)(XO_ENV_HEADER_LEN + xo_get32(b + 32) +
				       XO_ENV_MAC_LEN));
	else
		CHECK(fl == want);
	if (ret) {
		CHECK(xo_last_error()[0]);
		CHECK(!memcmp(&before, ch, sizeof(before)));
		return ret;
	}
	CHECK(msg.type == b[3] && msg.sender_role == b[4]);
	CHECK(msg.flags == xo_get16(b + 6));
	CHECK(msg.conn_id == xo_get64(b + 8) && msg.seq == xo_get64(b + 16));
	CHECK(msg.channel_id == ch->channel_id && ch->recv_seq == msg.seq);
	CHECK(msg.payload_len == n - XO_ENV_HEADER_LEN - XO_ENV_MAC_LEN);
	CHECK(msg.payload_len ? msg.payload == b + XO_ENV_HEADER_LEN
			      : msg.payload == NULL);
	/* The same frame again is a replay and changes nothing. */
	before = *ch;
	CHECK(xo_chan_open(ch, b, n, &msg) == XO_E_REPLAY);
	CHECK(!memcmp(&before, ch, sizeof(before)));
	return 0;
}

static void forged(const uint8_t *d, size_t n)
{
	struct xo_chan ch;
	uint8_t *buf;
	size_t plen, len;
	unsigned int mac_len = XO_ENV_MAC_LEN;

	if (n < 1)
		return;
	chan(&ch, d[0] & 1);
	d++;
	n--;
	plen = n > XO_ENV_HEADER_LEN ? n - XO_ENV_HEADER_LEN : 0;
	len = XO_ENV_HEADER_LEN + plen + XO_ENV_MAC_LEN;
	buf = calloc(1, len);
	CHECK(buf);
	memcpy(buf, d, n);
	buf[0] = 'X';
	buf[1] = 'M';
	buf[2] = 1;
	xo_put32(buf + 32, (uint32_t)plen);
	CHECK(HMAC(EVP_sha256(), key, sizeof(key), buf, len - XO_ENV_MAC_LEN,
		   buf + len - XO_ENV_MAC_LEN, &mac_len));
	open_checked(&ch, buf, len);
	free(buf);
}

static void sealed(const uint8_t *d, size_t n)
{
	struct xo_chan tx, rx;
	uint8_t *buf;
	size_t plen, cap;
	int64_t got;
	uint8_t type;
	uint16_t flags;
	uint64_t conn;

	if (n < 12)
		return;
	type = d[0];
	flags = xo_get16(d + 1);
	conn = xo_get64(d + 3);
	d += 11;
	n -= 11;
	chan(&tx, 0);
	chan(&rx, 1);
	tx.send_seq = RECV_SEQ;
	plen = n - 1;
	cap = xo_env_size((uint32_t)plen);
	buf = malloc(cap);
	CHECK(buf);
	got = xo_chan_seal(&tx, type, flags, conn, d + 1, (uint32_t)plen, buf,
			   cap);
	if (type == 0 || type > XO_MSG_MAX) {
		CHECK(got == XO_E_MSG_TYPE && tx.send_seq == RECV_SEQ);
		free(buf);
		return;
	}
	CHECK(got == (int64_t)cap && tx.send_seq == RECV_SEQ + 1);
	CHECK(xo_env_frame_len(buf, cap) == got);
	/* One flipped bit, chosen by the input, never verifies. */
	buf[(d[0] * 7919u) % cap] ^= (uint8_t)(1u << (d[0] & 7));
	CHECK(open_checked(&rx, buf, cap) != 0);
	buf[(d[0] * 7919u) % cap] ^= (uint8_t)(1u << (d[0] & 7));
	CHECK(open_checked(&rx, buf, cap) == 0);
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct xo_chan ch;

	if (size < 1)
		return 0;
	switch (data[0] % 3) {
	case 0:
		chan(&ch, 1);
		open_checked(&ch, data + 1, size - 1);
		break;
	case 1:
		forged(data + 1, size - 1);
		break;
	case 2:
		sealed(data + 1, size - 1);
		break;
	}
	return 0;
}
