// SPDX-License-Identifier: MIT
/*
 * Control-message envelope, shared by every component that speaks the XO
 * protocol (the Python engine, the nginx module, the Ceph agents):
 *
 *   "XM" | version u8 | type u8 | sender role u8 | reserved u8 (0)
 *   | flags u16 | conn id u64 | seq u64 | channel id u64
 *   | payload length u32 | reserved u32 (0) | payload | HMAC-SHA256
 *
 * The MAC covers header and payload, under the cluster key. Only a
 * message that verifies is looked at further, so a peer without the key
 * learns nothing from our answers and can make us bind nothing.
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define XO_ENV_MAGIC0 'X'
#define XO_ENV_MAGIC1 'M'
#define XO_ENV_VERSION 1

int xo_chan_init(struct xo_chan *ch, const uint8_t *key, uint32_t key_len,
		 uint64_t channel_id, uint8_t role)
{
	xo_clear_error();
	if (!ch || !key)
		return xo_fail(XO_E_INVAL, "channel: NULL argument");
	if (key_len < XO_KEY_MIN_LEN || key_len > XO_KEY_MAX_LEN)
		return xo_fail(XO_E_INVAL,
			       "channel: key of %u bytes (want %d..%d)",
			       key_len, XO_KEY_MIN_LEN, XO_KEY_MAX_LEN);
	if (role > 1)
		return xo_fail(XO_E_INVAL, "channel: role %u (want 0 or 1)",
			       role);
	memset(ch, 0, sizeof(*ch));
	memcpy(ch->key, key, key_len);
	ch->key_len = key_len;
	ch->channel_id = channel_id;
	ch->role = role;
	return 0;
}

int xo_chan_bind(struct xo_chan *ch, const uint8_t *own_nonce,
		 const uint8_t *peer_nonce)
{
	uint8_t both[2 * XO_HELLO_NONCE_LEN], digest[32];
	int own_first;

	xo_clear_error();
	if (!ch || !own_nonce || !peer_nonce)
		return xo_fail(XO_E_INVAL, "bind: NULL argument");
	own_first = ch->role == 0;
	memcpy(both + (own_first ? 0 : XO_HELLO_NONCE_LEN), own_nonce,
	       XO_HELLO_NONCE_LEN);
	memcpy(both + (own_first ? XO_HELLO_NONCE_LEN : 0), peer_nonce,
	       XO_HELLO_NONCE_LEN);
	if (!EVP_Digest(both, sizeof(both), digest, NULL, EVP_sha256(), NULL))
		return xo_fail(XO_E_SYS, "bind: SHA-256 failed in libcrypto");
	ch->channel_id = xo_get64(digest);
	return 0;
}

size_t xo_env_size(uint32_t payload_len)
{
	return (size_t)XO_ENV_HEADER_LEN + payload_len + XO_ENV_MAC_LEN;
}

static int mac(const struct xo_chan *ch, const uint8_t *buf, size_t len,
	       uint8_t *out)
{
	unsigned int out_len = XO_ENV_MAC_LEN;

	if (!HMAC(EVP_sha256(), ch->key, (int)ch->key_len, buf, len, out,
		  &out_len) || out_len != XO_ENV_MAC_LEN)
		return xo_fail(XO_E_SYS, "envelope: HMAC-SHA256 failed in libcrypto");
	return 0;
}

int64_t xo_chan_seal(struct xo_chan *ch, uint8_t type, uint16_t flags,
		     uint64_t conn_id, const uint8_t *payload,
		     uint32_t payload_len, uint8_t *out, size_t cap)
{
	size_t need = xo_env_size(payload_len);
	uint8_t *p = out;
	int ret;

	xo_clear_error();
	if (!ch || !out || (payload_len && !payload))
		return xo_fail(XO_E_INVAL, "seal: NULL argument");
	if (type == 0 || type > XO_MSG_MAX)
		return xo_fail(XO_E_MSG_TYPE, "seal: message type %u", type);
	if (payload_len > XO_ENV_MAX_PAYLOAD)
		return xo_fail(XO_E_TOO_LARGE, "seal: payload %u bytes > %d",
			       payload_len, XO_ENV_MAX_PAYLOAD);
	if (need > cap)
		return xo_fail(XO_E_NOSPACE, "seal: need %zu bytes, have %zu",
			       need, cap);
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
	p = xo_put_bytes(p, payload, payload_len);
	ret = mac(ch, out, (size_t)(p - out), p);
	if (ret)
		return ret;
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

int xo_chan_open(struct xo_chan *ch, const uint8_t *buf, size_t len,
		 struct xo_msg *msg)
{
	uint8_t want[XO_ENV_MAC_LEN];
	int64_t frame;
	uint64_t seq, channel;
	int ret;

	xo_clear_error();
	if (!ch || !buf || !msg)
		return xo_fail(XO_E_INVAL, "open: NULL argument");
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
	ret = mac(ch, buf, (size_t)frame - XO_ENV_MAC_LEN, want);
	if (ret)
		return ret;
	if (CRYPTO_memcmp(want, buf + frame - XO_ENV_MAC_LEN, XO_ENV_MAC_LEN))
		return xo_fail(XO_E_AUTH,
			       "open: HMAC does not verify (wrong cluster key or altered message)");

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
	seq = xo_get64(buf + 16);
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
	msg->payload_len = xo_get32(buf + 32);
	msg->payload = msg->payload_len ? buf + XO_ENV_HEADER_LEN : NULL;
	ch->recv_seq = seq;
	return 0;
}
