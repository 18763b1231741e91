"""``xo lab demo``: the reference application in the one-machine lab.

:class:`RefAppCluster` starts the target agents and the host (each a real
process inside its lab namespace) and stops them by PID; the demo, the
tests and ``xo bench handoff`` all use it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo import lab as xolab
from xo import results
from xo.appconfig import AppConfig, TargetEntry
from xo.engine import DEFAULT_CONTROL_PORT, write_key
from xo.lab import PIN_ROOT
from xo.refapp import HTTP_PORT, HTTPS_PORT
from xo.steer import default_object_path

# The C driver of the protocol machine (xo_core/driver/xo_driver.c), built by
# `make -C xo_core` next to libxo.a.
C_DRIVER = Path(__file__).resolve().parents[2] / "build" / "xo-driver"


def c_driver_binary() -> Path:
    if not C_DRIVER.exists():
        raise RuntimeError(f"{C_DRIVER} is missing: run `make -C xo_core` (ci/test.sh does)")
    return C_DRIVER

DEMO_FILES = {"small.bin": 4 * 1024, "medium.bin": 256 * 1024, "large.bin": 4 * 1024 * 1024}


def make_docroot(path: Path, files: dict[str, int] = DEMO_FILES) -> dict[str, str]:
    """Random files of the given sizes; returns name -> sha256."""
    path.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, size in files.items():
        data = os.urandom(size)
        (path / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


@dataclass
class RefAppCluster:
    """Host + target processes of the reference app in a running lab."""

    testbed: xolab.Lab
    workdir: Path
    policy: str = "least_loaded"
    mode: str = "xo"  # host: xo (hand off), proxy (relay via the targets), local
    ingress: str = "tc"  # host: block/redirect in tc or XDP
    crash_at: dict[str, str] = field(default_factory=dict)
    timings: bool = False  # members write per-step handoff timings at exit
    redirect_ttl: float | None = None  # seconds; the engines' default if None
    drain_timeout: float | None = None  # targets: wait for ACKs before handing back
    # Which driver runs each member: "py" (xo.refapp on the asyncio engine) or
    # "c" (xo-driver, the poll() loop over the same protocol machine).
    drivers: dict[str, str] = field(default_factory=dict)
    # Protocol timing knobs (xo.proto.Timeouts fields, seconds) for every member.
    timeouts: dict[str, float] = field(default_factory=dict)
    # Host: reach a target's control port elsewhere, e.g. through a test relay.
    control_via: dict[str, tuple[str, int]] = field(default_factory=dict)
    move_policy: str = "none"  # targets: "path" moves connections between targets
    park_ring_bytes: int = 0  # the parked-frame ring (0: the core's default)
    bytes_follow_min: int = 0  # see AppConfig (0: the core's default)
    offload_min_bytes: int = 0  # host (Python): proxy files smaller than this
    # host: an HTTPS listener with this certificate and key (xo.tls)
    tls_cert: str = ""
    tls_key: str = ""
    no_tls: tuple[str, ...] = ()  # targets that take no TLS sessions
    # Members given a cluster key of their own (a misconfigured member).
    foreign_key: tuple[str, ...] = ()
    procs: dict[str, xolab.NetnsProcess] = field(default_factory=dict)

    @property
    def docroot(self) -> Path:
        return self.workdir / "docroot"

    @property
    def key_path(self) -> Path:
        return self.workdir / "cluster.key"

    def member_key_path(self, member: str) -> Path:
        return self.workdir / f"{member}.key" if member in self.foreign_key else self.key_path

    def log_path(self, member: str) -> Path:
        return self.workdir / f"{member}.log"

    def timings_path(self, member: str) -> Path:
        return self.workdir / f"{member}-timings.json"

    @property
    def url(self) -> str:
        return f"http://{self.testbed.host.ipv4}:{HTTP_PORT}"

    @property
    def https_url(self) -> str:
        return f"https://{self.testbed.host.ipv4}:{HTTPS_PORT}"

    def driver(self, member: str) -> str:
        return self.drivers.get(member, self.drivers.get("*", "py"))

    def config(self, role: str, member: str) -> AppConfig:
        """The member's configuration, as both drivers read it."""
        me = self.testbed.member(member)
        pin_dir = f"{PIN_ROOT}/{self.testbed.name}-{member}"
        host = self.testbed.host
        targets = []
        for t in self.testbed.targets:
            ip, port = self.control_via.get(t.name, (t.ipv4, DEFAULT_CONTROL_PORT))
            targets.append(TargetEntry(t.name, ip, t.mac, port))
        return AppConfig(
            role=role, name=member, ip4=me.ipv4, ip6=me.ipv6, ifindex=me.ifindex, mac=me.mac,
            key=str(self.member_key_path(member)), docroot=str(self.docroot), pin_dir=pin_dir,
            bpf_object=str(default_object_path()), http_port=HTTP_PORT,
            control_port=DEFAULT_CONTROL_PORT,
            owner=zlib.crc32(pin_dir.encode()) & 0x7FFFFFFF, policy=self.policy,
            timings=str(self.timings_path(member)) if self.timings else "",
            crash_at=self.crash_at.get(member, ""),
            redirect_ttl_ms=round(self.redirect_ttl * 1000) if self.redirect_ttl else 0,
            drain_timeout_ms=round(self.drain_timeout * 1000)
            if self.drain_timeout is not None else 2000,
            park_ring_bytes=self.park_ring_bytes, offload_min_bytes=self.offload_min_bytes,
            bytes_follow_min=self.bytes_follow_min,
            targets=targets,
            hosts=[host.ipv4, host.ipv6] if role == "target" else [],
            timeouts={name: round(sec * 1000) for name, sec in self.timeouts.items()},
            mode=self.mode, ingress=self.ingress, move_policy=self.move_policy,
            lab=self.testbed.name if self.ingress == "xdp" else "",
            tls_cert=self.tls_cert if role == "host" else "",
            tls_key=self.tls_key if role == "host" else "",
            no_tls=int(member in self.no_tls))

    def _argv(self, role: str, member: str) -> list[str]:
        path = self.config(role, member).write(self.workdir / f"{member}.conf")
        if self.driver(member) == "c":
            if role == "host" and (self.mode != "xo" or self.ingress != "tc"):
                raise ValueError("the C driver runs the xo mode with tc ingress only")
            if self.move_policy != "none" or self.policy == "path":
                raise ValueError("the C driver has no path policy and makes no moves")
            return [str(c_driver_binary()), str(path)]
        return [sys.executable, "-m", "xo.refapp", "--config", str(path),
                "--log", str(self.log_path(member))]

    def start_member(self, member: str, timeout: float = 20.0) -> None:
        role = "host" if member == "host" else "target"
        if not self.member_key_path(member).exists():
            write_key(self.member_key_path(member))
        # Tracebacks (stderr) go to the member's log; stdout only says READY.
        with self.log_path(member).open("ab") as errors:
            proc = self.testbed.popen(member, self._argv(role, member),
                                      stdout=subprocess.PIPE, stderr=errors)
        self.procs[member] = proc
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                seen += os.read(proc.stdout.fileno(), 4096)
            if b"READY" in seen:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        log = self.log_path(member)
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{member} did not start (exit {proc.poll()}):\n{tail}")

    def start(self) -> RefAppCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.key_path.exists():
            write_key(self.key_path)
        for target in self.testbed.targets:
            self.start_member(target.name)
        self.start_member("host")
        return self

    def stop_member(self, member: str) -> None:
        proc = self.procs.pop(member, None)
        if proc is not None:
            proc.stop()

    def stop(self) -> None:
        for member in list(self.procs):
            self.stop_member(member)

    def host_stats(self, settled: bool = False) -> dict[str, Any]:
        """The host's counters. settled: first wait (up to 10 s) until every
        connection handed off has come back or was closed by its client on
        the target - a target hands back once the client acknowledged its
        last response, which may trail the client's last read."""
        for _ in range(100):
            out = self.testbed.run("client", ["curl", "-s", "-m", "5", f"{self.url}/_xo/stats"],
                                   capture_output=True, text=True, check=True)
            stats = dict(json.loads(out.stdout))
            if not settled or stats["offloads"] <= (stats["returns"] + stats["withdrawn"]
                                                    + stats["closed_on_target"]):
                return stats
            time.sleep(0.1)
        return stats


@contextmanager
def cluster(targets: int = 2, name: str | None = None, rate: str | None = None,
            workdir: Path | None = None, **kwargs: Any) -> Iterator[RefAppCluster]:
    """A lab with the reference app running in it; everything torn down after."""
    name = name or f"d{secrets.token_hex(3)}"  # unique per run
    with tempfile.TemporaryDirectory(prefix="xo-demo-") as tmp:
        work = workdir or Path(tmp)
        with xolab.lab(name, targets=targets, rate=rate) as testbed:
            apps = RefAppCluster(testbed, work, **kwargs)
            try:
                make_docroot(apps.docroot)
                apps.start()
                yield apps
            finally:
                apps.stop()


def iface_tx_bytes(testbed: xolab.Lab, member: str) -> int:
    """Bytes the member's lab interface has transmitted."""
    from pyroute2 import IPRoute

    host = testbed.member(member)
    with xolab.in_netns(host.netns), IPRoute() as ipr:
        link = ipr.get_links(host.ifindex)[0]
        stats = link.get_attr("IFLA_STATS64")
        return int(stats["tx_bytes"])


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with cluster(targets=args.targets, name=getattr(args, "name", "demo")) as apps:
        digests = {name: hashlib.sha256((apps.docroot / name).read_bytes()).hexdigest()
                   for name in DEMO_FILES}
        names = [list(DEMO_FILES)[i % len(DEMO_FILES)] for i in range(args.requests)]
        console.print(f"[bold]lab demo[/]: client → host {apps.testbed.host.ipv4}:{HTTP_PORT} "
                      f"→ {len(apps.testbed.targets)} targets; {len(names)} requests on one "
                      "keep-alive connection (curl)")
        tx_before = iface_tx_bytes(apps.testbed, "host")
        out_dir = apps.workdir / "out"
        out_dir.mkdir()
        argv = ["curl", "-s", "-m", "60", "-w", "%{http_code} %{size_download} "
                "%header{x-served-by} %{time_total}\\n"]
        for i, name in enumerate(names):
            argv += ["-o", str(out_dir / f"{i}"), f"{apps.url}/{name}"]
        started = time.monotonic()
        res = apps.testbed.run("client", argv, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        tx_after = iface_tx_bytes(apps.testbed, "host")
        table = Table(title="requests")
        for col in ("#", "file", "status", "bytes", "served by", "sha256 ok", "ms"):
            table.add_column(col)
        ok = res.returncode == 0
        total = 0
        by_target: dict[str, int] = {}
        for i, (name, line) in enumerate(zip(names, res.stdout.splitlines(), strict=False)):
            status, size, served_by, secs = line.split()
            body = (out_dir / f"{i}").read_bytes()
            good = status == "200" and hashlib.sha256(body).hexdigest() == digests[name]
            ok &= good
            total += int(size)
            by_target[served_by] = by_target.get(served_by, 0) + 1
            table.add_row(str(i), name, status, size, served_by, "yes" if good else "[red]NO[/]",
                          f"{float(secs) * 1000:.1f}")
        console.print(table)
        stats = apps.host_stats()
        relayed = tx_after - tx_before
        console.print(f"served {total} bytes in {elapsed:.2f} s; served by: {by_target}")
        console.print(f"host interface sent {relayed} bytes in all "
                      f"({100 * relayed / max(total, 1):.2f}% of the response bytes): "
                      "responses went from the targets straight to the client")
        console.print(f"host engine: {stats['offloads']} handoffs out, {stats['returns']} "
                      f"back, {stats['rollbacks']} rolled back")
        summary = {"requests": len(names), "ok": ok, "bytes": total, "host_tx_bytes": relayed,
                   "served_by": by_target, "host": stats, "seconds": elapsed}
        results.save(summary, None, "lab-demo")
        if not ok:
            console.print(f"[red]demo failed[/] (curl exit {res.returncode}: {res.stderr})")
            return 1
    return 0
