/* SPDX-License-Identifier: MIT */
/*
 * Incremental Internet checksum updates (RFC 1624, eqn. 3:
 * HC' = ~(~HC + ~m + m')) for the XDP path, which has no skb and so no
 * bpf_l3/l4_csum_replace(). The tc path uses those helpers instead because
 * they also handle CHECKSUM_PARTIAL skbs correctly.
 *
 * All values are raw memory words: one's complement sums do not care about
 * byte order as long as every word is read the same way.
 */
#ifndef XO_BPF_CSUM_H
#define XO_BPF_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 xo_csum_fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* Replace a 16-bit word covered by *sum. */
static __always_inline void xo_csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u64 s = (__u16)~*sum;

	s += (__u16)~from;
	s += to;
	*sum = ~xo_csum_fold(s);
}

/* Replace a 32-bit word covered by *sum. */
static __always_inline void xo_csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u64 s = (__u16)~*sum;

	s += (__u16)~(from & 0xffff);
	s += (__u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	*sum = ~xo_csum_fold(s);
}

/* Replace 16 bytes (an IPv6 address) covered by *sum. */
static __always_inline void xo_csum_replace16(__u16 *sum, const __u32 *from,
					      const __u32 *to)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		xo_csum_replace4(sum, from[i], to[i]);
}

#endif
