// SPDX-License-Identifier: MIT
/*
 * TLS record state of a connection: checks, and the kernel side (kTLS).
 *
 * Capture reads SOL_TLS TLS_TX / TLS_RX from a socket whose TCP_ULP is
 * "tls": the kernel answers with the crypto_info it works with, including
 * the sequence number of the next record (and, for TLS 1.2 AES-GCM, the
 * explicit IV it will use next). Restore installs the ULP on a restored
 * socket once it is ESTABLISHED (after the repair connect()) and sets the
 * same crypto_info back. A TLS connection moves only with empty queues:
 * kTLS sockets do not give their queues to TCP repair reads (a recvmsg()
 * goes through the TLS layer), and bytes written into a restored queue
 * after the ULP would be encrypted a second time.
 */
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <unistd.h>

#include "internal.h"
#include "wire.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif

int xo_tls_sizes(uint16_t cipher, uint32_t *key, uint32_t *iv,
		 uint32_t *salt)
{
	switch (cipher) {
	case XO_TLS_AES_GCM_128:
		*key = 16, *iv = 8, *salt = 4;
		return 0;
	case XO_TLS_AES_GCM_256:
		*key = 32, *iv = 8, *salt = 4;
		return 0;
	case XO_TLS_CHACHA20_POLY1305:
		*key = 32, *iv = 12, *salt = 0;
		return 0;
	}
	return xo_fail(XO_E_FIELD,
		       "TLS: unknown cipher %u (AES-GCM-128 is 51, AES-GCM-256 52, ChaCha20-Poly1305 54)",
		       cipher);
}

const char *xo_tls_cipher_name(uint16_t cipher)
{
	switch (cipher) {
	case XO_TLS_AES_GCM_128:
		return "AES-GCM-128";
	case XO_TLS_AES_GCM_256:
		return "AES-GCM-256";
	case XO_TLS_CHACHA20_POLY1305:
		return "ChaCha20-Poly1305";
	}
	return "?";
}

static int zero(const uint8_t *p, size_t n)
{
	uint8_t acc = 0;

	while (n--)
		acc |= *p++;
	return acc == 0;
}

static int check_dir(const struct xo_tls_state *t, const struct xo_tls_dir *d,
		     const char *name, uint32_t key, uint32_t iv,
		     uint32_t salt)
{
	if (!zero(d->key + key, sizeof(d->key) - key) ||
	    !zero(d->iv + iv, sizeof(d->iv) - iv) ||
	    !zero(d->salt + salt, sizeof(d->salt) - salt))
		return xo_fail(XO_E_FIELD,
			       "TLS: %s state has bytes beyond the %s key/IV/salt lengths (%u/%u/%u)",
			       name, xo_tls_cipher_name(t->cipher), key, iv,
			       salt);
	/* The record after this one would need sequence number 2^64: TLS
	 * forbids the wrap, the session must rekey or end first. */
	if (d->rec_seq == UINT64_MAX)
		return xo_fail(XO_E_FIELD,
			       "TLS: %s record sequence number overflows (2^64 - 1)",
			       name);
	return 0;
}

int xo_tls_check(const struct xo_tls_state *t)
{
	uint32_t key, iv, salt;
	int ret;

	xo_clear_error();
	if (!t)
		return xo_fail(XO_E_INVAL, "TLS: state is NULL");
	if (t->version != XO_TLS_1_2 && t->version != XO_TLS_1_3)
		return xo_fail(XO_E_FIELD,
			       "TLS: version 0x%04x (want 0x0303 for 1.2 or 0x0304 for 1.3)",
			       t->version);
	ret = xo_tls_sizes(t->cipher, &key, &iv, &salt);
	if (ret)
		return ret;
	if (!t->dirs || t->dirs & ~(XO_TLS_DIR_TX | XO_TLS_DIR_RX))
		return xo_fail(XO_E_FIELD,
			       "TLS: direction bits 0x%x (want TX 1, RX 2 or both)",
			       t->dirs);
	if (!zero(t->reserved, sizeof(t->reserved)))
		return xo_fail(XO_E_FIELD, "TLS: reserved bytes set");
	if (t->dirs & XO_TLS_DIR_TX)
		ret = check_dir(t, &t->tx, "TX", key, iv, salt);
	else if (!zero((const uint8_t *)&t->tx, sizeof(t->tx)))
		ret = xo_fail(XO_E_FIELD, "TLS: TX values without the TX bit");
	if (ret)
		return ret;
	if (t->dirs & XO_TLS_DIR_RX)
		ret = check_dir(t, &t->rx, "RX", key, iv, salt);
	else if (!zero((const uint8_t *)&t->rx, sizeof(t->rx)))
		ret = xo_fail(XO_E_FIELD, "TLS: RX values without the RX bit");
	return ret;
}

int xo_state_set_tls(struct xo_tcp_state *st, const struct xo_tls_state *tls)
{
	struct xo_tls_state *copy;
	int ret;

	xo_clear_error();
	if (!st)
		return xo_fail(XO_E_INVAL, "TLS: state is NULL");
	if (tls) {
		ret = xo_tls_check(tls);
		if (ret)
			return ret;
		copy = xo_secret_alloc(sizeof(*copy));
		if (!copy)
			return XO_E_NOMEM;
		memcpy(copy, tls, sizeof(*copy));
	} else {
		copy = NULL;
	}
	xo_secret_free(st->tls);
	st->tls = copy;
	return 0;
}

/* ---- the kernel's TLS (kTLS) ------------------------------------------ */

/* The largest crypto_info of the ciphers above (ChaCha20, AES-GCM-256). */
union crypto_info {
	struct tls_crypto_info base;
	struct tls12_crypto_info_aes_gcm_128 aes128;
	struct tls12_crypto_info_aes_gcm_256 aes256;
	struct tls12_crypto_info_chacha20_poly1305 chacha;
};

static socklen_t info_len(uint16_t cipher)
{
	switch (cipher) {
	case XO_TLS_AES_GCM_128:
		return sizeof(struct tls12_crypto_info_aes_gcm_128);
	case XO_TLS_AES_GCM_256:
		return sizeof(struct tls12_crypto_info_aes_gcm_256);
	case XO_TLS_CHACHA20_POLY1305:
		return sizeof(struct tls12_crypto_info_chacha20_poly1305);
	}
	return 0;
}

/* Where key, iv, salt and rec_seq sit in a crypto_info of this cipher. */
static void info_parts(union crypto_info *ci, uint16_t cipher, uint8_t **key,
		       uint8_t **iv, uint8_t **salt, uint8_t **rec_seq)
{
	switch (cipher) {
	case XO_TLS_AES_GCM_128:
		*key = ci->aes128.key, *iv = ci->aes128.iv;
		*salt = ci->aes128.salt, *rec_seq = ci->aes128.rec_seq;
		return;
	case XO_TLS_AES_GCM_256:
		*key = ci->aes256.key, *iv = ci->aes256.iv;
		*salt = ci->aes256.salt, *rec_seq = ci->aes256.rec_seq;
		return;
	default:
		*key = ci->chacha.key, *iv = ci->chacha.iv;
		*salt = ci->chacha.salt, *rec_seq = ci->chacha.rec_seq;
		return;
	}
}

int xo_tls_ulp(int fd, int *is_tls)
{
	char ulp[32] = "";
	socklen_t len = sizeof(ulp) - 1;

	*is_tls = 0;
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_ULP, ulp, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_ULP)");
	ulp[len < sizeof(ulp) ? len : sizeof(ulp) - 1] = '\0';
	*is_tls = !strcmp(ulp, "tls");
	return 0;
}

static int get_dir(int fd, int opt, struct xo_tls_state *t,
		   struct xo_tls_dir *d)
{
	const char *name = opt == TLS_TX ? "TLS_TX" : "TLS_RX";
	union crypto_info ci;
	uint8_t *key, *iv, *salt, *seq;
	uint32_t key_len, iv_len, salt_len;
	socklen_t len = sizeof(ci.base);
	int ret;

	memset(&ci, 0, sizeof(ci));
	/* The header first: which cipher, hence how long the whole is. */
	if (XO_SYSCALL(getsockopt(fd, SOL_TLS, opt, &ci, &len)) < 0) {
		if (errno == EBUSY)
			return 1; /* this direction is not in the kernel */
		return xo_fail_sys("capture: getsockopt(SOL_TLS, %s)", name);
	}
	if (t->cipher && (t->cipher != ci.base.cipher_type ||
			  t->version != ci.base.version))
		return xo_fail(XO_E_UNSUPPORTED,
			       "capture: kTLS directions differ in version or cipher (0x%04x/%u, 0x%04x/%u)",
			       t->version, t->cipher, ci.base.version,
			       ci.base.cipher_type);
	t->version = ci.base.version;
	t->cipher = ci.base.cipher_type;
	ret = xo_tls_sizes(t->cipher, &key_len, &iv_len, &salt_len);
	if (ret)
		return xo_fail(XO_E_UNSUPPORTED,
			       "capture: kTLS cipher %u is not one XO moves",
			       t->cipher);
	len = info_len(t->cipher);
	if (XO_SYSCALL(getsockopt(fd, SOL_TLS, opt, &ci, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(SOL_TLS, %s, %s)", name,
				   xo_tls_cipher_name(t->cipher));
	info_parts(&ci, t->cipher, &key, &iv, &salt, &seq);
	memcpy(d->key, key, key_len);
	memcpy(d->iv, iv, iv_len);
	memcpy(d->salt, salt, salt_len);
	d->rec_seq = xo_get64(seq);
	OPENSSL_cleanse(&ci, sizeof(ci));
	return 0;
}

int xo_tls_capture_kernel(int fd, struct xo_tcp_state *st)
{
	struct xo_tls_state *t;
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int inq = 0, outq = 0, ret;

	/* Nothing pending either way, or the state would not match. */
	if (XO_SYSCALL(ioctl(fd, SIOCOUTQ, &outq)) < 0)
		return xo_fail_sys("capture: ioctl(SIOCOUTQ) on a kTLS socket");
	if (XO_SYSCALL(ioctl(fd, SIOCINQ, &inq)) < 0)
		return xo_fail_sys("capture: ioctl(SIOCINQ) on a kTLS socket");
	if (outq || inq)
		return xo_fail(XO_E_BUSY,
			       "capture: kTLS socket with %d bytes to send and %d received: a TLS connection moves at a record boundary with nothing queued",
			       outq, inq);
	/* Records the TLS layer decrypted (or holds whole) but the
	 * application has not read show as readable with an empty queue. */
	if (XO_SYSCALL(poll(&pfd, 1, 0)) < 0)
		return xo_fail_sys("capture: poll() on a kTLS socket");
	if (pfd.revents & POLLIN)
		return xo_fail(XO_E_BUSY,
			       "capture: kTLS socket holds a record the application has not read");
	t = xo_secret_alloc(sizeof(*t));
	if (!t)
		return XO_E_NOMEM;
	ret = get_dir(fd, TLS_TX, t, &t->tx);
	if (ret == 0)
		t->dirs |= XO_TLS_DIR_TX;
	if (ret >= 0) {
		int rx = get_dir(fd, TLS_RX, t, &t->rx);

		ret = rx < 0 ? rx : 0;
		if (rx == 0)
			t->dirs |= XO_TLS_DIR_RX;
	}
	if (!ret && !t->dirs)
		ret = xo_fail(XO_E_STATE,
			      "capture: TLS ULP without keys in either direction");
	if (!ret)
		ret = xo_tls_check(t);
	if (ret) {
		xo_secret_free(t);
		return ret;
	}
	st->tls = t;
	return 0;
}

static int set_dir(int fd, int opt, const struct xo_tls_state *t,
		   const struct xo_tls_dir *d)
{
	union crypto_info ci;
	uint8_t *key, *iv, *salt, *seq;
	uint32_t key_len, iv_len, salt_len;
	int ret;

	memset(&ci, 0, sizeof(ci));
	ret = xo_tls_sizes(t->cipher, &key_len, &iv_len, &salt_len);
	if (ret)
		return ret;
	ci.base.version = t->version;
	ci.base.cipher_type = t->cipher;
	info_parts(&ci, t->cipher, &key, &iv, &salt, &seq);
	memcpy(key, d->key, key_len);
	memcpy(iv, d->iv, iv_len);
	memcpy(salt, d->salt, salt_len);
	xo_put64(seq, d->rec_seq);
	ret = XO_SYSCALL(setsockopt(fd, SOL_TLS, opt, &ci,
				    info_len(t->cipher)));
	OPENSSL_cleanse(&ci, sizeof(ci));
	if (ret < 0)
		return xo_fail_sys("restore: setsockopt(SOL_TLS, %s, %s TLS 1.%d)",
				   opt == TLS_TX ? "TLS_TX" : "TLS_RX",
				   xo_tls_cipher_name(t->cipher),
				   t->version == XO_TLS_1_3 ? 3 : 2);
	return 0;
}

int xo_tls_restore_kernel(int fd, const struct xo_tls_state *t)
{
	int ret;

	if (XO_SYSCALL(setsockopt(fd, SOL_TCP, TCP_ULP, "tls", 3)) < 0) {
		ret = xo_fail_sys("restore: setsockopt(TCP_ULP, \"tls\")");
		if (errno == ENOENT)
			xo_append_hint("this kernel has no TLS (CONFIG_TLS)");
		return ret;
	}
	if (t->dirs & XO_TLS_DIR_TX) {
		ret = set_dir(fd, TLS_TX, t, &t->tx);
		if (ret)
			return ret;
	}
	if (t->dirs & XO_TLS_DIR_RX)
		return set_dir(fd, TLS_RX, t, &t->rx);
	return 0;
}

int xo_tls_kernel_available(void)
{
	int fd, ret = 0;

	xo_clear_error();
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return xo_fail_sys("TLS probe: socket()");
	/* On an unconnected socket a kernel with TLS answers ENOTCONN; one
	 * without it ENOENT (no such ULP). */
	if (setsockopt(fd, SOL_TCP, TCP_ULP, "tls", 3) == 0) {
		ret = 1;
	} else if (errno == ENOTCONN) {
		ret = 1;
	} else {
		xo_fail_sys("TLS probe: setsockopt(TCP_ULP, \"tls\")");
		ret = 0;
	}
	close(fd);
	return ret;
}
