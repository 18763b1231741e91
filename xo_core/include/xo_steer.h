/* SPDX-License-Identifier: MIT */
/*
 * xo_steer.h - flow steering: the eBPF rule table and the hybrid rule
 * manager (software tier + asynchronous hardware tier).
 *
 * Software tier (xo_steer_*): one pinned BPF hash map, 5-tuple -> action
 * (xo_steer_abi.h), read by three programs from bpf/xo_steer.bpf.o:
 *
 *   xo_steer_open(&opts, &s)          load the object, pin/reuse the maps
 *   xo_steer_attach(s, ifindex, XO_PROG_TC_INGRESS, NULL)   host side
 *   xo_steer_attach(s, ifindex, XO_PROG_TC_EGRESS, NULL)    target side
 *   xo_steer_insert(s, &key, &action, XO_STEER_UPSERT)      one map write
 *   xo_steer_remove(s, &key)                                one map delete
 *   xo_steer_sweep(s, 0)              drop entries whose expiry passed
 *   xo_steer_close(s, XO_STEER_CLOSE_UNPIN)  detach all, forget the maps
 *
 * Insert and remove are synchronous: when they return, the next packet
 * sees the new state. Replacing a block by a redirect is one insert.
 *
 * Hybrid tier (xo_rules_*): a manager per interface that writes the
 * software tier synchronously and feeds a hardware backend (tc-flower, or
 * a test double) through a bounded queue served by one thread:
 *
 *   insert  software now; hardware queued (a full queue means software
 *           only, counted in hw_fallback_full). Kinds not sent to hardware
 *           (hw_kinds) and fallbacks first take an older hardware entry of
 *           the flow out, so hardware never contradicts software.
 *   remove  cancels a still-queued hardware insert of the same flow, waits
 *           for one in progress, removes the hardware entry, then the
 *           software entry: it never returns before both tiers are clean
 *
 * Operations on one flow must be serialized by the caller (XO's handoff
 * state machine does that per connection); different flows may be
 * inserted and removed from any number of threads.
 *
 * Ownership: xo_steer_open() and xo_rules_create() return handles the
 * caller frees with xo_steer_close() / xo_rules_destroy(). A backend given
 * to xo_rules_create() belongs to the manager once that call succeeds.
 * Destroy managers before closing the xo_steer they use.
 *
 * Errors as in xo.h: 0 (or a count) on success, negative XO_E_* on
 * failure, with the sentence in xo_last_error().
 */
#ifndef XO_STEER_H
#define XO_STEER_H

#include <stddef.h>
#include <stdint.h>

#include "xo.h"
#include "xo_steer_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where maps are pinned unless the caller says otherwise. `ip netns exec`
 * remounts /sys, so code that runs under it should pass its own pin_dir. */
#define XO_STEER_DEFAULT_PIN_DIR "/sys/fs/bpf/xo"

/* XO_CDEF_BEGIN */

/* ---- software tier: the BPF object and its map ---------------------- */

/* The programs in the object. */
#define XO_PROG_TC_INGRESS 0
#define XO_PROG_TC_EGRESS 1
#define XO_PROG_XDP 2
#define XO_PROG_COUNT 3

/* xo_steer_opts.flags */
#define XO_STEER_F_NO_PIN 1 /* private maps: nothing pinned, nothing reused */

struct xo_steer_opts {
	uint32_t size;         /* sizeof(struct xo_steer_opts) */
	uint32_t flags;        /* XO_STEER_F_* */
	const char *obj_path;  /* the compiled xo_steer.bpf.o (required) */
	const char *pin_dir;   /* NULL = XO_STEER_DEFAULT_PIN_DIR; a bpffs is
				* mounted there if none is */
	uint32_t max_flows;    /* 0 = as compiled (XO_STEER_MAX_FLOWS); must
				* match a map already pinned */
	uint32_t park_ring_bytes; /* 0 = XO_PARK_RING_BYTES; a power of two
				   * of at least a page. Each parked frame
				   * takes a 64 KiB record: a ring smaller
				   * than that parks nothing (every frame is
				   * an overflow; tests use it) */
};

struct xo_steer;

/* Load and verify the programs; create or reuse the pinned maps. */
int xo_steer_open(const struct xo_steer_opts *opts, struct xo_steer **out);

#define XO_STEER_CLOSE_UNPIN 1         /* remove the pins (and a bpffs
					* mount / directory we made) */
#define XO_STEER_CLOSE_KEEP_ATTACHED 2 /* leave programs on interfaces */
/* Detach everything this handle attached (unless KEEP_ATTACHED), free it. */
void xo_steer_close(struct xo_steer *s, uint32_t flags);

/* The pin directory in use ("" with XO_STEER_F_NO_PIN). */
const char *xo_steer_pin_dir(const struct xo_steer *s);
const char *xo_steer_default_pin_dir(void);
int xo_steer_map_fd(const struct xo_steer *s);
int xo_steer_prog_fd(const struct xo_steer *s, int prog);

/* xo_attach_opts.xdp_flags: the kernel's XDP_FLAGS_* mode bits. */
#define XO_XDP_MODE_AUTO 0   /* native if the driver has it, else generic */
#define XO_XDP_MODE_SKB 2    /* generic */
#define XO_XDP_MODE_DRV 4    /* native */

struct xo_attach_opts {
	uint32_t size;         /* sizeof(struct xo_attach_opts) */
	uint32_t tc_priority;  /* 0 = XO_TC_PRIORITY */
	uint32_t xdp_flags;    /* XO_XDP_MODE_* */
	uint32_t reserved;
	const char *netns;     /* NULL = caller's; else e.g. /run/netns/NAME */
};

#define XO_TC_PRIORITY 0x7f00 /* late in the chain: after flower filters */
#define XO_TC_HANDLE 0x58     /* 'X' */

/* Attach one program to ifindex (tc: clsact is created when missing; XDP:
 * fails with XO_E_BUSY if another XDP program is there). opts may be NULL.
 * Re-attaching the same tc program replaces it. */
int xo_steer_attach(struct xo_steer *s, int ifindex, int prog,
		    const struct xo_attach_opts *opts);
/* Detach what xo_steer_attach() put there (XO_E_NOTFOUND if nothing);
 * netns as given to the attach. */
int xo_steer_detach(struct xo_steer *s, int ifindex, int prog,
		    const char *netns);

/* xo_steer_insert() modes */
#define XO_STEER_UPSERT 0  /* create or replace */
#define XO_STEER_CREATE 1  /* XO_E_BUSY if the flow already has an entry */
#define XO_STEER_REPLACE 2 /* XO_E_NOTFOUND if it has none */

/* Checks the key (family, proto, zero padding) and the action (kind,
 * expiry set for block/redirect, something to rewrite). The counters in
 * the action are stored as given (normally 0). */
int xo_steer_insert(struct xo_steer *s, const struct xo_flow_key *key,
		    const struct xo_steer_action *act, uint32_t mode);
int xo_steer_remove(struct xo_steer *s, const struct xo_flow_key *key);
int xo_steer_lookup(struct xo_steer *s, const struct xo_flow_key *key,
		    struct xo_steer_action *act);
/* Copy up to cap entries into keys/acts (either may be NULL when cap is
 * 0). Returns how many entries the map held, which may exceed cap. */
int64_t xo_steer_list(struct xo_steer *s, struct xo_flow_key *keys,
		      struct xo_steer_action *acts, uint32_t cap);
int64_t xo_steer_count(struct xo_steer *s);
/* Delete entries with 0 < expires_ns <= now_ns (0 = now). Returns how
 * many were deleted. */
int64_t xo_steer_sweep(struct xo_steer *s, uint64_t now_ns);
/* Delete every entry of one owner (an agent that restarts). */
int64_t xo_steer_purge_owner(struct xo_steer *s, uint32_t owner);
/* Sum of the per-CPU datapath counters: counts[XO_STAT_MAX]. */
int xo_steer_dp_stats(struct xo_steer *s, uint64_t *counts);
/* CLOCK_MONOTONIC in ns: the clock of expires_ns. */
uint64_t xo_steer_now_ns(void);

/* Run one program on one packet (BPF_PROG_TEST_RUN): nothing is sent,
 * the map is the real one. out receives the packet as the program left
 * it; *retval is the verdict (TC_ACT_* or XDP_*). */
int xo_steer_test_run(struct xo_steer *s, int prog, const uint8_t *pkt,
		      uint32_t len, uint8_t *out, uint32_t out_cap,
		      uint32_t *out_len, uint32_t *retval);

/* Time count insert+remove pairs of a fresh flow through the public API
 * (clock_gettime around each call). insert_ns and remove_ns receive count
 * samples each; floor_ns (may be NULL) count samples of the cheapest bpf()
 * map call, a lookup that misses: the system call cost no rule change can
 * go below on this machine. */
int xo_steer_bench(struct xo_steer *s, uint32_t count, uint64_t *insert_ns,
		   uint64_t *remove_ns, uint64_t *floor_ns);

/* ---- parked frames ----------------------------------------------------- */
/*
 * A PARK entry drops a flow's client frames but keeps a copy in a ring
 * (xo_steer_abi.h). These move them to the flow's next owner: take them
 * out per flow as a blob (u32 big-endian length, frame; repeated), carry
 * the blob to the owner, replay it into that machine's TCP stack. The
 * protocol machine (xo_proto.h) does all of this itself.
 */

/* Read the ring into the handle's stash (frames older than 10 s, nobody
 * having taken them, are dropped). Returns the frames read. */
int64_t xo_park_collect(struct xo_steer *s);
/* Bytes of frames in the stash, nobody having taken them yet. */
uint64_t xo_park_stashed(const struct xo_steer *s);
/* Take one flow's frames out of the stash as a blob (*out malloc'd, the
 * caller frees it; NULL when there are none). Returns the frame count. */
int64_t xo_park_take(struct xo_steer *s, const struct xo_flow_key *key,
		     uint8_t **out, uint32_t *out_len);
/* Hand a blob's frames to this machine's stack as if they had arrived on
 * ifindex, addressed to `to` (address and port) and dst_mac (NULL: as
 * they are): cut to segments, checksums recomputed. Returns the frames
 * replayed; *segments (unless NULL) the segments they were cut into. The
 * kernel may deliver them after this returns (see tcpi_segs_in). */
int64_t xo_park_replay(struct xo_steer *s, int ifindex, const uint8_t *blob,
		       uint32_t len, const struct xo_endpoint *to,
		       const uint8_t *dst_mac, uint32_t *segments);
/* Cut one parked frame to its last `keep` payload bytes, in place (*len
 * becomes the new frame length): a duplicate the new owner's stack answers
 * with one ACK. Returns 0, or an XO_E_* code for a frame that is not
 * Ethernet/IP/TCP (left as it is). */
int xo_park_tail(uint8_t *frame, uint32_t *len, uint32_t keep);
/* One client frame, as a blob record for xo_park_replay(): from `from`
 * to `to` (retargeted on replay), with seq, ack, window and len payload
 * bytes (at most 65,000). Writes at most XO_PARK_FRAME_HDR_MAX + len bytes
 * at blob; returns how many. */
#define XO_PARK_FRAME_HDR_MAX 78 /* 4 + Ethernet 14 + IPv6 40 + TCP 20 */
uint32_t xo_park_client_frame(const struct xo_endpoint *from,
			      const struct xo_endpoint *to, uint32_t seq,
			      uint32_t ack, uint16_t win, const uint8_t *payload,
			      uint32_t len, uint8_t *blob);
/* Size of a blob holding the frame xo_park_owed_ack() builds. */
#define XO_PARK_OWED_ACK_MAX 79 /* 4 + Ethernet 14 + IPv6 40 + TCP 20 + 1 */
/* A restored socket does not know it owes the client an ACK (the old
 * socket's delayed ACK: st->rcv_wup before st->rcv_nxt). Build, as a blob
 * for xo_park_replay(), one client frame that makes the new owner's stack
 * send it: the last byte received once more, a duplicate the stack answers
 * at once with an ACK covering everything. Returns the blob's length, 0
 * when nothing is owed. */
uint32_t xo_park_owed_ack(const struct xo_tcp_state *st,
			  uint8_t blob[XO_PARK_OWED_ACK_MAX]);
/* Frames the stash could not keep (full, or nobody took them in time). */
uint64_t xo_park_lost(const struct xo_steer *s);
/* An epoll descriptor, readable when the ring holds frames (-1: no ring). */
int xo_park_fd(const struct xo_steer *s);
/* Processes sharing one loaded object (workers that inherited a handle)
 * share its ring: give this handle a ring of its own for the PARK entries
 * of `owner` (the machine's owner id), so no other process takes their
 * frames. The handle reads both; xo_park_fd() covers both. Once per
 * handle; the ring goes when the handle closes. XO_E_VERSION: an object
 * without per-owner rings. */
int xo_park_own(struct xo_steer *s, uint32_t owner);
/* Owners with a ring of their own in this handle's object (up to max
 * written to owners); returns how many there are. */
int64_t xo_park_owners(struct xo_steer *s, uint32_t *owners, uint32_t max);
/* Remove the ring of an owner that is gone (its frames would otherwise
 * fill a ring nobody reads), or this handle's own (a process about to
 * exit); its entries park into the shared ring again. */
int xo_park_disown(struct xo_steer *s, uint32_t owner);

/* ---- hardware backends ---------------------------------------------- */

/*
 * A backend is an ops table. Calls come from the manager's consumer
 * thread (insert) and from callers of xo_rules_remove() (remove), never
 * two at once. cookie is the backend's own name for the entry it holds for
 * a flow: insert gets 0 for a new flow or the current cookie to replace,
 * and stores the new one. Return 0 or a negative XO_E_* code (backends
 * inside the core also set the sentence with its internal xo_fail()).
 */
struct xo_hw_ops {
	const char *name;
	int (*insert)(void *priv, const struct xo_flow_key *key,
		      const struct xo_steer_action *act, uint64_t *cookie);
	int (*remove)(void *priv, const struct xo_flow_key *key,
		      uint64_t cookie);
	void (*destroy)(void *priv);
};

struct xo_hw_backend;

/* Wrap an ops table (copied) and its private data. */
int xo_hw_backend_new(const struct xo_hw_ops *ops, void *priv,
		      struct xo_hw_backend **out);
/* Only for a backend no manager owns. */
void xo_hw_backend_destroy(struct xo_hw_backend *hw);
const char *xo_hw_backend_name(const struct xo_hw_backend *hw);

/* Time count insert+remove pairs of one redirect directly through the
 * backend (no manager, no queue): insert_ns and remove_ns receive count
 * samples each. Only for a backend no manager owns. */
int xo_hw_bench(struct xo_hw_backend *hw, uint32_t count,
		uint64_t *insert_ns, uint64_t *remove_ns);

/* tc-flower over rtnetlink. */
#define XO_FLOWER_AUTO 0    /* skip_sw when the NIC takes the filter,
			     * else an ordinary (software) flower filter */
#define XO_FLOWER_SKIP_SW 1 /* hardware only; XO_E_UNSUPPORTED if not */
#define XO_FLOWER_SKIP_HW 2 /* software flower only (testing on veth) */

struct xo_flower_opts {
	uint32_t size;      /* sizeof(struct xo_flower_opts) */
	uint32_t mode;      /* XO_FLOWER_* */
	uint32_t priority;  /* 0 = XO_FLOWER_PRIORITY; uses prio, prio+1 */
	uint32_t reserved;
	const char *netns;  /* NULL = caller's; else e.g. /run/netns/NAME */
};

#define XO_FLOWER_PRIORITY 0x100

/* Probe the kernel and the NIC: XO_E_UNSUPPORTED, naming what is missing,
 * when tc-flower or one of the actions it needs is absent. */
int xo_hw_flower_create(int ifindex, const struct xo_flower_opts *opts,
			struct xo_hw_backend **out);

/* A test double: "installs" into a table after sleeping, records every
 * call. Its query functions stay usable while a manager owns it. */
#define XO_HW_CALL_INSERT 1
#define XO_HW_CALL_REMOVE 2

struct xo_hw_call {
	uint32_t op;          /* XO_HW_CALL_* */
	uint32_t kind;        /* insert: the action's kind */
	struct xo_flow_key key;
	uint64_t cookie;
	uint64_t start_ns;    /* CLOCK_MONOTONIC */
	uint64_t end_ns;
};

int xo_hw_test_create(uint32_t insert_delay_us, uint32_t remove_delay_us,
		      struct xo_hw_backend **out);
/* Copy up to cap recorded calls; returns how many were recorded. */
int64_t xo_hw_test_calls(struct xo_hw_backend *hw, struct xo_hw_call *calls,
			 uint32_t cap);
/* Entries the fake hardware holds now; 1/0 for one flow. */
int64_t xo_hw_test_installed(struct xo_hw_backend *hw);
int xo_hw_test_has(struct xo_hw_backend *hw, const struct xo_flow_key *key);
/* Make later inserts fail with code (0 = succeed again). */
int xo_hw_test_fail_inserts(struct xo_hw_backend *hw, int code);
/* hold != 0: inserts stay in flight (blocked inside the backend) until
 * xo_hw_test_hold(hw, 0) releases them. Release before destroying the
 * manager, whose consumer thread would wait for them. */
int xo_hw_test_hold(struct xo_hw_backend *hw, int hold);
/* How many inserts are blocked by the hold right now. */
int64_t xo_hw_test_held(struct xo_hw_backend *hw);

/* ---- hybrid rule manager -------------------------------------------- */

struct xo_rules_opts {
	uint32_t size;            /* sizeof(struct xo_rules_opts) */
	uint32_t queue_capacity;  /* 0 = XO_RULES_QUEUE_DEFAULT */
	uint32_t hw_kinds;        /* XO_RULES_HW_* bits; 0 = redirect only */
	uint32_t reserved;
};

#define XO_RULES_QUEUE_DEFAULT 1024

/* Which kinds go to hardware too (bit 1 << kind). As in the paper, only
 * redirect does by default: blocks see a few stray retransmissions and
 * source rewrite costs nothing in eBPF, so neither is worth NIC time. */
#define XO_RULES_HW_BLOCK 2
#define XO_RULES_HW_REDIRECT 4
#define XO_RULES_HW_SRC_REWRITE 8

/* xo_rules_hw_state() bits */
#define XO_HW_QUEUED 1
#define XO_HW_INFLIGHT 2
#define XO_HW_INSTALLED 4

struct xo_rules_stats {
	uint64_t sw_inserts;
	uint64_t sw_removes;
	uint64_t hw_enqueued;
	uint64_t hw_coalesced;     /* insert replaced a still-queued insert */
	uint64_t hw_inserted;      /* backend insert succeeded */
	uint64_t hw_removed;       /* backend remove succeeded */
	uint64_t hw_cancelled;     /* queued insert dropped by a remove */
	uint64_t hw_fallback_full; /* queue full: software only */
	uint64_t hw_errors;        /* backend calls that failed */
	uint64_t sw_only;          /* kind not in hw_kinds: software only */
	uint32_t queue_len;
	uint32_t queue_capacity;
	uint32_t hw_entries;       /* flows the backend holds now */
	uint32_t inflight;         /* 0 or 1 */
};

struct xo_rules;

/* hw NULL = backend "none": the software tier carries everything. */
int xo_rules_create(struct xo_steer *s, int ifindex, struct xo_hw_backend *hw,
		    const struct xo_rules_opts *opts, struct xo_rules **out);
/* Stops the consumer (queued inserts are dropped), removes every entry
 * the backend holds, frees the backend. Software entries stay. */
void xo_rules_destroy(struct xo_rules *r);

int xo_rules_insert(struct xo_rules *r, const struct xo_flow_key *key,
		    const struct xo_steer_action *act);
int xo_rules_remove(struct xo_rules *r, const struct xo_flow_key *key);
/* Wait until nothing is queued or in progress (XO_E_BUSY on timeout). */
int xo_rules_drain(struct xo_rules *r, uint32_t timeout_ms);
/* XO_HW_* bits for one flow (0: hardware knows nothing of it). */
int xo_rules_hw_state(struct xo_rules *r, const struct xo_flow_key *key);
/* xo_steer_sweep() for both tiers. */
int64_t xo_rules_sweep(struct xo_rules *r, uint64_t now_ns);
void xo_rules_get_stats(struct xo_rules *r, struct xo_rules_stats *st);
const char *xo_rules_backend_name(const struct xo_rules *r);
int xo_rules_ifindex(const struct xo_rules *r);
/* Copy the last backend error (the consumer thread's xo_last_error()) into
 * buf; "" if none. Returns its length. */
int xo_rules_last_hw_error(struct xo_rules *r, char *buf, uint32_t cap);

/* XO_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* XO_STEER_H */
