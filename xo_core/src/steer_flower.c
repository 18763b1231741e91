// SPDX-License-Identifier: MIT
/*
 * Hardware backend: tc-flower filters over raw rtnetlink (libmnl).
 *
 * One filter per flow on the interface's clsact qdisc, matching the
 * 4-tuple, with the actions the NIC drivers know how to offload:
 *
 *   block        gact drop
 *   redirect     pedit (eth dst+src, ip dst, tcp dport) | csum ip+tcp |
 *                mirred egress redirect
 *   src rewrite  pedit (ip src, tcp sport) | csum ip+tcp   (on egress)
 *
 * skip_sw is set when the probe showed the NIC accepts such filters, so
 * the filter lives in hardware only and the eBPF program (later in the
 * chain, XO_TC_PRIORITY) handles what the NIC did not. pyroute2 cannot
 * encode flower/pedit/csum, and one `tc` process per rule costs
 * milliseconds, hence netlink from C.
 *
 * Filters sit at two priorities: base (IPv4) and base+1 (IPv6), on
 * ingress and on egress; tc requires one protocol per priority. Handles
 * are ours (a counter), so a filter is deleted by (parent, priority,
 * protocol, handle) without a dump. Those priorities belong to the
 * backend: at creation it removes whatever filters sit there, which is
 * what a killed predecessor left (see fl_purge).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/netlink.h>
#include <linux/pkt_cls.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <linux/tc_act/tc_csum.h>
#include <linux/tc_act/tc_gact.h>
#include <linux/tc_act/tc_mirred.h>
#include <linux/tc_act/tc_pedit.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libmnl/libmnl.h>

#include "steer_internal.h"

#ifndef SOL_NETLINK
#define SOL_NETLINK 270
#endif

#define FL_MAX_KEYS 16
/* Probe filters use handles from here; flows get 1 .. below it. */
#define FL_PROBE_HANDLE 0xffffff00u
#define FL_BUF 16384 /* MNL_SOCKET_BUFFER_SIZE is not a constant */

/* What a kernel must have for this backend; quoted in error sentences. */
#define FL_NEEDS "CONFIG_NET_CLS_FLOWER, CONFIG_NET_ACT_PEDIT, " \
	"CONFIG_NET_ACT_CSUM, CONFIG_NET_ACT_MIRRED and CONFIG_NET_ACT_GACT"
#define FL_ADVICE "use hardware backend 'none' (eBPF only) on this " \
	"machine, or a kernel built with them"

struct flower {
	struct mnl_socket *nl;
	int ifindex;
	uint32_t prio;        /* base priority */
	uint32_t flags;       /* TCA_CLS_FLAGS_* for ingress filters */
	uint32_t seq;
	uint32_t portid;
	uint32_t next_handle;
	int created_clsact;   /* by the probe: undone if creation fails */
	char extack[256];     /* the kernel's own words on the last error */
	uint8_t buf[FL_BUF];
};

/* Cookie layout: handle | v6 << 32 | egress << 33 | 1 << 40 (never 0). */
static uint64_t mk_cookie(uint32_t handle, int v6, int egress)
{
	return handle | (uint64_t)v6 << 32 | (uint64_t)egress << 33 |
	       1ull << 40;
}

static uint32_t parent_of(int egress)
{
	return TC_H_MAKE(TC_H_CLSACT,
			 egress ? TC_H_MIN_EGRESS : TC_H_MIN_INGRESS);
}

static uint16_t eth_proto(int v6)
{
	return htons(v6 ? ETH_P_IPV6 : ETH_P_IP);
}

static int ext_ack_cb(const struct nlattr *attr, void *data)
{
	struct flower *f = data;

	if (mnl_attr_get_type(attr) == NLMSGERR_ATTR_MSG &&
	    mnl_attr_validate(attr, MNL_TYPE_NUL_STRING) >= 0)
		snprintf(f->extack, sizeof(f->extack), "%s",
			 mnl_attr_get_str(attr));
	return MNL_CB_OK;
}

/*
 * Send one request and wait for its ACK. Returns 0, or -errno as the
 * kernel answered (f->extack then holds its message, if any); a local
 * socket failure is reported with xo_fail_sys and returned as XO_E_*.
 */
static int fl_talk(struct flower *f, struct nlmsghdr *nlh)
{
	ssize_t n;

	f->extack[0] = '\0';
	nlh->nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	nlh->nlmsg_seq = ++f->seq;
	if (mnl_socket_sendto(f->nl, nlh, nlh->nlmsg_len) < 0)
		return xo_fail_sys("send rtnetlink request");
	for (;;) {
		struct nlmsghdr *h;
		int len;

		n = mnl_socket_recvfrom(f->nl, f->buf, sizeof(f->buf));
		if (n < 0)
			return xo_fail_sys("receive rtnetlink answer");
		/* mnl_nlmsg_next() counts down an int, not our ssize_t. */
		len = (int)n;
		for (h = (struct nlmsghdr *)f->buf; mnl_nlmsg_ok(h, len);
		     h = mnl_nlmsg_next(h, &len)) {
			struct nlmsgerr *e;
			size_t off;

			if (h->nlmsg_seq != f->seq)
				continue; /* a late answer to an old request */
			if (h->nlmsg_type != NLMSG_ERROR)
				continue;
			e = mnl_nlmsg_get_payload(h);
			if (!e->error)
				return 0;
			if (h->nlmsg_flags & NLM_F_ACK_TLVS) {
				off = sizeof(*e);
				if (!(h->nlmsg_flags & NLM_F_CAPPED))
					off += e->msg.nlmsg_len -
					       sizeof(struct nlmsghdr);
				if (MNL_NLMSG_HDRLEN + off < h->nlmsg_len)
					mnl_attr_parse_payload(
						(char *)e + off,
						h->nlmsg_len - MNL_NLMSG_HDRLEN -
							off,
						ext_ack_cb, f);
			}
			return e->error;
		}
	}
}

static const char *fl_kernel_says(struct flower *f)
{
	static __thread char s[300];

	if (!f->extack[0])
		return "";
	snprintf(s, sizeof(s), " (kernel: %s)", f->extack);
	return s;
}

static struct nlmsghdr *fl_filter_msg(struct flower *f, uint8_t *buf,
				      int type, uint16_t flags, int egress,
				      int v6, uint32_t handle)
{
	struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
	struct tcmsg *tcm;

	nlh->nlmsg_type = type;
	nlh->nlmsg_flags = flags;
	tcm = mnl_nlmsg_put_extra_header(nlh, sizeof(*tcm));
	tcm->tcm_family = AF_UNSPEC;
	tcm->tcm_ifindex = f->ifindex;
	tcm->tcm_parent = parent_of(egress);
	tcm->tcm_handle = handle;
	tcm->tcm_info = TC_H_MAKE((f->prio + (uint32_t)v6) << 16,
				  eth_proto(v6));
	mnl_attr_put_strz(nlh, TCA_KIND, "flower");
	return nlh;
}

static void fl_put_match(struct nlmsghdr *nlh, const struct xo_flow_key *k)
{
	static const uint8_t ones[16] = {
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	};
	int v6 = k->family == XO_AF_INET6;

	mnl_attr_put_u16(nlh, TCA_FLOWER_KEY_ETH_TYPE, eth_proto(v6));
	mnl_attr_put_u8(nlh, TCA_FLOWER_KEY_IP_PROTO, IPPROTO_TCP);
	if (v6) {
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV6_SRC, 16, k->src_addr);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV6_SRC_MASK, 16, ones);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV6_DST, 16, k->dst_addr);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV6_DST_MASK, 16, ones);
	} else {
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV4_SRC, 4, k->src_addr);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV4_SRC_MASK, 4, ones);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV4_DST, 4, k->dst_addr);
		mnl_attr_put(nlh, TCA_FLOWER_KEY_IPV4_DST_MASK, 4, ones);
	}
	mnl_attr_put_u16(nlh, TCA_FLOWER_KEY_TCP_SRC, k->src_port);
	mnl_attr_put_u16(nlh, TCA_FLOWER_KEY_TCP_SRC_MASK, 0xffff);
	mnl_attr_put_u16(nlh, TCA_FLOWER_KEY_TCP_DST, k->dst_port);
	mnl_attr_put_u16(nlh, TCA_FLOWER_KEY_TCP_DST_MASK, 0xffff);
}

/* ---- pedit: byte ranges of a header, as aligned 32-bit mask/value keys */

struct pedit {
	uint32_t n;
	struct {
		uint16_t htype;
		uint32_t off;      /* 4-aligned, from the header's start */
		uint8_t keep[4];   /* 0xff where the packet byte stays */
		uint8_t val[4];
	} k[FL_MAX_KEYS];
};

static void pedit_set(struct pedit *p, uint16_t htype, uint32_t off,
		      const uint8_t *bytes, uint32_t len)
{
	for (uint32_t pos = off; pos < off + len; pos++) {
		uint32_t w = pos & ~3u, i;

		for (i = 0; i < p->n; i++)
			if (p->k[i].htype == htype && p->k[i].off == w)
				break;
		if (i == p->n) {
			if (p->n == FL_MAX_KEYS)
				return; /* cannot happen with our callers */
			p->n++;
			p->k[i].htype = htype;
			p->k[i].off = w;
			memset(p->k[i].keep, 0xff, 4);
			memset(p->k[i].val, 0, 4);
		}
		p->k[i].keep[pos - w] = 0;
		p->k[i].val[pos - w] = bytes[pos - off];
	}
}

static int nonzero(const uint8_t *b, size_t n)
{
	while (n--)
		if (*b++)
			return 1;
	return 0;
}

static struct nlattr *act_start(struct nlmsghdr *nlh, int *order,
				const char *kind)
{
	struct nlattr *a = mnl_attr_nest_start(nlh, (uint16_t)(*order)++);

	mnl_attr_put_strz(nlh, TCA_ACT_KIND, kind);
	return a;
}

static void put_pedit(struct nlmsghdr *nlh, int *order, const struct pedit *p)
{
	uint8_t sel_buf[sizeof(struct tc_pedit_sel) +
			FL_MAX_KEYS * sizeof(struct tc_pedit_key)];
	struct tc_pedit_sel *sel = (struct tc_pedit_sel *)sel_buf;
	struct nlattr *a, *opts, *exs;

	memset(sel_buf, 0, sizeof(sel_buf));
	sel->action = TC_ACT_PIPE;
	sel->nkeys = (unsigned char)p->n;
	for (uint32_t i = 0; i < p->n; i++) {
		/* act_pedit does *word = (*word & mask) ^ val. */
		memcpy(&sel->keys[i].mask, p->k[i].keep, 4);
		memcpy(&sel->keys[i].val, p->k[i].val, 4);
		sel->keys[i].off = p->k[i].off;
	}
	a = act_start(nlh, order, "pedit");
	opts = mnl_attr_nest_start(nlh, TCA_ACT_OPTIONS);
	mnl_attr_put(nlh, TCA_PEDIT_PARMS_EX,
		     sizeof(*sel) + p->n * sizeof(struct tc_pedit_key), sel);
	exs = mnl_attr_nest_start(nlh, TCA_PEDIT_KEYS_EX);
	for (uint32_t i = 0; i < p->n; i++) {
		struct nlattr *ex = mnl_attr_nest_start(nlh, TCA_PEDIT_KEY_EX);

		mnl_attr_put_u16(nlh, TCA_PEDIT_KEY_EX_HTYPE, p->k[i].htype);
		mnl_attr_put_u16(nlh, TCA_PEDIT_KEY_EX_CMD,
				 TCA_PEDIT_KEY_EX_CMD_SET);
		mnl_attr_nest_end(nlh, ex);
	}
	mnl_attr_nest_end(nlh, exs);
	mnl_attr_nest_end(nlh, opts);
	mnl_attr_nest_end(nlh, a);
}

/* An action whose options are one fixed-size parameter block. */
static void put_simple_act(struct nlmsghdr *nlh, int *order, const char *kind,
			   uint16_t parms_type, const void *parms, size_t len)
{
	struct nlattr *a, *opts;

	a = act_start(nlh, order, kind);
	opts = mnl_attr_nest_start(nlh, TCA_ACT_OPTIONS);
	mnl_attr_put(nlh, parms_type, len, parms);
	mnl_attr_nest_end(nlh, opts);
	mnl_attr_nest_end(nlh, a);
}

static void put_csum(struct nlmsghdr *nlh, int *order, int v6, int verdict)
{
	struct tc_csum c;

	memset(&c, 0, sizeof(c));
	c.action = verdict;
	/* IPv6 has no header checksum; TCP covers both (pseudo header). */
	c.update_flags = TCA_CSUM_UPDATE_FLAG_TCP |
			 (v6 ? 0 : TCA_CSUM_UPDATE_FLAG_IPV4HDR);
	put_simple_act(nlh, order, "csum", TCA_CSUM_PARMS, &c, sizeof(c));
}

static void put_mirred(struct nlmsghdr *nlh, int *order, uint32_t ifindex)
{
	struct tc_mirred m;

	memset(&m, 0, sizeof(m));
	m.action = TC_ACT_STOLEN;
	m.eaction = TCA_EGRESS_REDIR;
	m.ifindex = ifindex;
	put_simple_act(nlh, order, "mirred", TCA_MIRRED_PARMS, &m, sizeof(m));
}

static void put_gact(struct nlmsghdr *nlh, int *order, int verdict)
{
	struct tc_gact g;

	memset(&g, 0, sizeof(g));
	g.action = verdict;
	put_simple_act(nlh, order, "gact", TCA_GACT_PARMS, &g, sizeof(g));
}

/* Rewrite an address field (all-zero: leave it), at its offset in the
 * IPv4 or the IPv6 header. */
static void pedit_set_addr(struct pedit *p, int v6, const uint8_t *addr,
			   int off4, int off6)
{
	if (!nonzero(addr, v6 ? 16 : 4))
		return;
	if (v6)
		pedit_set(p, TCA_PEDIT_KEY_EX_HDR_TYPE_IP6, off6, addr, 16);
	else
		pedit_set(p, TCA_PEDIT_KEY_EX_HDR_TYPE_IP4, off4, addr, 4);
}

static void fl_put_actions(struct flower *f, struct nlmsghdr *nlh,
			   const struct xo_flow_key *k,
			   const struct xo_steer_action *a)
{
	int v6 = k->family == XO_AF_INET6, order = 1;
	struct nlattr *acts = mnl_attr_nest_start(nlh, TCA_FLOWER_ACT);
	struct pedit p = { 0 };

	switch (a->kind) {
	case XO_STEER_BLOCK:
		put_gact(nlh, &order, TC_ACT_SHOT);
		break;
	case XO_STEER_REDIRECT:
		if (nonzero(a->dst_mac, 6))
			pedit_set(&p, TCA_PEDIT_KEY_EX_HDR_TYPE_ETH, 0,
				  a->dst_mac, 6);
		if (nonzero(a->src_mac, 6))
			pedit_set(&p, TCA_PEDIT_KEY_EX_HDR_TYPE_ETH, 6,
				  a->src_mac, 6);
		/* Destination address: IPv4 offset 16, IPv6 offset 24. */
		pedit_set_addr(&p, v6, a->new_dst_addr, 16, 24);
		if (a->new_dst_port)
			pedit_set(&p, TCA_PEDIT_KEY_EX_HDR_TYPE_TCP, 2,
				  (const uint8_t *)&a->new_dst_port, 2);
		put_pedit(nlh, &order, &p);
		put_csum(nlh, &order, v6, TC_ACT_PIPE);
		put_mirred(nlh, &order, a->ifindex ? a->ifindex :
			   (uint32_t)f->ifindex);
		break;
	case XO_STEER_SRC_REWRITE:
		/* Source address: IPv4 offset 12, IPv6 offset 8. */
		pedit_set_addr(&p, v6, a->new_src_addr, 12, 8);
		if (a->new_src_port)
			pedit_set(&p, TCA_PEDIT_KEY_EX_HDR_TYPE_TCP, 0,
				  (const uint8_t *)&a->new_src_port, 2);
		put_pedit(nlh, &order, &p);
		put_csum(nlh, &order, v6, TC_ACT_OK);
		break;
	}
	mnl_attr_nest_end(nlh, acts);
}

/* Create or replace one flow's filter. */
static int fl_send_filter(struct flower *f, const struct xo_flow_key *k,
			  const struct xo_steer_action *a, uint32_t handle,
			  int replace, uint32_t flags)
{
	int v6 = k->family == XO_AF_INET6;
	int egress = a->kind == XO_STEER_SRC_REWRITE;
	uint8_t buf[FL_BUF];
	struct nlmsghdr *nlh;
	struct nlattr *opts;

	nlh = fl_filter_msg(f, buf, RTM_NEWTFILTER,
			    NLM_F_CREATE | (replace ? NLM_F_REPLACE :
						      NLM_F_EXCL),
			    egress, v6, handle);
	opts = mnl_attr_nest_start(nlh, TCA_OPTIONS);
	fl_put_match(nlh, k);
	if (flags)
		mnl_attr_put_u32(nlh, TCA_FLOWER_FLAGS, flags);
	fl_put_actions(f, nlh, k, a);
	mnl_attr_nest_end(nlh, opts);
	return fl_talk(f, nlh);
}

static int fl_delete(struct flower *f, uint32_t handle, int v6, int egress)
{
	uint8_t buf[FL_BUF];
	struct nlmsghdr *nlh = fl_filter_msg(f, buf, RTM_DELTFILTER, 0,
					     egress, v6, handle);

	return fl_talk(f, nlh);
}

/*
 * TCA_FLOWER_FLAGS for a filter. Egress (the source rewrite) never gets
 * skip_sw: NICs do not offload clsact egress, so it must run in software.
 * skip_hw is honoured on both sides: "software only" means all filters.
 */
static uint32_t fl_flags(const struct flower *f, int egress)
{
	return egress ? f->flags & TCA_CLS_FLAGS_SKIP_HW : f->flags;
}

#define FL_HANDLE_TRIES 4

static uint32_t fl_next_handle(struct flower *f)
{
	uint32_t h = f->next_handle++;

	if (f->next_handle >= FL_PROBE_HANDLE)
		f->next_handle = 1;
	return h;
}

static int fl_insert(void *priv, const struct xo_flow_key *k,
		     const struct xo_steer_action *a, uint64_t *cookie)
{
	struct flower *f = priv;
	int v6 = k->family == XO_AF_INET6;
	int egress = a->kind == XO_STEER_SRC_REWRITE;
	uint64_t want = mk_cookie(0, v6, egress);
	uint32_t handle;
	int ret;

	if (*cookie && (*cookie & ~0xffffffffull) == want) {
		/* Same filter slot: replace in place, no gap in hardware. */
		handle = (uint32_t)*cookie;
		ret = fl_send_filter(f, k, a, handle, 1,
				     fl_flags(f, egress));
	} else {
		if (*cookie) {
			/* The action moved to the other direction: a new
			 * filter, then the old one goes. */
			ret = fl_delete(f, (uint32_t)*cookie,
					(*cookie >> 32) & 1,
					(*cookie >> 33) & 1);
			if (ret && ret != -ENOENT) {
				errno = -ret;
				return xo_fail_sys("flower: delete filter "
						   "%#x on ifindex %d%s",
						   (uint32_t)*cookie,
						   f->ifindex,
						   fl_kernel_says(f));
			}
		}
		/* A handle still taken (the counter wrapped onto a filter
		 * that lives on) is skipped. The same key at the same
		 * priority is EEXIST too, and stays so: give up then. */
		for (int tries = 0; tries < FL_HANDLE_TRIES; tries++) {
			handle = fl_next_handle(f);
			ret = fl_send_filter(f, k, a, handle, 0,
					     fl_flags(f, egress));
			if (ret != -EEXIST)
				break;
		}
	}
	if (ret < 0 && ret > -4096) {
		errno = -ret;
		return xo_fail_sys("flower: install %s filter %#x on "
				   "ifindex %d%s",
				   a->kind == XO_STEER_BLOCK ? "block" :
				   a->kind == XO_STEER_REDIRECT ? "redirect" :
				   "source-rewrite", handle, f->ifindex,
				   fl_kernel_says(f));
	}
	if (ret)
		return ret;
	*cookie = mk_cookie(handle, v6, egress);
	return 0;
}

static int fl_remove(void *priv, const struct xo_flow_key *k, uint64_t cookie)
{
	struct flower *f = priv;
	int ret;

	(void)k;
	ret = fl_delete(f, (uint32_t)cookie, (cookie >> 32) & 1,
			(cookie >> 33) & 1);
	if (ret == -ENOENT)
		return xo_fail(XO_E_NOTFOUND, "flower: filter %#x is gone",
			       (uint32_t)cookie);
	if (ret < 0 && ret > -4096) {
		errno = -ret;
		return xo_fail_sys("flower: delete filter %#x on ifindex %d%s",
				   (uint32_t)cookie, f->ifindex,
				   fl_kernel_says(f));
	}
	return ret;
}

/* Undo the clsact qdisc the probe created on an interface that turned
 * out unusable, so a failed probe leaves the interface as it was. */
static void fl_remove_clsact(struct flower *f)
{
	uint8_t buf[512];
	struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
	struct tcmsg *tcm;

	nlh->nlmsg_type = RTM_DELQDISC;
	tcm = mnl_nlmsg_put_extra_header(nlh, sizeof(*tcm));
	tcm->tcm_family = AF_UNSPEC;
	tcm->tcm_ifindex = f->ifindex;
	tcm->tcm_parent = TC_H_CLSACT;
	tcm->tcm_handle = TC_H_MAKE(TC_H_CLSACT, 0);
	mnl_attr_put_strz(nlh, TCA_KIND, "clsact");
	fl_talk(f, nlh);
}

static void fl_destroy(void *priv)
{
	struct flower *f = priv;

	if (f->nl)
		mnl_socket_close(f->nl);
	free(f);
}

static const struct xo_hw_ops flower_ops = {
	.name = "flower",
	.insert = fl_insert,
	.remove = fl_remove,
	.destroy = fl_destroy,
};

/* clsact on the interface: flower filters hang off its ingress/egress. */
static int fl_ensure_clsact(struct flower *f)
{
	uint8_t buf[512];
	struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
	struct tcmsg *tcm;
	int ret;

	nlh->nlmsg_type = RTM_NEWQDISC;
	nlh->nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL;
	tcm = mnl_nlmsg_put_extra_header(nlh, sizeof(*tcm));
	tcm->tcm_family = AF_UNSPEC;
	tcm->tcm_ifindex = f->ifindex;
	tcm->tcm_parent = TC_H_CLSACT;
	tcm->tcm_handle = TC_H_MAKE(TC_H_CLSACT, 0);
	mnl_attr_put_strz(nlh, TCA_KIND, "clsact");
	ret = fl_talk(f, nlh);
	if (ret == 0)
		f->created_clsact = 1;
	if (ret == -EEXIST || ret == 0)
		return 0;
	if (ret > -4096 && ret < 0) {
		errno = -ret;
		if (ret == -ENOENT || ret == -EOPNOTSUPP)
			return xo_fail(XO_E_UNSUPPORTED, "flower backend: the "
				       "kernel has no clsact qdisc "
				       "(CONFIG_NET_SCH_INGRESS)%s; %s",
				       fl_kernel_says(f), FL_ADVICE);
		return xo_fail_sys("flower: create clsact qdisc on ifindex "
				   "%d%s", f->ifindex, fl_kernel_says(f));
	}
	return ret;
}

/*
 * Remove every filter at our priorities, on ingress and egress: what a
 * manager that died without xo_rules_destroy() (SIGKILL, a crash) left.
 * Nobody would ever remove those, they would keep steering flows the new
 * manager knows nothing about, and their handles and keys would collide
 * with the ones it installs. The priority pair is the backend's: one
 * manager per interface and priority (give a second one its own).
 * Deleting a (parent, priority) with handle 0 and any protocol drops the
 * whole filter list there in one request.
 */
static int fl_purge(struct flower *f)
{
	for (int egress = 0; egress < 2; egress++) {
		for (uint32_t p = f->prio; p <= f->prio + 1; p++) {
			uint8_t buf[512];
			struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
			struct tcmsg *tcm;
			int ret;

			nlh->nlmsg_type = RTM_DELTFILTER;
			tcm = mnl_nlmsg_put_extra_header(nlh, sizeof(*tcm));
			tcm->tcm_family = AF_UNSPEC;
			tcm->tcm_ifindex = f->ifindex;
			tcm->tcm_parent = parent_of(egress);
			tcm->tcm_info = TC_H_MAKE(p << 16, 0);
			ret = fl_talk(f, nlh);
			if (ret == 0 || ret == -ENOENT)
				continue; /* removed, or nothing there */
			if (ret < 0 && ret > -4096) {
				errno = -ret;
				return xo_fail_sys("flower: remove stale filters at "
						   "%s priority %u on ifindex %d%s",
						   egress ? "egress" : "ingress",
						   p, f->ifindex, fl_kernel_says(f));
			}
			return ret;
		}
	}
	return 0;
}

/* Probe filters match TCP to port 0, which no connection uses. */
static const struct xo_flow_key probe_key = {
	.family = XO_AF_INET,
	.proto = XO_IPPROTO_TCP,
	.src_addr = { 198, 18, 255, 254 },
	.dst_addr = { 198, 18, 255, 253 },
};

/*
 * Install probe filters exercising each kernel part the backend needs,
 * one at a time, so the error can name the missing one. Returns 0, or
 * XO_E_UNSUPPORTED (with the sentence) when the kernel lacks a part.
 */
static int fl_probe(struct flower *f, uint32_t flags)
{
	static const struct {
		uint8_t kind;
		const char *what;
	} steps[] = {
		{ XO_STEER_BLOCK, "tc-flower with act_gact "
				  "(CONFIG_NET_CLS_FLOWER, CONFIG_NET_ACT_GACT)" },
		{ XO_STEER_REDIRECT, "act_pedit, act_csum and act_mirred "
				     "(CONFIG_NET_ACT_PEDIT, CONFIG_NET_ACT_CSUM, "
				     "CONFIG_NET_ACT_MIRRED)" },
	};
	struct xo_steer_action a;
	int ret = 0, created = 0;

	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		memset(&a, 0, sizeof(a));
		a.kind = steps[i].kind;
		a.expires_ns = 1;
		a.new_dst_port = htons(1);
		memcpy(a.new_dst_addr, (uint8_t[]){ 198, 18, 255, 252 }, 4);
		memcpy(a.dst_mac, (uint8_t[]){ 2, 0, 0, 0, 0, 1 }, 6);
		ret = fl_send_filter(f, &probe_key, &a, FL_PROBE_HANDLE,
				     created, flags);
		if (ret == -ENOENT || ret == -EOPNOTSUPP) {
			int err = -ret;

			if (created)
				fl_delete(f, FL_PROBE_HANDLE, 0, 0);
			return xo_fail(XO_E_UNSUPPORTED, "flower backend "
				       "unavailable on ifindex %d: the kernel "
				       "refused %s: %s (errno %d)%s. The "
				       "hardware tier needs %s; %s",
				       f->ifindex, steps[i].what,
				       strerror(err), err, fl_kernel_says(f),
				       FL_NEEDS, FL_ADVICE);
		}
		if (ret < 0 && ret > -4096) {
			errno = -ret;
			ret = xo_fail_sys("flower: probe filter on ifindex "
					  "%d%s", f->ifindex,
					  fl_kernel_says(f));
			break;
		}
		if (ret)
			break;
		created = 1;
	}
	if (created)
		fl_delete(f, FL_PROBE_HANDLE, 0, 0);
	return ret;
}

int xo_hw_flower_create(int ifindex, const struct xo_flower_opts *uopts,
			struct xo_hw_backend **out)
{
	struct xo_flower_opts o;
	struct flower *f;
	int saved = -1, ret, one = 1, offload_ok = 0;

	xo_clear_error();
	if (!out || ifindex <= 0)
		return xo_fail(XO_E_INVAL, "xo_hw_flower_create: bad ifindex "
			       "%d or out", ifindex);
	*out = NULL;
	memset(&o, 0, sizeof(o));
	if (uopts) {
		if (uopts->size < offsetof(struct xo_flower_opts, netns))
			return xo_fail(XO_E_INVAL, "xo_flower_opts.size unset");
		memcpy(&o, uopts,
		       uopts->size < sizeof(o) ? uopts->size : sizeof(o));
	}
	if (o.mode > XO_FLOWER_SKIP_HW)
		return xo_fail(XO_E_INVAL, "flower mode %u unknown", o.mode);
	if (!o.priority)
		o.priority = XO_FLOWER_PRIORITY;
	if (o.priority + 1 >= XO_TC_PRIORITY)
		return xo_fail(XO_E_INVAL, "flower priority %u must stay below "
			       "the eBPF program's (%u)", o.priority,
			       XO_TC_PRIORITY);
	f = calloc(1, sizeof(*f));
	if (!f)
		return xo_fail(XO_E_NOMEM, "xo_hw_flower_create: out of memory");
	f->ifindex = ifindex;
	f->prio = o.priority;
	f->next_handle = 1;
	f->seq = (uint32_t)time(NULL);

	/* The socket is bound to the namespace it is created in; after
	 * that this thread can go back. */
	ret = xo_netns_enter(o.netns, &saved);
	if (ret)
		goto fail;
	f->nl = mnl_socket_open(NETLINK_ROUTE);
	if (!f->nl) {
		ret = xo_fail_sys("flower: open rtnetlink socket");
		xo_netns_leave(saved);
		goto fail;
	}
	xo_netns_leave(saved);
	/* Errors come back short (CAP_ACK) but with the kernel's reason
	 * (EXT_ACK); both are optional, so failures are not fatal. */
	setsockopt(mnl_socket_get_fd(f->nl), SOL_NETLINK, NETLINK_CAP_ACK,
		   &one, sizeof(one));
	setsockopt(mnl_socket_get_fd(f->nl), SOL_NETLINK, NETLINK_EXT_ACK,
		   &one, sizeof(one));
	if (mnl_socket_bind(f->nl, 0, MNL_SOCKET_AUTOPID) < 0) {
		ret = xo_fail_sys("flower: bind rtnetlink socket");
		goto fail;
	}
	f->portid = mnl_socket_get_portid(f->nl);

	ret = fl_ensure_clsact(f);
	if (ret)
		goto fail;
	if (!f->created_clsact) {
		ret = fl_purge(f);
		if (ret)
			goto fail;
	}
	/* The features are probed in software (skip_hw): that works on any
	 * interface and tells "kernel lacks flower/pedit/csum" apart from
	 * "this NIC does not offload". */
	ret = fl_probe(f, TCA_CLS_FLAGS_SKIP_HW);
	if (ret)
		goto fail;
	switch (o.mode) {
	case XO_FLOWER_SKIP_HW:
		f->flags = TCA_CLS_FLAGS_SKIP_HW;
		break;
	case XO_FLOWER_SKIP_SW:
	case XO_FLOWER_AUTO: {
		struct xo_steer_action a = { .kind = XO_STEER_BLOCK,
					     .expires_ns = 1 };

		/* Same probe with skip_sw: accepted only if the NIC
		 * really holds the filter. */
		offload_ok = fl_send_filter(f, &probe_key, &a,
					    FL_PROBE_HANDLE + 1, 0,
					    TCA_CLS_FLAGS_SKIP_SW) == 0;
		if (offload_ok)
			fl_delete(f, FL_PROBE_HANDLE + 1, 0, 0);
		if (!offload_ok && o.mode == XO_FLOWER_SKIP_SW) {
			ret = xo_fail(XO_E_UNSUPPORTED, "flower backend: "
				      "ifindex %d does not offload flower "
				      "filters (skip_sw refused%s; is "
				      "hw-tc-offload on? `ethtool -K DEV "
				      "hw-tc-offload on`)", ifindex,
				      fl_kernel_says(f));
			goto fail;
		}
		/* No offload: a plain filter, which the kernel still
		 * offloads opportunistically. */
		f->flags = offload_ok ? TCA_CLS_FLAGS_SKIP_SW : 0;
		break;
	}
	}
	ret = xo_hw_backend_new(&flower_ops, f, out);
	if (ret)
		goto fail;
	return 0;

fail:
	if (f->created_clsact) {
		char keep[512];

		/* Keep the sentence that explains the failure. */
		snprintf(keep, sizeof(keep), "%s", xo_last_error());
		fl_remove_clsact(f);
		xo_fail(ret, "%s", keep);
	}
	fl_destroy(f);
	return ret;
}
