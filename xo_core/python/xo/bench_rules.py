"""``xo bench rules``: what a steering rule change costs, beside the paper.

Times insert and remove of one flow in the software tier (the BPF map), once
from C (``xo_steer_bench``: clock_gettime around each call) and once from
Python (``Steer.insert``/``Steer.remove`` with prebuilt FlowKey/Rule objects,
perf_counter_ns around each call), and prints the percentiles next to the
paper's Table 2 (eBPF-tc). The map is a private one (not pinned): the
benchmark never touches rules a running XO instance relies on.

Needs root (loading BPF programs).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from xo.steer import FlowKey, Rule, Steer

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


def run(count: int = 10000, *, quiet: bool = False,
        obj_path: str | Path | None = None) -> dict[str, Any]:
    """Measure ``count`` insert/remove pairs from C and from Python.

    Prints a table (unless ``quiet``) and returns a JSON-able dict.
    """
    if count <= 0:
        raise ValueError("count must be positive")
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
    return "\n".join(lines)


if __name__ == "__main__":
    run()
