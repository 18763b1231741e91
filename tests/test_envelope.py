"""The control-message envelope (xo_core/src/envelope.c) against a model of
its documented layout, keys and checks, written here with the cryptography
package (HKDF, AES-GCM) and Python's hmac module.

Frame layout (big-endian), as documented in envelope.c:

    "XM" | version u8 (2) | type u8 | sender role u8 | reserved u8 (0)
    | flags u16 | conn id u64 | seq u64 | channel id u64
    | payload length u32 | reserved u32 (0) | payload | tag (16 bytes)

Every message but HELLO is AES-256-GCM under the session's key for its
direction (HKDF-SHA256: cluster key, both HELLO nonces as salt), the header
as associated data, the nonce the direction's IV XOR the sequence number.
HELLO carries its nonce in clear with HMAC-SHA256 (16 bytes) under a key
derived from the cluster key. Structure is checked first (magic, version,
size limit, length), then the tag, and only then, on an authentic frame:
reflection, reserved bytes, channel id, sequence (a seen one is a replay;
anything but exactly one more than the last is a gap) and message type. A
rejected frame never moves the channel's sequence numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import build_fuzzer, message_of, run_fuzzer
from xo._xo_cffi import ffi, lib
from xo.core import (
    ENV_HEADER_LEN,
    ENV_MAC_LEN,
    ENV_MAX_PAYLOAD,
    HELLO_NONCE_LEN,
    Channel,
    MsgType,
    XoDecodeError,
    XoError,
    XoRejectedError,
    frame_len,
)

HDR = struct.Struct(">2sBBBBHQQQII")
MAGIC = b"XM"
VERSION = 2
U64 = 2**64 - 1
KEY = bytes(range(1, 33))
# The HELLO nonces of the test session (host's, target's).
N0 = bytes(range(HELLO_NONCE_LEN))
N1 = bytes(range(100, 100 + HELLO_NONCE_LEN))
H2T, T2H = 0, 1  # directions: what role 0 sends, what role 1 sends


def hkdf(ikm: bytes, salt: bytes | None, info: str, n: int) -> bytes:
    return HKDF(hashes.SHA256(), n, salt, info.encode()).derive(ikm)


@dataclass(frozen=True)
class Session:
    """A session's keys, derived here as envelope.c documents them."""
    key: bytes
    n0: bytes = N0
    n1: bytes = N1

    @property
    def channel_id(self) -> int:
        return int.from_bytes(hashlib.sha256(self.n0 + self.n1).digest()[:8], "big")

    def hello_key(self) -> bytes:
        return hkdf(self.key, None, "xo ctl v2 hello", 32)

    def aead(self, direction: int) -> tuple[AESGCM, bytes]:
        d = ("h2t", "t2h")[direction]
        salt = self.n0 + self.n1
        return (AESGCM(hkdf(self.key, salt, f"xo ctl v2 key {d}", 32)),
                hkdf(self.key, salt, f"xo ctl v2 iv {d}", 12))


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big"), strict=True))


SESSION = Session(KEY)
CHAN = SESSION.channel_id

OK = 0
STRUCTURAL = {lib.XO_E_TRUNCATED, lib.XO_E_BAD_MAGIC, lib.XO_E_VERSION, lib.XO_E_LENGTH,
              lib.XO_E_TOO_LARGE}
# The exception class each code must arrive as.
CLASS: dict[int, type[XoError]] = {
    **{c: XoDecodeError for c in STRUCTURAL | {lib.XO_E_FIELD}},
    **{c: XoRejectedError for c in (lib.XO_E_AUTH, lib.XO_E_REPLAY, lib.XO_E_SEQUENCE,
                                    lib.XO_E_CHANNEL, lib.XO_E_MSG_TYPE)},
    lib.XO_E_INVAL: XoError,
}

assert HDR.size == ENV_HEADER_LEN == 40 and ENV_MAC_LEN == 16 and lib.XO_ENV_VERSION == VERSION


def name(code: int) -> str:
    return ffi.string(lib.xo_strerror(code)).decode()


@dataclass(frozen=True)
class Header:
    type: int
    role: int
    flags: int = 0
    conn_id: int = 0
    seq: int = 1
    channel_id: int = CHAN
    payload_len: int | None = None  # None: the payload's real length
    magic: bytes = MAGIC
    version: int = VERSION
    reserved8: int = 0
    reserved32: int = 0


def forge(sess: Session | bytes, h: Header, payload: bytes = b"",
          direction: int | None = None) -> bytes:
    """A frame built and sealed here, by the documented layout: HELLO with
    the HMAC, anything else encrypted for `direction` (by default the one
    the role byte says; 1 for role bytes other than 0)."""
    if isinstance(sess, bytes):
        sess = Session(sess)
    plen = len(payload) if h.payload_len is None else h.payload_len
    head = HDR.pack(h.magic, h.version, h.type, h.role, h.reserved8, h.flags, h.conn_id,
                    h.seq, h.channel_id, plen, h.reserved32)
    if h.type == MsgType.HELLO:
        body = head + payload
        return body + hmac.new(sess.hello_key(), body, hashlib.sha256).digest()[:ENV_MAC_LEN]
    if direction is None:
        direction = H2T if h.role == 0 else T2H
    aes, iv = sess.aead(direction)
    return head + aes.encrypt(nonce(iv, h.seq), payload, head)


def unseal(frame: bytes, sess: Session, role: int) -> bytes | None:
    """The plaintext of a frame the receiver of `role` opens, None if it does
    not verify (the model of the tag check)."""
    if frame[3] == MsgType.HELLO:
        want = hmac.new(sess.hello_key(), frame[:-ENV_MAC_LEN], hashlib.sha256).digest()
        ok = hmac.compare_digest(want[:ENV_MAC_LEN], frame[-ENV_MAC_LEN:])
        return frame[HDR.size:-ENV_MAC_LEN] if ok else None
    aes, iv = sess.aead(T2H if role == 0 else H2T)
    try:
        return aes.decrypt(nonce(iv, seq_of(frame)), frame[HDR.size:], frame[:HDR.size])
    except InvalidTag:
        return None


def expected(frame: bytes, sess: Session | bytes, role: int, channel_id: int,
             recv_seq: int, bound: bool = True) -> int:
    """What xo_chan_open() must answer, in its documented order."""
    if isinstance(sess, bytes):
        sess = Session(sess)
    if len(frame) < HDR.size:
        return lib.XO_E_TRUNCATED
    (magic, version, mtype, sender, res8, _flags, _conn, seq, chan, plen,
     res32) = HDR.unpack_from(frame)
    if magic != MAGIC:
        return lib.XO_E_BAD_MAGIC
    if version != VERSION:
        return lib.XO_E_VERSION
    if plen > ENV_MAX_PAYLOAD:
        return lib.XO_E_TOO_LARGE
    size = HDR.size + plen + ENV_MAC_LEN
    if size > len(frame):
        return lib.XO_E_TRUNCATED
    if size < len(frame):
        return lib.XO_E_LENGTH
    if mtype != MsgType.HELLO and not bound:
        return lib.XO_E_AUTH
    if unseal(frame, sess, role) is None:
        return lib.XO_E_AUTH
    if sender == role:
        return lib.XO_E_CHANNEL
    if sender > 1 or res8 or res32:
        return lib.XO_E_FIELD
    if chan != channel_id:
        return lib.XO_E_CHANNEL
    if seq <= recv_seq:
        return lib.XO_E_REPLAY
    if seq != recv_seq + 1:
        return lib.XO_E_SEQUENCE
    if mtype == 0 or mtype > lib.XO_MSG_MAX:
        return lib.XO_E_MSG_TYPE
    return OK


def bound(key: bytes, role: int, n0: bytes = N0, n1: bytes = N1) -> Channel:
    """One end of the session whose HELLO nonces were n0 (host), n1 (target)."""
    ch = Channel(key, 0, role)
    ch.bind(n0, n1) if role == 0 else ch.bind(n1, n0)
    return ch


def pair(key: bytes = KEY, n0: bytes = N0, n1: bytes = N1) -> tuple[Channel, Channel]:
    """(host, target): role 0 and role 1 ends of one bound session."""
    return bound(key, 0, n0, n1), bound(key, 1, n0, n1)


def state_of(ch: Channel) -> tuple[int, int, int]:
    return ch.send_seq, ch.recv_seq, ch.channel_id


def rejected(ch: Channel, frame: bytes, code: int) -> None:
    """open() must refuse frame with exactly this code, as the right class,
    with a sentence, leaving the channel and the input as they were."""
    before = state_of(ch)
    snapshot = bytes(bytearray(frame))
    try:
        ch.open(frame)
    except XoError as err:
        assert err.code == code, f"{err}; want {name(code)} for {frame[:48].hex()}"
        assert type(err) is CLASS[code], f"{type(err).__name__} for {name(code)}"
        message_of(err)
        assert state_of(ch) == before, "a rejected frame moved the channel"
        assert frame == snapshot
        return
    raise AssertionError(f"accepted {frame[:48].hex()}...; want {name(code)}")


def check(ch: Channel, frame: bytes, key: bytes = KEY) -> int:
    """open() must do exactly what the model says. Returns the code."""
    code = expected(frame, key, ch._c.role, ch.channel_id, ch.recv_seq, ch.bound)
    if code == OK:
        msg = ch.open(frame)
        assert ch.recv_seq == msg.seq
        assert msg.payload == unseal(frame, Session(key), ch._c.role)
    else:
        rejected(ch, frame, code)
    return code


def flip(data: bytes, bits: Iterable[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(out)


def seq_of(frame: bytes) -> int:
    return int(HDR.unpack_from(frame)[7])


def deliver(receiver: Channel, frame: bytes) -> None:
    """frame is the next one receiver expects: it must open, and move
    recv_seq up by exactly one."""
    assert receiver.recv_seq == seq_of(frame) - 1
    assert receiver.open(frame).seq == seq_of(frame) == receiver.recv_seq


def still_works(sender: Channel, receiver: Channel) -> None:
    """After any number of rejections the channel carries on normally."""
    msg = receiver.open(sender.seal(MsgType.PING, 1, b"alive"))
    assert msg.payload == b"alive" and msg.seq == sender.send_seq == receiver.recv_seq


TALLY: Counter[str] = Counter()  # malformed frames refused, by sweep
QUOTA = {
    "truncation": 25_000,
    "single-flip": 50_000,
    "multi-flip": 20_000,
    "trailing": 5_000,
    "length": 12_000,
    "wrong-key": 6_000,
    "replay": 5_900,
    "authentic": 18_000,
    "header": 3_000,
}


# ---- round trips --------------------------------------------------------------------


def check_round_trip(key: bytes, nonces: tuple[bytes, bytes], sender_role: int,
                     mtype: MsgType, conn_id: int, flags: int, payload: bytes) -> None:
    sess = Session(key, *nonces)
    sender = bound(key, sender_role, *nonces)
    receiver = bound(key, 1 - sender_role, *nonces)
    channel_id = sess.channel_id
    frame = sender.seal(mtype, conn_id, payload, flags)
    seq = sender.send_seq
    assert len(frame) == HDR.size + len(payload) + ENV_MAC_LEN == lib.xo_env_size(len(payload))
    assert frame_len(frame[:ENV_HEADER_LEN]) == len(frame) == frame_len(frame)
    # The documented layout, byte for byte, ciphertext and tag included.
    assert frame == forge(sess, Header(int(mtype), sender_role, flags, conn_id, seq, channel_id),
                          payload)
    if mtype != MsgType.HELLO and len(payload) >= 16:
        assert frame[HDR.size:HDR.size + len(payload)] != payload  # encrypted
    msg = receiver.open(frame)
    assert (msg.type, msg.conn_id, msg.seq, msg.channel_id, msg.flags, msg.payload) == (
        mtype, conn_id, seq, channel_id, flags, payload)
    assert isinstance(msg.type, MsgType)
    assert receiver.recv_seq == seq and receiver.send_seq == 0


@pytest.mark.parametrize("mtype", list(MsgType), ids=[m.name for m in MsgType])
@pytest.mark.parametrize("size", [0, 1, 40, 65_539])
def test_every_message_type(mtype: MsgType, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    check_round_trip(KEY, (N0, N1), 0, mtype, 42, 0x8001, payload)
    check_round_trip(KEY, (N1, N0), 1, mtype, U64, 0xFFFF, payload)


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=lib.XO_KEY_MIN_LEN, max_size=lib.XO_KEY_MAX_LEN),
    nonces=st.tuples(st.binary(min_size=HELLO_NONCE_LEN, max_size=HELLO_NONCE_LEN),
                     st.binary(min_size=HELLO_NONCE_LEN, max_size=HELLO_NONCE_LEN)),
    sender_role=st.integers(0, 1),
    mtype=st.sampled_from(list(MsgType)),
    conn_id=st.integers(0, U64),
    flags=st.integers(0, 0xFFFF),
    payload=st.one_of(
        st.binary(max_size=100),
        st.builds(lambda n, seed: random.Random(seed).randbytes(n),
                  st.integers(0, 400_000), st.integers(0, 2**32)),
    ),
)
def test_round_trip_property(key: bytes, nonces: tuple[bytes, bytes], sender_role: int,
                             mtype: MsgType, conn_id: int, flags: int, payload: bytes) -> None:
    check_round_trip(key, nonces, sender_role, mtype, conn_id, flags, payload)


def test_sequence_numbers_go_up_by_exactly_one() -> None:
    host, target = pair()
    frames = [host.seal(MsgType.PING, i, bytes([i])) for i in range(1, 101)]
    seqs = [HDR.unpack_from(f)[7] for f in frames]
    assert seqs == list(range(1, 101)) and host.send_seq == 100
    # A lost message is noticed at the next one (an on-path attacker cannot
    # drop HOST_READY or ABORT unseen); the rejection changes nothing.
    assert target.open(frames[0]).seq == 1
    rejected(target, frames[2], lib.XO_E_SEQUENCE)
    assert target.recv_seq == 1
    for f in frames[1:]:
        assert target.open(f).seq == HDR.unpack_from(f)[7] == target.recv_seq
    # Late (duplicated or reordered) ones are replays.
    for f in frames[::2]:
        rejected(target, f, lib.XO_E_REPLAY)
    assert target.recv_seq == 100
    # Both directions count independently.
    back = target.seal(MsgType.PONG, 7)
    assert HDR.unpack_from(back)[7] == 1 and host.open(back).seq == 1
    still_works(host, target)


def test_frame_len_limits() -> None:
    head = forge(KEY, Header(1, 0, payload_len=ENV_MAX_PAYLOAD))[:ENV_HEADER_LEN]
    assert frame_len(head) == ENV_MAX_PAYLOAD + ENV_HEADER_LEN + ENV_MAC_LEN
    _host, target = pair()
    rejected(target, head, lib.XO_E_TRUNCATED)  # legal size, not all here
    for plen in (ENV_MAX_PAYLOAD + 1, 2**31, 2**32 - 1):
        head = forge(KEY, Header(1, 0, payload_len=plen))[:ENV_HEADER_LEN]
        with pytest.raises(XoDecodeError) as err:
            frame_len(head)
        assert err.value.code == lib.XO_E_TOO_LARGE
        message_of(err.value)
        rejected(target, head, lib.XO_E_TOO_LARGE)
        rejected(target, head + bytes(100), lib.XO_E_TOO_LARGE)
    for cut in range(ENV_HEADER_LEN):
        with pytest.raises(XoDecodeError) as err:
            frame_len(head[:cut])
        assert err.value.code == lib.XO_E_TRUNCATED


def test_seal_refusals_consume_no_sequence_number() -> None:
    host, target = pair()
    for mtype in [0, *range(lib.XO_MSG_MAX + 1, 256)]:
        with pytest.raises(XoRejectedError) as err:
            host.seal(mtype, 1, b"x")
        assert err.value.code == lib.XO_E_MSG_TYPE
        message_of(err.value)
    out = ffi.new("uint8_t[]", 200)
    # Over the payload limit: refused before the payload is read.
    assert lib.xo_chan_seal(host._c, 1, 0, 0, out, ENV_MAX_PAYLOAD + 1, out, 200) == \
        lib.XO_E_TOO_LARGE
    assert ffi.string(lib.xo_last_error())
    # Too little room.
    assert lib.xo_chan_seal(host._c, 1, 0, 0, b"abc", 3, out,
                            lib.xo_env_size(3) - 1) == lib.XO_E_NOSPACE
    assert host.send_seq == 0
    still_works(host, target)
    assert host.send_seq == 1


def test_channel_init_refuses_bad_keys_and_roles() -> None:
    for n in [*range(lib.XO_KEY_MIN_LEN), *range(lib.XO_KEY_MAX_LEN + 1, 200)]:
        with pytest.raises(XoError) as err:
            Channel(bytes(range(n)), 1, 0)
        assert type(err.value) is XoError and err.value.code == lib.XO_E_INVAL
        assert "key of" in message_of(err.value)
    for role in range(2, 256):
        with pytest.raises(XoError) as err:
            Channel(KEY, 1, role)
        assert err.value.code == lib.XO_E_INVAL
        message_of(err.value)
    for n in (lib.XO_KEY_MIN_LEN, lib.XO_KEY_MAX_LEN):
        a, b = pair(b"k" * n)
        still_works(a, b)


def test_reflection_and_other_sessions() -> None:
    """A frame meets the key of its direction only: reflected to its sender,
    or to another host end of the same session, it does not decrypt; another
    session (other nonces) has other keys. HELLO is authenticated without
    session keys: reflection and the channel are checked on it."""
    host, target = pair()
    other_host = bound(KEY, 0)
    elsewhere = bound(KEY, 1, N0, N1[::-1])
    for i in range(200):
        frame = host.seal(MsgType(i % (lib.XO_MSG_MAX - 1) + 2), i, b"p" * (i % 7))
        rejected(other_host, frame, lib.XO_E_AUTH)  # role 0 to role 0
        rejected(host, frame, lib.XO_E_AUTH)  # back to its sender
        rejected(elsewhere, frame, lib.XO_E_AUTH)
        assert target.open(frame).seq == i + 1
    hello = host.seal(MsgType.HELLO, 0, N0)
    rejected(other_host, hello, lib.XO_E_CHANNEL)  # reflected HELLO
    elsewhere._c.recv_seq = seq_of(hello) - 1
    rejected(elsewhere, hello, lib.XO_E_CHANNEL)  # another session's channel id
    assert target.open(hello).type == MsgType.HELLO  # (the machine calls it a violation)
    assert other_host.recv_seq == host.recv_seq == 0


def test_unbound_channels_carry_only_hello() -> None:
    host, target = Channel(KEY, 0, 0), Channel(KEY, 0, 1)
    for mtype in list(MsgType)[1:]:
        with pytest.raises(XoError) as err:
            host.seal(mtype, 1, b"x")
        assert err.value.code == lib.XO_E_STATE and "HELLO" in message_of(err.value)
    assert host.send_seq == 0
    # A frame of a bound session (or anything but HELLO) cannot be verified yet.
    b_host, _ = pair()
    rejected(target, b_host.seal(MsgType.PING, 0, b"x"), lib.XO_E_AUTH)
    hello = host.seal(MsgType.HELLO, 0, N0)
    assert target.open(hello).payload == N0  # the nonce is public
    host.bind(N0, N1)
    target.bind(N1, N0)
    with pytest.raises(XoError) as err:
        host.bind(N0, N1)
    assert err.value.code == lib.XO_E_STATE
    still_works(host, target)
    still_works(target, host)


def test_keys_differ_by_direction_and_session() -> None:
    """Same plaintext, same sequence number: four different ciphertexts for
    the two directions of two sessions (no key or nonce is shared)."""
    seen = set()
    for n1 in (N1, N1[::-1]):
        host, target = pair(KEY, N0, n1)
        for ch in (host, target):
            frame = ch.seal(MsgType.PING, 0, bytes(64))
            assert seq_of(frame) == 1 and bytes(64) not in frame
            seen.add(frame[HDR.size:])
    assert len(seen) == 4


def test_bound_sessions_do_not_accept_each_others_frames() -> None:
    host, target = Channel(KEY, 0, 0), Channel(KEY, 0, 1)
    old = host.seal(MsgType.HELLO, 0, N0)
    host.bind(N0, N1)
    target.bind(N1, N0)
    assert host.channel_id == target.channel_id == CHAN != 0
    # seq 1 is the one target expects: only the channel is wrong.
    assert target.recv_seq == seq_of(old) - 1
    rejected(target, old, lib.XO_E_CHANNEL)
    later = bound(KEY, 1, N0, bytes(HELLO_NONCE_LEN))
    ping = host.seal(MsgType.PING)
    later._c.recv_seq = seq_of(ping) - 1  # only the session is wrong
    rejected(later, ping, lib.XO_E_AUTH)
    assert later.recv_seq == 1
    # In its own session the same frame opens, once target has seq 1 (the
    # HELLO, which it took while both ends were still unbound).
    target._c.recv_seq = seq_of(old)
    deliver(target, ping)
    still_works(host, target)


# ---- malformed frames -----------------------------------------------------------------


def frames(seed: int, n: int, max_payload: int) -> tuple[Channel, Channel, list[bytes]]:
    """n frames sealed by host, seq 1..n. Sequence numbers go up by exactly
    one, so the sweeps below mangle each sample while it is the very frame
    target expects next (only the mangling can make it refuse), then
    deliver() it and go on to the next."""
    rng = random.Random(seed)
    host, target = pair()
    out = [host.seal(rng.choice(list(MsgType)), rng.getrandbits(64),
                     rng.randbytes(rng.randint(0, max_payload)), rng.getrandbits(16))
           for _ in range(n)]
    return host, target, out


def test_truncation_at_every_length() -> None:
    host, target, samples = frames(1, 30, 40)
    for size in (1000, 5000, 17_000):
        samples.append(host.seal(MsgType.BEGIN_OFFLOAD, 3, random.Random(size).randbytes(size)))
    for frame in samples:
        for cut in range(len(frame)):
            rejected(target, frame[:cut], lib.XO_E_TRUNCATED)
            TALLY["truncation"] += 1
        deliver(target, frame)
    assert target.recv_seq == host.send_seq == len(samples)
    still_works(host, target)
    assert TALLY["truncation"] >= QUOTA["truncation"]


def test_single_bit_flips() -> None:
    """Every bit of every sample: structure errors where the flip hits the
    magic, version or length, XO_E_AUTH everywhere else (MAC included)."""
    host, target, samples = frames(2, 70, 64)
    for n, frame in enumerate(samples):
        for bit in range(len(frame) * 8):
            data = flip(frame, [bit])
            code = check(target, data)
            assert code in STRUCTURAL | {lib.XO_E_AUTH}
            pos = bit >> 3
            if pos in (0, 1):
                assert code == lib.XO_E_BAD_MAGIC
            elif pos == 2:
                assert code == lib.XO_E_VERSION
            elif not 32 <= pos < 36:
                assert code == lib.XO_E_AUTH
            TALLY["single-flip"] += 1
        assert target.recv_seq == n
        deliver(target, frame)
    assert target.recv_seq == host.send_seq == len(samples)
    still_works(host, target)
    assert TALLY["single-flip"] >= QUOTA["single-flip"]


def test_multiple_bit_flips() -> None:
    rng = random.Random(3)
    host, target, samples = frames(3, 80, 300)
    per = 20_000 // len(samples)
    for i in range(per * len(samples)):
        n = i // per
        frame = samples[n]
        bits = len(frame) * 8
        span = min(bits, HDR.size * 8) if i % 3 == 0 else bits  # often the header only
        code = check(target, flip(frame, rng.sample(range(span), rng.randint(2, 12))))
        assert code in STRUCTURAL | {lib.XO_E_AUTH}
        TALLY["multi-flip"] += 1
        assert target.recv_seq == n
        if i % per == per - 1:
            deliver(target, frame)
    assert target.recv_seq == host.send_seq == len(samples)
    still_works(host, target)
    assert TALLY["multi-flip"] >= QUOTA["multi-flip"]


def test_trailing_bytes() -> None:
    rng = random.Random(4)
    host, target, samples = frames(4, 50, 100)
    # Two frames back to back are not one frame (even the next two).
    rejected(target, samples[0] + samples[1], lib.XO_E_LENGTH)
    per = 5000 // len(samples)
    for i in range(per * len(samples)):
        frame = samples[i // per]
        rejected(target, frame + rng.randbytes(rng.randint(1, 100)), lib.XO_E_LENGTH)
        TALLY["trailing"] += 1
        if i % per == per - 1:
            deliver(target, frame)
    assert target.recv_seq == host.send_seq == len(samples)
    still_works(host, target)
    assert TALLY["trailing"] >= QUOTA["trailing"]


def test_bogus_payload_lengths() -> None:
    """Announcements over the limit are too large whatever follows; others
    disagree with the bytes present (and a forger cannot fix the MAC)."""
    rng = random.Random(5)
    host, target, samples = frames(5, 50, 200)
    per = 6000 // len(samples)
    for i in range(per * len(samples)):
        frame = samples[i // per]
        real = len(frame) - HDR.size - ENV_MAC_LEN
        plen = rng.choice([ENV_MAX_PAYLOAD + 1, 2**32 - 1, rng.randint(ENV_MAX_PAYLOAD + 1,
                                                                     2**32 - 1),
                           rng.randint(0, ENV_MAX_PAYLOAD), real + 1, max(real - 1, 0), 0])
        if plen == real:
            plen += 1
        data = frame[:32] + struct.pack(">I", plen) + frame[36:]
        code = check(target, data)
        assert code == (lib.XO_E_TOO_LARGE if plen > ENV_MAX_PAYLOAD else
                        lib.XO_E_TRUNCATED if plen > real else lib.XO_E_LENGTH)
        if plen > ENV_MAX_PAYLOAD:
            with pytest.raises(XoDecodeError):
                frame_len(data[:ENV_HEADER_LEN])
        else:
            assert frame_len(data[:ENV_HEADER_LEN]) == plen + HDR.size + ENV_MAC_LEN
        TALLY["length"] += 1
        # The same lie with a MAC that matches it: still the length that is
        # wrong, checked before the MAC.
        h = HDR.unpack_from(frame)
        forged = forge(KEY, Header(h[2], h[3], h[5], h[6], h[7], h[8], payload_len=plen),
                       frame[HDR.size:-ENV_MAC_LEN])
        assert check(target, forged) == code
        TALLY["length"] += 1
        if i % per == per - 1:
            deliver(target, frame)
    assert target.recv_seq == host.send_seq == len(samples)
    still_works(host, target)
    assert TALLY["length"] >= QUOTA["length"]


def test_wrong_keys() -> None:
    rng = random.Random(6)
    host, target, samples = frames(6, 30, 100)
    for i in range(3000):
        key = rng.randbytes(rng.randint(lib.XO_KEY_MIN_LEN, lib.XO_KEY_MAX_LEN))
        assert key != KEY
        stranger = bound(key, 1)
        frame = samples[i % len(samples)]
        stranger._c.recv_seq = seq_of(frame) - 1  # next in line: only the key is wrong
        rejected(stranger, frame, lib.XO_E_AUTH)
        # ... and what a stranger seals (seq 1, next here) does not open here.
        mallory = bound(key, 0)
        forged = mallory.seal(MsgType.BEGIN_OFFLOAD, i, b"state")
        assert seq_of(forged) == target.recv_seq + 1
        rejected(target, forged, lib.XO_E_AUTH)
        TALLY["wrong-key"] += 2
    # Under the right key the samples do open, in order.
    assert target.recv_seq == 0
    for frame in samples:
        deliver(target, frame)
    still_works(host, target)
    assert TALLY["wrong-key"] >= QUOTA["wrong-key"]


def test_replays() -> None:
    rng = random.Random(7)
    host, target = pair()
    seen: list[bytes] = []
    for _ in range(1000):
        frame = host.seal(rng.choice(list(MsgType)), rng.getrandbits(64), rng.randbytes(20))
        target.open(frame)
        seen.append(frame)
        for old in [frame, *rng.sample(seen, min(len(seen), 5))]:
            rejected(target, old, lib.XO_E_REPLAY)
            TALLY["replay"] += 1
    assert target.recv_seq == 1000
    # A fresh channel (a restarted peer) does not reset the other side.
    restarted = bound(KEY, 0)
    rejected(target, restarted.seal(MsgType.PING), lib.XO_E_REPLAY)
    assert TALLY["replay"] >= QUOTA["replay"]


def test_authentic_frames_with_bad_headers() -> None:
    """Frames MACed with the right key but wrong in one or more header
    fields: each refused with the code of the first failing check."""
    rng = random.Random(8)
    host, target = pair()
    target._c.recv_seq = host._c.recv_seq = 1000  # 1001 is next; 1002 and on are gaps
    codes: Counter[int] = Counter()
    mirror: Counter[int] = Counter()
    for i in range(20_000):
        h = Header(
            type=rng.choice([rng.randint(1, lib.XO_MSG_MAX)] * 3 + [0, rng.randint(11, 255)]),
            role=rng.choice([0, 0, 0, 1, rng.randint(2, 255)]),
            flags=rng.getrandbits(16), conn_id=rng.getrandbits(64),
            seq=rng.choice([1001] * 3 + [rng.choice([1002, rng.randint(1002, U64), U64]),
                                         0, 1000, rng.randint(0, 1000)]),
            channel_id=rng.choice([CHAN] * 3 + [rng.getrandbits(64), CHAN ^ 1]),
            reserved8=rng.choice([0] * 8 + [rng.randint(1, 255)]),
            reserved32=rng.choice([0] * 8 + [rng.randint(1, 2**32 - 1)]),
        )
        frame = forge(KEY, h, rng.randbytes(rng.randint(0, 32)), direction=H2T)
        code = check(target, frame)
        codes[code] += 1
        if code == OK:
            target._c.recv_seq = 1000  # keep the replay threshold fixed
        else:
            TALLY["authentic"] += 1
        if i % 100 == 0:
            # Mirror image: the host (role 0) receives from role 1.
            code = check(host, forge(KEY, replace(h, role=1), b"x", direction=T2H))
            mirror[code] += 1
            host._c.recv_seq = 1000
    assert codes[OK] > 1000
    # Every check after the MAC refused some of them, sequence gaps included.
    after_mac = {OK, lib.XO_E_CHANNEL, lib.XO_E_FIELD, lib.XO_E_REPLAY, lib.XO_E_SEQUENCE,
                 lib.XO_E_MSG_TYPE}
    assert set(codes) == after_mac and all(codes[c] > 100 for c in after_mac), codes
    assert {OK, lib.XO_E_REPLAY, lib.XO_E_SEQUENCE} <= set(mirror), mirror
    assert TALLY["authentic"] >= QUOTA["authentic"]


def test_versions_and_magic() -> None:
    """Newer (and older) versions are refused as such even with a valid MAC."""
    rng = random.Random(9)
    host, target = pair()
    for version in range(256):
        if version == VERSION:
            continue
        for _ in range(8):
            frame = forge(KEY, Header(rng.randint(1, 10), 0, seq=rng.randint(1, 99),
                                      version=version), rng.randbytes(rng.randint(0, 50)))
            rejected(target, frame, lib.XO_E_VERSION)
            with pytest.raises(XoDecodeError):
                frame_len(frame[:ENV_HEADER_LEN])
            TALLY["header"] += 1
    for _ in range(1000):
        magic = rng.randbytes(2)
        if magic == MAGIC:
            continue
        rejected(target, forge(KEY, Header(1, 0, magic=magic)), lib.XO_E_BAD_MAGIC)
        TALLY["header"] += 1
    still_works(host, target)
    assert TALLY["header"] >= QUOTA["header"]


def test_malformed_total_is_asserted() -> None:
    """The sweeps above each assert their count against QUOTA; together they
    generate well over 100,000 refused frames."""
    assert sum(QUOTA.values()) >= 100_000


# ---- libFuzzer harness (tests/fuzz/fuzz_envelope_open.c) ------------------------------


def test_libfuzzer_envelope_open(tmp_path: Path) -> None:
    exe = build_fuzzer("fuzz_envelope_open.c", ["envelope.c", "secret.c", "error.c"],
                       ["-lcrypto"], tmp_path)
    rng = random.Random(10)
    fkey = bytes(range(32))
    chan = Session(fkey).channel_id
    host, _target = pair(key=fkey)
    seeds = [bytes([0]) + host.seal(MsgType.PING, 1, b"seed")]
    for mode in range(3):
        for _ in range(10):
            seeds.append(bytes([mode]) + rng.randbytes(rng.randint(0, 120)))
    seeds.append(bytes([1]) + forge(fkey, Header(2, 0, seq=9, channel_id=chan),
                                    b"payload")[:-ENV_MAC_LEN])
    # Forged mode, aligned (mode byte, then the receiver's role byte): the
    # harness's channel has recv_seq 100 (RECV_SEQ), so only seq 101 gets
    # past the sequence checks; start the fuzzer from both sides of it.
    for seq, want in ((100, lib.XO_E_REPLAY), (101, OK), (102, lib.XO_E_SEQUENCE)):
        frame = forge(fkey, Header(2, 0, seq=seq, channel_id=chan), b"payload")
        assert expected(frame, fkey, 1, chan, 100) == want
        seeds.append(bytes([1, 1]) + frame[:-ENV_MAC_LEN])
    stats = run_fuzzer(exe, seeds, tmp_path)
    runs = [ln for ln in stats.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 10_000
