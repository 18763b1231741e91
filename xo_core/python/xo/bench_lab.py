"""``xo bench lab``: XO against the same software proxying, side by side.

The paper's testbed in miniature: one client, one host and N targets on one
bridge, the host and target links rate-limited equally (htb), the client's
link not. The same reference application runs twice on the same lab setup:

* ``proxy`` — the host relays each request to a target's plain HTTP port and
  every response byte back through itself (what nginx ``proxy_pass`` does);
* ``xo`` — the host hands each connection to a target, which answers the
  client directly, and takes it back after the response.

C client connections fetch the same file in a loop for a fixed time. Printed:
throughput of each, the ratio, bytes the host's link carried, and the host
process's CPU time per GB served (user + system; the eBPF redirect runs in
softirq context and is not in it).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from xo import http1, results
from xo import lab as xolab
from xo.demo import cluster, iface_tx_bytes
from xo.refapp import HTTP_PORT

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def _client(sock: socket.socket, request: bytes, deadline: float) -> int:
    """Fetch in a loop on one keep-alive connection; returns body bytes."""
    loop = asyncio.get_running_loop()
    got = 0
    rest = bytearray()
    recv = functools.partial(loop.sock_recv, sock)
    while time.monotonic() < deadline:
        await loop.sock_sendall(sock, request)
        try:
            response = await http1.recv_response_async(recv, rest, keep_body=False)
        except http1.HTTPError as exc:
            raise ConnectionError(f"server: {exc}") from exc
        got += response.body_length
    return got


def run_clients(testbed: xolab.Lab, connections: int, seconds: float, path: str) -> int:
    socks = []
    with xolab.in_netns(testbed.client.netns):
        for _ in range(connections):
            socks.append(socket.create_connection((testbed.host.ipv4, HTTP_PORT), timeout=10))
    for sock in socks:
        sock.setblocking(False)
    request = http1.get_request(path)

    async def all_clients() -> list[int]:
        deadline = time.monotonic() + seconds
        return await asyncio.gather(*(_client(s, request, deadline) for s in socks))

    try:
        return sum(asyncio.run(all_clients()))
    finally:
        for sock in socks:
            sock.close()


def measure(mode: str, targets: int, rate: str, connections: int, seconds: float,
            path: str) -> dict[str, Any]:
    name = f"bl{mode[0]}{secrets.token_hex(2)}"  # unique per run
    with cluster(targets=targets, name=name, rate=rate, mode=mode) as apps:
        pid = apps.procs["host"].pid
        run_clients(apps.testbed, connections, 1.0, path)  # warm-up
        cpu0, tx0, t0 = cpu_seconds(pid), iface_tx_bytes(apps.testbed, "host"), time.monotonic()
        served = run_clients(apps.testbed, connections, seconds, path)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        host_tx = iface_tx_bytes(apps.testbed, "host") - tx0
        stats = apps.host_stats()
    return {
        "mode": mode, "bytes": served, "seconds": round(elapsed, 3),
        "throughput_mbit_s": round(served * 8 / elapsed / 1e6, 1),
        "host_link_tx_bytes": host_tx,
        "host_cpu_s": round(cpu, 3),
        "host_cpu_s_per_gb": round(cpu / max(served / 1e9, 1e-9), 3),
        "handoffs": stats["offloads"], "proxied": stats["proxied"],
    }


def run(targets: int = 2, rate: str = "200mbit", connections: int = 8, seconds: float = 5.0,
        path: str = "/large.bin") -> dict[str, Any]:
    from rich.console import Console

    console = Console()
    results = {}
    for mode in ("proxy", "xo"):
        console.print(f"[bold]{mode}[/]: {connections} connections, {seconds:.0f} s, "
                      f"{targets} targets, host/target links {rate} ...")
        results[mode] = measure(mode, targets, rate, connections, seconds, path)
    ratio = results["xo"]["throughput_mbit_s"] / max(results["proxy"]["throughput_mbit_s"], 1e-9)
    return {"targets": targets, "link_rate": rate, "connections": connections,
            "file": path, "results": results, "throughput_ratio_xo_over_proxy": round(ratio, 2)}


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"xo bench lab — {result['targets']} targets, links {result['link_rate']}, "
                  f"{result['connections']} connections fetching {result['file']}")
    for col in ("mode", "throughput Mbit/s", "host link sent MB", "host CPU s",
                "host CPU s / GB", "handoffs", "proxied"):
        table.add_column(col)
    for r in result["results"].values():
        table.add_row(r["mode"], str(r["throughput_mbit_s"]),
                      f"{r['host_link_tx_bytes'] / 1e6:.1f}", str(r["host_cpu_s"]),
                      str(r["host_cpu_s_per_gb"]), str(r["handoffs"]), str(r["proxied"]))
    console = Console(width=140)
    console.print(table)
    console.print(f"XO / proxy throughput: {result['throughput_ratio_xo_over_proxy']}x")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["results"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.bar(modes, [result["results"][m]["throughput_mbit_s"] for m in modes],
            color=["#999999", "#2a7ab0"])
    ax1.set_ylabel("Mbit/s")
    ax1.set_title("client throughput")
    ax2.bar(modes, [result["results"][m]["host_cpu_s_per_gb"] for m in modes],
            color=["#999999", "#2a7ab0"])
    ax2.set_ylabel("host CPU s per GB")
    ax2.set_title("host CPU per GB served")
    fig.suptitle(f"{result['targets']} targets, links {result['link_rate']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(targets: int, rate: str, connections: int, seconds: float,
         json_path: str | None) -> int:
    result = run(targets, rate, connections, seconds)
    print_report(result)
    results.save(result, json_path, "bench-lab", plot)
    return 0
