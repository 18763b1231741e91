"""``xo bench handoff``: where the time of one connection handoff goes.

Runs the reference app in the lab (host + targets as real processes), sends
N requests on one keep-alive connection from the client namespace (each
request = one outbound transfer host→target and one inbound transfer back),
then reads the per-step timings both sides recorded and prints p50/p99 per
step beside the paper's Table 3 (APNet'25) and the NSDI'26 figure. Both
drivers of the core's protocol machine run in the same invocation: the C
poll() driver (xo-driver) and the Python asyncio engine.
"""

from __future__ import annotations

import json
import secrets
import statistics
from pathlib import Path
from typing import Any

from xo import lab as xolab
from xo import results
from xo.demo import cluster

# (row label, process, step name, paper APNet'25 µs, NSDI'26 µs)
OUTBOUND = [
    ("(H) block flow", "host", "out.block", "5", "4"),
    ("(H) freeze + serialize TCP + encode", "host", "out.serialize", "15", "11"),
    ("(H) BEGIN_OFFLOAD → TARGET_READY", "host", "out.transfer_to_ready", "404", "148"),
    ("    (T) decode state", "target", "out_target.decode", "", ""),
    ("    (T) restore TCP", "target", "out_target.restore", "42", "39"),
    ("    (T) install source rewrite", "target", "out_target.rewrite", "95", "5"),
    ("    (T) send TARGET_READY", "target", "out_target.ready_send", "", ""),
    ("(H) install redirect (replaces block)", "host", "out.redirect", "4", "4"),
    ("(H) discard socket + send HOST_READY", "host", "out.discard_and_host_ready", "110", "56"),
    ("total (host side)", "host", "out.total", "541", "225"),
]
INBOUND = [
    ("(T) block flow", "target", "in.block", "", ""),
    ("(T) freeze + serialize + encode", "target", "in.serialize", "", ""),
    ("(T) TARGET_DONE → END_OFFLOAD", "target", "in.transfer_to_end", "", ""),
    ("    (H) decode state", "host", "in_host.decode", "", ""),
    ("    (H) restore TCP", "host", "in_host.restore", "", ""),
    ("    (H) remove redirect (sync)", "host", "in_host.remove_redirect", "", ""),
    ("    (H) resume", "host", "in_host.resume", "", ""),
    ("    (H) send END_OFFLOAD", "host", "in_host.end_offload", "", ""),
    ("(T) discard + remove rules", "target", "in.cleanup", "", ""),
    ("total (target side)", "target", "in.total", "", ""),
]
# Outbound total p50 targets per driver (µs): the NSDI'26 figure for the
# Python driver, well below it for C.
TARGET_OUTBOUND_P50_US = {"c": 150.0, "py": 225.0}
DRIVERS = ("c", "py")


def _request_loop(testbed: xolab.Lab, count: int, path: str) -> dict[str, float]:
    """count keep-alive GETs from the client namespace; returns client timings."""
    from rich.progress import Progress

    from xo.bench_latency import timed_gets

    with Progress(transient=True) as progress:
        task = progress.add_task("handoffs", total=count)
        millis = timed_gets(testbed, path, count, progress, task)
    return _summary([ms * 1000 for ms in millis])


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_us": round(statistics.median(ordered), 1),
            "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)}


def run_driver(driver: str, handoffs: int, path: str) -> dict[str, Any]:
    name = f"bh{driver}{secrets.token_hex(2)}"  # unique per run
    with cluster(targets=1, name=name, timings=True, drivers={"*": driver}) as apps:
        client = _request_loop(apps.testbed, handoffs, path)
        stats = apps.host_stats()
        apps.stop()  # the members write their timings as they exit
        samples = {
            "host": json.loads(apps.timings_path("host").read_text()),
            "target": json.loads(apps.timings_path("t0").read_text()),
        }
    result: dict[str, Any] = {"client_request_us": client, "host_stats": stats}
    for label, rows in (("outbound", OUTBOUND), ("inbound", INBOUND)):
        result[label] = [
            {"step": name, "process": proc, "key": key, "paper_apnet25_us": p1,
             "paper_nsdi26_us": p2, **_summary(samples[proc].get(key, [0.0]))}
            for name, proc, key, p1, p2 in rows
        ]
    total = next(r for r in result["outbound"] if r["key"] == "out.total")
    result["target_outbound_p50_us"] = TARGET_OUTBOUND_P50_US[driver]
    result["meets_target"] = total["p50_us"] <= TARGET_OUTBOUND_P50_US[driver]
    return result


def run(handoffs: int = 2000, path: str = "/small.bin", tls: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"handoffs": handoffs, "request_path": path,
                              "drivers": {d: run_driver(d, handoffs, path) for d in DRIVERS}}
    if tls:
        from xo import bench_tls

        result["tls"] = bench_tls.run(handoffs)
    return result


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    drivers = result["drivers"]
    for label in ("outbound", "inbound"):
        table = Table(title=f"{label} transfer — {result['handoffs']} handoffs per driver "
                            "in the lab (µs)")
        table.add_column("step")
        for d in drivers:
            table.add_column(f"{d} p50")
            table.add_column(f"{d} p99")
        table.add_column("APNet'25")
        table.add_column("NSDI'26")
        first = next(iter(drivers.values()))
        for i, row in enumerate(first[label]):
            cells = [row["step"]]
            for d in drivers:
                r = drivers[d][label][i]
                cells += [str(r["p50_us"]), str(r["p99_us"])]
            table.add_row(*cells, row["paper_apnet25_us"], row["paper_nsdi26_us"])
        console.print(table)
    for d, res in drivers.items():
        c = res["client_request_us"]
        total = next(r for r in res["outbound"] if r["key"] == "out.total")
        verdict = "meets" if res["meets_target"] else "misses"
        console.print(f"{d}: client request→response (small file, out + back) p50 "
                      f"{c['p50_us']} µs, p99 {c['p99_us']} µs; outbound total p50 "
                      f"{total['p50_us']} µs {verdict} the target of "
                      f"{res['target_outbound_p50_us']} µs")
    if "tls" in result:
        from xo import bench_tls

        bench_tls.print_report(result["tls"])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ticks = []
    for y, (driver, label) in enumerate((d, lbl) for d in result["drivers"]
                                        for lbl in ("outbound", "inbound")):
        left = 0.0
        ticks.append(f"{driver} {label}")
        for row in result["drivers"][driver][label]:
            if row["step"].startswith("    ") or row["key"].endswith(".total"):
                continue  # nested in another step, or the sum itself
            ax.barh(y, row["p50_us"], left=left,
                    label=f"{label}: {row['step']}" if driver == "c" else None)
            left += row["p50_us"]
    ax.set_yticks(range(len(ticks)), ticks)
    ax.set_xlabel("p50 µs per step (stacked)")
    ax.set_title(f"XO handoff latency, {result['handoffs']} handoffs")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(handoffs: int, json_path: str | None, tls: bool = False) -> int:
    result = run(handoffs, tls=tls)
    print_report(result)
    results.save(result, json_path, "bench-handoff", plot)
    return 0
