/* SPDX-License-Identifier: MIT */
/*
 * xo_probe.h - what this machine's kernel lets XO do (`xo doctor`).
 *
 * Each probe exercises the real thing rather than trusting a config file:
 * a TCP_REPAIR freeze/capture/resume on a loopback connection, a BPF map
 * and program, the mount table for a bpffs, a clsact qdisc with a cls_bpf
 * program, an XDP program on a veth, the kernel TLS ULP, and the tc-flower
 * backend's own probe (xo_hw_flower_create). Probes that touch interfaces
 * run in a private, unnamed network namespace the calling thread enters
 * and leaves again; it vanishes with its interfaces when the probe
 * returns, so nothing is left behind even if the process dies.
 *
 * A probe that cannot tell (it could not build its test bed, or was not
 * permitted to run the test) says XO_PROBE_UNKNOWN and why, never OK.
 */
#ifndef XO_PROBE_H
#define XO_PROBE_H

#include <stdint.h>

#include "xo.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XO_CDEF_BEGIN */

/* xo_probe_result.status */
#define XO_PROBE_OK 0      /* the feature works */
#define XO_PROBE_MISSING 1 /* the kernel refused it: see disables, remedy */
#define XO_PROBE_UNKNOWN 2 /* could not determine; detail says why */

/* The probes, in the order `xo doctor` lists them. */
#define XO_PROBE_TCP_REPAIR 0
#define XO_PROBE_BPF 1
#define XO_PROBE_BPFFS 2
#define XO_PROBE_CLSACT 3
#define XO_PROBE_XDP 4
#define XO_PROBE_KTLS 5
#define XO_PROBE_FLOWER 6
#define XO_PROBE_COUNT 7

struct xo_probe_result {
	uint32_t status;     /* XO_PROBE_* */
	uint32_t reserved;
	char name[48];       /* e.g. "TCP_REPAIR" */
	char detail[640];    /* what the probe saw, with errno and context */
	char disables[192];  /* what XO cannot do without it ("" when OK) */
	char remedy[256];    /* what to do about it ("" when OK) */
};

/* Run probe id (XO_PROBE_*) and describe the outcome in *res. Returns 0
 * whenever *res holds a result, whatever its status; XO_E_INVAL for an
 * unknown id or a NULL res. */
int xo_probe_run(uint32_t id, struct xo_probe_result *res);

/* XO_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* XO_PROBE_H */
