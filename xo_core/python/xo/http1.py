"""HTTP/1.1 message framing: the one parser of the reference app, the
benchmarks and the test clients.

Sans-I/O: it takes bytes and says where a head ends, what it holds and how
the body that follows is framed (Content-Length, chunked, or until the
connection closes); the callers own the sockets. Malformed input raises
:class:`HTTPError` with a sentence that names what is wrong.

    end = head_end(buf, what="request")        # 0 while the head is incomplete
    req = parse_request(bytes(buf[:end]))
    req.path, req.keep_alive, req.content_length, req.chunked

    resp = recv_response(sock, leftover)        # a whole response, any framing

Only what HTTP/1.1 (RFC 9112) needs for a keep-alive connection is here:
no obsolete line folding (refused), no transfer coding other than chunked
(refused), no interim (1xx) responses other than skipping their head.
"""

from __future__ import annotations

import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 65536
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
RECV_BYTES = 262144

# RFC 9110 §5.6.2: a token (method, header name).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/1\.[0-9]$")


class HTTPError(ValueError):
    """A malformed or unsupported HTTP/1.x message; the text says what."""


# ---- heads ---------------------------------------------------------------------------


def head_end(buf: bytes | bytearray, *, what: str = "request",
             limit: int = MAX_HEAD_BYTES) -> int:
    """Length of the head at the start of buf, blank line included; 0 while
    it is not complete. More than ``limit`` bytes without an end is an error."""
    end = buf.find(HEAD_END, 0, limit + len(HEAD_END))
    if end >= 0:
        return end + len(HEAD_END)
    if len(buf) > limit:
        raise HTTPError(f"{what} head too large (over {limit} bytes)")
    return 0


def _connection_tokens(headers: dict[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = _connection_tokens(headers)
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


@dataclass
class Framing:
    """How the body after a head is delimited."""

    content_length: int | None = None  # bytes, when given by Content-Length
    chunked: bool = False  # Transfer-Encoding: chunked
    until_close: bool = False  # a response with neither: the body ends at EOF

    @property
    def has_body(self) -> bool:
        return self.chunked or self.until_close or bool(self.content_length)


def _parse_fields(lines: list[bytes], what: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HTTPError(f"bad header line {_text(line)!r} in the {what}: "
                            "obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HTTPError(f"bad header line {_text(line)!r} in the {what}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key == "content-length" and key in headers and headers[key] != text:
            raise HTTPError(f"conflicting Content-Length values {headers[key]!r} and "
                            f"{text!r} in the {what}")
        if key in headers and key not in ("content-length", "host"):
            headers[key] = f"{headers[key]}, {text}"  # RFC 9110 §5.3: a list
        elif key == "host" and key in headers:
            raise HTTPError(f"more than one Host header in the {what}")
        else:
            headers[key] = text
    return headers


def _framing(headers: dict[str, str], what: str) -> Framing:
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise HTTPError(f"both Transfer-Encoding and Content-Length in the {what}")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings[-1] != "chunked" or any(c not in ("chunked", "identity") for c in codings):
            raise HTTPError(f"unsupported Transfer-Encoding {te!r} in the {what}")
        return Framing(chunked=True)
    if cl is not None:
        if not cl.isascii() or not cl.isdigit() or len(cl) > 18:
            raise HTTPError(f"bad Content-Length {cl!r} in the {what}")
        return Framing(content_length=int(cl))
    return Framing()


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _split_head(head: bytes, what: str) -> tuple[bytes, list[bytes]]:
    if not head.endswith(HEAD_END):
        raise HTTPError(f"{what} head does not end with an empty line")
    lines = head[:-len(HEAD_END)].split(CRLF)
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise HTTPError(f"bare CR or LF in the {what} head")
    return lines[0], lines[1:]


@dataclass
class Request:
    """A parsed request head."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    framing: Framing
    raw: bytes  # the head as received, blank line included

    @property
    def path(self) -> str:
        """The target's path, percent-decoded."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.target).path)

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.headers)

    @property
    def content_length(self) -> int:
        """Body bytes announced by Content-Length (0 without one)."""
        return self.framing.content_length or 0

    @property
    def chunked(self) -> bool:
        return self.framing.chunked


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line, fields, the empty line)."""
    first, lines = _split_head(head, "request")
    parts = first.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise HTTPError(f"bad request line {_text(first)!r}")
    method, target, version = (_text(p) for p in parts)
    if not _VERSION.match(version):
        raise HTTPError(f"bad request line {_text(first)!r}: unsupported version {version!r}")
    headers = _parse_fields(lines, "request")
    framing = _framing(headers, "request")
    return Request(method, target, version, headers, framing, head)


@dataclass
class Response:
    """A parsed response head and, once read, its body."""

    version: str
    status: int
    reason: str
    headers: dict[str, str]
    framing: Framing
    raw: bytes  # the head as received, blank line included
    body: bytes = field(default=b"", repr=False)
    body_length: int = 0  # body bytes read (also when they were not kept)

    @property
    def keep_alive(self) -> bool:
        return not self.framing.until_close and _keep_alive(self.version, self.headers)


def parse_response(head: bytes, *, method: str = "GET") -> Response:
    """Parse a response head to a request of ``method`` (HEAD answers have no body)."""
    first, lines = _split_head(head, "response")
    version, sep, rest = first.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if (not sep or not _VERSION.match(_text(version)) or len(code) != 3
            or not code.isdigit()):
        raise HTTPError(f"bad status line {_text(first)!r}")
    status = int(code)
    headers = _parse_fields(lines, "response")
    if method == "HEAD" or status < 200 or status in (204, 304):
        framing = Framing()  # RFC 9112 §6.3: no body whatever the fields say
    else:
        framing = _framing(headers, "response")
        if not framing.chunked and framing.content_length is None:
            framing.until_close = True
    return Response(_text(version), status, _text(reason), headers, framing, head)


# ---- bodies --------------------------------------------------------------------------


class ChunkedDecoder:
    """Decodes a chunked body incrementally: feed() what arrived, it returns
    the data it could decode and how many input bytes that consumed; done once
    the last chunk and the trailer section are through (what follows belongs
    to the next message)."""

    def __init__(self) -> None:
        self.done = False
        self._left = 0  # data bytes left in the current chunk
        self._state = "size"  # size | data | data-crlf | trailer

    def feed(self, data: bytes | bytearray) -> tuple[bytes, int]:
        out = bytearray()
        pos = 0
        while not self.done and pos < len(data):
            if self._state == "data":
                take = min(self._left, len(data) - pos)
                out += data[pos:pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "data-crlf"
                continue
            if self._state == "data-crlf":
                if len(data) - pos < 2:
                    break
                if data[pos:pos + 2] != CRLF:
                    raise HTTPError("chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
                continue
            end = data.find(CRLF, pos, pos + MAX_CHUNK_LINE)
            if end < 0:
                if len(data) - pos >= MAX_CHUNK_LINE:
                    raise HTTPError(f"chunk line over {MAX_CHUNK_LINE} bytes")
                break
            line = bytes(data[pos:end])
            pos = end + 2
            if self._state == "trailer":
                if not line:
                    self.done = True
                elif b":" not in line:
                    raise HTTPError(f"bad trailer line {_text(line)!r}")
                continue
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 15 or not all(c in b"0123456789abcdefABCDEF"
                                                       for c in size):
                raise HTTPError(f"bad chunk size line {_text(line)!r}")
            self._left = int(size, 16)
            self._state = "data" if self._left else "trailer"
        return bytes(out), pos


class ResponseReader:
    """Sans-I/O reader of one response: feed() bytes until ``done``; at EOF
    call eof(). What arrived after the response stays in ``rest``.

    ``keep_body=False`` counts the body (``body_length``) without keeping it."""

    def __init__(self, *, method: str = "GET", keep_body: bool = True,
                 initial: bytes | bytearray = b"") -> None:
        self.method = method
        self.keep_body = keep_body
        self.rest = bytearray(initial)
        self.response: Response | None = None
        self.done = False
        self._body = bytearray()
        self._left = 0
        self._chunks: ChunkedDecoder | None = None
        self._advance()

    def feed(self, data: bytes) -> None:
        self.rest += data
        self._advance()

    def eof(self) -> None:
        """The connection closed: ends a body read until close, else an error."""
        if self.done:
            return
        resp = self.response
        if resp is not None and resp.framing.until_close:
            self._finish()
            return
        where = "head" if resp is None else "body"
        raise HTTPError(f"connection closed inside a response {where}")

    def _take(self, count: int) -> None:
        """The next count bytes of rest are body: keep (or count) them."""
        assert self.response is not None
        self.response.body_length += count
        if self.keep_body:
            self._body += self.rest[:count]
        del self.rest[:count]

    def _advance(self) -> None:
        while self.response is None:
            end = head_end(self.rest, what="response")
            if not end:
                return
            resp = parse_response(bytes(self.rest[:end]), method=self.method)
            del self.rest[:end]
            if 100 <= resp.status < 200:
                continue  # interim response: the real one follows
            self.response = resp
            self._left = resp.framing.content_length or 0
            if resp.framing.chunked:
                self._chunks = ChunkedDecoder()
        if self.done:
            return
        framing = self.response.framing
        if self._chunks is not None:
            data, used = self._chunks.feed(self.rest)
            del self.rest[:used]
            self.response.body_length += len(data)
            if self.keep_body:
                self._body += data
            if self._chunks.done:
                self._finish()
        elif framing.until_close:
            self._take(len(self.rest))
        else:
            take = min(self._left, len(self.rest))
            self._take(take)
            self._left -= take
            if self._left == 0:
                self._finish()

    def _finish(self) -> None:
        assert self.response is not None
        self.response.body = bytes(self._body)
        self.done = True


def recv_response(sock: socket.socket, rest: bytearray, *, method: str = "GET",
                  keep_body: bool = True) -> Response:
    """Read one whole response from a blocking socket. ``rest`` holds bytes
    already received; on return it holds what came after the response."""
    reader = ResponseReader(method=method, keep_body=keep_body, initial=rest)
    while not reader.done:
        data = sock.recv(RECV_BYTES)
        if not data:
            reader.eof()
            break
        reader.feed(data)
    rest[:] = reader.rest
    assert reader.response is not None
    return reader.response


async def recv_response_async(recv: Callable[[int], Awaitable[bytes]], rest: bytearray, *,
                              method: str = "GET", keep_body: bool = True) -> Response:
    """recv_response for asyncio: ``recv(n)`` is e.g. ``loop.sock_recv`` bound to
    a socket, or a StreamReader's ``read``."""
    reader = ResponseReader(method=method, keep_body=keep_body, initial=rest)
    while not reader.done:
        data = await recv(RECV_BYTES)
        if not data:
            reader.eof()
            break
        reader.feed(data)
    rest[:] = reader.rest
    assert reader.response is not None
    return reader.response


def get_request(path: str, host: str = "xo", *, close: bool = False) -> bytes:
    """A GET request head as the benchmarks and tests send it."""
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
