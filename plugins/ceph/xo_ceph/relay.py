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

MAX_HEAD = 65536
CHUNK = 262144
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


class HttpError(Exception):
    """The peer sent something this relay cannot frame."""


@dataclass
class Message:
    raw: bytes                  # the head, CRLFCRLF included
    start: list[str]            # request: method, target, version; response: version, status
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def connection_close(self) -> bool:
        conn = (self.header("connection") or "").lower()
        version = self.start[0] if self.is_response else self.start[2]
        if version == "HTTP/1.0":
            return "keep-alive" not in conn
        return "close" in conn

    @property
    def is_response(self) -> bool:
        return self.start[0].startswith("HTTP/")

    # ---- requests
    @property
    def method(self) -> str:
        return self.start[0]

    @property
    def target(self) -> str:
        return self.start[1]

    def body_framing(self) -> tuple[str, int]:
        """("length", n), ("chunked", 0) or ("none", 0) for a request."""
        te = self.header("transfer-encoding")
        if te is not None:
            if te.lower().split(",")[-1].strip() != "chunked":
                raise HttpError(f"transfer-encoding {te!r}")
            return "chunked", 0
        cl = self.header("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError as exc:
                raise HttpError(f"content-length {cl!r}") from exc
            if n < 0:
                raise HttpError(f"content-length {cl!r}")
            return ("length", n) if n else ("none", 0)
        return "none", 0

    # ---- responses
    @property
    def status(self) -> int:
        return int(self.start[1])

    def response_framing(self, method: str) -> tuple[str, int]:
        """("length", n), ("chunked", 0), ("none", 0) or ("close", 0)."""
        status = self.status
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return "none", 0
        te = self.header("transfer-encoding")
        if te is not None and te.lower().split(",")[-1].strip() == "chunked":
            return "chunked", 0
        cl = self.header("content-length")
        if cl is not None:
            try:
                return ("length", int(cl)) if int(cl) else ("none", 0)
            except ValueError as exc:
                raise HttpError(f"content-length {cl!r}") from exc
        return "close", 0


def parse_head(raw: bytes) -> Message:
    text = raw[:-4].decode("latin-1")
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise HttpError(f"bad start line {lines[0]!r}")
    if not start[0].startswith("HTTP/") and len(start) != 3:
        raise HttpError(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line!r}")
        headers.append((name.lower(), value.strip()))
    return Message(raw, start, headers)


def split_path(target: str) -> tuple[str, str, str]:
    """(bucket, key, query) of a path-style S3 request target."""
    parts = urllib.parse.urlsplit(target)
    path = urllib.parse.unquote(parts.path)
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key, parts.query


async def recv_some(sock: socket.socket, buf: bytearray, size: int = CHUNK) -> bool:
    chunk = await asyncio.get_running_loop().sock_recv(sock, size)
    buf += chunk
    return bool(chunk)


async def read_head(sock: socket.socket, buf: bytearray) -> Message | None:
    """The next message head from buf + sock; None at a clean EOF before it."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            raw = bytes(buf[:end + 4])
            del buf[:end + 4]
            return parse_head(raw)
        if len(buf) > MAX_HEAD:
            raise HttpError("message head too large")
        if not await recv_some(sock, buf):
            if buf:
                raise HttpError("connection closed inside a message head")
            return None


async def read_head_exact(sock: socket.socket) -> Message:
    """A response head read without taking a byte of its body off the socket
    (peek, then receive exactly the head), so the body can be spliced."""
    loop = asyncio.get_running_loop()
    while True:
        fut: asyncio.Future[None] = loop.create_future()
        try:
            peek = sock.recv(MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:
            loop.add_reader(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())
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


async def _pass_exact(src: socket.socket, dst: socket.socket, buf: bytearray, n: int) -> int:
    """Move exactly n bytes (buf first, then src) to dst; returns n."""
    loop = asyncio.get_running_loop()
    left = n
    while left > 0:
        if not buf and not await recv_some(src, buf, min(CHUNK, left)):
            raise HttpError("connection closed inside a message body")
        take = min(left, len(buf))
        await loop.sock_sendall(dst, bytes(buf[:take]))
        del buf[:take]
        left -= take
    return n


async def _pass_line(src: socket.socket, dst: socket.socket, buf: bytearray) -> bytes:
    loop = asyncio.get_running_loop()
    while (end := buf.find(b"\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError("chunk line too long")
        if not await recv_some(src, buf):
            raise HttpError("connection closed inside a chunked body")
    line = bytes(buf[:end + 2])
    del buf[:end + 2]
    await loop.sock_sendall(dst, line)
    return line


async def _pass_chunked(src: socket.socket, dst: socket.socket, buf: bytearray) -> int:
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


async def pass_body(src: socket.socket, dst: socket.socket, buf: bytearray,
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
    loop = asyncio.get_running_loop()
    total = 0
    while True:
        if buf:
            total += len(buf)
            await loop.sock_sendall(dst, bytes(buf))
            buf.clear()
        if not await recv_some(src, buf):
            return total


async def _wait_fd(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


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

    async def move(self, src: socket.socket, dst: socket.socket, n: int) -> int:
        """Exactly n bytes from src to dst through the kernel."""
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        left, in_pipe = n, 0
        while left > 0 or in_pipe > 0:
            moved = False
            if left > 0 and in_pipe < self.size:
                try:
                    k = os.splice(src.fileno(), self.w, min(left, self.size - in_pipe),
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
                    k = os.splice(self.r, dst.fileno(), in_pipe, flags=flags)
                except BlockingIOError:
                    pass
                else:
                    in_pipe -= k
                    moved = True
            if not moved:
                if in_pipe > 0 and (left == 0 or in_pipe >= self.size):
                    await _wait_fd(dst.fileno(), write=True)
                elif in_pipe == 0:
                    await _wait_fd(src.fileno(), write=False)
                else:
                    await _wait_either(src.fileno(), dst.fileno())
        return n


async def _wait_either(rfd: int, wfd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(rfd, ready)
    loop.add_writer(wfd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(rfd)
        loop.remove_writer(wfd)


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


async def exchange(client: socket.socket, cbuf: bytearray, req: Message,
                   upstream: socket.socket, *, splicer: Splicer | None = None) -> tuple[
                       Message, int]:
    """One request/response through upstream: the request head (already read
    from the client) and its body go up, interim (1xx) and final response
    come back. Returns the final response head and its body length. The
    request body is sent concurrently with reading the response, so a
    client waiting for `100 Continue` is served as radosgw would."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(upstream, req.raw)
    framing = req.body_framing()
    body_task: asyncio.Task[int] | None = None
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
            await loop.sock_sendall(client, resp.raw)
            if 100 <= resp.status < 200 and resp.status != 101:
                continue
            break
        rframing = resp.response_framing(req.method)
        if splicer is not None and rframing[0] == "length":
            sent = await splicer.move(upstream, client, rframing[1])
        else:
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
