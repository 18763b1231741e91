// SPDX-License-Identifier: MIT
/*
 * xo_c_smoke.c - a plain C user of the XO core: nothing but the public
 * headers (xo.h, xo_steer.h) and libxo.a, as the nginx module links it.
 *
 *   cc -Wall -Wextra -Werror -Ixo_core/include tests/c/xo_c_smoke.c \
 *      xo_core/build/libxo.a $(make -s -C xo_core libs)
 *   ./a.out path/to/xo_steer.bpf.o        (as root: TCP_REPAIR, bpf())
 *
 * (a) TCP: a loopback connection, bytes both ways, some left unread in the
 *     server's receive queue; freeze + capture the server end, encode,
 *     decode into a second state, discard the original socket, restore
 *     from the decoded copy, resume; the unread bytes must arrive and a
 *     new exchange must work both ways.
 * (b) envelope: HELLO exchange with random nonces, xo_chan_bind() on both
 *     ends, seal/open; a replay must give XO_E_REPLAY, a flipped bit
 *     XO_E_AUTH.
 * (c) steering: xo_steer_open(XO_STEER_F_NO_PIN) on the compiled object,
 *     insert/look up/remove a block rule, close.
 *
 * Prints "C API OK" and exits 0 only when every check passed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <xo.h>
#include <xo_steer.h>

#define IO_TIMEOUT_MS 5000

/* A core call failed: name it, its code and the core's sentence. */
static int xo_failed(const char *call, long long ret)
{
	fprintf(stderr, "FAIL: %s returned %lld (%s): %s\n", call, ret,
		xo_strerror((int)ret), xo_last_error());
	return -1;
}

/* Run a core call; on a negative result report it and leave via `out`. */
#define XO_TRY(var, call)                                                  \
	do {                                                               \
		var = (call);                                              \
		if (var < 0) {                                             \
			xo_failed(#call, (long long)var);                  \
			goto out;                                          \
		}                                                          \
	} while (0)

/* A plain check of ours; on failure report it and leave via `out`. */
#define CHECK(cond)                                                        \
	do {                                                               \
		if (!(cond)) {                                             \
			fprintf(stderr, "FAIL: %s:%d: %s\n", __FILE__,     \
				__LINE__, #cond);                          \
			goto out;                                          \
		}                                                          \
	} while (0)

static int sys_failed(const char *what)
{
	fprintf(stderr, "FAIL: %s: %s (errno %d)\n", what, strerror(errno),
		errno);
	return -1;
}

static void fill_pattern(uint8_t *buf, size_t len, uint8_t seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(seed + i * 7);
}

static int send_all(int fd, const uint8_t *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return sys_failed("send");
		}
		done += (size_t)n;
	}
	return 0;
}

static int recv_exact(int fd, uint8_t *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;
		int r = poll(&p, 1, IO_TIMEOUT_MS);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return sys_failed("poll");
		}
		if (r == 0) {
			fprintf(stderr, "FAIL: recv timed out after %zu of %zu bytes\n",
				done, len);
			return -1;
		}
		n = recv(fd, buf + done, len - done, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return sys_failed("recv");
		}
		if (n == 0) {
			fprintf(stderr, "FAIL: EOF after %zu of %zu bytes\n",
				done, len);
			return -1;
		}
		done += (size_t)n;
	}
	return 0;
}

/* Nothing more may be readable right now. */
static int expect_no_data(int fd)
{
	uint8_t b;
	ssize_t n = recv(fd, &b, 1, MSG_DONTWAIT | MSG_PEEK);

	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return 0;
	if (n < 0)
		return sys_failed("recv(MSG_PEEK)");
	fprintf(stderr, "FAIL: unexpected %s on the socket\n",
		n ? "data" : "EOF");
	return -1;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000,
			       .tv_nsec = (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* Wait until ioctl(req) on fd reports want bytes (the kernel's queues on
 * loopback settle within a delayed-ACK time). */
static int wait_queue(int fd, unsigned long req, int want, const char *name)
{
	int v = -1;

	for (int i = 0; i < IO_TIMEOUT_MS / 5; i++) {
		if (ioctl(fd, req, &v) < 0)
			return sys_failed(name);
		if (v == want)
			return 0;
		sleep_ms(5);
	}
	fprintf(stderr, "FAIL: %s is %d, want %d\n", name, v, want);
	return -1;
}

static int same_endpoint(const struct xo_endpoint *a,
			 const struct xo_endpoint *b)
{
	return a->family == b->family && a->port == b->port &&
	       a->scope_id == b->scope_id &&
	       !memcmp(a->addr, b->addr, sizeof(a->addr));
}

static int same_bytes(const uint8_t *a, const uint8_t *b, uint32_t len)
{
	if (!len)
		return 1;
	return a && b && !memcmp(a, b, len);
}

/* Every field the codec carries survived the round trip. */
static int same_state(const struct xo_tcp_state *a,
		      const struct xo_tcp_state *b)
{
	return same_endpoint(&a->local, &b->local) &&
	       same_endpoint(&a->remote, &b->remote) &&
	       a->snd_seq == b->snd_seq && a->rcv_seq == b->rcv_seq &&
	       a->snd_wl1 == b->snd_wl1 && a->snd_wnd == b->snd_wnd &&
	       a->max_window == b->max_window && a->rcv_wnd == b->rcv_wnd &&
	       a->rcv_wup == b->rcv_wup && a->mss_clamp == b->mss_clamp &&
	       a->timestamp == b->timestamp && a->options == b->options &&
	       a->snd_wscale == b->snd_wscale &&
	       a->rcv_wscale == b->rcv_wscale &&
	       a->has_peer_mac == b->has_peer_mac &&
	       !memcmp(a->peer_mac, b->peer_mac, sizeof(a->peer_mac)) &&
	       a->inflight_len == b->inflight_len &&
	       a->unsent_len == b->unsent_len &&
	       a->recvq_len == b->recvq_len && a->app_len == b->app_len &&
	       a->meta_len == b->meta_len &&
	       same_bytes(a->sendq, b->sendq,
			  a->inflight_len + a->unsent_len) &&
	       same_bytes(a->recvq, b->recvq, a->recvq_len) &&
	       same_bytes(a->app_data, b->app_data, a->app_len) &&
	       same_bytes(a->meta, b->meta, a->meta_len);
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* ---- (a) TCP capture / codec / restore ---------------------------- */

#define C2S_LEN 1000  /* client -> server before the move */
#define S_READ 100    /* of which the server reads this much ... */
#define S2C_LEN 700   /* server -> client before the move */
#define NEW_LEN 333   /* each way after the move */

static int tcp_part(void)
{
	static const uint8_t mac[6] = { 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30 };
	static const uint8_t meta[] = "plugin=smoke";
	uint8_t c2s[C2S_LEN], s2c[S2C_LEN], buf[C2S_LEN];
	uint8_t new_c2s[NEW_LEN], new_s2c[NEW_LEN];
	struct xo_tcp_state st, st2;
	struct xo_restore_opts ropts;
	struct sockaddr_in sin;
	socklen_t sl = sizeof(sin);
	uint8_t *wire = NULL;
	size_t wire_cap;
	int64_t wire_len;
	unsigned int capture_calls, restore_calls;
	int lfd = -1, cfd = -1, sfd = -1, rfd = -1;
	int ret, rc = -1;

	memset(&st, 0, sizeof(st));
	memset(&st2, 0, sizeof(st2));
	fill_pattern(c2s, sizeof(c2s), 1);
	fill_pattern(s2c, sizeof(s2c), 2);
	fill_pattern(new_c2s, sizeof(new_c2s), 3);
	fill_pattern(new_s2c, sizeof(new_s2c), 4);

	/* A loopback connection; the listener goes once it has accepted. */
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0) {
		sys_failed("socket(listener)");
		goto out;
	}
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
	    listen(lfd, 1) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sin, &sl) < 0) {
		sys_failed("listener bind/listen/getsockname");
		goto out;
	}
	cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (cfd < 0) {
		sys_failed("socket(client)");
		goto out;
	}
	if (connect(cfd, (struct sockaddr *)&sin, sizeof(sin)) < 0) {
		sys_failed("connect");
		goto out;
	}
	sfd = accept(lfd, NULL, NULL);
	if (sfd < 0) {
		sys_failed("accept");
		goto out;
	}
	close_fd(&lfd);

	/* Bytes both ways; the server reads only the "request" part. */
	if (send_all(cfd, c2s, sizeof(c2s)) ||
	    wait_queue(sfd, SIOCINQ, C2S_LEN, "server SIOCINQ") ||
	    recv_exact(sfd, buf, S_READ))
		goto out;
	CHECK(!memcmp(buf, c2s, S_READ));
	if (send_all(sfd, s2c, sizeof(s2c)) ||
	    recv_exact(cfd, buf, S2C_LEN))
		goto out;
	CHECK(!memcmp(buf, s2c, S2C_LEN));
	/* Settle: the rest unread on the server, its send queue acked. */
	if (wait_queue(sfd, SIOCINQ, C2S_LEN - S_READ, "server SIOCINQ") ||
	    wait_queue(sfd, SIOCOUTQ, 0, "server SIOCOUTQ"))
		goto out;

	/* Host side: freeze, capture, add what the application knows. */
	XO_TRY(ret, xo_tcp_freeze(sfd));
	XO_TRY(ret, xo_tcp_capture(sfd, &st));
	capture_calls = xo_last_syscalls();
	printf("capture syscalls: %u\n", capture_calls);
	printf("captured: inflight %u unsent %u recvq %u options 0x%x mss %u\n",
	       st.inflight_len, st.unsent_len, st.recvq_len, st.options,
	       st.mss_clamp);
	CHECK(st.local.family == AF_INET && st.remote.family == AF_INET);
	CHECK(st.local.port == ntohs(sin.sin_port));
	CHECK(st.recvq_len == C2S_LEN - S_READ);
	CHECK(!memcmp(st.recvq, c2s + S_READ, st.recvq_len));
	CHECK(st.inflight_len == 0 && st.unsent_len == 0);
	XO_TRY(ret, xo_state_set_app_data(&st, c2s, S_READ));
	XO_TRY(ret, xo_state_set_meta(&st, meta, sizeof(meta)));
	xo_state_set_peer_mac(&st, mac);

	/* The wire: encode, decode into a second state. */
	wire_cap = xo_state_encoded_size(&st);
	CHECK(wire_cap > 0);
	wire = malloc(wire_cap);
	CHECK(wire != NULL);
	XO_TRY(wire_len, xo_state_encode(&st, wire, wire_cap));
	CHECK((size_t)wire_len == wire_cap);
	ret = (int)xo_state_encode(&st, wire, wire_cap - 1);
	CHECK(ret == XO_E_NOSPACE);
	XO_TRY(ret, xo_state_decode(wire, (size_t)wire_len, &st2));
	CHECK(same_state(&st, &st2));
	/* A cut-short state is refused and leaves the target state empty. */
	xo_state_release(&st);
	ret = xo_state_decode(wire, (size_t)wire_len - 1, &st);
	CHECK(ret < 0);
	CHECK(st.recvq == NULL && st.app_len == 0); /* left empty */
	printf("codec: %lld bytes, round trip equal\n", (long long)wire_len);

	/* The old socket goes without a word to the peer (which sends
	 * nothing from here until the restored socket exists). */
	XO_TRY(ret, xo_tcp_discard(sfd));
	sfd = -1;

	/* Target side, from the decoded copy only. */
	memset(&ropts, 0, sizeof(ropts));
	ropts.size = sizeof(ropts);
	XO_TRY(rfd, xo_tcp_restore(&st2, &ropts));
	restore_calls = xo_last_syscalls();
	printf("restore syscalls: %u\n", restore_calls);
	XO_TRY(ret, xo_tcp_resume(rfd, &st2));

	/* The unread bytes are there, then nothing else. */
	if (recv_exact(rfd, buf, C2S_LEN - S_READ))
		goto out;
	CHECK(!memcmp(buf, c2s + S_READ, C2S_LEN - S_READ));
	CHECK(same_bytes(st2.app_data, c2s, S_READ));
	if (expect_no_data(rfd))
		goto out;

	/* A new exchange both ways on the restored socket. */
	if (send_all(cfd, new_c2s, sizeof(new_c2s)) ||
	    recv_exact(rfd, buf, NEW_LEN))
		goto out;
	CHECK(!memcmp(buf, new_c2s, NEW_LEN));
	if (send_all(rfd, new_s2c, sizeof(new_s2c)) ||
	    recv_exact(cfd, buf, NEW_LEN))
		goto out;
	CHECK(!memcmp(buf, new_s2c, NEW_LEN));
	if (expect_no_data(cfd) || expect_no_data(rfd))
		goto out;
	printf("tcp: moved; %d unread + %d new bytes each way arrived\n",
	       C2S_LEN - S_READ, NEW_LEN);
	rc = 0;
out:
	xo_state_release(&st);
	xo_state_release(&st2);
	free(wire);
	close_fd(&rfd);
	if (sfd >= 0 && xo_tcp_discard(sfd) < 0)
		close(sfd); /* not frozen: a normal close is fine */
	close_fd(&cfd);
	close_fd(&lfd);
	return rc;
}

/* ---- (b) control channel ------------------------------------------- */

static int fill_random(uint8_t *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = getrandom(buf + done, len - done, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return sys_failed("getrandom");
		}
		done += (size_t)n;
	}
	return 0;
}

static int chan_part(void)
{
	static const uint8_t payload[] = "BEGIN_OFFLOAD state would go here";
	uint8_t nonce_a[XO_HELLO_NONCE_LEN], nonce_b[XO_HELLO_NONCE_LEN];
	uint8_t key[32];
	uint8_t hello_a[256], hello_b[256], frame[256], frame2[256];
	struct xo_chan a, b;
	struct xo_msg msg;
	int64_t hello_a_len, hello_b_len, len, len2;
	int ret, rc = -1;

	if (fill_random(key, sizeof(key)) ||
	    fill_random(nonce_a, sizeof(nonce_a)) ||
	    fill_random(nonce_b, sizeof(nonce_b)))
		goto out;
	XO_TRY(ret, xo_chan_init(&a, key, sizeof(key), 0, 0));
	XO_TRY(ret, xo_chan_init(&b, key, sizeof(key), 0, 1));

	/* HELLO both ways on channel 0, each carrying its nonce. */
	XO_TRY(hello_a_len, xo_chan_seal(&a, XO_MSG_HELLO, 0, 0, nonce_a,
					 sizeof(nonce_a), hello_a,
					 sizeof(hello_a)));
	CHECK((size_t)hello_a_len == xo_env_size(sizeof(nonce_a)));
	XO_TRY(ret, xo_chan_open(&b, hello_a, (size_t)hello_a_len, &msg));
	CHECK(msg.type == XO_MSG_HELLO && msg.sender_role == 0);
	CHECK(msg.payload_len == XO_HELLO_NONCE_LEN &&
	      !memcmp(msg.payload, nonce_a, XO_HELLO_NONCE_LEN));
	XO_TRY(hello_b_len, xo_chan_seal(&b, XO_MSG_HELLO, 0, 0, nonce_b,
					 sizeof(nonce_b), hello_b,
					 sizeof(hello_b)));
	XO_TRY(ret, xo_chan_open(&a, hello_b, (size_t)hello_b_len, &msg));
	CHECK(msg.type == XO_MSG_HELLO && msg.sender_role == 1);
	CHECK(msg.payload_len == XO_HELLO_NONCE_LEN &&
	      !memcmp(msg.payload, nonce_b, XO_HELLO_NONCE_LEN));

	XO_TRY(ret, xo_chan_bind(&a, nonce_a, nonce_b));
	XO_TRY(ret, xo_chan_bind(&b, nonce_b, nonce_a));
	CHECK(a.channel_id == b.channel_id && a.channel_id != 0);
	printf("chan: bound to channel %016" PRIx64 "\n", a.channel_id);

	/* A HELLO of the old (unbound) session no longer opens. */
	ret = xo_chan_open(&b, hello_a, (size_t)hello_a_len, &msg);
	CHECK(ret == XO_E_CHANNEL);

	/* One message a -> b. */
	XO_TRY(len, xo_chan_seal(&a, XO_MSG_BEGIN_OFFLOAD, 0x5, 42, payload,
				 sizeof(payload), frame, sizeof(frame)));
	CHECK(xo_env_frame_len(frame, XO_ENV_HEADER_LEN) == len);
	memcpy(frame2, frame, (size_t)len);
	XO_TRY(ret, xo_chan_open(&b, frame, (size_t)len, &msg));
	CHECK(msg.type == XO_MSG_BEGIN_OFFLOAD && msg.flags == 0x5 &&
	      msg.conn_id == 42 && msg.sender_role == 0 &&
	      msg.channel_id == b.channel_id);
	CHECK(msg.payload_len == sizeof(payload) &&
	      !memcmp(msg.payload, payload, sizeof(payload)));

	/* The same frame again (as sent) is a replay. */
	ret = xo_chan_open(&b, frame2, (size_t)len, &msg);
	CHECK(ret == XO_E_REPLAY);
	printf("chan: replay refused: %s\n", xo_last_error());

	/* A fresh frame with one bit flipped does not authenticate, and the
	 * rejection leaves the channel able to take the genuine frame. */
	XO_TRY(len2, xo_chan_seal(&a, XO_MSG_TARGET_READY, 0, 42, payload,
				  sizeof(payload), frame2, sizeof(frame2)));
	memcpy(frame, frame2, (size_t)len2); /* open decrypts in place */
	frame2[XO_ENV_HEADER_LEN + 3] ^= 0x10;
	ret = xo_chan_open(&b, frame2, (size_t)len2, &msg);
	CHECK(ret == XO_E_AUTH);
	printf("chan: flipped bit refused: %s\n", xo_last_error());
	XO_TRY(ret, xo_chan_open(&b, frame, (size_t)len2, &msg));
	CHECK(msg.type == XO_MSG_TARGET_READY && msg.seq == a.send_seq);

	/* A frame reflected back to its sender does not decrypt there:
	 * each direction has its own key. */
	XO_TRY(len2, xo_chan_seal(&a, XO_MSG_PING, 0, 0, payload,
				  sizeof(payload), frame2, sizeof(frame2)));
	CHECK(memcmp(frame2 + XO_ENV_HEADER_LEN, payload, sizeof(payload)));
	ret = xo_chan_open(&a, frame2, (size_t)len2, &msg);
	CHECK(ret == XO_E_AUTH);
	rc = 0;
out:
	xo_chan_free(&a);
	xo_chan_free(&b);
	return rc;
}

/* ---- (c) steering --------------------------------------------------- */

static int steer_part(const char *obj_path)
{
	struct xo_steer_opts opts;
	struct xo_steer_action act, got;
	struct xo_flow_key key;
	struct xo_steer *s = NULL;
	struct in_addr ip;
	int64_t n;
	int ret, rc = -1;

	memset(&opts, 0, sizeof(opts));
	opts.size = sizeof(opts);
	opts.flags = XO_STEER_F_NO_PIN;
	opts.obj_path = obj_path;
	XO_TRY(ret, xo_steer_open(&opts, &s));
	CHECK(!strcmp(xo_steer_pin_dir(s), ""));
	CHECK(xo_steer_map_fd(s) >= 0);
	XO_TRY(n, xo_steer_count(s));
	CHECK(n == 0); /* private map: starts empty */

	/* client 198.18.0.10:20001 -> host 198.18.0.1:80, network order */
	memset(&key, 0, sizeof(key));
	key.family = XO_AF_INET;
	key.proto = XO_IPPROTO_TCP;
	CHECK(inet_pton(AF_INET, "198.18.0.10", &ip) == 1);
	memcpy(key.src_addr, &ip, 4);
	CHECK(inet_pton(AF_INET, "198.18.0.1", &ip) == 1);
	memcpy(key.dst_addr, &ip, 4);
	key.src_port = htons(20001);
	key.dst_port = htons(80);

	memset(&act, 0, sizeof(act));
	act.kind = XO_STEER_BLOCK;
	act.owner = 77;
	act.expires_ns = xo_steer_now_ns() + 30ull * 1000000000ull;

	XO_TRY(ret, xo_steer_insert(s, &key, &act, XO_STEER_CREATE));
	ret = xo_steer_insert(s, &key, &act, XO_STEER_CREATE);
	CHECK(ret == XO_E_BUSY);
	memset(&got, 0, sizeof(got));
	XO_TRY(ret, xo_steer_lookup(s, &key, &got));
	CHECK(got.kind == XO_STEER_BLOCK && got.owner == 77 &&
	      got.expires_ns == act.expires_ns);
	XO_TRY(n, xo_steer_count(s));
	CHECK(n == 1);

	XO_TRY(ret, xo_steer_remove(s, &key));
	ret = xo_steer_lookup(s, &key, &got);
	CHECK(ret == XO_E_NOTFOUND);
	ret = xo_steer_remove(s, &key);
	CHECK(ret == XO_E_NOTFOUND);
	XO_TRY(n, xo_steer_count(s));
	CHECK(n == 0);
	printf("steer: block rule inserted, looked up, removed\n");
	rc = 0;
out:
	if (s)
		xo_steer_close(s, 0);
	return rc;
}

int main(int argc, char **argv)
{
	int failed = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: %s path/to/xo_steer.bpf.o\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (tcp_part()) {
		fprintf(stderr, "FAIL: part (a) TCP capture/restore\n");
		failed = 1;
	}
	if (chan_part()) {
		fprintf(stderr, "FAIL: part (b) control channel\n");
		failed = 1;
	}
	if (steer_part(argv[1])) {
		fprintf(stderr, "FAIL: part (c) steering\n");
		failed = 1;
	}
	if (failed)
		return 1;
	printf("C API OK\n");
	return 0;
}
