"""The asyncio driver of the core's handoff protocol machine
(``xo_core/include/xo_proto.h``): :class:`HostEngine` on the load balancer,
:class:`TargetAgent` on each backend.

The protocol itself - the outbound and inbound step order, the commit rule,
rollback, peer checks, port remapping, rule lifetimes, liveness and every
deadline - lives in the C machine, shared with the nginx module and the C
driver. This module only moves bytes between the control connections and
the machine, hands it sockets, calls it when its deadline comes, and turns
its events into futures and application callbacks. docs/architecture.md
describes the protocol and its states.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from xo import core, proto
from xo.core import Endpoint, XoError
from xo.proto import DEFAULT_CONTROL_PORT, DONE_FLAG_CLOSED, Ev, Event, Machine, Role, Timeouts
from xo.steer import Prog, RuleManager, Steer

__all__ = [
    "DEFAULT_CONTROL_PORT", "DONE_FLAG_CLOSED", "HostEngine", "ProtocolError", "Steering",
    "TargetAgent", "TargetConn", "TargetLink", "Timeouts", "load_key", "probe_client",
    "write_key",
]

log = logging.getLogger("xo.engine")

CONNECT_TIMEOUT_S = 5.0
DEFAULTS = Timeouts()  # the core's defaults
RECONNECT_INTERVAL_S = 1.0


def load_key(path: str | Path) -> bytes:
    """The cluster key: a file of 16..64 random bytes that only its owner can read."""
    return proto.load_key(str(path))


def write_key(path: str | Path) -> bytes:
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def probe_client(local: Endpoint, client: Endpoint, snd_una: int, rcv_nxt: int) -> None:
    """Make a client whose connection has no owner left reset it (see
    xo_probe_client in xo_proto.h)."""
    c_local = core.ffi.new("struct xo_endpoint *")
    c_client = core.ffi.new("struct xo_endpoint *")
    local.to_c(c_local)
    client.to_c(c_client)
    core.raise_for(core.lib.xo_probe_client(c_local, c_client, snd_una & 0xFFFFFFFF,
                                            rcv_nxt & 0xFFFFFFFF))


class ProtocolError(Exception):
    """A handoff could not happen (peer down, refused, connection lost)."""


INGRESS_PATHS = ("tc", "xdp")


@dataclass
class Steering:
    """The rules of one interface: the loaded programs and a rule manager."""

    steer: Steer
    rules: RuleManager
    ifindex: int
    owner: int
    ingress: str = "tc"

    @classmethod
    def open(cls, ifindex: int, pin_dir: str, *, egress: bool, backend: str = "none",
             owner: int | None = None, ingress: str = "tc",
             park_ring_bytes: int = 0) -> Steering:
        """Load the programs and attach them to ``ifindex``.

        ``ingress`` picks the program that blocks and redirects the client's
        packets: ``"tc"`` (clsact ingress; redirects with ``bpf_redirect``)
        or ``"xdp"`` (the XDP program, attached instead; redirects with
        ``XDP_TX``). XDP expects what a NIC delivers: complete checksums,
        no GSO. On a veth, ``XDP_TX`` only reaches the peer if the peer runs
        an XDP program itself (see docs/steering.md and
        ``xo.lab.prepare_xdp_tx``). The source rewrite (``egress``) is tc
        either way.
        """
        if ingress not in INGRESS_PATHS:
            raise ValueError(f"ingress {ingress!r}: one of {', '.join(INGRESS_PATHS)}")
        steer = Steer(pin_dir=pin_dir, park_ring_bytes=park_ring_bytes)
        # The owner id names the role instance (its pin directory), not the
        # process: a restarted agent purges what its crashed predecessor left.
        owner = owner if owner is not None else zlib.crc32(pin_dir.encode()) & 0x7FFFFFFF
        try:
            steer.purge_owner(owner)
            steer.attach(ifindex, Prog.XDP if ingress == "xdp" else Prog.TC_INGRESS)
            if egress:
                steer.attach(ifindex, Prog.TC_EGRESS)
            rules = RuleManager(steer, ifindex, backend)
        except BaseException:
            steer.close()  # detaches whatever was attached already
            raise
        return cls(steer, rules, ifindex, owner, ingress)

    def close(self) -> None:
        self.rules.close()
        self.steer.close(unpin=True)


class StepTimes:
    """Microseconds spent in each protocol step (``xo bench handoff``, paper
    Table 3), as the machine recorded them: names are "<transfer>.<step>"."""

    CAP = 100_000  # samples per step; enough for any benchmark run

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._samples: dict[str, list[float]] = {}

    @property
    def samples(self) -> dict[str, list[float]]:
        for name, micros in self._machine.take_steps():
            bucket = self._samples.setdefault(name, [])
            if len(bucket) < self.CAP:
                bucket.append(micros)
        return self._samples

    def last(self) -> dict[str, float]:
        return {name: round(v[-1], 1) for name, v in self.samples.items() if v}


class _Control(asyncio.Protocol):
    """One control connection: bytes in and out of the machine."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.peer = 0
        self.early = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peername: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            proto.ctl_sock_setup(sock.fileno(), self.driver.peer_timeout_s)
        self.driver._control_made(self)

    def data_received(self, data: bytes) -> None:
        if self.peer:
            self.driver._input(self.peer, data)
        else:
            # Bytes that came before the driver named the peer (the loop can
            # run the protocol before create_connection's caller resumes).
            self.early += data

    def bind(self, peer: int) -> None:
        self.peer = peer
        if self.early:
            data, self.early = bytes(self.early), bytearray()
            self.driver._input(peer, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer:
            self.driver._lost(self.peer)


class _Driver:
    """What both roles share: the machine, its connections, its clock."""

    def __init__(self, machine: Machine, timeouts: Timeouts) -> None:
        self.machine = machine
        # The kernel's limit on unacknowledged control bytes: this driver
        # hands everything to the transport at once, so the machine's send
        # deadline never sees a stuck peer; TCP_USER_TIMEOUT does.
        self.peer_timeout_s = timeouts.peer or 0.0
        self.times = StepTimes(machine)
        self._controls: dict[int, _Control] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pumping = False
        self._closed = False
        self._park_fd = -1

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # machine plumbing
    def _input(self, peer: int, data: bytes) -> None:
        try:
            self.machine.peer_input(peer, data)
        except XoError as exc:
            log.error("control input: %s", exc)
        self._pump()

    def _lost(self, peer: int) -> None:
        if not self._closed:
            self.machine.peer_closed(peer)  # PEER_CLOSED follows
            self._pump()

    def _pump(self) -> None:
        """Send what the machine wrote, act on its events, re-arm its timer."""
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            while True:
                for peer, control in list(self._controls.items()):
                    out = self.machine.peer_output(peer)
                    if out and control.transport is not None:
                        control.transport.write(out)
                events = self.machine.events()
                if not events:
                    break
                for ev in events:
                    self._event(ev)
        finally:
            self._pumping = False
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        if self._park_fd < 0 and not self._closed:
            # Frames parked here after a handoff are sent on at once.
            self._park_fd = self.machine.park_fd()
            if self._park_fd >= 0:
                loop.add_reader(self._park_fd, self._tick)
        deadline = self.machine.next_deadline()
        if deadline and not self._closed:
            delay = max(0.0, (deadline - proto.now_ns()) / 1e9)
            self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.machine.tick()
        self._pump()

    def _event(self, ev: Event) -> None:
        control = self._controls.get(ev.peer)
        peername = control.peername if control is not None else None
        if ev.type == Ev.PEER_CLOSED:
            log.warning("control connection from %s closed: %s", peername, ev.text)
            self._controls.pop(ev.peer, None)
            if control is not None and control.transport is not None:
                control.transport.close()  # after the last words written above
            self.machine.peer_closed(ev.peer)
        elif ev.type == Ev.REFUSED:
            log.warning("control connection from %s: conn %x: cannot adopt: %s", peername,
                        ev.conn, ev.text)
        else:
            self._role_event(ev)

    def _role_event(self, ev: Event) -> None:
        raise NotImplementedError

    def _control_made(self, control: _Control) -> None:
        raise NotImplementedError

    async def _close_common(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._park_fd >= 0:
            asyncio.get_running_loop().remove_reader(self._park_fd)
            self._park_fd = -1
        for control in list(self._controls.values()):
            if control.transport is not None:
                control.transport.close()
        self._controls.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.times.samples  # noqa: B018 - keep the last steps before the machine goes
        self.machine.destroy()


# ---- host side --------------------------------------------------------------


@dataclass
class TargetLink:
    """The host's view of one target agent."""

    engine: HostEngine
    name: str
    ip: str
    port: int
    mac: str
    peer: int = 0
    ready: asyncio.Future[None] | None = None

    @property
    def info(self) -> proto.PeerInfo | None:
        return self.engine.machine.peer_info(self.peer) if self.peer else None

    @property
    def up(self) -> bool:
        info = self.info
        return info is not None and info.up

    @property
    def load(self) -> core.LoadReport:
        info = self.info
        if info is None:
            return core.LoadReport(0, 0, 0)
        return core.LoadReport(info.active, info.handoffs, info.bytes_served)


# (sock, app bytes) or, for a TLS session kept in user space, (sock, app bytes, TlsState)
ReturnCallback = Callable[..., Awaitable[None]]


class HostEngine(_Driver):
    """The load balancer's side of XO."""

    def __init__(self, key: bytes, steering: Steering, host_mac: str,
                 on_return: ReturnCallback, *, timeouts: Timeouts = DEFAULTS,
                 fault: str | None = None) -> None:
        super().__init__(Machine(Role.HOST, key, steering.rules, steering.steer,
                                 steering.owner, host_mac=host_mac, timeouts=timeouts),
                         timeouts)
        self.machine.set_crash_step(fault)  # test hook (xo_proto.h)
        self.steering = steering
        self.on_return = on_return
        self.targets: dict[str, TargetLink] = {}
        self._by_peer: dict[int, TargetLink] = {}
        self._pending: dict[int, tuple[asyncio.Future[bool], socket.socket]] = {}
        self._refused_here = 0  # offloads that never started (target down, socket state)

    @property
    def stats(self) -> dict[str, int]:
        st = self.machine.stats()
        return {"offloads": st["offloads"], "rollbacks": st["rollbacks"] + self._refused_here,
                "returns": st["returns"], "withdrawn": st["withdrawn"], "moves": st["moves"],
                "closed_on_target": st["closed_on_target"], "stragglers": st["stragglers"],
                "violations": st["violations"], "timeouts": st["timeouts"],
                "bytes_followed": st["bytes_followed"], "bytes_missed": st["bytes_missed"],
                "owed_acks": st["owed_acks"],
                "replays_late": st["replays_late"],
                "late_bytes": st["late_bytes"]}

    @property
    def offloaded(self) -> int:
        """Connections the targets serve for us now."""
        return sum(info.offloaded for link in self.targets.values()
                   if (info := link.info) is not None)

    async def add_target(self, name: str, ip: str, mac: str,
                         port: int = DEFAULT_CONTROL_PORT) -> TargetLink:
        link = TargetLink(self, name, ip, port, mac)
        self.targets[name] = link
        await self._connect(link)
        return link

    async def _connect(self, link: TargetLink) -> None:
        loop = asyncio.get_running_loop()
        transport, control = await loop.create_connection(lambda: _Control(self),
                                                          link.ip, link.port)
        try:
            link.peer = self.machine.peer_add(Endpoint(link.ip, link.port), link.mac, link.name)
        except XoError:
            transport.close()
            raise
        self._controls[link.peer] = control
        self._by_peer[link.peer] = link
        link.ready = loop.create_future()
        control.bind(link.peer)
        self._pump()
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            transport.close()
            raise ProtocolError(f"target {link.name}: no HELLO in time") from exc
        log.info("control connection to %s (%s) up", link.name, link.ip)

    def _control_made(self, control: _Control) -> None:
        pass  # the peer is added by _connect, which knows the target

    async def _reconnect(self, link: TargetLink) -> None:
        """Keep trying a lost target (it may be restarting) once a second."""
        while not self._closed and not link.up:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                await self._connect(link)
            except (OSError, ProtocolError, XoError) as exc:
                log.debug("target %s still unreachable: %s", link.name, exc)

    def _role_event(self, ev: Event) -> None:
        if ev.type == Ev.PEER_UP:
            link = self._by_peer.get(ev.peer)
            if link is not None and link.ready is not None and not link.ready.done():
                link.ready.set_result(None)
        elif ev.type in (Ev.OFFLOADED, Ev.ROLLED_BACK):
            fut, sock = self._pending.pop(ev.conn, (None, None))
            if ev.type == Ev.ROLLED_BACK:
                log.info("conn %x: handoff rolled back: %s", ev.conn, ev.text)
            elif sock is not None:
                sock.detach()  # the machine discarded the descriptor
            if fut is not None and not fut.done():
                fut.set_result(ev.type == Ev.OFFLOADED)
        elif ev.type == Ev.RETURNED:
            sock = socket.socket(fileno=ev.fd)
            sock.setblocking(False)
            if ev.tls is not None:  # a TLS session to continue in user space
                self._spawn(self.on_return(sock, ev.data, ev.tls))
            else:
                self._spawn(self.on_return(sock, ev.data))
        elif ev.type == Ev.WITHDRAWN:
            log.warning("conn %x: target lost; client %s probed", ev.conn, ev.client)

    def _event(self, ev: Event) -> None:
        super()._event(ev)
        if ev.type == Ev.PEER_CLOSED:
            link = self._by_peer.pop(ev.peer, None)
            if link is not None:
                if link.ready is not None and not link.ready.done():
                    link.ready.set_exception(ProtocolError(ev.text))
                    link.ready.exception()  # retrieved: _connect may have timed out
                link.peer = 0
                if not self._closed:
                    self._spawn(self._reconnect(link))

    def _lost(self, peer: int) -> None:
        link = self._by_peer.get(peer)
        super()._lost(peer)
        if link is not None and self._by_peer.pop(peer, None) is not None:
            link.peer = 0
            if not self._closed:
                self._spawn(self._reconnect(link))

    def pick(self, policy: str = "least_loaded") -> TargetLink | None:
        """A live target by policy: round_robin or least_loaded; targets that
        failed repeatedly are left out for a while."""
        peer = self.machine.pick(policy)
        return self._by_peer.get(peer) if peer is not None else None

    async def offload(self, sock: socket.socket, app_data: bytes, link: TargetLink,
                      tls: core.TlsState | None = None) -> bool:
        """Hand sock to the target. True: the target owns it now (sock is
        detached). False: it was rolled back; the socket is live again and
        the caller serves locally. tls: the record state of the TLS session
        the caller keeps in user space (at a record boundary, nothing
        pending); the RETURNED callback then gets the state back as a third
        argument."""
        try:
            if not link.peer:
                raise ProtocolError(f"target {link.name} is down")
            conn = self.machine.offload(link.peer, sock.fileno(), app_data, tls)
        except (XoError, ProtocolError) as exc:
            log.info("handoff to %s not started: %s", link.name, exc)
            self._refused_here += 1
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[conn] = (fut, sock)
        self._pump()
        return await fut

    async def close(self) -> None:
        for fut, _sock in self._pending.values():
            if not fut.done():
                fut.set_result(False)
        await self._close_common()


# ---- target side ------------------------------------------------------------


@dataclass
class TargetConn:
    """A connection the target serves for the host."""

    agent: TargetAgent
    conn_id: int
    sock: socket.socket
    app_data: bytes
    client: Endpoint | None
    local: Endpoint | None
    done: asyncio.Future[bool] | None = field(default=None, repr=False)
    # The TLS session's record state when it came in user space (no kernel
    # TLS here): the application continues it (xo.tls.RecordStream) and
    # passes its state at the hand-back.
    tls: core.TlsState | None = field(default=None, repr=False)

    async def hand_back(self, app_data: bytes = b"", tls: core.TlsState | None = None) -> bool:
        return await self.agent.hand_back(self, app_data, tls=tls)

    async def move(self, dest_ip: str, app_data: bytes = b"",
                   tls: core.TlsState | None = None) -> bool:
        return await self.agent.hand_back(self, app_data, dest_ip, tls=tls)

    async def closed_by_client(self) -> None:
        self.agent.closed_by_client(self)


ServeCallback = Callable[[TargetConn], Awaitable[None]]


class TargetAgent(_Driver):
    """A backend's side of XO: adopts connections the host hands over.

    ``my_ip`` (IPv4) is where the control port listens; a connection is
    restored on this target's address of its own family (``my_ip6`` for an
    IPv6 client). ``host_ips`` are all the host's addresses: only they may
    open control connections, and a state must name one of them."""

    def __init__(self, key: bytes, steering: Steering, my_ip: str, serve: ServeCallback,
                 crash_at: str | None = None, *, my_ip6: str | None = None,
                 host_ips: Iterable[str] = (), timeouts: Timeouts = DEFAULTS,
                 no_tls: bool = False, tls_kernel_only: bool = False) -> None:
        hosts = tuple(host_ips)
        if not hosts:
            raise ValueError("a target needs the addresses of its hosts (host_ips)")
        super().__init__(Machine(Role.TARGET, key, steering.rules, steering.steer,
                                 steering.owner, local4=my_ip, local6=my_ip6, hosts=hosts,
                                 timeouts=timeouts, no_tls=no_tls,
                                 tls_kernel_only=tls_kernel_only), timeouts)
        self.steering = steering
        self.my_ip = my_ip
        self.serve = serve
        self.machine.set_crash_step(crash_at)
        self.active: dict[int, TargetConn] = {}
        self.rejected = 0
        self._served = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def handoffs(self) -> int:
        return self.machine.stats()["adopted"]

    @property
    def bytes_served(self) -> int:
        return self._served

    @bytes_served.setter
    def bytes_served(self, value: int) -> None:
        self.machine.add_served(value - self._served)
        self._served = value

    async def start(self, port: int = DEFAULT_CONTROL_PORT) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Control(self), self.my_ip, port)

    def _control_made(self, control: _Control) -> None:
        assert control.transport is not None
        ip, port = control.transport.get_extra_info("peername")[:2]
        try:
            control.peer = self.machine.peer_add(Endpoint(ip, port))
        except XoError as exc:
            self.rejected += 1
            log.warning("control connection from %s refused: %s", ip, exc)
            control.transport.close()
            return
        self._controls[control.peer] = control
        log.info("control connection from %s", ip)
        self._pump()

    def _event(self, ev: Event) -> None:
        if ev.type == Ev.PEER_CLOSED and "control message" in ev.text:
            self.rejected += 1
        super()._event(ev)

    def _role_event(self, ev: Event) -> None:
        if ev.type == Ev.ADOPTED:
            if ev.code:
                log.info("conn %x: %s", ev.conn, ev.text)
            sock = socket.socket(fileno=ev.fd)
            sock.setblocking(False)
            conn = TargetConn(self, ev.conn, sock, ev.data, ev.client, ev.local, tls=ev.tls)
            self.active[ev.conn] = conn
            self._spawn(self._serve(conn))
            return
        conn = self.active.get(ev.conn)
        if conn is None:
            return
        if ev.type in (Ev.HANDED_BACK, Ev.LOST) and ev.fd < 0:
            conn.sock.detach()  # the machine discarded it
        if ev.type == Ev.LOST and ev.fd >= 0:
            # The host lost us and resets the client: stop serving it. The
            # shutdown wakes the serving task (EOF), which then closes.
            log.warning("conn %x: host lost; closing", ev.conn)
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if ev.type in (Ev.HANDED_BACK, Ev.LOST, Ev.CLOSED):
            self.active.pop(ev.conn, None)
        if conn.done is not None and not conn.done.done() and ev.type != Ev.CLOSED:
            conn.done.set_result(ev.type != Ev.KEPT)

    async def _serve(self, conn: TargetConn) -> None:
        try:
            await self.serve(conn)
        except (XoError, ProtocolError, ValueError, RuntimeError, NotImplementedError) as exc:
            # An application bug must not orphan the client: close it the
            # normal way (FIN through the rewrite) and retire the host's rule.
            log.error("conn %x: application failed while serving: %r", conn.conn_id, exc)
            self.closed_by_client(conn)

    async def hand_back(self, conn: TargetConn, app_data: bytes,
                        dest_ip: str | None = None, *,
                        tls: core.TlsState | None = None) -> bool:
        """Give the connection to the host (or, with dest_ip, move it to
        that target). True: it is gone from here. False: it stays and is
        served here (the host or the new target did not take it)."""
        if conn.conn_id not in self.active:
            return True
        try:
            if dest_ip is None:
                self.machine.hand_back(conn.conn_id, app_data, tls)
            else:
                self.machine.move(conn.conn_id, dest_ip, app_data, tls)
        except XoError as exc:
            # Typically the client closed meanwhile (CLOSE_WAIT): keep the
            # connection here; the application reads the EOF and closes.
            log.info("conn %x: not handing back: %s", conn.conn_id, exc)
            return False
        conn.done = asyncio.get_running_loop().create_future()
        self._pump()
        try:
            return await conn.done
        finally:
            conn.done = None

    def closed_by_client(self, conn: TargetConn) -> None:
        """The client ended the connection here: the machine closes it (the FIN
        leaves through the source rewrite) and tells the host."""
        if self.active.pop(conn.conn_id, None) is None:
            with contextlib.suppress(OSError):
                conn.sock.close()
            return
        fd = conn.sock.detach()
        try:
            self.machine.close_conn(conn.conn_id)
        except XoError as exc:
            log.info("conn %x: close: %s", conn.conn_id, exc)
            os.close(fd)
        self._pump()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.active.values():
            if conn.done is not None and not conn.done.done():
                conn.done.set_result(True)
        await self._close_common()
