/* SPDX-License-Identifier: MIT */
/* Helpers shared by the core's sources; not part of the public API. */
#ifndef XO_INTERNAL_H
#define XO_INTERNAL_H

#include <errno.h>
#include <string.h>

#include "xo.h"

#if defined(__GNUC__)
#define XO_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define XO_PRINTF(a, b)
#endif

/* Record code + sentence for xo_last_error(); returns code so callers can
 * write "return xo_fail(XO_E_INVAL, "...")". */
int xo_fail(int code, const char *fmt, ...) XO_PRINTF(2, 3);
/* Record a failed system call: "<step>: <strerror> (errno N)". Maps EPERM
 * and EACCES to XO_E_PERM, everything else to XO_E_SYS. Uses errno.
 * Callers add what the missing privilege is with xo_append_hint(). */
int xo_fail_sys(const char *step, ...) XO_PRINTF(1, 2);
/* Add "; <hint>" to the last error's sentence (what to do about it). */
void xo_append_hint(const char *hint);
/* Forget the last error (start of each public entry point). */
void xo_clear_error(void);

/* Key material: zeroed pages of their own, excluded from core dumps
 * (MADV_DONTDUMP); xo_secret_free() wipes them before unmapping. NULL on
 * failure (error recorded). */
void *xo_secret_alloc(size_t size);
void xo_secret_free(void *secret);

/* TLS (tls.c): lengths of a cipher's key, IV and salt (XO_E_FIELD for an
 * unknown cipher); whether fd's ULP is "tls"; the kernel's TLS state of a
 * frozen socket into st->tls (queues must be empty); install it on a
 * restored, ESTABLISHED socket. */
int xo_tls_sizes(uint16_t cipher, uint32_t *key, uint32_t *iv,
		 uint32_t *salt);
const char *xo_tls_cipher_name(uint16_t cipher);
int xo_tls_ulp(int fd, int *is_tls);
int xo_tls_capture_kernel(int fd, struct xo_tcp_state *st);
int xo_tls_restore_kernel(int fd, const struct xo_tls_state *t);

/* Segments fd's socket has taken in (tcpi_segs_in, wrapping): counts a
 * replayed frame once the kernel delivered it, whenever that is. */
int xo_tcp_segs_in(int fd, uint32_t *segs);

/* Per-thread counter of system calls made by the current operation. */
extern __thread unsigned int xo_syscall_count;
#define XO_SYSCALL(expr) (xo_syscall_count++, (expr))

#endif
