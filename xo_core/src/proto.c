// SPDX-License-Identifier: MIT
/*
 * The XO handoff protocol machine (see xo_proto.h for the contract and the
 * commit rule). Everything here runs inside a driver's call: no waiting,
 * no thread, no control-connection I/O. The only system calls are the
 * protocol's own steps (repair, rules, the client probe).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <net/if.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "wire.h"
#include "xo_proto.h"

#define CONN_BUCKETS 4096
#define MAX_STEPS 65536
#define MS 1000000ull

enum conn_state {
	H_WAIT_READY = 1,  /* host: BEGIN_OFFLOAD sent, socket frozen here */
	H_OFFLOADED,       /* host: a target serves it, redirect in place */
	H_MOVING,          /* host: BEGIN_OFFLOAD to move_peer on its behalf */
	H_RETURNED,        /* host: taken back; the target's PARKED may follow */
	T_WAIT_HOST_READY, /* target: restored, TARGET_READY sent */
	T_SERVING,         /* target: live, the application serves it */
	T_WAIT_END,        /* target: frozen, TARGET_DONE sent */
	T_WAIT_CLOSED,     /* target: closed, TARGET_DONE(CLOSED) sent */
};

struct lap {
	uint64_t start, mark;
	uint8_t transfer;
};

struct conn {
	struct conn *id_next;   /* by id */
	struct conn *wire_next; /* target: by (peer, wire id) */
	struct conn *prev, *next; /* every connection */
	uint64_t id;            /* host: the wire id; target: our handle */
	uint64_t wire_id;
	uint32_t peer;
	uint32_t move_peer;     /* host, H_MOVING: the destination */
	enum conn_state state;
	int fd;
	int app_fd;             /* host, returned: the application's socket
				 * (replays into it are watched, not owned) */
	struct xo_tcp_state st; /* target: what resume needs (unsent bytes) */
	uint8_t *app;           /* request bytes (rollback / keep events) */
	uint32_t app_len;
	struct xo_flow_key in_key;  /* client -> us */
	struct xo_flow_key out_key; /* us -> client */
	struct xo_steer_action rule; /* the live rule on in_key (host) or
				      * out_key (target), for renewal */
	struct xo_endpoint client, local, at; /* at: where the target has it */
	uint32_t snd_una, rcv_nxt;  /* host: for the client probe */
	uint64_t deadline, renew_at;
	/* The new owner holds its ingress parked until the old owner's
	 * PARKED came (or park_until passed), so the client's older frames
	 * reach the socket before newer ones: a reordering would make the
	 * client resend. held: PARKED frames that came while frozen again. */
	uint64_t park_until;
	uint8_t *held;
	uint32_t held_len;
	/* The new owner: the ACK the old socket owed the client, as a frame
	 * to replay once the release replayed nothing that would draw it. */
	uint8_t owed_ack[XO_PARK_OWED_ACK_MAX];
	uint32_t owed_ack_len;
	/* The old owner, frozen: where its capture left the receive side,
	 * to find bytes its socket took after it (take_late_bytes). */
	struct {
		uint32_t rcv_seq, queued, ack;
		uint16_t win;
		bool on;
	} late;
	uint64_t superseded_by; /* host, H_RETURNED: offloaded again since */
	/* Unread bytes sent after the state (XO_FLAG_BYTES_FOLLOW). Sender:
	 * what goes in BYTES right after our PARKED. Receiver: awaiting, the
	 * socket is live but the driver hears of it only with the bytes. */
	uint8_t *due;
	uint32_t due_len;
	bool awaiting;
	struct lap lap;
};

struct outbuf {
	uint8_t *data;
	size_t off, len, cap;
};

struct peer {
	struct peer *next;
	uint32_t id;
	uint32_t state;
	struct xo_proto_peer_opts o;
	struct xo_chan ch;
	uint8_t nonce[XO_HELLO_NONCE_LEN];
	uint8_t *in;
	size_t in_len, in_cap;
	struct outbuf out;
	uint64_t out_since;     /* when output last went from empty to not */
	uint64_t created, last_rx, last_tx, next_load;
	struct xo_load_report load;
	/* host: `offloaded` when `load` came (those of ours it counts) */
	uint32_t offloaded_at_report;
	uint32_t pending;       /* host: our handoffs waiting for TARGET_READY */
	uint32_t failures, offloaded, handed;
	uint64_t down_until, down_ms;
	bool dead;
};

struct lingering {
	struct xo_flow_key key;
	uint64_t expires;
	uint32_t kind;
};

/*
 * Stragglers: client frames already on their way to the old owner when the
 * new one took over (redirected just before the host re-pointed its rule,
 * crossing the control message on another CPU's backlog) meet the old
 * owner's lingering PARK entry. The old owner sends them on in another
 * PARKED ("ship"); the host, whose connection record is gone after a
 * hand-back, remembers where such late frames go ("expect").
 */
#define STRAGGLER_MS 1000 /* as long as the old owner's lingering PARK */

enum straggler_kind {
	SG_SHIP,   /* old owner: frames of key go on to peer (PARKED wire) */
	SG_EXPECT, /* host: late PARKED for wire from peer replay to `to` */
	SG_REPLAY, /* new owner after its hold: frames of key that a racing
		    * datapath parked after the hold ended replay to `to` */
};

struct straggler {
	struct xo_flow_key key;
	struct xo_endpoint to;
	uint64_t wire;
	uint64_t until;
	uint32_t peer;
	enum straggler_kind kind;
};

/*
 * Frames we replay reach the socket when the kernel gets to them: the
 * injection returns first, and on a busy machine they can wait a
 * millisecond or more. An application that freezes the socket in that gap
 * (a target handing back as soon as a replayed ACK emptied its send
 * queue, with the client's next request right behind it) captures a state
 * without them, and its frozen socket takes them after the capture: bytes
 * the client sent that no owner has, until the client resends them some
 * 200 ms later. So each replay into a socket notes how many segments the
 * socket will have taken in (tcpi_segs_in) once they are all in, and the
 * next freeze of that flow, with the client's frames parked again, waits
 * for them first (await_replayed).
 */
#define REPLAY_WATCHES 64
#define REPLAY_WATCH_MS 1000 /* by then they are in, or never will be */
#define REPLAY_WAIT_MS 20    /* a freeze waits this long, then refuses */

struct replay_watch {
	struct xo_flow_key key;
	uint32_t segs_in; /* the socket's count once all replayed are in */
	uint64_t until;   /* 0: free */
};

struct event {
	struct event *next;
	struct xo_proto_event ev;
	uint8_t *data;
	struct xo_tls_state *tls; /* secret memory */
};

struct xo_proto {
	struct xo_proto_config cfg;
	uint8_t *key;           /* the cluster key: secret memory (secret.c) */
	struct peer *peers;
	uint32_t next_peer_id;
	struct conn *by_id[CONN_BUCKETS];
	struct conn *by_wire[CONN_BUCKETS];
	struct conn *all;
	uint64_t next_conn_id;
	struct event *ev_head, *ev_tail;
	uint8_t *ev_data;       /* the data of the event last returned */
	struct xo_tls_state *ev_tls; /* its TLS state (secret memory) */
	int ktls;               /* kernel TLS here: -1 not probed yet, 0, 1 */
	struct lingering *linger;
	uint32_t n_linger, cap_linger;
	uint64_t linger_min;
	struct straggler *strag;
	uint32_t n_strag, cap_strag;
	struct replay_watch replays[REPLAY_WATCHES];
	uint32_t replay_next;   /* the slot a new watch may take */
	struct xo_proto_step *steps;
	uint32_t step_head, step_len;
	struct xo_proto_stats stats;
	uint32_t closes;        /* peers closed so far (iteration guard) */
	uint64_t bytes_served;
	char crash_step[16];
	uint8_t mac[6];         /* this interface's, for replayed frames */
	int ifindex;
};

/* ---- small helpers ---------------------------------------------------- */

static uint64_t clock_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t knob(uint32_t value, uint32_t dflt)
{
	return (uint64_t)(value ? value : dflt) * MS;
}

#define CFG(p, name, DFLT) knob((p)->cfg.name, DFLT)

static int insert_park(struct xo_proto *p, const struct xo_flow_key *k,
		       uint64_t now);

/* Fault "park_late" (tests): the park goes in only after the capture,
 * and a moment later, so client frames reach the frozen socket after it,
 * as a late delivery does (take_late_bytes must carry them on). */
static bool park_late(const struct xo_proto *p)
{
	return !strcmp(p->crash_step, "park_late");
}

static int late_park(struct xo_proto *p, const struct xo_flow_key *k,
		     uint64_t now)
{
	const struct timespec gap = { .tv_nsec = 2 * 1000 * 1000 };

	if (!park_late(p))
		return 0;
	nanosleep(&gap, NULL);
	return insert_park(p, k, now);
}

static void crash_point(struct xo_proto *p, const char *step)
{
	if (p->crash_step[0] && !strcmp(p->crash_step, step)) {
		fprintf(stderr, "xo: fault injection: dying at %s\n", step);
		kill(getpid(), SIGKILL);
	}
}

static bool ep_same_addr(const struct xo_endpoint *a,
			 const struct xo_endpoint *b)
{
	size_t n = a->family == AF_INET6 ? 16 : 4;

	return a->family == b->family && !memcmp(a->addr, b->addr, n);
}

static bool ep_same(const struct xo_endpoint *a, const struct xo_endpoint *b)
{
	return ep_same_addr(a, b) && a->port == b->port;
}

static const char *ep_str(const struct xo_endpoint *ep, char *buf, size_t cap)
{
	char ip[INET6_ADDRSTRLEN] = "?";

	inet_ntop(ep->family == AF_INET6 ? AF_INET6 : AF_INET, ep->addr, ip,
		  sizeof(ip));
	snprintf(buf, cap, ep->family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip,
		 ep->port);
	return buf;
}

/* The flow key of packets from src to dst. */
static void flow_key(struct xo_flow_key *k, const struct xo_endpoint *src,
		     const struct xo_endpoint *dst)
{
	size_t n = src->family == AF_INET6 ? 16 : 4;

	memset(k, 0, sizeof(*k));
	memcpy(k->src_addr, src->addr, n);
	memcpy(k->dst_addr, dst->addr, n);
	k->src_port = htons(src->port);
	k->dst_port = htons(dst->port);
	k->family = src->family == AF_INET6 ? XO_AF_INET6 : XO_AF_INET;
	k->proto = XO_IPPROTO_TCP;
}

static void action(struct xo_proto *p, struct xo_steer_action *a,
		   uint8_t kind, uint64_t now, uint64_t ttl)
{
	memset(a, 0, sizeof(*a));
	a->kind = kind;
	a->owner = p->cfg.owner;
	a->expires_ns = now + ttl;
}

static int insert_block(struct xo_proto *p, const struct xo_flow_key *k,
			uint64_t now)
{
	struct xo_steer_action a;

	action(p, &a, XO_STEER_BLOCK, now, CFG(p, block_ttl_ms,
					       XO_PROTO_BLOCK_TTL_MS));
	return xo_rules_insert(p->cfg.rules, k, &a);
}

/* Ingress during a handoff: drop the client's frames but keep them for
 * whoever owns the connection next. */
static void unwatch_stragglers(struct xo_proto *p,
			       const struct xo_flow_key *k);

static int insert_park(struct xo_proto *p, const struct xo_flow_key *k,
		       uint64_t now)
{
	struct xo_steer_action a;

	/* Frames parked on this flow from now on are ours again. */
	unwatch_stragglers(p, k);

	action(p, &a, XO_STEER_PARK, now, CFG(p, block_ttl_ms,
					      XO_PROTO_BLOCK_TTL_MS));
	return xo_rules_insert(p->cfg.rules, k, &a);
}

/* Remove an entry we installed; a missing one is fine (expired, purged). */
static void remove_rule(struct xo_proto *p, const struct xo_flow_key *k)
{
	int ret = xo_rules_remove(p->cfg.rules, k);

	if (ret && ret != XO_E_NOTFOUND)
		fprintf(stderr, "xo: rule removal failed: %s\n",
			xo_last_error());
}

/* Keep an entry we no longer track until its expiry, then delete it
 * unless somebody replaced it meanwhile (a new handoff of a reused port). */
static void linger(struct xo_proto *p, const struct xo_flow_key *k,
		   const struct xo_steer_action *a)
{
	if (p->n_linger == p->cap_linger) {
		uint32_t cap = p->cap_linger ? 2 * p->cap_linger : 64;
		struct lingering *n = realloc(p->linger, cap * sizeof(*n));

		if (!n)
			return; /* the entry expires in the datapath anyway */
		p->linger = n;
		p->cap_linger = cap;
	}
	p->linger[p->n_linger].key = *k;
	p->linger[p->n_linger].expires = a->expires_ns;
	p->linger[p->n_linger].kind = a->kind;
	p->n_linger++;
	if (!p->linger_min || a->expires_ns < p->linger_min)
		p->linger_min = a->expires_ns;
}

static void sweep_lingering(struct xo_proto *p, uint64_t now)
{
	uint32_t i = 0;

	if (!p->linger_min || now < p->linger_min)
		return;
	p->linger_min = 0;
	while (i < p->n_linger) {
		struct lingering *l = &p->linger[i];
		struct xo_steer_action cur;

		if (l->expires > now) {
			if (!p->linger_min || l->expires < p->linger_min)
				p->linger_min = l->expires;
			i++;
			continue;
		}
		if (!xo_steer_lookup(p->cfg.steer, &l->key, &cur) &&
		    cur.expires_ns == l->expires && cur.owner == p->cfg.owner &&
		    cur.kind == l->kind) {
			remove_rule(p, &l->key);
			p->stats.rules_expired++;
		}
		*l = p->linger[--p->n_linger];
	}
}

/* ---- steps (Table 3) -------------------------------------------------- */

static const char *const step_names[4][7] = {
	[XO_T_OUT_HOST] = { "out.block", "out.serialize",
			    "out.transfer_to_ready", "out.redirect",
			    "out.discard_and_host_ready", "out.total" },
	[XO_T_OUT_TARGET] = { "out_target.decode", "out_target.restore",
			      "out_target.rewrite", "out_target.ready_send",
			      "out_target.total" },
	[XO_T_IN_TARGET] = { "in.block", "in.serialize", "in.transfer_to_end",
			     "in.cleanup", "in.total" },
	[XO_T_IN_HOST] = { "in_host.decode", "in_host.restore",
			   "in_host.remove_redirect", "in_host.resume",
			   "in_host.end_offload", "in_host.total" },
};

/* Step indexes, as in step_names. */
enum { OH_BLOCK, OH_SERIALIZE, OH_READY, OH_REDIRECT, OH_DISCARD, OH_TOTAL };
enum { OT_DECODE, OT_RESTORE, OT_REWRITE, OT_READY, OT_TOTAL };
enum { IT_BLOCK, IT_SERIALIZE, IT_END, IT_CLEANUP, IT_TOTAL };
enum { IH_DECODE, IH_RESTORE, IH_REMOVE, IH_RESUME, IH_END, IH_TOTAL };

const char *xo_proto_step_name(uint32_t transfer, uint32_t step)
{
	if (transfer > XO_T_IN_HOST || step >= 7)
		return NULL;
	return step_names[transfer][step];
}

static void record(struct xo_proto *p, uint8_t transfer, uint8_t step,
		   uint64_t ns)
{
	struct xo_proto_step *s;

	if (!p->steps)
		return;
	s = &p->steps[(p->step_head + p->step_len) % MAX_STEPS];
	if (p->step_len == MAX_STEPS)
		p->step_head = (p->step_head + 1) % MAX_STEPS;
	else
		p->step_len++;
	s->transfer = transfer;
	s->step = step;
	s->reserved = 0;
	s->ns = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void lap_start(struct lap *l, uint8_t transfer)
{
	l->transfer = transfer;
	l->start = l->mark = clock_ns();
}

static void lap(struct xo_proto *p, struct lap *l, uint8_t step)
{
	uint64_t t = clock_ns();

	record(p, l->transfer, step, t - l->mark);
	l->mark = t;
}

static void lap_total(struct xo_proto *p, struct lap *l, uint8_t step)
{
	record(p, l->transfer, step, clock_ns() - l->start);
}

int xo_proto_take_steps(struct xo_proto *p, struct xo_proto_step *out,
			uint32_t cap)
{
	uint32_t n = 0;

	while (n < cap && p->step_len) {
		out[n++] = p->steps[p->step_head];
		p->step_head = (p->step_head + 1) % MAX_STEPS;
		p->step_len--;
	}
	return (int)n;
}

/* ---- events ----------------------------------------------------------- */

static struct xo_proto_event *push_event(struct xo_proto *p, uint32_t type,
					 uint32_t peer, uint64_t conn, int fd)
{
	struct event *e = calloc(1, sizeof(*e));

	if (!e) {
		/* Out of memory while reporting: the driver cannot learn of this
		 * one; say so loudly rather than lose it silently. */
		fprintf(stderr, "xo: out of memory queueing event %u\n", type);
		return NULL;
	}
	e->ev.type = type;
	e->ev.peer = peer;
	e->ev.conn = conn;
	e->ev.fd = fd;
	if (p->ev_tail)
		p->ev_tail->next = e;
	else
		p->ev_head = e;
	p->ev_tail = e;
	return &e->ev;
}

/* Give the event the bytes in *data (ownership moves). */
static void event_data(struct xo_proto_event *ev, uint8_t **data,
		       uint32_t len)
{
	struct event *e = (struct event *)((char *)ev -
					   offsetof(struct event, ev));

	e->data = *data;
	e->ev.data = *data;
	e->ev.data_len = len;
	*data = NULL;
}

/* Give the event the TLS record state of *st (ownership moves): the
 * driver continues the session in user space. */
static void event_tls(struct xo_proto_event *ev, struct xo_tcp_state *st)
{
	struct event *e = (struct event *)((char *)ev -
					   offsetof(struct event, ev));

	e->tls = st->tls;
	e->ev.tls = st->tls;
	st->tls = NULL;
}

int xo_proto_next_event(struct xo_proto *p, struct xo_proto_event *ev)
{
	struct event *e = p->ev_head;

	free(p->ev_data);
	p->ev_data = NULL;
	xo_secret_free(p->ev_tls);
	p->ev_tls = NULL;
	if (!e)
		return 0;
	p->ev_head = e->next;
	if (!p->ev_head)
		p->ev_tail = NULL;
	*ev = e->ev;
	p->ev_data = e->data;
	p->ev_tls = e->tls;
	free(e);
	return 1;
}

/* ---- connections ------------------------------------------------------ */

static uint32_t bucket(uint64_t v)
{
	v ^= v >> 33;
	v *= 0xff51afd7ed558ccdull;
	v ^= v >> 33;
	return (uint32_t)(v % CONN_BUCKETS);
}

static struct conn *conn_by_id(struct xo_proto *p, uint64_t id)
{
	struct conn *c;

	for (c = p->by_id[bucket(id)]; c; c = c->id_next)
		if (c->id == id)
			return c;
	return NULL;
}

static struct conn *conn_by_wire(struct xo_proto *p, uint32_t peer,
				 uint64_t wire)
{
	struct conn *c;

	for (c = p->by_wire[bucket(wire ^ peer)]; c; c = c->wire_next)
		if (c->wire_id == wire && c->peer == peer)
			return c;
	return NULL;
}

static struct conn *conn_new(struct xo_proto *p, uint32_t peer,
			     uint64_t wire)
{
	struct conn *c = calloc(1, sizeof(*c));
	uint32_t b;

	if (!c) {
		xo_fail(XO_E_NOMEM, "protocol: no memory for a connection");
		return NULL;
	}
	c->fd = -1;
	c->app_fd = -1;
	c->peer = peer;
	c->id = p->next_conn_id++;
	c->wire_id = p->cfg.role == XO_ROLE_HOST ? c->id : wire;
	b = bucket(c->id);
	c->id_next = p->by_id[b];
	p->by_id[b] = c;
	if (p->cfg.role == XO_ROLE_TARGET) {
		b = bucket(c->wire_id ^ peer);
		c->wire_next = p->by_wire[b];
		p->by_wire[b] = c;
	}
	c->next = p->all;
	if (p->all)
		p->all->prev = c;
	p->all = c;
	p->stats.active++;
	return c;
}

static struct peer *peer_get(struct xo_proto *p, uint32_t id);

static void conn_free(struct xo_proto *p, struct conn *c)
{
	struct conn **pp, *o;

	for (pp = &p->by_id[bucket(c->id)]; *pp; pp = &(*pp)->id_next)
		if (*pp == c) {
			*pp = c->id_next;
			break;
		}
	if (p->cfg.role == XO_ROLE_TARGET)
		for (pp = &p->by_wire[bucket(c->wire_id ^ c->peer)]; *pp;
		     pp = &(*pp)->wire_next)
			if (*pp == c) {
				*pp = c->wire_next;
				break;
			}
	/* A returned connection whose frames were to follow c (rolled back,
	 * withdrawn) replays them here again when they come, and a later
	 * handoff of the flow links to it anew. */
	if (p->cfg.role == XO_ROLE_HOST) {
		struct peer *pe = NULL;

		if (c->state == H_WAIT_READY)
			pe = peer_get(p, c->peer);
		if (pe && pe->pending)
			pe->pending--;
		for (o = p->all; o; o = o->next)
			if (o->superseded_by == c->id)
				o->superseded_by = 0;
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		p->all = c->next;
	if (c->next)
		c->next->prev = c->prev;
	xo_state_release(&c->st);
	free(c->app);
	free(c->held);
	free(c->due);
	free(c);
	p->stats.active--;
}

/* ---- peers and framing ------------------------------------------------ */

static struct peer *peer_get(struct xo_proto *p, uint32_t id)
{
	struct peer *pe;

	for (pe = p->peers; pe; pe = pe->next)
		if (pe->id == id && !pe->dead)
			return pe;
	return NULL;
}

static int send_msg(struct peer *pe, uint8_t type,
		    uint16_t flags, uint64_t conn, const uint8_t *payload,
		    uint32_t len, uint64_t now)
{
	size_t need = xo_env_size(len);
	struct outbuf *o = &pe->out;
	int64_t n;

	if (pe->dead)
		return xo_fail(XO_E_STATE, "protocol: peer %s is closed",
			       pe->o.name);
	if (o->off && o->off == o->len)
		o->off = o->len = 0;
	if (o->len + need > o->cap) {
		size_t cap = o->cap ? o->cap : 4096;
		uint8_t *d;

		if (o->off) { /* compact first */
			memmove(o->data, o->data + o->off, o->len - o->off);
			o->len -= o->off;
			o->off = 0;
		}
		while (cap < o->len + need)
			cap *= 2;
		if (cap > o->cap) {
			d = realloc(o->data, cap);
			if (!d)
				return xo_fail(XO_E_NOMEM,
					       "protocol: output buffer of %zu bytes",
					       cap);
			o->data = d;
			o->cap = cap;
		}
	}
	if (o->len == o->off)
		pe->out_since = now;
	n = xo_chan_seal(&pe->ch, type, flags, conn, payload, len,
			 o->data + o->len, o->cap - o->len);
	if (n < 0)
		return (int)n;
	o->len += (size_t)n;
	pe->last_tx = now;
	return 0;
}

static void send_abort(struct peer *pe, uint64_t conn,
		       uint32_t reason, const char *text, uint64_t now)
{
	uint8_t buf[8 + XO_ABORT_MAX_TEXT];
	int n = xo_abort_encode(reason, text, (uint32_t)strlen(text), buf,
				sizeof(buf));

	if (n >= 0)
		send_msg(pe, XO_MSG_ABORT, 0, conn, buf, (uint32_t)n, now);
}

static void peer_lost(struct xo_proto *p, struct peer *pe, uint64_t now);

/* Send the frames parked for a flow to its new owner (or the host),
 * after `prefix` (older frames held for it). Always sent, empty or not:
 * the receiver holds its own ingress until it has them. */
static void ship_parked(struct xo_proto *p, struct peer *pe, uint64_t conn,
			const struct xo_flow_key *key, const uint8_t *prefix,
			uint32_t prefix_len, uint64_t now)
{
	uint8_t *blob = NULL, *all;
	uint32_t len = 0;
	int64_t n = xo_park_take(p->cfg.steer, key, &blob, &len);

	if (n < 0) {
		fprintf(stderr, "xo: parked frames: %s\n", xo_last_error());
		n = 0;
	}
	all = malloc((size_t)prefix_len + len + 1);
	if (!all) {
		free(blob);
		return; /* the receiver's park_until releases it */
	}
	if (prefix_len)
		memcpy(all, prefix, prefix_len);
	if (len)
		memcpy(all + prefix_len, blob, len);
	if (!send_msg(pe, XO_MSG_PARKED, 0, conn, all, prefix_len + len, now))
		p->stats.parked_shipped += (uint64_t)n;
	free(all);
	free(blob);
}

/* The unread bytes of a transfer whose state went without them: after our
 * PARKED, so the frames the client is waiting on are not queued behind
 * them on the control connection. */
static void ship_due(struct xo_proto *p, struct peer *pe, struct conn *c,
		     uint64_t now)
{
	if (!c->due)
		return;
	if (!send_msg(pe, XO_MSG_BYTES, 0, c->wire_id, c->due, c->due_len,
		      now))
		p->stats.bytes_followed++;
	free(c->due);
	c->due = NULL;
	c->due_len = 0;
}

static void straggler_add(struct xo_proto *p, const struct straggler *sg)
{
	if (p->n_strag == p->cap_strag) {
		uint32_t cap = p->cap_strag ? 2 * p->cap_strag : 32;
		struct straggler *n = realloc(p->strag, cap * sizeof(*n));

		if (!n)
			return; /* a straggler then costs the client a resend */
		p->strag = n;
		p->cap_strag = cap;
	}
	p->strag[p->n_strag++] = *sg;
}

/* We were the old owner of `key`: frames parked here from now on go to pe. */
static void watch_stragglers(struct xo_proto *p, const struct peer *pe,
			     uint64_t wire, const struct xo_flow_key *key,
			     uint64_t now)
{
	struct straggler sg = { .key = *key, .wire = wire, .peer = pe->id,
				.until = now + STRAGGLER_MS * MS,
				.kind = SG_SHIP };

	straggler_add(p, &sg);
}

/* Our hold on key ended: a frame the datapath was parking at that very
 * moment lands in the ring after we emptied it; replay it too. */
static void watch_own_stragglers(struct xo_proto *p,
				 const struct xo_flow_key *key,
				 const struct xo_endpoint *to, uint64_t now)
{
	struct straggler sg = { .key = *key, .to = *to,
				.until = now + STRAGGLER_MS * MS,
				.kind = SG_REPLAY };

	straggler_add(p, &sg);
}

static void unwatch_stragglers(struct xo_proto *p,
			       const struct xo_flow_key *k)
{
	uint32_t i = 0;

	while (i < p->n_strag) {
		if (p->strag[i].kind != SG_EXPECT &&
		    !memcmp(&p->strag[i].key, k, sizeof(*k)))
			p->strag[i] = p->strag[--p->n_strag];
		else
			i++;
	}
}

/* A returned connection's record goes: late PARKED for it still land. */
static void expect_stragglers(struct xo_proto *p, const struct conn *c,
			      uint64_t now)
{
	struct straggler sg = { .to = c->local, .wire = c->wire_id,
				.peer = c->peer,
				.until = now + 2 * STRAGGLER_MS * MS,
				.kind = SG_EXPECT };

	straggler_add(p, &sg);
}

static uint32_t replay_blob(struct xo_proto *p, const uint8_t *blob,
			    uint32_t len, const struct xo_endpoint *to);

/* Late PARKED for a connection we no longer track: replay what we expect. */
static bool late_parked(struct xo_proto *p, const struct peer *pe,
			const struct xo_msg *m)
{
	uint32_t i;

	for (i = 0; i < p->n_strag; i++) {
		struct straggler *sg = &p->strag[i];

		if (sg->kind == SG_EXPECT && sg->peer == pe->id &&
		    sg->wire == m->conn_id) {
			if (m->payload_len)
				replay_blob(p, m->payload, m->payload_len,
					    &sg->to);
			return true;
		}
	}
	return false;
}

/* Read the park ring; send on what stragglers brought; forget old ones. */
static void ship_stragglers(struct xo_proto *p, uint64_t now)
{
	uint32_t i = 0;

	if (xo_park_collect(p->cfg.steer) < 0)
		fprintf(stderr, "xo: parked frames: %s\n", xo_last_error());
	while (i < p->n_strag) {
		struct straggler *sg = &p->strag[i];

		/* Most ticks find no frame kept: then no watch (one per
		 * transfer of the last second, thousands at a high handoff
		 * rate) walks the stash for its flow. */
		if (sg->kind != SG_EXPECT && xo_park_stashed(p->cfg.steer)) {
			struct peer *pe = peer_get(p, sg->peer);
			uint8_t *blob = NULL;
			uint32_t len = 0;
			int64_t n = xo_park_take(p->cfg.steer, &sg->key, &blob,
						 &len);

			if (n > 0 && sg->kind == SG_REPLAY) {
				replay_blob(p, blob, len, &sg->to);
				p->stats.stragglers += (uint64_t)n;
			} else if (n > 0 && pe && pe->state == XO_PEER_UP &&
				   !send_msg(pe, XO_MSG_PARKED, 0, sg->wire,
					     blob, len, now)) {
				p->stats.parked_shipped += (uint64_t)n;
				p->stats.stragglers += (uint64_t)n;
			}
			free(blob);
		}
		if (now >= sg->until) {
			*sg = p->strag[--p->n_strag];
			continue;
		}
		i++;
	}
}

/* Give frames parked here or sent to us to our own stack, addressed to the
 * connection's endpoint here. */
static uint32_t replay_blob(struct xo_proto *p, const uint8_t *blob,
			    uint32_t len, const struct xo_endpoint *to)
{
	uint32_t segs = 0;
	int64_t n = xo_park_replay(p->cfg.steer, p->ifindex, blob, len, to,
				   p->mac, &segs);

	if (n < 0) {
		fprintf(stderr, "xo: replaying parked frames: %s\n",
			xo_last_error());
		return 0;
	}
	p->stats.parked_replayed += (uint64_t)n;
	return segs;
}

static struct replay_watch *replay_watch_of(struct xo_proto *p,
					    const struct xo_flow_key *key,
					    uint64_t now)
{
	uint32_t i;

	for (i = 0; i < REPLAY_WATCHES; i++)
		if (p->replays[i].until > now &&
		    !memcmp(&p->replays[i].key, key, sizeof(*key)))
			return &p->replays[i];
	return NULL;
}

/* Replay a blob into c's socket and note the segments it will take in. */
static uint32_t replay_into(struct xo_proto *p, struct conn *c,
			    const uint8_t *blob, uint32_t len,
			    const struct xo_endpoint *to)
{
	uint64_t now = clock_ns();
	int fd = c->fd >= 0 ? c->fd : c->app_fd;
	struct replay_watch *w;
	uint32_t base, segs;

	if (fd < 0 || xo_tcp_segs_in(fd, &base))
		return replay_blob(p, blob, len, to); /* nothing to wait on */
	segs = replay_blob(p, blob, len, to);
	if (!segs)
		return 0;
	w = replay_watch_of(p, &c->in_key, now);
	if (w && (int32_t)(w->segs_in - base) > 0)
		base = w->segs_in; /* earlier ones are not all in yet */
	if (!w) {
		uint32_t i;

		/* a free slot (an ended watch) if there is one, else the
		 * oldest-taken: at worst a freeze then does not wait */
		for (i = 0; i < REPLAY_WATCHES; i++) {
			w = &p->replays[(p->replay_next + i) % REPLAY_WATCHES];
			if (w->until <= now)
				break;
		}
		if (i == REPLAY_WATCHES)
			w = &p->replays[p->replay_next];
		p->replay_next = (uint32_t)(w - p->replays + 1) % REPLAY_WATCHES;
		w->key = c->in_key;
	}
	w->segs_in = base + segs;
	w->until = now + REPLAY_WATCH_MS * MS;
	return segs;
}

/* Before a freeze of `key` (its client frames parked again): the frames
 * replayed into fd's socket are in it, or the transfer waits. */
static int await_replayed(struct xo_proto *p, const struct xo_flow_key *key,
			  int fd, const char *what)
{
	uint64_t now = clock_ns(), give_up = now + REPLAY_WAIT_MS * MS;
	struct replay_watch *w = replay_watch_of(p, key, now);
	const struct timespec nap = { .tv_nsec = 50 * 1000 };
	uint32_t segs;
	int ret;

	if (!w)
		return 0;
	for (;;) {
		ret = xo_tcp_segs_in(fd, &segs);
		if (ret)
			return ret;
		if ((int32_t)(segs - w->segs_in) >= 0) {
			w->until = 0;
			return 0;
		}
		if (clock_ns() >= give_up)
			break;
		nanosleep(&nap, NULL); /* the kernel delivers them meanwhile */
	}
	w->until = 0;
	p->stats.replays_late++;
	return xo_fail(XO_E_BUSY,
		       "%s: %u frame(s) replayed into the socket have not reached it after %d ms; not moved, try again",
		       what, (uint32_t)(w->segs_in - segs), REPLAY_WAIT_MS);
}

/* The last record of replayed blobs (length and frame, as in a blob). */
struct last_frame {
	uint8_t *rec;
	uint32_t len;
};

#define RELEASE_ROUNDS 16

static void last_frame(struct last_frame *l, const uint8_t *blob, uint32_t len)
{
	uint32_t off = 0, at = len, flen;
	uint8_t *n;

	while (len - off >= 4) {
		flen = xo_get32(blob + off);
		if (flen > len - off - 4)
			break;
		at = off;
		off += 4 + flen;
	}
	if (at == len)
		return;
	flen = 4 + xo_get32(blob + at);
	n = realloc(l->rec, flen);
	if (!n)
		return; /* then the client's next frame brings the ACK */
	memcpy(n, blob + at, flen);
	l->rec = n;
	l->len = flen;
	/* One byte is enough for the stack to answer; the rest would only
	 * make it answer more often. */
	flen -= 4;
	if (!xo_park_tail(n + 4, &flen, 1)) {
		xo_put32(n, flen);
		l->len = 4 + flen;
	}
}

/* Replay what our ring holds for key, into c's socket (c may be NULL). */
static int64_t replay_parked(struct xo_proto *p, struct conn *c,
			     const struct xo_flow_key *key,
			     const struct xo_endpoint *to,
			     struct last_frame *last)
{
	uint8_t *blob;
	uint32_t len;
	int64_t n = xo_park_take(p->cfg.steer, key, &blob, &len);

	if (n > 0) {
		if (c)
			replay_into(p, c, blob, len, to);
		else
			replay_blob(p, blob, len, to);
		if (last)
			last_frame(last, blob, len);
	}
	free(blob);
	return n;
}

/* The old owner's frames are in (or will never come): replay them, stop
 * parking, and replay what we parked meanwhile, in that order. */
static void hold_frames(struct conn *c, const uint8_t *blob, uint32_t len);
static void ship_after(struct xo_proto *p, struct peer *pe, struct conn *next,
		       const uint8_t *older, uint32_t older_len);

/* The socket has bytes the client has not acknowledged (a response on its
 * way): the replayed ACKs let it send on, and the egress must stay open. */
static bool sending(int fd)
{
	int n = 0;

	if (fd < 0)
		return false;
	if (ioctl(fd, SIOCOUTQ, &n) < 0) {
		fprintf(stderr, "xo: parked frames: ioctl(SIOCOUTQ): %s\n",
			strerror(errno));
		return true;
	}
	return n > 0;
}

/* With nothing replayed into a resumed socket, the client may still wait
 * for the ACK the old socket owed it (its window full, it sends nothing
 * until a probe): a duplicate made from the state draws it. */
static void draw_owed_ack(struct xo_proto *p, struct conn *c,
			  const struct xo_endpoint *to, bool replayed)
{
	if (!replayed && c->owed_ack_len) {
		replay_into(p, c, c->owed_ack, c->owed_ack_len, to);
		p->stats.owed_acks++;
	}
	c->owed_ack_len = 0;
}

static void release_park(struct xo_proto *p, struct conn *c,
			 const uint8_t *older, uint32_t older_len,
			 const struct xo_endpoint *to)
{
	struct last_frame last = { 0 };
	uint8_t *merged = NULL;
	bool held_acks;
	int i;

	/* Frames held here came with an earlier PARKED (an owner before the
	 * last): older than `older`, so they go first. */
	if (c->held_len) {
		merged = c->held;
		c->held = NULL;
		if (older_len) {
			uint8_t *n = realloc(merged, (size_t)c->held_len + older_len);

			if (n) {
				memcpy(n + c->held_len, older, older_len);
				merged = n;
				c->held_len += older_len;
			} /* else the newer ones are lost: the client resends */
		}
		older = merged;
		older_len = c->held_len;
		c->held_len = 0;
	}
	if (c->superseded_by) {
		/* The host handed this flow off again before the last
		 * target's frames came: they belong to the new handoff, and
		 * so do the rule and the frames parked here since. */
		struct conn *next = conn_by_id(p, c->superseded_by);
		struct peer *pe = next ? peer_get(p, next->peer) : NULL;

		if (next && (next->state == H_WAIT_READY ||
			     next->state == H_RETURNED))
			hold_frames(next, older, older_len);
		else if (next && next->state == H_OFFLOADED && pe)
			ship_after(p, pe, next, older, older_len);
		else if (!next && older_len)
			replay_blob(p, older, older_len, to); /* rolled back */
		free(merged);
		c->park_until = 0;
		return;
	}
	/* Our stack's answers to the replay are held back until the last
	 * parked frame is in: a client that hears an ACK sends on at once,
	 * and its new frames, let through when the rule goes, would overtake
	 * parked ones still being replayed (SACK holes: the client resends
	 * segments we are about to deliver). Without ACKs it sends nothing
	 * new, the ring drains, and the rule can go with nothing behind it.
	 * Not while our socket still sends: its data must not be dropped,
	 * and a client still receiving a response is rarely streaming. */
	held_acks = !sending(c->fd) && !insert_block(p, &c->out_key, clock_ns());
	if (older_len) {
		replay_into(p, c, older, older_len, to);
		last_frame(&last, older, older_len);
	}
	free(merged);
	/* Replay what was parked here while the rule still parks. */
	for (i = 0; i < RELEASE_ROUNDS; i++)
		if (replay_parked(p, c, &c->in_key, to, &last) <= 0)
			break;
	remove_rule(p, &c->in_key);
	replay_parked(p, c, &c->in_key, to, &last);
	if (held_acks) {
		if (p->cfg.role == XO_ROLE_TARGET) {
			if (xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule))
				fprintf(stderr, "xo: conn %llx: rewrite back: %s\n",
					(unsigned long long)c->id,
					xo_last_error());
		} else {
			remove_rule(p, &c->out_key);
		}
	}
	/* The ACKs held back above were dropped: replay the last frame once
	 * more. A segment the stack has already is answered at once with an
	 * ACK that covers everything, with the current window. */
	if (held_acks && last.len)
		replay_into(p, c, last.rec, last.len, to);
	draw_owed_ack(p, c, to, last.len != 0);
	free(last.rec);
	watch_own_stragglers(p, &c->in_key, to, clock_ns());
	c->park_until = 0;
}

/* Host: c was handed off again while the last target's PARKED for the
 * same flow had not come yet (a returned connection stays a moment after
 * its PARKED came, with park_until cleared). */
static bool older_frames_due(const struct xo_proto *p, const struct conn *c)
{
	const struct conn *o;

	for (o = p->all; o; o = o->next)
		if (o->state == H_RETURNED && o->superseded_by == c->id &&
		    o->park_until)
			return true;
	return false;
}

/* Host: c's new target gets the frames held for it (older) and those in
 * our ring, in one PARKED, then c's unread bytes; late frames follow as
 * stragglers. Sent on, the held frames go: kept, they would be replayed
 * here again when the connection came back (duplicates for our stack). */
static void ship_to_new_owner(struct xo_proto *p, struct peer *pe,
			      struct conn *c, uint64_t now)
{
	ship_parked(p, pe, c->wire_id, &c->in_key, c->held, c->held_len, now);
	free(c->held);
	c->held = NULL;
	c->held_len = 0;
	ship_due(p, pe, c, now);
	watch_stragglers(p, pe, c->wire_id, &c->in_key, now);
}

/* Host: the older frames for `next` (handed off already) came: send them
 * on with ours after them. */
static void ship_after(struct xo_proto *p, struct peer *pe, struct conn *next,
		       const uint8_t *older, uint32_t older_len)
{
	hold_frames(next, older, older_len);
	ship_to_new_owner(p, pe, next, clock_ns());
}

/* Keep PARKED frames that came while the connection is frozen again. */
static void hold_frames(struct conn *c, const uint8_t *blob, uint32_t len)
{
	uint8_t *n;

	if (!len)
		return;
	n = realloc(c->held, (size_t)c->held_len + len);
	if (!n)
		return; /* lost: the client resends them */
	memcpy(n + c->held_len, blob, len);
	c->held = n;
	c->held_len += len;
}

/* Note where a capture left the receive side (see take_late_bytes):
 * queued, the receive queue it found (before any of it was detached). */
static void note_capture(struct conn *c, const struct xo_tcp_state *st,
			 uint32_t queued)
{
	uint32_t win = st->snd_wnd >> st->snd_wscale;

	c->late.rcv_seq = st->rcv_seq;
	c->late.queued = queued;
	c->late.ack = st->snd_seq - st->inflight_len - st->unsent_len;
	c->late.win = (uint16_t)(win > 0xffff ? 0xffff : win);
	c->late.on = true;
}

#define LATE_FRAME_BYTES 16384 /* payload per frame made of late bytes */

/*
 * A frozen socket still queues what reaches it. A client frame that got
 * past the datapath before the park went in, but into the socket only
 * after the capture (the kernel delivers late on a busy machine, e.g.
 * from the socket's backlog), is in no state: the client would resend it
 * some 200 ms later. Before the old socket goes, its late bytes become
 * client frames held with the parked ones, so the new owner gets them.
 */
static void take_late_bytes(struct xo_proto *p, struct conn *c)
{
	uint8_t *bytes, *blob;
	uint32_t len, off, chunk, used = 0;
	size_t cap;

	if (!c->late.on || c->fd < 0)
		return;
	c->late.on = false;
	if (xo_tcp_late_bytes(c->fd, c->late.rcv_seq, c->late.queued, &bytes,
			      &len)) {
		fprintf(stderr, "xo: conn %llx: %s\n", (unsigned long long)c->id,
			xo_last_error());
		return;
	}
	if (!len)
		return;
	cap = len + ((size_t)len / LATE_FRAME_BYTES + 1) * XO_PARK_FRAME_HDR_MAX;
	blob = malloc(cap);
	if (blob) {
		for (off = 0; off < len; off += chunk) {
			chunk = len - off > LATE_FRAME_BYTES ? LATE_FRAME_BYTES :
							       len - off;
			used += xo_park_client_frame(&c->client, &c->client,
						     c->late.rcv_seq + off,
						     c->late.ack, c->late.win,
						     bytes + off, chunk,
						     blob + used);
		}
		hold_frames(c, blob, used);
		p->stats.late_bytes += len;
	} /* else the client resends them */
	free(blob);
	free(bytes);
}

static void drop_parked(struct xo_proto *p, const struct xo_flow_key *key)
{
	uint8_t *blob;
	uint32_t len;

	if (xo_park_take(p->cfg.steer, key, &blob, &len) > 0)
		free(blob);
}

/* Say no to a peer's request (ABORT) and tell the driver why. */
static void refused(struct xo_proto *p, struct peer *pe, uint64_t conn,
		    uint32_t reason, const char *why, uint64_t now)
{
	struct xo_proto_event *ev;

	p->stats.refused++;
	send_abort(pe, conn, reason, why, now);
	ev = push_event(p, XO_EV_REFUSED, pe->id, conn, -1);
	if (ev) {
		ev->code = (int)reason;
		snprintf(ev->text, sizeof(ev->text), "%s", why);
	}
}

/* Close a peer for a reason (a violation, a deadline, the driver's EOF). */
static void close_peer(struct xo_proto *p, struct peer *pe, uint64_t now,
		       const char *why)
{
	struct xo_proto_event *ev;

	if (pe->dead)
		return;
	pe->dead = true;
	p->closes++;
	peer_lost(p, pe, now);
	ev = push_event(p, XO_EV_PEER_CLOSED, pe->id, 0, -1);
	if (ev)
		snprintf(ev->text, sizeof(ev->text), "%s", why);
}

static void violation(struct xo_proto *p, struct peer *pe, uint64_t now,
		      const char *fmt, ...) XO_PRINTF(4, 5);

static void violation(struct xo_proto *p, struct peer *pe, uint64_t now,
		      const char *fmt, ...)
{
	char why[XO_EV_TEXT_LEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	p->stats.violations++;
	close_peer(p, pe, now, why);
}

static void peer_fail(struct peer *pe, uint64_t now)
{
	if (++pe->failures < XO_PROTO_DOWN_AFTER)
		return;
	pe->down_ms = pe->down_ms ? pe->down_ms * 2 : XO_PROTO_DOWN_MS;
	if (pe->down_ms > 30000)
		pe->down_ms = 30000;
	pe->down_until = now + pe->down_ms * MS;
}

static void peer_ok(struct peer *pe)
{
	pe->failures = 0;
	pe->down_ms = 0;
	pe->down_until = 0;
}

/* ---- host: outbound --------------------------------------------------- */

static void host_rollback(struct xo_proto *p, struct conn *c, int code,
			  const char *why, bool tell_target, uint64_t now)
{
	struct peer *pe = peer_get(p, c->peer);
	struct xo_proto_event *ev;
	int fd = c->fd;

	/* The target never resumes on its own, so leaving repair here is safe
	 * whatever it did: it discards its copy on our ABORT (or on losing the
	 * control connection). */
	if (xo_tcp_resume(fd, NULL)) {
		fprintf(stderr, "xo: conn %llx: resume after rollback failed: %s\n",
			(unsigned long long)c->id, xo_last_error());
		code = XO_E_SYS;
	}
	remove_rule(p, &c->in_key);
	remove_rule(p, &c->out_key);
	if (c->held_len)
		replay_into(p, c, c->held, c->held_len, &c->local);
	draw_owed_ack(p, c, &c->local,
		      replay_parked(p, c, &c->in_key, &c->local, NULL) > 0 ||
			      c->held_len);
	if (tell_target && pe)
		send_abort(pe, c->wire_id, XO_ABORT_HOST, why, now);
	p->stats.rollbacks++;
	ev = push_event(p, XO_EV_ROLLED_BACK, c->peer, c->id, fd);
	if (ev) {
		ev->code = code;
		ev->client = c->client;
		ev->local = c->local;
		snprintf(ev->text, sizeof(ev->text), "%s", why);
		event_data(ev, &c->app, c->app_len);
	}
	conn_free(p, c);
}

/* An encoded state may hold TLS keys: wipe it before freeing. */
static void state_buf_free(uint8_t *buf, uint32_t len)
{
	if (buf)
		OPENSSL_cleanse(buf, len);
	free(buf);
}

static int encode_state(struct xo_tcp_state *st, const uint8_t *prefix,
			uint32_t prefix_len, uint8_t **out, uint32_t *out_len)
{
	size_t size = xo_state_encoded_size(st) + prefix_len;
	int64_t n;
	uint8_t *buf;

	if (size > XO_ENV_MAX_PAYLOAD)
		return xo_fail(XO_E_TOO_LARGE, "state of %zu bytes > %d", size,
			       XO_ENV_MAX_PAYLOAD);
	buf = malloc(size);
	if (!buf)
		return xo_fail(XO_E_NOMEM, "state buffer of %zu bytes", size);
	if (prefix_len)
		memcpy(buf, prefix, prefix_len);
	n = xo_state_encode(st, buf + prefix_len, size - prefix_len);
	if (n < 0) {
		free(buf);
		return (int)n;
	}
	*out = buf;
	*out_len = prefix_len + (uint32_t)n;
	return 0;
}

/*
 * Take the unread bytes (the application data, then the receive queue) out
 * of a captured plain state, into *due, when there are enough of them: the
 * receiver then resumes as soon as the state is in, and the client, whose
 * segments are parked meanwhile, waits for the state and its parked frames
 * only, not for megabytes of queue crossing the control connection
 * (docs/architecture.md, "Unread bytes after the state"). rcv_nxt stays:
 * restored so, the new socket has read up to it. The application data
 * moves to *app (rollback and keep events give it back). Not for TLS
 * states: kernel TLS reads its records from the socket, and a record
 * layer's partial record must stay where it is. 0: *due may stay NULL.
 */
static int detach_unread(struct xo_proto *p, struct xo_tcp_state *st,
			 uint8_t **due, uint32_t *due_len, uint8_t **app)
{
	uint64_t len = (uint64_t)st->app_len + st->recvq_len;
	uint32_t min = p->cfg.bytes_follow_min ? p->cfg.bytes_follow_min :
						 XO_PROTO_BYTES_FOLLOW_MIN;
	uint8_t *b;

	*due = NULL;
	*due_len = 0;
	*app = NULL;
	if (st->tls || len < min || len > XO_ENV_MAX_PAYLOAD)
		return 0;
	b = malloc(len);
	if (!b)
		return xo_fail(XO_E_NOMEM, "unread bytes: %llu",
			       (unsigned long long)len);
	if (st->app_len)
		memcpy(b, st->app_data, st->app_len);
	if (st->recvq_len)
		memcpy(b + st->app_len, st->recvq, st->recvq_len);
	*app = st->app_data;
	st->app_data = NULL;
	st->app_len = 0;
	free(st->recvq);
	st->recvq = NULL;
	st->recvq_len = 0;
	*due = b;
	*due_len = (uint32_t)len;
	return 0;
}

int xo_proto_usable(struct xo_proto *p, uint32_t peer, uint64_t now)
{
	struct peer *pe = peer_get(p, peer);

	return pe && pe->state == XO_PEER_UP && now >= pe->down_until;
}

/* A target's load as the host sees it now: our connections there (exact,
 * with the handoffs still waiting for its answer) plus the others its last
 * report counted. The report also counted ours
 * as they were then; a report is sent once per load interval, so taking
 * it as it is would keep counting a connection of ours that has come back
 * since (and send every request to the other targets until the next one). */
static uint64_t peer_load(const struct peer *pe)
{
	uint32_t others = pe->load.active > pe->offloaded_at_report ?
				  pe->load.active - pe->offloaded_at_report :
				  0;

	return (uint64_t)others + pe->offloaded + pe->pending;
}

int xo_proto_pick(struct xo_proto *p, uint32_t policy, uint64_t now,
		  uint32_t *peer)
{
	struct peer *pe, *best = NULL;
	uint64_t best_load = 0, load;

	xo_clear_error();
	for (pe = p->peers; pe; pe = pe->next) {
		if (pe->dead || !xo_proto_usable(p, pe->id, now))
			continue;
		load = policy == XO_PICK_ROUND_ROBIN ? 0 : peer_load(pe);
		if (!best || load < best_load ||
		    (load == best_load &&
		     (pe->handed < best->handed ||
		      (pe->handed == best->handed &&
		       strcmp(pe->o.name, best->o.name) < 0)))) {
			best = pe;
			best_load = load;
		}
	}
	if (!best)
		return xo_fail(XO_E_NOTFOUND, "pick: no target is up");
	*peer = best->id;
	return 0;
}

/* xo_tls_check()'s refusal, prefixed with the call that got the state. */
static int tls_refused(const char *what)
{
	char why[256];

	snprintf(why, sizeof(why), "%s", xo_last_error());
	return xo_fail(XO_E_FIELD, "%s: %s", what, why);
}

/* The TLS record state of a state the caller passes in (one a kTLS
 * socket's capture did not already fill). */
static int attach_tls(struct xo_tcp_state *st, const struct xo_tls_state *tls,
		      const char *what)
{
	if (st->tls)
		return xo_fail(XO_E_FIELD,
			       "%s: the socket has kernel TLS; its state was captured, pass none",
			       what);
	return xo_state_set_tls(st, tls);
}

/* Whether a restored connection's TLS stays in user space (this kernel has
 * no TLS): the driver gets the state with the ADOPTED / RETURNED event. */
static int o_tls_user(struct xo_proto *p, const struct xo_tcp_state *st)
{
	if (!st->tls)
		return 0;
	if (p->ktls < 0)
		p->ktls = xo_tls_kernel_available() == 1;
	return !p->ktls;
}

/* Restore options for st's TLS part: kernel TLS where the kernel has it,
 * else the driver's record layer, which needs both directions. 0, or a
 * refusal before any socket is touched. */
static int tls_restore_opts(struct xo_proto *p, const struct xo_tcp_state *st,
			    struct xo_restore_opts *o)
{
	if (!o_tls_user(p, st))
		return 0;
	if ((st->tls->dirs & (XO_TLS_DIR_TX | XO_TLS_DIR_RX)) !=
	    (XO_TLS_DIR_TX | XO_TLS_DIR_RX))
		return xo_fail(XO_E_FIELD,
			       "TLS state lacks the %s keys: no kernel TLS here and a record layer in user space needs both directions",
			       st->tls->dirs & XO_TLS_DIR_TX ? "receive" : "send");
	o->tls_user = 1;
	return 0;
}

int xo_proto_offload(struct xo_proto *p, uint32_t peer, int fd,
		     const uint8_t *app, uint32_t app_len, uint64_t now,
		     uint64_t *conn_out)
{
	return xo_proto_offload_tls(p, peer, fd, app, app_len, NULL, now,
				    conn_out);
}

int xo_proto_offload_tls(struct xo_proto *p, uint32_t peer, int fd,
			 const uint8_t *app, uint32_t app_len,
			 const struct xo_tls_state *tls, uint64_t now,
			 uint64_t *conn_out)
{
	struct xo_tcp_state st = { 0 };
	struct peer *pe = peer_get(p, peer);
	struct xo_endpoint local, client;
	struct xo_flow_key in_key, out_key;
	uint8_t *payload = NULL, *due = NULL, *kept_app = NULL;
	uint32_t payload_len, due_len = 0, queued;
	struct conn *c;
	struct lap l;
	int ret;

	xo_clear_error();
	/* A bad TLS state is refused first: nothing looked at or touched. */
	if (tls && xo_tls_check(tls))
		return tls_refused("offload");
	if (p->cfg.role != XO_ROLE_HOST)
		return xo_fail(XO_E_STATE, "offload: this machine is a target");
	if (!pe || pe->state != XO_PEER_UP)
		return xo_fail(XO_E_NOTFOUND, "offload: target %u is not up",
			       peer);
	if (app_len > XO_MAX_APP_BYTES)
		return xo_fail(XO_E_TOO_LARGE, "offload: %u request bytes",
			       app_len);
	lap_start(&l, XO_T_OUT_HOST);
	ret = xo_endpoint_of_fd(fd, 0, &local);
	if (!ret)
		ret = xo_endpoint_of_fd(fd, 1, &client);
	if (ret)
		return ret;
	flow_key(&in_key, &client, &local);
	flow_key(&out_key, &local, &client);
	/* Step 1: block both ways. Outbound too: a frozen socket's timers may
	 * still transmit, and what they send must not reach the client. */
	ret = park_late(p) ? 0 : insert_park(p, &in_key, now);
	if (!ret)
		ret = insert_block(p, &out_key, now);
	if (ret)
		goto unblock;
	lap(p, &l, OH_BLOCK);
	/* Step 2: freeze, capture, BEGIN_OFFLOAD. */
	ret = await_replayed(p, &in_key, fd, "offload");
	if (!ret)
		ret = xo_tcp_freeze(fd);
	if (ret)
		goto unblock;
	ret = xo_tcp_capture(fd, &st);
	queued = st.recvq_len; /* before detach_unread takes it out */
	if (!ret)
		ret = late_park(p, &in_key, now);
	if (!ret)
		ret = xo_state_set_app_data(&st, app, app_len);
	if (!ret && tls)
		ret = attach_tls(&st, tls, "offload");
	if (!ret)
		ret = detach_unread(p, &st, &due, &due_len, &kept_app);
	if (!ret)
		ret = encode_state(&st, NULL, 0, &payload, &payload_len);
	if (ret)
		goto resume;
	c = conn_new(p, peer, 0);
	if (!c) {
		ret = XO_E_NOMEM;
		goto resume;
	}
	/* For a rollback: this socket's own record says the ACK went out. */
	c->owed_ack_len = xo_park_owed_ack(&st, c->owed_ack);
	note_capture(c, &st, queued);
	{
		struct conn *o;

		for (o = p->all; o; o = o->next)
			if (o->state == H_RETURNED && !o->superseded_by &&
			    !memcmp(&o->in_key, &in_key, sizeof(in_key)))
				o->superseded_by = c->id;
	}
	ret = send_msg(pe, XO_MSG_BEGIN_OFFLOAD,
		       due ? XO_FLAG_BYTES_FOLLOW : 0, c->wire_id, payload,
		       payload_len, now);
	state_buf_free(payload, payload_len);
	payload = NULL;
	if (ret) {
		conn_free(p, c);
		goto resume;
	}
	c->due = due; /* sent after our PARKED (host_commit, ship_after) */
	c->due_len = due_len;
	due = NULL;
	c->state = H_WAIT_READY;
	pe->pending++;
	c->fd = fd;
	c->client = client;
	c->local = local;
	c->in_key = in_key;
	c->out_key = out_key;
	c->snd_una = st.snd_seq - st.inflight_len - st.unsent_len;
	c->rcv_nxt = st.rcv_seq;
	c->deadline = now + CFG(p, ready_timeout_ms,
				XO_PROTO_READY_TIMEOUT_MS);
	if (app_len) {
		/* keep the copy for a rollback event */
		c->app = kept_app ? kept_app : st.app_data;
		c->app_len = app_len;
		if (!kept_app)
			st.app_data = NULL;
		kept_app = NULL;
		st.app_len = 0;
	}
	free(kept_app);
	xo_state_release(&st);
	lap(p, &l, OH_SERIALIZE);
	c->lap = l;
	*conn_out = c->id;
	return 0;

resume:
	{
		char why[512];

		snprintf(why, sizeof(why), "%s", xo_last_error());
		if (xo_tcp_resume(fd, NULL))
			fprintf(stderr, "xo: offload: resume failed: %s\n",
				xo_last_error());
		xo_fail(ret, "%s", why);
	}
unblock:
	{
		char why[512];

		snprintf(why, sizeof(why), "%s", xo_last_error());
		remove_rule(p, &in_key);
		remove_rule(p, &out_key);
		replay_parked(p, NULL, &in_key, &local, NULL);
		xo_fail(ret, "%s", why);
	}
	state_buf_free(payload, payload_len);
	free(due);
	free(kept_app);
	xo_state_release(&st);
	return ret;
}

static void host_commit(struct xo_proto *p, struct peer *pe, struct conn *c,
			const struct xo_endpoint *at, uint64_t now)
{
	struct xo_steer_action a;
	struct xo_proto_event *ev;
	int ret;

	lap(p, &c->lap, OH_READY);
	/* Step 5: the redirect replaces the block in one map write. */
	action(p, &a, XO_STEER_REDIRECT, now,
	       CFG(p, redirect_ttl_ms, XO_PROTO_REDIRECT_TTL_MS));
	memcpy(a.new_dst_addr, at->addr, 16);
	a.new_dst_port = htons(at->port);
	memcpy(a.dst_mac, pe->o.mac, 6);
	memcpy(a.src_mac, p->mac, 6);
	ret = xo_rules_insert(p->cfg.rules, &c->in_key, &a);
	if (ret) {
		char why[XO_EV_TEXT_LEN];

		snprintf(why, sizeof(why), "redirect failed: %s",
			 xo_last_error());
		host_rollback(p, c, ret, why, true, now);
		return;
	}
	lap(p, &c->lap, OH_REDIRECT);
	/* Point of no return. Step 6: our socket goes without a signal. */
	take_late_bytes(p, c);
	if (xo_tcp_discard(c->fd)) {
		fprintf(stderr, "xo: conn %llx: discard: %s\n",
			(unsigned long long)c->id, xo_last_error());
		close(c->fd);
	}
	c->fd = -1;
	remove_rule(p, &c->out_key);
	send_msg(pe, XO_MSG_HOST_READY, 0, c->wire_id, NULL, 0, now);
	/* The last target's frames are older than ours: while they are still
	 * on their way, ours wait for them (release_park sends both, in
	 * order). The new target holds its ingress until one PARKED came. */
	if (!older_frames_due(p, c))
		ship_to_new_owner(p, pe, c, now);
	lap(p, &c->lap, OH_DISCARD);
	lap_total(p, &c->lap, OH_TOTAL);
	if (pe->pending)
		pe->pending--;
	c->state = H_OFFLOADED;
	c->rule = a;
	c->at = *at;
	c->renew_at = now + CFG(p, redirect_ttl_ms,
				XO_PROTO_REDIRECT_TTL_MS) / 3;
	c->deadline = 0;
	free(c->app);
	c->app = NULL;
	c->app_len = 0;
	pe->offloaded++;
	pe->handed++;
	peer_ok(pe);
	p->stats.offloads++;
	ev = push_event(p, XO_EV_OFFLOADED, pe->id, c->id, -1);
	if (ev) {
		ev->client = c->client;
		ev->local = *at;
	}
}

/* A client waiting in silence for a response learns at once that its
 * connection died with its target (see xo_proto.h). */
int xo_probe_client(const struct xo_endpoint *local,
		    const struct xo_endpoint *client, uint32_t snd_una,
		    uint32_t rcv_nxt)
{
	uint8_t pkt[20] = { 0 };
	struct sockaddr_storage ss = { 0 };
	uint32_t sum = 0;
	socklen_t sl;
	size_t alen, i;
	int fd, ret = 0;

	xo_clear_error();
	if (!local || !client || local->family != client->family)
		return xo_fail(XO_E_INVAL, "probe: endpoints of one family needed");
	alen = client->family == AF_INET6 ? 16 : 4;

	xo_put16(pkt, local->port);
	xo_put16(pkt + 2, client->port);
	xo_put32(pkt + 4, snd_una - 1);
	xo_put32(pkt + 8, rcv_nxt);
	pkt[12] = 5 << 4;
	pkt[13] = 0x10; /* ACK */
	xo_put16(pkt + 14, 0xffff);
	/* Checksum over the pseudo header and the segment. */
	for (i = 0; i < alen; i += 2)
		sum += xo_get16(local->addr + i) +
		       xo_get16(client->addr + i);
	sum += IPPROTO_TCP + sizeof(pkt);
	for (i = 0; i < sizeof(pkt); i += 2)
		sum += xo_get16(pkt + i);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	xo_put16(pkt + 16, (uint16_t)~sum);

	fd = socket(client->family, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_TCP);
	if (fd < 0)
		return xo_fail_sys("probe: socket(SOCK_RAW)");
	{
		struct xo_endpoint from = *local;

		from.port = 0; /* a raw socket's "port" is its protocol */
		ret = xo_endpoint_to_sockaddr(&from, &ss, sizeof(ss));
	}
	if (ret >= 0 && bind(fd, (struct sockaddr *)&ss, (socklen_t)ret) < 0)
		ret = xo_fail_sys("probe: bind");
	if (ret < 0)
		goto out;
	{
		struct xo_endpoint to = *client;

		to.port = 0;
		ret = xo_endpoint_to_sockaddr(&to, &ss, sizeof(ss));
	}
	if (ret < 0)
		goto out;
	sl = (socklen_t)ret;
	ret = 0;
	if (sendto(fd, pkt, sizeof(pkt), 0, (struct sockaddr *)&ss, sl) < 0)
		ret = xo_fail_sys("probe: sendto");
out:
	close(fd);
	return ret;
}

static void host_withdraw(struct xo_proto *p, struct conn *c)
{
	struct xo_proto_event *ev;

	remove_rule(p, &c->in_key);
	if (xo_probe_client(&c->local, &c->client, c->snd_una, c->rcv_nxt))
		fprintf(stderr, "xo: conn %llx: cannot probe the client: %s\n",
			(unsigned long long)c->id, xo_last_error());
	p->stats.withdrawn++;
	ev = push_event(p, XO_EV_WITHDRAWN, c->peer, c->id, -1);
	if (ev)
		ev->client = c->client;
}

/* ---- host: inbound and moves ------------------------------------------ */

static void returned_event(struct xo_proto *p, struct conn *c, int fd,
			   struct xo_tcp_state *st)
{
	struct xo_proto_event *ev;

	p->stats.returns++;
	c->app_fd = fd;
	ev = push_event(p, XO_EV_RETURNED, c->peer, c->id, fd);
	if (ev) {
		ev->client = c->client;
		ev->local = c->local;
		event_data(ev, &st->app_data, st->app_len);
		if (o_tls_user(p, st))
			event_tls(ev, st);
	}
}

/* A resumed connection whose unread bytes will not come: nothing can
 * carry it on, so its client is told at once (reset), not left to hang. */
static void reset_socket(int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	if (fd < 0)
		return;
	if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0)
		fprintf(stderr, "xo: reset: setsockopt(SO_LINGER): %s\n",
			strerror(errno));
	if (close(fd) < 0)
		fprintf(stderr, "xo: reset: close: %s\n", strerror(errno));
}

/* Host: a returned connection whose BYTES did not come. */
static void host_bytes_missed(struct xo_proto *p, struct conn *c)
{
	struct xo_proto_event *ev;

	fprintf(stderr, "xo: conn %llx: its unread bytes never came back; client reset\n",
		(unsigned long long)c->id);
	reset_socket(c->fd);
	c->fd = -1;
	c->awaiting = false;
	p->stats.bytes_missed++;
	ev = push_event(p, XO_EV_WITHDRAWN, c->peer, c->id, -1);
	if (ev) {
		ev->client = c->client;
		snprintf(ev->text, sizeof(ev->text),
			 "the connection's unread bytes never came back");
	}
}

/* A state flagged "bytes follow" must have left them out (and carry no
 * TLS record state, whose queues stay in it): else why says so. */
static bool bytes_follow_refused(const struct xo_msg *m,
				 const struct xo_tcp_state *st, char *why,
				 size_t cap)
{
	if (!(m->flags & XO_FLAG_BYTES_FOLLOW) ||
	    !(st->tls || st->app_len || st->recvq_len))
		return false;
	snprintf(why, cap, "bytes to follow a state that has TLS or unread bytes");
	return true;
}

static void host_done(struct xo_proto *p, struct peer *pe,
		      const struct xo_msg *m, uint64_t now)
{
	struct conn *c = conn_by_id(p, m->conn_id);
	struct xo_tcp_state st = { 0 };
	struct xo_endpoint dest = { 0 };
	const uint8_t *state_buf = m->payload;
	uint32_t state_len = m->payload_len;
	char why[XO_EV_TEXT_LEN];
	struct lap l;
	int ret, fd;

	if (!c || c->peer != pe->id || c->state != H_OFFLOADED) {
		refused(p, pe, m->conn_id, XO_ABORT_REFUSED, "unknown connection",
			now);
		return;
	}
	if (m->flags & XO_DONE_FLAG_CLOSED) {
		/* Keep steering the flow's last FIN/ACKs a while. */
		c->rule.expires_ns = now + CFG(p, closed_ttl_ms,
					       XO_PROTO_CLOSED_TTL_MS);
		if (!xo_rules_insert(p->cfg.rules, &c->in_key, &c->rule))
			linger(p, &c->in_key, &c->rule);
		pe->offloaded--;
		p->stats.closed_on_target++;
		send_msg(pe, XO_MSG_END_OFFLOAD, 0, m->conn_id, NULL, 0, now);
		conn_free(p, c);
		return;
	}
	lap_start(&l, XO_T_IN_HOST);
	if (m->flags & XO_DONE_FLAG_MOVE) {
		if (m->payload_len < XO_READY_LEN ||
		    xo_ready_decode(m->payload, XO_READY_LEN, &dest) < 0) {
			ret = XO_E_FIELD;
			snprintf(why, sizeof(why), "move: bad destination");
			goto refuse;
		}
		state_buf += XO_READY_LEN;
		state_len -= XO_READY_LEN;
	}
	ret = xo_state_decode(state_buf, state_len, &st);
	if (ret) {
		snprintf(why, sizeof(why), "%s", xo_last_error());
		goto refuse;
	}
	/* The state must be the flow we handed to this target, nothing else. */
	if (!ep_same(&st.remote, &c->client) || !ep_same(&st.local, &c->at)) {
		char a[64], b[64];

		ret = XO_E_REFUSED;
		snprintf(why, sizeof(why), "state names %s <-> %s, not our flow",
			 ep_str(&st.local, a, sizeof(a)),
			 ep_str(&st.remote, b, sizeof(b)));
		goto refuse;
	}
	if (bytes_follow_refused(m, &st, why, sizeof(why))) {
		ret = XO_E_FIELD;
		goto refuse;
	}
	lap(p, &l, IH_DECODE);
	if (m->flags & XO_DONE_FLAG_MOVE) {
		struct peer *to;
		uint8_t *payload = NULL;
		uint32_t payload_len;

		for (to = p->peers; to; to = to->next)
			if (!to->dead && to != pe && to->state == XO_PEER_UP &&
			    ep_same_addr(&to->o.addr, &dest))
				break;
		if (!to) {
			ret = XO_E_NOTFOUND;
			snprintf(why, sizeof(why), "move: no such target is up");
			goto refuse;
		}
		/* The new target sees the flow as ours, as in an offload. */
		st.local = c->local;
		ret = encode_state(&st, NULL, 0, &payload, &payload_len);
		if (!ret)
			ret = send_msg(to, XO_MSG_BEGIN_OFFLOAD,
				       m->flags & XO_FLAG_BYTES_FOLLOW,
				       c->wire_id, payload, payload_len, now);
		state_buf_free(payload, payload_len);
		if (ret) {
			snprintf(why, sizeof(why), "%s", xo_last_error());
			goto refuse;
		}
		xo_state_release(&st);
		c->state = H_MOVING;
		c->move_peer = to->id;
		c->deadline = now + CFG(p, ready_timeout_ms,
					XO_PROTO_READY_TIMEOUT_MS);
		return;
	}
	/* Step 9: restore on our own endpoint. */
	{
		struct xo_restore_opts o = { .size = sizeof(o), .use_local = 1 };

		o.local = c->local;
		fd = tls_restore_opts(p, &st, &o);
		if (!fd)
			fd = xo_tcp_restore(&st, &o);
	}
	if (fd < 0) {
		ret = fd;
		snprintf(why, sizeof(why), "%s", xo_last_error());
		goto refuse;
	}
	lap(p, &l, IH_RESTORE);
	c->owed_ack_len = xo_park_owed_ack(&st, c->owed_ack);
	/* Step 10: the redirect goes, synchronously in both tiers; a park
	 * takes its place in the same write, until the target's parked
	 * frames are in (they are older than anything that comes now). */
	if (insert_park(p, &c->in_key, now))
		remove_rule(p, &c->in_key);
	lap(p, &l, IH_REMOVE);
	ret = xo_tcp_resume(fd, &st);
	if (ret) {
		/* Past the point where the target may still resume: its copy is
		 * frozen and it waits for our word. Give it back. */
		snprintf(why, sizeof(why), "%s", xo_last_error());
		xo_tcp_discard(fd);
		xo_rules_insert(p->cfg.rules, &c->in_key, &c->rule);
		goto refuse;
	}
	lap(p, &l, IH_RESUME);
	send_msg(pe, XO_MSG_END_OFFLOAD, 0, m->conn_id, NULL, 0, now);
	lap(p, &l, IH_END);
	lap_total(p, &l, IH_TOTAL);
	pe->offloaded--;
	if (m->flags & XO_FLAG_BYTES_FOLLOW) {
		/* Live, and acknowledging what the client sends; the driver
		 * hears of it once the bytes it reads first are in. */
		c->fd = fd;
		c->awaiting = true;
	} else {
		returned_event(p, c, fd, &st);
	}
	xo_state_release(&st);
	/* Kept a moment: what the target parked meanwhile comes next. */
	c->state = H_RETURNED;
	/* The target's PARKED follows END_OFFLOAD at once: hold the flow's
	 * frames no longer than an answer may take. */
	c->deadline = now + CFG(p, ready_timeout_ms, XO_PROTO_READY_TIMEOUT_MS);
	c->park_until = c->deadline;
	c->renew_at = 0;
	return;

refuse:
	/* The target resumes on an explicit refusal: the flow stays there. */
	xo_state_release(&st);
	refused(p, pe, m->conn_id, XO_ABORT_RESTORE, why, now);
	(void)ret;
}

/* A target's BYTES: a returned connection's unread bytes (now the driver
 * gets it), or a moved one's, which follow it to its new target. */
static void host_bytes(struct xo_proto *p, struct peer *pe, struct conn *c,
		       const struct xo_msg *m, uint64_t now)
{
	struct xo_tcp_state st = { 0 };

	if (c && c->state == H_RETURNED && c->peer == pe->id && c->awaiting) {
		st.app_data = malloc(m->payload_len ? m->payload_len : 1);
		if (!st.app_data) {
			host_bytes_missed(p, c);
		} else {
			memcpy(st.app_data, m->payload, m->payload_len);
			st.app_len = m->payload_len;
			c->awaiting = false;
			returned_event(p, c, c->fd, &st);
			c->fd = -1;
			xo_state_release(&st);
		}
		if (!c->park_until)
			conn_free(p, c); /* its PARKED came before */
		return;
	}
	if (c && c->state == H_OFFLOADED && c->peer != pe->id) {
		struct peer *to = peer_get(p, c->peer);

		if (to)
			send_msg(to, XO_MSG_BYTES, 0, c->wire_id, m->payload,
				 m->payload_len, now);
		return;
	}
	if (c)
		violation(p, pe, now, "BYTES for connection %llx, which waits for none",
			  (unsigned long long)m->conn_id);
	/* else: a connection withdrawn meanwhile */
}

/* The destination of a move answered (READY or ABORT) or failed. */
static void move_finish(struct xo_proto *p, struct conn *c,
			const struct xo_endpoint *at, const char *why,
			uint64_t now)
{
	struct peer *from = peer_get(p, c->peer), *to = peer_get(p, c->move_peer);
	struct xo_steer_action a;

	if (at && to) {
		a = c->rule;
		memcpy(a.new_dst_addr, at->addr, 16);
		a.new_dst_port = htons(at->port);
		memcpy(a.dst_mac, to->o.mac, 6);
		a.expires_ns = now + CFG(p, redirect_ttl_ms,
					 XO_PROTO_REDIRECT_TTL_MS);
		if (xo_rules_insert(p->cfg.rules, &c->in_key, &a) == 0) {
			/* One map write: the flow is B's now. */
			if (from) {
				send_msg(from, XO_MSG_END_OFFLOAD, 0,
					 c->wire_id, NULL, 0, now);
				from->offloaded--;
			}
			send_msg(to, XO_MSG_HOST_READY, 0, c->wire_id, NULL,
				 0, now);
			to->offloaded++;
			to->handed++;
			peer_ok(to);
			c->peer = to->id;
			c->rule = a;
			c->at = *at;
			c->state = H_OFFLOADED;
			c->deadline = 0;
			p->stats.moves++;
			return;
		}
		why = "redirect to the new target failed";
		send_abort(to, c->wire_id, XO_ABORT_HOST, why, now);
	}
	/* B will not have it: A keeps it (it resumes on our ABORT). */
	if (to && !at)
		peer_fail(to, now);
	c->state = H_OFFLOADED;
	c->deadline = 0;
	if (from)
		send_abort(from, c->wire_id, XO_ABORT_REFUSED, why, now);
	else
		host_withdraw(p, c);
}

static void host_input(struct xo_proto *p, struct peer *pe,
		       const struct xo_msg *m, uint64_t now)
{
	struct conn *c = conn_by_id(p, m->conn_id);
	struct xo_endpoint at;
	uint32_t reason;
	const uint8_t *text;
	uint32_t text_len;
	char why[XO_EV_TEXT_LEN];

	switch (m->type) {
	case XO_MSG_TARGET_READY:
	case XO_MSG_ABORT:
		if (!c)
			return; /* crossed our ABORT: already rolled back */
		if (c->state == H_MOVING && c->move_peer == pe->id) {
			if (m->type == XO_MSG_TARGET_READY &&
			    xo_ready_decode(m->payload, m->payload_len, &at) == 0 &&
			    at.family == c->client.family && now <= c->deadline) {
				move_finish(p, c, &at, NULL, now);
				return;
			}
			if (m->type == XO_MSG_TARGET_READY)
				send_abort(pe, c->wire_id, XO_ABORT_HOST,
					   "late or malformed TARGET_READY", now);
			move_finish(p, c, NULL, "the new target refused", now);
			return;
		}
		if (c->peer != pe->id) {
			/* The answer of a move's destination after we gave up
			 * on it (it had our ABORT already): nothing to do. */
			if (c->move_peer == pe->id)
				return;
			return violation(p, pe, now, "%s for a connection of another target",
					 m->type == XO_MSG_ABORT ? "ABORT" : "TARGET_READY");
		}
		if (c->state != H_WAIT_READY) {
			if (m->type == XO_MSG_ABORT)
				return; /* a late answer to something settled */
			return violation(p, pe, now, "TARGET_READY out of order");
		}
		if (m->type == XO_MSG_ABORT) {
			if (xo_abort_decode(m->payload, m->payload_len, &reason,
					    &text, &text_len))
				reason = 0, text = (const uint8_t *)"", text_len = 0;
			snprintf(why, sizeof(why), "target refused: %.*s (reason %u)",
				 (int)(text_len > 100 ? 100 : text_len), text, reason);
			peer_fail(pe, now);
			host_rollback(p, c, XO_E_REFUSED, why, false, now);
			return;
		}
		if (xo_ready_decode(m->payload, m->payload_len, &at) ||
		    at.family != c->client.family) {
			host_rollback(p, c, XO_E_FIELD, "malformed TARGET_READY",
				      true, now);
			return violation(p, pe, now, "malformed TARGET_READY");
		}
		if (now > c->deadline) {
			/* Too late: we have given up already (the tick may just
			 * not have run). The target waits for our word. */
			p->stats.timeouts++;
			peer_fail(pe, now);
			host_rollback(p, c, XO_E_BUSY, "TARGET_READY came too late",
				      true, now);
			return;
		}
		host_commit(p, pe, c, &at, now);
		return;
	case XO_MSG_TARGET_DONE:
		host_done(p, pe, m, now);
		return;
	case XO_MSG_PARKED:
		if (c && c->state == H_RETURNED && c->peer == pe->id &&
		    c->park_until) {
			release_park(p, c, m->payload, m->payload_len, &c->local);
			expect_stragglers(p, c, now);
			if (c->awaiting) /* its BYTES come next */
				c->deadline = now + CFG(p, confirm_timeout_ms,
							XO_PROTO_CONFIRM_TIMEOUT_MS);
			else
				conn_free(p, c);
		} else if (c && c->state == H_RETURNED && c->peer == pe->id) {
			replay_into(p, c, m->payload, m->payload_len, &c->local);
		} else if (!c) {
			late_parked(p, pe, m);
		} else if (c && c->state == H_OFFLOADED && c->peer != pe->id) {
			/* Moved on: the frames follow the connection. */
			struct peer *to = peer_get(p, c->peer);

			if (to && !send_msg(to, XO_MSG_PARKED, 0, c->wire_id,
					    m->payload, m->payload_len, now))
				p->stats.parked_shipped++;
		}
		return;
	case XO_MSG_BYTES:
		host_bytes(p, pe, c, m, now);
		return;
	case XO_MSG_LOAD_REPORT:
		if (xo_load_decode(m->payload, m->payload_len, &pe->load))
			return violation(p, pe, now, "malformed LOAD_REPORT");
		pe->offloaded_at_report = pe->offloaded;
		return;
	default:
		return violation(p, pe, now, "unexpected message type %u from a target",
				 m->type);
	}
}

/* ---- target ------------------------------------------------------------- */

static bool is_host_addr(struct xo_proto *p, const struct xo_endpoint *ep)
{
	uint32_t i;

	for (i = 0; i < p->cfg.n_hosts; i++)
		if (ep_same_addr(&p->cfg.hosts[i], ep))
			return true;
	return false;
}

static int restore_remapped(struct xo_proto *p, struct xo_tcp_state *st,
			    const struct xo_endpoint *mine, uint16_t *port)
{
	struct xo_restore_opts o = { .size = sizeof(o), .use_local = 1 };
	int i, fd = XO_E_BUSY;

	*port = st->local.port;
	fd = tls_restore_opts(p, st, &o);
	if (fd)
		return fd;
	fd = XO_E_BUSY;

	o.local = *mine;
	o.local.port = st->local.port;
	for (i = 0; i < 64; i++) {
		uint32_t r;

		fd = xo_tcp_restore(st, &o);
		if (fd >= 0 || (xo_last_errno() != EADDRINUSE &&
				xo_last_errno() != EADDRNOTAVAIL))
			break;
		/* The 4-tuple is taken here: another port will do, the
		 * source rewrite hides it from the client. */
		if (getrandom(&r, sizeof(r), 0) != sizeof(r))
			r = (uint32_t)clock_ns();
		o.local.port = (uint16_t)(20000 + r % 40000);
	}
	*port = o.local.port;
	return fd;
}

static void target_begin(struct xo_proto *p, struct peer *pe,
			 const struct xo_msg *m, uint64_t now)
{
	struct xo_tcp_state st = { 0 };
	const struct xo_endpoint *mine;
	struct xo_endpoint here, host;
	struct xo_steer_action a;
	char why[XO_EV_TEXT_LEN], e1[64];
	uint8_t ready[XO_READY_LEN];
	uint32_t reason = XO_ABORT_REFUSED;
	struct conn *c, *o;
	uint16_t port;
	struct lap l;
	int fd = -1, ret;

	if (conn_by_wire(p, pe->id, m->conn_id))
		return violation(p, pe, now, "BEGIN_OFFLOAD for connection %llx twice",
				 (unsigned long long)m->conn_id);
	crash_point(p, "begin");
	lap_start(&l, XO_T_OUT_TARGET);
	ret = xo_state_decode(m->payload, m->payload_len, &st);
	if (ret) {
		reason = XO_ABORT_DECODE;
		snprintf(why, sizeof(why), "%s", xo_last_error());
		goto refuse;
	}
	lap(p, &l, OT_DECODE);
	if (bytes_follow_refused(m, &st, why, sizeof(why))) {
		reason = XO_ABORT_DECODE;
		goto refuse;
	}
	if (st.tls && p->cfg.no_tls) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why),
			 "this target takes no TLS sessions (no_tls): it holds no session keys");
		goto refuse;
	}
	if (st.tls && p->cfg.tls_kernel_only && o_tls_user(p, &st)) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why),
			 "this target serves TLS only with kernel TLS, which its kernel lacks");
		goto refuse;
	}
	host = st.local;
	/* The state's local end must be one of our hosts, and a flow we do
	 * not hold already: nobody makes us bind another 4-tuple. */
	if (!is_host_addr(p, &host) || !host.port || !st.remote.port) {
		inet_ntop(host.family == AF_INET6 ? AF_INET6 : AF_INET, host.addr,
			  e1, sizeof(e1));
		snprintf(why, sizeof(why), "state names %s port %u, not a host of ours",
			 e1, host.port);
		goto refuse;
	}
	for (o = p->all; o; o = o->next)
		if (ep_same(&o->client, &st.remote) &&
		    ep_same(&o->local, &host)) {
			snprintf(why, sizeof(why), "flow of %s is here already",
				 ep_str(&st.remote, e1, sizeof(e1)));
			goto refuse;
		}
	mine = host.family == AF_INET6 ? &p->cfg.local6 : &p->cfg.local4;
	if (mine->family != host.family) {
		snprintf(why, sizeof(why), "no local address of the family of %s",
			 ep_str(&host, e1, sizeof(e1)));
		goto refuse;
	}
	fd = restore_remapped(p, &st, mine, &port);
	if (fd < 0) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why), "%s", xo_last_error());
		goto refuse;
	}
	lap(p, &l, OT_RESTORE);
	crash_point(p, "restored");
	c = conn_new(p, pe->id, m->conn_id);
	if (!c) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why), "out of memory");
		goto refuse;
	}
	here = *mine;
	here.port = port;
	c->fd = fd;
	c->client = st.remote;
	c->local = host;
	c->at = here;
	flow_key(&c->in_key, &st.remote, &here);
	flow_key(&c->out_key, &here, &st.remote);
	/* Park the client's frames from now on: until the host's parked
	 * frames (older) are in, newer ones must not reach the socket. This
	 * also replaces a park left from this flow's last hand-back. */
	ret = insert_park(p, &c->in_key, now);
	if (ret) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why), "%s", xo_last_error());
		conn_free(p, c);
		goto refuse;
	}
	/* Step 4: the source rewrite exists before anything can leave. */
	action(p, &a, XO_STEER_SRC_REWRITE, now,
	       CFG(p, redirect_ttl_ms, XO_PROTO_REDIRECT_TTL_MS));
	memcpy(a.new_src_addr, host.addr, 16);
	a.new_src_port = htons(host.port);
	ret = xo_rules_insert(p->cfg.rules, &c->out_key, &a);
	if (ret) {
		reason = XO_ABORT_RESTORE;
		snprintf(why, sizeof(why), "%s", xo_last_error());
		conn_free(p, c);
		goto refuse;
	}
	c->rule = a;
	lap(p, &l, OT_REWRITE);
	xo_ready_encode(&here, ready, sizeof(ready));
	send_msg(pe, XO_MSG_TARGET_READY, 0, m->conn_id, ready,
		 sizeof(ready), now);
	lap(p, &l, OT_READY);
	lap_total(p, &l, OT_TOTAL);
	c->state = T_WAIT_HOST_READY;
	c->awaiting = m->flags & XO_FLAG_BYTES_FOLLOW;
	c->st = st; /* resume needs the unsent bytes */
	c->owed_ack_len = xo_park_owed_ack(&st, c->owed_ack);
	c->deadline = now + CFG(p, confirm_timeout_ms,
				XO_PROTO_CONFIRM_TIMEOUT_MS);
	crash_point(p, "ready");
	return;

refuse:
	if (fd >= 0)
		xo_tcp_discard(fd);
	xo_state_release(&st);
	refused(p, pe, m->conn_id, reason, why, now);
}

/* Undo a hand-back's freeze: the connection stays and is served here. */
static void target_keep(struct xo_proto *p, struct conn *c, const char *why)
{
	struct xo_proto_event *ev;
	int code = 0;

	if (xo_tcp_resume(c->fd, NULL)) {
		fprintf(stderr, "xo: conn %llx: resume: %s\n",
			(unsigned long long)c->id, xo_last_error());
		code = XO_E_SYS;
	}
	if (xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule))
		fprintf(stderr, "xo: conn %llx: rewrite back: %s\n",
			(unsigned long long)c->id, xo_last_error());
	release_park(p, c, NULL, 0, &c->at);
	free(c->due); /* the socket still holds them */
	c->due = NULL;
	c->due_len = 0;
	c->state = T_SERVING;
	c->deadline = 0;
	p->stats.kept++;
	ev = push_event(p, XO_EV_KEPT, c->peer, c->id, c->fd);
	if (ev) {
		ev->code = code;
		ev->client = c->client;
		ev->local = c->at;
		snprintf(ev->text, sizeof(ev->text), "%s", why);
		event_data(ev, &c->app, c->app_len);
	}
	c->app_len = 0;
}

static void target_drop(struct xo_proto *p, struct conn *c, uint32_t type)
{
	struct xo_proto_event *ev;

	drop_parked(p, &c->in_key);
	if (c->fd >= 0 && xo_tcp_discard(c->fd)) {
		fprintf(stderr, "xo: conn %llx: discard: %s\n",
			(unsigned long long)c->id, xo_last_error());
		close(c->fd);
	}
	remove_rule(p, &c->out_key);
	remove_rule(p, &c->in_key);
	if (type) {
		ev = push_event(p, type, c->peer, c->id, -1);
		if (ev)
			ev->client = c->client;
	}
	conn_free(p, c);
}

static void target_bytes_missed(struct xo_proto *p, struct conn *c,
				uint64_t now);

/* The driver gets a restored connection: with the request bytes of the
 * state, or with the unread bytes that followed it (`more`). */
static void adopted_event(struct xo_proto *p, struct peer *pe, struct conn *c,
			  const uint8_t *more, uint32_t more_len)
{
	struct xo_proto_event *ev;

	if (more_len) {
		/* A state with bytes to follow has no application data. */
		xo_state_release(&c->st);
		c->st.app_data = malloc(more_len);
		if (c->st.app_data) {
			memcpy(c->st.app_data, more, more_len);
			c->st.app_len = more_len;
		}
	}
	if (c->awaiting && more_len && !c->st.app_data) {
		target_bytes_missed(p, c, clock_ns());
		return;
	}
	c->awaiting = false;
	c->deadline = 0;
	p->stats.adopted++;
	ev = push_event(p, XO_EV_ADOPTED, pe->id, c->id, c->fd);
	if (ev) {
		ev->code = c->at.port != c->local.port; /* remapped */
		if (ev->code) {
			struct xo_endpoint want = c->at;
			char a[64], b[64];

			want.port = c->local.port;
			snprintf(ev->text, sizeof(ev->text),
				 "4-tuple %s <-> %s taken; remapping to port %u",
				 ep_str(&want, a, sizeof(a)),
				 ep_str(&c->client, b, sizeof(b)), c->at.port);
		}
		ev->client = c->client;
		ev->local = c->at;
		event_data(ev, &c->st.app_data, c->st.app_len);
		if (o_tls_user(p, &c->st))
			event_tls(ev, &c->st);
	}
	c->st.app_len = 0;
	xo_state_release(&c->st);
}

/* Target: a resumed connection whose BYTES did not come. The client is
 * reset through our source rewrite, and the host retires its redirect as
 * for a connection closed here (TARGET_DONE with CLOSED). */
static void target_bytes_missed(struct xo_proto *p, struct conn *c,
				uint64_t now)
{
	struct peer *pe = peer_get(p, c->peer);

	fprintf(stderr, "xo: conn %llx: its unread bytes never came; client reset\n",
		(unsigned long long)c->id);
	p->stats.bytes_missed++;
	/* awaiting stays set: the driver never knew it (no CLOSED event). */
	drop_parked(p, &c->in_key);
	remove_rule(p, &c->in_key);
	reset_socket(c->fd);
	c->fd = -1;
	c->rule.expires_ns = now + CFG(p, closed_ttl_ms, XO_PROTO_CLOSED_TTL_MS);
	if (!xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule))
		linger(p, &c->out_key, &c->rule);
	if (pe && pe->state == XO_PEER_UP) {
		send_msg(pe, XO_MSG_TARGET_DONE, XO_DONE_FLAG_CLOSED, c->wire_id,
			 NULL, 0, now);
		c->state = T_WAIT_CLOSED;
		c->deadline = now + CFG(p, confirm_timeout_ms,
					XO_PROTO_CONFIRM_TIMEOUT_MS);
		return;
	}
	remove_rule(p, &c->out_key);
	conn_free(p, c);
}

static void target_input(struct xo_proto *p, struct peer *pe,
			 const struct xo_msg *m, uint64_t now)
{
	struct conn *c;
	struct lap l;

	if (m->type == XO_MSG_BEGIN_OFFLOAD)
		return target_begin(p, pe, m, now);
	if (m->type == XO_MSG_PARKED) {
		c = conn_by_wire(p, pe->id, m->conn_id);
		if (c && c->state == T_SERVING && c->park_until)
			release_park(p, c, m->payload, m->payload_len, &c->at);
		else if (c && c->state == T_SERVING)
			replay_into(p, c, m->payload, m->payload_len, &c->at);
		else if (c && c->state == T_WAIT_END)
			hold_frames(c, m->payload, m->payload_len);
		return;
	}
	if (m->type == XO_MSG_BYTES) {
		c = conn_by_wire(p, pe->id, m->conn_id);
		if (c && c->state == T_SERVING && c->awaiting)
			adopted_event(p, pe, c, m->payload, m->payload_len);
		else if (c && c->state != T_WAIT_CLOSED) /* else: too late */
			violation(p, pe, now, "BYTES for connection %llx, which waits for none",
				  (unsigned long long)m->conn_id);
		return;
	}
	if (m->type != XO_MSG_HOST_READY && m->type != XO_MSG_END_OFFLOAD &&
	    m->type != XO_MSG_ABORT)
		return violation(p, pe, now, "unexpected message type %u from a host",
				 m->type);
	c = conn_by_wire(p, pe->id, m->conn_id);
	if (!c) {
		if (m->type == XO_MSG_ABORT)
			return; /* crossed our own refusal */
		return violation(p, pe, now, "message %u for unknown connection %llx",
				 m->type, (unsigned long long)m->conn_id);
	}
	switch (c->state) {
	case T_WAIT_HOST_READY:
		if (m->type == XO_MSG_ABORT) {
			target_drop(p, c, 0);
			return;
		}
		if (m->type != XO_MSG_HOST_READY)
			break;
		crash_point(p, "host_ready");
		if (xo_tcp_resume(c->fd, &c->st)) {
			/* The host has let go: nothing can carry this flow on.
			 * Tell it, so the client meets a reset, not a hang. */
			fprintf(stderr, "xo: conn %llx: resume: %s\n",
				(unsigned long long)c->id, xo_last_error());
			xo_tcp_discard(c->fd);
			c->fd = -1;
			c->rule.expires_ns = now + CFG(p, closed_ttl_ms,
						       XO_PROTO_CLOSED_TTL_MS);
			if (!xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule))
				linger(p, &c->out_key, &c->rule);
			send_msg(pe, XO_MSG_TARGET_DONE, XO_DONE_FLAG_CLOSED,
				 c->wire_id, NULL, 0, now);
			c->state = T_WAIT_CLOSED;
			c->deadline = now + CFG(p, confirm_timeout_ms,
						XO_PROTO_CONFIRM_TIMEOUT_MS);
			return;
		}
		c->state = T_SERVING;
		c->deadline = 0;
		c->park_until = now + CFG(p, ready_timeout_ms,
					  XO_PROTO_READY_TIMEOUT_MS);
		c->renew_at = now + CFG(p, redirect_ttl_ms,
					XO_PROTO_REDIRECT_TTL_MS) / 3;
		if (c->awaiting) {
			/* Live, and acknowledging what the client sends; the
			 * driver hears of it once its unread bytes are in. */
			xo_state_release(&c->st);
			c->deadline = now + CFG(p, confirm_timeout_ms,
						XO_PROTO_CONFIRM_TIMEOUT_MS);
			return;
		}
		adopted_event(p, pe, c, NULL, 0);
		return;
	case T_WAIT_END:
		l = c->lap;
		if (m->type == XO_MSG_ABORT) {
			target_keep(p, c, "the host refused the hand-back");
			return;
		}
		if (m->type != XO_MSG_END_OFFLOAD)
			break;
		lap(p, &l, IT_END);
		take_late_bytes(p, c);
		ship_parked(p, pe, c->wire_id, &c->in_key, c->held,
			    c->held_len, now);
		ship_due(p, pe, c, now);
		watch_stragglers(p, pe, c->wire_id, &c->in_key, now);
		{
			struct xo_flow_key k = c->in_key;
			struct xo_steer_action a;

			target_drop(p, c, XO_EV_HANDED_BACK);
			/* A straggler still on its way here must meet no
			 * socket (our kernel would reset the client): park
			 * it a little longer and send it on (stragglers). */
			action(p, &a, XO_STEER_PARK, now, STRAGGLER_MS * MS);
			if (!xo_rules_insert(p->cfg.rules, &k, &a))
				linger(p, &k, &a);
		}
		p->stats.handed_back++;
		lap(p, &l, IT_CLEANUP);
		lap_total(p, &l, IT_TOTAL);
		return;
	case T_WAIT_CLOSED:
		if (m->type == XO_MSG_ABORT || m->type == XO_MSG_END_OFFLOAD) {
			if (!c->awaiting)
				push_event(p, XO_EV_CLOSED, pe->id, c->id, -1);
			conn_free(p, c);
			return;
		}
		break;
	default:
		if (m->type == XO_MSG_ABORT)
			return;
		break;
	}
	violation(p, pe, now, "message %u out of order for connection %llx",
		  m->type, (unsigned long long)m->conn_id);
}

static int target_freeze(struct xo_proto *p, struct conn *c,
			 const struct xo_endpoint *dest, const uint8_t *app,
			 uint32_t app_len, const struct xo_tls_state *tls,
			 uint64_t now)
{
	struct xo_tcp_state st = { 0 };
	struct peer *pe = peer_get(p, c->peer);
	uint8_t prefix[XO_READY_LEN], *payload = NULL, *due = NULL;
	uint8_t *kept_app = NULL;
	uint32_t payload_len, due_len = 0, kept_len;
	struct lap l;
	int ret;

	if (!pe || pe->state != XO_PEER_UP)
		return xo_fail(XO_E_STATE, "hand back: the host is not connected");
	if (app_len > XO_MAX_APP_BYTES)
		return xo_fail(XO_E_TOO_LARGE, "hand back: %u bytes", app_len);
	if (tls && xo_tls_check(tls))
		return tls_refused("hand back");
	lap_start(&l, XO_T_IN_TARGET);
	/* Step 7: block ingress, and egress while frozen: timers still send,
	 * and bytes sent after the capture would be "unsent" to the host. */
	ret = park_late(p) ? 0 : insert_park(p, &c->in_key, now);
	if (!ret)
		ret = insert_block(p, &c->out_key, now);
	if (ret)
		goto unblock;
	lap(p, &l, IT_BLOCK);
	ret = await_replayed(p, &c->in_key, c->fd, "hand back");
	if (!ret)
		ret = xo_tcp_freeze(c->fd);
	if (ret)
		goto unblock;
	/* Step 8. */
	ret = xo_tcp_capture(c->fd, &st);
	if (!ret)
		ret = late_park(p, &c->in_key, now);
	if (!ret) { /* if the host refuses: target_keep draws it */
		c->owed_ack_len = xo_park_owed_ack(&st, c->owed_ack);
		note_capture(c, &st, st.recvq_len);
	}
	if (!ret)
		ret = xo_state_set_app_data(&st, app, app_len);
	if (!ret && tls)
		ret = attach_tls(&st, tls, "hand back");
	if (!ret && dest) {
		/* Only the address names the destination; the port field of
		 * the READY encoding carries its control port. */
		struct xo_endpoint to = *dest;

		if (!to.port)
			to.port = XO_DEFAULT_CONTROL_PORT;
		if (xo_ready_encode(&to, prefix, sizeof(prefix)) < 0)
			ret = XO_E_INVAL;
	}
	kept_len = st.app_len;
	if (!ret)
		ret = detach_unread(p, &st, &due, &due_len, &kept_app);
	if (!ret)
		ret = encode_state(&st, prefix, dest ? XO_READY_LEN : 0,
				   &payload, &payload_len);
	if (!ret) {
		crash_point(p, "done");
		ret = send_msg(pe, XO_MSG_TARGET_DONE,
			       (dest ? XO_DONE_FLAG_MOVE : 0) |
				       (due ? XO_FLAG_BYTES_FOLLOW : 0),
			       c->wire_id, payload, payload_len, now);
	}
	state_buf_free(payload, payload_len);
	if (ret) {
		free(due);
		free(kept_app);
		goto resume;
	}
	lap(p, &l, IT_SERIALIZE);
	c->lap = l;
	c->state = T_WAIT_END;
	c->park_until = 0; /* parked frames now go back with it */
	c->deadline = now + CFG(p, confirm_timeout_ms,
				XO_PROTO_CONFIRM_TIMEOUT_MS);
	free(c->app);
	if (due) {
		c->app = kept_app; /* for a KEPT event */
		c->app_len = kept_app ? kept_len : 0;
		c->due = due; /* sent after our PARKED, on END_OFFLOAD */
		c->due_len = due_len;
	} else {
		c->app = st.app_data;
		c->app_len = st.app_len;
		st.app_data = NULL;
	}
	xo_state_release(&st);
	return 0;

resume:
	{
		char why[512];

		snprintf(why, sizeof(why), "%s", xo_last_error());
		xo_tcp_resume(c->fd, NULL);
		xo_fail(ret, "%s", why);
	}
unblock:
	{
		char why[512];

		snprintf(why, sizeof(why), "%s", xo_last_error());
		xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule);
		release_park(p, c, NULL, 0, &c->at);
		xo_fail(ret, "%s", why);
	}
	xo_state_release(&st);
	return ret;
}

static struct conn *serving(struct xo_proto *p, uint64_t id)
{
	struct conn *c = conn_by_id(p, id);

	if (p->cfg.role != XO_ROLE_TARGET || !c || c->state != T_SERVING ||
	    c->awaiting) {
		xo_fail(XO_E_STATE, "connection %llx is not being served here",
			(unsigned long long)id);
		return NULL;
	}
	return c;
}

int xo_proto_hand_back(struct xo_proto *p, uint64_t conn, const uint8_t *app,
		       uint32_t app_len, uint64_t now)
{
	return xo_proto_hand_back_tls(p, conn, app, app_len, NULL, now);
}

int xo_proto_hand_back_tls(struct xo_proto *p, uint64_t conn,
			   const uint8_t *app, uint32_t app_len,
			   const struct xo_tls_state *tls, uint64_t now)
{
	struct conn *c;

	xo_clear_error();
	c = serving(p, conn);
	return c ? target_freeze(p, c, NULL, app, app_len, tls, now) :
		   XO_E_STATE;
}

int xo_proto_move(struct xo_proto *p, uint64_t conn,
		  const struct xo_endpoint *dest, const uint8_t *app,
		  uint32_t app_len, uint64_t now)
{
	struct conn *c;

	xo_clear_error();
	if (!dest || (dest->family != AF_INET && dest->family != AF_INET6))
		return xo_fail(XO_E_INVAL, "move: no destination address");
	c = serving(p, conn);
	return c ? target_freeze(p, c, dest, app, app_len, NULL, now) :
		   XO_E_STATE;
}

int xo_proto_move_tls(struct xo_proto *p, uint64_t conn,
		      const struct xo_endpoint *dest, const uint8_t *app,
		      uint32_t app_len, const struct xo_tls_state *tls,
		      uint64_t now)
{
	struct conn *c;

	xo_clear_error();
	if (!dest || (dest->family != AF_INET && dest->family != AF_INET6))
		return xo_fail(XO_E_INVAL, "move: no destination address");
	c = serving(p, conn);
	return c ? target_freeze(p, c, dest, app, app_len, tls, now) :
		   XO_E_STATE;
}

int xo_proto_close_conn(struct xo_proto *p, uint64_t conn, uint64_t now)
{
	struct peer *pe;
	struct conn *c;

	xo_clear_error();
	c = serving(p, conn);
	if (!c)
		return XO_E_STATE;
	if (close(c->fd) < 0)
		fprintf(stderr, "xo: conn %llx: close: %m\n",
			(unsigned long long)c->id);
	c->fd = -1;
	/* The FIN and the last ACKs leave through the rewrite: keep it. */
	c->rule.expires_ns = now + CFG(p, closed_ttl_ms, XO_PROTO_CLOSED_TTL_MS);
	if (!xo_rules_insert(p->cfg.rules, &c->out_key, &c->rule))
		linger(p, &c->out_key, &c->rule);
	pe = peer_get(p, c->peer);
	if (!pe || send_msg(pe, XO_MSG_TARGET_DONE, XO_DONE_FLAG_CLOSED,
			    c->wire_id, NULL, 0, now)) {
		conn_free(p, c);
		return 0;
	}
	c->state = T_WAIT_CLOSED;
	c->deadline = now + CFG(p, confirm_timeout_ms,
				XO_PROTO_CONFIRM_TIMEOUT_MS);
	return 0;
}

void xo_proto_add_served(struct xo_proto *p, uint64_t bytes)
{
	p->bytes_served += bytes;
}

/* ---- peer loss ------------------------------------------------------------ */

static void peer_lost(struct xo_proto *p, struct peer *pe, uint64_t now)
{
	struct conn *c, *next;
	struct xo_proto_event *ev;

	for (c = p->all; c; c = next) {
		next = c->next;
		if (p->cfg.role == XO_ROLE_HOST) {
			if (c->state == H_MOVING && c->move_peer == pe->id &&
			    c->peer != pe->id) {
				move_finish(p, c, NULL, "the new target was lost",
					    now);
				continue;
			}
			if (c->peer != pe->id)
				continue;
			if (c->state == H_WAIT_READY) {
				host_rollback(p, c, XO_E_STATE,
					      "control connection lost", false,
					      now);
				continue;
			}
			if (c->state == H_RETURNED) {
				if (c->park_until)
					release_park(p, c, NULL, 0, &c->local);
				if (c->awaiting)
					host_bytes_missed(p, c);
				conn_free(p, c);
				continue;
			}
			if (c->state == H_MOVING) {
				struct peer *to = peer_get(p, c->move_peer);

				if (to)
					send_abort(to, c->wire_id, XO_ABORT_HOST,
						   "the old target was lost", now);
			}
			host_withdraw(p, c);
			conn_free(p, c);
			continue;
		}
		if (c->peer != pe->id)
			continue;
		switch (c->state) {
		case T_WAIT_HOST_READY:
			target_drop(p, c, 0);
			break;
		case T_WAIT_END:
			p->stats.lost++;
			target_drop(p, c, XO_EV_LOST);
			break;
		case T_SERVING:
			if (c->awaiting) { /* the driver never knew it */
				fprintf(stderr, "xo: conn %llx: host lost before its unread bytes came\n",
					(unsigned long long)c->id);
				p->stats.bytes_missed++;
				/* Live and short of bytes the host acknowledged:
				 * reset the client (through the source rewrite,
				 * which goes next); discarding a live socket
				 * would close it with a FIN instead. */
				reset_socket(c->fd);
				c->fd = -1;
				target_drop(p, c, 0);
				break;
			}
			/* The host resets the client: stop serving it. */
			p->stats.lost++;
			remove_rule(p, &c->out_key);
			ev = push_event(p, XO_EV_LOST, c->peer, c->id, c->fd);
			if (ev)
				ev->client = c->client;
			conn_free(p, c);
			break;
		default:
			conn_free(p, c);
			break;
		}
	}
	pe->offloaded = 0;
	pe->offloaded_at_report = 0;
	pe->pending = 0;
}

/* ---- input ---------------------------------------------------------------- */

static void handle_frame(struct xo_proto *p, struct peer *pe,
			 uint8_t *buf, size_t len, uint64_t now)
{
	struct xo_msg m;
	int ret;

	ret = xo_chan_open(&pe->ch, buf, len, &m);
	if (ret)
		return violation(p, pe, now, "rejected control message: %s",
				 xo_last_error());
	pe->last_rx = now;
	if (pe->state == XO_PEER_HANDSHAKE) {
		struct xo_proto_event *ev;

		if (m.type != XO_MSG_HELLO ||
		    m.payload_len != XO_HELLO_NONCE_LEN)
			return violation(p, pe, now, "expected HELLO, got type %u",
					 m.type);
		if (xo_chan_bind(&pe->ch, pe->nonce, m.payload))
			return violation(p, pe, now, "%s", xo_last_error());
		pe->state = XO_PEER_UP;
		ev = push_event(p, XO_EV_PEER_UP, pe->id, 0, -1);
		if (ev)
			snprintf(ev->text, sizeof(ev->text), "%s", pe->o.name);
		return;
	}
	switch (m.type) {
	case XO_MSG_PING:
		send_msg(pe, XO_MSG_PONG, 0, 0, m.payload, m.payload_len, now);
		return;
	case XO_MSG_PONG:
		return;
	case XO_MSG_HELLO:
		return violation(p, pe, now, "HELLO twice");
	}
	if (p->cfg.role == XO_ROLE_HOST)
		host_input(p, pe, &m, now);
	else
		target_input(p, pe, &m, now);
}

int xo_proto_peer_input(struct xo_proto *p, uint32_t peer, const uint8_t *buf,
			size_t len, uint64_t now)
{
	struct peer *pe = peer_get(p, peer);
	size_t off = 0;

	xo_clear_error();
	if (!pe)
		return xo_fail(XO_E_NOTFOUND, "input: no peer %u", peer);
	while (!pe->dead) {
		size_t want = XO_ENV_HEADER_LEN, take;
		int64_t frame;

		/* A whole header is checked at once, before its payload comes:
		 * nothing waits for bytes that a bad header announces. */
		if (pe->in_len >= XO_ENV_HEADER_LEN) {
			frame = xo_env_frame_len(pe->in, pe->in_len);
			if (frame < 0) {
				violation(p, pe, now, "malformed control message: %s",
					  xo_last_error());
				break;
			}
			/* Nothing is authenticated before HELLO: read no more
			 * than a HELLO's size. */
			if (pe->state == XO_PEER_HANDSHAKE &&
			    (size_t)frame > xo_env_size(XO_HELLO_NONCE_LEN)) {
				violation(p, pe, now,
					  "malformed control message: %lld bytes announced, at most %zu before HELLO",
					  (long long)frame,
					  xo_env_size(XO_HELLO_NONCE_LEN));
				break;
			}
			want = (size_t)frame;
			if (pe->in_len == want) {
				pe->in_len = 0;
				handle_frame(p, pe, pe->in, want, now);
				/* Decrypted in place: the plaintext (request
				 * bytes, TLS keys) goes as soon as it is used. */
				OPENSSL_cleanse(pe->in, want);
				continue;
			}
		}
		if (off == len)
			break;
		if (want > pe->in_cap) {
			size_t cap = pe->in_cap ? pe->in_cap : 4096;
			uint8_t *n;

			while (cap < want)
				cap *= 2;
			n = realloc(pe->in, cap);
			if (!n)
				return xo_fail(XO_E_NOMEM, "input buffer of %zu bytes",
					       cap);
			pe->in = n;
			pe->in_cap = cap;
		}
		take = want - pe->in_len;
		if (take > len - off)
			take = len - off;
		memcpy(pe->in + pe->in_len, buf + off, take);
		pe->in_len += take;
		off += take;
	}
	return 0;
}

/* ---- peers: the API --------------------------------------------------------- */

int xo_proto_peer_add(struct xo_proto *p, const struct xo_proto_peer_opts *o,
		      uint64_t now, uint32_t *peer_id)
{
	struct peer *pe;
	uint32_t pending = 0;
	int ret;

	xo_clear_error();
	if (!o || o->size < sizeof(*o))
		return xo_fail(XO_E_INVAL, "peer: options missing or too small");
	for (pe = p->peers; pe; pe = pe->next)
		if (!pe->dead && pe->state == XO_PEER_HANDSHAKE)
			pending++;
	if (pending >= (p->cfg.max_handshakes ? p->cfg.max_handshakes :
						 XO_PROTO_MAX_HANDSHAKES))
		return xo_fail(XO_E_BUSY, "peer: %u handshakes pending already",
			       pending);
	/* A target takes connections from its hosts only: no key holder can
	 * play the host to it from anywhere else. */
	if (p->cfg.role == XO_ROLE_TARGET && !is_host_addr(p, &o->addr)) {
		char a[64];

		return xo_fail(XO_E_REFUSED, "peer: %s is not one of our hosts",
			       ep_str(&o->addr, a, sizeof(a)));
	}
	pe = calloc(1, sizeof(*pe));
	if (!pe)
		return xo_fail(XO_E_NOMEM, "peer: out of memory");
	pe->o = *o;
	pe->o.name[sizeof(pe->o.name) - 1] = '\0';
	if (!pe->o.name[0])
		ep_str(&o->addr, pe->o.name, sizeof(pe->o.name));
	ret = xo_chan_init(&pe->ch, p->key, p->cfg.key_len, 0,
			   p->cfg.role == XO_ROLE_HOST ? 0 : 1);
	if (!ret && getrandom(pe->nonce, sizeof(pe->nonce), 0) !=
			    sizeof(pe->nonce))
		ret = xo_fail_sys("peer: getrandom(HELLO nonce)");
	pe->id = ++p->next_peer_id;
	pe->state = XO_PEER_HANDSHAKE;
	pe->created = pe->last_rx = now;
	if (!ret)
		ret = send_msg(pe, XO_MSG_HELLO, 0, 0, pe->nonce,
			       sizeof(pe->nonce), now);
	if (ret) {
		xo_chan_free(&pe->ch);
		free(pe->out.data);
		free(pe);
		return ret;
	}
	pe->next = p->peers;
	p->peers = pe;
	p->stats.peers++;
	*peer_id = pe->id;
	return 0;
}

int xo_proto_peer_output(struct xo_proto *p, uint32_t peer,
			 const uint8_t **buf, size_t *len)
{
	struct peer *pe;

	for (pe = p->peers; pe; pe = pe->next)
		if (pe->id == peer)
			break;
	*buf = NULL;
	*len = 0;
	if (!pe)
		return xo_fail(XO_E_NOTFOUND, "output: no peer %u", peer);
	/* A closed peer's last words (an ABORT) may still go out. */
	*buf = pe->out.data + pe->out.off;
	*len = pe->out.len - pe->out.off;
	return 0;
}

int xo_proto_peer_sent(struct xo_proto *p, uint32_t peer, size_t n,
		       uint64_t now)
{
	struct peer *pe;

	for (pe = p->peers; pe; pe = pe->next)
		if (pe->id == peer)
			break;
	if (!pe)
		return xo_fail(XO_E_NOTFOUND, "sent: no peer %u", peer);
	if (n > pe->out.len - pe->out.off)
		return xo_fail(XO_E_INVAL, "sent: %zu bytes, %zu were pending",
			       n, pe->out.len - pe->out.off);
	pe->out.off += n;
	if (n)
		pe->out_since = now;
	return 0;
}

static void peer_free(struct xo_proto *p, struct peer *pe)
{
	struct peer **pp;

	for (pp = &p->peers; *pp; pp = &(*pp)->next)
		if (*pp == pe) {
			*pp = pe->next;
			break;
		}
	xo_chan_free(&pe->ch);
	if (pe->in)
		OPENSSL_cleanse(pe->in, pe->in_cap);
	free(pe->in);
	free(pe->out.data);
	free(pe);
	p->stats.peers--;
}

int xo_proto_peer_closed(struct xo_proto *p, uint32_t peer, uint64_t now)
{
	struct peer *pe;

	xo_clear_error();
	for (pe = p->peers; pe; pe = pe->next)
		if (pe->id == peer)
			break;
	if (!pe)
		return xo_fail(XO_E_NOTFOUND, "closed: no peer %u", peer);
	close_peer(p, pe, now, "control connection closed");
	peer_free(p, pe);
	return 0;
}

int xo_proto_peer_info(struct xo_proto *p, uint32_t peer,
		       struct xo_proto_peer_info *info)
{
	struct peer *pe = peer_get(p, peer);

	memset(info, 0, sizeof(*info));
	if (!pe)
		return xo_fail(XO_E_NOTFOUND, "info: no peer %u", peer);
	info->state = pe->state;
	info->failures = pe->failures;
	info->down_until = pe->down_until;
	info->offloaded = pe->offloaded;
	info->handed = pe->handed;
	info->load = pe->load;
	info->addr = pe->o.addr;
	memcpy(info->name, pe->o.name, sizeof(info->name));
	return 0;
}

int xo_proto_peers(struct xo_proto *p, uint32_t *ids, uint32_t cap)
{
	struct peer *pe;
	uint32_t n = 0;

	for (pe = p->peers; pe; pe = pe->next)
		if (!pe->dead) {
			if (n < cap)
				ids[n] = pe->id;
			n++;
		}
	return (int)n;
}

/* ---- the clock ------------------------------------------------------------ */

static uint64_t earliest(uint64_t a, uint64_t b)
{
	if (!a)
		return b;
	if (!b)
		return a;
	return a < b ? a : b;
}

static uint64_t peer_deadline(struct xo_proto *p, struct peer *pe)
{
	uint64_t d = 0;

	if (pe->dead)
		return 0;
	if (pe->state == XO_PEER_HANDSHAKE)
		return pe->created + CFG(p, handshake_timeout_ms,
					 XO_PROTO_HANDSHAKE_TIMEOUT_MS);
	d = earliest(d, pe->last_tx + CFG(p, ping_interval_ms,
					  XO_PROTO_PING_INTERVAL_MS));
	d = earliest(d, pe->last_rx + CFG(p, peer_timeout_ms,
					  XO_PROTO_PEER_TIMEOUT_MS));
	if (pe->out.len > pe->out.off)
		d = earliest(d, pe->out_since + CFG(p, send_timeout_ms,
						    XO_PROTO_SEND_TIMEOUT_MS));
	if (p->cfg.role == XO_ROLE_TARGET)
		d = earliest(d, pe->next_load);
	return d;
}

int xo_proto_park_fd(struct xo_proto *p)
{
	return xo_park_fd(p->cfg.steer);
}

uint64_t xo_proto_next_deadline(struct xo_proto *p)
{
	uint64_t d = p->linger_min;
	struct peer *pe;
	struct conn *c;
	uint32_t i;

	for (i = 0; i < p->n_strag; i++)
		d = earliest(d, p->strag[i].until);

	for (pe = p->peers; pe; pe = pe->next)
		d = earliest(d, peer_deadline(p, pe));
	for (c = p->all; c; c = c->next)
		d = earliest(earliest(earliest(d, c->deadline), c->renew_at),
			     c->state == T_SERVING ? c->park_until : 0);
	return d;
}

static void tick_peer(struct xo_proto *p, struct peer *pe, uint64_t now)
{
	if (pe->state == XO_PEER_HANDSHAKE) {
		if (now >= peer_deadline(p, pe))
			violation(p, pe, now, "no HELLO in time");
		return;
	}
	if (now >= pe->last_rx + CFG(p, peer_timeout_ms,
				     XO_PROTO_PEER_TIMEOUT_MS)) {
		p->stats.timeouts++;
		close_peer(p, pe, now, "peer silent too long");
		return;
	}
	if (pe->out.len > pe->out.off &&
	    now >= pe->out_since + CFG(p, send_timeout_ms,
				       XO_PROTO_SEND_TIMEOUT_MS)) {
		p->stats.timeouts++;
		close_peer(p, pe, now, "peer takes no data");
		return;
	}
	if (p->cfg.role == XO_ROLE_TARGET && now >= pe->next_load) {
		struct xo_load_report r = { 0 };
		uint8_t buf[XO_LOAD_LEN];
		struct conn *c;

		for (c = p->all; c; c = c->next)
			if (c->state == T_SERVING)
				r.active++;
		r.handoffs = (uint32_t)p->stats.adopted;
		r.bytes_served = p->bytes_served;
		if (xo_load_encode(&r, buf, sizeof(buf)) == XO_LOAD_LEN)
			send_msg(pe, XO_MSG_LOAD_REPORT, 0, 0, buf,
				 sizeof(buf), now);
		pe->next_load = now + CFG(p, load_interval_ms,
					  XO_PROTO_LOAD_INTERVAL_MS);
	}
	if (now >= pe->last_tx + CFG(p, ping_interval_ms,
				     XO_PROTO_PING_INTERVAL_MS))
		send_msg(pe, XO_MSG_PING, 0, 0, NULL, 0, now);
}

static void tick_conn(struct xo_proto *p, struct conn *c, uint64_t now)
{
	struct peer *pe = peer_get(p, c->peer);

	if (c->renew_at && now >= c->renew_at) {
		uint64_t ttl = CFG(p, redirect_ttl_ms, XO_PROTO_REDIRECT_TTL_MS);
		const struct xo_flow_key *k = p->cfg.role == XO_ROLE_HOST ?
						      &c->in_key : &c->out_key;

		/* Renew while offloaded (not while frozen: the block holds). */
		if (c->state == H_OFFLOADED || c->state == T_SERVING) {
			c->rule.expires_ns = now + ttl;
			if (xo_rules_insert(p->cfg.rules, k, &c->rule))
				fprintf(stderr, "xo: renewal failed: %s\n",
					xo_last_error());
		}
		c->renew_at = now + ttl / 3;
	}
	if (c->state == T_SERVING && c->park_until && now >= c->park_until)
		release_park(p, c, NULL, 0, &c->at); /* no PARKED came */
	if (!c->deadline || now < c->deadline)
		return;
	if (c->state != H_RETURNED && c->state != T_WAIT_CLOSED)
		p->stats.timeouts++;
	switch (c->state) {
	case H_WAIT_READY:
		if (pe)
			peer_fail(pe, now);
		host_rollback(p, c, XO_E_BUSY, "no TARGET_READY in time", true,
			      now);
		return;
	case H_MOVING: {
		struct peer *to = peer_get(p, c->move_peer);

		if (to)
			send_abort(to, c->wire_id, XO_ABORT_TIMEOUT,
				   "no TARGET_READY in time", now);
		move_finish(p, c, NULL, "the new target did not answer", now);
		return;
	}
	case T_WAIT_HOST_READY:
	case T_WAIT_END:
		/* The host may own it already: never decide alone. Losing the
		 * control connection settles it on both sides. */
		if (pe)
			close_peer(p, pe, now, "host did not answer in time");
		return;
	case H_RETURNED:
		if (c->park_until) {
			release_park(p, c, NULL, 0, &c->local);
			if (c->awaiting) { /* its BYTES may still be on the way */
				c->deadline = now + CFG(p, confirm_timeout_ms,
							XO_PROTO_CONFIRM_TIMEOUT_MS);
				return;
			}
		}
		if (c->awaiting)
			host_bytes_missed(p, c);
		conn_free(p, c);
		return;
	case T_WAIT_CLOSED:
		conn_free(p, c);
		return;
	case T_SERVING:
		if (c->awaiting) {
			target_bytes_missed(p, c, now);
			return;
		}
		c->deadline = 0;
		return;
	default:
		c->deadline = 0;
	}
}

int xo_proto_tick(struct xo_proto *p, uint64_t now)
{
	struct peer *pe;
	struct conn *c, *next;

	xo_clear_error();
	uint32_t closes;

restart:
	closes = p->closes;
	for (c = p->all; c; c = next) {
		next = c->next;
		tick_conn(p, c, now);
		/* Closing a peer frees its connections, maybe next too: start
		 * over (what already ran has its deadline moved on). */
		if (p->closes != closes)
			goto restart;
	}
	for (pe = p->peers; pe; pe = pe->next)
		if (!pe->dead)
			tick_peer(p, pe, now);
	sweep_lingering(p, now);
	ship_stragglers(p, now);
	return 0;
}

/* ---- life cycle ----------------------------------------------------------- */

/* The MAC of the interface the rules are on (where replayed frames go). */
static int own_mac(int ifindex, uint8_t *mac)
{
	struct ifreq ifr = { 0 };
	int fd, ret = 0;

	if (!if_indextoname((unsigned int)ifindex, ifr.ifr_name))
		return xo_fail_sys("proto: interface %d", ifindex);
	fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return xo_fail_sys("proto: socket");
	if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0)
		ret = xo_fail_sys("proto: MAC of %s", ifr.ifr_name);
	else
		memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
	close(fd);
	return ret;
}

int xo_proto_create(const struct xo_proto_config *cfg, struct xo_proto **out)
{
	struct xo_proto *p;
	uint64_t base;

	xo_clear_error();
	if (!cfg || !out || cfg->size < sizeof(*cfg))
		return xo_fail(XO_E_INVAL, "proto: config missing or too small");
	if (cfg->role > XO_ROLE_TARGET)
		return xo_fail(XO_E_INVAL, "proto: role %u", cfg->role);
	if (!cfg->key || cfg->key_len < XO_KEY_MIN_LEN ||
	    cfg->key_len > XO_KEY_MAX_LEN)
		return xo_fail(XO_E_INVAL, "proto: a cluster key has %d..%d bytes",
			       XO_KEY_MIN_LEN, XO_KEY_MAX_LEN);
	if (!cfg->rules || !cfg->steer)
		return xo_fail(XO_E_INVAL, "proto: rules and steer are required");
	if (cfg->n_hosts > XO_PROTO_MAX_HOSTS)
		return xo_fail(XO_E_INVAL, "proto: %u hosts > %d", cfg->n_hosts,
			       XO_PROTO_MAX_HOSTS);
	if (cfg->role == XO_ROLE_TARGET && !cfg->local4.family &&
	    !cfg->local6.family)
		return xo_fail(XO_E_INVAL, "proto: a target needs its own address");
	if (cfg->role == XO_ROLE_TARGET && !cfg->n_hosts)
		return xo_fail(XO_E_INVAL,
			       "proto: a target needs the addresses of its hosts (only they may connect)");
	p = calloc(1, sizeof(*p));
	if (!p)
		return xo_fail(XO_E_NOMEM, "proto: out of memory");
	p->steps = calloc(MAX_STEPS, sizeof(*p->steps));
	if (!p->steps) {
		free(p);
		return xo_fail(XO_E_NOMEM, "proto: out of memory");
	}
	p->cfg = *cfg;
	p->ifindex = xo_rules_ifindex(cfg->rules);
	memcpy(p->mac, cfg->host_mac, 6);
	if (!memcmp(p->mac, "\0\0\0\0\0\0", 6) && own_mac(p->ifindex, p->mac)) {
		free(p->steps);
		free(p);
		return XO_E_SYS;
	}
	p->key = xo_secret_alloc(XO_KEY_MAX_LEN);
	if (!p->key) {
		free(p->steps);
		free(p);
		return XO_E_NOMEM;
	}
	memcpy(p->key, cfg->key, cfg->key_len);
	p->cfg.key = NULL; /* only our copy */
	/* Connection ids: random base, so a restarted host does not reuse
	 * the ids its targets may still remember. */
	if (getrandom(&base, sizeof(base), 0) != sizeof(base))
		base = clock_ns();
	p->next_conn_id = (base & 0xffffffffull) << 16 | 1;
	p->ktls = -1;
	*out = p;
	return 0;
}

void xo_proto_destroy(struct xo_proto *p)
{
	struct event *e;

	if (!p)
		return;
	while (p->all) {
		struct conn *c = p->all;

		/* Frozen or live: go without a signal; rules expire. */
		if (c->fd >= 0 && c->state != T_SERVING &&
		    c->state != H_OFFLOADED && xo_tcp_discard(c->fd))
			close(c->fd);
		conn_free(p, c);
	}
	while (p->peers)
		peer_free(p, p->peers);
	while ((e = p->ev_head)) {
		p->ev_head = e->next;
		free(e->data);
		xo_secret_free(e->tls);
		free(e);
	}
	free(p->ev_data);
	xo_secret_free(p->ev_tls);
	free(p->linger);
	free(p->strag);
	free(p->steps);
	xo_secret_free(p->key);
	free(p);
}

void xo_proto_get_stats(struct xo_proto *p, struct xo_proto_stats *st)
{
	*st = p->stats;
}

int xo_proto_set_crash_step(struct xo_proto *p, const char *step)
{
	if (step && strlen(step) >= sizeof(p->crash_step))
		return xo_fail(XO_E_INVAL, "crash step %s: too long", step);
	snprintf(p->crash_step, sizeof(p->crash_step), "%s", step ? step : "");
	return 0;
}

/* ---- key files and control sockets ---------------------------------------- */

int xo_key_load(const char *path, uint8_t *out, uint32_t cap)
{
	uint8_t buf[XO_KEY_MAX_LEN + 1];
	struct stat sb;
	ssize_t n;
	int fd, ret;

	xo_clear_error();
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return xo_fail_sys("key %s: open", path);
	if (fstat(fd, &sb) < 0) {
		ret = xo_fail_sys("key %s: fstat", path);
		goto out;
	}
	if (sb.st_mode & 077) {
		ret = xo_fail(XO_E_PERM,
			      "key %s: readable by group or others (mode %03o); chmod 600 it",
			      path, sb.st_mode & 0777);
		goto out;
	}
	n = read(fd, buf, sizeof(buf));
	if (n < 0) {
		ret = xo_fail_sys("key %s: read", path);
		goto out;
	}
	if (n < XO_KEY_MIN_LEN || n > XO_KEY_MAX_LEN) {
		ret = xo_fail(XO_E_INVAL,
			      "key %s: a cluster key has %d..%d bytes, this one %s%zd",
			      path, XO_KEY_MIN_LEN, XO_KEY_MAX_LEN,
			      n > XO_KEY_MAX_LEN ? "over " : "", n);
		goto out;
	}
	if ((uint32_t)n > cap) {
		ret = xo_fail(XO_E_NOSPACE, "key %s: %zd bytes, room for %u",
			      path, n, cap);
		goto out;
	}
	memcpy(out, buf, (size_t)n);
	ret = (int)n;
out:
	OPENSSL_cleanse(buf, sizeof(buf));
	close(fd);
	return ret;
}

int xo_ctl_sock_setup(int fd, uint32_t user_timeout_ms)
{
	int one = 1, idle = 1, intvl = 1, cnt = 3;
	unsigned int uto = user_timeout_ms ? user_timeout_ms :
					     XO_PROTO_PEER_TIMEOUT_MS;

	xo_clear_error();
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		return xo_fail_sys("control socket: TCP_NODELAY");
	if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto,
		       sizeof(uto)) < 0)
		return xo_fail_sys("control socket: TCP_USER_TIMEOUT");
	if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl,
		       sizeof(intvl)) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt)) < 0)
		return xo_fail_sys("control socket: keep-alive");
	return 0;
}
