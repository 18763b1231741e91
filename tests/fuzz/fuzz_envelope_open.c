// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for the control-message envelope (xo_chan_open(),
 * xo_env_frame_len(), xo_chan_seal()).
 *
 * Build (tests/test_envelope.py does this and runs it for a few seconds):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Ixo_core/include -Ixo_core/src tests/fuzz/fuzz_envelope_open.c \
 *     xo_core/src/envelope.c xo_core/src/secret.c xo_core/src/error.c \
 *     -lcrypto
 *
 * The channels are bound to a fixed session (nonces N0, N1 below); the
 * model derives that session's keys itself (HKDF through EVP_PKEY, AES-GCM
 * and HMAC through EVP) as the envelope documents them.
 *
 * The first input byte picks a mode:
 *   0  raw:    the rest is a frame, opened as is (what a peer without the
 *              key can send; seeds may carry genuine frames);
 *   1  forged: the rest is header + payload, sealed here with the right
 *              keys, so the checks after authentication are reached too;
 *   2  sealed: the rest picks type, flags, conn id and payload; seal, open,
 *              then open again with one bit flipped.
 * Every answer is compared with the model of the documented check order,
 * a rejected frame must leave the channel's sequence numbers alone, and an
 * accepted one must give the model's plaintext.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/sha.h>
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

#define RECV_SEQ 100

static const uint8_t key[32] = {
	0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
	16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
};
static const uint8_t N0[16] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
				13, 14, 15 };
static const uint8_t N1[16] = { 100, 101, 102, 103, 104, 105, 106, 107,
				108, 109, 110, 111, 112, 113, 114, 115 };

/* The model's session: [0] what role 0 sends (h2t), [1] role 1 (t2h). */
static struct {
	int ready;
	uint8_t hello[32];
	uint8_t k[2][32], iv[2][12];
	uint64_t channel_id;
} M;

static void m_hkdf(const uint8_t *salt, size_t salt_len, const char *info,
		   uint8_t *out, size_t len)
{
	EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);

	CHECK(c && EVP_PKEY_derive_init(c) == 1);
	CHECK(EVP_PKEY_CTX_set_hkdf_md(c, EVP_sha256()) == 1);
	if (salt_len)
		CHECK(EVP_PKEY_CTX_set1_hkdf_salt(c, salt, (int)salt_len) == 1);
	CHECK(EVP_PKEY_CTX_set1_hkdf_key(c, key, sizeof(key)) == 1);
	CHECK(EVP_PKEY_CTX_add1_hkdf_info(c, (const uint8_t *)info,
					  (int)strlen(info)) == 1);
	CHECK(EVP_PKEY_derive(c, out, &len) == 1);
	EVP_PKEY_CTX_free(c);
}

static void model_init(void)
{
	uint8_t salt[32], d[32];

	if (M.ready)
		return;
	memcpy(salt, N0, 16);
	memcpy(salt + 16, N1, 16);
	m_hkdf(NULL, 0, "xo ctl v2 hello", M.hello, 32);
	m_hkdf(salt, 32, "xo ctl v2 key h2t", M.k[0], 32);
	m_hkdf(salt, 32, "xo ctl v2 iv h2t", M.iv[0], 12);
	m_hkdf(salt, 32, "xo ctl v2 key t2h", M.k[1], 32);
	m_hkdf(salt, 32, "xo ctl v2 iv t2h", M.iv[1], 12);
	SHA256(salt, 32, d);
	M.channel_id = xo_get64(d);
	M.ready = 1;
}

/* AES-256-GCM of a frame's payload in place under direction dir; the tag
 * is written (enc) or checked (returns 0 when it verifies). */
static int m_gcm(int dir, uint8_t *b, size_t n, int enc)
{
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	uint8_t nonce[12];
	uint32_t plen = (uint32_t)(n - XO_ENV_HEADER_LEN - XO_ENV_MAC_LEN);
	int len, i, ok;

	memcpy(nonce, M.iv[dir], 12);
	for (i = 0; i < 8; i++)
		nonce[4 + i] ^= b[16 + i];
	CHECK(c && EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, M.k[dir],
				     nonce, enc) == 1);
	CHECK(EVP_CipherUpdate(c, NULL, &len, b, XO_ENV_HEADER_LEN) == 1);
	if (plen)
		CHECK(EVP_CipherUpdate(c, b + XO_ENV_HEADER_LEN, &len,
				       b + XO_ENV_HEADER_LEN, (int)plen) == 1);
	if (!enc)
		CHECK(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG,
					  XO_ENV_MAC_LEN, b + n - XO_ENV_MAC_LEN));
	ok = EVP_CipherFinal_ex(c, b + n, &len) == 1;
	if (enc)
		CHECK(ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG,
						XO_ENV_MAC_LEN,
						b + n - XO_ENV_MAC_LEN));
	EVP_CIPHER_CTX_free(c);
	return ok ? 0 : -1;
}

static void m_hello_tag(const uint8_t *b, size_t n, uint8_t *out)
{
	uint8_t full[32];
	unsigned int len = sizeof(full);

	CHECK(HMAC(EVP_sha256(), M.hello, 32, b, n - XO_ENV_MAC_LEN, full,
		   &len));
	memcpy(out, full, XO_ENV_MAC_LEN);
}

/* What xo_chan_open() must answer; plain gets the plaintext payload. */
static int model(const uint8_t *b, size_t n, const struct xo_chan *ch,
		 uint8_t *plain)
{
	uint8_t want[XO_ENV_MAC_LEN];
	uint32_t plen;
	size_t size;

	if (n < XO_ENV_HEADER_LEN)
		return XO_E_TRUNCATED;
	if (b[0] != 'X' || b[1] != 'M')
		return XO_E_BAD_MAGIC;
	if (b[2] != 2)
		return XO_E_VERSION;
	plen = xo_get32(b + 32);
	if (plen > XO_ENV_MAX_PAYLOAD)
		return XO_E_TOO_LARGE;
	size = (size_t)XO_ENV_HEADER_LEN + plen + XO_ENV_MAC_LEN;
	if (size > n)
		return XO_E_TRUNCATED;
	if (size < n)
		return XO_E_LENGTH;
	memcpy(plain, b, n);
	if (b[3] == XO_MSG_HELLO) {
		m_hello_tag(b, n, want);
		if (memcmp(want, b + n - XO_ENV_MAC_LEN, XO_ENV_MAC_LEN))
			return XO_E_AUTH;
	} else if (!ch->bound || m_gcm(1 - ch->role, plain, n, 0)) {
		return XO_E_AUTH;
	}
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
	model_init();
	CHECK(xo_chan_init(ch, key, sizeof(key), 0, role) == 0);
	CHECK(xo_chan_bind(ch, role ? N1 : N0, role ? N0 : N1) == 0);
	CHECK(ch->channel_id == M.channel_id);
	ch->recv_seq = RECV_SEQ;
}

/* Open a copy and compare with the model; on success check the parsed
 * fields and that the frame again is a replay. */
static int open_checked(struct xo_chan *ch, const uint8_t *b, size_t n)
{
	struct xo_chan before = *ch;
	struct xo_msg msg;
	uint8_t *plain = malloc(n + 16), *copy = malloc(n + 1);
	int want, ret;
	int64_t fl = xo_env_frame_len(b, n);

	CHECK(plain && copy);
	want = model(b, n, ch, plain);
	if (n)
		memcpy(copy, b, n);
	ret = xo_chan_open(ch, copy, n, &msg);
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
		goto out;
	}
	CHECK(msg.type == b[3] && msg.sender_role == b[4]);
	CHECK(msg.flags == xo_get16(b + 6));
	CHECK(msg.conn_id == xo_get64(b + 8) && msg.seq == xo_get64(b + 16));
	CHECK(msg.channel_id == ch->channel_id && ch->recv_seq == msg.seq);
	CHECK(msg.payload_len == n - XO_ENV_HEADER_LEN - XO_ENV_MAC_LEN);
	CHECK(msg.payload_len ? msg.payload == copy + XO_ENV_HEADER_LEN
			      : msg.payload == NULL);
	CHECK(!msg.payload_len ||
	      !memcmp(msg.payload, plain + XO_ENV_HEADER_LEN, msg.payload_len));
	/* The same frame again is a replay and changes nothing. */
	before = *ch;
	memcpy(copy, b, n);
	CHECK(xo_chan_open(ch, copy, n, &msg) == XO_E_REPLAY);
	CHECK(!memcmp(&before, ch, sizeof(before)));
out:
	free(plain);
	free(copy);
	return ret;
}

static void forged(const uint8_t *d, size_t n)
{
	struct xo_chan ch;
	uint8_t *buf;
	size_t plen, len;

	if (n < 1)
		return;
	chan(&ch, d[0] & 1);
	d++;
	n--;
	plen = n > XO_ENV_HEADER_LEN ? n - XO_ENV_HEADER_LEN : 0;
	len = XO_ENV_HEADER_LEN + plen + XO_ENV_MAC_LEN;
	buf = calloc(1, len + 16);
	CHECK(buf);
	memcpy(buf, d, n);
	buf[0] = 'X';
	buf[1] = 'M';
	buf[2] = 2;
	xo_put32(buf + 32, (uint32_t)plen);
	if (buf[3] == XO_MSG_HELLO)
		m_hello_tag(buf, len, buf + len - XO_ENV_MAC_LEN);
	else /* sealed the way the receiver's peer seals */
		m_gcm(1 - ch.role, buf, len, 1);
	open_checked(&ch, buf, len);
	free(buf);
	xo_chan_free(&ch);
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
		goto out;
	}
	CHECK(got == (int64_t)cap && tx.send_seq == RECV_SEQ + 1);
	CHECK(xo_env_frame_len(buf, cap) == got);
	/* Encrypted: no payload of 16 bytes or more shows in the frame. */
	if (type != XO_MSG_HELLO && plen >= 16)
		CHECK(memcmp(buf + XO_ENV_HEADER_LEN, d + 1, plen));
	/* One flipped bit, chosen by the input, never verifies. */
	buf[(d[0] * 7919u) % cap] ^= (uint8_t)(1u << (d[0] & 7));
	CHECK(open_checked(&rx, buf, cap) != 0);
	buf[(d[0] * 7919u) % cap] ^= (uint8_t)(1u << (d[0] & 7));
	CHECK(open_checked(&rx, buf, cap) == 0);
out:
	free(buf);
	xo_chan_free(&tx);
	xo_chan_free(&rx);
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
		xo_chan_free(&ch);
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
