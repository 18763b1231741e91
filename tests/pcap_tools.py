"""Reading what tcpdump wrote: TCP streams reassembled from a pcap file, and
the XO control messages in them (the headers are in clear, the payloads
not). Only Ethernet + IPv4/IPv6 + TCP, which is all the lab carries."""

from __future__ import annotations

import contextlib
import struct
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xo import core

Flow = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


def _ip(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


@dataclass(frozen=True)
class Packet:
    """One TCP segment as captured (headers only are needed)."""

    time: float
    flow: Flow
    seq: int
    ack: int
    flags: int       # TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10)
    length: int      # payload length on the wire
    payload: bytes   # what the snap length kept of it

    def describe(self, t0: float) -> str:
        names = "".join(n for bit, n in ((0x02, "S"), (0x01, "F"), (0x04, "R"),
                                         (0x08, "P"), (0x10, ".")) if self.flags & bit)
        return (f"{(self.time - t0) * 1e3:9.3f} ms {self.flow[0]}:{self.flow[1]} > "
                f"{self.flow[2]}:{self.flow[3]} [{names}] seq {self.seq} ack {self.ack} "
                f"len {self.length}")


def packets(path: Path) -> list[Packet]:
    """Every IPv4/IPv6 TCP segment of an Ethernet pcap, in capture order."""
    data = path.read_bytes()
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1" or magic == b"\x4d\x3c\xb2\xa1":
        endian = "<"
    elif magic == b"\xa1\xb2\xc3\xd4" or magic == b"\xa1\xb2\x3c\x4d":
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, want Ethernet (1)")
    out = []
    off = 24
    while off + 16 <= len(data):
        sec, frac, caplen, _wirelen = struct.unpack_from(endian + "IIII", data, off)
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
            src, dst, tcp, wire = _ip(ip[12:16]), _ip(ip[16:20]), ip[ihl:total], total - ihl
        elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 6:
            plen = int.from_bytes(ip[4:6], "big")
            src, dst, tcp, wire = _ip(ip[8:24]), _ip(ip[24:40]), ip[40:40 + plen], plen
        else:
            continue
        if len(tcp) < 20:
            continue
        sport, dport, seq, ack = struct.unpack_from(">HHII", tcp)
        hlen = (tcp[12] >> 4) * 4
        out.append(Packet(sec + frac / (1e9 if nano else 1e6), (src, sport, dst, dport),
                          seq, ack, tcp[13], wire - hlen, tcp[hlen:]))
    return out


def tcp_streams(path: Path, whole: int | None = None) -> dict[Flow, bytes]:
    """Each direction's TCP payload, in sequence order, retransmissions once.
    Flows with port `whole` on either end must be complete (a gap raises);
    others may have gaps (a handed-off connection passes the host only in
    part), which are left out."""
    segments: dict[Flow, list[tuple[int, bytes]]] = defaultdict(list)
    isn: dict[Flow, int] = {}
    for p in packets(path):
        if p.flags & 0x02:  # SYN: the stream starts after it
            isn[p.flow] = (p.seq + 1) & 0xFFFFFFFF
        if p.payload:
            segments[p.flow].append((p.seq, p.payload))
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


def resends(path: Path, sender: str, context: int = 12) -> str:
    """Each segment `sender` sent again (data or FIN at or below the furthest
    sequence number it had sent: a resend, also of part of a large segment the
    capture saw whole), with what its connection carried around the first
    sending: enough to tell which step of a handoff kept it waiting. Empty
    when there is none."""
    pkts = packets(path)
    if not pkts:
        return ""
    t0 = pkts[0].time
    high: dict[Flow, int] = {}       # one past the furthest byte sent (FIN counts)
    lines: list[str] = []
    for i, p in enumerate(pkts):
        if p.flow[0] != sender or p.flags & 0x02:
            continue
        end = (p.seq + p.length + (p.flags & 0x01)) & 0xFFFFFFFF
        if p.flow not in high or not (p.length or p.flags & 0x01):
            high.setdefault(p.flow, end)
            continue
        if 0 < ((end - high[p.flow]) & 0xFFFFFFFF) < 1 << 31:
            high[p.flow] = end  # new data (or a FIN): not a resend
            continue
        if len(lines) > 200:
            lines.append("... (more resends left out)")
            break
        back = (p.flow[2], p.flow[3], p.flow[0], p.flow[1])
        j = next((k for k in range(i - 1, -1, -1) if pkts[k].flow == p.flow
                  and ((p.seq - pkts[k].seq) & 0xFFFFFFFF) < max(pkts[k].length, 1)), i)
        around = [q for q in pkts[max(0, j - 40 * context):i + context]
                  if q.flow in (p.flow, back)]
        k = next(n for n, q in enumerate(around) if q is pkts[j])
        lines.append(f"resent after {(p.time - pkts[j].time) * 1e3:.1f} ms: "
                     f"{p.describe(t0)}")
        lines += ["    " + q.describe(t0) for q in around[max(0, k - context):]
                  if q.time <= p.time + 0.05]
    return "\n".join(lines)


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


@contextlib.contextmanager
def headers_capture(testbed: Any, member: str, path: Path,
                    port: int | None = None) -> Iterator[Path]:
    """tcpdump on a lab member's interface, TCP headers (of `port` only, if
    given), into `path`, for as long as the block runs (for `resends` when a
    client's counters say it resent).

    Immediate mode: otherwise the kernel hands tcpdump its ring a block at a
    time (up to a second late), and what is still in the ring when tcpdump
    is stopped never reaches the file: a short test's capture was empty."""
    m = testbed.member(member)
    dump = testbed.popen(member, [
        "tcpdump", "-i", m.ifname, "--immediate-mode", "-s", "96", "-B", "16384", "-n",
        "-w", str(path),
        f"tcp port {port}" if port else "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        line = dump.stderr.readline()  # "listening on ..." once it captures
        assert "listening on" in line, line
        yield path
    finally:
        dump.stop()
