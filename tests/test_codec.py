"""The connection-state codec (xo_core/src/state_codec.c) against a
reference encoder written here from the documented wire format.

Wire format (big-endian), as documented in state_codec.c:

    "XOST" | version u16 | flags u16 (0) | total length u32 | fields...
    field:   type u16 | field flags u16 (bit 0 = optional) | length u32 | value

Known fields, in type order: 1 endpoints (2 x 24 bytes), 2 seq (8),
3 window (20), 4 options (12) are required (flags 0); 5 send queue
(inflight_len u32 + bytes), 6 receive queue, 7 application data, 8 metadata,
9 peer MAC (6) are optional (flags 1) and left out when empty. The encoding
is canonical: every accepted input, less the unknown optional fields the
decoder skips, re-encodes to itself.

States are built without a kernel: decoded from bytes this file encodes,
and also assembled field by field in the C struct (queues in memory from the
C allocator, which xo_state_release() frees), and both are cross-checked
against the core's encoder. The malformed-input sweeps use seeded
random.Random loops and count what they generate; the total is asserted.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cffi
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from xo._xo_cffi import ffi, lib
from xo.core import (
    OPT_SACK,
    OPT_TIMESTAMPS,
    OPT_WSCALE,
    Endpoint,
    TcpState,
    XoDecodeError,
    XoError,
)

ROOT = Path(__file__).resolve().parents[1]

# ---- the documented format, independently of the C code ----------------------

HDR = struct.Struct(">4sHHI")
FHDR = struct.Struct(">HHI")
EP = struct.Struct(">HHI16s")
MAGIC = b"XOST"
VERSION = 1
OPTIONAL = 1
F_ENDPOINTS, F_SEQ, F_WINDOW, F_OPTIONS = 1, 2, 3, 4
F_SENDQ, F_RECVQ, F_APP, F_META, F_PEER_MAC = 5, 6, 7, 8, 9
F_TLS = 10  # TLS record state: known, never optional (tests/test_tls_state.py)
F_MAX = 10
REQUIRED = (F_ENDPOINTS, F_SEQ, F_WINDOW, F_OPTIONS)
FIXED_LEN = {F_ENDPOINTS: 48, F_SEQ: 8, F_WINDOW: 20, F_OPTIONS: 12, F_PEER_MAC: 6}
U32 = 2**32 - 1

DECODE_CODES = frozenset({
    lib.XO_E_TRUNCATED, lib.XO_E_BAD_MAGIC, lib.XO_E_VERSION, lib.XO_E_LENGTH,
    lib.XO_E_FIELD, lib.XO_E_DUPLICATE, lib.XO_E_MISSING, lib.XO_E_TOO_LARGE,
})

Tlv = tuple[int, int, bytes]  # (type, flags, value)


@dataclass(frozen=True)
class Ep:
    v6: bool
    port: int
    scope_id: int
    addr: bytes  # 16 bytes; IPv4 uses the first 4, the rest is zero


@dataclass(frozen=True)
class Fields:
    """Every value a state carries, as plain Python."""

    local: Ep
    remote: Ep
    snd_seq: int
    rcv_seq: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    mss_clamp: int
    timestamp: int
    inflight: bytes = b""
    unsent: bytes = b""
    recvq: bytes = b""
    app: bytes = b""
    meta: bytes = b""
    peer_mac: bytes | None = None


def flags_of(ftype: int) -> int:
    return OPTIONAL if ftype >= F_SENDQ else 0


def tlv(ftype: int, value: bytes) -> Tlv:
    return (ftype, flags_of(ftype), value)


def pack_ep(ep: Ep) -> bytes:
    return EP.pack(6 if ep.v6 else 4, ep.port, ep.scope_id, ep.addr)


def ref_tlvs(f: Fields) -> list[Tlv]:
    out = [
        tlv(F_ENDPOINTS, pack_ep(f.local) + pack_ep(f.remote)),
        tlv(F_SEQ, struct.pack(">II", f.snd_seq, f.rcv_seq)),
        tlv(F_WINDOW, struct.pack(">5I", f.snd_wl1, f.snd_wnd, f.max_window, f.rcv_wnd,
                                  f.rcv_wup)),
        tlv(F_OPTIONS, struct.pack(">BBBxII", f.options, f.snd_wscale, f.rcv_wscale,
                                   f.mss_clamp, f.timestamp)),
    ]
    if f.inflight or f.unsent:
        out.append(tlv(F_SENDQ, struct.pack(">I", len(f.inflight)) + f.inflight + f.unsent))
    for ftype, value in ((F_RECVQ, f.recvq), (F_APP, f.app), (F_META, f.meta)):
        if value:
            out.append(tlv(ftype, value))
    if f.peer_mac is not None:
        out.append(tlv(F_PEER_MAC, f.peer_mac))
    return out


def pack(tlvs: Iterable[Tlv], *, magic: bytes = MAGIC, version: int = VERSION,
         hflags: int = 0, total: int | None = None) -> bytes:
    body = b"".join(FHDR.pack(t, fl, len(v)) + v for t, fl, v in tlvs)
    size = HDR.size + len(body)
    return HDR.pack(magic, version, hflags, size if total is None else total) + body


def ref_encode(f: Fields) -> bytes:
    return pack(ref_tlvs(f))


def split(data: bytes) -> list[Tlv]:
    """The fields of a structurally sound encoding (header already valid)."""
    total = HDR.unpack_from(data)[3]
    out: list[Tlv] = []
    off = HDR.size
    while off < total:
        t, fl, n = FHDR.unpack_from(data, off)
        off += FHDR.size
        out.append((t, fl, data[off:off + n]))
        off += n
    assert off == total
    return out


def without_unknown(data: bytes) -> bytes:
    """What the decoder keeps of an accepted input: unknown optional fields go."""
    _magic, version, hflags, _total = HDR.unpack_from(data)
    kept = [x for x in split(data) if 1 <= x[0] <= F_MAX]
    return pack(kept, version=version, hflags=hflags)


# ---- states: Python <-> C struct ----------------------------------------------

_libc_ffi = cffi.FFI()
_libc_ffi.cdef("void *malloc(size_t size);")
_libc = _libc_ffi.dlopen(None)


def c_bytes(data: bytes) -> Any:
    """A copy of data in memory from the C allocator, as xo_state_release()
    expects of the queue buffers it frees."""
    raw = _libc.malloc(len(data))
    if raw == _libc_ffi.NULL:
        raise MemoryError(len(data))
    ptr = ffi.cast("uint8_t *", int(_libc_ffi.cast("uintptr_t", raw)))
    ffi.memmove(ptr, data, len(data))
    return ptr


def set_ep(out: Any, ep: Ep) -> None:
    out.family = socket.AF_INET6 if ep.v6 else socket.AF_INET
    out.port = ep.port
    out.scope_id = ep.scope_id
    ffi.memmove(out.addr, ep.addr, 16)


def build(f: Fields) -> TcpState:
    """A state assembled in the C struct, the way xo_tcp_capture() fills it."""
    state = TcpState()
    c = state.c
    set_ep(c.local, f.local)
    set_ep(c.remote, f.remote)
    for name in ("snd_seq", "rcv_seq", "snd_wl1", "snd_wnd", "max_window", "rcv_wnd",
                 "rcv_wup", "options", "snd_wscale", "rcv_wscale", "mss_clamp", "timestamp"):
        setattr(c, name, getattr(f, name))
    sendq = f.inflight + f.unsent
    if sendq:
        c.sendq = c_bytes(sendq)
        c.inflight_len = len(f.inflight)
        c.unsent_len = len(f.unsent)
    if f.recvq:
        c.recvq = c_bytes(f.recvq)
        c.recvq_len = len(f.recvq)
    state.app_data = f.app
    state.meta = f.meta
    state.peer_mac = f.peer_mac
    return state


def ep_of(ep: Any) -> Ep:
    assert ep.family in (socket.AF_INET, socket.AF_INET6)
    return Ep(ep.family == socket.AF_INET6, ep.port, ep.scope_id, bytes(ffi.buffer(ep.addr, 16)))


def fields_of(state: TcpState) -> Fields:
    c = state.c
    assert c.has_peer_mac in (0, 1)
    return Fields(
        local=ep_of(c.local), remote=ep_of(c.remote), snd_seq=c.snd_seq, rcv_seq=c.rcv_seq,
        snd_wl1=c.snd_wl1, snd_wnd=c.snd_wnd, max_window=c.max_window, rcv_wnd=c.rcv_wnd,
        rcv_wup=c.rcv_wup, options=c.options, snd_wscale=c.snd_wscale,
        rcv_wscale=c.rcv_wscale, mss_clamp=c.mss_clamp, timestamp=c.timestamp,
        inflight=state.inflight, unsent=state.unsent, recvq=state.recvq, app=state.app_data,
        meta=state.meta, peer_mac=state.peer_mac,
    )


# ---- valid states: hypothesis strategies and seeded generators ----------------

u32 = st.integers(0, U32)


@st.composite
def endpoints(draw: st.DrawFn, v6: bool) -> Ep:
    port = draw(st.integers(1, 65535))
    if v6:
        return Ep(True, port, draw(u32), draw(st.binary(min_size=16, max_size=16)))
    return Ep(False, port, 0, draw(st.binary(min_size=4, max_size=4)) + bytes(12))


def blobs(limit: int) -> st.SearchStrategy[bytes]:
    """Empty, small, or (cheaply) large byte strings up to limit."""
    large = st.builds(lambda n, seed: random.Random(seed).randbytes(n),
                      st.integers(1, limit), st.integers(0, 2**32))
    return st.one_of(st.just(b""), st.binary(min_size=1, max_size=64), large)


@st.composite
def valid_fields(draw: st.DrawFn, v6: bool | None = None) -> Fields:
    if v6 is None:
        v6 = draw(st.booleans())
    options = draw(st.integers(0, 7))
    scale = st.integers(0, 14) if options & OPT_WSCALE else st.just(0)
    return Fields(
        local=draw(endpoints(v6)), remote=draw(endpoints(v6)),
        snd_seq=draw(u32), rcv_seq=draw(u32), snd_wl1=draw(u32), snd_wnd=draw(u32),
        max_window=draw(u32), rcv_wnd=draw(u32), rcv_wup=draw(u32),
        options=options, snd_wscale=draw(scale), rcv_wscale=draw(scale),
        mss_clamp=draw(st.integers(1, 65535)), timestamp=draw(u32),
        inflight=draw(blobs(70_000)), unsent=draw(blobs(70_000)), recvq=draw(blobs(70_000)),
        app=draw(blobs(20_000)), meta=draw(blobs(lib.XO_MAX_META_BYTES)),
        peer_mac=draw(st.none() | st.binary(min_size=6, max_size=6)),
    )


def random_ep(rng: random.Random, v6: bool) -> Ep:
    port = rng.randint(1, 65535)
    if v6:
        return Ep(True, port, rng.choice([0, rng.getrandbits(32)]), rng.randbytes(16))
    return Ep(False, port, 0, rng.randbytes(4) + bytes(12))


def random_fields(rng: random.Random, *, v6: bool | None = None, queues: int = 64) -> Fields:
    """A valid state; each optional byte string is empty half of the time and
    otherwise up to `queues` bytes long."""
    if v6 is None:
        v6 = rng.random() < 0.5
    options = rng.randint(0, 7)
    wscale = (lambda: rng.randint(0, 14)) if options & OPT_WSCALE else (lambda: 0)

    def blob() -> bytes:
        return rng.randbytes(rng.randint(1, queues)) if queues and rng.random() < 0.5 else b""

    return Fields(
        local=random_ep(rng, v6), remote=random_ep(rng, v6),
        snd_seq=rng.getrandbits(32), rcv_seq=rng.getrandbits(32),
        snd_wl1=rng.getrandbits(32), snd_wnd=rng.getrandbits(32),
        max_window=rng.getrandbits(32), rcv_wnd=rng.getrandbits(32),
        rcv_wup=rng.getrandbits(32), options=options, snd_wscale=wscale(),
        rcv_wscale=wscale(), mss_clamp=rng.randint(1, 65535), timestamp=rng.getrandbits(32),
        inflight=blob(), unsent=blob(), recvq=blob(), app=blob(), meta=blob(),
        peer_mac=rng.randbytes(6) if rng.random() < 0.5 else None,
    )


V4 = Fields(
    local=Ep(False, 80, 0, bytes([198, 18, 0, 1]) + bytes(12)),
    remote=Ep(False, 40000, 0, bytes([198, 18, 0, 10]) + bytes(12)),
    snd_seq=1000, rcv_seq=2000, snd_wl1=1999, snd_wnd=65535, max_window=65535,
    rcv_wnd=64240, rcv_wup=2000, options=OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE,
    snd_wscale=7, rcv_wscale=7, mss_clamp=1460, timestamp=123456,
)
V6 = replace(
    V4,
    local=Ep(True, 443, 0, bytes.fromhex("20010002000000000000000000000001")),
    remote=Ep(True, 50000, 3, bytes.fromhex("fe800000000000000000000000000010")),
)
FULL = replace(V4, inflight=b"in flight " * 40, unsent=b"never sent" * 30,
               recvq=b"GET /next HTTP/1.1\r\n\r\n", app=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
               meta=b'{"plugin":"nginx"}', peer_mac=bytes.fromhex("020000000001"))


# ---- the refusal checker --------------------------------------------------------

TALLY: Counter[str] = Counter()  # malformed inputs refused, by sweep
# Minimum each sweep must generate; together well over the 100,000 asked for.
QUOTA = {
    "truncation": 30_000,
    "recut": 20_000,
    "single-flip": 25_000,
    "multi-flip": 30_000,
    "length": 18_000,
    "trailing": 6_000,
    "structure": 20_000,
    "value": 9_000,
    "version": 66_000,  # the whole u16 version space (not counted towards 100,000)
}


def message_of(err: XoError) -> str:
    text = str(err)
    prefix = f"{err.name}: "
    assert text.startswith(prefix) and len(text) > len(prefix), f"no sentence: {text!r}"
    return text[len(prefix):]


def refused(data: bytes, allowed: Iterable[int] = DECODE_CODES) -> int:
    """Decode must refuse data with an XoDecodeError whose code is allowed,
    a sentence, and the input left as it was. Returns the code."""
    snapshot = bytes(bytearray(data))
    try:
        TcpState.decode(data)
    except XoDecodeError as err:
        assert data == snapshot, "decode wrote into its input"
        allowed = frozenset(allowed)
        assert err.code in allowed, (
            f"{err} for {data[:80].hex()}; want one of "
            f"{sorted(ffi.string(lib.xo_strerror(c)).decode() for c in allowed)}")
        message_of(err)
        return int(err.code)
    raise AssertionError(f"accepted malformed input {data[:80].hex()}...")


def refuse_or_canonical(data: bytes) -> bool:
    """A mutant of a valid encoding: refused cleanly, or decoded to a state
    that re-encodes to exactly data (less skipped unknown optional fields).
    Returns True when it was accepted."""
    try:
        state = TcpState.decode(data)
    except XoDecodeError as err:
        message_of(err)
        return False
    again = state.encode()
    unknown = [t for t, _fl, _v in split(data) if not 1 <= t <= F_MAX]
    if unknown:
        assert all(fl & OPTIONAL for t, fl, _v in split(data) if t in unknown)
        assert again == without_unknown(data)
    else:
        assert again == data, f"accepted {data.hex()}\nre-encodes {again.hex()}"
    return True


def header_flip_code(data: bytes, pos: int) -> int:
    """Exact code for an input whose only damage is in header byte pos."""
    if pos < 4:
        return lib.XO_E_BAD_MAGIC
    if pos < 6:
        return lib.XO_E_VERSION
    if pos < 8:
        return lib.XO_E_FIELD
    total = HDR.unpack_from(data)[3]
    return lib.XO_E_TRUNCATED if total > len(data) else lib.XO_E_LENGTH


def flip(data: bytes, bits: Iterable[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(out)


def corpus(seed: int, n: int, **kw: Any) -> list[bytes]:
    rng = random.Random(seed)
    return [ref_encode(random_fields(rng, **kw)) for _ in range(n)]


# ---- round trips ------------------------------------------------------------------


def check_round_trip(f: Fields) -> None:
    wire = ref_encode(f)
    state = TcpState.decode(wire)
    assert fields_of(state) == f
    assert state.encode() == wire
    assert TcpState.decode(state.encode()).encode() == wire  # encode(decode(x)) == x
    built = build(f)
    assert fields_of(built) == f
    assert lib.xo_state_encoded_size(built.c) == len(wire)
    assert built.encode() == wire


@pytest.mark.parametrize("base", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("queues", ["empty", "full", "inflight-only", "unsent-only"])
def test_round_trip_examples(base: Fields, queues: str) -> None:
    f = {
        "empty": base,
        "full": replace(FULL, local=base.local, remote=base.remote),
        "inflight-only": replace(base, inflight=b"x"),
        "unsent-only": replace(base, unsent=b"y" * 3000),
    }[queues]
    check_round_trip(f)
    state = TcpState.decode(ref_encode(f))
    if base is V4:
        assert state.local == Endpoint("198.18.0.1", 80)
        assert state.remote == Endpoint("198.18.0.10", 40000)
    else:
        assert state.local == Endpoint("2001:2::1", 443)
        assert state.remote == Endpoint("fe80::10", 50000, 3)
    assert state.inflight + state.unsent == state.sendq == f.inflight + f.unsent


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_fields())
@example(V4)
@example(V6)
@example(replace(FULL, meta=bytes(lib.XO_MAX_META_BYTES)))  # the meta limit itself
def test_round_trip_property(f: Fields) -> None:
    check_round_trip(f)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_round_trip_per_family(v6: bool, data: st.DataObject) -> None:
    check_round_trip(data.draw(valid_fields(v6=v6)))


def test_round_trip_seeded_bulk() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        check_round_trip(random_fields(rng, queues=rng.choice([0, 8, 2000])))


def test_encode_needs_room_and_leaves_output_alone() -> None:
    state = build(FULL)
    size = lib.xo_state_encoded_size(state.c)
    out = ffi.new("uint8_t[]", size)
    assert lib.xo_state_encode(state.c, out, size - 1) == lib.XO_E_NOSPACE
    assert ffi.string(lib.xo_last_error()).decode().startswith("encode: need")
    assert bytes(out) == bytes(size)
    assert lib.xo_state_encode(state.c, out, size) == size
    assert bytes(out) == ref_encode(FULL)


def test_setters_replace_and_clear() -> None:
    state = build(FULL)
    state.app_data = b"other"
    state.meta = b""
    state.peer_mac = None
    assert fields_of(state) == replace(FULL, app=b"other", meta=b"", peer_mac=None)
    assert state.encode() == ref_encode(replace(FULL, app=b"other", meta=b"", peer_mac=None))
    with pytest.raises(ValueError):
        state.peer_mac = b"12345"
    with pytest.raises(XoDecodeError) as err:
        state.meta = bytes(lib.XO_MAX_META_BYTES + 1)
    assert err.value.code == lib.XO_E_TOO_LARGE
    assert state.meta == b""  # unchanged by the refused setter


# ---- malformed inputs ---------------------------------------------------------------


def test_truncation_at_every_length() -> None:
    """Every proper prefix is refused as truncated (the header announces more)."""
    samples = corpus(10, 40, queues=300)
    samples += [ref_encode(FULL), ref_encode(replace(V6, recvq=bytes(9000)))]
    for wire in samples:
        for cut in range(len(wire)):
            refused(wire[:cut], {lib.XO_E_TRUNCATED})
            TALLY["truncation"] += 1
    assert TALLY["truncation"] >= QUOTA["truncation"]


def test_truncation_with_consistent_total() -> None:
    """Cut, with the header's total fixed to match: a cut inside a field is
    truncated, a cut before a required field is missing it, and a cut
    exactly after a field is a valid, shorter state."""
    accepted = 0
    for wire in corpus(11, 60, queues=200):
        bounds = {HDR.size}
        off = HDR.size
        for _t, _fl, v in split(wire):
            off += FHDR.size + len(v)
            bounds.add(off)
        for cut in range(HDR.size, len(wire)):
            data = wire[:8] + struct.pack(">I", cut) + wire[12:cut]
            if cut not in bounds:
                refused(data, {lib.XO_E_TRUNCATED})
            elif refuse_or_canonical(data):
                accepted += 1
                continue
            else:
                refused(data, {lib.XO_E_MISSING})
            TALLY["recut"] += 1
    assert accepted > 0
    assert TALLY["recut"] >= QUOTA["recut"]


def test_single_bit_flips() -> None:
    """Every bit of every sample flipped once: the header's bits give exact
    codes; anywhere else a flip is refused cleanly or is canonical."""
    accepted = 0
    for wire in corpus(12, 40, queues=24):
        for bit in range(len(wire) * 8):
            data = flip(wire, [bit])
            if bit < HDR.size * 8:
                refused(data, {header_flip_code(data, bit >> 3)})
            elif refuse_or_canonical(data):
                accepted += 1
                continue
            TALLY["single-flip"] += 1
    assert accepted > 0  # e.g. any bit of a sequence number or queue byte
    assert TALLY["single-flip"] >= QUOTA["single-flip"]


def test_multiple_bit_flips() -> None:
    rng = random.Random(13)
    samples = corpus(13, 50, queues=64)
    accepted = 0
    for i in range(40_000):
        wire = samples[i % len(samples)]
        nbits = len(wire) * 8
        # Mostly in the structure (the first ~200 bytes), sometimes anywhere.
        span = min(nbits, 1600) if i % 4 else nbits
        data = flip(wire, rng.sample(range(span), rng.randint(2, 8)))
        if refuse_or_canonical(data):
            accepted += 1
        else:
            TALLY["multi-flip"] += 1
    assert accepted > 0
    assert TALLY["multi-flip"] >= QUOTA["multi-flip"]


def test_bogus_length_fields() -> None:
    rng = random.Random(14)
    samples = corpus(14, 40, queues=100)
    for i in range(6000):
        wire = samples[i % len(samples)]
        # The header's total: bigger than the input is truncated, smaller
        # leaves trailing bytes.
        total = rng.choice([U32, len(wire) + 1, rng.randint(len(wire) + 1, U32),
                            0, rng.randint(0, len(wire) - 1)])
        refused(wire[:8] + struct.pack(">I", total) + wire[12:],
                {lib.XO_E_TRUNCATED if total > len(wire) else lib.XO_E_LENGTH})
        TALLY["length"] += 1
        # A field announcing more than is left.
        tlvs = split(wire)
        k = rng.randrange(len(tlvs))
        off = HDR.size + sum(FHDR.size + len(v) for _t, _fl, v in tlvs[:k])
        left = len(wire) - off - FHDR.size
        n = rng.choice([U32, left + 1, rng.randint(left + 1, U32)])
        refused(wire[:off + 4] + struct.pack(">I", n) + wire[off + 8:], {lib.XO_E_TRUNCATED})
        TALLY["length"] += 1
        # A fixed-size field of the wrong size (the total kept consistent).
        ftype = rng.choice(sorted(FIXED_LEN))
        bad = rng.choice([0, FIXED_LEN[ftype] - 1, FIXED_LEN[ftype] + 1, rng.randint(0, 100)])
        if bad == FIXED_LEN[ftype]:
            bad += 1
        f = random_fields(rng, queues=0)
        tlvs = [x if x[0] != ftype else tlv(ftype, rng.randbytes(bad))
                for x in ref_tlvs(replace(f, peer_mac=rng.randbytes(6)))]
        refused(pack(tlvs), {lib.XO_E_LENGTH})
        TALLY["length"] += 1
    # The send queue's in-flight count beyond its bytes.
    for _ in range(1000):
        f = replace(random_fields(rng, queues=0), unsent=rng.randbytes(rng.randint(1, 50)))
        nbytes = len(f.unsent)
        value = struct.pack(">I", rng.choice([nbytes + 1, U32, rng.randint(nbytes + 1, U32)]))
        tlvs = [x if x[0] != F_SENDQ else tlv(F_SENDQ, value + f.unsent) for x in ref_tlvs(f)]
        refused(pack(tlvs), {lib.XO_E_LENGTH})
        TALLY["length"] += 1
    assert TALLY["length"] >= QUOTA["length"]


def test_trailing_bytes() -> None:
    rng = random.Random(15)
    for i, wire in enumerate(corpus(15, 5000, queues=32)):
        extra = rng.randbytes(rng.choice([1, 2, 7, 8, 9, rng.randint(1, 300)]))
        refused(wire + extra, {lib.XO_E_LENGTH})
        TALLY["trailing"] += 1
        if i % 5 == 0:
            # Inside the announced total, garbage is parsed as fields.
            data = wire + extra
            data = data[:8] + struct.pack(">I", len(data)) + data[12:]
            if len(extra) < FHDR.size:
                refused(data, {lib.XO_E_TRUNCATED})
            else:
                refused(data)
            TALLY["trailing"] += 1
    assert TALLY["trailing"] >= QUOTA["trailing"]


def test_field_structure_errors() -> None:
    """Duplicates, missing required fields, order, flags, empty optional
    fields, unknown required fields; unknown optional fields are skipped."""
    rng = random.Random(16)
    skipped = 0
    for _ in range(2000):
        f = random_fields(rng, queues=16)
        tlvs = ref_tlvs(f)
        wire = pack(tlvs)
        k = rng.randrange(len(tlvs))
        # A field twice in a row, or the copy at the end.
        refused(pack(tlvs[:k + 1] + [tlvs[k]] + tlvs[k + 1:]), {lib.XO_E_DUPLICATE})
        refused(pack(tlvs + [tlvs[k]]), {lib.XO_E_DUPLICATE})
        # ... or anywhere: either it is seen twice or out of order first.
        j = rng.randrange(len(tlvs) + 1)
        refused(pack(tlvs[:j] + [tlvs[k]] + tlvs[j:]), {lib.XO_E_DUPLICATE, lib.XO_E_FIELD})
        # Required fields left out (any non-empty subset).
        gone = {t for t in REQUIRED if rng.random() < 0.5} or {rng.choice(REQUIRED)}
        refused(pack([x for x in tlvs if x[0] not in gone]), {lib.XO_E_MISSING})
        # Two fields swapped.
        if len(tlvs) > 1:
            a = rng.randrange(len(tlvs) - 1)
            swapped = tlvs[:a] + [tlvs[a + 1], tlvs[a]] + tlvs[a + 2:]
            refused(pack(swapped), {lib.XO_E_FIELD})
        # A known field with the other optional bit, or unknown flag bits.
        t, fl, v = tlvs[k]
        refused(pack(tlvs[:k] + [(t, fl ^ OPTIONAL, v)] + tlvs[k + 1:]), {lib.XO_E_FIELD})
        junk = rng.randint(1, 0x7FFF) << 1
        refused(pack(tlvs[:k] + [(t, fl | junk, v)] + tlvs[k + 1:]), {lib.XO_E_FIELD})
        # An optional field present but empty (the encoder leaves it out).
        empty = rng.choice([F_SENDQ, F_RECVQ, F_APP, F_META])
        value = struct.pack(">I", 0) if empty == F_SENDQ and rng.random() < 0.5 else b""
        if empty == F_SENDQ and not value:
            value = rng.randbytes(rng.randint(0, 3))
        plain = ref_tlvs(replace(f, inflight=b"", unsent=b"", recvq=b"", app=b"", meta=b""))
        plain.insert(4, tlv(empty, value))
        refused(pack(plain), {lib.XO_E_LENGTH})
        # Unknown types: required ones are refused, optional ones skipped.
        utype = rng.choice([0, F_MAX + 1, rng.randint(F_MAX + 1, 0xFFFF)])
        uval = rng.randbytes(rng.choice([0, 1, 8, rng.randint(0, 200)]))
        j = rng.randrange(len(tlvs) + 1)
        refused(pack(tlvs[:j] + [(utype, 0, uval)] + tlvs[j:]), {lib.XO_E_FIELD})
        refused(pack(tlvs[:j] + [(utype, OPTIONAL | junk, uval)] + tlvs[j:]), {lib.XO_E_FIELD})
        TALLY["structure"] += 10
        extra = [(rng.choice([0, rng.randint(F_MAX + 1, 0xFFFF)]), OPTIONAL, rng.randbytes(9))
                 for _ in range(rng.randint(0, 3))]
        data = pack(tlvs[:j] + [(utype, OPTIONAL, uval)] + extra + tlvs[j:])
        state = TcpState.decode(data)
        assert fields_of(state) == f
        assert state.encode() == wire
        skipped += 1
    assert skipped == 2000
    assert TALLY["structure"] >= QUOTA["structure"]


def bad_values(rng: random.Random) -> Iterable[tuple[Callable[[Fields], Fields], str]]:
    """Field values out of range: (mutation of a valid state, reason)."""

    def ep_with(ep: Ep, **kw: Any) -> Ep:
        return replace(ep, **kw)

    yield (lambda f: replace(f, local=ep_with(f.local, port=0)), "local port 0")
    yield (lambda f: replace(f, remote=ep_with(f.remote, port=0)), "remote port 0")
    yield (lambda f: replace(f, local=ep_with(f.local, v6=not f.local.v6)), "families differ")
    yield (lambda f: replace(f, options=rng.randint(8, 255)), "option bits")
    yield (lambda f: replace(f, options=f.options | OPT_WSCALE,
                             snd_wscale=rng.randint(15, 255)), "snd wscale > 14")
    yield (lambda f: replace(f, options=f.options | OPT_WSCALE,
                             rcv_wscale=rng.randint(15, 255)), "rcv wscale > 14")
    yield (lambda f: replace(f, options=f.options & ~OPT_WSCALE,
                             rcv_wscale=rng.randint(1, 14)), "wscale not negotiated")
    yield (lambda f: replace(f, mss_clamp=rng.choice([0, 65536, U32, rng.randint(65536, U32)])),
           "mss")
    v4 = random_ep(rng, False)
    yield (lambda f: replace(f, local=ep_with(v4, scope_id=rng.randint(1, U32)),
                             remote=random_ep(rng, False)), "IPv4 with a scope id")
    pos = rng.randint(4, 15)
    yield (lambda f: replace(f, local=random_ep(rng, False),
                             remote=ep_with(v4, addr=v4.addr[:pos] + b"\x01" + v4.addr[pos + 1:])),
           "IPv4 with IPv6 bytes")


def test_field_values_out_of_range() -> None:
    rng = random.Random(17)
    for _ in range(800):
        f = random_fields(rng, queues=8)
        for mutate, why in bad_values(rng):
            g = mutate(f)
            assert g != f, why
            refused(ref_encode(g), {lib.XO_E_FIELD})
            TALLY["value"] += 1
        # Encoded endpoint families other than 4 and 6, and the reserved
        # options byte.
        tlvs = ref_tlvs(f)
        fam = rng.choice([0, 1, 5, 10, rng.randint(7, 0xFFFF)])
        which = rng.choice([0, 24])
        eps = bytearray(tlvs[0][2])
        eps[which:which + 2] = struct.pack(">H", fam)
        refused(pack([tlv(F_ENDPOINTS, bytes(eps))] + tlvs[1:]), {lib.XO_E_FIELD})
        opts = bytearray(tlvs[3][2])
        opts[3] = rng.randint(1, 255)
        refused(pack(tlvs[:3] + [tlv(F_OPTIONS, bytes(opts))] + tlvs[4:]), {lib.XO_E_FIELD})
        TALLY["value"] += 2
    assert TALLY["value"] >= QUOTA["value"]


def test_header_versions_magic_and_flags() -> None:
    """Every other version is refused as a version mismatch (newer senders
    above all), before anything else in the input is looked at."""
    rng = random.Random(18)
    tlvs = ref_tlvs(FULL)
    for version in range(0x10000):
        if version == VERSION:
            continue
        # The rest of the input may even be garbage: the version comes first.
        body = tlvs if version & 1 else [(rng.getrandbits(16), 0, b"")]
        refused(pack(body, version=version), {lib.XO_E_VERSION})
        TALLY["version"] += 1
    for _ in range(500):
        magic = rng.randbytes(4)
        if magic != MAGIC:
            refused(pack(tlvs, magic=magic), {lib.XO_E_BAD_MAGIC})
        refused(pack(tlvs, hflags=rng.randint(1, 0xFFFF)), {lib.XO_E_FIELD})
        TALLY["version"] += 2
    assert TALLY["version"] >= QUOTA["version"]


def test_size_limits() -> None:
    """Queues and blobs over the limits are refused as too large, before any
    allocation of that size."""
    base = ref_tlvs(V4)
    cases = [
        (F_META, bytes(lib.XO_MAX_META_BYTES + 1)),
        (F_APP, bytes(lib.XO_MAX_APP_BYTES + 1)),
        (F_RECVQ, bytes(lib.XO_MAX_QUEUE_BYTES + 1)),
        (F_SENDQ, struct.pack(">I", 5) + bytes(lib.XO_MAX_QUEUE_BYTES + 1)),
    ]
    for ftype, value in cases:
        refused(pack(base + [tlv(ftype, value)]), {lib.XO_E_TOO_LARGE})
    # At the limits themselves it decodes.
    state = TcpState.decode(pack(base + [tlv(F_APP, bytes(lib.XO_MAX_APP_BYTES))]))
    assert state.app_len == lib.XO_MAX_APP_BYTES


def test_failed_decode_leaves_the_state_empty() -> None:
    """The C contract: on failure st is left empty (its buffers freed), with
    a sentence in xo_last_error()."""
    rng = random.Random(19)
    samples = corpus(19, 20, queues=64)
    st_ = ffi.new("struct xo_tcp_state *")
    zero = bytes(ffi.sizeof("struct xo_tcp_state"))
    failures = 0
    for i in range(3000):
        wire = samples[i % len(samples)]
        # Damage late in the input, so earlier fields were decoded (and
        # their buffers allocated) before the failure.
        data = wire[:-1] if i % 2 else flip(wire, [rng.randrange(len(wire) * 8)])
        ffi.memmove(st_, zero, len(zero))
        code = lib.xo_state_decode(data, len(data), st_)
        if code == 0:
            lib.xo_state_release(st_)
            continue
        failures += 1
        assert code in DECODE_CODES
        assert ffi.string(lib.xo_last_error())
        assert bytes(ffi.buffer(st_)) == zero
    assert failures > 1500
    assert lib.xo_state_decode(ffi.NULL, 0, st_) == lib.XO_E_INVAL


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        state = TcpState.decode(data)
    except XoDecodeError as err:
        message_of(err)
    else:
        assert state.encode() == without_unknown(data)


@settings(max_examples=300, deadline=None)
@given(valid_fields(), st.data())
def test_hypothesis_mutations(f: Fields, data: st.DataObject) -> None:
    """Structure-aware mutants: overwrite, insert or delete a run of bytes."""
    wire = ref_encode(f)
    pos = data.draw(st.integers(0, len(wire)))
    run = data.draw(st.binary(min_size=1, max_size=16))
    kind = data.draw(st.sampled_from(["overwrite", "insert", "delete"]))
    if kind == "overwrite":
        mutant = wire[:pos] + run + wire[pos + len(run):]
    elif kind == "insert":
        mutant = wire[:pos] + run + wire[pos:]
    else:
        mutant = wire[:pos] + wire[pos + len(run):]
    if mutant != wire:
        refuse_or_canonical(mutant)


def test_malformed_total_is_asserted() -> None:
    """The sweeps above each assert their count against QUOTA; together they
    generate at least 100,000 refused inputs, even without the version sweep."""
    assert sum(n for k, n in QUOTA.items() if k != "version") >= 100_000


# ---- libFuzzer harness (tests/fuzz/fuzz_state_decode.c) -----------------------------

FUZZ_SECONDS = int(os.environ.get("XO_FUZZ_SECONDS", "10"))
# The codec's sources only: the harness needs no libbpf/libmnl.
FUZZ_SOURCES = ["state_codec.c", "tcp_repair.c", "tls.c", "secret.c", "endpoint.c", "error.c"]


def build_fuzzer(harness: str, sources: list[str], libs: list[str], out: Path) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed")
    probe = out / "probe.c"
    probe.write_text("#include <stddef.h>\n#include <stdint.h>\n"
                     "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)"
                     "{ (void)d; (void)n; return 0; }\n")
    if subprocess.run([clang, "-fsanitize=fuzzer", str(probe), "-o", str(out / "probe")],
                      capture_output=True).returncode:
        pytest.skip("clang lacks libFuzzer support")
    exe = out / Path(harness).stem
    cmd = [clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
           "-fno-sanitize-recover=undefined", "-D_GNU_SOURCE", "-std=gnu11",
           f"-I{ROOT / 'xo_core/include'}", f"-I{ROOT / 'xo_core/src'}",
           str(ROOT / "tests/fuzz" / harness),
           *(str(ROOT / "xo_core/src" / s) for s in sources), *libs, "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe


def run_fuzzer(exe: Path, seeds: list[bytes], out: Path) -> str:
    work = out / "corpus"
    work.mkdir()
    for i, seed in enumerate(seeds):
        (work / f"seed{i}").write_bytes(seed)
    res = subprocess.run(
        [str(exe), f"-max_total_time={FUZZ_SECONDS}", "-runs=5000000", "-seed=1",
         "-max_len=4096", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
         f"-artifact_prefix={out}/", str(work)],
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 60, cwd=out,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Done" in res.stderr, res.stderr[-2000:]
    return res.stderr


def test_libfuzzer_state_decode(tmp_path: Path) -> None:
    exe = build_fuzzer("fuzz_state_decode.c", FUZZ_SOURCES, ["-lcrypto"], tmp_path)
    rng = random.Random(20)
    seeds = [ref_encode(FULL), ref_encode(V6)] + [ref_encode(random_fields(rng, queues=40))
                                                  for _ in range(30)]
    stats = run_fuzzer(exe, seeds, tmp_path)
    runs = [ln for ln in stats.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 10_000
