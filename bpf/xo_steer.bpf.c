// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * XO flow steering datapath.
 *
 *   xo_tc_ingress  tc clsact ingress, direct action, on the host (and on the
 *                  target while it takes a connection back): BLOCK drops,
 *                  PARK drops keeping a copy in the xo_parked ring,
 *                  REDIRECT rewrites dst ip:port and both MACs and sends the
 *                  frame back out of an interface's egress.
 *   xo_tc_egress   tc clsact egress on the target: SRC_REWRITE makes the
 *                  restored socket's replies leave as host-ip:host-port.
 *   xo_xdp         XDP variant of xo_tc_ingress (XDP_DROP / XDP_TX).
 *
 * All three look up the same pinned map (xo_maps.h). An entry whose expiry
 * has passed is ignored: the packet passes as if there were no entry.
 * Packets whose ports cannot be read (non-first fragments, xo_parse.h) are
 * dropped on ingress while their address pair is steered (xo_pairs).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xo_types.h"
#include "xo_steer_abi.h"
#include "xo_csum.h"
#include "xo_maps.h"
#include "xo_parse.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

static __always_inline int xo_expired(const struct xo_steer_action *a)
{
	return a->expires_ns && bpf_ktime_get_ns() >= a->expires_ns;
}

static __always_inline int xo_nonzero(const __u8 *b, int n)
{
	__u8 acc = 0;

#pragma unroll
	for (int i = 0; i < 16; i++)
		if (i < n)
			acc |= b[i];
	return acc != 0;
}

static __always_inline void xo_count(struct xo_steer_action *live, __u64 len)
{
	/* The entry may be updated from user space at the same time; atomic
	 * adds keep concurrent CPUs from losing counts. */
	__sync_fetch_and_add(&live->packets, 1);
	__sync_fetch_and_add(&live->bytes, len);
}

/*
 * tc: rewrite the source (dst == 0) or destination (dst == 1) address and
 * port, fixing the IPv4 header and TCP checksums incrementally. The helpers
 * are used rather than direct writes because they know about
 * CHECKSUM_PARTIAL skbs (locally generated traffic on the target's egress).
 */
static __always_inline int xo_skb_rewrite_l3l4(struct __sk_buff *skb,
					       const struct xo_pkt *p, int dst,
					       const __u8 *new_addr,
					       __u16 new_port)
{
	__u32 csum_off = p->l4_off + offsetof(struct tcphdr, check);
	__u32 port_off = p->l4_off + (dst ? offsetof(struct tcphdr, dest) :
					    offsetof(struct tcphdr, source));
	__u16 old_port = dst ? p->key.dst_port : p->key.src_port;
	const __u8 *old_addr = dst ? p->key.dst_addr : p->key.src_addr;
	int alen = p->key.family == XO_AF_INET ? 4 : 16;

	if (xo_nonzero(new_addr, alen)) {
		if (p->key.family == XO_AF_INET) {
			__u32 from, to;
			__u32 addr_off = p->l3_off +
				(dst ? offsetof(struct iphdr, daddr) :
				       offsetof(struct iphdr, saddr));

			__builtin_memcpy(&from, old_addr, 4);
			__builtin_memcpy(&to, new_addr, 4);
			if (bpf_l4_csum_replace(skb, csum_off, from, to,
						BPF_F_PSEUDO_HDR | 4))
				return -1;
			if (bpf_l3_csum_replace(skb, p->l3_off +
						offsetof(struct iphdr, check),
						from, to, 4))
				return -1;
			if (bpf_skb_store_bytes(skb, addr_off, &to, 4, 0))
				return -1;
		} else {
			__u32 from[4], to[4];
			__s64 diff;
			__u32 addr_off = p->l3_off +
				(dst ? offsetof(struct ipv6hdr, daddr) :
				       offsetof(struct ipv6hdr, saddr));

			__builtin_memcpy(from, old_addr, 16);
			__builtin_memcpy(to, new_addr, 16);
			diff = bpf_csum_diff(from, 16, to, 16, 0);
			if (diff < 0)
				return -1;
			/* IPv6 has no header checksum; only the TCP
			 * pseudo header changes. */
			if (bpf_l4_csum_replace(skb, csum_off, 0, diff,
						BPF_F_PSEUDO_HDR))
				return -1;
			if (bpf_skb_store_bytes(skb, addr_off, to, 16, 0))
				return -1;
		}
	}
	if (new_port && new_port != old_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, 2))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
			return -1;
	}
	return 0;
}

static __always_inline int xo_skb_rewrite_macs(struct __sk_buff *skb,
					       const struct xo_steer_action *a)
{
	/* The source MAC matters as much as the destination: with the
	 * client's MAC as source, a bridge would learn the client on the
	 * host's port. */
	if (xo_nonzero(a->dst_mac, 6) &&
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest),
				a->dst_mac, 6, 0))
		return -1;
	if (xo_nonzero(a->src_mac, 6) &&
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source),
				a->src_mac, 6, 0))
		return -1;
	return 0;
}

/* Make sure the headers we parse are in the linear part of the skb: an
 * IPv6 packet with extension headers needs the whole walkable chain. */
static __always_inline void xo_skb_pull(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u32 have = data_end - data;
	__u32 want = XO_MAX_HDR_LEN;

	if ((void *)(ip6 + 1) <= data_end &&
	    eth->h_proto == bpf_htons(ETH_P_IPV6) &&
	    ip6->nexthdr != IPPROTO_TCP)
		want = XO_MAX_HDR_LEN_EXT;
	if (want > skb->len)
		want = skb->len;
	if (have < want)
		bpf_skb_pull_data(skb, want);
}

static __always_inline void xo_pair_key_of(const struct xo_flow_key *k,
					   struct xo_pair_key *pk)
{
	__builtin_memset(pk, 0, sizeof(*pk));
	__builtin_memcpy(pk->src_addr, k->src_addr, 16);
	__builtin_memcpy(pk->dst_addr, k->dst_addr, 16);
	pk->family = k->family;
}

/* A block or redirect entry matched: remember this flow as the one that
 * steers its address pair. Written only when it changes, so a flow in
 * steady state costs one more lookup per packet. */
static __always_inline void xo_pair_learn(const struct xo_flow_key *k)
{
	struct xo_pair_key pk;
	struct xo_flow_key *cur;

	xo_pair_key_of(k, &pk);
	cur = bpf_map_lookup_elem(&xo_pairs, &pk);
	if (cur && cur->src_port == k->src_port &&
	    cur->dst_port == k->dst_port)
		return;
	bpf_map_update_elem(&xo_pairs, &pk, k, BPF_ANY);
}

/* A packet without readable ports (a non-first fragment) cannot be matched
 * to a flow: while its address pair is steered - the flow learnt for it
 * still has a live block or redirect entry - it is held off (dropped and
 * counted) rather than delivered around the rule. A pair whose flow lost
 * its entry is forgotten, and the packet passes. */
static __always_inline int xo_pair_held(const struct xo_flow_key *k)
{
	struct xo_steer_action *a;
	struct xo_pair_key pk;
	struct xo_flow_key flow;
	struct xo_flow_key *rec;

	xo_pair_key_of(k, &pk);
	rec = bpf_map_lookup_elem(&xo_pairs, &pk);
	if (!rec)
		return 0;
	flow = *rec;
	a = bpf_map_lookup_elem(&xo_flows, &flow);
	if (!a || (a->kind != XO_STEER_BLOCK && a->kind != XO_STEER_PARK &&
		   a->kind != XO_STEER_REDIRECT) ||
	    xo_expired(a)) {
		bpf_map_delete_elem(&xo_pairs, &pk);
		return 0;
	}
	xo_stat_inc(XO_STAT_HELD);
	return 1;
}

/* Parse the packet and find its flow's entry: *live is the live entry (for
 * the counters) and *a a copy, or *live is NULL when the packet is not
 * ours. Work on the copy: user space may replace the entry meanwhile, and
 * a half-old, half-new rewrite would be worse than either. Returns the
 * parser's verdict (XO_PARSE_*). */
static __always_inline int xo_skb_flow(struct __sk_buff *skb, struct xo_pkt *p,
				       struct xo_steer_action *a,
				       struct xo_steer_action **live)
{
	int ret;

	*live = NULL;
	xo_skb_pull(skb);
	ret = xo_parse((void *)(long)skb->data, (void *)(long)skb->data_end,
		       p);
	if (ret != XO_PARSE_TCP)
		return ret;
	*live = bpf_map_lookup_elem(&xo_flows, &p->key);
	if (*live)
		*a = **live;
	return ret;
}

/* Keep a copy of a frame of a PARK flow for its next owner (then the
 * caller drops it). Returns the stat to count. A ring record's size must
 * be a constant: the frame goes into the smallest of three record sizes
 * that holds it (xo_steer_abi.h). n is the frame's length minus one. */
#define XO_PARK_INTO(ring, slot_type, key, n, ifindex, skb, xdp)              \
	({                                                                    \
		slot_type *slot = bpf_ringbuf_reserve(ring, sizeof(*slot), 0);\
		__u32 stat = XO_STAT_PARK_OVERFLOW;                           \
		long err;                                                     \
									      \
		if (slot) {                                                   \
			err = skb ? bpf_skb_load_bytes(skb, 0, slot->frame,   \
						       (n) + 1) :             \
				    bpf_xdp_load_bytes(xdp, 0, slot->frame,   \
						       (n) + 1);              \
			if (err) {                                            \
				bpf_ringbuf_discard(slot, 0);                 \
			} else {                                              \
				slot->hdr.key = *(key);                       \
				slot->hdr.len = (n) + 1;                      \
				slot->hdr.ifindex = (ifindex);                \
				bpf_ringbuf_submit(slot, 0);                  \
				stat = XO_STAT_PARKED;                        \
			}                                                     \
		}                                                             \
		stat;                                                         \
	})

static __always_inline __u32 xo_park_frame_into(void *ring,
						const struct xo_flow_key *key,
						__u32 len, __u32 ifindex,
						struct __sk_buff *skb,
						struct xdp_md *xdp)
{
	__u32 n = len - 1;

	/* Written as n = len - 1 < max, and hidden from the compiler, so
	 * that older verifiers (6.1) see a length of at least 1: they learn
	 * nothing from "len != 0", and clang would fold n + 1 back into len. */
	asm volatile("" : "+r"(n));
	if (n < XO_PARK_MTU_FRAME)
		return XO_PARK_INTO(ring, struct xo_park_slot_mtu, key, n, ifindex,
				    skb, xdp);
	if (n < XO_PARK_JUMBO_FRAME)
		return XO_PARK_INTO(ring, struct xo_park_slot_jumbo, key, n, ifindex,
				    skb, xdp);
	if (n < XO_PARK_MAX_FRAME)
		return XO_PARK_INTO(ring, struct xo_park_slot, key, n, ifindex, skb,
				    xdp);
	return XO_STAT_PARK_OVERFLOW;
}

/* Park into the ring of the entry's owner when it has one (xo_park_rings),
 * else into the shared xo_parked. */
static __always_inline __u32 xo_park_frame(const struct xo_steer_action *a,
					   const struct xo_flow_key *key,
					   __u32 len, __u32 ifindex,
					   struct __sk_buff *skb,
					   struct xdp_md *xdp)
{
	__u32 owner = a->owner;
	void *own = bpf_map_lookup_elem(&xo_park_rings, &owner);

	if (own)
		return xo_park_frame_into(own, key, len, ifindex, skb, xdp);
	return xo_park_frame_into(&xo_parked, key, len, ifindex, skb, xdp);
}

/* A frame the core's replay program gave back to the stack (XO_REPLAY_META
 * in its XDP metadata, which only an XDP program can write). */
static __always_inline int xo_replayed(struct __sk_buff *skb)
{
	void *meta = (void *)(long)skb->data_meta;
	void *data = (void *)(long)skb->data;

	if (meta + sizeof(__u32) > data)
		return 0;
	return *(__u32 *)meta == XO_REPLAY_META;
}

SEC("tc")
int xo_tc_ingress(struct __sk_buff *skb)
{
	struct xo_steer_action *live, a;
	struct xo_pkt p;

	if (xo_skb_flow(skb, &p, &a, &live) == XO_PARSE_NOPORTS)
		return xo_pair_held(&p.key) ? TC_ACT_SHOT : TC_ACT_OK;
	if (!live)
		return TC_ACT_OK;
	if (xo_expired(&a)) {
		xo_stat_inc(XO_STAT_EXPIRED);
		return TC_ACT_OK;
	}
	switch (a.kind) {
	case XO_STEER_BLOCK:
		xo_pair_learn(&p.key);
		xo_count(live, skb->len);
		xo_stat_inc(XO_STAT_BLOCKED);
		return TC_ACT_SHOT;
	case XO_STEER_PARK:
		if (xo_replayed(skb))
			return TC_ACT_OK; /* a parked frame on its way in */
		xo_pair_learn(&p.key);
		xo_count(live, skb->len);
		xo_stat_inc(xo_park_frame(&a, &p.key, skb->len, skb->ifindex,
					  skb, NULL));
		return TC_ACT_SHOT;
	case XO_STEER_REDIRECT:
		xo_pair_learn(&p.key);
		if (xo_skb_rewrite_l3l4(skb, &p, 1, a.new_dst_addr,
					a.new_dst_port) ||
		    xo_skb_rewrite_macs(skb, &a)) {
			/* A half-rewritten packet must not leave; TCP
			 * retransmits it. */
			xo_stat_inc(XO_STAT_ERRORS);
			return TC_ACT_SHOT;
		}
		xo_count(live, skb->len);
		xo_stat_inc(XO_STAT_REDIRECTED);
		return bpf_redirect(a.ifindex ? a.ifindex : skb->ifindex, 0);
	default:
		return TC_ACT_OK;
	}
}

SEC("tc")
int xo_tc_egress(struct __sk_buff *skb)
{
	struct xo_steer_action *live, a;
	struct xo_pkt p;

	/* Egress: a local TCP socket does not fragment (DF, GSO), so a
	 * packet without ports is not one of ours. */
	xo_skb_flow(skb, &p, &a, &live);
	if (!live)
		return TC_ACT_OK;
	if (a.kind != XO_STEER_SRC_REWRITE && a.kind != XO_STEER_BLOCK)
		return TC_ACT_OK;
	if (xo_expired(&a)) {
		xo_stat_inc(XO_STAT_EXPIRED);
		return TC_ACT_OK;
	}
	if (a.kind == XO_STEER_BLOCK) {
		/* A frozen socket's timers (pacing, retransmission) still
		 * transmit: dropping what leaves it between freeze and discard
		 * keeps the captured state exactly what the peer has seen. */
		xo_count(live, skb->len);
		xo_stat_inc(XO_STAT_BLOCKED);
		return TC_ACT_SHOT;
	}
	if (xo_skb_rewrite_l3l4(skb, &p, 0, a.new_src_addr, a.new_src_port)) {
		xo_stat_inc(XO_STAT_ERRORS);
		return TC_ACT_SHOT;
	}
	xo_count(live, skb->len);
	xo_stat_inc(XO_STAT_REWRITTEN);
	return TC_ACT_OK;
}

/* XDP: rewrite in place. Nothing here changes the packet's size, so the
 * parser's pointers stay valid; their bounds are checked again because the
 * verifier cannot tie the IPv4/IPv6 branch taken here to the one taken in
 * the parser. Assumes full checksums, which is what a NIC's receive path
 * delivers. Returns -1 if the packet is not what the parser said. */
static __always_inline int xo_xdp_rewrite_dst(struct xo_pkt *p,
					      const struct xo_steer_action *a,
					      void *data_end)
{
	struct tcphdr *tcp = p->tcp;

	if ((void *)(tcp + 1) > data_end || (void *)(p->eth + 1) > data_end)
		return -1;
	if (p->key.family == XO_AF_INET) {
		struct iphdr *ip = p->l3;
		__u32 to;

		if ((void *)(ip + 1) > data_end)
			return -1;
		if (xo_nonzero(a->new_dst_addr, 4)) {
			__builtin_memcpy(&to, a->new_dst_addr, 4);
			xo_csum_replace4(&ip->check, ip->daddr, to);
			xo_csum_replace4(&tcp->check, ip->daddr, to);
			ip->daddr = to;
		}
	} else {
		struct ipv6hdr *ip6 = p->l3;
		__u32 from[4], to[4];

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (xo_nonzero(a->new_dst_addr, 16)) {
			__builtin_memcpy(from, &ip6->daddr, 16);
			__builtin_memcpy(to, a->new_dst_addr, 16);
			xo_csum_replace16(&tcp->check, from, to);
			__builtin_memcpy(&ip6->daddr, to, 16);
		}
	}
	if (a->new_dst_port && a->new_dst_port != tcp->dest) {
		xo_csum_replace2(&tcp->check, tcp->dest, a->new_dst_port);
		tcp->dest = a->new_dst_port;
	}
	if (xo_nonzero(a->dst_mac, 6))
		__builtin_memcpy(p->eth->h_dest, a->dst_mac, 6);
	if (xo_nonzero(a->src_mac, 6))
		__builtin_memcpy(p->eth->h_source, a->src_mac, 6);
	return 0;
}

SEC("xdp")
int xo_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xo_steer_action *live, a;
	struct xo_pkt p;

	switch (xo_parse(data, data_end, &p)) {
	case XO_PARSE_TCP:
		break;
	case XO_PARSE_NOPORTS:
		return xo_pair_held(&p.key) ? XDP_DROP : XDP_PASS;
	default:
		return XDP_PASS;
	}
	live = bpf_map_lookup_elem(&xo_flows, &p.key);
	if (!live)
		return XDP_PASS;
	a = *live;
	if (xo_expired(&a)) {
		xo_stat_inc(XO_STAT_EXPIRED);
		return XDP_PASS;
	}
	switch (a.kind) {
	case XO_STEER_BLOCK:
		xo_pair_learn(&p.key);
		xo_count(live, data_end - data);
		xo_stat_inc(XO_STAT_BLOCKED);
		return XDP_DROP;
	case XO_STEER_PARK:
		xo_pair_learn(&p.key);
		xo_count(live, data_end - data);
		xo_stat_inc(xo_park_frame(&a, &p.key, data_end - data,
					  ctx->ingress_ifindex, NULL, ctx));
		return XDP_DROP;
	case XO_STEER_REDIRECT:
		xo_pair_learn(&p.key);
		if (xo_xdp_rewrite_dst(&p, &a, data_end)) {
			xo_stat_inc(XO_STAT_ERRORS);
			return XDP_DROP;
		}
		xo_count(live, data_end - data);
		xo_stat_inc(XO_STAT_REDIRECTED);
		if (a.ifindex && a.ifindex != ctx->ingress_ifindex)
			return bpf_redirect(a.ifindex, 0);
		return XDP_TX;
	default:
		return XDP_PASS;
	}
}
