// SPDX-License-Identifier: MIT
/*
 * Software tier, object side: load bpf/xo_steer.bpf.o with libbpf, pin or
 * reuse its maps, attach the programs to interfaces (tc clsact, XDP) and
 * take them off again.
 */
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>

#include "steer_internal.h"

static const char *const prog_names[XO_PROG_COUNT] = {
	[XO_PROG_TC_INGRESS] = "xo_tc_ingress",
	[XO_PROG_TC_EGRESS] = "xo_tc_egress",
	[XO_PROG_XDP] = "xo_xdp",
};

/* One program on one interface, remembered so close() can undo it. */
struct xo_attachment {
	struct xo_attachment *next;
	int ifindex;
	int prog;
	uint32_t priority;   /* tc */
	uint32_t xdp_flags;  /* XDP */
	int created_hook;    /* we created the clsact qdisc */
	char netns[PATH_MAX];
};

const char *xo_steer_default_pin_dir(void)
{
	return XO_STEER_DEFAULT_PIN_DIR;
}

const char *xo_steer_pin_dir(const struct xo_steer *s)
{
	return s->pinned ? s->pin_dir : "";
}

int xo_steer_map_fd(const struct xo_steer *s)
{
	return s->flows_fd;
}

int xo_steer_prog_fd(const struct xo_steer *s, int prog)
{
	if (prog < 0 || prog >= XO_PROG_COUNT)
		return xo_fail(XO_E_INVAL, "unknown program %d", prog);
	return s->prog_fd[prog];
}

static void unpin_and_unmount(struct xo_steer *s)
{
	if (!s->pinned)
		return;
	/* Unpin only what this object pinned or reused; other files in the
	 * directory belong to someone else. */
	if (s->flows)
		bpf_map__unpin(s->flows, NULL);
	if (s->stats)
		bpf_map__unpin(s->stats, NULL);
	if (s->pairs)
		bpf_map__unpin(s->pairs, NULL);
	if (s->mounted_bpffs)
		umount2(s->pin_dir, MNT_DETACH);
	if (s->created_dir)
		rmdir(s->pin_dir);
}

int xo_steer_open(const struct xo_steer_opts *uopts, struct xo_steer **out)
{
	struct xo_steer_opts o;
	struct xo_steer *s;
	struct bpf_map *ring, *rings;
	const char *pin;
	int ret, i;

	xo_clear_error();
	xo_libbpf_init();
	xo_libbpf_reset();
	if (!uopts || !out || uopts->size < offsetof(struct xo_steer_opts,
						     max_flows))
		return xo_fail(XO_E_INVAL, "xo_steer_open: opts and out are "
			       "required, opts.size must be set");
	*out = NULL;
	memset(&o, 0, sizeof(o));
	memcpy(&o, uopts, uopts->size < sizeof(o) ? uopts->size : sizeof(o));
	if (!o.obj_path || !*o.obj_path)
		return xo_fail(XO_E_INVAL, "xo_steer_open: obj_path is required");

	s = calloc(1, sizeof(*s));
	if (!s)
		return xo_fail(XO_E_NOMEM, "xo_steer_open: out of memory");
	s->flows_fd = -1;
	s->stats_fd = -1;
	s->pass_prog_fd = -1;
	s->park_rings_fd = -1;
	s->park_own_fd = -1;
	for (i = 0; i < XO_PROG_COUNT; i++)
		s->prog_fd[i] = -1;
	pthread_mutex_init(&s->lock, NULL);

	pin = o.pin_dir && *o.pin_dir ? o.pin_dir : XO_STEER_DEFAULT_PIN_DIR;
	if (!(o.flags & XO_STEER_F_NO_PIN)) {
		if (strlen(pin) >= sizeof(s->pin_dir)) {
			ret = xo_fail(XO_E_INVAL, "pin directory too long");
			goto fail;
		}
		strcpy(s->pin_dir, pin);
		ret = xo_bpffs_prepare(s->pin_dir, &s->mounted_bpffs,
				       &s->created_dir);
		if (ret)
			goto fail;
		s->pinned = 1;
	}

	{
		LIBBPF_OPTS(bpf_object_open_opts, oo,
			    .pin_root_path = s->pinned ? s->pin_dir : NULL);

		s->obj = bpf_object__open_file(o.obj_path, &oo);
	}
	if (!s->obj) {
		ret = xo_fail_bpf(-errno, "open BPF object %s", o.obj_path);
		s->obj = NULL;
		goto fail;
	}
	s->flows = bpf_object__find_map_by_name(s->obj, "xo_flows");
	s->stats = bpf_object__find_map_by_name(s->obj, "xo_stats");
	s->pairs = bpf_object__find_map_by_name(s->obj, "xo_pairs");
	if (!s->flows || !s->stats || !s->pairs) {
		ret = xo_fail(XO_E_INVAL, "%s is not an XO steering object "
			      "(maps xo_flows/xo_stats/xo_pairs missing)",
			      o.obj_path);
		goto fail;
	}
	if (bpf_map__key_size(s->flows) != sizeof(struct xo_flow_key) ||
	    bpf_map__value_size(s->flows) != sizeof(struct xo_steer_action)) {
		ret = xo_fail(XO_E_VERSION, "%s was built against another "
			      "xo_steer_abi.h (key %u/value %u bytes, this "
			      "core expects %zu/%zu): rebuild bpf/",
			      o.obj_path, bpf_map__key_size(s->flows),
			      bpf_map__value_size(s->flows),
			      sizeof(struct xo_flow_key),
			      sizeof(struct xo_steer_action));
		goto fail;
	}
	if (o.max_flows) {
		ret = bpf_map__set_max_entries(s->flows, o.max_flows);
		if (ret) {
			ret = xo_fail_bpf(ret, "set max_flows to %u",
					  o.max_flows);
			goto fail;
		}
	}
	if (!s->pinned) {
		/* Dropping the pin path is how libbpf is told not to pin
		 * or reuse a map declared with LIBBPF_PIN_BY_NAME. */
		bpf_map__set_pin_path(s->flows, NULL);
		bpf_map__set_pin_path(s->stats, NULL);
		bpf_map__set_pin_path(s->pairs, NULL);
	}
	ring = bpf_object__find_map_by_name(s->obj, "xo_parked");
	if (!ring) {
		ret = xo_fail(XO_E_VERSION, "%s has no xo_parked ring: rebuild bpf/",
			      o.obj_path);
		goto fail;
	}
	if (o.park_ring_bytes) {
		ret = bpf_map__set_max_entries(ring, o.park_ring_bytes);
		if (ret) {
			ret = xo_fail_bpf(ret, "set the park ring to %u bytes",
					  o.park_ring_bytes);
			goto fail;
		}
	}
	ret = bpf_object__load(s->obj);
	if (ret) {
		ret = xo_fail_bpf(ret, "load BPF object %s", o.obj_path);
		goto fail;
	}
	s->flows_fd = bpf_map__fd(s->flows);
	s->stats_fd = bpf_map__fd(s->stats);
	for (i = 0; i < XO_PROG_COUNT; i++) {
		struct bpf_program *p =
			bpf_object__find_program_by_name(s->obj, prog_names[i]);

		if (!p) {
			ret = xo_fail(XO_E_INVAL, "%s lacks program %s",
				      o.obj_path, prog_names[i]);
			goto fail;
		}
		s->prog_fd[i] = bpf_program__fd(p);
	}
	/* xo_park_rings is optional: an object built before it parks
	 * everything in xo_parked (xo_park_own() then says so). */
	rings = bpf_object__find_map_by_name(s->obj, "xo_park_rings");
	ret = xo_park_setup(s, bpf_map__fd(ring), rings ? bpf_map__fd(rings) : -1,
			    bpf_map__max_entries(ring));
	if (ret)
		goto fail;
	*out = s;
	return 0;

fail:
	if (s->obj) {
		/* Maps pinned by this failed load would be empty leftovers
		 * only if we created them; reused pins stay. */
		bpf_object__close(s->obj);
	}
	if (s->mounted_bpffs)
		umount2(s->pin_dir, MNT_DETACH);
	if (s->created_dir)
		rmdir(s->pin_dir);
	pthread_mutex_destroy(&s->lock);
	free(s);
	return ret;
}

static int tc_point(int prog)
{
	return prog == XO_PROG_TC_INGRESS ? BPF_TC_INGRESS : BPF_TC_EGRESS;
}

static int detach_one(struct xo_steer *s, struct xo_attachment *a)
{
	int saved, ret;

	ret = xo_netns_enter(a->netns[0] ? a->netns : NULL, &saved);
	if (ret)
		return ret;
	if (a->prog == XO_PROG_XDP) {
		LIBBPF_OPTS(bpf_xdp_attach_opts, xo,
			    .old_prog_fd = s->prog_fd[XO_PROG_XDP]);

		/* REPLACE with the old fd: remove it only if it is still
		 * ours, never someone else's program. */
		ret = bpf_xdp_attach(a->ifindex, -1,
				     a->xdp_flags | XDP_FLAGS_REPLACE, &xo);
		if (ret && ret != -ENOENT && ret != -ENODEV) {
			ret = xo_fail_bpf(ret, "detach XDP from ifindex %d",
					  a->ifindex);
			goto out;
		}
	} else {
		LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = a->ifindex,
			    .attach_point = tc_point(a->prog));
		LIBBPF_OPTS(bpf_tc_opts, to, .handle = XO_TC_HANDLE,
			    .priority = a->priority);
		struct xo_attachment *o;
		int others = 0;

		ret = bpf_tc_detach(&hook, &to);
		if (ret && ret != -ENOENT && ret != -ENODEV && ret != -EINVAL) {
			ret = xo_fail_bpf(ret, "detach tc %s program from "
					  "ifindex %d", prog_names[a->prog],
					  a->ifindex);
			goto out;
		}
		/* Remove the clsact qdisc only if we created it and none of
		 * our programs still uses it. */
		for (o = s->attached; o; o = o->next)
			if (o != a && o->ifindex == a->ifindex &&
			    o->prog != XO_PROG_XDP &&
			    !strcmp(o->netns, a->netns))
				others = 1;
		if (a->created_hook && !others) {
			hook.attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS;
			bpf_tc_hook_destroy(&hook);
		} else if (a->created_hook) {
			/* Hand the duty to the survivor. */
			for (o = s->attached; o; o = o->next)
				if (o != a && o->ifindex == a->ifindex &&
				    o->prog != XO_PROG_XDP &&
				    !strcmp(o->netns, a->netns)) {
					o->created_hook = 1;
					break;
				}
		}
	}
	ret = 0;
out:
	xo_netns_leave(saved);
	return ret;
}

/*
 * The interface already has an XDP program. If it is ours from an earlier
 * incarnation of this role instance (a process killed before it could
 * detach), it uses our pinned flow map: take its place atomically. Any
 * other program, including a live XO handle with other maps, is left
 * alone.
 */
static int take_over_stale_xdp(struct xo_steer *s, int ifindex,
			       uint32_t flags)
{
	struct bpf_prog_info info;
	struct bpf_map_info map_info;
	uint32_t len = sizeof(info), map_len = sizeof(map_info);
	uint32_t prog_id = 0, map_ids[8], i;
	int old_fd, ret, ours = 0;

	if (!s->pinned || bpf_xdp_query_id(ifindex, (int)flags, &prog_id) ||
	    !prog_id)
		return xo_fail(XO_E_BUSY, "ifindex %d already has an XDP "
			       "program; detach it first", ifindex);
	old_fd = bpf_prog_get_fd_by_id(prog_id);
	if (old_fd < 0)
		return xo_fail_bpf(old_fd, "open XDP program %u on ifindex %d",
				   prog_id, ifindex);
	memset(&info, 0, sizeof(info));
	info.nr_map_ids = sizeof(map_ids) / sizeof(map_ids[0]);
	info.map_ids = (uint64_t)(unsigned long)map_ids;
	memset(&map_info, 0, sizeof(map_info));
	if (bpf_obj_get_info_by_fd(old_fd, &info, &len) ||
	    bpf_obj_get_info_by_fd(s->flows_fd, &map_info, &map_len)) {
		ret = xo_fail_bpf(-errno, "inspect XDP program %u on ifindex %d",
				  prog_id, ifindex);
		goto out;
	}
	for (i = 0; i < info.nr_map_ids && i < 8; i++)
		ours |= map_ids[i] == map_info.id;
	if (!ours || strcmp(info.name, "xo_xdp")) {
		ret = xo_fail(XO_E_BUSY, "ifindex %d already has XDP program "
			      "'%s' (id %u), not a stale one of ours; detach "
			      "it first", ifindex, info.name, prog_id);
		goto out;
	}
	LIBBPF_OPTS(bpf_xdp_attach_opts, xo, .old_prog_fd = old_fd);
	ret = bpf_xdp_attach(ifindex, s->prog_fd[XO_PROG_XDP],
			     flags | XDP_FLAGS_REPLACE, &xo);
	if (ret)
		ret = xo_fail_bpf(ret, "replace stale XDP program %u on "
				  "ifindex %d", prog_id, ifindex);
out:
	close(old_fd);
	return ret;
}

int xo_steer_attach(struct xo_steer *s, int ifindex, int prog,
		    const struct xo_attach_opts *uopts)
{
	struct xo_attach_opts o;
	struct xo_attachment *a, *old = NULL;
	int saved = -1, ret;

	xo_clear_error();
	xo_libbpf_reset();
	if (!s || ifindex <= 0 || prog < 0 || prog >= XO_PROG_COUNT)
		return xo_fail(XO_E_INVAL, "xo_steer_attach: bad handle, "
			       "ifindex %d or program %d", ifindex, prog);
	memset(&o, 0, sizeof(o));
	if (uopts) {
		if (uopts->size < offsetof(struct xo_attach_opts, netns))
			return xo_fail(XO_E_INVAL, "xo_attach_opts.size unset");
		memcpy(&o, uopts,
		       uopts->size < sizeof(o) ? uopts->size : sizeof(o));
	}
	if (!o.tc_priority)
		o.tc_priority = XO_TC_PRIORITY;
	if (o.tc_priority > 0xffff)
		return xo_fail(XO_E_INVAL, "tc priority %u > 65535",
			       o.tc_priority);
	if (o.xdp_flags & ~(uint32_t)(XDP_FLAGS_SKB_MODE | XDP_FLAGS_DRV_MODE))
		return xo_fail(XO_E_INVAL, "xdp_flags 0x%x: only the mode "
			       "bits SKB/DRV may be given", o.xdp_flags);
	if (o.netns && strlen(o.netns) >= PATH_MAX)
		return xo_fail(XO_E_INVAL, "netns path too long");

	a = calloc(1, sizeof(*a));
	if (!a)
		return xo_fail(XO_E_NOMEM, "xo_steer_attach: out of memory");
	a->ifindex = ifindex;
	a->prog = prog;
	a->priority = o.tc_priority;
	a->xdp_flags = o.xdp_flags;
	if (o.netns)
		strcpy(a->netns, o.netns);

	pthread_mutex_lock(&s->lock);
	for (old = s->attached; old; old = old->next)
		if (old->ifindex == ifindex && old->prog == prog &&
		    !strcmp(old->netns, a->netns))
			break;
	ret = xo_netns_enter(o.netns, &saved);
	if (ret)
		goto fail;
	if (prog == XO_PROG_XDP) {
		if (old) {
			ret = xo_fail(XO_E_BUSY, "XDP program already attached "
				      "to ifindex %d by this handle", ifindex);
			goto fail;
		}
		/* UPDATE_IF_NOEXIST: never silently replace a program we
		 * did not put there. */
		ret = bpf_xdp_attach(ifindex, s->prog_fd[prog],
				     o.xdp_flags | XDP_FLAGS_UPDATE_IF_NOEXIST,
				     NULL);
		if (ret == -EBUSY || ret == -EEXIST) {
			ret = take_over_stale_xdp(s, ifindex, o.xdp_flags);
			if (ret)
				goto fail;
		} else if (ret) {
			ret = xo_fail_bpf(ret, "attach XDP program to ifindex "
					  "%d (flags 0x%x)", ifindex,
					  o.xdp_flags);
			goto fail;
		}
	} else {
		LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex,
			    .attach_point = tc_point(prog));
		LIBBPF_OPTS(bpf_tc_opts, to, .prog_fd = s->prog_fd[prog],
			    .handle = XO_TC_HANDLE, .priority = o.tc_priority,
			    .flags = BPF_TC_F_REPLACE);

		ret = bpf_tc_hook_create(&hook);
		if (ret && ret != -EEXIST) {
			ret = xo_fail_bpf(ret, "create clsact qdisc on ifindex "
					  "%d (needs CONFIG_NET_SCH_INGRESS)",
					  ifindex);
			goto fail;
		}
		a->created_hook = ret == 0 || (old && old->created_hook);
		ret = bpf_tc_attach(&hook, &to);
		if (ret) {
			ret = xo_fail_bpf(ret, "attach tc %s program to "
					  "ifindex %d (cls_bpf, direct action, "
					  "prio %u)", prog_names[prog], ifindex,
					  o.tc_priority);
			if (a->created_hook && !old) {
				hook.attach_point =
					BPF_TC_INGRESS | BPF_TC_EGRESS;
				bpf_tc_hook_destroy(&hook);
			}
			goto fail;
		}
		if (old && old->priority != o.tc_priority) {
			/* Moved to another priority: take the old filter
			 * off so the program does not run twice. */
			LIBBPF_OPTS(bpf_tc_opts, oldo, .handle = XO_TC_HANDLE,
				    .priority = old->priority);
			bpf_tc_detach(&hook, &oldo);
		}
	}
	xo_netns_leave(saved);
	if (old) {
		old->priority = a->priority;
		old->created_hook = a->created_hook;
		free(a);
	} else {
		a->next = s->attached;
		s->attached = a;
	}
	pthread_mutex_unlock(&s->lock);
	return 0;

fail:
	xo_netns_leave(saved);
	pthread_mutex_unlock(&s->lock);
	free(a);
	return ret;
}

int xo_steer_detach(struct xo_steer *s, int ifindex, int prog,
		    const char *netns)
{
	struct xo_attachment **pp, *a;
	int ret;

	xo_clear_error();
	xo_libbpf_reset();
	if (!s)
		return xo_fail(XO_E_INVAL, "xo_steer_detach: no handle");
	pthread_mutex_lock(&s->lock);
	for (pp = &s->attached; *pp; pp = &(*pp)->next)
		if ((*pp)->ifindex == ifindex && (*pp)->prog == prog &&
		    !strcmp((*pp)->netns, netns ? netns : ""))
			break;
	a = *pp;
	if (!a) {
		pthread_mutex_unlock(&s->lock);
		return xo_fail(XO_E_NOTFOUND, "program %d is not attached to "
			       "ifindex %d by this handle", prog, ifindex);
	}
	ret = detach_one(s, a);
	if (!ret) {
		*pp = a->next;
		free(a);
	}
	pthread_mutex_unlock(&s->lock);
	return ret;
}

void xo_steer_close(struct xo_steer *s, uint32_t flags)
{
	struct xo_attachment *a, *next;

	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	for (a = s->attached; a; a = next) {
		next = a->next;
		if (!(flags & XO_STEER_CLOSE_KEEP_ATTACHED))
			detach_one(s, a); /* best effort: keep going */
		s->attached = next;
		free(a);
	}
	pthread_mutex_unlock(&s->lock);
	if (flags & XO_STEER_CLOSE_UNPIN)
		unpin_and_unmount(s);
	xo_park_cleanup(s);
	bpf_object__close(s->obj);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

int xo_steer_test_run(struct xo_steer *s, int prog, const uint8_t *pkt,
		      uint32_t len, uint8_t *out, uint32_t out_cap,
		      uint32_t *out_len, uint32_t *retval)
{
	int ret;

	xo_clear_error();
	if (!s || prog < 0 || prog >= XO_PROG_COUNT || !pkt || !out ||
	    !out_len || !retval)
		return xo_fail(XO_E_INVAL, "xo_steer_test_run: bad argument");
	{
		LIBBPF_OPTS(bpf_test_run_opts, t, .data_in = pkt,
			    .data_size_in = len, .data_out = out,
			    .data_size_out = out_cap, .repeat = 1);

		ret = bpf_prog_test_run_opts(s->prog_fd[prog], &t);
		if (ret)
			return xo_fail_bpf(ret, "BPF_PROG_TEST_RUN of %s on a "
					   "%u-byte packet", prog_names[prog],
					   len);
		*out_len = t.data_size_out;
		*retval = t.retval;
	}
	return 0;
}
