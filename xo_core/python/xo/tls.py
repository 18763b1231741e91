"""TLS termination in the Python driver, ready for handoff.

A server-side TLS session runs in Python's ``ssl`` (OpenSSL) through memory
BIOs, so every byte and every record boundary is seen here:

* the key log: OpenSSL's key log callback (``SSLContext.keylog_filename``)
  writes into an anonymous memory file (memfd, never on disk), read and
  emptied after each handshake (:class:`KeyLog`);
* record counting: records received and sent since the traffic keys began,
  which are the sequence numbers of the next records each way.

From both the core derives the session's record state
(:func:`xo.core.tls13_state` / :func:`xo.core.tls12_state`), which goes into
the handoff with the TCP state (``xo_proto_offload_tls``). Whoever continues
the session without OpenSSL's objects (a target, or the host after the
connection came back) uses the core's record layer (:class:`RecordStream`).

A session moves only at a record boundary with nothing pending: no bytes
half a record, no plaintext OpenSSL decrypted but nobody read, nothing
unsent (:meth:`TlsStream.handoff_state` raises otherwise). Not supported:
TLS 1.3 session tickets (``num_tickets`` is set to 0), KeyUpdate,
renegotiation; a session that needs them is not handed off (the record
layer ends it with an error rather than guess).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
from collections import OrderedDict
from pathlib import Path

from xo import core
from xo.core import TlsRecordLayer, TlsState

log = logging.getLogger(__name__)

APPLICATION_DATA, ALERT, HANDSHAKE, CHANGE_CIPHER_SPEC = 23, 21, 22, 20
# Python's ssl names (cipher(), version()) -> the core's cipher ids
CIPHERS = {
    "TLS_AES_128_GCM_SHA256": core.TLS_AES_GCM_128,
    "TLS_AES_256_GCM_SHA384": core.TLS_AES_GCM_256,
    "TLS_CHACHA20_POLY1305_SHA256": core.TLS_CHACHA20_POLY1305,
    "ECDHE-ECDSA-AES128-GCM-SHA256": core.TLS_AES_GCM_128,
    "ECDHE-RSA-AES128-GCM-SHA256": core.TLS_AES_GCM_128,
    "ECDHE-ECDSA-AES256-GCM-SHA384": core.TLS_AES_GCM_256,
    "ECDHE-RSA-AES256-GCM-SHA384": core.TLS_AES_GCM_256,
    "ECDHE-ECDSA-CHACHA20-POLY1305": core.TLS_CHACHA20_POLY1305,
    "ECDHE-RSA-CHACHA20-POLY1305": core.TLS_CHACHA20_POLY1305,
}
# Offered in TLS 1.2: only suites whose record state the core carries.
TLS12_CIPHERS = ":".join(n for n in CIPHERS if n.startswith("ECDHE"))


class TlsHandoffError(Exception):
    """The session cannot move now (not at a record boundary, or a suite or
    feature the core does not carry)."""


class KeyLog:
    """OpenSSL's key log for one SSLContext, in an anonymous memory file."""

    MAX_PENDING = 4096  # handshakes whose secrets nobody took (failed ones)

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._fd = os.memfd_create("xo-tls-keylog", os.MFD_CLOEXEC)
        ctx.keylog_filename = f"/proc/self/fd/{self._fd}"
        self._entries: OrderedDict[bytes, dict[str, bytes]] = OrderedDict()

    def _collect(self) -> None:
        size = os.fstat(self._fd).st_size
        if not size:
            return
        data = os.pread(self._fd, size, 0)
        os.ftruncate(self._fd, 0)
        for line in data.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) != 3 or line.startswith("#"):
                continue
            label, client_random, secret = parts
            entry = self._entries.setdefault(bytes.fromhex(client_random), {})
            entry[label] = bytes.fromhex(secret)
        while len(self._entries) > self.MAX_PENDING:
            self._entries.popitem(last=False)

    def take(self, client_random: bytes) -> dict[str, bytes]:
        """The secrets logged for the handshake with this ClientHello random
        (removed from here)."""
        self._collect()
        return self._entries.pop(client_random, {})

    def close(self) -> None:
        os.close(self._fd)


def server_context(certfile: str | Path, keyfile: str | Path) -> tuple[ssl.SSLContext, KeyLog]:
    """A server context whose sessions can be handed off: TLS 1.2 or 1.3,
    suites the core carries, no session tickets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3's default suites are all carried
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    return ctx, KeyLog(ctx)


class RecordCounter:
    """Counts whole TLS records in a byte stream (the record numbers an
    endpoint that keeps its session in OpenSSL must know to hand it off)."""

    def __init__(self) -> None:
        self.records = 0
        self.buf = b""

    def add(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 5:
            size = 5 + int.from_bytes(self.buf[3:5], "big")
            if len(self.buf) < size:
                break
            self.buf = self.buf[size:]
            self.records += 1

    @property
    def at_boundary(self) -> bool:
        return not self.buf

    @classmethod
    def after_handshake(cls, data: bytes, pending: int) -> RecordCounter:
        """The count of the records in the last ``pending`` bytes of data
        (what OpenSSL left unread when the handshake ended: the client's
        first application records, the last perhaps still partial)."""
        out = cls()
        start, off = len(data) - pending, 0
        while off < start:
            if off + 5 > len(data):
                break
            off += 5 + int.from_bytes(data[off + 3:off + 5], "big")
        if off != start:
            raise TlsHandoffError("the handshake ended inside a record")
        out.add(data[start:])
        return out


def _queued(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    return int(struct.unpack("i", buf)[0])


def _send_queue_empty(sock: socket.socket) -> bool:
    return _queued(sock, termios.TIOCOUTQ) == 0


async def wait_send_queue_empty(sock: socket.socket, timeout: float = 2.0) -> None:
    """Wait (briefly) until the kernel sent and the client acknowledged
    everything, so a handoff does not have to carry unsent bytes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _send_queue_empty(sock) and loop.time() < deadline:
        await asyncio.sleep(0.0005)


TCP_ULP = 31  # linux/tcp.h


def has_kernel_tls(sock: socket.socket) -> bool:
    """Whether the kernel runs TLS on this socket (a session restored where
    the kernel has TLS: the application reads and writes plaintext)."""
    try:
        ulp = sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16)
    except OSError:
        return False
    return ulp.rstrip(b"\0") == b"tls"


async def read_kernel_tls_pending(sock: socket.socket, timeout: float = 2.0,
                                  limit: int = core.MAX_APP_BYTES) -> bytes:
    """What the client sent that the application has not read, from a socket
    with kernel TLS, as plaintext.

    Such a socket moves only with nothing queued (the kernel's record
    numbers must match the stream), so before a hand-back the driver reads
    the records that arrived meanwhile (the client's next request, usually)
    and they travel as already-read bytes. The kernel returns whole records
    only: while part of one is queued, wait (up to timeout) for the rest.
    A record that is not data (an alert: recv fails) stops the reading;
    the capture then refuses and the connection stays. At most `limit`
    bytes (what a hand-back carries) and `timeout` seconds, giving the event
    loop its turn between reads."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out = bytearray()
    while len(out) < limit and loop.time() < deadline:
        try:
            chunk = sock.recv(min(1 << 16, limit - len(out)), socket.MSG_DONTWAIT)
        except BlockingIOError:
            chunk = None
        except OSError:
            break
        if chunk == b"":
            break
        if chunk:
            out += chunk
            await asyncio.sleep(0)
            continue
        if _queued(sock, termios.FIONREAD) == 0:
            break
        await asyncio.sleep(0.0005)
    return bytes(out)


class TlsStream:
    """Plaintext over a TLS session on a non-blocking socket."""

    sock: socket.socket

    async def recv(self) -> bytes:  # b"": the client closed (close_notify or EOF)
        raise NotImplementedError

    async def sendall(self, data: bytes) -> None:
        raise NotImplementedError

    def handoff_state(self) -> TlsState:
        raise NotImplementedError

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (briefly) until the kernel sent and the client acknowledged
        everything (a TLS state moves only with empty queues)."""
        await wait_send_queue_empty(self.sock, timeout)


class OpenSslStream(TlsStream):
    """The session as OpenSSL keeps it (the host, from the handshake on)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, keylog: KeyLog) -> None:
        self.sock = sock
        self.keylog = keylog
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.received, self.sent = RecordCounter(), RecordCounter()
        self._hs_in = b""   # the client's bytes until the handshake ended
        self._hs_out = b""  # ours (ServerHello first)
        self._done = False
        self._client_random = b""
        self._secrets: dict[str, bytes] = {}
        self._eof = False

    async def _flush(self) -> None:
        data = self.out.read()
        if data:
            if not self._done:
                self._hs_out += data
            else:
                self.sent.add(data)
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 262144)
        if not data:
            self._eof = True
            self.inc.write_eof()
            return False
        if not self._done:
            self._hs_in += data
        else:
            self.received.add(data)
        self.inc.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed during the TLS handshake") from None
        await self._flush()
        # Records the client sent with (or right after) its Finished are
        # application data already: they are still in the incoming BIO.
        self.received = RecordCounter.after_handshake(self._hs_in, self.inc.pending)
        self._done = True
        if self._hs_in[:1] != b"\x16" or self._hs_in[5:6] != b"\x01":
            raise TlsHandoffError("the client's first record is not a ClientHello")
        self._client_random = self._hs_in[11:43]
        self._server_random = self._hs_out[11:43]
        self._hs_in = self._hs_out = b""
        self._secrets = self.keylog.take(self._client_random)

    async def recv(self) -> bytes:
        while True:
            try:
                return self.obj.read(262144)
            except ssl.SSLWantReadError:
                if self._eof or not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view[:262144])
            view = view[n:]
            await self._flush()

    def handoff_state(self) -> TlsState:
        if self.inc.pending or self.received.buf or self.obj.pending() or self.out.pending:
            raise TlsHandoffError("not at a TLS record boundary: bytes pending")
        if not self._send_queue_empty():
            raise TlsHandoffError("records still unacknowledged in the send queue")
        name, version, _ = self.obj.cipher()
        cipher = CIPHERS.get(name)
        if cipher is None:
            raise TlsHandoffError(f"suite {name} is not carried by the core")
        if version == "TLSv1.3":
            cs = self._secrets.get("CLIENT_TRAFFIC_SECRET_0")
            ss = self._secrets.get("SERVER_TRAFFIC_SECRET_0")
            if cs is None or ss is None:
                raise TlsHandoffError("no TLS 1.3 traffic secrets in the key log")
            return core.tls13_state(cipher, cs, ss, True, self.sent.records,
                                    self.received.records)
        master = self._secrets.get("CLIENT_RANDOM")
        if master is None:
            raise TlsHandoffError("no TLS 1.2 master secret in the key log")
        server_random = self._server_random
        # TLS 1.2: each side's Finished was record 0 under the new keys.
        return core.tls12_state(cipher, master, self._client_random, server_random, True,
                                1 + self.sent.records, 1 + self.received.records)

    def _send_queue_empty(self) -> bool:
        return _send_queue_empty(self.sock)


async def accept_tls(sock: socket.socket, ctx: ssl.SSLContext,
                     keylog: KeyLog) -> OpenSslStream | None:
    """The server side of a handshake on an accepted socket: the session, or
    None when the client failed it (the socket is closed, the reason logged)."""
    sock.setblocking(False)
    stream = OpenSslStream(sock, ctx, keylog)
    try:
        await stream.handshake()
    except (OSError, TlsHandoffError) as exc:  # ssl.SSLError is an OSError
        log.info("TLS handshake failed: %s", exc)
        sock.close()
        return None
    return stream


class RecordStream(TlsStream):
    """The session continued by the core's record layer (xo_tls_rec_*),
    from a handed-over state."""

    def __init__(self, sock: socket.socket, state: TlsState) -> None:
        self.sock = sock
        self.layer = TlsRecordLayer(state)
        self.buf = b""
        self._eof = False

    async def recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            n, rec = self.layer.open(self.buf) if self.buf else (0, None)
            if rec is not None:
                self.buf = self.buf[n:]
                if rec.type == APPLICATION_DATA:
                    if rec.data:
                        return rec.data
                    continue
                if rec.type == ALERT:
                    return b""  # close_notify (or a fatal alert): the session ends
                raise TlsHandoffError(f"TLS record type {rec.type} after a handoff "
                                      "(post-handshake messages are not supported)")
            if self._eof:
                return b""
            data = await loop.sock_recv(self.sock, 262144)
            if not data:
                self._eof = True
                if self.buf:
                    raise ConnectionError("the client closed inside a TLS record")
                return b""
            self.buf += data

    async def sendall(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for off in range(0, len(data), 262144):
            await loop.sock_sendall(self.sock, self.layer.seal(data[off:off + 262144]))

    def handoff_state(self) -> TlsState:
        if self.buf:
            raise TlsHandoffError("not at a TLS record boundary: bytes pending")
        if not _send_queue_empty(self.sock):
            raise TlsHandoffError("records still unacknowledged in the send queue")
        return self.layer.state
