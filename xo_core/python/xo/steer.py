"""Flow steering from Python: the eBPF rule table and the hybrid rule manager.

A thin, typed layer over ``xo_steer.h`` (cffi). The C core does the work;
this module converts between dataclasses and the C structs and turns
negative return codes into :class:`xo.core.XoError` exceptions carrying the
core's sentence (which names the failed step and the errno).

Typical host-side use::

    with Steer(pin_dir="/run/xo/bpf") as steer:
        steer.attach(ifindex, Prog.TC_INGRESS)
        key = FlowKey.tcp("198.18.0.10", 40000, "198.18.0.1", 80)
        steer.insert(key, Rule.block(ttl_s=5))          # step 1: block
        steer.insert(key, Rule.redirect(...))           # step 5: one write
        steer.remove(key)                               # step 10

Addresses are :mod:`ipaddress` objects (strings are accepted), ports are
ordinary integers, MACs are ``"aa:bb:cc:dd:ee:ff"`` strings.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from xo._xo_cffi import ffi, lib
from xo.core import XoError, raise_for

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "FlowKey",
    "HwBackend",
    "HwCall",
    "InsertMode",
    "Kind",
    "Prog",
    "Rule",
    "RuleManager",
    "Steer",
    "default_object_path",
    "monotonic_ns",
]


class Kind(enum.IntEnum):
    """What a matching packet gets (``XO_STEER_*``)."""

    BLOCK = lib.XO_STEER_BLOCK
    REDIRECT = lib.XO_STEER_REDIRECT
    SRC_REWRITE = lib.XO_STEER_SRC_REWRITE
    PARK = lib.XO_STEER_PARK


# The kinds a hardware tier can carry; PARK keeps a copy of each frame in a
# BPF ring buffer, which only the software tier can do.
HW_KINDS = frozenset({Kind.BLOCK, Kind.REDIRECT, Kind.SRC_REWRITE})


class Prog(enum.IntEnum):
    """The programs of ``xo_steer.bpf.o`` (``XO_PROG_*``)."""

    TC_INGRESS = lib.XO_PROG_TC_INGRESS
    TC_EGRESS = lib.XO_PROG_TC_EGRESS
    XDP = lib.XO_PROG_XDP


class InsertMode(enum.IntEnum):
    UPSERT = lib.XO_STEER_UPSERT
    CREATE = lib.XO_STEER_CREATE
    REPLACE = lib.XO_STEER_REPLACE


STAT_NAMES = {
    lib.XO_STAT_BLOCKED: "blocked",
    lib.XO_STAT_REDIRECTED: "redirected",
    lib.XO_STAT_REWRITTEN: "rewritten",
    lib.XO_STAT_EXPIRED: "expired",
    lib.XO_STAT_ERRORS: "errors",
    lib.XO_STAT_PARKED: "parked",
    lib.XO_STAT_PARK_OVERFLOW: "park_overflow",
    lib.XO_STAT_HELD: "held",
}

# The C structs as byte layouts (xo_steer_abi.h). Packing with struct and
# handing cffi a pointer into the bytes is several times faster than
# filling cdata field by field, and rule changes are on the handoff path.
# Ports are stored in network byte order, hence the htons() on the way in.
# Every C field, in order, with its struct code (padding included): the
# mirror is checked field by field (name, offset, size) against cffi's
# parse of the header, here at import and in tests/test_steer_abi.py.
KEY_FIELDS: tuple[tuple[str, str], ...] = (
    ("src_addr", "16s"), ("dst_addr", "16s"), ("src_port", "H"), ("dst_port", "H"),
    ("family", "B"), ("proto", "B"), ("pad", "2x"),
)
ACTION_FIELDS: tuple[tuple[str, str], ...] = (
    ("kind", "B"), ("pad0", "3x"), ("ifindex", "I"), ("new_dst_addr", "16s"),
    ("new_src_addr", "16s"), ("new_dst_port", "H"), ("new_src_port", "H"),
    ("dst_mac", "6s"), ("src_mac", "6s"), ("pad1", "4x"), ("owner", "I"),
    ("expires_ns", "Q"), ("packets", "Q"), ("bytes", "Q"),
)


def mirror_layout(fields: tuple[tuple[str, str], ...]) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field of a struct-module mirror."""
    out, fmt = [], "="
    for name, code in fields:
        offset = struct.calcsize(fmt)
        fmt += code
        out.append((name, offset, struct.calcsize(fmt) - offset))
    return out


def c_layout(ctype: str) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field of a C struct as cffi parsed it."""
    return [(name, f.offset, ffi.sizeof(f.type)) for name, f in ffi.typeof(ctype).fields]


def abi_mismatches(fields: tuple[tuple[str, str], ...], ctype: str) -> list[str]:
    """Where the mirror and the C struct disagree ([] when they agree)."""
    mirror, c = mirror_layout(fields), c_layout(ctype)
    diffs = [f"{ctype}: mirror {m} vs C {k}" for m, k in zip(mirror, c, strict=False)
             if m != k]
    if len(mirror) != len(c):
        diffs.append(f"{ctype}: mirror has {len(mirror)} fields, C has {len(c)}")
    size = struct.calcsize("=" + "".join(code for _, code in fields))
    if size != ffi.sizeof(ctype):
        diffs.append(f"{ctype}: mirror is {size} bytes, C is {ffi.sizeof(ctype)}")
    return diffs


_KEY = struct.Struct("=" + "".join(code for _, code in KEY_FIELDS))
_ACT = struct.Struct("=" + "".join(code for _, code in ACTION_FIELDS))
_ABI_DIFFS = (abi_mismatches(KEY_FIELDS, "struct xo_flow_key")
              + abi_mismatches(ACTION_FIELDS, "struct xo_steer_action"))
if _ABI_DIFFS:
    raise ImportError("xo.steer mirrors disagree with xo_steer_abi.h: " + "; ".join(_ABI_DIFFS))

_FAMILY = {4: lib.XO_AF_INET, 6: lib.XO_AF_INET6}


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock the programs compare expiries with."""
    return time.monotonic_ns()


def default_object_path() -> Path:
    """The compiled ``xo_steer.bpf.o`` shipped with the package."""
    return Path(__file__).resolve().parent / "data" / "xo_steer.bpf.o"


def _check(code: int) -> int:
    raise_for(code)
    return code


def _addr(value: IPAddress | str) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    return ipaddress.ip_address(value)


def _addr16(addr: IPAddress | None) -> bytes:
    return bytes(16) if addr is None else addr.packed.ljust(16, b"\0")


def _mac(value: str | bytes | None) -> bytes:
    if value is None:
        return bytes(6)
    raw = value if isinstance(value, bytes) else bytes.fromhex(value.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"a MAC address has 6 bytes, got {value!r}")
    return raw


def _mac_str(raw: bytes) -> str | None:
    return None if raw == bytes(6) else ":".join(f"{b:02x}" for b in raw)


def _port(value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"port {value} out of range")
    return socket.htons(value)


@dataclass(frozen=True)
class FlowKey:
    """One TCP flow in one direction, as the program sees it in the packet.

    Ingress rules (block, redirect): src is the client, dst this host.
    Egress rule (source rewrite, on the target): src is the target's
    restored socket, dst the client.
    """

    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int
    packed: bytes = field(init=False, repr=False, compare=False)
    # Not a field (dataclasses.asdict() would try to deep-copy it).
    _cdata: ClassVar[Any]

    def __post_init__(self) -> None:
        src, dst = _addr(self.src), _addr(self.dst)
        if src.version != dst.version:
            raise ValueError(f"mixed address families: {src} and {dst}")
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        packed = _KEY.pack(
            _addr16(src), _addr16(dst), _port(self.src_port), _port(self.dst_port),
            _FAMILY[src.version], socket.IPPROTO_TCP,
        )
        object.__setattr__(self, "packed", packed)
        # A C view of the bytes, made once: keys are reused across calls.
        object.__setattr__(self, "_cdata", ffi.from_buffer("struct xo_flow_key *", packed))

    @classmethod
    def tcp(cls, src: str | IPAddress, src_port: int, dst: str | IPAddress,
            dst_port: int) -> FlowKey:
        return cls(_addr(src), src_port, _addr(dst), dst_port)

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlowKey:
        src, dst, sport, dport, family, _proto = _KEY.unpack(raw)
        n = 4 if family == lib.XO_AF_INET else 16
        return cls(ipaddress.ip_address(src[:n]), socket.ntohs(sport),
                   ipaddress.ip_address(dst[:n]), socket.ntohs(dport))

    @property
    def family(self) -> int:
        return _FAMILY[self.src.version]

    def reversed(self) -> FlowKey:
        """The same connection in the other direction."""
        return FlowKey(self.dst, self.dst_port, self.src, self.src_port)

    def _c(self) -> Any:
        return self._cdata


@dataclass(frozen=True)
class Rule:
    """An entry's action (``struct xo_steer_action``).

    Zero ports and absent MACs mean "leave as is". ``expires_ns`` is
    CLOCK_MONOTONIC (see :func:`monotonic_ns`); block and redirect entries
    must expire. ``packets``/``bytes`` are the datapath's counters.
    """

    kind: Kind
    new_dst: IPAddress | None = None
    new_dst_port: int = 0
    new_src: IPAddress | None = None
    new_src_port: int = 0
    dst_mac: str | None = None
    src_mac: str | None = None
    ifindex: int = 0
    owner: int = 0
    expires_ns: int = 0
    packets: int = 0
    bytes: int = 0
    packed: bytes = field(init=False, repr=False, compare=False)
    # Not a field (dataclasses.asdict() would try to deep-copy it).
    _cdata: ClassVar[Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        for name in ("new_dst", "new_src"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _addr(value))
        # Packed once: the bytes the map holds (also validates MACs/ports).
        object.__setattr__(self, "packed", self.pack())
        object.__setattr__(self, "_cdata",
                           ffi.from_buffer("struct xo_steer_action *", self.packed))

    @staticmethod
    def _expiry(ttl_s: float | None, expires_ns: int) -> int:
        if ttl_s is not None:
            return monotonic_ns() + int(ttl_s * 1e9)
        return expires_ns

    @classmethod
    def block(cls, *, ttl_s: float | None = None, expires_ns: int = 0,
              owner: int = 0) -> Rule:
        return cls(Kind.BLOCK, owner=owner, expires_ns=cls._expiry(ttl_s, expires_ns))

    @classmethod
    def redirect(cls, new_dst: str | IPAddress, new_dst_port: int = 0, *,
                 dst_mac: str | None = None, src_mac: str | None = None,
                 ifindex: int = 0, ttl_s: float | None = None, expires_ns: int = 0,
                 owner: int = 0) -> Rule:
        return cls(Kind.REDIRECT, new_dst=_addr(new_dst), new_dst_port=new_dst_port,
                   dst_mac=dst_mac, src_mac=src_mac, ifindex=ifindex, owner=owner,
                   expires_ns=cls._expiry(ttl_s, expires_ns))

    @classmethod
    def src_rewrite(cls, new_src: str | IPAddress, new_src_port: int = 0, *,
                    ttl_s: float | None = None, expires_ns: int = 0,
                    owner: int = 0) -> Rule:
        return cls(Kind.SRC_REWRITE, new_src=_addr(new_src), new_src_port=new_src_port,
                   owner=owner, expires_ns=cls._expiry(ttl_s, expires_ns))

    def pack(self) -> bytes:
        return _ACT.pack(
            int(self.kind), self.ifindex, _addr16(self.new_dst), _addr16(self.new_src),
            _port(self.new_dst_port), _port(self.new_src_port),
            _mac(self.dst_mac), _mac(self.src_mac),
            self.owner, self.expires_ns, self.packets, self.bytes,
        )

    @classmethod
    def from_bytes(cls, raw: bytes, family: int) -> Rule:
        (kind, ifindex, ndst, nsrc, ndport, nsport, dmac, smac, owner, expires,
         packets, nbytes) = _ACT.unpack(raw)
        n = 4 if family == lib.XO_AF_INET else 16

        def addr(b: bytes) -> IPAddress | None:
            return None if b == bytes(16) else ipaddress.ip_address(b[:n])

        return cls(Kind(kind), addr(ndst), socket.ntohs(ndport), addr(nsrc),
                   socket.ntohs(nsport), _mac_str(dmac), _mac_str(smac), ifindex,
                   owner, expires, packets, nbytes)


def _act_c(rule: Rule) -> Any:
    return rule._cdata


class Steer:
    """The software tier: the loaded object, its pinned map, attachments.

    ``pin_dir`` defaults to ``/sys/fs/bpf/xo``; a bpffs is mounted there if
    none is. Pass ``pin=False`` for private maps (tests, benchmarks).
    """

    def __init__(self, obj_path: str | Path | None = None, pin_dir: str | None = None,
                 *, pin: bool = True, max_flows: int = 0, park_ring_bytes: int = 0) -> None:
        path = Path(obj_path) if obj_path else default_object_path()
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: eBPF object missing; build it with `bash ci/build-dev.sh`"
                " (or `make -C bpf`)")
        opts = ffi.new("struct xo_steer_opts *")
        opts.size = ffi.sizeof("struct xo_steer_opts")
        opts.flags = 0 if pin else lib.XO_STEER_F_NO_PIN
        c_path = ffi.new("char[]", str(path).encode())
        c_pin = ffi.new("char[]", pin_dir.encode()) if pin_dir else ffi.NULL
        opts.obj_path = c_path
        opts.pin_dir = c_pin
        opts.max_flows = max_flows
        opts.park_ring_bytes = park_ring_bytes
        out = ffi.new("struct xo_steer **")
        _check(lib.xo_steer_open(opts, out))
        self._s: Any = out[0]
        self._action_buf = ffi.new("struct xo_steer_action *")

    # -- life cycle --

    def close(self, *, unpin: bool = False, keep_attached: bool = False) -> None:
        """Detach everything attached through this handle and free it."""
        if self._s is None:
            return
        flags = (lib.XO_STEER_CLOSE_UNPIN if unpin else 0) | (
            lib.XO_STEER_CLOSE_KEEP_ATTACHED if keep_attached else 0)
        lib.xo_steer_close(self._s, flags)
        self._s = None

    def __enter__(self) -> Steer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Programs stay attached only if asked explicitly (close()).
        if getattr(self, "_s", None) is not None:
            self.close()

    @property
    def handle(self) -> Any:
        if self._s is None:
            raise ValueError("Steer is closed")
        return self._s

    @property
    def pin_dir(self) -> str:
        return ffi.string(lib.xo_steer_pin_dir(self.handle)).decode()

    @property
    def map_fd(self) -> int:
        return lib.xo_steer_map_fd(self.handle)

    # -- attachment --

    def attach(self, ifindex: int, prog: Prog, *, netns: str | None = None,
               priority: int = 0, xdp_mode: int = 0) -> None:
        """Attach a program. ``netns`` is a path such as /run/netns/NAME."""
        opts = ffi.new("struct xo_attach_opts *")
        opts.size = ffi.sizeof("struct xo_attach_opts")
        opts.tc_priority = priority
        opts.xdp_flags = xdp_mode
        c_ns = ffi.new("char[]", netns.encode()) if netns else ffi.NULL
        opts.netns = c_ns
        _check(lib.xo_steer_attach(self.handle, ifindex, int(prog), opts))

    def detach(self, ifindex: int, prog: Prog, *, netns: str | None = None) -> None:
        c_ns = ffi.new("char[]", netns.encode()) if netns else ffi.NULL
        _check(lib.xo_steer_detach(self.handle, ifindex, int(prog), c_ns))

    # -- rules --

    def insert(self, key: FlowKey, rule: Rule, mode: InsertMode = InsertMode.UPSERT) -> None:
        # The hot path of a handoff: no helper calls beyond the C one.
        ret = lib.xo_steer_insert(self._s or self.handle, key._cdata, rule._cdata, mode)
        if ret < 0:
            raise_for(ret)

    def remove(self, key: FlowKey) -> None:
        ret = lib.xo_steer_remove(self._s or self.handle, key._cdata)
        if ret < 0:
            raise_for(ret)

    def lookup(self, key: FlowKey) -> Rule | None:
        ret = lib.xo_steer_lookup(self.handle, key._c(), self._action_buf)
        if ret == lib.XO_E_NOTFOUND:
            return None
        _check(ret)
        return Rule.from_bytes(bytes(ffi.buffer(self._action_buf)), key.family)

    def __contains__(self, key: FlowKey) -> bool:
        return self.lookup(key) is not None

    def list(self) -> list[tuple[FlowKey, Rule]]:
        cap = 0
        while True:
            keys = ffi.new("struct xo_flow_key[]", max(cap, 1))
            acts = ffi.new("struct xo_steer_action[]", max(cap, 1))
            n = _check(lib.xo_steer_list(self.handle, keys, acts, cap))
            if n <= cap:
                break
            cap = n + 16  # entries may be added meanwhile
        kb, ab = ffi.buffer(keys), ffi.buffer(acts)
        out = []
        for i in range(n):
            key = FlowKey.from_bytes(kb[i * _KEY.size:(i + 1) * _KEY.size])
            out.append((key, Rule.from_bytes(ab[i * _ACT.size:(i + 1) * _ACT.size],
                                             key.family)))
        return out

    def __iter__(self) -> Iterator[tuple[FlowKey, Rule]]:
        return iter(self.list())

    def count(self) -> int:
        return _check(lib.xo_steer_count(self.handle))

    def __len__(self) -> int:
        return self.count()

    def sweep(self, now_ns: int = 0) -> int:
        """Delete entries whose expiry passed; returns how many."""
        return _check(lib.xo_steer_sweep(self.handle, now_ns))

    def purge_owner(self, owner: int) -> int:
        return _check(lib.xo_steer_purge_owner(self.handle, owner))

    # -- parked frames: a ring per owner (xo_steer.h, xo_park_own) --

    def park_own(self, owner: int) -> None:
        """Give this handle a ring of its own for the PARK entries of
        ``owner`` (processes sharing one loaded object, e.g. after fork)."""
        _check(lib.xo_park_own(self.handle, owner))

    def park_owners(self) -> list[int]:
        """Owners with a ring of their own in this handle's object."""
        n = _check(lib.xo_park_owners(self.handle, ffi.NULL, 0))
        out = ffi.new("uint32_t[]", max(n, 1))
        n = _check(lib.xo_park_owners(self.handle, out, n))
        return sorted(int(out[i]) for i in range(n))

    def park_disown(self, owner: int) -> None:
        """Remove an owner's ring: its entries park into the shared ring."""
        _check(lib.xo_park_disown(self.handle, owner))

    def park_collect(self) -> int:
        """Read the handle's rings into its stash; the frames read."""
        return _check(lib.xo_park_collect(self.handle))

    def dp_stats(self) -> dict[str, int]:
        counts = ffi.new("uint64_t[]", lib.XO_STAT_MAX)
        _check(lib.xo_steer_dp_stats(self.handle, counts))
        return {name: int(counts[i]) for i, name in STAT_NAMES.items()}

    # -- testing and measuring --

    def test_run(self, prog: Prog, packet: bytes) -> tuple[int, bytes]:
        """Run one program on one packet (BPF_PROG_TEST_RUN): (verdict, packet out)."""
        out = ffi.new("uint8_t[]", len(packet) + 256)
        out_len = ffi.new("uint32_t *")
        retval = ffi.new("uint32_t *")
        _check(lib.xo_steer_test_run(self.handle, int(prog), packet, len(packet), out,
                                     len(out), out_len, retval))
        return int(retval[0]), bytes(ffi.buffer(out, out_len[0]))

    def bench(self, count: int) -> tuple[list[int], list[int], list[int]]:
        """Latencies (ns) of ``count`` inserts, removes and bpf() floor
        calls (a missing-key lookup), timed in C."""
        ins = ffi.new("uint64_t[]", count)
        rem = ffi.new("uint64_t[]", count)
        floor = ffi.new("uint64_t[]", count)
        _check(lib.xo_steer_bench(self.handle, count, ins, rem, floor))
        return list(ins), list(rem), list(floor)


@dataclass(frozen=True)
class HwCall:
    """One call the test backend received."""

    op: str  # "insert" or "remove"
    kind: int
    key: FlowKey
    cookie: int
    start_ns: int
    end_ns: int


class HwBackend:
    """A hardware backend before (and, for queries, while) a manager owns it."""

    def __init__(self, ptr: Any) -> None:
        self._p: Any = ptr
        self._owned = False  # by a RuleManager

    @classmethod
    def flower(cls, ifindex: int, *, mode: str = "auto", priority: int = 0,
               netns: str | None = None) -> HwBackend:
        """tc-flower; raises XoUnsupportedError when the kernel lacks it."""
        modes = {"auto": lib.XO_FLOWER_AUTO, "skip_sw": lib.XO_FLOWER_SKIP_SW,
                 "skip_hw": lib.XO_FLOWER_SKIP_HW}
        if mode not in modes:
            raise ValueError(f"flower mode {mode!r}: one of {sorted(modes)}")
        opts = ffi.new("struct xo_flower_opts *")
        opts.size = ffi.sizeof("struct xo_flower_opts")
        opts.mode = modes[mode]
        opts.priority = priority
        c_ns = ffi.new("char[]", netns.encode()) if netns else ffi.NULL
        opts.netns = c_ns
        out = ffi.new("struct xo_hw_backend **")
        _check(lib.xo_hw_flower_create(ifindex, opts, out))
        return cls(out[0])

    @classmethod
    def test(cls, insert_delay_us: int = 0, remove_delay_us: int = 0) -> HwBackend:
        """The recording test double (sleeps per call)."""
        out = ffi.new("struct xo_hw_backend **")
        _check(lib.xo_hw_test_create(insert_delay_us, remove_delay_us, out))
        return cls(out[0])

    @property
    def name(self) -> str:
        return ffi.string(lib.xo_hw_backend_name(self._ptr())).decode()

    def _ptr(self) -> Any:
        if self._p is None:
            raise ValueError("backend was destroyed (its manager was closed)")
        return self._p

    def calls(self) -> list[HwCall]:
        n = _check(lib.xo_hw_test_calls(self._ptr(), ffi.NULL, 0))
        buf = ffi.new("struct xo_hw_call[]", max(n, 1))
        n = min(_check(lib.xo_hw_test_calls(self._ptr(), buf, n)), n)
        out = []
        for i in range(n):
            c = buf[i]
            key = FlowKey.from_bytes(bytes(ffi.buffer(ffi.addressof(c, "key"))))
            op = "insert" if c.op == lib.XO_HW_CALL_INSERT else "remove"
            out.append(HwCall(op, c.kind, key, c.cookie, c.start_ns, c.end_ns))
        return out

    def bench(self, count: int) -> tuple[list[int], list[int]]:
        """Time ``count`` insert+remove pairs of a redirect straight through
        the backend (``xo_hw_bench``): (insert ns, remove ns) samples."""
        if self._owned:
            raise ValueError("a manager owns this backend: bench a free one")
        ins = ffi.new("uint64_t[]", count)
        rem = ffi.new("uint64_t[]", count)
        _check(lib.xo_hw_bench(self._ptr(), count, ins, rem))
        return list(ins), list(rem)

    def installed(self) -> int:
        return _check(lib.xo_hw_test_installed(self._ptr()))

    def has(self, key: FlowKey) -> bool:
        return bool(_check(lib.xo_hw_test_has(self._ptr(), key._c())))

    def fail_inserts(self, code: int) -> None:
        _check(lib.xo_hw_test_fail_inserts(self._ptr(), code))

    def hold_inserts(self, hold: bool) -> None:
        """Keep inserts in flight until released (test double only)."""
        _check(lib.xo_hw_test_hold(self._ptr(), int(hold)))

    def held(self) -> int:
        """Inserts blocked by the hold right now (test double only)."""
        return _check(lib.xo_hw_test_held(self._ptr()))

    @contextlib.contextmanager
    def holding_inserts(self) -> Iterator[None]:
        """Inserts stay in flight inside the block; released on exit, also on
        an exception (a manager cannot shut down over a held insert)."""
        self.hold_inserts(True)
        try:
            yield
        finally:
            self.hold_inserts(False)

    def close(self) -> None:
        if self._p is not None and not self._owned:
            lib.xo_hw_backend_destroy(self._p)
        self._p = None

    def __del__(self) -> None:
        if getattr(self, "_p", None) is not None and not self._owned:
            self.close()


class RuleManager:
    """Hybrid rules on one interface: software now, hardware through a queue.

    Only the kinds in ``hw_kinds`` (default: redirect, as in the paper) go to
    hardware; the others stay in eBPF.

    ``backend`` is ``"none"`` (eBPF only), ``"flower"`` (raises
    :class:`xo.core.XoUnsupportedError` on kernels without tc-flower) or an
    :class:`HwBackend` (e.g. ``HwBackend.test(...)``), which the manager owns
    from then on.
    """

    def __init__(self, steer: Steer, ifindex: int, backend: str | HwBackend = "none", *,
                 queue_capacity: int = 0, hw_kinds: set[Kind] | None = None,
                 flower_mode: str = "auto", netns: str | None = None) -> None:
        self.steer = steer
        hw: HwBackend | None
        if isinstance(backend, HwBackend):
            hw = backend
        elif backend == "none":
            hw = None
        elif backend == "flower":
            hw = HwBackend.flower(ifindex, mode=flower_mode, netns=netns)
        else:
            raise ValueError(f"hardware backend {backend!r}: 'none', 'flower' or HwBackend")
        opts = ffi.new("struct xo_rules_opts *")
        opts.size = ffi.sizeof("struct xo_rules_opts")
        opts.queue_capacity = queue_capacity
        # Which kinds also go to hardware; None = redirect only (the paper).
        if hw_kinds and not hw_kinds <= HW_KINDS:
            raise ValueError(f"hw_kinds: {', '.join(k.name for k in hw_kinds - HW_KINDS)} "
                             "cannot go to hardware (software tier only)")
        opts.hw_kinds = sum(1 << int(k) for k in hw_kinds) if hw_kinds else 0
        out = ffi.new("struct xo_rules **")
        try:
            _check(lib.xo_rules_create(steer.handle, ifindex,
                                       hw._ptr() if hw else ffi.NULL, opts, out))
        except XoError:
            if hw is not None and hw is not backend:
                hw.close()
            raise
        self._r: Any = out[0]
        self.backend = hw
        if hw is not None:
            hw._owned = True

    def _h(self) -> Any:
        if self._r is None:
            raise ValueError("RuleManager is closed")
        return self._r

    def close(self) -> None:
        """Stop the queue, remove all hardware entries, free the backend."""
        if self._r is None:
            return
        lib.xo_rules_destroy(self._r)
        self._r = None
        if self.backend is not None:
            self.backend._p = None

    def __enter__(self) -> RuleManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_r", None) is not None:
            self.close()

    @property
    def backend_name(self) -> str:
        return ffi.string(lib.xo_rules_backend_name(self._h())).decode()

    def insert(self, key: FlowKey, rule: Rule) -> None:
        _check(lib.xo_rules_insert(self._h(), key._c(), _act_c(rule)))

    def remove(self, key: FlowKey) -> None:
        """Returns only when neither tier holds the flow any more."""
        _check(lib.xo_rules_remove(self._h(), key._c()))

    def drain(self, timeout_ms: int = 5000) -> None:
        _check(lib.xo_rules_drain(self._h(), timeout_ms))

    def hw_state(self, key: FlowKey) -> set[str]:
        bits = _check(lib.xo_rules_hw_state(self._h(), key._c()))
        names = {lib.XO_HW_QUEUED: "queued", lib.XO_HW_INFLIGHT: "inflight",
                 lib.XO_HW_INSTALLED: "installed"}
        return {name for bit, name in names.items() if bits & bit}

    def sweep(self, now_ns: int = 0) -> int:
        return _check(lib.xo_rules_sweep(self._h(), now_ns))

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct xo_rules_stats *")
        lib.xo_rules_get_stats(self._h(), st)
        fields = ("sw_inserts", "sw_removes", "sw_only", "hw_enqueued", "hw_coalesced",
                  "hw_inserted", "hw_removed", "hw_cancelled", "hw_fallback_full", "hw_errors",
                  "queue_len", "queue_capacity", "hw_entries", "inflight")
        return {f: int(getattr(st, f)) for f in fields}

    @property
    def last_hw_error(self) -> str:
        buf = ffi.new("char[]", 512)
        lib.xo_rules_last_hw_error(self._h(), buf, 512)
        return ffi.string(buf).decode(errors="replace")
