// SPDX-License-Identifier: MIT
/*
 * ngx_http_xo_module: XO connection offload for nginx.
 *
 * nginx glue around the core's protocol machine (xo_core/include/xo_proto.h),
 * which holds every protocol rule; this file only moves bytes, sockets and
 * timers between nginx's event loop and the machine, like the C poll()
 * driver (xo_core/driver/xo_driver.c) does for its own loop.
 *
 * Front (host role), per request in the precontent phase of a location with
 * xo_pass: decide (threshold, policy), give the machine a duplicate of the
 * connection's socket with the request bytes nginx already read (rebuilt
 * from the parsed request line and headers, plus the unparsed rest of the
 * buffer) and park the request. XO_EV_OFFLOADED: the machine discarded its
 * duplicate in repair mode, so closing nginx's descriptor sends nothing to
 * the client; the request is closed (444 in the access log).
 * XO_EV_ROLLED_BACK: the phases go on (static files or proxy_pass serve it
 * here). XO_EV_RETURNED: the socket becomes a new connection of the HTTP
 * listener it was accepted on.
 *
 * Target: a control listener (xo_control) takes the hosts' control
 * connections. XO_EV_ADOPTED: a duplicate of the restored socket becomes an
 * accepted connection of the server's HTTP listener; the request bytes are
 * replayed through a one-shot c->recv. At the response boundary (the
 * connection idle in keep-alive, its send queue acknowledged) it is handed
 * back; when nginx closes it instead, the machine closes its own
 * descriptor, which sends the FIN through the source rewrite.
 *
 * TLS connections of `ssl` listeners move with their session's record
 * state; whoever continues a session without OpenSSL serves it through the
 * core's TLS stream (section "TLS" below).
 *
 * One machine per worker process; docs/nginx.md explains roles, directives,
 * privileges, reload and the limits.
 */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <linux/capability.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "xo.h"
#include "xo_proto.h"
#include "xo_steer.h"

#define XO_MAX_CTLS 128
#define XO_MAX_TARGETS 64

#define XO_POLICY_RR 0
#define XO_POLICY_LEAST 1
#define XO_POLICY_HASH 2

/* xo_tls (target): TLS sessions refused, kernel TLS only, or the core's
 * record layer where the kernel has no TLS */
#define XO_TLS_OFF 0
#define XO_TLS_KERNEL 1
#define XO_TLS_ON 2

static ngx_conf_enum_t xo_tls_modes[] = {
	{ ngx_string("off"), XO_TLS_OFF },
	{ ngx_string("kernel"), XO_TLS_KERNEL },
	{ ngx_string("on"), XO_TLS_ON },
	{ ngx_null_string, 0 }
};

typedef struct {
	ngx_str_t name;
	ngx_url_t url;
	u_char mac[6];
	ngx_flag_t has_mac;
} ngx_http_xo_target_t;

typedef struct {
	ngx_str_t key_file;
	ngx_str_t ifname;
	ngx_str_t bpf_object;
	ngx_str_t pin_dir;
	ngx_array_t *targets;          /* ngx_http_xo_target_t */
	/* target role */
	ngx_url_t control;
	ngx_flag_t has_control;
	ngx_http_core_srv_conf_t *control_srv;
	ngx_array_t *hosts;            /* ngx_url_t */
	ngx_flag_t hand_back;
	ngx_msec_t drain_timeout;
	ngx_uint_t tls;                /* target: XO_TLS_* (xo_tls) */
	ngx_uint_t used;               /* xo_pass anywhere */
	ngx_str_t conf_file;
	ngx_uint_t conf_line;
	ngx_array_t *pass_names;       /* xo_pass_name_t: every name xo_pass
					* gives, checked once all is parsed */
	ngx_array_t *groups;           /* xo_group_t: upstream blocks named
					* by xo_pass, as target indexes */
} ngx_http_xo_main_conf_t;

/* A name xo_pass gave, and where (for messages). */
typedef struct {
	ngx_str_t name;
	ngx_str_t file;
	ngx_uint_t line;
} xo_pass_name_t;

/* An upstream block used as a target list: its servers' indexes into the
 * main configuration's targets. */
typedef struct {
	ngx_str_t name;
	ngx_array_t *index;            /* ngx_uint_t */
} xo_group_t;

typedef struct {
	ngx_flag_t pass;
	ngx_array_t *names;            /* ngx_str_t; resolved to indexes */
	ngx_array_t *index;            /* ngx_uint_t */
	ngx_uint_t policy;
	ngx_http_complex_value_t *hash;
	off_t threshold;
	ngx_uint_t rr;
	ngx_str_t file;                /* where xo_pass is, for messages */
	ngx_uint_t line;
} ngx_http_xo_loc_conf_t;

typedef struct {
	unsigned decided:1;
	unsigned offloaded:1;
	ngx_str_t target;
} ngx_http_xo_ctx_t;

enum {
	XC_NONE,
	XC_HOST_WAIT,   /* host: the machine holds a duplicate, r parked */
	XC_SERVING,     /* target: adopted, nginx serves it */
	XC_MACHINE,     /* target: hand-back under way */
};

typedef struct {
	ngx_uint_t state;
	uint64_t conn;
	uint32_t peer;
	ngx_http_request_t *r;
	ngx_connection_t *c;
	u_char *replay;
	size_t replay_len, replay_off;
	ngx_event_t ev;                /* target: hand-back check */
	ngx_msec_t drain_start;
	ngx_msec_t ka_left;
	u_char *ktls_in;               /* target: plaintext read off a kTLS
					* socket before its hand-back */
	size_t ktls_len, ktls_cap;
} xo_conn_t;

typedef struct {
	ngx_connection_t *c;
	uint32_t peer;
	ngx_int_t target;              /* host: index into targets; -1 accepted */
	ngx_uint_t adopted;            /* target: connections being served */
	ngx_msec_t retry_at;
	unsigned connecting:1;
	unsigned up:1;
} xo_ctl_t;

static ngx_int_t ngx_http_xo_init(ngx_conf_t *cf);
static void *ngx_http_xo_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_xo_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_xo_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_xo_merge_loc_conf(ngx_conf_t *cf, void *parent,
					void *child);
static ngx_int_t ngx_http_xo_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_xo_init_process(ngx_cycle_t *cycle);
static void ngx_http_xo_exit_process(ngx_cycle_t *cycle);
static char *ngx_http_xo_target(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *xo_pass_names_resolve(ngx_conf_t *cf,
				   ngx_http_xo_main_conf_t *mcf);
static char *ngx_http_xo_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_xo_policy(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_xo_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_xo_status_handler(ngx_http_request_t *r);
static char *ngx_http_xo_control(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_xo_hosts(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static void xo_ctl_accept(ngx_connection_t *c);
static void xo_pump(void);
static void xo_post_pump(void);

static ngx_command_t ngx_http_xo_commands[] = {
	{ ngx_string("xo_key"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
	  ngx_conf_set_str_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, key_file), NULL },
	{ ngx_string("xo_interface"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
	  ngx_conf_set_str_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, ifname), NULL },
	{ ngx_string("xo_bpf_object"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
	  ngx_conf_set_str_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, bpf_object), NULL },
	{ ngx_string("xo_pin_dir"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
	  ngx_conf_set_str_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, pin_dir), NULL },
	{ ngx_string("xo_target"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE23,
	  ngx_http_xo_target, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
	{ ngx_string("xo_control"), NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1,
	  ngx_http_xo_control, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
	{ ngx_string("xo_hosts"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_CONF_1MORE, ngx_http_xo_hosts, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL },
	{ ngx_string("xo_hand_back"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_CONF_FLAG, ngx_conf_set_flag_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, hand_back), NULL },
	{ ngx_string("xo_drain_timeout"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_CONF_TAKE1, ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, drain_timeout), NULL },
	{ ngx_string("xo_tls"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_CONF_TAKE1, ngx_conf_set_enum_slot, NGX_HTTP_MAIN_CONF_OFFSET,
	  offsetof(ngx_http_xo_main_conf_t, tls), &xo_tls_modes },
	{ ngx_string("xo_pass"), NGX_HTTP_LOC_CONF | NGX_CONF_ANY,
	  ngx_http_xo_pass, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
	{ ngx_string("xo_policy"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_HTTP_LOC_CONF | NGX_CONF_TAKE12, ngx_http_xo_policy,
	  NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
	{ ngx_string("xo_threshold"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
	  NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_off_slot,
	  NGX_HTTP_LOC_CONF_OFFSET, offsetof(ngx_http_xo_loc_conf_t, threshold),
	  NULL },
	{ ngx_string("xo_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
	  ngx_http_xo_status, NGX_HTTP_LOC_CONF_OFFSET, 0, NULL },
	ngx_null_command
};

static ngx_http_module_t ngx_http_xo_module_ctx = {
	NULL,                           /* preconfiguration */
	ngx_http_xo_init,               /* postconfiguration */
	ngx_http_xo_create_main_conf,
	ngx_http_xo_init_main_conf,
	NULL, NULL,                     /* server */
	ngx_http_xo_create_loc_conf,
	ngx_http_xo_merge_loc_conf,
};

ngx_module_t ngx_http_xo_module = {
	NGX_MODULE_V1,
	&ngx_http_xo_module_ctx,
	ngx_http_xo_commands,
	NGX_HTTP_MODULE,
	NULL,                           /* init master */
	ngx_http_xo_init_module,
	ngx_http_xo_init_process,
	NULL,                           /* init thread */
	NULL,                           /* exit thread */
	ngx_http_xo_exit_process,
	NULL,                           /* exit master */
	NGX_MODULE_V1_PADDING
};

/* ---- per-worker state ---------------------------------------------------- */

static ngx_http_xo_main_conf_t *xo_mcf;
static struct xo_proto *xo_machine;
static struct xo_rules *xo_rules;
static xo_conn_t *xo_conns;
static ngx_uint_t xo_nconns;
static xo_ctl_t xo_ctls[XO_MAX_CTLS];
static ngx_listening_t *xo_adopt_ls;    /* target: where adopted ones join */
static ngx_event_t xo_tick_ev, xo_pump_ev;
static ngx_uint_t xo_pumping, xo_pump_again;
static ngx_cycle_t *xo_cycle;
/* the worker's listening sockets as at its start (a stopping worker's
 * cycle lists none, yet returned connections must join theirs) */
static ngx_listening_t *xo_http_ls;
static ngx_uint_t xo_http_nls;

/* master: the steering handle, kept across reloads while its settings stay */
static struct xo_steer *xo_steer;
static int xo_steer_ifindex;
static uint8_t xo_if_mac[6];  /* the source MAC of redirected frames */
static char xo_steer_key[PATH_MAX * 3];
/* master: the cluster key, read as root (the file is the owner's only) */
static uint8_t xo_key_buf[XO_KEY_MAX_LEN];
static int xo_key_len;

static uint64_t xo_now(void)
{
	return xo_steer_now_ns();
}

static xo_conn_t *xo_conn_of(ngx_connection_t *c)
{
	ngx_uint_t i = (ngx_uint_t)(c - xo_cycle->connections);

	return i < xo_nconns ? &xo_conns[i] : NULL;
}

/* ---- configuration --------------------------------------------------------- */

static void *ngx_http_xo_create_main_conf(ngx_conf_t *cf)
{
	ngx_http_xo_main_conf_t *mcf = ngx_pcalloc(cf->pool, sizeof(*mcf));

	if (!mcf)
		return NULL;
	mcf->hand_back = NGX_CONF_UNSET;
	mcf->drain_timeout = NGX_CONF_UNSET_MSEC;
	mcf->tls = NGX_CONF_UNSET_UINT;
	return mcf;
}

static char *ngx_http_xo_init_main_conf(ngx_conf_t *cf, void *conf)
{
	ngx_http_xo_main_conf_t *mcf = conf;
	ngx_uint_t role_host;

	if (xo_pass_names_resolve(cf, mcf) != NGX_CONF_OK)
		return NGX_CONF_ERROR;
	role_host = mcf->targets && mcf->targets->nelts;
	ngx_conf_init_value(mcf->hand_back, 1);
	ngx_conf_init_msec_value(mcf->drain_timeout, 2000);
	ngx_conf_init_uint_value(mcf->tls, XO_TLS_KERNEL);
	if (!role_host && !mcf->has_control) {
		if (mcf->used) {
			ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
					   "xo_pass needs at least one xo_target "
					   "or names an upstream block");
			return NGX_CONF_ERROR;
		}
		return NGX_CONF_OK;
	}
	if (role_host && mcf->has_control) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo: one nginx is either a front (xo_target) or a "
				   "target (xo_control), not both");
		return NGX_CONF_ERROR;
	}
	if (!mcf->key_file.len || !mcf->ifname.len || !mcf->bpf_object.len ||
	    !mcf->pin_dir.len) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo: xo_key, xo_interface, xo_bpf_object and "
				   "xo_pin_dir are required where xo_target or "
				   "xo_control is used");
		return NGX_CONF_ERROR;
	}
	if (mcf->has_control && (!mcf->hosts || !mcf->hosts->nelts)) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_control needs xo_hosts (the fronts allowed "
				   "to hand connections over)");
		return NGX_CONF_ERROR;
	}
	if (ngx_conf_full_name(cf->cycle, &mcf->key_file, 1) != NGX_OK ||
	    ngx_conf_full_name(cf->cycle, &mcf->bpf_object, 1) != NGX_OK)
		return NGX_CONF_ERROR;
	return NGX_CONF_OK;
}

static int xo_parse_mac(const u_char *s, size_t len, u_char *mac)
{
	unsigned int b[6];
	char buf[32];
	int i;

	if (len >= sizeof(buf))
		return -1;
	ngx_memcpy(buf, s, len);
	buf[len] = '\0';
	if (sscanf(buf, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4],
		   &b[5]) != 6)
		return -1;
	for (i = 0; i < 6; i++) {
		if (b[i] > 255)
			return -1;
		mac[i] = (u_char)b[i];
	}
	return 0;
}

/* xo_target NAME ADDRESS[:PORT] [mac=MAC]; */
static char *ngx_http_xo_target(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_xo_main_conf_t *mcf = conf;
	ngx_str_t *value = cf->args->elts;
	ngx_http_xo_target_t *t;
	ngx_uint_t i;

	if (!mcf->targets) {
		mcf->targets = ngx_array_create(cf->pool, 4, sizeof(*t));
		if (!mcf->targets)
			return NGX_CONF_ERROR;
	}
	if (value[1].len == 0 || value[1].len >= 32) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_target: name \"%V\" must have 1 to 31 characters",
				   &value[1]);
		return NGX_CONF_ERROR;
	}
	t = mcf->targets->elts;
	for (i = 0; i < mcf->targets->nelts; i++)
		if (t[i].name.len == value[1].len &&
		    !ngx_strncmp(t[i].name.data, value[1].data, value[1].len)) {
			ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
					   "xo_target \"%V\" defined twice", &value[1]);
			return NGX_CONF_ERROR;
		}
	if (mcf->targets->nelts == XO_MAX_TARGETS) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "xo_target: at most %d",
				   XO_MAX_TARGETS);
		return NGX_CONF_ERROR;
	}
	t = ngx_array_push(mcf->targets);
	if (!t)
		return NGX_CONF_ERROR;
	ngx_memzero(t, sizeof(*t));
	t->name = value[1];
	t->url.url = value[2];
	t->url.default_port = XO_DEFAULT_CONTROL_PORT;
	t->url.no_resolve = 1;
	if (ngx_parse_url(cf->pool, &t->url) != NGX_OK || !t->url.naddrs) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_target %V: bad address \"%V\"%s%s", &value[1],
				   &value[2], t->url.err ? ": " : "",
				   t->url.err ? t->url.err : "");
		return NGX_CONF_ERROR;
	}
	if (cf->args->nelts == 4) {
		if (value[3].len < 4 || ngx_strncmp(value[3].data, "mac=", 4) ||
		    xo_parse_mac(value[3].data + 4, value[3].len - 4, t->mac)) {
			ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
					   "xo_target %V: \"%V\" is not mac=XX:XX:XX:XX:XX:XX",
					   &value[1], &value[3]);
			return NGX_CONF_ERROR;
		}
		t->has_mac = 1;
	}
	(void)cmd;
	return NGX_CONF_OK;
}

/* ---- upstream blocks as target lists ------------------------------------- */

/*
 * xo_pass UPSTREAM; names an upstream { server ADDR[:PORT] ...; } block: each
 * server is a target, its address the control address (the server's port,
 * XO_DEFAULT_CONTROL_PORT when the line gives none). weight=N repeats the
 * server in the location's list (round_robin and hash count it); down leaves
 * it out; what xo cannot honour (backup, max_fails, fail_timeout, max_conns,
 * a balancing method or keepalive in the block, IPv6 or unix addresses)
 * stops nginx -t naming the upstream's file and line.
 */

/* xo_pass's names are resolved once the whole http block is parsed: an
 * upstream block may come after the location. */
static ngx_int_t xo_pass_name_add(ngx_conf_t *cf, ngx_http_xo_main_conf_t *mcf,
				  const ngx_str_t *name)
{
	xo_pass_name_t *pn;

	if (!mcf->pass_names) {
		mcf->pass_names = ngx_array_create(cf->pool, 4, sizeof(*pn));
		if (!mcf->pass_names)
			return NGX_ERROR;
	}
	pn = ngx_array_push(mcf->pass_names);
	if (!pn)
		return NGX_ERROR;
	pn->name = *name;
	pn->file = cf->conf_file->file.name;
	pn->line = cf->conf_file->line;
	return NGX_OK;
}

static ngx_int_t xo_target_index(ngx_http_xo_main_conf_t *mcf,
				 const ngx_str_t *name)
{
	ngx_http_xo_target_t *t = mcf->targets ? mcf->targets->elts : NULL;
	ngx_uint_t i;

	for (i = 0; t && i < mcf->targets->nelts; i++)
		if (t[i].name.len == name->len &&
		    !ngx_strncmp(t[i].name.data, name->data, name->len))
			return (ngx_int_t)i;
	return -1;
}

static xo_group_t *xo_group_find(ngx_http_xo_main_conf_t *mcf,
				 const ngx_str_t *name)
{
	xo_group_t *g = mcf->groups ? mcf->groups->elts : NULL;
	ngx_uint_t i;

	for (i = 0; g && i < mcf->groups->nelts; i++)
		if (g[i].name.len == name->len &&
		    !ngx_strncmp(g[i].name.data, name->data, name->len))
			return &g[i];
	return NULL;
}

static ngx_http_upstream_srv_conf_t *xo_upstream_find(ngx_conf_t *cf,
						      const ngx_str_t *name)
{
	ngx_http_upstream_main_conf_t *umcf =
		ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_module);
	ngx_http_upstream_srv_conf_t **us;
	ngx_uint_t i;

	if (!umcf)
		return NULL;
	us = umcf->upstreams.elts;
	for (i = 0; i < umcf->upstreams.nelts; i++)
		if ((us[i]->flags & NGX_HTTP_UPSTREAM_CREATE) &&
		    us[i]->host.len == name->len &&
		    !ngx_strncasecmp(us[i]->host.data, name->data, name->len))
			return us[i];
	return NULL;
}

/* The target at this control address: an existing one (an xo_target, or a
 * server of another upstream) or a new one named after the address. */
static ngx_int_t xo_target_at(ngx_conf_t *cf, ngx_http_xo_main_conf_t *mcf,
			      struct sockaddr_in *sin)
{
	ngx_http_xo_target_t *t;
	struct sockaddr_in *have;
	u_char text[NGX_SOCKADDR_STRLEN];
	ngx_uint_t i;
	size_t len;

	if (!mcf->targets) {
		mcf->targets = ngx_array_create(cf->pool, 4, sizeof(*t));
		if (!mcf->targets)
			return NGX_ERROR;
	}
	t = mcf->targets->elts;
	for (i = 0; i < mcf->targets->nelts; i++) {
		have = (struct sockaddr_in *)t[i].url.addrs[0].sockaddr;
		if (have->sin_family == AF_INET &&
		    have->sin_addr.s_addr == sin->sin_addr.s_addr &&
		    have->sin_port == sin->sin_port)
			return (ngx_int_t)i;
	}
	if (mcf->targets->nelts == XO_MAX_TARGETS)
		return NGX_DECLINED;
	len = ngx_sock_ntop((struct sockaddr *)sin, sizeof(*sin), text,
			    sizeof(text), 1);
	t = ngx_array_push(mcf->targets);
	if (!t)
		return NGX_ERROR;
	ngx_memzero(t, sizeof(*t));
	t->name.data = ngx_pstrdup(cf->pool, &(ngx_str_t){ len, text });
	if (!t->name.data)
		return NGX_ERROR;
	t->name.len = len;
	t->url.url = t->name;
	t->url.no_resolve = 1;
	if (ngx_parse_url(cf->pool, &t->url) != NGX_OK || !t->url.naddrs)
		return NGX_ERROR;
	return (ngx_int_t)(mcf->targets->nelts - 1);
}

/* An upstream block as a target list (xo_group_t), or an error sentence. */
static char *xo_group_make(ngx_conf_t *cf, ngx_http_xo_main_conf_t *mcf,
			   ngx_http_upstream_srv_conf_t *us, const xo_pass_name_t *pn)
{
	ngx_http_upstream_server_t *srv = us->servers ? us->servers->elts : NULL;
	ngx_uint_t i, a, w, *idx;
	struct sockaddr_in sin;
	const char *what;
	ngx_int_t ti;
	xo_group_t *g;

#define XO_UPS_ERR(fmt, ...)                                                  \
	do {                                                                  \
		ngx_log_error(NGX_LOG_EMERG, cf->log, 0,                      \
			      "xo_pass %V (%V:%ui): upstream \"%V\" in %s:%ui" \
			      fmt, &pn->name, &pn->file, pn->line, &us->host, \
			      us->file_name, us->line, ##__VA_ARGS__);        \
		return NGX_CONF_ERROR;                                        \
	} while (0)

	if (us->peer.init_upstream)
		XO_UPS_ERR(": its balancing method (hash, ip_hash, least_conn, "
			   "random) or keepalive does not apply to xo_pass; "
			   "choose with xo_policy");
	if (!mcf->groups) {
		mcf->groups = ngx_array_create(cf->pool, 2, sizeof(*g));
		if (!mcf->groups)
			return NGX_CONF_ERROR;
	}
	g = ngx_array_push(mcf->groups);
	if (!g)
		return NGX_CONF_ERROR;
	g->name = pn->name;
	g->index = ngx_array_create(cf->pool, 4, sizeof(ngx_uint_t));
	if (!g->index)
		return NGX_CONF_ERROR;
	for (i = 0; srv && i < us->servers->nelts; i++) {
		what = srv[i].backup ? "backup" :
		       srv[i].max_fails != 1 ? "max_fails" :
		       srv[i].fail_timeout != 10 ? "fail_timeout" :
		       srv[i].max_conns ? "max_conns" : NULL;
		if (what)
			XO_UPS_ERR(": server %V: %s is not supported by xo_pass "
				   "(weight and down are)", &srv[i].name, what);
		if (srv[i].down)
			continue;
		for (a = 0; a < srv[i].naddrs; a++) {
			if (srv[i].addrs[a].sockaddr->sa_family != AF_INET)
				XO_UPS_ERR(": server %V: xo_pass takes IPv4 control "
					   "addresses only", &srv[i].name);
			ngx_memcpy(&sin, srv[i].addrs[a].sockaddr, sizeof(sin));
			/* no port on the line: nginx put 80 there */
			if (!ngx_strlchr(srv[i].name.data,
					 srv[i].name.data + srv[i].name.len, ':'))
				sin.sin_port = htons(XO_DEFAULT_CONTROL_PORT);
			ti = xo_target_at(cf, mcf, &sin);
			if (ti == NGX_DECLINED)
				XO_UPS_ERR(": more than %d targets", XO_MAX_TARGETS);
			if (ti < 0)
				XO_UPS_ERR(": server %V: bad address", &srv[i].name);
			for (w = 0; w < srv[i].weight; w++) {
				if (g->index->nelts == XO_MAX_TARGETS)
					XO_UPS_ERR(": the weights add up to more "
						   "than %d", XO_MAX_TARGETS);
				idx = ngx_array_push(g->index);
				if (!idx)
					return NGX_CONF_ERROR;
				*idx = (ngx_uint_t)ti;
			}
		}
	}
	if (!g->index->nelts)
		XO_UPS_ERR(": no server (or all are down)");
#undef XO_UPS_ERR
	return NGX_CONF_OK;
}

/* Every name xo_pass gave is an xo_target or an upstream block (not both);
 * upstream blocks become target lists. */
static char *xo_pass_names_resolve(ngx_conf_t *cf, ngx_http_xo_main_conf_t *mcf)
{
	xo_pass_name_t *pn = mcf->pass_names ? mcf->pass_names->elts : NULL;
	ngx_http_upstream_srv_conf_t *us;
	ngx_uint_t i;

	for (i = 0; pn && i < mcf->pass_names->nelts; i++) {
		us = xo_upstream_find(cf, &pn[i].name);
		if (xo_target_index(mcf, &pn[i].name) >= 0) {
			if (us) {
				ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
					      "xo_pass: \"%V\" names both an xo_target "
					      "and an upstream in %V:%ui", &pn[i].name,
					      &pn[i].file, pn[i].line);
				return NGX_CONF_ERROR;
			}
			continue;
		}
		if (!us) {
			ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
				      "xo_pass: no xo_target or upstream \"%V\" in "
				      "%V:%ui", &pn[i].name, &pn[i].file, pn[i].line);
			return NGX_CONF_ERROR;
		}
		if (!xo_group_find(mcf, &pn[i].name) &&
		    xo_group_make(cf, mcf, us, &pn[i]) != NGX_CONF_OK)
			return NGX_CONF_ERROR;
	}
	return NGX_CONF_OK;
}

/* A location's list gets an upstream's targets (weights as repeats); the
 * picker's candidate array bounds the list. */
static ngx_int_t xo_group_append(ngx_conf_t *cf, ngx_http_xo_loc_conf_t *conf,
				 const xo_group_t *g)
{
	ngx_uint_t *from = g->index->elts, *idx, i;

	if (conf->index->nelts + g->index->nelts > XO_MAX_TARGETS) {
		ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
			      "xo_pass: more than %d targets (weights count) in "
			      "%V:%ui", XO_MAX_TARGETS, &conf->file, conf->line);
		return NGX_ERROR;
	}
	for (i = 0; i < g->index->nelts; i++) {
		idx = ngx_array_push(conf->index);
		if (!idx)
			return NGX_ERROR;
		*idx = from[i];
	}
	return NGX_OK;
}

/* xo_control ADDRESS[:PORT]; in the server whose listener adopted
 * connections join. */
static char *ngx_http_xo_control(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_xo_main_conf_t *mcf = conf;
	ngx_str_t *value = cf->args->elts;
	ngx_listening_t *ls;

	if (mcf->has_control) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_control is set already (one per nginx)");
		return NGX_CONF_ERROR;
	}
	mcf->control.url = value[1];
	mcf->control.default_port = XO_DEFAULT_CONTROL_PORT;
	mcf->control.no_resolve = 1;
	if (ngx_parse_url(cf->pool, &mcf->control) != NGX_OK ||
	    !mcf->control.naddrs || mcf->control.wildcard) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_control: \"%V\" is not an address (the target's "
				   "own, not a wildcard)%s%s", &value[1],
				   mcf->control.err ? ": " : "",
				   mcf->control.err ? mcf->control.err : "");
		return NGX_CONF_ERROR;
	}
	if (mcf->control.addrs[0].sockaddr->sa_family != AF_INET) {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_control: \"%V\": an IPv4 address", &value[1]);
		return NGX_CONF_ERROR;
	}
	ls = ngx_create_listening(cf, mcf->control.addrs[0].sockaddr,
				  mcf->control.addrs[0].socklen);
	if (!ls)
		return NGX_CONF_ERROR;
	ls->addr_ntop = 1;
	ls->handler = xo_ctl_accept;
	ls->pool_size = 256;
	ls->logp = &cf->cycle->new_log;
	ls->log.data = &ls->addr_text;
	ls->log.handler = ngx_accept_log_error;
	mcf->has_control = 1;
	mcf->control_srv = ngx_http_conf_get_module_srv_conf(cf,
							     ngx_http_core_module);
	mcf->conf_file = cf->conf_file->file.name;
	mcf->conf_line = cf->conf_file->line;
	(void)cmd;
	return NGX_CONF_OK;
}

static char *ngx_http_xo_hosts(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_xo_main_conf_t *mcf = conf;
	ngx_str_t *value = cf->args->elts;
	ngx_uint_t i;
	ngx_url_t *u;

	if (!mcf->hosts) {
		mcf->hosts = ngx_array_create(cf->pool, 2, sizeof(ngx_url_t));
		if (!mcf->hosts)
			return NGX_CONF_ERROR;
	}
	for (i = 1; i < cf->args->nelts; i++) {
		if (mcf->hosts->nelts == XO_PROTO_MAX_HOSTS) {
			ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
					   "xo_hosts: at most %d", XO_PROTO_MAX_HOSTS);
			return NGX_CONF_ERROR;
		}
		u = ngx_array_push(mcf->hosts);
		if (!u)
			return NGX_CONF_ERROR;
		ngx_memzero(u, sizeof(*u));
		u->url = value[i];
		u->default_port = 1;
		u->no_resolve = 1;
		if (ngx_parse_url(cf->pool, u) != NGX_OK || !u->naddrs ||
		    u->wildcard) {
			ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
					   "xo_hosts: \"%V\" is not an address", &value[i]);
			return NGX_CONF_ERROR;
		}
	}
	(void)cmd;
	return NGX_CONF_OK;
}

static void *ngx_http_xo_create_loc_conf(ngx_conf_t *cf)
{
	ngx_http_xo_loc_conf_t *lcf = ngx_pcalloc(cf->pool, sizeof(*lcf));

	if (!lcf)
		return NULL;
	lcf->pass = NGX_CONF_UNSET;
	lcf->policy = NGX_CONF_UNSET_UINT;
	lcf->threshold = NGX_CONF_UNSET;
	return lcf;
}

static char *ngx_http_xo_merge_loc_conf(ngx_conf_t *cf, void *parent,
					void *child)
{
	ngx_http_xo_loc_conf_t *prev = parent, *conf = child;

	ngx_conf_merge_value(conf->pass, prev->pass, 0);
	if (conf->policy == NGX_CONF_UNSET_UINT) {
		conf->policy = prev->policy == NGX_CONF_UNSET_UINT ?
				       XO_POLICY_RR : prev->policy;
		conf->hash = prev->hash;
	}
	ngx_conf_merge_off_value(conf->threshold, prev->threshold, 0);
	if (!conf->names) {
		conf->names = prev->names;
		conf->index = prev->index;
	}
	if (conf->names && !conf->index) {
		ngx_http_xo_main_conf_t *mcf =
			ngx_http_conf_get_module_main_conf(cf, ngx_http_xo_module);
		ngx_http_xo_target_t *t = mcf->targets ? mcf->targets->elts : NULL;
		ngx_str_t *n = conf->names->elts;
		ngx_uint_t i, j, *idx;

		conf->index = ngx_array_create(cf->pool, conf->names->nelts,
					       sizeof(ngx_uint_t));
		if (!conf->index)
			return NGX_CONF_ERROR;
		for (i = 0; i < conf->names->nelts; i++) {
			for (j = 0; t && j < mcf->targets->nelts; j++)
				if (t[j].name.len == n[i].len &&
				    !ngx_strncmp(t[j].name.data, n[i].data, n[i].len))
					break;
			if ((!t || j == mcf->targets->nelts) &&
			    xo_group_find(mcf, &n[i])) {
				if (xo_group_append(cf, conf, xo_group_find(mcf, &n[i]))
				    != NGX_OK)
					return NGX_CONF_ERROR;
				continue;
			}
			if (!t || j == mcf->targets->nelts) {
				ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
					      "xo_pass: no xo_target \"%V\" in %V:%ui",
					      &n[i], &conf->file, conf->line);
				return NGX_CONF_ERROR;
			}
			idx = ngx_array_push(conf->index);
			if (!idx)
				return NGX_CONF_ERROR;
			*idx = j;
		}
	}
	return NGX_CONF_OK;
}

/* xo_pass [NAME ...]; the targets (all xo_target ones when none named). */
static char *ngx_http_xo_pass(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_xo_loc_conf_t *lcf = conf;
	ngx_http_xo_main_conf_t *mcf;
	ngx_str_t *value = cf->args->elts, *n;
	ngx_uint_t i;

	if (lcf->pass != NGX_CONF_UNSET)
		return "is duplicate";
	lcf->pass = 1;
	lcf->file = cf->conf_file->file.name;
	lcf->line = cf->conf_file->line;
	mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_xo_module);
	mcf->used = 1;
	if (!mcf->conf_line) {
		mcf->conf_file = cf->conf_file->file.name;
		mcf->conf_line = cf->conf_file->line;
	}
	if (cf->args->nelts > 1) {
		lcf->names = ngx_array_create(cf->pool, cf->args->nelts - 1,
					      sizeof(ngx_str_t));
		if (!lcf->names)
			return NGX_CONF_ERROR;
		for (i = 1; i < cf->args->nelts; i++) {
			n = ngx_array_push(lcf->names);
			if (!n)
				return NGX_CONF_ERROR;
			*n = value[i];
			if (xo_pass_name_add(cf, mcf, n) != NGX_OK)
				return NGX_CONF_ERROR;
		}
	}
	(void)cmd;
	return NGX_CONF_OK;
}

/* xo_policy round_robin | least_loaded | hash VALUE; */
static char *ngx_http_xo_policy(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_xo_loc_conf_t *lcf = conf;
	ngx_str_t *value = cf->args->elts;
	ngx_http_compile_complex_value_t ccv;

	if (lcf->policy != NGX_CONF_UNSET_UINT)
		return "is duplicate";
	if (cf->args->nelts == 2 && !ngx_strcmp(value[1].data, "round_robin")) {
		lcf->policy = XO_POLICY_RR;
	} else if (cf->args->nelts == 2 &&
		   !ngx_strcmp(value[1].data, "least_loaded")) {
		lcf->policy = XO_POLICY_LEAST;
	} else if (cf->args->nelts == 3 && !ngx_strcmp(value[1].data, "hash")) {
		lcf->policy = XO_POLICY_HASH;
		lcf->hash = ngx_palloc(cf->pool, sizeof(*lcf->hash));
		if (!lcf->hash)
			return NGX_CONF_ERROR;
		ngx_memzero(&ccv, sizeof(ccv));
		ccv.cf = cf;
		ccv.value = &value[2];
		ccv.complex_value = lcf->hash;
		if (ngx_http_compile_complex_value(&ccv) != NGX_OK)
			return NGX_CONF_ERROR;
	} else {
		ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
				   "xo_policy: \"%V\": want round_robin, least_loaded "
				   "or hash VALUE", &value[1]);
		return NGX_CONF_ERROR;
	}
	(void)cmd;
	return NGX_CONF_OK;
}

/* ---- xo_status: the worker's counters and step timings as JSON ---------- */

#define XO_STEP_TRANSFERS 4
#define XO_STEP_KINDS 7
#define XO_STEP_KEEP 16384 /* samples kept per step (newest) */

typedef struct {
	uint32_t *ns;
	ngx_uint_t len, head;
	uint64_t seen;
} xo_step_ring_t;

static xo_step_ring_t xo_step_rings[XO_STEP_TRANSFERS][XO_STEP_KINDS];

/* Move the machine's recorded steps into the per-step rings. */
static void xo_steps_collect(void)
{
	struct xo_proto_step st[256];
	xo_step_ring_t *ring;
	int n, i;

	if (!xo_machine)
		return;
	while ((n = xo_proto_take_steps(xo_machine, st, 256)) > 0) {
		for (i = 0; i < n; i++) {
			if (st[i].transfer >= XO_STEP_TRANSFERS ||
			    st[i].step >= XO_STEP_KINDS)
				continue;
			ring = &xo_step_rings[st[i].transfer][st[i].step];
			if (!ring->ns) {
				ring->ns = ngx_alloc(XO_STEP_KEEP * sizeof(uint32_t),
						     xo_cycle->log);
				if (!ring->ns)
					return;
			}
			ring->ns[(ring->head + ring->len) % XO_STEP_KEEP] = st[i].ns;
			if (ring->len == XO_STEP_KEEP)
				ring->head = (ring->head + 1) % XO_STEP_KEEP;
			else
				ring->len++;
			ring->seen++;
		}
		if (n < 256)
			break;
	}
}

static int xo_cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static char *ngx_http_xo_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
	ngx_http_core_loc_conf_t *clcf;
	clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
	clcf->handler = ngx_http_xo_status_handler;
	(void)cmd;
	(void)conf;
	return NGX_CONF_OK;
}

/* GET: {"pid", "role", "stats": {...}, "rules", "peers": [...],
 * "steps": {"out.block": {"n", "p50_us", "p99_us", "mean_us"}, ...}};
 * ?reset clears the step samples after the answer. */
static ngx_int_t ngx_http_xo_status_handler(ngx_http_request_t *r)
{
	struct xo_proto_peer_info info;
	struct xo_proto_stats st;
	uint32_t ids[XO_MAX_CTLS], *tmp;
	ngx_uint_t t, k, i, first = 1;
	xo_step_ring_t *ring;
	ngx_chain_t out;
	ngx_buf_t *b;
	const char *name;
	uint64_t sum;
	size_t cap = 16384;
	int npeers, reset;
	u_char *p, *end;

	if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD)))
		return NGX_HTTP_NOT_ALLOWED;
	if (ngx_http_discard_request_body(r) != NGX_OK)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	reset = r->args.len >= 5 && ngx_strnstr(r->args.data, "reset", r->args.len);
	b = ngx_create_temp_buf(r->pool, cap);
	if (!b)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	p = b->pos;
	end = b->end;
	if (!xo_machine) {
		p = ngx_slprintf(p, end, "{\"pid\": %P, \"role\": null}\n", ngx_pid);
		goto send;
	}
	xo_steps_collect();
	xo_proto_get_stats(xo_machine, &st);
	p = ngx_slprintf(p, end, "{\"pid\": %P, \"role\": \"%s\", \"stats\": {"
			 "\"offloads\": %uL, \"rollbacks\": %uL, \"returns\": %uL, "
			 "\"moves\": %uL, \"withdrawn\": %uL, \"adopted\": %uL, "
			 "\"handed_back\": %uL, \"kept\": %uL, \"lost\": %uL, "
			 "\"refused\": %uL, \"violations\": %uL, \"timeouts\": %uL, "
			 "\"rules_expired\": %uL, \"parked_shipped\": %uL, "
			 "\"parked_replayed\": %uL, \"bytes_followed\": %uL, "
			 "\"bytes_missed\": %uL, \"owed_acks\": %uL, \"replays_late\": %uL, \"late_bytes\": %uL, "
			 "\"active\": %uD, \"peers\": %uD}, "
			 "\"rules\": %L, \"peers\": [",
			 ngx_pid, xo_mcf->has_control ? "target" : "host",
			 st.offloads, st.rollbacks, st.returns, st.moves, st.withdrawn,
			 st.adopted, st.handed_back, st.kept, st.lost, st.refused,
			 st.violations, st.timeouts, st.rules_expired,
			 st.parked_shipped, st.parked_replayed, st.bytes_followed,
			 st.bytes_missed, st.owed_acks, st.replays_late, st.late_bytes, st.active, st.peers,
			 (int64_t)xo_steer_count(xo_steer));
	npeers = xo_proto_peers(xo_machine, ids, XO_MAX_CTLS);
	for (i = 0; npeers > 0 && i < (ngx_uint_t)ngx_min(npeers, XO_MAX_CTLS); i++) {
		if (xo_proto_peer_info(xo_machine, ids[i], &info) < 0 || !info.state)
			continue;
		info.name[sizeof(info.name) - 1] = '\0';
		p = ngx_slprintf(p, end, "%s{\"name\": \"%s\", \"up\": %s, "
				 "\"failures\": %uD, \"offloaded\": %uD, \"handed\": %uD}",
				 first ? "" : ", ", info.name,
				 info.state == XO_PEER_UP ? "true" : "false",
				 info.failures, info.offloaded, info.handed);
		first = 0;
	}
	p = ngx_slprintf(p, end, "], \"steps\": {");
	first = 1;
	tmp = ngx_palloc(r->pool, XO_STEP_KEEP * sizeof(uint32_t));
	if (!tmp)
		return NGX_HTTP_INTERNAL_SERVER_ERROR;
	for (t = 0; t < XO_STEP_TRANSFERS; t++) {
		for (k = 0; k < XO_STEP_KINDS; k++) {
			ring = &xo_step_rings[t][k];
			name = xo_proto_step_name((uint32_t)t, (uint32_t)k);
			if (!name || !ring->len)
				continue;
			sum = 0;
			for (i = 0; i < ring->len; i++) {
				tmp[i] = ring->ns[(ring->head + i) % XO_STEP_KEEP];
				sum += tmp[i];
			}
			ngx_qsort(tmp, ring->len, sizeof(uint32_t), xo_cmp_u32);
			p = ngx_slprintf(p, end, "%s\"%s\": {\"n\": %uL, \"kept\": %ui, "
					 "\"p50_us\": %.3f, \"p99_us\": %.3f, "
					 "\"mean_us\": %.3f}", first ? "" : ", ", name,
					 ring->seen, ring->len,
					 (double)tmp[ring->len / 2] / 1000.0,
					 (double)tmp[ngx_min(ring->len - 1,
							     ring->len * 99 / 100)] / 1000.0,
					 (double)sum / (double)ring->len / 1000.0);
			first = 0;
			if (reset) {
				ring->len = ring->head = 0;
				ring->seen = 0;
			}
		}
	}
	p = ngx_slprintf(p, end, "}}\n");
send:
	if (p == end)
		return NGX_HTTP_INTERNAL_SERVER_ERROR; /* did not fit */
	b->last = p;
	b->last_buf = (r == r->main);
	b->last_in_chain = 1;
	r->headers_out.status = NGX_HTTP_OK;
	r->headers_out.content_length_n = b->last - b->pos;
	ngx_str_set(&r->headers_out.content_type, "application/json");
	r->headers_out.content_type_len = r->headers_out.content_type.len;
	if (ngx_http_send_header(r) == NGX_ERROR || r->header_only)
		return NGX_OK;
	out.buf = b;
	out.next = NULL;
	return ngx_http_output_filter(r, &out);
}

/* ---- capabilities ------------------------------------------------------------ */

#ifndef CAP_BPF
#define CAP_BPF 39
#endif

static const int xo_caps[] = { CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF };

static int xo_capget(struct __user_cap_data_struct d[2])
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };

	return (int)syscall(SYS_capget, &h, d);
}

static int xo_has(const struct __user_cap_data_struct d[2], int cap, int eff)
{
	uint32_t set = eff ? d[cap / 32].effective : d[cap / 32].permitted;

	return (set >> (cap % 32)) & 1;
}

/* Workers keep only what the machine needs: TCP_REPAIR (CAP_NET_ADMIN),
 * the steering maps and the replay of parked frames (CAP_BPF,
 * CAP_NET_ADMIN), the client probe's raw socket (CAP_NET_RAW). */
static ngx_int_t xo_worker_caps(ngx_log_t *log)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	ngx_uint_t i;

	if (xo_capget(d) < 0) {
		ngx_log_error(NGX_LOG_EMERG, log, ngx_errno, "xo: capget() failed");
		return NGX_ERROR;
	}
	for (i = 0; i < 2; i++) {
		if (xo_has(d, xo_caps[i == 0 ? 0 : 2], 0))
			continue;
		ngx_log_error(NGX_LOG_EMERG, log, 0,
			      "xo: the worker process lacks %s (TCP_REPAIR and the "
			      "steering maps need CAP_NET_ADMIN and CAP_BPF): start "
			      "nginx as root (workers keep these two through their "
			      "setuid) or give the binary these capabilities",
			      i == 0 ? "CAP_NET_ADMIN" : "CAP_BPF");
		return NGX_ERROR;
	}
	if (geteuid() == 0)
		return NGX_OK;
	{
		uint32_t keep[2] = { 0, 0 };

		for (i = 0; i < sizeof(xo_caps) / sizeof(xo_caps[0]); i++)
			if (xo_has(d, xo_caps[i], 0))
				keep[xo_caps[i] / 32] |= 1u << (xo_caps[i] % 32);
		for (i = 0; i < 2; i++) {
			d[i].effective = keep[i];
			d[i].permitted = keep[i];
			d[i].inheritable = 0;
		}
	}
	if (syscall(SYS_capset, &h, d) < 0) {
		ngx_log_error(NGX_LOG_EMERG, log, ngx_errno, "xo: capset() failed");
		return NGX_ERROR;
	}
	return NGX_OK;
}

/* ---- module start (master) ------------------------------------------------------ */

static ngx_int_t ngx_http_xo_init_module(ngx_cycle_t *cycle)
{
	ngx_http_xo_main_conf_t *mcf;
	struct __user_cap_data_struct d[2];
	struct xo_steer_opts so = { .size = sizeof(so) };
	char obj[PATH_MAX], pin[PATH_MAX], ifname[IF_NAMESIZE], key[sizeof(xo_steer_key)];
	int ifindex;

	mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_xo_module);
	if (!mcf || (!mcf->has_control && !(mcf->targets && mcf->targets->nelts)))
		return NGX_OK;
	if (ngx_test_config)
		return NGX_OK;
	if (xo_capget(d) < 0 || !xo_has(d, CAP_NET_ADMIN, 1) || !xo_has(d, CAP_BPF, 1)) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
			      "xo (%V:%ui): nginx needs CAP_NET_ADMIN and CAP_BPF "
			      "(TCP_REPAIR, the steering maps): start it as root",
			      &mcf->conf_file, mcf->conf_line);
		return NGX_ERROR;
	}
	/* Workers keep their permitted capabilities through setuid; each
	 * drops all but three of them at once (xo_worker_caps). */
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
			      "xo: prctl(PR_SET_KEEPCAPS) failed");
		return NGX_ERROR;
	}
	if (mcf->ifname.len >= IF_NAMESIZE || mcf->bpf_object.len >= PATH_MAX ||
	    mcf->pin_dir.len >= PATH_MAX) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: a path is too long");
		return NGX_ERROR;
	}
	ngx_cpystrn((u_char *)ifname, mcf->ifname.data, mcf->ifname.len + 1);
	ngx_cpystrn((u_char *)obj, mcf->bpf_object.data, mcf->bpf_object.len + 1);
	ngx_cpystrn((u_char *)pin, mcf->pin_dir.data, mcf->pin_dir.len + 1);
	ifindex = (int)if_nametoindex(ifname);
	if (!ifindex) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
			      "xo_interface \"%s\": no such interface", ifname);
		return NGX_ERROR;
	}
	if (mcf->key_file.len >= sizeof(key))
		return NGX_ERROR;
	ngx_cpystrn((u_char *)key, mcf->key_file.data, mcf->key_file.len + 1);
	xo_key_len = xo_key_load(key, xo_key_buf, sizeof(xo_key_buf));
	if (xo_key_len < 0) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo_key: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
	{
		struct ifreq ifr;
		int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

		ngx_memzero(&ifr, sizeof(ifr));
		ngx_cpystrn((u_char *)ifr.ifr_name, (u_char *)ifname, IF_NAMESIZE);
		if (s < 0 || ioctl(s, SIOCGIFHWADDR, &ifr) < 0) {
			ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
				      "xo_interface \"%s\": no MAC address", ifname);
			if (s >= 0)
				close(s);
			return NGX_ERROR;
		}
		close(s);
		ngx_memcpy(xo_if_mac, ifr.ifr_hwaddr.sa_data, 6);
	}
	ngx_snprintf((u_char *)key, sizeof(key), "%s|%s|%s|%d%Z", obj, pin, ifname,
		     ifindex);
	if (xo_steer && !ngx_strcmp(key, xo_steer_key))
		return NGX_OK; /* reload: same steering, workers inherit it */
	so.obj_path = obj;
	so.pin_dir = pin;
	if (xo_steer) {
		/* The maps stay pinned; old workers keep their copies. */
		xo_steer_close(xo_steer, XO_STEER_CLOSE_KEEP_ATTACHED);
		xo_steer = NULL;
	}
	if (xo_steer_open(&so, &xo_steer)) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: steering (%s, %s): %s",
			      obj, pin, xo_last_error());
		xo_steer = NULL;
		return NGX_ERROR;
	}
	if (xo_steer_attach(xo_steer, ifindex, XO_PROG_TC_INGRESS, NULL) ||
	    xo_steer_attach(xo_steer, ifindex, XO_PROG_TC_EGRESS, NULL)) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
			      "xo: attach to %s: %s", ifname, xo_last_error());
		xo_steer_close(xo_steer, 0);
		xo_steer = NULL;
		return NGX_ERROR;
	}
	xo_steer_ifindex = ifindex;
	ngx_cpystrn((u_char *)xo_steer_key, (u_char *)key, sizeof(xo_steer_key));
	return NGX_OK;
}

/* ---- control connections -------------------------------------------------------- */

static xo_ctl_t *xo_ctl_by_peer(uint32_t peer)
{
	ngx_uint_t i;

	for (i = 0; i < XO_MAX_CTLS; i++)
		if (xo_ctls[i].c && xo_ctls[i].peer == peer && peer)
			return &xo_ctls[i];
	return NULL;
}

static void xo_ctl_drop(xo_ctl_t *k)
{
	ngx_pool_t *pool;

	if (k->c) {
		pool = k->c->pool;
		ngx_close_connection(k->c);
		if (pool)
			ngx_destroy_pool(pool);
	}
	k->c = NULL;
	k->peer = 0;
	k->up = 0;
	k->connecting = 0;
	k->adopted = 0;
	k->retry_at = ngx_current_msec + 1000;
}

static void xo_ctl_flush(xo_ctl_t *k)
{
	const uint8_t *buf;
	size_t len;
	ssize_t n;

	while (k->c && k->peer && !k->connecting &&
	       !xo_proto_peer_output(xo_machine, k->peer, &buf, &len) && len) {
		n = send(k->c->fd, buf, len, MSG_NOSIGNAL);
		if (n <= 0)
			return; /* EAGAIN: the next EPOLLOUT edge; errors show on read */
		xo_proto_peer_sent(xo_machine, k->peer, (size_t)n, xo_now());
	}
}

static void xo_ctl_read(ngx_event_t *rev)
{
	ngx_connection_t *c = rev->data;
	xo_ctl_t *k = c->data;
	uint8_t buf[65536];
	uint32_t peer;
	ssize_t n;

	if (k->connecting || !k->peer)
		return;
	peer = k->peer;
	for (;;) {
		n = recv(c->fd, buf, sizeof(buf), 0);
		if (n < 0 && (ngx_socket_errno == NGX_EAGAIN ||
			      ngx_socket_errno == NGX_EINTR))
			break;
		if (n <= 0) {
			ngx_log_error(NGX_LOG_INFO, c->log, n < 0 ? ngx_socket_errno : 0,
				      "xo: control connection closed");
			xo_proto_peer_closed(xo_machine, peer, xo_now());
			xo_ctl_drop(k);
			break;
		}
		xo_proto_peer_input(xo_machine, peer, buf, (size_t)n, xo_now());
		if (k->peer != peer || !k->c)
			break;
	}
	xo_pump();
}

static int xo_arp_mac(const ngx_url_t *u, u_char *mac)
{
	char line[256], ip[64], hw[64], want[64];
	struct sockaddr_in *sin = (struct sockaddr_in *)u->addrs[0].sockaddr;
	FILE *f;
	int found = -1;

	if (sin->sin_family != AF_INET ||
	    !inet_ntop(AF_INET, &sin->sin_addr, want, sizeof(want)))
		return -1;
	f = fopen("/proc/net/arp", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%63s %*s %*s %63s", ip, hw) == 2 &&
		    !strcmp(ip, want) &&
		    !xo_parse_mac((u_char *)hw, strlen(hw), mac) &&
		    strcmp(hw, "00:00:00:00:00:00")) {
			found = 0;
			break;
		}
	fclose(f);
	return found;
}

static void xo_ctl_connected(xo_ctl_t *k)
{
	ngx_http_xo_target_t *t = (ngx_http_xo_target_t *)xo_mcf->targets->elts +
				  k->target;
	struct xo_proto_peer_opts o = { .size = sizeof(o) };
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(k->c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = ngx_socket_errno;
	if (err) {
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, err,
			      "xo: connect to target %V (%V)", &t->name, &t->url.url);
		xo_ctl_drop(k);
		return;
	}
	k->connecting = 0;
	if (t->has_mac)
		ngx_memcpy(o.mac, t->mac, 6);
	else if (xo_arp_mac(&t->url, o.mac)) {
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: target %V: no MAC address in the neighbour "
			      "table; give mac= in xo_target", &t->name);
		xo_ctl_drop(k);
		return;
	}
	if (xo_endpoint_from_sockaddr((struct sockaddr_storage *)t->url.addrs[0].sockaddr,
				      t->url.addrs[0].socklen, &o.addr)) {
		xo_ctl_drop(k);
		return;
	}
	ngx_memcpy(o.name, t->name.data, t->name.len);
	if (xo_ctl_sock_setup(k->c->fd, 0) ||
	    xo_proto_peer_add(xo_machine, &o, xo_now(), &k->peer)) {
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: target %V: %s", &t->name, xo_last_error());
		k->peer = 0;
		xo_ctl_drop(k);
		return;
	}
}

static void xo_ctl_write(ngx_event_t *wev)
{
	ngx_connection_t *c = wev->data;
	xo_ctl_t *k = c->data;

	if (k->connecting) {
		xo_ctl_connected(k);
		if (k->c && k->peer)
			xo_ctl_read(k->c->read); /* bytes may have come already */
		else
			xo_pump();
		return;
	}
	xo_ctl_flush(k);
	xo_pump();
}

static void xo_ctl_connect(xo_ctl_t *k)
{
	ngx_http_xo_target_t *t = (ngx_http_xo_target_t *)xo_mcf->targets->elts +
				  k->target;
	ngx_connection_t *c;
	ngx_socket_t fd;

	fd = ngx_socket(t->url.addrs[0].sockaddr->sa_family, SOCK_STREAM, 0);
	if (fd == (ngx_socket_t)-1) {
		ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, ngx_socket_errno,
			      "xo: socket() for target %V", &t->name);
		k->retry_at = ngx_current_msec + 1000;
		return;
	}
	if (ngx_nonblocking(fd) == -1 || fcntl(fd, F_SETFD, FD_CLOEXEC) == -1) {
		ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, ngx_socket_errno,
			      "xo: nonblocking/cloexec for target %V", &t->name);
		ngx_close_socket(fd);
		k->retry_at = ngx_current_msec + 1000;
		return;
	}
	c = ngx_get_connection(fd, xo_cycle->log);
	if (!c) {
		ngx_close_socket(fd);
		k->retry_at = ngx_current_msec + 1000;
		return;
	}
	c->data = k;
	c->read->handler = xo_ctl_read;
	c->write->handler = xo_ctl_write;
	c->read->log = c->write->log = c->log;
	k->c = c;
	k->connecting = 1;
	if (ngx_add_conn(c) != NGX_OK) {
		xo_ctl_drop(k);
		return;
	}
	if (connect(fd, t->url.addrs[0].sockaddr, t->url.addrs[0].socklen) == 0) {
		xo_ctl_write(c->write);
		return;
	}
	if (ngx_socket_errno != NGX_EINPROGRESS) {
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, ngx_socket_errno,
			      "xo: connect to target %V (%V)", &t->name, &t->url.url);
		xo_ctl_drop(k);
	}
}

/* Target: a host's control connection arrived on the xo_control listener. */
static void xo_ctl_accept(ngx_connection_t *c)
{
	struct xo_proto_peer_opts o = { .size = sizeof(o) };
	xo_ctl_t *k = NULL;
	uint32_t peer = 0;
	ngx_uint_t i;

	for (i = 0; i < XO_MAX_CTLS; i++)
		if (!xo_ctls[i].c) {
			k = &xo_ctls[i];
			break;
		}
	if (!xo_machine || !k || ngx_exiting ||
	    xo_endpoint_from_sockaddr((struct sockaddr_storage *)c->sockaddr,
				      c->socklen, &o.addr) ||
	    xo_ctl_sock_setup(c->fd, 0) ||
	    xo_proto_peer_add(xo_machine, &o, xo_now(), &peer)) {
		ngx_log_error(NGX_LOG_WARN, c->log, 0,
			      "xo: control connection from %V refused: %s",
			      &c->addr_text, xo_machine ? xo_last_error() :
							  "no protocol machine");
		ngx_close_connection(c);
		ngx_destroy_pool(c->pool);
		return;
	}
	ngx_memzero(k, sizeof(*k));
	k->c = c;
	k->peer = peer;
	k->target = -1;
	c->data = k;
	c->read->handler = xo_ctl_read;
	c->write->handler = xo_ctl_write;
	if (ngx_add_conn(c) != NGX_OK) {
		xo_proto_peer_closed(xo_machine, k->peer, xo_now());
		xo_ctl_drop(k);
		return;
	}
	xo_ctl_read(c->read);
}

static ssize_t xo_replay_recv(ngx_connection_t *c, u_char *buf, size_t size);

/* ---- TLS: sessions of `ssl` listeners, continued by the core's record layer -------- */

/*
 * Front: OpenSSL keeps the session until a request is handed off. Two
 * OpenSSL callbacks on every server's SSL_CTX record, per SSL object (ex
 * data), what the handoff needs: the key log callback the TLS 1.3 traffic
 * secrets (TLS 1.2 needs none: the master secret and both randoms come
 * from the API), and the message callback the records each way since the
 * Finished message of that direction (SSL3_RT_HEADER is reported once per
 * record OpenSSL writes or starts to read, so a record OpenSSL read only
 * in part is counted too, and SSL_has_pending() then refuses the handoff).
 * The message callback sees the records OpenSSL itself frames, whatever
 * BIO nginx gives it; a BIO filter would have to parse the stream again.
 * A second Finished (renegotiation), a KeyUpdate or a HelloRequest marks
 * the session as one the core cannot carry.
 *
 * Whoever continues the session without OpenSSL (a target, or the front
 * once the connection came back) serves it through a xo_tls_stream
 * (xo_core/src/tls_stream.c) behind the connection's own recv, send,
 * send_chain and recv_chain; nginx sees a plain connection.
 */

typedef struct {
	struct xo_tls_stream *s;
	size_t pending;    /* plaintext sealed whose ciphertext is not all sent:
			    * reported sent once it is (as SSL_write does) */
} xo_tls_conn_t;

static xo_tls_conn_t *xo_tls_conns;     /* per connection slot */

static xo_tls_conn_t *xo_tls_slot(ngx_connection_t *c)
{
	ngx_uint_t i;

	if (!xo_tls_conns || !xo_cycle)
		return NULL;
	i = (ngx_uint_t)(c - xo_cycle->connections);
	return i < xo_nconns && xo_tls_conns[i].s ? &xo_tls_conns[i] : NULL;
}

static ngx_int_t xo_tls_flush(ngx_connection_t *c, xo_tls_conn_t *t)
{
	const uint8_t *p;
	ngx_err_t err;
	size_t len;
	ssize_t n;

	for (;;) {
		p = xo_tls_stream_out(t->s, &len);
		if (!len)
			return NGX_OK;
		n = send(c->fd, p, len, 0);
		if (n > 0) {
			xo_tls_stream_sent(t->s, (size_t)n);
			continue;
		}
		err = ngx_socket_errno;
		if (n < 0 && err == NGX_EINTR)
			continue;
		if (n < 0 && err == NGX_EAGAIN) {
			c->write->ready = 0;
			return NGX_AGAIN;
		}
		c->write->error = 1;
		ngx_connection_error(c, err, "send() failed (TLS record layer)");
		return NGX_ERROR;
	}
}

static ssize_t xo_tls_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
	xo_tls_conn_t *t = xo_tls_slot(c);
	ngx_err_t err;
	uint8_t *p;
	size_t room;
	ssize_t got;
	int64_t n;
	int closed;

	if (!t)
		return NGX_ERROR;
	for (;;) {
		n = xo_tls_stream_read(t->s, buf, size, &closed);
		if (n > 0)
			return (ssize_t)n;
		if (n < 0) {
			ngx_log_error(NGX_LOG_INFO, c->log, 0, "xo: TLS: %s",
				      xo_last_error());
			c->read->error = 1;
			return NGX_ERROR;
		}
		if (closed) {
			c->read->ready = 0;
			c->read->eof = 1;
			return 0;
		}
		p = xo_tls_stream_in_space(t->s, &room);
		if (!room) {
			ngx_log_error(NGX_LOG_ALERT, c->log, 0,
				      "xo: TLS record stream has no room for input");
			c->read->error = 1;
			return NGX_ERROR;
		}
		got = recv(c->fd, p, room, 0);
		if (got > 0) {
			xo_tls_stream_in_commit(t->s, (size_t)got);
			continue;
		}
		if (got == 0) {
			c->read->ready = 0;
			c->read->eof = 1;
			return 0;
		}
		err = ngx_socket_errno;
		if (err == NGX_EINTR)
			continue;
		if (err == NGX_EAGAIN) {
			c->read->ready = 0;
			return NGX_AGAIN;
		}
		c->read->error = 1;
		ngx_connection_error(c, err, "recv() failed (TLS record layer)");
		return NGX_ERROR;
	}
}

static ssize_t xo_tls_recv_chain(ngx_connection_t *c, ngx_chain_t *cl, off_t limit)
{
	ssize_t n, total = 0;
	size_t size;

	for (; cl; cl = cl->next) {
		size = (size_t)(cl->buf->end - cl->buf->last);
		if (limit && (off_t)size > limit - total)
			size = (size_t)(limit - total);
		if (!size)
			break;
		n = xo_tls_recv(c, cl->buf->last, size);
		if (n <= 0)
			return total ? total : n;
		cl->buf->last += n;
		total += n;
		if ((size_t)n < size)
			break;
	}
	return total;
}

/* Like SSL_write: bytes are reported sent once their records all left. */
static ssize_t xo_tls_send(ngx_connection_t *c, u_char *buf, size_t size)
{
	xo_tls_conn_t *t = xo_tls_slot(c);
	ngx_int_t rc;
	int64_t n;

	if (!t)
		return NGX_ERROR;
	rc = xo_tls_flush(c, t);
	if (rc != NGX_OK)
		return rc;
	if (!t->pending) {
		n = xo_tls_stream_write(t->s, buf, size);
		if (n < 0) {
			ngx_log_error(NGX_LOG_ALERT, c->log, 0, "xo: TLS: %s",
				      xo_last_error());
			c->write->error = 1;
			return NGX_ERROR;
		}
		t->pending = (size_t)n;
		rc = xo_tls_flush(c, t);
		if (rc != NGX_OK)
			return rc;
	}
	n = (int64_t)ngx_min(t->pending, size);
	t->pending -= (size_t)n;
	c->sent += n;
	return (ssize_t)n;
}

/* Memory buffers and file buffers (read here: nginx may ask for sendfile,
 * which the record layer cannot use) sealed into records. */
static ngx_chain_t *xo_tls_send_chain(ngx_connection_t *c, ngx_chain_t *in,
				      off_t limit)
{
	xo_tls_conn_t *t = xo_tls_slot(c);
	u_char fbuf[XO_TLS_MAX_PLAINTEXT];
	off_t sent = 0, size;
	ngx_buf_t *b;
	ngx_int_t rc;
	ssize_t rd;
	int64_t n;

	if (!t)
		return NGX_CHAIN_ERROR;
	if (limit == 0 || limit > (off_t)(NGX_MAX_SIZE_T_VALUE - ngx_pagesize))
		limit = NGX_MAX_SIZE_T_VALUE - ngx_pagesize;
	for (;;) {
		rc = xo_tls_flush(c, t);
		if (rc == NGX_ERROR)
			return NGX_CHAIN_ERROR;
		if (rc == NGX_AGAIN)
			return in;
		if (t->pending) {
			c->sent += (off_t)t->pending;
			sent += (off_t)t->pending;
			in = ngx_chain_update_sent(in, (off_t)t->pending);
			t->pending = 0;
		}
		in = ngx_chain_update_sent(in, 0); /* past special buffers */
		if (!in || sent >= limit)
			return in;
		b = in->buf;
		size = ngx_buf_size(b);
		if (!size) {
			in = in->next;
			continue;
		}
		if (size > limit - sent)
			size = limit - sent;
		if (ngx_buf_in_memory(b)) {
			n = xo_tls_stream_write(t->s, b->pos, (size_t)size);
		} else if (b->in_file) {
			if (size > (off_t)sizeof(fbuf))
				size = sizeof(fbuf);
			do
				rd = pread(b->file->fd, fbuf, (size_t)size, b->file_pos);
			while (rd < 0 && ngx_errno == NGX_EINTR);
			if (rd <= 0) {
				ngx_log_error(NGX_LOG_ALERT, c->log, rd < 0 ? ngx_errno : 0,
					      "xo: pread() of \"%V\" for the TLS record "
					      "layer%s", &b->file->name,
					      rd ? " failed" : ": file truncated");
				return NGX_CHAIN_ERROR;
			}
			n = xo_tls_stream_write(t->s, fbuf, (size_t)rd);
			ngx_explicit_memzero(fbuf, (size_t)rd);
		} else {
			ngx_log_error(NGX_LOG_ALERT, c->log, 0,
				      "xo: a buffer neither in memory nor in a file");
			return NGX_CHAIN_ERROR;
		}
		if (n <= 0) {
			ngx_log_error(NGX_LOG_ALERT, c->log, 0, "xo: TLS: %s",
				      n ? xo_last_error() : "no room");
			return NGX_CHAIN_ERROR;
		}
		t->pending = (size_t)n;
	}
}

static void xo_tls_cleanup(void *data)
{
	xo_tls_conn_t *t = data;

	xo_tls_stream_free(t->s);
	t->s = NULL;
	t->pending = 0;
}

/* The connection continues the session from tls (an ADOPTED or RETURNED
 * event's record state) through the record layer. */
static ngx_int_t xo_tls_attach(ngx_connection_t *c, const struct xo_tls_state *tls)
{
	ngx_uint_t i = (ngx_uint_t)(c - xo_cycle->connections);
	ngx_pool_cleanup_t *cln;
	xo_tls_conn_t *t;

	if (!xo_tls_conns || i >= xo_nconns)
		return NGX_ERROR;
	t = &xo_tls_conns[i];
	if (t->s) { /* a previous connection's, never freed: should not be */
		xo_tls_stream_free(t->s);
		t->s = NULL;
	}
	cln = ngx_pool_cleanup_add(c->pool, 0);
	if (!cln)
		return NGX_ERROR;
	if (xo_tls_stream_new(tls, &t->s)) {
		ngx_log_error(NGX_LOG_ALERT, c->log, 0, "xo: TLS record layer: %s",
			      xo_last_error());
		t->s = NULL;
		return NGX_ERROR;
	}
	t->pending = 0;
	cln->handler = xo_tls_cleanup;
	cln->data = t;
	if (c->recv != xo_replay_recv)
		c->recv = xo_tls_recv;
	c->send = xo_tls_send;
	c->recv_chain = xo_tls_recv_chain;
	c->send_chain = xo_tls_send_chain;
	c->sendfile = 0;
	return NGX_OK;
}

/* The listener's handler (ngx_http_init_connection) for a connection whose
 * session the record layer continues: on an `ssl` (or `http2`) listener it
 * would start a handshake; the listener's address configurations say
 * plain HTTP/1 for the length of the call (one event loop: nothing else
 * runs meanwhile). */
static ngx_int_t xo_tls_init_connection(ngx_listening_t *ls, ngx_connection_t *c)
{
#if (NGX_HTTP_SSL)
	ngx_http_port_t *port = ls->servers;
	ngx_http_addr_conf_t *acs[64];
	ngx_http_ssl_srv_conf_t *sscf;
	u_char saved[64];
	ngx_uint_t i, n;

	n = port ? port->naddrs : 0;
	if (n > 64) {
		ngx_log_error(NGX_LOG_ALERT, c->log, 0,
			      "xo: a listener with over 64 addresses");
		return NGX_ERROR;
	}
	for (i = 0; i < n; i++) {
		if (ls->sockaddr->sa_family == AF_INET)
			acs[i] = &((ngx_http_in_addr_t *)port->addrs)[i].conf;
#if (NGX_HAVE_INET6)
		else if (ls->sockaddr->sa_family == AF_INET6)
			acs[i] = &((ngx_http_in6_addr_t *)port->addrs)[i].conf;
#endif
		else
			return NGX_ERROR;
		sscf = ngx_http_get_module_srv_conf(acs[i]->default_server->ctx,
						    ngx_http_ssl_module);
		saved[i] = (u_char)(acs[i]->ssl | (sscf->enable ? 2 : 0));
#if (NGX_HTTP_V2)
		saved[i] |= acs[i]->http2 ? 4 : 0;
		acs[i]->http2 = 0;
#endif
		acs[i]->ssl = 0;
		sscf->enable = 0;
	}
	ls->handler(c);
	for (i = 0; i < n; i++) {
		sscf = ngx_http_get_module_srv_conf(acs[i]->default_server->ctx,
						    ngx_http_ssl_module);
		acs[i]->ssl = saved[i] & 1;
		sscf->enable = (saved[i] & 2) ? 1 : 0;
#if (NGX_HTTP_V2)
		acs[i]->http2 = (saved[i] & 4) ? 1 : 0;
#endif
	}
#else
	ls->handler(c);
#endif
	return NGX_OK;
}

#if (NGX_HTTP_SSL)
typedef struct {
	u_char cts[48], sts[48];   /* TLS 1.3 client/server traffic secret 0 */
	size_t cts_len, sts_len;
	uint64_t tx, rx;           /* records since that direction's Finished */
	unsigned tx_on:1;
	unsigned rx_on:1;
	unsigned bad:1;            /* renegotiated, key update: not carried */
} xo_ssl_keys_t;

static int xo_ssl_idx = -1;

static void xo_ssl_keys_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad,
			     int idx, long argl, void *argp)
{
	(void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
	if (ptr)
		OPENSSL_clear_free(ptr, sizeof(xo_ssl_keys_t));
}

static xo_ssl_keys_t *xo_ssl_keys(const SSL *ssl)
{
	xo_ssl_keys_t *k;

	if (xo_ssl_idx < 0)
		return NULL;
	k = SSL_get_ex_data(ssl, xo_ssl_idx);
	if (k)
		return k;
	k = OPENSSL_zalloc(sizeof(*k));
	if (k && !SSL_set_ex_data((SSL *)ssl, xo_ssl_idx, k)) {
		OPENSSL_free(k);
		k = NULL;
	}
	return k;
}

static size_t xo_unhex(const char *s, u_char *out, size_t cap)
{
	size_t n = 0;
	int hi, lo;

	while (s[0] && s[1] && s[0] != ' ' && n < cap) {
		hi = ngx_hextoi((u_char *)s, 1);
		lo = ngx_hextoi((u_char *)s + 1, 1);
		if (hi < 0 || lo < 0)
			return 0;
		out[n++] = (u_char)(hi << 4 | lo);
		s += 2;
	}
	return s[0] && s[0] != ' ' ? 0 : n; /* too long or odd: none */
}

/* "LABEL <client random> <secret>": the TLS 1.3 application secrets. */
static void xo_ssl_keylog(const SSL *ssl, const char *line)
{
	xo_ssl_keys_t *k;
	const char *sp;
	ngx_uint_t client;

	if (!ngx_strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24))
		client = 1;
	else if (!ngx_strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24))
		client = 0;
	else
		return;
	k = xo_ssl_keys(ssl);
	sp = strchr(line + 24, ' ');
	if (!k || !sp)
		return;
	if (client)
		k->cts_len = xo_unhex(sp + 1, k->cts, sizeof(k->cts));
	else
		k->sts_len = xo_unhex(sp + 1, k->sts, sizeof(k->sts));
}

static void xo_ssl_msg(int write_p, int version, int content_type,
		       const void *buf, size_t len, SSL *ssl, void *arg)
{
	const u_char *p = buf;
	xo_ssl_keys_t *k;

	(void)version;
	(void)arg;
	if (content_type == SSL3_RT_HEADER) {
		k = xo_ssl_idx >= 0 ? SSL_get_ex_data(ssl, xo_ssl_idx) : NULL;
		if (k && write_p && k->tx_on)
			k->tx++;
		else if (k && !write_p && k->rx_on)
			k->rx++;
		return;
	}
	if (content_type != SSL3_RT_HANDSHAKE || len < 1)
		return;
	k = xo_ssl_keys(ssl);
	if (!k)
		return;
	switch (p[0]) {
	case SSL3_MT_FINISHED:
		if (write_p) {
			k->bad |= k->tx_on;
			k->tx_on = 1;
			k->tx = 0;
		} else {
			k->bad |= k->rx_on;
			k->rx_on = 1;
			k->rx = 0;
		}
		break;
	case SSL3_MT_KEY_UPDATE:
	case SSL3_MT_HELLO_REQUEST:
		k->bad = 1;
		break;
	case SSL3_MT_CLIENT_HELLO:
		k->bad |= k->rx_on;
		break;
	default:
		break;
	}
}

/* The core's cipher for an IANA suite id, 0 when it carries none. */
static uint16_t xo_ssl_cipher(const SSL *ssl)
{
	const SSL_CIPHER *ci = SSL_get_current_cipher(ssl);

	switch (ci ? SSL_CIPHER_get_protocol_id(ci) : 0) {
	case 0x1301: case 0xc02b: case 0xc02f: case 0x009e: case 0x009c:
		return XO_TLS_AES_GCM_128;
	case 0x1302: case 0xc02c: case 0xc030: case 0x009f: case 0x009d:
		return XO_TLS_AES_GCM_256;
	case 0x1303: case 0xcca8: case 0xcca9: case 0xccaa:
		return XO_TLS_CHACHA20_POLY1305;
	default:
		return 0;
	}
}

/* OpenSSL's session as a record state, when it is at a record boundary
 * with nothing pending either way; NGX_DECLINED (why at debug level)
 * otherwise. */
static ngx_int_t xo_ssl_state(ngx_connection_t *c, struct xo_tls_state *st)
{
	SSL *ssl = c->ssl->connection;
	u_char master[48], cr[32], sr[32];
	const char *why = NULL;
	xo_ssl_keys_t *k;
	uint16_t cipher;
	size_t mlen;
	int ret = -1;

	k = xo_ssl_idx >= 0 ? SSL_get_ex_data(ssl, xo_ssl_idx) : NULL;
	cipher = xo_ssl_cipher(ssl);
	if (!k || !k->tx_on || !k->rx_on)
		why = "no record count (handshake not seen)";
	else if (k->bad)
		why = "renegotiated or key update";
	else if (!cipher)
		why = "a cipher suite the core does not carry";
	/* OpenSSL may have taken the next record's 5-byte header off the
	 * socket and counted the record already (it waits for the body):
	 * SSL_has_pending() says nothing then, its read state does ("RH":
	 * waiting for a header). */
	else if (SSL_has_pending(ssl) || SSL_want_write(ssl) ||
		 ngx_strcmp(SSL_rstate_string(ssl), "RH") != 0 ||
		 c->ssl->in_early || c->ssl->write_blocked ||
		 (c->ssl->buf && ngx_buf_size(c->ssl->buf)))
		why = "not at a record boundary";
	if (why)
		goto out;
	if (SSL_version(ssl) == TLS1_3_VERSION) {
		if (!k->cts_len || k->cts_len != k->sts_len) {
			why = "no TLS 1.3 traffic secrets in the key log";
			goto out;
		}
		ret = xo_tls13_state(cipher, k->cts, k->sts, (uint32_t)k->cts_len, 1,
				     k->tx, k->rx, st);
	} else if (SSL_version(ssl) == TLS1_2_VERSION) {
		mlen = SSL_SESSION_get_master_key(SSL_get_session(ssl), master,
						  sizeof(master));
		if (mlen != sizeof(master) ||
		    SSL_get_client_random(ssl, cr, sizeof(cr)) != sizeof(cr) ||
		    SSL_get_server_random(ssl, sr, sizeof(sr)) != sizeof(sr)) {
			why = "no TLS 1.2 master secret";
			goto out;
		}
		ret = xo_tls12_state(cipher, master, sizeof(master), cr, sr, 1,
				     1 + k->tx, 1 + k->rx, st);
		ngx_explicit_memzero(master, sizeof(master));
	} else {
		why = "a TLS version the core does not carry";
		goto out;
	}
	if (ret)
		why = xo_last_error();
out:
	ngx_explicit_memzero(master, sizeof(master));
	if (why) {
		ngx_log_error(NGX_LOG_INFO, c->log, 0,
			      "xo: TLS session served here: %s", why);
		return NGX_DECLINED;
	}
	return NGX_OK;
}
#endif

/* The record state to hand off with a front's connection: *tls = 0 for a
 * plain one; NGX_DECLINED when its session cannot move now. */
static ngx_int_t xo_tls_offload_state(ngx_connection_t *c, struct xo_tls_state *st,
				      ngx_uint_t *tls)
{
	xo_tls_conn_t *t = xo_tls_slot(c);

	*tls = 0;
	if (t) {
		*tls = 1;
		if (t->pending || xo_tls_stream_get_state(t->s, st)) {
			ngx_log_error(NGX_LOG_INFO, c->log, 0,
				      "xo: TLS session served here: %s",
				      t->pending ? "records not all sent" :
						   xo_last_error());
			return NGX_DECLINED;
		}
		return NGX_OK;
	}
#if (NGX_HTTP_SSL)
	if (c->ssl) {
		*tls = 1;
		return xo_ssl_state(c, st);
	}
#endif
	return NGX_OK;
}

/* Does the socket carry kernel TLS (restored with its session where the
 * kernel has TLS)? Then recv/send are plaintext already. */
static ngx_uint_t xo_fd_ktls(int fd)
{
	char ulp[16] = "";
	socklen_t len = sizeof(ulp) - 1;

	return getsockopt(fd, IPPROTO_TCP, TCP_ULP, ulp, &len) == 0 &&
	       !ngx_strcmp(ulp, "tls");
}

/* Handed off: nginx frees its SSL object without a close_notify. */
static void xo_tls_silence(ngx_connection_t *c)
{
#if (NGX_HTTP_SSL)
	if (c->ssl) {
		c->ssl->no_wait_shutdown = 1;
		c->ssl->no_send_shutdown = 1;
	}
#endif
}

/* Front: every server's SSL_CTX reports secrets and records (above). */
static ngx_int_t xo_tls_hook_servers(ngx_conf_t *cf)
{
#if (NGX_HTTP_SSL)
	ngx_http_core_main_conf_t *cmcf;
	ngx_http_core_srv_conf_t **cscfp;
	ngx_http_ssl_srv_conf_t *sscf;
	ngx_uint_t i;

	if (xo_ssl_idx < 0) {
		xo_ssl_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL,
						  xo_ssl_keys_free);
		if (xo_ssl_idx < 0) {
			ngx_ssl_error(NGX_LOG_EMERG, cf->log, 0,
				      "xo: SSL_get_ex_new_index() failed");
			return NGX_ERROR;
		}
	}
	cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
	cscfp = cmcf->servers.elts;
	for (i = 0; i < cmcf->servers.nelts; i++) {
		sscf = cscfp[i]->ctx->srv_conf[ngx_http_ssl_module.ctx_index];
		if (!sscf || !sscf->ssl.ctx)
			continue;
		SSL_CTX_set_keylog_callback(sscf->ssl.ctx, xo_ssl_keylog);
		SSL_CTX_set_msg_callback(sscf->ssl.ctx, xo_ssl_msg);
	}
#endif
	return NGX_OK;
}

/* Target: hand back, with the record layer's state for a TLS session. */
/*
 * Target: a socket with kernel TLS moves only with nothing queued (the
 * kernel's record numbers must match the stream). Read what the client sent
 * since the response - whole records, decrypted by the kernel - so it goes
 * along as already-read bytes. NGX_AGAIN: part of a record is still queued
 * (the rest is on its way); NGX_ERROR: not now (a record that is not data,
 * too much, no memory) - the capture then refuses and nginx keeps serving.
 */
static ngx_int_t xo_ktls_take_pending(ngx_connection_t *c, xo_conn_t *xc)
{
	int inq = 0;
	ssize_t n;
	u_char *nb;
	size_t cap;

	for (;;) {
		if (xc->ktls_len == xc->ktls_cap) {
			cap = xc->ktls_cap ? 2 * xc->ktls_cap : 16384;
			if (cap > XO_MAX_APP_BYTES)
				return NGX_ERROR;
			nb = ngx_alloc(cap, c->log);
			if (!nb)
				return NGX_ERROR;
			if (xc->ktls_len)
				ngx_memcpy(nb, xc->ktls_in, xc->ktls_len);
			if (xc->ktls_in)
				ngx_free(xc->ktls_in);
			xc->ktls_in = nb;
			xc->ktls_cap = cap;
		}
		n = recv(c->fd, xc->ktls_in + xc->ktls_len,
			 xc->ktls_cap - xc->ktls_len, MSG_DONTWAIT);
		if (n > 0) {
			xc->ktls_len += (size_t)n;
			continue;
		}
		if (n == 0)
			return NGX_OK; /* the client closed: the capture says so */
		if (ngx_errno == NGX_EINTR)
			continue;
		if (ngx_errno == NGX_EAGAIN)
			break;
		ngx_log_error(NGX_LOG_INFO, c->log, ngx_errno,
			      "xo: reading a kernel-TLS socket before its hand-back");
		return NGX_ERROR;
	}
	if (ioctl(c->fd, FIONREAD, &inq) < 0) {
		ngx_log_error(NGX_LOG_ALERT, c->log, ngx_errno,
			      "xo: ioctl(FIONREAD) on a kernel-TLS socket");
		return NGX_ERROR;
	}
	return inq ? NGX_AGAIN : NGX_OK;
}

/* Hand-back not taken: what was read off the kTLS socket is nginx's to
 * read first. */
static void xo_ktls_give_back(ngx_connection_t *c, xo_conn_t *xc)
{
	if (!xc->ktls_len) {
		if (xc->ktls_in)
			ngx_free(xc->ktls_in);
	} else {
		xc->replay = xc->ktls_in;
		xc->replay_len = xc->ktls_len;
		xc->replay_off = 0;
		c->recv = xo_replay_recv;
	}
	xc->ktls_in = NULL;
	xc->ktls_len = xc->ktls_cap = 0;
}

static int xo_tls_hand_back(ngx_connection_t *c, xo_conn_t *xc)
{
	xo_tls_conn_t *t = xo_tls_slot(c);
	struct xo_tls_state st;
	int ret;

	if (!t)
		return xo_proto_hand_back(xo_machine, xc->conn, xc->ktls_in,
					  (uint32_t)xc->ktls_len, xo_now());
	if (xo_tls_stream_get_state(t->s, &st))
		return -1;
	ret = xo_proto_hand_back_tls(xo_machine, xc->conn, NULL, 0, &st, xo_now());
	ngx_explicit_memzero(&st, sizeof(st));
	return ret;
}

/* ---- adopting a socket as an HTTP connection -------------------------------------------- */

static ssize_t xo_replay_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
	xo_conn_t *xc = xo_conn_of(c);
	size_t n;

	if (!xc || xc->replay_off >= xc->replay_len) {
		c->recv = xo_tls_slot(c) ? xo_tls_recv : ngx_recv;
		return c->recv(c, buf, size);
	}
	n = ngx_min(size, xc->replay_len - xc->replay_off);
	ngx_memcpy(buf, xc->replay + xc->replay_off, n);
	xc->replay_off += n;
	if (xc->replay_off == xc->replay_len) {
		c->recv = xo_tls_slot(c) ? xo_tls_recv : ngx_recv;
		ngx_free(xc->replay);
		xc->replay = NULL;
		xc->replay_len = xc->replay_off = 0;
	}
	c->read->ready = 1; /* the socket may hold more */
	return (ssize_t)n;
}

static void xo_conn_cleanup(void *data);

/* What ngx_event_accept() does for a new socket, then the listener's
 * handler: the HTTP request phases take it from there. A target's
 * connection (`target`) knows its machine id and peer before the handler
 * runs: the handler may serve the request and close the connection at
 * once, and its cleanup must then close that id in the machine. */
static ngx_connection_t *xo_adopt(ngx_listening_t *ls, int fd, const uint8_t *data,
				  size_t len, ngx_uint_t target,
				  const struct xo_tls_state *tls, uint64_t conn,
				  uint32_t peer)
{
	struct sockaddr_storage ss;
	socklen_t slen = sizeof(ss);
	ngx_connection_t *c;
	ngx_pool_cleanup_t *cln;
	ngx_log_t *log;
	xo_conn_t *xc = NULL;

	if (getpeername(fd, (struct sockaddr *)&ss, &slen) < 0) {
		ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, ngx_socket_errno,
			      "xo: getpeername() of an adopted socket");
		return NULL;
	}
	if (ngx_nonblocking(fd) == -1) {
		ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, ngx_socket_errno,
			      "xo: nonblocking an adopted socket");
		return NULL;
	}
	/* (Leaving TCP_REPAIR cleared SO_REUSEADDR; xo_tcp_resume sets it
	 * again, so a restarted nginx can bind while this connection lives.) */
	c = ngx_get_connection(fd, xo_cycle->log);
	if (!c)
		return NULL;
	c->type = SOCK_STREAM;
	c->pool = ngx_create_pool(ls->pool_size, xo_cycle->log);
	if (!c->pool)
		goto fail;
	c->sockaddr = ngx_palloc(c->pool, slen);
	log = ngx_palloc(c->pool, sizeof(ngx_log_t));
	cln = ngx_pool_cleanup_add(c->pool, 0);
	if (!c->sockaddr || !log || !cln)
		goto fail;
	ngx_memcpy(c->sockaddr, &ss, slen);
	c->socklen = slen;
	*log = ls->log;
	c->log = log;
	c->recv = ngx_recv;
	c->send = ngx_send;
	c->recv_chain = ngx_recv_chain;
	c->send_chain = ngx_send_chain;
	c->log_error = NGX_ERROR_INFO;
	c->listening = ls;
	c->local_sockaddr = ls->sockaddr;
	c->local_socklen = ls->socklen;
	c->read->log = log;
	c->write->log = log;
	c->write->ready = 1;
	c->read->ready = 1;
	c->start_time = ngx_current_msec;
	c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);
	if (ls->addr_ntop) {
		c->addr_text.data = ngx_pnalloc(c->pool, ls->addr_text_max_len);
		if (!c->addr_text.data)
			goto fail;
		c->addr_text.len = ngx_sock_ntop(c->sockaddr, c->socklen,
						 c->addr_text.data,
						 ls->addr_text_max_len, 0);
	}
	xc = xo_conn_of(c);
	ngx_memzero(xc, sizeof(*xc));
	xc->c = c;
	xc->conn = conn;
	xc->peer = peer;
	cln->handler = xo_conn_cleanup;
	cln->data = c;
	if (len) {
		xc->replay = ngx_alloc(len, xo_cycle->log);
		if (!xc->replay)
			goto fail;
		ngx_memcpy(xc->replay, data, len);
		xc->replay_len = len;
		c->recv = xo_replay_recv;
	}
	if (target)
		xc->state = XC_SERVING;
	if (tls) { /* a TLS session: the core's record layer continues it */
		if (xo_tls_attach(c, tls) != NGX_OK ||
		    xo_tls_init_connection(ls, c) != NGX_OK)
			goto fail;
		return c;
	}
	if (xo_fd_ktls(fd)) { /* kernel TLS: plaintext on the socket, no handshake */
		if (xo_tls_init_connection(ls, c) != NGX_OK)
			goto fail;
		return c;
	}
	ls->handler(c);
	return c;
fail:
	/* The caller closes the machine's side of a connection not adopted:
	 * the pool's cleanup must not do it too. */
	if (xc)
		xc->state = XC_NONE;
	if (c->pool)
		ngx_destroy_pool(c->pool);
	c->pool = NULL;
	ngx_free_connection(c);
	return NULL;
}

/* The HTTP listener a returned socket was accepted on. */
static ngx_listening_t *xo_listener_of(int fd)
{
	struct sockaddr_storage ss;
	socklen_t slen = sizeof(ss);
	ngx_listening_t *ls = xo_http_ls, *any = NULL;
	ngx_uint_t i;

	if (getsockname(fd, (struct sockaddr *)&ss, &slen) < 0)
		return NULL;
	for (i = 0; i < xo_http_nls; i++) {
		if (ls[i].handler != ngx_http_init_connection ||
		    ls[i].sockaddr->sa_family != ss.ss_family ||
		    ngx_inet_get_port(ls[i].sockaddr) !=
			    ngx_inet_get_port((struct sockaddr *)&ss))
			continue;
		if (ngx_cmp_sockaddr(ls[i].sockaddr, ls[i].socklen,
				     (struct sockaddr *)&ss, slen, 0) == NGX_OK)
			return &ls[i];
		if (ls[i].wildcard)
			any = &ls[i];
	}
	return any;
}

/* The target's HTTP listener: the one of the server that has xo_control. */
static ngx_listening_t *xo_target_listener(void)
{
	ngx_listening_t *ls = xo_cycle->listening.elts, *first = NULL;
	ngx_http_port_t *port;
	ngx_uint_t i, j;

	for (i = 0; i < xo_cycle->listening.nelts; i++) {
		if (ls[i].handler != ngx_http_init_connection)
			continue;
		if (!first)
			first = &ls[i];
		port = ls[i].servers;
		for (j = 0; port && j < port->naddrs; j++) {
			ngx_http_addr_conf_t *ac;

			if (ls[i].sockaddr->sa_family == AF_INET)
				ac = &((ngx_http_in_addr_t *)port->addrs)[j].conf;
#if (NGX_HAVE_INET6)
			else if (ls[i].sockaddr->sa_family == AF_INET6)
				ac = &((ngx_http_in6_addr_t *)port->addrs)[j].conf;
#endif
			else
				continue;
			if (ac->default_server == xo_mcf->control_srv)
				return &ls[i];
		}
	}
	return first;
}

/* ---- target: hand-back at the response boundary ------------------------------------------ */

static void xo_detach_events(ngx_connection_t *c)
{
	if (c->read->timer_set)
		ngx_del_timer(c->read);
	if (c->write->timer_set)
		ngx_del_timer(c->write);
	if (c->read->posted) {
		ngx_delete_posted_event(c->read);
	}
	if (c->write->posted) {
		ngx_delete_posted_event(c->write);
	}
	if (c->read->active || c->write->active)
		ngx_del_conn(c, 0);
}

static void xo_handback_check(ngx_event_t *ev)
{
	ngx_connection_t *c = ev->data;
	xo_conn_t *xc = xo_conn_of(c);
	int queued = 0;

	if (!xc || xc->state != XC_SERVING || !c->idle ||
	    c->close || xc->replay) {
		ngx_log_debug6(NGX_LOG_DEBUG_HTTP, xo_cycle->log, 0,
			       "xo: no hand-back: %p %ui %ui %ui %ui %p", xc,
			       xc ? xc->state : 0, c->destroyed, c->idle,
			       c->close, xc ? xc->replay : NULL);
		return;
	}
	/* Read nothing more here: what the client sends next goes along
	 * in the socket's receive queue. */
	if (c->read->posted) {
		ngx_delete_posted_event(c->read);
	}
	if (c->read->active && ngx_del_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
		ngx_http_close_connection(c);
		return;
	}
	if (ioctl(c->fd, SIOCOUTQ, &queued) < 0)
		queued = 0;
	if (queued && ngx_current_msec - xc->drain_start < xo_mcf->drain_timeout) {
		ngx_add_timer(ev, 1);
		return;
	}
	if (xo_fd_ktls(c->fd) && xo_ktls_take_pending(c, xc) == NGX_AGAIN &&
	    ngx_current_msec - xc->drain_start < xo_mcf->drain_timeout) {
		ngx_add_timer(ev, 1);
		return;
	}
	xc->ka_left = c->read->timer_set ?
			      (ngx_msec_t)(c->read->timer.key - ngx_current_msec) : 75000;
	if ((ngx_msec_int_t)xc->ka_left <= 0)
		xc->ka_left = 1;
	xo_detach_events(c);
	ngx_reusable_connection(c, 0);
	c->idle = 0;
	if (xo_tls_hand_back(c, xc) < 0) {
		ngx_log_error(NGX_LOG_INFO, c->log, 0, "xo: not handing back: %s",
			      xo_last_error());
		xo_ktls_give_back(c, xc);
		c->idle = 1;
		ngx_reusable_connection(c, 1);
		ngx_add_timer(c->read, xc->ka_left);
		if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
			ngx_http_close_connection(c);
			return;
		}
		c->read->ready = 1;
		ngx_post_event(c->read, &ngx_posted_events);
		return;
	}
	/* ktls_in stays until the host took the connection (HANDED_BACK) or
	 * did not (KEPT: nginx reads it first). */
	xc->state = XC_MACHINE;
	xo_pump();
}

static void xo_conn_cleanup(void *data)
{
	ngx_connection_t *c = data;
	xo_conn_t *xc = xo_conn_of(c);
	xo_ctl_t *k;

	if (!xc)
		return;
	if (xc->ev.timer_set)
		ngx_del_timer(&xc->ev);
	if (xc->ev.posted) {
		ngx_delete_posted_event(&xc->ev);
	}
	if (xc->replay)
		ngx_free(xc->replay);
	xc->replay = NULL;
	if (xc->ktls_in)
		ngx_free(xc->ktls_in);
	xc->ktls_in = NULL;
	xc->ktls_len = xc->ktls_cap = 0;
	if (xc->state == XC_SERVING && xo_machine) {
		/* nginx closed its duplicate; the machine's copy sends the FIN
		 * through the source rewrite and tells the host. */
		if (xo_proto_close_conn(xo_machine, xc->conn, xo_now()) < 0)
			ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
				      "xo: close_conn: %s", xo_last_error());
		k = xo_ctl_by_peer(xc->peer);
		if (k && k->adopted)
			k->adopted--;
		xo_post_pump();
	}
	xc->state = XC_NONE;
	xc->c = NULL;
}

static ngx_int_t ngx_http_xo_log_handler(ngx_http_request_t *r)
{
	xo_conn_t *xc;

	if (!xo_machine || !xo_mcf->has_control || !xo_mcf->hand_back ||
	    r != r->main)
		return NGX_OK;
	xc = xo_conn_of(r->connection);
	if (!xc || xc->state != XC_SERVING)
		return NGX_OK;
	/* After this request is finalized and nginx went idle (keep-alive). */
	xc->ev.handler = xo_handback_check;
	xc->ev.data = r->connection;
	xc->ev.log = xo_cycle->log;
	xc->drain_start = ngx_current_msec;
	if (!xc->ev.posted && !xc->ev.timer_set) {
		ngx_post_event(&xc->ev, &ngx_posted_events);
	}
	return NGX_OK;
}

/* ---- front: the offload decision -------------------------------------------------------- */

static ngx_int_t xo_pick(ngx_http_request_t *r, ngx_http_xo_loc_conf_t *lcf,
			 uint32_t *peer, ngx_uint_t *target)
{
	ngx_uint_t cand[XO_MAX_TARGETS], n = 0, i, idx, ntargets;
	ngx_uint_t *names = lcf->index ? lcf->index->elts : NULL;
	uint64_t now = xo_now();
	ngx_str_t v;

	ntargets = names ? lcf->index->nelts : xo_mcf->targets->nelts;
	for (i = 0; i < ntargets; i++) {
		idx = names ? names[i] : i;
		if (xo_ctls[idx].up && xo_ctls[idx].peer &&
		    xo_proto_usable(xo_machine, xo_ctls[idx].peer, now) == 1)
			cand[n++] = idx;
	}
	if (!n)
		return NGX_DECLINED;
	if (lcf->policy == XO_POLICY_HASH) {
		if (ngx_http_complex_value(r, lcf->hash, &v) != NGX_OK)
			return NGX_ERROR;
		idx = cand[ngx_crc32_short(v.data, v.len) % n];
	} else if (lcf->policy == XO_POLICY_LEAST || !names) {
		if (xo_proto_pick(xo_machine, lcf->policy == XO_POLICY_LEAST ?
					      XO_PICK_LEAST_LOADED :
					      XO_PICK_ROUND_ROBIN, now, peer) < 0)
			return NGX_DECLINED;
		for (i = 0; i < n; i++)
			if (xo_ctls[cand[i]].peer == *peer)
				break;
		if (i == n) /* not one of this location's */
			i = lcf->rr++ % n;
		idx = cand[i];
	} else {
		idx = cand[lcf->rr++ % n];
	}
	*peer = xo_ctls[idx].peer;
	*target = idx;
	return NGX_OK;
}

/* The request as the client sent it (nginx wrote NULs into its buffer):
 * request line, headers, then every byte read but not parsed yet. */
static u_char *xo_request_bytes(ngx_http_request_t *r, size_t *len)
{
	ngx_list_part_t *part = &r->headers_in.headers.part;
	ngx_table_elt_t *h;
	ngx_buf_t *b = r->header_in;
	size_t n, rest = b ? (size_t)(b->last - b->pos) : 0;
	u_char *buf, *p;
	ngx_uint_t i;

	n = r->request_line.len + 2 + 2 + rest;
	for (; part; part = part->next) {
		h = part->elts;
		for (i = 0; i < part->nelts; i++)
			n += h[i].key.len + 2 + h[i].value.len + 2;
	}
	buf = ngx_pnalloc(r->pool, n);
	if (!buf)
		return NULL;
	p = ngx_cpymem(buf, r->request_line.data, r->request_line.len);
	*p++ = '\r';
	*p++ = '\n';
	for (part = &r->headers_in.headers.part; part; part = part->next) {
		h = part->elts;
		for (i = 0; i < part->nelts; i++) {
			p = ngx_cpymem(p, h[i].key.data, h[i].key.len);
			*p++ = ':';
			*p++ = ' ';
			p = ngx_cpymem(p, h[i].value.data, h[i].value.len);
			*p++ = '\r';
			*p++ = '\n';
		}
	}
	*p++ = '\r';
	*p++ = '\n';
	if (rest)
		p = ngx_cpymem(p, b->pos, rest);
	*len = (size_t)(p - buf);
	return buf;
}

static ngx_int_t ngx_http_xo_handler(ngx_http_request_t *r)
{
	ngx_http_xo_loc_conf_t *lcf;
	ngx_http_xo_ctx_t *ctx;
	ngx_http_xo_target_t *t;
	ngx_connection_t *c = r->connection;
	ngx_file_info_t fi;
	ngx_str_t path;
	size_t root, len;
	ngx_uint_t target;
	xo_conn_t *xc;
	uint32_t peer;
	uint64_t conn;
	u_char *app;
	int dfd, ret;
	struct xo_tls_state tls;
	ngx_uint_t is_tls;

	lcf = ngx_http_get_module_loc_conf(r, ngx_http_xo_module);
	if (!lcf->pass || r != r->main || !xo_machine || xo_mcf->has_control)
		return NGX_DECLINED;
	ctx = ngx_http_get_module_ctx(r, ngx_http_xo_module);
	if (ctx)
		return NGX_DECLINED;
	ctx = ngx_pcalloc(r->pool, sizeof(*ctx));
	if (!ctx)
		return NGX_ERROR;
	ngx_http_set_ctx(r, ctx, ngx_http_xo_module);
	ctx->decided = 1;
	if (r->request_body || r->http_version < NGX_HTTP_VERSION_10 ||
	    c->buffered || ngx_exiting || ngx_terminate)
		return NGX_DECLINED;
	/* Bytes a target handed back with the connection that nginx has not
	 * read yet (a body on its way, a next request) would not go along:
	 * this request is served here, the next one can move. */
	xc = xo_conn_of(c);
	if (xc && xc->replay)
		return NGX_DECLINED;
#if (NGX_HTTP_V2)
	if (r->stream)
		return NGX_DECLINED;
#endif
	if (lcf->threshold > 0 && ngx_http_map_uri_to_path(r, &path, &root, 0) &&
	    ngx_file_info(path.data, &fi) != NGX_FILE_ERROR && ngx_is_file(&fi) &&
	    ngx_file_size(&fi) < lcf->threshold)
		return NGX_DECLINED; /* small: served here */
	if (xo_pick(r, lcf, &peer, &target) != NGX_OK)
		return NGX_DECLINED;
	if (xo_tls_offload_state(c, &tls, &is_tls) != NGX_OK) {
		ngx_explicit_memzero(&tls, sizeof(tls));
		return NGX_DECLINED; /* a TLS session that cannot move now */
	}
	app = xo_request_bytes(r, &len);
	if (!app) {
		ngx_explicit_memzero(&tls, sizeof(tls));
		return NGX_DECLINED;
	}
	dfd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0);
	if (dfd < 0) {
		ngx_log_error(NGX_LOG_ALERT, c->log, ngx_errno, "xo: dup()");
		ngx_explicit_memzero(&tls, sizeof(tls));
		return NGX_DECLINED;
	}
	xo_detach_events(c);
	ret = xo_proto_offload_tls(xo_machine, peer, dfd, app, (uint32_t)len,
				   is_tls ? &tls : NULL, xo_now(), &conn);
	ngx_explicit_memzero(&tls, sizeof(tls));
	if (ret < 0) {
		ngx_log_error(NGX_LOG_WARN, c->log, 0, "xo: handoff not started: %s",
			      xo_last_error());
		close(dfd);
		return NGX_DECLINED;
	}
	t = (ngx_http_xo_target_t *)xo_mcf->targets->elts + target;
	ctx->target = t->name;
	xc = xo_conn_of(c);
	ngx_memzero(xc, sizeof(*xc));
	xc->state = XC_HOST_WAIT;
	xc->conn = conn;
	xc->peer = peer;
	xc->r = r;
	xc->c = c;
	xo_post_pump();
	return NGX_DONE;
}

static xo_conn_t *xo_conn_by_id(uint64_t conn, ngx_uint_t state)
{
	ngx_uint_t i;

	for (i = 0; i < xo_nconns; i++)
		if (xo_conns[i].state == state && xo_conns[i].conn == conn)
			return &xo_conns[i];
	return NULL;
}

/* ---- events --------------------------------------------------------------------- */

static void xo_event(const struct xo_proto_event *ev)
{
	ngx_http_request_t *r;
	ngx_connection_t *c;
	ngx_listening_t *ls;
	ngx_http_xo_ctx_t *ctx;
	xo_conn_t *xc;
	xo_ctl_t *k;
	int dfd;

	switch (ev->type) {
	case XO_EV_PEER_UP:
		k = xo_ctl_by_peer(ev->peer);
		if (k)
			k->up = 1;
		ngx_log_error(NGX_LOG_INFO, xo_cycle->log, 0,
			      "xo: control connection %s up", ev->text);
		break;
	case XO_EV_PEER_CLOSED:
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: control connection closed: %s", ev->text);
		k = xo_ctl_by_peer(ev->peer);
		if (k) {
			xo_ctl_flush(k); /* its last words */
			xo_proto_peer_closed(xo_machine, ev->peer, xo_now());
			xo_ctl_drop(k);
		}
		break;
	case XO_EV_OFFLOADED:
		xc = xo_conn_by_id(ev->conn, XC_HOST_WAIT);
		if (!xc)
			break;
		r = xc->r;
		ctx = ngx_http_get_module_ctx(r, ngx_http_xo_module);
		if (ctx)
			ctx->offloaded = 1;
		xc->state = XC_NONE;
		/* The socket is frozen: closing nginx's descriptor sends
		 * nothing; no lingering close, no keep-alive. */
		r->keepalive = 0;
		r->lingering_close = 0;
		c = r->connection;
		c->timedout = 0;
		xo_tls_silence(c);
		ngx_http_finalize_request(r, NGX_HTTP_CLOSE);
		ngx_http_run_posted_requests(c); /* the close happens there */
		break;
	case XO_EV_ROLLED_BACK:
		if (ev->fd >= 0)
			close(ev->fd); /* our duplicate; nginx still has it */
		xc = xo_conn_by_id(ev->conn, XC_HOST_WAIT);
		if (!xc)
			break;
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: served here: %s", ev->text);
		r = xc->r;
		c = r->connection;
		xc->state = XC_NONE;
		c->read->ready = 1;
		ngx_http_core_run_phases(r);
		ngx_http_run_posted_requests(c);
		break;
	case XO_EV_RETURNED:
		ls = xo_listener_of(ev->fd);
		if (!ls || !xo_adopt(ls, ev->fd, ev->data, ev->data_len, 0,
				     ev->tls, ev->conn, ev->peer)) {
			ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, 0,
				      "xo: a returned connection has no listener");
			close(ev->fd);
		}
		break;
	case XO_EV_WITHDRAWN:
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: conn %uL: target lost; client probed", ev->conn);
		break;
	case XO_EV_REFUSED:
		ngx_log_error(NGX_LOG_WARN, xo_cycle->log, 0,
			      "xo: conn %uL refused: %s", ev->conn, ev->text);
		break;
	case XO_EV_ADOPTED:
		dfd = xo_adopt_ls ? fcntl(ev->fd, F_DUPFD_CLOEXEC, 0) : -1;
		k = xo_ctl_by_peer(ev->peer);
		if (dfd >= 0 && k)
			k->adopted++;
		if (dfd < 0 || !(c = xo_adopt(xo_adopt_ls, dfd, ev->data,
					      ev->data_len, 1, ev->tls, ev->conn,
					      ev->peer))) {
			ngx_log_error(NGX_LOG_ALERT, xo_cycle->log, ngx_errno,
				      "xo: cannot adopt conn %uL", ev->conn);
			if (dfd >= 0) {
				close(dfd);
				if (k && k->adopted)
					k->adopted--;
			}
			xo_proto_close_conn(xo_machine, ev->conn, xo_now());
			break;
		}
		/* c may be closed already (a short request, Connection: close,
		 * a client that closed first): its cleanup told the machine. */
		break;
	case XO_EV_HANDED_BACK:
		xc = xo_conn_by_id(ev->conn, XC_MACHINE);
		if (!xc)
			break;
		k = xo_ctl_by_peer(xc->peer);
		if (k && k->adopted)
			k->adopted--;
		xc->state = XC_NONE;
		ngx_http_close_connection(xc->c); /* frozen: silent */
		break;
	case XO_EV_KEPT:
		xc = xo_conn_by_id(ev->conn, XC_MACHINE);
		if (!xc)
			break;
		c = xc->c;
		xo_ktls_give_back(c, xc);
		xc->state = XC_SERVING;
		c->idle = 1;
		ngx_reusable_connection(c, 1);
		ngx_add_timer(c->read, xc->ka_left);
		if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
			xo_conn_cleanup(c);
			ngx_http_close_connection(c);
			break;
		}
		c->read->ready = 1;
		ngx_post_event(c->read, &ngx_posted_events);
		break;
	case XO_EV_LOST:
		if (ev->fd >= 0)
			close(ev->fd);
		xc = xo_conn_by_id(ev->conn, XC_SERVING);
		if (!xc)
			xc = xo_conn_by_id(ev->conn, XC_MACHINE);
		if (!xc)
			break;
		k = xo_ctl_by_peer(xc->peer);
		if (k && k->adopted)
			k->adopted--;
		c = xc->c;
		if (xc->state == XC_MACHINE || c->idle) {
			xc->state = XC_NONE;
			ngx_http_close_connection(c);
		} else {
			xc->state = XC_NONE;
			c->close = 1;
		}
		break;
	default:
		break;
	}
}

static ngx_msec_t xo_exit_said;

static void xo_arm(void)
{
	uint64_t now = xo_now(), next = xo_proto_next_deadline(xo_machine);
	ngx_msec_t ms = 1000;
	struct xo_proto_stats st;
	ngx_uint_t i, hold = 0;

	if (next)
		ms = next > now ? (ngx_msec_t)((next - now) / 1000000) + 1 : 1;
	if (ms > 1000)
		ms = 1000;
	/* A worker told to stop stays while the machine tracks a connection
	 * (handed off from here and may come back; adopted and served here;
	 * closed here with the host's confirmation pending) and while a
	 * control connection is open: xo_exit_drop() closes them once nothing
	 * is tracked. The timer is not cancelable then, which is what keeps
	 * nginx from exiting; it is set so before the stop is known, as
	 * nginx may decide to exit before any of our handlers runs again. */
	xo_proto_get_stats(xo_machine, &st);
	for (i = 0; i < XO_MAX_CTLS; i++)
		if (xo_ctls[i].c)
			hold = 1;
	if (st.active)
		hold = 1;
	if (ngx_exiting && ms > 50)
		ms = 50;
	/* Say now and then what a stopping worker still waits for. */
	if (ngx_exiting && st.active &&
	    ngx_current_msec - xo_exit_said >= 5000) {
		xo_exit_said = ngx_current_msec;
		ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
			      "xo: stopping worker waits for %uD connection(s) it tracks",
			      st.active);
	}
	xo_tick_ev.cancelable = !hold;
	ngx_add_timer(&xo_tick_ev, ms);
}

/* A worker that stops: once its machine tracks no connection, close the
 * control connections (the peers see nothing of theirs lost; a front
 * reconnects to the new workers). Closing one earlier would make the
 * host withdraw what this worker serves or is closing (its client would
 * see a reset). 1 if something was closed. */
static ngx_uint_t xo_exit_drop(void)
{
	struct xo_proto_stats st;
	ngx_uint_t i, any = 0;

	if (!ngx_exiting)
		return 0;
	xo_proto_get_stats(xo_machine, &st);
	if (st.active)
		return 0;
	for (i = 0; i < XO_MAX_CTLS; i++)
		if (xo_ctls[i].c) {
			if (xo_ctls[i].peer)
				xo_proto_peer_closed(xo_machine, xo_ctls[i].peer,
						     xo_now());
			xo_ctl_drop(&xo_ctls[i]);
			any = 1;
		}
	return any;
}

static void xo_pump(void)
{
	struct xo_proto_event ev;
	ngx_uint_t rounds, i, any;

	if (!xo_machine)
		return;
	if (xo_pumping) {
		xo_pump_again = 1;
		return;
	}
	xo_pumping = 1;
	for (rounds = 0; rounds < 1000; rounds++) {
		any = 0;
		xo_pump_again = 0;
		for (i = 0; i < XO_MAX_CTLS; i++)
			xo_ctl_flush(&xo_ctls[i]);
		while (xo_proto_next_event(xo_machine, &ev) == 1) {
			xo_event(&ev);
			any = 1;
		}
		if (!any && !xo_pump_again)
			break;
	}
	xo_pumping = 0;
	if (xo_exit_drop()) {
		xo_pump(); /* their PEER_CLOSED events */
		return;
	}
	xo_arm();
}

static void xo_pump_handler(ngx_event_t *ev)
{
	(void)ev;
	xo_pump();
}

static void xo_post_pump(void)
{
	if (!xo_pump_ev.posted) {
		ngx_post_event(&xo_pump_ev, &ngx_posted_events);
	}
}

/* Client frames parked for this machine (a flow frozen here, or frames
 * another owner sent on): the machine gives a descriptor that becomes
 * readable when there are some, and takes them on xo_proto_tick().
 *
 * XO_HAVE_PARK_FD is set by plugins/nginx/config when the core's
 * xo_proto.h declares xo_proto_park_fd(); a core without it takes parked
 * frames on its own timer ticks only. */
#ifdef XO_HAVE_PARK_FD
static ngx_connection_t *xo_park_c;

static void xo_park_read(ngx_event_t *rev)
{
	(void)rev;
	if (!xo_machine)
		return;
	xo_proto_tick(xo_machine, xo_now());
	xo_pump();
}

static ngx_int_t xo_park_watch(ngx_cycle_t *cycle)
{
	int fd = xo_proto_park_fd(xo_machine);

	if (fd < 0) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
			      "xo: no descriptor for parked frames: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
	xo_park_c = ngx_get_connection(fd, cycle->log);
	if (!xo_park_c)
		return NGX_ERROR;
	xo_park_c->read->handler = xo_park_read;
	xo_park_c->read->log = cycle->log;
	/* level-triggered: readable until the machine took every frame */
	if (ngx_add_event(xo_park_c->read, NGX_READ_EVENT, 0) != NGX_OK) {
		ngx_free_connection(xo_park_c);
		xo_park_c = NULL;
		return NGX_ERROR;
	}
	return NGX_OK;
}

static void xo_park_unwatch(void)
{
	if (!xo_park_c)
		return;
	/* the machine owns the descriptor: leave epoll, do not close it */
	if (xo_park_c->read->active)
		ngx_del_event(xo_park_c->read, NGX_READ_EVENT, 0);
	xo_park_c->fd = (ngx_socket_t)-1; /* or nginx reports it left open */
	ngx_free_connection(xo_park_c);
	xo_park_c = NULL;
}
#endif

static void xo_tick_handler(ngx_event_t *ev)
{
	ngx_uint_t i;

	(void)ev;
	xo_proto_tick(xo_machine, xo_now());
	xo_steps_collect();
	if (!ngx_exiting && !xo_mcf->has_control)
		for (i = 0; i < xo_mcf->targets->nelts; i++)
			if (!xo_ctls[i].c &&
			    (ngx_msec_int_t)(ngx_current_msec - xo_ctls[i].retry_at) >= 0)
				xo_ctl_connect(&xo_ctls[i]);
	xo_pump();
}

/* ---- worker start and stop ------------------------------------------------------- */

/* Owner id of a worker's steering entries: the pin directory's checksum
 * with the worker's PID in the upper 24 bits. */
static uint32_t xo_owner_of(ngx_http_xo_main_conf_t *mcf, ngx_pid_t pid)
{
	return ngx_crc32_short(mcf->pin_dir.data, mcf->pin_dir.len) ^
	       ((uint32_t)pid << 8);
}

/* Does the process exist (a zombie does not count: a worker whose master
 * was killed too may wait a while to be reaped)? */
static ngx_uint_t xo_pid_alive(ngx_pid_t pid)
{
	char path[64], buf[256], *p;
	ssize_t n;
	int fd;

	if (kill(pid, 0) < 0 && ngx_errno == ESRCH)
		return 0;
	ngx_snprintf((u_char *)path, sizeof(path), "/proc/%P/stat%Z", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ngx_errno != ENOENT;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* "pid (comm) state ..." */
	return !(p && p[1] == ' ' && p[2] == 'Z');
}

/* Entries of workers of this configuration that died without removing
 * them (killed, crashed): purge them, so nothing of theirs steers a flow
 * that has no socket any more. A live worker's (an old one finishing after
 * a reload) are left alone. */
static void xo_purge_dead_owners(ngx_http_xo_main_conf_t *mcf, ngx_log_t *log)
{
	struct xo_steer_action *acts;
	uint32_t base = xo_owner_of(mcf, 0), done[64], o;
	int64_t n, i, purged;
	ngx_uint_t ndone = 0, j;
	ngx_pid_t pid;

	n = xo_steer_list(xo_steer, NULL, NULL, 0);
	if (n <= 0)
		return;
	acts = ngx_alloc((size_t)n * sizeof(*acts), log);
	if (!acts)
		return;
	n = xo_steer_list(xo_steer, NULL, acts, (uint32_t)n);
	for (i = 0; i < n; i++) {
		o = acts[i].owner;
		if (((o ^ base) & 0xff) || o == xo_owner_of(mcf, ngx_pid))
			continue;
		for (j = 0; j < ndone && done[j] != o; j++)
			;
		if (j < ndone || ndone == 64)
			continue;
		done[ndone++] = o;
		pid = (ngx_pid_t)((o ^ base) >> 8);
		if (pid <= 0 || xo_pid_alive(pid))
			continue;
		purged = xo_steer_purge_owner(xo_steer, o);
		if (purged > 0)
			ngx_log_error(NGX_LOG_NOTICE, log, 0,
				      "xo: %L steering entries of worker %P (gone) "
				      "removed", purged, pid);
	}
	ngx_free(acts);
}

/* ---- parked frames with several workers --------------------------------
 *
 * The workers share the steering object the master loaded, and with it
 * its parked-frame ring: any worker could read a frame parked for another
 * worker's flow. Each worker gives the object a ring of its own under its
 * owner id (xo_park_own()), so frames of its PARK entries reach it alone;
 * rings of workers that are gone are removed.
 */
static uint32_t xo_park_owner;
static ngx_uint_t xo_park_owned;

static ngx_int_t xo_park_own_ring(ngx_http_xo_main_conf_t *mcf, uint32_t owner,
				  ngx_log_t *log)
{
	uint32_t base = xo_owner_of(mcf, 0), owners[XO_PARK_MAX_OWNER_RINGS], o;
	int64_t n, i;
	ngx_pid_t pid;

	n = xo_park_owners(xo_steer, owners, XO_PARK_MAX_OWNER_RINGS);
	if (n < 0) {
		ngx_log_error(NGX_LOG_EMERG, log, 0, "xo: parked frames: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
	for (i = 0; i < n && i < XO_PARK_MAX_OWNER_RINGS; i++) {
		o = owners[i];
		pid = (ngx_pid_t)((o ^ base) >> 8);
		if (((o ^ base) & 0xff) || pid <= 0 || o == owner ||
		    xo_pid_alive(pid))
			continue;
		if (xo_park_disown(xo_steer, o)) {
			ngx_log_error(NGX_LOG_WARN, log, 0, "xo: parked frames: %s",
				      xo_last_error());
		} else {
			ngx_log_error(NGX_LOG_NOTICE, log, 0,
				      "xo: parked-frame ring of worker %P (gone) "
				      "removed", pid);
		}
	}
	if (xo_park_own(xo_steer, owner)) {
		ngx_log_error(NGX_LOG_EMERG, log, 0, "xo: parked frames: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
	xo_park_owner = owner;
	xo_park_owned = 1;
	return NGX_OK;
}

/* An exiting worker's ring leaves the object (the master keeps it). */
static void xo_park_own_ring_release(ngx_log_t *log)
{
	if (!xo_park_owned)
		return;
	xo_park_owned = 0;
	if (xo_park_disown(xo_steer, xo_park_owner))
		ngx_log_error(NGX_LOG_WARN, log, 0, "xo: parked frames: %s",
			      xo_last_error());
}

static ngx_int_t ngx_http_xo_init_process(ngx_cycle_t *cycle)
{
	ngx_http_xo_main_conf_t *mcf;
	struct xo_proto_config pc = { .size = sizeof(pc) };
	uint8_t key[XO_KEY_MAX_LEN];
	ngx_uint_t i;
	ngx_url_t *h;
	int key_len, ret;

	mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_xo_module);
	if (!mcf || (!mcf->has_control && !(mcf->targets && mcf->targets->nelts)))
		return NGX_OK;
	if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE)
		return NGX_OK;
	xo_cycle = cycle;
	xo_mcf = mcf;
	xo_http_ls = cycle->listening.elts;
	xo_http_nls = cycle->listening.nelts;
	if (!ngx_add_conn || !(ngx_event_flags & NGX_USE_EPOLL_EVENT)) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
			      "xo: needs the epoll event method");
		return NGX_ERROR;
	}
	if (xo_worker_caps(cycle->log) != NGX_OK)
		return NGX_ERROR;
	if (!xo_steer) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: no steering handle");
		return NGX_ERROR;
	}
	if (xo_key_len <= 0) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: no cluster key");
		return NGX_ERROR;
	}
	key_len = xo_key_len;
	ngx_memcpy(key, xo_key_buf, (size_t)key_len);
	ngx_memzero(xo_key_buf, sizeof(xo_key_buf)); /* the worker's copy */
	if (xo_rules_create(xo_steer, xo_steer_ifindex, NULL, NULL, &xo_rules)) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: rules: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
	pc.role = mcf->has_control ? XO_ROLE_TARGET : XO_ROLE_HOST;
	/* xo_tls: a TLS session is refused (off), taken only where kernel
	 * TLS can be installed (kernel: the socket then reads and writes
	 * plaintext), or continued by the core's record layer where the
	 * kernel has no TLS (on). */
	pc.no_tls = mcf->tls == XO_TLS_OFF;
	pc.tls_kernel_only = mcf->tls == XO_TLS_KERNEL;
	pc.key = key;
	pc.key_len = (uint32_t)key_len;
	/* One owner id per worker: a worker's restart must not purge what
	 * another one (or an old one finishing after a reload) holds. */
	pc.owner = xo_owner_of(mcf, ngx_pid);
	xo_purge_dead_owners(mcf, cycle->log);
	if (xo_park_own_ring(mcf, pc.owner, cycle->log) != NGX_OK)
		return NGX_ERROR;
	pc.rules = xo_rules;
	pc.steer = xo_steer;
	ngx_memcpy(pc.host_mac, xo_if_mac, 6);
	if (mcf->has_control) {
		if (xo_endpoint_from_sockaddr((struct sockaddr_storage *)
					      mcf->control.addrs[0].sockaddr,
					      mcf->control.addrs[0].socklen, &pc.local4))
			return NGX_ERROR;
		pc.local4.port = 0;
		h = mcf->hosts->elts;
		for (i = 0; i < mcf->hosts->nelts; i++)
			if (xo_endpoint_from_sockaddr((struct sockaddr_storage *)
						      h[i].addrs[0].sockaddr,
						      h[i].addrs[0].socklen,
						      &pc.hosts[i]))
				return NGX_ERROR;
		pc.n_hosts = (uint32_t)mcf->hosts->nelts;
	}
	ret = xo_proto_create(&pc, &xo_machine);
	ngx_memzero(key, sizeof(key));
	if (ret) {
		ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xo: protocol: %s",
			      xo_last_error());
		return NGX_ERROR;
	}
#ifdef XO_HAVE_PARK_FD
	if (xo_park_watch(cycle) != NGX_OK)
		return NGX_ERROR;
#endif
	xo_nconns = cycle->connection_n;
	xo_conns = ngx_calloc(sizeof(xo_conn_t) * xo_nconns, cycle->log);
	if (!xo_conns)
		return NGX_ERROR;
	xo_tls_conns = ngx_calloc(sizeof(xo_tls_conn_t) * xo_nconns, cycle->log);
	if (!xo_tls_conns)
		return NGX_ERROR;
	xo_tick_ev.handler = xo_tick_handler;
	xo_tick_ev.log = cycle->log;
	xo_tick_ev.data = cycle;
	xo_tick_ev.cancelable = 1;
	xo_pump_ev.handler = xo_pump_handler;
	xo_pump_ev.log = cycle->log;
	xo_pump_ev.data = cycle;
	if (mcf->has_control) {
		xo_adopt_ls = xo_target_listener();
		if (!xo_adopt_ls) {
			ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
				      "xo_control (%V:%ui): the server has no HTTP "
				      "listener for adopted connections",
				      &mcf->conf_file, mcf->conf_line);
			return NGX_ERROR;
		}
	} else {
		for (i = 0; i < mcf->targets->nelts; i++) {
			xo_ctls[i].target = (ngx_int_t)i;
			xo_ctl_connect(&xo_ctls[i]);
		}
	}
	xo_arm();
	return NGX_OK;
}

static void ngx_http_xo_exit_process(ngx_cycle_t *cycle)
{
	if (!xo_machine)
		return;
#ifdef XO_HAVE_PARK_FD
	xo_park_unwatch();
#endif
	xo_proto_destroy(xo_machine);
	xo_machine = NULL;
	xo_rules_destroy(xo_rules);
	xo_rules = NULL;
	xo_park_own_ring_release(cycle->log);
}

/* ---- phase handlers ------------------------------------------------------------------ */

static ngx_int_t ngx_http_xo_init(ngx_conf_t *cf)
{
	ngx_http_core_main_conf_t *cmcf;
	ngx_http_xo_main_conf_t *mcf;
	ngx_http_handler_pt *h;

	mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_xo_module);
	if (!mcf->used && !mcf->has_control)
		return NGX_OK; /* not used: nothing changes */
	cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
	if (mcf->used && xo_tls_hook_servers(cf) != NGX_OK)
		return NGX_ERROR;
	if (mcf->used) {
		h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
		if (!h)
			return NGX_ERROR;
		*h = ngx_http_xo_handler;
	}
	if (mcf->has_control) {
		h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
		if (!h)
			return NGX_ERROR;
		*h = ngx_http_xo_log_handler;
	}
	return NGX_OK;
}
