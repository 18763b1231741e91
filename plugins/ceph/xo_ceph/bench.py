"""``xo bench s3``: S3 GETs through stock radosgw against the XO front, in one
run, on one lab and one cluster.

The lab: a client, the front host (mon, mgr, the front's radosgw, the XO
front) and one OSD host per OSD (OSD, radosgw, XO agent), the host's and the
OSD hosts' links rate-limited equally (tbf), the client's not. Objects of
each size are uploaded once; then, per size, boto3 clients (``concurrency``
threads, each its own keep-alive connection) GET keys drawn uniformly or by
Zipf(s) for ``seconds``, first from the stock radosgw on the front host
(which reads from the OSDs over msgr2 and relays), then from the XO front
(which hands large GETs to the agent beside the head's primary OSD).

Reported per size and mode: throughput, ops/s, latency p50/p99, errors, and
CPU seconds per GB served of the front host's processes and of each OSD
host's (user + system from /proc; softirq work such as the eBPF redirect is
not in it).
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from xo import lab as xolab
from xo import results
from xo.ceph import cluster

SIZE_UNITS = {"k": 1024, "m": 1 << 20}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    if text[-1:] in SIZE_UNITS:
        return int(float(text[:-1]) * SIZE_UNITS[text[-1]])
    return int(text)


def label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20}MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10}KiB"
    return f"{size}B"


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def _groups(state: cluster.ClusterState) -> dict[str, list[int]]:
    """PIDs per host: "front" (mon, mgr, radosgw, front) and each OSD host."""
    groups: dict[str, list[int]] = {"front": []}
    by_ns = {osd.netns: osd.name.replace(".", "") + "-host" for osd in state.osds}
    for p in state.procs:
        if not p.alive():
            continue
        if p.netns in by_ns:
            groups.setdefault(by_ns[p.netns], []).append(p.pid)
        elif p.name in ("rgw.front", "front"):
            groups["front"].append(p.pid)
    return groups


def _cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    return {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}


def run_mode(endpoint: str, user: cluster.S3User, client_ns: str, bucket: str,
             keys: list[str], digests: dict[str, str], weights: list[float] | None,
             concurrency: int, seconds: float) -> dict[str, Any]:
    from xo.ceph.s3client import s3_client
    from xo.lab import in_netns

    lat: list[float] = []
    errors = [0]
    nbytes = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with in_netns(client_ns):
            s3 = s3_client(endpoint, user, pool=1)
            barrier.wait()
            while time.monotonic() < deadline:
                key = rng.choices(keys, weights)[0] if weights else rng.choice(keys)
                t0 = time.perf_counter()
                try:
                    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                    ok = hashlib.sha256(body).hexdigest() == digests[key]
                except Exception:  # noqa: BLE001 - every failure is counted as an error
                    ok, body = False, b""
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        lat.append(dt)
                        nbytes[0] += len(body)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0

    return {"ops": len(lat), "errors": errors[0], "bytes": nbytes[0], "seconds": elapsed,
            "MBps": nbytes[0] / elapsed / 1e6, "ops_s": len(lat) / elapsed,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def run(osds: int, rate: str, sizes: list[int], objects: int, concurrency: int,
        seconds: float, dist: str, zipf_s: float, threshold: int,
        progress: Any = None) -> dict[str, Any]:
    from xo.ceph.s3client import s3_client
    from xo.lab import in_netns

    say = progress or (lambda s: None)
    name = "s" + secrets.token_hex(3)
    out: dict[str, Any] = {"osds": osds, "rate": rate, "concurrency": concurrency,
                           "seconds": seconds, "dist": dist, "zipf_s": zipf_s,
                           "threshold": threshold, "objects_per_size": objects, "rows": []}
    with xolab.lab(name, targets=osds, rate=rate) as testbed, \
            tempfile.TemporaryDirectory(prefix="xo-bench-s3-") as tmp:
        workdir = Path(tmp) / "ceph"
        say(f"cluster on lab {name} ({osds} OSD hosts, links {rate})")
        state = cluster.vstart(workdir, osds=osds, layout="lab", lab=name, xo=True,
                               threshold=threshold)
        try:
            user = state.users["xo"]
            client_ns = testbed.client.netns
            with in_netns(client_ns):
                s3 = s3_client(state.rgw_endpoint(0), user)
                s3.create_bucket(Bucket="bench")
            for size in sizes:
                keys, digests = [], {}
                say(f"upload {objects} x {label(size)}")
                with in_netns(client_ns):
                    for i in range(objects):
                        key = f"{label(size)}/{i:04d}"
                        body = os.urandom(size)
                        s3.put_object(Bucket="bench", Key=key, Body=body)
                        keys.append(key)
                        digests[key] = hashlib.sha256(body).hexdigest()
                weights = zipf_weights(len(keys), zipf_s) if dist == "zipf" else None
                row: dict[str, Any] = {"size": size, "label": label(size)}
                for mode, endpoint in (("stock", state.rgw_endpoint(0)),
                                       ("xo", state.front_endpoint)):
                    say(f"{label(size)}: {mode}, {concurrency} clients, {seconds:.0f} s")
                    groups = _groups(state)
                    cpu0 = _cpu(groups)
                    res = run_mode(endpoint, user, client_ns, "bench", keys, digests, weights,
                                   concurrency, seconds)
                    cpu1 = _cpu(groups)
                    gb = res["bytes"] / 1e9 or float("nan")
                    res["cpu_s_per_GB"] = {g: (cpu1[g] - cpu0[g]) / gb for g in groups}
                    row[mode] = res
                row["ratio"] = (row["xo"]["MBps"] / row["stock"]["MBps"]
                                if row["stock"]["MBps"] else 0.0)
                out["rows"].append(row)
            out["front"] = _front_counters(state)
        finally:
            cluster.stop(workdir)
    return out


def _front_counters(state: cluster.ClusterState) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads((state.path / "front-stats.json").read_text()))
    except (OSError, ValueError):
        return {}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"S3 GET, stock radosgw vs XO front ({result['osds']} OSD hosts, "
                        f"links {result['rate']}, {result['concurrency']} clients, "
                        f"{result['dist']} keys)")
    for col in ("size", "mode", "MB/s", "ops/s", "p50 ms", "p99 ms", "errors",
                "front CPU s/GB", "OSD hosts CPU s/GB", "XO/stock"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        for mode in ("stock", "xo"):
            r = row[mode]
            cpu = r["cpu_s_per_GB"]
            osd_cpu = sum(v for k, v in cpu.items() if k != "front")
            table.add_row(row["label"], mode, f"{r['MBps']:.1f}", f"{r['ops_s']:.1f}",
                          f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["errors"]),
                          f"{cpu.get('front', 0):.2f}", f"{osd_cpu:.2f}",
                          f"{row['ratio']:.2f}" if mode == "xo" else "")
    Console().print(table)


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["stock"]["MBps"] for r in rows], w, label="stock RGW")
    ax.bar([i + w / 2 for i in x], [r["xo"]["MBps"] for r in rows], w, label="XO")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("object size")
    ax.set_ylabel("GET throughput (MB/s)")
    ax.set_title(f"S3 GET throughput, {result['osds']} OSD hosts, links {result['rate']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(args: Any) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    from rich.console import Console

    console = Console(stderr=True)
    result = run(args.osds, args.rate, sizes, args.objects, args.concurrency, args.seconds,
                 args.dist, args.zipf, args.threshold,
                 progress=lambda s: console.print(f"[xo bench s3] {s}"))
    print_table(result)
    results.save(result, args.json, "bench-s3", plot)
    return 0
