// SPDX-License-Identifier: MIT
/*
 * Hardware backends as ops tables, and the test double: a "NIC" that takes
 * a configurable time per call and records every call, so the rule
 * manager's queue semantics can be tested on a machine without flower.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "steer_internal.h"

int xo_hw_backend_new(const struct xo_hw_ops *ops, void *priv,
		      struct xo_hw_backend **out)
{
	struct xo_hw_backend *hw;

	xo_clear_error();
	if (!ops || !out || !ops->insert || !ops->remove)
		return xo_fail(XO_E_INVAL, "xo_hw_backend_new: ops with insert "
			       "and remove are required");
	hw = calloc(1, sizeof(*hw));
	if (!hw)
		return xo_fail(XO_E_NOMEM, "xo_hw_backend_new: out of memory");
	hw->ops = *ops;
	if (!hw->ops.name)
		hw->ops.name = "custom";
	hw->priv = priv;
	*out = hw;
	return 0;
}

void xo_hw_backend_destroy(struct xo_hw_backend *hw)
{
	if (!hw)
		return;
	if (hw->ops.destroy)
		hw->ops.destroy(hw->priv);
	free(hw);
}

const char *xo_hw_backend_name(const struct xo_hw_backend *hw)
{
	return hw ? hw->ops.name : "none";
}

/*
 * Time count insert+remove pairs of a fresh redirect straight through the
 * backend's ops (no queue, no thread): what one rule costs the NIC path.
 * The flow is 198.19.255.254:port -> 198.19.255.253:9, in the benchmarking
 * range and used by no lab.
 */
int xo_hw_bench(struct xo_hw_backend *hw, uint32_t count,
		uint64_t *insert_ns, uint64_t *remove_ns)
{
	struct xo_flow_key k;
	struct xo_steer_action a;
	uint64_t t0, t1, t2, cookie;
	int ret;

	xo_clear_error();
	if (!hw || !insert_ns || !remove_ns)
		return xo_fail(XO_E_INVAL, "xo_hw_bench: bad argument");
	xo_bench_flow_key(&k);
	memset(&a, 0, sizeof(a));
	a.kind = XO_STEER_REDIRECT;
	memcpy(a.new_dst_addr, (uint8_t[]){ 198, 19, 255, 252 }, 4);
	a.new_dst_port = __builtin_bswap16(18080);
	memcpy(a.dst_mac, (uint8_t[]){ 2, 0, 0xc6, 0x13, 0xff, 0xfc }, 6);
	memcpy(a.src_mac, (uint8_t[]){ 2, 0, 0xc6, 0x13, 0xff, 0xfd }, 6);
	a.expires_ns = xo_steer_now_ns() + 60ull * 1000000000ull;
	for (uint32_t i = 0; i < count; i++) {
		k.src_port = __builtin_bswap16((uint16_t)(1024 + i % 60000));
		cookie = 0;
		t0 = xo_steer_now_ns();
		ret = hw->ops.insert(hw->priv, &k, &a, &cookie);
		t1 = xo_steer_now_ns();
		if (ret)
			return ret;
		ret = hw->ops.remove(hw->priv, &k, cookie);
		t2 = xo_steer_now_ns();
		if (ret)
			return ret;
		insert_ns[i] = t1 - t0;
		remove_ns[i] = t2 - t1;
	}
	return 0;
}

/* ---- the test double ---- */

struct hw_test_entry {
	struct xo_flow_key key;
	uint64_t cookie;
};

struct hw_test {
	pthread_mutex_t mu;
	pthread_cond_t released; /* signalled when hold drops to 0 */
	int hold;                /* inserts wait while set */
	uint32_t inserts_held;   /* inserts waiting now */
	uint32_t insert_delay_us;
	uint32_t remove_delay_us;
	int fail_code;
	uint64_t next_cookie;
	struct xo_hw_call *calls;
	uint32_t ncalls, calls_cap;
	struct hw_test_entry *ents;
	uint32_t nents, ents_cap;
};

static void sleep_us(uint32_t us)
{
	struct timespec ts = { .tv_sec = us / 1000000,
			       .tv_nsec = (long)(us % 1000000) * 1000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int record(struct hw_test *t, uint32_t op, uint32_t kind,
		  const struct xo_flow_key *k, uint64_t cookie,
		  uint64_t start)
{
	struct xo_hw_call *c;

	if (t->ncalls == t->calls_cap) {
		uint32_t ncap = t->calls_cap ? t->calls_cap * 2 : 64;
		void *n = realloc(t->calls, ncap * sizeof(*t->calls));

		if (!n)
			return xo_fail(XO_E_NOMEM, "test backend: out of memory");
		t->calls = n;
		t->calls_cap = ncap;
	}
	c = &t->calls[t->ncalls++];
	memset(c, 0, sizeof(*c));
	c->op = op;
	c->kind = kind;
	c->key = *k;
	c->cookie = cookie;
	c->start_ns = start;
	c->end_ns = xo_steer_now_ns();
	return 0;
}

static int find_ent(struct hw_test *t, const struct xo_flow_key *k)
{
	for (uint32_t i = 0; i < t->nents; i++)
		if (!memcmp(&t->ents[i].key, k, sizeof(*k)))
			return (int)i;
	return -1;
}

static int hw_test_insert(void *priv, const struct xo_flow_key *k,
			  const struct xo_steer_action *a, uint64_t *cookie)
{
	struct hw_test *t = priv;
	uint64_t start = xo_steer_now_ns();
	int ret, i;

	/* The delay is outside the lock: a slow NIC must not stop the test
	 * from looking at the table meanwhile. A hold (xo_hw_test_hold) keeps
	 * the insert in flight until the test releases it: a window that does
	 * not depend on how fast the machine is. */
	sleep_us(t->insert_delay_us);
	pthread_mutex_lock(&t->mu);
	if (t->hold) {
		t->inserts_held++;
		while (t->hold)
			pthread_cond_wait(&t->released, &t->mu);
		t->inserts_held--;
	}
	if (t->fail_code) {
		ret = xo_fail(t->fail_code, "test backend: injected insert "
			      "failure");
		record(t, XO_HW_CALL_INSERT, a->kind, k, *cookie, start);
		pthread_mutex_unlock(&t->mu);
		return ret;
	}
	i = find_ent(t, k);
	if (i < 0) {
		if (t->nents == t->ents_cap) {
			uint32_t ncap = t->ents_cap ? t->ents_cap * 2 : 64;
			void *n = realloc(t->ents, ncap * sizeof(*t->ents));

			if (!n) {
				pthread_mutex_unlock(&t->mu);
				return xo_fail(XO_E_NOMEM, "test backend: out "
					       "of memory");
			}
			t->ents = n;
			t->ents_cap = ncap;
		}
		i = (int)t->nents++;
		t->ents[i].key = *k;
	}
	t->ents[i].cookie = *cookie ? *cookie : ++t->next_cookie;
	*cookie = t->ents[i].cookie;
	ret = record(t, XO_HW_CALL_INSERT, a->kind, k, *cookie, start);
	pthread_mutex_unlock(&t->mu);
	return ret;
}

static int hw_test_remove(void *priv, const struct xo_flow_key *k,
			  uint64_t cookie)
{
	struct hw_test *t = priv;
	uint64_t start = xo_steer_now_ns();
	int ret, i;

	sleep_us(t->remove_delay_us);
	pthread_mutex_lock(&t->mu);
	i = find_ent(t, k);
	if (i >= 0 && t->ents[i].cookie == cookie)
		t->ents[i] = t->ents[--t->nents];
	ret = record(t, XO_HW_CALL_REMOVE, 0, k, cookie, start);
	pthread_mutex_unlock(&t->mu);
	if (!ret && i < 0)
		ret = xo_fail(XO_E_NOTFOUND, "test backend: remove of a flow "
			      "it does not hold");
	return ret;
}

static void hw_test_destroy(void *priv)
{
	struct hw_test *t = priv;

	pthread_cond_destroy(&t->released);
	pthread_mutex_destroy(&t->mu);
	free(t->calls);
	free(t->ents);
	free(t);
}

static const struct xo_hw_ops hw_test_ops = {
	.name = "test",
	.insert = hw_test_insert,
	.remove = hw_test_remove,
	.destroy = hw_test_destroy,
};

int xo_hw_test_create(uint32_t insert_delay_us, uint32_t remove_delay_us,
		      struct xo_hw_backend **out)
{
	struct hw_test *t;
	int ret;

	xo_clear_error();
	if (!out)
		return xo_fail(XO_E_INVAL, "xo_hw_test_create: out is NULL");
	t = calloc(1, sizeof(*t));
	if (!t)
		return xo_fail(XO_E_NOMEM, "xo_hw_test_create: out of memory");
	pthread_mutex_init(&t->mu, NULL);
	pthread_cond_init(&t->released, NULL);
	t->insert_delay_us = insert_delay_us;
	t->remove_delay_us = remove_delay_us;
	ret = xo_hw_backend_new(&hw_test_ops, t, out);
	if (ret)
		hw_test_destroy(t);
	return ret;
}

static struct hw_test *as_test(struct xo_hw_backend *hw)
{
	if (!hw || hw->ops.insert != hw_test_insert)
		return NULL;
	return hw->priv;
}

int64_t xo_hw_test_calls(struct xo_hw_backend *hw, struct xo_hw_call *calls,
			 uint32_t cap)
{
	struct hw_test *t = as_test(hw);
	int64_t n;

	xo_clear_error();
	if (!t || (cap && !calls))
		return xo_fail(XO_E_INVAL, "not a test backend");
	pthread_mutex_lock(&t->mu);
	n = t->ncalls;
	if (cap)
		memcpy(calls, t->calls,
		       (n < cap ? (size_t)n : cap) * sizeof(*calls));
	pthread_mutex_unlock(&t->mu);
	return n;
}

int64_t xo_hw_test_installed(struct xo_hw_backend *hw)
{
	struct hw_test *t = as_test(hw);
	int64_t n;

	xo_clear_error();
	if (!t)
		return xo_fail(XO_E_INVAL, "not a test backend");
	pthread_mutex_lock(&t->mu);
	n = t->nents;
	pthread_mutex_unlock(&t->mu);
	return n;
}

int xo_hw_test_has(struct xo_hw_backend *hw, const struct xo_flow_key *key)
{
	struct hw_test *t = as_test(hw);
	int has;

	xo_clear_error();
	if (!t || !key)
		return xo_fail(XO_E_INVAL, "not a test backend");
	pthread_mutex_lock(&t->mu);
	has = find_ent(t, key) >= 0;
	pthread_mutex_unlock(&t->mu);
	return has;
}

int xo_hw_test_fail_inserts(struct xo_hw_backend *hw, int code)
{
	struct hw_test *t = as_test(hw);

	xo_clear_error();
	if (!t || code > 0)
		return xo_fail(XO_E_INVAL, "not a test backend, or code > 0");
	pthread_mutex_lock(&t->mu);
	t->fail_code = code;
	pthread_mutex_unlock(&t->mu);
	return 0;
}

int xo_hw_test_hold(struct xo_hw_backend *hw, int hold)
{
	struct hw_test *t = as_test(hw);

	xo_clear_error();
	if (!t)
		return xo_fail(XO_E_INVAL, "not a test backend");
	pthread_mutex_lock(&t->mu);
	t->hold = !!hold;
	if (!hold)
		pthread_cond_broadcast(&t->released);
	pthread_mutex_unlock(&t->mu);
	return 0;
}

int64_t xo_hw_test_held(struct xo_hw_backend *hw)
{
	struct hw_test *t = as_test(hw);
	int64_t n;

	xo_clear_error();
	if (!t)
		return xo_fail(XO_E_INVAL, "not a test backend");
	pthread_mutex_lock(&t->mu);
	n = t->inserts_held;
	pthread_mutex_unlock(&t->mu);
	return n;
}
