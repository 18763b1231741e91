"""The one-machine lab: a client, a host (the load balancer) and N targets.

Every member of the lab is a network namespace with one veth into a Linux bridge that
lives in a namespace of its own. Nothing is ever created in the root namespace: the
bridge-side veth end is created in the bridge namespace and its peer is created directly
inside the member's namespace, so a crash half-way through never leaves links behind in
the root namespace, and deleting the lab's namespaces deletes every link.

    with lab("demo", targets=2, rate="1gbit") as testbed:
        with in_netns(testbed.host.netns):
            sock = socket.create_connection((testbed.targets[0].ipv4, 8080))

See docs/lab.md for the topology, the naming scheme and the addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, IFA_F_TENTATIVE

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants

NETNS_DIR = Path("/run/netns")
LAB_STATE_DIR = Path("/run/xo/labs")
LAB_FORMAT_VERSION = 1

DEFAULT_LAB_NAME = "lab"
DEFAULT_TARGETS = 2
MAX_TARGETS = 100  # target names t0..t99 keep every interface name within 15 characters
LAB_NAME_MAX_LEN = 8  # "xo" + 8 + "-t99p" == 15 == IFNAMSIZ - 1
LAB_NAME_RE = re.compile(rf"^[a-z0-9]{{1,{LAB_NAME_MAX_LEN}}}$")
# Namespaces that belong to some lab: xo-<lab>-client|host|br|t<idx>.
LAB_NETNS_RE = re.compile(
    rf"^xo-(?P<lab>[a-z0-9]{{1,{LAB_NAME_MAX_LEN}}})-(?P<member>client|host|br|t\d{{1,2}})$"
)

# The benchmarking ranges (RFC 2544 / RFC 5180), never routed on the Internet.
IPV4_NETWORK = ipaddress.IPv4Network("198.18.0.0/24")  # inside 198.18.0.0/15
IPV6_NETWORK = ipaddress.IPv6Network("2001:2::/64")  # inside 2001:2::/48
CLIENT_HOST_ID = 1
LB_HOST_ID = 2
FIRST_TARGET_HOST_ID = 10

# Locally administered, deterministic MACs ("xo" = 0x78 0x6f) so packet dumps of two
# runs can be compared; the last byte is the member's host id, as in its IPv4 address.
MAC_PREFIX = "02:78:6f:00:00"

# Per member namespace. Everything else keeps the kernel defaults on purpose.
MEMBER_SYSCTLS: dict[str, str] = {
    # Do not carry cwnd/ssthresh/RTT from one connection to the next: every
    # measurement starts from the same state.
    "net/ipv4/tcp_no_metrics_save": "1",
    # Addresses are usable at once (no 1-2 s of tentative IPv6 after bring-up). Set on
    # "default" before the veth appears so the link-local address skips DAD too.
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
}
# The bridge namespace takes no part in IP at all: it must reach nothing.
BRIDGE_SYSCTLS: dict[str, str] = {
    "net/ipv6/conf/all/disable_ipv6": "1",
    "net/ipv6/conf/default/disable_ipv6": "1",
}

# tbf shaping. The bucket must hold a whole GSO packet (up to 64 KiB on veth) or tbf
# has to segment it in software; the queue behind it is a short buffer so TCP sees a
# link-like bottleneck instead of a bufferbloated one.
TBF_MIN_BURST_BYTES = 128 * 1024
TBF_BURST_SECONDS = 0.002
TBF_QUEUE_SECONDS = 0.020
TBF_MAX_BYTES_PER_SECOND = 2**32 - 1  # tc_tbf_qopt.rate is a u32 (pyroute2 lacks RATE64)
MIN_RATE_BPS = 100_000

READY_TIMEOUT_SECONDS = 5.0

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """A lab could not be brought up, found or torn down."""


class LabExistsError(LabError):
    """`up` was asked for a lab name that is already in use."""


class LabNotFoundError(LabError):
    """No description (JSON) exists for the lab."""


# --------------------------------------------------------------------------- names


def validate_lab_name(name: str) -> str:
    """Return `name` if it is a valid lab name (1-8 characters of [a-z0-9])."""
    if not isinstance(name, str) or not LAB_NAME_RE.fullmatch(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-{LAB_NAME_MAX_LEN} characters of [a-z0-9]"
        )
    return name


def target_member_name(index: int) -> str:
    return f"t{index}"


def member_netns(lab_name: str, member: str) -> str:
    """Namespace of a lab member ('client', 'host', 't0', ...): xo-<lab>-<member>."""
    return f"xo-{lab_name}-{member}"


def bridge_netns(lab_name: str) -> str:
    return f"xo-{lab_name}-br"


def bridge_ifname(lab_name: str) -> str:
    return f"xo{lab_name}-br"


def _member_tag(member: str) -> str:
    # client -> c, host -> h, t7 -> t7: short enough for IFNAMSIZ with an 8-char lab.
    return {"client": "c", "host": "h"}.get(member, member)


def member_ifname(lab_name: str, member: str) -> str:
    """The member's own veth end, inside its namespace: xo<lab>-<c|h|tN>."""
    return f"xo{lab_name}-{_member_tag(member)}"


def port_ifname(lab_name: str, member: str) -> str:
    """The bridge-side veth end (a bridge port), in the bridge namespace: xo<lab>-<tag>p."""
    return f"xo{lab_name}-{_member_tag(member)}p"


def lab_state_path(lab_name: str) -> Path:
    return LAB_STATE_DIR / f"{validate_lab_name(lab_name)}.json"


def _netns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def netns_exists(ns: str) -> bool:
    return _netns_path(ns).exists()


# --------------------------------------------------------------------------- rates

_RATE_UNITS_BPS: dict[str, float] = {
    # tc(8) units: "bit" suffixes are bits per second, "bps" suffixes bytes per second.
    "": 1,
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_RATE_RE = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*$")


def parse_rate(rate: str | int | None) -> int | None:
    """Parse a tc-style rate ('200mbit', '1gbit', '1.5gbit', '125mbps') into bits/s."""
    if rate is None:
        return None
    if isinstance(rate, int):
        bits_per_second = rate
    else:
        match = _RATE_RE.match(rate.lower())
        if not match or match["unit"] not in _RATE_UNITS_BPS:
            raise LabError(f"invalid rate {rate!r}: use e.g. 500mbit, 1gbit, 2.5gbit")
        bits_per_second = round(float(match["value"]) * _RATE_UNITS_BPS[match["unit"]])
    if bits_per_second < MIN_RATE_BPS or bits_per_second // 8 > TBF_MAX_BYTES_PER_SECOND:
        raise LabError(
            f"rate {rate!r} out of range: {format_rate(MIN_RATE_BPS)} .. "
            f"{format_rate(TBF_MAX_BYTES_PER_SECOND * 8)}"
        )
    return bits_per_second


def format_rate(bits_per_second: int | None) -> str:
    if bits_per_second is None:
        return "unlimited"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g}{unit}"
    return f"{bits_per_second}bit"


@dataclass(frozen=True)
class TbfShape:
    """The tbf qdisc parameters used for one link rate."""

    rate_bps: int
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def for_rate(cls, rate_bps: int) -> TbfShape:
        bytes_per_second = rate_bps // 8
        burst = max(TBF_MIN_BURST_BYTES, int(bytes_per_second * TBF_BURST_SECONDS))
        limit = burst + int(bytes_per_second * TBF_QUEUE_SECONDS)
        return cls(rate_bps=rate_bps, burst_bytes=burst, limit_bytes=limit)


# --------------------------------------------------------------------------- namespaces


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextlib.contextmanager
def in_netns(ns: str | LabHost) -> Iterator[None]:
    """Move the calling thread into network namespace `ns` and back on exit.

    Only this thread moves (setns(2) on a thread); threads already running are
    unaffected. Sockets created inside keep that namespace for their whole life, also
    after the block ends; threads and processes started inside inherit it.
    """
    name = ns.netns if isinstance(ns, LabHost) else ns
    try:
        target_fd = os.open(_netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"network namespace {name!r} does not exist") from None
    try:
        home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target_fd)
                yield
            finally:
                # Going home is harmless if we never left. If it fails, this thread is
                # stranded in the lab namespace: let that error propagate rather than
                # carry on in the wrong place.
                _setns(home_fd)
        finally:
            os.close(home_fd)
    finally:
        os.close(target_fd)


def _write_sysctls(sysctls: dict[str, str]) -> None:
    # /proc/sys/net resolves to the namespace of the thread that opens the file, so
    # this writes into whatever namespace in_netns() put the calling thread in.
    for key, value in sysctls.items():
        Path("/proc/sys", key).write_text(value)


@contextlib.contextmanager
def _iproute_in(ns: str) -> Iterator[IPRoute]:
    # The netlink socket is created while the thread is in `ns`, so it talks to `ns`.
    # (IPRoute(netns=...) would fork a helper per call and create a missing namespace.)
    with in_netns(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _netns_inode(ns: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(_netns_path(ns))
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _pids_in_namespaces(namespaces: Sequence[str]) -> dict[str, list[int]]:
    """PIDs of processes whose network namespace is one of `namespaces` (diagnostic)."""
    inode_to_ns: dict[tuple[int, int], str] = {}
    for ns in namespaces:
        inode = _netns_inode(ns)
        if inode is not None:
            inode_to_ns[inode] = ns
    users: dict[str, list[int]] = {}
    if not inode_to_ns:
        return users
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # the process exited or is not ours to look at
        ns = inode_to_ns.get((stat.st_dev, stat.st_ino))
        if ns is not None:
            users.setdefault(ns, []).append(int(entry))
    return users


# --------------------------------------------------------------------------- processes


class NetnsProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A background process started inside a lab namespace (see `popen`).

    `stop()` terminates it by PID: SIGTERM, then SIGKILL after `timeout`. When started
    in its own session (the default) the signal goes to its process group, so helpers
    it spawned (e.g. a shell pipeline) go too; nothing else is ever signalled.
    """

    netns: str = ""
    own_process_group: bool = False

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate the process (if still running) and return its exit status."""
        if self.poll() is not None:
            return self.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.wait()

    def _signal(self, signum: signal.Signals) -> None:
        # Only while the child is unreaped: its PID (and process group id) cannot have
        # been reused by anybody else yet.
        if self.returncode is not None:
            return
        try:
            if self.own_process_group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # exited in between; wait() will reap it

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        super().__exit__(*exc_info)


def _netns_name_of(ns: str | LabHost) -> str:
    return ns.netns if isinstance(ns, LabHost) else ns


def _ip_netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run(
    ns: str | LabHost,
    argv: Sequence[str],
    *,
    sysfs: bool = False,
    **run_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run `argv` in namespace `ns` and wait for it; keyword arguments go to subprocess.run.

    By default the child is forked from a thread that is inside the namespace: it sees
    the host's /sys unchanged, so BPF objects pinned under /sys/fs/bpf stay visible.
    `sysfs=True` uses `ip netns exec` instead, which remounts /sys for the namespace
    (needed by tools that read /sys/class/net) and hides /sys/fs/bpf.
    """
    name = _netns_name_of(ns)
    if sysfs:
        return subprocess.run(_ip_netns_exec_argv(name, argv), **run_kwargs)
    with in_netns(name):
        return subprocess.run(list(argv), **run_kwargs)


def popen(
    ns: str | LabHost,
    argv: Sequence[str],
    *,
    new_session: bool = True,
    sysfs: bool = False,
    **popen_kwargs: Any,
) -> NetnsProcess:
    """Start `argv` in the background in namespace `ns`; stop it with `.stop()`.

    Keyword arguments go to subprocess.Popen. `new_session` puts the child in its own
    session/process group (Ctrl-C in the terminal does not reach it; `stop()` stops
    its whole group). `sysfs` as for `run`.
    """
    name = _netns_name_of(ns)
    command = _ip_netns_exec_argv(name, argv) if sysfs else list(argv)
    with in_netns(name):
        process = NetnsProcess(command, start_new_session=new_session, **popen_kwargs)
    process.netns = name
    process.own_process_group = new_session
    return process


# --------------------------------------------------------------------------- description


@dataclass
class LabHost:
    """One member of a lab: the client, the host (load balancer) or a target."""

    name: str  # "client", "host", "t0", "t1", ...
    role: str  # "client", "host" or "target"
    netns: str  # its network namespace, e.g. "xo-demo-t0"
    ifname: str  # its veth end, inside netns
    ifindex: int
    mac: str
    ipv4: str
    ipv6: str
    ipv4_prefixlen: int
    ipv6_prefixlen: int
    port_ifname: str  # the bridge-side veth end, in the bridge namespace
    port_ifindex: int
    rate_bps: int | None  # tbf on both ends of this link; None = unlimited
    tbf: TbfShape | None

    def address(self, family: int) -> str:
        """The member's address for socket.AF_INET or socket.AF_INET6."""
        if family == socket.AF_INET:
            return self.ipv4
        if family == socket.AF_INET6:
            return self.ipv6
        raise ValueError(f"unsupported address family {family}")

    def exists(self) -> bool:
        return netns_exists(self.netns)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabHost:
        values = dict(data)
        if values.get("tbf") is not None:
            values["tbf"] = TbfShape(**values["tbf"])
        return cls(**values)


@dataclass
class Lab:
    """A running lab, as saved in /run/xo/labs/<name>.json by `up`."""

    name: str
    bridge_netns: str
    bridge_ifname: str
    ipv4_network: str
    ipv6_network: str
    rate_bps: int | None  # host and target links
    client_rate_bps: int | None
    hosts: list[LabHost]
    sysctls: dict[str, str]
    created_at: float
    # Background processes started through this object; stopped by stop_processes().
    processes: list[NetnsProcess] = field(default_factory=list, repr=False, compare=False)

    # ---- members

    @property
    def client(self) -> LabHost:
        return self.member("client")

    @property
    def host(self) -> LabHost:
        """The load balancer."""
        return self.member("host")

    @property
    def targets(self) -> list[LabHost]:
        return [member for member in self.hosts if member.role == "target"]

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_netns, *(member.netns for member in self.hosts)]

    def member(self, name: str | LabHost) -> LabHost:
        """Look a member up by name ('client', 'host', 't0', ...) or namespace."""
        if isinstance(name, LabHost):
            return name
        for member in self.hosts:
            if name in (member.name, member.netns):
                return member
        raise KeyError(f"lab {self.name!r} has no member {name!r}")

    # ---- persistence

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["processes"]
        data["version"] = LAB_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lab:
        values = dict(data)
        version = values.pop("version", None)
        if version != LAB_FORMAT_VERSION:
            raise LabError(f"lab description version {version!r} is not {LAB_FORMAT_VERSION}")
        values["hosts"] = [LabHost.from_dict(member) for member in values["hosts"]]
        return cls(**values)

    def save(self) -> Path:
        path = lab_state_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".json.tmp{os.getpid()}")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        temporary.replace(path)  # readers never see a half-written file
        return path

    @classmethod
    def load(cls, name: str) -> Lab:
        path = lab_state_path(name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabNotFoundError(f"no lab {name!r} ({path} does not exist)") from None
        return cls.from_dict(data)

    def exists(self) -> bool:
        """True if every namespace of the lab is present."""
        return all(netns_exists(ns) for ns in self.namespaces)

    # ---- running code inside

    def netns(self, member: str | LabHost) -> contextlib.AbstractContextManager[None]:
        """`in_netns` for a member: `with testbed.netns("t0"): sock = socket.socket()`."""
        return in_netns(self.member(member).netns)

    def run(
        self, member: str | LabHost, argv: Sequence[str], **run_kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return run(self.member(member), argv, **run_kwargs)

    def popen(
        self, member: str | LabHost, argv: Sequence[str], **popen_kwargs: Any
    ) -> NetnsProcess:
        process = popen(self.member(member), argv, **popen_kwargs)
        self.processes.append(process)
        return process

    def stop_processes(self, timeout: float = 5.0) -> None:
        """Stop every background process started with `Lab.popen`."""
        while self.processes:
            self.processes.pop().stop(timeout)


# --------------------------------------------------------------------------- up


def _host_id_addresses(host_id: int) -> tuple[str, str]:
    ipv4 = IPV4_NETWORK[host_id]
    # The IPv6 interface id spells the same digits as the last IPv4 octet (…::10 for
    # 198.18.0.10) so the two addresses of a member are easy to match up.
    ipv6 = IPV6_NETWORK[int(str(host_id), 16)]
    return str(ipv4), str(ipv6)


def _member_plan(targets: int) -> list[tuple[str, str, int]]:
    """(name, role, host id) of every member, client first."""
    plan = [("client", "client", CLIENT_HOST_ID), ("host", "host", LB_HOST_ID)]
    plan += [
        (target_member_name(index), "target", FIRST_TARGET_HOST_ID + index)
        for index in range(targets)
    ]
    return plan


def _add_tbf(ipr: IPRoute, ifindex: int, shape: TbfShape) -> None:
    ipr.tc(
        "add",
        "tbf",
        index=ifindex,
        handle=0x10000,  # 1:
        rate=shape.rate_bps // 8,  # pyroute2 takes a plain int as bytes per second
        burst=shape.burst_bytes,
        limit=shape.limit_bytes,
    )


def _link_index(ipr: IPRoute, ifname: str) -> int:
    indexes = ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise LabError(f"link {ifname} not found")
    return int(indexes[0])


def _create_netns(ns: str) -> None:
    if netns_exists(ns):
        raise LabExistsError(f"network namespace {ns} already exists")
    netns.create(ns)


def _build_bridge(lab_name: str) -> int:
    ns = bridge_netns(lab_name)
    _create_netns(ns)
    with in_netns(ns):
        _write_sysctls(BRIDGE_SYSCTLS)
    with _iproute_in(ns) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        ipr.link(
            "add",
            ifname=bridge_ifname(lab_name),
            kind="bridge",
            br_stp_state=0,
            br_forward_delay=0,  # ports forward as soon as they are up
            # No querier in the lab: never let snooping filter IPv6 neighbour discovery.
            br_mcast_snooping=0,
        )
        bridge_index = _link_index(ipr, bridge_ifname(lab_name))
        ipr.link("set", index=bridge_index, state="up")
    return bridge_index


def _build_member(
    lab_name: str,
    name: str,
    role: str,
    host_id: int,
    bridge_index: int,
    rate_bps: int | None,
) -> LabHost:
    ns = member_netns(lab_name, name)
    ifname = member_ifname(lab_name, name)
    port = port_ifname(lab_name, name)
    ipv4, ipv6 = _host_id_addresses(host_id)
    mac = f"{MAC_PREFIX}:{host_id:02x}"
    shape = TbfShape.for_rate(rate_bps) if rate_bps is not None else None

    _create_netns(ns)
    with in_netns(ns):
        _write_sysctls(MEMBER_SYSCTLS)

    # The veth is born with one end in the bridge namespace and the other in the
    # member's namespace: it never exists in the root namespace.
    member_ns_fd = os.open(_netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _iproute_in(bridge_netns(lab_name)) as ipr:
            ipr.link(
                "add",
                ifname=port,
                kind="veth",
                peer={"ifname": ifname, "address": mac, "net_ns_fd": member_ns_fd},
            )
            port_index = _link_index(ipr, port)
            ipr.link("set", index=port_index, master=bridge_index, state="up")
            if shape is not None:
                _add_tbf(ipr, port_index, shape)  # bridge -> member direction
    finally:
        os.close(member_ns_fd)

    with _iproute_in(ns) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        index = _link_index(ipr, ifname)
        ipr.addr("add", index=index, address=ipv4, prefixlen=IPV4_NETWORK.prefixlen)
        ipr.addr(
            "add",
            index=index,
            address=ipv6,
            prefixlen=IPV6_NETWORK.prefixlen,
            flags=IFA_F_NODAD,
        )
        ipr.link("set", index=index, state="up")
        if shape is not None:
            _add_tbf(ipr, index, shape)  # member -> bridge direction
        actual_mac = ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS")

    return LabHost(
        name=name,
        role=role,
        netns=ns,
        ifname=ifname,
        ifindex=index,
        mac=actual_mac,
        ipv4=ipv4,
        ipv6=ipv6,
        ipv4_prefixlen=IPV4_NETWORK.prefixlen,
        ipv6_prefixlen=IPV6_NETWORK.prefixlen,
        port_ifname=port,
        port_ifindex=port_index,
        rate_bps=rate_bps,
        tbf=shape,
    )


def _member_ready(member: LabHost) -> bool:
    with _iproute_in(member.netns) as ipr:
        link = ipr.link("get", index=member.ifindex)[0]
        if link.get_attr("IFLA_OPERSTATE") != "UP":
            return False
        for address in ipr.addr("dump", index=member.ifindex):
            flags = address.get_attr("IFA_FLAGS") or address["flags"]
            if flags & IFA_F_TENTATIVE:
                return False
    return True


def _wait_ready(testbed: Lab, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    pending = list(testbed.hosts)
    while pending:
        pending = [member for member in pending if not _member_ready(member)]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(member.name for member in pending)
            raise LabError(f"lab {testbed.name}: links of {names} not up after {timeout:g} s")
        time.sleep(0.02)


def lab_in_use(name: str) -> list[str]:
    """What already exists under lab name `name`: its JSON and/or namespaces."""
    found = list(_lab_namespaces_on_disk().get(name, []))
    if lab_state_path(name).exists():
        found.insert(0, str(lab_state_path(name)))
    return found


def _claim_name(name: str, force: bool) -> None:
    """Make sure nothing named like lab `name` exists (tearing it down if `force`)."""
    existing = lab_in_use(name)
    if not existing:
        return
    if not force:
        raise LabExistsError(
            f"lab {name!r} already exists ({', '.join(existing)}); "
            f"tear it down with `xo lab down --name {name}` or recreate it with --force"
        )
    down(name)


def _build(name: str, targets: int, rate_bps: int | None, client_rate_bps: int | None) -> Lab:
    bridge_index = _build_bridge(name)
    members = [
        _build_member(
            name,
            member_name,
            role,
            host_id,
            bridge_index,
            client_rate_bps if role == "client" else rate_bps,
        )
        for member_name, role, host_id in _member_plan(targets)
    ]
    testbed = Lab(
        name=name,
        bridge_netns=bridge_netns(name),
        bridge_ifname=bridge_ifname(name),
        ipv4_network=str(IPV4_NETWORK),
        ipv6_network=str(IPV6_NETWORK),
        rate_bps=rate_bps,
        client_rate_bps=client_rate_bps,
        hosts=members,
        sysctls=dict(MEMBER_SYSCTLS),
        created_at=time.time(),
    )
    _wait_ready(testbed)
    testbed.save()
    return testbed


def _validated_parameters(
    name: str, targets: int, rate: str | int | None, client_rate: str | int | None
) -> tuple[int | None, int | None]:
    validate_lab_name(name)
    if not 1 <= targets <= MAX_TARGETS:
        raise LabError(f"targets must be between 1 and {MAX_TARGETS}, not {targets}")
    return parse_rate(rate), parse_rate(client_rate)


def up(
    name: str = DEFAULT_LAB_NAME,
    targets: int = DEFAULT_TARGETS,
    rate: str | int | None = None,
    *,
    client_rate: str | int | None = None,
    force: bool = False,
) -> Lab:
    """Bring a lab up and save its description; see `lab()` for a self-cleaning variant.

    `rate` limits the host and target links (both directions, tbf), `client_rate` the
    client link; None means unlimited. Fails with LabExistsError if anything named like
    this lab exists, unless `force`, which tears the old one down first. On any failure
    (also KeyboardInterrupt) everything created so far is removed again.
    """
    rate_bps, client_rate_bps = _validated_parameters(name, targets, rate, client_rate)
    _claim_name(name, force)
    try:
        return _build(name, targets, rate_bps, client_rate_bps)
    except BaseException:
        # Also on KeyboardInterrupt: never leave half a lab behind.
        with _deferred_sigint():
            down(name)
        raise


# --------------------------------------------------------------------------- XDP


# The bridge port's checksum offload, as ethtool names it (veth: NETIF_F_HW_CSUM).
PORT_CSUM_FEATURE = "tx-checksum-ip-generic"


def prepare_xdp_tx(testbed: Lab, member: str | LabHost) -> None:
    """Let an XDP program on `member`'s veth send frames back with XDP_TX.

    Two things a real NIC gives an XDP program for free have to be made for a veth
    (kernel 6.18; see docs/steering.md, "XDP on veth", for the measurements):

    - A pass-through XDP program on the bridge-side port, the veth's peer. XDP_TX on
      a veth queues the frame on the peer's NAPI ring, and only wakes the peer's NAPI
      if the peer has an XDP program (veth_xdp_flush checks the peer's xdp_prog). Without
      NAPI on the peer the frames are dropped; with NAPI from GRO alone (ethtool -K
      <port> gro on) they are queued but never polled. XO's own program with a private,
      empty flow map passes everything.
    - Complete checksums on what the port sends to the member. Traffic between
      namespaces is CHECKSUM_PARTIAL (the TCP checksum field holds only the pseudo
      header sum), which tc and the stack know from the skb but XDP cannot see; XDP_TX
      turns the packet into a bare frame, and the receiver would check the partial
      sum and drop the segment (TcpInCsumErrors). With checksum offload off on the
      port, the kernel completes every checksum before handing the frame over, as a
      wire would.

    Idempotent; undone when the lab is torn down (the links go).
    """
    from pyroute2.ethtool import Ethtool

    from xo.steer import Prog, Steer

    host = testbed.member(member)
    with in_netns(testbed.bridge_netns):
        ethtool = Ethtool()
    try:
        features = ethtool.get_features(host.port_ifname)
        if features.features[PORT_CSUM_FEATURE].enable:
            features.features[PORT_CSUM_FEATURE].enable = False
            ethtool.set_features(host.port_ifname, features)
        if ethtool.get_features(host.port_ifname).features[PORT_CSUM_FEATURE].enable:
            raise LabError(f"cannot turn off checksum offload on {host.port_ifname}")
    finally:
        ethtool.close()

    with _iproute_in(testbed.bridge_netns) as ipr:
        link = ipr.link("get", index=host.port_ifindex)[0]
        xdp = link.get_attr("IFLA_XDP")
        if xdp is not None and xdp.get_attr("IFLA_XDP_PROG_ID"):
            return  # already has its program
    # max_flows=1: the map is never written; nothing to preallocate.
    passthrough = Steer(pin=False, max_flows=1)
    try:
        passthrough.attach(host.port_ifindex, Prog.XDP,
                           netns=str(_netns_path(testbed.bridge_netns)))
    finally:
        # The kernel keeps the program (and its map) attached until the port goes.
        passthrough.close(keep_attached=True)


# --------------------------------------------------------------------------- down


def _lab_namespaces_on_disk() -> dict[str, list[str]]:
    """Lab name -> namespaces in /run/netns that follow the lab naming scheme."""
    labs: dict[str, list[str]] = {}
    for ns in sorted(netns.listnetns(str(NETNS_DIR))):
        match = LAB_NETNS_RE.fullmatch(ns)
        if match:
            labs.setdefault(match["lab"], []).append(ns)
    return labs


def list_labs() -> list[str]:
    """Names of all labs that have a description or at least one namespace."""
    names = set(_lab_namespaces_on_disk())
    if LAB_STATE_DIR.is_dir():
        names.update(
            path.stem for path in LAB_STATE_DIR.glob("*.json") if LAB_NAME_RE.fullmatch(path.stem)
        )
    return sorted(names)


def _delete_links(ns: str) -> None:
    # Deleting a veth end deletes its peer too. Doing it explicitly (rather than
    # relying on the namespace going away) matters when some process or socket still
    # holds the namespace: its links would otherwise stay alive with it.
    with _iproute_in(ns) as ipr:
        links = [
            (link["index"], link.get_attr("IFLA_IFNAME"))
            for link in ipr.link("dump")
            if link.get_attr("IFLA_IFNAME") != "lo"
        ]
        # Ports before the bridge; a port may already be gone with its peer.
        for index, ifname in sorted(links, key=lambda item: item[1].endswith("-br")):
            try:
                ipr.link("del", index=index)
            except NetlinkError as error:
                if error.code != errno.ENODEV:
                    raise
                log.debug("link %s in %s already gone", ifname, ns)


def _remove_netns(ns: str) -> None:
    try:
        _delete_links(ns)
    except LabError:
        return  # vanished meanwhile
    except OSError as error:
        # E.g. the file exists but was never bind-mounted (creation interrupted):
        # setns() on it fails; removing the file below is all there is to do.
        log.debug("cannot enter %s (%s); removing it anyway", ns, error)
    try:
        netns.remove(ns)
    except FileNotFoundError:
        pass


def down(name: str = DEFAULT_LAB_NAME) -> list[str]:
    """Remove a lab: its links, namespaces and description. Idempotent.

    Works from the naming scheme, not only from the JSON, so a lab whose `up` was
    interrupted is removed completely too. Returns the namespaces removed.
    """
    validate_lab_name(name)
    namespaces = set(_lab_namespaces_on_disk().get(name, []))
    with contextlib.suppress(LabError, ValueError, TypeError, KeyError):  # no/bad JSON
        namespaces.update(Lab.load(name).namespaces)
    present = sorted(ns for ns in namespaces if netns_exists(ns))
    for ns, pids in _pids_in_namespaces(present).items():
        log.warning(
            "processes %s still run in %s; its links are removed, the namespace itself "
            "is freed when they exit",
            pids,
            ns,
        )
    # Bridge namespace first: deleting its ports removes every member's veth at once.
    for ns in sorted(present, key=lambda ns: not ns.endswith("-br")):
        _remove_netns(ns)
    with contextlib.suppress(FileNotFoundError):
        lab_state_path(name).unlink()
    _remove_pin_dirs(name)
    return present


# Where XO processes of a lab keep their pinned steering maps (one bpffs each,
# named <lab>-<member>); a member killed with SIGKILL leaves its pins behind.
PIN_ROOT = Path("/run/xo/bpf")


def _remove_pin_dirs(name: str) -> None:
    for pin_dir in PIN_ROOT.glob(f"{name}-*"):
        if not LAB_NETNS_RE.match(f"xo-{pin_dir.name}"):
            continue  # another lab whose name merely starts the same way
        subprocess.run(["umount", "-l", str(pin_dir)], capture_output=True)
        shutil.rmtree(pin_dir, ignore_errors=True)


def down_all() -> dict[str, list[str]]:
    """Remove every lab (by JSON or by namespace naming scheme). Returns lab -> namespaces."""
    return {name: down(name) for name in list_labs()}


# --------------------------------------------------------------------------- context manager


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C during teardown so it cannot stop half-way; re-raise after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def lab(
    name: str = DEFAULT_LAB_NAME,
    targets: int = DEFAULT_TARGETS,
    rate: str | int | None = None,
    *,
    client_rate: str | int | None = None,
    force: bool = False,
) -> Iterator[Lab]:
    """Bring a lab up for the duration of a `with` block; always tear it down.

    Teardown (stop the processes started with Lab.popen, then `down`) runs also when
    the block or the bring-up raises, including KeyboardInterrupt. A name already in
    use raises LabExistsError and leaves the existing lab alone (unless `force`).
    """
    rate_bps, client_rate_bps = _validated_parameters(name, targets, rate, client_rate)
    _claim_name(name, force)  # outside the try: an existing lab is not ours to remove
    testbed: Lab | None = None
    try:
        testbed = _build(name, targets, rate_bps, client_rate_bps)
        yield testbed
    finally:
        _teardown(name, testbed)


def _teardown(name: str, testbed: Lab | None) -> None:
    with _deferred_sigint():
        try:
            if testbed is not None:
                testbed.stop_processes()
        finally:
            down(name)


# --------------------------------------------------------------------------- status


@dataclass
class MemberState:
    """What is live right now for one member."""

    netns_exists: bool
    link_state: str  # operstate of its veth, or "missing"


def _member_state(member: LabHost) -> MemberState:
    if not member.exists():
        return MemberState(netns_exists=False, link_state="missing")
    try:
        with _iproute_in(member.netns) as ipr:
            links = ipr.link("get", index=member.ifindex)
            state = links[0].get_attr("IFLA_OPERSTATE") or "unknown"
    except (LabError, OSError, NetlinkError) as error:  # namespace or link gone
        log.debug("link of %s: %s", member.name, error)
        state = "missing"
    return MemberState(netns_exists=True, link_state=state)


def lab_status(name: str) -> dict[str, Any]:
    """Description plus live state of one lab, as plain data (what `status --json` prints)."""
    validate_lab_name(name)
    on_disk = _lab_namespaces_on_disk().get(name, [])
    try:
        testbed = Lab.load(name)
    except LabNotFoundError:
        return {"name": name, "described": False, "namespaces": on_disk}
    data = testbed.to_dict()
    data["described"] = True
    data["bridge_netns_exists"] = netns_exists(testbed.bridge_netns)
    for member_data, member in zip(data["hosts"], testbed.hosts, strict=True):
        member_data.update(asdict(_member_state(member)))
    data["namespaces"] = on_disk
    return data


def _yes_no(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def _print_status_tables(statuses: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output (logs, CI) gets the full table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not statuses:
        console.print("no xo labs")
        return
    for status in statuses:
        if not status["described"] and not status["namespaces"]:
            console.print(f"lab {status['name']} does not exist")
            continue
        if not status["described"]:
            leftovers = ", ".join(status["namespaces"])
            console.print(
                f"[bold]lab {status['name']}[/bold]: [yellow]no description[/yellow] "
                f"(partial or interrupted; namespaces: {leftovers}); "
                f"remove with `xo lab down --name {status['name']}`"
            )
            continue
        table = Table(
            title=(
                f"lab {status['name']}: bridge {status['bridge_ifname']} in "
                f"{status['bridge_netns']} (exists: {_yes_no(status['bridge_netns_exists'])}), "
                f"{status['ipv4_network']}, {status['ipv6_network']}"
            ),
            title_justify="left",
        )
        table.add_column("member")
        table.add_column("netns", no_wrap=True)
        table.add_column("exists")
        table.add_column("interface (ifindex)", no_wrap=True)
        table.add_column("link")
        table.add_column("MAC", no_wrap=True)
        table.add_column("IPv4", no_wrap=True)
        table.add_column("IPv6", no_wrap=True)
        table.add_column("rate")
        table.add_column("bridge port", no_wrap=True)
        for member in status["hosts"]:
            table.add_row(
                member["name"],
                member["netns"],
                _yes_no(member["netns_exists"]),
                f"{member['ifname']} ({member['ifindex']})",
                member["link_state"],
                member["mac"],
                f"{member['ipv4']}/{member['ipv4_prefixlen']}",
                f"{member['ipv6']}/{member['ipv6_prefixlen']}",
                format_rate(member["rate_bps"]),
                member["port_ifname"],
            )
        console.print(table)


# --------------------------------------------------------------------------- CLI


def _cmd_up(args: argparse.Namespace) -> int:
    up(args.name, args.targets, args.rate, client_rate=args.client_rate, force=args.force)
    statuses = [lab_status(args.name)]
    if args.json:
        print(json.dumps({"labs": statuses}, indent=2))
    else:
        _print_status_tables(statuses)
    return 0


def _report_removed(name: str, namespaces: Sequence[str]) -> None:
    if not namespaces:
        print(f"lab {name}: nothing to remove")
    elif len(namespaces) <= 6:
        print(f"lab {name}: removed {', '.join(namespaces)}")
    else:
        print(f"lab {name}: removed {len(namespaces)} namespaces (xo-{name}-*)")


def _cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        removed = down_all()
        for name, namespaces in removed.items():
            _report_removed(name, namespaces)
        if not removed:
            print("no xo labs")
        return 0
    _report_removed(args.name, down(args.name))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_labs()
    statuses = [lab_status(name) for name in names]
    if args.json:
        print(json.dumps({"labs": statuses}, indent=2))
    else:
        _print_status_tables(statuses)
    if args.name and not statuses[0]["described"] and not statuses[0]["namespaces"]:
        return 1  # the lab asked for does not exist
    return 0


def _targets_argument(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_TARGETS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_TARGETS}")
    return value


def _lab_name_argument(text: str) -> str:
    try:
        return validate_lab_name(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_leaf_commands(subparsers: Any) -> None:
    up_parser = subparsers.add_parser("up", help="create a lab (namespaces, bridge, links)")
    up_parser.add_argument(
        "--name",
        type=_lab_name_argument,
        default=DEFAULT_LAB_NAME,
        help=f"lab name, 1-{LAB_NAME_MAX_LEN} of [a-z0-9] (default {DEFAULT_LAB_NAME})",
    )
    up_parser.add_argument(
        "--targets",
        type=_targets_argument,
        default=DEFAULT_TARGETS,
        help=f"number of targets (default {DEFAULT_TARGETS})",
    )
    up_parser.add_argument(
        "--rate",
        default=None,
        help="tbf limit on host and target links, both directions (e.g. 1gbit; default unlimited)",
    )
    up_parser.add_argument(
        "--client-rate", default=None, help="tbf limit on the client link (default unlimited)"
    )
    up_parser.add_argument(
        "--force", action="store_true", help="tear down an existing lab of that name first"
    )
    up_parser.add_argument("--json", action="store_true", help="print the description as JSON")
    up_parser.set_defaults(func=_cmd_up)

    down_parser = subparsers.add_parser("down", help="remove a lab (idempotent)")
    which = down_parser.add_mutually_exclusive_group()
    which.add_argument(
        "--name",
        type=_lab_name_argument,
        default=DEFAULT_LAB_NAME,
        help=f"lab name (default {DEFAULT_LAB_NAME})",
    )
    which.add_argument(
        "--all", action="store_true", help="remove every xo lab (by description or namespace name)"
    )
    down_parser.set_defaults(func=_cmd_down)

    status_parser = subparsers.add_parser("status", help="show labs and their live state")
    status_parser.add_argument(
        "--name", type=_lab_name_argument, default=None, help="one lab (default: all labs)"
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    status_parser.set_defaults(func=_cmd_status)


def add_lab_commands(subparsers: Any) -> Any:
    """Register `lab up|down|status` on an argparse subparsers object.

    Each leaf sets `func`: call `args.func(args)`, which returns an exit status and
    raises LabError (print its message) on failure. Returns the `lab` parser's own
    subparsers object, so callers can add more `lab` commands (e.g. `demo`).
    """
    lab_parser: argparse.ArgumentParser = subparsers.add_parser(
        "lab", help="one-machine lab of network namespaces (client, host, targets)"
    )
    leaves = lab_parser.add_subparsers(dest="lab_command", required=True)
    _add_leaf_commands(leaves)
    return leaves


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m xo.lab up|down|status ...`."""
    parser = argparse.ArgumentParser(prog="python -m xo.lab", description=__doc__.splitlines()[0])
    _add_leaf_commands(parser.add_subparsers(dest="lab_command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # `up` has already removed its partial lab by the time this arrives here.
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
