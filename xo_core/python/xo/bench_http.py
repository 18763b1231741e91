"""``xo bench http``: nginx with XO against nginx proxying, wrk from the
client, in one run on one lab.

Lab: a client, the front and 4 targets; every host link rate-limited to the
same rate (htb, both directions, XO control port first), the client's link 4x that. The targets are
nginx with the XO module serving the same files. Per object size
(8 KiB ... 4 MiB) the front runs, one after the other:

- ``proxy``: ``proxy_pass`` to the 4 targets (an upstream with keep-alive
  connections; responses buffered in memory, no temporary files);
- ``xo``: every request handed to a target (``xo_pass``, round robin);
- ``xo+threshold``: files smaller than the threshold proxied as above, the
  others handed over (``xo_pass; xo_threshold SIZE; proxy_pass ...``).

For each, wrk (2 threads, N connections, keep-alive, 30 s request timeout)
for S seconds gives
requests/s, throughput and latency p50/p99; the front's CPU seconds (its
nginx processes' user + system time) per GB served; for the XO modes the
front's handoff steps (its xo_status: the machine's step timings inside the
front nginx, p50/p99 per step).

With ``--rounds N`` the whole sequence runs N times and each cell is the
median of its N runs; the "x proxy" ratios are medians of per-round ratios,
each XO run against the proxy run of the same round (the machine's load
drifts over minutes; a ratio of two runs close in time cancels most of it).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from xo import results
from xo.lab import parse_rate
from xo.nginx_lab import DYNAMIC, STATIC, NginxBuild, NginxCluster, nginx_cluster

SIZES = {"8KiB": 8 << 10, "64KiB": 64 << 10, "256KiB": 256 << 10, "1MiB": 1 << 20,
         "4MiB": 4 << 20}
MODES = ("proxy", "xo", "xo+threshold")
STEPS = ("out.block", "out.serialize", "out.transfer_to_ready", "out.redirect",
         "out.discard_and_host_ready", "out.total", "in_host.decode", "in_host.restore",
         "in_host.remove_redirect", "in_host.resume", "in_host.end_offload", "in_host.total")
# The target's side of an outbound handoff, from each target nginx's xo_status:
# BEGIN_OFFLOAD decoded ... TARGET_READY sent (the part of the front's
# out.transfer_to_ready spent inside a target once it has read the message).
TARGET_STEPS = ("out_target.decode", "out_target.restore", "out_target.rewrite",
                "out_target.ready_send", "out_target.total")
# The targets.
XO_THROUGHPUT_X = 3.2      # XO / proxy at 1 MiB and above
CPU_PER_GB_X = 0.2         # front CPU per GB, XO / proxy
THRESHOLD_FLOOR_X = 0.95   # XO+threshold / proxy at every size
OUT_P50_US = 150.0         # outbound handoff p50 inside the front


def _upstream(c: NginxCluster) -> str:
    servers = "".join(f"server {t.ipv4}:8080; " for t in c.testbed.targets)
    return f"upstream xo_bench_backends {{ {servers}keepalive 64; }}"


PROXY = ("proxy_pass http://xo_bench_backends; proxy_http_version 1.1; "
         "proxy_set_header Connection \"\"; proxy_max_temp_file_size 0;")


def location(mode: str, threshold: int) -> str:
    if mode == "proxy":
        return PROXY
    if mode == "xo":
        return "xo_pass;"
    return f"xo_pass; xo_threshold {threshold}; {PROXY}"


def _cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _front(c: NginxCluster, mode: str, threshold: int) -> None:
    old = c.procs.get("host")
    if old is not None:
        old.stop()
    c.start("host", c.front_conf(location(mode, threshold), _upstream(c)))
    c.wait_targets_up()


def run(rate: str = "250mbit", seconds: float = 5.0, connections: int = 16,
        threshold: str = "256k", build: str = "dynamic",
        sizes: list[str] | None = None, rounds: int = 1) -> dict[str, Any]:
    from rich.progress import Progress

    rate_bps = parse_rate(rate)
    assert rate_bps is not None
    nb: NginxBuild = {"dynamic": DYNAMIC, "static": STATIC}[build]
    if nb.available() is not None:
        raise RuntimeError(f"nginx build {build}: {nb.available()}")
    limit = int(threshold.rstrip("kKmM")) << (10 if threshold[-1] in "kK" else
                                              20 if threshold[-1] in "mM" else 0)
    chosen = {k: SIZES[k] for k in (sizes or list(SIZES))}
    result: dict[str, Any] = {
        "rate": rate, "client_rate": f"{rate_bps * 4 // 1_000_000}mbit", "seconds": seconds,
        "connections": connections, "threshold_bytes": limit, "build": build,
        "targets": 4, "rounds": rounds, "runs": [], "rows": [], "steps": {},
        "target_steps": {}}
    steps: dict[tuple[str, str], list[dict[str, Any]]] = {}
    target_steps: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with nginx_cluster(nb, targets=4, rate=rate,
                       client_rate=result["client_rate"]) as c, Progress() as progress:
        for label, size in chosen.items():
            path = c.docroot / f"{label}.bin"
            path.write_bytes(os.urandom(size))
            path.chmod(0o644)
        for t in c.testbed.targets:
            c.start(t.name, c.target_conf(t.name))
        task = progress.add_task("xo bench http", total=rounds * len(MODES) * len(chosen))
        for rnd in range(rounds):
            for mode in MODES:
                _front(c, mode, limit)
                front = c.procs["host"]
                for label in chosen:
                    progress.update(task, description=f"round {rnd + 1}/{rounds}: {mode} {label}")
                    row = _measure(c, front, mode, label, chosen[label], connections, seconds)
                    row["round"] = rnd
                    if mode != "proxy":
                        st = c.status("host")
                        steps.setdefault((mode, label), []).append(
                            {k: v for k, v in st["steps"].items()  # type: ignore[union-attr]
                             if k in STEPS})
                        row["handoffs"] = st["stats"]["offloads"]  # type: ignore[index]
                        target_steps.setdefault((mode, label), []).append({
                            t.name: {k: v for k, v in  # type: ignore[union-attr]
                                     c.status(t.name)["steps"].items() if k in TARGET_STEPS}
                            for t in c.testbed.targets})
                    result["runs"].append(row)
                    progress.advance(task)
    for mode in MODES:
        for label in chosen:
            result["rows"].append(_median_row(result["runs"], mode, label))
            if (mode, label) in steps:
                result["steps"].setdefault(mode, {})[label] = _median_steps(steps[mode, label])
                result["target_steps"].setdefault(mode, {})[label] = {
                    t: _median_steps([r[t] for r in target_steps[mode, label]])
                    for t in target_steps[mode, label][0]}
    result["verdict"] = verdict(result)
    return result


def _measure(c: NginxCluster, front: Any, mode: str, label: str, size: int,
             connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run of one mode and size, and the front's CPU time during it."""
    c.status("host")  # connections up; then clear the step samples
    if mode != "proxy":
        _status_reset(c, ["host", *(t.name for t in c.testbed.targets)])
    pids = [front.proc.pid, *front.workers()]
    cpu0 = _cpu_seconds(pids)
    w = c.wrk(f"/{label}.bin", connections=connections, seconds=seconds)
    cpu = _cpu_seconds(pids) - cpu0
    gb = w.bytes_read / 1e9
    return {"mode": mode, "size": label, "bytes": size,
            "requests": w.requests, "rps": round(w.rps, 1),
            "mbit_s": round(w.bytes_read * 8 / w.seconds / 1e6, 1),
            "p50_ms": w.latency_ms.get("p50"), "p99_ms": w.latency_ms.get("p99"),
            "front_cpu_s": round(cpu, 3),
            "front_cpu_s_per_gb": round(cpu / gb, 3) if gb else None,
            "non_2xx": w.non_2xx, "socket_errors": sum(w.socket_errors.values())}


def _median(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _median_row(runs: list[dict[str, Any]], mode: str, size: str) -> dict[str, Any]:
    """One cell of the report: medians over the rounds; ratios to the proxy
    taken per round first (each against the proxy run of its own round)."""
    mine = [r for r in runs if r["mode"] == mode and r["size"] == size]
    proxy = {r["round"]: r for r in runs if r["mode"] == "proxy" and r["size"] == size}
    row: dict[str, Any] = {"mode": mode, "size": size, "bytes": mine[0]["bytes"],
                           "rounds": len(mine)}
    for k in ("rps", "mbit_s", "p50_ms", "p99_ms", "front_cpu_s", "front_cpu_s_per_gb"):
        row[k] = _median([r[k] for r in mine])
    for k in ("requests", "non_2xx", "socket_errors", "handoffs"):
        if any(k in r for r in mine):
            row[k] = sum(r.get(k, 0) for r in mine)
    row["x_proxy"] = _median([r["mbit_s"] / proxy[r["round"]]["mbit_s"]
                              for r in mine if proxy[r["round"]]["mbit_s"]])
    cpu_ratios = [r["front_cpu_s_per_gb"] / proxy[r["round"]]["front_cpu_s_per_gb"]
                  for r in mine if r["front_cpu_s_per_gb"] is not None
                  and proxy[r["round"]]["front_cpu_s_per_gb"]]
    row["cpu_x_proxy"] = _median(cpu_ratios)
    row["cpu_x_proxy_each_round"] = [round(x, 3) for x in cpu_ratios]
    return row


def _median_steps(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step, the median over the rounds of its p50 and of its p99."""
    names = {k for s in samples for k in s}
    return {k: {q: _median([s[k][q] for s in samples if k in s]) for q in ("p50_us", "p99_us")}
            for k in names}


def _status_reset(c: NginxCluster, members: list[str]) -> None:
    import subprocess

    for member in members:
        m = c.testbed.member(member)
        subprocess.run(["ip", "netns", "exec", m.netns, "curl", "-sS", "-m", "5", "-o",
                        "/dev/null", f"http://{m.ipv4}:8080/xo_status?reset"], check=True)


def _row(result: dict[str, Any], mode: str, size: str) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["mode"] == mode and r["size"] == size)


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    sizes = sorted({r["size"] for r in result["rows"]}, key=lambda s: SIZES[s])
    big = [s for s in sizes if SIZES[s] >= 1 << 20]
    v: dict[str, bool] = {}
    if big:
        v[f"xo_throughput_>={XO_THROUGHPUT_X}x_proxy_at_1MiB+"] = all(
            (_row(result, "xo", s)["x_proxy"] or 0) >= XO_THROUGHPUT_X for s in big)
        v[f"front_cpu_per_gb_<={CPU_PER_GB_X}x_proxy_at_1MiB+"] = all(
            _row(result, "xo", s)["cpu_x_proxy"] is not None
            and _row(result, "xo", s)["cpu_x_proxy"] <= CPU_PER_GB_X for s in big)
    v[f"threshold_>={THRESHOLD_FLOOR_X}x_proxy_every_size"] = all(
        (_row(result, "xo+threshold", s)["x_proxy"] or 0) >= THRESHOLD_FLOOR_X for s in sizes)
    outs = [st["out.total"]["p50_us"] for st in result["steps"].get("xo", {}).values()
            if "out.total" in st]
    if outs:
        v[f"outbound_handoff_p50_<={OUT_P50_US:.0f}us"] = max(outs) <= OUT_P50_US
    v["no_errors"] = all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in result["runs"])
    local = [sum(st[k]["p50_us"] for k in ("out.block", "out.serialize", "out.redirect",
                                           "out.discard_and_host_ready") if k in st)
             for st in result["steps"].get("xo", {}).values()]
    if local:
        v[f"front_local_out_steps_p50_sum_<={OUT_P50_US:.0f}us"] = max(local) <= OUT_P50_US
    return v


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    rounds = result.get("rounds", 1)
    table = Table(title=f"xo bench http: nginx front, 4 nginx targets, links {result['rate']} "
                        f"(client {result['client_rate']}), wrk {result['connections']} "
                        f"connections x {result['seconds']} s, threshold "
                        f"{result['threshold_bytes'] >> 10} KiB, {result['build']} build"
                        + (f"; medians of {rounds} rounds" if rounds > 1 else ""))
    for col in ("size", "mode", "req/s", "Mbit/s", "x proxy", "p50 ms", "p99 ms",
                "front CPU s/GB", "x proxy CPU", "errors"):
        table.add_column(col, justify="right" if col not in ("mode", "size") else "left")
    for r in result["rows"]:
        table.add_row(r["size"], r["mode"], f"{r['rps']:.0f}", f"{r['mbit_s']:.0f}",
                      f"{r['x_proxy'] or 0:.2f}", f"{r['p50_ms']}", f"{r['p99_ms']}",
                      f"{r['front_cpu_s_per_gb']}", f"{r['cpu_x_proxy'] or 0:.2f}",
                      str(r["non_2xx"] + r["socket_errors"]))
    console.print(table)
    steps = Table(title="handoff steps inside the front nginx (xo mode), p50 / p99 µs")
    sizes = list(result["steps"].get("xo", {}))
    steps.add_column("step")
    for s in sizes:
        steps.add_column(s, justify="right")
    for name in STEPS:
        cells = []
        for s in sizes:
            st = result["steps"]["xo"][s].get(name)
            cells.append(f"{st['p50_us']:.1f} / {st['p99_us']:.1f}" if st else "-")
        steps.add_row(name, *cells)
    targets = result.get("target_steps", {}).get("xo", {})
    for name in TARGET_STEPS:
        cells = []
        for s in sizes:
            p50s = [st[name]["p50_us"] for st in targets.get(s, {}).values() if name in st]
            p99s = [st[name]["p99_us"] for st in targets.get(s, {}).values() if name in st]
            cells.append(f"{min(p50s):.1f}-{max(p50s):.1f} / {max(p99s):.1f}" if p50s else "-")
        steps.add_row(f"(targets) {name}", *cells)
    console.print(steps)
    if targets:
        console.print("(targets) rows: the 4 targets' p50 range / their largest p99")
    for what, ok in result["verdict"].items():
        console.print(f"{'meets' if ok else 'misses'}: {what}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in result["rows"]}, key=lambda s: SIZES[s])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode in MODES:
        rows = [_row(result, mode, s) for s in sizes]
        axes[0].plot(sizes, [r["mbit_s"] for r in rows], marker="o", label=mode)
        axes[1].plot(sizes, [r["front_cpu_s_per_gb"] or 0 for r in rows], marker="o",
                     label=mode)
    axes[0].set_ylabel("Mbit/s (wrk)")
    axes[0].set_title("throughput")
    axes[1].set_ylabel("front CPU s per GB")
    axes[1].set_title("front CPU per GB served")
    for ax in axes:
        ax.set_xlabel("object size")
        ax.legend()
    fig.suptitle(f"nginx: XO vs proxy_pass, {result['rate']} links, client "
                 f"{result['client_rate']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(rate: str, seconds: float, connections: int, threshold: str, build: str,
         json_path: str | None, sizes: list[str] | None = None, rounds: int = 1) -> int:
    start = time.monotonic()
    result = run(rate, seconds, connections, threshold, build, sizes, rounds)
    result["wall_s"] = round(time.monotonic() - start, 1)
    print_report(result)
    results.save(result, json_path, "bench-http", plot)
    return 0
