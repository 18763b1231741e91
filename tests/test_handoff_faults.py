"""Faults in the handoff protocol, with real processes on the real kernel.

1. A target agent SIGKILLed (its ``crash_at`` hook) at each protocol step:
   before TARGET_READY the host rolls back and serves the request itself
   (the client notices nothing); after it, the host sees its control
   connection close, withdraws the target's redirects and resets the client
   promptly (no hang). The probe that makes the client's kernel reset is
   also tested on its own (IPv4 and IPv6, with and without data the host
   never saw).
2. Forged, replayed and malformed control messages sent to a target's
   control port: each is logged and refused, the agent keeps serving, and
   nothing is bound or installed on its behalf.

Every lab has one target (t0), so the host's policy has only t0 to pick.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from handoff_faults_tools import (
    LogWatch,
    captured_state,
    client_connect,
    control_connect,
    curl,
    fault_cluster,
    file_digest,
    frames_until_closed,
    get_and_hand_back,
    handshake,
    lab_name,
    map_entries,
    peer_tag,
    read_response,
    recv_msg,
    tcp_sockets,
    wait_exit,
)
from netns_tools import VethPair, connect, sha256, snmp_tcp, wait_for
from xo import core
from xo.core import (
    ABORT_HOST,
    ABORT_REFUSED,
    Channel,
    Endpoint,
    MsgType,
    decode_abort,
    encode_abort,
)
from xo.demo import RefAppCluster
from xo.engine import probe_client
from xo.lab import in_netns
from xo.steer import FlowKey

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, BPF)")

FILE = "small.bin"
# A client reset on a lost target comes from the host's action, not from a
# timer: curl's timeout (rc 28) only turns a hang into a failure, and the
# client's retransmission counter shows no timer had to fire.
CURL_TIMEOUT = 10.0


def host_flow_entries(apps: RefAppCluster, client_port: int | None = None) -> list[FlowKey]:
    """Keys in the host's map (of one client connection, if a port is given)."""
    return [key for key, _ in map_entries(apps, "host")
            if client_port is None or key.src_port == client_port]


def assert_t0_killed(apps: RefAppCluster, step: str) -> None:
    assert wait_exit(apps, "t0") == -9, "t0 should have been SIGKILLed"
    log = apps.log_path("t0").read_text()
    assert f"fault injection: dying at {step}" in log


def assert_host_serves(apps: RefAppCluster) -> None:
    """With t0 gone the host still answers (and serves locally)."""
    res = curl(apps, f"/{FILE}")
    assert (res.rc, res.status, res.served_by) == (0, "200", "host"), res
    assert sha256(res.body) == file_digest(apps, FILE)


# ---- 1. a target killed at each protocol step ---------------------------------


@pytest.mark.parametrize("step", ["begin", "restored"])
def test_killed_before_target_ready_rolls_back(step: str) -> None:
    """The host keeps its frozen socket until TARGET_READY: it resumes and
    serves the request itself; the client sees no reset."""
    with fault_cluster(lab_name(f"fk{step[0]}"), crash_at={"t0": step}) as apps:
        client_ns = apps.testbed.client.netns
        before = snmp_tcp(client_ns)
        res = curl(apps, f"/{FILE}", CURL_TIMEOUT)
        after = snmp_tcp(client_ns)
        assert res.rc == 0, res
        assert (res.status, res.served_by) == ("200", "host")
        assert sha256(res.body) == file_digest(apps, FILE)
        # Nothing in this namespace but our curl: no RST sent or received.
        for counter in ("OutRsts", "EstabResets", "AttemptFails"):
            assert after[counter] == before[counter], counter
        assert_t0_killed(apps, step)
        stats = apps.host_stats()
        assert stats["rollbacks"] == 1 and stats["offloads"] == 0
        assert stats["withdrawn"] == 0
        assert stats["targets"]["t0"]["up"] is False
        assert host_flow_entries(apps) == []  # the block rule went with the rollback
        assert_host_serves(apps)
        assert apps.procs["host"].poll() is None


def test_killed_after_target_ready() -> None:
    """t0 dies right after sending TARGET_READY. Two correct outcomes,
    depending on which the host handles first:
    - the TARGET_READY: it redirects, discards its socket, sends HOST_READY;
      then the connection loss: it withdraws the redirect and resets the
      client at once;
    - the connection loss: it rolls back and serves the request itself.
    Never: a redirect to a dead target, or a client left hanging."""
    with fault_cluster(lab_name("fkr"), crash_at={"t0": "ready"}) as apps:
        client_ns = apps.testbed.client.netns
        before = snmp_tcp(client_ns)
        res = curl(apps, f"/{FILE}", CURL_TIMEOUT)
        after = snmp_tcp(client_ns)
        assert_t0_killed(apps, "ready")
        stats = apps.host_stats()
        assert stats["targets"]["t0"]["up"] is False
        print(f"t0 killed after TARGET_READY: {'rolled back' if res.rc == 0 else 'reset'}"
              f" (curl {res.rc} in {res.elapsed:.3f} s)")
        if res.rc == 0:
            assert (res.status, res.served_by) == ("200", "host"), res
            assert sha256(res.body) == file_digest(apps, FILE)
            assert stats["rollbacks"] == 1 and stats["offloads"] == 0
            assert after["EstabResets"] == before["EstabResets"]
        else:
            assert res.rc == 56 and "reset" in res.stderr, res  # Recv failure: reset by peer
            assert after["RetransSegs"] == before["RetransSegs"], (before, after)
            assert stats["offloads"] == 1 and stats["withdrawn"] >= 1
            assert after["EstabResets"] == before["EstabResets"] + 1
        assert stats["offloaded_now"] == 0
        assert host_flow_entries(apps) == []
        assert_host_serves(apps)


def test_killed_after_host_ready_resets_client() -> None:
    """t0 dies after HOST_READY, before serving: the host withdraws the
    redirect and the waiting client gets a reset, not a hang."""
    with fault_cluster(lab_name("fkh"), crash_at={"t0": "host_ready"}) as apps:
        client_ns = apps.testbed.client.netns
        before = snmp_tcp(client_ns)
        res = curl(apps, f"/{FILE}", CURL_TIMEOUT)
        after = snmp_tcp(client_ns)
        assert res.rc == 56 and "reset" in res.stderr, res
        assert after["RetransSegs"] == before["RetransSegs"], (before, after)
        assert after["EstabResets"] == before["EstabResets"] + 1
        assert_t0_killed(apps, "host_ready")
        stats = apps.host_stats()
        assert stats["offloads"] == 1 and stats["withdrawn"] == 1
        assert stats["offloaded_now"] == 0 and stats["targets"]["t0"]["up"] is False
        assert host_flow_entries(apps) == []
        assert_host_serves(apps)


def test_killed_while_handing_back_resets_client() -> None:
    """t0 serves the request, then dies handing the connection back (before
    TARGET_DONE). The client has its whole response; its keep-alive
    connection is then reset promptly (the host withdraws the redirect and
    elicits the RST), so it does not sit on a dead connection."""
    with fault_cluster(lab_name("fkd"), crash_at={"t0": "done"}) as apps:
        sock = client_connect(apps)
        with sock:
            client_port = sock.getsockname()[1]
            sock.sendall(f"GET /{FILE} HTTP/1.1\r\nHost: xo\r\n\r\n".encode())
            headers, body = read_response(sock)
            assert (headers[":status"], headers["x-served-by"]) == ("200", "t0")
            assert sha256(body) == file_digest(apps, FILE)
            before = snmp_tcp(apps.testbed.client.netns)
            with pytest.raises(ConnectionResetError):  # (a timeout would fail here)
                sock.recv(1)  # nothing more comes: the connection is reset
            after = snmp_tcp(apps.testbed.client.netns)
            # Elicited by the host, not by a timer of the idle client.
            assert after["RetransSegs"] == before["RetransSegs"], (before, after)
            assert after["EstabResets"] == before["EstabResets"] + 1
        assert_t0_killed(apps, "done")
        stats = apps.host_stats()
        assert stats["offloads"] == 1 and stats["withdrawn"] == 1 and stats["returns"] == 0
        assert stats["offloaded_now"] == 0
        assert host_flow_entries(apps, client_port) == []
        assert_host_serves(apps)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("served", [0, 100_000], ids=["idle", "served"])
def test_probe_resets_idle_client(family: int, served: int) -> None:
    """engine.probe_client on its own: the state of a connection is taken
    (as at a handoff); then `served` more bytes reach the client (as from a
    target), the host's socket disappears silently, and the probe built from
    the old numbers makes the idle client's kernel reset the connection."""
    pair = VethPair(family).open()
    try:
        peer, host = connect(pair)
        with peer, host:
            core.freeze(host)
            state = core.capture(host)
            core.resume(host)
            if served:
                host.sendall(os.urandom(served))
                got = 0
                while got < served:
                    got += len(peer.recv(65536))
            core.freeze(host)
            core.discard(host)
            peer.settimeout(CURL_TIMEOUT)  # turns a missing reset into a failure
            with in_netns(pair.host_ns):
                probe_client(state.local, state.remote,
                             state.snd_seq - state.inflight_len - state.unsent_len,
                             state.rcv_seq)
            with pytest.raises(ConnectionResetError):
                peer.recv(1)
    finally:
        pair.close()


# ---- 2. forged, replayed and malformed control messages ---------------------


@dataclass
class Ctl:
    apps: RefAppCluster
    key: bytes


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    with fault_cluster(lab_name("fc")) as apps:
        yield Ctl(apps, apps.key_path.read_bytes())


def attack_garbage(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: xo\r\n\r\n" + os.urandom(64))
    assert frames_until_closed(sock) == [MsgType.HELLO]
    return ("malformed control message", "bad magic")


def attack_wrong_key(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    forged = Channel(os.urandom(32), 0, 0)
    sock.sendall(forged.seal(MsgType.HELLO, 0, os.urandom(core.HELLO_NONCE_LEN)))
    assert frames_until_closed(sock) == [MsgType.HELLO]
    return ("rejected control message", "HELLO does not verify")


def attack_bad_mac(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    channel, _ = handshake(sock, ctl.key)
    frame = bytearray(channel.seal(MsgType.BEGIN_OFFLOAD, 1,
                                   captured_state(ctl.apps).encode()))
    frame[-1] ^= 0x01
    sock.sendall(frame)
    assert MsgType.TARGET_READY not in frames_until_closed(sock)
    return ("rejected control message", "does not decrypt")


def attack_tampered_ciphertext(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    """One bit of the encrypted state flipped (tag intact): the frame does not
    decrypt, nothing in it is acted on."""
    channel, _ = handshake(sock, ctl.key)
    frame = bytearray(channel.seal(MsgType.BEGIN_OFFLOAD, 1,
                                   captured_state(ctl.apps).encode()))
    frame[core.ENV_HEADER_LEN + 20] ^= 0x40
    sock.sendall(frame)
    assert MsgType.TARGET_READY not in frames_until_closed(sock)
    return ("rejected control message", "does not decrypt")


def attack_oversized(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    header = bytearray(Channel(os.urandom(32), 0, 0).seal(MsgType.HELLO, 0, b"")
                       [:core.ENV_HEADER_LEN])
    header[32:36] = (core.ENV_MAX_PAYLOAD + 1).to_bytes(4, "big")
    sock.sendall(header)
    assert frames_until_closed(sock) == [MsgType.HELLO]
    return ("malformed control message", f"{core.ENV_MAX_PAYLOAD + 1} bytes announced")


def attack_big_hello(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    """Before the HELLO exchange nothing is authenticated: a header announcing
    a payload within the envelope's limit (80 MiB) but larger than a HELLO
    must be refused at once, not buffered while waiting for its bytes."""
    header = bytearray(Channel(os.urandom(32), 0, 0).seal(MsgType.HELLO, 0, b"")
                       [:core.ENV_HEADER_LEN])
    header[32:36] = core.ENV_MAX_PAYLOAD.to_bytes(4, "big")
    sock.sendall(header)
    # The agent closes without a byte more from us: it did not wait for them.
    assert frames_until_closed(sock) == [MsgType.HELLO]
    total = core.ENV_HEADER_LEN + core.ENV_MAX_PAYLOAD + core.ENV_MAC_LEN
    return ("malformed control message", f"{total} bytes announced, at most")


def attack_truncated(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    channel, _ = handshake(sock, ctl.key)
    frame = channel.seal(MsgType.BEGIN_OFFLOAD, 1, captured_state(ctl.apps).encode())
    sock.sendall(frame[:len(frame) // 2])
    sock.shutdown(socket.SHUT_WR)
    assert MsgType.TARGET_READY not in frames_until_closed(sock)
    return ("control connection from", "closed")


def attack_foreign_state(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    """A keyed BEGIN_OFFLOAD whose state claims the client's address as the
    local side: the target must not bind someone else's 4-tuple."""
    channel, _ = handshake(sock, ctl.key)
    forged = Endpoint(ctl.apps.testbed.client.ipv4, 8080)
    sock.sendall(channel.seal(MsgType.BEGIN_OFFLOAD, 7,
                              captured_state(ctl.apps, forged).encode()))
    reply = recv_msg(sock, channel)
    assert (reply.type, reply.conn_id) == (MsgType.ABORT, 7)
    reason, text = decode_abort(reply.payload)
    assert reason == ABORT_REFUSED and "not a host of ours" in text, text
    return ("cannot adopt", f"state names {forged.ip}")


def attack_replay(ctl: Ctl, sock: socket.socket) -> tuple[str, ...]:
    """A legitimate session (its BEGIN_OFFLOAD gets TARGET_READY), recorded;
    its frames replayed in the same session, then on a new connection."""
    apps = ctl.apps
    legit = control_connect(apps)
    with legit:
        channel, hello = handshake(legit, ctl.key)
        begin = channel.seal(MsgType.BEGIN_OFFLOAD, 9, captured_state(apps).encode())
        legit.sendall(begin)
        reply = recv_msg(legit, channel)
        assert (reply.type, reply.conn_id) == (MsgType.TARGET_READY, 9), reply
        legit.sendall(channel.seal(MsgType.ABORT, 9, encode_abort(ABORT_HOST, "test")))
        wait_for(lambda: map_entries(apps, "t0") == [], "t0 to drop the aborted copy")
        # The same BEGIN_OFFLOAD again on its own session: an old sequence number.
        watch = LogWatch(apps.log_path("t0"))
        legit.sendall(begin)
        assert MsgType.TARGET_READY not in frames_until_closed(legit)
        watch.wait_line(peer_tag(legit), "already seen")
    # The whole recorded session on a new connection: the HELLO verifies (it
    # only proves the key), but the session keys now also depend on the
    # agent's fresh nonce, so the recorded BEGIN_OFFLOAD does not decrypt.
    sock.sendall(hello)
    sock.sendall(begin)
    types = frames_until_closed(sock)
    assert MsgType.TARGET_READY not in types and types[:1] == [MsgType.HELLO], types
    return ("rejected control message", "does not decrypt")


ATTACKS: dict[str, Callable[[Ctl, socket.socket], tuple[str, ...]]] = {
    "garbage": attack_garbage,
    "wrong_key": attack_wrong_key,
    "bad_mac": attack_bad_mac,
    "tampered_ciphertext": attack_tampered_ciphertext,
    "replay": attack_replay,
    "oversized": attack_oversized,
    "big_hello": attack_big_hello,
    "truncated": attack_truncated,
    "foreign_state": attack_foreign_state,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_control_port_refuses(ctl: Ctl, attack: str) -> None:
    apps = ctl.apps
    sockets_before = tcp_sockets(apps, "t0")
    assert map_entries(apps, "t0") == []
    watch = LogWatch(apps.log_path("t0"))
    sock = control_connect(apps)
    with sock:
        needles = ATTACKS[attack](ctl, sock)
        line = watch.wait_line(peer_tag(sock), *needles)
    print(f"{attack}: {line}")
    assert "WARNING" in line, line
    # The agent is alive, bound nothing and installed nothing for it...
    assert apps.procs["t0"].poll() is None
    assert tcp_sockets(apps, "t0") == sockets_before
    assert map_entries(apps, "t0") == []
    assert "4-tuple" not in watch.text()
    # ...and still takes handoffs over its real control connection.
    stats = apps.host_stats()
    assert stats["targets"]["t0"]["up"] is True
    headers, body = get_and_hand_back(apps, FILE)
    assert (headers[":status"], headers["x-served-by"]) == ("200", "t0")
    assert sha256(body) == file_digest(apps, FILE)
    assert apps.host_stats()["offloads"] == stats["offloads"] + 1
    wait_for(lambda: map_entries(apps, "t0") == [], "t0's map to empty after the hand-back")



def test_host_reconnects_to_a_restarted_target() -> None:
    """A target that died and comes back is used again: the host retries its
    control connection, and the new agent purges what its predecessor left
    in the pinned map (same owner id)."""
    with fault_cluster(lab_name("fr"), crash_at={"t0": "begin"}) as apps:
        first = curl(apps, f"/{FILE}", CURL_TIMEOUT)
        assert (first.rc, first.served_by) == (0, "host")
        wait_exit(apps, "t0")
        apps.crash_at = {}
        apps.procs.pop("t0")
        apps.start_member("t0")
        served_by: list[str] = []

        def t0_serves() -> bool:
            res = curl(apps, f"/{FILE}", CURL_TIMEOUT)
            assert res.rc == 0 and sha256(res.body) == file_digest(apps, FILE), res
            served_by.append(res.served_by)
            return res.served_by == "t0"

        wait_for(t0_serves, "the restarted t0 to serve again", interval=0.3)
        assert apps.host_stats()["targets"]["t0"]["up"] is True
        assert set(served_by) <= {"host", "t0"}
