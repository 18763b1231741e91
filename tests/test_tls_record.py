"""The core's TLS record layer in user space (xo_core/src/tls_record.c) and
the record state from OpenSSL's key log (xo_tls13_state / xo_tls12_state),
against OpenSSL itself: for every cipher and version, a real session
(Python ssl, tests/tls_tools.py); the core's keys equal an independent
derivation here, OpenSSL decrypts what the core seals and the core opens
what OpenSSL writes. Then the session moves without kernel TLS: OpenSSL's
end of a TCP connection is frozen, captured with its record state (keys
from the key log, record numbers counted), restored in another namespace
and continued by the core's record layer; then moved back and continued
again. The peer's OpenSSL never notices; nobody resets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import VethPair, connect, queue_sizes, snmp_tcp, wait_for
from test_codec import message_of
from tls_tools import NAMES, SUITES, Session, handshake, make_cert
from xo import core
from xo._xo_cffi import lib
from xo.core import TlsRecordLayer, TlsState, XoError

COMBOS = list(SUITES)
IDS = [f"{NAMES[v]}-{NAMES[c]}" for v, c in COMBOS]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("cert"))


def keylog(path: Path) -> dict[str, bytes]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or len(line.split()) != 3:
            continue
        label, client_random, secret = line.split()
        out[label] = bytes.fromhex(secret)
        out["client_random"] = bytes.fromhex(client_random)
    return out


def core_state(sess: Session, log: Path, server_random: bytes, tx_seq: int,
               rx_seq: int) -> TlsState:
    """The server's record state as the core derives it from the key log."""
    k = keylog(log)
    if sess.version == core.TLS_1_3:
        return core.tls13_state(sess.cipher, k["CLIENT_TRAFFIC_SECRET_0"],
                                k["SERVER_TRAFFIC_SECRET_0"], True, tx_seq, rx_seq)
    return core.tls12_state(sess.cipher, k["CLIENT_RANDOM"], k["client_random"],
                            server_random, True, tx_seq, rx_seq)


def read_records(layer: TlsRecordLayer, sock: socket.socket, n: int) -> bytes:
    """n plaintext bytes through the core's record layer."""
    buf, out = b"", b""
    while len(out) < n:
        used, rec = layer.open(buf)
        if rec is None:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            buf += chunk
            continue
        assert rec.type == TlsRecordLayer.APPLICATION_DATA
        out += rec.data
        buf = buf[used:]
    assert buf == b""
    return out


@pytest.mark.parametrize(("version", "cipher"), COMBOS, ids=IDS)
def test_record_layer_talks_with_openssl(cert: tuple[Path, Path], tmp_path: Path,
                                         version: int, cipher: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        sess = handshake(a, b, version, cipher, *cert, tmp_path / "keylog")
        start = 1 if version == core.TLS_1_2 else 0
        state = core_state(sess, tmp_path / "keylog", sess.server_random, start, start)
        # Two derivations agree: the core's (C, OpenSSL's KDFs) and tls_tools'.
        assert state == sess.server_state()
        layer = TlsRecordLayer(state)
        for size in (0, 1, 100, 16384, 40_000):
            msg = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            b.sendall(layer.seal(msg))
            assert sess.client.recv_exactly(len(msg)) == msg
            sess.client.send(msg[::-1] or b"!")
            assert read_records(layer, b, len(msg) or 1) == (msg[::-1] or b"!")
        records = 1 + 1 + 1 + 1 + 3  # 0 bytes is one empty record; 40 000 is three
        assert layer.state.tx.rec_seq == start + records
        assert layer.state.rx.rec_seq == start + records  # OpenSSL splits the same way
        # A tampered record: refused, nothing moves.
        sess.client.send(b"tamper with me")
        raw = b.recv(65536)
        bad = bytearray(raw)
        bad[-20] ^= 1
        before = layer.state
        with pytest.raises(XoError) as err:
            layer.open(bytes(bad))
        assert err.value.code == lib.XO_E_AUTH and "does not verify" in message_of(err.value)
        assert layer.state == before
        used, rec = layer.open(raw)
        assert used == len(raw) and rec is not None and rec.data == b"tamper with me"
        # An alert (close_notify) arrives as one.
        b.sendall(layer.seal(b"\x01\x00", TlsRecordLayer.ALERT))
        with pytest.raises(ssl_error()):
            sess.client.recv_exactly(1)


def ssl_error() -> tuple[type[BaseException], ...]:
    import ssl
    return (ssl.SSLZeroReturnError, ssl.SSLEOFError)


def test_record_layer_refuses_what_it_cannot_do() -> None:
    one_way = TlsState(core.TLS_1_3, core.TLS_AES_GCM_128,
                       core.TlsDir(bytes(16), bytes(8), bytes(4), 0), None)
    with pytest.raises(XoError) as err:
        TlsRecordLayer(one_way)
    assert err.value.code == lib.XO_E_INVAL and "both directions" in message_of(err.value)
    both = TlsState(one_way.version, one_way.cipher, one_way.tx, one_way.tx)
    layer = TlsRecordLayer(both)
    with pytest.raises(XoError) as err:
        layer.seal(b"x", 99)
    assert err.value.code == lib.XO_E_FIELD
    # Records announcing more than TLS allows, or not protected, are refused.
    for head in (b"\x17\x03\x03\x41\x01", b"\x16\x03\x03\x00\x20", b"\x17\x03\x01\x00\x20"):
        with pytest.raises(XoError):
            layer.open(head + bytes(40))
    assert layer.open(b"\x17\x03\x03\x00\x20" + bytes(10)) == (0, None)  # not whole yet
    with pytest.raises(XoError) as err:
        core.tls13_state(core.TLS_AES_GCM_256, bytes(32), bytes(32), True, 0, 0)
    assert "48" in message_of(err.value)


# ---- a session kept in user space moves without kernel TLS -------------------------


@pytest.fixture()
def pair() -> Iterator[VethPair]:
    p = VethPair(socket.AF_INET)
    try:
        yield p.open()
    finally:
        p.close()


@pytest.mark.parametrize(("version", "cipher"),
                         [(core.TLS_1_2, core.TLS_AES_GCM_256),
                          (core.TLS_1_3, core.TLS_CHACHA20_POLY1305),
                          (core.TLS_1_3, core.TLS_AES_GCM_128)],
                         ids=["tls12-aes256", "tls13-chacha", "tls13-aes128"])
def test_openssl_session_moves_and_the_core_carries_it_on(pair: VethPair,
                                                         cert: tuple[Path, Path],
                                                         tmp_path: Path, version: int,
                                                         cipher: int) -> None:
    peer, host = connect(pair)
    rst = snmp_tcp(pair.peer_ns)
    sess = handshake(peer, host, version, cipher, *cert, tmp_path / "keylog")
    server = sess.server
    server.count_records()
    start = 1 if version == core.TLS_1_2 else 0
    for i in range(3):  # OpenSSL on both ends first
        server.send(f"response {i}".encode() * 100)
        assert sess.client.recv_exactly(len(f"response {i}") * 100)
        sess.client.send(f"request {i}".encode())
        assert server.recv_exactly(len(f"request {i}")) == f"request {i}".encode()
    wait_for(lambda: queue_sizes(host)[1] == 0, "OpenSSL's records acknowledged")
    # A record boundary with nothing pending: hand off.
    assert server.sent and server.received
    assert server.sent.at_boundary and server.received.at_boundary
    assert server.obj.pending() == 0 and server.inc.pending == 0
    tls = core_state(sess, tmp_path / "keylog", sess.server_random,
                     start + server.sent.records, start + server.received.records)
    restored, state = pair.hand_over(host, peer, tls=tls, tls_user=True)
    assert state.recvq_len == 0 and state.inflight_len == 0

    # The core's record layer carries on; a few exchanges, then back again.
    for hop in range(3):
        layer = TlsRecordLayer(tls)
        for i in range(3):
            msg = f"hop {hop} response {i} ".encode() * (10 + 500 * i)
            restored.sendall(layer.seal(msg))
            assert sess.client.recv_exactly(len(msg)) == msg
            req = f"hop {hop} request {i}".encode()
            sess.client.send(req)
            assert read_records(layer, restored, len(req)) == req
        wait_for(lambda s=restored: queue_sizes(s)[1] == 0, "records acknowledged")
        tls = layer.state
        restored, _ = pair.hand_over(restored, peer, tls=tls, tls_user=True)
    assert snmp_tcp(pair.peer_ns)["OutRsts"] == rst["OutRsts"]
    assert snmp_tcp(pair.peer_ns)["EstabResets"] == rst["EstabResets"]
    peer.close()
    restored.close()
