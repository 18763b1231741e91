/* SPDX-License-Identifier: MIT */
/* Big-endian field access for the core's wire formats. Callers check
 * bounds before calling; these only move bytes. */
#ifndef XO_WIRE_H
#define XO_WIRE_H

#include <stdint.h>
#include <string.h>

static inline uint8_t *xo_put16(uint8_t *p, uint16_t v)
{
	p[0] = v >> 8;
	p[1] = v;
	return p + 2;
}

static inline uint8_t *xo_put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
	return p + 4;
}

static inline uint8_t *xo_put64(uint8_t *p, uint64_t v)
{
	p = xo_put32(p, v >> 32);
	return xo_put32(p, (uint32_t)v);
}

static inline uint8_t *xo_put_bytes(uint8_t *p, const uint8_t *src,
				    size_t len)
{
	if (len)
		memcpy(p, src, len);
	return p + len;
}

static inline uint16_t xo_get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t xo_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t xo_get64(const uint8_t *p)
{
	return (uint64_t)xo_get32(p) << 32 | xo_get32(p + 4);
}

#endif
