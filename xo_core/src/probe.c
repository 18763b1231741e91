// SPDX-License-Identifier: MIT
/*
 * Feature probes for `xo doctor` (xo_probe.h). Every probe runs the real
 * operation through the same libraries the core uses (libbpf, libmnl, the
 * TCP repair code, the flower backend) and classifies the outcome:
 *
 *   OK       the operation worked
 *   MISSING  the kernel refused the operation itself
 *   UNKNOWN  the test bed could not be built, or the probe was not
 *            permitted to run the test: nothing is known either way
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/pkt_cls.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <mntent.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <libmnl/libmnl.h>

#include "steer_internal.h"
#include "xo_probe.h"

#ifndef TCP_ULP
#define TCP_ULP 31
#endif

#define NEED_ROOT "run as root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF) " \
	"so the probe can run"

static void put(char *dst, size_t cap, const char *fmt, va_list ap)
{
	vsnprintf(dst, cap, fmt, ap);
}

static void res_ok(struct xo_probe_result *r, const char *fmt, ...)
	XO_PRINTF(2, 3);
static void res_ok(struct xo_probe_result *r, const char *fmt, ...)
{
	va_list ap;

	r->status = XO_PROBE_OK;
	va_start(ap, fmt);
	put(r->detail, sizeof(r->detail), fmt, ap);
	va_end(ap);
}

/* status MISSING or UNKNOWN, with what it disables and what to do. */
static void res_not(struct xo_probe_result *r, uint32_t status,
		    const char *disables, const char *remedy,
		    const char *fmt, ...) XO_PRINTF(5, 6);
static void res_not(struct xo_probe_result *r, uint32_t status,
		    const char *disables, const char *remedy,
		    const char *fmt, ...)
{
	va_list ap;

	r->status = status;
	snprintf(r->disables, sizeof(r->disables), "%s", disables);
	snprintf(r->remedy, sizeof(r->remedy), "%s", remedy);
	va_start(ap, fmt);
	put(r->detail, sizeof(r->detail), fmt, ap);
	va_end(ap);
}

/* A failed cleanup in the throw-away namespace harms nothing (the
 * namespace takes everything with it) but is still reported. */
static void note_cleanup(struct xo_probe_result *r, int err, const char *what)
{
	size_t len = strlen(r->detail);

	snprintf(r->detail + len, sizeof(r->detail) - len,
		 " (cleanup: %s failed: %s)", what, strerror(err));
}

/* A refusal for lack of privilege says nothing about the kernel. */
static uint32_t refused_status(int err)
{
	return (err == EPERM || err == EACCES) ? XO_PROBE_UNKNOWN :
						 XO_PROBE_MISSING;
}

/* ---- test beds ------------------------------------------------------- */

/* A connected pair over 127.0.0.1: fds[0] client, fds[1] server side. */
static int loopback_pair(int fds[2])
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t len = sizeof(sa);
	int lfd, ret;

	fds[0] = fds[1] = -1;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		return xo_fail_sys("probe: socket");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		ret = xo_fail_sys("probe: bind 127.0.0.1:0");
		goto out;
	}
	if (listen(lfd, 1) < 0) {
		ret = xo_fail_sys("probe: listen");
		goto out;
	}
	if (getsockname(lfd, (struct sockaddr *)&sa, &len) < 0) {
		ret = xo_fail_sys("probe: getsockname");
		goto out;
	}
	fds[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fds[0] < 0) {
		ret = xo_fail_sys("probe: socket");
		goto out;
	}
	if (connect(fds[0], (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		ret = xo_fail_sys("probe: connect to 127.0.0.1:%u",
				  ntohs(sa.sin_port));
		goto out;
	}
	fds[1] = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fds[1] < 0) {
		ret = xo_fail_sys("probe: accept");
		goto out;
	}
	close(lfd);
	return 0;
out:
	close(lfd);
	if (fds[0] >= 0)
		close(fds[0]);
	fds[0] = -1;
	return ret;
}

static void close_pair(int fds[2])
{
	close(fds[0]);
	close(fds[1]);
}

/*
 * Move this thread into a new, unnamed network namespace; *saved gets
 * the fd xo_netns_leave() returns with. Nothing names the namespace, so
 * it and every interface in it go away once the thread has left and the
 * probe's sockets are closed.
 */
static int private_netns_enter(int *saved)
{
	int cur;

	*saved = -1;
	cur = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (cur < 0)
		return xo_fail_sys("open /proc/thread-self/ns/net");
	if (unshare(CLONE_NEWNET) < 0) {
		int ret = xo_fail_sys("unshare(CLONE_NEWNET) for a private "
				      "network namespace");

		close(cur);
		return ret;
	}
	*saved = cur;
	return 0;
}

/* Send one rtnetlink request, wait for its ACK: 0 or an XO_E_* code. */
static int rtnl_request(struct nlmsghdr *nlh, const char *what)
{
	char buf[8192];
	struct mnl_socket *nl;
	unsigned int portid;
	uint32_t seq = (uint32_t)time(NULL);
	ssize_t n;
	int ret;

	nl = mnl_socket_open(NETLINK_ROUTE);
	if (!nl)
		return xo_fail_sys("%s: open rtnetlink socket", what);
	if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
		ret = xo_fail_sys("%s: bind rtnetlink socket", what);
		goto out;
	}
	portid = mnl_socket_get_portid(nl);
	nlh->nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	nlh->nlmsg_seq = seq;
	if (mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0) {
		ret = xo_fail_sys("%s: send", what);
		goto out;
	}
	for (;;) {
		n = mnl_socket_recvfrom(nl, buf, sizeof(buf));
		if (n < 0) {
			ret = xo_fail_sys("%s: receive", what);
			goto out;
		}
		ret = mnl_cb_run(buf, (size_t)n, seq, portid, NULL, NULL);
		if (ret < 0) {
			ret = xo_fail_sys("%s", what);
			goto out;
		}
		if (ret == MNL_CB_STOP) {
			ret = 0;
			goto out;
		}
	}
out:
	mnl_socket_close(nl);
	return ret;
}

/* Create the veth pair a <-> b in the current namespace. */
static int veth_create(const char *a, const char *b)
{
	char buf[1024];
	struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
	struct ifinfomsg *ifm;
	struct nlattr *info, *data, *peer;
	char what[96];

	nlh->nlmsg_type = RTM_NEWLINK;
	nlh->nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL;
	ifm = mnl_nlmsg_put_extra_header(nlh, sizeof(*ifm));
	ifm->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(nlh, IFLA_IFNAME, a);
	info = mnl_attr_nest_start(nlh, IFLA_LINKINFO);
	mnl_attr_put_strz(nlh, IFLA_INFO_KIND, "veth");
	data = mnl_attr_nest_start(nlh, IFLA_INFO_DATA);
	peer = mnl_attr_nest_start(nlh, VETH_INFO_PEER);
	ifm = mnl_nlmsg_put_extra_header(nlh, sizeof(*ifm));
	ifm->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(nlh, IFLA_IFNAME, b);
	mnl_attr_nest_end(nlh, peer);
	mnl_attr_nest_end(nlh, data);
	mnl_attr_nest_end(nlh, info);
	snprintf(what, sizeof(what), "create veth pair %s/%s", a, b);
	return rtnl_request(nlh, what);
}

static int link_delete(int ifindex, const char *name)
{
	char buf[256];
	struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
	struct ifinfomsg *ifm;
	char what[64];

	nlh->nlmsg_type = RTM_DELLINK;
	ifm = mnl_nlmsg_put_extra_header(nlh, sizeof(*ifm));
	ifm->ifi_family = AF_UNSPEC;
	ifm->ifi_index = ifindex;
	snprintf(what, sizeof(what), "delete link %s", name);
	return rtnl_request(nlh, what);
}

/* A program that returns verdict: r0 = verdict; exit. */
static int trivial_prog(enum bpf_prog_type type, int verdict,
			const char *name)
{
	const struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0,
		  .imm = verdict },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	int fd;

	xo_libbpf_init();
	xo_libbpf_reset();
	fd = bpf_prog_load(type, name, "GPL", insns,
			   sizeof(insns) / sizeof(insns[0]), NULL);
	if (fd < 0)
		return xo_fail_bpf(fd, "bpf(BPF_PROG_LOAD) of a trivial %s "
				   "program", name);
	return fd;
}

/* ---- the probes ------------------------------------------------------ */

static void probe_tcp_repair(struct xo_probe_result *r)
{
	static const char disables[] = "every connection handoff (host and "
		"target roles)";
	struct xo_tcp_state st;
	int fds[2], ret;

	memset(&st, 0, sizeof(st));
	if (loopback_pair(fds)) {
		res_not(r, XO_PROBE_UNKNOWN, disables, "look at the loopback "
			"interface (lo up, 127.0.0.1)", "no loopback connection "
			"to test on: %s", xo_last_error());
		return;
	}
	ret = xo_tcp_freeze(fds[1]);
	if (!ret)
		ret = xo_tcp_capture(fds[1], &st);
	if (!ret)
		ret = xo_tcp_resume(fds[1], &st);
	xo_state_release(&st);
	close_pair(fds);
	if (ret == XO_E_PERM)
		res_not(r, XO_PROBE_MISSING, disables, "run as root or grant "
			"CAP_NET_ADMIN (e.g. AmbientCapabilities= in the "
			"systemd unit, or setcap cap_net_admin+ep on the "
			"binary)", "%s", xo_last_error());
	else if (ret)
		res_not(r, XO_PROBE_MISSING, disables, "a kernel built with "
			"CONFIG_TCP (TCP_REPAIR is part of it since 3.5)",
			"%s", xo_last_error());
	else
		res_ok(r, "freeze, capture and resume work on a loopback "
		       "connection");
}

static void probe_bpf(struct xo_probe_result *r)
{
	static const char disables[] = "eBPF flow steering (block, redirect, "
		"source rewrite)";
	static const char remedy[] = "run as root / with CAP_BPF+CAP_NET_ADMIN "
		"on a kernel with CONFIG_BPF_SYSCALL=y";
	int map, prog;

	map = bpf_map_create(BPF_MAP_TYPE_HASH, "xo_probe", 4, 4, 1, NULL);
	if (map < 0) {
		res_not(r, XO_PROBE_MISSING, disables, remedy,
			"bpf(BPF_MAP_CREATE): %s", strerror(-map));
		return;
	}
	close(map);
	prog = trivial_prog(BPF_PROG_TYPE_SOCKET_FILTER, 0, "xo_probe_sk");
	if (prog < 0) {
		res_not(r, XO_PROBE_MISSING, disables, remedy, "%s",
			xo_last_error());
		return;
	}
	close(prog);
	res_ok(r, "bpf() creates maps and loads programs");
}

static void probe_bpffs(struct xo_probe_result *r)
{
	static const char disables[] = "pinned steering maps shared between "
		"processes";
	static const char remedy[] = "mount -t bpf bpf /sys/fs/bpf (xo mounts "
		"its own pin directory when it can)";
	char points[256] = "";
	struct mntent *m;
	size_t len = 0;
	FILE *f;

	f = setmntent("/proc/self/mounts", "re");
	if (!f) {
		xo_fail_sys("open /proc/self/mounts");
		res_not(r, XO_PROBE_UNKNOWN, disables, "check /proc is mounted",
			"cannot read the mount table: %s", xo_last_error());
		return;
	}
	while ((m = getmntent(f)))
		if (!strcmp(m->mnt_type, "bpf") && len < sizeof(points))
			len += (size_t)snprintf(points + len,
						sizeof(points) - len, "%s%s",
						len ? ", " : "", m->mnt_dir);
	endmntent(f);
	if (len)
		res_ok(r, "mounted at %s", points);
	else
		res_not(r, XO_PROBE_MISSING, disables, remedy,
			"no bpf filesystem mounted");
}

static void probe_clsact(struct xo_probe_result *r)
{
	static const char disables[] = "tc-attached steering programs";
	LIBBPF_OPTS(bpf_tc_hook, hook, .attach_point = BPF_TC_INGRESS);
	LIBBPF_OPTS(bpf_tc_opts, opts, .handle = 1, .priority = 1);
	int saved, prog = -1, ret, created = 0;

	if (private_netns_enter(&saved)) {
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
			"no private network namespace to probe in: %s",
			xo_last_error());
		return;
	}
	hook.ifindex = (int)if_nametoindex("lo");
	if (!hook.ifindex) {
		xo_fail_sys("if_nametoindex(lo) in the probe namespace");
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT, "%s",
			xo_last_error());
		goto out;
	}
	ret = bpf_tc_hook_create(&hook);
	if (ret) {
		xo_fail_bpf(ret, "create a clsact qdisc on lo");
		res_not(r, refused_status(-ret), disables, "a kernel with "
			"CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF", "%s",
			xo_last_error());
		goto out;
	}
	created = 1;
	prog = trivial_prog(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK, "xo_probe_tc");
	if (prog < 0) {
		res_not(r, XO_PROBE_UNKNOWN, disables, "see the BPF line",
			"clsact attaches, but cls_bpf is untested: %s",
			xo_last_error());
		goto out;
	}
	opts.prog_fd = prog;
	ret = bpf_tc_attach(&hook, &opts);
	if (ret) {
		xo_fail_bpf(ret, "attach a cls_bpf program to clsact on lo");
		res_not(r, refused_status(-ret), disables, "a kernel with "
			"CONFIG_NET_CLS_BPF", "clsact attaches, cls_bpf does "
			"not: %s", xo_last_error());
		goto out;
	}
	res_ok(r, "clsact qdisc attaches, a cls_bpf program attaches to it");
out:
	if (prog >= 0)
		close(prog);
	/* Also removes the filter; the namespace goes away regardless. */
	hook.attach_point = BPF_TC_INGRESS | BPF_TC_EGRESS;
	if (created) {
		ret = bpf_tc_hook_destroy(&hook);
		if (ret)
			note_cleanup(r, -ret, "delete the clsact qdisc");
	}
	xo_netns_leave(saved);
}

/* Attach prog in mode on ifindex, confirm the kernel reports it there,
 * detach. 0 or a negative errno. */
static int xdp_try(int ifindex, int prog, uint32_t mode)
{
	uint32_t id = 0;
	int ret;

	ret = bpf_xdp_attach(ifindex, prog, mode, NULL);
	if (ret)
		return ret;
	ret = bpf_xdp_query_id(ifindex, (int)mode, &id);
	if (!ret && !id)
		ret = -ENOENT; /* accepted but not there: not working */
	if (bpf_xdp_detach(ifindex, mode, NULL) && !ret)
		ret = -EBUSY; /* attached but cannot be taken off: unusable */
	return ret;
}

static void probe_xdp(struct xo_probe_result *r)
{
	static const char disables[] = "the XDP redirect path (the tc path "
		"still works)";
	char a[IFNAMSIZ], b[IFNAMSIZ], veth_err[256] = "";
	int saved, prog = -1, ifindex = 0, ret, have_veth = 0;

	if (private_netns_enter(&saved)) {
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
			"no private network namespace to probe in: %s",
			xo_last_error());
		return;
	}
	snprintf(a, sizeof(a), "xo-pr%u-a", (unsigned int)getpid() % 10000000);
	snprintf(b, sizeof(b), "xo-pr%u-b", (unsigned int)getpid() % 10000000);
	if (!veth_create(a, b)) {
		have_veth = 1;
		ifindex = (int)if_nametoindex(a);
		if (!ifindex) {
			xo_fail_sys("if_nametoindex(%s)", a);
			res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
				"%s", xo_last_error());
			goto out;
		}
	} else {
		/* No veth driver: generic XDP works on any device. */
		snprintf(veth_err, sizeof(veth_err), "%s", xo_last_error());
		ifindex = (int)if_nametoindex("lo");
		if (!ifindex) {
			xo_fail_sys("if_nametoindex(lo)");
			res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
				"no device to test on: %s; %s", veth_err,
				xo_last_error());
			goto out;
		}
	}
	prog = trivial_prog(BPF_PROG_TYPE_XDP, XDP_PASS, "xo_probe_xdp");
	if (prog < 0) {
		res_not(r, refused_status(xo_last_errno()), disables,
			"a kernel with CONFIG_BPF_SYSCALL and XDP", "%s",
			xo_last_error());
		goto out;
	}
	xo_libbpf_reset();
	ret = xdp_try(ifindex, prog, XDP_FLAGS_SKB_MODE);
	if (ret) {
		xo_fail_bpf(ret, "attach an XDP program in generic mode to %s",
			    have_veth ? a : "lo");
		res_not(r, refused_status(-ret), disables, "use the tc "
			"redirect path, or a kernel with XDP support",
			"%s", xo_last_error());
		goto out;
	}
	if (!have_veth) {
		res_ok(r, "available (generic XDP on lo; no veth to test "
		       "native mode: %s)", veth_err);
		goto out;
	}
	ret = xdp_try(ifindex, prog, XDP_FLAGS_DRV_MODE);
	if (ret)
		res_ok(r, "available (generic XDP; veth native XDP refused: "
		       "%s)", strerror(-ret));
	else
		res_ok(r, "available (veth native XDP)");
out:
	if (prog >= 0)
		close(prog);
	if (have_veth && ifindex && link_delete(ifindex, a))
		note_cleanup(r, xo_last_errno() ? xo_last_errno() : EIO,
			     "delete the veth pair");
	xo_netns_leave(saved);
}

static void probe_ktls(struct xo_probe_result *r)
{
	static const char disables[] = "moving TLS connections with kernel "
		"TLS state (TLS sessions need the user-space record layer "
		"instead)";
	int fds[2];

	if (loopback_pair(fds)) {
		res_not(r, XO_PROBE_UNKNOWN, disables, "look at the loopback "
			"interface (lo up, 127.0.0.1)", "no loopback connection "
			"to test on: %s", xo_last_error());
		return;
	}
	if (setsockopt(fds[0], IPPROTO_TCP, TCP_ULP, "tls", 3) < 0) {
		int err = errno;

		if (err == ENOENT || err == EOPNOTSUPP)
			res_not(r, XO_PROBE_MISSING, disables, "a kernel with "
				"CONFIG_TLS (modprobe tls), or the full-kernel "
				"VM lane", "setsockopt(TCP_ULP, \"tls\"): %s",
				strerror(err));
		else
			res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
				"setsockopt(TCP_ULP, \"tls\") failed in an "
				"unexpected way: %s (errno %d)", strerror(err),
				err);
	} else {
		res_ok(r, "the tls ULP attaches");
	}
	close_pair(fds);
}

/* The flower backend's own probe (xo_hw_flower_create), on lo of a
 * private namespace, software only: does this kernel have the parts? */
static void probe_flower(struct xo_probe_result *r)
{
	static const char disables[] = "the hardware rule tier (NIC offload "
		"of redirect rules); the eBPF software tier carries every "
		"rule";
	struct xo_flower_opts opts = {
		.size = sizeof(opts), .mode = XO_FLOWER_SKIP_HW,
	};
	struct xo_hw_backend *hw = NULL;
	int saved, ifindex, ret;

	if (private_netns_enter(&saved)) {
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
			"no private network namespace to probe in: %s",
			xo_last_error());
		return;
	}
	ifindex = (int)if_nametoindex("lo");
	if (!ifindex) {
		xo_fail_sys("if_nametoindex(lo) in the probe namespace");
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT, "%s",
			xo_last_error());
		goto out;
	}
	ret = xo_hw_flower_create(ifindex, &opts, &hw);
	if (ret == XO_E_UNSUPPORTED)
		res_not(r, XO_PROBE_MISSING, disables, "nothing for virtual "
			"NICs; for offload use a kernel with "
			"CONFIG_NET_CLS_FLOWER, CONFIG_NET_ACT_PEDIT, "
			"CONFIG_NET_ACT_CSUM", "%s", xo_last_error());
	else if (ret)
		res_not(r, XO_PROBE_UNKNOWN, disables, NEED_ROOT,
			"the flower probe could not run: %s", xo_last_error());
	else
		res_ok(r, "a flower filter with pedit+csum+mirred installs");
	if (hw)
		xo_hw_backend_destroy(hw);
out:
	xo_netns_leave(saved);
}

static const struct {
	const char *name;
	void (*run)(struct xo_probe_result *r);
} probes[XO_PROBE_COUNT] = {
	[XO_PROBE_TCP_REPAIR] = { "TCP_REPAIR", probe_tcp_repair },
	[XO_PROBE_BPF] = { "BPF", probe_bpf },
	[XO_PROBE_BPFFS] = { "bpffs", probe_bpffs },
	[XO_PROBE_CLSACT] = { "clsact + cls_bpf", probe_clsact },
	[XO_PROBE_XDP] = { "XDP", probe_xdp },
	[XO_PROBE_KTLS] = { "kernel TLS", probe_ktls },
	[XO_PROBE_FLOWER] = { "tc-flower + pedit/csum/mirred", probe_flower },
};

int xo_probe_run(uint32_t id, struct xo_probe_result *res)
{
	xo_clear_error();
	if (!res)
		return xo_fail(XO_E_INVAL, "xo_probe_run: res is NULL");
	if (id >= XO_PROBE_COUNT)
		return xo_fail(XO_E_INVAL, "xo_probe_run: probe %u unknown "
			       "(%d probes)", id, XO_PROBE_COUNT);
	memset(res, 0, sizeof(*res));
	snprintf(res->name, sizeof(res->name), "%s", probes[id].name);
	probes[id].run(res);
	return 0;
}
