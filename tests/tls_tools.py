"""A real TLS session between two sockets for the TLS tests: Python's ssl
(OpenSSL) on both ends through memory BIOs, so every handshake byte is seen
here; the traffic keys derived from OpenSSL's key log (TLS 1.3: traffic
secrets and HKDF-Expand-Label, RFC 8446 §7.3; TLS 1.2: master secret and the
PRF's key expansion, RFC 5246 §6.3 / RFC 7905), in the form the kernel's
TLS (and the core's xo_tls_state) takes them."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import hmac
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import NameOID
from xo import core
from xo.core import TlsDir, TlsState
from xo.tls import RecordCounter

# (version, cipher) -> (TLS 1.2 cipher string or TLS 1.3 suite, hash)
SUITES: dict[tuple[int, int], tuple[str, str]] = {
    (core.TLS_1_2, core.TLS_AES_GCM_128): ("ECDHE-ECDSA-AES128-GCM-SHA256", "sha256"),
    (core.TLS_1_2, core.TLS_AES_GCM_256): ("ECDHE-ECDSA-AES256-GCM-SHA384", "sha384"),
    (core.TLS_1_2, core.TLS_CHACHA20_POLY1305): ("ECDHE-ECDSA-CHACHA20-POLY1305", "sha256"),
    (core.TLS_1_3, core.TLS_AES_GCM_128): ("TLS_AES_128_GCM_SHA256", "sha256"),
    (core.TLS_1_3, core.TLS_AES_GCM_256): ("TLS_AES_256_GCM_SHA384", "sha384"),
    (core.TLS_1_3, core.TLS_CHACHA20_POLY1305): ("TLS_CHACHA20_POLY1305_SHA256", "sha256"),
}
NAMES = {core.TLS_1_2: "tls12", core.TLS_1_3: "tls13", core.TLS_AES_GCM_128: "aes128",
         core.TLS_AES_GCM_256: "aes256", core.TLS_CHACHA20_POLY1305: "chacha"}


def make_cert(dirpath: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key (EC: fast even under TCG)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xo-tls-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    certfile, keyfile = dirpath / "cert.pem", dirpath / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def _set_tls13_suites(ctx: ssl.SSLContext, suites: str) -> None:
    """Python's ssl cannot pick TLS 1.3 suites; OpenSSL can. The SSL_CTX
    pointer follows the object header of _ssl's context object (checked
    against the options both report)."""
    lib = ctypes.CDLL("libssl.so.3")
    ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    if lib.SSL_CTX_get_options(ptr) != ctx.options:
        raise RuntimeError("cannot find the SSL_CTX of an SSLContext")
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    if lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()) != 1:
        raise RuntimeError(f"SSL_CTX_set_ciphersuites({suites}) failed")


def contexts(version: int, cipher: int, certfile: Path, keyfile: Path,
             keylog: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    suite, _ = SUITES[(version, cipher)]
    tls_version = ssl.TLSVersion.TLSv1_3 if version == core.TLS_1_3 else ssl.TLSVersion.TLSv1_2
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certfile, keyfile)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certfile)
    client.check_hostname = False
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = tls_version
        if version == core.TLS_1_3:
            _set_tls13_suites(ctx, suite)
        else:
            ctx.set_ciphers(suite)
    server.num_tickets = 0  # no NewSessionTicket records after the handshake
    client.keylog_filename = str(keylog)
    return client, server


@dataclass
class Endpoint:
    """One end of the session: its socket, its SSLObject and BIOs, and the
    records it sent and received since the handshake."""
    sock: socket.socket
    obj: ssl.SSLObject
    inc: ssl.MemoryBIO
    out: ssl.MemoryBIO
    sent: RecordCounter | None = None
    received: RecordCounter | None = None

    def flush(self) -> bytes:
        data = self.out.read()
        if data:
            self.sock.sendall(data)
            if self.sent is not None:
                self.sent.add(data)
        return data

    def count_records(self) -> None:
        """Start counting (after the handshake)."""
        self.sent, self.received = RecordCounter(), RecordCounter()

    def feed(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        finally:
            self.sock.settimeout(10)
        if not data:
            raise ConnectionError("peer closed during the handshake")
        self.inc.write(data)
        return True

    def send(self, data: bytes) -> None:
        """Encrypt with OpenSSL and send."""
        self.obj.write(data)
        self.flush()

    def recv_exactly(self, n: int) -> bytes:
        """Receive and decrypt with OpenSSL until n plaintext bytes came."""
        out = b""
        while len(out) < n:
            try:
                got = self.obj.read(n - len(out))
                if not got:  # close_notify
                    raise ssl.SSLZeroReturnError("the peer closed the TLS session")
                out += got
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed") from None
                self.inc.write(data)
                if self.received is not None:
                    self.received.add(data)
        return out


@dataclass
class Session:
    version: int
    cipher: int
    client: Endpoint
    server: Endpoint
    client_write: TlsDir  # what the client encrypts with (the server's RX)
    server_write: TlsDir  # what the server encrypts with (the server's TX)
    server_random: bytes  # from the ServerHello (TLS 1.2 key expansion)

    def server_state(self) -> TlsState:
        """The server's record state right after the handshake."""
        return TlsState(self.version, self.cipher, self.server_write, self.client_write)


def handshake(client_sock: socket.socket, server_sock: socket.socket, version: int,
              cipher: int, certfile: Path, keyfile: Path, keylog: Path) -> Session:
    cctx, sctx = contexts(version, cipher, certfile, keyfile, keylog)
    c = Endpoint(client_sock, *_obj(cctx, False))
    s = Endpoint(server_sock, *_obj(sctx, True))
    server_bytes = b""
    done = {"c": False, "s": False}
    for _ in range(200):
        for name, ep in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    ep.obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            sent = ep.flush()
            if name == "s":
                server_bytes += sent
        if all(done.values()):
            break
        c.feed()
        s.feed()
    else:
        raise RuntimeError("TLS handshake did not finish")
    if s.inc.pending or c.inc.pending:
        raise RuntimeError("bytes left over after the handshake")
    suite, hash_name = SUITES[(version, cipher)]
    if c.obj.cipher()[0] != suite or s.obj.cipher()[0] != suite:
        raise RuntimeError(f"negotiated {c.obj.cipher()}, wanted {suite}")
    log = _keylog(keylog)
    assert server_bytes[0] == 22 and server_bytes[5] == 2  # ServerHello first
    server_random = server_bytes[11:43]
    if version == core.TLS_1_3:
        cw = _tls13_dir(log["CLIENT_TRAFFIC_SECRET_0"], cipher, hash_name)
        sw = _tls13_dir(log["SERVER_TRAFFIC_SECRET_0"], cipher, hash_name)
    else:
        # The ServerHello starts the server's first record: record header,
        # handshake header, version, then its 32-byte random.
        client_random = bytes.fromhex(log["CLIENT_RANDOM"][0])
        cw, sw = _tls12_dirs(log["CLIENT_RANDOM"][1], client_random, server_random,
                             cipher, hash_name)
    return Session(version, cipher, c, s, cw, sw, server_random)


def _obj(ctx: ssl.SSLContext, server: bool) -> tuple[ssl.SSLObject, ssl.MemoryBIO,
                                                     ssl.MemoryBIO]:
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(inc, out, server_side=server), inc, out


def _keylog(path: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            label, client_random, secret = parts
            out[label] = (client_random, bytes.fromhex(secret))
    return out


def _hkdf_expand_label(secret: bytes, label: str, length: int, hash_name: str) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack(">HB", length, len(full)) + full + b"\0"
    algo = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    return HKDFExpand(algo, length, info).derive(secret)


def _kernel_dir(cipher: int, key: bytes, write_iv: bytes, explicit: bytes,
                seq: int) -> TlsDir:
    """The kernel's split: AES-GCM takes a 4-byte salt and an 8-byte IV,
    ChaCha20 the whole 12-byte IV and no salt."""
    if cipher == core.TLS_CHACHA20_POLY1305:
        return TlsDir(key, write_iv, b"", seq)
    return TlsDir(key, explicit, write_iv[:4], seq)


def _tls13_dir(entry: tuple[str, bytes], cipher: int, hash_name: str) -> TlsDir:
    key_len = core.TLS_SIZES[cipher][0]
    secret = entry[1]
    key = _hkdf_expand_label(secret, "key", key_len, hash_name)
    iv = _hkdf_expand_label(secret, "iv", 12, hash_name)
    return _kernel_dir(cipher, key, iv, iv[4:], 0)


def _prf(secret: bytes, label: bytes, seed: bytes, n: int, hash_name: str) -> bytes:
    h = getattr(hashlib, hash_name)
    a, out = label + seed, b""
    while len(out) < n:
        a = hmac.new(secret, a, h).digest()
        out += hmac.new(secret, a + label + seed, h).digest()
    return out[:n]


def _tls12_dirs(master: bytes, client_random: bytes, server_random: bytes, cipher: int,
                hash_name: str) -> tuple[TlsDir, TlsDir]:
    key_len = core.TLS_SIZES[cipher][0]
    iv_len = 12 if cipher == core.TLS_CHACHA20_POLY1305 else 4
    block = _prf(master, b"key expansion", server_random + client_random,
                 2 * key_len + 2 * iv_len, hash_name)
    ck, sk = block[:key_len], block[key_len:2 * key_len]
    civ, siv = block[2 * key_len:2 * key_len + iv_len], block[2 * key_len + iv_len:]
    # The Finished message was record 0 of each direction: data starts at 1.
    # The explicit nonce the kernel sends next: any value not used before.
    seq1 = struct.pack(">Q", 1)
    return (_kernel_dir(cipher, ck, civ, seq1, 1), _kernel_dir(cipher, sk, siv, seq1, 1))
