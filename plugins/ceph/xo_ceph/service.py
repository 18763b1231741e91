"""Starting the XO parts beside a ``vstart`` cluster in the lab layout: the
front in the lab's host namespace, one agent per OSD in its target namespace,
sharing one config file (``<workdir>/xo-ceph.toml``) and one cluster key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xo.ceph.config import AgentConfig, FrontConfig, XoCephConfig, render
from xo.ceph.procs import Proc
from xo.engine import write_key

if TYPE_CHECKING:
    from xo.ceph.cluster import ClusterState

PIN_ROOT = "/run/xo/bpf"
READY_TIMEOUT = 30.0


def config_for(state: ClusterState, threshold: int) -> XoCephConfig:
    from xo.ceph.cluster import RGW_PORT

    host = state.mon
    assert host is not None
    front = FrontConfig("", (host.ip, state.front_port), ("127.0.0.1", RGW_PORT), threshold,
                        str(state.path / "front-stats.json"))
    if state.tls_cert:
        front.tls_listen = (host.ip, state.front_tls_port)
        front.tls_cert, front.tls_key = state.tls_cert, state.tls_key
    return XoCephConfig(
        ceph_conf=str(state.conf), key=str(state.path / "xo-cluster.key"), pin_root=PIN_ROOT,
        front=front, agent=AgentConfig("", ("127.0.0.1", RGW_PORT), [host.ip]))


def _ifname(state: ClusterState, member_netns: str) -> str:
    from xo import lab as xolab

    testbed = xolab.Lab.load(state.lab)
    for m in [testbed.host, *testbed.targets]:
        if m.netns == member_netns:
            return m.ifname
    raise RuntimeError(f"no lab member in namespace {member_netns}")


def wait_ready(proc: Proc, timeout: float = READY_TIMEOUT) -> None:
    from xo.ceph.cluster import CephError

    out = Path(proc.log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and "READY" in out.read_text(errors="replace"):
            return
        if not proc.alive():
            raise CephError(f"{proc.name} exited before it was ready; see {out} and "
                            f"{out.with_suffix('.log')}")
        time.sleep(0.05)
    raise CephError(f"{proc.name} not ready after {timeout:.0f} s; see {out}")


def start_xo(state: ClusterState, threshold: int = 1 << 20) -> None:
    from xo.ceph.cluster import _spawn

    cfg = config_for(state, threshold)
    key = Path(cfg.key)
    if not key.exists():
        write_key(key)
    path = state.path / "xo-ceph.toml"
    path.write_text(render(cfg))
    tag = state.fsid[:8]
    agents = []
    for osd in state.osds:
        osd_id = int(osd.name.split(".")[1])
        name = f"ceph-{tag}-osd{osd_id}"
        state.pin_dirs.append(f"{PIN_ROOT}/{name}")
        agents.append(_spawn(state, f"agent.{osd_id}", [
            sys.executable, "-m", "xo.ceph.agent", "--config", str(path), "--osd", str(osd_id),
            "--interface", _ifname(state, osd.netns), "--name", name,
            "--log", str(state.log(f"agent.{osd_id}"))], osd.netns))
    for proc in agents:
        wait_ready(proc)
    assert state.mon is not None
    name = f"ceph-{tag}-front"
    state.pin_dirs.append(f"{PIN_ROOT}/{name}")
    front = _spawn(state, "front", [
        sys.executable, "-m", "xo.ceph.front", "--config", str(path), "--interface",
        _ifname(state, state.mon.netns), "--name", name, "--log", str(state.log("front"))],
        state.mon.netns)
    wait_ready(front)
    wait_agents(state, len(state.osds))


def front_stats(state: ClusterState) -> dict[str, object]:
    import json

    try:
        return dict(json.loads((state.path / "front-stats.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_agents(state: ClusterState, count: int, timeout: float = READY_TIMEOUT) -> None:
    """Until the front has a live control connection to count agents."""
    from xo.ceph.cluster import CephError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agents = front_stats(state).get("agents", {})
        if isinstance(agents, dict) and sum(1 for up in agents.values() if up) >= count:
            return
        time.sleep(0.1)
    raise CephError(f"the front has not connected to {count} agents after {timeout:.0f} s "
                    f"(stats: {front_stats(state)}); see {state.log('front')}")


def remove_pins(pin_dirs: list[str]) -> None:
    import shutil

    for pin in pin_dirs:
        if Path(pin).exists():
            subprocess.run(["umount", "-l", pin], capture_output=True)
            shutil.rmtree(pin, ignore_errors=True)
