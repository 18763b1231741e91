"""The lab's model: names, addresses and rates of a lab, and the description
(:class:`Lab`, :class:`LabHost`) that ``up`` saves as JSON and every user loads."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xo.lab.errors import LabError, LabNotFoundError
from xo.lab.namespaces import NetnsProcess, in_netns, netns_exists, popen, run

# --------------------------------------------------------------------------- constants

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

# Control traffic first on shaped links (build._add_shaper): TCP segments from or
# to these ports go to the control class, served before bulk (the XO control port,
# XO_DEFAULT_CONTROL_PORT in xo_proto.h, which the reference app and nginx both use).
CONTROL_PORTS: tuple[int, ...] = (7700,)
CONTROL_CLASS = 0x10  # htb classid 1:10, prio 0, rate half the link, ceil the link
BULK_CLASS = 0x20  # htb classid 1:20, prio 1, the rest; unclassified traffic lands here
CONTROL_RATE_DIVISOR = 2
HTB_QUANTUM_BYTES = 131072  # over one 64 KiB GSO packet

READY_TIMEOUT_SECONDS = 5.0  # links of a new lab up and addresses usable

# Where XO processes of a lab keep their pinned steering maps (one bpffs each,
# named <lab>-<member>); a member killed with SIGKILL leaves its pins behind.
PIN_ROOT = Path("/run/xo/bpf")



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
