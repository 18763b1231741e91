// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for xo_state_decode().
 *
 * Build (tests/test_codec.py does this and runs it for a few seconds):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Ixo_core/include -Ixo_core/src tests/fuzz/fuzz_state_decode.c \
 *     xo_core/src/state_codec.c xo_core/src/tcp_repair.c xo_core/src/error.c
 *
 * Checks, besides "no crash, no leak, no undefined behaviour":
 *  - a refusal is a decode error code with a sentence, and leaves the
 *    state all zero;
 *  - an accepted input re-encodes canonically: to exactly the input, or
 *    (when the decoder skipped unknown optional fields) to something
 *    shorter that itself decodes and re-encodes to itself.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xo.h"

#define CHECK(cond)                                                        \
	do {                                                               \
		if (!(cond)) {                                             \
			fprintf(stderr, "%s:%d: check failed: %s (%s)\n",  \
				__FILE__, __LINE__, #cond, xo_last_error()); \
			abort();                                           \
		}                                                          \
	} while (0)

static int is_zero(const void *p, size_t n)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < n; i++)
		if (b[i])
			return 0;
	return 1;
}

static uint8_t *encode(const struct xo_tcp_state *st, size_t *len)
{
	size_t need = xo_state_encoded_size(st);
	uint8_t *out = malloc(need ? need : 1);
	int64_t n;

	CHECK(out);
	n = xo_state_encode(st, out, need);
	CHECK(n >= 0 && (size_t)n == need);
	*len = need;
	return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct xo_tcp_state st, again;
	uint8_t *out, *out2;
	size_t len, len2;
	int ret;

	memset(&st, 0xa5, sizeof(st)); /* decode must not trust the caller's st */
	ret = xo_state_decode(data, size, &st);
	if (ret) {
		CHECK(ret <= XO_E_TRUNCATED && ret >= XO_E_TOO_LARGE);
		CHECK(xo_last_error()[0]);
		CHECK(is_zero(&st, sizeof(st)));
		return 0;
	}
	CHECK(st.local.port && st.remote.port);
	CHECK(st.local.family == st.remote.family);
	out = encode(&st, &len);
	CHECK(len <= size);
	if (len == size)
		CHECK(!memcmp(out, data, size));

	memset(&again, 0, sizeof(again));
	CHECK(xo_state_decode(out, len, &again) == 0);
	out2 = encode(&again, &len2);
	CHECK(len2 == len && !memcmp(out, out2, len));

	free(out);
	free(out2);
	xo_state_release(&again);
	xo_state_release(&st);
	return 0;
}
