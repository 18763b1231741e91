"""The XO agent beside an OSD (target role): adopts client connections the
front hands over and has each request answered by the radosgw on this host,
then hands the connection back at the request boundary.

    python -m xo.ceph.agent --config xo-ceph.toml --osd N [--interface IF]

It listens on its OSD's public address, on the port derived from the OSD's
msgr2 port (``xo.ceph.config.control_port``), both read from the osdmap, so
the front finds it with no inventory. The protocol is the core's machine,
driven by ``xo.engine.TargetAgent``; this module only moves bytes: the
request up to radosgw (TCP_NODELAY), the response head back through user
space, the response body socket -> pipe -> socket with splice(2).

A connection the front accepted over HTTPS comes with its TLS session's
record state. Without kernel TLS (the usual case) the core's record layer
continues the session here (``xo.tls.RecordStream``): the request is
decrypted, the response read from radosgw into user space and sealed into
records, so no splice; at the request boundary the connection goes back
with the session's state as it is then. ``[agent] tls = false`` refuses
TLS connections (the front rolls back and serves them itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import sys
import termios
import time

from xo import tls as xotls
from xo.ceph.config import ConfigError, XoCephConfig, control_port, load_for_daemon
from xo.ceph.relay import HttpError, SockIO, Splicer, TlsIO, UpstreamPool, exchange, read_head
from xo.core import TlsState, XoError
from xo.daemon import run_event_loop, run_until_signalled
from xo.engine import Steering, TargetAgent, TargetConn, load_key

log = logging.getLogger("xo.ceph.agent")

OSD_WAIT_S = 60.0
ADDR_POLL_S = 2.0
DRAIN_TIMEOUT_S = 2.0
DRAIN_TICK_S = 0.0005
DRAIN_MAX_SLEEP_S = 0.02


async def wait_acked(sock: socket.socket, timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Wait until the client acknowledged everything sent (the send queue is
    empty), so the front does not have to carry our unsent bytes; at most
    timeout. A spliced body sits in the send queue almost whole and drains at
    the link's pace: the wait sleeps for most of the time the rest needs at
    the drain rate it observes, then ticks, instead of ticking every half
    millisecond through a whole transfer."""
    out = bytearray(4)
    start = last_t = time.monotonic()
    deadline = start + timeout
    last_q = -1
    while True:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)
        queued = struct.unpack("i", out)[0]
        now = time.monotonic()
        if queued == 0:
            return True
        if now >= deadline:
            return False
        wait = DRAIN_TICK_S
        if 0 < last_q and queued < last_q:
            rate = (last_q - queued) / (now - last_t)
            wait = max(DRAIN_TICK_S, min(0.8 * queued / rate, DRAIN_MAX_SLEEP_S))
        last_q, last_t = queued, now
        await asyncio.sleep(min(wait, deadline - now))


def osd_address(command: object, osd: int) -> tuple[str, int] | None:
    from xo.ceph.placement import OsdMap

    dump = command("osd dump")  # type: ignore[operator]
    info = OsdMap.from_dump(dump).osds.get(osd)
    if info is None or not info.up or not info.ip:
        return None
    return info.ip, info.port


def open_mon(ceph_conf: str, timeout: float = 10.0) -> object:
    import rados

    handle = rados.Rados(conffile=ceph_conf, conf={"client_mount_timeout": str(int(timeout)),
                                                   "rados_mon_op_timeout": str(int(timeout))})
    handle.connect(timeout=int(timeout))
    return handle


def mon_command(handle: object):  # type: ignore[no-untyped-def]
    def command(prefix: str, **args: object) -> object:
        ret, out, err = handle.mon_command(  # type: ignore[attr-defined]
            json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=10)
        if ret != 0:
            raise RuntimeError(f"{prefix}: {err} ({ret})")
        return json.loads(out)
    return command


class Agent:
    def __init__(self, cfg: XoCephConfig, osd: int, interface: str, name: str,
                 tls: bool | None = None) -> None:
        assert cfg.agent is not None
        self.cfg, self.osd, self.interface, self.name = cfg, osd, interface, name
        self.tls = cfg.agent.tls if tls is None else tls
        self.rgw = cfg.agent.rgw
        self.served = 0
        self.agent: TargetAgent | None = None
        self.pool = UpstreamPool(*self.rgw)
        self._splicers: list[Splicer] = []

    async def run(self, ready: asyncio.Event) -> None:
        handle = await asyncio.to_thread(open_mon, self.cfg.ceph_conf)
        command = mon_command(handle)
        try:
            addr = None
            deadline = time.monotonic() + OSD_WAIT_S
            while addr is None:
                addr = await asyncio.to_thread(osd_address, command, self.osd)
                if addr is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"osd.{self.osd} not up in the osdmap after "
                                           f"{OSD_WAIT_S:.0f} s")
                    await asyncio.sleep(0.5)
            ip, msgr2 = addr
            port = control_port(msgr2, self.cfg.control_port_offset)
            ifindex = socket.if_nametoindex(self.interface)
            pin_dir = f"{self.cfg.pin_root}/{self.name}"
            steering = Steering.open(ifindex, pin_dir, egress=True)
            assert self.cfg.agent is not None
            # A TLS session comes with kernel TLS where the kernel has it
            # (plaintext on the socket, spliced as a plain one) or as its
            # record state for the core's record layer; no_tls refuses both.
            self.agent = TargetAgent(load_key(self.cfg.key), steering, ip, self.serve,
                                     host_ips=self.cfg.agent.hosts, no_tls=not self.tls)
            try:
                await self.agent.start(port)
                log.info("agent for osd.%d on %s:%d (msgr2 port %d), radosgw %s:%d, TLS %s",
                         self.osd, ip, port, msgr2, *self.rgw,
                         "taken" if self.tls else "refused")
                ready.set()
                while True:  # follow the OSD: a restarted OSD may have a new port
                    await asyncio.sleep(ADDR_POLL_S)
                    with contextlib.suppress(RuntimeError, OSError):
                        now = await asyncio.to_thread(osd_address, command, self.osd)
                        if now is not None and now != (ip, msgr2):
                            raise RuntimeError(f"osd.{self.osd} moved to {now[0]}:{now[1]}; "
                                               f"restart the agent to follow it")
            finally:
                await self.agent.close()
                steering.close()
                self.pool.close()
                for splicer in self._splicers:
                    splicer.close()
        finally:
            handle.shutdown()  # type: ignore[attr-defined]

    async def serve(self, conn: TargetConn) -> None:
        """Answer the handed-over request(s) through the local radosgw (a
        pooled keep-alive connection), then give the connection back."""
        assert self.agent is not None
        if conn.tls is not None:
            await self.serve_tls(conn, conn.tls)
            return
        buf = bytearray(conn.app_data)
        client = SockIO(conn.sock)
        upstream: SockIO | None = None
        splicer = self._splicers.pop() if self._splicers else Splicer()
        clean = False  # upstream and splicer are between messages
        try:
            while True:
                req = await read_head(client, buf)
                if req is None:
                    clean = True
                    client.release()
                    await conn.closed_by_client()
                    return
                if upstream is None:
                    upstream = await self.pool.get()
                clean = False
                resp, sent = await exchange(client, buf, req, upstream, splicer=splicer)
                self.agent.bytes_served += sent
                log.info("served %s %s status=%d bytes=%d conn=%x client=%s", req.method,
                         req.target, resp.status, sent, conn.conn_id, conn.client)
                clean = not resp.connection_close
                if req.connection_close or resp.connection_close:
                    client.release()
                    await conn.closed_by_client()
                    return
                # the upstream connection is free again: let others use it
                self.pool.put(upstream)
                upstream = None
                await wait_acked(conn.sock)
                client.release()
                if await conn.hand_back(bytes(buf)):
                    return
                # the front did not take it back: keep serving here
        except (HttpError, OSError) as exc:
            log.info("conn %x ended on the agent: %s", conn.conn_id, exc)
            client.release()
            await conn.closed_by_client()
        finally:
            if upstream is not None:
                if clean:
                    self.pool.put(upstream)
                else:
                    upstream.close()
            if clean and len(self._splicers) < 64:
                self._splicers.append(splicer)
            else:
                splicer.close()


    async def serve_tls(self, conn: TargetConn, state: TlsState) -> None:
        """serve() for a TLS session kept in user space: the core's record
        layer decrypts the request and seals the response (read from radosgw
        through user space: records cannot be spliced); at the request
        boundary the connection goes back with the session's state."""
        assert self.agent is not None
        stream = xotls.RecordStream(conn.sock, state)
        buf = bytearray(conn.app_data)  # plaintext the front read past the request
        client = TlsIO(stream)
        upstream: SockIO | None = None
        try:
            while True:
                req = await read_head(client, buf)
                if req is None:
                    await conn.closed_by_client()
                    return
                if upstream is None:
                    upstream = await self.pool.get()
                resp, sent = await exchange(client, buf, req, upstream)
                self.agent.bytes_served += sent
                log.info("served %s %s status=%d bytes=%d conn=%x client=%s tls=record",
                         req.method, req.target, resp.status, sent, conn.conn_id, conn.client)
                if req.connection_close or resp.connection_close:
                    if resp.connection_close:
                        upstream.close()
                        upstream = None
                    await conn.closed_by_client()
                    return
                self.pool.put(upstream)
                upstream = None
                await wait_acked(conn.sock)
                try:
                    tls = stream.handoff_state()
                except xotls.TlsHandoffError as exc:
                    log.info("conn %x: TLS session kept here: %s", conn.conn_id, exc)
                    continue
                if await conn.hand_back(bytes(buf), tls):
                    return
                # the front did not take it back: keep serving here
        except (HttpError, OSError, xotls.TlsHandoffError, XoError) as exc:
            log.info("conn %x ended on the agent: %s", conn.conn_id, exc)
            await conn.closed_by_client()
        finally:
            if upstream is not None:
                upstream.close()  # between requests it went back to the pool


async def _main(agent: Agent) -> int:
    return await run_until_signalled(agent.run, "agent", (RuntimeError, OSError, ConfigError))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xo.ceph.agent", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--config", required=True, help="the XO for Ceph config file")
    parser.add_argument("--osd", type=int, required=True, help="the OSD id this agent serves")
    parser.add_argument("--interface", help="override [agent] interface")
    parser.add_argument("--name", help="pin directory name (default osd.N)")
    parser.add_argument("--no-tls", action="store_true",
                        help="refuse TLS connections (overrides [agent] tls)")
    parser.add_argument("--log", help="log file (default stderr)")
    args = parser.parse_args(argv)
    cfg = load_for_daemon(parser, args.config, "agent", args.log, f"agent:osd.{args.osd}")
    assert cfg.agent is not None
    agent = Agent(cfg, args.osd, args.interface or cfg.agent.interface,
                  args.name or f"osd.{args.osd}", False if args.no_tls else None)
    return run_event_loop(_main(agent))


if __name__ == "__main__":
    sys.exit(main())
