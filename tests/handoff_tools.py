"""Helpers for the end-to-end handoff tests (the reference app in a real lab).

Everything here talks to real processes in real namespaces: HTTP clients whose
sockets live in the lab's client namespace, the kernel's TCP counters of a
namespace, the steering maps the refapp pins, the fds of a member process.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netns_tools import sha256, snmp_tcp, wait_for
from xo import http1
from xo.core import Endpoint
from xo.demo import RefAppCluster
from xo.lab import PIN_ROOT, Lab, in_netns
from xo.refapp import HTTP_PORT
from xo.steer import Steer

IO_TIMEOUT = 20.0


def lab_name(prefix: str = "e") -> str:
    """A fresh lab name: 1 letter + 6 hex digits (7 chars of [a-z0-9])."""
    return prefix[:1] + secrets.token_hex(3)



# Which driver runs which member (xo.demo.RefAppCluster.drivers): the Python
# asyncio engine, the C poll() driver, and each mixed with the other, so the
# two drivers of the one protocol machine are shown to interoperate.
DRIVER_MIXES: dict[str, dict[str, str]] = {
    "py": {},
    "c": {"*": "c"},
    "py_host-c_targets": {"*": "c", "host": "py"},
    "c_host-py_targets": {"host": "c"},
}


def docroot_digests(apps: RefAppCluster) -> dict[str, str]:
    return {p.name: sha256(p.read_bytes()) for p in apps.docroot.iterdir() if p.is_file()}



# ---- kernel counters --------------------------------------------------------



def rst_counters(testbed: Lab, member: str = "client") -> dict[str, int]:
    """The RST-related TCP counters of a member's namespace."""
    tcp = snmp_tcp(testbed.member(member).netns)
    return {"OutRsts": tcp["OutRsts"], "EstabResets": tcp["EstabResets"]}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def member_steer(testbed: Lab, member: str) -> Iterator[Steer]:
    """A handle on the steering map a running refapp member pinned
    (PIN_ROOT/<lab>-<member>); closed without unpinning or detaching."""
    pin_dir = f"{PIN_ROOT}/{testbed.name}-{member}"
    if not Path(pin_dir).is_dir():
        raise AssertionError(f"{pin_dir} missing: is {member} running?")
    steer = Steer(pin_dir=pin_dir)
    try:
        yield steer
    finally:
        steer.close()  # no unpin, nothing attached through this handle


def steering_entries(testbed: Lab, member: str) -> int:
    """Entries in the steering map of a running refapp member."""
    with member_steer(testbed, member) as steer:
        return steer.count()


@dataclass(frozen=True)
class SsSocket:
    state: str
    local: str
    peer: str


def tcp_sockets(testbed: Lab, member: str) -> list[SsSocket]:
    """Every TCP socket in the member's namespace (ss -tan)."""
    out = testbed.run(member, ["ss", "-tanH"], capture_output=True, text=True, check=True)
    socks = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            socks.append(SsSocket(fields[0], fields[3], fields[4]))
    return socks


def sockets_with_peer(testbed: Lab, member: str, ip: str) -> list[SsSocket]:
    return [s for s in tcp_sockets(testbed, member) if s.peer.rsplit(":", 1)[0] == ip]


def served_lines(apps: RefAppCluster, member: str) -> list[str]:
    log = apps.log_path(member)
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if re.search(r" served ", line)]


def client_tag(ip: str) -> str:
    """How a target's "served" log line names a client of this address."""
    return f"client={Endpoint(ip, 0)}".removesuffix("0")


def peer_sockets(testbed: Lab, member: str, ip: str) -> list[str]:
    """ss lines (state local peer) of the member's TCP sockets whose peer is ip
    (IPv6 peers are printed as [addr]:port)."""
    tag = f"[{ip}]" if ":" in ip else ip
    return [f"{s.state} {s.local} {s.peer}" for s in tcp_sockets(testbed, member)
            if s.peer.rsplit(":", 1)[0] == tag]


def assert_nothing_left(apps: RefAppCluster, targets: list[str]) -> None:
    """No rule in any steering map, no offloaded connection, and no socket
    towards the client (either address) on the host or the targets."""
    testbed = apps.testbed
    wait_for(lambda: apps.host_stats()["rules"] == 0, "host steering map to empty")
    wait_for(lambda: apps.host_stats()["offloaded_now"] == 0, "no offloaded conns")
    for target in targets:
        wait_for(lambda t=target: steering_entries(testbed, t) == 0,  # type: ignore[misc]
                 f"{target} steering map to empty")
    for member in ["host", *targets]:
        for ip in (testbed.client.ipv4, testbed.client.ipv6):
            wait_for(lambda m=member, a=ip: not peer_sockets(testbed, m, a),  # type: ignore[misc]
                     f"{member}: sockets to the client's {ip} to go")


# ---- clients in the client namespace ----------------------------------------


def client_socket(testbed: Lab, *, bind_port: int | None = None,
                  reuse_port: bool = False) -> socket.socket:
    """A TCP socket created in the lab's client namespace (optionally bound)."""
    client = testbed.client
    with in_netns(client.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if bind_port is not None:
        sock.bind((client.ipv4, bind_port))
    return sock


class NetnsHTTPConnection(http.client.HTTPConnection):
    """http.client over a socket in the lab's client namespace.

    Counts connects, so a test can prove every request used ONE connection
    (http.client would silently reconnect after a close)."""

    def __init__(self, testbed: Lab, *, sock: socket.socket | None = None,
                 timeout: float = IO_TIMEOUT, sndbuf: int | None = None) -> None:
        super().__init__(testbed.host.ipv4, HTTP_PORT, timeout=timeout)
        self.testbed = testbed
        self.connects = 0
        self._given = sock
        self._sndbuf = sndbuf

    def connect(self) -> None:
        self.connects += 1
        if self._given is not None:
            sock, self._given = self._given, None
        else:
            sock = client_socket(self.testbed)
        if self._sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class AsyncHTTPClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams (client namespace)."""

    def __init__(self, testbed: Lab) -> None:
        self.testbed = testbed
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.rest = bytearray()  # bytes received after the last response
        self.local_port = 0

    async def connect(self) -> None:
        sock = client_socket(self.testbed)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.testbed.host.ipv4, HTTP_PORT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = sock.getsockname()[1]
        self.reader, self.writer = await asyncio.open_connection(sock=sock)

    async def get(self, path: str) -> Reply:
        assert self.reader is not None and self.writer is not None
        self.writer.write(http1.get_request(path, self.testbed.host.ipv4))
        await self.writer.drain()
        response = await http1.recv_response_async(self.reader.read, self.rest)
        return Reply(response.status, response.headers, response.body)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def curl_many(testbed: Lab, url: str, paths: list[str], out_dir: Path,
              timeout: float = 60, curl_args: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """One curl run fetching every path in order on one keep-alive connection;
    per transfer: status, size, served_by, connects, local_ip, local_port,
    remote_ip, file. ``curl_args`` e.g. ("-g", "-6") for IPv6."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = ["curl", *curl_args, "-s", "-S", "-m", str(int(timeout)), "-w",
            "%{http_code} %{size_download} %header{x-served-by} %{num_connects} "
            "%{local_ip} %{local_port} %{remote_ip}\\n"]
    files = []
    for i, path in enumerate(paths):
        files.append(out_dir / f"{i}")
        argv += ["-o", str(files[-1]), f"{url}{path}"]
    res = testbed.run("client", argv, capture_output=True, text=True, timeout=timeout + 10)
    if res.returncode != 0:
        raise AssertionError(f"curl exit {res.returncode}: {res.stderr}")
    rows = []
    for line, file in zip(res.stdout.splitlines(), files, strict=True):
        status, size, served_by, connects, local_ip, local_port, remote_ip = line.split()
        rows.append({"status": status, "size": size, "served_by": served_by,
                     "connects": connects, "local_ip": local_ip, "local_port": local_port,
                     "remote_ip": remote_ip, "file": str(file)})
    return rows


def ss_available() -> bool:
    try:
        subprocess.run(["ss", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True
