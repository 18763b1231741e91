// SPDX-License-Identifier: MIT
/*
 * Capture and restore of a live TCP connection with TCP_REPAIR.
 *
 * The field set follows what the kernel lets a repair-mode socket read and
 * write (CRIU's libsoccr uses the same kernel interface). Ordering rules the
 * kernel imposes, learned the hard way (docs/core.md, tests/test_tcp_repair.py):
 *  - SO_REUSEADDR must be set before entering repair, not after;
 *  - TCP_QUEUE_SEQ only before connect(), TCP_REPAIR_OPTIONS only after;
 *  - queue contents before TCP_REPAIR_WINDOW (it checks against rcv_nxt);
 *  - writes into the repair queues may be partial, so loop.
 */
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* From linux/tcp.h; glibc's netinet/tcp.h does not carry all of them. */
#ifndef TCP_REPAIR_WINDOW
#define TCP_REPAIR_WINDOW 29
#endif
#ifndef TCP_REPAIR_OFF_NO_WP
#define TCP_REPAIR_OFF_NO_WP -1
#endif
#define XO_TCP_REPAIR_ON 1
/* The most TCP_MAXSEG accepts (MAX_TCP_WINDOW); loopback clamps are larger. */
#define XO_MAXSEG_MAX 32767u

struct xo_repair_window {
	uint32_t snd_wl1;
	uint32_t snd_wnd;
	uint32_t max_window;
	uint32_t rcv_wnd;
	uint32_t rcv_wup;
};

/* TCP option kinds as TCP_REPAIR_OPTIONS expects them (RFC 793/7323/2018). */
enum { XO_TCPOPT_MSS = 2, XO_TCPOPT_WINDOW = 3, XO_TCPOPT_SACK_PERM = 4,
       XO_TCPOPT_TIMESTAMP = 8 };

unsigned int xo_last_syscalls(void)
{
	return xo_syscall_count;
}

static int set_int(int fd, int level, int opt, int val, const char *step)
{
	int ret;

	if (XO_SYSCALL(setsockopt(fd, level, opt, &val, sizeof(val))) < 0) {
		ret = xo_fail_sys("%s", step);
		if (ret == XO_E_PERM)
			xo_append_hint("TCP repair needs CAP_NET_ADMIN");
		return ret;
	}
	return 0;
}

static const char *tcp_state_name(unsigned int state)
{
	static const char *const names[] = {
		"?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1",
		"FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK",
		"LISTEN", "CLOSING", "NEW_SYN_RECV",
	};

	return state < sizeof(names) / sizeof(names[0]) ? names[state] : "?";
}

int xo_tcp_freeze(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int ret;

	xo_clear_error();
	xo_syscall_count = 0;
	ret = set_int(fd, SOL_TCP, TCP_REPAIR, XO_TCP_REPAIR_ON,
		      "freeze: setsockopt(TCP_REPAIR, on)");
	if (ret != XO_E_PERM)
		return ret;
	/* The kernel answers EPERM both without CAP_NET_ADMIN and for a
	 * socket in a state repair cannot handle: tell the two apart. */
	if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &len) == 0 &&
	    ti.tcpi_state != TCP_ESTABLISHED && ti.tcpi_state != TCP_CLOSE)
		return xo_fail(XO_E_NOT_ESTABLISHED,
			       "freeze: socket is in TCP state %s, only ESTABLISHED connections can move",
			       tcp_state_name(ti.tcpi_state));
	return ret;
}

static int get_endpoint(int fd, bool peer, struct xo_endpoint *ep)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	int ret;

	if (peer)
		ret = XO_SYSCALL(getpeername(fd, (struct sockaddr *)&ss, &len));
	else
		ret = XO_SYSCALL(getsockname(fd, (struct sockaddr *)&ss, &len));
	if (ret < 0)
		return xo_fail_sys("capture: %s", peer ? "getpeername" :
							 "getsockname");
	memset(ep, 0, sizeof(*ep));
	if (ss.ss_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

		ep->family = AF_INET;
		ep->port = ntohs(sin->sin_port);
		memcpy(ep->addr, &sin->sin_addr, 4);
	} else if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

		ep->family = AF_INET6;
		ep->port = ntohs(sin6->sin6_port);
		ep->scope_id = sin6->sin6_scope_id;
		memcpy(ep->addr, &sin6->sin6_addr, 16);
	} else {
		return xo_fail(XO_E_NOT_ESTABLISHED,
			       "capture: address family %d is not IPv4/IPv6",
			       ss.ss_family);
	}
	return 0;
}

static socklen_t to_sockaddr(const struct xo_endpoint *ep,
			     struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (ep->family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons(ep->port);
		memcpy(&sin->sin_addr, ep->addr, 4);
		return sizeof(*sin);
	}
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons(ep->port);
	sin6->sin6_scope_id = ep->scope_id;
	memcpy(&sin6->sin6_addr, ep->addr, 16);
	return sizeof(*sin6);
}

/* Select a repair queue and read its sequence number. */
static int queue_seq(int fd, int queue, uint32_t *seq, const char *name)
{
	socklen_t len = sizeof(*seq);
	int ret;

	ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, queue,
		      queue == TCP_SEND_QUEUE ?
			      "capture: setsockopt(TCP_REPAIR_QUEUE, send)" :
			      "capture: setsockopt(TCP_REPAIR_QUEUE, recv)");
	if (ret)
		return ret;
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_QUEUE_SEQ, seq, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_QUEUE_SEQ, %s)",
				   name);
	return 0;
}

/* Copy len bytes of the selected repair queue without consuming them. */
static int peek_queue(int fd, uint8_t **out, uint32_t len, const char *name)
{
	ssize_t got;

	*out = NULL;
	if (!len)
		return 0;
	*out = malloc(len);
	if (!*out)
		return xo_fail(XO_E_NOMEM, "capture: %u bytes for the %s queue",
			       len, name);
	got = XO_SYSCALL(recv(fd, *out, len, MSG_PEEK | MSG_DONTWAIT));
	if (got < 0)
		return xo_fail_sys("capture: recv(MSG_PEEK, %s queue)", name);
	if ((uint32_t)got != len)
		return xo_fail(XO_E_SYS,
			       "capture: %s queue gave %zd of %u bytes", name,
			       got, len);
	return 0;
}

static int ioctl_len(int fd, unsigned long req, uint32_t *val,
		     const char *step)
{
	int v;

	if (XO_SYSCALL(ioctl(fd, req, &v)) < 0)
		return xo_fail_sys("capture: ioctl(%s)", step);
	if (v < 0 || v > XO_MAX_QUEUE_BYTES)
		return xo_fail(XO_E_TOO_LARGE, "capture: %s = %d bytes", step,
			       v);
	*val = (uint32_t)v;
	return 0;
}

static int capture(int fd, struct xo_tcp_state *st)
{
	struct xo_repair_window win;
	struct tcp_info ti;
	socklen_t len;
	uint32_t outq, val;
	int ret;

	len = sizeof(ti);
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_INFO)");
	if (ti.tcpi_state != TCP_ESTABLISHED)
		return xo_fail(XO_E_NOT_ESTABLISHED,
			       "capture: socket is in TCP state %s, only ESTABLISHED connections can move",
			       tcp_state_name(ti.tcpi_state));
	ret = get_endpoint(fd, false, &st->local);
	if (!ret)
		ret = get_endpoint(fd, true, &st->remote);
	if (ret)
		return ret;

	if (ti.tcpi_options & TCPI_OPT_TIMESTAMPS)
		st->options |= XO_OPT_TIMESTAMPS;
	if (ti.tcpi_options & TCPI_OPT_SACK)
		st->options |= XO_OPT_SACK;
	if (ti.tcpi_options & TCPI_OPT_WSCALE) {
		st->options |= XO_OPT_WSCALE;
		st->snd_wscale = ti.tcpi_snd_wscale;
		st->rcv_wscale = ti.tcpi_rcv_wscale;
	}

	/* Send queue: SIOCOUTQ counts unacknowledged + unsent bytes,
	 * SIOCOUTQNSD only the unsent ones. */
	ret = ioctl_len(fd, SIOCOUTQ, &outq, "SIOCOUTQ");
	if (!ret)
		ret = ioctl_len(fd, SIOCOUTQNSD, &st->unsent_len,
				"SIOCOUTQNSD");
	if (!ret)
		ret = ioctl_len(fd, SIOCINQ, &st->recvq_len, "SIOCINQ");
	if (ret)
		return ret;
	if (st->unsent_len > outq)
		return xo_fail(XO_E_SYS,
			       "capture: unsent bytes (%u) exceed the send queue (%u)",
			       st->unsent_len, outq);
	st->inflight_len = outq - st->unsent_len;

	ret = queue_seq(fd, TCP_SEND_QUEUE, &st->snd_seq, "send");
	if (!ret)
		ret = peek_queue(fd, &st->sendq, outq, "send");
	if (!ret)
		ret = queue_seq(fd, TCP_RECV_QUEUE, &st->rcv_seq, "recv");
	if (!ret)
		ret = peek_queue(fd, &st->recvq, st->recvq_len, "recv");
	if (ret)
		return ret;

	/* In repair mode TCP_MAXSEG reports mss_clamp, not the current MSS. */
	len = sizeof(val);
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_MAXSEG, &val, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_MAXSEG)");
	st->mss_clamp = val;

	len = sizeof(win);
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &win,
				  &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_REPAIR_WINDOW)");
	st->snd_wl1 = win.snd_wl1;
	st->snd_wnd = win.snd_wnd;
	st->max_window = win.max_window;
	st->rcv_wnd = win.rcv_wnd;
	st->rcv_wup = win.rcv_wup;

	if (st->options & XO_OPT_TIMESTAMPS) {
		len = sizeof(val);
		if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_TIMESTAMP, &val,
					  &len)) < 0)
			return xo_fail_sys("capture: getsockopt(TCP_TIMESTAMP)");
		st->timestamp = val;
	}
	return 0;
}

int xo_tcp_capture(int fd, struct xo_tcp_state *st)
{
	int ret;

	xo_clear_error();
	xo_syscall_count = 0;
	if (!st)
		return xo_fail(XO_E_INVAL, "capture: state is NULL");
	memset(st, 0, sizeof(*st));
	ret = capture(fd, st);
	if (ret)
		xo_state_release(st);
	return ret;
}

/* Write buf into the selected repair queue; the kernel may take less than
 * asked for (one skb at a time), so loop until it is all in. */
static int fill_queue(int fd, int queue, const uint8_t *buf, uint32_t len,
		      const char *name)
{
	uint32_t done = 0;
	int ret;

	if (!len)
		return 0;
	/* restore() leaves the receive queue selected after connect(). */
	if (queue == TCP_SEND_QUEUE) {
		ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, queue,
			      "restore: setsockopt(TCP_REPAIR_QUEUE, send)");
		if (ret)
			return ret;
	}
	while (done < len) {
		ssize_t n = XO_SYSCALL(send(fd, buf + done, len - done, 0));

		if (n < 0)
			return xo_fail_sys("restore: send(%s queue) at %u/%u",
					   name, done, len);
		if (n == 0)
			return xo_fail(XO_E_SYS,
				       "restore: %s queue accepted 0 bytes at %u/%u",
				       name, done, len);
		done += (uint32_t)n;
	}
	return 0;
}

static int check_restorable(const struct xo_tcp_state *st,
			    const struct xo_restore_opts *opts)
{
	if (!st)
		return xo_fail(XO_E_INVAL, "restore: state is NULL");
	if (st->local.family != AF_INET && st->local.family != AF_INET6)
		return xo_fail(XO_E_INVAL, "restore: local family %u",
			       st->local.family);
	if (st->remote.family != st->local.family)
		return xo_fail(XO_E_INVAL,
			       "restore: local and remote families differ");
	if (opts && opts->use_local && opts->local.family != st->local.family)
		return xo_fail(XO_E_INVAL,
			       "restore: the local endpoint to bind is of another family");
	if ((st->inflight_len || st->unsent_len) && !st->sendq)
		return xo_fail(XO_E_INVAL, "restore: send queue bytes missing");
	if (st->recvq_len && !st->recvq)
		return xo_fail(XO_E_INVAL, "restore: receive queue bytes missing");
	return 0;
}

/* Make room for the queues we are about to write: the defaults may be
 * smaller than what the original socket had grown to. */
static int size_buffers(int fd, const struct xo_tcp_state *st)
{
	uint64_t need;
	int ret;

	need = (uint64_t)st->inflight_len + st->unsent_len;
	if (need > 65536) {
		ret = set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, (int)(need * 2),
			      "restore: setsockopt(SO_SNDBUFFORCE)");
		if (ret)
			return ret;
	}
	if (st->recvq_len > 65536) {
		ret = set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE,
			      (int)((uint64_t)st->recvq_len * 2),
			      "restore: setsockopt(SO_RCVBUFFORCE)");
		if (ret)
			return ret;
	}
	return 0;
}

static int set_options(int fd, const struct xo_tcp_state *st)
{
	struct tcp_repair_opt opts[4];
	int n = 0;

	opts[n].opt_code = XO_TCPOPT_MSS;
	opts[n++].opt_val = st->mss_clamp;
	if (st->options & XO_OPT_WSCALE) {
		opts[n].opt_code = XO_TCPOPT_WINDOW;
		opts[n++].opt_val = st->snd_wscale | (st->rcv_wscale << 16);
	}
	if (st->options & XO_OPT_TIMESTAMPS) {
		opts[n].opt_code = XO_TCPOPT_TIMESTAMP;
		opts[n++].opt_val = 0;
	}
	if (st->options & XO_OPT_SACK) {
		opts[n].opt_code = XO_TCPOPT_SACK_PERM;
		opts[n++].opt_val = 0;
	}
	if (XO_SYSCALL(setsockopt(fd, SOL_TCP, TCP_REPAIR_OPTIONS, opts,
				  n * sizeof(opts[0]))) < 0)
		return xo_fail_sys("restore: setsockopt(TCP_REPAIR_OPTIONS)");
	return 0;
}

static int restore(int fd, const struct xo_tcp_state *st,
		   const struct xo_restore_opts *opts)
{
	struct xo_endpoint local = st->local;
	struct xo_repair_window win;
	struct sockaddr_storage ss;
	socklen_t sl;
	int ret;

	if (opts && opts->use_local) {
		uint16_t port = opts->local.port ? opts->local.port :
						   st->local.port;

		local = opts->local;
		local.port = port;
	}
	/* Before repair mode: leaving repair later resets sk_reuse. */
	ret = set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1,
		      "restore: setsockopt(SO_REUSEADDR)");
	if (!ret)
		ret = set_int(fd, SOL_TCP, TCP_REPAIR, XO_TCP_REPAIR_ON,
			      "restore: setsockopt(TCP_REPAIR, on)");
	if (!ret)
		ret = size_buffers(fd, st);
	if (ret)
		return ret;

	/* Sequence numbers of the first byte each queue will hold: the send
	 * queue starts at the oldest unacknowledged byte, the receive queue
	 * at the oldest byte the application has not read. */
	ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE,
		      "restore: setsockopt(TCP_REPAIR_QUEUE, send)");
	if (!ret)
		ret = set_int(fd, SOL_TCP, TCP_QUEUE_SEQ,
			      (int)(st->snd_seq - st->inflight_len -
				    st->unsent_len),
			      "restore: setsockopt(TCP_QUEUE_SEQ, send)");
	if (!ret)
		ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE,
			      "restore: setsockopt(TCP_REPAIR_QUEUE, recv)");
	if (!ret)
		ret = set_int(fd, SOL_TCP, TCP_QUEUE_SEQ,
			      (int)(st->rcv_seq - st->recvq_len),
			      "restore: setsockopt(TCP_QUEUE_SEQ, recv)");
	if (ret)
		return ret;

	/* The repair connect() sizes segments (mss_cache) from the clamp it
	 * finds, and TCP_REPAIR_OPTIONS later changes the clamp without
	 * resizing them: without this the socket would send 524-byte
	 * segments for the rest of its life. */
	ret = set_int(fd, SOL_TCP, TCP_MAXSEG,
		      (int)(st->mss_clamp < XO_MAXSEG_MAX ? st->mss_clamp :
							 XO_MAXSEG_MAX),
		      "restore: setsockopt(TCP_MAXSEG)");
	if (ret)
		return ret;

	sl = to_sockaddr(&local, &ss);
	if (XO_SYSCALL(bind(fd, (struct sockaddr *)&ss, sl)) < 0) {
		char txt[INET6_ADDRSTRLEN] = "?";

		inet_ntop(local.family, local.addr, txt, sizeof(txt));
		return xo_fail_sys("restore: bind(%s port %u)", txt,
				   local.port);
	}
	/* In repair mode connect() sends no SYN: the socket becomes
	 * ESTABLISHED with the sequence numbers set above. */
	sl = to_sockaddr(&st->remote, &ss);
	if (XO_SYSCALL(connect(fd, (struct sockaddr *)&ss, sl)) < 0)
		return xo_fail_sys("restore: connect (repair)");

	ret = set_options(fd, st);
	if (!ret && (st->options & XO_OPT_TIMESTAMPS))
		ret = set_int(fd, SOL_TCP, TCP_TIMESTAMP, (int)st->timestamp,
			      "restore: setsockopt(TCP_TIMESTAMP)");
	if (ret)
		return ret;

	/* The receive queue first: TCP_REPAIR_WINDOW is checked against the
	 * rcv_nxt that filling it produces. Only bytes that were in flight go
	 * into the send queue here (the kernel treats them as sent); unsent
	 * bytes are sent normally by xo_tcp_resume(). */
	ret = fill_queue(fd, TCP_RECV_QUEUE, st->recvq, st->recvq_len, "recv");
	if (!ret)
		ret = fill_queue(fd, TCP_SEND_QUEUE, st->sendq,
				 st->inflight_len, "send");
	if (ret)
		return ret;

	win.snd_wl1 = st->snd_wl1;
	win.snd_wnd = st->snd_wnd;
	win.max_window = st->max_window;
	win.rcv_wnd = st->rcv_wnd;
	win.rcv_wup = st->rcv_wup;
	if (XO_SYSCALL(setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &win,
				  sizeof(win))) < 0)
		return xo_fail_sys("restore: setsockopt(TCP_REPAIR_WINDOW)");
	return 0;
}

int xo_tcp_restore(const struct xo_tcp_state *st,
		   const struct xo_restore_opts *opts)
{
	int fd, ret;

	xo_clear_error();
	xo_syscall_count = 0;
	ret = check_restorable(st, opts);
	if (ret)
		return ret;
	fd = XO_SYSCALL(socket(st->local.family, SOCK_STREAM | SOCK_CLOEXEC,
			       IPPROTO_TCP));
	if (fd < 0)
		return xo_fail_sys("restore: socket()");
	ret = restore(fd, st, opts);
	if (ret) {
		/* Still in repair mode (or never connected): nothing is sent. */
		close(fd);
		return ret;
	}
	return fd;
}

int xo_tcp_resume(int fd, const struct xo_tcp_state *st)
{
	const uint8_t *unsent;
	uint32_t done = 0;
	int ret;

	xo_clear_error();
	ret = set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP,
		      "resume: setsockopt(TCP_REPAIR, off without window probe)");
	if (ret || !st || !st->unsent_len)
		return ret;
	/* The send buffer was sized in restore for the whole queue, so this
	 * completes; MSG_DONTWAIT keeps a surprise from blocking the caller. */
	unsent = st->sendq + st->inflight_len;
	while (done < st->unsent_len) {
		ssize_t n = send(fd, unsent + done, st->unsent_len - done,
				 MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0)
			return xo_fail_sys("resume: send(unsent bytes) at %u/%u",
					   done, st->unsent_len);
		done += (uint32_t)n;
	}
	return 0;
}

int xo_tcp_discard(int fd)
{
	int on = 0;
	socklen_t len = sizeof(on);

	xo_clear_error();
	/* Closing outside repair mode would send FIN or RST to the client,
	 * which now belongs to someone else: refuse. */
	if (getsockopt(fd, SOL_TCP, TCP_REPAIR, &on, &len) < 0)
		return xo_fail_sys("discard: getsockopt(TCP_REPAIR)");
	if (!on)
		return xo_fail(XO_E_INVAL,
			       "discard: socket is not frozen; closing it would signal the peer");
	if (close(fd) < 0)
		return xo_fail_sys("discard: close");
	return 0;
}

int xo_state_set_app_data(struct xo_tcp_state *st, const uint8_t *buf,
			  uint32_t len)
{
	uint8_t *copy = NULL;

	if (len > XO_MAX_APP_BYTES)
		return xo_fail(XO_E_TOO_LARGE, "app data: %u bytes > %u", len,
			       XO_MAX_APP_BYTES);
	if (len) {
		copy = malloc(len);
		if (!copy)
			return xo_fail(XO_E_NOMEM, "app data: %u bytes", len);
		memcpy(copy, buf, len);
	}
	free(st->app_data);
	st->app_data = copy;
	st->app_len = len;
	return 0;
}

int xo_state_set_meta(struct xo_tcp_state *st, const uint8_t *buf,
		      uint32_t len)
{
	uint8_t *copy = NULL;

	if (len > XO_MAX_META_BYTES)
		return xo_fail(XO_E_TOO_LARGE, "metadata: %u bytes > %u", len,
			       XO_MAX_META_BYTES);
	if (len) {
		copy = malloc(len);
		if (!copy)
			return xo_fail(XO_E_NOMEM, "metadata: %u bytes", len);
		memcpy(copy, buf, len);
	}
	free(st->meta);
	st->meta = copy;
	st->meta_len = len;
	return 0;
}

void xo_state_set_peer_mac(struct xo_tcp_state *st, const uint8_t *mac)
{
	if (mac) {
		memcpy(st->peer_mac, mac, 6);
		st->has_peer_mac = 1;
	} else {
		memset(st->peer_mac, 0, 6);
		st->has_peer_mac = 0;
	}
}

void xo_state_release(struct xo_tcp_state *st)
{
	if (!st)
		return;
	free(st->sendq);
	free(st->recvq);
	free(st->app_data);
	free(st->meta);
	memset(st, 0, sizeof(*st));
}
