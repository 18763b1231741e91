/* SPDX-License-Identifier: MIT */
/*
 * Map definitions. Every map is pinned by name: the core opens the object
 * with a pin root (default /sys/fs/bpf/xo), and a second load of the object
 * (another process, a restart) reuses the pinned maps instead of creating
 * empty ones, so rules survive a reload of the programs.
 */
#ifndef XO_BPF_MAPS_H
#define XO_BPF_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "xo_types.h"
#include "xo_steer_abi.h"

/* The one flow table, shared by the tc ingress, tc egress and XDP programs.
 * Preallocated (the default) so an update from user space never allocates:
 * that keeps insert/remove well under a microsecond. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XO_STEER_MAX_FLOWS);
	__type(key, struct xo_flow_key);
	__type(value, struct xo_steer_action);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xo_flows SEC(".maps");

/* Per-CPU event counters (XO_STAT_*), touched only when a packet matched an
 * entry, so the common no-match path costs one hash lookup and nothing else. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XO_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xo_stats SEC(".maps");

/* Frames of PARK flows, for user space to hand to the flow's next owner.
 * One ring per loaded object (not pinned): the process that attached the
 * programs is the one that reads it. A record is a header and room for
 * the largest frame (xo_steer_abi.h). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XO_PARK_RING_BYTES);
} xo_parked SEC(".maps");

/* Per-owner rings: a PARK entry whose owner has a ring here parks into it
 * instead of xo_parked. Several processes that share one loaded object
 * (nginx's workers, each a machine with its own owner id) each put a ring
 * of their own here, so a frame parked for one's flow reaches that one and
 * no other; an owner without a ring (a single-process driver) uses
 * xo_parked. Not pinned, like xo_parked. Key: the entry's owner. */
struct xo_park_ring_inner {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XO_PARK_RING_BYTES);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, XO_PARK_MAX_OWNER_RINGS);
	__type(key, __u32);
	__array(values, struct xo_park_ring_inner);
} xo_park_rings SEC(".maps");

/* Record sizes: a ring record's size must be a constant, so a frame takes
 * the smallest of three that holds it (an MTU-sized frame does not tie up
 * 64 KiB of ring). */
struct xo_park_slot_mtu {
	struct xo_parked_hdr hdr;
	__u8 frame[XO_PARK_MTU_FRAME];
};

struct xo_park_slot_jumbo {
	struct xo_parked_hdr hdr;
	__u8 frame[XO_PARK_JUMBO_FRAME];
};

struct xo_park_slot {
	struct xo_parked_hdr hdr;
	__u8 frame[XO_PARK_MAX_FRAME];
};

/* Address pairs with block/redirect entries, learnt by the programs (see
 * xo_steer_abi.h): LRU, so it never fills up and needs no sweeping. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XO_STEER_MAX_PAIRS);
	__type(key, struct xo_pair_key);
	__type(value, struct xo_flow_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xo_pairs SEC(".maps");

static __always_inline void xo_stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&xo_stats, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

#endif
