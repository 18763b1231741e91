"""The XO front for Ceph RGW (host role): an S3 endpoint that reads each
request and either hands the connection to the agent beside the OSD holding
the object's head, or relays the request through the local radosgw byte for
byte, exactly as a stock gateway answers.

    python -m xo.ceph.front --config xo-ceph.toml [--interface IF] [--log FILE]

A request is handed off when it is a path-style ``GET /bucket/key`` without a
body whose object's head is at least ``threshold`` bytes (or empty: a
multipart object, whose data is all in its parts), the head's acting primary
OSD is up and its agent connected. Everything else (PUT, LIST, HEAD, small
objects, sub-resources, unknown buckets, anything this front cannot place)
goes to radosgw. Correctness never depends on the choice: every agent has a
radosgw of the same zone behind it; the choice only decides which host sends
the bytes.

The targets are the OSDs of the osdmap: the agent of OSD N listens on N's
public address at ``msgr2 port + control_port_offset``. The osdmap is polled
every half second; new OSDs get a control connection, an OSD down or out is
simply not chosen (its PGs have another primary in the next epoch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo import tls as xotls
from xo.ceph.config import ConfigError, XoCephConfig, control_port, load_for_daemon
from xo.ceph.placement import Placement, head_object
from xo.ceph.relay import (
    HttpError,
    Message,
    SockIO,
    TlsIO,
    UpstreamPool,
    exchange,
    read_head,
    split_path,
)
from xo.core import TlsState, XoError
from xo.daemon import run_event_loop, run_until_signalled
from xo.engine import HostEngine, ProtocolError, Steering, TargetLink, load_key

log = logging.getLogger("xo.ceph.front")

POLL_S = 0.5
STAT_CACHE_S = 2.0     # a large (or empty) head's size
SMALL_CACHE_S = 30.0   # a small or missing object's: it is served here either way
STAT_TIMEOUT_S = 5.0
TLS_DRAIN_S = 2.0      # a TLS session moves only once our records were acknowledged
ADMIN_TIMEOUT_S = 10.0
# Sub-resources that make a GET something other than reading object data.
OBJECT_QUERY_OK = {"x-id", "versionId", "partNumber", "response-content-type",
                   "response-content-language", "response-expires", "response-cache-control",
                   "response-content-disposition", "response-content-encoding",
                   "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                   "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token",
                   "AWSAccessKeyId", "Signature", "Expires"}


@dataclass
class Counters:
    requests: int = 0
    proxied: int = 0
    offloaded: int = 0
    offload_failed: int = 0
    small_or_unplaced: int = 0   # below the threshold, or no head / bucket found
    stats: int = 0               # head objects stat'ed (cache misses)
    unplaced: int = 0            # placed on an OSD whose agent is not up
    returned: int = 0
    per_osd: dict[str, int] = field(default_factory=dict)
    tls_handshakes: int = 0      # HTTPS connections accepted (one handshake each)
    tls_failed: int = 0          # handshakes that failed
    tls_offloaded: int = 0       # offloads of a TLS connection (with its record state)
    tls_returned: int = 0        # TLS connections handed back (continued here by the
                                 # core's record layer)
    tls_kept: int = 0            # not at a record boundary: served here
    tls_versions: dict[str, int] = field(default_factory=dict)  # handshakes per version


class Front:
    def __init__(self, cfg: XoCephConfig, interface: str, name: str = "front") -> None:
        assert cfg.front is not None
        self.cfg, self.fcfg, self.interface, self.name = cfg, cfg.front, interface, name
        self.counters = Counters()
        self.engine: HostEngine | None = None
        self.placement: Placement | None = None
        self._rados: Any = None
        self._ioctxs: dict[str, Any] = {}  # pool -> Ioctx, used on the loop's thread only
        self.pool: UpstreamPool | None = None
        self._stat_cache: dict[tuple[str, str], tuple[float, int | None]] = {}
        self._links: dict[int, TargetLink] = {}
        self._connecting: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.tls_ctx: ssl.SSLContext | None = None
        self.keylog: xotls.KeyLog | None = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- cluster access (blocking; called in threads) ---------------------------------

    def _connect_rados(self) -> None:
        import rados

        self._rados = rados.Rados(conffile=self.cfg.ceph_conf,
                                  conf={"client_mount_timeout": "10",
                                        "rados_mon_op_timeout": "10",
                                        "rados_osd_op_timeout": "5"})
        self._rados.connect(timeout=10)

    def _mon(self, prefix: str, **args: Any) -> Any:
        ret, out, err = self._rados.mon_command(
            json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=10)
        if ret != 0:
            raise RuntimeError(f"{prefix}: {err} ({ret})")
        return json.loads(out)

    def _admin(self, *args: str) -> str:
        res = subprocess.run(["radosgw-admin", "-c", self.cfg.ceph_conf, *args],
                             capture_output=True, text=True, timeout=ADMIN_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"radosgw-admin {' '.join(args)}: {res.stderr.strip()[-300:]}")
        return res.stdout

    async def _head_size(self, pool: str, oid: str, locator: str) -> int | None:
        """The head object's size (None: no such object) by an asynchronous
        stat: librados completes it on its own thread, the loop gets the
        result; no executor thread."""
        ioctx = self._ioctxs.get(pool)
        if ioctx is None:
            ioctx = self._ioctxs[pool] = await asyncio.to_thread(self._rados.open_ioctx, pool)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()

        def settle(ret: int, size: int | None) -> None:
            if fut.done():
                return
            if ret == -errno.ENOENT:
                fut.set_result(None)
            elif ret < 0 or size is None:
                fut.set_exception(RuntimeError(f"stat {pool}/{oid}: {os.strerror(-ret)}"))
            else:
                fut.set_result(int(size))

        def done(completion: Any, size: int | None, _mtime: Any) -> None:
            loop.call_soon_threadsafe(settle, completion.get_return_value(), size)

        # An Ioctx keeps the locator as state; the operation copies it when
        # submitted, and only this thread uses these Ioctx objects.
        ioctx.set_locator_key(locator)
        try:
            ioctx.aio_stat(oid, done)
        finally:
            ioctx.set_locator_key("")
        return await asyncio.wait_for(fut, STAT_TIMEOUT_S)

    def _remember_size(self, bucket: str, key: str, size: int | None) -> None:
        ttl = STAT_CACHE_S if size is not None and (
            size == 0 or size >= self.fcfg.threshold) else SMALL_CACHE_S
        if len(self._stat_cache) > 100_000:
            self._stat_cache.clear()
        self._stat_cache[(bucket, key)] = (time.monotonic() + ttl, size)

    async def _decide(self, bucket_name: str, key: str) -> tuple[int, str] | None:
        """(primary OSD, reason) when the GET is worth handing off, else None.
        Everything is cached (bucket marker, head size, PG primary); only a
        miss costs a radosgw-admin run or a mon command (on a thread) or an
        asynchronous stat."""
        placement = self.placement
        assert placement is not None
        bucket = placement.cached_bucket(bucket_name)
        if bucket is None:
            bucket = await asyncio.to_thread(placement.bucket, bucket_name)
            if bucket is None:
                return None
        oid, locator = head_object(bucket.marker, key)
        cached = self._stat_cache.get((bucket_name, key))
        if cached is not None and cached[0] > time.monotonic():
            size = cached[1]
        else:
            self.counters.stats += 1
            size = await self._head_size(bucket.data_pool, oid, locator)
            self._remember_size(bucket_name, key, size)
        if size is None:
            placement.forget_bucket(bucket_name)  # maybe recreated: new marker
            return None
        if 0 < size < self.fcfg.threshold:
            return None
        where = placement.cached_primary(bucket.data_pool, oid, locator)
        if where is None:
            where = await asyncio.to_thread(placement.primary, bucket.data_pool, oid, locator)
        if where is None or where[2] < 0:
            return None
        return where[2], f"pg {where[0]}.{where[1]:x}"

    # ---- targets from the osdmap ------------------------------------------------------

    async def _follow_osdmap(self) -> None:
        assert self.placement is not None
        while True:
            try:
                changed = await asyncio.to_thread(self.placement.refresh)
                if changed:
                    assert self.placement.osdmap is not None
                    log.info("osdmap epoch %d", self.placement.osdmap.epoch)
                    self._sync_targets()
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                log.warning("osdmap poll: %s", exc)
            await asyncio.sleep(POLL_S)

    def _sync_targets(self) -> None:
        assert self.placement is not None and self.placement.osdmap is not None
        for osd in self.placement.osdmap.osds.values():
            if not osd.up or not osd.ip:
                continue
            port = control_port(osd.port, self.cfg.control_port_offset)
            link = self._links.get(osd.id)
            if link is not None:
                if (link.ip, link.port) != (osd.ip, port):
                    log.info("osd.%d moved to %s:%d", osd.id, osd.ip, port)
                    link.ip, link.port = osd.ip, port  # the engine reconnects there
                continue
            if osd.id not in self._connecting:
                self._connecting.add(osd.id)
                self._spawn(self._add_target(osd.id, osd.ip, port))

    async def _add_target(self, osd: int, ip: str, port: int) -> None:
        assert self.engine is not None
        try:
            while osd not in self._links:
                try:
                    mac = await asyncio.to_thread(neighbour_mac, ip)
                    self._links[osd] = await self.engine.add_target(f"osd.{osd}", ip, mac, port)
                    log.info("agent of osd.%d at %s:%d connected", osd, ip, port)
                except (OSError, ProtocolError, RuntimeError) as exc:
                    log.info("agent of osd.%d at %s:%d not reachable yet: %s", osd, ip, port,
                             exc)
                    self.engine.targets.pop(f"osd.{osd}", None)
                    await asyncio.sleep(1.0)
        finally:
            self._connecting.discard(osd)

    def _target_for(self, osd: int) -> TargetLink | None:
        assert self.placement is not None and self.placement.osdmap is not None
        info = self.placement.osdmap.osds.get(osd)
        link = self._links.get(osd)
        if info is None or not info.up or link is None or not link.up:
            return None
        return link

    # ---- serving ----------------------------------------------------------------------

    async def run(self, ready: asyncio.Event) -> None:
        await asyncio.to_thread(self._connect_rados)
        self.placement = Placement(self._mon, self._admin)
        await asyncio.to_thread(self.placement.refresh)
        steering = None
        if self.fcfg.offload:
            ifindex = socket.if_nametoindex(self.interface)
            steering = Steering.open(ifindex, f"{self.cfg.pin_root}/{self.name}",
                                     egress=True)
            # (a thread: pyroute2's netlink calls run an event loop of their own)
            mac = await asyncio.to_thread(interface_mac, ifindex)
            self.engine = HostEngine(load_key(self.cfg.key), steering, mac, self._on_return)
            self._sync_targets()
        listeners = [(listen_socket(self.fcfg.listen), False)]
        if self.fcfg.tls_listen is not None:
            # Python's ssl (OpenSSL) over memory BIOs: every record is seen,
            # so a session can move at a record boundary (xo.tls).
            self.tls_ctx, self.keylog = xotls.server_context(self.fcfg.tls_cert,
                                                             self.fcfg.tls_key)
            listeners.append((listen_socket(self.fcfg.tls_listen), True))
        self.pool = UpstreamPool(*self.fcfg.rgw)
        self._spawn(self._follow_osdmap())
        if self.fcfg.stats:
            self._spawn(self._write_stats())
        log.info("S3 front on %s:%d, radosgw %s:%d, threshold %d bytes, offload %s",
                 *self.fcfg.listen, *self.fcfg.rgw, self.fcfg.threshold, self.fcfg.offload)
        if self.fcfg.tls_listen is not None:
            log.info("HTTPS on %s:%d (%s)", *self.fcfg.tls_listen, self.fcfg.tls_cert)
        ready.set()
        try:
            await asyncio.gather(*(self._accept_loop(sock, tls) for sock, tls in listeners))
        finally:
            for sock, _tls in listeners:
                sock.close()
            if self.keylog is not None:
                self.keylog.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.fcfg.stats:
                self._dump_stats()
            if self.engine is not None:
                await self.engine.close()
            if steering is not None:
                steering.close()
            if self.pool is not None:
                self.pool.close()
            for ioctx in self._ioctxs.values():
                ioctx.close()
            if self._rados is not None:
                self._rados.shutdown()

    async def _accept_loop(self, listener: socket.socket, tls: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._handshake(sock) if tls else self.handle(sock, b""))

    async def _handshake(self, sock: socket.socket) -> None:
        assert self.tls_ctx is not None and self.keylog is not None
        stream = await xotls.accept_tls(sock, self.tls_ctx, self.keylog)
        if stream is None:
            self.counters.tls_failed += 1
            return
        self.counters.tls_handshakes += 1
        version = str(stream.obj.version())
        self.counters.tls_versions[version] = self.counters.tls_versions.get(version, 0) + 1
        await self.handle(stream, b"")

    async def _on_return(self, sock: socket.socket, app_data: bytes,
                         tls: TlsState | None = None) -> None:
        self.counters.returned += 1
        if tls is not None:
            # OpenSSL's copy of the session is stale now: the core's record
            # layer continues it from the state the agent handed back.
            self.counters.tls_returned += 1
            self._spawn(self.handle(xotls.RecordStream(sock, tls), app_data))
        else:
            self._spawn(self.handle(sock, app_data))

    def _offloadable(self, req: Message) -> tuple[str, str] | None:
        if req.method != "GET" or req.body_framing()[0] != "none" or self.engine is None:
            return None
        bucket, key, query = split_path(req.target)
        if not bucket or not key:
            return None
        for item in query.split("&") if query else []:
            if item.partition("=")[0] not in OBJECT_QUERY_OK:
                return None
        return bucket, key

    async def handle(self, sock: socket.socket | xotls.TlsStream, initial: bytes) -> None:
        """Serve a client connection (plain, or TLS: the same requests in
        plaintext through its session) until it closes or is handed off."""
        assert self.pool is not None
        buf = bytearray(initial)
        client: SockIO | None = (TlsIO(sock) if isinstance(sock, xotls.TlsStream)
                                 else SockIO(sock))
        upstream: SockIO | None = None
        reusable = False
        try:
            while client is not None:
                req = await read_head(client, buf)
                if req is None:
                    return
                self.counters.requests += 1
                target = self._offloadable(req)
                if target is not None and await self._try_offload(client, buf, req, *target):
                    client = None  # the agent owns it (the engine detached our socket)
                    return
                if upstream is None:
                    upstream = await self.pool.get()
                reusable = False
                resp, sent = await exchange(client, buf, req, upstream)
                self.counters.proxied += 1
                if target is not None and resp.status == 200 and req.header("range") is None:
                    self._remember_size(*target, sent)
                if resp.connection_close:
                    return
                reusable = True
                if req.connection_close:
                    return
        except (HttpError, OSError, xotls.TlsHandoffError, XoError) as exc:
            log.info("client connection ended: %s", exc)
        finally:
            if upstream is not None:
                if reusable:
                    self.pool.put(upstream)
                else:
                    upstream.close()
            if client is not None:
                client.close()

    async def _try_offload(self, client: SockIO, buf: bytearray, req: Message,
                           bucket: str, key: str) -> bool:
        assert self.engine is not None
        cached = self._stat_cache.get((bucket, key))
        if cached is not None and cached[0] > time.monotonic() and (
                cached[1] is None or 0 < cached[1] < self.fcfg.threshold):
            # known small or missing: straight to radosgw
            self.counters.small_or_unplaced += 1
            return False
        try:
            decision = await self._decide(bucket, key)
        except (TimeoutError, RuntimeError, OSError, ValueError, KeyError) as exc:
            log.info("GET %s: not placed: %s", req.target, exc)
            decision = None
        if decision is None:
            self.counters.small_or_unplaced += 1
            return False
        osd, where = decision
        link = self._target_for(osd)
        if link is None:
            self.counters.unplaced += 1
            return False
        tls: TlsState | None = None
        if isinstance(client, TlsIO):
            # The session moves with its record state, at a record boundary
            # with our records acknowledged (xo.tls); otherwise it is served here.
            await client.stream.drain(TLS_DRAIN_S)
            try:
                tls = client.stream.handoff_state()
            except xotls.TlsHandoffError as exc:
                self.counters.tls_kept += 1
                log.info("GET %s: TLS session served here: %s", req.target, exc)
                return False
        client.release()
        if await self.engine.offload(client.sock, req.raw + bytes(buf), link, tls):
            self.counters.offloaded += 1
            self.counters.tls_offloaded += tls is not None
            self.counters.per_osd[link.name] = self.counters.per_osd.get(link.name, 0) + 1
            log.info("offloaded GET %s to %s (primary of %s)", req.target, link.name, where)
            return True
        self.counters.offload_failed += 1
        log.info("GET %s: handoff to %s rolled back; served here", req.target, link.name)
        return False

    # ---- stats ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        c = self.counters
        out: dict[str, Any] = {
            "requests": c.requests, "proxied": c.proxied, "offloaded": c.offloaded,
            "offload_failed": c.offload_failed, "small_or_unplaced": c.small_or_unplaced,
            "unplaced": c.unplaced, "stats": c.stats,
            "upstream_connects": self.pool.connects if self.pool else 0,
            "returned": c.returned, "per_osd": dict(c.per_osd),
            "tls": {"handshakes": c.tls_handshakes, "failed": c.tls_failed,
                    "offloaded": c.tls_offloaded, "returned": c.tls_returned,
                    "kept": c.tls_kept, "versions": dict(c.tls_versions)},
            "epoch": self.placement.osdmap.epoch if self.placement and self.placement.osdmap
            else 0,
            "pg_lookups": self.placement.lookups if self.placement else 0,
            "agents": {f"osd.{o}": link.up for o, link in sorted(self._links.items())},
        }
        if self.engine is not None:
            out["engine"] = self.engine.stats
        return out

    def _dump_stats(self) -> None:
        path = Path(self.fcfg.stats)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats()))
        tmp.replace(path)

    async def _write_stats(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self._dump_stats()
            await asyncio.sleep(POLL_S)


def listen_socket(addr: tuple[str, int]) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(addr)
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


def interface_mac(ifindex: int) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifindex)
        return str(links[0].get_attr("IFLA_ADDRESS"))


def neighbour_mac(ip: str, timeout: float = 2.0) -> str:
    """The MAC of a directly reachable address (the redirect rewrites to it);
    a datagram to its discard port makes the kernel resolve it."""
    from pyroute2 import IPRoute

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        with contextlib.suppress(OSError):
            probe.sendto(b"", (ip, 9))
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        while True:
            for neigh in ipr.get_neighbours(dst=ip):
                mac = neigh.get_attr("NDA_LLADDR")
                if mac and neigh["state"] not in (0x20, 0x01):  # FAILED, INCOMPLETE
                    return str(mac)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no neighbour entry for {ip}")
            time.sleep(0.02)


async def _main(front: Front) -> int:
    return await run_until_signalled(front.run, "front", (RuntimeError, OSError, ConfigError))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xo.ceph.front",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the XO for Ceph config file")
    parser.add_argument("--interface", help="override [front] interface")
    parser.add_argument("--name", default="front", help="pin directory name")
    parser.add_argument("--log", help="log file (default stderr)")
    args = parser.parse_args(argv)
    cfg = load_for_daemon(parser, args.config, "front", args.log, "front")
    assert cfg.front is not None
    front = Front(cfg, args.interface or cfg.front.interface, args.name)
    os.umask(0o022)
    return run_event_loop(_main(front))


if __name__ == "__main__":
    sys.exit(main())
