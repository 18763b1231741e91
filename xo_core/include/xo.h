/* SPDX-License-Identifier: MIT */
/*
 * xo.h - the XO core: move a live TCP connection between machines.
 *
 * Life cycle of a connection handed from a host to a target:
 *
 *   host:   xo_tcp_freeze(fd)            enter TCP_REPAIR (socket goes quiet)
 *           xo_tcp_capture(fd, &st)      read sequence numbers, windows,
 *                                        options and queue bytes into st
 *           xo_state_encode(&st, ...)    flatten st for the wire
 *           ... steering rules, control messages (see xo_chan_*) ...
 *           xo_tcp_discard(fd)           close without FIN or RST
 *   target: xo_state_decode(...)         rebuild st from the wire
 *           xo_tcp_restore(&st, &opts)   new socket in repair mode with the
 *                                        same state, bound where opts says
 *           xo_tcp_resume(fd, &st)       queue the in-flight bytes, leave
 *                                        repair (no window probe) and send
 *                                        the bytes that were never sent
 *
 * If anything fails before the target is ready, the host calls
 * xo_tcp_resume() on its own frozen socket and carries on.
 *
 * Ownership: an xo_tcp_state owns its byte buffers (sendq, recvq, app_data,
 * meta). xo_tcp_capture() and xo_state_decode() allocate them;
 * xo_state_release() frees them. xo_state_set_*() copy what they are given.
 *
 * Errors: every function returns 0 (or a byte count / fd) on success and a
 * negative XO_E_* code on failure. xo_last_error() gives a sentence that
 * names the step and the errno, valid until the next call on this thread.
 *
 * The part between the CDEF markers is read by the cffi build as is: keep
 * it to plain declarations and integer #defines.
 */
#ifndef XO_H
#define XO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* XO_CDEF_BEGIN */

/* ---- errors ---------------------------------------------------------- */

#define XO_OK 0
#define XO_E_SYS -1          /* a system call failed; see xo_last_error() */
#define XO_E_PERM -2         /* no CAP_NET_ADMIN (TCP_REPAIR refused) */
#define XO_E_NOT_ESTABLISHED -3 /* socket is not an ESTABLISHED TCP socket */
#define XO_E_NOMEM -4
#define XO_E_INVAL -5        /* bad argument */
#define XO_E_TRUNCATED -6    /* input ends before a field it announces */
#define XO_E_BAD_MAGIC -7    /* not an XO state / message */
#define XO_E_VERSION -8      /* encoded by a newer, incompatible version */
#define XO_E_LENGTH -9       /* a length field disagrees with the data */
#define XO_E_FIELD -10       /* a field holds a value out of range */
#define XO_E_DUPLICATE -11   /* a field appears twice */
#define XO_E_MISSING -12     /* a required field is absent */
#define XO_E_TOO_LARGE -13   /* over the size limit */
#define XO_E_AUTH -14        /* HMAC does not verify (wrong key or tampered) */
#define XO_E_REPLAY -15      /* sequence number already seen */
#define XO_E_MSG_TYPE -16    /* unknown message type */
#define XO_E_CHANNEL -17     /* message belongs to another channel/direction */
#define XO_E_NOSPACE -18     /* output buffer too small */
#define XO_E_UNSUPPORTED -19 /* kernel lacks a feature (named in the text) */
#define XO_E_BUSY -20        /* resource busy / queue full */
#define XO_E_NOTFOUND -21    /* no such entry */
#define XO_E_SEQUENCE -22    /* a control message is missing (sequence gap) */
#define XO_E_REFUSED -23     /* the peer or request is not allowed here */
#define XO_E_STATE -24       /* not possible in the connection's state */
#define XO_E_URGENT -25      /* an unread urgent (MSG_OOB) byte: cannot move */

/* Sentence about the last failure on this thread ("" if none). */
const char *xo_last_error(void);
/* Short constant name of an error code, e.g. "XO_E_AUTH". */
const char *xo_strerror(int code);
/* errno of the last XO_E_SYS / XO_E_PERM failure on this thread, else 0. */
int xo_last_errno(void);

/* ---- TCP state ------------------------------------------------------- */

#define XO_OPT_TIMESTAMPS 1
#define XO_OPT_SACK 2
#define XO_OPT_WSCALE 4

#define XO_MAX_QUEUE_BYTES 67108864 /* per queue; far above any tcp_wmem */
#define XO_MAX_APP_BYTES 16777216
#define XO_MAX_META_BYTES 65536

struct xo_endpoint {
	uint16_t family;   /* AF_INET or AF_INET6 */
	uint16_t port;     /* host byte order */
	uint32_t scope_id; /* IPv6 link-local only */
	uint8_t addr[16];  /* IPv4 uses the first 4 bytes */
};

struct xo_tcp_state {
	struct xo_endpoint local;  /* as on the host that captured it */
	struct xo_endpoint remote; /* the client */
	uint32_t snd_seq;          /* write_seq: one past the last queued byte */
	uint32_t rcv_seq;          /* rcv_nxt: one past the last received byte */
	uint32_t snd_wl1;          /* TCP_REPAIR_WINDOW */
	uint32_t snd_wnd;
	uint32_t max_window;
	uint32_t rcv_wnd;
	uint32_t rcv_wup;
	uint32_t mss_clamp;
	uint32_t timestamp;        /* TCP_TIMESTAMP (valid with XO_OPT_TIMESTAMPS) */
	uint8_t options;           /* XO_OPT_*: negotiated with the peer */
	uint8_t snd_wscale;
	uint8_t rcv_wscale;
	uint8_t has_peer_mac;
	uint8_t peer_mac[6];
	uint32_t inflight_len;     /* sent, not yet acknowledged */
	uint32_t unsent_len;       /* queued, never sent */
	uint32_t recvq_len;        /* received, not read by the application */
	uint32_t app_len;          /* request bytes the application already read */
	uint32_t meta_len;         /* free-form plugin metadata */
	uint8_t *sendq;            /* inflight_len + unsent_len bytes, in order */
	uint8_t *recvq;
	uint8_t *app_data;
	uint8_t *meta;
	struct xo_tls_state *tls;  /* NULL: no TLS record state */
};

/* ---- TLS record state ----------------------------------------------- */
/*
 * The record state of a TLS session on the connection, per direction: the
 * traffic key, IV and salt of the current epoch and the sequence number of
 * the next record (what the kernel's SOL_TLS TLS_TX/TLS_RX crypto_info
 * holds, whoever keeps it). Values as in linux/tls.h.
 *
 *   cipher                     key  iv  salt   (rec_seq: 8 bytes, a u64 here)
 *   XO_TLS_AES_GCM_128          16   8   4
 *   XO_TLS_AES_GCM_256          32   8   4
 *   XO_TLS_CHACHA20_POLY1305    32  12   0
 *
 * Bytes past a cipher's lengths must be zero. A connection with TLS state
 * moves only at a record boundary with nothing queued either way (empty
 * send and receive queues): xo_tcp_capture() refuses a kTLS socket with
 * bytes pending (XO_E_BUSY) and xo_tcp_restore() a TLS state with queues
 * when it installs kernel TLS. With tls_user (the caller's record layer
 * continues the session) queued bytes are allowed: they are the whole or
 * partial records that follow the state's sequence numbers, as the record
 * layer reads and writes them.
 */
#define XO_TLS_1_2 0x0303
#define XO_TLS_1_3 0x0304
#define XO_TLS_AES_GCM_128 51
#define XO_TLS_AES_GCM_256 52
#define XO_TLS_CHACHA20_POLY1305 54
#define XO_TLS_DIR_TX 1
#define XO_TLS_DIR_RX 2

struct xo_tls_dir {
	uint8_t key[32];
	uint8_t iv[12];
	uint8_t salt[4];
	uint64_t rec_seq;   /* the next record's sequence number */
};

struct xo_tls_state {
	uint16_t version;   /* XO_TLS_1_2 or XO_TLS_1_3 */
	uint16_t cipher;    /* XO_TLS_* */
	uint8_t dirs;       /* XO_TLS_DIR_TX | XO_TLS_DIR_RX: which are set */
	uint8_t reserved[3];
	struct xo_tls_dir tx, rx;
};

/* Check a TLS state (version, cipher, unused bytes, a sequence number
 * that could still go up): 0 or XO_E_FIELD with the reason. Touches no
 * socket. */
int xo_tls_check(const struct xo_tls_state *tls);
/* Attach a copy of tls to st (checked first; kept in memory excluded from
 * core dumps, wiped by xo_state_release()); NULL removes it. */
int xo_state_set_tls(struct xo_tcp_state *st, const struct xo_tls_state *tls);
/* Whether the kernel has TLS: 1, or 0 with the reason in xo_last_error(). */
int xo_tls_kernel_available(void);

/*
 * The record state of a session from the secrets OpenSSL's key log
 * callback reports (what a TLS endpoint in user space knows), for this end
 * (is_server: TX is the server's write side) with the sequence numbers of
 * the next records each way (the records counted since the keys began:
 * TLS 1.3 application records from 0; TLS 1.2 from 1, its Finished was 0).
 *   TLS 1.3: the client and server application traffic secrets
 *            (CLIENT_TRAFFIC_SECRET_0 / SERVER_TRAFFIC_SECRET_0), 32 or
 *            48 bytes; keys by HKDF-Expand-Label (RFC 8446 7.3).
 *   TLS 1.2: the master secret (48 bytes, CLIENT_RANDOM) and both hello
 *            randoms; keys from the PRF's key expansion (RFC 5246 6.3).
 */
int xo_tls13_state(uint16_t cipher, const uint8_t *client_secret,
		   const uint8_t *server_secret, uint32_t secret_len,
		   int is_server, uint64_t tx_seq, uint64_t rx_seq,
		   struct xo_tls_state *out);
int xo_tls12_state(uint16_t cipher, const uint8_t *master,
		   uint32_t master_len, const uint8_t *client_random,
		   const uint8_t *server_random, int is_server,
		   uint64_t tx_seq, uint64_t rx_seq, struct xo_tls_state *out);

/*
 * A TLS record layer in user space, for a kernel without TLS (or a
 * direction OpenSSL keeps in user space): it continues a session from a
 * struct xo_tls_state, both directions required. Records carry at most
 * XO_TLS_MAX_PLAINTEXT bytes; a record is at most XO_TLS_MAX_RECORD bytes.
 *
 * xo_tls_rec_seal() writes one record of `type` (23 application data, 21
 * alert) and returns its length. xo_tls_rec_open() looks at buf: 0 when
 * buf does not hold a whole record yet, else the bytes of the record it
 * decrypted in place (rec points into buf). A record that does not verify
 * is XO_E_AUTH; a malformed one XO_E_FIELD / XO_E_TOO_LARGE; either way
 * the sequence numbers do not move and the session cannot go on (TLS
 * ends a session at the first bad record). xo_tls_rec_get_state() gives
 * the state to hand off next.
 */
#define XO_TLS_MAX_PLAINTEXT 16384
#define XO_TLS_MAX_RECORD 16645 /* 5 + 16384 + 256 */

struct xo_tls_rec;
struct xo_tls_record {
	uint8_t type;        /* the content type (TLS 1.3: the inner one) */
	uint8_t reserved[3];
	uint32_t len;
	uint8_t *data;       /* plaintext, inside the buffer given to open */
};

int xo_tls_rec_new(const struct xo_tls_state *tls, struct xo_tls_rec **out);
void xo_tls_rec_free(struct xo_tls_rec *r);
size_t xo_tls_rec_sealed_size(const struct xo_tls_rec *r, uint32_t len);
int64_t xo_tls_rec_seal(struct xo_tls_rec *r, uint8_t type,
			const uint8_t *in, uint32_t len, uint8_t *out,
			size_t cap);
int64_t xo_tls_rec_open(struct xo_tls_rec *r, uint8_t *buf, size_t len,
			struct xo_tls_record *rec);
int xo_tls_rec_get_state(const struct xo_tls_rec *r,
			 struct xo_tls_state *out);

/*
 * A TLS stream over that record layer, without I/O, for an event loop on a
 * non-blocking socket (tls_stream.c): ciphertext read from the socket goes
 * in (in_space, then in_commit of what recv() wrote there), plaintext
 * comes out (read: > 0 bytes, 0 when a whole record has not come yet;
 * *closed = 1 once an alert came: the peer ended the session); plaintext
 * to send is sealed into records (write: the bytes taken, 0 when the
 * output holds XO_TLS_STREAM_OUT_CAP bytes already) and its ciphertext
 * sent from out / sent. A bad record, or a record other than application
 * data or an alert (KeyUpdate, renegotiation), ends the session: every
 * later call fails with the same code. get_state gives the state to hand
 * off, only with nothing held either way (XO_E_BUSY otherwise);
 * in_pending counts what is held on the way in (ciphertext and plaintext).
 */
#define XO_TLS_STREAM_OUT_CAP 66580 /* four whole records */

struct xo_tls_stream;
int xo_tls_stream_new(const struct xo_tls_state *tls,
		      struct xo_tls_stream **out);
void xo_tls_stream_free(struct xo_tls_stream *s);
uint8_t *xo_tls_stream_in_space(struct xo_tls_stream *s, size_t *room);
int xo_tls_stream_in_commit(struct xo_tls_stream *s, size_t n);
int64_t xo_tls_stream_read(struct xo_tls_stream *s, uint8_t *buf, size_t len,
			   int *closed);
size_t xo_tls_stream_in_pending(const struct xo_tls_stream *s);
int64_t xo_tls_stream_write(struct xo_tls_stream *s, const uint8_t *buf,
			    size_t len);
const uint8_t *xo_tls_stream_out(const struct xo_tls_stream *s, size_t *len);
int xo_tls_stream_sent(struct xo_tls_stream *s, size_t n);
int xo_tls_stream_get_state(const struct xo_tls_stream *s,
			    struct xo_tls_state *out);

/* Restore options. Zeroed = bind the captured local endpoint. */
struct xo_restore_opts {
	uint32_t size;              /* sizeof(struct xo_restore_opts) */
	uint8_t use_local;          /* bind .local instead of state->local */
	uint8_t tls_user;           /* 1: leave st->tls to the caller (a record
				     * layer in user space); 0: install it as
				     * kernel TLS */
	uint8_t reserved[2];
	struct xo_endpoint local;   /* port 0 = keep the captured port */
};

/* Endpoints and the socket API: the local (peer 0) or remote (peer 1) end
 * of a connected socket; a struct sockaddr_in/_in6 of at most cap bytes
 * filled from ep (returns its length); and back. */
int xo_endpoint_of_fd(int fd, int peer, struct xo_endpoint *ep);
int xo_endpoint_to_sockaddr(const struct xo_endpoint *ep, void *sa,
			    uint32_t cap);
int xo_endpoint_from_sockaddr(const void *sa, uint32_t len,
			      struct xo_endpoint *ep);

/* Enter repair mode: the socket stops sending; data and ACKs may still be
 * accepted, so block the flow first. */
int xo_tcp_freeze(int fd);
/* Read the whole state of a frozen ESTABLISHED socket. The socket is left
 * frozen and unchanged. On failure st is left empty. */
int xo_tcp_capture(int fd, struct xo_tcp_state *st);
/* Create a socket carrying st (receive queue, windows, options), left in
 * repair mode. Never waits and sends nothing, however long the caller
 * takes before xo_tcp_resume(). Returns the fd (blocking, as socket()). */
int xo_tcp_restore(const struct xo_tcp_state *st,
		   const struct xo_restore_opts *opts);
/* Write st's in-flight bytes into the send queue (as sent), leave repair
 * mode without a window probe, then queue st's unsent bytes. Never waits:
 * a queue the kernel will not take is XO_E_BUSY. st is the state the socket
 * was restored from; NULL for a socket that was only frozen (the host
 * rolling back keeps its own queues). */
int xo_tcp_resume(int fd, const struct xo_tcp_state *st);
/* Close a frozen socket: the kernel sends neither FIN nor RST. */
int xo_tcp_discard(int fd);
/* A frozen socket still queues what reaches it: the bytes it took after a
 * capture that read st->rcv_seq and found st->recvq_len bytes queued (pass
 * both as they were then), as a reader would get them (*out allocated:
 * xo_free() it; NULL and *len 0 when there are none; a late FIN is no
 * byte). XO_E_UNSUPPORTED for a kernel-TLS socket that took some (its TLS
 * layer owns the queue). */
int xo_tcp_late_bytes(int fd, uint32_t rcv_seq, uint32_t queued,
		      uint8_t **out, uint32_t *len);
/* Free what a core call allocated for its caller. */
void xo_free(void *mem);
/* System calls made by the last capture, restore or resume on this thread. */
unsigned int xo_last_syscalls(void);

/* Attach copies of the application bytes / metadata / peer MAC to st. */
int xo_state_set_app_data(struct xo_tcp_state *st, const uint8_t *buf,
			  uint32_t len);
int xo_state_set_meta(struct xo_tcp_state *st, const uint8_t *buf,
		      uint32_t len);
void xo_state_set_peer_mac(struct xo_tcp_state *st, const uint8_t *mac);
/* Free st's buffers and zero it. Safe on a zeroed state. */
void xo_state_release(struct xo_tcp_state *st);

/* ---- state codec ----------------------------------------------------- */

#define XO_STATE_VERSION 1

/* Bytes xo_state_encode() needs for st. */
size_t xo_state_encoded_size(const struct xo_tcp_state *st);
/* Returns bytes written, or XO_E_NOSPACE. */
int64_t xo_state_encode(const struct xo_tcp_state *st, uint8_t *out,
			size_t cap);
/* Fill st (zeroed by the caller or released) from buf. On failure st is
 * left empty and the code says which check failed. */
int xo_state_decode(const uint8_t *buf, size_t len, struct xo_tcp_state *st);

/* ---- control messages ------------------------------------------------ */

#define XO_MSG_HELLO 1
#define XO_MSG_BEGIN_OFFLOAD 2
#define XO_MSG_TARGET_READY 3
#define XO_MSG_HOST_READY 4
#define XO_MSG_TARGET_DONE 5
#define XO_MSG_END_OFFLOAD 6
#define XO_MSG_ABORT 7
#define XO_MSG_LOAD_REPORT 8
#define XO_MSG_PING 9
#define XO_MSG_PONG 10
#define XO_MSG_PARKED 11 /* client frames a PARK entry kept, for the new owner */
#define XO_MSG_BYTES 12  /* what the application reads first, after the state */
#define XO_MSG_MAX 12

#define XO_ENV_VERSION 2
#define XO_ENV_HEADER_LEN 40
#define XO_ENV_MAC_LEN 16 /* the trailer: AES-256-GCM tag (HELLO: HMAC) */
#define XO_ENV_MAX_PAYLOAD 83886080 /* a state with full queues fits */
#define XO_KEY_MIN_LEN 16
#define XO_KEY_MAX_LEN 64

/*
 * One encrypted, authenticated, ordered channel between two peers (one
 * control connection). Both ends hold the cluster key; each has its own
 * role (0 host, 1 target). Each end first sends a HELLO carrying a fresh
 * nonce (authenticated with a key derived from the cluster key, not
 * encrypted: the nonce is public); xo_chan_bind() then derives the
 * session: the channel id and, with HKDF-SHA256 over the cluster key and
 * both nonces, one AES-256-GCM key and IV per direction. Every later
 * message is encrypted and authenticated under them, its header as
 * associated data, its sequence number in the nonce. Sequence numbers
 * start at 1 and go up by exactly one: a number already seen is a replay
 * (XO_E_REPLAY), a number further on means a message was lost
 * (XO_E_SEQUENCE).
 *
 * The keys live in memory of their own (excluded from core dumps, wiped
 * when freed; the cluster key copy is wiped once bound): call
 * xo_chan_free() on every channel xo_chan_init() set up.
 */
struct xo_chan {
	void *secret;      /* the key material; owned, see xo_chan_free() */
	uint8_t role;
	uint8_t bound;     /* session keys derived */
	uint8_t reserved[6];
	uint64_t channel_id;
	uint64_t send_seq; /* last sequence number sealed */
	uint64_t recv_seq; /* last sequence number accepted */
};

struct xo_msg {
	uint8_t type;
	uint8_t sender_role;
	uint16_t flags;
	uint64_t conn_id;
	uint64_t seq;
	uint64_t channel_id;
	uint32_t payload_len;
	const uint8_t *payload; /* points into the buffer given to open */
};

int xo_chan_init(struct xo_chan *ch, const uint8_t *key, uint32_t key_len,
		 uint64_t channel_id, uint8_t role);
/* Wipe and free the channel's keys; zeroes ch. Safe on a zeroed channel. */
void xo_chan_free(struct xo_chan *ch);
/*
 * Session binding (the HELLO exchange): each end sends XO_HELLO_NONCE_LEN
 * fresh random bytes in a HELLO sealed on channel 0; both then call
 * xo_chan_bind() with their own and the peer's nonce. The channel id
 * becomes the first 8 bytes of SHA-256(role-0 nonce || role-1 nonce) and
 * the session keys are derived; messages recorded from an earlier session
 * never verify in a new one. A channel binds once (XO_E_STATE after).
 */
#define XO_HELLO_NONCE_LEN 16
int xo_chan_bind(struct xo_chan *ch, const uint8_t *own_nonce,
		 const uint8_t *peer_nonce);

/* Bytes a sealed message with payload_len bytes of payload takes. */
size_t xo_env_size(uint32_t payload_len);
/* Seal one message into out; returns bytes written. Consumes a seq.
 * Anything but HELLO needs a bound channel (XO_E_STATE otherwise). */
int64_t xo_chan_seal(struct xo_chan *ch, uint8_t type, uint16_t flags,
		     uint64_t conn_id, const uint8_t *payload,
		     uint32_t payload_len, uint8_t *out, size_t cap);
/* Total frame length announced by a header (for stream framing), or a
 * negative code if the header is malformed or oversized. hdr needs
 * XO_ENV_HEADER_LEN bytes. Nothing is trusted until xo_chan_open(). */
int64_t xo_env_frame_len(const uint8_t *hdr, size_t len);
/* Verify, decrypt (in place: buf's payload bytes become the plaintext)
 * and parse one frame. The channel's replay window moves only when the
 * message is accepted. On a failed decryption the payload bytes are
 * wiped. */
int xo_chan_open(struct xo_chan *ch, uint8_t *buf, size_t len,
		 struct xo_msg *msg);

/* ---- control message payloads -------------------------------------- */
/*
 * The small payloads, defined here once for every speaker (Python engine,
 * nginx module, Ceph agents). Encoders return the bytes written (or
 * XO_E_NOSPACE); decoders check every length and value.
 *
 *   TARGET_READY: family u8 (4 or 6) | address 16 B | port u16
 *   ABORT:        reason u32 | UTF-8 text (at most XO_ABORT_MAX_TEXT bytes)
 *   LOAD_REPORT:  active u32 | handoffs u32 | bytes served u64
 */
#define XO_READY_LEN 19
#define XO_ABORT_MAX_TEXT 1024
#define XO_LOAD_LEN 16

#define XO_ABORT_DECODE 1  /* the state did not decode */
#define XO_ABORT_RESTORE 2 /* restore (or its checks) failed */
#define XO_ABORT_TIMEOUT 3
#define XO_ABORT_REFUSED 4 /* unknown connection, wrong sender, ... */
#define XO_ABORT_HOST 5    /* the host gave up (rolled back) */

struct xo_load_report {
	uint32_t active;
	uint32_t handoffs;
	uint64_t bytes_served;
};

int xo_ready_encode(const struct xo_endpoint *ep, uint8_t *out, size_t cap);
int xo_ready_decode(const uint8_t *buf, size_t len, struct xo_endpoint *ep);
/* text need not be NUL-terminated; longer than XO_ABORT_MAX_TEXT is cut. */
int xo_abort_encode(uint32_t reason, const char *text, uint32_t text_len,
		    uint8_t *out, size_t cap);
/* On success *text points into buf (not NUL-terminated), *text_len bytes. */
int xo_abort_decode(const uint8_t *buf, size_t len, uint32_t *reason,
		    const uint8_t **text, uint32_t *text_len);
int xo_load_encode(const struct xo_load_report *r, uint8_t *out, size_t cap);
int xo_load_decode(const uint8_t *buf, size_t len, struct xo_load_report *r);

/* XO_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* XO_H */
