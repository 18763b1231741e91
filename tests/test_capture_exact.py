"""Capture is exact whatever the peer does: urgent data, segments arriving
while the socket is read.

Real connections between network namespaces (tests/netns_tools.py). The
rule every test checks: the stream the restored socket's application reads
is the stream the original's would have read, byte for byte, or capture is
refused and the original socket still serves exactly that stream.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import threading
import time

import pytest
from netns_tools import (
    SO_RCVBUFFORCE,
    VethPair,
    connect,
    queue_sizes,
    snmp_tcp,
    veth_pair,
    wait_for,
)
from xo import core
from xo._xo_cffi import lib
from xo.lab import in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")







def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def send_with_urgent(pair: VethPair, peer: socket.socket, host: socket.socket) -> None:
    """The client sends "AAAA", then "B" as urgent data, then "CCCC"."""
    peer.sendall(b"AAAA")
    peer.send(b"B", socket.MSG_OOB)
    peer.sendall(b"CCCC")
    # All nine bytes are in: rcv_nxt counts them whatever SIOCINQ says.
    wait_for(lambda: snmp_tcp(pair.host_ns)["InSegs"] > 0 and _all_in(host), "urgent data")


def _all_in(host: socket.socket) -> bool:
    host.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    try:
        return queue_sizes(host)[0] == 9
    finally:
        host.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 0)


def move_and_read(pair: VethPair, peer: socket.socket, state: core.TcpState,
                  expect_first: bytes) -> None:
    """Restore state in the other namespace and check the stream there:
    first what was queued, then fresh bytes both ways."""
    wire = state.encode()
    pair.move_host_link("b")
    moved = core.TcpState.decode(wire)
    with in_netns(pair.host_ns):
        restored = core.restore(moved)
    core.resume(restored, moved)
    restored.settimeout(10)
    assert recv_exactly(restored, len(expect_first)) == expect_first
    peer.sendall(b"after the move")
    assert recv_exactly(restored, 14) == b"after the move"
    restored.sendall(b"reply")
    assert recv_exactly(peer, 5) == b"reply"
    restored.close()


def test_unread_urgent_byte_refuses_capture_and_socket_serves_locally(family: int) -> None:
    with veth_pair(family) as pair:
        peer, host = connect(pair)
        send_with_urgent(pair, peer, host)
        pair.block()
        core.freeze(host)
        with pytest.raises(core.XoError, match="urgent") as err:
            core.capture(host)
        assert err.value.code == lib.XO_E_URGENT
        # Roll back: the original still delivers exactly what was sent, the
        # urgent byte out of band, and its settings are as they were.
        core.resume(host)
        pair.unblock()
        assert host.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 0
        assert host.recv(100) == b"AAAA"  # stops at the mark
        assert host.recv(1, socket.MSG_OOB) == b"B"
        assert recv_exactly(host, 4) == b"CCCC"
        peer.sendall(b"more")
        assert recv_exactly(host, 4) == b"more"
        # A peek after the rollback starts at the first unread byte: the
        # capture left SO_PEEK_OFF off.
        peer.sendall(b"xyz")
        wait_for(lambda: queue_sizes(host)[0] == 3, "xyz")
        assert host.recv(3, socket.MSG_PEEK) == b"xyz"
        peer.close()
        host.close()


def test_unread_urgent_byte_at_the_head_refuses_capture(family: int) -> None:
    with veth_pair(family) as pair:
        peer, host = connect(pair)
        send_with_urgent(pair, peer, host)
        assert host.recv(100) == b"AAAA"  # the mark is now the next byte
        pair.block()
        core.freeze(host)
        with pytest.raises(core.XoError) as err:
            core.capture(host)
        assert err.value.code == lib.XO_E_URGENT
        core.resume(host)
        assert host.recv(1, socket.MSG_OOB) == b"B"
        assert recv_exactly(host, 4) == b"CCCC"
        peer.close()
        host.close()


@pytest.mark.parametrize("read_before", [0, 2, 4], ids=["none", "part", "up-to-mark"])
def test_urgent_byte_read_out_of_band_is_left_out_of_the_moved_stream(
        family: int, read_before: int) -> None:
    """The application already took "B" with MSG_OOB: its in-band stream is
    AAAACCCC, and that is what the target must read (not AAAA alone, as
    SIOCINQ would say, and not AAAABCCCC)."""
    with veth_pair(family) as pair:
        peer, host = connect(pair)
        send_with_urgent(pair, peer, host)
        assert host.recv(1, socket.MSG_OOB) == b"B"
        if read_before:
            assert recv_exactly(host, read_before) == b"A" * read_before
        pair.block()
        core.freeze(host)
        state = core.capture(host)
        expected = b"AAAACCCC"[read_before:]
        assert state.recvq == expected
        core.discard(host)
        move_and_read(pair, peer, state, expected)
        peer.close()


def test_urgent_byte_inline_moves_in_band(family: int) -> None:
    """With SO_OOBINLINE the urgent byte is ordinary data: all nine bytes
    move, although a peek stops at the mark."""
    with veth_pair(family) as pair:
        peer, host = connect(pair)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        send_with_urgent(pair, peer, host)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        pair.block()
        core.freeze(host)
        state = core.capture(host)
        assert state.recvq == b"AAAABCCCC"
        assert host.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
        # No repair queue is left selected: a write into the frozen socket
        # fails instead of landing in its own receive queue.
        with pytest.raises(OSError) as err:
            host.send(b"stray")
        assert err.value.errno == errno.EINVAL
        assert core.capture(host).recvq == b"AAAABCCCC"
        core.discard(host)
        move_and_read(pair, peer, state, b"AAAABCCCC")
        peer.close()


def test_capture_is_consistent_while_segments_keep_arriving() -> None:
    """The flow is NOT blocked: the frozen socket keeps queueing what the
    peer streams while capture reads it. Every capture must hold a prefix
    of the stream starting where the application stopped reading, with
    rcv_seq one past its last byte; a final capture moves and is read out
    to the end, checked by sha256."""
    rng = random.Random(11)
    stream = rng.randbytes(6 << 20)
    with veth_pair(socket.AF_INET) as pair:
        peer, host = connect(pair)
        host.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        consumed = 1000
        peer.sendall(stream[:consumed])
        assert recv_exactly(host, consumed) == stream[:consumed]
        core.freeze(host)
        stop = threading.Event()
        sent = [consumed]

        def writer() -> None:
            while not stop.is_set() and sent[0] < len(stream):
                sent[0] += peer.send(stream[sent[0]:sent[0] + rng.randint(1, 9000)])
                time.sleep(0.0003)  # keep segments coming for the whole loop

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        starts = set()
        lengths = []
        retried = busy = 0
        try:
            wait_for(lambda: queue_sizes(host)[0] > 0, "the first streamed segments")
            # At least 300 captures, and on until 1 MiB more has arrived.
            attempts = 0
            while attempts < 300 or (sent[0] < consumed + (1 << 20) and attempts < 100_000):
                attempts += 1
                try:
                    state = core.capture(host)
                except core.XoError as exc:
                    assert exc.code == lib.XO_E_BUSY, exc
                    busy += 1
                    continue
                # 20 system calls for one attempt (timestamps on, only the
                # receive queue non-empty); more means it went round again.
                retried += core.last_syscalls() > 20
                q = state.recvq
                assert q == stream[consumed:consumed + len(q)]
                starts.add((state.rcv_seq - state.recvq_len) & 0xFFFFFFFF)
                lengths.append(len(q))
        finally:
            stop.set()
            thread.join(10)
        assert len(starts) == 1, "the queue start moved: bytes and sequence numbers disagree"
        assert lengths and max(lengths) > min(lengths), "nothing arrived while capturing"
        print(f"captures: {len(lengths)} ok, {retried} retried, {busy} refused busy; "
              f"queue {min(lengths)}..{max(lengths)} bytes")
        pair.block()
        final = core.capture(host)
        assert final.recvq == stream[consumed:consumed + final.recvq_len]
        core.discard(host)
        pair.unblock()
        with in_netns(pair.host_ns):
            restored = core.restore(final)
        core.resume(restored, final)
        restored.settimeout(10)
        peer.sendall(stream[sent[0]:])
        rest = recv_exactly(restored, len(stream) - consumed)
        assert hashlib.sha256(rest).hexdigest() == hashlib.sha256(stream[consumed:]).hexdigest()
        restored.close()
        peer.close()
