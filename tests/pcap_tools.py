"""Reading what tcpdump wrote: TCP streams reassembled from a pcap file, and
the XO control messages in them (the headers are in clear, the payloads
not). Only Ethernet + IPv4/IPv6 + TCP, which is all the lab carries."""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from xo import core

Flow = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


def _ip(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


def tcp_streams(path: Path, whole: int | None = None) -> dict[Flow, bytes]:
    """Each direction's TCP payload, in sequence order, retransmissions once.
    Flows with port `whole` on either end must be complete (a gap raises);
    others may have gaps (a handed-off connection passes the host only in
    part), which are left out."""
    data = path.read_bytes()
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1" or magic == b"\x4d\x3c\xb2\xa1":
        endian = "<"
    elif magic == b"\xa1\xb2\xc3\xd4" or magic == b"\xa1\xb2\x3c\x4d":
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, want Ethernet (1)")
    segments: dict[Flow, list[tuple[int, bytes]]] = defaultdict(list)
    isn: dict[Flow, int] = {}
    off = 24
    while off + 16 <= len(data):
        _sec, _frac, caplen, _wirelen = struct.unpack_from(endian + "IIII", data, off)
        if off + 16 + caplen > len(data):
            break  # tcpdump is still writing this one
        pkt = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(pkt) < 14:
            continue
        ethertype = int.from_bytes(pkt[12:14], "big")
        ip = pkt[14:]
        if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 6:
            ihl = (ip[0] & 0xF) * 4
            total = int.from_bytes(ip[2:4], "big")
            src, dst, tcp = _ip(ip[12:16]), _ip(ip[16:20]), ip[ihl:total]
        elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 6:
            plen = int.from_bytes(ip[4:6], "big")
            src, dst, tcp = _ip(ip[8:24]), _ip(ip[24:40]), ip[40:40 + plen]
        else:
            continue
        if len(tcp) < 20:
            continue
        sport, dport, seq = struct.unpack_from(">HHI", tcp)
        flags = tcp[13]
        payload = tcp[(tcp[12] >> 4) * 4:]
        flow = (src, sport, dst, dport)
        if flags & 0x02:  # SYN: the stream starts after it
            isn[flow] = (seq + 1) & 0xFFFFFFFF
        if payload:
            segments[flow].append((seq, payload))
    streams: dict[Flow, bytes] = {}
    for flow, segs in segments.items():
        base = isn.get(flow, min(s for s, _ in segs))
        out = bytearray()
        for seq, payload in sorted(segs, key=lambda s: (s[0] - base) & 0xFFFFFFFF):
            rel = (seq - base) & 0xFFFFFFFF
            if rel + len(payload) <= len(out):
                continue  # a retransmission of bytes we have
            if rel > len(out):
                if whole in (flow[1], flow[3]):
                    raise ValueError(f"{path}: a gap in {flow} at {len(out)} "
                                     f"(capture lost data)")
                out += bytes(rel - len(out))  # not seen here
            out += payload[len(out) - rel:]
        streams[flow] = bytes(out)
    return streams


@dataclass(frozen=True)
class Frame:
    type: int
    role: int
    seq: int
    payload: bytes  # as on the wire (ciphertext, but HELLO's nonce)


def control_frames(stream: bytes) -> list[Frame]:
    """The XO control messages of one direction of a control connection
    (a truncated last frame, if the capture ended in it, is left out)."""
    frames = []
    off = 0
    while off + core.ENV_HEADER_LEN <= len(stream):
        size = core.frame_len(stream[off:off + core.ENV_HEADER_LEN])
        if off + size > len(stream):
            break
        head = stream[off:off + core.ENV_HEADER_LEN]
        frames.append(Frame(head[3], head[4], int.from_bytes(head[16:24], "big"),
                            stream[off + core.ENV_HEADER_LEN:off + size - core.ENV_MAC_LEN]))
        off += size
    return frames
