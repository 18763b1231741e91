"""Capture and restore of live TCP connections on the real kernel.

Each test builds namespaces (tests/netns_tools.py), opens a real connection
and moves its host end with the core, then checks every byte by hash and
that no RST was sent or received (the namespaces' /proc/net/snmp).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from netns_tools import VethPair, connect, queue_sizes, snmp_tcp, veth_pair, wait_for
from xo import core
from xo.lab import in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

OPTION_SETS = {
    "all-on": ({"net.ipv4.tcp_timestamps": "1", "net.ipv4.tcp_sack": "1",
                "net.ipv4.tcp_window_scaling": "1"},
               core.OPT_TIMESTAMPS | core.OPT_SACK | core.OPT_WSCALE),
    "all-off": ({"net.ipv4.tcp_timestamps": "0", "net.ipv4.tcp_sack": "0",
                 "net.ipv4.tcp_window_scaling": "0"}, 0),
    "ts-off": ({"net.ipv4.tcp_timestamps": "0", "net.ipv4.tcp_sack": "1",
                "net.ipv4.tcp_window_scaling": "1"}, core.OPT_SACK | core.OPT_WSCALE),
    "sack-ws-off": ({"net.ipv4.tcp_timestamps": "1", "net.ipv4.tcp_sack": "0",
                     "net.ipv4.tcp_window_scaling": "0"}, core.OPT_TIMESTAMPS),
}






class Reader(threading.Thread):
    """Reads exactly `expect` bytes from a socket, hashing as it goes."""

    def __init__(self, sock: socket.socket, expect: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.expect = sock, expect
        self.digest = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.count < self.expect:
                chunk = self.sock.recv(min(1 << 16, self.expect - self.count))
                if not chunk:
                    raise EOFError(f"EOF after {self.count} of {self.expect} bytes")
                self.digest.update(chunk)
                self.count += len(chunk)
        except BaseException as exc:  # reported to the test thread below
            self.error = exc

    def result(self, timeout: float = 30) -> str:
        self.join(timeout)
        assert not self.is_alive(), f"reader stuck at {self.count}/{self.expect} bytes"
        if self.error:
            raise self.error
        return self.digest.hexdigest()


def sha(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()



def rst_counters(pair: VethPair) -> dict[str, int]:
    peer = snmp_tcp(pair.peer_ns)
    out = {"peer.OutRsts": peer["OutRsts"], "peer.EstabResets": peer["EstabResets"]}
    for name, ns in pair.ns.items():
        out[f"{name}.OutRsts"] = snmp_tcp(ns)["OutRsts"]
    return out


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("where", ["same-netns", "other-netns"])
def test_move_with_data_outstanding_both_ways(family: int, options: str, where: str) -> None:
    sysctls, expected_options = OPTION_SETS[options]
    rng = random.Random(f"{family}-{options}-{where}")
    with veth_pair(family, sysctls) as pair:
        # A small peer receive buffer makes the host's window-limited: part
        # of what it sends is in flight, the rest stays unsent.
        peer, host = connect(pair, rcvbuf=16384)
        before = rst_counters(pair)

        to_host_1 = rng.randbytes(40_000)  # left unread in the host's receive queue
        to_peer_1 = rng.randbytes(300_000)
        peer.sendall(to_host_1)
        wait_for(lambda: queue_sizes(host)[0] == len(to_host_1), "host receive queue")

        # Drop the peer's ACKs so the bytes the host sends stay unacknowledged.
        pair.block()
        host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        host.setblocking(False)
        assert host.send(to_peer_1) == len(to_peer_1)
        wait_for(lambda: 0 < queue_sizes(host)[2] < queue_sizes(host)[1], "in-flight bytes")

        mss_before = host.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        core.freeze(host)
        state = core.capture(host)
        # 18 idle (+1 for TCP_TIMESTAMP; one is the TCP_ULP check for kTLS)
        # and one peek per non-empty queue; more would mean a retry, and with
        # the flow blocked nothing moves between the two tcp_info snapshots.
        assert core.last_syscalls() == 20 + bool(expected_options & core.OPT_TIMESTAMPS)
        assert state.options == expected_options
        assert state.inflight_len > 0 and state.unsent_len > 0
        assert state.inflight + state.unsent == to_peer_1
        assert state.recvq == to_host_1
        assert state.local.port == host.getsockname()[1]
        assert state.remote.ip == pair.peer_ip
        wire = state.encode()
        core.discard(host)

        if where == "other-netns":
            pair.move_host_link("b")  # the block lived in namespace a
        moved = core.TcpState.decode(wire)
        with in_netns(pair.host_ns):
            restored = core.restore(moved)
        if where == "same-netns":
            pair.unblock()
        core.resume(restored, moved)
        restored.settimeout(10)
        # Same segment size as before, not the 536-byte default.
        assert restored.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == mss_before

        to_host_2, to_peer_2 = rng.randbytes(100_000), rng.randbytes(100_000)
        peer_reader = Reader(peer, len(to_peer_1) + len(to_peer_2))
        host_reader = Reader(restored, len(to_host_1) + len(to_host_2))
        peer_reader.start()
        host_reader.start()
        peer.sendall(to_host_2)
        restored.sendall(to_peer_2)
        assert host_reader.result() == sha(to_host_1, to_host_2)
        assert peer_reader.result() == sha(to_peer_1, to_peer_2)
        assert rst_counters(pair) == before
        peer.close()
        restored.close()


def test_restore_binds_another_local_port_but_keeps_original_endpoints() -> None:
    with veth_pair(socket.AF_INET) as pair:
        peer, host = connect(pair)
        core.freeze(host)
        state = core.capture(host)
        original = state.local
        # Same namespace, same address: the 4-tuple clashes with the frozen
        # original, so the target side remaps the port.
        with in_netns(pair.host_ns):
            remapped = core.restore(state, core.Endpoint("198.18.1.2", original.port + 1))
        assert remapped.getsockname() == ("198.18.1.2", original.port + 1)
        assert state.local == original  # the state still names the host's endpoint
        core.discard(remapped)
        core.resume(host)  # the host rolls back and carries on
        peer.sendall(b"still here")
        assert host.recv(100) == b"still here"
        peer.close()
        host.close()


def test_thousand_cycles_under_traffic_without_leaks() -> None:
    cycles = 1000
    with veth_pair(socket.AF_INET) as pair:
        peer, host = connect(pair)
        before = rst_counters(pair)
        rng = random.Random(7)
        stream = rng.randbytes(4 << 20)
        stop = threading.Event()
        sent = [0]

        def writer() -> None:
            # The peer keeps sending so every cycle has traffic in flight.
            while not stop.is_set() and sent[0] < len(stream):
                n = peer.send(stream[sent[0]:sent[0] + rng.randint(1, 3000)])
                sent[0] += n
                time.sleep(0.0005)

        echo_digest = hashlib.sha256()
        echoed = [0]
        peer_reader_stop = threading.Event()

        def peer_reader() -> None:
            while not peer_reader_stop.is_set() or echoed[0] < sent[0]:
                try:
                    chunk = peer.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                echo_digest.update(chunk)
                echoed[0] += len(chunk)

        fds_before = len(os.listdir("/proc/self/fd"))
        threads = [threading.Thread(target=writer, daemon=True),
                   threading.Thread(target=peer_reader, daemon=True)]
        peer.settimeout(0.5)
        for t in threads:
            t.start()
        received = 0
        sock = host
        for _ in range(cycles):
            sock.setblocking(False)
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                data = b""
            received += len(data)
            sock.setblocking(True)
            sock.sendall(data)  # echo back: both directions carry bytes
            pair.block()
            core.freeze(sock)
            state = core.capture(sock)
            core.discard(sock)
            with in_netns(pair.host_ns):
                sock = core.restore(state)
            pair.unblock()
            core.resume(sock, state)
        stop.set()
        threads[0].join(10)
        sock.settimeout(10)
        while received < sent[0]:
            data = sock.recv(1 << 16)
            assert data, "connection closed early"
            received += len(data)
            sock.sendall(data)
        peer_reader_stop.set()
        threads[1].join(30)
        assert sent[0] > 1 << 20, "too little traffic to mean anything"
        assert received == sent[0] and echoed[0] == sent[0]
        assert echo_digest.hexdigest() == sha(stream[: sent[0]])
        assert len(os.listdir("/proc/self/fd")) == fds_before
        assert rst_counters(pair) == before
        peer.close()
        sock.close()


# ---- refusals: clear error, socket unharmed ---------------------------------


def loopback_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return listener, client, server


def test_listening_socket_is_refused_and_still_accepts() -> None:
    listener, client, server = loopback_pair()
    with pytest.raises(core.XoNotEstablishedError, match="LISTEN"):
        core.freeze(listener)
    extra = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    for s in (listener, client, server, extra, accepted):
        s.close()


def test_half_closed_socket_is_refused_and_still_sends() -> None:
    listener, client, server = loopback_pair()
    client.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""  # server is now in CLOSE_WAIT
    core.freeze(server)  # the kernel allows repair here; capture must not
    with pytest.raises(core.XoNotEstablishedError, match="CLOSE_WAIT"):
        core.capture(server)
    core.resume(server)  # the failure rule: roll back and carry on locally
    server.sendall(b"bye")
    assert client.recv(10) == b"bye"
    for s in (listener, client, server):
        s.close()


def test_unconnected_socket_capture_is_refused() -> None:
    sock = socket.socket()
    core.freeze(sock)  # a CLOSED socket may enter repair; capture must refuse
    with pytest.raises(core.XoNotEstablishedError, match="CLOSE"):
        core.capture(sock)
    sock.close()


def test_udp_socket_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(core.XoError, match="TCP_REPAIR"):
        core.freeze(sock)
    sock.close()


def test_bytes_a_frozen_socket_takes_after_the_capture_are_found() -> None:
    """A frozen socket still queues what reaches it (a segment the kernel
    delivers after the capture, e.g. from the socket's backlog, is in no
    state): xo_tcp_late_bytes gives exactly those bytes, after what the
    capture read, and nothing while none came."""
    with veth_pair(socket.AF_INET) as pair:
        peer, host = connect(pair)
        peer.sendall(b"unread ")
        wait_for(lambda: queue_sizes(host)[0] == 7, "the first bytes queued")
        core.freeze(host)
        st = core.capture(host)
        assert st.recvq_len == 7
        assert core.late_bytes(host, st) == b""
        late = os.urandom(3000) + b"the request that came late"
        peer.sendall(late)
        wait_for(lambda: queue_sizes(host)[0] == 7 + len(late),
                 "the frozen socket to queue them")
        assert core.late_bytes(host, st) == late
        # a FIN after them moves rcv_nxt by one, and is no byte
        peer.shutdown(socket.SHUT_WR)
        wait_for(lambda: host.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 8,
                 "the FIN to reach the frozen socket (CLOSE_WAIT)")
        assert core.late_bytes(host, st) == late
        core.discard(host)
        peer.close()


def test_discard_refuses_a_socket_that_is_not_frozen() -> None:
    listener, client, server = loopback_pair()
    with pytest.raises(core.XoError, match="not frozen"):
        core.discard(server)
    server.sendall(b"ok")  # still open and working
    assert client.recv(10) == b"ok"
    for s in (listener, client, server):
        s.close()


NO_CAP_SCRIPT = r"""
import os, socket, sys
from xo import core
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
client = socket.create_connection(listener.getsockname()); server, _ = listener.accept()
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
try:
    core.freeze(server)
except core.XoPermissionError as exc:
    print("refused:", exc)
else:
    sys.exit("freeze succeeded without CAP_NET_ADMIN")
server.sendall(b"ping"); assert client.recv(4) == b"ping"
client.sendall(b"pong"); assert server.recv(4) == b"pong"
print("socket unharmed")
"""


def test_without_cap_net_admin_freeze_is_refused_and_socket_unharmed() -> None:
    out = subprocess.run([sys.executable, "-c", NO_CAP_SCRIPT], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "CAP_NET_ADMIN" in out.stdout
    assert "socket unharmed" in out.stdout
