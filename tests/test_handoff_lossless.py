"""Nothing lost in a handoff: the client's segments that arrive while its
connection is frozen (the next keep-alive request, ACKs of a response still
in flight, a request body still streaming) are parked, sent on to the new
owner and replayed into its stack. Proven by the client namespace's own
counters: not one retransmission, tail-loss probe or timeout, with every
byte checked by sha256.

The targets hand connections back the moment a response is written
(drain_timeout=0), before the client has acknowledged it, so the client's
ACKs and next request meet the parked flow on nearly every request; the
tests check the datapath really parked frames. The full 1,000-request runs
are `xo bench latency`; here the counts keep the suite short.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from collections import Counter
from pathlib import Path

import pytest
from handoff_tools import NetnsHTTPConnection, curl_many, docroot_digests, lab_name, member_steer
from netns_tools import client_loss_counters, sha256, wait_for
from pcap_tools import headers_capture, resends
from xo.demo import RefAppCluster, cluster
from xo.refapp import HTTP_PORT, TARGET_HTTP_PORT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

MEMBERS = ("host", "t0", "t1")


def park_counts(apps: RefAppCluster) -> Counter[str]:
    total: Counter[str] = Counter()
    for member in MEMBERS[:len(apps.testbed.targets) + 1]:
        with member_steer(apps.testbed, member) as steer:
            stats = steer.dp_stats()
        total.update({"parked": stats["parked"], "park_overflow": stats["park_overflow"]})
    return total


def http_client_requests(apps: RefAppCluster, names: list[str]) -> Counter[str]:
    digests = docroot_digests(apps)
    served: Counter[str] = Counter()
    conn = NetnsHTTPConnection(apps.testbed)
    try:
        for i, name in enumerate(names):
            conn.request("GET", f"/{name}")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (i, name, resp.status)
            assert sha256(body) == digests[name], f"request {i} ({name})"
            served[resp.getheader("X-Served-By") or "?"] += 1
        assert conn.connects == 1
    finally:
        conn.close()
    return served


@pytest.mark.parametrize(("driver", "rate"), [("py", None), ("py", "200mbit"),
                                              ("c", None), ("c", "200mbit")],
                         ids=["py-unlimited", "py-200mbit", "c-unlimited", "c-200mbit"])
def test_keepalive_handoffs_cost_the_client_no_retransmission(tmp_path: Path, driver: str,
                                                              rate: str | None) -> None:
    small, large = (300, 40) if rate is None else (100, 8)
    names = ["small.bin"] * small + ["large.bin"] * large
    # On rate-limited links the targets hand back once the response is
    # acknowledged, as by default, and the client's next request is what
    # meets the handoff (the lab's shapers serve the control port first:
    # docs/lab.md).
    drain = 0.0 if rate is None else 2.0
    with cluster(targets=2, name=lab_name("l"), rate=rate, drain_timeout=drain,
                 drivers={"*": driver}) as apps:
        digests = docroot_digests(apps)
        ns = apps.testbed.client.netns
        before = client_loss_counters(ns)
        served = http_client_requests(apps, names)
        assert set(served) <= {"t0", "t1"}, served
        after = client_loss_counters(ns)
        assert after == before, f"the client had to resend: {before} -> {after}"
        stats = apps.host_stats(settled=True)
        # The last connection comes back, or its client's close reaches the
        # target first (then the target closes it there).
        assert stats["offloads"] == len(names), stats
        assert stats["returns"] + stats["closed_on_target"] == len(names), stats
        assert stats["rollbacks"] == 0, stats
        parks = park_counts(apps)
        if drain == 0.0:  # handing back before the ACK: frames meet nearly every handoff
            assert parks["parked"] > 0, "no client frame met a handoff: the test proves nothing"
        assert parks["park_overflow"] == 0, parks
        # curl too: every byte, and again not one resend.
        rows = curl_many(apps.testbed, apps.url, [f"/{n}" for n in names], tmp_path / "curl")
        for i, (name, row) in enumerate(zip(names, rows, strict=True)):
            assert row["status"] == "200", (i, row)
            assert sha256(Path(row["file"]).read_bytes()) == digests[name], f"curl {i}"
        final = client_loss_counters(ns)
        assert final == after, f"curl had to resend: {after} -> {final}"


LOSS = ("TcpRetransSegs", "TCPLossProbes", "TCPTimeouts")
# The kernel doubles it: at most about 256 KiB of data in flight.
CLIENT_SNDBUF_SHAPED = 128 * 1024


def put_bodies(apps: RefAppCluster, body: bytes, count: int,
               sndbuf: int | None = None) -> tuple[dict[str, int], Counter[str]]:
    """`count` PUTs of `body` on one keep-alive connection, each answer's
    digest checked; what the client's kernel counted meanwhile."""
    digest = hashlib.sha256(body).hexdigest()
    ns = apps.testbed.client.netns
    before = client_loss_counters(ns)
    conn = NetnsHTTPConnection(apps.testbed, sndbuf=sndbuf)
    served: Counter[str] = Counter()
    try:
        for i in range(count):
            conn.request("PUT", f"/upload-{i}", body=body)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201, (i, resp.status)
            assert resp.getheader("X-Body-SHA256") == digest, f"PUT {i}: body differs"
            served[resp.getheader("X-Served-By") or "?"] += 1
        assert conn.connects == 1
    finally:
        conn.close()
    after = client_loss_counters(ns)
    return {k: after[k] - before[k] for k in after}, served


@pytest.mark.parametrize(("rate", "targets"), [(None, 1), (None, 2), ("200mbit", 1)],
                         ids=["unlimited", "unlimited-2-targets", "200mbit"])
def test_put_bodies_follow_the_connection_while_they_stream(rate: str | None,
                                                           targets: int,
                                                           tmp_path: Path) -> None:
    """The host hands the connection off as soon as a PUT's head is read; the
    64 MiB body, still streaming, reaches the target intact (its digest in
    the answer), several times on one keep-alive connection.

    The same PUTs served by the host alone, in the same lab, first: what the
    client resends there (a tail-loss probe now and then while the app is
    slow to read) is the lab's and the app's, not ours. Against it, XO may
    cost the client, unlimited, at most one tail-loss probe per transfer
    (the app's own probes vary too much to tell ours apart), on the shaped
    link one in the whole run, and nothing else: no fast retransmission of
    a segment a handoff reordered or dropped, no timeout.

    With two targets each PUT goes to the other one: the connection comes
    back from one target and leaves for the other while the first one's
    parked frames may still be on their way to the host; the host ships
    them to the new target ahead of its own, in one message."""
    count = 20 if rate is None else 3
    body = os.urandom(64 << 20)
    # On a shaped link the client's congestion window outgrows the shaper's
    # queue (631 KB at 200 Mbit/s) now and then, with or without XO, and the
    # drops there are the lab's congestion, not a handoff's. A send buffer
    # that keeps the client's data in flight under that queue leaves only
    # what a handoff could cost (still a window of segments in flight when
    # the socket freezes).
    sndbuf = None if rate is None else CLIENT_SNDBUF_SHAPED
    with cluster(targets=1, name=lab_name("b"), rate=rate, mode="local") as apps:
        base, served = put_bodies(apps, body, count, sndbuf)
        assert set(served) == {"host"}, served
    with cluster(targets=targets, name=lab_name("u"), rate=rate) as apps, \
            headers_capture(apps.testbed, "client", tmp_path / "client.pcap", HTTP_PORT) as pcap:
        xo, served = put_bodies(apps, body, count, sndbuf)
        assert set(served) == {f"t{i}" for i in range(targets)}, served
        stats = apps.host_stats()
        parks = park_counts(apps)
        client_ip = apps.testbed.client.ipv4
    assert stats["offloads"] == count and stats["rollbacks"] == 0, stats
    transfers = stats["offloads"] + stats["returns"]
    print("client, host alone:", base, "client, XO:", xo, "transfers:", transfers,
          "bytes followed:", stats.get("bytes_followed"),
          "park:", parks)
    assert xo["TcpEstabResets"] == 0 and xo["TcpOutRsts"] == 0, xo
    assert parks["park_overflow"] == 0, parks
    # Known gap (issue 7 stays open; docs/benchmarks.md): with the suite and a
    # loop of `xo lab demo` sharing the 2 vCPUs, one run of 20 PUTs showed a
    # single retransmission timeout; quiet runs show none. One is tolerated,
    # a second is a regression.
    assert xo["TCPTimeouts"] <= base["TCPTimeouts"] + 1, \
        f"{base} {xo}\n{resends(pcap, client_ip)}"
    # Unlimited, the app's own probes (it reads slowly) vary by tens from
    # run to run. On the shaped link the host alone costs nothing, and so
    # does XO since the new owner draws the ACK the old socket owed and the
    # unread bytes follow the state (docs/benchmarks.md: 0 / 0 / 0 in runs
    # of 20 PUTs); one probe is left to the lab's noise.
    slack = transfers if rate is None else 1
    why = f"{base} {xo} transfers {transfers}\n{resends(pcap, client_ip)}"
    assert xo["TCPLossProbes"] <= base["TCPLossProbes"] + slack, why
    # A probe resends one segment when the window has no new data for it.
    assert xo["TcpRetransSegs"] <= base["TcpRetransSegs"] + slack, why


def test_bytes_a_frozen_socket_takes_after_its_capture_reach_the_new_owner(
        tmp_path: Path) -> None:
    """A frozen socket still queues what reaches it; the kernel may deliver a
    client frame that got past the datapath before the park only after the
    capture (seen once as a request the client resent 207 ms later, and once
    as 46 segments of a streaming PUT). The fault "park_late" widens that gap
    on purpose: every freeze parks the client's frames only after its
    capture, 2 ms later. The old owner must carry those bytes on (counted
    `late_bytes`): every body arrives intact and the client resends no more
    than its own probes do (without them the client resent 186-501 segments
    in each of 3 runs).

    The client's send buffer is held to 128 KiB (about 256 KiB in flight).
    A real freeze parks before its capture, so only frames already inside
    the stack arrive late; the fault's window is 2 ms and, on a loaded
    machine, as long as the scheduler keeps the machine from waking. With 4
    CPU hogs, an unbounded client streamed megabytes into the frozen socket
    in that window, past what its receive memory holds: the old owner's
    kernel dropped the rest (TCPRcvQDrop, RcvPruned in its namespace) and
    the client timed out in 6 of 20 runs. Bounded, 16 of 16 such runs
    carried 16 KB-2 MB of late bytes on and resent only probes."""
    body = os.urandom(16 << 20)
    fault = {m: "park_late" for m in ("host", "t0", "t1")}
    with cluster(targets=2, name=lab_name("lt"), crash_at=fault) as apps, \
            headers_capture(apps.testbed, "client", tmp_path / "client.pcap", HTTP_PORT) as pcap:
        loss, served = put_bodies(apps, body, 6, CLIENT_SNDBUF_SHAPED)
        host = apps.host_stats()
        targets = [target_machine_stats(apps, t) for t in ("t0", "t1")]
        client_ip = apps.testbed.client.ipv4
    late = host["late_bytes"] + sum(t["late_bytes"] for t in targets)
    transfers = host["offloads"] + host["returns"]
    print("client:", loss, "served:", served, "late bytes:", late, "transfers:", transfers)
    assert late > 0, (host, targets)
    why = f"{loss} transfers {transfers}\n{resends(pcap, client_ip)}"
    assert loss["TCPTimeouts"] == 0 and loss["TcpEstabResets"] == 0, why
    assert loss["TcpRetransSegs"] <= transfers, why


def test_park_overflow_costs_a_retransmission_not_a_byte() -> None:
    """The smallest ring there is (one page: two MTU-sized records), and
    request bodies that keep streaming while the connection is handed off:
    the frames that do not fit overflow it, counted; the client resends them
    and every byte still arrives. How many frames meet a handoff depends on
    timing, so PUTs go on (up to a bound) until the overflow counter moved."""
    max_puts = 24
    body = os.urandom(8 << 20)
    digest = hashlib.sha256(body).hexdigest()
    with cluster(targets=1, name=lab_name("o"), park_ring_bytes=4096) as apps:
        ns = apps.testbed.client.netns
        before = client_loss_counters(ns)
        conn = NetnsHTTPConnection(apps.testbed)
        try:
            for i in range(max_puts):
                conn.request("PUT", f"/upload-{i}", body=body)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 201, (i, resp.status)
                assert resp.getheader("X-Body-SHA256") == digest, f"PUT {i}: body differs"
                assert resp.getheader("X-Served-By") == "t0"
                if i >= 3 and park_counts(apps)["park_overflow"]:
                    break
        finally:
            conn.close()
        after = client_loss_counters(ns)
        parks = park_counts(apps)
        assert parks["park_overflow"] > 0, parks
        resent = sum(after[k] - before[k] for k in ("TcpRetransSegs", "TCPLossProbes"))
        assert resent > 0, "frames were dropped, yet the client resent nothing"
        assert after["TcpEstabResets"] == before["TcpEstabResets"]


def unacked_segments(sock: socket.socket) -> int:
    """tcpi_unacked of the client's socket (struct tcp_info, offset 24)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int(struct.unpack_from("I", info, 24)[0])


def target_machine_stats(apps: RefAppCluster, target: str) -> dict[str, int]:
    """A target's protocol counters, from its plain HTTP port."""
    ip = apps.testbed.member(target).ipv4
    out = apps.testbed.run("client", ["curl", "-sf", "-m", "5",
                                      f"http://{ip}:{TARGET_HTTP_PORT}/_xo/stats"],
                           capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("bytes_follow_min", [None, 1], ids=["in-the-state", "after-the-state"])
def test_an_ack_owed_at_the_freeze_still_reaches_the_client(bytes_follow_min: int | None,
                                                            tmp_path: Path) -> None:
    """The host's socket answers a request quickly, so it delays its ACKs
    (they ride on answers). The client then sends a PUT's head and the first
    kilobyte of its body and waits for that to be acknowledged before it
    sends the rest: the host hands the connection off with the ACK still
    owed, and the client, with nothing else to send, would hear nothing
    until its retransmission timer (>= 200 ms; a restored socket does not
    know it owes an ACK). The new owner draws it (counted as `owed_acks`):
    the client resends nothing, and every body arrives whole.

    The client's tail-loss probes are off in its namespace
    (`tcp_early_retrans=0`). A probe fires once nothing was acknowledged for
    two round trips plus two ticks (~4-8 ms here), and a handoff on a loaded
    machine can outlast that (docs/benchmarks.md: the one probe per transfer
    the streaming PUT test allows). Such a probe is parked and replayed like
    any client frame and draws the ACK itself, which would hide a missing
    owed ACK as easily as fail on a slow one. Without probes only the
    owed ACK answers the client before its timer: a missing one shows as a
    timeout and a resent segment.

    With the kilobyte after the state (threshold 1) the target's socket has
    nothing to read, so only the owed-ACK duplicate can answer the client
    (without it the client times out: checked by hand). In the state, the
    target's read of it also opens the window and may draw an ACK itself."""
    body = os.urandom(256 << 10)
    digest = hashlib.sha256(body).hexdigest()
    first = 1000
    extra = {} if bytes_follow_min is None else {"bytes_follow_min": bytes_follow_min}
    with cluster(targets=1, name=lab_name("w"), **extra) as apps, \
            headers_capture(apps.testbed, "client", tmp_path / "client.pcap", HTTP_PORT) as pcap:
        ns = apps.testbed.client.netns
        client_ip = apps.testbed.client.ipv4
        apps.testbed.run("client", ["sysctl", "-qw", "net.ipv4.tcp_early_retrans=0"],
                         check=True)
        before = client_loss_counters(ns)
        conn = NetnsHTTPConnection(apps.testbed)
        owed = 0
        try:
            # Whether the host's socket delays its ACK depends on its delayed-
            # ACK mode (a socket restored after a hand-back starts in quick-ACK
            # mode; one answered quickly leaves it): PUTs go on, up to a
            # bound, until a handoff met an owed ACK.
            for i in range(20):
                if i >= 3 and (owed := target_machine_stats(apps, "t0")["owed_acks"]):
                    break
                # Answered by the host itself: its socket now delays ACKs.
                # It takes a few quick request/answer rounds before the
                # kernel lets ACKs ride on answers: one left the test with
                # nothing owed in about half its runs here, three in 2 of 32.
                for _ in range(3):
                    conn.request("GET", "/_xo/stats")
                    assert conn.getresponse().read()
                conn.putrequest("PUT", f"/owed-{i}", skip_accept_encoding=True)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body[:first])
                sock = conn.sock
                assert sock is not None
                wait_for(lambda s=sock: unacked_segments(s) == 0,
                         "the head and first kilobyte to be acknowledged", timeout=10)
                conn.send(body[first:])
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 201, (i, resp.status)
                assert resp.getheader("X-Body-SHA256") == digest, f"PUT {i}: body differs"
                assert resp.getheader("X-Served-By") == "t0"
            assert conn.connects == 1
        finally:
            conn.close()
        after = client_loss_counters(ns)
        owed = owed or target_machine_stats(apps, "t0")["owed_acks"]
    assert {k: after[k] - before[k] for k in LOSS} == dict.fromkeys(LOSS, 0), \
        f"{before} {after} owed ACKs drawn: {owed}\n{resends(pcap, client_ip)}"
    if not owed:
        pytest.skip("the host's socket never delayed its ACK in 20 PUTs: nothing owed to check")
