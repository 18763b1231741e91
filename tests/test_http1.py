"""xo.http1, the one HTTP/1.1 parser: heads, body framing, keep-alive rules,
and a clear error for each kind of malformed input. The socket helpers run
on real socket pairs."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest
from xo import http1
from xo.http1 import HTTPError, parse_request, parse_response


def req(text: str) -> http1.Request:
    return parse_request(text.encode("latin-1"))


def resp(text: str, method: str = "GET") -> http1.Response:
    return parse_response(text.encode("latin-1"), method=method)


# ---- requests -------------------------------------------------------------------------


def test_request_head_fields_path_and_framing() -> None:
    r = req("GET /a%20b/c.bin?x=1 HTTP/1.1\r\nHost: xo\r\nX-Thing:  v1 \r\n"
            "x-thing: v2\r\n\r\n")
    assert (r.method, r.target, r.version) == ("GET", "/a%20b/c.bin?x=1", "HTTP/1.1")
    assert r.path == "/a b/c.bin"
    assert r.headers == {"host": "xo", "x-thing": "v1, v2"}
    assert r.content_length == 0 and not r.chunked and not r.framing.has_body
    assert r.raw.endswith(b"\r\n\r\n")


def test_request_body_framing() -> None:
    put = req("PUT /o HTTP/1.1\r\nContent-Length: 1234\r\n\r\n")
    assert put.content_length == 1234 and not put.chunked and put.framing.has_body
    chunked = req("POST /o HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
    assert chunked.chunked
    same = req("PUT /o HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
    assert same.content_length == 5


@pytest.mark.parametrize(("version", "connection", "keep"), [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Keep-Alive, Close", False),
    ("HTTP/1.1", "keep-alive", True),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Upgrade, Keep-Alive", True),
])
def test_keep_alive_rules(version: str, connection: str | None, keep: bool) -> None:
    field = f"Connection: {connection}\r\n" if connection else ""
    assert req(f"GET / {version}\r\n{field}\r\n").keep_alive is keep
    assert resp(f"{version} 200 OK\r\nContent-Length: 0\r\n{field}\r\n").keep_alive is keep


@pytest.mark.parametrize(("head", "says"), [
    ("GET /\r\n\r\n", "bad request line"),
    ("GET  / HTTP/1.1\r\n\r\n", "bad request line"),
    ("GET / HTTP/1.1 extra\r\n\r\n", "bad request line"),
    ("G(T / HTTP/1.1\r\n\r\n", "bad request line"),
    ("GET / HTTP/2.0\r\n\r\n", "unsupported version 'HTTP/2.0'"),
    ("GET / SPDY/3\r\n\r\n", "unsupported version"),
    ("GET / HTTP/1.1\r\nno colon here\r\n\r\n", "bad header line 'no colon here'"),
    ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "bad header line 'Bad Name: x'"),
    ("GET / HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n", "obsolete line folding"),
    ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
    ("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "bad Content-Length '-1'"),
    ("PUT / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", "bad Content-Length '1e3'"),
    ("PUT / HTTP/1.1\r\nContent-Length: \r\n\r\n", "bad Content-Length ''"),
    ("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "conflicting Content-Length"),
    ("PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     "both Transfer-Encoding and Content-Length"),
    ("PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
    ("PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "unsupported Transfer-Encoding .gzip, chunked."),
    ("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
     "unsupported Transfer-Encoding"),
    ("GET / HTTP/1.1\r\nA: b\nC: d\r\n\r\n", "bare CR or LF"),
    ("GET / HTTP/1.1\r\n", "does not end with an empty line"),
])
def test_malformed_requests_say_what_is_wrong(head: str, says: str) -> None:
    with pytest.raises(HTTPError, match=says.replace("(", r"\(")):
        req(head)


def test_head_end_waits_then_finds_and_caps() -> None:
    assert http1.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == 0
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert http1.head_end(head + b"BODY") == len(head)
    with pytest.raises(HTTPError, match="request head too large"):
        http1.head_end(b"GET /" + b"a" * 100, limit=64)
    with pytest.raises(HTTPError, match="response head too large"):
        http1.head_end(b"x" * 65, what="response", limit=64)
    # A complete head right at the limit is fine.
    assert http1.head_end(b"a" * 60 + b"\r\n\r\n", limit=64) == 64


# ---- responses ------------------------------------------------------------------------


def test_response_heads_and_framing() -> None:
    r = resp("HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Served-By: t0\r\n\r\n")
    assert (r.version, r.status, r.reason) == ("HTTP/1.1", 200, "OK")
    assert r.framing.content_length == 12 and r.headers["x-served-by"] == "t0"
    assert resp("HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n").reason == ""
    assert resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing.chunked
    until_close = resp("HTTP/1.1 200 OK\r\n\r\n")
    assert until_close.framing.until_close and not until_close.keep_alive
    # No body whatever the fields say: HEAD answers, 204, 304, 1xx.
    assert not resp("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD").framing.has_body
    for code in (204, 304, 100):
        assert not resp(f"HTTP/1.1 {code} X\r\n\r\n").framing.has_body


@pytest.mark.parametrize(("head", "says"), [
    ("HTTP/1.1 20 OK\r\n\r\n", "bad status line"),
    ("HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
    ("HTTP/3 200 OK\r\n\r\n", "bad status line"),
    ("HTTP/1.1\r\n\r\n", "bad status line"),
    ("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length 'x' in the response"),
    ("HTTP/1.1 200 OK\r\n:empty\r\n\r\n", "bad header line"),
])
def test_malformed_responses_say_what_is_wrong(head: str, says: str) -> None:
    with pytest.raises(HTTPError, match=says):
        resp(head)


# ---- chunked bodies -------------------------------------------------------------------


def chunked(data: bytes, size: int, trailer: bytes = b"") -> bytes:
    out = b""
    for i in range(0, len(data), size):
        piece = data[i:i + size]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
def test_chunked_decoder_any_split(step: int) -> None:
    data = os.urandom(5000)
    wire = chunked(data, 1000, b"X-Sum: 1\r\n") + b"NEXT"
    dec = http1.ChunkedDecoder()
    out, buf = b"", bytearray()
    for i in range(0, len(wire), step):
        buf += wire[i:i + step]
        got, used = dec.feed(buf)
        del buf[:used]
        out += got
        if dec.done:
            buf += wire[i + step:]
            break
    assert dec.done and out == data and bytes(buf) == b"NEXT"


@pytest.mark.parametrize(("wire", "says"), [
    (b"zz\r\n", "bad chunk size line 'zz'"),
    (b"\r\n", "bad chunk size line ''"),
    (b"3\r\nabcX\r\n", "chunk data not followed by CRLF"),
    (b"1" * 5000, "chunk line over"),
    (b"0\r\nno colon\r\n\r\n", "bad trailer line 'no colon'"),
    (b"1234567890abcdef0\r\n", "bad chunk size line"),
])
def test_chunked_decoder_refuses_bad_framing(wire: bytes, says: str) -> None:
    with pytest.raises(HTTPError, match=says):
        http1.ChunkedDecoder().feed(wire)


# ---- reading whole responses ----------------------------------------------------------


def test_reader_keeps_what_follows_and_can_count_only() -> None:
    two = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hello", 2))
    first = http1.ResponseReader(initial=two)
    assert first.done and first.response is not None and first.response.body == b"abc"
    second = http1.ResponseReader(initial=first.rest, keep_body=False)
    assert second.done and second.response is not None
    assert second.response.body == b"" and second.response.body_length == 5
    assert second.rest == b""


def test_reader_eof_ends_an_until_close_body_only() -> None:
    r = http1.ResponseReader(initial=b"HTTP/1.0 200 OK\r\n\r\npart")
    r.feed(b"ial")
    assert not r.done
    r.eof()
    assert r.done and r.response is not None and r.response.body == b"partial"
    cut = http1.ResponseReader(initial=b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(HTTPError, match="connection closed inside a response body"):
        cut.eof()
    with pytest.raises(HTTPError, match="connection closed inside a response head"):
        http1.ResponseReader(initial=b"HTTP/1.1 200").eof()


def serve(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send data in small pieces from a thread, then close."""
    def run() -> None:
        with sock:
            for i in range(0, len(data), 1000):
                sock.sendall(data[i:i + 1000])
    t = threading.Thread(target=run)
    t.start()
    return t


def test_recv_response_on_a_socket_pair() -> None:
    body = os.urandom(300_000)
    wire = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, 7777)
            + b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
    a, b = socket.socketpair()
    sender = serve(b, wire)
    with a:
        a.settimeout(30)
        rest = bytearray()
        got = [http1.recv_response(a, rest) for _ in range(3)]
    sender.join()
    assert [r.body for r in got] == [body] * 3
    assert [r.keep_alive for r in got] == [True, True, False]
    assert rest == b""


def test_recv_response_async_and_a_truncated_body() -> None:
    body = os.urandom(50_000)
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 1) + body

    async def main() -> None:
        a, b = socket.socketpair()
        sender = serve(b, wire)
        reader, writer = await asyncio.open_connection(sock=a)
        try:
            with pytest.raises(HTTPError, match="connection closed inside a response body"):
                await http1.recv_response_async(reader.read, bytearray())
        finally:
            writer.close()
            await writer.wait_closed()
            sender.join()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_get_request_parses_back() -> None:
    r = parse_request(http1.get_request("/x.bin", "198.18.0.2", close=True))
    assert (r.method, r.path, r.headers["host"], r.keep_alive) == ("GET", "/x.bin",
                                                                   "198.18.0.2", False)
