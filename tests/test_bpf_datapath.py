"""Datapath unit tests: the real eBPF programs on crafted packets.

Like Katran's lib/testing: each case feeds one Ethernet frame to a program
with BPF_PROG_TEST_RUN (nothing is sent anywhere) against a real, private
flow map, then checks the verdict and the frame the program left behind,
including recomputed IPv4 and TCP checksums.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns_tools import csum
from xo.steer import FlowKey, Prog, Rule, Steer

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4

CLIENT_MAC = "02:00:00:00:00:0c"
HOST_MAC = "02:00:00:00:00:01"
TARGET_MAC = "02:00:00:00:00:02"

V4 = ("198.18.0.10", "198.18.0.1", "198.18.0.2")  # client, host, target
V6 = ("2001:2::10", "2001:2::1", "2001:2::2")


# ---- packet crafting and checking -------------------------------------------



def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, length)
    return src + dst + struct.pack("!IxxxB", length, socket.IPPROTO_TCP)


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0)
    seg = hdr + payload
    check = csum(pseudo(src, dst, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", check) + seg[18:]


def frame(src: str, sport: int, dst: str, dport: int, payload: bytes = b"GET / HTTP/1.1\r\n\r\n",
          *, dst_mac: str = HOST_MAC, src_mac: str = CLIENT_MAC, ip_options: bytes = b"",
          proto: int = socket.IPPROTO_TCP) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    seg = tcp_segment(s.packed, d.packed, sport, dport, payload)
    if s.version == 4:
        ihl = 5 + len(ip_options) // 4
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(seg), 1, 0x4000, 64,
                         proto, 0, s.packed, d.packed) + ip_options
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, 64, s.packed, d.packed)
        ethertype = 0x86DD
    return mac(dst_mac) + mac(src_mac) + struct.pack("!H", ethertype) + ip + seg


class Parsed:
    """The fields of a frame the tests look at, with checksums verified."""

    def __init__(self, raw: bytes) -> None:
        self.dst_mac = raw[0:6]
        self.src_mac = raw[6:12]
        ethertype = struct.unpack("!H", raw[12:14])[0]
        if ethertype == 0x0800:
            ihl = (raw[14] & 0xF) * 4
            ip = raw[14:14 + ihl]
            total = struct.unpack("!H", ip[2:4])[0]
            self.src, self.dst = ip[12:16], ip[16:20]
            self.ip_csum_ok = csum(ip) == 0
            seg = raw[14 + ihl:14 + total]
        else:
            plen = struct.unpack("!H", raw[18:20])[0]
            self.src, self.dst = raw[22:38], raw[38:54]
            self.ip_csum_ok = True  # IPv6 has no header checksum
            seg = raw[54:54 + plen]
        self.sport, self.dport = struct.unpack("!HH", seg[:4])
        self.payload = seg[20:]
        self.tcp_csum_ok = csum(pseudo(self.src, self.dst, len(seg)) + seg) == 0

    @property
    def src_ip(self) -> str:
        return str(ipaddress.ip_address(self.src))

    @property
    def dst_ip(self) -> str:
        return str(ipaddress.ip_address(self.dst))


def test_checker_sanity() -> None:
    """The checker itself: crafted frames verify, a flipped bit does not."""
    for client, host, _ in (V4, V6):
        raw = frame(client, 40000, host, 80)
        assert Parsed(raw).tcp_csum_ok and Parsed(raw).ip_csum_ok
        bad = bytearray(raw)
        bad[-1] ^= 1
        assert not Parsed(bytes(bad)).tcp_csum_ok


# ---- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def steer() -> Iterator[Steer]:
    s = Steer(pin=False)  # a private map: these tests never touch pinned rules
    yield s
    s.close()


@pytest.fixture(autouse=True)
def empty_map(steer: Steer) -> None:
    for key, _ in steer.list():
        steer.remove(key)


def run(steer: Steer, prog: Prog, raw: bytes) -> tuple[int, bytes]:
    return steer.test_run(prog, raw)


FAMILIES = pytest.mark.parametrize("addrs", [V4, V6], ids=["ipv4", "ipv6"])


# ---- tc ingress ----------------------------------------------------------------


@FAMILIES
def test_block_drops(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, _ = addrs
    key = FlowKey.tcp(client, 40000, host, 80)
    steer.insert(key, Rule.block(ttl_s=30, owner=1))
    raw = frame(client, 40000, host, 80)
    verdict, out = run(steer, Prog.TC_INGRESS, raw)
    assert verdict == TC_ACT_SHOT
    assert out == raw
    entry = steer.lookup(key)
    assert entry is not None and entry.packets == 1 and entry.bytes == len(raw)


@FAMILIES
def test_redirect_rewrites_and_fixes_checksums(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, target = addrs
    key = FlowKey.tcp(client, 40000, host, 80)
    steer.insert(key, Rule.redirect(target, 18080, dst_mac=TARGET_MAC, src_mac=HOST_MAC,
                                    ttl_s=30))
    payload = b"GET /object HTTP/1.1\r\nHost: x\r\n\r\n"
    verdict, out = run(steer, Prog.TC_INGRESS, frame(client, 40000, host, 80, payload))
    assert verdict == TC_ACT_REDIRECT
    p = Parsed(out)
    assert (p.src_ip, p.sport) == (client, 40000)
    assert (p.dst_ip, p.dport) == (target, 18080)
    assert p.dst_mac == mac(TARGET_MAC)
    assert p.src_mac == mac(HOST_MAC)  # or the bridge learns the client on our port
    assert p.payload == payload
    assert p.ip_csum_ok and p.tcp_csum_ok


def test_redirect_ipv4_with_options(steer: Steer) -> None:
    client, host, target = V4
    key = FlowKey.tcp(client, 40001, host, 443)
    steer.insert(key, Rule.redirect(target, 0, dst_mac=TARGET_MAC, ttl_s=30))
    raw = frame(client, 40001, host, 443, ip_options=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    verdict, out = run(steer, Prog.TC_INGRESS, raw)
    assert verdict == TC_ACT_REDIRECT
    p = Parsed(out)
    assert (p.dst_ip, p.dport) == (target, 443)  # port 0 = keep
    assert p.src_mac == mac(CLIENT_MAC)          # no src MAC given = keep
    assert p.ip_csum_ok and p.tcp_csum_ok


def test_block_replaced_by_redirect_in_one_write(steer: Steer) -> None:
    client, host, target = V4
    key = FlowKey.tcp(client, 40002, host, 80)
    raw = frame(client, 40002, host, 80)
    steer.insert(key, Rule.block(ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, raw)[0] == TC_ACT_SHOT
    steer.insert(key, Rule.redirect(target, 80, dst_mac=TARGET_MAC, ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, raw)[0] == TC_ACT_REDIRECT
    assert steer.count() == 1


@FAMILIES
def test_expired_entry_passes(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, target = addrs
    before = steer.dp_stats()["expired"]
    key = FlowKey.tcp(client, 40003, host, 80)
    steer.insert(key, Rule.block(expires_ns=time.monotonic_ns() - 1))
    raw = frame(client, 40003, host, 80)
    assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_OK, raw)
    steer.insert(key, Rule.redirect(target, 81, expires_ns=time.monotonic_ns() - 1))
    assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_OK, raw)
    assert run(steer, Prog.XDP, raw) == (XDP_PASS, raw)
    assert steer.dp_stats()["expired"] == before + 3


@FAMILIES
def test_non_matching_passes(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, _ = addrs
    steer.insert(FlowKey.tcp(client, 40004, host, 80), Rule.block(ttl_s=30))
    for raw in (
        frame(client, 40005, host, 80),                    # other client port
        frame(client, 40004, host, 81),                    # other server port
        frame(host, 80, client, 40004),                    # other direction
        frame(client, 40004, host, 80, proto=socket.IPPROTO_UDP),  # not TCP
    ):
        assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_OK, raw)
        assert run(steer, Prog.XDP, raw) == (XDP_PASS, raw)


def test_garbage_passes(steer: Steer) -> None:
    for raw in (b"\xff" * 14, frame(V4[0], 1, V4[1], 2)[:40], b"\0" * 60):
        assert run(steer, Prog.TC_INGRESS, raw)[0] == TC_ACT_OK


# ---- tc egress (target side) ---------------------------------------------------


@FAMILIES
def test_source_rewrite(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, target = addrs
    # The target's restored socket (target:18080) answers the client...
    key = FlowKey.tcp(target, 18080, client, 40000)
    steer.insert(key, Rule.src_rewrite(host, 80, ttl_s=30))
    payload = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    raw = frame(target, 18080, client, 40000, payload, dst_mac=CLIENT_MAC, src_mac=TARGET_MAC)
    verdict, out = run(steer, Prog.TC_EGRESS, raw)
    assert verdict == TC_ACT_OK
    p = Parsed(out)
    # ...and the client sees the host it talked to.
    assert (p.src_ip, p.sport) == (host, 80)
    assert (p.dst_ip, p.dport) == (client, 40000)
    assert p.payload == payload
    assert p.ip_csum_ok and p.tcp_csum_ok
    assert steer.dp_stats()["rewritten"] >= 1


def test_programs_only_act_on_their_kinds(steer: Steer) -> None:
    client, host, target = V4
    key = FlowKey.tcp(client, 40006, host, 80)
    raw = frame(client, 40006, host, 80)
    steer.insert(key, Rule.redirect(target, 1, ttl_s=30))
    assert run(steer, Prog.TC_EGRESS, raw) == (TC_ACT_OK, raw)   # egress ignores redirect
    steer.insert(key, Rule.src_rewrite(target, 1, ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_OK, raw)  # ingress ignores rewrite
    assert run(steer, Prog.XDP, raw) == (XDP_PASS, raw)


def test_egress_block_drops_what_a_frozen_socket_sends(steer: Steer) -> None:
    """Between freeze and discard a socket's timers may still transmit; an
    egress block (the socket's own 4-tuple, outbound) drops it."""
    client, host, _ = V4
    key = FlowKey.tcp(host, 80, client, 40007)
    raw = frame(host, 80, client, 40007, b"late bytes")
    steer.insert(key, Rule.block(ttl_s=30))
    blocked = steer.dp_stats()["blocked"]
    assert run(steer, Prog.TC_EGRESS, raw)[0] == TC_ACT_SHOT
    assert steer.dp_stats()["blocked"] == blocked + 1
    steer.insert(key, Rule.block(expires_ns=1))  # expired: passes
    assert run(steer, Prog.TC_EGRESS, raw) == (TC_ACT_OK, raw)


# ---- XDP -----------------------------------------------------------------------


@FAMILIES
def test_xdp_block_and_redirect(steer: Steer, addrs: tuple[str, str, str]) -> None:
    client, host, target = addrs
    key = FlowKey.tcp(client, 40007, host, 80)
    raw = frame(client, 40007, host, 80, b"x" * 333)
    steer.insert(key, Rule.block(ttl_s=30))
    assert run(steer, Prog.XDP, raw) == (XDP_DROP, raw)

    steer.insert(key, Rule.redirect(target, 18081, dst_mac=TARGET_MAC, src_mac=HOST_MAC,
                                    ttl_s=30))
    verdict, out = run(steer, Prog.XDP, raw)
    assert verdict == XDP_TX  # back out of the interface it came in on
    p = Parsed(out)
    assert (p.src_ip, p.sport, p.dst_ip, p.dport) == (client, 40007, target, 18081)
    assert p.dst_mac == mac(TARGET_MAC) and p.src_mac == mac(HOST_MAC)
    assert p.payload == b"x" * 333
    assert p.ip_csum_ok and p.tcp_csum_ok


def test_xdp_redirect_to_other_interface(steer: Steer) -> None:
    client, host, target = V4
    key = FlowKey.tcp(client, 40008, host, 80)
    # Test runs see the packet arrive on lo (ifindex 1); any other index
    # means "out of that interface" (checked only when really redirecting).
    steer.insert(key, Rule.redirect(target, 80, dst_mac=TARGET_MAC, ifindex=4242, ttl_s=30))
    verdict, out = run(steer, Prog.XDP, frame(client, 40008, host, 80))
    assert verdict == XDP_REDIRECT
    assert Parsed(out).tcp_csum_ok


# ---- property: checksums stay right for any addresses, ports and payloads ------

v4_addr = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6_addr = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(1, 65535)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), v6=st.booleans(), payload=st.binary(max_size=300),
       xdp=st.booleans())
def test_redirect_checksums_property(steer: Steer, data: st.DataObject, v6: bool,
                                     payload: bytes, xdp: bool) -> None:
    addr = v6_addr if v6 else v4_addr
    client, host = data.draw(addr), data.draw(addr)
    # An all-zero address in a rule means "keep the packet's".
    target = data.draw(addr.filter(lambda a: int(ipaddress.ip_address(a)) != 0))
    cport, hport, tport = data.draw(port), data.draw(port), data.draw(port)
    key = FlowKey.tcp(client, cport, host, hport)
    steer.insert(key, Rule.redirect(target, tport, dst_mac=TARGET_MAC, ttl_s=30))
    try:
        verdict, out = run(steer, Prog.XDP if xdp else Prog.TC_INGRESS,
                           frame(client, cport, host, hport, payload))
    finally:
        steer.remove(key)
    assert verdict == (XDP_TX if xdp else TC_ACT_REDIRECT)
    p = Parsed(out)
    assert (p.dst_ip, p.dport) == (str(ipaddress.ip_address(target)), tport)
    assert p.ip_csum_ok and p.tcp_csum_ok


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), v6=st.booleans(), payload=st.binary(max_size=300))
def test_source_rewrite_checksums_property(steer: Steer, data: st.DataObject, v6: bool,
                                           payload: bytes) -> None:
    addr = v6_addr if v6 else v4_addr
    client, target = data.draw(addr), data.draw(addr)
    host = data.draw(addr.filter(lambda a: int(ipaddress.ip_address(a)) != 0))
    cport, hport, tport = data.draw(port), data.draw(port), data.draw(port)
    key = FlowKey.tcp(target, tport, client, cport)
    steer.insert(key, Rule.src_rewrite(host, hport, ttl_s=30))
    try:
        verdict, out = run(steer, Prog.TC_EGRESS, frame(target, tport, client, cport, payload))
    finally:
        steer.remove(key)
    assert verdict == TC_ACT_OK
    p = Parsed(out)
    assert (p.src_ip, p.sport) == (str(ipaddress.ip_address(host)), hport)
    assert p.ip_csum_ok and p.tcp_csum_ok


# ---- IPv6 extension headers and fragments (docs/steering.md) --------------------

HOPOPTS, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60


def opt_header(nexthdr: int, units: int = 0) -> bytes:
    """A hop-by-hop or destination-options header of (units + 1) * 8 bytes,
    filled with one PadN option; a routing header has the same outline."""
    pad = 8 * (units + 1) - 2
    return struct.pack("!BB", nexthdr, units) + bytes([1, pad - 2]) + bytes(pad - 2)


def frag_header(nexthdr: int, offset8: int, more: bool, ident: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset8 << 3) | int(more), ident)


def ipv6_frame(src: str, dst: str, first: int, chain: bytes, l4: bytes) -> bytes:
    """Ethernet + IPv6 (next header `first`) + extension chain + l4 bytes."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(l4), first, 64, s, d)
    return mac(HOST_MAC) + mac(CLIENT_MAC) + struct.pack("!H", 0x86DD) + ip + chain + l4


def ipv4_fragments(src: str, sport: int, dst: str, dport: int, payload: bytes,
                   first_len: int, ident: int = 0x4242) -> tuple[bytes, bytes, bytes]:
    """One TCP segment split after first_len bytes (a multiple of 8) into two
    IPv4 fragments; returns (first, second, the whole segment)."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    seg = tcp_segment(s, d, sport, dport, payload)
    out = []
    for part, off8, more in ((seg[:first_len], 0, True), (seg[first_len:], first_len // 8, False)):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), ident,
                         (0x2000 if more else 0) | off8, 64, socket.IPPROTO_TCP, 0, s, d)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        out.append(mac(HOST_MAC) + mac(CLIENT_MAC) + struct.pack("!H", 0x0800) + ip + part)
    return out[0], out[1], seg


def tcp_after_chain(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(src, dst, TCP segment) of an IPv6 frame, walking extension headers."""
    nh, off = raw[20], 54
    while nh in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT):
        nh, off = raw[off], off + (8 if nh == FRAGMENT else 8 * (raw[off + 1] + 1))
    assert nh == socket.IPPROTO_TCP
    plen = struct.unpack("!H", raw[18:20])[0]
    return raw[22:38], raw[38:54], raw[off:54 + plen]


CHAINS = {
    "dstopts": (DSTOPTS, lambda nh: opt_header(nh)),
    "hopopts+dstopts": (HOPOPTS, lambda nh: opt_header(DSTOPTS, 1) + opt_header(nh)),
    "routing+dstopts": (ROUTING, lambda nh: opt_header(DSTOPTS, 2) + opt_header(nh)),
    "first-fragment": (FRAGMENT, lambda nh: frag_header(nh, 0, True)),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_ipv6_extension_headers_are_walked_to_tcp(steer: Steer, chain: str) -> None:
    client, host, target = V6
    first, build = CHAINS[chain]
    key = FlowKey.tcp(client, 40100, host, 80)
    payload = b"GET /ext HTTP/1.1\r\n\r\n"
    seg = tcp_segment(ipaddress.ip_address(client).packed, ipaddress.ip_address(host).packed,
                      40100, 80, payload)
    raw = ipv6_frame(client, host, first, build(socket.IPPROTO_TCP), seg)

    steer.insert(key, Rule.block(ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_SHOT, raw)
    assert run(steer, Prog.XDP, raw) == (XDP_DROP, raw)

    steer.insert(key, Rule.redirect(target, 18080, dst_mac=TARGET_MAC, src_mac=HOST_MAC,
                                    ttl_s=30))
    for prog, verdict in ((Prog.TC_INGRESS, TC_ACT_REDIRECT), (Prog.XDP, XDP_TX)):
        got, out = run(steer, prog, raw)
        assert got == verdict
        src, dst, out_seg = tcp_after_chain(out)
        assert ipaddress.ip_address(dst) == ipaddress.ip_address(target)
        assert struct.unpack("!H", out_seg[2:4])[0] == 18080
        assert out_seg[20:] == payload
        assert csum(pseudo(src, dst, len(out_seg)) + out_seg) == 0
        assert out[54:54 + len(build(socket.IPPROTO_TCP))] == build(socket.IPPROTO_TCP)
    assert steer.lookup(key).packets == 2


def test_ipv6_chain_to_other_protocols_passes(steer: Steer) -> None:
    client, host, _ = V6
    steer.insert(FlowKey.tcp(client, 40101, host, 80), Rule.block(ttl_s=30))
    udp = struct.pack("!HHHH", 40101, 80, 8, 0)
    raw = ipv6_frame(client, host, DSTOPTS, opt_header(socket.IPPROTO_UDP), udp)
    assert run(steer, Prog.TC_INGRESS, raw) == (TC_ACT_OK, raw)
    assert run(steer, Prog.XDP, raw) == (XDP_PASS, raw)


@pytest.mark.parametrize("prog,drop,redirect", [
    (Prog.TC_INGRESS, TC_ACT_SHOT, TC_ACT_REDIRECT), (Prog.XDP, XDP_DROP, XDP_TX)])
def test_fragmented_ipv4_to_a_steered_flow(steer: Steer, prog: Prog, drop: int,
                                           redirect: int) -> None:
    """First fragments carry the ports and are steered; non-first ones cannot
    be matched by 5-tuple and are held off (dropped, counted as "held") while
    their address pair has a live entry, learnt from a matched packet."""
    client, host, target = "198.18.0.20", V4[1], V4[2]
    key = FlowKey.tcp(client, 40200, host, 80)
    payload = bytes(range(200))
    first, second, seg = ipv4_fragments(client, 40200, host, 80, payload, first_len=64)

    steer.insert(key, Rule.block(ttl_s=30))
    stats = steer.dp_stats()
    assert run(steer, prog, first) == (drop, first)
    assert run(steer, prog, second) == (drop, second)
    after = steer.dp_stats()
    assert after["blocked"] == stats["blocked"] + 1
    assert after["held"] == stats["held"] + 1
    assert steer.lookup(key).packets == 1  # the held fragment is not the flow's

    # Another client's fragments are nobody's business.
    _, other, _ = ipv4_fragments("198.18.0.21", 40200, host, 80, payload, first_len=64)
    assert run(steer, prog, other)[0] == (TC_ACT_OK if prog == Prog.TC_INGRESS else XDP_PASS)

    steer.insert(key, Rule.redirect(target, 18080, dst_mac=TARGET_MAC, ttl_s=30))
    got, out = run(steer, prog, first)
    assert got == redirect
    ip = out[14:34]
    assert csum(ip) == 0 and ip[16:20] == ipaddress.ip_address(target).packed
    assert struct.unpack("!H", ip[6:8])[0] == 0x2000  # still a first fragment
    # The rewritten first fragment plus the untouched rest is a valid segment
    # for the target: its checksum covers the whole of it.
    whole = out[34:] + seg[64:]
    assert struct.unpack("!H", whole[2:4])[0] == 18080
    assert csum(pseudo(ip[12:16], ip[16:20], len(whole)) + whole) == 0
    assert run(steer, prog, second) == (drop, second)
    assert steer.dp_stats()["held"] == stats["held"] + 2


def test_tiny_first_fragment_is_held_not_passed(steer: Steer) -> None:
    """A first fragment too short to hold the TCP header (RFC 1858) has no
    usable ports either: held like a non-first fragment."""
    client, host, _ = "198.18.0.22", V4[1], V4[2]
    key = FlowKey.tcp(client, 40300, host, 80)
    first, _, _ = ipv4_fragments(client, 40300, host, 80, b"x" * 64, first_len=64)
    steer.insert(key, Rule.block(ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, first)[0] == TC_ACT_SHOT  # learns the pair
    tiny, _, _ = ipv4_fragments(client, 40300, host, 80, b"x" * 64, first_len=8)
    held = steer.dp_stats()["held"]
    assert run(steer, Prog.TC_INGRESS, tiny) == (TC_ACT_SHOT, tiny)
    assert steer.dp_stats()["held"] == held + 1


def test_ipv6_non_first_fragment_is_held(steer: Steer) -> None:
    client, host, _ = "2001:2::20", V6[1], V6[2]
    key = FlowKey.tcp(client, 40400, host, 80)
    seg = tcp_segment(ipaddress.ip_address(client).packed, ipaddress.ip_address(host).packed,
                      40400, 80, b"y" * 100)
    first = ipv6_frame(client, host, FRAGMENT, frag_header(socket.IPPROTO_TCP, 0, True),
                       seg[:64])
    rest = ipv6_frame(client, host, FRAGMENT, frag_header(socket.IPPROTO_TCP, 8, False),
                      seg[64:])
    steer.insert(key, Rule.block(ttl_s=30))
    held = steer.dp_stats()["held"]
    assert run(steer, Prog.TC_INGRESS, first)[0] == TC_ACT_SHOT
    assert run(steer, Prog.TC_INGRESS, rest) == (TC_ACT_SHOT, rest)
    assert run(steer, Prog.XDP, rest) == (XDP_DROP, rest)
    assert steer.dp_stats()["held"] == held + 2


def test_non_first_fragment_passes_when_the_pair_is_not_steered(steer: Steer) -> None:
    """Held only while the pair is known to be steered: before any packet of
    it matched an entry, and once the entry it learnt from expired, a
    non-first fragment passes (docs/steering.md)."""
    client, host, _ = "198.18.0.23", V4[1], V4[2]
    key = FlowKey.tcp(client, 40500, host, 80)
    first, second, _ = ipv4_fragments(client, 40500, host, 80, b"z" * 100, first_len=64)
    steer.insert(key, Rule.block(expires_ns=time.monotonic_ns() + 300_000_000))
    assert run(steer, Prog.TC_INGRESS, second) == (TC_ACT_OK, second)  # nothing learnt yet
    assert run(steer, Prog.TC_INGRESS, first)[0] == TC_ACT_SHOT
    assert run(steer, Prog.TC_INGRESS, second)[0] == TC_ACT_SHOT
    time.sleep(0.4)  # let the entry (and what was learnt from it) expire
    assert run(steer, Prog.TC_INGRESS, second) == (TC_ACT_OK, second)


def test_non_first_fragment_passes_once_the_entry_is_removed(steer: Steer) -> None:
    """A rolled-back handoff removes its block and serves locally: from then
    on the pair's fragments go to the host's reassembly again."""
    client, host, _ = "198.18.0.24", V4[1], V4[2]
    key = FlowKey.tcp(client, 40600, host, 80)
    first, second, _ = ipv4_fragments(client, 40600, host, 80, b"w" * 100, first_len=64)
    steer.insert(key, Rule.block(ttl_s=30))
    assert run(steer, Prog.TC_INGRESS, first)[0] == TC_ACT_SHOT
    assert run(steer, Prog.XDP, second)[0] == XDP_DROP
    steer.remove(key)
    assert run(steer, Prog.TC_INGRESS, first) == (TC_ACT_OK, first)
    assert run(steer, Prog.TC_INGRESS, second) == (TC_ACT_OK, second)
    assert run(steer, Prog.XDP, second) == (XDP_PASS, second)
