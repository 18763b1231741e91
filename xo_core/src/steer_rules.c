// SPDX-License-Identifier: MIT
/*
 * Hybrid rule manager (paper §4.2.2-4.2.3): the software tier (BPF map) is
 * written synchronously; the hardware tier is fed asynchronously through a
 * bounded, cancellable queue with one consumer thread, because a NIC can
 * take milliseconds per flower rule and the handoff must not wait for it.
 *
 * Per flow the manager keeps one record with three facts: an insert is
 * queued (with the action to install), the consumer is installing it right
 * now (in flight), the backend holds an entry (installed, with its cookie).
 *
 *   insert:  software now. Hardware, for the kinds in hw_kinds (redirect
 *            by default, as in the paper): coalesce into a queued insert
 *            of the same flow, or enqueue. If the queue is full, or the
 *            kind stays in software, a hardware entry left from before is
 *            removed so it cannot contradict the new software entry.
 *   remove:  cancel a queued insert (the backend never sees it), wait for
 *            one in flight, remove the installed entry from hardware, then
 *            delete the software entry. Hardware goes first: in between,
 *            software alone still steers the flow the same way.
 *
 * Locks: mu guards records, queue and stats; hw_mu serializes calls into
 * the backend (the consumer's inserts and the callers' removes). mu is
 * never held across a backend call, so a slow NIC does not stall inserts.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <bpf/bpf.h>

#include "steer_internal.h"

struct rule_rec {
	struct xo_flow_key key;
	struct rule_rec *hnext;            /* hash chain */
	struct rule_rec *qprev, *qnext;    /* queue, while queued */
	struct xo_steer_action pending;    /* what the queued insert installs */
	uint64_t cookie;                   /* backend's id, while installed */
	uint32_t refs;                     /* threads waiting on it unlocked */
	uint8_t queued;
	uint8_t inflight;                  /* consumer is installing it */
	uint8_t installed;
	uint8_t removing;                  /* a caller is removing it */
};

struct xo_rules {
	struct xo_steer *s;
	int ifindex;
	struct xo_hw_backend *hw;          /* NULL: backend "none" */
	pthread_mutex_t mu;
	pthread_cond_t work_cv;            /* consumer: queue not empty/stop */
	pthread_cond_t done_cv;            /* a backend call finished */
	pthread_mutex_t hw_mu;
	struct rule_rec **tab;
	uint32_t tab_size;                 /* power of two */
	uint32_t nrecs;
	struct rule_rec *qhead, *qtail;
	uint32_t hw_kinds;                 /* XO_RULES_HW_* */
	int stop;
	int thr_started;
	pthread_t thr;
	struct xo_rules_stats st;
	char hw_err[256];
};

static uint32_t key_hash(const struct xo_flow_key *k)
{
	const uint8_t *p = (const uint8_t *)k;
	uint32_t h = 2166136261u; /* FNV-1a */

	for (size_t i = 0; i < sizeof(*k); i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static struct rule_rec *rec_find(struct xo_rules *r,
				 const struct xo_flow_key *k)
{
	struct rule_rec *rec = r->tab[key_hash(k) & (r->tab_size - 1)];

	while (rec && memcmp(&rec->key, k, sizeof(*k)))
		rec = rec->hnext;
	return rec;
}

static void tab_grow(struct xo_rules *r)
{
	uint32_t nsize = r->tab_size * 2;
	struct rule_rec **ntab = calloc(nsize, sizeof(*ntab));

	if (!ntab)
		return; /* longer chains, still correct */
	for (uint32_t i = 0; i < r->tab_size; i++) {
		struct rule_rec *rec = r->tab[i], *next;

		for (; rec; rec = next) {
			uint32_t b = key_hash(&rec->key) & (nsize - 1);

			next = rec->hnext;
			rec->hnext = ntab[b];
			ntab[b] = rec;
		}
	}
	free(r->tab);
	r->tab = ntab;
	r->tab_size = nsize;
}

static struct rule_rec *rec_get(struct xo_rules *r,
				const struct xo_flow_key *k)
{
	struct rule_rec *rec = rec_find(r, k);
	uint32_t b;

	if (rec)
		return rec;
	rec = calloc(1, sizeof(*rec));
	if (!rec)
		return NULL;
	rec->key = *k;
	if (r->nrecs >= r->tab_size)
		tab_grow(r);
	b = key_hash(k) & (r->tab_size - 1);
	rec->hnext = r->tab[b];
	r->tab[b] = rec;
	r->nrecs++;
	return rec;
}

/* Forget a record nothing refers to any more. */
static void rec_maybe_free(struct xo_rules *r, struct rule_rec *rec)
{
	struct rule_rec **pp;

	if (rec->queued || rec->inflight || rec->installed || rec->removing ||
	    rec->refs)
		return;
	pp = &r->tab[key_hash(&rec->key) & (r->tab_size - 1)];
	while (*pp && *pp != rec)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = rec->hnext;
	r->nrecs--;
	free(rec);
}

static void q_push(struct xo_rules *r, struct rule_rec *rec)
{
	rec->qnext = NULL;
	rec->qprev = r->qtail;
	if (r->qtail)
		r->qtail->qnext = rec;
	else
		r->qhead = rec;
	r->qtail = rec;
	rec->queued = 1;
	r->st.queue_len++;
}

static void q_unlink(struct xo_rules *r, struct rule_rec *rec)
{
	if (rec->qprev)
		rec->qprev->qnext = rec->qnext;
	else
		r->qhead = rec->qnext;
	if (rec->qnext)
		rec->qnext->qprev = rec->qprev;
	else
		r->qtail = rec->qprev;
	rec->qprev = rec->qnext = NULL;
	rec->queued = 0;
	r->st.queue_len--;
}

static void set_installed(struct xo_rules *r, struct rule_rec *rec, int on)
{
	if (on && !rec->installed)
		r->st.hw_entries++;
	else if (!on && rec->installed)
		r->st.hw_entries--;
	rec->installed = on;
}

static void note_hw_error(struct xo_rules *r)
{
	r->st.hw_errors++;
	snprintf(r->hw_err, sizeof(r->hw_err), "%s", xo_last_error());
}

/* Wait (mu held) until no backend call concerns rec. */
static void wait_idle(struct xo_rules *r, struct rule_rec *rec)
{
	rec->refs++;
	while (rec->inflight || rec->removing)
		pthread_cond_wait(&r->done_cv, &r->mu);
	rec->refs--;
}

/*
 * Take rec's installed entry out of the backend, synchronously. Called
 * and returns with mu held; drops it for the backend call. On failure the
 * entry is kept as installed (so destroy retries) and the caller's
 * xo_last_error() says why.
 */
static int hw_remove_locked(struct xo_rules *r, struct rule_rec *rec)
{
	struct xo_flow_key key = rec->key;
	uint64_t cookie = rec->cookie;
	int ret;

	set_installed(r, rec, 0);
	rec->removing = 1;
	rec->refs++;
	pthread_mutex_unlock(&r->mu);

	pthread_mutex_lock(&r->hw_mu);
	ret = r->hw->ops.remove(r->hw->priv, &key, cookie);
	pthread_mutex_unlock(&r->hw_mu);

	pthread_mutex_lock(&r->mu);
	rec->removing = 0;
	rec->refs--;
	if (ret == XO_E_NOTFOUND)
		ret = 0; /* already gone (e.g. the NIC was reset): clean */
	if (ret) {
		note_hw_error(r);
		set_installed(r, rec, 1);
	} else {
		r->st.hw_removed++;
	}
	pthread_cond_broadcast(&r->done_cv);
	return ret;
}

/* Make the hardware tier forget one flow (mu held): cancel, wait, remove. */
static int hw_forget_locked(struct xo_rules *r, struct rule_rec *rec)
{
	int ret = 0;

	if (rec->queued) {
		q_unlink(r, rec);
		r->st.hw_cancelled++;
	}
	wait_idle(r, rec);
	if (rec->installed)
		ret = hw_remove_locked(r, rec);
	rec_maybe_free(r, rec);
	return ret;
}

static void *consumer(void *arg)
{
	struct xo_rules *r = arg;

	pthread_mutex_lock(&r->mu);
	for (;;) {
		struct rule_rec *rec;
		struct xo_steer_action act;
		struct xo_flow_key key;
		uint64_t cookie;
		int had, ret;

		while (!r->stop && !r->qhead)
			pthread_cond_wait(&r->work_cv, &r->mu);
		if (r->stop)
			break;
		rec = r->qhead;
		q_unlink(r, rec);
		rec->inflight = 1;
		r->st.inflight = 1;
		act = rec->pending;
		key = rec->key;
		had = rec->installed;
		cookie = had ? rec->cookie : 0;
		pthread_mutex_unlock(&r->mu);

		pthread_mutex_lock(&r->hw_mu);
		ret = r->hw->ops.insert(r->hw->priv, &key, &act, &cookie);
		pthread_mutex_unlock(&r->hw_mu);

		pthread_mutex_lock(&r->mu);
		if (!ret) {
			rec->cookie = cookie;
			set_installed(r, rec, 1);
			r->st.hw_inserted++;
		} else {
			note_hw_error(r);
			/* A failed replace may leave the old action in
			 * hardware, contradicting software: take it out
			 * and let software carry the flow. */
			if (had && rec->installed) {
				rec->inflight = 0;
				hw_remove_locked(r, rec);
			}
		}
		rec->inflight = 0;
		r->st.inflight = 0;
		rec_maybe_free(r, rec);
		pthread_cond_broadcast(&r->done_cv);
	}
	pthread_mutex_unlock(&r->mu);
	return NULL;
}

int xo_rules_create(struct xo_steer *s, int ifindex, struct xo_hw_backend *hw,
		    const struct xo_rules_opts *uopts, struct xo_rules **out)
{
	struct xo_rules_opts o;
	pthread_condattr_t ca;
	struct xo_rules *r;
	sigset_t all, old;
	int err;

	xo_clear_error();
	if (!s || !out)
		return xo_fail(XO_E_INVAL, "xo_rules_create: steer handle and "
			       "out are required");
	*out = NULL;
	memset(&o, 0, sizeof(o));
	if (uopts) {
		if (uopts->size < sizeof(uint32_t) * 2)
			return xo_fail(XO_E_INVAL, "xo_rules_opts.size unset");
		memcpy(&o, uopts,
		       uopts->size < sizeof(o) ? uopts->size : sizeof(o));
	}
	if (!o.queue_capacity)
		o.queue_capacity = XO_RULES_QUEUE_DEFAULT;
	if (!o.hw_kinds)
		o.hw_kinds = XO_RULES_HW_REDIRECT;
	if (o.hw_kinds & ~(uint32_t)(XO_RULES_HW_BLOCK | XO_RULES_HW_REDIRECT |
				     XO_RULES_HW_SRC_REWRITE))
		return xo_fail(XO_E_INVAL, "hw_kinds 0x%x has unknown bits",
			       o.hw_kinds);
	r = calloc(1, sizeof(*r));
	if (!r)
		return xo_fail(XO_E_NOMEM, "xo_rules_create: out of memory");
	r->tab_size = 64;
	r->tab = calloc(r->tab_size, sizeof(*r->tab));
	if (!r->tab) {
		free(r);
		return xo_fail(XO_E_NOMEM, "xo_rules_create: out of memory");
	}
	r->s = s;
	r->ifindex = ifindex;
	r->hw = hw;
	r->hw_kinds = o.hw_kinds;
	r->st.queue_capacity = o.queue_capacity;
	pthread_mutex_init(&r->mu, NULL);
	pthread_mutex_init(&r->hw_mu, NULL);
	pthread_cond_init(&r->work_cv, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&r->done_cv, &ca);
	pthread_condattr_destroy(&ca);

	if (hw) {
		/* The consumer takes no signals: in a host program such as
		 * nginx they belong to the threads that expect them. */
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		err = pthread_create(&r->thr, NULL, consumer, r);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (err) {
			errno = err;
			err = xo_fail_sys("start the hardware rule thread");
			pthread_cond_destroy(&r->work_cv);
			pthread_cond_destroy(&r->done_cv);
			pthread_mutex_destroy(&r->hw_mu);
			pthread_mutex_destroy(&r->mu);
			free(r->tab);
			free(r);
			return err;
		}
		pthread_setname_np(r->thr, "xo-rules");
		r->thr_started = 1;
	}
	*out = r;
	return 0;
}

void xo_rules_destroy(struct xo_rules *r)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->mu);
	r->stop = 1;
	while (r->qhead) {
		q_unlink(r, r->qhead);
		r->st.hw_cancelled++;
	}
	pthread_cond_broadcast(&r->work_cv);
	pthread_mutex_unlock(&r->mu);
	if (r->thr_started)
		pthread_join(r->thr, NULL);

	/* Leave no hardware entry behind: nobody would ever remove it. */
	for (uint32_t i = 0; i < r->tab_size; i++) {
		struct rule_rec *rec = r->tab[i], *next;

		for (; rec; rec = next) {
			next = rec->hnext;
			if (rec->installed && r->hw)
				r->hw->ops.remove(r->hw->priv, &rec->key,
						  rec->cookie);
			free(rec);
		}
	}
	free(r->tab);
	xo_hw_backend_destroy(r->hw);
	pthread_cond_destroy(&r->work_cv);
	pthread_cond_destroy(&r->done_cv);
	pthread_mutex_destroy(&r->hw_mu);
	pthread_mutex_destroy(&r->mu);
	free(r);
}

int xo_rules_insert(struct xo_rules *r, const struct xo_flow_key *key,
		    const struct xo_steer_action *act)
{
	struct rule_rec *rec;
	int ret;

	if (!r)
		return xo_fail(XO_E_INVAL, "xo_rules_insert: no manager");
	ret = xo_steer_insert(r->s, key, act, XO_STEER_UPSERT);
	if (ret)
		return ret;
	pthread_mutex_lock(&r->mu);
	r->st.sw_inserts++;
	if (!r->hw || r->stop)
		goto out;
	rec = rec_find(r, key);
	if (!(r->hw_kinds & (1u << act->kind))) {
		/* Software only; an older hardware entry of this flow (say
		 * the redirect to a previous target) must not outlive it. */
		r->st.sw_only++;
		if (rec)
			ret = hw_forget_locked(r, rec);
		goto out;
	}
	if (rec && rec->queued) {
		/* Not yet sent to the NIC: install the newest action only. */
		rec->pending = *act;
		r->st.hw_coalesced++;
		goto out;
	}
	if (r->st.queue_len >= r->st.queue_capacity) {
		r->st.hw_fallback_full++;
		if (rec)
			ret = hw_forget_locked(r, rec);
		goto out;
	}
	rec = rec ? rec : rec_get(r, key);
	if (!rec) {
		/* No memory for bookkeeping: software carries the flow. */
		r->st.hw_fallback_full++;
		goto out;
	}
	rec->pending = *act;
	q_push(r, rec);
	r->st.hw_enqueued++;
	pthread_cond_signal(&r->work_cv);
out:
	pthread_mutex_unlock(&r->mu);
	return ret;
}

int xo_rules_remove(struct xo_rules *r, const struct xo_flow_key *key)
{
	struct rule_rec *rec;
	int hw_had = 0, ret;

	xo_clear_error();
	if (!r)
		return xo_fail(XO_E_INVAL, "xo_rules_remove: no manager");
	ret = xo_steer_check_key(key);
	if (ret)
		return ret;
	if (r->hw) {
		pthread_mutex_lock(&r->mu);
		rec = rec_find(r, key);
		if (rec) {
			hw_had = 1;
			ret = hw_forget_locked(r, rec);
		}
		pthread_mutex_unlock(&r->mu);
		if (ret)
			/* Hardware still steers the flow: keep software
			 * consistent with it so a retry finds both. */
			return ret;
	}
	if (bpf_map_delete_elem(xo_steer_map_fd(r->s), key) < 0) {
		if (errno != ENOENT)
			return xo_fail_sys("delete from flow map");
		if (!hw_had)
			return xo_fail(XO_E_NOTFOUND, "the flow has no entry");
	}
	pthread_mutex_lock(&r->mu);
	r->st.sw_removes++;
	pthread_mutex_unlock(&r->mu);
	return 0;
}

int xo_rules_drain(struct xo_rules *r, uint32_t timeout_ms)
{
	struct timespec dl;
	int ret = 0;

	xo_clear_error();
	if (!r)
		return xo_fail(XO_E_INVAL, "xo_rules_drain: no manager");
	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&r->mu);
	while (!r->stop && (r->qhead || r->st.inflight)) {
		if (pthread_cond_timedwait(&r->done_cv, &r->mu, &dl) ==
		    ETIMEDOUT) {
			ret = xo_fail(XO_E_BUSY, "hardware queue not drained "
				      "after %u ms (%u queued)", timeout_ms,
				      r->st.queue_len);
			break;
		}
	}
	pthread_mutex_unlock(&r->mu);
	return ret;
}

int xo_rules_hw_state(struct xo_rules *r, const struct xo_flow_key *key)
{
	struct rule_rec *rec;
	int bits = 0;

	xo_clear_error();
	if (!r || !key)
		return xo_fail(XO_E_INVAL, "xo_rules_hw_state: bad argument");
	pthread_mutex_lock(&r->mu);
	rec = rec_find(r, key);
	if (rec)
		bits = (rec->queued ? XO_HW_QUEUED : 0) |
		       (rec->inflight ? XO_HW_INFLIGHT : 0) |
		       (rec->installed ? XO_HW_INSTALLED : 0);
	pthread_mutex_unlock(&r->mu);
	return bits;
}

int64_t xo_rules_sweep(struct xo_rules *r, uint64_t now_ns)
{
	struct xo_flow_key *keys = NULL;
	struct xo_steer_action *acts = NULL;
	int64_t n, cap, removed = 0;
	int ret = 0;

	xo_clear_error();
	if (!r)
		return xo_fail(XO_E_INVAL, "xo_rules_sweep: no manager");
	if (!r->hw)
		return xo_steer_sweep(r->s, now_ns);
	if (!now_ns)
		now_ns = xo_steer_now_ns();
	n = xo_steer_count(r->s);
	if (n < 0)
		return n;
	cap = n + 64; /* entries added meanwhile are not due yet anyway */
	keys = calloc(cap, sizeof(*keys));
	acts = calloc(cap, sizeof(*acts));
	if (!keys || !acts) {
		free(keys);
		free(acts);
		return xo_fail(XO_E_NOMEM, "sweep: out of memory");
	}
	n = xo_steer_list(r->s, keys, acts, (uint32_t)cap);
	if (n > cap)
		n = cap;
	for (int64_t i = 0; i >= 0 && i < n; i++) {
		struct rule_rec *rec;

		if (!acts[i].expires_ns || acts[i].expires_ns > now_ns)
			continue;
		pthread_mutex_lock(&r->mu);
		rec = rec_find(r, &keys[i]);
		ret = rec ? hw_forget_locked(r, rec) : 0;
		pthread_mutex_unlock(&r->mu);
		if (ret)
			break;
		if (bpf_map_delete_elem(xo_steer_map_fd(r->s), &keys[i]) == 0)
			removed++;
		else if (errno != ENOENT) {
			ret = xo_fail_sys("delete from flow map");
			break;
		}
	}
	free(keys);
	free(acts);
	if (n < 0)
		return n;
	return ret ? ret : removed;
}

void xo_rules_get_stats(struct xo_rules *r, struct xo_rules_stats *st)
{
	if (!r || !st)
		return;
	pthread_mutex_lock(&r->mu);
	*st = r->st;
	pthread_mutex_unlock(&r->mu);
}

const char *xo_rules_backend_name(const struct xo_rules *r)
{
	return r ? xo_hw_backend_name(r->hw) : "none";
}

int xo_rules_ifindex(const struct xo_rules *r)
{
	return r ? r->ifindex : 0;
}

int xo_rules_last_hw_error(struct xo_rules *r, char *buf, uint32_t cap)
{
	int n;

	if (!r || !buf || !cap)
		return 0;
	pthread_mutex_lock(&r->mu);
	n = snprintf(buf, cap, "%s", r->hw_err);
	pthread_mutex_unlock(&r->mu);
	return n;
}
