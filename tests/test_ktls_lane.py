"""Kernel TLS state moves with the connection (the full-kernel lane: this
machine's kernel has no CONFIG_TLS).

For each cipher (AES-GCM-128, AES-GCM-256, ChaCha20-Poly1305) and version
(TLS 1.2, 1.3): a real TLS session between a peer and a host namespace,
OpenSSL on both ends for the handshake (tests/tls_tools.py); the host then
hands its keys to the kernel (TCP_ULP "tls", TLS_TX and TLS_RX) and talks
through kTLS while the peer keeps OpenSSL. The host's socket is frozen and
captured (the core reads TLS_TX/TLS_RX with the record sequence numbers),
encoded, discarded, and restored in another namespace, where the core
installs kernel TLS again on the restored socket. The peer keeps decrypting
what the new socket sends and the new socket decrypts what the peer sends,
records numbered on from where they were; nobody resets. A capture with a
record still unread is refused and leaves the socket as it was.

All six run in one guest pytest (the lane boots once for every
fullkernel test)."""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_tools import VethPair, connect, queue_sizes, snmp_tcp, wait_for
from tls_tools import NAMES, SUITES, Session, handshake, make_cert
from xo import core
from xo._xo_cffi import lib
from xo.core import TlsDir, TlsState, XoError

pytestmark = pytest.mark.fullkernel

TCP_ULP = 31
SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2


def install_ktls(sock: socket.socket, tls: TlsState) -> None:
    """What an application does to start kernel TLS after its handshake."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    key, iv, salt = core.TLS_SIZES[tls.cipher]
    for opt, d in ((TLS_TX, tls.tx), (TLS_RX, tls.rx)):
        assert d is not None
        info = (struct.pack("=HH", tls.version, tls.cipher) + d.iv.ljust(iv, b"\0")
                + d.key + d.salt + struct.pack(">Q", d.rec_seq))
        assert len(info) == 4 + iv + key + salt + 8
        sock.setsockopt(SOL_TLS, opt, info)


def ulp(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16).rstrip(b"\0")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return out


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def pair() -> Iterator[VethPair]:
    """peer <-> host; the host end moves between namespaces a and b."""
    p = VethPair(socket.AF_INET)
    try:
        yield p.open()
    finally:
        p.close()


def resets(pair: VethPair) -> tuple[int, int]:
    tcp = snmp_tcp(pair.peer_ns)
    return tcp["OutRsts"], tcp["EstabResets"]


def exchange_records(sock: socket.socket, sess: Session, response: str, request: str,
                     base: int, step: int) -> None:
    """Three records each way between a kTLS socket and the peer's OpenSSL
    (each under 16 KiB: one record): `response` (formatted with i) repeated
    base + step * i times, then `request`; each read back whole."""
    for i in range(3):
        msg = response.format(i=i).encode() * (base + step * i)
        sock.sendall(msg)
        assert sess.client.recv_exactly(len(msg)) == msg
        req = request.format(i=i).encode()
        sess.client.send(req)
        assert recv_exactly(sock, len(req)) == req


@pytest.mark.parametrize("cipher", [core.TLS_AES_GCM_128, core.TLS_AES_GCM_256,
                                    core.TLS_CHACHA20_POLY1305],
                         ids=lambda c: NAMES[c])
@pytest.mark.parametrize("version", [core.TLS_1_2, core.TLS_1_3], ids=lambda v: NAMES[v])
def test_ktls_state_moves_to_another_namespace(pair: VethPair, cert: tuple[Path, Path],
                                               tmp_path: Path, version: int,
                                               cipher: int) -> None:
    assert (version, cipher) in SUITES
    peer, host = connect(pair)
    before = resets(pair)
    sess = handshake(peer, host, version, cipher, *cert, tmp_path / "keylog")
    start = 1 if version == core.TLS_1_2 else 0  # TLS 1.2's Finished was record 0
    install_ktls(host, sess.server_state())
    assert ulp(host) == b"tls"

    # Through kTLS on the host, OpenSSL on the peer: 3 records each way.
    exchange_records(host, sess, "response {i} ", "request {i}", 50, 200)
    wait_for(lambda: queue_sizes(host)[1] == 0, "the host's records acknowledged")

    # A record received but not read: no capture (the state would not match).
    sess.client.send(b"unread")
    assert select.select([host], [], [], 10)[0], "record never arrived"
    core.freeze(host)
    with pytest.raises(XoError) as err:
        core.capture(host)
    assert err.value.code == lib.XO_E_BUSY, err.value
    core.resume(host)
    assert recv_exactly(host, 6) == b"unread"

    # Captured (the core reads the kernel's TLS state), restored in the
    # other namespace, where the host's link and address move.
    restored, state = pair.hand_over(host, peer)
    tls = state.tls
    assert tls is not None and (tls.version, tls.cipher) == (version, cipher)
    assert tls.tx is not None and tls.rx is not None
    assert (tls.tx.key, tls.tx.salt) == (sess.server_write.key, sess.server_write.salt)
    assert (tls.rx.key, tls.rx.salt) == (sess.client_write.key, sess.client_write.salt)
    assert tls.tx.rec_seq == start + 3  # three records sent
    assert tls.rx.rec_seq == start + 4  # three requests and "unread"
    assert "key=<" in repr(tls.tx) and tls.tx.key.hex() not in repr(state)
    assert core.TcpState.decode(state.encode()).tls == tls
    assert ulp(restored) == b"tls"

    # The peer's OpenSSL keeps decrypting; the new socket keeps decrypting.
    exchange_records(restored, sess, "after the move {i} ", "request after the move {i}",
                     100, 300)
    wait_for(lambda: queue_sizes(restored)[1] == 0, "the restored socket's records acked")
    # The kernel numbered on from the captured state.
    core.freeze(restored)
    again = core.capture(restored)
    assert again.tls is not None and again.tls.tx is not None and again.tls.rx is not None
    assert (again.tls.tx.rec_seq, again.tls.rx.rec_seq) == (start + 6, start + 7)
    core.resume(restored)
    restored.sendall(b"bye")
    assert sess.client.recv_exactly(3) == b"bye"
    assert resets(pair) == before
    peer.close()
    restored.close()


def read_records(layer: core.TlsRecordLayer, sock: socket.socket, n: int) -> bytes:
    buf, out = b"", b""
    while len(out) < n:
        used, rec = layer.open(buf)
        if rec is None:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            buf += chunk
            continue
        out += rec.data
        buf = buf[used:]
    return out


@pytest.mark.parametrize(("version", "cipher"),
                         [(core.TLS_1_2, core.TLS_AES_GCM_128),
                          (core.TLS_1_3, core.TLS_CHACHA20_POLY1305)],
                         ids=["tls12-aes128", "tls13-chacha"])
def test_ktls_and_the_user_space_record_layer_hand_over_both_ways(
        pair: VethPair, cert: tuple[Path, Path], tmp_path: Path, version: int,
        cipher: int) -> None:
    """kTLS socket -> restored with the keys left to the core's record layer
    (tls_user) -> restored again with kernel TLS; one session throughout."""
    peer, host = connect(pair)
    before = resets(pair)
    sess = handshake(peer, host, version, cipher, *cert, tmp_path / "keylog")
    start = 1 if version == core.TLS_1_2 else 0
    install_ktls(host, sess.server_state())
    host.sendall(b"from kTLS")
    assert sess.client.recv_exactly(9) == b"from kTLS"
    wait_for(lambda: queue_sizes(host)[1] == 0, "acknowledged")

    # kTLS -> user space.
    user, state = pair.hand_over(host, peer, tls_user=True)
    assert state.tls is not None and state.tls.tx is not None
    assert state.tls.tx.rec_seq == start + 1
    assert ulp(user) == b""
    layer = core.TlsRecordLayer(state.tls)
    for i in range(3):
        msg = f"from the core's record layer {i}".encode()
        user.sendall(layer.seal(msg))
        assert sess.client.recv_exactly(len(msg)) == msg
        sess.client.send(b"to the core")
        assert read_records(layer, user, 11) == b"to the core"
    wait_for(lambda: queue_sizes(user)[1] == 0, "acknowledged")

    # user space -> kTLS.
    kernel, _ = pair.hand_over(user, peer, tls=layer.state)
    assert ulp(kernel) == b"tls"
    for _ in range(3):
        kernel.sendall(b"from kTLS again")
        assert sess.client.recv_exactly(15) == b"from kTLS again"
        sess.client.send(b"to kTLS")
        assert recv_exactly(kernel, 7) == b"to kTLS"
    assert resets(pair) == before
    peer.close()
    kernel.close()


def test_ktls_capture_refuses_a_send_queue(pair: VethPair, cert: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    """Unacknowledged records (the peer's ACKs dropped) are bytes the core
    cannot read back from a kTLS socket: refused, socket unchanged."""
    peer, host = connect(pair)
    sess = handshake(peer, host, core.TLS_1_3, core.TLS_AES_GCM_128, *cert,
                     tmp_path / "keylog")
    install_ktls(host, sess.server_state())
    pair.block()
    try:
        host.sendall(b"in flight " * 100)
        wait_for(lambda: queue_sizes(host)[1] > 0, "bytes in the send queue")
        core.freeze(host)
        with pytest.raises(XoError) as err:
            core.capture(host)
        assert err.value.code == lib.XO_E_BUSY and "nothing queued" in str(err.value)
        core.resume(host)
    finally:
        pair.unblock()
    assert sess.client.recv_exactly(1000) == b"in flight " * 100
    peer.close()
    host.close()


def test_restore_refuses_bad_tls_before_any_socket(pair: VethPair) -> None:
    """On the real kernel too: a malformed TLS state never reaches a socket."""
    peer, host = connect(pair)
    core.freeze(host)
    state = core.capture(host)
    core.resume(host)
    bad = TlsState(core.TLS_1_3, core.TLS_AES_GCM_128,
                   TlsDir(bytes(16), bytes(8), bytes(4), 2**64 - 1), None)
    with pytest.raises(XoError) as err:
        state.tls = bad
    assert err.value.code == lib.XO_E_FIELD and "overflows" in str(err.value)
    peer.close()
    host.close()
