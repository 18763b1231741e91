"""``xo bench s3``: S3 GETs through stock radosgw against the XO front, in one
run, on one lab and one cluster.

The lab: a client, the front host (mon, mgr, the front's radosgw, the XO
front) and one OSD host per OSD (OSD, radosgw, XO agent), the host's and the
OSD hosts' links rate-limited equally (tbf), the client's not. Objects of
each size are uploaded once (to the replicated data pool, or with
``--pool ec`` to the erasure-coded one) and read back through both endpoints
with boto3, every body checked by sha256. Then, per size, the load: keys
drawn uniformly or by Zipf(s), ``concurrency`` keep-alive connections for
``seconds`` (longer for large objects, so that each connection completes
several GETs), first from the stock radosgw on the front host (which reads
from the OSDs over msgr2 and relays), then from the XO front (which hands
large GETs to the agent beside the head's primary OSD). The load comes from
wrk (presigned URLs, C, so that the 2-vCPU machine's cycles go to the
servers) or, with ``--client boto3``, from boto3 threads that check every
body by sha256 (the client then takes most of the CPU).

Reported per size and mode: throughput, ops/s, latency p50/p99, errors, CPU
seconds per GB served of the front host's processes and of each OSD host's
(user + system from /proc; softirq work such as the eBPF redirect is not in
it), and the bytes each host's link carried per second each way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import subprocess
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


def duration_for(size: int, seconds: float) -> float:
    """At least seconds; for large objects long enough for ~24 GETs at 40 MB/s."""
    return max(seconds, size * 24 / 40e6)


# wrk: each thread walks the pre-drawn key sequence from its own random
# offset; done() reports the totals as one JSON line.
WRK_LUA = r"""
local paths = {}
local idx = 0
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(tonumber(args[2]) + id * 7919)
  idx = math.random(#paths)
end
function request()
  idx = (idx % #paths) + 1
  return wrk.format("GET", paths[idx])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'XO_WRK {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def key_sequence(keys: list[str], weights: list[float] | None, n: int = 20000,
                 seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(keys, weights, k=n)


def run_wrk(client_ns: str, endpoint: str, paths: list[str], concurrency: int,
            seconds: float, workdir: Path) -> dict[str, Any]:
    """GETs of the given request targets with wrk from the client namespace."""
    script = workdir / "xo-s3.lua"
    script.write_text(WRK_LUA)
    plist = workdir / "paths.txt"
    plist.write_text("\n".join(paths) + "\n")
    threads = max(1, min(2, concurrency))
    argv = ["ip", "netns", "exec", client_ns, "wrk", f"-t{threads}", f"-c{concurrency}",
            f"-d{seconds:.0f}s", "--timeout", "60s", "-s", str(script), endpoint, "--",
            str(plist), str(secrets.randbelow(1 << 30))]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    m = re.search(r"^XO_WRK (\{.*\})$", res.stdout, re.M)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip()[-300:]}")
    w = json.loads(m.group(1))
    elapsed = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    ok = w["requests"] - w["status"]
    return {"ops": ok, "errors": errors, "bytes": w["bytes"], "seconds": elapsed,
            "MBps": w["bytes"] / elapsed / 1e6, "ops_s": ok / elapsed,
            "p50_ms": w["p50_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "wrk_errors": {k: w[k] for k in ("connect", "read", "write", "status", "timeout")}}


def presigned_paths(endpoint: str, user: cluster.S3User, client_ns: str, bucket: str,
                    keys: list[str]) -> dict[str, str]:
    from xo.ceph.s3client import s3_client
    from xo.lab import in_netns

    with in_netns(client_ns):
        s3 = s3_client(endpoint, user)
        return {k: s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k},
                                             ExpiresIn=6 * 3600)[len(endpoint):]
                for k in keys}


def verify(endpoint: str, user: cluster.S3User, client_ns: str, bucket: str,
           digests: dict[str, str]) -> int:
    """GET every key once with boto3; the number of bodies that differ."""
    from xo.ceph.s3client import s3_client
    from xo.lab import in_netns

    bad = 0
    with in_netns(client_ns):
        s3 = s3_client(endpoint, user)
        for key, digest in digests.items():
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception:  # noqa: BLE001 - any failure is a wrong answer here
                bad += 1
                continue
            bad += hashlib.sha256(body).hexdigest() != digest
    return bad


def link_bytes(bridge_ns: str, ports: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(bytes from the host, bytes to the host) per host, from its bridge port."""
    out = subprocess.run(["ip", "-n", bridge_ns, "-s", "-j", "link"], capture_output=True,
                         text=True, check=True).stdout
    by_port = {d["ifname"]: d["stats64"] for d in json.loads(out)}
    return {host: (by_port[port]["rx"]["bytes"], by_port[port]["tx"]["bytes"])
            for host, port in ports.items() if port in by_port}


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
        progress: Any = None, client: str = "wrk", pool: str = "replicated") -> dict[str, Any]:
    from xo.ceph.s3client import s3_client
    from xo.lab import in_netns

    say = progress or (lambda s: None)
    name = "s" + secrets.token_hex(3)
    out: dict[str, Any] = {"osds": osds, "rate": rate, "concurrency": concurrency,
                           "seconds": seconds, "dist": dist, "zipf_s": zipf_s,
                           "threshold": threshold, "objects_per_size": objects,
                           "client": client, "pool": pool, "rows": []}
    with xolab.lab(name, targets=osds, rate=rate) as testbed, \
            tempfile.TemporaryDirectory(prefix="xo-bench-s3-") as tmp:
        workdir = Path(tmp) / "ceph"
        say(f"cluster on lab {name} ({osds} OSD hosts, links {rate})")
        state = cluster.vstart(workdir, osds=osds, layout="lab", lab=name, xo=True,
                               threshold=threshold)
        try:
            user = state.users["xo"]
            client_ns = testbed.client.netns
            ports = {h.name: h.port_ifname for h in testbed.hosts}
            with in_netns(client_ns):
                s3 = s3_client(state.rgw_endpoint(0), user)
                if pool == "ec":
                    s3.create_bucket(Bucket="bench", CreateBucketConfiguration={
                        "LocationConstraint": ":ec-placement"})
                else:
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
                sequence = key_sequence(keys, weights)
                row: dict[str, Any] = {"size": size, "label": label(size)}
                secs = duration_for(size, seconds)
                for mode, endpoint in (("stock", state.rgw_endpoint(0)),
                                       ("xo", state.front_endpoint)):
                    bad = verify(endpoint, user, client_ns, "bench", digests)
                    say(f"{label(size)}: {mode}, {concurrency} {client} clients, {secs:.0f} s")
                    groups = _groups(state)
                    cpu0, links0 = _cpu(groups), link_bytes(testbed.bridge_netns, ports)
                    if client == "wrk":
                        signed = presigned_paths(endpoint, user, client_ns, "bench", keys)
                        res = run_wrk(client_ns, endpoint, [signed[k] for k in sequence],
                                      concurrency, secs, Path(tmp))
                    else:
                        res = run_mode(endpoint, user, client_ns, "bench", keys, digests,
                                       weights, concurrency, secs)
                    cpu1, links1 = _cpu(groups), link_bytes(testbed.bridge_netns, ports)
                    gb = res["bytes"] / 1e9 or float("nan")
                    res["cpu_s_per_GB"] = {g: (cpu1[g] - cpu0[g]) / gb for g in groups}
                    res["link_MBps"] = {
                        h: [(links1[h][0] - links0[h][0]) / res["seconds"] / 1e6,
                            (links1[h][1] - links0[h][1]) / res["seconds"] / 1e6]
                        for h in links1 if h in links0}
                    res["verify_errors"] = bad
                    res["errors"] += bad
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

    dist = result["dist"] + (f" {result['zipf_s']}" if result["dist"] == "zipf" else "")
    table = Table(title=f"S3 GET, stock radosgw vs XO front ({result['osds']} OSD hosts, "
                        f"links {result['rate']}, {result['pool']} pool, "
                        f"{result['concurrency']} {result['client']} connections, {dist} keys)")
    for col in ("size", "mode", "MB/s", "ops/s", "p50 ms", "p99 ms", "errors",
                "front CPU s/GB", "OSD hosts CPU s/GB", "front link out MB/s",
                "OSD links out MB/s", "XO/stock"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        for mode in ("stock", "xo"):
            r = row[mode]
            cpu = r["cpu_s_per_GB"]
            osd_cpu = sum(v for k, v in cpu.items() if k != "front")
            links = r.get("link_MBps", {})
            osd_links = "/".join(f"{v[0]:.0f}" for h, v in sorted(links.items())
                                 if h not in ("host", "client"))
            table.add_row(row["label"], mode, f"{r['MBps']:.1f}", f"{r['ops_s']:.1f}",
                          f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["errors"]),
                          f"{cpu.get('front', 0):.2f}", f"{osd_cpu:.2f}",
                          f"{links.get('host', [0.0])[0]:.0f}", osd_links,
                          f"{row['ratio']:.2f}" if mode == "xo" else "")
    Console(width=200).print(table)


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
    ax.set_title(f"S3 GET, {result['osds']} OSD hosts, links {result['rate']}, "
                 f"{result.get('pool', 'replicated')} pool, {result['dist']} keys")
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
                 progress=lambda s: console.print(f"[xo bench s3] {s}"),
                 client=args.client, pool=args.pool)
    print_table(result)
    results.save(result, args.json, "bench-s3", plot)
    return 0
