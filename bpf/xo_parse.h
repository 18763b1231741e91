/* SPDX-License-Identifier: MIT */
/*
 * Packet parsing: Ethernet -> IPv4/IPv6 (walking IPv6 extension headers)
 * -> TCP, into a flow key plus the header offsets and pointers the rewrite
 * code needs.
 *
 * Three outcomes (docs/steering.md, "Packets without readable ports"):
 *  - XO_PARSE_TCP: a TCP header with ports; the key is complete. IPv4
 *    first fragments and IPv6 packets with hop-by-hop, routing,
 *    destination-options or fragment headers (first fragment) included.
 *  - XO_PARSE_NOPORTS: TCP (or possibly TCP) for an address pair, but the
 *    ports cannot be read: a non-first fragment, a first fragment cut
 *    before the end of the TCP header, or an IPv6 header chain longer than
 *    the parser walks. Only the addresses and family are filled in.
 *  - XO_PARSE_NONE: not TCP over IP, or malformed: passes untouched.
 * Untagged Ethernet only.
 */
#ifndef XO_BPF_PARSE_H
#define XO_BPF_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xo_types.h"
#include "xo_steer_abi.h"

#define XO_PARSE_TCP 0
#define XO_PARSE_NOPORTS 1
#define XO_PARSE_NONE -1

#define XO_IP_MF 0x2000        /* more-fragments bit of frag_off */
#define XO_IP_OFFSET 0x1fff    /* fragment offset bits of frag_off */
#define XO_IP6_OFFSET 0xfff8   /* fragment offset bits (IPv6 fragment header) */

/* IPv6 extension headers walked before TCP, at most, and their total size.
 * A chain beyond either bound has no readable ports (XO_PARSE_NOPORTS). */
#define XO_IPV6_MAX_EXT 6
#define XO_IPV6_MAX_EXT_BYTES 512

/* Linear bytes the tc programs want: Ethernet + IPv4 with options + TCP;
 * for IPv6 with extension headers, the whole walkable chain + TCP. */
#define XO_MAX_HDR_LEN (ETH_HLEN + 60 + 20)
#define XO_MAX_HDR_LEN_EXT (ETH_HLEN + 40 + XO_IPV6_MAX_EXT_BYTES + 20)

/* IPv6 fragment header (RFC 8200 4.5); not in the UAPI headers. */
struct xo_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;       /* offset (13 bits, 8-octet units) | res | M */
	__be32 identification;
};

struct xo_pkt {
	struct xo_flow_key key;
	__u32 l3_off;         /* from the start of the frame */
	__u32 l4_off;
	struct ethhdr *eth;   /* valid until a helper changes the packet */
	void *l3;             /* struct iphdr or struct ipv6hdr */
	struct tcphdr *tcp;
};

static __always_inline int xo_ipv6_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING ||
	       nh == IPPROTO_DSTOPTS || nh == IPPROTO_FRAGMENT;
}

/* Walk the IPv6 extension headers from *off (bounded: the verifier sees
 * a fixed number of iterations and an offset that never passes
 * XO_MAX_HDR_LEN_EXT). Returns XO_PARSE_TCP with *off at the TCP header,
 * or XO_PARSE_NOPORTS / XO_PARSE_NONE. */
static __always_inline int xo_ipv6_walk(void *data, void *data_end, __u8 nh,
					__u32 *off)
{
	__u32 o = *off;

#pragma unroll
	for (int i = 0; i < XO_IPV6_MAX_EXT; i++) {
		if (nh == IPPROTO_TCP) {
			*off = o;
			return XO_PARSE_TCP;
		}
		if (nh == IPPROTO_FRAGMENT) {
			struct xo_frag_hdr *fh = data + o;

			if ((void *)(fh + 1) > data_end)
				return XO_PARSE_NOPORTS;
			/* A non-first fragment carries no TCP header. */
			if (fh->frag_off & bpf_htons(XO_IP6_OFFSET))
				return fh->nexthdr == IPPROTO_TCP ||
				       xo_ipv6_ext(fh->nexthdr) ?
					       XO_PARSE_NOPORTS :
					       XO_PARSE_NONE;
			nh = fh->nexthdr;
			o += sizeof(*fh);
		} else if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING ||
			   nh == IPPROTO_DSTOPTS) {
			struct ipv6_opt_hdr *oh = data + o;

			if ((void *)(oh + 1) > data_end)
				return XO_PARSE_NOPORTS;
			nh = oh->nexthdr;
			o += ((__u32)oh->hdrlen + 1) * 8;
		} else {
			return XO_PARSE_NONE; /* UDP, ICMPv6, ESP, ...: not ours */
		}
		if (o > ETH_HLEN + sizeof(struct ipv6hdr) +
				XO_IPV6_MAX_EXT_BYTES)
			return XO_PARSE_NOPORTS;
	}
	if (nh != IPPROTO_TCP)
		return XO_PARSE_NOPORTS; /* a longer chain than we walk */
	*off = o;
	return XO_PARSE_TCP;
}

/* Fills p; returns XO_PARSE_TCP, XO_PARSE_NOPORTS or XO_PARSE_NONE. */
static __always_inline int xo_parse(void *data, void *data_end,
				    struct xo_pkt *p)
{
	struct ethhdr *eth = data;
	struct tcphdr *tcp;
	__u32 off;

	__builtin_memset(&p->key, 0, sizeof(p->key));
	if ((void *)(eth + 1) > data_end)
		return XO_PARSE_NONE;
	p->eth = eth;
	p->l3_off = ETH_HLEN;
	p->l3 = eth + 1;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return XO_PARSE_NONE;
		if (ip->version != 4 || ip->ihl < 5 ||
		    ip->protocol != IPPROTO_TCP)
			return XO_PARSE_NONE;
		__builtin_memcpy(p->key.src_addr, &ip->saddr, 4);
		__builtin_memcpy(p->key.dst_addr, &ip->daddr, 4);
		p->key.family = XO_AF_INET;
		p->key.proto = XO_IPPROTO_TCP;
		/* A non-first fragment has no TCP header to match on. */
		if (ip->frag_off & bpf_htons(XO_IP_OFFSET))
			return XO_PARSE_NOPORTS;
		off = ETH_HLEN + ip->ihl * 4;
		tcp = data + off;
		if ((void *)(tcp + 1) > data_end)
			/* A first fragment too short for the TCP header
			 * (RFC 1858's tiny fragment) is no match either. */
			return ip->frag_off & bpf_htons(XO_IP_MF) ?
				       XO_PARSE_NOPORTS : XO_PARSE_NONE;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		int ret;

		if ((void *)(ip6 + 1) > data_end)
			return XO_PARSE_NONE;
		if (ip6->version != 6)
			return XO_PARSE_NONE;
		if (ip6->nexthdr != IPPROTO_TCP && !xo_ipv6_ext(ip6->nexthdr))
			return XO_PARSE_NONE;
		__builtin_memcpy(p->key.src_addr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.dst_addr, &ip6->daddr, 16);
		p->key.family = XO_AF_INET6;
		p->key.proto = XO_IPPROTO_TCP;
		off = ETH_HLEN + sizeof(*ip6);
		ret = xo_ipv6_walk(data, data_end, ip6->nexthdr, &off);
		if (ret != XO_PARSE_TCP)
			return ret;
		if (off > XO_MAX_HDR_LEN_EXT)
			return XO_PARSE_NOPORTS;
		tcp = data + off;
		if ((void *)(tcp + 1) > data_end)
			/* Cut short: a plain packet is garbage, a chain
			 * with extension headers may be a tiny fragment. */
			return ip6->nexthdr == IPPROTO_TCP ? XO_PARSE_NONE :
							     XO_PARSE_NOPORTS;
	} else {
		return XO_PARSE_NONE;
	}
	p->l4_off = off;
	p->tcp = tcp;
	p->key.src_port = tcp->source;
	p->key.dst_port = tcp->dest;
	return XO_PARSE_TCP;
}

#endif
