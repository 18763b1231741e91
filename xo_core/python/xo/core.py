"""Typed Python API over the C core (cffi): TCP capture/restore, the state
codec and authenticated control-message channels.

Every failure raises an :class:`XoError` (or a subclass) carrying the core's
error code and its sentence, which names the step that failed and the errno.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from xo._xo_cffi import ffi, lib

# ---- errors ----------------------------------------------------------------


class XoError(Exception):
    """A failure reported by the C core."""

    def __init__(self, code: int, message: str, errno: int = 0) -> None:
        self.code = code
        self.name = ffi.string(lib.xo_strerror(code)).decode()
        self.errno = errno
        super().__init__(f"{self.name}: {message}" if message else self.name)


class XoPermissionError(XoError, PermissionError):
    """TCP repair refused: the process lacks CAP_NET_ADMIN."""


class XoNotEstablishedError(XoError):
    """The socket is not an ESTABLISHED TCP connection."""


class XoDecodeError(XoError, ValueError):
    """Bytes that are not a valid XO state or message."""


class XoRejectedError(XoError):
    """A control message that failed authentication or ordering checks."""


class XoUnsupportedError(XoError):
    """The kernel lacks a feature; the message says which and what to do."""


_DECODE_CODES = {
    lib.XO_E_TRUNCATED, lib.XO_E_BAD_MAGIC, lib.XO_E_VERSION, lib.XO_E_LENGTH,
    lib.XO_E_FIELD, lib.XO_E_DUPLICATE, lib.XO_E_MISSING, lib.XO_E_TOO_LARGE,
}
_REJECT_CODES = {lib.XO_E_AUTH, lib.XO_E_REPLAY, lib.XO_E_SEQUENCE, lib.XO_E_CHANNEL,
                 lib.XO_E_MSG_TYPE}


def raise_for(code: int) -> None:
    """Raise the exception matching a negative core return code."""
    if code >= 0:
        return
    message = ffi.string(lib.xo_last_error()).decode(errors="replace")
    errno = lib.xo_last_errno()
    cls: type[XoError] = XoError
    if code == lib.XO_E_PERM:
        cls = XoPermissionError
    elif code == lib.XO_E_NOT_ESTABLISHED:
        cls = XoNotEstablishedError
    elif code in _DECODE_CODES:
        cls = XoDecodeError
    elif code in _REJECT_CODES:
        cls = XoRejectedError
    elif code == lib.XO_E_UNSUPPORTED:
        cls = XoUnsupportedError
    raise cls(code, message, errno)


def _check(code: int) -> int:
    raise_for(code)
    return code


# ---- TCP state -------------------------------------------------------------

OPT_TIMESTAMPS = lib.XO_OPT_TIMESTAMPS
OPT_SACK = lib.XO_OPT_SACK
OPT_WSCALE = lib.XO_OPT_WSCALE
# The most already-read bytes a handoff carries.
MAX_APP_BYTES = lib.XO_MAX_APP_BYTES


@dataclass(frozen=True)
class Endpoint:
    """An IP address and port (host byte order)."""

    ip: str
    port: int
    scope_id: int = 0

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    def to_c(self, out: Any) -> None:
        packed = ipaddress.ip_address(self.ip).packed
        out.family = self.family
        out.port = self.port
        out.scope_id = self.scope_id
        ffi.memmove(out.addr, packed + bytes(16 - len(packed)), 16)

    @classmethod
    def from_c(cls, ep: Any) -> Endpoint:
        raw = bytes(ffi.buffer(ep.addr, 16))
        if ep.family == socket.AF_INET:
            ip = str(ipaddress.IPv4Address(raw[:4]))
        else:
            ip = str(ipaddress.IPv6Address(raw))
        return cls(ip, ep.port, ep.scope_id)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def _fileno(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


# ---- TLS record state ---------------------------------------------------------

TLS_1_2 = lib.XO_TLS_1_2
TLS_1_3 = lib.XO_TLS_1_3
TLS_AES_GCM_128 = lib.XO_TLS_AES_GCM_128
TLS_AES_GCM_256 = lib.XO_TLS_AES_GCM_256
TLS_CHACHA20_POLY1305 = lib.XO_TLS_CHACHA20_POLY1305
# key, IV and salt lengths per cipher (as in linux/tls.h)
TLS_SIZES: dict[int, tuple[int, int, int]] = {
    TLS_AES_GCM_128: (16, 8, 4),
    TLS_AES_GCM_256: (32, 8, 4),
    TLS_CHACHA20_POLY1305: (32, 12, 0),
}


@dataclass(frozen=True)
class TlsDir:
    """One direction's record state: traffic key, IV, salt, next record's
    sequence number. Its repr hides the secrets."""
    key: bytes
    iv: bytes
    salt: bytes
    rec_seq: int

    def __repr__(self) -> str:
        return f"TlsDir(key=<{len(self.key)} bytes>, iv=<{len(self.iv)} bytes>, " \
               f"salt=<{len(self.salt)} bytes>, rec_seq={self.rec_seq})"


@dataclass(frozen=True)
class TlsState:
    """The TLS record state of a connection (struct xo_tls_state)."""
    version: int
    cipher: int
    tx: TlsDir | None
    rx: TlsDir | None

    def to_c(self, c: Any) -> None:
        """Fill a ``struct xo_tls_state *`` (lengths are the caller's: the
        core checks them)."""
        c.version = self.version
        c.cipher = self.cipher
        c.dirs = (lib.XO_TLS_DIR_TX if self.tx else 0) | (lib.XO_TLS_DIR_RX if self.rx else 0)
        for d, cd in ((self.tx, c.tx), (self.rx, c.rx)):
            if d is None:
                continue
            for name, cap in (("key", 32), ("iv", 12), ("salt", 4)):
                value = getattr(d, name)
                if len(value) > cap:
                    raise ValueError(f"TLS {name} of {len(value)} bytes (at most {cap})")
                ffi.memmove(getattr(cd, name), value, len(value))
            cd.rec_seq = d.rec_seq

    @classmethod
    def from_c(cls, c: Any) -> TlsState:
        key, iv, salt = TLS_SIZES.get(int(c.cipher), (32, 12, 4))

        def one(cd: Any) -> TlsDir:
            return TlsDir(bytes(cd.key)[:key], bytes(cd.iv)[:iv], bytes(cd.salt)[:salt],
                          int(cd.rec_seq))
        return cls(int(c.version), int(c.cipher),
                   one(c.tx) if c.dirs & lib.XO_TLS_DIR_TX else None,
                   one(c.rx) if c.dirs & lib.XO_TLS_DIR_RX else None)

    def check(self) -> None:
        """Raise the core's refusal of this state, if any (xo_tls_check)."""
        c = ffi.new("struct xo_tls_state *")
        try:
            self.to_c(c)
            _check(lib.xo_tls_check(c))
        finally:
            ffi.memmove(c, bytes(ffi.sizeof(c[0])), ffi.sizeof(c[0]))


def _tls_out(fill: Any) -> TlsState:
    c = ffi.new("struct xo_tls_state *")
    try:
        _check(fill(c))
        return TlsState.from_c(c)
    finally:
        ffi.memmove(c, bytes(ffi.sizeof(c[0])), ffi.sizeof(c[0]))


def tls13_state(cipher: int, client_secret: bytes, server_secret: bytes, is_server: bool,
                tx_seq: int, rx_seq: int) -> TlsState:
    """This end's record state from the TLS 1.3 application traffic secrets
    (OpenSSL's key log) and the next record numbers (xo_tls13_state)."""
    if len(client_secret) != len(server_secret):
        raise ValueError("the two traffic secrets differ in length")
    return _tls_out(lambda c: lib.xo_tls13_state(cipher, client_secret, server_secret,
                                                 len(client_secret), int(is_server),
                                                 tx_seq, rx_seq, c))


def tls12_state(cipher: int, master: bytes, client_random: bytes, server_random: bytes,
                is_server: bool, tx_seq: int, rx_seq: int) -> TlsState:
    """This end's record state from a TLS 1.2 master secret and the hello
    randoms (xo_tls12_state)."""
    if len(client_random) != 32 or len(server_random) != 32:
        raise ValueError("hello randoms have 32 bytes")
    return _tls_out(lambda c: lib.xo_tls12_state(cipher, master, len(master), client_random,
                                                 server_random, int(is_server), tx_seq,
                                                 rx_seq, c))


@dataclass(frozen=True)
class TlsRecord:
    type: int
    data: bytes


class TlsRecordLayer:
    """The core's TLS record layer in user space (xo_tls_rec_*): continues a
    session from a TlsState with both directions."""

    APPLICATION_DATA = 23
    ALERT = 21

    def __init__(self, state: TlsState) -> None:
        c = ffi.new("struct xo_tls_state *")
        out = ffi.new("struct xo_tls_rec **")
        try:
            state.to_c(c)
            _check(lib.xo_tls_rec_new(c, out))
        finally:
            ffi.memmove(c, bytes(ffi.sizeof(c[0])), ffi.sizeof(c[0]))
        self._r = ffi.gc(out[0], lib.xo_tls_rec_free)

    def seal(self, data: bytes, type: int = APPLICATION_DATA) -> bytes:
        """data as records of at most 16 KiB each."""
        out = []
        for off in range(0, max(len(data), 1), lib.XO_TLS_MAX_PLAINTEXT):
            chunk = data[off:off + lib.XO_TLS_MAX_PLAINTEXT]
            size = lib.xo_tls_rec_sealed_size(self._r, len(chunk))
            buf = ffi.new("uint8_t[]", size)
            n = lib.xo_tls_rec_seal(self._r, type, chunk, len(chunk), buf, size)
            _check(int(n) if n < 0 else 0)
            out.append(bytes(ffi.buffer(buf, n)))
        return b"".join(out)

    def open(self, data: bytes) -> tuple[int, TlsRecord | None]:
        """(bytes used, the record) for the record data starts with; (0, None)
        until data holds a whole record."""
        buf = ffi.new("uint8_t[]", data) if data else ffi.new("uint8_t[]", 1)
        rec = ffi.new("struct xo_tls_record *")
        n = lib.xo_tls_rec_open(self._r, buf, len(data), rec)
        _check(int(n) if n < 0 else 0)
        if n == 0:
            return 0, None
        return int(n), TlsRecord(int(rec.type), bytes(ffi.buffer(rec.data, rec.len)))

    @property
    def state(self) -> TlsState:
        return _tls_out(lambda c: lib.xo_tls_rec_get_state(self._r, c))


def tls_kernel_available() -> tuple[bool, str]:
    """Whether this kernel has TLS (CONFIG_TLS), and why not."""
    ok = lib.xo_tls_kernel_available()
    return ok == 1, "" if ok == 1 else ffi.string(lib.xo_last_error()).decode()


class TcpState:
    """The captured state of one TCP connection (owns its C buffers)."""

    def __init__(self) -> None:
        self._c = ffi.gc(ffi.new("struct xo_tcp_state *"), lib.xo_state_release)

    @property
    def c(self) -> Any:
        """The underlying ``struct xo_tcp_state *`` (for other core calls)."""
        return self._c

    # Endpoints and numbers, read straight from the C struct.
    @property
    def local(self) -> Endpoint:
        return Endpoint.from_c(self._c.local)

    @property
    def remote(self) -> Endpoint:
        return Endpoint.from_c(self._c.remote)

    def __getattr__(self, name: str) -> Any:
        if name in _SCALAR_FIELDS:
            return getattr(self._c, name)
        raise AttributeError(name)

    @property
    def sendq(self) -> bytes:
        n = self._c.inflight_len + self._c.unsent_len
        return bytes(ffi.buffer(self._c.sendq, n)) if n else b""

    @property
    def inflight(self) -> bytes:
        return self.sendq[: self._c.inflight_len]

    @property
    def unsent(self) -> bytes:
        return self.sendq[self._c.inflight_len :]

    @property
    def recvq(self) -> bytes:
        n = self._c.recvq_len
        return bytes(ffi.buffer(self._c.recvq, n)) if n else b""

    @property
    def app_data(self) -> bytes:
        n = self._c.app_len
        return bytes(ffi.buffer(self._c.app_data, n)) if n else b""

    @app_data.setter
    def app_data(self, data: bytes) -> None:
        _check(lib.xo_state_set_app_data(self._c, data, len(data)))

    @property
    def meta(self) -> bytes:
        n = self._c.meta_len
        return bytes(ffi.buffer(self._c.meta, n)) if n else b""

    @meta.setter
    def meta(self, data: bytes) -> None:
        _check(lib.xo_state_set_meta(self._c, data, len(data)))

    @property
    def peer_mac(self) -> bytes | None:
        return bytes(self._c.peer_mac) if self._c.has_peer_mac else None

    @peer_mac.setter
    def peer_mac(self, mac: bytes | None) -> None:
        if mac is not None and len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        lib.xo_state_set_peer_mac(self._c, mac if mac is not None else ffi.NULL)

    @property
    def tls(self) -> TlsState | None:
        return TlsState.from_c(self._c.tls) if self._c.tls != ffi.NULL else None

    @tls.setter
    def tls(self, tls: TlsState | None) -> None:
        if tls is None:
            _check(lib.xo_state_set_tls(self._c, ffi.NULL))
            return
        c = ffi.new("struct xo_tls_state *")
        try:
            tls.to_c(c)
            _check(lib.xo_state_set_tls(self._c, c))
        finally:
            ffi.memmove(c, bytes(ffi.sizeof(c[0])), ffi.sizeof(c[0]))

    def encode(self) -> bytes:
        size = lib.xo_state_encoded_size(self._c)
        buf = ffi.new("uint8_t[]", size)
        n = lib.xo_state_encode(self._c, buf, size)
        _check(int(n) if n < 0 else 0)
        return bytes(ffi.buffer(buf, n))

    @classmethod
    def decode(cls, data: bytes) -> TcpState:
        state = cls()
        _check(lib.xo_state_decode(data, len(data), state._c))
        return state

    def __repr__(self) -> str:
        return (
            f"TcpState({self.local} -> {self.remote}, snd_seq={self.snd_seq}, "
            f"rcv_seq={self.rcv_seq}, inflight={self.inflight_len}, "
            f"unsent={self.unsent_len}, recvq={self.recvq_len}, options={self.options}"
            f"{', tls' if self._c.tls != ffi.NULL else ''})"
        )


_SCALAR_FIELDS = {
    "snd_seq", "rcv_seq", "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup",
    "mss_clamp", "timestamp", "options", "snd_wscale", "rcv_wscale", "inflight_len",
    "unsent_len", "recvq_len", "app_len", "meta_len",
}


def freeze(sock: socket.socket | int) -> None:
    """Enter TCP repair mode: the kernel stops sending on this socket."""
    _check(lib.xo_tcp_freeze(_fileno(sock)))


def capture(sock: socket.socket | int) -> TcpState:
    """Read the whole state of a frozen ESTABLISHED socket, exactly.

    Raises :class:`XoError` with code ``XO_E_URGENT`` when an urgent byte is
    still unread and ``XO_E_BUSY`` when segments kept arriving meanwhile;
    either way the socket is unchanged and can be resumed.
    """
    state = TcpState()
    _check(lib.xo_tcp_capture(_fileno(sock), state.c))
    return state


def late_bytes(sock: socket.socket | int, captured: TcpState) -> bytes:
    """What a socket frozen since a capture took in after it (a frozen
    socket still queues what reaches it)."""
    out = ffi.new("uint8_t **")
    n = ffi.new("uint32_t *")
    _check(lib.xo_tcp_late_bytes(_fileno(sock), captured.rcv_seq & 0xFFFFFFFF,
                                 captured.recvq_len, out, n))
    if out[0] == ffi.NULL:
        return b""
    try:
        return bytes(ffi.buffer(out[0], n[0]))
    finally:
        lib.xo_free(out[0])


def restore(state: TcpState, local: Endpoint | None = None,
            tls_user: bool = False) -> socket.socket:
    """A new socket carrying ``state``, still frozen (call :func:`resume`).

    Never waits and transmits nothing until :func:`resume`, however long the
    caller takes in between.

    ``local`` binds another address/port than the captured one (the target's
    own IP, or a remapped port; port 0 keeps the captured port). The socket
    belongs to the network namespace of the calling thread. A state with TLS
    gets kernel TLS installed, unless ``tls_user`` (the caller runs the
    record layer).
    """
    opts = ffi.new("struct xo_restore_opts *")
    opts.size = ffi.sizeof("struct xo_restore_opts")
    if local is not None:
        opts.use_local = 1
        local.to_c(opts.local)
    opts.tls_user = int(tls_user)
    fd = _check(lib.xo_tcp_restore(state.c, opts))
    return socket.socket(fileno=fd)


def resume(sock: socket.socket | int, state: TcpState | None = None) -> None:
    """Queue ``state``'s in-flight bytes, leave repair mode (no window probe)
    and send its unsent bytes; never waits. ``state`` is what the socket was
    restored from; None for a socket that was only frozen (a rollback)."""
    _check(lib.xo_tcp_resume(_fileno(sock), state.c if state is not None else ffi.NULL))


def discard(sock: socket.socket) -> None:
    """Close a frozen socket without a FIN or RST reaching the peer."""
    _check(lib.xo_tcp_discard(sock.fileno()))
    sock.detach()  # the core closed the descriptor


def last_syscalls() -> int:
    """System calls made by this thread's last capture, restore or resume."""
    return int(lib.xo_last_syscalls())


# ---- control messages ------------------------------------------------------


class MsgType(enum.IntEnum):
    HELLO = lib.XO_MSG_HELLO
    BEGIN_OFFLOAD = lib.XO_MSG_BEGIN_OFFLOAD
    TARGET_READY = lib.XO_MSG_TARGET_READY
    HOST_READY = lib.XO_MSG_HOST_READY
    TARGET_DONE = lib.XO_MSG_TARGET_DONE
    END_OFFLOAD = lib.XO_MSG_END_OFFLOAD
    ABORT = lib.XO_MSG_ABORT
    LOAD_REPORT = lib.XO_MSG_LOAD_REPORT
    PING = lib.XO_MSG_PING
    PONG = lib.XO_MSG_PONG
    PARKED = lib.XO_MSG_PARKED
    BYTES = lib.XO_MSG_BYTES


ENV_VERSION = lib.XO_ENV_VERSION
ENV_HEADER_LEN = lib.XO_ENV_HEADER_LEN
ENV_MAC_LEN = lib.XO_ENV_MAC_LEN
ENV_MAX_PAYLOAD = lib.XO_ENV_MAX_PAYLOAD
HELLO_NONCE_LEN = lib.XO_HELLO_NONCE_LEN


@dataclass(frozen=True)
class Message:
    type: MsgType
    conn_id: int
    seq: int
    channel_id: int
    flags: int
    payload: bytes


class Channel:
    """One end of an encrypted, authenticated control channel (see xo_chan_* in
    xo.h). Only HELLO can be sealed or opened before bind()."""

    def __init__(self, key: bytes, channel_id: int, role: int) -> None:
        c = ffi.new("struct xo_chan *")
        _check(lib.xo_chan_init(c, key, len(key), channel_id, role))
        # The keys live in the core's secret memory: wiped when this goes.
        self._c = ffi.gc(c, lib.xo_chan_free)

    def bind(self, own_nonce: bytes, peer_nonce: bytes) -> None:
        """Switch to the session channel id derived from both HELLO nonces."""
        if len(own_nonce) != HELLO_NONCE_LEN or len(peer_nonce) != HELLO_NONCE_LEN:
            raise ValueError(f"HELLO nonces are {HELLO_NONCE_LEN} bytes")
        _check(lib.xo_chan_bind(self._c, own_nonce, peer_nonce))

    @property
    def channel_id(self) -> int:
        return int(self._c.channel_id)

    @property
    def send_seq(self) -> int:
        return int(self._c.send_seq)

    @property
    def recv_seq(self) -> int:
        return int(self._c.recv_seq)

    def seal(self, type: MsgType | int, conn_id: int = 0, payload: bytes = b"",
             flags: int = 0) -> bytes:
        size = lib.xo_env_size(len(payload))
        out = ffi.new("uint8_t[]", size)
        n = lib.xo_chan_seal(self._c, int(type), flags, conn_id, payload, len(payload), out, size)
        _check(int(n) if n < 0 else 0)
        return bytes(ffi.buffer(out, n))

    @property
    def bound(self) -> bool:
        return bool(self._c.bound)

    def open(self, frame: bytes) -> Message:
        """Verify and decrypt a frame (the given bytes are left as they are)."""
        msg = ffi.new("struct xo_msg *")
        buf = ffi.new("uint8_t[]", frame) if frame else ffi.new("uint8_t[]", 1)
        _check(lib.xo_chan_open(self._c, buf, len(frame), msg))
        payload = bytes(ffi.buffer(msg.payload, msg.payload_len)) if msg.payload_len else b""
        return Message(MsgType(msg.type), int(msg.conn_id), int(msg.seq),
                       int(msg.channel_id), int(msg.flags), payload)


def frame_len(header: bytes) -> int:
    """Total length of the frame whose first ENV_HEADER_LEN bytes are given."""
    n = lib.xo_env_frame_len(header, len(header))
    _check(int(n) if n < 0 else 0)
    return int(n)


# ---- control message payloads ---------------------------------------------

ABORT_DECODE = lib.XO_ABORT_DECODE
ABORT_RESTORE = lib.XO_ABORT_RESTORE
ABORT_TIMEOUT = lib.XO_ABORT_TIMEOUT
ABORT_REFUSED = lib.XO_ABORT_REFUSED
ABORT_HOST = lib.XO_ABORT_HOST


def encode_ready(ep: Endpoint) -> bytes:
    """TARGET_READY payload: where the target restored the connection."""
    c_ep = ffi.new("struct xo_endpoint *")
    ep.to_c(c_ep)
    out = ffi.new("uint8_t[]", lib.XO_READY_LEN)
    _check(lib.xo_ready_encode(c_ep, out, lib.XO_READY_LEN))
    return bytes(out)


def decode_ready(payload: bytes) -> Endpoint:
    c_ep = ffi.new("struct xo_endpoint *")
    _check(lib.xo_ready_decode(payload, len(payload), c_ep))
    return Endpoint.from_c(c_ep)


def encode_abort(reason: int, text: str) -> bytes:
    raw = text.encode()[: lib.XO_ABORT_MAX_TEXT]
    out = ffi.new("uint8_t[]", 4 + len(raw))
    n = _check(lib.xo_abort_encode(reason, raw, len(raw), out, len(out)))
    return bytes(ffi.buffer(out, n))


def decode_abort(payload: bytes) -> tuple[int, str]:
    reason = ffi.new("uint32_t *")
    text = ffi.new("const uint8_t **")
    text_len = ffi.new("uint32_t *")
    _check(lib.xo_abort_decode(payload, len(payload), reason, text, text_len))
    return int(reason[0]), payload[4:4 + text_len[0]].decode(errors="replace")


@dataclass(frozen=True)
class LoadReport:
    """LOAD_REPORT payload: what a target is doing."""

    active: int
    handoffs: int
    bytes_served: int

    def encode(self) -> bytes:
        c_report = ffi.new("struct xo_load_report *", (self.active, self.handoffs,
                                                       self.bytes_served))
        out = ffi.new("uint8_t[]", lib.XO_LOAD_LEN)
        _check(lib.xo_load_encode(c_report, out, lib.XO_LOAD_LEN))
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes) -> LoadReport:
        c_report = ffi.new("struct xo_load_report *")
        _check(lib.xo_load_decode(payload, len(payload), c_report))
        return cls(int(c_report.active), int(c_report.handoffs), int(c_report.bytes_served))
