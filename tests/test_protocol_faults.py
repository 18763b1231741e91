"""The protocol machine under a hostile or broken control path.

A relay the test controls sits between the host and target t0 (see
control_relay.py) and delays, drops, duplicates or reorders whole control
messages; targets are stopped with SIGSTOP; fake peers that hold the key
refuse everything, claim the host role, or hand back a state naming another
client. Each case must end with exactly one owner of the client's connection
or a clean reset the client sees at once - never two live sockets, never a
hang - and nothing left in any steering map or socket table.

The cases run on both drivers of the machine (the Python engine and the C
poll() driver), with short protocol deadlines so each takes a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from control_relay import TO_HOST, TO_TARGET, ControlRelay, Rule
from handoff_faults_tools import (
    IO_TIMEOUT,
    CurlResult,
    LogWatch,
    captured_state,
    client_connect,
    curl,
    file_digest,
    frames_until_closed,
    map_entries,
    read_frame,
    read_response,
)
from handoff_tools import lab_name, rst_counters, sockets_with_peer, tcp_sockets
from netns_tools import sha256, wait_for
from xo import core, http1
from xo import lab as xolab
from xo.core import Channel, Endpoint, MsgType, decode_abort, encode_abort, encode_ready
from xo.demo import RefAppCluster, make_docroot
from xo.engine import DEFAULT_CONTROL_PORT, write_key
from xo.lab import in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

# Short deadlines: the host waits 0.5 s for TARGET_READY, a target 1 s for
# the host's word, pings go every 0.3 s and 3 s of silence is death.
FAST = {"ready": 0.5, "confirm": 1.0, "ping_interval": 0.3, "peer": 3.0}
DRIVERS = ["py", "c"]


@contextlib.contextmanager
def relayed(prefix: str, driver: str, targets: int = 1,
            timeouts: dict[str, float] | None = None, target_driver: str | None = None,
            bytes_follow_min: int = 0) -> Iterator[tuple[RefAppCluster, ControlRelay]]:
    """A lab whose host reaches t0's control port through a ControlRelay;
    target_driver: the targets' driver where it is not the host's."""
    with tempfile.TemporaryDirectory(prefix="xo-faults-") as tmp, \
            xolab.lab(lab_name(prefix), targets=targets) as testbed:
        relay = ControlRelay(testbed, "t0")
        drivers = {"*": driver} if target_driver is None else {"host": driver,
                                                                 "*": target_driver}
        apps = RefAppCluster(testbed, Path(tmp), drivers=drivers,
                             timeouts={**FAST, **(timeouts or {})},
                             control_via={"t0": relay.address},
                             bytes_follow_min=bytes_follow_min)
        try:
            make_docroot(apps.docroot)
            apps.start()
            yield apps, relay
        finally:
            apps.stop()
            relay.close()


def assert_nothing_left(apps: RefAppCluster, member: str = "t0") -> None:
    """No steering entry and no socket towards the client on member."""
    client_ip = apps.testbed.client.ipv4
    wait_for(lambda: map_entries(apps, member) == [], f"{member}'s steering map to empty")
    wait_for(lambda: not sockets_with_peer(apps.testbed, member, client_ip),
             f"{member}'s sockets towards the client to go")


def get(sock: socket.socket, name: str) -> tuple[dict[str, str], bytes]:
    sock.sendall(f"GET /{name} HTTP/1.1\r\nHost: xo\r\n\r\n".encode())
    return read_response(sock)


# ---- the relay's cases ------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_late_end_offload_leaves_one_owner(driver: str) -> None:
    """END_OFFLOAD held past the target's deadline. The host already owns the
    returned connection; the target must not resume its frozen copy (two
    live sockets on one client connection) but give up the control
    connection, which settles it: its copy is discarded, the client's
    keep-alive connection keeps working from the host, byte-exact."""
    with relayed("le", driver) as (apps, relay):
        relay.add(Rule(TO_TARGET, MsgType.END_OFFLOAD, "delay", seconds=2.0))
        rst_before = rst_counters(apps.testbed)
        watch = LogWatch(apps.log_path("t0"))
        with client_connect(apps) as sock:
            sock.settimeout(15)
            headers, body = get(sock, "medium.bin")
            assert headers["x-served-by"] == "t0"
            assert sha256(body) == file_digest(apps, "medium.bin")
            wait_for(lambda: relay.count(TO_TARGET, MsgType.END_OFFLOAD, "delay") == 1,
                     "the hand-back's END_OFFLOAD to be held")
            watch.wait_line("host did not answer in time")
            # The target's copy is gone, not resumed.
            assert_nothing_left(apps)
            for name in ("small.bin", "large.bin", "medium.bin"):
                headers, body = get(sock, name)
                assert sha256(body) == file_digest(apps, name), name
        assert rst_counters(apps.testbed) == rst_before
        assert apps.host_stats()["returns"] >= 1


@pytest.mark.parametrize("action", ["delay", "drop"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_late_or_lost_host_ready_resets_the_client(driver: str, action: str) -> None:
    """HOST_READY held past the target's deadline, or dropped (the next
    message then shows a sequence gap). The host has let go of the socket
    already, so the target's copy must not be silently dropped while the
    host keeps a redirect to nothing: the control connection closes, the
    host withdraws the redirect and probes the client, which sees a reset
    at once instead of waiting forever."""
    with relayed("hr", driver) as (apps, relay):
        relay.add(Rule(TO_TARGET, MsgType.HOST_READY, action, seconds=2.0))
        watch = LogWatch(apps.log_path("t0"))
        with client_connect(apps) as sock:
            sock.settimeout(15)  # a hang would fail here with a timeout
            with pytest.raises(ConnectionResetError):
                get(sock, "small.bin")
        watch.wait_line("host did not answer in time" if action == "delay"
                        else "a message is missing")
        assert relay.count(TO_TARGET, MsgType.HOST_READY, action) == 1
        assert_nothing_left(apps)
        wait_for(lambda: map_entries(apps, "host") == [], "the host's steering map to empty")
        assert apps.host_stats()["withdrawn"] == 1
        # The host reconnects and hands off again.
        wait_for(lambda: curl(apps, "/small.bin").served_by == "t0", "handoffs to t0 again")


@pytest.mark.parametrize("driver", DRIVERS)
def test_duplicated_begin_offload_is_a_replay(driver: str) -> None:
    """A duplicated BEGIN_OFFLOAD: the copy is a replay; the target closes the
    control connection and drops what it restored. The client gets its
    response or a prompt reset, and nothing is left anywhere."""
    with relayed("dp", driver) as (apps, relay):
        relay.add(Rule(TO_TARGET, MsgType.BEGIN_OFFLOAD, "dup"))
        watch = LogWatch(apps.log_path("t0"))
        with client_connect(apps) as sock:
            sock.settimeout(15)
            try:
                headers, body = get(sock, "small.bin")
                assert sha256(body) == file_digest(apps, "small.bin")
            except ConnectionResetError:
                pass
        watch.wait_line("already seen")
        assert_nothing_left(apps)


@pytest.mark.parametrize("driver", DRIVERS)
def test_reordered_target_ready_rolls_back(driver: str) -> None:
    """TARGET_READY swapped with the target's next message: the host sees a
    sequence gap first, closes the control connection and, not having
    committed, serves the request itself; the target drops its copy."""
    with relayed("ro", driver) as (apps, relay):
        relay.add(Rule(TO_HOST, MsgType.TARGET_READY, "swap"))
        watch = LogWatch(apps.log_path("host"))
        with client_connect(apps) as sock:
            sock.settimeout(15)
            headers, body = get(sock, "medium.bin")
            assert headers["x-served-by"] == "host"
            assert sha256(body) == file_digest(apps, "medium.bin")
        watch.wait_line("a message is missing")
        assert_nothing_left(apps)
        assert apps.host_stats()["rollbacks"] >= 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_stopped_target_rolls_back_then_is_left_out(driver: str) -> None:
    """t0 SIGSTOPped: the host waits for TARGET_READY until its deadline,
    rolls back and serves locally; after three such failures in a row it
    stops picking t0. After SIGCONT t0 drops whatever it restored and
    handoffs to it resume."""
    with relayed("st", driver, timeouts={"peer": 10.0}) as (apps, relay):
        proc = apps.procs["t0"]
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                res = curl(apps, "/small.bin")
                assert res.rc == 0 and res.served_by == "host", res
                assert sha256(res.body) == file_digest(apps, "small.bin")
            begins = relay.count(TO_TARGET, MsgType.BEGIN_OFFLOAD)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert begins == 3, "a target that failed three times in a row is left out"
        assert apps.host_stats()["rollbacks"] == 3
        assert_nothing_left(apps)
        wait_for(lambda: curl(apps, "/small.bin").served_by == "t0", "handoffs to t0 again")


@pytest.mark.parametrize("driver", DRIVERS)
def test_least_loaded_counts_handoffs_in_flight(driver: str) -> None:
    """t0 SIGSTOPped (it never answers): a request handed to it waits for
    TARGET_READY; a second request meanwhile goes to t1, because the host
    counts its own handoffs still in flight as load (both targets are
    otherwise equal, and ties go to t0). The first rolls back and the host
    serves it."""
    with relayed("lf", driver, targets=2, timeouts={"peer": 10.0}) as (apps, relay):
        proc = apps.procs["t0"]
        os.kill(proc.pid, signal.SIGSTOP)
        results: dict[str, CurlResult] = {}
        try:
            first = threading.Thread(
                target=lambda: results.__setitem__("first", curl(apps, "/small.bin")))
            first.start()
            wait_for(lambda: relay.count(TO_TARGET, MsgType.BEGIN_OFFLOAD) == 1,
                     "the first handoff on its way to t0")
            results["second"] = curl(apps, "/small.bin")
            first.join(IO_TIMEOUT)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert not first.is_alive()
        assert results["second"].served_by == "t1", results
        assert results["first"].served_by == "host", results
        for res in results.values():
            assert res.rc == 0 and sha256(res.body) == file_digest(apps, "small.bin"), res
        assert relay.count(TO_TARGET, MsgType.BEGIN_OFFLOAD) == 1
        assert apps.host_stats()["rollbacks"] == 1


# ---- fake peers that hold the key ----------------------------------------------------


@dataclass
class FakeTarget:
    """A keyed control endpoint on a target's address, run by the test: it
    answers the host's BEGIN_OFFLOADs as told (refuse, or claim to be ready
    without restoring anything) and can send its own messages."""

    testbed: xolab.Lab
    member: str
    key: bytes
    mode: str  # "refuse" or "ready"
    begins: list[int] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        with in_netns(self.testbed.member(self.member).netns):
            self.listener = socket.create_server(
                (self.testbed.member(self.member).ipv4, DEFAULT_CONTROL_PORT))
        self.conn: socket.socket | None = None
        self.channel: Channel | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        self.conn = sock
        channel = Channel(self.key, 0, 1)
        nonce = secrets.token_bytes(core.HELLO_NONCE_LEN)
        with self.lock:
            sock.sendall(channel.seal(MsgType.HELLO, 0, nonce))
        frame = read_frame(sock)
        if frame is None:
            return
        channel.bind(nonce, channel.open(frame).payload)
        self.channel = channel
        while (frame := read_frame(sock)) is not None:
            msg = channel.open(frame)
            with self.lock:
                if msg.type == MsgType.PING:
                    sock.sendall(channel.seal(MsgType.PONG, 0, msg.payload))
                elif msg.type == MsgType.BEGIN_OFFLOAD:
                    self.begins.append(msg.conn_id)
                    if self.mode == "refuse":
                        sock.sendall(channel.seal(MsgType.ABORT, msg.conn_id,
                                                  encode_abort(core.ABORT_REFUSED, "no")))
                    else:
                        state = core.TcpState.decode(msg.payload)
                        here = Endpoint(self.testbed.member(self.member).ipv4,
                                        state.local.port)
                        sock.sendall(channel.seal(MsgType.TARGET_READY, msg.conn_id,
                                                  encode_ready(here)))
                elif msg.type == MsgType.ABORT:
                    self.aborts.append(decode_abort(msg.payload)[1])

    def send(self, mtype: MsgType, conn_id: int, payload: bytes = b"") -> None:
        assert self.conn is not None and self.channel is not None
        with self.lock:
            self.conn.sendall(self.channel.seal(mtype, conn_id, payload))

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def with_fake_t0(prefix: str, driver: str, mode: str,
                 targets: int) -> Iterator[tuple[RefAppCluster, FakeTarget]]:
    """A lab where t0 is a FakeTarget and the other targets and the host are
    the real thing."""
    with tempfile.TemporaryDirectory(prefix="xo-faults-") as tmp, \
            xolab.lab(lab_name(prefix), targets=targets) as testbed:
        apps = RefAppCluster(testbed, Path(tmp), drivers={"*": driver}, timeouts=FAST)
        fake = None
        try:
            make_docroot(apps.docroot)
            apps.workdir.mkdir(parents=True, exist_ok=True)
            key = write_key(apps.key_path)
            for target in testbed.targets[1:]:
                apps.start_member(target.name)
            fake = FakeTarget(testbed, "t0", key, mode)
            apps.start_member("host")
            yield apps, fake
        finally:
            apps.stop()
            if fake is not None:
                fake.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_target_that_refuses_everything_is_left_out(driver: str) -> None:
    """A keyed t0 that answers every BEGIN_OFFLOAD with ABORT: the host serves
    those requests itself, and after three refusals in a row picks t1."""
    with with_fake_t0("rf", driver, "refuse", targets=2) as (apps, fake):
        served = []
        for _ in range(8):
            res = curl(apps, "/small.bin")
            assert res.rc == 0 and sha256(res.body) == file_digest(apps, "small.bin"), res
            served.append(res.served_by)
        assert served[:3] == ["host"] * 3, served
        assert len(fake.begins) <= 4, "a refusing target keeps being picked"
        assert served.count("t1") >= 4, served


@pytest.mark.parametrize("driver", DRIVERS)
def test_key_holder_cannot_play_host_to_a_target(driver: str) -> None:
    """A process that holds the cluster key, on a machine that is not a
    host (the client's), connects to t0's control port as a host would:
    t0 closes the connection before any HELLO and binds nothing."""
    with relayed("kh", driver) as (apps, _relay):
        watch = LogWatch(apps.log_path("t0"))
        with in_netns(apps.testbed.client.netns):
            sock = socket.create_connection((apps.testbed.member("t0").ipv4,
                                             DEFAULT_CONTROL_PORT), timeout=IO_TIMEOUT)
        with sock:
            sock.sendall(Channel(apps.key_path.read_bytes(), 0, 0).seal(
                MsgType.HELLO, 0, os.urandom(core.HELLO_NONCE_LEN)))
            assert frames_until_closed(sock) == []
        watch.wait_line("not one of our hosts")
        assert map_entries(apps, "t0") == []
        res = curl(apps, "/small.bin")
        assert res.served_by == "t0" and sha256(res.body) == file_digest(apps, "small.bin")


@pytest.mark.parametrize("driver", DRIVERS)
def test_target_done_naming_another_client_is_refused(driver: str) -> None:
    """A keyed t0 takes a connection (TARGET_READY) and hands back a state
    that names another client: the host refuses it (ABORT), restores
    nothing, and once t0 goes away resets the client it handed off."""
    with with_fake_t0("td", driver, "ready", targets=1) as (apps, fake):
        with client_connect(apps) as sock:
            sock.settimeout(15)
            sock.sendall(b"GET /small.bin HTTP/1.1\r\nHost: xo\r\n\r\n")
            wait_for(lambda: len(fake.begins) == 1, "the handoff to the fake t0")
            wait_for(lambda: apps.host_stats()["offloads"] == 1, "the host to commit")
            other = captured_state(apps)  # a real state of another client connection
            assert other.remote.port != sock.getsockname()[1]
            fake.send(MsgType.TARGET_DONE, fake.begins[0], other.encode())
            wait_for(lambda: len(fake.aborts) == 1, "the host's refusal")
            assert "not our flow" in fake.aborts[0], fake.aborts
            stats = apps.host_stats()
            assert stats["returns"] == 0 and stats["offloads"] == 1, stats
            # Nothing was restored on the forged state's endpoint.
            assert not [s for s in tcp_sockets(apps.testbed, "host")
                        if s.local.endswith(f":{other.local.port}") and s.state == "ESTAB"]
            fake.close()  # t0 goes away: the host resets its client
            with pytest.raises(ConnectionResetError):
                read_response(sock)
        wait_for(lambda: map_entries(apps, "host") == [], "the host's steering map to empty")


# ---- unread bytes after the state ------------------------------------------------


# Below what a streaming 4 MiB PUT leaves queued at either transfer here, so
# both go with their bytes after the state.
UNREAD_MIN = 64 << 10


def put_request(name: str, body: bytes) -> bytes:
    head = f"PUT /{name} HTTP/1.1\r\nHost: xo\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def two_pipelined_puts(sock: socket.socket, body_a: bytes,
                       body_b: bytes) -> list[http1.Response | BaseException]:
    """PUT a and PUT b sent back to back while the answers are read: the host
    hands PUT a off with megabytes of it queued, and the target hands the
    connection back with PUT b queued. An answer that cannot be read is its
    exception."""
    sender = threading.Thread(target=sock.sendall,
                              args=(put_request("a", body_a) + put_request("b", body_b),),
                              daemon=True)
    sender.start()
    rest = bytearray()
    out: list[http1.Response | BaseException] = []
    try:
        for _ in range(2):
            out.append(http1.recv_response(sock, rest, method="PUT"))
    except OSError as exc:
        out.append(exc)
    sender.join(timeout=IO_TIMEOUT)
    return out


# The C driver's target serves GET and HEAD only; it takes part as the host.
@pytest.mark.parametrize("driver", DRIVERS)
def test_unread_bytes_follow_the_state(driver: str) -> None:
    """A state goes without the megabytes of a streaming body the old owner
    has queued: BEGIN_OFFLOAD (and TARGET_DONE) are flagged, the bytes come in
    a BYTES message after the sender's PARKED, and the new owner, live since
    the state was in, gives them to its application first. Both PUT bodies
    arrive exact (their digests in the answers), in both directions."""
    body_a, body_b = os.urandom(4 << 20), os.urandom(4 << 20)
    with relayed("bf", driver, target_driver="py", bytes_follow_min=UNREAD_MIN) as (apps, relay):
        with client_connect(apps) as sock:
            sock.settimeout(30)
            answers = two_pipelined_puts(sock, body_a, body_b)
        for answer, body in zip(answers, (body_a, body_b), strict=True):
            assert isinstance(answer, http1.Response), answer
            assert answer.status == 201
            assert answer.headers["x-body-sha256"] == sha256(body)
            assert answer.headers["x-served-by"] == "t0"
        stats = apps.host_stats(settled=True)
        to_target = [s.mtype for s in relay.seen if s.direction == TO_TARGET
                     and s.mtype in (MsgType.HOST_READY, MsgType.PARKED, MsgType.BYTES)]
    # Outbound: the bytes after the host's HOST_READY and PARKED.
    assert MsgType.BYTES in to_target, to_target
    first = to_target.index(MsgType.BYTES)
    assert to_target[:first][-2:] == [MsgType.HOST_READY, MsgType.PARKED], to_target
    # Inbound: the target handed back with PUT b queued; its bytes came too.
    assert relay.count(TO_HOST, MsgType.BYTES) >= 1
    assert stats["returns"] >= 1 and stats["bytes_followed"] >= 1, stats
    assert stats["bytes_missed"] == 0 and stats["rollbacks"] == 0, stats


@pytest.mark.parametrize(("direction", "action"), [(TO_TARGET, "drop"), (TO_TARGET, "delay"),
                                                   (TO_HOST, "drop"), (TO_HOST, "delay")])
@pytest.mark.parametrize("driver", DRIVERS)  # the host's; the target's is py
def test_lost_unread_bytes_reset_the_client(driver: str, direction: str, action: str) -> None:
    """The BYTES of a transfer dropped (the next message shows a sequence
    gap: the control connection closes) or held past the receiver's deadline.
    The new owner's socket is live but lacks bytes the old owner had
    acknowledged: nothing can carry the connection on, so the client is
    reset at once, never left hanging, and the connection's steering goes."""
    body_a, body_b = os.urandom(4 << 20), os.urandom(4 << 20)
    with relayed("lb", driver, target_driver="py", bytes_follow_min=UNREAD_MIN) as (apps, relay):
        relay.add(Rule(direction, MsgType.BYTES, action, seconds=2.5))
        watch = LogWatch(apps.log_path("t0" if direction == TO_TARGET else "host"))
        with client_connect(apps) as sock:
            sock.settimeout(30)  # a hang fails here
            answers = two_pipelined_puts(sock, body_a, body_b)
        assert relay.count(direction, MsgType.BYTES, action) == 1
        if direction == TO_TARGET:
            # PUT a's own bytes never reached t0: no answer at all.
            assert len(answers) == 1 and isinstance(answers[0], ConnectionResetError), answers
            watch.wait_line("host lost before its unread bytes came" if action == "drop"
                            else "its unread bytes never came; client reset")
        else:
            # PUT a served by t0; PUT b's bytes never came back to the host.
            assert isinstance(answers[0], http1.Response), answers
            assert answers[0].headers["x-body-sha256"] == sha256(body_a)
            assert len(answers) == 2 and isinstance(answers[1], ConnectionResetError), answers
            watch.wait_line("its unread bytes never came back; client reset")
            wait_for(lambda: apps.host_stats()["bytes_missed"] == 1, "the host to count it")
        assert_nothing_left(apps)
