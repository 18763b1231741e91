"""The reference application: a small HTTP/1.1 load balancer (host) and file
servers (targets) on top of :mod:`xo.engine`, so the whole protocol can be
run and watched without nginx or Ceph.

The host reads each request, picks a target and hands the connection over;
the target serves the file from disk straight to the client, then hands the
connection back at the end of the response, so the next request on the same
keep-alive connection may go to another target.

    python -m xo.refapp --config t0.conf [--log FILE]
    python -m xo.refapp --config host.conf

The config file (xo.appconfig) names the role, the member's addresses,
interface, key, docroot, pin directory and peers; xo-driver reads the same
file. The lab writes them (xo.demo.RefAppCluster); so can anyone else.

``GET /_xo/stats`` on the host answers its counters as JSON (served locally);
a target answers its protocol machine's counters the same way on its plain
HTTP port (8081).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import ssl
import sys
import time
import zlib
from pathlib import Path

from xo import core, http1
from xo import tls as xotls
from xo.appconfig import AppConfig
from xo.core import TlsState, XoError
from xo.daemon import run_event_loop, run_until_signalled
from xo.engine import (
    HostEngine,
    Steering,
    TargetAgent,
    TargetConn,
    TargetLink,
    Timeouts,
    load_key,
)

log = logging.getLogger("xo.refapp")

MAX_HEADER_BYTES = http1.MAX_HEAD_BYTES
HTTP_PORT = 8080
TARGET_HTTP_PORT = 8081  # targets' own plain HTTP, the proxy baseline's upstream
HTTPS_PORT = 8443  # the host's HTTPS listener (tls_cert/tls_key set)

BadRequest = http1.HTTPError  # malformed or unsupported input: answered with 400


class Request:
    """One request: its parsed head (xo.http1) and, once read, its body."""

    def __init__(self, head: http1.Request) -> None:
        if head.chunked:  # as in xo-driver: the body's end must be known up front
            raise BadRequest("chunked request bodies are not supported")
        self.head = head
        self.raw = head.raw  # head, then head + body once the body is read
        self.body = b""
        self.body_len = head.content_length

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def target(self) -> str:
        return self.head.target

    @property
    def version(self) -> str:
        return self.head.version

    @property
    def headers(self) -> dict[str, str]:
        return self.head.headers

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def keep_alive(self) -> bool:
        return self.head.keep_alive


# A client connection: a plain socket, or a TLS session over one (xo.tls)
Conn = socket.socket | xotls.TlsStream


async def _recv_into(sock: Conn, buf: bytearray) -> bool:
    if isinstance(sock, xotls.TlsStream):
        chunk = await sock.recv()
    else:
        chunk = await asyncio.get_running_loop().sock_recv(sock, 262144)
    buf += chunk
    return bool(chunk)


async def _send(sock: Conn, data: bytes) -> None:
    if isinstance(sock, xotls.TlsStream):
        await sock.sendall(data)
    else:
        await asyncio.get_running_loop().sock_sendall(sock, data)


def _close(sock: Conn) -> None:
    (sock.sock if isinstance(sock, xotls.TlsStream) else sock).close()


async def read_head(sock: Conn, buf: bytearray) -> Request | None:
    """The next request's head from buf + the socket (its body, if any, is
    what follows in buf and on the socket); None at a clean EOF."""
    while True:
        end = http1.head_end(buf, what="request")
        if end:
            req = Request(http1.parse_request(bytes(buf[:end])))
            del buf[:end]
            return req
        if not await _recv_into(sock, buf):
            if buf:
                raise BadRequest("connection closed inside a request")
            return None


async def read_body(sock: Conn, buf: bytearray, req: Request) -> None:
    """The rest of req's body: req.body, and req.raw becomes head + body."""
    while len(buf) < req.body_len:
        if not await _recv_into(sock, buf):
            raise BadRequest("connection closed inside a request body")
    req.body = bytes(buf[:req.body_len])
    del buf[:req.body_len]
    req.raw += req.body


async def read_request(sock: Conn, buf: bytearray) -> Request | None:
    """The next whole request from buf + the socket; None at a clean EOF."""
    req = await read_head(sock, buf)
    if req is not None:
        await read_body(sock, buf, req)
    return req


def resolve(docroot: Path, path: str) -> Path | None:
    candidate = (docroot / path.lstrip("/")).resolve()
    if docroot.resolve() not in candidate.parents or not candidate.is_file():
        return None
    return candidate


async def respond(sock: Conn, req: Request, docroot: Path, served_by: str,
                  extra: bytes | None = None) -> int:
    """Answer one request with a file (or extra as JSON); returns body bytes."""
    loop = asyncio.get_running_loop()
    if isinstance(sock, xotls.TlsStream):
        return await _respond_tls(sock, req, docroot, served_by, extra)
    conn_hdr = "keep-alive" if req.keep_alive else "close"
    if extra is not None:
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(extra)}\r\nX-Served-By: {served_by}\r\n"
                f"Connection: {conn_hdr}\r\n\r\n")
        await loop.sock_sendall(sock, head.encode() + extra)
        return len(extra)
    if req.method in ("PUT", "POST"):
        # The reference app keeps no uploads: it answers with what it got,
        # so a client can check every byte arrived (X-Body-SHA256).
        digest = hashlib.sha256(req.body).hexdigest()
        head = (f"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nX-Served-By: {served_by}\r\n"
                f"X-Body-Length: {len(req.body)}\r\nX-Body-SHA256: {digest}\r\n"
                f"Connection: {conn_hdr}\r\n\r\n")
        await loop.sock_sendall(sock, head.encode())
        return 0
    file = resolve(docroot, req.path) if req.method in ("GET", "HEAD") else None
    if file is None:
        status = "405 Method Not Allowed" if req.method not in ("GET", "HEAD") else "404 Not Found"
        body = status.encode() + b"\n"
        head = (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                f"X-Served-By: {served_by}\r\nConnection: {conn_hdr}\r\n\r\n")
        await loop.sock_sendall(sock, head.encode() + body)
        return len(body)
    size = file.stat().st_size
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\nX-Served-By: {served_by}\r\n"
            f"Connection: {conn_hdr}\r\n\r\n")
    await loop.sock_sendall(sock, head.encode())
    if req.method == "HEAD":
        return 0
    with file.open("rb") as f:
        try:
            await loop.sock_sendfile(sock, f)
        except NotImplementedError:  # uvloop's loop has no sock_sendfile (sends nothing)
            while chunk := f.read(256 * 1024):
                await loop.sock_sendall(sock, chunk)
    return size


async def _respond_tls(stream: xotls.TlsStream, req: Request, docroot: Path, served_by: str,
                       extra: bytes | None) -> int:
    """respond() over TLS: the same answer, written through the session."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.setblocking(False)
        # The plain path writes into one end; the other end's bytes go out
        # encrypted. Both run at once, so any response size fits.
        size_box: list[int] = []

        async def produce() -> None:
            try:
                size_box.append(await respond(a, req, docroot, served_by, extra))
            finally:
                a.shutdown(socket.SHUT_WR)

        task = asyncio.ensure_future(produce())
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(b, 262144):
            await stream.sendall(chunk)
        await task
        return size_box[0]
    finally:
        a.close()
        b.close()


async def error_response(sock: Conn, reason: str) -> None:
    body = f"400 Bad Request: {reason}\n".encode()
    head = f"HTTP/1.1 400 Bad Request\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with contextlib.suppress(OSError):
        await _send(sock, head.encode() + body)


def _listen(family: int, ip: str, port: int) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((ip, port))
    listener.listen(512)
    listener.setblocking(False)
    log.info("listening on %s port %d", ip, port)
    return listener


class Upstream:
    """A keep-alive HTTP connection from the host to a target (proxy mode)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    async def connect(cls, ip: str) -> Upstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (ip, TARGET_HTTP_PORT))
        return cls(sock)

    async def relay(self, request: bytes, client: socket.socket, method: str = "GET") -> None:
        """Send one request, stream its response to the client."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, request)
        while not (end := http1.head_end(self.buf, what="response")):
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise OSError("upstream closed")
            self.buf += chunk
        head = http1.parse_response(bytes(self.buf[:end]), method=method)
        if head.framing.chunked:
            raise BadRequest("chunked response bodies are not supported")
        if head.framing.until_close:
            raise BadRequest("the upstream's response has no Content-Length")
        remaining = end + (head.framing.content_length or 0)
        while remaining > 0:
            if not self.buf:
                chunk = await loop.sock_recv(self.sock, 262144)
                if not chunk:
                    raise OSError("upstream closed mid-response")
                self.buf += chunk
            take = min(remaining, len(self.buf))
            await loop.sock_sendall(client, bytes(self.buf[:take]))
            del self.buf[:take]
            remaining -= take


# ---- host -------------------------------------------------------------------


class Host:
    def __init__(self, cfg: AppConfig, key: bytes) -> None:
        self.cfg, self.key, self.docroot = cfg, key, Path(cfg.docroot)
        self.policy, self.mode, self.ingress = cfg.policy, cfg.mode, cfg.ingress
        self.served_locally = 0
        self.proxied = 0
        self.below_min = 0  # requests proxied because of offload_min_bytes
        self.proxy_busy: dict[str, int] = {}   # requests being relayed, per target
        self.proxy_count: dict[str, int] = {}  # requests relayed so far, per target
        self.requests = 0
        self.engine: HostEngine | None = None
        self.tls_ctx: ssl.SSLContext | None = None
        self.keylog: xotls.KeyLog | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, ready: asyncio.Event) -> None:
        cfg = self.cfg
        if self.ingress == "xdp":
            # The lab's veth is no NIC: its bridge-side peer must run XDP itself
            # for XDP_TX frames to arrive, and must hand over full checksums.
            # (A thread: pyroute2's netlink calls run an event loop of their own.)
            from xo.lab import Lab, prepare_xdp_tx

            testbed = Lab.load(cfg.lab)
            await asyncio.to_thread(prepare_xdp_tx, testbed, testbed.member(cfg.name))
        steering = Steering.open(cfg.ifindex, cfg.pin_dir, egress=True, ingress=self.ingress,
                                 owner=cfg.owner or None,
                                 park_ring_bytes=cfg.park_ring_bytes)
        self.engine = HostEngine(self.key, steering, cfg.mac, self._on_return,
                                 timeouts=timeouts(cfg), fault=cfg.crash_at or None)
        try:
            for target in cfg.targets:
                ip, port = cfg.control_address(target)
                await self._connect_with_retry(target.name, ip, target.mac, port)
            # The same port on the host's IPv4 and IPv6 addresses; one engine
            # offloads connections of either family.
            families = [socket.AF_INET] + ([socket.AF_INET6] if cfg.ip6 else [])
            listeners = [self._listen(family) for family in families]
            loops = [self._accept_loop(listener) for listener in listeners]
            if cfg.tls_cert:
                self.tls_ctx, self.keylog = xotls.server_context(cfg.tls_cert, cfg.tls_key)
                loops.append(self._accept_loop(
                    _listen(socket.AF_INET, cfg.ip4, cfg.tls_port or HTTPS_PORT), tls=True))
            ready.set()
            await asyncio.gather(*loops)
        finally:
            dump_times(cfg, self.engine.times.samples)
            await self.engine.close()
            steering.close()

    def _listen(self, family: int) -> socket.socket:
        return _listen(family, self.cfg.address(family == socket.AF_INET6), self.cfg.http_port)

    async def _accept_loop(self, listener: socket.socket, tls: bool = False) -> None:
        loop = asyncio.get_running_loop()
        with listener:
            while True:
                sock, _ = await loop.sock_accept(listener)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._spawn(self._handshake(sock) if tls else self.handle(sock, b""))

    async def _handshake(self, sock: socket.socket) -> None:
        assert self.tls_ctx is not None and self.keylog is not None
        stream = await xotls.accept_tls(sock, self.tls_ctx, self.keylog)
        if stream is not None:
            await self.handle(stream, b"")

    async def _connect_with_retry(self, name: str, ip: str, mac: str,
                                  port: int) -> TargetLink:
        assert self.engine is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                return await self.engine.add_target(name, ip, mac, port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def pick(self, req: Request) -> TargetLink | None:
        assert self.engine is not None
        if self.policy == "path":
            # A per-request rule: the same path always goes to the same target.
            live = sorted((t for t in self.engine.targets.values() if t.up), key=lambda t: t.name)
            return live[zlib.crc32(req.path.encode()) % len(live)] if live else None
        return self.engine.pick(self.policy)

    async def _on_return(self, sock: socket.socket, app_data: bytes,
                         tls: TlsState | None = None) -> None:
        # A TLS session comes back as its record state: the core's record
        # layer continues it here (OpenSSL's copy is stale by now).
        self._spawn(self.handle(xotls.RecordStream(sock, tls) if tls else sock, app_data))

    async def _offload(self, sock: Conn, raw: bytes, link: TargetLink) -> bool:
        assert self.engine is not None
        if not isinstance(sock, xotls.TlsStream):
            return await self.engine.offload(sock, raw, link)
        await sock.drain(self.cfg.drain_timeout_ms / 1000)
        try:
            state = sock.handoff_state()
        except xotls.TlsHandoffError as exc:
            log.info("TLS connection served here: %s", exc)
            return False
        return await self.engine.offload(sock.sock, raw, link, state)

    async def handle(self, sock: Conn, initial: bytes) -> None:
        assert self.engine is not None
        buf = bytearray(initial)
        upstreams: dict[str, Upstream] = {}
        (sock.sock if isinstance(sock, xotls.TlsStream) else sock).setblocking(False)
        try:
            while True:
                req = await read_head(sock, buf)
                if req is None:
                    _close(sock)
                    return
                self.requests += 1
                if req.path == "/_xo/stats":
                    await read_body(sock, buf, req)
                    await respond(sock, req, self.docroot, "host", self.stats_json())
                elif self.mode == "proxy" and isinstance(sock, socket.socket):
                    await read_body(sock, buf, req)
                    await self.proxy(sock, req, upstreams)
                elif isinstance(sock, socket.socket) and self.below_threshold(req):
                    # Too small to pay a handoff out and back: relay it
                    # (plain HTTP; the relay moves bytes between sockets).
                    await read_body(sock, buf, req)
                    await self.proxy(sock, req, upstreams)
                else:
                    # Hand off as soon as the head is here: a request body still
                    # on its way follows the connection to the target.
                    link = self.pick(req) if self.mode == "xo" else None
                    if link is not None and await self._offload(sock, req.raw + bytes(buf), link):
                        return  # the target owns the connection now
                    await read_body(sock, buf, req)
                    self.served_locally += 1
                    await respond(sock, req, self.docroot, "host")
                if not req.keep_alive:
                    _close(sock)
                    return
        except BadRequest as exc:
            await error_response(sock, str(exc))
            _close(sock)
        except (OSError, xotls.TlsHandoffError, XoError) as exc:
            log.info("client connection ended: %s", exc)
            _close(sock)
        finally:
            for upstream in upstreams.values():
                upstream.sock.close()

    def below_threshold(self, req: Request) -> bool:
        """xo mode with offload_min_bytes: a GET or HEAD of a docroot file
        smaller than that is proxied. The size is the host's own stat of its
        docroot (the same files the targets serve); anything else (a missing
        file, a body upload, another method) is handed off as before."""
        if self.mode != "xo" or not self.cfg.offload_min_bytes:
            return False
        if req.method not in ("GET", "HEAD") or req.body_len:
            return False
        file = resolve(self.docroot, req.path)
        if file is None:
            return False
        if file.stat().st_size >= self.cfg.offload_min_bytes:
            return False
        assert self.engine is not None
        if not any(t.up for t in self.engine.targets.values()):
            return False  # nothing to relay from: served here, as a handoff would be
        self.below_min += 1
        return True

    async def proxy(self, sock: socket.socket, req: Request,
                    upstreams: dict[str, Upstream]) -> None:
        """The baseline XO is measured against: relay the request to a target's
        plain HTTP port and every response byte back through the host."""
        assert self.engine is not None
        live = [t for t in self.engine.targets.values() if t.up]
        if not live:
            raise OSError("no target to proxy to")
        # Least busy first, as the xo mode's least_loaded policy does.
        link = min(live, key=lambda t: (self.proxy_busy.get(t.name, 0),
                                        self.proxy_count.get(t.name, 0), t.name))
        self.proxy_busy[link.name] = self.proxy_busy.get(link.name, 0) + 1
        self.proxy_count[link.name] = self.proxy_count.get(link.name, 0) + 1
        try:
            upstream = upstreams.get(link.name)
            if upstream is None:
                upstream = upstreams[link.name] = await Upstream.connect(link.ip)
            await upstream.relay(req.raw, sock, req.method)
        finally:
            self.proxy_busy[link.name] -= 1
        self.proxied += 1

    def stats_json(self) -> bytes:
        assert self.engine is not None
        return json.dumps({
            **self.engine.stats,
            "requests": self.requests,
            "served_locally": self.served_locally,
            "proxied": self.proxied,
            "below_offload_min": self.below_min,
            "offloaded_now": self.engine.offloaded,
            "rules": self.engine.steering.steer.count(),
            "last_handoff_us": self.engine.times.last(),
            "targets": {name: {"up": t.up, "active": t.load.active, "handoffs": t.load.handoffs}
                        for name, t in self.engine.targets.items()},
        }).encode()


# ---- target -----------------------------------------------------------------


class Target:
    def __init__(self, cfg: AppConfig, key: bytes) -> None:
        self.cfg, self.key, self.docroot = cfg, key, Path(cfg.docroot)
        self.agent: TargetAgent | None = None

    async def run(self, ready: asyncio.Event) -> None:
        cfg = self.cfg
        steering = Steering.open(cfg.ifindex, cfg.pin_dir, egress=True,
                                 owner=cfg.owner or None,
                                 park_ring_bytes=cfg.park_ring_bytes)
        self.agent = TargetAgent(self.key, steering, cfg.ip4, self.serve, cfg.crash_at or None,
                                 my_ip6=cfg.ip6 or None, host_ips=cfg.hosts,
                                 timeouts=timeouts(cfg), no_tls=bool(cfg.no_tls))
        listener = _listen(socket.AF_INET, cfg.ip4, TARGET_HTTP_PORT)
        try:
            await self.agent.start(cfg.control_port)
            ready.set()
            log.info("target %s ready on %s:%d", cfg.name, cfg.ip4, cfg.control_port)
            await self._serve_plain_http(listener)
        finally:
            listener.close()
            dump_times(cfg, self.agent.times.samples)
            await self.agent.close()
            steering.close()

    async def _serve_plain_http(self, listener: socket.socket) -> None:
        """Ordinary HTTP on TARGET_HTTP_PORT: the upstream of the proxy baseline."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            sock, _ = await loop.sock_accept(listener)
            task = asyncio.ensure_future(self._plain_connection(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _plain_connection(self, sock: socket.socket) -> None:
        assert self.agent is not None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        try:
            while (req := await read_request(sock, buf)) is not None:
                extra = (json.dumps(self.agent.machine.stats()).encode()
                         if req.path == "/_xo/stats" else None)
                self.agent.bytes_served += await respond(sock, req, self.docroot, self.cfg.name,
                                                         extra)
                if not req.keep_alive:
                    break
        except (BadRequest, OSError) as exc:
            log.info("plain HTTP connection ended: %s", exc)
        finally:
            sock.close()

    def owner_of(self, req: Request) -> str:
        """The target a request belongs to under the "path" policy (the host's
        rule: the same path always goes to the same target)."""
        names = sorted(t.name for t in self.cfg.targets)
        return names[zlib.crc32(req.path.encode()) % len(names)]

    async def serve(self, conn: TargetConn) -> None:
        """Serve the handed-over request(s), then hand the connection back, or
        (--move-policy path) keep it and move it straight to the target the
        next request belongs to."""
        assert self.agent is not None
        buf = bytearray(conn.app_data)
        # A TLS session in user space (no kernel TLS here): the core's
        # record layer continues it from the handed-over state.
        io: Conn = xotls.RecordStream(conn.sock, conn.tls) if conn.tls else conn.sock

        def tls_state() -> TlsState | None:
            return io.handoff_state() if isinstance(io, xotls.TlsStream) else None

        try:
            while True:
                req = await read_request(io, buf)
                if req is None:
                    await conn.closed_by_client()
                    return
                if self.cfg.move_policy == "path":
                    if req.path == "/_xo/stats":  # the host's business
                        if await conn.hand_back(req.raw + bytes(buf), tls_state()):
                            return
                    elif (owner := self.owner_of(req)) != self.cfg.name:
                        dest = next(t.ip for t in self.cfg.targets if t.name == owner)
                        if await conn.move(dest, req.raw + bytes(buf), tls_state()):
                            log.info("conn %x moved to %s", conn.conn_id, owner)
                            return
                sent = await respond(io, req, self.docroot, self.cfg.name)
                self.agent.bytes_served += sent
                log.info("served %s %s bytes=%d conn=%x client=%s", req.method, req.path, sent,
                         conn.conn_id, conn.client)
                if not req.keep_alive:
                    await conn.closed_by_client()
                    return
                if self.cfg.move_policy == "path":
                    continue  # keep it; the next request decides
                drain_timeout = self.cfg.drain_timeout_ms / 1000
                await xotls.wait_send_queue_empty(conn.sock, drain_timeout)
                if xotls.has_kernel_tls(conn.sock):
                    buf += await xotls.read_kernel_tls_pending(
                        conn.sock, drain_timeout, core.MAX_APP_BYTES - len(buf))
                try:
                    state = tls_state()
                except xotls.TlsHandoffError as exc:
                    log.info("conn %x: TLS session kept here: %s", conn.conn_id, exc)
                    continue
                if await conn.hand_back(bytes(buf), state):
                    return
                # The host did not take it back: keep serving here.
        except BadRequest as exc:
            await error_response(io, str(exc))
            await conn.closed_by_client()
        except (OSError, xotls.TlsHandoffError) as exc:
            log.info("conn %x ended on the target: %s", conn.conn_id, exc)
            await conn.closed_by_client()


def timeouts(cfg: AppConfig) -> Timeouts:
    """The protocol's timing knobs from the config (milliseconds there)."""
    knobs: dict[str, float] = {name: ms / 1000 for name, ms in cfg.timeouts.items()}
    if cfg.redirect_ttl_ms:
        knobs["redirect_ttl"] = cfg.redirect_ttl_ms / 1000
    return Timeouts(**knobs, bytes_follow_min=cfg.bytes_follow_min or None)


def dump_times(cfg: AppConfig, samples: dict[str, list[float]]) -> None:
    """Write the per-step handoff timings where the config asks (for the bench)."""
    if cfg.timings:
        Path(cfg.timings).write_text(json.dumps(samples))


# ---- entry point ------------------------------------------------------------


async def _main(cfg: AppConfig) -> int:
    key = load_key(cfg.key)
    app: Host | Target = Host(cfg, key) if cfg.role == "host" else Target(cfg, key)
    return await run_until_signalled(app.run, "reference app")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xo.refapp", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="the member's configuration file (xo.appconfig; the same format "
                             "xo-driver reads)")
    parser.add_argument("--log", help="log file (default stderr)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = AppConfig.load(args.config)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(
        filename=args.log, level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {cfg.role}{'' if cfg.role == 'host' else ':' + cfg.name} "
               "%(name)s %(levelname)s %(message)s")
    return run_event_loop(_main(cfg))


if __name__ == "__main__":
    sys.exit(main())
