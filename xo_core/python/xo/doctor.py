"""``xo doctor``: what this machine's kernel lets XO do.

Every check probes the real thing (a repair-mode socket, a BPF map, a
clsact qdisc, a TLS ULP, a flower filter) rather than trusting a config
file, and says for a missing feature what it disables and what to do.
Probes that touch interfaces run in a throw-away namespace (xo-doctor-*).
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from xo import core

SOL_TCP = 6
TCP_ULP = 31
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_HASH = 1
SYS_BPF = 321  # x86_64


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    disables: str = ""
    remedy: str = ""


def kernel_config() -> dict[str, str]:
    """/proc/config.gz as a dict, or empty when the kernel does not export it."""
    path = Path("/proc/config.gz")
    if not path.exists():
        return {}
    out = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith("CONFIG_"):
                key, _, value = line.strip().partition("=")
                out[key] = value
    return out


@contextmanager
def loopback_connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def check_tcp_repair() -> Check:
    name = "TCP_REPAIR"
    with loopback_connection() as (_, server):
        try:
            core.freeze(server)
            core.capture(server)
            core.resume(server)
        except core.XoPermissionError as exc:
            return Check(name, False, str(exc),
                         "every connection handoff (host and target roles)",
                         "run as root or grant CAP_NET_ADMIN (e.g. AmbientCapabilities= in "
                         "the systemd unit, or setcap cap_net_admin+ep on the binary)")
        except core.XoError as exc:
            return Check(name, False, str(exc), "every connection handoff",
                         "a kernel built with CONFIG_TCP (TCP_REPAIR is part of it since 3.5)")
    return Check(name, True, "freeze, capture and resume work on a loopback connection")


def check_bpf() -> Check:
    name = "BPF"
    libc = ctypes.CDLL(None, use_errno=True)
    # union bpf_attr for BPF_MAP_CREATE: type, key_size, value_size, max_entries
    attr = (ctypes.c_uint32 * 32)(BPF_MAP_TYPE_HASH, 4, 4, 1)
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return Check(name, False, f"bpf(BPF_MAP_CREATE): {os.strerror(err)}",
                     "eBPF flow steering (block, redirect, source rewrite)",
                     "run as root / with CAP_BPF+CAP_NET_ADMIN on a kernel with "
                     "CONFIG_BPF_SYSCALL=y")
    os.close(fd)
    return Check(name, True, "bpf() creates maps")


def check_bpffs() -> Check:
    name = "bpffs"
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = [m.split()[1] for m in mounts if m.split()[2] == "bpf"]
    if points:
        return Check(name, True, f"mounted at {', '.join(points)}")
    return Check(name, False, "no bpf filesystem mounted",
                 "pinned steering maps shared between processes",
                 "mount -t bpf bpf /sys/fs/bpf (xo mounts its own pin directory when it can)")


@contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"xo-doctor-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ip netns add: {res.stderr.strip()}")
    try:
        res = subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"ip -n {name} link set lo up: {res.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)


def check_clsact(ns: str) -> Check:
    name = "clsact + cls_bpf"
    out = tc(ns, "qdisc", "add", "dev", "lo", "clsact")
    if out.returncode:
        return Check(name, False, out.stderr.strip(), "tc-attached steering programs",
                     "a kernel with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF")
    cfg = kernel_config()
    if cfg and cfg.get("CONFIG_NET_CLS_BPF") not in ("y", "m"):
        return Check(name, False, "clsact works but CONFIG_NET_CLS_BPF is off",
                     "tc-attached steering programs", "a kernel with CONFIG_NET_CLS_BPF")
    return Check(name, True, "clsact qdisc attaches" + (", cls_bpf built in" if cfg else ""))


def check_xdp() -> Check:
    name = "XDP"
    cfg = kernel_config()
    if not cfg:
        return Check(name, True, "assumed with BPF (no /proc/config.gz to confirm)")
    if cfg.get("CONFIG_BPF_SYSCALL") == "y" and cfg.get("CONFIG_NET") == "y":
        native = "veth native XDP" if cfg.get("CONFIG_VETH") in ("y", "m") else "generic XDP"
        return Check(name, True, f"available ({native})")
    return Check(name, False, "kernel built without BPF syscall", "the XDP redirect path",
                 "use the tc redirect path, or a kernel with CONFIG_BPF_SYSCALL")


def check_ktls() -> Check:
    name = "kernel TLS"
    with loopback_connection() as (client, _):
        try:
            client.setsockopt(SOL_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                return Check(name, False, f"setsockopt(TCP_ULP, \"tls\"): {exc.strerror}",
                             "moving TLS connections with kernel TLS state (TLS sessions "
                             "need the user-space record layer instead)",
                             "a kernel with CONFIG_TLS (modprobe tls), or the full-kernel VM lane")
            raise
    return Check(name, True, "the tls ULP attaches")


def check_flower(ns: str) -> Check:
    name = "tc-flower + pedit/csum/mirred"
    tc(ns, "qdisc", "add", "dev", "lo", "clsact")
    out = tc(ns, "filter", "add", "dev", "lo", "ingress", "protocol", "ip", "flower",
             "ip_proto", "tcp", "dst_port", "1", "action", "pedit", "ex", "munge", "ip",
             "dst", "set", "198.18.0.1", "pipe", "csum", "ip", "tcp", "pipe", "mirred",
             "egress", "redirect", "dev", "lo")
    if out.returncode:
        return Check(name, False, out.stderr.strip().splitlines()[0] if out.stderr else "failed",
                     "the hardware rule tier (NIC offload of redirect rules); the eBPF "
                     "software tier carries every rule",
                     "nothing for virtual NICs; for offload use a kernel with "
                     "CONFIG_NET_CLS_FLOWER, CONFIG_NET_ACT_PEDIT, CONFIG_NET_ACT_CSUM")
    return Check(name, True, "a flower filter with pedit+csum+mirred installs")


def run_checks() -> list[Check]:
    checks: list[Callable[[], Check]] = [check_tcp_repair, check_bpf, check_bpffs, check_xdp,
                                         check_ktls]
    results = [c() for c in checks]
    try:
        with scratch_netns() as ns:
            results.insert(3, check_clsact(ns))
            results.append(check_flower(ns))
    except RuntimeError as exc:
        # The tc probes need a throw-away namespace; say why there is none.
        for name in ("clsact + cls_bpf", "tc-flower + pedit/csum/mirred"):
            results.append(Check(name, False, f"not probed: {exc}",
                                 "the probe itself", "run as root with iproute2 installed"))
    return results


def main(as_json: bool = False) -> int:
    results = run_checks()
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"xo doctor — kernel {os.uname().release}")
        for col in ("feature", "", "detail", "if missing, disables", "what to do"):
            table.add_column(col, overflow="fold")
        for r in results:
            table.add_row(r.name, "[green]ok[/]" if r.ok else "[red]missing[/]", r.detail,
                          "" if r.ok else r.disables, "" if r.ok else r.remedy)
        Console(width=160).print(table)
    # Handoffs need TCP_REPAIR and BPF; everything else degrades gracefully.
    return 0 if all(r.ok for r in results if r.name in ("TCP_REPAIR", "BPF")) else 1
