/* SPDX-License-Identifier: MIT */
/*
 * Packet parsing: Ethernet -> IPv4/IPv6 -> TCP, into a flow key plus the
 * header offsets and pointers the rewrite code needs.
 *
 * Deliberately narrow: untagged Ethernet, IPv6 without extension headers,
 * IPv4 first fragments only. Anything else is "not ours" and passes; XO
 * only steers TCP connections it moved itself, and those never carry
 * such headers on the lab or on the paper's testbed.
 */
#ifndef XO_BPF_PARSE_H
#define XO_BPF_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xo_types.h"
#include "xo_steer_abi.h"

#define XO_IP_MF_OFFSET 0x1fff /* fragment offset bits of frag_off */

/* Largest header stack we look at: Ethernet + IPv4 with options + TCP. */
#define XO_MAX_HDR_LEN (ETH_HLEN + 60 + 20)

struct xo_pkt {
	struct xo_flow_key key;
	__u32 l3_off;         /* from the start of the frame */
	__u32 l4_off;
	struct ethhdr *eth;   /* valid until a helper changes the packet */
	void *l3;             /* struct iphdr or struct ipv6hdr */
	struct tcphdr *tcp;
};

/* Returns 0 and fills p for a TCP packet we can steer, -1 otherwise. */
static __always_inline int xo_parse(void *data, void *data_end,
				    struct xo_pkt *p)
{
	struct ethhdr *eth = data;
	struct tcphdr *tcp;

	__builtin_memset(&p->key, 0, sizeof(p->key));
	if ((void *)(eth + 1) > data_end)
		return -1;
	p->eth = eth;
	p->l3_off = ETH_HLEN;
	p->l3 = eth + 1;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return -1;
		if (ip->version != 4 || ip->ihl < 5 ||
		    ip->protocol != IPPROTO_TCP)
			return -1;
		/* A non-first fragment has no TCP header to match on. */
		if (ip->frag_off & bpf_htons(XO_IP_MF_OFFSET))
			return -1;
		ihl = ip->ihl * 4;
		tcp = (void *)ip + ihl;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		__builtin_memcpy(p->key.src_addr, &ip->saddr, 4);
		__builtin_memcpy(p->key.dst_addr, &ip->daddr, 4);
		p->key.family = XO_AF_INET;
		p->l4_off = ETH_HLEN + ihl;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		__builtin_memcpy(p->key.src_addr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.dst_addr, &ip6->daddr, 16);
		p->key.family = XO_AF_INET6;
		p->l4_off = ETH_HLEN + sizeof(*ip6);
	} else {
		return -1;
	}
	p->tcp = tcp;
	p->key.src_port = tcp->source;
	p->key.dst_port = tcp->dest;
	p->key.proto = XO_IPPROTO_TCP;
	return 0;
}

#endif
