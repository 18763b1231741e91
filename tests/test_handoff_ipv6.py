"""IPv6 clients end to end: the reference app (xo.refapp) in a real lab, real
processes, real kernel, real curl. No mocks.

The host listens on its IPv4 and its IPv6 address (same port) and offloads
connections of both families with one engine. The control connections stay
IPv4: a target agent adopts a state whose local address is the host's IPv6
address because the speaking host (its IPv4 control peer) owns that address
too, restores it on its own IPv6 address, and keys its source rewrite and
ingress block by IPv6 4-tuples. A state naming an address that is not the
host's is still refused. (The curl keep-alive test over IPv6 is one of the
cases of test_handoff_keepalive.py.)

Like the e2e tests, every connection ends with ``GET /_xo/stats``, which the
host serves itself (the connection is back on the host when the client
closes), so nothing may be left behind afterwards.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
from handoff_faults_tools import (
    captured_state,
    control_connect,
    handshake,
    map_entries,
    recv_msg,
)
from handoff_tools import (
    DRIVER_MIXES,
    IO_TIMEOUT,
    assert_nothing_left,
    client_tag,
    docroot_digests,
    lab_name,
    peer_sockets,
    rst_counters,
    served_lines,
)
from netns_tools import sha256, wait_for
from xo.core import (
    ABORT_HOST,
    ABORT_REFUSED,
    Endpoint,
    MsgType,
    decode_abort,
    decode_ready,
    encode_abort,
)
from xo.demo import cluster
from xo.lab import Lab, in_netns
from xo.refapp import HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

FILES = ["small.bin", "medium.bin", "large.bin"]


class FamilyHTTPConnection(http.client.HTTPConnection):
    """http.client from the lab's client namespace to the host's address of
    one family; counts connects (one connection per test, no silent reconnect)."""

    def __init__(self, testbed: Lab, family: int, timeout: float = IO_TIMEOUT) -> None:
        super().__init__(testbed.host.address(family), HTTP_PORT, timeout=timeout)
        self.testbed, self.family = testbed, family
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1
        with in_netns(self.testbed.client.netns):
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


@pytest.mark.parametrize("drivers", list(DRIVER_MIXES))
def test_ipv4_and_ipv6_connections_interleaved(tmp_path: Path, drivers: str) -> None:
    """An IPv4 and an IPv6 keep-alive connection, both with a request in
    flight at once, cycle after cycle: the same engine moves both, each to
    the target's address of its own family."""
    cycles = 20
    with cluster(targets=2, name=lab_name("w"),
                 drivers=DRIVER_MIXES[drivers]) as apps:
        testbed = apps.testbed
        digests = docroot_digests(apps)
        rst_before = rst_counters(testbed)
        conns = {socket.AF_INET: FamilyHTTPConnection(testbed, socket.AF_INET),
                 socket.AF_INET6: FamilyHTTPConnection(testbed, socket.AF_INET6)}
        served: dict[socket.AddressFamily, Counter[str]] = {family: Counter() for family in conns}
        stats: dict[socket.AddressFamily, dict[str, int]] = {}
        try:
            for i in range(cycles):
                names = {family: FILES[(i + k) % 2] for k, family in enumerate(conns)}
                for family, conn in conns.items():
                    conn.request("GET", f"/{names[family]}")
                for family, conn in conns.items():
                    resp = conn.getresponse()
                    body = resp.read()
                    what = f"cycle {i} {family.name} ({names[family]})"
                    assert resp.status == 200, what
                    assert not resp.will_close, what
                    assert sha256(body) == digests[names[family]], f"{what}: body differs"
                    served[family][resp.getheader("X-Served-By", "")] += 1
            for family, conn in conns.items():
                assert conn.sock is not None
                local = conn.sock.getsockname()[0]
                assert local == testbed.client.address(family), (family, local)
                conn.request("GET", "/_xo/stats")
                resp = conn.getresponse()
                assert resp.getheader("X-Served-By") == "host"
                stats[family] = json.loads(resp.read())
                assert conn.connects == 1, family.name
        finally:
            for conn in conns.values():
                conn.close()

        for family in conns:
            assert set(served[family]) <= {"t0", "t1"}, (family.name, served[family])
            assert sum(served[family].values()) == cycles
        assert set(served[socket.AF_INET]) | set(served[socket.AF_INET6]) == {"t0", "t1"}
        last = stats[socket.AF_INET6]  # asked after the IPv4 connection's stats
        assert last["offloads"] == last["returns"] == 2 * cycles, last
        assert last["rollbacks"] == 0 and last["withdrawn"] == 0, last
        assert last["served_locally"] == 0, last

        # Both families' clients appear in the targets' logs.
        lines = served_lines(apps, "t0") + served_lines(apps, "t1")
        for family in conns:
            tag = client_tag(testbed.client.address(family))
            seen = sum(tag in line for line in lines)
            assert seen == cycles, (family.name, seen)

        assert rst_counters(testbed) == rst_before, "the client saw resets"
        assert_nothing_left(apps, ["t0", "t1"])
        assert rst_counters(testbed) == rst_before, "resets while closing"


def test_agent_adopts_host_ipv6_state_only(tmp_path: Path) -> None:
    """Over an IPv4 control connection from the host: a state naming the
    host's IPv6 address is adopted on t0's IPv6 address with IPv6-keyed
    rules; one naming the client's IPv6 address is refused with an ABORT,
    nothing bound or installed."""
    with cluster(targets=1, name=lab_name("a")) as apps:
        testbed = apps.testbed
        t0 = testbed.member("t0")
        key = apps.key_path.read_bytes()
        state = captured_state(apps, family=socket.AF_INET6)
        assert state.local.ip == testbed.host.ipv6
        with control_connect(apps) as sock:
            assert sock.getsockname()[0] == testbed.host.ipv4
            channel, _ = handshake(sock, key)

            forged = Endpoint(testbed.client.ipv6, HTTP_PORT)
            sock.sendall(channel.seal(MsgType.BEGIN_OFFLOAD, 5,
                                      captured_state(apps, forged, socket.AF_INET6).encode()))
            reply = recv_msg(sock, channel)
            assert (reply.type, reply.conn_id) == (MsgType.ABORT, 5)
            reason, text = decode_abort(reply.payload)
            assert reason == ABORT_REFUSED and "not a host of ours" in text, text
            assert map_entries(apps, "t0") == []
            assert not peer_sockets(testbed, "t0", testbed.client.ipv6)

            sock.sendall(channel.seal(MsgType.BEGIN_OFFLOAD, 6, state.encode()))
            reply = recv_msg(sock, channel)
            assert (reply.type, reply.conn_id) == (MsgType.TARGET_READY, 6), reply
            ready = decode_ready(reply.payload)
            ip, port = ready.ip, ready.port
            assert ip == t0.ipv6
            # Two IPv6-keyed entries: the source rewrite of the restored
            # socket, and the park that holds the client's frames until the
            # host's parked frames are in (docs/architecture.md).
            entries = {rule.kind.name: (flow, rule) for flow, rule in map_entries(apps, "t0")}
            assert sorted(entries) == ["PARK", "SRC_REWRITE"], entries
            flow, rule = entries["SRC_REWRITE"]
            assert (str(flow.src), flow.src_port) == (t0.ipv6, port), flow
            assert (str(flow.dst), flow.dst_port) == (testbed.client.ipv6, state.remote.port)
            assert (str(rule.new_src), rule.new_src_port) == (testbed.host.ipv6,
                                                              state.local.port), rule
            flow, rule = entries["PARK"]
            assert (str(flow.src), flow.src_port) == (testbed.client.ipv6, state.remote.port)
            assert (str(flow.dst), flow.dst_port) == (t0.ipv6, port), flow

            # The host withdraws: t0 drops its copy and the rewrite.
            sock.sendall(channel.seal(MsgType.ABORT, 6, encode_abort(ABORT_HOST, "test")))
            wait_for(lambda: map_entries(apps, "t0") == [], "t0 to drop the aborted copy")
            wait_for(lambda: not peer_sockets(testbed, "t0", testbed.client.ipv6),
                     "t0's restored copy to go")
        log = apps.log_path("t0").read_text()
        assert f"state names {testbed.client.ipv6}" in log, log[-2000:]

