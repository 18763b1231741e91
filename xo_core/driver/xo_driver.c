// SPDX-License-Identifier: MIT
/*
 * xo-driver: the handoff protocol driven from C alone, with a poll() loop.
 *
 * The same small HTTP/1.1 application as the Python reference app (static
 * files from a docroot, keep-alive, X-Served-By), in either role:
 *   host    reads each request, hands the connection to a target through
 *           the core's protocol machine, serves locally when it rolls back
 *   target  adopts connections, serves the request, hands the connection
 *           back once the response is acknowledged
 * It is the skeleton an event-loop server (nginx) follows: the machine
 * owns the protocol; this file owns sockets, buffers and the clock.
 *
 *   xo-driver CONFIG_FILE
 *
 * The config file has one "name value" per line (see docs/protocol.md);
 * READY is printed on stdout once the role is serving.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "xo.h"
#include "xo_proto.h"
#include "xo_steer.h"

#define MAX_TARGETS 16
#define MAX_HEAD 65536
#define MAX_POLL 4096

/* ---- configuration ------------------------------------------------------ */

struct target_cfg {
	char name[32];
	char ip[64];
	uint8_t mac[6];
	int port;           /* its control port (0: the config's) */
};

struct config {
	bool host;
	char name[32];
	char ip4[64], ip6[64];
	int http_port, control_port, ifindex;
	uint32_t owner;
	uint8_t mac[6];
	char key[PATH_MAX], docroot[PATH_MAX], pin_dir[PATH_MAX],
		obj[PATH_MAX], timings[PATH_MAX], crash_at[16], policy[32];
	struct target_cfg targets[MAX_TARGETS];
	int n_targets;
	char hosts[XO_PROTO_MAX_HOSTS][64];
	int n_hosts;
	uint32_t redirect_ttl_ms, drain_timeout_ms, park_ring_bytes;
	struct xo_proto_config knobs; /* the timing knobs only */
};

/* "timeout NAME MS": the names of xo.proto.Timeouts. */
static int set_timeout(struct config *c, const char *name, uint32_t ms)
{
	static const struct {
		const char *name;
		size_t off;
	} knobs[] = {
		{ "ready", offsetof(struct xo_proto_config, ready_timeout_ms) },
		{ "confirm", offsetof(struct xo_proto_config, confirm_timeout_ms) },
		{ "handshake", offsetof(struct xo_proto_config, handshake_timeout_ms) },
		{ "ping_interval", offsetof(struct xo_proto_config, ping_interval_ms) },
		{ "peer", offsetof(struct xo_proto_config, peer_timeout_ms) },
		{ "send", offsetof(struct xo_proto_config, send_timeout_ms) },
		{ "block_ttl", offsetof(struct xo_proto_config, block_ttl_ms) },
		{ "redirect_ttl", offsetof(struct xo_proto_config, redirect_ttl_ms) },
		{ "closed_ttl", offsetof(struct xo_proto_config, closed_ttl_ms) },
		{ "load_interval", offsetof(struct xo_proto_config, load_interval_ms) },
	};
	size_t i;

	for (i = 0; i < sizeof(knobs) / sizeof(knobs[0]); i++)
		if (!strcmp(knobs[i].name, name)) {
			memcpy((char *)&c->knobs + knobs[i].off, &ms, sizeof(ms));
			return 0;
		}
	return -1;
}

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "xo-driver: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static void logf_(const char *fmt, ...)
{
	struct timespec ts;
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	fprintf(stderr, "%lld.%03ld ", (long long)ts.tv_sec,
		ts.tv_nsec / 1000000);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static int parse_mac(const char *s, uint8_t *mac)
{
	unsigned int b[6];
	int i;

	if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4],
		   &b[5]) != 6)
		return -1;
	for (i = 0; i < 6; i++)
		mac[i] = (uint8_t)b[i];
	return 0;
}

static void copy(char *dst, size_t cap, const char *src, const char *what)
{
	if (strlen(src) >= cap)
		die("config: %s too long", what);
	memcpy(dst, src, strlen(src) + 1);
}

static void load_config(const char *path, struct config *c)
{
	char line[1024], k[64], v1[PATH_MAX], v2[128], v3[64], v4[16];
	FILE *f = fopen(path, "r");
	int n, lineno = 0;

	if (!f)
		die("config %s: %s", path, strerror(errno));
	memset(c, 0, sizeof(*c));
	c->control_port = XO_DEFAULT_CONTROL_PORT;
	c->drain_timeout_ms = 2000;
	strcpy(c->policy, "least_loaded");
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		if (line[0] == '#' || line[0] == '\n')
			continue;
		v4[0] = '\0';
		n = sscanf(line, "%63s %4095s %127s %63s %15s", k, v1, v2, v3, v4);
		if (n < 2)
			die("config %s:%d: want 'name value'", path, lineno);
		if (!strcmp(k, "role"))
			c->host = !strcmp(v1, "host");
		else if (!strcmp(k, "name"))
			copy(c->name, sizeof(c->name), v1, k);
		else if (!strcmp(k, "ip4"))
			copy(c->ip4, sizeof(c->ip4), v1, k);
		else if (!strcmp(k, "ip6"))
			copy(c->ip6, sizeof(c->ip6), v1, k);
		else if (!strcmp(k, "http_port"))
			c->http_port = atoi(v1);
		else if (!strcmp(k, "control_port"))
			c->control_port = atoi(v1);
		else if (!strcmp(k, "ifindex"))
			c->ifindex = atoi(v1);
		else if (!strcmp(k, "owner"))
			c->owner = (uint32_t)strtoul(v1, NULL, 0);
		else if (!strcmp(k, "mac")) {
			if (parse_mac(v1, c->mac))
				die("config %s:%d: bad MAC", path, lineno);
		} else if (!strcmp(k, "key"))
			copy(c->key, sizeof(c->key), v1, k);
		else if (!strcmp(k, "docroot"))
			copy(c->docroot, sizeof(c->docroot), v1, k);
		else if (!strcmp(k, "pin_dir"))
			copy(c->pin_dir, sizeof(c->pin_dir), v1, k);
		else if (!strcmp(k, "bpf_object"))
			copy(c->obj, sizeof(c->obj), v1, k);
		else if (!strcmp(k, "timings"))
			copy(c->timings, sizeof(c->timings), v1, k);
		else if (!strcmp(k, "crash_at"))
			copy(c->crash_at, sizeof(c->crash_at), v1, k);
		else if (!strcmp(k, "policy"))
			copy(c->policy, sizeof(c->policy), v1, k);
		else if (!strcmp(k, "redirect_ttl_ms"))
			c->redirect_ttl_ms = (uint32_t)atoi(v1);
		else if (!strcmp(k, "drain_timeout_ms"))
			c->drain_timeout_ms = (uint32_t)atoi(v1);
		else if (!strcmp(k, "park_ring_bytes"))
			c->park_ring_bytes = (uint32_t)strtoul(v1, NULL, 0);
		else if (!strcmp(k, "bytes_follow_min"))
			c->knobs.bytes_follow_min = (uint32_t)strtoul(v1, NULL, 0);
		else if (!strcmp(k, "target")) {
			struct target_cfg *t = &c->targets[c->n_targets];

			if (n < 4 || c->n_targets == MAX_TARGETS)
				die("config %s:%d: target NAME IP MAC", path, lineno);
			copy(t->name, sizeof(t->name), v1, k);
			copy(t->ip, sizeof(t->ip), v2, k);
			if (parse_mac(v3, t->mac))
				die("config %s:%d: bad MAC", path, lineno);
			t->port = n == 5 ? atoi(v4) : 0;
			c->n_targets++;
		} else if (!strcmp(k, "mode") || !strcmp(k, "ingress") ||
			   !strcmp(k, "move_policy")) {
			/* Settings of the Python app: only their defaults are
			 * what this driver does. */
			if (strcmp(v1, !strcmp(k, "mode") ? "xo" :
				   !strcmp(k, "ingress") ? "tc" : "none"))
				die("config %s:%d: %s %s: this driver offloads every request "
				    "(mode xo), steers in tc, makes no moves", path, lineno, k, v1);
		} else if (!strcmp(k, "offload_min_bytes")) {
			/* The Python app proxies small objects; this driver has
			 * no proxy, so it refuses the setting rather than
			 * silently handing off everything. */
			if (strcmp(v1, "0"))
				die("config %s:%d: offload_min_bytes %s: this driver hands off every "
				    "request and cannot proxy below a size; use the Python app "
				    "(python -m xo.refapp) or leave it out", path, lineno, v1);
		} else if (!strcmp(k, "lab")) {
			/* for the Python app's XDP preparation; nothing here */
		} else if (!strcmp(k, "timeout")) {
			if (n < 3 || set_timeout(c, v1, (uint32_t)atoi(v2)))
				die("config %s:%d: timeout NAME MILLISECONDS", path,
				    lineno);
		} else if (!strcmp(k, "host")) {
			if (c->n_hosts == XO_PROTO_MAX_HOSTS)
				die("config %s:%d: too many hosts", path, lineno);
			copy(c->hosts[c->n_hosts++], 64, v1, k);
		} else {
			die("config %s:%d: unknown setting %s", path, lineno, k);
		}
	}
	fclose(f);
	if (!c->ip4[0] || !c->key[0] || !c->docroot[0] || !c->pin_dir[0] ||
	    !c->obj[0] || !c->ifindex)
		die("config %s: ip4, key, docroot, pin_dir, bpf_object and ifindex are required",
		    path);
}

/* ---- state ------------------------------------------------------------------ */

enum client_state {
	C_READ,      /* reading a request */
	C_WRITE,     /* sending a response */
	C_DRAIN,     /* target: waiting for the response to be acknowledged */
	C_MACHINE,   /* the machine owns the socket */
};

struct client {
	struct client *next;
	int fd;
	enum client_state state;
	uint64_t conn;      /* machine handle (target; host while offloading) */
	char client[80];    /* target: the client, for the log */
	char *in;
	size_t in_len, in_cap;
	char out[1024];
	size_t out_len, out_off;
	int file_fd;
	off_t file_off;
	size_t file_left;
	bool close_after;
	uint64_t drain_until;
};

struct control {
	int fd;
	uint32_t peer;
	int target;         /* host: index in cfg.targets */
	uint64_t retry_at;  /* host: reconnect time */
};

static struct config cfg;
static struct xo_proto *machine;
static struct xo_steer *steer;
static struct xo_rules *rules;
static struct client *clients;
static struct control controls[MAX_TARGETS + 64];
static int n_controls;
static int listeners[2] = { -1, -1 };
static volatile sig_atomic_t stopping;
static uint64_t requests, served_locally;
static uint64_t not_started; /* offloads refused before they began */

/* timings: name -> samples */
struct series {
	char name[48];
	double *v;
	size_t n, cap;
};
static struct series series[32];
static int n_series;

static uint64_t now_ns(void)
{
	return xo_steer_now_ns();
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		die("fcntl(O_NONBLOCK): %s", strerror(errno));
}

static void collect_steps(void)
{
	struct xo_proto_step steps[1024];
	int n, i, j;

	while ((n = xo_proto_take_steps(machine, steps, 1024)) > 0) {
		for (i = 0; i < n; i++) {
			const char *name = xo_proto_step_name(steps[i].transfer,
							      steps[i].step);
			struct series *s = NULL;

			for (j = 0; j < n_series; j++)
				if (!strcmp(series[j].name, name))
					s = &series[j];
			if (!s) {
				if (n_series == 32)
					continue;
				s = &series[n_series++];
				snprintf(s->name, sizeof(s->name), "%s", name);
			}
			if (s->n == s->cap) {
				size_t cap = s->cap ? 2 * s->cap : 1024;
				double *v = realloc(s->v, cap * sizeof(*v));

				if (!v)
					continue;
				s->v = v;
				s->cap = cap;
			}
			s->v[s->n++] = steps[i].ns / 1000.0;
		}
		if (n < 1024)
			break;
	}
}

static void write_timings(void)
{
	FILE *f;
	int i;
	size_t j;

	if (!cfg.timings[0])
		return;
	collect_steps();
	f = fopen(cfg.timings, "w");
	if (!f) {
		logf_("timings %s: %s", cfg.timings, strerror(errno));
		return;
	}
	fputc('{', f);
	for (i = 0; i < n_series; i++) {
		fprintf(f, "%s\"%s\": [", i ? ", " : "", series[i].name);
		for (j = 0; j < series[i].n; j++)
			fprintf(f, "%s%.3f", j ? ", " : "", series[i].v[j]);
		fputc(']', f);
	}
	fputs("}\n", f);
	fclose(f);
}

static int parse_ep(const char *ip, int port, struct xo_endpoint *ep)
{
	memset(ep, 0, sizeof(*ep));
	ep->port = (uint16_t)port;
	if (inet_pton(AF_INET, ip, ep->addr) == 1) {
		ep->family = AF_INET;
		return 0;
	}
	if (inet_pton(AF_INET6, ip, ep->addr) == 1) {
		ep->family = AF_INET6;
		return 0;
	}
	return -1;
}

static int listen_on(const char *ip, int port)
{
	struct sockaddr_storage ss;
	struct xo_endpoint ep;
	socklen_t len;
	int fd, one = 1;

	if (parse_ep(ip, port, &ep))
		die("bad address %s", ip);
	len = (socklen_t)xo_endpoint_to_sockaddr(&ep, &ss, sizeof(ss));
	fd = socket(ep.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("SO_REUSEADDR: %s", strerror(errno));
	if (ep.family == AF_INET6 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) < 0)
		die("IPV6_V6ONLY: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0)
		die("bind %s:%d: %s", ip, port, strerror(errno));
	if (listen(fd, 512) < 0)
		die("listen: %s", strerror(errno));
	return fd;
}

/* ---- clients and HTTP -------------------------------------------------------- */

static struct client *client_new(int fd, const uint8_t *data, size_t len)
{
	struct client *c = calloc(1, sizeof(*c));
	int one = 1;

	if (!c)
		die("out of memory");
	c->fd = fd;
	c->file_fd = -1;
	c->state = C_READ;
	if (len) {
		c->in = malloc(len);
		if (!c->in)
			die("out of memory");
		memcpy(c->in, data, len);
		c->in_len = c->in_cap = len;
	}
	set_nonblock(fd);
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		logf_("TCP_NODELAY: %s", strerror(errno));
	c->next = clients;
	clients = c;
	return c;
}

static void client_free(struct client *c, bool close_fd)
{
	struct client **pp;

	for (pp = &clients; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	if (close_fd && c->fd >= 0)
		close(c->fd);
	if (c->file_fd >= 0)
		close(c->file_fd);
	free(c->in);
	free(c);
}

static struct client *client_by_conn(uint64_t conn)
{
	struct client *c;

	for (c = clients; c; c = c->next)
		if (c->state == C_MACHINE && c->conn == conn)
			return c;
	return NULL;
}

struct request {
	char method[16], path[1024], version[16];
	size_t len;         /* head + body */
	bool keep_alive;
	const char *bad;
};

static const char *header(const char *head, size_t head_len, const char *name,
			  size_t *vlen)
{
	size_t nlen = strlen(name);
	const char *p = memchr(head, '\n', head_len), *end = head + head_len;

	while (p && p + 1 < end) {
		const char *line = p + 1, *eol = memchr(line, '\n', (size_t)(end - line));

		if (!eol)
			break;
		if ((size_t)(eol - line) > nlen && !strncasecmp(line, name, nlen) &&
		    line[nlen] == ':') {
			const char *v = line + nlen + 1;

			while (v < eol && (*v == ' ' || *v == '\t'))
				v++;
			*vlen = (size_t)(eol - v);
			while (*vlen && (v[*vlen - 1] == '\r' || v[*vlen - 1] == ' '))
				(*vlen)--;
			return v;
		}
		p = eol;
	}
	return NULL;
}

static void url_decode(char *s)
{
	char *o = s;

	for (; *s; s++) {
		unsigned int x;

		if (*s == '%' && sscanf(s + 1, "%2x", &x) == 1) {
			*o++ = (char)x;
			s += 2;
		} else {
			*o++ = *s;
		}
	}
	*o = '\0';
}

/* 1: a whole request in c->in (r filled); 0: need more bytes. */
static int parse_request(struct client *c, struct request *r)
{
	const char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4), *v;
	size_t head_len, vlen, body = 0;
	char line[1200], *q;

	memset(r, 0, sizeof(*r));
	if (!end) {
		if (c->in_len > MAX_HEAD) {
			r->bad = "request head too large";
			return 1;
		}
		return 0;
	}
	head_len = (size_t)(end - c->in) + 4;
	v = memchr(c->in, '\n', head_len);
	if (!v || (size_t)(v - c->in) >= sizeof(line)) {
		r->bad = "bad request line";
		return 1;
	}
	memcpy(line, c->in, (size_t)(v - c->in));
	line[v - c->in] = '\0';
	if (sscanf(line, "%15s %1023s %15s", r->method, r->path, r->version) != 3) {
		r->bad = "bad request line";
		return 1;
	}
	if (header(c->in, head_len, "transfer-encoding", &vlen)) {
		r->bad = "chunked request bodies are not supported";
		return 1;
	}
	if ((v = header(c->in, head_len, "content-length", &vlen)))
		body = strtoul(v, NULL, 10);
	if (c->in_len < head_len + body)
		return 0;
	r->len = head_len + body;
	v = header(c->in, head_len, "connection", &vlen);
	if (!strcmp(r->version, "HTTP/1.0"))
		r->keep_alive = v && vlen == 10 && !strncasecmp(v, "keep-alive", 10);
	else
		r->keep_alive = !(v && vlen == 5 && !strncasecmp(v, "close", 5));
	if ((q = strchr(r->path, '?')))
		*q = '\0';
	url_decode(r->path);
	return 1;
}

static void consume(struct client *c, size_t n)
{
	memmove(c->in, c->in + n, c->in_len - n);
	c->in_len -= n;
}

static void stats_json(char *buf, size_t cap)
{
	struct xo_proto_stats st;
	uint32_t ids[MAX_TARGETS + 64];
	int n, i, off;

	xo_proto_get_stats(machine, &st);
	off = snprintf(buf, cap,
		       "{\"offloads\": %llu, \"rollbacks\": %llu, \"returns\": %llu, "
		       "\"withdrawn\": %llu, \"closed_on_target\": %llu, "
		       "\"stragglers\": %llu, \"bytes_followed\": %llu, "
		       "\"bytes_missed\": %llu, \"owed_acks\": %llu, \"replays_late\": %llu, \"late_bytes\": %llu, "
		       "\"moves\": %llu, \"requests\": %llu, "
		       "\"served_locally\": %llu, \"proxied\": 0, \"offloaded_now\": %u, "
		       "\"rules\": %lld, \"driver\": \"c\", \"targets\": {",
		       (unsigned long long)st.offloads,
		       (unsigned long long)(st.rollbacks + not_started),
		       (unsigned long long)st.returns,
		       (unsigned long long)st.withdrawn,
		       (unsigned long long)st.closed_on_target,
		       (unsigned long long)st.stragglers,
		       (unsigned long long)st.bytes_followed,
		       (unsigned long long)st.bytes_missed,
		       (unsigned long long)st.owed_acks,
		       (unsigned long long)st.replays_late,
		       (unsigned long long)st.late_bytes,
		       (unsigned long long)st.moves, (unsigned long long)requests,
		       (unsigned long long)served_locally, st.active,
		       (long long)xo_steer_count(steer));
	n = xo_proto_peers(machine, ids, MAX_TARGETS + 64);
	for (i = 0; i < n && i < MAX_TARGETS + 64; i++) {
		struct xo_proto_peer_info info;

		if (xo_proto_peer_info(machine, ids[i], &info))
			continue;
		off += snprintf(buf + off, cap - (size_t)off,
				"%s\"%s\": {\"up\": %s, \"active\": %u, \"handoffs\": %u}",
				i ? ", " : "", info.name,
				info.state == XO_PEER_UP ? "true" : "false",
				info.load.active, info.load.handoffs);
	}
	snprintf(buf + off, cap - (size_t)off, "}}");
}

/* Set up the response to r in c (head in c->out, body from a file). */
static void respond(struct client *c, const struct request *r)
{
	const char *conn_hdr = r->keep_alive ? "keep-alive" : "close";
	char path[PATH_MAX * 2], real[PATH_MAX], root[PATH_MAX], body[64];
	struct stat sb;
	int fd = -1;
	bool get = !strcmp(r->method, "GET"), head = !strcmp(r->method, "HEAD");

	c->close_after = !r->keep_alive;
	c->out_off = 0;
	c->state = C_WRITE;
	if (cfg.host && !strcmp(r->path, "/_xo/stats")) {
		char json[4096];

		stats_json(json, sizeof(json));
		c->out_len = (size_t)snprintf(c->out, sizeof(c->out),
			"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
			"Content-Length: %zu\r\nX-Served-By: host\r\nConnection: %s\r\n\r\n",
			strlen(json), conn_hdr);
		/* The JSON may not fit in c->out: send it from a pipe-free
		 * buffer by growing the head buffer is overkill; trim instead. */
		if (c->out_len + strlen(json) < sizeof(c->out)) {
			memcpy(c->out + c->out_len, json, strlen(json));
			c->out_len += strlen(json);
		}
		return;
	}
	if ((get || head) && realpath(cfg.docroot, root)) {
		snprintf(path, sizeof(path), "%s/%s", root, r->path[0] == '/' ?
			 r->path + 1 : r->path);
		if (realpath(path, real) && !strncmp(real, root, strlen(root)) &&
		    real[strlen(root)] == '/' && !stat(real, &sb) &&
		    S_ISREG(sb.st_mode))
			fd = open(real, O_RDONLY | O_CLOEXEC);
	}
	if (fd < 0) {
		const char *status = get || head ? "404 Not Found" :
						   "405 Method Not Allowed";

		snprintf(body, sizeof(body), "%s\n", status);
		c->out_len = (size_t)snprintf(c->out, sizeof(c->out),
			"HTTP/1.1 %s\r\nContent-Length: %zu\r\nX-Served-By: %s\r\n"
			"Connection: %s\r\n\r\n%s", status, strlen(body),
			cfg.host ? "host" : cfg.name, conn_hdr, body);
		return;
	}
	c->out_len = (size_t)snprintf(c->out, sizeof(c->out),
		"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
		"Content-Length: %lld\r\nX-Served-By: %s\r\nConnection: %s\r\n\r\n",
		(long long)sb.st_size, cfg.host ? "host" : cfg.name, conn_hdr);
	if (head || !sb.st_size) {
		close(fd);
		return;
	}
	c->file_fd = fd;
	c->file_off = 0;
	c->file_left = (size_t)sb.st_size;
	if (!cfg.host) {
		xo_proto_add_served(machine, (uint64_t)sb.st_size);
		logf_("served %s %s bytes=%lld conn=%llx client=%s", r->method,
		      r->path, (long long)sb.st_size,
		      (unsigned long long)c->conn, c->client);
	}
}

static void bad_request(struct client *c, const char *why)
{
	c->out_len = (size_t)snprintf(c->out, sizeof(c->out),
		"HTTP/1.1 400 Bad Request\r\nContent-Length: %zu\r\n"
		"Connection: close\r\n\r\n400 Bad Request: %s\n",
		strlen(why) + 22, why);
	c->out_off = 0;
	c->close_after = true;
	c->state = C_WRITE;
}

static void pump(void);

/* The client at the end of its life here: the target tells the host. */
static void client_closed(struct client *c)
{
	if (!cfg.host && c->conn) {
		c->state = C_MACHINE;
		if (xo_proto_close_conn(machine, c->conn, now_ns()) == 0) {
			client_free(c, false); /* the machine closed the fd */
			return;
		}
	}
	client_free(c, true);
}

static void serve_requests(struct client *c)
{
	struct request r;
	uint32_t peer;
	int ret;

	while (c->state == C_READ) {
		ret = parse_request(c, &r);
		if (!ret)
			return;
		if (r.bad) {
			bad_request(c, r.bad);
			return;
		}
		requests++;
		if (cfg.host && strcmp(r.path, "/_xo/stats") &&
		    xo_proto_pick(machine, !strcmp(cfg.policy, "round_robin") ?
						   XO_PICK_ROUND_ROBIN :
						   XO_PICK_LEAST_LOADED,
				  now_ns(), &peer) == 0) {
			/* The request and anything after it go along. */
			if (xo_proto_offload(machine, peer, c->fd,
					     (const uint8_t *)c->in,
					     (uint32_t)c->in_len, now_ns(),
					     &c->conn) == 0) {
				c->state = C_MACHINE;
				c->in_len = 0;
				return;
			}
			logf_("handoff not started: %s", xo_last_error());
			not_started++;
		}
		if (cfg.host && strcmp(r.path, "/_xo/stats"))
			served_locally++;
		respond(c, &r);
		consume(c, r.len);
	}
}

static void after_response(struct client *c)
{
	if (c->close_after) {
		client_closed(c);
		return;
	}
	if (!cfg.host) {
		/* Hand back once the client acknowledged the response, so the
		 * host does not have to carry our unsent bytes. */
		c->state = C_DRAIN;
		c->drain_until = now_ns() + (uint64_t)cfg.drain_timeout_ms * 1000000;
		return;
	}
	c->state = C_READ;
	serve_requests(c);
}

/*
 * How soon to look again at a connection waiting for the client's ACK of
 * its response. No poll event says "everything acknowledged", so the driver
 * re-reads SIOCOUTQ on a timer: a quarter of the smoothed RTT (the ACK is
 * due about one RTT after the last segment left), between 20 us and 1 ms.
 */
static uint64_t drain_check_ns(const struct client *c)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	uint64_t ns;

	if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		return 1000000; /* fall back to the slowest check */
	ns = (uint64_t)ti.tcpi_rtt * 1000 / 4;
	if (ns < 20000)
		ns = 20000;
	return ns > 1000000 ? 1000000 : ns;
}

static void hand_back(struct client *c)
{
	if (xo_proto_hand_back(machine, c->conn, (const uint8_t *)c->in,
			       (uint32_t)c->in_len, now_ns()) == 0) {
		c->state = C_MACHINE;
		c->in_len = 0;
		return;
	}
	logf_("conn %llx: not handing back: %s", (unsigned long long)c->conn,
	      xo_last_error());
	c->state = C_READ;
	serve_requests(c);
}

static void client_write(struct client *c)
{
	while (c->out_off < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
				 MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EAGAIN)
				return;
			client_closed(c);
			return;
		}
		c->out_off += (size_t)n;
	}
	while (c->file_left) {
		ssize_t n = sendfile(c->fd, c->file_fd, &c->file_off,
				     c->file_left > (1 << 20) ? (1 << 20) :
								c->file_left);

		if (n < 0) {
			if (errno == EAGAIN)
				return;
			client_closed(c);
			return;
		}
		c->file_left -= (size_t)n;
	}
	if (c->file_fd >= 0) {
		close(c->file_fd);
		c->file_fd = -1;
	}
	after_response(c);
}

static void client_read(struct client *c)
{
	for (;;) {
		ssize_t n;

		if (c->in_cap - c->in_len < 65536) {
			size_t cap = c->in_cap ? 2 * c->in_cap : 65536;
			char *in = realloc(c->in, cap);

			if (!in)
				die("out of memory");
			c->in = in;
			c->in_cap = cap;
		}
		n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
		if (n < 0) {
			if (errno == EAGAIN)
				break;
			client_closed(c);
			return;
		}
		if (n == 0) {
			client_closed(c);
			return;
		}
		c->in_len += (size_t)n;
	}
	if (c->state == C_READ)
		serve_requests(c);
}

/* ---- control connections -------------------------------------------------- */

static struct control *control_by_peer(uint32_t peer)
{
	int i;

	for (i = 0; i < n_controls; i++)
		if (controls[i].peer == peer && controls[i].fd >= 0)
			return &controls[i];
	return NULL;
}

static void control_drop(struct control *k)
{
	if (k->fd >= 0)
		close(k->fd);
	k->fd = -1;
	k->peer = 0;
	k->retry_at = now_ns() + 1000000000ull;
}

static void connect_target(struct control *k)
{
	const struct target_cfg *t = &cfg.targets[k->target];
	struct xo_proto_peer_opts o = { .size = sizeof(o) };
	struct sockaddr_storage ss;
	socklen_t len;
	int fd;

	if (parse_ep(t->ip, t->port ? t->port : cfg.control_port, &o.addr))
		die("bad target address %s", t->ip);
	memcpy(o.mac, t->mac, 6);
	snprintf(o.name, sizeof(o.name), "%s", t->name);
	len = (socklen_t)xo_endpoint_to_sockaddr(&o.addr, &ss, sizeof(ss));
	fd = socket(o.addr.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	/* A blocking connect in the lab is quick; a target that is not up
	 * yet refuses at once, and we retry a second later. */
	if (connect(fd, (struct sockaddr *)&ss, len) < 0 ||
	    xo_ctl_sock_setup(fd, cfg.knobs.peer_timeout_ms) ||
	    xo_proto_peer_add(machine, &o, now_ns(), &k->peer)) {
		close(fd);
		k->retry_at = now_ns() + 1000000000ull;
		return;
	}
	set_nonblock(fd);
	k->fd = fd;
}

static void accept_control(int lfd)
{
	struct xo_proto_peer_opts o = { .size = sizeof(o) };
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	struct control *k;
	int fd, i;

	fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	if (xo_endpoint_from_sockaddr(&ss, len, &o.addr)) {
		close(fd);
		return;
	}
	for (k = NULL, i = 0; i < n_controls; i++)
		if (controls[i].fd < 0)
			k = &controls[i];
	if (!k && n_controls < (int)(sizeof(controls) / sizeof(controls[0])))
		k = &controls[n_controls++];
	if (!k || xo_ctl_sock_setup(fd, cfg.knobs.peer_timeout_ms) ||
	    xo_proto_peer_add(machine, &o, now_ns(), &k->peer)) {
		logf_("control connection refused: %s", xo_last_error());
		close(fd);
		return;
	}
	k->fd = fd;
	k->target = -1;
}

static void control_flush(struct control *k)
{
	const uint8_t *buf;
	size_t len;

	while (k->fd >= 0 && !xo_proto_peer_output(machine, k->peer, &buf, &len) &&
	       len) {
		ssize_t n = send(k->fd, buf, len, MSG_NOSIGNAL);

		if (n <= 0)
			return; /* EAGAIN: POLLOUT; errors show on read */
		xo_proto_peer_sent(machine, k->peer, (size_t)n, now_ns());
	}
}

static void control_read(struct control *k)
{
	uint8_t buf[65536];

	for (;;) {
		ssize_t n = recv(k->fd, buf, sizeof(buf), 0);

		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			xo_proto_peer_closed(machine, k->peer, now_ns());
			control_drop(k);
			return;
		}
		xo_proto_peer_input(machine, k->peer, buf, (size_t)n, now_ns());
		if (!control_by_peer(k->peer))
			return;
	}
}

/* ---- events ------------------------------------------------------------------ */

static void handle_event(const struct xo_proto_event *ev)
{
	struct client *c;
	struct control *k;

	switch (ev->type) {
	case XO_EV_PEER_UP:
		logf_("control connection %s up", ev->text);
		break;
	case XO_EV_PEER_CLOSED:
		logf_("control connection closed: %s", ev->text);
		k = control_by_peer(ev->peer);
		if (k) {
			control_flush(k); /* its last words */
			xo_proto_peer_closed(machine, ev->peer, now_ns());
			if (k->target >= 0)
				control_drop(k);
			else {
				close(k->fd);
				k->fd = -1;
				k->peer = 0;
			}
		}
		break;
	case XO_EV_OFFLOADED:
		c = client_by_conn(ev->conn);
		if (c)
			client_free(c, false); /* the machine discarded it */
		break;
	case XO_EV_ROLLED_BACK:
		logf_("conn %llx: rolled back: %s", (unsigned long long)ev->conn,
		      ev->text);
		c = client_by_conn(ev->conn);
		if (!c) {
			close(ev->fd);
			break;
		}
		c->state = C_READ;
		c->conn = 0;
		free(c->in);
		c->in = NULL;
		c->in_len = c->in_cap = 0;
		if (ev->data_len) {
			c->in = malloc(ev->data_len);
			if (!c->in)
				die("out of memory");
			memcpy(c->in, ev->data, ev->data_len);
			c->in_len = c->in_cap = ev->data_len;
		}
		/* Serve it here, without offloading this request again. */
		{
			struct request r;

			if (parse_request(c, &r) == 1 && !r.bad) {
				served_locally++;
				respond(c, &r);
				consume(c, r.len);
			} else {
				bad_request(c, r.bad ? r.bad : "incomplete request");
			}
		}
		break;
	case XO_EV_RETURNED:
		c = client_new(ev->fd, ev->data, ev->data_len);
		serve_requests(c);
		break;
	case XO_EV_WITHDRAWN:
		logf_("conn %llx: target lost; client probed",
		      (unsigned long long)ev->conn);
		break;
	case XO_EV_REFUSED:
		logf_("WARNING conn %llx: cannot adopt: %s",
		      (unsigned long long)ev->conn, ev->text);
		break;
	case XO_EV_ADOPTED:
		if (ev->code)
			logf_("conn %llx: %s", (unsigned long long)ev->conn,
			      ev->text);
		c = client_new(ev->fd, ev->data, ev->data_len);
		c->conn = ev->conn;
		{
			char ip[INET6_ADDRSTRLEN] = "?";
			bool v6 = ev->client.family == AF_INET6;

			inet_ntop(v6 ? AF_INET6 : AF_INET, ev->client.addr, ip,
				  sizeof(ip));
			snprintf(c->client, sizeof(c->client),
				 v6 ? "[%s]:%u" : "%s:%u", ip, ev->client.port);
		}
		serve_requests(c);
		break;
	case XO_EV_HANDED_BACK:
		c = client_by_conn(ev->conn);
		if (c)
			client_free(c, false);
		break;
	case XO_EV_KEPT:
		c = client_by_conn(ev->conn);
		if (c) {
			c->state = C_READ;
			if (ev->data_len) {
				c->in = realloc(c->in, ev->data_len);
				if (!c->in)
					die("out of memory");
				memcpy(c->in, ev->data, ev->data_len);
				c->in_len = c->in_cap = ev->data_len;
			}
			serve_requests(c);
		}
		break;
	case XO_EV_LOST:
		for (c = clients; c; c = c->next)
			if (c->conn == ev->conn)
				break;
		if (c)
			client_free(c, ev->fd >= 0);
		else if (ev->fd >= 0)
			close(ev->fd);
		break;
	default:
		break;
	}
}

static void pump(void)
{
	struct xo_proto_event ev;
	int i, rounds;

	for (rounds = 0; rounds < 1000; rounds++) {
		bool any = false;

		for (i = 0; i < n_controls; i++)
			control_flush(&controls[i]);
		while (xo_proto_next_event(machine, &ev)) {
			handle_event(&ev);
			any = true;
		}
		if (!any)
			break;
	}
}

/* ---- setup and the loop -------------------------------------------------------- */

static void setup(void)
{
	struct xo_steer_opts so = { .size = sizeof(so) };
	struct xo_proto_config pc = { .size = sizeof(pc) };
	uint8_t key[XO_KEY_MAX_LEN];
	int key_len, i, ret;

	key_len = xo_key_load(cfg.key, key, sizeof(key));
	if (key_len < 0)
		die("%s", xo_last_error());
	so.obj_path = cfg.obj;
	so.pin_dir = cfg.pin_dir;
	so.park_ring_bytes = cfg.park_ring_bytes;
	if (xo_steer_open(&so, &steer))
		die("steering: %s", xo_last_error());
	/* A restarted instance takes over: what its predecessor left goes. */
	if (xo_steer_purge_owner(steer, cfg.owner) < 0)
		die("purge: %s", xo_last_error());
	if (xo_steer_attach(steer, cfg.ifindex, XO_PROG_TC_INGRESS, NULL) ||
	    xo_steer_attach(steer, cfg.ifindex, XO_PROG_TC_EGRESS, NULL))
		die("attach: %s", xo_last_error());
	if (xo_rules_create(steer, cfg.ifindex, NULL, NULL, &rules))
		die("rules: %s", xo_last_error());
	pc = cfg.knobs;
	pc.size = sizeof(pc);
	pc.role = cfg.host ? XO_ROLE_HOST : XO_ROLE_TARGET;
	/* No TLS record layer here: a TLS session is served only through
	 * kernel TLS. */
	pc.tls_kernel_only = 1;
	pc.key = key;
	pc.key_len = (uint32_t)key_len;
	pc.owner = cfg.owner;
	pc.rules = rules;
	pc.steer = steer;
	if (cfg.redirect_ttl_ms)
		pc.redirect_ttl_ms = cfg.redirect_ttl_ms;
	memcpy(pc.host_mac, cfg.mac, 6);
	if (!cfg.host) {
		parse_ep(cfg.ip4, 0, &pc.local4);
		if (cfg.ip6[0])
			parse_ep(cfg.ip6, 0, &pc.local6);
		for (i = 0; i < cfg.n_hosts; i++)
			if (parse_ep(cfg.hosts[i], 0, &pc.hosts[i]))
				die("bad host address %s", cfg.hosts[i]);
		pc.n_hosts = (uint32_t)cfg.n_hosts;
	}
	ret = xo_proto_create(&pc, &machine);
	OPENSSL_cleanse(key, sizeof(key));
	if (ret)
		die("protocol: %s", xo_last_error());
	if (cfg.crash_at[0])
		xo_proto_set_crash_step(machine, cfg.crash_at);
	if (cfg.host) {
		listeners[0] = listen_on(cfg.ip4, cfg.http_port);
		if (cfg.ip6[0])
			listeners[1] = listen_on(cfg.ip6, cfg.http_port);
		for (i = 0; i < cfg.n_targets; i++) {
			controls[n_controls].fd = -1;
			controls[n_controls].target = i;
			connect_target(&controls[n_controls]);
			n_controls++;
		}
	} else {
		listeners[0] = listen_on(cfg.ip4, cfg.control_port);
	}
}

static bool all_targets_up(void)
{
	struct xo_proto_peer_info info;
	int i;

	for (i = 0; i < n_controls; i++)
		if (controls[i].fd < 0 ||
		    xo_proto_peer_info(machine, controls[i].peer, &info) ||
		    info.state != XO_PEER_UP)
			return false;
	return true;
}

int main(int argc, char **argv)
{
	static struct pollfd pfd[MAX_POLL];
	static void *owner[MAX_POLL];
	static char kind[MAX_POLL];
	bool announced = false;
	struct sigaction sa = { .sa_handler = on_signal };
	uint64_t ready_by;

	if (argc != 2)
		die("usage: xo-driver CONFIG_FILE");
	load_config(argv[1], &cfg);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	setup();
	pump();
	ready_by = now_ns() + 20000000000ull;
	while (!stopping) {
		uint64_t now = now_ns(), next = xo_proto_next_deadline(machine);
		struct client *c;
		uint64_t wait_ns = 1000000000ull;
		struct timespec ts;
		int n = 0, i;

		if (!announced && (!cfg.host || all_targets_up())) {
			printf("READY\n");
			fflush(stdout);
			announced = true;
		} else if (!announced && now > ready_by) {
			die("targets did not come up");
		}
		if (xo_proto_park_fd(machine) >= 0) {
			/* frames parked here: the tick below sends them on */
			pfd[n] = (struct pollfd){ xo_proto_park_fd(machine), POLLIN, 0 };
			kind[n] = 'P';
			owner[n++] = NULL;
		}
		for (i = 0; i < 2; i++)
			if (listeners[i] >= 0) {
				pfd[n] = (struct pollfd){ listeners[i], POLLIN, 0 };
				kind[n] = 'L';
				owner[n++] = NULL;
			}
		for (i = 0; i < n_controls && n < MAX_POLL; i++) {
			const uint8_t *b;
			size_t len = 0;

			if (controls[i].fd < 0) {
				if (controls[i].target >= 0 &&
				    now >= controls[i].retry_at) {
					connect_target(&controls[i]);
					pump();
				}
				if (controls[i].fd < 0)
					continue;
			}
			xo_proto_peer_output(machine, controls[i].peer, &b, &len);
			pfd[n] = (struct pollfd){ controls[i].fd,
						  (short)(POLLIN | (len ? POLLOUT : 0)), 0 };
			kind[n] = 'K';
			owner[n++] = &controls[i];
		}
		for (c = clients; c && n < MAX_POLL; c = c->next) {
			if (c->state == C_MACHINE)
				continue;
			if (c->state == C_DRAIN) {
				int queued = 0;

				if (ioctl(c->fd, SIOCOUTQ, &queued) < 0 || !queued ||
				    now >= c->drain_until) {
					hand_back(c);
					pump();
					wait_ns = 0; /* the list changed: poll the */
					break;       /* rest next round */
				}
				if (drain_check_ns(c) < wait_ns)
					wait_ns = drain_check_ns(c);
				continue;
			}
			pfd[n] = (struct pollfd){ c->fd, c->state == C_WRITE ? POLLOUT : POLLIN, 0 };
			kind[n] = 'C';
			owner[n++] = c;
		}
		if (next && (next > now ? next - now : 0) < wait_ns)
			wait_ns = next > now ? next - now : 0;
		ts.tv_sec = (time_t)(wait_ns / 1000000000ull);
		ts.tv_nsec = (long)(wait_ns % 1000000000ull);
		if (ppoll(pfd, (nfds_t)n, &ts, NULL) < 0) {
			if (errno == EINTR)
				continue;
			die("ppoll: %s", strerror(errno));
		}
		xo_proto_tick(machine, now_ns());
		pump();
		for (i = 0; i < n; i++) {
			if (!pfd[i].revents)
				continue;
			if (kind[i] == 'P') {
				continue; /* ticked above */
			} else if (kind[i] == 'L') {
				if (cfg.host) {
					int fd = accept4(pfd[i].fd, NULL, NULL,
							 SOCK_CLOEXEC);

					if (fd >= 0)
						client_new(fd, NULL, 0);
				} else {
					accept_control(pfd[i].fd);
				}
			} else if (kind[i] == 'K') {
				struct control *k = owner[i];

				if (k->fd != pfd[i].fd)
					continue;
				if (pfd[i].revents & POLLOUT)
					control_flush(k);
				if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
					control_read(k);
			} else {
				for (c = clients; c && c != owner[i]; c = c->next)
					;
				if (!c || c->fd != pfd[i].fd || c->state == C_MACHINE)
					continue;
				if (c->state == C_WRITE)
					client_write(c);
				else if (c->state == C_READ)
					client_read(c);
			}
			pump();
		}
		if (cfg.timings[0])
			collect_steps();
	}
	write_timings();
	for (struct client *c = clients, *cn; c; c = cn) {
		cn = c->next;
		client_free(c, c->state != C_MACHINE);
	}
	xo_proto_destroy(machine);
	xo_rules_destroy(rules);
	xo_steer_close(steer, XO_STEER_CLOSE_UNPIN);
	return 0;
}
