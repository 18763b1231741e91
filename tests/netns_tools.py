"""Small network-namespace testbeds for the core's TCP tests.

The lab (xo.lab) is the full client/host/targets topology; these tests need
something narrower: a peer and one or two "host" namespaces joined by a
single veth that can be moved between the host namespaces, so a restored
socket can live in another namespace with the same address. It is made with
the lab's namespace helpers (xo.lab.namespaces, the one place namespaces and
links are made). Everything is named ``xo-t<random>-*`` and removed in
``close()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import socket
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo.lab import add_addresses, add_veth, create_netns, in_netns, move_link, remove_netns

PEER_V4, HOST_V4 = "198.18.1.1", "198.18.1.2"
PEER_V6, HOST_V6 = "2001:2:0:1::1", "2001:2:0:1::2"
SIOCOUTQNSD = 0x894B


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                   check=True, capture_output=True, text=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0,
             interval: float = 0.02) -> None:
    """Poll until cond() holds. The timeout only turns a hang into a failure
    (generous: the machine is shared), it is never what a test judges by."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def snmp_tcp(ns: str) -> dict[str, int]:
    """The Tcp: counters of /proc/net/snmp as seen from namespace ns."""
    with in_netns(ns), open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}


def ktls_counters(ns: str) -> Counter[str]:
    """The kernel TLS counters of namespace ns (/proc/net/tls_stat, per
    namespace: sockets that got kernel TLS each way, decrypt errors). No file
    yet (the tls module loads at its first use): all zero."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(FileNotFoundError), in_netns(ns), \
            open("/proc/thread-self/net/tls_stat") as f:
        counts.update({k: int(v) for k, v in (line.split() for line in f if line.strip())})
    return counts


def queue_sizes(sock: socket.socket) -> tuple[int, int, int]:
    """(receive queue, send queue, unsent part of the send queue) in bytes."""
    buf = bytearray(4)
    out = []
    for req in (termios.FIONREAD, termios.TIOCOUTQ, SIOCOUTQNSD):
        fcntl.ioctl(sock.fileno(), req, buf)
        out.append(struct.unpack("i", buf)[0])
    return out[0], out[1], out[2]


@dataclass
class VethPair:
    """peer namespace <-veth-> host namespace a (movable to b)."""

    family: int
    sysctls: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    location: str = "a"

    def __post_init__(self) -> None:
        self.peer_ns = f"xo-t{self.tag}-p"
        self.ns = {"a": f"xo-t{self.tag}-a", "b": f"xo-t{self.tag}-b"}
        self.peer_if = f"xot{self.tag}p"
        self.host_if = f"xot{self.tag}h"
        self._blocked = False

    @property
    def v6(self) -> bool:
        return self.family == socket.AF_INET6

    @property
    def peer_ip(self) -> str:
        return PEER_V6 if self.v6 else PEER_V4

    @property
    def host_ip(self) -> str:
        return HOST_V6 if self.v6 else HOST_V4

    @property
    def host_ns(self) -> str:
        return self.ns[self.location]

    def open(self) -> VethPair:
        try:
            self._build()
        except BaseException:
            self.close()  # never leave half a testbed behind
            raise
        return self

    def _build(self) -> None:
        for ns in (self.peer_ns, *self.ns.values()):
            create_netns(ns, self.sysctls)
        add_veth(self.peer_ns, self.peer_if, self.ns["a"], self.host_if, up=False)
        self._configure(self.peer_ns, self.peer_if, PEER_V4, PEER_V6)
        self._configure(self.ns["a"], self.host_if, HOST_V4, HOST_V6)

    def _configure(self, ns: str, ifname: str, v4: str, v6: str) -> None:
        add_addresses(ns, ifname, [f"{v4}/24", f"{v6}/64"])
        # A 10 ms minimum RTO keeps a packet dropped during a handoff from
        # stalling the test for the default 200 ms.
        ip("-n", ns, "route", "replace", "198.18.1.0/24", "dev", ifname, "rto_min", "10ms")
        ip("-n", ns, "-6", "route", "replace", "2001:2:0:1::/64", "dev", ifname,
           "rto_min", "10ms")

    def move_host_link(self, to: str) -> None:
        """Move the host end of the veth (with its addresses) to namespace `to`."""
        move_link(self.host_ns, self.host_if, self.ns[to])
        self.location = to
        self._configure(self.host_ns, self.host_if, HOST_V4, HOST_V6)

    def set_mtu(self, mtu: int) -> None:
        """MTU of both ends of the veth (jumbo segments need it)."""
        ip("-n", self.peer_ns, "link", "set", "dev", self.peer_if, "mtu", str(mtu))
        ip("-n", self.host_ns, "link", "set", "dev", self.host_if, "mtu", str(mtu))

    def block(self, ns: str | None = None) -> None:
        """Drop every packet from the peer in the host namespace (the role
        the eBPF block rule plays in production); `ns`: another host
        namespace than the current one."""
        nft(ns or self.host_ns, f"""
            table inet xo_block {{
              chain input {{ type filter hook input priority -300; policy accept;
                ip saddr {PEER_V4} drop
                ip6 saddr {PEER_V6} drop
              }}
            }}""")
        self._blocked = True

    def unblock(self, ns: str | None = None) -> None:
        nft(ns or self.host_ns, "delete table inet xo_block")
        self._blocked = False

    def hand_over(self, sock: socket.socket, peer: socket.socket, *, tls: Any = None,
                  tls_user: bool = False) -> tuple[socket.socket, Any]:
        """Move a connection's host end to the other namespace, as a handoff
        does (IPv4), once both ends' send queues are empty: with nothing
        unacknowledged the peer sends nothing while the connection moves (a
        segment it resent would meet the frozen socket, or a namespace without
        the socket, which would reset it; a real handoff blocks the flow
        instead). Freeze, capture (``tls``: the TLS state to carry, for a
        session kept in user space), encode, discard; move the link with its
        address; decode, restore (``tls_user``: keys left to the caller),
        resume. Netlink in-process, no tool processes (the full-kernel lane
        pays for each). Returns the restored socket and the captured state."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
        from xo import core

        assert not self.v6, "hand_over moves IPv4 connections"
        wait_for(lambda: queue_sizes(sock)[1] == 0 and queue_sizes(peer)[1] == 0,
                 "both ends' bytes acknowledged")
        new_loc = "b" if self.location == "a" else "a"
        core.freeze(sock)
        state = core.capture(sock)
        if tls is not None:
            state.tls = tls
        wire = state.encode()
        core.discard(sock)
        with in_netns(self.host_ns):
            old = IPRoute()
        with old:
            index = old.link_lookup(ifname=self.host_if)[0]
            old.link("set", index=index, net_ns_fd=self.ns[new_loc])
        self.location = new_loc
        with in_netns(self.host_ns):
            new = IPRoute()
        with new:
            index = new.link_lookup(ifname=self.host_if)[0]
            new.addr("add", index=index, address=HOST_V4, prefixlen=24)
            new.addr("add", index=index, address=HOST_V6, prefixlen=64, flags=IFA_F_NODAD)
            new.link("set", index=index, state="up")
        moved = core.TcpState.decode(wire)
        with in_netns(self.host_ns):
            restored = core.restore(moved, tls_user=tls_user)
        core.resume(restored, moved)
        restored.settimeout(10)
        return restored, state

    def close(self) -> None:
        for ns in (self.peer_ns, *self.ns.values()):
            remove_netns(ns)


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # linux/socket.h; Python does not name them


def connect(pair: VethPair, rcvbuf: int | None = None, *, host_rcvbuf: int | None = None,
            peer_rcvbuf_force: int | None = None,
            peer_mss: int | None = None) -> tuple[socket.socket, socket.socket]:
    """An established connection peer -> host; returns (peer, host) sockets.

    host_rcvbuf / peer_rcvbuf_force: SO_RCVBUFFORCE before the handshake (so the
    window scale fits); peer_mss: the MSS the peer announces (TCP_MAXSEG), which
    becomes the host's MSS clamp.
    """
    with in_netns(pair.host_ns):
        listener = socket.socket(pair.family, socket.SOCK_STREAM)
    if host_rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, host_rcvbuf)
    listener.bind((pair.host_ip, 0))
    listener.listen(1)
    with in_netns(pair.peer_ns):
        peer = socket.socket(pair.family, socket.SOCK_STREAM)
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if peer_rcvbuf_force:
        peer.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, peer_rcvbuf_force)
    if peer_mss:
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, peer_mss)
    peer.settimeout(10)
    deadline = time.monotonic() + 5
    while True:
        try:
            peer.connect((pair.host_ip, listener.getsockname()[1]))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    host, _ = listener.accept()
    listener.close()
    host.settimeout(10)
    return peer, host


def tcp_ext(ns: str) -> dict[str, int]:
    """The TcpExt: counters of /proc/net/netstat (what `nstat` calls TcpExt*)."""
    with in_netns(ns), open("/proc/thread-self/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}


def client_loss_counters(ns: str) -> dict[str, int]:
    """What a client's kernel counts when it had to resend: retransmitted
    segments, tail-loss probes, retransmission timeouts; and resets."""
    tcp, ext = snmp_tcp(ns), tcp_ext(ns)
    return {"TcpRetransSegs": tcp["RetransSegs"], "TCPLossProbes": ext["TCPLossProbes"],
            "TCPTimeouts": ext["TCPTimeouts"], "TcpOutRsts": tcp["OutRsts"],
            "TcpEstabResets": tcp["EstabResets"]}


FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


@contextlib.contextmanager
def veth_pair(family: int, sysctls: dict[str, str] | None = None) -> Iterator[VethPair]:
    """An open VethPair of the family, closed (namespaces removed) after."""
    pair = VethPair(family, sysctls or {})
    try:
        yield pair.open()
    finally:
        pair.close()


def csum(data: bytes) -> int:
    """Internet checksum (RFC 1071) of data, as stored in a header."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def start_refapp(ns: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """The reference app (python -m xo.refapp) in namespace ns with the given
    config file, once it says READY. nsenter --net keeps this test's mount
    namespace, so the app's pinned maps are where the test looks."""
    with log.open("ab") as errors:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m",
                                 "xo.refapp", "--config", str(config), "--log", str(log)],
                                stdout=subprocess.PIPE, stderr=errors)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen, deadline = b"", time.monotonic() + 20  # only turns a hang into a failure
    while b"READY" not in seen:
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        seen += proc.stdout.read() or b""
        time.sleep(0.02)
    return proc
