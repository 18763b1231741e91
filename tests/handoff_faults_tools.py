"""Helpers for test_handoff_faults.py: clients in the lab's client namespace,
raw control connections to a target agent, and the leftovers a killed agent
leaves behind.

Everything talks to real processes (the reference app, xo.refapp) in real
namespaces; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from handoff_tools import member_steer
from netns_tools import sha256, wait_for
from xo import core, http1
from xo.core import Channel, Endpoint, Message, MsgType, TcpState
from xo.demo import RefAppCluster, cluster
from xo.engine import DEFAULT_CONTROL_PORT
from xo.lab import PIN_ROOT, in_netns, netns_exists
from xo.refapp import HTTP_PORT
from xo.steer import FlowKey, Rule

IO_TIMEOUT = 5.0


def lab_name(prefix: str) -> str:
    """A fresh lab name: the prefix and 4 hex digits (at most 8 of [a-z0-9])."""
    name = prefix + secrets.token_hex(2)
    assert len(name) <= 8, name
    return name




# ---- lab life cycle -----------------------------------------------------------


def pin_dirs(lab: str) -> list[Path]:
    root = Path(PIN_ROOT)
    return sorted(root.glob(f"{lab}-*")) if root.is_dir() else []


def remove_pin_dirs(lab: str) -> list[str]:
    """Unmount and remove the lab's bpffs pin directories (what a SIGKILLed
    agent cannot do itself); returns the names of those that were left."""
    left = []
    for path in pin_dirs(lab):
        left.append(path.name)
        if os.path.ismount(path):
            subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True)
        with contextlib.suppress(OSError):
            path.rmdir()
    return left


@contextlib.contextmanager
def fault_cluster(name: str, crash_at: dict[str, str] | None = None) -> Iterator[RefAppCluster]:
    """cluster() with 1 target, then checks that nothing of the lab remains.

    A SIGKILLed agent cannot unpin its map nor unmount the bpffs it mounted
    for its pin directory (<PIN_ROOT>/<lab>-<member>), and the lab's
    teardown does not remove them: those of the killed members are removed
    here. Members stopped normally must have cleaned up after themselves.
    """
    crash_at = crash_at or {}
    left: list[str] = []
    try:
        with cluster(targets=1, name=name, crash_at=crash_at) as apps:
            yield apps
    finally:
        left = remove_pin_dirs(name)
    remaining = [m for m in ("client", "host", "t0", "br") if netns_exists(f"xo-{name}-{m}")]
    assert not remaining, f"namespaces of lab {name} left: {remaining}"
    assert not pin_dirs(name), f"pin directories of lab {name} left: {pin_dirs(name)}"
    allowed = {f"{name}-{member}" for member in crash_at}
    assert set(left) <= allowed, f"pin directories left by members stopped normally: {left}"


def wait_exit(apps: RefAppCluster, member: str, timeout: float = 30.0) -> int:
    proc = apps.procs[member]
    wait_for(lambda: proc.poll() is not None, f"{member} to exit", timeout)
    return int(proc.returncode)


# ---- HTTP clients in the client namespace -----------------------------------


@dataclass
class CurlResult:
    rc: int
    elapsed: float
    status: str
    served_by: str
    body: bytes
    stderr: str


def curl(apps: RefAppCluster, path: str, timeout: float = 10.0) -> CurlResult:
    """One GET with curl from the client namespace (a fresh connection)."""
    out = apps.workdir / f"curl-{secrets.token_hex(4)}"
    argv = ["curl", "-s", "-S", "-m", str(timeout), "-o", str(out),
            "-w", "%{http_code} %header{x-served-by}", f"{apps.url}{path}"]
    started = time.monotonic()
    res = apps.testbed.run("client", argv, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    fields = res.stdout.split()
    body = out.read_bytes() if out.exists() else b""
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    return CurlResult(res.returncode, elapsed, fields[0] if fields else "",
                      fields[1] if len(fields) > 1 else "", body, res.stderr.strip())


def file_digest(apps: RefAppCluster, name: str) -> str:
    return sha256((apps.docroot / name).read_bytes())


def client_connect(apps: RefAppCluster) -> socket.socket:
    """A TCP connection to the host's HTTP port, owned by the client namespace."""
    with in_netns(apps.testbed.client.netns):
        sock = socket.create_connection((apps.testbed.host.ipv4, HTTP_PORT), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def read_response(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """One HTTP/1.1 response (xo.http1): lower-cased headers with the status
    as ":status", and the body."""
    try:
        response = http1.recv_response(sock, bytearray())
    except http1.HTTPError as exc:
        raise AssertionError(f"bad response: {exc}") from exc
    return {**response.headers, ":status": str(response.status)}, response.body


def get_and_hand_back(apps: RefAppCluster, name: str) -> tuple[dict[str, str], bytes]:
    """One keep-alive GET whose connection is left open until the target has
    handed it back to the host (curl closes at once: the target then sees
    the client's FIN and keeps a closed flow's rewrite for CLOSED_TTL_S)."""
    returns = int(apps.host_stats()["returns"])
    with client_connect(apps) as sock:
        sock.sendall(http1.get_request(f"/{name}"))
        headers, body = read_response(sock)
        if headers.get("x-served-by") != "host":
            wait_for(lambda: int(apps.host_stats()["returns"]) > returns,
                     "the connection to come back to the host")
    return headers, body



# ---- steering maps and sockets of members -----------------------------------


def map_entries(apps: RefAppCluster, member: str) -> list[tuple[FlowKey, Rule]]:
    """The entries of a running member's pinned flow map."""
    with member_steer(apps.testbed, member) as steer:
        return steer.list()


def tcp_sockets(apps: RefAppCluster, member: str) -> set[tuple[str, str, str]]:
    """(state, local, peer) of every TCP socket in the member's namespace
    except those of the control port (the attacks' own connections)."""
    out = apps.testbed.run(member, ["ss", "-Htan"], capture_output=True, text=True,
                           check=True).stdout
    socks = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and not fields[3].endswith(f":{DEFAULT_CONTROL_PORT}"):
            socks.add((fields[0], fields[3], fields[4]))
    return socks


class LogWatch:
    """New lines of a member's log since the watch was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_line(self, *needles: str, timeout: float = 30.0) -> str:
        """The first new line containing every needle."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [ln for ln in self.text().splitlines() if all(n in ln for n in needles)]
            return bool(found)

        wait_for(seen, f"a log line with {needles} in {self.path.name}", timeout)
        return found[0]


# ---- raw control connections to a target agent --------------------------------


def control_connect(apps: RefAppCluster, member: str = "t0") -> socket.socket:
    """A plain TCP connection from the host namespace to a target's control port."""
    with in_netns(apps.testbed.host.netns):
        sock = socket.create_connection((apps.testbed.member(member).ipv4,
                                         DEFAULT_CONTROL_PORT), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def peer_tag(sock: socket.socket) -> str:
    """How the agent's log names this connection's peer: "('ip', port)"."""
    ip, port = sock.getsockname()[:2]
    return f"('{ip}', {port})"


def read_frame(sock: socket.socket) -> bytes | None:
    """One whole frame (not verified), or None at EOF / reset."""
    try:
        header = _read_exactly(sock, core.ENV_HEADER_LEN)
        if header is None:
            return None
        rest = _read_exactly(sock, core.frame_len(header) - core.ENV_HEADER_LEN)
    except ConnectionResetError:
        return None
    return None if rest is None else header + rest


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def frames_until_closed(sock: socket.socket) -> list[MsgType]:
    """Types of the frames the agent sends until it closes the connection
    (raises on a timeout: the agent must close a connection it rejects)."""
    types = []
    while (frame := read_frame(sock)) is not None:
        types.append(MsgType(frame[3]))
    return types


def handshake(sock: socket.socket, key: bytes) -> tuple[Channel, bytes]:
    """The host's side of the HELLO exchange; returns the bound channel and
    the HELLO frame sent."""
    channel = Channel(key, 0, 0)
    nonce = secrets.token_bytes(core.HELLO_NONCE_LEN)
    hello = channel.seal(MsgType.HELLO, 0, nonce)
    sock.sendall(hello)
    frame = read_frame(sock)
    assert frame is not None, "the agent closed before its HELLO"
    reply = channel.open(frame)
    assert reply.type == MsgType.HELLO
    channel.bind(nonce, reply.payload)
    return channel, hello


def recv_msg(sock: socket.socket, channel: Channel) -> Message:
    """The next verified message other than a LOAD_REPORT."""
    while True:
        frame = read_frame(sock)
        assert frame is not None, "the agent closed the control connection"
        msg = channel.open(frame)
        if msg.type != MsgType.LOAD_REPORT:
            return msg


def captured_state(apps: RefAppCluster, local_override: Endpoint | None = None,
                   family: int = socket.AF_INET) -> TcpState:
    """A real TcpState: a client -> host connection of the given family made
    for the purpose (host namespace, a spare port), frozen and captured like
    the host does, with a request as its application data.
    ``local_override`` rewrites the state's local endpoint (a forged state)."""
    host_ip = apps.testbed.host.address(family)
    with in_netns(apps.testbed.host.netns):
        listener = socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.bind((host_ip, 0))
        listener.listen(1)
        with in_netns(apps.testbed.client.netns):
            client = socket.create_connection((host_ip, listener.getsockname()[1]),
                                              timeout=IO_TIMEOUT)
        server, _ = listener.accept()
    request = b"GET /small.bin HTTP/1.1\r\nHost: x\r\n\r\n"
    with client, server:
        client.sendall(request)
        server.settimeout(IO_TIMEOUT)
        got = b""
        while len(got) < len(request):
            got += server.recv(4096)
        core.freeze(server)
        state = core.capture(server)
        core.resume(server)
    state.app_data = request
    if local_override is not None:
        local_override.to_c(state.c.local)
    return state
