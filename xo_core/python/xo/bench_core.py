"""``xo bench core``: cost of capturing and restoring one TCP connection.

A connection lives in namespace A (both ends on lo). Capture is timed on the
frozen host end, again and again (capture does not change the socket).
Restore is timed in namespace B, which holds the same addresses, so the new
socket can take the same 4-tuple; each restored socket is then discarded.
Times are taken around the C call from Python (perf_counter_ns), so they
include the cffi call overhead (well under 1 µs).
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xo import core, results
from xo._xo_cffi import ffi, lib
from xo.lab import add_addresses, in_netns, scoped_namespaces

HOST_IP, CLIENT_IP = "198.18.2.2", "198.18.2.1"
PAPER = {"capture_us": "11-15", "restore_us": "39-42", "syscalls": 13}
TARGET = {"capture_p50_us": 15.0, "capture_syscalls": 13, "restore_p50_us": 40.0}


@contextmanager
def _two_namespaces() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    with scoped_namespaces([f"xo-bench{tag}-a", f"xo-bench{tag}-b"]) as (a, b):
        for ns in (a, b):
            add_addresses(ns, "lo", [f"{HOST_IP}/32", f"{CLIENT_IP}/32"])
        yield a, b


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(s / 1000 for s in samples_ns)
    return {
        "p50_us": round(statistics.median(us), 2),
        "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 2),
        "min_us": round(us[0], 2),
    }


def _measure(ns_a: str, ns_b: str, queued: int, iterations: int) -> dict[str, Any]:
    with in_netns(ns_a):
        listener = socket.socket()
        client = socket.socket()
    listener.bind((HOST_IP, 0))
    listener.listen(1)
    client.bind((CLIENT_IP, 0))
    client.connect(listener.getsockname())
    host, _ = listener.accept()
    listener.close()
    if queued:
        client.sendall(os.urandom(queued))
        deadline = time.monotonic() + 5
        while True:
            core.freeze(host)
            probe = core.capture(host)
            core.resume(host)
            if probe.recvq_len == queued or time.monotonic() > deadline:
                break
    core.freeze(host)
    fd = host.fileno()
    state = core.capture(host)
    scratch = ffi.new("struct xo_tcp_state *")

    capture_ns: list[int] = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        rc = lib.xo_tcp_capture(fd, scratch)
        capture_ns.append(time.perf_counter_ns() - t0)
        core.raise_for(rc)
        lib.xo_state_release(scratch)
    capture_syscalls = core.last_syscalls()

    opts = ffi.new("struct xo_restore_opts *")
    opts.size = ffi.sizeof("struct xo_restore_opts")
    restore_ns: list[int] = []
    with in_netns(ns_b):
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            new_fd = lib.xo_tcp_restore(state.c, opts)
            restore_ns.append(time.perf_counter_ns() - t0)
            core.raise_for(new_fd)
            restore_syscalls = core.last_syscalls()
            core.raise_for(lib.xo_tcp_discard(new_fd))

    encoded = state.encode()
    codec_ns: list[int] = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        core.TcpState.decode(state.encode())
        codec_ns.append(time.perf_counter_ns() - t0)

    core.discard(host)
    client.close()
    return {
        "queued_bytes": queued,
        "capture": {**_percentiles(capture_ns), "syscalls": capture_syscalls},
        "restore": {**_percentiles(restore_ns), "syscalls": restore_syscalls},
        "encode_decode_py": _percentiles(codec_ns),
        "state_bytes": len(encoded),
    }


def run(iterations: int = 2000) -> dict[str, Any]:
    with _two_namespaces() as (ns_a, ns_b):
        cases = {
            "idle": _measure(ns_a, ns_b, 0, iterations),
            "64KiB_queued": _measure(ns_a, ns_b, 64 * 1024, iterations),
        }
    return {"iterations": iterations, "paper": PAPER, "target": TARGET, "cases": cases,
            "kernel": os.uname().release}


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"xo bench core — {result['iterations']} iterations, "
                  f"kernel {result['kernel']}")
    for col in ("case", "op", "p50 µs", "p99 µs", "syscalls", "paper", "target"):
        table.add_column(col)
    for case, r in result["cases"].items():
        table.add_row(case, "capture", str(r["capture"]["p50_us"]), str(r["capture"]["p99_us"]),
                      str(r["capture"]["syscalls"]), "11–15 µs, 13 syscalls",
                      "p50 ≤ 15 µs, ≤ 13 syscalls")
        table.add_row(case, "restore", str(r["restore"]["p50_us"]), str(r["restore"]["p99_us"]),
                      str(r["restore"]["syscalls"]), "39–42 µs", "p50 ≤ 40 µs")
        table.add_row(case, "encode+decode", str(r["encode_decode_py"]["p50_us"]),
                      str(r["encode_decode_py"]["p99_us"]), "0",
                      f"{r['state_bytes']} B state", "")
    Console(width=140).print(table)


def main(iterations: int, json_path: str | None) -> int:
    result = run(iterations)
    print_report(result)
    results.save(result, json_path, "bench-core")
    return 0
