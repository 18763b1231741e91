"""Typed wrapper over the core's protocol machine (``xo_proto.h``).

The machine owns the whole handoff protocol; this module only converts
between Python values and the C structs. Drivers (``xo.engine`` for asyncio)
move the bytes, the sockets and the clock.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from xo._xo_cffi import ffi, lib
from xo.core import Endpoint, TlsState, raise_for
from xo.steer import RuleManager, Steer, _mac


class Role(enum.IntEnum):
    HOST = lib.XO_ROLE_HOST
    TARGET = lib.XO_ROLE_TARGET


class Ev(enum.IntEnum):
    PEER_UP = lib.XO_EV_PEER_UP
    PEER_CLOSED = lib.XO_EV_PEER_CLOSED
    OFFLOADED = lib.XO_EV_OFFLOADED
    ROLLED_BACK = lib.XO_EV_ROLLED_BACK
    RETURNED = lib.XO_EV_RETURNED
    WITHDRAWN = lib.XO_EV_WITHDRAWN
    ADOPTED = lib.XO_EV_ADOPTED
    HANDED_BACK = lib.XO_EV_HANDED_BACK
    KEPT = lib.XO_EV_KEPT
    LOST = lib.XO_EV_LOST
    CLOSED = lib.XO_EV_CLOSED
    REFUSED = lib.XO_EV_REFUSED


PEER_UP = lib.XO_PEER_UP
PICK_POLICIES = {"least_loaded": lib.XO_PICK_LEAST_LOADED,
                 "round_robin": lib.XO_PICK_ROUND_ROBIN}
DEFAULT_CONTROL_PORT: int = lib.XO_DEFAULT_CONTROL_PORT
DONE_FLAG_CLOSED: int = lib.XO_DONE_FLAG_CLOSED


def now_ns() -> int:
    """The machine's clock: CLOCK_MONOTONIC in nanoseconds."""
    return time.monotonic_ns()


def _check(code: int) -> int:
    raise_for(code)
    return code


def _tls_c(tls: TlsState) -> Any:
    """A struct xo_tls_state for one call (the machine copies it)."""
    c = ffi.new("struct xo_tls_state *")
    tls.to_c(c)
    return c


def _endpoint(c: Any) -> Endpoint | None:
    return Endpoint.from_c(c) if c.family else None


@dataclass(frozen=True)
class Event:
    type: Ev
    peer: int
    conn: int
    fd: int
    code: int
    data: bytes
    client: Endpoint | None
    local: Endpoint | None
    text: str
    tls: TlsState | None = None  # ADOPTED/RETURNED: continue in user space


@dataclass(frozen=True)
class PeerInfo:
    up: bool
    failures: int
    down_until: int
    offloaded: int
    handed: int
    active: int      # from the peer's last load report
    handoffs: int
    bytes_served: int
    name: str


@dataclass(frozen=True)
class Timeouts:
    """Timing knobs in seconds; None keeps the core's default."""

    ready: float | None = None
    confirm: float | None = None
    handshake: float | None = None
    ping_interval: float | None = None
    peer: float | None = None
    send: float | None = None
    block_ttl: float | None = None
    redirect_ttl: float | None = None
    closed_ttl: float | None = None
    load_interval: float | None = None
    # Not a time: the unread bytes (request bytes read and receive queue) from which
    # a plain connection's state is sent without them, the bytes after it
    # (XO_FLAG_BYTES_FOLLOW); 0 would mean the default, so "never" is 2**32 - 1.
    bytes_follow_min: int | None = None


_TIMEOUT_FIELDS = {
    "ready": "ready_timeout_ms", "confirm": "confirm_timeout_ms",
    "handshake": "handshake_timeout_ms", "ping_interval": "ping_interval_ms",
    "peer": "peer_timeout_ms", "send": "send_timeout_ms", "block_ttl": "block_ttl_ms",
    "redirect_ttl": "redirect_ttl_ms", "closed_ttl": "closed_ttl_ms",
    "load_interval": "load_interval_ms",
}


class Machine:
    """One role instance of the protocol (see xo_proto.h)."""

    def __init__(self, role: Role, key: bytes, rules: RuleManager, steer: Steer, owner: int,
                 *, host_mac: str | None = None, local4: str | None = None,
                 local6: str | None = None, hosts: tuple[str, ...] = (),
                 timeouts: Timeouts | None = None, no_tls: bool = False,
                 tls_kernel_only: bool = False) -> None:
        cfg = ffi.new("struct xo_proto_config *")
        cfg.size = ffi.sizeof("struct xo_proto_config")
        cfg.role = role
        c_key = ffi.new("uint8_t[]", key)
        cfg.key = c_key
        cfg.key_len = len(key)
        cfg.owner = owner
        cfg.no_tls = int(no_tls)
        cfg.tls_kernel_only = int(tls_kernel_only)
        cfg.rules = rules._h()
        cfg.steer = steer.handle
        if host_mac:
            ffi.memmove(cfg.host_mac, _mac(host_mac), 6)
        if local4:
            Endpoint(local4, 0).to_c(cfg.local4)
        if local6:
            Endpoint(local6, 0).to_c(cfg.local6)
        if len(hosts) > lib.XO_PROTO_MAX_HOSTS:
            raise ValueError(f"at most {lib.XO_PROTO_MAX_HOSTS} host addresses")
        for i, ip in enumerate(hosts):
            Endpoint(ip, 0).to_c(cfg.hosts[i])
        cfg.n_hosts = len(hosts)
        for name, field in _TIMEOUT_FIELDS.items():
            value = getattr(timeouts, name) if timeouts is not None else None
            if value is not None:
                setattr(cfg, field, max(1, round(value * 1000)))
        if timeouts is not None and timeouts.bytes_follow_min is not None:
            cfg.bytes_follow_min = max(1, min(timeouts.bytes_follow_min, 2**32 - 1))
        out = ffi.new("struct xo_proto **")
        _check(lib.xo_proto_create(cfg, out))
        ffi.memmove(c_key, bytes(len(key)), len(key))
        self._p: Any = out[0]
        self._ev = ffi.new("struct xo_proto_event *")
        self._buf = ffi.new("uint8_t **")
        self._len = ffi.new("size_t *")
        self._id = ffi.new("uint32_t *")
        self._conn = ffi.new("uint64_t *")
        self._steps = ffi.new("struct xo_proto_step[]", 4096)
        self._rules, self._steer = rules, steer  # the machine uses both

    def destroy(self) -> None:
        if self._p is not None:
            lib.xo_proto_destroy(self._p)
            self._p = None

    # peers
    def peer_add(self, addr: Endpoint, mac: str | None = None, name: str = "") -> int:
        o = ffi.new("struct xo_proto_peer_opts *")
        o.size = ffi.sizeof("struct xo_proto_peer_opts")
        addr.to_c(o.addr)
        if mac:
            ffi.memmove(o.mac, _mac(mac), 6)
        raw = name.encode()[:31]
        ffi.memmove(o.name, raw, len(raw))
        _check(lib.xo_proto_peer_add(self._p, o, now_ns(), self._id))
        return int(self._id[0])

    def peer_input(self, peer: int, data: bytes) -> None:
        _check(lib.xo_proto_peer_input(self._p, peer, data, len(data), now_ns()))

    def peer_output(self, peer: int) -> bytes:
        """Take what waits to be sent to peer (marked sent)."""
        if lib.xo_proto_peer_output(self._p, peer, ffi.cast("const uint8_t **", self._buf),
                                    self._len) < 0 or not self._len[0]:
            return b""
        data = bytes(ffi.buffer(self._buf[0], self._len[0]))
        _check(lib.xo_proto_peer_sent(self._p, peer, len(data), now_ns()))
        return data

    def peer_closed(self, peer: int) -> None:
        lib.xo_proto_peer_closed(self._p, peer, now_ns())  # unknown peer: already gone

    def peer_info(self, peer: int) -> PeerInfo | None:
        info = ffi.new("struct xo_proto_peer_info *")
        if lib.xo_proto_peer_info(self._p, peer, info) < 0:
            return None
        return PeerInfo(info.state == PEER_UP, info.failures, info.down_until, info.offloaded,
                        info.handed, info.load.active, info.load.handoffs,
                        info.load.bytes_served, ffi.string(info.name).decode(errors="replace"))

    # host
    def pick(self, policy: str) -> int | None:
        if lib.xo_proto_pick(self._p, PICK_POLICIES[policy], now_ns(), self._id) < 0:
            return None
        return int(self._id[0])

    def usable(self, peer: int) -> bool:
        return bool(lib.xo_proto_usable(self._p, peer, now_ns()))

    def offload(self, peer: int, fd: int, app: bytes, tls: TlsState | None = None) -> int:
        if tls is None:
            _check(lib.xo_proto_offload(self._p, peer, fd, app, len(app), now_ns(), self._conn))
        else:
            _check(lib.xo_proto_offload_tls(self._p, peer, fd, app, len(app), _tls_c(tls),
                                            now_ns(), self._conn))
        return int(self._conn[0])

    # target
    def hand_back(self, conn: int, app: bytes, tls: TlsState | None = None) -> None:
        if tls is None:
            _check(lib.xo_proto_hand_back(self._p, conn, app, len(app), now_ns()))
        else:
            _check(lib.xo_proto_hand_back_tls(self._p, conn, app, len(app), _tls_c(tls),
                                              now_ns()))

    def move(self, conn: int, dest_ip: str, app: bytes, tls: TlsState | None = None) -> None:
        dest = ffi.new("struct xo_endpoint *")
        Endpoint(dest_ip, 0).to_c(dest)
        if tls is None:
            _check(lib.xo_proto_move(self._p, conn, dest, app, len(app), now_ns()))
        else:
            _check(lib.xo_proto_move_tls(self._p, conn, dest, app, len(app), _tls_c(tls),
                                         now_ns()))

    def close_conn(self, conn: int) -> None:
        _check(lib.xo_proto_close_conn(self._p, conn, now_ns()))

    def add_served(self, nbytes: int) -> None:
        lib.xo_proto_add_served(self._p, nbytes)

    def set_crash_step(self, step: str | None) -> None:
        _check(lib.xo_proto_set_crash_step(self._p, step.encode() if step else ffi.NULL))

    # clock and events
    def tick(self) -> None:
        _check(lib.xo_proto_tick(self._p, now_ns()))

    def next_deadline(self) -> int:
        return int(lib.xo_proto_next_deadline(self._p))

    def park_fd(self) -> int:
        """Readable when client frames were parked here: tick() then."""
        return int(lib.xo_proto_park_fd(self._p))

    def events(self) -> list[Event]:
        out = []
        ev = self._ev
        while lib.xo_proto_next_event(self._p, ev):
            data = bytes(ffi.buffer(ev.data, ev.data_len)) if ev.data_len else b""
            out.append(Event(Ev(ev.type), ev.peer, ev.conn, ev.fd, ev.code, data,
                             _endpoint(ev.client), _endpoint(ev.local),
                             ffi.string(ev.text).decode(errors="replace"),
                             TlsState.from_c(ev.tls) if ev.tls != ffi.NULL else None))
        return out

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct xo_proto_stats *")
        lib.xo_proto_get_stats(self._p, st)
        return {name: int(getattr(st, name)) for name, _ in ffi.typeof(st[0]).fields}

    def take_steps(self) -> list[tuple[str, float]]:
        """Finished transfers' step timings: (name, microseconds)."""
        out = []
        while True:
            n = lib.xo_proto_take_steps(self._p, self._steps, 4096)
            for i in range(n):
                s = self._steps[i]
                name = lib.xo_proto_step_name(s.transfer, s.step)
                out.append((ffi.string(name).decode(), s.ns / 1000))
            if n < 4096:
                return out


def load_key(path: str) -> bytes:
    """A cluster key file (16..64 bytes), refused if group or others can read it."""
    buf = ffi.new("uint8_t[]", lib.XO_KEY_MAX_LEN)
    n = lib.xo_key_load(path.encode(), buf, lib.XO_KEY_MAX_LEN)
    _check(n)
    key = bytes(ffi.buffer(buf, n))
    ffi.memmove(buf, bytes(lib.XO_KEY_MAX_LEN), lib.XO_KEY_MAX_LEN)
    return key


def ctl_sock_setup(fd: int, user_timeout_s: float = 0) -> None:
    _check(lib.xo_ctl_sock_setup(fd, round(user_timeout_s * 1000)))
