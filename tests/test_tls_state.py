"""TLS record state in the core (xo_core/src/tls.c, the codec's TLS field):
round trips for every cipher, version and direction set; every malformed
state refused with its own clear error before any socket is touched; keys
kept out of reprs. No kernel TLS needed (test_ktls_lane.py has the real
thing); on this kernel restore fails cleanly at TCP_ULP.

The TLS field (type 10, flags 0: never skippable), as documented in
state_codec.c:

    version u16 | cipher u16 | directions u8 | key len u8 | IV len u8
    | salt len u8 | per direction (TX first): key | IV | salt | rec_seq u64
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct

import pytest
from test_codec import message_of
from xo import core
from xo._xo_cffi import lib
from xo.core import TLS_SIZES, TcpState, TlsDir, TlsState, XoDecodeError, XoError

CIPHERS = [core.TLS_AES_GCM_128, core.TLS_AES_GCM_256, core.TLS_CHACHA20_POLY1305]
VERSIONS = [core.TLS_1_2, core.TLS_1_3]
F_TLS = 10


def tls_state(cipher: int, version: int, tx: bool = True, rx: bool = True,
              seed: int = 0, tx_seq: int = 7, rx_seq: int = 5) -> TlsState:
    rng = random.Random(seed)
    key, iv, salt = TLS_SIZES[cipher]

    def one(seq: int) -> TlsDir:
        return TlsDir(rng.randbytes(key), rng.randbytes(iv), rng.randbytes(salt), seq)
    return TlsState(version, cipher, one(tx_seq) if tx else None, one(rx_seq) if rx else None)


@pytest.fixture()
def loopback_pair():
    """A connected loopback pair (server side frozen by the test)."""
    lst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    lst.close()
    yield srv, cli
    srv.close()
    cli.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_state(loopback_pair: tuple[socket.socket, socket.socket]) -> TcpState:
    srv, _cli = loopback_pair
    core.freeze(srv)
    state = core.capture(srv)
    core.resume(srv)
    assert state.tls is None  # a plain socket has none
    return state


def with_tls_field(plain: bytes, value: bytes, flags: int = 0) -> bytes:
    """An encoded state (without TLS) with a TLS field appended."""
    body = plain + struct.pack(">HHI", F_TLS, flags, len(value)) + value
    return body[:8] + struct.pack(">I", len(body)) + body[12:]


def tls_value(version: int, cipher: int, dirs: int, lens: tuple[int, int, int],
              seqs: tuple[int, ...] = (1, 2), seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = struct.pack(">HHBBBB", version, cipher, dirs, *lens)
    for i in range(bin(dirs & 3).count("1")):
        out += rng.randbytes(sum(lens)) + struct.pack(">Q", seqs[i % len(seqs)])
    return out


def refused(data: bytes, code: int, words: str) -> None:
    with pytest.raises(XoDecodeError) as err:
        TcpState.decode(data)
    assert err.value.code == code, err.value
    text = message_of(err.value)
    assert words in text, text


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_every_cipher_version_and_direction(loopback_pair, cipher: int,
                                                       version: int) -> None:
    state = base_state(loopback_pair)
    plain = state.encode()
    key, iv, salt = TLS_SIZES[cipher]
    for tx, rx in ((True, True), (True, False), (False, True)):
        tls = tls_state(cipher, version, tx, rx, seed=cipher + version, tx_seq=2**64 - 2)
        state.tls = tls
        assert state.tls == tls
        data = state.encode()
        per_dir = key + iv + salt + 8
        assert len(data) == len(plain) + 8 + 8 + per_dir * (tx + rx)
        # The field, byte for byte, at the end (type 10 is the last field).
        field = data[len(plain):]
        assert field[:8] == struct.pack(">HHI", F_TLS, 0, 8 + per_dir * (tx + rx))
        assert field[8:16] == struct.pack(">HHBBBB", version, cipher, tx | rx << 1, key, iv,
                                          salt)
        back = TcpState.decode(data)
        assert back.tls == tls and back.encode() == data
        assert "key" not in repr(back) or "bytes>" in repr(back.tls)
        for d in (tls.tx, tls.rx):
            if d is not None:
                assert d.key.hex() not in repr(back.tls) and d.key.hex() not in repr(back)
    state.tls = None
    assert state.encode() == plain


def test_malformed_tls_fields_refused(loopback_pair) -> None:
    plain = base_state(loopback_pair).encode()
    aes = core.TLS_AES_GCM_128
    good = tls_value(core.TLS_1_3, aes, 3, (16, 8, 4))
    assert TcpState.decode(with_tls_field(plain, good)).tls is not None
    # Unknown ciphers (CCM, SM4, ARIA, anything), each with plausible lengths.
    for cipher in (0, 1, 53, 55, 56, 57, 58, 0xFFFF):
        refused(with_tls_field(plain, tls_value(core.TLS_1_2, cipher, 1, (16, 8, 4))),
                lib.XO_E_FIELD, "unknown cipher")
    for version in (0, 0x0301, 0x0302, 0x0305, 0x0403, 0xFFFF):
        refused(with_tls_field(plain, tls_value(version, aes, 1, (16, 8, 4))),
                lib.XO_E_FIELD, "TLS version")
    for dirs in (0, 4, 7, 0x80):
        refused(with_tls_field(plain, tls_value(core.TLS_1_2, aes, dirs, (16, 8, 4))),
                lib.XO_E_FIELD, "direction bits")
    # Wrong lengths for the cipher, every combination off by something.
    for cipher in CIPHERS:
        want = TLS_SIZES[cipher]
        for lens in itertools.product(*[{0, w - 1, w, w + 1, 32, 255} - {-1}
                                        for w in want]):
            if lens == want or min(lens) < 0:
                continue
            refused(with_tls_field(plain, tls_value(core.TLS_1_3, cipher, 3, lens)),
                    lib.XO_E_LENGTH, "key/IV/salt")
        # Right lengths announced, a field too short or too long.
        ok = tls_value(core.TLS_1_2, cipher, 3, want)
        for cut in (1, 8, len(ok) - 8 - 1):
            refused(with_tls_field(plain, ok[:-cut]), lib.XO_E_LENGTH, "TLS field is")
        refused(with_tls_field(plain, ok + b"\0"), lib.XO_E_LENGTH, "TLS field is")
        # Sequence overflow in either direction.
        for seqs in ((2**64 - 1, 3), (3, 2**64 - 1)):
            refused(with_tls_field(plain, tls_value(core.TLS_1_2, cipher, 3, want, seqs)),
                    lib.XO_E_FIELD, "overflows")
        assert TcpState.decode(with_tls_field(
            plain, tls_value(core.TLS_1_2, cipher, 3, want, (2**64 - 2, 0)))).tls is not None
    refused(with_tls_field(plain, good[:7]), lib.XO_E_LENGTH, "header alone")
    # Skippable it is not: the optional flag on field 10 is refused.
    refused(with_tls_field(plain, good, flags=1), lib.XO_E_FIELD, "flags")
    # Twice is a duplicate.
    twice = with_tls_field(with_tls_field(plain, good), good)
    refused(twice, lib.XO_E_DUPLICATE, "twice")


def test_bad_tls_state_refused_by_set_encode_and_restore_before_any_socket(
        loopback_pair) -> None:
    state = base_state(loopback_pair)
    good = tls_state(core.TLS_AES_GCM_256, core.TLS_1_3)
    bad = [
        (TlsState(0x0302, good.cipher, good.tx, good.rx), "version"),
        (TlsState(good.version, 53, good.tx, good.rx), "unknown cipher"),
        (TlsState(good.version, good.cipher, None, None), "direction bits"),
        (TlsState(good.version, core.TLS_AES_GCM_128, good.tx, good.rx), "beyond"),
        (TlsState(good.version, good.cipher,
                  TlsDir(good.tx.key, good.tx.iv + b"\1" * 4, good.tx.salt, 1), None),
         "beyond"),
        (TlsState(good.version, good.cipher, None,
                  TlsDir(good.rx.key, good.rx.iv, good.rx.salt, 2**64 - 1)), "overflows"),
    ]
    for tls, words in bad:
        with pytest.raises(XoError) as err:
            tls.check()
        assert err.value.code == lib.XO_E_FIELD and words in message_of(err.value)
        with pytest.raises(XoError) as err:
            state.tls = tls
        assert err.value.code == lib.XO_E_FIELD
        assert state.tls is None
    # A state with TLS and bytes queued cannot be restored, and nothing was
    # done: no system call, no new descriptor.
    state.tls = good
    queued = TcpState.decode(state.encode())
    queued.app_data = b"x"  # app data is fine; queues are not
    fds = len(os.listdir("/proc/self/fd"))
    srv, cli = loopback_pair
    cli.sendall(b"unread")
    core.freeze(srv)
    with_q = core.capture(srv)
    core.resume(srv)
    assert with_q.recvq == b"unread"
    with_q.tls = good
    with pytest.raises(XoError) as err:
        core.restore(with_q)
    assert err.value.code == lib.XO_E_INVAL and "empty queues" in message_of(err.value)
    assert core.last_syscalls() == 0
    assert len(os.listdir("/proc/self/fd")) == fds


def test_restore_without_kernel_tls_fails_cleanly(loopback_pair) -> None:
    """On a kernel without TLS the restore stops at TCP_ULP with a sentence
    that says so, closes its socket and sent nothing (the socket never left
    repair mode). With tls_user the caller takes the keys: restore works."""
    ok, why = core.tls_kernel_available()
    if ok:
        pytest.skip("this kernel has TLS: tests/test_ktls_lane.py covers it")
    assert "TCP_ULP" in why
    srv, cli = loopback_pair
    core.freeze(srv)
    state = core.capture(srv)
    state.tls = tls_state(core.TLS_CHACHA20_POLY1305, core.TLS_1_2)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(XoError) as err:
        core.restore(state, core.Endpoint("127.0.0.1", free_port()))
    text = message_of(err.value)
    assert "TCP_ULP" in text and "CONFIG_TLS" in text, text
    assert len(os.listdir("/proc/self/fd")) == fds
    # The keys stay with the caller (a user-space record layer): restore on
    # another port while the original is frozen, then discard it.
    other = core.restore(state, core.Endpoint("127.0.0.1", free_port()), tls_user=True)
    assert other.getsockopt(socket.IPPROTO_TCP, 31, 16).rstrip(b"\0") == b""  # no ULP
    core.discard(other)
    core.resume(srv)
    cli.sendall(b"ping")
    assert srv.recv(4) == b"ping"
