"""The XO handoff protocol (DESIGN.md §1) as an asyncio engine any Python
application can use: :class:`HostEngine` on the load balancer, and
:class:`TargetAgent` on each backend.

Outbound transfer (host → target), numbered as in the paper's Figure 2:

  1. host   block the client's flow (software rule, with an expiry)
  2. host   freeze + capture; BEGIN_OFFLOAD(state incl. the request bytes)
  3. target restore on its own IP (remapping the port if the 4-tuple clashes)
  4. target source-rewrite rule (egress: target ip:port -> host ip:port);
            TARGET_READY(target ip, port)
  5. host   redirect rule replaces the block in one map write
  6. host   discard its socket (no FIN/RST); HOST_READY
            target leaves repair mode and serves the request

Inbound transfer (target → host): target blocks its ingress (7), captures
(8), TARGET_DONE(state); host restores on its own endpoint (9), removes the
redirect synchronously (10) and resumes, END_OFFLOAD; target discards its
socket and removes the source rewrite (11) and the block (12).

Failure rule: until TARGET_READY the host keeps its frozen socket; any error
or timeout means "resume and carry on locally" and the client notices
nothing. A target that disappears after HOST_READY is detected by its
control connection closing: the host withdraws that target's redirects and
sends each such client a keep-alive-style probe, whose answer meets a clean
RST here (a client idly waiting for its response would never send a packet).

Control messages travel on persistent TCP connections, sealed by the core's
envelope (HMAC-SHA256 under the cluster key, per-session channel id from
the HELLO nonces, strictly increasing sequence numbers). A message that
fails any check is logged and the connection is closed: nothing is bound
or installed on its behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xo import core
from xo.core import (
    ABORT_HOST,
    ABORT_REFUSED,
    ABORT_RESTORE,
    Endpoint,
    LoadReport,
    MsgType,
    TcpState,
    XoError,
    XoRejectedError,
    decode_abort,
    decode_ready,
    encode_abort,
    encode_ready,
)
from xo.steer import FlowKey, Rule, RuleManager, Steer, monotonic_ns

log = logging.getLogger("xo.engine")

DEFAULT_CONTROL_PORT = 7700
READY_TIMEOUT_S = 2.0      # host waits this long for TARGET_READY
HOST_READY_TIMEOUT_S = 2.0  # target waits this long for HOST_READY
DONE_TIMEOUT_S = 2.0       # target waits this long for END_OFFLOAD
BLOCK_TTL_S = 10.0         # a block outliving a dead handoff frees the port
REDIRECT_TTL_S = 600.0     # live flows are renewed every third of this
CLOSED_TTL_S = 30.0        # keep steering a closed flow for its last FIN/ACKs
LOAD_REPORT_INTERVAL_S = 0.5
SWEEP_INTERVAL_S = 1.0
RECONNECT_INTERVAL_S = 1.0

# TARGET_DONE flag: the client closed the connection on the target, there is
# no state to restore; the host only retires the redirect.
DONE_FLAG_CLOSED = 1

def load_key(path: str | Path) -> bytes:
    """The cluster key: a file of 16..64 random bytes, readable by root only."""
    key = Path(path).read_bytes()
    if not core.lib.XO_KEY_MIN_LEN <= len(key) <= core.lib.XO_KEY_MAX_LEN:
        raise ValueError(f"{path}: a cluster key has 16..64 bytes, this one {len(key)}")
    return key


def write_key(path: str | Path) -> bytes:
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class ProtocolError(Exception):
    """The peer broke the protocol (closed, rejected message, wrong order)."""


class ControlConn:
    """One authenticated control connection (either end)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: bytes, role: int) -> None:
        self.reader, self.writer = reader, writer
        self.channel = core.Channel(key, 0, role)
        self.peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Small request/response messages: never wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = asyncio.Lock()
        self.closed = False

    async def handshake(self, timeout: float = 5.0) -> None:
        """Exchange HELLO nonces and move to the session channel."""
        nonce = secrets.token_bytes(core.HELLO_NONCE_LEN)
        await self.send(MsgType.HELLO, 0, nonce)
        # Nothing is authenticated yet: read no more than a HELLO's size.
        hello_len = core.lib.xo_env_size(core.HELLO_NONCE_LEN)
        msg = await asyncio.wait_for(self.recv(max_len=hello_len), timeout)
        if msg.type != MsgType.HELLO or len(msg.payload) != core.HELLO_NONCE_LEN:
            raise ProtocolError(f"expected HELLO from {self.peer}, got {msg.type.name}")
        self.channel.bind(nonce, msg.payload)

    async def send(self, type: MsgType, conn_id: int, payload: bytes = b"",
                   flags: int = 0) -> None:
        async with self._send_lock:
            if self.closed:
                raise ProtocolError(f"control connection to {self.peer} is closed")
            self.writer.write(self.channel.seal(type, conn_id, payload, flags))
            await self.writer.drain()

    async def recv(self, max_len: int | None = None) -> core.Message:
        """The next verified message; ProtocolError on EOF or a bad message
        (or one announcing more than max_len bytes, refused before reading it)."""
        try:
            header = await self.reader.readexactly(core.ENV_HEADER_LEN)
            total = core.frame_len(header)
            if max_len is not None and total > max_len:
                raise ProtocolError(f"malformed control message from {self.peer}: "
                                    f"{total} bytes announced, at most {max_len} expected")
            rest = await self.reader.readexactly(total - core.ENV_HEADER_LEN)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"control connection from {self.peer} closed") from exc
        except (ConnectionError, OSError) as exc:
            raise ProtocolError(f"control connection from {self.peer}: {exc}") from exc
        except XoError as exc:
            raise ProtocolError(f"malformed control message from {self.peer}: {exc}") from exc
        try:
            return self.channel.open(header + rest)
        except XoError as exc:
            raise ProtocolError(f"rejected control message from {self.peer}: {exc}") from exc

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class _Waiters:
    """Futures for replies keyed by connection id."""

    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[core.Message]] = {}

    def expect(self, conn_id: int) -> asyncio.Future[core.Message]:
        fut: asyncio.Future[core.Message] = asyncio.get_running_loop().create_future()
        self._futures[conn_id] = fut
        return fut

    def resolve(self, msg: core.Message) -> bool:
        fut = self._futures.pop(msg.conn_id, None)
        if fut is None or fut.done():
            return False
        fut.set_result(msg)
        return True

    def drop(self, conn_id: int) -> None:
        self._futures.pop(conn_id, None)

    def fail_all(self, exc: Exception) -> None:
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(exc)
        self._futures.clear()


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
             owner: int | None = None, ingress: str = "tc") -> Steering:
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
        steer = Steer(pin_dir=pin_dir)
        # The owner id names the role instance (its pin directory), not the
        # process: a restarted agent purges what its crashed predecessor left.
        owner = owner if owner is not None else zlib.crc32(pin_dir.encode()) & 0x7FFFFFFF
        try:
            steer.purge_owner(owner)
            steer.attach(ifindex, core_prog("XDP" if ingress == "xdp" else "TC_INGRESS"))
            if egress:
                steer.attach(ifindex, core_prog("TC_EGRESS"))
            rules = RuleManager(steer, ifindex, backend)
        except BaseException:
            steer.close()  # detaches whatever was attached already
            raise
        return cls(steer, rules, ifindex, owner, ingress)

    def set_expiry(self, key: FlowKey, ttl_s: float) -> bool:
        """Give a flow's entry a new expiry (renewal, or a short grace after
        a close); False if the flow has no entry."""
        rule = self.steer.lookup(key)
        if rule is None:
            return False
        expires = monotonic_ns() + int(ttl_s * 1e9)
        self.rules.insert(key, dataclasses.replace(rule, expires_ns=expires))
        return True

    async def maintain(self, ttl_s: Callable[[], float],
                       live: Callable[[], list[FlowKey]]) -> None:
        """Forever: drop expired entries every second, and renew the entries
        of live flows every third of their lifetime, so a long transfer never
        outlives its rule while a dead one still frees its port."""
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.rules.sweep()
            if time.monotonic() - last_renewal >= ttl_s() / 3:
                last_renewal = time.monotonic()
                for key in live():
                    self.set_expiry(key, ttl_s())

    def close(self) -> None:
        self.rules.close()
        self.steer.close(unpin=True)


def core_prog(name: str) -> object:
    from xo.steer import Prog

    return Prog[name]


# ---- host side --------------------------------------------------------------


@dataclass
class TargetLink:
    """The host's view of one target agent."""

    name: str
    ip: str
    port: int
    mac: str
    conn: ControlConn | None = None
    waiters: _Waiters = field(default_factory=_Waiters)
    load: LoadReport = field(default_factory=lambda: LoadReport(0, 0, 0))
    offloaded: set[int] = field(default_factory=set)
    handed: int = 0  # connections handed to this target so far

    @property
    def up(self) -> bool:
        return self.conn is not None and not self.conn.closed


@dataclass
class Offloaded:
    conn_id: int
    key: FlowKey
    local: Endpoint
    link: TargetLink
    started: float
    # For the probe that resets the client if the target is lost (see
    # probe_client): the client's endpoint and the host's send/receive
    # sequence numbers at the handoff.
    client: Endpoint | None = None
    snd_una: int = 0
    rcv_nxt: int = 0


def probe_client(local: Endpoint, client: Endpoint, snd_una: int, rcv_nxt: int) -> None:
    """Send the client an empty ACK one below its receive window, as a TCP
    keep-alive probe does. The client answers with an ACK carrying its own
    receive sequence number; with neither a socket nor a redirect for the
    flow left here, this host's kernel answers that with an RST the client
    accepts. So a client whose connection died on a lost target, and which
    is waiting in silence for a response, gets a prompt reset instead."""
    family = socket.AF_INET6 if ":" in client.ip else socket.AF_INET
    src = ipaddress.ip_address(local.ip).packed
    dst = ipaddress.ip_address(client.ip).packed
    header = struct.pack("!HHIIBBHHH", local.port, client.port, (snd_una - 1) & 0xFFFFFFFF,
                         rcv_nxt & 0xFFFFFFFF, 5 << 4, 0x10, 0xFFFF, 0, 0)
    if family == socket.AF_INET:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    data = pseudo + header
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:16] + struct.pack("!H", ~total & 0xFFFF) + header[18:]
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.bind((local.ip, 0))
        raw.sendto(header, (client.ip, 0))


class StepTimes:
    """Microseconds spent in each protocol step (``xo bench handoff``, paper
    Table 3), kept per process: names are "<transfer>.<step>"."""

    CAP = 100_000  # samples per step; enough for any benchmark run

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def lap(self, transfer: str) -> Lap:
        return Lap(self, transfer)

    def add(self, name: str, micros: float) -> None:
        bucket = self.samples.setdefault(name, [])
        if len(bucket) < self.CAP:
            bucket.append(micros)

    def last(self) -> dict[str, float]:
        return {name: round(v[-1], 1) for name, v in self.samples.items() if v}


class Lap:
    """Marks steps of one transfer: each call records the time since the last."""

    def __init__(self, times: StepTimes, transfer: str) -> None:
        self.times, self.transfer = times, transfer
        self.start = self.mark = time.perf_counter_ns()

    def __call__(self, step: str) -> None:
        now = time.perf_counter_ns()
        self.times.add(f"{self.transfer}.{step}", (now - self.mark) / 1000)
        self.mark = now

    def total(self) -> None:
        self.times.add(f"{self.transfer}.total", (time.perf_counter_ns() - self.start) / 1000)


ReturnCallback = Callable[[socket.socket, bytes], Awaitable[None]]


class HostEngine:
    """The load balancer's side of XO."""

    def __init__(self, key: bytes, steering: Steering, host_mac: str,
                 on_return: ReturnCallback) -> None:
        self.key = key
        self.steering = steering
        self.host_mac = host_mac
        self.on_return = on_return
        self.targets: dict[str, TargetLink] = {}
        self.offloaded: dict[int, Offloaded] = {}
        self._ids = itertools.count(secrets.randbits(32) << 16)
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = {"offloads": 0, "rollbacks": 0, "returns": 0, "withdrawn": 0}
        self.times = StepTimes()
        self.redirect_ttl_s = REDIRECT_TTL_S
        self._closing = False

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def add_target(self, name: str, ip: str, mac: str,
                         port: int = DEFAULT_CONTROL_PORT) -> TargetLink:
        link = TargetLink(name, ip, port, mac)
        self.targets[name] = link
        await self._connect(link)
        return link

    async def _connect(self, link: TargetLink) -> None:
        reader, writer = await asyncio.open_connection(link.ip, link.port)
        conn = ControlConn(reader, writer, self.key, role=0)
        try:
            await conn.handshake()
        except BaseException:
            conn.close()  # a retry loop must not leak a socket per attempt
            raise
        link.conn = conn
        self._spawn(self._read_loop(link, conn))
        log.info("control connection to %s (%s) up", link.name, link.ip)

    async def _read_loop(self, link: TargetLink, conn: ControlConn) -> None:
        try:
            while True:
                msg = await conn.recv()
                if msg.type == MsgType.TARGET_DONE:
                    self._spawn(self._inbound(link, msg))
                elif msg.type == MsgType.LOAD_REPORT:
                    link.load = LoadReport.decode(msg.payload)
                elif msg.type == MsgType.PING:
                    await conn.send(MsgType.PONG, 0, msg.payload)
                elif msg.type in (MsgType.TARGET_READY, MsgType.ABORT, MsgType.PONG):
                    link.waiters.resolve(msg)
                else:
                    raise ProtocolError(f"unexpected {msg.type.name} from target {link.name}")
        except (ProtocolError, ValueError) as exc:
            log.warning("target %s lost: %s", link.name, exc)
        finally:
            conn.close()
            self._target_lost(link)
            if not self._closing:
                self._spawn(self._reconnect(link))

    async def _reconnect(self, link: TargetLink) -> None:
        """Keep trying a lost target (it may be restarting) once a second."""
        while not self._closing and not link.up:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                await self._connect(link)
            except (OSError, ProtocolError, TimeoutError, XoError) as exc:
                log.debug("target %s still unreachable: %s", link.name, exc)

    def _target_lost(self, link: TargetLink) -> None:
        """Withdraw every redirect to a target that is gone, and reset its
        clients (an idle client would otherwise wait forever)."""
        link.waiters.fail_all(ProtocolError(f"target {link.name} lost"))
        for conn_id in list(link.offloaded):
            off = self.offloaded.pop(conn_id, None)
            if off is not None:
                self.steering.rules.remove(off.key)
                self.stats["withdrawn"] += 1
                if off.client is not None:
                    try:
                        probe_client(off.local, off.client, off.snd_una, off.rcv_nxt)
                    except OSError as exc:
                        log.warning("conn %x: cannot probe the client: %s", conn_id, exc)
        link.offloaded.clear()

    def pick(self, policy: str = "least_loaded") -> TargetLink | None:
        """A live target by policy: round_robin or least_loaded."""
        live = [t for t in self.targets.values() if t.up]
        if not live:
            return None
        if policy == "round_robin":
            return min(live, key=lambda t: (t.handed, t.name))
        # Ties (e.g. every target idle) go to the one handed the fewest.
        return min(live, key=lambda t: (t.load.active + len(t.offloaded), t.handed, t.name))

    async def offload(self, sock: socket.socket, app_data: bytes, link: TargetLink) -> bool:
        """Hand sock to the target. True: the target owns it now. False: it was
        rolled back; the socket is live again and the caller serves locally."""
        lap = self.times.lap("out")
        conn_id = next(self._ids)
        local_ip, local_port = sock.getsockname()[:2]
        peer_ip, peer_port = sock.getpeername()[:2]
        key = FlowKey.tcp(peer_ip, peer_port, local_ip, local_port)
        rules = self.steering.rules
        frozen = False
        try:
            if not link.up or link.conn is None:
                raise ProtocolError(f"target {link.name} is down")
            block = Rule.block(ttl_s=BLOCK_TTL_S, owner=self.steering.owner)
            rules.insert(key, block)
            # Outbound too: a frozen socket's timers may still transmit, and
            # what they send must not reach the client (see the eBPF egress).
            rules.insert(key.reversed(), block)
            lap("block")
            core.freeze(sock)
            frozen = True
            state = core.capture(sock)
            state.app_data = app_data
            payload = state.encode()
            lap("serialize")
            reply = link.waiters.expect(conn_id)
            await link.conn.send(MsgType.BEGIN_OFFLOAD, conn_id, payload)
            msg = await asyncio.wait_for(reply, READY_TIMEOUT_S)
            if msg.type == MsgType.ABORT:
                reason, text = decode_abort(msg.payload)
                raise ProtocolError(f"target refused: {text} (reason {reason})")
            if msg.type != MsgType.TARGET_READY:
                raise ProtocolError(f"expected TARGET_READY, got {msg.type.name}")
            ready = decode_ready(msg.payload)
            target_ip, target_port = ready.ip, ready.port
            if not link.up:
                # The connection closed right after TARGET_READY and the loss
                # was handled first: no HOST_READY can reach the target, it
                # never serves; carry on locally (no redirect to a dead target).
                raise ProtocolError(f"target {link.name} lost after TARGET_READY")
            lap("transfer_to_ready")
        except (TimeoutError, XoError, OSError, ProtocolError, ValueError) as exc:
            link.waiters.drop(conn_id)
            self._rollback(sock, key, frozen, link, conn_id, exc)
            return False

        # Point of no return: the target holds a restored socket and its rewrite.
        rules.insert(key, Rule.redirect(target_ip, target_port, dst_mac=link.mac,
                                        src_mac=self.host_mac, ttl_s=self.redirect_ttl_s,
                                        owner=self.steering.owner))
        lap("redirect")
        core.discard(sock)
        rules.remove(key.reversed())
        self.offloaded[conn_id] = Offloaded(
            conn_id, key, Endpoint(local_ip, local_port), link, time.monotonic(),
            Endpoint(peer_ip, peer_port),
            state.snd_seq - state.inflight_len - state.unsent_len, state.rcv_seq)
        link.offloaded.add(conn_id)
        link.handed += 1
        try:
            await link.conn.send(MsgType.HOST_READY, conn_id)
        except ProtocolError as exc:
            log.warning("conn %x: HOST_READY not sent: %s", conn_id, exc)
        lap("discard_and_host_ready")
        lap.total()
        self.stats["offloads"] += 1
        return True

    def _rollback(self, sock: socket.socket, key: FlowKey, frozen: bool, link: TargetLink,
                  conn_id: int, exc: BaseException) -> None:
        """Before TARGET_READY: the host carries on with its own socket."""
        log.info("conn %x: handoff to %s rolled back: %s", conn_id, link.name, exc)
        self.stats["rollbacks"] += 1
        if frozen:
            core.resume(sock)
        for flow in (key, key.reversed()):
            with contextlib.suppress(XoError):
                self.steering.rules.remove(flow)
        if link.up and link.conn is not None:
            # Tell the target to drop whatever it restored for this id.
            self._spawn(self._send_quietly(link.conn, MsgType.ABORT, conn_id,
                                           encode_abort(ABORT_HOST, str(exc))))

    @staticmethod
    async def _send_quietly(conn: ControlConn, type: MsgType, conn_id: int,
                            payload: bytes = b"") -> None:
        with contextlib.suppress(ProtocolError):
            await conn.send(type, conn_id, payload)

    async def _inbound(self, link: TargetLink, msg: core.Message) -> None:
        """TARGET_DONE: take the connection back (steps 9-10)."""
        assert link.conn is not None
        off = self.offloaded.get(msg.conn_id)
        if off is None or off.link is not link:
            await self._send_quietly(link.conn, MsgType.ABORT, msg.conn_id,
                                     encode_abort(ABORT_REFUSED, "unknown connection"))
            return
        rules = self.steering.rules
        if msg.flags & DONE_FLAG_CLOSED:
            # The client closed on the target: keep steering its last packets
            # (FIN/ACK retransmissions) for a while, then let the entry expire.
            self.steering.set_expiry(off.key, CLOSED_TTL_S)
            self._forget(off)
            await self._send_quietly(link.conn, MsgType.END_OFFLOAD, msg.conn_id)
            return
        lap = self.times.lap("in_host")
        try:
            state = TcpState.decode(msg.payload)
            lap("decode")
            sock = core.restore(state, off.local)
            lap("restore")
        except XoError as exc:
            log.error("conn %x: cannot take back from %s: %s", msg.conn_id, link.name, exc)
            await self._send_quietly(link.conn, MsgType.ABORT, msg.conn_id,
                                     encode_abort(ABORT_RESTORE, str(exc)))
            return
        rules.remove(off.key)  # synchronous in both tiers
        lap("remove_redirect")
        core.resume(sock, state)
        sock.setblocking(False)
        lap("resume")
        self._forget(off)
        self.stats["returns"] += 1
        await self._send_quietly(link.conn, MsgType.END_OFFLOAD, msg.conn_id)
        lap("end_offload")
        lap.total()
        await self.on_return(sock, state.app_data)

    def _forget(self, off: Offloaded) -> None:
        self.offloaded.pop(off.conn_id, None)
        off.link.offloaded.discard(off.conn_id)

    async def sweep_forever(self) -> None:
        """Expire and renew rules: the redirects of flows still offloaded."""
        await self.steering.maintain(lambda: self.redirect_ttl_s,
                                     lambda: [off.key for off in self.offloaded.values()])

    async def close(self) -> None:
        self._closing = True
        for link in self.targets.values():
            if link.conn is not None:
                link.conn.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---- target side ------------------------------------------------------------


@dataclass
class TargetConn:
    """A connection the target holds for the host."""

    agent: TargetAgent
    control: ControlConn
    conn_id: int
    sock: socket.socket
    app_data: bytes
    client: Endpoint
    local: Endpoint
    host: Endpoint
    rewrite_key: FlowKey
    ingress_key: FlowKey

    async def hand_back(self, app_data: bytes = b"") -> bool:
        return await self.agent.hand_back(self, app_data)

    async def closed_by_client(self) -> None:
        await self.agent.closed_by_client(self)


ServeCallback = Callable[[TargetConn], Awaitable[None]]


class TargetAgent:
    """A backend's side of XO: adopts connections the host hands over.

    ``my_ip`` (IPv4) is where the control port listens; a connection is
    restored on this target's address of its own family (``my_ip6`` for an
    IPv6 client). ``host_ips`` are all the host's addresses: a state names
    the speaking host if its local address is the control peer's, or, when
    the peer is one of ``host_ips``, any of them (e.g. the host's IPv6
    address, over an IPv4 control connection)."""

    def __init__(self, key: bytes, steering: Steering, my_ip: str, serve: ServeCallback,
                 crash_at: str | None = None, *, my_ip6: str | None = None,
                 host_ips: Iterable[str] = ()) -> None:
        self.key = key
        self.steering = steering
        self.my_ip = my_ip
        self.my_ips: dict[int, str] = {socket.AF_INET: my_ip}
        if my_ip6 is not None:
            self.my_ips[socket.AF_INET6] = my_ip6
        self.host_ips = frozenset(ipaddress.ip_address(ip) for ip in host_ips)
        self.serve = serve
        # Fault injection for tests: SIGKILL ourselves at this protocol step.
        self.crash_at = crash_at
        self.active: dict[int, TargetConn] = {}
        self.handoffs = 0
        self.bytes_served = 0
        self.rejected = 0
        self.times = StepTimes()
        self.redirect_ttl_s = REDIRECT_TTL_S
        self._controls: set[ControlConn] = set()
        self._waiters_by_conn: dict[ControlConn, _Waiters] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None

    def _step(self, name: str) -> None:
        if self.crash_at == name:
            log.warning("fault injection: dying at %s", name)
            os.kill(os.getpid(), 9)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, port: int = DEFAULT_CONTROL_PORT) -> None:
        self._server = await asyncio.start_server(self._accept, self.my_ip, port)
        self._spawn(self._report_loop())
        self._spawn(self._sweep_loop())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ControlConn(reader, writer, self.key, role=1)
        waiters = _Waiters()
        try:
            await conn.handshake()
            self._controls.add(conn)
            self._waiters_by_conn[conn] = waiters
            log.info("control connection from %s", conn.peer)
            while True:
                msg = await conn.recv()
                if msg.type == MsgType.BEGIN_OFFLOAD:
                    self._spawn(self._adopt(conn, waiters, msg))
                elif msg.type in (MsgType.HOST_READY, MsgType.END_OFFLOAD, MsgType.ABORT):
                    waiters.resolve(msg)
                elif msg.type == MsgType.PING:
                    await conn.send(MsgType.PONG, 0, msg.payload)
                elif msg.type != MsgType.PONG:
                    raise ProtocolError(f"unexpected {msg.type.name}")
        except (TimeoutError, ProtocolError, XoRejectedError, ValueError) as exc:
            self.rejected += 1
            log.warning("control connection from %s closed: %s", conn.peer, exc)
        finally:
            waiters.fail_all(ProtocolError("control connection closed"))
            self._controls.discard(conn)
            conn.close()
            self._waiters_by_conn.pop(conn, None)

    async def _adopt(self, control: ControlConn, waiters: _Waiters, msg: core.Message) -> None:
        """Steps 3-4 and 6 on the target."""
        self._step("begin")
        lap = self.times.lap("out_target")
        try:
            state = TcpState.decode(msg.payload)
            lap("decode")
            host = state.local
            if not self._names_peer(host.ip, control.peer):
                raise ValueError(f"state names {host.ip}, not the host speaking ({control.peer})")
            my_ip = self.my_ips.get(host.family)
            if my_ip is None:
                raise ValueError(f"no local address of the family of {host.ip}")
            sock, port = self._restore(state, my_ip)
            lap("restore")
        except (XoError, ValueError) as exc:
            log.warning("conn %x: cannot adopt: %s", msg.conn_id, exc)
            await control.send(MsgType.ABORT, msg.conn_id, encode_abort(ABORT_RESTORE, str(exc)))
            return
        client = state.remote
        rewrite_key = FlowKey.tcp(my_ip, port, client.ip, client.port)
        ingress_key = FlowKey.tcp(client.ip, client.port, my_ip, port)
        rules = self.steering.rules
        self._step("restored")
        rules.insert(rewrite_key, Rule.src_rewrite(host.ip, host.port, ttl_s=self.redirect_ttl_s,
                                                   owner=self.steering.owner))
        lap("rewrite")
        reply = waiters.expect(msg.conn_id)
        try:
            await control.send(MsgType.TARGET_READY, msg.conn_id,
                               encode_ready(Endpoint(my_ip, port)))
            lap("ready_send")
            lap.total()
            self._step("ready")
            answer = await asyncio.wait_for(reply, HOST_READY_TIMEOUT_S)
            if answer.type != MsgType.HOST_READY:
                raise ProtocolError(f"host answered {answer.type.name}")
        except (TimeoutError, ProtocolError) as exc:
            waiters.drop(msg.conn_id)
            log.info("conn %x: host did not confirm (%s); dropping the copy", msg.conn_id, exc)
            core.discard(sock)
            rules.remove(rewrite_key)
            return
        self._step("host_ready")
        core.resume(sock, state)
        sock.setblocking(False)
        conn = TargetConn(self, control, msg.conn_id, sock, state.app_data, client,
                          Endpoint(my_ip, port), host, rewrite_key, ingress_key)
        self.active[msg.conn_id] = conn
        self.handoffs += 1
        try:
            await self.serve(conn)
        except (XoError, ProtocolError, ValueError, RuntimeError, NotImplementedError) as exc:
            # An application bug must not orphan the client: close it the
            # normal way (FIN through the rewrite) and retire the host's rule.
            log.error("conn %x: application failed while serving: %r", msg.conn_id, exc)
            await conn.closed_by_client()
        finally:
            self.active.pop(msg.conn_id, None)

    def _names_peer(self, ip: str, peer: tuple[object, ...] | None) -> bool:
        """Is ip an address of the host at the other end of this control connection?"""
        if not peer:
            return False
        addr, speaker = ipaddress.ip_address(ip), ipaddress.ip_address(str(peer[0]))
        return addr == speaker or (speaker in self.host_ips and addr in self.host_ips)

    def _restore(self, state: TcpState, my_ip: str) -> tuple[socket.socket, int]:
        """Restore on our own IP; remap the port if the 4-tuple is taken here."""
        port = state.local.port
        for _ in range(64):
            try:
                return core.restore(state, Endpoint(my_ip, port)), port
            except XoError as exc:
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
                    raise
                log.info("4-tuple %s:%d <-> %s taken; remapping", my_ip, port, state.remote)
                port = 20000 + secrets.randbelow(40000)
        raise ValueError("no free port to restore on")

    async def hand_back(self, conn: TargetConn, app_data: bytes) -> bool:
        """Steps 7-8, then 11-12 once the host confirms. False: the host did not
        take it; the connection is live here again."""
        rules = self.steering.rules
        waiters = self._waiters_by_conn.get(conn.control)
        if waiters is None or conn.control.closed:
            return False
        lap = self.times.lap("in")
        block = Rule.block(ttl_s=BLOCK_TTL_S, owner=self.steering.owner)
        rules.insert(conn.ingress_key, block)
        # The source rewrite becomes an egress block while frozen: pacing
        # and retransmission timers still send, and bytes sent after the
        # capture must not reach the client (they would be "unsent" to the
        # host, which could then never match the client's ACKs).
        rewrite = self.steering.steer.lookup(conn.rewrite_key)
        rules.insert(conn.rewrite_key, block)
        lap("block")
        try:
            core.freeze(conn.sock)
            state = core.capture(conn.sock)
        except XoError as exc:
            # Typically the client closed meanwhile (CLOSE_WAIT): keep the
            # connection here; the application reads the EOF and closes.
            log.info("conn %x: not handing back: %s", conn.conn_id, exc)
            self._unfreeze(conn, rewrite)
            return False
        state.app_data = app_data
        payload = state.encode()
        lap("serialize")
        log.debug("conn %x: handing back %r", conn.conn_id, state)
        reply = waiters.expect(conn.conn_id)
        try:
            self._step("done")
            await conn.control.send(MsgType.TARGET_DONE, conn.conn_id, payload)
            answer = await asyncio.wait_for(reply, DONE_TIMEOUT_S)
            lap("transfer_to_end")
            if answer.type != MsgType.END_OFFLOAD:
                raise ProtocolError(f"host answered {answer.type.name}")
        except (TimeoutError, ProtocolError) as exc:
            waiters.drop(conn.conn_id)
            log.warning("conn %x: hand-back failed (%s); keeping it", conn.conn_id, exc)
            self._unfreeze(conn, rewrite)
            return False
        core.discard(conn.sock)
        rules.remove(conn.rewrite_key)
        rules.remove(conn.ingress_key)
        lap("cleanup")
        lap.total()
        return True

    def _unfreeze(self, conn: TargetConn, rewrite: Rule | None) -> None:
        """Undo hand_back's freeze: the connection stays and is served here."""
        with contextlib.suppress(XoError):
            core.resume(conn.sock)
        rules = self.steering.rules
        if rewrite is not None:
            rules.insert(conn.rewrite_key, rewrite)
        else:
            rules.remove(conn.rewrite_key)
        rules.remove(conn.ingress_key)

    async def closed_by_client(self, conn: TargetConn) -> None:
        """The client ended the connection here: close it (FIN goes out through
        the source rewrite, which stays until it expires) and tell the host."""
        with contextlib.suppress(OSError):
            conn.sock.close()
        self.steering.rules.insert(conn.rewrite_key, Rule.src_rewrite(
            conn.host.ip, conn.host.port, ttl_s=CLOSED_TTL_S, owner=self.steering.owner))
        waiters = self._waiters_by_conn.get(conn.control)
        if waiters is None:
            return
        reply = waiters.expect(conn.conn_id)
        try:
            await conn.control.send(MsgType.TARGET_DONE, conn.conn_id, b"", DONE_FLAG_CLOSED)
            await asyncio.wait_for(reply, DONE_TIMEOUT_S)
        except (TimeoutError, ProtocolError):
            waiters.drop(conn.conn_id)

    async def _report_loop(self) -> None:
        while True:
            report = LoadReport(len(self.active), self.handoffs, self.bytes_served).encode()
            for control in list(self._controls):
                with contextlib.suppress(ProtocolError):
                    await control.send(MsgType.LOAD_REPORT, 0, report)
            await asyncio.sleep(LOAD_REPORT_INTERVAL_S)

    async def _sweep_loop(self) -> None:
        """Expire and renew rules: the source rewrites of connections we hold."""
        await self.steering.maintain(lambda: self.redirect_ttl_s,
                                     lambda: [c.rewrite_key for c in self.active.values()])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for control in list(self._controls):
            control.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
