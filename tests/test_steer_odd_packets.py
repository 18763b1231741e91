"""Real packets of unusual shape hitting a steered flow (docs/steering.md,
"Packets without readable ports").

A real TCP connection between two namespaces, the tc ingress program on the
host's veth with a BLOCK entry for the connection. From the peer namespace
an AF_PACKET socket sends a valid data segment of that connection (its next
sequence number, so the host's stack would take it) in an unusual shape:

- IPv6 with a destination-options header: the parser walks it, the entry
  matches, the packet is blocked (counted as blocked, the entry's counter
  moves) and the host socket receives nothing;
- IPv4 in two fragments: the first carries the ports and is blocked; the
  second cannot be matched by 5-tuple and is held off (dropped, counted as
  held) because its address pair is steered; the host's IP reassembly never
  sees either.

Then the entry is removed and the very same frames are sent again: now the
host socket receives the bytes, which shows they were deliverable all along.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from netns_tools import VethPair, connect, csum, queue_sizes, wait_for
from xo import core
from xo.lab import in_netns
from xo.steer import FlowKey, Prog, Rule, Steer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

DSTOPTS = 60
PAYLOAD = b"bytes around the rule!!!" * 3  # 72 bytes: 92 with the TCP header



def link(ns: str, dev: str) -> dict[str, object]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def snmp(ns: str, proto: str) -> dict[str, int]:
    with in_netns(ns), open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith(f"{proto}:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}


@contextlib.contextmanager
def steered(family: int) -> Iterator[tuple[VethPair, socket.socket, socket.socket, Steer, FlowKey]]:
    """A connection whose peer->host direction has a BLOCK entry."""
    pair = VethPair(family, {"net.ipv4.tcp_timestamps": "0"})
    steer: Steer | None = None
    try:
        pair.open()
        peer, host = connect(pair)
        steer = Steer(pin=False)
        steer.attach(int(link(pair.host_ns, pair.host_if)["ifindex"]), Prog.TC_INGRESS,
                     netns=f"/run/netns/{pair.host_ns}")
        key = FlowKey.tcp(pair.peer_ip, peer.getsockname()[1], pair.host_ip,
                          host.getsockname()[1])
        steer.insert(key, Rule.block(ttl_s=60))
        yield pair, peer, host, steer, key
        peer.close()
        host.close()
    finally:
        if steer is not None:
            steer.close()
        pair.close()


def next_segment(pair: VethPair, peer: socket.socket, payload: bytes) -> bytes:
    """A TCP data segment the host expects next from the peer (PSH|ACK)."""
    core.freeze(peer)
    state = core.capture(peer)  # read-only: the peer's next seq and its ack
    core.resume(peer)
    src = ipaddress.ip_address(pair.peer_ip).packed
    dst = ipaddress.ip_address(pair.host_ip).packed
    sport, dport = peer.getsockname()[1], peer.getpeername()[1]
    hdr = struct.pack("!HHIIBBHHH", sport, dport, state.snd_seq, state.rcv_seq, 5 << 4,
                      0x18, 512, 0, 0)
    seg = hdr + payload
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(seg))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), socket.IPPROTO_TCP)
    return seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]


def ethernet(pair: VethPair, ethertype: int, body: bytes) -> bytes:
    dst = bytes.fromhex(str(link(pair.host_ns, pair.host_if)["address"]).replace(":", ""))
    src = bytes.fromhex(str(link(pair.peer_ns, pair.peer_if)["address"]).replace(":", ""))
    return dst + src + struct.pack("!H", ethertype) + body


def send_frames(pair: VethPair, frames: list[bytes]) -> None:
    with in_netns(pair.peer_ns):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with raw:
        raw.bind((pair.peer_if, 0))
        for f in frames:
            raw.send(f)


def ipv4_fragments(pair: VethPair, seg: bytes, first_len: int) -> list[bytes]:
    src = ipaddress.ip_address(pair.peer_ip).packed
    dst = ipaddress.ip_address(pair.host_ip).packed
    frames = []
    for part, off8, more in ((seg[:first_len], 0, True), (seg[first_len:], first_len // 8, False)):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), 0x5151,
                         (0x2000 if more else 0) | off8, 64, socket.IPPROTO_TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(ethernet(pair, 0x0800, ip + part))
    return frames


def ipv6_with_dstopts(pair: VethPair, seg: bytes) -> list[bytes]:
    src = ipaddress.ip_address(pair.peer_ip).packed
    dst = ipaddress.ip_address(pair.host_ip).packed
    dstopts = struct.pack("!BB", socket.IPPROTO_TCP, 0) + bytes([1, 4]) + bytes(4)  # PadN
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(dstopts) + len(seg), DSTOPTS, 64, src, dst)
    return [ethernet(pair, 0x86DD, ip + dstopts + seg)]


def test_ipv6_destination_options_segment_is_blocked() -> None:
    with steered(socket.AF_INET6) as (pair, peer, host, steer, key):
        frames = ipv6_with_dstopts(pair, next_segment(pair, peer, PAYLOAD))
        before = steer.dp_stats()
        send_frames(pair, frames)
        wait_for(lambda: steer.dp_stats()["blocked"] == before["blocked"] + 1, "the block")
        entry = steer.lookup(key)
        assert entry is not None and entry.packets == 1
        assert queue_sizes(host)[0] == 0, "a blocked segment reached the socket"

        steer.remove(key)
        send_frames(pair, frames)
        wait_for(lambda: queue_sizes(host)[0] == len(PAYLOAD), "delivery without the rule")
        assert host.recv(len(PAYLOAD)) == PAYLOAD


def test_fragmented_ipv4_segment_is_blocked_and_held() -> None:
    with steered(socket.AF_INET) as (pair, peer, host, steer, key):
        frames = ipv4_fragments(pair, next_segment(pair, peer, PAYLOAD), first_len=48)
        before = steer.dp_stats()
        reasm = snmp(pair.host_ns, "Ip")["ReasmReqds"]
        send_frames(pair, frames)
        wait_for(lambda: steer.dp_stats()["held"] == before["held"] + 1, "the held fragment")
        after = steer.dp_stats()
        assert after["blocked"] == before["blocked"] + 1  # the first fragment, by 5-tuple
        assert queue_sizes(host)[0] == 0, "a blocked segment reached the socket"
        assert snmp(pair.host_ns, "Ip")["ReasmReqds"] == reasm, "a fragment got past tc"

        steer.remove(key)
        send_frames(pair, frames)
        wait_for(lambda: queue_sizes(host)[0] == len(PAYLOAD), "delivery without the rule")
        assert host.recv(len(PAYLOAD)) == PAYLOAD
        assert snmp(pair.host_ns, "Ip")["ReasmOKs"] >= 1
