// SPDX-License-Identifier: MIT
/*
 * Parked frames: what a PARK entry kept of a flow's client packets while
 * its connection was frozen, and their delivery to the flow's next owner.
 *
 * The datapath copies each frame of a PARK flow into the xo_parked ring
 * and drops it. Here the ring is read into a stash (frames of many flows
 * may be interleaved), a flow's frames are taken out as one blob for the
 * control channel, and a blob is replayed into this machine's TCP stack as
 * if the frames had just arrived on the interface: retargeted to the new
 * owner's address, port and MAC, cut to segments an XDP frame can hold,
 * checksums recomputed. Replay uses BPF_PROG_TEST_RUN of an XDP_PASS
 * program in live-frame mode, which hands each frame to the stack.
 *
 * Blob format: a sequence of (u32 length, big endian | frame bytes).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>

#include "steer_internal.h"
#include "wire.h"

#define STASH_MAX_BYTES (16u << 20) /* beyond this, parked frames are lost */
#define STASH_MAX_AGE_NS 10000000000ull /* nobody took them: gone */
#define SEGMENT_MAX 1400 /* payload per replayed frame: fits any XDP frame */

struct park_rec {
	struct park_rec *next;
	struct xo_flow_key key;
	uint64_t at;
	uint32_t len;
	uint8_t frame[];
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int on_parked(void *ctx, void *data, size_t size)
{
	struct xo_steer *s = ctx;
	const struct xo_parked_hdr *h = data;
	struct park_rec *r, **tail;

	if (size < sizeof(*h) || h->len > size - sizeof(*h))
		return 0; /* not ours: the datapath writes whole records */
	if (s->park_bytes + h->len > STASH_MAX_BYTES) {
		s->park_lost++;
		return 0;
	}
	r = malloc(sizeof(*r) + h->len);
	if (!r) {
		s->park_lost++;
		return 0;
	}
	r->next = NULL;
	r->key = h->key;
	r->at = mono_ns();
	r->len = h->len;
	memcpy(r->frame, (const uint8_t *)data + sizeof(*h), h->len);
	tail = s->park_tail ? s->park_tail : &s->park_head;
	*tail = r;
	s->park_tail = &r->next;
	s->park_bytes += h->len;
	return 0;
}

static int pass_prog(struct xo_steer *s);

int xo_park_setup(struct xo_steer *s, int ring_fd, int rings_fd,
		  uint32_t ring_size)
{
	int ret;

	s->park_rings_fd = rings_fd;
	s->park_ring_size = ring_size;

	s->park_rb = ring_buffer__new(ring_fd, on_parked, s, NULL);
	if (!s->park_rb)
		return xo_fail_bpf(-errno, "parked-frame ring");
	/* Loaded now, not at the first replay: a handoff should not pay for
	 * it, and a process's descriptors should not grow later. */
	ret = pass_prog(s);
	if (ret < 0) {
		ring_buffer__free(s->park_rb);
		s->park_rb = NULL;
		return ret;
	}
	return 0;
}

void xo_park_cleanup(struct xo_steer *s)
{
	struct park_rec *r;

	/* Our ring leaves the map first: a frame parked for our flows from
	 * now on goes to the shared ring rather than into a ring nobody
	 * reads. */
	if (s->park_own_fd >= 0 && s->park_rings_fd >= 0)
		bpf_map_delete_elem(s->park_rings_fd, &s->park_owner);
	ring_buffer__free(s->park_rb);
	s->park_rb = NULL;
	if (s->park_own_fd >= 0)
		close(s->park_own_fd);
	s->park_own_fd = -1;
	while ((r = s->park_head)) {
		s->park_head = r->next;
		free(r);
	}
	s->park_tail = NULL;
	if (s->pass_prog_fd >= 0)
		close(s->pass_prog_fd);
	s->pass_prog_fd = -1;
}

/*
 * Per-owner rings. Processes that share one loaded object (a master that
 * opened it, workers that inherited it) share xo_parked: any of them could
 * read a frame parked for another's flow, which then never reaches the
 * flow's owner. A process whose machine has its own owner id puts a ring
 * of its own into xo_park_rings under that id; the datapath parks frames
 * of PARK entries with that owner there. The handle keeps reading
 * xo_parked too (one epoll descriptor for both), for entries of owners
 * without a ring.
 */
int xo_park_own(struct xo_steer *s, uint32_t owner)
{
	int fd, ret;

	xo_clear_error();
	if (!s || !s->park_rb)
		return xo_fail(XO_E_INVAL, "park: no steering handle");
	if (s->park_rings_fd < 0)
		return xo_fail(XO_E_VERSION, "park: the BPF object has no "
			       "xo_park_rings map: rebuild bpf/");
	if (s->park_own_fd >= 0)
		return xo_fail(XO_E_BUSY, "park: this handle already has a ring "
			       "of its own (owner %u)", s->park_owner);
	fd = bpf_map_create(BPF_MAP_TYPE_RINGBUF, "xo_park_own", 0, 0,
			    s->park_ring_size, NULL);
	if (fd < 0)
		return xo_fail_bpf(fd, "park: create a ring of %u bytes for "
				   "owner %u", s->park_ring_size, owner);
	ret = ring_buffer__add(s->park_rb, fd, on_parked, s);
	if (ret) {
		close(fd);
		return xo_fail_bpf(ret, "park: watch the ring of owner %u",
				   owner);
	}
	/* Last, once it is read: from now on the datapath fills it. A ring
	 * left by an earlier process with the same id (PID reuse) is
	 * replaced. */
	ret = bpf_map_update_elem(s->park_rings_fd, &owner, &fd, BPF_ANY);
	if (ret) {
		/* ring_buffer has no remove: the ring stays watched, empty */
		close(fd);
		return xo_fail_bpf(ret, "park: register the ring of owner %u "
				   "(at most %u owners)", owner,
				   XO_PARK_MAX_OWNER_RINGS);
	}
	s->park_own_fd = fd;
	s->park_owner = owner;
	return 0;
}

int64_t xo_park_owners(struct xo_steer *s, uint32_t *owners, uint32_t max)
{
	uint32_t key, next, n = 0;
	uint32_t *prev = NULL;
	int ret;

	xo_clear_error();
	if (!s || (max && !owners))
		return xo_fail(XO_E_INVAL, "park: bad argument");
	if (s->park_rings_fd < 0)
		return 0;
	while ((ret = bpf_map_get_next_key(s->park_rings_fd, prev, &next)) == 0) {
		if (n < max)
			owners[n] = next;
		n++;
		key = next;
		prev = &key;
	}
	if (ret != -ENOENT)
		return xo_fail_bpf(ret, "park: list owner rings");
	return n;
}

int xo_park_disown(struct xo_steer *s, uint32_t owner)
{
	int ret;

	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "park: no steering handle");
	if (s->park_rings_fd < 0)
		return xo_fail(XO_E_NOTFOUND, "park: no ring of owner %u", owner);
	ret = bpf_map_delete_elem(s->park_rings_fd, &owner);
	if (ret == -ENOENT)
		return xo_fail(XO_E_NOTFOUND, "park: no ring of owner %u", owner);
	if (ret)
		return xo_fail_bpf(ret, "park: remove the ring of owner %u",
				   owner);
	return 0;
}

int xo_park_fd(const struct xo_steer *s)
{
	return s && s->park_rb ? ring_buffer__epoll_fd(s->park_rb) : -1;
}

int64_t xo_park_collect(struct xo_steer *s)
{
	struct park_rec **pp = &s->park_head, *r;
	uint64_t old = mono_ns() - STASH_MAX_AGE_NS;
	int n;

	xo_clear_error();
	if (!s || !s->park_rb)
		return xo_fail(XO_E_INVAL, "park: no steering handle");
	n = ring_buffer__consume(s->park_rb);
	if (n < 0)
		return xo_fail_bpf(n, "park: read the ring");
	/* Frames nobody took in time belonged to a flow that went away. */
	while ((r = *pp)) {
		if (r->at < old) {
			*pp = r->next;
			s->park_bytes -= r->len;
			s->park_lost++;
			free(r);
		} else {
			pp = &r->next;
		}
	}
	s->park_tail = pp;
	return n;
}

uint64_t xo_park_stashed(const struct xo_steer *s)
{
	return s ? s->park_bytes : 0;
}

int64_t xo_park_take(struct xo_steer *s, const struct xo_flow_key *key,
		     uint8_t **out, uint32_t *out_len)
{
	struct park_rec **pp, *r;
	size_t size = 0;
	int64_t n = 0, ret;
	uint8_t *blob, *p;

	*out = NULL;
	*out_len = 0;
	ret = xo_park_collect(s);
	if (ret < 0)
		return ret;
	for (r = s->park_head; r; r = r->next)
		if (!memcmp(&r->key, key, sizeof(*key)))
			size += 4 + r->len;
	if (!size)
		return 0;
	blob = malloc(size);
	if (!blob)
		return xo_fail(XO_E_NOMEM, "park: %zu bytes", size);
	p = blob;
	pp = &s->park_head;
	while ((r = *pp)) {
		if (memcmp(&r->key, key, sizeof(*key))) {
			pp = &r->next;
			continue;
		}
		p = xo_put32(p, r->len);
		p = xo_put_bytes(p, r->frame, r->len);
		*pp = r->next;
		s->park_bytes -= r->len;
		free(r);
		n++;
	}
	s->park_tail = pp;
	*out = blob;
	*out_len = (uint32_t)size;
	return n;
}

uint64_t xo_park_lost(const struct xo_steer *s)
{
	return s->park_lost;
}

/* ---- replay --------------------------------------------------------------- */

static uint32_t sum16(const uint8_t *p, size_t len, uint32_t sum)
{
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += xo_get16(p + i);
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	return sum;
}

static uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/*
 * Replace a TCP timestamp option with NOPs. A replayed frame is older than
 * what its new owner may have seen already (the probe a client sent while
 * the flow was frozen, frames that came straight to it): PAWS would drop
 * it for its older TSval, and the client would have to resend it. Without
 * the option the segment skips PAWS and leaves the RTT estimate alone.
 */
static void strip_timestamp(uint8_t *opt, uint32_t len)
{
	uint32_t i = 0;

	while (i < len) {
		uint8_t kind = opt[i];

		if (kind == 0) /* end of options */
			return;
		if (kind == 1) { /* NOP */
			i++;
			continue;
		}
		if (i + 1 >= len || opt[i + 1] < 2 || i + opt[i + 1] > len)
			return; /* malformed: leave it to the stack */
		if (kind == 8 && opt[i + 1] == 10)
			memset(opt + i, 1, 10);
		i += opt[i + 1];
	}
}

static int pass_prog(struct xo_steer *s)
{
	/*
	 * Mark the frame as replayed (XO_REPLAY_META in its XDP metadata, so
	 * the flow's PARK entry lets it through) and pass it to the stack:
	 *	r6 = ctx; r0 = bpf_xdp_adjust_meta(ctx, -4);
	 *	if (r0 == 0 && ctx->data_meta + 4 <= ctx->data)
	 *		*(u32 *)ctx->data_meta = XO_REPLAY_META;
	 *	return XDP_PASS;
	 */
	const struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_X, .dst_reg = 6, .src_reg = 1 },
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 2, .imm = -4 },
		{ .code = BPF_JMP | BPF_CALL, .imm = BPF_FUNC_xdp_adjust_meta },
		{ .code = BPF_JMP | BPF_JNE | BPF_K, .dst_reg = 0, .off = 6 },
		{ .code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = 2, .src_reg = 6,
		  .off = offsetof(struct xdp_md, data_meta) },
		{ .code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = 3, .src_reg = 6,
		  .off = offsetof(struct xdp_md, data) },
		{ .code = BPF_ALU64 | BPF_MOV | BPF_X, .dst_reg = 4, .src_reg = 2 },
		{ .code = BPF_ALU64 | BPF_ADD | BPF_K, .dst_reg = 4, .imm = 4 },
		{ .code = BPF_JMP | BPF_JGT | BPF_X, .dst_reg = 4, .src_reg = 3,
		  .off = 1 },
		{ .code = BPF_ST | BPF_MEM | BPF_W, .dst_reg = 2,
		  .imm = (int32_t)XO_REPLAY_META },
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0,
		  .imm = XDP_PASS },
		{ .code = BPF_JMP | BPF_EXIT },
	};

	if (s->pass_prog_fd >= 0)
		return s->pass_prog_fd;
	s->pass_prog_fd = bpf_prog_load(BPF_PROG_TYPE_XDP, "xo_replay", "GPL",
					insns, sizeof(insns) / sizeof(insns[0]),
					NULL);
	if (s->pass_prog_fd < 0)
		return xo_fail_bpf(-errno, "park: load the replay program");
	return s->pass_prog_fd;
}

static int inject(struct xo_steer *s, int ifindex, uint8_t *frame,
		  uint32_t len)
{
	struct xdp_md ctx = { .data_end = len, .ingress_ifindex = (uint32_t)ifindex };
	LIBBPF_OPTS(bpf_test_run_opts, o, .data_in = frame, .data_size_in = len,
		    .ctx_in = &ctx, .ctx_size_in = sizeof(ctx), .repeat = 1,
		    .flags = BPF_F_TEST_XDP_LIVE_FRAMES);
	int fd = pass_prog(s), ret;

	if (fd < 0)
		return fd;
	ret = bpf_prog_test_run_opts(fd, &o);
	if (ret)
		return xo_fail_bpf(ret, "park: replay a %u-byte frame on ifindex %d",
				   len, ifindex);
	return 0;
}

/* Replay one parked frame, retargeted and cut into segments. Returns the
 * segments injected, 0 for a frame that is not plain Ethernet/IP/TCP. */
static int replay_frame(struct xo_steer *s, int ifindex, const uint8_t *f,
			uint32_t len, const struct xo_endpoint *to,
			const uint8_t *dst_mac)
{
	uint8_t out[14 + 60 + 60 + SEGMENT_MAX];
	uint32_t l3 = 14, l4, hlen, tlen, payload, off, seq, n = 0;
	uint16_t ip_id = 0;
	bool v6;
	int ret;

	if (len < 14 + 20)
		return 0;
	v6 = xo_get16(f + 12) == 0x86dd;
	if (!v6 && xo_get16(f + 12) != 0x0800)
		return 0;
	if (v6) {
		if (len < l3 + 40 + 20 || f[l3 + 6] != 6 || to->family != AF_INET6)
			return 0;
		l4 = l3 + 40;
		tlen = l3 + 40 + xo_get16(f + l3 + 4);
	} else {
		if ((f[l3] >> 4) != 4 || f[l3 + 9] != 6 || to->family != AF_INET)
			return 0;
		l4 = l3 + (f[l3] & 15) * 4u;
		tlen = l3 + xo_get16(f + l3 + 2);
		ip_id = xo_get16(f + l3 + 4);
	}
	if (l4 + 20 > len || tlen > len || tlen < l4 + 20)
		return 0;
	hlen = (f[l4 + 12] >> 4) * 4u;
	if (hlen < 20 || l4 + hlen > tlen || l4 + hlen > 14 + 60 + 60)
		return 0;
	payload = tlen - l4 - hlen;
	seq = xo_get32(f + l4 + 4);
	off = 0;
	do {
		uint32_t chunk = payload - off > SEGMENT_MAX ? SEGMENT_MAX :
							       payload - off;
		uint32_t seg_len = l4 + hlen + chunk, sum;
		uint8_t flags = f[l4 + 13];

		memcpy(out, f, l4 + hlen);
		memcpy(out + l4 + hlen, f + l4 + hlen + off, chunk);
		strip_timestamp(out + l4 + 20, hlen - 20);
		if (dst_mac)
			memcpy(out, dst_mac, 6);
		xo_put32(out + l4 + 4, seq + off);
		xo_put16(out + l4 + 2, to->port);
		if (off + chunk < payload)
			flags &= (uint8_t)~0x09; /* FIN, PSH: the last piece's */
		out[l4 + 13] = flags;
		if (v6) {
			memcpy(out + l3 + 24, to->addr, 16);
			xo_put16(out + l3 + 4, (uint16_t)(seg_len - l3 - 40));
			sum = sum16(out + l3 + 8, 32, 0);
		} else {
			memcpy(out + l3 + 16, to->addr, 4);
			xo_put16(out + l3 + 2, (uint16_t)(seg_len - l3));
			xo_put16(out + l3 + 4, (uint16_t)(ip_id + n));
			xo_put16(out + l3 + 10, 0);
			xo_put16(out + l3 + 10, fold(sum16(out + l3, l4 - l3, 0)));
			sum = sum16(out + l3 + 12, 8, 0);
		}
		sum += 6 + (seg_len - l4);
		xo_put16(out + l4 + 16, 0);
		xo_put16(out + l4 + 16, fold(sum16(out + l4, seg_len - l4, sum)));
		ret = inject(s, ifindex, out, seg_len);
		if (ret)
			return ret;
		n++;
		off += chunk;
	} while (off < payload);
	return (int)n;
}

int xo_park_tail(uint8_t *f, uint32_t *len, uint32_t keep)
{
	uint32_t l3 = 14, l4, hlen, tlen, payload, cut;
	bool v6;

	if (*len < 14 + 20)
		return xo_fail(XO_E_LENGTH, "park: %u-byte frame", *len);
	v6 = xo_get16(f + 12) == 0x86dd;
	if (!v6 && xo_get16(f + 12) != 0x0800)
		return xo_fail(XO_E_INVAL, "park: not an IP frame");
	if (v6) {
		if (*len < l3 + 40 + 20 || f[l3 + 6] != 6)
			return xo_fail(XO_E_INVAL, "park: not a TCP frame");
		l4 = l3 + 40;
		tlen = l3 + 40 + xo_get16(f + l3 + 4);
	} else {
		if ((f[l3] >> 4) != 4 || f[l3 + 9] != 6)
			return xo_fail(XO_E_INVAL, "park: not a TCP frame");
		l4 = l3 + (f[l3] & 15) * 4u;
		tlen = l3 + xo_get16(f + l3 + 2);
	}
	if (l4 + 20 > *len || tlen > *len || tlen < l4 + 20)
		return xo_fail(XO_E_LENGTH, "park: frame cut short");
	hlen = (f[l4 + 12] >> 4) * 4u;
	if (hlen < 20 || l4 + hlen > tlen)
		return xo_fail(XO_E_LENGTH, "park: frame cut short");
	payload = tlen - l4 - hlen;
	if (payload <= keep)
		return 0;
	cut = payload - keep;
	memmove(f + l4 + hlen, f + l4 + hlen + cut, keep);
	xo_put32(f + l4 + 4, xo_get32(f + l4 + 4) + cut);
	tlen -= cut;
	if (v6)
		xo_put16(f + l3 + 4, (uint16_t)(tlen - l3 - 40));
	else
		xo_put16(f + l3 + 2, (uint16_t)(tlen - l3));
	*len = tlen;
	return 0;
}

uint32_t xo_park_client_frame(const struct xo_endpoint *from,
			      const struct xo_endpoint *to, uint32_t seq,
			      uint32_t ack, uint16_t win, const uint8_t *payload,
			      uint32_t len, uint8_t *blob)
{
	bool v6 = from->family == AF_INET6;
	uint32_t l3 = 4 + 14, l4 = l3 + (v6 ? 40 : 20), flen;

	flen = l4 + 20 + len - 4;
	memset(blob, 0, l4 + 20);
	xo_put32(blob, flen);
	/* MACs are set by the replay, which also retargets the destination. */
	xo_put16(blob + 4 + 12, v6 ? 0x86dd : 0x0800);
	if (v6) {
		blob[l3] = 0x60;
		xo_put16(blob + l3 + 4, (uint16_t)(20 + len));
		blob[l3 + 6] = 6;
		blob[l3 + 7] = 64;
		memcpy(blob + l3 + 8, from->addr, 16);
		memcpy(blob + l3 + 24, to->addr, 16);
	} else {
		blob[l3] = 0x45;
		xo_put16(blob + l3 + 2, (uint16_t)(20 + 20 + len));
		xo_put16(blob + l3 + 6, 0x4000); /* DF */
		blob[l3 + 8] = 64;
		blob[l3 + 9] = 6;
		memcpy(blob + l3 + 12, from->addr, 4);
		memcpy(blob + l3 + 16, to->addr, 4);
	}
	xo_put16(blob + l4, from->port);
	xo_put16(blob + l4 + 2, to->port);
	xo_put32(blob + l4 + 4, seq);
	xo_put32(blob + l4 + 8, ack);
	blob[l4 + 12] = 5 << 4;
	blob[l4 + 13] = 0x10; /* ACK */
	xo_put16(blob + l4 + 14, win);
	if (len)
		memcpy(blob + l4 + 20, payload, len);
	return flen + 4;
}

uint32_t xo_park_owed_ack(const struct xo_tcp_state *st,
			  uint8_t blob[XO_PARK_OWED_ACK_MAX])
{
	uint32_t snd_una = st->snd_seq - st->inflight_len - st->unsent_len;
	uint32_t win = st->snd_wnd >> st->snd_wscale;
	const uint8_t zero = 0;

	if (st->rcv_wup == st->rcv_seq)
		return 0;
	/* The client's view: its next byte was rcv_nxt, and it has every
	 * byte up to snd_una; the window it last gave, so that taking this
	 * frame's window changes nothing. One byte again: a duplicate. */
	return xo_park_client_frame(&st->remote, &st->local, st->rcv_seq - 1,
				    snd_una,
				    (uint16_t)(win > 0xffff ? 0xffff : win),
				    &zero, 1, blob);
}

int64_t xo_park_replay(struct xo_steer *s, int ifindex, const uint8_t *blob,
		       uint32_t len, const struct xo_endpoint *to,
		       const uint8_t *dst_mac, uint32_t *segments)
{
	uint32_t off = 0;
	int64_t frames = 0;
	int ret;

	xo_clear_error();
	if (segments)
		*segments = 0;
	if (!s || !to || (!blob && len))
		return xo_fail(XO_E_INVAL, "park: NULL argument");
	while (off < len) {
		uint32_t flen;

		if (len - off < 4 || (flen = xo_get32(blob + off)) > len - off - 4)
			return xo_fail(XO_E_LENGTH, "park: blob cut at byte %u of %u",
				       off, len);
		ret = replay_frame(s, ifindex, blob + off + 4, flen, to, dst_mac);
		if (ret < 0)
			return ret;
		frames += ret > 0;
		if (segments)
			*segments += (uint32_t)ret;
		off += 4 + flen;
	}
	return frames;
}
