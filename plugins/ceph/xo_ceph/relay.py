"""HTTP/1.1 message framing and byte-exact relaying between a client socket and
a radosgw, for the front (proxying) and the agents (serving offloaded GETs).

Nothing is rewritten: request and response bytes pass as they came, so a
client sees exactly what radosgw answered. Only the framing is read (request
line, Content-Length, Transfer-Encoding, the status of the response and the
method it answers) to know where each message ends on a keep-alive
connection. Response bodies of known length move socket -> pipe -> socket
with splice(2) when asked (no copy through user space).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import urllib.parse
from dataclasses import dataclass

from xo import http1
from xo import tls as xotls

MAX_HEAD = 65536
CHUNK = 262144
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


class HttpError(Exception):
    """The peer sent something this relay cannot frame."""


class SockIO:
    """A non-blocking socket driven with few system calls: every recv and send
    is tried first, and only when it would block does the coroutine wait. The
    read registration stays in the event loop while the connection is busy
    (it is dropped when it fires with nobody waiting, or by release()), where
    the loop's sock_recv/sock_sendall register and unregister the descriptor
    on every call (several epoll_ctl per proxied request)."""

    __slots__ = ("sock", "fd", "loop", "_rfut", "_reading")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self._rfut: asyncio.Future[None] | None = None
        self._reading = False

    def _on_readable(self) -> None:
        fut = self._rfut
        if fut is not None and not fut.done():
            fut.set_result(None)
        else:  # level-triggered: nobody waits, stop watching
            self.loop.remove_reader(self.fd)
            self._reading = False

    async def readable(self) -> None:
        fut = self._rfut = self.loop.create_future()
        if not self._reading:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True
        try:
            await fut
        finally:
            self._rfut = None

    async def writable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(self.fd, ready)
        try:
            await fut
        finally:
            self.loop.remove_writer(self.fd)

    def release(self) -> None:
        """Leave the event loop (before the socket is handed over or closed)."""
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def close(self) -> None:
        self.release()
        self.sock.close()

    async def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                await self.readable()

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while True:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(view):
                return
            view = view[sent:]
            await self.writable()

    def idle_alive(self) -> bool:
        """True if an idle keep-alive connection is still open and silent."""
        try:
            got = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del got  # EOF (b"") or stray bytes: not reusable
        return False


class TlsIO(SockIO):
    """A client connection carrying TLS, with SockIO's interface: plaintext
    in and out through a session kept in user space (``xo.tls``: OpenSSL on
    the front from the handshake on, the core's record layer after a
    handoff). Its bytes cannot be spliced: every record is sealed here."""

    __slots__ = ("stream",)

    def __init__(self, stream: xotls.TlsStream) -> None:
        super().__init__(stream.sock)
        self.stream = stream

    async def recv(self, size: int) -> bytes:
        return await self.stream.recv()  # one record's worth (or b"" at the end)

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.sendall(bytes(data))


class UpstreamPool:
    """Idle keep-alive connections to one radosgw, shared by all client
    connections (a handed-back connection or a new client does not pay a
    TCP handshake and a radosgw accept)."""

    def __init__(self, ip: str, port: int, max_idle: int = 64) -> None:
        self.ip, self.port, self.max_idle = ip, port, max_idle
        self._idle: list[SockIO] = []
        self.connects = 0

    async def get(self) -> SockIO:
        while self._idle:
            io = self._idle.pop()
            if io.idle_alive():
                return io
            io.close()
        self.connects += 1
        return SockIO(await connect(self.ip, self.port))

    def put(self, io: SockIO) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(io)
        else:
            io.close()

    def close(self) -> None:
        for io in self._idle:
            io.close()
        self._idle.clear()


@dataclass
class Message:
    """A request or response head as the relay needs it: parsed by the
    package's HTTP/1.1 parser (xo.http1), raw bytes kept for relaying."""

    raw: bytes                  # the head, CRLFCRLF included
    parsed: http1.Request | http1.Response

    def header(self, name: str) -> str | None:
        return self.parsed.headers.get(name.lower())

    @property
    def connection_close(self) -> bool:
        return not self.parsed.keep_alive

    @property
    def is_response(self) -> bool:
        return isinstance(self.parsed, http1.Response)

    # ---- requests
    @property
    def method(self) -> str:
        assert isinstance(self.parsed, http1.Request)
        return self.parsed.method

    @property
    def target(self) -> str:
        assert isinstance(self.parsed, http1.Request)
        return self.parsed.target

    def body_framing(self) -> tuple[str, int]:
        """("length", n), ("chunked", 0) or ("none", 0) for a request."""
        f = self.parsed.framing
        if f.chunked:
            return "chunked", 0
        return ("length", f.content_length) if f.content_length else ("none", 0)

    # ---- responses
    @property
    def status(self) -> int:
        assert isinstance(self.parsed, http1.Response)
        return self.parsed.status

    def response_framing(self, method: str) -> tuple[str, int]:
        """("length", n), ("chunked", 0), ("none", 0) or ("close", 0)."""
        if method == "HEAD":  # parsed as an answer to GET: HEAD's has no body
            return "none", 0
        f = self.parsed.framing
        if f.chunked:
            return "chunked", 0
        if f.until_close:
            return "close", 0
        return ("length", f.content_length) if f.content_length else ("none", 0)


def parse_head(raw: bytes) -> Message:
    try:
        if raw.startswith(b"HTTP/"):
            return Message(raw, http1.parse_response(raw))
        return Message(raw, http1.parse_request(raw))
    except http1.HTTPError as exc:
        raise HttpError(str(exc)) from exc


def split_path(target: str) -> tuple[str, str, str]:
    """(bucket, key, query) of a path-style S3 request target."""
    if not target.startswith("/"):  # absolute form
        parts = urllib.parse.urlsplit(target)
        path, query = parts.path, parts.query
    else:
        path, _, query = target.partition("?")
        query = query.partition("#")[0]
    if "%" in path:
        path = urllib.parse.unquote(path)
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key, query


async def recv_some(io: SockIO, buf: bytearray, size: int = CHUNK) -> bool:
    chunk = await io.recv(size)
    buf += chunk
    return bool(chunk)


async def read_head(io: SockIO, buf: bytearray) -> Message | None:
    """The next message head from buf + io; None at a clean EOF before it."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            raw = bytes(buf[:end + 4])
            del buf[:end + 4]
            return parse_head(raw)
        if len(buf) > MAX_HEAD:
            raise HttpError("message head too large")
        if not await recv_some(io, buf, MAX_HEAD):
            if buf:
                raise HttpError("connection closed inside a message head")
            return None


async def read_head_exact(io: SockIO) -> Message:
    """A response head read without taking a byte of its body off the socket
    (peek, then receive exactly the head), so the body can be spliced."""
    sock = io.sock
    while True:
        try:
            peek = sock.recv(MAX_HEAD, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await io.readable()
            continue
        if not peek:
            raise HttpError("upstream closed before a response")
        end = peek.find(b"\r\n\r\n")
        if end >= 0:
            raw = sock.recv(end + 4)
            return parse_head(raw)
        if len(peek) >= MAX_HEAD:
            raise HttpError("response head too large")
        # a partial head: wait for more (readable fires again only on new data)
        await asyncio.sleep(0.0002)


async def _pass_exact(src: SockIO, dst: SockIO, buf: bytearray, n: int) -> int:
    """Move exactly n bytes (buf first, then src) to dst; returns n."""
    left = n
    while left > 0:
        if not buf and not await recv_some(src, buf, min(CHUNK, left)):
            raise HttpError("connection closed inside a message body")
        take = min(left, len(buf))
        if take == len(buf):
            await dst.sendall(buf)
            buf.clear()
        else:
            await dst.sendall(memoryview(buf)[:take])
            del buf[:take]
        left -= take
    return n


async def _pass_line(src: SockIO, dst: SockIO, buf: bytearray) -> bytes:
    while (end := buf.find(b"\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError("chunk line too long")
        if not await recv_some(src, buf):
            raise HttpError("connection closed inside a chunked body")
    line = bytes(buf[:end + 2])
    del buf[:end + 2]
    await dst.sendall(line)
    return line


async def _pass_chunked(src: SockIO, dst: SockIO, buf: bytearray) -> int:
    total = 0
    while True:
        line = await _pass_line(src, dst, buf)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise HttpError(f"bad chunk size line {line!r}") from exc
        if size == 0:
            while await _pass_line(src, dst, buf) != b"\r\n":  # trailers
                pass
            return total
        total += await _pass_exact(src, dst, buf, size)
        await _pass_exact(src, dst, buf, 2)


async def pass_body(src: SockIO, dst: SockIO, buf: bytearray,
                    framing: tuple[str, int]) -> int:
    """Relay one message body from src (buf holds bytes already read) to dst,
    byte for byte; returns its length (of the payload for chunked)."""
    kind, n = framing
    if kind == "none":
        return 0
    if kind == "length":
        return await _pass_exact(src, dst, buf, n)
    if kind == "chunked":
        return await _pass_chunked(src, dst, buf)
    # until close
    total = 0
    while True:
        if buf:
            total += len(buf)
            await dst.sendall(buf)
            buf.clear()
        if not await recv_some(src, buf):
            return total


class Splicer:
    """A pipe for moving bytes socket -> socket with splice(2)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
            self.size = PIPE_SIZE
        except OSError:
            self.size = 65536

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    async def move(self, src: SockIO, dst: SockIO, n: int) -> int:
        """Exactly n bytes from src to dst through the kernel."""
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        left, in_pipe = n, 0
        while left > 0 or in_pipe > 0:
            moved = False
            if left > 0 and in_pipe < self.size:
                try:
                    k = os.splice(src.fd, self.w, min(left, self.size - in_pipe),
                                  flags=flags)
                except BlockingIOError:
                    pass
                else:
                    if k == 0:
                        raise HttpError("upstream closed inside a response body")
                    left -= k
                    in_pipe += k
                    moved = True
            if in_pipe > 0:
                try:
                    k = os.splice(self.r, dst.fd, in_pipe, flags=flags)
                except BlockingIOError:
                    pass
                else:
                    in_pipe -= k
                    moved = True
            if not moved:
                if in_pipe > 0 and (left == 0 or in_pipe >= self.size):
                    await dst.writable()
                elif in_pipe == 0:
                    await src.readable()
                else:
                    await _wait_either(src, dst)
        return n


async def _wait_either(src: SockIO, dst: SockIO) -> None:
    waits = [asyncio.ensure_future(src.readable()), asyncio.ensure_future(dst.writable())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def connect(ip: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except OSError:
        sock.close()
        raise
    return sock


async def exchange(client: SockIO, cbuf: bytearray, req: Message,
                   upstream: SockIO, *, splicer: Splicer | None = None) -> tuple[
                       Message, int]:
    """One request/response through upstream: the request head (already read
    from the client) and its body go up, interim (1xx) and final response
    come back. Returns the final response head and its body length. The
    request body is sent concurrently with reading the response, so a
    client waiting for `100 Continue` is served as radosgw would. A final
    response head goes to the client together with the body bytes that came
    with it (one send for a small object)."""
    framing = req.body_framing()
    body_task: asyncio.Task[int] | None = None
    await upstream.sendall(req.raw)
    if framing[0] != "none":
        body_task = asyncio.ensure_future(pass_body(client, upstream, cbuf, framing))
    ubuf = bytearray()
    try:
        while True:
            if splicer is not None:
                resp = await read_head_exact(upstream)
            else:
                got = await read_head(upstream, ubuf)
                if got is None:
                    raise HttpError("upstream closed before a response")
                resp = got
            if 100 <= resp.status < 200 and resp.status != 101:
                await client.sendall(resp.raw)
                continue
            break
        rframing = resp.response_framing(req.method)
        if splicer is not None and rframing[0] == "length":
            await client.sendall(resp.raw)
            sent = await splicer.move(upstream, client, rframing[1])
        elif rframing[0] == "length":
            n = rframing[1]
            take = min(n, len(ubuf))
            out = resp.raw + ubuf[:take] if take else resp.raw
            del ubuf[:take]
            await client.sendall(out)
            sent = take + (await _pass_exact(upstream, client, ubuf, n - take)
                           if n > take else 0)
        else:
            await client.sendall(resp.raw)
            sent = await pass_body(upstream, client, ubuf, rframing)
        if body_task is not None:
            if not body_task.done():
                # radosgw answered without the whole body (an early error):
                # the stream cannot be framed any more.
                raise HttpError("response ended before the request body")
            body_task.result()
        if ubuf:
            raise HttpError("upstream sent bytes after its response")
        return resp, sent
    finally:
        if body_task is not None and not body_task.done():
            body_task.cancel()
