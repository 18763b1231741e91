// SPDX-License-Identifier: MIT
/*
 * Memory for key material: whole pages of their own, mapped privately,
 * excluded from core dumps (MADV_DONTDUMP) and wiped before they go back
 * to the kernel. Used for the cluster key copies, the control channel's
 * session keys and TLS record keys.
 */
#include <openssl/crypto.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

/* The mapping's length sits in front of the caller's bytes. */
#define SECRET_HDR 64

static size_t map_len(size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (size + SECRET_HDR + page - 1) / page * page;
}

void *xo_secret_alloc(size_t size)
{
	size_t len = map_len(size);
	uint8_t *base;

	base = mmap(NULL, len, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED) {
		xo_fail_sys("secret: mmap(%zu bytes) for key material", len);
		return NULL;
	}
	/* Best effort: a kernel without it still gets wiped memory. */
	(void)madvise(base, len, MADV_DONTDUMP);
	memcpy(base, &len, sizeof(len));
	return base + SECRET_HDR; /* zeroed by mmap */
}

void xo_secret_free(void *secret)
{
	uint8_t *base;
	size_t len;

	if (!secret)
		return;
	base = (uint8_t *)secret - SECRET_HDR;
	memcpy(&len, base, sizeof(len));
	OPENSSL_cleanse(base, len);
	munmap(base, len);
}
