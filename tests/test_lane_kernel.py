"""What the full-kernel lane promises beyond flower (docs/vmlane.md): Debian's
6.1 kernel, modules loaded on demand through the lane's modprobe wrapper, and
kernel TLS, which this machine's kernel lacks (no CONFIG_TLS). A record the
kernel encrypts is decrypted here with the key given to it.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from xo.lab import in_netns, scoped_namespaces

pytestmark = pytest.mark.fullkernel

TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_1_2_VERSION = 0x0303
TLS_CIPHER_AES_GCM_128 = 51


@pytest.fixture
def netns() -> Iterator[str]:
    with scoped_namespaces([f"xo-ktls-{secrets.token_hex(3)}"]) as (name,):
        yield name


def test_lane_runs_debians_6_1_kernel() -> None:
    assert os.uname().release.startswith("6.1.0-")
    assert os.uname().release.endswith("-amd64")


def test_ktls_encrypts_what_the_key_decrypts(netns: str) -> None:
    key, iv, salt = os.urandom(16), os.urandom(8), os.urandom(4)
    plaintext = b"kernel TLS in the lane"
    with in_netns(netns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
    with listener, client:
        server, _ = listener.accept()
        with server:
            server.settimeout(10)
            # Loads the tls module on demand (the lane's modprobe wrapper).
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            info = struct.pack("=HH8s16s4s8s", TLS_1_2_VERSION, TLS_CIPHER_AES_GCM_128,
                               iv, key, salt, bytes(8))
            client.setsockopt(SOL_TLS, TLS_TX, info)
            client.sendall(plaintext)
            want = 5 + 8 + len(plaintext) + 16  # header, explicit nonce, data, tag
            record = b""
            while len(record) < want:
                chunk = server.recv(want - len(record))
                assert chunk, "connection closed"
                record += chunk
    ctype, version, length = struct.unpack("!BHH", record[:5])
    assert (ctype, version, length) == (23, TLS_1_2_VERSION, want - 5)
    assert plaintext not in record
    nonce = record[5:13]
    assert nonce == iv  # the first record's explicit nonce is the IV given
    aad = bytes(8) + struct.pack("!BHH", 23, TLS_1_2_VERSION, len(plaintext))
    assert AESGCM(key).decrypt(salt + nonce, record[13:], aad) == plaintext
