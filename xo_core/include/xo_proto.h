/* SPDX-License-Identifier: MIT */
/*
 * xo_proto.h - the XO handoff protocol as a machine without I/O.
 *
 * One struct xo_proto per role instance: a host (the load balancer) or a
 * target (a backend). It owns everything the protocol defines - HELLO and
 * session binding, framing, the outbound and inbound step order, the
 * commit rule, rollback, peer checks, port remapping, the client reset
 * probe, rule lifetimes and renewal, liveness and every deadline - and
 * performs the repair, codec, envelope and steering steps itself. It never
 * waits, never reads or writes a control connection and starts no thread.
 * The driver (nginx's event loop, asyncio, a poll() loop) does that:
 *
 *   control bytes in      xo_proto_peer_input(p, peer, buf, len, now)
 *   control bytes out     xo_proto_peer_output() then xo_proto_peer_sent()
 *   clock                 xo_proto_tick(p, now) at xo_proto_next_deadline()
 *                         and when xo_proto_park_fd() is readable
 *   what happened         xo_proto_next_event() until it returns 0
 *
 * `now` is CLOCK_MONOTONIC in nanoseconds (the clock of the steering
 * entries' expiry; xo_steer_now_ns()). After any call, the driver sends
 * what xo_proto_peer_output() holds, drains the events and re-arms its
 * timer.
 *
 * Outbound transfer (host -> target):
 *   host   xo_proto_offload(fd, request bytes): block the client's flow both
 *          ways, freeze, capture, BEGIN_OFFLOAD(state)
 *   target restore on its own address (another port if the 4-tuple is
 *          taken), source rewrite, TARGET_READY(address, port)
 *   host   redirect replaces the block (one map write), discard the socket,
 *          HOST_READY -> XO_EV_OFFLOADED
 *   target resume -> XO_EV_ADOPTED (serve the request bytes in the event)
 * Inbound transfer (target -> host):
 *   target xo_proto_hand_back(conn, unread bytes): block, freeze, capture,
 *          TARGET_DONE(state)
 *   host   check the state names the flow it handed off, restore, remove
 *          the redirect, resume, END_OFFLOAD -> XO_EV_RETURNED
 *   target discard, remove its rules -> XO_EV_HANDED_BACK
 * Direct move (target A -> target B, the host re-points its redirect):
 *   A      xo_proto_move(conn, B's address): block, freeze, capture,
 *          TARGET_DONE(MOVE, B, state)
 *   host   BEGIN_OFFLOAD(state) to B; on TARGET_READY the redirect points
 *          at B in one map write; END_OFFLOAD to A, HOST_READY to B.
 *          If B refuses or is late, ABORT to A, which keeps the connection.
 *
 * Nothing lost: the client's packets that arrive while its connection is
 * frozen meet a PARK entry (xo_steer_abi.h), which drops them but keeps a
 * copy. Once the new owner has the connection, the old one sends the
 * copies on (PARKED) and the new owner replays them into its own TCP stack,
 * so the client never has to retransmit because of a handoff. A rollback
 * or a refused hand-back replays them locally.
 *
 * Commit rule. Until it has TARGET_READY the host keeps its frozen socket;
 * a refusal (ABORT), a late reply or a lost control connection means
 * "resume and serve locally", and the host tells the target (ABORT). A
 * target that sent TARGET_READY or TARGET_DONE never gives up on its own:
 * it acts on HOST_READY / END_OFFLOAD / ABORT only. A side that waits past
 * a deadline where the other may already own the connection closes the
 * control connection instead; losing it resolves every open transfer the
 * same way on both sides: the target discards what it holds unconfirmed,
 * and the host takes back its rollbacks and, for flows the target may
 * serve, withdraws the redirect and probes the client so it sees a prompt
 * reset rather than a hang. The envelope's sequence numbers are strict, so
 * a dropped, duplicated or reordered control message closes the connection
 * too: exactly one owner or a clean client error, always.
 *
 * Ownership: a socket given to xo_proto_offload() / xo_proto_hand_back() /
 * xo_proto_move() / xo_proto_close_conn() belongs to the machine until an
 * event hands it back (fd >= 0 in the event) or says it is gone. A socket
 * in an event belongs to the driver (except XO_EV_ADOPTED's, which the
 * machine still tracks: the driver serves it and later calls one of the
 * three target calls). Event data stays valid until the next
 * xo_proto_next_event() or xo_proto_destroy().
 *
 * Errors as in xo.h: 0 or a count on success, negative XO_E_* with the
 * sentence in xo_last_error().
 */
#ifndef XO_PROTO_H
#define XO_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "xo.h"
#include "xo_steer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XO_CDEF_BEGIN */

#define XO_DEFAULT_CONTROL_PORT 7700

#define XO_ROLE_HOST 0
#define XO_ROLE_TARGET 1

/* Wire flags of TARGET_DONE. */
#define XO_DONE_FLAG_CLOSED 1 /* the client closed on the target: no state,
			       * the host only retires the redirect */
#define XO_DONE_FLAG_MOVE 2   /* payload: READY-encoded destination, then
			       * the state; the host moves, not restores */
/* Wire flag of BEGIN_OFFLOAD and TARGET_DONE: the state holds no unread
 * bytes (no application data, an empty receive queue, rcv_nxt past them);
 * they come in a BYTES message after the sender's PARKED. The receiver
 * resumes the socket without them and gives them to its driver, with the
 * ADOPTED / RETURNED event, once they are in. */
#define XO_FLAG_BYTES_FOLLOW 4
/* Unread bytes (application data and receive queue together) from which a
 * plain (non-TLS) connection's state goes without them: carrying them in
 * the state holds the client's ACKs while they cross the link, several
 * milliseconds for 64 KiB at 200 Mbit/s, about a fresh connection's probe
 * timeout (docs/benchmarks.md, "Unread bytes after the state"). */
#define XO_PROTO_BYTES_FOLLOW_MIN 65536

/* Defaults of the timing knobs (milliseconds). */
#define XO_PROTO_READY_TIMEOUT_MS 2000      /* host: BEGIN -> TARGET_READY */
#define XO_PROTO_CONFIRM_TIMEOUT_MS 30000   /* target: READY/DONE -> answer;
					     * a TARGET_DONE with megabytes
					     * of queue may cross a slow
					     * link first; a dead host is
					     * found by the peer timeout */
#define XO_PROTO_HANDSHAKE_TIMEOUT_MS 5000
#define XO_PROTO_PING_INTERVAL_MS 1000      /* when nothing else was sent */
#define XO_PROTO_PEER_TIMEOUT_MS 15000      /* silence that means "dead":
					     * long enough for a control
					     * connection that shares a
					     * saturated link (its segments
					     * dropped, its RTO backing off) */
#define XO_PROTO_SEND_TIMEOUT_MS 15000      /* output stuck that long */
#define XO_PROTO_BLOCK_TTL_MS 10000
#define XO_PROTO_REDIRECT_TTL_MS 600000     /* renewed every third */
#define XO_PROTO_CLOSED_TTL_MS 30000        /* steer a closed flow's last
					     * FIN/ACKs this long */
#define XO_PROTO_LOAD_INTERVAL_MS 500
#define XO_PROTO_DOWN_AFTER 3               /* failures in a row */
#define XO_PROTO_DOWN_MS 1000               /* first back-off; doubles up
					     * to 30 s; a target that
					     * reconnects starts afresh */
#define XO_PROTO_MAX_HANDSHAKES 64
#define XO_PROTO_MAX_HOSTS 16

struct xo_proto_config {
	uint32_t size;            /* sizeof(struct xo_proto_config) */
	uint32_t role;            /* XO_ROLE_* */
	const uint8_t *key;       /* cluster key, copied (and wiped on destroy) */
	uint32_t key_len;
	uint32_t owner;           /* owner id of every steering entry */
	struct xo_rules *rules;   /* the interface's rule manager (required) */
	struct xo_steer *steer;   /* its software tier (lookups) */
	uint8_t host_mac[6];      /* this interface's MAC (host: the source MAC
				   * of redirected frames); zero: looked up */
	uint8_t no_tls;           /* target: refuse connections that carry a
				   * TLS state (it keeps no session keys);
				   * the host rolls back and serves */
	uint8_t tls_kernel_only;  /* target: the driver has no TLS record
				   * layer in user space (it serves plaintext
				   * on the socket): take a TLS state only
				   * where kernel TLS can be installed */
	/* target: its own address per family (port ignored; family 0 =
	 * none), and the hosts it takes connections from (addresses only; at
	 * least one). A state must name one of them as its local end, and a
	 * control peer must come from one of them. */
	struct xo_endpoint local4;
	struct xo_endpoint local6;
	struct xo_endpoint hosts[XO_PROTO_MAX_HOSTS];
	uint32_t n_hosts;
	/* timing knobs; 0 = the default above */
	uint32_t ready_timeout_ms;
	uint32_t confirm_timeout_ms;
	uint32_t handshake_timeout_ms;
	uint32_t ping_interval_ms;
	uint32_t peer_timeout_ms;
	uint32_t send_timeout_ms;
	uint32_t block_ttl_ms;
	uint32_t redirect_ttl_ms;
	uint32_t closed_ttl_ms;
	uint32_t load_interval_ms;
	uint32_t max_handshakes;
	/* unread bytes from which they follow the state (XO_FLAG_BYTES_FOLLOW);
	 * 0 = XO_PROTO_BYTES_FOLLOW_MIN, UINT32_MAX = never */
	uint32_t bytes_follow_min;
};

struct xo_proto;

int xo_proto_create(const struct xo_proto_config *cfg, struct xo_proto **out);
/* Sockets the machine still holds are closed without a signal to their
 * clients (repair mode), its rules stay until they expire (a successor
 * purges them by owner). Key bytes are wiped. */
void xo_proto_destroy(struct xo_proto *p);

/* ---- peers (control connections) ------------------------------------ */

struct xo_proto_peer_opts {
	uint32_t size;            /* sizeof(struct xo_proto_peer_opts) */
	uint32_t reserved;
	struct xo_endpoint addr;  /* the peer's address (and port) */
	uint8_t mac[6];           /* host: the target's MAC for redirects */
	uint8_t reserved2[2];
	char name[32];            /* for logs */
};

/* A control connection was connected (host) or accepted (target). The
 * machine queues HELLO. XO_E_REFUSED: a target's peer that is not one of
 * its hosts; XO_E_BUSY: too many handshakes pending. Close the socket. */
int xo_proto_peer_add(struct xo_proto *p, const struct xo_proto_peer_opts *o,
		      uint64_t now, uint32_t *peer_id);
/* Bytes received. A protocol violation is not an error here: the machine
 * queues XO_EV_PEER_CLOSED (with the reason) and forgets the peer. */
int xo_proto_peer_input(struct xo_proto *p, uint32_t peer, const uint8_t *buf,
			size_t len, uint64_t now);
/* Bytes waiting to be sent, in buf and len (len 0 = nothing). */
int xo_proto_peer_output(struct xo_proto *p, uint32_t peer,
			 const uint8_t **buf, size_t *len);
/* The driver sent n of them. */
int xo_proto_peer_sent(struct xo_proto *p, uint32_t peer, size_t n,
		       uint64_t now);
/* The connection is gone (EOF, error, or the driver closes it). Resolves
 * the peer's open transfers by the commit rule; queues XO_EV_PEER_CLOSED. */
int xo_proto_peer_closed(struct xo_proto *p, uint32_t peer, uint64_t now);

#define XO_PEER_HANDSHAKE 1
#define XO_PEER_UP 2

struct xo_proto_peer_info {
	uint32_t state;           /* XO_PEER_*; 0 = no such peer */
	uint32_t failures;        /* in a row (refusals, timeouts) */
	uint64_t down_until;      /* not picked before this (ns) */
	uint32_t offloaded;       /* connections it serves for us now */
	uint32_t handed;          /* connections handed to it so far */
	struct xo_load_report load;
	struct xo_endpoint addr;
	char name[32];
};

int xo_proto_peer_info(struct xo_proto *p, uint32_t peer,
		       struct xo_proto_peer_info *info);
/* Peer ids in use (up to cap); returns how many there are. */
int xo_proto_peers(struct xo_proto *p, uint32_t *ids, uint32_t cap);

/* ---- host ------------------------------------------------------------ */

#define XO_PICK_LEAST_LOADED 0
#define XO_PICK_ROUND_ROBIN 1

/* A peer that is up and not backed off, by policy; XO_E_NOTFOUND if none. */
int xo_proto_pick(struct xo_proto *p, uint32_t policy, uint64_t now,
		  uint32_t *peer);
/* Can this peer take a handoff now (up, not backed off)? 1 or 0. */
int xo_proto_usable(struct xo_proto *p, uint32_t peer, uint64_t now);
/* Start handing fd (an ESTABLISHED socket whose request the application
 * read: app bytes) to peer. 0: under way, the machine owns fd until
 * XO_EV_OFFLOADED or XO_EV_ROLLED_BACK. Negative: nothing started, fd is
 * live and still the caller's. */
int xo_proto_offload(struct xo_proto *p, uint32_t peer, int fd,
		     const uint8_t *app, uint32_t app_len, uint64_t now,
		     uint64_t *conn);
/* The same for a TLS connection whose session the application keeps in
 * user space (OpenSSL): tls is its record state now, at a record boundary
 * with nothing pending either way (the state goes with the TCP state; the
 * target continues the session). Checked before anything is touched. A
 * socket with kernel TLS needs none: its state is captured. */
int xo_proto_offload_tls(struct xo_proto *p, uint32_t peer, int fd,
			 const uint8_t *app, uint32_t app_len,
			 const struct xo_tls_state *tls, uint64_t now,
			 uint64_t *conn);

/* ---- target ----------------------------------------------------------- */

/* Give an adopted connection back to the host; app = bytes the target read
 * but did not serve. 0: under way (XO_EV_HANDED_BACK, XO_EV_KEPT or
 * XO_EV_LOST follows); negative: not started, fd still live and served
 * here. */
int xo_proto_hand_back(struct xo_proto *p, uint64_t conn, const uint8_t *app,
		       uint32_t app_len, uint64_t now);
/* Move it to another target (dest: its address; port ignored) through the
 * host; events as for xo_proto_hand_back(). */
int xo_proto_move(struct xo_proto *p, uint64_t conn,
		  const struct xo_endpoint *dest, const uint8_t *app,
		  uint32_t app_len, uint64_t now);
/* Both with the record state of a TLS session the driver keeps in user
 * space (as for xo_proto_offload_tls()). */
int xo_proto_hand_back_tls(struct xo_proto *p, uint64_t conn,
			   const uint8_t *app, uint32_t app_len,
			   const struct xo_tls_state *tls, uint64_t now);
int xo_proto_move_tls(struct xo_proto *p, uint64_t conn,
		      const struct xo_endpoint *dest, const uint8_t *app,
		      uint32_t app_len, const struct xo_tls_state *tls,
		      uint64_t now);
/* The client closed: the machine closes fd (the FIN leaves through the
 * source rewrite, kept a while for the last ACKs) and tells the host. */
int xo_proto_close_conn(struct xo_proto *p, uint64_t conn, uint64_t now);
/* Add to the bytes-served figure of the load reports. */
void xo_proto_add_served(struct xo_proto *p, uint64_t bytes);

/* ---- clock and events ------------------------------------------------- */

int xo_proto_tick(struct xo_proto *p, uint64_t now);
/* When xo_proto_tick() is due next (ns), 0 when nothing is pending. */
uint64_t xo_proto_next_deadline(struct xo_proto *p);
/* A descriptor that becomes readable when client frames were parked here
 * (the steering handle's park ring); call xo_proto_tick() then. Frames
 * still on their way to an old owner after a handoff are sent on this
 * way rather than waiting for the client to resend them. -1 without a
 * park ring. */
int xo_proto_park_fd(struct xo_proto *p);

#define XO_EV_PEER_UP 1       /* HELLO exchanged */
#define XO_EV_PEER_CLOSED 2   /* close the peer's socket (text: why), after
			       * sending what xo_proto_peer_output() still
			       * holds, then call xo_proto_peer_closed() */
#define XO_EV_OFFLOADED 3     /* host: the target owns it; fd is gone */
#define XO_EV_ROLLED_BACK 4   /* host: fd is live again, serve data here */
#define XO_EV_RETURNED 5      /* host: fd taken back; serve data */
#define XO_EV_WITHDRAWN 6     /* host: target lost; client probed */
#define XO_EV_ADOPTED 7       /* target: fd restored and live; serve data */
#define XO_EV_HANDED_BACK 8   /* target: the host (or another target) has
			       * it; fd is gone */
#define XO_EV_KEPT 9          /* target: the hand-back did not happen; fd is
			       * live, keep serving (data: what was given) */
#define XO_EV_LOST 10         /* target: host lost; the connection is dead
			       * (fd >= 0: the driver closes it) */
#define XO_EV_CLOSED 11       /* target: a close_conn finished */
#define XO_EV_REFUSED 12      /* a peer's request was refused with an ABORT
			       * (conn: its id; code: XO_ABORT_*; text) */

#define XO_EV_TEXT_LEN 160

struct xo_proto_event {
	uint32_t type;            /* XO_EV_* */
	uint32_t peer;
	uint64_t conn;
	int fd;                   /* -1 unless the event hands one over */
	int code;                 /* XO_E_* behind a failure; ADOPTED: 1 if
				   * restored on another port (4-tuple taken) */
	const uint8_t *data;      /* request bytes to serve, or NULL */
	uint32_t data_len;
	uint32_t reserved;
	struct xo_endpoint client;
	struct xo_endpoint local; /* where the connection lives now */
	char text[XO_EV_TEXT_LEN];
	/* ADOPTED / RETURNED of a TLS connection on a kernel without TLS:
	 * the session's record state, for the driver's record layer in user
	 * space (xo_tls_rec_new()); valid until the next
	 * xo_proto_next_event() call, then wiped. NULL otherwise (no TLS, or
	 * kernel TLS was installed on fd). */
	const struct xo_tls_state *tls;
};

/* 1 and *ev filled, or 0 when no event is queued. */
int xo_proto_next_event(struct xo_proto *p, struct xo_proto_event *ev);

/* ---- introspection ------------------------------------------------------ */

struct xo_proto_stats {
	uint64_t offloads;        /* host: committed outbound transfers */
	uint64_t rollbacks;
	uint64_t returns;         /* host: inbound transfers completed */
	uint64_t moves;           /* host: target-to-target moves completed */
	uint64_t withdrawn;       /* host: flows of a lost target */
	uint64_t closed_on_target; /* host: flows whose client closed while a
				    * target served them (no return) */
	uint64_t adopted;         /* target */
	uint64_t handed_back;     /* target: inbound transfers and moves */
	uint64_t kept;            /* target: hand-backs refused */
	uint64_t lost;            /* target: connections of a lost host */
	uint64_t refused;         /* BEGIN_OFFLOADs / DONEs refused */
	uint64_t violations;      /* peers closed for breaking the protocol */
	uint64_t timeouts;        /* deadlines that passed */
	uint64_t rules_expired;   /* own entries removed after expiry */
	uint64_t parked_shipped;  /* client frames parked here, sent on */
	uint64_t parked_replayed; /* client frames parked elsewhere (or here
				   * before a rollback), given to our stack */
	uint64_t stragglers;      /* of parked_shipped: frames that reached
				   * us after the new owner took over */
	uint64_t bytes_followed;  /* transfers whose unread bytes followed
				   * their state (sent) */
	uint64_t bytes_missed;    /* resumed connections whose BYTES never
				   * came (control connection lost, timeout):
				   * reset */
	uint64_t owed_acks;       /* resumed connections whose old socket
				   * owed the client an ACK nothing else drew:
				   * drawn with a duplicate (docs/architecture.md) */
	uint64_t replays_late;    /* transfers refused because frames replayed
				   * into the socket had not reached it yet */
	uint64_t late_bytes;      /* bytes a frozen socket took after its
				   * capture, sent on as client frames */
	uint32_t active;          /* connections the machine tracks now */
	uint32_t peers;
};

void xo_proto_get_stats(struct xo_proto *p, struct xo_proto_stats *st);

/* Per-step timings of finished transfers (the paper's Table 3). */
#define XO_T_OUT_HOST 0
#define XO_T_OUT_TARGET 1
#define XO_T_IN_TARGET 2
#define XO_T_IN_HOST 3

struct xo_proto_step {
	uint8_t transfer;         /* XO_T_* */
	uint8_t step;             /* index into xo_proto_step_name() */
	uint16_t reserved;
	uint32_t ns;              /* since the previous step of the transfer */
};

/* Move up to cap recorded steps out (oldest first); returns how many. The
 * machine keeps at most 65536; older ones are dropped. */
int xo_proto_take_steps(struct xo_proto *p, struct xo_proto_step *out,
			uint32_t cap);
/* "out.block", ..., "<transfer>.total"; NULL for an unknown pair. */
const char *xo_proto_step_name(uint32_t transfer, uint32_t step);

/* Test hook: SIGKILL this process when the named step is reached ("begin",
 * "restored", "ready", "host_ready", "done"); NULL clears it. The fault
 * "park_late" kills nothing: each freeze parks the client's frames only
 * after its capture (and 2 ms later), so that frames reach the frozen
 * socket after it, as a late delivery by the kernel does. */
int xo_proto_set_crash_step(struct xo_proto *p, const char *step);

/* ---- key files, control sockets, the client probe ---------------------- */

/* Send the client of a flow that has no owner any more an empty ACK one
 * below its window (as a keep-alive probe does), from local, with the
 * numbers captured at the handoff: snd_una (first unacknowledged byte we
 * sent) and rcv_nxt. The client answers; with neither a socket nor a
 * redirect for the flow here, this kernel resets it. The machine does
 * this itself for the flows of a lost target. */
int xo_probe_client(const struct xo_endpoint *local,
		    const struct xo_endpoint *client, uint32_t snd_una,
		    uint32_t rcv_nxt);

/* Read a cluster key (16..64 bytes) from a file that only its owner can
 * read (XO_E_PERM otherwise); returns its length. The read buffer is
 * wiped. */
int xo_key_load(const char *path, uint8_t *out, uint32_t cap);
/* Set up a control connection's socket: TCP_NODELAY (request/response
 * messages), TCP_USER_TIMEOUT and keep-alive (a peer that vanishes is
 * noticed by the kernel too, also when it stops reading: drivers that
 * cannot see their send queue rely on it). Pass the peer timeout; 0 =
 * XO_PROTO_PEER_TIMEOUT_MS. */
int xo_ctl_sock_setup(int fd, uint32_t user_timeout_ms);

/* XO_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* XO_PROTO_H */
