"""``xo bench latency``: what a keep-alive client waits per request, XO
against the same reference app proxying through the host, in one run on the
same lab, with the client's retransmissions counted.

For each mode (xo, proxy, xo+threshold) and each object (4 KiB, 4 MiB) one keep-alive
connection from the client namespace sends N GETs one after another; each
request's time from send to the last body byte is a sample. The client
namespace's TcpRetransSegs, TCPLossProbes and TCPTimeouts are read before
and after each series: a handoff that dropped a client segment shows there
(and as a ~200 ms request). xo+threshold is the xo mode with the host's
``offload_min_bytes`` (THRESHOLD_BYTES): the 4 KiB object is proxied, the
4 MiB one handed off. It is a Python-host setting (the C driver has no proxy),
so that row runs the Python driver whatever --driver says.
"""

from __future__ import annotations

import secrets
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from xo import http1, results
from xo import lab as xolab
from xo.demo import cluster
from xo.refapp import HTTP_PORT

OBJECTS = {"4KiB": "/small.bin", "4MiB": "/large.bin"}
MODES = ("xo", "proxy", "xo+threshold")
THRESHOLD_BYTES = 256 * 1024  # as `xo bench http`'s xo_threshold
# Targets (issue): XO's p99 within 1.5x the proxy's for 4 KiB and below it for
# 4 MiB, no request over 100 ms, no retransmission.
P99_RATIO_4K = 1.5
MAX_MS = 100.0


def _netstat(ns: str) -> dict[str, int]:
    with xolab.in_netns(ns):
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        tcp = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
        with open("/proc/thread-self/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        ext = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    return {"TcpRetransSegs": tcp["RetransSegs"], "TCPLossProbes": ext["TCPLossProbes"],
            "TCPTimeouts": ext["TCPTimeouts"]}


def timed_gets(testbed: xolab.Lab, path: str, count: int, progress: Any,
               task: Any) -> list[float]:
    """count GETs of path on one keep-alive connection from the client
    namespace; each one's milliseconds from send to its last body byte."""
    with xolab.in_netns(testbed.client.netns):
        sock = socket.create_connection((testbed.host.ipv4, HTTP_PORT), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = http1.get_request(path)
    samples: list[float] = []
    rest = bytearray()
    with sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(request)
            response = http1.recv_response(sock, rest, keep_body=False)
            if response.status != 200:
                raise RuntimeError(f"unexpected response: {response.raw[:80]!r}")
            samples.append((time.perf_counter() - start) * 1000)
            progress.advance(task)
    return samples


def _summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "max_ms": round(ordered[-1], 3)}


def run(count: int = 1000, rate: str | None = None, driver: str = "py") -> dict[str, Any]:
    from rich.progress import Progress

    result: dict[str, Any] = {"requests": count, "rate": rate or "unlimited", "driver": driver,
                              "modes": {}}
    with Progress(transient=True) as progress:
        for mode in MODES:
            name = f"bl{mode[0]}{secrets.token_hex(2)}"  # unique per run
            drivers = {"*": driver} if mode == "xo" else {}
            threshold = THRESHOLD_BYTES if mode == "xo+threshold" else 0
            with cluster(targets=2, name=name, rate=rate, mode=mode.split("+")[0],
                         drivers=drivers, offload_min_bytes=threshold) as apps:
                ns = apps.testbed.client.netns
                for label, path in OBJECTS.items():
                    task = progress.add_task(f"{mode} {label}", total=count)
                    before = _netstat(ns)
                    samples = timed_gets(apps.testbed, path, count, progress, task)
                    after = _netstat(ns)
                    result["modes"].setdefault(mode, {})[label] = {
                        **_summary(samples),
                        "client_resends": {k: after[k] - before[k] for k in after}}
                stats = apps.host_stats(settled=True)
                result.setdefault("host_stats", {})[mode] = {
                    k: stats.get(k, 0) for k in ("offloads", "rollbacks", "proxied",
                                                 "below_offload_min", "served_locally")}
    xo, proxy = result["modes"]["xo"], result["modes"]["proxy"]
    thr = result["modes"]["xo+threshold"]
    result["threshold_bytes"] = THRESHOLD_BYTES
    result["verdict"] = {
        "4KiB_p99_within_1.5x_proxy":
            xo["4KiB"]["p99_ms"] <= P99_RATIO_4K * proxy["4KiB"]["p99_ms"],
        "4MiB_p99_below_proxy": xo["4MiB"]["p99_ms"] < proxy["4MiB"]["p99_ms"],
        "no_request_over_100ms": max(xo[k]["max_ms"] for k in OBJECTS) <= MAX_MS,
        "no_retransmission": all(v == 0 for k in OBJECTS
                                 for v in xo[k]["client_resends"].values()),
        "threshold_4KiB_p99_within_1.5x_proxy":
            thr["4KiB"]["p99_ms"] <= P99_RATIO_4K * proxy["4KiB"]["p99_ms"],
        "threshold_4MiB_p99_below_proxy": thr["4MiB"]["p99_ms"] < proxy["4MiB"]["p99_ms"],
        "threshold_no_request_over_100ms": max(thr[k]["max_ms"] for k in OBJECTS) <= MAX_MS,
        "threshold_no_retransmission": all(v == 0 for k in OBJECTS
                                           for v in thr[k]["client_resends"].values()),
    }
    return result


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"keep-alive request latency, {result['requests']} requests per row, "
                        f"{result['rate']} links, XO driver {result['driver']}")
    for col in ("mode", "object", "p50 ms", "p99 ms", "max ms", "client resends"):
        table.add_column(col)
    for mode, rows in result["modes"].items():
        for label, r in rows.items():
            resends = ", ".join(f"{k} {v}" for k, v in r["client_resends"].items())
            table.add_row(mode, label, str(r["p50_ms"]), str(r["p99_ms"]), str(r["max_ms"]),
                          resends)
    console = Console(width=140)
    console.print(table)
    console.print(f"xo+threshold: offload_min_bytes {result['threshold_bytes']}, Python host; "
                  "host counters per mode: " + "; ".join(
                      f"{m} " + ", ".join(f"{k} {v}" for k, v in s.items())
                      for m, s in result["host_stats"].items()))
    for what, ok in result["verdict"].items():
        console.print(f"{'meets' if ok else 'misses'}: {what}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTS), figsize=(9, 3.2))
    for ax, label in zip(axes, OBJECTS, strict=True):
        modes = list(result["modes"])
        for i, stat in enumerate(("p50_ms", "p99_ms", "max_ms")):
            ax.bar([x + i * 0.25 for x in range(len(modes))],
                   [result["modes"][m][label][stat] for m in modes], width=0.25,
                   label=stat.removesuffix("_ms"))
        ax.set_xticks([x + 0.25 for x in range(len(modes))], modes)
        ax.set_title(label)
        ax.set_ylabel("ms")
    axes[0].legend()
    fig.suptitle(f"request latency, XO vs proxy ({result['rate']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(count: int, rate: str | None, driver: str, json_path: str | None) -> int:
    result = run(count, rate, driver)
    print_report(result)
    results.save(result, json_path, "bench-latency", plot)
    return 0
