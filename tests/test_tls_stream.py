"""The core's sans-I/O TLS stream (xo_core/src/tls_stream.c), which the
nginx module uses to continue a handed-off TLS session on a non-blocking
socket: ciphertext arriving in pieces of any size (partial headers,
partial records), output sealed ahead and sent in pieces, the state to
hand off only at a record boundary with nothing held, alerts and records
it cannot take. Both ends are streams over mirrored states of one session,
for TLS 1.2 and 1.3 and every cipher; the record layer itself is checked
against OpenSSL in tests/test_tls_record.py."""

from __future__ import annotations

import os
import random

import pytest
from xo import core
from xo._xo_cffi import ffi, lib
from xo.core import TlsRecordLayer, TlsState

COMBOS = [(v, c) for v in (core.TLS_1_2, core.TLS_1_3)
          for c in (core.TLS_AES_GCM_128, core.TLS_AES_GCM_256, core.TLS_CHACHA20_POLY1305)]


def states(version: int, cipher: int, seq: int = 3) -> tuple[TlsState, TlsState]:
    """(server, client) record states of one made-up session."""
    if version == core.TLS_1_3:
        cs, ss = os.urandom(48 if cipher == core.TLS_AES_GCM_256 else 32), os.urandom(
            48 if cipher == core.TLS_AES_GCM_256 else 32)
        return (core.tls13_state(cipher, cs, ss, True, seq, seq + 1),
                core.tls13_state(cipher, cs, ss, False, seq + 1, seq))
    master, cr, sr = os.urandom(48), os.urandom(32), os.urandom(32)
    return (core.tls12_state(cipher, master, cr, sr, True, seq, seq + 1),
            core.tls12_state(cipher, master, cr, sr, False, seq + 1, seq))


class Stream:
    def __init__(self, state: TlsState) -> None:
        c = ffi.new("struct xo_tls_state *")
        state.to_c(c)
        out = ffi.new("struct xo_tls_stream **")
        assert lib.xo_tls_stream_new(c, out) == 0, ffi.string(lib.xo_last_error())
        self.s = ffi.gc(out[0], lib.xo_tls_stream_free)

    def feed(self, data: bytes) -> None:
        room = ffi.new("size_t *")
        while data:
            p = lib.xo_tls_stream_in_space(self.s, room)
            assert room[0] > 0
            n = min(room[0], len(data))
            ffi.memmove(p, data[:n], n)
            assert lib.xo_tls_stream_in_commit(self.s, n) == 0
            data = data[n:]

    def read(self, cap: int = 100000) -> tuple[int, bytes, bool]:
        buf = ffi.new("uint8_t[]", cap)
        closed = ffi.new("int *")
        n = lib.xo_tls_stream_read(self.s, buf, cap, closed)
        return int(n), bytes(ffi.buffer(buf, max(int(n), 0))), bool(closed[0])

    def read_all(self) -> bytes:
        out = b""
        while True:
            n, data, _ = self.read(random.choice([1, 100, 5000, 100000]))
            if n <= 0:
                return out
            out += data

    def write(self, data: bytes) -> int:
        return int(lib.xo_tls_stream_write(self.s, data, len(data)))

    def out(self) -> bytes:
        n = ffi.new("size_t *")
        p = lib.xo_tls_stream_out(self.s, n)
        return bytes(ffi.buffer(p, n[0]))

    def sent(self, n: int) -> None:
        assert lib.xo_tls_stream_sent(self.s, n) == 0

    def state(self) -> int:
        st = ffi.new("struct xo_tls_state *")
        return int(lib.xo_tls_stream_get_state(self.s, st))


@pytest.mark.parametrize(("version", "cipher"), COMBOS)
def test_pieces_of_any_size(version: int, cipher: int) -> None:
    server, client = states(version, cipher)
    a, b = Stream(server), Stream(client)
    rng = random.Random(version * 100 + cipher)
    body = os.urandom(300000)
    assert a.state() == 0 and b.state() == 0
    got, off = b"", 0
    while off < len(body) or a.out():
        if off < len(body):
            off += a.write(body[off:off + rng.choice([1, 700, 16384, 40000, 200000])])
        out = a.out()
        assert out, "a write that took nothing left nothing to send"
        assert a.state() == lib.XO_E_BUSY  # sealed, not sent
        piece = out[:rng.choice([1, 3, 5, 6, 1000, 17000, len(out)])]
        a.sent(len(piece))
        for k in range(0, len(piece), 4096):
            b.feed(piece[k:k + 4096])
            got += b.read_all()
    assert got == body
    assert a.state() == 0 and b.state() == 0
    # the other way, then both carry on from the states they give
    assert b.write(b"GET / HTTP/1.1\r\n\r\n") == 18
    rec = b.out()
    b.sent(len(rec))
    a.feed(rec[:4])
    assert a.read()[0] == 0 and a.state() == lib.XO_E_BUSY  # half a header
    a.feed(rec[4:])
    n, data, _ = a.read(4)
    assert data == b"GET " and a.state() == lib.XO_E_BUSY  # plaintext unread
    assert a.read_all() == b"/ HTTP/1.1\r\n\r\n" and a.state() == 0


def test_state_carries_on() -> None:
    """The state a stream gives continues in a new stream (the next owner)."""
    server, client = states(core.TLS_1_3, core.TLS_AES_GCM_128)
    a, b = Stream(server), Stream(client)
    assert a.write(b"x" * 20000) == 20000
    b.feed(a.out())
    a.sent(len(a.out()))
    assert b.read_all() == b"x" * 20000
    st = ffi.new("struct xo_tls_state *")
    assert lib.xo_tls_stream_get_state(a.s, st) == 0
    assert (st.tx.rec_seq, st.rx.rec_seq) == (3 + 2, 4)
    a2 = Stream(TlsState.from_c(st))
    a2.write(b"after the handoff")
    b.feed(a2.out())
    assert b.read_all() == b"after the handoff"
    b.write(b"next request")
    a2.feed(b.out())
    assert a2.read_all() == b"next request"


def test_alert_closes_and_bad_records_end_the_session() -> None:
    server, client = states(core.TLS_1_2, core.TLS_AES_GCM_256)
    a, b = Stream(server), Stream(client)
    peer = TlsRecordLayer(client)
    a.feed(peer.seal(b"last") + peer.seal(b"\x01\x00", type=TlsRecordLayer.ALERT))
    assert a.read() == (4, b"last", False)
    n, _, closed = a.read()
    assert (n, closed) == (0, True)
    assert a.state() == lib.XO_E_STATE
    # an altered record: the session ends, every later call says so
    b.feed(b"\x17\x03\x03\x00\x20" + os.urandom(32))
    assert b.read()[0] == lib.XO_E_AUTH
    assert b.read()[0] == lib.XO_E_AUTH
    assert b.write(b"x") == lib.XO_E_AUTH
    # a handshake record (KeyUpdate, renegotiation) is not taken
    c = Stream(server)
    c.feed(TlsRecordLayer(client).seal(b"\x18\x00\x00\x01\x00", type=22))
    assert c.read()[0] == lib.XO_E_UNSUPPORTED
