// SPDX-License-Identifier: MIT
/*
 * Control-message envelope, shared by every component that speaks the XO
 * protocol (the Python engine, the C driver, the nginx module):
 *
 *   "XM" | version u8 (2) | type u8 | sender role u8 | reserved u8 (0)
 *   | flags u16 | conn id u64 | seq u64 | channel id u64
 *   | payload length u32 | reserved u32 (0) | payload | tag (16 bytes)
 *
 * Every message but HELLO is AES-256-GCM: the payload is encrypted, the
 * 40-byte header is the additional authenticated data, the nonce is the
 * sending direction's IV XOR the sequence number (in its last 8 bytes),
 * and the keys are the session's: HKDF-SHA256 with the cluster key as
 * input and both HELLO nonces (role 0's first) as salt, one key and IV per
 * direction. A session never reuses a nonce (sequence numbers only go up,
 * sealing stops before they wrap) and sessions never share keys.
 *
 * HELLO comes before there are session keys. Its payload is the sender's
 * nonce, public by design; its tag is HMAC-SHA256 (first 16 bytes) over
 * header and payload under a key derived from the cluster key alone.
 *
 * Only a message that verifies is looked at further, so a peer without the
 * key learns nothing from our answers and can make us bind nothing.
 */
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define XO_ENV_MAGIC0 'X'
#define XO_ENV_MAGIC1 'M'
#define KEY_LEN 32
#define IV_LEN 12

/* The channel's key material, in a page of its own (see secret.c). */
struct chan_secret {
	uint8_t cluster[XO_KEY_MAX_LEN]; /* wiped once bound */
	uint32_t cluster_len;
	uint8_t hello[KEY_LEN];
	uint8_t tx_key[KEY_LEN], rx_key[KEY_LEN];
	uint8_t tx_iv[IV_LEN], rx_iv[IV_LEN];
	EVP_CIPHER_CTX *tx, *rx; /* keyed once; the IV is set per message */
};

static int hkdf(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt,
		size_t salt_len, const char *info, uint8_t *out, size_t len)
{
	OSSL_PARAM params[5], *q = params;
	EVP_KDF_CTX *kctx = NULL;
	EVP_KDF *kdf;
	int ok = 0;

	kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
	if (kdf)
		kctx = EVP_KDF_CTX_new(kdf);
	EVP_KDF_free(kdf);
	if (!kctx)
		return xo_fail(XO_E_SYS, "envelope: HKDF unavailable in libcrypto");
	*q++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
						(char *)"SHA256", 0);
	*q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
						 (void *)ikm, ikm_len);
	if (salt_len)
		*q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT,
							 (void *)salt,
							 salt_len);
	*q++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO,
						 (void *)info, strlen(info));
	*q = OSSL_PARAM_construct_end();
	ok = EVP_KDF_derive(kctx, out, len, params) == 1;
	EVP_KDF_CTX_free(kctx);
	if (!ok)
		return xo_fail(XO_E_SYS, "envelope: HKDF-SHA256 failed in libcrypto");
	return 0;
}

static struct chan_secret *secret_of(const struct xo_chan *ch)
{
	return (struct chan_secret *)ch->secret;
}

int xo_chan_init(struct xo_chan *ch, const uint8_t *key, uint32_t key_len,
		 uint64_t channel_id, uint8_t role)
{
	struct chan_secret *s;
	int ret;

	xo_clear_error();
	if (!ch || !key)
		return xo_fail(XO_E_INVAL, "channel: NULL argument");
	memset(ch, 0, sizeof(*ch));
	if (key_len < XO_KEY_MIN_LEN || key_len > XO_KEY_MAX_LEN)
		return xo_fail(XO_E_INVAL,
			       "channel: key of %u bytes (want %d..%d)",
			       key_len, XO_KEY_MIN_LEN, XO_KEY_MAX_LEN);
	if (role > 1)
		return xo_fail(XO_E_INVAL, "channel: role %u (want 0 or 1)",
			       role);
	s = xo_secret_alloc(sizeof(*s));
	if (!s)
		return XO_E_NOMEM;
	memcpy(s->cluster, key, key_len);
	s->cluster_len = key_len;
	ret = hkdf(key, key_len, NULL, 0, "xo ctl v2 hello", s->hello,
		   sizeof(s->hello));
	if (ret) {
		xo_secret_free(s);
		return ret;
	}
	ch->secret = s;
	ch->channel_id = channel_id;
	ch->role = role;
	return 0;
}

void xo_chan_free(struct xo_chan *ch)
{
	struct chan_secret *s;

	if (!ch)
		return;
	s = secret_of(ch);
	if (s) {
		EVP_CIPHER_CTX_free(s->tx); /* cleanses its key schedule */
		EVP_CIPHER_CTX_free(s->rx);
		xo_secret_free(s);
	}
	memset(ch, 0, sizeof(*ch));
}

static EVP_CIPHER_CTX *keyed(const uint8_t *key, int enc)
{
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();

	if (c && EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, key, NULL,
				   enc) == 1)
		return c;
	EVP_CIPHER_CTX_free(c);
	return NULL;
}

int xo_chan_bind(struct xo_chan *ch, const uint8_t *own_nonce,
		 const uint8_t *peer_nonce)
{
	uint8_t both[2 * XO_HELLO_NONCE_LEN], digest[32];
	const char *tx_dir, *rx_dir;
	struct chan_secret *s;
	char info[32];
	int own_first, ret;

	xo_clear_error();
	if (!ch || !own_nonce || !peer_nonce)
		return xo_fail(XO_E_INVAL, "bind: NULL argument");
	s = secret_of(ch);
	if (!s)
		return xo_fail(XO_E_STATE, "bind: channel not initialised");
	if (ch->bound)
		return xo_fail(XO_E_STATE, "bind: channel already bound to a session");
	own_first = ch->role == 0;
	memcpy(both + (own_first ? 0 : XO_HELLO_NONCE_LEN), own_nonce,
	       XO_HELLO_NONCE_LEN);
	memcpy(both + (own_first ? XO_HELLO_NONCE_LEN : 0), peer_nonce,
	       XO_HELLO_NONCE_LEN);
	if (!EVP_Digest(both, sizeof(both), digest, NULL, EVP_sha256(), NULL))
		return xo_fail(XO_E_SYS, "bind: SHA-256 failed in libcrypto");
	/* role 0 (host) sends "h2t", role 1 sends "t2h" */
	tx_dir = ch->role == 0 ? "h2t" : "t2h";
	rx_dir = ch->role == 0 ? "t2h" : "h2t";
	snprintf(info, sizeof(info), "xo ctl v2 key %s", tx_dir);
	ret = hkdf(s->cluster, s->cluster_len, both, sizeof(both), info,
		   s->tx_key, KEY_LEN);
	snprintf(info, sizeof(info), "xo ctl v2 iv %s", tx_dir);
	if (!ret)
		ret = hkdf(s->cluster, s->cluster_len, both, sizeof(both),
			   info, s->tx_iv, IV_LEN);
	snprintf(info, sizeof(info), "xo ctl v2 key %s", rx_dir);
	if (!ret)
		ret = hkdf(s->cluster, s->cluster_len, both, sizeof(both),
			   info, s->rx_key, KEY_LEN);
	snprintf(info, sizeof(info), "xo ctl v2 iv %s", rx_dir);
	if (!ret)
		ret = hkdf(s->cluster, s->cluster_len, both, sizeof(both),
			   info, s->rx_iv, IV_LEN);
	if (ret)
		goto wipe;
	s->tx = keyed(s->tx_key, 1);
	s->rx = keyed(s->rx_key, 0);
	if (!s->tx || !s->rx) {
		ret = xo_fail(XO_E_SYS, "bind: AES-256-GCM unavailable in libcrypto");
		goto wipe;
	}
	/* The session keys are all this channel needs from now on. */
	OPENSSL_cleanse(s->cluster, sizeof(s->cluster));
	s->cluster_len = 0;
	ch->channel_id = xo_get64(digest);
	ch->bound = 1;
	return 0;
wipe:
	EVP_CIPHER_CTX_free(s->tx);
	EVP_CIPHER_CTX_free(s->rx);
	s->tx = s->rx = NULL;
	OPENSSL_cleanse(s->tx_key, sizeof(s->tx_key));
	OPENSSL_cleanse(s->rx_key, sizeof(s->rx_key));
	OPENSSL_cleanse(s->tx_iv, sizeof(s->tx_iv));
	OPENSSL_cleanse(s->rx_iv, sizeof(s->rx_iv));
	return ret;
}

size_t xo_env_size(uint32_t payload_len)
{
	return (size_t)XO_ENV_HEADER_LEN + payload_len + XO_ENV_MAC_LEN;
}

static int hello_tag(const struct chan_secret *s, const uint8_t *buf,
		     size_t len, uint8_t *out)
{
	uint8_t full[32];
	unsigned int out_len = sizeof(full);

	if (!HMAC(EVP_sha256(), s->hello, sizeof(s->hello), buf, len, full,
		  &out_len) || out_len != sizeof(full))
		return xo_fail(XO_E_SYS, "envelope: HMAC-SHA256 failed in libcrypto");
	memcpy(out, full, XO_ENV_MAC_LEN);
	return 0;
}

static void nonce_of(const uint8_t *iv, uint64_t seq, uint8_t *nonce)
{
	uint8_t s[8];
	int i;

	xo_put64(s, seq);
	memcpy(nonce, iv, IV_LEN);
	for (i = 0; i < 8; i++)
		nonce[IV_LEN - 8 + i] ^= s[i];
}

/* AES-256-GCM over a frame whose header is in place: encrypt (enc) or
 * decrypt and verify the payload in place; the tag follows the payload. */
static int aead(EVP_CIPHER_CTX *c, const uint8_t *iv, uint64_t seq,
		uint8_t *frame, uint32_t payload_len, int enc)
{
	uint8_t nonce[IV_LEN], *pl = frame + XO_ENV_HEADER_LEN;
	uint8_t *tag = pl + payload_len;
	uint32_t done = 0;
	int n;

	nonce_of(iv, seq, nonce);
	if (EVP_CipherInit_ex(c, NULL, NULL, NULL, nonce, enc) != 1 ||
	    EVP_CipherUpdate(c, NULL, &n, frame, XO_ENV_HEADER_LEN) != 1)
		return xo_fail(XO_E_SYS, "envelope: AES-256-GCM setup failed in libcrypto");
	while (done < payload_len) {
		/* EVP takes int lengths: 16 MiB steps */
		int step = payload_len - done > (1u << 24) ? 1 << 24 :
			   (int)(payload_len - done);

		if (EVP_CipherUpdate(c, pl + done, &n, pl + done, step) != 1)
			return xo_fail(XO_E_SYS, "envelope: AES-256-GCM failed in libcrypto");
		done += (uint32_t)step;
	}
	if (!enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG,
					XO_ENV_MAC_LEN, tag) != 1)
		return xo_fail(XO_E_SYS, "envelope: AES-256-GCM tag failed in libcrypto");
	if (EVP_CipherFinal_ex(c, pl + done, &n) != 1) {
		if (enc)
			return xo_fail(XO_E_SYS, "envelope: AES-256-GCM failed in libcrypto");
		return XO_E_AUTH;
	}
	if (enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG,
				       XO_ENV_MAC_LEN, tag) != 1)
		return xo_fail(XO_E_SYS, "envelope: AES-256-GCM tag failed in libcrypto");
	return 0;
}

int64_t xo_chan_seal(struct xo_chan *ch, uint8_t type, uint16_t flags,
		     uint64_t conn_id, const uint8_t *payload,
		     uint32_t payload_len, uint8_t *out, size_t cap)
{
	size_t need = xo_env_size(payload_len);
	struct chan_secret *s;
	uint8_t *p = out;
	int ret;

	xo_clear_error();
	if (!ch || !out || (payload_len && !payload))
		return xo_fail(XO_E_INVAL, "seal: NULL argument");
	s = secret_of(ch);
	if (!s)
		return xo_fail(XO_E_STATE, "seal: channel not initialised");
	if (type == 0 || type > XO_MSG_MAX)
		return xo_fail(XO_E_MSG_TYPE, "seal: message type %u", type);
	if (type != XO_MSG_HELLO && !ch->bound)
		return xo_fail(XO_E_STATE,
			       "seal: no session keys yet (only HELLO goes before the HELLO exchange)");
	if (payload_len > XO_ENV_MAX_PAYLOAD)
		return xo_fail(XO_E_TOO_LARGE, "seal: payload %u bytes > %d",
			       payload_len, XO_ENV_MAX_PAYLOAD);
	if (need > cap)
		return xo_fail(XO_E_NOSPACE, "seal: need %zu bytes, have %zu",
			       need, cap);
	if (ch->send_seq == UINT64_MAX)
		return xo_fail(XO_E_STATE, "seal: sequence numbers exhausted");
	*p++ = XO_ENV_MAGIC0;
	*p++ = XO_ENV_MAGIC1;
	*p++ = XO_ENV_VERSION;
	*p++ = type;
	*p++ = ch->role;
	*p++ = 0;
	p = xo_put16(p, flags);
	p = xo_put64(p, conn_id);
	p = xo_put64(p, ch->send_seq + 1);
	p = xo_put64(p, ch->channel_id);
	p = xo_put32(p, payload_len);
	p = xo_put32(p, 0);
	if (payload_len && payload != p)
		memmove(p, payload, payload_len);
	p += payload_len;
	if (type == XO_MSG_HELLO)
		ret = hello_tag(s, out, (size_t)(p - out), p);
	else
		ret = aead(s->tx, s->tx_iv, ch->send_seq + 1, out, payload_len,
			   1);
	if (ret) {
		OPENSSL_cleanse(out, need);
		return ret;
	}
	ch->send_seq++;
	return (int64_t)need;
}

int64_t xo_env_frame_len(const uint8_t *hdr, size_t len)
{
	uint32_t payload_len;

	if (!hdr || len < XO_ENV_HEADER_LEN)
		return xo_fail(XO_E_TRUNCATED,
			       "envelope: %zu header bytes, need %d",
			       hdr ? len : 0, XO_ENV_HEADER_LEN);
	if (hdr[0] != XO_ENV_MAGIC0 || hdr[1] != XO_ENV_MAGIC1)
		return xo_fail(XO_E_BAD_MAGIC,
			       "envelope: not an XO control message (bad magic)");
	if (hdr[2] != XO_ENV_VERSION)
		return xo_fail(XO_E_VERSION,
			       "envelope: version %u, this build speaks %d",
			       hdr[2], XO_ENV_VERSION);
	payload_len = xo_get32(hdr + 32);
	if (payload_len > XO_ENV_MAX_PAYLOAD)
		return xo_fail(XO_E_TOO_LARGE,
			       "envelope: payload of %u bytes announced, limit %d",
			       payload_len, XO_ENV_MAX_PAYLOAD);
	return (int64_t)xo_env_size(payload_len);
}

int xo_chan_open(struct xo_chan *ch, uint8_t *buf, size_t len,
		 struct xo_msg *msg)
{
	uint8_t want[XO_ENV_MAC_LEN];
	struct chan_secret *s;
	uint64_t seq, channel;
	uint32_t payload_len;
	int64_t frame;
	int ret;

	xo_clear_error();
	if (!ch || !buf || !msg)
		return xo_fail(XO_E_INVAL, "open: NULL argument");
	s = secret_of(ch);
	if (!s)
		return xo_fail(XO_E_STATE, "open: channel not initialised");
	frame = xo_env_frame_len(buf, len);
	if (frame < 0)
		return (int)frame;
	if ((size_t)frame > len)
		return xo_fail(XO_E_TRUNCATED,
			       "open: message announces %lld bytes, %zu present",
			       (long long)frame, len);
	if ((size_t)frame < len)
		return xo_fail(XO_E_LENGTH,
			       "open: %zu bytes after the message",
			       len - (size_t)frame);
	payload_len = xo_get32(buf + 32);
	seq = xo_get64(buf + 16);
	if (buf[3] == XO_MSG_HELLO) {
		ret = hello_tag(s, buf, (size_t)frame - XO_ENV_MAC_LEN, want);
		if (ret)
			return ret;
		if (CRYPTO_memcmp(want, buf + frame - XO_ENV_MAC_LEN,
				  XO_ENV_MAC_LEN))
			return xo_fail(XO_E_AUTH,
				       "open: HELLO does not verify (wrong cluster key or altered message)");
	} else if (!ch->bound) {
		return xo_fail(XO_E_AUTH,
			       "open: a message of type %u before the HELLO exchange cannot be verified",
			       buf[3]);
	} else {
		ret = aead(s->rx, s->rx_iv, seq, buf, payload_len, 0);
		if (ret == XO_E_AUTH) {
			OPENSSL_cleanse(buf + XO_ENV_HEADER_LEN, payload_len);
			return xo_fail(XO_E_AUTH,
				       "open: message does not decrypt (wrong key, another session or altered message)");
		}
		if (ret)
			return ret;
	}

	/* Authentic from here on; still check it is meant for us, now. */
	if (buf[4] == ch->role)
		return xo_fail(XO_E_CHANNEL,
			       "open: message was sent by our own role (reflected)");
	if (buf[4] > 1 || buf[5] || xo_get32(buf + 36))
		return xo_fail(XO_E_FIELD, "open: reserved header bytes set");
	channel = xo_get64(buf + 24);
	if (channel != ch->channel_id)
		return xo_fail(XO_E_CHANNEL,
			       "open: message of channel %llu on channel %llu",
			       (unsigned long long)channel,
			       (unsigned long long)ch->channel_id);
	if (seq <= ch->recv_seq)
		return xo_fail(XO_E_REPLAY,
			       "open: sequence %llu already seen (last %llu)",
			       (unsigned long long)seq,
			       (unsigned long long)ch->recv_seq);
	/* Strictly one more: a gap means a message was dropped on the way,
	 * and the protocol must not carry on as if it had arrived. */
	if (seq != ch->recv_seq + 1)
		return xo_fail(XO_E_SEQUENCE,
			       "open: sequence %llu after %llu: a message is missing",
			       (unsigned long long)seq,
			       (unsigned long long)ch->recv_seq);
	if (buf[3] == 0 || buf[3] > XO_MSG_MAX)
		return xo_fail(XO_E_MSG_TYPE, "open: unknown message type %u",
			       buf[3]);

	msg->type = buf[3];
	msg->sender_role = buf[4];
	msg->flags = xo_get16(buf + 6);
	msg->conn_id = xo_get64(buf + 8);
	msg->seq = seq;
	msg->channel_id = channel;
	msg->payload_len = payload_len;
	msg->payload = payload_len ? buf + XO_ENV_HEADER_LEN : NULL;
	ch->recv_seq = seq;
	return 0;
}
