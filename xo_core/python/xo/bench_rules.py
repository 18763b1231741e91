"""``xo bench rules``: what a steering rule change costs, beside the paper.

Times insert and remove of one flow in the software tier (the BPF map), once
from C (``xo_steer_bench``: clock_gettime around each call) and once from
Python (``Steer.insert``/``Steer.remove`` with prebuilt FlowKey/Rule objects,
perf_counter_ns around each call), and prints the percentiles next to the
paper's Table 2 (eBPF-tc). The map is a private one (not pinned): the
benchmark never touches rules a running XO instance relies on.

With ``flower_count`` > 0 it also times the hardware tier's tc-flower path
on a veth in a namespace of its own (software filters, ``skip_hw``): a
redirect filter (match, pedit, csum, mirred) inserted and removed through
the core's rtnetlink path (``xo_hw_bench``), next to the same filter added
and deleted by one ``tc`` process per rule, the way the paper's baseline
(and the design's warning) has it. Kernels without tc-flower (this
development machine) report it unavailable; the full-kernel lane has it:
``bash ci/vmlane.sh run '.venv/bin/xo bench rules'``.

Needs root (loading BPF programs, namespaces).
"""

from __future__ import annotations

import os
import platform
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from xo.core import XoUnsupportedError
from xo.lab.namespaces import add_veth, scoped_namespaces, set_up
from xo.steer import FlowKey, HwBackend, Rule, Steer

# Paper (APNet '25), Table 2: eBPF-tc rule insert / remove, microseconds.
PAPER_TABLE2_US = {"insert": 4.01, "remove": 3.77}
# What this project aims at (design notes, section 8).
TARGET_US = {"c": 1.0, "python": 3.0}


def _pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx] / 1000.0


def _summary(samples: list[int]) -> dict[str, float]:
    return {
        "p50_us": round(_pct(samples, 0.50), 3),
        "p99_us": round(_pct(samples, 0.99), 3),
        "mean_us": round(sum(samples) / len(samples) / 1000.0, 3),
    }


def _python_loop(steer: Steer, count: int) -> tuple[list[int], list[int]]:
    rule = Rule.block(ttl_s=60)
    # Same flows as the C loop: 198.19.255.254:port -> 198.19.255.253:9.
    keys = [FlowKey.tcp("198.19.255.254", 1024 + i % 60000, "198.19.255.253", 9)
            for i in range(count)]
    ins: list[int] = []
    rem: list[int] = []
    clock = time.perf_counter_ns
    insert, remove = steer.insert, steer.remove
    for key in keys:
        t0 = clock()
        insert(key, rule)
        t1 = clock()
        remove(key)
        t2 = clock()
        ins.append(t1 - t0)
        rem.append(t2 - t1)
    return ins, rem


def _tc_redirect_argv(ns: str, dev: str, handle: int, sport: int) -> list[str]:
    """tc(8) for the filter xo_hw_bench installs (same match and actions)."""
    return ["tc", "-n", ns, "filter", "add", "dev", dev, "ingress", "protocol", "ip",
            "prio", "256", "handle", str(handle), "flower", "skip_hw",
            "src_ip", "198.19.255.254", "dst_ip", "198.19.255.253", "ip_proto", "tcp",
            "src_port", str(sport), "dst_port", "9",
            "action", "pedit", "ex", "munge", "eth", "dst", "set", "02:00:c6:13:ff:fc",
            "munge", "eth", "src", "set", "02:00:c6:13:ff:fd",
            "munge", "ip", "dst", "set", "198.19.255.252",
            "munge", "tcp", "dport", "set", "18080", "pipe",
            "action", "csum", "ip", "tcp", "pipe",
            "action", "mirred", "egress", "redirect", "dev", dev]


def _flower(count: int, tc_count: int) -> dict[str, Any]:
    """tc-flower insert/remove: the core's netlink path, and tc processes."""
    tag = secrets.token_hex(3)
    ns, dev = f"xo-bench-{tag}", f"xob{tag}"
    with scoped_namespaces([ns]):
        add_veth(ns, dev, ns, f"{dev}p", up=False)
        ifindex = set_up(ns, dev)
        try:
            hw = HwBackend.flower(ifindex, mode="skip_hw", netns=f"/run/netns/{ns}")
        except XoUnsupportedError as exc:
            return {"available": False, "reason": str(exc).split(". ")[0]}
        try:
            hw.bench(min(100, count))  # warm-up: modules, caches
            ins, rem = hw.bench(count)
        finally:
            hw.close()
        tc_ins: list[int] = []
        tc_rem: list[int] = []
        clock = time.perf_counter_ns
        for i in range(tc_count):
            t0 = clock()
            subprocess.run(_tc_redirect_argv(ns, dev, i + 1, 1024 + i), check=True,
                           capture_output=True)
            t1 = clock()
            subprocess.run(["tc", "-n", ns, "filter", "del", "dev", dev, "ingress",
                            "protocol", "ip", "prio", "256", "handle", str(i + 1), "flower"],
                           check=True, capture_output=True)
            t2 = clock()
            tc_ins.append(t1 - t0)
            tc_rem.append(t2 - t1)
    out: dict[str, Any] = {
        "available": True,
        "netns": ns,
        "count": count,
        "core": {"insert": _summary(ins), "remove": _summary(rem)},
    }
    if tc_count:
        out["tc_count"] = tc_count
        out["tc"] = {"insert": _summary(tc_ins), "remove": _summary(tc_rem)}
    return out


def run(count: int = 10000, *, quiet: bool = False, obj_path: str | Path | None = None,
        flower_count: int = 0, tc_count: int = 100) -> dict[str, Any]:
    """Measure ``count`` insert/remove pairs from C and from Python, and
    ``flower_count`` tc-flower pairs through the core (``tc_count`` with
    tc processes) when ``flower_count`` > 0.

    Prints a table (unless ``quiet``) and returns a JSON-able dict.
    """
    if count <= 0 or flower_count < 0 or tc_count < 0:
        raise ValueError("counts must be positive")
    warmup = min(1000, count)
    with Steer(obj_path, pin=False) as steer:
        steer.bench(warmup)
        c_ins, c_rem, floor = steer.bench(count)
        _python_loop(steer, warmup)
        py_ins, py_rem = _python_loop(steer, count)

    result: dict[str, Any] = {
        "count": count,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "paper_table2_us": dict(PAPER_TABLE2_US),
        "target_us": dict(TARGET_US),
        "c": {"insert": _summary(c_ins), "remove": _summary(c_rem)},
        "python": {"insert": _summary(py_ins), "remove": _summary(py_rem)},
        # The cheapest bpf() map call on this machine (a lookup that
        # misses): no rule change from user space can cost less.
        "bpf_syscall_floor": _summary(floor),
    }
    for side in ("c", "python"):
        worst = max(result[side]["insert"]["p50_us"], result[side]["remove"]["p50_us"])
        result[side]["meets_target"] = worst <= TARGET_US[side]
    if flower_count:
        result["flower"] = _flower(flower_count, tc_count)
    if not quiet:
        print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    paper = result["paper_table2_us"]
    rows = [
        ("paper Table 2 (eBPF-tc)", f"{paper['insert']:.2f}", "-", f"{paper['remove']:.2f}", "-"),
    ]
    for side, label in (("c", "XO software tier, from C"),
                        ("python", "XO software tier, from Python")):
        ins, rem = result[side]["insert"], result[side]["remove"]
        rows.append((label, f"{ins['p50_us']:.2f}", f"{ins['p99_us']:.2f}",
                     f"{rem['p50_us']:.2f}", f"{rem['p99_us']:.2f}"))
    flower = result.get("flower")
    if flower and flower["available"]:
        sides = [("core", "tc-flower skip_hw, core rtnetlink")]
        if "tc" in flower:
            sides.append(("tc", "tc-flower skip_hw, one tc process each"))
        for side, label in sides:
            ins, rem = flower[side]["insert"], flower[side]["remove"]
            rows.append((label, f"{ins['p50_us']:.2f}", f"{ins['p99_us']:.2f}",
                         f"{rem['p50_us']:.2f}", f"{rem['p99_us']:.2f}"))
    head = ("rule cost, µs", "insert p50", "p99", "remove p50", "p99")
    width = max(len(r[0]) for r in [*rows, head, ("bpf() floor (missing-key lookup)",)])
    lines = [f"{head[0]:<{width}}  " + "  ".join(f"{h:>10}" for h in head[1:])]
    lines += [f"{r[0]:<{width}}  " + "  ".join(f"{c:>10}" for c in r[1:]) for r in rows]
    fl = result["bpf_syscall_floor"]
    lines.append(f"{'bpf() floor (missing-key lookup)':<{width}}  "
                 f"{fl['p50_us']:>10.2f}  {fl['p99_us']:>10.2f}")
    tgt = result["target_us"]
    lines.append(
        f"target: <= {tgt['c']:g} µs from C ({'met' if result['c']['meets_target'] else 'missed'}),"
        f" <= {tgt['python']:g} µs from Python"
        f" ({'met' if result['python']['meets_target'] else 'missed'});"
        f" {result['count']} pairs, kernel {result['machine']['kernel']}")
    if flower and flower["available"]:
        lines.append(f"tc-flower: {flower['count']} redirect filters through the core, "
                     f"{flower.get('tc_count', 0)} with tc(8); software filters on a veth")
    elif flower:
        lines.append(f"tc-flower: not measured: {flower['reason']} (the full-kernel lane has "
                     "it: bash ci/vmlane.sh run '.venv/bin/xo bench rules')")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
