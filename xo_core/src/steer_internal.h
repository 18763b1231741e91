/* SPDX-License-Identifier: MIT */
/* Private to the steering sources (steer_*.c); not part of the API. */
#ifndef XO_STEER_INTERNAL_H
#define XO_STEER_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "internal.h"
#include "xo_steer.h"

#include <limits.h>

struct bpf_object;
struct bpf_map;
struct xo_attachment;
struct ring_buffer;
struct park_rec;

/* ---- steer_bpf.c ---- */

struct xo_steer {
	struct bpf_object *obj;
	struct bpf_map *flows;
	struct bpf_map *stats;
	struct bpf_map *pairs; /* written by the programs only */
	int flows_fd;
	int stats_fd;
	int prog_fd[XO_PROG_COUNT];
	int pinned;         /* maps live under pin_dir */
	int mounted_bpffs;  /* we mounted a bpffs on pin_dir */
	int created_dir;    /* we created pin_dir */
	char pin_dir[PATH_MAX];
	pthread_mutex_t lock; /* guards attached */
	struct xo_attachment *attached;
	/* steer_park.c: the parked-frame ring, its stash, the replayer */
	struct ring_buffer *park_rb;
	struct park_rec *park_head;
	struct park_rec **park_tail; /* where the next record goes (NULL:
				      * &park_head) */
	uint64_t park_bytes, park_lost;
	int pass_prog_fd;
	int park_rings_fd;  /* xo_park_rings (-1: an object without it) */
	uint32_t park_ring_size; /* bytes of xo_parked, for owner rings */
	int park_own_fd;    /* this process's ring in it (-1: none) */
	uint32_t park_owner;
};

/* ---- steer_park.c ---- */

int xo_park_setup(struct xo_steer *s, int ring_fd, int rings_fd,
		  uint32_t ring_size);
void xo_park_cleanup(struct xo_steer *s);

/* ---- steer_util.c ---- */

/* Move this thread into the network namespace at path (NULL: stay).
 * *saved receives an fd for xo_netns_leave(), or -1. */
int xo_netns_enter(const char *path, int *saved);
/* Return to the namespace saved by xo_netns_enter(); keeps errno. */
void xo_netns_leave(int saved);

/* Make dir a directory on a bpffs, mounting one if needed. *mounted says
 * whether we mounted a bpffs on dir itself, *created whether we made dir. */
int xo_bpffs_prepare(const char *dir, int *mounted, int *created);

/* Route libbpf's messages through us (once per process); its first
 * warning since xo_libbpf_reset() is kept for error sentences. */
void xo_libbpf_init(void);
void xo_libbpf_reset(void);
/* "; libbpf: <message>" or "" */
const char *xo_libbpf_detail(void);

/* libbpf returns -errno; report it like a failed system call. */
int xo_fail_bpf(int ret, const char *step, ...) XO_PRINTF(2, 3);

/* ---- steer_map.c ---- */

int xo_steer_check_key(const struct xo_flow_key *key);
/* The flow the rule benchmarks insert and remove (src port varies). */
void xo_bench_flow_key(struct xo_flow_key *k);
int xo_steer_check_action(const struct xo_steer_action *act);

/* ---- steer_hw.c ---- */

struct xo_hw_backend {
	struct xo_hw_ops ops;
	void *priv;
};

#endif
