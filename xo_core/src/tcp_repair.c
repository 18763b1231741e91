// SPDX-License-Identifier: MIT
/*
 * Capture and restore of a live TCP connection with TCP_REPAIR.
 *
 * The field set follows what the kernel lets a repair-mode socket read and
 * write (CRIU's libsoccr uses the same kernel interface). Ordering rules the
 * kernel imposes, learned the hard way (docs/core.md, tests/test_tcp_repair.py):
 *  - SO_REUSEADDR must be set before entering repair, not after;
 *  - TCP_QUEUE_SEQ only before connect(), TCP_REPAIR_OPTIONS only after;
 *  - receive queue contents before TCP_REPAIR_WINDOW (checked against
 *    rcv_nxt);
 *  - writes into the repair queues may be partial, so loop, and may wait
 *    for memory, so never block (MSG_DONTWAIT) and size the buffers first;
 *  - in-flight bytes written into the send queue arm the retransmission
 *    timer, which transmits even in repair mode: write them in resume.
 */
#include <arpa/inet.h>
#include <limits.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stddef.h>
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
/* What TCP_MAXSEG accepts: TCP_MIN_MSS .. MAX_TCP_WINDOW. A captured clamp
 * can lie outside (loopback's is 65483; a peer may announce less than 88),
 * so TCP_MAXSEG gets the nearest value it takes and TCP_REPAIR_OPTIONS the
 * exact clamp. */
#define XO_MINSEG 88u
#define XO_MAXSEG_MAX 32767u

struct xo_repair_window {
	uint32_t snd_wl1;
	uint32_t snd_wnd;
	uint32_t max_window;
	uint32_t rcv_wnd;
	uint32_t rcv_wup;
};

/* The receive window as the client last heard it (see capture_once). */
struct heard_window {
	bool known;
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

/*
 * The kernel's struct tcp_info goes on past the end of glibc's copy
 * (tcpi_total_retrans); capture needs the counters that tell whether the
 * connection moved while it was being read. The kernel only ever appends
 * to this structure, so the layout below is stable ABI.
 */
struct xo_tcp_info {
	struct tcp_info base;
	uint64_t pacing_rate;
	uint64_t max_pacing_rate;
	uint64_t bytes_acked;    /* moves with snd_una */
	uint64_t bytes_received; /* moves with rcv_nxt */
	uint32_t segs_out;
	uint32_t segs_in;
	uint32_t notsent_bytes;  /* write_seq - snd_nxt, as SIOCOUTQNSD */
	uint32_t min_rtt;
	uint32_t data_segs_in;
	uint32_t data_segs_out;
	uint64_t delivery_rate;
	uint64_t busy_time;
	uint64_t rwnd_limited;
	uint64_t sndbuf_limited;
	uint32_t delivered;
	uint32_t delivered_ce;
	uint64_t bytes_sent;
	uint64_t bytes_retrans;
	uint32_t dsack_dups;
	uint32_t reord_seen;
	uint32_t rcv_ooopack;
	uint32_t snd_wnd;        /* Linux 6.2+; 0 before */
};

_Static_assert(offsetof(struct xo_tcp_info, bytes_acked) == 120,
	       "struct xo_tcp_info must follow the kernel's struct tcp_info");
_Static_assert(offsetof(struct xo_tcp_info, snd_wnd) == 228,
	       "struct xo_tcp_info must follow the kernel's struct tcp_info");

/* Everything that changes when a segment is processed: if none of it moved
 * between the start and the end of a capture, the queues, their sequence
 * numbers and the windows were read from one and the same state. */
struct xo_tcp_snapshot {
	uint64_t bytes_acked;
	uint64_t bytes_received;
	uint32_t notsent;
	uint32_t snd_wnd;
	uint32_t state;
};

/* Returned (positive) by a capture attempt that saw the connection move. */
#define XO_CAPTURE_MOVED 1
/* Attempts before capture gives up on a connection that keeps moving. */
#define XO_CAPTURE_TRIES 4
/* The urgent mark's position in the queue when there is none. */
#define XO_NO_MARK UINT32_MAX

static int read_info(int fd, struct xo_tcp_info *ti,
		     struct xo_tcp_snapshot *snap)
{
	socklen_t len = sizeof(*ti);

	memset(ti, 0, sizeof(*ti));
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_INFO, ti, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_INFO)");
	if (len < offsetof(struct xo_tcp_info, notsent_bytes) +
			  sizeof(ti->notsent_bytes))
		return xo_fail(XO_E_UNSUPPORTED,
			       "capture: the kernel's tcp_info has %u bytes, without tcpi_notsent_bytes (Linux 4.6+ needed)",
			       (unsigned int)len);
	snap->bytes_acked = ti->bytes_acked;
	snap->bytes_received = ti->bytes_received;
	snap->notsent = ti->notsent_bytes;
	snap->snd_wnd = ti->snd_wnd;
	snap->state = ti->base.tcpi_state;
	return 0;
}

int xo_tcp_segs_in(int fd, uint32_t *segs)
{
	struct xo_tcp_snapshot snap;
	struct xo_tcp_info ti;
	int ret = read_info(fd, &ti, &snap);

	if (!ret)
		*segs = ti.segs_in;
	return ret;
}

static bool snapshot_equal(const struct xo_tcp_snapshot *a,
			   const struct xo_tcp_snapshot *b)
{
	return a->bytes_acked == b->bytes_acked &&
	       a->bytes_received == b->bytes_received &&
	       a->notsent == b->notsent && a->snd_wnd == b->snd_wnd &&
	       a->state == b->state;
}

/* Copy up to len bytes of the selected repair queue without consuming
 * them; *got says how many came. */
static int peek_queue(int fd, uint8_t *buf, uint32_t len, uint32_t *got,
		      const char *name)
{
	ssize_t n;

	*got = 0;
	if (!len)
		return 0;
	n = XO_SYSCALL(recv(fd, buf, len, MSG_PEEK | MSG_DONTWAIT));
	if (n < 0)
		return xo_fail_sys("capture: recv(MSG_PEEK, %s queue)", name);
	*got = (uint32_t)n;
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

/*
 * Count the receive queue as rcv_nxt does. SIOCINQ stops at an urgent mark
 * (unless SO_OOBINLINE is set) while TCP_QUEUE_SEQ reports rcv_nxt, which
 * counts every byte: so count once more with SO_OOBINLINE on, then put the
 * application's setting back. *mark is the mark's offset in the queue when
 * recv() would skip a byte there, else XO_NO_MARK.
 */
static int count_recvq(int fd, uint32_t *all, uint32_t *mark)
{
	uint32_t plain;
	socklen_t len;
	int inl = 0, ret, ret2;

	*mark = XO_NO_MARK;
	len = sizeof(inl);
	if (XO_SYSCALL(getsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &inl,
				  &len)) < 0)
		return xo_fail_sys("capture: getsockopt(SO_OOBINLINE)");
	ret = ioctl_len(fd, SIOCINQ, &plain, "SIOCINQ");
	if (ret)
		return ret;
	*all = plain;
	if (inl)
		return 0; /* urgent bytes are in-band: nothing is skipped */
	ret = set_int(fd, SOL_SOCKET, SO_OOBINLINE, 1,
		      "capture: setsockopt(SO_OOBINLINE, on)");
	if (ret)
		return ret;
	ret = ioctl_len(fd, SIOCINQ, all, "SIOCINQ with urgent data inline");
	ret2 = set_int(fd, SOL_SOCKET, SO_OOBINLINE, 0,
		       "capture: setsockopt(SO_OOBINLINE, off)");
	if (ret)
		return ret;
	if (ret2)
		return ret2;
	if (plain < *all)
		*mark = plain;
	return 0;
}

/*
 * Peek the receive queue as the application would read it. A peek stops at
 * an urgent mark once it has copied something, in-band or not, so go on
 * from there with SO_PEEK_OFF (recv() then skips the urgent byte itself
 * unless it is in-band) and put SO_PEEK_OFF back to "off". There is one
 * mark at most; anything still missing means the queue moved.
 */
static int peek_recvq(int fd, uint8_t *buf, uint32_t want, uint32_t *got)
{
	uint32_t more;
	int ret, ret2;

	ret = peek_queue(fd, buf, want, got, "recv");
	if (ret || *got == want || !*got)
		return ret;
	ret = set_int(fd, SOL_SOCKET, SO_PEEK_OFF, (int)*got,
		      "capture: setsockopt(SO_PEEK_OFF) to read past the urgent mark");
	if (ret)
		return ret;
	ret = peek_queue(fd, buf + *got, want - *got, &more, "recv");
	ret2 = set_int(fd, SOL_SOCKET, SO_PEEK_OFF, -1,
		       "capture: setsockopt(SO_PEEK_OFF, off)");
	if (ret)
		return ret;
	*got += more;
	return ret2;
}

void xo_free(void *mem)
{
	free(mem);
}

int xo_tcp_late_bytes(int fd, uint32_t rcv_seq, uint32_t queued,
		      uint8_t **out, uint32_t *len)
{
	uint32_t now_seq, moved, all, mark, got, late;
	uint8_t *buf;
	int ret, tls;

	*out = NULL;
	*len = 0;
	ret = queue_seq(fd, TCP_RECV_QUEUE, &now_seq, "recv");
	if (ret)
		return ret;
	moved = now_seq - rcv_seq;
	if (!moved || moved > 1u << 30)
		goto done;
	/* Kernel TLS reads its receive queue through its own layer, which a
	 * peek would make decrypt: leave those bytes to the client's resend. */
	ret = xo_tls_ulp(fd, &tls);
	if (!ret && tls)
		ret = xo_fail(XO_E_UNSUPPORTED,
			      "late bytes: %u bytes reached a kernel-TLS socket after its capture; the client resends them",
			      moved);
	if (!ret)
		ret = count_recvq(fd, &all, &mark);
	if (ret)
		goto done;
	/* Count what a reader gets, as the capture did (queued): a FIN moves
	 * rcv_nxt without a byte, and a skipped urgent byte is no byte. */
	buf = all > queued ? malloc(all) : NULL;
	if (!buf) {
		if (all > queued)
			ret = xo_fail(XO_E_NOMEM, "late bytes: %u bytes", all);
		goto done;
	}
	ret = peek_recvq(fd, buf, all, &got);
	late = !ret && got > queued ? got - queued : 0;
	if (late > moved)
		ret = xo_fail(XO_E_SEQUENCE,
			      "late bytes: %u bytes after the capture's %u, but rcv_nxt moved by %u",
			      late, queued, moved);
	if (ret || !late) {
		free(buf);
		goto done;
	}
	memmove(buf, buf + queued, late);
	*out = buf;
	*len = late;
done:
	/* as capture leaves it: no queue selected */
	if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE,
		    "late bytes: setsockopt(TCP_REPAIR_QUEUE, none)") && !ret) {
		free(*out);
		*out = NULL;
		*len = 0;
		ret = XO_E_SYS;
	}
	return ret;
}

static int capture_recvq(int fd, struct xo_tcp_state *st)
{
	uint32_t all = 0, mark = XO_NO_MARK, want, got;
	ssize_t n;
	uint8_t c;
	int ret;

	ret = queue_seq(fd, TCP_RECV_QUEUE, &st->rcv_seq, "recv");
	if (!ret)
		ret = count_recvq(fd, &all, &mark);
	if (ret)
		return ret;
	want = all;
	if (mark != XO_NO_MARK) {
		/* An urgent byte the application has not read yet: it is
		 * delivered out of band, from kernel state no repair option
		 * can recreate on the target. */
		n = XO_SYSCALL(recv(fd, &c, 1, MSG_OOB | MSG_PEEK |
					       MSG_DONTWAIT));
		if (n == 1)
			return xo_fail(XO_E_URGENT,
				       "capture: an urgent (MSG_OOB) byte %u bytes into the receive queue is still unread; serve the connection locally",
				       mark);
		/* EINVAL: read already; EAGAIN: announced, not arrived. */
		if (n < 0 && errno != EINVAL && errno != EAGAIN)
			return xo_fail_sys("capture: recv(MSG_OOB | MSG_PEEK)");
		/* Read out of band already: recv() will skip it, so the
		 * stream the target serves must not hold it either. */
		want--;
	}
	if (!all)
		return 0;
	st->recvq = malloc(all);
	if (!st->recvq)
		return xo_fail(XO_E_NOMEM,
			       "capture: %u bytes for the recv queue", all);
	ret = peek_recvq(fd, st->recvq, want, &got);
	if (ret)
		return ret;
	if (got != want)
		return XO_CAPTURE_MOVED;
	st->recvq_len = want;
	return 0;
}

static int capture_once(int fd, const struct xo_tcp_info *ti,
			struct xo_tcp_state *st, struct heard_window *heard)
{
	struct xo_repair_window win;
	socklen_t len;
	uint32_t outq, got, val;
	int ret;

	ret = xo_endpoint_of_fd(fd, 0, &st->local);
	if (!ret)
		ret = xo_endpoint_of_fd(fd, 1, &st->remote);
	if (ret)
		return ret;

	if (ti->base.tcpi_options & TCPI_OPT_TIMESTAMPS)
		st->options |= XO_OPT_TIMESTAMPS;
	if (ti->base.tcpi_options & TCPI_OPT_SACK)
		st->options |= XO_OPT_SACK;
	if (ti->base.tcpi_options & TCPI_OPT_WSCALE) {
		st->options |= XO_OPT_WSCALE;
		st->snd_wscale = ti->base.tcpi_snd_wscale;
		st->rcv_wscale = ti->base.tcpi_rcv_wscale;
	}

	/* The windows before the queues: peeking at the receive queue may
	 * make the socket send an ACK it owed (into the egress block, so the
	 * client never sees it), and that moves rcv_wup. The receive side
	 * kept is what the client last heard (*heard, from the first attempt:
	 * every ACK since went into the block), so the new owner knows it
	 * still owes that ACK (xo_park_owed_ack). */
	len = sizeof(win);
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &win,
				  &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_REPAIR_WINDOW)");
	if (!heard->known) {
		heard->known = true;
		heard->rcv_wnd = win.rcv_wnd;
		heard->rcv_wup = win.rcv_wup;
	}
	st->snd_wl1 = win.snd_wl1;
	st->snd_wnd = win.snd_wnd;
	st->max_window = win.max_window;
	st->rcv_wnd = heard->rcv_wnd;
	st->rcv_wup = heard->rcv_wup;

	/* Send queue: SIOCOUTQ counts unacknowledged + unsent bytes,
	 * tcpi_notsent_bytes (= SIOCOUTQNSD) only the unsent ones. */
	ret = ioctl_len(fd, SIOCOUTQ, &outq, "SIOCOUTQ");
	if (ret)
		return ret;
	st->unsent_len = ti->notsent_bytes;
	if (st->unsent_len > outq)
		return XO_CAPTURE_MOVED; /* an ACK between the two reads */
	st->inflight_len = outq - st->unsent_len;

	ret = queue_seq(fd, TCP_SEND_QUEUE, &st->snd_seq, "send");
	if (ret)
		return ret;
	if (outq) {
		st->sendq = malloc(outq);
		if (!st->sendq)
			return xo_fail(XO_E_NOMEM,
				       "capture: %u bytes for the send queue",
				       outq);
		ret = peek_queue(fd, st->sendq, outq, &got, "send");
		if (ret)
			return ret;
		if (got != outq)
			return XO_CAPTURE_MOVED; /* acknowledged meanwhile */
	}
	ret = capture_recvq(fd, st);
	if (ret)
		return ret;

	/* In repair mode TCP_MAXSEG reports mss_clamp, not the current MSS. */
	len = sizeof(val);
	if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_MAXSEG, &val, &len)) < 0)
		return xo_fail_sys("capture: getsockopt(TCP_MAXSEG)");
	st->mss_clamp = val;

	if (st->options & XO_OPT_TIMESTAMPS) {
		len = sizeof(val);
		if (XO_SYSCALL(getsockopt(fd, SOL_TCP, TCP_TIMESTAMP, &val,
					  &len)) < 0)
			return xo_fail_sys("capture: getsockopt(TCP_TIMESTAMP)");
		st->timestamp = val;
	}
	return 0;
}

/*
 * A frozen socket still processes what arrives (data, ACKs, window
 * updates) unless the flow is blocked. Read everything between two
 * tcp_info snapshots and start again if anything moved, so the queue
 * bytes always match the sequence numbers they are restored at.
 */
static int capture(int fd, struct xo_tcp_state *st)
{
	struct xo_tcp_snapshot before, after;
	struct xo_tcp_info ti, ti_after;
	struct heard_window heard = { 0 };
	int ret, attempt;

	for (attempt = 0; attempt < XO_CAPTURE_TRIES; attempt++) {
		ret = read_info(fd, &ti, &before);
		if (ret)
			return ret;
		if (ti.base.tcpi_state != TCP_ESTABLISHED)
			return xo_fail(XO_E_NOT_ESTABLISHED,
				       "capture: socket is in TCP state %s, only ESTABLISHED connections can move",
				       tcp_state_name(ti.base.tcpi_state));
		ret = capture_once(fd, &ti, st, &heard);
		if (!ret) {
			ret = read_info(fd, &ti_after, &after);
			if (ret)
				return ret;
			if (snapshot_equal(&before, &after))
				return 0;
			ret = XO_CAPTURE_MOVED;
		}
		if (ret != XO_CAPTURE_MOVED)
			return ret;
		xo_state_release(st);
	}
	return xo_fail(XO_E_BUSY,
		       "capture: the connection changed during each of %d attempts (data or ACKs still arriving); block the flow before freezing",
		       XO_CAPTURE_TRIES);
}

int xo_tcp_capture(int fd, struct xo_tcp_state *st)
{
	int ret, is_tls = 0;

	xo_clear_error();
	xo_syscall_count = 0;
	if (!st)
		return xo_fail(XO_E_INVAL, "capture: state is NULL");
	memset(st, 0, sizeof(*st));
	/* A kTLS socket: its record state moves too, and only with nothing
	 * pending (checked before any queue is read: a TCP repair read of a
	 * kTLS socket's receive queue would go through the TLS layer). */
	ret = xo_tls_ulp(fd, &is_tls);
	if (!ret && is_tls)
		ret = xo_tls_capture_kernel(fd, st);
	if (!ret) {
		struct xo_tls_state *tls = st->tls;

		st->tls = NULL; /* capture() releases st between attempts */
		ret = capture(fd, st);
		st->tls = tls;
		if (!ret && tls && (st->inflight_len || st->unsent_len ||
				    st->recvq_len))
			ret = xo_fail(XO_E_BUSY,
				      "capture: kTLS socket with bytes queued after all");
	}
	/* Leave no repair queue selected: a write into a frozen socket would
	 * otherwise land in one of its queues instead of failing. */
	if (!ret) {
		ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE,
			      "capture: setsockopt(TCP_REPAIR_QUEUE, none)");
	} else {
		int saved = errno;

		/* Best effort on a failure already reported: a socket that
		 * is not frozen refuses it, and that changes nothing. */
		if (XO_SYSCALL(setsockopt(fd, SOL_TCP, TCP_REPAIR_QUEUE,
					  &(int){ TCP_NO_QUEUE },
					  sizeof(int))) < 0)
			errno = saved;
	}
	if (ret)
		xo_state_release(st);
	return ret;
}

/*
 * Write buf into the selected repair queue without ever waiting: every
 * send() is MSG_DONTWAIT, so a full buffer is an error here, not a sleep.
 * (A blocking fill of the send queue sleeps until memory frees up, which in
 * repair mode happens only when the retransmission timer fires, and that
 * transmits.) The kernel takes at most about 64 KiB per call into the
 * receive queue and may stop early in the send queue, so loop on partial
 * writes; the buffers were sized for the whole queue, so EAGAIN or ENOMEM
 * means the kernel refused the memory (SO_*BUF or tcp_mem).
 */
static int fill_queue(int fd, const uint8_t *buf, uint32_t len,
		      const char *step)
{
	uint32_t done = 0;

	while (done < len) {
		ssize_t n = XO_SYSCALL(send(fd, buf + done, len - done,
					    MSG_DONTWAIT | MSG_NOSIGNAL));

		if (n < 0 && (errno == EAGAIN || errno == ENOMEM)) {
			xo_fail_sys("%s: send() at %u/%u bytes", step, done,
				    len);
			xo_append_hint("the kernel refused the buffer memory (SO_SNDBUF/SO_RCVBUF, net.ipv4.tcp_mem); not waiting for it");
			return XO_E_BUSY;
		}
		if (n < 0)
			return xo_fail_sys("%s: send() at %u/%u bytes", step,
					   done, len);
		if (n == 0)
			return xo_fail(XO_E_SYS,
				       "%s: queue accepted 0 bytes at %u/%u",
				       step, done, len);
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
	if (st->tls) {
		int ret = xo_tls_check(st->tls);

		if (ret)
			return ret;
		/* Kernel TLS is installed on the repaired socket: its queues
		 * would be taken for plaintext. A record layer in user space
		 * (tls_user) reads and writes whole records itself: queued
		 * bytes are the records that follow its sequence numbers. */
		if (!(opts && opts->tls_user) &&
		    (st->inflight_len || st->unsent_len || st->recvq_len))
			return xo_fail(XO_E_INVAL,
				       "restore: TLS state with %u + %u bytes to send and %u received: a TLS connection moves with empty queues",
				       st->inflight_len, st->unsent_len,
				       st->recvq_len);
	}
	return 0;
}

/*
 * Buffer sizes for a restored socket. The kernel counts every skb's full
 * truesize against SO_SNDBUF / SO_RCVBUF: a send-queue skb carries at
 * least one segment (as little as 88 bytes with a small MSS clamp) plus
 * about a kilobyte of overhead; a receive-queue skb written in repair mode
 * holds up to 68 KiB. Setting a size locks it (no autotuning afterwards),
 * so never go below what autotuning would reach by default (tcp_wmem[2] =
 * 4 MiB, tcp_rmem[2] = 6 MiB): a restored connection must not be slower
 * than the one it replaces.
 */
#define XO_SKB_OVERHEAD 1024u
#define XO_SNDBUF_FLOOR (4u << 20)
#define XO_RCVBUF_FLOOR (6u << 20)
#define XO_BUF_MAX ((uint64_t)INT_MAX / 2) /* the kernel doubles it */

static uint64_t buf_bytes(uint64_t bytes, uint32_t seg, uint32_t floor)
{
	uint64_t need;

	if (!seg)
		seg = 1;
	/* Twice the bytes and one overhead per possible skb: with plenty of
	 * headroom for the segments the client sends meanwhile. */
	need = 2 * bytes + (bytes / seg + 1) * XO_SKB_OVERHEAD;
	if (need < floor)
		need = floor;
	/* SO_*BUFFORCE stores twice the value it is given. */
	need = (need + 1) / 2;
	return need > XO_BUF_MAX ? XO_BUF_MAX : need;
}

/* Make room for the queues about to be written, always: the defaults are
 * far below what a busy connection had grown to. Before connect(), which
 * derives the window clamp from the receive buffer. */
static int size_buffers(int fd, const struct xo_tcp_state *st)
{
	uint32_t seg = st->mss_clamp < XO_MINSEG ? XO_MINSEG : st->mss_clamp;
	int ret;

	ret = set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE,
		      (int)buf_bytes((uint64_t)st->inflight_len +
					     st->unsent_len,
				     seg, XO_SNDBUF_FLOOR),
		      "restore: setsockopt(SO_SNDBUFFORCE)");
	if (!ret)
		ret = set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE,
			      (int)buf_bytes(st->recvq_len, 65536,
					     XO_RCVBUF_FLOOR),
			      "restore: setsockopt(SO_RCVBUFFORCE)");
	return ret;
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
		      (int)(st->mss_clamp < XO_MINSEG ? XO_MINSEG :
			    st->mss_clamp > XO_MAXSEG_MAX ? XO_MAXSEG_MAX :
							     st->mss_clamp),
		      "restore: setsockopt(TCP_MAXSEG)");
	if (ret)
		return ret;

	ret = xo_endpoint_to_sockaddr(&local, &ss, sizeof(ss));
	if (ret < 0)
		return ret;
	sl = (socklen_t)ret;
	if (XO_SYSCALL(bind(fd, (struct sockaddr *)&ss, sl)) < 0) {
		char txt[INET6_ADDRSTRLEN] = "?";

		inet_ntop(local.family, local.addr, txt, sizeof(txt));
		return xo_fail_sys("restore: bind(%s port %u)", txt,
				   local.port);
	}
	/* In repair mode connect() sends no SYN: the socket becomes
	 * ESTABLISHED with the sequence numbers set above. */
	ret = xo_endpoint_to_sockaddr(&st->remote, &ss, sizeof(ss));
	if (ret < 0)
		return ret;
	sl = (socklen_t)ret;
	if (XO_SYSCALL(connect(fd, (struct sockaddr *)&ss, sl)) < 0)
		return xo_fail_sys("restore: connect (repair)");

	ret = set_options(fd, st);
	if (!ret && (st->options & XO_OPT_TIMESTAMPS))
		ret = set_int(fd, SOL_TCP, TCP_TIMESTAMP, (int)st->timestamp,
			      "restore: setsockopt(TCP_TIMESTAMP)");
	if (ret)
		return ret;

	/* The receive queue before TCP_REPAIR_WINDOW, which is checked
	 * against the rcv_nxt that filling it produces (restore() left the
	 * receive queue selected). The in-flight bytes wait for
	 * xo_tcp_resume(): written now, they would arm the retransmission
	 * timer, and that timer transmits even in repair mode. */
	ret = fill_queue(fd, st->recvq, st->recvq_len,
			 "restore: receive queue");
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
	/* Kernel TLS needs an ESTABLISHED socket: after the repair connect,
	 * and after every queue write (the queues are empty with TLS). */
	if (st->tls && !(opts && opts->tls_user))
		return xo_tls_restore_kernel(fd, st->tls);
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
	int ret;

	xo_clear_error();
	xo_syscall_count = 0;
	/* In-flight bytes go in at the last moment, still in repair mode:
	 * the kernel takes them as sent, so nothing leaves now, and their
	 * retransmission timer starts only here. */
	if (st && st->inflight_len) {
		ret = set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE,
			      "resume: setsockopt(TCP_REPAIR_QUEUE, send)");
		if (!ret)
			ret = fill_queue(fd, st->sendq, st->inflight_len,
					 "resume: in-flight bytes");
		if (ret)
			return ret;
	}
	ret = set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP,
		      "resume: setsockopt(TCP_REPAIR, off without window probe)");
	/* Leaving repair mode clears the reuse restore forced; without it a
	 * server restarted while this connection lives could not bind its
	 * listening port. */
	if (!ret)
		ret = set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1,
			      "resume: setsockopt(SO_REUSEADDR)");
	if (ret || !st || !st->unsent_len)
		return ret;
	/* The send buffer was sized in restore for the whole queue, so this
	 * completes without waiting; if the kernel still refuses, say so. */
	return fill_queue(fd, st->sendq + st->inflight_len, st->unsent_len,
			  "resume: unsent bytes");
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
	xo_secret_free(st->tls);
	memset(st, 0, sizeof(*st));
}
