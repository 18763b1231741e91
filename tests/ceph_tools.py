"""Helpers for the Ceph tests: a real cluster (``xo.ceph.cluster``) on a lab,
boto3 clients whose sockets live in the lab's client namespace, and checks
that nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xo import lab as xolab
from xo.ceph import cluster
from xo.ceph.procs import start_ticks
from xo.ceph.s3client import s3_client


def front_stats(state: cluster.ClusterState, settled: bool = True) -> dict[str, Any]:
    """The front's counters; settled: after its next rewrite (every 0.5 s), so
    they include every request already answered."""
    if settled:
        time.sleep(1.1)
    return dict(json.loads((state.path / "front-stats.json").read_text()))


def interface_bytes(netns: str, ifname: str) -> dict[str, int]:
    """tx/rx bytes of an interface in a namespace (the kernel's link counters)."""
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}


def served_lines(state: cluster.ClusterState, osd: int) -> list[str]:
    path = state.log(f"agent.{osd}")
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if " served " in line]


def leftovers(state: cluster.ClusterState) -> list[str]:
    """Processes, pin directories and bpffs mounts of this cluster still present."""
    found = [f"process {p.name} (pid {p.pid})" for p in state.procs
             if start_ticks(p.pid) == p.ticks]
    found += [f"pin dir {d}" for d in state.pin_dirs if Path(d).exists()]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {d}" for d in state.pin_dirs if f" {d} " in mounts]
    return found


@dataclass
class LabCluster:
    testbed: xolab.Lab
    state: cluster.ClusterState

    @property
    def client_ns(self) -> str:
        return self.testbed.client.netns

    def client(self, user: str | None = "xo", **kw: Any) -> Any:
        return s3_client(self.state.front_endpoint,
                         self.state.users[user] if user else None, **kw)

    def stock(self, user: str | None = "xo", **kw: Any) -> Any:
        """A client of the stock radosgw on the same host (the comparison)."""
        return s3_client(self.state.rgw_endpoint(0),
                         self.state.users[user] if user else None, **kw)


@contextlib.contextmanager
def lab_cluster(name: str, workdir: Path, osds: int = 3,
                threshold: int = 1 << 20) -> Iterator[LabCluster]:
    """A lab with one target host per OSD and a cluster with XO on it; both
    gone afterwards, checked."""
    with xolab.lab(name, targets=osds) as testbed:
        state = None
        try:
            state = cluster.vstart(workdir, osds=osds, layout="lab", lab=name, xo=True,
                                   threshold=threshold)
            yield LabCluster(testbed, state)
        finally:
            if (workdir / cluster.STATE_FILE).exists():
                cluster.stop(workdir)
                state = cluster.ClusterState.load(workdir)
                left = leftovers(state)
                assert not left, f"left behind: {left}"


def wipe(workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)


def rand(n: int) -> bytes:
    return os.urandom(n)
