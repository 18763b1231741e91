"""Restore never blocks and never transmits before the caller says so.

Real connections between network namespaces (tests/netns_tools.py) with
64 KiB, 1 MiB and 16 MiB queued in both directions and MSS clamps from 88
(the least the kernel accepts) to 9000 (jumbo frames on the veth). Proofs:

- no blocking, by counting: every queue write is MSG_DONTWAIT and a refused
  write is an error (XO_E_BUSY), never a retry, so a restore that returns
  did not wait; its system calls stay within a count derived from the queue
  size (one write per 4 KiB at the very least);
- nothing transmitted: the TCP counters of the peer's and the host's
  namespaces do not move between the start of the restore and the resume,
  also when the caller waits several retransmission timeouts in between;
- bytes: sha256 of everything both sides read after the resume.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
import threading
import time

import pytest
from netns_tools import (
    SO_SNDBUFFORCE,
    VethPair,
    connect,
    queue_sizes,
    snmp_tcp,
    veth_pair,
    wait_for,
)
from xo import core
from xo.lab import in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
MSS_CLAMPS = [88, 536, 1460, 9000]
# Restore of an empty state: socket, SO_REUSEADDR, TCP_REPAIR, two buffer
# sizes, four queue selections/sequence numbers, TCP_MAXSEG, bind, connect,
# options, TCP_TIMESTAMP, TCP_REPAIR_WINDOW.
RESTORE_FIXED = 15
# Resume: queue selection, TCP_REPAIR off.
RESUME_FIXED = 3  # TCP_REPAIR_QUEUE, TCP_REPAIR off, SO_REUSEADDR again




def counters(pair: VethPair) -> dict[str, int]:
    """Segments the peer received and the host namespace sent."""
    peer, host = snmp_tcp(pair.peer_ns), snmp_tcp(pair.host_ns)
    return {"peer.InSegs": peer["InSegs"], "host.OutSegs": host["OutSegs"],
            "host.RetransSegs": host["RetransSegs"], "peer.OutRsts": peer["OutRsts"],
            "host.OutRsts": host["OutRsts"]}


def read_all(sock: socket.socket, n: int, out: dict[str, str]) -> None:
    digest = hashlib.sha256()
    got = 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
    out["count"] = str(got)
    out["sha"] = digest.hexdigest()


def frozen_state(pair: VethPair, mss: int, to_host: bytes, to_peer: bytes,
                 all_in_flight: bool) -> tuple[socket.socket, core.TcpState, int]:
    """A host socket with to_host unread and to_peer unacknowledged, frozen,
    captured and discarded. Its initial window of to_peer was sent, the rest
    not; all_in_flight rewrites the state to say all of to_peer was sent, so
    the whole of it goes into the repair send queue (the kernel then has to
    retransmit it: after the restored socket's first RTO, 3 s here)."""
    size = len(to_host)
    peer, host = connect(pair, host_rcvbuf=16 * size + (8 << 20),
                         peer_rcvbuf_force=4 * size + (8 << 20), peer_mss=mss)
    host.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 * size + (8 << 20))
    peer.sendall(to_host)
    wait_for(lambda: queue_sizes(host)[0] == size, "host receive queue", timeout=60)
    pair.block()  # the peer's ACKs no longer arrive: what the host sends stays queued
    host.setblocking(False)
    assert host.send(to_peer) == size
    wait_for(lambda: queue_sizes(host)[2] < size, "part of the send queue sent")
    mss_before = host.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    core.freeze(host)
    state = core.capture(host)
    assert state.recvq == to_host
    assert state.sendq == to_peer
    assert state.mss_clamp == mss
    if all_in_flight:
        state.c.inflight_len, state.c.unsent_len = size, 0
    core.discard(host)
    return peer, state, mss_before


def check_after_resume(peer: socket.socket, restored: socket.socket, to_host: bytes,
                       to_peer: bytes) -> None:
    restored.settimeout(60)
    peer.settimeout(60)
    got: dict[str, str] = {}
    reader = threading.Thread(target=read_all, args=(peer, len(to_peer), got), daemon=True)
    reader.start()
    mine: dict[str, str] = {}
    read_all(restored, len(to_host), mine)
    assert mine == {"count": str(len(to_host)), "sha": hashlib.sha256(to_host).hexdigest()}
    reader.join(90)
    assert got == {"count": str(len(to_peer)), "sha": hashlib.sha256(to_peer).hexdigest()}
    # And it is a normal connection afterwards, both ways.
    peer.sendall(b"ping")
    assert restored.recv(4) == b"ping"
    restored.sendall(b"pong")
    assert peer.recv(4) == b"pong"


CASES = [(socket.AF_INET, size, mss) for size in SIZES.values() for mss in MSS_CLAMPS]
CASES += [(socket.AF_INET6, SIZES["1MiB"], 88), (socket.AF_INET6, SIZES["16MiB"], 9000)]


@pytest.mark.parametrize(
    "family,size,mss", CASES,
    ids=[f"{'ipv4' if f == socket.AF_INET else 'ipv6'}-{s >> 10}KiB-mss{m}" for f, s, m in CASES])
def test_restore_queues_without_blocking_or_sending(family: int, size: int, mss: int) -> None:
    rng = random.Random(f"{family}-{size}-{mss}")
    to_host, to_peer = rng.randbytes(size), rng.randbytes(size)
    with veth_pair(family) as pair:
        pair.set_mtu(9100)
        # The largest states also put all 16 MiB into the repair send queue.
        peer, state, mss_before = frozen_state(pair, mss, to_host, to_peer,
                                               all_in_flight=size == SIZES["16MiB"])
        before = counters(pair)
        with in_netns(pair.host_ns):
            restored = core.restore(state)
        restore_calls = core.last_syscalls()
        # Each receive-queue write takes at least a page (it takes up to
        # 68 KiB); a retry loop on EAGAIN would blow this count.
        assert restore_calls <= RESTORE_FIXED + math.ceil(size / 4096)
        assert restored.getblocking(), "the caller gets the fd as it expects it"
        pair.unblock()
        assert counters(pair) == before, "a segment left before xo_tcp_resume"
        core.resume(restored, state)
        resume_calls = core.last_syscalls()
        # One write per 88-byte segment at the very most, in either queue.
        assert resume_calls <= RESUME_FIXED + 2 + math.ceil(size / 88)
        print(f"size {size} mss {mss}: restore {restore_calls} syscalls, "
              f"resume {resume_calls}")
        check_after_resume(peer, restored, to_host, to_peer)
        # Same segment size as the original had (9000 clamp: jumbo MTU).
        assert restored.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == mss_before
        after = counters(pair)
        assert after["peer.OutRsts"] == before["peer.OutRsts"]
        assert after["host.OutRsts"] == before["host.OutRsts"]
        restored.close()
        peer.close()


def test_restored_socket_stays_silent_until_resume() -> None:
    """The caller may wait (steering, the host's READY) between restore and
    resume: several retransmission timeouts pass and still nothing leaves.
    (Written in restore, the in-flight bytes would arm the retransmission
    timer, which fires in repair mode too.)"""
    size = 1 << 20
    rng = random.Random(5)
    to_host, to_peer = rng.randbytes(size), rng.randbytes(size)
    with veth_pair(socket.AF_INET) as pair:
        peer, state, _ = frozen_state(pair, 536, to_host, to_peer, all_in_flight=False)
        assert state.inflight_len > 0
        pair.unblock()
        before = counters(pair)
        with in_netns(pair.host_ns):
            restored = core.restore(state)
        # A restored socket's first RTO is 3 s here (no RTT sample), its
        # loss probe 1 s: both would have fired in repair mode.
        time.sleep(4.0)
        assert counters(pair) == before, "the restored socket transmitted in repair mode"
        core.resume(restored, state)
        check_after_resume(peer, restored, to_host, to_peer)
        assert counters(pair)["peer.InSegs"] > before["peer.InSegs"]
        restored.close()
        peer.close()


def test_mss_clamp_below_what_tcp_maxseg_takes_restores() -> None:
    """A peer may announce an MSS below 88 (the kernel's TCP_MIN_MSS);
    TCP_MAXSEG refuses such a value, TCP_REPAIR_OPTIONS does not: the state
    restores and carries its exact clamp."""
    with veth_pair(socket.AF_INET) as pair:
        peer, host = connect(pair)
        pair.block()
        core.freeze(host)
        state = core.capture(host)
        core.discard(host)
        state.c.mss_clamp = 64
        with in_netns(pair.host_ns):
            restored = core.restore(state)
        core.resume(restored, state)
        pair.unblock()
        restored.settimeout(10)
        peer.sendall(b"small")
        assert restored.recv(5) == b"small"
        restored.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += peer.recv(1000)
        assert got == b"x" * 1000
        restored.close()
        peer.close()
