/* SPDX-License-Identifier: MIT */
/*
 * Fixed-width integer names for BPF code, so the shared ABI header
 * (xo_core/include/xo_steer_abi.h) reads the same in both worlds without
 * pulling glibc's stdint.h, which does not build for the bpf target.
 */
#ifndef XO_BPF_TYPES_H
#define XO_BPF_TYPES_H

#include <linux/types.h>

typedef __u8 uint8_t;
typedef __u16 uint16_t;
typedef __u32 uint32_t;
typedef __u64 uint64_t;

#endif
