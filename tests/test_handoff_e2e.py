"""End-to-end tests of the XO handoff: the reference app (xo.refapp) in a real
lab (xo.lab), real processes, real kernel, real curl. No mocks.

Each test brings up its own lab under a fresh random name with
``xo.demo.cluster()``, which stops the processes and removes the lab (also on
failure). What is checked is what a client and an operator can observe:
byte-exact bodies, who served them (X-Served-By), the host's engine counters,
the host interface's transmitted bytes (DSR: the host relays no response
bytes), the client namespace's RST counters, and that nothing is left behind
(steering map entries, fds, sockets).

The curl keep-alive test for every family, ingress path and driver mix is
test_handoff_keepalive.py.

Every test ends its connections with ``GET /_xo/stats``, which the host serves
itself: by then the connection has been handed back, so the client's close
happens on the host. (A client that closes while its connection sits on a
target is handled too, but by design leaves a redirect for CLOSED_TTL_S to
carry its last FIN/ACKs, which the leak checks here would have to wait out.)
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from handoff_tools import (
    DRIVER_MIXES,
    AsyncHTTPClient,
    NetnsHTTPConnection,
    client_socket,
    curl_many,
    docroot_digests,
    fd_count,
    lab_name,
    rst_counters,
    sockets_with_peer,
    steering_entries,
)
from netns_tools import sha256, wait_for
from xo.demo import cluster
from xo.lab import Lab, in_netns
from xo.refapp import HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

FILES = ["small.bin", "medium.bin", "large.bin"]


@pytest.mark.parametrize("drivers", list(DRIVER_MIXES))
def test_python_http_client_keepalive(tmp_path: Path, drivers: str) -> None:
    """http.client on one keep-alive connection from the client namespace."""
    requests = 100
    with cluster(targets=2, name=lab_name("p"),
                 drivers=DRIVER_MIXES[drivers]) as apps:
        digests = docroot_digests(apps)
        rst_before = rst_counters(apps.testbed)
        conn = NetnsHTTPConnection(apps.testbed)
        served_by: Counter[str] = Counter()
        try:
            for i in range(requests):
                name = FILES[i % 2]  # small / medium
                conn.request("GET", f"/{name}")
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200, f"request {i}: {resp.status}"
                assert not resp.will_close
                assert sha256(body) == digests[name], f"request {i} ({name}): body differs"
                served_by[resp.getheader("X-Served-By", "")] += 1
            conn.request("GET", "/_xo/stats")
            resp = conn.getresponse()
            stats = json.loads(resp.read())
            assert resp.getheader("X-Served-By") == "host"
            assert conn.connects == 1
        finally:
            conn.close()
        assert set(served_by) == {"t0", "t1"}, served_by
        assert stats["offloads"] == stats["returns"] == requests, stats
        assert stats["rollbacks"] == 0, stats
        assert rst_counters(apps.testbed) == rst_before


async def _hammer(testbed: Lab, digests: dict[str, str], clients: int, cycles: int,
                  names: list[str]) -> list[dict[str, int]]:
    """clients keep-alive connections at once, each doing cycles GETs."""

    async def one(index: int) -> dict[str, int]:
        client = AsyncHTTPClient(testbed)
        await client.connect()
        served: Counter[str] = Counter()
        try:
            for i in range(cycles):
                name = names[(index + i) % len(names)]
                reply = await client.get(f"/{name}")
                assert reply.status == 200, f"client {index} request {i}: {reply.status}"
                assert sha256(reply.body) == digests[name], f"client {index} request {i}"
                served[reply.headers.get("x-served-by", "")] += 1
            reply = await client.get("/_xo/stats")
            assert reply.headers.get("x-served-by") == "host"
        finally:
            await client.close()
        return dict(served)

    return await asyncio.gather(*(one(i) for i in range(clients)))


@pytest.mark.parametrize("drivers", list(DRIVER_MIXES))
def test_many_concurrent_keepalive_connections_leave_nothing_behind(tmp_path: Path,
                                                                   drivers: str) -> None:
    """100 keep-alive connections x 50 request/response cycles, each cycle a
    full handoff out and back; then no rules, fds or sockets are left."""
    clients, cycles = 100, 50
    with cluster(targets=2, name=lab_name("m"),
                 drivers=DRIVER_MIXES[drivers]) as apps:
        testbed = apps.testbed
        digests = docroot_digests(apps)
        # Warm up (first handoff to each target), then take the baselines.
        curl_many(testbed, apps.url, ["/small.bin"] * 4 + ["/_xo/stats"], tmp_path / "warm")
        pids = {m: apps.procs[m].pid for m in ("host", "t0", "t1")}
        wait_for(lambda: apps.host_stats()["offloaded_now"] == 0, "warm-up to finish")
        fds_before = {m: fd_count(pid) for m, pid in pids.items()}
        stats_before = apps.host_stats()
        rst_before = rst_counters(testbed)

        started = time.monotonic()
        results = asyncio.run(asyncio.wait_for(  # the limit only turns a hang into a failure
            _hammer(testbed, digests, clients, cycles, ["small.bin", "medium.bin"]), 600))
        elapsed = time.monotonic() - started
        print(f"{clients} x {cycles} handoff cycles in {elapsed:.1f} s "
              f"({clients * cycles / elapsed:.0f} round trips/s)")

        served: Counter[str] = Counter()
        for r in results:
            served.update(r)
        assert set(served) == {"t0", "t1"}, served
        assert sum(served.values()) == clients * cycles

        stats = apps.host_stats()
        done = clients * cycles
        assert stats["offloads"] - stats_before["offloads"] == done, stats
        assert stats["returns"] - stats_before["returns"] == done, stats
        assert stats["rollbacks"] == 0, stats
        assert stats["withdrawn"] == 0, stats

        assert rst_counters(testbed) == rst_before, "the client saw resets"

        # Nothing left behind once the clients have closed.
        wait_for(lambda: apps.host_stats()["rules"] == 0, "host steering map to empty")
        wait_for(lambda: apps.host_stats()["offloaded_now"] == 0, "no offloaded conns")
        for target in ("t0", "t1"):
            wait_for(lambda t=target: steering_entries(testbed, t) == 0,  # type: ignore[misc]
                     f"{target} steering map to empty")
        client_ip = testbed.client.ipv4
        for member in ("host", "t0", "t1"):
            wait_for(lambda m=member: not sockets_with_peer(testbed, m, client_ip),  # type: ignore[misc]
                     f"{member}: sockets to the client to go")
        for member, pid in pids.items():
            wait_for(lambda m=member, p=pid: fd_count(p) <= fds_before[m],  # type: ignore[misc]
                     f"{member} fds back to {fds_before[member]}")
        # Only the control connections (and listeners) remain on the targets.
        for target in ("t0", "t1"):
            to_host = sockets_with_peer(testbed, target, testbed.host.ipv4)
            controls = [s for s in to_host if s.state == "ESTAB" and s.local.endswith(":7700")]
            assert len(controls) == 1, (target, to_host)  # ss does see them
            assert to_host == controls, (target, to_host)
        rst_end = rst_counters(testbed)
        assert rst_end == rst_before, f"resets while closing: {rst_before} -> {rst_end}"


def test_target_remaps_port_when_four_tuple_clashes(tmp_path: Path) -> None:
    """The client already has client:P <-> t0:8080 open; a request on
    client:P <-> host:8080 handed to t0 would restore the same 4-tuple there.
    t0 must restore on another port (hidden by the source rewrite), and the
    client must notice nothing."""
    with cluster(targets=1, name=lab_name("r")) as apps:
        testbed = apps.testbed
        t0 = testbed.member("t0")
        digests = docroot_digests(apps)
        port = 40000 + secrets.randbelow(10000)

        with in_netns(t0.netns):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        side_client = side_server = conn = None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((t0.ipv4, HTTP_PORT))
            listener.listen(4)
            listener.settimeout(5)

            rst_before = {m: rst_counters(testbed, m) for m in ("client", "t0")}
            side_client = client_socket(testbed, bind_port=port, reuse_port=True)
            side_client.settimeout(5)
            side_client.connect((t0.ipv4, HTTP_PORT))
            side_server, peer = listener.accept()
            side_server.settimeout(5)
            assert peer == (testbed.client.ipv4, port)

            main = client_socket(testbed, bind_port=port, reuse_port=True)
            conn = NetnsHTTPConnection(testbed, sock=main)
            for i in range(6):
                name = FILES[i % 2]
                conn.request("GET", f"/{name}")
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200
                assert resp.getheader("X-Served-By") == "t0"
                assert sha256(body) == digests[name], f"request {i} ({name})"
                assert conn.sock.getsockname() == (testbed.client.ipv4, port)
            conn.request("GET", "/_xo/stats")
            stats = json.loads(conn.getresponse().read())
            assert conn.connects == 1
            assert stats["offloads"] == stats["returns"] == 6, stats
            assert stats["rollbacks"] == 0, stats

            # The clashing connection was not disturbed.
            side_client.sendall(b"ping")
            assert side_server.recv(16) == b"ping"
            side_server.sendall(b"pong")
            assert side_client.recv(16) == b"pong"

            log = apps.log_path("t0").read_text()
            remaps = [line for line in log.splitlines() if "remapping" in line]
            assert len(remaps) >= 6, log[-3000:]
            assert f":{HTTP_PORT} <-> " in remaps[0]
        finally:
            for sock in (conn, side_client, side_server, listener):
                if sock is not None:
                    sock.close()
        after = rst_counters(testbed, "client")
        assert after == rst_before["client"], f"client resets: {rst_before['client']} -> {after}"
        # t0 sent no RST either. (Its EstabResets does count: a socket closed
        # in repair mode, the hand-back's silent discard, goes from
        # ESTABLISHED straight to CLOSE, which is what that counter counts.)
        after = rst_counters(testbed, "t0")
        assert after["OutRsts"] == rst_before["t0"]["OutRsts"], f"t0 sent RSTs: {after}"
