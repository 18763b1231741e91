/* SPDX-License-Identifier: MIT */
/*
 * xo_steer_abi.h - the flow-steering structures shared by the eBPF programs
 * (bpf/xo_steer.bpf.c) and user space (the core, cffi, Python).
 *
 * Declared once, here: the programs are compiled against this file and the
 * core reads and writes the very same bytes in the pinned map. Changing a
 * layout means rebuilding both and re-creating the pinned map (a map pinned
 * by an older build is rejected at load time because its value size no
 * longer matches).
 *
 * Layout rules: fixed-width fields only, explicit padding, no holes. The
 * key is hashed byte by byte by the kernel, so every padding byte of a key
 * must be zero or lookups miss.
 *
 * Byte order: addresses and ports are in network byte order, exactly as
 * they sit in the packet (and in a struct sockaddr_in/in6).
 *
 * Map: "xo_flows", a BPF hash map, key struct xo_flow_key, value struct
 * xo_steer_action, pinned by name (LIBBPF_PIN_BY_NAME) so every program and
 * every process that opens the same pin directory shares it.
 */
#ifndef XO_STEER_ABI_H
#define XO_STEER_ABI_H

#ifndef __bpf__
#include <stdint.h>
#endif
/* BPF programs get uint8_t..uint64_t from bpf/xo_types.h: glibc's stdint.h
 * does not build for the bpf target. */

/* XO_CDEF_BEGIN */

/* Address families as the Linux kernel numbers them (AF_INET, AF_INET6). */
#define XO_AF_INET 2
#define XO_AF_INET6 10
#define XO_IPPROTO_TCP 6

/* What a matching packet gets. */
#define XO_STEER_BLOCK 1       /* drop (tc SHOT / XDP_DROP): ingress, and
				* egress for what a frozen socket sends */
#define XO_STEER_REDIRECT 2    /* ingress: new dst ip/port/MACs, out again */
#define XO_STEER_SRC_REWRITE 3 /* egress on the target: new src ip/port */
#define XO_STEER_PARK 4        /* ingress: drop, keeping a copy of the frame
				* in the xo_parked ring for the flow's next
				* owner (a handoff must not cost the client a
				* retransmission) */
#define XO_STEER_KIND_MAX 4

/* XDP metadata (4 bytes before the frame) the core's replay program puts
 * on a parked frame it gives back to the stack: the flow's PARK entry lets
 * such a frame through instead of parking it again, so a flow can release
 * its parked frames, in order, while its newer frames still park. Only an
 * XDP program can set skb metadata; nothing a peer sends carries it. */
#define XO_REPLAY_META 0x584f5250u /* "XORP" */

/* Default number of flows the map holds (as compiled into the object). */
#define XO_STEER_MAX_FLOWS 65536

/*
 * Identity of one TCP flow in one direction, as seen in the packet the
 * program looks at: for ingress rules (block, redirect) src is the client
 * and dst this host; for the target's egress rule (source rewrite) src is
 * the target's restored socket and dst the client.
 */
struct xo_flow_key {
	uint8_t src_addr[16]; /* IPv4: first 4 bytes, the other 12 zero */
	uint8_t dst_addr[16];
	uint16_t src_port;    /* network byte order */
	uint16_t dst_port;    /* network byte order */
	uint8_t family;       /* XO_AF_INET or XO_AF_INET6 */
	uint8_t proto;        /* XO_IPPROTO_TCP */
	uint8_t pad[2];       /* must be zero */
}; /* 40 bytes */

/*
 * The entry's action. Fields that do not apply to the kind are ignored;
 * a zero port or an all-zero MAC means "leave as is".
 *
 * expires_ns is in CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns()); once
 * passed, the programs ignore the entry and the packet passes untouched, so
 * a handoff that died half-way cannot black-hole a client port forever.
 * 0 means "never" and is refused for block and redirect entries.
 */
struct xo_steer_action {
	uint8_t kind;              /* XO_STEER_* */
	uint8_t pad0[3];
	uint32_t ifindex;          /* redirect: out of this interface; 0 = the
				    * one the packet arrived on */
	uint8_t new_dst_addr[16];  /* redirect: the target's address */
	uint8_t new_src_addr[16];  /* src rewrite: the host's address */
	uint16_t new_dst_port;     /* redirect: the target's (remapped) port */
	uint16_t new_src_port;     /* src rewrite: the host's port */
	uint8_t dst_mac[6];        /* redirect: the target's MAC */
	uint8_t src_mac[6];        /* redirect: this interface's MAC */
	uint8_t pad1[4];
	uint32_t owner;            /* who installed it (agent / connection id) */
	uint64_t expires_ns;       /* CLOCK_MONOTONIC ns; 0 = never */
	uint64_t packets;          /* updated by the programs */
	uint64_t bytes;
}; /* 88 bytes */

/* Index of the per-CPU datapath counters in the "xo_stats" array map. */
#define XO_STAT_BLOCKED 0
#define XO_STAT_REDIRECTED 1
#define XO_STAT_REWRITTEN 2
#define XO_STAT_EXPIRED 3     /* matched an expired entry: passed */
#define XO_STAT_ERRORS 4      /* a rewrite helper failed: dropped */
#define XO_STAT_PARKED 5      /* PARK: copied to the ring, dropped */
#define XO_STAT_PARK_OVERFLOW 6 /* PARK: no room (ring full, frame too big):
				 * dropped, the client will retransmit */
#define XO_STAT_HELD 7        /* no readable ports (a non-first fragment),
			       * address pair steered: dropped */
#define XO_STAT_MAX 8

/*
 * A parked frame, as it sits in the "xo_parked" BPF ring buffer: this
 * header, then len bytes of the frame from its Ethernet header on. A
 * record has room for XO_PARK_MTU_FRAME, XO_PARK_JUMBO_FRAME or
 * XO_PARK_MAX_FRAME bytes (a 64 KiB GSO skb of a local sender, with its
 * Ethernet header), the smallest that holds the frame; the record may be
 * longer than header + len. Longer frames (BIG TCP) are not parked.
 */
#define XO_PARK_MTU_FRAME 1536
#define XO_PARK_JUMBO_FRAME 9232
#define XO_PARK_MAX_FRAME 65560
#define XO_PARK_RING_BYTES 8388608 /* ~3,900 MTU frames, 127 of 64 KiB */

/* Map "xo_park_rings" (hash of maps, per loaded object, not pinned): key
 * the u32 owner of a PARK entry, value a ring like xo_parked that the
 * owner reads alone (xo_park_own()). Frames of entries whose owner has
 * none go to xo_parked. */
#define XO_PARK_MAX_OWNER_RINGS 256

struct xo_parked_hdr {
	struct xo_flow_key key;
	uint32_t len;
	uint32_t ifindex;
}; /* 48 bytes */

/*
 * Map "xo_pairs" (LRU hash, pinned by name, written by the programs only):
 * for each client/host address pair, the flow (struct xo_flow_key) whose
 * block or redirect entry a packet of the pair last matched. A packet
 * whose ports cannot be read (a non-first fragment) cannot be matched by
 * 5-tuple; while the flow recorded for its pair still has a live block or
 * redirect entry, the ingress programs drop it and count XO_STAT_HELD
 * (docs/steering.md). Value: struct xo_flow_key.
 */
struct xo_pair_key {
	uint8_t src_addr[16]; /* as in struct xo_flow_key */
	uint8_t dst_addr[16];
	uint8_t family;
	uint8_t pad[3];       /* must be zero */
}; /* 36 bytes */

#define XO_STEER_MAX_PAIRS 16384

/* XO_CDEF_END */

#endif /* XO_STEER_ABI_H */
