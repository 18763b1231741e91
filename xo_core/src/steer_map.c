// SPDX-License-Identifier: MIT
/*
 * Software tier, rule side: one BPF map write per insert, one delete per
 * remove. Nothing here allocates or locks, so a rule change costs one
 * bpf() system call (about half a microsecond).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "steer_internal.h"

/* The kernel hashes keys byte by byte and the programs read values at
 * fixed offsets: the layout must not depend on the compiler. */
_Static_assert(sizeof(struct xo_flow_key) == 40, "xo_flow_key layout");
_Static_assert(sizeof(struct xo_steer_action) == 88, "xo_steer_action layout");
_Static_assert(sizeof(struct xo_pair_key) == 36, "xo_pair_key layout");
_Static_assert(offsetof(struct xo_steer_action, expires_ns) == 64,
	       "xo_steer_action layout");

static int all_zero(const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (b[i])
			return 0;
	return 1;
}

int xo_steer_check_key(const struct xo_flow_key *k)
{
	if (!k)
		return xo_fail(XO_E_INVAL, "flow key is NULL");
	if (k->family != XO_AF_INET && k->family != XO_AF_INET6)
		return xo_fail(XO_E_INVAL, "flow key family %u is neither "
			       "AF_INET (2) nor AF_INET6 (10)", k->family);
	if (k->proto != XO_IPPROTO_TCP)
		return xo_fail(XO_E_INVAL, "flow key protocol %u: only TCP "
			       "(6) is steered", k->proto);
	/* Garbage here would make an entry no packet can ever match. */
	if (k->pad[0] || k->pad[1])
		return xo_fail(XO_E_INVAL, "flow key padding must be zero");
	if (k->family == XO_AF_INET &&
	    (!all_zero(k->src_addr + 4, 12) || !all_zero(k->dst_addr + 4, 12)))
		return xo_fail(XO_E_INVAL, "IPv4 flow key: address bytes 4..15 "
			       "must be zero");
	return 0;
}

int xo_steer_check_action(const struct xo_steer_action *a)
{
	if (!a)
		return xo_fail(XO_E_INVAL, "action is NULL");
	switch (a->kind) {
	case XO_STEER_BLOCK:
	case XO_STEER_PARK:
		break;
	case XO_STEER_REDIRECT:
		if (all_zero(a->new_dst_addr, 16) && !a->new_dst_port)
			return xo_fail(XO_E_INVAL, "redirect without a new "
				       "destination address or port");
		break;
	case XO_STEER_SRC_REWRITE:
		if (all_zero(a->new_src_addr, 16) && !a->new_src_port)
			return xo_fail(XO_E_INVAL, "source rewrite without a "
				       "new source address or port");
		break;
	default:
		return xo_fail(XO_E_INVAL, "unknown action kind %u", a->kind);
	}
	/* A stale block or redirect black-holes a client port that gets
	 * reused later: those must always expire. */
	if (a->kind != XO_STEER_SRC_REWRITE && !a->expires_ns)
		return xo_fail(XO_E_INVAL, "block, park and redirect entries need an "
			       "expiry (expires_ns, CLOCK_MONOTONIC ns)");
	return 0;
}

uint64_t xo_steer_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int xo_steer_insert(struct xo_steer *s, const struct xo_flow_key *key,
		    const struct xo_steer_action *act, uint32_t mode)
{
	static const uint64_t bpf_flags[] = {
		[XO_STEER_UPSERT] = BPF_ANY,
		[XO_STEER_CREATE] = BPF_NOEXIST,
		[XO_STEER_REPLACE] = BPF_EXIST,
	};
	int ret;

	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_insert: no handle");
	if (mode > XO_STEER_REPLACE)
		return xo_fail(XO_E_INVAL, "insert mode %u unknown", mode);
	ret = xo_steer_check_key(key);
	if (!ret)
		ret = xo_steer_check_action(act);
	if (ret)
		return ret;
	if (bpf_map_update_elem(s->flows_fd, key, act, bpf_flags[mode]) == 0)
		return 0;
	switch (errno) {
	case EEXIST:
		return xo_fail(XO_E_BUSY, "the flow already has an entry");
	case ENOENT:
		return xo_fail(XO_E_NOTFOUND, "the flow has no entry to "
			       "replace");
	case E2BIG:
	case ENOMEM:
		return xo_fail(XO_E_NOSPACE, "flow map full (%u entries); "
			       "sweep expired entries or raise max_flows",
			       bpf_map__max_entries(s->flows));
	default:
		return xo_fail_sys("update flow map (fd %d)", s->flows_fd);
	}
}

int xo_steer_remove(struct xo_steer *s, const struct xo_flow_key *key)
{
	int ret;

	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_remove: no handle");
	ret = xo_steer_check_key(key);
	if (ret)
		return ret;
	if (bpf_map_delete_elem(s->flows_fd, key) == 0)
		return 0;
	if (errno == ENOENT)
		return xo_fail(XO_E_NOTFOUND, "the flow has no entry");
	return xo_fail_sys("delete from flow map (fd %d)", s->flows_fd);
}

int xo_steer_lookup(struct xo_steer *s, const struct xo_flow_key *key,
		    struct xo_steer_action *act)
{
	int ret;

	xo_clear_error();
	if (!s || !act)
		return xo_fail(XO_E_INVAL, "xo_steer_lookup: bad argument");
	ret = xo_steer_check_key(key);
	if (ret)
		return ret;
	if (bpf_map_lookup_elem(s->flows_fd, key, act) == 0)
		return 0;
	if (errno == ENOENT)
		return xo_fail(XO_E_NOTFOUND, "the flow has no entry");
	return xo_fail_sys("look up flow map (fd %d)", s->flows_fd);
}

/*
 * Walk the map with BPF_MAP_GET_NEXT_KEY. Entries deleted during the walk
 * can make the kernel restart from the first key; the walk is bounded by
 * max_entries plus slack so it always ends, and callers that delete
 * collect keys first and delete afterwards.
 */
typedef int (*walk_fn)(void *ctx, const struct xo_flow_key *k,
		       const struct xo_steer_action *a);

static int64_t walk(struct xo_steer *s, walk_fn fn, void *ctx)
{
	struct xo_flow_key cur, next;
	struct xo_steer_action a;
	uint64_t limit = (uint64_t)bpf_map__max_entries(s->flows) * 2 + 16;
	int64_t n = 0;
	void *prev = NULL;

	while (limit--) {
		if (bpf_map_get_next_key(s->flows_fd, prev, &next) < 0) {
			if (errno == ENOENT)
				return n;
			return xo_fail_sys("walk flow map (fd %d)",
					   s->flows_fd);
		}
		cur = next;
		prev = &cur;
		if (bpf_map_lookup_elem(s->flows_fd, &cur, &a) < 0) {
			if (errno == ENOENT)
				continue; /* deleted under us */
			return xo_fail_sys("read flow map (fd %d)",
					   s->flows_fd);
		}
		if (fn) {
			int ret = fn(ctx, &cur, &a);

			if (ret < 0)
				return ret;
		}
		n++;
	}
	return n;
}

struct list_ctx {
	struct xo_flow_key *keys;
	struct xo_steer_action *acts;
	uint32_t cap;
	uint32_t n;
};

static int list_one(void *vctx, const struct xo_flow_key *k,
		    const struct xo_steer_action *a)
{
	struct list_ctx *c = vctx;

	if (c->n < c->cap) {
		if (c->keys)
			c->keys[c->n] = *k;
		if (c->acts)
			c->acts[c->n] = *a;
	}
	c->n++;
	return 0;
}

int64_t xo_steer_list(struct xo_steer *s, struct xo_flow_key *keys,
		      struct xo_steer_action *acts, uint32_t cap)
{
	struct list_ctx c = { .keys = keys, .acts = acts, .cap = cap };

	xo_clear_error();
	if (!s || (cap && !keys && !acts))
		return xo_fail(XO_E_INVAL, "xo_steer_list: bad argument");
	return walk(s, list_one, &c);
}

int64_t xo_steer_count(struct xo_steer *s)
{
	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_count: no handle");
	return walk(s, NULL, NULL);
}

/* Collect the keys matching a predicate, then delete them. */
struct pick_ctx {
	struct xo_flow_key *keys;
	uint32_t n, cap;
	uint64_t now;
	uint32_t owner;
	int by_owner;
};

static int pick_one(void *vctx, const struct xo_flow_key *k,
		    const struct xo_steer_action *a)
{
	struct pick_ctx *c = vctx;
	int hit = c->by_owner ? a->owner == c->owner :
		  a->expires_ns && a->expires_ns <= c->now;

	if (!hit)
		return 0;
	if (c->n == c->cap) {
		uint32_t ncap = c->cap ? c->cap * 2 : 64;
		struct xo_flow_key *nk = realloc(c->keys, ncap * sizeof(*nk));

		if (!nk)
			return xo_fail(XO_E_NOMEM, "sweep: out of memory");
		c->keys = nk;
		c->cap = ncap;
	}
	c->keys[c->n++] = *k;
	return 0;
}

static int64_t pick_and_delete(struct xo_steer *s, struct pick_ctx *c)
{
	int64_t ret = walk(s, pick_one, c), deleted = 0;

	if (ret >= 0) {
		for (uint32_t i = 0; i < c->n; i++) {
			if (bpf_map_delete_elem(s->flows_fd, &c->keys[i]) == 0)
				deleted++;
			else if (errno != ENOENT) {
				ret = xo_fail_sys("delete from flow map "
						  "(fd %d)", s->flows_fd);
				break;
			}
		}
	}
	free(c->keys);
	return ret < 0 ? ret : deleted;
}

int64_t xo_steer_sweep(struct xo_steer *s, uint64_t now_ns)
{
	struct pick_ctx c = { .now = now_ns ? now_ns : xo_steer_now_ns() };

	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_sweep: no handle");
	return pick_and_delete(s, &c);
}

int64_t xo_steer_purge_owner(struct xo_steer *s, uint32_t owner)
{
	struct pick_ctx c = { .owner = owner, .by_owner = 1 };

	xo_clear_error();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_purge_owner: no handle");
	return pick_and_delete(s, &c);
}

int xo_steer_dp_stats(struct xo_steer *s, uint64_t *counts)
{
	int ncpu = libbpf_num_possible_cpus();
	uint64_t *vals;

	xo_clear_error();
	if (!s || !counts)
		return xo_fail(XO_E_INVAL, "xo_steer_dp_stats: bad argument");
	if (ncpu <= 0)
		return xo_fail_bpf(ncpu, "count possible CPUs");
	vals = calloc(ncpu, sizeof(*vals));
	if (!vals)
		return xo_fail(XO_E_NOMEM, "dp_stats: out of memory");
	for (uint32_t i = 0; i < XO_STAT_MAX; i++) {
		counts[i] = 0;
		if (bpf_map_lookup_elem(s->stats_fd, &i, vals) < 0) {
			int ret = xo_fail_sys("read stats map slot %u", i);

			free(vals);
			return ret;
		}
		for (int c = 0; c < ncpu; c++)
			counts[i] += vals[c];
	}
	free(vals);
	return 0;
}

static uint64_t ts_diff(const struct timespec *a, const struct timespec *b)
{
	return (uint64_t)(b->tv_sec - a->tv_sec) * 1000000000ull +
	       (uint64_t)(b->tv_nsec - a->tv_nsec);
}

int xo_steer_bench(struct xo_steer *s, uint32_t count, uint64_t *insert_ns,
		   uint64_t *remove_ns, uint64_t *floor_ns)
{
	struct xo_flow_key k;
	struct xo_steer_action a;
	struct timespec t0, t1, t2;
	int ret;

	xo_clear_error();
	if (!s || !insert_ns || !remove_ns)
		return xo_fail(XO_E_INVAL, "xo_steer_bench: bad argument");
	xo_bench_flow_key(&k);
	memset(&a, 0, sizeof(a));
	a.kind = XO_STEER_BLOCK;
	a.expires_ns = xo_steer_now_ns() + 60ull * 1000000000ull;
	for (uint32_t i = 0; i < count; i++) {
		k.src_port = __builtin_bswap16((uint16_t)(1024 + i % 60000));
		clock_gettime(CLOCK_MONOTONIC, &t0);
		ret = xo_steer_insert(s, &k, &a, XO_STEER_UPSERT);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (ret)
			return ret;
		ret = xo_steer_remove(s, &k);
		clock_gettime(CLOCK_MONOTONIC, &t2);
		if (ret)
			return ret;
		insert_ns[i] = ts_diff(&t0, &t1);
		remove_ns[i] = ts_diff(&t1, &t2);
		if (floor_ns) {
			clock_gettime(CLOCK_MONOTONIC, &t0);
			bpf_map_lookup_elem(s->flows_fd, &k, &a);
			clock_gettime(CLOCK_MONOTONIC, &t1);
			floor_ns[i] = ts_diff(&t0, &t1);
		}
	}
	return 0;
}
