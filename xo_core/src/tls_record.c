// SPDX-License-Identifier: MIT
/*
 * TLS in user space: the record state from the secrets of OpenSSL's key
 * log, and a record layer (AEAD records, OpenSSL EVP) that continues a
 * session from a struct xo_tls_state when the kernel has no TLS.
 *
 * Records (RFC 8446 5.2, RFC 5246 6.2.3.3, RFC 7905):
 *   TLS 1.3: header 23 | 0x0303 | length; nonce = IV XOR seq; additional
 *            data = the header; plaintext = data | type | zero padding.
 *   TLS 1.2 AES-GCM: header type | 0x0303 | length; explicit nonce (8)
 *            | ciphertext | tag; nonce = salt | explicit; additional data
 *            = seq | type | 0x0303 | plaintext length.
 *   TLS 1.2 ChaCha20-Poly1305: as AES-GCM without an explicit nonce;
 *            nonce = IV XOR seq.
 * The explicit nonce sent is the state's TX IV, counted up per record as
 * the kernel does, so both carry on from the same state.
 */
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define HDR 5
#define TAG 16
#define EXPLICIT 8

struct xo_tls_rec {
	struct xo_tls_state st;
	EVP_CIPHER_CTX *tx, *rx;
};

static const EVP_CIPHER *evp_cipher(uint16_t cipher)
{
	switch (cipher) {
	case XO_TLS_AES_GCM_128:
		return EVP_aes_128_gcm();
	case XO_TLS_AES_GCM_256:
		return EVP_aes_256_gcm();
	default:
		return EVP_chacha20_poly1305();
	}
}

static const char *digest_of(uint16_t cipher)
{
	return cipher == XO_TLS_AES_GCM_256 ? "SHA384" : "SHA256";
}

static int kdf(const char *name, OSSL_PARAM *params, uint8_t *out, size_t len)
{
	EVP_KDF *k = EVP_KDF_fetch(NULL, name, NULL);
	EVP_KDF_CTX *c = k ? EVP_KDF_CTX_new(k) : NULL;
	int ok;

	EVP_KDF_free(k);
	if (!c)
		return xo_fail(XO_E_SYS, "TLS: %s unavailable in libcrypto", name);
	ok = EVP_KDF_derive(c, out, len, params) == 1;
	EVP_KDF_CTX_free(c);
	if (!ok)
		return xo_fail(XO_E_SYS, "TLS: %s failed in libcrypto", name);
	return 0;
}

/* HKDF-Expand-Label(secret, label, "", len) of RFC 8446 7.1. */
static int expand_label(uint16_t cipher, const uint8_t *secret,
			uint32_t secret_len, const char *label, uint8_t *out,
			size_t len)
{
	uint8_t info[2 + 1 + 6 + 16 + 1];
	size_t n = strlen(label), i = 0;
	OSSL_PARAM params[5];
	int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;

	info[i++] = (uint8_t)(len >> 8);
	info[i++] = (uint8_t)len;
	info[i++] = (uint8_t)(6 + n);
	memcpy(info + i, "tls13 ", 6);
	memcpy(info + i + 6, label, n);
	i += 6 + n;
	info[i++] = 0; /* empty context */
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
						     (char *)digest_of(cipher), 0);
	params[1] = OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
						      (void *)secret,
						      secret_len);
	params[3] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info,
						      i);
	params[4] = OSSL_PARAM_construct_end();
	return kdf("HKDF", params, out, len);
}

/* The kernel's split of a write IV: AES-GCM a 4-byte salt (and the
 * explicit / remaining 8 bytes as "iv"), ChaCha20 all 12 bytes as iv. */
static void fill_dir(struct xo_tls_dir *d, uint16_t cipher,
		     const uint8_t *key, uint32_t key_len, const uint8_t *iv,
		     const uint8_t *explicit, uint64_t seq)
{
	memcpy(d->key, key, key_len);
	if (cipher == XO_TLS_CHACHA20_POLY1305) {
		memcpy(d->iv, iv, 12);
	} else {
		memcpy(d->salt, iv, 4);
		memcpy(d->iv, explicit, 8);
	}
	d->rec_seq = seq;
}

static int begin(uint16_t version, uint16_t cipher, struct xo_tls_state *out,
		 uint32_t *key_len)
{
	uint32_t iv, salt;
	int ret;

	xo_clear_error();
	if (!out)
		return xo_fail(XO_E_INVAL, "TLS: NULL output");
	memset(out, 0, sizeof(*out));
	ret = xo_tls_sizes(cipher, key_len, &iv, &salt);
	if (ret)
		return ret;
	out->version = version;
	out->cipher = cipher;
	out->dirs = XO_TLS_DIR_TX | XO_TLS_DIR_RX;
	return 0;
}

int xo_tls13_state(uint16_t cipher, const uint8_t *client_secret,
		   const uint8_t *server_secret, uint32_t secret_len,
		   int is_server, uint64_t tx_seq, uint64_t rx_seq,
		   struct xo_tls_state *out)
{
	uint8_t key[2][32], iv[2][12];
	uint32_t key_len, want;
	int ret, i;

	ret = begin(XO_TLS_1_3, cipher, out, &key_len);
	if (ret)
		return ret;
	want = cipher == XO_TLS_AES_GCM_256 ? 48 : 32;
	if (!client_secret || !server_secret || secret_len != want)
		return xo_fail(XO_E_INVAL,
			       "TLS 1.3: traffic secrets of %u bytes, %s takes %u",
			       secret_len, xo_tls_cipher_name(cipher), want);
	for (i = 0; i < 2 && !ret; i++) {
		const uint8_t *s = i ? server_secret : client_secret;

		ret = expand_label(cipher, s, secret_len, "key", key[i],
				   key_len);
		if (!ret)
			ret = expand_label(cipher, s, secret_len, "iv", iv[i],
					   12);
	}
	if (!ret) {
		/* [0] client write, [1] server write */
		fill_dir(&out->tx, cipher, key[!!is_server], key_len,
			 iv[!!is_server], iv[!!is_server] + 4, tx_seq);
		fill_dir(&out->rx, cipher, key[!is_server], key_len,
			 iv[!is_server], iv[!is_server] + 4, rx_seq);
		ret = xo_tls_check(out);
	}
	OPENSSL_cleanse(key, sizeof(key));
	OPENSSL_cleanse(iv, sizeof(iv));
	if (ret)
		OPENSSL_cleanse(out, sizeof(*out));
	return ret;
}

int xo_tls12_state(uint16_t cipher, const uint8_t *master,
		   uint32_t master_len, const uint8_t *client_random,
		   const uint8_t *server_random, int is_server,
		   uint64_t tx_seq, uint64_t rx_seq, struct xo_tls_state *out)
{
	uint8_t block[2 * 32 + 2 * 12], seed[13 + 64], explicit[8];
	uint32_t key_len, iv_len;
	OSSL_PARAM params[4];
	const uint8_t *ck, *sk, *civ, *siv;
	int ret;

	ret = begin(XO_TLS_1_2, cipher, out, &key_len);
	if (ret)
		return ret;
	if (!master || master_len != 48 || !client_random || !server_random)
		return xo_fail(XO_E_INVAL,
			       "TLS 1.2: a master secret of 48 bytes and both randoms are needed (got %u bytes)",
			       master_len);
	iv_len = cipher == XO_TLS_CHACHA20_POLY1305 ? 12 : 4;
	memcpy(seed, "key expansion", 13);
	memcpy(seed + 13, server_random, 32);
	memcpy(seed + 45, client_random, 32);
	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
						     (char *)digest_of(cipher), 0);
	params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SECRET,
						      (void *)master, 48);
	params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SEED, seed,
						      sizeof(seed));
	params[3] = OSSL_PARAM_construct_end();
	ret = kdf("TLS1-PRF", params, block, 2 * key_len + 2 * iv_len);
	if (!ret) {
		ck = block;
		sk = block + key_len;
		civ = block + 2 * key_len;
		siv = civ + iv_len;
		/* The next explicit nonce: the record's sequence number (any
		 * value not used before would do). */
		xo_put64(explicit, tx_seq);
		fill_dir(&out->tx, cipher, is_server ? sk : ck, key_len,
			 is_server ? siv : civ, explicit, tx_seq);
		xo_put64(explicit, rx_seq);
		fill_dir(&out->rx, cipher, is_server ? ck : sk, key_len,
			 is_server ? civ : siv, explicit, rx_seq);
		ret = xo_tls_check(out);
	}
	OPENSSL_cleanse(block, sizeof(block));
	if (ret)
		OPENSSL_cleanse(out, sizeof(*out));
	return ret;
}

/* ---- the record layer ---------------------------------------------------- */

static EVP_CIPHER_CTX *keyed(uint16_t cipher, const uint8_t *key, int enc)
{
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();

	if (c && EVP_CipherInit_ex(c, evp_cipher(cipher), NULL, key, NULL,
				   enc) == 1)
		return c;
	EVP_CIPHER_CTX_free(c);
	return NULL;
}

int xo_tls_rec_new(const struct xo_tls_state *tls, struct xo_tls_rec **out)
{
	struct xo_tls_rec *r;
	int ret;

	xo_clear_error();
	if (!out)
		return xo_fail(XO_E_INVAL, "TLS record layer: NULL output");
	*out = NULL;
	ret = xo_tls_check(tls);
	if (ret)
		return ret;
	if (tls->dirs != (XO_TLS_DIR_TX | XO_TLS_DIR_RX))
		return xo_fail(XO_E_INVAL,
			       "TLS record layer: needs both directions' keys (have 0x%x)",
			       tls->dirs);
	r = xo_secret_alloc(sizeof(*r));
	if (!r)
		return XO_E_NOMEM;
	r->st = *tls;
	r->tx = keyed(tls->cipher, tls->tx.key, 1);
	r->rx = keyed(tls->cipher, tls->rx.key, 0);
	if (!r->tx || !r->rx) {
		xo_tls_rec_free(r);
		return xo_fail(XO_E_SYS, "TLS record layer: %s unavailable in libcrypto",
			       xo_tls_cipher_name(tls->cipher));
	}
	*out = r;
	return 0;
}

void xo_tls_rec_free(struct xo_tls_rec *r)
{
	if (!r)
		return;
	EVP_CIPHER_CTX_free(r->tx);
	EVP_CIPHER_CTX_free(r->rx);
	xo_secret_free(r);
}

int xo_tls_rec_get_state(const struct xo_tls_rec *r, struct xo_tls_state *out)
{
	xo_clear_error();
	if (!r || !out)
		return xo_fail(XO_E_INVAL, "TLS record layer: NULL argument");
	*out = r->st;
	return 0;
}

static int tls12_explicit(const struct xo_tls_rec *r)
{
	return r->st.version == XO_TLS_1_2 &&
	       r->st.cipher != XO_TLS_CHACHA20_POLY1305;
}

size_t xo_tls_rec_sealed_size(const struct xo_tls_rec *r, uint32_t len)
{
	if (r->st.version == XO_TLS_1_3)
		return HDR + (size_t)len + 1 + TAG;
	return HDR + (tls12_explicit(r) ? EXPLICIT : 0) + (size_t)len + TAG;
}

/* The 12-byte nonce of a record with sequence number seq. */
static void nonce_of(const struct xo_tls_rec *r, const struct xo_tls_dir *d,
		     const uint8_t *explicit, uint64_t seq, uint8_t *nonce)
{
	uint8_t s[8];
	int i;

	if (tls12_explicit(r)) {
		memcpy(nonce, d->salt, 4);
		memcpy(nonce + 4, explicit, 8);
		return;
	}
	if (r->st.cipher == XO_TLS_CHACHA20_POLY1305) {
		memcpy(nonce, d->iv, 12);
	} else {
		memcpy(nonce, d->salt, 4);
		memcpy(nonce + 4, d->iv, 8);
	}
	xo_put64(s, seq);
	for (i = 0; i < 8; i++)
		nonce[4 + i] ^= s[i];
}

static int run(EVP_CIPHER_CTX *c, const uint8_t *nonce, int enc,
	       const uint8_t *aad, int aad_len, uint8_t *data, int len,
	       uint8_t *tag)
{
	int n;

	if (EVP_CipherInit_ex(c, NULL, NULL, NULL, nonce, enc) != 1 ||
	    EVP_CipherUpdate(c, NULL, &n, aad, aad_len) != 1 ||
	    (len && EVP_CipherUpdate(c, data, &n, data, len) != 1))
		return xo_fail(XO_E_SYS, "TLS record: AEAD failed in libcrypto");
	if (!enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, TAG, tag) != 1)
		return xo_fail(XO_E_SYS, "TLS record: AEAD tag failed in libcrypto");
	if (EVP_CipherFinal_ex(c, data + len, &n) != 1)
		return enc ? xo_fail(XO_E_SYS, "TLS record: AEAD failed in libcrypto") :
			     XO_E_AUTH;
	if (enc && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, TAG, tag) != 1)
		return xo_fail(XO_E_SYS, "TLS record: AEAD tag failed in libcrypto");
	return 0;
}

static void count_up(uint8_t *be, int n)
{
	while (n-- > 0)
		if (++be[n])
			break;
}

int64_t xo_tls_rec_seal(struct xo_tls_rec *r, uint8_t type,
			const uint8_t *in, uint32_t len, uint8_t *out,
			size_t cap)
{
	struct xo_tls_dir *d;
	uint8_t nonce[12], aad[13], *body;
	size_t need;
	uint32_t inner;
	int ret;

	xo_clear_error();
	if (!r || !out || (len && !in))
		return xo_fail(XO_E_INVAL, "TLS record: NULL argument");
	if (len > XO_TLS_MAX_PLAINTEXT)
		return xo_fail(XO_E_TOO_LARGE,
			       "TLS record: %u bytes, a record carries at most %d",
			       len, XO_TLS_MAX_PLAINTEXT);
	if (type < 20 || type > 23)
		return xo_fail(XO_E_FIELD, "TLS record: content type %u", type);
	need = xo_tls_rec_sealed_size(r, len);
	if (need > cap)
		return xo_fail(XO_E_NOSPACE, "TLS record: need %zu bytes, have %zu",
			       need, cap);
	d = &r->st.tx;
	if (d->rec_seq >= UINT64_MAX - 1)
		return xo_fail(XO_E_STATE,
			       "TLS record: sequence numbers exhausted (the session must rekey)");
	out[0] = r->st.version == XO_TLS_1_3 ? 23 : type;
	xo_put16(out + 1, 0x0303);
	xo_put16(out + 3, (uint16_t)(need - HDR));
	body = out + HDR;
	if (r->st.version == XO_TLS_1_3) {
		memmove(body, in, len);
		body[len] = type;
		inner = len + 1;
		nonce_of(r, d, NULL, d->rec_seq, nonce);
		ret = run(r->tx, nonce, 1, out, HDR, body, (int)inner,
			  body + inner);
	} else {
		xo_put64(aad, d->rec_seq);
		aad[8] = type;
		xo_put16(aad + 9, 0x0303);
		xo_put16(aad + 11, (uint16_t)len);
		if (tls12_explicit(r)) {
			memcpy(body, d->iv, EXPLICIT);
			body += EXPLICIT;
		}
		memmove(body, in, len);
		nonce_of(r, d, d->iv, d->rec_seq, nonce);
		ret = run(r->tx, nonce, 1, aad, sizeof(aad), body, (int)len,
			  body + len);
		if (!ret && tls12_explicit(r))
			count_up(d->iv, EXPLICIT);
	}
	if (ret) {
		OPENSSL_cleanse(out, need);
		return ret;
	}
	d->rec_seq++;
	return (int64_t)need;
}

int64_t xo_tls_rec_open(struct xo_tls_rec *r, uint8_t *buf, size_t len,
			struct xo_tls_record *rec)
{
	struct xo_tls_dir *d;
	uint8_t nonce[12], aad[13], *body;
	uint32_t rlen, clen;
	int ret;

	xo_clear_error();
	if (!r || !buf || !rec)
		return xo_fail(XO_E_INVAL, "TLS record: NULL argument");
	memset(rec, 0, sizeof(*rec));
	if (len < HDR)
		return 0;
	rlen = xo_get16(buf + 3);
	if (rlen > XO_TLS_MAX_RECORD - HDR)
		return xo_fail(XO_E_TOO_LARGE,
			       "TLS record: %u bytes announced, at most %d",
			       rlen, XO_TLS_MAX_RECORD - HDR);
	if (xo_get16(buf + 1) != 0x0303)
		return xo_fail(XO_E_FIELD, "TLS record: version bytes 0x%04x",
			       xo_get16(buf + 1));
	if (buf[0] < 20 || buf[0] > 23 ||
	    (r->st.version == XO_TLS_1_3 && buf[0] != 23))
		return xo_fail(XO_E_FIELD,
			       "TLS record: content type %u (not a protected record)",
			       buf[0]);
	if (len < HDR + (size_t)rlen)
		return 0;
	d = &r->st.rx;
	if (d->rec_seq >= UINT64_MAX - 1)
		return xo_fail(XO_E_STATE, "TLS record: sequence numbers exhausted");
	body = buf + HDR;
	if (r->st.version == XO_TLS_1_3) {
		if (rlen < TAG + 1)
			return xo_fail(XO_E_FIELD, "TLS record: %u bytes, too short",
				       rlen);
		clen = rlen - TAG;
		nonce_of(r, d, NULL, d->rec_seq, nonce);
		ret = run(r->rx, nonce, 0, buf, HDR, body, (int)clen,
			  body + clen);
		if (ret)
			goto bad;
		while (clen && !body[clen - 1])
			clen--; /* zero padding */
		if (!clen) {
			ret = xo_fail(XO_E_FIELD, "TLS record: no content type");
			goto bad;
		}
		rec->type = body[clen - 1];
		rec->len = clen - 1;
		rec->data = body;
	} else {
		uint32_t ex = tls12_explicit(r) ? EXPLICIT : 0;

		if (rlen < ex + TAG)
			return xo_fail(XO_E_FIELD, "TLS record: %u bytes, too short",
				       rlen);
		clen = rlen - ex - TAG;
		xo_put64(aad, d->rec_seq);
		aad[8] = buf[0];
		xo_put16(aad + 9, 0x0303);
		xo_put16(aad + 11, (uint16_t)clen);
		nonce_of(r, d, body, d->rec_seq, nonce);
		ret = run(r->rx, nonce, 0, aad, sizeof(aad), body + ex,
			  (int)clen, body + ex + clen);
		if (ret)
			goto bad;
		rec->type = buf[0];
		rec->len = clen;
		rec->data = body + ex;
	}
	d->rec_seq++;
	return (int64_t)(HDR + rlen);
bad:
	OPENSSL_cleanse(body, rlen);
	if (ret == XO_E_AUTH)
		return xo_fail(XO_E_AUTH,
			       "TLS record %llu does not verify (wrong keys or sequence, or altered)",
			       (unsigned long long)d->rec_seq);
	return ret;
}
